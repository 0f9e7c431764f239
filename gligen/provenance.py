"""Where a number came from: the code (git commit, dirty or not), a config (its hash), training data (a fingerprint
of its shard files). Bottom layer: checkpoints record these when saved, results rows when written."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Iterable
from pathlib import Path

CODE_SUFFIXES = (".py", ".yaml", ".yml", ".sh", ".toml", ".cfg", ".ipynb")


def git_commit() -> str:
    """The current commit, with '+dirty' when the code differs from it ('unknown' outside git)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], capture_output=True,
                                text=True, check=True).stdout.splitlines()
        # changed or new code and configs make results irreproducible from the commit; result files being
        # rewritten (tracked results/ of an earlier run, new CSVs and images) do not
        dirty = [line for line in status if line[3:].endswith(CODE_SUFFIXES) and not line[3:].startswith("results/")]
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def portable_path(path: str | os.PathLike) -> str:
    """`path` relative to the working directory when it lies under it (as result rows name files: the same in
    every clone), else as given."""
    path = Path(path)
    return str(path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path)


def config_hash(config: dict) -> str:
    """Short stable hash of a JSON-able config (key order does not matter)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]


READ_FILES = 64  # at most this many files have content read: the fingerprint runs when every fit starts
READ_BYTES = 4096  # from the start and from the end of each of them


def files_fingerprint(paths: Iterable[str]) -> str | None:
    """Short hash of files' names and sizes, and of the first and last 4 KiB of up to 64 of them spread over the
    list (shards are written once, never edited in place: this tells two shard sets apart in milliseconds, even
    for thousands of shards); None when a path is not a local file."""
    paths = sorted(str(p) for p in paths)
    if not all(os.path.isfile(p) for p in paths):
        return None
    sizes = [os.path.getsize(p) for p in paths]
    digest = hashlib.sha256()
    for path, size in zip(paths, sizes):
        digest.update(f"{os.path.basename(path)}:{size}".encode())
    step = max(1, len(paths) // READ_FILES)
    for path, size in list(zip(paths, sizes))[::step][:READ_FILES]:
        with open(path, "rb") as f:
            digest.update(f.read(READ_BYTES))
            if size > READ_BYTES:
                f.seek(max(READ_BYTES, size - READ_BYTES))
                digest.update(f.read(READ_BYTES))
    return digest.hexdigest()[:16]
