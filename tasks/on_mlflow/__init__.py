"""Everything that talks to MLflow: tracking (runs, params, metrics, artifacts), the model registry, the
promotion gate (a compare-and-set on the champion alias) and the pyfunc judge MLflow stores with a model."""
