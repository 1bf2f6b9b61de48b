"""Checks run before a training job starts, so that a setting the model cannot take is refused in
one line instead of failing as a shape error deep inside the first forward pass.

The backbone check runs the torchvision model on PyTorch's ``meta`` device: shapes are propagated
and the same errors are raised as on a real input, but no weight is initialised and no arithmetic
is done (about 0.1 s even for a ResNet-50).
"""

from __future__ import annotations

import warnings
from pathlib import Path

from sicot_cli.config import Recipe
from sicot_cli.errors import SicotError

# Sizes tried to suggest one that works (the smallest that does is named in the message).
_SUGGEST = (16, 32, 64, 96, 128, 160, 224, 299, 384, 512)


def _accepts(backbone: str, size: int) -> tuple[bool, str]:
    import torch
    import torchvision

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's init-weights FutureWarnings
        net = torchvision.models.get_model(backbone, weights=None).eval()
        try:
            # batch 2: one image would trip BatchNorm-in-training checks we do not test here
            net(torch.zeros(2, 3, size, size))
        except (RuntimeError, ValueError, AssertionError, IndexError) as e:
            return False, str(e).splitlines()[0] if str(e) else type(e).__name__
    return True, ""


def check_image_size(backbone: str, image_size: int) -> None:
    """Refuse an image size the backbone cannot process (too small for its pooling, or a fixed-size ViT).

    Unknown backbone names are left to :func:`sicot_cli.model.build_backbone`, which lists them.

    Raises:
        SicotError: naming the backbone, the size, why, and the smallest common size it accepts.
    """
    import torchvision

    if backbone not in torchvision.models.list_models(module=torchvision.models):
        return
    ok, why = _accepts(backbone, image_size)
    if ok:
        return
    works = next((s for s in _SUGGEST if s > image_size and _accepts(backbone, s)[0]), None)
    hint = f"it accepts {works} px (prepare with data.image_size={works})" if works else "choose another model.backbone"
    raise SicotError(f"model.backbone {backbone!r} cannot take {image_size}x{image_size} images ({why}): {hint}")


def prepared_image_size(recipe: Recipe, data: str | Path | None) -> int:
    """The image size training will see: the prepared file's when it exists, else the recipe's."""
    path = Path(data) if data is not None else Path(recipe.data.out)
    if path.is_file():
        try:
            import h5py

            with h5py.File(path, "r") as f:
                return int(f.attrs["image_size"])
        except (OSError, KeyError, ValueError, TypeError):
            pass  # open_prepared reports a bad file properly when training opens it
    return recipe.data.image_size


def check_training(recipe: Recipe, data: str | Path | None = None) -> None:
    """Everything about the model that can be checked before training starts."""
    check_image_size(recipe.model.backbone, prepared_image_size(recipe, data))
