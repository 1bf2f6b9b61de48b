"""The import contracts in pyproject.toml cover the whole toolkit (docs/architecture.md)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _contracts() -> list[dict]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def _named(layers: list[str], prefix: str = "") -> set[str]:
    return {prefix + name.strip() for line in layers for name in line.split("|")}


def test_every_module_sits_in_a_layer():
    """A new module outside every layer would escape the contract: it must be placed in one."""
    top, data = (c for c in _contracts() if c["type"] == "layers")
    named = _named(top["layers"])
    modules = {f"sicot_cli.{p.stem}" for p in (ROOT / "sicot_cli").glob("*.py") if p.stem != "__init__"}
    assert modules - named == set(), "add these modules to a layer in pyproject.toml [tool.importlinter]"
    assert "sicot_cli.data" in named and "encoders" in named
    data_named = _named(data["layers"], "sicot_cli.data.")
    data_modules = {
        f"sicot_cli.data.{p.stem}" for p in (ROOT / "sicot_cli" / "data").glob("*.py") if p.stem != "__init__"
    }
    assert data_modules | {"sicot_cli.data.importers"} == data_named


def test_the_contracts_hold_and_catch_an_upward_import(tmp_path):
    """lint-imports passes on the tree and fails on a leaf importing a command (a cycle in the making)."""
    import shutil
    import subprocess
    import sys

    lint = Path(sys.executable).with_name("lint-imports")
    ok = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout[-2000:]
    for name in ("sicot_cli", "encoders"):
        shutil.copytree(ROOT / name, tmp_path / name)
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    with open(tmp_path / "sicot_cli" / "metrics.py", "a") as f:
        f.write("\n\ndef _upward() -> None:\n    from sicot_cli import train  # noqa: F401\n")
    bad = subprocess.run(
        [str(lint), "--no-cache"], cwd=tmp_path, capture_output=True, text=True, env={"PYTHONPATH": str(tmp_path)}
    )
    assert bad.returncode != 0
    assert "sicot_cli.metrics is not allowed to import sicot_cli.train" in bad.stdout
