"""Helpers of the Slurm tests: callbacks jobs run (named by class_path in their config), their readers, waiting on a
job's state, and the skip-or-fail rule for a missing cluster."""

import json
import os
import re
import socket
import subprocess
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


class PauseForSignal(L.Callback):
    """In the first attempt only, at one moment of the run: write `<marker>.rank<r>` and wait (up to `timeout` s)
    until this process received a preemption signal, so a test can `scancel --signal=...` at exactly that moment.
    where: "train" (after optimizer step `step`), "validation" (after batch 0 of the validation at step `step`;
    batch 1 follows) or "final" (after the last step, `step` = max_steps)."""

    def __init__(self, step: int, where: str, marker: str, timeout: float = 180):
        self.step, self.where, self.marker, self.timeout = step, where, marker, timeout

    def _pause(self, trainer: L.Trainer) -> None:
        from gligen.training.preemption import preemption_requested

        if os.environ.get("SLURM_RESTART_COUNT", "0") != "0":
            return
        Path(f"{self.marker}.rank{trainer.global_rank}").write_text(str(trainer.global_step))
        deadline = time.time() + self.timeout
        while preemption_requested() is None and time.time() < deadline:
            time.sleep(0.05)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.where in ("train", "final") and trainer.global_step == self.step:
            self._pause(trainer)

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx,
                                dataloader_idx=0) -> None:
        if self.where == "validation" and not trainer.sanity_checking and trainer.global_step == self.step \
                and batch_idx == 0:
            self._pause(trainer)


def wait_for_markers(marker: Path, ranks: int, timeout: float, alive) -> None:
    """Until every rank wrote `<marker>.rank<r>` (PauseForSignal); `alive()` asserts the job still runs."""
    deadline = time.time() + timeout
    while not all(Path(f"{marker}.rank{r}").exists() for r in range(ranks)):
        assert time.time() < deadline, f"not every rank reached {marker.name} in {timeout:.0f} s"
        alive()
        time.sleep(0.2)


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


def job_info(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, check=True)
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


def wait_for(predicate, timeout: float, what: str, job_id: str, log: Path):
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = job_info(job_id)
        if predicate(info):
            return info
        if info["JobState"] in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            break
        time.sleep(1)
    subprocess.run(["scancel", job_id], check=False)
    tail = log.read_text()[-4000:] if log.exists() else "(no log)"
    pytest.fail(f"job {job_id}: {what} not reached, state {info['JobState']}; log tail:\n{tail}")


def read_trace(trace: Path) -> dict[tuple[int, int], list[int]]:
    """(attempt, rank) -> global steps, in order."""
    steps: dict[tuple[int, int], list[int]] = {}
    for line in trace.read_text().splitlines():
        attempt, rank, step = map(int, line.split())
        steps.setdefault((attempt, rank), []).append(step)
    return steps
