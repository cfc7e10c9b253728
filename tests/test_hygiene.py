"""Drill 6 (cache and store hygiene) and the state folder: remote publish writes the manifest last, remote
downloads live under GRAM_HOME and are hash-checked before use, leftovers of killed runs are removed at the
next start, `gram gc` prunes what no cached stage uses (dry run by default)."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

from tasks.store.artifacts import MANIFEST, ArtifactError, ArtifactStore, artifact_cache_dir


def _remote(tmp_path):
    return ArtifactStore(f"memory://hygiene-{uuid.uuid4().hex[:8]}", cache_dir=tmp_path / "cache")


def _publish(store, files):
    with store.staging("eval") as folder:
        for name, data in files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(data)
        return store.publish("eval", folder, "report")


def test_remote_publish_writes_data_first_and_manifest_last(tmp_path, monkeypatch):
    store = _remote(tmp_path)
    written = []
    put = store.fs.put_file
    monkeypatch.setattr(store.fs, "put_file", lambda src, dst, **kw: (written.append(dst.rsplit("/", 1)[-1]),
                                                                        put(src, dst, **kw))[1])
    ref = _publish(store, {"a.bin": b"a", "sub/b.bin": b"b"})
    assert written == ["a.bin", "b.bin", MANIFEST]
    assert store.exists(ref)


def test_interrupted_remote_upload_is_not_an_artifact(tmp_path, monkeypatch):
    store = _remote(tmp_path)
    put = store.fs.put_file

    def fail_on_second(src, dst, **kw):
        if dst.endswith("b.bin"):
            raise ConnectionError("upload cut off")
        return put(src, dst, **kw)

    monkeypatch.setattr(store.fs, "put_file", fail_on_second)
    with pytest.raises(ConnectionError):
        _publish(store, {"a.bin": b"a", "b.bin": b"b"})
    assert store.list() == []  # the data that did land has no manifest: nobody reads it


def test_remote_downloads_live_under_gram_home_and_are_hash_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAM_HOME", str(tmp_path / "home"))
    store = ArtifactStore(f"memory://hygiene-{uuid.uuid4().hex[:8]}")
    assert store.cache_dir == tmp_path / "home" / "artifact-cache" == artifact_cache_dir()
    ref = _publish(store, {"weights.bin": b"good"})
    local = store.local_dir(ref)
    assert local.parent == store.cache_dir and (local / "weights.bin").read_bytes() == b"good"
    (local / "weights.bin").write_bytes(b"evil")  # a tampered cached copy is replaced, not trusted
    assert (store.local_dir(ref) / "weights.bin").read_bytes() == b"good"
    with store.fs.open(ref.file("weights.bin"), "wb") as handle:  # the store copy itself changed
        handle.write(b"bad!")
    (local / "weights.bin").write_bytes(b"also")
    with pytest.raises(ArtifactError, match="expected"):
        store.local_dir(ref)
    assert not any(p.name.startswith(".dl-") for p in store.cache_dir.iterdir())


def test_the_state_folder_travels_as_an_argument_not_through_the_environment(tmp_path, monkeypatch):
    from tasks.settings import state_paths
    from tasks.store.artifacts import open_store
    from tasks.store.state import hold_state_folder

    monkeypatch.setenv("GRAM_HOME", str(tmp_path / "elsewhere"))
    cfg = _config(tmp_path / "home")
    with hold_state_folder(cfg) as paths:
        assert os.environ["GRAM_HOME"] == str(tmp_path / "elsewhere")  # holding a folder sets nothing
        assert paths == state_paths(cfg) and paths.home == tmp_path / "home"
        store = open_store(paths)
        assert store.cache_dir == tmp_path / "home" / "artifact-cache" != artifact_cache_dir()


def _config(home: Path):
    from tasks.settings import load_preset

    return load_preset("smoke", [f"home={home}"]).resolved()


def test_second_holder_of_a_state_folder_fails_and_leftovers_are_cleaned(tmp_path):
    import subprocess
    import sys

    from tasks.settings import state_paths
    from tasks.store.state import StateFolderBusy, hold_state_folder

    cfg = _config(tmp_path / "home")
    paths = state_paths(cfg)
    staging = Path(paths.artifact_store) / "finetune" / ".staging-x1"
    scratch = Path(paths.ray_storage) / ".scratch" / "gram-ckpt-1" / ".checkpoint-3.tmp-99"
    partial = artifact_cache_dir(paths.home) / ".dl-abc"
    for folder in (staging, scratch, partial):
        folder.mkdir(parents=True)
        (folder / "junk").write_text("x")
    kept = Path(paths.artifact_store) / "finetune" / "0123456789abcdef"
    kept.mkdir(parents=True)
    with hold_state_folder(cfg):
        assert not staging.exists() and not scratch.exists() and not partial.exists() and kept.exists()
        with hold_state_folder(cfg):  # re-entrant in the holding process
            pass
        other = subprocess.run([sys.executable, "-c", (
            "import sys; sys.path.insert(0, '.');"
            "from tasks.settings import load_preset; from tasks.store.state import hold_state_folder;"
            f"cfg = load_preset('smoke', ['home={paths.home}']).resolved()\n"
            "with hold_state_folder(cfg): pass")], capture_output=True, text=True, cwd=Path(__file__).parents[1])
        assert other.returncode != 0 and "another run holds this state folder" in other.stderr
        assert f"pid {__import__('os').getpid()}" in other.stderr
    with hold_state_folder(cfg):  # released: free again
        pass
    assert issubclass(StateFolderBusy, RuntimeError)


LEFTOVER_DRIVER = """
import subprocess, sys, time
from tasks.store.leftover_processes import RuntimeRecord
with RuntimeRecord(sys.argv[1]):  # as ray_runtime wraps ray.init: what starts here carries the mark
    # a worker in a process group of its own, with a child that does not carry the mark (env cleared)
    worker = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                               "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], env={}); "
                               "time.sleep(600)"], start_new_session=True)
    agent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print(worker.pid, agent.pid, flush=True)
time.sleep(600)
"""


def _children(pid: int) -> list[int]:
    from tasks.store.leftover_processes import _processes

    return [child for child, (ppid, _, state) in _processes().items() if ppid == pid and state != "Z"]


def test_a_killed_drivers_leftover_processes_are_stopped_by_the_next_holder(tmp_path, caplog):
    """Unit level (no Ray; the kill -9 drill in test_reliability.py runs it on a real `gram run`): a driver
    records its runtime, starts a marked worker (own process group, with a child whose environment is cleared, as
    a `ray::` process's is overwritten) and a marked agent, and dies by SIGKILL; the next holder of the state
    folder stops all three, never a process whose pid is recorded with another start time (a reused pid), and
    removes the record. A live driver's record is left alone."""
    import signal
    import subprocess
    import sys
    import time

    from tasks.store.leftover_processes import RECORD, _alive, start_time, stop_leftovers
    from tasks.store.state import hold_state_folder

    cfg = _config(tmp_path / "home")
    home = tmp_path / "home"
    home.mkdir()
    driver = subprocess.Popen([sys.executable, "-c", LEFTOVER_DRIVER, str(home)], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).parents[1], start_new_session=True)
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    starts: dict[int, int | None] = {}  # what the driver started: pid -> start time
    try:
        worker, agent = map(int, driver.stdout.readline().split())
        starts.update({pid: start_time(pid) for pid in (worker, agent)})
        deadline = time.monotonic() + 60
        while not _children(worker):
            assert time.monotonic() < deadline, "the worker's child did not start"
            time.sleep(0.05)
        starts.update({pid: start_time(pid) for pid in _children(worker)})
        assert stop_leftovers(home) == 0 and (home / RECORD).exists(), "the driver is alive: not a leftover"
        while {p["pid"] for p in json.loads((home / RECORD).read_text())["processes"]} != set(starts):
            assert time.monotonic() < deadline, "the record does not list the unmarked child (kept current: 1 s)"
            time.sleep(0.1)
        driver.send_signal(signal.SIGKILL)  # the driver alone
        driver.wait(30)
        record = json.loads((home / RECORD).read_text())
        record["processes"].append({"pid": bystander.pid, "start": start_time(bystander.pid) - 1})  # a reused pid
        (home / RECORD).write_text(json.dumps(record))
        assert len(starts) == 3 and all(_alive(pid, start) for pid, start in starts.items()), \
            "the driver's processes outlive it"
        with caplog.at_level("INFO", logger="gram"), hold_state_folder(cfg):
            assert not any(_alive(pid, start) for pid, start in starts.items())
        assert "stopped 3 leftover Ray processes of the run that held this state folder before" in caplog.text
        assert bystander.poll() is None and not (home / RECORD).exists()
    finally:  # only what this test started, and only while it is still the same process
        driver.kill()
        bystander.kill()
        for pid, start in starts.items():
            if start is not None and _alive(pid, start):
                os.kill(pid, signal.SIGKILL)
        driver.wait()
        bystander.wait()


def test_gc_dry_run_lists_and_apply_removes_only_unreferenced(tmp_path):
    from prefect import flow, task

    from tasks.settings import state_paths
    from tasks.store.caching import STAGE_CACHE_POLICY, bind
    from tasks.store.state import collect_garbage

    cfg = _config(tmp_path / "home")
    paths = state_paths(cfg)
    store = ArtifactStore(paths.artifact_store)

    @task(name="make", cache_policy=STAGE_CACHE_POLICY, persist_result=True)
    def make(data: bytes):
        with store.staging("stage") as folder:
            (folder / "x.bin").write_bytes(data)
            return store.publish("stage", folder, "table")

    @flow
    def once():
        return bind(make, paths.prefect_results)(b"used")

    used = once()
    unused = _publish_local(store, b"orphan")
    ray_run = Path(paths.ray_storage) / "finetune-abc"
    for step in (1, 2, 3):
        (ray_run / f"checkpoint-{step}").mkdir(parents=True)
        (ray_run / f"checkpoint-{step}" / "w").write_bytes(b"0" * 100)
    _ray_snapshot(ray_run, ["checkpoint-3"])

    registered = Path(str(paths.home)) / "registered"  # the CLI's registered-model cache
    for folder in ("aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb", ".download-x1"):
        (registered / folder).mkdir(parents=True)
    (registered / "by-version" / "judge").mkdir(parents=True)
    (registered / "by-version" / "judge" / "3.json").write_text(json.dumps({"folder": "aaaaaaaaaaaaaaaa"}))

    plan = {Path(g.path).name: g for g in collect_garbage(cfg)}
    assert set(plan) == {Path(unused.uri).name, "checkpoint-1", "checkpoint-2", "bbbbbbbbbbbbbbbb", ".download-x1"}
    orphan_bytes = sum(f.stat().st_size for f in Path(unused.uri).rglob("*") if f.is_file())
    assert plan[Path(unused.uri).name].bytes == orphan_bytes and Path(unused.uri).exists()  # dry run only
    collect_garbage(cfg, apply=True)
    assert not Path(unused.uri).exists() and Path(used.uri).exists()
    assert sorted(p.name for p in ray_run.iterdir()) == ["checkpoint-3", "checkpoint_manager_snapshot.json"]
    assert sorted(p.name for p in registered.iterdir()) == [".cache.lock", "aaaaaaaaaaaaaaaa", "by-version"]
    assert json.loads((Path(used.uri) / MANIFEST).read_text())["sha256"] == used.sha256


def _publish_local(store, data):
    with store.staging("stage") as folder:
        (folder / "x.bin").write_bytes(data)
        return store.publish("stage", folder, "table")


def test_eval_set_id_is_the_rows_not_the_file(tmp_path):
    """Drill 5: the same rows written differently (compression, row groups, row order) are one eval set;
    a changed text or a judge setting that changes scores is another."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_contracts import REWARDBENCH, validate
    from gram_core.config import JudgeConfig
    from tasks.register import eval_set_id

    rows = {"prompt": ["2+2?", "Say hi ✋"], "chosen": ["4", "Hi!"], "chosen_model": ["a", "a"],
            "rejected": ["5", "Go."], "rejected_model": ["b", "b"], "subset": ["math", "chat"], "id": [1, 2]}
    table = validate(pa.table(rows), REWARDBENCH)
    pq.write_table(table, tmp_path / "a.parquet", compression="snappy")
    pq.write_table(table.take([1, 0]), tmp_path / "b.parquet", compression="zstd", row_group_size=1)
    assert (tmp_path / "a.parquet").read_bytes() != (tmp_path / "b.parquet").read_bytes()
    judge = JudgeConfig()
    ids = {eval_set_id(pq.read_table(tmp_path / f), judge) for f in ("a.parquet", "b.parquet")}
    assert len(ids) == 1
    changed = validate(pa.table({**rows, "chosen": ["4", "Hello!"]}), REWARDBENCH)
    assert eval_set_id(changed, judge) not in ids
    assert eval_set_id(table, JudgeConfig(max_length=512)) not in ids
    assert eval_set_id(table, JudgeConfig(batch_size=2)) in ids  # batch size does not change scores


def _ray_snapshot(run: Path, committed: list[str], pending: tuple[str, ...] = ()) -> None:
    """Ray Train's own run snapshot (its pydantic state, as its CheckpointManager writes it) listing ``committed``,
    and ``pending``: checkpoints reported but awaiting validation (in no other field of the snapshot)."""
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import (
        _CheckpointManagerState,
        _TrainingResultState,
    )

    results = [_TrainingResultState(checkpoint_dir_name=name, metrics={"step": i}) for i, name in enumerate(committed)]
    state = _CheckpointManagerState(
        checkpoint_results=results, checkpoint_report_indices=list(range(len(results))),
        latest_checkpoint_result=results[-1] if results else None,
        pending_training_results=[_TrainingResultState(checkpoint_dir_name=n, metrics={}) for n in pending],
        pending_validation_specs=[], current_report_index=len(results), validated_checkpoint_dir_names=[],
        timed_out_validation_checkpoint_dir_names=[], failed_validation_checkpoint_dir_names=[])
    (run / "checkpoint_manager_snapshot.json").write_text(state.model_dump_json())


def test_drill_gc_keeps_the_committed_checkpoint_not_the_newest(tmp_path, monkeypatch, capsys):
    """A committed checkpoint plus a torn newer one (written, killed before Ray recorded it): `gram gc --apply`
    keeps what Ray Train's snapshot lists, so the resume that reads the snapshot finds its checkpoint; without
    a readable snapshot it keeps them all. Unit level, on Ray's own snapshot model, through the CLI in this
    process. The same at process level, with the real resume: the kill -9 drill in test_reliability.py puts a
    torn `checkpoint-168` beside a real killed run's checkpoints, runs `gram gc --apply` as a process, checks
    that it removed the torn folder and kept every checkpoint the snapshot lists, and the restarted `gram run`
    resumes from the committed one."""
    from flows.cli import main
    from tasks.store.state import committed_checkpoints

    home = tmp_path / "home"
    monkeypatch.setenv("GRAM_HOME", str(home))
    run = home / "ray_storage" / "finetune-0123456789abcdef"
    for name in ("checkpoint-2026-12-06_00-00-01.000001", "checkpoint-2026-12-06_00-00-09.000002"):
        (run / name).mkdir(parents=True)
        (run / name / "trainer_state.json").write_text(json.dumps({"step": 8}))
    committed, torn = "checkpoint-2026-12-06_00-00-01.000001", "checkpoint-2026-12-06_00-00-09.000002"
    (run / torn / "trainer_state.json").unlink()  # torn: half written
    _ray_snapshot(run, [committed])
    assert main(["gc", "--preset", "smoke", "--apply"]) == 0
    assert "not in its run's snapshot" in capsys.readouterr().out
    assert sorted(p.name for p in run.iterdir()) == [committed, "checkpoint_manager_snapshot.json"]
    # What the resume restores: every checkpoint the snapshot lists is still there, whole.
    assert all((run / name / "trainer_state.json").is_file() for name in committed_checkpoints(run))
    # Without a readable snapshot nothing is pruned: a resume might need any checkpoint.
    (run / "checkpoint_manager_snapshot.json").write_text("{torn")
    (run / torn).mkdir()
    assert main(["gc", "--preset", "smoke", "--apply"]) == 0
    assert (run / torn).is_dir() and (run / committed).is_dir()


def test_drill_gc_keeps_a_checkpoint_awaiting_validation(tmp_path):
    """A checkpoint Ray Train reported but has not validated yet is listed only under the snapshot's
    `pending_training_results`; a resume restores it, so gc keeps it (and still removes a torn one)."""
    from tasks.store.state import collect_garbage

    cfg = _config(tmp_path / "home")
    run = tmp_path / "home" / "ray_storage" / "finetune-0123456789abcdef"
    for name in ("checkpoint-8", "checkpoint-16", "checkpoint-24"):
        (run / name).mkdir(parents=True)
    _ray_snapshot(run, ["checkpoint-8"], pending=("checkpoint-16",))
    removed = {Path(g.path).name for g in collect_garbage(cfg, apply=True)}
    assert (run / "checkpoint-16").is_dir(), "gc removed a checkpoint awaiting validation"
    assert removed == {"checkpoint-24"} and (run / "checkpoint-8").is_dir()


LIVE_RUN = """
import sys, time
from pathlib import Path
from tasks.store.artifacts import open_store
from tasks.settings import load_preset
from tasks.store.state import hold_state_folder

home, store, signal = sys.argv[1], sys.argv[2], Path(sys.argv[3])
cfg = load_preset("smoke", [f"home={home}", f"artifact_store={store}"]).resolved()
with hold_state_folder(cfg) as paths, open_store(paths).staging("finetune") as folder:
    (folder / "weights.bin").write_bytes(b"live")
    (signal / "staging").write_text(str(folder))
    while not (signal / "done").exists():
        time.sleep(0.05)
"""


def test_drill_two_state_folders_sharing_a_store_never_clean_or_gc_each_others_files(tmp_path, capsys):
    """Drill 3: two processes, two homes, one store. A (another process) is mid-run with a live staging
    folder; B starts on the same store: its start-up cleanup leaves A's staging alone, its `gram gc --apply`
    keeps the artifact A's cached result refers to and removes only a true orphan. Once A is gone, a
    killed run's staging in the store is cleaned again."""
    import subprocess
    import sys
    import time

    from prefect import flow, task

    from tasks.settings import load_preset, state_paths
    from tasks.store.caching import STAGE_CACHE_POLICY, bind
    from tasks.store.state import collect_garbage, hold_state_folder

    store_root = tmp_path / "store"

    def config(home):
        return load_preset("smoke", [f"home={home}", f"artifact_store={store_root}"]).resolved()

    cfg_a, cfg_b = config(tmp_path / "home-a"), config(tmp_path / "home-b")
    paths_a = state_paths(cfg_a)
    store = ArtifactStore(paths_a.artifact_store)

    @task(name="make_shared", cache_policy=STAGE_CACHE_POLICY, persist_result=True)
    def make(data: bytes):
        return _publish_local(store, data)

    @flow
    def once():
        return bind(make, paths_a.prefect_results)(b"used by A only")

    with hold_state_folder(cfg_a):
        used_by_a = once()  # A's cached result refers to this artifact; B's results do not
    orphan = _publish_local(store, b"nobody's")
    # An old orphan: gc keeps what was published just before a live holder started (state.LIVE_SLACK_S), and
    # on a quiet machine A's process takes its lock within that slack of this publish.
    old = (Path(orphan.uri) / MANIFEST).stat().st_mtime - 3600
    os.utime(Path(orphan.uri) / MANIFEST, (old, old))
    signal = tmp_path / "signal"
    signal.mkdir()
    live = subprocess.Popen([sys.executable, "-c", LIVE_RUN, str(paths_a.home), str(store_root), str(signal)],
                            cwd=Path(__file__).parents[1], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (signal / "staging").exists():
            assert live.poll() is None, live.communicate()
            assert time.time() < deadline
            time.sleep(0.05)
        staging = Path((signal / "staging").read_text())
        with hold_state_folder(cfg_b):  # B's start-up cleanup
            assert staging.is_dir(), "B removed the live staging folder of A's run"
        collect_garbage(cfg_b, apply=True)
        assert staging.is_dir() and Path(used_by_a.uri).is_dir(), "B's gc removed what A uses"
        assert not Path(orphan.uri).exists()
    finally:
        (signal / "done").touch()
        live.wait(60)
    killed = store_root / "finetune" / ".staging-killed"  # A is gone: a leftover is a leftover again
    killed.mkdir(parents=True)
    with hold_state_folder(cfg_b):
        assert not killed.exists()
    assert (tmp_path / "home-b").stat().st_mode & 0o777 == 0o700


def test_no_test_turns_an_import_bug_into_a_skip():
    """importorskip on an in-repo module or on ray would make an import error look like a skipped test."""
    import re

    pattern = re.compile(r"importorskip\(\s*[\"'](data_contracts|gram_core|tasks|flows|ray)\b")
    found = [p.name for p in Path(__file__).parent.glob("*.py") if pattern.search(p.read_text())]
    assert found == []
