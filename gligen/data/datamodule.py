"""LightningDataModule: mixed-kind streaming training batches and a deterministic map-style validation set."""

from __future__ import annotations

import random
from collections.abc import Iterator

import lightning as L
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from gligen.constants import MAX_OBJECTS, MAX_PERSONS
from gligen.data.collate import BatchShapes, collate_batch, example_signature
from gligen.data.decode import DataLimits, SkipCounter, decode_sample
from gligen.data.schema import DecodedSample
from gligen.data.shards import decode_or_skip, iter_raw_samples, resolve_shards
from gligen.data.transforms import TransformConfig, transform_or_skip, transform_sample
from gligen.presets import DEFAULT_PRESET, resolve

# Batches carry what their worker counted since its previous batch (``SkipCounter.since``: skipped samples and
# dropped objects by reason) under this key; the DataModule's on_before_batch_transfer pops it, so counts from
# every worker process reach the main process.
SKIPS_KEY = "_skips"
MAX_CONSECUTIVE_DAMAGED = 1000  # a source this broken is misconfigured, not unlucky


class MixedShardStream(IterableDataset):
    """Endless per-source sample streams, mixed by ``ratios``, collated into exactly ``batches_per_epoch`` batches
    per rank and epoch (split over the DataLoader workers), so no DDP rank can run out before another.

    Randomness comes from one seed per (seed, rank, worker, epoch draw): the epoch draw is the DataLoader's
    per-iteration worker seed (or, without workers, a draw from torch's global RNG), both reproducible under
    ``seed_everything`` and different every epoch."""

    def __init__(self, sources: dict[str, list[str]], ratios: dict[str, float], cfg: TransformConfig,
                 batch_size: int, batches_per_epoch: int, resampled: bool = True, seed: int = 0,
                 strict: bool = False, shuffle_buffer: int = 256, rank: int | None = None,
                 world_size: int | None = None, limits: DataLimits | dict | None = None):
        super().__init__()
        if set(ratios) != set(sources):
            raise ValueError(f"ratios {sorted(ratios)} must name exactly the train sources {sorted(sources)}")
        if any(r < 0 for r in ratios.values()) or sum(ratios.values()) <= 0:
            raise ValueError(f"ratios must be >= 0 with a positive sum, got {ratios}")
        self.names = [n for n in sorted(sources) if ratios[n] > 0]
        self.sources = sources
        self.probs = np.array([ratios[n] for n in self.names], dtype=np.float64)
        self.probs /= self.probs.sum()
        self.cfg, self.batch_size, self.batches_per_epoch = cfg, batch_size, batches_per_epoch
        self.resampled, self.seed, self.strict, self.shuffle_buffer = resampled, seed, strict, shuffle_buffer
        self.limits = DataLimits.of(limits)
        self._iterations = 0  # distinguishes epochs should a caller keep workers persistent (fixed worker seed)
        # Rank is read here, in the main process: a worker process may not see the process group (spawn start).
        detected_rank, detected_world, _, _ = wds.utils.pytorch_worker_info()
        self.rank = detected_rank if rank is None else rank
        self.world_size = detected_world if world_size is None else world_size

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _shard_urls(self, urls: list[str], seed: int) -> Iterator[str]:
        if self.resampled:  # every rank and worker draws shards independently, with replacement
            for item in wds.ResampledShards(urls, seed=seed, worker_seed=lambda: seed, deterministic=True):
                yield item["url"]
            return
        mine = list(wds.split_by_worker(urls[self.rank::self.world_size]))  # split by node, then by worker
        if not mine:
            raise ValueError(f"{len(urls)} shards cannot feed every rank and worker; use resampled=True")
        rng = random.Random(seed)
        while True:  # fixed-length epochs: cycle through this worker's shards, reshuffled each pass
            yield from rng.sample(mine, len(mine))

    def _raw_samples(self, name: str, seed: int, skips: SkipCounter) -> Iterator[dict]:
        urls = self.sources[name]
        barren = 0  # consecutive shards that gave nothing: unreadable data must fail, not spin forever
        for url in self._shard_urls(urls, seed):
            found = False
            for raw in iter_raw_samples(url, skips, self.limits):
                found = True
                yield raw
            barren = 0 if found else barren + 1
            if barren > 2 * len(urls) + 8:
                raise RuntimeError(f"source {name!r}: {barren} shards in a row gave no sample; "
                                   f"skips so far: {skips.summary()}")

    def _samples(self, name: str, seed: int, skips: SkipCounter) -> Iterator[tuple[dict, str]]:
        """(example, shard url) of one source. Shuffling happens on raw bytes (cheap to buffer), decoding after;
        decoding and transforming a sample both sit inside the skip accounting."""
        rng = np.random.default_rng(seed)
        raw = self._raw_samples(name, seed, skips)
        failures = 0
        for item in wds.filters.shuffle(self.shuffle_buffer, min(self.shuffle_buffer, 64),
                                        rng=random.Random(seed))(raw):
            sample = decode_or_skip(item, skips, self.limits)
            example = None if sample is None else transform_or_skip(sample, self.cfg, rng, skips)
            if example is None:
                failures += 1
                if failures > MAX_CONSECUTIVE_DAMAGED:
                    raise RuntimeError(f"source {name!r}: {failures} damaged samples in a row; {skips.summary()}")
                continue
            failures = 0
            yield example, sample.url

    def _batch(self, streams: list, mix_rng: np.random.Generator, shapes: BatchShapes, skips: SkipCounter
               ) -> list[dict]:
        """``batch_size`` examples whose shapes stack (``BatchShapes``); a sample that does not fit is a counted
        skip and is replaced by the next draw."""
        examples: list[dict] = []
        rejected = 0
        while len(examples) < self.batch_size:
            choices = mix_rng.choice(len(streams), size=self.batch_size - len(examples), p=self.probs)
            candidates = [next(streams[i]) for i in choices]
            signatures = [example_signature(example) for example, _ in candidates]
            shapes.settle(signatures)
            for (example, url), signature in zip(candidates, signatures):
                problem = shapes.mismatch(signature)
                if problem is None:
                    examples.append(example)
                    continue
                skips.record(problem[0], url, example["key"], problem[1])
                rejected += 1
                if rejected > MAX_CONSECUTIVE_DAMAGED:
                    raise RuntimeError(f"{rejected} samples in a row did not fit the batch's shapes "
                                       f"{shapes.expected}; {skips.summary()}")
        return examples

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        draw = info.seed if info is not None else int(torch.randint(0, 2**62, ()).item())
        self._iterations += 1
        seq = np.random.SeedSequence([self.seed, self.rank, worker, draw % 2**63, self._iterations])
        mix_seed, *source_seeds = (int(s.generate_state(1)[0]) for s in seq.spawn(1 + len(self.names)))
        skips = SkipCounter(strict=self.strict)
        streams = [self._samples(n, s, skips) for n, s in zip(self.names, source_seeds)]
        mix_rng = np.random.default_rng(mix_seed)
        quota = self.batches_per_epoch // num_workers + (worker < self.batches_per_epoch % num_workers)
        shapes = BatchShapes()
        reported = skips.state()
        for _ in range(quota):
            batch = collate_batch(self._batch(streams, mix_rng, shapes, skips))
            batch[SKIPS_KEY] = skips.since(reported)
            reported = skips.state()
            yield batch


class InMemoryShardDataset(Dataset):
    """Map-style dataset over shards read into memory once (raw member bytes of the valid samples); items are
    decoded and transformed deterministically (centre crop, no flip). Lightning adds its DistributedSampler.

    Every sample is decoded, transformed and shape-checked (``BatchShapes`` over the whole set) once here, inside
    the skip accounting, so items cannot fail later; dropped objects are counted here too."""

    def __init__(self, urls: list[str], cfg: TransformConfig, skips: SkipCounter,
                 limits: DataLimits | dict | None = None):
        self.cfg, self.limits = cfg, DataLimits.of(limits)
        candidates: list[tuple[dict, dict]] = []
        for url in urls:
            for raw in iter_raw_samples(url, skips, self.limits):
                sample = decode_or_skip(raw, skips, self.limits)
                example = None if sample is None else transform_or_skip(sample, cfg, None, skips)
                if example is not None:  # decoded again per item: memory holds bytes only
                    candidates.append((raw, example_signature(example)))
        shapes = BatchShapes()
        shapes.settle([signature for _, signature in candidates])
        self.raw: list[dict] = []
        for raw, signature in candidates:
            problem = shapes.mismatch(signature)
            if problem is None:
                self.raw.append(raw)
            else:
                skips.record(problem[0], raw["__url__"], raw["__key__"], problem[1])

    def __len__(self) -> int:
        return len(self.raw)

    def decoded(self, index: int) -> DecodedSample:
        raw = self.raw[index]
        return decode_sample(raw, raw["__url__"], self.limits)

    def __getitem__(self, index: int) -> dict:
        return transform_sample(self.decoded(index), self.cfg, rng=None)


class GroundingDataModule(L.LightningDataModule):
    """Grounding data for GLIGEN training (batch layout: docs/batch_contract.md; options: docs/data.md).

    ``train_shards`` maps a data kind (or any source name) to a shard pattern or a directory with index.json;
    ``ratios`` gives each source's share of the training samples. ``entity_images``: batches carry the entity
    images of samples without precomputed ``entity_embeds`` as ``entity_pixel_values`` [B, max_objects, 3, S, S]
    (S = ``entity_resolution`` or ``resolution``) + ``entity_masks``, which GLIGENModule encodes with CLIP.
    ``preset`` ("paper" or "official", gligen/presets.py; the CLI links it to the model's) sets
    ``detection_captions`` ("null" | "category_names"), ``keypoint_slots`` ("most_visible" | "largest") and
    ``keypoint_captions`` ("optional" | "required") that are left at None."""

    def __init__(
        self,
        train_shards: dict[str, str] | None = None,
        ratios: dict[str, float] | None = None,
        val_shards: str | None = None,
        resolution: int = 512,
        batch_size: int = 8,
        num_workers: int = 2,
        max_objects: int = MAX_OBJECTS,
        max_persons: int = MAX_PERSONS,
        min_area: float = 0.01,
        random_crop: bool = False,
        random_flip: bool = True,
        batches_per_epoch: int = 1000,
        resampled: bool = True,
        seed: int = 0,
        strict: bool = False,
        shuffle_buffer: int = 256,
        val_batch_size: int | None = None,
        entity_images: bool = False,
        entity_resolution: int | None = None,
        limits: dict | None = None,
        preset: str = DEFAULT_PRESET,
        detection_captions: str | None = None,
        keypoint_slots: str | None = None,
        keypoint_captions: str | None = None,
    ):
        super().__init__()
        # the preset (linked to the model's by the CLI) fills what is left at None; hparams record resolved values
        detection_captions, keypoint_slots, keypoint_captions = resolve(
            preset, detection_captions=detection_captions, keypoint_slots=keypoint_slots,
            keypoint_captions=keypoint_captions).values()
        self.save_hyperparameters()
        self.hparams.update(detection_captions=detection_captions, keypoint_slots=keypoint_slots,
                            keypoint_captions=keypoint_captions)  # resolved (LightningCLI saves them as given)
        self.train_shards = dict(train_shards or {})
        self.ratios = dict(ratios) if ratios is not None else {name: 1.0 for name in self.train_shards}
        self.val_shards = val_shards
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.num_workers, self.batches_per_epoch = num_workers, batches_per_epoch
        self.resampled, self.seed, self.strict, self.shuffle_buffer = resampled, seed, strict, shuffle_buffer
        differ = {"detection_captions": detection_captions, "keypoint_slots": keypoint_slots,
                  "keypoint_captions": keypoint_captions}
        self.train_cfg = TransformConfig(resolution, max_objects, max_persons, min_area, random_crop, random_flip,
                                         entity_images, entity_resolution, **differ)
        self.val_cfg = TransformConfig(resolution, max_objects, max_persons, min_area, False, False, entity_images,
                                       entity_resolution, **differ)
        self.limits = DataLimits.of(limits)  # per-sample resource limits (docs/data.md), e.g. {max_image_pixels: ...}
        self.train_skips = SkipCounter(strict=strict)  # merged from the batches' SKIPS_KEY
        self.val_skips = SkipCounter(strict=strict)
        self.val_dataset: InMemoryShardDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.val_shards and self.val_dataset is None and stage in (None, "fit", "validate"):
            self.val_dataset = InMemoryShardDataset(resolve_shards(self.val_shards), self.val_cfg, self.val_skips,
                                                    self.limits)

    def train_stream(self) -> MixedShardStream:
        if not self.train_shards:
            raise ValueError("GroundingDataModule: no train_shards configured")
        sources = {name: resolve_shards(spec) for name, spec in self.train_shards.items()}
        rank, world_size = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (None, None)
        if not self.resampled:  # fail here, in the main process, rather than in a worker
            readers = (world_size or 1) * max(1, self.num_workers)
            for name, urls in sources.items():
                if len(urls) < readers:
                    raise ValueError(f"source {name!r}: {len(urls)} shards cannot feed {readers} readers "
                                     f"(ranks x workers) without resampling; use resampled=True")
        return MixedShardStream(sources, self.ratios, self.train_cfg, self.batch_size, self.batches_per_epoch,
                                self.resampled, self.seed, self.strict, self.shuffle_buffer, rank, world_size,
                                self.limits)

    def train_dataloader(self) -> DataLoader:
        # batch_size=None: the stream yields whole batches (mixing and fixed epoch length happen per worker).
        # Workers are not persistent: each epoch gets fresh workers and so a fresh worker seed; re-forking costs
        # well under a second, and persistent iterable workers stalled 10 s at teardown in our tests.
        return DataLoader(self.train_stream(), batch_size=None, num_workers=self.num_workers,
                          persistent_workers=False)

    def val_dataloader(self) -> DataLoader:
        if self.val_dataset is None:
            self.setup("validate")
        if self.val_dataset is None:
            raise ValueError("GroundingDataModule: no val_shards configured")
        return DataLoader(self.val_dataset, batch_size=self.val_batch_size, shuffle=False,
                          num_workers=self.num_workers, collate_fn=collate_batch)

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        # Lightning calls this unless the LightningModule overrides the same hook; then SKIPS_KEY stays in the batch
        if isinstance(batch, dict) and SKIPS_KEY in batch:
            self.train_skips.merge_state(batch.pop(SKIPS_KEY))
        return batch

    def skip_summary(self) -> dict[str, int]:
        """Skipped-sample counts so far (this process: every DataLoader worker's, not other ranks'; SkipLogger
        sums ranks), flat for logging: ``{"train/<reason>": n, "val/<reason>": n}``."""
        out = {f"train/{r}": n for r, n in self.train_skips.summary().items()}
        out.update({f"val/{r}": n for r, n in self.val_skips.summary().items()})
        return out

    def drop_summary(self) -> dict[str, int]:
        """Objects and persons left out of kept samples (cap, area filter, outside the crop), like
        ``skip_summary``: ``{"train/<reason>": n, "val/<reason>": n}``."""
        out = {f"train/{r}": n for r, n in sorted(self.train_skips.dropped.items())}
        out.update({f"val/{r}": n for r, n in sorted(self.val_skips.dropped.items())})
        return out
