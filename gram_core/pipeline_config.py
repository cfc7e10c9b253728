"""Pipeline-level configuration (plain data; the tasks that use it import Ray/MLflow, this module doesn't)."""

from __future__ import annotations

import dataclasses

from gram_core.config import check, field


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
    max_failures: int = field(1, "Worker-group restarts Ray Train attempts; each resumes from the last checkpoint.")

    def __post_init__(self) -> None:
        check(self.num_workers >= 1, "ray.num_workers", f"must be >= 1, got {self.num_workers}")
        check(self.cpus_per_worker >= 1, "ray.cpus_per_worker", "must be >= 1")
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
