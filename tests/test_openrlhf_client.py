"""OpenRLHF's own rollout executor against `gram serve`: OpenRLHF 0.11.2's public path
(`openrlhf.utils.agent.SingleTurnAgentExecutor.execute`: tokenize the chat-templated prompt, cut it from the
left when it is over budget, generate, decode prompt + response with special tokens, POST /get_reward with
aiohttp, 180 s timeout, 5 tries), imported from the real package (installed by `make setup` with --no-deps:
its full dependency set is DeepSpeed and vLLM). Only vLLM is stood in for: a stub engine that "generates"
fixed response tokens ending with the policy's end-of-turn token. Two policy tokenizers, both built locally:
the tiny ChatML one and a Llama-3-style one whose decode does not round-trip (an NFKC normalizer). The
rewards must equal the in-process judge's on the clean question, response and reference. The server is the
session's ``open_server`` (tests/conftest.py: the real `gram serve` process, a tiny judge whose rewards
spread, no --token-file since OpenRLHF sends no Authorization header; SIGTERM with a batch stuck mid-scoring
at the end, gone within 10 s)."""

from __future__ import annotations

import asyncio
import types

import numpy as np
import pytest
from openrlhf.utils.agent import SingleTurnAgentExecutor
from serve_fixtures import call
from test_serve import COMPLETIONS, PROMPT, REFERENCE

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
def test_openrlhf_rollouts_get_the_judges_reward_on_the_clean_texts(open_server, open_server_judge, policy, cut):
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
    want = rewards_vs_reference(open_server_judge, [QUESTION], [response], [REFERENCE], share=True)[0]
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


def test_openrlhf_bulk_call_gets_every_reward(open_server, open_server_judge):
    """A bulk call (OpenRLHF shards a batch across its --reward.remote_url servers): one request, every reward."""
    from gram_core.reward_scoring import rewards_vs_reference

    executor = SingleTurnAgentExecutor(remote_rm_url=open_server + "/get_reward")
    queries = [PROMPT + c for c in COMPLETIONS]
    (bulk,) = asyncio.run(executor._fetch_rewards_via_http(queries, [PROMPT] * 4, [REFERENCE] * 4))
    want = rewards_vs_reference(open_server_judge, [PROMPT] * 4, COMPLETIONS, [REFERENCE] * 4, share=True)
    np.testing.assert_allclose(bulk["rewards"], want, atol=1e-4)


def test_an_old_openrlhf_rollout_batch_over_the_batch_bound_is_scored_in_parts(open_server, open_server_judge):
    """OpenRLHF before 0.9.1 posts a whole rollout batch at once: 300 samples are 600 judge sequences, over the
    default cap of 512 (413, tests/test_serve_api.py) and over the batch bound. With `--max-rows 1024` the request
    is answered whole, and the server scored it in batches of at most 512 sequences."""
    from gram_core.reward_scoring import rewards_vs_reference

    completions = [f"{COMPLETIONS[i % 4]} ({i})" for i in range(300)]
    before = call(open_server, "/v1/stats")[1]
    executor = SingleTurnAgentExecutor(remote_rm_url=open_server + "/get_reward")
    (bulk,) = asyncio.run(executor._fetch_rewards_via_http([PROMPT + c for c in completions], [PROMPT] * 300,
                                                           [REFERENCE] * 300))
    after = call(open_server, "/v1/stats")[1]
    want = rewards_vs_reference(open_server_judge, [PROMPT] * 300, completions, [REFERENCE] * 300, share=True)
    np.testing.assert_allclose(bulk["rewards"], want, atol=1e-4)
    assert after["batches"] - before["batches"] >= 2 and after["pairs"] - before["pairs"] == 300
    assert max(int(rows) for rows in after["rows_histogram"]) <= 512
