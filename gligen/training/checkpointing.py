"""Checkpoints that survive kills, resumes and careless reruns.

- `AtomicCheckpointIO`: a checkpoint file is written to a temporary file in the same directory, fsynced, then
  `os.replace`d over the target, so a kill during a save leaves the previous checkpoint intact and loadable; it
  refuses non-finite weights and keeps the previous versions.
- `LastCheckpoint`: `last.ckpt` every `every_n_train_steps` steps and at the end of fit (Lightning's
  `ModelCheckpoint(save_last=True, save_top_k=0)` alone writes it only when fit ends).
- `RNGStateCheckpoint`: saves every rank's torch / numpy / python (and CUDA) RNG state and restores it on resume,
  so the noise, timesteps and CFG dropout after a resume are the ones the uninterrupted run would have drawn.
- `resume_path(run_dir)`: the newest of `run_dir/hpc_ckpt_*.ckpt` and `run_dir/checkpoints/last.ckpt`.
- `StepTrace`: appends "attempt rank global_step" per trained step to a file (audit trail across requeues).
Preemption (signals, save, requeue) is gligen.training.preemption; reading a checkpoint, gligen.checkpoint_file.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

log = logging.getLogger(__name__)

HPC_PATTERN = re.compile(r"^hpc_ckpt_(\d+)\.ckpt$")


def atomic_torch_save(obj: Any, path: str | os.PathLike, keep: int = 1) -> None:
    """`torch.save` to `path` so that `path` is, at every instant, either the old file or the complete new one.
    `keep` > 1: the replaced file survives as `previous_versions(path, keep)[0]` (older ones shift down)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        older = previous_versions(path, keep)
        if older and path.exists():
            for newer, older_one in reversed(list(zip(older, older[1:]))):
                if newer.exists():
                    os.replace(newer, older_one)
            link = older[0].with_name(f".{older[0].name}.tmp")
            link.unlink(missing_ok=True)
            try:
                os.link(path, link)  # `path` itself stays in place until the new file replaces it
            except OSError:  # a file system without hard links
                shutil.copy2(path, link)
            os.replace(link, older[0])
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


class NonFiniteCheckpointError(ValueError):
    """A checkpoint whose weights hold NaN / inf: refused, so the previous (good) checkpoint stays in place."""


def nonfinite_weights(state_dict: dict[str, Any]) -> list[str]:
    return [k for k, v in state_dict.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def previous_versions(path: str | os.PathLike, keep: int) -> list[Path]:
    """The names older versions of `path` are kept under: `last.ckpt` -> `last.1.ckpt` (one save older), ..."""
    path = Path(path)
    return [path.with_name(f"{path.stem}.{i}{path.suffix}") for i in range(1, keep)]


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO for runs that must survive anything:

    - local writes go through a temp file + `os.replace` (remote URLs: Lightning's own write);
    - a checkpoint with non-finite weights is refused (`NonFiniteCheckpointError`), never written over a good one;
    - overwriting a file keeps its `keep - 1` previous versions (`last.ckpt` -> `last.1.ckpt`, ...), so the newest
      checkpoint is never the only one;
    - every load, a resume's included, is `torch.load(weights_only=True)`: a shared checkpoint passed to
      `--ckpt_path` is never unpickled as code, whatever torch's own default."""

    def __init__(self, keep: int = 2):
        super().__init__()
        self.keep = max(1, keep)

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        bad = nonfinite_weights(checkpoint.get("state_dict", {}))
        if bad:
            raise NonFiniteCheckpointError(
                f"refusing to write {path}: non-finite values in {bad[:5]}{' ...' if len(bad) > 5 else ''} "
                f"(global step {checkpoint.get('global_step')}); the previous checkpoint is kept")
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path, keep=self.keep)

    def load_checkpoint(self, path, map_location=lambda storage, loc: storage, weights_only: bool | None = None):
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)


# ----- periodic last.ckpt ----------------------------------------------------------------------------------------
class LastCheckpoint(ModelCheckpoint):
    """`dirpath/last.ckpt`, overwritten in place every `every_n_train_steps` steps (0: only at the end of fit) and
    when fit ends, whatever the step."""

    def __init__(self, dirpath: str, every_n_train_steps: int = 0):
        super().__init__(
            dirpath=dirpath,
            save_last=True,
            save_top_k=0,
            enable_version_counter=False,
            every_n_train_steps=every_n_train_steps or None,
        )

    @property
    def state_key(self) -> str:
        return "LastCheckpoint"  # not keyed by its settings: a resume with another --checkpoint_every keeps its state

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if any(getattr(c, "requeued", False) for c in trainer.callbacks):
            return  # SlurmRequeue just wrote the hpc checkpoint of this very step; the job is being requeued
        if not trainer.fast_dev_run and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


# ----- RNG state -------------------------------------------------------------------------------------------------
def collect_rng_states() -> dict[str, Any]:
    """torch (CPU, CUDA), numpy and python RNG states as tensors / ints, so `torch.load(weights_only=True)` reads
    them (numpy's own state holds an ndarray, which the weights-only unpickler refuses)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["torch.cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = states["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss"]))
    cuda = states.get("torch.cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


class RNGStateCheckpoint(L.Callback):
    """Every rank's RNG states in the checkpoint; each rank gets its own back on resume (rank 0's if the world size
    changed: all ranks are seeded alike by `seed_everything`).

    Validation during fit is RNG-neutral: the state at the end of the training step before it is put back when it
    ends. Restored when the checkpoint is loaded and again right before the first resumed step, so the global RNG stream
    (noise, timesteps, CFG dropout, later epochs' DataLoader seeds) continues exactly as in the uninterrupted run,
    for DataLoaders whose new iterator draws one seed from the global RNG in the main process (torch's default;
    GroundingDataModule with num_workers >= 1). The data position is not restored: after a mid-epoch resume a plain
    DataLoader iterates the epoch's data from its start again, and a seeded stream draws the rest of that epoch
    from a new seed (Lightning restores the step and batch counters, not the loader)."""

    def __init__(self):
        self._trainer = None
        self._to_load = None
        self._epoch_end = False
        self._before_validation = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        states = collect_rng_states()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, states)
        else:
            gathered = [states]
        # saved after the last batch of an epoch: the uninterrupted run next creates the next epoch's DataLoader
        # iterator, which draws one int64 seed from the global RNG before the next step
        loop = self._trainer.fit_loop.epoch_loop if self._trainer is not None else None
        epoch_end = bool(loop is not None and loop.batch_progress.is_last_batch)
        return {"ranks": gathered, "epoch_end": epoch_end}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._to_load = state_dict.get("ranks") or []
        self._epoch_end = bool(state_dict.get("epoch_end", False))
        if self._to_load and self._trainer is not None:
            # now too, before the resumed epoch's DataLoader iterator draws its seed: so that seed (and, for a
            # seeded stream, the rest of the interrupted epoch) comes from the checkpoint's RNG state instead of
            # repeating the freshly seeded process's first draw, i.e. the run's first epoch
            self._restore(self._trainer)

    def _restore(self, trainer: L.Trainer) -> None:
        states = self._to_load
        set_rng_states(states[trainer.global_rank] if len(states) == trainer.world_size else states[0])

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._before_validation = collect_rng_states()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # validation inside fit leaves the training RNG stream as it found it (its DataLoader iterator draws a seed
        # from the global RNG, samplers may draw more): so a validation cut short by a signal, or not rerun after a
        # resume from a checkpoint saved just before it, cannot change the steps that follow
        if trainer.state.fn == "fit" and not trainer.sanity_checking and self._before_validation is not None:
            set_rng_states(self._before_validation)
            self._before_validation = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx) -> None:
        # right before the first resumed step: whatever drew from the RNG since the restore in load_state_dict
        # (sanity validation, creating the resumed epoch's DataLoader iterator) did not happen at this point of the
        # uninterrupted run
        if self._to_load:
            self._restore(trainer)
            self._to_load = None
            if self._epoch_end:
                # ... except the seed draw torch's DataLoader makes for a new iterator (`_get_shared_seed`, one
                # int64 from the global generator), which the uninterrupted run made between an epoch-end
                # checkpoint and its next step
                torch.empty((), dtype=torch.int64).random_()


def hpc_checkpoints(directory: str | os.PathLike) -> list[Path]:
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := HPC_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def resume_path(run_dir: str | os.PathLike) -> str | None:
    """The checkpoint a restarted run continues from: the most recently written of `run_dir/hpc_ckpt_<n>.ckpt`
    (Slurm requeue) and `run_dir/checkpoints/last.ckpt` (periodic / end of fit); None if neither exists."""
    run_dir = Path(run_dir)
    candidates = hpc_checkpoints(run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.exists():
        candidates.append(last)
    if not candidates:
        return None
    # newest mtime wins; on a tie, the later in the list (hpc by number, then last.ckpt)
    return str(max(enumerate(candidates), key=lambda ic: (ic[1].stat().st_mtime_ns, ic[0]))[1])


# ----- audit trail -----------------------------------------------------------------------------------------------
class StepTrace(L.Callback):
    """Appends `<attempt> <rank> <global_step>` after every optimizer step to `path` (one file for all ranks and
    all requeues; attempt = SLURM_RESTART_COUNT, 0 outside Slurm). Tests use it to check that a requeued run trains
    every step exactly once."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        attempt = os.environ.get("SLURM_RESTART_COUNT", "0")
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(f"{attempt} {trainer.global_rank} {trainer.global_step}\n")
