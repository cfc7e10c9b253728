"""Registry helpers shared by tests/test_registry.py and tests/test_gate_races.py: bare versions with eval
tags, alias reads, and the store's tracking URI."""

from __future__ import annotations

from mlflow import MlflowClient


def alias_version(client: MlflowClient, name: str, alias: str) -> str:
    return str(client.get_model_version_by_alias(name, alias).version)  # an int on sqlite stores


def new_version(client: MlflowClient, name: str, score: float, eval_set: str, metric: str,
                source: str = "/nonexistent/bare-model") -> str:
    """A bare registry version with eval tags (for gate cases that need no logged model)."""
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    version = str(client.create_model_version(name, source=source).version)
    client.set_model_version_tag(name, version, metric, repr(score))
    client.set_model_version_tag(name, version, "eval_set_id", eval_set)
    return version


def mlflow_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()
