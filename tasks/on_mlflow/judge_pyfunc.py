"""The registered judge's pyfunc code: logged with every model version as models-from-code.

MLflow stores this file inside the model (``python_model=<this file>``) and runs it at load time, so a
version loads by reference to ``gram_core``'s public judge API rather than from a cloudpickled class: old
versions keep loading after ``tasks`` is refactored. It imports only MLflow, pandas and ``gram_core``.

Input problems are raised as ``MlflowException(INVALID_PARAMETER_VALUE)``: the scoring server then answers
400 with the reason as its ``message`` (any other exception becomes a generic "unexpected error" text with
the reason buried in ``stack_trace``).
"""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

INPUT_COLUMNS = ("prompt", "response_a", "response_b")
OUTPUT_COLUMNS = ("p_a_better", "p_order1", "p_order2", "consistent")


class JudgeInputError(MlflowException, ValueError):
    """The input rows are not what the judge takes; the message names the column and rows."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


class GramJudgeModel(mlflow.pyfunc.PythonModel):
    """Pyfunc wrapper of a scorer (``gram_core.scorers.open_scorer``: the judge read with its recorded settings;
    a Bradley-Terry folder would be read as a scalar model): rows of (prompt, response_a, response_b) -> P(A ≻ B).

    ``model_config`` keys (overridable in ``mlflow.pyfunc.load_model(uri, model_config=...)``):
    ``judge`` (JudgeConfig fields), ``dtype`` (float32 default; bf16/fp16 only on GPU) and ``device``
    ("auto": CUDA when available, else CPU).
    """

    def load_context(self, context: Any) -> None:
        import dataclasses

        from gram_core.config import JudgeConfig, from_dict
        from gram_core.scorers import open_scorer

        options = dict(context.model_config or {})
        settings = from_dict(JudgeConfig, options.get("judge") or {})
        # The top-level dtype and device are the pyfunc's own (float32 unless told: bf16/fp16 only on GPU).
        settings = dataclasses.replace(settings, dtype=options.get("dtype", "float32"),
                                       device=options.get("device", "auto"))
        self.judge = open_scorer(context.artifacts["model"], settings)

    def predict(self, context: Any, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        """p_a_better = ½·(P(A | a in slot A) + P(B | a in slot B)); consistent = both orders agree."""
        from gram_core.report import orders_agree
        from gram_core.reward_scoring import pairwise  # as the reward server scores: shared prefixes

        frame = check_input(model_input)
        scores = pairwise(self.judge, frame["prompt"].tolist(), frame["response_a"].tolist(),
                          frame["response_b"].tolist(), share=True)
        return pd.DataFrame({
            "p_a_better": scores.p,
            "p_order1": scores.p_order1,
            "p_order2": scores.p_order2,
            "consistent": orders_agree(scores.p_order1, scores.p_order2),
        }, index=frame.index)


def check_input(model_input: Any) -> pd.DataFrame:
    """The input as a DataFrame with three string columns, or a JudgeInputError naming what is wrong."""
    if not isinstance(model_input, pd.DataFrame):
        raise JudgeInputError(f"expected a table with columns {list(INPUT_COLUMNS)}, got {type(model_input).__name__}")
    missing = [c for c in INPUT_COLUMNS if c not in model_input.columns]
    if missing:
        raise JudgeInputError(f"missing column(s) {missing}; expected {list(INPUT_COLUMNS)}, "
                              f"got {list(model_input.columns)}")
    for column in INPUT_COLUMNS:
        bad = [i for i, v in enumerate(model_input[column]) if not isinstance(v, str)]
        if bad:
            raise JudgeInputError(f"column {column!r} rows {bad[:5]} are not strings "
                                  f"(first value {model_input[column].iloc[bad[0]]!r})")
    return model_input


mlflow.models.set_model(GramJudgeModel())
