"""A run directory belongs to one configuration and one job at a time.

- `config_differences`: what a rerun changes against the config the run was started with. `python -m gligen fit`
  refuses to resume a run_dir whose saved `config.yaml` differs in anything that changes what is learned (the
  learning rate, the data, the model, the seed, the device count ...), naming the keys, unless
  `--allow_config_change true`. Keys that only say how long to train or how to watch it (`RESUME_SAFE_KEYS`)
  may change freely: `--trainer.max_steps` higher is how a run is trained further.
- `record_config`: every fit start whose config differs from the last recorded one is kept as
  `config_history/<n>.yaml` (never overwritten), next to Lightning's `config.yaml` (the current one).
- `load_config` / `config_args`: a training config is one YAML file or a list of files composed in order (the
  toy configs: `toy_base.yaml` + `toy_<modality>.yaml`), read here as `python -m gligen fit --config A --config B`.
- `max_steps_of` / `trained_step` / `is_trained`: whether a training config's run reached its max_steps (what a
  sweep, the modality ablation and `grid collect` check before scoring a checkpoint).
- `RunDirLock`: `run_dir/.lock` (host, pid, Slurm job) held by global rank 0 for the whole fit, so a second job on
  the same run_dir is refused. A lock is stale when its holder is gone: the same Slurm job (a requeue: the previous
  attempt has ended), a dead pid on this host, or a Slurm job that `squeue` no longer lists as running.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

from gligen.checkpoint_file import read_checkpoint

log = logging.getLogger(__name__)

# dotted config keys (and prefixes: "a.b" covers "a.b.c") that may differ on resume: how long, how often to save,
# log and validate, which callbacks watch; none of them changes the trained weights at a given step
RESUME_SAFE_KEYS = (
    "ckpt_path", "run_dir", "checkpoint_every", "keep_checkpoints", "allow_config_change", "max_nonfinite_steps",
    "progress_every",
    "config", "weights_only",
    "trainer.max_steps", "trainer.max_epochs", "trainer.max_time", "trainer.min_steps", "trainer.min_epochs",
    "trainer.callbacks", "trainer.logger", "trainer.enable_progress_bar", "trainer.enable_model_summary",
    "trainer.enable_checkpointing", "trainer.log_every_n_steps", "trainer.val_check_interval",
    "trainer.check_val_every_n_epoch", "trainer.limit_val_batches", "trainer.num_sanity_val_steps",
    "trainer.limit_test_batches", "trainer.limit_predict_batches", "trainer.profiler", "trainer.default_root_dir",
    "trainer.barebones",
)


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(config, dict):
        out: dict[str, Any] = {}
        for key, value in config.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: config}


def is_resume_safe(key: str, safe=RESUME_SAFE_KEYS) -> bool:
    return any(key == s or key.startswith(s + ".") for s in safe)


def config_differences(saved: dict, current: dict, safe=RESUME_SAFE_KEYS) -> list[tuple[str, Any, Any]]:
    """(key, saved value, current value) for every leaf that differs and is not resume-safe, sorted by key."""
    a, b = flatten(saved), flatten(current)
    missing = object()
    diffs = []
    for key in sorted(set(a) | set(b)):
        old, new = a.get(key, missing), b.get(key, missing)
        if old != new and not is_resume_safe(key, safe):
            diffs.append((key, None if old is missing else old, None if new is missing else new))
    return diffs


def describe_differences(diffs: list[tuple[str, Any, Any]]) -> str:
    return "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in diffs)


def record_config(run_dir: str | os.PathLike, text: str) -> Path | None:
    """Keep `text` (a dumped config) as `run_dir/config_history/<n>.yaml` unless it equals the newest entry;
    returns the new file, or None when nothing changed."""
    history = Path(run_dir) / "config_history"
    history.mkdir(parents=True, exist_ok=True)
    entries = sorted((int(p.stem), p) for p in history.glob("*.yaml") if p.stem.isdigit())
    if entries and yaml.safe_load(entries[-1][1].read_text()) == yaml.safe_load(text):
        return None
    path = history / f"{(entries[-1][0] + 1) if entries else 0:03d}.yaml"
    header = f"# {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} job {os.environ.get('SLURM_JOB_ID', '-')}\n"
    path.write_text(header + text)
    return path


# ----- a training config: one YAML file, or files composed in order (repeated --config) ----------------------------
TrainConfig = str | os.PathLike | list  # a path, or a list of paths composed in order (later files win)


def config_paths(config: TrainConfig) -> list[Path]:
    """The files of a training config, in the order `python -m gligen fit --config A --config B` reads them."""
    return [Path(p) for p in config] if isinstance(config, (list, tuple)) else [Path(config)]


def config_args(config: TrainConfig) -> list[str]:
    """`--config A --config B ...`: the LightningCLI arguments that compose `config`."""
    return [arg for path in config_paths(config) for arg in ("--config", str(path))]


def merge_config(base: dict, delta: dict) -> dict:
    """`delta` over `base`, mapping by mapping (as LightningCLI applies a second --config; a list or a scalar in
    `delta` replaces the value in `base`). The toy configs never set in a delta a dict-valued argument that their
    base sets too (e.g. data.init_args.train_shards), so this equals what the CLI parses."""
    out = dict(base)
    for key, value in delta.items():
        out[key] = merge_config(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else value
    return out


def load_config(config: TrainConfig) -> dict:
    """The raw YAML settings of a training config (composed when it is a list), comments and defaults aside."""
    merged: dict = {}
    for path in config_paths(config):
        merged = merge_config(merged, yaml.safe_load(path.read_text()) or {})
    return merged


def describe_config(config: TrainConfig) -> str:
    """`A + B` for a composed config, the path for one file (for messages and provenance)."""
    return " + ".join(str(p) for p in config_paths(config))


def own_seed(settings: dict) -> int:
    """The training seed a config's settings train with (seed_everything; unset: 0)."""
    return int(settings.get("seed_everything", 0) or 0)


def seed_run(config: TrainConfig, seed: int | None) -> tuple[list[str], Path | None]:
    """How to train `config` with training seed `seed` (replication: one model per seed): the fit overrides and the
    run directory. The config's own seed_everything (or seed None) keeps its run_dir and needs no override; another
    seed trains with seed_everything = seed in <run_dir>_seed<seed>, so every seed's model is kept."""
    settings = load_config(config)
    run_dir = settings.get("run_dir")
    if seed is None or int(seed) == own_seed(settings):
        return [], Path(run_dir) if run_dir else None
    if not run_dir:
        raise SystemExit(f"{describe_config(config)}: no run_dir, so training seed {seed} cannot get its own")
    run_dir = f"{run_dir}_seed{int(seed)}"
    return ["--seed_everything", str(int(seed)), "--run_dir", run_dir], Path(run_dir)


# ----- is a run finished? ---------------------------------------------------------------------------------------
def override(fit_args: list[str], flag: str, default=None):
    """The value `--flag V` or `--flag=V` gives in fit arguments (the last one wins), else `default`."""
    value, args = default, list(fit_args)
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def max_steps_of(config_path: TrainConfig, fit_args: list[str] = ()) -> int | None:
    """trainer.max_steps of a training config, after `--trainer.max_steps N` in fit_args (None when unset / -1)."""
    steps = override(fit_args, "--trainer.max_steps", (load_config(config_path).get("trainer") or {}).get("max_steps"))
    steps = int(steps) if steps is not None else None
    return steps if steps is not None and steps >= 0 else None


def trained_step(config_path: TrainConfig, fit_args: list[str] = ()) -> int | None:
    """global_step of the run's checkpoints/last.ckpt (None when there is none); `--run_dir D` in fit_args moves
    the run."""
    last = Path(override(fit_args, "--run_dir", load_config(config_path)["run_dir"])) / "checkpoints" / "last.ckpt"
    if not last.exists():
        return None
    return int(read_checkpoint(last)["global_step"])


def is_trained(config_path: TrainConfig, fit_args: list[str] = ()) -> bool:
    """True when the run's last.ckpt reached trainer.max_steps (unknown max_steps: False, and fit decides)."""
    steps, step = max_steps_of(config_path, fit_args), trained_step(config_path, fit_args)
    return steps is not None and step is not None and step >= steps


# ----- one job at a time -----------------------------------------------------------------------------------------
class RunDirLockedError(RuntimeError):
    """Another live job holds the run directory."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _slurm_job_running(job_id: str) -> bool | None:
    """True/False from squeue; None when squeue cannot tell (not installed, controller down)."""
    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True,
                             timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return False if "Invalid job id" in out.stderr else None
    return any(s in out.stdout for s in ("RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED"))


class RunDirLock:
    """`run_dir/.lock` held by this process (see the module docstring). `acquire()` raises RunDirLockedError naming
    the holder when a live job holds it."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / ".lock"
        self.held = False
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "job": os.environ.get("SLURM_JOB_ID"),
                   "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable: a write cut short; treated as stale below

    def stale_reason(self, holder: dict) -> str | None:
        """Why `holder` no longer holds the run (None: it may still be running)."""
        if not holder:
            return "unreadable lock file"
        job = holder.get("job")
        if job and job == self.me["job"]:
            return f"an earlier attempt of this Slurm job {job} (requeued)"
        if holder.get("host") == self.me["host"] and holder.get("pid") is not None:
            if holder["pid"] == self.me["pid"]:
                return "this very process (an earlier fit in it)"
            if not _pid_alive(int(holder["pid"])):
                return f"pid {holder['pid']} on this host has exited"
            return None
        if job:
            running = _slurm_job_running(job)
            if running is False:
                return f"Slurm job {job} is no longer running"
        return None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.holder()
                if holder is None:
                    continue  # released meanwhile
                reason = self.stale_reason(holder)
                if reason is None:
                    raise RunDirLockedError(
                        f"{self.path.parent} is in use by another job: host {holder.get('host')} pid "
                        f"{holder.get('pid')} Slurm job {holder.get('job') or '-'} since {holder.get('since')}. Two "
                        f"jobs training one run_dir would overwrite each other's checkpoints; use another --run_dir, "
                        f"or delete {self.path} if that job is certainly gone.")
                log.warning("taking over the stale lock of %s: %s", self.path.parent, reason)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.me, f)
            self.held = True
            return
        raise RunDirLockedError(f"could not take {self.path}: it keeps changing (another job starting?)")

    def release(self) -> None:
        if self.held:
            holder = self.holder()
            if holder and holder.get("pid") == self.me["pid"] and holder.get("host") == self.me["host"]:
                self.path.unlink(missing_ok=True)
            self.held = False
