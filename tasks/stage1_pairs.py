"""Stage 1 data (the ``build_pairs`` task): sample responses from policy models and/or take response pools,
then pair them up (``gram_core.pairs``)."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from gram_core.artifact_files import POOL_FILE
from gram_core.pairs import PairingConfig
from gram_core.sampling import SamplingConfig
from tasks.progress import ProgressLog
from tasks.redaction import scrub_errors
from tasks.retries import HUB_RETRIES
from tasks.settings import StatePaths
from tasks.store.artifacts import ArtifactRef, open_store, read_table_artifact, write_table_artifact
from tasks.store.caching import STAGE_CACHE_POLICY, stage_logger


def generator_name(source: str) -> str:
    """The `generator` column value for a policy model source (a folder's name, or the source as given)."""
    return Path(source).name if "/" in source or Path(source).exists() else source


def sample_pool(prompts, sampling: SamplingConfig, log):
    """Sample ``sampling.k`` responses per prompt from every model in ``sampling.models``."""
    import pyarrow as pa

    from gram_core.config import ModelConfig
    from gram_core.models import load_model
    from gram_core.sampling import sample_responses

    texts = prompts["prompt"].to_pylist()
    tables = []
    for source in sampling.models:
        model, tokenizer = load_model(ModelConfig(source=source))
        name = generator_name(source)
        log.info("sampling %d x %d responses from %s", len(texts), sampling.k, name)
        tables.append(sample_responses(
            model, tokenizer, texts, k=sampling.k, temperature=sampling.temperature, top_p=sampling.top_p,
            max_new_tokens=sampling.max_new_tokens, seed=sampling.seed, batch_size=sampling.batch_size,
            generator_name=name, progress=ProgressLog(log, f"sampling {name}")))
        del model
    return pa.concat_tables([t.replace_schema_metadata(None) for t in tables])


def pool_pairs(pool, pairing: PairingConfig):
    """Pair a validated response pool; (pairs table, stats)."""
    from gram_core import pairs as pairing_lib

    table, stats = pairing_lib.build_pairs(pool, pairing)
    if table.num_rows == 0:
        raise ValueError(f"build_pairs: the pairing rules produced no pairs from {pool.num_rows} responses "
                         f"({pairing}); sample more responses per prompt or relax the rules")
    return table, {"responses": pool.num_rows, **{k: int(v) for k, v in stats.items()}}


@task(name="build_pairs", cache_policy=STAGE_CACHE_POLICY, persist_result=True, **HUB_RETRIES)
@scrub_errors
def build_stage1_pairs(prompts: ArtifactRef | None, pools: list[ArtifactRef], pair_sets: list[ArtifactRef],
                       sampling: SamplingConfig, pairing: PairingConfig, state: StatePaths) -> ArtifactRef:
    """Unlabeled pairs (stage-1 data): sampled responses and pools paired up, plus ready-made pair sets."""
    import pyarrow as pa

    from data_contracts import RESPONSE_POOL, UNLABELED_PAIRS, validate

    log = stage_logger()
    store = open_store(state)
    responses = [read_table_artifact(store, ref) for ref in pools]
    if prompts is not None:
        responses.append(sample_pool(read_table_artifact(store, prompts), sampling, log))
    if not responses and not pair_sets:
        raise ValueError("build_pairs: nothing to build pairs from; set data.prompts (with sampling.models), "
                         "data.response_pools and/or data.unlabeled_pairs")
    tables, stats, extra = [read_table_artifact(store, ref) for ref in pair_sets], {}, {}
    if responses:
        pool = validate(pa.concat_tables([validate(t, RESPONSE_POOL) for t in responses]), RESPONSE_POOL,
                        source="build_pairs: response pool")
        paired, stats = pool_pairs(pool, pairing)
        tables.append(paired)
        extra[POOL_FILE] = (pool, RESPONSE_POOL)
    table = validate(pa.concat_tables([validate(t, UNLABELED_PAIRS) for t in tables]), UNLABELED_PAIRS,
                     source="build_pairs: unlabeled pairs")
    stats["ready_made_pairs"] = sum(ref.rows or 0 for ref in pair_sets)
    ref = write_table_artifact(store, "build_pairs", table, UNLABELED_PAIRS, meta=stats, extra_tables=extra)
    log.info("build_pairs: %d pairs (%s) -> %s", ref.rows, stats, ref.uri)
    return ref
