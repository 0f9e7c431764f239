"""Lightning callbacks: data skip accounting and sample grids with the layout drawn, both to TensorBoard."""

from __future__ import annotations

import logging

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from gligen.evaluation.generate import generate, layouts_from_batch
from gligen.evaluation.visualize import layouts_grid
from gligen.metrics.detectors import make_detector
from gligen.metrics.grounding import ap_summary, map_inputs, stable_label_id
from gligen.presets import DEFAULT_PRESET, resolve
from gligen.sampling import SamplingInterrupted, sample, tau_schedule
from gligen.training.preemption import SlurmRequeue, preemption_requested

log = logging.getLogger(__name__)


class SkipLogger(L.Callback):
    """The data pipeline's counts, so a long run never loses data silently: skipped samples by reason
    (``data_skips/train/<reason>``, ``data_skips/val/<reason>``) and objects / persons dropped from kept samples
    (``data_drops/train/<reason>``, ...), logged to TensorBoard at every epoch end and at the end of training, and
    printed by rank 0 at the end of fit.

    Training counts are summed over DataLoader workers (batches carry them to the datamodule) and over DDP ranks
    (gathered here: every rank takes part in the collective). Validation counts come from each rank reading the
    whole validation set (the same on every rank), so rank 0's are taken."""

    def __init__(self):
        self.totals: dict[str, int] = {}

    @staticmethod
    def _local(trainer) -> dict[str, int]:
        datamodule = trainer.datamodule
        out: dict[str, int] = {}
        for prefix, method in (("data_skips", "skip_summary"), ("data_drops", "drop_summary")):
            if datamodule is not None and hasattr(datamodule, method):
                out.update({f"{prefix}/{k}": int(v) for k, v in getattr(datamodule, method)().items()})
        return out

    def global_counts(self, trainer) -> dict[str, int]:
        """This process's counts, summed over ranks under DDP (a collective: call it on every rank)."""
        import torch.distributed as dist

        local = self._local(trainer)
        if trainer.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
            return local
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local)
        names = sorted(set().union(*gathered))
        return {name: gathered[0].get(name, 0) if name.split("/")[1] == "val" else sum(g.get(name, 0) for g in gathered)
                for name in names}

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.totals = self.global_counts(trainer)
        if self.totals:
            pl_module.log_dict({k: float(v) for k, v in self.totals.items()}, rank_zero_only=True)

    def on_train_end(self, trainer, pl_module) -> None:
        # before the strategy's teardown (on_fit_end comes after it): the last collective happens here
        self.totals = self.global_counts(trainer)
        if self.totals and trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({k: float(v) for k, v in self.totals.items()}, step=trainer.global_step)

    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            print(format_data_counts(self.totals, trainer.world_size), flush=True)


def format_data_counts(totals: dict[str, int], world_size: int = 1) -> str:
    """``SkipLogger.totals`` as the end-of-fit summary."""
    if not totals:
        return "data: no sample skipped, no object dropped"
    ranks = f" (summed over {world_size} ranks and their loader workers)" if world_size > 1 else ""
    lines = [f"data: skipped samples and dropped objects by reason{ranks}:"]
    lines += [f"  {name.replace('data_', '', 1)}: {n}" for name, n in sorted(totals.items())]
    return "\n".join(lines)


class SampleGrid(L.Callback):
    """Every `every_n_steps`, sample a fixed set of validation layouts (same seeds each time) and log the grid with
    the layout drawn (boxes and labels; keypoints and skeletons for the keypoint modality), so TensorBoard shows
    grounding emerge. The grounding inputs follow the module's modality (box, keypoint, image, text_image);
    `sampler` and `negative_prompt` left at None follow the module's preset (paper: DDIM, ""; official: PLMS, the
    official negative prompt)."""

    def __init__(self, every_n_steps: int = 500, num_images: int = 8, steps: int = 25, guidance: float = 5.0,
                 tau: float = 1.0, seed: int = 0, sampler: str | None = None, negative_prompt: str | None = None):
        self.every_n_steps, self.num_images = every_n_steps, num_images
        self.steps, self.guidance, self.tau, self.seed = steps, guidance, tau, seed
        self.sampler, self.negative_prompt = sampler, negative_prompt
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
        grounding = pl_module.modality.layout_inputs(ldm, layouts, pl_module.hparams.max_objects)
        chosen = resolve(pl_module.hparams.get("preset", DEFAULT_PRESET), sampler=self.sampler,
                         negative_prompt=self.negative_prompt)
        try:  # in the trainer's precision: frozen weights may be half precision (GLIGENModule half_frozen)
            with trainer.precision_plugin.forward_context():
                images = sample(ldm, [lay["caption"] for lay in layouts], grounding,
                                tau_schedule(self.steps, self.tau), sampler=chosen["sampler"], steps=self.steps,
                                guidance=self.guidance, seeds=[self.seed + i for i in range(len(layouts))],
                                interrupt=preemption_requested, negative_prompt=chosen["negative_prompt"])
        except SamplingInterrupted:
            log.warning("preemption signal: sample grid of step %d abandoned", trainer.global_step)
            return
        finally:
            pl_module.train(was_training)
        grid = layouts_grid(images.cpu(), layouts, nrow=4)
        experiment = trainer.logger.experiment
        if hasattr(experiment, "add_image"):
            experiment.add_image("samples/tau_%g" % self.tau, grid, trainer.global_step)


class GroundingEvaluation(L.Callback):
    """Grounding accuracy inside Lightning validation, rank-aware.

    Each rank samples the layouts of its own validation batches (Lightning's distributed sampler splits them),
    runs the detector and feeds a torchmetrics MeanAveragePrecision, whose `compute()` gathers every rank's
    detections, so `val/ap*` is the AP over the whole validation set on every rank. Labels become integers by a
    stable hash, so ranks agree on them without exchanging vocabularies. Lightning's distributed sampler pads the
    validation set to a multiple of the number of ranks (repeating up to world_size - 1 samples): keep its size a
    multiple of the rank count for an exact figure.

    Args:
        detector: "toy" (the exact toy detector) or a transformers object-detection model directory / hub id.
        tau: scheduled sampling for these samples (1 = grounding at every step).
        max_batches: evaluate only the first validation batches of each rank (sampling is the expensive part).
    """

    def __init__(self, detector="toy", tau: float = 1.0, steps: int = 25, guidance: float = 3.0,
                 sampler: str = "ddim", max_batches: int | None = None, seed: int = 0):
        self.detector_name, self.tau, self.steps, self.guidance = detector, tau, steps, guidance
        self.sampler, self.max_batches, self.seed = sampler, max_batches, seed
        self._detector = None
        self.metric = None
        self._aborted = False

    @property
    def detector(self):
        if self._detector is None:
            # a registered name ("toy"), a Detector (images -> detections) from Python, or a transformers model
            self._detector = make_detector(self.detector_name)
        return self._detector

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        from torchmetrics.detection import MeanAveragePrecision

        self.metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox").to(pl_module.device)
        self._aborted = False

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.sanity_checking or (self.max_batches is not None and batch_idx >= self.max_batches):
            return
        layouts = layouts_from_batch(batch)
        # distinct, reproducible seeds per (rank, batch): a rank's images do not depend on the others
        seed = self.seed + batch_idx * trainer.world_size + trainer.global_rank
        try:  # validation_step's precision context does not cover callbacks
            with trainer.precision_plugin.forward_context():
                images = generate(pl_module.ldm, layouts, tau_schedule(self.steps, self.tau), seed=seed,
                                  sampler=self.sampler, steps=self.steps, guidance=self.guidance,
                                  batch_size=len(layouts), progress=False,
                                  max_objects=pl_module.hparams.max_objects, interrupt=preemption_requested)
        except SamplingInterrupted:
            self._aborted = True  # the rest of this validation is skipped (SlurmRequeue); no AP from a part of it
            return
        preds, targets = map_inputs(self.detector(images), layouts, stable_label_id)
        device = pl_module.device
        self.metric.update([{k: v.to(device) for k, v in p.items()} for p in preds],
                           [{k: v.to(device) for k, v in t.items()} for t in targets])

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or self.metric is None or self.max_batches == 0:
            return  # every rank takes the same branch: compute() below is a collective under DDP
        requeue = SlurmRequeue.of(trainer)
        aborted = self._aborted or (requeue is not None and requeue.validation_aborted)
        if trainer.strategy.reduce_boolean_decision(aborted, all=False):  # every rank: a collective too
            log.warning("validation cut short by a preemption signal: val/ap* not logged at step %d",
                        trainer.global_step)
            self.metric.reset()
            return

        for name, value in ap_summary(self.metric.compute()).items():  # compute() already syncs ranks
            pl_module.log(f"val/{name}_tau{self.tau:g}", value, sync_dist=False)
        self.metric.reset()
