"""The resumable DataLoader of one rank's micro-batches, from a stream or from a plan (prepared
shards, mixtures, stages)."""

from __future__ import annotations

import os
import warnings

from smoltrain.data.config import DataConfig
from smoltrain.data.stream import RankSlice, TokenStream, _open_fn, make_collate, resolve_rank_split


def build_loader(
    cfg: DataConfig,
    tokenizer,
    batch_size: int,
    split: str = "train",
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
    snapshot_every: int = 1,
    samples_per_step: int | None = None,
):
    """A resumable loader (`state_dict()` / `load_state_dict()`) of this rank's micro-batches
    (see `DataConfig.rank_split`, `auto` read as on CPU). The train split is endless (epoch
    after epoch); eval is one pass. `pin_memory` for copies to a GPU that overlap compute.
    Workers send their state (the shuffle buffer included) every `snapshot_every` batches,
    the checkpoint interval in training: a state asked for in between replays the batches
    since the last one on resume, so it stays exact. Prepared shards, mixtures and stages
    (`samples_per_step`: sequences per optimizer step, where stages switch) are served by
    `smoltrain.data.mixture`, each rank reading its own micro-batches."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    from smoltrain.data.mixture import build_plan_loader, uses_plan

    warnings.filterwarnings("ignore", message="'set_vital' is deprecated")  # torchdata's own noise
    if uses_plan(cfg):
        return build_plan_loader(
            cfg, tokenizer, batch_size, split, rank, world_size, samples_per_step, pin_memory, snapshot_every
        )

    open_fn = _open_fn(cfg, split)
    open_fn()  # fail here, with the source's message, rather than inside a worker
    if cfg.num_workers > 0:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers are the parallelism
    by_document = resolve_rank_split(cfg.rank_split, "cpu", world_size) == "document"
    stream = TokenStream(
        open_fn,
        tokenizer,
        cfg,
        split,
        rank if by_document else 0,
        world_size if by_document else 1,
        infinite=split == "train",
    )
    loader = StatefulDataLoader(
        stream,
        batch_size=batch_size,
        collate_fn=make_collate(cfg, tokenizer),
        num_workers=cfg.num_workers,
        persistent_workers=False,
        pin_memory=pin_memory,
        snapshot_every_n_steps=max(1, snapshot_every),
    )
    return loader if by_document or world_size == 1 else RankSlice(loader, rank, world_size)
