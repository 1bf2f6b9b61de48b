import json
from pathlib import Path

import pytest

from sicot_cli.config import Recipe, load_recipe, parse_override_value
from sicot_cli.errors import SicotError

ROOT = Path(__file__).resolve().parents[1]


def test_demo_recipe_is_the_embedded_default():
    assert load_recipe(ROOT / "recipes" / "demo.toml") == load_recipe(None)
    assert load_recipe(None).data.source == "synthetic"


def test_defaults_are_the_papers_optimiser():
    t = Recipe().train
    assert (t.batch_size, t.lr, t.momentum, t.step_size, t.gamma, t.lam) == (256, 0.1, 0.9, 1, 0.8, 1.0)


def test_overrides_are_typed():
    r = load_recipe(
        None,
        ["data.image_size=32", "name=x", "data.source=manifest", "data.manifest=m.csv", "text.drop_most_frequent=0"],
    )
    assert r.data.image_size == 32 and r.name == "x" and r.data.source == "manifest"
    assert r.text.drop_most_frequent == 0.0 and isinstance(r.text.drop_most_frequent, float)
    assert parse_override_value("[1, 3]") == [1, 3]
    assert parse_override_value("resnet50") == "resnet50"
    assert parse_override_value('"quoted"') == "quoted"


def test_recipe_paths_resolve_against_the_recipe(tmp_path):
    p = tmp_path / "sub" / "r.toml"
    p.parent.mkdir()
    p.write_text('[data]\nsource = "manifest"\nmanifest = "m.csv"\n[embed]\npretrained = "v.txt"\ncorpus = "w.txt"\n')
    r = load_recipe(p)
    assert r.data.manifest == str(p.parent / "m.csv")
    assert r.embed.pretrained == str(p.parent / "v.txt") and r.embed.corpus == str(p.parent / "w.txt")
    assert load_recipe(p, ["embed.corpus=mine.txt"]).embed.corpus == "mine.txt"
    # a bare value for a text key is the text typed, even when TOML would read a number or a date
    assert load_recipe(p, ["embed.corpus=5", "name=2024-01-02"]).embed.corpus == "5"
    assert load_recipe(p, ["name=2024-01-02"]).name == "2024-01-02"
    # overrides given on the command line stay relative to the working directory
    assert load_recipe(p, ["data.manifest=other.csv"]).data.manifest == "other.csv"


def test_a_rule_broken_by_an_override_blames_the_override(tmp_path):
    with pytest.raises(SicotError, match="^override 'name=': name must be a non-empty file-name part"):
        load_recipe(None, ["name="])
    p = tmp_path / "r.toml"
    p.write_text('name = "a/b"\n')
    with pytest.raises(SicotError, match="r.toml: name must be a non-empty file-name part"):
        load_recipe(p, ["train.lr=0.1"])  # the recipe's own value: the recipe is named
    p.write_text("[text]\ndrop_most_frequent = 0.05\n")
    with pytest.raises(
        SicotError,
        match=r"^override 'text.drop_least_frequent=0.96' \(applied to .*r.toml\): text.drop_most_frequent \+ text.drop_least_frequent must be < 1",
    ):
        load_recipe(p, ["text.drop_least_frequent=0.96"])  # a rule tying two keys: the override that broke it
    with pytest.raises(
        SicotError, match=r"^override 'data.synthetic.max_per_class=3': data.synthetic.min_per_class must be"
    ):
        load_recipe(None, ["data.synthetic.max_per_class=3"])
    with pytest.raises(SicotError, match=r"^override 'preset=nope': preset must be one of"):
        load_recipe(None, ["preset=nope"])


def test_a_manifest_with_the_synthetic_source_is_refused(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text('[data]\nmanifest = "m.csv"\n')
    with pytest.raises(
        SicotError, match="data.manifest is set .* but data.source is 'synthetic', which would ignore it"
    ):
        load_recipe(p)
    with pytest.raises(SicotError, match='set data.source = "manifest"'):
        load_recipe(None, ["data.manifest=m.csv"])
    assert load_recipe(None, ["data.manifest=m.csv", "data.source=manifest"]).data.source == "manifest"


@pytest.mark.parametrize(
    "text, message",
    [
        ("[data]\nimage_sise = 3\n", "unknown key 'data.image_sise'"),
        ('[data]\nimage_size = "big"\n', "data.image_size must be an integer, got 'big'"),
        ("[data]\nimage_size = 4\n", "data.image_size must be >= 8, got 4"),
        ("[data]\nstrict = 1\n", "data.strict must be a boolean"),
        ("data = 3\n", "[data] must be a table, got 3"),
        # values as TOML writes them, not as Python's repr
        ("name = 2026-01-01\n", "name must be a string, got 2026-01-01 (a TOML date/time)"),
        ("[train]\nlr = { a = 1 }\n", "train.lr must be a number, got a table"),
        ("[train]\ntopk = [1, true]\n", "train.topk[1] must be an integer, got true"),
        ("[data\n", "not valid TOML"),
        ("[text]\ndrop_most_frequent = 0.6\ndrop_least_frequent = 0.5\n", "must be < 1"),
        (
            "[data.synthetic]\npretrain_classes = 3100\n",
            "data.synthetic.pretrain_classes must be between 0 and 3200 - data.synthetic.num_classes",
        ),
        ("[data.synthetic]\npretrain_per_class = 0\n", "data.synthetic.pretrain_per_class must be >= 1"),
    ],
)
def test_bad_recipes_name_the_key_and_file(tmp_path, text, message):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(SicotError) as e:
        load_recipe(p)
    assert message in str(e.value) and str(p) in str(e.value)


def test_a_recipe_section_that_is_no_table_is_the_recipes_fault_not_the_overrides(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("data = 3\n")
    with pytest.raises(SicotError) as e:
        load_recipe(p, ["data.image_size=32"])
    assert str(e.value) == f"{p}: [data] must be a table, got 3"


def test_a_bad_override_value_is_the_overrides_fault_not_the_recipes(tmp_path):
    p = tmp_path / "good.toml"
    p.write_text("[train]\nlr = 0.05\n")
    for item, message in (
        ("train.lr=1e400", "train.lr must be a finite number, got inf"),
        ("train.batch_size=0", "train.batch_size must be >= 2, got 0"),
        ("train.lr=abc", "train.lr must be a number, got 'abc'"),
    ):
        for recipe in (p, None):
            with pytest.raises(SicotError) as e:
                load_recipe(recipe, [item])
            assert str(e.value) == f"override {item!r}: {message}"


def test_bad_overrides():
    with pytest.raises(SicotError, match="unknown override key 'train.lrate'"):
        load_recipe(None, ["train.lrate=0.1"])
    with pytest.raises(SicotError, match="train.batch_size must be >= 2"):
        load_recipe(None, ["train.batch_size=0"])
    with pytest.raises(SicotError, match="train.batch_size must be >= 2"):
        load_recipe(None, ["train.batch_size=-4"])
    with pytest.raises(SicotError, match="unknown override key 'data.nope'"):
        load_recipe(None, ["data.nope=1"])
    with pytest.raises(SicotError, match="expected section.key=value"):
        load_recipe(None, ["data.image_size"])
    with pytest.raises(SicotError, match="data.image_size must be an integer"):
        load_recipe(None, ["data.image_size=big"])


def test_missing_and_non_utf8_recipe(tmp_path):
    with pytest.raises(SicotError, match="recipe not found"):
        load_recipe(tmp_path / "nope.toml")
    p = tmp_path / "latin1.toml"
    p.write_bytes(b'name = "caf\xe9"\n')
    with pytest.raises(SicotError, match="not UTF-8"):
        load_recipe(p)


def test_resolved_recipe_is_json():
    assert json.loads(Recipe().to_json())["data"]["synthetic"]["num_classes"] == 120


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ('data.source="sql"', "data.source must be synthetic or manifest, got 'sql'"),
        ('model.semantic_norm="layernorm"', "model.semantic_norm must be batchnorm or none, got 'layernorm'"),
        ('train.in_memory="maybe"', "train.in_memory must be auto, yes or no, got 'maybe'"),
        ("eval.select=1", "eval.select must be last or best, got 1"),
        ("data.val_fraction=0.6", "data.val_fraction must be <= 0.5, got 0.6"),
    ],
)
def test_a_field_with_choices_lists_them(override, message):
    """Choices and bounds are declared on the field (Literal / Range) and named in the error."""
    from sicot_cli.config import load_recipe

    with pytest.raises(SicotError) as e:
        load_recipe(None, [override])
    assert str(e.value).endswith(message)


def test_fractions_of_counts_floor_the_decimal_written():
    """0.41 of 300 validation rows were 122 (the float product is 122.99999999999999), and a DRW
    start of 0.7 of 90 epochs was epoch 62: floor of the decimal the user wrote."""
    from sicot_cli.config import TrainConfig, floor_share

    assert (0.41 * 300, floor_share(0.41, 300)) == (122.99999999999999, 123)
    assert [floor_share(f, n) for f, n in ((0.29, 100), (0.35, 180), (0.1, 2000), (0.0, 7), (1.0, 7))] == [
        29,
        63,
        200,
        0,
        7,
    ]
    cfg = TrainConfig(epochs=90, drw_start=0.7, cotrain_after=0.7)
    assert (cfg.drw_epoch, cfg.image_only_epochs) == (63, 63)


def test_a_shipped_recipe_is_found_by_name_from_any_folder(tmp_path, monkeypatch):
    """Outside a checkout (an installed wheel) `--recipe recipes/emoji-zh.toml` names no file: the
    shipped recipes answer to their names, their paths read as in a checkout's recipes/ folder,
    so the manifest is where `sicot datasets fetch emoji` writes it from the same folder."""
    from sicot_cli.config import builtin_recipes

    monkeypatch.chdir(tmp_path)
    assert {"demo", "emoji-zh", "mdi", "product-manifest"} <= set(builtin_recipes())
    manifest = tmp_path / "data" / "emoji" / "emoji-zh.csv"
    manifest.parent.mkdir(parents=True)
    manifest.write_text("image,title,label\n")
    for name in ("emoji-zh", "emoji-zh.toml"):
        r = load_recipe(Path(name))
        # openable here, where there is no recipes/ folder (recipes/../data/... could not be opened)
        assert Path(r.data.manifest) == Path("data/emoji/emoji-zh.csv") and Path(r.data.manifest).is_file()
        assert r.name == "emoji-zh"
    (tmp_path / "emoji-zh.toml").write_text('name = "mine"\n')  # a file of that name is the user's
    assert load_recipe(Path("emoji-zh.toml")).name == "mine"
    (tmp_path / "mdi").mkdir()  # a folder (or a broken link) of a built-in's name is no recipe: the built-in
    (tmp_path / "demo").symlink_to(tmp_path / "gone")
    assert load_recipe(Path("mdi")).name == "mdi" and load_recipe(Path("demo")).name == "demo"
    with pytest.raises(
        SicotError, match=r"nope: recipe not found \(a \.toml file, or a built-in recipe by name: .*emoji-zh"
    ):
        load_recipe(Path("nope"))
    with pytest.raises(SicotError, match="recipe not found"):
        load_recipe(Path("sub") / "emoji-zh.toml")  # a path with a folder is a file, never a built-in


def test_a_leading_tilde_in_a_path_key_is_the_home_folder(tmp_path, monkeypatch):
    """A TOML string, and bash after `key=`, keep `~`: it made a folder named `~` in the working folder."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    r = load_recipe(None, ["data.out=~/d.h5", "train.runs_dir=~/runs", "model.pretrained=~/w.pt"])
    assert (r.data.out, r.train.runs_dir, r.model.pretrained) == (
        str(tmp_path / "home" / "d.h5"),
        str(tmp_path / "home" / "runs"),
        str(tmp_path / "home" / "w.pt"),
    )
    f = tmp_path / "r.toml"
    f.write_text('[data]\nsource = "manifest"\nmanifest = "~/m.csv"\n')
    assert load_recipe(f).data.manifest == str(tmp_path / "home" / "m.csv")  # not joined to the recipe's folder
    with pytest.raises(SicotError, match="~nosuchuser names no home folder"):
        load_recipe(None, ["data.out=~nosuchuser/d.h5"])
