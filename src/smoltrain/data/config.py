"""What the data section of a config holds: sources, mixtures, stages, packing and the loader's settings."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

BUILTIN_PYTHON_DOCS = "builtin:python-docs"
# chat data: questions about the standard library's functions, answered by their docstrings
BUILTIN_PYTHON_CHAT = "builtin:python-docs-chat"
REFERENCE_SOURCE = "hf:HuggingFaceTB/smollm-corpus:cosmopedia-v2"
_LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}


@dataclass
class MixtureEntry:
    source: str = BUILTIN_PYTHON_DOCS  # anything data.source accepts, prepared shards included
    weight: float = 1.0  # relative share of training sequences (tokens, in pack mode)


@dataclass
class Stage:
    until_step: int | None = None  # the stage's last step (None: to the end; the last one runs on)
    mixture: list[MixtureEntry] = field(default_factory=list)


@dataclass
class DataConfig:
    # hf:NAME[:CONFIG], a file, folder or glob, or builtin:python-docs (builtin:python-docs-chat for chat)
    source: str = BUILTIN_PYTHON_DOCS
    # "text": documents of plain text; "chat": conversations (a `messages` column, or `prompt` and
    # `completion`) rendered with the tokenizer's chat template, the loss on the assistant's tokens
    format: str = "text"
    text_column: str = "text"  # column holding the documents (jsonl, parquet, hub)
    txt_documents: str = "file"  # .txt files: one document per "file" or per blank-line "paragraph"
    context_length: int = 256  # tokens per training sequence
    mode: str = "pack"  # "pack": concatenate into full blocks; "pad": one document per row, padded
    document_mask: bool = False  # pack mode: forbid attention across documents inside a block (chat: always)
    # chat: a conversation longer than context_length is cut to it ("truncate") or left out ("drop")
    long_conversations: str = "truncate"
    shuffle_buffer: int = 1000  # documents in the seeded shuffle buffer (0: stream order)
    seed: int = 0  # shuffle seed; epoch k uses seed + k
    holdout_every: int = 200  # hold out 1 in N documents (by a hash of the text) for evaluation
    eval_source: str | None = None  # a separate evaluation source instead of the held-out split
    num_workers: int = 0  # DataLoader worker processes per rank
    # How ranks share the stream. "micro_batch": every rank reads the same stream and rank r
    # takes micro-batches r, r+W, ...: a run (and its checkpoints) is the same for any process
    # count. "document": each rank reads and tokenizes only its own part of the source (W
    # times less work per rank); its position resumes only on the same process count.
    # "auto": document on several GPUs (8 H200s eat more tokens than one rank's tokenizer
    # makes), micro_batch otherwise.
    rank_split: str = "auto"
    tokenize_batch: int = 64  # documents per call to the fast tokenizer
    # Weighted sources instead of `source` (see smoltrain/data/mixture.py): sequences are drawn
    # in a fixed interleave whose shares are the weights; each source has its own epochs.
    mixture: list[MixtureEntry] = field(default_factory=list)
    # Mixtures by training step (annealing, continued pre-training): stage i runs until
    # its until_step, then stage i+1's mixture takes over.
    stages: list[Stage] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.mode not in ("pack", "pad"):
            raise ValueError(f"data.mode must be 'pack' or 'pad', got '{self.mode}'")
        if self.format not in ("text", "chat"):
            raise ValueError(f"data.format must be 'text' or 'chat', got '{self.format}'")
        if self.long_conversations not in ("truncate", "drop"):
            raise ValueError(
                f"data.long_conversations must be 'truncate' or 'drop', got '{self.long_conversations}'"
            )
        if self.txt_documents not in ("file", "paragraph"):
            raise ValueError(f"data.txt_documents must be 'file' or 'paragraph', got '{self.txt_documents}'")
        if self.context_length < 2:
            raise ValueError(f"data.context_length must be >= 2, got {self.context_length}")
        if self.rank_split not in ("auto", "micro_batch", "document"):
            raise ValueError(
                f"data.rank_split must be 'auto', 'micro_batch' or 'document', got '{self.rank_split}'"
            )
        if self.holdout_every < 2:
            raise ValueError(
                f"data.holdout_every must be >= 2 (1 in N documents held out), got {self.holdout_every}"
            )

        if self.mixture and self.stages:
            raise ValueError(
                "give data.mixture or data.stages (each stage has its own mixture), not both; with "
                "data.stages, set data.mixture=[] (a resumed run keeps its checkpoint's mixture otherwise)"
            )
        for where, mixture in [("data.mixture", self.mixture)] + [
            (f"data.stages[{i}].mixture", s.mixture) for i, s in enumerate(self.stages)
        ]:
            if where != "data.mixture" and not mixture:
                raise ValueError(f"{where} is empty; give each stage at least one source")
            for entry in mixture:
                if not (entry.weight > 0 and math.isfinite(entry.weight)):
                    raise ValueError(
                        f"{where}: the weight of '{entry.source}' must be a finite number above 0, "
                        f"got {entry.weight}"
                    )
            specs = [e.source for e in mixture]
            if len(set(specs)) != len(specs):
                raise ValueError(
                    f"{where} names a source twice ({specs}); give each once, with its total weight"
                )
        untils = [s.until_step for s in self.stages[:-1]]
        if any(u is None for u in untils):
            raise ValueError("data.stages: every stage but the last needs an until_step")
        if any(u < 1 for u in untils) or untils != sorted(set(untils)):
            raise ValueError(
                f"data.stages: until_step must be at least 1 and increase from stage to stage, got {untils}"
            )

    @property
    def masks_documents(self) -> bool:
        """Whether packed blocks keep attention within each document (always for conversations)."""
        return self.document_mask or self.format == "chat"

    def source_for(self, split: str) -> str:
        """The source a split reads: eval_source for "eval" when set, else the source."""
        return self.eval_source if split == "eval" and self.eval_source else self.source
