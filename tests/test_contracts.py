"""Contracts and validate(): every rule, the error message, conforming, no torch import."""

import math
import subprocess
import sys

import pyarrow as pa
import pytest

from data_contracts import (
    CONTRACTS,
    PREFERENCE_PAIRS,
    RESPONSE_POOL,
    REWARDBENCH,
    SCORES,
    UNLABELED_PAIRS,
    Contract,
    ContractError,
    contract_of,
    get_contract,
    validate,
)


def pairs(**overrides):
    data = {
        "pair_id": ["p0", "p1", "p2"],
        "prompt": ["Say hi", "Add 2+2", "Name a colour"],
        "chosen": ["Hi!", "4", "Blue"],
        "rejected": ["Go away", "5", "Seven"],
        "source": ["toy", "toy", "toy"],
    }
    data.update(overrides)
    return pa.table(data)


def scores(**overrides):
    data = {
        "id": ["0", "1", "2"],
        "subset": ["llmbar-natural", "llmbar-natural", "xstest-should-refuse"],
        "p_chosen_order1": [0.9, 0.2, 0.5],
        "p_chosen_order2": [0.7, 0.4, 0.5],
        "p_chosen": [0.8, 0.3, 0.5],
        "correct": [True, False, False],  # the 0.5 tie counts as wrong
    }
    data.update(overrides)
    return pa.table(data)


def only_violation(table, contract):
    with pytest.raises(ContractError) as info:
        validate(table, contract, source="toy.parquet")
    assert len(info.value.violations) == 1, str(info.value)
    return info.value.violations[0], str(info.value)


def test_registry_and_schema_metadata():
    assert set(CONTRACTS) == {"response_pool", "unlabeled_pairs", "preference_pairs", "rewardbench", "scores", "prompts"}
    meta = PREFERENCE_PAIRS.schema.metadata
    assert meta[b"gram.contract"] == b"preference_pairs"
    assert meta[b"gram.contract_version"] == b"1"
    assert meta[b"gram.id_column"] == b"pair_id"
    assert UNLABELED_PAIRS.columns == ["pair_id", "prompt", "response_a", "response_b", "source"]
    assert REWARDBENCH.schema.field("id").type == pa.int64()
    assert RESPONSE_POOL.id_column is None  # prompt_id repeats: one row per generator
    assert "p_chosen > 0.5 (ties count as wrong)" in SCORES.domains["correct"]
    assert get_contract("scores") is SCORES
    with pytest.raises(KeyError, match="known contracts are"):
        get_contract("nope")


def test_contract_rejects_rule_on_unknown_column():
    with pytest.raises(ValueError, match="'pair' is not in its schema"):
        Contract("x", 1, pa.schema([("pair_id", pa.string())]), id_column="pair")


def test_valid_table_is_conformed():
    table = pairs().select(["source", "rejected", "chosen", "prompt", "pair_id"])
    table = table.append_column("extra", pa.array([1, 2, 3]))
    table = table.set_column(0, "source", table["source"].cast(pa.large_string()))
    out = validate(table, PREFERENCE_PAIRS)
    assert out.schema.names == PREFERENCE_PAIRS.columns
    assert out.schema.field("source").type == pa.string()
    assert out["chosen"].to_pylist() == ["Hi!", "4", "Blue"]
    assert contract_of(out) == ("preference_pairs", 1)
    assert contract_of(pairs()) is None


def test_lossless_casts_are_applied():
    table = pa.table({
        "prompt": ["q"], "chosen": pa.array(["a"]).dictionary_encode(), "chosen_model": ["m"],
        "rejected": ["b"], "rejected_model": ["n"], "subset": ["s"], "id": pa.array([7], pa.int32()),
    })
    out = validate(table, REWARDBENCH)
    assert out.schema.field("id").type == pa.int64()
    assert out.to_pylist()[0] == {"prompt": "q", "chosen": "a", "chosen_model": "m", "rejected": "b",
                                  "rejected_model": "n", "subset": "s", "id": 7}
    # Integer probabilities (e.g. from JSON) become float64.
    assert validate(scores(p_chosen_order1=[1, 0, 0], p_chosen_order2=[0, 0, 1],
                           p_chosen=[0.5, 0.0, 0.5], correct=[False] * 3), SCORES)["p_chosen_order1"].type \
        == pa.float64()


def test_empty_table_is_valid():
    out = validate(PREFERENCE_PAIRS.schema.empty_table(), PREFERENCE_PAIRS)
    assert out.num_rows == 0 and out.schema.names == PREFERENCE_PAIRS.columns


def test_missing_column():
    violation, message = only_violation(pairs().drop_columns(["rejected"]), PREFERENCE_PAIRS)
    assert (violation.column, violation.problem) == ("rejected", "missing column")
    assert message.startswith("toy.parquet: 1 violation(s) of contract 'preference_pairs' v1")


@pytest.mark.parametrize("column, values, got", [
    ("source", pa.array([1, 2, 3]), "int64"),  # no silent int -> string
    ("prompt", pa.array([1.0, 2.0, 3.0]), "double"),
])
def test_wrong_type(column, values, got):
    violation, message = only_violation(pairs(**{column: values}), PREFERENCE_PAIRS)
    assert violation.column == column and violation.problem == f"wrong type {got}"
    assert "expected string" in message


@pytest.mark.parametrize("ids", [pa.array([1.5, 2.0]), pa.array([2**63, 1], pa.uint64())])
def test_lossy_cast_is_a_violation(ids):
    table = pa.table({n: ["x", "y"] for n in REWARDBENCH.columns if n != "id"})
    table = table.set_column(table.schema.get_field_index("rejected"), "rejected", pa.array(["z", "w"]))
    table = table.append_column("id", ids)
    violation, _ = only_violation(table, REWARDBENCH)
    assert violation.column == "id" and violation.problem.startswith("wrong type")


def test_null_values_are_reported_with_rows():
    violation, message = only_violation(pairs(chosen=["Hi!", None, None]), PREFERENCE_PAIRS)
    assert (violation.column, violation.rows, violation.n_rows) == ("chosen", (1, 2), 2)
    assert "column 'chosen': null value in 2 row(s); rows [1, 2]" in message


def test_empty_and_whitespace_strings():
    violation, message = only_violation(pairs(prompt=["", " \t\n", "\u3000ok"]), PREFERENCE_PAIRS)
    assert violation.column == "prompt" and violation.rows == (0, 1)
    assert "values '', ' \\t\\n'" in message and "expected a non-empty string" in message


def test_duplicate_ids():
    violation, message = only_violation(pairs(pair_id=["p0", "p1", "p0"]), PREFERENCE_PAIRS)
    assert violation.column == "pair_id" and violation.rows == (0, 2)
    assert "values 'p0', 'p0'; expected unique ids" in message


def test_chosen_equal_to_rejected():
    violation, message = only_violation(pairs(rejected=["Go away", "4", "Seven"]), PREFERENCE_PAIRS)
    assert violation.column == "rejected" and violation.rows == (1,)
    assert "{pair_id='p1', rejected='4'}" in message


def test_valid_scores_pass():
    assert validate(scores(), SCORES)["correct"].to_pylist() == [True, False, False]


@pytest.mark.parametrize("column, values, bad_row", [
    ("p_chosen_order1", [0.9, 0.2, 1.5], 2),
    ("p_chosen_order2", [-0.1, 0.4, 0.5], 0),
    ("p_chosen_order1", [0.9, math.nan, 0.5], 1),
])
def test_probabilities_outside_unit_interval(column, values, bad_row):
    table = scores(**{column: values})
    with pytest.raises(ContractError) as info:
        validate(table, SCORES)
    domain = [v for v in info.value.violations if v.expected.startswith("a probability")]
    assert [(v.column, v.rows) for v in domain] == [(column, (bad_row,))]


def test_correct_must_equal_p_chosen_above_half():
    violation, message = only_violation(scores(correct=[True, False, True]), SCORES)  # tie marked correct
    assert violation.column == "correct" and violation.rows == (2,)
    assert "{correct=True, p_chosen=0.5}" in message and "ties count as wrong" in message


def test_p_chosen_must_be_mean_of_orders():
    violation, _ = only_violation(scores(p_chosen=[0.8, 0.35, 0.5]), SCORES)
    assert violation.column == "p_chosen" and violation.rows == (1,)
    assert violation.values == ("{p_chosen=0.35, p_chosen_order1=0.2, p_chosen_order2=0.4}",)


def test_one_error_lists_every_violation():
    table = pairs(pair_id=["p0", "p0", None], prompt=["ok", "", "fine"], source=pa.array([1, 2, 3]),
                  rejected=["Hi!", "5", "Seven"])
    with pytest.raises(ContractError) as info:
        validate(table, "preference_pairs", source="data/train.jsonl")
    found = {(v.column, v.problem.split(" (")[0], v.rows) for v in info.value.violations}
    assert found == {
        ("source", "wrong type int64", ()),
        ("pair_id", "null value", (2,)),
        ("prompt", "empty or whitespace-only string", (1,)),
        ("pair_id", "duplicate id", (0, 1)),
        ("rejected", "value outside its domain", (0,)),
    }
    message = str(info.value)
    assert message.startswith("data/train.jsonl: 5 violation(s)")
    assert "column 'prompt': empty or whitespace-only string in 1 row(s); rows [1], values ''" in message
    assert isinstance(info.value, ValueError)


def test_only_first_rows_and_truncated_values_are_shown():
    long_text = "x" * 500
    table = pairs(pair_id=["same"] * 3, chosen=[long_text] * 3, rejected=[long_text] * 3)
    with pytest.raises(ContractError) as info:
        validate(table, PREFERENCE_PAIRS)
    (dup,) = [v for v in info.value.violations if v.column == "pair_id"]
    assert dup.n_rows == 3
    (same,) = [v for v in info.value.violations if v.column == "rejected"]
    assert len(str(info.value)) < 800 and "…" in same.values[0]
    many = pairs(pair_id=[f"p{i}" for i in range(3)], chosen=[None] * 3)
    nulls = pa.concat_tables([many] * 4).set_column(0, "pair_id", pa.array([f"p{i}" for i in range(12)]))
    violation, message = only_violation(nulls, PREFERENCE_PAIRS)
    assert violation.n_rows == 12 and violation.rows == (0, 1, 2, 3, 4)
    assert "rows (first 5) [0, 1, 2, 3, 4]" in message


def test_importing_data_contracts_does_not_import_torch():
    code = ("import sys, data_contracts as dc; "
            "dc.validate(dc.SCORES.schema.empty_table(), dc.SCORES); "
            "print('torch' in sys.modules, 'datasets' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
