"""The built-in starter dataset: the default data of ``gram run`` (no network, no ../shared/data).

Small preference data in the shapes of RewardBench's sections (chat facts, instruction following with
checkable constraints, safety refusals and over-refusals, verifiable reasoning), with labels correct by
construction: every pair carries a check spec, and ``label_problems`` re-runs the check on the shipped text.
How it was built (policy samples from SmolLM2-135M-Instruct + programmatic transformations and templates)
is in ``gram_core/starter/README.md``; the builder is ``scripts/build_starter.py`` (``python -m scripts.build_starter``).
"""

from __future__ import annotations

import ast
import json
import operator
import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from data_contracts import PREFERENCE_PAIRS, RESPONSE_POOL, REWARDBENCH

STARTER_DIR = Path(__file__).with_name("starter")
FILES = {"pool": "response_pool.parquet", "preferences": "preferences.parquet", "eval": "eval.parquet",
         "checks": "checks.parquet", "tables": "tables.json"}

# Starter subset -> RewardBench section (gram_core.rewardbench.SECTIONS names).
STARTER_SECTIONS: dict[str, str] = {
    "chat-facts": "Chat",
    "if-caps": "Chat Hard",
    "if-word-limit": "Chat Hard",
    "if-keyword": "Chat Hard",
    "if-bullets": "Chat Hard",
    "if-json": "Chat Hard",
    "safety-refuse": "Safety",
    "safety-respond": "Safety",
    "math-word": "Reasoning",
    "count-compare": "Reasoning",
}
# In the eval set only: a measure of generalization to unseen kinds of checks.
HELDOUT_SUBSETS: tuple[str, ...] = ("if-json", "count-compare")

REFUSAL_MARKERS = ("can't help", "cannot help", "can't assist", "cannot assist", "won't provide",
                   "will not provide", "not able to help", "unable to help", "must decline", "i'm sorry, but")
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
BULLET = re.compile(r"^\s*[-*•]\s+\S", re.MULTILINE)


def _strings(*names: str) -> list[pa.Field]:
    return [pa.field(n, pa.string(), nullable=False) for n in names]


# The starter's tables follow the data contracts; the checks table is the starter's own.
POOL_SCHEMA = RESPONSE_POOL.schema
PREFERENCE_SCHEMA = PREFERENCE_PAIRS.schema
REWARDBENCH_SCHEMA = REWARDBENCH.schema
CHECKS_SCHEMA = pa.schema(_strings("split", "key", "spec"))


def _read(kind: str, schema: pa.Schema) -> pa.Table:
    path = STARTER_DIR / FILES[kind]
    if not path.is_file():
        raise FileNotFoundError(f"starter data file {path} is missing; rebuild it with "
                                "`python -m scripts.build_starter` (or reinstall the package)")
    table = pq.read_table(path)
    if table.column_names != schema.names:
        raise ValueError(f"{path}: columns {table.column_names}, expected {schema.names}")
    return table.cast(schema)


def starter_response_pool() -> pa.Table:
    """Responses to the training prompts (response-pool contract): the sampled policy and templated
    variants, several per prompt, for stage-1 pairs (``gram_core.pairs.build_pairs``)."""
    return _read("pool", POOL_SCHEMA)


def starter_preferences() -> pa.Table:
    """Labeled training pairs (preference contract); ``source`` is the category (a STARTER_SECTIONS key)."""
    return _read("preferences", PREFERENCE_SCHEMA)


def starter_eval() -> pa.Table:
    """Held-out pairs in RewardBench's schema; prompts disjoint from training, subsets include
    HELDOUT_SUBSETS, which have no training data."""
    return _read("eval", REWARDBENCH_SCHEMA)


def starter_prompts() -> list[str]:
    """The distinct training prompts, in order (for sampling a policy's own responses). They include the
    safety-refuse requests, whose policy samples may be unsafe text: filter them out where that matters."""
    return list(dict.fromkeys(starter_preferences().column("prompt").to_pylist()))


@lru_cache(maxsize=1)
def starter_tables() -> dict[str, Any]:
    """The hand-written source tables (facts, templates) the dataset was built from."""
    return json.loads((STARTER_DIR / FILES["tables"]).read_text(encoding="utf-8"))


def starter_checks() -> dict[tuple[str, str], dict[str, Any]]:
    """(split, key) -> check spec; key = pair_id for 'train', str(id) for 'eval'."""
    table = _read("checks", CHECKS_SCHEMA)
    return {(s, k): json.loads(v) for s, k, v in zip(*(table.column(c).to_pylist() for c in CHECKS_SCHEMA.names),
                                                       strict=True)}


# ------------------------------------------------------------------------------------------------
# Programmatic checks
# ------------------------------------------------------------------------------------------------


def is_refusal(text: str) -> bool:
    """Whether a response declines (any of REFUSAL_MARKERS, case-insensitive, curly apostrophes folded)."""
    low = text.lower().replace("\u2019", "'")
    return any(marker in low for marker in REFUSAL_MARKERS)


def contains_phrase(text: str, phrase: str) -> bool:
    """Whole-word, case-insensitive containment."""
    return re.search(rf"(?<!\w){re.escape(phrase)}(?!\w)", text, flags=re.IGNORECASE) is not None


def parse_number(text: str) -> Fraction:
    try:
        return Fraction(Decimal(text))
    except (InvalidOperation, ValueError) as err:
        raise ValueError(f"not a decimal number: {text!r}") from err


def final_number(text: str) -> Fraction | None:
    """The last number written in a response (its final answer), or None."""
    found = NUMBER.findall(text)
    return parse_number(found[-1]) if found else None


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def evaluate_arithmetic(expr: str) -> Fraction:
    """Exact value of + - * / over decimal literals (no names, no calls)."""
    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return parse_number(ast.get_source_segment(expr, node) or str(node.value))
        raise ValueError(f"arithmetic expression {expr!r}: unsupported element {ast.dump(node)[:60]}")
    return walk(ast.parse(expr, mode="eval"))


def expected_number(spec: dict[str, Any], tables: dict[str, Any]) -> Fraction:
    """The true numeric answer of a 'number' check, recomputed from the spec (and the unit table)."""
    kind = spec["kind"]
    if kind == "arith":
        return evaluate_arithmetic(spec["expr"])
    if kind == "unit":
        factors = {(big, small): f for big, small, f in tables["units"]}
        return parse_number(spec["value"]) * factors[(spec["big"], spec["small"])]
    if kind == "letter_count":
        return Fraction(spec["word"].count(spec["letter"]))
    if kind == "list_count":
        return Fraction(len(spec["items"]))
    if kind == "larger":
        return max(parse_number(spec["a"]), parse_number(spec["b"]))
    if kind == "smaller":
        return min(parse_number(spec["a"]), parse_number(spec["b"]))
    if kind == "largest":
        return max(parse_number(x) for x in spec["items"])
    if kind == "vowel_count":
        return Fraction(sum(spec["word"].count(v) for v in "aeiou"))
    if kind == "even_count":
        return Fraction(sum(int(x) % 2 == 0 for x in spec["items"]))
    raise ValueError(f"unknown number-check kind {kind!r}")


def _number_operands(spec: dict[str, Any]) -> list[str]:
    """The values of a number check that the prompt must state (so the spec matches the prompt)."""
    kind = spec["kind"]
    if kind == "arith":
        return NUMBER.findall(spec["expr"])
    if kind == "unit":
        return [spec["value"], spec["big"], spec["small"]]
    if kind == "letter_count":
        return [spec["word"], spec["letter"]]
    if kind == "vowel_count":
        return [spec["word"]]
    if kind in ("list_count", "largest", "even_count"):
        return list(spec["items"])
    return [spec["a"], spec["b"]]


def _fact_answer(spec: dict[str, Any], tables: dict[str, Any]) -> str:
    table, key = spec["fact"]
    rows = {row[0]: row[1] for row in tables[table]}
    if key not in rows:
        raise ValueError(f"fact {key!r} is not in table {table!r}")
    return rows[key]


def _json_ok(text: str, value: dict[str, Any]) -> bool:
    try:
        return json.loads(text.strip()) == value
    except json.JSONDecodeError:
        return False


def _json_keys_ok(text: str, keys: set[str]) -> bool:
    try:
        parsed = json.loads(text.strip())
    except json.JSONDecodeError:
        return False
    return isinstance(parsed, dict) and set(parsed) == keys


def label_problems(spec: dict[str, Any], prompt: str, chosen: str, rejected: str,
                   tables: dict[str, Any] | None = None) -> list[str]:
    """Why this (prompt, chosen, rejected) would NOT be correctly labeled under ``spec``; [] when it is."""
    tables = tables if tables is not None else starter_tables()
    check = spec["check"]
    bad: list[str] = []

    def need(condition: bool, message: str) -> None:
        if not condition:
            bad.append(f"{check}: {message}")

    need(chosen.strip() != rejected.strip(), "chosen and rejected are the same text")
    if check == "contains":
        answer = _fact_answer(spec, tables)
        need(spec["answer"] == answer, f"spec answer {spec['answer']!r} != table answer {answer!r}")
        need(spec["fact"][1] in prompt, f"prompt does not mention {spec['fact'][1]!r}")
        need(contains_phrase(chosen, answer), f"chosen lacks the answer {answer!r}")
        need(not contains_phrase(rejected, answer), f"rejected contains the answer {answer!r}")
    elif check == "number":
        truth = expected_number(spec, tables)
        for operand in _number_operands(spec):
            need(operand in prompt, f"prompt does not state {operand!r}")
        need(final_number(chosen) == truth, f"chosen's final number {final_number(chosen)} != {truth}")
        need(final_number(rejected) not in (truth, None), f"rejected's final number {final_number(rejected)} "
             f"should be a wrong number (truth {truth})")
    elif check == "all_caps":
        need(any(c.isalpha() for c in chosen) and chosen == chosen.upper(), "chosen is not all capitals")
        need(rejected != rejected.upper(), "rejected is all capitals")
    elif check == "not_all_caps":  # counterfactual: all capitals lose when ordinary case was asked for
        need(not any(i.lower() in prompt.lower() for i in ("all caps", "capital letters", "uppercase"))
             or "not" in prompt.lower() or "no all-caps" in prompt.lower(), "prompt asks for capitals")
        need(chosen != chosen.upper(), "chosen is all capitals")
        need(any(c.isalpha() for c in rejected) and rejected == rejected.upper(), "rejected is not all capitals")
    elif check == "min_words":
        need(f"{spec['n']} words" in prompt, f"prompt does not state {spec['n']} words")
        need(len(chosen.split()) >= spec["n"], f"chosen has {len(chosen.split())} words < {spec['n']}")
        need(len(rejected.split()) < spec["n"], f"rejected has {len(rejected.split())} words >= {spec['n']}")
    elif check == "avoid_keyword":
        need(f'"{spec["word"]}"' in prompt and "not" in prompt.lower() or "Avoid" in prompt,
             f"prompt does not forbid {spec['word']!r}")
        need(not contains_phrase(chosen, spec["word"]), f"chosen contains {spec['word']!r}")
        need(contains_phrase(rejected, spec["word"]), f"rejected lacks {spec['word']!r}")
    elif check == "max_words":
        need(f"{spec['n']} words" in prompt, f"prompt does not state {spec['n']} words")
        need(len(chosen.split()) <= spec["n"], f"chosen has {len(chosen.split())} words > {spec['n']}")
        need(len(rejected.split()) > spec["n"], f"rejected has {len(rejected.split())} words <= {spec['n']}")
    elif check == "keyword":
        need(f'"{spec["word"]}"' in prompt, f"prompt does not ask for {spec['word']!r}")
        need(contains_phrase(chosen, spec["word"]), f"chosen lacks {spec['word']!r}")
        need(not contains_phrase(rejected, spec["word"]), f"rejected contains {spec['word']!r}")
    elif check == "bullets":
        need(str(spec["n"]) in prompt, f"prompt does not state {spec['n']}")
        need(len(BULLET.findall(chosen)) == spec["n"], f"chosen has {len(BULLET.findall(chosen))} bullets")
        need(len(BULLET.findall(rejected)) != spec["n"], f"rejected has {spec['n']} bullets")
    elif check == "json":
        need(all(f'"{k}"' in prompt for k in spec["value"]), "prompt does not name every key")
        need(_json_ok(chosen, spec["value"]), f"chosen is not the JSON object {spec['value']}")
        # A rejected JSON object with the asked keys must hold a wrong value ("wrong_value" pairs).
        need(not _json_ok(rejected, spec["value"]), "rejected is the asked JSON object")
        need(spec.get("rejected") == "wrong-value" or not _json_keys_ok(rejected, set(spec["value"])),
             "rejected is a JSON object with the asked keys")
    elif check == "refusal":
        need(is_refusal(chosen), "chosen does not refuse")
        need(not is_refusal(rejected), "rejected refuses")
    elif check == "compliance":
        need(not is_refusal(chosen), "chosen refuses")
        need(is_refusal(rejected), "rejected does not refuse")
    else:
        bad.append(f"unknown check {check!r}")
    return bad
