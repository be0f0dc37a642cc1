"""The training loop: set up, then step and periodic jobs until done, then finish."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from smoltrain.atomic import FolderLock
from smoltrain.train.config import TrainConfig
from smoltrain.train.jobs import benchmark_and_log, evaluate_and_log, finish, run_periodic_jobs
from smoltrain.train.setup import setup_run
from smoltrain.train.step import train_step


class StopRequested:
    """SIGINT/SIGTERM set a flag; the loop checkpoints and exits at the next step boundary."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signum
        print(
            f"\nreceived {signal.Signals(signum).name}: saving a checkpoint, then stopping", file=sys.stderr
        )

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(
    cfg: TrainConfig,
    phase: str = "init",
    checkpoint: str | None = None,
    stop_at_step: int | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run phase `init` (from scratch or `model.init_from`) or `resume` (from `checkpoint`).
    Returns a summary (final losses, time, paths)."""
    out = Path(cfg.output_dir)
    fresh, had_lock = not out.exists(), (out / FolderLock.NAME).exists()
    try:
        run = setup_run(cfg, phase, checkpoint, stop_at_step, overwrite)
    except BaseException:
        # a failed start leaves the folder as it found it: no lock file, no empty folder
        if int(os.environ.get("RANK", "0")) == 0 and out.is_dir():
            if not had_lock:
                (out / FolderLock.NAME).unlink(missing_ok=True)
            if fresh and not any(out.iterdir()):
                out.rmdir()
        raise
    if cfg.log.eval_at_start and run.state.step == 0:
        evaluate_and_log(run)
        run.start_eval_loss = run.last["eval_loss"]
        if cfg.benchmarks.tasks:  # the scores before training, to read the end's against
            benchmark_and_log(run)
        run.start_eval_s = time.perf_counter() - run.segment_start
    stopping = False
    with StopRequested() as stop:
        while run.state.step < run.end_step and not stopping:
            # a signal reaches ranks at different moments: they stop on the step any one saw it
            result = train_step(run, stop_requested=stop.signal is not None)
            run_periodic_jobs(run, result)  # log, evaluate, checkpoint, roll back when due
            stopping = result.stop
    return finish(run, interrupted=stopping)
