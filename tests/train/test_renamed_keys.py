"""Keys renamed for what they hold (data.eval_every -> data.holdout_every, eval.* ->
benchmarks.*): a config or command line with an old name is refused naming the new one;
a checkpoint saved before the rename is read with its keys renamed."""

import pytest

from smoltrain.train.config import load_config, renamed_keys
from tests.test_cli_errors import assert_clean_error
from tests.train.test_train import small_run_args, smoltrain


@pytest.mark.parametrize(
    ("override", "new"),
    [("data.eval_every=10", "data.holdout_every"), ("eval.tasks=[hellaswag]", "benchmarks.tasks")],
)
def test_an_old_key_on_the_command_line_names_the_new_one(tmp_path, override, new):
    result = smoltrain(*small_run_args(tmp_path, "run", override), check=False)
    assert_clean_error(result, "was renamed", new)
    assert not (tmp_path / "run").exists()


def test_an_old_key_in_a_yaml_file_names_the_new_one(tmp_path):
    config = tmp_path / "old.yaml"
    config.write_text("data:\n  eval_every: 10\neval:\n  every: 5\n")
    with pytest.raises(ValueError, match=r"'data.eval_every' was renamed 'data.holdout_every'"):
        load_config(config)
    config.write_text("eval:\n  every: 5\n")
    with pytest.raises(ValueError, match=r"'eval.every' was renamed 'benchmarks.every'"):
        load_config(config)


def test_a_checkpoint_config_from_before_the_rename_is_read():
    saved = {"data": {"eval_every": 7, "context_length": 64}, "eval": {"every": 3, "tasks": ["piqa"]}}
    cfg = load_config(base=saved)
    assert cfg.data.holdout_every == 7 and cfg.data.context_length == 64
    assert cfg.benchmarks.every == 3 and cfg.benchmarks.tasks == ["piqa"]
    assert saved["data"]["eval_every"] == 7  # the caller's dict untouched
    assert renamed_keys({"log": {"eval_every": 5}}) == {"log": {"eval_every": 5}}  # another key alike


def test_a_run_checkpointed_before_the_rename_resumes_bitwise(tmp_path):
    """A checkpoint whose saved config has the old keys (and no spike guard state, as
    written before 2026-12-04) resumes without --allow-config-changes, to the losses of an
    uninterrupted run."""
    import json

    from tests.train.test_train import losses

    args = ("--max-steps", "6", "log.checkpoint_every=3", "log.log_every=1")
    smoltrain(*small_run_args(tmp_path, "ref", *args))
    smoltrain(*small_run_args(tmp_path, "old", *args, "--stop-at-step", "3"))
    state_file = tmp_path / "old/checkpoints/step-3/trainer_state.json"
    state = json.loads(state_file.read_text())
    state["config"]["data"]["eval_every"] = state["config"]["data"].pop("holdout_every")
    state["config"]["eval"] = state["config"].pop("benchmarks")
    del state["spike_guard"]
    state_file.write_text(json.dumps(state))
    smoltrain("--phase", "resume", "--checkpoint", str(tmp_path / "old"))
    assert losses(tmp_path / "old") == losses(tmp_path / "ref")
