"""Training progress for logs that are files (Slurm's, nohup's): one plain line every N optimizer steps instead of
a bar redrawn with carriage returns on every step, which turns a 100k-step run's log into megabytes of one line.

Lightning's progress bars (TQDM, Rich) are made for terminals, and its `TQDMProgressBar(refresh_rate=N)` still
draws carriage-return updates; this is the one thing written here for it. `python -m gligen fit` uses it when stdout
is not a terminal (`--progress_every`, gligen/training/cli.py) and Lightning's bar otherwise.
"""

from __future__ import annotations

import sys
import time

from lightning.pytorch.callbacks import ProgressBar


class PlainProgress(ProgressBar):
    """`step 1500/100000 (1.5%) | 2.31 step/s | eta 11:55:12 | train/loss 0.0412 val/loss 0.0398` on rank 0, every
    `every_n_steps` optimizer steps, and once at the end of fit."""

    def __init__(self, every_n_steps: int = 50, stream=None):
        super().__init__()
        self.every_n_steps = every_n_steps
        self.stream = stream
        self._enabled = True
        self._start: tuple[float, int] | None = None  # (time, step) when this attempt began (resumes count from it)
        self._last: int | None = None  # the step of the last line printed

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = (time.perf_counter(), trainer.global_step)

    def line(self, trainer) -> str:
        step, total = trainer.global_step, trainer.max_steps
        elapsed = time.perf_counter() - self._start[0] if self._start else 0.0
        rate = (step - self._start[1]) / elapsed if self._start and elapsed > 0 else 0.0
        parts = [f"step {step}/{total} ({100 * step / total:.1f}%)" if total and total > 0 else f"step {step}"]
        if rate > 0:
            parts.append(f"{rate:.2f} step/s")
            if total and total > step:
                parts.append(f"eta {time.strftime('%H:%M:%S', time.gmtime((total - step) / rate))}")
        metrics = {k: v for k, v in self.get_metrics(trainer, trainer.lightning_module).items() if k != "v_num"}
        if metrics:
            parts.append(" ".join(f"{k} {float(v):.4g}" for k, v in sorted(metrics.items())))
        return " | ".join(parts)

    def _print(self, trainer) -> None:
        self._last = trainer.global_step
        if self._enabled and trainer.is_global_zero:
            print(self.line(trainer), file=self.stream or sys.stdout, flush=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        # gradient accumulation: one line per optimizer step, not per batch
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0 and step != self._last:
            self._print(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.every_n_steps > 0 and trainer.global_step != self._last:
            self._print(trainer)
