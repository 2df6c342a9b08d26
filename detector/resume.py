"""Training checkpoints: everything a killed `detector train` needs to go on where its last epoch ended.

A checkpoint is a folder with `state-<epoch>.safetensors` (the model's weights, the best weights so far, Adam's
moment estimates and torch's random state: tensors only, so loading never unpickles anything) and
`state.json` (the epoch, early-stopping counters, loss history, numpy's generator state, and what the run
was: its parameters and a fingerprint of its data). Resuming with other parameters or other data is refused,
and a resumed run gives the same model as one that was never stopped (same seeds, same batches).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from detector.errors import DataError

__all__ = ["TrainState", "save_state", "load_state", "fingerprint", "STATE", "TENSORS"]

STATE = "state.json"
TENSORS = "state-{epoch}.safetensors"


@dataclass
class TrainState:
    """Where a training run stands at the end of an epoch."""

    epoch: int  # epochs done
    best: float
    bad_epochs: int
    history: list[dict[str, Any]] = field(default_factory=list)
    model: dict[str, torch.Tensor] = field(default_factory=dict)
    best_model: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer: dict[str, Any] = field(default_factory=dict)
    numpy_rng: dict[str, Any] = field(default_factory=dict)
    torch_rng: torch.Tensor | None = None
    run: dict[str, Any] = field(default_factory=dict)  # parameters and data fingerprint


def fingerprint(features: list[str], streams: list[str], values: list[np.ndarray]) -> str:
    """A short hash of the training data: features, stream ids and every value."""
    h = hashlib.sha256("\x1f".join(features).encode())
    for s, v in zip(streams, values, strict=True):
        h.update(s.encode())
        h.update(np.ascontiguousarray(v, dtype=np.float32).tobytes())
    return h.hexdigest()[:16]


def save_state(folder: str | Path, st: TrainState) -> None:
    """Write the checkpoint into `folder` (created); a crash while writing leaves the previous one whole."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in st.model.items()}
    tensors |= {f"best.{k}": v.detach().cpu().contiguous() for k, v in st.best_model.items()}
    opt_state = st.optimizer.get("state", {})
    scalars: dict[str, dict[str, float]] = {}
    for idx, slots in opt_state.items():
        for name, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"opt.{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    if st.torch_rng is not None:
        tensors["torch_rng"] = st.torch_rng.contiguous()
    name = TENSORS.format(epoch=st.epoch)
    meta = {"epoch": st.epoch, "tensors": name, "best": st.best, "bad_epochs": st.bad_epochs,
            "history": st.history, "param_groups": st.optimizer.get("param_groups", []),
            "optimizer_scalars": scalars, "numpy_rng": st.numpy_rng, "run": st.run}
    # the tensors first, under their epoch's name; then state.json, naming them, replaces the old one at once
    # (the commit point); then the older tensors go. A kill at any moment leaves a whole pair.
    save_file(tensors, str(out / f".{name}.tmp"))
    os.replace(out / f".{name}.tmp", out / name)
    (out / f".{STATE}.tmp").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    os.replace(out / f".{STATE}.tmp", out / STATE)
    for old in out.glob(TENSORS.format(epoch="*")):
        if old.name != name:
            old.unlink(missing_ok=True)


def load_state(folder: str | Path, run: dict[str, Any]) -> TrainState:
    """Read the checkpoint in `folder`; raise DataError naming what differs if it is another run's."""
    src = Path(folder)
    try:
        meta = json.loads((src / STATE).read_text(encoding="utf-8"))
        tensors = load_file(str(src / meta["tensors"]))
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"{src}: no readable training checkpoint to resume from ({exc})") from None
    if meta.get("run") != run:
        theirs = meta.get("run", {})
        differ = sorted(k for k in set(run) | set(theirs) if run.get(k) != theirs.get(k))
        raise DataError(f"{src}: the checkpoint is of another training run ({', '.join(differ)} differ); train "
                        f"with the same data and options, or remove the folder to start afresh")
    opt_state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            opt_state.setdefault(int(idx), {})[name] = value
    for idx, slots in meta["optimizer_scalars"].items():
        opt_state.setdefault(int(idx), {}).update(slots)
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in meta["param_groups"]]
    return TrainState(
        epoch=int(meta["epoch"]), best=float(meta["best"]), bad_epochs=int(meta["bad_epochs"]),
        history=list(meta["history"]),
        model={k[6:]: v for k, v in tensors.items() if k.startswith("model.")},
        best_model={k[5:]: v for k, v in tensors.items() if k.startswith("best.")},
        optimizer={"state": opt_state, "param_groups": groups},
        numpy_rng=meta["numpy_rng"], torch_rng=tensors.get("torch_rng"), run=meta["run"])
