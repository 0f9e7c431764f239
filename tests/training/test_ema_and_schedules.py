"""EMA of the trainable weights (model.ema_decay) and learning-rate schedules (model.lr_schedule, diffusers'
get_scheduler): the EMA differs from the raw weights, lives in checkpoints (.ckpt and safetensors), continues on a
resume, and is what sampling loads; each schedule gives its learning rate curve."""

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from gligen.checkpoint_file import (
    EMA_KEY,
    checkpoint_identity,
    read_checkpoint,
    save_safetensors_checkpoint,
    weights_hash,
)
from gligen.module import GLIGENModule
from tests.helpers import RandomBoxDataModule


def make_module(pretrained, **kwargs):
    return GLIGENModule(pretrained, **{"learning_rate": 1e-2, "warmup_steps": 0, **kwargs})


def fit(module, tmp_path, max_steps, ckpt_path=None, callbacks=()):
    trainer = L.Trainer(default_root_dir=tmp_path, max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=list(callbacks))
    trainer.fit(module, RandomBoxDataModule(), ckpt_path=ckpt_path)
    return trainer


def trainable(module):
    return {n: p.detach().clone() for n, p in module.trainable_named_parameters()}


def test_ema_is_saved_differs_from_the_raw_weights_and_is_what_sampling_loads(tiny_pretrained, tmp_path):
    L.seed_everything(0)
    start = make_module(tiny_pretrained, ema_decay=0.5)
    initial = trainable(start)
    trainer = fit(start, tmp_path, max_steps=3)
    trainer.save_checkpoint(tmp_path / "ema.ckpt")
    checkpoint = torch.load(tmp_path / "ema.ckpt", weights_only=True)
    raw, ema = checkpoint["state_dict"], checkpoint[EMA_KEY]
    assert set(ema) == set(raw) == set(initial)
    moved = [n for n in raw if not torch.equal(raw[n], initial[n])]
    assert moved and all(not torch.equal(ema[n], raw[n]) for n in moved)  # an average, not a copy
    # between the start and the raw weights: decay 0.5 after 3 steps averages the trajectory
    name = moved[0]
    assert (ema[name] - raw[name]).abs().sum() < (initial[name] - raw[name]).abs().sum()
    assert checkpoint["gligen"]["ema"]["optimization_step"] == 3

    sampled = GLIGENModule.from_checkpoint(str(tmp_path / "ema.ckpt"))
    assert all(torch.equal(p, ema[n]) for n, p in sampled.trainable_named_parameters())
    unaveraged = GLIGENModule.from_checkpoint(str(tmp_path / "ema.ckpt"), use_ema=False)
    assert all(torch.equal(p, raw[n]) for n, p in unaveraged.trainable_named_parameters())

    # the identity of a result names the sampled weights: the hash covers the EMA, and a safetensors copy keeps it
    identity = checkpoint_identity(tmp_path / "ema.ckpt")
    assert identity["ema"] and identity["weights_changed"] is False
    assert identity["weights_hash"] != weights_hash(raw)
    path = save_safetensors_checkpoint(checkpoint, tmp_path / "ema.safetensors")
    copy = read_checkpoint(path)
    assert set(copy["state_dict"]) == set(raw) and all(torch.equal(copy[EMA_KEY][n], ema[n]) for n in ema)
    assert checkpoint_identity(path)["weights_hash"] == identity["weights_hash"]
    shipped = GLIGENModule.from_checkpoint(str(path))
    assert all(torch.equal(p, ema[n]) for n, p in shipped.trainable_named_parameters())


def test_without_ema_checkpoints_and_hashes_are_as_before(tiny_pretrained, tmp_path):
    L.seed_everything(0)
    trainer = fit(make_module(tiny_pretrained), tmp_path, max_steps=1)
    trainer.save_checkpoint(tmp_path / "plain.ckpt")
    checkpoint = torch.load(tmp_path / "plain.ckpt", weights_only=True)
    assert EMA_KEY not in checkpoint and "ema" not in checkpoint["gligen"]
    assert checkpoint["gligen"]["weights_hash"] == weights_hash(checkpoint["state_dict"])
    assert checkpoint_identity(tmp_path / "plain.ckpt")["ema"] is False


def test_a_resumed_run_continues_the_average(tiny_pretrained, tmp_path):
    L.seed_everything(0)
    fit(first := make_module(tiny_pretrained, ema_decay=0.9), tmp_path, max_steps=2).save_checkpoint(
        tmp_path / "two.ckpt")
    saved = torch.load(tmp_path / "two.ckpt", weights_only=True)
    seen = {}

    class AtStart(Callback):
        def on_train_start(self, trainer, module):
            seen["shadow"] = [s.detach().clone() for s in module.ema.shadow_params]
            seen["step"] = module.ema.optimization_step

    resumed = make_module(tiny_pretrained, ema_decay=0.9)
    fit(resumed, tmp_path, max_steps=3, ckpt_path=tmp_path / "two.ckpt", callbacks=[AtStart()])
    names = [n for n, _ in resumed.trainable_named_parameters()]
    assert seen["step"] == 2 and all(torch.equal(s, saved[EMA_KEY][n]) for s, n in zip(seen["shadow"], names))
    assert resumed.ema.optimization_step == 3
    assert first.ema is not resumed.ema


def learning_rates(pretrained, tmp_path, max_steps, **kwargs):
    rates = []

    class Watch(Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            rates.append(trainer.optimizers[0].param_groups[0]["lr"])

    fit(make_module(pretrained, **kwargs), tmp_path, max_steps=max_steps, callbacks=[Watch()])
    return rates


def test_learning_rate_schedules(tiny_pretrained, tmp_path):
    lr = 1e-2
    assert learning_rates(tiny_pretrained, tmp_path, 4, lr_schedule="constant", warmup_steps=2) == [lr] * 4
    warm = learning_rates(tiny_pretrained, tmp_path, 4, lr_schedule="constant_with_warmup", warmup_steps=2)
    assert warm == pytest.approx([0.0, lr / 2, lr, lr])
    cosine = learning_rates(tiny_pretrained, tmp_path, 6, lr_schedule="cosine", warmup_steps=2)
    expected = [0.0, lr / 2] + [lr * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert cosine == pytest.approx(expected)


def test_bad_schedule_and_decay_are_refused(tiny_pretrained):
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        make_module(tiny_pretrained, lr_schedule="linear_ish")
    with pytest.raises(ValueError, match="ema_decay"):
        make_module(tiny_pretrained, ema_decay=1.0)
