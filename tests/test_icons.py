"""The icon datasets: rasterisation, the mdi evaluation set, the icons pretraining corpus, their fetch.

Fixtures are tiny packages in each package's real layout (made here): ``@mdi/svg@7.4.47``'s
``meta.json`` + ``svg/``; the five pretraining sets' folders as ``sicot_cli.data.importers.icons``
documents them. The real npm fetch is the `slow` test at the end.
"""

from __future__ import annotations

import hashlib
import io
import json
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
from sicot_cli.data.images import load_image
from sicot_cli.data.importers import emoji as em
from sicot_cli.data.importers import icons as ic
from sicot_cli.data.importers import mdi
from sicot_cli.data.importers.npm import NpmPackage, checksums
from sicot_cli.data.importers.svg import PALETTE, palette_color, rasterise, render_mask
from sicot_cli.data.importers.svg import no_png_reason as svg_no_png
from sicot_cli.data.prepare import prepare
from sicot_cli.errors import SicotError
from sicot_cli.train import train

REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()


def svg(shape: int) -> str:
    """A 24 x 24 icon: a bar at an x given by ``shape`` (distinct shapes, distinct rasters)."""
    x = shape % 20
    return f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 24 24"><rect x="{x}" y="2" width="4" height="20" fill="currentColor"/></svg>'


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


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


def rows_of(path: Path) -> list[dict[str, str]]:
    import csv

    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# ---- rasterisation --------------------------------------------------------------------------------


def test_render_is_the_exact_coverage_and_prepare_reads_it_back(tmp_path):
    half = '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 10 10"><rect width="5" height="10" fill="currentColor"/></svg>'
    mask = render_mask(half, 8)
    assert mask.dtype == np.uint8 and (mask[:, :4] == 255).all() and (mask[:, 4:] == 0).all()
    # a wide viewBox is letterboxed into the square, never stretched
    wide = render_mask(
        '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 20 10"><rect width="20" height="10"/></svg>', 8
    )
    assert (wide[2:6] == 255).all() and (wide[:2] == 0).all() and (wide[6:] == 0).all()
    write(tmp_path / "half.svg", half)
    write(tmp_path / "broken.svg", "<svg")
    jobs = [(tmp_path / "half.svg", "a/half.png", "#e15759"), (tmp_path / "broken.svg", "a/broken.png", "#000000")]
    assert rasterise(jobs, tmp_path / "png", 8, "t") == {"png": 1, "unrenderable": 1}
    # round trip through prepare's decoder: alpha composited on white, the ink in its colour
    back = load_image(tmp_path / "png/a/half.png", 8)
    assert (back[:, :4] == (0xE1, 0x57, 0x59)).all() and (back[:, 4:] == 255).all()
    assert not (tmp_path / "png/a/broken.png").exists()
    # a complete folder drawn the same way is kept; another size, colour or icon list redraws it
    before = (tmp_path / "png/a/half.png").read_bytes()
    (tmp_path / "half.svg").write_text(half.replace('width="5"', 'width="6"'), encoding="utf-8")  # same size in bytes
    assert rasterise(jobs, tmp_path / "png", 8, "t") == {"png": 1, "unrenderable": 1}
    assert (tmp_path / "png/a/half.png").read_bytes() == before
    assert rasterise(jobs[:1], tmp_path / "png", 8, "t") == {"png": 1, "unrenderable": 0}
    assert (tmp_path / "png/a/half.png").read_bytes() != before  # the new drawing
    recoloured = [(tmp_path / "half.svg", "a/half.png", "#000000")]
    rasterise(recoloured, tmp_path / "png", 8, "t")
    back = load_image(tmp_path / "png/a/half.png", 8)
    assert (back[:, :4] == 0).all() and (back[:, 5:] == 255).all()  # black ink, 6/10 of the width
    (tmp_path / "half.svg").unlink()
    with pytest.raises(SicotError, match="half.svg: icon not found; delete its folder and fetch again"):
        rasterise(recoloured, tmp_path / "png", 16, "t")
    assert (tmp_path / "png/a/half.png").is_file()  # the failed redraw left the complete folder alone
    with pytest.raises(SicotError, match="unsafe output path"):
        rasterise([(tmp_path / "broken.svg", "../x.png", "#000000")], tmp_path / "png2", 8, "t")


def test_palette_colour_is_stable_and_from_the_palette():
    ids = [f"set/style/icon-{i}" for i in range(200)]
    colours = [palette_color(i) for i in ids]
    assert set(colours) == set(PALETTE)  # 200 ids reach every colour
    assert (
        palette_color("set/style/icon-7")
        == PALETTE[int(hashlib.sha256(b"set/style/icon-7").hexdigest(), 16) % len(PALETTE)]
    )


# ---- mdi ------------------------------------------------------------------------------------------

# name, id, base id, tags, aliases, deprecated
MDI_ICONS = [
    ("car", "C", "C", ["Automotive"], ["automobile"], False),
    ("car-outline", "C1", "C", ["Automotive"], [], False),
    ("car-off", "C2", "C1", ["Automotive"], [], False),  # a chain: car-off -> car-outline -> car
    ("car-key", "K", "K", ["Automotive"], [], False),
    ("car-wash", "W", "W", ["Automotive"], [], False),
    ("tire", "T", "T", ["Automotive"], [], False),
    ("apple", "A", "A", ["Food / Drink"], ["fruit"], False),
    ("apple-outline", "A1", "A", ["Food / Drink"], [], False),
    ("bread", "B", "B", ["Food / Drink"], [], False),
    ("cup", "U", "U", ["Food / Drink"], [], False),
    ("cup-car", "U1", "C", ["Food / Drink"], [], False),  # family "car" in another class
    ("ferry", "F", "F", ["Transportation + Water"], [], False),
    ("home", "H", "H", [], [], False),  # no category
    ("home-car", "H1", "H1", ["Automotive", "Places"], [], False),  # several
    ("logo", "L", "L", ["Brand / Logo"], [], True),  # deprecated
    ("ghost", "G", "G", ["Automotive"], [], False),  # no SVG
]


def make_mdi(root: Path) -> Path:
    src = root / mdi.MDI.folder
    meta = [
        {"id": i, "baseIconId": b, "name": n, "aliases": a, "tags": t, "deprecated": d}
        for n, i, b, t, a, d in MDI_ICONS
    ]
    write(src / "meta.json", json.dumps(meta))
    write(src / "LICENSE", "Pictogrammers Free License")
    for k, (n, *_rest) in enumerate(MDI_ICONS):
        if n != "ghost":
            write(src / "svg" / f"{n}.svg", svg(k))
    return root


def test_mdi_classes_titles_and_family_split(tmp_path):
    folder = make_mdi(tmp_path / "mdi")
    s = mdi.import_mdi(folder, test_per_class=0, seed=0, val_fraction=0)  # every usable icon is a training row
    rows = {r["id"]: r for r in rows_of(folder / "mdi.csv")}
    assert s.skipped == {"deprecated": 1, "no category": 1, "several categories": 1, "SVG missing": 1}
    assert len(rows) == s.train == 12 and s.test == 0 and s.classes == 3
    assert rows["car"]["title"] == "car automobile" and rows["car"]["label"] == "Automotive"
    assert rows["apple"]["title"] == "apple fruit" and rows["apple-outline"]["title"] == "apple outline"
    s = mdi.import_mdi(folder, test_per_class=2, seed=0)
    rows = {r["id"]: r for r in rows_of(folder / "mdi.csv")}
    families = {"car": "C", "car-outline": "C", "car-off": "C", "cup-car": "C", "apple": "A", "apple-outline": "A"}
    fam = {r: families.get(r, r) for r in rows}
    test = {r for r, row in rows.items() if row["split"] == "test"}
    train = set(rows) - test
    assert not {fam[r] for r in test} & {fam[r] for r in train}  # no family on both sides
    # per class: min(2, families // 2) test icons, one per family, the family's base when it is in the class
    per_class = {
        label: sorted(r for r in test if rows[r]["label"] == label)
        for label in ("Automotive", "Food / Drink", "Transportation + Water")
    }
    assert [len(v) for v in per_class.values()] == [2, 2, 0]  # Automotive: 4 families, Food: 4 (A, B, U, C), Water: 1
    assert not {"car-outline", "car-off", "apple-outline"} & test  # never a variant when the base is in the class
    left_out = {r for r, _, _, t, _, d in MDI_ICONS if len(t) == 1 and not d and r != "ghost"} - set(rows)
    assert s.skipped["variant of a test icon's family (kept out of both sides)"] == len(left_out)
    assert left_out and all(families.get(r, r) in {fam[t] for t in test} for r in left_out)
    assert (s.rows, s.train, s.test) == (len(rows), len(train), len(test))
    # the images are the rasterised SVGs, black on transparent
    img = np.asarray(Image.open(folder / rows["tire"]["image"]))
    assert img.shape == (64, 64, 4) and (img[..., :3] == 0).all() and img[..., 3].max() == 255
    # deterministic
    before = (folder / "mdi.csv").read_bytes()
    mdi.import_mdi(folder, test_per_class=2, seed=0)
    assert (folder / "mdi.csv").read_bytes() == before
    # validation rows are whole families, within the budget, never sharing a family with train or test
    for seed in range(4):
        mdi.import_mdi(folder, test_per_class=1, seed=seed, val_fraction=0.5)
        rows = rows_of(folder / "mdi.csv")
        sides = {
            side: {families.get(r["id"], r["id"]) for r in rows if r["split"] == side}
            for side in ("train", "val", "test")
        }
        assert (
            sides["val"]
            and not sides["val"] & sides["train"]
            and not sides["val"] & sides["test"]
            and not sides["train"] & sides["test"]
        )
        for label in {r["label"] for r in rows}:
            n = {side: sum(r["label"] == label and r["split"] == side for r in rows) for side in ("train", "val")}
            assert n["val"] <= int(0.5 * (n["train"] + n["val"]))
    # val_seed re-draws the validation families alone: the test rows stay
    mdi.import_mdi(folder, test_per_class=1, seed=1, val_fraction=0.5)
    ref = rows_of(folder / "mdi.csv")
    assert (
        mdi.import_mdi(folder, test_per_class=1, seed=1, val_fraction=0.5, val_seed=1)
        and rows_of(folder / "mdi.csv") == ref
    )
    folds = set()
    for val_seed in range(6):
        mdi.import_mdi(folder, test_per_class=1, seed=1, val_fraction=0.5, val_seed=val_seed)
        rows = rows_of(folder / "mdi.csv")
        assert [(r["id"], r["split"] == "test") for r in rows] == [(r["id"], r["split"] == "test") for r in ref]
        val = {families.get(r["id"], r["id"]) for r in rows if r["split"] == "val"}
        assert val and not val & {families.get(r["id"], r["id"]) for r in rows if r["split"] == "train"}
        folds.add(frozenset(val))
    assert len(folds) > 1
    with pytest.raises(SicotError, match=r"val-fraction must be in \[0, 0.5\]"):
        mdi.import_mdi(folder, val_fraction=0.6)
    with pytest.raises(SicotError, match="test-per-class must be >= 0"):
        mdi.import_mdi(folder, test_per_class=-1)
    with pytest.raises(SicotError, match="run `sicot datasets fetch mdi` first"):
        mdi.import_mdi(tmp_path / "nowhere")


def test_mdi_manifest_prepares_and_trains(tmp_path):
    folder = make_mdi(tmp_path / "mdi")
    mdi.import_mdi(folder, test_per_class=1, seed=0, val_fraction=0.5)
    recipe = load_recipe(
        REPO / "recipes" / "mdi.toml", [f"data.manifest={folder / 'mdi.csv'}", "data.image_size=16", *KEEP_ALL]
    )
    out = tmp_path / "mdi.h5"
    info = prepare(recipe, out)
    manifest = rows_of(folder / "mdi.csv")
    # every manifest row is kept on its side (prepare keeps the manifest's own validation rows)
    n = {side: sum(r["split"] == side for r in manifest) for side in ("train", "val", "test")}
    assert n["val"] > 0
    assert (info.classes, info.train_images, info.val_images, info.test_images, info.skipped) == (
        3,
        n["train"],
        n["val"],
        n["test"],
        {},
    )
    result = train(tiny_recipe(out, "train.epochs=1", "train.batch_size=4"), tmp_path / "run")
    assert len(result.history) == 1 and np.isfinite(result.history[0]["loss"])


# ---- icons (the pretraining corpus) ---------------------------------------------------------------


def make_icon_sets(root: Path) -> Path:
    """The five sets, with the concept "heart" in all of them and "bolt" in two; the rest single."""
    k = iter(range(1000))
    t = root / ic.TABLER.folder
    for style in ("outline", "filled"):
        write(t / "icons" / style / "heart.svg", svg(next(k)))
    write(t / "icons/outline/a-b.svg", svg(next(k)))
    write(t / "icons.json", json.dumps({"heart": {"name": "heart", "category": "Health", "tags": ["love", "like"]}}))
    lu = root / ic.LUCIDE.folder
    write(lu / "icons/heart.svg", svg(next(k)))
    write(lu / "icons/bolt.svg", svg(next(k)))
    write(lu / "tags.json", json.dumps({"bolt": ["lightning", "power"]}))
    ph = root / ic.PHOSPHOR.folder
    for w in ("thin", "light", "regular", "bold", "fill", "duotone"):
        for name in ("heart", "bolt", "acorn"):
            write(ph / "assets" / w / (f"{name}.svg" if w == "regular" else f"{name}-{w}.svg"), svg(next(k)))
    bs = root / ic.BOOTSTRAP.folder
    write(bs / "icons/heart.svg", svg(next(k)))
    write(bs / "icons/heart-fill.svg", svg(next(k)))
    oc = root / ic.OCTICONS.folder
    write(oc / "build/svg/heart-16.svg", svg(next(k)))
    write(oc / "build/svg/heart-24.svg", svg(next(k)))
    write(oc / "build/data.json", json.dumps({"heart": {"name": "heart", "keywords": ["sponsor"]}}))
    for pkg in ic.PACKAGES:
        write(root / pkg.folder / "LICENSE", "MIT License")
    return root


def test_icons_pool_concepts_across_sets_and_styles(tmp_path):
    folder = make_icon_sets(tmp_path / "icons")
    s = ic.import_icons(folder, min_images=4)
    rows = rows_of(folder / "icons.csv")
    assert list(rows[0]) == ["image", "title", "label", "id"]  # no split: prepare draws it
    by_label: dict[str, list[str]] = {}
    for r in rows:
        by_label.setdefault(r["label"], []).append(r["id"])
    # heart: 2 Tabler + 1 Lucide + 6 Phosphor + 2 Bootstrap + 2 Octicons; bolt: 1 Lucide + 6 Phosphor;
    # acorn: 6 Phosphor; a-b (1 image) is left out
    assert {k: len(v) for k, v in by_label.items()} == {"heart": 13, "bolt": 7, "acorn": 6}
    assert s.skipped == {"concept with fewer than 4 images": 1} and (s.rows, s.classes) == (26, 3)
    assert (
        "phosphor-icons-core/duotone/heart-duotone" in by_label["heart"]
        and "primer-octicons/24px/heart-24" in by_label["heart"]
    )
    titles = {r["id"]: r["title"] for r in rows}
    assert (
        titles["tabler-icons/filled/heart"] == "heart love like"
        and titles["lucide-static/regular/bolt"] == "bolt lightning power"
    )
    assert (
        titles["primer-octicons/16px/heart-16"] == "heart sponsor"
        and titles["bootstrap-icons/fill/heart-fill"] == "heart"
    )
    # every image in its palette colour
    for r in rows[:5]:
        a = np.asarray(Image.open(folder / r["image"]))
        ink = a[a[..., 3] > 0][:, :3]
        want = palette_color(r["id"])
        assert (ink == [int(want[i : i + 2], 16) for i in (1, 3, 5)]).all()
    # the names and tags as a word2vec corpus (embed.corpus): every tagged icon, then the other
    # sets' names once each; no category (Tabler's "Health" is a label, not a word of the icon)
    assert (folder / ic.CORPUS).read_text(encoding="utf-8").splitlines() == [
        "heart love like",
        "bolt lightning power",
        "heart sponsor",
        "acorn",
        "bolt",
        "heart",
    ]
    assert any("icon-words.txt (6 sentences" in n for n in s.notes)
    assert ic.import_icons(folder, min_images=2).classes == 3  # a-b's single image can't be split
    with pytest.raises(SicotError, match="min_images must be >= 2"):
        ic.import_icons(folder, min_images=1)


def test_pretraining_corpus_is_disjoint_from_the_evaluation_sets():
    ic.check_disjoint()  # the shipped corpus
    evaluated = {p.name for pkgs in ic.EVALUATED.values() for p in pkgs}
    assert evaluated == {em.DATASOURCE.name, em.EMOJIBASE.name, mdi.MDI.name}  # every fetchable evaluation set
    assert not evaluated & {p.name for p in ic.PACKAGES}
    assert set(ic.READERS) == {p.name for p in ic.PACKAGES} == set(ic.LICENCES)
    with pytest.raises(SicotError, match=r"shares @mdi/svg with the evaluation dataset 'mdi'"):
        ic.check_disjoint((*ic.PACKAGES, mdi.MDI))
    with pytest.raises(SicotError, match="emoji-datasource-google"):
        ic.fetch_icons(
            Path("/nonexistent"), npm=None, packages=(ic.TABLER, em.DATASOURCE)
        )  # refused before any download


# ---- fetch ----------------------------------------------------------------------------------------


def test_fetch_verifies_pins_and_refuses_a_tampered_tarball(tmp_path):
    src = make_icon_sets(tmp_path / "src")
    write(src / ic.TABLER.folder / "icons/outline/heart.js", "not an svg")  # not on the allow-list
    folder = tmp_path / "data"
    folder.mkdir()
    pkgs = []
    for pkg in ic.PACKAGES:
        tgz = folder / pkg.tarball
        pack(src / pkg.folder, tgz)
        pkgs.append(pinned(pkg, tgz))
    assert (folder / "tabler-icons-3.52.0.tgz").is_file()  # a scoped package's tarball, as npm names it
    s = ic.fetch_icons(folder, npm=None, packages=tuple(pkgs))  # tarballs present: npm not needed
    assert s.classes == 3 and not (folder / ic.TABLER.folder / "icons/outline/heart.js").exists()
    # a tarball changed after pinning is refused, naming the file, and nothing of it is unpacked
    shutil.rmtree(folder / ic.LUCIDE.folder)
    write(src / ic.LUCIDE.folder / "icons/evil.svg", svg(3))
    pack(src / ic.LUCIDE.folder, folder / ic.LUCIDE.tarball)
    with pytest.raises(SicotError, match=r"lucide-static-1\.62\.0\.tgz: checksum mismatch for lucide-static@1\.62\.0"):
        ic.fetch_icons(folder, npm=None, packages=tuple(pkgs))
    assert not (folder / ic.LUCIDE.folder).exists()
    # no tarball and no npm: the command to run instead
    (folder / ic.LUCIDE.tarball).unlink()
    with pytest.raises(SicotError, match=r"npm is not installed: in .* run `npm pack lucide-static@1\.62\.0`"):
        ic.fetch_icons(folder, npm=None, packages=tuple(pkgs))


def test_fetch_never_unpacks_outside_its_folder(tmp_path):
    src = make_mdi(tmp_path / "src")
    evil = tarfile.TarInfo("package/../../svg/evil.svg")
    evil.size = 3
    link = tarfile.TarInfo("package/svg/link.svg")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    folder = tmp_path / "data"
    folder.mkdir()
    tgz = folder / mdi.MDI.tarball
    pack(src / mdi.MDI.folder, tgz, extra=[evil])
    s = mdi.fetch_mdi(folder, npm=None, test_per_class=1, packages=(pinned(mdi.MDI, tgz),))
    assert s.rows > 0 and not list(tmp_path.rglob("evil.svg"))
    shutil.rmtree(folder / mdi.MDI.folder)
    pack(src / mdi.MDI.folder, tgz, extra=[link])
    with pytest.raises(SicotError, match="not a regular file"):
        mdi.fetch_mdi(folder, npm=None, packages=(pinned(mdi.MDI, tgz),))
    assert not (folder / mdi.MDI.folder).exists() and not list(folder.glob(".mdi-svg.tmp-*"))


def test_fetch_runs_npm_pack_for_scoped_packages(tmp_path):
    src = make_mdi(tmp_path / "src")
    store = tmp_path / "registry"
    store.mkdir()
    pack(src / mdi.MDI.folder, store / mdi.MDI.tarball)
    pkg = pinned(mdi.MDI, store / mdi.MDI.tarball)
    npm = tmp_path / "npm"  # stands in for `npm pack @scope/name@VERSION --silent`: npm's file name lands in the cwd
    npm.write_text(
        f'#!/bin/sh\n[ "$1" = pack ] || exit 9\n[ "$2" = "@mdi/svg@7.4.47" ] || exit 8\ncp "{store}/mdi-svg-7.4.47.tgz" .\n',
        encoding="utf-8",
    )
    npm.chmod(0o755)
    folder = tmp_path / "data"
    s = mdi.fetch_mdi(folder, npm=str(npm), test_per_class=1, packages=(pkg,))
    assert s.classes == 3 and (folder / "mdi-svg-7.4.47.tgz").is_file() and (folder / "mdi-svg" / "meta.json").is_file()
    assert not list(folder.glob(".npm-pack-*"))


def test_cli_fetch_names_the_commands_and_the_next_step(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no npm on PATH
    r = runner.invoke(app, ["datasets", "fetch", "mdi", "--dir", str(tmp_path / "d")])
    assert r.exit_code == 2 and "npm pack @mdi/svg@7.4.47" in " ".join(r.output.split())
    r = runner.invoke(app, ["datasets", "fetch", "icons", "--dir", str(tmp_path / "i")])
    out = " ".join(r.output.split())
    assert r.exit_code == 2 and all(f"npm pack {p.spec}" in out for p in ic.PACKAGES)
    folder = make_mdi(tmp_path / "m")
    r = runner.invoke(
        app, ["datasets", "import", "mdi", "--dir", str(folder), "--test-per-class", "0", "--val-fraction", "0"]
    )
    assert r.exit_code == 0, r.output
    assert [r["split"] for r in rows_of(folder / "mdi.csv")] == ["train"] * 12
    r = runner.invoke(app, ["datasets", "fetch", "imagenet"])
    assert r.exit_code == 2 and "fetch` knows emoji, mdi, icons" in r.output


def test_icon_recipes_match_their_datasets():
    pre, ev = load_recipe(REPO / "recipes" / "icons-pretrain.toml"), load_recipe(REPO / "recipes" / "mdi.toml")
    zh = load_recipe(REPO / "recipes" / "emoji-zh.toml")
    assert Path(pre.data.manifest).resolve() == (REPO / "data" / "icons" / ic.MANIFEST).resolve()
    assert Path(ev.data.manifest).resolve() == (REPO / "data" / "mdi" / mdi.MANIFEST).resolve()
    # a pretrained stream fits the recipes it serves: same backbone and image size, image-only
    for r in (ev, zh):
        assert (pre.model.backbone, pre.data.image_size) == (r.model.backbone, r.data.image_size)
    assert pre.model.encoder == "none" and pre.data.out not in (ev.data.out, zh.data.out)


# ---- the real packages ----------------------------------------------------------------------------


@pytest.mark.slow
def test_real_icon_fetch_and_disjointness(tmp_path):
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed")
    s = mdi.fetch_mdi(tmp_path / "mdi")
    assert (s.rows, s.classes, s.train, s.test) == (3254, 59, 2751, 245)  # and 258 validation rows
    p = ic.fetch_icons(tmp_path / "icons")
    assert (p.rows, p.classes) == (11212, 1629)

    # no pretraining image is an evaluation image: compare the ink masks, whatever their colour
    def masks(folder: Path) -> set[str]:
        return {hashlib.sha256(np.asarray(Image.open(f))[..., 3].tobytes()).hexdigest() for f in folder.rglob("*.png")}

    assert not masks(tmp_path / "icons" / ic.PNG) & masks(tmp_path / "mdi" / mdi.PNG)


def test_an_icon_whose_png_was_deleted_is_counted(tmp_path):
    # the rasteriser's marker keeps it from drawing again: the row went missing without a word
    folder = make_mdi(tmp_path / "mdi")
    s = mdi.import_mdi(folder, test_per_class=0, seed=0, val_fraction=0)
    assert not any(k.startswith("no PNG") for k in s.skipped)
    (folder / "png" / "tire.png").unlink()
    again = mdi.import_mdi(folder, test_per_class=0, seed=0, val_fraction=0)
    assert again.rows == s.rows - 1
    assert again.skipped[svg_no_png(folder / "png")] == 1
