"""Faults the tests inject into the ldm training loop (none unless asked for).

Read from the driver's environment and carried to the workers in the loop config:
LDM_FAIL_AT_STEP=k makes rank 0 raise when about to take step k, once per run (a marker file next
to the run's checkpoints remembers it across the restart); LDM_NONFINITE_AT_STEP=k
(LDM_NONFINITE_REPEAT=n, default 1) makes rank 0's loss NaN for its first n tries at step k.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path


class InjectedFailure(RuntimeError):
    """Raised by rank 0 at step LDM_FAIL_AT_STEP."""


@dataclass
class FaultInjection:
    fail_at_step: int = 0
    nonfinite_at_step: int = 0
    nonfinite_repeat: int = 1
    marker: str | None = None
    tries: dict = field(default_factory=dict)

    @classmethod
    def from_env(cls, marker: str | Path | None) -> "FaultInjection":
        env = os.environ
        return cls(fail_at_step=int(env.get("LDM_FAIL_AT_STEP", 0) or 0),
                   nonfinite_at_step=int(env.get("LDM_NONFINITE_AT_STEP", 0) or 0),
                   nonfinite_repeat=int(env.get("LDM_NONFINITE_REPEAT", 1) or 1),
                   marker=str(marker) if marker else None)

    def before_step(self, rank: int, step: int) -> None:
        """Raise at the injected step, once (the marker file remembers it across restarts)."""
        if rank != 0 or step != self.fail_at_step or not self.marker:
            return
        marker = Path(self.marker)
        if marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(str(step))
        raise InjectedFailure(f"LDM_FAIL_AT_STEP={step}: injected failure on rank 0")

    def loss(self, loss, rank: int, step: int):
        """The loss, or NaN for the first `nonfinite_repeat` tries of the injected step on rank 0."""
        if rank != 0 or step != self.nonfinite_at_step:
            return loss
        self.tries[step] = self.tries.get(step, 0) + 1
        return loss * math.nan if self.tries[step] <= self.nonfinite_repeat else loss
