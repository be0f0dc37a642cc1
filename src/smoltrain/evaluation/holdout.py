"""Held-out loss (and bits per byte) over the held-out split, and the monitoring sample."""

from __future__ import annotations

import dataclasses
import itertools
import math

import torch

from smoltrain.data.config import DataConfig
from smoltrain.data.loader import build_loader
from smoltrain.device import autocast, to_device
from smoltrain.generate import generate
from smoltrain.model.model import CustomLLM
from smoltrain.tokenizer import encode_prompt, stop_token_ids


def held_out_batches(
    data: DataConfig, tokenizer, accelerator, micro_batch_size: int, batches: int
) -> list[tuple[dict, int]]:
    """This rank's share of the first `batches` batches of the held-out split, with the
    UTF-8 bytes of each batch's predicted tokens: read once per run and kept on the host
    (at most batches / ranks x micro_batch_size x context_length token ids per rank),
    since finding them re-reads the source (a hub stream: ~190k documents for 1 in 200)."""
    data = dataclasses.replace(data, num_workers=0, shuffle_buffer=0)
    world, rank = accelerator.num_processes, accelerator.process_index
    loader = build_loader(data, tokenizer, micro_batch_size, "eval", rank, world)
    kept = []
    for batch in itertools.islice(loader, -(-batches // world)):
        predicted = [row[row != -100].tolist() for row in batch["labels"][:, 1:]]
        kept.append((batch, sum(len(tokenizer.decode(row).encode("utf-8")) for row in predicted)))
    return kept


@torch.no_grad()
def evaluate(
    model,
    accelerator,
    held_out: list[tuple[dict, int]],
    batches: int,
    fsdp: bool = False,
    precision: str = "fp32",
) -> tuple[float, float]:
    """Mean token loss over the held-out batches (`held_out_batches`), dealt out to the ranks
    and summed over all of them before dividing, and the same loss in bits per UTF-8 byte of
    the predicted text (comparable across tokenizers). Every rank runs the same number of
    forwards, ceil(`batches` / ranks) (a rank whose share ran out repeats a batch with weight
    0), since a sharded model gathers its weights collectively in each forward."""
    model = model if fsdp else accelerator.unwrap_model(model)
    model.eval()
    # loss sum, token and byte counts in fp32: MPS has no float64 (2^24 are counted exactly)
    total = torch.zeros(3, device=accelerator.device, dtype=torch.float32)
    batch = None
    for i in range(-(-batches // accelerator.num_processes) if held_out else 0):
        fresh, n_bytes = held_out[i] if i < len(held_out) else (None, 0)
        weight = 1.0 if fresh is not None else 0.0
        batch = to_device(fresh, accelerator.device) if fresh is not None else batch
        with autocast(accelerator.device.type, precision):
            loss = model(**batch, return_logits=False).loss
        n = (batch["labels"][:, 1:] != -100).sum() * weight
        total += torch.stack(
            [loss.float() * n, n.float(), n.new_tensor(n_bytes * weight, dtype=torch.float32)]
        )
    total = accelerator.reduce(total, reduction="sum")
    model.train()
    loss_sum, tokens, n_bytes = total.tolist()
    return loss_sum / max(tokens, 1), loss_sum / math.log(2) / max(n_bytes, 1)


@torch.no_grad()
def sample(
    model: CustomLLM,
    tokenizer,
    prompt: str,
    tokens: int,
    temperature: float,
    top_k: int | None,
    seed: int,
    chat: bool = False,
) -> str:
    """A continuation of the monitoring prompt (the reference prints one every 500 steps),
    sampled with a fixed seed so that samples of different steps are comparable; greedy
    where `temperature` <= 0. `chat`: the prompt is a user's turn in the chat template and
    the sample is the reply, up to its end of turn."""
    was_training = model.training
    model.eval()
    ids = encode_prompt(tokenizer, prompt, chat).to(model.device)
    greedy = temperature <= 0
    out = generate(
        model,
        ids,
        max_new_tokens=tokens,
        do_sample=not greedy,
        temperature=1.0 if greedy else temperature,
        top_k=top_k,
        repetition_penalty=1.2,
        eos_token_id=stop_token_ids(model.config.eos_token_id, tokenizer, chat=True) if chat else None,
        seed=seed,
    )
    model.train(was_training)
    reply = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    return f"user: {prompt}\nassistant: {reply}" if chat else prompt + reply
