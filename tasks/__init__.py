"""One Prefect task per pipeline stage, plus the pieces they share.

sources (load_source) -> build_pairs -> pretrain -> finetune -> evaluate / eval_report -> register.
Stages exchange small ``ArtifactRef`` values pointing into the content-addressed artifact store
(``tasks.artifacts``); cache keys are defined in ``tasks.caching``; the orchestration settings in
``tasks.settings``. Ray and MLflow are each imported only by the modules tests/test_layers.py allows
(``RAY_MODULES``, ``MLFLOW_MODULES``, each with the reason it needs the engine).
Modules are imported explicitly (``from tasks.finetune import finetune``): this package imports nothing.
"""
