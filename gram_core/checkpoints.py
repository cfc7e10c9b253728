"""Resumable training checkpoints: trainable weights, optimizer, scheduler, step, history and RNG states.

A checkpoint folder holds ``trainable.safetensors`` (the trainable parameters by name), ``optimizer.pt``
(optimizer and scheduler state, torch and CUDA RNG) and ``trainer_state.json`` (the run layout, step,
metric history and Python/NumPy RNG), plus ``adapter/`` for PEFT models. It is written to a temp folder
and renamed into place, so a crash never leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from gram_core.artifact_files import OPTIMIZER_FILE, STATE_FILE, WEIGHTS_FILE
from gram_core.folders import write_folder


def save_checkpoint(target: Path, model, named, optimizer, scheduler, state: dict, weights: dict | None = None,
                    optimizer_state: dict | None = None) -> str:
    """Write a resumable checkpoint to a temp folder beside ``target`` and rename it into place.

    ``weights`` (by name) and ``optimizer_state`` replace ``named``'s tensors and ``optimizer.state_dict()``
    (a sharded run passes the full ones it gathered)."""
    return str(write_folder(target, functools.partial(_write_checkpoint, model=model, named=named, optimizer=optimizer,
                                                      scheduler=scheduler, state=state, weights=weights,
                                                      optimizer_state=optimizer_state)))


def _write_checkpoint(tmp: Path, *, model, named, optimizer, scheduler, state, weights, optimizer_state) -> None:
    if weights is None:
        weights = {name: p.detach() for name, p in named}
    save_file({name: t.cpu().contiguous() for name, t in weights.items()}, str(tmp / WEIGHTS_FILE))
    optimizer_state = optimizer.state_dict() if optimizer_state is None else optimizer_state
    torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
               tmp / OPTIMIZER_FILE)
    np_state = np.random.get_state()
    rng = {"python": _jsonable(random.getstate()),
           "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    (tmp / STATE_FILE).write_text(json.dumps({**state, "rng": rng}, default=float))
    if hasattr(model, "peft_config"):  # the adapter alone, loadable with peft for inspection
        model.save_pretrained(tmp / "adapter")


def _jsonable(value):
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def load_checkpoint(folder: str | Path, named, optimizer, scheduler, layout: dict,
                    restore=None) -> tuple[int, list[dict]]:
    """Restore weights, optimizer, scheduler and RNG from ``folder``; return (step, history).

    ``restore(weights_file, optimizer_state)`` replaces copying the weights and optimizer state in place (a
    sharded run loads them on rank 0 and broadcasts; other ranks leave the optimizer state memory-mapped)."""
    folder = Path(folder)
    if not (folder / STATE_FILE).is_file():
        raise FileNotFoundError(f"resume_from={folder} is not a training checkpoint (no {STATE_FILE})")
    state = json.loads((folder / STATE_FILE).read_text())
    for key, value in layout.items():
        if state.get(key) != value:
            raise ValueError(f"checkpoint {folder} was written with {key}={state.get(key)}, but this run has "
                             f"{key}={value}; resume needs the same data, batch sizes, workers and steps")
    extra = torch.load(folder / OPTIMIZER_FILE, map_location="cpu", weights_only=True, mmap=restore is not None)
    if restore is not None:
        restore(folder / WEIGHTS_FILE, extra["optimizer"])
    else:
        weights = load_file(str(folder / WEIGHTS_FILE))
        check_names(folder, set(weights), {name for name, _ in named})
        with torch.no_grad():
            for name, p in named:
                p.copy_(weights[name].to(p.device, p.dtype))
        optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    torch.set_rng_state(extra["torch_rng"])
    if extra["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(extra["cuda_rng"])
    random.setstate(_tuples(state["rng"]["python"]))
    kind, keys, *rest = state["rng"]["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    return int(state["step"]), list(state["history"])


def check_names(folder: Path, stored: set[str], names: set[str]) -> None:
    """Raise unless a checkpoint's trainable parameter names (``stored``) are the model's (``names``)."""
    if stored != names:
        raise ValueError(f"checkpoint {folder} trainable parameters differ from the model's: missing "
                         f"{sorted(names - stored)[:5]}, unexpected {sorted(stored - names)[:5]}")
