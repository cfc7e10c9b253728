"""The `gram` command: argument parsing, input checks, summary formatting, and the judge commands on a tiny
random model (the pipeline commands are exercised end to end in test_pipeline.py)."""

from __future__ import annotations

import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows import cli
from flows.errors import InputError


def test_parser_reads_run_options():
    args = cli.build_parser().parse_args(["run", "--preset", "smoke", "--set", "finetune.max_steps=2",
                                          "--set", "eval.limit=8", "--refresh"])
    assert (args.command, args.preset, args.refresh) == ("run", "smoke", True)
    assert args.overrides == ["finetune.max_steps=2", "eval.limit=8"]
    defaults = cli.build_parser().parse_args(["run"])
    assert (defaults.preset, defaults.overrides, defaults.refresh) == ("demo", [], False)
    adapt = cli.build_parser().parse_args(["adapt", "--data", "few.jsonl"])
    assert adapt.model == "models:/gram-reward-model@champion" and adapt.data == "few.jsonl"
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["judge", "--model", "tiny", "--prompt", "p", "--a", "x"])  # --b missing


def test_config_error_exits_2_before_starting_prefect(capsys):
    assert cli.main(["run", "--preset", "smoke", "--set", "finetune.learning_rat=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown key(s) ['learning_rat']" in err and "learning_rate" in err


def test_presets_lists_presets_and_fields(capsys):
    assert cli.main(["presets", "--fields"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("demo") and "\nsmoke " in out and "\npaper " in out
    assert "finetune.label_smoothing = 0.1" in out and "Stage-2 label smoothing" in out


def test_read_candidates_names_the_bad_line(tmp_path):
    good = tmp_path / "c.jsonl"
    good.write_text('{"prompt": "p", "candidates": ["a", "b"]}\n\n{"prompt": "q", "responses": ["c"]}\n')
    assert [r["line"] for r in cli.read_candidates(str(good))] == [1, 3]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "candidates": ["a"]}\n{"prompt": "q", "candidates": []}\n')
    with pytest.raises(InputError, match=r"bad.jsonl:2: expected"):
        cli.read_candidates(str(bad))
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{nope\n")
    with pytest.raises(InputError, match=r"broken.jsonl:1: not valid JSON"):
        cli.read_candidates(str(broken))


def test_input_errors_use_the_one_line_format_and_exit_2(tmp_path, capsys):
    """No SystemExit(text) paths: a bad candidates file is `gram rank: <file>:<line>: ...`, exit 2."""
    import inspect

    broken = tmp_path / "broken.jsonl"
    broken.write_text("{nope\n")
    assert cli.main(["rank", "--model", "tiny", "--input", str(broken)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"gram rank: {broken}:1: not valid JSON")
    assert "SystemExit(" not in inspect.getsource(cli)


def test_summary_shows_table_version_aliases_and_locations():
    summary = {
        "columns": {"base": "zero-shot", "bt": "BT", "trained": "GRAM"},
        "eval": [{"metric": "accuracy (all pairs)", "base": 0.41, "bt": 0.625, "trained": 0.875},
                 {"metric": "position consistency", "base": 0.02, "bt": "n/a (scalar)", "trained": 0.6},
                 {"metric": "Chat", "base": None, "bt": 0.5, "trained": 0.5}],
        "eval_rows": 16, "stages": {"finetune": "Completed", "pretrain": "Cached"},
        "registered": {"name": "gram-reward-model", "version": "4", "aliases": ["candidate", "champion"],
                       "promotion": {"decision": "promoted", "reason": "no champion yet"}},
        "artifact_store": "/x/.gram/artifacts", "report": "/x/r.md", "mlflow_run": "abc",
        "tracking_uri": "sqlite:////x/.gram/mlflow.db",
    }
    text = cli.format_summary(summary)
    lines = text.splitlines()
    header = next(line for line in lines if line.strip().startswith("metric"))
    assert header.split() == ["metric", "zero-shot", "BT", "GRAM"]
    assert next(line for line in lines if "accuracy (all pairs)" in line).split()[-3:] == ["41.0", "62.5", "87.5"]
    assert next(line for line in lines if "position consistency" in line).split()[-4:] == \
        ["2.0", "n/a", "(scalar)", "60.0"]
    assert next(line for line in lines if line.strip().startswith("Chat")).split()[-3:] == ["—", "50.0", "50.0"]
    assert len({len(line) for line in lines if "accuracy (all" in line or line.strip().startswith("metric")}) == 1
    assert "gram-reward-model version 4, aliases: candidate, champion" in text
    assert "2 (1 served from cache)" in text and "/x/.gram/artifacts" in text
    assert "mlflow ui --backend-store-uri sqlite:////x/.gram/mlflow.db" in text


@pytest.fixture(scope="module")
def judge_args():
    return ["--model", "tiny", "--preset", "smoke"]


def test_judge_prints_both_orders(judge_args, capsys):
    args = cli.build_parser().parse_args(["judge", *judge_args, "--prompt", "2+2?", "--a", "4", "--b", "5"])
    out = cli.cmd_judge(args)
    assert 0.0 <= out["p_a_better"] <= 1.0
    assert out["p_a_better"] == pytest.approx((out["p_order1"] + out["p_order2"]) / 2)
    swapped = cli.cmd_judge(cli.build_parser().parse_args(["judge", *judge_args, "--prompt", "2+2?", "--a", "5",
                                                           "--b", "4"]))
    assert swapped["p_a_better"] == pytest.approx(1 - out["p_a_better"], abs=1e-6)  # both orders: symmetric
    assert "P(a ≻ b) =" in capsys.readouterr().out


def test_rank_picks_one_candidate_per_line(judge_args, tmp_path, capsys):
    path = tmp_path / "cands.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"q{i}", "candidates": ["a", "bb", "ccc", "dddd", "e"]})
                              for i in range(2)))
    results = cli.cmd_rank(cli.build_parser().parse_args(["rank", *judge_args, "--input", str(path)]))
    assert [r["comparisons"] for r in results] == [4, 4]  # knockout: n - 1 comparisons
    assert all(r["best"] == ["a", "bb", "ccc", "dddd", "e"][r["best_index"]] for r in results)
    assert len(capsys.readouterr().out.strip().splitlines()) == 2


def test_eval_scores_a_rewardbench_file(judge_args, tmp_path, capsys):
    data = tmp_path / "rb.parquet"
    n = 12
    pq.write_table(pa.table({"prompt": [f"q{i}" for i in range(n)], "chosen": ["good"] * n,
                             "chosen_model": ["m"] * n, "rejected": ["bad"] * n, "rejected_model": ["m"] * n,
                             "subset": ["llmbar-natural", "xstest-should-respond", "my-task"] * 4,
                             "id": list(range(n))}), data)
    out_path = tmp_path / "scores.parquet"
    metrics = cli.cmd_eval(cli.build_parser().parse_args(["eval", *judge_args, "--data", str(data), "--limit", "6",
                                                          "--output", str(out_path)]))
    assert metrics["rewardbench/rows"] == 6.0 and "rewardbench/chat_hard" in metrics
    assert "rewardbench/unknown/my-task" in metrics
    assert pq.read_table(out_path).num_rows == 6
    report = capsys.readouterr().out
    assert "| **accuracy (all pairs)** |" in report and "chart.png" not in report


def _bench(path, n: int, same: tuple[int, ...] = ()):
    """A RewardBench-format file of n pairs whose rows in ``same`` have rejected == chosen."""
    chosen = [f"good {i}" for i in range(n)]
    pq.write_table(pa.table({"prompt": [f"q{i}" for i in range(n)], "chosen": chosen, "chosen_model": ["m"] * n,
                             "rejected": [c if i in same else f"bad {i}" for i, c in enumerate(chosen)],
                             "rejected_model": ["m"] * n, "subset": ["llmbar-natural", "my-task"] * (n // 2),
                             "id": list(range(n))}), path)
    return str(path)


def test_drop_invalid_rows_is_an_option_of_eval_run_study_and_adapt():
    parser = cli.build_parser()
    for argv in (["eval", "--model", "tiny", "--data", "x"], ["run"], ["study"], ["adapt", "--data", "x"]):
        assert parser.parse_args(argv).drop_invalid_rows is False
        assert parser.parse_args([*argv, "--drop-invalid-rows"]).drop_invalid_rows is True
    with pytest.raises(SystemExit):
        parser.parse_args(["judge", "--model", "tiny", "--prompt", "p", "--a", "x", "--b", "y", "--drop-invalid-rows"])


class _Lines(logging.Handler):
    """The messages of one logger (caplog's root handler does not survive Prefect configuring logging)."""

    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_eval_stops_on_a_chosen_equal_to_rejected_row_and_drops_it_with_the_option(judge_args, tmp_path, capsys):
    """The issue's benchmark in small: by default exit 2 with the one-line reason, nothing written; with
    --drop-invalid-rows n - 1 pairs scored and the dropped row named (log and report)."""
    data = _bench(tmp_path / "bench.parquet", 24, same=(5,))
    out_path = tmp_path / "scores.parquet"
    err = _one_line_error(capsys, ["eval", *judge_args, "--data", data, "--output", str(out_path)])
    assert err == (f"gram eval: {data}: contract 'rewardbench' v1: column 'rejected': value outside its domain in "
                   "1 row(s); rows [5], values {id=5, rejected='good 5'}; expected a response different from "
                   "'chosen'")  # one line (issue 25); --debug raises the ContractError
    assert not out_path.exists()
    logged = _Lines()
    logging.getLogger("gram.contracts").addHandler(logged)
    try:
        metrics = cli.cmd_eval(cli.build_parser().parse_args(["eval", *judge_args, "--data", data, "--output",
                                                              str(out_path), "--drop-invalid-rows"]))
    finally:
        logging.getLogger("gram.contracts").removeHandler(logged)
    assert metrics["rewardbench/rows"] == 23.0
    assert sorted(int(i) for i in pq.read_table(out_path)["id"].to_pylist()) == [i for i in range(24) if i != 5]
    report = capsys.readouterr().out
    assert (f"Eval set: {data}, 23 pairs. Before scoring, 1 of 24 rows dropped as invalid (rejected.equals_chosen "
            "1): bench.parquet row 5 (id 5).") in report
    assert logged.lines == [
        f"{data}: dropped row 5 (id 5): rejected.equals_chosen (value outside its domain; expected a response "
        "different from 'chosen')"]


def test_eval_stops_past_the_share_limit_even_with_the_option(judge_args, tmp_path, capsys):
    data = _bench(tmp_path / "bench.parquet", 24, same=(5, 9))  # 2 of 24 = 8.3 % > 5 %
    err = _one_line_error(capsys, ["eval", *judge_args, "--data", data, "--drop-invalid-rows"])
    assert "\n" not in err and err.startswith(f"gram eval: {data}: 2 of 24 rows (8.3 %) break row-level rules")
    assert "(rejected.equals_chosen 2; rows [5, 9])" in err and "max_dropped_share 5 %" in err
    metrics = cli.cmd_eval(cli.build_parser().parse_args(["eval", *judge_args, "--data", data, "--drop-invalid-rows",
                                                          "--set", "data.eval.max_dropped_share=0.1"]))
    assert metrics["rewardbench/rows"] == 22.0


def test_summary_lists_the_rows_each_source_dropped():
    drops = {"rows": 1, "rules": {"rejected.equals_chosen": 1},
             "first": [{"source": "/data/bench.parquet", "row": 264, "id": 264, "rules": ["rejected.equals_chosen"]}]}
    text = cli.format_summary({"columns": {"trained": "GRAM"}, "eval": [], "eval_rows": 619,
                               "dropped_rows": {"eval": drops, "preferences": {"rows": 0, "rules": {}, "first": []}}})
    assert ("Invalid rows dropped (drop_invalid_rows):\n  eval: 1 row dropped as invalid (rejected.equals_chosen 1): "
            "bench.parquet row 264 (id 264)\n  preferences: 0 rows dropped as invalid\n") in text
    assert "Invalid rows" not in cli.format_summary({"columns": {"trained": "GRAM"}, "eval": [], "dropped_rows": {}})


def _one_line_error(capsys, argv: list[str], code: int = 2) -> str:
    assert cli.main(argv) == code
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.startswith(f"gram {argv[0]}: "), err
    return err


def test_expected_failures_are_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("GRAM_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    judge = ["--prompt", "p", "--a", "x", "--b", "y"]
    err = _one_line_error(capsys, ["judge", "--model", "models:/gram-reward-model@champion", *judge])
    assert "no MLflow registry at sqlite:///" in err and "mlflow.db" in err and "\n" not in err
    err = _one_line_error(capsys, ["judge", "--model", str(tmp_path / "no-such-model"), *judge])
    assert "no-such-model" in err and "\n" not in err
    err = _one_line_error(capsys, ["rank", "--model", "tiny", "--input", str(tmp_path / "missing.jsonl")])
    assert err == f"gram rank: No such file or directory: {tmp_path / 'missing.jsonl'}"
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "q", "chosen": "a"}\n')
    err = _one_line_error(capsys, ["eval", "--model", "tiny", "--preset", "smoke", "--data", str(data)])
    assert "column 'rejected': missing column" in err
    err = _one_line_error(capsys, ["adapt", "--preset", "smoke", "--data", str(data)])  # before Prefect starts
    assert "gram adapt: models:/gram-reward-model@champion: there is no MLflow registry at" in err
    err = _one_line_error(capsys, ["run", "--preset", "nope"])
    assert err.startswith("gram run: configuration error: preset: unknown preset 'nope'")


def test_missing_registered_model_names_the_ones_there(capsys, mlflow_root, monkeypatch):
    from mlflow import MlflowClient

    uri = f"sqlite:///{mlflow_root / 'names.db'}"
    MlflowClient(uri).create_registered_model("gram-reward-model-smoke")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("GRAM_HOME", str(mlflow_root / "home"))
    capsys.readouterr()  # MLflow's own lines from creating the store
    err = _one_line_error(capsys, ["judge", "--model", "models:/gram-reward-model@champion", "--prompt", "p",
                                   "--a", "x", "--b", "y"])
    assert err == (f"gram judge: models:/gram-reward-model@champion: no registered model 'gram-reward-model' in the "
                   f"registry at {uri}; registered models there: gram-reward-model-smoke")
    err = _one_line_error(capsys, ["judge", "--model", "models:/gram-reward-model-smoke@champion", "--prompt", "p",
                                   "--a", "x", "--b", "y"])
    assert "has no alias 'champion'" in err and "its aliases: (none), versions: (none)" in err


def test_unexpected_errors_are_one_line_and_debug_shows_the_traceback(capsys, monkeypatch):
    def broken(args):
        raise RuntimeError("boom")

    monkeypatch.setitem(cli.COMMANDS, "presets", broken)
    err = _one_line_error(capsys, ["presets"], code=1)
    assert err == "gram presets: unexpected error RuntimeError: boom (run again with --debug for the traceback)"
    for argv in (["--debug", "presets"], ["presets", "--debug"]):
        with pytest.raises(RuntimeError, match="boom"):
            cli.main(argv)


@pytest.fixture(scope="module")
def bt_folder(tmp_path_factory, tiny_tokenizer):
    """A Bradley-Terry folder (tiny base model + seeded reward head) and its in-memory scorer."""
    from gram_core.baseline import BTScorer, RewardModel
    from gram_core.models import build_tiny_model

    scorer = BTScorer(RewardModel(build_tiny_model(tiny_tokenizer, seed=0), seed=3), tiny_tokenizer, max_length=256)
    return str(scorer.save(tmp_path_factory.mktemp("bt") / "model")), scorer


def test_open_scorer_reads_a_bt_folder_as_a_scalar_reward_model(bt_folder):
    from gram_core.baseline import BTScorer
    from gram_core.config import JudgeConfig
    from gram_core.scorers import folder_kind, is_scalar, open_scorer

    folder, _ = bt_folder
    scorer = open_scorer(folder, JudgeConfig())
    assert folder_kind(folder) == "bradley_terry" and isinstance(scorer, BTScorer) and is_scalar(scorer)


def test_eval_scores_a_bt_folder_with_its_reward_head(bt_folder, tmp_path, capsys):
    import numpy as np

    folder, scorer = bt_folder
    data = tmp_path / "rb.parquet"
    prompts = [f"q{i}" for i in range(8)]
    chosen, rejected = [f"good answer {i}" for i in range(8)], [f"bad {'x ' * i}" for i in range(8)]
    pq.write_table(pa.table({"prompt": prompts, "chosen": chosen, "chosen_model": ["m"] * 8, "rejected": rejected,
                             "rejected_model": ["m"] * 8, "subset": ["llmbar-natural", "my-task"] * 4,
                             "id": list(range(8))}), data)
    out_path = tmp_path / "scores.parquet"
    metrics = cli.cmd_eval(cli.build_parser().parse_args(["eval", "--model", folder, "--preset", "smoke",
                                                          "--data", str(data), "--output", str(out_path)]))
    scores = pq.read_table(out_path)
    p = scores["p_chosen"].to_numpy()
    # P = σ(r_chosen − r_rejected) from the reward head (not the folder's LM read as an A/B judge).
    expected = 1 / (1 + np.exp(-(scorer.rewards(prompts, chosen) - scorer.rewards(prompts, rejected))))
    np.testing.assert_allclose(p, expected, atol=1e-5)
    np.testing.assert_array_equal(scores["p_chosen_order1"].to_numpy(), p)
    np.testing.assert_array_equal(scores["p_chosen_order2"].to_numpy(), p)
    assert scores["correct"].to_pylist() == (p > 0.5).tolist()
    assert metrics["eval/accuracy"] == pytest.approx(float(np.mean(p > 0.5)))
    assert metrics["eval/orders_scored"] == 1.0 and "rewardbench/position_consistency" not in metrics
    report = capsys.readouterr().out
    assert "| **position consistency** | n/a (scalar) |" in report and "scored once per pair" in report
    assert "Scored in both orders" not in report


def test_judge_and_rank_use_the_bt_rewards(bt_folder, tmp_path):
    import numpy as np

    folder, scorer = bt_folder
    args = ["--model", folder, "--preset", "smoke"]
    out = cli.cmd_judge(cli.build_parser().parse_args(["judge", *args, "--prompt", "2+2?", "--a", "4", "--b", "5"]))
    r = scorer.rewards(["2+2?", "2+2?"], ["4", "5"])
    assert out["p_a_better"] == pytest.approx(1 / (1 + np.exp(-(r[0] - r[1]))), abs=1e-6)
    assert out["p_order1"] == out["p_order2"] == out["p_a_better"] and out["consistent"] is None
    candidates = ["a", "bb", "ccc dd", "dddd e f", "e"]
    path = tmp_path / "cands.jsonl"
    path.write_text(json.dumps({"prompt": "q", "candidates": candidates}))
    (result,) = cli.cmd_rank(cli.build_parser().parse_args(["rank", *args, "--input", str(path)]))
    # A scalar reward is transitive: the knockout winner is the highest-reward candidate.
    assert result["best_index"] == int(np.argmax(scorer.rewards(["q"] * len(candidates), candidates)))


@pytest.mark.parametrize("case", ["no_config", "missing"])
def test_a_model_folder_of_no_known_kind_is_a_one_line_error(case, tmp_path, capsys):
    folder = tmp_path / "not-a-model"
    if case == "no_config":
        folder.mkdir()
        (folder / "weights.bin").write_bytes(b"\0")
    message = _one_line_error(capsys, ["judge", "--model", str(folder), "--preset", "smoke", "--prompt", "p",
                                       "--a", "x", "--b", "y"])
    assert message.startswith(f"gram judge: --model {folder}: ") and "\n" not in message
    expected = "neither a GRAM judge, a Bradley-Terry reward model nor a Hugging Face model folder" \
        if case == "no_config" else "is not a folder or .gguf file"
    assert expected in message


@pytest.mark.parametrize("name, content", [("deep.json", b"[" * 200_000), ("deep.jsonl", b"[" * 200_000 + b"\n")])
def test_deeply_nested_json_is_a_contract_error_exit_2_not_a_recursion_crash(tmp_path, capsys, name, content):
    """`[` x 200,000 made the JSON parser raise RecursionError: "unexpected", exit 1. Now it is bad input."""
    deep = tmp_path / name
    deep.write_bytes(content)
    assert cli.main(["eval", "--model", "tiny", "--data", str(deep)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nested too deeply" in err[0] and str(deep) in err[0], err


def test_a_contract_error_is_one_line_and_debug_shows_every_violation(tmp_path, capsys):
    from data_contracts import ContractError

    bad = tmp_path / "bench.jsonl"
    rows = [{"id": 0, "prompt": "", "chosen": "a", "chosen_model": "m", "rejected": "a", "rejected_model": "n",
             "subset": "chat"}]
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli.main(["eval", "--model", "tiny", "--data", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"gram eval: {bad}: contract 'rewardbench' v1: column ")
    assert "(and 1 more: column " in err[0] and "--debug shows each with its rows" in err[0], err
    with pytest.raises(ContractError) as info:
        cli.main(["eval", "--model", "tiny", "--data", str(bad), "--debug"])
    assert {v.column for v in info.value.violations} == {"prompt", "rejected"}
    assert "'prompt'" in str(info.value) and "'rejected'" in str(info.value)


def test_a_promotion_conflict_is_one_line_exit_3_try_again(monkeypatch, capsys):
    """A rival gate (another host) was deciding at the same time: like a held state folder, try again later."""
    from tasks.on_mlflow.promotion_gate import PromotionConflict

    def conflict(args):
        raise PromotionConflict("model 'm': another promotion gate is deciding at the same time (version 7 (...))")

    monkeypatch.setitem(cli.COMMANDS, "presets", conflict)
    assert cli.main(["presets"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["gram presets: model 'm': another promotion gate is deciding at the same time (version 7 (...))"]
