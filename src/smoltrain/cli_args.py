"""The `smoltrain` command line: one sub-parser per command. The train command's flags that
set a config key come from one table, `CONFIG_FLAGS`; each becomes the dotted override
`key=value` (and wins over the file and the other overrides)."""

from __future__ import annotations

import argparse
from pathlib import Path

# flag -> (the config key it sets, its type, what it is)
CONFIG_FLAGS: dict[str, tuple[str, type, str]] = {
    "--output-dir": ("output_dir", str, "the run's folder"),
    "--max-steps": ("schedule.max_steps", int, "length of the schedule"),
    "--seed": ("train.seed", int, "the run's seed"),
    "--log-every": ("log.log_every", int, "steps between log lines"),
    "--device": ("train.device", str, "auto, cpu, cuda or mps"),
}


def config_flags(args: argparse.Namespace) -> dict[str, object]:
    """The train command's config flags as config key -> value (None: not given)."""
    return {key: getattr(args, flag[2:].replace("-", "_")) for flag, (key, _, _) in CONFIG_FLAGS.items()}


COMPILE_HELP = (
    "compile the decode step with torch.compile: on CPU about 2x faster at batch 1, after 20-100 s "
    "of compiling the first time, about 10 s later (again for each new cache size: 256, 512, ... "
    "tokens); worth it for long outputs"
)


QUANTIZE_HELP = (
    "CPU: weight-only quantized linears (PyTorch's packed kernels), the head included (int8 under "
    "int4); int8 (a scale per row) or int4 (groups of 32): faster decoding, slightly other logits"
)


# smoltrain.model.kernels.quantized.QUANTIZE_KINDS, written out: the parser is built before
# torch is imported (`train` on CPU re-executes itself first, and importing torch twice cost
# each such command a second)
QUANTIZE_CHOICES = ("int8", "int4")


def add_quantize_flag(p) -> None:
    p.add_argument("--quantize", choices=QUANTIZE_CHOICES, default=None, help=QUANTIZE_HELP)


def _limit(value: str) -> float:
    """lm-eval's --limit: a count of items, or a fraction of each task below 1."""
    number = float(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {value}")
    return number


def add_generate(sub) -> None:
    g = sub.add_parser("generate", help="generate text from a model, streamed as it is produced")
    g.add_argument("--model", default="smollm2", help="HF folder, .gguf file, hub name or 'smollm2'")
    g.add_argument("--prompt", required=True)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    g.add_argument("--tokenizer", default=None, help="default: the model's own, else smollm2")
    g.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    add_decoding_flags(g, max_new_tokens=128, temperature=1.0, top_k=None, repetition_penalty=1.0)
    g.add_argument("--compile", action="store_true", help=COMPILE_HELP)


def add_decoding_flags(
    p, max_new_tokens: int, temperature: float, top_k: int | None, repetition_penalty: float, greedy_help=None
) -> None:
    """The flags `generate` and `chat` share: how much and how to sample, the seed, dtype, device."""
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="the most new tokens")
    p.add_argument("--temperature", type=float, default=temperature, help=greedy_help)
    p.add_argument("--top-k", type=int, default=top_k)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=repetition_penalty)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", default="auto", help="auto: bf16 on CUDA (fp16 without it), else float32")
    p.add_argument("--device", default="auto")
    add_quantize_flag(p)


def add_chat(sub) -> None:
    c = sub.add_parser(
        "chat",
        help="a conversation with a model in the terminal (its chat template, the history kept)",
        description="Chat with a model: each reply streams as it is made and the conversation so far is "
        "its context. Type /undo to take back the last exchange, /clear to start over, /exit (or "
        "Ctrl-D) to leave.",
    )
    c.add_argument(
        "--model", default="smollm2", help="HF folder, run's final/, .gguf file, hub name or 'smollm2'"
    )
    c.add_argument("--tokenizer", default=None, help="default: the model's own, else smollm2")
    c.add_argument("--system", default=None, help="a system prompt (default: the template's own, if any)")
    add_decoding_flags(
        c, max_new_tokens=256, temperature=0.7, top_k=50, repetition_penalty=1.1, greedy_help="0: greedy"
    )


def add_convert(sub) -> None:
    c = sub.add_parser(
        "convert",
        help="convert a model into an HF folder, or into a .gguf file for llama.cpp",
        description="Write SRC as a Hugging Face folder, or, when DST ends in .gguf, as one GGUF file "
        "(weights and tokenizer) that llama.cpp, Ollama and LM Studio run.",
    )
    c.add_argument("src", help="HF folder, run's final/ or step-N, .gguf file, hub name or 'smollm2'")
    c.add_argument("dst", type=Path, help="output folder, or a file name ending in .gguf")
    c.add_argument("--tokenizer", default=None, help="tokenizer to write too (default: the model's own)")
    c.add_argument(
        "--dtype",
        default=None,
        help="folder: float32 (default), bfloat16, float16; .gguf: f32, f16 (default), bf16, q8_0, q4_0|1",
    )
    c.add_argument("--overwrite", action="store_true", help="replace a file or a folder that is not empty")


def add_prepare(sub) -> None:
    p = sub.add_parser(
        "prepare",
        help="tokenize a source once into shards that training reads (data.source=OUT_DIR)",
        description="Tokenize SOURCE (anything data.source accepts) into shards of token ids in OUT_DIR; "
        "an interrupted prepare resumes when run again.",
    )
    p.add_argument("source", help="hf:NAME[:CONFIG], a file, folder or glob, or builtin:python-docs")
    p.add_argument("out_dir", type=Path, help="output folder (new, empty, or an interrupted prepare)")
    p.add_argument("--tokenizer", default="smollm2", help="a tokenizer spec, as the config's tokenizer key")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    p.add_argument(  # --eval-every: its name before data.eval_every became data.holdout_every
        "--holdout-every", "--eval-every", type=int, default=200, help="hold out 1 in K documents (0: none)"
    )
    p.add_argument("--text-column", default="text")
    p.add_argument("--txt-documents", choices=["file", "paragraph"], default="file")
    p.add_argument(
        "--format",
        choices=["text", "chat"],
        default="text",
        help="chat: conversations (messages, or prompt/completion) in the tokenizer's chat template, "
        "with the mask of the assistant's tokens (train with data.format=chat)",
    )
    p.add_argument("--shard-documents", type=int, default=10_000, help="source documents per shard")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already in OUT_DIR")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_tokenizer(sub) -> None:
    tok = sub.add_parser("tokenizer", help="tokenizer tools: train one on your corpus")
    tok_sub = tok.add_subparsers(dest="tokenizer_command", required=True)
    tt = tok_sub.add_parser(
        "train",
        help="train a byte-level BPE tokenizer (SmolLM2's kind) on a source",
        description="Learn a byte-level BPE tokenizer from SOURCE's training documents (the held-out ones "
        "excluded, as data.holdout_every splits them) with the tokenizers library, into OUT_DIR.",
    )
    tt.add_argument("source", help="hf:NAME[:CONFIG], a file, folder or glob, or builtin:python-docs")
    tt.add_argument("out_dir", type=Path, help="output folder (tokenizer.json and its config)")
    tt.add_argument("--vocab-size", type=int, required=True, help="tokens, special tokens included")
    tt.add_argument("--min-frequency", type=int, default=2, help="a merge needs a pair seen this often")
    tt.add_argument("--chat-template", action="store_true", help="add SmolLM2's ChatML chat template")
    tt.add_argument(
        "--holdout-every",
        "--eval-every",
        type=int,
        default=200,
        help="leave out the 1-in-K held-out documents",
    )
    tt.add_argument("--text-column", default="text")
    tt.add_argument("--txt-documents", choices=["file", "paragraph"], default="file")
    tt.add_argument("--overwrite", action="store_true", help="replace a folder that is not empty")


def add_eval(sub) -> None:
    e = sub.add_parser(
        "eval",
        help="benchmark scores through lm-evaluation-harness (hellaswag, arc_easy, ..., or smollm2)",
        description="Score a model on lm-eval tasks: a table, and lm-eval's results JSON with --output.",
    )
    e.add_argument("--model", default="smollm2", help="HF folder, run's final/ or step-N, .gguf, hub name")
    e.add_argument(
        "--tasks", required=True, help="comma-separated lm-eval task names, or smollm2 (its suite)"
    )
    e.add_argument("--include-path", default=None, help="a folder of your own lm-eval task YAMLs")
    e.add_argument("--limit", type=_limit, default=None, help="items per task (or a fraction below 1)")
    e.add_argument("--num-fewshot", type=int, default=None)
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--output", type=Path, default=None, help="write lm-eval's results JSON here")
    e.add_argument("--log-samples", action="store_true", help="keep each item's scores in the JSON")
    e.add_argument(
        "--apply-chat-template",
        action="store_true",
        help="prompts in the chat template (few-shot examples as turns), as chat models are scored",
    )
    e.add_argument("--system-instruction", default=None, help="a system message before each prompt (chat)")
    e.add_argument("--tokenizer", default=None, help="default: the model's own, else smollm2")
    e.add_argument("--dtype", default="auto", help="auto: bf16 on CUDA (fp16 without it), else float32")
    e.add_argument("--device", default="auto")
    add_quantize_flag(e)


def add_train(sub) -> None:
    t = sub.add_parser(
        "train",
        help="train a model (see configs/)",
        description="Train from a YAML config; dotted overrides like optim.lr=3e-4 follow the flags.",
    )
    t.add_argument("--config", default=None, help="YAML file (configs/quickstart.yaml, ...)")
    t.add_argument(
        "--phase",
        choices=["init", "resume", "cooldown"],
        default="init",
        help="cooldown: branch a linear decay to 0 off a wsd run's --checkpoint, for --steps steps",
    )
    t.add_argument("--steps", type=int, default=None, help="cooldown: the decay's length in steps")
    t.add_argument("--checkpoint", default=None, help="resume from: step-N folder, run folder, or .../latest")
    for flag, (key, kind, help_text) in CONFIG_FLAGS.items():
        t.add_argument(flag, type=kind, default=None, help=f"{help_text} (sets {key})")
    t.add_argument(
        "--stop-at-step", type=int, default=None, help="checkpoint at K and stop (schedule unchanged)"
    )
    t.add_argument("--overwrite", action="store_true", help="replace a run already in the output folder")
    t.add_argument(
        "--allow-config-changes",
        action="store_true",
        help="resume with batch, schedule, precision or data keys that differ from the checkpoint's",
    )
    t.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.micro_batch_size=8")


def add_env(sub) -> None:
    env = sub.add_parser(
        "env",
        help="what this machine can do, what auto picks, and the memory a run needs (paste into bug reports)",
        description="Versions, devices, the CPU's extensions and measured matmul speeds, the precision and "
        "kernels `auto` picks, installed extras, and the training memory of a preset at a micro-batch "
        "and context.",
    )
    env.add_argument("--preset", default="smollm2-135m", help="model preset for the memory estimate")
    env.add_argument("--micro-batch", type=int, default=4, help="sequences per forward pass")
    env.add_argument("--context", type=int, default=256, help="tokens per sequence")
    env.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    env.add_argument("--lora-rank", type=int, default=0, help="the estimate for LoRA adapters of this rank")
    env.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    env.add_argument("--json", action="store_true", help="one JSON object, for scripts")


def add_serve(sub) -> None:
    s = sub.add_parser("serve", help="serve a model in a Gradio web app")
    s.add_argument("--model", default="smollm2", help="HF folder, run's final/ or step-N, .gguf, hub name")
    s.add_argument("--tokenizer", default=None, help="default: the model's own, else smollm2")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=7860)
    s.add_argument("--device", default="auto")
    s.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    add_quantize_flag(s)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smoltrain",
        description="Prepare data, train, evaluate, generate, convert and serve models.",
        epilog="--debug (anywhere): show the traceback of an error",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (
        add_generate,
        add_chat,
        add_convert,
        add_prepare,
        add_tokenizer,
        add_eval,
        add_train,
        add_env,
        add_serve,
    ):
        add(sub)
    return parser
