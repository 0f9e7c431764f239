"""Checkpointing for runs that get killed, preempted and requeued (Slurm or not).

- `AtomicCheckpointIO`: a checkpoint file is written to a temporary file in the same directory, fsynced, then
  `os.replace`d over the target, so a kill during a save leaves the previous checkpoint intact and loadable.
- `LastCheckpoint`: `last.ckpt` every `every_n_train_steps` steps and at the end of fit (Lightning's
  `ModelCheckpoint(save_last=True, save_top_k=0)` alone writes it only when fit ends).
- `RNGStateCheckpoint`: saves every rank's torch / numpy / python (and CUDA) RNG state and restores it on resume,
  so the noise, timesteps and CFG dropout after a resume are the ones the uninterrupted run would have drawn.
- `SlurmRequeue`: SIGUSR1 (`#SBATCH --signal=USR1@90`, or `scancel --signal=USR1`) -> at the next step boundary,
  on every rank together: save `hpc_ckpt_<n>.ckpt` in `default_root_dir`, `scontrol requeue` the job (rank 0),
  stop. This replaces Lightning's own SLURM handler, which saves from inside the signal handler (so in DDP the
  ranks can enter the save's barrier at different points of a step, and the checkpoint can be mid-step) and then
  keeps training until Slurm kills the job.
- `resume_path(run_dir)`: the newest of `run_dir/hpc_ckpt_*.ckpt` and `run_dir/checkpoints/last.ckpt`.
- `StepTrace`: appends "attempt rank global_step" per trained step to a file (audit trail across requeues).
- `read_checkpoint` / `save_safetensors_checkpoint`: a GLIGEN checkpoint either as Lightning's `.ckpt` (read with
  `weights_only=True`) or as a `.safetensors` file of the grounding weights whose metadata carries the
  hyper-parameters, base fingerprint and step (what the package ships: no pickle at all, a fraction of the size).
"""

from __future__ import annotations

import logging
import os
import random
import re
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import json

import lightning as L
import numpy as np
import torch
import safetensors
import safetensors.torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

log = logging.getLogger(__name__)

HPC_PATTERN = re.compile(r"^hpc_ckpt_(\d+)\.ckpt$")


# ----- checkpoint files ------------------------------------------------------------------------------------------
SAFETENSORS_KEY = "gligen_checkpoint"  # the metadata entry holding everything in a checkpoint but the weights
SAFETENSORS_FIELDS = ("hyper_parameters", "gligen", "global_step", "epoch")


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
                         "checkpoint (write one with gligen.checkpointing.save_safetensors_checkpoint)")
    checkpoint = json.loads(metadata[SAFETENSORS_KEY])
    checkpoint["state_dict"] = safetensors.torch.load_file(str(path), device=str(map_location))
    return checkpoint


def save_safetensors_checkpoint(checkpoint: dict, path: str | os.PathLike) -> Path:
    """Write a checkpoint's weights (`state_dict`: the grounding layers) as safetensors, with its hyper-parameters,
    `gligen` record and step as JSON metadata; optimizer and loop state are left out (not for resuming)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: checkpoint[k] for k in SAFETENSORS_FIELDS if k in checkpoint}
    tensors = {k: v.detach().cpu().contiguous() for k, v in checkpoint["state_dict"].items()}
    safetensors.torch.save_file(tensors, str(path), metadata={SAFETENSORS_KEY: json.dumps(meta, default=str)})
    return path


# ----- atomic writes ---------------------------------------------------------------------------------------------
def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save` to `path` so that `path` is, at every instant, either the old file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
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


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose local writes go through a temp file + `os.replace` (remote URLs: Lightning's own)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)


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
        if getattr(trainer, "_gligen_requeued", False):
            return  # the hpc checkpoint of this very step was just written; the job is being requeued
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

    Restored when the checkpoint is loaded and again right before the first resumed step, so the global RNG stream
    (noise, timesteps, CFG dropout, later epochs' DataLoader seeds) continues exactly as in the uninterrupted run,
    for DataLoaders whose new iterator draws one seed from the global RNG in the main process (torch's default;
    GroundingDataModule with num_workers >= 1). The data position is not restored: after a mid-epoch resume a plain
    DataLoader iterates the epoch's data from its start again, and a seeded stream draws the rest of that epoch
    from a new seed (Lightning restores the step and batch counters, not the loader)."""

    def __init__(self):
        self._trainer = None
        self._to_load = None
        self._epoch_end = False

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


# ----- Slurm requeue ---------------------------------------------------------------------------------------------
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


def slurm_job_id() -> str | None:
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and array_task:
        return f"{array_job}_{array_task}"
    return os.environ.get("SLURM_JOB_ID")


class SlurmRequeue(L.Callback):
    """On `signum` (default SIGUSR1), at the next training-step boundary on all ranks: save
    `default_root_dir/hpc_ckpt_<n>.ckpt`, requeue the job (`scontrol requeue`, rank 0) and stop training.

    The handler only sets a flag; the ranks agree on it every step (one boolean all-reduce), so every rank saves
    and stops after the same step. Use with `SLURMEnvironment(auto_requeue=False)` (the CLI does), so Lightning
    does not install its own handler too. `requeue=False` (or no SLURM_JOB_ID) saves and stops without requeueing.
    """

    def __init__(self, signum: int = signal.SIGUSR1, requeue: bool = True):
        self.signum, self.requeue = signum, requeue
        self._received = False
        self._previous = None

    def _handler(self, signum, frame) -> None:
        self._received = True

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and self._previous is None:
            self._previous = signal.signal(self.signum, self._handler)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not trainer.strategy.reduce_boolean_decision(self._received, all=False):
            return
        self._received = False
        path = trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir)
        path = trainer.strategy.broadcast(path)
        trainer.save_checkpoint(path)  # all ranks: the state dicts are collected everywhere, rank 0 writes
        if trainer.is_global_zero:  # older requeue checkpoints are superseded by this complete one
            for older in hpc_checkpoints(trainer.default_root_dir):
                if older != Path(path):
                    older.unlink(missing_ok=True)
        if trainer.is_global_zero:
            log.warning("requeue signal: saved %s at global step %d", path, trainer.global_step)
        trainer._gligen_requeued = True
        job_id = slurm_job_id()
        if trainer.is_global_zero and self.requeue and job_id:
            result = subprocess.run(["scontrol", "requeue", job_id], check=False, capture_output=True,
                                    text=True)
            if result.returncode == 0:
                log.warning("requeued Slurm job %s", job_id)
            else:
                log.error("scontrol requeue %s failed (%d): %s", job_id, result.returncode, result.stderr.strip())
        trainer.should_stop = True


def slurm_environment_plugin():
    """`SLURMEnvironment(auto_requeue=False)` when running under srun/sbatch (SlurmRequeue handles the signal),
    else None."""
    return SLURMEnvironment(auto_requeue=False) if SLURMEnvironment.detect() else None


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
