"""flows/parameters.py: the typed flow parameters Prefect builds its form from and validates before a run."""

from __future__ import annotations

import dataclasses
import typing

import pytest
from prefect.exceptions import ParameterTypeError

from flows.adapt import adapt
from flows.parameters import overrides_view
from flows.pipeline import gram_pipeline
from gram_core.config import describe
from tasks.settings import PipelineConfig, load_preset


def _paths(view, prefix=""):
    """Dotted field paths of a view, nested configs flattened as `describe` (`gram presets --fields`) does."""
    hints = typing.get_type_hints(view.__config_class__)
    out = set()
    for name, info in view.model_fields.items():
        nested = [a for a in typing.get_args(info.annotation) if hasattr(a, "__config_class__")]
        if nested and dataclasses.is_dataclass(hints[name]):
            out |= _paths(nested[0], f"{prefix}{name}.")
        else:
            out.add(prefix + name)
    return out


def test_schema_is_the_config_with_its_help_texts():
    schema = gram_pipeline.parameters.model_dump()
    assert schema["properties"]["preset"]["default"] == "demo"
    assert set(schema["properties"]["preset"]["examples"]) == {"demo", "smoke", "paper", "study", "study-gpu"}
    train = schema["definitions"]["TrainConfigOverrides"]["properties"]
    assert train["learning_rate"]["description"] == "Peak AdamW learning rate."
    assert {"type": "number"} in train["learning_rate"]["anyOf"]
    assert schema["definitions"]["PipelineConfigOverrides"]["additionalProperties"] is False
    # the form and `gram presets --fields` read the same definitions
    assert _paths(overrides_view(PipelineConfig)) == {key for key, _, _ in describe(PipelineConfig)} - {"preset"}
    assert adapt.parameters.model_dump()["properties"]["overrides"]["anyOf"][0]["$ref"].endswith(
        "PipelineConfigOverrides")


@pytest.mark.parametrize("params, message", [
    ({"preset": "nope"}, "unknown preset 'nope'; known presets: ['demo', 'paper', 'smoke', 'study', 'study-gpu']"),
    ({"overrides": {"finetune": {"learning_rate": "fast"}}}, "overrides.finetune.learning_rate: Input should be"),
    ({"overrides": {"finetune": {"learnin_rate": 1e-4}}}, "overrides.finetune.learnin_rate: Extra inputs"),
    ({"overrides": {"data": {"response_pools": [{"path": "a", "hub": "b"}]}}},
     "set exactly one of `path` or `hub`"),
    ({"overrides": ["finetune.max_steps"]}, "expected key.path=value"),
])
def test_prefect_rejects_bad_parameters_before_the_run(params, message):
    with pytest.raises(ParameterTypeError) as err:
        gram_pipeline.validate_parameters(params)
    assert message in str(err.value)


def test_only_the_fields_set_override_the_preset():
    params = gram_pipeline.validate_parameters({"preset": "smoke", "overrides": {
        "finetune": {"learning_rate": 1e-4, "max_steps": None},  # a form's empty field: not set
        "data": {"prompts": None, "response_pools": [{"path": "starter", "limit": 8}]}}})
    overrides = params["overrides"].to_dict()
    assert overrides == {"finetune": {"learning_rate": 1e-4},
                         "data": {"prompts": None, "response_pools": [
                             {"path": "starter", "hub": None, "name": None, "split": "train", "column_map": {},
                              "conversations": False, "limit": 8, "seed": 0, "drop_invalid_rows": False,
                              "max_dropped_share": 0.05}]}}
    config = load_preset("smoke", overrides)
    smoke = load_preset("smoke")
    assert config.finetune.learning_rate == 1e-4 and config.finetune.max_steps == smoke.finetune.max_steps
    assert config.data.prompts is None and config.data.response_pools[0].limit == 8
    cli_form = gram_pipeline.validate_parameters({"overrides": ["finetune.max_steps=2", "eval.limit=8"]})
    assert cli_form["overrides"].to_dict() == {"finetune": {"max_steps": 2}, "eval": {"limit": 8}}


def test_the_deprecated_drop_blank_rows_key_still_works_in_the_form_and_warns():
    """Renamed to drop_invalid_rows: the old key, in the --set form or a mapping, in a single source or a list of
    them, sets the new one with a FutureWarning instead of failing as an unknown field."""
    with pytest.warns(FutureWarning, match=r"'drop_blank_rows' is deprecated.*'drop_invalid_rows'"):
        params = gram_pipeline.validate_parameters({"overrides": ["data.eval.drop_blank_rows=true"]})
    assert params["overrides"].to_dict() == {"data": {"eval": {"drop_invalid_rows": True}}}
    with pytest.warns(FutureWarning, match=r"'drop_blank_rows' is deprecated"):
        params = gram_pipeline.validate_parameters({"overrides": {"data": {"response_pools": [
            {"path": "starter", "drop_blank_rows": True}]}}})
    pools = load_preset("smoke", params["overrides"].to_dict()).data.response_pools
    assert [p.drop_invalid_rows for p in pools] == [True]


def test_the_drop_invalid_rows_flag_reaches_the_sources_each_command_names():
    """run/study: every source of the preset; adapt: --data and the eval set (docs/operations.md §7)."""
    from flows.adapt import adapt_config
    from flows.pipeline import pipeline_config

    study = pipeline_config("study", None, drop_invalid_rows=True).data
    assert study.eval.drop_invalid_rows and study.preferences.drop_invalid_rows
    assert all(p.drop_invalid_rows for p in study.response_pools)
    assert not pipeline_config("demo", None).data.eval.drop_invalid_rows
    adapted = adapt_config("study", None, "few.jsonl", drop_invalid_rows=True).data
    assert adapted.preferences.path == "few.jsonl" and adapted.preferences.drop_invalid_rows
    assert adapted.eval.drop_invalid_rows
    plain = adapt_config("demo", ["data.preferences.max_dropped_share=0.2"], "few.jsonl").data.preferences
    assert not plain.drop_invalid_rows and plain.max_dropped_share == 0.2  # the preset's row policy carries over
    for flow in (gram_pipeline, adapt):
        assert flow.parameters.model_dump()["properties"]["drop_invalid_rows"]["default"] is False
