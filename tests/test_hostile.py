"""Hostile input: property tests of the readers, and a catalogue of named bad inputs through the CLI.

Every bad input must end in one of three ways, never a traceback and never a hang:

- ``error``: exit code 2 and exactly one line, ``error: ...``, naming the thing;
- ``skip``: the row is left out and counted under a named reason (prepare's summary);
- ``kept``: an input the documentation promises to handle (CMYK, 16-bit, animated, BOM + CRLF...)
  is handled, and the row is in the prepared file.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import signal
import struct
import unicodedata
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import h5py
import numpy as np
import pytest
from conftest import KEEP_ALL, TRAIN_FAST, make_manifest, tiny_recipe
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from sicot_cli import runs
from sicot_cli.cli import app
from sicot_cli.config import load_recipe
from sicot_cli.data.manifest import read_manifest
from sicot_cli.data.skips import Skips
from sicot_cli.data.tokenize import tokenize
from sicot_cli.errors import SicotError

runner = CliRunner()
# What must never reach the terminal raw from data or paths (newline excepted).
RAW = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
# 60 examples per property in the default suite; SICOT_HYPOTHESIS_EXAMPLES=2000 for a deeper search.
FAST = settings(
    max_examples=int(os.environ.get("SICOT_HYPOTHESIS_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Text that marketplace exports really contain: NUL, bidi marks, BOMs, zero-width joiners,
# emoji (with skin tones), mixed scripts, full-width forms, CR/LF, Unicode line separators.
ODD = [
    "\x00",
    "\u202e",
    "\u200f",
    "\u200e",
    "\ufeff",
    "\u200b",
    "\u200d",
    "\r",
    "\n",
    "\r\n",
    "\u2028",
    "\u0085",
    "\x1c",
    "👍🏽",
    "🐱",
    "猫",
    "保温杯",
    "Ｒｅｄ",
    "ß",
    "İ",
    "مرحبا",
    "שלום",
    "кот",
    "\t",
    '"',
    ",",
    "\\",
    "\U00020000",
]
odd_text = st.lists(st.one_of(st.sampled_from(ODD), st.text(max_size=8)), max_size=12).map("".join)


# --- property tests: the manifest reader, the tokenizer, the recipe loader ---------------------


@FAST
@given(data=st.binary(max_size=2000), suffix=st.sampled_from([".csv", ".tsv", ".jsonl"]))
def test_manifest_random_bytes_never_crash(tmp_path_factory, data, suffix):
    path = tmp_path_factory.mktemp("m") / f"m{suffix}"
    path.write_bytes(data)
    skips = Skips()
    try:
        rows = read_manifest(path, skips)
    except SicotError as e:
        assert str(path) in str(e)
        return
    for r in rows:
        assert r.image.is_absolute() and r.label.strip() == r.label and r.label


@FAST
@given(
    titles=st.lists(odd_text, min_size=1, max_size=8),
    labels=st.lists(st.sampled_from(["cat", " dog ", "猫", "Ｒ", "\u202ecup"]), min_size=8, max_size=8),
    bom=st.booleans(),
    crlf=st.booleans(),
    fmt=st.sampled_from(["csv", "jsonl"]),
)
def test_manifest_round_trips_odd_text(tmp_path_factory, titles, labels, bom, crlf, fmt):
    """Every well-formed row comes back, title intact (NUL removed), whatever its characters."""
    import csv
    import io

    root = tmp_path_factory.mktemp("m")
    eol = "\r\n" if crlf else "\n"
    rows = [{"image": f"img{i}.png", "title": t, "label": labels[i], "id": f"r{i}"} for i, t in enumerate(titles)]
    if fmt == "csv":
        buf = io.StringIO(newline="")
        # QUOTE_ALL: the writer only quotes the characters of its own line end, so a bare "\r"
        # in a "\n" file would be written unquoted and read, correctly, as a line break
        w = csv.DictWriter(buf, ["image", "title", "label", "id"], lineterminator=eol, quoting=csv.QUOTE_ALL)
        w.writeheader()
        w.writerows(rows)
        text = buf.getvalue()
    else:
        text = "".join(json.dumps(r, ensure_ascii=False) + eol for r in rows)
    path = root / f"m.{fmt}"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    skips = Skips()
    got = read_manifest(path, skips)
    assert skips.total == 0, skips.as_dict()
    assert [r.id for r in got] == [r["id"] for r in rows]
    for r, src in zip(got, rows, strict=True):
        # NUL is dropped on read (CSV bytes and JSON "\u0000" alike): HDF5 strings cannot hold it
        assert r.title == src["title"].replace("\x00", "")
        assert r.label == src["label"].strip()
        assert r.image == (root / src["image"]).resolve()


@FAST
@given(text=odd_text)
def test_tokenizer_tokens_are_clean_words(text):
    tokens = tokenize(text)
    assert isinstance(tokens, list)
    for t in tokens:
        # no space, control, bidi mark, BOM, NUL, punctuation or emoji (Cn: unassigned code points
        # in the CJK planes are passed to jieba as ideographs)
        assert t and all(unicodedata.category(c)[0] in "LMN" or unicodedata.category(c) == "Cn" for c in t), (text, t)
    assert tokenize(text) == tokens
    # marks at the edges of a title change nothing
    assert tokenize("\ufeff" + text + "\u200f") == tokens


@FAST
@given(data=st.binary(max_size=1000))
def test_recipe_random_bytes_never_crash(tmp_path_factory, data):
    p = tmp_path_factory.mktemp("r") / "r.toml"
    p.write_bytes(data)
    try:
        load_recipe(p)
    except SicotError as e:
        assert str(p) in str(e)


_KEYS = [
    "name",
    "data.image_size",
    "data.source",
    "data.manifest",
    "data.out",
    "data.synthetic.num_classes",
    "text.min_count",
    "text.drop_most_frequent",
    "embed.dim",
    "train.batch_size",
    "train.lr",
    "train.topk",
    "train.crop_scale",
    "train.device",
    "model.encoder",
    "model.encoder_options",
    "nope",
    "train.nope",
]
_VALUES = st.one_of(
    st.integers(min_value=-(10**20), max_value=10**20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    odd_text,
    st.lists(st.integers(-5, 5), max_size=3),
    st.dictionaries(st.sampled_from(["a", "hidden"]), st.integers(0, 9), max_size=2),
)


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return {"nan": "nan", "inf": "inf", "-inf": "-inf"}.get(str(v), repr(v))
    if isinstance(v, str):
        return json.dumps(v)  # JSON string escapes are TOML basic-string escapes
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return str(v)


@FAST
@given(items=st.dictionaries(st.sampled_from(_KEYS), _VALUES, max_size=5), overrides=st.lists(odd_text, max_size=3))
def test_recipe_random_tables_and_overrides(tmp_path_factory, items, overrides):
    """A typed Recipe that passes validation, or one SicotError; nothing else."""
    p = tmp_path_factory.mktemp("r") / "r.toml"
    p.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in items.items()), encoding="utf-8")
    try:
        r = load_recipe(p, overrides)
    except SicotError as e:
        assert "\n" not in str(e).strip() or "TOML" in str(e)
        return
    assert isinstance(r.train.batch_size, int) and r.train.batch_size >= 1
    assert isinstance(r.train.lr, float) and r.train.lr > 0
    assert 8 <= r.data.image_size <= 1024 and "\x00" not in r.data.out and r.name and "/" not in r.name


# --- the catalogue: named bad inputs through the CLI -------------------------------------------


@dataclass
class Case:
    """One bad input: how to make it (returns the CLI arguments) and how it must end."""

    make: Callable[[Path, dict], list[str]]
    outcome: str  # "error", "skip", "kept" or "ok" (exit 0, nothing written by prepare to check)
    needles: list[str] = field(
        default_factory=list
    )  # error: substrings of the line; skip: the reason; ok: substrings of the output
    count: int = 1  # skip: how many rows the reason must count
    check: Callable[[Path, dict], None] | None = None  # extra assertion after the run


def _png(path: Path, size: tuple[int, int] = (24, 20), mode: str = "RGB") -> Path:
    Image.new(mode, size, 120).save(path)
    return path


def _huge_png(path: Path, w: int, h: int) -> Path:
    """A valid PNG header claiming w x h pixels (a decompression bomb without the memory)."""
    png = bytearray(Path(_png(path.with_suffix(".src.png"), (1, 1))).read_bytes())
    ihdr = bytearray(png[12:29])  # b"IHDR" + 13 bytes of data
    ihdr[4:12] = struct.pack(">II", w, h)
    png[12:29] = ihdr
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    path.write_bytes(bytes(png))
    return path


def _manifest(tmp: Path, *rows: dict, fmt: str = "csv", split: bool = False) -> Path:
    return (
        make_manifest(tmp / "raw", per_class=6, split=split, extra_rows=list(rows), name=f"m.{fmt}")
        if fmt == "csv"
        else _jsonl(tmp, list(rows))
    )


def _jsonl(tmp: Path, extra_lines: list) -> Path:
    m = make_manifest(tmp / "raw", per_class=6)
    import csv

    with m.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    path = m.with_suffix(".jsonl")
    lines = [json.dumps(r, ensure_ascii=False) for r in rows] + [
        x if isinstance(x, str) else json.dumps(x, ensure_ascii=False) for x in extra_lines
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _prep(m: Path, tmp: Path, *extra: str) -> list[str]:
    return ["prepare", "--manifest", str(m), "--out", str(tmp / "o.h5"), *KEEP_ALL, *extra]


def _row(image: str, rid: str, title: str = "red cat toy", label: str = "cat", **kw: str) -> dict:
    return {"image": image, "title": title, "label": label, "id": rid, **kw}


def _with_image(make_image: Callable[[Path], object], name: str, **row: str) -> Callable[[Path, dict], list[str]]:
    def make(tmp: Path, ctx: dict) -> list[str]:
        (tmp / "raw").mkdir(exist_ok=True)
        make_image(tmp / "raw" / name)
        return _prep(_manifest(tmp, _row(name, "x1", **row)), tmp)

    return make


def _kept(rid: str) -> Callable[[Path, dict], None]:
    def check(tmp: Path, ctx: dict) -> None:
        from sicot_cli.data.dataset import open_prepared

        assert rid in open_prepared(tmp / "o.h5").ids()

    return check


def _cmyk(p: Path) -> None:
    Image.new("CMYK", (30, 20), (0, 90, 200, 10)).save(p, "JPEG")


def _sixteen_bit(p: Path) -> None:
    Image.fromarray(np.arange(600, dtype=np.uint16).reshape(20, 30) * 100).save(p)


def _animated(p: Path) -> None:
    frames = [Image.new("P", (20, 20), i * 40) for i in range(3)]
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=50, loop=0)


def _truncated_jpeg(p: Path) -> None:
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        p.with_suffix(".full.jpg"), quality=95
    )
    p.write_bytes(p.with_suffix(".full.jpg").read_bytes()[:700])


def _label_in_test_only(tmp: Path, ctx: dict) -> list[str]:
    m = make_manifest(
        tmp / "raw", per_class=6, split=True, extra_rows=[_row("cat0.png", "f1", "red fox", "fox", split="test")]
    )
    return _prep(m, tmp)


def _class_without_decodable_training_image(tmp: Path, ctx: dict) -> list[str]:
    raw = tmp / "raw"
    raw.mkdir()
    (raw / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    rows = [_row("broken.png", f"fox{i}", "red fox", "fox", split="train") for i in range(3)] + [
        _row("cat0.png", "fox-t", "red fox", "fox", split="test")
    ]
    return _prep(make_manifest(raw, per_class=6, split=True, extra_rows=rows), tmp)


def _pretrained(content: str) -> Callable[[Path, dict], list[str]]:
    def make(tmp: Path, ctx: dict) -> list[str]:
        v = tmp / "v.txt"
        v.write_text(content, encoding="utf-8")
        return _prep(_manifest(tmp), tmp, f"embed.pretrained={v}")

    return make


def _corpus(content: bytes) -> Callable[[Path, dict], list[str]]:
    def make(tmp: Path, ctx: dict) -> list[str]:
        (tmp / "words.txt").write_bytes(content)
        return _prep(_manifest(tmp), tmp, f"embed.corpus={tmp / 'words.txt'}")

    return make


def _recipe(text: str, command: str = "prepare") -> Callable[[Path, dict], list[str]]:
    def make(tmp: Path, ctx: dict) -> list[str]:
        r = tmp / "r.toml"
        r.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
        return [
            command,
            "--recipe",
            str(r),
            "--out" if command == "prepare" else "--run-dir",
            str(tmp / ("o.h5" if command == "prepare" else "run")),
        ]

    return make


def _train(*extra: str, run: str = "run") -> Callable[[Path, dict], list[str]]:
    def make(tmp: Path, ctx: dict) -> list[str]:
        return ["train", "--data", str(ctx["prepared"]), "--run-dir", str(tmp / run), *TRAIN_FAST, *extra]

    return make


def _readonly_dir(tmp: Path) -> Path:
    """A directory this process cannot write: chmod 555, or (root ignores modes) a sysfs path."""
    d = tmp / "ro"
    d.mkdir()
    d.chmod(0o555)
    if os.access(d, os.W_OK):
        return Path("/sys/sicot-readonly")  # sysfs refuses mkdir even for root
    return d


def _only_best_left(tmp: Path, ctx: dict, epoch: int) -> list[str]:
    """An unfinished run left with a checkpoint-best.pt of ``epoch`` alone (no last checkpoint, no metrics)."""
    run = _copy_run(tmp, ctx, unfinished=True)
    state = runs.load_checkpoint(run / runs.LAST)
    runs.save_checkpoint(run / runs.BEST, {**state, "epoch": epoch})
    (run / runs.LAST).unlink()
    (run / runs.METRICS).unlink()
    return ["train", "--resume", "--run-dir", str(run)]


def _copy_run(tmp: Path, ctx: dict, unfinished: bool = False) -> Path:
    """A copy of the finished run; ``unfinished``: as if killed after epoch 1 of 2 (resumable)."""
    run = tmp / "run"
    shutil.copytree(ctx["run"], run)
    if unfinished:
        (run / runs.SUMMARY).unlink()
        (run / runs.PREDICTIONS).unlink()
    return run


def _damaged_checkpoint(how: str, command: str) -> Callable[[Path, dict], list[str]]:
    def make(tmp: Path, ctx: dict) -> list[str]:
        run = _copy_run(tmp, ctx, unfinished=command == "train")
        ck = run / runs.LAST
        data = bytearray(ck.read_bytes())
        if how == "truncated":
            data = data[: len(data) // 2]
        elif how == "bitflip":
            data[len(data) // 2] ^= 0x10
        elif how == "empty":
            data = bytearray()
        elif how == "other-model":
            import torch

            other = {
                "model": {"visual.conv1.weight": torch.zeros(4, 3, 3, 3)},
                "meta": {"backbone": "resnet18", "num_classes": 7},
                "optimizer": {},
            }
            runs.save_checkpoint(ck, other)
            data = bytearray(ck.read_bytes())
        elif how == "pickle-payload":
            data = bytearray(_evil_checkpoint(tmp / "PWNED"))
        ck.write_bytes(bytes(data))
        if command == "evaluate":
            return ["evaluate", "--run", str(run)]
        return ["train", "--resume", "--run-dir", str(run)]  # the run's own recipe and data (config.json)

    return make


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204 - what a malicious pickle does on load
        return (os.system, (f"touch {self.marker}",))


def _evil_checkpoint(marker: Path) -> bytes:
    """A checkpoint with a valid header and checksum whose pickle would run a shell command."""
    import hashlib
    import io

    import torch

    buf = io.BytesIO()
    torch.save({"model": _Evil(marker), "meta": {}}, buf)
    payload = buf.getvalue()
    return runs.MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload


def _absent(path: Path) -> None:
    assert not path.exists(), f"{path} was written"


def _wordless_titles(tmp: Path) -> Path:
    """make_manifest's images, every title empty or punctuation only."""
    m = make_manifest(tmp / "raw", per_class=6)
    lines = m.read_text(encoding="utf-8").splitlines()
    header = lines[0].split(",")
    col = header.index("title")
    out = [lines[0]]
    for i, line in enumerate(lines[1:]):
        cells = line.split(",")
        cells[col] = "" if i % 2 else "!!! ..."
        out.append(",".join(cells))
    m.write_text("\n".join(out) + "\n", encoding="utf-8")
    return m


def _folder_absent(name: str) -> Callable[[Path, dict], None]:
    """Refused before anything was made: no ``name`` in the case's folder."""

    def check(tmp: Path, ctx: dict) -> None:
        assert not (tmp / name).exists(), f"{name} was created"

    return check


def _no_marker(name: str) -> Callable[[Path, dict], None]:
    """The case's folder holds no ``name``: every payload below writes it there if it runs
    (``test_bad_input`` runs the CLI in that folder, so a relative path lands there too;
    ``test_each_payload_would_leave_its_marker`` runs each payload on purpose)."""

    def check(tmp: Path, ctx: dict) -> None:
        assert not (tmp / name).exists(), "the payload ran"

    return check


# Payloads: a shell command in an image path, Python in a recipe string (a recipe's name may not
# hold a "/": the marker is relative, in the working directory), code in a checkpoint's pickle.
def _shell_in_image_path(tmp: Path) -> str:
    return f"$(touch {tmp}/PWNED); `touch {tmp}/PWNED`.png"


PYTHON_IN_RECIPE = "name = \"__import__('os').system('touch PWNED')\"\n[data]\nimage_size = 2\n"


def _damaged_prepared(how: str) -> Callable[[Path, dict], list[str]]:
    def make(tmp: Path, ctx: dict) -> list[str]:
        p = tmp / "p.h5"
        shutil.copy(ctx["prepared"], p)
        if how == "truncated":
            p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
        elif how == "empty":
            p.write_bytes(b"")
        elif how == "labels-changed":
            with h5py.File(p, "a") as f:
                f["labels"][0] = (f["labels"][0] + 1) % len(f["classes/names"])
        elif how == "incomplete":
            with h5py.File(p, "a") as f:
                f.attrs["complete"] = 0
        elif how == "tokens-out-of-range":
            with h5py.File(p, "a") as f:
                del f.attrs["content_sha256"]  # as a file from before checksums, or another writer
                f["tokens"][0, 0] = 10**6
        return ["train", "--data", str(p), "--run-dir", str(tmp / "run"), *TRAIN_FAST]

    return make


def _changed_dataset(command: str) -> Callable[[Path, dict], list[str]]:
    def make(tmp: Path, ctx: dict) -> list[str]:
        run = _copy_run(tmp, ctx, unfinished=command == "train")
        if command == "predict":
            return ["predict", "--run", str(run), "--data", str(ctx["other"]), str(ctx["image"])]
        if command == "evaluate":
            return ["evaluate", "--run", str(run), "--data", str(ctx["other"])]
        return ["train", "--resume", "--data", str(ctx["other"]), "--run-dir", str(run)]

    return make


def _enospc(match: str) -> Callable:
    """os.fsync failing with ENOSPC for files whose name contains ``match`` (a full disk)."""
    real = os.fsync

    def fsync(fd: int) -> None:
        if match in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    return fsync


def _no_tmp_left(tmp: Path, ctx: dict) -> None:
    left = [p for p in tmp.rglob(".*.tmp-*")]
    assert not left, left


# --- round 2 (issue 15): helpers of the cases below ---------------------------------------------

EVIL = "[/]\x1b]0;owned\x07\x1b]52;c;SGVsbG8=\x07\x1b[2J\u202e[bold]"  # markup, OSC 0, OSC 52, CSI 2J, bidi override


def _evil_run(ctx: dict) -> Path:
    """A finished run on a dataset whose class names and titles hold markup and escape sequences (made once)."""
    if "evil_run" not in ctx:
        from sicot_cli.data.prepare import prepare
        from sicot_cli.train import train

        root = ctx["root"] / "evil"
        m = make_manifest(root / "raw", per_class=6)
        text = m.read_text(encoding="utf-8")
        for label in ("cat", "dog", "cup"):
            text = text.replace(f",{label},", f",{_csv_field(label + EVIL)},")
        m.write_text(text.replace("red cat toy", "red cat toy " + EVIL.replace("\x07", "")), encoding="utf-8")
        p = root / "evil.h5"
        prepare(load_recipe(None, ["data.source=manifest", f"data.manifest={m}", "data.image_size=16", *KEEP_ALL]), p)
        ctx["evil_run"] = train(tiny_recipe(p, "model.encoder=none", "train.epochs=1"), root / "run").run_dir
    return ctx["evil_run"]


def _bilinear_run(tmp: Path, ctx: dict) -> Path:
    """A copy of a finished 1-epoch bilinear run on the tiny dataset (trained once per module)."""
    if "bilinear_run" not in ctx:
        from sicot_cli.train import train

        rec = tiny_recipe(ctx["prepared"], "model.encoder=bilinear", "train.epochs=1")
        ctx["bilinear_run"] = train(rec, ctx["root"] / "bilinear").run_dir
    return Path(shutil.copytree(ctx["bilinear_run"], tmp / "run"))


def _csv_field(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


def _stray_quote(tmp: Path, ctx: dict) -> list[str]:
    """A quote opened in the title of line 2 and never closed: the rows after it must not vanish into that title."""
    m = make_manifest(tmp / "raw", per_class=6)
    header, *rows = m.read_text(encoding="utf-8").splitlines(keepends=True)
    m.write_text(header + 'cat0.png,"red cat toy,cat,x1\n' + "".join(rows), encoding="utf-8")
    return _prep(m, tmp)


def _bare_cr(quoted: bool, fmt: str = "csv") -> Callable[[Path, dict], list[str]]:
    """A title holding a bare CR (as a csv writer with lineterminator="\\n" writes it: unquoted)."""

    def make(tmp: Path, ctx: dict) -> list[str]:
        m = make_manifest(tmp / "raw", per_class=6)
        sep = "\t" if fmt == "tsv" else ","
        lines = [sep.join(r) for r in _csv_rows(m)]
        title = '"red\rcat toy"' if quoted else "red\rcat toy"
        out = m.with_suffix(f".{fmt}")
        out.write_bytes(("\r\n".join([*lines, sep.join(["cat0.png", title, "cat", "x1"])]) + "\r\n").encode())
        return _prep(out, tmp)

    return make


def _csv_rows(m: Path) -> list[list[str]]:
    import csv

    with m.open(newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def _tsv(tmp: Path, ctx: dict) -> list[str]:
    import csv

    m = make_manifest(tmp / "raw", per_class=6, extra_rows=[_row("cat0.png", "x1", '12" red cat toy')])
    with m.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    tsv = m.with_suffix(".tsv")
    tsv.write_text("".join("\t".join(r) + "\n" for r in rows), encoding="utf-8")
    return _prep(tsv, tmp)


def _special(kind: str, path: Path) -> Path:
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")
    return path


def _special_input(kind: str, what: str) -> Callable[[Path, dict], list[str]]:
    def make(tmp: Path, ctx: dict) -> list[str]:
        if what == "manifest":
            return _prep(_special(kind, tmp / "m.csv"), tmp)
        if what == "recipe":
            return ["prepare", "--recipe", str(_special(kind, tmp / "r.toml")), "--out", str(tmp / "o.h5")]
        if what == "tokenize":
            return ["tokenize", "--file", str(_special(kind, tmp / "t.txt"))]
        if what == "predict":
            return ["predict", "--run", str(_copy_run(tmp, ctx)), str(_special(kind, tmp / "q.png"))]
        if what == "pretrained":
            return _train(f"model.pretrained={_special(kind, tmp / 'w.pt')}")(tmp, ctx)
        if what == "word_vectors":
            return _prep(_manifest(tmp), tmp, f"embed.pretrained={_special(kind, tmp / 'v.txt')}")
        if what == "titles":
            from test_datasets import make_imaterialist

            return [
                "datasets",
                "import",
                "imaterialist2019",
                "--root",
                str(make_imaterialist(tmp / "imat")),
                "--titles",
                str(_special(kind, tmp / "t.jsonl")),
                "--out",
                str(tmp / "m.csv"),
            ]
        (tmp / "raw").mkdir(exist_ok=True)
        _special(kind, tmp / "raw" / "pipe.png")
        return _prep(_manifest(tmp, _row("pipe.png", "x1")), tmp)

    return make


def _run_file(
    name: str, content: bytes | str | Callable[[Any], Any], command: str = "report"
) -> Callable[[Path, dict], list[str]]:
    """A copy of the finished run with one run file replaced (bytes/str) or edited (a function of its JSON)."""

    def make(tmp: Path, ctx: dict) -> list[str]:
        run = _copy_run(tmp, ctx)
        path = run / name
        if callable(content):
            path.write_text(json.dumps(content(json.loads(path.read_text(encoding="utf-8")))), encoding="utf-8")
        elif name == runs.PREDICTIONS:
            path.write_bytes(path.read_bytes()[: int(content)])
        else:
            path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        if command == "report":
            return ["report", str(run), "--no-figures", "--out", str(tmp / "rep")]
        return ["evaluate", "--run", str(run)]

    return make


def _truncated_predictions(tmp: Path, ctx: dict) -> list[str]:
    """An ablation folder (a baseline and a co-training run) whose co-training predictions.h5 is cut short."""
    shutil.copytree(ctx["run"], tmp / "abl" / "base")
    enc = Path(shutil.copytree(ctx["run"], tmp / "abl" / "enc"))
    config = json.loads((enc / runs.CONFIG).read_text(encoding="utf-8"))
    config["recipe"]["model"]["encoder"] = "mean"
    (enc / runs.CONFIG).write_text(json.dumps({**config, "encoder": "mean"}), encoding="utf-8")
    (enc / runs.PREDICTIONS).write_bytes((enc / runs.PREDICTIONS).read_bytes()[:900])
    return ["report", str(tmp / "abl"), "--encoder", "mean", "--no-figures"]


def _edited_predictions(edit: Callable[[Any, float], None]) -> Callable[[Path, dict], list[str]]:
    """As :func:`_truncated_predictions`, with the co-training run's predictions.h5 edited:
    ``edit(the open file, the run's top-1 in summary.json)``."""

    def make(tmp: Path, ctx: dict) -> list[str]:
        args = _truncated_predictions(tmp, ctx)
        enc = tmp / "abl" / "enc"
        shutil.copy(ctx["run"] / runs.PREDICTIONS, enc / runs.PREDICTIONS)
        top1 = json.loads((enc / runs.SUMMARY).read_text(encoding="utf-8"))["final"]["top1"]
        with h5py.File(enc / runs.PREDICTIONS, "r+") as f:
            edit(f, top1)
        return args

    return make


def _other_top1(f: Any, top1: float) -> None:
    """Labels that give another top-1 than the summary's: every row right, or (if it was 100) every row wrong."""
    first = f["topk_labels"][:, 0]
    f["labels"][...] = first if top1 < 100 else (first + 1) % 3


def _deleted_predictions(tmp: Path, ctx: dict) -> list[str]:
    """As :func:`_truncated_predictions`, with the co-training run's predictions.h5 deleted."""
    args = _truncated_predictions(tmp, ctx)
    (tmp / "abl" / "enc" / runs.PREDICTIONS).unlink()
    return args


def _drop(key: str) -> Callable[[dict], dict]:
    return lambda d: {k: v for k, v in d.items() if k != key}


def _set(path: str, value: Any) -> Callable[[dict], dict]:
    def edit(d: dict) -> dict:
        node = d
        *parents, last = path.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
        return d

    return edit


def _export(out: Callable[[Path], Path]) -> Callable[[Path, dict], list[str]]:
    return lambda t, c: ["export", "--run", str(_copy_run(t, c)), "--out", str(out(t))]


def _exported(tmp: Path, ctx: dict) -> None:
    assert (tmp / "new" / "dir" / "m.pt").is_file() and (
        tmp / "new" / "dir" / "m.pt.json"
    ).is_file()  # the JSON sidecar of sicot export


def _lines(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _exif_rotated(p: Path) -> None:
    """A 40x20 photo stored landscape with EXIF orientation 6 (display rotated 90 degrees clockwise)."""
    a = np.zeros((20, 40, 3), dtype=np.uint8)
    a[:, :20] = (255, 0, 0)  # left half red, right half blue as stored
    a[:, 20:] = (0, 0, 255)
    img = Image.fromarray(a)
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(p, exif=exif)


def _upright_kept(tmp: Path, ctx: dict) -> None:
    from sicot_cli.data.dataset import open_prepared

    row = open_prepared(tmp / "o.h5").ids().index("x1")
    with h5py.File(tmp / "o.h5", "r") as f:
        img = f["images"][row]  # [3, S, S]
    s = img.shape[1]
    # shown upright (rotated clockwise) the red half is on top: top rows red, bottom rows blue
    assert img[0, 1, s // 2] > 200 and img[2, 1, s // 2] < 60, img[:, :, s // 2]
    assert img[2, s - 2, s // 2] > 200 and img[0, s - 2, s // 2] < 60, img[:, :, s // 2]


def _one_class_for_7(tmp: Path, ctx: dict) -> None:
    from sicot_cli.data.dataset import open_prepared

    assert "7" in open_prepared(tmp / "o.h5").class_names and "7.0" not in open_prepared(tmp / "o.h5").class_names


def _title_kept(rid: str, title: str) -> Callable[[Path, dict], None]:
    def check(tmp: Path, ctx: dict) -> None:
        from sicot_cli.data.dataset import open_prepared

        p = open_prepared(tmp / "o.h5")
        assert p.titles([p.ids().index(rid)]) == [title]

    return check


def _tampered(attr: str, change: Callable[[int, int], int], legacy: bool = False) -> Callable[[Path, dict], list[str]]:
    def make(tmp: Path, ctx: dict) -> list[str]:
        p = tmp / "p.h5"
        shutil.copy(ctx["prepared"], p)
        with h5py.File(p, "a") as f:
            if legacy:
                from sicot_cli.data.dataset import content_sha256

                f.attrs["content_sha256"] = content_sha256(f)  # a checksum from before it covered attributes
            f.attrs[attr] = change(int(f.attrs[attr]), len(f["labels"]))
        return ["evaluate", "--run", str(_copy_run(tmp, ctx)), "--data", str(p)]

    return make


def _webvision(filelist: str = "", meta: str | None = None) -> Callable[[Path, dict], list[str]]:
    def make(tmp: Path, ctx: dict) -> list[str]:
        from test_datasets import make_webvision

        root = make_webvision(tmp / "wv", n_classes=2, per_class=2)
        if filelist:
            _lines(root / "info" / "train_filelist_google.txt", filelist)
        if meta is not None:
            _lines(root / "meta" / "google" / "q0001.json", meta)
        return [
            "datasets",
            "import",
            "webvision",
            "--root",
            str(root),
            "--out",
            str(tmp / "m.csv"),
            "--classes",
            "0",
            "--sources",
            "google",
        ]

    return make


def _example_names(tmp: Path, reason: str, tail: str) -> None:
    """prepare's first example of ``reason`` ends with ``tail`` (the path, as for every image skip)."""
    example = json.loads((tmp / "o.recipe.json").read_text())["summary"]["skip_examples"][reason][0]
    assert example.endswith(tail), example


def _link_loop(tmp: Path, name: str) -> Path:
    """``name`` -> ``name.other`` -> ``name``: a link that never reaches a file."""
    (tmp / f"{name}.other").symlink_to(tmp / name)
    (tmp / name).symlink_to(tmp / f"{name}.other")
    return tmp / name


def _dangling(path: Path) -> Path:
    """A symbolic link to a file that is not there: an output name in use all the same."""
    path.symlink_to(path.with_name("gone.target"))
    return path


def _out_replaced(args: list[str], out: str) -> list[str]:
    """A command's arguments with the value of --out replaced."""
    i = args.index("--out")
    return [*args[: i + 1], out, *args[i + 2 :]]


def _imaterialist(train_json: str | None = None, titles: str | None = None) -> Callable[[Path, dict], list[str]]:
    def make(tmp: Path, ctx: dict) -> list[str]:
        from test_datasets import make_imaterialist

        root = make_imaterialist(tmp / "imat")
        if train_json is not None:
            _lines(root / "train.json", train_json)
        t = _lines(tmp / "t.jsonl", titles if titles is not None else '{"id": "train000ab.jpg", "title": "red cup"}\n')
        return [
            "datasets",
            "import",
            "imaterialist2019",
            "--root",
            str(root),
            "--titles",
            str(t),
            "--out",
            str(tmp / "m.csv"),
        ]

    return make


def _imported(*rows: tuple[str, str], labels: tuple[str, ...] | None = None) -> Callable[[Path, dict], None]:
    """The manifest holds exactly these (id, title) rows (with these labels): the bad lines cost nothing else."""

    def check(tmp: Path, ctx: dict) -> None:
        from test_datasets import rows_of

        assert [(r["id"], r["title"]) for r in rows_of(tmp / "m.csv")] == list(rows)
        assert labels is None or tuple(r["label"] for r in rows_of(tmp / "m.csv")) == labels

    return check


LONG = "n" * 300


def _holds(predicate: Callable[[Path, dict], object]) -> Callable[[Path, dict], None]:
    """A case's check from a predicate: the case fails when it is false."""

    def check(tmp: Path, ctx: dict) -> None:
        assert predicate(tmp, ctx), "the case's check does not hold"

    return check


def _unchanged(name: str, text: str) -> Callable[[Path, dict], bool]:
    def check(tmp: Path, ctx: dict) -> bool:
        assert (tmp / name).read_text(encoding="utf-8") == text, f"{name} was changed"
        return True

    return check


def _ablate(tmp: Path, ctx: dict, *extra: str) -> list[str]:
    args = ["ablate", "--data", str(ctx["prepared"]), "--out", str(tmp / "abl"), "--no-figures", *TRAIN_FAST]
    return args + (["--encoders", "none"] if "--encoders" not in extra else []) + list(extra)


def _bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _one_class_csv(tmp: Path) -> str:
    import csv
    import io

    m = make_manifest(tmp / "raw", per_class=6)
    with m.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    out = io.StringIO()
    w = csv.DictWriter(out, list(rows[0]))
    w.writeheader()
    w.writerows({**r, "label": "cat"} for r in rows)
    return out.getvalue()


def _all_train(tmp: Path) -> Path:
    m = make_manifest(tmp / "raw", per_class=6, split=True)
    return _lines(m, m.read_text(encoding="utf-8").replace(",test\n", ",train\n").replace(",test\r\n", ",train\r\n"))


def _one_cafe_class(tmp: Path, ctx: dict) -> None:
    from sicot_cli.data.dataset import open_prepared

    names = open_prepared(tmp / "o.h5").class_names
    assert [unicodedata.normalize("NFC", n) for n in names].count("café") == 1, names


def _header_only(tmp: Path, ctx: dict) -> list[str]:
    (tmp / "h.csv").write_text("image,title,label\n", encoding="utf-8")
    return _prep(tmp / "h.csv", tmp)


def _every_row_test(tmp: Path, ctx: dict) -> list[str]:
    m = make_manifest(tmp / "raw", per_class=6, split=True)
    lines = m.read_text(encoding="utf-8").splitlines()
    head = lines[0].split(",")
    col = head.index("split")
    rows = [",".join("test" if i == col else v for i, v in enumerate(ln.split(","))) for ln in lines[1:]]
    m.write_text("\n".join([lines[0], *rows]) + "\n", encoding="utf-8")
    return _prep(m, tmp)


CASES: dict[str, Case] = {
    # manifests without rows to train on: said as such (were "no usable rows (0 skipped: )" and
    # "no training title has a word")
    "manifest_header_only": Case(_header_only, "error", ["h.csv: holds no rows (a header alone?)"]),
    "manifest_every_row_test": Case(
        _every_row_test, "error", ["no training rows (every row's split is test): mark some rows train"]
    ),
    "manifest_given_twice": Case(  # the override was read, the option ignored without a word
        lambda t, c: _prep(_manifest(t), t, f"data.manifest={t / 'other.csv'}"),
        "error",
        ["and the override 'data.manifest=", "both set data.manifest: give one of them"],
    ),
    # images (prepare): counted skips, or handled as documented
    "image_missing": Case(
        lambda t, c: _prep(_manifest(t, _row("nowhere.png", "x1")), t), "skip", ["image file not found"]
    ),
    "image_is_a_url": Case(  # was "image file not found", at raw/https:/example.com/a.png
        lambda t, c: _prep(_manifest(t, _row("https://example.com/a.png", "x1")), t),
        "skip",
        ["image is a URL (download the images first; the manifest names local files)"],
    ),
    "shipped_recipe_without_its_data": Case(  # "recipes/../data/webvision1k/manifest.csv: manifest not found"
        lambda t, c: [
            "prepare",
            "--recipe",
            str(Path(__file__).resolve().parents[1] / "recipes" / "webvision1k.toml"),
            "--out",
            str(t / "o.h5"),
        ],  # fmt: skip
        "error",
        ["data/webvision1k/manifest.csv: manifest not found; `sicot datasets import webvision --root DIR"],
    ),
    "manifest_is_a_url": Case(  # was "https:/example.com/m.csv: manifest not found"
        lambda t, c: ["prepare", "--manifest", "https://example.com/m.csv", "--out", str(t / "o.h5")],
        "error",
        ["https://example.com/m.csv: a URL; the manifest is read from a local file: download it first"],
    ),
    "image_corrupt_bytes": Case(
        _with_image(lambda p: p.write_bytes(os.urandom(300)), "bad.jpg"), "skip", ["not an image file"]
    ),
    "image_zero_byte": Case(_with_image(lambda p: p.write_bytes(b""), "empty.png"), "skip", ["not an image file"]),
    "image_truncated_jpeg": Case(_with_image(_truncated_jpeg, "cut.jpg"), "skip", ["truncated or corrupt image"]),
    "image_huge_decompression_bomb": Case(
        _with_image(lambda p: _huge_png(p, 30000, 30000), "bomb.png"),
        "skip",
        ["image over data.max_image_pixels (89 MP)"],
    ),
    "image_extreme_aspect_ratio": Case(
        _with_image(lambda p: _huge_png(p, 1, 50_000_000), "strip.png"), "skip", ["image aspect ratio over 100:1"]
    ),
    "image_cmyk_jpeg": Case(_with_image(_cmyk, "cmyk.jpg"), "kept", check=_kept("x1")),
    # --- round 8 ---
    "image_icon_container": Case(
        _with_image(lambda p: Image.new("RGB", (32, 32), 9).save(p, format="ICO"), "icon.ico"),
        "skip",
        ["an icon container (ICO, CUR or ICNS) is not read: save the image as PNG"],
    ),
    "image_nan_float_tiff": Case(
        _with_image(lambda p: Image.fromarray(np.full((8, 8), np.nan, np.float32)).save(p), "nan.tif"),
        "skip",
        ["image has non-finite pixel values (NaN or infinity)"],
    ),
    "image_symlink_loop_in_manifest": Case(
        _with_image(lambda p: _link_loop(p.parent, p.name), "loop.png"),
        "skip",
        ["image path is a symbolic link loop"],
        check=lambda t, c: _example_names(t, "image path is a symbolic link loop", "loop.png)"),
    ),
    "image_16bit_png": Case(_with_image(_sixteen_bit, "deep.png"), "kept", check=_kept("x1")),
    "image_animated_gif": Case(_with_image(_animated, "anim.gif"), "kept", check=_kept("x1")),
    "image_path_is_directory": Case(
        _with_image(lambda p: p.mkdir(), "adir.png"), "skip", ["image path is a directory"]
    ),
    "image_path_escapes_to_system_file": Case(
        lambda t, c: _prep(_manifest(t, _row("../" * 30 + "etc/hostname", "x1")), t), "skip", ["not an image file"]
    ),
    "image_path_shell_injection": Case(
        lambda t, c: _prep(_manifest(t, _row(_shell_in_image_path(t), "x1")), t),
        "skip",
        ["image file not found"],
        check=_no_marker("PWNED"),
    ),
    # rows and labels (prepare)
    "duplicate_id": Case(lambda t, c: _prep(_manifest(t, _row("cat0.png", "cat-1")), t), "skip", ["duplicate id"]),
    "label_only_in_test": Case(_label_in_test_only, "skip", ["label has no training image"]),
    "class_with_zero_training_images": Case(
        _class_without_decodable_training_image, "skip", ["label has no training image"], count=1
    ),
    "title_only_emoji_and_marks": Case(
        lambda t, c: _prep(_manifest(t, _row("cat0.png", "x1", "🐱🐶 \u202e\u200f !!!")), t), "skip", ["empty title"]
    ),
    "title_nul_rtl_mixed_scripts": Case(
        lambda t, c: _prep(_manifest(t, _row("cat0.png", "x1", "\u202e红色\x00 cat\u200f кот 👍🏽 Ｒｅｄ")), t),
        "kept",
        check=_kept("x1"),
    ),
    "title_huge_1mb": Case(
        lambda t, c: _prep(_manifest(t, _row("cat0.png", "x1", "red cat " * 130_000)), t), "kept", check=_kept("x1")
    ),
    "split_value_unknown": Case(
        lambda t, c: _prep(
            make_manifest(t / "raw", per_class=6, split=True, extra_rows=[_row("cat0.png", "x1", split="dev")]), t
        ),
        "skip",
        ["split is not train/val/test"],
    ),
    "jsonl_line_not_an_object": Case(
        lambda t, c: _prep(_jsonl(t, ["[1, 2]", "{broken", "[" * 50_000 + "]" * 50_000, "1" * 5000]), t),
        "skip",
        ["not a JSON object"],
        count=4,
    ),
    "jsonl_lone_surrogate_escape": Case(
        lambda t, c: _prep(
            _jsonl(t, ['{"image": "cat0.png", "title": "red \\ud800 cat", "label": "cat", "id": "x1"}']), t
        ),
        "skip",
        ["text is not valid Unicode (lone surrogate)"],
    ),
    "jsonl_title_with_line_separator": Case(
        lambda t, c: _prep(_jsonl(t, [_row("cat0.png", "x1", "red\u2028cat\u0085toy")]), t), "kept", check=_kept("x1")
    ),
    # manifests (prepare)
    "manifest_zero_byte": Case(
        lambda t, c: (t / "m.csv").write_bytes(b"") and [] or _prep(t / "m.csv", t),
        "error",
        ["m.csv", "empty manifest"],
    ),
    "manifest_random_binary": Case(
        lambda t, c: (t / "m.csv").write_bytes(np.random.default_rng(7).bytes(4000)) and [] or _prep(t / "m.csv", t),
        "error",
        ["m.csv"],
    ),
    "manifest_unknown_extension": Case(
        lambda t, c: (t / "m.xlsx").write_bytes(b"PK\x03\x04") and [] or _prep(t / "m.xlsx", t),
        "error",
        ["m.xlsx", "unknown manifest type"],
    ),
    "manifest_is_a_directory": Case(
        lambda t, c: (t / "m.csv").mkdir() or _prep(t / "m.csv", t), "error", ["m.csv", "is a directory"]
    ),
    "manifest_mixed_split": Case(
        lambda t, c: _prep(_jsonl(t, [_row("cat0.png", "x1", split="train")]), t),
        "error",
        ["m.jsonl", "no split, but other rows have one"],
    ),
    # text and vectors (prepare)
    "empty_vocabulary_after_filtering": Case(
        lambda t, c: _prep(
            _manifest(t), t, "text.drop_most_frequent=0.5", "text.drop_least_frequent=0.49", "text.min_count=100"
        ),
        "error",
        ["vocabulary is empty after filtering"],
    ),
    "no_training_title_has_a_word": Case(  # advised lowering filters that were already 0
        lambda t, c: _prep(_wordless_titles(t), t), "error", ["no training title has a word", "fill the title column"]
    ),
    "word_vectors_wrong_dimension": Case(
        _pretrained("3 5\nred 1 0 0\ncat 0 1 0\ntoy 0 0 1\n"), "error", ["v.txt", "not a word2vec text file"]
    ),
    "word_vectors_not_numbers": Case(
        _pretrained("2 3\nred a b c\ncat 0 1 0\n"), "error", ["v.txt", "not a word2vec text file"]
    ),
    **{
        f"word_vectors_{name}": Case(
            _pretrained(f"3 3\nred 1 0 0\ncat 0 1 0\ntoy 0 {value} 1\n"),
            "error",
            ["v.txt:4: word 'toy' has a non-finite value", repr(value), "fix or remove that line"],
        )
        for name, value in (("nan", "nan"), ("inf", "-inf"), ("float32_overflow", "1e39"))
    },
    "word_vectors_binary_nan": Case(
        lambda t, c: _prep(
            _manifest(t),
            t,
            "embed.binary=true",
            "embed.pretrained="
            + str(
                _bytes(
                    t / "v.bin", b"2 2\nred " + struct.pack("<2f", 1, 0) + b"\ncat " + struct.pack("<2f", 0, math.nan)
                )
            ),
        ),
        "error",
        ["v.bin (vector 2): word 'cat' has a non-finite value (nan)", "fix or remove that word"],
    ),
    "word_vectors_text_read_as_binary": Case(  # parsed the digits as floats: 99 % OOV, no error
        lambda t, c: _prep(
            _manifest(t),
            t,
            "embed.binary=true",
            "embed.pretrained=" + str(_bytes(t / "v.txt", b"3 3\nred 0.5 -1.25 3e-2\ncat 0 1 0\ntoy 0 0 1\n")),
        ),
        "error",
        ["v.txt: a word2vec TEXT file (its first vector is written in digits), read as binary"],
    ),
    "word_vectors_a_folder": Case(
        lambda t, c: _prep(_manifest(t), t, f"embed.pretrained={t / 'raw'}"),
        "error",
        ["raw: is a folder, expected a word2vec text file (embed.pretrained names the file itself)"],
    ),
    "embed_neighbours_vectors_a_folder": Case(
        lambda t, c: ["embed", "--neighbours", "red", "--vectors", str(t)],
        "error",
        [": is a folder, expected a word2vec text file (--vectors names the file itself)"],
    ),
    "embed_neighbours_vectors_nan": Case(
        lambda t, c: [
            "embed",
            "--neighbours",
            "red",
            "--vectors",
            str(_lines(t / "v.txt", "2 2\nred 1 0\ncat nan 1\n")),
        ],
        "error",
        ["v.txt:3: word 'cat' has a non-finite value ('nan')"],
    ),
    "word_vectors_missing": Case(
        lambda t, c: _prep(_manifest(t), t, f"embed.pretrained={t}/nope.txt"),
        "error",
        ["nope.txt", "pretrained word vectors not found"],
    ),
    "word_corpus_missing": Case(
        lambda t, c: _prep(_manifest(t), t, f"embed.corpus={t}/nope.txt"),
        "error",
        ["nope.txt", "word2vec corpus not found", "sicot datasets fetch icons"],
    ),
    "word_corpus_a_folder": Case(
        lambda t, c: _prep(_manifest(t), t, f"embed.corpus={t}"),
        "error",
        ["is a directory, expected a text file of sentences"],
    ),
    "word_corpus_no_word": Case(
        _corpus(b"... !!\n\n  --\n"), "error", ["words.txt", "holds no word", "one sentence a line"]
    ),
    "word_corpus_not_utf8": Case(
        _corpus(b"red cat\nblue \xe9t\xe9\n"),
        "error",
        ["words.txt: not UTF-8 text (invalid continuation byte at byte 13, line 2); save it as UTF-8"],
    ),
    "word_corpus_and_pretrained": Case(
        lambda t, c: _corpus(b"red cat\n")(t, c) + [f"embed.pretrained={t}/v.txt"],
        "error",
        ["embed.pretrained loads word vectors and embed.corpus trains them", "set one of the two"],
    ),
    # recipes
    "recipe_wrong_type": Case(
        _recipe('[train]\nbatch_size = "eight"\n'), "error", ["r.toml", "train.batch_size must be an integer"]
    ),
    "recipe_utf16": Case(
        _recipe("[train]\nlr = 0.1\n".encode("utf-16")), "error", ["r.toml: UTF-16 text", "save it as UTF-8"]
    ),
    "recipe_list_for_number": Case(_recipe("[train]\nlr = [0.1]\n"), "error", ["r.toml", "train.lr must be a number"]),
    "recipe_binary_garbage": Case(_recipe(b"\x00\xff\xfe garbage"), "error", ["r.toml", "not UTF-8"]),
    "recipe_nesting_bomb": Case(
        _recipe("x = " + "[" * 100_000 + "]" * 100_000 + "\n"), "error", ["r.toml", "nested too deeply"]
    ),
    "recipe_nul_in_string": Case(
        _recipe('[data]\nout = "a\\u0000b.h5"\n'), "error", ["r.toml", "data.out contains a NUL character"]
    ),
    "recipe_name_with_path": Case(
        _recipe('name = "../../etc/x"\n'), "error", ["r.toml", "name must be a non-empty file-name part"]
    ),
    "recipe_code_is_not_run": Case(
        _recipe(PYTHON_IN_RECIPE), "error", ["data.image_size must be >= 8, got 2"], check=_no_marker("PWNED")
    ),
    # training settings
    "unknown_encoder": Case(_train("--encoder", "transformerXL"), "error", ["unknown encoder 'transformerXL'"]),
    # a name with bytes that are not UTF-8 (a lone surrogate here): prepare decoded every image and
    # crashed writing the file's attributes; report wrote half its files; export crashed in torch
    "non_utf8_prepare_out": Case(
        lambda t, c: _prep(_manifest(t), t) + ["--out", str(t / "p\udcff.h5")],
        "error",
        ["p\\xff.h5: not valid UTF-8 (argument out)", "rename it"],
    ),
    "non_utf8_override": Case(
        _train("data.out=x\udcff.h5"), "error", ["data.out=x\\xff.h5: not valid UTF-8 (argument overrides)"]
    ),
    "non_utf8_report_dir": Case(
        lambda t, c: ["report", str(shutil.copytree(c["run"], t / "run\udcff"))],
        "error",
        ["run\\xff: not valid UTF-8 (argument dirs)"],
        check=lambda t, c: _absent(t / "run\udcff" / "report.md"),
    ),
    "non_utf8_export_out": Case(
        lambda t, c: ["export", "--run", str(c["run"]), "--out", str(t / "m\udcfe.pt")],
        "error",
        ["m\\xfe.pt: not valid UTF-8 (argument out)"],
    ),
    "non_utf8_image_name_predicted_as_json": Case(  # the JSON held the raw bytes: not UTF-8, not JSON
        lambda t, c: ["predict", "--run", str(c["run"]), "--json", str(shutil.copy(c["image"], t / "a\udcff.png"))],
        "ok",
        ['"image": "', "a\\udcff.png"],
    ),
    "override_with_a_line_break": Case(  # the second key was dropped without a word
        _train("train.epochs=1\ntrain.lr=0.5"), "error", ["is more than one value (a line break inside the argument?)"]
    ),
    "shard_with_a_superscript_digit": Case(  # '²'.isdigit() is True: int() raised a traceback
        lambda t, c: ["prepare", "--out", str(t / "o.h5"), "--shard", "²/4"], "error", ["--shard '²/4': expected i/n"]
    ),
    "batch_size_zero": Case(_train("train.batch_size=0"), "error", ["train.batch_size must be >= 2, got 0"]),
    "batch_size_one": Case(  # crashed in batch normalisation, and left a run folder behind
        _train("train.batch_size=1"), "error", ["train.batch_size must be >= 2, got 1"], check=_folder_absent("run")
    ),
    "batch_size_negative": Case(_train("train.batch_size=-8"), "error", ["train.batch_size must be >= 2, got -8"]),
    "image_size_too_small_for_backbone": Case(
        _train("model.backbone=alexnet"),
        "error",
        ["model.backbone 'alexnet' cannot take 16x16 images", "data.image_size="],
    ),
    "image_size_not_the_vit_size": Case(
        _train("model.backbone=vit_b_16"), "error", ["model.backbone 'vit_b_16' cannot take 16x16 images", "224"]
    ),
    "unknown_backbone": Case(
        _train("model.backbone=resnet9000"), "error", ["resnet9000", "not a torchvision classification model"]
    ),
    "prepared_dataset_missing": Case(
        lambda t, c: ["train", "--data", str(t / "none.h5"), "--run-dir", str(t / "run"), *TRAIN_FAST],
        "error",
        ["none.h5", "not found"],
    ),
    # disks
    "readonly_output_directory": Case(
        lambda t, c: _prep(_manifest(t), Path(_readonly_dir(t))), "error", ["output directory"]
    ),
    "readonly_run_directory": Case(
        lambda t, c: _train(run=str(_readonly_dir(t) / "run"))(t, c), "error", ["output directory"]
    ),
    "disk_full_writing_prepared": Case(
        lambda t, c: _prep(_manifest(t), t),
        "error",
        ["o.h5: cannot write (No space left on device)"],
        check=_no_tmp_left,
    ),
    "disk_full_writing_checkpoint": Case(
        _train("model.encoder=none", "train.epochs=1"),
        "error",
        ["checkpoint-last.pt: cannot write (No space left on device)"],
        check=_no_tmp_left,
    ),
    # checkpoints and prepared files
    "checkpoint_truncated": Case(
        _damaged_checkpoint("truncated", "evaluate"),
        "error",
        ["checkpoint-last.pt: corrupt checkpoint", "sicot train --run-dir"],
    ),
    "checkpoint_bitflip_on_resume": Case(
        _damaged_checkpoint("bitflip", "train"), "error", ["checkpoint-last.pt: corrupt checkpoint (checksum mismatch"]
    ),
    "checkpoint_zero_byte": Case(
        _damaged_checkpoint("empty", "evaluate"), "error", ["checkpoint-last.pt: not a sicot checkpoint (empty file)"]
    ),
    "checkpoint_of_another_model_evaluate": Case(
        _damaged_checkpoint("other-model", "evaluate"), "error", ["checkpoint-last.pt: checkpoint of another model"]
    ),
    "checkpoint_of_another_model_resume": Case(
        _damaged_checkpoint("other-model", "train"), "error", ["checkpoint-last.pt: checkpoint of another model"]
    ),
    "checkpoint_with_code_in_pickle": Case(
        _damaged_checkpoint("pickle-payload", "evaluate"),
        "error",
        ["checkpoint-last.pt: unreadable checkpoint"],
        check=_no_marker("PWNED"),
    ),
    "prepared_truncated": Case(
        _damaged_prepared("truncated"),
        "error",
        ["p.h5: not a readable HDF5 file", "sicot prepare --recipe R (or --manifest M) --out"],
    ),
    "prepared_zero_byte": Case(
        _damaged_prepared("empty"),
        "error",
        ["p.h5: not a readable HDF5 file", "sicot prepare --recipe R (or --manifest M) --out"],
    ),
    "prepared_content_damaged": Case(
        _damaged_prepared("labels-changed"),
        "error",
        [
            "p.h5: corrupt prepared dataset (content checksum mismatch",
            "sicot prepare --recipe R (or --manifest M) --out",
        ],
    ),
    "prepared_unfinished": Case(
        _damaged_prepared("incomplete"),
        "error",
        ["p.h5: incomplete", "sicot prepare --recipe R (or --manifest M) --out"],
    ),
    "prepared_word_ids_out_of_range": Case(
        _damaged_prepared("tokens-out-of-range"),
        "error",
        ["p.h5: corrupt prepared dataset (word ids outside the vocabulary)"],
    ),
    # runs against another dataset, and other run commands
    "dataset_changed_resume": Case(_changed_dataset("train"), "error", ["use the dataset the run was trained on"]),
    "dataset_changed_evaluate": Case(_changed_dataset("evaluate"), "error", ["use the dataset the run was trained on"]),
    "dataset_changed_predict": Case(_changed_dataset("predict"), "error", ["use the dataset the run was trained on"]),
    "evaluate_empty_checkpoint": Case(
        lambda t, c: ["evaluate", "--run", str(_copy_run(t, c)), "--checkpoint", ""],
        "error",
        ["--checkpoint must be last or best, got ''"],
    ),
    "predict_empty_checkpoint": Case(
        lambda t, c: ["predict", "--run", str(_copy_run(t, c)), "--checkpoint", "", str(c["image"])],
        "error",
        ["--checkpoint must be last or best, got ''"],
    ),
    "predict_corrupt_image": Case(
        lambda t, c: (
            (t / "q.jpg").write_bytes(b"\xff\xd8\xff garbage")
            and []
            or ["predict", "--run", str(_copy_run(t, c)), str(t / "q.jpg")]
        ),
        "error",
        ["q.jpg: not an image file"],
    ),
    "predict_image_is_a_symlink_loop": Case(
        lambda t, c: ["predict", "--run", str(_copy_run(t, c)), str(_link_loop(t, "q.png"))],
        "error",
        ["q.png: image path is a symbolic link loop"],
    ),
    "recipe_is_a_symlink_loop": Case(
        lambda t, c: ["train", "--recipe", str(_link_loop(t, "r.toml"))],
        "error",
        ["r.toml: a symbolic link loop (it leads back to itself); point it at a file"],
    ),
    **{
        f"predict_{name}": Case(
            lambda t, c, v=value: ["predict", "--run", str(_copy_run(t, c)), "--", v(t) if callable(v) else v],
            "error",
            needles,
        )
        for name, value, needles in (
            ("url", "https://example.com/a.png", ["a URL; predict reads local image files: download the image first"]),
            ("stdin", "-", ["-: standard input is not read; save the image to a file"]),
            ("folder", lambda t: str(t), ["image path is a directory (name its images, e.g. "]),
        )
    },
    "evaluate_run_stopped_before_its_first_checkpoint": Case(
        lambda t, c: (
            ((run := _copy_run(t, c, unfinished=True)) / runs.LAST).unlink()  # and no epoch recorded either
            or (run / runs.METRICS).unlink()
            or ["evaluate", "--run", str(run)]
        ),
        "error",
        ["checkpoint-last.pt: not found: the run saved no checkpoint yet", "sicot train --run-dir"],
    ),
    "evaluate_checkpoint_is_a_directory": Case(
        lambda t, c: (
            ((run := _copy_run(t, c)) / runs.LAST).unlink(),
            (run / runs.LAST).mkdir(),
            ["evaluate", "--run", str(run)],
        )[-1],
        "error",
        ["checkpoint-last.pt: not a checkpoint file (a directory or special file stands in its place)"],
    ),
    "evaluate_data_of_another_tool": Case(
        lambda t, c: (
            h5py.File(t / "theirs.h5", "w").close(),
            ["evaluate", "--run", str(_copy_run(t, c)), "--data", str(t / "theirs.h5")],
        )[-1],
        "error",
        ["theirs.h5: not a sicot prepared dataset (an HDF5 file without sicot's format mark): give the .h5"],
    ),
    "predict_missing_image": Case(
        lambda t, c: ["predict", "--run", str(_copy_run(t, c)), str(t / "gone.png")],
        "error",
        ["gone.png: image file not found"],
    ),
    "evaluate_not_a_run": Case(lambda t, c: ["evaluate", "--run", str(t)], "error", ["not a run directory"]),
    "evaluate_unknown_checkpoint_name": Case(
        lambda t, c: ["evaluate", "--run", str(_copy_run(t, c)), "--checkpoint", "final"],
        "error",
        ["--checkpoint must be last or best"],
    ),
    "ablate_seeds_python_only_spellings": Case(  # int() took "1_0" as 10 and "٣" as 3
        lambda t, c: ["ablate", "--seeds", "0,1_0,٣", "--out", str(t / "abl")],
        "error",
        ["--seeds must be comma-separated integers (digits 0-9)"],
    ),
    "ablate_seeds_not_integers": Case(
        lambda t, c: ["ablate", "--seeds", "1,two", "--out", str(t / "abl")],
        "error",
        ["--seeds must be comma-separated integers"],
    ),
    # --- round 2 (issue 15) ---
    # 1. text from data and paths printed as markup or raw control characters
    "markup_and_escapes_in_labels_predict": Case(
        lambda t, c: ["predict", "--run", str(_evil_run(c)), str(c["image"])],
        "ok",
        ["cat[/]", "\\u001b]0;owned\\u0007", "\\u202e[bold]"],
    ),
    "markup_and_escapes_in_labels_predict_json": Case(
        lambda t, c: ["predict", "--json", "--run", str(_evil_run(c)), str(c["image"])],
        "ok",
        ["cat[/]\\u001b]0;owned\\u0007", "\\u202e"],
    ),
    "markup_and_escapes_in_labels_evaluate": Case(
        lambda t, c: ["evaluate", "--run", str(_evil_run(c))], "ok", ["top-1"]
    ),
    "markup_and_escapes_in_run_path_evaluate": Case(
        lambda t, c: ["evaluate", "--run", str(shutil.copytree(c["run"], t / f"r{EVIL}"))],
        "ok",
        ["r[/]\\u001b]0;owned"],
    ),
    "markup_in_manifest_path_prepare_summary": Case(
        lambda t, c: _prep(make_manifest(t / f"raw{EVIL}", per_class=6, extra_rows=[_row(f"gone{EVIL}.png", "x1")]), t),
        "skip",
        ["image file not found"],
    ),
    "markup_and_escapes_in_labels_prepare": Case(
        lambda t, c: _prep(
            _manifest(t, _row("cat0.png", "x1", label=f"cat{EVIL}"), _row("cat1.png", "x2", label=f"cat{EVIL}")), t
        ),
        "kept",
        check=_kept("x1"),
    ),
    "escape_sequence_in_error_line": Case(
        lambda t, c: ["evaluate", "--run", str(t / f"nowhere{EVIL}")], "error", ["nowhere[/]\\u001b]0;owned\\u0007"]
    ),
    # 2. special files: only regular files are read (a FIFO would block, /dev/zero never ends)
    **{
        f"{kind}_as_{what}": Case(
            _special_input(kind, what),
            "skip" if what == "image_row" else "error",
            ["image path is not a regular file (a FIFO, socket or device)"]
            if what == "image_row"
            else ["not a regular file"],
        )
        for kind in ("fifo", "device")
        for what in ("manifest", "recipe", "tokenize", "predict", "pretrained", "word_vectors", "titles", "image_row")
    },
    # 4. run directories checked against a schema (one message naming the file and the field)
    "run_config_empty_object": Case(
        _run_file(runs.CONFIG, "{}", "evaluate"), "error", ["config.json: field recipe: Field required"]
    ),
    "run_config_a_list": Case(
        _run_file(runs.CONFIG, "[]", "evaluate"), "error", ["config.json: field (the whole file)"]
    ),
    "run_config_wrong_type": Case(
        _run_file(runs.CONFIG, _set("dataset.classes", "3"), "evaluate"),
        "error",
        ["config.json: field dataset.classes: Input should be a valid integer"],
    ),
    "run_config_missing_encoder": Case(
        _run_file(runs.CONFIG, _drop("encoder")), "error", ["config.json: field encoder: Field required"]
    ),
    "run_config_recipe_bad_value": Case(
        _run_file(runs.CONFIG, _set("recipe.train.seed", -5), "evaluate"),
        "error",
        ["config.json, field recipe: train.seed must be >= 0"],
    ),
    "run_config_nesting_bomb": Case(
        _run_file(runs.CONFIG, "[" * 100_000 + "]" * 100_000, "evaluate"),
        "error",
        ["config.json: unreadable run config"],
    ),
    "run_summary_a_list": Case(_run_file(runs.SUMMARY, "[]"), "error", ["summary.json: field (the whole file)"]),
    "run_summary_metric_not_a_number": Case(
        _run_file(runs.SUMMARY, _set("final.top1", "high")),
        "error",
        ["summary.json: field final: Value error, top1 must be a number or null"],
    ),
    "run_summary_accuracy_nan": Case(
        _run_file(runs.SUMMARY, _set("final.top1", float("nan"))),
        "error",
        ["summary.json: field final: Value error, top1 must be an accuracy in % (0 to 100), got nan"],
    ),
    "run_summary_accuracy_over_100": Case(
        _run_file(runs.SUMMARY, _set("final.tail_top1", 150.0)),
        "error",
        ["summary.json: field final: Value error, tail_top1 must be an accuracy in % (0 to 100), got 150.0"],
    ),
    "export_onnx_name_for_torchscript": Case(
        lambda t, c: ["export", "--run", str(_copy_run(t, c)), "--out", str(t / "m.onnx"), "--format", "torchscript"],
        "error",
        ["m.onnx: an .onnx name for a TorchScript file; name it .pt, or use --format onnx"],
        check=_holds(lambda t, c: not (t / "m.onnx").exists()),
    ),
    "import_out_double_suffix": Case(
        lambda t, c: _out_replaced(_imaterialist()(t, c), str(t / "m.csv.gz")),
        "error",
        ["m.csv.gz: the manifest is written as CSV; name it .csv (e.g. m.csv)"],
    ),
    "run_predictions_truncated_in_a_one_run_report": Case(
        _run_file(runs.PREDICTIONS, 900),
        "ok",
        ["predictions.h5: unreadable predictions (OSError): the most confused class pairs leave this run out"],
    ),
    "run_metrics_not_utf8": Case(
        _run_file(runs.METRICS, b'{"epoch": 1, "loss": "\xff\xfe"}\n{"epoch": 1}\n'),
        "error",
        ["metrics.jsonl:1: not a JSON line"],
    ),
    "run_metrics_metric_not_a_number": Case(
        _run_file(runs.METRICS, '{"epoch": 1, "top1": "x"}\n{"epoch": 2}\n'),
        "error",
        ["metrics.jsonl:1: top1 must be a number"],
    ),
    "run_predictions_with_a_label_out_of_range": Case(  # accepted: CI [-11.67, +0.00] against a gain of +1.67
        _edited_predictions(lambda f, _: f["labels"].write_direct(np.full(f["labels"].shape, -5, f["labels"].dtype))),
        "error",
        ["enc/predictions.h5: field labels: class -5 outside the run's 3 classes", "damaged run file"],
    ),
    "run_predictions_of_another_run": Case(  # a CI that excluded its own point estimate
        _edited_predictions(_other_top1),
        "error",
        ["enc/predictions.h5: top-1", "in summary.json: the two files are not one run's"],
    ),
    "run_predictions_of_another_run_top3": Case(  # top-1 kept, top-3 not the summary's: a CI beside its estimate
        _edited_predictions(
            lambda f, top1: f["topk_labels"].write_direct(np.repeat(f["topk_labels"][:, :1], 3, axis=1))
        ),
        "error",
        ["enc/predictions.h5: top-3", "in summary.json: the two files are not one run's"],
    ),
    "run_predictions_truncated": Case(_truncated_predictions, "error", ["enc/predictions.h5: unreadable predictions"]),
    "run_predictions_deleted": Case(
        _deleted_predictions, "error", ["enc/predictions.h5: missing, though the run finished", "leave the run out"]
    ),
    # 5. recipe values with bounds next to each field; divergence caught at the step
    "seed_negative": Case(_train("train.seed=-1"), "error", ["train.seed must be >= 0, got -1"]),
    "split_seed_over_2_64": Case(
        lambda t, c: _prep(_manifest(t), t, f"data.split_seed={2**64 + 1}"),
        "error",
        ["data.split_seed must be <= 9223372036854775807"],
    ),
    "weight_decay_huge_negative": Case(
        _train("train.weight_decay=-1e30"), "error", ["train.weight_decay must be >= 0, got -1e+30"]
    ),
    "max_title_tokens_petabytes": Case(
        lambda t, c: _prep(_manifest(t), t, "data.max_title_tokens=100000000000000"),
        "error",
        ["data.max_title_tokens must be <= 4096"],
    ),
    "momentum_nan": Case(_train("train.momentum=nan"), "error", ["train.momentum must be a finite number, got nan"]),
    "lr_inf": Case(_train("train.lr=inf"), "error", ["train.lr must be a finite number, got inf"]),
    "lr_above_its_bound": Case(_train("train.lr=1e30"), "error", ["train.lr must be <= 100, got 1e+30"]),
    # 6. options out of range
    "predict_top_negative": Case(
        lambda t, c: ["predict", "--run", str(_copy_run(t, c)), "--top", "-2", str(c["image"])],
        "error",
        ["--top must be >= 1, got -2"],
    ),
    "predict_top_zero": Case(
        lambda t, c: ["predict", "--run", str(_copy_run(t, c)), "--top", "0", str(c["image"])],
        "error",
        ["--top must be >= 1, got 0"],
    ),
    "evaluate_device_tpu": Case(
        lambda t, c: ["evaluate", "--run", str(_copy_run(t, c)), "--device", "tpu"],
        "error",
        ["--device must be auto, cpu, cuda or cuda:N, got 'tpu'"],
    ),
    "evaluate_device_gpu": Case(
        lambda t, c: ["evaluate", "--run", str(_copy_run(t, c)), "--device", "gpu"],
        "error",
        ["--device must be auto, cpu, cuda or cuda:N, got 'gpu'"],
    ),
    "evaluate_device_cuda_index_out_of_range": Case(
        lambda t, c: ["evaluate", "--run", str(_copy_run(t, c)), "--device", "cuda:99"],
        "error",
        ["--device = 'cuda:99' but"],
    ),
    # a dangling symbolic link as the output: taken (exists() follows it and said no, and the
    # rename replaced the link without --force)
    "prepare_out_dangling_symlink": Case(
        lambda t, c: _out_replaced(_prep(_manifest(t), t), str(_dangling(t / "o.h5"))),
        "error",
        ["o.h5: already exists (pass --force"],
        check=_holds(lambda t, c: (t / "o.h5").is_symlink() and not (t / "o.recipe.json").exists()),
    ),
    "embed_out_dangling_symlink": Case(
        lambda t, c: ["embed", "--manifest", str(_manifest(t)), "--out", str(_dangling(t / "v.txt")), *KEEP_ALL],
        "error",
        ["v.txt: already exists"],
        check=_holds(lambda t, c: (t / "v.txt").is_symlink()),
    ),
    "export_out_dangling_symlink": Case(
        _export(lambda t: _dangling(t / "m.pt")), "error", ["m.pt: already exists (choose another --out)"]
    ),
    "import_out_dangling_symlink": Case(
        lambda t, c: _out_replaced(_imaterialist()(t, c), str(_dangling(t / "m2.csv"))),
        "error",
        ["m2.csv: already exists; pass --force"],
        check=_holds(lambda t, c: (t / "m2.csv").is_symlink()),
    ),
    "export_into_missing_folder": Case(_export(lambda t: t / "new" / "dir" / "m.pt"), "ok", ["wrote"], check=_exported),
    "export_file_name_too_long": Case(_export(lambda t: t / f"{LONG}.pt"), "error", ["file name too long"]),
    "prepare_out_is_an_image": Case(
        lambda t, c: ["prepare", "--manifest", str(m := _manifest(t)), "--out", str(m.parent / "cat0.png"), *KEEP_ALL],
        "error",
        ["cat0.png: is a file; --out names the .h5 file to write (e.g. ", "cat0.h5) or a folder"],
        check=_holds(lambda t, c: (t / "raw" / "cat0.png").read_bytes().startswith(b"\x89PNG")),
    ),
    "prepare_out_named_only_the_extension": Case(
        lambda t, c: ["prepare", "--manifest", str(_manifest(t)), "--out", str(t / ".h5"), *KEEP_ALL],
        "error",
        [".h5: a file name needs a name before .h5; --out names the .h5 file (e.g. data.h5)"],
        check=_holds(lambda t, c: not (t / ".h5").exists()),
    ),
    "prepare_out_file_name_too_long": Case(
        lambda t, c: _prep(_manifest(t), t)[: -1 - len(KEEP_ALL)] + [str(t / f"{LONG}.h5"), *KEEP_ALL],
        "error",
        ["file name too long"],
    ),
    "train_run_dir_name_too_long": Case(_train(run=LONG), "error", ["file name too long"]),
    # 7. tampered prepared files: every attribute that changes a result is covered
    "prepared_n_train_minus_two": Case(
        _tampered("n_train", lambda v, n: v - 2), "error", ["p.h5: corrupt prepared dataset (content checksum mismatch"]
    ),
    "prepared_n_train_all_rows": Case(
        _tampered("n_train", lambda v, n: n), "error", ["p.h5: corrupt prepared dataset"]
    ),
    "prepared_head_threshold_changed": Case(
        _tampered("head_threshold", lambda v, n: v + 5),
        "error",
        ["p.h5: corrupt prepared dataset (content checksum mismatch"],
    ),
    "prepared_legacy_checksum_n_train_changed": Case(
        _tampered("n_train", lambda v, n: v - 2, legacy=True),
        "error",
        ["p.h5: corrupt prepared dataset (n_train 22 / n_val 0 disagree with the recorded train/test counts"],
    ),
    # 8. importers
    "import_titles_json_nesting_bomb_and_huge_int": Case(
        _imaterialist(
            titles="[" * 100_000
            + "]" * 100_000
            + "\n"
            + "1" * 5000
            + "\n"
            + '{"id": "train000ab.jpg", "title": "red cup"}\n'
        ),
        "ok",
        ["titles file: bad line", "2"],
        check=_imported(("train000ab.jpg", "red cup")),
    ),
    "import_annotations_nesting_bomb": Case(
        _imaterialist(train_json='{"images": ' + "[" * 100_000 + "]" * 100_000 + "}"),
        "error",
        ["train.json: not valid JSON (nested too deeply)"],
    ),
    "import_annotations_5000_digit_integer": Case(
        _imaterialist(train_json='{"images": [{"id": "a.jpg", "class": ' + "9" * 5000 + "}]}"),
        "error",
        ["train.json: not valid JSON"],
    ),
    "import_filelist_unicode_digit_class": Case(
        _webvision(filelist="google/q0001/000000.jpg \u00b2\n"),
        "error",
        ["train_filelist_google.txt:1: expected '<image path> <class>' (the class in ASCII digits)"],
    ),
    "import_meta_nesting_bomb": Case(
        _webvision(meta="[" * 100_000 + "]" * 100_000), "error", ["q0001.json: not valid JSON (nested too deeply)"]
    ),
    "import_annotations_odd_entries": Case(
        _imaterialist(
            train_json=json.dumps(
                {
                    "images": [
                        {"id": "train000ab.jpg", "class": "01"},  # the integer 1, as written by hand
                        {"id": "b.jpg", "class": True},
                        {"id": "c.jpg", "class": "cup"},
                        {"id": "", "class": 3},
                        {"id": "../../../etc/passwd", "class": 1},
                    ]
                }
            )
        ),
        "ok",
        ["train.json: entry whose class is not an integer", "train.json: entry whose id is not a file name"],
        check=_imported(("train000ab.jpg", "red cup"), labels=("1",)),
    ),
    "import_out_not_csv": Case(
        lambda t, c: _out_replaced(_imaterialist()(t, c), str(t / "m.jsonl")),
        "error",
        ["m.jsonl: the manifest is written as CSV; name it .csv (e.g. m.csv)"],
        check=_holds(lambda t, c: not (t / "m.jsonl").exists()),
    ),
    "import_synsets_duplicate_name": Case(
        lambda t, c: [_webvision()(t, c), _lines(t / "wv" / "info" / "synsets.txt", "crane\ncrane\n")][0],
        "error",
        ["synsets.txt:2: names class 1 'crane', as line 1 names class 0: each line must name its class distinctly"],
    ),
    "import_meta_title_nested_deep": Case(
        _webvision(meta='[{"id": "0", "title": ' + "[" * 400 + '"x"' + "]" * 400 + "}]"),
        "ok",
        ["empty title"],
    ),
    # 9. manifests read strictly
    "manifest_duplicate_header_column": Case(
        lambda t, c: _prep(_lines(t / "m.csv", "image,title,label,label\na.png,red cat,cat,dog\n"), t),
        "error",
        ["m.csv: column 'label' appears twice in the header"],
    ),
    # a bare CR inside an unquoted field ended the record there: two short rows ("wrong number of
    # fields" twice); one row skipped for what it is. Quoted, a CR is the title's own.
    "manifest_bare_cr_in_unquoted_title": Case(_bare_cr(quoted=False), "skip", ["line break inside an unquoted field"]),
    "manifest_bare_cr_in_tsv_title": Case(
        _bare_cr(quoted=False, fmt="tsv"), "skip", ["line break inside an unquoted field"]
    ),
    "manifest_bare_cr_in_quoted_title": Case(_bare_cr(quoted=True), "kept", check=_title_kept("x1", "red\rcat toy")),
    # an error names what the user typed: their override (not the --manifest's name= before it), an option
    "override_name_after_manifest": Case(
        lambda t, c: [*_prep(_manifest(t), t), "name=a/b"], "error", ["override 'name=a/b': name must be"]
    ),
    "workers_option_out_of_range": Case(
        lambda t, c: [*(a for a in _prep(_manifest(t), t) if a != "data.workers=1"), "--workers", "99999999999"],
        "error",
        ["--workers 99999999999: data.workers must be <= 4096, got 99999999999"],
    ),
    "manifest_file_name_not_a_name": Case(
        lambda t, c: _prep(_lines(t / "m\x01.csv", "image,title,label\na.png,red cat,cat\n"), t),
        "error",
        ["--manifest ", "m\\u0001.csv: name must be a non-empty file-name part"],
    ),
    "manifest_unterminated_quote": Case(_stray_quote, "error", ["m.csv: line 2: malformed CSV"]),
    "manifest_mixed_ids": Case(
        lambda t, c: _prep(
            _lines(t / "raw" / "m.csv", "image,title,label,id\ncat0.png,red cat,cat,3\ncat1.png,red cat,cat,\n"), t
        ),
        "error",
        ["m.csv:3: no id, but other rows have one"],
    ),
    "tsv_title_with_inch_mark": Case(_tsv, "kept", check=_title_kept("x1", '12" red cat toy')),
    "jsonl_label_7_and_7_0_are_one_class": Case(
        lambda t, c: _prep(_jsonl(t, [_row(f"cat{i}.png", f"s{i}", label=7 if i % 2 else 7.0) for i in range(6)]), t),
        "kept",
        check=_one_class_for_7,
    ),
    "jsonl_label_nan": Case(
        lambda t, c: _prep(_jsonl(t, ['{"image": "cat0.png", "title": "red cat", "label": NaN, "id": "x1"}']), t),
        "skip",
        ["label is not text or a finite number"],
    ),
    "jsonl_key_twice": Case(
        lambda t, c: _prep(
            _jsonl(t, ['{"image": "cat0.png", "title": "red cat", "label": "cat", "label": "dog", "id": "x1"}']), t
        ),
        "skip",
        ["JSON object names a key twice"],
    ),
    "jpeg_exif_orientation": Case(_with_image(_exif_rotated, "rotated.jpg"), "kept", check=_upright_kept),
    # --- round 3 (an outside audit, 2026-12-03) ---
    "train_run_dir_is_a_file": Case(
        lambda t, c: [_lines(t / "notes.txt", "mine"), _train(run="notes.txt")(t, c)][1],
        "error",
        ["notes.txt: exists and is not a directory"],
        check=_unchanged("notes.txt", "mine"),
    ),
    "decouple_run_dir_is_a_file": Case(
        lambda t, c: [
            _lines(t / "notes.txt", "mine"),
            ["decouple", str(_copy_run(t, c)), "--run-dir", str(t / "notes.txt")],
        ][1],
        "error",
        ["notes.txt: exists and is not a directory"],
        check=_unchanged("notes.txt", "mine"),
    ),
    "train_resume_a_folder_that_is_no_run": Case(
        lambda t, c: [_lines(t / "mine" / "metrics.jsonl", "my log\n"), _train("--resume", run="mine")(t, c)][1],
        "error",
        ["mine: not a run directory (no config.json), nothing to resume"],
        check=_holds(
            lambda t, c: (
                sorted(p.name for p in (t / "mine").iterdir()) == ["metrics.jsonl"]
                and _unchanged("mine/metrics.jsonl", "my log\n")(t, c)
            )
        ),
    ),
    "train_resume_an_empty_folder_starts_it": Case(
        lambda t, c: [
            (t / "empty").mkdir(),
            _train("--resume", "model.encoder=none", "train.epochs=1", run="empty")(t, c),
        ][1],
        "ok",
        ["nothing to resume (no run here yet): starting it"],
        check=_holds(lambda t, c: runs.is_finished(t / "empty")),
    ),
    "override_replaces_a_whole_table": Case(
        _train("train={}"), "error", ["override 'train={}': train is a table", "train.epochs="]
    ),
    "ablate_seed_negative": Case(
        lambda t, c: _ablate(t, c, "--seeds", "-1"),
        "error",
        ["--seeds must be integers from 0 to 9223372036854775807, got -1"],
        check=_holds(lambda t, c: not (t / "abl").exists()),
    ),
    "ablate_seed_past_2_63": Case(
        lambda t, c: _ablate(t, c, "--seeds", str(10**22)), "error", ["--seeds must be integers from 0 to"]
    ),
    "ablate_seed_twice": Case(lambda t, c: _ablate(t, c, "--seeds", "0,0"), "error", ["--seeds names 0 twice"]),
    "ablate_seeds_empty": Case(  # was the recipe's seed, without a word
        lambda t, c: _ablate(t, c, "--seeds", ""), "error", ["--seeds names nothing ('')"]
    ),
    "ablate_encoders_only_commas": Case(
        lambda t, c: _ablate(t, c, "--encoders", ","), "error", ["--encoders names nothing"]
    ),
    "ablate_encoders_twice": Case(
        lambda t, c: _ablate(t, c, "--encoders", "mean,mean"), "error", ["--encoders names mean twice"]
    ),
    "ablate_table_encoder_not_trained": Case(
        lambda t, c: _ablate(t, c, "--encoder", "bogus"), "error", ["--encoder 'bogus' is not among the encoders"]
    ),
    "ablate_seeds_empty_item": Case(
        lambda t, c: _ablate(t, c, "--seeds", "0,,1"), "error", ["--seeds has an empty item ('0,,1')"]
    ),
    "ablate_presets_twice": Case(
        lambda t, c: _ablate(t, c, "--presets", "sicot,sicot"), "error", ["--presets names sicot twice"]
    ),
    "report_same_run_twice": Case(
        lambda t, c: ["report", str(_copy_run(t, c)), str(t / "." / "run"), "--no-figures"],
        "error",
        ["the same run is given twice"],
    ),
    "train_resume_keeps_a_users_tmp_named_file": Case(
        lambda t, c: [
            _lines(t / "mine" / ".notes.tmp-999999999", "mine"),
            _train("--resume", run="mine")(t, c),
        ][1],
        "error",
        ["mine: not a run directory (no config.json), nothing to resume"],
        check=_unchanged("mine/.notes.tmp-999999999", "mine"),
    ),
    "import_out_is_its_own_titles_file_even_with_force": Case(
        lambda t, c: [*_imaterialist()(t, c)[:-1], str(t / "t.jsonl"), "--force"],
        "error",
        ["t.jsonl: is one of this command's inputs"],
        check=_unchanged("t.jsonl", '{"id": "train000ab.jpg", "title": "red cup"}\n'),
    ),
    "data_is_the_current_folder": Case(
        lambda t, c: ["evaluate", "--run", str(_copy_run(t, c)), "--data", "."],
        "error",
        [".: not a regular file", "a prepared dataset is an .h5 file"],
    ),
    "data_is_a_manifest_gets_no_rebuild_command": Case(
        lambda t, c: ["tokenize", "--data", str(_manifest(t)), "red"],
        "error",
        ["m.csv: not a readable HDF5 file", "--data names a prepared dataset"],
        check=_holds(lambda t, c: (t / "raw" / "m.csv").read_text(encoding="utf-8").startswith("image,")),
    ),
    "export_out_is_a_folder": Case(
        lambda t, c: ["export", "--run", str(_copy_run(t, c)), "--out", ""],
        "error",
        [".: is a folder; --out names the model file to write"],
    ),
    "decouple_unknown_method": Case(
        lambda t, c: ["decouple", str(_copy_run(t, c)), "--method", "bogus", "--run-dir", str(t / "x")],
        "error",
        ["--method must be one of crt, lws, tau_norm, logit_adjust, got 'bogus'"],
        check=_holds(lambda t, c: not (t / "x").exists()),
    ),
    "decouple_resume_names_a_training_run": Case(
        lambda t, c: ["decouple", str(_copy_run(t, c)), "--method", "crt", "--run-dir", str(t / "run"), "--resume"],
        "error",
        ["run: holds a training run (`sicot train`), not a second stage", "choose a new --run-dir"],
        check=_holds(lambda t, c: "stage" not in json.loads((t / "run" / "config.json").read_text(encoding="utf-8"))),
    ),
    "export_out_names_a_new_folder": Case(  # Path("new/") is Path("new"): a FILE named new would be written
        lambda t, c: ["export", "--run", str(_copy_run(t, c)), "--out", f"{t / 'new'}/"],
        "error",
        ["new/: is a folder; --out names the model file to write", "new/model.onnx"],
        check=_holds(lambda t, c: not (t / "new").exists()),
    ),
    "embed_out_names_a_new_folder": Case(
        lambda t, c: ["embed", "--manifest", str(_manifest(t)), "--out", f"{t / 'vecs'}/", *KEEP_ALL],
        "error",
        ["vecs/: is a folder; --out names the vectors file to write"],
        check=_holds(lambda t, c: not (t / "vecs").exists()),
    ),
    "webvision_out_names_a_new_folder": Case(
        lambda t, c: _out_replaced(_webvision()(t, c), f"{t / 'out'}/"),
        "error",
        ["out/: is a folder; --out names the manifest to write"],
        check=_holds(lambda t, c: not (t / "out").exists()),
    ),
    "tokenize_workers_negative": Case(
        lambda t, c: ["tokenize", "--workers", "-5", "red cat"],
        "error",
        ["--workers must be 0..4096 (0 = all cores), got -5"],
    ),
    "embed_out_into_missing_folder": Case(
        lambda t, c: ["embed", "--manifest", str(_manifest(t)), "--out", str(t / "new" / "dir" / "v.txt"), *KEEP_ALL],
        "ok",
        ["saved"],
        check=_holds(lambda t, c: (t / "new" / "dir" / "v.txt").read_text(encoding="utf-8").split()[1] == "8"),
    ),
    "embed_out_in_unwritable_folder": Case(
        lambda t, c: ["embed", "--manifest", str(_manifest(t)), "--out", str(_readonly_dir(t) / "v.txt"), *KEEP_ALL],
        "error",
        ["output directory"],
    ),
    "embed_neighbours_top_zero": Case(
        lambda t, c: ["embed", "--data", str(c["prepared"]), "--neighbours", "red", "--top", "0"],
        "error",
        ["--top must be >= 1, got 0"],
    ),
    "predict_threads_huge": Case(
        lambda t, c: ["predict", "--run", str(_copy_run(t, c)), "--threads", "100000", str(c["image"])],
        "error",
        ["--threads must be 0..1024 (0 = auto), got 100000"],
    ),
    "evaluate_threads_negative": Case(
        lambda t, c: ["evaluate", "--run", str(_copy_run(t, c)), "--threads", "-3"],
        "error",
        ["--threads must be 0..1024 (0 = auto), got -3"],
    ),
    "import_out_is_an_existing_file": Case(
        lambda t, c: [_lines(t / "m.csv", "mine"), _imaterialist()(t, c)][1],
        "error",
        ["m.csv: already exists; pass --force to replace it"],
        check=_unchanged("m.csv", "mine"),
    ),
    "manifest_one_class": Case(
        lambda t, c: _prep(_lines(t / "raw" / "one.csv", _one_class_csv(t)), t),
        "error",
        ["only one class has training images ('cat')", "check the label column"],
    ),
    "manifest_split_column_all_train": Case(
        lambda t, c: _prep(_all_train(t), t),
        "ok",
        ["no test row (every row is train or val): `sicot train` will refuse"],
    ),
    "manifest_same_image_in_train_and_test_rows": Case(
        lambda t, c: _prep(
            make_manifest(t / "raw", per_class=6, split=True, extra_rows=[_row("cat0.png", "x1", split="train")]), t
        ),
        "skip",
        ["test image also in a training or validation row (the same file)"],
    ),
    "manifest_label_nfc_and_nfd_are_one_class": Case(
        lambda t, c: _prep(
            _manifest(
                t,
                _row("cat0.png", "x1", label=unicodedata.normalize("NFC", "café")),
                _row("cat1.png", "x2", label=unicodedata.normalize("NFD", "café")),
            ),
            t,
        ),
        "kept",
        check=_one_cafe_class,
    ),
    "tokenize_file_not_utf8": Case(
        lambda t, c: ["tokenize", "-f", str(_bytes(t / "latin1.txt", "café red\n".encode("latin-1")))],
        "error",
        ["latin1.txt: not UTF-8 text", "save it as UTF-8"],
    ),
    "report_unknown_encoder": Case(
        lambda t, c: ["report", str(_copy_run(t, c)), "--encoder", "bogus", "--no-figures"],
        "error",
        ["--encoder 'bogus': no run of it here (encoders: none)"],
    ),
    "report_unknown_class_writes_nothing": Case(
        lambda t, c: ["report", str(_bilinear_run(t, c)), "--class", "nonexist", "--no-figures"],
        "error",
        ["class 'nonexist'"],
        check=_holds(lambda t, c: not list((t / "run").glob("report.*"))),
    ),
    "fetch_negative_test_per_class_downloads_nothing": Case(
        lambda t, c: ["datasets", "fetch", "mdi", "--test-per-class", "-1", "--dir", str(t / "mdi")],
        "error",
        ["--test-per-class must be >= 0, got -1"],
        check=_holds(lambda t, c: not (t / "mdi").exists()),
    ),
    "serve_max_upload_zero_names_the_flag": Case(
        lambda t, c: ["serve", "--run", str(_copy_run(t, c)), "--max-upload-mb", "0"],
        "error",
        ["--max-upload-mb must be between 0.000001 and 100000 (MB), got 0.0"],
    ),
    **{
        f"serve_max_upload_{name}": Case(
            lambda t, c, v=value: ["serve", "--run", str(_copy_run(t, c)), "--max-upload-mb", v],
            "error",
            [f"--max-upload-mb must be between 0.000001 and 100000 (MB), got {value}"],
        )
        for name, value in (("inf", "inf"), ("nan", "nan"))
    },
    # --- round 7 (a seventh outside audit) ---
    "train_topk_without_1": Case(  # was a KeyError 'val_top1' after epoch 1
        _train("train.topk=[3]"),
        "error",
        ["train.topk must include 1 (top-1 is always reported, and checkpoint-best is chosen on it), got [3]"],
        check=_holds(lambda t, c: not (t / "run").exists()),
    ),
    "export_file_named_dot_json": Case(  # Path(".json").suffix is "": it was taken for a model name
        lambda t, c: ["export", "--run", str(_copy_run(t, c)), "--out", str(t / "ex" / ".json")],
        "error",
        [".json: the model file cannot be a .json"],
        check=_holds(lambda t, c: not (t / "ex").exists()),
    ),
    **{
        f"run_config_encoder_contradicts_its_recipe_{command}": Case(  # was read as either, silently
            _run_file(runs.CONFIG, _set("encoder", "bilinear"), command),
            "error",
            ["config.json: field recipe.model.encoder is 'none', but field encoder is 'bilinear'", "hand-edited"],
        )
        for command in ("evaluate", "report")
    },
    **{
        f"prepare_data_out_{name}": Case(  # the checks of --out were not applied to data.out
            lambda t, c, value=value: [
                "prepare",
                "--manifest",
                str(_manifest(t)),
                *KEEP_ALL,
                "--force",
                f"data.out={value}",
            ],
            "error",
            [needle],
        )
        for name, value, needle in (
            ("empty", "", "data.out = '': names a folder"),  # ValueError: PosixPath('.') has an empty name
            ("dot", ".", "data.out = '.': names a folder"),
            ("trailing_slash", "newfolder/", "names a folder"),  # wrote a FILE named newfolder
            ("bare_h5", "sub/.h5", "needs a name before .h5"),  # wrote a hidden sub/.h5
            ("not_h5", "photo.png", "not an .h5 name"),  # with --force: a user's photo.png replaced
        )
    },
    "prepare_out_is_a_fifo": Case(  # h5py opened the pipe to restore its side file and blocked for ever
        lambda t, c: [
            os.mkfifo(t / "f.h5"),
            ["prepare", "--manifest", str(_manifest(t)), "--out", str(t / "f.h5"), *KEEP_ALL],
        ][1],
        "error",
        ["f.h5: exists and is not a regular file"],
    ),
    "prepare_out_with_a_trailing_slash_is_a_folder": Case(  # wrote a FILE named y.h5
        lambda t, c: ["prepare", "--manifest", str(_manifest(t)), "--out", f"{t / 'y.h5'}/", *KEEP_ALL],
        "ok",
        check=_holds(lambda t, c: (t / "y.h5" / "m.h5").is_file()),
    ),
    "ablate_out_a_folder_of_other_files": Case(  # ablation.json was written among the user's files
        lambda t, c: [_bytes((t / "abl").mkdir() or t / "abl" / "notes.txt", b"mine"), _ablate(t, c)][1],
        "error",
        ["abl: holds 'notes.txt' and no ablation.json: not an ablation folder", "--out"],
        check=_holds(lambda t, c: sorted(p.name for p in (t / "abl").iterdir()) == ["notes.txt"]),
    ),
    "ablate_out_a_runs_place_holding_other_files": Case(  # said "pass --resume", an option ablate lacks
        lambda t, c: [
            _bytes((t / "abl" / "none-s0").mkdir(parents=True) or t / "abl" / "none-s0" / "my.txt", b"x"),
            _ablate(t, c),
        ][1],
        "error",
        ["none-s0: holds files but no run (config.json)", "another --out"],
        check=_holds(lambda t, c: not (t / "abl" / "ablation.json").exists()),
    ),
    "ablate_out_a_file_in_a_runs_place": Case(  # said "pass --run-dir with a folder"
        lambda t, c: [_bytes((t / "abl").mkdir() or t / "abl" / "none-s0", b"x"), _ablate(t, c)][1],
        "error",
        ["none-s0: a file or link stands where this ablation's run none-s0 goes"],
    ),
    "ablate_out_a_training_run": Case(  # nested its runs inside the run; report then ignored them
        lambda t, c: [shutil.copytree(c["run"], t / "abl"), _ablate(t, c)][1],
        "error",
        ["abl: is a training run (config.json), not an ablation folder"],
    ),
    "ablate_out_holding_a_users_ablation_json": Case(  # the user's file was replaced by the plan, exit 0
        lambda t, c: [_bytes((t / "abl").mkdir() or t / "abl" / "ablation.json", b'{"notes": [1]}'), _ablate(t, c)][1],
        "error",
        ["ablation.json: not an ablation plan `sicot ablate` wrote", "it is not replaced"],
        check=_holds(
            lambda t, c: (
                sorted(p.name for p in (t / "abl").iterdir()) == ["ablation.json"]
                and (t / "abl" / "ablation.json").read_bytes() == b'{"notes": [1]}'
            )
        ),
    ),
    "ablate_out_holding_a_users_report_md": Case(  # every run trained first, then the report step refused
        lambda t, c: [_bytes((t / "abl").mkdir() or t / "abl" / "report.md", b"my notes"), _ablate(t, c)][1],
        "error",
        ["report.md: exists and was not written by `sicot report`"],
        check=_holds(
            lambda t, c: not (t / "abl" / "none-s0").exists() and (t / "abl" / "report.md").read_bytes() == b"my notes"
        ),
    ),
    "prepare_out_beside_a_users_recipe_json": Case(  # o.recipe.json replaced without --force
        lambda t, c: [_bytes(t / "o.recipe.json", b"precious"), _prep(_manifest(t), t)][1],
        "error",
        ["o.recipe.json: exists and is not the side file `sicot prepare` writes", "--force"],
        check=_holds(lambda t, c: (t / "o.recipe.json").read_bytes() == b"precious" and not (t / "o.h5").exists()),
    ),
    "train_run_dir_of_the_users_files": Case(  # said "pass --resume", which then refused the folder
        lambda t, c: [_bytes((t / "run").mkdir() or t / "run" / "a.txt", b"mine"), _train()(t, c)][1],
        "error",
        ["run: holds files and no run (config.json); they are left alone: pass --run-dir with a new"],
        check=_holds(lambda t, c: sorted(p.name for p in (t / "run").iterdir()) == ["a.txt"]),
    ),
    "decouple_a_missing_folder": Case(  # said "not a finished run"
        lambda t, c: ["decouple", str(t / "nowhere")], "error", ["nowhere: no such folder (decouple starts from"]
    ),
    "evaluate_a_run_that_records_no_dataset": Case(  # "(no path recorded): ... is not there (moved or removed)"
        _run_file(runs.CONFIG, lambda cfg: {**cfg, "data": ""}, command="evaluate"),
        "error",
        ["config.json: records no prepared dataset; pass --data with the run's .h5"],
    ),
    "evaluate_a_run_whose_dataset_moved": Case(  # said "create it with `sicot prepare`", not --data
        _run_file(runs.CONFIG, lambda cfg: {**cfg, "data": "/nonexistent/moved.h5"}, command="evaluate"),
        "error",
        ["/nonexistent/moved.h5: the prepared dataset", "is not there (moved or removed): pass --data with where"],
    ),
    "ablate_recipe_seed_it_does_not_train": Case(  # trained none-s0 without a word
        lambda t, c: [*_ablate(t, c), "--recipe", str(_bytes(t / "r.toml", b"[train]\nseed = 5\n"))],
        "ok",
        ["sets train.seed = 5, which ablate does not use", "give --seeds 5"],
    ),
    "decouple_a_link_to_nothing": Case(  # named the link's target
        lambda t, c: [(t / "dl").symlink_to(t / "nowhere"), ["decouple", str(t / "dl")]][1],
        "error",
        ["dl: no such folder"],
    ),
    "train_text_encoder_with_lam_zero": Case(  # reported as co-training, bit-identical to the baseline
        _train("--encoder", "mean", "train.lam=0"), "ok", ["train.lam = 0 with encoder 'mean'", "the baseline's"]
    ),
    "train_drw_that_never_starts": Case(  # labelled drw, trained as plain CE
        _train("train.reweight=drw", "train.drw_start=1.0"), "ok", ["starts re-weighting after the last epoch"]
    ),
    "train_cotrain_after_of_no_epoch": Case(
        _train("--encoder", "mean", "train.cotrain_after=0.2"), "ok", ["is no epoch (floor), so co-training starts"]
    ),
    "train_topk_twice": Case(_train("train.topk=[1,1]"), "error", ["train.topk lists a k twice, got [1, 1]"]),
    "train_topk_above_the_classes": Case(  # wrote a top-100000 column of 100.00 without a word
        _train("train.topk=[1,100000]"),
        "ok",
        ["top-100000 is 100 % by definition with 3 classes", "keep k < 3 (e.g. train.topk = [1, 2])"],
    ),
    "ablate_data_out_not_h5": Case(  # ablate prepared an HDF5 file named photo.png: prepare's check skipped
        lambda t, c: ["ablate", "--out", str(t / "abl"), "--encoders", "none", "data.out=photo.png"],
        "error",
        ["data.out = 'photo.png': not an .h5 name"],
        check=_holds(lambda t, c: not (t / "photo.png").exists()),
    ),
    "ablate_out_empty": Case(  # taken as the current folder
        lambda t, c: [*_ablate(t, c)[:4], "", *_ablate(t, c)[5:]],
        "error",
        ["--out is empty"],
    ),
    "ablate_out_a_dangling_link_in_a_runs_place": Case(  # ablation.json written, then a failure in the first run
        lambda t, c: [(t / "abl").mkdir(), (t / "abl" / "none-s0").symlink_to(t / "nowhere"), _ablate(t, c)][2],
        "error",
        ["none-s0: a file or link stands where"],
        check=_holds(lambda t, c: not (t / "abl" / "ablation.json").exists()),
    ),
    "prepare_out_hidden_name": Case(
        lambda t, c: ["prepare", "--manifest", str(_manifest(t)), "--out", str(t / ".x.h5"), *KEEP_ALL],
        "error",
        [".x.h5: a hidden file name"],
    ),
    "prepare_data_out_dot_dot_h5": Case(  # wrote a hidden ..h5
        lambda t, c: ["prepare", "--manifest", str(_manifest(t)), *KEEP_ALL, f"data.out={t / '..h5'}"],
        "error",
        ["not a hidden one"],
    ),
    "train_resume_with_only_its_best_checkpoint_left": Case(  # restarted in place over checkpoint-best.pt
        lambda t, c: _only_best_left(t, c, epoch=2),
        "error",
        ["checkpoint-last.pt: missing, but checkpoint-best.pt is there", "nothing was changed"],
        check=_holds(lambda t, c: (t / "run" / runs.BEST).is_file()),
    ),
    # killed between epoch 1's checkpoint-best.pt and checkpoint-last.pt: "moved or deleted since",
    # and the documented rerun failed for ever; epoch 1 was never recorded, so the run starts again
    "train_resume_killed_between_its_first_two_checkpoints": Case(
        lambda t, c: _only_best_left(t, c, epoch=1),
        "ok",
        ["stopped while saving its first epoch's checkpoints: starting it again"],
        check=_holds(lambda t, c: runs.is_finished(t / "run") and len(runs.read_metrics(t / "run")) == 1),
    ),
    "word_vectors_text_with_nan_read_as_binary": Case(
        lambda t, c: _prep(
            _manifest(t),
            t,
            "embed.binary=true",
            "embed.pretrained=" + str(_bytes(t / "v.txt", b"3 3\nred nan -Infinity 3e-2\ncat 0 1 0\ntoy 0 0 1\n")),
        ),
        "error",
        ["v.txt: a word2vec TEXT file"],
    ),
    "train_resume_with_its_last_checkpoint_gone": Case(  # restarted from epoch 1 and erased metrics.jsonl
        lambda t, c: [
            (_copy_run(t, c, unfinished=True) / runs.LAST).unlink(),
            ["train", "--resume", "--run-dir", str(t / "run")],
        ][1],
        "error",
        [
            "checkpoint-last.pt: missing, but metrics.jsonl records 1 finished epoch(s)",
            "put it back",
            "nothing was changed",
        ],
        check=_holds(lambda t, c: len(runs.read_metrics(t / "run")) == 1),
    ),
    **{
        # checkpoint-last.pt: metrics.jsonl deleted, then a crash after an epoch; metrics.jsonl: a traceback
        f"train_resume_with_a_folder_as_its_{name.split('.')[0].replace('-', '_')}": Case(
            lambda t, c, name=name: [
                (_copy_run(t, c, unfinished=True) / name).unlink(),
                (t / "run" / name).mkdir(),
                ["train", "--resume", "--run-dir", str(t / "run")],
            ][2],
            "error",
            [f"{name}: exists and is not a file; move it away"],
            check=_holds(lambda t, c, name=name: name == runs.METRICS or len(runs.read_metrics(t / "run")) == 1),
        )
        for name in (runs.LAST, runs.METRICS)
    },
    "evaluate_with_its_last_checkpoint_gone": Case(  # said "the run saved no checkpoint yet"
        lambda t, c: [(_copy_run(t, c, unfinished=True) / runs.LAST).unlink(), ["evaluate", "--run", str(t / "run")]][
            1
        ],
        "error",
        ["checkpoint-last.pt: missing, but metrics.jsonl records 1 finished epoch(s)"],
    ),
    "train_resume_alone_on_a_missing_folder": Case(  # started the built-in recipe there, silently
        lambda t, c: ["train", "--resume", "--run-dir", str(t / "gone")],
        "error",
        ["gone: no run to resume (no such folder); --resume alone continues a run from its config.json"],
        check=_holds(lambda t, c: not (t / "gone").exists()),
    ),
    "train_resume_alone_on_an_empty_folder": Case(
        lambda t, c: [(t / "empty").mkdir(), ["train", "--resume", "--run-dir", str(t / "empty")]][1],
        "error",
        ["empty: no run to resume (no config.json)", "sicot train --run-dir"],
        check=_holds(lambda t, c: not any((t / "empty").iterdir())),
    ),
}


@pytest.fixture(scope="module")
def ctx(tiny_prepared, tmp_path_factory) -> dict:
    """A finished 1-epoch run on the tiny dataset, a dataset with another vocabulary, an image."""
    from sicot_cli.data.prepare import prepare
    from sicot_cli.train import train

    root = tmp_path_factory.mktemp("hostile")
    run = train(tiny_recipe(tiny_prepared, "model.encoder=none", "train.epochs=1"), root / "run").run_dir
    m = make_manifest(root / "raw2", per_class=6)
    other = root / "other.h5"
    prepare(
        load_recipe(
            None, ["data.source=manifest", f"data.manifest={m}", "data.image_size=16", *KEEP_ALL, "text.min_count=2"]
        ),
        other,
    )
    return {
        "run": run,
        "prepared": tiny_prepared,
        "other": other,
        "image": tiny_prepared.parent / "raw" / "cat3.png",
        "root": root,
    }


@pytest.fixture
def deadline():
    """Never a hang: a case that runs past 120 s fails instead of blocking the suite."""

    def expire(*_):  # noqa: ANN002
        raise TimeoutError("bad input case ran past 120 s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def test_catalogue_is_large_enough():
    assert len(CASES) >= 130
    assert sum(c.outcome == "error" for c in CASES.values()) >= 90


@pytest.mark.parametrize("name", list(CASES), ids=list(CASES))
def test_bad_input(name, tmp_path, ctx, monkeypatch, deadline):
    case = CASES[name]
    monkeypatch.chdir(tmp_path)  # a file written by a relative path lands in the case's folder, where its check looks
    args = case.make(tmp_path, ctx)
    if name.startswith("disk_full_writing_"):
        monkeypatch.setattr(os, "fsync", _enospc(".o.h5.tmp" if "prepared" in name else ".checkpoint-"))
    result = runner.invoke(app, args, catch_exceptions=False, env={"COLUMNS": "4000"} if case.outcome == "ok" else None)
    out = result.output
    assert "Traceback" not in out, out
    assert not RAW.search(out), ("raw control character on the terminal", out)
    if case.outcome == "ok":
        assert result.exit_code == 0, out
        for needle in case.needles:
            assert needle in out, (needle, out)
    elif case.outcome == "error":
        assert result.exit_code == 2, out
        # log lines before the error (a run's plan) may precede it; the error is one line
        lines = [ln for ln in out.strip().splitlines() if ln.strip() and not ln.startswith(("INFO ", "WARNING ", " "))]
        assert len(lines) == 1 and lines[0].startswith("error:"), out
        for needle in case.needles:
            assert needle in lines[0], (needle, out)
    else:
        assert result.exit_code == 0, out
        summary = json.loads((tmp_path / "o.recipe.json").read_text(encoding="utf-8"))["summary"]
        if case.outcome == "skip":
            (reason,) = case.needles
            assert summary["skipped"].get(reason) == case.count, (reason, summary["skipped"])
            assert f"skipped: {reason}" in out
    if case.check is not None:
        case.check(tmp_path, ctx)


def test_skipped_manifest_paths_are_reported_resolved(tmp_path):
    m = _manifest(tmp_path, _row("sub/../../raw/./nowhere.png", "x1"))
    r = runner.invoke(app, _prep(m, tmp_path), catch_exceptions=False)
    assert r.exit_code == 0, r.output
    example = json.loads((tmp_path / "o.recipe.json").read_text())["summary"]["skip_examples"]["image file not found"][
        0
    ]
    assert example.endswith(f"({(tmp_path / 'raw' / 'nowhere.png').resolve()})"), example


def test_checkpoints_and_weights_load_with_weights_only():
    """Every torch.load in the package passes weights_only=True (no pickled code runs on load)."""
    import re

    root = Path(__file__).resolve().parents[1]
    calls = []
    for py in [*(root / "sicot_cli").rglob("*.py"), *(root / "encoders").rglob("*.py")]:
        text = py.read_text(encoding="utf-8")
        for m in re.finditer(r"torch\.load\(", text):
            depth, i = 1, m.end()
            while depth and i < len(text):
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                i += 1
            calls.append((py.name, text[m.start() : i]))
        assert not re.search(r"\b(pickle|marshal|shelve|dill)\.loads?\(|(?<![.\w])(eval|exec)\(|yaml\.load\(", text), py
    assert calls, "no torch.load found: the test looks in the wrong place"
    for name, call in calls:
        assert "weights_only=True" in call, (name, call)


def test_each_payload_would_leave_its_marker(tmp_path, monkeypatch):
    """Run on purpose, each payload writes the marker its case checks for: the cases would see one run."""
    import io
    import subprocess
    import tomllib

    import torch

    monkeypatch.chdir(tmp_path)  # as test_bad_input runs the CLI
    check = _no_marker("PWNED")
    runs_payload = [
        lambda: subprocess.run(
            f"ls {_shell_in_image_path(tmp_path)}", shell=True, capture_output=True, check=False
        ),  # a shell expands the path
        lambda: eval(tomllib.loads(PYTHON_IN_RECIPE)["name"]),  # the recipe string evaluated as Python
        lambda: torch.load(
            io.BytesIO(_evil_checkpoint(tmp_path / "PWNED").split(b"\n", 1)[1]), weights_only=False
        ),  # unpickled with code
    ]
    for run_payload in runs_payload:
        check(tmp_path, {})
        run_payload()
        with pytest.raises(AssertionError, match="the payload ran"):
            check(tmp_path, {})
        (tmp_path / "PWNED").unlink()


def test_legacy_checkpoint_with_code_is_refused_too(tmp_path):
    """A plain torch.save file (no sicot header) carrying code is refused and the code never runs."""
    import torch

    path = tmp_path / "checkpoint-last.pt"
    torch.save({"model": _Evil(tmp_path / "PWNED"), "meta": {}}, path)
    with pytest.raises(SicotError, match="unreadable checkpoint"):
        runs.load_checkpoint(path)
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize(
    "command",
    [
        ["train", "--run-dir", "locked/x"],
        ["evaluate", "--run", "locked/x"],
        ["embed", "--out", "locked/v.txt"],
        ["report", "locked/ab"],
        ["ablate", "--out", "locked/ab", "--seeds", "0"],
    ],
    ids=lambda c: c[0],
)
def test_a_path_in_a_folder_that_cannot_be_read_is_one_line(command, ctx, tmp_path, monkeypatch):
    # Python 3.11's Path.exists raises PermissionError inside a folder without the x bit (chmod 000;
    # root ignores modes, so the test raises it where the OS would)
    monkeypatch.chdir(tmp_path)
    real = Path.stat

    def stat(self, *a, **kw):  # noqa: ANN001, ANN002, ANN003
        if "locked" in str(self):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, *a, **kw)

    monkeypatch.setattr(Path, "stat", stat)
    extra = [] if command[0] in ("report", "evaluate") else ["--data", str(ctx["prepared"])]
    r = runner.invoke(app, [*command, *extra], catch_exceptions=False)
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip() and not ln.startswith(("INFO ", "WARNING ", " "))]
    assert len(lines) == 1 and lines[0].startswith("error: locked") and "permission denied" in lines[0], r.output


def test_text_reader_hints_fit_the_cause(tmp_path):
    from sicot_cli.fsutil import read_text

    (tmp_path / "afile").write_text("x", encoding="utf-8")
    with pytest.raises(
        SicotError, match=r"afile/x.json: a file stands where this path needs a folder; check the path$"
    ):
        read_text(tmp_path / "afile" / "x.json", hint="; delete its folder and fetch again")
    real_open = os.open

    def locked(path, *a, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        if str(path).endswith("locked.txt"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *a, **kw)

    with (
        mock.patch("os.open", locked),
        pytest.raises(SicotError, match=r"locked.txt: cannot read \(permission denied\); check its permissions$"),
    ):
        read_text(tmp_path / "locked.txt", hint="; save it as UTF-8")  # it said "save it as UTF-8"
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(
        SicotError, match=r"pipe: cannot read \(not a regular file \(a FIFO, socket or device\)\); name a regular file$"
    ):
        read_text(tmp_path / "pipe", hint="; save it as UTF-8")


def test_the_one_text_reader_names_the_file_and_what_to_do(tmp_path):
    """fsutil.read_text: recipes, manifests, titles files and released JSON files all read through it."""
    from sicot_cli.fsutil import read_text

    good = tmp_path / "t.txt"
    good.write_bytes(b"\xef\xbb\xbfcaf\xc3\xa9\n")
    assert read_text(good) == "café\n"  # UTF-8, the BOM dropped
    bad = tmp_path / "b.txt"
    bad.write_bytes(b"ok\n\xff\xfe")
    with pytest.raises(
        SicotError, match=re.escape(f"{bad}: not UTF-8 text (invalid start byte at byte 3, line 2); fetch again")
    ):
        read_text(bad, "list", hint="; fetch again")
    with pytest.raises(SicotError, match=re.escape("(invalid start byte at byte 3, line 2); save it as UTF-8")):
        read_text(bad, "list")  # a user's own file: what to do with it
    assert read_text(bad, errors="replace") == "ok\n\ufffd\ufffd"
    assert read_text(bad, errors="surrogateescape") == "ok\n\udcff\udcfe"
    with pytest.raises(SicotError, match=re.escape(f"{tmp_path / 'no.toml'}: recipe not found")):
        read_text(tmp_path / "no.toml", "recipe")
    with pytest.raises(SicotError, match=re.escape(f"{tmp_path / 'no.json'}: missing (run `x` first)")):
        read_text(tmp_path / "no.json", missing="missing (run `x` first)")
    with pytest.raises(SicotError, match=re.escape(f"{tmp_path}: is a directory, expected a CSV or JSONL manifest")):
        read_text(tmp_path, "manifest", expected="a CSV or JSONL manifest")
    with pytest.raises(SicotError, match=re.escape(f"{tmp_path}: cannot read (Is a directory); delete it")):
        read_text(tmp_path, hint="; delete it")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(
        SicotError,
        match=re.escape(f"{fifo}: cannot read the titles file (not a regular file (a FIFO, socket or device))"),
    ):
        read_text(fifo, "titles file")
    with pytest.raises(SicotError, match="not a valid path"):
        read_text("a\x00b", "recipe")


@pytest.mark.parametrize("name", [".csv", ".JSONL"])
def test_a_manifest_named_only_its_extension_is_read_by_it(tmp_path, name):
    # Path(".csv").suffix is "": such a file was "of unknown manifest type ''"
    path = tmp_path / name
    if name == ".csv":
        path.write_text("image,title,label\na.png,red shirt,red\n")
    else:
        path.write_text(json.dumps({"image": "a.png", "title": "red shirt", "label": "red"}) + "\n")
    rows = read_manifest(path, Skips())
    assert [(r.title, r.label) for r in rows] == [("red shirt", "red")]
