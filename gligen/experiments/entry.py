"""`experiments/<name>.py` -> the module with the experiment's logic. Every script there is the same shim:

    from gligen.experiments.entry import main

    if __name__ == "__main__":
        main("ablate_beta")

and every experiment's `main(argv)` reads its settings with gligen.experiments.config.parse (`--config`,
`--print_config`, flags and dotted overrides)."""

from __future__ import annotations

import importlib

EXPERIMENTS = {
    "ablate_beta": "gligen.experiments.ablate_beta",
    "ablate_claims": "gligen.experiments.ablate_claims",
    "ablate_gamma": "gligen.experiments.ablate_gamma",
    "ablate_modality": "gligen.experiments.ablate_modality",
    "grid": "gligen.experiments.grid",
    "bench_train": "gligen.experiments.bench_train",
    "bench_data": "gligen.experiments.bench_data",
    "bench_sample": "gligen.experiments.bench_sample",
    "bench_checkpoint": "gligen.experiments.bench_checkpoint",
    "time_readme": "gligen.experiments.time_readme",
    "verify": "gligen.experiments.verify",
}


def experiment(name: str):
    """The module of an experiment (its `main(argv=None)` runs it)."""
    if name not in EXPERIMENTS:
        raise SystemExit(f"unknown experiment {name!r} (known: {', '.join(EXPERIMENTS)})")
    return importlib.import_module(EXPERIMENTS[name])


def main(name: str, argv: list[str] | None = None):
    return experiment(name).main(argv)
