"""Time the README's two commands as a new user runs them: on a fresh clone of HEAD, install included.

    python experiments/time_readme.py main                 # python3 -m venv ... && python experiments/ablate_beta.py
    python experiments/time_readme.py tests                # python3 -m venv ... && python -m pytest
    python experiments/time_readme.py main --isa avx2      # the same with torch / oneDNN / MKL capped to AVX2

Settings: TimeReadmeConfig (gligen/experiments/config.py); `main` / `tests` is its `which` (also `--which tests`).

The commands are read from README.md's "Two commands" section, so what is timed is what the README says. Each run
appends a row to results/costs/readme_commands.csv: wall seconds, exit code, processor class and ISA flags, the
stage times of ablate_beta (timings.json) or pytest's own count and time, commit. For `main`, the clone's
metrics.csv is kept under results/costs/<isa>/ so it can be compared with the committed results/ablate_beta.

`--isa avx2` sets ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2 and MKL_ENABLE_INSTRUCTIONS=AVX2: on an
AVX-512 processor torch then runs its AVX2 kernels and emulates bf16, as on an AVX2-only processor. It is an
approximation (same caches, clocks and memory), recorded as such in the row (`isa_cap`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gligen.bench.machine import cpu_flags, cpu_name, processor_class, torch_cpu_capability
from gligen.evaluation.results import append_csv
from gligen.experiments.config import TimeReadmeConfig, parse
from gligen.provenance import git_commit

ISA_CAPS = {"native": {}, "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                                   "MKL_ENABLE_INSTRUCTIONS": "AVX2"}}


def readme_commands(readme: str | Path = "README.md") -> dict[str, str]:
    """The two fenced bash commands of the README's "Two commands" section: {"main": ..., "tests": ...}."""
    text = Path(readme).read_text()
    section = text.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)\n```", section, flags=re.DOTALL)
    if len(blocks) != 2:
        raise SystemExit(f"{readme}: expected two ```bash blocks under '## Two commands', found {len(blocks)}")
    return {"main": blocks[0].strip(), "tests": blocks[1].strip()}


def pytest_summary(output: str) -> dict:
    match = re.findall(r"=+ (.*?) in ([\d.]+)s", output)
    if not match:
        return {}
    counts, seconds = match[-1]
    return {"pytest_counts": counts, "pytest_s": float(seconds)}


def main(argv=None) -> None:
    args = parse(TimeReadmeConfig, argv, name="time_readme", description=__doc__, positionals=("which",))
    repo_root = Path(subprocess.run(["git", "-C", args.repo, "rev-parse", "--show-toplevel"], check=True,
                                    capture_output=True, text=True).stdout.strip())
    command = readme_commands(repo_root / args.readme)[args.which]
    commit = git_commit()
    clone = Path(tempfile.mkdtemp(prefix=f"readme_{args.which}_"))
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(repo_root), str(clone / "repo")], check=True)
    repo = clone / "repo"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if ".venv" not in p)
    env.update(ISA_CAPS[args.isa])
    print(f"[{args.which}, isa {args.isa}] in {repo}: {command}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(["bash", "-c", command], cwd=repo, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - start
    (clone / "output.txt").write_text(proc.stdout)
    print(proc.stdout[-3000:])
    flags = cpu_flags()
    # the class the command ran as: the cap decides torch's kernels (the clone's own timings.json says the same)
    capability = env.get("ATEN_CPU_CAPABILITY", torch_cpu_capability())
    row = {"command": args.which, "isa_cap": args.isa,
           "processor_class": processor_class(flags, capability, environ=env),
           "wall_s": round(wall, 1), "returncode": proc.returncode, "cpu": cpu_name(), "cores": os.cpu_count(),
           "cpu_flags": " ".join(flags), "git_commit": commit, "readme_command": command}
    if args.which == "tests":
        row.update(pytest_summary(proc.stdout))
    else:
        timings = repo / "results/ablate_beta/timings.json"
        if timings.exists():
            record = json.loads(timings.read_text())
            row.update({k: v for k, v in record.items() if k.endswith("_s")})
            row["torch_cpu_capability"] = record.get("torch_cpu_capability")
            keep = Path(args.out).parent / args.isa
            keep.mkdir(parents=True, exist_ok=True)
            for name in ("metrics.csv", "summary.md", "timings.json"):
                shutil.copy(repo / "results/ablate_beta" / name, keep / f"ablate_beta_{name}")
    append_csv([row], args.out)
    print(json.dumps(row, indent=1))
    if not args.keep:
        shutil.rmtree(clone, ignore_errors=True)
    else:
        print(f"kept {clone}")
    sys.exit(proc.returncode)
