"""TrainingMLP (joined gate/up, product recomputed in backward) against the plain MLP."""

import pytest
import torch

from smoltrain.model import MLP
from smoltrain.model.kernels import swap_class
from smoltrain.model.kernels.gated_mlp import TrainingMLP
from tests.conftest import micro_config


@pytest.mark.parametrize("bf16", [False, True])
def test_training_mlp_matches_the_plain_mlp_and_keeps_less(bf16):
    torch.manual_seed(0)
    mlp = MLP(micro_config())
    x = torch.randn(2, 16, 64, requires_grad=True)
    grad_out = torch.randn(2, 16, 64)

    def run():
        saved = []
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
                y = mlp(x)
        grads = torch.autograd.grad(y, (x, *mlp.parameters()), grad_out.to(y.dtype))
        return y.float(), grads, sum(t.numel() for t in saved)

    y_plain, grads_plain, kept_plain = run()
    swap_class(mlp, TrainingMLP)
    y_ours, grads_ours, kept_ours = run()
    tolerance = 2e-2 if bf16 else 1e-5
    assert (y_ours - y_plain).abs().max() <= tolerance * y_plain.abs().max()
    for a, b in zip(grads_ours, grads_plain, strict=True):
        assert a.dtype == b.dtype
        assert (a - b).abs().max() <= tolerance * b.abs().max()
    assert kept_ours < kept_plain  # silu(gate) and the product are not kept
