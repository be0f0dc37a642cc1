"""LoRA through peft, as a user runs it: only the adapters train and are checkpointed, a
resume is bitwise, final/ is the merged model (transformers reads it), final-adapter/ is a
peft adapter for the base model, and targets that match nothing are refused."""

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import micro_config
from tests.train.test_train import losses, small_run_args, small_vocabulary, smoltrain

pytest.importorskip("peft")  # the lora extra (make test installs it)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A small model saved as a Hugging Face folder, the run's model.init_from."""
    from smoltrain.formats.model_io import save_model
    from smoltrain.model import CustomLLM
    from smoltrain.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(small_vocabulary().split("=", 1)[1])
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("base")
    config = micro_config(
        vocab_size=512, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id
    )
    save_model(CustomLLM(config), folder, tokenizer=tokenizer)
    return folder


def lora_args(tmp_path, out, base, *extra):
    return small_run_args(
        tmp_path,
        out,
        small_vocabulary(),
        f"model.init_from={base}",
        "train.lora.rank=4",
        "train.lora.alpha=8",
        "train.lora.targets=[q_proj,v_proj,down_proj]",
        "optim.lr=1e-2",
        "log.log_every=1",
        *extra,
    )


def test_lora_trains_adapters_only_resumes_bitwise_and_merges(tmp_path, base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    smoltrain(*lora_args(tmp_path, "straight", base, "--max-steps", "6", "train.lora.save_adapter=true"))
    smoltrain(*lora_args(tmp_path, "resumed", base, "--max-steps", "6", "--stop-at-step", "3"))
    smoltrain("--phase", "resume", "--checkpoint", str(tmp_path / "resumed/checkpoints/latest"))
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert [straight[s] for s in range(4, 7)] == [resumed[s] for s in range(4, 7)]  # bitwise
    assert straight[6] < straight[1]

    # the checkpoint holds the adapters alone: A and B of 3 targets in each of 2 layers
    saved = load_file(tmp_path / "straight/checkpoints/step-6/model.safetensors")
    assert len(saved) == 12 and all(".lora_A." in k or ".lora_B." in k for k in saved)

    # final/ is the base with each adapter merged: W + B A alpha/rank; every other weight as it was
    before, after = (
        load_file(base / "model.safetensors"),
        load_file(tmp_path / "straight/final/model.safetensors"),
    )
    assert before.keys() == after.keys()
    for name, weight in before.items():
        module = name.removeprefix("model.").removesuffix(".weight")
        a, b = saved.get(f"{module}.lora_A.default.weight"), saved.get(f"{module}.lora_B.default.weight")
        if a is None:
            assert torch.equal(after[name], weight), name  # frozen, untouched
        else:
            torch.testing.assert_close(after[name], weight + b @ a * (8 / 4), rtol=1e-5, atol=1e-6)
            assert not torch.equal(after[name], weight), name

    # transformers reads final/, and peft's adapter on the base model gives the same logits
    ids = torch.randint(0, 512, (2, 12))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "straight/final").eval()
    adapted = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base), tmp_path / "straight/final-adapter"
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(adapted(ids).logits, merged(ids).logits, rtol=1e-4, atol=1e-4)


def test_lora_targets_that_match_nothing_are_refused(tmp_path, base):
    result = smoltrain(
        *lora_args(tmp_path, "bad", base, "--max-steps", "2", "train.lora.targets=[qkv]"), check=False
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "train.lora.targets ['qkv'] match no linear layer of the model" in result.stderr
    assert "q_proj" in result.stderr  # the names it has


def test_adapters_keep_the_plain_layers_they_wrap_and_the_estimate_counts_them():
    """The joined-projection kernels read their sublayers' weights themselves, so a layer
    with adapters keeps its plain forward (else the adapters would be bypassed); the memory
    estimate counts exactly the adapters peft makes."""
    from smoltrain.model import CustomLLM
    from smoltrain.model.config import get_preset
    from smoltrain.model.kernels import active_kernels, prepare_for_training
    from smoltrain.train.config import LoraConfig
    from smoltrain.train.lora import add_adapters, merge_adapters
    from smoltrain.train.machine import estimate_training_memory, lora_parameters

    torch.manual_seed(0)
    model = add_adapters(CustomLLM(micro_config()), LoraConfig(rank=4))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # peft starts B at 0: the adapters would add nothing yet
    prepare_for_training(model, "cpu", "bf16", "mlp,attention,rms_norm")
    assert active_kernels(model) == ["rms_norm"]
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        adapted = model(ids).logits.float()
    merged = merge_adapters(model)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        torch.testing.assert_close(merged(ids).logits.float(), adapted, rtol=0.05, atol=0.05)
    trained = sum(
        p.numel()
        for n, p in add_adapters(CustomLLM(micro_config()), LoraConfig(rank=4)).named_parameters()
        if p.requires_grad
    )
    assert trained == lora_parameters(micro_config(), 4)
    config = get_preset("smollm2-1.7b")
    full = estimate_training_memory(config, 4, 2048, "cuda", "bf16", ())
    lora = estimate_training_memory(config, 4, 2048, "cuda", "bf16", (), lora_rank=16)
    assert lora.optimizer == lora_parameters(config, 16) * 8 < full.optimizer / 50
    assert lora_parameters(get_preset("smollm2-135m"), 8) == 2_442_240  # what peft made in a 135M run
    assert lora.activations == full.activations and lora.total < full.total - 15e9


def test_the_quantized_sample_copy_leaves_the_training_model_as_it_was(monkeypatch):
    """log.sample_quantize decodes a quantized copy: of the weights as they are (without
    adapters no deep copy is made first), of the merged weights with adapters; either way
    the training model keeps its parameters, values and adapters."""
    import copy

    from smoltrain.model import CustomLLM
    from smoltrain.train.config import LoraConfig
    from smoltrain.train.jobs import quantized_copy
    from smoltrain.train.lora import add_adapters, has_adapters, merge_adapters

    deep_copies, deepcopy = [], copy.deepcopy
    monkeypatch.setattr(
        copy, "deepcopy", lambda obj, memo=None: deep_copies.append(obj) or deepcopy(obj, memo)
    )
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (1, 10))
    plain = CustomLLM(micro_config())
    adapted = add_adapters(CustomLLM(micro_config()), LoraConfig(rank=4))
    for name, p in adapted.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    for model in (plain, adapted):
        before = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
        deep_copies.clear()
        sample_model = quantized_copy(model, "int8")
        assert any(obj is model for obj in deep_copies) == (model is adapted)
        after = dict(model.named_parameters())
        assert after.keys() == before.keys() and has_adapters(model) == (model is adapted)
        assert all(after[n] is p and torch.equal(p, value) for n, (p, value) in before.items())
        assert not has_adapters(sample_model)
        with torch.no_grad():
            reference = merge_adapters(copy.deepcopy(model)) if model is adapted else model
            error = (sample_model(ids).logits - reference(ids).logits).abs()
        assert error.mean() < 0.05 and error.max() < 0.3  # int8 rounding (other weights: 0.9 mean)


@pytest.mark.slow
def test_lora_under_fsdp_follows_one_process(tmp_path, base):
    """Adapters on a model sharded over 2 processes (FSDP2, built on the meta device): the
    losses of one process, and final/ merged from the gathered adapters."""
    from tests.train.test_distributed import launch

    args = ["train.global_batch_size=8", "--max-steps", "6"]
    one = launch(1, *lora_args(tmp_path, "one", base, *args))
    assert one.returncode == 0, one.stderr[-3000:]
    two = launch(
        2, *lora_args(tmp_path, "fsdp", base, *args, "train.fsdp=true", "train.lora.save_adapter=true")
    )
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "fsdp")
    for step in range(1, 7):
        assert abs(a[step] - b[step]) < 1e-5, (step, a[step], b[step])
    merged_one = load_file(tmp_path / "one/final/model.safetensors")
    merged_two = load_file(tmp_path / "fsdp/final/model.safetensors")
    for name, weight in merged_one.items():
        torch.testing.assert_close(merged_two[name], weight, rtol=1e-4, atol=1e-5)
    assert (tmp_path / "fsdp/final-adapter/adapter_model.safetensors").is_file()
