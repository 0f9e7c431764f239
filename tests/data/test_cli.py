"""``python -m gligen.data``: convert / precompute / inspect through the argparse entry point."""

import json
import subprocess
import sys

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from gligen.data.__main__ import main
from gligen.data.decode import SkipCounter
from gligen.data.examples import make_sample
from gligen.data.inspect import collect_stats
from gligen.data.shards import encode_sample, iter_samples, resolve_shards, write_shards

KPS = [[0.5, 0.5, 2]] * 17


@pytest.fixture()
def damaged_corpus(tmp_path):
    """3 grounding samples (1, 2, 2 objects; one with two persons), 1 detection (3 objects), 1 damaged sample."""
    samples = [
        make_sample("g0", boxes=[(0.1, 0.1, 0.5, 0.5)], persons=[KPS, KPS]),
        make_sample("g1", boxes=[(0.1, 0.1, 0.5, 0.5), (0.2, 0.2, 0.9, 0.9)]),
        make_sample("g2", boxes=[(0.1, 0.1, 0.5, 0.5), (0.2, 0.2, 0.9, 0.9)]),
        make_sample("d0", kind="detection", caption="", boxes=[(0, 0, 1, 1)] * 3, phrases=["a", "b", "c"]),
    ]
    write_shards(samples, tmp_path / "good", max_samples=2, progress=False)
    raw = encode_sample(make_sample("broken"))
    raw["json"] = b"{not json"
    with wds.TarWriter(str(tmp_path / "bad-000000.tar"), encoder=False) as tw:
        tw.write(raw)
    return f"{tmp_path / 'good'}::{tmp_path / 'bad-000000.tar'}"


def test_inspect_counts_kinds_skips_objects_and_persons(damaged_corpus, capsys):
    assert main(["inspect", damaged_corpus]) == 0
    out = capsys.readouterr().out
    assert "samples: 4" in out
    assert "grounding: 3" in out and "detection: 1" in out
    assert "skipped: 1" in out and "bad_json: 1" in out
    hist = {line.split("|")[0].strip(): line.split()[-1] for line in out.splitlines() if "|" in line}
    assert hist == {"1": "1", "2": "2", "3": "1"}
    assert "persons: 2 in 1 images" in out


def test_inspect_json_matches_collect_stats(damaged_corpus, capsys):
    main(["inspect", damaged_corpus, "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert printed == collect_stats(damaged_corpus).to_json()
    assert printed["skipped"] == {"bad_json": 1} and printed["objects_per_image"] == {"1": 1, "2": 2, "3": 1}


def _coco_fixture(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.full((10, 20, 3), 128, np.uint8)).save(images / "x.png")
    data = {"images": [{"id": 5, "file_name": "x.png", "width": 20, "height": 10},
                       {"id": 6, "file_name": "missing.png", "width": 20, "height": 10}],
            "categories": [{"id": 1, "name": "red square"}],
            "annotations": [{"id": 1, "image_id": 5, "category_id": 1, "bbox": [0, 0, 10, 10], "iscrowd": 0},
                            {"id": 2, "image_id": 6, "category_id": 1, "bbox": [0, 0, 10, 10], "iscrowd": 0}]}
    (tmp_path / "inst.json").write_text(json.dumps(data))
    caps = {"annotations": [{"id": 1, "image_id": 5, "caption": "a red square"},
                            {"id": 2, "image_id": 6, "caption": "a lost square"}]}
    (tmp_path / "caps.json").write_text(json.dumps(caps))
    return tmp_path


def test_convert_coco_cli_then_precompute_cli(tmp_path, tiny_pretrained, capsys):
    root = _coco_fixture(tmp_path)
    rc = main(["convert", "coco", "--instances", str(root / "inst.json"), "--images", str(root / "images"),
               "--captions", str(root / "caps.json"), "--out", str(root / "shards"), "--max-bytes", "1M",
               "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0
    assert json.loads(captured.out.strip().splitlines()[-1]) == {"total": 1, "kinds": {"detection_caption": 1},
                                                                  "shards": 1}
    assert "missing_image: 1" in captured.err and "missing.png" in captured.err
    rc = main(["precompute", "--pretrained", tiny_pretrained, "--shards", str(root / "shards"), "--out",
               str(root / "pre"), "--resolution", "8", "--flip", "--device", "cpu", "--no-progress"])
    assert rc == 0
    (sample,) = iter_samples(resolve_shards(str(root / "pre")), SkipCounter(strict=True))
    assert sample.key == "coco-5" and sample.caption == "a red square"
    assert {"latent_mean.npy", "latent_std_flip.npy", "caption_embeds.npy", "phrase_embeds.npy"} <= set(sample.arrays)
    assert sample.annotation.width == 8
    np.testing.assert_allclose(sample.annotation.objects[0].box, [0.0, 0.0, 0.5, 1.0], atol=1e-6)  # centre crop


def test_module_entry_point_runs_as_a_subprocess(damaged_corpus):
    proc = subprocess.run([sys.executable, "-m", "gligen.data", "inspect", damaged_corpus, "--json"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["samples"] == 4


def test_bad_subcommand_exits_with_usage(capsys):
    with pytest.raises(SystemExit) as info:
        main(["convert", "nonsense"])
    assert info.value.code == 2
