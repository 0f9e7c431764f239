"""One config system for every experiment script (gligen/experiments/config.py): each answers --print_config with a
YAML that reads back as --config, takes flag and dotted overrides the same way, and is the same thin shim; the toy
training configs compose (toy_base.yaml + one modality's file) to the settings they always had; one rule decides
"toy world"; `python -m gligen.toy build` without --config builds the experiments' toy world."""

import subprocess
import sys

import pytest
import yaml

from gligen.experiments import config as experiment_config
from gligen.experiments.config import BetaSweepConfig, GridConfig, ModalityAblationConfig, parse, toy_train_config
from gligen.experiments.entry import EXPERIMENTS, main
from gligen.training.rundir import config_args, load_config
from tests.helpers import ROOT

SHIM = '''
from gligen.experiments.entry import main

if __name__ == "__main__":
    main("{name}")
'''
# per experiment: a flag override and a dotted one (a nested field or a mapping entry), and what each sets
OVERRIDES = {
    "ablate_beta": (["--num_images", "40"], {"num_images": 40}),
    "ablate_gamma": (["--sweep.num_images", "7"], {"sweep": {"num_images": 7}}),
    "ablate_claims": (["--arms.ungated", "{model.fuser_type: ungated}"],
                      {"arms": {"ungated": {"model.fuser_type": "ungated"}}}),
    "ablate_modality": (["--train_configs.box", "my_box.yaml"], {"train_configs": {"box": "my_box.yaml"}}),
    "grid": (["--sweep.taus", "[0, 1]"], {"sweep": {"taus": [0.0, 1.0]}}),
    "bench_train": (["--repeats", "1"], {"repeats": 1}),
    "bench_data": (["--workers", "[0]"], {"workers": [0]}),
    "bench_sample": (["--tau", "0.5"], {"tau": 0.5}),
    "bench_checkpoint": (["--repeats", "1"], {"repeats": 1}),
    "time_readme": (["--isa", "avx2"], {"isa": "avx2"}),
    "verify": (["--dirs", "[results/ablate_beta]"], {"dirs": ["results/ablate_beta"]}),
}


def print_config(name: str, argv: list[str], capsys) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        main(name, [*argv, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_every_experiment_script_is_the_same_shim():
    scripts = sorted(p.stem for p in (ROOT / "experiments").glob("*.py"))
    assert scripts == sorted(EXPERIMENTS) == sorted(OVERRIDES)
    for name in scripts:
        text = (ROOT / "experiments" / f"{name}.py").read_text()
        docstring_end = text.index('"""', 3) + 3
        assert text.startswith('"""') and text[docstring_end:] == "\n" + SHIM.format(name=name), name
        assert "sys.path" not in text and "argparse" not in text


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_every_experiment_answers_print_config_and_reads_it_back(name, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # experiments/configs/<name>.yaml, the documented defaults, are read from the checkout
    printed = print_config(name, [], capsys)
    assert isinstance(printed, dict) and printed
    saved = tmp_path / "config.yaml"
    saved.write_text(yaml.safe_dump(printed))
    assert print_config(name, ["--config", str(saved)], capsys) == printed  # round trip
    flags, expected = OVERRIDES[name]
    changed = print_config(name, ["--config", str(saved), *flags], capsys)
    for key, value in expected.items():
        if isinstance(value, dict):
            assert changed[key] == {**printed[key], **value}, key
        else:
            assert changed[key] == value, key
    assert {k: v for k, v in changed.items() if k not in expected} == {
        k: v for k, v in printed.items() if k not in expected}
    # the out directory is a plain flag everywhere
    assert print_config(name, ["--out", str(tmp_path / "elsewhere")], capsys)["out"] == str(tmp_path / "elsewhere")


def test_the_script_itself_prints_its_config_from_a_plain_checkout():
    """No sys.path insert: the package is installed (pip install -e .); the shim imports it."""
    result = subprocess.run([sys.executable, "experiments/ablate_beta.py", "--print_config", "--num-images", "40"],
                            cwd=ROOT, capture_output=True, text=True, check=True)
    printed = yaml.safe_load(result.stdout)
    assert printed["num_images"] == 40 and printed["train_config"] == toy_train_config("box")


def test_the_defaults_files_say_what_the_dataclasses_say(monkeypatch, tmp_path):
    """experiments/configs/<name>.yaml spells out the defaults: the config is the same without it (toy_config: the
    file names the toy world the dataclass leaves at its default)."""
    from dataclasses import asdict

    for cls, name in ((BetaSweepConfig, "ablate_beta"), (GridConfig, "grid"),
                      (ModalityAblationConfig, "ablate_modality")):
        monkeypatch.chdir(ROOT)
        with_file = asdict(parse(cls, [], name=name))
        monkeypatch.chdir(tmp_path)
        without = asdict(parse(cls, [], name=name))
        assert with_file.pop("toy_config") == "experiments/configs/toy_world.yaml" and without.pop("toy_config") is None
        assert with_file == without, name


def test_older_flag_spellings_still_parse(monkeypatch):
    monkeypatch.chdir(ROOT)
    config = parse(BetaSweepConfig, ["--num-images", "40", "--seeds", "0", "1", "--taus", "0.5", "--rebuild",
                                     "--val-shards", "data/val"], name="ablate_beta")
    assert (config.num_images, config.seeds, config.taus, config.rebuild, config.retrain, config.val_shards) == (
        40, [0, 1], [0.5], True, False, "data/val")
    grid = parse(GridConfig, ["--gamma-init", "0", "1", "--modality", "box", "--no-sweep", "--set",
                              "trainer.max_steps=7", "--sweep-set", "num_images=5"], name="grid")
    assert grid.gamma_init == [0.0, 1.0] and grid.modality == ["box"] and not grid.sweep.enabled
    assert grid.overrides == {"trainer.max_steps": 7} and grid.sweep.num_images == 5
    modality = parse(ModalityAblationConfig, ["--ckpt", "box", "b.ckpt", "--train-config", "image", "i.yaml"],
                     name="ablate_modality", pairs={"ckpt": "ckpts", "train_config": "train_configs"})
    assert modality.ckpts == {"box": "b.ckpt"} and modality.train_configs["image"] == "i.yaml"
    assert modality.train_configs["box"] == toy_train_config("box")
    bench = parse(experiment_config.BenchTrainConfig, ["--no-memory", "--channels-last", "--sizes", "sd"],
                  name="bench_train")
    assert (bench.memory, bench.channels_last, bench.sizes) == (False, True, ["sd"])
    timing = parse(experiment_config.TimeReadmeConfig, ["tests", "--isa", "avx2"], name="time_readme",
                   positionals=("which",))
    assert (timing.which, timing.isa) == ("tests", "avx2")


# ----- the toy training configs: toy_base.yaml + one modality's file ------------------------------------------------
OBJECTS = {"train_shards": {"grounding": "cache/toy/shards/train-grounding",
                            "detection": "cache/toy/shards/train-detection",
                            "detection_caption": "cache/toy/shards/train-detection_caption"},
           "ratios": {"grounding": 0.6, "detection": 0.2, "detection_caption": 0.2},
           "val_shards": "cache/toy/shards/val-grounding"}
DIFFERING = {  # what each modality's file sets on top of toy_base.yaml
    "box": {"run_dir": "runs/toy_box", "modality": "box", "data": OBJECTS},
    "keypoint": {"run_dir": "runs/toy_keypoint", "modality": "keypoint",
                 "data": {"train_shards": {"persons": "cache/toy/shards/train-persons"},
                          "val_shards": "cache/toy/shards/val-persons"}},
    "image": {"run_dir": "runs/toy_image", "modality": "image", "data": {**OBJECTS, "entity_images": True}},
    "text_image": {"run_dir": "runs/toy_text_image", "modality": "text_image",
                   "data": {**OBJECTS, "entity_images": True}},
}
SHARED = {  # toy_base.yaml: the same for every modality
    "seed_everything": 0,
    "trainer": {"accelerator": "cpu", "devices": 1, "precision": "32-true", "max_steps": 3000, "log_every_n_steps": 25,
                "limit_val_batches": 4, "val_check_interval": 500, "check_val_every_n_epoch": None,
                "enable_model_summary": False,
                "callbacks": [{"class_path": "gligen.training.callbacks.SkipLogger"},
                              {"class_path": "gligen.training.callbacks.SampleGrid",
                               "init_args": {"every_n_steps": 500, "num_images": 8, "steps": 20, "guidance": 3.0}}]},
    "model": {"pretrained": "cache/toy/ldm", "fuser_type": "gated_self_attention", "gamma_init": 1.0,
              "learning_rate": 1e-3, "gate_learning_rate": 1e-3, "warmup_steps": 100, "caption_dropout": 0.1,
              "grounding_dropout": 0.1},
    "data": {"class_path": "gligen.data.datamodule.GroundingDataModule",
             "init_args": {"resolution": 32, "batch_size": 64, "num_workers": 1, "random_flip": True,
                           "batches_per_epoch": 500}},
}


@pytest.mark.parametrize("modality", sorted(DIFFERING))
def test_composed_toy_configs_resolve_to_their_settings(modality):
    """The settings each toy modality trained with before the split into toy_base.yaml + toy_<m>.yaml (the shipped
    box checkpoint's train_settings are compared against exactly this)."""
    differing = DIFFERING[modality]
    expected = {**SHARED, "run_dir": differing["run_dir"],
                "model": {**SHARED["model"], "modality": differing["modality"]},
                "data": {**SHARED["data"], "init_args": {**SHARED["data"]["init_args"], **differing["data"]}}}
    paths = [ROOT / p for p in toy_train_config(modality)]
    assert load_config(paths) == expected
    assert config_args(paths) == ["--config", str(paths[0]), "--config", str(paths[1])]
    delta = yaml.safe_load(paths[1].read_text())
    assert len(yaml.safe_dump(delta).splitlines()) <= 16  # small: only what differs


def test_the_default_box_run_is_the_shipped_reference_checkpoints_config():
    from gligen.toy import shipped

    record = shipped.manifest()
    if record is None:
        pytest.skip("no shipped toy weights in this checkout")
    assert shipped.TRAIN_CONFIG == toy_train_config("box") == BetaSweepConfig().train_config
    assert load_config([ROOT / p for p in shipped.TRAIN_CONFIG]) == record["checkpoint"]["train_settings"]


def test_linked_data_settings_follow_the_model(tiny_pretrained, tmp_path):
    """max_objects / max_persons / entity_images are set on the model and follow on the data (gligen/training/cli.py
    LINKS), whatever the data section says."""
    from lightning.pytorch import LightningDataModule

    from gligen.module import GLIGENModule
    from gligen.training.cli import GLIGENCLI

    args = [*config_args([ROOT / p for p in toy_train_config("image")]), "--model.pretrained", tiny_pretrained,
            "--model.max_objects", "5", "--model.max_persons", "3", "--data.init_args.entity_images", "false",
            "--trainer.logger", "false", "--run_dir", "null"]
    cli = GLIGENCLI(GLIGENModule, LightningDataModule, subclass_mode_data=True, run=False, args=args)
    data = cli.datamodule.hparams
    assert (data.max_objects, data.max_persons, data.entity_images) == (5, 3, True)
    args[args.index("--config") + 3] = str(ROOT / "experiments/configs/toy_keypoint.yaml")
    cli = GLIGENCLI(GLIGENModule, LightningDataModule, subclass_mode_data=True, run=False, args=args)
    assert cli.datamodule.hparams.entity_images is False


# ----- the toy world: one rule, one default --------------------------------------------------------------------------
def test_one_rule_decides_the_toy_world(tmp_path):
    from gligen.toy.build import is_toy_world

    cache = tmp_path / "cache/toy"
    assert is_toy_world(cache, [None, None])  # nothing named: the toy world fills it in
    assert is_toy_world(cache, [str(cache / "ldm"), {"box": str(cache / "shards/val-grounding")}])
    assert not is_toy_world(cache, ["runwayml/stable-diffusion-v1-5", None])
    assert not is_toy_world(cache, [None, str(tmp_path / "coco/val")])
    assert not is_toy_world(cache, [str(cache / "ldm"), {"grounding": str(tmp_path / "coco/train")}])


def test_toy_build_without_config_builds_the_experiments_toy_world(tmp_path, monkeypatch):
    """`python -m gligen.toy build` (README's "build the toy world" row, no --config) resolves to the toy world the
    experiments build (experiments/configs/toy_world.yaml), so `python experiments/ablate_beta.py` accepts its cache."""
    import gligen.toy.__main__ as toy_main
    from gligen.toy.build import ToyBuildConfig, build_config

    built = []
    monkeypatch.setattr(toy_main, "build", lambda out, config, **kwargs: built.append(config))
    toy_main.main(["build", "--out", str(tmp_path / "cache")])
    world = ToyBuildConfig.from_yaml(ROOT / "experiments/configs/toy_world.yaml")
    assert built == [world]
    for name in ("ablate_beta", "ablate_modality", "grid"):  # what each experiment builds by default
        monkeypatch.chdir(ROOT)
        cls = {"ablate_beta": BetaSweepConfig, "ablate_modality": ModalityAblationConfig, "grid": GridConfig}[name]
        assert build_config(parse(cls, [], name=name).toy_config) == world
        monkeypatch.chdir(tmp_path)  # outside a checkout: the dataclass default, the same world
        assert build_config(parse(cls, [], name=name).toy_config) == world
