"""Linear + cross-entropy that never builds the whole (tokens x vocab) logits tensor.

With SmolLM2's 49,152-word vocabulary the logits of a 4 x 256 micro-batch are 200 MB in fp32,
and for a small model materializing and reducing them costs more than all its layers. Here
the loss is computed a chunk of tokens at a time and the gradients of hidden states and head
weight are produced in the same pass (the idea of Liger-Kernel's fused linear cross-entropy),
so backward is two multiplications and no logits are kept.
"""

from __future__ import annotations

import torch

from smoltrain.model.kernels.softmax import softmax_in_place
from smoltrain.model.model import IGNORE_INDEX, LMHead


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size, compute_dtype):
        # hidden (N, H), weight (V, H), labels (N,)
        need_grad_hidden, need_grad_weight = ctx.needs_input_grad[:2]
        valid_all = labels != IGNORE_INDEX
        n_valid = valid_all.sum().clamp(min=1)
        # fp16's range: gradients scaled by 1 / n_valid before the loss scale multiplies them
        # (in backward) would underflow, so under fp16 the matmuls' products are summed in fp32
        # and the mean's factor is applied there; bf16 and fp32 have fp32's range.
        fp32_grads = compute_dtype == torch.float16
        grad_dtype = torch.float32 if fp32_grads else compute_dtype
        # Each token's gradient is scaled by 1 / n_valid (the mean) and zeroed where ignored;
        # both are folded into a per-token factor on the (n, H) side, so neither costs a pass
        # over the (V, H) or (n, V) buffers. Under fp16 the (n, H) side is only masked (0 or 1).
        token_scale = (valid_all / n_valid)[:, None]  # (N, 1), fp32
        side_scale = (valid_all[:, None] if fp32_grads else token_scale).to(compute_dtype)
        read_freely = host_reads_are_free(hidden.device)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = (
            torch.empty_like(hidden, dtype=_wider(hidden.dtype, grad_dtype)) if need_grad_hidden else None
        )
        # the head's gradient, summed over chunks inside the matmuls (addmm) or, under fp16, in
        # fp32; cast to the weight's dtype once, in backward
        grad_weight = None
        w = weight.to(compute_dtype)
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start : start + chunk_size].to(compute_dtype)  # (n, H)
            y = labels[start : start + chunk_size]  # (n,)
            valid = valid_all[start : start + chunk_size]
            y_safe = torch.where(valid, y, 0)
            logits = (h @ w.T).float()  # (n, V)
            rows = torch.arange(len(y), device=y.device)
            if not read_freely:  # kept for the exact loss of rows whose p(target) underflows
                logit_max = logits.amax(-1)
                logit_target = logits[rows, y_safe]
            # softmax is one fused pass; it is also d(sum of losses)/d(logits) once the
            # target's 1 is subtracted, so the loss comes from it too: -log p(target).
            probs = softmax_in_place(logits)
            del logits
            p_target = probs[rows, y_safe]
            token_loss = -torch.log(p_target)
            underflow = p_target == 0  # p < 1e-38: those rows' loss exactly
            if not read_freely:
                # log-sum-exp = max - log p(max), and p(max) >= 1 / V never underflows: exact
                # for every row with no host sync (`if underflow.any()` waits for the device)
                exact = logit_max - torch.log(probs.amax(-1)) - logit_target
                token_loss = torch.where(underflow, exact, token_loss)
            elif underflow.any():  # on CPU reading a flag costs nothing: recompute the few rows
                exact = hidden[start : start + chunk_size][underflow].to(compute_dtype) @ w.T
                exact = exact.float()
                token_loss[underflow] = (
                    torch.logsumexp(exact, -1) - exact.gather(1, y_safe[underflow, None])[:, 0]
                )
            loss += torch.where(valid, token_loss, 0.0).sum()
            if grad_hidden is None and not need_grad_weight:
                del probs  # freed before the next chunk's logits, as `grad` is below
                continue
            grad = probs
            del probs
            grad[rows, y_safe] -= 1.0
            grad = grad.to(compute_dtype)
            # Ignored positions pass no gradient: their rows of `grad` are left as they are
            # and scaled by 0 on the (n, H) side (zeroing them in the (n, V) buffer was a
            # full pass over it, 20 ms of a 3.5 s 135M bf16 step).
            scale = side_scale[start : start + chunk_size]
            if grad_hidden is not None:
                part = grad @ w
                part = part.float() * token_scale[start : start + chunk_size] if fp32_grads else part * scale
                grad_hidden[start : start + chunk_size] = part
            if need_grad_weight:
                h = h * scale
                if grad_weight is None:
                    grad_weight = (grad.T @ h).to(grad_dtype)
                elif fp32_grads:
                    grad_weight += grad.T @ h
                else:
                    grad_weight.addmm_(grad.T, h)  # accumulate inside the matmul: no (V x H) temporary
            del grad  # before the next chunk's logits: one (n, V) buffer less at the peak
        if need_grad_weight and grad_weight is None:  # no tokens at all
            grad_weight = torch.zeros(weight.shape, dtype=grad_dtype, device=weight.device)
        elif fp32_grads and need_grad_weight:
            grad_weight /= n_valid
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.dtypes = hidden.dtype, weight.dtype
        return loss / n_valid

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        # Scaled in place unless the graph is kept for another backward: a copy of the
        # (V x H) buffer here, with every activation still alive, raised the step's peak by
        # 113 MB (135M fp32). A plain backward passes 1.0, which needs no pass at all.
        # Under fp16 the saved gradients are fp32: scaled first (by the loss scale, in
        # grad_output), then cast, so the cast cannot underflow them.
        in_place = not _graph_is_kept()
        unit = _is_one(grad_output)
        hidden_dtype, weight_dtype = ctx.dtypes
        if grad_hidden is not None:
            grad_hidden = _scaled(grad_hidden, grad_output, unit, in_place).to(hidden_dtype)
        if grad_weight is not None:
            grad_weight = _scaled(grad_weight, grad_output, unit, in_place).to(weight_dtype)
        return grad_hidden, grad_weight, None, None, None


def _scaled(grad: torch.Tensor, grad_output: torch.Tensor, unit: bool, in_place: bool) -> torch.Tensor:
    """grad * grad_output, in place when allowed. A saved gradient that a kept graph will
    read again is never handed out itself: the caller may write into what it gets."""
    if unit:
        return grad if in_place else grad.clone()
    scale = grad_output.to(grad.dtype)
    return grad.mul_(scale) if in_place else grad * scale


def host_reads_are_free(device: torch.device) -> bool:
    """Whether reading a tensor's value on the host costs nothing: on CPU the value is there;
    on a GPU or MPS it waits for the device's queue to drain (a host sync)."""
    return device.type == "cpu"


def _wider(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    return a if a.itemsize >= b.itemsize else b


def _is_one(t: torch.Tensor) -> bool:
    """Whether the scalar `t` is exactly 1, asked only where that is free: elsewhere the
    answer would wait for the device, so the caller multiplies anyway."""
    return host_reads_are_free(t.device) and t.numel() == 1 and t.item() == 1.0


def _graph_is_kept() -> bool:
    """Whether the running backward keeps the graph (retain_graph or create_graph), so that
    saved tensors may be read again. Asked of autograd's engine; if that private query is
    gone, assume kept (the safe answer: it costs a copy)."""
    query = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if query is None else bool(query())


def default_chunk_size(vocab_size: int, device_type: str) -> int:
    """Tokens per chunk. On CPU, 96 MiB of fp32 logits (512 tokens of a 49k vocabulary):
    the head's matmuls run 15% faster than at 170 tokens and, with
    `smoltrain.perf.keep_freed_memory`, the buffers are reused across chunks instead of
    page-faulted in (bench: 135M bf16 step +20%). GPUs want bigger matmuls still; an Apple
    GPU's memory is the machine's, so its chunks stay smaller."""
    if device_type == "cpu":
        return max(32, (96 << 20) // (4 * vocab_size))
    if device_type == "mps":  # unified memory, shared with the system: 256 MiB, not CUDA's 1 GiB
        return max(64, (256 << 20) // (4 * vocab_size))
    return max(256, (1 << 30) // (4 * vocab_size))


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `labels` (already aligned, -100
    ignored), equal to `F.cross_entropy(logits.float(), labels)` without keeping the logits.
    Honours autocast: the matmuls run in the autocast dtype, the softmax in fp32."""
    device_type = hidden.device.type
    chunk_size = chunk_size or default_chunk_size(weight.shape[0], device_type)
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = hidden.dtype
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, labels, chunk_size, compute_dtype)


class ChunkedLossHead(LMHead):
    """`LMHead` whose loss is `chunked_linear_cross_entropy`: no (tokens x vocab) logits."""

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return chunked_linear_cross_entropy(hidden, self.weight, labels)
