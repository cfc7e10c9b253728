"""`gram serve` as the tests start it, in one place: the real CLI process (`python -m flows.cli serve`) on a
free loopback port, in a process group and a short /tmp folder of its own (Ray's socket paths must stay
short), waited for over HTTP and stopped by PID (SIGTERM; SIGKILL to the group only if it hangs).

``open_server`` (tests/conftest.py) is one such server shared by the whole session's client tests (OpenRLHF's
executor, TRL on two processes, verl's reward managers): Ray Serve starts once. It serves ``sharp_tiny_dir``,
a tiny random judge whose weights are scaled so that its probabilities spread (about 0.41-0.52): the plain
tiny judge's rewards all lie within 1e-6 of 0.5, so a reward put on the wrong sample would pass a 1e-4 check.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from leak_scan import files_holding, replica_logs

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url: str, path: str, body=None, token: str | None = None, raw: bytes | None = None, timeout: float = 120):
    """(status, JSON body, headers) of one request: POST when there is a body, else GET."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url + path, data=data, method="POST" if data is not None else "GET",
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {token}"} if token else {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, json.loads(answer.read()), answer.headers
    except urllib.error.HTTPError as err:
        text = err.read()
        try:
            return err.code, json.loads(text), err.headers
        except json.JSONDecodeError:
            return err.code, {"raw": text.decode(errors="replace")}, err.headers


class GramServe:
    """`gram serve MODEL --port P --cpus-per-replica 1 FLAGS...` started now (``token``: with --token-file). Use
    ``wait_ready``, then ``stop`` (the exit code) and ``close``. The server's test hooks (tasks/serving/server.py):
    while the file ``hold`` exists a batch is held mid-scoring; with ``gated`` the model load waits until the file
    ``gate`` exists."""

    def __init__(self, *flags: str, model: str = "tiny", token: str | None = None, gated: bool = False,
                 prefix: str = "gs"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.work = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
        if token is not None:  # --token-file: every scoring request needs "Authorization: Bearer <token>"
            (self.work / "token").write_text(token + "\n")
            flags = (*flags, "--token-file", str(self.work / "token"))
        self.log_path, self.hold, self.gate = self.work / "serve.log", self.work / "hold", self.work / "gate"
        full_env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_TMPDIR": str(self.work / "r"),
                    "RAY_AUTH_MODE": "disabled", "GRAM_HOME": str(self.work / "home"),
                    "GRAM_SERVE_TEST_HOLD": str(self.hold),
                    **({"GRAM_SERVE_TEST_LOAD_GATE": str(self.gate)} if gated else {})}
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed by close()
        self.proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", model, "--port", str(self.port),
                                      "--cpus-per-replica", "1", *flags], cwd=ROOT, env=full_env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def log_text(self) -> str:
        return self.log_path.read_text()

    def wait_until(self, done: Callable[[], bool], what: str, timeout_s: float = 600) -> None:
        """Poll ``done`` (connection errors count as not yet) until it holds; fail if the server exits first."""
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.proc.poll() is None, f"gram serve exited before {what}:\n{self.log_text()[-3000:]}"
            assert time.monotonic() < deadline, f"gram serve: not {what} in {timeout_s} s:\n{self.log_text()[-3000:]}"
            with contextlib.suppress(OSError):
                if done():
                    return
            time.sleep(0.3)

    def wait_ready(self, timeout_s: float = 600) -> None:
        self.wait_until(lambda: call(self.url, "/ready")[0] == 200, "ready", timeout_s)

    def stop(self, timeout_s: float = 120) -> int:
        """SIGTERM by PID (when still running) and the exit code; SIGKILL to its group if it does not stop."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait()

    def scan(self, *needles: bytes) -> tuple[list[str], list[str]]:
        """(the files under the server's folder that hold any of ``needles``, Ray Serve's replica logs found
        there): our log, Ray's session folder with its replica and proxy logs; the token file itself is skipped."""
        return files_holding(self.work, needles, skip=[self.work / "token"]), replica_logs(self.work)

    def close(self) -> None:
        """Stopped, then any process of its group left behind (Ray's) killed, the log closed, the folder gone."""
        self.stop()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()
        shutil.rmtree(self.work, ignore_errors=True)


def save_sharp_tiny_judge(folder: Path, scale: float = 10.0) -> Path:
    """The tiny random judge (seed 0) with every weight matrix times ``scale``, saved as a model folder."""
    import torch

    from gram_core.models import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, seed=0)
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() > 1:
                weight.mul_(scale)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def load_served_judge(folder: str):
    """The judge `gram serve` loads from ``folder`` (demo preset), reading texts literally as the server does."""
    from gram_core.scorers import open_scorer
    from tasks.settings import load_preset

    judge = open_scorer(folder, load_preset("demo").resolved().judge)
    judge.encoder.literal = True
    return judge
