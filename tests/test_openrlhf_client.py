"""OpenRLHF's own reward client against `gram serve`: the HTTP path of OpenRLHF 0.11.2's rollout executor
(`openrlhf.utils.agent.SingleTurnAgentExecutor._fetch_rewards_via_http`: aiohttp, 180 s timeout, 5 tries),
imported from the real package (installed by `make setup` with --no-deps: its full dependency set is
DeepSpeed and vLLM). OpenRLHF sends no Authorization header, so this server runs without --token-file."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from openrlhf.utils.agent import SingleTurnAgentExecutor
from test_serve import (
    COMPLETIONS,
    PROMPT,
    REFERENCE,
    ROOT,
    _free_port,
    call,
    local_judge,  # noqa: F401 - the in-process judge fixture
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def open_server():
    """`gram serve tiny` without a token on a free loopback port; SIGTERM by PID at the end."""
    port = _free_port()
    work = Path(tempfile.mkdtemp(prefix="go", dir="/tmp"))  # Ray's socket paths must stay short
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_TMPDIR": str(work / "r"), "RAY_AUTH_MODE": "disabled",
           "GRAM_HOME": str(work / "home")}
    log = open(work / "serve.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "tiny", "--port", str(port),
                             "--cpus-per-replica", "1"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, (work / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (work / "serve.log").read_text()[-3000:]
            try:
                if call(url, "/ready", token=None)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        yield url
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        shutil.rmtree(work, ignore_errors=True)


def test_openrlhf_reward_client_gets_the_judge_rewards(open_server, local_judge):  # noqa: F811 - the fixture
    from gram_core.reward_scoring import rewards_vs_reference

    executor = SingleTurnAgentExecutor(remote_rm_url=open_server + "/get_reward")
    queries = [PROMPT + c for c in COMPLETIONS]
    # As a rollout calls it: one sample per call, many calls in flight at once.
    answers = asyncio.run(_gather(executor, queries))
    want = rewards_vs_reference(local_judge, [PROMPT] * len(COMPLETIONS), COMPLETIONS, [REFERENCE] * len(COMPLETIONS))
    got = [answer[0]["rewards"][0] for answer in answers]
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert all(0 <= answer[0]["scores"][0] <= 1 for answer in answers)
    # A bulk call (OpenRLHF shards a batch across its --remote_rm_url servers): one request, every reward.
    (bulk,) = asyncio.run(executor._fetch_rewards_via_http(queries, [PROMPT] * 4, [REFERENCE] * 4))
    np.testing.assert_allclose(bulk["rewards"], want, atol=1e-4)


async def _gather(executor, queries):
    return await asyncio.gather(*(executor._fetch_rewards_via_http([q], [PROMPT], [REFERENCE]) for q in queries))

