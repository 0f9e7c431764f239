"""The shipped toy LDM and reference checkpoint (gligen/toy/shipped): what they record is what the default build and
training make, they load, and build / ablate_beta use them only when they are what would be built or trained."""

import hashlib
import json
from dataclasses import asdict

import pytest
import torch
import yaml

import gligen.toy.build as toy_build
from gligen.checkpoint_file import read_checkpoint, save_safetensors_checkpoint, weights_hash
from gligen.experiments import modality_models
from gligen.ldm import weights_fingerprint
from gligen.module import GLIGENModule
from gligen.toy import shipped
from gligen.toy.build import ToyBuildConfig, build, build_record, is_shipped_config, ldm_dir
from gligen.training.rundir import load_config
from tests.helpers import ROOT, TINY

RECORD = shipped.manifest()
needs_shipped = pytest.mark.skipif(RECORD is None, reason="no shipped toy weights in this checkout")


def test_shipped_files_are_in_the_package():
    """A checkout (and so CI) must carry them: the default experiment depends on them."""
    assert RECORD is not None, f"{shipped.SHIPPED_DIR / shipped.MANIFEST} is missing"
    assert (shipped.shipped_ldm() / "model_index.json").exists() and shipped.shipped_checkpoint().exists()


@needs_shipped
def test_shipped_base_is_what_the_default_build_would_build():
    default = build_record(ToyBuildConfig())
    assert default == build_record(ToyBuildConfig.from_yaml(ROOT / "experiments/configs/toy_world.yaml"))
    assert {**RECORD["build_config"], "world_version": RECORD["world_version"]} == default
    assert is_shipped_config(ToyBuildConfig())
    pretrain = json.loads((shipped.shipped_ldm() / "toy_pretrain.json").read_text())
    assert pretrain["config"] == json.loads(json.dumps(asdict(ToyBuildConfig().pretrain)))
    assert pretrain["world_version"] == RECORD["world_version"]
    assert weights_fingerprint(str(shipped.shipped_ldm())) == RECORD["ldm"]["fingerprint"]
    # a few million parameters, as the toy promises (the whole directory stays small)
    size = sum(f.stat().st_size for f in shipped.shipped_ldm().rglob("*") if f.is_file())
    assert size < 40 * 2**20


@needs_shipped
def test_shipped_checkpoint_is_the_reference_box_run_and_loads():
    info = RECORD["checkpoint"]
    path = shipped.shipped_checkpoint()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == info["sha256"]
    train = load_config([ROOT / p for p in shipped.TRAIN_CONFIG])  # toy_base.yaml + toy_box.yaml
    assert info["train_settings"] == train and info["base_fingerprint"] == RECORD["ldm"]["fingerprint"]
    checkpoint = read_checkpoint(path)
    assert checkpoint["global_step"] == info["global_step"] == train["trainer"]["max_steps"]
    module = GLIGENModule.from_checkpoint(str(path), str(shipped.shipped_ldm()))
    assert module.hparams.modality == "box" and module.hparams.gamma_init == train["model"]["gamma_init"]
    assert shipped.reference_checkpoint([ROOT / p for p in shipped.TRAIN_CONFIG], shipped.shipped_ldm()) == path


@needs_shipped
def test_shipped_seed_checkpoints_are_the_reference_training_with_other_seeds():
    """ablate_beta's default train_seeds [0, 1, 2] sweep three shipped models: seeds 1 and 2 are the reference's
    training (same hyper-parameters, base and step) with another seed_everything, and different weights."""
    reference = read_checkpoint(shipped.shipped_checkpoint())
    train_config = [ROOT / p for p in shipped.TRAIN_CONFIG]
    hashes = {weights_hash(reference["state_dict"])}
    for seed in shipped.SHIPPED_SEEDS:
        entry = RECORD["seed_checkpoints"][str(seed)]
        path = shipped.SHIPPED_DIR / entry["file"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
        assert shipped.reference_checkpoint(train_config, shipped.shipped_ldm(), seed=seed) == path
        checkpoint = read_checkpoint(path)
        assert yaml.safe_load(checkpoint["gligen"]["training"]["config"])["seed_everything"] == seed
        assert checkpoint["global_step"] == reference["global_step"] == entry["global_step"]
        assert checkpoint["gligen"]["base_fingerprint"] == RECORD["ldm"]["fingerprint"]
        assert {k: v for k, v in checkpoint["hyper_parameters"].items() if k != "pretrained"} == \
            {k: v for k, v in reference["hyper_parameters"].items() if k != "pretrained"}
        assert entry["weights_hash"] == weights_hash(checkpoint["state_dict"])
        hashes.add(weights_hash(checkpoint["state_dict"]))
    assert len(hashes) == 1 + len(shipped.SHIPPED_SEEDS)
    assert shipped.reference_checkpoint(train_config, shipped.shipped_ldm(), seed=7) is None  # not shipped: train


@needs_shipped
def test_ablate_modality_scores_the_shipped_box_models_instead_of_training_them(tmp_path, monkeypatch):
    """The modality ablation's box models are the shipped reference training (seeds 0-2) when its box train config
    and base are theirs; --retrain, or a seed not shipped, trains instead."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cache/toy").mkdir(parents=True)
    (tmp_path / "cache/toy/ldm").symlink_to(shipped.shipped_ldm())  # the default base, where toy_base.yaml says
    config = {"ckpts": {}, "train_configs": {"box": [str(ROOT / p) for p in shipped.TRAIN_CONFIG]}}
    trained = []
    monkeypatch.setattr(modality_models, "fit_from_config", lambda *args: trained.append(args) or "trained.ckpt")
    assert modality_models.checkpoint_for("box", config, 0) == str(shipped.shipped_checkpoint())
    for seed in shipped.SHIPPED_SEEDS:
        path = shipped.SHIPPED_DIR / RECORD["seed_checkpoints"][str(seed)]["file"]
        assert modality_models.checkpoint_for("box", config, seed) == str(path)
    assert not trained
    assert modality_models.checkpoint_for("box", {**config, "retrain": True}, 1) == "trained.ckpt"
    assert modality_models.checkpoint_for("box", config, 7) == "trained.ckpt"
    assert [args[1:] for args in trained] == [("--seed_everything", "1", "--run_dir", "runs/toy_box_seed1"),
                                              ("--seed_everything", "7", "--run_dir", "runs/toy_box_seed7")]


def test_safetensors_checkpoint_round_trip_and_refusal(tiny_pretrained, tmp_path):
    torch.manual_seed(0)
    module = GLIGENModule(tiny_pretrained, gamma_init=0.5)
    saved = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "global_step": 7}
    module.on_save_checkpoint(saved)
    save_safetensors_checkpoint(saved, tmp_path / "m.safetensors")
    back = read_checkpoint(tmp_path / "m.safetensors")
    assert back["global_step"] == 7 and back["gligen"]["base_fingerprint"] == module.base_fingerprint
    assert back["state_dict"].keys() == saved["state_dict"].keys()
    assert all(torch.equal(back["state_dict"][k], v) for k, v in saved["state_dict"].items())
    loaded = GLIGENModule.from_checkpoint(str(tmp_path / "m.safetensors"))
    assert all(torch.equal(dict(loaded.named_parameters())[k], v) for k, v in saved["state_dict"].items())
    import safetensors.torch

    safetensors.torch.save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match=r"plain\.safetensors.*not a GLIGEN checkpoint"):
        read_checkpoint(tmp_path / "plain.safetensors")


TINY_WORLD = dict(splits={"train": {"grounding": 16, "detection": 4, "detection_caption": 4},
                          "val": {"grounding": 4}}, person_splits={"train": 4}, styled_splits={}, shard_size=16,
                  pretrain=TINY)


def test_build_installs_a_shipped_ldm_only_for_its_config_and_rebuild_replaces_it(tiny_pretrained, tmp_path,
                                                                                 monkeypatch):
    """ship() a tiny world's LDM + a checkpoint into a stand-in shipped dir; a build of the same config copies it
    instead of pretraining, a build of another config or with shipped=False pretrains, and the reference checkpoint
    is offered only for the shipped train settings on the shipped base."""
    config = ToyBuildConfig(**TINY_WORLD)
    source = build(tmp_path / "source", config, log=lambda *a: None)
    module = GLIGENModule(str(ldm_dir(source)), gamma_init=1.0)
    saved = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "global_step": 2}
    module.on_save_checkpoint(saved)
    torch.save(saved, tmp_path / "last.ckpt")
    train_config = tmp_path / "train.yaml"
    train_config.write_text(yaml.safe_dump({"model": {"gamma_init": 1.0}, "trainer": {"max_steps": 2}}))
    root = tmp_path / "shipped"
    record = shipped.ship(source, tmp_path / "last.ckpt", train_config, root=root, trained_at="abc")
    assert record["checkpoint"]["trained_at_commit"] == "abc" and record["checkpoint"]["global_step"] == 2
    monkeypatch.setattr(shipped, "SHIPPED_DIR", root)

    pretrained = []
    real_pretrain = toy_build.pretrain
    monkeypatch.setattr(toy_build, "pretrain", lambda *a, **k: pretrained.append(1) or real_pretrain(*a, **k))
    messages = []
    cache = build(tmp_path / "cache", config, log=messages.append)
    assert pretrained == [] and shipped.is_shipped_copy(ldm_dir(cache))
    assert weights_fingerprint(str(ldm_dir(cache))) == record["ldm"]["fingerprint"]
    assert any("copied the shipped toy LDM" in m for m in messages)
    assert shipped.reference_checkpoint(train_config, ldm_dir(cache)) == root / shipped.CHECKPOINT
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({"model": {"gamma_init": 0.0}, "trainer": {"max_steps": 2}}))
    assert shipped.reference_checkpoint(other, ldm_dir(cache)) is None  # other settings: train them
    assert shipped.reference_checkpoint(train_config, tiny_pretrained) is None  # another base: train on it

    # the same training with another seed ships next to it; anything else is refused
    def seed_checkpoint(seed, **hparams):
        other = GLIGENModule(str(ldm_dir(source)), **{"gamma_init": 1.0, **hparams})
        other.training_provenance = {"config": yaml.safe_dump({"seed_everything": seed}), "commit": "def"}
        saved = {"state_dict": other.state_dict(), "hyper_parameters": dict(other.hparams), "global_step": 2}
        other.on_save_checkpoint(saved)
        torch.save(saved, tmp_path / f"seed{seed}.ckpt")
        return tmp_path / f"seed{seed}.ckpt"

    with pytest.raises(ValueError, match="hyper-parameters differ"):
        shipped.ship_seed(seed_checkpoint(1, gamma_init=0.0), root=root)
    with pytest.raises(ValueError, match="the reference checkpoint's own"):
        shipped.ship_seed(seed_checkpoint(0), root=root)
    record = shipped.ship_seed(seed_checkpoint(1), root=root)
    assert record["seed_checkpoints"]["1"]["trained_at_commits"] == ["def"]
    assert shipped.reference_checkpoint(train_config, ldm_dir(cache), seed=1) == root / "toy_box_seed1.safetensors"
    assert shipped.reference_checkpoint(train_config, ldm_dir(cache), seed=2) is None
    assert shipped.reference_checkpoint(train_config, ldm_dir(cache), seed=0) == root / shipped.CHECKPOINT
    # shipping a new reference drops the other seeds of the old one
    assert "seed_checkpoints" not in shipped.ship(source, tmp_path / "last.ckpt", train_config, root=root)
    assert not (root / "toy_box_seed1.safetensors").exists()
    assert shipped.reference_checkpoint(train_config, ldm_dir(cache), seed=1) is None

    build(tmp_path / "cache", config, log=messages.append, shipped=False)  # --rebuild
    assert pretrained == [1] and not shipped.is_shipped_copy(ldm_dir(cache))
    assert (ldm_dir(cache) / "model_index.json").exists()

    bigger = ToyBuildConfig(**{**TINY_WORLD, "splits": {**TINY_WORLD["splits"], "val": {"grounding": 5}}})
    assert not is_shipped_config(bigger)  # any other build setting: pretrained here
