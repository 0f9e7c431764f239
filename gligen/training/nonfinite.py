"""Non-finite training steps: skipped on every rank together, counted, and fatal only when they keep coming.

One NaN batch (a corrupt latent, an overflow in a rare timestep) must not end a 100k-step run, nor poison the
weights that every later checkpoint saves. `NonFiniteGuard` looks at the loss and the (already all-reduced)
gradients right before each optimizer step; if any rank saw a non-finite value, every rank (one boolean all-reduce,
so DDP never hangs) drops all gradients, so the optimizer leaves weights and moments untouched (torch optimizers
skip parameters without a gradient); the learning-rate schedule and the step counter still advance. After
`max_consecutive` skips in a row the data or the model is broken rather than unlucky: training stops with
`NonFiniteTrainingError`, and no checkpoint written after the last good step exists (weights never go non-finite
through a skipped step, and `AtomicCheckpointIO` refuses to write non-finite weights in any case).
"""

from __future__ import annotations

import logging

import lightning as L
import torch

log = logging.getLogger(__name__)


class NonFiniteTrainingError(RuntimeError):
    """Too many consecutive non-finite steps."""


class NonFiniteGuard(L.Callback):
    """Skip optimizer steps with a non-finite loss or gradient (all ranks agree), count them in
    `train/nonfinite_skipped_steps`, stop after `max_consecutive` in a row (0: never stop)."""

    def __init__(self, max_consecutive: int = 20):
        self.max_consecutive = max_consecutive
        self.skipped = 0  # over the whole run, requeues included (kept in the checkpoint)
        self.consecutive = 0
        self._loss_finite = True

    @property
    def state_key(self) -> str:
        return "NonFiniteGuard"  # not keyed by its settings: a resume with another limit keeps the counts

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
        self.consecutive = int(state_dict.get("consecutive", 0))

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        self._loss_finite = bool(torch.isfinite(loss.detach()).all())

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        # a single norm over every gradient is non-finite iff some element is
        bad = not self._loss_finite or (bool(grads) and not bool(torch.isfinite(torch.nn.utils.get_total_norm(grads))))
        self._loss_finite = True
        if not trainer.strategy.reduce_boolean_decision(bad, all=False):
            self.consecutive = 0
            return
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        self.skipped += 1
        self.consecutive += 1
        pl_module.log("train/nonfinite_skipped_steps", float(self.skipped), rank_zero_only=True)
        if trainer.is_global_zero:
            log.warning("non-finite loss or gradient at step %d: optimizer step skipped on every rank (%d in a row, "
                        "%d in this run)", trainer.global_step, self.consecutive, self.skipped)
        if self.max_consecutive and self.consecutive >= self.max_consecutive:
            raise NonFiniteTrainingError(
                f"{self.consecutive} consecutive optimizer steps with a non-finite loss or gradient (up to global "
                f"step {trainer.global_step}): the data or the learning rate is broken, not one batch. The weights "
                f"were not updated by those steps; the last checkpoint in {trainer.default_root_dir} is good. "
                "Raise --max_nonfinite_steps only if that is expected.")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.skipped and trainer.is_global_zero:
            log.warning("%d optimizer step(s) skipped for a non-finite loss or gradient during this run",
                        self.skipped)
