"""Where a number came from: the code (git commit, dirty or not), a config (its hash), training data (a fingerprint
of its shard files). Bottom layer: checkpoints record these when saved, results rows when written."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Iterable

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


def config_hash(config: dict) -> str:
    """Short stable hash of a JSON-able config (key order does not matter)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]


def files_fingerprint(paths: Iterable[str]) -> str | None:
    """Short hash of files' names, sizes and first and last 64 KiB (shards are written once and never edited in
    place, so this tells two shard sets apart in milliseconds); None when a path is not a local file."""
    digest = hashlib.sha256()
    for path in sorted(str(p) for p in paths):
        if not os.path.isfile(path):
            return None
        size = os.path.getsize(path)
        digest.update(f"{os.path.basename(path)}:{size}".encode())
        with open(path, "rb") as f:
            digest.update(f.read(65536))
            if size > 65536:
                f.seek(max(65536, size - 65536))
                digest.update(f.read(65536))
    return digest.hexdigest()[:16]
