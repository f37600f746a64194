"""The package's layering, read from the source's import statements (docs/architecture.md).

Layers from the bottom: the wire constants and small helpers; the data contract and I/O; networks,
losses and metrics; the run settings; inference with a trained student and security; the command
line dispatcher; then the site (``client``) and the server, which never import each other; then
``simulation``, which drives both. A module may import its own layer or lower ones only, and no
module imports another module's private (underscore) names. Imports under ``if TYPE_CHECKING:``
are annotations only and are not counted.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "client", "server", "simulation")

LAYERS: tuple[tuple[str, ...], ...] = (
    ("fedbrats.common.wire", "fedbrats.common.utils"),
    ("fedbrats.common.data",),
    ("fedbrats.common.networks", "fedbrats.common.losses", "fedbrats.common.metrics"),
    ("fedbrats.common.config",),
    ("fedbrats.common.inference", "fedbrats.common.security"),
    ("fedbrats.common.cli",),
    ("fedbrats.client", "fedbrats.server"),
    ("fedbrats.simulation",),
)
PEERS_APART = {("fedbrats.client", "fedbrats.server"), ("fedbrats.server", "fedbrats.client")}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["fedbrats", *parts])


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _group(module: str) -> tuple[int, str]:
    """(layer, the layer entry the module falls under)."""
    if module == "fedbrats.common":  # only its import-name guard
        return 0, module
    for i, entries in enumerate(LAYERS):
        for entry in entries:
            if module == entry or module.startswith(entry + "."):
                return i, entry
    raise AssertionError(f"{module} is in no layer of tests/test_layers.py; add it")


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: Path, module: str) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, imported names) of every import that runs, at any depth."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            skipped.update(id(n) for child in node.body for n in ast.walk(child))
    out = []
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            out.append((node.lineno, target, [a.name for a in node.names]))
    return out


MODULES = _modules()


def test_every_module_is_in_a_layer():
    for module in MODULES:
        _group(module)


def violations(module: str, path: Path) -> list[str]:
    """What the module at ``path``, imported as ``module``, breaks of the layering."""
    layer, entry = _group(module)
    problems = []
    for line, target, names in _imports(path, module):
        if not target.startswith("fedbrats."):
            continue
        if target not in MODULES:
            # `from fedbrats.common import wire` imports the module fedbrats.common.wire
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            targets = subs or [target]
        else:
            targets = [target]
        for t in targets:
            their_layer, their_entry = _group(t)
            if their_layer > layer or (entry, their_entry) in PEERS_APART:
                problems.append(f"line {line}: imports {t} ({their_entry}, layer {their_layer})")
        if target != module:
            private = [n for n in names if n.startswith("_") and n != "__version__"]
            if private:
                problems.append(f"line {line}: imports private {', '.join(private)} of {target}")
    return problems


def test_the_check_finds_each_kind_of_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from typing import TYPE_CHECKING\n"
        "from fedbrats.common.data.cases import _read_case\n"  # a private name
        "def f():\n"
        "    from fedbrats.server.app import app\n"  # a higher layer, inside a function
        "if TYPE_CHECKING:\n"
        "    from fedbrats.simulation.runner import run_simulation\n"  # annotations only
    )
    found = violations("fedbrats.common.data.bad", bad)
    assert len(found) == 2
    assert "private _read_case" in found[0] and "fedbrats.server.app" in found[1]
    peer = tmp_path / "peer.py"
    peer.write_text("from fedbrats.client.app import app\n")
    assert violations("fedbrats.server.bad", peer)  # the site and the server stay apart


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_import_of_a_higher_layer_or_a_private_name(module):
    problems = violations(module, MODULES[module])
    assert not problems, f"{module} ({_group(module)}):\n" + "\n".join(problems)
