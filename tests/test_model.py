import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM, MistralForCausalLM

from smoltrain.config import get_preset
from smoltrain.hf import from_hf_key, hf_state_dict
from smoltrain.loss import chunked_linear_cross_entropy
from smoltrain.model import CustomLLM, RotaryEmbedding, _CPUCausalAttention, apply_rotary, project

from .conftest import micro_config


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
        chunked = tiny_model(ids, labels=labels, return_logits=False).loss
    assert torch.allclose(ours, theirs, rtol=1e-6)
    assert torch.allclose(chunked, theirs, rtol=1e-5)


@pytest.mark.parametrize("bf16", [False, True])
def test_training_gradients_match_transformers(bf16):
    """Our training path (chunked loss, MLP that recomputes its product in backward,
    grouped-query attention in the kernel) against transformers' plain autograd: every
    parameter's gradient, fp32 within 1e-4, bf16 autocast within bf16 rounding."""
    torch.manual_seed(0)
    ours = CustomLLM(get_preset("tiny", num_hidden_layers=2)).train()
    theirs = to_transformers(ours).train()
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


@pytest.mark.parametrize("bf16", [False, True])
def test_gradient_checkpointing_same_gradients(bf16):
    """Recomputing each layer in backward changes no gradient, also through the joined
    projections and the CPU attention that bf16 autocast uses."""
    torch.manual_seed(0)
    model = CustomLLM(micro_config()).train()
    ids = torch.randint(0, 256, (2, 16))

    def grads():
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.gradient_checkpointing_enable()
    checkpointed = grads()
    model.gradient_checkpointing_disable()
    for a, b in zip(plain, checkpointed, strict=True):
        assert torch.allclose(a, b, atol=1e-7)


def test_tied_weights_are_one_tensor(micro_model):
    assert micro_model.lm_head.weight is micro_model.embed_tokens.weight
    untied = CustomLLM(micro_config(tie_word_embeddings=False))
    assert untied.lm_head.weight is not untied.embed_tokens.weight


def test_context_overflow_is_a_clear_error(micro_model):
    with pytest.raises(ValueError, match="exceeds the model's context of 128"):
        micro_model(torch.zeros(1, 129, dtype=torch.long))


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


def test_cpu_rms_norm_keeps_less_and_matches_the_fused_kernel():
    torch.manual_seed(0)
    norm = CustomLLM(micro_config()).layers[0].input_norm
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 16, norm.weight.shape[0], requires_grad=True)
    grad_out = torch.randn(2, 16, norm.weight.shape[0])
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ours = norm(x)
    grads_ours = torch.autograd.grad(ours, (x, norm.weight), grad_out)
    reference = F.rms_norm(x, norm.weight.shape, norm.weight, norm.eps)
    grads_ref = torch.autograd.grad(reference, (x, norm.weight), grad_out)
    assert torch.equal(ours, reference)
    for a, b in zip(grads_ours, grads_ref, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    # the input, the (tokens x 1) inverse RMS and the weight: no normalized copy of x
    assert sorted(t.numel() for t in saved) == sorted([x.numel(), 2 * 16, norm.weight.numel()])


def test_projections_joined_under_bf16_autocast():
    """q/k/v and gate/up run as one matmul each under bf16 autocast: one bf16 copy of their
    input is kept for backward, and outputs and gradients equal autocast's separate linears
    (the input's gradient in fp32). A hooked projection is called as a module instead."""
    torch.manual_seed(0)
    model = CustomLLM(micro_config()).train()
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
        joined = project(x, *linears)
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
        project(x, *linears)
    assert calls == [(4, attn.k_proj.out_features)]


@pytest.mark.parametrize("block", [128, 20])  # one block; three, the last one shorter
def test_cpu_causal_attention_matches_sdpa_in_bf16(block, monkeypatch):
    """The bf16 CPU training attention (rotary, then batched matmuls) is as close to an fp64
    reference as rotary + SDPA's own bf16 kernel, forward and backward; past the context
    up to which it keeps its probabilities it keeps no (T x T) tensor and recomputes the
    very same gradients."""
    monkeypatch.setattr(_CPUCausalAttention, "block", block)
    torch.manual_seed(0)
    B, T, nh, nkv, hd = 2, 48, 6, 2, 16
    q = torch.randn(B, T, nh * hd)  # laid out as the projections leave them
    k = torch.randn(B, T, nkv * hd)
    v = torch.randn(B, T, nkv * hd)
    cos, sin = RotaryEmbedding(hd, T, 10000.0)(torch.arange(T)[None].expand(B, T), torch.float64)
    grad = torch.randn(B, T, nh * hd)

    def run(fn, dtype):
        inputs = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*inputs, cos.to(dtype), sin.to(dtype))
        out.backward(grad.to(dtype))
        return [out.double(), *(t.grad.double() for t in inputs)]

    def ours(q, k, v, cos, sin):
        return _CPUCausalAttention.apply(q, k, v, cos, sin, nh)

    def sdpa(q, k, v, cos, sin):
        q, k, v = (t.view(B, T, -1, hd).transpose(1, 2) for t in (q, k, v))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return y.transpose(1, 2).reshape(B, T, nh * hd)

    reference = run(sdpa, torch.float64)
    mine = run(ours, torch.bfloat16)
    theirs = run(sdpa, torch.bfloat16)
    for name, r, a, b in zip(["out", "dq", "dk", "dv"], reference, mine, theirs, strict=True):
        error_ours, error_theirs = (a - r).abs().max(), (b - r).abs().max()
        assert error_ours <= 2 * error_theirs + 1e-3, (name, error_ours, error_theirs)

    def saved_sizes():
        saved = []
        inputs = [t.to(torch.bfloat16).requires_grad_() for t in (q, k, v)]
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            ours(*inputs, cos.to(torch.bfloat16), sin.to(torch.bfloat16))
        return saved

    assert max(saved_sizes()) > B * nh * T * hd  # at T=48 the probabilities are kept
    monkeypatch.setattr(_CPUCausalAttention, "keep_probabilities_up_to", T - 1)
    assert max(saved_sizes()) <= B * nh * T * hd  # past it: q, k, v, never the scores
    recomputed = run(ours, torch.bfloat16)
    for name, a, b in zip(["out", "dq", "dk", "dv"], mine, recomputed, strict=True):
        assert torch.equal(a, b), name
