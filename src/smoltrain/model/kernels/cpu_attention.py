"""Rotary and causal grouped-query attention for bf16 training on CPU, as batched matmuls.

CPU's bf16 flash kernel behind SDPA runs its small blocks far below the matmul rate (135M,
4 x 256, one layer forward + backward: 17-19 ms; this 10-12 ms). `TrainingAttention` uses it
for causal, unmasked bf16 attention with gradients on CPU, and joins q/k/v into one matmul
under autocast everywhere; every other case (fp32, masks, a cache, GPUs) is the plain
module's SDPA path.
"""

from __future__ import annotations

import functools

import torch

from smoltrain.model.kernels.joined_projection import joined_linear
from smoltrain.model.kernels.softmax import softmax_in_place
from smoltrain.model.model import Attention, KVCache


def rotate_into(
    out: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, transpose: bool = False
) -> torch.Tensor:
    """out = apply_rotary(x, cos, sin) written into `out` (any layout) in three passes, or
    with transpose=True the transposed rotation, which carries a gradient back through it."""
    half = x.shape[-1] // 2
    torch.mul(x, cos, out=out)
    # forward: out1 = x1 c1 - x2 s1, out2 = x2 c2 + x1 s2; transposed: g1 c1 + g2 s2, g2 c2 - g1 s1
    out[..., :half].addcmul_(
        x[..., half:], sin[..., half:] if transpose else sin[..., :half], value=1 if transpose else -1
    )
    out[..., half:].addcmul_(
        x[..., :half], sin[..., :half] if transpose else sin[..., half:], value=-1 if transpose else 1
    )
    return out


@functools.lru_cache(maxsize=8)
def causal_bias(T: int, group: int) -> torch.Tensor:
    """(T * group, T) on CPU: 0 where row (position t, head) may see key s <= t, else -inf."""
    bias = torch.full((T, T), float("-inf"), dtype=torch.bfloat16).triu_(1)
    return bias.repeat_interleave(group, dim=0)


class CPUCausalAttention(torch.autograd.Function):
    """Rotary and causal grouped-query attention for bf16 training on CPU, as batched matmuls.

    q (B, T, nh * hd), k and v (B, T, nkv * hd) as the projections leave them, cos and sin
    (B, 1, T, hd) as `RotaryEmbedding` gives them -> (B, T, nh * hd), ready for o_proj. The
    query heads that share a key/value head are interleaved into one matrix of (position,
    head) rows, rotated on the way in (the copy that layout needs anyway), so each product
    is one matmul per key/value head; the rows go in blocks of `block` positions, each block
    against only the keys it can see (3/4 of the full square at T=256). CPU's bf16 flash
    kernel runs its small blocks far below the matmul rate (135M, 4 x 256, a layer forward +
    backward: 17-19 ms; this 10-12). Scores and probabilities are bf16, as in eager bf16
    attention; the softmax computes in fp32. Backward keeps q, k and v (rotated) and, at
    short contexts, the probabilities; past `keep_probabilities_up_to` it recomputes them,
    as flash attention does."""

    block = 128  # query positions per block: 64 ran no faster at T=256, 256 (none) 20% slower
    # Up to this context the probabilities are kept for backward instead of recomputed
    # (135M at T=256: +106 MB, +1.5% speed); they grow with T^2, the other activations with T.
    keep_probabilities_up_to = 512

    @staticmethod
    def _blocks(T: int) -> list[tuple[int, int]]:
        """The [t0, t1) position ranges of the query blocks."""
        step = CPUCausalAttention.block
        return [(t0, min(t0 + step, T)) for t0 in range(0, T, step)]

    @staticmethod
    def _probabilities(q_rows, keys, bias, t0, t1):
        """Softmax of the scaled, masked scores of positions [t0, t1) (the rows of all their
        heads) against keys [0, t1): (B*nkv, (t1 - t0) * group, t1), in bf16."""
        group = bias.shape[0] // bias.shape[1]
        rows = slice(t0 * group, t1 * group)
        scale = q_rows.shape[-1] ** -0.5
        scores = torch.baddbmm(bias[rows, :t1], q_rows[:, rows], keys[:, :t1].transpose(1, 2), alpha=scale)
        return softmax_in_place(scores)

    @staticmethod
    def forward(ctx, q, k, v, cos, sin, n_heads):
        B, T = q.shape[:2]
        hd = cos.shape[-1]
        nkv = k.shape[-1] // hd
        group = n_heads // nkv
        dtype = torch.bfloat16
        with torch.autocast("cpu", enabled=False):
            cos, sin = cos.to(dtype), sin.to(dtype)
            # a kv head's query rows in (position, head) order: (B, nkv, T, group, hd)
            q_heads = q.view(B, T, nkv, group, hd).transpose(1, 2)
            q_rows = torch.empty(B, nkv, T, group, hd, dtype=dtype, device=q.device)
            rotate_into(q_rows, q_heads, cos[..., None, :], sin[..., None, :])
            q_rows = q_rows.view(B * nkv, T * group, hd)
            keys = torch.empty(B, nkv, T, hd, dtype=dtype, device=k.device)
            keys = rotate_into(keys, k.view(B, T, nkv, hd).transpose(1, 2), cos, sin).view(B * nkv, T, hd)
            values = (
                v.view(B, T, nkv, hd)
                .transpose(1, 2)
                .to(dtype, copy=True, memory_format=torch.contiguous_format)
            )
            values = values.view(B * nkv, T, hd)
            bias = causal_bias(T, group)
            blocks, kept = [], []
            keep = T <= CPUCausalAttention.keep_probabilities_up_to
            for t0, t1 in CPUCausalAttention._blocks(T):
                probs = CPUCausalAttention._probabilities(q_rows, keys, bias, t0, t1)
                blocks.append(torch.bmm(probs, values[:, :t1]))
                if keep:
                    kept.append(probs)
            # (B, nkv, T, group, hd) -> (B, T, nkv, group, hd) = (B, T, nh * hd)
            out = (
                torch.cat(blocks, dim=1)
                .view(B, nkv, T, group * hd)
                .transpose(1, 2)
                .reshape(B, T, n_heads * hd)
            )
        ctx.save_for_backward(q_rows, keys, values, cos, sin, *kept)
        ctx.input_dtypes = q.dtype, k.dtype, v.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q_rows, keys, values, cos, sin, *kept = ctx.saved_tensors
        B, T = grad_out.shape[:2]
        nkv, hd = keys.shape[0] // B, keys.shape[-1]
        nh = grad_out.shape[-1] // hd
        group = nh // nkv
        with torch.autocast("cpu", enabled=False):
            grad_out = grad_out.to(values.dtype)
            grad_rows = (
                grad_out.reshape(B, T, nkv, group * hd).transpose(1, 2).reshape(B * nkv, T * group, hd)
            )
            bias = causal_bias(T, group)
            grad_q_blocks = []
            # keys and values collect a gradient from every block: summed in fp32
            grad_k = torch.zeros(keys.shape, dtype=torch.float32, device=keys.device)
            grad_v = torch.zeros_like(grad_k)
            for i, (t0, t1) in enumerate(CPUCausalAttention._blocks(T)):
                rows = slice(t0 * group, t1 * group)
                probs = kept[i] if kept else CPUCausalAttention._probabilities(q_rows, keys, bias, t0, t1)
                grad_v[:, :t1] += torch.bmm(probs.transpose(1, 2), grad_rows[:, rows])
                # dS = P * (dP - rowsum(P * dP)): a block's rows hold every key they see, so
                # softmax's own backward kernel (fp32 row sums) applies as it is
                grad_probs = torch.bmm(grad_rows[:, rows], values[:, :t1].transpose(1, 2))
                grad_scores = torch.ops.aten._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
                del probs, grad_probs
                grad_q_blocks.append(torch.bmm(grad_scores, keys[:, :t1]))
                grad_k[:, :t1] += torch.bmm(grad_scores.transpose(1, 2), q_rows[:, rows])
            # the scores' scale and the rotary, both transposed, in one pass each
            scale = hd**-0.5
            cos, sin = cos * scale, sin * scale
            dtype_q, dtype_k, dtype_v = ctx.input_dtypes
            grad_q = torch.empty(B, T, nkv, group, hd, dtype=dtype_q, device=keys.device)
            grad_q_rows = torch.cat(grad_q_blocks, dim=1).view(B, nkv, T, group, hd)
            rotate_into(
                grad_q.transpose(1, 2), grad_q_rows, cos[..., None, :], sin[..., None, :], transpose=True
            )
            grad_k_heads = torch.empty(B, T, nkv, hd, dtype=dtype_k, device=keys.device)
            rotate_into(grad_k_heads.transpose(1, 2), grad_k.view(B, nkv, T, hd), cos, sin, transpose=True)
            grad_v_heads = torch.empty(B, T, nkv, hd, dtype=dtype_v, device=keys.device)
            grad_v_heads.transpose(1, 2).copy_(grad_v.view(B, nkv, T, hd))
        return (
            grad_q.view(B, T, -1),
            grad_k_heads.view(B, T, -1),
            grad_v_heads.view(B, T, -1),
            None,
            None,
            None,
        )


def cpu_attention_applies(q: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None) -> bool:
    """Whether attention runs causal and unmasked, in bf16, on CPU, with gradients, outside
    torch.compile (inductor has its own attention lowering): what `CPUCausalAttention` does."""
    if mask is not None or cache is not None or q.device.type != "cpu":
        return False
    if not (torch.is_grad_enabled() and q.requires_grad) or torch.compiler.is_compiling():
        return False
    autocast = torch.is_autocast_enabled("cpu")
    return (torch.get_autocast_dtype("cpu") if autocast else q.dtype) == torch.bfloat16


class TrainingAttention(Attention):
    """`Attention` with q/k/v as one matmul under autocast and, for causal bf16 training on
    CPU, rotary and attention in `CPUCausalAttention`."""

    def forward(self, x, cos, sin, mask, cache, cache_position=None):
        B, T, _ = x.shape
        q, k, v = joined_linear(x, self.q_proj, self.k_proj, self.v_proj)
        if cpu_attention_applies(q, mask, cache):
            return self.o_proj(CPUCausalAttention.apply(q, k, v, cos, sin, self.n_heads))
        q, k, v = self.heads(q, k, v, cos, sin, cache, cache_position)
        return self.o_proj(self.attention(q, k, v, mask).transpose(1, 2).reshape(B, T, -1))
