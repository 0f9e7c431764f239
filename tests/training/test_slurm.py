"""slurm/train.sh under a real single-node Slurm (slurm/local_cluster.sh): 2 CPU ranks (gloo DDP) on the tiny
pipeline; a clean run, and a SIGUSR1 requeue that must resume at the exact step.

Skipped when there is no working Slurm (`sinfo`), unless GLIGEN_REQUIRE_SLURM=1 (CI), which makes that a failure.
"""

import csv
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import ROOT, tiny_grid_config
from tests.training.slurm_helpers import job_info, read_trace, skip_or_fail, wait_for

TRAIN = ROOT / "slurm" / "train.sh"
pytestmark = pytest.mark.slow


def slurm_problem() -> str | None:
    if not shutil.which("sinfo") or not shutil.which("sbatch"):
        return "Slurm is not installed (no sinfo/sbatch); start one with: sudo slurm/local_cluster.sh"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20, check=False)
    except subprocess.TimeoutExpired:
        return "sinfo timed out (slurmctld down?); start it with: sudo slurm/local_cluster.sh"
    if out.returncode != 0:
        return f"sinfo failed ({out.stderr.strip()}); start Slurm with: sudo slurm/local_cluster.sh"
    if not re.search(r"^(idle|mixed|allocated|completing)", out.stdout, re.MULTILINE):
        return f"no usable Slurm node (sinfo states: {out.stdout.split()}); see slurm/local_cluster.sh"
    return None


@pytest.fixture(scope="module")
def slurm():
    skip_or_fail(slurm_problem())


def submit(tmp_path: Path, pretrained: str, max_steps: int, *extra: str, trainer: dict | None = None,
           callbacks: list | None = None, data: dict | None = None) -> tuple[str, Path, Path, Path]:
    """sbatch slurm/train.sh with 2 CPU ranks on the tiny pipeline; `trainer` / `data` update the config's
    trainer section / data init_args, `callbacks` are added to StepTrace."""
    run_dir, trace, log = tmp_path / "run", tmp_path / "steps.txt", tmp_path / "slurm.out"
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "strategy": "ddp",  # gloo on CPU
            "max_steps": max_steps,
            "log_every_n_steps": 1,
            "limit_val_batches": 0,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "callbacks": [{"class_path": "gligen.training.checkpointing.StepTrace", "init_args": {"path": str(trace)}}],
        },
        "model": {"pretrained": pretrained, "learning_rate": 1e-3, "warmup_steps": 0},
        "data": {"class_path": "tests.helpers.RandomBoxDataModule", "init_args": {"length": 8, "batch_size": 2}},
    }
    config["trainer"].update(trainer or {})
    config["trainer"]["callbacks"] += callbacks or []
    config["data"]["init_args"].update(data or {})
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "CONFIG": str(config_path), "RUN_DIR": str(run_dir), "PYTHON": sys.executable}
    out = subprocess.run(
        ["sbatch", "--parsable", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=15", f"--chdir={ROOT}",
         *(["--overcommit"] if (os.cpu_count() or 1) < 2 else []),  # 2 ranks on a 1-CPU node
         f"--output={log}", f"--error={log}", "--job-name=gligen-test", str(TRAIN), *extra],
        capture_output=True, text=True, env=env, check=True,
    )
    return out.stdout.strip().split(";")[0], run_dir, trace, log


def test_sbatch_trains_on_two_ranks_and_writes_where_the_docs_say(slurm, tiny_pretrained, tmp_path):
    job, run_dir, trace, log = submit(tmp_path, tiny_pretrained, 6)
    wait_for(lambda i: i["JobState"] == "COMPLETED", 600, "COMPLETED", job, log)

    assert read_trace(trace) == {(0, 0): [1, 2, 3, 4, 5, 6], (0, 1): [1, 2, 3, 4, 5, 6]}  # both ranks, every step
    text = log.read_text()
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in text and "GLOBAL_RANK: 1, MEMBER: 2/2" in text
    assert "distributed_backend=gloo" in text
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    assert list(run_dir.glob("events.out.tfevents.*")) and (run_dir / "config.yaml").exists()
    assert not list(run_dir.glob("hpc_ckpt_*.ckpt")) and not list(run_dir.glob("version_*"))


def test_usr1_saves_requeues_and_resumes_at_the_exact_step(slurm, tiny_pretrained, tmp_path):
    max_steps = 40
    job, run_dir, trace, log = submit(tmp_path, tiny_pretrained, max_steps, "--checkpoint_every", "5")
    deadline = time.time() + 300
    while not (trace.exists() and len(trace.read_text().splitlines()) >= 8):  # both ranks past step 3
        assert time.time() < deadline, f"no training steps in 300 s; log:\n{log.read_text()[-4000:]}"
        assert job_info(job)["JobState"] in ("PENDING", "RUNNING"), log.read_text()[-4000:]
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR1", job], check=True)

    # wait past REQUEUED / COMPLETING: only a PENDING job can be released (checking earlier left it held ~2 min)
    info = wait_for(lambda i: i["Restarts"] == "1" and i["JobState"] in ("PENDING", "RUNNING", "COMPLETED"), 300,
                    "requeue", job, log)
    if info["JobState"] == "PENDING":  # Slurm holds a requeued job ~2 min (BeginTime); release it now
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
    wait_for(lambda i: i["JobState"] == "COMPLETED" and i["Restarts"] == "1", 600, "COMPLETED after requeue", job,
             log)

    hpc = torch.load(run_dir / "hpc_ckpt_1.ckpt", weights_only=True)
    saved = hpc["global_step"]
    assert 3 <= saved < max_steps
    steps = read_trace(trace)
    assert set(steps) == {(0, 0), (0, 1), (1, 0), (1, 1)}, steps  # both ranks, in both attempts
    for rank in (0, 1):
        assert steps[(0, rank)] == list(range(1, saved + 1))  # stopped right after the step it saved
        assert steps[(1, rank)] == list(range(saved + 1, max_steps + 1))  # none twice, none skipped
    text = log.read_text()
    assert "requeued Slurm job" in text
    # the newer of hpc_ckpt_1 and last.ckpt: last.ckpt only when the save fell on a checkpoint_every step (then it
    # is written after the hpc checkpoint, at the same step)
    restored = {run_dir / "hpc_ckpt_1.ckpt"} | ({run_dir / "checkpoints" / "last.ckpt"} if saved % 5 == 0 else set())
    assert any(f"Restored all states from the checkpoint at {path}\n" in text for path in restored), text[-4000:]
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == max_steps


# ----- preemption at awkward moments, exactly ---------------------------------------------------------------------
# One sample per rank and epoch (length 4, batch 2, 2 ranks): every step is an epoch boundary, so a resumed run must
# equal the uninterrupted one bit for bit. Validation every 4 steps, 2 batches per rank.
EXACT = {"trainer": {"limit_val_batches": 2, "check_val_every_n_epoch": 4, "num_sanity_val_steps": 0},
         "data": {"length": 4, "val_length": 8}}
EXACT_STEPS = 8


def release_when_requeued(job: str, log: Path) -> None:
    """Wait past REQUEUED / COMPLETING; Slurm holds a requeued job ~2 min (BeginTime): release it."""
    info = wait_for(lambda i: i["Restarts"] == "1" and i["JobState"] in ("PENDING", "RUNNING", "COMPLETED"), 300,
                    "requeue", job, log)
    if info["JobState"] == "PENDING":
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)


@pytest.fixture(scope="module")
def exact_reference(slurm, tiny_pretrained, tmp_path_factory) -> dict:
    """The uninterrupted run's last.ckpt."""
    tmp = tmp_path_factory.mktemp("exact_reference")
    job, run_dir, _, log = submit(tmp, tiny_pretrained, EXACT_STEPS, "--checkpoint_every", "4", **EXACT)
    wait_for(lambda i: i["JobState"] == "COMPLETED", 600, "COMPLETED", job, log)
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)


@pytest.mark.chaos
@pytest.mark.parametrize("signame,where", [("TERM", "train"), ("USR1", "train"), ("TERM", "validation"),
                                           ("USR1", "validation"), ("TERM", "final"), ("USR1", "final")])
def test_a_signal_at_an_awkward_moment_ends_in_the_uninterrupted_runs_weights(
        slurm, tiny_pretrained, exact_reference, tmp_path, signame, where, chaos_outcome):
    from tests.training.slurm_helpers import wait_for_markers

    step = {"train": random.randint(1, EXACT_STEPS - 1), "validation": 4, "final": EXACT_STEPS}[where]
    marker = tmp_path / "paused"
    pause = {"class_path": "tests.training.slurm_helpers.PauseForSignal",
             "init_args": {"step": step, "where": where, "marker": str(marker)}}
    job, run_dir, trace, log = submit(tmp_path, tiny_pretrained, EXACT_STEPS, "--checkpoint_every", "4",
                                      callbacks=[pause], **EXACT)

    def alive():
        assert job_info(job)["JobState"] in ("PENDING", "RUNNING"), log.read_text()[-4000:]

    wait_for_markers(marker, 2, 300, alive)
    subprocess.run(["scancel", f"--signal={signame}", job], check=True)
    if where == "final":  # nothing left to do: no requeue, a complete run
        info = wait_for(lambda i: i["JobState"] == "COMPLETED", 300, "COMPLETED", job, log)
        assert info["Restarts"] == "0" and not list(run_dir.glob("hpc_ckpt_*.ckpt"))
        outcome, detail = "completed", "finished normally, last.ckpt at max_steps, no requeue"
    else:
        release_when_requeued(job, log)
        wait_for(lambda i: i["JobState"] == "COMPLETED" and i["Restarts"] == "1", 600, "COMPLETED after requeue",
                 job, log)
        saved = torch.load(run_dir / "hpc_ckpt_1.ckpt", weights_only=True)["global_step"]
        # train: right after the step it came at; validation: the step boundary after the cut-short validation
        assert saved == (step if where == "train" else step + 1), saved
        steps = read_trace(trace)
        for rank in (0, 1):
            assert steps[(0, rank)] + steps[(1, rank)] == list(range(1, EXACT_STEPS + 1))  # each step once
        if where == "validation":
            assert "validation at step 4 stopped before batch 1" in log.read_text()
        outcome, detail = "resumed exactly", f"requeued; saved at step {saved}; final weights torch.equal"
    final = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert final["global_step"] == EXACT_STEPS
    assert final["state_dict"].keys() == exact_reference["state_dict"].keys()
    for key, value in final["state_dict"].items():
        assert torch.equal(value, exact_reference["state_dict"][key]), key
    moment = {"train": "at a random step", "validation": "during validation", "final": "after the last step"}[where]
    chaos_outcome("slurm 1-node", f"SIG{signame} {moment}", outcome, detail)


def wait_for_array(job: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True, check=False).stdout.strip():
        assert time.time() < deadline, f"grid array {job} did not finish in {timeout:.0f} s"
        time.sleep(2)


def test_grid_submit_trains_and_sweeps_every_cell_and_collect_summarises_it(slurm, tiny_toy_world, tmp_path):
    """slurm/grid.sh on a 2-cell tiny grid: each array task trains its cell, then sweeps tau in a one-task srun
    step; collect gives one summary row per cell x tau x seed. Submitted again, the tasks neither retrain nor
    re-sweep (what a requeued task sees)."""
    out = tmp_path / "grid"
    config = tiny_grid_config(tmp_path, tiny_toy_world, out)
    grid = [sys.executable, str(ROOT / "experiments" / "grid.py")]
    env = {**os.environ, "PYTHON": sys.executable}
    logs = tmp_path / "logs"
    logs.mkdir()  # sbatch --output needs an existing directory

    def submit_grid() -> str:
        submitted = subprocess.run([*grid, "submit", "--config", str(config), "--", f"--chdir={ROOT}",
                                    "--ntasks-per-node=1", "--cpus-per-task=1", "--time=20",
                                    f"--output={logs}/%A_%a.out", f"--error={logs}/%A_%a.out"],
                                   capture_output=True, text=True, env=env, cwd=ROOT, check=False)
        assert submitted.returncode == 0, submitted.stderr
        job = submitted.stdout.strip().splitlines()[-1].split()[3].rstrip(":")
        wait_for_array(job, 900)
        return job

    first = submit_grid()
    subprocess.run([*grid, "collect", "--config", str(config)], check=True, cwd=ROOT, capture_output=True)
    cells = ["gamma0_box_seed0", "gamma1_box_seed0"]
    text = "\n".join(p.read_text()[-3000:] for p in logs.glob(f"{first}_*.out"))
    summary = list(csv.DictReader((out / "summary.csv").open()))
    assert sorted((r["cell"], float(r["tau"]), int(r["sample_seed"])) for r in summary) == \
        [(c, t, 0) for c in cells for t in (0.0, 1.0)], text
    for row in summary:
        assert row["status"] == "done" and row["global_step"] == "2" and row["sweep_status"] == "done"
        assert row["git_commit"] and row["config_hash"] and 0 <= float(row["ap50"]) <= 1
    for cell in cells:
        assert (out / cell / "checkpoints" / "last.ckpt").exists() and (out / cell / "sweep/sweep_done.json").exists()
    # the gates start at tanh(gamma_init): 0 vs ~0.76, and move little in 2 steps
    gates = {r["cell"]: float(r["gate_attn_mean_final"]) for r in summary}
    assert abs(gates["gamma0_box_seed0"]) < 0.2 and abs(gates["gamma1_box_seed0"] - 0.76) < 0.2
    assert (out / "grounding_vs_tau.png").exists() and list((out / "tensorboard").rglob("events.out.*"))

    stamps = {p: p.stat().st_mtime_ns for c in cells for p in (out / c / "checkpoints/last.ckpt",
                                                                  out / c / "sweep/metrics.csv")}
    # requeue-safety, as a clone of the committed results meets it (checkpoints are git-ignored): a resubmitted
    # array neither retrains nor re-sweeps, the cells' markers standing for their checkpoints (with the checkpoints
    # present, tests/experiments/test_experiments.py's run-local test; one array job less here)
    for cell in cells:
        (out / cell / "checkpoints" / "last.ckpt").unlink()
    again = submit_grid()
    text = "\n".join(p.read_text() for p in logs.glob(f"{again}_*.out"))
    assert text.count("training already finished; not retrained") == 2, text[-4000:]
    assert text.count("trained and swept (cell_done.json); not redone") == 2, text[-4000:]
    assert not list(out.rglob("*.ckpt")) and all(p.stat().st_mtime_ns == t for p, t in stamps.items() if p.exists())
