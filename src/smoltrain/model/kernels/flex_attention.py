"""Document masks on CUDA as FlexAttention block masks, built on the device from the batch's
(B, T) document ids.

SDPA given a boolean mask falls back to its math kernel, which with grouped-query attention
materializes B x heads x T x T scores. FlexAttention skips the key blocks that the mask
rules out and runs the rest in one fused kernel, forward and backward. torch's FlexAttention
has no backward on CPU, so the kernel applies on CUDA only; tests/kernels checks its forward
on CPU against the dense mask, and bench/gpu.sh its backward and speed on a GPU.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from smoltrain.model.model import CustomLLM


def flex_applies(device: torch.device) -> bool:
    return device.type == "cuda"


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)  # fused only when compiled


def flex_kernel(device: torch.device):
    """FlexAttention as a CUDA forward should call it: compiled on its own in an eager model,
    plain inside a compiled one. Inside `torch.compile` the outer graph fuses it; the
    compiled wrapper there is a nested compile whose autograd wrapper dynamo cannot trace
    (a graph break in every layer, seen on an H200 with torch 2.11)."""
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda" or torch.compiler.is_compiling():
        return flex_attention
    return _compiled_flex_attention()


@dataclass
class FlexMask:
    """A block mask with the attention that reads it: `Attention.attention` calls `attend`."""

    block_mask: object  # torch.nn.attention.flex_attention.BlockMask

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, enable_gqa: bool) -> torch.Tensor:
        run = flex_kernel(q.device)
        # one dtype for all three: under autocast rotary leaves q, k in fp32 beside a bf16 v,
        # which FlexAttention refuses before torch 2.10 (SDPA casts them itself)
        q, k = q.to(v.dtype), k.to(v.dtype)
        return run(q, k, v, block_mask=self.block_mask, enable_gqa=enable_gqa)


def document_block_mask(document_ids: torch.Tensor, block: int = 128) -> FlexMask:
    """Causal attention within each document of a packed (B, T) batch.

    The block tables come from the documents' bounds, not from `create_block_mask`, which in
    eager mode evaluates the mask at all B x T x T positions for every micro-batch. Packed rows
    (`data.packed_example`) hold non-decreasing ids with a padded tail of -1, so the documents
    in a block of `block` positions run from its first id to its last: a key block before a
    query block shares a document with it when its last id is the query block's first, and
    every pair may attend when both blocks lie in that one document. Blocks on the diagonal
    are partial; the mask function decides within partial blocks.
    """
    from torch.nn.attention.flex_attention import BlockMask

    def same_document_causal(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (document_ids[b, q_idx] == document_ids[b, kv_idx])

    B, T = document_ids.shape
    n = -(-T // block)
    # the padded tail (-1) last in order: equality, which the mask reads, is unchanged
    ids = torch.where(document_ids < 0, torch.iinfo(document_ids.dtype).max, document_ids)
    ids = torch.nn.functional.pad(ids, (0, n * block - T), mode="replicate").view(B, n, block)
    first, last = ids[..., 0], ids[..., -1]
    q_first, q_last = first[:, :, None], last[:, :, None]  # (B, query block, 1)
    kv_first, kv_last = first[:, None, :], last[:, None, :]  # (B, 1, key block)
    earlier = torch.ones(n, n, dtype=torch.bool, device=ids.device).tril(-1)
    diagonal = torch.eye(n, dtype=torch.bool, device=ids.device)
    full = earlier & (kv_first == q_last)
    partial = (earlier & (kv_last == q_first) & ~full) | diagonal

    def table(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        counts = blocks.sum(-1, dtype=torch.int32)[:, None]
        order = torch.argsort((~blocks).to(torch.int8), dim=-1, stable=True)  # listed blocks first
        return counts, order.to(torch.int32)[:, None]

    (kv_counts, kv_order), (full_counts, full_order) = table(partial), table(full)
    mask = BlockMask.from_kv_blocks(
        kv_counts,
        kv_order,
        full_counts,
        full_order,
        BLOCK_SIZE=block,
        mask_mod=same_document_causal,
        seq_lengths=(T, T),
    )
    return FlexMask(mask)


class FlexMaskLLM(CustomLLM):
    """`CustomLLM` whose document masks are FlexAttention block masks where that applies."""

    def attention_mask(self, attention_mask, document_ids, past, T):
        device = self.embed_tokens.weight.device
        plain_otherwise = attention_mask is None and past == 0 and self.config.sliding_window is None
        if document_ids is not None and plain_otherwise and flex_applies(device):
            return document_block_mask(document_ids)
        return super().attention_mask(attention_mask, document_ids, past, T)
