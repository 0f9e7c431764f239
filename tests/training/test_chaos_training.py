"""Fault injection on training (#17): NaN batches, preemption signals at awkward moments, careless reruns, a
second job on the same run_dir, a pickled checkpoint. Each test injects the fault, asserts the outcome and records
it for docs/reliability.md (`pytest -m chaos --chaos-report=docs/reliability.md`).

Exactness as in tests/training/test_resume.py (`write_config(..., exact=True)`): RandomBoxDataModule(length=2,
batch_size=2) gives every step the same batch, so an interrupted and resumed run must equal the uninterrupted one bit
for bit."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from gligen.training.checkpointing import AtomicCheckpointIO, NonFiniteCheckpointError, atomic_torch_save
from gligen.training.cli import main, run
from gligen.training.nonfinite import NonFiniteTrainingError
from gligen.training.preemption import EXIT_INTERRUPTED, SlurmRequeue
from tests.helpers import ROOT, assert_same_training_state, load, write_config

pytestmark = pytest.mark.chaos


def config_with(path: Path, pretrained: str, max_steps: int, callbacks=(), validate: bool = False,
                data: dict | None = None) -> Path:
    write_config(path, pretrained, max_steps, callbacks=list(callbacks), exact=True)
    config = yaml.safe_load(path.read_text())
    if validate:  # validation every 2 steps, 2 batches
        config["trainer"].update({"limit_val_batches": 2, "val_check_interval": 2, "check_val_every_n_epoch": None,
                                  "num_sanity_val_steps": 0})
    if data:
        config["data"] = data
    path.write_text(yaml.safe_dump(config))
    return path


def straight_run(tmp_path: Path, pretrained: str, max_steps: int, **kw) -> dict:
    run_dir = tmp_path / "straight"
    main(["fit", "--config", str(config_with(tmp_path / "straight.yaml", pretrained, max_steps, **kw)),
          "--run_dir", str(run_dir)])
    return load(run_dir / "checkpoints" / "last.ckpt")


def no_slurm(monkeypatch):
    for name in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_NTASKS", "SLURM_JOB_NAME"):
        monkeypatch.delenv(name, raising=False)


# ----- non-finite steps ------------------------------------------------------------------------------------------
def test_a_nan_batch_on_one_ddp_rank_is_skipped_on_both_and_never_saved(tiny_pretrained, tmp_path, chaos_outcome):
    """2 gloo ranks; NaN pixels on rank 1 only, before steps 2 and 4 of 4: both ranks skip both optimizer steps,
    training reaches max_steps, every saved checkpoint is finite, and the skipped last step left the weights (and
    optimizer moments) exactly as the step before."""
    out, run_dir = tmp_path / "out", tmp_path / "run"
    callbacks = [{"class_path": "tests.helpers.InjectNaN", "init_args": {"steps": [1, 3], "ranks": [1]}},
                 {"class_path": "tests.helpers.RecordGuard", "init_args": {"dir": str(out)}}]
    config = config_with(tmp_path / "c.yaml", tiny_pretrained, 4, callbacks)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "MASTER_PORT": str(_free_port())}
    for name in ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_JOB_NAME", "SLURM_PROCID"):
        env.pop(name, None)
    result = subprocess.run(
        [sys.executable, "-m", "gligen", "fit", "--config", str(config), "--run_dir", str(run_dir),
         "--trainer.devices", "2", "--trainer.strategy", "ddp", "--checkpoint_every", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((out / f"guard-rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["skipped"] for r in ranks] == [2, 2]
    assert [r["global_step"] for r in ranks] == [4, 4]
    last, previous = load(run_dir / "checkpoints" / "last.ckpt"), load(run_dir / "checkpoints" / "last.1.ckpt")
    assert (last["global_step"], previous["global_step"]) == (4, 3)
    for checkpoint in (last, previous):
        assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values())
    for key in last["state_dict"]:  # step 4 was skipped: nothing moved
        assert torch.equal(last["state_dict"][key], previous["state_dict"][key]), key
    for a, b in zip(last["optimizer_states"][0]["state"].values(), previous["optimizer_states"][0]["state"].values()):
        for key in a:
            assert torch.equal(a[key], b[key]), key
    assert last["callbacks"]["NonFiniteGuard"]["skipped"] == 2
    assert "optimizer step skipped on every rank" in result.stderr
    chaos_outcome("training", "NaN batch on one of 2 DDP ranks", "step skipped",
                  "both ranks skip the step; weights, moments and checkpoints stay finite")


def test_nonfinite_steps_in_a_row_stop_the_run_and_keep_the_last_good_checkpoint(tiny_pretrained, tmp_path,
                                                                                chaos_outcome):
    callbacks = [{"class_path": "tests.helpers.InjectNaN", "init_args": {"steps": list(range(2, 20))}}]
    config = config_with(tmp_path / "c.yaml", tiny_pretrained, 20, callbacks)
    run_dir = tmp_path / "run"
    with pytest.raises(NonFiniteTrainingError, match="3 consecutive optimizer steps"):
        main(["fit", "--config", str(config), "--run_dir", str(run_dir), "--checkpoint_every", "1",
              "--max_nonfinite_steps", "3"])
    checkpoints = sorted((run_dir / "checkpoints").glob("*.ckpt"))
    assert [p.name for p in checkpoints] == ["last.1.ckpt", "last.ckpt"]
    good = load(run_dir / "checkpoints" / "last.ckpt")
    assert good["global_step"] == 4  # 2 good steps, then 2 skipped ones were saved; the 3rd skip stopped the run
    assert all(torch.isfinite(v).all() for v in good["state_dict"].values())
    chaos_outcome("training", "NaN in every batch from step 3", "clear error",
                  "NonFiniteTrainingError after --max_nonfinite_steps in a row; last.ckpt finite")


def test_a_checkpoint_with_nonfinite_weights_is_never_written(tmp_path, chaos_outcome):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO(keep=2)
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)
    with pytest.raises(NonFiniteCheckpointError, match=r"\['w'\]"):
        io.save_checkpoint({"state_dict": {"w": torch.tensor([1.0, float("inf"), 0.0])}, "global_step": 2}, path)
    assert torch.equal(load(path)["state_dict"]["w"], torch.ones(3))
    assert not (tmp_path / "last.1.ckpt").exists()
    chaos_outcome("checkpoints", "weights with inf at save time", "refused", "previous checkpoint untouched")


def test_overwriting_keeps_previous_versions(tmp_path):
    path = tmp_path / "last.ckpt"
    for step in range(1, 5):
        atomic_torch_save({"step": step}, path, keep=3)
    assert [load(tmp_path / n)["step"] for n in ("last.ckpt", "last.1.ckpt", "last.2.ckpt")] == [4, 3, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.1.ckpt", "last.2.ckpt", "last.ckpt"]


# ----- preemption ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_at_a_random_step_resumes_exactly(tiny_pretrained, tmp_path, monkeypatch, signum, chaos_outcome):
    no_slurm(monkeypatch)
    step = random.Random().randint(1, 5)
    reference = straight_run(tmp_path, tiny_pretrained, 6)
    run_dir = tmp_path / "run"
    callbacks = [{"class_path": "tests.helpers.SignalAt", "init_args": {"step": step, "signum": int(signum)}}]
    first = config_with(tmp_path / "first.yaml", tiny_pretrained, 6, callbacks)
    assert run(["fit", "--config", str(first), "--run_dir", str(run_dir)]) == EXIT_INTERRUPTED
    assert load(run_dir / "hpc_ckpt_1.ckpt")["global_step"] == step, f"signal after step {step}"
    assert run(["fit", "--config", str(config_with(tmp_path / "again.yaml", tiny_pretrained, 6)),
                "--run_dir", str(run_dir)]) == 0
    assert_same_training_state(reference, load(run_dir / "checkpoints" / "last.ckpt"))
    chaos_outcome("preemption (no Slurm)", f"{signal.Signals(signum).name} after a random step", "resumed exactly",
                  "exit 3 (saved, not requeued), rerun equals the uninterrupted run")


def test_a_signal_during_validation_stops_it_and_resumes_exactly(tiny_pretrained, tmp_path, monkeypatch,
                                                                 chaos_outcome):
    no_slurm(monkeypatch)
    reference = straight_run(tmp_path, tiny_pretrained, 6, validate=True)
    run_dir = tmp_path / "run"
    signal_at = {"class_path": "tests.helpers.SignalAt",
                 "init_args": {"step": 2, "signum": int(signal.SIGTERM), "where": "validation", "val_batch": 0}}
    first = config_with(tmp_path / "first.yaml", tiny_pretrained, 6, [signal_at], validate=True)
    cli = main(["fit", "--config", str(first), "--run_dir", str(run_dir)])
    # the validation at step 2 stopped before its 2nd batch; the one Lightning runs when training stops never began
    requeue = SlurmRequeue.of(cli.trainer)
    assert requeue.aborted_validations[0] == (2, 1)
    assert all(batch == 0 for _, batch in requeue.aborted_validations[1:])
    assert requeue.interrupted
    saved = load(run_dir / "hpc_ckpt_1.ckpt")["global_step"]
    assert saved == 3  # the next step boundary
    main(["fit", "--config", str(config_with(tmp_path / "again.yaml", tiny_pretrained, 6, validate=True)),
          "--run_dir", str(run_dir)])
    assert_same_training_state(reference, load(run_dir / "checkpoints" / "last.ckpt"))
    chaos_outcome("preemption (no Slurm)", "SIGTERM during validation", "resumed exactly",
                  f"validation stopped after its first batch, saved at step {saved}")


def test_a_signal_after_the_final_step_leaves_a_complete_run(tiny_pretrained, tmp_path, monkeypatch, chaos_outcome):
    no_slurm(monkeypatch)
    reference = straight_run(tmp_path, tiny_pretrained, 4)
    run_dir = tmp_path / "run"
    callbacks = [{"class_path": "tests.helpers.SignalAt", "init_args": {"step": 4, "signum": int(signal.SIGTERM)}}]
    config = config_with(tmp_path / "c.yaml", tiny_pretrained, 4, callbacks)
    assert run(["fit", "--config", str(config), "--run_dir", str(run_dir)]) == 0
    assert not list(run_dir.glob("hpc_ckpt_*.ckpt"))
    assert_same_training_state(reference, load(run_dir / "checkpoints" / "last.ckpt"))
    chaos_outcome("preemption (no Slurm)", "SIGTERM after the final step", "completed",
                  "last.ckpt at max_steps, exit 0, nothing to requeue")


def test_a_signal_while_the_model_loads_is_kept_until_training_starts(tiny_pretrained, tmp_path, monkeypatch,
                                                                      chaos_outcome):
    no_slurm(monkeypatch)
    reference = straight_run(tmp_path, tiny_pretrained, 3)
    trigger, run_dir = tmp_path / "send-signal", tmp_path / "run"
    data = {"class_path": "tests.helpers.SignalWhileLoading",
            "init_args": {"trigger": str(trigger), "length": 2, "batch_size": 2}}
    config = config_with(tmp_path / "c.yaml", tiny_pretrained, 3, data=data)
    trigger.touch()
    assert run(["fit", "--config", str(config), "--run_dir", str(run_dir)]) == EXIT_INTERRUPTED  # alive: not killed
    assert load(run_dir / "hpc_ckpt_1.ckpt")["global_step"] == 0
    assert run(["fit", "--config", str(config), "--run_dir", str(run_dir)]) == 0
    assert_same_training_state(reference, load(run_dir / "checkpoints" / "last.ckpt"))
    chaos_outcome("preemption (no Slurm)", "SIGTERM while the model and data load", "resumed exactly",
                  "kept until training starts, saved at step 0")


def test_a_requeue_that_cannot_happen_exits_non_zero_with_the_reason(tiny_pretrained, tmp_path, monkeypatch, capsys,
                                                                     chaos_outcome):
    no_slurm(monkeypatch)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")  # a Slurm job id, but no scontrol on PATH
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    callbacks = [{"class_path": "tests.helpers.SignalAt", "init_args": {"step": 1, "signum": int(signal.SIGUSR1)}}]
    config = config_with(tmp_path / "c.yaml", tiny_pretrained, 3, callbacks)
    assert run(["fit", "--config", str(config), "--run_dir", str(tmp_path / "run")]) == EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert "scontrol requeue 4242 could not run" in err and "not requeued" in err
    chaos_outcome("preemption", "requeue impossible (no scontrol)", "clear error",
                  "exit 3 naming the reason; the hpc checkpoint is saved")


# ----- reruns ----------------------------------------------------------------------------------------------------
def test_rerunning_a_run_dir_with_another_learning_rate_is_refused(tiny_pretrained, tmp_path, capsys, chaos_outcome):
    config, run_dir = write_config(tmp_path / "c.yaml", tiny_pretrained, 2, exact=True), tmp_path / "run"
    assert run(["fit", "--config", str(config), "--run_dir", str(run_dir)]) == 0
    changed = ["fit", "--config", str(config), "--run_dir", str(run_dir), "--model.learning_rate", "1e-5",
               "--trainer.max_steps", "4"]
    assert run(changed) == 2
    err = capsys.readouterr().err
    assert "model.learning_rate: 0.001 -> 1e-05" in err and "max_steps" not in err  # training further is fine
    assert load(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 2  # nothing trained
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["learning_rate"] == 1e-3
    # explicitly allowed: resumes with the new value, and both configs stay in the history
    cli = main([*changed, "--allow_config_change", "true"])
    assert cli.trainer.global_step == 4 and cli.trainer.optimizers[0].param_groups[0]["initial_lr"] == 1e-5
    history = sorted((run_dir / "config_history").glob("*.yaml"))
    assert [yaml.safe_load(p.read_text())["model"]["learning_rate"] for p in history] == [1e-3, 1e-5]
    chaos_outcome("reruns", "same run_dir, changed model.learning_rate", "refused",
                  "exit 2 naming the key; --allow_config_change true resumes, history keeps both")


def test_a_second_job_on_a_run_dir_in_use_is_refused_and_a_stale_lock_taken_over(tiny_pretrained, tmp_path, capsys,
                                                                                 chaos_outcome):
    config, run_dir = write_config(tmp_path / "c.yaml", tiny_pretrained, 1, exact=True), tmp_path / "run"
    run_dir.mkdir()
    other = subprocess.Popen(["sleep", "120"])
    try:
        (run_dir / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": other.pid, "job": None,
                                                   "since": "earlier"}))
        assert run(["fit", "--config", str(config), "--run_dir", str(run_dir)]) == 2
        assert f"pid {other.pid}" in capsys.readouterr().err
        assert not (run_dir / "checkpoints").exists()
    finally:
        other.kill()
        other.wait()
    assert run(["fit", "--config", str(config), "--run_dir", str(run_dir)]) == 0  # its holder is dead: stale
    assert not (run_dir / ".lock").exists()  # released at the end
    chaos_outcome("reruns", "a second job on a run_dir in use", "refused", "names the holder; a dead holder's "
                  "lock is taken over")


# ----- unsafe checkpoints ----------------------------------------------------------------------------------------
class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_resuming_from_a_pickled_checkpoint_never_runs_its_code(tiny_pretrained, tmp_path, chaos_outcome):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "shared.ckpt"
    torch.save({"state_dict": {}, "payload": _Payload(str(marker))}, evil)
    config = write_config(tmp_path / "c.yaml", tiny_pretrained, 1, exact=True)
    with pytest.raises(Exception, match="Weights only load failed|Unsupported global"):
        main(["fit", "--config", str(config), "--ckpt_path", str(evil)])
    assert not marker.exists()
    chaos_outcome("checkpoints", "--ckpt_path to a checkpoint carrying pickled code", "refused",
                  "weights_only load error; nothing executed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
