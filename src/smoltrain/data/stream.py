"""Documents -> tokens -> shuffle buffer -> packed blocks or padded rows: `TokenStream`, its
collate function, and the split of one stream between ranks."""

from __future__ import annotations

import copy
import functools
import logging
import math
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from smoltrain.data.chat import conversation, conversation_key, render_conversation
from smoltrain.data.config import DataConfig
from smoltrain.data.sources import check_text, is_eval_document, open_source
from smoltrain.tokenizer import chat_template

log = logging.getLogger(__name__)


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
                    row = st["rows"].pop(0)
                    yield row if isinstance(row, dict) else {"input_ids": row}
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
                    if rows:
                        tokenize = self._conversations if cfg.format == "chat" else self._documents
                        st["pending"] = tokenize(rows, st)
                        st["epoch_docs"] += len(st["pending"])
                        epoch_tokens += sum(doc.shape[-1] for doc in st["pending"])
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

    def _documents(self, rows: dict[str, list], st: dict[str, Any]) -> list[np.ndarray]:
        """Text documents -> their tokens and EOS; empty and other-split ones left out."""
        source = self.cfg.source_for(self.split)
        texts = [check_text(t, source, self.cfg.text_column) for t in rows["text"]]
        st["empty_docs"] = st.get("empty_docs", 0) + sum(not t for t in texts)  # no tokens to train on
        texts = [t for t in texts if t and self._keep(t)]
        if not texts:
            return []
        eos = self.tokenizer.eos_token_id
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [np.array(t + [eos], dtype=np.int32) for t in ids]

    def _conversations(self, rows: dict[str, list], st: dict[str, Any]) -> list[np.ndarray]:
        """Conversations -> (2, n) arrays: their tokens in the chat template and, per token,
        1 where it is the assistant's (trained on). One with no assistant turn is left out, one
        longer than the context cut or left out (data.long_conversations); both are counted."""
        source, T = self.cfg.source_for(self.split), self.cfg.context_length
        template = chat_template(self.tokenizer)
        docs = []
        for i in range(len(next(iter(rows.values())))):
            messages = conversation({k: v[i] for k, v in rows.items()}, source)
            if not self._keep(conversation_key(messages)):
                continue
            try:
                rendered = render_conversation(self.tokenizer, template, messages)
            except ValueError as e:
                raise ValueError(f"data source '{source}': {e}") from None
            if rendered is None:
                _count(st, "no_assistant", "conversations had no assistant turn and were skipped")
                continue
            ids, trained = rendered
            if len(ids) > T:
                how = "cut to it" if self.cfg.long_conversations == "truncate" else "left out"
                _count(st, "long", f"conversations were longer than data.context_length={T} and {how}")
                if self.cfg.long_conversations == "drop":
                    continue
                ids, trained = ids[:T], trained[:T]
            docs.append(np.array([ids, trained], dtype=np.int32))
        return docs

    def _add(self, st: dict[str, Any], doc: np.ndarray) -> None:
        T = self.cfg.context_length
        if doc.ndim == 2:  # a conversation: its tokens and which are trained on
            tokens, trained = doc.tolist()
            if self.cfg.mode == "pad":
                labels = [t if keep else -100 for t, keep in zip(tokens, trained, strict=True)]
                st["rows"] = st["rows"] + [{"input_ids": tokens, "labels": labels}]
                return
            # never split across blocks (its later turns would lose the earlier ones): a block
            # it does not fit in is closed with padding, which no loss is taken on
            free = -len(st["carry"]) % T
            st.setdefault("carry_trained", [])
            if len(tokens) > free > 0:
                st["starts"].append(len(st["carry"]))
                st["carry"] = st["carry"] + [self._pad_id()] * free
                st["carry_trained"] = st["carry_trained"] + [0] * free
            st["starts"].append(len(st["carry"]))
            st["carry"] = st["carry"] + tokens
            st["carry_trained"] = st["carry_trained"] + trained
        elif self.cfg.mode == "pack":
            st["starts"].append(len(st["carry"]))
            st["carry"] = st["carry"] + doc.tolist()
        else:  # one document per row; a long one is split into several rows, never dropped
            st["rows"] = st["rows"] + [doc[i : i + T].tolist() for i in range(0, len(doc), T)]

    def _pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def _block(self, st: dict[str, Any], n: int) -> dict[str, Any]:
        tokens, starts = st["carry"][:n], [s for s in st["starts"] if s < n]
        st["carry"] = st["carry"][n:]
        st["starts"] = [s - n for s in st["starts"] if s >= n]
        trained = None
        if "carry_trained" in st:
            trained = np.asarray(st["carry_trained"][:n], dtype=bool)
            st["carry_trained"] = st["carry_trained"][n:]
        return packed_example(
            np.asarray(tokens, dtype=np.int64),
            np.asarray(starts, dtype=np.int64),
            self.cfg.context_length,
            self._pad_id(),
            trained,
        )


def _count(st: dict[str, Any], key: str, what: str) -> None:
    """Counts a conversation left out or cut, and says so at the 1st, 10th, 100th, ... one."""
    counts = st.setdefault("conversations", {})
    counts[key] = counts.get(key, 0) + 1
    if math.log10(counts[key]).is_integer():
        log.warning("%d %s (this process, so far)", counts[key], what)


def conversation_counts(state: Any) -> dict[str, int]:
    """What a loader's streams counted of the conversations so far (`long`: longer than the
    context; `no_assistant`: no reply, left out), summed over its workers and sources: found
    in the loader's state, where each stream keeps them."""
    totals: dict[str, int] = {}
    if isinstance(state, dict):
        for key, value in state.items():
            if key == "conversations" and isinstance(value, dict):
                for what, n in value.items():
                    totals[what] = totals.get(what, 0) + n
            elif isinstance(value, dict):
                for what, n in conversation_counts(value).items():
                    totals[what] = totals.get(what, 0) + n
    return totals


def packed_example(
    tokens: np.ndarray, starts: np.ndarray, T: int, pad: int, trained: np.ndarray | None = None
) -> dict[str, torch.Tensor]:
    """One packed block of `T` (its `tokens`, padded when fewer, with the offsets where
    documents start): position ids restart at every document start (a document continued
    from the previous block restarts at 0 too: its earlier part is not visible here),
    document ids count the documents, the padded tail is -100 in the labels and -1 in the ids.
    `trained` (chat data): whether each token is trained on; the others are -100 in the labels."""
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
    if trained is not None:
        labels[:n][~trained] = -100
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
        from transformers import DataCollatorForLanguageModeling, DataCollatorForSeq2Seq

        tokenizer = copy.deepcopy(tokenizer)  # its own: the run's tokenizer (saved with checkpoints) stays
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"
        if cfg.format == "chat":  # rows bring their labels (the assistant's tokens); padding is -100
            pad = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)
        else:
            pad = DataCollatorForLanguageModeling(tokenizer, mlm=False)

        def collate_rows(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
            batch = pad(examples)
            del batch["attention_mask"]  # right padding under causal attention: nothing to hide
            return dict(batch)

        return collate_rows

    def collate_blocks(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = {k: torch.stack([e[k] for e in examples]) for k in ("input_ids", "labels", "position_ids")}
        if cfg.masks_documents:
            batch["document_ids"] = torch.stack([e["doc_ids"] for e in examples])
        return batch

    return collate_blocks


def _open_fn(cfg: DataConfig, split: str) -> Callable[[], Any]:
    # a partial, not a lambda: spawned workers (macOS) must pickle it
    return functools.partial(
        open_source, cfg.source_for(split), cfg.text_column, cfg.txt_documents, cfg.format
    )


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
