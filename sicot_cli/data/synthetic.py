"""The built-in synthetic long-tailed product dataset: seeded images and noisy titles, no files.

A fair miniature of the paper's problem (SICoT, CIKM'20, §1 and §4.1), not a toy:

* **Products are attribute combinations.** A class is a product type (a distinct silhouette:
  bottle, box, can, mug, bag, shoe, jar, t-shirt), a colour, a pattern (plain, stripes, dots,
  checks, waves) and a brand, drawn as a small logo glyph at a fixed spot on the product. Many
  classes are near-duplicates of another class: they differ in ONE attribute, most often only
  the small brand mark, or only the pattern or the colour.
* **Long tail.** Training counts follow a Zipf law from ``max_per_class`` down to
  ``min_per_class`` (with the defaults 100 of 120 classes have under 20 images); the test split is
  balanced, ``test_per_class`` images for every class, as in the paper.
* **Images vary within a class**: position, scale, rotation, mirror, aspect, colour jitter,
  cluttered backgrounds, a table edge, lighting gradients, shadows, pixel noise and, sometimes, an
  occluder. The brand mark is a few pixels at 32 px: readable on a clean image, easily lost.
* **Titles are noisy marketplace titles** in Chinese (jieba-friendly words, mostly without
  spaces), English, or ``mixed`` (each title Chinese, English or code-mixed, "新款 red 马克杯").
  They name the attributes with synonyms, drop some attribute words (each title keeps most but not
  all), shuffle the order, add promotion words ("free shipping", "包邮", "新款", ...) and filler,
  and now and then a seller's mistake (a wrong attribute word). A title-only classifier is good
  but not perfect: near-duplicates become ambiguous when the distinguishing word is dropped.

**Why titles help the tail (the property the demo relies on).** The word distribution is far
more balanced than the image distribution: the head classes are chosen so that together they use
every attribute value, so every word of a tail class's title (its brand, colour, pattern, type)
also occurs in head-class titles, hundreds of times. For a tail class the title carries what its
few images hardly show -- above all the brand, a tiny glyph that a visual model cannot learn from
four images but that the title names outright -- and a semantic stream that learned the brand,
colour and pattern words on head classes transfers that knowledge to the tail classes.

**A pretraining set for the demo's backbone** (:func:`pretraining_items`). The paper starts its
visual stream from ImageNet weights (§4.3), which sicot cannot fetch offline. The demo's stand-in
is a balanced set of OTHER products of the same world: attribute combinations that the long-tailed
set does not contain, so no demo class (and no test image) is seen in pretraining, as the SKUs are
not in ImageNet. Measured (``docs/demo-pretraining.md``): from scratch on the demo's 1,920 training
images a ResNet-18 learns class templates, not attributes (even trained on the attribute labels
themselves it gets the product type of only 58 % of tail test images right, against 96 % for head
ones), so nothing a title teaches on the head can reach the tail; pretrained on this set, the
visual stream's features transfer.

The public API is :func:`synthetic_items` (class names and items with titles),
:func:`pretraining_items` and :func:`render`
(one item's pixels, a pure top-level function of ``(item.spec, item.seed, size)`` that can run in
a process pool). Everything is deterministic in its arguments.
"""

from __future__ import annotations

import colorsys
import functools
import itertools
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

__all__ = ["ClassSpec", "SyntheticItem", "synthetic_items", "pretraining_items", "render", "ATTRIBUTES", "PROMOTIONS"]

# --- The attribute vocabulary -------------------------------------------------------------------
# Each value: (class-name word, English title words, Chinese title words); the first word of a
# list is the most common one, the rest are synonyms. Chinese words are ones jieba keeps whole
# when titles are written without spaces (tests/test_synthetic.py checks this).

SHAPES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "bottle": (("bottle", "water bottle"), ("水瓶", "玻璃瓶", "饮料瓶")),
    "box": (("box", "gift box"), ("礼盒", "包装盒", "纸盒")),
    "can": (("can", "tin can"), ("易拉罐", "铁罐")),
    "mug": (("mug", "cup", "coffee mug"), ("马克杯", "杯子", "咖啡杯")),
    "bag": (("tote bag", "bag", "handbag"), ("手提包", "挎包", "帆布包")),
    "shoe": (("sneaker", "shoe", "sneakers"), ("运动鞋", "球鞋", "跑鞋")),
    "jar": (("cream jar", "jar", "face cream"), ("面霜", "护肤霜", "罐子")),
    "tshirt": (("tshirt", "tee"), ("短袖", "体恤")),
}

# name -> (RGB in 0..1, English words, Chinese words)
COLOURS: dict[str, tuple[tuple[float, float, float], tuple[str, ...], tuple[str, ...]]] = {
    "red": ((0.85, 0.13, 0.14), ("red", "crimson"), ("红色", "大红")),
    "orange": ((0.96, 0.50, 0.08), ("orange",), ("橙色", "橘色")),
    "yellow": ((0.95, 0.83, 0.15), ("yellow",), ("黄色", "鹅黄")),
    "green": ((0.16, 0.62, 0.26), ("green",), ("绿色", "草绿")),
    "blue": ((0.13, 0.33, 0.85), ("blue", "navy"), ("蓝色", "宝蓝色")),
    "purple": ((0.52, 0.22, 0.68), ("purple", "violet"), ("紫色", "淡紫")),
    "pink": ((0.96, 0.55, 0.72), ("pink", "rose"), ("粉色", "粉红")),
    "brown": ((0.50, 0.30, 0.14), ("brown", "coffee"), ("棕色", "咖啡色")),
    "black": ((0.11, 0.11, 0.12), ("black",), ("黑色", "纯黑")),
    "white": ((0.95, 0.95, 0.92), ("white", "ivory"), ("白色", "乳白")),
}

# name -> (class-name adjective, English words, Chinese words)
PATTERNS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "plain": ("plain", ("plain", "solid"), ("纯色", "素色")),
    "stripes": ("striped", ("striped", "stripes"), ("条纹",)),
    "dots": ("dotted", ("polka dot", "dotted"), ("波点", "圆点")),
    "checks": ("checked", ("plaid", "checked"), ("格子", "格纹", "方格")),
    "waves": ("wavy", ("wavy", "wave pattern"), ("波浪", "水波纹")),
}

# brand -> (logo glyph, English words, Chinese words); Chinese titles also use the latin name.
BRANDS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "panda": ("ring", ("panda",), ("熊猫", "panda")),
    "phoenix": ("triangle", ("phoenix",), ("凤凰", "phoenix")),
    "seagull": ("bars", ("seagull",), ("海鸥", "seagull")),
    "rabbit": ("disc", ("rabbit",), ("白兔", "rabbit")),
    "goldfish": ("diamond", ("goldfish",), ("金鱼", "goldfish")),
    "bee": ("plus", ("bee",), ("蜜蜂", "bee")),
    "squirrel": ("square", ("squirrel",), ("松鼠", "squirrel")),
    "peacock": ("cross", ("peacock",), ("孔雀", "peacock")),
}

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": tuple(SHAPES),
    "colour": tuple(COLOURS),
    "pattern": tuple(PATTERNS),
    "brand": tuple(BRANDS),
}

PROMOTIONS: dict[str, tuple[str, ...]] = {
    "en": (
        "free shipping",
        "new arrival",
        "hot sale",
        "2024 new",
        "best price",
        "original",
        "discount",
        "limited offer",
        "best seller",
        "official store",
    ),
    "zh": ("包邮", "新款", "特价", "正品", "热卖", "爆款", "清仓", "现货", "旗舰店", "折扣"),
}

# Descriptive words that any product may carry: real words that do not identify the class.
FILLERS: dict[str, tuple[str, ...]] = {
    "en": (
        "portable",
        "large",
        "gift",
        "fashion",
        "for women",
        "for men",
        "kids",
        "home",
        "travel",
        "cute",
        "simple",
        "premium",
    ),
    "zh": ("便携", "大容量", "礼物", "时尚", "女士", "男士", "儿童", "家用", "旅行", "可爱", "简约", "高档"),
}

LANGUAGES = ("zh", "en", "mixed")

# Title noise (per title). Keep-probabilities per attribute word; "plain" is rarely written.
_KEEP = {"shape": 0.92, "brand": 0.8, "colour": 0.82, "pattern": 0.78}
_KEEP_PLAIN = 0.35
_P_WRONG_WORD = 0.04  # a seller's mistake: one attribute word names another value
_P_SHUFFLE = 0.4  # full shuffle; otherwise the usual "brand colour pattern type" order
# Near-duplicate classes: the share of non-anchor classes made by changing one attribute of an
# earlier class, and which attribute is changed.
_P_NEAR_DUPLICATE = 0.6
_MUTATE = (("brand", 0.45), ("pattern", 0.3), ("colour", 0.25))


@dataclass(frozen=True)
class ClassSpec:
    """The attributes of one synthetic product class (picklable; drives both render and titles)."""

    shape: str
    colour: str
    pattern: str
    brand: str

    @property
    def name(self) -> str:
        """The readable, unique, ASCII class name, e.g. ``syn/red-striped-mug/panda``."""
        return f"syn/{self.colour}-{PATTERNS[self.pattern][0]}-{self.shape}/{self.brand}"

    def attributes(self) -> dict[str, str]:
        """``{"shape": ..., "colour": ..., "pattern": ..., "brand": ...}``."""
        return {"shape": self.shape, "colour": self.colour, "pattern": self.pattern, "brand": self.brand}


@dataclass(frozen=True)
class SyntheticItem:
    """One synthetic image with its title; its pixels come from :func:`render`."""

    id: str  # unique, "syn-000123"
    label: str  # class name
    title: str
    split: str  # "train" or "test"
    spec: ClassSpec
    seed: int  # per-image render seed


def attribute_words(attribute: str, value: str, language: str) -> tuple[str, ...]:
    """The title words (first = most common) for one attribute value in ``"en"`` or ``"zh"``."""
    i = 0 if language == "en" else 1
    if attribute == "shape":
        return SHAPES[value][i]
    if attribute == "colour":
        return COLOURS[value][1 + i]
    if attribute == "pattern":
        return PATTERNS[value][1 + i]
    if attribute == "brand":
        return BRANDS[value][1 + i]
    raise ValueError(f"unknown attribute {attribute!r}")


# --- Items ---------------------------------------------------------------------------------------


def train_counts(num_classes: int, max_per_class: int, min_per_class: int) -> list[int]:
    """Zipf-like training counts, non-increasing, exactly ``max_per_class`` .. ``min_per_class``.

    ``n_k = round(max * k ** -a)`` for ranks ``k = 1 .. C`` with ``a = ln(max / min) / ln(C)``.
    """
    if num_classes == 1:
        return [max_per_class]
    a = math.log(max_per_class / min_per_class) / math.log(num_classes)
    counts = [max(min_per_class, round(max_per_class * k**-a)) for k in range(1, num_classes + 1)]
    counts[-1] = min_per_class
    return counts


def _check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"between {low} and {high}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return int(value)


def _class_specs(num_classes: int, rng: np.random.Generator) -> list[ClassSpec]:
    """Class specs in rank order (rank 0 = the most training images).

    The first ``anchors`` ranks (the head) cycle through shuffled value lists, so together they
    use every value of every attribute; every later class only uses values that the anchors use,
    so each tail word is a head word too. Later classes are near-duplicates of an earlier class
    (one attribute changed; the parent is drawn with a bias towards the head) or fresh
    combinations.
    """
    values = {k: list(v) for k, v in ATTRIBUTES.items()}
    anchors = min(num_classes, max(max(len(v) for v in values.values()), math.ceil(num_classes / 6)))
    perms = {k: [v[i] for i in rng.permutation(len(v))] for k, v in values.items()}
    specs: list[ClassSpec] = []
    used: set[ClassSpec] = set()

    def fresh(pools: dict[str, list[str]]) -> ClassSpec:
        for _ in range(64):
            s = ClassSpec(*(pools[k][rng.integers(len(pools[k]))] for k in ATTRIBUTES))
            if s not in used:
                return s
        free = [
            ClassSpec(a, b, c, d)
            for a in pools["shape"]
            for b in pools["colour"]
            for c in pools["pattern"]
            for d in pools["brand"]
            if ClassSpec(a, b, c, d) not in used
        ]
        return free[rng.integers(len(free))]

    for j in range(anchors):
        s = ClassSpec(*(perms[k][j % len(perms[k])] for k in ATTRIBUTES))
        if s in used:  # only when anchors > 40 (the cycle lengths' least common multiple)
            s = fresh(values)
        specs.append(s)
        used.add(s)
    pools = {k: sorted({getattr(s, k) for s in specs}, key=values[k].index) for k in ATTRIBUTES}
    attrs, weights = zip(*_MUTATE, strict=True)
    for j in range(anchors, num_classes):
        s = None
        if rng.random() < _P_NEAR_DUPLICATE:
            for _ in range(8):
                parent = specs[int(j * rng.random() ** 2)]
                attr = attrs[rng.choice(len(attrs), p=np.array(weights) / sum(weights))]
                choices = [v for v in pools[attr] if v != getattr(parent, attr)]
                if not choices:
                    continue
                cand = ClassSpec(**{**parent.attributes(), attr: choices[rng.integers(len(choices))]})
                if cand not in used:
                    s = cand
                    break
        if s is None:
            s = fresh(pools)
        specs.append(s)
        used.add(s)
    return specs


def _pick(words: tuple[str, ...], rng: np.random.Generator) -> str:
    # The first word is the common one; synonyms share the rest of the mass.
    if len(words) == 1 or rng.random() < 0.65:
        return words[0]
    return words[1 + rng.integers(len(words) - 1)]


def _title(spec: ClassSpec, language: str, rng: np.random.Generator) -> str:
    """One noisy title for ``spec`` in ``language`` ("zh", "en" or "mix" = code-mixed)."""

    def lang() -> str:
        return language if language != "mix" else ("zh" if rng.random() < 0.5 else "en")

    attrs = spec.attributes()
    if rng.random() < _P_WRONG_WORD:
        attr = list(ATTRIBUTES)[rng.integers(4)]
        others = [v for v in ATTRIBUTES[attr] if v != attrs[attr]]
        attrs[attr] = others[rng.integers(len(others))]
    body: list[tuple[str, str]] = []
    for attr in ("brand", "colour", "pattern", "shape"):
        keep = _KEEP_PLAIN if attrs[attr] == "plain" else _KEEP[attr]
        if rng.random() < keep:
            lg = lang()
            body.append((lg, _pick(attribute_words(attr, attrs[attr], lg), rng)))
    if not body:  # a title names at least the product type
        lg = lang()
        body.append((lg, _pick(attribute_words("shape", attrs["shape"], lg), rng)))
    for _ in range(rng.binomial(2, 0.3)):
        lg = lang()
        body.insert(rng.integers(len(body) + 1), (lg, FILLERS[lg][rng.integers(len(FILLERS[lg]))]))
    if rng.random() < _P_SHUFFLE:
        body = [body[i] for i in rng.permutation(len(body))]
    elif len(body) > 1 and rng.random() < 0.3:
        i = rng.integers(len(body) - 1)
        body[i], body[i + 1] = body[i + 1], body[i]
    for _ in range(rng.binomial(3, 0.3)):
        lg = lang()
        promo = (lg, PROMOTIONS[lg][rng.integers(len(PROMOTIONS[lg]))])
        body.insert(0, promo) if rng.random() < 0.6 else body.append(promo)
    out = body[0][1]
    for (prev, _), (lg, word) in zip(body, body[1:], strict=False):
        if prev == "zh" and lg == "zh":
            r = rng.random()
            out += "" if r < 0.8 else (" " if r < 0.95 else "，")
        else:
            out += " "
        out += word
    return out


def synthetic_items(
    num_classes: int, max_per_class: int, min_per_class: int, test_per_class: int, language: str, seed: int
) -> tuple[list[str], list[SyntheticItem]]:
    """Build the synthetic long-tailed dataset: class names and every item (train and test).

    Args:
        num_classes: number of classes, 2 .. 3200 (the attribute combinations).
        max_per_class: training images of the largest class.
        min_per_class: training images of the smallest class, 1 .. ``max_per_class``.
        test_per_class: test images of EVERY class (a balanced test split), >= 1.
        language: ``"zh"``, ``"en"`` or ``"mixed"`` (each title Chinese, English or code-mixed).
        seed: any non-negative integer; the same arguments give identical items.

    Returns:
        ``(class_names, items)``: class names indexed by class id, ordered by descending training
        count (ties keep their order), and the items: first all training items class by class,
        then the test items class by class, ids ``syn-000000`` upwards.

    Raises:
        ValueError: an argument out of range or of the wrong type, or an unknown language.
    """
    _check_args(num_classes, max_per_class, min_per_class, test_per_class, language, seed)
    specs, title_ss, render_ss = _long_tail(num_classes, seed)
    return _items(
        specs,
        train_counts(num_classes, max_per_class, min_per_class),
        test_per_class,
        language,
        title_ss,
        render_ss,
        "syn",
    )


def _long_tail(num_classes: int, seed: int) -> tuple[list[ClassSpec], np.random.SeedSequence, np.random.SeedSequence]:
    """The long-tailed set's class specs, and its title and render seed streams."""
    spec_ss, title_ss, render_ss = np.random.SeedSequence(seed).spawn(3)
    return _class_specs(num_classes, np.random.default_rng(spec_ss)), title_ss, render_ss


def _check_args(
    num_classes: int, max_per_class: int, min_per_class: int, test_per_class: int, language: str, seed: int
) -> None:
    n_combos = math.prod(len(v) for v in ATTRIBUTES.values())
    _check_int("num_classes", num_classes, 2, n_combos)
    _check_int("max_per_class", max_per_class, 1)
    _check_int("min_per_class", min_per_class, 1, max_per_class)
    _check_int("test_per_class", test_per_class, 1)
    _check_int("seed", seed, 0)
    if language not in LANGUAGES:
        raise ValueError(f"language must be one of {', '.join(LANGUAGES)}, got {language!r}")


def _items(
    specs: list[ClassSpec],
    counts: list[int],
    test_per_class: int,
    language: str,
    title_ss: np.random.SeedSequence,
    render_ss: np.random.SeedSequence,
    prefix: str,
) -> tuple[list[str], list[SyntheticItem]]:
    """Items for classes ``specs`` with ``counts`` training images each: all training items class
    by class, then ``test_per_class`` test items per class; titles and render seeds seeded."""
    names = [s.name for s in specs]
    plan = [(c, "train") for c, n in enumerate(counts) for _ in range(n)]
    plan += [(c, "test") for c in range(len(specs)) for _ in range(test_per_class)]
    title_rng = np.random.default_rng(title_ss)
    seeds = np.random.default_rng(render_ss).integers(0, 2**63 - 1, size=len(plan), dtype=np.int64)
    items = []
    for i, ((c, split), s) in enumerate(zip(plan, seeds.tolist(), strict=True)):
        lang = language
        if language == "mixed":
            r = title_rng.random()
            lang = "zh" if r < 0.45 else ("en" if r < 0.75 else "mix")
        title = _title(specs[c], lang, title_rng)
        items.append(SyntheticItem(f"{prefix}-{i:06d}", names[c], title, split, specs[c], s))
    return names, items


def pretraining_items(
    num_classes: int,
    max_per_class: int,
    min_per_class: int,
    test_per_class: int,
    language: str,
    seed: int,
    pretrain_classes: int,
    pretrain_per_class: int,
) -> tuple[list[str], list[SyntheticItem]]:
    """A balanced pretraining set of ``pretrain_classes`` classes DISJOINT from a long-tailed set.

    The first six arguments describe the long-tailed set exactly as for :func:`synthetic_items`;
    its classes are left out, and ``pretrain_classes`` of the remaining attribute combinations are
    drawn (seeded by ``seed``, independently of the long-tailed set's own draws), each with
    ``pretrain_per_class`` training and ``test_per_class`` test images and titles. Same return
    form as :func:`synthetic_items`; ids are ``pre-000000`` upwards.

    Raises:
        ValueError: an argument out of range, or fewer free combinations than ``pretrain_classes``.
    """
    _check_args(num_classes, max_per_class, min_per_class, test_per_class, language, seed)
    used = set(_long_tail(num_classes, seed)[0])
    free = [spec for spec in itertools.starmap(ClassSpec, itertools.product(*ATTRIBUTES.values())) if spec not in used]
    _check_int("pretrain_classes", pretrain_classes, 1, len(free))
    _check_int("pretrain_per_class", pretrain_per_class, 1)
    # spawn_key 3: a stream the long-tailed set (keys 0..2) never draws from
    pick_ss, title_ss, render_ss = np.random.SeedSequence(seed, spawn_key=(3,)).spawn(3)
    specs = [free[i] for i in np.random.default_rng(pick_ss).choice(len(free), pretrain_classes, replace=False)]
    return _items(specs, [pretrain_per_class] * pretrain_classes, test_per_class, language, title_ss, render_ss, "pre")


# --- Rendering -----------------------------------------------------------------------------------
# Every shape is a signed distance field (SDF, < 0 inside) over object coordinates (u, v) in about
# [-1, 1], v pointing down; coverage = clip(0.5 - sdf / pixel, 0, 1) anti-aliases every edge for
# free, so a 32 px image stays legible. All operations are whole-array numpy on float32.

_F = np.float32
# The brand glyph's size relative to each shape's nominal mark radius: about 3-4 px across at 32 px,
# so the brand is visible on a clean image but easily lost to blur, noise, rotation or an occluder.
_MARK_SCALE = 0.85


# Where each part of a scene takes its random numbers from: (part, count), in the order they are
# drawn. render() draws all of them first, whether a part uses them or not (a scene without clutter
# still draws the clutter's), so a change inside one part never shifts the numbers of another. The
# layout is frozen (every prepared demo file depends on it, and the noise offsets are drawn after
# it): a NEW parameter takes its numbers from a stream of its own, ``_Draws.extra(part, n)``.
_LAYOUT: tuple[tuple[str, int], ...] = (
    ("background", 12),  # two gradient colours and angle, table edge: 3 + 3 + 1 + 1 + 1 + 3
    ("clutter", 46),  # how many, then 5 x (kind, x, y, w, h, alpha, colour x 3)
    ("pose", 6),  # scale, aspect, rotation, mirror, x, y
    ("shadow", 1),
    ("colour", 4),  # per-channel jitter x 3, gain
    ("occluder", 6),  # whether, x, y, w, h, colour
    ("lighting", 7),  # gain, gradient x 2, cast x 3, noise level
    ("spare", 2),  # drawn and unused
)


class _Draws:
    """The scene's random numbers, drawn at once in ``_LAYOUT`` order and handed out by part."""

    def __init__(self, rng: random.Random, seed: int) -> None:
        self._parts = {name: iter([rng.random() for _ in range(count)]) for name, count in _LAYOUT}
        self._seed = seed

    def extra(self, part: str, count: int) -> list[float]:
        """``count`` numbers for a part added after the layout froze, from a stream of its own."""
        rng = random.Random(f"{self._seed}:{part}")  # str seeds hash with SHA-512: stable across versions
        return [rng.random() for _ in range(count)]

    def __getitem__(self, part: str) -> Iterator[float]:
        return self._parts[part]

    def check_used(self) -> None:
        """Every part took exactly its share: a part that needs more must say so in ``_LAYOUT``."""
        for name, left in self._parts.items():
            if name != "spare" and next(left, None) is not None:
                raise RuntimeError(f"synthetic.render: part {name!r} drew fewer numbers than _LAYOUT gives it")


@functools.lru_cache(maxsize=8)
def _axis(size: int) -> np.ndarray:
    c = ((np.arange(size, dtype=_F) + 0.5) / size * 2 - 1).astype(_F)
    c.flags.writeable = False
    return c


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = _axis(size)
    y, x = np.meshgrid(c, c, indexing="ij")
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


@functools.lru_cache(maxsize=8)
def _noise_bank(size: int) -> np.ndarray:
    # Sensor noise is a random crop of one fixed Gaussian field per size: 4,096 distinct crops,
    # and ~40x cheaper than drawing fresh normals for every image.
    bank = np.random.default_rng(20200601).standard_normal((3, size + 64, size + 64), dtype=_F)
    bank.flags.writeable = False
    return bank


def _cover(d: np.ndarray, px: float) -> np.ndarray:
    t = 0.5 - d * (1.0 / px)
    np.maximum(t, 0.0, out=t)
    return np.minimum(t, 1.0, out=t)


def _box(u: np.ndarray, v: np.ndarray, cu: float, cv: float, hw: float, hh: float, r: float = 0.0) -> np.ndarray:
    qx = np.abs(u - cu) - (hw - r)
    qy = np.abs(v - cv) - (hh - r)
    if not r:  # exact inside, the L-inf distance outside: enough for one pixel of anti-aliasing
        return np.maximum(qx, qy)
    mx, my = np.maximum(qx, 0), np.maximum(qy, 0)
    out = np.sqrt(mx * mx + my * my) + np.minimum(np.maximum(qx, qy), 0)
    return out - r if r else out


def _len(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sqrt(a * a + b * b)


def _circle(u: np.ndarray, v: np.ndarray, cu: float, cv: float, r: float) -> np.ndarray:
    return _len(u - cu, v - cv) - r


def _smin(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    h = np.maximum(k - np.abs(a - b), 0) / k
    return np.minimum(a, b) - h * h * (k / 4)


# Part colours that do not depend on the class: (RGB) or a factor of the main colour.
_SILVER = (0.78, 0.78, 0.8)
_DARK = (0.16, 0.16, 0.18)
_OFFWHITE = (0.93, 0.92, 0.88)


def _shape(name: str, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, list, str, float, tuple[float, float, float]]:
    """(body SDF, parts [(SDF, colour or main-colour factor)], shading, body half-width, mark (u, v, r))."""
    if name == "bottle":
        body = _smin(_box(u, v, 0, 0.3, 0.42, 0.62, 0.14), _box(u, v, 0, -0.45, 0.15, 0.3), 0.25)
        return body, [(_box(u, v, 0, -0.8, 0.19, 0.12, 0.03), _DARK)], "cyl", 0.42, (0.0, 0.38, 0.22)
    if name == "box":
        front = _box(u, v, -0.1, 0.15, 0.62, 0.6)
        top = np.maximum(np.abs(u + (v + 0.45) - 0.02 + 0.1) - 0.62, np.abs(v + 0.6) - 0.15)
        side = np.maximum(np.abs(u - 0.67) - 0.15, np.abs(v + (u - 0.52) - 0.15) - 0.6)
        return front, [(top, 1.25), (side, 0.7)], "flat", 0.62, (-0.1, 0.15, 0.24)
    if name == "can":
        body = _box(u, v, 0, 0, 0.46, 0.86, 0.08)
        parts = [(_box(u, v, 0, -0.8, 0.46, 0.07, 0.04), _SILVER), (_box(u, v, 0, 0.8, 0.46, 0.07, 0.04), _SILVER)]
        return body, parts, "cyl", 0.46, (0.0, 0.0, 0.24)
    if name == "mug":
        handle = np.maximum(np.abs(_len(u - 0.42, v - 0.02) - 0.3) - 0.09, 0.3 - u)
        body = np.minimum(_box(u, v, -0.15, 0.05, 0.55, 0.65, 0.07), handle)
        return body, [(_box(u, v, -0.15, -0.57, 0.55, 0.04), 0.55)], "cyl", 0.55, (-0.15, 0.08, 0.24)
    if name == "bag":
        hw = 0.52 + 0.14 * (v + 0.2)
        body = np.maximum((np.abs(u) - hw) * 0.99, np.abs(v - 0.35) - 0.55)
        handle = np.maximum(np.abs(_len(u, v + 0.2) - 0.4) - 0.06, v + 0.2)
        return body, [(handle, 0.5)], "flat", 0.6, (0.0, 0.35, 0.24)
    if name == "shoe":
        upper = _smin(_box(u, v, -0.42, 0.1, 0.42, 0.45, 0.25), _box(u, v, 0.3, 0.36, 0.6, 0.19, 0.18), 0.35)
        upper = np.maximum(upper, v - 0.52)
        collar = _len((u + 0.5) / 0.3, (v + 0.32) / 0.1) - 1.0
        parts = [(_box(u, v, 0.0, 0.6, 0.95, 0.1, 0.08), _OFFWHITE), (collar * 0.1, _DARK)]
        return upper, parts, "flat", 0.8, (-0.3, 0.2, 0.2)
    if name == "jar":
        body = _box(u, v, 0, 0.25, 0.7, 0.55, 0.22)
        return body, [(_box(u, v, 0, -0.45, 0.62, 0.17, 0.05), _SILVER)], "cyl", 0.7, (0.0, 0.28, 0.25)
    if name == "tshirt":
        body = np.minimum(_box(u, v, 0, 0.2, 0.48, 0.72, 0.03), _box(u, v, 0, -0.4, 0.62, 0.15, 0.05))
        # sleeves: boxes rotated by +-35 degrees about the shoulders
        a, b = np.abs(u) - 0.6, v + 0.25
        ra, rb = 0.819 * a + 0.574 * b, -0.574 * a + 0.819 * b
        body = np.minimum(body, _box(ra, rb, 0.08, 0.0, 0.26, 0.17, 0.03))
        body = np.maximum(body, -_circle(u, v, 0, -0.58, 0.2))
        return body, [], "flat", 0.5, (0.0, 0.05, 0.22)
    raise ValueError(f"unknown shape {name!r}")


def _glyph(name: str, a: np.ndarray, b: np.ndarray, r: float) -> np.ndarray:
    if name == "disc":
        return _len(a, b) - r
    if name == "ring":
        return np.abs(_len(a, b) - 0.7 * r) - 0.3 * r
    if name == "triangle":
        b = b - 0.2 * r
        return np.maximum(np.abs(a) * 0.866 - b * 0.5, b) - 0.6 * r
    if name == "square":
        return _box(a, b, 0, 0, 0.8 * r, 0.8 * r)
    if name == "diamond":
        return (np.abs(a) + np.abs(b)) * 0.7071 - 0.8 * r
    if name == "plus":
        return np.minimum(_box(a, b, 0, 0, r, 0.3 * r), _box(a, b, 0, 0, 0.3 * r, r))
    if name == "cross":
        a, b = (a + b) * 0.7071, (a - b) * 0.7071
        return np.minimum(_box(a, b, 0, 0, 1.05 * r, 0.27 * r), _box(a, b, 0, 0, 0.27 * r, 1.05 * r))
    if name == "bars":
        return np.minimum(_box(a, b, 0, -0.45 * r, r, 0.24 * r), _box(a, b, 0, 0.45 * r, r, 0.24 * r))
    raise ValueError(f"unknown glyph {name!r}")


def _pattern(name: str, u: np.ndarray, v: np.ndarray, px: float) -> np.ndarray | None:
    """Coverage of the pattern's second colour over the body, or None for plain."""
    if name == "plain":
        return None
    if name == "stripes":
        p = 0.42
        return _cover((np.abs((v / p) % 1.0 - 0.5) - 0.25) * p, px)
    if name == "waves":
        p = 0.42
        w = v + 0.09 * np.sin(u * (2 * np.pi / 0.55))
        return _cover((np.abs((w / p) % 1.0 - 0.5) - 0.25) * p, px)
    if name == "dots":
        p = 0.4
        a = (u / p) % 1.0 - 0.5
        b = (v / p + 0.5 * (np.floor(u / p) % 2)) % 1.0 - 0.5
        return _cover(_len(a, b) * p - 0.11, px)
    if name == "checks":
        p = 0.5
        cu = _cover((np.abs((u / p) % 1.0 - 0.5) - 0.25) * p, px)
        cv = _cover((np.abs((v / p) % 1.0 - 0.5) - 0.25) * p, px)
        return cu + cv - 2 * cu * cv
    raise ValueError(f"unknown pattern {name!r}")


def _over(img: np.ndarray, alpha: np.ndarray, colour: np.ndarray) -> None:
    """Composite ``colour`` ([3, 1, 1] or [3, h, w]) over ``img`` ([3, h, w]) in place, coverage ``alpha``."""
    img += alpha * (colour - img)


def _luma(c: tuple[float, float, float]) -> float:
    return float(0.3 * c[0] + 0.59 * c[1] + 0.11 * c[2])


def _rgb(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h, s, v), dtype=_F).reshape(3, 1, 1)


def _const(c: tuple[float, float, float] | np.ndarray) -> np.ndarray:
    return np.asarray(c, dtype=_F).reshape(3, 1, 1)


def _window(size: int, x0: float, x1: float, y0: float, y1: float) -> tuple[slice, slice] | None:
    """Pixel rows and columns covering the image-space box [x0, x1] x [y0, y1] (None if empty)."""

    def idx(a: float, b: float) -> slice:
        return slice(max(0, int((a + 1) * size / 2) - 1), min(size, int((b + 1) * size / 2) + 2))

    rows, cols = idx(y0, y1), idx(x0, x1)
    if rows.start >= rows.stop or cols.start >= cols.stop:
        return None
    return rows, cols


def px_img(size: int) -> float:
    """One pixel in image coordinates ([-1, 1] across)."""
    return 2.0 / size


def _background(img: np.ndarray, x: np.ndarray, y: np.ndarray, size: int, r: Iterator[float]) -> None:
    """A two-tone gradient, sometimes a table edge."""
    c0 = _rgb(next(r), 0.1 + 0.35 * next(r), 0.35 + 0.55 * next(r))
    c1 = _rgb(next(r), 0.1 + 0.35 * next(r), 0.35 + 0.55 * next(r))
    ang = next(r) * 2 * math.pi
    t = 0.5 + 0.5 * (math.cos(ang) * x + math.sin(ang) * y)
    img[:] = c0 + np.minimum(np.maximum(t, 0), 1) * (c1 - c0)
    table = next(r) < 0.5
    horizon = 0.1 + 0.5 * next(r)
    c_table = _rgb(next(r), 0.05 + 0.3 * next(r), 0.3 + 0.6 * next(r))
    if table:
        _over(img, _cover(horizon - _axis(size)[:, None], px_img(size)), c_table)


def _clutter(img: np.ndarray, x: np.ndarray, y: np.ndarray, size: int, r: Iterator[float]) -> None:
    """Up to five ellipses, rectangles or thin lines behind the object (all five are drawn from ``r``)."""
    px = px_img(size)
    n_clutter = int(next(r) * 5)
    for k in range(5):
        kind, cx, cy, w, h, alpha = next(r), next(r), next(r), next(r), next(r), next(r)
        col = (next(r), 0.2 + 0.7 * next(r), 0.2 + 0.8 * next(r))
        if k >= n_clutter:
            continue
        cx, cy, w, h = 2.2 * cx - 1.1, 2.2 * cy - 1.1, 0.06 + 0.35 * w, 0.06 + 0.35 * h
        win = _window(size, cx - w, cx + w, cy - h, cy + h) if kind < 0.8 else (slice(None), slice(None))
        if win is None:
            continue
        if kind < 0.4:  # an ellipse
            xs, ys = x[win], y[win]
            cover = _cover((_len((xs - cx) * (1 / w), (ys - cy) * (1 / h)) - 1.0) * min(w, h), px)
        elif kind < 0.8:  # an axis-aligned rectangle: coverage is separable, so build it from 1-D
            c = _axis(size)
            cover = _cover(np.abs(c[win[0]] - cy) - h, px)[:, None] * _cover(np.abs(c[win[1]] - cx) - w, px)
        else:  # a thin line
            cover = _cover(np.abs((x - cx) * h - (y - cy) * w) * (1 / math.hypot(w, h)) - 0.015 - 0.03 * alpha, px)
        cover *= 0.4 + 0.6 * alpha
        _over(img[:, win[0], win[1]], cover, _rgb(*col))


@dataclass(frozen=True)
class _Pose:
    """Where the object stands: centre, scale, aspect, rotation, mirror."""

    cx: float
    cy: float
    s: float
    su: float
    sv: float
    theta: float
    flip: float

    @classmethod
    def draw(cls, r: Iterator[float]) -> _Pose:
        s = 0.5 + 0.28 * next(r)
        aspect = 0.9 + 0.2 * next(r)
        theta = math.radians(min(15.0, max(-15.0, (next(r) - 0.5) * 30)))
        flip = -1.0 if next(r) < 0.5 else 1.0
        lim = 1.05 - s
        cx, cy = (2 * next(r) - 1) * lim, (2 * next(r) - 1) * lim
        return cls(cx, cy, s, s * aspect, s / aspect, theta, flip)

    def window(self, size: int) -> tuple[slice, slice]:
        """The pixels the object (and its shadow) can touch: within ~1.45 object units of its centre."""
        reach = 1.45 * max(self.su, self.sv)
        win = _window(size, self.cx - reach, self.cx + reach, self.cy - reach, self.cy + 1.1 * self.s + 0.05)
        if win is None:  # |cx|, |cy| <= 1.05 - s keeps the centre inside the image
            raise RuntimeError(f"synthetic.render: object window outside the image ({self})")
        return win


def _object(
    sub: np.ndarray, xs: np.ndarray, ys: np.ndarray, pose: _Pose, spec: ClassSpec, size: int, draws: _Draws
) -> None:
    """The product itself, drawn into ``sub`` (a view of the image): shadow, body, pattern, brand mark."""
    ct, st = math.cos(pose.theta), math.sin(pose.theta)
    dx, dy = xs - pose.cx, ys - pose.cy
    u = (ct * dx + st * dy) * (pose.flip / pose.su)
    v = (-st * dx + ct * dy) / pose.sv
    px = px_img(size) / pose.s
    s = pose.s

    # Soft shadow under the object.
    shadow = 1 - np.sqrt(((dx - 0.1 * s) / (0.85 * s)) ** 2 + ((dy - 0.88 * s) / (0.16 * s)) ** 2)
    sub *= 1 - (0.45 * next(draws["shadow"])) * np.maximum(shadow, 0)

    # Colours: the class colour with per-image jitter; pattern colour = towards black or white.
    r = draws["colour"]
    base = COLOURS[spec.colour][0]
    jit = [next(r) for _ in range(3)]
    gain = 0.85 + 0.25 * next(r)
    main = _const([min(1.0, max(0.0, c * gain + (j - 0.5) * 0.1)) for c, j in zip(base, jit, strict=True)])
    dark = _luma(base) > 0.55  # from the class colour, so pattern and ink never flip within a class
    second = (main * 0.35) if dark else (main + 0.7 * (1 - main))
    ink = _const((0.08, 0.08, 0.1) if dark else (0.97, 0.97, 0.95))

    body, parts, shading, hw, (mu, mv, mr) = _shape(spec.shape, u, v)
    mr *= _MARK_SCALE
    pat = _pattern(spec.pattern, u, v, px)
    colour = main if pat is None else main + pat * (second - main)
    if shading == "cyl":
        un = np.minimum(np.maximum(u * (1 / hw), -1.0), 1.0)
        light = 1.08 - 0.38 * un * un + 0.22 * np.exp(-(((un + 0.45) * 5) ** 2))
    else:
        light = 1.05 - 0.12 * v
    main_lit = main * light
    _over(sub, _cover(body, px), main_lit if pat is None else colour * light)
    for d, pc in parts:
        if isinstance(pc, float):
            _over(sub, _cover(d, px), main_lit * pc)
        else:
            _over(sub, _cover(d, px), _const(pc) * light if shading == "cyl" else _const(pc))

    # The brand mark: a plain patch (hides the pattern) and the glyph, at a fixed spot.
    a, b = u - mu, v - mv
    patch = np.maximum(np.sqrt(a * a + b * b) - 1.3 * mr, body)
    _over(sub, _cover(patch, px), main_lit)
    glyph = np.maximum(_glyph(BRANDS[spec.brand][0], a * pose.flip, b, mr), body)
    _over(sub, _cover(glyph, px), ink)


def _occluder(img: np.ndarray, size: int, pose: _Pose, r: Iterator[float]) -> None:
    """Occasionally something in front of the object (a hand, a price tag, another item)."""
    occ = next(r) < 0.15
    ox, oy, ow, oh, oc = next(r), next(r), next(r), next(r), next(r)
    if occ:
        ocol = _rgb(0.05 + 0.04 * oc, 0.35, 0.85) if oc < 0.4 else _rgb(oc, 0.5, 0.4 + 0.5 * ow)
        c, w, h = _axis(size), 0.12 + 0.25 * ow * pose.s, 0.12 + 0.25 * oh * pose.s
        ax = _cover(np.abs(c - (pose.cx + (ox - 0.5) * 1.6 * pose.s)) - w, px_img(size))
        ay = _cover(np.abs(c - (pose.cy + (oy - 0.5) * 1.6 * pose.s)) - h, px_img(size))
        _over(img, ay[:, None] * ax, ocol)


def _lighting(img: np.ndarray, x: np.ndarray, y: np.ndarray, size: int, r: Iterator[float], rng: random.Random) -> None:
    """A gain gradient and a colour cast; then sensor noise (a window of a fixed noise bank)."""
    g = 0.75 + 0.4 * next(r)
    lx, ly = (next(r) - 0.5) * 0.5, (next(r) - 0.5) * 0.5
    cast = _const([1 + (next(r) - 0.5) * 0.12 for _ in range(3)]) * g
    img *= (1 + lx * x + ly * y) * cast
    sigma = 0.01 + 0.035 * next(r)
    bank = _noise_bank(size)
    oy, ox = rng.randrange(bank.shape[1] - size + 1), rng.randrange(bank.shape[2] - size + 1)
    img += bank[:, oy : oy + size, ox : ox + size] * sigma


def render(item: SyntheticItem, size: int) -> np.ndarray:
    """Draw one item's image.

    A pure function of ``(item.spec, item.seed, size)``: the same item at the same size gives
    identical pixels, and the same item at two sizes shows the same scene (only the pixel noise
    differs). Top-level, so it can run in a process pool.

    Args:
        item: the item (its ``spec`` and ``seed`` are used).
        size: image side in pixels (>= 8; 32 and 64 are the tested sizes).

    Returns:
        ``uint8`` array ``[size, size, 3]`` (HWC, RGB).
    """
    size = _check_int("size", size, 8)
    rng = random.Random(item.seed)  # Mersenne Twister: stable across versions, cheap to seed
    draws = _Draws(rng, item.seed)
    x, y = _grid(size)
    # Channels first while drawing: per-channel colours broadcast over contiguous rows (fast).
    img = np.empty((3, size, size), dtype=_F)
    _background(img, x, y, size, draws["background"])
    _clutter(img, x, y, size, draws["clutter"])
    pose = _Pose.draw(draws["pose"])
    win = pose.window(size)
    _object(img[:, win[0], win[1]], x[win], y[win], pose, item.spec, size, draws)  # a view: draws into img
    _occluder(img, size, pose, draws["occluder"])
    _lighting(img, x, y, size, draws["lighting"], rng)
    draws.check_used()
    img *= 255
    img += 0.5
    np.clip(img, 0, 255, out=img)
    return img.transpose(1, 2, 0).astype(np.uint8, order="C")
