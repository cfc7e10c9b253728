"""Toy preference pairs shared by the training tests: the preferred response starts with "better"."""

import numpy as np

LETTERS = "bcdfghjklmnpqrstvwxz"


def better_pairs(n: int, seed: int, **extra) -> list[dict]:
    """Prompts and responses of random letters; chosen = "better " + filler. ``extra`` columns on every row."""
    rng = np.random.default_rng(seed)

    def filler():
        return " ".join(rng.choice(list(LETTERS), size=int(rng.integers(3, 7))))

    return [{"pair_id": f"p{i}", "prompt": filler(), "chosen": "better " + filler(), "rejected": filler(), **extra}
            for i in range(n)]


def few_labels(n: int) -> list[dict]:
    """A few labeled pairs for `gram adapt` (prompt, chosen, rejected; no ids): "Is i even?" answered yes/no."""
    return [{"prompt": f"Is {i} even? Answer yes or no.", "chosen": "yes" if i % 2 == 0 else "no",
             "rejected": "no" if i % 2 == 0 else "yes"} for i in range(n)]
