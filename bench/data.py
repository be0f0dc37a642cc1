"""Data throughput beside what training consumes. Three parts:

1. `smoltrain prepare` tokens/s with 1 and 2 worker processes (end to end, start-up of the
   processes included), on `--copies` copies of the source, and whether their bytes agree;
2. the loaders at the H200 setting (SmolLM2-135M, context 2048, micro-batch 16): the
   on-the-fly pipeline for one rank, and the prepared-shard loader for one rank of 1 and of
   8 (each rank reads only its own share), beside the ~0.5M tokens/s one H200 consumes;
3. the on-the-fly pipeline beside our CPU training step at the quickstart and reference settings.

Usage: python -m bench.data [--batches N] [--copies K] [--source S] [--skip-cpu-training]"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench import worker
from smoltrain.data.config import DataConfig
from smoltrain.data.loader import build_loader
from smoltrain.data.shards import PrepareJob, prepare
from smoltrain.data.sources import open_source
from smoltrain.tokenizer import load_tokenizer

SETTINGS = {  # name: (model preset, micro-batch, context, autocast bf16)
    "quickstart": ("tiny", 8, 256, True),
    "reference": ("smollm2-135m", 4, 256, False),
}
H200 = {"micro_batch": 16, "context": 2048, "tokens_per_s": 500_000}  # 135M, bf16, compiled
REQUIRED_MARGIN = 10  # the supply per rank must exceed 10x one GPU's demand


def loader_tokens_per_s(
    cfg: DataConfig, tokenizer, batch_size: int, batches: int, rank: int = 0, world: int = 1
) -> float:
    it = iter(build_loader(cfg, tokenizer, batch_size, "train", rank, world))
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


def copies_of(source: str, copies: int, folder: Path) -> Path:
    """The source's documents, `copies` times over (numbered, so no two are the same)."""
    path = folder / "corpus.jsonl"
    texts = [row["text"] for row in open_source(source)]
    with open(path, "w") as f:
        for c in range(copies):
            for text in texts:
                f.write(json.dumps({"text": f"{c}\n{text}"}) + "\n")
    return path


def prepare_part(corpus: Path, folder: Path) -> Path:
    print("\n## smoltrain prepare (end to end: source read, tokenized, written, fsynced)\n")
    print("| workers | documents | tokens | seconds | tokens/s |\n| --- | --- | --- | --- | --- |")
    outputs = {}
    for workers in (1, 2):
        out = folder / f"shards-{workers}"
        job = PrepareJob(str(corpus), str(out), workers=workers, shard_documents=2000)
        start = time.perf_counter()
        m = prepare(job, progress=False)
        seconds = time.perf_counter() - start
        tokens = m["tokens"] + m["eval_tokens"]
        docs = m["documents"] + m["eval_documents"]
        print(f"| {workers} | {docs:,} | {tokens:,} | {seconds:.1f} | {tokens / seconds:,.0f} |")
        outputs[workers] = {p.name: p.read_bytes() for p in sorted(out.glob("shard-*"))}
    print(f"\nshard files identical for 1 and 2 workers: {outputs[1] == outputs[2]}")
    return folder / "shards-1"


def loader_part(corpus: Path, shards: Path, tokenizer, batches: int) -> None:
    B, T, demand = H200["micro_batch"], H200["context"], H200["tokens_per_s"]
    print(f"\n## Loaders at the H200 setting ({B} x {T} tokens per micro-batch)\n")
    print(
        f"one H200 consumes about {demand:,} tokens/s training SmolLM2-135M; needed per rank: "
        f"{REQUIRED_MARGIN}x = {REQUIRED_MARGIN * demand:,}\n"
    )
    print("| loader | tokens/s per rank | x one H200 | >= 10x |\n| --- | --- | --- | --- |")
    rows = [
        (
            "on the fly (tokenize, shuffle buffer 1000), 1 rank",
            DataConfig(source=str(corpus), context_length=T),
            1,
        ),
        ("prepared shards, rank 0 of 1", DataConfig(source=str(shards), context_length=T), 1),
        ("prepared shards, rank 0 of 8", DataConfig(source=str(shards), context_length=T), 8),
    ]
    for name, cfg, world in rows:
        n = max(3, batches // 10) if "fly" in name else batches
        supply = loader_tokens_per_s(cfg, tokenizer, B, n, 0, world)
        print(f"| {name} | {supply:,.0f} | {supply / demand:.1f}x | {supply >= REQUIRED_MARGIN * demand} |")


def cpu_training_part(source: str, tokenizer, batches: int, workers: int) -> None:
    print("\n## The on-the-fly pipeline beside CPU training\n")
    print("| setting | pipeline tok/s | training tok/s | ratio |\n| --- | --- | --- | --- |")
    for name, (preset, batch, context, bf16) in SETTINGS.items():
        cfg = DataConfig(source=source, context_length=context, num_workers=workers)
        supply = loader_tokens_per_s(cfg, tokenizer, batch, batches)
        demand = training_tokens_per_s(preset, batch, context, bf16)
        print(f"| {name} | {supply:,.0f} | {demand:,.0f} | {supply / demand:.0f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument(
        "--workers", type=int, default=0, help="DataLoader workers of the on-the-fly pipeline"
    )
    parser.add_argument("--copies", type=int, default=24, help="copies of the source that prepare reads")
    parser.add_argument("--source", default="builtin:python-docs")
    parser.add_argument("--skip-cpu-training", action="store_true")
    args = parser.parse_args()
    tokenizer = load_tokenizer("smollm2")
    with tempfile.TemporaryDirectory() as tmp:
        corpus = copies_of(args.source, args.copies, Path(tmp))
        print(f"# Data throughput: {args.source} x {args.copies} copies")
        shards = prepare_part(corpus, Path(tmp))
        loader_part(corpus, shards, tokenizer, args.batches)
    if not args.skip_cpu_training:
        cpu_training_part(args.source, tokenizer, args.batches, args.workers)


if __name__ == "__main__":
    main()
