"""The built-in synthetic long-tailed dataset: determinism, the long tail, titles, pixels."""

from __future__ import annotations

import math
import pickle
import re
from collections import Counter

import numpy as np
import pytest

from sicot_cli.data.synthetic import (
    ATTRIBUTES,
    FILLERS,
    PROMOTIONS,
    ClassSpec,
    SyntheticItem,
    attribute_words,
    render,
    synthetic_items,
    train_counts,
)

DEFAULTS = dict(num_classes=120, max_per_class=300, min_per_class=4, test_per_class=6, language="mixed", seed=0)
CJK = re.compile(r"[\u4e00-\u9fff]")


@pytest.fixture(scope="module")
def demo() -> tuple[list[str], list[SyntheticItem]]:
    return synthetic_items(**DEFAULTS)


def _train_counts(items: list[SyntheticItem]) -> Counter:
    return Counter(it.label for it in items if it.split == "train")


def test_same_arguments_same_items_and_pixels(demo):
    names, items = demo
    names2, items2 = synthetic_items(**DEFAULTS)
    assert names == names2
    assert items == items2
    for it, it2 in zip(items[::500], items2[::500], strict=True):
        assert np.array_equal(render(it, 32), render(it2, 32))
    # A render is a function of the item alone: order and repetition do not matter.
    a = [render(it, 64) for it in items[:3]]
    b = [render(it, 64) for it in reversed(items[:3])][::-1]
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_different_seed_differs(demo):
    names, items = demo
    names1, items1 = synthetic_items(**{**DEFAULTS, "seed": 1})
    assert names != names1
    assert [it.title for it in items] != [it.title for it in items1]
    assert not np.array_equal(render(items[0], 32), render(items1[0], 32))
    # Two images of the same class differ (intra-class variation).
    assert items[0].label == items[1].label
    assert not np.array_equal(render(items[0], 32), render(items[1], 32))


def test_render_shape_dtype_and_content(demo):
    _, items = demo
    for size in (32, 64):
        img = render(items[0], size)
        assert img.shape == (size, size, 3)
        assert img.dtype == np.uint8
        assert img.flags.c_contiguous
        assert img.std() > 10  # not a flat image
    with pytest.raises(ValueError):
        render(items[0], 4)


def test_render_every_shape_glyph_and_pattern():
    # Every attribute value renders (no StopIteration from the scene draws, no unknown name).
    for i, shape in enumerate(ATTRIBUTES["shape"]):
        for j, brand in enumerate(ATTRIBUTES["brand"]):
            pattern = ATTRIBUTES["pattern"][(i + j) % len(ATTRIBUTES["pattern"])]
            spec = ClassSpec(shape, ATTRIBUTES["colour"][(i + 2 * j) % 10], pattern, brand)
            img = render(SyntheticItem("x", spec.name, "", "train", spec, 7 * i + j), 32)
            assert img.shape == (32, 32, 3)


def test_the_object_is_drawn_where_the_class_says():
    # Same seed (same pose and background), different colour: the object's pixels change, so the
    # class attributes reach the image; the brand alone changes only a few pixels (a small mark).
    red = ClassSpec("can", "red", "plain", "panda")
    blue = ClassSpec("can", "blue", "plain", "panda")
    other_brand = ClassSpec("can", "red", "plain", "bee")
    img = {s: render(SyntheticItem("x", s.name, "", "test", s, 3), 64).astype(int) for s in (red, blue, other_brand)}
    colour_diff = (np.abs(img[red] - img[blue]).sum(-1) > 30).mean()
    brand_diff = (np.abs(img[red] - img[other_brand]).sum(-1) > 30).mean()
    assert colour_diff > 0.08
    assert 0 < brand_diff < 0.02


def test_long_tail_and_balanced_test(demo):
    names, items = demo
    counts = _train_counts(items)
    per_class = [counts[n] for n in names]
    # n_k = round(300 * k ** -a), a = ln(300 / 4) / ln(120), at least 4, the last exactly 4 (by hand)
    a = math.log(300 / 4) / math.log(120)
    want = [max(4, round(300 * k**-a)) for k in range(1, 121)]
    want[-1] = 4
    assert per_class == want and per_class[:6] == [300, 161, 111, 86, 70, 60]
    assert per_class[0] == 300 and per_class[-1] == 4
    assert per_class == sorted(per_class, reverse=True)  # class id = rank by training count
    assert sum(c < 20 for c in per_class) > 120 / 2  # most classes are tail classes
    assert sum(c >= 100 for c in per_class) >= 2  # a few with hundreds
    test = Counter(it.label for it in items if it.split == "test")
    assert set(test) == set(names) and set(test.values()) == {6}
    assert {it.split for it in items} == {"train", "test"}


def test_ids_and_names_unique_readable(demo):
    names, items = demo
    assert len(set(names)) == len(names) == 120
    assert len({it.id for it in items}) == len(items)
    assert all(re.fullmatch(r"syn-\d{6}", it.id) for it in items)
    for n in names:
        assert n.isascii() and "," not in n and n.startswith("syn/")
    for it in items:
        assert it.label == it.spec.name
    assert pickle.loads(pickle.dumps(items[5])) == items[5]


def test_near_duplicate_classes_exist(demo):
    names, items = demo
    specs = {it.label: it.spec for it in items}
    diffs = Counter()
    for i, a in enumerate(names):
        for b in names[:i]:
            sa, sb = specs[a].attributes(), specs[b].attributes()
            d = [k for k in sa if sa[k] != sb[k]]
            if len(d) == 1:
                diffs[d[0]] += 1
    assert diffs["brand"] >= 10  # same product, only the small mark differs
    assert diffs["pattern"] >= 10
    assert diffs["colour"] >= 10


def test_tail_words_are_head_words(demo):
    # Every attribute word of a tail class (< 20 images) also occurs in some head-class title.
    names, items = demo
    counts = _train_counts(items)
    head = {n for n in names if counts[n] >= 20}
    assert 5 <= len(head) < 60
    head_titles = " ".join(it.title for it in items if it.label in head and it.split == "train")
    specs = {it.label: it.spec for it in items}
    for n in names:
        if n in head:
            continue
        for attr, value in specs[n].attributes().items():
            for lang in ("en", "zh"):
                for w in attribute_words(attr, value, lang):
                    assert w in head_titles, (n, attr, w)


def test_titles_are_noisy_but_informative(demo):
    _, items = demo
    titles = [it.title for it in items]
    promos = PROMOTIONS["en"] + PROMOTIONS["zh"]
    with_promo = sum(any(p in t for p in promos) for t in titles) / len(titles)
    assert 0.3 < with_promo < 0.9
    assert any(any(f in t for f in FILLERS["en"] + FILLERS["zh"]) for t in titles)
    # Most titles name the brand, not all (titles drop words); never a wrong-free oracle.
    named = [
        any(w in it.title for lg in ("en", "zh") for w in attribute_words("brand", it.spec.brand, lg)) for it in items
    ]
    assert 0.6 < np.mean(named) < 0.95
    # Synonyms appear: more than one word for "mug" across titles.
    mug_words = {
        w for it in items if it.spec.shape == "mug" for w in ("mug", "cup", "马克杯", "杯子", "咖啡杯") if w in it.title
    }
    assert len(mug_words) >= 3
    # Order varies: the brand is not always the first word.
    assert len({it.title.split()[0] for it in items if it.split == "train"}) > 50


def test_languages():
    _, zh = synthetic_items(12, 20, 2, 2, "zh", 0)
    _, en = synthetic_items(12, 20, 2, 2, "en", 0)
    _, mixed = synthetic_items(12, 20, 2, 2, "mixed", 0)
    assert all(CJK.search(it.title) for it in zh)
    assert not any(CJK.search(it.title) for it in en)
    assert all(it.title.isascii() for it in en)
    has_cjk = [bool(CJK.search(it.title)) for it in mixed]
    assert 0.3 < np.mean(has_cjk) < 0.95
    # Code-mixed titles: CJK and latin words in one title ("新款 red 马克杯").
    assert any(CJK.search(it.title) and re.search(r"[a-z]{3}", it.title) for it in mixed)
    # Chinese titles are mostly written without spaces.
    assert np.mean([" " not in it.title for it in zh]) > 0.3


def test_jieba_keeps_chinese_attribute_words_whole():
    from sicot_cli.data.tokenize import tokenize

    zh = sorted(
        {w for a, vals in ATTRIBUTES.items() for v in vals for w in attribute_words(a, v, "zh") if CJK.search(w)}
    )
    neighbours = zh + list(PROMOTIONS["zh"]) + list(FILLERS["zh"])
    ok = total = 0
    for w in zh:
        assert tokenize(w) == [w], w
        for o in neighbours:
            for text in (w + o, o + w):
                total += 1
                ok += w in tokenize(text)
    assert ok / total > 0.98  # jieba glues a few pairs, as it does in real titles


def test_small_configs_and_counts():
    names, items = synthetic_items(2, 5, 5, 1, "en", 3)
    assert len(names) == 2 and len(items) == 12
    assert train_counts(5, 10, 1) == [10, 4, 2, 1, 1]  # round(10 * k ** -(ln 10 / ln 5))
    c = train_counts(50, 200, 3)
    assert c[0] == 200 and c[-1] == 3 and c == sorted(c, reverse=True)


@pytest.mark.parametrize(
    "override",
    [
        {"num_classes": 1},
        {"num_classes": 100_000},
        {"num_classes": 12.0},
        {"max_per_class": 0},
        {"min_per_class": 0},
        {"min_per_class": 400},
        {"test_per_class": 0},
        {"language": "fr"},
        {"seed": -1},
        {"seed": True},
    ],
)
def test_invalid_arguments(override):
    with pytest.raises(ValueError):
        synthetic_items(**{**DEFAULTS, **override})


def test_pretraining_set_is_balanced_seeded_and_disjoint_from_the_long_tailed_set(demo):
    from sicot_cli.data.synthetic import pretraining_items

    names, _ = demo
    pre_names, items = pretraining_items(**DEFAULTS, pretrain_classes=50, pretrain_per_class=3)
    assert len(pre_names) == len(set(pre_names)) == 50
    assert not set(pre_names) & set(names)  # no demo class is seen in pretraining
    assert set(_train_counts(items).values()) == {3}
    assert Counter(it.label for it in items if it.split == "test") == Counter(
        {n: DEFAULTS["test_per_class"] for n in pre_names}
    )
    assert all(it.id.startswith("pre-") for it in items)
    again = pretraining_items(**DEFAULTS, pretrain_classes=50, pretrain_per_class=3)
    assert (pre_names, items) == again
    assert np.array_equal(render(items[0], 32), render(again[1][0], 32))
    other, _ = pretraining_items(**{**DEFAULTS, "seed": 1}, pretrain_classes=50, pretrain_per_class=3)
    assert other != pre_names
    # it uses its own random streams: the long-tailed set is what it was
    assert synthetic_items(**DEFAULTS) == demo
    # every free combination can be used, one more cannot
    n_free = int(np.prod([len(v) for v in ATTRIBUTES.values()])) - DEFAULTS["num_classes"]
    assert len(pretraining_items(**DEFAULTS, pretrain_classes=n_free, pretrain_per_class=1)[0]) == n_free
    with pytest.raises(ValueError, match="pretrain_classes must be between 1 and 3080"):
        pretraining_items(**DEFAULTS, pretrain_classes=n_free + 1, pretrain_per_class=1)


def test_a_new_scene_part_draws_from_its_own_stream_and_changes_no_other(demo, monkeypatch):
    """A part added later takes Draws.extra(): every existing parameter, and so every image, stays."""
    from sicot_cli.data import synthetic

    items = demo[1][:12]
    before = [render(it, 32) for it in items]
    extra = []

    def object_with_a_new_part(sub, xs, ys, pose, spec, size, draws):  # noqa: ANN001, ANN202
        extra.append(draws.extra("sticker", 3))
        return real_object(sub, xs, ys, pose, spec, size, draws)

    real_object = synthetic._object
    monkeypatch.setattr(synthetic, "_object", object_with_a_new_part)
    after = [render(it, 32) for it in items]
    for a, b in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)
    assert len(extra) == 12 and len({tuple(e) for e in extra}) == 12  # per-item numbers, not one constant
    # ...while one more number drawn in front of the frozen layout would shift every scene
    monkeypatch.setattr(synthetic, "_LAYOUT", (("first", 1), *synthetic._LAYOUT[:-1], ("spare", 3)))
    monkeypatch.setattr(synthetic._Draws, "check_used", lambda self: None)
    assert all(not np.array_equal(a, render(it, 32)) for a, it in zip(before, items, strict=True))


def test_a_part_that_draws_less_than_its_share_is_a_bug_not_a_silent_shift(demo, monkeypatch):
    from sicot_cli.data import synthetic

    layout = tuple((name, n + 1) if name == "pose" else (name, n) for name, n in synthetic._LAYOUT)
    monkeypatch.setattr(synthetic, "_LAYOUT", layout)
    with pytest.raises(RuntimeError, match="part 'pose' drew fewer numbers"):
        render(demo[1][0], 32)
