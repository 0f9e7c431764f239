"""`python -m gligen.toy build`: write the toy world's shards and pretrain its LDM, cached under `--out`.

Layout of the cache (default `cache/toy`):
    shards/<split>-<kind>/   schema-v1 WebDataset shards + index.json (objects family)
    shards/<split>-persons/  person scenes (stick figures with 17 COCO keypoints, kind "grounding", captions like
                             "a person") for the keypoint modality, at the same resolution
    shards/<split>-styled/   object scenes on a background style named in the caption (`styled_splits`): the train
                             split only for the base's pretraining (GLIGEN never trains on styles), the val split
                             for layouts that ask for a style (scheduled sampling's trade-off)
    ldm/                     the pretrained toy LDM, a diffusers Stable Diffusion directory (+ clip/)
Each stage is skipped when its output exists, so a second build is instant and an interrupted one resumes. When the
asked config is the one the package ships an LDM for (gligen/toy/shipped, the default config), that LDM is copied
into the cache instead of being pretrained (minutes on 2 cores saved); `shipped=False` (`--rebuild`) pretrains it
here, replacing a shipped copy already in the cache. The
base LDM is pretrained on every train split (objects and persons: a VAE that never saw a stick figure cannot carry
its joints). A cache written by another world version or an LDM pretrained with other settings or data is refused
with the keys that differ, never silently reused: every run on it would compare against a base its config does not
describe.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from gligen.data.shards import resolve_shards
from gligen.toy import shipped as shipped_files
from gligen.toy import world
from gligen.toy.pretrain import PretrainConfig, pretrain

PERSONS = "persons"  # shard directory suffix of the persons family (no data kind is called that)
STYLED = "styled"  # and of the styled family


@dataclass
class ToyBuildConfig:
    """The defaults are the toy world every experiment uses (experiments/configs/toy_world.yaml spells them out)."""

    resolution: int = world.DEFAULT_RESOLUTION
    seed: int = 0
    # samples per (split, kind); the objects family
    splits: dict[str, dict[str, int]] = field(default_factory=lambda: {
        "train": {"grounding": 16000, "detection": 4000, "detection_caption": 4000},
        "val": {"grounding": 500},
        "test": {"grounding": 500},
        "ood": {"grounding": 200},
    })
    # samples per split of the persons family (keypoint modality), written to shards/<split>-persons; {} = none
    person_splits: dict[str, int] = field(default_factory=lambda: {"train": 4000, "val": 200})
    # samples per split of the styled family, written to shards/<split>-styled; {} = none
    styled_splits: dict[str, int] = field(default_factory=lambda: {"train": 8000, "val": 200})
    # object sizes and count of the objects and styled families (world.ObjectGeometry's fields: min_side, max_side,
    # max_objects); keys left out take the world's defaults, and the record always holds all three
    object_geometry: dict[str, float] = field(default_factory=lambda: asdict(world.DEFAULT_GEOMETRY))
    shard_size: int = 1000
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)

    @classmethod
    def from_yaml(cls, path: str | Path) -> ToyBuildConfig:
        raw = yaml.safe_load(Path(path).read_text()) or {}
        pretrain_raw = raw.pop("pretrain", {}) or {}
        known = {f.name for f in fields(PretrainConfig)}
        unknown = set(pretrain_raw) - known
        if unknown:
            raise ValueError(f"{path}: unknown pretrain settings {sorted(unknown)}")
        for key, value in pretrain_raw.items():
            if isinstance(value, list) and key != "extra_words":
                pretrain_raw[key] = tuple(value)
        unknown = set(raw) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"{path}: unknown settings {sorted(unknown)}")
        return cls(**raw, pretrain=PretrainConfig(**pretrain_raw))

    def __post_init__(self):
        unknown = set(self.object_geometry) - {f.name for f in fields(world.ObjectGeometry)}
        if unknown:
            raise ValueError(f"object_geometry: unknown settings {sorted(unknown)}; expected some of "
                             f"{[f.name for f in fields(world.ObjectGeometry)]}")
        self.object_geometry = asdict(world.ObjectGeometry(**self.object_geometry))  # raises on invalid values

    @property
    def geometry(self) -> world.ObjectGeometry:
        return world.ObjectGeometry(**self.object_geometry)


def build_config(config: str | Path | ToyBuildConfig | None = None) -> ToyBuildConfig:
    """The toy world to build: a ToyBuildConfig, a YAML of its fields, or None for the defaults (the toy world every
    experiment uses, experiments/configs/toy_world.yaml). `python -m gligen.toy build` and `ensure_toy_world`
    resolve it here, so the command without --config builds what the experiments expect."""
    if isinstance(config, ToyBuildConfig):
        return config
    return ToyBuildConfig.from_yaml(config) if config else ToyBuildConfig()


def is_toy_world(cache: str | Path, locations) -> bool:
    """THE rule for "is this experiment on the toy world": every data / model location it names (a base LDM, shards)
    is either unset (an experiment fills an unset one from the toy cache) or inside the toy cache `cache`. One
    location elsewhere (Stable Diffusion, real shards) and it is not; it then has to name all it reads."""
    root = Path(cache).resolve()
    for location in locations:
        if location in (None, "", [], {}):
            continue
        for value in (location.values() if isinstance(location, dict) else
                      location if isinstance(location, (list, tuple)) else [location]):
            if value in (None, ""):
                continue
            path = Path(str(value)).resolve()
            if path != root and root not in path.parents:
                return False
    return True


def ensure_toy_world(cache: str | Path, config: str | Path | ToyBuildConfig | None = None, locations=(),
                     log=print, shipped: bool = True, train_splits: bool = True) -> Path | None:
    """Every experiment script's one call: when the experiment is on the toy world (`is_toy_world(cache,
    locations)`), write what `cache` lacks of it (`build`: shards, the shipped or a pretrained LDM) and return
    `cache`; else do nothing and return None. `config`: the toy world (`build_config`); `shipped` / `train_splits`
    as in `build`."""
    if not is_toy_world(cache, locations):
        return None
    return build(cache, build_config(config), log=log, shipped=shipped, train_splits=train_splits)


def shard_dir(out: str | Path, split: str, kind: str) -> Path:
    return Path(out) / "shards" / f"{split}-{kind}"


def person_shard_dir(out: str | Path, split: str) -> Path:
    return Path(out) / "shards" / f"{split}-{PERSONS}"


def styled_shard_dir(out: str | Path, split: str) -> Path:
    return Path(out) / "shards" / f"{split}-{STYLED}"


def ldm_dir(out: str | Path) -> Path:
    return Path(out) / "ldm"


def pretrain_data(out: Path, config: ToyBuildConfig) -> tuple[list[Path], dict]:
    """The shard directories the base LDM is pretrained on, and the record of them kept beside its config."""
    dirs = [shard_dir(out, "train", kind) for kind in config.splits["train"]]
    if "train" in config.person_splits:
        dirs.append(person_shard_dir(out, "train"))
    if "train" in config.styled_splits:
        dirs.append(styled_shard_dir(out, "train"))
    record = {"world_version": world.WORLD_VERSION, "train_shards": [d.name for d in dirs],
              "object_geometry": dict(config.object_geometry)}
    return dirs, record


# Build settings that change what a shard holds (not just how many samples): a cache drawn with others is refused.
DRAWING_FIELDS = ("resolution", "seed", "object_geometry")


def check_world_version(out: Path, config: ToyBuildConfig | None = None) -> None:
    """Refuse a cache whose shards another world version, or (with `config`) other DRAWING_FIELDS, drew: building
    on would mix two worlds in one cache."""
    record = out / "build_config.json"
    if not record.exists():
        return
    cached = json.loads(record.read_text())
    version = cached.get("world_version", 1)  # version 1 did not record itself
    if version != world.WORLD_VERSION:
        raise ValueError(f"{record}: the cached toy shards were drawn by toy world version {version}, this code "
                         f"draws version {world.WORLD_VERSION} (see gligen/toy/world.py WORLD_VERSION); "
                         f"delete {out} to rebuild it, or build into another --out")
    if config is not None:
        asked = build_record(config)
        pairs = {k: (cached.get(k), asked.get(k)) for k in DRAWING_FIELDS}
        changed = ", ".join(f"{k}: {c} cached vs {a} asked" for k, (c, a) in pairs.items() if c != a)
        if changed:
            raise ValueError(f"{record}: the cached toy shards were drawn with other settings ({changed}); "
                             f"delete {out} to rebuild it, or build into another --out")


def check_pretrain_config(ldm: Path, config: PretrainConfig, data: dict) -> None:
    """A cached LDM pretrained with other settings or on other data is an error, not a silent reuse (every run on it
    would compare against a base the config does not describe) and not a silent rebuild (runs trained on it would
    lose their base)."""
    record = ldm / "toy_pretrain.json"
    if not record.exists():
        return  # an LDM placed there by hand: the user's choice
    saved = json.loads(record.read_text())
    built = {**saved.get("config", {}), **{k: saved.get(k) for k in data}}
    wanted = json.loads(json.dumps({**asdict(config), **data}))
    changed = sorted(k for k in set(built) | set(wanted) if built.get(k) != wanted.get(k))
    if changed:
        raise ValueError(
            f"{record}: the cached toy LDM was pretrained with other settings ({', '.join(changed)}: "
            f"{[built.get(k) for k in changed]} cached vs {[wanted.get(k) for k in changed]} asked); "
            f"delete {ldm} to rebuild it, or build into another --out")


def build_record(config: ToyBuildConfig) -> dict:
    """What build_config.json holds (JSON types: tuples become lists)."""
    return json.loads(json.dumps({**asdict(config), "world_version": world.WORLD_VERSION}))


def is_shipped_config(config: ToyBuildConfig, root: Path | None = None) -> bool:
    """True when the package ships the LDM that building `config` would pretrain (same settings, same world)."""
    record = shipped_files.manifest(root)
    if record is None:
        return False
    return build_record(config) == {**record["build_config"], "world_version": record["world_version"]}


def build(out: str | Path = "cache/toy", config: ToyBuildConfig | None = None, log=print,
          shipped: bool = True, train_splits: bool = True) -> Path:
    """Write what is missing of the toy world in `out`. `shipped`: copy the shipped LDM when `config` is its config
    (False: pretrain here, replacing a shipped copy). `train_splits=False` leaves the train shards unwritten when
    the LDM needs no pretraining (an experiment that only samples a shipped checkpoint needs the eval splits only;
    a later build writes the rest)."""
    config = config or ToyBuildConfig()
    out = Path(out)
    check_world_version(out, config)
    dirs, data = pretrain_data(out, config)
    ldm = ldm_dir(out)
    if (ldm / "model_index.json").exists() and not shipped and shipped_files.is_shipped_copy(ldm):
        log(f"toy world: replacing the shipped LDM copied into {ldm} by one pretrained here (rebuild)")
        shutil.rmtree(ldm)
    install = not (ldm / "model_index.json").exists() and shipped and is_shipped_config(config)
    needs_train = train_splits or not ((ldm / "model_index.json").exists() or install)
    for split, kinds in config.splits.items():
        for kind, n in kinds.items():
            target = shard_dir(out, split, kind)
            if (target / "index.json").exists() or (split == "train" and not needs_train):
                continue
            log(f"toy world: writing {n} {split}/{kind} samples to {target}")
            world.write_split(split, kind, n, str(target), resolution=config.resolution, seed=config.seed,
                              max_samples=config.shard_size, progress=True, geometry=config.geometry)
    for family, label, splits, directory in ((PERSONS, "person", config.person_splits, person_shard_dir),
                                             (STYLED, "styled", config.styled_splits, styled_shard_dir)):
        for split, n in splits.items():
            target = directory(out, split)
            if (target / "index.json").exists() or (split == "train" and not needs_train):
                continue
            log(f"toy world: writing {n} {split} {label} scenes to {target}")
            world.write_split(split, "grounding", n, str(target), resolution=config.resolution, seed=config.seed,
                              family=family, max_samples=config.shard_size, progress=True,
                              geometry=config.geometry)
    if (ldm / "model_index.json").exists():
        check_pretrain_config(ldm, config.pretrain, data)
    elif install:
        shipped_files.install_ldm(ldm)
        log(f"toy world: copied the shipped toy LDM ({shipped_files.shipped_ldm()}) to {ldm}; "
            "`python -m gligen.toy build --rebuild` pretrains it here instead")
    else:
        train = [url for d in dirs for url in resolve_shards(str(d))]
        pretrain(train, ldm, config.pretrain, log=log, record=data)
    (out / "build_config.json").write_text(json.dumps(build_record(config), indent=1))
    return out
