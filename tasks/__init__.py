"""Floor 3: one Prefect task per pipeline stage at this level, and four rooms for the pieces they share.

sources (load_source) -> build_pairs -> pretrain -> finetune -> evaluate / eval_report -> register.

* ``tasks.store``: the state folder and its locks, the content-addressed artifact store, cache keys, gc, the
  per-run JSON records gc reads, and the processes a run leaves behind.
* ``tasks.on_ray``: the Ray runtime, the Ray Train driver and worker loop, the Ray Data judging actors.
* ``tasks.on_mlflow``: MLflow tracking, the model registry, the promotion gate and the pyfunc judge.
* ``tasks.serving``: the reward server (Ray Serve), its request shapes, and the RL frameworks' reward clients.

Stages exchange small ``ArtifactRef`` values pointing into the artifact store; the orchestration settings live
in ``tasks.settings``. Ray and MLflow are each imported only by the modules tests/test_layers.py allows
(``RAY_MODULES``, ``MLFLOW_MODULES``, each with the reason it needs the engine). Pure logic goes down to
gram_core. Modules are imported explicitly (``from tasks.finetune import finetune``): no package here imports
anything.
"""
