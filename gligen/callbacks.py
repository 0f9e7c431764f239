"""Lightning callbacks: data skip accounting and sample grids with the layout drawn, both to TensorBoard."""

from __future__ import annotations

import logging

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from .evaluation import grounding_inputs, layouts_from_batch
from .sampling import sample, tau_schedule
from .visualize import layout_grid

log = logging.getLogger(__name__)


class SkipLogger(L.Callback):
    """Logs the datamodule's per-reason skip counts (damaged samples) every epoch and summarises them at the end,
    so a long run never loses data silently."""

    def _counts(self, trainer) -> dict[str, int]:
        datamodule = trainer.datamodule
        return datamodule.skip_summary() if datamodule is not None and hasattr(datamodule, "skip_summary") else {}

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        counts = self._counts(trainer)
        if counts:
            pl_module.log_dict({f"data_skips/{k}": float(v) for k, v in counts.items()}, rank_zero_only=True)

    @rank_zero_only
    def on_fit_end(self, trainer, pl_module) -> None:
        counts = self._counts(trainer)
        if counts:
            log.warning("skipped samples during this run: %s", counts)


class SampleGrid(L.Callback):
    """Every `every_n_steps`, sample a fixed set of validation layouts (same seeds each time) and log the grid with
    boxes drawn, so TensorBoard shows grounding emerge."""

    def __init__(self, every_n_steps: int = 500, num_images: int = 8, steps: int = 25, guidance: float = 5.0,
                 tau: float = 1.0, seed: int = 0):
        self.every_n_steps, self.num_images = every_n_steps, num_images
        self.steps, self.guidance, self.tau, self.seed = steps, guidance, tau, seed
        self._batch = None

    def _layouts(self, trainer) -> list[dict] | None:
        if self._batch is None:
            datamodule = trainer.datamodule
            if datamodule is None or not getattr(datamodule, "val_shards", None):
                return None
            loader = datamodule.val_dataloader()
            self._batch = next(iter(loader))
        layouts = layouts_from_batch(self._batch)
        return layouts[: self.num_images]

    @rank_zero_only
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == 0 or step % self.every_n_steps or not trainer.loggers:
            return
        self.log_grid(trainer, pl_module)

    def log_grid(self, trainer, pl_module) -> None:
        layouts = self._layouts(trainer)
        if not layouts:
            return
        was_training = pl_module.training
        pl_module.eval()
        ldm = pl_module.ldm
        grounding = grounding_inputs(ldm, layouts, pl_module.hparams.max_objects)
        images = sample(ldm, [lay["caption"] for lay in layouts], grounding, tau_schedule(self.steps, self.tau),
                        steps=self.steps, guidance=self.guidance,
                        seeds=[self.seed + i for i in range(len(layouts))])
        pl_module.train(was_training)
        upscale = max(1, 128 // images.shape[-1])
        grid = layout_grid(images.cpu(), grounding["boxes"].cpu(), grounding["masks"].cpu(),
                           [[o["phrase"] for o in lay["objects"]] + [""] * 30 for lay in layouts],
                           nrow=4, upscale=upscale)
        experiment = trainer.logger.experiment
        if hasattr(experiment, "add_image"):
            experiment.add_image("samples/tau_%g" % self.tau, grid, trainer.global_step)
