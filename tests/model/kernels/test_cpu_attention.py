"""The CPU bf16 training attention against rotary + SDPA, both measured against fp64."""

import pytest
import torch
import torch.nn.functional as F

from smoltrain.model import RotaryEmbedding, apply_rotary
from smoltrain.model.kernels.cpu_attention import CPUCausalAttention, cpu_attention_applies


@pytest.mark.parametrize("block", [128, 20])  # one block; three, the last one shorter
def test_cpu_causal_attention_matches_sdpa_in_bf16(block, monkeypatch):
    """The bf16 CPU training attention (rotary, then batched matmuls) is as close to an fp64
    reference as rotary + SDPA's own bf16 kernel, forward and backward; past the context
    up to which it keeps its probabilities it keeps no (T x T) tensor and recomputes the
    very same gradients."""
    monkeypatch.setattr(CPUCausalAttention, "block", block)
    torch.manual_seed(0)
    B, T, nh, nkv, hd = 2, 48, 6, 2, 16
    q = torch.randn(B, T, nh * hd)  # laid out as the projections leave them
    k = torch.randn(B, T, nkv * hd)
    v = torch.randn(B, T, nkv * hd)
    cos, sin = RotaryEmbedding(hd, T, 10000.0)(torch.arange(T)[None].expand(B, T), torch.float64)
    grad = torch.randn(B, T, nh * hd)

    def run(fn, dtype):
        inputs = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*inputs, cos.to(dtype), sin.to(dtype))
        out.backward(grad.to(dtype))
        return [out.double(), *(t.grad.double() for t in inputs)]

    def ours(q, k, v, cos, sin):
        return CPUCausalAttention.apply(q, k, v, cos, sin, nh)

    def sdpa(q, k, v, cos, sin):
        q, k, v = (t.view(B, T, -1, hd).transpose(1, 2) for t in (q, k, v))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return y.transpose(1, 2).reshape(B, T, nh * hd)

    reference = run(sdpa, torch.float64)
    mine = run(ours, torch.bfloat16)
    theirs = run(sdpa, torch.bfloat16)
    for name, r, a, b in zip(["out", "dq", "dk", "dv"], reference, mine, theirs, strict=True):
        error_ours, error_theirs = (a - r).abs().max(), (b - r).abs().max()
        assert error_ours <= 2 * error_theirs + 1e-3, (name, error_ours, error_theirs)

    def saved_sizes():
        saved = []
        inputs = [t.to(torch.bfloat16).requires_grad_() for t in (q, k, v)]
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            ours(*inputs, cos.to(torch.bfloat16), sin.to(torch.bfloat16))
        return saved

    assert max(saved_sizes()) > B * nh * T * hd  # at T=48 the probabilities are kept
    monkeypatch.setattr(CPUCausalAttention, "keep_probabilities_up_to", T - 1)
    assert max(saved_sizes()) <= B * nh * T * hd  # past it: q, k, v, never the scores
    recomputed = run(ours, torch.bfloat16)
    for name, a, b in zip(["out", "dq", "dk", "dv"], mine, recomputed, strict=True):
        assert torch.equal(a, b), name


def test_cpu_attention_applies_only_to_causal_bf16_training_on_cpu():
    q = torch.randn(1, 4, 8, dtype=torch.bfloat16, requires_grad=True)
    assert cpu_attention_applies(q, None, None)
    assert not cpu_attention_applies(q, torch.ones(1, 1, 4, 4, dtype=torch.bool), None)  # a mask
    assert not cpu_attention_applies(q.detach(), None, None)  # no gradient
    assert not cpu_attention_applies(q.detach().float().requires_grad_(), None, None)  # fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cpu_attention_applies(q.detach().float().requires_grad_(), None, None)
    with torch.no_grad():
        assert not cpu_attention_applies(q, None, None)
