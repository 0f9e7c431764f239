"""Builders shared by the test files: small in-memory data, callbacks that configs name by class_path
(`tests.helpers.X`), training-config writers, the tiny toy world and official-layout checkpoints.

Fixtures live in conftest.py; a test module imports builders from here and never from another test module.
"""

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch
import yaml
from torch.utils.data import DataLoader, Dataset

from gligen.experiments.config import toy_train_config
from gligen.module import GLIGENModule
from gligen.toy.build import ToyBuildConfig
from gligen.toy.pretrain import PretrainConfig
from gligen.training.rundir import load_config

ROOT = Path(__file__).resolve().parents[1]  # the checkout

# ----- random batches and data modules (the real datamodule is tested in tests/data/) ---------------------------


def random_box_batch(batch_size=2, num_objects=30, image_size=16, seed=0, valid=(2, 3)):
    """A batch in the contract of docs/batch_contract.md with `valid[i]` real objects in sample i."""
    g = torch.Generator().manual_seed(seed)
    boxes = torch.zeros(batch_size, num_objects, 4)
    masks = torch.zeros(batch_size, num_objects)
    phrases = [[""] * num_objects for _ in range(batch_size)]
    words = ["red square", "blue circle", "green triangle", "a red circle"]
    for i in range(batch_size):
        for j in range(valid[i % len(valid)]):
            xy = torch.rand(2, generator=g) * 0.5
            wh = torch.rand(2, generator=g) * 0.4 + 0.1
            boxes[i, j] = torch.cat([xy, xy + wh])
            masks[i, j] = 1
            phrases[i][j] = words[(i + j) % len(words)]
    return {
        "pixel_values": torch.rand(batch_size, 3, image_size, image_size, generator=g) * 2 - 1,
        "captions": ["a red square and a blue circle", "a green triangle"][:batch_size] + [""] * max(0, batch_size - 2),
        "boxes": boxes,
        "masks": masks,
        "phrases": phrases,
        "keys": [f"sample-{i}" for i in range(batch_size)],
    }


def collate(samples):
    """Stacks the tensors of the samples, lists the rest."""
    return {k: torch.stack([s[k] for s in samples]) if isinstance(samples[0][k], torch.Tensor)
            else [s[k] for s in samples] for k in samples[0]}


class RandomBoxDataset(Dataset):
    def __init__(self, length: int = 8, image_size: int = 16):
        self.length, self.image_size = length, image_size

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        batch = random_box_batch(batch_size=1, image_size=self.image_size, seed=index, valid=(1 + index % 3,))
        return {k: v[0] for k, v in batch.items()}


class RandomBoxDataModule(L.LightningDataModule):
    def __init__(self, length: int = 8, batch_size: int = 2, image_size: int = 16, val_length: int = 4):
        super().__init__()
        self.length, self.batch_size, self.image_size = length, batch_size, image_size
        self.val_length = val_length

    def train_dataloader(self):
        return DataLoader(RandomBoxDataset(self.length, self.image_size), self.batch_size, collate_fn=collate)

    def val_dataloader(self):
        return DataLoader(RandomBoxDataset(self.val_length, self.image_size), self.batch_size, collate_fn=collate)


TEXT_WIDTH = 32  # TinyPipelineConfig().text_width: pooled text width = cross-attention width of the tiny LDM


def random_modality_batch(batch_size=2, seed=0, valid=(2, 3), width=TEXT_WIDTH) -> dict:
    """`random_box_batch` plus keypoints (some joints missing) and entity embeddings (object 0 has no image)."""
    batch = random_box_batch(batch_size=batch_size, seed=seed, valid=valid)
    g = torch.Generator().manual_seed(seed + 1000)
    batch["keypoint_masks"] = (torch.rand(batch_size, 8, 17, generator=g) < 0.7).float()
    batch["keypoints"] = torch.rand(batch_size, 8, 17, 2, generator=g) * batch["keypoint_masks"][..., None]
    entity = torch.randn(batch_size, 30, width, generator=g)
    entity = entity / entity.norm(dim=-1, keepdim=True) * 28.7 * batch["masks"][..., None]
    entity[:, 0] = 0  # object 0: a box and a phrase, but no entity image
    batch["entity_embeds"] = entity
    return batch


class RandomModalityDataset(Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        batch = random_modality_batch(batch_size=1, seed=index, valid=(2 + index % 2,))
        return {k: v[0] for k, v in batch.items()}


class RandomModalityDataModule(L.LightningDataModule):
    def train_dataloader(self):
        return DataLoader(RandomModalityDataset(), batch_size=2, collate_fn=collate)


def add_clip(root, projection_dim: int, image_size: int = 24, seed: int = 1) -> str:
    """`<root>/clip`: a tiny CLIPModel whose text tower is the SD text encoder of `root` (as the toy LDM writes it)."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextModel

    text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder")
    text = text_encoder.config
    torch.manual_seed(seed)
    clip = CLIPModel(CLIPConfig(
        text_config={k: getattr(text, k) for k in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")},
        vision_config={"image_size": image_size, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 2, "num_attention_heads": 4},
        projection_dim=projection_dim,
    ))
    clip.text_model.load_state_dict(text_encoder.state_dict())  # transformers 5: CLIPModel.text_model is one
    clip.save_pretrained(root / "clip")
    return str(root)


# ----- `python -m gligen fit` configs on the tiny pipeline, and comparing their checkpoints ------------------------


def write_config(path: Path, pretrained: str, max_steps: int, *, exact: bool = False, length: int | None = None,
                 callbacks=None) -> Path:
    """A fit config: CPU, one device, no validation, RandomBoxDataModule(length, batch_size=2), learning rate 1e-3.

    exact=False: length 8, no warm-up, the module's default CFG dropout.
    exact=True (resume exactness, tests/training/test_resume.py): length 2, so every step sees the same batch and
    the data position (which a plain DataLoader does not restore mid-epoch) cannot matter; 2 warm-up steps and CFG
    dropout 0.5, which draws from the global RNG every step like the noise and the timesteps.
    `callbacks`: the trainer's callbacks (class_path dicts)."""
    model = {"pretrained": pretrained, "learning_rate": 1e-3, "warmup_steps": 0}
    if exact:
        model.update(warmup_steps=2, caption_dropout=0.5, grounding_dropout=0.5)
    length = length if length is not None else (2 if exact else 8)
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": max_steps,
            "log_every_n_steps": 1,
            "limit_val_batches": 0,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "callbacks": callbacks or [],
        },
        "model": model,
        "data": {"class_path": "tests.helpers.RandomBoxDataModule", "init_args": {"length": length, "batch_size": 2}},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_training_state(a: dict, b: dict) -> None:
    """Step, weights, optimizer state and LR schedule of two Lightning checkpoints: bit for bit."""
    assert a["global_step"] == b["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][key], b["state_dict"][key], rtol=0, atol=0, msg=key)
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        for key in sa:
            torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0)
    assert a["lr_schedulers"] == b["lr_schedulers"]


# ----- fault injection (tests/training/test_chaos_training.py) ---------------------------------------------------
class InjectNaN(L.Callback):
    """Turns the batch's pixels into NaN before the steps whose global_step (0-based, at batch start) is in
    `steps`, on the given ranks only (None: every rank)."""

    def __init__(self, steps: list[int], ranks: list[int] | None = None):
        self.steps, self.ranks = set(steps), ranks

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step in self.steps and (self.ranks is None or trainer.global_rank in self.ranks):
            batch["pixel_values"].fill_(float("nan"))


class RecordGuard(L.Callback):
    """Writes `<dir>/guard-rank<r>.json`: the rank's NonFiniteGuard counts and global step at the end of training."""

    def __init__(self, dir: str):
        self.dir = dir

    def on_train_end(self, trainer, pl_module):
        import json

        from gligen.training.nonfinite import NonFiniteGuard

        guard = next(c for c in trainer.callbacks if isinstance(c, NonFiniteGuard))
        Path(self.dir).mkdir(parents=True, exist_ok=True)
        Path(self.dir, f"guard-rank{trainer.global_rank}.json").write_text(json.dumps(
            {"skipped": guard.skipped, "global_step": trainer.global_step, "world_size": trainer.world_size}))


class SignalAt(L.Callback):
    """Sends this process `signum` after optimizer step `step` ("train"), or after validation batch `val_batch` of
    the validation that runs at step `step` ("validation")."""

    def __init__(self, step: int, signum: int = 15, where: str = "train", val_batch: int = 0):
        self.step, self.signum, self.where, self.val_batch = step, signum, where, val_batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.where == "train" and trainer.global_step == self.step:
            import os

            os.kill(os.getpid(), self.signum)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if self.where == "validation" and not trainer.sanity_checking and trainer.global_step == self.step \
                and batch_idx == self.val_batch:
            import os

            os.kill(os.getpid(), self.signum)


class SignalWhileLoading(RandomBoxDataModule):
    """RandomBoxDataModule that, while it is being built, sends this process `signum` if the file `trigger` exists
    (and removes it), as if the job were preempted while the model loads."""

    def __init__(self, trigger: str, signum: int = 15, **kwargs):
        super().__init__(**kwargs)
        import os

        if os.path.exists(trigger):
            os.unlink(trigger)
            os.kill(os.getpid(), signum)


# ----- the tiny toy world and the experiment scripts on it --------------------------------------------------------
TINY = PretrainConfig(batch_size=8, text_width=32, clip_steps=2, vae_channels=(16, 16, 16), vae_steps=2,
                      unet_channels=(16, 32, 32), attention_heads=2, unet_steps=3, unet_warmup=1)


def tiny_toy_config(tmp_path: Path) -> Path:
    """`<tmp_path>/toy_world.yaml`: a toy world of 24 + 8 + 8 train and 8 val object scenes, 8 / 4 person scenes
    and 8 / 4 styled scenes, with the TINY LDM."""
    config = {"resolution": 32, "shard_size": 16,
              "splits": {"train": {"grounding": 24, "detection": 8, "detection_caption": 8}, "val": {"grounding": 8}},
              "pretrain": {k: list(v) if isinstance(v, tuple) else v for k, v in TINY.__dict__.items()},
              "person_splits": {"train": 8, "val": 4}, "styled_splits": {"train": 8, "val": 4}}
    path = tmp_path / "toy_world.yaml"
    path.write_text(yaml.safe_dump(config))
    ToyBuildConfig.from_yaml(path)  # the experiment reads it the same way
    return path


def build_tiny_toy_world(root: Path) -> Path:
    """A tiny toy world (LDM with its toy CLIP, train and val shards) in root/cache."""
    from gligen.toy.build import build

    cache = root / "cache"
    build(cache, ToyBuildConfig.from_yaml(tiny_toy_config(root)), log=lambda *a: None)
    return cache


def tiny_train_config(tmp_path: Path, cache: Path, modality: str = "box", steps: int = 2,
                      validate: bool = True) -> Path:
    """`<tmp_path>/toy_<modality>.yaml`: the modality's toy training config (toy_base.yaml + toy_<modality>.yaml) on
    the tiny toy world in `cache`, `steps` training steps (and batches per epoch), run dir
    `<tmp_path>/runs/toy_<modality>`, no sample grids; validate: one validation batch after the last step, else
    none."""
    config = load_config([ROOT / p for p in toy_train_config(modality)])
    config["run_dir"] = str(tmp_path / f"runs/toy_{modality}")
    config["trainer"].update(max_steps=steps, log_every_n_steps=1)
    if validate:
        config["trainer"].update(limit_val_batches=1, val_check_interval=steps)
    else:
        config["trainer"]["limit_val_batches"] = 0
        config["trainer"].pop("val_check_interval", None)
    config["trainer"]["callbacks"] = [c for c in config["trainer"]["callbacks"] if "SampleGrid" not in c["class_path"]]
    config["model"]["pretrained"] = str(cache / "ldm")
    data = config["data"]["init_args"]
    data["train_shards"] = {k: str(Path(cache) / "shards" / Path(v).name) for k, v in data["train_shards"].items()}
    data["val_shards"] = str(Path(cache) / "shards" / Path(data["val_shards"]).name)
    data.update(batch_size=4, num_workers=0, batches_per_epoch=steps)
    path = tmp_path / f"toy_{modality}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def tiny_grid_config(tmp_path: Path, cache: Path, out: Path) -> Path:
    """A 2-cell grid (gamma_init 0 and 1, box, seed 0) over the tiny toy world, 2 training steps and a 2-tau sweep
    of 4 images per cell."""
    grid = {"base_config": str(tiny_train_config(tmp_path, cache)), "out": str(out), "gamma_init": [0.0, 1.0],
            "modality": ["box"], "seeds": [0], "toy_cache": None,
            "sweep": {"taus": [0.0, 1.0], "seeds": [0], "num_images": 4, "steps": 2, "batch_size": 4}}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def run_experiment(script: str, overrides: dict, tmp_path: Path, in_process: bool = False
                   ) -> tuple[Path, list[dict]]:
    """Run experiments/<script> as a user would (a YAML of overrides, in a subprocess); its out dir and metrics rows.
    in_process: the same through the experiment's `main` (a rerun after the CLI has run once: no import of torch +
    diffusers in a new process)."""
    config = tmp_path / "ablate.yaml"
    config.write_text(yaml.safe_dump(overrides))
    if in_process:
        from gligen.experiments.entry import main

        before = os.getcwd()  # contextlib.chdir needs Python 3.11; the project supports 3.10
        os.chdir(tmp_path)
        try:
            main(Path(script).stem, ["--config", str(config)])
        finally:
            os.chdir(before)
    else:
        subprocess.run([sys.executable, str(ROOT / "experiments" / script), "--config", str(config)], check=True,
                       cwd=tmp_path)
    out = Path(overrides["out"])
    return out, list(csv.DictReader((out / "metrics.csv").open()))


# ----- interop: grounded modules, Lightning files, official-layout checkpoints ------------------------------------


def grounded_module(pretrained, seed=0, **kwargs) -> GLIGENModule:
    """A module whose grounding visibly changes the output: gates 0.5, random position net incl. null features."""
    torch.manual_seed(seed)
    module = GLIGENModule(pretrained, gamma_init=0.5, **kwargs)
    with torch.no_grad():
        for p in module.ldm.unet.position_net.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return module.eval()


def save_like_lightning(module: GLIGENModule, path) -> None:
    """What `Trainer.save_checkpoint` writes for this module (state dict, hyper-parameters, the module's own hook)."""
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)


# The official layout is produced here by inverting diffusers' LDM -> diffusers renaming (diffusers ships no
# diffusers -> LDM converter). The import runs diffusers' forward converters, so a round trip that reproduces every
# tensor under its diffusers name shows the inverse, and hence the official names used here, are the LDM ones.

RESNET_TO_LDM = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
                 ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]


def unet_to_official(state_dict: dict, config) -> dict:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    top = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]
    per_block = config.layers_per_block + 1  # LDM input/output block slots per diffusers block
    up_has_attention = ["CrossAttn" in t for t in config.up_block_types]
    out = {}
    for key, value in state_dict.items():
        if key in top:
            out[top[key]] = value
            continue
        if key.startswith("position_net."):
            out[key] = value
            continue
        m = re.match(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.*)", key)
        mid = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key)
        if m:
            kind, b, part, i, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
            if kind == "down_blocks":
                slot = 1 + b * per_block + (i if part != "downsamplers" else config.layers_per_block)
                prefix = {"resnets": f"input_blocks.{slot}.0", "attentions": f"input_blocks.{slot}.1",
                          "downsamplers": f"input_blocks.{slot}.0"}[part]
                rest = rest.replace("conv.", "op.") if part == "downsamplers" else rest
            else:
                slot = b * per_block + (i if part != "upsamplers" else config.layers_per_block)
                prefix = {"resnets": f"output_blocks.{slot}.0", "attentions": f"output_blocks.{slot}.1",
                          "upsamplers": f"output_blocks.{slot}.{2 if up_has_attention[b] else 1}"}[part]
        elif mid:
            part, i, rest = mid[1], int(mid[2]), mid[3]
            prefix = f"middle_block.{1 if part == 'attentions' else 2 * i}"
        else:
            raise AssertionError(f"no LDM name for {key}")
        if part == "resnets":
            for new, old in RESNET_TO_LDM:
                rest = rest.replace(new, old)
        out[f"{prefix}.{rest}"] = value
    assert len(out) == len(state_dict)
    return out


def vae_to_official(state_dict: dict, num_blocks: int) -> dict:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    top = DIFFUSERS_TO_LDM_MAPPING["vae"]
    attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for key, value in state_dict.items():
        if key in top:
            out[top[key]] = value
            continue
        side, rest = key.split(".", 1)
        if m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", rest):
            name = f"down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.(.*)", rest):
            name = f"down.{m[1]}.downsample.{m[2]}"
        elif m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", rest):
            name = f"up.{num_blocks - 1 - int(m[1])}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.*)", rest):
            name = f"up.{num_blocks - 1 - int(m[1])}.upsample.{m[2]}"
        elif m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", rest):
            name = f"mid.block_{int(m[1]) + 1}.{m[2].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.match(r"mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.*)", rest):
            name = f"mid.attn_1.{attention[m[1]]}.{m[2]}"
            if value.ndim == 2:  # LDM's VAE attention uses 1x1 convolutions
                value = value[:, :, None, None]
        else:
            raise AssertionError(f"no LDM name for {key}")
        out[f"{side}.{name}"] = value
    assert len(out) == len(state_dict)
    return out


def official_schedule() -> dict:
    from gligen.interop.official import ldm_schedule_buffers

    # LDM's make_beta_schedule("linear"): linspace of square roots in float64, squared; buffers stored as float32
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return {k: v.float() for k, v in ldm_schedule_buffers(betas).items()}


def sd(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def official_checkpoint(module: GLIGENModule) -> dict:
    ldm = module.ldm
    text = {"transformer." + k: v for k, v in ldm.text_encoder.state_dict().items()}
    # older transformers saved CLIP's position id buffer; official files have it
    text["transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    return {
        "model": unet_to_official(sd(ldm.unet), ldm.unet.config),
        "autoencoder": vae_to_official(sd(ldm.vae), len(ldm.vae.config.block_out_channels)),
        "text_encoder": {k: v.detach().clone() for k, v in text.items()},
        "diffusion": official_schedule(),
        "config_dict": {"model": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                                  "params": {"fuser_type": "gatedSA"}}},
    }


def assert_same_ldm_weights(original, imported) -> None:
    """UNet (fusers and position_net included), VAE and text encoder: the same keys and bit-identical tensors."""
    for part in ("unet", "vae", "text_encoder"):
        a, b = getattr(original.ldm, part).state_dict(), getattr(imported.ldm, part).state_dict()
        assert set(a) == set(b), part
        assert all(torch.equal(a[k], b[k]) for k in a), part


def assert_same_grounded_output(original, imported, x, context, grounding) -> None:
    """Both UNets give exactly the same output (tolerance 0: same weights through the same code), and grounding
    changes it (the grounding layers are exercised)."""
    t = torch.tensor([10, 700])
    with torch.no_grad():
        a = original.ldm.unet(x, t, encoder_hidden_states=context, cross_attention_kwargs={"gligen": grounding}).sample
        b = imported.ldm.unet(x, t, encoder_hidden_states=context, cross_attention_kwargs={"gligen": grounding}).sample
        plain = original.ldm.unet(x, t, encoder_hidden_states=context).sample
    assert (a - plain).abs().max() > 1e-3
    assert torch.equal(a, b)
