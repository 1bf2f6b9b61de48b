"""``python -m benchmarks.readme [--check]``: the README's result tables, regenerated from the runs.

Every table of measured results in README.md sits in a block that names the ablation directory it
came from (and, optionally, the seeds and tables it shows)::

    <!-- sicot-report runs/ablate-demo seeds=0 tables="Table 3,Table 4" -->
    ...
    <!-- /sicot-report -->

This script rewrites each block's content from those run directories with the code behind
``sicot report`` (``report.md``'s Markdown: the numbers as sicot prints them), so that a README
table is never typed by hand. ``--check`` rewrites nothing: it exits 1 and names every block whose
content differs from what its runs give (or whose runs are missing). Run directories are not in
the repository: the command that makes each one is written beside its block in README.md.
(Not a benchmark: it is not part of ``python -m benchmarks all``.)
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

BLOCK = re.compile(
    r"(?P<open><!-- sicot-report (?P<args>[^\n]*?) -->\n)(?P<body>.*?)(?P<close><!-- /sicot-report -->)", re.S
)


@dataclass(frozen=True)
class Block:
    """One README block: where its runs are, which seeds and which tables it shows."""

    directory: str
    seeds: tuple[int, ...] | None  # None: every seed found
    tables: tuple[str, ...] | None  # title prefixes ("Table 3"); None: every table
    encoder: str = "bilinear"

    @classmethod
    def parse(cls, args: str) -> Block:
        words = shlex.split(args)
        if not words:
            raise ValueError("a sicot-report block names its ablation directory first")
        opts = dict(w.split("=", 1) for w in words[1:] if "=" in w)
        unknown = set(opts) - {"seeds", "tables", "encoder"} or {w for w in words[1:] if "=" not in w}
        if unknown:
            raise ValueError(f"unknown sicot-report option(s): {', '.join(sorted(unknown))}")
        seeds = tuple(int(s) for s in opts["seeds"].split(",")) if "seeds" in opts else None
        tables = tuple(t.strip() for t in opts["tables"].split(",")) if "tables" in opts else None
        return cls(words[0], seeds, tables, opts.get("encoder", "bilinear"))


def render(block: Block, root: Path) -> str:
    """The block's content: the report header (seeds, protocol) and the chosen tables, as report.md has them."""
    from sicot_cli.report import build_report, find_runs, to_markdown

    directory = root / block.directory
    paths = find_runs([directory])
    if block.seeds is not None:
        paths = [p for p in paths if any(p.name.endswith(f"-s{s}") for s in block.seeds)]
    markdown = to_markdown(build_report(paths, block.encoder))
    sections = re.split(r"^## ", markdown, flags=re.M)
    out = []
    for line in sections[0].splitlines():
        if line.startswith(("Seeds:", "Every number")):
            out += [line, ""]
    for section in sections[1:]:
        title = section.splitlines()[0]
        if block.tables is None or title.startswith(block.tables):
            out += [f"**{title}**", ""]
            out += [ln for ln in section.splitlines()[1:] if ln.startswith("|")]
            out.append("")
    return "\n".join(out)


def regenerate(text: str, root: Path) -> tuple[str, list[str], list[str]]:
    """README text with every block rewritten; the blocks that changed; the blocks that could not be made."""
    from sicot_cli.errors import SicotError

    changed: list[str] = []
    errors: list[str] = []

    def one(m: re.Match[str]) -> str:
        args = m.group("args")
        try:
            body = render(Block.parse(args), root)
        except (SicotError, ValueError) as e:
            errors.append(f"{args}: {e}")
            return m.group(0)
        if body != m.group("body"):
            changed.append(args)
        return m.group("open") + body + m.group("close")

    return BLOCK.sub(one, text), changed, errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.readme", description=__doc__.split("\n\n")[0])
    parser.add_argument("--readme", type=Path, default=Path(__file__).resolve().parents[1] / "README.md")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a block is stale")
    args = parser.parse_args(argv)
    from sicot_cli.fsutil import atomic_path, read_text

    text = read_text(args.readme, "README")
    new, changed, errors = regenerate(text, args.readme.parent)
    for e in errors:
        print(f"error: {e} (the command beside the block in README makes its runs)", file=sys.stderr)
    for c in changed:
        print(f"{'stale' if args.check else 'rewritten'}: {c}")
    if errors:
        return 2
    if args.check:
        return 1 if changed else 0
    if new != text:
        with atomic_path(args.readme) as tmp:
            tmp.write_text(new, encoding="utf-8")
    print(f"{args.readme}: {len(BLOCK.findall(text))} block(s), {len(changed)} rewritten")
    return 0


if __name__ == "__main__":
    from benchmarks.common import cli

    cli(main)
