import os
import subprocess
import sys

import pytest
import torch
from transformers import LlamaForCausalLM, MistralForCausalLM

from smoltrain.formats.hf import hf_state_dict
from smoltrain.model import CustomLLM
from smoltrain.model.config import get_preset
from tests.conftest import micro_config


def to_transformers(model: CustomLLM):
    cls = MistralForCausalLM if model.config.sliding_window else LlamaForCausalLM
    hf = cls(model.config.to_hf())
    result = hf.load_state_dict(hf_state_dict(model), strict=False)
    assert result.unexpected_keys == [] and set(result.missing_keys) <= {"lm_head.weight"}
    hf.tie_weights()
    return hf.eval()


def test_parameter_count_and_names():
    with torch.device("meta"):
        model = CustomLLM(get_preset("smollm2-135m"))
    assert model.num_parameters() == 134_515_008
    printed = str(model)
    for name in [
        "embed_tokens",
        "self_attn",
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "rotary_emb",
        "gate_proj",
        "up_proj",
        "down_proj",
        "act_fn",
        "input_norm",
        "post_attn_norm",
        "lm_head",
    ]:
        assert name in printed
    assert "30 x DecoderLayer" in printed


def test_init_follows_initializer_range():
    torch.manual_seed(0)
    model = CustomLLM(get_preset("tiny"))
    std = model.layers[0].mlp.up_proj.weight.std().item()
    assert abs(std - 0.02) < 0.002
    assert torch.all(model.norm.weight == 1)


def test_logits_match_transformers_tiny(tiny_model):
    hf = to_transformers(tiny_model)
    torch.manual_seed(1)
    ids = torch.randint(0, tiny_model.config.vocab_size, (3, 40))
    with torch.no_grad():
        ours, theirs = tiny_model(ids).logits, hf(ids).logits
    assert (ours - theirs).abs().max() < 1e-5

    # left padding, right padding, and explicit position ids
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    mask[2, -5:] = 0
    with torch.no_grad():
        ours, theirs = (
            tiny_model(ids, attention_mask=mask).logits,
            hf(ids, attention_mask=mask).logits,
        )
    assert (ours - theirs)[mask.bool()].abs().max() < 1e-5
    pos = torch.arange(40).repeat(3, 1) + torch.tensor([[0], [5], [100]])
    with torch.no_grad():
        ours, theirs = tiny_model(ids, position_ids=pos).logits, hf(ids, position_ids=pos).logits
    assert (ours - theirs).abs().max() < 1e-5


def test_logits_match_transformers_real_smollm2(smollm2, smollm2_tokenizer):
    ours, theirs = smollm2
    batch = smollm2_tokenizer(
        ["The future of AI is", "Gravity is the force that pulls every object towards"],
        return_tensors="pt",
        padding=True,
        padding_side="left",
    )
    with torch.no_grad():
        a = ours(**batch).logits
        b = theirs(**batch).logits
    real = batch["attention_mask"].bool()
    rel = ((a - b)[real].abs().max() / b[real].abs().max()).item()
    assert rel < 1e-4


def test_loss_matches_transformers(tiny_model):
    hf = to_transformers(tiny_model)
    ids = torch.randint(0, 1000, (2, 30))
    labels = ids.clone()
    labels[0, :4] = -100
    with torch.no_grad():
        ours = tiny_model(ids, labels=labels).loss
        theirs = hf(ids, labels=labels).loss
    assert torch.allclose(ours, theirs, rtol=1e-6)


def test_sliding_window_equals_banded_mask():
    torch.manual_seed(0)
    window = 5
    model = CustomLLM(micro_config(sliding_window=window)).eval()
    T = 24
    ids = torch.randint(0, 256, (2, T))
    q = torch.arange(T)[:, None]
    k = torch.arange(T)[None, :]
    banded = ((k <= q) & (q - k < window))[None, None].expand(2, 1, T, T)
    dense = CustomLLM(micro_config()).eval()
    dense.load_state_dict(model.state_dict())
    with torch.no_grad():
        windowed = model(ids).logits
        explicit = dense(ids, attention_mask=banded).logits
        full = dense(ids).logits
    assert torch.allclose(windowed, explicit, atol=1e-6)
    assert not torch.allclose(windowed, full, atol=1e-3)  # the window does something
    # and transformers' Mistral (our export target for windowed models) agrees
    with torch.no_grad():
        theirs = to_transformers(model)(ids).logits
    assert (windowed - theirs).abs().max() < 1e-5


def test_tied_weights_are_one_tensor(micro_model):
    assert micro_model.lm_head.weight is micro_model.embed_tokens.weight
    untied = CustomLLM(micro_config(tie_word_embeddings=False))
    assert untied.lm_head.weight is not untied.embed_tokens.weight


def test_context_overflow_is_a_clear_error(micro_model):
    with pytest.raises(ValueError, match="exceeds the model's context of 128"):
        micro_model(torch.zeros(1, 129, dtype=torch.long))


@pytest.mark.parametrize("bf16", [False, True])
def test_plain_model_attends_through_sdpa_causal_kernel_without_a_mask(bf16, sdpa_calls):
    """Training and a cache-less forward run SDPA's causal kernel with no mask; padding asks
    for a mask, and then only then."""
    torch.manual_seed(0)
    model = CustomLLM(micro_config()).train()
    ids = torch.randint(0, 256, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        model(ids, labels=ids, return_logits=False).loss.backward()
    assert len(sdpa_calls) == 2 * model.config.num_hidden_layers
    assert all(is_causal and mask is None for _, is_causal, mask in sdpa_calls)
    sdpa_calls.clear()
    padding = torch.ones_like(ids)
    padding[0, :3] = 0
    with torch.no_grad():
        model(ids, attention_mask=padding)
    assert [(c, m is not None) for _, c, m in sdpa_calls] == [(False, True)] * model.config.num_hidden_layers


def test_gradient_checkpointing_same_gradients():
    torch.manual_seed(0)
    model = CustomLLM(micro_config()).train()
    ids = torch.randint(0, 256, (2, 16))

    def grads():
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.gradient_checkpointing_enable()
    for a, b in zip(plain, grads(), strict=True):
        assert torch.allclose(a, b, atol=1e-7)


def test_model_file_is_plain_pytorch():
    """One forward path: no autograd.Function and no device branch in model.py."""
    import inspect

    import smoltrain.model

    source = inspect.getsource(smoltrain.model)
    assert "autograd.Function" not in source and "device.type ==" not in source
    assert len(source.splitlines()) < 450


@pytest.mark.slow
def test_rotary_tables_are_exact_in_a_fresh_process():
    """The cos/sin tables are computed once and kept for the run. torch's CPU cos and sin (MKL)
    choose their kernel on their first call in a process, and two threads making that call
    together could run one thread's half in a low-precision kernel (pytorch#188792: about 3
    fresh processes in 16 built the tiny preset's tables 1.5e-4 off on 2 threads). Each table is
    built first thing in a fresh 2-thread process here, and checked against float64."""
    script = (
        "import torch\n"
        "from smoltrain.model.model import RotaryEmbedding\n"
        "rotary = RotaryEmbedding(32, 1024, 10000.0)\n"
        "exponents = torch.arange(0, 32, 2, dtype=torch.float) / 32\n"
        "angles = torch.arange(1024, dtype=torch.float)[:, None] * (1.0 / 10000.0**exponents)\n"
        "angles = torch.cat((angles, angles), dim=-1).double()\n"
        "print(max((rotary.cos_cached.double() - angles.cos()).abs().max().item(),\n"
        "          (rotary.sin_cached.double() - angles.sin()).abs().max().item()))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    errors = [
        float(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env).stdout)
        for _ in range(16)
    ]
    assert max(errors) < 1e-6, errors
