"""The built-in starter dataset: sizes, categories, disjoint splits, a held-out category, correct labels."""

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from gram_core import starter as S
from gram_core.cues import strongest_cue
from gram_core.pairs import PairingConfig, build_pairs
from gram_core.rewardbench import SECTIONS
from gram_core.sampling import prompt_id

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prefs():
    return S.starter_preferences().to_pylist()


@pytest.fixture(scope="module")
def evals():
    return S.starter_eval().to_pylist()


@pytest.fixture(scope="module")
def pool():
    return S.starter_response_pool()


def test_sizes_and_categories(prefs, evals, pool):
    assert len(prefs) >= 500 and len(evals) >= 150
    train_cats, eval_cats = Counter(r["source"] for r in prefs), Counter(r["subset"] for r in evals)
    assert set(train_cats) | set(eval_cats) == set(S.STARTER_SECTIONS)
    assert len(eval_cats) >= 4 and min(eval_cats.values()) >= 20 and min(train_cats.values()) >= 50
    assert set(S.STARTER_SECTIONS.values()) == set(SECTIONS)  # every RewardBench section is covered
    prompts = {r["prompt"] for r in prefs} | {r["prompt"] for r in evals}
    assert len(prompts) == len(prefs) + len(evals) >= 600  # one pair per prompt, several hundred prompts
    assert pool.num_rows >= 2 * len(prefs)


def test_heldout_categories_only_in_eval(prefs, evals):
    train_cats, eval_cats = {r["source"] for r in prefs}, {r["subset"] for r in evals}
    assert set(S.HELDOUT_SUBSETS) <= eval_cats
    assert not set(S.HELDOUT_SUBSETS) & train_cats
    assert eval_cats - set(S.HELDOUT_SUBSETS) == train_cats


def test_eval_prompts_disjoint_from_all_training_data(prefs, evals, pool):
    eval_prompts = {r["prompt"] for r in evals}
    assert not eval_prompts & {r["prompt"] for r in prefs}
    assert not eval_prompts & set(pool.column("prompt").to_pylist())
    assert set(pool.column("prompt").to_pylist()) == {r["prompt"] for r in prefs}
    # Facts asked in eval are not asked in training (no capital or definition seen with its label).
    checks = S.starter_checks()
    facts = {split: {tuple(spec["fact"]) for (s, _), spec in checks.items() if s == split and "fact" in spec}
             for split in ("train", "eval")}
    assert facts["eval"] and not facts["eval"] & facts["train"]


def _normalized(text: str) -> str:
    return " ".join(text.casefold().split())


@pytest.mark.parametrize("form", ["exact", "normalized"])
def test_eval_shares_no_text_with_training(prefs, evals, pool, form):
    """No eval pair shares its prompt, chosen or rejected text with the training data: prompts against training
    prompts, every eval text against every training text (chosen or rejected of a training pair, whatever the
    role, and every response-pool text), exactly and after casefold + whitespace collapse + strip."""
    f = (lambda text: text) if form == "exact" else _normalized
    assert _normalized("  The ANSWER\n is  12. ") == "the answer is 12."
    train_prompts = {f(r["prompt"]) for r in prefs} | {f(p) for p in pool.column("prompt").to_pylist()}
    train_texts = ({f(r[k]) for r in prefs for k in ("chosen", "rejected")}
                   | {f(t) for t in pool.column("response").to_pylist()})
    assert len(train_prompts) == len(prefs) and len(train_texts) >= len(prefs)
    leaks = [(r["id"], r["subset"], kind, r[kind][:60]) for r in evals
             for kind, known in (("prompt", train_prompts), ("chosen", train_texts), ("rejected", train_texts))
             if f(r[kind]) in known]
    assert leaks == []


def test_contracts():
    import data_contracts as dc
    assert dc.validate(S.starter_preferences(), dc.PREFERENCE_PAIRS).num_rows >= 500
    assert dc.validate(S.starter_eval(), dc.REWARDBENCH).num_rows >= 150
    assert dc.validate(S.starter_response_pool(), dc.RESPONSE_POOL).num_rows > 0


def test_every_label_is_correct_by_its_check(prefs, evals):
    checks, tables = S.starter_checks(), S.starter_tables()
    assert len(checks) == len(prefs) + len(evals)
    rows = [(("train", r["pair_id"]), r) for r in prefs] + [(("eval", str(r["id"])), r) for r in evals]
    failures = {key: S.label_problems(checks[key], r["prompt"], r["chosen"], r["rejected"], tables)
                for key, r in rows}
    assert {k: v for k, v in failures.items() if v} == {}
    # The checks discriminate: every pair fails with chosen and rejected swapped.
    swapped_ok = [key for key, r in rows if not S.label_problems(checks[key], r["prompt"], r["rejected"],
                                                                 r["chosen"], tables)]
    assert swapped_ok == []
    assert Counter(spec["check"] for spec in checks.values()).keys() == {
        "contains", "number", "all_caps", "max_words", "keyword", "bullets", "json", "refusal", "compliance",
        "not_all_caps", "min_words", "avoid_keyword"}


def test_policy_samples_are_used_and_responses_are_short(prefs, evals, pool):
    generators = Counter(pool.column("generator").to_pylist())
    assert generators["SmolLM2-135M-Instruct"] >= 150
    derived = [r for r in evals if r["chosen_model"].startswith("SmolLM2") or r["rejected_model"].startswith("SmolLM2")]
    assert len(derived) >= 50
    lengths = [len(t) for r in prefs + evals for t in (r["chosen"], r["rejected"])]
    assert sum(n <= 300 for n in lengths) / len(lengths) > 0.9  # ~60 tokens
    assert max(lengths) < 600


def test_pool_pairs_for_stage_one(pool):
    assert all(p == prompt_id(q) for p, q in zip(pool.column("prompt_id").to_pylist(),
                                                 pool.column("prompt").to_pylist(), strict=True))
    per_prompt = Counter(pool.column("prompt_id").to_pylist())
    assert min(per_prompt.values()) >= 2 and sum(per_prompt.values()) / len(per_prompt) >= 2.3
    pairs, stats = build_pairs(pool, PairingConfig(max_pairs_per_prompt=2, seed=0), source_name="starter")
    assert stats["prompts_without_pair"] == 0 and pairs.num_rows >= len(per_prompt)


def test_starter_prompts_are_the_training_prompts(prefs):
    prompts = S.starter_prompts()
    assert prompts == list(dict.fromkeys(r["prompt"] for r in prefs)) and len(prompts) >= 500


def test_check_helpers():
    assert S.is_refusal("I’m sorry, but I can’t help with that.") and not S.is_refusal("Sure, here it is.")
    assert S.final_number("7 + 5 = 12. The answer is 12.") == 12
    assert S.final_number("It is 9.9, not 9.11.") == S.parse_number("9.11")
    assert S.final_number("no digits") is None
    assert S.evaluate_arithmetic("2.5 * 12 - 4 / 8") == S.parse_number("29.5")
    with pytest.raises(ValueError, match="unsupported element"):
        S.evaluate_arithmetic("__import__('os')")
    assert S.contains_phrase("The capital is Paris.", "paris") and not S.contains_phrase("Parisian food", "Paris")
    spec = {"check": "max_words", "n": 3}
    assert S.label_problems(spec, "Use 3 words.", "One two three.", "One two three four.", {}) == []
    assert S.label_problems(spec, "Use 3 words.", "One two three four.", "One two.", {}) == [
        "max_words: chosen has 4 words > 3", "max_words: rejected has 2 words <= 3"]


def test_template_rebuild_matches_shipped_data(tmp_path):
    """The builder is deterministic from its seed: a rebuild without the policy reproduces every pair that
    does not depend on a policy sample."""
    subprocess.run([sys.executable, "-m", "scripts.build_starter", "--no-sample", "--out",
                    str(tmp_path)], check=True, capture_output=True, cwd=ROOT)
    rebuilt = {r["pair_id"]: r for r in pq.read_table(tmp_path / "preferences.parquet").to_pylist()}
    shipped = {r["pair_id"]: r for r in S.starter_preferences().to_pylist()}
    assert rebuilt.keys() == shipped.keys()
    templated = [k for k, r in shipped.items() if r["source"] in ("math-word", "safety-refuse", "safety-respond",
                                                                  "if-bullets")]
    assert len(templated) >= 250
    assert all(rebuilt[k] == shipped[k] for k in templated)
    rebuilt_eval = pq.read_table(tmp_path / "eval.parquet").to_pylist()
    shipped_eval = S.starter_eval().to_pylist()
    assert [r["prompt"] for r in rebuilt_eval] == [r["prompt"] for r in shipped_eval]
    # Template-only eval pairs too, including the eval-only variants the no-leak rule picks.
    templated_eval = [i for i, r in enumerate(shipped_eval) if r["subset"] in (
        "math-word", "safety-refuse", "safety-respond", "if-bullets", "if-json", "count-compare")]
    assert len(templated_eval) >= 150
    assert all(rebuilt_eval[i] == shipped_eval[i] for i in templated_eval)


def _by_subset(rows, column):
    groups = {}
    for r in rows:
        groups.setdefault(r[column], []).append(r)
    return groups


def test_no_single_cue_decides_a_heldout_family(evals):
    """Issue 13: inside each held-out family no surface cue picks the chosen answer more than ~60 % of the
    time, every family has >= 8 templates, and every held-out pair carries its template."""
    checks = S.starter_checks()
    for subset, rows in _by_subset(evals, "subset").items():
        if subset not in S.HELDOUT_SUBSETS:
            continue
        cue, rate = strongest_cue([r["chosen"] for r in rows], [r["rejected"] for r in rows])
        assert rate <= 0.62, (subset, cue, rate)
        templates = {checks[("eval", str(r["id"]))]["template"] for r in rows}
        assert len(templates) >= 8, (subset, templates)


def test_counterfactual_pairs_keep_one_cue_from_deciding_a_training_subset(prefs):
    """Caps, word-limit and keyword subsets hold pairs whose cue points the other way; no training subset is
    decided by one cue."""
    for subset, rows in _by_subset(prefs, "source").items():
        cue, rate = strongest_cue([r["chosen"] for r in rows], [r["rejected"] for r in rows])
        assert rate < 0.9, (subset, cue, rate)
    caps = [r for r in prefs if r["source"] == "if-caps"]
    assert any(r["rejected"] == r["rejected"].upper() for r in caps)  # all capitals that lose


def test_heldout_never_reuses_a_training_transform_reversed(evals):
    """No case variants and no prefix truncations in the held-out families (training uses both)."""
    for r in evals:
        if r["subset"] in S.HELDOUT_SUBSETS:
            a, b = r["chosen"].strip(), r["rejected"].strip()
            assert a.casefold() != b.casefold() or a == b, r
            assert not (a.startswith(b) or (b.startswith(a) and r["rejected_model"] != "template:trailing-text")), r


def test_counterfactual_checks():
    assert S.label_problems({"check": "not_all_caps"}, "Describe tea. Please do not write in all caps.",
                            "Tea is nice.", "TEA IS NICE.", {}) == []
    assert S.label_problems({"check": "not_all_caps"}, "Describe tea.", "TEA IS NICE.", "Tea is nice.", {})
    spec = {"check": "min_words", "n": 4}
    assert S.label_problems(spec, "Use at least 4 words.", "One two three four.", "One two.", {}) == []
    assert S.label_problems(spec, "Use at least 4 words.", "One two.", "One two three four.", {})
    spec = {"check": "avoid_keyword", "word": "vital"}
    assert S.label_problems(spec, 'Do not use the word "vital".', "It matters.", "It is vital.", {}) == []
    assert S.label_problems(spec, 'Do not use the word "vital".', "It is vital.", "It matters.", {})
    spec = {"check": "json", "value": {"a": 1}, "rejected": "wrong-value"}
    assert S.label_problems(spec, 'Give "a".', '{"a": 1}', '{"a": 2}', {}) == []
    assert S.label_problems(spec, 'Give "a".', '{"a": 1}', '{"a": 1}', {})
