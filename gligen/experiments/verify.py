"""Re-verify committed results from their own files:

    python experiments/verify.py                          # every results folder under results/
    python experiments/verify.py results/ablate_beta      # one (or --dirs [a, b])

Each folder holding result rows (metrics.csv of a sweep or of ablate_modality, summary.csv of a grid) is checked:

- summary: its summary.md is written again from the folder's files by the function that wrote it, and every table
  must be the same (a number edited by hand, or rows changed after the summary was written, fail). The writer marks
  the summary with its kind (`gligen.evaluation.reporting.summary_marker`); summaries written before the mark
  existed are listed as not recomputable;
- config: a sweep's config.json hashes to the rows' config_hash;
- checkpoints: every checkpoint the rows name that exists here is read and its weights hash and step compared with
  the rows' (a checkpoint replaced or trained further since fails); those not here (runs/ is not committed) are
  listed;
- commits: every recorded commit (evaluation and training) is a commit of this repository; '+dirty' ones are
  flagged (results of uncommitted code cannot be reproduced from git). Not checked in a shallow clone.

Exit status 1 when a check fails. Settings: VerifyConfig (gligen/experiments/config.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from gligen.checkpoint_file import checkpoint_identity
from gligen.evaluation import reporting
from gligen.evaluation.results import read_csv, read_rows
from gligen.experiments import ablate_claims, ablate_modality
from gligen.experiments.config import VerifyConfig, parse
from gligen.provenance import config_hash


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


# summary kind (its mark) -> the rows file, and the function that writes the summary from the folder's files alone
SUMMARY_KINDS = {
    "beta_sweep": ("metrics.csv", lambda folder, rows: reporting.beta_sweep_summary(folder, rows, _config(folder))),
    "seed_sweeps": ("metrics.csv", lambda folder, rows: reporting.seed_summary(rows, _config(folder))),
    "grid": ("summary.csv", lambda folder, rows: reporting.grid_summary(rows)),
    "claims": ("metrics.csv", lambda folder, rows: ablate_claims.summary_text(rows, _config(folder))),
    "modality": ("metrics.csv", lambda folder, rows: ablate_modality.summary_text(
        folder, rows, _config(folder), read_csv(folder / "vae_ceiling.csv"))),
}
ROW_FILES = ("metrics.csv", "summary.csv")


@dataclass
class Report:
    """What verifying one folder found: `failures` make the exit status 1, `notes` are what could not be checked."""

    folder: Path
    passed: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def text(self) -> str:
        lines = [f"{self.folder}: {'FAILED' if self.failures else 'ok'}"]
        lines += [f"  ok    {line}" for line in self.passed]
        lines += [f"  FAIL  {line}" for line in self.failures]
        lines += [f"  note  {line}" for line in self.notes]
        return "\n".join(lines)


def summary_kind(text: str) -> str | None:
    return next((kind for kind in SUMMARY_KINDS if reporting.summary_marker(kind) in text), None)


def check_summary(folder: Path, report: Report) -> str | None:
    """Writes the summary again from the folder's files and compares its tables; returns the summary's kind (None:
    no summary, or one without a mark)."""
    summary = folder / "summary.md"
    if not summary.exists():
        return None
    text = summary.read_text()
    kind = summary_kind(text)
    if kind is None:
        report.notes.append("summary.md has no summary mark (written before results were verifiable): its tables "
                            "are not recomputed")
        return None
    rows_file, rewrite = SUMMARY_KINDS[kind]
    expected = reporting.table_blocks(rewrite(folder, read_rows(folder / rows_file)))
    found = reporting.table_blocks(text)
    differ = [table.splitlines()[0] for table, there in zip(expected, found) if table != there]
    if differ or len(expected) != len(found):
        first = differ[0] if differ else f"{len(found)} tables there, {len(expected)} recomputed"
        report.failures.append(f"summary.md ({kind}): {len(differ)} of {len(expected)} tables differ from what "
                               f"{rows_file} gives (first: {first!r})")
    else:
        report.passed.append(f"summary.md ({kind}): all {len(expected)} tables recompute from {rows_file}")
    return kind


def check_config(folder: Path, rows: list[dict], report: Report) -> None:
    """A sweep's rows carry the hash of the config it ran with, which its config.json holds."""
    hashes = {r.get("config_hash") for r in rows} - {None, ""}
    if len(hashes) != 1 or not (folder / "config.json").exists():
        return
    (recorded,) = hashes
    found = config_hash(_config(folder))
    if found == recorded:
        report.passed.append(f"config.json hashes to the rows' config_hash {recorded}")
    else:
        report.failures.append(f"config.json hashes to {found}, the rows say {recorded}")


def check_checkpoints(rows: list[dict], report: Report) -> None:
    """Every (checkpoint, weights hash, step) the rows name, where the file is here."""
    named = {}
    for row in rows:
        if row.get("ckpt") and row.get("ckpt_weights_hash"):  # sweep and ablate_modality rows
            named[row["ckpt"]] = (row["ckpt_weights_hash"], row.get("ckpt_step"))
        elif row.get("run_dir") and row.get("weights_hash"):  # grid summary rows: the cell's last checkpoint
            named[str(Path(row["run_dir"]) / "checkpoints" / "last.ckpt")] = (row["weights_hash"],
                                                                              row.get("global_step"))
    absent = []
    for path, (recorded, step) in named.items():
        if not Path(path).exists():
            absent.append(path)
            continue
        identity = checkpoint_identity(path)
        if identity["weights_hash"] != recorded:
            report.failures.append(f"{path}: weights hash {identity['weights_hash']}, the rows say {recorded} "
                                   "(replaced or trained further since)")
        elif step not in (None, "") and str(identity["global_step"]) != str(step):
            report.failures.append(f"{path}: step {identity['global_step']}, the rows say {step}")
        else:
            report.passed.append(f"{path}: weights hash {recorded} and step {step} as recorded")
    if absent:
        report.notes.append(f"{len(absent)} checkpoint(s) named by the rows are not here (not committed), e.g. "
                            f"{absent[0]}")


def check_commits(rows: list[dict], report: Report, known: Callable[[str], bool]) -> None:
    """Every evaluation and training commit the rows record is one of this repository's."""
    commits = set()
    for row in rows:
        commits.update(c for key in ("git_commit", "ckpt_train_commits") for c in str(row.get(key) or "").split())
    commits -= {"", "unknown", "None"}
    dirty = sorted(c for c in commits if c.endswith("+dirty"))
    unknown = sorted(c for c in commits if not known(c.removesuffix("+dirty")))
    if unknown:
        report.failures.append(f"commits not in this repository: {', '.join(unknown)}")
    elif commits:
        report.passed.append(f"commits {', '.join(sorted(commits))} are in this repository")
    if dirty:
        report.notes.append(f"rows from uncommitted code ({', '.join(dirty)}): not reproducible from git alone")


def git_knows(commit: str) -> bool:
    result = subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], capture_output=True, check=False)
    return result.returncode == 0


def shallow_clone() -> bool:
    """True in a shallow clone (or outside git): older commits cannot be looked up."""
    result = subprocess.run(["git", "rev-parse", "--is-shallow-repository"], capture_output=True, text=True,
                            check=False)
    return result.returncode != 0 or result.stdout.strip() != "false"


def verify_folder(folder: str | Path, commits: bool = True) -> Report:
    folder = Path(folder)
    report = Report(folder)
    rows_file = next((folder / name for name in ROW_FILES if (folder / name).exists()), None)
    rows = read_rows(rows_file) if rows_file else []
    if check_summary(folder, report) == "beta_sweep":  # one sweep, one config (others hash per seed / modality)
        check_config(folder, rows, report)
    check_checkpoints(rows, report)
    if commits:
        check_commits(rows, report, git_knows)
    return report


def result_folders(root: str | Path) -> list[Path]:
    """Every folder at or under `root` holding result rows, sorted."""
    root = Path(root)
    if not root.exists():
        raise SystemExit(f"verify: {root} does not exist")
    return sorted({path.parent for name in ROW_FILES for path in root.rglob(name)})


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    folders = []
    while argv and not argv[0].startswith("-"):  # `verify.py results/a results/b`: the folders as bare words
        folders.append(argv.pop(0))
    if folders:
        argv = ["--dirs", json.dumps(folders), *argv]
    settings = parse(VerifyConfig, argv, name="verify", description=__doc__)
    commits = not shallow_clone()
    reports = [verify_folder(folder, commits) for root in settings.dirs for folder in result_folders(root)]
    failed = [r.folder for r in reports if r.failures]
    lines = [r.text() for r in reports]
    if not commits:
        lines.append("note: a shallow clone: recorded commits not checked")
    lines.append(f"verified {len(reports)} results folder(s): "
                 + (f"{len(failed)} FAILED" if failed else "all checks pass"))
    print("\n".join(lines))
    if settings.out:
        Path(settings.out).write_text("\n".join(lines) + "\n")
    if failed:
        raise SystemExit(1)
    return 0
