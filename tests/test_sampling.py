"""Response sampling: k rows per prompt, reproducible by seed, batch-independent, contract columns."""

import hashlib

import pytest
import torch

from gram_core.config import ConfigError, from_dict
from gram_core.sampling import (
    RowSampler,
    SamplingConfig,
    prompt_id,
    sample_responses,
    sampling_stats,
)

PROMPTS = ["hello there", "what is A", "a longer prompt about judges and assistants"]


def _sample(model, tokenizer, prompts=PROMPTS, **overrides):
    kwargs = dict(k=3, temperature=1.0, top_p=0.95, max_new_tokens=6, seed=0, batch_size=4,
                  generator_name="tiny-policy")
    kwargs.update(overrides)
    return sample_responses(model, tokenizer, prompts, **kwargs)


def test_k_rows_per_prompt_with_contract_columns(tiny_model, tiny_tokenizer):
    table = _sample(tiny_model, tiny_tokenizer)
    assert table.column_names == ["prompt_id", "prompt", "response", "generator", "source"]
    assert table.num_rows + sampling_stats(table)["dropped_empty"] == 9
    rows = table.to_pylist()
    for row in rows:
        assert row["prompt_id"] == hashlib.sha256(row["prompt"].encode()).hexdigest()[:16]
        assert row["response"] == row["response"].strip() and row["response"]
        assert row["generator"] == "tiny-policy" and row["source"] == "sampled"
    assert {r["prompt"] for r in rows} == set(PROMPTS)
    # Sampling at temperature 1 from a random model: the 3 responses to one prompt differ.
    first = [r["response"] for r in rows if r["prompt"] == PROMPTS[0]]
    assert len(set(first)) == len(first) == 3


def test_validates_against_response_pool_contract(tiny_model, tiny_tokenizer):
    import data_contracts as dc
    table = _sample(tiny_model, tiny_tokenizer, k=1)
    assert dc.validate(table, dc.RESPONSE_POOL).num_rows == table.num_rows


def test_reproducible_by_seed_and_independent_of_batching(tiny_model, tiny_tokenizer):
    a = _sample(tiny_model, tiny_tokenizer, batch_size=4)
    b = _sample(tiny_model, tiny_tokenizer, batch_size=4)
    c = _sample(tiny_model, tiny_tokenizer, batch_size=1)
    other_seed = _sample(tiny_model, tiny_tokenizer, seed=1)
    assert a.column("response").to_pylist() == b.column("response").to_pylist()
    assert a.column("response").to_pylist() == c.column("response").to_pylist()
    assert a.column("response").to_pylist() != other_seed.column("response").to_pylist()
    # A prompt's samples do not depend on which other prompts are sampled with it.
    alone = _sample(tiny_model, tiny_tokenizer, prompts=[PROMPTS[2]])
    assert alone.column("response").to_pylist() == [r["response"] for r in a.to_pylist()
                                                    if r["prompt"] == PROMPTS[2]]


def test_greedy_gives_identical_samples_and_duplicates_are_sampled_once(tiny_model, tiny_tokenizer):
    # The seed-0 tiny model greedily continues "B" with three newlines and then "(((".
    table = _sample(tiny_model, tiny_tokenizer, prompts=["B", "B"], temperature=0.0)
    assert sampling_stats(table) == {"generated": 3, "dropped_empty": 0, "kept": 3}
    assert table.column("response").to_pylist() == ["((("] * 3


def test_whitespace_only_responses_are_dropped_and_counted(tiny_model, tiny_tokenizer):
    # Greedily, the seed-0 tiny model answers these prompts with newlines only.
    table = _sample(tiny_model, tiny_tokenizer, prompts=PROMPTS[:2], temperature=0.0, k=2)
    assert table.num_rows == 0
    assert sampling_stats(table) == {"generated": 4, "dropped_empty": 4, "kept": 0}


def test_progress_reports_rows(tiny_model, tiny_tokenizer):
    calls = []
    _sample(tiny_model, tiny_tokenizer, k=2, batch_size=4, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(4, 6), (6, 6)]


def test_row_sampler_respects_top_p():
    # Probabilities 0.6, 0.3, 0.1: top_p 0.5 keeps only the first token; 0.85 keeps the first two.
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]])).repeat(200, 1)
    gens = [torch.Generator().manual_seed(i) for i in range(200)]
    only_top = RowSampler(gens, temperature=1.0, top_p=0.5)(None, logits).argmax(-1)
    assert set(only_top.tolist()) == {0}
    two = RowSampler(gens, temperature=1.0, top_p=0.85)(None, logits).argmax(-1)
    assert set(two.tolist()) == {0, 1}
    out = RowSampler(gens[:1], temperature=1.0, top_p=1.0)(None, logits[:1])
    assert torch.isfinite(out).sum().item() == 1


def test_sampling_config_validates_and_loads():
    cfg = from_dict(SamplingConfig, {"models": ["smollm2", "tiny"], "k": 2})
    assert cfg.models == ("smollm2", "tiny") and cfg.k == 2
    with pytest.raises(ConfigError, match="sampling.top_p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ConfigError, match="sampling.k"):
        SamplingConfig(k=0)


def test_prompt_id_matches_shared_data_convention():
    assert prompt_id("What if Vincent van Gogh had been a successful artist during his lifetime?") == \
        "005461fdc44b2581"


def test_row_sampler_sorts_everything_when_the_nucleus_is_wide():
    # Flat logits over 2000 tokens: the top 512 hold only ~26 % of the mass, so the full sort is used
    # and draws reach far beyond 512 distinct tokens.
    logits = torch.zeros(1000, 2000)
    gens = [torch.Generator().manual_seed(i) for i in range(1000)]
    picks = RowSampler(gens, temperature=1.0, top_p=0.95)(None, logits).argmax(-1)
    assert len(set(picks.tolist())) > 600
