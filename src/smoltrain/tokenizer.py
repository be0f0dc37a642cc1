"""Tokenizers: the bundled SmolLM2 one by default, or any folder, GGUF file or hub name."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterable
from pathlib import Path

from smoltrain.atomic import publish_folder, staging_path
from smoltrain.formats.model_io import BUNDLED_NAME, cached_conversion, reading_gguf, resolve_checkpoint

log = logging.getLogger(__name__)

# transformers' class for any tokenizer.json (PreTrainedTokenizerFast is its other name): the one
# every tokenizer smoltrain saves names
GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def _from_folder(folder: Path):
    """transformers' tokenizer of a local folder. A folder whose config names the generic class
    (and no code of its own) is loaded by that class: `AutoTokenizer` picks the same class, but
    only after reading the module list of every model transformers knows (1 s a command)."""
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        config = {}
    if config.get("tokenizer_class") in GENERIC_TOKENIZER_CLASSES and "auto_map" not in config:
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(folder)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def _tokenizer_from_hf_json(path: Path):
    """The exact tokenizer of a GGUF that carries its tokenizer.json (GGUF's
    `tokenizer.huggingface.json` key, which smoltrain writes); None for one that does not."""
    from gguf import GGUFReader, Keys
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    with reading_gguf(path):
        fields = GGUFReader(path).fields
    if Keys.Tokenizer.HF_JSON not in fields:
        return None
    tokens = fields[Keys.Tokenizer.LIST].contents()
    specials = {
        name: tokens[fields[key].contents()]
        for name, key in [
            ("bos_token", Keys.Tokenizer.BOS_ID),
            ("eos_token", Keys.Tokenizer.EOS_ID),
            ("unk_token", Keys.Tokenizer.UNK_ID),
            ("pad_token", Keys.Tokenizer.PAD_ID),
        ]
        if key in fields
    }
    template = fields.get(Keys.Tokenizer.CHAT_TEMPLATE)
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(fields[Keys.Tokenizer.HF_JSON].contents()),
        chat_template=template.contents() if template else None,
        **specials,
    )


def _gguf_tokenizer(path: Path):
    """Tokenizer from a GGUF's metadata: its tokenizer.json when it carries one, else
    transformers' rebuild from llama.cpp's keys. Parsing takes seconds, so the result is cached
    on disk, keyed by the file's path, size and mtime."""
    cached = cached_conversion("tokenizers", path)
    if (cached / "tokenizer.json").is_file():
        return _from_folder(cached)
    tokenizer = _tokenizer_from_hf_json(path)
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tmp = staging_path(cached)
    tokenizer.save_pretrained(tmp)
    publish_folder(tmp, cached)
    return tokenizer


def load_tokenizer(spec: str | Path = BUNDLED_NAME):
    """`smollm2` (the tokenizer inside the bundled GGUF), a model or tokenizer folder, a
    `.gguf` file, or a hub name. Returns a transformers fast tokenizer."""
    path = Path(spec).expanduser()
    if path.is_dir() and any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return _from_folder(path)
    resolved = resolve_checkpoint(spec)
    if resolved.suffix == ".gguf":
        return _gguf_tokenizer(resolved)
    if not any((resolved / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise FileNotFoundError(
            f"{resolved} has no tokenizer files (tokenizer.json); pass `--tokenizer smollm2` "
            "or a folder that has them"
        )
    return _from_folder(resolved)


def check_tokenizer_fits(vocab_size: int, tokenizer) -> None:
    """A tokenizer with ids beyond the model's embedding table would crash mid-forward."""
    if len(tokenizer) > vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer):,} tokens but the model's vocabulary is "
            f"{vocab_size:,}; pass the tokenizer the model was trained with (--tokenizer)"
        )


def own_tokenizer_source(model_spec: str | Path) -> Path | None:
    """Where a model keeps its own tokenizer: its .gguf file or its folder's tokenizer.json;
    None when it has none."""
    path = resolve_checkpoint(model_spec)
    return path if path.suffix == ".gguf" or (path / "tokenizer.json").is_file() else None


def tokenizer_for(model_spec: str | Path, tokenizer_spec: str | Path | None = None):
    """The tokenizer to use with a model: the one asked for, else the model's own, else smollm2."""
    return load_tokenizer(tokenizer_spec or own_tokenizer_source(model_spec) or BUNDLED_NAME)


def chat_template(tokenizer) -> str:
    """The tokenizer's chat template, or SmolLM2's ChatML (with a one-line note) when it has none."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one
        template = template.get("default") or next(iter(template.values()))
    if template:
        return template
    _note_chatml()
    return CHAT_TEMPLATE


@functools.cache
def _note_chatml() -> None:  # once per process
    log.warning("the tokenizer has no chat template: conversations are rendered in ChatML")


def encode_prompt(tokenizer, prompt: str, chat: bool = False):
    """Token ids (1, T) of a prompt, wrapped in the chat template as a user's turn when `chat`."""
    if not chat:
        return tokenizer(prompt, return_tensors="pt")["input_ids"]
    messages = [{"role": "user", "content": prompt}]
    return encode_conversation(tokenizer, messages)


def encode_conversation(tokenizer, messages: list[dict[str, str]]):
    """Token ids (1, T) of a conversation in the chat template, ready for the assistant's reply."""
    ids = tokenizer.apply_chat_template(
        messages, chat_template=chat_template(tokenizer), add_generation_prompt=True, return_tensors="pt"
    )
    return ids if not hasattr(ids, "keys") else ids["input_ids"]  # a tensor or a BatchEncoding


def prompt_budget(context: int, max_new_tokens: int) -> int:
    """The tokens a conversation may take before a reply: the context less the reply's room,
    which is at most half of it (a long reply limit must not starve the history)."""
    return context - min(int(max_new_tokens), context // 2)


def fit_conversation(tokenizer, messages: list[dict[str, str]], max_tokens: int):
    """Token ids (1, T) of the conversation's latest part that fits in `max_tokens`: its
    oldest exchanges left out first (a system message stays), and how many messages were
    left out. Raises ValueError when even the last message alone does not fit."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system) :]
    for start in range(len(turns)):
        if start and turns[start]["role"] != "user":
            continue  # a conversation resumes at a user's message
        ids = encode_conversation(tokenizer, system + turns[start:])
        if ids.shape[-1] <= max_tokens:
            return ids, start
    raise ValueError(
        f"the last message alone takes more than the {max_tokens:,} tokens the model can read "
        "before its reply; shorten it"
    )


def stop_token_ids(model_eos: int | None, tokenizer, chat: bool = False) -> list[int]:
    """Generation stops at the model's EOS and at the tokenizer's (they can differ), and in a
    chat at the token that ends a turn in the chat template (<|im_end|> in ChatML)."""
    ends = {model_eos, tokenizer.eos_token_id} | ({end_of_turn_id(tokenizer)} if chat else set())
    return sorted(t for t in ends if t is not None)


def end_of_turn_id(tokenizer) -> int | None:
    """The special token the chat template closes an assistant's turn with, if any: the first
    one it renders after a reply's text."""
    reply = "Fine, thanks."
    messages = [{"role": "user", "content": "How are you?"}, {"role": "assistant", "content": reply}]
    text = tokenizer.apply_chat_template(messages, chat_template=chat_template(tokenizer), tokenize=False)
    after = tokenizer(text[text.rindex(reply) + len(reply) :], add_special_tokens=False)["input_ids"]
    specials = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    return next((t for t in after if t in specials), None)


# SmolLM2's first three tokens, at its ids: a trained tokenizer keeps the presets' bos/eos (0).
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# SmolLM2's ChatML template, without its default system prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def train_tokenizer(
    documents: Iterable[str], vocab_size: int, min_frequency: int = 2, chat_template: bool = False
):
    """A byte-level BPE tokenizer of SmolLM2's kind, learned from `documents` with the
    `tokenizers` library: digits split one by one, then GPT-2's byte-level pre-tokenizer (no
    unknown token: any text encodes), SmolLM2's special tokens first. Returns a transformers
    fast tokenizer; deterministic for the same documents in the same order."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    smallest = len(SPECIAL_TOKENS) + 256  # the specials and the 256 bytes
    if vocab_size <= smallest:
        raise ValueError(
            f"--vocab-size {vocab_size} leaves no room for merges: the {len(SPECIAL_TOKENS)} special "
            f"tokens and the 256 bytes take {smallest}; use a few thousand or more (SmolLM2: 49152)"
        )
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(documents, trainer=trainer)
    end = SPECIAL_TOKENS[0]
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=end,
        eos_token=end,
        unk_token=end,
        chat_template=CHAT_TEMPLATE if chat_template else None,
    )
