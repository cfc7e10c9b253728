"""Drills for state folders that share an artifact store and a Ray storage folder (docs/reliability.md):
gc never unpickles, and never deletes what another live holder of the store can still commit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tasks.settings import StatePaths, load_preset, state_paths
from tasks.store.artifacts import MANIFEST, ArtifactStore
from tasks.store.ref_records import read_records, record_path
from tasks.store.state import USERS, collect_garbage, hold_state_folder, home_id

ROOT = Path(__file__).resolve().parents[1]


def _config(home: Path, store: Path, ray: Path):
    return load_preset("smoke", [f"home={home}", f"artifact_store={store}", f"ray.storage_path={ray}"]).resolved()


def _publish(store: ArtifactStore, data: bytes, stage: str = "stage"):
    with store.staging(stage) as folder:
        (folder / "x.bin").write_bytes(data)
        return store.publish(stage, folder, "table")


def _ray_run(root: Path, name: str, steps: tuple[int, ...], committed: tuple[int, ...]) -> Path:
    run = root / name
    for step in steps:
        (run / f"checkpoint-{step}").mkdir(parents=True)
        (run / f"checkpoint-{step}" / "w").write_bytes(b"0" * 10)
    results = [{"checkpoint_dir_name": f"checkpoint-{s}", "metrics": {"step": s}} for s in committed]
    (run / "checkpoint_manager_snapshot.json").write_text(json.dumps({"checkpoint_results": results}))
    return run


class Evil:
    """A pickle that, once loaded, creates the marker file: what a crafted result in a shared store would run."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _crafted_result(folder: Path, marker: Path) -> Path:
    """A Prefect result record (JSON around a pickle) whose pickle creates ``marker`` when loaded."""
    from prefect._internal.result_records import ResultRecord, ResultRecordMetadata
    from prefect.serializers import PickleSerializer

    meta = ResultRecordMetadata(storage_key="0" * 32, expiration=None, serializer=PickleSerializer(),
                                storage_block_id=None)
    folder.mkdir(parents=True)
    path = folder / ("0" * 32)
    path.write_bytes(ResultRecord(result=Evil(str(marker)), metadata=meta).serialize())
    return path


def test_drill_gc_never_unpickles_a_crafted_result_a_shared_store_points_at(tmp_path):
    """Anyone who can write a shared store can add a `.home` there; the result files under that home are
    pickles. `gram gc --apply` (a real process) reads JSON records only: the marker is never created, and a
    result without a record keeps every artifact (nothing is pruned on a guess)."""
    store_root, ray_root = tmp_path / "store", tmp_path / "ray"
    marker = tmp_path / "pwned"
    crafted_home = tmp_path / "crafted-home"
    _crafted_result(crafted_home / "prefect-results", marker)
    (store_root / USERS).mkdir(parents=True)
    (store_root / USERS / "feedfacefeedface.home").write_text(str(crafted_home))
    orphan = _publish(ArtifactStore(store_root), b"nobody's")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    args = [sys.executable, "-m", "flows.cli", "gc", "--apply", "--preset", "smoke", "--set",
            f"home={tmp_path / 'home'}", "--set", f"artifact_store={store_root}", "--set", f"ray.storage_path={ray_root}"]
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not marker.exists(), "gc unpickled a result from a home listed in the shared store"
    assert "KEPT: cached result without a readable JSON record" in done.stdout
    assert Path(orphan.uri).is_dir(), "an unrecorded result must keep every artifact"


def test_cached_results_get_a_json_record_that_gc_reads(tmp_path):
    """The bound stage writes `<results>/.refs/<key>.json` on compute and again on a cache hit."""
    from prefect import flow, task

    from tasks.store.caching import STAGE_CACHE_POLICY, bind

    paths = StatePaths(home=tmp_path, artifact_store=str(tmp_path / "store"),
                       prefect_results=tmp_path / "results", ray_storage=str(tmp_path / "ray"))
    store = ArtifactStore(paths.artifact_store)

    @task(name="make_recorded", cache_policy=STAGE_CACHE_POLICY, persist_result=True)
    def make(data: bytes):
        return {"out": [_publish(store, data)]}

    @flow
    def once():
        return bind(make, paths.prefect_results)(b"recorded")

    made = once()["out"][0]
    (result,) = [p for p in paths.prefect_results.iterdir() if p.is_file()]
    assert read_records(paths.prefect_results) == ([(made.uri, made.sha256)], [])
    record_path(paths.prefect_results, result.name).unlink()
    assert read_records(paths.prefect_results) == ([], [result])  # no record: unreadable, gc keeps everything
    assert once()["out"][0] == made  # a cache hit records it again
    assert read_records(paths.prefect_results) == ([(made.uri, made.sha256)], [])


def test_drill_gc_keeps_what_a_live_holder_of_the_shared_roots_can_still_commit(tmp_path):
    """A holds its state folder (a live run) and has written `checkpoint-9` that its Ray snapshot does not list
    yet, and published an artifact that no record names yet. B's `gc --apply` keeps both, and still prunes
    its own torn checkpoint and an old orphan. Once A is gone, A's leftovers are garbage like any other."""
    store_root, ray_root = tmp_path / "store", tmp_path / "ray"
    cfg_a = _config(tmp_path / "home-a", store_root, ray_root)
    cfg_b = _config(tmp_path / "home-b", store_root, ray_root)
    store = ArtifactStore(store_root)
    orphan = _publish(store, b"old orphan")
    past = time.time() - 3600
    os.utime(Path(orphan.uri) / MANIFEST, (past, past))
    with hold_state_folder(cfg_a):
        run_a = _ray_run(ray_root, f"finetune-0123456789ab-{home_id(tmp_path / 'home-a')}", (8, 9), (8,))
        run_b = _ray_run(ray_root, f"finetune-0123456789ab-{home_id(tmp_path / 'home-b')}", (8, 9), (8,))
        fresh = _publish(store, b"published by A, not yet recorded")
        plan = {g.path for g in collect_garbage(cfg_b, apply=True)}
        assert (run_a / "checkpoint-9").is_dir(), "B's gc removed a checkpoint A's live run can still commit"
        assert Path(fresh.uri).is_dir(), "B's gc removed an artifact A's live run published"
        assert not (run_b / "checkpoint-9").exists() and (run_b / "checkpoint-8").is_dir()
        assert not Path(orphan.uri).exists() and orphan.uri in plan
    collect_garbage(cfg_b, apply=True)  # A is gone: its torn checkpoint and unrecorded artifact are leftovers
    assert not (run_a / "checkpoint-9").exists() and (run_a / "checkpoint-8").is_dir()
    assert not Path(fresh.uri).exists()


def test_drill_a_published_stage_drops_only_its_own_folders_ray_run(tmp_path):
    """Two state folders sharing a Ray storage folder train the same stage on the same inputs: their run names
    differ (each ends with its folder's identity), and one publishing never removes the other's run."""
    from tasks.train_stage import _drop_checkpoints, run_name

    ray_root = tmp_path / "ray"
    cfg_a = _config(tmp_path / "home-a", tmp_path / "store", ray_root)
    cfg_b = _config(tmp_path / "home-b", tmp_path / "store", ray_root)
    paths_a, paths_b = state_paths(cfg_a), state_paths(cfg_b)
    name_a = run_name("finetune", "data", cfg_a.model, home=paths_a.home)
    name_b = run_name("finetune", "data", cfg_b.model, home=paths_b.home)
    assert name_a != name_b and name_a.rsplit("-", 1)[0] == name_b.rsplit("-", 1)[0]
    run_a = _ray_run(ray_root, name_a, (8, 9), (8,))
    run_b = _ray_run(ray_root, name_b, (8,), (8,))
    _drop_checkpoints(paths_b, name_b)
    _drop_checkpoints(paths_b, name_a)  # a name that is not B's own is never B's to drop
    assert not run_b.exists() and (run_a / "checkpoint-9").is_dir()
