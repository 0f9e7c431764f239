"""Resume without Slurm: exact continuation, the requeue checkpoint, atomic checkpoint writes
(gligen/training/checkpointing.py).

Exactness: with RandomBoxDataModule(length=2, batch_size=2) every step sees the same batch, so the data position
(which a plain DataLoader does not restore mid-epoch) cannot matter, and an interrupted run must reproduce the
uninterrupted one bit for bit: weights, optimizer, LR schedule, step counter and the global RNG stream (noise,
timesteps, CFG dropout) are all restored.
"""

import os
import signal

import lightning as L
import pytest
import torch

from gligen.training import checkpointing
from gligen.training.checkpointing import atomic_torch_save, resume_path
from gligen.training.cli import main
from tests.helpers import assert_same_training_state, load, write_config


@pytest.mark.parametrize("checkpoint_every", [0, 1])
def test_interrupted_run_equals_uninterrupted_run(tiny_pretrained, tmp_path, checkpoint_every):
    every = ["--checkpoint_every", str(checkpoint_every)]
    straight = tmp_path / "straight"
    main(["fit", "--config", str(write_config(tmp_path / "c4.yaml", tiny_pretrained, 4, exact=True)),
          "--run_dir", str(straight), *every])

    resumed = tmp_path / "resumed"
    cli = main(["fit", "--config", str(write_config(tmp_path / "c2.yaml", tiny_pretrained, 2, exact=True)),
                "--run_dir", str(resumed), *every])
    assert cli.trainer.global_step == 2
    cli = main(["fit", "--config", str(tmp_path / "c4.yaml"), "--run_dir", str(resumed), *every])
    assert cli.trainer.global_step == 4

    a, b = load(straight / "checkpoints" / "last.ckpt"), load(resumed / "checkpoints" / "last.ckpt")
    assert a["global_step"] == 4
    assert_same_training_state(a, b)


class SendSignalAt(L.Callback):
    """Sends this process `signum` after `step` optimizer steps (what `scancel --signal=USR1` does on Slurm)."""

    def __init__(self, step: int, signum: int = int(signal.SIGUSR1)):
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def test_requeue_signal_saves_hpc_checkpoint_at_a_step_boundary_and_resume_prefers_it(tiny_pretrained, tmp_path,
                                                                                     monkeypatch):
    for name in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_NTASKS", "SLURM_JOB_NAME"):
        monkeypatch.delenv(name, raising=False)  # not under Slurm: save and stop, no `scontrol requeue`
    run_dir, trace = tmp_path / "run", tmp_path / "steps.txt"
    callbacks = [
        {"class_path": "tests.training.test_resume.SendSignalAt", "init_args": {"step": 3}},
        {"class_path": "gligen.training.checkpointing.StepTrace", "init_args": {"path": str(trace)}},
    ]
    config = write_config(tmp_path / "c.yaml", tiny_pretrained, 6, length=8, callbacks=callbacks, exact=True)
    # last.ckpt every 2 steps: at step 2, older than the requeue checkpoint of step 3
    before = signal.getsignal(signal.SIGUSR1)
    cli = main(["fit", "--config", str(config), "--run_dir", str(run_dir), "--checkpoint_every", "2"])
    assert cli.trainer.global_step == 3  # stopped right after the step that saw the signal
    assert signal.getsignal(signal.SIGUSR1) == before  # handler removed when fit ends
    hpc = run_dir / "hpc_ckpt_1.ckpt"
    assert load(hpc)["global_step"] == 3
    assert load(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 2  # not rewritten on the way out
    assert resume_path(run_dir) == str(hpc)

    config = write_config(tmp_path / "c.yaml", tiny_pretrained, 6, length=8, callbacks=callbacks[1:], exact=True)
    cli = main(["fit", "--config", str(config), "--run_dir", str(run_dir), "--checkpoint_every", "2"])
    assert cli.trainer.global_step == 6
    steps = [int(line.split()[2]) for line in trace.read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # from the hpc checkpoint (step 3), not from last.ckpt (step 2)


def test_resume_path_prefers_the_newest_checkpoint(tmp_path):
    assert resume_path(tmp_path) is None
    (tmp_path / "checkpoints").mkdir()
    last = tmp_path / "checkpoints" / "last.ckpt"
    hpc1, hpc2 = tmp_path / "hpc_ckpt_1.ckpt", tmp_path / "hpc_ckpt_2.ckpt"
    for path, mtime in ((hpc1, 100), (last, 200), (hpc2, 300)):
        path.write_bytes(b"x")
        os.utime(path, (mtime, mtime))
    assert resume_path(tmp_path) == str(hpc2)
    os.utime(last, (400, 400))  # training went on after the requeue and wrote a later last.ckpt
    assert resume_path(tmp_path) == str(last)


def test_atomic_save_keeps_the_old_file_when_the_write_dies(tmp_path, monkeypatch):
    path = tmp_path / "x.ckpt"
    atomic_torch_save({"v": 1}, path)

    def dies_half_way(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt("killed during save")

    monkeypatch.setattr(checkpointing.torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"v": 2}, path)
    assert torch.load(path, weights_only=True) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.ckpt"]  # no temp file left behind


def test_a_kill_during_a_training_save_leaves_the_previous_last_ckpt_loadable(tiny_pretrained, tmp_path,
                                                                              monkeypatch):
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", tiny_pretrained, 2, exact=True)
    main(["fit", "--config", str(config), "--run_dir", str(run_dir)])
    last = run_dir / "checkpoints" / "last.ckpt"
    assert load(last)["global_step"] == 2

    real_save = torch.save

    def dies_half_way(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.seek(0)
        f.truncate(1000)  # part of the file is on disk ...
        raise SystemExit("killed during save")  # ... when the process dies

    monkeypatch.setattr(checkpointing.torch, "save", dies_half_way)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(config), "--run_dir", str(run_dir), "--trainer.max_steps", "4",
              "--checkpoint_every", "1"])
    monkeypatch.setattr(checkpointing.torch, "save", real_save)

    checkpoint = load(last)  # the previous one, intact
    assert checkpoint["global_step"] == 2
    assert not [p for p in last.parent.iterdir() if p.name != "last.ckpt"]
    cli = main(["fit", "--config", str(config), "--run_dir", str(run_dir), "--trainer.max_steps", "3"])
    assert cli.trainer.global_step == 3  # and the run resumes from it
