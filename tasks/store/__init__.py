"""The store: state folders and their locks, the artifact store, cache keys, gc and its per-run JSON records,
and the processes a run leaves behind. Imports neither Ray nor MLflow."""
