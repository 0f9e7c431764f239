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
    def __init__(self, length: int = 8, batch_size: int = 2, image_size: int = 16):
        super().__init__()
        self.length, self.batch_size, self.image_size = length, batch_size, image_size

    def train_dataloader(self):
        return DataLoader(RandomBoxDataset(self.length, self.image_size), self.batch_size, collate_fn=collate)

    def val_dataloader(self):
        return DataLoader(RandomBoxDataset(4, self.image_size), self.batch_size, collate_fn=collate)


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
