"""Chat data: a row's conversation (`messages`, or `prompt`/`completion`) -> its token ids
and the mask of the assistant's tokens, the only ones the loss is taken on.

The assistant's tokens are found in a way that holds for any chat template: by its
`{% generation %}` markers where it has them (transformers' `return_assistant_tokens_mask`),
else by rendering each assistant turn's prefix with and without the turn and taking the
difference: the turn's content and its end-of-turn token (`<|im_end|>` in ChatML), not the
role header before it nor the separator after it.
"""

from __future__ import annotations

import json
import re
from typing import Any

# Columns a chat row may hold its conversation in (the hub's chat sets and TRL's formats).
MESSAGES = "messages"
PROMPT, COMPLETION = "prompt", "completion"

_GENERATION_MARKER = re.compile(r"{%-?\s*generation\s*-?%}")


def conversation_columns(columns: list[str], source: str) -> list[str]:
    """The columns a chat source's conversations are read from, or a clear error."""
    pairs = [PROMPT, COMPLETION] if PROMPT in columns and COMPLETION in columns else []
    if MESSAGES in columns or pairs:
        return [MESSAGES] * (MESSAGES in columns) + pairs
    raise ValueError(
        f"data source '{source}' has no '{MESSAGES}' column (nor '{PROMPT}' and '{COMPLETION}'); its "
        f"columns are {columns}: chat data (data.format=chat) needs rows such as "
        '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}, '
        "or set data.format=text for plain documents"
    )


def _turns(value: Any, role: str) -> list[dict[str, str]]:
    # a prompt or completion: plain text (one turn of `role`) or a list of messages
    return [{"role": role, "content": value}] if isinstance(value, str) else value


def conversation(row: dict[str, Any], source: str) -> list[dict[str, str]]:
    """A row's conversation as a list of {"role", "content"} messages, checked."""
    if row.get(MESSAGES) is not None or PROMPT not in row:
        messages = row.get(MESSAGES)
    else:
        prompt, completion = _turns(row[PROMPT], "user"), _turns(row[COMPLETION], "assistant")
        both_lists = isinstance(prompt, list) and isinstance(completion, list)
        messages = prompt + completion if both_lists else [prompt, completion]
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages
    ):
        raise ValueError(
            f"data source '{source}' has a conversation that is not a list of messages with a text "
            f"'role' and 'content' ({json.dumps(messages, ensure_ascii=False, default=str)[:80]}); "
            'each message must look like {"role": "user", "content": "..."}'
        )
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def conversation_key(messages: list[dict[str, str]]) -> str:
    """The text the held-out split hashes: the conversation, serialized the same way everywhere."""
    return json.dumps(messages, ensure_ascii=False, sort_keys=True)


def _render(tokenizer, template: str, messages: list[dict[str, str]], **kwargs) -> str:
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, **kwargs)
    except TemplateError as e:
        roles = [m["role"] for m in messages]
        raise ValueError(
            f"the chat template refuses a conversation with the roles {roles}: {e}. Fix those rows "
            "(most templates take system, user and assistant), or give a tokenizer whose template "
            "takes them"
        ) from None


def assistant_spans(
    tokenizer, template: str, messages: list[dict[str, str]]
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns, by rendering
    each turn's prefix: [end of the prefix with the generation prompt, end of the prefix with
    the turn). A template that renders the start of a conversation differently once later
    turns follow cannot be read this way: it needs generation markers."""
    full = _render(tokenizer, template, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = _render(tokenizer, template, messages[:i], add_generation_prompt=True)
        end = _render(tokenizer, template, messages[: i + 1])
        if not (end.startswith(start) and full.startswith(end)):
            raise ValueError(
                "the chat template renders a conversation's start differently once later turns "
                "follow, so its assistant turns cannot be found by rendering prefixes; give the "
                "tokenizer a template with {% generation %} markers around the assistant's text"
            )
        spans.append((len(start), len(end)))
    return full, spans


def render_conversation(
    tokenizer, template: str, messages: list[dict[str, str]]
) -> tuple[list[int], list[bool]] | None:
    """Token ids of a conversation in `template` and, per token, whether it is the
    assistant's (trained on). None for a conversation with no assistant turn."""
    if not any(m["role"] == "assistant" for m in messages):
        return None
    if _GENERATION_MARKER.search(template):
        out = tokenizer.apply_chat_template(
            messages,
            chat_template=template,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
        )
        return list(out["input_ids"]), [bool(m) for m in out["assistant_masks"]]
    full, spans = assistant_spans(tokenizer, template, messages)
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    specials = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    mask = [False] * len(ids)
    for start, end in spans:
        # the tokens that overlap the span, as transformers marks a generation block's characters
        inside = [j for j, (s, e) in enumerate(offsets) if s < end and e > start]
        # the turn ends at its last special token (<|im_end|>): the separator after it is the template's
        ends = [j for j in inside if ids[j] in specials]
        for j in inside[: inside.index(ends[-1]) + 1] if ends else inside:
            mask[j] = True
    return ids, mask
