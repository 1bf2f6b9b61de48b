"""The ``sicot`` command line: each command parses options, loads the recipe, calls ONE library
function and prints. Heavy libraries (torch, gensim, jieba, h5py) are imported inside the commands
so ``sicot --help`` stays instant."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from sicot_cli.cli_datasets import app as datasets_app
from sicot_cli.console import console, error_line, fail, guard, safe, setup_logging, show, stop_on_sigterm, utf8_streams
from sicot_cli.console import plain as plain_text
from sicot_cli.interrupts import stop_code

app = typer.Typer(
    name="sicot",
    help="Side-information co-training (SICoT, CIKM'20) for long-tailed product recognition.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
app.add_typer(datasets_app, name="datasets")  # sicot datasets fetch emoji / import ... (sicot_cli/cli_datasets.py)


def _check_encoders_package() -> None:
    """sicot's text encoders are the top-level package ``encoders``: under ``python -m sicot_cli`` (and
    ``torchrun -m sicot_cli``) the working folder comes first on the import path, where a user's own
    ``encoders.py``, or a folder of encoder files named ``encoders`` (with an editable install), hid
    it and the first command that needed it failed with an ImportError traceback. sicot's own is
    then registered under its name, ahead of what hides it (a user's encoder module imports it too),
    and runs on first use."""
    if "encoders" in sys.modules:  # imported already (a launcher, a test): nothing to look up
        return
    import importlib.util

    ours = Path(__file__).resolve().parent.parent / "encoders" / "__init__.py"
    spec = importlib.util.find_spec("encoders")
    origin = Path(spec.origin).resolve() if spec is not None and spec.origin else None
    if origin == ours:
        return
    if not ours.is_file():  # installed some other way: whatever is found must be sicot's
        if origin is not None and origin.name == "__init__.py" and (origin.parent / "registry.py").is_file():
            return
        fail("sicot's `encoders` package is not installed beside sicot_cli: install sicot again")
    spec = importlib.util.spec_from_file_location("encoders", ours, submodule_search_locations=[str(ours.parent)])
    assert spec is not None and spec.loader is not None
    # run on first use, as an import would be (it imports torch: `--help` stays instant)
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules["encoders"] = module
    spec.loader.exec_module(module)


def main(args: list[str] | None = None) -> None:
    """The console script: the Typer app, with click's usage errors (an unknown option, a missing or
    malformed value) as one red line naming the command's --help, and exit code 2."""
    try:  # recent Typer carries its own copy of click
        from typer._click import exceptions as click_errors
    except ImportError:  # pragma: no cover - older Typer, on click itself
        from click import exceptions as click_errors

    utf8_streams()
    stop_on_sigterm()
    _check_encoders_package()
    try:
        code = app(args=args, prog_name="sicot", standalone_mode=False)
    except click_errors.UsageError as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # the help is already printed
            raise SystemExit(2) from None
        command = e.ctx.command_path if e.ctx is not None else _command_path(args)
        fail(f"{e.format_message()} (see `{command} --help`)", e.exit_code)
    except click_errors.ClickException as e:  # a bad file argument, and the like
        fail(e.format_message(), e.exit_code)
    except typer.Abort:
        fail("aborted", 1)
    raise SystemExit(code if isinstance(code, int) else 0)


def _command_path(args: list[str] | None) -> str:
    """``sicot <command> [<subcommand>]`` as far as the arguments name commands (for a usage error)."""
    import sys

    words, group = ["sicot"], typer.main.get_command(app)
    for arg in sys.argv[1:] if args is None else args:
        sub = getattr(group, "commands", {}).get(arg)
        if sub is None:
            if not arg.startswith("-"):
                break
            continue
        words.append(arg)
        group = sub
    return " ".join(words)


RecipeOpt = Annotated[
    Path | None, typer.Option("--recipe", "-r", help="TOML recipe (default: the built-in demo recipe).")
]
Overrides = Annotated[
    list[str] | None,
    typer.Argument(help="Recipe overrides: section.key=value (e.g. data.image_size=64).", show_default=False),
]
CheckpointOpt = Annotated[
    str | None,
    typer.Option(
        help="last or best (default: the checkpoint the run's scores come from: best where it selected on "
        "validation, else last)."
    ),
]
Threads = Annotated[
    int | None,
    typer.Option(
        "--threads",
        help="CPU threads for torch (default: train.threads; 0 = auto: OMP_NUM_THREADS when set, else the cores "
        "this process may use, at most 8).",
    ),
]


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"sicot {version('sicot')}")
        except PackageNotFoundError:
            typer.echo("sicot (not installed as a package)")
        raise typer.Exit()


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    setup_logging(verbose)


def _threads(threads: int | None, overrides: list[str] | None) -> list[str]:
    """``--threads N`` as its override, refused beside a ``train.threads=`` override of its own."""
    if threads is None:
        return []
    _refuse_twice({"train.threads": f"--threads {threads}"}, overrides)
    return [f"train.threads={threads}"]


def _refuse_twice(options: dict[str, str], overrides: list[str] | None) -> None:
    """An option and an override that set the same key are refused: the override would win without a word.

    ``options``: each key an option sets, with the option as the user typed it (``train.threads`` ->
    ``--threads 2``). Keys an option only defaults (``--manifest``'s name, output and boundaries)
    are left out by the caller: an override of those is the way to change them.
    """
    from sicot_cli.config import override_key
    from sicot_cli.errors import SicotError

    for item in overrides or []:
        key = override_key(item)
        if key in options:
            raise SicotError(f"{options[key]} and the override {item!r} both set {key}: give one of them")


def _manifest_extras(manifest: Path, overrides: list[str] | None) -> list[str]:
    """Own data without a recipe: named after the manifest, written to data/<name>.h5, and with
    head/tail boundaries derived from its training counts (not the demo's). ``--manifest`` beside a
    ``data.source=`` or ``data.manifest=`` override is refused: one of the two would be read without a
    word; the name, output and boundaries are defaults an override may replace."""
    _refuse_twice(dict.fromkeys(("data.source", "data.manifest"), f"--manifest {manifest}"), overrides)
    return [
        'data.source="manifest"',
        f"data.manifest={_toml_str(str(manifest))}",
        f"name={_toml_str(manifest.stem)}",
        f"data.out={_toml_str(str(Path('data') / (manifest.stem + '.h5')))}",
        'eval.boundaries="data"',
    ]


def _recipe(  # noqa: ANN202
    recipe: Path | None,
    overrides: list[str] | None,
    extra: list[str] | None = None,
    typed: dict[str, str] | None = None,
):
    """The recipe with the options' overrides (``extra``; ``typed``: the option each came from, for
    its errors) and then the user's."""
    from sicot_cli.config import load_recipe

    return load_recipe(recipe, [*(extra or []), *(overrides or [])], typed)


def _typed(option: str, value: object, items: list[str]) -> dict[str, str]:
    """Each of ``items`` as the user typed it: ``--workers 8``, for an error about ``data.workers=8``."""
    return dict.fromkeys(items, f"{option} {value}")


def _out_file(raw: str | Path | None, name: str) -> Path | None:
    """``--out`` may name the .h5 file or a folder to put ``<name>.h5`` in (a trailing slash: a folder)."""
    from sicot_cli.data.prepare import H5_SUFFIXES
    from sicot_cli.errors import SicotError

    if raw is None:
        return None
    raw = os.fspath(raw)
    if not raw.strip():
        raise SicotError("--out is empty; it names the .h5 file to write (e.g. data.h5) or a folder")
    if raw.endswith(("/", os.sep)):
        return Path(raw) / f"{name}.h5"
    out = Path(raw)
    if out.name.lower() in H5_SUFFIXES:  # Path(".h5").suffix is "": taken for a folder
        raise SicotError(f"{out}: a file name needs a name before {out.name}; --out names the .h5 file (e.g. data.h5)")
    if out.name.startswith("."):
        raise SicotError(f"{out}: a hidden file name; --out names the .h5 file to write (e.g. data.h5) or a folder")
    if out.suffix.lower() in H5_SUFFIXES:
        return out
    if out.is_file():
        raise SicotError(
            f"{out}: is a file; --out names the .h5 file to write (e.g. {out.with_suffix('.h5')}) or a folder"
        )
    if out.suffix and not out.exists():
        import logging

        logging.getLogger(__name__).warning(
            "%s: not an .h5 name, so it is taken as a folder to hold %s.h5 (write %s for the file itself)",
            out,
            name,
            out.with_suffix(".h5"),
        )
    return out / f"{name}.h5"


@app.command()
@guard
def prepare(
    recipe: RecipeOpt = None,
    manifest: Annotated[
        Path | None,
        typer.Option(help="CSV/JSONL manifest (image,title,label[,split][,id]); default settings, no recipe needed."),
    ] = None,
    out: Annotated[
        str | None, typer.Option(help="Output .h5 file, or a folder for <recipe name>.h5 (default: data.out).")
    ] = None,
    force: Annotated[bool, typer.Option(help="Rebuild an existing output.")] = False,
    strict: Annotated[bool, typer.Option(help="Stop at the first unusable row instead of skipping it.")] = False,
    workers: Annotated[
        int | None, typer.Option(help="Decode processes (default: data.workers, 0 = all cores).")
    ] = None,
    shard: Annotated[
        str | None,
        typer.Option(
            help='i/n: write only part i (0-based) of n of the JPEG shards (data.images = "jpeg"), one machine\'s share; '
            "then run once with --merge. Every part must use the same recipe and manifest."
        ),
    ] = None,
    merge: Annotated[
        bool, typer.Option(help="Check that every part's shards are there and write the index (after --shard parts).")
    ] = False,
    overrides: Overrides = None,
) -> None:
    """Read raw images and titles into one HDF5 file (the only command that reads raw data)."""
    from sicot_cli.console import RichProgress
    from sicot_cli.data.prepare import PartSummary
    from sicot_cli.data.prepare import prepare as run_prepare
    from sicot_cli.errors import SicotError
    from sicot_cli.views import prepare_table

    extra = []
    if manifest is not None:
        extra = _manifest_extras(manifest, overrides)
        if recipe is not None:  # the recipe's own name, output and boundaries stay
            extra = extra[:2]
    typed = _typed("--manifest", manifest, extra)
    if strict:
        extra.append("data.strict=true")
        _refuse_twice({"data.strict": "--strict"}, overrides)
    if workers is not None:
        extra.append(f"data.workers={workers}")
        typed |= _typed("--workers", workers, extra[-1:])
        _refuse_twice({"data.workers": f"--workers {workers}"}, overrides)
    cfg = _recipe(recipe, overrides, extra, typed)
    part = _part(shard) if shard is not None else None
    if part is not None and merge:
        raise SicotError("--shard and --merge: run the parts with --shard, then one --merge without it")
    summary = run_prepare(cfg, _out_file(out, cfg.name), force=force, progress=RichProgress(), part=part, merge=merge)
    if isinstance(summary, PartSummary):
        s = summary
        if not s.shards:  # more parts than shards: this part has none to write
            console.print(safe(
                f"part {s.part[0]}/{s.part[1]}: no shards to write (the manifest fills fewer shards than "
                f"{s.part[1]} parts; data.shard_rows sets a shard's rows); "
                "when every part is done: the same command with --merge instead of --shard"
            ), soft_wrap=True)  # fmt: skip
            return
        console.print(safe(
            f"part {s.part[0]}/{s.part[1]}: shards {s.shards.start}-{s.shards.stop - 1} in {s.folder} "
            f"({s.resumed} already complete), {s.images:,} images, {s.skipped:,} skipped, {s.seconds:.1f} s; "
            "when every part is done: the same command with --merge instead of --shard"
        ), soft_wrap=True)  # fmt: skip
        return
    show(prepare_table(summary))


def _ascii_digits(text: str) -> bool:
    """Digits 0-9 only (``str.isdigit`` is also true for '²', which ``int`` refuses)."""
    return text.strip().isascii() and text.strip().isdigit()


def _part(text: str) -> tuple[int, int]:
    """``--shard i/n`` -> (i, n), 0 <= i < n."""
    from sicot_cli.errors import SicotError

    i, sep, n = text.partition("/")
    if not (sep and _ascii_digits(i) and _ascii_digits(n) and 0 <= int(i) < int(n)):
        raise SicotError(f"--shard {text!r}: expected i/n with 0 <= i < n, e.g. --shard 0/4")
    return int(i), int(n)


def _toml_str(value: str) -> str:
    """``value`` as a TOML basic string (a JSON string, with DEL escaped too, as TOML requires)."""
    import json

    from sicot_cli.errors import SicotError

    if any("\ud800" <= ch <= "\udfff" for ch in value):  # bytes that are not UTF-8 (surrogateescape)
        raise SicotError(f"{value.encode('utf-8', 'surrogateescape')!r}: not valid UTF-8; rename it")
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


@app.command()
@guard
def tokenize(
    texts: Annotated[list[str] | None, typer.Argument(help="Titles to tokenize.", show_default=False)] = None,
    file: Annotated[Path | None, typer.Option("--file", "-f", help="A UTF-8 file with one title per line.")] = None,
    data: Annotated[
        Path | None, typer.Option(help="A prepared .h5: also show which tokens its vocabulary keeps.")
    ] = None,
    workers: Annotated[int, typer.Option(help="Processes for large inputs (0 = all cores).")] = 0,
    plain: Annotated[
        bool | None,
        typer.Option(
            "--plain/--no-plain",
            help="One line of space-separated tokens per title (default: on for --file, off for titles given).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Split titles into words: jieba for Chinese, lower-cased latin words and numbers."""
    from sicot_cli.data.tokenize import tokenize_many
    from sicot_cli.errors import SicotError

    titles = list(texts or [])
    if file is not None:
        from sicot_cli.fsutil import read_text

        text = read_text(file, "titles file", expected="a text file with one title per line")
        # one title a line, lines ended by \n (\r\n too): not str.splitlines, which also breaks a title
        # at a vertical tab, form feed, U+0085 or U+2028, and the output would no longer line up with it
        lines = text.split("\n")
        if lines[-1] == "":
            lines.pop()
        titles += [ln.removesuffix("\r") for ln in lines]
        plain = True if plain is None else plain  # plain by default for a file; --no-plain asks for the table
        if not titles:
            raise SicotError(f"{file}: nothing to tokenize: the file is empty (one title per line)")
    if not titles:
        raise SicotError("nothing to tokenize: give titles as arguments or --file FILE")
    plain = bool(plain)
    if not 0 <= workers <= 4096:  # as data.workers; the pool itself takes at most one per core
        raise SicotError(f"--workers must be 0..4096 (0 = all cores), got {workers}")
    vocab = None
    if data is not None:
        from sicot_cli.data.dataset import open_prepared

        vocab = set(open_prepared(data).words[1:])
    tokens = tokenize_many(titles, workers)
    if plain:  # [word]: not in the vocabulary (removed by the noise filter, or never seen)
        for toks in tokens:
            shown = toks if vocab is None else [t if t in vocab else f"[{t}]" for t in toks]
            typer.echo(plain_text(" ".join(shown)))
        return
    from rich.table import Column, Table
    from rich.text import Text

    # a Text header: as a string, rich would read "[word]" as markup and print "(: not kept)"
    legend = [Column(header=Text("kept by the vocabulary ([word]: not kept)"))] if vocab is not None else []
    table = Table("title", "tokens", *legend)
    for title, toks in zip(titles, tokens, strict=True):
        row = [safe(title), safe(" | ".join(toks))]
        if vocab is not None:
            # marked by brackets as well as colour: readable without colour (logs, NO_COLOR)
            row.append(Text(" | ").join(safe(t, "green") if t in vocab else safe(f"[{t}]", "red strike") for t in toks))
        table.add_row(*row)
    show(table)


@app.command()
@guard
def embed(
    recipe: RecipeOpt = None,
    out: Annotated[
        str | None, typer.Option(metavar="<path>", help="Write the vectors here (word2vec text format).")
    ] = None,
    neighbours: Annotated[
        str | None, typer.Option("--neighbours", help="Print the nearest words to WORD instead.")
    ] = None,
    manifest: Annotated[
        Path | None, typer.Option(help="CSV/JSONL manifest to build the vocabulary from (no recipe needed).")
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            help="A prepared .h5: with --neighbours, whose vectors to use; without, rebuild its vocabulary with the settings it was prepared with."
        ),
    ] = None,
    vectors: Annotated[
        Path | None, typer.Option(help="With --neighbours: a word2vec file whose vectors to use.")
    ] = None,
    binary: Annotated[bool, typer.Option(help="--vectors is in word2vec binary format.")] = False,
    top: Annotated[int, typer.Option(help="How many neighbours.")] = 10,
    overrides: Overrides = None,
) -> None:
    """Build the vocabulary from the training titles and train (or load) word2vec vectors."""
    from sicot_cli.console import RichProgress
    from sicot_cli.data import embed as lib
    from sicot_cli.errors import SicotError
    from sicot_cli.fsutil import file_to_write

    _check_embed_options(neighbours is not None, recipe, out, manifest, data, vectors, binary, overrides)
    vectors_out = None if out is None else file_to_write(out, "--out", "the vectors file", "vectors.txt")
    if neighbours is not None:
        from rich.table import Table
        from rich.text import Text

        if top < 1:
            raise SicotError(f"--top must be >= 1, got {top}")

        table = Table(
            "word", "cosine", title=Text.assemble("nearest words to ", safe(repr(neighbours))), title_justify="left"
        )
        for word, sim in lib.neighbours(neighbours, top, data=data, vectors=vectors, binary=binary):
            table.add_row(safe(word), f"{sim:.3f}")
        show(table)
        return
    from sicot_cli.views import embed_table

    if data is not None:  # the settings the file was prepared with, overrides on top
        from sicot_cli.config import recipe_with_overrides
        from sicot_cli.data.dataset import open_prepared

        cfg = recipe_with_overrides(open_prepared(data).recipe, overrides, f"{data} (its recipe)")
        try:
            summary = lib.embed(cfg, vectors_out, progress=RichProgress())
        except SicotError as e:  # the paths a file records are as `prepare` was given them
            if "not found" not in str(e):
                raise
            raise SicotError(
                f"{e}; the path is recorded in {data} as `prepare` was given it, relative to the folder it ran in: "
                "run from there, or set it again (e.g. data.manifest=PATH)"
            ) from None
        show(embed_table(summary))
        return
    extra = None if manifest is None else _manifest_extras(manifest, overrides)[: 2 if recipe is not None else 3]
    cfg = _recipe(recipe, overrides, extra, _typed("--manifest", manifest, extra or []))
    summary = lib.embed(cfg, vectors_out, progress=RichProgress())
    show(embed_table(summary))


def _check_embed_options(
    look_up: bool,
    recipe: Path | None,
    out: str | None,
    manifest: Path | None,
    data: Path | None,
    vectors: Path | None,
    binary: bool,
    overrides: list[str] | None,
) -> None:
    """Refuse options that the chosen mode of ``embed`` would not use (they were ignored, silently)."""
    from sicot_cli.errors import SicotError

    given = {
        "--recipe": recipe is not None,
        "--out": out is not None,
        "--manifest": manifest is not None,
        "--data": data is not None,
        "--vectors": vectors is not None,
        "--binary": binary,
        "overrides": bool(overrides),
    }
    if look_up:
        unused = [k for k in ("--recipe", "--out", "--manifest", "overrides") if given[k]]
        if unused:
            raise SicotError(
                f"{', '.join(unused)}: not used with --neighbours, which reads the vectors of --data or --vectors: "
                "leave them out, or build vectors first without --neighbours"
            )
        if given["--data"] and given["--vectors"]:
            raise SicotError("--neighbours reads the vectors of --data or of --vectors, not both: give one")
        if given["--binary"] and not given["--vectors"]:
            raise SicotError("--binary describes the --vectors file: give --vectors FILE, or leave --binary out")
        return
    if given["--vectors"] or given["--binary"]:
        raise SicotError(
            "--vectors/--binary are for --neighbours; to start the vocabulary's vectors from a word2vec file, "
            "set embed.pretrained=FILE (and embed.binary=true)"
        )
    if given["--data"] and (given["--manifest"] or given["--recipe"]):
        which = " and ".join(k for k in ("--manifest", "--recipe") if given[k])
        raise SicotError(
            f"--data rebuilds the vocabulary with the settings it was prepared with, so {which} would not be used: "
            "give --data, or --recipe/--manifest, not both"
        )


def _encoder_names() -> list[str]:
    from encoders import list_encoders

    return ["none", *list_encoders()]


EncoderModule = Annotated[
    list[str] | None,
    typer.Option(
        "--encoder-module", help="A .py file or dotted module whose @register_encoder functions become --encoder names."
    ),
]


def _load_encoder_modules(specs: list[str] | None) -> None:
    if specs:
        from encoders import load_encoder_module

        for spec in specs:
            load_encoder_module(spec)


def _check_encoder(name: str) -> None:
    from sicot_cli.errors import SicotError

    if name not in _encoder_names():
        raise SicotError(f"unknown encoder {name!r} (choices: {', '.join(_encoder_names())})")


def _show_train_result(result: Any) -> None:  # noqa: ANN401 - sicot_cli.train.TrainResult
    """``sicot train``'s output: the epochs, the test scores, and how to continue an interrupted run (exit 130)."""
    from sicot_cli.console import err_console
    from sicot_cli.views import epochs_table

    if result.skipped:
        console.print(safe(f"{result.run_dir}: already finished; nothing to do"))
    show(epochs_table(result.history, str(result.run_dir)))
    if result.test is not None:
        from sicot_cli.runs import selection_line
        from sicot_cli.views import metrics_table

        show(metrics_table(result.test, f"{result.run_dir}: {selection_line(result.test)}"))
    if result.interrupted:
        import shlex

        from rich.text import Text

        again = safe(shlex.join(["sicot", "train", "--resume", "--run-dir", str(result.run_dir)]))
        if result.checkpoint is None:
            said = "interrupted before its first checkpoint: nothing saved yet;", "starts the run again"
        elif result.checkpoint.startswith("after"):  # stopped in an epoch's validation: that epoch runs again
            said = f"interrupted: the checkpoint {result.checkpoint} is kept; continue with", ""
        else:
            said = "interrupted: checkpoint saved; continue with", ""
        err_console.print(  # one line, never wrapped: the command is copied from it
            Text.assemble((said[0], "yellow"), " ", again, *([" ", (said[1], "yellow")] if said[1] else [])),
            soft_wrap=True,
        )
        raise typer.Exit(stop_code())


@app.command()
@guard
def train(
    recipe: RecipeOpt = None,
    encoder: Annotated[
        str | None,
        typer.Option(
            help="Text encoder, or 'none' for the image-only baseline (default: model.encoder).",
            autocompletion=lambda: _encoder_names(),
        ),
    ] = None,
    encoder_module: EncoderModule = None,
    data: Annotated[Path | None, typer.Option(help="Prepared .h5 (default: data.out).")] = None,
    run_dir: Annotated[
        Path | None,
        typer.Option(
            help="Run directory (default: in train.runs_dir, named like demo-bilinear-s0: recipe, encoder, seed)."
        ),
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue an existing run from its last checkpoint, with its own recipe and data.")
    ] = False,
    allow_changes: Annotated[
        bool,
        typer.Option(
            help="With --resume: accept recipe changes that alter the result (recorded in the run's config.json)."
        ),
    ] = False,
    threads: Threads = None,
    overrides: Overrides = None,
) -> None:
    """Train one run: the baseline (--encoder none) or SICoT co-training with a text encoder."""
    from sicot_cli import runs
    from sicot_cli.console import RichProgress
    from sicot_cli.errors import SicotError
    from sicot_cli.train import train as run_train

    _load_encoder_modules(encoder_module)
    extra = [*([f"model.encoder={_toml_str(encoder)}"] if encoder else []), *_threads(threads, overrides)]
    typed = _typed("--encoder", encoder, extra[:1] if encoder else [])
    if encoder:
        _refuse_twice({"model.encoder": f"--encoder {encoder}"}, overrides)
    cfg = None
    if resume and run_dir is None:  # the default run directory is named by the recipe
        cfg = _recipe(recipe, overrides, extra, typed)
        run_dir = Path(cfg.train.runs_dir) / runs.default_run_name(cfg.name, cfg.model.encoder, cfg.train.seed)
    if resume and run_dir is not None:
        runs.check_resumable(run_dir)
        described = recipe is not None or bool(overrides) or encoder is not None or data is not None
        if not runs.is_run(run_dir) and not described:  # the built-in recipe would start here, silently
            where = "no such folder" if not run_dir.exists() else f"no {runs.CONFIG}"
            raise SicotError(
                f"{run_dir}: no run to resume ({where}); --resume alone continues a run from its {runs.CONFIG}: "
                f"start one with `sicot train --run-dir {run_dir} --recipe ...` (or add --resume to the command "
                "that started it)"
            )
    import contextlib
    import os

    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 prints
    with contextlib.ExitStack() as held:
        if resume and run_dir is not None and runs.is_run(run_dir):
            from sicot_cli.resume import resume_recipe

            if main_rank:  # held from before --allow-changes rewrites config.json to the run's end
                held.enter_context(runs.hold(run_dir))
            cfg, saved_data = resume_recipe(run_dir, recipe, [*extra, *(overrides or [])], allow_changes)
            data = data if data is not None else saved_data
        elif cfg is None:
            cfg = _recipe(recipe, overrides, extra, typed)
        _check_encoder(cfg.model.encoder)
        from sicot_cli.model import check_encoder_options
        from sicot_cli.preflight import check_training

        check_training(cfg, data)
        check_encoder_options(cfg, [cfg.model.encoder], recipe)
        result = run_train(cfg, run_dir, resume=resume, data=data, progress=RichProgress() if main_rank else None)
    if main_rank:  # under torchrun only rank 0 prints
        _show_train_result(result)


@app.command()
@guard
def evaluate(
    run: Annotated[Path, typer.Option(help="Run directory.")],
    checkpoint: CheckpointOpt = None,
    data: Annotated[Path | None, typer.Option(help="Prepared .h5 (default: the run's).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    split: Annotated[
        str, typer.Option(help="test, or val (the validation rows carved from the training data).")
    ] = "test",
    json_out: Annotated[bool, typer.Option("--json", help="Print the metrics as JSON.")] = False,
    threads: Threads = None,
    encoder_module: EncoderModule = None,
) -> None:
    """Re-score a run's checkpoint on its test (or validation) split, image only."""
    _load_encoder_modules(encoder_module)  # a run trained with an encoder of one's own
    import json

    from sicot_cli.evaluate import evaluate_run
    from sicot_cli.threads import set_threads
    from sicot_cli.views import metrics_table

    set_threads(threads or 0)
    from sicot_cli.console import RichProgress

    result = evaluate_run(run, checkpoint, data, device, split, progress=RichProgress())
    which = {"checkpoint": result.checkpoint, "checkpoint_epoch": result.checkpoint_epoch}
    if json_out:
        scalars = result.scalars()
        n_images = scalars.pop("n_test")  # a val split's rows are not test rows: named by the split
        scalars = {"split": split, **which, **scalars, "n_images": n_images}
        typer.echo(plain_text(json.dumps(scalars, indent=2)))
    else:
        epoch = "" if result.checkpoint_epoch is None else f", epoch {result.checkpoint_epoch}"
        show(metrics_table(result.scalars(), f"{run} (checkpoint {result.checkpoint}{epoch}, {split} split)"))


@app.command()
@guard
def predict(
    images: Annotated[list[Path], typer.Argument(help="Image files.", show_default=False, readable=False)],
    run: Annotated[Path, typer.Option(help="Run directory.")],
    top: Annotated[
        int | None, typer.Option("--top", "-k", help="How many classes per image (default: 3, at most every class).")
    ] = None,
    checkpoint: CheckpointOpt = None,
    data: Annotated[Path | None, typer.Option(help="Prepared .h5 (default: the run's).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    threads: Threads = None,
    encoder_module: EncoderModule = None,
) -> None:
    """Recognise products from images alone; show each predicted class's title."""
    _load_encoder_modules(encoder_module)  # a run trained with an encoder of one's own
    from sicot_cli.predict import predict as run_predict
    from sicot_cli.predict import predictions_json
    from sicot_cli.threads import set_threads
    from sicot_cli.views import predictions_table

    set_threads(threads or 0)

    sources: list[str] = []  # the table's heading, printed with the table (the JSON stays a list of predictions)
    preds, unreadable = run_predict(run, list(images), top, checkpoint, data, device, on_model=sources.append)
    if preds or json_out:
        if json_out:
            typer.echo(plain_text(predictions_json(preds)))
        else:
            console.print(safe(f"image-only model of {sources[0]}"), highlight=False)
            show(predictions_table(preds))
    if unreadable:  # every readable image is predicted; each unreadable one is named, and the exit says so
        for u in unreadable[:-1]:
            error_line(f"{u.image}: {u.reason}")
        last = f"{unreadable[-1].image}: {unreadable[-1].reason}"
        if len(images) > 1:
            last += f" ({len(unreadable)} of {len(images)} images could not be read; the others were predicted)"
        fail(last)


@app.command()
@guard
def export(
    run: Annotated[Path, typer.Option(help="Run directory.")],
    out: Annotated[
        str,
        typer.Option(
            metavar="<path>", help="Output model file (.onnx or .pt); its JSON goes beside it as <file>.json."
        ),
    ],
    fmt: Annotated[
        str | None, typer.Option("--format", help="torchscript or onnx (default: from --out, .onnx -> onnx).")
    ] = None,
    checkpoint: CheckpointOpt = None,
    data: Annotated[Path | None, typer.Option(help="Prepared .h5 (default: the run's).")] = None,
    encoder_module: EncoderModule = None,
) -> None:
    """Write the image-only model (ONNX or TorchScript) and a JSON that lets it run without sicot."""
    _load_encoder_modules(encoder_module)  # a run trained with an encoder of one's own
    from sicot_cli.export import TOLERANCE
    from sicot_cli.export import export as run_export
    from sicot_cli.fsutil import file_to_write

    r = run_export(run, file_to_write(out, "--out", "the model file", "model.onnx"), fmt, checkpoint, data)
    within = (
        f" (tolerance {r.tolerance:.1e}: float32's own rounding of its large logits)" if r.tolerance > TOLERANCE else ""
    )
    console.print(
        safe(
            f"wrote {r.path} ({r.format}) and {r.sidecar}, from {r.source}; checked on {r.verified_images} test images: max |dp| {r.max_abs_diff:.1e}{within}, top-1 {'identical' if r.top1_equal else 'different'}"
        )
    )


@app.command()
@guard
def serve(
    run: Annotated[Path | None, typer.Option(help="Run directory to serve (its image-only model).")] = None,
    model: Annotated[
        Path | None,
        typer.Option(help="Or an exported model (.onnx or .pt, with the JSON `sicot export` wrote beside it)."),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to bind (127.0.0.1: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    top: Annotated[
        int | None,
        typer.Option(
            "--top", "-k", help="Classes per image unless a request asks ?k=N (default: 5, at most every class)."
        ),
    ] = None,
    max_batch: Annotated[int, typer.Option(help="Micro-batching: most images per forward pass (1 = off).")] = 32,
    max_wait_ms: Annotated[
        float, typer.Option(help="Micro-batching: longest wait for more images after the first.")
    ] = 5.0,
    max_upload_mb: Annotated[float, typer.Option(help="Largest request body (MB).")] = 10.0,
    max_pixels: Annotated[
        int, typer.Option(help="Largest image (pixels, read from its header before decoding).")
    ] = 40_000_000,
    max_images: Annotated[int, typer.Option(help="Most images in one request.")] = 32,
    timeout: Annotated[
        float, typer.Option(help="Per-request limit (s): receiving the upload, and waiting for the model.")
    ] = 30.0,
    max_queue: Annotated[int, typer.Option(help="Images waiting for the model before new requests get 503.")] = 1024,
    checkpoint: CheckpointOpt = None,
    data: Annotated[Path | None, typer.Option(help="With --run: prepared .h5 (default: the run's).")] = None,
    device: Annotated[str, typer.Option(help="With --run: auto, cpu or cuda.")] = "auto",
    threads: Annotated[int | None, typer.Option(help="CPU threads for the model (default: the runtime's).")] = None,
    encoder_module: EncoderModule = None,
) -> None:
    """Serve the image-only model over HTTP: POST /predict, GET /classes, GET /healthz (FastAPI + uvicorn)."""
    _load_encoder_modules(encoder_module)  # a run trained with an encoder of one's own
    import math

    from sicot_cli.errors import SicotError
    from sicot_cli.serve import ServeLimits
    from sicot_cli.serve import serve as run_serve

    if not (math.isfinite(max_upload_mb) and 1e-6 <= max_upload_mb <= 100_000):  # int() of inf or nan raises
        raise SicotError(f"--max-upload-mb must be between 0.000001 and 100000 (MB), got {max_upload_mb}")
    limits = ServeLimits(
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        max_upload_bytes=int(max_upload_mb * 1e6),
        max_pixels=max_pixels,
        max_images=max_images,
        timeout_s=timeout,
        max_queue=max_queue,
        top_k=top,
    )
    run_serve(
        run=run,
        model=model,
        host=host,
        port=port,
        limits=limits,
        checkpoint=checkpoint,
        data=data,
        device=device,
        threads=threads,
        on_ready=lambda url, source: console.print(
            safe(f"serving {source} on {url} (POST /predict, GET /classes, GET /healthz; Ctrl-C or SIGTERM stops)")
        ),
    )


def _axis(flag: str, value: str | None) -> list[str] | None:
    """An ablation axis (``--encoders``, ``--seeds``, ``--presets``, ``--methods``): comma-separated,
    no empty item, nothing named twice; None when the flag is not given.

    Raises:
        SicotError: naming the flag and what is wrong.
    """
    from sicot_cli.errors import SicotError

    if value is None:
        return None
    items = [v.strip() for v in value.split(",")]
    if not any(items):
        raise SicotError(f"{flag} names nothing ({value!r}); leave it out for the default")
    if not all(items):
        raise SicotError(f"{flag} has an empty item ({value!r}): separate the names by single commas")
    twice = sorted({v for v in items if items.count(v) > 1})
    if twice:
        raise SicotError(f"{flag} names {', '.join(twice)} twice: each is run once")
    return items


@app.command()
@guard
def ablate(
    recipe: RecipeOpt = None,
    encoders: Annotated[
        str | None,
        typer.Option(help="Comma-separated encoders (default: all registered); the baseline is always trained."),
    ] = None,
    seeds: Annotated[str | None, typer.Option(help="Comma-separated seeds (default: 0).")] = None,
    out: Annotated[
        str | None,
        typer.Option(
            help="Ablation directory (default: ablate-<name> in train.runs_dir; with --val-folds ablate-<name>-folds)."
        ),
    ] = None,
    data: Annotated[
        Path | None, typer.Option(help="Prepared .h5 (default: data.out; prepared first when missing).")
    ] = None,
    encoder_module: EncoderModule = None,
    chosen: Annotated[
        str | None, typer.Option("--encoder", help="Encoder of Tables 2 and 4 (default: bilinear, else the first).")
    ] = None,
    presets: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated presets to compare side by side, e.g. sicot,paper (default: the recipe's preset)."
        ),
    ] = None,
    methods: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated long-tail methods x every encoder, e.g. ce, cb-sampler, la-loss, balanced-softmax, "
            "ldam-drw, crt, tau-norm, lws, posthoc-la (combine with +, e.g. balanced-softmax+crt; default: ce)."
        ),
    ] = None,
    threads: Threads = None,
    figures: Annotated[bool, typer.Option(help="Write the PNG figures at the end.")] = True,
    val_folds: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated validation folds, e.g. 0,1,2,3,4: fold K re-draws the validation rows "
            "(data.val_fold=K, prepared beside data.out) and trains seed K, in <out>/fold-K; then prints "
            "`report --split val` over the folds, for choosing a setting without the test set (writes no report)."
        ),
    ] = None,
    overrides: Overrides = None,
) -> None:
    """Train the baseline and every encoder per seed (finished runs skipped, interrupted ones resumed), then report."""
    from sicot_cli.errors import SicotError

    names, seed_list = _ablation_axes(encoders, seeds, encoder_module, val_folds, data)
    if chosen is not None and chosen.split("[")[0].split("+")[0] not in {*names, "none"}:
        raise SicotError(f"--encoder {chosen!r} is not among the encoders trained here ({', '.join(names)})")
    if out is not None and not out.strip():
        raise SicotError("--out is empty; it names the ablation folder (e.g. runs/my-ablation)")
    _per_run_keys(overrides, val_folds is not None)
    cfg = _recipe(recipe, overrides, _threads(threads, overrides))
    _unused_recipe_seed(cfg, recipe, seeds is None, val_folds is not None)
    from sicot_cli.model import check_encoder_options
    from sicot_cli.preflight import check_training

    check_training(cfg, data)
    check_encoder_options(cfg, names, recipe)
    keys = {"presets": _axis("--presets", presets), "method_names": _axis("--methods", methods)}
    target = None if out is None else Path(out)
    if val_folds is not None:
        root, dirs, statuses = _run_ablation(cfg, names, seed_list, target, keys, folds=True)
    else:
        keys |= {"data": data, "report_figures": figures}
        (root, statuses), dirs = _run_ablation(cfg, names, seed_list, target, keys), None
    if statuses and statuses[-1].state == "interrupted":
        from rich.text import Text

        from sicot_cli.console import err_console

        err_console.print(
            Text.assemble(("interrupted: run the same command again to continue", "yellow"), " ", safe(f"({root})")),
            soft_wrap=True,
        )
        raise typer.Exit(stop_code())
    _ablation_report(root, dirs, chosen, figures)


def _ablation_report(root: Path, fold_dirs: list[Path] | None, chosen: str | None, figures: bool) -> None:
    """The end of ``sicot ablate``: the report written and printed, or (validation folds) printed only."""
    from sicot_cli.report import build_report

    if fold_dirs is not None:
        _print_tables(build_report(fold_dirs, chosen or "bilinear", split="val"))
        console.print(
            "validation only: score the setting chosen here on test with the same command without --val-folds",
            markup=False, highlight=False,
        )  # fmt: skip
        return
    rep = build_report([root], chosen or "bilinear")
    written = _write_report(rep, root, figures)
    _print_tables(rep)
    console.print(safe("wrote " + ", ".join(str(p) for p in written)))


@app.command()
@guard
def decouple(
    run: Annotated[Path, typer.Argument(help="A finished run directory (its visual stream is kept, frozen).")],
    method: Annotated[
        str | None,
        typer.Option(help="crt (default), lws, tau_norm or logit_adjust (post-hoc); or decouple.method=."),
    ] = None,
    run_dir: Annotated[Path | None, typer.Option(help="The new run's directory (default: <run>-<method>).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted second stage.")] = False,
    data: Annotated[Path | None, typer.Option(help="Prepared .h5 (default: the run's).")] = None,
    threads: Threads = None,
    overrides: Overrides = None,
    encoder_module: EncoderModule = None,
) -> None:
    """Second stage of decoupled classifier learning (cRT, LWS, tau-norm, post-hoc logit adjustment) on a finished run."""
    _load_encoder_modules(encoder_module)  # a run trained with an encoder of one's own
    from sicot_cli.console import RichProgress, err_console
    from sicot_cli.decouple import decouple as run_decouple
    from sicot_cli.errors import SicotError
    from sicot_cli.methods import STAGES
    from sicot_cli.runs import selection_line
    from sicot_cli.views import metrics_table

    if method is not None and method not in STAGES.values():  # the option's own error, not an override's
        raise SicotError(f"--method must be one of {', '.join(STAGES.values())}, got {method!r}")
    if method is not None:
        _refuse_twice({"decouple.method": f"--method {method}"}, overrides)
    from sicot_cli.config import override_key

    given = any(override_key(o) == "decouple.method" for o in overrides or [])
    extra = [*([] if given else [f"decouple.method={method or 'crt'}"]), *_threads(threads, overrides)]
    try:
        result = run_decouple(
            run, extra + list(overrides or []), run_dir, resume=resume, progress=RichProgress(), data=data
        )
    except KeyboardInterrupt:
        import shlex

        from rich.text import Text

        again = ["sicot", "decouple", str(run), *(["--method", method] if method else []), "--resume"]
        again += ["--run-dir", str(run_dir)] if run_dir is not None else []
        err_console.print(
            Text.assemble(("interrupted: the last finished epoch is kept; continue with", "yellow"), " ",
                          safe(shlex.join(again + list(overrides or [])))),
            soft_wrap=True,
        )  # fmt: skip
        raise typer.Exit(stop_code()) from None
    if result.skipped:
        console.print(safe(f"{result.run_dir}: already finished; nothing to do"))
    if result.test is not None:
        show(metrics_table(result.test, f"{result.run_dir}: {selection_line(result.test)}"))


def _unused_recipe_seed(cfg: Any, recipe: Path | None, default_seeds: bool, folds: bool) -> None:
    """A recipe's own ``train.seed`` is not what ablate trains (``--seeds``, default 0; with
    ``--val-folds``, seed K on fold K): said, not dropped silently."""
    if not (default_seeds and "train.seed" in cfg.explicit and cfg.train.seed != 0):
        return
    import logging

    seed = cfg.train.seed
    how = (
        "--val-folds trains seed K on fold K"
        if folds
        else f"it trains the seeds of --seeds (default 0); give --seeds {seed} to train that seed"
    )
    logging.getLogger(__name__).warning("%s sets train.seed = %d, which ablate does not use: %s", recipe, seed, how)


def _per_run_keys(overrides: list[str] | None, folds: bool) -> None:
    """``train.seed`` and ``model.encoder`` are set per run by ablate: an override of them would be dropped."""
    from sicot_cli.config import override_key
    from sicot_cli.errors import SicotError

    axis = {"train.seed": "--val-folds" if folds else "--seeds", "model.encoder": "--encoders"}
    for item in overrides or []:
        key = override_key(item)
        if key in axis:
            raise SicotError(
                f"the override {item!r}: ablate sets {key} for each run from {axis[key]}; drop the override and "
                f"give {axis[key]} instead"
            )


def _ablation_axes(
    encoders: str | None, seeds: str | None, encoder_module: list[str] | None, folds: str | None, data: Path | None
) -> tuple[list[str], list[int]]:
    """The encoders (each checked; default: all registered) and the seeds (or the validation folds,
    each its own seed) of ``sicot ablate``."""
    from encoders import list_encoders
    from sicot_cli.config import MAX_SEED
    from sicot_cli.errors import SicotError

    if folds is not None and (seeds is not None or data is not None):
        raise SicotError(
            f"--val-folds trains seed K on fold K, prepared from the recipe: leave {'--seeds' if seeds is not None else '--data'} out"
        )
    flag, seeds = ("--val-folds", folds) if folds is not None else ("--seeds", "0" if seeds is None else seeds)

    _load_encoder_modules(encoder_module)
    names = _axis("--encoders", encoders) or list_encoders()
    for name in names:
        _check_encoder(name)
    items = _axis(flag, seeds) or []
    if not all(re.fullmatch(r"-?[0-9]+", s.strip()) for s in items):  # int() also takes "1_0" and "٣"
        raise SicotError(f"{flag} must be comma-separated integers (digits 0-9), got {seeds!r}")
    numbers = [int(s) for s in items]
    bad = [n for n in numbers if not 0 <= n <= MAX_SEED]
    if bad:
        raise SicotError(f"{flag} must be integers from 0 to {MAX_SEED}, got {bad[0]}")
    twice = sorted({n for n in numbers if numbers.count(n) > 1})  # 1 and 01
    if twice:
        raise SicotError(f"{flag} names {', '.join(map(str, twice))} twice: each is run once")
    return names, numbers


def _run_ablation(
    cfg: Any, names: list[str], seeds: list[int], out: Path | None, keys: dict[str, Any], folds: bool = False
) -> Any:
    """The ablation (on validation folds: ``seeds`` are the folds) under live progress bars, one line
    per finished run, and the table of runs at the end."""
    from sicot_cli.ablate import ablate, ablate_folds
    from sicot_cli.console import AblationProgress, err_console
    from sicot_cli.views import ablation_row, ablation_table

    run_ablate, split = (ablate_folds, "val") if folds else (ablate, "test")
    done: list = []
    with AblationProgress(err_console) as bars:

        def on_run(status) -> None:  # noqa: ANN001
            done.append(status)
            bars.line(ablation_row(status, split))

        result = run_ablate(cfg, names, seeds, out, progress=bars, on_run=on_run, on_start=bars.start_run, **keys)
    show(ablation_table(done, split), err_console)
    return result


def _write_report(rep: Any, target: Path, figures: bool) -> list[Path]:
    """report.md/.csv/.json and per_class.csv, and the figures when asked: the files written."""
    from sicot_cli.report import write_report

    written = write_report(rep, target, figures)
    if figures:
        from sicot_cli.figures import render_all

        written += render_all(rep, target)
    return written


def _print_tables(rep: Any) -> None:
    """Tables 2-4 with the protocol line above and the verdict rule below."""
    from sicot_cli.views import report_tables

    console.print(safe(f"image-only, {rep.protocol}"), highlight=False)
    for table in report_tables(rep):
        show(table)
    if rep.gains:
        console.print(f"evidence: {rep.rule}", markup=False, highlight=False)


@app.command()
@guard
def report(
    dirs: Annotated[list[Path], typer.Argument(help="Run directories or ablation directories.", show_default=False)],
    chosen: Annotated[
        str | None, typer.Option("--encoder", help="Encoder of Tables 2 and 4 (default: bilinear, else the first).")
    ] = None,
    fmt: Annotated[str, typer.Option("--format", help="stdout format: table, markdown, csv or json.")] = "table",
    out: Annotated[
        Path | None, typer.Option(help="Where report.md/csv/json and the PNGs go (default: the first directory).")
    ] = None,
    figures: Annotated[bool, typer.Option(help="Write the PNG figures.")] = True,
    split: Annotated[
        str,
        typer.Option(
            help="test (the result) or val: the validation figures of each run's scored epoch, for choosing between "
            "settings without the test set; runs on several validation folds (data.val_fold) pair by seed within each. "
            "val prints its tables and writes no file."
        ),
    ] = "test",
    attention: Annotated[
        bool, typer.Option("--attention", help="Print the Fig. 7 view (words by attention) in the terminal.")
    ] = False,
    class_name: Annotated[
        str | None, typer.Option("--class", help="Print the words that carry a class's attention across its titles.")
    ] = None,
) -> None:
    """Tables 2-4 (with seeds: mean ± std, paired tests, bootstrap intervals), files and figures."""
    from sicot_cli.errors import SicotError
    from sicot_cli.fsutil import ensure_dir
    from sicot_cli.report import build_report, to_csv, to_json, to_markdown
    from sicot_cli.views import attention_view, class_words_table

    if fmt not in ("table", "markdown", "csv", "json"):
        raise SicotError(f"--format must be table, markdown, csv or json, got {fmt!r}")
    if split not in ("test", "val"):
        raise SicotError(f"--split must be test or val, got {split!r}")
    if fmt != "table" and (attention or class_name):  # their tables would follow the JSON/CSV on stdout
        raise SicotError(
            "--attention and --class print tables: use them with --format table (the default), and --format "
            f"{fmt} in a command of its own"
        )
    if chosen == "none":
        raise SicotError("--encoder none is the baseline, which every table compares with: name a co-trained encoder")
    if split == "val" and out is not None:
        raise SicotError(
            "--split val prints its tables and writes no file (report.md is the test result): leave --out out, "
            "and keep the output with --format markdown|csv|json > FILE"
        )
    rep = build_report(list(dirs), chosen or "bilinear", split=split)
    if chosen is not None and chosen != rep.chosen and not rep.chosen.startswith(chosen + "["):
        raise SicotError(f"--encoder {chosen!r}: no run of it here (encoders: {', '.join(rep.encoders)})")
    views = []  # computed before anything is written: a bad --class is refused with nothing written
    if attention or class_name:
        from sicot_cli import figures as fig

        run = next((r for r in rep.runs if r.encoder == rep.chosen), None)
        if run is None:
            raise SicotError(f"no run of encoder {rep.chosen!r} to show attention for")
        if attention:
            views.append(attention_view(fig.attention(run.path, n=6), run.encoder))
        if class_name:
            views.append(class_words_table(fig.class_words(fig.attention(run.path, class_name=class_name)), class_name))
    written = []
    if split == "test":
        target = out or dirs[0]
        ensure_dir(target)
        written = _write_report(rep, target, figures)
    if fmt == "table":
        _print_tables(rep)
    else:
        typer.echo(plain_text({"markdown": to_markdown, "csv": to_csv, "json": to_json}[fmt](rep)))
    for view in views:
        show(view)
    if fmt == "table" and written:
        console.print(safe("wrote " + ", ".join(str(p) for p in written)))
