"""Typed recipes: dataclasses, strict TOML loading and dotted overrides.

A recipe is data. It is read with the standard library's :mod:`tomllib`; every key must be known
and of the right type, or a :class:`~sicot_cli.errors.SicotError` names the key and the file.
Command-line overrides are ``section.key=value`` strings whose value is parsed as a TOML value
(``train.lr=0.05``, ``data.source="manifest"``, ``train.topk=[1,5]``); a bare word that is not
valid TOML is taken as a string (``model.backbone=resnet50``).

The dataclass defaults are the paper's settings where the paper gives them (the optimiser of §4.3,
ResNet-50 aside: the default backbone is CPU-sized). The embedded default recipe, used when no
``--recipe`` is given, is ``recipes/demo.toml`` (shipped inside the package as ``sicot_cli.recipes``).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from sicot_cli.errors import SicotError
from sicot_cli.fsutil import read_text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Range:
    """The bounds of a numeric recipe field, written next to the field (``Annotated[int, Range(1, 4096)]``).

    Every number is checked against its field's range when a recipe is built, so a value that
    would crash later (a negative seed, a 6 PiB title buffer) or silently do harm (a negative
    weight decay) is refused in one line naming the key. Floats must also be finite everywhere.
    """

    lo: float
    hi: float
    lo_open: bool = False  # lo itself is excluded
    hi_open: bool = False

    def holds(self, v: float) -> bool:
        return (self.lo < v if self.lo_open else self.lo <= v) and (v < self.hi if self.hi_open else v <= self.hi)

    def violated(self, v: float) -> str:
        """The bound ``v`` breaks, as the message says it (``>= 1``, ``< 1``)."""
        if not (self.lo < v if self.lo_open else self.lo <= v):
            return f"{'>' if self.lo_open else '>='} {self.lo}"
        return f"{'<' if self.hi_open else '<='} {self.hi}"


MAX_SEED = 2**63 - 1  # numpy's SeedSequence takes any int >= 0, torch.manual_seed at most 2**64 - 1
Seed = Annotated[int, Range(0, MAX_SEED)]
Count = Annotated[int, Range(1, 10**9)]  # images, classes, epochs...: at least one, and not absurd
Fraction = Annotated[float, Range(0, 1, hi_open=True)]


@dataclass
class SyntheticConfig:
    """The built-in, seeded, synthetic long-tailed dataset (see ``sicot_cli/data/synthetic.py``)."""

    num_classes: Annotated[int, Range(2, 3200)] = 120
    max_per_class: Annotated[int, Range(1, 100_000)] = 300
    min_per_class: Annotated[int, Range(1, 100_000)] = 4
    test_per_class: Annotated[int, Range(0, 100_000)] = 6
    language: Literal["zh", "en", "mixed"] = "mixed"
    seed: Seed = 0
    # > 0: instead of the long-tailed set above, a balanced PRETRAINING set of this many other
    # classes (none of the long-tailed set's), pretrain_per_class training images each: the demo's
    # stand-in for ImageNet (recipes/demo-pretrain.toml)
    pretrain_classes: Annotated[int, Range(0, 3200)] = 0
    pretrain_per_class: Annotated[int, Range(1, 100_000)] = 20


@dataclass
class DataConfig:
    """Where the raw data comes from and how it is cut into the prepared HDF5."""

    source: Literal["synthetic", "manifest"] = "synthetic"
    manifest: str = ""  # CSV/JSONL with image,title,label[,split][,id]; relative to the recipe
    out: str = "data/demo.h5"  # the prepared file; relative to the working directory
    image_size: Annotated[int, Range(8, 1024)] = 32
    test_per_class: Annotated[int, Range(0, 10**6)] = (
        6  # when the manifest has no split: test images per class (balanced)
    )
    min_train_per_class: Annotated[int, Range(1, 10**6)] = (
        1  # classes with fewer training images after the split are dropped
    )
    # Validation rows carved from the training rows (per class floor(val_fraction * n), seeded by
    # split_seed): every choice (checkpoint-best, eval.select, tau...) is made on them, never on test.
    val_fraction: Annotated[float, Range(0, 0.5)] = 0.1
    # Validation fold: 0 = the carve above; k > 0 = another draw of the same number of validation
    # rows per class, seeded by (split_seed, k): training and test rows are otherwise the same, so
    # a choice can be made on several folds (docs/datasets.md, "Validation folds"). Refused where
    # the manifest names its own val rows (re-draw those with `sicot datasets import --val-seed`).
    val_fold: Seed = 0
    max_title_tokens: Annotated[int, Range(1, 4096)] = 32  # allocated as [rows, max_title_tokens]
    split_seed: Seed = 0
    workers: Annotated[int, Range(0, 4096)] = 0  # decode processes; 0 = one per core
    strict: bool = False  # turn skipped rows into errors
    # Decompression-bomb guard: images over this many pixels (after JPEG draft-mode reduction) are
    # skipped. PIL's own default (89 MP); raise it for large clip-art or scans.
    max_image_pixels: Annotated[int, Range(1, 10**10)] = 89_478_485
    # How the images are stored (docs/datasets.md, "Storage formats"): "raw" = format 1, uint8 pixels
    # at image_size inside the .h5 (fastest for small images: nothing to decode); "jpeg" = format 2,
    # the centre square at stored_side JPEG-encoded in shard files beside the .h5, decoded and
    # randomly cropped by the loader's worker processes; "auto" = jpeg from 96 px on.
    images: Literal["auto", "raw", "jpeg"] = "auto"
    stored_side: Annotated[int, Range(0, 4096)] = (
        0  # jpeg: the stored square's side; 0 = image_size * 8 / 7 (256 for 224)
    )
    jpeg_quality: Annotated[int, Range(1, 95)] = 90
    shard_rows: Annotated[int, Range(1, 10**7)] = 1024  # jpeg: candidate rows per shard file (the loader's block)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class TextConfig:
    """Tokenization and the paper's noise-word filter (§4.1)."""

    drop_most_frequent: Fraction = 0.05  # fraction of the vocabulary (by frequency rank) dropped at the top
    drop_least_frequent: Fraction = 0.05  # fraction dropped at the bottom
    min_count: Count = 1
    # Which words drop_most_frequent removes from the top: "label_entropy" (the default: the words
    # whose training titles are spread most evenly over the labels, i.e. carry the least label
    # information; see sicot_cli/data/vocab.py) or "frequency" (the paper's rule: the most frequent
    # words). On a small vocabulary the paper's rule removes the words that name the class and
    # empties titles, whose training images are then dropped (emoji-zh at 5 %: 647 of 2,857; the
    # demo: its attribute words); docs/presets.md, "The noise-word filter".
    drop_rule: Literal["frequency", "label_entropy"] = "label_entropy"


@dataclass
class EmbedConfig:
    """word2vec (gensim), or pretrained vectors loaded with gensim ``KeyedVectors``."""

    pretrained: str = ""  # word2vec text or binary file; empty = train on the training titles
    binary: bool = False  # format of `pretrained`
    # More sentences for word2vec, trained together with the training titles: a UTF-8 text file, one
    # sentence per line (tokenized like the titles); "" = the training titles alone. The paper's word
    # vectors come from a large product corpus; `sicot datasets fetch icons` writes one offline
    # (data/icons/icon-words.txt, the icon sets' names and tags, English). Not with `pretrained`.
    corpus: str = ""
    dim: Annotated[int, Range(1, 4096)] = 64
    window: Annotated[int, Range(1, 1000)] = 5
    epochs: Annotated[int, Range(1, 100_000)] = 20
    sg: bool = True  # skip-gram (true) or CBOW (false)
    negative: Annotated[int, Range(0, 1000)] = 5
    seed: Seed = 0


@dataclass
class EvalConfig:
    """Head/tail boundary (the paper's, on training counts) and the many/medium/few protocol."""

    head_threshold: Count = 40  # a class with >= this many training images is a head class
    many_threshold: Annotated[int, Range(0, 10**9)] = 100  # many: > 100 training images
    few_threshold: Annotated[int, Range(0, 10**9)] = 20  # few: < 20 training images
    # "fixed": the three thresholds above. "data": derived from the prepared file's training counts
    # at prepare time (head: the mean count per class, as the paper's iMaterialist boundary 200 sits
    # at its mean 218; few/many: the class-count tertiles) and recorded in the file, from which
    # runs and reports take them unless a threshold is overridden (sicot_cli/data/prepare.py).
    boundaries: Literal["fixed", "data"] = "fixed"
    # Which weights are scored on the test split at the end of training (the test set is touched
    # once): "last" (no selection) or "best" (the epoch with the best validation top-1).
    select: Literal["last", "best"] = "last"
    # Post-hoc logit adjustment (Menon et al. 2021) of the scored weights: "val" chooses tau of
    # logit_adjust_taus on the validation rows (class-averaged top-1), shifts the classifier's bias by
    # -tau * log(training prior) in the scored checkpoint, then scores test once. "off": no adjustment.
    # On a finished run: `sicot decouple RUN --method logit_adjust` (docs/long-tail.md).
    logit_adjust: Literal["off", "val"] = "off"
    logit_adjust_taus: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0])


@dataclass
class ModelConfig:
    """The two streams (§3.3)."""

    backbone: str = "resnet18"  # any torchvision classification model; the paper: resnet50
    pretrained: str = ""  # "" (random init), "imagenet" (torch hub cache, never downloaded), a state_dict file, or a sicot run directory / checkpoint (its visual stream)
    encoder: str = "bilinear"  # a registered encoder, or "none" for the image-only baseline
    # the encoder's own options (bilinear: rank; bilstm: hidden_size; bilstm_attention: attention_dim too),
    # one at a time from the command line: model.encoder_options.rank=64
    encoder_options: dict[str, Any] = field(default_factory=dict)
    freeze_embeddings: bool = False
    semantic_norm: Literal["batchnorm", "none"] = (
        "batchnorm"  # "batchnorm" (s on x_v's scale, the default) or "none" (the paper's literal max)
    )
    # Does CE(x_m) also train the shared classifier (the paper: yes)? false: only CE(x_v) does, so the
    # classifier is fit to the features it sees at inference (see sicot_cli/model.py).
    mixed_trains_classifier: bool = True


def floor_share(fraction: float, n: int) -> int:
    """``floor(fraction * n)`` for the decimal the user wrote: 0.41 of 300 is 123, where the float
    product (122.99999999999999) floors to 122. (Every default fraction gives the float result.)"""
    from fractions import Fraction

    return math.floor(Fraction(repr(float(fraction))) * n)


@dataclass
class TrainConfig:
    """The paper's optimiser (§4.3) and the loop's settings."""

    epochs: Annotated[int, Range(1, 100_000)] = 12
    # >= 2: batch normalisation (the backbones, model.semantic_norm) needs two images a step
    batch_size: Annotated[int, Range(2, 2**20)] = 256
    lr: Annotated[float, Range(0, 100, lo_open=True)] = 0.1
    momentum: Annotated[float, Range(0, 1, hi_open=True)] = 0.9
    weight_decay: Annotated[float, Range(0, 1)] = 1e-4
    step_size: Annotated[int, Range(1, 100_000)] = 1  # StepLR: epochs per step
    gamma: Annotated[float, Range(0, 1, lo_open=True)] = 0.8
    lam: Annotated[float, Range(0, 1000)] = 1.0  # lambda of Eq. 1: weight of the mixed-feature loss
    # Divide Eq. 1 by (1 + lam) when co-training. x_m = max(x_v, s) is close to x_v, so the sum's
    # gradient on the visual stream and the shared classifier is about (1 + lam) times the
    # baseline's: at one learning rate, co-training takes larger steps than the baseline it is
    # compared with. false = the paper's literal sum (measured in README, "Step size").
    normalize_loss: bool = True
    # Co-training starts after this fraction of the epochs: the first floor(cotrain_after * epochs)
    # epochs train with lam = 0, i.e. exactly the baseline's step (the semantic stream is computed
    # but gets no gradient), the rest with lam. Eq. 1 from the first step is 0 (the paper).
    # docs/demo-pretraining.md, "Image-only first".
    cotrain_after: Annotated[float, Range(0, 1, hi_open=True)] = 0.0
    # Weight of a distillation term added to Eq. 1 while co-training: the title-aware scores of
    # x_m (detached) teach the image-only scores of x_v, T^2 * KL at temperature distill_temperature
    # (sicot_cli.model.distill_loss), outside normalize_loss's division. 0 = off (the paper).
    # docs/presets.md; measured in docs/demo-pretraining.md, "Three more variants, chosen on validation".
    distill: Annotated[float, Range(0, 1000)] = 0.0
    distill_temperature: Annotated[float, Range(0, 100, lo_open=True)] = 2.0
    # How CE(x_m)'s gradient joins CE(x_v)'s on the visual stream and the shared classifier: "sum" =
    # Eq. 1's gradient (over 1 + lam with normalize_loss); "orthogonal" = CE(x_v)'s gradient plus lam
    # times the part of CE(x_m)'s that is orthogonal to it, so the image step is the baseline's
    # (sicot_cli.model.orthogonal_backward; needs normalize_loss = false). docs/presets.md.
    mixed_step: Literal["sum", "orthogonal"] = "sum"
    seed: Seed = 0
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    amp: bool = True  # bf16 autocast of the training steps on CUDA (ignored on CPU); scoring is always float32
    channels_last: bool = True
    compile: bool = False  # torch.compile the model (off until measured on your GPU)
    in_memory: Literal["auto", "yes", "no"] = "auto"  # hold the training images in RAM
    memory_limit_gb: Annotated[float, Range(0, 10**6)] = 8.0  # "auto" holds the images in RAM below this size
    block_rows: Annotated[int, Range(1, 10**7)] = 4096  # rows per contiguous read when streaming from disk
    shuffle_blocks: Annotated[int, Range(1, 10**4)] = 4  # blocks mixed in the shuffle buffer
    augment: bool = True  # random resized crop + horizontal flip, on uint8 batches
    crop_scale: list[float] = field(default_factory=lambda: [0.35, 1.0])
    eval_batch_size: Annotated[int, Range(1, 2**20)] = 512
    topk: list[int] = field(default_factory=lambda: [1, 3])  # must include 1 (reported, and chooses checkpoint-best)
    runs_dir: str = "runs"
    # torch intra-op threads: 0 = auto (OMP_NUM_THREADS, else the cores this process may use, at most 8); set it on a
    # shared machine, where every job using all cores oversubscribes them (epochs 10x slower).
    threads: Annotated[int, Range(0, 1024)] = 0
    # Format-2 (JPEG) data: processes decoding and cropping batches; 0 = auto (the cores left after the
    # step's threads, at least 1, at most 16). Format-1 data needs none.
    loader_workers: Annotated[int, Range(0, 256)] = 0
    # Format-2 data under torchrun: false (default) = every rank takes its slice of the same global
    # batches, exactly one process's batches and crops (each rank reads the shards the batch touches);
    # true = each rank reads and decodes only its own shards (every world-th one): disjoint reads for
    # many machines, global batches drawn alike but not equal to one process's (docs/datasets.md).
    rank_shards: bool = False
    # Keep checkpoint-best.pt (a second copy of the weights, about as large as the model); false
    # writes only checkpoint-last.pt (requires eval.select = "last").
    keep_best: bool = True
    # Distributed (torchrun): shard the shared classifier by class across ranks. "auto" shards from
    # classifier_parallel_min_classes classes on; "yes"/"no" force it (sicot_cli/distributed.py).
    classifier_parallel: Literal["auto", "yes", "no"] = "auto"
    classifier_parallel_min_classes: Annotated[int, Range(1, 10**9)] = 100_000
    # Softmax over a sample of the classes per step (Partial FC), both terms of Eq. 1 and every rank
    # alike: the batch's labels plus uniformly drawn others, this fraction of all classes. 1.0 = the
    # exact softmax over all classes. Only the sampled rows are updated (sicot_cli/classifier_step.py).
    class_sample_rate: Annotated[float, Range(0, 1, lo_open=True)] = 1.0
    # The shared classifier's storage while training: its weights and SGD momentum in "float32" or
    # "bfloat16" (half their memory and checkpoint size). bfloat16 needs class_sample_rate < 1: each
    # step works on fp32 copies of the sampled rows and writes them back with stochastic rounding, so
    # updates smaller than bf16's resolution are not lost on average. A finished run's evaluation,
    # export and serving load the classifier in fp32 (sicot_cli/classifier_step.py).
    classifier_dtype: Literal["float32", "bfloat16"] = "float32"
    # The long-tail toolbox (docs/long-tail.md). The loss of BOTH terms of Eq. 1, with the same
    # training class prior: "ce" (the paper), "logit_adjusted" (CE on logits + loss_tau * log prior;
    # Menon et al. 2021), "balanced_softmax" (Ren et al. 2020: logit_adjusted at loss_tau = 1) or
    # "ldam" (Cao et al. 2019: the true class's logit lowered by C / n_j^(1/4), at most
    # ldam_max_margin, in logit units: the classifier here is a plain linear one, not a cosine one).
    loss: Literal["ce", "logit_adjusted", "balanced_softmax", "ldam"] = "ce"
    loss_tau: Annotated[float, Range(0, 10)] = 1.0
    ldam_max_margin: Annotated[float, Range(0, 100, lo_open=True)] = 0.5
    # Deferred re-weighting (Cao et al. 2019): from the first epoch at or after drw_start * epochs on,
    # each row's loss is weighted by its class's (1 - beta) / (1 - beta^n_j), normalised to mean 1.
    reweight: Literal["none", "drw"] = "none"
    drw_start: Annotated[float, Range(0, 1)] = 0.8
    drw_beta: Annotated[float, Range(0, 1, hi_open=True)] = 0.9999
    # Which rows an epoch draws (sicot_cli/data/sampler.py): "instance" (each training row once, the
    # paper), or n_train rows drawn with replacement with class probabilities proportional to 1
    # ("class_balanced"), to sqrt(n_j) ("sqrt") or moving from n_j to 1 over the epochs ("progressive").
    sampler: Literal["instance", "class_balanced", "sqrt", "progressive"] = "instance"

    @property
    def image_only_epochs(self) -> int:
        """Epochs trained with lam = 0 before co-training starts (``cotrain_after``)."""
        return floor_share(self.cotrain_after, self.epochs)

    @property
    def drw_epoch(self) -> int:
        """The first (0-based) epoch that DRW weights (``drw_start``)."""
        return floor_share(self.drw_start, self.epochs)


@dataclass
class DecoupleConfig:
    """The second stage of decoupled classifier learning on a finished run (``sicot decouple``; Kang et al. 2020).

    The run's visual stream is frozen and its training/validation features are computed once
    (eval mode, no augmentation); only the classifier changes (docs/long-tail.md).
    """

    # "crt": a new classifier trained with `sampler`; "lws": a learned scale per class of the run's
    # classifier; "tau_norm": each class's weights divided by their norm^tau, no bias; "logit_adjust":
    # the post-hoc logit adjustment of Menon et al. (bias - tau * log prior). tau_norm and
    # logit_adjust take the tau of `taus` with the best class-averaged validation top-1.
    method: Literal["crt", "lws", "tau_norm", "logit_adjust"] = "crt"
    epochs: Annotated[int, Range(1, 100_000)] = 10
    batch_size: Annotated[int, Range(1, 2**20)] = 512
    lr: Annotated[float, Range(0, 100, lo_open=True)] = 0.1  # cosine-annealed to 0 over the epochs
    momentum: Annotated[float, Range(0, 1, hi_open=True)] = 0.9
    weight_decay: Annotated[float, Range(0, 1)] = 5e-4
    sampler: Literal["instance", "class_balanced", "sqrt", "progressive"] = "class_balanced"
    taus: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0])


# Named sets of co-training keys (docs/presets.md). A recipe's ``preset`` fills in these keys
# unless the recipe file or a command-line override sets them: defaults < preset < file < CLI.
# "sicot" is the toolkit's default co-training (the dataclass defaults above); "paper" is Eq. 1 as
# the paper writes it: the plain sum, the raw title embedding in the max.
PRESETS: dict[str, dict[str, Any]] = {
    "sicot": {"train.normalize_loss": True, "model.semantic_norm": "batchnorm", "model.mixed_trains_classifier": True},
    "paper": {"train.normalize_loss": False, "model.semantic_norm": "none", "model.mixed_trains_classifier": True},
}


@dataclass
class Recipe:
    """A whole experiment: data, text, embeddings and evaluation settings."""

    name: str = "demo"
    preset: str = "sicot"  # a key of PRESETS: "sicot" (the default co-training) or "paper" (Eq. 1 literally)
    data: DataConfig = field(default_factory=DataConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decouple: DecoupleConfig = field(default_factory=DecoupleConfig)

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe as plain data (what ``config.json`` holds)."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, ensure_ascii=False)

    @property
    def explicit(self) -> set[str]:
        """Dotted keys the user set (in a ``--recipe`` file or as overrides), not defaults."""
        return self.__dict__.get("_explicit", set())


# The recipe's sections (each a table of its own): what a recorded recipe must hold as tables.
SECTIONS = tuple(f.name for f in dataclasses.fields(Recipe) if dataclasses.is_dataclass(f.default_factory))


# What a prepared file decides for every run made from it: how its data was built (always), and
# its name and evaluation boundaries (unless the user sets them explicitly).
PREPARED_SECTIONS = ("data", "text", "embed")
PREPARED_DEFAULTS = ("name", "eval.head_threshold", "eval.many_threshold", "eval.few_threshold", "eval.boundaries")


# Keys of the prepared sections that say how prepare ran, not what the file holds: never a clash.
PREPARE_HOW = frozenset({"data.out", "data.workers", "data.strict"})


def _same_path(key: str, a: Any, b: Any) -> bool:
    """Two spellings of one file (a recipe's paths are resolved against its folder)."""
    if key not in ("data.manifest", "embed.pretrained", "embed.corpus") or not a or not b:
        return False
    return os.path.normpath(os.path.abspath(str(a))) == os.path.normpath(os.path.abspath(str(b)))


FILE_REMEDY = "Prepare the recipe's own file (`sicot prepare --recipe ... --force`) or pass the --data it writes"


def adopt_prepared(
    recipe: Recipe, prepared_recipe: dict[str, Any], data_path: str | Path, remedy: str | None = FILE_REMEDY
) -> list[str]:
    """Take the prepared file's settings into ``recipe`` (in place); return the keys that changed.

    The ``data``, ``text`` and ``embed`` sections describe how the file was built, so they are the
    file's (with ``data.out`` the file's actual path). ``name`` and the ``eval`` boundaries are the
    file's unless set explicitly in the ``--recipe`` file or on the command line: runs made from
    ``sicot prepare --manifest products.csv`` are named ``products-*`` and scored at the boundaries
    prepare chose, not the built-in demo's. A prepared-section key that the recipe file or the
    command line sets explicitly to another value is still the file's, with one warning naming each
    and ending in ``remedy`` (None: no warning, the caller has given it).
    """
    try:
        theirs = recipe_from_dict(
            {k: v for k, v in prepared_recipe.items() if k in ("name", "eval", *PREPARED_SECTIONS)},
            f"{data_path} (its recipe)",
        )
    except SicotError:
        return []  # a file from another sicot version: its settings stay the recipe's
    changed: list[str] = []
    clashes: list[str] = []
    for section in PREPARED_SECTIONS:
        mine, other = getattr(recipe, section), getattr(theirs, section)
        if section == "data":
            other.out = str(data_path)
        for f in dataclasses.fields(mine):
            key, ours, its = f"{section}.{f.name}", getattr(mine, f.name), getattr(other, f.name)
            if ours != its:
                setattr(mine, f.name, its)
                changed.append(key)
                if key in recipe.explicit and key not in PREPARE_HOW and not _same_path(key, ours, its):
                    clashes.append(f"{key} = {ours!s} (the file: {its!s})")
    if clashes and remedy is not None:
        log.warning(
            "%s was prepared with other settings than the recipe asks, and training uses the file's: %s. %s",
            data_path,
            "; ".join(clashes),
            remedy,
        )
    for key in PREPARED_DEFAULTS:
        if key in recipe.explicit:
            continue
        *path, attr = key.split(".")
        mine_obj, other_obj = recipe, theirs
        for part in path:
            mine_obj, other_obj = getattr(mine_obj, part), getattr(other_obj, part)
        if getattr(mine_obj, attr) != getattr(other_obj, attr):
            setattr(mine_obj, attr, getattr(other_obj, attr))
            changed.append(key)
    return changed


def _flat_keys(table: dict[str, Any], prefix: str = "") -> set[str]:
    out: set[str] = set()
    for key, value in table.items():
        dotted = f"{prefix}.{key}" if prefix else key
        out.add(dotted)
        if isinstance(value, dict):
            out |= _flat_keys(value, dotted)
    return out


def _type_name(tp: Any) -> str:
    if dataclasses.is_dataclass(tp):
        return "table"
    origin = typing.get_origin(tp)
    if origin is list:
        (inner,) = typing.get_args(tp)
        return f"list of {_type_name(inner)}"
    if origin is dict:
        return "table"
    return {int: "integer", float: "number", str: "string", bool: "boolean"}.get(tp, str(tp))


def _one_of(choices: tuple[str, ...]) -> str:
    """``a, b or c``: how an error message lists the values a field takes."""
    return choices[0] if len(choices) == 1 else f"{', '.join(choices[:-1])} or {choices[-1]}"


def _article(name: str) -> str:
    return ("an " if name[0] in "aeiou" else "a ") + name


def _shown(value: Any) -> str:
    """A recipe value as its TOML reads, for an error message (no Python reprs of dates or tables)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (datetime.date, datetime.time)):
        return f"{value.isoformat()} (a TOML date/time)"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "[" + ", ".join(_shown(v) for v in value) + "]"
    return repr(value)


def _check_value(value: Any, tp: Any, key: str, where: str) -> Any:
    """Return ``value`` converted to ``tp`` (int -> float only), or raise naming ``key``."""
    if tp is Any:  # a free table's value (model.encoder_options.rank): its encoder checks it
        return value
    if typing.get_origin(tp) is Annotated:
        base, *extras = typing.get_args(tp)
        value = _check_value(value, base, key, where)
        for bound in extras:
            if isinstance(bound, Range) and not bound.holds(value):
                raise SicotError(f"{where}: {key} must be {bound.violated(value)}, got {_shown(value)}")
        return value
    if typing.get_origin(tp) is Literal:
        choices = typing.get_args(tp)
        if not isinstance(value, str) or value not in choices:
            raise SicotError(f"{where}: {key} must be {_one_of(choices)}, got {_shown(value)}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise SicotError(f"{where}: [{key}] must be a table, got {_shown(value)}")
        return _build(tp, value, key, where)
    origin = typing.get_origin(tp)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise SicotError(f"{where}: {key} must be {_article(_type_name(tp))}, got {_shown(value)}")
        return [_check_value(v, inner, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise SicotError(f"{where}: {key} must be a table, got {_shown(value)}")
        return dict(value)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _check_value(value, arg, key, where)
            except SicotError:
                continue
        raise SicotError(f"{where}: {key} has the wrong type: {_shown(value)}")
    ok = (
        (tp is bool and isinstance(value, bool))
        or (tp is int and isinstance(value, int) and not isinstance(value, bool))
        or (tp is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (tp is str and isinstance(value, str))
    )
    if not ok:
        raise SicotError(f"{where}: {key} must be {_article(_type_name(tp))}, got {_shown(value)}")
    if tp is float and not math.isfinite(value):  # nan passes every comparison; inf trains into NaN weights
        raise SicotError(f"{where}: {key} must be a finite number, got {_shown(value)}")
    if tp is str and "\x00" in value:  # would surface later as a ValueError from the OS layer
        raise SicotError(f"{where}: {key} contains a NUL character")
    return float(value) if tp is float else value


def _build(cls: type, table: dict[str, Any], prefix: str, where: str) -> Any:
    hints = typing.get_type_hints(cls, include_extras=True)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if key not in names:
            choices = ", ".join(sorted(names))
            raise SicotError(f"{where}: unknown key {dotted!r} (known here: {choices})")
        kwargs[key] = _check_value(value, hints[key], dotted, where)
    return cls(**kwargs)


def recipe_from_dict(table: dict[str, Any], where: str = "<recipe>") -> Recipe:
    """Build a :class:`Recipe` from plain data, strictly (unknown keys and wrong types are errors)."""
    recipe = _build(Recipe, table, "", where)
    validate(recipe, where)
    recipe.__dict__["_explicit"] = _flat_keys(table)
    return recipe


def _blame_overrides(
    error: SicotError, where: str, path: str | Path | None, overrides: list[str] | None, given_as: dict[str, str]
) -> SicotError:
    """``error`` (from checking the recipe) restated to name the overrides whose keys it mentions.

    A rule that ties keys together (``text.drop_most_frequent + text.drop_least_frequent < 1``),
    broken by an override, is the override's doing: the message names it (as the user typed it:
    ``--workers 8`` for an override the CLI made from an option), and the recipe file it was applied
    to, instead of blaming a file the user did not change. Of overrides setting the same key, the
    last is named: its value is the one refused.
    """
    message = str(error).removeprefix(f"{where}: ")
    last: dict[str, str] = {}
    for item in overrides or []:
        last[item.split("=", 1)[0].strip()] = item
    named = [item for key, item in last.items() if re.search(rf"(?<![\w.]){re.escape(key)}(?![\w])", message)]
    if not named:
        return error
    blamed = " and ".join(given_as.get(item) or f"override {item!r}" for item in named)
    on = f" (applied to {where})" if path is not None else ""
    return SicotError(f"{blamed}{on}: {message}")


def load_recipe(
    path: str | Path | None, overrides: list[str] | None = None, given_as: dict[str, str] | None = None
) -> Recipe:
    """Load a TOML recipe (or the built-in demo recipe when ``path`` is None) and apply overrides.

    Args:
        path: a ``.toml`` file, or None for the built-in demo recipe.
        overrides: ``section.key=value`` strings applied in order after loading.
        given_as: what the user typed for an override the CLI made from an option (``data.workers=8``
            -> ``--workers 8``), named in its errors instead of the override.

    Returns:
        The validated recipe. A relative ``data.manifest`` is resolved against the recipe's folder.

    Raises:
        SicotError: missing or unreadable file, TOML syntax error, unknown key, wrong type.
    """
    table: dict[str, Any] = {}
    where = "built-in demo recipe"
    base = None if path is None else Path(path).parent  # what paths inside the recipe are relative to
    virtual = False  # base is a built-in recipe's recipes/ folder, which need not exist here
    if path is None:
        table = tomllib.loads(_demo_recipe_text())
    else:
        p = Path(path)
        where = str(p)
        # a file of that name wins; a folder or a broken link named like a built-in recipe is no recipe
        builtin = None if p.is_file() or p.parent != Path() else _builtin_recipe_text(p.name)
        if builtin is not None:
            if os.path.lexists(p):
                log.warning(
                    "./%s is no recipe file (a folder or a broken link): using the built-in recipe %s", p, p.name
                )
            # a shipped recipe by name, from any folder and from an installed wheel: its paths read
            # as in a checkout's recipes/ folder beside the working folder (data/ is the working folder's)
            text, where, base, virtual = builtin, f"built-in recipe {p.name}", Path("recipes"), True
        else:
            text = read_text(p, "recipe", missing=_no_recipe(), expected="a .toml recipe")
        try:
            table = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise SicotError(f"{p}: not valid TOML: {e}") from None
        except RecursionError:  # tomllib recurses per nesting level: `x = [[[[...]]]]`
            raise SicotError(f"{p}: not valid TOML: nested too deeply") from None
    given_as = given_as or {}
    for item in overrides or []:
        _apply_override(table, item, where, given_as.get(item))
    written = _flat_keys(table)  # what the user wrote, before the preset fills its keys in
    try:
        apply_preset(table, where)
        recipe = recipe_from_dict(table, where)
    except SicotError as e:  # a rule broken by an override: name the override (and the recipe it changed)
        raise _blame_overrides(e, where, path, overrides, given_as) from None
    # the built-in demo's own keys are defaults, not the user's choices; a preset's keys are the preset's
    recipe.__dict__["_explicit"] = _override_keys(overrides) if path is None else written
    _expand_home(recipe)
    if path is not None:
        # Paths inside a recipe are relative to the recipe's folder; paths given as overrides
        # on the command line are relative to the working directory, as a shell user expects.
        given = _override_keys(overrides)
        for key, section, attr in (
            ("data.manifest", recipe.data, "manifest"),
            ("embed.pretrained", recipe.embed, "pretrained"),
            ("embed.corpus", recipe.embed, "corpus"),
        ):
            value = getattr(section, attr)
            if value and not Path(value).is_absolute() and key not in given and base is not None:
                # recipes/../data/x.csv cannot be opened where there is no recipes/ folder: a built-in
                # recipe's paths are normalised (a file's keep their folder, symbolic links and all)
                setattr(section, attr, os.path.normpath(base / value) if virtual else str(base / value))
    return recipe


# The keys that name files or folders. A TOML string (and an override: bash expands no ``~`` after
# ``key=``) keeps a leading ``~`` literally, which made a folder named ``~`` in the working folder.
PATH_KEYS = ("data.manifest", "data.out", "embed.pretrained", "embed.corpus", "model.pretrained", "train.runs_dir")


def _expand_home(recipe: Recipe) -> None:
    """``~`` and ``~user`` at the start of a path key mean the home folder, as in a shell."""
    for key in PATH_KEYS:
        section, attr = key.split(".")
        value = getattr(getattr(recipe, section), attr)
        if isinstance(value, str) and value.startswith("~"):
            expanded = os.path.expanduser(value)
            if expanded.startswith("~"):  # no such user, or no home folder
                raise SicotError(
                    f"{key} = {value!r}: {value.split('/')[0]} names no home folder here; write the path out"
                )
            setattr(getattr(recipe, section), attr, expanded)


def apply_preset(table: dict[str, Any], where: str = "<recipe>") -> None:
    """Fill in the keys of the table's ``preset`` (default "sicot") that the table does not set.

    Raises:
        SicotError: an unknown preset (the message lists the known ones).
    """
    name = table.get("preset", "sicot")
    if not isinstance(name, str) or name not in PRESETS:
        raise SicotError(f"{where}: preset must be one of {', '.join(sorted(PRESETS))}, got {name!r}")
    for dotted, value in PRESETS[name].items():
        *sections, key = dotted.split(".")
        node = table
        for part in sections:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                return  # a wrong type: recipe_from_dict names it
        node.setdefault(key, value)


def recipe_with_overrides(table: dict[str, Any], overrides: list[str] | None, where: str) -> Recipe:
    """A recipe from plain data (e.g. a prepared file's recorded recipe) with overrides applied."""
    table = json.loads(json.dumps(table))
    for item in overrides or []:
        _apply_override(table, item, where)
    return recipe_from_dict(table, where)


def _demo_recipe_text() -> str:
    """``recipes/demo.toml``: from the source tree (checkouts, editable installs) or the wheel."""
    text = _builtin_recipe_text("demo")
    assert text is not None, "the demo recipe ships with sicot"
    return text


def _recipes_folder() -> Any:  # noqa: ANN401 - a Path, or importlib.resources' Traversable inside a wheel
    """Where the shipped recipes are: ``recipes/`` of the source tree (checkouts, editable installs),
    else the wheel's ``sicot_cli.recipes``."""
    source = Path(__file__).resolve().parent.parent / "recipes"
    if source.is_dir():
        return source
    from importlib.resources import files

    return files("sicot_cli.recipes")


def builtin_recipes() -> list[str]:
    """The names of the shipped recipes."""
    return sorted(f.name[:-5] for f in _recipes_folder().iterdir() if f.name.endswith(".toml"))


def _builtin_recipe_text(name: str) -> str | None:
    """A shipped recipe's text by name (``emoji-zh`` or ``emoji-zh.toml``), None when there is none."""
    stem = name[:-5] if name.endswith(".toml") else name
    if stem not in builtin_recipes():
        return None
    return _recipes_folder().joinpath(f"{stem}.toml").read_text(encoding="utf-8")


def _no_recipe() -> str:
    return f"recipe not found (a .toml file, or a built-in recipe by name: {', '.join(builtin_recipes())})"


def override_key(item: str) -> str | None:
    """The dotted key of one ``section.key=value`` override (None: no ``=``, not an override)."""
    return item.split("=", 1)[0].strip() if "=" in item else None


def _override_keys(overrides: list[str] | None) -> set[str]:
    return {k for k in map(override_key, overrides or []) if k is not None}


def parse_override_value(raw: str) -> Any:
    """Parse the right side of ``key=value`` as a TOML value, or as a bare string."""
    try:
        doc = tomllib.loads(f"v = {raw}")
    except (tomllib.TOMLDecodeError, RecursionError):
        return raw
    if list(doc) != ["v"]:  # "1\ntrain.lr=0.5": a second key after a line break, which was dropped
        raise SicotError(
            f"{raw!r} is more than one value (a line break inside the argument?): give each key=value as an "
            "argument of its own"
        )
    return doc["v"]


def apply_overrides(table: dict[str, Any], overrides: list[str], where: str) -> Recipe:
    """A recipe from plain data (e.g. a run's saved recipe) with ``section.key=value`` overrides applied."""
    import copy

    table = copy.deepcopy(table)
    for item in overrides:
        _apply_override(table, item, where)
    return recipe_from_dict(table, where)


def _apply_override(table: dict[str, Any], item: str, where: str = "the recipe", typed: str | None = None) -> None:
    """Set one ``section.key=value`` in ``table``; ``typed`` is the option it came from, for its errors."""
    if "=" not in item:
        raise SicotError(f"override {item!r}: expected section.key=value (e.g. train.lr=0.05)")
    key, raw = item.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if not all(parts):
        raise SicotError(f"override {item!r}: bad key {key!r}")
    # Check the path against the schema so a typo is reported as an unknown override key.
    cls: Any = Recipe
    for i, part in enumerate(parts):
        if typing.get_origin(cls) is dict:  # one key of a free table (model.encoder_options)
            if i < len(parts) - 1:
                table_key = ".".join(parts[:i])
                raise SicotError(
                    f"unknown override key {key!r}: {table_key} holds plain values; set one as {table_key}.KEY=VALUE"
                )
            cls = Any
            break
        if not dataclasses.is_dataclass(cls):
            raise SicotError(f"unknown override key {key!r}: {'.'.join(parts[:i])} is not a table")
        names = {f.name for f in dataclasses.fields(cls)}
        if part not in names:
            raise SicotError(
                f"unknown override key {key!r} (known under {'.'.join(parts[:i]) or 'the top'}: "
                f"{', '.join(sorted(names))})"
            )
        cls = typing.get_type_hints(cls, include_extras=True)[part]
    if dataclasses.is_dataclass(cls):  # `train={}` would replace the whole table (and drop other overrides)
        first = dataclasses.fields(cls)[0].name
        raise SicotError(
            f"override {item!r}: {key} is a table; override its keys one at a time (e.g. {key}.{first}=...)"
        )
    node = table
    for i, part in enumerate(parts[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):  # the recipe's fault, not the override's
            section = ".".join(parts[: i + 1])
            raise SicotError(f"{where}: [{section}] must be a table, got {_shown(node)}")
    try:
        value = parse_override_value(raw.strip())
    except SicotError as e:
        raise SicotError(f"override {item!r}: {e}") from None
    if cls is str and not isinstance(value, str):  # a file named 5, a run named 2024: what the shell user typed
        value = raw.strip()
    _check_value(value, cls, key, typed or f"override {item!r}")  # its own error, not the recipe file's
    node[parts[-1]] = value


def _cotraining_rules(recipe: Recipe) -> list[tuple[bool, str]]:
    """:func:`validate`'s rules on the co-training switches (distillation, the mixed step); a baseline breaks none."""
    tr = recipe.train
    if recipe.model.encoder == "none":
        return []
    return [
        (
            tr.distill == 0 or (tr.class_sample_rate == 1 and tr.classifier_dtype == "float32"),
            "train.distill needs every class's scores in the step: set train.class_sample_rate = 1 and "
            'train.classifier_dtype = "float32", or train.distill = 0',
        ),
        (
            tr.mixed_step == "sum" or not tr.normalize_loss,
            "train.mixed_step = \"orthogonal\" keeps the baseline's step along CE(x_v)'s gradient by itself, and "
            "train.normalize_loss would halve it: set train.normalize_loss = false with it",
        ),
        (
            tr.mixed_step == "sum" or (tr.class_sample_rate == 1 and tr.distill == 0),
            'train.mixed_step = "orthogonal" needs the whole classifier in one step and no other loss term: set '
            'train.class_sample_rate = 1 and train.distill = 0, or train.mixed_step = "sum"',
        ),
        (
            tr.distill == 0 or tr.lam > 0,
            "train.distill distils x_m's scores, which train.lam = 0 never trains: set train.lam > 0, or train.distill = 0",
        ),
    ]


def validate(recipe: Recipe, where: str) -> None:
    """What an annotation cannot say: rules that tie fields together, and a few patterns (the run
    name, the device, the preset). Each field's own type, range and choices are checked where it
    is declared, by its annotation."""
    d, t, e, tr = recipe.data, recipe.text, recipe.eval, recipe.train
    checks: list[tuple[bool, str]] = [
        (
            bool(recipe.name) and not set(recipe.name) & set("/\\") and recipe.name.isprintable(),
            f"name must be a non-empty file-name part (no / \\ or control characters), got {recipe.name!r}",
        ),
        (recipe.preset in PRESETS, f"preset must be one of {', '.join(sorted(PRESETS))}, got {recipe.preset!r}"),
        (
            d.source != "manifest" or bool(d.manifest),
            "data.manifest must name a CSV/JSONL file when data.source = 'manifest'",
        ),
        (
            d.source == "manifest" or not d.manifest,
            f"data.manifest is set ({d.manifest!r}) but data.source is {d.source!r}, which would ignore it: "
            'set data.source = "manifest" (or use --manifest FILE), or data.manifest = ""',
        ),
        (
            d.synthetic.min_per_class <= d.synthetic.max_per_class,
            "data.synthetic.min_per_class must be >= 1 and <= data.synthetic.max_per_class",
        ),
        (
            d.synthetic.pretrain_classes <= 3200 - d.synthetic.num_classes,
            f"data.synthetic.pretrain_classes must be between 0 and 3200 - data.synthetic.num_classes "
            f"(the attribute combinations the long-tailed set leaves free), got {d.synthetic.pretrain_classes}",
        ),
        (
            t.drop_most_frequent + t.drop_least_frequent < 1,
            "text.drop_most_frequent + text.drop_least_frequent must be < 1",
        ),
        (e.few_threshold <= e.many_threshold, "eval.few_threshold must be <= eval.many_threshold"),
        (
            tr.keep_best or e.select == "last",
            'train.keep_best = false needs eval.select = "last" (best is scored from checkpoint-best.pt)',
        ),
        (
            tr.classifier_dtype == "float32" or tr.class_sample_rate < 1,
            'train.classifier_dtype = "bfloat16" needs train.class_sample_rate < 1 (e.g. 0.1): at rate 1 every '
            "step holds fp32 copies and gradients of all rows, a higher peak than fp32 storage",
        ),
        (
            len(tr.crop_scale) == 2 and 0 < tr.crop_scale[0] <= tr.crop_scale[1] <= 1,
            f"train.crop_scale must be [min, max] with 0 < min <= max <= 1, got {tr.crop_scale}",
        ),
        (bool(tr.topk) and all(k >= 1 for k in tr.topk), f"train.topk must list k >= 1, got {tr.topk}"),
        (len(set(tr.topk)) == len(tr.topk), f"train.topk lists a k twice, got {tr.topk}: each k once"),
        (
            1 in tr.topk,
            f"train.topk must include 1 (top-1 is always reported, and checkpoint-best is chosen on it), got "
            f"{tr.topk}: e.g. train.topk = [1, {max(tr.topk or [1])}]",
        ),
        *_cotraining_rules(recipe),
        (
            not (recipe.data.val_fold and recipe.data.val_fraction == 0),
            f"data.val_fold = {recipe.data.val_fold} re-draws the validation rows, and data.val_fraction = 0 carves "
            "none: set data.val_fraction > 0, or leave data.val_fold at 0",
        ),
        (
            bool(e.logit_adjust_taus) and all(0 <= x <= 10 for x in e.logit_adjust_taus),
            f"eval.logit_adjust_taus must list values between 0 and 10, got {e.logit_adjust_taus}",
        ),
        (
            bool(recipe.decouple.taus) and all(0 <= x <= 10 for x in recipe.decouple.taus),
            f"decouple.taus must list values between 0 and 10, got {recipe.decouple.taus}",
        ),
        (
            tr.device in ("auto", "cpu") or tr.device.startswith("cuda"),
            f"train.device must be auto, cpu or cuda[:N], got {tr.device!r}",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise SicotError(f"{where}: {message}")
