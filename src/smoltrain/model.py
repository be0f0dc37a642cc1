"""The SmolLM2 model: a Llama decoder, read top to bottom like SPEC.md's architecture table.

Numerically it is transformers' LlamaForCausalLM (same RMSNorm, rotary and attention maths);
the module names follow the reference's printout. Conversion to and from Hugging Face lives
in `smoltrain.hf`, generation in `smoltrain.generate`, the chunked loss in `smoltrain.loss`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from smoltrain.config import ModelConfig
from smoltrain.loss import IGNORE_INDEX, chunked_linear_cross_entropy, softmax_in_place


@dataclass
class CausalLMOutput:
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: KVCache | None = None


class KVCache:
    """Keys and values of every layer in pre-allocated buffers, written by slice assignment
    (MPS has no `index_copy` for this). Grows by doubling when a forward would overflow it."""

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        capacity: int,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> None:
        shape = (batch_size, config.num_key_value_heads, capacity, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.length = 0  # tokens stored so far

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def reserve(self, new_tokens: int) -> None:
        needed = self.length + new_tokens
        if needed <= self.capacity:
            return
        grown = max(needed, 2 * self.capacity)
        for buffers in (self.keys, self.values):
            for i, old in enumerate(buffers):
                new = old.new_zeros(*old.shape[:2], grown, old.shape[3])
                new[:, :, : self.length] = old[:, :, : self.length]
                buffers[i] = new

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, cache_position: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's k, v (B, kv_heads, T, hd) and return all of them so far, or, at
        `cache_position` (T,), a tensor so a compiled step never depends on the length, all of
        the buffers (the caller's mask hides the slots not yet written)."""
        if cache_position is not None:
            self.keys[layer].index_copy_(2, cache_position, k)
            self.values[layer].index_copy_(2, cache_position, v)
            return self.keys[layer], self.values[layer]
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, new_tokens: int) -> None:
        self.length += new_tokens


class _CPURMSNorm(torch.autograd.Function):
    """F.rms_norm for training on CPU, keeping the input and the (tokens x 1) inverse RMS for
    backward. On CPU F.rms_norm's backward is the composite one, which also keeps the
    normalized input: one more (tokens x hidden) fp32 tensor per norm, 137 MB of a 135M
    step's activations. Same forward kernel, same speed."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        out, rstd = torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], weight, eps)
        ctx.save_for_backward(x, rstd, weight)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, rstd, weight = ctx.saved_tensors
        x_hat = x * rstd
        grad_weight = (grad_out * x_hat).sum(dim=tuple(range(grad_out.dim() - 1)))
        grad_x_hat = grad_out * weight
        grad_x = (grad_x_hat - x_hat * (grad_x_hat * x_hat).mean(-1, keepdim=True)) * rstd
        return grad_x, grad_weight, None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # the fused kernel: the same result in fp32 (the residual stream, also under
            # autocast), twice as fast forward + backward on CPU
            if (
                x.device.type == "cpu"
                and torch.is_grad_enabled()
                and (x.requires_grad or self.weight.requires_grad)
            ):
                return _CPURMSNorm.apply(x, self.weight, self.eps)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Normalize in fp32 and cast back before the scale, exactly as LlamaRMSNorm does.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position up to the context, computed once in fp32."""

    def __init__(self, head_dim: int, max_positions: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.max_positions, self.theta = head_dim, max_positions, theta
        cos, sin = self._tables()
        self.register_buffer("cos_cached", cos, persistent=False)  # (max_positions, hd)
        self.register_buffer("sin_cached", sin, persistent=False)

    def _tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = 1.0 / (
            self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float) / self.head_dim)
        )
        freqs = torch.arange(self.max_positions, dtype=torch.float)[:, None] * inv_freq  # (P, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    def reset_parameters(self) -> None:
        """Recompute the tables (after building the model on the meta device)."""
        cos, sin = self._tables()
        self.cos_cached = cos.to(self.cos_cached.device)
        self.sin_cached = sin.to(self.sin_cached.device)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # (B, T) -> (B, 1, T, hd), ready to broadcast over heads
        return (
            self.cos_cached[position_ids].to(dtype)[:, None],
            self.sin_cached[position_ids].to(dtype)[:, None],
        )

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, max_positions={self.max_positions}, theta={self.theta:g}"


class _JoinedProjection(torch.autograd.Function):
    """x @ [w1; w2; ...].T as one matmul in `dtype`, for the projections that read the same
    input (q/k/v, gate/up) under autocast. Autocast would cast and keep x once per projection
    and run a narrow matmul each (k and v are 192 wide at 135M); here the weights are cast
    into one buffer (the cast autocast makes anyway) and x is cast and kept once. Backward is
    two matmuls instead of two per projection, and the input's gradient leaves in x's dtype
    (fp32), as autocast's did."""

    @staticmethod
    def forward(ctx, x, dtype, *weights):
        sizes = [w.shape[0] for w in weights]
        joined = torch.empty(sum(sizes), weights[0].shape[1], dtype=dtype, device=x.device)
        for part, w in zip(joined.split(sizes), weights, strict=True):
            part.copy_(w)
        x_cast = x.to(dtype)
        ctx.save_for_backward(x_cast, joined)
        ctx.sizes, ctx.input_dtype, ctx.weight_dtype = sizes, x.dtype, weights[0].dtype
        return F.linear(x_cast, joined)

    @staticmethod
    def backward(ctx, grad_out):
        x_cast, joined = ctx.saved_tensors
        grad_out = grad_out.to(joined.dtype)
        grad_x = (grad_out @ joined).to(ctx.input_dtype)
        grad_joined = grad_out.reshape(-1, grad_out.shape[-1]).T @ x_cast.reshape(-1, x_cast.shape[-1])
        return grad_x, None, *(g.to(ctx.weight_dtype) for g in grad_joined.split(ctx.sizes))


def project(x: torch.Tensor, *linears: nn.Module) -> tuple[torch.Tensor, ...]:
    """The outputs of bias-free linears that all read x. In training under autocast, plain
    `nn.Linear`s run as one joined matmul (see `_JoinedProjection`); otherwise, and for
    wrapped or hooked modules (LoRA, quantized), each module is called as it is."""
    device_type = x.device.type
    if (
        torch.is_autocast_enabled(device_type)
        and torch.is_grad_enabled()
        and all(
            type(m) is nn.Linear and m.bias is None and not m._forward_hooks and not m._forward_pre_hooks
            for m in linears
        )
    ):
        dtype = torch.get_autocast_dtype(device_type)
        if x.dtype != dtype and all(m.weight.dtype == x.dtype for m in linears):
            y = _JoinedProjection.apply(x, dtype, *(m.weight for m in linears))
            return y.split([m.out_features for m in linears], dim=-1)
    return tuple(m(x) for m in linears)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    """Grouped-query self-attention through `scaled_dot_product_attention`."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        h, kv = config.hidden_size, config.num_key_value_heads * config.head_dim
        self.q_proj = nn.Linear(h, h, bias=False)
        self.k_proj = nn.Linear(h, kv, bias=False)
        self.v_proj = nn.Linear(h, kv, bias=False)
        self.o_proj = nn.Linear(h, h, bias=False)
        # q, k and v as one matmul: smoltrain.generate.prepare_for_generation sets it
        self.qkv_proj: nn.Module | None = None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None,
        cache_position: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        if self.qkv_proj is not None:
            kv_size = self.n_kv_heads * self.head_dim
            q, k, v = self.qkv_proj(x).split([self.n_heads * self.head_dim, kv_size, kv_size], dim=-1)
        else:
            q, k, v = project(x, self.q_proj, self.k_proj, self.v_proj)
        if cache is None and mask is None and _bf16_cpu_training(q):
            # rotary, attention and the head layout in one function, forward and backward
            return self.o_proj(_CPUCausalAttention.apply(q, k, v, cos, sin, self.n_heads))
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v, cache_position)  # (B, nkv, S, hd)
        if cache_position is not None and T == 1:
            y = _one_query_attention(q, k, v, mask)
            return self.o_proj(y.reshape(B, 1, -1))
        # A mask disables the fast causal kernel, so pass one only when it says something.
        is_causal = mask is None and k.shape[2] == T
        # enable_gqa: each key/value head serves n_heads / n_kv_heads query heads inside the
        # kernel, so no repeated copy of k and v is made (or kept for backward).
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=self.n_heads != self.n_kv_heads
        )
        # q, and so y, is laid out (B, T, nh, hd) in memory: this is a view, not a copy
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, nh * hd)
        return self.o_proj(y)


def _bf16_cpu_training(q: torch.Tensor) -> bool:
    """Whether attention runs in bf16 on CPU with gradients (what `_CPUCausalAttention` does)."""
    if q.device.type != "cpu" or not (torch.is_grad_enabled() and q.requires_grad):
        return False
    if torch.compiler.is_compiling():
        return False  # inductor has its own attention lowering
    autocast = torch.is_autocast_enabled("cpu")
    return (torch.get_autocast_dtype("cpu") if autocast else q.dtype) == torch.bfloat16


def _rotate_into(
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
def _causal_bias(T: int, group: int) -> torch.Tensor:
    """(T * group, T) on CPU: 0 where row (position t, head) may see key s <= t, else -inf."""
    bias = torch.full((T, T), float("-inf"), dtype=torch.bfloat16).triu_(1)
    return bias.repeat_interleave(group, dim=0)


class _CPUCausalAttention(torch.autograd.Function):
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
        step = _CPUCausalAttention.block
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
            _rotate_into(q_rows, q_heads, cos[..., None, :], sin[..., None, :])
            q_rows = q_rows.view(B * nkv, T * group, hd)
            keys = torch.empty(B, nkv, T, hd, dtype=dtype, device=k.device)
            keys = _rotate_into(keys, k.view(B, T, nkv, hd).transpose(1, 2), cos, sin).view(B * nkv, T, hd)
            values = (
                v.view(B, T, nkv, hd)
                .transpose(1, 2)
                .to(dtype, copy=True, memory_format=torch.contiguous_format)
            )
            values = values.view(B * nkv, T, hd)
            bias = _causal_bias(T, group)
            blocks, kept = [], []
            keep = T <= _CPUCausalAttention.keep_probabilities_up_to
            for t0, t1 in _CPUCausalAttention._blocks(T):
                probs = _CPUCausalAttention._probabilities(q_rows, keys, bias, t0, t1)
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
            bias = _causal_bias(T, group)
            grad_q_blocks = []
            # keys and values collect a gradient from every block: summed in fp32
            grad_k = torch.zeros(keys.shape, dtype=torch.float32, device=keys.device)
            grad_v = torch.zeros_like(grad_k)
            for i, (t0, t1) in enumerate(_CPUCausalAttention._blocks(T)):
                rows = slice(t0 * group, t1 * group)
                probs = kept[i] if kept else _CPUCausalAttention._probabilities(q_rows, keys, bias, t0, t1)
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
            _rotate_into(
                grad_q.transpose(1, 2), grad_q_rows, cos[..., None, :], sin[..., None, :], transpose=True
            )
            grad_k_heads = torch.empty(B, T, nkv, hd, dtype=dtype_k, device=keys.device)
            _rotate_into(grad_k_heads.transpose(1, 2), grad_k.view(B, nkv, T, hd), cos, sin, transpose=True)
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


def _one_query_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Attention of one new token (B, nh, 1, hd) over the whole cache (B, nkv, S, hd) as
    plain matmuls that torch.compile fuses with what surrounds them. At one query SDPA's CPU
    kernel costs more than its arithmetic: compiled bf16 decoding went 50 -> 60 tok/s.
    The softmax is in fp32, as in SDPA."""
    B, nh, _, hd = q.shape
    n_kv = k.shape[1]
    q = q.view(B, n_kv, nh // n_kv, hd)  # the query heads that share each key/value head
    scores = (q @ k.transpose(-1, -2)).float() * hd**-0.5  # (B, nkv, group, S)
    scores = scores.masked_fill(~mask, float("-inf"))  # mask (B, 1, 1, S)
    return (scores.softmax(-1).to(v.dtype) @ v).view(B, nh, 1, hd)


class _GatedDown(torch.autograd.Function):
    """down(silu(gate) * up) keeping only gate and up for backward. Plain autograd also keeps
    silu(gate) and the product (the down projection's input): two more (tokens x 1536)
    tensors per layer, a quarter of a layer's activations. They are recomputed in backward,
    which costs two elementwise passes and no extra matmul (135M: -400 MB, +3% speed)."""

    @staticmethod
    def forward(ctx, gate, up, down_weight):
        w = down_weight.to(gate.dtype)  # autocast: the matmul runs in the activations' dtype
        ctx.save_for_backward(gate, up, down_weight)
        return (F.silu(gate) * up) @ w.T

    @staticmethod
    def backward(ctx, grad_out):
        gate, up, down_weight = ctx.saved_tensors
        w = down_weight.to(gate.dtype)
        grad_out = grad_out.to(gate.dtype)
        silu = F.silu(gate)
        prod = (silu * up).reshape(-1, up.shape[-1])
        grad_w = (grad_out.reshape(-1, grad_out.shape[-1]).T @ prod).to(down_weight.dtype)
        del prod
        grad_prod = grad_out @ w  # (..., I)
        grad_up = grad_prod * silu
        grad_gate = torch.ops.aten.silu_backward(grad_prod * up, gate)
        return grad_gate, grad_up, grad_w


class MLP(nn.Module):
    """SiLU-gated MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = nn.SiLU()
        self.gate_up_proj: nn.Module | None = None  # gate and up as one matmul, for inference

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = project(x, self.gate_proj, self.up_proj)
        if torch.is_grad_enabled() and isinstance(self.down_proj, nn.Linear):
            return _GatedDown.apply(gate, up, self.down_proj.weight)
        return self.down_proj(self.act_fn(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache, cache_position=None):
        x = x + self.self_attn(self.input_norm(x), cos, sin, mask, cache, cache_position)
        return x + self.mlp(self.post_attn_norm(x))


def build_attention_mask(
    attention_mask: torch.Tensor | None,
    past_length: int,
    query_length: int,
    sliding_window: int | None,
    device: torch.device,
) -> torch.Tensor | None:
    """Boolean mask (B or 1, 1, T, S), True where a query may attend to a key, or None when
    plain causal attention says it all. Combines causality, the 0/1 padding mask over all S
    positions (left or right padding) and the sliding window."""
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask.bool()  # already a full mask, e.g. document-causal packing
    key_length = past_length + query_length
    if attention_mask is None and sliding_window is None and (past_length == 0 or query_length == 1):
        return None
    q_pos = torch.arange(past_length, key_length, device=device)[:, None]  # (T, 1)
    k_pos = torch.arange(key_length, device=device)[None, :]  # (1, S)
    allowed = k_pos <= q_pos
    if sliding_window is not None:
        allowed = allowed & (q_pos - k_pos < sliding_window)
    allowed = allowed[None, None]  # (1, 1, T, S)
    if attention_mask is not None:
        if attention_mask.shape[-1] != key_length:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[-1]} positions but the cache and "
                f"input hold {key_length}; pass the mask of the whole sequence so far"
            )
        allowed = allowed & attention_mask.bool()[:, None, None, :]
    # A query on a padding position may see no key at all; SDPA would return NaN there.
    # Let such rows attend everywhere: their outputs are never used (as transformers does).
    return allowed | ~allowed.any(dim=-1, keepdim=True)


class CustomLLM(nn.Module):
    """A Llama-architecture causal language model (SmolLM2-135M with the default config)."""

    # both set by smoltrain.generate.prepare_for_generation
    inference_only = False
    decode_step = None  # a compiled smoltrain.generate.decode_step, used after the prompt

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope_theta)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.gradient_checkpointing = False
        self.apply(self._init_weights)
        self.tie_weights()

    def _init_weights(self, module: nn.Module) -> None:
        # SmolLM2 / transformers' Llama init: normal(0, initializer_range), norms at one.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def gradient_checkpointing_enable(self) -> None:
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.gradient_checkpointing = False

    def num_parameters(self) -> int:
        if self.inference_only:  # the repacked linear weights are no longer parameters
            return self.config.num_params()
        return sum(p.numel() for p in self.parameters())  # a tied weight is counted once

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
        return_logits: bool = True,
        cache_position: torch.Tensor | None = None,
    ) -> CausalLMOutput:
        """input_ids (B, T). attention_mask: 0/1 (B, S) over the cache and the input, or a
        boolean (B, 1, T, S) mask. labels (B, T) are shifted inside, -100 ignored.
        logits_to_keep=k keeps the logits of the last k positions only (0: all).
        return_logits=False with labels computes the loss chunk by chunk without logits.
        cache_position (T,): the cache slots to write, for a step with fixed shapes that
        torch.compile captures once (see smoltrain.generate); the caller then passes
        position_ids and the boolean mask over the cache's whole capacity, and advances it."""
        B, T = input_ids.shape
        cache = past_key_values
        if cache_position is not None:
            if cache is None or position_ids is None or attention_mask is None or attention_mask.dim() != 4:
                raise ValueError("cache_position needs past_key_values, position_ids and a 4D attention_mask")
            mask = attention_mask.bool()
        else:
            if use_cache and cache is None:
                cache = KVCache(self.config, B, T, self.device, self.dtype)
            past = cache.length if cache is not None else 0
            if past + T > self.config.max_position_embeddings:
                raise ValueError(
                    f"sequence of {past + T} tokens exceeds the model's context of "
                    f"{self.config.max_position_embeddings} (max_position_embeddings); shorten the input"
                )
            if position_ids is None:
                position_ids = torch.arange(past, past + T, device=input_ids.device)[None].expand(B, T)
            if cache is not None:
                cache.reserve(T)
            mask = build_attention_mask(attention_mask, past, T, self.config.sliding_window, input_ids.device)

        x = self.embed_tokens(input_ids)  # (B, T, H)
        cos, sin = self.rotary_emb(position_ids, x.dtype)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, mask, cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache, cache_position)
        x = self.norm(x)
        if cache is not None and cache_position is None:
            cache.advance(T)

        loss = logits = None
        if labels is not None:
            # Predict token t+1 from position t: drop the last position, shift labels left.
            shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
            if not return_logits:
                loss = chunked_linear_cross_entropy(x, self.lm_head.weight, shifted)
        if return_logits:
            logits = self.lm_head(x[:, -logits_to_keep:] if logits_to_keep else x)  # (B, T, V)
            if labels is not None:
                loss = F.cross_entropy(
                    logits.float().flatten(0, 1), shifted.flatten(), ignore_index=IGNORE_INDEX
                )
        return CausalLMOutput(loss=loss, logits=logits, past_key_values=cache if use_cache else None)

    def generate(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """Prompt followed by new tokens; see `smoltrain.generate.generate` for the arguments."""
        from smoltrain.generate import generate

        return generate(self, input_ids, **kwargs)

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> CustomLLM:
        """A Hugging Face folder (or hub name), a `.gguf` file, or `smollm2` (the bundled
        SmolLM2-135M-Instruct); see `smoltrain.hf.load_model`."""
        from smoltrain.hf import load_model

        return load_model(path, **kwargs)

    def save_pretrained(self, folder: str | Path, tokenizer=None) -> None:
        """Write a folder that `transformers.AutoModelForCausalLM` loads as-is."""
        from smoltrain.hf import save_model

        save_model(self, folder, tokenizer=tokenizer)
