"""Data pipeline throughput beside what training consumes, at the quickstart and the
reference settings. Usage: python -m bench.data [--batches N] [--workers W]"""

from __future__ import annotations

import argparse
import time

from bench import worker
from smoltrain.data import DataConfig, build_loader, open_source
from smoltrain.tokenizer import load_tokenizer

SETTINGS = {  # name: (model preset, micro-batch, context, autocast bf16)
    "quickstart": ("tiny", 8, 256, True),
    "reference": ("smollm2-135m", 4, 256, False),
}


def pipeline_tokens_per_s(cfg: DataConfig, tokenizer, batch_size: int, batches: int) -> float:
    it = iter(build_loader(cfg, tokenizer, batch_size))
    next(it)  # start-up (opening the source, filling the shuffle buffer) is not throughput
    start = time.perf_counter()
    tokens = sum(next(it)["input_ids"].numel() for _ in range(batches))
    return tokens / (time.perf_counter() - start)


def training_tokens_per_s(preset: str, batch_size: int, context: int, bf16: bool) -> float:
    """Our training step at these settings, measured as `python -m bench` measures it."""
    args = argparse.Namespace(
        impl="ours",
        preset=preset,
        overrides="{}",
        device="cpu",
        batch=batch_size,
        context=context,
        precision="bf16" if bf16 else "fp32",
        steps=3,
        warmup=1,
        compile=False,
    )
    return worker.train(args)["tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--source", default="builtin:python-docs")
    args = parser.parse_args()
    tokenizer = load_tokenizer("smollm2")
    n_tokens = sum(len(tokenizer(r["text"])["input_ids"]) + 1 for r in open_source(args.source))
    print(f"source {args.source}: {n_tokens:,} tokens (with one EOS per document)")
    print(f"{'setting':<12}{'pipeline tok/s':>16}{'training tok/s':>16}{'ratio':>8}")
    for name, (preset, batch, context, bf16) in SETTINGS.items():
        cfg = DataConfig(source=args.source, context_length=context, num_workers=args.workers)
        supply = pipeline_tokens_per_s(cfg, tokenizer, batch, args.batches)
        demand = training_tokens_per_s(preset, batch, context, bf16)
        print(f"{name:<12}{supply:>16,.0f}{demand:>16,.0f}{supply / demand:>7.0f}x")


if __name__ == "__main__":
    main()
