"""Joined q/k/v and gate/up under bf16 autocast against autocast's separate linears."""

import torch

from smoltrain.model import CustomLLM
from smoltrain.model.kernels import prepare_for_training
from smoltrain.model.kernels.joined_projection import joined_linear
from tests.conftest import micro_config


def test_projections_joined_under_bf16_autocast():
    """q/k/v and gate/up run as one matmul each under bf16 autocast: one bf16 copy of their
    input is kept for backward, and outputs and gradients equal autocast's separate linears
    (the input's gradient in fp32). A hooked projection is called as a module instead."""
    torch.manual_seed(0)
    model = prepare_for_training(CustomLLM(micro_config()), "cpu", "bf16")
    hidden = model.config.hidden_size
    ids = torch.randint(0, 256, (2, 16))
    storages = set()

    def pack(t):
        if t.dtype == torch.bfloat16 and t.shape[-1] == hidden and t.numel() == 2 * 16 * hidden:
            storages.add(t.untyped_storage().data_ptr())
        return t

    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(ids, labels=ids, return_logits=False).loss
    loss.backward()
    # per layer: the attention input, the MLP input and the attention output (o_proj's input);
    # autocast alone made 6
    assert len(storages) == 3 * model.config.num_hidden_layers
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())

    attn = model.layers[0].self_attn
    linears = (attn.q_proj, attn.k_proj, attn.v_proj)
    leaf = torch.randn(4, hidden, requires_grad=True)
    x = leaf * 1.0  # not a leaf: autocast would cache a leaf's cast (and sum its grads in bf16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        joined = joined_linear(x, *linears)
        separate = [m(x) for m in linears]
    for a, b in zip(joined, separate, strict=True):
        assert a.dtype == b.dtype == torch.bfloat16
        assert torch.allclose(a.float(), b.float(), rtol=1e-2, atol=1e-2)
    wrt = [leaf, *(m.weight for m in linears)]
    grads_joined = torch.autograd.grad(sum(y.float().sum() for y in joined), wrt, retain_graph=True)
    grads_separate = torch.autograd.grad(sum(y.float().sum() for y in separate), wrt)
    for a, b in zip(grads_joined, grads_separate, strict=True):
        assert a.dtype == b.dtype == torch.float32
        assert torch.allclose(a, b, rtol=1e-2, atol=1e-2 * b.abs().max().item())

    calls = []
    attn.k_proj.register_forward_hook(lambda module, args, out: calls.append(out.shape))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        joined_linear(x, *linears)
    assert calls == [(4, attn.k_proj.out_features)]
