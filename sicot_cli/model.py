"""The SICoT model (§3.3): visual stream, semantic stream, max fusion and ONE shared classifier.

- visual stream: any torchvision classification backbone with its head replaced by the identity,
  giving ``x_v`` (2048-d for ResNet-50, 512-d for ResNet-18);
- semantic stream: a registered text encoder (``encoders/``) whose output has ``x_v``'s size;
- mixed feature: ``x_m = max(x_v, s)`` elementwise ("a max-pooling operation over the visual
  features and the semantic embeddings");
- one linear classifier scores both ``x_v`` and ``x_m`` (in one GEMM over their concatenation,
  :func:`score_cat`); the loss is Eq. 1, ``CE(W x_v) + lambda * CE(W x_m)``.

Three switches sit around Eq. 1 (docs/presets.md says which preset sets what, and
docs/demo-pretraining.md what each was measured to do; measured numbers live there, not here):

- ``model.semantic_norm``: x_v comes out of BatchNorm + ReLU + average pooling while a freshly
  projected title embedding is far smaller, so in the literal max x_v nearly always wins and the
  mixed loss becomes a second visual gradient. ``"batchnorm"`` puts the embedding on x_v's scale
  so that it competes in the max; ``"none"`` is the paper's literal form.
- ``model.mixed_trains_classifier``: with the paper's Eq. 1 the shared classifier is also fit on
  x_m, whose title-derived dimensions exist only in training. ``false`` lets CE(x_m) train both
  streams while the classifier is fit by CE(x_v) alone, i.e. to what it sees at inference.
- ``train.normalize_loss`` (applied in :func:`combine_losses`): x_m is close to x_v, so Eq. 1's
  gradient on the visual stream and the classifier is about (1 + lambda) times the baseline's;
  dividing by (1 + lambda) compares the two at the same step size.

The baseline is the same module with no encoder: identical visual stream, classifier and
initialisation (the backbone and classifier are created before the encoder, so a seed gives both
the same starting weights). At inference only images are used (:meth:`SICoT.logits`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from sicot_cli.distributed import linear_in
from sicot_cli.errors import SicotError
from sicot_cli.losses import Criterion

if TYPE_CHECKING:
    from sicot_cli.config import Recipe
    from sicot_cli.data.dataset import Prepared

log = logging.getLogger(__name__)

# ImageNet statistics: the normalisation pretrained torchvision backbones expect.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _strip_head(net: nn.Module, backbone: str) -> tuple[nn.Module, int]:
    """Replace the classification head by the identity; return the net and its feature size."""
    for attr in ("fc", "classifier", "head", "heads"):
        head = getattr(net, attr, None)
        if isinstance(head, nn.Linear):
            setattr(net, attr, nn.Identity())
            return net, head.in_features
        if isinstance(head, nn.Sequential):
            # MobileNet/EfficientNet/ViT: keep dropout/activation layers, drop the last Linear
            layers = list(head.children())
            linear = [i for i, m in enumerate(layers) if isinstance(m, nn.Linear)]
            if linear:
                dim = layers[linear[-1]].in_features
                layers[linear[-1]] = nn.Identity()
                setattr(net, attr, nn.Sequential(*layers))
                return net, dim
    raise SicotError(f"model.backbone {backbone!r}: no classification head found to replace")


def pretrained_path(backbone: str) -> tuple[Path, str]:
    """Where torchvision's default ImageNet weights for ``backbone`` live in the torch hub cache."""
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(backbone).DEFAULT
    except (ValueError, KeyError):
        raise SicotError(f"model.backbone {backbone!r} has no published ImageNet weights in torchvision") from None
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    return hub / Path(weights.url).name, weights.url


def _sicot_visual_state(path: Path, backbone: str) -> dict[str, torch.Tensor]:
    """The visual stream's weights of a sicot run directory or checkpoint file (classifier and text stream left out)."""
    from sicot_cli import runs

    run_dir = path if path.is_dir() else path.parent
    if path.is_dir():
        if not runs.is_run(path):
            raise SicotError(f"model.pretrained: {path} is a folder but not a sicot run directory (no {runs.CONFIG})")
        if not runs.is_finished(path):
            raise SicotError(
                f"model.pretrained: run {path} has not finished (no {runs.SUMMARY}): finish it with `sicot train --resume --run-dir {path}`, or name one of its checkpoint files"
            )
        path = path / runs.LAST
    state = runs.load_checkpoint(path)
    if runs.is_run(run_dir):
        theirs = runs.read_config(run_dir).get("recipe", {}).get("model", {}).get("backbone")
        if theirs and theirs != backbone:
            raise SicotError(
                f'model.pretrained: {path} holds a {theirs} visual stream, model.backbone is {backbone}: set model.backbone = "{theirs}" or pretrain a {backbone}'
            )
    visual = {k.removeprefix("visual."): v for k, v in state["model"].items() if k.startswith("visual.")}
    if not visual:
        raise SicotError(f"model.pretrained: {path} holds no visual stream weights")
    return visual


def _starts_with(path: Path, prefix: bytes) -> bool:
    try:
        from sicot_cli.fsutil import open_regular

        with open_regular(path) as f:
            return f.read(len(prefix)) == prefix
    except OSError as e:
        raise SicotError(f"model.pretrained: cannot read {path} ({e.strerror})") from None


def load_pretrained(net: nn.Module, backbone: str, pretrained: str) -> None:
    """Load pretrained weights into a torchvision backbone, never downloading.

    ``pretrained`` is ``"imagenet"`` (torchvision's weights from the torch hub cache), a state_dict
    file, or a sicot run directory / checkpoint file, whose visual stream is used (fine-tuning from
    an earlier run, e.g. ``recipes/demo-pretrain.toml``); its classifier and text stream are not.

    Raises:
        SicotError: the file is absent or does not fit the backbone.
    """
    from sicot_cli import runs

    if pretrained == "imagenet":
        path, url = pretrained_path(backbone)
        if not path.is_file():
            raise SicotError(
                f"ImageNet weights for {backbone} not found at {path}; sicot never downloads at run time: "
                f"fetch {url} into that folder on a machine with internet, or set model.pretrained to a local file"
            )
    else:
        path = Path(pretrained)
        if not path.exists():
            where = "" if path.is_absolute() else f", looked for at {path.absolute()}: relative to the working folder"
            raise SicotError(
                f'model.pretrained: {path} not found{where} (a state_dict file, a sicot run directory, or "imagenet")'
            )
    if path.is_dir() or _starts_with(path, runs.MAGIC):
        state = _sicot_visual_state(path, backbone)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types for corrupt files
            raise SicotError(f"model.pretrained: {path} is not a loadable state_dict ({type(e).__name__})") from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise SicotError(f"model.pretrained: {path} is not a state_dict (a dict of tensors)")
    own = net.state_dict()
    usable = {k: v for k, v in state.items() if k in own and isinstance(v, torch.Tensor) and own[k].shape == v.shape}
    if not usable:
        raise SicotError(f"model.pretrained: {path} has no weights that fit {backbone}")
    missing = [k for k in own if k not in usable]
    net.load_state_dict(usable, strict=False)
    log.info("loaded %d pretrained tensors from %s (%d left at init)", len(usable), path, len(missing))


def build_backbone(name: str, pretrained: str = "") -> tuple[nn.Module, int]:
    """A torchvision classification backbone without its head, and its feature size."""
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise SicotError(f"model.backbone {name!r} is not a torchvision classification model (e.g. resnet18, resnet50)")
    net = torchvision.models.get_model(name, weights=None)
    if pretrained:
        load_pretrained(net, name, pretrained)
    return _strip_head(net, name)


class SharedLinear(nn.Linear):
    """The shared classifier: ``nn.Linear`` whose stored weights may be bf16 (``train.classifier_dtype``).

    It scores in the input's dtype (fp32 at evaluation; the cast is a no-op for an fp32 classifier),
    so a bf16-stored classifier evaluates like any other. Same parameters and state-dict keys as
    ``nn.Linear``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_in(x, self.weight, self.bias)


class SICoT(nn.Module):
    """Visual stream + optional semantic stream + one shared classifier."""

    def __init__(
        self,
        backbone: nn.Module,
        feat_dim: int,
        num_classes: int,
        encoder: nn.Module | None = None,
        semantic_norm: str = "none",
        shard: tuple[int, int] | None = None,
        mixed_trains_classifier: bool = True,
    ) -> None:
        super().__init__()
        self.visual = backbone
        self.feat_dim = feat_dim
        self.num_classes = num_classes
        # Does CE(x_m) also train the shared classifier (the paper: yes)? See score_cat.
        self.mixed_trains_classifier = mixed_trains_classifier
        if shard is None:
            self.classifier: nn.Module = SharedLinear(feat_dim, num_classes)
        else:  # this rank's classes of the shared classifier (sicot_cli.distributed)
            from sicot_cli.distributed import ShardedLinear

            self.classifier = ShardedLinear(feat_dim, num_classes, *shard)
        self.encoder: nn.Module | None = None
        self.semantic_norm: nn.Module | None = None
        if encoder is not None:
            self.attach_encoder(encoder, semantic_norm)
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1) * 255.0, persistent=False)

    def attach_encoder(self, encoder: nn.Module, semantic_norm: str = "none") -> None:
        """The semantic stream: ``encoder``, its output batch-normalised when ``semantic_norm = "batchnorm"``
        (the title embedding on x_v's scale, docs/presets.md) or used as it is (``"none"``, the paper)."""
        self.encoder = encoder
        self.semantic_norm = nn.BatchNorm1d(self.feat_dim) if semantic_norm == "batchnorm" else None

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 or float images in [0, 255] -> normalised float."""
        return (images.float() - self.mean) / self.std

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """x_v for normalised images."""
        return self.visual(images)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Image-only scores (inference): the classifier on x_v."""
        return self.classifier(self.features(images))

    def streams(
        self, images: torch.Tensor, tokens: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x_v and, when there is an encoder and a title, x_m = max(x_v, s)."""
        x_v = self.features(images)
        if self.encoder is None or tokens is None:
            return x_v, None
        s = self.encoder(tokens, mask)
        if self.semantic_norm is not None:
            s = self.semantic_norm(s.float())
        return x_v, torch.maximum(x_v, s.to(x_v.dtype))

    def forward(
        self, images: torch.Tensor, tokens: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scores of x_v and, when there is an encoder and a title, of x_m = max(x_v, s)."""
        x_v, x_m = self.streams(images, tokens, mask)
        if x_m is None:
            return self.classifier(x_v), None
        return score_both(x_v, x_m, self.classifier.weight, self.classifier.bias, self.mixed_trains_classifier)


def score_cat(
    x_v: torch.Tensor,
    x_m: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
    mixed_trains_classifier: bool = True,
) -> torch.Tensor:
    """Eq. 1's two scorings by the one shared classifier in ONE matrix product: ``[x_v; x_m] W^T + b``.

    Same arithmetic as scoring x_v and x_m apart, but one forward GEMM, one weight-gradient GEMM
    (the sum over both streams' rows happens inside it) and one input-gradient GEMM, instead of two
    of each plus the addition of two full-size weight gradients: at many classes the classifier is
    most of the step (docs/benchmarks.md). Returns ``[2B, classes]`` (``[B, classes]`` when x_m is
    None). With ``mixed_trains_classifier`` off the x_m scores must not train the weights, so they
    are a second product with detached weights.
    """
    if weight.dtype != x_v.dtype and weight.dtype == torch.bfloat16:  # a bf16-stored classifier, scored in x's dtype
        weight, bias = weight.to(x_v.dtype), bias.to(x_v.dtype)
    if x_m is None:
        return F.linear(x_v, weight, bias)
    if not mixed_trains_classifier:
        return torch.cat([F.linear(x_v, weight, bias), F.linear(x_m, weight.detach(), bias.detach())])
    return F.linear(torch.cat([x_v, x_m]), weight, bias)


def score_both(
    x_v: torch.Tensor, x_m: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, mixed_trains_classifier: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`score_cat` split into the scores of x_v and of x_m (views of one tensor)."""
    logits_v, logits_m = score_cat(x_v, x_m, weight, bias, mixed_trains_classifier).split(x_v.shape[0])
    return logits_v, logits_m


class Streams(nn.Module):
    """The visual and text streams of a :class:`SICoT` without its classifier.

    What ``DistributedDataParallel`` wraps when the classifier is sharded by class: the streams are
    replicated (gradients averaged), the classifier shard is each rank's own.
    """

    def __init__(self, model: SICoT) -> None:
        super().__init__()
        self.visual = model.visual
        self.encoder = model.encoder
        self.semantic_norm = model.semantic_norm
        self._streams = model.streams  # a bound method: the modules above are the same objects

    def forward(
        self, images: torch.Tensor, tokens: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self._streams(images, tokens, mask)


def combine_losses(
    loss_v: torch.Tensor, loss_m: torch.Tensor | None, lam: float, normalize: bool = False
) -> torch.Tensor:
    """Eq. 1 from its two terms: CE(x_v) + lambda * CE(x_m), divided by (1 + lambda) if ``normalize``."""
    if loss_m is None:
        return loss_v
    total = loss_v + lam * loss_m
    return total / (1.0 + lam) if normalize else total


def sicot_loss(
    logits_v: torch.Tensor,
    logits_m: torch.Tensor | None,
    labels: torch.Tensor,
    lam: float,
    normalize: bool = False,
    criterion: Criterion | None = None,
    distill: float = 0.0,
    temperature: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Eq. 1: CE(x_v) + lambda * CE(x_m) (over 1 + lambda if ``normalize``); returns (total, CE_v, CE_m).

    ``criterion`` replaces the cross-entropy of BOTH terms by a long-tail loss (sicot_cli.losses).
    ``distill`` > 0 adds ``distill * `` :func:`distill_loss` (``train.distill``), outside the
    normalisation.
    """
    ce = criterion or Criterion()  # plain cross-entropy
    loss_v = ce(logits_v, labels)
    loss_m = None if logits_m is None else ce(logits_m, labels)
    total = combine_losses(loss_v, loss_m, lam, normalize)
    if distill and logits_m is not None:
        total = total + distill * distill_loss(logits_v, logits_m, temperature)
    return total, loss_v, loss_m


def orthogonal_backward(model: SICoT, loss_v: torch.Tensor, loss_m: torch.Tensor, lam: float) -> None:
    """Eq. 1's gradients with CE(x_m)'s part along CE(x_v)'s removed (``train.mixed_step = "orthogonal"``).

    Sets ``.grad`` of every trainable parameter. On the parameters both losses reach (the visual
    stream and the shared classifier) the gradient is ``g_v + lam * (g_m - (<g_m, g_v> / |g_v|^2) g_v)``,
    one projection over all of them flattened together; on the text stream it is ``lam * g_m``. So
    the step along CE(x_v)'s gradient is exactly the baseline's, and CE(x_m) adds only what it does
    not share with it: measured, CE(x_m)'s gradient on the visual stream points nearly where CE(x_v)'s
    does (cosine about 0.8), and Eq. 1's sum, or the sum over (1 + lambda), changes the size of the
    image step instead (docs/demo-pretraining.md). Two backward passes instead of one.
    """
    shared = [p for m in (model.visual, model.classifier) for p in m.parameters() if p.requires_grad]
    seen = {id(p) for p in shared}
    text = [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
    g_v = torch.autograd.grad(loss_v, shared, retain_graph=True, allow_unused=True)
    g_m = torch.autograd.grad(loss_m, shared + text, allow_unused=True)
    g_v = [torch.zeros_like(p) if g is None else g for p, g in zip(shared, g_v, strict=True)]
    g_ms = [torch.zeros_like(p) if g is None else g for p, g in zip(shared, g_m[: len(shared)], strict=True)]
    dot = sum((a.float() * b.float()).sum() for a, b in zip(g_v, g_ms, strict=True))
    norm2 = sum(a.float().pow(2).sum() for a in g_v)
    coef = dot / norm2 if float(norm2) > 0 else torch.zeros(())
    for p, a, b in zip(shared, g_v, g_ms, strict=True):
        p.grad = (a + lam * (b - coef.to(a.dtype) * a)).to(p.dtype)
    for p, b in zip(text, g_m[len(shared) :], strict=True):
        p.grad = None if b is None else (lam * b).to(p.dtype)


def distill_loss(logits_v: torch.Tensor, logits_m: torch.Tensor, temperature: float) -> torch.Tensor:
    """The title-aware scores as a teacher of the image-only ones (``train.distill``).

    ``T^2 * KL(softmax(z_m / T) || softmax(z_v / T))``, batch mean, with z_m detached: the titles
    are privileged information that exists only in training (generalised distillation, Lopez-Paz
    et al., ICLR 2016), so the image path learns from the mixed path's soft scores and never the
    other way round. T^2 keeps the gradient's size independent of T (Hinton et al., 2015).
    """
    t = float(temperature)
    teacher = F.log_softmax(logits_m.detach().float() / t, dim=1)
    student = F.log_softmax(logits_v.float() / t, dim=1)
    return F.kl_div(student, teacher, reduction="batchmean", log_target=True) * (t * t)


def build_model(
    backbone: str,
    num_classes: int,
    encoder: str,
    vectors: torch.Tensor,
    pretrained: str = "",
    encoder_options: dict | None = None,
    freeze_embeddings: bool = False,
    semantic_norm: str = "none",
    shard: tuple[int, int] | None = None,
    mixed_trains_classifier: bool = True,
) -> SICoT:
    """The SICoT model (``encoder="none"``: the baseline).

    The backbone and the classifier are built first, so the same torch seed gives the baseline and
    every co-training variant the same visual stream and classifier weights. ``shard=(lo, hi)``
    keeps only those classes of the classifier (initialised as those rows of the full one).
    """
    net, dim = build_backbone(backbone, pretrained)
    model = SICoT(net, dim, num_classes, shard=shard, mixed_trains_classifier=mixed_trains_classifier)
    if encoder != "none":
        from encoders import create_encoder

        # fork_rng: the encoder's initialisation must not shift the random stream that the
        # training (dropout in some backbones) draws from, or baseline and co-training would differ.
        with torch.random.fork_rng(devices=[]):
            options = encoder_options or {}
            check_not_set_by_sicot(options)
            text = create_encoder(encoder, vectors=vectors, out_dim=dim, freeze_embeddings=freeze_embeddings, **options)
            model.attach_encoder(text, semantic_norm)
    return model


def diverged(model: nn.Module) -> bool:
    """True when a weight is no longer finite (checked with the loss, at the same device syncs).

    The loss of a step is computed before its update, so a step that blows the weights up (an
    inf or huge learning rate) shows a finite loss; only the weights tell, and without this a
    one-epoch run would be evaluated and marked finished with NaN weights.
    """
    params = [p.detach() for p in model.parameters()]
    return bool(params) and not bool(torch.isfinite(torch.nn.utils.get_total_norm(params)))


def first_nonfinite(named: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first floating tensor holding NaN or inf (by its norm: one pass, no mask of
    its size, which for a million-class classifier would be gigabytes), or None."""
    return next(
        (k for k, v in named if v.is_floating_point() and not bool(torch.isfinite(torch.linalg.vector_norm(v)))),
        None,
    )


def check_not_set_by_sicot(options: dict) -> None:
    """Refuse ``model.encoder_options`` that sicot sets for every encoder itself."""
    from encoders.registry import SET_BY_SICOT

    for key in SET_BY_SICOT:
        if key in options:
            raise SicotError(
                f"model.encoder_options.{key}: set by sicot for every encoder (the prepared word vectors, "
                "the visual stream's width, model.freeze_embeddings), not an option; remove it"
            )


def check_encoder_options(recipe: Recipe, encoders: list[str], where: str | Path | None) -> None:
    """Build each text encoder with the recipe's ``model.encoder_options`` on tiny word vectors: an
    unknown, missing or bad option is refused before any run trains (an ablation's baseline too),
    naming the recipe file it came from. Unknown encoder names are left to the command's own check.

    Raises:
        SicotError: ``FILE: model.encoder_options: what is wrong``.
    """
    from encoders.registry import check_options, create_encoder, is_builtin, list_encoders

    options = recipe.model.encoder_options
    prefix = f"{where}: " if where else ""
    try:
        check_not_set_by_sicot(options)
        for name in dict.fromkeys(e for e in encoders if e != "none" and e in list_encoders()):
            check_options(name, vectors=None, out_dim=8, freeze_embeddings=False, **options)
            if not is_builtin(name):
                continue  # an encoder of one's own may need real sizes (heads dividing the width) or be costly to build
            with torch.random.fork_rng(devices=[]):  # sicot's own: their option values are checked on tiny sizes
                create_encoder(name, vectors=torch.zeros(3, 4), out_dim=8, freeze_embeddings=False, **options)
    except SicotError as e:
        text = str(e)
        raise SicotError(prefix + (text if text.startswith("model.") else f"model.encoder_options: {text}")) from None


class ImageOnly(nn.Module):
    """The deployable model: uint8 images [B, 3, S, S] -> class probabilities (no sicot needed)."""

    def __init__(self, model: SICoT) -> None:
        super().__init__()
        self.visual = model.visual
        self.classifier = model.classifier
        self.register_buffer("mean", model.mean.clone())
        self.register_buffer("std", model.std.clone())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() - self.mean) / self.std
        return torch.softmax(self.classifier(self.visual(x)), dim=1)


def make_model(recipe: Recipe, prepared: Prepared, shard: tuple[int, int] | None = None) -> SICoT:
    """The run's model, initialised from the recipe's seed (the same for every encoder).

    ``shard``: keep only these classes of the shared classifier (class-parallel training).
    """
    torch.manual_seed(recipe.train.seed)
    return build_model(
        recipe.model.backbone,
        prepared.num_classes,
        recipe.model.encoder,
        torch.from_numpy(prepared.vectors),
        pretrained=recipe.model.pretrained,
        encoder_options=recipe.model.encoder_options,
        freeze_embeddings=recipe.model.freeze_embeddings,
        semantic_norm=recipe.model.semantic_norm,
        shard=shard,
        # lam = 0: CE(x_m) gives the classifier no gradient, so x_v is scored apart as the baseline
        # scores it (not inside the one GEMM over cat([x_v, x_m])) and the run steps as the baseline does.
        mixed_trains_classifier=recipe.model.mixed_trains_classifier and recipe.train.lam != 0,
    )
