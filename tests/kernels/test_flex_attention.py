"""Document masks: FlexAttention's block mask (the CUDA path, forward checked here on CPU)
against the dense boolean mask, and which SDPA path and arguments each batch kind takes."""

import pytest
import torch

from smoltrain.kernels import flex_attention as flex
from smoltrain.kernels import prepare_for_training
from smoltrain.model import CustomLLM
from tests.conftest import micro_config


def packed_batch(B: int = 2, T: int = 96):
    """Documents of uneven lengths packed into rows, and their ids."""
    torch.manual_seed(0)
    lengths = [5, 40, 1, 17, 33, 70, 26]
    ids = torch.cat([torch.full((n,), d) for d, n in enumerate(lengths)])[: B * T].view(B, T)
    return torch.randint(0, 256, (B, T)), ids - ids[:, :1]


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_the_block_mask_gives_the_dense_masks_logits(monkeypatch):
    monkeypatch.setattr(flex, "flex_applies", lambda device: True)  # as on CUDA
    input_ids, document_ids = packed_batch()
    torch.manual_seed(0)
    plain = CustomLLM(micro_config()).eval()
    kernel = prepare_for_training(CustomLLM(micro_config()), "cuda", "fp32").eval()
    kernel.load_state_dict(plain.state_dict())
    assert type(kernel).__name__ == "FlexMaskLLM"
    assert isinstance(kernel.attention_mask(None, document_ids, 0, 96), flex.FlexMask)
    with torch.no_grad():  # torch's FlexAttention has no backward on CPU
        want = plain(input_ids, document_ids=document_ids).logits
        got = kernel(input_ids, document_ids=document_ids).logits
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    # off CUDA the same model takes the dense mask, so CPU training works
    monkeypatch.setattr(flex, "flex_applies", lambda device: False)
    assert kernel.attention_mask(None, document_ids, 0, 96).shape == (2, 1, 96, 96)


def test_plain_and_padded_batches_take_the_causal_kernel(sdpa_calls):
    """No mask (is_causal=True, attn_mask None: flash on CUDA) in training, forward and
    backward, for packed blocks and for right-padded rows (data.mode=pad sends no mask)."""
    torch.manual_seed(0)
    model = prepare_for_training(CustomLLM(micro_config()), "cuda", "fp32")
    input_ids, _ = packed_batch()
    labels = input_ids.clone()
    labels[1, 60:] = -100  # a padded tail
    model(input_ids, labels=labels, return_logits=False).loss.backward()
    assert sdpa_calls and all(causal and mask is None for _, causal, mask in sdpa_calls), sdpa_calls


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_document_masks_call_flex_attention_and_not_sdpa(monkeypatch):
    """Through the block mask every layer calls FlexAttention (compiled into one fused kernel
    on CUDA) and never SDPA, whose boolean mask would take its math kernel. (Counted by
    wrapping both: FlexAttention refuses to run under a dispatch mode.)"""
    monkeypatch.setattr(flex, "flex_applies", lambda device: True)
    calls = []
    attend, sdpa = flex.FlexMask.attend, torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(flex.FlexMask, "attend", lambda *a, **k: calls.append("flex") or attend(*a, **k))
    monkeypatch.setattr(
        torch.nn.functional,
        "scaled_dot_product_attention",
        lambda *a, **k: calls.append("sdpa") or sdpa(*a, **k),
    )
    model = prepare_for_training(CustomLLM(micro_config()), "cuda", "fp32")
    input_ids, document_ids = packed_batch()
    with torch.no_grad():
        model(input_ids, document_ids=document_ids, labels=input_ids, return_logits=False)
    assert calls == ["flex"] * model.config.num_hidden_layers


def test_flex_attention_gets_one_dtype_under_autocast(monkeypatch):
    """Under autocast rotary leaves q and k in fp32 beside a bf16 v; FlexAttention before
    torch 2.10 refused the mix (SDPA casts them itself). The kernel casts q and k to v's."""
    from torch.nn.attention import flex_attention as torch_flex

    seen = []
    real = torch_flex.flex_attention
    monkeypatch.setattr(
        torch_flex,
        "flex_attention",
        lambda q, k, v, **kw: seen.append((q.dtype, k.dtype, v.dtype)) or real(q, k, v, **kw),
    )
    _, document_ids = packed_batch(1, 32)
    mask = flex.document_block_mask(document_ids)
    q, k = torch.randn(1, 4, 32, 16), torch.randn(1, 2, 32, 16)
    v = torch.randn(1, 2, 32, 16, dtype=torch.bfloat16)
    with torch.no_grad():
        out = mask.attend(q, k, v, enable_gqa=True)
    assert seen == [(torch.bfloat16,) * 3] and out.dtype == torch.bfloat16
