"""Chat data: the assistant's tokens (the only ones trained on) for any template, and
conversations packed without seeing each other."""

import itertools
import json
import re

import pytest
import torch

from smoltrain.data.chat import conversation_key, render_conversation
from smoltrain.data.config import DataConfig
from smoltrain.data.loader import build_loader
from smoltrain.data.sources import is_eval_document
from smoltrain.model import CustomLLM
from smoltrain.tokenizer import chat_template
from tests.conftest import micro_config

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"}],
    [  # a system message, several turns, an empty assistant turn, unicode, a leading space
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Couleur du ciel ? 空"},
        {"role": "assistant", "content": "Bleu ✓"},
        {"role": "user", "content": "And now?"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "Last one"},
        {"role": "assistant", "content": " spaced\nout\n"},
    ],
]

# ChatML (SmolLM2's, without its default system prompt) with generation markers
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# A template of another shape than ChatML (role tags, the EOS token closing a turn, no separator
# between turns), with generation markers.
TAGGED = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' }}"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + eos_token }}{% endgeneration %}"
    "{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def without_markers(template: str) -> str:
    return re.sub(r"{%-?\s*(end)?generation\s*-?%}", "", template)


@pytest.mark.parametrize("template", [CHATML, TAGGED], ids=["chatml", "tagged"])
@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["one-turn", "multi-turn"])
def test_assistant_tokens_equal_transformers_mask(smollm2_tokenizer, template, messages):
    """Rendering prefixes (for templates without markers) finds exactly the tokens that
    transformers' generation markers find: the content and its end-of-turn token."""
    theirs = smollm2_tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, trained = render_conversation(smollm2_tokenizer, without_markers(template), messages)
    assert ids == list(theirs["input_ids"])
    assert trained == [bool(m) for m in theirs["assistant_masks"]]
    assert render_conversation(smollm2_tokenizer, template, messages) == (ids, trained)
    spans = smollm2_tokenizer.decode([t for t, keep in zip(ids, trained, strict=True) if keep])
    turns = [m["content"] for m in messages if m["role"] == "assistant"]
    assert spans == "".join(t + smollm2_tokenizer.eos_token for t in turns)


def test_smollm2_template_trains_on_replies_only(smollm2_tokenizer):
    """SmolLM2's own template (no markers, a default system prompt added): the replies and
    their <|im_end|>, never the role header, the system prompt or the user's words."""
    template = chat_template(smollm2_tokenizer)
    assert "{% generation %}" not in template
    ids, trained = render_conversation(smollm2_tokenizer, template, CONVERSATIONS[0])
    assert "You are a helpful AI assistant" in smollm2_tokenizer.decode(ids)
    kept = smollm2_tokenizer.decode([t for t, keep in zip(ids, trained, strict=True) if keep])
    assert kept == "Hello! How can I help?<|im_end|>"
    assert render_conversation(smollm2_tokenizer, template, [{"role": "user", "content": "x"}]) is None


def test_a_template_that_refuses_a_role_is_named(smollm2_tokenizer):
    strict = (
        "{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
        "{{ raise_exception('Only user and assistant roles are supported') }}{% endif %}"
        "{{ m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}"
    )
    messages = [{"role": "tool", "content": "42"}, {"role": "assistant", "content": "ok"}]
    with pytest.raises(ValueError, match=r"refuses a conversation with the roles \['tool', 'assistant'\]"):
        render_conversation(smollm2_tokenizer, strict, messages)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def chat_rows(n: int) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"question {i}" + " more" * (i % 5)},
                {"role": "assistant", "content": f"answer {i}" + " and" * (i % 3)},
            ]
        }
        for i in range(n)
    ]


def test_packed_blocks_hold_whole_conversations_and_train_on_replies(tmp_path, smollm2_tokenizer):
    rows = chat_rows(30) + [{"prompt": "pairs work too", "completion": "yes"}]
    source = write_jsonl(tmp_path / "chat.jsonl", rows)
    # the whole file as the (one-pass) evaluation split
    cfg = DataConfig(str(source), format="chat", context_length=96, shuffle_buffer=0, eval_source=str(source))
    batches = list(build_loader(cfg, smollm2_tokenizer, 4, split="eval"))
    template = chat_template(smollm2_tokenizer)
    wanted = []
    for row in rows:
        messages = row.get("messages") or [
            {"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": row["completion"]},
        ]
        wanted.append(render_conversation(smollm2_tokenizer, template, messages))
    seen = []
    for batch in batches:
        assert "document_ids" in batch  # chat packing always masks documents
        for ids, labels, docs, pos in zip(
            batch["input_ids"], batch["labels"], batch["document_ids"], batch["position_ids"], strict=True
        ):
            for d in docs.unique().tolist():
                at = docs == d
                if d < 0 or (labels[at] == -100).all():
                    continue  # the padded tail, or the filler that closed a block
                assert pos[at].tolist() == list(range(int(at.sum())))  # positions restart per conversation
                seen.append((ids[at].tolist(), (labels[at] != -100).tolist()))
                assert (labels[at][labels[at] != -100] == ids[at][labels[at] != -100]).all()
    assert seen == wanted  # every conversation whole, in order, trained on its reply only


def test_long_conversations_are_cut_or_dropped_and_counted(tmp_path, smollm2_tokenizer, caplog):
    long = {
        "messages": [{"role": "user", "content": "tell me"}, {"role": "assistant", "content": "la " * 200}]
    }
    silent = {"messages": [{"role": "user", "content": "anyone?"}]}
    source = write_jsonl(tmp_path / "chat.jsonl", [long, silent] + chat_rows(3))
    for how, blocks in [("truncate", 4), ("drop", 3)]:
        cfg = DataConfig(
            str(source),
            format="chat",
            mode="pad",
            context_length=64,
            long_conversations=how,
            eval_source=str(source),
        )
        with caplog.at_level("WARNING"):
            caplog.clear()
            rows = [
                len(r) for b in build_loader(cfg, smollm2_tokenizer, 1, split="eval") for r in b["input_ids"]
            ]
        assert len(rows) == blocks and max(rows) <= 64
        said = caplog.text
        assert "1 conversations had no assistant turn and were skipped" in said
        done = "cut to it" if how == "truncate" else "left out"
        assert f"1 conversations were longer than data.context_length=64 and {done}" in said


def test_packed_conversations_do_not_see_each_other(sdpa_calls):
    """Each conversation's logits in a packed block equal its logits alone (the dense path)."""
    torch.manual_seed(0)
    model = CustomLLM(micro_config()).eval()
    lengths = [5, 9, 3, 7]
    pieces = [torch.randint(0, 256, (n,)) for n in lengths]
    ids = torch.cat(pieces)[None]
    document_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        packed = model(ids, position_ids=position_ids, document_ids=document_ids).logits[0]
        alone = torch.cat([model(p[None]).logits[0] for p in pieces])
        unmasked = model(ids, position_ids=position_ids).logits[0]
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(unmasked, alone, atol=1e-3)  # without the mask they would see each other
    assert any(mask is not None for _, _, mask in sdpa_calls)


def test_rows_without_conversations_are_refused(tmp_path, smollm2_tokenizer):
    source = write_jsonl(tmp_path / "plain.jsonl", [{"text": "not a chat"}])
    cfg = DataConfig(str(source), format="chat")
    with pytest.raises(ValueError, match=r"has no 'messages' column .* its columns are \['text'\]"):
        build_loader(cfg, smollm2_tokenizer, 1)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "text": "no content key"}]}])
    with pytest.raises(ValueError, match="not a list of messages with a text 'role' and 'content'"):
        next(iter(build_loader(DataConfig(str(bad), format="chat"), smollm2_tokenizer, 1)))


def test_prepared_chat_shards_carry_the_loss_mask(tmp_path, smollm2_tokenizer):
    """`smoltrain prepare --format chat`: the shards hold each conversation's tokens and the
    mask of its reply; training reads them packed whole, trained on the replies only."""
    import subprocess
    import sys

    rows = chat_rows(40) + [{"messages": [{"role": "user", "content": "no reply"}]}]
    source = write_jsonl(tmp_path / "chat.jsonl", rows)
    out = tmp_path / "prepared"
    prepared = subprocess.run(
        [
            sys.executable,
            "-m",
            "smoltrain",
            "prepare",
            str(source),
            str(out),
            "--format",
            "chat",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert prepared.returncode == 0, prepared.stderr
    assert "left out 1 conversations with no assistant turn" in prepared.stdout
    template = chat_template(smollm2_tokenizer)
    held_out = DataConfig().holdout_every  # prepare's default split
    wanted = [
        render_conversation(smollm2_tokenizer, template, r["messages"])
        for r in rows[:40]
        if not is_eval_document(conversation_key(r["messages"]), held_out)
    ]
    cfg = DataConfig(str(out), format="chat", context_length=96, shuffle_buffer=0)
    seen = []
    for batch in itertools.islice(build_loader(cfg, smollm2_tokenizer, 2), 10):
        for ids, labels, docs in zip(batch["input_ids"], batch["labels"], batch["document_ids"], strict=True):
            for d in docs.unique().tolist():
                at = docs == d
                if d >= 0:
                    seen.append((ids[at].tolist(), (labels[at] != -100).tolist()))
    assert seen[: len(wanted)] == wanted  # in order, whole, the replies trained on, then the next epoch
    with pytest.raises(ValueError, match="was prepared as chat data .* set data.format=chat"):
        build_loader(DataConfig(str(out), context_length=96), smollm2_tokenizer, 2)
