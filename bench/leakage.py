"""Leakage check of an eval set against training data: eval prompts, chosen and rejected texts that appear in
the training files (whitespace- and case-normalised exact match), counted per eval subset.

    python -m bench.leakage --eval ../shared/data/rewardbench_lite.parquet \\
        --train ../shared/data/preferences_train.parquet --train ../shared/data/response_pool.parquet

A training file's text columns are whichever of prompt, chosen, rejected, response, response_a, response_b it
has. Prints one Markdown table per training file and, for texts that match, the distinct matched texts.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

TEXT_COLUMNS = ("chosen", "rejected", "response", "response_a", "response_b")


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().casefold()


def leaks(eval_rows: list[dict], train_path: Path) -> tuple[dict[str, Counter], Counter]:
    """({'prompt'|'chosen'|'rejected': Counter(subset -> matches)}, Counter(matched text -> count))."""
    table = pq.read_table(train_path)
    names = set(table.column_names)
    prompts = {normalise(t) for t in table.column("prompt").to_pylist()} if "prompt" in names else set()
    texts = {normalise(t) for c in TEXT_COLUMNS if c in names for t in table.column(c).to_pylist()}
    counts = {key: Counter() for key in ("prompt", "chosen", "rejected")}
    matched: Counter = Counter()
    for row in eval_rows:
        subset = row.get("subset", "all")
        if normalise(row["prompt"]) in prompts:
            counts["prompt"][subset] += 1
        for key in ("chosen", "rejected"):
            if normalise(row[key]) in texts:
                counts[key][subset] += 1
                matched[row[key].strip()[:80]] += 1
    return counts, matched


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval", type=Path, required=True, help="eval pairs (prompt, chosen, rejected[, subset])")
    parser.add_argument("--train", type=Path, action="append", required=True, help="a training file (repeatable)")
    args = parser.parse_args()
    eval_rows = pq.read_table(args.eval).to_pylist()
    subsets = sorted({r.get("subset", "all") for r in eval_rows})
    for path in args.train:
        counts, matched = leaks(eval_rows, path)
        print(f"\n{args.eval.name} ({len(eval_rows)} pairs) against {path.name}:\n")
        print("| subset | pairs | prompt in training | chosen in training | rejected in training |\n|---|---|---|---|---|")
        for subset in [*subsets, "all"]:
            n = len(eval_rows) if subset == "all" else sum(r.get("subset", "all") == subset for r in eval_rows)
            got = [sum(c.values()) if subset == "all" else c[subset] for c in counts.values()]
            print(f"| {subset} | {n} | " + " | ".join(str(g) for g in got) + " |")
        for text, n in matched.most_common():
            print(f"  matched {n}x: {text!r}")


if __name__ == "__main__":
    main()
