"""One registry of text encoders: a dict, a decorator and the look-ups (the timm pattern).

A factory function registered with ``@register_encoder`` is known by its own name. The built-in
encoders register through the explicit imports in ``encoders/__init__.py``; user encoders live in a
plug-in module (a ``.py`` file or a dotted module name) loaded with :func:`load_encoder_module`,
which is what ``sicot train --encoder-module my_encoder.py`` calls.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import itertools
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from encoders.base import TextEncoder
from sicot_cli.errors import SicotError

log = logging.getLogger(__name__)

_ENCODERS: dict[str, Callable[..., TextEncoder]] = {}

# Plug-in modules already imported (resolved file path or dotted name -> the names they registered),
# so loading the same plug-in twice in one process (a resumed run, in-process CLI tests) is a no-op
# instead of a duplicate-registration error.
_LOADED: dict[str, list[str]] = {}
_plugin_counter = itertools.count()


def register_encoder(fn: Callable[..., TextEncoder]) -> Callable[..., TextEncoder]:
    """Register an encoder factory under its function name (use as a decorator).

    Args:
        fn: A callable ``fn(vectors, out_dim, freeze_embeddings=False, **options) -> TextEncoder``.

    Returns:
        ``fn`` unchanged.

    Raises:
        ValueError: An encoder of that name is already registered.
    """
    name = fn.__name__
    if name in _ENCODERS:
        raise ValueError(f"encoder {name!r} is already registered")
    _ENCODERS[name] = fn
    return fn


def list_encoders() -> list[str]:
    """Return the registered encoder names, sorted."""
    return sorted(_ENCODERS)


# Every encoder gets these from sicot (the prepared word vectors, the visual stream's width,
# model.freeze_embeddings): they are not model.encoder_options.
SET_BY_SICOT = ("vectors", "out_dim", "freeze_embeddings")


def create_encoder(name: str, **kw: object) -> TextEncoder:
    """Build the encoder registered as ``name``.

    Args:
        name: A name from :func:`list_encoders`.
        **kw: ``vectors``, ``out_dim``, ``freeze_embeddings`` and the encoder's own options.

    Returns:
        The encoder module.

    Raises:
        SicotError: Unknown name, unknown or missing option, a bad option value, or a factory that
            did not return a :class:`TextEncoder`.
    """
    if name not in _ENCODERS:
        raise SicotError(
            f"unknown encoder {name!r} (choices: {', '.join(list_encoders())}); an encoder of one's own is known once "
            "its module is loaded: give --encoder-module FILE (for a run, the one it was trained with)"
        )
    factory = _ENCODERS[name]
    _check_options(name, factory, kw)
    try:
        encoder = factory(**kw)
    except (MemoryError, RuntimeError) as e:  # torch's "can't allocate memory" is a RuntimeError
        if not isinstance(e, MemoryError) and "alloc" not in str(e):
            raise
        own = {k: v for k, v in kw.items() if k not in SET_BY_SICOT}
        raise SicotError(
            f"encoder {name!r} with {own or 'its default options'}: its weights do not fit in memory; "
            "choose smaller sizes (model.encoder_options)"
        ) from None
    if not isinstance(encoder, TextEncoder):
        raise SicotError(
            f"encoder {name!r} returned {type(encoder).__name__}, not a TextEncoder (subclass encoders.TextEncoder)"
        )
    return encoder


def check_options(name: str, **kw: object) -> None:
    """The checks :func:`create_encoder` makes of the option NAMES (unknown, missing), without
    building anything; the values are the factory's to check when it builds.

    Raises:
        SicotError: an unknown name, or an unknown or missing option.
    """
    if name not in _ENCODERS:
        raise SicotError(f"unknown encoder {name!r} (choices: {', '.join(list_encoders())})")
    _check_options(name, _ENCODERS[name], kw)


def is_builtin(name: str) -> bool:
    """Is ``name`` one of the encoders this package ships (not one of a ``--encoder-module``)?"""
    return name in _ENCODERS and _ENCODERS[name].__module__.startswith("encoders.")


def _check_options(name: str, factory: Callable[..., TextEncoder], kw: dict[str, object]) -> None:
    """Turn the TypeError a bad keyword would raise into a SicotError that names the option."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # builtins and some C callables have no signature
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    known = [
        p.name
        for p in params.values()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    ]
    for key in kw:
        if key not in known:
            own = [k for k in known if k not in SET_BY_SICOT]
            raise SicotError(f"encoder {name!r} has no option {key!r} (options: {', '.join(own) or 'none'})")
    missing = [
        p.name
        for p in params.values()
        if p.default is inspect.Parameter.empty
        and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        and p.name not in kw
    ]
    if missing:
        raise SicotError(f"encoder {name!r} needs option(s): {', '.join(missing)}")


def load_encoder_module(spec: str) -> list[str]:
    """Import a plug-in module so that its ``@register_encoder`` functions register.

    Args:
        spec: A path to a ``.py`` file, or a dotted module name importable from ``sys.path``.

    Returns:
        The names the module registered, sorted. Loading the same module again in one process
        returns the same names without importing it twice.

    Raises:
        SicotError: The file does not exist, or importing it failed (syntax error, import error,
            a duplicate encoder name, ...); the message names the spec and the cause in one line.
    """
    is_file = spec.endswith(".py") or "/" in spec or "\\" in spec or Path(spec).is_file()
    if not is_file and spec.split(".")[0] == __package__:  # a dotted name in sicot's own package
        local = Path(*spec.split(".")).with_suffix(".py")
        if spec == __package__ or local.is_file():
            raise SicotError(
                f"cannot load encoder module {spec!r}: `{__package__}` is sicot's own package"
                + (f"; to load the file {local}, give its path (./{local.as_posix()})" if local.is_file() else "")
            )
    key = str(Path(spec).resolve()) if is_file else spec
    previous = _LOADED.get(key)
    if previous is not None and all(n in _ENCODERS for n in previous):
        return list(previous)

    before = set(_ENCODERS)
    module_name = spec
    try:
        if is_file:
            path = Path(spec)
            if not path.is_file():
                raise SicotError(f"cannot load encoder module {spec!r}: no such file")
            # A unique name: two plug-ins called my_encoder.py in different folders must not clash,
            # and a plug-in must never shadow a real module of the same name.
            module_name = f"sicot_encoder_plugin_{next(_plugin_counter)}_{path.stem}"
            module_spec = importlib.util.spec_from_file_location(module_name, path)
            if module_spec is None or module_spec.loader is None:
                raise SicotError(f"cannot load encoder module {spec!r}: not a Python file")
            module = importlib.util.module_from_spec(module_spec)
            # Registered before exec, as a normal import would: dataclasses and pickling look it up.
            sys.modules[module_name] = module
            module_spec.loader.exec_module(module)
        else:
            importlib.import_module(spec)
    except SicotError:
        raise
    except Exception as exc:  # anything a user's module raises while importing is a user error
        if is_file:
            sys.modules.pop(module_name, None)
        # Forget what a half-imported module registered, so fixing the file and retrying works.
        for name in set(_ENCODERS) - before:
            del _ENCODERS[name]
        cause = " ".join(f"{type(exc).__name__}: {exc}".split())
        if not is_file and isinstance(exc, ModuleNotFoundError) and exc.name == spec and Path(f"{spec}.py").is_file():
            cause += f" (did you mean the file {spec}.py?)"
        raise SicotError(f"cannot load encoder module {spec!r}: {cause}") from exc

    added = sorted(set(_ENCODERS) - before)
    _LOADED[key] = added
    if not added:
        log.warning("encoder module %s registered no encoder (use @register_encoder)", spec)
    else:
        log.info("encoder module %s registered %s", spec, ", ".join(added))
    return added
