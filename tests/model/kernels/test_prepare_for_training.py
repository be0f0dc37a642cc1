"""prepare_for_training: which kernels `auto` swaps in, that the swap keeps the model's
parameters and names, and that a model with kernels trains as the plain one does."""

import pytest
import torch

from smoltrain.formats.hf import from_hf_key, hf_state_dict
from smoltrain.formats.model_io import load_model, save_model
from smoltrain.model import CustomLLM
from smoltrain.model.config import get_preset
from smoltrain.model.kernels import AUTO, active_kernels, choose_kernels, prepare_for_training
from tests.conftest import micro_config
from tests.model.test_model import to_transformers


def test_kernels_off_is_the_plain_model_and_auto_keeps_its_parameters():
    torch.manual_seed(0)
    model = CustomLLM(micro_config())
    classes = [type(m) for m in model.modules()]
    params = dict(model.named_parameters())
    assert active_kernels(prepare_for_training(model, "cpu", "bf16", kernels="off")) == []
    assert [type(m) for m in model.modules()] == classes
    prepare_for_training(model, "cpu", "bf16")
    assert active_kernels(model) == ["chunked_loss", "mlp", "attention", "rms_norm"]
    assert model.training
    assert dict(model.named_parameters()) == params  # the very same tensors, by name
    assert model.lm_head.weight is model.embed_tokens.weight  # still tied
    assert "attention" not in choose_kernels("cpu", "fp32")
    assert choose_kernels("mps", "fp32") == ("chunked_loss", "mlp")
    with pytest.raises(ValueError, match="use auto, off or a comma-separated list"):
        choose_kernels("cpu", "fp32", "on")
    assert choose_kernels("cpu", "fp32", "mlp, rms_norm") == ("mlp", "rms_norm")  # one kernel at a time
    assert active_kernels(prepare_for_training(CustomLLM(micro_config()), "cpu", "fp32", "rms_norm")) == [
        "rms_norm"
    ]


def test_a_model_with_kernels_saves_as_the_plain_one(tmp_path):
    torch.manual_seed(0)
    model = prepare_for_training(CustomLLM(micro_config()), "cpu", "bf16")
    save_model(model, tmp_path / "out")
    loaded = load_model(tmp_path / "out")
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("kernels", ["off", "auto"])
@pytest.mark.parametrize("bf16", [False, True])
def test_training_gradients_match_transformers(bf16, kernels):
    """Every parameter's gradient against transformers' plain autograd: fp32 within 1e-4,
    bf16 autocast within bf16 rounding, with the kernels off and on."""
    torch.manual_seed(0)
    plain = CustomLLM(get_preset("tiny", num_hidden_layers=2))
    theirs = to_transformers(plain).train()
    ours = prepare_for_training(plain, "cpu", "bf16" if bf16 else "fp32", kernels)
    ids = torch.randint(0, 1000, (2, 40))
    labels = ids.clone()
    labels[1, :5] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss_ours = ours(ids, labels=labels, return_logits=False).loss
        loss_theirs = theirs(input_ids=ids, labels=labels).loss
    loss_ours.backward()
    loss_theirs.backward()
    assert torch.allclose(loss_ours, loss_theirs, rtol=1e-2 if bf16 else 1e-5)
    params_ours, params_theirs = dict(ours.named_parameters()), dict(theirs.named_parameters())
    for name in hf_state_dict(ours):
        if name == "lm_head.weight":
            continue  # tied: the embedding's gradient already holds it
        a, b = params_ours[from_hf_key(name)].grad, params_theirs[name].grad
        scale = b.abs().max()
        assert (a - b).abs().max() <= (5e-2 if bf16 else 1e-4) * scale, name


@pytest.mark.parametrize("bf16", [False, True])
def test_gradient_checkpointing_same_gradients_with_kernels(bf16):
    """Recomputing each layer in backward changes no gradient, also through the joined
    projections and the CPU attention that bf16 autocast uses."""
    torch.manual_seed(0)
    model = prepare_for_training(CustomLLM(micro_config()), "cpu", "bf16" if bf16 else "fp32")
    ids = torch.randint(0, 256, (2, 16))

    def grads():
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(ids, labels=ids, return_logits=False).loss
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.gradient_checkpointing_enable()
    checkpointed = grads()
    for a, b in zip(plain, checkpointed, strict=True):
        assert torch.allclose(a, b, atol=1e-7)


def test_135m_bf16_step_kernels_off_is_the_sdpa_path_and_auto_is_within_bounds(sdpa_calls):
    """The SmolLM2-135M shape, one bf16 autocast step on CPU: with train.kernels=off the
    gradients are the plain model's exactly, through SDPA's causal kernel without a mask;
    with auto (no SDPA at all on this path) within bf16 rounding of them."""
    torch.manual_seed(0)
    # the 135M width, fewer layers and a smaller vocabulary (CPUs without bf16 units emulate it)
    config = get_preset("smollm2-135m", num_hidden_layers=2, vocab_size=8192)
    ids = torch.randint(0, config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1))

    def step_gradients(kernels):
        torch.manual_seed(0)
        model = CustomLLM(config)
        if kernels is not None:
            prepare_for_training(model, "cpu", "bf16", kernels)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, labels=ids, return_logits=False).loss
        loss.backward()
        return {name: p.grad for name, p in model.named_parameters()}

    plain = step_gradients(None)
    calls = len(sdpa_calls)
    assert calls == 2 * config.num_hidden_layers  # forward and backward of every layer
    for kernel, is_causal, mask in sdpa_calls:
        assert kernel.startswith("_scaled_dot_product_flash_attention_for_cpu") and is_causal and mask is None
    off = step_gradients("off")
    auto = step_gradients("auto")
    assert len(sdpa_calls) == 2 * calls  # "off" ran SDPA again, "auto" not at all
    for name, g in plain.items():
        assert torch.equal(off[name], g), name
        assert (auto[name] - g).abs().max() <= 5e-2 * g.abs().max(), name


def test_auto_kernels_on_cpu_follow_its_vector_class(monkeypatch):
    """fp32 on CPU: the fused RMSNorm paid on AVX2 (+8% on a 135M step) and cost 4% on
    AVX-512, so `auto` picks it by the vector kernels torch runs here."""
    for capability, expected in (
        ("AVX2", ("chunked_loss", "mlp", "rms_norm")),
        ("AVX512", ("chunked_loss", "mlp")),
        ("DEFAULT", AUTO[("cpu", "fp32")]),  # any other class: the two-part key
    ):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        assert choose_kernels("cpu", "fp32") == expected, capability
        assert "rms_norm" in choose_kernels("cpu", "bf16")  # bf16's set is measured on AMX only
