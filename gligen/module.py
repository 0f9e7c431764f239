"""GLIGENModule: trains the grounding layers (fusers + position_net) on a frozen latent diffusion model.

Loss (paper eq. 6): E || eps - eps_theta(z_t, t, c_text, h_e) ||^2, with v-prediction when the base scheduler says so.
Checkpoints hold only the trainable weights (plus optimizer / schedule state); the frozen LDM is reloaded from
`pretrained`, which the checkpoint's hyper-parameters name.
"""

import functools
import inspect

import lightning as L
import torch
import torch.nn.functional as F
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from lightning.pytorch.callbacks import LearningRateMonitor

from gligen.checkpoint_file import EMA_KEY, read_checkpoint, sampled_weights, weights_hash
from gligen.constants import MAX_OBJECTS, MAX_PERSONS
from gligen.ldm import FrozenLDM, weights_fingerprint
from gligen.modalities import DEFAULT_MODALITY, Modality, get_modality
from gligen.nn.fourier import POSITION_ENCODINGS
from gligen.nn.fuser import FUSER_TYPES
from gligen.nn.grounded_unet import add_grounding, fusers
from gligen.presets import DEFAULT_PRESET, resolve

CHECKPOINT_FORMAT = 1
HALF_PRECISIONS = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}  # trainer.precision -> frozen dtype
LR_SCHEDULES = ("constant", "constant_with_warmup", "cosine")  # diffusers get_scheduler names


class GLIGENModule(L.LightningModule):
    """GLIGEN grounding layers on a frozen LDM.

    Args:
        pretrained: hub id or local diffusers Stable Diffusion directory of the frozen LDM.
        modality: grounding modality, a name registered in `gligen.modalities` (box, keypoint, image, text_image;
            see docs/batch_contract.md for the batch keys each needs).
        fuser_type: "gated_self_attention" (paper), "gated_cross_attention" or "ungated".
        position_encoding: how the grounding tokenizer sees coordinates: "fourier" (paper eq. 5) or "raw" (the
            coordinates as they are: the paper's ablation of the Fourier embedding).
        gamma_init: start value of every fuser's alpha_attn / alpha_dense (gate = tanh(gamma)).
        learning_rate: AdamW lr of fusers and position_net (official 5e-5).
        gate_learning_rate: lr of the alpha gates; None = learning_rate.
        weight_decay: AdamW weight decay (official 0).
        warmup_steps: linear warm-up steps (official 10k); constant_with_warmup and cosine use them.
        lr_schedule: diffusers `get_scheduler` name: "constant_with_warmup" (official default), "constant" or
            "cosine" (warm-up, then cosine decay to 0 at the run's last step, `trainer.max_steps`).
        half_frozen: under mixed precision (`trainer.precision` bf16-mixed / 16-mixed) keep the frozen LDM's
            weights (UNet, VAE, text encoder) in that half dtype, as diffusers' training scripts do: they are only
            read, and autocast computes in half precision anyway. The trainable weights, their gradients and the
            optimizer state stay fp32. About half the memory of the frozen weights at SD scale; no effect in fp32.
        ema_decay: keep an exponential moving average of the trainable weights (diffusers `EMAModel`, e.g. 0.9999;
            official: optional, off). Checkpoints hold it next to the raw weights, and `from_checkpoint` samples
            with it (`use_ema=False`: the raw weights). None: off.
        preset: "paper" (default) or "official": where the paper and the official code differ (gligen/presets.py),
            the value of every setting below left at None; the data module follows the model's preset.
        caption_dropout: probability of replacing a caption with "" (classifier-free guidance); None: the preset's
            (paper 0.1; official 0.5, keypoint 0).
        grounding_dropout: probability of nulling the grounding (paper 0.1).
        grounding_dropout_mode: "per_sample" or "per_batch" (one coin for the whole batch); None: the preset's
            (paper per_sample, official per_batch).
        gradient_checkpointing: recompute UNet blocks in backward to save memory.
        channels_last: keep the UNet weights and latents in channels-last memory format (faster convolutions with
            cuDNN / oneDNN; numerically the same model).
        compile_unet: `torch.compile` the UNet in place (parameter names unchanged, so checkpoints still match);
            the first steps pay the compilation.
        max_objects: grounding slots (official 30).
        max_persons: person slots of the keypoint modality (official 8; 17 tokens each).
        check_inputs: validate grounding inputs of every batch (names the bad sample).
    """

    def __init__(
        self,
        pretrained: str,
        modality: str = DEFAULT_MODALITY,
        fuser_type: str = "gated_self_attention",
        position_encoding: str = "fourier",
        gamma_init: float = 0.0,
        learning_rate: float = 5e-5,
        gate_learning_rate: float | None = None,
        weight_decay: float = 0.0,
        warmup_steps: int = 10_000,
        caption_dropout: float | None = None,
        grounding_dropout: float = 0.1,
        grounding_dropout_mode: str | None = None,
        gradient_checkpointing: bool = False,
        channels_last: bool = False,
        compile_unet: bool = False,
        max_objects: int = MAX_OBJECTS,
        check_inputs: bool = True,
        max_persons: int = MAX_PERSONS,
        lr_schedule: str = "constant_with_warmup",
        ema_decay: float | None = None,
        half_frozen: bool = False,
        preset: str = DEFAULT_PRESET,
    ):
        super().__init__()
        self.modality: Modality = get_modality(modality)  # raises for an unknown name
        # the preset fills what is left at None (and checks the values); hparams and checkpoints record them
        caption_dropout, grounding_dropout_mode = resolve(
            preset, modality, caption_dropout=caption_dropout, grounding_dropout_mode=grounding_dropout_mode).values()
        if fuser_type not in FUSER_TYPES:
            raise ValueError(f"fuser_type must be one of {FUSER_TYPES}, got {fuser_type!r}")
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
        if ema_decay is not None and not 0 < ema_decay < 1:
            raise ValueError(f"ema_decay must lie in (0, 1) or be None, got {ema_decay}")
        self.save_hyperparameters()
        # LightningCLI hands save_hyperparameters the arguments as given (None): record the resolved values
        self.hparams.update(caption_dropout=caption_dropout, grounding_dropout_mode=grounding_dropout_mode)
        self.ldm = FrozenLDM(pretrained)
        self.allow_other_base = False  # from_checkpoint(..., allow_other_base=True) sets it before loading
        # recorded, never guessed: samplers and sample grids read it (image and text_image share a tokenizer)
        self.ldm.grounding_modality = modality
        if position_encoding not in POSITION_ENCODINGS:
            raise ValueError(f"position_encoding must be one of {POSITION_ENCODINGS}, got {position_encoding!r}")
        # a modality written before the option gets the argument only when it is not the default
        encoding = {} if position_encoding == "fourier" else {"position_encoding": position_encoding}
        position_net = self.modality.position_net(token_dim=self.ldm.unet.config.cross_attention_dim,
                                                  text_dim=self.ldm.text_encoder.config.hidden_size,
                                                  max_persons=max_persons, **encoding)
        add_grounding(self.ldm.unet, position_net, fuser_type=fuser_type, gamma_init=gamma_init)
        if gradient_checkpointing:
            self.ldm.unet.enable_gradient_checkpointing()
        if channels_last:
            self.ldm.unet.to(memory_format=torch.channels_last)
        if compile_unet:
            self.ldm.unet.compile()
        self._null_caption: torch.Tensor | None = None  # the frozen text encoder's "" features, encoded once
        # how this model was trained, written into every checkpoint (the CLI fills it: config, data, code)
        self.training_provenance: dict = {}
        self._earlier_commits: list[str] = []  # commits of the attempts before a resume
        self.ema: EMAModel | None = None  # made at fit start, on the weights' device (ema_decay)
        self._ema_restored: dict | None = None  # a resumed run's EMA state until the EMA exists
        # Lightning checkpoints hold only trainable weights; `on_load_checkpoint` checks they are all there
        self.strict_loading = False

    # ----- what is trained, what is frozen -------------------------------------------------------------------
    def trainable_named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def train(self, mode: bool = True):
        """Frozen parts stay in eval mode whatever Lightning asks (no dropout / norm statistics updates)."""
        super().train(mode)
        self.ldm.eval()
        for _, fuser in fusers(self.ldm.unet):
            fuser.train(mode)
        self.ldm.unet.position_net.train(mode)
        return self

    # ----- batch -> model inputs -------------------------------------------------------------------------------
    def batch_latents(self, batch: dict) -> torch.Tensor:
        if "latent_mean" in batch:  # precomputed VAE posterior: sample it here so every epoch sees fresh noise
            mean, std = batch["latent_mean"].float(), batch["latent_std"].float()
            return (mean + std * torch.randn(mean.shape, device=mean.device)) * self.ldm.scaling_factor
        return self.ldm.encode_images(batch["pixel_values"])

    def batch_captions(self, batch: dict, drop: torch.Tensor) -> torch.Tensor:
        """Caption context [B, 77, D]; samples where `drop` is True, and detection data, get the null caption "",
        except detection samples the data module gave a caption of their category names (`category_captions`)."""
        written = batch.get("category_captions") or [False] * len(drop)
        if "kinds" in batch:
            detection = [k == "detection" and not w for k, w in zip(batch["kinds"], written)]
            drop = drop | torch.tensor(detection, device=drop.device)
        if "caption_embeds" in batch:
            embeds = batch["caption_embeds"].float()
            if any(written):  # the stored features are of the data's own caption: encode the written ones here
                rows = [i for i, w in enumerate(written) if w]
                embeds = embeds.clone()
                embeds[rows] = self.ldm.encode_captions([batch["captions"][i] for i in rows]).to(embeds)
            if drop.any():
                embeds = torch.where(drop[:, None, None], self.null_caption().to(embeds.dtype), embeds)
            return embeds
        captions = ["" if d else c for c, d in zip(batch["captions"], drop.tolist())]
        return self.ldm.encode_captions(captions)

    @torch.no_grad()
    def null_caption(self) -> torch.Tensor:
        """Features [1, 77, D] of the empty caption. The text encoder is frozen, so they are encoded once (and again
        only if the module moves to another device) instead of once per training step."""
        device = self.ldm.text_encoder.device
        if self._null_caption is None or self._null_caption.device != device:
            self._null_caption = self.ldm.encode_captions([""])
        return self._null_caption

    def batch_grounding(self, batch: dict, drop: torch.Tensor | None = None,
                        generator: torch.Generator | None = None) -> dict:
        """`cross_attention_kwargs["gligen"]` for the UNet (the position_net's keyword arguments, built by the
        modality); samples where `drop` is True get null grounding."""
        hp = self.hparams
        grounding = self.modality.batch_inputs(self.ldm, batch, training=self.training, generator=generator,
                                               check=hp.check_inputs, max_objects=hp.max_objects,
                                               max_persons=hp.max_persons)
        return grounding if drop is None else self.modality.null_grounding(grounding, drop)

    def dropout_masks(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Classifier-free guidance dropout: which samples lose their caption, which lose their grounding."""
        hp = self.hparams
        drop_caption = torch.rand(batch_size, device=self.device) < hp.caption_dropout
        if hp.grounding_dropout_mode == "per_batch":
            drop_grounding = (torch.rand((), device=self.device) < hp.grounding_dropout).expand(batch_size)
        else:
            drop_grounding = torch.rand(batch_size, device=self.device) < hp.grounding_dropout
        return drop_caption, drop_grounding

    # ----- the objective ---------------------------------------------------------------------------------------
    def diffusion_loss(self, batch: dict, drop_caption: torch.Tensor, drop_grounding: torch.Tensor,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        latents = self.batch_latents(batch)
        context = self.batch_captions(batch, drop_caption)
        grounding = self.batch_grounding(batch, drop_grounding, generator)
        scheduler = self.ldm.noise_scheduler
        noise = torch.randn(latents.shape, generator=generator, device=latents.device)
        timesteps = torch.randint(
            0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator, device=latents.device
        )
        noisy = scheduler.add_noise(latents, noise, timesteps)
        if self.hparams.channels_last:
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        if scheduler.config.prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        prediction = self.ldm.unet(
            noisy, timesteps, encoder_hidden_states=context, cross_attention_kwargs={"gligen": grounding}
        ).sample
        return F.mse_loss(prediction.float(), target.float())

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        batch_size = len(batch["boxes"])
        loss = self.diffusion_loss(batch, *self.dropout_masks(batch_size))
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        if self.global_step % self.trainer.log_every_n_steps == 0:
            self.log_dict(self.gate_values(), batch_size=batch_size)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # fixed noise and timesteps per batch index so validation loss is comparable across evaluations
        generator = torch.Generator(self.device).manual_seed(batch_idx)
        no_drop = torch.zeros(len(batch["boxes"]), dtype=torch.bool, device=self.device)
        loss = self.diffusion_loss(batch, no_drop, no_drop, generator)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(batch["boxes"]))
        return loss

    def gate_values(self) -> dict[str, torch.Tensor]:
        """tanh(alpha_attn), tanh(alpha_dense) per fuser: what the gamma-init ablation watches."""
        values = {}
        for name, fuser in fusers(self.ldm.unet):
            attn, dense = fuser.gates()
            values[f"gate_attn/{name}"] = attn.detach()
            values[f"gate_dense/{name}"] = dense.detach()
        return values

    # ----- optimisation ----------------------------------------------------------------------------------------
    def configure_optimizers(self):
        hp = self.hparams
        gates = [p for n, p in self.trainable_named_parameters() if n.endswith(("alpha_attn", "alpha_dense"))]
        others = [p for n, p in self.trainable_named_parameters() if not n.endswith(("alpha_attn", "alpha_dense"))]
        groups = [{"params": others, "lr": hp.learning_rate}]
        if gates:
            groups.append({"params": gates, "lr": hp.gate_learning_rate or hp.learning_rate})
        optimizer = torch.optim.AdamW(groups, lr=hp.learning_rate, weight_decay=hp.weight_decay)
        total = None
        if hp.lr_schedule == "cosine":
            total = self.trainer.max_steps
            if total is None or total <= 0:
                raise ValueError("lr_schedule cosine decays over trainer.max_steps: set it (> 0)")
        scheduler = get_scheduler(hp.lr_schedule, optimizer, num_training_steps=total,
                                  num_warmup_steps=None if hp.lr_schedule == "constant" else hp.warmup_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        """A resume restores learning rates and weight decay from the checkpoint's optimizer and schedule; a run
        resumed on purpose with other values (`--allow_config_change`) must train with the configured ones."""
        hp = self.hparams
        for config in self.trainer.lr_scheduler_configs:
            scheduler, groups = config.scheduler, config.scheduler.optimizer.param_groups
            wanted = [hp.learning_rate, hp.gate_learning_rate or hp.learning_rate][:len(groups)]
            lambdas = getattr(scheduler, "lr_lambdas", None)
            if lambdas is None or list(scheduler.base_lrs) == wanted:
                continue
            scheduler.base_lrs = wanted
            for group, base, factor in zip(groups, wanted, lambdas):
                group["initial_lr"], group["lr"] = base, base * factor(scheduler.last_epoch)
        for optimizer in self.trainer.optimizers:
            for group in optimizer.param_groups:
                group["weight_decay"] = hp.weight_decay

    def cast_frozen(self, dtype: torch.dtype) -> None:
        """The frozen weights (every parameter that does not train) in `dtype`; trainable ones are left as they are."""
        for p in self.parameters():
            if not p.requires_grad and p.dtype != dtype:
                p.data = p.data.to(dtype)
        self._null_caption = None  # encoded again by the cast text encoder

    # ----- fit start: half-precision frozen weights (half_frozen), EMA (ema_decay) ---------------------------------
    def on_fit_start(self) -> None:
        half = HALF_PRECISIONS.get(str(self.trainer.precision))
        if self.hparams.half_frozen and half is not None:
            self.cast_frozen(half)
        if self.hparams.ema_decay is None or self.ema is not None:
            return
        names, params = zip(*self.trainable_named_parameters())
        self.ema = EMAModel(params, decay=self.hparams.ema_decay)
        if self._ema_restored is not None:  # resumed: continue the average where the checkpoint left it
            shadow = [self._ema_restored["weights"][n].to(p.device, p.dtype) for n, p in zip(names, params)]
            self.ema.load_state_dict({**self._ema_restored["state"], "shadow_params": shadow})

    def on_before_zero_grad(self, optimizer) -> None:
        if self.ema is not None:  # once per optimizer step, after it (gradient accumulation included)
            self.ema.step([p for _, p in self.trainable_named_parameters()])

    def configure_callbacks(self):
        return [LearningRateMonitor(logging_interval="step")] if self.trainer.loggers else []

    @classmethod
    def from_checkpoint(cls, path: str, pretrained: str | None = None, map_location="cpu",
                        allow_other_base: bool = False, use_ema: bool = True) -> "GLIGENModule":
        """Rebuild from a checkpoint of this module: the frozen LDM from `pretrained` (default: the one the run
        used), the grounding layers from the file (`.ckpt` loaded with `weights_only=True`, no unpickling; or a
        `.safetensors` checkpoint, see gligen.checkpoint_file.read_checkpoint). A base whose
        weights differ from the one the run trained on is an error unless `allow_other_base` (e.g. grounding layers
        on purpose on another SD-1.x fine-tune). A checkpoint with EMA weights loads those unless `use_ema=False`."""
        checkpoint = read_checkpoint(path, map_location)
        if "hyper_parameters" not in checkpoint:
            raise ValueError(f"{path}: not a GLIGENModule checkpoint (no 'hyper_parameters')")
        # LightningCLI adds bookkeeping entries (e.g. `_instantiator`): keep only constructor arguments
        accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
        hparams = {k: v for k, v in checkpoint["hyper_parameters"].items() if k in accepted}
        if pretrained is not None:
            hparams["pretrained"] = pretrained
        module = cls(**hparams)
        module.allow_other_base = allow_other_base
        try:
            module.on_load_checkpoint(checkpoint)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
        module.load_state_dict(sampled_weights(checkpoint) if use_ema else checkpoint["state_dict"], strict=False)
        return module.eval()

    # ----- checkpoints: trainable weights only -----------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = {n for n, _ in self.trainable_named_parameters()}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        if self.ema is not None:
            names = [n for n, _ in self.trainable_named_parameters()]
            checkpoint[EMA_KEY] = {n: w.detach().clone() for n, w in zip(names, self.ema.shadow_params)}
        # the weights as training saved them: a later edit of the file shows (checkpoint_identity: weights_changed)
        checkpoint["gligen"] = {"format": CHECKPOINT_FORMAT, "pretrained": self.hparams.pretrained,
                                "base_fingerprint": self.base_fingerprint, "modality": self.modality.name,
                                "weights_hash": weights_hash(checkpoint["state_dict"], checkpoint.get(EMA_KEY))}
        if self.ema is not None:  # the average's own counters (decay, steps), so a resume continues it
            checkpoint["gligen"]["ema"] = {k: v for k, v in self.ema.state_dict().items() if k != "shadow_params"}
        if self.training_provenance:
            commits = list(self._earlier_commits)
            if self.training_provenance.get("commit") and self.training_provenance["commit"] not in commits[-1:]:
                commits.append(self.training_provenance["commit"])
            checkpoint["gligen"]["training"] = {**self.training_provenance, "commits": commits}
        try:
            max_steps = self.trainer.max_steps
        except RuntimeError:  # not attached to a Trainer (a checkpoint written by hand)
            max_steps = -1
        if max_steps > 0:
            # the run's target when this was written: results can tell a finished checkpoint from a half-trained one
            checkpoint["gligen"]["max_steps"] = int(max_steps)

    @functools.cached_property
    def base_fingerprint(self) -> str | None:
        return weights_fingerprint(self.hparams.pretrained)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "gligen" not in checkpoint or "state_dict" not in checkpoint:
            raise ValueError("not a GLIGENModule checkpoint: it has no 'gligen' / 'state_dict' entry")
        expected = {n for n, _ in self.trainable_named_parameters()}
        found = set(checkpoint["state_dict"])
        missing, unexpected = sorted(expected - found), sorted(found - expected)
        if missing or unexpected:
            raise ValueError(
                "checkpoint does not match this model's grounding layers: "
                f"missing {missing[:10]}{' ...' if len(missing) > 10 else ''}, "
                f"unexpected {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}"
            )
        self._earlier_commits = list((checkpoint["gligen"].get("training") or {}).get("commits") or [])
        if self.hparams.ema_decay is not None and EMA_KEY in checkpoint and "ema" in checkpoint["gligen"]:
            self._ema_restored = {"weights": checkpoint[EMA_KEY], "state": checkpoint["gligen"]["ema"]}
        trained_on = checkpoint["gligen"].get("base_fingerprint")  # absent in converted / older checkpoints
        if trained_on and self.base_fingerprint and trained_on != self.base_fingerprint \
                and not self.allow_other_base:
            raise ValueError(
                f"trained on a base LDM with other weights than {self.hparams.pretrained} (fingerprint {trained_on}, "
                f"this base {self.base_fingerprint}): the base was rebuilt or replaced since; retrain, or load with "
                "allow_other_base=True if that is intended")
