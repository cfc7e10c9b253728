"""tasks.on_ray.train on a local Ray runtime: 1- and 2-worker fine-tuning of a tiny model, resuming, the model
coming back through Ray's checkpoint storage (workers may not write to the driver's folder), live metrics."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray  # a plain import: an import bug must fail, not skip
import torch
from toy_data import better_pairs
from transformers import AutoModelForCausalLM

from gram_core.config import EncodeConfig, ModelConfig, TrainConfig
from gram_core.models import tiny_model_dir
from tasks.settings import RayConfig, StageSettings, StatePaths


def state_at(home, ray_storage):
    """State folders under ``home`` with Ray's checkpoint storage at ``ray_storage``."""
    return StatePaths(home=home, artifact_store=str(home / "artifacts"), prefect_results=home / "prefect-results",
                      ray_storage=str(ray_storage))

def toy_rows(n, seed):
    return better_pairs(n, seed, source="toy")


DRIVER_ONLY = "driver-only"  # Ray workers of this module may not write under a folder of this name


def write_guard():
    """A Ray worker setup hook that installs an audit hook refusing any write under a DRIVER_ONLY folder (as
    root, file permissions would not stop a worker; a worker on another node could not reach it at all).
    Built in a function so that Ray pickles it by value (workers cannot import this test module)."""
    marker = DRIVER_ONLY

    def deny_driver_only_writes():
        import os
        import sys

        def writes(path):
            return marker in os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else False

        def hook(event, args):
            if event == "open" and writes(args[0]):
                mode, flags = args[1], args[2]
                if (mode and any(c in mode for c in "wax+")) or (mode is None and flags & (os.O_WRONLY | os.O_RDWR)):
                    raise PermissionError(f"worker may not write {args[0]}")
            elif event in ("os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir") and any(
                    writes(a) for a in args[:2]):
                raise PermissionError(f"worker may not {event} {args[:2]}")

        sys.addaudithook(hook)

    return deny_driver_only_writes


@pytest.fixture(scope="module")
def ray_cluster():
    """One local runtime for the module (each start costs ~8 s); fit() uses it and leaves it running."""
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.2"
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024 * 1024, _temp_dir="/tmp/ray",
             runtime_env={"worker_process_setup_hook": write_guard()})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def start_model():
    return str(tiny_model_dir(seed=0))


def weights(folder):
    return dict(AutoModelForCausalLM.from_pretrained(folder).named_parameters())


def changed_fraction(folder, start):
    before, after = weights(start), weights(folder)
    assert before.keys() == after.keys()
    return np.mean([not torch.equal(before[n], after[n]) for n in before])


def test_lora_pretrain_stops_and_resumes_under_the_same_run_name(ray_cluster, start_model, tmp_path):
    from tasks.on_ray.train import fit

    rows = [{"pair_id": r["pair_id"], "prompt": r["prompt"], "response_a": r["chosen"], "response_b": r["rejected"],
             "source": "toy"} for r in toy_rows(16, seed=2)]
    data = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(rows), data)
    settings = StageSettings("pretrain", model=ModelConfig(source="tiny", lora_r=4),
                             train=TrainConfig(learning_rate=1e-2, batch_size=4, max_steps=4, checkpoint_every_steps=2),
                             encode=EncodeConfig(max_length=256), runtime=RayConfig(num_workers=1),
                             store=state_at(tmp_path, tmp_path / "storage"))
    common = dict(model_source=start_model, data_path=str(data), output_dir=str(tmp_path / "lm"), run_name="lm-1w")
    first = fit(settings, stop_at_step=2, **common)  # an "interrupted" run: checkpoint at step 2, no model
    assert not first["completed"] and first["steps"] == 2 and not (tmp_path / "lm").exists()

    second = fit(settings, **common)
    assert second["completed"] and second["resumed_from_step"] == 2 and second["steps"] == 4
    lines = [json.loads(x) for x in (tmp_path / "lm" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4]
    assert lines[1]["train/loss"] == first["final_metrics"]["train/loss"]  # steps 1-2 come from the checkpoint
    assert 0 < changed_fraction(tmp_path / "lm", start_model) < 1.0  # merged LoRA moves only adapted matrices


@pytest.mark.parametrize("sharding", ["none", "fsdp"])
def test_two_workers_finetune_and_return_the_model_through_storage_with_live_metrics(ray_cluster, start_model,
                                                                                      tmp_path, mlflow_root, sharding):
    from tasks.on_mlflow import tracking
    from tasks.on_ray.train import fit
    from tasks.settings import MlflowConfig

    @ray.remote(num_cpus=0)
    def try_write(folder):
        try:
            (folder / "probe").write_text("x")
        except PermissionError:
            return "denied"
        return "written"

    driver = tmp_path / DRIVER_ONLY
    driver.mkdir()
    assert ray.get(try_write.remote(driver)) == "denied"  # the guard works in Ray workers
    data = tmp_path / "prefs.parquet"
    pq.write_table(pa.Table.from_pylist(toy_rows(16, seed=3)), data)
    progress = []
    with tracking.start_pipeline_run(MlflowConfig(experiment="live"), mlflow_root, "parent") as parent, \
            tracking.stage_run("finetune", parent=parent) as stage:
        settings = StageSettings("finetune", model=ModelConfig(source="tiny"),  # global batch 2 workers x 2
                                 train=TrainConfig(learning_rate=1e-3, batch_size=2, max_steps=4,
                                                   checkpoint_every_steps=2, sharding=sharding),
                                 encode=EncodeConfig(max_length=512),
                                 runtime=RayConfig(num_workers=2, checkpoints_to_keep=1),
                                 store=state_at(tmp_path, tmp_path / "storage"))
        result = fit(settings, model_source=start_model, data_path=data.as_uri(), output_dir=str(driver / "judge"),
                     run_name="judge-guarded", tracking=stage,
                     on_progress=lambda step, fraction: progress.append((step, fraction)))
        points = tracking.MlflowClient(stage.tracking_uri).get_metric_history(stage.run_id, "train/loss")
    assert result["completed"] and result["steps"] == 4 and result["resumed_from_step"] == 0
    assert changed_fraction(driver / "judge", start_model) == 1.0  # full fine-tuning moves every tensor
    storage = tmp_path / "storage" / "judge-guarded"
    assert result["checkpoint"] == str(storage / "model-4")  # the final model checkpoint
    kept = [d for d in os.listdir(storage) if d.startswith(("model-", "checkpoint-"))]
    assert kept == ["model-4"]  # checkpoints_to_keep=1: checkpoint-2 and checkpoint-4 were deleted
    lines = [json.loads(x) for x in (driver / "judge" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4] and 0 <= lines[-1]["train/accuracy"] <= 1
    assert result["final_metrics"] == lines[-1]
    assert [(p.step, p.value) for p in sorted(points, key=lambda p: p.step)] == \
        [(x["step"], x["train/loss"]) for x in lines]  # logged by rank 0, one point per step
    assert len({p.timestamp for p in points}) == 4  # as each step happened, not in one batch afterwards
    assert progress == [(1, 0.25), (2, 0.5), (3, 0.75), (4, 1.0)]


def test_an_incomplete_result_is_refused():
    from types import SimpleNamespace

    from tasks.on_ray.train import IncompleteTrainingError, collect_model

    with pytest.raises(IncompleteTrainingError, match="without a complete model"):
        collect_model(SimpleNamespace(error=None, metrics={"step": 3}, checkpoint=None), "/nonexistent", "r")
    with pytest.raises(RuntimeError, match="boom"):
        collect_model(SimpleNamespace(error=RuntimeError("boom"), metrics={}, checkpoint=None), "/nonexistent", "r")


def eval_table(n, seed):
    rows = toy_rows(n, seed=seed)
    return pa.Table.from_pylist([{"id": r["pair_id"], "subset": f"s{i % 3}", "prompt": r["prompt"],
                                  "chosen": r["chosen"], "rejected": r["rejected"]} for i, r in enumerate(rows)])


def assert_same_scores(spread, single, atol):
    assert spread.schema == single.schema and spread["id"].to_pylist() == single["id"].to_pylist()
    assert spread["correct"].to_pylist() == single["correct"].to_pylist()
    for column in ("p_chosen_order1", "p_chosen_order2", "p_chosen"):
        np.testing.assert_allclose(spread[column].to_numpy(), single[column].to_numpy(), rtol=0, atol=atol)


def test_distributed_judging_gives_the_single_process_scores(ray_cluster, start_model):
    from gram_core.config import JudgeConfig
    from gram_core.scorers import open_scorer, score_table
    from tasks.on_ray.judge import score_pairs_distributed

    table = eval_table(11, seed=4)  # odd: the two actors get blocks of 6 and 5 pairs
    judge = JudgeConfig(batch_size=4, max_length=512)
    single = score_table(open_scorer(start_model, judge), table)
    spread, scalar = score_pairs_distributed(start_model, table, judge, actors=2, ray_cfg=RayConfig())
    assert scalar is False
    assert_same_scores(spread, single, atol=1e-6)


def test_distributed_scoring_reads_a_bradley_terry_model(ray_cluster, tmp_path):
    """The actors open a scorer as every caller does (open_scorer), so a BT folder is scored by its reward head,
    one order, and said to be scalar: the same scores as in this process."""
    from gram_core.baseline import BTScorer, RewardModel
    from gram_core.config import JudgeConfig
    from gram_core.models import build_tiny_model, build_tiny_tokenizer
    from gram_core.scorers import folder_kind, open_scorer, score_table
    from tasks.on_ray.judge import score_pairs_distributed

    tokenizer = build_tiny_tokenizer()
    folder = str(BTScorer(RewardModel(build_tiny_model(tokenizer, seed=0), seed=3), tokenizer, max_length=256)
                 .save(tmp_path / "bt"))
    assert folder_kind(folder) == "bradley_terry"
    table = eval_table(7, seed=5)
    judge = JudgeConfig(batch_size=4, max_length=512)
    single = score_table(open_scorer(folder, judge), table)
    spread, scalar = score_pairs_distributed(folder, table, judge, actors=2, ray_cfg=RayConfig())
    assert scalar is True
    assert_same_scores(spread, single, atol=1e-6)
    # one order: both "orders" are σ(r_chosen − r_rejected), not a judge's two slot readings
    np.testing.assert_array_equal(spread["p_chosen_order1"].to_numpy(), spread["p_chosen_order2"].to_numpy())
