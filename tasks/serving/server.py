"""`gram serve`: the judge as a batched reward server on Ray Serve (a FastAPI ingress per replica).

Requests become pairs (tasks/serving/api.py); ``@serve.batch`` gathers the pairs of concurrent requests, up to
``max_rows`` judge sequences (a request above it, up to ``max_request_rows``, enters in parts of that size), and
one call of ``gram_core.reward_scoring.pairwise`` scores them with each shared prefix (template + prompt
[+ reference]) run once, in length-sorted forward batches capped in rows and padded tokens. The model loads in
a thread after the replica starts: until then every scoring endpoint and /ready answer 503; a failed load
turns /health into a 503 naming the error and stops `gram serve` non-zero. Admission is bounded per replica,
before any text is tokenized: past ``max_queue_rows`` pending sequences the answer is an immediate 503 with
Retry-After. Ray Serve's own request queue is unbounded, so its 503 (which carries no Retry-After) is never
reached: the replica takes enough requests at once to turn the excess away itself. Request texts are tokenized
literally (``JudgeEncoder.literal``): they never become control tokens. No request text is logged. SIGTERM
drains for at most ``DRAIN_S`` and the process is gone within ``STOP_S``.

One of the Ray modules (tests/test_layers.py): Ray and Ray Serve are imported here and nowhere else.
"""

# No `from __future__ import annotations`: FastAPI must see the `Request` class in the route signatures.

import asyncio
import collections
import contextlib
import hmac
import json
import logging
import math
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from gram_core.config import JudgeConfig
from gram_core.reward_scoring import knockout
from tasks.serving.api import (
    Job,
    RequestError,
    ServeLimits,
    batch_parts,
    best_of_n_request,
    client_hint,
    grpo_job,
    openrlhf_job,
    pairwise_job,
    parse_body,
    read_body,
    request_bounds,
)

log = logging.getLogger(__name__)
app = FastAPI(title="GRAM reward server", docs_url=None, redoc_url=None, openapi_url=None)
LOAD_RETRY_AFTER_S = 5
APP_NAME = "gram-reward"
DRAIN_S = 5.0   # in-flight requests get this long to finish after SIGTERM
STOP_S = 9.5    # after SIGTERM the process exits within this, drained or not
RETRY_HEADERS = {"Retry-After": str(LOAD_RETRY_AFTER_S)}  # every 503 carries one


def _error(err: RequestError) -> JSONResponse:
    headers = {"Retry-After": str(math.ceil(err.retry_after_s))} if err.retry_after_s is not None else None
    return JSONResponse({"error": err.reason}, status_code=err.status, headers=headers)


def _rows(jobs: list) -> int:
    return sum(2 * len(pairs) for pairs, _ in jobs)


@serve.deployment(graceful_shutdown_wait_loop_s=0.5, graceful_shutdown_timeout_s=DRAIN_S, health_check_period_s=5)
@serve.ingress(app)
class RewardServer:
    """One replica: a judge, an admission bound, and a dynamic batcher by judge sequences."""

    def __init__(self, folder: str, judge_config: JudgeConfig, limits: ServeLimits, token: str | None,
                 cpus: float, batch_wait_s: float, forward_rows: int, forward_tokens: int | None,
                 share_prefix: bool = True) -> None:
        import torch

        torch.set_num_threads(max(1, int(cpus)))  # the replica's CPUs, not the host's
        self.limits, self.token = limits, token
        self.forward_rows, self.forward_tokens, self.share_prefix = forward_rows, forward_tokens, share_prefix
        self.judge: Any = None
        self.load_error: str | None = None
        self.load_stage = "importing torch and transformers"
        self.pending_rows = 0
        self.stats: dict[str, Any] = {"batches": 0, "pairs": 0, "rows_histogram": collections.Counter(),
                                      "queue_s": 0.0, "compute_s": 0.0, "batch_compute_s": 0.0,
                                      "rejected": 0, "prefix_tokens": 0,
                                      "suffix_tokens": 0, "naive_tokens": 0, "truncated": 0}
        self._score.set_max_batch_size(limits.max_rows)
        self._score.set_batch_wait_timeout_s(batch_wait_s)
        threading.Thread(target=self._load, args=(folder, judge_config), name="gram-load", daemon=True).start()

    def _load(self, folder: str, judge_config: JudgeConfig) -> None:
        try:
            from gram_core.scorers import open_scorer

            self.load_stage = "loading the weights"
            # Tests hold the replica here (imports done, weights not loaded) until the file named by
            # GRAM_SERVE_TEST_LOAD_GATE exists, to see what a client meets while a server loads.
            gate = os.environ.get("GRAM_SERVE_TEST_LOAD_GATE")
            deadline = time.monotonic() + 300
            while gate and not os.path.exists(gate) and time.monotonic() < deadline:
                time.sleep(0.05)
            judge = open_scorer(folder, judge_config)
            if hasattr(judge, "encoder"):
                judge.encoder.literal = True  # request texts never become the judge's control tokens
            self.judge = judge
        except Exception as err:  # noqa: BLE001 - reported by /ready and every scoring call
            self.load_error = f"{type(err).__name__}: {err}"
            log.error("gram serve: loading %s failed: %s", folder, self.load_error)

    # ---------------------------------------------------------------- scoring

    @serve.batch(max_batch_size=512, batch_wait_timeout_s=0.005, batch_size_fn=_rows)
    async def _score(self, jobs: list[tuple[list, float]]) -> list[tuple[Any, Any, Any]]:
        """All pairs of the gathered requests in one grouped call; (P order 1, P order 2, truncated) per request."""
        started = time.perf_counter()
        pairs = [pair for job, _ in jobs for pair in job]
        scores, stats = await asyncio.to_thread(self._pairwise, pairs)
        self._record(jobs, started, stats)
        truncated = np.zeros(len(pairs), dtype=bool)
        truncated[[i % len(pairs) for i in stats.truncated_at]] = True  # sequence i and i + n are one pair
        out, at = [], 0
        for job, _ in jobs:
            out.append((scores.p_order1[at:at + len(job)], scores.p_order2[at:at + len(job)],
                        truncated[at:at + len(job)]))
            at += len(job)
        return out

    def _pairwise(self, pairs: list) -> tuple[Any, Any]:
        from gram_core.reward_scoring import ScoreStats, pairwise

        # Tests hold a batch here while the file named by GRAM_SERVE_TEST_HOLD exists (a request mid-batch).
        hold = os.environ.get("GRAM_SERVE_TEST_HOLD")
        deadline = time.monotonic() + 60
        while hold and os.path.exists(hold) and time.monotonic() < deadline:
            time.sleep(0.05)
        stats = ScoreStats()
        prompts, r1, r2 = (list(col) for col in zip(*pairs, strict=True))
        options = {"max_rows": self.forward_rows, "max_tokens": self.forward_tokens, "stats": stats,
                   "share": self.share_prefix} \
            if hasattr(self.judge, "encoder") else {}
        return pairwise(self.judge, prompts, r1, r2, **options), stats

    def _record(self, jobs: list, started: float, stats: Any) -> None:
        now = time.perf_counter()
        rows = _rows(jobs)
        s = self.stats
        s["batches"] += 1
        s["pairs"] += rows // 2
        s["rows_histogram"][1 << max(0, math.ceil(math.log2(rows)))] += 1  # power-of-two buckets
        s["queue_s"] += sum(started - t for _, t in jobs)
        s["compute_s"] += (now - started) * len(jobs)
        s["batch_compute_s"] += now - started
        for key in ("prefix_tokens", "suffix_tokens", "naive_tokens", "truncated"):
            s[key] += getattr(stats, key, 0)

    async def _admit_and_score(self, request: Request, make_job: Callable[[dict, ServeLimits], Job]):
        body = await self._body(request)
        job = make_job(body, self.limits)
        with self._admitted(job.rows):  # before tokenizing: a full replica spends nothing on a request
            await self._check_tokens(job.texts)
            return job.answer(*await self._run(job.pairs))

    @contextlib.contextmanager
    def _admitted(self, rows: int):
        """Hold ``rows`` of the replica's queue bound for the block, or answer 503 + Retry-After at once."""
        if rows and self.pending_rows + rows > self.limits.max_queue_rows:
            self.stats["rejected"] += 1
            raise RequestError(503, f"queue full ({self.pending_rows} sequences pending, bound "
                               f"{self.limits.max_queue_rows}); retry later", retry_after_s=self._retry_after())
        self.pending_rows += rows
        try:
            yield
        finally:
            self.pending_rows -= rows

    async def _run(self, pairs: list) -> tuple[Any, Any, Any]:
        if not pairs:  # e.g. an OpenRLHF request with empty lists: an empty answer, not a batch
            return np.empty(0), np.empty(0), np.empty(0, dtype=bool)
        # A request over the batch bound (--max-rows above --max-batch) goes to the batcher in parts of at most
        # max_rows sequences: no batch grows past the bound, and Ray's batcher refuses an item bigger than one.
        parts = await asyncio.gather(*(self._score((part, time.perf_counter()))
                                       for part in batch_parts(pairs, self.limits.max_rows)))
        return tuple(np.concatenate(column) for column in zip(*parts, strict=True))

    def _retry_after(self) -> float:
        busy = self.stats["batch_compute_s"] / max(self.stats["batches"], 1)  # seconds per full batch, roughly
        return max(1.0, min(30.0, busy * self.pending_rows / max(self.limits.max_rows, 1)))

    async def _check_tokens(self, texts: list[str]) -> None:
        tokenizer = getattr(self.judge, "tokenizer", None)
        if tokenizer is None or not texts:
            return
        ids = await asyncio.to_thread(
            lambda: tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"])
        total = sum(len(x) for x in ids)
        if total > self.limits.max_request_tokens:
            raise RequestError(413, f"request texts are {total} tokens, more than the cap "
                               f"{self.limits.max_request_tokens}; split the request")

    async def _body(self, request: Request) -> dict:
        self._authorize(request)
        if self.judge is None:  # a failed load also answers Retry-After: a restarted server may take it
            raise RequestError(503, f"model not loaded: {self.load_error or self.load_stage}",
                               retry_after_s=LOAD_RETRY_AFTER_S)
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.limits.max_body_bytes:
            raise RequestError(413, f"request body is {declared} bytes, more than the cap "
                               f"{self.limits.max_body_bytes}")
        return parse_body(await read_body(request.stream(), self.limits.max_body_bytes), self.limits)

    def _authorize(self, request: Request) -> None:
        if self.token is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
            raise RequestError(401, "missing or wrong bearer token (Authorization: Bearer <token>)")

    async def _answer(self, request: Request, make_job) -> JSONResponse:
        try:
            return JSONResponse(await self._admit_and_score(request, make_job))
        except RequestError as err:
            return _error(err)

    # ---------------------------------------------------------------- routes

    @app.post("/get_reward")
    async def get_reward(self, request: Request) -> JSONResponse:
        return await self._answer(request, openrlhf_job)

    @app.post("/v1/pairwise")
    async def pairwise(self, request: Request) -> JSONResponse:
        return await self._answer(request, pairwise_job)

    @app.post("/v1/grpo")
    async def grpo(self, request: Request) -> JSONResponse:
        return await self._answer(request, grpo_job)

    @app.post("/v1/best_of_n")
    async def best_of_n(self, request: Request) -> JSONResponse:
        """The knockout of `gram rank`; each round's pairs go through the batcher with other requests'."""
        try:
            prompt, candidates = best_of_n_request(await self._body(request), self.limits)
            with self._admitted(2 * (len(candidates) // 2)):  # the first round, the largest
                await self._check_tokens([prompt, *candidates])
                rounds = knockout(len(candidates))  # the rounds of gram rank's knockout, scored here
                try:
                    pairs = next(rounds)
                    while True:
                        p1, p2, _ = await self._run([(prompt, candidates[i], candidates[j]) for i, j in pairs])
                        pairs = rounds.send((p1 + p2) / 2)
                except StopIteration as done:
                    best, comparisons = done.value
            return JSONResponse({"best_index": best, "comparisons": comparisons})
        except RequestError as err:
            return _error(err)

    @app.get("/health")
    async def health(self) -> JSONResponse:
        if self.load_error is not None:  # it will not recover; Retry-After still, as on every 503
            return JSONResponse({"status": "failed", "loaded": False, "error": f"model load failed: "
                                 f"{self.load_error}"}, status_code=503, headers=RETRY_HEADERS)
        return JSONResponse({"status": "ok", "loaded": self.judge is not None})

    @app.get("/ready")
    async def ready(self) -> JSONResponse:
        if self.load_error is not None:
            return JSONResponse({"error": f"model load failed: {self.load_error}", "failed": True}, status_code=503,
                                headers=RETRY_HEADERS)
        if self.judge is None:
            return _error(RequestError(503, f"model not loaded: {self.load_stage}", LOAD_RETRY_AFTER_S))
        return JSONResponse({"status": "ready"})

    @app.get("/v1/stats")
    async def statistics(self) -> JSONResponse:
        stats = dict(self.stats, rows_histogram={str(k): v for k, v in sorted(self.stats["rows_histogram"].items())})
        return JSONResponse(dict(stats, pending_rows=self.pending_rows))


# -------------------------------------------------------------------- the driver


def _start_ray() -> None:
    import ray

    from tasks.on_ray.runtime import short_temp_dir

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
        return
    ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, _temp_dir=short_temp_dir(),
             logging_config=ray.LoggingConfig(log_level="ERROR"))


class ModelLoadError(RuntimeError):
    """The replica could not load the judge; `gram serve` exits non-zero with this line."""


def _wait_ready(url: str, timeout_s: float, stop: threading.Event) -> bool:
    """True once /ready answers 200; False on timeout or stop; ModelLoadError when the load failed."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not stop.is_set():
        try:
            with urllib.request.urlopen(f"{url}/ready", timeout=5) as answer:
                if answer.status == 200:
                    return True
        except urllib.error.HTTPError as err:
            with contextlib.suppress(ValueError):
                body = json.loads(err.read())
                if body.get("failed"):
                    raise ModelLoadError(f"{body.get('error', 'model load failed')} ({_health(url)})") from None
        except OSError:
            pass
        stop.wait(0.5)
    return False


def _health(url: str) -> str:
    """What GET /health answers, in a few words (a failed load: 503 and "failed")."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as answer:
            return f"GET /health: {answer.status} {json.loads(answer.read()).get('status')}"
    except urllib.error.HTTPError as err:
        return f"GET /health: {err.code} {json.loads(err.read()).get('status')}"
    except (OSError, ValueError) as err:
        return f"GET /health: {type(err).__name__}"


def _stop_within(seconds: float) -> None:
    """A last resort after SIGTERM: if draining and Ray's shutdown hang, the process still exits (code 1)."""
    def expire() -> None:
        import psutil  # a dependency of Ray

        os.write(2, f"gram serve: not stopped {seconds} s after the signal; exiting now\n".encode())  # no locks
        for child in psutil.Process().children(recursive=True):  # the local Ray runtime this process started
            with contextlib.suppress(psutil.Error):
                child.kill()
        os._exit(1)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()


def serve_forever(folder: str, judge_config: JudgeConfig, limits: ServeLimits, *, host: str = "127.0.0.1",
                  port: int = 8000, replicas: int = 1, max_replicas: int | None = None, token: str | None = None,
                  batch_wait_ms: float = 5.0, forward_rows: int = 32, forward_tokens: int | None = 32768,
                  cpus_per_replica: float | None = None, share_prefix: bool = True,
                  say: Callable[[str], Any] = print) -> None:
    """Start Ray (local, or RAY_ADDRESS) and the server; print the URL and the client flags; on SIGTERM or
    Ctrl-C drain in-flight requests (Serve's graceful shutdown, at most DRAIN_S) and stop within STOP_S.
    Raises ModelLoadError when the replica cannot load the judge."""
    import ray

    _start_ray()
    cpus = cpus_per_replica or max(1.0, float(int(ray.cluster_resources().get("CPU", 1)) // max(replicas, 1)))
    gpus = ray.cluster_resources().get("GPU", 0)
    actor = {"num_cpus": cpus, "num_gpus": min(1.0, gpus / max(replicas, 1)) if gpus else 0}
    scaling = {"autoscaling_config": {"min_replicas": replicas, "max_replicas": max_replicas}} if max_replicas \
        else {"num_replicas": replicas}
    deployment = RewardServer.options(ray_actor_options=actor, **request_bounds(limits), **scaling)
    quiet = {"log_level": "WARNING", "enable_access_log": False}  # access lines carry no texts, but are noise
    serve.start(http_options={"host": host, "port": port}, proxy_location="HeadOnly", logging_config=quiet)
    stop = threading.Event()

    def on_signal(*_) -> None:
        if not stop.is_set():
            _stop_within(STOP_S)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        serve.run(deployment.bind(folder, judge_config, limits, token, cpus, batch_wait_ms / 1000, forward_rows,
                                  forward_tokens, share_prefix),
                  name=APP_NAME, route_prefix="/", blocking=False, logging_config=quiet)
        url = f"http://{host}:{port}"
        device = "GPU" if actor["num_gpus"] else f"CPU ({int(cpus)} threads)"
        say(f"GRAM reward server: {url}  ({replicas} replica(s), {device}; loading the model, GET {url}/ready)")
        say(client_hint(url))
        if _wait_ready(url, 600, stop):
            say(f"ready: POST {url}/get_reward, /v1/pairwise, /v1/grpo, /v1/best_of_n; Ctrl-C stops")
        while not stop.wait(0.5):
            pass
        say("gram serve: draining in-flight requests and stopping")
    finally:
        # Deleting the app drains each replica (at most DRAIN_S); then Ray and Serve go together. The delete
        # runs in a thread so a replica that does not answer cannot hold the process past STOP_S.
        deleting = threading.Thread(target=lambda: serve.delete(APP_NAME), name="gram-stop", daemon=True)
        deleting.start()
        deleting.join(DRAIN_S + 2)
        ray.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
