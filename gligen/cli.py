"""`python -m gligen fit | validate --config <yaml>`: LightningCLI with a fixed, named run directory.

`--run_dir runs/<name>` puts the TensorBoard run (no auto-incremented versions), `config.yaml` and
`checkpoints/` (with `last.ckpt`) in one place, and `fit` resumes from `checkpoints/last.ckpt` when it exists
(`ckpt_path: last` is the default), so a restarted or requeued job continues the same run.
"""

from pathlib import Path

from lightning.pytorch import LightningDataModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from .module import GLIGENModule


class GLIGENCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--run_dir",
            type=str | None,
            default=None,
            help="fixed run directory: TensorBoard events, config.yaml and checkpoints/ (resumed from last.ckpt)",
        )
        if "ckpt_path" in {a.dest for a in parser._actions}:
            parser.set_defaults(ckpt_path="last")

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
                callbacks.append(
                    ModelCheckpoint(
                        dirpath=str(run_dir / "checkpoints"),
                        save_last=True,
                        save_top_k=0,
                        enable_version_counter=False,
                    )
                )
            kwargs["callbacks"] = callbacks
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
