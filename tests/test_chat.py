"""`smoltrain chat`: a conversation in the terminal whose history is each reply's context."""

import subprocess
import sys

import pytest

from smoltrain.tokenizer import encode_conversation, fit_conversation


def chat(lines: list[str], *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "smoltrain", "chat", *flags],
        input="".join(line + "\n" for line in lines),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_terminal_chat_keeps_the_history_and_takes_commands():
    """The bundled SmolLM2-135M-Instruct, greedy: the second question only makes sense with the
    first in its context; /undo and /clear take exchanges back."""
    result = chat(
        ["What is the capital of France?", "And of Italy?", "/undo", "/clear", "/exit", "never read"],
        "--max-new-tokens",
        "16",
        "--temperature",
        "0",
    )
    assert result.returncode == 0, result.stderr
    replies = [line for line in result.stdout.splitlines() if line.startswith("assistant> ")]
    assert len(replies) == 2 and "Paris" in replies[0]
    assert "Rome" in replies[1]  # "And of Italy?" read with the first exchange before it
    assert "[1 exchange(s) kept]" in result.stderr and "[0 exchange(s) kept]" in result.stderr
    assert "never read" not in result.stdout  # /exit ends the chat


def test_the_terminal_chat_runs_quantized():
    flags = ["--max-new-tokens", "12", "--temperature", "0", "--quantize", "int4"]  # greedy
    result = chat(["What is the capital of France?"], *flags)
    assert result.returncode == 0, result.stderr
    assert "Paris" in next(line for line in result.stdout.splitlines() if line.startswith("assistant> "))


def test_the_oldest_exchanges_give_way_to_the_context(smollm2_tokenizer):
    system = {"role": "system", "content": "Be brief."}
    turns = []
    for i in range(6):
        turns += [
            {"role": "user", "content": f"question {i} " * 5},
            {"role": "assistant", "content": f"answer {i}"},
        ]
    messages = [system, *turns, {"role": "user", "content": "last"}]
    whole = encode_conversation(smollm2_tokenizer, messages).shape[-1]
    ids, dropped = fit_conversation(smollm2_tokenizer, messages, whole - 1)
    assert dropped == 2 and ids.shape[-1] < whole  # the first exchange went, the system prompt stayed
    assert smollm2_tokenizer.decode(ids[0]).count("Be brief.") == 1
    assert fit_conversation(smollm2_tokenizer, messages, whole)[1] == 0
    with pytest.raises(ValueError, match="the last message alone takes more than the 10 tokens"):
        fit_conversation(smollm2_tokenizer, messages, 10)


def test_chat_refuses_a_reply_of_no_tokens():
    result = chat([], "--max-new-tokens", "0")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "--max-new-tokens must be at least 1, got 0" in result.stderr
