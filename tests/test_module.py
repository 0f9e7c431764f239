import os

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gligen.module import GLIGENModule
from gligen.nn.tokenizers import GroundingInputError
from gligen.toy.pipeline import TinyPipelineConfig, build_tiny_pipeline
from tests.helpers import RandomBoxDataModule, random_box_batch


def make_module(pretrained, **kwargs):
    defaults = dict(learning_rate=1e-3, warmup_steps=0)
    return GLIGENModule(pretrained, **{**defaults, **kwargs})


def trainer(tmp_path, max_steps, **kwargs):
    kwargs.setdefault("logger", False)
    kwargs.setdefault("enable_checkpointing", False)
    return L.Trainer(
        default_root_dir=tmp_path, max_steps=max_steps, accelerator="cpu", devices=1,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, **kwargs,
    )


class FrozenGradWatch(Callback):
    """Records any frozen parameter that holds a .grad after a backward pass."""

    def __init__(self):
        self.offenders = set()

    def on_after_backward(self, trainer, module):
        self.offenders |= {n for n, p in module.named_parameters() if not p.requires_grad and p.grad is not None}


def test_training_updates_only_grounding_and_never_grads_frozen(tiny_pretrained, tmp_path):
    L.seed_everything(0)
    module = make_module(tiny_pretrained)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    watch = FrozenGradWatch()
    trainer(tmp_path, max_steps=4, callbacks=[watch]).fit(module, RandomBoxDataModule())
    assert not watch.offenders
    frozen_changed = [n for n, p in module.named_parameters() if not p.requires_grad and not torch.equal(p, before[n])]
    trainable_same = [n for n, p in module.named_parameters() if p.requires_grad and torch.equal(p, before[n])]
    assert not frozen_changed
    assert not trainable_same
    assert module.ldm.vae.training is False and module.ldm.text_encoder.training is False


def test_checkpoint_holds_only_trainable_weights_and_resumes(tmp_path):
    # a frozen part several times larger than the position net (whose 512-wide MLP is fixed by the paper)
    config = TinyPipelineConfig(unet_channels=(64, 128), text_width=64, vae_channels=(32, 64), unet_layers_per_block=2)
    pretrained = str(build_tiny_pipeline(tmp_path / "ldm", config))
    L.seed_everything(0)
    module = make_module(pretrained)
    path = tmp_path / "two.ckpt"
    t = trainer(tmp_path, max_steps=2)
    t.fit(module, RandomBoxDataModule())
    t.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert set(ckpt["state_dict"]) == trainable
    full_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    trainable_bytes = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    # weights + two AdamW moments of the grounding layers, nothing of the frozen LDM
    assert os.path.getsize(path) < 3.2 * trainable_bytes < 0.6 * full_bytes

    saved = {k: v.clone() for k, v in ckpt["state_dict"].items()}
    seen = {}

    class AtStart(Callback):
        def on_train_start(self, trainer, pl_module):
            seen["step"] = trainer.global_step
            seen["weights"] = {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}

    fresh = make_module(pretrained)
    t2 = trainer(tmp_path, max_steps=3, callbacks=[AtStart()])
    t2.fit(fresh, RandomBoxDataModule(), ckpt_path=path)
    assert seen["step"] == t.global_step == 2
    assert all(torch.equal(seen["weights"][k], saved[k]) for k in saved)
    assert t2.global_step == 3


def test_checkpoint_from_another_model_is_refused(tiny_pretrained, tmp_path):
    module = make_module(tiny_pretrained)
    checkpoint = {"state_dict": {"ldm.unet.position_net.linears.0.weight": torch.zeros(1)}, "gligen": {"format": 1}}
    with pytest.raises(ValueError, match="missing .*fuser"):
        module.on_load_checkpoint(checkpoint)
    with pytest.raises(ValueError, match="not a GLIGENModule checkpoint"):
        module.on_load_checkpoint({"state_dict": {}})


def test_checkpoint_refuses_a_base_with_other_weights(tiny_pretrained, tmp_path):
    import shutil

    from gligen.ldm import weights_fingerprint

    L.seed_everything(0)
    t = trainer(tmp_path, max_steps=1)
    t.fit(make_module(tiny_pretrained), RandomBoxDataModule())
    path = tmp_path / "one.ckpt"
    t.save_checkpoint(path)
    assert torch.load(path, weights_only=True)["gligen"]["base_fingerprint"] == weights_fingerprint(tiny_pretrained)
    copy = shutil.copytree(tiny_pretrained, tmp_path / "copy")
    GLIGENModule.from_checkpoint(str(path), str(copy))  # same weights elsewhere: fine
    rebuilt = str(build_tiny_pipeline(tmp_path / "rebuilt", TinyPipelineConfig(), seed=1))  # same layout, other weights
    with pytest.raises(ValueError, match=r"one\.ckpt: trained on a base LDM with other weights than .*rebuilt"):
        GLIGENModule.from_checkpoint(str(path), rebuilt)
    assert GLIGENModule.from_checkpoint(str(path), rebuilt, allow_other_base=True).base_fingerprint != \
        weights_fingerprint(tiny_pretrained)


def test_logs_loss_learning_rate_and_every_gate(tiny_pretrained, tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    module = make_module(tiny_pretrained)
    logger = TensorBoardLogger(tmp_path, name="", version="")
    trainer(tmp_path, max_steps=2, logger=logger, log_every_n_steps=1).fit(module, RandomBoxDataModule())
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert "train/loss" in tags
    assert any(t.startswith("lr-AdamW") for t in tags)
    num_fusers = sum(1 for n, _ in module.named_modules() if n.endswith(".fuser"))
    assert len([t for t in tags if t.startswith("gate_attn/")]) == num_fusers
    assert len([t for t in tags if t.startswith("gate_dense/")]) == num_fusers


def test_gamma_init_reaches_every_fuser(tiny_pretrained):
    module = make_module(tiny_pretrained, gamma_init=0.25)
    values = module.gate_values()
    assert values and all(v.item() == pytest.approx(torch.tanh(torch.tensor(0.25)).item()) for v in values.values())


def test_grounding_dropout_modes(tiny_pretrained):
    torch.manual_seed(0)
    module = make_module(tiny_pretrained, caption_dropout=0.3, grounding_dropout=0.5)
    captions, grounding = module.dropout_masks(4000)
    assert 0.27 < captions.float().mean() < 0.33 and 0.47 < grounding.float().mean() < 0.53
    module.hparams.grounding_dropout_mode = "per_batch"
    batches = [module.dropout_masks(16)[1] for _ in range(200)]
    assert all(b.all() or not b.any() for b in batches)  # one coin per batch
    assert 0.35 < sum(bool(b[0]) for b in batches) / 200 < 0.65


def test_dropped_captions_and_grounding_become_null(tiny_pretrained):
    module = make_module(tiny_pretrained)
    batch = random_box_batch()
    drop = torch.tensor([True, False])
    context = module.batch_captions(batch, drop)
    assert torch.equal(context[0], module.ldm.encode_captions([""])[0])
    assert torch.equal(context[1], module.ldm.encode_captions([batch["captions"][1]])[0])
    precomputed = module.batch_captions({"caption_embeds": module.ldm.encode_captions(batch["captions"])}, drop)
    assert torch.allclose(precomputed, context)
    # detection data always trains with the null caption, also on the precomputed path
    kinds = {"caption_embeds": module.ldm.encode_captions(batch["captions"]), "kinds": ["grounding", "detection"]}
    detection = module.batch_captions(kinds, torch.tensor([False, False]))
    assert torch.allclose(detection[1], context[0])  # context[0] is the null caption
    assert torch.allclose(detection[0], kinds["caption_embeds"][0])
    grounding = module.batch_grounding(batch, drop)
    assert grounding["masks"][0].sum() == 0 and torch.equal(grounding["masks"][1], batch["masks"][1])


def test_precomputed_features_skip_frozen_encoders_and_give_the_same_loss(tiny_pretrained, monkeypatch):
    module = make_module(tiny_pretrained)
    batch = random_box_batch()
    posterior = module.ldm.vae.encode(batch["pixel_values"]).latent_dist
    precomputed = {
        "latent_mean": posterior.mean,
        "latent_std": posterior.std,
        "caption_embeds": module.ldm.encode_captions(batch["captions"]),
        "phrase_embeds": module.ldm.encode_phrases(batch["phrases"]),
        "boxes": batch["boxes"],
        "masks": batch["masks"],
    }
    no_drop = torch.zeros(2, dtype=torch.bool)
    torch.manual_seed(3)
    expected = module.diffusion_loss(batch, no_drop, no_drop)

    def refuse(*args, **kwargs):
        raise AssertionError("a frozen encoder ran although features were precomputed")

    monkeypatch.setattr(module.ldm.vae, "encode", refuse)
    monkeypatch.setattr(module.ldm.text_encoder, "forward", refuse)
    torch.manual_seed(3)
    assert torch.allclose(module.diffusion_loss(precomputed, no_drop, no_drop), expected, rtol=1e-5)


def test_v_prediction_target_follows_the_scheduler(tiny_pretrained):
    module = make_module(tiny_pretrained)
    batch = random_box_batch()
    no_drop = torch.zeros(2, dtype=torch.bool)
    torch.manual_seed(5)
    epsilon = module.diffusion_loss(batch, no_drop, no_drop)
    module.ldm.noise_scheduler.register_to_config(prediction_type="v_prediction")
    torch.manual_seed(5)
    velocity = module.diffusion_loss(batch, no_drop, no_drop)
    assert not torch.allclose(epsilon, velocity)


def test_bad_grounding_in_a_batch_names_the_sample(tiny_pretrained):
    module = make_module(tiny_pretrained)
    batch = random_box_batch()
    batch["boxes"][1, 0] = torch.tensor([0.6, 0.1, 0.2, 0.5])
    with pytest.raises(GroundingInputError, match="sample 1 \\(sample-1\\), object 0.*x0 < x1"):
        module.batch_grounding(batch)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_pretrained):
    batch = random_box_batch()
    no_drop = torch.zeros(2, dtype=torch.bool)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # same fuser initialisation
        module = make_module(tiny_pretrained, gamma_init=0.5, gradient_checkpointing=checkpointing)
        torch.manual_seed(7)
        module.diffusion_loss(batch, no_drop, no_drop).backward()
        grads.append({n: p.grad for n, p in module.named_parameters() if p.requires_grad})
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])


def test_channels_last_is_the_same_model(tiny_pretrained):
    batch = random_box_batch()
    no_drop = torch.zeros(2, dtype=torch.bool)
    results = []
    for channels_last in (False, True):
        torch.manual_seed(0)
        module = make_module(tiny_pretrained, gamma_init=0.5, channels_last=channels_last)
        conv = module.ldm.unet.conv_in.weight
        assert conv.is_contiguous(memory_format=torch.channels_last) == channels_last
        torch.manual_seed(7)
        loss = module.diffusion_loss(batch, no_drop, no_drop)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in module.named_parameters() if p.requires_grad}))
    assert torch.allclose(results[0][0], results[1][0], rtol=1e-5)
    assert all(torch.allclose(results[0][1][n], results[1][1][n], atol=1e-6) for n in results[0][1])


def test_null_caption_is_encoded_once(tiny_pretrained, monkeypatch):
    module = make_module(tiny_pretrained)
    embeds = {"caption_embeds": module.ldm.encode_captions(["a red circle", "a blue square"])}
    calls = []
    encode = module.ldm.encode_captions
    monkeypatch.setattr(module.ldm, "encode_captions", lambda captions: calls.append(captions) or encode(captions))
    drop = torch.tensor([True, False])
    first = module.batch_captions(embeds, drop)
    second = module.batch_captions(embeds, drop)
    assert calls == [[""]]  # once, not once per step
    assert torch.equal(first, second) and torch.equal(first[0], encode([""])[0])
    assert torch.equal(first[1], embeds["caption_embeds"][1])


def test_compile_unet_compiles_in_place_and_keeps_names(tiny_pretrained):
    """Compiled in place (nn.Module.compile): same module, same parameter names, so checkpoints still match. The
    compiled forward itself is not run here (inductor takes minutes on a 2-core CPU); bench_train --compile runs it."""
    plain = make_module(tiny_pretrained)
    compiled = make_module(tiny_pretrained, compile_unet=True)
    assert isinstance(compiled.ldm.unet, type(plain.ldm.unet))
    assert compiled.ldm.unet._compiled_call_impl is not None and plain.ldm.unet._compiled_call_impl is None
    assert [n for n, _ in compiled.trainable_named_parameters()] == [n for n, _ in plain.trainable_named_parameters()]
