"""Importers: tiny fixtures in each dataset's real layout (made here) -> manifest -> prepare -> train.

The emoji packages' layout is that of emoji-datasource-google@16.0.0 and emojibase-data@17.0.0;
iMaterialist's and WebVision's are the ones their READMEs give (see the importers' docstrings).
The real npm fetch is the `slow` test at the end.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import random
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import KEEP_ALL, tiny_recipe
from PIL import Image
from typer.testing import CliRunner

from sicot_cli.cli import app
from sicot_cli.config import load_recipe
from sicot_cli.data.importers import emoji as em
from sicot_cli.data.importers.imaterialist import import_imaterialist
from sicot_cli.data.importers.npm import NpmPackage, checksums, unpack
from sicot_cli.data.importers.webvision import import_webvision
from sicot_cli.data.prepare import prepare
from sicot_cli.errors import SicotError
from sicot_cli.train import train

REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()


def png(path: Path, seed: int, rgba: bool = False, size: int = 20) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    a = (rng.random((size, size, 4 if rgba else 3)) * 255).astype("uint8")
    a[..., seed % 3] = 255
    Image.fromarray(a, "RGBA" if rgba else "RGB").save(path)


def rows_of(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# ---- emoji ---------------------------------------------------------------------------------------

TONES = ["1F3FB", "1F3FC", "1F3FD", "1F3FE", "1F3FF"]
ZH_TONES = ["较浅肤色", "中等-浅肤色", "中等肤色", "中等-深肤色", "较深肤色"]
# (unified, category, subcategory, tones, zh label, zh tags, en label, en tags, has google image)
EMOJI = [
    ("1F600", "Smileys & Emotion", "face-smiling", 0, "嘿嘿", ["脸", "笑"], "grinning face", ["face", "grin"], True),
    ("1F601", "Smileys & Emotion", "face-smiling", 0, "嘻嘻", ["眼睛", "笑"], "beaming face", ["eye", "grin"], True),
    (
        "1F602",
        "Smileys & Emotion",
        "face-smiling",
        0,
        "笑哭了",
        ["眼泪", "笑"],
        "face with tears of joy",
        ["joy", "tear"],
        True,
    ),
    (
        "263A-FE0F",
        "Smileys & Emotion",
        "face-smiling",
        0,
        "微笑",
        ["脸", "放松"],
        "smiling face",
        ["relaxed", "smile"],
        True,
    ),
    ("1F44B", "People & Body", "hand-fingers-open", 5, "挥手", ["你好", "再见"], "waving hand", ["hello", "bye"], True),
    (
        "1F91A",
        "People & Body",
        "hand-fingers-open",
        2,
        "立起的手背",
        ["手背"],
        "raised back of hand",
        ["backhand"],
        True,
    ),
    (
        "1F590-FE0F",
        "People & Body",
        "hand-fingers-open",
        0,
        "手掌",
        ["手指"],
        "hand with fingers splayed",
        ["finger"],
        True,
    ),
    ("270B", "People & Body", "hand-fingers-open", 0, "举起手", ["手"], "raised hand", ["high five"], True),
    ("1F435", "Animals & Nature", "animal-mammal", 0, "猴子", ["猴"], "monkey face", ["monkey"], True),
    ("1F412", "Animals & Nature", "animal-mammal", 0, "猴", ["动物"], "monkey", ["animal"], True),
    ("1F436", "Animals & Nature", "animal-mammal", 0, "狗脸", ["狗"], "dog face", ["dog", "pet"], True),
    ("1F415", "Animals & Nature", "animal-mammal", 0, "狗", ["宠物"], "dog", ["pet"], False),  # no Google image
    ("1F3FB", "Component", "skin-tone", 0, "较浅肤色", ["肤色"], "light skin tone", ["skin"], True),
    ("1F9A9", "Animals & Nature", "animal-bird", 0, "", [], "", [], True),  # not in emojibase
]


def make_emoji_packages(root: Path) -> Path:
    """The two packages' files as npm unpacks them (without the ``package/`` prefix)."""
    src, base = root / em.DATASOURCE.name, root / em.EMOJIBASE.name
    entries, data = [], {"zh": [], "en": []}
    for i, (uni, cat, sub, tones, zl, zt, el, et, google) in enumerate(EMOJI):
        e = {
            "unified": uni,
            "image": f"{uni.lower()}.png",
            "category": cat,
            "subcategory": sub,
            "sort_order": i,
            "has_img_google": google,
        }
        png(src / em.IMAGES / e["image"], i, rgba=True)
        if tones:
            e["skin_variations"] = {}
            for t in TONES[:tones]:
                e["skin_variations"][t] = {
                    "unified": f"{uni}-{t}",
                    "image": f"{uni.lower()}-{t.lower()}.png",
                    "has_img_google": True,
                }
                png(src / em.IMAGES / f"{uni.lower()}-{t.lower()}.png", i + 100 + len(e["skin_variations"]), rgba=True)
        entries.append(e)
        if not zl:
            continue
        hexcode = uni.replace("-FE0F", "")  # emojibase writes some without FE0F: the join must not care
        for lang, label, tags in (("zh", zl, zt), ("en", el, et)):
            d = {"hexcode": hexcode, "label": label, "tags": tags, "group": 0, "subgroup": 0}
            if tones:
                names = ZH_TONES if lang == "zh" else [f"tone {k}" for k in range(5)]
                d["skins"] = [
                    {"hexcode": f"{hexcode}-{t}", "label": f"{label}: {names[k]}"} for k, t in enumerate(TONES[:tones])
                ]
            data[lang].append(d)
    (src / "emoji.json").write_text(json.dumps(entries), encoding="utf-8")
    (src / "LICENSE").write_text("MIT\n", encoding="utf-8")
    for lang in ("zh", "en"):
        (base / lang).mkdir(parents=True, exist_ok=True)
        (base / lang / "data.json").write_text(json.dumps(data[lang], ensure_ascii=False), encoding="utf-8")
        msgs = {
            "groups": [],
            "subgroups": [{"key": "face-smiling", "message": "笑脸" if lang == "zh" else "smiling faces", "order": 0}],
        }
        (base / lang / "messages.json").write_text(json.dumps(msgs, ensure_ascii=False), encoding="utf-8")
    return root


def pack(folder: Path, tgz: Path, extra: list[tarfile.TarInfo] | None = None) -> None:
    with tarfile.open(tgz, "w:gz") as tar:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                tar.add(p, arcname=f"package/{p.relative_to(folder).as_posix()}")
        for info in extra or []:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)


def pinned(pkg: NpmPackage, tgz: Path) -> NpmPackage:
    integrity, sha256 = checksums(tgz)
    return NpmPackage(pkg.name, pkg.version, integrity, sha256, pkg.members)


def _packed(src: Path, folder: Path) -> list:
    """Each emoji package of ``src`` packed into ``folder`` (made), pinned to its tarball."""
    folder.mkdir()
    pkgs = []
    for pkg in em.PACKAGES:
        pack(src / pkg.name, folder / pkg.tarball)
        pkgs.append(pinned(pkg, folder / pkg.tarball))
    return pkgs


def test_emoji_join_titles_and_leak_free_split(tmp_path):
    folder = make_emoji_packages(tmp_path / "emoji")
    s = em.import_emoji(folder, test_per_class=2, seed=0)
    zh, en = rows_of(folder / "emoji-zh.csv"), rows_of(folder / "emoji-en.csv")
    assert [(r["id"], r["split"], r["label"], r["image"]) for r in zh] == [
        (r["id"], r["split"], r["label"], r["image"]) for r in en
    ]
    by_id = {r["id"]: r for r in zh}
    # titles: the language's label, then the base emoji's tags; FE0F does not break the join
    assert by_id["1F44B"]["title"] == "挥手 你好 再见"
    assert {r["id"]: r for r in en}["1F44B"]["title"] == "waving hand hello bye"
    assert (
        by_id["1F44B-1F3FB"]["title"] == "挥手: 较浅肤色 你好 再见"
    )  # 1F44B trains with seed 0: its variants are kept
    assert "263A" in by_id and by_id["263A"]["title"] == "微笑 脸 放松"
    assert by_id["263A"]["image"] == f"{em.DATASOURCE.name}/{em.IMAGES}/263a-fe0f.png"
    # left out: Component, no Google image, no emojibase entry
    assert not {"1F3FB", "1F415", "1F9A9"} & set(by_id)
    assert {r["label"] for r in zh} == {"face-smiling", "hand-fingers-open", "animal-mammal"}
    # test: min(2, n_base // 2) distinct base emoji per class, default images only
    test = [r for r in zh if r["split"] == "test"]
    assert sorted(r["label"] for r in test) == [
        "animal-mammal",
        "face-smiling",
        "face-smiling",
        "hand-fingers-open",
        "hand-fingers-open",
    ]
    assert all("-" not in r["id"] for r in test)
    # no base emoji on both sides; the variants of a test emoji are nowhere
    base = lambda i: i.split("-")[0]  # noqa: E731
    test_bases = {base(r["id"]) for r in test}
    assert not test_bases & {base(r["id"]) for r in zh if r["split"] == "train"}
    # seed 0 draws 1F91A (2 skin-tone variants) into the test set, 1F44B (5 variants) into training
    assert "1F91A" in test_bases and "1F44B" not in test_bases
    assert not any(r["id"].startswith("1F91A-") for r in zh)
    assert sorted(r["id"] for r in zh if r["id"].startswith("1F44B-")) == [f"1F44B-{t}" for t in TONES]
    all_images = 4 + (1 + 5) + (1 + 2) + 1 + 1 + 3  # usable images before the split
    assert len(zh) == all_images - 2 == s.rows
    assert s.skipped["skin-tone variant of a test emoji (kept out of both sides)"] == 2
    assert s.skipped["Component group (skin-tone and hair swatches)"] == 1
    assert s.skipped["no Google image in the package"] == 1 and s.skipped["no emojibase entry (zh/en)"] == 1
    assert (s.classes, s.train, s.test) == (3, len(zh) - 5, 5)
    names = json.loads((folder / "emoji-classes.json").read_text(encoding="utf-8"))
    assert names["face-smiling"] == {"images": 4, "zh": "笑脸", "en": "smiling faces"}
    # seeded: the same seed writes the same bytes
    before = (folder / "emoji-zh.csv").read_bytes()
    em.import_emoji(folder, test_per_class=2, seed=0)
    assert (folder / "emoji-zh.csv").read_bytes() == before


def test_emoji_split_takes_at_most_half_the_base_emoji(tmp_path):
    folder = make_emoji_packages(tmp_path / "emoji")
    s = em.import_emoji(folder, test_per_class=99, seed=3)
    test = [r for r in rows_of(folder / "emoji-zh.csv") if r["split"] == "test"]
    # 4, 4 and 3 base emoji: 2, 2 and 1 in the test set, whatever test_per_class asks
    assert sorted(r["label"] for r in test) == [
        "animal-mammal",
        "face-smiling",
        "face-smiling",
        "hand-fingers-open",
        "hand-fingers-open",
    ]
    assert s.test == 5
    with pytest.raises(SicotError, match="test-per-class"):
        em.import_emoji(folder, test_per_class=-1)


def test_emoji_validation_rows_are_whole_base_emoji(tmp_path):
    folder = make_emoji_packages(tmp_path / "emoji")
    base = lambda i: i.split("-")[0]  # noqa: E731
    seen_val = set()
    for seed in range(4):
        s = em.import_emoji(folder, test_per_class=1, seed=seed, val_fraction=0.5)
        zh = rows_of(folder / "emoji-zh.csv")
        side = {k: {base(r["id"]) for r in zh if r["split"] == k} for k in ("train", "val", "test")}
        # a base emoji and its skin-tone variants sit on one side only; the test split is unchanged
        assert side["val"] and not side["val"] & side["train"] and not side["val"] & side["test"]
        for label in {r["label"] for r in zh}:
            n = {k: sum(r["label"] == label and r["split"] == k for r in zh) for k in ("train", "val")}
            assert n["val"] <= int(0.5 * (n["train"] + n["val"]))
        assert (s.train, s.test) == (sum(r["split"] == "train" for r in zh), sum(r["split"] == "test" for r in zh))
        em.import_emoji(folder, test_per_class=1, seed=seed, val_fraction=0)
        assert [(r["id"], r["split"]) for r in zh if r["split"] != "val"] == [
            (r["id"], r["split"])
            for r in rows_of(folder / "emoji-zh.csv")
            if r["id"] not in {v["id"] for v in zh if v["split"] == "val"}
        ]
        seen_val |= side["val"]
    assert {"1F44B", "1F91A"} & seen_val  # an emoji with skin-tone variants goes to validation with them on some seed
    with pytest.raises(SicotError, match=r"val-fraction must be in \[0, 0.5\]"):
        em.import_emoji(folder, val_fraction=0.9)


def test_emoji_val_seed_redraws_validation_only(tmp_path):
    folder = make_emoji_packages(tmp_path / "emoji")
    em.import_emoji(folder, test_per_class=1, seed=2, val_fraction=0.5)
    default = (folder / "emoji-zh.csv").read_bytes()
    em.import_emoji(folder, test_per_class=1, seed=2, val_fraction=0.5, val_seed=2)
    assert (folder / "emoji-zh.csv").read_bytes() == default  # the default val_seed is --seed
    ref = rows_of(folder / "emoji-zh.csv")
    base = lambda i: i.split("-")[0]  # noqa: E731
    folds = set()
    for val_seed in range(6):
        em.import_emoji(folder, test_per_class=1, seed=2, val_fraction=0.5, val_seed=val_seed)
        zh = rows_of(folder / "emoji-zh.csv")
        # the same rows, the same test rows; only train/val move, whole base emoji at a time
        assert [(r["id"], r["split"] == "test") for r in zh] == [(r["id"], r["split"] == "test") for r in ref]
        side = {k: {base(r["id"]) for r in zh if r["split"] == k} for k in ("train", "val")}
        assert side["val"] and not side["val"] & side["train"]
        folds.add(frozenset(side["val"]))
    assert len(folds) > 1  # another val_seed, another fold


def test_emoji_manifest_prepares_and_trains(tmp_path):
    folder = make_emoji_packages(tmp_path / "emoji")
    em.import_emoji(folder, test_per_class=1, seed=0)
    recipe = load_recipe(
        REPO / "recipes" / "emoji-zh.toml",
        [f"data.manifest={folder / 'emoji-zh.csv'}", "data.image_size=16", *KEEP_ALL],
    )
    out = tmp_path / "e.h5"
    s = prepare(recipe, out)
    rows = rows_of(folder / "emoji-zh.csv")
    n_train = sum(r["split"] == "train" for r in rows)
    # every row is kept: the test rows are scored image-only, even a title of words never seen in
    # training (立起的手背 手背: 1F91A's variants, the only other rows with those words, are left out)
    assert [r["title"] for r in rows if r["split"] == "test"] == ["猴子 猴", "微笑 脸 放松", "立起的手背 手背"]
    assert (s.classes, s.train_images, s.test_images, s.skipped) == (3, n_train, 3, {})
    from sicot_cli.data.dataset import open_prepared

    p = open_prepared(out)
    assert p.lengths[p.ids().index("1F91A")] == 0  # kept with an empty title
    result = train(tiny_recipe(out, "train.epochs=1", "train.batch_size=4"), tmp_path / "run")
    assert len(result.history) == 1 and np.isfinite(result.history[0]["loss"])


def test_fetch_verifies_and_unpacks_only_the_allowed_files(tmp_path):
    src = make_emoji_packages(tmp_path / "src")
    (src / em.DATASOURCE.name / "img/google/sheets").mkdir(parents=True)
    (src / em.DATASOURCE.name / "img/google/sheets/64.png").write_bytes(b"sprite")  # must not be unpacked
    folder = tmp_path / "data"
    pkgs = _packed(src, folder)
    # temporaries of fetches killed while downloading or unpacking (named by their pids): removed
    for leftover in (f".{pkgs[0].folder}.tmp-1212", ".npm-pack-77"):
        (folder / leftover / "img").mkdir(parents=True)
    (folder / ".notes.tmp-5").mkdir()  # not a fetch's: kept
    s = em.fetch_emoji(folder, npm=None, test_per_class=2, packages=tuple(pkgs))  # tarballs present: npm not needed
    assert s.rows > 0 and (folder / "emoji-zh.csv").is_file()
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == [".notes.tmp-5"]
    assert not (folder / em.DATASOURCE.name / "img/google/sheets").exists()
    assert (folder / em.EMOJIBASE.name / "zh/data.json").read_bytes() == (
        src / em.EMOJIBASE.name / "zh/data.json"
    ).read_bytes()
    # a wrong pin is refused, naming the file
    bad = NpmPackage(pkgs[0].name, pkgs[0].version, pkgs[0].integrity, "0" * 64, pkgs[0].members)
    shutil.rmtree(folder / pkgs[0].name)
    with pytest.raises(SicotError, match="checksum mismatch"):
        em.fetch_emoji(folder, npm=None, packages=(bad, pkgs[1]))
    # no tarball and no npm: the commands to run instead
    (folder / pkgs[0].tarball).unlink()
    with pytest.raises(SicotError, match=r"npm pack emoji-datasource-google@16\.0\.0"):
        em.fetch_emoji(folder, npm=None, packages=tuple(pkgs))


def test_fetch_again_keeps_a_hand_edited_manifest_unless_forced(tmp_path, monkeypatch):
    """`datasets fetch emoji` rewrote a hand-edited manifest silently; it is refused without --force.
    The same fetch again (nothing edited) still runs: it writes the same bytes."""
    src = make_emoji_packages(tmp_path / "src")
    folder = tmp_path / "data"
    pkgs = _packed(src, folder)
    monkeypatch.setattr(em, "fetch_emoji", functools.partial(em.fetch_emoji, npm=None, packages=tuple(pkgs)))
    fetch = ["datasets", "fetch", "emoji", "--dir", str(folder), "--test-per-class", "2"]
    assert runner.invoke(app, fetch).exit_code == 0
    assert runner.invoke(app, fetch).exit_code == 0  # nothing edited: the same file again
    manifest = folder / "emoji-en.csv"
    edited = manifest.read_bytes() + b"extra.png,my row,smileys,train,X1\r\n"
    manifest.write_bytes(edited)
    r = runner.invoke(app, fetch)
    assert r.exit_code == 2, r.output
    assert "emoji-en.csv: already exists and differs from what this fetch writes" in r.output
    assert "pass --force to replace it, or choose another --dir" in r.output
    assert manifest.read_bytes() == edited
    r = runner.invoke(app, [*fetch, "--seed", "1"])  # another split: the same refusal (the zh manifest first)
    assert r.exit_code == 2 and "emoji-zh.csv: already exists and differs" in r.output, r.output
    assert runner.invoke(app, [*fetch, "--force"]).exit_code == 0
    assert b"my row" not in manifest.read_bytes()


def test_fetch_runs_npm_pack(tmp_path):
    src = make_emoji_packages(tmp_path / "src")
    store = tmp_path / "registry"
    pkgs = _packed(src, store)
    npm = tmp_path / "npm"  # stands in for `npm pack NAME@VERSION --loglevel=error`: the tarball lands in the cwd
    npm.write_text(
        f'#!/bin/sh\n[ "$1" = pack ] || exit 9\ncp "{store}/$(echo "$2" | tr @ -).tgz" .\n', encoding="utf-8"
    )
    npm.chmod(0o755)
    folder = tmp_path / "data"
    s = em.fetch_emoji(folder, npm=str(npm), test_per_class=2, packages=tuple(pkgs))
    assert s.classes == 3 and all((folder / p.tarball).is_file() for p in pkgs)
    assert not list(folder.glob(".npm-pack-*"))
    broken = tmp_path / "broken-npm"
    broken.write_text("#!/bin/sh\necho 'npm error 404 Not Found' >&2\nexit 1\n", encoding="utf-8")
    broken.chmod(0o755)
    with pytest.raises(SicotError, match="404 Not Found"):
        em.fetch_emoji(tmp_path / "other", npm=str(broken), packages=tuple(pkgs))
    # npm's reason, not its stack trace nor its log file, and what to do without a registry
    offline = tmp_path / "offline-npm"
    trace = [
        "code ECONNREFUSED", "syscall connect", "errno ECONNREFUSED",
        "FetchError: request to http://127.0.0.1:9/x failed, reason: connect ECONNREFUSED 127.0.0.1:9",
        "    at ClientRequest.<anonymous> (index.js:130:14)", "{", "  errno: 'ECONNREFUSED',", "}",
        "A complete log of this run can be found in: /x/debug-0.log",
    ]  # fmt: skip
    offline.write_text("#!/bin/sh\n" + "".join(f"echo 'npm error {t}' >&2\n" for t in trace) + "exit 1\n")
    offline.chmod(0o755)
    with pytest.raises(SicotError) as e:
        em.fetch_emoji(tmp_path / "off", npm=str(offline), packages=tuple(pkgs))
    assert "failed (exit 1): ECONNREFUSED; FetchError: request to http://127.0.0.1:9/x failed" in str(e.value)
    assert "at ClientRequest" not in str(e.value) and "complete log" not in str(e.value)
    assert f"run `npm pack {pkgs[0].spec}` and put {pkgs[0].tarball} in {tmp_path / 'off'}" in str(e.value)
    (tmp_path / "third" / pkgs[0].tarball).mkdir(parents=True)  # a folder at the tarball's name: a traceback
    with pytest.raises(SicotError, match=rf"{re.escape(pkgs[0].tarball)}: exists and is not a file"):
        em.fetch_emoji(tmp_path / "third", npm=str(npm), packages=tuple(pkgs))
    assert not list((tmp_path / "third").glob(".npm-pack-*"))


def test_fetch_again_unpacks_a_damaged_package_again(tmp_path, caplog):
    """An image deleted from the unpacked package: the next fetch blamed a hand-edited manifest, and
    --force wrote one image short; it now unpacks the verified tarball again."""
    src = make_emoji_packages(tmp_path / "src")
    pkgs = _packed(src, tmp_path / "data")  # the tarballs where fetch looks for them: no npm needed
    folder = tmp_path / "data"
    first = em.fetch_emoji(folder, npm=None, test_per_class=2, packages=tuple(pkgs))
    manifest = (folder / "emoji-zh.csv").read_bytes()
    image = next((folder / pkgs[0].folder).rglob("*.png"))
    image.unlink()
    again = em.fetch_emoji(folder, npm=None, test_per_class=2, packages=tuple(pkgs))
    assert "unpacked files are there (removed or added since): unpacking" in caplog.text
    assert image.is_file() and (folder / "emoji-zh.csv").read_bytes() == manifest
    assert again.classes == first.classes


def test_unpack_refuses_links_and_ignores_traversal(tmp_path):
    src = tmp_path / "pkg"
    png(src / "img/google/64/1f600.png", 0)
    link = tarfile.TarInfo("package/img/google/64/1f601.png")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    evil = tarfile.TarInfo("package/../../evil.png")
    evil.size = 3
    pkg = NpmPackage("p", "1.0.0", "", "", (r"img/google/64/[0-9a-f-]+\.png", r"\.\./\.\./evil\.png"))
    tgz = tmp_path / "p.tgz"
    pack(src, tgz, extra=[evil])
    assert unpack(tgz, pkg, tmp_path / "out") == 1
    assert not (tmp_path / "evil.png").exists() and not list(tmp_path.rglob("evil.png"))
    pack(src, tgz, extra=[link])
    with pytest.raises(SicotError, match="not a regular file"):
        unpack(tgz, pkg, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


def test_cli_fetch_without_npm_says_what_to_run(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no npm on PATH
    r = runner.invoke(app, ["datasets", "fetch", "emoji", "--dir", str(tmp_path / "d")])
    assert r.exit_code == 2
    out = " ".join(r.output.split())
    assert "npm pack emoji-datasource-google@16.0.0" in out and "npm pack emojibase-data@17.0.0" in out
    r = runner.invoke(app, ["datasets", "fetch", "imagenet"])
    assert r.exit_code == 2 and "unknown dataset" in r.output
    # two fetches into one folder: the second unpacked under the first's feet
    from sicot_cli.fsutil import exclusive

    (tmp_path / "busy").mkdir()
    with exclusive(tmp_path / "busy"):
        r = runner.invoke(app, ["datasets", "fetch", "emoji", "--dir", str(tmp_path / "busy")])
    assert r.exit_code == 2 and "busy: in use by another sicot process" in " ".join(r.output.split())
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["datasets", "fetch", "emoji", "--dir", ""])  # was the working folder, ~80 MB
    assert r.exit_code == 2 and "--dir '': give a folder" in r.output and not list(tmp_path.glob("*.tgz"))


def test_cli_import_emoji(tmp_path):
    folder = make_emoji_packages(tmp_path / "emoji")
    r = runner.invoke(app, ["datasets", "import", "emoji", "--dir", str(folder), "--test-per-class", "1"])
    assert r.exit_code == 0, r.output
    n = len(rows_of(folder / "emoji-zh.csv"))
    assert f"{n} / 3" in r.output and "left out: Component group" in r.output
    assert rows_of(folder / "emoji-en.csv")[0]["id"] == rows_of(folder / "emoji-zh.csv")[0]["id"]
    r = runner.invoke(app, ["datasets", "import", "emoji", "--dir", str(folder), "--val-seed", "-1"])
    assert r.exit_code == 2 and "--val-seed must be 0.." in r.output
    (tmp_path / "afile").write_text("x", encoding="utf-8")  # said "cannot read (Not a directory); delete its folder"
    for name in ("emoji", "mdi"):
        r = runner.invoke(app, ["datasets", "import", name, "--dir", str(tmp_path / "afile")])
        assert (
            r.exit_code == 2 and f"afile: is a file; --dir names the folder `sicot datasets fetch {name}`" in r.output
        )
    r = runner.invoke(
        app, ["datasets", "import", "emoji", "--dir", str(folder), "--val-seed", "1", "--val-fraction", "0"]
    )
    assert r.exit_code == 2 and "--val-fraction 0 asks for none" in r.output
    before = [(row["id"], row["split"]) for row in rows_of(folder / "emoji-zh.csv")]
    for val_seed in ("0", "3"):
        args = ["--test-per-class", "1", "--val-fraction", "0.5", "--val-seed", val_seed]
        r = runner.invoke(app, ["datasets", "import", "emoji", "--dir", str(folder), *args])
        assert r.exit_code == 0, r.output
        after = [(row["id"], row["split"]) for row in rows_of(folder / "emoji-zh.csv")]
        assert [x for x in after if x[1] == "test"] == [x for x in before if x[1] == "test"]


# ---- iMaterialist Product 2019 -------------------------------------------------------------------


def make_imaterialist(root: Path) -> Path:
    """train.json / val.json as released ({"images": [{"id", "url", "class"}]}) and the images."""
    for name, folder, per_class in (("train.json", "train", 6), ("val.json", "val", 2)):
        images = []
        for c in range(3):
            for i in range(per_class):
                image_id = f"{folder}{c}{i:02d}ab.jpg"
                images.append({"id": image_id, "url": f"https://example.invalid/{image_id}", "class": c})
                png(root / folder / image_id, 10 * c + i)
        (root / name).write_text(json.dumps({"images": images}), encoding="utf-8")
    return root


def test_imaterialist_import_prepare_train(tmp_path):
    root = make_imaterialist(tmp_path / "imat")
    words = {0: "保温杯 白色 cup", 1: "运动鞋 跑步 shoe", 2: "口红 哑光 lipstick"}
    titles = tmp_path / "titles.csv"
    with titles.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "title", "source"])
        for folder, n in (("train", 6), ("val", 2)):
            for c in range(3):
                for i in range(n):
                    if (folder, c, i) == ("train", 2, 5):
                        continue  # no title: left out
                    key = f"{folder}{c}{i:02d}ab" + (".jpg" if i % 2 else "")  # with or without the extension
                    w.writerow([key, f"{words[c]} w{i}\n第二行", "engine"])
        w.writerow(["train001ab.jpg", "a second title", "engine"])  # duplicate id: the first is kept
    out = tmp_path / "m" / "imat.csv"
    s = import_imaterialist(root, titles, out)
    rows = rows_of(out)
    assert (s.rows, s.train, s.test, s.classes) == (23, 17, 6, 3)
    assert s.skipped == {"no title in the titles file": 1, "titles file: duplicate id": 1}
    first = rows[0]
    assert first == {
        "image": str((root / "train" / "train000ab.jpg").resolve()),
        "title": "保温杯 白色 cup w0 第二行",
        "label": "0",
        "split": "train",
        "id": "train000ab.jpg",
    }
    assert {r["split"] for r in rows if r["id"].startswith("val")} == {"test"}
    p = prepare(
        load_recipe(
            REPO / "recipes" / "imaterialist2019.toml",
            [f"data.manifest={out}", "data.image_size=16", "eval.head_threshold=6", *KEEP_ALL],
        ),
        tmp_path / "i.h5",
    )
    assert (p.train_images, p.test_images, p.head_classes) == (17, 6, 2)
    result = train(tiny_recipe(tmp_path / "i.h5", "train.epochs=1"), tmp_path / "run")
    assert np.isfinite(result.history[0]["loss"])


def test_imaterialist_errors(tmp_path):
    root = make_imaterialist(tmp_path / "imat")
    titles = tmp_path / "t.jsonl"
    titles.write_text('{"id": "nope.jpg", "title": "x"}\n', encoding="utf-8")
    with pytest.raises(SicotError, match="no image .* has a title"):
        import_imaterialist(root, titles, tmp_path / "m.csv")
    (tmp_path / "t.csv").write_text("image,title\n", encoding="utf-8")
    with pytest.raises(SicotError, match="missing column 'id'"):
        import_imaterialist(root, tmp_path / "t.csv", tmp_path / "m.csv")
    (root / "val.json").write_text('{"annotations": []}', encoding="utf-8")
    titles.write_text('{"id": "train000ab.jpg", "title": "x"}\n', encoding="utf-8")
    with pytest.raises(SicotError, match="val.json: expected"):
        import_imaterialist(root, titles, tmp_path / "m.csv")


# ---- WebVision 2.0 -------------------------------------------------------------------------------

WV_WORDS = ["tench fish river", "goldfish bowl orange", "shark sea fin", "hen farm bird"]


def make_webvision(root: Path, n_classes: int = 4, per_class: int = 8) -> Path:
    """info/ file lists and synsets, meta/<source>/<query>.json, images under google/ and flickr/."""
    (root / "info").mkdir(parents=True)
    lists: dict[str, list[str]] = {"google": [], "flickr": []}
    for c in range(n_classes):
        query = f"q{c + 1:04d}"
        for source in ("google", "flickr"):
            meta = []
            for i in range(per_class // 2):
                rel = f"{source}/{query}/{i:06d}.jpg"
                png(root / rel, 100 * c + i + (50 if source == "flickr" else 0))
                lists[source].append(f"{rel} {c}")
                title = f"{WV_WORDS[c]} photo {i}" if (c, i, source) != (0, 1, "google") else "   "
                if source == "google":  # entries carry their id (the file stem without zeros)
                    meta.append({"id": str(i), "title": title, "description": f"desc {c}"})
                else:  # entries in file order, Flickr's description object
                    meta.append({"title": title, "description": {"_content": f"flickr {c}"}})
            if source == "google":
                meta.reverse()  # matched by id, not by position
            (root / "meta" / source).mkdir(parents=True, exist_ok=True)
            (root / "meta" / source / f"{query}.json").write_text(json.dumps(meta), encoding="utf-8")
    for source, lines in lists.items():
        (root / "info" / f"train_filelist_{source}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "info" / "synsets.txt").write_text(
        "".join(f"n0000000{c} class {c}\n" for c in range(n_classes)), encoding="utf-8"
    )
    return root


def test_webvision_selection_titles_prepare_train(tmp_path):
    root = make_webvision(tmp_path / "wv")
    out = tmp_path / "wv" / "m.csv"
    s = import_webvision(root, out, classes=3, seed=5)
    chosen = sorted(random.Random(5).sample([0, 1, 2, 3], 3))
    rows = rows_of(out)
    assert sorted({r["label"] for r in rows}) == [f"n0000000{c} class {c}" for c in chosen]
    assert s.classes == 3 and s.notes[0] == "3 of 4 classes (seed 5)"
    by_id = {r["id"]: r for r in rows}
    c = chosen[0]
    assert by_id[f"google/q{c + 1:04d}/000002.jpg"]["title"] == f"{WV_WORDS[c]} photo 2"  # by id, list reversed
    assert by_id[f"flickr/q{c + 1:04d}/000003.jpg"]["title"] == f"{WV_WORDS[c]} photo 3"  # by position
    assert (
        by_id[f"google/q{c + 1:04d}/000002.jpg"]["image"] == f"google/q{c + 1:04d}/000002.jpg"
    )  # relative to the manifest
    assert "split" not in rows[0]
    expected_empty = 1 if 0 in chosen else 0
    assert s.rows == 3 * 8 - expected_empty and s.skipped == ({"empty title": 1} if expected_empty else {})
    both = import_webvision(root, tmp_path / "d.csv", classes=0, sources=("flickr",), text="title+description")
    assert both.classes == 4 and rows_of(tmp_path / "d.csv")[0]["title"] == f"{WV_WORDS[0]} photo 0 flickr 0"
    p = prepare(
        load_recipe(
            REPO / "recipes" / "webvision1k.toml",
            [f"data.manifest={out}", "data.image_size=16", "eval.head_threshold=5", *KEEP_ALL],
        ),
        tmp_path / "w.h5",
    )
    assert p.classes == 3 and p.test_images == 6
    result = train(tiny_recipe(tmp_path / "w.h5", "train.epochs=1"), tmp_path / "run")
    assert np.isfinite(result.history[0]["loss"])


def test_webvision_errors(tmp_path):
    root = make_webvision(tmp_path / "wv", n_classes=2, per_class=2)
    with pytest.raises(SicotError, match="--classes must be between 0 and 2"):
        import_webvision(root, tmp_path / "m.csv", classes=3)
    with pytest.raises(SicotError, match="--text"):
        import_webvision(root, tmp_path / "m.csv", text="tags")
    (root / "info" / "train_filelist_flickr.txt").write_text("flickr/q0001/000000.jpg\n", encoding="utf-8")
    with pytest.raises(SicotError, match=r"train_filelist_flickr.txt:1: expected"):
        import_webvision(root, tmp_path / "m.csv")
    shutil.rmtree(root / "meta")
    with pytest.raises(SicotError, match="no selected image has a title"):
        import_webvision(root, tmp_path / "m.csv", classes=0, sources=("google",))


# ---- recipes --------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted((REPO / "recipes").glob("*.toml")), ids=lambda p: p.name)
def test_every_recipe_loads(path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem
    assert path.read_text(encoding="utf-8").startswith("#")  # the header: how to run it, what it reproduces


def test_paper_recipes_are_the_papers_setting():
    expected = {"imaterialist2019": 200, "webvision1k": 5000, "product-manifest": 200}
    for name, head in expected.items():
        r = load_recipe(REPO / "recipes" / f"{name}.toml")
        assert (
            r.model.backbone,
            r.data.image_size,
            r.train.batch_size,
            r.train.lr,
            r.train.step_size,
            r.train.gamma,
        ) == ("resnet50", 224, 256, 0.1, 1, 0.8)
        assert r.eval.head_threshold == head and r.text.drop_most_frequent == r.text.drop_least_frequent == 0.05
    zh = load_recipe(REPO / "recipes" / "emoji-zh.toml")
    assert Path(zh.data.manifest).resolve() == (REPO / "data" / "emoji" / "emoji-zh.csv").resolve()


# ---- the real packages ----------------------------------------------------------------------------


@pytest.mark.slow
def test_real_emoji_fetch(tmp_path):
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed")
    s = em.fetch_emoji(tmp_path / "emoji")
    assert (s.rows, s.classes, s.train, s.test) == (3501, 98, 2857, 402)  # and 242 validation rows
    assert s.skipped == {
        "Component group (skin-tone and hair swatches)": 5,
        "skin-tone variant of a test emoji (kept out of both sides)": 280,
    }
    assert len(list((tmp_path / "emoji" / em.DATASOURCE.name / em.IMAGES).glob("*.png"))) == 3786


def test_demo_pretraining_recipe_describes_the_demos_long_tailed_set():
    """recipes/demo-pretrain.toml must name demo.toml's long-tailed set, or its classes would not be the complement."""
    from dataclasses import asdict

    demo, pre = load_recipe(REPO / "recipes" / "demo.toml"), load_recipe(REPO / "recipes" / "demo-pretrain.toml")
    long_tail = {k: v for k, v in asdict(pre.data.synthetic).items() if not k.startswith("pretrain_")}
    assert long_tail == {k: v for k, v in asdict(demo.data.synthetic).items() if not k.startswith("pretrain_")}
    assert pre.data.synthetic.pretrain_classes > 0 and demo.data.synthetic.pretrain_classes == 0
    assert (pre.model.backbone, pre.data.image_size, pre.model.encoder) == (
        demo.model.backbone,
        demo.data.image_size,
        "none",
    )
    assert pre.data.out != demo.data.out


def test_titles_files_are_read_as_strictly_as_manifests(tmp_path):
    """A stray quote is an error naming its line, not the rest of the file in one title; TSV quotes
    are the title's own; JSONL splits at newlines only (U+2028, U+0085 are valid inside a JSON string)."""
    from sicot_cli.data.importers.common import read_titles

    csv_file = tmp_path / "t.csv"
    csv_file.write_text('id,title\nt0,cat toy\nt1,"12 inch cat toy\nt2,dog\n', encoding="utf-8")
    with pytest.raises(SicotError, match=r"t\.csv: line 3: malformed CSV"):
        read_titles(csv_file)
    tsv = tmp_path / "t.tsv"
    tsv.write_text('id\ttitle\nt0\t"Deluxe" 12 inch\nt1\tcup\n', encoding="utf-8")
    assert read_titles(tsv)[0] == {"t0": '"Deluxe" 12 inch', "t1": "cup"}
    jsonl = tmp_path / "t.jsonl"
    rows = [{"id": f"t{i}", "title": f"cat{sep}toy"} for i, sep in enumerate(["\u2028", "\x85", "\x1c", " "])]
    jsonl.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    titles, problems = read_titles(jsonl)
    assert sorted(titles) == ["t0", "t1", "t2", "t3"] and not problems, (titles, problems)
    # a bare CR inside an unquoted title: one bad line, not a row cut in two ("t1" and a row "toy")
    cr = tmp_path / "cr.csv"
    cr.write_bytes(b'id,title\nt0,cat toy\nt1,red\rtoy\nt2,"dog\rbed"\n')
    titles, problems = read_titles(cr)
    assert titles == {"t0": "cat toy", "t2": "dog bed"} and problems == {"bad line": 1}, (titles, problems)


def test_each_command_s_seed_help_names_only_what_it_seeds():
    """fetch's --seed said it chose WebVision's classes, a dataset fetch does not take."""
    fetch = " ".join(runner.invoke(app, ["datasets", "fetch", "--help"], env={"COLUMNS": "200"}).output.split())
    assert "Seed of the split (emoji, mdi; icons has no split)" in fetch and "WebVision" not in fetch
    webvision = " ".join(
        runner.invoke(app, ["datasets", "import", "webvision", "--help"], env={"COLUMNS": "200"}).output.split()
    )
    assert "class selection (WebVision)" in webvision
