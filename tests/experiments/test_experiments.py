"""Every experiment script runs end to end at test size (the lightning-hydra-template habit)."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from gligen.evaluation import reporting
from gligen.evaluation.results import read_rows
from gligen.experiments import grid as grid_lib
from gligen.experiments import verify
from gligen.experiments.config import toy_train_config
from gligen.training.rundir import load_config
from tests.helpers import ROOT, run_experiment, tiny_grid_config, tiny_toy_config, tiny_train_config


@pytest.mark.slow
def test_ablate_beta_runs_end_to_end_on_a_tiny_toy_world(tmp_path):
    cache = tmp_path / "cache"
    overrides = {"toy_cache": str(cache), "toy_config": str(tiny_toy_config(tmp_path)),
                 "train_config": None, "out": str(tmp_path / "results"), "taus": [0.0, 1.0], "seeds": [0, 1],
                 "num_images": 8, "steps": 2, "batch_size": 4, "train_seeds": None}  # one model: <out> is its sweep
    # the train config needs the cache paths, which exist only after the build: write it now, paths are fixed
    overrides["train_config"] = str(tiny_train_config(tmp_path, cache))
    out, rows = run_experiment("ablate_beta.py", overrides, tmp_path)
    assert [(float(r["tau"]), int(r["seed"])) for r in rows] == [(0.0, 0), (0.0, 1), (1.0, 0), (1.0, 1)]
    for row in rows:
        assert row["git_commit"] and row["config_hash"] and 0 <= float(row["ap50"]) <= 1 and float(row["fid"]) >= 0
        assert "ablate_beta.py" in row["command"] and row["processor_class"] and int(row["threads"]) >= 1
        assert float(row["stage_s"]) > 0  # the sweep's wall time
    summary = (out / "summary.md").read_text()
    assert "| 0.0 | 2 |" in summary or "| 0 | 2 |" in summary
    assert (out / "ap_fid_vs_tau.png").stat().st_size > 0 and (out / "samples_tau1.png").exists()
    assert list((out / "tensorboard").rglob("events.out.tfevents.*"))
    config = json.loads((out / "config.json").read_text())
    assert config["num_images"] == 8
    # the toy default sweeps the layouts that ask for a style, and scores style and fidelity on every image
    assert Path(config["val_shards"]).name == "val-styled" and config["image_scorer"] == "toy_image"
    assert all(0 <= float(row["style_adherence"]) <= 1 and float(row["fidelity_error"]) >= 0 for row in rows)
    # a world other than the shipped one: pretrained and trained here, and the stage times say so
    timings = json.loads((out / "timings.json").read_text())
    assert timings["toy_build_s"] > 0 and timings["train_s"] > 0 and timings["sweep_s"] > 0
    assert timings["processor_class"] and "ablate_beta.py" in timings["command"]
    assert (cache / "shards" / "train-grounding" / "index.json").exists()


@pytest.mark.slow
def test_ablate_beta_replicates_over_training_seeds_with_intervals(tiny_toy_world, tmp_path):
    """--train_seeds 3: one model per seed, each swept, rows per (seed, tau, sampling seed) with distinct
    checkpoint hashes, and a summary whose intervals rest on the 3 training seeds. On the module's tiny world (built
    once; the test above builds its own)."""
    cache = tiny_toy_world
    overrides = {"toy_cache": str(cache), "toy_config": str(cache.parent / "toy_world.yaml"),
                 "out": str(tmp_path / "results"), "taus": [0.0, 1.0], "seeds": [0, 1], "num_images": 4,
                 "steps": 2, "batch_size": 4, "train_seeds": [0, 1, 2]}
    overrides["train_config"] = str(tiny_train_config(tmp_path, cache))
    out, rows = run_experiment("ablate_beta.py", overrides, tmp_path)
    assert sorted((int(r["train_seed"]), float(r["tau"]), int(r["seed"])) for r in rows) == [
        (t, tau, s + 1000 * t) for t in range(3) for tau in (0.0, 1.0) for s in (0, 1)]  # each model its own noise
    hashes = {r["train_seed"]: r["ckpt_weights_hash"] for r in rows}
    assert len(set(hashes.values())) == 3  # three different trained models
    assert {r["ckpt"] for r in rows if r["train_seed"] == "0"} != {r["ckpt"] for r in rows if r["train_seed"] == "1"}
    for seed in range(3):
        assert (out / f"train_seed{seed}" / "metrics.csv").exists()
    summary = (out / "summary.md").read_text()
    assert "3 trained models (training seeds)" in summary and "| 1.0 | 3 |" in summary
    assert "Differences from tau = 0.0" in summary and summary.count("`") > 6
    # layouts are the third level: every row names its layout records, which give back the row's metrics
    # the toy image scorer's per-image style and fidelity resample with the layouts too
    assert "the 4 layouts resampled too for coarse_ap50, ap50, style_adherence, fidelity_error (not fid" in summary
    pooled = read_rows(out / "metrics.csv")
    assert all(not r["layout_records"].mismatches(r) for r in pooled)
    assert {"coarse_ap50", "ap", "miou"} <= set(pooled[0]["layout_records"].metrics)
    timings = json.loads((out / "timings.json").read_text())
    assert all(f"train_seed{s}_train_s" in timings for s in range(3))
    reports = [verify.verify_folder(folder) for folder in verify.result_folders(out)]  # the summary and each seed's
    assert len(reports) == 4 and not any(r.failures for r in reports), "\n".join(r.text() for r in reports)
    assert all(any("tables recompute" in line for line in r.passed) for r in reports)
    # models swept in different sessions: the summary names each model's training and scoring commits
    mixed = [{**r, "git_commit": "feedface0000"} if r["train_seed"] == "1" else r for r in pooled]
    mixed[0] = {**mixed[0], "git_commit": "cafe00000000"}  # one row of seed 0 finished in a later session
    text = reporting.seed_summary(mixed, json.loads((out / "config.json").read_text()))
    header = next(line for line in text.splitlines() if line.startswith("scored at git"))
    assert "`feedface0000`" in header and f"`{rows[0]['git_commit']}`" in header
    models = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith(("| 0 | `", "| 1 | `"))}
    assert models["| 1"].endswith("| `feedface0000` |")
    assert models["| 0"].endswith(f"| `cafe00000000`, `{rows[0]['git_commit']}` |")
    assert all(f"| `{rows[0]['ckpt_train_commits']}` |" in line for line in models.values())


# ----- experiments/grid.py: every cell trains, then sweeps tau; collect -> summary.csv ----------------------------
GRID = ROOT / "experiments" / "grid.py"  # the entry point; its logic is gligen.experiments.grid


def test_grid_defaults_map_each_modality_to_its_base_config():
    grid = grid_lib.load_grid()
    assert grid["gamma_init"] == [0.0, 0.25, 1.0] and grid["modality"] == ["box", "keypoint", "image"]
    assert {cell["modality"] for cell in grid_lib.cells(grid)} == {"box", "keypoint", "image"}  # every file exists
    assert grid["base_configs"] == {m: ["experiments/configs/toy_base.yaml", f"experiments/configs/toy_{m}.yaml"]
                                    for m in ("box", "keypoint", "image")}
    assert grid_lib.base_config(grid, "box") == [Path("experiments/configs/toy_base.yaml"),
                                                 Path("experiments/configs/toy_box.yaml")]


def test_grid_refuses_a_modality_without_a_base_config_file(tmp_path):
    grid = grid_lib.load_grid(out=str(tmp_path), modality=["box", "keypoint"])
    grid["base_configs"] = {"box": [str(ROOT / p) for p in toy_train_config("box")],
                            "keypoint": [str(ROOT / "experiments/configs/toy_base.yaml"),
                                         str(tmp_path / "toy_keypoint.yaml")]}
    with pytest.raises(SystemExit, match=r"modality 'keypoint': its base config .*toy_keypoint.yaml does not exist"):
        grid_lib.cells(grid)
    grid["modality"] = ["box", "text_image"]
    with pytest.raises(SystemExit, match="modality 'text_image' has no base config"):
        grid_lib.cells(grid)


def test_grid_cell_sweep_config_follows_the_cell(tmp_path):
    grid = grid_lib.load_grid(out=str(tmp_path / "grid"), modality=["box"], gamma_init=[0.25], seeds=[1])
    grid["base_configs"] = {"box": [str(ROOT / p) for p in toy_train_config("box")]}
    (path,) = grid_lib.expand(grid)
    sweep = yaml.safe_load(grid_lib.sweep_path(path).read_text())
    assert path.name == "gamma0.25_box_seed1.yaml"
    assert sweep["ckpt"] == str(tmp_path / "grid/gamma0.25_box_seed1/checkpoints/last.ckpt")
    assert sweep["out"] == str(tmp_path / "grid/gamma0.25_box_seed1/sweep")
    assert sweep["val_shards"] == "cache/toy/shards/val-grounding" and sweep["pretrained"] == "cache/toy/ldm"
    assert sweep["taus"] == yaml.safe_load((ROOT / "experiments/configs/ablate_beta.yaml").read_text())["taus"]
    # not trained yet: the sweep step does nothing (a Slurm task whose fit was requeued reaches it too)
    assert not grid_lib.is_trained(path) and grid_lib.sweep_cell(path) is None
    assert grid_lib.max_steps_of(path) == 3000 and grid_lib.max_steps_of(path, ["--trainer.max_steps", "7"]) == 7
    assert grid_lib.max_steps_of(path, ["--trainer.max_steps=9"]) == 9


@pytest.mark.slow
def test_grid_run_local_trains_and_sweeps_every_cell_then_collect_summarises(tiny_toy_world, tmp_path, capsys):
    out = tmp_path / "grid"
    config = tiny_grid_config(tmp_path, tiny_toy_world, out)
    subprocess.run([sys.executable, str(GRID), "run-local", "--config", str(config)], check=True, cwd=tmp_path)
    cells = ["gamma0_box_seed0", "gamma1_box_seed0"]
    for cell in cells:
        sweep = out / cell / "sweep"
        rows = list(csv.DictReader((sweep / "metrics.csv").open()))
        assert [(float(r["tau"]), int(r["seed"])) for r in rows] == [(0.0, 0), (1.0, 0)]
        assert {r["cell"] for r in rows} == {cell} and {r["train_seed"] for r in rows} == {"0"}
        assert (sweep / "summary.md").exists() and (sweep / "sweep_done.json").exists()
        assert (sweep / "ap_fid_vs_tau.png").exists() and list((sweep / "tensorboard").rglob("events.out.*"))
    summary = list(csv.DictReader((out / "summary.csv").open()))
    assert sorted((r["cell"], float(r["tau"]), int(r["sample_seed"])) for r in summary) == \
        [(c, t, 0) for c in cells for t in (0.0, 1.0)]
    for row in summary:
        assert row["status"] == "done" and row["sweep_status"] == "done" and row["global_step"] == "2"
        assert row["modality"] == "box" and row["seed"] == "0" and float(row["gamma_init"]) in (0.0, 1.0)
        assert row["git_commit"] and row["config_hash"] and row["sweep_config_hash"]
        assert 0 <= float(row["ap50"]) <= 1 and float(row["fid"]) >= 0
    assert (out / "grounding_vs_tau.png").stat().st_size > 0
    assert list((out / "tensorboard").rglob("events.out.tfevents.*"))
    # summary.md: intervals per gamma_init at tau 0 and 1 (one training seed: sampling noise only), unpaired
    # gamma_init differences, paired tau 1 - tau 0 per gamma_init
    text = (out / "summary.md").read_text()
    assert "grid.py run-local" in text and f"`{summary[0]['git_commit']}`" in text
    assert "2/2 cells trained, 2 swept (4 rows" in text and "## box" in text
    assert text.count("| gamma_init | training seeds | coarse_ap50 | fid |") == 2
    assert "| 0.0 | 1 | " in text and "| 1.0 | 1 | " in text and "one trained model per arm" in text
    assert text.count("| gamma_init - 0.0 | coarse_ap50 | fid |") == 2 and "unpaired: every gamma_init" in text
    assert "| gamma_init: tau 1 - tau 0 | coarse_ap50 | fid |" in text
    # the grid's summary and every cell's sweep recompute from their rows; the cells' checkpoints match the rows
    reports = [verify.verify_folder(folder) for folder in verify.result_folders(out)]
    assert len(reports) == 3 and not any(r.failures for r in reports), "\n".join(r.text() for r in reports)
    assert sum("weights hash" in line for r in reports for line in r.passed) >= 4

    # requeue-safety: a second run neither retrains nor re-sweeps a finished cell (its marker says it is done);
    # without the markers, the finished training and sweep are found and skipped one by one, and marked again
    stamps = {p: p.stat().st_mtime_ns for c in cells for p in (out / c / "checkpoints/last.ckpt",
                                                                  out / c / "sweep/metrics.csv")}
    # in process from here (the CLI ran above; each subprocess costs an import of torch + diffusers)
    capsys.readouterr()
    grid_lib.main(["run-local", "--config", str(config)])
    again = capsys.readouterr().out
    assert again.count("trained and swept (cell_done.json); not redone") == 2, again
    markers = {c: (out / c / "cell_done.json").read_text() for c in cells}
    for cell in cells:
        (out / cell / "cell_done.json").unlink()
    grid = grid_lib.load_grid(argv=["--config", str(config)])
    grid_lib.run_local(grid)
    again = capsys.readouterr().out
    assert again.count("training finished; not retrained") == 2, again
    assert again.count("sweep already done") == 2, again
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert {c: (out / c / "cell_done.json").read_text() for c in cells} == markers
    # the step a Slurm array task runs after training, directly (it marks the cell too)
    (out / cells[0] / "cell_done.json").unlink()
    grid_lib.main(["sweep-cell", str(out / "configs" / f"{cells[0]}.yaml")])
    assert "sweep already done" in capsys.readouterr().out and {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert (out / cells[0] / "cell_done.json").read_text() == markers[cells[0]]
    with pytest.raises(SystemExit) as trained:
        grid_lib.main(["trained", str(out / "configs" / f"{cells[0]}.yaml")])
    assert trained.value.code == 0

    # committed without checkpoints (git-ignored): a clone trains and sweeps nothing again, and collect reports the
    # cells' training from their markers (cell_done.json), with the same rows
    for cell in cells:
        marker = json.loads((out / cell / "cell_done.json").read_text())
        assert {marker["weights_hash"]} == {r["weights_hash"] for r in summary if r["cell"] == cell}
        assert marker["global_step"] == 2 and marker["base_fingerprint"]
        (out / cell / "checkpoints" / "last.ckpt").unlink()
    grid_lib.run_local(grid)
    grid_lib.collect(grid)
    clone = capsys.readouterr().out
    assert clone.count("trained and swept (cell_done.json); not redone") == 2, clone
    assert not list(out.rglob("*.ckpt")) and {p: p.stat().st_mtime_ns for p in stamps if p.exists()} == {
        p: t for p, t in stamps.items() if p.suffix == ".csv"}
    again_summary = list(csv.DictReader((out / "summary.csv").open()))
    assert {r["trained_from"] for r in summary} == {"checkpoint"}
    assert {r["trained_from"] for r in again_summary} == {"cell_done.json"}
    keep = [k for k in summary[0] if k != "trained_from"]
    assert [[r[k] for k in keep] for r in again_summary] == [[r[k] for k in keep] for r in summary]
    reports = [verify.verify_folder(folder) for folder in verify.result_folders(out)]
    assert len(reports) == 3 and not any(r.failures for r in reports), "\n".join(r.text() for r in reports)
    first = str(out / "configs" / f"{cells[0]}.yaml")  # the Slurm task's steps
    with pytest.raises(SystemExit) as trained:
        grid_lib.main(["trained", first])
    assert trained.value.code == 0
    capsys.readouterr()
    grid_lib.sweep_cell(first)
    assert "not redone" in capsys.readouterr().out
    # fit overrides train something the marker does not record: not trained
    with pytest.raises(SystemExit) as trained:
        grid_lib.main(["trained", first, "--trainer.max_steps", "3"])
    assert trained.value.code == 1
    # another training config for the same cell (a changed grid): not complete, so run-local would train it
    from gligen.experiments import cell_status

    cell = grid_lib.cells(grid)[0]
    assert cell_status.cell_complete(cell, cell_status.cell_sweeps(cell))
    cell["config"]["optimizer"] = {"lr": 1.0}
    assert not cell_status.cell_complete(cell, cell_status.cell_sweeps(cell))
    other = grid_lib.cells(grid)[1]  # an evaluation it was never swept on: not complete
    assert cell_status.cell_complete(other, cell_status.cell_sweeps(other))
    assert not cell_status.cell_complete(other, cell_status.cell_sweeps(other, {"ood": {}}))


# ----- slurm/train.sh with no arguments: the toy default -------------------------------------------------------
def test_train_sh_without_arguments_trains_the_toy_box_config(tmp_path):
    """`sbatch slurm/train.sh` (no CONFIG, no arguments) -> fit of experiments/configs/toy_box.yaml into
    runs/toy_box, after a build of what cache/toy lacks; trailing arguments (tiny overrides) reach fit last.
    srun and python are stubs that record their command lines: no 20-minute training here (tests/training/test_slurm.py
    runs the script for real under Slurm)."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls.txt"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    (bin_dir / "python-stub").write_text(f'#!/bin/bash\necho "python $*" >> {calls}\n')
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in ("CONFIG", "RUN_DIR")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", PYTHON=str(bin_dir / "python-stub"))
    for args in ([], ["--trainer.max_steps", "2", "--data.init_args.batch_size", "4"]):
        calls.unlink(missing_ok=True)
        subprocess.run(["bash", str(ROOT / "slurm/train.sh"), *args], check=True, env=env, cwd=tmp_path,
                       capture_output=True)
        lines = calls.read_text().splitlines()
        fit = lines[-1]
        assert fit == " ".join(["python -m gligen fit --config experiments/configs/toy_base.yaml",
                                "--config experiments/configs/toy_box.yaml --run_dir runs/toy_box",
                                "--trainer.num_nodes 1 --trainer.devices 1", *args])
        builds = lines[:-1]  # always: the build writes only what cache/toy lacks (train shards after ablate_beta)
        assert builds == ["python -m gligen.toy build --out cache/toy --config experiments/configs/toy_world.yaml"]
    toy_box = load_config([ROOT / p for p in toy_train_config("box")])
    assert toy_box["run_dir"] == "runs/toy_box" and toy_box["model"]["pretrained"].startswith("cache/toy")


@pytest.mark.parametrize("official", [False, True], ids=["paper", "official"])
def test_sd15_config_trains_one_step_with_its_own_settings(tiny_toy_world, tmp_path, official):
    """experiments/configs/sd15_box.yaml (+ sd15_box_official.yaml), on the tiny toy LDM and shards instead of SD
    and real data, CPU instead of GPU, one step: its model / optimisation settings (bf16-mixed, channels-last,
    paper hyperparameters) run as is; the official delta switches the preset of model and data."""
    from gligen.module import GLIGENModule
    from gligen.training.cli import fit_from_config

    config = yaml.safe_load((ROOT / "experiments/configs/sd15_box.yaml").read_text())
    if official:
        delta = yaml.safe_load((ROOT / "experiments/configs/sd15_box_official.yaml").read_text())
        config["model"].update(delta["model"])
    config["run_dir"] = str(tmp_path / "runs/sd15_box")
    config["trainer"].update(accelerator="cpu", devices=1, strategy="auto", max_steps=1, limit_val_batches=0,
                             log_every_n_steps=1)
    config["trainer"].pop("val_check_interval")
    config["trainer"]["callbacks"] = [c for c in config["trainer"]["callbacks"] if "SampleGrid" not in c["class_path"]]
    config["model"]["pretrained"] = str(tiny_toy_world / "ldm")
    data = config["data"]["init_args"]
    data["train_shards"] = {k: str(tiny_toy_world / "shards" / f"train-{k}") for k in data["train_shards"]}
    data["val_shards"] = str(tiny_toy_world / "shards" / "val-grounding")
    data.update(resolution=32, batch_size=4, num_workers=0, batches_per_epoch=1)
    path = tmp_path / "sd15_box.yaml"
    path.write_text(yaml.safe_dump(config))
    checkpoint = fit_from_config(str(path))
    module = GLIGENModule.from_checkpoint(str(checkpoint))
    hp = module.hparams
    assert (hp.gamma_init, hp.learning_rate, hp.warmup_steps, hp.channels_last) == (0.0, 5e-5, 10000, True)
    assert (hp.half_frozen, hp.lr_schedule, hp.ema_decay) == (True, "constant_with_warmup", None)
    assert module.ldm.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["global_step"] == 1
    data = saved["datamodule_hyper_parameters"]
    if official:
        assert (hp.preset, hp.caption_dropout, hp.grounding_dropout_mode) == ("official", 0.5, "per_batch")
        assert (data["preset"], data["detection_captions"], data["keypoint_slots"]) == (
            "official", "category_names", "largest")
    else:
        assert (hp.preset, hp.caption_dropout, hp.grounding_dropout_mode) == ("paper", 0.1, "per_sample")
        assert (data["preset"], data["detection_captions"]) == ("paper", "null")


def test_readme_has_the_two_commands_and_ci_runs_the_test_one():
    """What experiments/time_readme.py times is the README's text, and .ci/run calls that same test command."""
    from gligen.experiments import time_readme as script

    commands = script.readme_commands(ROOT / "README.md")
    assert commands["main"].startswith("python3 -m venv .venv") and commands["main"].endswith(
        "python experiments/ablate_beta.py")
    assert commands["tests"].endswith("python -m pytest")
    assert commands["tests"] in (ROOT / ".ci" / "run").read_text()
    assert script.pytest_summary("==== 3 failed, 410 passed, 3 skipped in 301.52s (0:05:01) ====") == {
        "pytest_counts": "3 failed, 410 passed, 3 skipped", "pytest_s": 301.52}


# ----- experiments/ablate_claims.py: arms x training seeds, extra layout sets, claims with verdicts ------------------

def test_ablate_claims_trains_every_arm_sweeps_every_layout_set_and_judges_each_claim(tiny_toy_world, tmp_path,
                                                                                      monkeypatch):
    out = tmp_path / "claims"
    styled = str(tiny_toy_world / "shards" / "val-styled")
    overrides = {
        "base_config": str(tiny_train_config(tmp_path, tiny_toy_world)), "out": str(out), "seeds": [0, 1],
        "toy_cache": None, "arms": {"reference": {}, "raw_boxes": {"model.position_encoding": "raw"}},
        "evaluations": {"styled": {"val_shards": styled, "image_scorer": "toy_image"}},
        "sweep": {"taus": [0.0, 1.0], "seeds": [0], "num_images": 4, "steps": 2, "batch_size": 4},
        "claims": [
            {"claim": "Fourier beats raw", "paper": "21.7 vs 3.2", "metric": "coarse_ap50",
             "a": {"arm": "reference", "tau": 1.0}, "b": {"arm": "raw_boxes", "tau": 1.0}, "expect": "greater"},
            {"claim": "style kept at tau 0", "paper": "-", "metric": "style_adherence",
             "a": {"arm": "reference", "evaluation": "styled", "tau": 0.0},
             "b": {"arm": "reference", "evaluation": "styled", "tau": 1.0}, "expect": "none"},
            {"claim": "an arm never trained", "paper": "-", "metric": "ap50",
             "a": {"arm": "missing", "tau": 1.0}, "b": {"arm": "reference", "tau": 1.0}}]}
    _, rows = run_experiment("ablate_claims.py", overrides, tmp_path)
    assert sorted({(r["arm"], r["evaluation"], r["train_seed"]) for r in rows}) == [
        (arm, evaluation, str(seed)) for arm in ("raw_boxes", "reference") for evaluation in ("styled", "val")
        for seed in (0, 1)]
    assert (out / "raw_boxes" / "gamma1_box_seed1" / "sweep_styled" / "metrics.csv").exists()
    styled_rows = [r for r in rows if r["evaluation"] == "styled"]
    assert all(r["style_adherence"] != "" and r["fidelity_error"] != "" for r in styled_rows)
    hashes = {r["arm"]: r["ckpt_weights_hash"] for r in rows if r["train_seed"] == "0"}
    assert hashes["reference"] != hashes["raw_boxes"]  # two different trained models
    summary = (out / "summary.md").read_text()
    assert "| Fourier beats raw (a = reference / val / tau 1, b = raw_boxes / val / tau 1) | 21.7 vs 3.2 |" in summary
    assert "unpaired (different models)" in summary and "paired (the same models at both)" in summary
    assert "| measured |" in summary and "| not run |" in summary
    assert any(v in summary for v in ("| agrees |", "| disagrees |", "| inconclusive |"))
    reports = [verify.verify_folder(folder) for folder in verify.result_folders(out)]
    assert not any(r.failures for r in reports), "\n".join(r.text() for r in reports)
    assert any("summary.md (claims)" in line for r in reports for line in r.passed)

    # committed without checkpoints (git-ignores *.ckpt): a rerun (a clone, a later session) trains nothing again
    from gligen.experiments import ablate_claims, cell_status

    for checkpoint in out.rglob("*.ckpt"):
        checkpoint.unlink()
    _, rerun_rows = run_experiment("ablate_claims.py", overrides, tmp_path, in_process=True)  # the CLI ran above
    assert not list(out.rglob("*.ckpt"))
    assert rerun_rows == rows
    config = json.loads((out / "config.json").read_text())  # the config the run used
    cell = grid_lib.cells(ablate_claims.arm_grid(config, "raw_boxes"))[0]
    assert ablate_claims.cell_complete(config, cell)
    monkeypatch.setattr(cell_status, "weights_fingerprint", lambda path: "a rebuilt base")
    assert not ablate_claims.cell_complete(config, cell)  # the same config on another base LDM: not done
    monkeypatch.undo()
    config["arms"]["raw_boxes"]["trainer.max_steps"] = 3  # another training config: that cell is not done
    assert not ablate_claims.cell_complete(config, grid_lib.cells(ablate_claims.arm_grid(config, "raw_boxes"))[0])
