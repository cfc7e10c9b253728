"""Process-level drills on real `gram run` processes (tiny model, stage 1 off, one Ray worker):

  drill 3  `gram run` gets SIGKILL during stage 2 after a periodic checkpoint: the driver's pid alone, as a crash,
           and Ray processes it started outlive it. `gram gc --apply`, a real process started next, stops
           them (the killed run recorded its local Ray runtime in the state folder), removes a torn newer
           checkpoint and the killed run's staging folder, and keeps every checkpoint Ray Train's snapshot
           lists; run again, `gram run` resumes stage 2 from the committed checkpoint in a Ray session of its
           own and ends with the same per-step losses as an uninterrupted training of the same config
  drill 2  while that second run holds the state folder, a third `gram run` on it fails at once, exit
           code 3, "another run holds this state folder" naming the holder's pid"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tasks.store.state import committed_checkpoints

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
STEPS = 160  # the tiny model trains ~20 steps/s: enough steps that the kill lands mid stage, not after it
OVERRIDES = ["pretrain.enabled=false", "eval.compare_base_zero_shot=false", "eval.limit=8",
             f"finetune.max_steps={STEPS}", "finetune.checkpoint_every_steps=8"]


def _env(home: Path, ray_tmp: str) -> dict[str, str]:
    """The environment of every `gram` process of the drill: its own GRAM_HOME, Prefect home and Ray temp dir."""
    env = {**os.environ, "GRAM_HOME": str(home), "RAY_TMPDIR": ray_tmp, "PYTHONPATH": str(ROOT),
           # A private Prefect database (the runs are sequential); its first start runs migrations.
           "PREFECT_HOME": str(home.parent / "prefect-home"), "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "900"}
    for key in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "RAY_AUTH_MODE"):  # Ray's token auth stays on
        env.pop(key, None)
    return env


class Gram:
    """One `python -m flows.cli run` process with its own GRAM_HOME, Prefect home and Ray temp dir."""

    def __init__(self, home: Path, name: str, ray_tmp: str):
        self.out, self.err = home.parent / f"{name}.out", home.parent / f"{name}.err"
        args = [sys.executable, "-m", "flows.cli", "run", "--preset", "smoke", "--json"]
        args += [a for o in OVERRIDES for a in ("--set", o)]
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(args, cwd=ROOT, env=_env(home, ray_tmp), stdout=out, stderr=err,
                                         start_new_session=True)

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
    steps = [0]
    for run in (home / "ray_storage").glob("finetune-*"):
        for name in committed_checkpoints(run) or ():
            try:
                steps.append(json.loads((run / name / "trainer_state.json").read_text())["step"])
            except (OSError, ValueError, KeyError):
                pass
    return max(steps)


def _ray_leftovers(sid: int) -> dict[int, int]:
    """pid -> start time of the live (not zombie) Ray processes of session ``sid`` (a head process, a worker
    or an agent: ``ray::...`` or a program under ``.../ray/``): what the run started with ``start_new_session``
    left behind. The session, not the process group: Ray puts workers in process groups of their own. Read
    from /proc here, not with the guard's own code."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == sid:
            continue
        try:
            text, cmdline = (entry / "stat").read_text(), (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()
        if int(fields[3]) == sid and fields[0] != "Z" and (cmdline.startswith("ray::") or "/ray/" in cmdline):
            found[int(entry.name)] = int(fields[19])
    return found


def _torn_checkpoint(home: Path) -> Path:
    """Beside the killed run's checkpoints, a newer one half written (its files but no trainer_state.json), as a
    kill during a checkpoint's upload leaves it; numbered above any real one, so no leftover worker writes it."""
    (run,) = (home / "ray_storage").glob("finetune-*")
    newest = max(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    torn = run / f"checkpoint-{STEPS + 8}"
    shutil.copytree(newest, torn, ignore=shutil.ignore_patterns("trainer_state.json"))
    assert torn.is_dir() and not (torn / "trainer_state.json").exists()
    return torn


def _finetune_artifacts(home: Path) -> list[Path]:
    return [p.parent for p in (home / "artifacts" / "finetune").glob("*/_artifact.json")]


def _reference_losses(home: Path) -> list[float]:
    """Per-step train/loss of an uninterrupted in-process training on the same data and config."""
    from gram_core.models import load_model
    from gram_core.plans import train_judge
    from tasks.on_ray.worker import read_rows
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
    leftovers: dict[int, int] = {}  # the killed run's Ray processes: pid -> start time
    try:
        deadline = time.monotonic() + 3600  # a guard against a hang, not a speed test
        while not _committed_checkpoint(home):
            assert first.proc.poll() is None, f"the first run ended before a checkpoint:\n{first.log()}"
            assert time.monotonic() < deadline, f"no stage-2 checkpoint after an hour:\n{first.log()}"
            time.sleep(0.2)

        # Drill 3: kill -9 the first run's driver alone (as a crash would), mid stage 2, right after a committed
        # checkpoint; the Ray processes it started are left running.
        first.proc.send_signal(signal.SIGKILL)
        first.wait(60)
        # The killed driver's Ray processes live on: its workers for a few seconds, Ray's agents until their
        # check of the dead raylet gives up (between ~5 s and over 45 s here). Frozen (SIGSTOP) at once, they
        # are still there when the next process takes the state folder, however fast they would end on their own.
        for pid in _ray_leftovers(first.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        leftovers = _ray_leftovers(first.proc.pid)
        assert leftovers, "no Ray process of the killed run outlived its driver: the drill proves nothing"
        committed_at_kill = _committed_step(home)
        assert _checkpoints(home) and not _finetune_artifacts(home), "the kill must land inside stage 2"
        assert '"model-' not in _snapshot(home), "the kill landed after training had ended: raise STEPS"
        staging = list((home / "artifacts" / "finetune").glob(".staging-*"))
        assert staging, "a killed stage leaves its staging folder behind (gc removes it)"
        first_sessions = set(Path(ray_tmp).glob("session_2*"))

        # gc between the kill and the restart, as a real process: it takes the state folder first, so it stops
        # the killed run's leftover Ray processes (they could still write a checkpoint while gc decides), then
        # removes a torn newer checkpoint and keeps every checkpoint Ray Train's snapshot lists.
        torn = _torn_checkpoint(home)
        record = home / ".ray-processes.json"
        assert record.is_file(), "the killed run recorded the local Ray runtime it started"
        gc = subprocess.run([sys.executable, "-m", "flows.cli", "gc", "--preset", "smoke", "--apply"], cwd=ROOT,
                            env=_env(home, ray_tmp), capture_output=True, text=True, timeout=600)
        (tmp_path / "gc.out").write_text(gc.stdout + "\n--- stderr ---\n" + gc.stderr)
        assert gc.returncode == 0, gc.stdout + gc.stderr
        stopped = re.search(r"stopped (\d+) leftover Ray processes of the run that held this state folder before",
                            gc.stderr)
        assert stopped and int(stopped.group(1)) >= len(leftovers) >= 1, f"{gc.stderr}\nleftovers: {leftovers}"
        assert not set(_ray_leftovers(first.proc.pid).items()) & set(leftovers.items()), "leftovers still running"
        assert not record.exists()
        committed = committed_checkpoints(torn.parent)
        assert committed and all((torn.parent / name / "trainer_state.json").is_file() for name in committed), \
            f"gc removed a checkpoint the snapshot lists: {sorted(committed)}\n{gc.stdout}"
        assert f"{torn.name}  (Ray checkpoint not in its run's snapshot" in gc.stdout and not torn.exists(), gc.stdout
        assert all(f"{p.name}  (leftover of an interrupted run)" in gc.stdout and not p.exists() for p in staging)

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
        for pid, start in leftovers.items():  # frozen above; gone by now unless the guard failed
            if _ray_leftovers(first.proc.pid).get(pid) == start:
                os.kill(pid, signal.SIGKILL)
    assert not any(p.exists() for p in staging)
    assert "leftover Ray processes" not in third.err.read_text(), "gc stopped them: nothing left for the restart"
    assert not (home / ".ray-processes.json").exists(), "a clean shutdown removes the record of its Ray processes"
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
