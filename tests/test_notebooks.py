"""The notebooks execute against results written by the project's own writer (a small synthetic fixture)."""

import os
from pathlib import Path

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

from gligen.evaluation.reporting import write_beta_sweep

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def sweep_dir(tmp_path):
    rng = np.random.default_rng(0)
    rows = [{"tau": tau, "seed": seed, "ap": tau / 2, "ap50": tau, "ap75": tau / 3, "miou": tau / 2,
             "fid": 1 - tau / 2 + rng.random() / 10, "kid": 0.1, "git_commit": "abc", "config_hash": "def",
             "num_images": 4, "ckpt": "x"} for tau in (0.0, 0.5, 1.0) for seed in (0, 1)]
    image = np.zeros((8, 8, 3), np.uint8)
    layouts = [{"caption": "a", "objects": [{"box": [0.1, 0.1, 0.5, 0.5], "phrase": "a red square"}]}] * 2
    write_beta_sweep(tmp_path, rows, {0.0: [image, image], 1.0: [image, image]}, layouts,
                     {"sampler": "ddim", "steps": 2, "guidance": 1.0})
    return tmp_path


def test_ablate_beta_notebook_executes(sweep_dir):
    notebook = nbformat.read(ROOT / "notebooks/ablate_beta.ipynb", as_version=4)
    os.environ["GLIGEN_RESULTS"] = str(sweep_dir)
    try:
        NotebookClient(notebook, timeout=120, resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    finally:
        del os.environ["GLIGEN_RESULTS"]
    outputs = "".join(o.get("text", "") for cell in notebook.cells for o in cell.get("outputs", []))
    assert "7 event files; 36 hp/ values;" in outputs  # grids + one HParams run per tau x seed (6 metrics)
    assert "samples/tau_0" in outputs and "samples/tau_1" in outputs
