"""Write a policy-sample cache for ``build_starter.py --samples`` from the shipped starter files (no sampling).

    .venv/bin/python -m scripts.recover_starter_samples CACHE.json [--seed 0]
    .venv/bin/python -m scripts.build_starter --seed 0 --samples CACHE.json

Every sample that the shipped data uses is there: a training prompt's sample is its response-pool row with
generator SmolLM2-135M-Instruct, an eval prompt's is its chosen or rejected text whose model is exactly that.
A sample that no pair used (an eval capital question whose sample did not name the capital) is not recoverable,
and not needed: the pair is the same without it. Samples are stored cut (``clean_sample`` leaves them as they
are), so a rebuild from this cache reproduces every pair that does not change by design.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from gram_core import starter as S
from scripts.build_starter import prompts_to_sample
from scripts.starter_categories import POLICY, clean_sample, make_items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cache", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    prompts = prompts_to_sample(*make_items(args.seed))
    found: dict[str, str] = {}
    pool = S.starter_response_pool().to_pylist()
    found.update((r["prompt"], r["response"]) for r in pool if r["generator"] == POLICY)
    for r in S.starter_eval().to_pylist():
        for text, model in ((r["chosen"], r["chosen_model"]), (r["rejected"], r["rejected_model"])):
            if model == POLICY:
                found[r["prompt"]] = text
    samples = {p: found[p] for p in prompts if p in found}
    assert all(clean_sample(t) == t for t in samples.values()), "a shipped sample is not in its cut form"
    readme = (S.STARTER_DIR / "README.md").read_text(encoding="utf-8")
    # The build that sampled: a build from a recovered cache names it in its note.
    built = re.search(r"shipped files of the (\d{4}-\d\d-\d\d) build", readme) or \
        re.search(r"--seed \d+` \((\d{4}-\d\d-\d\d)\)", readme)
    sampled = re.search(r"(\d+) prompts sampled \((\d+) usable\)", readme)
    seconds = re.search(r"(\d+) s of it loading and sampling", readme)
    origin = f"the {built.group(1)} build" if built else "the previous build"
    note = (f"This build did not sample again: it read the {len(samples)} samples the data uses back from the\n"
            f"  shipped files of {origin} (`python -m scripts.recover_starter_samples`); the other\n"
            f"  {len(prompts) - len(samples)} were used by no pair and are not needed. Counts and seconds are that build's.")
    cache = {"seed": args.seed, "prompts": prompts, "samples": samples, "note": note,
             "seconds": float(seconds.group(1)) if seconds else 0.0}
    if sampled and int(sampled.group(1)) == len(prompts):
        cache["usable"] = int(sampled.group(2))
    args.cache.write_text(json.dumps(cache, ensure_ascii=False, indent=0), encoding="utf-8")
    print(f"{len(samples)} of {len(prompts)} samples recovered into {args.cache}")


if __name__ == "__main__":
    main()
