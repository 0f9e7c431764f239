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
