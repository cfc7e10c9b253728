"""The docs run as written: every ```bash block of README.md, docs/operations.md and docs/serving.md, in order, in a fresh copy
of the checkout (its own state folder and Prefect home), servers on 127.0.0.1 started and stopped by PID.

A block preceded by ``<!-- docs-test: skip (reason) -->`` is not run (the 14-minute demo run, foreground
servers, placeholders); everything else is, with only the port numbers swapped for free ones. The smoke path
covered: deploy, trigger, a worker processing the run, its artifacts, an MLflow server, serving the
registered judge over REST, `gram judge` and `gram rank` on it.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "docs/operations.md", "docs/serving.md")
PORTS = ("4200", "5000", "5001")
DOC_TIMEOUT_S = 1200  # per document; the smoke path takes a few minutes
SKIP = re.compile(r"<!-- docs-test: skip \((?P<reason>[^)]*)\) -->\s*$")
FENCE = re.compile(r"^```bash\n(?P<body>.*?)^```", re.M | re.S)


def command_blocks(text: str) -> list[tuple[str, str | None]]:
    """(body, skip reason or None) for each ```bash block, in order."""
    blocks = []
    for match in FENCE.finditer(text):
        before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = SKIP.match(before)
        blocks.append((match.group("body"), skip.group("reason") if skip else None))
    return blocks


def test_command_blocks_and_skip_markers():
    text = "a\n<!-- docs-test: skip (slow) -->\n```bash\nmake run\n```\n\n```bash\necho hi\n```\n```python\nx\n```\n"
    assert command_blocks(text) == [("make run\n", "slow"), ("echo hi\n", None)]
    for doc in DOCS:  # every skipped block says why; and something is left to run
        blocks = command_blocks((ROOT / doc).read_text())
        assert all(reason.strip() for _, reason in blocks if reason is not None)
        assert any(reason is None for _, reason in blocks), doc


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _fresh_clone(dst: Path) -> Path:
    """The checkout's tracked and untracked (not ignored) files, as a fresh clone would have them."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            (dst / rel).write_bytes(src.read_bytes())
    return dst


def _script(doc: str, text: str) -> str:
    ports = {p: _free_port() for p in PORTS}
    lines = ["set -euo pipefail", 'trap \'echo "docs-test: failed in block $BLOCK of ' + doc + '" >&2\' ERR']
    for number, (body, skip) in enumerate(command_blocks(text), start=1):
        if skip is not None:
            continue
        for old, new in ports.items():
            body = re.sub(rf"\b{old}\b", new, body)
        lines += [f"BLOCK={number}", f'echo "=== {doc} block {number}"', body]
    return "\n".join(lines) + "\n"


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper counts as stopped)."""
    stat = Path(f"/proc/{pid}/stat")
    if stat.parent.parent.is_dir() and Path("/proc/self").exists():
        try:
            return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _stop_leftovers(folder: Path, grace_s: float = 30.0) -> list[int]:
    """Processes a doc started (its *.pid files) still running after a grace period (a documented `kill`
    may be the doc's last line): killed, and returned."""
    pids = [int(p.read_text().split()[0]) for p in folder.glob("*.pid")]
    for pid_file in folder.glob("*.pid"):
        pid_file.unlink()
    deadline = time.monotonic() + grace_s
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = [pid for pid in pids if _alive(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    return left


@pytest.mark.slow
def test_docs_run_as_written(tmp_path):
    clone = _fresh_clone(tmp_path / "clone")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "MLFLOW_", "GRAM_", "RAY_ADDRESS", "VIRTUAL_ENV"))}
    env.update({"PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
                "PYTHONPATH": str(clone),  # `gram`, the worker's flow runs and the server import this copy
                "PREFECT_HOME": str(tmp_path / "prefect-home"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    outputs = {}
    for doc in DOCS:
        shell = subprocess.Popen(["bash", "-c", _script(doc, (clone / doc).read_text())], cwd=clone, env=env,
                                 stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True, start_new_session=True)
        try:
            out, _ = shell.communicate(timeout=DOC_TIMEOUT_S)
        except subprocess.TimeoutExpired:  # e.g. a server that never answers: stop the whole block's processes
            os.killpg(shell.pid, signal.SIGKILL)
            out = shell.communicate()[0] + f"\ndocs-test: {doc} still running after {DOC_TIMEOUT_S} s, killed"
        outputs[doc] = out
        left = _stop_leftovers(clone)
        assert shell.returncode == 0, f"{doc} failed:\n{out[-6000:]}"
        assert left == [], f"{doc} left processes running: {left}"
    readme, ops, serving = outputs["README.md"], outputs["docs/operations.md"], outputs["docs/serving.md"]
    # the reward server: every endpoint answered, TRL ran two GRPO steps through it, verl's function scored
    assert re.search(r'\{"rewards":\[0\.[0-9]+\],"scores"', serving), serving[-4000:]
    assert '"results":[{"p_a_order1"' in serving and '"best_index"' in serving, serving[-4000:]
    assert "GRPO steps: 2" in serving and re.search(r"verl reward: 0\.[0-9]+", serving), serving[-4000:]
    assert "gram-pipeline/nightly" in readme and "gram-adapt/adapt" in readme
    worker_log = (clone / "prefect-worker.log").read_text()
    assert "Traceback" not in worker_log, worker_log[-3000:]
    # the triggered smoke run: every stage, training progress with ETA in the run's logs, its artifacts
    assert "Finished in state Completed()" in ops, ops[-6000:]
    assert re.search(r"finetune: step 3 \(100%\), [0-9]+ s elapsed, ~0 s left", ops), ops[-6000:]
    assert '"key": "gram-report"' in ops and "## GRAM pipeline run" in ops  # the inspected report artifact
    assert "gram-eval" in ops and "accuracy" in ops
    assert "PreemptionWatcher" not in ops and "CloudPickle" not in ops and "input_example" not in ops
    # served and judged by the documented model name
    assert re.search(r'\{"predictions": \[\{"p_a_better": [0-9.]+', ops), ops[-4000:]
    assert re.search(r"P\(a ≻ b\) = [0-9.]+", ops) and '"best_index"' in ops
    assert "Loading weights" not in ops and "Downloading artifacts" not in ops
