"""The framework adapters in process: TRL's reward-function shape (group-relative and vs a reference column,
plain and conversational), verl's compute_score, and TRL's GRPOTrainer running two real steps on CPU with a
tiny policy and the GRAM reward."""

import numpy as np
import pytest

from gram_core.config import JudgeConfig
from gram_core.judging import Judge
from gram_core.reward_scoring import group_rewards, rewards_vs_reference
from tasks.serving.reward_functions import GramReward, compute_score, message_text

PROMPTS = ["Name a colour."] * 3 + ["Say hi."] * 2
COMPLETIONS = ["Red.", "Blue, like the sky.", "Green grass.", "Hi!", "Hello there, friend."]
REFERENCES = ["Yellow."] * 3 + ["Hey."] * 2


@pytest.fixture()
def judge(tiny_model, tiny_tokenizer):
    return Judge(tiny_model, tiny_tokenizer, JudgeConfig(max_length=512))


def test_group_mode_scores_each_prompt_group(judge):
    rewards = GramReward(judge=judge)(PROMPTS, COMPLETIONS)
    np.testing.assert_allclose(rewards[:3], group_rewards(judge, PROMPTS[0], COMPLETIONS[:3], share=True), atol=1e-9)
    np.testing.assert_allclose(rewards[3:], group_rewards(judge, PROMPTS[3], COMPLETIONS[3:], share=True), atol=1e-9)
    assert np.mean(rewards[:3]) == pytest.approx(0.5) and len(rewards) == 5


def test_reference_mode_and_conversational_inputs(judge):
    fn = GramReward(judge=judge, mode="reference")
    want = rewards_vs_reference(judge, PROMPTS, COMPLETIONS, REFERENCES, share=True)
    np.testing.assert_allclose(fn(PROMPTS, COMPLETIONS, reference=REFERENCES), want, atol=1e-9)
    chats = [[{"role": "system", "content": "be brief"}, {"role": "user", "content": p}] for p in PROMPTS]
    answers = [[{"role": "assistant", "content": c}] for c in COMPLETIONS]
    np.testing.assert_allclose(fn(chats, answers, reference=REFERENCES), want, atol=1e-9)
    with pytest.raises(KeyError, match="no column 'reference'"):
        fn(PROMPTS, COMPLETIONS, solution=REFERENCES)
    assert fn.__name__ == "gram_reference" and message_text([{"role": "user", "content": "x"}]) == "x"


def test_verl_compute_score_in_process(monkeypatch):
    from gram_core.models import resolve_model_source
    from gram_core.scorers import open_scorer

    monkeypatch.delenv("GRAM_REWARD_URL", raising=False)
    monkeypatch.setenv("GRAM_REWARD_MODEL", "tiny")
    score = compute_score("demo", "Blue.", "Yellow.", {"question": "Name a colour."})
    want = rewards_vs_reference(open_scorer(resolve_model_source("tiny"), JudgeConfig()), ["Name a colour."],
                                ["Blue."], ["Yellow."], share=True)[0]
    assert 0 <= score <= 1 and score == pytest.approx(want, abs=1e-9)


def two_grpo_steps(tmp_path, reward_funcs) -> list[dict]:
    """TRL's GRPOTrainer, two real steps on CPU with a tiny policy; returns the per-step logs (and checks that
    the policy's parameters changed)."""
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    import torch

    from gram_core.models import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    policy = build_tiny_model(tokenizer, seed=1)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    data = datasets.Dataset.from_dict({"prompt": ["Name a colour.", "Say hi."] * 4,
                                       "reference": ["Yellow.", "Hey."] * 4})
    config = trl.GRPOConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, num_generations=4,
                            max_completion_length=6, learning_rate=1e-2, use_cpu=True, report_to="none",
                            save_strategy="no", logging_steps=1, seed=0, bf16=False)
    trainer = trl.GRPOTrainer(model=policy, reward_funcs=reward_funcs, args=config, train_dataset=data,
                              processing_class=tokenizer)
    trainer.train()
    assert trainer.state.global_step == 2
    assert any(not torch.equal(before[n], p.detach()) for n, p in policy.named_parameters())
    return [h for h in trainer.state.log_history if any(k.startswith("rewards/") for k in h)]


def test_trl_grpo_trainer_runs_two_steps_with_the_gram_reward(tmp_path, judge):
    calls = []

    def reward(prompts, completions, **columns):
        calls.append(len(completions))
        return GramReward(judge=judge)(prompts, completions, **columns)

    reward.__name__ = "gram_group"
    logged = two_grpo_steps(tmp_path, [reward, GramReward(judge=judge, mode="reference")])
    assert calls == [4, 4] and len(logged) == 2
    assert all(np.isfinite(h["rewards/gram_reference/mean"]) and np.isfinite(h["rewards/gram_group/mean"])
               for h in logged)
