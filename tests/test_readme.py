"""benchmarks/readme.py: README result tables are regenerated from run directories, never typed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_report import TOP1, _exact_hits, make_run

from benchmarks import readme
from sicot_cli.report import build_report, find_runs, to_markdown


@pytest.fixture
def ablation(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for (enc, seed), top1 in TOP1.items():
        make_run(tmp_path / "runs" / "abl", enc, seed, top1, _exact_hits(rng, top1))
    return tmp_path


def _readme(root: Path, body: str, args: str = 'runs/abl seeds=0 tables="Table 3"') -> Path:
    path = root / "README.md"
    path.write_text(f"# x\n\nintro\n\n<!-- sicot-report {args} -->\n{body}<!-- /sicot-report -->\n\nafter\n")
    return path


def test_a_block_is_rewritten_with_the_reports_own_table(ablation):
    path = _readme(ablation, "typed by hand: 99.99\n")
    assert readme.main(["--readme", str(path), "--check"]) == 1  # stale before
    assert readme.main(["--readme", str(path)]) == 0
    text = path.read_text()
    assert text.startswith("# x\n\nintro\n\n") and text.endswith("<!-- /sicot-report -->\n\nafter\n")
    assert "99.99" not in text
    # the table lines are report.md's own, for seed 0 only
    seed0 = [p for p in find_runs([ablation / "runs" / "abl"]) if p.name.endswith("-s0")]
    md = to_markdown(build_report(seed0, "bilinear"))
    table3 = md.split("## Table 3")[1].split("## ")[0]
    rows = [ln for ln in table3.splitlines() if ln.startswith("|")]
    assert rows and all(r in text for r in rows)
    assert "Seeds: 0;" in text and "Table 4" not in text
    assert f"| baseline | {TOP1[('none', 0)]:.2f} |" in text
    assert readme.main(["--readme", str(path), "--check"]) == 0  # fresh after


def test_all_seeds_and_tables_by_default_and_a_tampered_number_is_caught(ablation):
    path = _readme(ablation, "\n", "runs/abl")
    assert readme.main(["--readme", str(path)]) == 0
    text = path.read_text()
    assert "Seeds: 0, 1, 2;" in text and "**Table 2" in text and "**Table 4" in text
    path.write_text(text.replace("| bilinear |", "| bilinear | 1", 1))
    assert readme.main(["--readme", str(path), "--check"]) == 1


def test_missing_runs_and_bad_options_are_errors_not_silence(ablation, capsys):
    path = _readme(ablation, "old\n", "runs/nowhere")
    assert readme.main(["--readme", str(path)]) == 2
    assert "runs/nowhere" in capsys.readouterr().err
    assert path.read_text().count("old\n") == 1  # left as it was
    path = _readme(ablation, "old\n", "runs/abl colour=red")
    assert readme.main(["--readme", str(path), "--check"]) == 2
    assert "unknown sicot-report option(s): colour" in capsys.readouterr().err


def test_the_readme_blocks_name_their_runs_and_only_known_options():
    """Every block of the real README parses (the runs themselves are made by the command beside it)."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = [readme.Block.parse(m.group("args")) for m in readme.BLOCK.finditer(text)]
    assert blocks, "README's result tables are generated blocks"
    assert all(b.directory.startswith("runs/") for b in blocks)
    assert text.count("<!-- sicot-report ") == text.count("<!-- /sicot-report -->") == len(blocks)
