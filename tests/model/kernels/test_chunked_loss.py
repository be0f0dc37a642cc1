"""The chunked linear + cross-entropy against the plain one (F.cross_entropy on logits)."""

import pytest
import torch
import torch.nn.functional as F

from smoltrain.model import LMHead
from smoltrain.model.kernels.chunked_loss import ChunkedLossHead, chunked_linear_cross_entropy


def loss_inputs(tokens: int, ignore_every: int):
    """hidden (tokens, 32) and a 300-word head weight, both requiring grad, and labels with
    every `ignore_every`-th one ignored."""
    torch.manual_seed(0)
    hidden = torch.randn(tokens, 32, requires_grad=True)
    weight = torch.randn(300, 32, requires_grad=True)
    labels = torch.randint(0, 300, (tokens,))
    labels[::ignore_every] = -100
    return hidden, weight, labels


def test_chunked_loss_gradients_match_plain():
    hidden, weight, labels = loss_inputs(50, ignore_every=7)
    plain = F.cross_entropy(hidden @ weight.T, labels, ignore_index=-100)
    g_plain = torch.autograd.grad(plain * 3, (hidden, weight))
    chunked = chunked_linear_cross_entropy(hidden, weight, labels, chunk_size=16)
    g_chunked = torch.autograd.grad(chunked * 3, (hidden, weight))
    assert torch.allclose(plain, chunked, rtol=1e-5)
    for a, b in zip(g_plain, g_chunked, strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


def test_chunked_loss_ignored_chunks_pass_no_gradient():
    # the first chunk of 16 entirely ignored, and then everything: zero gradients, no NaN
    hidden, weight, labels = loss_inputs(40, ignore_every=3)
    labels[:16] = -100
    plain = F.cross_entropy(hidden @ weight.T, labels, ignore_index=-100)
    chunked = chunked_linear_cross_entropy(hidden, weight, labels, chunk_size=16)
    g_plain = torch.autograd.grad(plain, (hidden, weight))
    g_chunked = torch.autograd.grad(chunked, (hidden, weight))
    assert torch.allclose(plain, chunked, rtol=1e-5)
    assert (g_chunked[0][:16] == 0).all()
    for a, b in zip(g_plain, g_chunked, strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)
    none = chunked_linear_cross_entropy(hidden, weight, torch.full_like(labels, -100), chunk_size=16)
    grad_hidden, grad_weight = torch.autograd.grad(none, (hidden, weight))
    assert none == 0 and (grad_hidden == 0).all() and (grad_weight == 0).all()


def test_chunked_loss_gradients_under_torch_compile():
    hidden, weight, labels = loss_inputs(64, ignore_every=5)

    def loss_fn(h, w, y):
        return chunked_linear_cross_entropy(h, w, y, chunk_size=16)

    eager = torch.autograd.grad(loss_fn(hidden, weight, labels), (hidden, weight))
    compiled = torch.autograd.grad(torch.compile(loss_fn)(hidden, weight, labels), (hidden, weight))
    for a, b in zip(eager, compiled, strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


def test_chunked_loss_under_bf16_autocast():
    torch.manual_seed(0)
    hidden, weight = torch.randn(64, 32), torch.randn(300, 32)
    labels = torch.randint(0, 300, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = F.cross_entropy((hidden @ weight.T).float(), labels)
        chunked = chunked_linear_cross_entropy(hidden, weight, labels, chunk_size=16)
    assert torch.allclose(plain, chunked, rtol=1e-3)


def test_chunked_loss_exact_when_probabilities_underflow():
    # a target 200 logits below the best: p(target) underflows fp32, the loss must not be inf
    hidden = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    weight = torch.tensor([[200.0, 0.0], [0.0, 0.0], [0.0, 3.0]])
    labels = torch.tensor([1, 2])
    plain = F.cross_entropy(hidden @ weight.T, labels)
    chunked = chunked_linear_cross_entropy(hidden, weight, labels)
    assert torch.isfinite(chunked) and torch.allclose(plain, chunked)


@pytest.mark.parametrize("factor", [2.0, 1.0])  # 1.0: the saved gradients go out unscaled
def test_chunked_loss_backward_twice_with_retained_graph(factor):
    # backward scales or hands out its saved gradients only when the graph is not kept
    hidden, weight, labels = loss_inputs(50, ignore_every=7)
    loss = chunked_linear_cross_entropy(hidden, weight, labels, chunk_size=16) * factor
    first = torch.autograd.grad(loss, (hidden, weight), retain_graph=True)
    expected = [g.clone() for g in first]
    for g in first:
        g.zero_()  # the caller owns what it got
    second = torch.autograd.grad(loss, (hidden, weight))
    for a, b in zip(expected, second, strict=True):
        assert torch.equal(a, b)


def test_chunked_loss_head_equals_the_plain_head():
    torch.manual_seed(0)
    head = LMHead(32, 300, bias=False)
    hidden = torch.randn(2, 25, 32, requires_grad=True)
    labels = torch.randint(0, 300, (2, 25))
    labels[0, :3] = -100
    plain = head.loss(hidden, labels)
    g_plain = torch.autograd.grad(plain, (hidden, head.weight))
    head.__class__ = ChunkedLossHead
    chunked = head.loss(hidden, labels)
    g_chunked = torch.autograd.grad(chunked, (hidden, head.weight))
    assert torch.allclose(plain, chunked, rtol=1e-5)
    for a, b in zip(g_plain, g_chunked, strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("chunk_size", [16, 64])
def test_the_device_path_is_exact_for_underflowing_targets_without_a_host_sync(monkeypatch, chunk_size):
    """Off CPU, rows whose p(target) underflows to 0 get their exact loss with no host sync
    (`if underflow.any()` in every chunk was 8 syncs a step at 4 micro-batches)."""
    from tests.device_rules import CountHostSyncs, reads_cost_a_sync

    hidden, weight, labels = loss_inputs(50, ignore_every=7)
    with torch.no_grad():
        weight[labels[1]] -= 40 * hidden[1]  # row 1's target: p ~ exp(-2000) = 0 in fp32
    plain = F.cross_entropy(hidden @ weight.T, labels, ignore_index=-100)
    g_plain = torch.autograd.grad(plain * 3, (hidden, weight))
    reads_cost_a_sync(monkeypatch)
    with CountHostSyncs() as syncs:
        chunked = chunked_linear_cross_entropy(hidden, weight, labels, chunk_size=chunk_size)
        g_chunked = torch.autograd.grad(chunked * 3, (hidden, weight))
    assert syncs.count == 0
    assert plain > 30 and torch.allclose(plain, chunked, rtol=1e-5)
    for a, b in zip(g_plain, g_chunked, strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


def test_fp16_gradients_keep_their_precision_below_the_loss_scale():
    """Under fp16 autocast the gradients made in forward are 1/N-scaled before the loss scale
    multiplies them in backward: kept in fp16 they were subnormal (a quarter of their bits
    gone, or zero); summed in fp32 they match the fp32 loss's gradients to fp16's precision."""
    torch.manual_seed(0)
    tokens = 4096
    hidden = torch.randn(tokens, 32, requires_grad=True)
    weight = (torch.randn(300, 32) * 1e-3).requires_grad_()
    labels = torch.randint(0, 300, (tokens,))
    scale = 2.0**16  # GradScaler's initial scale
    reference = torch.autograd.grad(
        chunked_linear_cross_entropy(hidden, weight, labels) * scale, (hidden, weight)
    )
    with torch.autocast("cpu", dtype=torch.float16):
        loss = chunked_linear_cross_entropy(hidden, weight, labels, chunk_size=512)
    grads = torch.autograd.grad(loss * scale, (hidden, weight))
    for ref, got in zip(reference, grads, strict=True):
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        assert (got - ref).norm() / ref.norm() < 5e-3, (got - ref).norm() / ref.norm()
