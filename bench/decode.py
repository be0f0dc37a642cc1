"""Decoding on CPU, side by side on the same weights: smoltrain, llama.cpp (llama-cpp-python) and
transformers, per precision: f32; bf16 where this CPU has native bf16; smoltrain's int8 against
llama.cpp's q8_0; smoltrain's int4 against q4_0 and q4_1. At batch 1 and 8, after prompts of 32
and 512 tokens: tokens/s after the first token, and the first token's latency (the prompt's
forward). Every contender runs in a process of its own with this machine's cores as threads.

The weights are the bundled SmolLM2-135M-Instruct's (its Q4_1 file, dequantized): ours and
transformers load them as an HF folder; llama.cpp runs our GGUF export of them at f32, bf16,
q8_0 and q4_0, and the bundled Q4_1 file itself. Quality, beside the speed: how many of 32
greedy tokens each quantized contender shares with our f32 model on four prompts, with the gap
between f32's two best logits where they part (a near-tie that any rounding of the weights may
flip, or a real difference), and our held-out perplexity per precision.

    python -m bench.decode                 # the table (~10 min on 2 cores)
    python -m bench.decode --quick         # batch 1, prompt 32, 64 tokens: a smoke run
    python -m bench.decode --worker ours --precision int4 --batch 1 --prompt-tokens 32
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROMPTS = [
    "Gravity is the force that",
    "def fibonacci(n):",
    "Once upon a time, there was a little girl named",
    "The capital of France is Paris. The capital of Germany is",
]
# ours -> llama.cpp's file type at the same precision
LLAMA_TYPES = {"f32": ["f32"], "bf16": ["bf16"], "int8": ["q8_0"], "int4": ["q4_0", "q4_1"]}


def threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def prompt_ids(tokens: int) -> list[int]:
    """`tokens` ids of English text (the docs' prose, repeated as needed)."""
    from smoltrain.tokenizer import load_tokenizer

    text = " ".join(PROMPTS) + " " + (HERE.parent / "README.md").read_text()
    ids = load_tokenizer("smollm2")(text)["input_ids"]
    return (ids * (tokens // len(ids) + 1))[:tokens]


def timed_decode(run, new_tokens: int, repeats: int) -> dict:
    """First-token latency and tokens/s after it, best of `repeats` (the first run warms up)."""
    run(2)
    first, total = float("inf"), float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run(1)
        first = min(first, time.perf_counter() - start)
        start = time.perf_counter()
        run(new_tokens)
        total = min(total, time.perf_counter() - start)
    return {"first_token_s": first, "decode_s": max(total - first, 1e-9)}


# ------------------------------------------------------------------------------ workers


def work_ours(args) -> dict:
    import torch

    from smoltrain.formats.model_io import load_model
    from smoltrain.generate import generate, prepare_for_generation

    torch.set_num_threads(threads())
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    model = load_model(args.folder, dtype=dtype)
    quantize = args.precision if args.precision in ("int8", "int4") else None
    model = prepare_for_generation(model, compile=args.compile, quantize=quantize)
    ids = torch.tensor([prompt_ids(args.prompt_tokens)] * args.batch)
    with torch.inference_mode():
        timing = timed_decode(
            lambda n: generate(model, ids, max_new_tokens=n, eos_token_id=[]), args.new_tokens, args.repeats
        )
        greedy = [greedy_of(model, p, generate) for p in PROMPTS] if args.quality else None
        gaps = None
        if greedy:
            gaps = [top2_gaps(model, p, tokens) for p, tokens in zip(PROMPTS, greedy, strict=True)]
        perplexity = held_out_perplexity(model) if args.quality else None
    return {
        **timing,
        "greedy": greedy,
        "top2_gaps": gaps,
        "perplexity": perplexity,
        "linears": type(model.lm_head).__name__,
    }


def prompt_tensor(prompt: str):
    import torch

    from smoltrain.tokenizer import load_tokenizer

    return torch.tensor([load_tokenizer("smollm2")(prompt)["input_ids"]])


def greedy_of(model, prompt: str, generate) -> list[int]:
    ids = prompt_tensor(prompt)
    return generate(model, ids, max_new_tokens=32, eos_token_id=[])[0, ids.shape[1] :].tolist()


def top2_gaps(model, prompt: str, tokens: list[int]) -> list[float]:
    """At each greedy token, its logit minus the runner-up's: how far the choice is from a tie."""
    import torch

    ids = prompt_tensor(prompt)
    sequence = torch.cat([ids, torch.tensor([tokens])], dim=1)
    logits = model(sequence).logits[0, ids.shape[1] - 1 : -1].float()
    best_two = logits.topk(2, dim=-1).values
    return (best_two[:, 0] - best_two[:, 1]).tolist()


def held_out_perplexity(model, windows: int = 4, length: int = 256) -> float:
    """exp(mean next-token loss) over `windows` windows of the standard library's docstrings."""
    import torch
    import torch.nn.functional as F

    from smoltrain.data.sources import open_source
    from smoltrain.tokenizer import load_tokenizer

    tokenizer = load_tokenizer("smollm2")
    ids: list[int] = []
    for document in open_source("builtin:python-docs"):
        ids += tokenizer(document["text"])["input_ids"]
        if len(ids) > windows * length:
            break
    batch = torch.tensor(ids[: windows * length]).view(windows, length)
    logits = model(batch).logits.float()
    return float(torch.exp(F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())))


def work_hf(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads())
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.folder, dtype=dtype).eval()
    model.generation_config.eos_token_id = None
    ids = torch.tensor([prompt_ids(args.prompt_tokens)] * args.batch)
    with torch.inference_mode():
        return timed_decode(
            lambda n: model.generate(
                ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=2
            ),
            args.new_tokens,
            args.repeats,
        )


def work_llama(args) -> dict:
    """llama.cpp through llama-cpp-python: its `Llama` at batch 1; at batch B, a context of B
    sequences fed through llama.cpp's own batch API (one decode call per step for all rows)."""
    import numpy as np
    from llama_cpp import Llama

    if not args.extra_buffers:  # llama.cpp's AMX layouts crash on some CPUs
        from tests.llama_cpp_run import without_extra_buffers

        without_extra_buffers()
    llm = Llama(model_path=args.gguf, n_ctx=1024, n_batch=512, n_threads=threads(), verbose=False)
    ids = prompt_ids(args.prompt_tokens)
    if args.batch > 1:
        return timed_decode(llama_batch_runner(llm, ids, args.batch), args.new_tokens, args.repeats)

    def next_token() -> int:  # the last token's logits (llm.scores holds them only with logits_all)
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))))

    def run(n: int) -> None:
        llm.reset()
        llm.eval(ids)
        for _ in range(n - 1):
            llm.eval([next_token()])

    timing = timed_decode(run, args.new_tokens, args.repeats)
    greedy = None
    if args.quality:
        greedy = []
        for prompt in PROMPTS:
            llm.reset()
            llm.eval(llm.tokenize(prompt.encode(), add_bos=False, special=True))
            tokens = []
            for _ in range(32):
                tokens.append(next_token())
                llm.eval([tokens[-1]])
            greedy.append(tokens)
    return {**timing, "greedy": greedy}


def llama_batch_runner(llm, ids: list[int], rows: int):
    """run(n): `rows` copies of the prompt, each its own sequence, then n - 1 greedy steps of
    one token per row, each step one llama_decode."""
    import llama_cpp.llama_cpp as lib
    import numpy as np

    params = lib.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch = 1024 * rows, 512, 512
    params.n_seq_max, params.n_threads, params.n_threads_batch = rows, threads(), threads()
    ctx = lib.llama_init_from_model(llm._model.model, params)
    batch = lib.llama_batch_init(512, 0, rows)
    vocab = llm.n_vocab()

    def decode(tokens: list[int], positions: list[int], sequences: list[int]) -> None:
        batch.n_tokens = len(tokens)
        for i, (token, position, sequence) in enumerate(zip(tokens, positions, sequences, strict=True)):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, position, 1
            batch.seq_id[i][0], batch.logits[i] = sequence, i == len(tokens) - 1 or len(tokens) == rows
        if lib.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    def next_token(i: int) -> int:
        return int(np.argmax(np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, i), shape=(vocab,))))

    def run(n: int) -> None:
        lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
        tokens = []
        for row in range(rows):  # each prompt on its own (a batch holds 512 tokens)
            decode(ids, list(range(len(ids))), [row] * len(ids))
            tokens.append(next_token(-1))
        for step in range(n - 1):
            decode(tokens, [len(ids) + step] * rows, list(range(rows)))
            tokens = [next_token(i) for i in range(rows)]

    return run


# ------------------------------------------------------------------------------ the table


def run_worker(*args: str) -> dict | None:
    cmd = [sys.executable, "-m", "bench.decode", "--worker", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE.parent, timeout=1800)
    if result.returncode != 0:
        print(f"  ({' '.join(args[:3])} failed, exit {result.returncode}: {result.stderr[-300:].strip()})")
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def prepare_files(folder: Path) -> tuple[Path, dict[str, Path]]:
    """The HF folder of the bundled weights and a GGUF of them per llama.cpp type."""
    from smoltrain.formats.gguf import write_gguf
    from smoltrain.formats.model_io import _gguf_as_hf_folder, bundled_gguf_path, load_model
    from smoltrain.tokenizer import load_tokenizer

    hf = _gguf_as_hf_folder(bundled_gguf_path())
    model, tokenizer = load_model(hf), load_tokenizer("smollm2")
    files = {"q4_1": bundled_gguf_path()}
    for kind in ("f32", "bf16", "q8_0", "q4_0"):
        files[kind] = folder / f"smollm2-{kind}.gguf"
        write_gguf(model, files[kind], tokenizer, kind)
    return hf, files


def agreement(
    tokens: list[list[int]] | None, reference: list[list[int]] | None, gaps: list[list[float]] | None = None
) -> str:
    """Leading tokens shared with the reference, per prompt ("17/32/2/15"), and where given the
    reference's top-2 logit gap at each parting ("; f32 gap there 0.090/-/0.089/0.004")."""
    if not tokens or not reference:
        return ""
    lead = [
        next((i for i, (a, b) in enumerate(zip(x, y, strict=True)) if a != b), len(x))
        for x, y in zip(tokens, reference, strict=True)
    ]
    text = "/".join(str(n) for n in lead)
    if gaps and any(n < len(x) for n, x in zip(lead, reference, strict=True)):
        at_parting = [f"{g[n]:.3f}" if n < len(g) else "-" for n, g in zip(lead, gaps, strict=True)]
        text += "; f32 gap there " + "/".join(at_parting)
    return text


def main() -> None:
    from bench.__main__ import describe_cpu
    from smoltrain.device import choose_precision

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worker", choices=["ours", "hf", "llama"])
    parser.add_argument("--precision", default="f32")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--quality", action="store_true")
    parser.add_argument("--extra-buffers", action="store_true")
    parser.add_argument("--folder")
    parser.add_argument("--gguf")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.worker:
        work = {"ours": work_ours, "hf": work_hf, "llama": work_llama}[args.worker]
        print(json.dumps(work(args)))
        return

    print(describe_cpu(), f"; {threads()} threads each", flush=True)
    precisions = ["f32", "int8", "int4"]
    if choose_precision("auto", "cpu").precision == "bf16":  # bf16 matmuls fast here
        precisions.insert(1, "bf16")
    shapes = [(1, 32)] if args.quick else [(1, 32), (1, 512), (8, 32), (8, 512)]
    new = "64" if args.quick else str(args.new_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        hf, files = prepare_files(Path(tmp))
        rows, reference, gaps = [], None, None
        for precision in precisions:
            for batch, prompt in shapes:
                common = ["--precision", precision, "--batch", str(batch), "--prompt-tokens", str(prompt)]
                common += ["--new-tokens", new, "--folder", str(hf)]
                quality = ["--quality"] if (batch, prompt) == (1, 32) else []
                contenders = {"smoltrain": ["ours", *common, *quality]}
                contenders["smoltrain compiled"] = ["ours", *common, "--compile"]
                if precision in ("f32", "bf16"):
                    contenders["transformers"] = ["hf", *common]
                for kind in LLAMA_TYPES[precision]:
                    llama = ["llama", *common, *quality, "--gguf", str(files[kind])]
                    contenders[f"llama.cpp {kind}"] = llama
                for name, worker_args in contenders.items():
                    if name.startswith("llama"):  # its repacked (AMX, AVX2) layouts first, as it ships
                        result = run_worker(*worker_args, "--extra-buffers") or run_worker(*worker_args)
                    else:
                        result = run_worker(*worker_args)
                    if result is None:
                        continue
                    if precision == "f32" and name == "smoltrain" and result.get("greedy"):
                        reference, gaps = result["greedy"], result["top2_gaps"]
                    tok_s = batch * (int(new) - 1) / result["decode_s"]
                    row = {
                        "precision": precision,
                        "batch": batch,
                        "prompt": prompt,
                        "contender": name,
                        "tok_s": tok_s,
                        "first_ms": result["first_token_s"] * 1e3,
                        "agree": agreement(result.get("greedy"), reference, gaps),
                        "perplexity": result.get("perplexity"),
                    }
                    rows.append(row)
                    print(
                        f"{precision} b{batch} p{prompt} {name}: {tok_s:.1f} tok/s, first token "
                        f"{row['first_ms']:.0f} ms"
                        + (f", greedy agreement {row['agree']}" if row["agree"] else "")
                        + (f", perplexity {row['perplexity']:.3f}" if row["perplexity"] else ""),
                        flush=True,
                    )
    print()
    agree = "greedy agree (of 32; f32's top-2 logit gap where they part)"
    print(f"| precision | batch | prompt | contender | tok/s | first token ms | {agree} | ppl |")
    print("| --- | ---: | ---: | --- | ---: | ---: | --- | ---: |")
    for r in rows:
        ppl = f"{r['perplexity']:.3f}" if r["perplexity"] else ""
        print(
            f"| {r['precision']} | {r['batch']} | {r['prompt']} | {r['contender']} | {r['tok_s']:.1f} "
            f"| {r['first_ms']:.0f} | {r['agree']} | {ppl} |"
        )


if __name__ == "__main__":
    main()
