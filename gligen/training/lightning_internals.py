"""The only places this project reaches into Lightning's private API, each with why (check them on a Lightning
upgrade; the tests that would catch a change are named)."""

from __future__ import annotations

import lightning as L


def hpc_save_path(trainer: L.Trainer) -> str:
    """The next `hpc_ckpt_<n>.ckpt` in `default_root_dir`: the name Lightning's own SLURM requeue uses and resumes
    from, so a run requeued by either handler finds it (tests/training/test_slurm.py)."""
    return trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir)


def disable_lightning_signal_handlers(trainer: L.Trainer) -> None:
    """Stop Lightning installing its SIGTERM / SIGUSR1 handlers at fit start: it kills DDP children and runs a
    collective from inside the handler, then raises at the next step without saving. `SlurmRequeue` owns the
    signals instead (tests/training/test_slurm.py, tests/training/test_chaos_training.py)."""
    trainer._signal_connector.register_signal_handlers = lambda: None
