"""The `smoltrain` command: prepare data, train, evaluate, generate, convert and serve models."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import time
from pathlib import Path

from smoltrain.cli_args import build_parser, config_flags

DTYPES = {  # the spellings in use: torch's, the short ones, GGUF's
    "float32": "float32",
    "fp32": "float32",
    "f32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "f16": "float16",
    "half": "float16",
}


def _dtype(name: str, device: str):
    import torch

    from smoltrain.device import inference_dtype

    if name == "auto":
        return inference_dtype(device)
    if name not in DTYPES:
        raise SystemExit(f"error: unknown dtype '{name}'; choose auto or one of {sorted(DTYPES)}")
    return getattr(torch, DTYPES[name])


def check_generate_args(args: argparse.Namespace) -> None:
    """Refuse what cannot mean anything before the model loads; warn about sampling settings
    that greedy decoding ignores."""
    if not args.prompt.strip():
        raise ValueError("--prompt is empty; give the text to continue (or, with --chat, a question)")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.temperature <= 0:
        raise ValueError(
            f"--temperature must be above 0, got {args.temperature}; leave out --do-sample to decode greedily"
        )
    changed = {"--temperature": args.temperature != 1.0, "--top-k": args.top_k is not None}
    changed["--top-p"] = args.top_p is not None
    ignored = [flag for flag, is_set in changed.items() if is_set]
    if ignored and not args.do_sample:
        print(f"warning: {', '.join(ignored)} only act with --do-sample; decoding greedily", file=sys.stderr)


def cmd_generate(args: argparse.Namespace) -> None:
    from smoltrain.device import pick_device
    from smoltrain.formats.model_io import load_model
    from smoltrain.generate import prepare_for_generation, stream_text
    from smoltrain.tokenizer import check_tokenizer_fits, encode_prompt, stop_token_ids, tokenizer_for

    check_generate_args(args)
    device = pick_device(args.device)
    model = load_model(args.model, dtype=_dtype(args.dtype, device), device=device)
    model = prepare_for_generation(model, compile=args.compile, quantize=args.quantize)
    tokenizer = tokenizer_for(args.model, args.tokenizer)
    check_tokenizer_fits(model.config.vocab_size, tokenizer)
    ids = encode_prompt(tokenizer, args.prompt, chat=args.chat)
    context, prompt_tokens = model.config.max_position_embeddings, ids.shape[-1]
    if prompt_tokens >= context:  # said before the prompt is echoed
        raise ValueError(
            f"the prompt has {prompt_tokens:,} tokens but the model's context is {context:,}; "
            "shorten the prompt"
        )
    if prompt_tokens + args.max_new_tokens > context:
        print(
            f"note: --max-new-tokens {args.max_new_tokens:,} runs past the model's context of {context:,} "
            f"tokens: at most {context - prompt_tokens:,} follow this {prompt_tokens:,}-token prompt",
            file=sys.stderr,
        )
    if not args.chat:
        print(args.prompt, end="", flush=True)
    eos = stop_token_ids(model.config.eos_token_id, tokenizer, chat=args.chat)
    start, count = time.perf_counter(), 0
    for piece in stream_text(
        model,
        tokenizer,
        ids,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        eos_token_id=eos,
        seed=args.seed,
    ):
        count += 1
        print(piece, end="", flush=True)
    elapsed = time.perf_counter() - start
    print(f"\n[{count} pieces in {elapsed:.1f}s on {device}]", file=sys.stderr)


def cmd_chat(args: argparse.Namespace) -> None:
    """A conversation in the terminal: the history is the context of each reply (its oldest
    exchanges dropped, with a note, once it outgrows the model's context)."""
    from smoltrain.device import pick_device
    from smoltrain.formats.model_io import load_model
    from smoltrain.generate import prepare_for_generation, stream_text
    from smoltrain.tokenizer import (
        check_tokenizer_fits,
        fit_conversation,
        prompt_budget,
        stop_token_ids,
        tokenizer_for,
    )

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    device = pick_device(args.device)
    model = load_model(args.model, dtype=_dtype(args.dtype, device), device=device)
    model = prepare_for_generation(model, quantize=args.quantize)
    tokenizer = tokenizer_for(args.model, args.tokenizer)
    check_tokenizer_fits(model.config.vocab_size, tokenizer)
    stops = stop_token_ids(model.config.eos_token_id, tokenizer, chat=True)
    context = model.config.max_position_embeddings
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = []
    interactive = sys.stdin.isatty()
    print(f"chatting with {args.model} on {device}; /undo, /clear, /exit", file=sys.stderr)
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        text = line.strip()
        if text in ("/exit", "/quit"):
            break
        if text in ("/clear", "/undo") or not text:
            if text == "/clear":
                history.clear()
            elif text == "/undo":
                del history[-2:]
            print(f"[{len(history) // 2} exchange(s) kept]" if text else "", file=sys.stderr)
            continue
        history.append({"role": "user", "content": text})
        try:
            ids, dropped = fit_conversation(
                tokenizer, system + history, prompt_budget(context, args.max_new_tokens)
            )
        except ValueError as e:
            history.pop()
            print(f"error: {e}", file=sys.stderr)
            continue
        if dropped:
            print(
                f"[the {dropped} oldest message(s) no longer fit the context; the reply does not see them]",
                file=sys.stderr,
            )
        if not interactive:
            print(f"you> {text}")
        print("assistant> ", end="", flush=True)
        pieces = stream_text(
            model,
            tokenizer,
            ids.to(device),
            max_new_tokens=min(args.max_new_tokens, context - ids.shape[-1]),
            do_sample=args.temperature > 0,
            temperature=args.temperature if args.temperature > 0 else 1.0,
            top_k=args.top_k if args.temperature > 0 else None,
            top_p=args.top_p if args.temperature > 0 else None,
            repetition_penalty=args.repetition_penalty,
            eos_token_id=stops,
            seed=args.seed,
        )
        reply = ""
        for piece in pieces:
            reply += piece
            print(piece, end="", flush=True)
        print()
        history.append({"role": "assistant", "content": reply.strip()})


def check_output_folder(folder: Path, overwrite: bool, what: str) -> None:
    """A folder a command writes whole: refused when it is a file, or holds files and
    `overwrite` is off, or holds files smoltrain did not write (the command replaces the
    folder only once the new one is complete)."""
    from smoltrain.atomic import HF_FOLDER_FILES, refuse_foreign_files

    if folder.exists() and not folder.is_dir():
        raise ValueError(f"'{folder}' is a file; this writes a folder: give a folder path")
    if folder.is_dir() and any(folder.iterdir()):
        if not overwrite:
            raise ValueError(
                f"folder '{folder}' is not empty; pass --overwrite to replace it, or another folder"
            )
        refuse_foreign_files(folder, HF_FOLDER_FILES, what)


def cmd_convert(args: argparse.Namespace) -> None:
    from smoltrain.atomic import staged_folder
    from smoltrain.formats.model_io import load_model, save_model
    from smoltrain.tokenizer import load_tokenizer, own_tokenizer_source

    dst = Path(args.dst)
    if dst.suffix == ".gguf":
        return convert_to_gguf(args)
    check_output_folder(dst, args.overwrite, "a model folder")
    dtype = args.dtype or "float32"
    model = load_model(args.src, dtype=_dtype(dtype, "cpu"))
    tokenizer_source = args.tokenizer or own_tokenizer_source(args.src)
    tokenizer = load_tokenizer(tokenizer_source) if tokenizer_source else None
    # written beside and renamed over: never old and new files mixed, never half a folder
    with staged_folder(dst) as tmp:
        save_model(model, tmp, tokenizer=tokenizer)
    print(
        f"wrote {args.dst}: {model.num_parameters():,} parameters, {dtype}"
        f"{', with tokenizer' if tokenizer else ', no tokenizer (pass --tokenizer)'}"
    )


def convert_to_gguf(args: argparse.Namespace) -> None:
    """SRC -> one .gguf file (model and tokenizer) that llama.cpp runs."""
    from smoltrain.formats.gguf import gguf_dtype, write_gguf
    from smoltrain.formats.model_io import load_model
    from smoltrain.tokenizer import load_tokenizer, own_tokenizer_source

    dst = Path(args.dst)
    dtype = gguf_dtype(args.dtype or "f16")  # llama.cpp's own default
    if dst.is_dir():
        raise ValueError(f"'{dst}' is a folder; give the path of the .gguf file to write")
    if dst.exists() and not args.overwrite:
        raise ValueError(f"'{dst}' exists; pass --overwrite to replace it, or another file name")
    tokenizer_source = args.tokenizer or own_tokenizer_source(args.src)
    if tokenizer_source is None:
        raise ValueError(
            f"'{args.src}' has no tokenizer, and llama.cpp needs one inside the GGUF; pass "
            "--tokenizer (the one the model was trained with: smollm2, a folder or a .gguf)"
        )
    model = load_model(args.src)
    write_gguf(model, dst, load_tokenizer(tokenizer_source), dtype, name=_model_name(args.src))
    size = dst.stat().st_size / 2**20
    print(f"wrote {dst}: {model.num_parameters():,} parameters, {dtype}, {size:,.1f} MiB")


def _model_name(spec: str) -> str:
    """A readable general.name: the run's folder for its final/ or step-N, else the last part."""
    path = Path(spec)
    if path.name == "final" or path.name.startswith("step-"):
        return path.parent.name if path.name == "final" else f"{path.parent.parent.name}-{path.name}"
    return path.stem or str(spec)


def cmd_train(args: argparse.Namespace) -> None:
    from smoltrain.train.loop import train
    from smoltrain.train.overrides import config_for_cli

    flags = config_flags(args)
    cfg = config_for_cli(
        args.config, args.overrides, args.phase, args.checkpoint, flags, args.allow_config_changes, args.steps
    )
    train(
        cfg,
        phase=args.phase,
        checkpoint=args.checkpoint,
        stop_at_step=args.stop_at_step,
        overwrite=args.overwrite,
    )


def cmd_prepare(args: argparse.Namespace) -> None:
    from smoltrain.data.shards import PrepareJob, prepare

    job = PrepareJob(
        source=args.source,
        out_dir=str(args.out_dir),
        tokenizer=args.tokenizer,
        workers=args.workers,
        eval_every=args.holdout_every,  # the manifest's name for it
        text_column=args.text_column,
        txt_documents=args.txt_documents,
        data_format=args.format,
        shard_documents=args.shard_documents,
    )
    m = prepare(job, overwrite=args.overwrite, progress=not args.no_progress)
    print(
        f"prepared {m['documents']:,} training documents ({m['tokens']:,} tokens) and "
        f"{m['eval_documents']:,} held-out ({m['eval_tokens']:,} tokens) in {len(m['shards'])} shard(s), "
        f"{m['dtype']}, at {m['tokens_per_second'] or 0:,} tokens/s -> {args.out_dir}; "
        f"train with data.source={args.out_dir}"
    )
    if m.get("empty_documents"):
        what = (
            "conversations with no assistant turn" if args.format == "chat" else "empty documents (no text)"
        )
        print(f"note: left out {m['empty_documents']:,} {what}: nothing to train on")


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from smoltrain.atomic import staged_folder
    from smoltrain.data.sources import training_documents
    from smoltrain.tokenizer import train_tokenizer

    out = Path(args.out_dir)
    check_output_folder(out, args.overwrite, "a tokenizer folder")
    if args.holdout_every == 1:
        raise ValueError("--holdout-every 1 would hold out every document; use 0 (none held out) or 2 and up")
    start = time.perf_counter()
    documents = training_documents(args.source, args.holdout_every, args.text_column, args.txt_documents)
    tokenizer = train_tokenizer(documents, args.vocab_size, args.min_frequency, args.chat_template)
    with staged_folder(out) as tmp:  # a whole tokenizer folder or none
        tokenizer.save_pretrained(tmp)
    print(
        f"trained a {len(tokenizer):,}-token byte-level BPE tokenizer in {time.perf_counter() - start:.0f}s "
        f"-> {out}; use it with tokenizer: {out} in a config (the model's vocabulary follows it)"
    )
    if len(tokenizer) < args.vocab_size:  # BPE stops when no pair is left to merge
        print(
            f"note: asked for {args.vocab_size:,} tokens, the corpus gave {len(tokenizer):,}: it holds no "
            "more pairs worth merging (give it more text for a larger vocabulary)",
            file=sys.stderr,
        )


def cmd_eval(args: argparse.Namespace) -> None:
    from smoltrain.device import pick_device
    from smoltrain.evaluation.benchmarks import SmolLM, check_tasks, evaluate_tasks, write_results
    from smoltrain.formats.model_io import load_model
    from smoltrain.generate import prepare_for_generation
    from smoltrain.tokenizer import check_tokenizer_fits, tokenizer_for

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    check_tasks(tasks, args.include_path)  # a typo fails before the model loads
    from lm_eval.utils import make_table

    device = pick_device(args.device)
    model = load_model(args.model, dtype=_dtype(args.dtype, device), device=device)
    model = prepare_for_generation(model, quantize=args.quantize)
    tokenizer = tokenizer_for(args.model, args.tokenizer)
    check_tokenizer_fits(model.config.vocab_size, tokenizer)
    lm = SmolLM(model, tokenizer, batch_size=args.batch_size)
    start = time.perf_counter()
    results = evaluate_tasks(
        lm,
        tasks,
        args.include_path,
        args.limit,
        args.num_fewshot,
        log_samples=args.log_samples,
        apply_chat_template=args.apply_chat_template,
        system_instruction=args.system_instruction,
    )
    print(make_table(results))
    print(f"[{time.perf_counter() - start:.1f}s on {device}]", file=sys.stderr)
    if args.output:
        write_results(results, args.output)


def check_port_free(host: str, port: int) -> None:
    """A busy port, said before the model loads (gradio said it 15 s later, with advice for
    its Python API)."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError as e:
            raise ValueError(
                f"port {port} on {host} is not free ({e.strerror}); pass another with --port, or stop "
                "what holds it"
            ) from None


def cmd_serve(args: argparse.Namespace) -> None:
    from smoltrain.app import build_app
    from smoltrain.device import pick_device

    check_port_free(args.host, args.port)
    demo = build_app(
        args.model,
        args.tokenizer,
        device=pick_device(args.device),
        compile=args.compile,
        quantize=args.quantize,
    )
    demo.launch(server_name=args.host, server_port=args.port, show_error=True)


def cmd_env(args: argparse.Namespace) -> None:
    import json

    from smoltrain.device import pick_device
    from smoltrain.train.machine import format_report, machine_report

    if args.micro_batch < 1 or args.context < 1 or args.lora_rank < 0:
        raise ValueError("--micro-batch and --context must be at least 1, --lora-rank at least 0")
    report = machine_report(
        pick_device(args.device), args.preset, args.micro_batch, args.context, args.precision, args.lora_rank
    )
    print(json.dumps(report, indent=1) if args.json else format_report(report))


def _trains_on_cpu_with_tuning(args: argparse.Namespace) -> bool:
    """Whether this `train` command runs on CPU with train.tune_malloc on, judged before
    torch is imported (the relaunch that turns glibc's tcache off must come first, and a
    second import of torch would cost seconds): from the flags, the dotted overrides and
    the YAML file; `auto` is CPU unless the machine shows a GPU driver. A wrong guess only
    changes the allocator setting, which the start-up summary reports."""
    import yaml

    try:
        file = yaml.safe_load(Path(args.config).read_text()) if args.config else {}
    except (OSError, yaml.YAMLError):
        file = {}  # the config loader reports it properly later
    section = file.get("train") if isinstance(file, dict) else None
    settings = {f"train.{k}": str(v) for k, v in (section if isinstance(section, dict) else {}).items()}
    settings.update(o.split("=", 1) for o in args.overrides if "=" in o)
    if settings.get("train.tune_malloc", "true").lower() in ("false", "0", "no", "off"):
        return False
    device = args.device or settings.get("train.device", "auto")
    gpu_driver = any(Path(p).exists() for p in ("/proc/driver/nvidia/version", "/dev/kfd"))
    return device == "cpu" or (device == "auto" and not gpu_driver)


COMMANDS = {  # the sub-command (and the tokenizer's own) -> what runs it
    "generate": cmd_generate,
    "chat": cmd_chat,
    "convert": cmd_convert,
    "prepare": cmd_prepare,
    "tokenizer train": cmd_tokenizer_train,
    "eval": cmd_eval,
    "train": cmd_train,
    "env": cmd_env,
    "serve": cmd_serve,
}


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    # --debug, anywhere on the line: show the traceback of a known error too
    given = sys.argv[1:] if argv is None else argv
    debug = "--debug" in given
    # Dotted overrides may sit between flags, which argparse's positionals do not allow.
    args, extra = parser.parse_known_args([a for a in given if a != "--debug"])
    unknown = [e for e in extra if e.startswith("-") or args.command != "train"]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "train":
        args.overrides = [*args.overrides, *extra]
        if argv is None and _trains_on_cpu_with_tuning(args):  # a real command line, not a call from Python
            from smoltrain.perf import relaunch_with_lean_malloc

            relaunch_with_lean_malloc()  # needs a fresh process: glibc reads it at start-up
    from smoltrain.atomic import check_cache_dir
    from smoltrain.errors import UserError

    try:
        check_cache_dir()
        name = f"tokenizer {args.tokenizer_command}" if args.command == "tokenizer" else args.command
        COMMANDS[name](args)
    except (ValueError, OSError, UserError) as e:
        # Errors at the edges carry a message that names the fix; a traceback adds nothing.
        if debug:
            raise
        raise SystemExit(f"error: {e} (--debug shows where)") from None
    if argv is None:  # a real command line that finished: its process ends here
        # The interpreter's teardown runs cyclic collections over every object that torch,
        # transformers and datasets made (0.8 s, a sixth of a short command); frozen, they are
        # left to the exit. The command closed its files and ended its trackers. (Not after an
        # error: what it left open is then collected, and flushed, as usual.)
        gc.freeze()
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            exit_without_teardown()


def exit_without_teardown() -> None:
    """Leave a finished rank of a multi-process run at once. Its files are written, its lock
    released and the process group destroyed, but gloo's threads can still abort the
    interpreter's own teardown (SIGABRT, "terminate called without an active exception": seen
    in two-process test runs after the final model was written), which fails a run that
    succeeded and makes the launcher kill the other ranks."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
