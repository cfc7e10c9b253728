"""Orchestration settings: Ray, MLflow, evaluation, the pipeline's sections, state folders, presets.

``PipelineConfig`` gathers every section a pipeline run needs: where state lives, the data sources, the
method configs of each stage (from ``gram_core.config``), Ray and MLflow. ``load_preset`` reads
``tasks/presets/<name>.yaml`` (or any YAML path) and applies ``key.path=value`` overrides on top; each stage
hashes only its own sections. The method's own configs stay in ``gram_core``; this module is plain data.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

import yaml

from gram_core.config import (
    BaselineConfig,
    ConfigError,
    EncodeConfig,
    JudgeConfig,
    ModelConfig,
    PretrainConfig,
    TrainConfig,
    check,
    field,
    from_dict,
    load_yaml,
    merge,
)
from gram_core.pairs import PairingConfig
from gram_core.sampling import SamplingConfig
from gram_core.sources import STARTER, SourceConfig

PRESETS_DIR = Path(__file__).resolve().parent / "presets"
DEFAULT_PRESET = "demo"


@dataclasses.dataclass(frozen=True)
class RayConfig:
    address: str | None = field(None, "Existing Ray cluster address ('auto', 'ray://host:10001', ...). "
                                "None: use RAY_ADDRESS if set, else start a local runtime sized to the machine "
                                "and shut it down afterwards.")
    num_workers: int = field(1, "Ray Train workers (data-parallel replicas).")
    cpus_per_worker: int = field(1, "CPUs reserved per worker.")
    use_gpu: str = field("auto", "'auto' (GPU only if the cluster has one), 'true' or 'false'.")
    storage_path: str | None = field(None, "Checkpoint storage every worker can reach (absolute path or URI). "
                                     "None: <GRAM_HOME>/ray_storage (fine for a local runtime).")
    object_store_memory_mb: int = field(512, "Object store size for a local runtime, in MB.")
    max_failures: int = field(0, "Worker-group restarts Ray Train attempts after a worker failure; each resumes "
                              "from the last checkpoint (raise it on clusters with preemptible nodes).")
    checkpoints_to_keep: int = field(2, "Checkpoints Ray Train keeps per run in storage_path (the newest; the "
                                     "final model checkpoint is always the newest). Bounds disk use.")

    def __post_init__(self) -> None:
        check(self.num_workers >= 1, "ray.num_workers", f"must be >= 1, got {self.num_workers}")
        check(self.cpus_per_worker >= 1, "ray.cpus_per_worker", "must be >= 1")
        check(self.checkpoints_to_keep >= 1, "ray.checkpoints_to_keep", f"must be >= 1, got {self.checkpoints_to_keep}")
        check(self.use_gpu in ("auto", "true", "false"), "ray.use_gpu",
              f"expected auto, true or false, got {self.use_gpu!r}")


@dataclasses.dataclass(frozen=True)
class MlflowConfig:
    tracking_uri: str | None = field(None, "Tracking URI. None: MLFLOW_TRACKING_URI if set, else "
                                     "sqlite:///<GRAM_HOME>/mlflow.db with artifacts in <GRAM_HOME>/mlartifacts.")
    experiment: str = field("gram", "MLflow experiment name.")
    model_name: str = field("gram-reward-model", "Registered model name.")
    promotion_metric: str = field("rewardbench/overall", "Eval metric the promotion gate compares.")
    promotion_margin: float = field(0.0, "Champion moves only if the candidate beats it by more than this.")

    def __post_init__(self) -> None:
        check(self.promotion_margin >= 0, "mlflow.promotion_margin", "must be >= 0")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    prompts: SourceConfig | None = field(None, "Prompts to sample policy responses for (columns prompt, "
                                         "optional prompt_id); None: no sampling, pairs come from the pools.")
    response_pools: tuple[SourceConfig, ...] = field((), "Existing response pools (response-pool contract) "
                                                     "whose responses are paired for stage 1.")
    unlabeled_pairs: tuple[SourceConfig, ...] = field((), "Ready-made stage-1 pairs (unlabeled-pairs contract, "
                                                      "e.g. a preference set with its labels ignored), used as-is.")
    preferences: SourceConfig = field(SourceConfig(path=STARTER), "Labeled preference pairs for stage 2 "
                                      "(preference-pairs contract: pair_id, prompt, chosen, rejected, source).")
    eval: SourceConfig = field(SourceConfig(path=STARTER, split="eval"), "Evaluation pairs in RewardBench's "
                               "schema (prompt, chosen, chosen_model, rejected, rejected_model, subset, id).")

    def dropping_invalid_rows(self, roles: tuple[str, ...] = ("prompts", "response_pools", "unlabeled_pairs",
                                                                "preferences", "eval")) -> DataConfig:
        """These sources (default: all) with ``drop_invalid_rows`` on (``--drop-invalid-rows``)."""
        def on(source: SourceConfig | None) -> SourceConfig | None:
            return None if source is None else dataclasses.replace(source, drop_invalid_rows=True)

        changes = {role: tuple(on(s) for s in getattr(self, role)) if isinstance(getattr(self, role), tuple)
                   else on(getattr(self, role)) for role in roles}
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    compare_base_zero_shot: bool = field(True, "Also score the base model zero-shot, for the comparison table.")
    limit: int = field(0, "Score at most this many eval pairs (seeded sample, stratified by subset) besides the "
                       "`full_subsets`, which are always scored in full; 0 = all.")
    full_subsets: tuple[str, ...] = field(("if-json", "count-compare"), "Eval subsets never sampled by `limit` "
                                          "(default: the starter's held-out families, gram_core.starter."
                                          "HELDOUT_SUBSETS): every pair is scored.")
    seed: int = field(0, "Seed of the `limit` sample.")
    actors: int = field(0, "Judge the eval set over this many Ray Data actors (one judge each, a GPU each when the "
                        "cluster has GPUs); 0 = score in the task's own process. Scores are the same either way.")

    def __post_init__(self) -> None:
        check(self.limit >= 0, "eval.limit", f"must be >= 0, got {self.limit}")
        check(self.actors >= 0, "eval.actors", f"must be >= 0, got {self.actors}")


STUDY_ARMS = ("zero_shot", "bt", "judge_no_stage1", "gram", "gram_eps0")  # gram_core.study_report.ARMS


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    arms: tuple[str, ...] = field(STUDY_ARMS, "Arms of `gram study`, from: zero_shot (the base model), bt "
                                  "(Bradley-Terry), judge_no_stage1 (stage 2 from the base model), gram (stage 1 + "
                                  "stage 2), gram_eps0 (the same with label smoothing 0). `gram` is always run.")
    match_total_steps: bool = field(True, "The judge without stage 1 takes finetune.max_steps + pretrain.max_steps "
                                    "stage-2 steps, so the ablation gets GRAM's total optimizer steps; false: "
                                    "finetune.max_steps, as every other arm.")

    def __post_init__(self) -> None:
        unknown = [a for a in self.arms if a not in STUDY_ARMS]
        check(not unknown, "study.arms", f"unknown arm(s) {unknown}; expected some of {list(STUDY_ARMS)}")
        check("gram" in self.arms, "study.arms", "must include 'gram' (the arm the others are compared with)")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    preset: str = field(DEFAULT_PRESET, "Name of the preset this config was loaded from (informational).")
    home: str | None = field(None, "State folder (artifacts, MLflow, Prefect results, Ray storage). None: "
                             "$GRAM_HOME, else ./.gram.")
    artifact_store: str | None = field(None, "Artifact store: a folder or any fsspec URI. None: <home>/artifacts.")
    data: DataConfig = field(DataConfig(), "Data sources.")
    sampling: SamplingConfig = field(SamplingConfig(), "Response sampling from policy models (build_pairs).")
    pairing: PairingConfig = field(PairingConfig(), "Pairing rules for unlabeled pairs (build_pairs).")
    model: ModelConfig = field(ModelConfig(), "Base model of the judge.")
    encode: EncodeConfig = field(EncodeConfig(), "Sequence encoding for training.")
    pretrain: PretrainConfig = field(PretrainConfig(learning_rate=1e-5), "Stage 1 training (unlabeled pairs).")
    finetune: TrainConfig = field(TrainConfig(), "Stage 2 training (labeled preference pairs).")
    baseline: BaselineConfig = field(BaselineConfig(), "Bradley-Terry baseline stage (off by default).")
    judge: JudgeConfig = field(JudgeConfig(), "Scoring with a judge (evaluation, the pyfunc model, CLI).")
    eval: EvalConfig = field(EvalConfig(), "Evaluation stage.")
    ray: RayConfig = field(RayConfig(), "Ray runtime for the training stages.")
    mlflow: MlflowConfig = field(MlflowConfig(), "MLflow tracking and model registry.")
    study: StudyConfig = field(StudyConfig(), "The arms of `gram study` (read by that flow only).")

    def __post_init__(self) -> None:
        sections = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for stage, train in ((k, v) for k, v in sections.items() if isinstance(v, TrainConfig)):  # the trained ones
            check(train.sharding == "none" or not self.model.lora_r, f"{stage}.sharding",
                  f"{train.sharding!r} does not support LoRA (model.lora_r={self.model.lora_r}); use sharding none "
                  "with LoRA (its trainable state is small) or model.lora_r 0")

    def resolved(self) -> PipelineConfig:
        """This config with `home` and `artifact_store` made absolute (env vars applied once, here)."""
        home = Path(self.home or os.environ.get("GRAM_HOME") or ".gram").expanduser().resolve()
        store = self.artifact_store or str(home / "artifacts")
        if "://" not in store:
            store = str(Path(store).expanduser().resolve())
        return dataclasses.replace(self, home=str(home), artifact_store=store)


@dataclasses.dataclass(frozen=True)
class StatePaths:
    """Where a resolved config keeps its state. Passed to whatever reads or writes it (tasks, Ray workers);
    nothing derives these folders from environment variables after the config is resolved."""

    home: Path
    artifact_store: str
    prefect_results: Path
    ray_storage: str

    @property
    def artifact_cache(self) -> Path:
        """Where remote artifacts are downloaded (and hash-checked) before use."""
        return self.home / "artifact-cache"


def state_paths(config: PipelineConfig) -> StatePaths:
    cfg = config.resolved()
    home = Path(cfg.home or ".gram")
    return StatePaths(home=home, artifact_store=str(cfg.artifact_store),
                      prefect_results=home / "prefect-results",
                      ray_storage=cfg.ray.storage_path or str(home / "ray_storage"))


@dataclasses.dataclass(frozen=True)
class StageSettings:
    """Everything one training stage needs besides its data and start model: frozen and hashable, so it is
    one input of the stage's cache key, and its MLflow params are derived from it (``params``)."""

    stage: str  # a training stage of gram_core.stages.STAGES
    model: ModelConfig
    train: TrainConfig
    encode: EncodeConfig
    runtime: RayConfig
    store: StatePaths  # artifacts, the artifact cache and Ray's checkpoint storage

    def params(self) -> dict[str, Any]:
        """The stage's MLflow params (each section flattened by the tracker)."""
        return {"model": self.model, "train": self.train, "encode": self.encode, "ray": self.runtime}


def stage_settings(config: PipelineConfig, stage: str) -> StageSettings:
    """The settings of training stage ``stage`` of ``config``: its TrainConfig comes from the config section its
    row of ``gram_core.stages.STAGES`` names (``stage_train_config``)."""
    from gram_core import stages  # torch: loaded when a stage's settings are built, not with the CLI

    known = stages.TRAINING_STAGES
    check(stage in known, "stage", f"unknown training stage {stage!r}; expected one of {list(known)}")
    train = getattr(config, known[stage].section).stage_train_config(config)
    return StageSettings(stage=stage, model=config.model, train=train, encode=config.encode,
                         runtime=config.ray, store=state_paths(config))


# --------------------------------------------------------------------------------------------------
# Presets and overrides
# --------------------------------------------------------------------------------------------------


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def preset_path(name_or_path: str | Path) -> Path:
    """A preset name ('smoke', 'demo', 'paper') or a path to a YAML file."""
    candidate = Path(name_or_path).expanduser()
    if candidate.suffix in (".yaml", ".yml"):
        check(candidate.is_file(), "preset", f"config file {candidate} does not exist")
        return candidate
    path = PRESETS_DIR / f"{name_or_path}.yaml"
    check(path.is_file(), "preset", f"unknown preset {name_or_path!r}; known presets: {preset_names()} "
          "(or pass a path to a .yaml file)")
    return path


_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def parse_value(text: str) -> Any:
    """A command-line value as YAML would read it, with '1e-4' read as a number (YAML 1.1 reads a string)."""
    if _NUMBER.match(text.strip()):
        number = float(text)
        return int(number) if re.fullmatch(r"[+-]?\d+", text.strip()) else number
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"cannot parse override value {text!r}: {err}") from err


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """['finetune.learning_rate=1e-4', 'eval.limit=20'] -> nested dict {'finetune': {'learning_rate': ...}}."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        check(bool(sep) and bool(key.strip()), "--set", f"expected key.path=value, got {item!r}")
        parts = key.strip().split(".")
        nested: Any = parse_value(value)
        for part in reversed(parts):
            nested = {part: nested}
        out = merge(out, nested)
    return out


def load_preset(name_or_path: str | Path = DEFAULT_PRESET,
                overrides: dict[str, Any] | list[str] | tuple[str, ...] | None = None) -> PipelineConfig:
    """Load a preset (name or YAML path), deep-merge ``overrides`` (a nested dict or 'a.b=v' strings)."""
    if isinstance(overrides, (list, tuple)):
        overrides = parse_overrides(overrides)
    path = preset_path(name_or_path)
    extra = {"preset": str(name_or_path) if path.parent != PRESETS_DIR else path.stem}
    return load_yaml(PipelineConfig, path, merge(extra, overrides or {}))


def config_from_dict(data: dict[str, Any]) -> PipelineConfig:
    """Rebuild a PipelineConfig from ``to_dict`` output (e.g. a deployment parameter)."""
    return from_dict(PipelineConfig, data)
