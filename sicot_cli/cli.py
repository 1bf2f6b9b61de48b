"""The ``sicot`` command line: each command parses options, loads the recipe, calls ONE library
function and prints. Heavy libraries (torch, gensim, jieba, h5py) are imported inside the commands
so ``sicot --help`` stays instant."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sicot_cli.console import console, guard, setup_logging

app = typer.Typer(
    name="sicot",
    help="Side-information co-training (SICoT, CIKM'20) for long-tailed product recognition.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

RecipeOpt = Annotated[Path | None, typer.Option("--recipe", "-r", help="TOML recipe (default: the built-in demo recipe).")]
Overrides = Annotated[list[str] | None, typer.Argument(help="Recipe overrides: section.key=value (e.g. data.image_size=64).", show_default=False)]


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    setup_logging(verbose)


def _recipe(recipe: Path | None, overrides: list[str] | None, extra: list[str] | None = None):  # noqa: ANN202
    from sicot_cli.config import load_recipe

    return load_recipe(recipe, [*(extra or []), *(overrides or [])])


def _out_file(out: Path | None, name: str) -> Path | None:
    """``--out`` may name the .h5 file or a folder to put ``<name>.h5`` in."""
    if out is None or out.suffix.lower() in (".h5", ".hdf5"):
        return out
    return out / f"{name}.h5"


@app.command()
@guard
def prepare(
    recipe: RecipeOpt = None,
    manifest: Annotated[Path | None, typer.Option(help="CSV/JSONL manifest (image,title,label[,split][,id]); default settings, no recipe needed.")] = None,
    out: Annotated[Path | None, typer.Option(help="Output .h5 file, or a folder for <recipe name>.h5 (default: data.out).")] = None,
    force: Annotated[bool, typer.Option(help="Rebuild an existing output.")] = False,
    strict: Annotated[bool, typer.Option(help="Stop at the first unusable row instead of skipping it.")] = False,
    workers: Annotated[int | None, typer.Option(help="Decode processes (default: data.workers, 0 = all cores).")] = None,
    overrides: Overrides = None,
) -> None:
    """Read raw images and titles into one HDF5 file (the only command that reads raw data)."""
    from sicot_cli.console import RichProgress
    from sicot_cli.data.prepare import prepare as run_prepare
    from sicot_cli.views import prepare_table

    extra = []
    if manifest is not None:
        extra = ["data.source=\"manifest\"", f"data.manifest={_toml_str(str(manifest))}", f"name={_toml_str(manifest.stem)}"]
    if strict:
        extra.append("data.strict=true")
    if workers is not None:
        extra.append(f"data.workers={workers}")
    cfg = _recipe(recipe, overrides, extra)
    summary = run_prepare(cfg, _out_file(out, cfg.name), force=force, progress=RichProgress())
    console.print(prepare_table(summary))


def _toml_str(value: str) -> str:
    import json

    return json.dumps(value, ensure_ascii=False)


@app.command()
@guard
def tokenize(
    texts: Annotated[list[str] | None, typer.Argument(help="Titles to tokenize.", show_default=False)] = None,
    file: Annotated[Path | None, typer.Option("--file", "-f", help="A UTF-8 file with one title per line.")] = None,
    data: Annotated[Path | None, typer.Option(help="A prepared .h5: also show which tokens its vocabulary keeps.")] = None,
    workers: Annotated[int, typer.Option(help="Processes for large inputs (0 = all cores).")] = 0,
    plain: Annotated[bool, typer.Option(help="One line of space-separated tokens per title (default for --file).")] = False,
) -> None:
    """Split titles into words: jieba for Chinese, lower-cased latin words and numbers."""
    from sicot_cli.data.tokenize import tokenize_many
    from sicot_cli.errors import SicotError

    titles = list(texts or [])
    if file is not None:
        try:
            titles += file.read_bytes().decode("utf-8-sig", errors="replace").splitlines()
        except OSError as e:
            raise SicotError(f"{file}: cannot read ({e.strerror})") from None
        plain = True
    if not titles:
        raise SicotError("nothing to tokenize: give titles as arguments or --file FILE")
    vocab = None
    if data is not None:
        from sicot_cli.data.dataset import open_prepared

        vocab = set(open_prepared(data).words[1:])
    tokens = tokenize_many(titles, workers)
    if plain:
        for toks in tokens:
            shown = toks if vocab is None else [t if t in vocab else f"[{t}]" for t in toks]
            typer.echo(" ".join(shown))
        return
    from rich.markup import escape
    from rich.table import Table

    table = Table("title", "tokens", *(["kept by the vocabulary"] if vocab is not None else []))
    for title, toks in zip(titles, tokens, strict=True):
        row = [escape(title), escape(" | ".join(toks))]
        if vocab is not None:
            row.append(" | ".join(f"[green]{escape(t)}[/]" if t in vocab else f"[red strike]{escape(t)}[/]" for t in toks))
        table.add_row(*row)
    console.print(table)


@app.command()
@guard
def embed(
    recipe: RecipeOpt = None,
    out: Annotated[Path | None, typer.Option(help="Write the vectors here (word2vec text format).")] = None,
    neighbours: Annotated[str | None, typer.Option("--neighbours", help="Print the nearest words to WORD instead.")] = None,
    data: Annotated[Path | None, typer.Option(help="With --neighbours: a prepared .h5 whose vectors to use.")] = None,
    vectors: Annotated[Path | None, typer.Option(help="With --neighbours: a word2vec file whose vectors to use.")] = None,
    binary: Annotated[bool, typer.Option(help="--vectors is in word2vec binary format.")] = False,
    top: Annotated[int, typer.Option(help="How many neighbours.")] = 10,
    overrides: Overrides = None,
) -> None:
    """Build the vocabulary from the training titles and train (or load) word2vec vectors."""
    from sicot_cli.console import RichProgress
    from sicot_cli.data import embed as lib

    if neighbours is not None:
        from rich.table import Table

        table = Table("word", "cosine", title=f"nearest words to {neighbours!r}", title_justify="left")
        for word, sim in lib.neighbours(neighbours, top, data=data, vectors=vectors, binary=binary):
            table.add_row(word, f"{sim:.3f}")
        console.print(table)
        return
    from sicot_cli.views import embed_table

    summary = lib.embed(_recipe(recipe, overrides), out, progress=RichProgress())
    console.print(embed_table(summary))


def _encoder_names() -> list[str]:
    from encoders import list_encoders

    return ["none", *list_encoders()]


EncoderModule = Annotated[list[str] | None, typer.Option("--encoder-module", help="A .py file or dotted module whose @register_encoder functions become --encoder names.")]


def _load_encoder_modules(specs: list[str] | None) -> None:
    if specs:
        from encoders import load_encoder_module

        for spec in specs:
            load_encoder_module(spec)


def _check_encoder(name: str) -> None:
    from sicot_cli.errors import SicotError

    if name not in _encoder_names():
        raise SicotError(f"unknown encoder {name!r} (choices: {', '.join(_encoder_names())})")


@app.command()
@guard
def train(
    recipe: RecipeOpt = None,
    encoder: Annotated[str | None, typer.Option(help="Text encoder, or 'none' for the image-only baseline (default: model.encoder).", autocompletion=lambda: _encoder_names())] = None,
    encoder_module: EncoderModule = None,
    data: Annotated[Path | None, typer.Option(help="Prepared .h5 (default: data.out).")] = None,
    run_dir: Annotated[Path | None, typer.Option(help="Run directory (default: <train.runs_dir>/<name>-<encoder>-s<seed>).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue an existing run from its last checkpoint.")] = False,
    overrides: Overrides = None,
) -> None:
    """Train one run: the baseline (--encoder none) or SICoT co-training with a text encoder."""
    from sicot_cli.console import RichProgress, err_console
    from sicot_cli.train import train as run_train
    from sicot_cli.views import epochs_table

    _load_encoder_modules(encoder_module)
    cfg = _recipe(recipe, overrides, [f"model.encoder={_toml_str(encoder)}"] if encoder else [])
    _check_encoder(cfg.model.encoder)
    result = run_train(cfg, run_dir, resume=resume, data=data, progress=RichProgress())
    if result.skipped:
        console.print(f"{result.run_dir}: already finished; nothing to do")
    console.print(epochs_table(result.history, str(result.run_dir)))
    if result.interrupted:
        err_console.print(f"[yellow]interrupted: checkpoint saved; continue with[/] sicot train --resume --run-dir {result.run_dir} ...")
        raise typer.Exit(130)


@app.command()
@guard
def evaluate(
    run: Annotated[Path, typer.Option(help="Run directory.")],
    checkpoint: Annotated[str, typer.Option(help="last or best.")] = "last",
    data: Annotated[Path | None, typer.Option(help="Prepared .h5 (default: the run's).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    json_out: Annotated[bool, typer.Option("--json", help="Print the metrics as JSON.")] = False,
) -> None:
    """Re-score a run's checkpoint on its test set (image only)."""
    import json

    from sicot_cli.evaluate import evaluate_run
    from sicot_cli.views import metrics_table

    result = evaluate_run(run, checkpoint, data, device)
    if json_out:
        typer.echo(json.dumps(result.scalars(), indent=2))
    else:
        console.print(metrics_table(result.scalars(), f"{run} ({checkpoint})"))


@app.command()
@guard
def predict(
    images: Annotated[list[Path], typer.Argument(help="Image files.", show_default=False)],
    run: Annotated[Path, typer.Option(help="Run directory.")],
    top: Annotated[int, typer.Option("--top", "-k", help="How many classes per image.")] = 3,
    checkpoint: Annotated[str, typer.Option(help="last or best.")] = "last",
    data: Annotated[Path | None, typer.Option(help="Prepared .h5 (default: the run's).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Recognise products from images alone; show each predicted class's title."""
    from sicot_cli.predict import predict as run_predict
    from sicot_cli.predict import predictions_json
    from sicot_cli.views import predictions_table

    preds = run_predict(run, list(images), top, checkpoint, data, device)
    if json_out:
        typer.echo(predictions_json(preds))
    else:
        console.print(predictions_table(preds))


@app.command()
@guard
def export(
    run: Annotated[Path, typer.Option(help="Run directory.")],
    out: Annotated[Path, typer.Option(help="Output TorchScript file (.pt).")],
    checkpoint: Annotated[str, typer.Option(help="last or best.")] = "last",
    data: Annotated[Path | None, typer.Option(help="Prepared .h5 (default: the run's).")] = None,
) -> None:
    """Write the image-only model as TorchScript, loadable with torch alone."""
    from sicot_cli.predict import export as run_export

    path = run_export(run, out, checkpoint, data)
    console.print(f"wrote {path} and {path.with_suffix('.classes.json')} (torch.jit.load; input uint8 [B, 3, S, S])")
