"""The columns that say how a results row was produced: the command line, the machine (processor class, threads,
native bf16) and the wall time of the stage that produced it. Checkpoint identity is
`gligen.evaluation.results.checkpoint_columns`; commit and config hash are written with every row too."""

from __future__ import annotations

from gligen.bench.machine import machine_columns
from gligen.evaluation.reporting import command_line

MACHINE_KEYS = ("machine", "processor_class", "native_bf16", "threads")  # not the long ISA flag list


def run_columns(stage_seconds: float) -> dict:
    machine = machine_columns()
    return {"command": command_line(), **{k: machine[k] for k in MACHINE_KEYS}, "stage_s": round(stage_seconds, 1)}
