"""One Prefect task per pipeline stage, plus the pieces they share.

sources (load_source) -> build_pairs -> pretrain -> finetune -> evaluate / eval_report -> register.
Stages exchange small ``ArtifactRef`` values pointing into the content-addressed artifact store
(``tasks.artifacts``); cache keys are defined in ``tasks.caching``; the orchestration settings in
``tasks.settings``. Ray is imported only in ``tasks.ray_train``, ``tasks.ray_worker``, ``tasks.ray_runtime`` and
``tasks.ray_judge``; MLflow only in ``tasks.tracking``, ``tasks.model_registry`` and ``tasks.judge_pyfunc``.
Modules are imported explicitly (``from tasks.finetune import finetune``): this package imports nothing.
"""
