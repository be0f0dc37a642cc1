"""LeanRMSNorm against F.rms_norm: the same output, gradients within 1e-5, less kept."""

import torch
import torch.nn.functional as F

from smoltrain.model import RMSNorm
from smoltrain.model.kernels import swap_class
from smoltrain.model.kernels.rms_norm import LeanRMSNorm


def test_lean_rms_norm_keeps_less_and_matches_the_fused_kernel():
    torch.manual_seed(0)
    norm = swap_class(RMSNorm(64, 1e-5), LeanRMSNorm)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 16, 64, requires_grad=True)
    grad_out = torch.randn(2, 16, 64)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ours = norm(x)
    grads_ours = torch.autograd.grad(ours, (x, norm.weight), grad_out)
    reference = F.rms_norm(x, norm.weight.shape, norm.weight, norm.eps)
    grads_ref = torch.autograd.grad(reference, (x, norm.weight), grad_out)
    assert torch.equal(ours, reference)
    for a, b in zip(grads_ours, grads_ref, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    # the input, the (tokens x 1) inverse RMS and the weight: no normalized copy of x
    assert sorted(t.numel() for t in saved) == sorted([x.numel(), 2 * 16, norm.weight.numel()])


def test_lean_rms_norm_is_the_plain_one_where_it_does_not_apply():
    norm = swap_class(RMSNorm(8, 1e-5), LeanRMSNorm)
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    plain = RMSNorm(8, 1e-5).to(torch.bfloat16)
    assert torch.equal(norm.to(torch.bfloat16)(x), plain(x))  # 16-bit: LlamaRMSNorm's rounding
