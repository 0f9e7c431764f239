"""model.half_frozen: under bf16 mixed precision the frozen LDM's weights are bf16, while the trainable weights,
their gradients and the optimizer state stay fp32; training, validation sampling and sample grids still run."""

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from gligen.module import GLIGENModule
from gligen.training.callbacks import GroundingEvaluation, SampleGrid
from tests.helpers import RandomBoxDataModule


class Watch(Callback):
    def __init__(self):
        self.grad_dtypes, self.state_dtypes = set(), set()

    def on_after_backward(self, trainer, module):
        self.grad_dtypes |= {p.grad.dtype for _, p in module.trainable_named_parameters() if p.grad is not None}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        for state in trainer.optimizers[0].state.values():
            self.state_dtypes |= {v.dtype for k, v in state.items() if k in ("exp_avg", "exp_avg_sq")}


def fit(pretrained, tmp_path, precision, half_frozen, callbacks=(), **kwargs):
    L.seed_everything(0)
    module = GLIGENModule(pretrained, learning_rate=1e-3, warmup_steps=0, half_frozen=half_frozen)
    before = {n: p.detach().clone() for n, p in module.trainable_named_parameters()}
    trainer = L.Trainer(default_root_dir=tmp_path, max_steps=2, accelerator="cpu", devices=1, precision=precision,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, callbacks=list(callbacks), **{"logger": False, **kwargs})
    trainer.fit(module, RandomBoxDataModule())
    return module, before, trainer


def test_half_frozen_weights_under_bf16_with_fp32_training(tiny_pretrained, tmp_path):
    watch = Watch()
    evaluation = GroundingEvaluation(detector=lambda images: [[] for _ in images], steps=2, guidance=1.0,
                                     max_batches=1)
    grid = SampleGrid(every_n_steps=1, num_images=2, steps=2)
    module, before, trainer = fit(tiny_pretrained, tmp_path, "bf16-mixed", True, [watch, evaluation, grid],
                                  logger=TensorBoardLogger(tmp_path, name="", version=""),
                                  val_check_interval=2, limit_val_batches=1)
    frozen = {p.dtype for p in module.parameters() if not p.requires_grad}
    trainable = dict(module.trainable_named_parameters())
    assert frozen == {torch.bfloat16}
    assert {p.dtype for p in trainable.values()} == {torch.float32}
    assert watch.grad_dtypes == {torch.float32} and watch.state_dtypes == {torch.float32}
    assert all(not torch.equal(trainable[n], before[n]) for n in before if "position_net" in n)  # it trained
    assert "val/ap50_tau1" in trainer.callback_metrics  # validation sampling ran on the bf16 weights
    assert all(torch.isfinite(p).all() for p in trainable.values())


def test_half_frozen_does_nothing_in_fp32_and_is_off_by_default(tiny_pretrained, tmp_path):
    module, _, _ = fit(tiny_pretrained, tmp_path, "32-true", True, limit_val_batches=0)
    assert {p.dtype for p in module.parameters()} == {torch.float32}
    module, _, _ = fit(tiny_pretrained, tmp_path, "bf16-mixed", False, limit_val_batches=0)
    assert {p.dtype for p in module.parameters()} == {torch.float32}
