"""`python -m gligen fit | validate --config <yaml>`: LightningCLI with a fixed, named run directory.

`--run_dir runs/<name>` puts the TensorBoard run (no auto-incremented versions), `config.yaml` and
`checkpoints/` (with `last.ckpt`) in one place, and `fit` resumes when it can (`ckpt_path: last`, the default), so
a restarted or requeued job continues the same run. With a run_dir, "last" means the most recently written of
`run_dir/hpc_ckpt_<n>.ckpt` (Slurm requeue, see gligen/checkpointing.py) and `run_dir/checkpoints/last.ckpt`
(every `--checkpoint_every` steps and at the end of fit); checkpoints are written atomically (temp file +
rename), and the RNG states travel in them so a resumed run draws the noise the uninterrupted one would have.
Under Slurm, SIGUSR1 saves an hpc checkpoint at the next step boundary on all ranks and requeues the job.
"""

from pathlib import Path

from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.plugins.environments import ClusterEnvironment
from lightning.pytorch import LightningDataModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from .checkpointing import (
    AtomicCheckpointIO,
    LastCheckpoint,
    RNGStateCheckpoint,
    SlurmRequeue,
    resume_path,
    slurm_environment_plugin,
)
from .module import GLIGENModule


class GLIGENCLI(LightningCLI):
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

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs) -> LightningArgumentParser:
        # `ckpt_path` exists only once the method's arguments are added, after add_arguments_to_parser
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "fit":
            parser.set_defaults(ckpt_path="last")
        return parser

    def before_fit(self) -> None:
        """`ckpt_path: last` with a run_dir -> the newest of the hpc (requeue) checkpoint and last.ckpt; Lightning's
        own "last" would only look at last.ckpt and shadow a newer hpc checkpoint."""
        run_dir = self._get(self.config, "run_dir")
        config = self.config_init[self.subcommand]
        if run_dir and config.get("ckpt_path") == "last":
            config["ckpt_path"] = resume_path(run_dir)  # None: a fresh run

    def instantiate_trainer(self, **kwargs):
        run_dir = self._get(self.config, "run_dir")
        if run_dir:
            run_dir = Path(run_dir)
            trainer_config = self._get(self.config_init, "trainer", default={})
            kwargs["default_root_dir"] = str(run_dir)
            if trainer_config.get("logger") in (None, True):
                kwargs["logger"] = TensorBoardLogger(save_dir=str(run_dir), name="", version="")
            callbacks = list(trainer_config.get("callbacks") or [])
            if not any(isinstance(c, ModelCheckpoint) for c in callbacks):
                # one `last.ckpt`, overwritten in place (no last-v1.ckpt after a resume) so a requeue finds it
                every = self._get(self.config, "checkpoint_every", default=500) or 0
                callbacks.append(LastCheckpoint(str(run_dir / "checkpoints"), every_n_train_steps=every))
            if not any(isinstance(c, RNGStateCheckpoint) for c in callbacks):
                callbacks.append(RNGStateCheckpoint())
            if not any(isinstance(c, SlurmRequeue) for c in callbacks):
                callbacks.append(SlurmRequeue())
            kwargs["callbacks"] = callbacks
            plugins = trainer_config.get("plugins") or []
            plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
            if not any(isinstance(p, CheckpointIO) for p in plugins):
                plugins.append(AtomicCheckpointIO())
            slurm = slurm_environment_plugin()
            if slurm is not None and not any(isinstance(p, ClusterEnvironment) for p in plugins):
                plugins.append(slurm)  # auto_requeue=False: SlurmRequeue handles SIGUSR1
            kwargs["plugins"] = plugins
        return super().instantiate_trainer(**kwargs)


def main(args=None) -> GLIGENCLI:
    return GLIGENCLI(
        GLIGENModule,
        LightningDataModule,
        subclass_mode_data=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


def fit_from_config(config: str, *overrides: str) -> Path:
    """Train (or resume, or find already finished) the run a YAML config describes; returns its last checkpoint.

    Experiments call this instead of re-implementing training: a finished run resumes at max_steps and stops at
    once, an interrupted one continues.
    """
    cli = main(["fit", "--config", config, *overrides])
    checkpoint = Path(cli.trainer.default_root_dir) / "checkpoints" / "last.ckpt"
    if not checkpoint.exists():
        raise FileNotFoundError(f"{config}: training finished without writing {checkpoint} (is run_dir set?)")
    return checkpoint
