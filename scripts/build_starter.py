"""Build the GRAM starter dataset into gram_core/starter/ (deterministic from --seed).

    HF_HUB_OFFLINE=1 .venv/bin/python -m scripts.build_starter [--seed 0] [--no-sample] [--samples CACHE.json]

A rebuild that keeps the shipped policy samples (no model load): ``python -m scripts.recover_starter_samples CACHE.json``,
then ``--samples CACHE.json``.

1. Make every prompt of every category (scripts/starter_categories.py) from gram_core/starter/tables.json
   (seeded choices).
2. Sample SmolLM2-135M-Instruct once (k=1, <= 48 new tokens) on the prompts whose labels can be derived
   from a policy response by a checkable transformation (capitals, all-caps, word limit, keyword).
3. Derive chosen/rejected (transformations of the sample, or templates), re-run the check of every pair
   (gram_core.starter.label_problems) and refuse to write anything that fails.
3b. No leaks: no eval prompt may be a training prompt, and no eval chosen/rejected text may be any training text
   (chosen, rejected or response-pool text of a training prompt), exactly or after ``normalize``. An eval pair
   that collides is made again by its item's eval-only variant (``Item.alt``); the build refuses to write an
   eval pair that still collides.
4. Write preferences / eval / response pool / checks as zstd Parquet and the README with the counts.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from gram_core import starter as S
from gram_core.cues import strongest_cue
from gram_core.sampling import prompt_id
from scripts.starter_categories import POLICY, Item, clean_sample, make_items, normalize

HELDOUT_CUE_LIMIT = 0.62  # issue 13: no single surface cue may pick the chosen answer more than ~60 %
SAMPLING = dict(k=1, temperature=0.7, top_p=0.9, max_new_tokens=48, batch_size=32)


def prompts_to_sample(train: list[Item], evals: list[Item]) -> list[str]:
    """The prompts the policy samples, in sampling order."""
    # Short-answer prompts (capitals) first, so they share batches that stop early; rows are batch-independent.
    return [i.prompt for i in sorted(train + evals, key=lambda i: i.category != "chat-facts") if i.sample]


def sample_policy(prompts: list[str], seed: int) -> dict[str, str]:
    """prompt -> raw SmolLM2 sample (prompts whose sample is empty are absent)."""
    import torch

    from gram_core.config import ModelConfig
    from gram_core.models import load_model, resolve_model_source
    from gram_core.sampling import sample_responses

    # One thread: on shared, oversubscribed cores two OpenMP threads ran 10x slower (measured 122 s vs 11 s).
    torch.set_num_threads(1)
    model, tokenizer = load_model(ModelConfig(), resolve_model_source("smollm2"))
    start = time.time()
    table = sample_responses(model, tokenizer, prompts, seed=seed, generator_name=POLICY, **SAMPLING,
                             progress=lambda d, t: print(f"  sampled {d}/{t} ({time.time() - start:.0f} s)",
                                                         flush=True))
    return dict(zip(table.column("prompt").to_pylist(), table.column("response").to_pylist(), strict=True))


def policy_samples(prompts: list[str], seed: int, cache: Path | None) -> tuple[dict[str, str], float, bool]:
    """Samples for ``prompts``, the seconds sampling took and whether they came from ``cache``."""
    cached: dict = {"samples": {}, "prompts": [], "seconds": 0.0}
    if cache and cache.is_file():
        cached = json.loads(cache.read_text(encoding="utf-8"))
        if cached["seed"] == seed and set(prompts) <= set(cached["prompts"]):
            print(f"policy samples from {cache}", flush=True)
            return {p: cached["samples"][p] for p in prompts if p in cached["samples"]}, cached["seconds"], True
        cached = cached if cached["seed"] == seed else {"samples": {}, "prompts": [], "seconds": 0.0}
    # Sampling is per-row seeded (gram_core.sampling), so sampling only the prompts the cache lacks gives
    # the same text as sampling everything.
    missing = [p for p in prompts if p not in set(cached["prompts"])]
    print(f"sampling {len(missing)} prompts the cache lacks", flush=True)
    began = time.time()
    samples = {**{p: t for p, t in cached["samples"].items() if p in set(prompts)}, **sample_policy(missing, seed)}
    seconds = cached["seconds"] + time.time() - began
    if cached.get("note"):
        cached["note"] += f" Then {len(missing)} new prompts were sampled ({time.time() - began:.0f} s)."
    if cache:
        known = list(dict.fromkeys(cached["prompts"] + missing))
        cache.write_text(json.dumps({**cached, "seed": seed, "prompts": known,
                                     "samples": {**cached["samples"], **samples}, "seconds": seconds},
                                    ensure_ascii=False, indent=0), encoding="utf-8")
    return samples, seconds, False


def materialize(items: list[Item], samples: dict[str, str], tables: dict,
                forbidden: set[str] | None = None) -> list[dict]:
    """The pairs of ``items``, label-checked. With ``forbidden`` (normalized training texts; for eval items) a
    pair with a forbidden text is made again by ``item.alt`` (without the policy sample if that is forbidden
    too); one that still has a forbidden text is an error."""
    rows = []
    for item in items:
        sample = samples.get(item.prompt)
        (chosen, chosen_model, rejected, rejected_model), extras = item.make(sample, item.rng)
        variant = "default"
        if forbidden is not None and {normalize(chosen), normalize(rejected)} & forbidden:
            if item.alt is None:
                raise AssertionError(f"{item.category} eval prompt {item.prompt!r}: a text is a training text and "
                                     "the item has no eval-only variant")
            sample = sample if sample and normalize(sample) not in forbidden else None
            (chosen, chosen_model, rejected, rejected_model), extras = item.alt(sample, item.alt_rng)
            variant = "eval-only"
            if {normalize(chosen), normalize(rejected)} & forbidden:
                raise AssertionError(f"{item.category} eval prompt {item.prompt!r}: its eval-only variant still "
                                     f"has a training text: {chosen!r} / {rejected!r}")
        problems = S.label_problems(item.spec, item.prompt, chosen, rejected, tables)
        if problems:
            raise AssertionError(f"{item.category} prompt {item.prompt!r}: label check failed: {problems}")
        rows.append(dict(item=item, chosen=chosen, chosen_model=chosen_model, rejected=rejected,
                         rejected_model=rejected_model, extras=extras, policy=samples.get(item.prompt),
                         variant=variant))
    return rows


def cue_report(rows_train: list[dict], rows_eval: list[dict]) -> list[str]:
    """The strongest single surface cue per subset (gram_core.cues), printed and written to the README; a
    held-out family whose strongest cue picks the chosen answer more than HELDOUT_CUE_LIMIT is refused."""
    lines = []
    for split_name, rows in (("train", rows_train), ("eval", rows_eval)):
        by_subset: dict[str, list[dict]] = {}
        for row in rows:
            by_subset.setdefault(row["item"].category, []).append(row)
        for subset, group in sorted(by_subset.items()):
            cue, rate = strongest_cue([r["chosen"] for r in group], [r["rejected"] for r in group])
            templates = len({r["item"].spec.get("template", r["item"].category) for r in group})
            lines.append(f"| {split_name} | {subset} | {len(group)} | {templates} | {cue} | {rate:.0%} |")
            if split_name == "eval" and subset in S.HELDOUT_SUBSETS and rate > HELDOUT_CUE_LIMIT:
                raise AssertionError(f"held-out family {subset}: cue {cue!r} picks the chosen answer {rate:.0%} "
                                     f"of the time (limit {HELDOUT_CUE_LIMIT:.0%})")
    print("\n".join(lines), flush=True)
    return lines


def training_texts(rows_train: list[dict]) -> set[str]:
    """Every text the training data holds (pairs and response pool), normalized."""
    texts = [t for row in rows_train for t in (row["policy"], row["chosen"], row["rejected"])
             + tuple(text for text, _ in row["extras"]) if t]
    return {normalize(t) for t in texts}


def write(rows_train: list[dict], rows_eval: list[dict], out: Path) -> dict:
    prefs = {c: [] for c in S.PREFERENCE_SCHEMA.names}
    pool = {c: [] for c in S.POOL_SCHEMA.names}
    checks = {c: [] for c in S.CHECKS_SCHEMA.names}
    per_category: Counter = Counter()
    for row in rows_train:
        item = row["item"]
        pid = f"starter-{item.category}-{per_category[item.category]:03d}"
        per_category[item.category] += 1
        for name, value in zip(S.PREFERENCE_SCHEMA.names, (pid, item.prompt, row["chosen"], row["rejected"],
                                                           item.category), strict=True):
            prefs[name].append(value)
        checks["split"].append("train"), checks["key"].append(pid), checks["spec"].append(json.dumps(item.spec))
        responses = [(row["policy"], POLICY)] if row["policy"] else []
        responses += [(row["chosen"], row["chosen_model"]), (row["rejected"], row["rejected_model"]), *row["extras"]]
        seen: set[str] = set()
        for text, generator in responses:
            if text in seen:
                continue
            seen.add(text)
            for name, value in zip(S.POOL_SCHEMA.names, (prompt_id(item.prompt), item.prompt, text, generator,
                                                         item.category), strict=True):
                pool[name].append(value)
    evals = {c: [] for c in S.REWARDBENCH_SCHEMA.names}
    for index, row in enumerate(rows_eval):
        item = row["item"]
        for name, value in zip(S.REWARDBENCH_SCHEMA.names, (item.prompt, row["chosen"], row["chosen_model"],
                               row["rejected"], row["rejected_model"], item.category, index), strict=True):
            evals[name].append(value)
        checks["split"].append("eval"), checks["key"].append(str(index)), checks["spec"].append(json.dumps(item.spec))
    out.mkdir(parents=True, exist_ok=True)
    tables = {"preferences": (prefs, S.PREFERENCE_SCHEMA), "eval": (evals, S.REWARDBENCH_SCHEMA),
              "pool": (pool, S.POOL_SCHEMA), "checks": (checks, S.CHECKS_SCHEMA)}
    for kind, (data, schema) in tables.items():
        pq.write_table(pa.Table.from_pydict(data, schema=schema), out / S.FILES[kind], compression="zstd")
    return {"train": Counter(prefs["source"]), "eval": Counter(evals["subset"]), "pool_rows": len(pool["prompt"]),
            "pool_generators": Counter(pool["generator"])}


README = """# GRAM starter dataset

Built by `python -m scripts.build_starter --seed {seed}` ({built}) in {seconds:.0f} s on 2 shared CPU cores (1 torch
thread), {sample_seconds:.0f} s of it loading and sampling the policy. Labels are correct by construction: each pair has a check spec in
`checks.parquet`, and `gram_core.starter.label_problems` re-runs it (the build refuses to write a failing pair).

* Source tables: `tables.json` (hand-written facts, topics, templates).
* Policy samples: SmolLM2-135M-Instruct (the packaged GGUF, dequantized to fp32), k=1, temperature
  {temperature}, top-p {top_p}, at most {max_new_tokens} new tokens, seed {seed}, cut after the last full
  sentence; {sampled} prompts sampled ({sample_kept} usable). Sampling is per-row seeded, so a rebuild on
  the same CPU type reproduces the text; other hardware may differ in rare tokens.{sample_note}
* chosen/rejected: transformations of the policy sample where the check allows it (capitals: the sample
  when it names the capital vs. the sample with the capital swapped for a large non-capital city;
  all-caps: uppercased vs. original; word limit: shortened to whole sentences vs. original; keyword:
  keyword sentence appended vs. original), templates elsewhere. Harmful requests are never sent to the
  policy; their "compliance" responses are placeholders with every detail removed.
* Subsets and RewardBench sections: {sections}. Held out of training: {heldout}.
* No leaks: no eval prompt is a training prompt, and no eval chosen or rejected text is a training text
  (chosen or rejected of any training pair, or any response-pool text; a text counts whatever its role),
  exactly or after normalisation (casefold, whitespace collapsed, stripped). The build refuses to write a
  leaking pair; `tests/test_starter.py::test_eval_shares_no_text_with_training` checks the shipped files.
  Where a training template would put a training text into an eval pair, that pair is made by the item's
  eval-only variant (same random choices; `tables.json` `eval_refusals`, `eval_compliance_placeholders`,
  `eval_unneeded_refusals`; "<capital> is the capital of <country>." and "..., so the answer is N."
  phrasing). Eval pairs made so, per subset: {alt_counts}.

| file | contents | rows |
|---|---|---|
| preferences.parquet | training pairs (preference contract), source = category | {n_train} |
| eval.parquet | evaluation pairs (RewardBench schema), disjoint from training (see "No leaks" above) | {n_eval} |
| response_pool.parquet | responses to the training prompts (response-pool contract) | {pool_rows} |
| checks.parquet | check spec per pair (split, key = pair_id or id, spec JSON) | {n_checks} |

Training pairs per category: {train_counts}

Eval pairs per subset: {eval_counts}

Response-pool rows per generator: {pool_generators}

Surface cues (issue 13): the single cue (`gram_core.cues`: length, capitals, digits, symbols, nesting, prefix
relation, each way) that picks the chosen text most often per subset, a tie counting half. The build refuses a
held-out family where it passes {cue_limit:.0%}; counterfactual pairs (all capitals that lose when ordinary case
was asked for, a shortened answer under a minimum length, a forbidden keyword, a terse refusal against a long
compliance, a long refusal of a harmless question) keep any one cue from deciding a training subset.

| split | subset | pairs | templates | strongest cue | picks chosen |
|---|---|---|---|---|---|
{cue_table}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=S.STARTER_DIR)
    parser.add_argument("--no-sample", action="store_true", help="skip the policy (templates only; for testing)")
    parser.add_argument("--samples", type=Path, help="JSON cache of the policy samples: read if it exists and "
                        "holds every prompt, else written after sampling")
    args = parser.parse_args()
    began = time.time()
    train, evals = make_items(args.seed)
    prompts = [i.prompt for i in train + evals]
    assert len(set(prompts)) == len(prompts), "duplicate prompts"
    to_sample = prompts_to_sample(train, evals)
    print(f"{len(train)} training and {len(evals)} eval prompts; sampling {len(to_sample)}", flush=True)
    raw, sample_seconds, cached = ({}, 0.0, False) if args.no_sample else \
        policy_samples(to_sample, args.seed, args.samples)
    samples = {p: text for p, text in ((p, clean_sample(r)) for p, r in raw.items()) if text}
    tables = S.starter_tables()
    rows_train = materialize(train, samples, tables)
    rows_eval = materialize(evals, samples, tables, forbidden=training_texts(rows_train))
    train_prompts = {normalize(i.prompt) for i in train}
    assert not [i.prompt for i in evals if normalize(i.prompt) in train_prompts], "eval prompt is a training prompt"
    cue_lines = cue_report(rows_train, rows_eval)
    counts = write(rows_train, rows_eval, args.out)
    alt_counts = Counter(row["item"].category for row in rows_eval if row["variant"] == "eval-only")
    # A cache recovered from shipped files (scripts/recover_starter_samples.py) says how it was made.
    cache = json.loads(args.samples.read_text(encoding="utf-8")) if cached else {}
    seconds = time.time() - began + (sample_seconds if cached else 0.0)  # a cached run counts its sampling
    line = lambda c: ", ".join(f"{k} {v}" for k, v in sorted(c.items()))  # noqa: E731
    (args.out / "README.md").write_text(README.format(
        seed=args.seed, built=time.strftime("%Y-%m-%d"), seconds=seconds, sample_seconds=sample_seconds,
        temperature=SAMPLING["temperature"], top_p=SAMPLING["top_p"], max_new_tokens=SAMPLING["max_new_tokens"],
        sampled=0 if args.no_sample else len(to_sample), sample_kept=cache.get("usable", len(samples)),
        sample_note=f"\n  {cache['note']}" if cache.get("note") else "", alt_counts=line(alt_counts) or "none",
        sections=", ".join(f"{k} -> {v}" for k, v in S.STARTER_SECTIONS.items()), heldout=", ".join(S.HELDOUT_SUBSETS),
        n_train=len(train), n_eval=len(evals), pool_rows=counts["pool_rows"], n_checks=len(train) + len(evals),
        train_counts=line(counts["train"]), eval_counts=line(counts["eval"]),
        pool_generators=line(counts["pool_generators"]), cue_limit=HELDOUT_CUE_LIMIT,
        cue_table="\n".join(cue_lines)), encoding="utf-8")
    print(f"wrote {args.out} in {seconds:.0f} s: {counts}")


if __name__ == "__main__":
    main()
