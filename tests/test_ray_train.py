"""tasks.ray_train on a local Ray runtime: 1- and 2-worker fine-tuning of a tiny model, and resuming."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM

from gram_core.config import EncodeConfig, ModelConfig, TrainConfig
from gram_core.models import tiny_model_dir
from gram_core.pipeline_config import RayConfig

ray = pytest.importorskip("ray")

LETTERS = "bcdfghjklmnpqrstvwxz"


def toy_rows(n, seed):
    rng = np.random.default_rng(seed)

    def filler():
        return " ".join(rng.choice(list(LETTERS), size=int(rng.integers(3, 7))))

    return [{"pair_id": f"p{i}", "prompt": filler(), "chosen": "better " + filler(), "rejected": filler(),
             "source": "toy"} for i in range(n)]


@pytest.fixture(scope="module")
def ray_cluster():
    """One local runtime for the module (each start costs ~8 s); fit() uses it and leaves it running."""
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.2"
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024 * 1024, _temp_dir="/tmp/ray")
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


def test_two_workers_finetune_the_judge(ray_cluster, start_model, tmp_path):
    from tasks.ray_train import fit

    data = tmp_path / "prefs.parquet"
    pq.write_table(pa.Table.from_pylist(toy_rows(24, seed=1)), data)
    train_cfg = TrainConfig(learning_rate=1e-3, batch_size=2, max_steps=3)  # global batch 2 x 2 workers
    result = fit("finetune", model_source=start_model, model_cfg=ModelConfig(source="tiny"), train_cfg=train_cfg,
                 encode_cfg=EncodeConfig(max_length=512), data_path=str(data), output_dir=str(tmp_path / "judge"),
                 ray_cfg=RayConfig(num_workers=2), storage_path=str(tmp_path / "storage"), run_name="judge-2w")
    assert result["completed"] and result["steps"] == 3 and result["resumed_from_step"] == 0
    lines = [json.loads(x) for x in (tmp_path / "judge" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3] and 0 <= lines[-1]["train/accuracy"] <= 1
    assert result["final_metrics"] == lines[-1]
    assert changed_fraction(tmp_path / "judge", start_model) == 1.0  # full fine-tuning moves every tensor
    state = json.loads((tmp_path / "storage" / "judge-2w" / "checkpoint-3" / "trainer_state.json").read_text())
    assert result["checkpoint"] == str(tmp_path / "storage" / "judge-2w" / "checkpoint-3")
    assert state["global_batch"] == 4  # two ranks, each sharding 2 examples per step


def test_lora_pretrain_stops_and_resumes_under_the_same_run_name(ray_cluster, start_model, tmp_path):
    from tasks.ray_train import fit

    rows = [{"pair_id": r["pair_id"], "prompt": r["prompt"], "response_a": r["chosen"], "response_b": r["rejected"],
             "source": "toy"} for r in toy_rows(16, seed=2)]
    data = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(rows), data)
    common = dict(model_source=start_model, model_cfg=ModelConfig(source="tiny", lora_r=4),
                  train_cfg=TrainConfig(learning_rate=1e-2, batch_size=4, max_steps=4, checkpoint_every_steps=2),
                  encode_cfg=EncodeConfig(max_length=256), data_path=str(data), output_dir=str(tmp_path / "lm"),
                  ray_cfg=RayConfig(num_workers=1), storage_path=str(tmp_path / "storage"), run_name="lm-1w")
    first = fit("pretrain", stop_at_step=2, **common)  # an "interrupted" run: checkpoint at step 2, no model
    assert not first["completed"] and first["steps"] == 2 and not (tmp_path / "lm").exists()

    second = fit("pretrain", **common)
    assert second["completed"] and second["resumed_from_step"] == 2 and second["steps"] == 4
    lines = [json.loads(x) for x in (tmp_path / "lm" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4]
    assert lines[1]["train/loss"] == first["final_metrics"]["train/loss"]  # steps 1-2 come from the checkpoint
    assert 0 < changed_fraction(tmp_path / "lm", start_model) < 1.0  # merged LoRA moves only adapted matrices
