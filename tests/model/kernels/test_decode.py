import pytest
import torch
import torch.nn.functional as F

from smoltrain.model.kernels.decode import one_query_attention


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_query_attention_is_sdpas_eager_and_compiled(dtype):
    """The compiled decode step's attention (on CPU: products and sums the compiler fuses)
    and its eager form (matmuls) both equal SDPA's, grouped heads and masked slots included."""
    B, nh, n_kv, S, hd = 2, 6, 2, 40, 16
    generator = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(B, n, t, hd, generator=generator).to(dtype) for n, t in ((nh, 1), (n_kv, S), (n_kv, S))
    )
    mask = torch.rand(B, 1, 1, S, generator=generator) < 0.7
    mask[:, ..., 0] = True  # every row sees a slot
    expected = F.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True
    )
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    eager = one_query_attention(q, k, v, mask)
    step = torch.compile(one_query_attention, fullgraph=True, dynamic=False)
    compiled = step(q, k, v, mask)
    for out in (eager, compiled):
        assert out.shape == (B, nh, 1, hd) and out.dtype == dtype
        torch.testing.assert_close(out.float(), expected, **tolerance)
    # compiled on CPU, no matmul is called: the products are in the compiler's own loops
    with torch.profiler.profile() as profile:
        step(q, k, v, mask)
    assert not {event.name for event in profile.events()} & {"aten::bmm", "aten::matmul", "aten::mm"}
