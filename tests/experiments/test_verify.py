"""experiments/verify.py: a results folder re-verified from its own files (summary tables recomputed from the rows,
checkpoints against the recorded weights hashes, config hash, commits), and the committed results pass it."""

from __future__ import annotations

import json

import pytest
import torch

from gligen.checkpoint_file import checkpoint_identity, save_safetensors_checkpoint
from gligen.evaluation import reporting
from gligen.evaluation.results import write_csv
from gligen.experiments import verify
from gligen.provenance import config_hash, git_commit
from tests.helpers import ROOT


def sweep_folder(tmp_path, commit: str | None = None):
    """A one-model tau sweep as sweep_checkpoint writes it (rows, config.json, summary.md), of a small checkpoint."""
    ckpt = save_safetensors_checkpoint({"state_dict": {"fuser.alpha_attn": torch.tensor(0.5)}, "global_step": 7,
                                        "gligen": {}}, tmp_path / "model.safetensors")
    identity = checkpoint_identity(ckpt)
    config = {"sampler": "ddim", "steps": 2, "guidance": 3.0, "ckpt": str(ckpt), "pretrained": "base"}
    rows = [{"tau": tau, "seed": seed, "coarse_ap50": 0.1 + 0.5 * tau + 0.01 * seed, "coarse_miou": 0.2 + 0.1 * tau,
             "fid": 1.0 - 0.2 * tau + 0.05 * seed, "kid": 0.01, "git_commit": commit or git_commit(),
             "config_hash": config_hash(config), "num_images": 4, "ckpt": str(ckpt), "ckpt_step": 7,
             "ckpt_weights_hash": identity["weights_hash"], "modality": "box"}
            for tau in (0.0, 1.0) for seed in (0, 1, 2)]
    out = tmp_path / "sweep"
    out.mkdir()
    write_csv(rows, out / "metrics.csv")
    (out / "config.json").write_text(json.dumps(config))
    (out / "summary.md").write_text(reporting.beta_sweep_summary(out, rows, config))
    return out, ckpt


def test_a_sweep_folder_verifies_from_its_own_files(tmp_path):
    out, ckpt = sweep_folder(tmp_path)
    report = verify.verify_folder(out)
    assert not report.failures, report.text()
    assert any("tables recompute" in line for line in report.passed)
    assert any("config.json hashes" in line for line in report.passed)
    assert any(str(ckpt) in line for line in report.passed)


def test_a_summary_number_edited_by_hand_fails(tmp_path):
    out, _ = sweep_folder(tmp_path)
    text = (out / "summary.md").read_text()
    table_line = next(line for line in text.splitlines() if line.startswith("| 1.0 |"))
    edited = table_line.replace("0.6", "0.7", 1)
    assert edited != table_line
    (out / "summary.md").write_text(text.replace(table_line, edited))
    report = verify.verify_folder(out)
    assert any("tables differ" in line for line in report.failures), report.text()


def test_rows_changed_after_the_summary_fail(tmp_path):
    out, _ = sweep_folder(tmp_path)
    rows = (out / "metrics.csv").read_text().splitlines()
    header, first = rows[0].split(","), rows[1].split(",")
    first[header.index("coarse_ap50")] = "0.9"
    (out / "metrics.csv").write_text("\n".join([rows[0], ",".join(first), *rows[2:]]) + "\n")
    assert verify.verify_folder(out).failures


def test_a_checkpoint_replaced_since_fails(tmp_path):
    out, ckpt = sweep_folder(tmp_path)
    save_safetensors_checkpoint({"state_dict": {"fuser.alpha_attn": torch.tensor(0.6)}, "global_step": 7,
                                 "gligen": {}}, ckpt)
    report = verify.verify_folder(out)
    assert any("replaced or trained further" in line for line in report.failures), report.text()


def test_a_missing_checkpoint_is_a_note_and_an_unknown_commit_a_failure(tmp_path):
    out, ckpt = sweep_folder(tmp_path, commit="0123456789ab")
    ckpt.unlink()
    report = verify.verify_folder(out)
    assert any("not here" in line for line in report.notes)
    assert any("0123456789ab" in line for line in report.failures)
    assert verify.verify_folder(out, commits=False).failures == []


def test_a_changed_config_fails(tmp_path):
    out, _ = sweep_folder(tmp_path)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "steps": 50}))
    assert any("config.json hashes" in line for line in verify.verify_folder(out).failures)


def test_the_command_exits_1_on_a_failure_and_names_the_folder(tmp_path, capsys):
    out, ckpt = sweep_folder(tmp_path)
    verify.main([str(tmp_path)])
    assert "all checks pass" in capsys.readouterr().out
    save_safetensors_checkpoint({"state_dict": {"x": torch.zeros(1)}, "global_step": 7, "gligen": {}}, ckpt)
    with pytest.raises(SystemExit) as exit_info:
        verify.main([str(tmp_path), "--out", str(tmp_path / "report.txt")])
    assert exit_info.value.code == 1
    assert f"{out}: FAILED" in (tmp_path / "report.txt").read_text()


def test_the_committed_results_verify(monkeypatch, capsys):
    """Every committed results folder: marked summaries recompute from their rows, committed checkpoints match."""
    monkeypatch.chdir(ROOT)
    verify.main(["results"])
    assert "all checks pass" in capsys.readouterr().out
