import pytest
import torch
from safetensors.torch import save_file

from smoltrain.errors import CheckpointError
from smoltrain.train.checkpoint import (
    COMPLETE,
    prune_checkpoints,
    remove_partial_checkpoints,
    resolve_checkpoint_dir,
)


def fake_checkpoint(root, step, complete=True):
    folder = root / f"step-{step}"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text("{}")
    save_file({"w": torch.zeros(4)}, folder / "model.safetensors")
    torch.save({}, folder / "optimizer.pt")
    if complete:
        (folder / COMPLETE).write_text(f"{step}\n")
    return folder


def test_resolve_accepts_what_a_user_points_at(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    step4 = fake_checkpoint(root, 4)
    (root / "latest").write_text("step-4\n")
    for spec in (step4, root / "latest", root, tmp_path / "run"):
        assert resolve_checkpoint_dir(str(spec)) == step4
    partial = fake_checkpoint(root, 6, complete=False)
    with pytest.raises(CheckpointError, match=f"incomplete.*interrupted.*--checkpoint {step4}$"):
        resolve_checkpoint_dir(str(partial))
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint_dir(str(tmp_path / "nowhere"))
    assert resolve_checkpoint_dir(str(partial), required=False) is None


def test_prune_keeps_the_newest_complete_ones_and_stale_temporaries_go(tmp_path):
    for step in (2, 4, 10, 8):
        fake_checkpoint(tmp_path, step)
    fake_checkpoint(tmp_path, 12, complete=False)  # being written: not counted, not removed
    (tmp_path / ".step-14.tmp").mkdir()
    prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-10", "step-12", "step-8"]
    remove_partial_checkpoints(tmp_path)
    assert not (tmp_path / ".step-14.tmp").exists()


def test_a_broken_checkpoint_names_its_file_and_the_newest_older_one(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    step2, step4, step6 = (fake_checkpoint(root, n) for n in (2, 4, 6))
    (step6 / "trainer_state.json").write_text('{"state": ')
    with pytest.raises(
        CheckpointError, match=f"step-6: trainer_state.json is not valid JSON.*--checkpoint {step4}$"
    ):
        resolve_checkpoint_dir(str(step6))
    weights = (step4 / "model.safetensors").read_bytes()
    (step4 / "model.safetensors").write_bytes(weights[: len(weights) - 8])  # truncated
    with pytest.raises(
        CheckpointError, match=f"step-4: model.safetensors is unreadable.*--checkpoint {step2}$"
    ):
        resolve_checkpoint_dir(str(step4))
    (step2 / "optimizer.pt").write_bytes(b"")
    with pytest.raises(
        CheckpointError, match="step-2: optimizer.pt is missing or empty.*start again with --phase init"
    ):
        resolve_checkpoint_dir(str(step2))
    stray = tmp_path / "photos"
    stray.mkdir()
    with pytest.raises(CheckpointError, match="is not a checkpoint"):
        resolve_checkpoint_dir(str(stray))


def test_cuda_rng_is_this_devices_so_a_run_resumes_on_fewer_gpus(monkeypatch):
    """Each rank saves its own device's CUDA generator, not every visible one's: restoring
    all of an 8-GPU rank's states (set_rng_state_all) failed where 4 GPUs were visible. A file
    saved the old way restores this rank's entry. Fake CUDA: 4 devices, this rank on cuda:2."""
    from smoltrain.train import checkpoint

    states = {d: torch.full((16,), d, dtype=torch.uint8) for d in range(4)}
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": states[2])
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append(state))

    def refuse_all(states_of_all):
        raise RuntimeError("set_rng_state_all: more states than visible devices")

    monkeypatch.setattr(torch.cuda, "set_rng_state_all", refuse_all)
    saved = checkpoint.rng_state()
    assert torch.equal(saved["cuda"], states[2])  # one tensor: this device's
    checkpoint.set_rng_state(saved)
    old_format = {**saved, "cuda": [torch.full((16,), d, dtype=torch.uint8) for d in range(8)]}
    checkpoint.set_rng_state(old_format)  # an 8-GPU run's file, resumed where 4 are visible
    assert [int(s[0]) for s in restored] == [2, 2]
