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

import hashlib
import logging
import os
import random
import re
import shutil
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


def weights_hash(state_dict: dict[str, torch.Tensor]) -> str:
    """Short hash of a checkpoint's weights (names, dtypes, shapes, bytes): which model a result came from, and
    whether a checkpoint changed since (trained further, replaced)."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key]
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        value = tensor.detach().cpu().contiguous().reshape(-1)  # 0-d tensors (the gates) have no byte view
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()[:16]


def checkpoint_identity(path: str | os.PathLike) -> dict[str, Any]:
    """What a result must name about the checkpoint it came from: `global_step`, the run's `max_steps` when the
    checkpoint was written (None: unknown, e.g. converted or older checkpoints), `complete` (step >= max_steps;
    None when unknown) and `weights_hash`."""
    checkpoint = read_checkpoint(path)
    step = checkpoint.get("global_step")
    max_steps = (checkpoint.get("gligen") or {}).get("max_steps")
    max_steps = max_steps if isinstance(max_steps, int) and max_steps > 0 else None
    return {"global_step": step, "max_steps": max_steps,
            "complete": None if max_steps is None or step is None else step >= max_steps,
            "weights_hash": weights_hash(checkpoint["state_dict"])}


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


# ----- preemption: a signal -> save, requeue --------------------------------------------------------------------
PREEMPTION_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
# exit status of a fit that a signal stopped and that was not requeued (outside Slurm, requeue off, or scontrol
# failed): everything is saved and resumable, but the run is unfinished, and a grid or a script must see that
EXIT_INTERRUPTED = 3

_received: list[int] = []  # signals received since the last clear_preemption(); only the handler appends
_previous_handlers: dict[int, Any] = {}


def _preemption_handler(signum, frame) -> None:
    _received.append(signum)  # nothing else: the work happens at the next safe point, on every rank together


def install_preemption_handlers(signals=PREEMPTION_SIGNALS) -> bool:
    """Route SIGUSR1 / SIGTERM to a flag read at safe points (step boundaries, between validation batches, between
    sampler steps). The CLI installs them before the model loads, so a signal during loading is kept, not fatal.
    Idempotent; returns whether this call installed any. Main thread only (Python's rule for signal handlers)."""
    installed = False
    for signum in signals:
        if signum not in _previous_handlers:
            _previous_handlers[signum] = signal.signal(signum, _preemption_handler)
            installed = True
    return installed


def restore_signal_handlers() -> None:
    for signum, previous in list(_previous_handlers.items()):
        signal.signal(signum, previous)
        del _previous_handlers[signum]


def preemption_requested() -> int | None:
    """The first preemption signal this process received since `clear_preemption()`, or None."""
    return _received[0] if _received else None


def clear_preemption() -> None:
    _received.clear()


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


def requeue_slurm_job(job_id: str | None) -> str | None:
    """`scontrol requeue <job_id>`; None when it worked, else why not (no job id, no scontrol, its error)."""
    if not job_id:
        return "not a Slurm job (no SLURM_JOB_ID): nothing to requeue"
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], check=False, capture_output=True, text=True,
                                timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"scontrol requeue {job_id} could not run: {error}"
    if result.returncode != 0:
        return f"scontrol requeue {job_id} failed ({result.returncode}): {result.stderr.strip()}"
    return None


class SlurmRequeue(L.Callback):
    """On SIGUSR1 or SIGTERM (Slurm's time-limit warning, `scancel --signal=...`, preemption): at the next safe point
    on all ranks together, save `default_root_dir/hpc_ckpt_<n>.ckpt`, requeue the job (`scontrol requeue`, rank 0)
    and stop training.

    The handler only sets a flag; the ranks agree on it with one boolean all-reduce per step (and per validation
    batch), so every rank saves after the same step. Safe points: every training-step boundary; the start of
    training (a signal that came while the model loaded); every validation batch (the rest of the validation is
    skipped, its AP not logged) and every sampler step of `SampleGrid` / `GroundingEvaluation` (abandoned), so a
    long evaluation cannot outlast the grace time. A signal after the final step saves nothing extra: the run ends
    normally and writes its complete `last.ckpt`.

    The outcome is `trainer.gligen_interrupted`: None (not stopped by a signal, or requeued), else the reason the
    job was not requeued (outside Slurm, `requeue=False`, no `scontrol`, scontrol's error); `python -m gligen fit`
    then exits with `EXIT_INTERRUPTED`. Use with `SLURMEnvironment(auto_requeue=False)` (the CLI does), so
    Lightning does not install its own handler too. `keep`: how many hpc checkpoints stay (the newest).
    """

    def __init__(self, signals: tuple[int, ...] = PREEMPTION_SIGNALS, requeue: bool = True, keep: int = 2):
        self.signals, self.requeue, self.keep = tuple(signals), requeue, max(1, keep)
        self._installed = False
        self._stopping = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        trainer.gligen_interrupted = None
        trainer.gligen_aborted_validations = []  # (global step, batch index) of each validation a signal cut short
        self._stopping = False
        if stage == "fit":
            self._installed = install_preemption_handlers(self.signals)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and self._installed:  # only what this callback installed (the CLI restores its own)
            restore_signal_handlers()
            self._installed = False

    def _agreed(self, trainer: L.Trainer) -> bool:
        return bool(trainer.strategy.reduce_boolean_decision(preemption_requested() is not None, all=False))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._agreed(trainer):  # the signal came while the model and data were loading
            self._save_and_requeue(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._agreed(trainer):
            self._save_and_requeue(trainer)

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        # once stopping (every rank alike), no validation at all: Lightning validates when training stops early
        if trainer.state.fn == "fit" and (self._stopping or self._agreed(trainer)):
            trainer.gligen_validation_aborted = True
            trainer.gligen_aborted_validations.append((trainer.global_step, batch_idx))
            if trainer.is_global_zero:
                log.warning("preemption signal: validation at step %d stopped before batch %d", trainer.global_step,
                            batch_idx)
            raise StopIteration  # Lightning's evaluation loop ends on it, as when the data runs out

    def on_validation_start(self, trainer: L.Trainer, pl_module) -> None:
        trainer.gligen_validation_aborted = False

    def _save_and_requeue(self, trainer: L.Trainer) -> None:
        signum = preemption_requested()
        clear_preemption()
        if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            # the final step is done: ending normally writes the complete last.ckpt; a requeue would only resume a
            # finished run
            if trainer.is_global_zero:
                log.warning("preemption signal after the final step %d: finishing normally", trainer.global_step)
            return
        path = trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir)
        path = trainer.strategy.broadcast(path)
        trainer.save_checkpoint(path)  # all ranks: the state dicts are collected everywhere, rank 0 writes
        if trainer.is_global_zero:  # the newest `keep` stay: never only the one just written
            for older in hpc_checkpoints(trainer.default_root_dir)[:-self.keep]:
                older.unlink(missing_ok=True)
            log.warning("preemption signal %s: saved %s at global step %d",
                        signal.Signals(signum).name if signum else "?", path, trainer.global_step)
        trainer._gligen_requeued = True
        self._stopping = True
        reason = "requeue disabled (SlurmRequeue(requeue=False))"
        if self.requeue and trainer.is_global_zero:
            reason = requeue_slurm_job(slurm_job_id())
        reason = trainer.strategy.broadcast(reason)
        if reason is None:
            if trainer.is_global_zero:
                log.warning("requeued Slurm job %s", slurm_job_id())
        else:
            if trainer.is_global_zero:
                log.error("stopped by a signal at step %d and NOT requeued: %s; resume by running the same command "
                          "again", trainer.global_step, reason)
            trainer.gligen_interrupted = reason
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
