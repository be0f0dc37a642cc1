"""The web app, driven as a person would: a real headless Chromium against `smoltrain serve`."""

import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest

from smoltrain.app import CHAT, CONTINUE, stream_chat_reply, stream_reply

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
GREEDY = dict(max_new_tokens=24, temperature=0.0, top_k=50, top_p=1.0, repetition_penalty=1.1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(*flags: str):
    """`smoltrain serve` of the bundled model on a free port: (its url, its output so far)."""
    port = free_port()
    command = [sys.executable, "-m", "smoltrain", "serve", "--model", "smollm2", "--port", str(port)]
    proc = subprocess.Popen(
        [*command, "--device", "cpu", *flags], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(proc.stdout.read()) from None
            time.sleep(0.5)
    log: list[str] = []  # the server's output, read as it comes (a full pipe would stall it)
    reader = threading.Thread(target=lambda: log.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        yield url, log
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server():
    with serving() as served:
        yield served


def expected(smollm2, tokenizer, prompt: str, mode: str, **settings) -> str:
    model, _ = smollm2
    *_, (text, _stats) = stream_reply(model, tokenizer, prompt, mode, **settings)
    return text


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it: apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        yield browser
        browser.close()


def test_page_streams_the_greedy_continuation(server, browser, smollm2, smollm2_tokenizer, tmp_path):
    url, _ = server
    prompt = "Gravity is"
    want = expected(smollm2, smollm2_tokenizer, prompt, CONTINUE, **{**GREEDY, "max_new_tokens": 128})
    page = browser.new_page()
    page.goto(url)
    page.get_by_role("tab", name="Text").click()  # the page opens on the chat
    page.get_by_label(CONTINUE).check()
    page.locator("#prompt textarea").fill(prompt)
    assert "134,515,008 parameters" in page.locator("#model-info").inner_text()
    page.locator("#generate").click()
    output = page.locator("#output textarea")
    seen, deadline = [], time.time() + 120
    while time.time() < deadline:
        seen.append(output.input_value())
        if "tokens/s" in page.locator("#stats").inner_text():
            break
        time.sleep(0.1)
    final = output.input_value()
    page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
    lengths = [len(s) for s in seen]
    assert lengths == sorted(lengths)  # the text only grows
    assert len({n for n in lengths if 0 < n < len(final)}) >= 3  # ...and arrives in pieces
    assert final == want
    assert (tmp_path / "app.png").stat().st_size > 10_000


def test_empty_prompt_shows_a_message_and_logs_one_line(server, browser):
    url, log = server
    page = browser.new_page()
    page.goto(url)
    page.get_by_role("tab", name="Text").click()
    page.locator("#generate").click()
    page.get_by_text("Enter a prompt first.").first.wait_for(timeout=30_000)
    time.sleep(0.5)
    assert "rejected a request: Enter a prompt first.\n" in log
    assert not any("Traceback" in line for line in log), "".join(log)


def replies_shown(page, n: int, timeout: float = 120) -> list[str]:
    """The assistant's messages in the page's conversation once the n-th reply is complete."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        replies = page.locator("#conversation [data-testid='bot']").all_inner_texts()
        if len(replies) >= n and "tokens/s" in page.locator("#chat-stats").inner_text():
            return replies
        time.sleep(0.2)
    raise AssertionError(f"no reply {n} within {timeout}s; the page shows {replies}")


def test_a_multi_turn_chat_in_the_page(server, browser, smollm2, smollm2_tokenizer, tmp_path):
    """Two questions, the second only clear with the first: each reply is the model's greedy
    reply to the whole conversation after the system prompt; undo and clear."""
    url, _ = server
    model, _ = smollm2
    system = "You are a geography teacher. Answer in one sentence."
    page = browser.new_page()
    page.goto(url)
    page.locator("#system textarea").fill(system)
    history = []
    for n, question in enumerate(["What is the capital of France?", "And of Italy?"], start=1):
        page_settings = {**GREEDY, "max_new_tokens": 128}  # the page's defaults
        *_, (want, _) = stream_chat_reply(
            model, smollm2_tokenizer, history, question, system, **page_settings
        )
        box = page.locator("#message textarea")
        box.fill(question)
        page.locator("#send").click() if n == 1 else box.press("Enter")
        assert replies_shown(page, n)[-1] == want.strip()
        history += [{"role": "user", "content": question}, {"role": "assistant", "content": want}]
    assert "Rome" in history[-1]["content"]  # the second question was read with the first
    assert box.input_value() == ""  # taken from the box once sent
    page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)
    page.locator("#undo").click()
    page.wait_for_function("document.querySelectorAll(\"#conversation [data-testid='bot']\").length == 1")
    assert box.input_value() == "And of Italy?"  # back in the box, to edit and resend
    page.locator("#clear").click()
    page.wait_for_function("document.querySelectorAll(\"#conversation [data-testid='user']\").length == 0")


def test_four_concurrent_requests_all_answered(server, smollm2, smollm2_tokenizer):
    from gradio_client import Client

    prompts = ["The ocean is", "Python is a language", "My favourite food", "In 1492,"]
    client = Client(server[0], verbose=False)
    args = [GREEDY[k] for k in ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty")]
    with ThreadPoolExecutor(4) as pool:
        jobs = [pool.submit(client.predict, p, CONTINUE, *args, api_name="/generate") for p in prompts]
        answers = [job.result(timeout=300) for job in jobs]
    for prompt, (text, stats) in zip(prompts, answers, strict=True):
        assert text == expected(smollm2, smollm2_tokenizer, prompt, CONTINUE, **GREEDY)
        assert "tokens/s" in stats


def test_serve_quantized_answers_as_the_quantized_model(smollm2_tokenizer):
    from gradio_client import Client

    from smoltrain.formats.model_io import load_model
    from smoltrain.generate import prepare_for_generation

    quantized = prepare_for_generation(load_model("smollm2"), quantize="int4")
    with serving("--quantize", "int4") as (url, _):
        args = [GREEDY[k] for k in ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty")]
        client = Client(url, verbose=False)
        text, stats = client.predict("The ocean is", CONTINUE, *args, api_name="/generate")
    quantized_pair = (quantized, None)
    assert text == expected(quantized_pair, smollm2_tokenizer, "The ocean is", CONTINUE, **GREEDY)
    assert "tokens/s" in stats


def test_bad_requests_get_messages(server):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(server[0], verbose=False)
    with pytest.raises(AppError, match="Enter a prompt first"):
        client.predict("   ", CHAT, 10, 0.0, 50, 1.0, 1.1, api_name="/generate")
    with pytest.raises(AppError, match="reads at most 8,192"):
        client.predict("word " * 9000, CONTINUE, 10, 0.0, 50, 1.0, 1.1, api_name="/generate")
    with pytest.raises(AppError, match="maximum value 2"):
        client.predict("hi", CONTINUE, 10, 5.0, 50, 1.0, 1.1, api_name="/generate")


def test_the_stats_count_the_tokens_generated_not_the_text_retokenized(
    tiny_model, smollm2_tokenizer, monkeypatch
):
    """Re-tokenizing the reply counted 56 "tokens" for a limit of 48 (and overstated
    tokens/s): a generation's own ids are what it generated, special ones included."""
    import torch

    from smoltrain import generate

    words = smollm2_tokenizer(" one two three", add_special_tokens=False)["input_ids"]
    special = smollm2_tokenizer.convert_tokens_to_ids("<|im_start|>")  # prints nothing
    ids = [*words, special, special, *words]
    monkeypatch.setattr(generate, "stream_generate", lambda *a, **k: (torch.tensor([i]) for i in ids))
    *_, (text, stats) = stream_reply(tiny_model, smollm2_tokenizer, "Count", CONTINUE, **GREEDY)
    assert text == " one two three one two three"
    assert stats.startswith(f"{len(ids)} tokens ·"), stats  # re-tokenized: 6
