"""OpenRLHF's own rollout executor against `gram serve`: OpenRLHF 0.11.2's public path
(`openrlhf.utils.agent.SingleTurnAgentExecutor.execute`: tokenize the chat-templated prompt, cut it from the
left when it is over budget, generate, decode prompt + response with special tokens, POST /get_reward with
aiohttp, 180 s timeout, 5 tries), imported from the real package (installed by `make setup` with --no-deps:
its full dependency set is DeepSpeed and vLLM). Only vLLM is stood in for: a stub engine that "generates"
fixed response tokens ending with the policy's end-of-turn token. Two policy tokenizers, both built locally:
the tiny ChatML one and a Llama-3-style one whose decode does not round-trip (an NFKC normalizer). The
rewards must equal the in-process judge's on the clean question, response and reference. OpenRLHF sends
no Authorization header, so this server runs without --token-file. At the end, SIGTERM while a batch is
stuck mid-scoring: the process is gone within 10 s."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from openrlhf.utils.agent import SingleTurnAgentExecutor
from test_serve import COMPLETIONS, PROMPT, REFERENCE, ROOT, _free_port, call

pytestmark = pytest.mark.slow

QUESTION = "Write a very short poem about the sea ﬁrst, then stop."  # "ﬁ": NFKC decodes it as "fi"
LLAMA3_TEMPLATE = ("{{ '<|begin_of_text|>' }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + "
                   "'<|end_header_id|>\n\n' + m['content'] + '<|eot_id|>' }}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def llama3_style_tokenizer():
    """A tiny byte-level BPE with Llama-3's special tokens and chat template, trained locally; its NFKC
    normalizer makes decode(encode(text)) differ from text, as many policies' tokenizers do."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["user assistant system the sea waves poem"] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   pad_token="<|end_of_text|>")
    fast.chat_template = LLAMA3_TEMPLATE
    return fast


class StubEngine:
    """vLLM's AsyncLLM as the executor uses it: ``generate(prompt_token_ids, params)`` -> outputs[0]."""

    def __init__(self, response_ids: list[int]):
        self.response_ids, self.prompts = response_ids, []

    async def generate(self, prompt_token_ids, params, multi_modal_data=None):
        self.prompts.append(list(prompt_token_ids))
        out = types.SimpleNamespace(token_ids=list(self.response_ids), finish_reason="stop", logprobs=None)
        return types.SimpleNamespace(outputs=[out])


@pytest.fixture(scope="module")
def open_server():
    """`gram serve tiny` without a token on a free loopback port; at the end SIGTERM with a batch held."""
    port = _free_port()
    work = Path(tempfile.mkdtemp(prefix="go", dir="/tmp"))  # Ray's socket paths must stay short
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_TMPDIR": str(work / "r"), "RAY_AUTH_MODE": "disabled",
           "GRAM_HOME": str(work / "home"), "GRAM_SERVE_TEST_HOLD": str(work / "hold")}
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
        # A batch stuck mid-scoring when SIGTERM comes: the drain gives up after 5 s, the process exits in 10.
        (work / "hold").touch()
        body = {"query": [PROMPT + COMPLETIONS[0]], "prompts": [PROMPT], "labels": [REFERENCE]}
        with ThreadPoolExecutor(1) as pool:
            stuck = pool.submit(call, url, "/get_reward", body, None, None, 60)
            deadline = time.monotonic() + 30
            while call(url, "/v1/stats", token=None)[1]["pending_rows"] == 0:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            signalled = time.monotonic()
            os.kill(proc.pid, signal.SIGTERM)
            code = proc.wait(timeout=60)
            stopped = time.monotonic() - signalled
            try:
                status = stuck.result()[0]
            except OSError:  # the connection closed under it
                status = None
        assert stopped < 10 and code == 0, f"exit {code} {stopped:.1f} s after SIGTERM (1: the last-resort timer)"
        assert status != 200  # dropped when the drain gave up, not answered
    finally:
        with contextlib.suppress(ProcessLookupError):  # also Ray processes the server left behind
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def judge():
    from gram_core.models import resolve_model_source
    from gram_core.scorers import open_scorer
    from tasks.settings import load_preset

    judge = open_scorer(resolve_model_source("tiny"), load_preset("demo").resolved().judge)
    judge.encoder.literal = True  # as the server reads request texts
    return judge


def _rollout(url: str, tokenizer, response: str, max_length: int, label: str = REFERENCE) -> dict:
    """One OpenRLHF rollout sample through the executor's public path; returns its output dict."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False,
                                           add_generation_prompt=True)
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    engine = StubEngine(response_ids)
    params = types.SimpleNamespace(max_tokens=len(response_ids), logprobs=None)
    executor = SingleTurnAgentExecutor(remote_rm_url=url + "/get_reward")
    output = asyncio.run(executor.execute(prompt, label, params, max_length, tokenizer, engine))
    output["prompt_ids"] = engine.prompts[0]
    output["full_prompt_ids"] = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return output


@pytest.mark.parametrize("policy", ["chatml", "llama3-style"])
@pytest.mark.parametrize("cut", [0, 6])  # prompt tokens OpenRLHF cuts from the left
def test_openrlhf_rollouts_get_the_judges_reward_on_the_clean_texts(open_server, judge, policy, cut):
    from gram_core.models import build_tiny_tokenizer
    from gram_core.reward_scoring import rewards_vs_reference

    tokenizer = build_tiny_tokenizer() if policy == "chatml" else llama3_style_tokenizer()
    response = COMPLETIONS[1]
    prompt_len = len(tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}],
                                                             tokenize=False, add_generation_prompt=True),
                               add_special_tokens=False)["input_ids"])
    response_len = len(tokenizer(response, add_special_tokens=False)["input_ids"]) + 1
    output = _rollout(open_server, tokenizer, response, max_length=prompt_len - cut + response_len)
    assert len(output["prompt_ids"]) == len(output["full_prompt_ids"]) - cut  # OpenRLHF did cut it
    assert output["reward"] is not None, "OpenRLHF dropped the reward (its client gave up)"
    want = rewards_vs_reference(judge, [QUESTION], [response], [REFERENCE], share=True)[0]
    assert output["reward"][0] == pytest.approx(want, abs=1e-4)
    split = output["extra_logs"]["gram_query_split"][0]
    drifted = policy == "llama3-style" or cut  # NFKC changed the question, or the prompt lost its start
    assert (split > 0) == bool(drifted)


def test_openrlhf_without_label_key_gets_no_silent_reward(open_server):
    """OpenRLHF without --data.label_key sends labels=[""]: a 422 every try, so no reward, not a made-up one."""
    from gram_core.models import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    output = _rollout(open_server, tokenizer, COMPLETIONS[0], max_length=4096, label="")
    assert output["reward"] is None
    status, answer, _ = call(open_server, "/get_reward", {"query": ["q a"], "prompts": ["q "], "labels": [""]},
                             token=None)
    assert status == 422 and "--data.label_key" in answer["error"]


def test_openrlhf_bulk_call_gets_every_reward(open_server, judge):
    """A bulk call (OpenRLHF shards a batch across its --reward.remote_url servers): one request, every reward."""
    from gram_core.reward_scoring import rewards_vs_reference

    executor = SingleTurnAgentExecutor(remote_rm_url=open_server + "/get_reward")
    queries = [PROMPT + c for c in COMPLETIONS]
    (bulk,) = asyncio.run(executor._fetch_rewards_via_http(queries, [PROMPT] * 4, [REFERENCE] * 4))
    want = rewards_vs_reference(judge, [PROMPT] * 4, COMPLETIONS, [REFERENCE] * 4, share=True)
    np.testing.assert_allclose(bulk["rewards"], want, atol=1e-4)
