"""The CLI's text in and out: the candidates file of `gram rank` and the end-of-run summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flows.errors import InputError
from gram_core.report import pct


def read_candidates(path: str) -> list[dict[str, Any]]:
    """JSONL lines {prompt, candidates|responses: [...]}; errors name the line."""
    rows = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}:{number}: not valid JSON ({err})") from err
        candidates = row.get("candidates", row.get("responses"))
        if not isinstance(row.get("prompt"), str) or not isinstance(candidates, list) or not candidates \
                or not all(isinstance(c, str) for c in candidates):
            raise InputError(f"{path}:{number}: expected {{\"prompt\": str, \"candidates\": [str, ...]}} "
                             f"(non-empty), got keys {sorted(row)}")
        rows.append({"prompt": row["prompt"], "candidates": candidates, "line": number})
    if not rows:
        raise InputError(f"{path}: no candidate lines")
    return rows


def format_summary(summary: dict[str, Any]) -> str:
    """The end-of-run summary: eval table, registered version and aliases, where to look."""
    columns = summary.get("columns") or {"trained": "GRAM"}
    scalar = " (BT: a scalar reward model, one order)" if "bt" in columns else ""
    lines = ["", f"Evaluation on {summary.get('eval_rows')} pairs (accuracy %; judges in both slot orders"
             f"{scalar}):", "", f"  {'metric':44s}" + "".join(f" {name[:12]:>12s}" for name in columns.values())]
    lines += [f"  {r['metric'][:44]:44s}" + "".join(f" {pct(r.get(key)):>12s}" for key in columns)
              for r in summary.get("eval", [])]
    if summary.get("evidence"):
        lines += ["", *(f"  {line}" for line in summary["evidence"])]
    if summary.get("training"):
        lines += ["", "Training:", *(f"  {line}" for line in summary["training"])]
    lines += dropped_lines(summary.get("dropped_rows"))
    reg = summary.get("registered")
    if reg:
        promo = reg["promotion"]
        lines += ["", f"Registered: {reg['name']} version {reg['version']}, aliases: "
                  f"{', '.join(reg['aliases']) or '(none)'}",
                  f"  champion gate: {promo['decision']} — {promo['reason']}"]
    cached = [name for name, state in summary.get("stages", {}).items() if state == "Cached"]
    lines += ["", f"Stages: {len(summary.get('stages', {}))} ({len(cached)} served from cache)",
              f"Artifact store: {summary.get('artifact_store')}", f"Report: {summary.get('report')}",
              f"MLflow: run {summary.get('mlflow_run')} at {summary.get('tracking_uri')}"]
    uri = summary.get("tracking_uri") or ""
    if uri.startswith("sqlite:"):
        lines.append(f"  browse: mlflow ui --backend-store-uri {uri} --host 127.0.0.1")
    return "\n".join(lines) + "\n"


def dropped_lines(dropped: dict[str, Any] | None) -> list[str]:
    """The summary's lines for the rows each source dropped (``drop_invalid_rows``): none when no source did."""
    if not dropped:
        return []
    from gram_core.sources import dropped_text

    return ["", "Invalid rows dropped (drop_invalid_rows):",
            *(f"  {role}: {dropped_text(drops)}" for role, drops in dropped.items())]
