"""Weight-only quantized linears (int8 per row, int4 in groups of 32): each weight within half
a quantization step, the kernels equal to a matmul on the dequantized weights, and a quantized
model's greedy tokens equal to the plain model's wherever its logits' error cannot swap the top
two."""

import pytest
import torch
import torch.nn.functional as F

from smoltrain.generate import generate, prepare_for_generation
from smoltrain.model import CustomLLM
from smoltrain.model.kernels.quantized import COMPUTE_DTYPE, INT4_GROUP, Int4Linear, Int8Linear, grid_steps
from tests.conftest import micro_config


def weight(rows: int = 96, cols: int = 160) -> torch.Tensor:
    torch.manual_seed(0)
    w = torch.randn(rows, cols) * 0.05
    w[3, 7] = 1.0  # an outlier sets its row's (int8) or group's (int4) step
    return w


def test_int8_rounds_each_weight_to_within_half_a_step_of_its_row():
    w = weight()
    linear = Int8Linear.from_weight(w)
    step = w.abs().amax(dim=1, keepdim=True) / 127
    # the scale is kept in bf16 (the kernel's dtype): its rounding adds up to 2^-8 of a weight
    assert ((linear.dequantized() - w).abs() <= step / 2 + w.abs() * 2**-8 + 1e-7).all()


def test_int4_rounds_each_weight_to_within_half_a_step_of_its_group():
    w = weight()
    linear = Int4Linear.from_weight(w)
    groups = w.view(w.shape[0], -1, INT4_GROUP)
    step = (groups.amax(-1, keepdim=True) - groups.amin(-1, keepdim=True)) / 15
    error = (linear.dequantized() - w).view_as(groups).abs()
    # bf16 scales, zeros and outputs round by 2^-8 of the group's largest magnitude
    assert (error <= step / 2 + groups.abs().amax(-1, keepdim=True) * 2**-7).all()


def test_int4_keeps_the_grid_a_gguf_block_already_lies_on():
    """Weights dequantized from q4_1 (levels 0..15 above a minimum), q4_0 (-8..7 around zero,
    the top levels unused) or a block using a few levels come back on their own grid, not
    rounded a second time; a trained weight's groups and constant ones lie on none."""
    torch.manual_seed(0)
    shape = (64, 5, INT4_GROUP)
    # steps and minimums of few bits: the kernel's bf16 scales and zeros hold them exactly, so
    # a weight kept on its grid comes back exactly and one rounded again does not
    steps = torch.randint(1, 9, shape[:2]) * 2.0**-9
    mins = -torch.randint(0, 5, shape[:2]) * 2.0**-6
    q4_1 = torch.randint(0, 16, shape).float()
    q4_0 = torch.randint(-8, 6, shape).float()
    q4_0[..., 9] = -8
    few = torch.tensor([0.0, 2.0, 5.0, 9.0])[torch.randint(0, 4, shape)]
    few[..., 4], few[..., 30] = 0, 9
    for levels, offset in ((q4_1, mins), (q4_0, 0 * mins), (few, mins)):
        groups = levels * steps[..., None] + offset[..., None]
        lows, highs = groups.amin(-1), groups.amax(-1)
        found = grid_steps(groups, lows, highs)
        on_grid = (groups - lows[..., None]) / found[..., None]
        assert ((on_grid - on_grid.round()).abs() < 1e-3).all() and (on_grid <= 15 + 1e-3).all()
        w = groups.reshape(shape[0], -1)
        assert torch.equal(Int4Linear.from_weight(w).dequantized(), w)
    trained = torch.randn(shape) * 0.05
    assert grid_steps(trained, trained.amin(-1), trained.amax(-1)).isinf().all()
    constant = torch.full(shape, 0.25)
    assert grid_steps(constant, constant.amin(-1), constant.amax(-1)).isinf().all()


@pytest.mark.parametrize("kind", [Int8Linear, Int4Linear])
@pytest.mark.parametrize("shape", [(1, 1), (2, 8), (1, 33)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_linears_compute_the_dequantized_matmul(kind, shape, dtype):
    w = weight()
    linear = kind.from_weight(w)
    x = torch.randn(*shape, w.shape[1], dtype=dtype)
    y = linear(x)
    assert y.shape == (*shape, w.shape[0]) and y.dtype == dtype
    expected = F.linear(x.to(COMPUTE_DTYPE).float(), linear.dequantized())
    scale = expected.abs().max()
    assert (y.float() - expected).abs().max() <= 1e-2 * scale


def test_the_quantized_error_of_a_layer_is_bounded_against_the_plain_one():
    w = weight(576, 576)
    x = torch.randn(4, 576)
    plain = F.linear(x, w)
    for kind, bound in ((Int8Linear, 0.02), (Int4Linear, 0.15)):
        relative = (kind.from_weight(w)(x) - plain).norm() / plain.norm()
        assert relative < bound, (kind.__name__, relative)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_a_quantized_model_decodes_the_plain_models_tokens_where_its_error_allows(kind):
    torch.manual_seed(0)
    config = micro_config(hidden_size=64, intermediate_size=128, vocab_size=256)
    plain = CustomLLM(config).eval()
    quantized = CustomLLM(config).eval()
    quantized.load_state_dict(plain.state_dict())
    quantized = prepare_for_generation(quantized, quantize=kind)
    assert (
        type(quantized.layers[0].mlp.down_proj).__name__ == {"int8": "Int8Linear", "int4": "Int4Linear"}[kind]
    )
    assert type(quantized.lm_head).__name__ == "Int8Linear"  # int4 keeps the head in int8
    ids = torch.randint(0, 256, (4, 12))
    start = ids.shape[1]
    with torch.inference_mode():
        reference = generate(plain, ids, max_new_tokens=16, eos_token_id=[])
        ours = generate(quantized, ids, max_new_tokens=16, eos_token_id=[])
        # teacher-forced on the plain model's tokens: the error of every logit
        logits, their_logits = plain(reference).logits, quantized(reference).logits
        own_logits = quantized(ours).logits
    error = (logits - their_logits).abs().amax(-1)
    assert (error.max() / logits.abs().max()) < {"int8": 0.03, "int4": 0.3}[kind]
    # decoding one token at a time (the kernels on one row) picks what the whole sequence's
    # forward (many rows) ranks first, but at near-ties of bf16 rounding
    top2 = own_logits[:, start - 1 : -1].topk(2, dim=-1)
    clear = (top2.values[..., 0] - top2.values[..., 1]) > 1e-2 * own_logits.abs().max()
    assert (top2.indices[..., 0] == ours[:, start:])[clear].all() and clear.float().mean() > 0.8
    # and the plain model's tokens up to the first step whose top two its error could swap
    top2 = logits.topk(2, dim=-1).values
    safe = (top2[..., 0] - top2[..., 1]) > 2 * error
    compared = 0
    for row in range(ids.shape[0]):
        for t in range(start, reference.shape[1]):
            if not safe[row, t - 1]:
                break  # from here on the rows may part, as they would at a near-tie
            assert ours[row, t] == reference[row, t], (row, t)
            compared += 1
    assert compared > 0 or kind == "int4"  # int4's error on a random model is often the margin


def test_quantize_says_what_it_cannot_do():
    with torch.device("meta"):
        on_meta = CustomLLM(micro_config())
    with pytest.raises(ValueError, match="CPU kernels; on meta leave it off"):
        prepare_for_generation(on_meta, quantize="int8")
    odd_hidden = dict(hidden_size=48, num_attention_heads=3, num_key_value_heads=1)
    for odd in (dict(intermediate_size=80), odd_hidden):
        with pytest.raises(ValueError, match="multiples of 32"):  # not a reshape's traceback
            prepare_for_generation(CustomLLM(micro_config(**odd)), quantize="int4")
    with pytest.raises(ValueError, match="choose int8 or int4"):
        prepare_for_generation(CustomLLM(micro_config()), quantize="int3")
    done = prepare_for_generation(CustomLLM(micro_config()), quantize="int8")
    with pytest.raises(ValueError, match="prepared with quantize=int8"):
        prepare_for_generation(done, quantize="int4")
