from collections import Counter

import lightning as L
import pytest
import torch
import webdataset as wds
from torch.utils.data import DataLoader

from gligen.data import datamodule as dm_module
from gligen.data.datamodule import SKIPS_KEY, GroundingDataModule, MixedShardStream
from gligen.data.decode import DamagedSampleError
from gligen.data.examples import make_sample
from gligen.data.shards import encode_sample, resolve_shards, write_shards
from gligen.data.transforms import TransformConfig

KPS = [[0.5, 0.5, 2]] * 8 + [[0.25, 0.75, 1]] * 9
KINDS = ("grounding", "detection", "detection_caption")


def _kind_samples(kind, n, prefix):
    for i in range(n):
        boxes = [(0.1, 0.1, 0.6, 0.7), (0.5, 0.2, 0.9, 0.95)][: 1 + i % 2]
        yield make_sample(f"{prefix}{i:03d}", kind=kind, seed=i, boxes=boxes,
                          persons=[KPS] if kind == "grounding" else None)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    dirs = {}
    for kind in KINDS:
        write_shards(_kind_samples(kind, 20, kind[:3] + kind[-3:]), root / kind, max_samples=10, progress=False)
        dirs[kind] = str(root / kind)
    write_shards((make_sample(f"lat{i:03d}", kind="detection_caption", latents=True, width=16, height=16,
                              embed_dim=6, seed=i) for i in range(12)), root / "latent", max_samples=6,
                 progress=False)
    dirs["latent"] = str(root / "latent")
    # a damaged shard: two corrupt images between good samples
    damaged = str(root / "damaged-000000.tar")
    with wds.TarWriter(damaged, encoder=False) as tw:
        for i in range(6):
            raw = encode_sample(make_sample(f"dmg{i:03d}", seed=i, persons=[KPS]))
            if i in (1, 4):
                raw["png"] = b"not an image"
            tw.write(raw)
    dirs["damaged"] = damaged
    dirs["grounding_plus_damaged"] = dirs["grounding"] + "/shard-{000000..000001}.tar::" + damaged
    return dirs


def _dm(shards, **kw):
    args = dict(train_shards={k: shards[k] for k in KINDS}, ratios={"grounding": 0.5, "detection": 0.3,
                                                                    "detection_caption": 0.2},
                resolution=8, batch_size=4, num_workers=0, batches_per_epoch=3, seed=0)
    args.update(kw)
    return GroundingDataModule(**args)


def test_batch_contract_pixel_path(shards):
    dm = _dm(shards, batches_per_epoch=6)
    loader = dm.train_dataloader()
    assert len(loader) == 6
    batches = [dm.on_before_batch_transfer(b, 0) for b in loader]
    assert len(batches) == 6
    saw_keypoints = False
    for b in batches:
        assert SKIPS_KEY not in b
        assert b["pixel_values"].dtype == torch.float32 and b["pixel_values"].shape == (4, 3, 8, 8)
        assert b["pixel_values"].min() >= -1 and b["pixel_values"].max() <= 1
        assert b["boxes"].dtype == torch.float32 and b["boxes"].shape == (4, 30, 4)
        assert b["boxes"].min() >= 0 and b["boxes"].max() <= 1
        assert b["masks"].shape == (4, 30) and set(b["masks"].unique().tolist()) <= {0.0, 1.0}
        assert len(b["phrases"]) == 4 and all(len(p) == 30 for p in b["phrases"])
        for mask, phrases, boxes in zip(b["masks"], b["phrases"], b["boxes"]):
            assert [bool(p) for p in phrases] == mask.bool().tolist()
            assert boxes[~mask.bool()].abs().sum() == 0
        assert len(b["keys"]) == 4 and all(isinstance(k, str) for k in b["keys"])  # resampling may repeat
        for kind, caption in zip(b["kinds"], b["captions"]):
            assert kind in KINDS and caption == ("" if kind == "detection" else "a test caption")
        if "grounding" in b["kinds"]:
            saw_keypoints = True
            assert b["keypoints"].shape == (4, 8, 17, 2) and b["keypoint_masks"].shape == (4, 8, 17)
            for kind, m in zip(b["kinds"], b["keypoint_masks"]):
                # visibility-2 points only; KPS has 8 of them, all inside any crop of the 8x8 image
                assert m.sum() == (8 if kind == "grounding" else 0)
        else:
            assert "keypoints" not in b
        assert "latent_mean" not in b and "caption_embeds" not in b
    assert saw_keypoints


def test_batch_contract_latent_path(shards):
    dm = GroundingDataModule(train_shards={"detection_caption": shards["latent"]}, resolution=128, batch_size=3,
                             num_workers=0, batches_per_epoch=2)
    b = next(iter(dm.train_dataloader()))
    assert "pixel_values" not in b
    assert b["latent_mean"].shape == b["latent_std"].shape == (3, 4, 2, 2)
    assert b["caption_embeds"].shape == (3, 77, 6) and b["phrase_embeds"].shape == (3, 30, 6)
    assert b["captions"] == ["a test caption"] * 3


def test_mixing_ratios_over_10k_samples_with_workers(shards):
    ratios = {"grounding": 0.5, "detection": 0.3, "detection_caption": 0.2}
    sources = {k: resolve_shards(shards[k]) for k in KINDS}
    stream = MixedShardStream(sources, ratios, TransformConfig(8, random_flip=False), batch_size=100,
                              batches_per_epoch=100, shuffle_buffer=16)
    kinds = Counter()
    n_batches = 0
    for batch in DataLoader(stream, batch_size=None, num_workers=2):
        kinds.update(batch["kinds"])
        n_batches += 1
    assert n_batches == 100 and sum(kinds.values()) == 10_000
    for kind, ratio in ratios.items():
        assert abs(kinds[kind] / 10_000 - ratio) < 0.03, kinds


@pytest.mark.parametrize("num_workers,batches", [(0, 5), (2, 5), (2, 1)])
def test_fixed_epoch_length(shards, num_workers, batches):
    dm = _dm(shards, num_workers=num_workers, batches_per_epoch=batches)
    loader = dm.train_dataloader()
    assert len(loader) == batches
    assert sum(1 for _ in loader) == batches
    assert sum(1 for _ in loader) == batches  # second epoch


def test_skip_counts_reach_main_process_from_workers(shards):
    dm = _dm(shards, train_shards={"grounding": shards["grounding_plus_damaged"]}, ratios=None, num_workers=2,
             batches_per_epoch=30, batch_size=8)
    for batch in dm.train_dataloader():
        dm.on_before_batch_transfer(batch, 0)
    summary = dm.skip_summary()
    assert set(summary) == {"train/bad_image"} and summary["train/bad_image"] >= 2


def test_same_seed_same_stream_and_epochs_differ(shards):
    def keys(seed_for_torch, seed=0):
        torch.manual_seed(seed_for_torch)
        dm = _dm(shards, seed=seed, batches_per_epoch=4)
        loader = dm.train_dataloader()
        return [k for b in loader for k in b["keys"]], [k for b in loader for k in b["keys"]]

    first, second = keys(0)
    assert keys(0) == (first, second)
    assert first != second  # a new epoch draws a new stream
    assert keys(1)[0] != first and keys(0, seed=5)[0] != first


def test_not_resampled_splits_shards_over_workers_and_cycles(shards):
    dm = _dm(shards, train_shards={"grounding": shards["grounding"]}, ratios=None, resampled=False,
             num_workers=2, batch_size=5, batches_per_epoch=8, shuffle_buffer=1)
    shard_of = {}
    batches = list(dm.train_dataloader())
    assert len(batches) == 8
    # shard 0 holds keys ...000-009, shard 1 ...010-019; each worker owns one shard and cycles through it
    for i, b in enumerate(batches):
        shards_in_batch = {int(k[-3:]) // 10 for k in b["keys"]}
        assert len(shards_in_batch) == 1, b["keys"]
        shard_of[i % 2] = shards_in_batch.pop()
    assert sorted(shard_of.values()) == [0, 1]
    seen = Counter(k for b in batches for k in b["keys"])
    assert len(seen) == 20 and set(seen.values()) == {2}  # 40 samples = each worker twice through its shard


def test_not_resampled_refuses_too_few_shards(shards):
    dm = _dm(shards, train_shards={"g": shards["damaged"]}, ratios=None, resampled=False, num_workers=2)
    with pytest.raises(Exception, match="resampled=True"):
        list(dm.train_dataloader())


def test_strict_mode_names_shard_and_key(shards):
    dm = _dm(shards, train_shards={"g": shards["damaged"]}, ratios=None, strict=True, shuffle_buffer=1)
    with pytest.raises(DamagedSampleError) as info:
        list(dm.train_dataloader())
    assert info.value.url == shards["damaged"] and info.value.key in ("dmg001", "dmg004")
    assert "damaged-000000.tar" in str(info.value) and info.value.key in str(info.value)


def test_all_damaged_source_fails_instead_of_spinning(shards, tmp_path, monkeypatch):
    monkeypatch.setattr(dm_module, "MAX_CONSECUTIVE_DAMAGED", 10)
    path = str(tmp_path / "bad.tar")
    with wds.TarWriter(path, encoder=False) as tw:
        raw = encode_sample(make_sample("b0"))
        raw["png"] = b"junk"
        tw.write(raw)
    dm = _dm(shards, train_shards={"g": path}, ratios=None)
    with pytest.raises(RuntimeError, match="damaged samples in a row"):
        list(dm.train_dataloader())


def test_ratio_keys_must_match_sources(shards):
    with pytest.raises(ValueError, match="ratios"):
        _dm(shards, ratios={"grounding": 1.0}).train_dataloader()
    with pytest.raises(ValueError, match="ratios"):
        _dm(shards, ratios={"grounding": 0.0, "detection": 0.0, "detection_caption": 0.0}).train_dataloader()


def test_validation_is_deterministic_map_style_and_counts_skips(shards):
    dm = _dm(shards, val_shards=shards["grounding"] + "/index.json::" + shards["damaged"], val_batch_size=7)
    dm.setup("fit")
    assert len(dm.val_dataset) == 20 + 4
    assert dm.skip_summary() == {"val/bad_image": 2}
    loader = dm.val_dataloader()
    first, second = list(loader), list(loader)
    assert [len(b["keys"]) for b in first] == [7, 7, 7, 3]
    for a, b in zip(first, second):
        assert a["keys"] == b["keys"] and torch.equal(a["pixel_values"], b["pixel_values"])
    # no flip, centre crop of an 8x8 image at resolution 8: boxes exactly as annotated
    assert torch.allclose(first[0]["boxes"][0, 0], torch.tensor([0.1, 0.1, 0.6, 0.7]))
    assert "_skips" not in first[0]


class _Recorder(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append(sorted(batch))
        return (self.weight * batch["boxes"].sum()).sum()

    def validation_step(self, batch, batch_idx):
        self.seen.append(("val", len(batch["keys"])))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_fit_uses_the_datamodule(shards, tmp_path):
    dm = _dm(shards, train_shards={"grounding": shards["grounding_plus_damaged"]}, ratios=None,
             val_shards=shards["detection"], batches_per_epoch=4, batch_size=8)
    model = _Recorder()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    train_steps = [s for s in model.seen if s[0] != "val"]
    assert len(train_steps) == 8 and all(SKIPS_KEY not in s for s in train_steps)
    assert sum(n for tag, n in (s for s in model.seen if s[0] == "val")) == 2 * 20
    assert dm.skip_summary().get("train/bad_image", 0) >= 2


def test_cli_style_config(shards):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(GroundingDataModule, "data")
    cfg = parser.parse_object({"data": {"train_shards": {"grounding": shards["grounding"]},
                                        "ratios": {"grounding": 1.0}, "resolution": 8, "batch_size": 2,
                                        "num_workers": 0, "batches_per_epoch": 1}})
    dm = GroundingDataModule(**cfg.data)
    assert next(iter(dm.train_dataloader()))["pixel_values"].shape == (2, 3, 8, 8)


@pytest.mark.parametrize("resampled", [False, True])
def test_ranks_get_their_own_stream(shards, resampled):
    urls = resolve_shards(shards["grounding"])  # shard 0: keys ...000-009, shard 1: ...010-019

    def keys(rank):
        torch.manual_seed(0)  # as seed_everything would on every rank
        stream = MixedShardStream({"g": urls}, {"g": 1.0}, TransformConfig(8), batch_size=5, batches_per_epoch=4,
                                  resampled=resampled, shuffle_buffer=1, rank=rank, world_size=2)
        return [k for b in stream for k in b["keys"]]

    k0, k1 = keys(0), keys(1)
    assert k0 != k1
    if not resampled:
        assert {int(k[-3:]) // 10 for k in k0} == {0} and {int(k[-3:]) // 10 for k in k1} == {1}
