
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gligen.training.cli import main
from tests.helpers import write_config


def test_fit_writes_a_fixed_run_directory_and_resumes_from_it(tiny_pretrained, tmp_path):
    run_dir = tmp_path / "runs" / "toy"
    config = write_config(tmp_path / "config.yaml", tiny_pretrained, max_steps=2)
    cli = main(["fit", "--config", str(config), "--run_dir", str(run_dir)])
    assert cli.trainer.global_step == 2
    assert (run_dir / "checkpoints" / "last.ckpt").exists() and (run_dir / "config.yaml").exists()
    assert list(run_dir.glob("events.out.tfevents.*"))  # the TensorBoard run is the run directory itself
    first = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)

    seen = {}
    cli = main(["fit", "--config", str(config), "--run_dir", str(run_dir), "--trainer.max_steps", "3"])
    seen["step"] = cli.trainer.global_step
    assert seen["step"] == 3  # continued from step 2, did not start again
    second = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert second["global_step"] == 3 and first["global_step"] == 2
    assert not list((run_dir).glob("version_*"))  # no auto-incremented versions
    # the second fit trained only step 3: each step's loss was logged once, in the same TensorBoard run
    events = EventAccumulator(str(run_dir))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [0, 1, 2]


def test_validate_scores_the_runs_newest_checkpoint_and_says_which(tiny_pretrained, tmp_path, capsys):
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "config.yaml", tiny_pretrained, max_steps=2)
    main(["fit", "--config", str(config), "--run_dir", str(run_dir)])
    trained = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    capsys.readouterr()
    cli = main(["validate", "--config", str(config), "--run_dir", str(run_dir), "--trainer.limit_val_batches", "1"])
    assert f"scoring {run_dir / 'checkpoints' / 'last.ckpt'}" in capsys.readouterr().err
    weights = cli.model.state_dict()
    assert all(torch.equal(weights[k], v) for k, v in trained.items())  # the trained weights, not fresh ones
    # the run's config.yaml is still the training one: training on resumes without a "changed config" refusal
    assert main(["fit", "--config", str(config), "--run_dir", str(run_dir), "--trainer.max_steps", "3"]
                ).trainer.global_step == 3

    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        main(["validate", "--config", str(config), "--run_dir", str(tmp_path / "empty")])


@pytest.mark.parametrize("subcommand", ["test", "predict"])
def test_unimplemented_subcommands_do_not_exist(subcommand, capsys):
    with pytest.raises(SystemExit) as error:
        main([subcommand, "--help"])
    assert error.value.code != 0 and "invalid choice" in capsys.readouterr().err


def test_logs_that_are_files_get_plain_progress_lines_and_no_placeholder_hp_metric(tiny_pretrained, tmp_path,
                                                                                    capsys):
    """stdout is not a terminal here (as in a Slurm log): one line per `--progress_every` steps, no carriage
    returns; the TensorBoard run has no `hp_metric = -1`."""
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "config.yaml", tiny_pretrained, max_steps=4)
    capsys.readouterr()
    main(["fit", "--config", str(config), "--run_dir", str(run_dir), "--trainer.enable_progress_bar", "true",
          "--progress_every", "2"])
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert [line.split(" |")[0] for line in lines] == ["step 2/4 (50.0%)", "step 4/4 (100.0%)"]
    assert "train/loss" in lines[-1] and "\r" not in out
    events = EventAccumulator(str(run_dir))
    events.Reload()
    assert "train/loss" in events.Tags()["scalars"] and "hp_metric" not in events.Tags()["scalars"]

    capsys.readouterr()
    main(["fit", "--config", str(config), "--run_dir", str(tmp_path / "quiet"), "--trainer.enable_progress_bar",
          "true", "--progress_every", "0"])
    assert "step " not in capsys.readouterr().out
