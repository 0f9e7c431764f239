"""A GLIGEN checkpoint file, read safely and identified: Lightning's `.ckpt` (read with `weights_only=True`: no
unpickling of code) or a `.safetensors` file of the grounding weights whose metadata carries the hyper-parameters,
base fingerprint and step (what the package ships: no pickle at all, a fraction of the size); `weights_hash` and
`checkpoint_identity` name the exact weights a result came from."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

SAFETENSORS_KEY = "gligen_checkpoint"  # the metadata entry holding everything in a checkpoint but the weights
SAFETENSORS_FIELDS = ("hyper_parameters", "gligen", "global_step", "epoch")
EMA_KEY = "ema_state_dict"  # EMA of the trainable weights (model.ema_decay), same names as state_dict
EMA_PREFIX = "ema/"  # how a safetensors file tells EMA tensors from the raw ones


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """A GLIGEN checkpoint as Lightning's dict (state_dict, hyper_parameters, gligen, global_step, ...): `.ckpt`
    through `torch.load(weights_only=True)` (no unpickling of code), `.safetensors` from its tensors + metadata."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return torch.load(path, map_location=map_location, weights_only=True)
    with safetensors.safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if SAFETENSORS_KEY not in metadata:
        raise ValueError(f"{path}: a safetensors file without '{SAFETENSORS_KEY}' metadata is not a GLIGEN "
                         "checkpoint (write one with gligen.checkpoint_file.save_safetensors_checkpoint)")
    checkpoint = json.loads(metadata[SAFETENSORS_KEY])
    tensors = safetensors.torch.load_file(str(path), device=str(map_location))
    checkpoint["state_dict"] = {k: v for k, v in tensors.items() if not k.startswith(EMA_PREFIX)}
    ema = {k[len(EMA_PREFIX):]: v for k, v in tensors.items() if k.startswith(EMA_PREFIX)}
    if ema:
        checkpoint[EMA_KEY] = ema
    return checkpoint


def sampled_weights(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The weights a checkpoint samples with: its EMA weights when it has them, else the trained ones."""
    return checkpoint.get(EMA_KEY) or checkpoint["state_dict"]


def weights_hash(state_dict: dict[str, torch.Tensor], ema: dict[str, torch.Tensor] | None = None) -> str:
    """Short hash of a checkpoint's weights (names, dtypes, shapes, bytes; with its EMA weights when it has them,
    since sampling uses those): which model a result came from, and whether a checkpoint changed since (trained
    further, replaced). Without EMA the hash is what it was before EMA existed."""
    weights = {**state_dict, **{EMA_PREFIX + k: v for k, v in (ema or {}).items()}}
    digest = hashlib.sha256()
    for key in sorted(weights):
        tensor = weights[key]
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        value = tensor.detach().cpu().contiguous().reshape(-1)  # 0-d tensors (the gates) have no byte view
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()[:16]


def checkpoint_identity(path: str | os.PathLike) -> dict[str, Any]:
    """What a result must name about the checkpoint it came from: `global_step`, the run's `max_steps` when the
    checkpoint was written (None: unknown, e.g. converted or older checkpoints), `complete` (step >= max_steps;
    None when unknown), `weights_hash`, the base LDM's fingerprint, and how it was trained when the checkpoint says
    (older ones do not): the commits of its training attempts, its config's hash, its train shards' fingerprint;
    `weights_changed`: True when the weights differ from the hash training recorded on saving them (the file was
    edited since), None when no hash was recorded (older, converted or hand-written checkpoints)."""
    checkpoint = read_checkpoint(path)
    step = checkpoint.get("global_step")
    gligen = checkpoint.get("gligen") or {}
    current, recorded = weights_hash(checkpoint["state_dict"], checkpoint.get(EMA_KEY)), gligen.get("weights_hash")
    max_steps = gligen.get("max_steps")
    max_steps = max_steps if isinstance(max_steps, int) and max_steps > 0 else None
    training = gligen.get("training") or {}
    return {"global_step": step, "max_steps": max_steps,
            "complete": None if max_steps is None or step is None else step >= max_steps,
            "weights_hash": current, "weights_changed": None if recorded is None else recorded != current,
            "ema": EMA_KEY in checkpoint,
            "base_fingerprint": gligen.get("base_fingerprint"),
            "train_commits": " ".join(training.get("commits") or []) or None,
            "train_config_hash": training.get("config_hash"),
            "train_shards_fingerprint": training.get("train_shards_fingerprint")}


def save_safetensors_checkpoint(checkpoint: dict, path: str | os.PathLike) -> Path:
    """Write a checkpoint's weights (`state_dict`: the grounding layers, and their EMA under `ema/` names) as
    safetensors, with its hyper-parameters, `gligen` record and step as JSON metadata; optimizer and loop state are
    left out (not for resuming)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: checkpoint[k] for k in SAFETENSORS_FIELDS if k in checkpoint}
    weights = {**checkpoint["state_dict"], **{EMA_PREFIX + k: v for k, v in (checkpoint.get(EMA_KEY) or {}).items()}}
    tensors = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    safetensors.torch.save_file(tensors, str(path), metadata={SAFETENSORS_KEY: json.dumps(meta, default=str)})
    return path


# ----- atomic writes ---------------------------------------------------------------------------------------------
