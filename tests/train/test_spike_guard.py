"""The loss-spike guard as an object: what it calls a spike, when it asks for a rollback,
and that its memory goes into checkpoints and comes back on resume (before, a resumed run
started with an empty window and judged no spike for `window` steps)."""

import json

import pytest

from smoltrain.train.spike_guard import SpikeGuard
from tests.train.test_train import losses, small_run_args, small_run_config, smoltrain


def test_spikes_are_judged_against_the_window_of_good_steps():
    guard = SpikeGuard(factor=3.0, window=3, rollback=2)
    assert not guard.is_spike(100.0, 100.0)  # fewer than `window` good steps: not judged
    for loss in (2.0, 2.0, 2.0, 1.0):
        guard.record_good(loss, 1.0)
    assert list(guard.good) == [(2.0, 1.0), (2.0, 1.0), (1.0, 1.0)]  # the last `window` only
    assert not guard.is_spike(5.0, 2.9)  # mean loss 5/3: 5.0 is exactly 3x, not above
    assert guard.is_spike(5.1, 1.0) and guard.is_spike(1.0, 3.1)  # the loss or the norm
    assert not SpikeGuard(factor=0.0, window=3, rollback=2, good=guard.good).is_spike(100.0, 100.0)


def test_a_rollback_is_due_after_enough_skips_within_the_window():
    guard = SpikeGuard(factor=3.0, window=10, rollback=2)
    guard.record_skip(5)
    assert not guard.rollback_due(5)
    guard.record_skip(16)  # step 5 is out of the window by now
    assert not guard.rollback_due(16) and list(guard.skips) == [16]
    guard.record_skip(17)
    assert guard.rollback_due(17)
    off = SpikeGuard(factor=0.0, window=10, rollback=1)
    off.record_skip(3)  # a non-finite step with the guard off: not counted
    assert not off.rollback_due(3) and not off.skips


def test_its_state_survives_a_round_trip_through_json():
    guard = SpikeGuard(factor=3.0, window=2, rollback=2)
    for loss in (1.5, 1.25, 1.125):
        guard.record_good(loss, 0.5)
    guard.record_skip(7)
    again = SpikeGuard(factor=3.0, window=2, rollback=2)
    again.load_state_dict(json.loads(json.dumps(guard.state_dict())))
    assert again == guard
    smaller = SpikeGuard(factor=3.0, window=1, rollback=2)
    smaller.load_state_dict(guard.state_dict())
    assert list(smaller.good) == [(1.125, 0.5)]  # resumed with a smaller window


@pytest.mark.slow
def test_the_guard_is_checkpointed_and_resumed(tmp_path):
    """A checkpoint holds the guard's window of good steps (their logged losses); a resume
    from it starts with that window, not an empty one."""
    from smoltrain.train.setup import setup_run

    guard_args = ("train.spike_factor=3", "train.spike_window=4", "log.log_every=1")
    smoltrain(*small_run_args(tmp_path, "run", *guard_args, "--max-steps", "6", "log.checkpoint_every=3"))
    logged = losses(tmp_path / "run")
    saved = json.loads((tmp_path / "run/checkpoints/step-3/trainer_state.json").read_text())["spike_guard"]
    assert [round(loss, 5) for loss, _ in saved["good"]] == [round(logged[s], 5) for s in (1, 2, 3)]
    assert saved["skips"] == []

    cfg = small_run_config(tmp_path, *guard_args, "schedule.max_steps=6")
    cfg.output_dir = str(tmp_path / "run")
    run = setup_run(cfg, "resume", str(tmp_path / "run/checkpoints/step-3"))
    try:
        assert [list(pair) for pair in run.spike_guard.good] == saved["good"]
        assert (run.spike_guard.factor, run.spike_guard.window) == (3.0, 4)
    finally:
        if run.lock:
            run.lock.release()
