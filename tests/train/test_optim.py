"""Muon (`optim.name: muon`): which parameters it takes, and runs that resume bitwise."""

import torch
from safetensors.torch import load_file

from smoltrain.model import CustomLLM
from smoltrain.model.config import get_preset
from smoltrain.train.config import load_config
from smoltrain.train.optim import build_optimizers, peak_lrs
from tests.test_cli_errors import assert_clean_error
from tests.train.test_train import losses, small_run_args, smoltrain


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    model = CustomLLM(get_preset("tiny", num_hidden_layers=2))
    cfg = load_config(overrides=["optim.name=muon", "optim.muon_lr=0.01"])
    adamw, muon = build_optimizers(model, cfg, "cpu")
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(muon, torch.optim.Muon)
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    in_adamw = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    projections = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert in_muon == {
        f"layers.{i}.{m}.{p}.weight"
        for i in range(2)
        for m, ps in [("self_attn", projections[:4]), ("mlp", projections[4:])]
        for p in ps
    }
    assert "embed_tokens.weight" in in_adamw and "norm.weight" in in_adamw and not in_muon & in_adamw
    assert len(in_muon) + len(in_adamw) == len(list(model.parameters()))  # the tied head counted once
    assert peak_lrs(cfg) == [cfg.optim.lr, 0.01]
    assert [type(o) for o in build_optimizers(model, load_config(), "cpu")] == [torch.optim.AdamW]


def test_a_muon_run_resumes_bitwise(tmp_path):
    args = ["--max-steps", "6", "log.log_every=1", "optim.name=muon", "optim.muon_lr=0.02"]
    smoltrain(*small_run_args(tmp_path, "straight", *args))
    smoltrain(*small_run_args(tmp_path, "resumed", *args, "--stop-at-step", "3"))
    smoltrain("--phase", "resume", "--checkpoint", str(tmp_path / "resumed/checkpoints/latest"))
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert straight == resumed  # bitwise: the same floats at every step
    assert straight[6] < straight[1]
    a = load_file(tmp_path / "straight/final/model.safetensors")
    b = load_file(tmp_path / "resumed/final/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Muon's momentum is in the checkpoint beside AdamW's moments
    state = torch.load(tmp_path / "resumed/checkpoints/step-3/optimizer.pt", weights_only=False)["state"]
    assert any("momentum_buffer" in s for s in state.values()) and any("exp_avg" in s for s in state.values())


def test_an_unknown_optimizer_is_refused(tmp_path):
    result = smoltrain(*small_run_args(tmp_path, "run", "optim.name=sgd"), check=False)
    assert_clean_error(result, "optim.name 'sgd' is unknown", "muon")
