"""Reading what `smoltrain prepare` wrote (smoltrain.data.shards): the tokenizer check, the
shard files' integrity, and `ShardSet`, one split as memory-mapped blocks."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import numpy as np

from smoltrain.data.shards import FORMAT, read_manifest, tokenizer_identity
from smoltrain.data.sources import MANIFEST
from smoltrain.errors import DataError


def check_tokenizer(folder: str | Path, manifest: dict[str, Any], tokenizer) -> None:
    """Token ids only mean something under the tokenizer that made them."""
    if manifest.get("format") != FORMAT:
        raise ValueError(
            f"'{folder}' was written by another smoltrain version (format {manifest.get('format')}, "
            f"this one reads {FORMAT}); prepare it again"
        )
    if manifest["tokenizer_sha256"] != tokenizer_identity(tokenizer)["sha256"]:
        raise ValueError(
            f"data source '{folder}' was prepared with tokenizer '{manifest['tokenizer']}', which differs "
            f"from this run's ('{tokenizer.name_or_path}'); set tokenizer: {manifest['tokenizer']} in the "
            "config, or prepare the data again with --tokenizer set to this run's tokenizer"
        )


def open_file_budget(wanted: int) -> int:
    """File descriptors this process may still hold open for `wanted` more, raising its soft
    limit towards the hard one when that is what stands in the way (macOS starts at 256)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    spare = 1024  # sockets, pipes, workers, checkpoints: never handed out here
    if soft != resource.RLIM_INFINITY and soft < wanted + spare:
        target = wanted + spare if hard == resource.RLIM_INFINITY else min(hard, wanted + spare)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return wanted
    in_use = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 64
    return max(0, min(wanted, (soft - spare - in_use) // 2))  # half: other sources share it


def _npy_length(path: Path) -> int:
    """The length of a 1-D .npy file from its header, checked against the file's size: a
    header and a stat, not a read of the data."""
    try:
        with open(path, "rb") as f:
            npy = np.lib.format
            major, _ = npy.read_magic(f)
            shape, _, dtype = (npy.read_array_header_1_0 if major == 1 else npy.read_array_header_2_0)(f)
            data_start = f.tell()
    except FileNotFoundError:
        raise DataError(f"{path} is missing") from None
    except (ValueError, OSError, EOFError) as e:
        reason = str(e).splitlines()[0] if str(e) else "empty"
        raise DataError(f"{path} is not a readable .npy file ({reason})") from None
    expected, size = data_start + int(np.prod(shape)) * dtype.itemsize, path.stat().st_size
    if size != expected:
        raise DataError(f"{path} is cut short: {size:,} bytes where its header promises {expected:,}")
    return int(shape[0]) if shape else 0


def check_shard_files(folder: Path, shards: list[dict[str, Any]], split: str, chat: bool = False) -> None:
    """Every shard file of `split` is whole and holds the tokens and documents the manifest
    says (a shard cut short failed mid-run; a manifest that claimed more tokens trained on
    masked rows with a zero gradient)."""
    prefix = "" if split == "train" else "eval_"
    fix = f"prepare the folder again (smoltrain prepare SOURCE {folder} --overwrite)"
    for shard in shards:
        stem = folder / f"shard-{shard['index']:05d}.{split}"
        try:
            tokens = _npy_length(stem.with_name(stem.name + ".npy"))
            offsets = _npy_length(stem.with_name(stem.name + ".docs.npy"))
        except DataError as e:
            raise DataError(f"prepared data in {folder} is damaged: {e}; {fix}") from None
        want_tokens, want_documents = shard[f"{prefix}tokens"], shard[f"{prefix}documents"]
        if chat:
            try:
                masked = _npy_length(stem.with_name(stem.name + ".mask.npy"))
            except DataError as e:
                raise DataError(f"prepared data in {folder} is damaged: {e}; {fix}") from None
            if masked != tokens:
                raise DataError(f"{stem}.mask.npy holds {masked:,} entries for {tokens:,} tokens; {fix}")
        if tokens != want_tokens or offsets != want_documents + 1:
            raise DataError(
                f"{stem}.npy holds {tokens:,} tokens and {offsets - 1:,} documents where {MANIFEST} "
                f"says {want_tokens:,} and {want_documents:,}: the folder was edited or damaged; {fix}"
            )


class ShardSet:
    """One split of a prepared folder as a single token sequence, memory-mapped: the blocks
    of `context_length` tokens it cuts into, with the document starts inside each. Chat
    data is packed whole instead: each block holds the conversations that fit in it (a
    longer one cut to the block, or left out, as `long_conversations` says), then padding."""

    def __init__(
        self, folder: str | Path, split: str, context_length: int, long_conversations: str = "truncate"
    ) -> None:
        self.folder, self.split, self.T = Path(folder).expanduser(), split, context_length
        manifest = read_manifest(self.folder)
        self.shards, self.chat = manifest["shards"], manifest.get("data_format", "text") == "chat"
        check_shard_files(self.folder, self.shards, split, self.chat)
        sizes = [s["tokens" if split == "train" else "eval_tokens"] for s in self.shards]
        # Each memory map holds a file descriptor, and training draws blocks from all shards at
        # random: reopening maps would cost 10x the throughput (4.6M instead of 50M tokens/s
        # over 900 shards), so every shard stays open where the descriptor limit allows.
        # Evaluation reads in order: a few open shards serve it.
        keep = open_file_budget(2 * len(self.shards)) // 2 if split == "train" else 8
        self.open_shard = functools.lru_cache(maxsize=max(keep, 8))(self._open_shard)
        self.shard_starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self.num_tokens = int(self.shard_starts[-1])
        # train: whole blocks only (the tail is dropped each epoch); eval: the last one padded
        self.num_blocks = self.num_tokens // self.T if split == "train" else -(-self.num_tokens // self.T)
        if self.chat:
            self._plan_conversations(long_conversations)

    def _open_shard(self, s: int) -> tuple[np.ndarray, ...]:
        """Shard s's tokens and document offsets (and chat's loss mask), memory-mapped."""
        stem = f"shard-{self.shards[s]['index']:05d}.{self.split}"
        tokens = np.load(self.folder / f"{stem}.npy", mmap_mode="r")
        offsets = np.load(self.folder / f"{stem}.docs.npy", mmap_mode="r")
        if not self.chat:
            return tokens, offsets
        return tokens, offsets, np.load(self.folder / f"{stem}.mask.npy", mmap_mode="r")

    def _plan_conversations(self, long_conversations: str) -> None:
        """Which conversations each block holds, in order: as many whole ones as fit. The same
        plan for the same folder and context, so a block index means the same tokens on resume."""
        where = []  # (shard, start, length) of each conversation kept
        self.long = 0
        for s in range(len(self.shards)):
            offsets = np.asarray(self.open_shard(s)[1])
            for start, length in zip(offsets[:-1].tolist(), np.diff(offsets).tolist(), strict=True):
                if length > self.T:
                    self.long += 1
                    if long_conversations == "drop":
                        continue
                    length = self.T
                where.append((s, start, length))
        self.conversations, self.block_starts, used = where, [], self.T
        for i, (_, _, length) in enumerate(where):
            if used + length > self.T:  # a new block
                self.block_starts.append(i)
                used = 0
            used += length
        self.block_starts.append(len(where))
        self.num_blocks = len(self.block_starts) - 1

    def _conversation_block(self, b: int) -> dict[str, np.ndarray]:
        tokens, trained, starts = [], [], []
        for s, start, length in self.conversations[self.block_starts[b] : self.block_starts[b + 1]]:
            ids, _, mask = self.open_shard(s)
            starts.append(sum(len(t) for t in tokens))
            tokens.append(np.asarray(ids[start : start + length], dtype=np.int64))
            trained.append(np.asarray(mask[start : start + length], dtype=bool))
        return {
            "tokens": np.concatenate(tokens),
            "starts": np.asarray(starts, dtype=np.int64),
            "trained": np.concatenate(trained),
        }

    def block(self, b: int) -> dict[str, np.ndarray]:
        """Tokens [b*T, (b+1)*T) and the offsets inside the block where documents start
        (chat: the block's conversations, and which of their tokens are trained on)."""
        if self.chat:
            return self._conversation_block(b)
        start, end = b * self.T, min((b + 1) * self.T, self.num_tokens)
        pieces, starts = [], []
        s = int(np.searchsorted(self.shard_starts, start, side="right")) - 1
        at = start
        while at < end:
            base = int(self.shard_starts[s])
            lo, hi = at - base, min(end, int(self.shard_starts[s + 1])) - base
            if hi > lo:  # (a shard whose documents were all held out is empty)
                tokens, offsets = self.open_shard(s)[:2]
                pieces.append(np.asarray(tokens[lo:hi], dtype=np.int64))
                first, last = np.searchsorted(offsets, [lo, hi], side="left")
                starts.append(np.asarray(offsets[first:last], dtype=np.int64) - lo + (at - start))
            at, s = base + hi, s + 1
        tokens = np.concatenate(pieces)
        return {"tokens": tokens, "starts": np.concatenate(starts) if starts else np.zeros(0, np.int64)}
