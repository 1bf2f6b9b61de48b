"""Metrics on hand-made cases whose answers are worked out in the comments."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from sicot_cli.metrics import (
    evaluate,
    head_tail_groups,
    many_medium_few_groups,
    per_class_accuracy,
    topk_hits,
)

# 5 samples, 3 classes: the predictions (classes best first) of these scores.
#   row  scores            label  ranking    top1  top2
#   0    [.1, .7, .2]      1      [1, 2, 0]  hit   hit
#   1    [.5, .3, .2]      2      [0, 1, 2]  miss  miss
#   2    [.2, .3, .5]      2      [2, 1, 0]  hit   hit
#   3    [.6, .1, .3]      1      [0, 2, 1]  miss  miss
#   4    [.3, .4, .3]      0      [1, 0, 2]  miss  hit
LABELS = np.array([1, 2, 2, 1, 0])
RANKING = np.array([[1, 2, 0], [0, 1, 2], [2, 1, 0], [0, 2, 1], [1, 0, 2]])


def test_topk_hits_and_overall_accuracy_hand_case():
    top = RANKING
    np.testing.assert_array_equal(topk_hits(top, LABELS, 1), [True, False, True, False, False])
    np.testing.assert_array_equal(topk_hits(top, LABELS, 2), [True, False, True, False, True])
    np.testing.assert_array_equal(topk_hits(top, LABELS, 3), [True] * 5)
    res = evaluate(top, LABELS, np.array([500, 300, 50]), head_threshold=200, ks=(1, 2, 3))
    assert res["n_test"] == 5
    assert res["top1"] == 40.0  # 2 / 5
    assert res["top2"] == 60.0  # 3 / 5
    assert res["top3"] == 100.0  # 3 of 3 classes ranked
    # per class top1: class 0 -> 0/1, class 1 -> 1/2, class 2 -> 1/2
    assert res["per_class_top1"] == [0.0, 50.0, 50.0]
    assert res["per_class_top2"] == [100.0, 50.0, 50.0]
    # head = classes 0, 1 (500, 300 >= 200); tail = class 2 (50)
    assert res["head_top1"] == 25.0
    assert res["tail_top1"] == 50.0
    assert res["head_top2"] == 75.0
    assert (res["head_classes"], res["tail_classes"]) == (2, 1)


def test_k_larger_than_classes_when_every_class_is_ranked():
    top = np.array([[1, 0], [0, 1]])  # 2 classes, both ranked
    res = evaluate(top, np.array([0, 0]), np.array([10, 10]), head_threshold=5, ks=(1, 3))
    assert res["top1"] == 50.0
    assert res["top3"] == 100.0


def test_absent_class_is_nan_and_excluded_and_empty_group_is_none():
    # train counts: class 0 head (300), class 1 tail (50), class 2 tail and few (10).
    # Test set has no image of class 2.
    labels = np.array([0, 0, 1, 1])
    top = np.array([[0], [1], [1], [1]])
    hits = topk_hits(top, labels, 1)
    acc = per_class_accuracy(hits, labels, 3)
    assert acc[0] == 50.0 and acc[1] == 100.0 and math.isnan(acc[2])  # percent, like every accuracy
    # 100 * hits / images, not 100 * (hits / images): 11 of 20 is exactly 55 (100 * 0.55 is 55.00000000000001)
    assert per_class_accuracy(np.arange(20) < 11, np.zeros(20, np.int64), 1)[0] == 55.0
    res = evaluate(top, labels, np.array([300, 50, 10]), head_threshold=200, ks=(1,))
    assert res["per_class_top1"] == [50.0, 100.0, None]
    assert res["tail_top1"] == 100.0  # class 2 excluded, not counted as 0
    assert res["tail_classes"] == 1
    assert res["few_top1"] is None and res["few_classes"] == 0
    assert res["many_top1"] == 50.0 and res["medium_top1"] == 100.0


def test_head_tail_boundary_is_head():
    g = head_tail_groups(np.array([200, 199, 1, 0, 5000]), 200)
    np.testing.assert_array_equal(g["head"], [True, False, False, False, True])
    np.testing.assert_array_equal(g["tail"], [False, True, True, False, False])


def test_many_medium_few_boundaries():
    g = many_medium_few_groups(np.array([101, 100, 20, 19, 0]), many=100, few=20)
    np.testing.assert_array_equal(g["many"], [True, False, False, False, False])
    np.testing.assert_array_equal(g["medium"], [False, True, True, False, False])
    np.testing.assert_array_equal(g["few"], [False, False, False, True, True])


def test_class_averaged_differs_from_image_level():
    # class 0: 8 test images, all hit (100%); class 1: 2 images, none hit (0%);
    # class 2: 4 images, 1 hit (25%). Image-level: 9 / 14. Class-averaged tail {0, 1}: 50.
    labels = np.array([0] * 8 + [1] * 2 + [2] * 4)
    preds = np.array([0] * 8 + [0] * 2 + [2, 0, 0, 0])
    res = evaluate(preds[:, None], labels, np.array([150, 120, 500]), head_threshold=200, ks=(1,))
    assert res["top1"] == pytest.approx(900 / 14, rel=1e-12)
    assert res["tail_top1"] == 50.0
    assert res["head_top1"] == 25.0
    assert res["many_top1"] == pytest.approx(125 / 3, rel=1e-12)  # all three classes are many
    assert res["top1"] != res["many_top1"]


def test_bad_inputs_raise():
    top = RANKING
    counts = np.array([5, 5, 5])
    with pytest.raises(ValueError, match=r"label 3 is outside \[0, 3\)"):
        evaluate(top, np.array([1, 2, 2, 1, 3]), counts, head_threshold=2)
    with pytest.raises(ValueError, match=r"label -1 is outside"):
        evaluate(top, np.array([1, 2, 2, 1, -1]), counts, head_threshold=2)
    with pytest.raises(ValueError, match="5 rows but labels has 4"):
        evaluate(top, LABELS[:4], counts, head_threshold=2)
    with pytest.raises(ValueError, match="outside"):
        evaluate(top, LABELS, np.array([5, 5]), head_threshold=2)  # predictions index class 2
    with pytest.raises(ValueError, match="top3 needs at least 3"):
        evaluate(top[:, :2], LABELS, counts, head_threshold=2, ks=(1, 3))
    with pytest.raises(ValueError, match="k must be in"):
        topk_hits(top[:, :2], LABELS, 3)
    with pytest.raises(ValueError, match=">= 0"):
        head_tail_groups(np.array([3, -1]), 2)
    with pytest.raises(ValueError, match="outside"):
        per_class_accuracy(np.array([True]), np.array([4]), 3)


def test_result_is_json_serialisable():
    res = evaluate(RANKING, LABELS, np.array([500, 300, 0]), head_threshold=200, many=250, few=10)
    text = json.dumps(res, allow_nan=False)
    back = json.loads(text)
    assert back == res
    assert back["head_threshold"] == 200
    assert back["many_threshold"] == 250 and back["few_threshold"] == 10
    assert all(type(v) in (int, float, list, type(None)) for v in res.values())
