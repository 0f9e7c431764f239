"""Result rows that can be traced: every row records its config hash, seed and git commit."""

from __future__ import annotations

import csv
import gzip
import json
import statistics
from collections import defaultdict
from pathlib import Path

from gligen.metrics.resample import ROW_KEY as RECORDS
from gligen.metrics.resample import RowRecords


def checkpoint_columns(ckpt, identity: dict) -> dict:
    """The columns naming the model a result row came from (`gligen.checkpoint_file.checkpoint_identity` of `ckpt`):
    its path, step, whether training finished, the hash of its weights, whether they include EMA weights (what
    sampling then uses), the base it was trained on, and how it was trained (commits, config hash, train shards)."""
    return {"ckpt": str(ckpt), "ckpt_step": identity["global_step"], "ckpt_max_steps": identity["max_steps"],
            "ckpt_complete": identity["complete"], "ckpt_weights_hash": identity["weights_hash"],
            "ckpt_ema": identity["ema"],
            "ckpt_base_fingerprint": identity["base_fingerprint"], "ckpt_train_commits": identity["train_commits"],
            "ckpt_train_config_hash": identity["train_config_hash"],
            "ckpt_train_shards": identity["train_shards_fingerprint"]}


def commits(values) -> str:
    """Distinct commits of some rows, each in backticks ("-" where none is recorded): models kept from several
    sessions are trained and scored at different commits."""
    found = dict.fromkeys(c for v in values for c in str(v or "").split())
    return ", ".join(f"`{c}`" for c in found) or "-"


def model_table(rows: list[dict]) -> list[str]:
    """The lines of a markdown table naming each training seed's model: checkpoint, step, weights hash, and the
    commits it was trained and scored at (every scoring commit of its rows: a sweep may be finished later)."""
    by_seed: dict[str, list[dict]] = {}
    for row in rows:
        by_seed.setdefault(str(row["train_seed"]), []).append(row)
    lines = ["| training seed | checkpoint | step | weights hash | trained at | scored at |",
             "|---|---|---|---|---|---|"]
    for seed, mine in by_seed.items():
        r = mine[-1]  # the checkpoint's identity, the same in every row of the model
        lines.append(f"| {seed} | `{r['ckpt']}` | {r.get('ckpt_step', '')} | `{r.get('ckpt_weights_hash', '')}` | "
                     f"{commits([r.get('ckpt_train_commits')])} | {commits(row['git_commit'] for row in mine)} |")
    return lines


def write_csv(rows: list[dict], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


RECORDS_FILE = "layout_records.json.gz"  # beside a rows CSV: the layout records its `layout_records` column names


def write_rows(rows: list[dict], path: str | Path) -> None:
    """`write_csv`, with each row's layout records (`layout_records`, a gligen.metrics.resample.RowRecords) written
    as its content id in the CSV and as JSON (gzip, reproducible bytes) in RECORDS_FILE beside it, so the folder's
    summaries can resample layouts again (`read_rows`)."""
    path, records, flat = Path(path), {}, []
    for row in rows:
        found = row.get(RECORDS)
        if isinstance(found, RowRecords):
            key = found.content_id()
            records[key] = found.to_json()
            row = {**row, RECORDS: key}
        flat.append(row)
    write_csv(flat, path)
    target = path.parent / RECORDS_FILE
    if records:
        text = json.dumps(records, sort_keys=True, separators=(",", ":")).encode()
        with target.open("wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
            f.write(text)
    else:
        target.unlink(missing_ok=True)


def read_rows(path: str | Path) -> list[dict]:
    """`read_csv`, with each row's `layout_records` id replaced by its records from RECORDS_FILE beside the CSV
    (removed where the file or the id is missing: that row's intervals do not resample layouts). Records of the same
    content read from several folders share their resampled values (`RowRecords.from_json(shared=True)`)."""
    path = Path(path)
    rows = read_csv(path)
    target = path.parent / RECORDS_FILE
    stored = json.loads(gzip.decompress(target.read_bytes())) if target.exists() else {}
    loaded: dict[str, RowRecords] = {}
    for row in rows:
        key = row.pop(RECORDS, None)
        if key and key in stored:
            if key not in loaded:
                loaded[key] = RowRecords.from_json(stored[key], shared=True)
            row[RECORDS] = loaded[key]
    return rows


def append_csv(rows: list[dict], path: str | Path) -> None:
    """Add rows to a CSV (created when missing); columns new to the file join its header, old rows leave them empty."""
    path = Path(path)
    old = read_csv(path) if path.exists() and path.stat().st_size else []
    write_csv(old + rows, path)


def read_csv(path: str | Path) -> list[dict]:
    with Path(path).open() as f:
        return list(csv.DictReader(f))


def mean_std_table(rows: list[dict], group: str, metrics: list[str], digits: int = 3) -> str:
    """Markdown table: one line per value of `group`, `mean ± std` (over seeds) of each metric."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        groups[str(row[group])].append(row)
    lines = [f"| {group} | n | " + " | ".join(metrics) + " |", "|" + "---|" * (len(metrics) + 2)]
    for key in sorted(groups, key=lambda k: float(k) if _is_number(k) else k):
        cells = []
        for metric in metrics:
            values = [float(r[metric]) for r in groups[key]]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}")
        lines.append(f"| {key} | {len(groups[key])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False
