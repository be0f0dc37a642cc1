"""A Gradio app for any model `load_model` reads, streamed token by token through the
KV-cache generator: a multi-turn chat in the model's chat template (a system prompt, undo,
clear) and plain text continuation. `smoltrain serve` runs it locally; `app.py` at the
repository root runs it as a Hugging Face Space."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from smoltrain.device import inference_dtype
from smoltrain.formats.model_io import load_model
from smoltrain.generate import prepare_for_generation, stream_pieces
from smoltrain.model.model import CustomLLM
from smoltrain.tokenizer import (
    check_tokenizer_fits,
    encode_prompt,
    fit_conversation,
    prompt_budget,
    stop_token_ids,
    tokenizer_for,
)

CONTINUE, CHAT = "Continue text", "Chat"


@dataclass
class Limits:
    """Accepted ranges; the sliders show them and requests outside them are refused."""

    max_new_tokens: tuple[int, int] = (1, 1024)
    temperature: tuple[float, float] = (0.0, 2.0)  # 0: greedy
    top_k: tuple[int, int] = (0, 500)  # 0: off
    top_p: tuple[float, float] = (0.01, 1.0)
    repetition_penalty: tuple[float, float] = (1.0, 2.0)


def load_for_serving(
    model_spec: str,
    tokenizer_spec: str | None = None,
    device: str = "cpu",
    compile: bool = False,
    quantize: str | None = None,
):
    weights = load_model(model_spec, dtype=inference_dtype(str(device).split(":")[0]), device=device)
    model = prepare_for_generation(weights, compile=compile, quantize=quantize)
    tokenizer = tokenizer_for(model_spec, tokenizer_spec)
    check_tokenizer_fits(model.config.vocab_size, tokenizer)
    return model, tokenizer


def check_request(
    prompt: str, max_new_tokens, temperature, top_k, top_p, repetition_penalty, limits: Limits
) -> None:
    """Raise ValueError with a message for the page when a request cannot be served."""
    if not prompt or not prompt.strip():
        raise ValueError("Enter a prompt first.")
    values = {
        "max new tokens": (max_new_tokens, limits.max_new_tokens),
        "temperature": (temperature, limits.temperature),
        "top-k": (top_k, limits.top_k),
        "top-p": (top_p, limits.top_p),
        "repetition penalty": (repetition_penalty, limits.repetition_penalty),
    }
    for name, (value, (low, high)) in values.items():
        if value is None or not low <= value <= high:
            raise ValueError(f"{name} must be between {low} and {high}, got {value}.")


def stream_reply(
    model: CustomLLM,
    tokenizer,
    prompt: str,
    mode: str,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    repetition_penalty: float,
    limits: Limits | None = None,
):
    """Yield (text so far, stats line). Errors are ValueErrors with a message for the page."""
    check_request(prompt, max_new_tokens, temperature, top_k, top_p, repetition_penalty, limits or Limits())
    ids = encode_prompt(tokenizer, prompt, chat=mode == CHAT)
    context = model.config.max_position_embeddings
    if ids.shape[1] >= context:
        raise ValueError(
            f"The prompt is {ids.shape[1]:,} tokens; this model reads at most {context:,}. Shorten it."
        )
    eos = stop_token_ids(model.config.eos_token_id, tokenizer, chat=mode == CHAT)
    yield from stream_ids(
        model, tokenizer, ids, eos, max_new_tokens, temperature, top_k, top_p, repetition_penalty
    )


def stream_chat_reply(
    model: CustomLLM,
    tokenizer,
    history: list[dict[str, str]],
    message: str,
    system: str,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    repetition_penalty: float,
    limits: Limits | None = None,
):
    """Yield (reply so far, stats line) to `message` after the conversation `history`, all
    in the chat template after the `system` prompt (none: the template's own); the oldest
    exchanges give way when the conversation outgrows the context."""
    check_request(message, max_new_tokens, temperature, top_k, top_p, repetition_penalty, limits or Limits())
    messages = [{"role": "system", "content": system}] if system and system.strip() else []
    messages += [{"role": m["role"], "content": _text(m["content"])} for m in history]
    messages.append({"role": "user", "content": message})
    context = model.config.max_position_embeddings
    ids, dropped = fit_conversation(tokenizer, messages, prompt_budget(context, max_new_tokens))
    eos = stop_token_ids(model.config.eos_token_id, tokenizer, chat=True)
    note = f" · the {dropped} oldest message(s) no longer fit the context" if dropped else ""
    for text, stats in stream_ids(
        model, tokenizer, ids, eos, max_new_tokens, temperature, top_k, top_p, repetition_penalty
    ):
        yield text, stats + (note if stats else "")


def _text(content) -> str:
    # Gradio's chat messages hold text, or a list of parts ({"type": "text", "text": ...})
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in content)


def stream_ids(model, tokenizer, ids, eos, max_new_tokens, temperature, top_k, top_p, repetition_penalty):
    """Yield (text so far, "") per generated piece, then (text, the stats line)."""
    greedy = temperature == 0
    start = time.perf_counter()
    first = None
    text, new_tokens = "", 0
    for piece in stream_pieces(
        model,
        tokenizer,
        ids,
        max_new_tokens=int(max_new_tokens),
        do_sample=not greedy,
        temperature=1.0 if greedy else float(temperature),
        top_k=int(top_k) or None,
        top_p=float(top_p),
        repetition_penalty=float(repetition_penalty),
        eos_token_id=eos,
    ):
        first = first or time.perf_counter() - start
        new_tokens += 1  # counted as generated: re-tokenizing the text counted 56 for a limit of 48
        if piece:
            text += piece
            yield text, ""
    elapsed = time.perf_counter() - start
    rate = new_tokens / max(elapsed - (first or 0), 1e-9) if new_tokens > 1 else 0.0
    stats = f"{new_tokens} tokens · first token {1000 * (first or 0):.0f} ms · {rate:.1f} tokens/s"
    yield text, stats


def rejected(e: ValueError):
    """The page's message for a request that cannot be served; the server's log gets one
    line, not a traceback."""
    import gradio as gr

    print(f"rejected a request: {e}", file=sys.stderr, flush=True)
    return gr.Error(str(e), print_exception=False)


def undo_last_exchange(history):
    """The conversation without its last exchange, and that exchange's message, back in the
    box to edit."""
    history = list(history or [])
    while history and history[-1]["role"] != "user":
        history.pop()
    message = _text(history.pop()["content"]) if history else ""
    return history, message


def sampling_sliders(limits: Limits) -> list:
    """The sampling settings' sliders, in an accordion: max new tokens, temperature, top-k,
    top-p, repetition penalty (the order `stream_reply` takes them in)."""
    import gradio as gr

    with gr.Accordion("Sampling", open=False):
        return [
            gr.Slider(*limits.max_new_tokens, value=128, step=1, label="Max new tokens"),
            gr.Slider(*limits.temperature, value=0.0, step=0.05, label="Temperature (0: greedy)"),
            gr.Slider(*limits.top_k, value=50, step=1, label="Top-k (0: off)"),
            gr.Slider(*limits.top_p, value=1.0, step=0.01, label="Top-p"),
            gr.Slider(*limits.repetition_penalty, value=1.1, step=0.01, label="Repetition penalty"),
        ]


def build_app(
    model_spec: str = "smollm2",
    tokenizer_spec: str | None = None,
    device: str = "cpu",
    compile: bool = False,
    quantize: str | None = None,
):
    import gradio as gr

    model, tokenizer = load_for_serving(model_spec, tokenizer_spec, device, compile, quantize)
    limits = Limits()
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    name = Path(str(model_spec)).name if model_spec != "smollm2" else "SmolLM2-135M-Instruct (bundled)"

    def respond(prompt, mode, max_new_tokens, temperature, top_k, top_p, repetition_penalty):
        try:
            yield from stream_reply(
                model, tokenizer, prompt, mode, max_new_tokens, temperature, top_k, top_p,
                repetition_penalty, limits,
            )  # fmt: skip
        except ValueError as e:
            raise rejected(e) from None

    def chat(message, history, system, max_new_tokens, temperature, top_k, top_p, repetition_penalty):
        """Streams the reply into the conversation; the message box empties once it is taken."""
        history = list(history or [])
        try:
            replies = stream_chat_reply(
                model,
                tokenizer,
                history,
                message,
                system,
                max_new_tokens,
                temperature,
                top_k,
                top_p,
                repetition_penalty,
                limits,
            )
            asked = [*history, {"role": "user", "content": message}]
            for text, line in replies:
                yield asked + [{"role": "assistant", "content": text}], "", line
        except ValueError as e:
            raise rejected(e) from None

    with gr.Blocks(title=f"smoltrain · {name}") as demo:
        context = model.config.max_position_embeddings
        gr.Markdown(
            f"## {name}\n{model.num_parameters():,} parameters · context {context:,} tokens"
            " · served by smoltrain",
            elem_id="model-info",
        )
        with gr.Tabs(selected="chat-tab" if has_chat else "text-tab"):
            with gr.Tab("Chat", id="chat-tab", elem_id="chat-tab", visible=has_chat):
                system = gr.Textbox(
                    label="System prompt (empty: the template's own)", lines=1, elem_id="system"
                )
                conversation = gr.Chatbot(label="Conversation", elem_id="conversation", height=360)
                message = gr.Textbox(label="Message (Enter sends)", lines=1, max_lines=8, elem_id="message")
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    chat_stop = gr.Button("Stop", elem_id="chat-stop")
                    undo_button = gr.Button("Undo", elem_id="undo")
                    clear = gr.Button("Clear", elem_id="clear")
                chat_stats = gr.Markdown(elem_id="chat-stats")
            with gr.Tab("Text", id="text-tab", elem_id="text-tab"):
                mode = gr.Radio(
                    [CONTINUE, CHAT] if has_chat else [CONTINUE],
                    value=CONTINUE,
                    label="Mode (chat: one question, no history)",
                    elem_id="mode",
                )
                prompt = gr.Textbox(label="Prompt", lines=4, elem_id="prompt")
                with gr.Row():
                    run = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop = gr.Button("Stop", elem_id="stop")
                output = gr.Textbox(label="Output", lines=10, elem_id="output", interactive=False)
                stats = gr.Markdown(elem_id="stats")
        sampling = sampling_sliders(limits)
        inputs = [prompt, mode, *sampling]
        event = run.click(respond, inputs=inputs, outputs=[output, stats], api_name="generate")
        submitted = prompt.submit(respond, inputs=inputs, outputs=[output, stats], api_name=False)
        stop.click(None, cancels=[event, submitted])
        chat_inputs = [message, conversation, system, *sampling]
        chat_outputs = [conversation, message, chat_stats]
        sent = send.click(chat, inputs=chat_inputs, outputs=chat_outputs, api_name="chat")
        entered = message.submit(chat, inputs=chat_inputs, outputs=chat_outputs, api_name=False)
        chat_stop.click(None, cancels=[sent, entered])
        undo_button.click(
            undo_last_exchange, inputs=[conversation], outputs=[conversation, message], api_name=False
        )
        clear.click(lambda: ([], ""), outputs=[conversation, chat_stats], api_name=False)
    # The queue serves requests in order and streams their updates; two at a time share the CPU.
    demo.queue(default_concurrency_limit=2, max_size=64)
    return demo
