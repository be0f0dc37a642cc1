"""Weight-only quantized linears for decoding on CPU: int8 with one scale per output row, and
int4 in groups of 32 along the input with a scale and an offset each (GGUF's q4_0 and q4_1
blocks map onto it exactly). An int4 model keeps its head in int8, as llama.cpp's q4 files
keep theirs in q8_0 or q6_K: the head in 4 bits cost SmolLM2-135M 5.5% of its perplexity.
Both run PyTorch's own packed CPU kernels (`aten._weight_int8pack_mm`,
`aten._weight_int4pack_mm_for_cpu`); nothing here multiplies.

Those kernels take bf16 activations (in fp32 they run a scalar loop ten times slower), so a
quantized linear rounds its input to bf16 and returns the input's dtype: the rest of the
model (norms, attention, the residual stream) keeps its own precision. llama.cpp's q8_0
rounds activations far more coarsely (to 8 bits in blocks of 32)."""

from __future__ import annotations

import torch
from torch import nn

QUANTIZE_KINDS = ("int8", "int4")
INT4_GROUP = 32  # values per int4 group: q4_0/q4_1's block, and the kernel's smallest group
COMPUTE_DTYPE = torch.bfloat16  # the activations' dtype in the packed kernels


class Int8Linear(nn.Module):
    """x @ W.T with W = q * scale, q int8 (out, in), one scale per output row."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        # buffers (they move with the model, and a compiled step reads them as inputs), not in
        # the state dict: a quantized model is not saved
        self.register_buffer("q", q.contiguous(), persistent=False)
        self.register_buffer("scales", scales.to(COMPUTE_DTYPE).contiguous(), persistent=False)

    @classmethod
    def from_weight(cls, weight: torch.Tensor) -> Int8Linear:
        """Symmetric rounding to 255 levels per row: the error of a weight is at most half a
        step, max|row| / 254."""
        weight = weight.detach().float()
        scales = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        q = torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8)
        return cls(q, scales)

    def dequantized(self) -> torch.Tensor:
        return self.q.float() * self.scales.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(COMPUTE_DTYPE)
        y = torch.ops.aten._weight_int8pack_mm(rows, self.q, self.scales)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class Int4Linear(nn.Module):
    """x @ W.T with W = q * scale + low per group of 32 inputs, q in 0..15. The kernel stores
    it as (q - 8) * scale + zero, so zero = low + 8 * scale."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, lows: torch.Tensor) -> None:
        """q: (out, in) integers 0..15; scales, lows: (out, in / 32)."""
        super().__init__()
        self.out_features, self.in_features = q.shape
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 2)
        zeros = lows.float() + 8 * scales.float()
        # the kernel's layout: (in / 32, out, 2), scale then zero
        scales_and_zeros = torch.stack([scales.float(), zeros], dim=-1).transpose(0, 1).to(COMPUTE_DTYPE)
        self.register_buffer("packed", packed, persistent=False)  # as Int8Linear's
        self.register_buffer("scales_and_zeros", scales_and_zeros.contiguous(), persistent=False)

    @classmethod
    def from_weight(cls, weight: torch.Tensor) -> Int4Linear:
        """Each group's range [min, max] cut into 15 equal steps (q4_1's rounding): the error
        of a weight is at most half a step, (max - min) / 30. A group already on a grid of at
        most 16 levels (a q4_0 or q4_1 GGUF's block, as loading dequantized it) keeps its own
        step, so that its values come back as they were, not rounded a second time."""
        out_features, in_features = weight.shape
        groups = weight.detach().float().view(out_features, in_features // INT4_GROUP, INT4_GROUP)
        lows, highs = groups.amin(dim=-1), groups.amax(dim=-1)
        scales = ((highs - lows) / 15).clamp(min=1e-12)
        grid = grid_steps(groups, lows, highs)
        scales = torch.where(grid.isfinite(), grid, scales)
        q = torch.round((groups - lows[..., None]) / scales[..., None]).clamp(0, 15)
        return cls(q.view(out_features, in_features), scales, lows)

    def dequantized(self) -> torch.Tensor:
        """W as the kernel computes it (its bf16 scales and zeros), for tests and checks."""
        eye = torch.eye(self.in_features, dtype=COMPUTE_DTYPE)
        return self(eye).float().T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(COMPUTE_DTYPE)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed, INT4_GROUP, self.scales_and_zeros)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group={INT4_GROUP}"


def grid_steps(groups: torch.Tensor, lows: torch.Tensor, highs: torch.Tensor) -> torch.Tensor:
    """Per group, the step of a grid of at most 16 levels its values lie on (min + k * step,
    k = 0..15), or inf where they lie on none. On such a grid, with its top level at K, the
    step is (max - min) / K for some K in 1..15. Two values of a group test all fifteen at
    once, which rules out almost every group on no grid (a trained weight's: sorting each
    group instead took 70% of quantizing); only the rest are tested whole, largest K first
    (q4_1's blocks reach 15)."""
    flat, lows, span = groups.reshape(-1, groups.shape[-1]), lows.reshape(-1), (highs - lows).reshape(-1)
    tops = torch.arange(15, 0, -1, dtype=flat.dtype)

    def on_grid(levels: torch.Tensor, tolerance: float = 1e-3) -> torch.Tensor:
        return ((levels - levels.round()).abs() < tolerance).all(dim=1)

    # (groups, 2, 15): two values' levels under every candidate step (a looser tolerance: a
    # group the whole test accepts must pass this one)
    fractions = (flat[:, :2] - lows[:, None]) / span[:, None]
    candidates = on_grid(fractions[:, :, None] * tops, 2e-3) & (span > 0)[:, None]
    steps = torch.full_like(span, float("inf"))
    for i, top in enumerate(tops.tolist()):
        rows = (candidates[:, i] & steps.isinf()).nonzero().squeeze(1)
        if len(rows):
            fits = on_grid((flat[rows] - lows[rows, None]) * top / span[rows, None])
            steps[rows[fits]] = span[rows[fits]] / top
    return steps.view(highs.shape)


QUANTIZED_LINEARS: dict[str, type[Int8Linear] | type[Int4Linear]] = {"int8": Int8Linear, "int4": Int4Linear}


def quantizable(weight: torch.Tensor, kind: str) -> str | None:
    """Why `weight` cannot be quantized as `kind` (None when it can)."""
    if kind == "int4" and weight.shape[1] % INT4_GROUP:
        return f"int4 needs input widths that are multiples of {INT4_GROUP}; this model has {weight.shape[1]}"
    return None
