"""Weighted mixtures of sources and stages of mixtures, as one global order of samples.

Sample g of the run (g counts sequences over all ranks, in order) comes from one source,
as its k-th sample; `SamplePlan.locate(g)` says which, from g alone:

- a stage covers the samples of its steps (`until_step` x sequences per step);
- inside a stage, the sources take turns in a fixed pattern of `PERIOD` slots in which
  source i holds round(weight_i / sum x PERIOD) slots, spread evenly (smooth weighted round
  robin), so the realised shares match the weights to 1/PERIOD at every period's end;
- a source's k continues across stages and counts only its own samples, so each source
  has its own epochs: a small one repeats, a large one never restarts.

Prepared shards serve sample k directly (block k mod n of epoch k div n's seeded
permutation), so each rank reads only its own micro-batches and the position is one integer,
whatever the process count. On-the-fly streams are read in order by every rank, which keeps
the samples the others take (their state is the stream's, identical on every rank).
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from smoltrain.data.config import DataConfig, MixtureEntry
from smoltrain.data.shard_set import ShardSet, check_tokenizer
from smoltrain.data.shards import is_prepared, read_manifest
from smoltrain.data.stream import TokenStream, _open_fn, make_collate, packed_example

log = logging.getLogger(__name__)

PERIOD = 10_000  # slots in one turn of a mixture's pattern


class Interleave:
    """Which source each sample of one mixture comes from, and how many each has served."""

    def __init__(self, weights: list[float]) -> None:
        total = sum(weights)
        quotas = [w / total * PERIOD for w in weights]
        counts = [int(q) for q in quotas]
        by_remainder = sorted(range(len(weights)), key=lambda i: quotas[i] - counts[i], reverse=True)
        for i in by_remainder[: PERIOD - sum(counts)]:  # largest remainders round up
            counts[i] += 1
        if min(counts) == 0:
            raise ValueError(
                f"a mixture weight is below 1/{PERIOD} of the total ({weights}); raise it or drop the source"
            )
        pattern, credit = np.empty(PERIOD, dtype=np.int64), [0] * len(counts)
        for slot in range(PERIOD):
            credit = [c + n for c, n in zip(credit, counts, strict=True)]
            pick = max(range(len(counts)), key=credit.__getitem__)
            credit[pick] -= PERIOD
            pattern[slot] = pick
        self.pattern, self.counts = pattern, np.array(counts, dtype=np.int64)
        self.prefix = np.zeros((PERIOD + 1, len(counts)), dtype=np.int64)
        self.prefix[1:] = np.cumsum(np.eye(len(counts), dtype=np.int64)[pattern], axis=0)

    def source(self, i: int) -> int:
        return int(self.pattern[i % PERIOD])

    def served(self, i: int) -> np.ndarray:
        """Samples each source gave among the first i."""
        return (i // PERIOD) * self.counts + self.prefix[i % PERIOD]


class SamplePlan:
    """The source and its own sample index of every global sample, across stages."""

    def __init__(self, sources: list[str], stages: list[tuple[int, list[MixtureEntry]]]) -> None:
        # stages: (first sample, mixture); sources: the distinct specs, in order of appearance
        self.sources, self.starts = sources, [start for start, _ in stages]
        self.members = [[sources.index(e.source) for e in mixture] for _, mixture in stages]
        self.interleaves = [Interleave([e.weight for e in mixture]) for _, mixture in stages]
        self.base = [np.zeros(len(sources), dtype=np.int64)]  # each source's count at each stage start
        for j in range(len(stages) - 1):
            self.base.append(self.base[j] + self._within(j, self.starts[j + 1] - self.starts[j]))

    def _within(self, j: int, i: int) -> np.ndarray:
        counts = np.zeros(len(self.sources), dtype=np.int64)
        np.add.at(counts, self.members[j], self.interleaves[j].served(i))
        return counts

    def stage(self, g: int) -> int:
        return bisect.bisect_right(self.starts, g) - 1

    def locate(self, g: int) -> tuple[int, int]:
        j = self.stage(g)
        i = g - self.starts[j]
        member = self.interleaves[j].source(i)
        source = self.members[j][member]
        return source, int(self.base[j][source] + self.interleaves[j].served(i)[member])

    def served(self, g: int) -> np.ndarray:
        """Samples each source gave among the first g."""
        j = self.stage(g)
        return self.base[j] + self._within(j, g - self.starts[j])


# ------------------------------------------------------------------------------ sources


def _mix(value: int, key: int) -> int:
    """A 32-bit hash of `value` under `key` (murmur3's finalizer), for the Feistel rounds."""
    x = (value ^ key) & 0xFFFFFFFF
    x = ((x ^ (x >> 16)) * 0x85EBCA6B) & 0xFFFFFFFF
    x = ((x ^ (x >> 13)) * 0xC2B2AE35) & 0xFFFFFFFF
    return x ^ (x >> 16)


class SeededPermutation:
    """A pseudo-random permutation of range(n) computed one index at a time, in O(1) memory:
    a 4-round Feistel network over the smallest even number of bits that covers n, walking
    the cycle until it lands inside range(n) (fewer than 4 rounds of it on average). An array
    permutation of every block of FineWeb-Edu at context 2048 is ~860 MB per rank."""

    def __init__(self, n: int, seed: int, epoch: int) -> None:
        bits = max(2, (n - 1).bit_length())
        self.n, self.half = n, (bits + bits % 2) // 2
        self.keys = [int(k) for k in np.random.default_rng([seed, epoch]).integers(0, 2**32, size=4)]

    def __getitem__(self, i: int) -> int:
        mask, x = (1 << self.half) - 1, i
        while True:
            left, right = x >> self.half, x & mask
            for key in self.keys:
                left, right = right, left ^ (_mix(right, key) & mask)
            x = (left << self.half) | right
            if x < self.n:
                return x


class ShardSamples:
    """Packed blocks of a prepared folder, sample k at once: epoch k // n, then the block at
    k % n of that epoch's seeded permutation (or in order, for eval and shuffle_buffer=0)."""

    random_access = True

    def __init__(self, folder: str, cfg: DataConfig, tokenizer, split: str, infinite: bool) -> None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.blocks = ShardSet(folder, split, cfg.context_length, cfg.long_conversations)
        if self.blocks.chat and self.blocks.long:
            done = "cut to it" if cfg.long_conversations == "truncate" else "left out"
            log.warning(
                "%d %s conversations of %s are longer than data.context_length=%d and are %s",
                self.blocks.long,
                split,
                folder,
                cfg.context_length,
                done,
            )
        self.T, self.pad, self.infinite = cfg.context_length, pad, infinite
        self.seed, self.shuffle = cfg.seed, infinite and cfg.shuffle_buffer > 0
        self._epoch, self._order = -1, None
        if split == "eval" and self.blocks.num_tokens == 0:
            raise ValueError(
                f"data source '{folder}' holds no held-out documents (prepared with --eval-every "
                f"{read_manifest(folder)['eval_every']}); set data.eval_source to an evaluation source, "
                "or prepare it again with --eval-every K"
            )
        if self.blocks.num_blocks == 0:
            raise ValueError(
                f"data source '{folder}' holds {self.blocks.num_tokens} {split} tokens, fewer than one "
                f"block of data.context_length={cfg.context_length}; lower data.context_length, or "
                "prepare more documents (or a larger held-out share with --eval-every)"
            )

    def block_index(self, k: int) -> int | None:
        n = self.blocks.num_blocks
        if not self.infinite and k >= n:
            return None
        epoch, i = divmod(k, n)
        if not self.shuffle:
            return i
        if epoch != self._epoch:  # one permutation per epoch
            self._epoch, self._order = epoch, SeededPermutation(n, self.seed, epoch)
        return self._order[i]

    def get(self, k: int) -> dict[str, torch.Tensor] | None:
        b = self.block_index(k)
        # the example TokenStream packs from the same tokens
        return None if b is None else packed_example(**self.blocks.block(b), T=self.T, pad=self.pad)

    def state_dict(self) -> dict[str, Any]:
        return {}  # the plan's sample count says where it is

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class StreamSamples:
    """An on-the-fly source (the whole stream, on every rank), read in order."""

    random_access = False

    def __init__(
        self, spec: str, cfg: DataConfig, tokenizer, split: str, infinite: bool, snapshot_every: int
    ):
        from torchdata.stateful_dataloader import StatefulDataLoader

        cfg = dataclasses.replace(cfg, source=spec, eval_source=None)
        open_fn = _open_fn(cfg, split)
        open_fn()  # fail here, with the source's message, rather than inside a worker
        stream = TokenStream(open_fn, tokenizer, cfg, split, 0, 1, infinite=infinite)
        self.loader = StatefulDataLoader(
            stream,
            batch_size=None,
            num_workers=cfg.num_workers,
            snapshot_every_n_steps=max(1, snapshot_every),
        )
        self.consumed, self._it = 0, None

    def get(self, k: int) -> dict[str, Any] | None:
        self.advance_to(k)
        return self._next()

    def advance_to(self, n: int) -> None:
        """Read past the samples before n (the ones other ranks take)."""
        while self.consumed < n and self._next() is not None:
            pass

    def _next(self) -> dict[str, Any] | None:
        if self._it is None:
            self._it = iter(self.loader)
        example = next(self._it, None)
        self.consumed += example is not None
        return example

    def state_dict(self) -> dict[str, Any]:
        return {"consumed": self.consumed, "loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.consumed, self._it = state["consumed"], None
        self.loader.load_state_dict(state["loader"])


# ------------------------------------------------------------------------------- loader


def describe(cfg: DataConfig) -> str:
    """The data for the start-up summary: the source, or each stage's shares."""

    def one(spec: str) -> str:
        if is_prepared(spec):
            return f"{spec} (prepared, {read_manifest(spec)['tokens']:,} tokens)"
        return f"{spec} (on the fly)"

    stages = mixture_stages(cfg, "train")
    if len(stages) == 1 and len(stages[0][1]) == 1:
        return one(stages[0][1][0].source)
    parts, first = [], 1
    for until, mixture in stages:
        total = sum(e.weight for e in mixture)
        shares = ", ".join(f"{e.weight / total:.1%} {one(e.source)}" for e in mixture)
        parts.append(f"steps {first}-{until or 'end'}: {shares}" if len(stages) > 1 else shares)
        first = (until or 0) + 1
    return "; ".join(parts)


def uses_plan(cfg: DataConfig) -> bool:
    """Mixtures, stages and prepared shards (to train or to evaluate on) go through the sample plan."""
    prepared = is_prepared(cfg.source) or (cfg.eval_source is not None and is_prepared(cfg.eval_source))
    return bool(cfg.mixture or cfg.stages or prepared)


def mixture_stages(cfg: DataConfig, split: str) -> list[tuple[int | None, list[MixtureEntry]]]:
    """(until_step, mixture) of each stage. Evaluation reads one fixed mixture (the first
    stage's held-out splits, or data.eval_source), so eval losses compare across stages."""
    if split == "eval" and cfg.eval_source:
        return [(None, [MixtureEntry(cfg.eval_source, 1.0)])]
    if cfg.stages:
        stages = [(s.until_step, s.mixture) for s in cfg.stages]
        return stages[:1] if split == "eval" else stages
    return [(None, cfg.mixture or [MixtureEntry(cfg.source, 1.0)])]


class PlanLoader:
    """This rank's micro-batches of the global sample order: micro-batch m of the run holds
    samples [m*B, (m+1)*B), and rank r of W takes m = r, r+W, ... (the step's batch is the
    same set of sequences for any W). `state_dict()` is the global sample count at the last
    group of W micro-batches, the same on every rank at a step boundary."""

    def __init__(
        self,
        plan: SamplePlan,
        sources: list[ShardSamples | StreamSamples],
        collate: Callable,
        batch_size: int,
        rank: int,
        world_size: int,
        finite: bool,
        tokens_per_sample: int,
        stage_steps: list[int],
        pin_memory: bool = False,
    ) -> None:
        self.plan, self.sources, self.collate = plan, sources, collate
        self.B, self.rank, self.world, self.finite = batch_size, rank, world_size, finite
        self.tokens_per_sample, self.stage_steps, self.pin_memory = tokens_per_sample, stage_steps, pin_memory
        self.samples = 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        B, W = self.B, self.world
        while True:
            first = self.samples + self.rank * B
            examples = []
            for g in range(first, first + B):
                source, k = self.plan.locate(g)
                example = self.sources[source].get(k)
                if example is None:  # a finite pass ran out
                    break
                examples.append(example)
            group_end = self.samples + W * B
            if not self.finite:  # streams move past the other ranks' samples of this group
                served = self.plan.served(group_end)
                for i, src in enumerate(self.sources):
                    if not src.random_access:
                        src.advance_to(int(served[i]))
            self.samples = group_end
            if examples:
                batch = self.collate(examples)
                yield {k: v.pin_memory() for k, v in batch.items()} if self.pin_memory else batch
            if len(examples) < B:
                return

    def state_dict(self) -> dict[str, Any]:
        # keyed by source, so that a resume that appends a stage (annealing) finds its sources
        return {"samples": self.samples, "sources": {spec: s.state_dict() for spec, s in self._by_spec()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.samples = state["samples"]
        for spec, source in self._by_spec():
            if spec in state["sources"]:  # a source new to the run starts at its beginning
                source.load_state_dict(state["sources"][spec])

    def _by_spec(self):
        return zip(self.plan.sources, self.sources, strict=True)

    def source_tokens(self) -> dict[str, int]:
        """Tokens each source has given the run so far (packed samples are full blocks)."""
        served = self.plan.served(self.samples)
        return {
            spec: int(n) * self.tokens_per_sample for spec, n in zip(self.plan.sources, served, strict=True)
        }


def build_plan_loader(
    cfg: DataConfig,
    tokenizer,
    batch_size: int,
    split: str,
    rank: int,
    world_size: int,
    samples_per_step: int | None,
    pin_memory: bool = False,
    snapshot_every: int = 1,
) -> PlanLoader:
    stages = mixture_stages(cfg, split)
    sources: list[str] = []
    for _, mixture in stages:
        sources += [e.source for e in mixture if e.source not in sources]
    starts = [0]
    for until, _ in stages[:-1]:
        if samples_per_step is None:
            raise ValueError("data.stages need the number of sequences per step")
        starts.append(until * samples_per_step)
    plan = SamplePlan(sources, list(zip(starts, [m for _, m in stages], strict=True)))
    infinite = split == "train"
    readers: list[ShardSamples | StreamSamples] = []
    for spec in sources:
        if is_prepared(spec):
            if cfg.mode == "pad":
                raise ValueError(
                    f"data.mode=pad reads documents one per row, which prepared shards ('{spec}') "
                    "do not serve; use data.mode=pack (with data.document_mask for per-document attention)"
                )
            manifest = read_manifest(spec)
            check_tokenizer(spec, manifest, tokenizer)
            prepared_as = manifest.get("data_format", "text")
            if prepared_as != cfg.format:
                raise ValueError(
                    f"data source '{spec}' was prepared as {prepared_as} data (smoltrain prepare --format "
                    f"{prepared_as}) but data.format is {cfg.format}; set data.format={prepared_as}, or "
                    f"prepare the source again with --format {cfg.format}"
                )
            readers.append(ShardSamples(spec, cfg, tokenizer, split, infinite))
        else:
            readers.append(StreamSamples(spec, cfg, tokenizer, split, infinite, snapshot_every))
    return PlanLoader(
        plan,
        readers,
        make_collate(cfg, tokenizer),
        batch_size,
        rank,
        world_size,
        finite=not infinite,
        tokens_per_sample=cfg.context_length,
        stage_steps=[until for until, _ in stages[:-1]],
        pin_memory=pin_memory,
    )
