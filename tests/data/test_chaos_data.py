"""Fault injection, data side (issue #17 items 1, 6, 8): every kind of damaged shard data in gligen.data.damage is a
counted skip (or a clear error in strict mode), never a crash and never silent, in the reader, `inspect` and
training."""

import json
import os
import subprocess
import sys
import tarfile
from collections import Counter
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
from lightning.pytorch.loggers import TensorBoardLogger

from gligen.data import transforms as transforms_module
from gligen.data.damage import DAMAGE, SHARD_DAMAGE, kind_key, write_corpus, write_kind
from gligen.data.datamodule import GroundingDataModule, InMemoryShardDataset, MixedShardStream
from gligen.data.decode import DamagedSampleError, DataLimits, SkipCounter
from gligen.data.examples import make_sample
from gligen.data.shards import iter_samples, resolve_shards, write_shards
from gligen.data.transforms import TransformConfig

LEAD, TAIL = 2, 1  # valid samples around a damaged one


def _read(path, strict=False, limits=None):
    skips = SkipCounter(strict=strict)
    dataset = InMemoryShardDataset([path], TransformConfig(8), skips, limits)
    return dataset, skips


@pytest.mark.chaos
@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_each_kind_is_counted_under_its_reason(tmp_path, kind, chaos_outcome):
    damage = DAMAGE[kind]
    path = write_kind(str(tmp_path / f"{kind}.tar"), kind, lead=LEAD, tail=TAIL)
    dataset, skips = _read(path)
    assert skips.summary() == ({damage.reason: 1} if damage.reason else {})
    good = 0 if kind in SHARD_DAMAGE else LEAD + TAIL
    assert len(dataset) == good + damage.valid
    assert dict(skips.dropped) == damage.dropped
    for i in range(len(dataset)):  # what was kept stacks and transforms
        assert dataset[i]["pixel_values"].shape == (3, 8, 8)
    if damage.reason:
        chaos_outcome("data", kind, "counted skip", damage.reason)
    else:
        chaos_outcome("data", kind, "completed", "read as valid (converted to RGB / drops counted: "
                                                 f"{', '.join(damage.dropped) or 'none'})")


@pytest.mark.chaos
@pytest.mark.parametrize("kind", sorted(k for k, d in DAMAGE.items() if d.reason))
def test_strict_mode_names_shard_and_key(tmp_path, kind, chaos_outcome):
    path = write_kind(str(tmp_path / f"shard-{kind}.tar"), kind, lead=LEAD, tail=TAIL)
    with pytest.raises(DamagedSampleError) as info:
        _read(path, strict=True)
    err = info.value
    assert err.reason == DAMAGE[kind].reason and err.url == path and f"shard-{kind}.tar" in str(err)
    if kind not in SHARD_DAMAGE:
        assert err.key is not None and err.key.endswith(kind_key(kind)) and err.key in str(err)
    chaos_outcome("data", f"{kind} (strict)", "clear error", f"DamagedSampleError({err.reason}) naming shard and key")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    # 16 px (the tiny pipeline's size); 4 + 6 valid around the damage: 16 valid samples in the sample shard
    return write_corpus(str(tmp_path_factory.mktemp("damaged")), size=16, lead=4, tail=6)


@pytest.mark.chaos
def test_inspect_exits_0_and_names_every_reason(corpus, chaos_outcome):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "gligen.data", "inspect", corpus.root, "--json", "--resolution", "16"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    stats = json.loads(run.stdout)
    assert stats["skipped"] == dict(corpus.expected())
    assert stats["dropped"] == dict(corpus.expected_drops())
    assert stats["samples"] == corpus.valid
    text = subprocess.run([sys.executable, "-m", "gligen.data", "inspect", corpus.root, "--resolution", "16"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert text.returncode == 0 and all(f"  {reason}: " in text.stdout for reason in corpus.expected())
    chaos_outcome("data", f"all {len(DAMAGE)} kinds in one shard set (inspect)", "counted skip",
                  f"exit 0, {len(corpus.expected())} reasons named")


@pytest.mark.chaos
def test_training_finishes_with_every_skip_counted(corpus, tiny_pretrained, tmp_path, capsys, chaos_outcome):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from gligen.module import GLIGENModule
    from gligen.training.callbacks import SkipLogger

    L.seed_everything(0)
    batch_size = 4
    # one pass over the sample shard (no resampling, no read-ahead) is exactly the epoch: counts are exact
    dm = GroundingDataModule(train_shards={"grounding": corpus.sample_shard}, val_shards=corpus.root, resolution=16,
                             batch_size=batch_size, val_batch_size=8, num_workers=0, resampled=False,
                             shuffle_buffer=1, batches_per_epoch=corpus.valid_in_sample_shard // batch_size)
    module = GLIGENModule(tiny_pretrained, warmup_steps=0)
    logger = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=logger, callbacks=[SkipLogger()],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == corpus.valid_in_sample_shard // batch_size

    expected = {f"train/{r}": n for r, n in corpus.expected(shards=False).items()}
    expected.update({f"val/{r}": n for r, n in corpus.expected().items()})
    assert dm.skip_summary() == expected
    drops = {f"{split}/{r}": n for split in ("train", "val") for r, n in corpus.expected_drops().items()}
    assert dm.drop_summary() == drops

    printed = capsys.readouterr().out
    assert all(f"skips/{name}: {n}" in printed for name, n in expected.items()), printed
    events = EventAccumulator(str(tmp_path / "tb" / "version_0"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {f"data_skips/{name}" for name in expected} <= tags and {f"data_drops/{n}" for n in drops} <= tags
    assert events.Scalars("data_skips/train/bad_image")[-1].value == expected["train/bad_image"]
    chaos_outcome("data", f"all {len(DAMAGE)} kinds during training", "counted skip",
                  f"fit finished; {sum(expected.values())} skips counted by reason, logged and printed")


@pytest.mark.chaos
def test_strict_training_stream_names_shard_and_key(corpus, chaos_outcome):
    dm = GroundingDataModule(train_shards={"grounding": corpus.sample_shard}, resolution=16, batch_size=4,
                             num_workers=0, resampled=False, shuffle_buffer=1, batches_per_epoch=4, strict=True)
    with pytest.raises(DamagedSampleError) as info:
        list(dm.train_dataloader())
    first = next(iter(DAMAGE))
    assert info.value.url == corpus.sample_shard and info.value.key == kind_key(first)
    assert "samples.tar" in str(info.value) and kind_key(first) in str(info.value)
    chaos_outcome("data", "damaged sample in a strict training stream", "clear error", info.value.reason)


def _latent(key, size=16, embed_dim=6, **kw):
    return make_sample(key, kind="detection_caption", latents=True, width=size, height=size, embed_dim=embed_dim,
                       seed=len(key), **kw)


@pytest.mark.chaos
def test_batches_stack_when_a_latents_source_holds_other_shapes(tmp_path, chaos_outcome):
    """Latents or embeddings of another shape, or an image-only sample, inside a latents source: each sample is
    valid alone, so the reader keeps it, and the batch check before stacking counts it."""
    samples = [_latent(f"ok{i}") for i in range(4)]
    samples += [_latent("bigger", size=24), _latent("narrower", embed_dim=5),
                make_sample("pixels", kind="detection_caption", width=16, height=16)]
    samples += [_latent(f"ok{i}") for i in range(4, 7)]
    write_shards(samples, str(tmp_path), max_samples=100, progress=False)
    stream = MixedShardStream({"s": resolve_shards(str(tmp_path))}, {"s": 1.0}, TransformConfig(16), batch_size=7,
                              batches_per_epoch=1, resampled=False, shuffle_buffer=1)
    (batch,) = list(stream)
    assert batch["latent_mean"].shape == (7, 4, 2, 2) and batch["caption_embeds"].shape == (7, 77, 6)
    assert sorted(batch["keys"]) == [f"ok{i}" for i in range(7)]
    assert batch["_skips"]["skipped"] == {"shape_mismatch": 2, "image_form_mismatch": 1}
    strict = MixedShardStream({"s": resolve_shards(str(tmp_path))}, {"s": 1.0}, TransformConfig(16), batch_size=7,
                              batches_per_epoch=1, resampled=False, shuffle_buffer=1, strict=True)
    with pytest.raises(DamagedSampleError, match="bigger"):
        list(strict)
    chaos_outcome("data", "latents / embeddings of another shape, image in a latents source", "counted skip",
                  "shape_mismatch, image_form_mismatch")


@pytest.mark.chaos
def test_a_failing_transform_is_a_counted_skip(tmp_path, monkeypatch, chaos_outcome):
    real = transforms_module.transform_sample

    def failing(sample, *args, **kwargs):
        if sample.key == "boom":
            raise MemoryError("cannot allocate")
        return real(sample, *args, **kwargs)

    monkeypatch.setattr(transforms_module, "transform_sample", failing)
    write_shards([make_sample("a"), make_sample("boom"), make_sample("b")], str(tmp_path), progress=False)
    dataset, skips = _read(resolve_shards(str(tmp_path))[0])
    assert len(dataset) == 2 and skips.summary() == {"transform_error": 1}
    with pytest.raises(DamagedSampleError, match="boom"):
        _read(resolve_shards(str(tmp_path))[0], strict=True)
    chaos_outcome("data", "exception inside a sample's transform", "counted skip", "transform_error")


@pytest.mark.chaos
def test_sample_and_member_byte_limits(tmp_path, chaos_outcome):
    write_shards([make_sample("a"), make_sample("big", caption="x" * 5000), make_sample("b")], str(tmp_path),
                 progress=False)
    urls = resolve_shards(str(tmp_path))
    skips = SkipCounter()
    keys = [s.key for s in iter_samples(urls, skips, DataLimits(max_sample_bytes=4000))]
    assert keys == ["a", "b"] and skips.summary() == {"sample_too_large": 1}
    skips = SkipCounter()
    assert [s.key for s in iter_samples(urls, skips, {"max_member_bytes": 4000})] == ["a", "b"]
    assert skips.summary() == {"member_too_large": 1}
    with pytest.raises(ValueError, match="unknown data limits"):
        DataLimits.of({"max_pixels": 1})
    chaos_outcome("data", "sample over the byte limits", "counted skip", "sample_too_large, member_too_large")


@pytest.mark.chaos
@pytest.mark.parametrize("name", ["symlink", "hard link", "fifo", "character device"])
def test_link_device_and_fifo_members_are_counted_skips(tmp_path, name, chaos_outcome):
    """A sample carrying a link / device / fifo member is skipped as special_member (never followed or opened);
    the samples around it are read."""
    kind = {"symlink": tarfile.SYMTYPE, "hard link": tarfile.LNKTYPE, "fifo": tarfile.FIFOTYPE,
            "character device": tarfile.CHRTYPE}[name]
    write_shards([make_sample("a"), make_sample("b"), make_sample("c")], str(tmp_path / "src"), progress=False)
    (src,) = resolve_shards(str(tmp_path / "src"))
    shard = tmp_path / "special.tar"
    with tarfile.open(src) as tin, tarfile.open(shard, "w") as tout:
        for info in tin.getmembers():
            tout.addfile(info, tin.extractfile(info))
            if info.name.startswith("b."):
                special = tarfile.TarInfo("b.png" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else "b.dev")
                special.type, special.linkname = kind, "/etc/passwd"
                tout.addfile(special)
    skips = SkipCounter()
    assert [s.key for s in iter_samples([str(shard)], skips)] == ["a", "c"]
    assert skips.summary() == {"special_member": 1}
    chaos_outcome("data", f"{name} member in a shard", "counted skip", "special_member; never followed or opened")


@pytest.mark.chaos
@pytest.mark.parametrize("name", ["../elsewhere.tar", "/etc/passwd", "sub/../../x.tar", ""])
def test_index_shard_names_stay_inside_their_folder(tmp_path, name, chaos_outcome):
    (tmp_path / "index.json").write_text(json.dumps({"schema_version": 1, "shards": [{"name": name}]}))
    with pytest.raises(ValueError, match="leaves the folder"):
        resolve_shards(str(tmp_path))
    from gligen.data.__main__ import main

    assert main(["inspect", str(tmp_path)]) == 2
    chaos_outcome("data", f"index.json shard name {name!r}", "refused", "ValueError naming index.json")


@pytest.mark.chaos
@pytest.mark.parametrize("fmt,reason", [("BMP", "bad_image"), ("GIF", "bad_image"), ("TIFF", "bad_image"),
                                        ("EPS", "bad_image"), ("I;16", "unsupported_image_mode")])
def test_converters_open_jpeg_png_webp_only(fmt, reason, chaos_outcome):
    import io

    from PIL import Image

    from gligen.data.convert import ConvertError, image_member

    if fmt == "EPS":  # never handed to Ghostscript: refused by format before any plugin runs
        data = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"
    elif fmt == "I;16":
        buf = io.BytesIO()
        Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(buf, format="PNG")
        data = buf.getvalue()
    else:
        buf = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buf, format=fmt)
        data = buf.getvalue()
    with pytest.raises(ConvertError) as info:
        image_member(data)
    assert info.value.reason == reason
    chaos_outcome("data", f"converter input image {fmt}", "counted skip", reason)


def test_skip_logger_sums_train_counts_over_ranks(monkeypatch):
    import torch.distributed as dist

    from gligen.training.callbacks import SkipLogger

    ranks = [{"data_skips/train/bad_image": 2, "data_skips/val/bad_json": 1, "data_drops/train/object_over_cap": 3},
             {"data_skips/train/bad_image": 1, "data_skips/train/bad_tar": 4, "data_skips/val/bad_json": 1}]
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_gather_object", lambda out, obj: out.__setitem__(slice(None), ranks))
    datamodule = SimpleNamespace(skip_summary=dict, drop_summary=dict)
    totals = SkipLogger().global_counts(SimpleNamespace(world_size=2, datamodule=datamodule))
    assert totals == {"data_skips/train/bad_image": 3, "data_skips/train/bad_tar": 4, "data_skips/val/bad_json": 1,
                      "data_drops/train/object_over_cap": 3}
    assert Counter(totals)["data_skips/val/bad_json"] == 1  # every rank reads the whole validation set
