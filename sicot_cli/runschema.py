"""What the files of a run directory must hold, checked when they are read (pydantic, strict).

``evaluate``, ``report``, ``predict``, ``export`` and ``train --resume`` read run directories that
may have been edited by hand, copied half-way or written by another version: each file is checked
against its schema here, and anything else than the expected shape is refused in ONE line naming
the file and the field (``runs/x/config.json: field dataset.classes: Input should be a valid
integer``), never a ``KeyError`` or a ``TypeError`` three modules later.

Extra keys are allowed (a newer sicot may record more); the keys the commands use are required
with their types. Metrics (``top1``, ``head_top3``, ``loss``...) must be numbers or null.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, StrictInt, StrictStr, ValidationError, field_validator, model_validator

from sicot_cli.errors import SicotError

# Keys of a metrics record or of summary.json's "final" that hold numbers: report averages them.
_METRIC = re.compile(
    r"(val_)?(top\d+|(head|tail|many|medium|few)_top\d+|loss(_[vm])?|lr|epoch|train_images|.*_per_s|epoch_seconds"
    r"|.*_classes|.*_threshold)"
)


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class Fingerprint(_Strict):
    classes: StrictInt
    vocab: StrictInt
    sha256: StrictStr


class ConfigFile(_Strict):
    """``config.json``: the resolved recipe (checked again by ``recipe_from_dict``), encoder, data."""

    recipe: dict[str, Any]
    encoder: StrictStr
    data: StrictStr
    dataset: Fingerprint
    stage: dict[str, Any] | None = None  # a second stage's origin (sicot decouple)


# Accuracies are percentages: 0 to 100, never NaN or infinite (a loss may be, when a run diverged).
_ACCURACY = re.compile(r"(val_)?((head|tail|many|medium|few)_)?top\d+")


# Keys whose values are counts: whole, finite and not negative (a class boundary of NaN or 1e400
# made report fail with a traceback converting it).
_COUNT = re.compile(r"(val_)?(.*_threshold|.*_classes|.*_images|n_test)")
# What a record says of how it was scored (report prints them).
_WORDS = {"split": ("test", "val"), "checkpoint": ("last", "best"), "selected_on": ("val", "test", "none")}


def _numbers(record: dict[str, Any]) -> dict[str, Any]:
    for key, value in record.items():
        if (
            _METRIC.fullmatch(key)
            and value is not None
            and (isinstance(value, bool) or not isinstance(value, int | float))
        ):
            raise ValueError(f"{key} must be a number or null, got {value!r}")
        if _ACCURACY.fullmatch(key) and isinstance(value, int | float) and not 0 <= value <= 100:
            raise ValueError(f"{key} must be an accuracy in % (0 to 100), got {value!r}")
        if _COUNT.fullmatch(key) and value is not None and not (type(value) is int and value >= 0):
            raise ValueError(f"{key} must be a whole number >= 0, got {value!r}")
        if key in _WORDS and value is not None and value not in _WORDS[key]:
            raise ValueError(f"{key} must be one of {', '.join(_WORDS[key])}, got {value!r}")
    return record


class MetricsRecord(_Strict):
    """One line of ``metrics.jsonl``."""

    epoch: StrictInt

    @model_validator(mode="after")
    def _metrics(self) -> MetricsRecord:
        _numbers(self.model_extra or {})
        return self


class SummaryFile(_Strict):
    """``summary.json``: the final record, the number of epochs and the per-class lists."""

    final: dict[str, Any]
    epochs: StrictInt

    @field_validator("final")
    @classmethod
    def _final(cls, v: dict[str, Any]) -> dict[str, Any]:
        return _numbers(v)

    @model_validator(mode="after")
    def _per_class(self) -> SummaryFile:
        for key, value in (self.model_extra or {}).items():
            if key.startswith("per_class_") and not (
                isinstance(value, list)
                and value
                and all(x is None or (isinstance(x, int | float) and not isinstance(x, bool)) for x in value)
            ):
                raise ValueError(f"{key} must be a list of numbers or nulls, one a class")
            if key.startswith("per_class_top") and any(x is not None and not 0 <= x <= 100 for x in value):
                raise ValueError(f"{key} must hold accuracies in % (0 to 100)")
        return self


_VALUE_ERROR = "Value error, "  # how pydantic prefixes a ValueError raised by a validator


def _message(path: Path, e: ValidationError) -> str:
    err = e.errors()[0]
    more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
    if not err["loc"] and err["msg"].startswith(_VALUE_ERROR):  # a check over the record's own keys: it names the key
        return f"{path}: {err['msg'].removeprefix(_VALUE_ERROR)}{more}"
    loc = ".".join(str(p) for p in err["loc"]) or "(the whole file)"
    return f"{path}: field {loc}: {err['msg']}{more}"


def check(model: type[BaseModel], data: Any, path: Path, where: str = "") -> BaseModel:
    """Validate ``data`` (parsed JSON) read from ``path`` against ``model``.

    Raises:
        SicotError: one line naming the file (and ``where``, e.g. a line number) and the field.
    """
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise SicotError(_message(Path(f"{path}{where}"), e) + ": a damaged or hand-edited run file") from None
