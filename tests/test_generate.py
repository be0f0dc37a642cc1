import pytest
import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from smoltrain import generate as generate_module
from smoltrain.formats.model_io import load_model, save_model
from smoltrain.generate import (
    decode_step,
    generate,
    prepare_for_generation,
    process_logits,
    stream_generate,
    stream_text,
)
from smoltrain.model import CustomLLM
from smoltrain.model.kernels import decode
from smoltrain.model.kernels.decode import PackedLLM, ReductionLinear, onednn_linear_works, pack
from smoltrain.model.model import KVCache
from tests.conftest import micro_config
from tests.model.test_model import to_transformers


def greedy_by_recompute(model, ids, n):
    """Reference: no cache, the whole sequence through the model at every step."""
    for _ in range(n):
        with torch.no_grad():
            next_id = model(ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_id], dim=1)
    return ids


def first_layers(model: CustomLLM, n: int) -> CustomLLM:
    """The model's first `n` decoder layers (its embedding, norm and head kept)."""
    model.layers = model.layers[:n]
    model.config.num_hidden_layers = n
    return model


def test_cached_greedy_equals_recompute(tiny_model):
    ids = torch.randint(0, 1000, (1, 12))
    cached = generate(tiny_model, ids, max_new_tokens=20, eos_token_id=[])
    assert torch.equal(cached, greedy_by_recompute(tiny_model, ids, 20))


def test_greedy_equals_transformers_generate(tiny_model):
    hf = to_transformers(tiny_model)
    ids = torch.randint(0, 1000, (1, 9))
    ours = generate(tiny_model, ids, max_new_tokens=25, eos_token_id=[])
    theirs = hf.generate(ids, max_new_tokens=25, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours, theirs)


def test_real_smollm2_greedy_equals_transformers(smollm2, smollm2_tokenizer):
    ours, theirs = smollm2
    ids = smollm2_tokenizer("The future of AI is", return_tensors="pt")["input_ids"]
    a = generate(ours, ids, max_new_tokens=24)
    b = theirs.generate(ids, max_new_tokens=24, do_sample=False)
    assert a.tolist() == b.tolist()


def test_onednn_linears_only_where_timed_faster(monkeypatch):
    """On CPU the oneDNN linears are used where timing one layer's weights at one row shows
    them faster, and the model is left as it is where not; the timing compares the two."""
    model = CustomLLM(micro_config())
    weights = decode.layer_weights(model)
    assert [w.shape for w in weights] == [
        (
            model.config.hidden_size + 2 * model.config.num_key_value_heads * model.config.head_dim,
            model.config.hidden_size,
        ),
        model.layers[0].self_attn.o_proj.weight.shape,
        (2 * model.config.intermediate_size, model.config.hidden_size),
        model.layers[0].mlp.down_proj.weight.shape,
    ]
    rows = [torch.ones(1, 1, w.shape[1]) for w in weights]
    assert decode.seconds_per_pass([decode.OneDNNLinear(w) for w in weights], rows, repeats=3) > 0
    timed = iter([1.0, 2.0, 1.0, 1.05])  # oneDNN's pass, then F.linear's, per call
    monkeypatch.setattr(decode, "seconds_per_pass", lambda linears, rows: next(timed))
    assert decode.onednn_linear_pays(weights)  # 1.1 x 1.0 < 2.0
    assert not decode.onednn_linear_pays(weights)  # within 10%: not worth a copy of the weights
    for pays in (True, False):
        monkeypatch.setattr(generate_module, "onednn_linear_pays", lambda weights, pays=pays: pays)
        prepared = prepare_for_generation(CustomLLM(micro_config()))
        assert isinstance(prepared, PackedLLM) == pays and not prepared.training
        assert not any(p.requires_grad for p in prepared.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepared_model_generates_what_the_plain_one_does(dtype, tmp_path, monkeypatch):
    """prepare_for_generation (oneDNN linears, merged q/k/v and gate/up) changes speed only:
    same logits up to rounding, same greedy tokens in fp32, batched and padded too."""
    torch.manual_seed(0)
    monkeypatch.setattr(generate_module, "onednn_linear_pays", lambda weights: True)  # timed on its own
    plain = first_layers(load_model("smollm2", dtype=dtype), 4)  # SmolLM2's weights, quicker
    prepared = prepare_for_generation(first_layers(load_model("smollm2", dtype=dtype), 4))
    if not onednn_linear_works(dtype):  # a CPU without bf16 units has no oneDNN bf16 linear
        assert dtype == torch.bfloat16 and type(prepared) is type(plain) and not prepared.training
        return
    assert isinstance(prepared, PackedLLM) and not any(p.requires_grad for p in prepared.parameters())
    assert prepared.num_parameters() == plain.num_parameters()
    assert prepare_for_generation(prepared) is prepared  # a second call changes nothing
    ids = torch.randint(3, 49152, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in the second row
    with torch.inference_mode():
        a = plain(ids, attention_mask=mask).logits.float()
        b = prepared(ids, attention_mask=mask).logits.float()
    assert (a - b).abs().max() <= (1e-4 if dtype == torch.float32 else 0.1) * a.abs().max()
    if dtype == torch.float32:
        args = dict(attention_mask=mask, max_new_tokens=30, eos_token_id=[])
        assert torch.equal(generate(plain, ids, **args), generate(prepared, ids, **args))
    with pytest.raises(ValueError, match="prepare_for_generation"):
        save_model(prepared, tmp_path / "out")
    with pytest.raises(ValueError, match="computes no loss"):
        prepared(ids, labels=ids)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("sliding_window", [None, 5])
def test_static_cache_steps_equal_the_growing_cache(sliding_window):
    """The decode step torch.compile captures (fixed-capacity cache written at a tensor
    position, mask over every slot), run eagerly here: the same greedy tokens as the
    growing cache, with left padding and a sliding window."""
    torch.manual_seed(0)
    model = CustomLLM(micro_config(sliding_window=sliding_window)).eval()
    ids = torch.randint(3, 256, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, :4] = mask[2, :1] = 0
    args = dict(attention_mask=mask, max_new_tokens=40, eos_token_id=[])
    growing = generate(model, ids, **args)
    pack(model, ReductionLinear, decode_step)  # run eagerly
    assert torch.equal(generate(model, ids, **args), growing)


def test_compiled_decode_generates_what_the_plain_one_does(tmp_path, monkeypatch):
    """prepare_for_generation(compile=True): the same greedy tokens in fp32, batched and
    padded, and one compiled graph serves generations of other lengths (on CPU the slots
    read are a dynamic dimension). Its guards check the inputs, not the model's weights and
    modules, and a second compiled model of another kind (int8) runs its own graph."""
    from torch._dynamo.utils import counters

    kept = []

    def recording(guards):
        keep = generate_module.guards_outside_the_model(guards)
        kept.extend(guard.name for guard, k in zip(guards, keep, strict=True) if k)
        return keep

    options = generate_module.decode_compile_mode("cpu")  # as it is, but the guards recorded
    options = {"options": {**options["options"], "guard_filter_fn": recording}}
    monkeypatch.setattr(generate_module, "decode_compile_mode", lambda device: options)
    plain = first_layers(load_model("smollm2"), 2)  # SmolLM2's weights, 2 layers: 7x quicker to compile
    compiled = prepare_for_generation(first_layers(load_model("smollm2"), 2), compile=True)
    assert compiled.decode_step is not None and compiled.num_parameters() == plain.num_parameters()
    ids = torch.randint(3, 49152, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    args = dict(attention_mask=mask, max_new_tokens=30, eos_token_id=[])
    assert torch.equal(generate(compiled, ids, **args), generate(plain, ids, **args))
    graphs = counters["stats"]["unique_graphs"]
    args["max_new_tokens"] = 12
    assert torch.equal(generate(compiled, ids, **args), generate(plain, ids, **args))
    assert counters["stats"]["unique_graphs"] == graphs  # no recompilation
    assert {"input_ids", "mask", "cache_position"} <= set(kept) and "model" in kept
    assert not [name for name in kept if name.startswith(("model.", "model["))]
    int8 = prepare_for_generation(first_layers(load_model("smollm2"), 2), compile=True, quantize="int8")
    int8_eager = prepare_for_generation(first_layers(load_model("smollm2"), 2), quantize="int8")
    int8_eager.decode_step = decode_step  # its step uncompiled, on the same 16-bit cache
    assert torch.equal(generate(int8, ids, **args), generate(int8_eager, ids, **args))
    with pytest.raises(ValueError, match="load the model again, move or cast it"):
        compiled.to(torch.float64)
    with pytest.raises(ValueError, match="prepare_for_generation"):
        save_model(compiled, tmp_path / "out")
    monkeypatch.setattr(generate_module, "onednn_linear_pays", lambda weights: True)
    with pytest.raises(ValueError, match="without compile=True"):  # packed for oneDNN already
        prepare_for_generation(prepare_for_generation(load_model("smollm2")), compile=True)


def test_batched_left_padding_equals_one_by_one(tiny_model):
    prompts = [torch.randint(3, 1000, (n,)) for n in (4, 11, 7)]
    T = max(len(p) for p in prompts)
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p) :], mask[i, T - len(p) :] = p, 1
    batched = generate(tiny_model, ids, attention_mask=mask, max_new_tokens=15, eos_token_id=[])
    for i, p in enumerate(prompts):
        alone = generate(tiny_model, p[None], max_new_tokens=15, eos_token_id=[])
        assert torch.equal(batched[i, T:], alone[0, len(p) :])


def test_stops_at_eos_per_row(tiny_model):
    ids = torch.randint(3, 1000, (2, 6))
    free = generate(tiny_model, ids, max_new_tokens=10, eos_token_id=[])
    new0 = free[0, 6:].tolist()
    j = 0  # row 0's first new token becomes the EOS: that row stops at once
    eos = new0[j]
    out = generate(tiny_model, ids, max_new_tokens=10, eos_token_id=eos, pad_token_id=0)
    assert out[0, : 6 + j + 1].tolist() == free[0, : 6 + j + 1].tolist()
    assert all(t == 0 for t in out[0, 6 + j + 1 :].tolist())
    new1 = free[1, 6:].tolist()
    stop1 = new1.index(eos) + 1 if eos in new1 else 10
    assert out[1, 6 : 6 + stop1].tolist() == new1[:stop1]
    assert eos in new1 or out.shape[1] == 16  # the other row goes on to max_new_tokens


def test_sampling_processors_match_transformers():
    torch.manual_seed(0)
    logits = torch.randn(3, 100)
    seen = torch.randint(0, 100, (3, 8))
    theirs = LogitsProcessorList(
        [
            RepetitionPenaltyLogitsProcessor(1.3),
            TemperatureLogitsWarper(0.7),
            TopKLogitsWarper(20),
            TopPLogitsWarper(0.9),
        ]
    )(seen, logits.clone())
    ours = process_logits(logits, seen, True, 0.7, 20, 0.9, 1.3)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    finite = ~torch.isinf(theirs)
    assert torch.allclose(ours[finite], theirs[finite])


def test_sampling_is_seeded_and_top_k_1_is_greedy(tiny_model):
    ids = torch.randint(0, 1000, (2, 5))
    kw = dict(max_new_tokens=10, do_sample=True, temperature=1.5, eos_token_id=[])
    assert torch.equal(generate(tiny_model, ids, seed=3, **kw), generate(tiny_model, ids, seed=3, **kw))
    greedy = generate(tiny_model, ids, max_new_tokens=10, eos_token_id=[])
    assert torch.equal(generate(tiny_model, ids, seed=1, top_k=1, **kw), greedy)


def test_stream_yields_what_generate_returns(tiny_model):
    ids = torch.randint(0, 1000, (1, 5))
    streamed = torch.stack(list(stream_generate(tiny_model, ids, max_new_tokens=8, eos_token_id=[])), 1)
    assert torch.equal(streamed, generate(tiny_model, ids, max_new_tokens=8, eos_token_id=[])[:, 5:])


def test_stream_text_concatenates_to_decoded(smollm2, smollm2_tokenizer):
    ours, _ = smollm2
    ids = smollm2_tokenizer("Écris un poème sur la mer 🌊:", return_tensors="pt")["input_ids"]
    text = "".join(stream_text(ours, smollm2_tokenizer, ids, max_new_tokens=12))
    full = generate(ours, ids, max_new_tokens=12)[0, ids.shape[1] :]
    assert text == smollm2_tokenizer.decode(full, skip_special_tokens=True)


def test_bad_generation_input(tiny_model):
    too_long = torch.zeros(1, tiny_model.config.max_position_embeddings, dtype=torch.long)
    with pytest.raises(ValueError, match="shorten the prompt"):
        generate(tiny_model, too_long, max_new_tokens=1)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        generate(tiny_model, torch.zeros(1, 3, dtype=torch.long), do_sample=True, temperature=0)
    with pytest.raises(ValueError, match="top_p"):
        generate(tiny_model, torch.zeros(1, 3, dtype=torch.long), do_sample=True, top_p=1.5)


def test_the_compiled_decode_path_reuses_one_cache_per_shape(micro_model):
    """The decode step's KV cache is kept per (batch, capacity) and reused: CUDA graphs are
    recorded on its buffers' addresses, so a fresh cache per request re-recorded them every
    time. (The step runs eagerly here: the same path, without compiling.) Reuse changes no
    token: stale keys of the last request are masked, and on CPU never read: each step's mask
    covers the slots filled so far."""
    reference = [generate(micro_model, torch.tensor([p]), max_new_tokens=6) for p in ([5, 6, 7], [9, 3])]
    widths = []

    def step(model, ids, positions, cache_position, mask, cache):
        widths.append(mask.shape[-1])
        return decode_step(model, ids, positions, cache_position, mask, cache)

    model = pack(micro_model, ReductionLinear, step)  # as compile=True does, uncompiled
    made = []
    real = model.decode_cache
    model.decode_cache = lambda *a, **k: made.append(real(*a, **k)) or made[-1]
    outputs = [generate(model, torch.tensor([p]), max_new_tokens=6) for p in ([5, 6, 7], [9, 3], [5, 6, 7])]
    assert [torch.equal(a, b) for a, b in zip(outputs, [*reference, reference[0]], strict=True)] == [True] * 3
    assert len(made) == 3 and made[0] is made[1] is made[2] and made[0].capacity == 128  # the context
    assert made[0].keys[0].dtype == torch.float16  # an fp32 model's cache on CPU: half the bytes
    assert widths[:5] == [4, 5, 6, 7, 8]  # the first prompt's 3 tokens, then one slot a step
    assert model.decode_cache(2, 128) is not made[0]  # another batch size: its own


def test_generation_runs_in_inference_mode(micro_model):
    """No autograd graph is built while decoding (the tokens come out as inference tensors),
    whether or not the model's parameters require gradients."""
    first = next(stream_generate(micro_model, torch.tensor([[5, 6, 7]]), max_new_tokens=2))
    assert torch.is_inference(first)


def test_a_narrower_cache_returns_the_activations_dtype(micro_model):
    """A 16-bit cache under fp32 activations: the prompt attends to its own keys, exact; later
    tokens get the stored ones back in fp32, rounded to fp16; a compiled step's write rounds
    too. A cache wider than the activations (FSDP2's bf16 from fp32 shards) narrows to them."""
    config = micro_model.config
    cache = KVCache(config, 1, 16, "cpu", torch.float16)
    k, v = torch.randn(2, 1, config.num_key_value_heads, 4, config.head_dim).unbind(0)
    keys, values = cache.update(0, k, v)
    assert keys is k and values is v
    cache.advance(4)
    more = torch.randn(1, config.num_key_value_heads, 1, config.head_dim)
    keys, values = cache.update(0, more, more)
    assert keys.dtype == torch.float32 and keys.shape[2] == 5
    assert torch.equal(keys[:, :, :4], k.half().float()) and not torch.equal(keys[:, :, :4], k)
    keys, _ = cache.update(1, more, more, cache_position=torch.tensor([7]))
    assert keys.dtype == torch.float16 and torch.equal(keys[:, :, 7], more[:, :, 0].half())
    wide = KVCache(config, 1, 16, "cpu", torch.float32)
    keys, _ = wide.update(0, k.bfloat16(), v.bfloat16())
    assert wide.keys[0].dtype == torch.bfloat16 and keys.dtype == torch.bfloat16
