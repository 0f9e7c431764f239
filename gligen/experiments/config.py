"""One config system for every experiment script: a typed dataclass per experiment, read by `parse`.

One file on purpose: every experiment's settings side by side (they share fields and the one parser).

    python experiments/ablate_beta.py --print_config                       # every setting, as YAML
    python experiments/ablate_beta.py --config my.yaml --num_images 40     # files (repeatable), then flags
    python experiments/ablate_modality.py --train_configs.box my_box.yaml  # dotted: one entry of a mapping
    python experiments/grid.py run-local --sweep.taus [0,1] --overrides '{trainer.max_steps: 100}'

`parse(Config, argv, name)` builds a jsonargparse parser from the dataclass (field docstrings are the `--help`
text), reads `experiments/configs/<name>.yaml` first when it exists in the working directory (the experiment's
documented defaults; a missing file leaves the dataclass defaults, which are the same values), then each `--config`
in order, then the flags, and returns the dataclass. `--print_config` prints the result as YAML and exits; that
YAML, passed back as `--config`, gives the same config. The spellings of the scripts before this module keep
working: `--num-images 40` (hyphens), `--seeds 0 1 2` (space-separated lists), `--rebuild` (a bare switch = true)
and `--no-memory` (= `--memory false`).

Paths in the configs (train configs, caches, outputs) are relative to the working directory, the checkout's root
in every documented command: nothing here locates files through the package's own location.

A training config (`train_config`, `train_configs`, `base_configs`) is one YAML file or a list of files composed in
order as `python -m gligen fit --config A --config B` composes them (gligen.training.rundir.load_config); the toy ones
are `experiments/configs/toy_base.yaml` plus the modality's file.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

from gligen.modalities import modality_names

set_parsing_settings(docstring_parse_attribute_docstrings=True)  # a field's docstring is its --help text

CONFIG_DIR = "experiments/configs"  # relative to the working directory (the checkout), never to this file
TOY_BASE = f"{CONFIG_DIR}/toy_base.yaml"


def toy_train_config(modality: str) -> list[str]:
    """The toy training config of a modality: toy_base.yaml + toy_<modality>.yaml, composed in that order."""
    return [TOY_BASE, f"{CONFIG_DIR}/toy_{modality}.yaml"]


def _list(values):
    return field(default_factory=lambda: list(values))


def _dict(values):
    return field(default_factory=lambda: dict(values))


MODALITIES = modality_names()  # every registered modality (gligen.modalities)
TrainConfigPaths = Union[str, list[str]]  # one YAML, or YAMLs composed in order


# ----- the tau sweep: experiments/ablate_beta.py, and every grid cell ---------------------------------------------
@dataclass
class SamplingSettings:
    """How a tau sweep samples and scores (shared by BetaSweepConfig and a grid's SweepSettings)."""

    taus: list[float] = _list([0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0])
    """Fractions of the sampling steps with grounding on (beta = 1)."""
    seeds: list[int] = _list([0, 1, 2])
    """Sampling seeds (one metrics row per tau x seed)."""
    num_images: int = 200
    """Layouts scored per tau and seed."""
    sampler: str = "ddim"
    """Sampler: ddim | plms."""
    steps: int = 25
    """Sampling steps."""
    guidance: float = 3.0
    """Classifier-free guidance scale."""
    batch_size: int = 100
    """Images generated per batch."""
    detector: str = "toy"
    """toy | a transformers object-detection model directory or hub id."""
    image_scorer: str | None = None
    """Per-image scores of every row besides the modality's metrics: toy_image (the toy world's fidelity_error and
    style_adherence) | "package.module:callable" (an ImageScorer) | null: none."""


@dataclass
class BetaSweepConfig(SamplingSettings):
    """Scheduled-sampling sweep (experiments/ablate_beta.py): grounding and image quality against tau."""

    train_config: TrainConfigPaths = _list(toy_train_config("box"))
    """Training config trained first when no ckpt is given (toy world: unless the shipped checkpoint is what it would
    train); one YAML or YAMLs composed in order."""
    train_seeds: list[int] | None = _list([0, 1, 2])
    """Replicate over training: one model per seed (seed_everything; run_dir gets a _seed<s> suffix except for the
    config's own seed; on the toy world seeds 0-2 are shipped), each swept into <out>/train_seed<s>, then
    <out>/metrics.csv and summary.md over all of them with intervals over training seeds. null, or a given ckpt:
    one model (the train config's own seed)."""
    seeds: list[int] = _list([0])
    """Sampling seeds per trained model (one row per tau x seed; the k-th trained model samples with these + 1000 k,
    its own noise, so the spread over models holds sampling noise too)."""
    toy_cache: str = "cache/toy"
    """Where the toy world is built (shards, base LDM)."""
    toy_config: str | None = None
    """YAML of the toy world to build when missing (ToyBuildConfig fields); null: the default toy world
    (experiments/configs/toy_world.yaml)."""
    pretrained: str | None = None
    """Base LDM (diffusers directory or hub id); null: the toy LDM in toy_cache."""
    ckpt: str | None = None
    """GLIGEN checkpoint to sweep; null: the shipped toy checkpoint, else the train_config run's last.ckpt."""
    val_shards: str | None = None
    """Validation shards the layouts come from; null: the toy validation split."""
    resolution: int = 32
    """Image side of the layouts / real images (px)."""
    out: str = "results/ablate_beta"
    """Output directory (metrics.csv, summary.md, plots, samples, tensorboard/, timings.json)."""
    rebuild: bool = False
    """Toy world: pretrain the toy LDM here instead of copying the shipped one."""
    retrain: bool = False
    """Toy world: train GLIGEN here instead of sweeping the shipped checkpoint."""


# ----- experiments/grid.py and experiments/ablate_gamma.py ------------------------------------------------------------
@dataclass
class SweepSettings(SamplingSettings):
    """The tau sweep every grid cell runs after training (keys of BetaSweepConfig; null: the cell's own value)."""

    enabled: bool = True
    """false: train only."""
    pose_detector: str | None = None
    """Keypoint cells: toy (null) | "package.module:callable" (a PoseDetector)."""
    val_shards: str | None = None
    """null: the cell's data.init_args.val_shards."""
    resolution: int | None = None
    """null: the cell's data.init_args.resolution."""
    entity_resolution: int | None = None
    """null: the cell's data.init_args.entity_resolution (image / text_image cells)."""
    pretrained: str | None = None
    """null: the cell's model.pretrained."""


@dataclass
class GridConfig:
    """The gamma_init x modality x seed training grid (experiments/grid.py): one run per cell, then its tau sweep."""

    base_config: TrainConfigPaths | None = None
    """One training config for every modality; null: base_configs."""
    base_configs: dict[str, TrainConfigPaths] = _dict({m: toy_train_config(m) for m in ("box", "keypoint", "image")})
    """Modality -> its training config (one YAML or YAMLs composed in order)."""
    out: str = "results/grid"
    """Cells train into <out>/<cell>; configs, sweeps and summary.csv go to <out>."""
    gamma_init: list[float] = _list([0.0, 0.25, 1.0])
    """The gates' start values (tanh(gamma_init) at step 0; the paper uses 0)."""
    modality: list[str] = _list(["box", "keypoint", "image"])
    """Modalities of the grid."""
    seeds: list[int] = _list([0, 1, 2])
    """Training seeds."""
    overrides: dict[str, Any] = _dict({})
    """Dotted training-config keys set in every cell, e.g. {trainer.max_steps: 1000}."""
    sweep: SweepSettings = field(default_factory=SweepSettings)
    """Each cell's tau sweep after training."""
    toy_cache: str = "cache/toy"
    """run-local builds the toy world here when the cells train on it."""
    toy_config: str | None = None
    """YAML of the toy world (ToyBuildConfig fields); null: the default toy world."""
    slurm_script: str = "slurm/grid.sh"
    """submit: the sbatch script each array task runs."""


@dataclass
class GammaAblationConfig(GridConfig):
    """The gamma axis of the grid, trained here one cell after another (experiments/ablate_gamma.py); the same cells
    and run directories as experiments/grid.py with the same out."""

    base_configs: dict[str, TrainConfigPaths] = _dict({"box": toy_train_config("box")})
    """Modality -> its training config."""
    out: str = "results/ablate_gamma"
    """Cells train into <out>/<cell>; summary.csv and gates_vs_step.png go to <out>."""
    modality: list[str] = _list(["box"])
    """Modalities (box: the gates of the box model)."""
    seeds: list[int] = _list([0, 1, 2])
    """Training seeds (one model per gamma_init and seed; summary.md's intervals are over them)."""
    sweep: SweepSettings = field(default_factory=lambda: SweepSettings(enabled=False))
    """Each cell's tau sweep (enabled: false, training only, unless --sweep.enabled true)."""


# ----- experiments/ablate_claims.py ----------------------------------------------------------------------------------
@dataclass
class ClaimsConfig:
    """The paper's design claims as arms (experiments/ablate_claims.py): per arm, one model per training seed (the
    grid's cells, <out>/<arm>/<cell>), each swept over tau on its val layouts and on every `evaluations` layout set;
    then each claim as a difference between two (arm, evaluation, tau) with its 95% interval and a verdict."""

    base_config: TrainConfigPaths = _list(toy_train_config("box"))
    """The training config every arm starts from (one YAML or YAMLs composed in order)."""
    out: str = "results/claims"
    """Arms train into <out>/<arm>/<cell>; metrics.csv, summary.md and config.json go to <out>."""
    seeds: list[int] = _list([0, 1, 2])
    """Training seeds of every arm."""
    overrides: dict[str, Any] = _dict({})
    """Dotted training-config keys set in every arm (the shared training length, e.g. {trainer.max_steps: 800})."""
    arms: dict[str, dict[str, Any]] = _dict({"reference": {}})
    """Arm name -> its dotted training-config keys on top of overrides (model.gamma_init included)."""
    evaluations: dict[str, dict[str, Any]] = _dict({})
    """Layout sets every arm's models are also swept on besides their val layouts: name -> sweep settings (e.g.
    {ood: {val_shards: cache/toy/shards/ood-grounding}}); each in <run_dir>/sweep_<name>."""
    sweep: SweepSettings = field(default_factory=lambda: SweepSettings(taus=[0.0, 1.0], seeds=[0]))
    """Every sweep's settings (an evaluation's keys replace them)."""
    claims: list[dict[str, Any]] = _list([])
    """Each: {claim, paper, metric, a: {arm, evaluation (default: val), tau}, b: {...}, expect: greater | none}:
    the toy's a - b with its interval; `greater`: the paper says a > b (agrees / disagrees / inconclusive)."""
    toy_cache: str = "cache/toy"
    """Where the toy world is built when the arms train on it."""
    toy_config: str | None = None
    """YAML of the toy world (ToyBuildConfig fields); null: the default toy world."""


# ----- experiments/ablate_modality.py --------------------------------------------------------------------------------
@dataclass
class ModalityAblationConfig(SamplingSettings):
    """Grounding modalities side by side (experiments/ablate_modality.py): each modality's own metric at tau = 1
    against the base LDM (tau = 0)."""

    modalities: list[str] = _list(MODALITIES)
    """Modalities to train / score, in order."""
    train_configs: dict[str, TrainConfigPaths] = _dict({m: toy_train_config(m) for m in MODALITIES})
    """Modality -> training config, trained first when the run's checkpoint is missing or unfinished."""
    ckpts: dict[str, str] = _dict({})
    """Modality -> checkpoint, skips training (outside the toy world: required)."""
    train_seeds: list[int] | None = _list([0, 1, 2])
    """Replicate over training: one model per modality and seed (seed_everything; run_dir gets a _seed<s> suffix
    except for the config's own seed), trained when missing. null: one model per modality, the config's own seed."""
    retrain: bool = False
    """Toy world: train the box models here instead of scoring the shipped checkpoints of the same training."""
    toy_cache: str = "cache/toy"
    """Where the toy world is built."""
    toy_config: str | None = None
    """YAML of the toy world (ToyBuildConfig fields); null: the default toy world."""
    pretrained: str | None = None
    """Base LDM; null: the one each checkpoint was trained on."""
    val_shards: dict[str, str] = _dict({})
    """Outside the toy world: modality -> validation shards (toy: layouts from the world's val split)."""
    resolution: int = 32
    """Toy layouts / real validation crops (px)."""
    taus: list[float] = _list([0.0, 1.0])
    """0: the base LDM on the same layouts and seeds; 1: full grounding."""
    grid_size: int = 8
    """Samples drawn in each sample grid."""
    pose_detector: str = "toy"
    """keypoint: toy | "package.module:callable" returning per image keypoints [P, 17, 3]."""
    out: str = "results/ablate_modality"
    """Output directory."""


@dataclass
class VerifyConfig:
    """Re-verify results folders from their own files (experiments/verify.py)."""

    dirs: list[str] = _list(["results"])
    """Folders to verify: each, and every folder under it holding result rows (metrics.csv / summary.csv)."""
    out: str | None = None
    """Also write the report to this file; null: print it only."""


# ----- benchmarks and time_readme ---------------------------------------------------------------------------------
@dataclass
class BenchTrainConfig:
    """Training-step cost (experiments/bench_train.py): ours vs an official-style step vs the FLOP limit."""

    sizes: list[str] = _list(["toy", "sd"])
    """Model sizes (gligen.bench.train_step.SIZES)."""
    repeats: int = 3
    """Timed steps per variant (alternating)."""
    device: str | None = None
    """cuda | cpu; null: cuda when available."""
    memory: bool = True
    """Measure peak memory (false / --no-memory: skip)."""
    memory_official: bool = True
    """Measure the official-style step's peak memory too (about 18 GB at the sd size on CPU: false where that does
    not fit beside other work)."""
    out: str = "results/bench/train.csv"
    """CSV to append to ('' = none)."""
    precision: str = "fp32"
    """Ours: autocast dtype (gligen.bench.train_step.PRECISIONS)."""
    channels_last: bool = False
    """Ours: channels-last UNet and latents."""
    compile: bool = False
    """Ours: torch.compile the UNet."""
    half_frozen: bool = False
    """Ours: frozen weights in the half dtype of `precision` (bf16); the memory comparison adds ours with fp32 frozen
    weights, same step."""
    image_size: int | None = None
    """Override the size's image side (px)."""
    batch_size: int | None = None
    """Override the size's batch size."""


@dataclass
class BenchDataConfig:
    """Data-loading throughput (experiments/bench_data.py): image path vs precomputed-latent path."""

    train_config: TrainConfigPaths | None = _list(toy_train_config("box"))
    """The training whose consumption the loader is measured against, in the same run, with its own data settings
    (batch, resolution, shards, LDM); null: --batch_size, --resolution, --shards and --train_samples_per_s."""
    train_steps: int = 5
    """Timed training steps per path (after one warm-up step)."""
    train_threads: int | None = None
    """Torch threads of the timed training steps; null: as many as training gets (all cores)."""
    shards: str | None = None
    """Without a train config: image-path shard spec; null: toy shards written to a temporary directory."""
    latent_shards: str | None = None
    """Precomputed shard spec; null: precompute `shards`."""
    pretrained: str | None = None
    """LDM for precomputing; null: a tiny random pipeline."""
    toy_samples: int = 256
    """Samples of the toy shards."""
    resolution: int = 32
    """Image side (px)."""
    batch_size: int = 16
    """Loader batch size."""
    batches: int = 20
    """Timed batches per measurement."""
    workers: list[int] = _list([0, 1, 2])
    """Loader worker counts measured."""
    train_samples_per_s: float | None = None
    """What training consumes (batch_size / measured step time): prints the ratio to it."""
    out: str | None = None
    """CSV to append one row per measurement to; null: print only."""


@dataclass
class BenchSampleConfig:
    """This project's sampler vs diffusers' GLIGEN pipeline on the same weights (experiments/bench_sample.py)."""

    ckpt: str = "runs/toy_box/checkpoints/last.ckpt"
    """GLIGEN checkpoint (box)."""
    pretrained: str | None = None
    """Base LDM; null: the one the checkpoint was trained on."""
    steps: int = 25
    """Sampling steps."""
    guidance: float = 3.0
    """Classifier-free guidance scale."""
    tau: float = 0.3
    """Fraction of the steps with grounding on."""
    repeats: int = 5
    """Timed runs per sampler (alternating)."""
    out: str = "results/bench/sample.csv"
    """CSV to append to."""


@dataclass
class BenchCheckpointConfig:
    """Checkpoint save / load time of an SD-1.x GLIGEN job (experiments/bench_checkpoint.py)."""

    dir: str = "runs/bench_checkpoint"
    """Where to write (the file system runs use); removed afterwards when named bench_checkpoint."""
    repeats: int = 3
    """Saves and loads timed."""
    out: str = "results/bench/checkpoint_save.csv"
    """CSV written (one row per repeat)."""


@dataclass
class TimeReadmeConfig:
    """Time the README's two commands on a fresh clone (experiments/time_readme.py)."""

    which: Literal["main", "tests"] = "main"
    """main: the experiment command; tests: the test command (also the first positional argument)."""
    isa: Literal["native", "avx2"] = "native"
    """avx2: cap torch / oneDNN / MKL to AVX2 kernels."""
    out: str = "results/costs/readme_commands.csv"
    """CSV to append the row to."""
    keep: bool = False
    """Keep the clone (its path is printed)."""
    repo: str = "."
    """The checkout to clone (its HEAD is timed)."""
    readme: str = "README.md"
    """The README whose "Two commands" section is timed (relative to repo)."""


C = TypeVar("C")


# ----- parsing ---------------------------------------------------------------------------------------------------
def _field_types(cls, prefix: str = "") -> dict[str, Any]:
    """Dotted field name -> type, nested dataclasses included."""
    out = {}
    for name, kind in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(kind):
            out.update(_field_types(kind, f"{prefix}{name}."))
        else:
            out[prefix + name] = kind
    return out


def _is_list(kind) -> tuple[bool, bool]:
    """(takes a list, takes only a list)."""
    if typing.get_origin(kind) is list:
        return True, True
    args = typing.get_args(kind)
    lists = [a for a in args if typing.get_origin(a) is list]
    return bool(lists), bool(lists) and all(typing.get_origin(a) is list or a is type(None) for a in args)


def normalize_argv(cls, argv: list[str], positionals: tuple[str, ...] = (),
                   pairs: dict[str, str] | None = None) -> list[str]:
    """The scripts' older spellings -> jsonargparse's: `--num-images` -> `--num_images`, `--seeds 0 1` ->
    `--seeds [0, 1]`, a bare `--rebuild` -> `--rebuild true`, `--no-memory` -> `--memory false`, leading bare
    words -> `positionals` fields, `pairs` (`--ckpt box c.ckpt` -> `--ckpts.box c.ckpt`); the grid's
    `--set K=V ...` -> `--overrides {K: V, ...}`, `--sweep-set K=V` -> `--sweep.K V`, `--no-sweep` /
    ablate_gamma's bare `--sweep` -> `--sweep.enabled false / true`."""
    types = _field_types(cls)
    types_root = typing.get_type_hints(cls)
    argv, out, i = list(argv), [], 0
    for name in positionals:
        if argv and not argv[0].startswith("-"):
            out += [f"--{name}", argv.pop(0)]
    while i < len(argv):
        token = argv[i]
        i += 1
        if not token.startswith("--") or token == "--":
            out.append(token)
            continue
        flag, eq, value = token[2:].partition("=")
        name = flag.replace("-", "_")
        if name in ("set", "sweep_set") and not eq and ("overrides" if name == "set" else "sweep") in types_root:
            items = []  # grid / ablate_gamma's KEY=VALUE lists
            while i < len(argv) and not argv[i].startswith("--"):
                items.append(argv[i].split("=", 1))
                i += 1
            if name == "set":
                mapping = {k: yaml.safe_load(v) for k, v in items}
                out += ["--overrides", yaml.safe_dump(mapping, default_flow_style=True).strip()]
            else:
                out += [arg for k, v in items for arg in (f"--sweep.{k}", v)]
            continue
        if name in ("no_sweep", "sweep") and not eq and "sweep.enabled" in types:  # grid --no-sweep, gamma --sweep
            out += ["--sweep.enabled", "false" if name == "no_sweep" else "true"]
            continue
        if pairs and name in pairs and not eq and i + 1 < len(argv):
            out += [f"--{pairs[name]}.{argv[i]}", argv[i + 1]]
            i += 2
            continue
        if name not in types and name.startswith("no_") and types.get(name[3:]) is bool and not eq:
            out += [f"--{name[3:]}", "false"]
            continue
        if name not in types:
            out.append(token)  # --config, --print_config, --help, a dotted mapping entry: jsonargparse's own
            continue
        if eq:
            out.append(f"--{name}={value}")
            continue
        following = []
        while i < len(argv) and not argv[i].startswith("--"):
            following.append(argv[i])
            i += 1
        kind = types[name]
        takes_list, only_list = _is_list(kind)
        if kind is bool and not following:
            following = ["true"]
        elif takes_list and (len(following) > 1 or (only_list and following and not following[0].startswith("["))):
            following = [yaml.safe_dump([yaml.safe_load(v) for v in following], default_flow_style=True).strip()]
        out += [f"--{name}", *following]
    return out


def parser_for(cls, name: str, description: str | None = None) -> ArgumentParser:
    """The parser of an experiment: experiments/configs/<name>.yaml (when present) as its default config, then
    `--config` (repeatable), `--print_config`, and one flag per field (dotted for nested ones)."""
    defaults = Path(CONFIG_DIR) / f"{name}.yaml"
    parser = ArgumentParser(prog=f"python experiments/{name}.py", description=description or cls.__doc__,
                            default_config_files=[str(defaults)] if defaults.exists() else None,
                            env_prefix=None, default_env=False)
    parser.add_argument("--config", action=ActionConfigFile,
                        help="YAML of settings (repeatable: later files win; flags win over files)")
    parser.add_class_arguments(cls, fail_untyped=True, sub_configs=True)
    return parser


def parse(cls: type[C], argv: list[str] | None = None, name: str = "", description: str | None = None,
          positionals: tuple[str, ...] = (), pairs: dict[str, str] | None = None) -> C:
    """The experiment's config: the dataclass defaults, experiments/configs/<name>.yaml, each --config, the flags.
    `argv` None: sys.argv[1:]. `--print_config` prints the YAML and exits (status 0)."""
    import sys

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = parser_for(cls, name, description)
    namespace = parser.parse_args(normalize_argv(cls, argv, positionals, pairs))
    values = parser.instantiate_classes(namespace)  # nested dataclasses (GridConfig.sweep) become instances
    return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls)})


def to_dict(config) -> dict:
    """A config as the plain mapping the experiment code reads (and records in config.json)."""
    return dataclasses.asdict(config)
