"""Pipeline config: presets load and validate, overrides parse and merge, state paths resolve."""

from __future__ import annotations

import dataclasses

import pytest

from gram_core.config import ConfigError, PretrainConfig, TrainConfig, config_hash, describe, to_dict
from gram_core.sources import SourceConfig
from tasks.settings import (
    PipelineConfig,
    config_from_dict,
    load_preset,
    parse_overrides,
    parse_value,
    preset_names,
    state_paths,
)


def test_presets_exist_and_load():
    assert preset_names() == ["demo", "paper", "smoke", "study", "study-gpu"]
    for name in ("study", "study-gpu"):  # the real-data study: paths into ../shared/data, BT arm on
        study = load_preset(name)
        assert study.data.eval.path.endswith("rewardbench_lite.parquet") and study.baseline.enabled
    smoke, demo, paper = (load_preset(n) for n in ("smoke", "demo", "paper"))
    assert smoke.preset == "smoke" and smoke.model.source == "tiny" and smoke.sampling.models == ("tiny",)
    assert demo.model.source == "smollm2" and demo.data.preferences.is_starter and demo.data.eval.is_starter
    assert demo.model.dtype == "float32" and demo.finetune.precision == "fp32"
    # docs/stage2.md: both orders in each batch, a learning rate that moves the damped verdict margin
    assert demo.encode.order == "both" and demo.finetune.learning_rate == 1e-3 and demo.baseline.enabled
    # The paper recipe (METHOD.md sections 2-3): global batch = batch x accumulation x workers.
    assert (paper.pretrain.learning_rate, paper.finetune.learning_rate) == (1e-5, 2e-5)
    assert paper.finetune.label_smoothing == 0.1 and paper.encode.max_length == 2048
    assert paper.pretrain.batch_size * paper.pretrain.grad_accum_steps * paper.ray.num_workers == 256
    assert paper.finetune.batch_size * paper.finetune.grad_accum_steps * paper.ray.num_workers == 128
    assert paper.pretrain.precision == paper.finetune.precision == "bf16"
    assert paper.data.eval.hub == "allenai/reward-bench" and paper.data.eval.split == "filtered"
    assert paper.data.preferences.hub == "Skywork/Skywork-Reward-Preference-80K-v0.2"
    assert paper.data.unlabeled_pairs[0].hub == "llm-blender/Unified-Feedback"


def test_overrides_parse_types_and_merge():
    assert parse_value("1e-4") == 1e-4 and parse_value("3") == 3 and parse_value("true") is True
    assert parse_value("null") is None and parse_value("[a, b]") == ["a", "b"] and parse_value("tiny") == "tiny"
    nested = parse_overrides(["finetune.learning_rate=1e-4", "finetune.max_steps=7", "data.prompts=null"])
    assert nested == {"finetune": {"learning_rate": 1e-4, "max_steps": 7}, "data": {"prompts": None}}
    cfg = load_preset("smoke", ["finetune.learning_rate=1e-4", "data.eval.limit=5", "sampling.models=[tiny, tiny]"])
    assert cfg.finetune.learning_rate == 1e-4 and cfg.data.eval.limit == 5
    assert cfg.sampling.models == ("tiny", "tiny")
    assert cfg.pretrain == load_preset("smoke").pretrain  # untouched sections stay equal


def test_bad_config_names_the_field():
    with pytest.raises(ConfigError, match="unknown key.*learning_rat"):
        load_preset("smoke", ["finetune.learning_rat=1"])
    with pytest.raises(ConfigError, match="label_smoothing"):
        load_preset("smoke", ["finetune.label_smoothing=1.5"])
    with pytest.raises(ConfigError, match="unknown preset 'nope'.*smoke"):
        load_preset("nope")
    with pytest.raises(ConfigError, match="key.path=value"):
        parse_overrides(["finetune.learning_rate"])
    with pytest.raises(ConfigError, match="exactly one of `path` or `hub`"):
        SourceConfig(path="a.parquet", hub="org/set")


def test_stage_hashes_are_independent():
    base = load_preset("smoke")
    changed = load_preset("smoke", ["finetune.learning_rate=5e-3"])
    assert config_hash(base.finetune) != config_hash(changed.finetune)
    for section in ("pretrain", "model", "encode", "sampling", "pairing", "data", "judge", "baseline"):
        assert config_hash(getattr(base, section)) == config_hash(getattr(changed, section)), section


def test_baseline_is_off_by_default_and_takes_stage_2_settings():
    from tasks.settings import PipelineConfig

    assert not PipelineConfig().baseline.enabled and not load_preset("smoke").baseline.enabled
    cfg = load_preset("smoke", ["baseline.enabled=true"])
    assert cfg.baseline.enabled and cfg.baseline.train_config(cfg.finetune) == cfg.finetune
    own = load_preset("smoke", ["baseline.learning_rate=3e-4"]).baseline.train_config(cfg.finetune)
    assert own.learning_rate == 3e-4 and own.max_steps == cfg.finetune.max_steps
    fewer = load_preset("smoke", ["baseline.max_steps=3"]).baseline.train_config(cfg.finetune)
    assert fewer.max_steps == 3 and fewer.learning_rate == cfg.finetune.learning_rate
    with pytest.raises(ConfigError, match="baseline.max_steps"):
        load_preset("smoke", ["baseline.max_steps=-1"])
    with pytest.raises(ConfigError, match="baseline.learning_rate"):
        load_preset("smoke", ["baseline.learning_rate=0"])


def test_pretrain_config_drops_enabled_for_the_trainer():
    cfg = PretrainConfig(learning_rate=3e-5, enabled=False, max_steps=4)
    plain = cfg.train_config()
    assert type(plain) is TrainConfig and plain.learning_rate == 3e-5 and plain.max_steps == 4
    assert "enabled" not in to_dict(plain)


def test_round_trip_through_dict():
    cfg = load_preset("paper")
    assert config_from_dict(to_dict(cfg)) == cfg


def test_state_paths_follow_gram_home(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAM_HOME", str(tmp_path / "state"))
    paths = state_paths(load_preset("smoke"))
    assert paths.home == tmp_path / "state"
    assert paths.artifact_store == str(tmp_path / "state" / "artifacts")
    assert paths.prefect_results == tmp_path / "state" / "prefect-results"
    assert paths.ray_storage == str(tmp_path / "state" / "ray_storage")
    remote = state_paths(load_preset("smoke", ["artifact_store=s3://bucket/gram"]))
    assert remote.artifact_store == "s3://bucket/gram"


def test_every_field_has_help():
    rows = describe(PipelineConfig)
    assert len(rows) > 60
    missing = [name for name, _default, text in rows if not text.strip()]
    assert missing == []
    assert any(name == "finetune.label_smoothing" for name, _d, _h in rows)
    assert dataclasses.is_dataclass(PipelineConfig)


def test_stage_settings_are_frozen_hashable_and_carry_the_mlflow_params():
    from tasks.settings import stage_settings

    cfg = load_preset("demo", ["finetune.max_steps=240", "baseline.learning_rate=2e-4"]).resolved()
    finetune = stage_settings(cfg, "finetune")
    assert finetune.train.max_steps == 240 and finetune.store == state_paths(cfg)
    assert hash(finetune) == hash(stage_settings(cfg, "finetune"))  # a cache-key input: equal settings, equal hash
    with pytest.raises(dataclasses.FrozenInstanceError):
        finetune.stage = "pretrain"
    assert finetune.params() == {"model": cfg.model, "train": cfg.finetune, "encode": cfg.encode, "ray": cfg.ray}
    bt = stage_settings(cfg, "bradley_terry")
    assert bt.train == dataclasses.replace(cfg.finetune, learning_rate=2e-4, max_steps=cfg.baseline.max_steps)
    assert cfg.baseline.max_steps == 60  # the demo gives BT fewer steps than stage 2 (its loss leaves ln 2 early)
    assert type(stage_settings(cfg, "pretrain").train) is TrainConfig  # without stage 1's `enabled`
    with pytest.raises(ConfigError, match="unknown training stage 'judge'"):
        stage_settings(cfg, "judge")


def test_drop_blank_rows_is_the_deprecated_name_of_drop_invalid_rows(tmp_path):
    """Presets and --set written for drop_blank_rows keep working (FutureWarning); both names at once is an error."""
    preset = tmp_path / "old.yaml"
    preset.write_text("data:\n  preferences: {path: starter, drop_blank_rows: true}\n"
                      "  response_pools:\n    - {path: starter, drop_blank_rows: true}\n")
    with pytest.warns(FutureWarning, match=r"config key 'drop_blank_rows' is deprecated .* use 'drop_invalid_rows'"):
        config = load_preset(preset)
    assert config.data.preferences.drop_invalid_rows and config.data.response_pools[0].drop_invalid_rows
    with pytest.warns(FutureWarning):
        assert load_preset("demo", ["data.eval.drop_blank_rows=true"]).data.eval.drop_invalid_rows
    with pytest.raises(ConfigError, match=r"drop_blank_rows: deprecated name of 'drop_invalid_rows'; set only"):
        load_preset("demo", ["data.eval.drop_blank_rows=true", "data.eval.drop_invalid_rows=false"])
    assert "drop_blank_rows" not in {key.rsplit(".", 1)[-1] for key, _, _ in describe(PipelineConfig)}
    with pytest.raises(ConfigError, match=r"max_dropped_share: must be a share in \[0, 1\], got 5"):
        load_preset("demo", ["data.eval.max_dropped_share=5"])


def test_drop_invalid_rows_on_every_source_or_some():
    data = load_preset("study").data
    assert not data.eval.drop_invalid_rows
    every = data.dropping_invalid_rows()
    assert every.eval.drop_invalid_rows and every.preferences.drop_invalid_rows
    assert all(p.drop_invalid_rows for p in every.response_pools) and every.prompts is None
    some = data.dropping_invalid_rows(("eval",))
    assert some.eval.drop_invalid_rows and some.preferences == data.preferences
