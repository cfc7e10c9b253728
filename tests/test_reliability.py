"""Process-level drills on real `gram run` processes (tiny model, stage 1 off, one Ray worker):

  drill 3  `gram run` is SIGKILLed during stage 2 after a periodic checkpoint; run again, it removes the
           killed run's staging folders, resumes stage 2 from the last checkpoint and ends with the same
           per-step losses as an uninterrupted training of the same config
  drill 2  while that second run holds the state folder, a third `gram run` on it fails at once, exit
           code 3, "another run holds this state folder" naming the holder's pid
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
STEPS = 160  # the tiny model trains ~20 steps/s: enough steps that the kill lands mid stage, not after it
OVERRIDES = ["pretrain.enabled=false", "eval.compare_base_zero_shot=false", "eval.limit=8",
             f"finetune.max_steps={STEPS}", "finetune.checkpoint_every_steps=8"]


class Gram:
    """One `python -m flows.cli run` process with its own GRAM_HOME, Prefect home and Ray temp dir."""

    def __init__(self, home: Path, name: str, ray_tmp: str):
        env = {**os.environ, "GRAM_HOME": str(home), "RAY_TMPDIR": ray_tmp, "PYTHONPATH": str(ROOT),
               # A private Prefect database (the runs are sequential); its first start runs migrations.
               "PREFECT_HOME": str(home.parent / "prefect-home"), "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
               "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "900"}
        for key in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "RAY_AUTH_MODE"):  # Ray's token auth stays on
            env.pop(key, None)
        self.out, self.err = home.parent / f"{name}.out", home.parent / f"{name}.err"
        args = [sys.executable, "-m", "flows.cli", "run", "--preset", "smoke", "--json"]
        args += [a for o in OVERRIDES for a in ("--set", o)]
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=err, start_new_session=True)

    def log(self) -> str:
        return self.out.read_text()[-3000:] + "\n--- stderr ---\n" + self.err.read_text()[-6000:]

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def summary(self) -> dict:
        text = self.out.read_text()
        return json.loads(text[text.index("\n{\n") + 1:] if not text.startswith("{") else text)

    def kill_group(self) -> None:
        """SIGKILL whatever is left of this process's session (only processes this test started)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _checkpoints(home: Path) -> list[Path]:
    return sorted((home / "ray_storage").glob("finetune-*/checkpoint-*"))


def _snapshot(home: Path) -> str:
    """Ray Train's run snapshot of stage 2: the checkpoints a restarted run can resume from."""
    for snapshot in (home / "ray_storage").glob("finetune-*/checkpoint_manager_snapshot.json"):
        try:
            return snapshot.read_text()
        except OSError:
            pass
    return ""


def _committed_checkpoint(home: Path) -> bool:
    """A stage-2 checkpoint is in the run snapshot (a checkpoint folder alone may still be uploading)."""
    return '"checkpoint-' in _snapshot(home)


def _committed_step(home: Path) -> int:
    """The step of the newest checkpoint Ray Train's run snapshot lists (0 when none)."""
    from tasks.state import committed_checkpoints

    steps = [0]
    for run in (home / "ray_storage").glob("finetune-*"):
        for name in committed_checkpoints(run) or ():
            try:
                steps.append(json.loads((run / name / "trainer_state.json").read_text())["step"])
            except (OSError, ValueError, KeyError):
                pass
    return max(steps)


def _finetune_artifacts(home: Path) -> list[Path]:
    return [p.parent for p in (home / "artifacts" / "finetune").glob("*/_artifact.json")]


def _reference_losses(home: Path) -> list[float]:
    """Per-step train/loss of an uninterrupted in-process training on the same data and config."""
    from gram_core.models import load_model
    from gram_core.training import train_judge
    from tasks.ray_worker import read_rows
    from tasks.settings import load_preset
    from tasks.train_stage import base_model_dir

    cfg = load_preset("smoke", OVERRIDES)
    table = next(p.parent / "table.parquet" for p in (home / "artifacts" / "sources").glob("*/_artifact.json")
                 if json.loads(p.read_text())["meta"]["role"] == "preferences")
    model, tokenizer = load_model(cfg.model, source=base_model_dir(cfg.model))
    out = train_judge(model, tokenizer, read_rows(str(table)), cfg.finetune, cfg.encode)
    return [row["train/loss"] for row in out.history]


@pytest.fixture()
def ray_tmp():
    folder = tempfile.mkdtemp(prefix="grk-", dir="/tmp")  # socket paths must stay short
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_drill_kill_9_during_stage_2_resumes_and_a_second_run_is_refused(tmp_path, ray_tmp):
    home = tmp_path / "home"
    first = Gram(home, "first", ray_tmp)
    procs = [first]
    try:
        deadline = time.monotonic() + 3600  # a guard against a hang, not a speed test
        while not _committed_checkpoint(home):
            assert first.proc.poll() is None, f"the first run ended before a checkpoint:\n{first.log()}"
            assert time.monotonic() < deadline, f"no stage-2 checkpoint after an hour:\n{first.log()}"
            time.sleep(0.2)

        # Drill 3: kill -9 the first run's driver alone (as a crash would), mid stage 2, right after a committed
        # checkpoint; the Ray processes it started are left as they are.
        first.proc.send_signal(signal.SIGKILL)
        first.wait(60)
        committed_at_kill = _committed_step(home)
        assert _checkpoints(home) and not _finetune_artifacts(home), "the kill must land inside stage 2"
        assert '"model-' not in _snapshot(home), "the kill landed after training had ended: raise STEPS"
        staging = list((home / "artifacts" / "finetune").glob(".staging-*"))
        assert staging, "a killed stage leaves its staging folder behind (cleaned by the next start)"
        first_sessions = set(Path(ray_tmp).glob("session_2*"))

        third = Gram(home, "third", ray_tmp)
        procs.append(third)
        # Drill 2: while the third run holds the state folder, another run is refused before it does anything.
        while f'"pid": {third.proc.pid},' not in (home / ".gram.lock").read_text():
            assert third.proc.poll() is None, third.log()
            time.sleep(0.2)
        second = Gram(home, "second", ray_tmp)
        procs.append(second)
        assert second.wait(1800) == 3, second.log()
        assert "another run holds this state folder" in second.err.read_text()
        assert f"pid {third.proc.pid}" in second.err.read_text()
        assert third.proc.poll() is None, "the holder must still be running when the second run is refused"
        assert third.wait(3600) == 0, third.log()
    finally:
        for proc in procs:
            proc.kill_group()
    assert not any(p.exists() for p in staging)
    summary = third.summary()
    assert summary["stages"]["finetune"] == "Completed" and summary["registered"]["version"] == "1"
    (artifact,) = _finetune_artifacts(home)
    meta = json.loads((artifact / "_artifact.json").read_text())["meta"]
    # Lost at most the steps since the last committed checkpoint at the kill (leftover workers of the killed
    # driver may have committed a later one before they died; never an earlier one).
    assert meta["steps"] == STEPS and meta["resumed_from_step"] >= committed_at_kill >= 8
    # The restarted run started its own Ray runtime (a new session), it did not join the leftover one.
    assert set(Path(ray_tmp).glob("session_2*")) - first_sessions
    history = [json.loads(line) for line in (artifact / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in history] == list(range(1, STEPS + 1))
    assert [row["train/loss"] for row in history] == pytest.approx(_reference_losses(home), rel=1e-5, abs=1e-6)
    assert not list((home / "ray_storage").glob("finetune-*")), "a published stage keeps no Ray checkpoints"
