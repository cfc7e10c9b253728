"""Distributed scoring: ``gram_core.scorers.score_table`` fanned out over a Ray cluster with Ray Data
(``map_batches`` with an actor pool, one scorer per actor, opened by ``gram_core.scorers.open_scorer``: a GRAM
judge, a base model zero-shot or a Bradley-Terry reward model)."""

from __future__ import annotations

import tempfile
from typing import Any

from gram_core.config import from_dict, to_dict
from tasks.on_ray.runtime import local_copy, ray_runtime, reachable_uri, wants_gpu
from tasks.settings import RayConfig, StatePaths

ROW_COLUMN = "__gram_row"
SCALAR_COLUMN = "__gram_scalar"  # the scorer is a scalar reward model (one order): said by the actors


class _JudgeActor:
    """One scorer per Ray Data actor (on its GPU when it has one): scores a block of eval rows."""

    def __init__(self, folder: str, judge: dict, threads: int) -> None:
        import torch

        from gram_core.config import JudgeConfig
        from gram_core.scorers import open_scorer

        torch.set_num_threads(threads)
        with local_copy(folder, tempfile.mkdtemp(prefix="gram-judge-")) as local:
            self.scorer = open_scorer(local, from_dict(JudgeConfig, judge))

    def __call__(self, batch):
        import pyarrow as pa

        from gram_core.scorers import is_scalar, score_table

        scored = score_table(self.scorer, batch).append_column(ROW_COLUMN, batch[ROW_COLUMN])
        return scored.append_column(SCALAR_COLUMN, pa.array([is_scalar(self.scorer)] * scored.num_rows, pa.bool_()))


def score_pairs_distributed(folder: str, table, judge: Any, actors: int, ray_cfg: RayConfig | None = None,
                            state: StatePaths | None = None):
    """(scores-contract table, scalar?): ``gram_core.scorers.score_table`` fanned out over ``actors`` Ray Data
    actors (``map_batches`` with an actor pool), returned in the input's row order; ``scalar`` is True for a
    Bradley-Terry model, as the actors say (False for an empty table: no actor opens the model). Each pair's two orders are scored by
    the same actor and every sequence's logits do not depend on its batch-mates (right padding, masked), so the
    scores are the single-process ones up to float rounding in differently shaped batches. ``folder`` (a path or
    fsspec URI) must be reachable from every node. A local runtime started here is recorded in ``state``'s
    folder (``ray_runtime``)."""
    import pyarrow as pa
    import ray.data

    from data_contracts import SCORES

    ray_cfg = ray_cfg or RayConfig()
    if table.num_rows == 0:
        return SCORES.schema.empty_table(), False
    rows = table.append_column(ROW_COLUMN, pa.array(range(table.num_rows), pa.int64()))
    with ray_runtime(ray_cfg, state):
        gpus = 1 if wants_gpu(ray_cfg.use_gpu) else 0
        per_actor = -(-table.num_rows // actors)  # ceil: one block, one batch per actor
        blocks = [rows.slice(start, per_actor) for start in range(0, table.num_rows, per_actor)]
        dataset = ray.data.from_arrow(blocks).map_batches(
            _JudgeActor, fn_constructor_args=(reachable_uri(folder), to_dict(judge), ray_cfg.cpus_per_worker),
            batch_size=None, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=ray_cfg.cpus_per_worker, num_gpus=gpus)
        scored = pa.concat_tables(ray.get(dataset.to_arrow_refs()))
    scalar = bool(scored.column(SCALAR_COLUMN)[0].as_py())
    scored = scored.sort_by(ROW_COLUMN).drop_columns([ROW_COLUMN, SCALAR_COLUMN])
    return scored.select(SCORES.schema.names).cast(SCORES.schema), scalar
