"""Softmax written into its input's buffer, shared by the chunked loss and the CPU attention."""

from __future__ import annotations

import torch


def softmax_in_place(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension, written into `logits`' own buffer: one (n, V) buffer
    at the loss's peak instead of two (135M: 96 MB), and no fresh buffer to fault in. The
    kernel is torch.softmax's, so are the values. Under torch.compile, the out-of-place op:
    inductor plans the buffers itself, and this aliasing breaks its gradients."""
    if torch.compiler.is_compiling():
        return torch.softmax(logits, dim=-1)
    return torch.ops.aten._softmax.out(logits, -1, False, out=logits)
