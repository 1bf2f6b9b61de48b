"""The benchmark suite cannot rot: ``python -m benchmarks all --quick`` runs (slow marker), and every
result file holds the figures the docs quote, all positive."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _positive(result: dict) -> dict[str, float]:
    """The figures of each benchmark that must exist and be > 0, by a readable name."""
    name = result["benchmark"]
    if name == "prepare":
        keys = ("raw_images_per_s_one_process", "prepare_images_per_s", "ratio_to_ideal")
        return {k: result[k] for k in keys}
    if name == "encoders":
        return {f"{r['encoder']}.{k}": r[k] for r in result["results"] for k in ("samples_per_s", "ratio_to_mean")}
    if name == "train_step":
        figures = {f"{r['model']}.{k}": r[k] for r in result["steps"] for k in ("images_per_s", "ratio_to_baseline")}
        return {**figures, "loader.ratio": result["loader"]["ratio"], "peak_memory_gib": result["peak_memory_gib"]}
    if name == "evaluate":
        return {f"{r['pass']}.{k}": r[k] for r in result["passes"] for k in ("images_per_s", "ratio_to_plain")}
    if name == "gpu_step":
        figures = {}
        for r in result["results"]:
            c = r["classes"]
            figures.update({f"{c}.{s['model']}.images_per_s": s["images_per_s"] for s in r["steps"]})
            figures.update({f"{c}.{k}": v for k, v in r["ratios"].items()})
            figures[f"{c}.loader.ratio"] = r["loader"]["ratio"]
            figures[f"{c}.process_peak_rss_gib"] = r["process_peak_rss_gib"]
        return figures
    # A benchmark without its own checks here: every throughput and ratio figure it reports.
    return _figures(result)


def _figures(value: object, where: str = "") -> dict[str, float]:
    """Numbers under keys that name a rate or a ratio (``*_per_s``, ``*ratio*``), by their path."""
    found: dict[str, float] = {}
    if isinstance(value, dict):
        for key, v in value.items():
            path = f"{where}.{key}" if where else str(key)
            if (
                isinstance(v, (int, float))
                and not isinstance(v, bool)
                and (str(key).endswith("_per_s") or "ratio" in str(key))
                and "max" not in str(key)
                and "min" not in str(key)
            ):
                found[path] = v
            elif isinstance(v, (dict, list)) and key != "environment":
                found.update(_figures(v, path))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found.update(_figures(v, f"{where}[{i}]"))
    return found


def test_goals_collects_every_verdict():
    from benchmarks.__main__ import goals

    result = {
        "environment": {"met": True},  # not a goal
        "goal": {"met": False},
        "results": [{"goals_met": {"a": True}}, {"goals_met": {"a": False}}],
        "goals": {"loader_met": True, "loader_max_ratio": 1.05},
    }
    assert goals(result) == {
        "goal.met": False,
        "results[0].goals_met.a": True,
        "results[1].goals_met.a": False,
        "goals.loader_met": True,
    }


def test_every_registered_benchmark_has_checks_and_a_main():
    import importlib

    from benchmarks.__main__ import BENCHMARKS

    for name in BENCHMARKS:
        assert callable(importlib.import_module(f"benchmarks.{name}").main), name
    for name in ("prepare", "encoders", "train_step", "evaluate", "gpu_step"):
        with pytest.raises(KeyError):  # an empty result fails the checks (they exist for it)
            _positive({"benchmark": name})
    assert _figures(
        {"a": {"images_per_s": 2.0, "ratio_to_x": 0.5, "max_ratio": 1.1}, "environment": {"x_per_s": 1}}
    ) == {"a.images_per_s": 2.0, "a.ratio_to_x": 0.5}


def test_all_rejects_an_unknown_benchmark():
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "all", "--only", "nope"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 2 and "unknown benchmark(s) nope" in proc.stderr


@pytest.mark.slow
def test_suite_quick_runs_and_reports(tmp_path):
    from benchmarks.__main__ import BENCHMARKS

    env = {**os.environ, "SICOT_BENCH_RESULTS": str(tmp_path)}
    cmd = [sys.executable, "-m", "benchmarks", "all", "--quick", "--device", "cpu", "--threads", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "=== summary" in proc.stdout
    for name in BENCHMARKS:
        result = json.loads((tmp_path / f"{name}-cpu.json").read_text())
        env_record = result["environment"]
        assert result["benchmark"] == name and "--quick" in env_record["argv"]
        assert env_record["device"] == "cpu" and env_record["torch_threads"] == 1
        assert len(env_record["load_average_start"]) == 3 and len(env_record["load_average_end"]) == 3
        figures = _positive(result)
        bad = {k: v for k, v in figures.items() if not (isinstance(v, (int, float)) and v > 0)}
        assert figures and not bad, f"{name}: figures not positive: {bad}"


def test_attribute_oracle_runs_on_a_tiny_synthetic_set(tmp_path):
    from benchmarks.attribute_oracle import class_attributes, run
    from sicot_cli.config import load_recipe
    from sicot_cli.data.prepare import prepare
    from sicot_cli.errors import SicotError

    ids, values = class_attributes(["syn/red-striped-mug/panda", "syn/blue-plain-mug/bee"])
    assert values[0] == ["mug"] and values[1] == ["blue", "red"] and ids.tolist() == [[0, 1, 1, 1], [0, 0, 0, 0]]
    with pytest.raises(SicotError, match="not a built-in synthetic class"):
        class_attributes(["shoes"])
    small = [
        "data.synthetic.num_classes=6",
        "data.synthetic.max_per_class=8",
        "data.synthetic.min_per_class=2",
        "data.synthetic.test_per_class=2",
        "data.test_per_class=2",
        "data.image_size=32",
        "data.workers=1",
        "embed.dim=8",
        "embed.epochs=1",
        "text.drop_most_frequent=0",
        "text.drop_least_frequent=0",
    ]
    prepare(load_recipe(None, small), tmp_path / "s.h5")
    result = run(tmp_path / "s.h5", "resnet18", "", epochs=1, seed=0, device="cpu", head_threshold=5)
    groups = result["groups"]
    from sicot_cli.data.dataset import open_prepared

    p = open_prepared(tmp_path / "s.h5")
    assert groups["head"]["test_images"] + groups["tail"]["test_images"] == p.n - p.n_train > 0
    for g in groups.values():
        assert all(0 <= g[k] <= 100 for k in g if k.endswith("_accuracy") or k == "composed_top1")


def test_every_benchmark_takes_the_options_all_passes_it(capsys):
    """`python -m benchmarks all` passes --quick to each benchmark, and --device unless USES_DEVICE is False."""
    import importlib

    from benchmarks.__main__ import BENCHMARKS

    for name in BENCHMARKS:
        module = importlib.import_module(f"benchmarks.{name}")
        with pytest.raises(SystemExit) as e:
            module.main(["--help"])
        out = capsys.readouterr().out
        assert e.value.code == 0 and out.startswith(f"usage: python -m benchmarks.{name} "), name
        assert "--quick" in out, name
        assert ("--device {cpu,cuda}" in out) == getattr(module, "USES_DEVICE", True), name


def test_shared_options_and_profile_table(capsys):
    import torch
    from rich.console import Console

    from benchmarks.common import (
        benchmark_parser,
        compare_profiles,
        default_model,
        model_setting,
        parse,
        print_profile,
        wants_profile,
    )

    parser = benchmark_parser("x", "First line.\nmore", quick="q", device=True, profile="p", batch="b")
    args = parse(parser, ["--quick", "--device", "cpu", "--image-size", "48"])
    assert (args.quick, args.device, args.profile, args.backbone, args.batch) == (True, "cpu", "auto", None, None)
    assert (
        model_setting(args) == ("resnet18", 48)
        and default_model("cpu", False) == ("resnet18", 64)
        and default_model("cuda:1", True) == ("resnet50", 224)
    )
    assert parser.description == "First line."
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            parse(parser, ["--device", "cuda"])
        assert "--device cuda: CUDA is not available" in capsys.readouterr().err
    assert [wants_profile(m, met) for m in ("auto", "always", "never") for met in (True, False)] == [
        False,
        True,
        True,
        True,
        False,
        False,
    ]
    profile = compare_profiles("b", "a", {"a": ("table a", {"mm": 1.0, "add": 2.0}), "b": ("table b", {"mm": 4.0})})
    assert profile == {
        "subject": "b",
        "reference": "a",
        "subject_table": "table b",
        "reference_table": "table a",
        "top_op_deltas": [
            {"op": "mm", "subject_ms": 4.0, "reference_ms": 1.0, "delta_ms": 3.0},
            {"op": "add", "subject_ms": 0.0, "reference_ms": 2.0, "delta_ms": -2.0},
        ],
    }
    print_profile(Console(width=100), profile, per="pass", goal="g")
    out = capsys.readouterr().out
    assert "profile (g): b, ops by self time per pass\ntable b\n" in out  # the profiler's table printed as it is
    assert "ops that grow most from a to b (ms per pass)" in " ".join(out.split())  # rich wraps the title to the table
    assert "+3.00" in out and "-2.00" in out


def test_label_titles_gives_every_row_one_word_naming_its_class(tiny_prepared, tmp_path):
    import numpy as np

    from benchmarks.label_titles import label_titles

    p = label_titles(tiny_prepared, tmp_path / "l.h5")  # opened again: its checksum holds
    assert np.array_equal(p.tokens[:, 0], p.labels + 1) and not p.tokens[:, 1:].any()
    assert (p.lengths == 1).all()
    import h5py

    with h5py.File(tmp_path / "l.h5") as f:  # each class's word counted once per training title
        assert f["vocab/counts"][1 : 1 + p.num_classes].tolist() == p.train_counts.tolist()
    from conftest import KEEP_ALL, make_manifest

    from sicot_cli.config import load_recipe
    from sicot_cli.data.prepare import prepare
    from sicot_cli.errors import SicotError

    m = make_manifest(tmp_path / "raw", per_class=6)
    recipe = load_recipe(None, ["data.source=manifest", f"data.manifest={m}", "data.images=jpeg", *KEEP_ALL])
    prepare(recipe, tmp_path / "j.h5")
    with pytest.raises(SicotError, match="a format-1 .raw pixels. file is needed"):
        label_titles(tmp_path / "j.h5", tmp_path / "x.h5")


def test_power_matches_the_textbook_value():
    """Paired t, an effect of one sd, 10 pairs, two-sided 0.05: power 0.803 (Cohen's tables)."""
    import statistics

    from benchmarks.cotrain_diagnostics import power

    diffs = [float(i) for i in range(10)]
    sd, pw, need = power(diffs, delta=statistics.stdev(diffs))
    assert sd == statistics.stdev(diffs) and abs(pw - 0.803) < 0.002 and need == 10
    assert power(diffs, delta=0.5 * sd)[1] < 0.5  # half the effect: far less power
    assert power([0.5, 0.5, 0.5])[0] == 0.0  # no spread: power undefined, no seed count


def test_cotrain_diagnostics_reads_an_ablation(tmp_path):
    """A head class (12 training images) and two tail classes (6), a validation split, two seeds."""
    from conftest import KEEP_ALL, TITLES, make_manifest, tiny_recipe, write_image

    from benchmarks.cotrain_diagnostics import diagnose
    from sicot_cli.config import load_recipe
    from sicot_cli.data.prepare import prepare
    from sicot_cli.errors import SicotError
    from sicot_cli.train import train

    label, titles = next(iter(TITLES.items()))
    extra = []
    (tmp_path / "raw").mkdir()
    for i in range(10, 18):
        write_image(tmp_path / "raw" / f"{label}{i}.png", seed=900 + i, channel=0)
        extra.append({"image": f"{label}{i}.png", "title": f"{titles[i % 3]} w{i % 4}", "label": label, "id": f"x{i}"})
    m = make_manifest(tmp_path / "raw", per_class=10, extra_rows=extra)
    data = tmp_path / "d.h5"
    settings = ["data.image_size=16", "data.val_fraction=0.25", "eval.head_threshold=10"]
    prepare(load_recipe(None, ["data.source=manifest", f"data.manifest={m}", *KEEP_ALL, *settings]), data)
    runs_dir = tmp_path / "ablation"
    with pytest.raises(SicotError, match="no finished pair"):
        diagnose(runs_dir, "mean")
    for seed in (0, 1):
        for enc in ("none", "mean"):
            train(tiny_recipe(data, f"model.encoder={enc}", f"train.seed={seed}"), runs_dir / f"{enc}-s{seed}")
    lines = diagnose(runs_dir, "mean")
    assert "seeds 0,1" in lines[0]
    text = "\n".join(lines)
    for part in ("title headroom: top-1 x_v", "head pull", "the title wins", "head |dCE", "tail |dCE", "power (TEST"):
        assert part in text, part
    assert "% of tail training tokens occur in head titles" in text
    # its image-only validation figures are the ones the run recorded for the same checkpoint
    from benchmarks.cotrain_diagnostics import _val

    for run in ("mean-s0", "none-s1"):
        recorded = [json.loads(line) for line in (runs_dir / run / "metrics.jsonl").read_text().splitlines()][-1]
        figures = _val(runs_dir / run)
        assert figures["v_top1"] == pytest.approx(recorded["val_top1"])
        assert figures["v_tail"] == pytest.approx(recorded["val_tail_top1"])
    assert "m_top1" in _val(runs_dir / "mean-s0") and "m_top1" not in _val(runs_dir / "none-s0")


@pytest.mark.parametrize(
    ("module", "argv", "needle"),
    [
        ("prepare", ["--size", "0"], "argument --size: must be an integer >= 1, got '0'"),
        ("sharded_fc", ["--world", "0"], "argument --world: must be an integer >= 1"),
        ("gpu_step", ["--device", "cpu", "--classes", "0"], "argument --classes: must be an integer >= 1"),
        ("gpu_step", ["--device", "cpu", "--models", "foo", "--no-loader"], "--models: unknown foo"),
        ("gpu_step", ["--device", "cpu", "--backbone", "nosuch"], "not a torchvision classification model"),
        ("evaluate", ["--device", "cpu", "--images", "0"], "argument --images: must be an integer >= 1"),
        ("format2", ["--device", "cpu", "--workers", "-3"], "argument --workers: must be an integer >= 0"),
        ("attribute_oracle", ["--epochs", "-1"], "argument --epochs: must be an integer >= 1"),
        ("train_step", ["--device", "cpu", "--sampler", "nosuch"], "invalid choice: 'nosuch'"),
        ("label_titles", ["--data", "/nonexistent/d.h5"], "error: /nonexistent/d.h5: prepared dataset not found"),
        ("readme", ["--readme", "/nonexistent/R.md"], "error: /nonexistent/R.md: README not found"),
        ("cotrain_diagnostics", ["/nonexistent"], "error: /nonexistent: "),
    ],
)
def test_a_benchmark_refuses_bad_arguments_in_one_line(module, argv, needle, capsys):
    """Tracebacks before (a negative size, an unknown model name, a missing file), or a result of
    nothing written with exit 0 (an unknown --models, --workers -3 measured as ratio -0.33)."""
    import importlib

    from benchmarks.common import cli

    mod = importlib.import_module(f"benchmarks.{module}")
    with pytest.raises(SystemExit) as e:
        cli(lambda: mod.main(argv))
    err = capsys.readouterr().err
    assert e.value.code == 2 and needle in err and "Traceback" not in err, err


def test_report_scale_compares_with_the_code_it_replaced(tmp_path, monkeypatch):
    """The closed-form label information and the batched bootstrap give the reference's values."""
    from benchmarks import report_scale

    monkeypatch.setenv("SICOT_BENCH_RESULTS", str(tmp_path))
    result = report_scale.main(["--classes", "300", "--words", "5", "--images", "3000"])
    parts = result["parts"]
    assert parts["label information"]["agree"] and parts["label information"]["max_abs_difference_bits"] <= 1e-9
    assert parts["bootstrap"]["agree"] and parts["bootstrap"]["images"] == 3000
    assert parts["Fig. 6"]["seconds"]["step outlines"] > 0 and (tmp_path / "report_scale-cpu.json").is_file()
    assert set(result["goals"]) == {"label information", "bootstrap", "Fig. 6"}
