"""`python -m gligen fit | validate --config <yaml>`: LightningCLI with a fixed, named run directory.

`validate` scores the run's newest checkpoint unless `--ckpt_path` names another (and says which it scored).
`--config` may be repeated: the toy configs are `toy_base.yaml` plus one modality's file. The data settings that
must agree with the model's (`max_objects`, `max_persons`, `preset`, and `entity_images` from `modality`) are
linked: set on the model, they follow on the data (`LINKS`).

`--run_dir runs/<name>` puts the TensorBoard run (no auto-incremented versions), `config.yaml` and
`checkpoints/` (with `last.ckpt`) in one place, and `fit` resumes when it can (`ckpt_path: last`, the default), so
a restarted or requeued job continues the same run. With a run_dir, "last" means the most recently written of
`run_dir/hpc_ckpt_<n>.ckpt` (Slurm requeue, see gligen/training/checkpointing.py) and `run_dir/checkpoints/last.ckpt`
(every `--checkpoint_every` steps and at the end of fit); checkpoints are written atomically (temp file +
rename), and the RNG states travel in them so a resumed run draws the noise the uninterrupted one would have.
SIGUSR1 or SIGTERM (Slurm's time-limit warning, preemption, scancel) saves an hpc checkpoint at the next safe point on
all ranks and requeues the job; the handlers are installed before the model loads. A run stopped by a signal and not
requeued exits with status 3 (`EXIT_INTERRUPTED`): saved, resumable, unfinished.

Trust guards (see gligen/training/rundir.py, gligen/training/nonfinite.py, gligen/training/checkpointing.py):
- resuming a run_dir whose `config.yaml` differs in a key that changes training is refused, naming the keys
  (`--allow_config_change true` overrides); every distinct config is kept in `run_dir/config_history/`;
- `run_dir/.lock` refuses a second job on the same run_dir (stale locks of ended jobs are taken over);
- a non-finite loss or gradient skips the step on every rank; `--max_nonfinite_steps` in a row stop the run;
- the previous `--keep_checkpoints - 1` versions of last.ckpt (and of the hpc checkpoints) are kept, a checkpoint
  with non-finite weights is never written, and every checkpoint load is `weights_only=True`.
"""

import os
import sys
import threading
from pathlib import Path

import yaml
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.plugins.environments import ClusterEnvironment
from lightning.pytorch import LightningDataModule
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger

from gligen.data.shards import resolve_shards
from gligen.modalities import get_modality, modality_names
from gligen.module import GLIGENModule
from gligen.presets import with_preset_values
from gligen.provenance import config_hash, files_fingerprint, git_commit
from gligen.training.checkpointing import AtomicCheckpointIO, LastCheckpoint, RNGStateCheckpoint, resume_path
from gligen.training.lightning_internals import disable_lightning_signal_handlers
from gligen.training.nonfinite import NonFiniteGuard
from gligen.training.preemption import (
    EXIT_INTERRUPTED,
    SlurmRequeue,
    install_preemption_handlers,
    preemption_requested,
    restore_signal_handlers,
    slurm_environment_plugin,
)
from gligen.training.progress import PlainProgress
from gligen.training.rundir import (
    RESUME_SAFE_KEYS,
    RunDirLock,
    RunDirLockedError,
    TrainConfig,
    config_args,
    config_differences,
    describe_config,
    describe_differences,
    record_config,
)

_locks: list[RunDirLock] = []  # held by this process; released when main() returns or raises


def _uses_entity_images(modality: str) -> bool:
    """Whether a modality's batches carry entity images (data.init_args.entity_images), as its registry entry says;
    an unknown name is left for GLIGENModule to refuse."""
    return modality in modality_names() and get_modality(modality).entity_images


# (model key, data key, compute): linked in GLIGENCLI's parser, so a config cannot make them disagree
LINKS = (
    ("model.max_objects", "data.init_args.max_objects", None),
    ("model.max_persons", "data.init_args.max_persons", None),
    ("model.modality", "data.init_args.entity_images", _uses_entity_images),
    ("model.preset", "data.init_args.preset", None),
)
LINKED_KEYS = tuple(target for _, target, _ in LINKS)  # derived: not compared when a run_dir is resumed


class ConfigChangedError(ValueError):
    """A rerun of a run_dir with a config that changes training."""


class GLIGENCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """fit and validate only: GLIGENModule implements no test_step / predict_step (sampling and scoring are
        `python -m gligen.evaluation.sample` and the experiments)."""
        return {k: v for k, v in LightningCLI.subcommands().items() if k in ("fit", "validate")}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--run_dir",
            type=str | None,
            default=None,
            help="fixed run directory: TensorBoard events, config.yaml and checkpoints/ (resumed from last.ckpt)",
        )
        parser.add_argument(
            "--checkpoint_every",
            type=int,
            default=500,
            help="with run_dir: also write checkpoints/last.ckpt every this many optimizer steps (0: only at the "
            "end of fit); guards against a requeue signal that never gets handled",
        )
        parser.add_argument(
            "--keep_checkpoints",
            type=int,
            default=2,
            help="versions of last.ckpt (last.ckpt, last.1.ckpt, ...) and of the hpc checkpoints kept: never fewer "
            "than 2, so the newest is never the only one",
        )
        parser.add_argument(
            "--max_nonfinite_steps",
            type=int,
            default=20,
            help="stop with an error after this many consecutive optimizer steps skipped for a non-finite loss or "
            "gradient (0: never)",
        )
        parser.add_argument(
            "--progress_every",
            type=int,
            default=50,
            help="when stdout is not a terminal (Slurm and nohup logs): instead of a progress bar, one plain line "
            "(step, steps/s, eta, logged metrics) every this many optimizer steps; 0: none. In a terminal: "
            "Lightning's bar",
        )
        parser.add_argument(
            "--allow_config_change",
            type=bool,
            default=False,
            help="resume a run_dir even though its saved config.yaml differs in keys that change training",
        )
        # data settings that must agree with the model's: set once, on the model (a value given for the data is
        # replaced by the model's); the dumped config.yaml lists them under model only
        for source, target, compute in LINKS:
            parser.link_arguments(source, target, compute_fn=compute)

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs) -> LightningArgumentParser:
        # `ckpt_path` exists only once the method's arguments are added, after add_arguments_to_parser
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand in ("fit", "validate"):
            parser.set_defaults(ckpt_path="last")
            try:  # Lightning >= 2.5 asks; AtomicCheckpointIO loads weights_only=True whatever this says
                parser.set_defaults(weights_only=True)
            except KeyError:
                pass
        return parser

    def before_validate(self) -> None:
        """`validate` scores the run's newest checkpoint (hpc or last.ckpt) by default, and says which; a run_dir
        without one is an error (it would score untrained grounding layers into the run's TensorBoard)."""
        run_dir = self._get(self.config, "run_dir")
        config = self.config_init[self.subcommand]
        # run_dir/config.yaml stays the training config (a resume compares against it)
        self.trainer.callbacks = [c for c in self.trainer.callbacks if not isinstance(c, SaveConfigCallback)]
        if config.get("ckpt_path") == "last":
            if not run_dir:
                config["ckpt_path"] = None
                print("gligen validate: no --run_dir and no --ckpt_path: scoring the model as configured (untrained "
                      "grounding layers)", file=sys.stderr)
                return
            config["ckpt_path"] = resume_path(run_dir)
            if config["ckpt_path"] is None:
                raise FileNotFoundError(f"gligen validate: {run_dir} holds no checkpoint (checkpoints/last.ckpt or "
                                        "hpc_ckpt_<n>.ckpt): train it first, or pass --ckpt_path")
        print(f"gligen validate: scoring {config['ckpt_path']}", file=sys.stderr)

    def before_fit(self) -> None:
        """`ckpt_path: last` with a run_dir -> the newest of the hpc (requeue) checkpoint and last.ckpt; Lightning's
        own "last" would only look at last.ckpt and shadow a newer hpc checkpoint."""
        run_dir = self._get(self.config, "run_dir")
        config = self.config_init[self.subcommand]
        if run_dir and config.get("ckpt_path") == "last":
            config["ckpt_path"] = resume_path(run_dir)  # None: a fresh run
        text = self._parser(self.subcommand).dump(self.config[self.subcommand], skip_none=False)
        if run_dir:
            self._guard_run_dir(Path(run_dir), text, resuming=config.get("ckpt_path") is not None)
        self.model.training_provenance = self._training_provenance(text)

    def _training_provenance(self, text: str) -> dict:
        """What every checkpoint of this fit records about its training: the code commit of this attempt, the
        resolved config `text` (as saved in run_dir/config.yaml) and its hash, and a fingerprint of the train
        shards."""
        shards = getattr(self.datamodule, "train_shards", None) or {}
        try:
            fingerprint = files_fingerprint(url for spec in shards.values() for url in resolve_shards(spec))
        except (OSError, ValueError):  # unresolvable specs are the datamodule's to report
            fingerprint = None
        return {"commit": git_commit(), "config": text, "config_hash": config_hash(yaml.safe_load(text)),
                "train_shards_fingerprint": fingerprint}

    def _guard_run_dir(self, run_dir: Path, text: str, resuming: bool) -> None:
        """Refuse a rerun that would mix two configurations or two jobs in one run_dir (`text`: this run's resolved
        config); keep the config history."""
        saved_path = run_dir / "config.yaml"
        if resuming and saved_path.exists() and not self._get(self.config, "allow_config_change", default=False):
            # a config.yaml saved before the links listed the linked data keys; they follow the model keys compared
            # compared as resolved: a run saved before presets (explicit caption_dropout 0.1, ...) is the same run
            diffs = config_differences(with_preset_values(yaml.safe_load(saved_path.read_text()) or {}),
                                       with_preset_values(yaml.safe_load(text)),
                                       safe=(*RESUME_SAFE_KEYS, *LINKED_KEYS))
            if diffs:
                raise ConfigChangedError(
                    f"{run_dir} holds a run trained with another config; resuming it with this one would mix the "
                    f"two. Differences: {describe_differences(diffs)}. Use a new --run_dir, or pass "
                    "--allow_config_change true to resume with the new values (the old config stays in "
                    f"{run_dir / 'config_history'}).")
        if self.trainer.global_rank == 0 and int(os.environ.get("LOCAL_RANK", 0) or 0) == 0:
            lock = RunDirLock(run_dir)
            lock.acquire()
            _locks.append(lock)
            record_config(run_dir, text)

    def after_fit(self) -> None:
        release_locks()

    def instantiate_trainer(self, **kwargs):
        run_dir = self._get(self.config, "run_dir")
        trainer_config = self._get(self.config_init, "trainer", default={})
        keep = max(2, self._get(self.config, "keep_checkpoints", default=2) or 2)
        callbacks = list(kwargs.get("callbacks") or trainer_config.get("callbacks") or [])
        if not any(isinstance(c, NonFiniteGuard) for c in callbacks):
            callbacks.append(NonFiniteGuard(self._get(self.config, "max_nonfinite_steps", default=20)))
        every = self._get(self.config, "progress_every", default=50)
        if every is not None and not sys.stdout.isatty() and trainer_config.get("enable_progress_bar") is not False \
                and not any(isinstance(c, ProgressBar) for c in callbacks):
            if every > 0:  # a bar's carriage returns would fill a log file on every step
                callbacks.append(PlainProgress(every))
            else:
                kwargs["enable_progress_bar"] = False
        kwargs["callbacks"] = callbacks
        plugins = trainer_config.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO(keep=keep))  # weights_only loads, with or without a run_dir
        kwargs["plugins"] = plugins
        if not run_dir:
            _release_early_signal_handlers()  # no requeue without a run_dir: signals act as usual again
        else:
            run_dir = Path(run_dir)
            kwargs["default_root_dir"] = str(run_dir)
            if trainer_config.get("logger") in (None, True):
                # no hp_metric: Lightning's placeholder (-1) would fill the HParams view with a meaningless column
                kwargs["logger"] = TensorBoardLogger(save_dir=str(run_dir), name="", version="",
                                                     default_hp_metric=False)
            if not any(isinstance(c, ModelCheckpoint) for c in callbacks):
                # one `last.ckpt`, overwritten in place (no last-v1.ckpt after a resume) so a requeue finds it
                every = self._get(self.config, "checkpoint_every", default=500) or 0
                callbacks.append(LastCheckpoint(str(run_dir / "checkpoints"), every_n_train_steps=every))
            if not any(isinstance(c, RNGStateCheckpoint) for c in callbacks):
                callbacks.append(RNGStateCheckpoint())
            if not any(isinstance(c, SlurmRequeue) for c in callbacks):
                callbacks.append(SlurmRequeue(keep=keep))
            slurm = slurm_environment_plugin()
            if slurm is not None and not any(isinstance(p, ClusterEnvironment) for p in plugins):
                plugins.append(slurm)  # auto_requeue=False: SlurmRequeue handles SIGUSR1
        trainer = super().instantiate_trainer(**kwargs)
        if run_dir:
            # SlurmRequeue owns SIGTERM: Lightning's own handler would kill DDP children and run a collective from
            # inside the signal handler, then raise SIGTERMException at the next step without saving anything
            disable_lightning_signal_handlers(trainer)
        return trainer


def release_locks() -> None:
    while _locks:
        _locks.pop().release()


def _release_early_signal_handlers() -> None:
    """Undo main()'s early handlers; a signal that came meanwhile gets its default action now (e.g. SIGTERM ends
    the process), as it would have without them."""
    restore_signal_handlers()
    signum = preemption_requested()
    if signum is not None:
        os.kill(os.getpid(), signum)


def main(args=None) -> GLIGENCLI:
    # before anything loads: a preemption signal while a multi-GB model loads is kept (and acted on once training
    # starts), not fatal; without a run_dir (no requeue) instantiate_trainer restores the defaults
    early = threading.current_thread() is threading.main_thread() and install_preemption_handlers()
    try:
        return GLIGENCLI(
            GLIGENModule,
            LightningDataModule,
            subclass_mode_data=True,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            args=args,
        )
    finally:
        release_locks()
        if early:
            restore_signal_handlers()


def interrupted(trainer) -> str | None:
    """Why a fit that a signal stopped was not requeued (None: it was not stopped, or it was requeued)."""
    requeue = SlurmRequeue.of(trainer) if trainer is not None else None
    return requeue.interrupted if requeue is not None else None


def run(args=None) -> int:
    """`python -m gligen ...`: main() with exit statuses a script or a grid can act on: 0 finished (or requeued),
    2 refused (run_dir in use, config changed), EXIT_INTERRUPTED (3) stopped by a signal and not requeued."""
    try:
        cli = main(args)
    except (RunDirLockedError, ConfigChangedError) as error:
        print(f"gligen: error: {error}", file=sys.stderr)
        return 2
    reason = interrupted(getattr(cli, "trainer", None))
    if reason:
        print(f"gligen: stopped by a signal at step {cli.trainer.global_step}, not requeued ({reason}); saved in "
              f"{cli.trainer.default_root_dir}: run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


def fit_from_config(config: TrainConfig, *overrides: str) -> Path:
    """Train (or resume, or find already finished) the run a YAML config describes; returns its last checkpoint.
    `config`: one file, or a list of files composed in order (`--config A --config B`, e.g. the toy configs).

    Experiments call this instead of re-implementing training: a finished run resumes at max_steps and stops at
    once, an interrupted one continues.
    """
    cli = main(["fit", *config_args(config), *overrides])
    config = describe_config(config)
    reason = interrupted(cli.trainer)
    if reason:
        raise RuntimeError(f"{config}: training was stopped by a signal at step {cli.trainer.global_step} and not "
                           f"requeued ({reason}); run again to resume")
    checkpoint = Path(cli.trainer.default_root_dir) / "checkpoints" / "last.ckpt"
    if not checkpoint.exists():
        raise FileNotFoundError(f"{config}: training finished without writing {checkpoint} (is run_dir set?)")
    return checkpoint
