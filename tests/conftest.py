"""Fixtures and hooks shared by the whole suite (builders are in tests/helpers.py)."""

from pathlib import Path

import pytest

from gligen.toy.pipeline import TinyPipelineConfig, build_tiny_pipeline
from tests.helpers import build_tiny_toy_world


@pytest.fixture(scope="session")
def tiny_pretrained(tmp_path_factory) -> str:
    """A tiny random SD-shaped pipeline saved as a diffusers directory (the `pretrained` of the tests)."""
    return str(build_tiny_pipeline(tmp_path_factory.mktemp("tiny_ldm"), TinyPipelineConfig(), seed=0))


@pytest.fixture(scope="module")
def tiny_toy_world(tmp_path_factory) -> Path:
    """The cache of a tiny toy world (tests.helpers.build_tiny_toy_world), built once per test module."""
    return build_tiny_toy_world(tmp_path_factory.mktemp("tiny_toy"))


# ----- fault-injection outcomes (pytest -m chaos) -----------------------------------------------------------------
# Each chaos test records what happened to its scenario; `--chaos-report=PATH` (with "=": pytest reads a separate,
# existing PATH as a test path before this conftest defines the option) writes them as the table in
# docs/reliability.md, so the documented outcomes are the suite's own output, never hand-written.
CHAOS_OUTCOMES = ("counted skip", "clear error", "resumed exactly", "step skipped", "refused", "redone", "completed")


def pytest_addoption(parser):
    parser.addoption("--chaos-report", default=None,
                     help="write the fault-injection outcome table (scenario -> outcome) to this Markdown file")


_chaos_rows: list[dict] = []


@pytest.fixture
def chaos_outcome(request):
    """`chaos_outcome(area, scenario, outcome, detail)`: record a scenario's observed outcome (one of CHAOS_OUTCOMES)
    for the reliability table. Call it after the test's assertions have established that outcome."""

    def record(area: str, scenario: str, outcome: str, detail: str = "") -> None:
        if outcome not in CHAOS_OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}; one of {CHAOS_OUTCOMES}")
        _chaos_rows.append({"area": area, "scenario": scenario, "outcome": outcome, "detail": detail,
                            "test": request.node.nodeid})

    return record


def pytest_sessionfinish(session, exitstatus):
    path = session.config.getoption("--chaos-report", default=None)
    if not path or not _chaos_rows:
        return
    import platform
    import subprocess
    from pathlib import Path

    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                                check=False).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    failed = session.testsfailed
    lines = [
        "# Reliability: what happens to a run when things go wrong",
        "",
        "Written by the fault-injection suite itself (`python -m pytest -m chaos --chaos-report=docs/reliability.md`);",
        "each row is a scenario a test injected and the outcome the test asserted. Do not edit by hand.",
        "",
        f"Commit {commit}, Python {platform.python_version()}, {len(_chaos_rows)} scenarios, "
        f"{'all tests passed' if not failed else f'{failed} test(s) FAILED: rows of failed tests are missing'}.",
        "",
        "| area | scenario | outcome | detail | test |",
        "|---|---|---|---|---|",
    ]
    for row in sorted(_chaos_rows, key=lambda r: (r["area"], r["scenario"])):
        cells = [row[k].replace("|", "\\|").replace("\n", " ") for k in ("area", "scenario", "outcome", "detail")]
        lines.append("| " + " | ".join(cells) + f" | `{row['test'].split('::')[-1]}` |")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines) + "\n")
