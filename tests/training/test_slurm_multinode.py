"""slurm/train.sh on a real two-node Slurm (slurm/local_cluster_2node.sh: two network namespaces, each with its own
hostname, address and slurmd): one CPU rank per node, gloo DDP across the namespaces, on the tiny pipeline.

An uninterrupted run (both nodes, each rank reading its own shard), requeues by SIGUSR1 and by SIGTERM that must
end on the same weights bit for bit, and a SIGKILL of one node's rank that must fail the job with a clear error and
leave the last checkpoint intact.

Exactness: each rank's shard holds one batch (2 samples) and is read in a fixed order (no shuffle, no flip, one
epoch for the whole run), so every step of a rank sees the same batch and the resumed data position cannot matter.

Skipped when the two-node cluster is not up, unless GLIGEN_REQUIRE_SLURM=1 (CI), which makes that a failure.
"""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from gligen.data.examples import make_sample
from gligen.data.shards import write_shards
from tests.helpers import ROOT
from tests.training.slurm_helpers import job_info, read_probe, read_trace, skip_or_fail, wait_for

TRAIN = ROOT / "slurm" / "train.sh"
CONF = Path("/etc/slurm-2node/slurm.conf")
NODES = ("gl2n1", "gl2n2")
MAX_STEPS = 16
EVERY = 4  # --checkpoint_every
AREA = "slurm 2-node"
pytestmark = pytest.mark.slow


def two_node_problem() -> str | None:
    hint = "start it with: sudo slurm/local_cluster_2node.sh"
    if not CONF.exists():
        return f"no two-node Slurm ({CONF} missing); {hint}"
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, timeout=20,
                             check=False, env={**os.environ, "SLURM_CONF": str(CONF)})
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"sinfo of the two-node cluster failed ({error}); {hint}"
    usable = set(re.findall(r"^(\S+) (?:idle|mixed|allocated|completing)", out.stdout, re.MULTILINE))
    if out.returncode != 0 or not set(NODES) <= usable:
        return f"two-node cluster not usable (sinfo: {out.stdout.strip() or out.stderr.strip()}); {hint}"
    return None


@pytest.fixture(scope="module")
def cluster():
    """The two-node cluster's SLURM_CONF in os.environ for this module (sbatch passes it on to the jobs)."""
    skip_or_fail(two_node_problem())
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLURM_CONF", str(CONF))
        yield


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Two shards of two 16x16 samples: r0-* in shard 0 (rank 0's), r1-* in shard 1 (rank 1's)."""
    root = tmp_path_factory.mktemp("two_node_shards")
    keys = ["r0-a", "r0-b", "r1-a", "r1-b"]
    samples = (make_sample(k, width=16, height=16, seed=i, boxes=[(0.1, 0.1, 0.6, 0.7)]) for i, k in enumerate(keys))
    write_shards(samples, root, prefix="shard", max_samples=2, progress=False)
    # validation: 8 samples, 4 per rank, 2 batches each (so a signal can land between them)
    val = (make_sample(f"v{i}", width=16, height=16, seed=10 + i, boxes=[(0.2, 0.2, 0.7, 0.8)]) for i in range(8))
    write_shards(val, root / "val", prefix="val", max_samples=8, progress=False)
    return root


class Job:
    def __init__(self, tmp_path: Path, pretrained: str, shards: Path, max_steps: int, callbacks: list = ()):
        self.run_dir, self.trace, self.probe = tmp_path / "run", tmp_path / "steps.txt", tmp_path / "probe"
        self.log = tmp_path / "slurm.out"
        config = {
            "seed_everything": 0,
            "trainer": {
                "accelerator": "cpu", "strategy": "ddp", "max_steps": max_steps, "log_every_n_steps": 1,
                "limit_val_batches": 2, "val_check_interval": EVERY, "check_val_every_n_epoch": None,
                "num_sanity_val_steps": 0, "enable_progress_bar": False, "enable_model_summary": False,
                "callbacks": [
                    {"class_path": "gligen.training.checkpointing.StepTrace", "init_args": {"path": str(self.trace)}},
                    {"class_path": "tests.training.slurm_helpers.RankProbe",
                     "init_args": {"directory": str(self.probe)}},
                    *callbacks,
                ],
            },
            "model": {"pretrained": pretrained, "learning_rate": 1e-3, "warmup_steps": 0},
            "data": {"class_path": "gligen.data.datamodule.GroundingDataModule", "init_args": {
                "train_shards": {"grounding": str(shards)}, "val_shards": str(shards / "val"), "resolution": 16,
                "batch_size": 2, "num_workers": 0,
                "batches_per_epoch": 1000, "resampled": False, "shuffle_buffer": 1, "random_flip": False}},
        }
        config_path = tmp_path / "config.yaml"
        config_path.write_text(yaml.safe_dump(config))
        env = {**os.environ, "CONFIG": str(config_path), "RUN_DIR": str(self.run_dir), "PYTHON": sys.executable}
        out = subprocess.run(
            ["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--time=15",
             f"--chdir={ROOT}", f"--output={self.log}", f"--error={self.log}", "--job-name=gligen-2node", str(TRAIN),
             "--checkpoint_every", str(EVERY)],
            capture_output=True, text=True, env=env, check=True,
        )
        self.id = out.stdout.strip().split(";")[0]
        self.started = time.time()

    def wait(self, predicate, timeout: float, what: str) -> dict[str, str]:
        return wait_for(predicate, timeout, what, self.id, self.log)

    def wait_steps(self, rank: int, step: int, timeout: float = 300) -> None:
        """Until `rank` finished `step` in the first attempt."""
        deadline = time.time() + timeout
        while not (self.trace.exists() and step <= max(read_trace(self.trace).get((0, rank), [0]))):
            assert time.time() < deadline, f"rank {rank} not at step {step} in {timeout:.0f} s:\n{self.tail()}"
            assert job_info(self.id)["JobState"] in ("PENDING", "RUNNING"), self.tail()
            time.sleep(0.2)

    def tail(self) -> str:
        return self.log.read_text()[-4000:] if self.log.exists() else "(no log)"


def state_dict(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True, map_location="cpu")["state_dict"]


@pytest.fixture(scope="module")
def uninterrupted(cluster, tiny_pretrained, shards, tmp_path_factory) -> Job:
    job = Job(tmp_path_factory.mktemp("two_node_reference"), tiny_pretrained, shards, MAX_STEPS)
    job.wait(lambda i: i["JobState"] == "COMPLETED", 600, "COMPLETED")
    job.seconds = time.time() - job.started
    return job


def test_two_node_job_trains_one_rank_per_node_each_on_its_own_shard(uninterrupted):
    job = uninterrupted
    steps = list(range(1, MAX_STEPS + 1))
    assert read_trace(job.trace) == {(0, 0): steps, (0, 1): steps}, job.tail()
    records = read_probe(job.probe)
    starts = {r["rank"]: r for r in records if r["event"] == "start"}
    assert sorted(starts) == [0, 1]
    for rank, node in enumerate(NODES):  # SLURM_NNODES=2 on both; rank 0 on the first node (MASTER_ADDR)
        assert starts[rank]["nnodes"] == "2" and starts[rank]["world_size"] == 2
        assert starts[rank]["host"] == starts[rank]["node"] == node
    keys = {rank: {k for r in records if r["event"] == "batch" and r["rank"] == rank for k in r["keys"]}
            for rank in (0, 1)}
    assert keys == {0: {"r0-a", "r0-b"}, 1: {"r1-a", "r1-b"}}  # each rank read only its own shard
    text = job.log.read_text()
    assert "distributed_backend=gloo" in text and "GLOBAL_RANK: 1, MEMBER: 2/2" in text
    assert re.search(r"nodes 2 \(gl2n\[1-2\]\) tasks/node 1", text), text[-4000:]
    assert torch.load(job.run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == MAX_STEPS
    print(f"two-node uninterrupted run: {job.seconds:.0f} s")


def requeue_and_compare(sig: str, uninterrupted: Job, tiny_pretrained, shards, tmp_path,
                        where: str | None = None) -> int:
    """Signal the running two-node job with `sig` once both ranks finished step 2 (early: a fast machine runs the
    few steps in seconds), or, with `where`, once both paused there (PauseForSignal: "validation" = between the
    2 batches of the validation at step EVERY, "final" = after the last step); it must save, requeue itself, resume
    on both nodes and end on the uninterrupted run's weights ("final": finish without a requeue). Returns the step
    it saved at (MAX_STEPS for "final")."""
    from tests.training.slurm_helpers import wait_for_markers

    marker = tmp_path / "paused"
    pause = [{"class_path": "tests.training.slurm_helpers.PauseForSignal",
              "init_args": {"step": EVERY if where == "validation" else MAX_STEPS, "where": where,
                            "marker": str(marker)}}] if where else []
    job = Job(tmp_path, tiny_pretrained, shards, MAX_STEPS, callbacks=pause)
    if where:
        def alive():
            assert job_info(job.id)["JobState"] in ("PENDING", "RUNNING"), job.tail()

        wait_for_markers(marker, 2, 300, alive)
    else:
        job.wait_steps(0, 2)
        job.wait_steps(1, 2)
    subprocess.run(["scancel", f"--signal={sig}", job.id], check=True)
    reference = state_dict(uninterrupted.run_dir / "checkpoints" / "last.ckpt")
    if where == "final":
        info = job.wait(lambda i: i["JobState"] == "COMPLETED", 300, "COMPLETED")
        assert info["Restarts"] == "0" and not list(job.run_dir.glob("hpc_ckpt_*.ckpt")), job.tail()
        resumed = state_dict(job.run_dir / "checkpoints" / "last.ckpt")
        assert all(torch.equal(reference[k], resumed[k]) for k in reference)
        return MAX_STEPS
    # wait past REQUEUED / COMPLETING: only a PENDING job can be released
    info = job.wait(lambda i: i["Restarts"] == "1" and i["JobState"] in ("PENDING", "RUNNING", "COMPLETED"), 300,
                    "requeue")
    if info["JobState"] == "PENDING":  # Slurm holds a requeued job ~2 min (BeginTime); release it now
        subprocess.run(["scontrol", "update", f"JobId={job.id}", "StartTime=now"], check=True)
    job.wait(lambda i: i["JobState"] == "COMPLETED" and i["Restarts"] == "1", 600, "COMPLETED after requeue")

    saved = torch.load(job.run_dir / "hpc_ckpt_1.ckpt", weights_only=True)["global_step"]
    assert saved == EVERY + 1 if where == "validation" else 2 <= saved < MAX_STEPS
    if where == "validation":
        assert f"validation at step {EVERY} stopped before batch 1" in job.log.read_text(), job.tail()
    steps = read_trace(job.trace)
    for rank in (0, 1):  # both ranks in both attempts, every step exactly once
        assert steps[(0, rank)] == list(range(1, saved + 1)), job.tail()
        assert steps[(1, rank)] == list(range(saved + 1, MAX_STEPS + 1)), job.tail()
    hosts = {(r["attempt"], r["rank"]): r["host"] for r in read_probe(job.probe) if r["event"] == "start"}
    assert hosts == {(a, rank): NODES[rank] for a in (0, 1) for rank in (0, 1)}
    assert "requeued Slurm job" in job.log.read_text()
    final = job.run_dir / "checkpoints" / "last.ckpt"
    assert torch.load(final, weights_only=True)["global_step"] == MAX_STEPS
    resumed = state_dict(final)
    assert reference.keys() == resumed.keys()
    assert all(torch.equal(reference[k], resumed[k]) for k in reference), \
        [k for k in reference if not torch.equal(reference[k], resumed[k])][:5]
    print(f"two-node {sig} requeue: {time.time() - job.started:.0f} s, saved at step {saved}")
    return saved


@pytest.mark.chaos
@pytest.mark.parametrize("sig", ["USR1", "TERM"])
def test_a_signal_requeues_the_two_node_job_and_it_resumes_to_the_same_weights(sig, uninterrupted, tiny_pretrained,
                                                                             shards, tmp_path, chaos_outcome):
    requeue_and_compare(sig, uninterrupted, tiny_pretrained, shards, tmp_path)
    chaos_outcome(AREA, f"SIG{sig} to both ranks mid-run (scancel --signal={sig})", "resumed exactly",
                  "both ranks save at the same step boundary, the job requeues itself and resumes on both nodes; "
                  "every step once, final weights equal the uninterrupted run's")


@pytest.mark.chaos
@pytest.mark.parametrize("sig,where", [("TERM", "validation"), ("USR1", "validation"), ("TERM", "final"),
                                       ("USR1", "final")])
def test_a_signal_during_validation_or_after_the_last_step_of_a_two_node_job(sig, where, uninterrupted,
                                                                            tiny_pretrained, shards, tmp_path,
                                                                            chaos_outcome):
    saved = requeue_and_compare(sig, uninterrupted, tiny_pretrained, shards, tmp_path, where=where)
    if where == "final":
        chaos_outcome(AREA, f"SIG{sig} after the last step", "completed",
                      "finished normally on both nodes, no requeue; weights equal the uninterrupted run's")
    else:
        chaos_outcome(AREA, f"SIG{sig} during validation", "resumed exactly",
                      f"validation stopped between its batches on both ranks, saved at step {saved}, requeued; "
                      "final weights equal the uninterrupted run's")


def rank_pid(job: Job, rank: int) -> int:
    """The pid of `rank`'s training process (from RankProbe), checked against its environment: this job's rank."""
    (start,) = [r for r in read_probe(job.probe) if r["event"] == "start" and r["rank"] == rank]
    environ = Path(f"/proc/{start['pid']}/environ").read_bytes().split(b"\0")
    assert f"SLURM_JOB_ID={job.id}".encode() in environ and f"SLURM_PROCID={rank}".encode() in environ
    return start["pid"]


@pytest.mark.chaos
def test_kill_9_of_one_nodes_rank_fails_the_job_clearly_and_keeps_the_last_checkpoint(cluster, tiny_pretrained,
                                                                                     shards, tmp_path, chaos_outcome):
    job = Job(tmp_path, tiny_pretrained, shards, 10_000)  # cannot finish before the kill
    job.wait_steps(1, EVERY + 2)  # past the first last.ckpt
    os.kill(rank_pid(job, 1), signal.SIGKILL)
    killed = time.time()
    info = job.wait(lambda i: i["JobState"] == "FAILED", 180, "FAILED after SIGKILL of rank 1")
    seconds = time.time() - killed
    assert info["Restarts"] == "0" and info["ExitCode"] != "0:0", info
    text = job.log.read_text()
    assert re.search(r"srun: error: gl2n2: task 1: Killed", text), text[-4000:]
    last = torch.load(job.run_dir / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert last["global_step"] >= EVERY and last["global_step"] % EVERY == 0
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values() if t.is_floating_point())
    assert not list(job.run_dir.glob("hpc_ckpt_*.ckpt"))  # nothing requeued it
    print(f"two-node kill -9: job FAILED {seconds:.0f} s after the kill; last.ckpt at step {last['global_step']}")
    chaos_outcome(AREA, "kill -9 of one node's rank mid-run", "clear error",
                  "srun ends the other rank (--kill-on-bad-exit), the job is FAILED within seconds and not requeued, "
                  "the log names the killed task (srun: error: gl2n2: task 1: Killed); last.ckpt loads, finite")
