"""Document masks: FlexAttention's block mask (the CUDA path, forward checked here on CPU)
against the dense boolean mask, and which SDPA path and arguments each batch kind takes."""

import pytest
import torch

from smoltrain.model import CustomLLM
from smoltrain.model.kernels import flex_attention as flex
from smoltrain.model.kernels import prepare_for_training
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


def random_packed_ids(B: int, T: int, seed: int) -> torch.Tensor:
    """Rows as `data.packed_example` builds them: ids counting documents of random lengths,
    one row with a padded tail (-1) and one a single document."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for row in range(B):
        lengths = torch.randint(1, 300, (T,), generator=generator)
        ids = torch.repeat_interleave(torch.arange(T), lengths)[:T]
        if row == 1:
            ids[T - T // 5 :] = -1
        if row == 2:
            ids[:] = 0
        rows.append(ids)
    return torch.stack(rows)


@pytest.mark.parametrize("T", [256, 640, 300])
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_the_block_tables_from_document_bounds_match_create_block_mask(T):
    """The tables built from the documents' bounds allow exactly what torch's
    `create_block_mask` (the mask evaluated everywhere) allows, and attention through
    both is the same, also for a length that is not a multiple of the block."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    document_ids = random_packed_ids(3, T, seed=T)

    def same_document_causal(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (document_ids[b, q_idx] == document_ids[b, kv_idx])

    want = create_block_mask(same_document_causal, 3, None, T, T, device="cpu")
    got = flex.document_block_mask(document_ids).block_mask
    assert torch.equal(got.to_dense(), want.to_dense())
    if T % 128 == 0:  # the same blocks skipped, and the same ones run without the mask
        assert torch.equal(got.kv_num_blocks, want.kv_num_blocks)
        assert torch.equal(got.full_kv_num_blocks, want.full_kv_num_blocks)
    q, k, v = torch.randn(3, 3, 2, T, 16).unbind(0)
    assert torch.allclose(flex_attention(q, k, v, block_mask=got), flex_attention(q, k, v, block_mask=want))


def test_the_block_mask_is_built_without_reading_a_value_on_the_host():
    """No `.item()` or `.tolist()`: on CUDA each would stall the step (a host sync)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class HostReads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.reads = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default):
                self.reads.append(func)
            return func(*args, **(kwargs or {}))

    with HostReads() as mode:
        flex.document_block_mask(random_packed_ids(4, 1024, seed=0))
    assert mode.reads == []


def test_a_compiled_forward_calls_flex_attention_plainly_on_cuda(monkeypatch):
    """An eager CUDA forward calls FlexAttention compiled on its own; inside torch.compile
    the plain one, which the outer graph fuses (the compiled one nested there broke the
    graph in every layer on an H200: dynamo cannot trace its autograd wrapper)."""
    from torch.nn.attention.flex_attention import flex_attention

    def compiled_on_its_own(*args, **kwargs):
        raise AssertionError("not called here")

    monkeypatch.setattr(flex, "_compiled_flex_attention", lambda: compiled_on_its_own)
    cuda = torch.device("cuda")
    assert flex.flex_kernel(cuda) is compiled_on_its_own
    assert flex.flex_kernel(torch.device("cpu")) is flex_attention

    @torch.compile(backend="eager", fullgraph=True)
    def plain_inside(x: torch.Tensor) -> torch.Tensor:
        return x + (1 if flex.flex_kernel(cuda) is flex_attention else 0)

    assert plain_inside(torch.zeros(1)).item() == 1
