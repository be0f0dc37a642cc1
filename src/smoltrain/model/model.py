"""The SmolLM2 model: a Llama decoder in plain PyTorch, read top to bottom like the
architecture table (docs/reference-run.md).

Numerically it is transformers' LlamaForCausalLM (same RMSNorm, rotary and attention maths);
the module names follow the reference's printout. Faster device-specific versions of some
modules live in `smoltrain.model.kernels` and are swapped in by `prepare_for_training` (and, for
inference, `smoltrain.generate.prepare_for_generation`); this file has one forward path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from smoltrain.model.config import ModelConfig

IGNORE_INDEX = -100  # label of a position that has no target (padding, a masked prompt)


@dataclass
class CausalLMOutput:
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: KVCache | None = None


class KVCache:
    """Keys and values of every layer in pre-allocated buffers, written by slice assignment
    (MPS has no `index_copy` for this). Grows by doubling when a forward would overflow it.
    Its `dtype` may be narrower than the activations' (a 16-bit cache for an fp32 model reads
    half the bytes a token): what it returns is in theirs."""

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
        stored = self.keys[layer].dtype
        if cache_position is not None:  # a compiled step: the caller's attention casts
            self.keys[layer].index_copy_(2, cache_position, k.to(stored))
            self.values[layer].index_copy_(2, cache_position, v.to(stored))
            return self.keys[layer], self.values[layer]
        if self.length == 0 and stored.itemsize > k.dtype.itemsize:
            # no wider than the activations: FSDP2 computes bf16 from fp32 shards
            self.keys[layer], self.values[layer] = (
                self.keys[layer].to(k.dtype),
                self.values[layer].to(v.dtype),
            )
        start, end = self.length, self.length + k.shape[2]
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        if start == 0:  # the prompt attends to its own keys, not their rounding in the cache
            return k, v
        return self.keys[layer][:, :, :end].to(k.dtype), self.values[layer][:, :, :end].to(v.dtype)

    def advance(self, new_tokens: int) -> None:
        self.length += new_tokens


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one fused kernel
        # A 16-bit model: normalize in fp32 and cast back before the scale, as LlamaRMSNorm does.
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
        # computed on the CPU wherever the model is built, then moved: the same tables on every
        # device, and no arithmetic on the meta device (its first op imports torch's compiler, 1 s)
        cpu, device = torch.device("cpu"), torch.get_default_device()
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float, device=cpu) / self.head_dim
        inv_freq = 1.0 / (self.theta**exponents)
        positions = torch.arange(self.max_positions, dtype=torch.float, device=cpu)
        freqs = positions[:, None] * inv_freq  # (P, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        # MKL's cos and sin pick their kernel on their first call in a process, and threads that
        # make that call together can run in a low-precision one (pytorch#188792: 1.5e-4 off
        # here): one element first, on one thread, for tables kept for the whole run
        torch.cos(torch.zeros(1, device=cpu)), torch.sin(torch.zeros(1, device=cpu))
        return emb.cos().to(device), emb.sin().to(device)

    def reset_parameters(self, device: torch.device | str | None = None) -> None:
        """Recompute the tables (after building the model on the meta device), on `device`
        (default: where they are)."""
        cos, sin = self._tables()
        self.cos_cached = cos.to(device or self.cos_cached.device)
        self.sin_cached = sin.to(device or self.sin_cached.device)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # (B, T) -> (B, 1, T, hd), ready to broadcast over heads
        return (
            self.cos_cached[position_ids].to(dtype)[:, None],
            self.sin_cached[position_ids].to(dtype)[:, None],
        )

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, max_positions={self.max_positions}, theta={self.theta:g}"


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
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, k, v = self.heads(q, k, v, cos, sin, cache, cache_position)
        y = self.attention(q, k, v, mask)  # (B, nh, T, hd)
        # q, and so y, is laid out (B, T, nh, hd) in memory: this is a view, not a copy
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, nh * hd) -> (B, T, H)

    def heads(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None,
        cache_position: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Projections (B, T, heads * hd) -> rotated heads (B, nh, T, hd), and the keys and
        values (B, nkv, S, hd) of the cache so far when there is one."""
        B, T, _ = q.shape
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v, cache_position)  # (B, nkv, S, hd)
        return q, k, v

    def attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        if hasattr(mask, "attend"):  # a kernel's mask runs its own attention (kernels/flex_attention)
            return mask.attend(q, k, v, enable_gqa=self.n_heads != self.n_kv_heads)
        # A mask disables the fast causal kernels, so the caller passes one only when it
        # says something beyond causality (see build_attention_mask).
        is_causal = mask is None and k.shape[2] == q.shape[2]
        # enable_gqa: each key/value head serves n_heads / n_kv_heads query heads inside the
        # kernel, so no repeated copy of k and v is made (or kept for backward).
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=self.n_heads != self.n_kv_heads
        )


class MLP(nn.Module):
    """SiLU-gated MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


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


class LMHead(nn.Linear):
    """The projection to the vocabulary, and the next-token loss through it."""

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the logits of `hidden` (B, T, H) against `labels` (B, T),
        already aligned, IGNORE_INDEX ignored; in fp32, as transformers computes it."""
        logits = self(hidden).float()  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)


def build_attention_mask(
    attention_mask: torch.Tensor | None,
    past_length: int,
    query_length: int,
    sliding_window: int | None,
    device: torch.device,
    document_ids: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Boolean mask (B or 1, 1, T, S), True where a query may attend to a key, or None when
    plain causal attention says it all. Combines causality, the 0/1 padding mask over all S
    positions (left or right padding), the sliding window and, for packed documents, their
    (B, T) ids: a token sees its own document only."""
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask.bool()  # already a full mask
    key_length = past_length + query_length
    plain_causal = attention_mask is None and document_ids is None and sliding_window is None
    if plain_causal and (past_length == 0 or query_length == 1):
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
    if document_ids is not None:
        allowed = allowed & (document_ids[:, None, :, None] == document_ids[:, None, None, :])
    # A query on a padding position may see no key at all; SDPA would return NaN there.
    # Let such rows attend everywhere: their outputs are never used (as transformers does).
    return allowed | ~allowed.any(dim=-1, keepdim=True)


class CustomLLM(nn.Module):
    """A Llama-architecture causal language model (SmolLM2-135M with the default config)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope_theta)
        self.lm_head = LMHead(config.hidden_size, config.vocab_size, bias=False)
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
        document_ids: torch.Tensor | None = None,
    ) -> CausalLMOutput:
        """input_ids (B, T). attention_mask: 0/1 (B, S) over the cache and the input, or a
        boolean (B, 1, T, S) mask. document_ids (B, T): packed documents' ids, attention
        stays within each (smoltrain.data's document_mask). labels (B, T) are shifted inside,
        -100 ignored; the loss is `lm_head.loss`, computed apart from the logits.
        logits_to_keep=k keeps the logits of the last k positions only (0: all);
        return_logits=False skips them (training).
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
            mask = self.attention_mask(attention_mask, document_ids, past, T)

        x = self.embed_tokens(input_ids)  # (B, T, H)
        cos, sin = self.rotary_emb(position_ids, x.dtype)  # (B, 1, T, hd)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, mask, cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache, cache_position)
        x = self.norm(x)
        if cache is not None and cache_position is None:
            cache.advance(T)

        logits = loss = None
        if return_logits:
            logits = self.lm_head(x[:, -logits_to_keep:] if logits_to_keep else x)  # (B, T, V)
        if labels is not None:
            # Predict token t+1 from position t: shift the labels left, the last one ignored.
            loss = self.lm_head.loss(x, F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:])
        return CausalLMOutput(loss=loss, logits=logits, past_key_values=cache if use_cache else None)

    def attention_mask(
        self, attention_mask: torch.Tensor | None, document_ids: torch.Tensor | None, past: int, T: int
    ) -> torch.Tensor | None:
        """What every layer's attention is given: a boolean mask built on the model's device,
        or None for plain causal attention."""
        device, window = self.embed_tokens.weight.device, self.config.sliding_window
        return build_attention_mask(attention_mask, past, T, window, device, document_ids)
