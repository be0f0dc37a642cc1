"""The loss-spike guard: a step whose loss or gradient norm jumps above `factor` times its
mean over the last `window` good steps is skipped (no update), and `rollback` skips within
`window` steps roll the run back to its last checkpoint, the data moving on. Its memory is
saved in every checkpoint, so a resumed run judges spikes as the uninterrupted one would."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any


@dataclass
class SpikeGuard:
    factor: float  # a spike: above factor x the window's mean (0: the guard is off)
    window: int  # good steps the mean is over, and the span in which skips are counted
    rollback: int  # skips within `window` steps that call for a rollback
    good: deque[tuple[float, float]] = field(default_factory=deque)  # (loss, grad norm) per good step
    skips: deque[int] = field(default_factory=deque)  # steps skipped (spikes, non-finite) lately

    def is_spike(self, loss: float, grad_norm: float) -> bool:
        """Judged once `window` good steps are seen; every rank decides alike, from the
        reduced figures."""
        if self.factor <= 0 or len(self.good) < self.window:
            return False
        mean_loss = sum(loss for loss, _ in self.good) / len(self.good)
        mean_norm = sum(norm for _, norm in self.good) / len(self.good)
        return loss > self.factor * mean_loss or (mean_norm > 0 and grad_norm > self.factor * mean_norm)

    def record_good(self, loss: float, grad_norm: float) -> None:
        self.good.append((loss, grad_norm))
        if len(self.good) > self.window:
            self.good.popleft()

    def record_skip(self, step: int) -> None:
        """A skipped step (a spike, or a non-finite one: those count toward a rollback too)."""
        if self.factor > 0:
            self.skips.append(step)

    def rollback_due(self, step: int) -> bool:
        """Whether `rollback` skips fall within the last `window` steps (older ones forgotten)."""
        while self.skips and self.skips[0] <= step - self.window:
            self.skips.popleft()
        return self.factor > 0 and len(self.skips) >= self.rollback

    def state_dict(self) -> dict[str, Any]:
        return {"good": [list(pair) for pair in self.good], "skips": list(self.skips)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.good = deque((float(loss), float(norm)) for loss, norm in state["good"])
        self.skips = deque(int(step) for step in state["skips"])
        while len(self.good) > self.window:  # a resume with a smaller window
            self.good.popleft()
