"""`gram serve` as a process: started on a tiny model on a free loopback port, called like OpenRLHF calls it
(the byte-exact request shape and retry loop of openrlhf/utils/remote_rm_utils.py), good and bad requests for
every error code, scores equal to the in-process judge, stopped by PID with a request in flight (drained)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "s3cret-token"
PROMPT = "Write a very short poem about the sea. "
COMPLETIONS = ["Waves roll in.", "The sea is big and blue.", "Salt.", "Gulls cry over grey water."]
REFERENCE = "The sea sings softly under a pale moon."


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url: str, path: str, body=None, token: str | None = TOKEN, raw: bytes | None = None):
    """(status, JSON body, headers) of one request."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url + path, data=data, method="POST" if data is not None else "GET",
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {token}"} if token else {})})
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            return answer.status, json.loads(answer.read()), answer.headers
    except urllib.error.HTTPError as err:
        text = err.read()
        try:
            return err.code, json.loads(text), err.headers
        except json.JSONDecodeError:
            return err.code, {"raw": text.decode(errors="replace")}, err.headers


def openrlhf_request(url, data, token, try_max_times=5):
    """OpenRLHF's request_api_wrapper (remote_rm_utils.py): requests.post(json=..., Content-Type header,
    timeout=180), raise_for_status, up to 5 tries 1 s apart on any error. Returns (response JSON, tries)."""
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    for attempt in range(1, try_max_times + 1):
        try:
            response = requests.post(url=url, json=data, headers=headers, timeout=180)
            response.raise_for_status()
            return response.json(), attempt
        except requests.RequestException:
            pass
        time.sleep(1)
    raise RuntimeError(f"Request error for {try_max_times} times")


@pytest.fixture(scope="module")
def server():
    """`gram serve tiny` in its own process group; yields its URL and what the first requests (sent while the
    model was still loading) got back; SIGTERM by PID at the end (the server drains and stops)."""
    port = _free_port()
    work = Path(tempfile.mkdtemp(prefix="gs", dir="/tmp"))  # Ray's socket paths must stay short
    token_file = work / "token"
    token_file.write_text(TOKEN + "\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_TMPDIR": str(work / "r"), "RAY_AUTH_MODE": "disabled",
           "GRAM_SERVE_TEST_LOAD_GATE": str(work / "gate"), "GRAM_HOME": str(work / "home")}
    log = open(work / "serve.log", "w")  # noqa: SIM115 - closed below
    cmd = [sys.executable, "-m", "flows.cli", "serve", "tiny", "--port", str(port), "--token-file", str(token_file),
           "--max-batch", "64", "--max-queue", "64", "--max-group", "4", "--max-request-tokens", "3000",
           "--max-body-mb", "0.02", "--cpus-per-replica", "1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    early = {}
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # the app is deployed when /health answers 200
            assert proc.poll() is None, (work / "serve.log").read_text()[-3000:]
            try:
                if call(url, "/health")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("gram serve did not come up in 300 s:\n" + (work / "serve.log").read_text()[-3000:])
        while "loading the weights" not in call(url, "/ready")[1].get("error", ""):  # imports done, gate shut
            assert time.monotonic() < deadline, (work / "serve.log").read_text()[-3000:]
            time.sleep(0.2)
        body = {"query": [PROMPT + COMPLETIONS[0]], "prompts": [PROMPT], "labels": [REFERENCE]}
        early["loading"] = call(url, "/get_reward", body)
        early["ready_while_loading"] = call(url, "/ready")[0]
        with ThreadPoolExecutor(1) as pool:  # OpenRLHF's client meets the loading server, retries, then gets rewards
            client = pool.submit(openrlhf_request, url + "/get_reward", body, TOKEN)
            time.sleep(1.5)
            (work / "gate").touch()
            early["openrlhf"] = client.result()
        yield url, early
        # SIGTERM with a request in flight: it is answered in full, then the server exits 0.
        bulk = {"query": [PROMPT + c for c in COMPLETIONS * 8], "prompts": [PROMPT] * 32,
                "labels": [REFERENCE] * 32}
        with ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(call, url, "/get_reward", bulk)
            time.sleep(0.05)
            os.kill(proc.pid, signal.SIGTERM)
            status, answer, _ = in_flight.result()
        assert status == 200 and len(answer["rewards"]) == 32
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        text = (work / "serve.log").read_text()
        shutil.rmtree(work, ignore_errors=True)
        assert TOKEN not in text and COMPLETIONS[1] not in text  # no secret, no request text in the log


@pytest.fixture(scope="module")
def local_judge():
    from gram_core.models import resolve_model_source
    from gram_core.scorers import load_scorer
    from tasks.settings import load_preset

    return load_scorer(resolve_model_source("tiny"), load_preset("demo").resolved().judge)


def test_before_the_model_loads_503_and_openrlhf_retries_through_it(server):
    url, early = server
    status, body, headers = early["loading"]
    assert status == 503 and "not loaded" in body["error"] and int(headers["Retry-After"]) >= 1
    assert early["ready_while_loading"] == 503
    answer, tries = early["openrlhf"]
    assert tries > 1  # the first try(s) met the loading server, a later one the loaded judge
    assert len(answer["rewards"]) == 1 and 0 <= answer["scores"][0] <= 1
    assert call(url, "/ready")[0] == 200


def test_get_reward_matches_the_in_process_judge(server, local_judge):
    from gram_core.reward_scoring import rewards_vs_reference

    url, _ = server
    body = {"query": [PROMPT + c for c in COMPLETIONS], "prompts": [PROMPT] * 4, "labels": [REFERENCE] * 4}
    status, answer, _ = call(url, "/get_reward", body)
    assert status == 200, answer
    want = rewards_vs_reference(local_judge, [PROMPT] * 4, COMPLETIONS, [REFERENCE] * 4)
    np.testing.assert_allclose(answer["rewards"], want, atol=1e-4)
    assert answer["scores"] == answer["rewards"]
    assert set(answer["extra_logs"]) == {"gram_p_order1", "gram_p_order2"}
    # One-item requests sent concurrently (OpenRLHF's shape) are batched together and score the same.
    one = [{"query": [PROMPT + c], "prompts": [PROMPT], "labels": [REFERENCE]} for c in COMPLETIONS]
    with ThreadPoolExecutor(4) as pool:
        singles = list(pool.map(lambda b: call(url, "/get_reward", b), one))
    assert all(s == 200 for s, _, _ in singles)
    np.testing.assert_allclose([a["rewards"][0] for _, a, _ in singles], want, atol=1e-4)


def test_pairwise_grpo_and_best_of_n(server, local_judge):
    from gram_core.reward_scoring import best_of_n, group_rewards, pairwise

    url, _ = server
    status, answer, _ = call(url, "/v1/pairwise", {"items": [{"prompt": PROMPT, "a": COMPLETIONS[0], "b": REFERENCE}]})
    want = pairwise(local_judge, [PROMPT], [COMPLETIONS[0]], [REFERENCE])
    result = answer["results"][0]
    assert status == 200 and result["winner"] == ("a" if want.p[0] > 0.5 else "b")
    assert result["p_a_order1"] == pytest.approx(want.p_order1[0], abs=1e-4)
    assert result["p_a_order2"] == pytest.approx(want.p_order2[0], abs=1e-4)
    status, answer, _ = call(url, "/v1/grpo", {"groups": [{"prompt": PROMPT, "completions": COMPLETIONS},
                                                          {"prompt": PROMPT, "completions": COMPLETIONS[:2],
                                                           "reference": REFERENCE}]})
    assert status == 200
    np.testing.assert_allclose(answer["rewards"][0], group_rewards(local_judge, PROMPT, COMPLETIONS), atol=1e-4)
    assert len(answer["rewards"][1]) == 2
    status, answer, _ = call(url, "/v1/best_of_n", {"prompt": PROMPT, "candidates": COMPLETIONS})
    assert status == 200
    assert (answer["best_index"], answer["comparisons"]) == best_of_n(local_judge, PROMPT, COMPLETIONS)


@pytest.mark.parametrize("path, body, status, words", [
    ("/get_reward", {"query": ["a", "b"], "prompts": ["a"], "labels": ["x", "y"]}, 422, "lengths disagree"),
    ("/get_reward", {"query": ["a", 3], "prompts": ["a", "b"], "labels": ["x", "y"]}, 422, "query[1]"),
    ("/get_reward", {"query": ["a"], "prompts": ["a"]}, 422, "labels"),
    ("/get_reward", {"query": ["xa"], "prompts": ["a"], "labels": ["r"]}, 422, "query[0]: does not start"),
    ("/v1/pairwise", {"items": [{"prompt": "p", "a": "x", "b": "y"}, {"prompt": "p", "a": "x"}]}, 422, "items[1].b"),
    ("/v1/grpo", {"groups": [{"prompt": "p", "completions": ["a"] * 5}]}, 413, "max_group=4"),
    ("/v1/grpo", {"groups": [{"prompt": "p", "completions": ["a"]}, {"prompt": "p", "completions": ["a", None]}]},
     422, "groups[1].completions[1]"),
    ("/get_reward", {"query": ["a"] * 33, "prompts": [""] * 33, "labels": ["b"] * 33}, 413, "33 pairs"),
    ("/get_reward", {"query": ["a " * 2500], "prompts": [""], "labels": ["b " * 1000]}, 413, "tokens"),
    ("/v1/best_of_n", {"prompt": "p", "candidates": []}, 422, "candidates"),
])
def test_bad_requests_name_the_field(server, path, body, status, words):
    url, _ = server
    got, answer, _ = call(url, path, body)
    assert got == status and words in answer["error"], answer


def test_bad_json_big_body_and_missing_token(server):
    url, _ = server
    status, answer, _ = call(url, "/get_reward", raw=b"{not json")
    assert status == 422 and "not valid JSON" in answer["error"]
    status, answer, _ = call(url, "/get_reward", raw=b" " * 30000)
    assert status == 413 and "bytes" in answer["error"]
    status, answer, _ = call(url, "/get_reward", {"query": [], "prompts": [], "labels": []}, token=None)
    assert status == 401
    assert call(url, "/health", token=None)[0] == 200
    status, answer, _ = call(url, "/get_reward", {"query": [], "prompts": [], "labels": []})
    assert status == 200 and answer["rewards"] == [] and answer["scores"] == []


def test_past_the_queue_bound_503_with_retry_after_at_once(server):
    url, _ = server
    body = {"query": [PROMPT + c for c in COMPLETIONS * 8], "prompts": [PROMPT] * 32,
            "labels": [REFERENCE] * 32}  # 64 sequences: the whole queue bound of this server
    results, lock = [], threading.Lock()

    def one() -> None:
        began = time.perf_counter()
        status, answer, headers = call(url, "/get_reward", body)
        with lock:
            results.append((status, answer, headers, time.perf_counter() - began))

    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ok = [r for r in results if r[0] == 200]
    rejected = [r for r in results if r[0] == 503]
    assert ok and rejected and len(ok) + len(rejected) == 6
    assert all(len(r[1]["rewards"]) == 32 and np.all(np.isfinite(r[1]["rewards"])) for r in ok)
    assert all("queue full" in r[1]["error"] and int(r[2]["Retry-After"]) >= 1 for r in rejected)
    assert min(r[3] for r in rejected) < min(r[3] for r in ok)  # turned away before any was scored
    assert call(url, "/get_reward", body)[0] == 200  # and it recovers


def test_trl_and_verl_adapters_through_the_server(server, local_judge, tmp_path, monkeypatch):
    from test_reward_functions import two_grpo_steps

    from gram_core.reward_scoring import rewards_vs_reference
    from tasks.reward_functions import GramReward, compute_score

    url, _ = server
    logged = two_grpo_steps(tmp_path, [GramReward(url=url, token=TOKEN),
                                       GramReward(url=url, token=TOKEN, mode="reference")])
    assert len(logged) == 2 and all(np.isfinite(h["rewards/gram_group/mean"]) for h in logged)
    monkeypatch.setenv("GRAM_REWARD_URL", url)
    monkeypatch.setenv("GRAM_REWARD_TOKEN", TOKEN)
    score = compute_score("demo", COMPLETIONS[0], REFERENCE, {"question": PROMPT})
    assert score == pytest.approx(rewards_vs_reference(local_judge, [PROMPT], [COMPLETIONS[0]], [REFERENCE])[0],
                                  abs=1e-4)
