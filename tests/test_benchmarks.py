"""The benchmark suite cannot rot: every benchmark runs in its quick mode (slow marker)."""

from __future__ import annotations

import pytest


@pytest.mark.slow
@pytest.mark.parametrize("name", ["encoders", "prepare", "train_step"])
def test_benchmark_quick_runs_and_reports(name, monkeypatch, tmp_path):
    import importlib

    import benchmarks.common as common

    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    module = importlib.import_module(f"benchmarks.{name}")
    result = module.main(["--quick"])
    assert result["benchmark"] == name and result["quick"] is True
    assert (tmp_path / f"{name}-cpu.json").is_file()
