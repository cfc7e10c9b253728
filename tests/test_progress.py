"""Training progress in the flow run's logs: the worker's step lines, read back in the driver, with an ETA."""

from __future__ import annotations

import json

from gram_core.config import TrainConfig
from tasks.ray_train import _progress_feed, _total_steps
from tasks.stages import TrainProgress


class Lines:
    def __init__(self):
        self.lines: list[str] = []

    def info(self, fmt, *args):
        self.lines.append(fmt % args)


def test_feed_hands_over_every_complete_line_once():
    rows: list[dict] = []
    with _progress_feed(rows.append) as path:
        with open(path, "a", encoding="utf-8") as feed:
            feed.write(json.dumps({"step": 1, "total": 3}) + "\n" + json.dumps({"step": 2, "total": 3}) + "\n")
            feed.write('{"step": 3, ')  # half-written when the reader looks: it waits for the rest
            feed.flush()
            feed.write('"total": 3}\n')
    assert [r["step"] for r in rows] == [1, 2, 3]
    with _progress_feed(None) as nothing:
        assert nothing is None


def test_total_steps_from_max_steps_or_the_epoch_fraction():
    assert _total_steps(3, {"epoch": 0.5}, TrainConfig(max_steps=7)) == 7
    assert _total_steps(3, {"epoch": 0.5}, TrainConfig(epochs=2.0)) == 12  # 6 steps per epoch
    assert _total_steps(3, {"epoch": 0.5}, TrainConfig(epochs=0.25)) == 3  # never below the step reached


def test_progress_lines_have_rate_and_eta():
    clock = iter([100.0, 110.0, 120.0, 130.0])
    log = Lines()
    progress = TrainProgress(log, "finetune", every_s=15.0, clock=lambda: next(clock))
    assert progress.artifact is None  # no Prefect run here: log lines only
    for step in range(1, 5):
        progress({"step": step, "total": 4, "train/loss": 0.5 / step})
    assert log.lines == ["finetune: step 1/4 (25%), loss 0.5000",
                         "finetune: step 3/4 (75%), loss 0.1667, 10.0 s/step, ~10 s left",
                         "finetune: step 4/4 (100%), loss 0.1250, 10.0 s/step, ~0 s left"]
