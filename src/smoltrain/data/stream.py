"""Documents -> tokens -> shuffle buffer -> packed blocks or padded rows: `TokenStream`, its
collate function, and the split of one stream between ranks."""

from __future__ import annotations

import copy
import functools
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from smoltrain.data.config import DataConfig
from smoltrain.data.sources import check_text, is_eval_document, open_source


class TokenStream(IterableDataset):
    """Documents -> (held-out filter) -> tokens + EOS -> shuffle buffer -> examples.

    Examples are packed blocks (`input_ids`, `labels`, `position_ids`, each exactly
    `context_length` long) or, in pad mode, single documents cut into rows of at most
    `context_length` tokens. Each (rank, worker) pair reads its own part of the source.
    """

    def __init__(
        self,
        open_fn: Callable[[], Any],
        tokenizer,
        cfg: DataConfig,
        split: str = "train",
        rank: int = 0,
        world_size: int = 1,
        infinite: bool = True,
    ) -> None:
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token; documents need one as separator")
        self.open_fn, self.tokenizer, self.cfg = open_fn, tokenizer, cfg
        self.split, self.rank, self.world_size, self.infinite = split, rank, world_size, infinite
        self._state: dict[str, Any] = {}
        self._resume: dict[str, Any] | None = None

    # The StatefulDataLoader protocol: the state right after the last example yielded.
    def state_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, list) else v for k, v in self._state.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume = state

    def _open_part(self, epoch: int):
        from datasets.distributed import split_dataset_by_node

        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        ds = self.open_fn()
        ds = split_dataset_by_node(
            ds, rank=self.rank * workers + worker, world_size=self.world_size * workers
        )
        ds.set_epoch(epoch)
        return ds, workers * self.world_size

    def _keep(self, text: str) -> bool:
        if self.cfg.eval_source is not None:
            return True  # the evaluation set is a separate source
        held_out = is_eval_document(text, self.cfg.holdout_every)
        return held_out if self.split == "eval" else not held_out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        cfg = self.cfg
        fresh = {"epoch": 0, "epoch_docs": 0, "source": None, "rng": None}
        lists = {"pending": [], "buffer": [], "carry": [], "starts": [], "rows": []}
        st = self._resume or {**fresh, **lists}
        self._resume = None
        self._state = st
        eos = self.tokenizer.eos_token_id
        while True:
            ds, parts = self._open_part(st["epoch"])
            whole_epoch, epoch_tokens = st["source"] is None, 0  # read from its start here
            if st["source"] is not None:
                ds.load_state_dict(st["source"])
            rng = random.Random(cfg.seed + st["epoch"])
            if st["rng"] is not None:
                rng.setstate(_tuplify(st["rng"]))
            # `iter(batch_size=)`, not `iter(ds)`: inside a DataLoader worker a datasets stream
            # splits its shards among the workers again, on top of `_open_part`'s split (a
            # worker then read 1/W of its part, or nothing from a one-file source)
            source, exhausted = ds.iter(batch_size=cfg.tokenize_batch), False
            while True:
                # 1. emit what is ready: full blocks (pack) or rows (pad)
                while len(st["carry"]) >= cfg.context_length:
                    yield self._block(st, cfg.context_length)
                if st["rows"]:
                    yield {"input_ids": st["rows"].pop(0)}
                    continue
                # 2. route one tokenized document through the shuffle buffer
                if st["pending"]:
                    doc = st["pending"].pop(0)
                    if cfg.shuffle_buffer > 0:
                        if len(st["buffer"]) < cfg.shuffle_buffer:
                            st["buffer"].append(doc)
                            continue
                        i = rng.randrange(len(st["buffer"]))
                        doc, st["buffer"][i] = st["buffer"][i], doc
                        st["rng"] = rng.getstate()
                    self._add(st, doc)
                    continue
                # 3. read and tokenize the next batch of documents
                if not exhausted:
                    rows = next(source, None)
                    exhausted = rows is None
                    texts = (
                        [check_text(t, cfg.source_for(self.split), cfg.text_column) for t in rows["text"]]
                        if rows
                        else []
                    )
                    empty = sum(not t for t in texts)  # no tokens: not a document to train on
                    texts = [t for t in texts if t and self._keep(t)]
                    st["empty_docs"] = st.get("empty_docs", 0) + empty
                    if texts:
                        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
                        st["pending"] = [np.array(t + [eos], dtype=np.int32) for t in ids]
                        st["epoch_docs"] += len(texts)
                        epoch_tokens += sum(len(t) + 1 for t in ids)
                    st["source"] = ds.state_dict()
                    continue
                # 4. this part of the source is done: drain the buffer in random order
                if st["buffer"]:
                    self._add(st, st["buffer"].pop(rng.randrange(len(st["buffer"]))))
                    st["rng"] = rng.getstate()
                    continue
                break
            if st["epoch_docs"] == 0:
                if parts == 1:
                    empty = (
                        f" ({st['empty_docs']} empty documents, which hold no tokens)"
                        if st.get("empty_docs")
                        else ""
                    )
                    raise ValueError(
                        f"data source '{cfg.source_for(self.split)}' yielded no {self.split} "
                        f"documents{empty}; check that it is not empty, its text column, and "
                        "data.holdout_every"
                    )
                return  # a tiny source left this rank or worker without a part
            if self.infinite and cfg.mode == "pack" and whole_epoch and epoch_tokens < cfg.context_length:
                raise ValueError(
                    f"data source '{cfg.source_for(self.split)}' holds {epoch_tokens} tokens for this "
                    f"rank, fewer than one block of data.context_length={cfg.context_length}; lower "
                    "data.context_length or add documents"
                )
            if not self.infinite:
                if st["carry"]:
                    yield self._block(st, len(st["carry"]))  # the last partial block, padded
                return
            st.update(epoch=st["epoch"] + 1, epoch_docs=0, source=None, rng=None)

    def _add(self, st: dict[str, Any], doc: np.ndarray) -> None:
        if self.cfg.mode == "pack":
            st["starts"].append(len(st["carry"]))
            st["carry"] = st["carry"] + doc.tolist()
        else:  # one document per row; a long one is split into several rows, never dropped
            T = self.cfg.context_length
            st["rows"] = st["rows"] + [doc[i : i + T].tolist() for i in range(0, len(doc), T)]

    def _block(self, st: dict[str, Any], n: int) -> dict[str, Any]:
        tokens, starts = st["carry"][:n], [s for s in st["starts"] if s < n]
        st["carry"] = st["carry"][n:]
        st["starts"] = [s - n for s in st["starts"] if s >= n]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        return packed_example(
            np.asarray(tokens, dtype=np.int64),
            np.asarray(starts, dtype=np.int64),
            self.cfg.context_length,
            pad,
        )


def packed_example(tokens: np.ndarray, starts: np.ndarray, T: int, pad: int) -> dict[str, torch.Tensor]:
    """One packed block of `T` (its `tokens`, padded when fewer, with the offsets where
    documents start): position ids restart at every document start (a document continued
    from the previous block restarts at 0 too: its earlier part is not visible here),
    document ids count the documents, the padded tail is -100 in the labels and -1 in the ids."""
    n = len(tokens)
    index = np.arange(T)
    is_start = np.zeros(T, dtype=bool)
    is_start[0] = True
    is_start[starts] = True
    positions = index - np.maximum.accumulate(np.where(is_start, index, 0))
    doc_ids = np.cumsum(is_start) - 1
    doc_ids[n:] = -1
    input_ids = np.full(T, pad, dtype=np.int64)
    input_ids[:n] = tokens
    labels = input_ids.copy()
    labels[n:] = -100
    return {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(positions),
        "doc_ids": torch.from_numpy(doc_ids),
    }


def _tuplify(x):
    # random.Random state round-trips through a checkpoint as nested lists
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


# ---------------------------------------------------------------------------- batching


def make_collate(cfg: DataConfig, tokenizer) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
    """Batches that keep attention plain causal wherever that is exact, so that SDPA runs its
    flash kernels: padding goes on the right, where no real token looks (its labels are
    -100), so pad mode needs no mask; document masking sends (B, T) document ids, from which
    the model builds its mask on the device (a FlexAttention block mask on CUDA)."""
    if cfg.mode == "pad":
        from transformers import DataCollatorForLanguageModeling

        tokenizer = copy.deepcopy(tokenizer)  # its own: the run's tokenizer (saved with checkpoints) stays
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"
        pad = DataCollatorForLanguageModeling(tokenizer, mlm=False)

        def collate_rows(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
            batch = pad(examples)
            del batch["attention_mask"]  # right padding under causal attention: nothing to hide
            return dict(batch)

        return collate_rows

    def collate_blocks(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = {k: torch.stack([e[k] for e in examples]) for k in ("input_ids", "labels", "position_ids")}
        if cfg.document_mask:
            batch["document_ids"] = torch.stack([e["doc_ids"] for e in examples])
        return batch

    return collate_blocks


def _open_fn(cfg: DataConfig, split: str) -> Callable[[], Any]:
    # a partial, not a lambda: spawned workers (macOS) must pickle it
    return functools.partial(open_source, cfg.source_for(split), cfg.text_column, cfg.txt_documents)


class RankSlice:
    """Rank r of W takes micro-batches r, r+W, r+2W, ... of a stream every rank reads alike.
    At every optimizer step boundary all ranks have pulled the same number of micro-batches,
    so the inner loader's state is one global position, valid for any process count."""

    def __init__(self, loader, rank: int, world_size: int) -> None:
        self.loader, self.rank, self.world_size = loader, rank, world_size

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        inner = iter(self.loader)
        while True:
            group = []
            for batch in inner:
                group.append(batch)
                if len(group) == self.world_size:
                    break
            if self.rank < len(group):
                yield group[self.rank]
            if len(group) < self.world_size:
                return

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)


def resolve_rank_split(rank_split: str, device_type: str, world_size: int) -> str:
    """`auto`: each rank its own documents on several GPUs, the same stream otherwise."""
    if rank_split != "auto":
        return rank_split
    return "document" if device_type == "cuda" and world_size > 1 else "micro_batch"
