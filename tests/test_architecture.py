"""The package's shape, checked: layers import only downward, no import cycles, package-internal imports at the top of
the file, no modality-name branching outside gligen/modalities/, no module over ~400 lines without a reason at
its top, and the whole tree lint-clean (ruff with pyproject.toml's settings). The layers, bottom to top (README
"Layout"):

    constants -> nn -> data -> metrics -> core (ldm, module, sampling, modalities) -> evaluation -> training
    -> toy -> interop -> bench -> experiments

`toy` is a client of everything under it (a world made with the package, as real data and a real LDM would be);
nothing under it imports it: the toy's detectors are found by name (gligen.metrics.detectors).
"""

import ast
import functools
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "gligen"

# module (dotted, under gligen) -> layer; the longest matching prefix wins
LAYERS = {
    "constants": 0, "provenance": 0, "presets": 0,
    "nn": 1,
    "data": 2,
    "metrics": 3,
    "ldm": 4, "module": 4, "sampling": 4, "modalities": 4, "checkpoint_file": 4,
    "evaluation": 5,
    "training": 6, "__main__": 6,
    "toy": 7,
    "interop": 8,
    "bench": 9,
    "experiments": 10,
}
# (importer, imported): allowed upward imports, each with its reason
EXCEPTIONS = {
    # precomputing features for the shards runs the frozen LDM's encoders (architecture: data knows no model
    # except here)
    ("data.convert.precompute", "ldm"),
}
# (importer, imported): imports kept inside a function, each with its reason
LAZY = {
    # diffusers + transformers load only when `python -m gligen.data precompute` runs, not for every data command
    ("data.convert.precompute", "ldm"),
}
MAX_LINES = 400
LONG_ON_PURPOSE = re.compile(r"(?i)(one file on purpose|kept in one file|long on purpose)")


@functools.cache
def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def layer(name: str) -> int:
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in LAYERS:
            return LAYERS[".".join(parts[:i])]
    raise AssertionError(f"gligen.{name} is in no layer: add it to LAYERS in tests/test_architecture.py")


def internal_imports(name: str, path: Path) -> list[tuple[str, int, bool]]:
    """(imported module under gligen, line, at top level of the file) for every package-internal import."""
    tree = ast.parse(path.read_text())
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    known = modules()
    top_level = {id(node) for node in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").startswith("gligen"):
                target = node.module[len("gligen."):] if node.module != "gligen" else ""
            else:
                continue
            names = [f"{target}.{a.name}".strip(".") for a in node.names]
            for candidate in names:
                resolved = candidate if candidate in known else target
                out.append((resolved, node.lineno, id(node) in top_level))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("gligen."):
                    out.append((alias.name[len("gligen."):], node.lineno, id(node) in top_level))
    return [(t, line, top) for t, line, top in out if t and t != name]


def test_every_module_is_in_a_layer_and_imports_only_downward():
    upward = []
    for name, path in modules().items():
        if not name:
            continue
        for target, line, _ in internal_imports(name, path):
            if layer(target) > layer(name) and (name, target) not in EXCEPTIONS:
                upward.append(f"gligen/{path.relative_to(PACKAGE)}:{line}: {name} (layer {layer(name)}) imports "
                              f"{target} (layer {layer(target)})")
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_import_cycles():
    graph = {name: {t for t, _, _ in internal_imports(name, path)} for name, path in modules().items()}
    # a package's __init__ importing its own submodules is how registries fill; importing the package is not a cycle
    graph = {n: {t for t in ts if not (n and t.startswith(n + "."))} for n, ts in graph.items()}
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt in graph and not state.get(nxt):
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if not state.get(node):
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_package_internal_imports_sit_at_the_top_of_the_file():
    inside = [f"gligen/{path.relative_to(PACKAGE)}:{line}: imports {target} inside a function"
              for name, path in modules().items() for target, line, top in internal_imports(name, path)
              if not top and (name, target) not in LAZY]
    assert not inside, "\n".join(inside)


def test_no_modality_name_branching_outside_the_modalities_package():
    names = "|".join(["box", "keypoint", "image", "text_image"])
    compare = re.compile(rf"""(==|!=|\bin\b|\bnot in\b)\s*\(?\s*["']({names})["']|["']({names})["']\s*(==|!=)""")
    found = []
    for name, path in modules().items():
        if name.startswith("modalities"):
            continue
        for number, text in enumerate(path.read_text().splitlines(), 1):
            if compare.search(text) and "modality" in text:
                found.append(f"gligen/{path.relative_to(PACKAGE)}:{number}: {text.strip()}")
    assert not found, "modality names compared outside gligen/modalities/:\n" + "\n".join(found)


def test_lightning_private_api_is_reached_only_through_one_helper():
    private = re.compile(r"\btrainer\._(?!_)\w+")
    found = [f"gligen/{path.relative_to(PACKAGE)}:{number}: {text.strip()}"
             for name, path in modules().items() if name != "training.lightning_internals"
             for number, text in enumerate(path.read_text().splitlines(), 1) if private.search(text)]
    assert not found, "Lightning privates outside gligen/training/lightning_internals.py:\n" + "\n".join(found)


@pytest.mark.parametrize("name", [n for n in modules()])
def test_modules_stay_short_or_say_why(name):
    path = modules()[name]
    lines = path.read_text().splitlines()
    if len(lines) > MAX_LINES:
        head = "\n".join(lines[:30])
        assert LONG_ON_PURPOSE.search(head), (f"gligen/{path.relative_to(PACKAGE)} has {len(lines)} lines: split it, "
                                              "or say at its top why it is one file (\"one file on purpose: ...\")")


def test_the_tree_is_lint_clean():
    """ruff (a dev dependency) with pyproject.toml's [tool.ruff] settings, over the package, tests, entry points and
    notebooks: unused imports, undefined names, import order, line length."""
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."],
                            cwd=PACKAGE.parent, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
