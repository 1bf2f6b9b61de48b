"""The CLI surface: lazy imports, tokenize and embed end to end, and their bad input."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from conftest import KEEP_ALL
from typer.testing import CliRunner

from sicot_cli.cli import app

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_help_imports_no_heavy_library():
    code = "import sys; from sicot_cli.cli import app; heavy = {'torch', 'torchvision', 'gensim', 'jieba', 'h5py', 'matplotlib'} & set(sys.modules); print(sorted(heavy))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert run("--help").exit_code == 0


def test_every_help_reads_whole_in_an_80_column_terminal():
    """A default like `<train.runs_dir>/ablate-<name>` was wider than its help column and ended in
    an ellipsis: in 80 columns (a common terminal) the user never saw where the runs go."""
    import typer

    def commands(group, path):  # noqa: ANN001, ANN202 - click's objects
        yield path
        for name, sub in getattr(group, "commands", {}).items():
            yield from commands(sub, [*path, name])

    for path in commands(typer.main.get_command(app), []):
        r = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "80"})
        assert r.exit_code == 0 and "…" not in r.output, (path, r.output)


def test_usage_errors_are_one_red_line_naming_the_commands_help():
    """The console script (`sicot_cli.cli:main`): click's usage errors are no boxed panel."""
    cases = [
        (["train", "--bogus"], "No such option: --bogus (see `sicot train --help`)"),
        (["predict", "--run"], "Option '--run' requires an argument. (see `sicot predict --help`)"),
        (["predict", "--top", "x", "a.png"], "(see `sicot predict --help`)"),
        (["report"], "Missing argument 'dirs'. (see `sicot report --help`)"),
        (["datasets", "fetch", "--seed"], "(see `sicot datasets fetch --help`)"),
        (["nosuch"], "No such command 'nosuch'. (see `sicot --help`)"),
        (["tokenize"], "nothing to tokenize"),  # a sicot error, through the same entry point
    ]
    for args, message in cases:
        r = subprocess.run([sys.executable, "-m", "sicot_cli", *args], capture_output=True, text=True)
        assert r.returncode == 2 and r.stdout == "", args
        (line,) = r.stderr.splitlines()
        assert line.startswith("error: ") and message in line, (args, r.stderr)
    ok = subprocess.run([sys.executable, "-m", "sicot_cli", "--version"], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.startswith("sicot ")
    bare = subprocess.run([sys.executable, "-m", "sicot_cli"], capture_output=True, text=True)
    assert bare.returncode == 2 and "Usage: sicot" in bare.stdout + bare.stderr and "error" not in bare.stderr


def test_tokenize_args_and_file(tmp_path):
    r = run("tokenize", "新款包邮红色保温杯", "Red MUG!!")
    assert r.exit_code == 0
    assert "新款 | 包邮 | 红色 | 保温杯" in r.output and "red | mug" in r.output
    f = tmp_path / "titles.txt"
    f.write_text("\ufeffRed MUG!!\n白色 cup\n", encoding="utf-8")
    r = run("tokenize", "--file", str(f))
    assert r.output.splitlines() == ["red mug", "白色 cup"]
    # one output line per input line, whatever else a title holds (str.splitlines broke these up)
    f.write_text("a b\nc\x0bd\r\ne\x1cf\ng\u2028h\ni\x85j\x0ck\n\nlast", encoding="utf-8")
    r = run("tokenize", "--file", str(f))
    assert r.exit_code == 0 and r.output.split("\n") == ["a b", "c d", "e f", "g h", "i j k", "", "last", ""]


def test_tokenize_file_errors_say_it_once(tmp_path):
    f = tmp_path / "t.txt"
    f.write_bytes(b"")
    r = run("tokenize", "--file", str(f))
    assert r.exit_code == 2 and "t.txt: nothing to tokenize: the file is empty" in r.output
    f.write_bytes("red mug".encode("utf-16"))
    r = run("tokenize", "--file", str(f))
    assert r.exit_code == 2 and r.output.count("save it as UTF-8") == 1, r.output


def test_tokenize_with_vocabulary_of_a_prepared_dataset(tmp_path, manifest):
    out = tmp_path / "p.h5"
    assert run("prepare", "--manifest", str(manifest), "--out", str(out), *KEEP_ALL).exit_code == 0
    r = run("tokenize", "--plain", "--data", str(out), "red cat unseenword")
    assert r.output.strip() == "red cat [unseenword]"
    # the table's legend keeps its "[word]" (rich read it as markup: "(: not kept)"); --no-plain
    # asks for the table with --file too (it was ignored)
    f = tmp_path / "t.txt"
    f.write_text("red cat unseenword\n", encoding="utf-8")
    r = run("tokenize", "--file", str(f), "--no-plain", "--data", str(out))
    assert "([word]: not kept)" in r.output and "[unseenword]" in r.output and "┃" in r.output, r.output


def test_tokenize_errors(tmp_path):
    r = run("tokenize")
    assert r.exit_code == 2 and "nothing to tokenize" in r.output
    r = run("tokenize", "--data", str(tmp_path / "no.h5"), "x")
    assert r.exit_code == 2 and "no.h5: prepared dataset not found" in r.output


def _neighbour_rows(output: str) -> list[tuple[str, float]]:
    """The (word, cosine) rows of ``embed --neighbours``'s table."""
    rows = re.findall(r"^\W*?(\S+)\s*[│|]\s*(-?\d+\.\d{3})\s*[│|]?\s*$", output, flags=re.MULTILINE)
    return [(w, float(s)) for w, s in rows]


def test_embed_report_save_and_neighbours(tmp_path, manifest):
    vec = tmp_path / "v.txt"
    r = run("embed", f"data.manifest={manifest}", "data.source=manifest", *KEEP_ALL, "--out", str(vec))
    assert r.exit_code == 0, r.output
    assert "vocabulary (before -> after filter)" in r.output and "0% most spread over labels" in r.output
    assert "WARNING" not in r.output, r.output  # gensim's "attribute count not present in KeyedVectors" was noise
    header = vec.read_text(encoding="utf-8").splitlines()[0].split()
    assert header[1] == "8" and int(header[0]) > 10
    r = run("embed", "--neighbours", "cat", "--vectors", str(vec), "--top", "3")
    assert r.exit_code == 0, r.output
    rows = _neighbour_rows(r.output)
    vocab = {ln.split()[0] for ln in vec.read_text(encoding="utf-8").splitlines()[1:]}
    assert len(rows) == 3 and all(w in vocab and w != "cat" for w, _ in rows), r.output
    sims = [s for _, s in rows]
    assert sims == sorted(sims, reverse=True) and all(-1 <= s <= 1 for s in sims), r.output
    # a file with known cosines: kitten 0.9/sqrt(0.82) = 0.994, dog 0, car -1 (not among the top 2)
    known = tmp_path / "known.txt"
    known.write_text("4 2\ncat 1 0\nkitten 0.9 0.1\ndog 0 1\ncar -1 0\n", encoding="utf-8")
    r = run("embed", "--neighbours", "cat", "--vectors", str(known), "--top", "2")
    assert r.exit_code == 0 and _neighbour_rows(r.output) == [("kitten", 0.994), ("dog", 0.0)], r.output
    # a word given twice is read once; a zero vector has no cosine: neither is listed as None / nan
    odd = tmp_path / "odd.txt"
    odd.write_text("4 2\ncat 1 0\ndog 0 1\ncat 0 1\nzero 0 0\n", encoding="utf-8")
    r = run("embed", "--neighbours", "dog", "--vectors", str(odd))
    assert r.exit_code == 0 and _neighbour_rows(r.output) == [("cat", 0.0)], r.output
    r = run("embed", "--neighbours", "zero", "--vectors", str(odd))
    assert r.exit_code == 2 and "'zero' has a zero or non-finite vector" in r.output, r.output
    # typed as a user types it: looked up as the tokenizer writes it (every title was lower-cased)
    r = run("embed", "--neighbours", " CAT ", "--vectors", str(known), "--top", "2")
    assert r.exit_code == 0 and _neighbour_rows(r.output) == [("kitten", 0.994), ("dog", 0.0)], r.output
    r = run("embed", "--neighbours", "zebra", "--vectors", str(vec))
    assert r.exit_code == 2 and "'zebra' is not in the vocabulary" in r.output
    # --vectors and embed.pretrained read through the same loader (word2vec.load_word2vec_file)
    (tmp_path / "bad.txt").write_text("not a vector file\n", encoding="utf-8")
    r = run("embed", "--neighbours", "cat", "--vectors", str(tmp_path / "bad.txt"))
    assert (
        r.exit_code == 2
        and "bad.txt: not a word2vec text file (ValueError: " in r.output
        and "--binary for a binary file" in r.output
    ), r.output
    r = run("embed", "--neighbours", "cat", "--vectors", str(tmp_path / "gone.txt"))
    assert r.exit_code == 2 and "gone.txt: word vectors not found" in r.output, r.output


def test_embed_pretrained_vectors_and_oov(tmp_path, manifest):
    pre = tmp_path / "pre.txt"
    pre.write_text("2 3\nred 1 0 0\ncat 0 1 0\n", encoding="utf-8")
    r = run("embed", f"data.manifest={manifest}", "data.source=manifest", *KEEP_ALL, f"embed.pretrained={pre}")
    assert r.exit_code == 0, r.output
    assert "pretrained pre.txt, dim 3" in r.output
    assert "vocabulary OOV" in r.output and "words (" in r.output
    bad = tmp_path / "bad.txt"
    bad.write_text("not a vector file\n")
    r = run("embed", f"data.manifest={manifest}", "data.source=manifest", *KEEP_ALL, f"embed.pretrained={bad}")
    assert r.exit_code == 2 and "bad.txt: not a word2vec text file" in r.output


def test_embed_with_a_word2vec_corpus_reports_its_coverage(tmp_path, manifest):
    corpus = tmp_path / "words.txt"
    corpus.write_text("red kitten\nzebra crossing\n", encoding="utf-8")
    args = ("embed", f"data.manifest={manifest}", "data.source=manifest", *KEEP_ALL)
    r = run(*args, f"embed.corpus={corpus}")
    out = " ".join(r.output.split())
    assert r.exit_code == 0 and "trained on training titles and 2 sentences of words.txt" in out, r.output
    assert "vocabulary words in the corpus │ 1 of " in out and "vocabulary OOV" not in out, r.output
    r = run(*args)
    assert r.exit_code == 0 and "in the corpus" not in r.output and "vocabulary OOV" in r.output


def test_embed_data_says_where_a_recorded_path_came_from(tmp_path, manifest, monkeypatch):
    monkeypatch.chdir(manifest.parent)  # prepared with a relative manifest path...
    r = run("prepare", "--manifest", "m.csv", "--out", str(tmp_path / "d.h5"), *KEEP_ALL)
    assert r.exit_code == 0, r.output
    monkeypatch.chdir(tmp_path)  # ...and read again from another folder
    r = run("embed", "--data", "d.h5")
    flat = " ".join(r.output.split())
    assert r.exit_code == 2 and "m.csv: manifest not found" in flat, r.output
    assert "the path is recorded in d.h5 as `prepare` was given it, relative to the folder it ran in" in flat
    assert run("embed", "--data", "d.h5", f"data.manifest={manifest}").exit_code == 0


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--data", "d.h5", "--manifest", "m.csv"], "so --manifest would not be used"),
        (["--data", "d.h5", "--recipe", "r.toml"], "so --recipe would not be used"),
        (["--manifest", "m.csv", "--vectors", "v.txt"], "--vectors/--binary are for --neighbours"),
        (["--neighbours", "red", "--data", "d.h5", "--vectors", "v.txt"], "not both: give one"),
        (["--neighbours", "red", "--vectors", "v.txt", "--out", "o.txt"], "--out: not used with --neighbours"),
        (["--neighbours", "red", "--data", "d.h5", "--manifest", "m.csv"], "--manifest: not used with --neighbours"),
        (["--neighbours", "red", "--data", "d.h5", "--binary"], "--binary describes the --vectors file"),
    ],
)
def test_embed_refuses_options_its_mode_would_ignore(args, needle, tmp_path, monkeypatch):
    """Each was ignored without a word: the vectors of --data shown for --vectors, --manifest left out..."""
    monkeypatch.chdir(tmp_path)
    r = run("embed", *args)
    assert r.exit_code == 2 and needle in " ".join(r.output.split()), r.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (
            ["train", "--threads", "2", "train.threads=4"],
            "--threads 2 and the override 'train.threads=4' both set train.threads",
        ),
        (
            ["train", "--encoder", "mean", "model.encoder=bilinear"],
            "--encoder mean and the override 'model.encoder=bilinear'",
        ),
        (["prepare", "--workers", "2", "data.workers=1"], "--workers 2 and the override 'data.workers=1' both set"),
        (
            ["prepare", "--strict", "data.strict=false"],
            "--strict and the override 'data.strict=false' both set data.strict",
        ),
        (
            ["prepare", "--manifest", "m.csv", "data.source=demo"],
            "--manifest m.csv and the override 'data.source=demo'",
        ),
        (["embed", "--manifest", "m.csv", "data.manifest=o.csv"], "and the override 'data.manifest=o.csv' both set"),
        (
            ["decouple", "r", "--method", "crt", "decouple.method=lws"],
            "--method crt and the override 'decouple.method=lws'",
        ),
        (
            ["ablate", "--threads", "1", "train.threads = 2"],
            "--threads 1 and the override 'train.threads = 2' both set",
        ),
        (["ablate", "--seeds", "0", "train.seed=5"], "ablate sets train.seed for each run from --seeds; drop the"),
        (["ablate", "model.encoder=mean"], "ablate sets model.encoder for each run from --encoders; drop the"),
        (["ablate", "--val-folds", "0,1", "train.seed=1"], "train.seed for each run from --val-folds"),
    ],
)
def test_an_option_and_an_override_of_the_same_key_are_refused(args, needle, tmp_path, monkeypatch):
    """The override won without a word (``--threads 2 train.threads=4`` trained on 4 threads, ablate's
    ``train.seed=5`` trained seed 0): now one red line naming both, before anything is read or written.
    Two overrides of one key stay as they were: the last wins, as a repeated option does."""
    monkeypatch.chdir(tmp_path)
    r = run(*args)
    assert r.exit_code != 0 and needle in " ".join(r.output.split()), r.output
    assert "Traceback" not in r.output
    assert list(tmp_path.iterdir()) == []


def test_an_override_may_replace_what_manifest_only_defaults(tmp_path, monkeypatch):
    """--manifest names the output after the manifest; ``data.out=`` is the way to change that, not a conflict."""
    from sicot_cli.cli import _manifest_extras, _recipe

    mine = ["data.out=elsewhere.h5", "name=mine", 'eval.boundaries="fixed"']
    cfg = _recipe(None, mine, _manifest_extras(tmp_path / "m.csv", mine))
    assert (cfg.data.out, cfg.name, cfg.eval.boundaries) == ("elsewhere.h5", "mine", "fixed")
    assert cfg.data.source == "manifest" and cfg.data.manifest == str(tmp_path / "m.csv")


def test_prepare_out_with_another_suffix_is_a_folder_and_says_so(tmp_path, caplog):
    import logging

    from sicot_cli.cli import _out_file

    with caplog.at_level(logging.WARNING, logger="sicot_cli.cli"):
        assert _out_file(tmp_path / "x.h5", "m") == tmp_path / "x.h5"
        assert _out_file(tmp_path / "plain", "m") == tmp_path / "plain" / "m.h5"
        assert not caplog.records
        assert _out_file(tmp_path / "x.hdf", "m") == tmp_path / "x.hdf" / "m.h5"
    (record,) = caplog.records
    assert "x.hdf: not an .h5 name, so it is taken as a folder to hold m.h5" in record.message


@pytest.mark.parametrize(
    ("seeds", "folds", "said"),
    [
        (True, False, "give --seeds 3 to train that seed"),
        (True, True, "--val-folds trains seed K on fold K"),
        (False, False, None),
    ],
)
def test_a_recipes_own_seed_that_ablate_does_not_train_is_named(seeds, folds, said, tmp_path, caplog):
    """A recipe file's ``train.seed = 3`` was dropped without a word by ablate (it trains --seeds,
    default 0, or seed K on fold K); with --seeds given there is nothing to say."""
    from sicot_cli.cli import _recipe, _unused_recipe_seed

    (tmp_path / "r.toml").write_text("[train]\nseed = 3\n", encoding="utf-8")
    cfg = _recipe(tmp_path / "r.toml", [])
    with caplog.at_level("WARNING"):
        _unused_recipe_seed(cfg, tmp_path / "r.toml", seeds, folds)
    warned = [r.getMessage() for r in caplog.records if "train.seed = 3" in r.getMessage()]
    assert (said in warned[0]) if said else not warned
