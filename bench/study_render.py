"""Render a finished `gram study`'s report again from its state folder, with this checkout's report code.

The study's stages are cached under a key that includes the library's code version, so a change to the
report alone would retrain every arm. This reads the arms' scores, the eval set and the models' training
histories from the artifacts instead (no training, no scoring) and writes the same Markdown and chart:

    python -m bench.study_render --home /path/to/.gram --out docs/quality.md [--command "gram study ..."]

It picks the eval set that the most arms were scored on; each scores artifact names its arm (``label``) and
its model, and the GRAM model names its stage-1 start.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

from gram_core.study_report import ARMS, study_readout, write_study_chart
from tasks.store.artifacts import read_history


def _meta(folder: Path) -> dict:
    return json.loads((folder / "_artifact.json").read_text())["meta"]


def _find(artifacts: Path, sha: str) -> Path:
    """The artifact folder of a content hash (folders are named by its first 16 hex digits)."""
    found = list(artifacts.glob(f"*/{sha.split(':', 1)[-1][:16]}"))
    if len(found) != 1:
        raise SystemExit(f"{artifacts}: expected one artifact {sha[:16]}, found {len(found)}")
    return found[0]


def _inputs(artifacts: Path) -> tuple[dict[str, Path], dict[str, Path], str]:
    """(arm -> scores folder, name -> model folder, eval set sha256) of the newest study report; a report
    written before reports named their inputs: the scores artifacts labelled with an arm, one per arm."""
    reports = sorted((artifacts / "study_report").glob("*/"), key=lambda f: f.stat().st_mtime)
    meta = _meta(reports[-1]) if reports else {}
    if "inputs" in meta:
        scores = {arm: _find(artifacts, sha) for arm, sha in meta["inputs"]["scores"].items()}
        models = {name: _find(artifacts, sha) for name, sha in meta["inputs"]["models"].items()}
        return scores, models, meta["eval_set"]
    scored = [(f, m) for f in sorted((artifacts / "evaluate").glob("*/")) if (m := _meta(f)).get("label") in ARMS]
    if not scored:
        raise SystemExit(f"{artifacts / 'evaluate'}: no study arm was scored here")
    eval_sha = meta.get("eval_set") or Counter(m["eval_set"] for _f, m in scored).most_common(1)[0][0]
    labels = Counter(m["label"] for _f, m in scored if m["eval_set"] == eval_sha)
    if max(labels.values()) > 1:
        raise SystemExit(f"{artifacts}: arms scored more than once on this eval set: {labels}; cannot tell which")
    chosen = {m["label"]: (f, m) for f, m in scored if m["eval_set"] == eval_sha}
    scores = {arm: f for arm, (f, _m) in chosen.items()}
    models = {arm: _find(artifacts, m["model"]) for arm, (_f, m) in chosen.items() if m["model"].startswith("model:")}
    if "gram" in models:
        models = {"stage1": _find(artifacts, _meta(models["gram"])["start"]), **models}
    return scores, models, eval_sha


def render(home: Path, out: Path, command: str | None, wall_minutes: float | None, eval_name: str | None) -> None:
    artifacts = home / "artifacts"
    scores, models, eval_sha = _inputs(artifacts)
    tables = {arm: pq.read_table(scores[arm] / "table.parquet") for arm in ARMS if arm in scores}
    eval_rows = pq.read_table(_find(artifacts, eval_sha) / "table.parquet")
    histories = {name: read_history(folder) for name, folder in models.items()}
    readout = study_readout(tables, eval_rows, histories, eval_name or f"sha256 {eval_sha[:16]}")
    head = f"Command: `{command}`" + (f" — wall time {wall_minutes:.1f} min" if wall_minutes else "") + ". " \
        if command else ""
    out.write_text(f"# Quality study\n\n{head}Rendered from the state folder by `python -m bench.study_render`.\n\n"
                   f"![study]({out.with_suffix('.png').name})\n\n{readout['markdown']}")
    write_study_chart(out.with_suffix(".png"), readout["arms"])
    print(f"wrote {out} and {out.with_suffix('.png')} ({len(tables)} arms, {eval_rows.num_rows} pairs)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, required=True, help="the study's state folder (GRAM home)")
    parser.add_argument("--out", type=Path, required=True, help="Markdown file to write (the chart goes beside it)")
    parser.add_argument("--command", help="the command that ran the study, for the report's first line")
    parser.add_argument("--eval-name", help="how the report names the eval set (default: its content hash)")
    parser.add_argument("--wall-minutes", type=float, help="the study's wall time, for the report's first line")
    args = parser.parse_args()
    render(args.home, args.out, args.command, args.wall_minutes, args.eval_name)


if __name__ == "__main__":
    main()
