"""The thin `gram serve` client (tasks/serving/reward_client.py): without a model, it imports no torch, splits
/v1/grpo under the row cap and puts every reward back in place (against a stub server that records each
request), verl's compute_score takes reward_kwargs and refuses a missing question, TRL group mode on two ranks
(gloo) scores whole groups that TRL split across ranks. Against the session's running `gram serve`
(``open_server``, tests/conftest.py): verl 0.9's own naive and batch reward managers, and TRL's GRPOTrainer on
two processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from serve_fixtures import ROOT, free_port

from tasks.serving.reward_client import (
    GramServerClient,
    _chunks,
    compute_score,
    compute_score_batch,
    group_cost,
)


def _stub_reward(prompt: str, completion: str, reference: str | None) -> float:
    return (len(prompt) * 7 + len(completion) * 3 + len(reference or "")) % 101 / 100


@pytest.fixture()
def stub_server():
    """A /v1/grpo stub: reward = a function of the texts; records the sequences each request carried; 413 over
    512 sequences, like `gram serve`."""
    seen: list[int] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            rows = sum(group_cost(g) for g in body["groups"])
            seen.append(rows)
            status, answer = (413, {"error": "too many"}) if rows > 512 else (200, {"rewards": [
                [_stub_reward(g["prompt"], c, g.get("reference")) for c in g["completions"]] for g in body["groups"]]})
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()
    server.server_close()


def test_the_client_module_imports_no_torch():
    code = ("import sys, tasks.serving.reward_client; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'gram_core', 'numpy', 'transformers')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


def test_chunks_stay_under_the_row_cap_and_keep_groups_whole():
    groups = [{"prompt": f"p{i}", "completions": [f"c{j}" for j in range(8)]} for i in range(32)]  # 1792 rows
    requests = _chunks(groups, 512)
    assert [sum(group_cost(part) for _, _, part in r) for r in requests] == [504, 504, 504, 280]
    assert [g for r in requests for g, _, _ in r] == list(range(32))
    big = {"prompt": "p", "completions": [f"c{j}" for j in range(600)], "reference": "r"}  # 1200 rows
    parts = [part for r in _chunks([big], 512) for part in r]
    assert [at for _, at, _ in parts] == [0, 256, 512]
    assert all(group_cost(p) <= 512 for _, _, p in parts)


def test_group_rewards_split_under_the_cap_and_reassembled(stub_server):
    url, seen = stub_server
    groups = [{"prompt": f"prompt {i}", "completions": [f"answer {i}.{j}" * (j + 1) for j in range(8)]}
              for i in range(32)]
    groups.append({"prompt": "q", "completions": [f"x{j}" for j in range(300)], "reference": "ref"})
    rewards = GramServerClient(url).group_rewards(groups)
    want = [[_stub_reward(g["prompt"], c, g.get("reference")) for c in g["completions"]] for g in groups]
    assert rewards == want
    assert max(seen) <= 512 and sum(seen) == 32 * 56 + 600


def test_verl_compute_score_takes_reward_kwargs_and_a_batch(stub_server, monkeypatch):
    url, seen = stub_server
    monkeypatch.setenv("GRAM_REWARD_URL", url)
    info = {"question": "Name a colour.", "num_turns": None, "rollout_reward_scores": {}}
    assert compute_score("demo", "Blue.", "Red.", info, some_reward_kwarg=1) == _stub_reward("Name a colour.",
                                                                                             "Blue.", "Red.")
    seen.clear()
    scores = compute_score_batch(["demo"] * 300, [f"s{i}" for i in range(300)], ["Red."] * 300,
                                 [{"prompt": [{"role": "user", "content": "Q?"}]}] * 300, another=2)
    assert scores == [_stub_reward("Q?", f"s{i}", "Red.") for i in range(300)]
    assert sorted(seen) == [88, 512]  # one request per 256 samples, not one per sample (sent concurrently)


@pytest.mark.parametrize("info", [None, {}, {"index": 3}, {"question": ""}])
def test_verl_without_a_question_is_a_clear_error(info, monkeypatch):
    monkeypatch.setenv("GRAM_REWARD_URL", "http://127.0.0.1:9")  # never reached
    with pytest.raises(ValueError, match="extra_info has no 'question'"):
        compute_score("demo", "Blue.", "Red.", info)
    with pytest.raises(ValueError, match="item 1: extra_info has no 'question'"):
        compute_score_batch(["d", "d"], ["a", "b"], ["r", "r"], [{"question": "q"}, info])


class _LengthJudge:
    """A scorer whose preference is a function of both texts (not a Judge: read through ``preference``)."""

    def preference(self, prompts, responses_1, responses_2):
        import numpy as np

        from gram_core.judging import PairScores

        p = np.array([1 / (1 + np.exp(len(b) - len(a) + 0.1 * len(x))) for x, a, b in
                      zip(prompts, responses_1, responses_2, strict=True)])
        return PairScores(p_order1=p, p_order2=p, p=p)


def _rank(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from tasks.serving.reward_functions import GramReward

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    prompts, completions = _split_batch()
    half = len(prompts) // 2  # TRL's per-process slice of the generation batch
    local = slice(rank * half, (rank + 1) * half)
    rewards = GramReward(judge=_LengthJudge())(prompts[local], completions[local])
    Path(out, f"{rank}.json").write_text(json.dumps(rewards))
    dist.destroy_process_group()


def _split_batch():
    """2 prompts × 6 completions, 6 rows per rank, laid out so that each group spans both ranks."""
    prompts = ["Say hi."] * 3 + ["Name a colour."] * 6 + ["Say hi."] * 3
    completions = [f"answer {'x' * k}" for k in range(12)]
    return prompts, completions


def test_trl_group_mode_on_two_ranks_scores_whole_groups(tmp_path):
    import numpy as np
    import torch.multiprocessing as mp

    from gram_core.reward_scoring import group_rewards

    mp.start_processes(_rank, args=(free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    got = json.loads((tmp_path / "0.json").read_text()) + json.loads((tmp_path / "1.json").read_text())
    prompts, completions = _split_batch()
    want = np.zeros(12)
    for prompt in set(prompts):
        members = [i for i, p in enumerate(prompts) if p == prompt]
        want[members] = group_rewards(_LengthJudge(), prompt, [completions[i] for i in members])
    np.testing.assert_allclose(got, want, atol=1e-12)


# ------------------------------------------------------------------ verl 0.9.1's own reward managers

def _verl_batch(tokenizer, questions, responses, references):
    """A DataProto as verl's rollout hands it to a reward manager: left-padded prompts, right-padded responses,
    one attention mask over both; reward_model.ground_truth, data_source and extra_info per sample."""
    import numpy as np
    import torch
    from verl import DataProto

    pad = tokenizer.pad_token_id
    prompts = [tokenizer(q, add_special_tokens=False)["input_ids"] for q in questions]
    answers = [tokenizer(r, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for r in responses]
    p_len, r_len = max(map(len, prompts)), max(map(len, answers))
    prompt_ids = torch.tensor([[pad] * (p_len - len(p)) + p for p in prompts])
    response_ids = torch.tensor([a + [pad] * (r_len - len(a)) for a in answers])
    mask = torch.tensor([[0] * (p_len - len(p)) + [1] * len(p) + [1] * len(a) + [0] * (r_len - len(a))
                         for p, a in zip(prompts, answers, strict=True)])
    return DataProto.from_dict(
        tensors={"prompts": prompt_ids, "responses": response_ids, "attention_mask": mask},
        non_tensors={"data_source": np.array(["demo"] * len(questions), dtype=object),
                     "reward_model": np.array([{"ground_truth": r} for r in references], dtype=object),
                     "extra_info": np.array([{"question": q, "index": i} for i, q in enumerate(questions)],
                                            dtype=object)})


@pytest.mark.parametrize("manager, name", [("naive", "compute_score"), ("batch", "compute_score_batch")])
def test_verl_reward_managers_call_our_functions_with_reward_kwargs(open_server, open_server_judge, monkeypatch,
                                                                    manager, name):
    """verl loads tasks/serving/reward_client.py by path (get_custom_reward_fn, reward_kwargs merged in) and its
    naive or batch manager calls it against a running `gram serve`: each reward lands on the response's last
    token and equals the served judge's P(response ≻ ground truth) on the question from extra_info."""
    pytest.importorskip("verl")
    from omegaconf import OmegaConf
    from serve_fixtures import call
    from verl.trainer.ppo.reward import get_custom_reward_fn
    from verl.workers.reward_manager.batch import BatchRewardManager
    from verl.workers.reward_manager.naive import NaiveRewardManager

    from gram_core.models import build_tiny_tokenizer
    from gram_core.reward_scoring import rewards_vs_reference

    monkeypatch.setenv("GRAM_REWARD_URL", open_server)
    config = OmegaConf.create({"reward": {"custom_reward_function": {
        "path": str(ROOT / "tasks" / "serving" / "reward_client.py"), "name": name, "reward_kwargs": {"temperature": 0.5}}}})
    fn = get_custom_reward_fn(config)
    tokenizer = build_tiny_tokenizer()
    questions, responses = ["Name a colour.", "Say hi.", "Name a colour."], ["Blue.", "Hello there!", "Red"]
    references = ["Yellow.", "Hey.", "Yellow."]
    data = _verl_batch(tokenizer, questions, responses, references)
    batches = call(open_server, "/v1/stats")[1]["batches"]
    if manager == "naive":
        rewards = NaiveRewardManager(tokenizer, num_examine=0, compute_score=fn)(data)
    else:
        rewards = BatchRewardManager(tokenizer, num_examine=0, compute_score=fn, extra=1)(data)
    lengths = data.batch["attention_mask"][:, data.batch["prompts"].shape[-1]:].sum(-1)
    got = [float(rewards[i, lengths[i] - 1]) for i in range(3)]
    decoded = [tokenizer.decode(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in responses]
    want = rewards_vs_reference(open_server_judge, questions, decoded, references)
    assert got == pytest.approx(want, abs=1e-4)
    assert float(rewards.sum()) == pytest.approx(sum(want), abs=1e-4)  # nothing anywhere else
    # the batch manager: one request for the batch (one server batch), the naive one a request per sample
    assert call(open_server, "/v1/stats")[1]["batches"] - batches == (3 if manager == "naive" else 1)


def test_trl_grpo_trainer_on_two_processes_scores_whole_groups(tmp_path, open_server, open_server_judge):
    """TRL's GRPOTrainer on 2 CPU processes with every group split across them, scoring through a running
    `gram serve`: each rank's rewards equal the group-relative rewards of the whole group (as one process would
    score it, here the served judge in this process), not of its half."""
    pytest.importorskip("trl")
    import numpy as np

    from gram_core.reward_scoring import group_rewards

    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free_port()), str(ROOT / "tests" / "trl_two_ranks.py"), str(tmp_path),
                           open_server], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["steps"] for r in ranks] == [2, 2] and len(ranks[0]["calls"]) == len(ranks[1]["calls"]) == 2
    for step in range(2):
        calls = [r["calls"][step] for r in ranks]
        prompts = calls[0]["prompts"] + calls[1]["prompts"]
        completions = calls[0]["completions"] + calls[1]["completions"]
        got = calls[0]["rewards"] + calls[1]["rewards"]
        assert all(set(c["prompts"]) & set(calls[1 - k]["prompts"]) for k, c in enumerate(calls))  # split groups
        for prompt in set(prompts):
            members = [i for i, p in enumerate(prompts) if p == prompt]
            want = group_rewards(open_server_judge, prompt, [completions[i] for i in members], share=True)
            np.testing.assert_allclose([got[i] for i in members], want, atol=1e-4)
