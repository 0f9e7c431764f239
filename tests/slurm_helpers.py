"""Helpers of the Slurm tests: a callback jobs run (named by class_path in their config), its reader, and the
skip-or-fail rule for a missing cluster."""

import json
import os
import socket
import time
from pathlib import Path

import lightning as L
import pytest


class RankProbe(L.Callback):
    """Appends JSON lines to `<directory>/rank<global rank>.jsonl`: at the start of training where this rank runs
    (host, pid, SLURM_NNODES, SLURMD_NODENAME), then after every step the sample keys of its batch; each record
    also has rank, time and attempt (SLURM_RESTART_COUNT). Tests read it to see which host ran which rank and which
    shard each rank read, and to find a rank's pid to kill."""

    def __init__(self, directory: str):
        self.directory = Path(directory)

    def _write(self, trainer: L.Trainer, **record) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        attempt = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        record = {"rank": trainer.global_rank, "time": time.time(), "attempt": attempt, **record}
        with open(self.directory / f"rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, event="start", host=socket.gethostname(), pid=os.getpid(),
                    nnodes=os.environ.get("SLURM_NNODES"), node=os.environ.get("SLURMD_NODENAME"),
                    world_size=trainer.world_size)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._write(trainer, event="batch", step=trainer.global_step, keys=list(batch["keys"]))


def read_probe(directory: Path) -> list[dict]:
    """Every record RankProbe wrote, rank 0's file first."""
    paths = sorted(directory.glob("rank*.jsonl"))
    return [json.loads(line) for path in paths for line in path.read_text().splitlines()]


def skip_or_fail(problem: str | None) -> None:
    """Skip the test for a missing/unusable Slurm `problem`, or fail it under GLIGEN_REQUIRE_SLURM=1 (CI)."""
    if problem:
        if os.environ.get("GLIGEN_REQUIRE_SLURM") == "1":
            pytest.fail(f"GLIGEN_REQUIRE_SLURM=1 but {problem}")
        pytest.skip(problem)
