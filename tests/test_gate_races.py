"""The promotion gate under races (tasks/on_mlflow/promotion_gate.py): gate processes that promote at the
same time, on one host (the file lock serializes them) and on two (the registry's compare-and-set decides),
and writers that move the champion alias without the lock."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient
from registry_versions import alias_version, mlflow_uri, new_version

from tasks.on_mlflow import model_registry

GATE_PROCESS = """
import json, sys, time
from pathlib import Path
from mlflow import MlflowClient
from tasks.on_mlflow import model_registry

uri, name, version, pause, out = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), Path(sys.argv[5])
client = MlflowClient(uri)
real = MlflowClient.set_registered_model_alias

def paused(self, model, alias, v):  # the window in which an unlocked gate lets the other read the old champion
    if alias == "champion" and pause:
        out.with_suffix(".decided").touch()
        time.sleep(pause)
    return real(self, model, alias, v)

MlflowClient.set_registered_model_alias = paused
if len(sys.argv) > 6:  # another host: a lock folder of its own
    from tasks.on_mlflow import promotion_gate
    promotion_gate.promotion_lock_path = lambda uri, name: Path(sys.argv[6]) / "promote.lock"
go = out.with_suffix(".go")
out.with_suffix(".ready").touch()
while not go.exists():
    time.sleep(0.02)
start = time.time()
try:
    decision = model_registry.promote_if_better(client, name, version, "rewardbench/overall", 0.0, "set-a")
    result = {"decision": decision.decision, "champion_version": decision.champion_version}
except model_registry.PromotionConflict as err:
    result = {"decision": "conflict", "champion_version": None, "error": str(err)}
out.write_text(json.dumps({"start": start, "end": time.time(), **result}))
"""


def _wait_for(path: Path, proc, timeout: float = 120.0) -> None:
    import time

    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def _race(tmp_path: Path, name: str, slow_score: float, slow: dict, fast: dict) -> tuple[dict, dict]:
    """Two gate processes (GATE_PROCESS) race to promote 0.65 and 0.70 against a 0.60 champion of ``name``.
    The one holding ``slow_score`` starts first and pauses (``slow["pause"]`` s) right after its decision,
    before it moves the alias; the other starts then. ``slow`` / ``fast``: "uri" (the registry's spelling) and
    optionally "host" (a lock folder of its own). -> ({score: version}, {score: the process's JSON result})."""
    client, metric = MlflowClient(), "rewardbench/overall"
    champion = new_version(client, name, 0.60, "set-a", metric)
    assert model_registry.promote_if_better(client, name, champion, metric, 0.0, "set-a").promoted
    fast_score = 0.70 if slow_score == 0.65 else 0.65
    versions = {s: new_version(client, name, s, "set-a", metric) for s in (slow_score, fast_score)}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                         os.environ.get("PYTHONPATH", "")])}
    outs = {s: tmp_path / f"gate-{s}.json" for s in versions}
    plans = {slow_score: {"pause": 0, **slow}, fast_score: {**fast, "pause": 0}}
    procs = {s: subprocess.Popen([sys.executable, "-c", GATE_PROCESS, plan["uri"], name, versions[s],
                                  str(plan["pause"]), str(outs[s]), *([plan["host"]] if "host" in plan else [])],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for s, plan in plans.items()}
    try:
        for s in versions:  # both processes have imported MLflow and wait at the start line
            _wait_for(outs[s].with_suffix(".ready"), procs[s])
        outs[slow_score].with_suffix(".go").touch()
        _wait_for(outs[slow_score].with_suffix(".decided"), procs[slow_score])
        outs[fast_score].with_suffix(".go").touch()  # the second gate starts while the first is paused
        for proc in procs.values():
            assert proc.wait(120) == 0, proc.communicate()
    finally:
        for proc in procs.values():
            proc.kill()
    return versions, {s: json.loads(outs[s].read_text()) for s in versions}


@pytest.mark.parametrize("slow_score", [0.65, 0.70])
def test_drill_concurrent_promotions_keep_the_better_model(mlflow_store, tmp_path, slow_score):
    """Drill 1: two gate *processes* race against a 0.60 champion (0.70 and 0.65, in both orders), each naming
    the registry with another spelling of its URI. The first pauses inside the gate, after its decision and
    right before moving the alias; the second starts then. It must wait for the first (its gate ends after
    the first's and reads the champion the first set) and the better model must end as champion."""
    uri = mlflow_uri()
    db = Path(uri[len("sqlite:///"):])
    alias_uri = f"sqlite:///{db.parent}/../{db.parent.name}//{db.name}"  # the same file, spelled otherwise
    assert model_registry.promotion_lock_path(alias_uri, "x") == model_registry.promotion_lock_path(uri, "x")
    name = f"judge-race-{int(slow_score * 100)}"
    versions, results = _race(tmp_path, name, slow_score, {"uri": uri, "pause": 2.0}, {"uri": alias_uri})
    first, second = results[slow_score], results[0.70 if slow_score == 0.65 else 0.65]
    assert second["start"] < first["end"] <= second["end"]  # it started during the first gate, and waited
    assert first["decision"] == "promoted" and second["champion_version"] == versions[slow_score]
    assert alias_version(MlflowClient(), name, "champion") == versions[0.70]


@pytest.mark.parametrize("slow_score", [0.65, 0.70])
def test_drill_gates_on_two_hosts_keep_the_better_model_or_raise_a_conflict(mlflow_store, tmp_path, slow_score):
    """Two gate processes with two lock folders (two hosts: the file lock does not serialize them) race against
    a 0.60 champion; the slow one pauses right before it moves the alias and the fast one runs meanwhile. The
    registry claim (compare-and-set) lets at most one move: either the 0.70 model ends as champion and nobody
    complains, or a gate raised ``PromotionConflict`` having moved nothing. No gate leaves a claim behind."""
    client, uri, name = MlflowClient(), mlflow_uri(), f"judge-hosts-{int(slow_score * 100)}"
    versions, results = _race(tmp_path, name, slow_score,
                              {"uri": uri, "pause": 3.0, "host": str(tmp_path / "host-slow")},
                              {"uri": uri, "host": str(tmp_path / "host-fast")})
    final = alias_version(client, name, "champion")
    conflicts = [s for s, r in results.items() if r["decision"] == "conflict"]
    assert final == versions[0.70] or conflicts, f"the worse model is champion and no gate said so: {results}"
    assert all(final != versions[s] for s in conflicts), "a gate that raised PromotionConflict left its move"
    assert not [k for k in client.get_registered_model(name).tags if k.startswith("promotion/claim/")]


def test_drill_a_hand_made_move_between_decision_and_move_makes_the_gate_decide_again(mlflow_store, monkeypatch):
    """The gate re-reads the champion right before it moves the alias: a writer without the lock that sets a
    better champion (0.80) after the gate read 0.60 makes it keep, not overwrite the 0.80 with its 0.70."""
    client, metric, name = MlflowClient(), "rewardbench/overall", "judge-reread"
    base = new_version(client, name, 0.60, "set-a", metric)
    client.set_registered_model_alias(name, "champion", base)
    better = new_version(client, name, 0.80, "set-a", metric)
    candidate = new_version(client, name, 0.70, "set-a", metric)
    read = MlflowClient.get_model_version_by_alias
    calls = []

    def read_then_rival_moves(self, model, alias):
        found = read(self, model, alias)
        if not calls:  # right after the gate's first read, the other writer moves the alias
            MlflowClient.set_registered_model_alias(self, model, alias, better)
        calls.append(alias)
        return found

    monkeypatch.setattr(MlflowClient, "get_model_version_by_alias", read_then_rival_moves)
    decision = model_registry.promote_if_better(client, name, candidate, metric, 0.0, "set-a")
    monkeypatch.undo()
    assert decision.decision == "kept" and decision.champion_version == better
    assert alias_version(client, name, "champion") == better


def test_gate_lock_key_ignores_spelling_credentials_and_loopback_aliases():
    lock = model_registry.promotion_lock_path
    same = ["http://localhost:5000", "http://localhost:5000/", "HTTP://LOCALHOST:5000//",
            "http://user:pw@127.0.0.1:5000/?token=x", "http://[::1]:5000"]
    assert len({lock(u, "m") for u in same}) == 1
    assert lock("http://localhost:5001", "m") != lock(same[0], "m") != lock(same[0], "other")
    assert lock("https://mlflow.example.com:443/", "m") == lock("https://mlflow.example.com", "m")


def test_gate_reports_a_writer_that_moved_the_alias_outside_the_lock(mlflow_store, monkeypatch):
    """Verify after moving: another writer (no lock) moves the alias right after this gate did -> reported."""
    client, metric, name = MlflowClient(), "rewardbench/overall", "judge-verify"
    base = new_version(client, name, 0.60, "set-a", metric)
    candidate = new_version(client, name, 0.70, "set-a", metric)
    set_alias = MlflowClient.set_registered_model_alias

    def hijacked(self, model, alias, version):
        set_alias(self, model, alias, version)
        set_alias(self, model, alias, base)  # the other writer wins

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", hijacked)
    with pytest.raises(model_registry.PromotionConflict, match=f"now points at {base}: another writer"):
        model_registry.promote_if_better(client, name, candidate, metric, 0.0, "set-a")
