"""The one progress logger: a log line about every ``every`` percent with elapsed time and ETA, and (for a
training stage) a Prefect progress artifact on the task run, updated while the workers train."""

from __future__ import annotations

import time
from typing import Any


class ProgressLog:
    """``progress(done, total)`` for counted work (judging, sampling) and ``step(step, fraction)`` for a
    training stage (``fit``'s ``on_progress``)."""

    def __init__(self, log: Any, what: str, every: float = 10.0, artifact: bool = False):
        self.log, self.what, self.every = log, what, every
        self.start = time.monotonic()
        self.next_pct = every
        self.artifact = _progress_artifact(what) if artifact else None

    def __call__(self, done: int, total: int) -> None:
        self._update(100.0 * done / max(total, 1), f"{done}/{total}", last=done >= total)

    def step(self, step: int, fraction: float) -> None:
        self._update(100.0 * fraction, f"step {step}")

    def _update(self, pct: float, where: str, last: bool = False) -> None:
        if self.artifact is not None:
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(self.artifact, pct)
        if pct + 1e-9 < self.next_pct and not last:
            return
        while self.next_pct <= pct + 1e-9:
            self.next_pct += self.every
        elapsed = time.monotonic() - self.start
        eta = elapsed / max(pct, 1e-9) * (100.0 - pct)
        self.log.info("%s: %s (%.0f%%), %.0f s elapsed, ~%.0f s left", self.what, where, pct, elapsed, eta)


def _progress_artifact(what: str) -> Any:
    """A Prefect progress artifact on the current task run (None outside one: nothing to attach it to)."""
    from prefect.artifacts import create_progress_artifact
    from prefect.context import TaskRunContext

    if TaskRunContext.get() is None:
        return None
    return create_progress_artifact(0.0, description=f"{what}: optimizer steps done (%)")
