"""The long-tail methods by name: what ``sicot ablate --methods`` trains, and how a run is labelled.

A method is a set of recipe keys for training (a loss, a sampler) and optionally a second stage
(``sicot decouple``) on the run those keys trained; ``a+b`` combines them (``balanced-softmax+crt``).
Every method combines with every encoder: ``--methods ce,la-loss --encoders bilinear`` trains the
baseline (CE, no encoder), SICoT (CE, bilinear), the logit-adjusted loss alone and SICoT with it.

A run's label is computed from its recorded recipe, never from its directory name, so a run made
by hand (``sicot train train.loss=ldam train.reweight=drw``) is reported under the same name.
"""

from __future__ import annotations

import re
from typing import Any

from sicot_cli.errors import SicotError

CE = "ce"
_FIXED_TAU = re.compile(r"([a-z-]+)\(tau=([0-9]+(?:\.[0-9]+)?)\)")
# Training methods: the recipe keys each sets.
TRAINING: dict[str, dict[str, Any]] = {
    "cb-sampler": {"train.sampler": "class_balanced"},
    "sqrt-sampler": {"train.sampler": "sqrt"},
    "progressive-sampler": {"train.sampler": "progressive"},
    "la-loss": {"train.loss": "logit_adjusted"},
    "balanced-softmax": {"train.loss": "balanced_softmax"},
    "ldam-drw": {"train.loss": "ldam", "train.reweight": "drw"},
    "drw": {"train.reweight": "drw"},
}
# The keys a method sets: with --methods they are the method's, never the recipe's.
METHOD_KEYS = {"train.loss", "train.sampler", "train.reweight", "eval.logit_adjust"}
# Second stages (sicot decouple) by method name -> decouple.method.
STAGES: dict[str, str] = {"crt": "crt", "lws": "lws", "tau-norm": "tau_norm", "posthoc-la": "logit_adjust"}
KNOWN = (CE, *TRAINING, *STAGES)


def parse(method: str) -> tuple[dict[str, Any], str | None]:
    """A method name -> (training overrides, second stage's ``decouple.method`` or None).

    Raises:
        SicotError: an unknown part, two stages, or two parts setting one key.
    """
    overrides: dict[str, Any] = {}
    stage = None
    for part in method.split("+"):
        part = part.strip()
        if part == CE:
            continue
        fixed = _FIXED_TAU.fullmatch(part)  # tau-norm(tau=1): one tau, no choice to make
        if fixed and fixed[1] in ("tau-norm", "posthoc-la"):
            part = fixed[1]
            overrides["decouple.taus"] = [float(fixed[2])]
        if part in STAGES:
            if stage is not None:
                raise SicotError(f"--methods {method!r}: at most one second stage ({', '.join(STAGES)})")
            stage = STAGES[part]
        elif part in TRAINING:
            clash = set(overrides) & set(TRAINING[part])
            if clash:
                raise SicotError(f"--methods {method!r}: two parts set {sorted(clash)[0]}")
            overrides |= TRAINING[part]
        else:
            raise SicotError(f"--methods: unknown method {part!r} (known: {', '.join(KNOWN)}; combine with +)")
    return overrides, stage


def describe(recipe: dict[str, Any], stage: str | None = None) -> str:
    """The method a recorded recipe trained (``ce`` when none), e.g. ``ldam-drw+cb-sampler+crt``."""
    train = recipe.get("train", {})
    loss, drw = train.get("loss", "ce"), train.get("reweight", "none") == "drw"
    parts = []
    if loss == "logit_adjusted":
        tau = float(train.get("loss_tau", 1.0))
        parts.append("la-loss" if tau == 1.0 else f"la-loss(tau={_number(tau)})")
    elif loss == "balanced_softmax":
        parts.append("balanced-softmax")
    elif loss == "ldam":
        parts.append("ldam-drw" if drw else "ldam")
    if drw and loss != "ldam":
        parts.append("drw")
    sampler = train.get("sampler", "instance")
    if sampler != "instance":
        parts.append({"class_balanced": "cb-sampler", "sqrt": "sqrt-sampler"}.get(sampler, f"{sampler}-sampler"))
    if stage is None and recipe.get("eval", {}).get("logit_adjust", "off") == "val":
        parts.append("posthoc-la")  # the same adjustment as the second stage, made at the end of training
    if stage is not None:
        name = {v: k for k, v in STAGES.items()}.get(stage, stage)
        taus = recipe.get("decouple", {}).get("taus", [])
        if stage in ("tau_norm", "logit_adjust") and len(taus) == 1:  # a fixed tau, not chosen
            name += f"(tau={_number(taus[0])})"
        parts.append(name)
    return "+".join(parts) or CE


def _number(x: float) -> str:
    """``1`` for 1.0, ``0.25``, and every digit when ``:g`` would round (two taus never share a name)."""
    short = f"{float(x):g}"
    return short if float(short) == float(x) else repr(float(x))


def canonical(method: str) -> str:
    """The name :func:`describe` gives the runs of ``method`` (``cb-sampler+la-loss`` -> ``la-loss+cb-sampler``)."""
    overrides, stage = parse(method)
    if "decouple.taus" in overrides and float(overrides["decouple.taus"][0]) > 10:
        raise SicotError(f"--methods {method!r}: tau must be between 0 and 10")
    table: dict[str, dict[str, Any]] = {}
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        table.setdefault(section, {})[key] = value
    return describe(table, stage)


def method_of(config: dict[str, Any]) -> str:
    """The long-tail method of a run's ``config.json`` (``ce`` for the paper's training)."""
    return describe(config.get("recipe", {}), (config.get("stage") or {}).get("method"))


def label(config: dict[str, Any], preset_suffix: str = "") -> str:
    """A run's row in the report: ``none`` (the baseline: CE, no encoder), a method, an encoder, or ``encoder+method``."""
    encoder = config["encoder"]
    method = method_of(config)
    name = encoder + preset_suffix
    if method == CE:
        return name
    return method if encoder == "none" else f"{name}+{method}"


def needs_titles(config: dict[str, Any]) -> bool:
    """Did the run (or the first run of a second stage) train with titles?"""
    return config["encoder"] != "none"
