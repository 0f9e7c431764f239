"""Preemption: a signal -> save at the next safe point -> requeue.

`SlurmRequeue`: SIGUSR1 (`#SBATCH --signal=USR1@90`, or `scancel --signal=USR1`) or SIGTERM -> at the next step
boundary (or validation batch, or sampler step of a sampling callback), on every rank together: save
`hpc_ckpt_<n>.ckpt` in `default_root_dir`, `scontrol requeue` the job (rank 0), stop. This replaces Lightning's own
SLURM handler, which saves from inside the signal handler (so in DDP the ranks can enter the save's barrier at
different points of a step, and the checkpoint can be mid-step) and then keeps training until Slurm kills the job.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from typing import Any

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment

from gligen.training.checkpointing import hpc_checkpoints
from gligen.training.lightning_internals import hpc_save_path

log = logging.getLogger(__name__)


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

    The outcome stays on the callback (`SlurmRequeue.of(trainer)`): `interrupted` is None (not stopped by a signal, or
    requeued), else the reason the job was not requeued (outside Slurm, `requeue=False`, no `scontrol`, scontrol's
    error); `python -m gligen fit` then exits with `EXIT_INTERRUPTED`. Use with `SLURMEnvironment(auto_requeue=False)`
    (the CLI does), so Lightning does not install its own handler too. `keep`: how many hpc checkpoints stay (the
    newest).
    """

    def __init__(self, signals: tuple[int, ...] = PREEMPTION_SIGNALS, requeue: bool = True, keep: int = 2):
        self.signals, self.requeue, self.keep = tuple(signals), requeue, max(1, keep)
        self._installed = False
        self._stopping = False
        self.interrupted: str | None = None  # why a stopped run was not requeued
        self.requeued = False  # saved for a requeue at this step (LastCheckpoint then writes nothing more)
        self.validation_aborted = False  # the current validation was cut short (its metrics are partial)
        self.aborted_validations: list[tuple[int, int]] = []  # (global step, batch index) of each cut-short one

    @staticmethod
    def of(trainer: L.Trainer) -> SlurmRequeue | None:
        """The trainer's SlurmRequeue callback, if it has one."""
        return next((c for c in trainer.callbacks if isinstance(c, SlurmRequeue)), None)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.interrupted, self.requeued, self.aborted_validations = None, False, []
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
            self.validation_aborted = True
            self.aborted_validations.append((trainer.global_step, batch_idx))
            if trainer.is_global_zero:
                log.warning("preemption signal: validation at step %d stopped before batch %d", trainer.global_step,
                            batch_idx)
            raise StopIteration  # Lightning's evaluation loop ends on it, as when the data runs out

    def on_validation_start(self, trainer: L.Trainer, pl_module) -> None:
        self.validation_aborted = False

    def _save_and_requeue(self, trainer: L.Trainer) -> None:
        signum = preemption_requested()
        clear_preemption()
        if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            # the final step is done: ending normally writes the complete last.ckpt; a requeue would only resume a
            # finished run
            if trainer.is_global_zero:
                log.warning("preemption signal after the final step %d: finishing normally", trainer.global_step)
            return
        path = hpc_save_path(trainer)
        path = trainer.strategy.broadcast(path)
        trainer.save_checkpoint(path)  # all ranks: the state dicts are collected everywhere, rank 0 writes
        if trainer.is_global_zero:  # the newest `keep` stay: never only the one just written
            for older in hpc_checkpoints(trainer.default_root_dir)[:-self.keep]:
                older.unlink(missing_ok=True)
            log.warning("preemption signal %s: saved %s at global step %d",
                        signal.Signals(signum).name if signum else "?", path, trainer.global_step)
        self.requeued = True
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
            self.interrupted = reason
        trainer.should_stop = True


def slurm_environment_plugin():
    """`SLURMEnvironment(auto_requeue=False)` when running under srun/sbatch (SlurmRequeue handles the signal),
    else None."""
    return SLURMEnvironment(auto_requeue=False) if SLURMEnvironment.detect() else None


