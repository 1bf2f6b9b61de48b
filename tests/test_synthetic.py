"""The built-in synthetic long-tailed dataset: deterministic, long-tailed, a fair miniature."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

from sicot_cli.data.synthetic import PROMOTIONS, render, synthetic_items
from sicot_cli.data.tokenize import tokenize

ARGS = dict(num_classes=120, max_per_class=300, min_per_class=4, test_per_class=6, language="mixed", seed=0)
CJK = re.compile(r"[\u4e00-\u9fff]")


@pytest.fixture(scope="module")
def data():
    return synthetic_items(**ARGS)


def test_deterministic_and_seeded(data):
    names, items = data
    names2, items2 = synthetic_items(**ARGS)
    assert names == names2 and items == items2
    for it in items[:3]:
        assert np.array_equal(render(it, 32), render(it, 32))
    _, other = synthetic_items(**{**ARGS, "seed": 1})
    assert [i.title for i in other[:20]] != [i.title for i in items[:20]]
    assert not np.array_equal(render(items[0], 32), render(items[1], 32))


def test_images_shape_and_dtype(data):
    _, items = data
    for size in (32, 64):
        img = render(items[5], size)
        assert img.shape == (size, size, 3) and img.dtype == np.uint8
        assert img.std() > 5  # not a blank image


def test_long_tail_and_balanced_test(data):
    names, items = data
    train = Counter(i.label for i in items if i.split == "train")
    test = Counter(i.label for i in items if i.split == "test")
    counts = [train[n] for n in names]
    assert counts == sorted(counts, reverse=True)
    assert counts[0] == 300 and counts[-1] == 4
    assert sum(c < 20 for c in counts) >= 80
    assert set(test.values()) == {6} and len(test) == 120
    assert len(set(names)) == 120 and all(n.startswith("syn/") and n.isascii() and "," not in n for n in names)


def test_near_duplicate_classes_exist(data):
    _, items = data
    specs = {i.label: i.spec.attributes() for i in items}
    values = list(specs.values())
    pairs = sum(1 for a in range(len(values)) for b in range(a + 1, len(values)) if sum(values[a][k] != values[b][k] for k in values[a]) == 1)
    assert pairs >= 20


def test_tail_words_occur_in_head_titles(data):
    names, items = data
    train = Counter(i.label for i in items if i.split == "train")
    head = {n for n in names if train[n] >= 40}
    head_words = {w for i in items if i.label in head and i.split == "train" for w in tokenize(i.title)}
    tail_words = [w for i in items if i.label not in head and i.split == "train" for w in tokenize(i.title)]
    shared = sum(w in head_words for w in tail_words) / len(tail_words)
    assert shared > 0.9


def test_noise_and_languages():
    _, mixed = synthetic_items(**ARGS)
    promo = [p.lower() for words in PROMOTIONS.values() for p in words]
    assert sum(any(p in i.title.lower() for p in promo) for i in mixed) > len(mixed) // 10
    _, zh = synthetic_items(**{**ARGS, "language": "zh", "num_classes": 20})
    _, en = synthetic_items(**{**ARGS, "language": "en", "num_classes": 20})
    assert all(CJK.search(i.title) for i in zh)
    assert not any(CJK.search(i.title) for i in en)


@pytest.mark.parametrize("bad", [{"num_classes": 1}, {"min_per_class": 0}, {"language": "fr"}, {"max_per_class": 2, "min_per_class": 4}])
def test_invalid_arguments(bad):
    with pytest.raises(ValueError):
        synthetic_items(**{**ARGS, **bad})
