"""Small in-memory data for model tests (the real datamodule is tested in test_data_*)."""

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from tests.conftest import random_box_batch


class RandomBoxDataset(Dataset):
    def __init__(self, length: int = 8, image_size: int = 16):
        self.length, self.image_size = length, image_size

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        batch = random_box_batch(batch_size=1, image_size=self.image_size, seed=index, valid=(1 + index % 3,))
        return {k: v[0] for k, v in batch.items()}


def collate(samples):
    out = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out


class RandomBoxDataModule(L.LightningDataModule):
    def __init__(self, length: int = 8, batch_size: int = 2, image_size: int = 16, val_length: int = 4):
        super().__init__()
        self.length, self.batch_size, self.image_size = length, batch_size, image_size
        self.val_length = val_length

    def train_dataloader(self):
        return DataLoader(RandomBoxDataset(self.length, self.image_size), self.batch_size, collate_fn=collate)

    def val_dataloader(self):
        return DataLoader(RandomBoxDataset(self.val_length, self.image_size), self.batch_size, collate_fn=collate)


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


# ----- fault injection (tests/test_chaos_training.py) -------------------------------------------------------------
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
        from pathlib import Path

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
