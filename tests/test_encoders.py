"""The text encoders: the shared contract (parametrised over the registry), hand-computed
references for each encoder, the registry's errors and plug-in modules."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from encoders import (
    TextEncoder,
    create_encoder,
    list_encoders,
    load_encoder_module,
    register_encoder,
    registry,
)
from sicot_cli.errors import SicotError

BUILTIN = ["bilinear", "bilstm", "bilstm_attention", "mean"]
ORDER_INVARIANT = {"mean", "bilinear"}
ORDER_SENSITIVE = {"bilstm", "bilstm_attention"}
VOCAB, DIM, OUT = 40, 8, 6


@pytest.fixture(autouse=True)
def clean_registry() -> Iterator[None]:
    """Whatever a test registers or loads is forgotten afterwards: other tests see the 4 names."""
    encoders_before = dict(registry._ENCODERS)
    loaded_before = dict(registry._LOADED)
    yield
    registry._ENCODERS.clear()
    registry._ENCODERS.update(encoders_before)
    registry._LOADED.clear()
    registry._LOADED.update(loaded_before)


@pytest.fixture
def vectors() -> torch.Tensor:
    return torch.randn(VOCAB, DIM, generator=torch.Generator().manual_seed(0))


def _build(name: str, vectors: torch.Tensor, **kw: object) -> TextEncoder:
    torch.manual_seed(1)
    return create_encoder(name, vectors=vectors, out_dim=OUT, **kw)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Four left-aligned titles of lengths 5, 2, 0 (empty) and 3, padded to 5."""
    tokens = torch.tensor(
        [
            [3, 7, 1, 12, 5],
            [9, 4, 0, 0, 0],
            [0, 0, 0, 0, 0],
            [20, 2, 33, 0, 0],
        ]
    )
    return tokens, tokens != 0


def test_builtin_names_exactly() -> None:
    assert list_encoders() == BUILTIN


# ---------------------------------------------------------------- the contract, for every encoder


@pytest.mark.parametrize("name", list_encoders())
def test_forward_shape_dtype_finite(name: str, vectors: torch.Tensor) -> None:
    enc = _build(name, vectors)
    tokens, mask = _batch()
    out = enc(tokens, mask)
    assert out.shape == (4, OUT)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert enc.out_dim == OUT and enc.embed_dim == DIM
    assert isinstance(enc.has_attention, bool)
    # The embedding starts as a copy of the vectors, not a view the optimiser would write through.
    assert torch.equal(enc.embedding.weight, vectors)
    assert enc.embedding.weight.data_ptr() != vectors.data_ptr()
    assert enc.embedding.padding_idx == 0


@pytest.mark.parametrize("name", list_encoders())
def test_gradients_reach_embedding_and_every_parameter(name: str, vectors: torch.Tensor) -> None:
    enc = _build(name, vectors)
    tokens, mask = _batch()
    weights = torch.randn(4, OUT, generator=torch.Generator().manual_seed(2))
    (enc(tokens, mask) * weights).sum().backward()
    for pname, param in enc.named_parameters():
        assert param.grad is not None, pname
        assert param.grad.abs().sum() > 0, pname
    grad = enc.embedding.weight.grad
    used = tokens[mask].unique()
    assert (grad[used].abs().sum(dim=1) > 0).all()
    assert torch.equal(grad[0], torch.zeros(DIM))  # padding_idx never learns
    unused = torch.ones(VOCAB, dtype=torch.bool)
    unused[used] = False
    assert torch.equal(grad[unused], torch.zeros(int(unused.sum()), DIM))


@pytest.mark.parametrize("name", list_encoders())
def test_freeze_embeddings(name: str, vectors: torch.Tensor) -> None:
    enc = _build(name, vectors, freeze_embeddings=True)
    tokens, mask = _batch()
    enc(tokens, mask).sum().backward()
    assert enc.embedding.weight.requires_grad is False
    assert enc.embedding.weight.grad is None
    assert enc.proj.weight.grad is not None


@pytest.mark.parametrize("name", list_encoders())
def test_padding_does_not_change_output(name: str, vectors: torch.Tensor) -> None:
    enc = _build(name, vectors)
    tokens, mask = _batch()
    padded = torch.cat([tokens, torch.zeros(4, 7, dtype=tokens.dtype)], dim=1)
    with torch.no_grad():
        short = enc(tokens, mask)
        long = enc(padded, padded != 0)
        # Padding from a longer neighbour in the batch must not matter either.
        alone = enc(tokens[3:4, :3], mask[3:4, :3])
    torch.testing.assert_close(long, short, atol=1e-6, rtol=0)
    torch.testing.assert_close(alone, short[3:4], atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", list_encoders())
def test_empty_title_gives_projection_bias(name: str, vectors: torch.Tensor) -> None:
    enc = _build(name, vectors)
    tokens, mask = _batch()
    out = enc(tokens, mask)
    assert torch.isfinite(out).all()
    # Documented behaviour: the pooled vector of an empty title is zero, so the output is the bias.
    assert torch.equal(out[2], enc.proj.bias)
    only_empty = enc(torch.zeros(3, 4, dtype=torch.long), torch.zeros(3, 4, dtype=torch.bool))
    assert torch.equal(only_empty, enc.proj.bias.expand(3, OUT))


@pytest.mark.parametrize("name", list_encoders())
def test_word_order(name: str, vectors: torch.Tensor) -> None:
    assert name in ORDER_INVARIANT | ORDER_SENSITIVE, f"classify new built-in encoder {name!r}"
    enc = _build(name, vectors)
    tokens, mask = _batch()
    shuffled = tokens.clone()
    shuffled[0] = tokens[0, [4, 2, 0, 3, 1]]
    shuffled[3, :3] = tokens[3, [2, 0, 1]]
    with torch.no_grad():
        out, out_shuffled = enc(tokens, mask), enc(shuffled, mask)
    if name in ORDER_INVARIANT:
        torch.testing.assert_close(out_shuffled, out, atol=1e-6, rtol=0)
    else:
        assert (out_shuffled[0] - out[0]).abs().max() > 1e-4
        assert (out_shuffled[3] - out[3]).abs().max() > 1e-4
        torch.testing.assert_close(out_shuffled[1], out[1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", list_encoders())
def test_attention_is_a_masked_softmax(name: str, vectors: torch.Tensor) -> None:
    enc = _build(name, vectors)
    if not enc.has_attention:
        assert not hasattr(enc, "attention")
        return
    tokens, mask = _batch()
    att = enc.attention(tokens, mask)
    assert att.shape == tokens.shape
    assert torch.equal(att[~mask], torch.zeros(int((~mask).sum())))  # exactly 0 on padding
    assert (att[mask] > 0).all()
    sums = att.sum(dim=1)
    torch.testing.assert_close(sums[[0, 1, 3]], torch.ones(3), atol=1e-6, rtol=0)
    assert torch.equal(att[2], torch.zeros(5))  # the empty title: an all-zero row


@pytest.mark.parametrize("name", sorted(ORDER_SENSITIVE))
def test_bilstm_word_states_are_zero_on_padding(name: str, vectors: torch.Tensor) -> None:
    enc = _build(name, vectors, hidden_size=3)
    tokens, mask = _batch()
    states = enc.word_states(tokens, mask)
    assert states.shape == (4, 5, 6)
    # Includes the empty title, which is packed with length 1 and reads the padding word once.
    assert torch.equal(states[~mask], torch.zeros(int((~mask).sum()), 6))
    assert (states[mask].abs().sum(dim=1) > 0).all()


def test_attention_flags() -> None:
    flags = {n: registry._ENCODERS[n](torch.randn(5, 4), 3).has_attention for n in BUILTIN}
    assert flags == {"bilinear": True, "bilstm": False, "bilstm_attention": True, "mean": False}


# ------------------------------------------------ hand-computed references: 3 words, 4 dimensions

# Row 0 is padding; rows 1..3 are the three words of the title.
WORDS = torch.tensor(
    [
        [0.0, 0.0, 0.0, 0.0],
        [1.0, 0.0, 2.0, 0.0],
        [0.0, 3.0, 0.0, -1.0],
        [2.0, 0.0, 1.0, 1.0],
    ]
)
TITLE = torch.tensor([[1, 2, 3, 0]])  # three words and one pad
TITLE_MASK = TITLE != 0


def _set_known_weights(module: torch.nn.Module) -> None:
    """Give every parameter except the embedding fixed, distinct, non-degenerate values."""
    module.requires_grad_(False)  # the references below are plain arithmetic on these values
    with torch.no_grad():
        for k, (pname, param) in enumerate(module.named_parameters()):
            if pname.startswith("embedding."):
                continue
            values = torch.sin(torch.arange(param.numel(), dtype=torch.float32) * 0.7 + k) * 0.5
            param.copy_(values.reshape(param.shape))


def test_mean_reference() -> None:
    enc = create_encoder("mean", vectors=WORDS, out_dim=2)
    with torch.no_grad():
        enc.proj.weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, -1.0, 0.0, 1.0]]))
        enc.proj.bias.copy_(torch.tensor([0.5, -0.5]))
    # mean of the words = [1, 1, 1, 0]; W @ mean + b = [1+2+3+0+0.5, 0-1+0+0-0.5]
    torch.testing.assert_close(enc(TITLE, TITLE_MASK), torch.tensor([[6.5, -1.5]]), atol=1e-6, rtol=0)


def test_bilinear_reference() -> None:
    enc = create_encoder("bilinear", vectors=WORDS, out_dim=3, rank=2)
    _set_known_weights(enc)
    with torch.no_grad():
        enc.temperature.fill_(1.7)
    U, bu = enc.context_factor.weight, enc.context_factor.bias
    V, bv = enc.word_factor.weight, enc.word_factor.bias
    P, bp = enc.proj.weight, enc.proj.bias
    w1, w2, w3 = WORDS[1], WORDS[2], WORDS[3]

    g = (w1 + w2 + w3) / 3
    a = torch.tanh(U @ g + bu)
    scores = []
    for w in (w1, w2, w3):
        feature_map = a * torch.tanh(V @ w + bv)  # r = 2 channels
        scores.append(1.7 * (feature_map[0] + feature_map[1]) / 2)  # average pooling
    exps = [math.exp(float(s)) for s in scores]
    alpha = torch.tensor([e / sum(exps) for e in exps])
    semantic = alpha[0] * w1 + alpha[1] * w2 + alpha[2] * w3
    expected = P @ semantic + bp

    with torch.no_grad():
        torch.testing.assert_close(enc.attention(TITLE, TITLE_MASK)[0, :3], alpha, atol=1e-6, rtol=0)
        assert float(enc.attention(TITLE, TITLE_MASK)[0, 3]) == 0.0
        torch.testing.assert_close(enc(TITLE, TITLE_MASK)[0], expected, atol=1e-6, rtol=0)


def _lstm_direction(xs: list[torch.Tensor], lstm: torch.nn.LSTM, suffix: str) -> list[torch.Tensor]:
    """One LSTM direction written out gate by gate (PyTorch's i, f, g, o row layout)."""
    w_ih = getattr(lstm, f"weight_ih_l0{suffix}")
    w_hh = getattr(lstm, f"weight_hh_l0{suffix}")
    b = getattr(lstm, f"bias_ih_l0{suffix}") + getattr(lstm, f"bias_hh_l0{suffix}")
    hidden = lstm.hidden_size
    h = torch.zeros(hidden)
    c = torch.zeros(hidden)
    outputs = []
    for x in xs:
        z = w_ih @ x + w_hh @ h + b
        i = torch.sigmoid(z[0:hidden])
        f = torch.sigmoid(z[hidden : 2 * hidden])
        cand = torch.tanh(z[2 * hidden : 3 * hidden])
        o = torch.sigmoid(z[3 * hidden : 4 * hidden])
        c = f * c + i * cand
        h = o * torch.tanh(c)
        outputs.append(h)
    return outputs


def _bilstm_reference_states(lstm: torch.nn.LSTM) -> list[torch.Tensor]:
    xs = [WORDS[1], WORDS[2], WORDS[3]]
    forward = _lstm_direction(xs, lstm, "")
    backward = _lstm_direction(xs[::-1], lstm, "_reverse")[::-1]
    return [torch.cat([f, b]) for f, b in zip(forward, backward, strict=True)]


def test_bilstm_reference() -> None:
    enc = create_encoder("bilstm", vectors=WORDS, out_dim=3, hidden_size=2)
    _set_known_weights(enc)
    h1, h2, h3 = _bilstm_reference_states(enc.lstm)
    expected = enc.proj.weight @ ((h1 + h2 + h3) / 3) + enc.proj.bias
    with torch.no_grad():
        torch.testing.assert_close(enc(TITLE, TITLE_MASK)[0], expected, atol=1e-6, rtol=0)


def test_bilstm_attention_reference() -> None:
    enc = create_encoder("bilstm_attention", vectors=WORDS, out_dim=3, hidden_size=2, attention_dim=3)
    _set_known_weights(enc)
    states = _bilstm_reference_states(enc.lstm)
    W, bw = enc.att_hidden.weight, enc.att_hidden.bias
    v = enc.att_score.weight[0]
    scores = [float(v @ torch.tanh(W @ h + bw)) for h in states]
    exps = [math.exp(s) for s in scores]
    alpha = torch.tensor([e / sum(exps) for e in exps])
    pooled = alpha[0] * states[0] + alpha[1] * states[1] + alpha[2] * states[2]
    expected = enc.proj.weight @ pooled + enc.proj.bias
    with torch.no_grad():
        torch.testing.assert_close(enc.attention(TITLE, TITLE_MASK)[0, :3], alpha, atol=1e-6, rtol=0)
        torch.testing.assert_close(enc(TITLE, TITLE_MASK)[0], expected, atol=1e-6, rtol=0)


def test_bilinear_init_is_scale_free_and_near_uniform(vectors: torch.Tensor) -> None:
    tokens, mask = _batch()
    small = _build("bilinear", vectors * 0.01)
    large = _build("bilinear", vectors * 100.0)
    with torch.no_grad():
        att_small, att_large = small.attention(tokens, mask), large.attention(tokens, mask)
    # The factors are scaled by the vectors' RMS, so word2vec's scale does not change the start.
    torch.testing.assert_close(att_large, att_small, atol=1e-5, rtol=0)
    lengths = mask.sum(dim=1)
    real = lengths > 0
    assert (att_small.amax(dim=1)[real] * lengths[real] < 2.0).all()  # no word > 2x uniform
    assert not torch.equal(att_small[0], torch.full((5,), 0.2))  # but not exactly uniform


# ------------------------------------------------------------------------------ registry errors


def test_duplicate_registration_is_a_value_error() -> None:
    def mean(vectors: torch.Tensor, out_dim: int) -> TextEncoder:
        raise AssertionError("never called")

    with pytest.raises(ValueError, match=r"^encoder 'mean' is already registered$"):
        register_encoder(mean)
    assert list_encoders() == BUILTIN


def test_unknown_name_lists_the_choices() -> None:
    with pytest.raises(SicotError) as info:
        create_encoder("nope", vectors=torch.randn(3, 2), out_dim=2)
    assert str(info.value) == (
        "unknown encoder 'nope' (choices: bilinear, bilstm, bilstm_attention, mean); an encoder of one's own is "
        "known once its module is loaded: give --encoder-module FILE (for a run, the one it was trained with)"
    )


@pytest.mark.parametrize(
    ("name", "kw", "option"),
    [
        ("mean", {"vectors": torch.randn(5), "out_dim": 2}, "vectors"),
        ("mean", {"vectors": torch.ones(5, 3, dtype=torch.long), "out_dim": 2}, "vectors"),
        ("mean", {"vectors": [[0.0, 1.0]], "out_dim": 2}, "vectors"),
        ("bilstm", {"vectors": torch.randn(5, 3), "out_dim": 0}, "out_dim"),
        ("bilinear", {"vectors": torch.randn(5, 3), "out_dim": 2.0}, "out_dim"),
        ("bilinear", {"vectors": torch.randn(5, 3), "out_dim": 2, "rank": 0}, "rank"),
        ("bilstm", {"vectors": torch.randn(5, 3), "out_dim": 2, "hidden_size": -1}, "hidden_size"),
        (
            "bilstm_attention",
            {"vectors": torch.randn(5, 3), "out_dim": 2, "attention_dim": True},
            "attention_dim",
        ),
        ("mean", {"vectors": torch.randn(5, 3), "out_dim": 2, "rank": 4}, "rank"),
        ("bilinear", {"vectors": torch.randn(5, 3), "out_dim": 2, "hidden": 4}, "hidden"),
    ],
)
def test_bad_options_name_the_option(name: str, kw: dict, option: str) -> None:
    with pytest.raises(SicotError, match=f"'{option}'"):
        create_encoder(name, **kw)


def test_unknown_option_lists_the_options() -> None:
    with pytest.raises(SicotError) as info:
        create_encoder("bilinear", vectors=torch.randn(5, 3), out_dim=2, rnak=4)
    # vectors, out_dim and freeze_embeddings are sicot's to set, not options a recipe can give
    assert str(info.value) == "encoder 'bilinear' has no option 'rnak' (options: rank)"
    with pytest.raises(SicotError, match=r"has no option 'rank' \(options: none\)"):
        create_encoder("mean", vectors=torch.randn(5, 3), out_dim=2, rank=4)


@pytest.mark.parametrize("option", ["rank", "hidden_size", "attention_dim"])
def test_sizes_are_bounded(option: str) -> None:
    name = {"rank": "bilinear", "hidden_size": "bilstm", "attention_dim": "bilstm_attention"}[option]
    with pytest.raises(
        SicotError,
        match=rf"'{option}' \(model.encoder_options.{option}\) must be an integer from 1 to 16384, got 100000000",
    ):
        create_encoder(name, vectors=torch.randn(5, 3), out_dim=2, **{option: 100_000_000})
    for value, shown in ((True, "true"), ({"a": 1}, '{"a": 1}')):  # as a recipe writes them, not Python's True
        with pytest.raises(SicotError, match=f"got {re.escape(shown)}$"):
            create_encoder(name, vectors=torch.randn(5, 3), out_dim=2, **{option: value})


def test_weights_that_do_not_fit_are_one_error(monkeypatch) -> None:
    import encoders.bilinear_attention as ba

    def alloc(*a, **kw):  # noqa: ANN002, ANN003
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 25600000000 bytes")

    monkeypatch.setattr(ba.BilinearAttentionEncoder, "__init__", alloc)
    with pytest.raises(
        SicotError, match=r"^encoder 'bilinear' with \{'rank': 9000\}: its weights do not fit in memory"
    ):
        create_encoder("bilinear", vectors=torch.randn(5, 3), out_dim=2, rank=9000)
    monkeypatch.setattr(
        ba.BilinearAttentionEncoder, "__init__", lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("a bug"))
    )
    with pytest.raises(RuntimeError, match="a bug"):  # any other error is not the user's
        create_encoder("bilinear", vectors=torch.randn(5, 3), out_dim=2)


def test_encoder_options_in_a_recipe(tiny_prepared) -> None:
    from conftest import tiny_recipe

    from sicot_cli.config import load_recipe
    from sicot_cli.model import build_model

    # one key at a time from the command line, as any other table's
    assert load_recipe(None, ["model.encoder_options.rank=3"]).model.encoder_options == {"rank": 3}
    r = load_recipe(None, ["model.encoder_options={rank=2}", "model.encoder_options.x=1"])
    assert r.model.encoder_options == {"rank": 2, "x": 1}
    with pytest.raises(
        SicotError, match=r"model.encoder_options holds plain values; set one as model.encoder_options.KEY=VALUE"
    ):
        load_recipe(None, ["model.encoder_options.rank.x=3"])
    for key in ("out_dim", "vectors", "freeze_embeddings"):  # was a TypeError: got multiple values for keyword
        with pytest.raises(SicotError, match=f"^model.encoder_options.{key}: set by sicot"):
            build_model("resnet18", 4, "bilinear", torch.randn(5, 3), encoder_options={key: 8})
    assert tiny_recipe(tiny_prepared, "model.encoder_options.rank=3").model.encoder_options == {"rank": 3}


def test_missing_options_are_named() -> None:
    with pytest.raises(SicotError, match=r"^encoder 'mean' needs option\(s\): vectors, out_dim$"):
        create_encoder("mean")


def test_factory_must_return_a_text_encoder() -> None:
    @register_encoder
    def not_an_encoder(vectors: torch.Tensor, out_dim: int) -> TextEncoder:
        return torch.nn.Linear(2, 2)  # type: ignore[return-value]

    with pytest.raises(SicotError, match="'not_an_encoder' returned Linear, not a TextEncoder"):
        create_encoder("not_an_encoder", vectors=torch.randn(3, 2), out_dim=2)


# --------------------------------------------------------------------------------------- plug-ins

PLUGIN = """
import torch
from torch import nn

from encoders import TextEncoder, register_encoder


class MaxPool(TextEncoder):
    def __init__(self, vectors, out_dim, freeze_embeddings=False):
        super().__init__(vectors, out_dim, freeze_embeddings)
        self.proj = nn.Linear(self.embed_dim, out_dim)

    def forward(self, tokens, mask):
        words = self.embedding(tokens).masked_fill(~mask.unsqueeze(-1), -1e4)
        pooled = words.amax(dim=1) * mask.any(dim=1, keepdim=True)
        return self.proj(pooled)


@register_encoder
def {name}(vectors, out_dim, freeze_embeddings=False):
    return MaxPool(vectors, out_dim, freeze_embeddings)
"""


def test_a_run_of_ones_own_encoder_is_used_with_its_module(tmp_path: Path, tiny_prepared: Path) -> None:
    """predict, evaluate, export, serve and decouple take --encoder-module too: without it such a run
    could not be used at all after training; the error says which option to give."""
    from conftest import TRAIN_FAST
    from typer.testing import CliRunner

    from sicot_cli.cli import app

    runner = CliRunner()
    path = tmp_path / "my_encoder.py"
    path.write_text(PLUGIN.replace("{name}", "my_encoder"), encoding="utf-8")
    run = tmp_path / "run"
    r = runner.invoke(
        app,
        ["train", "--data", str(tiny_prepared), "--encoder-module", str(path), "--encoder", "my_encoder"]
        + ["--run-dir", str(run), *TRAIN_FAST, "train.epochs=1"],
    )
    assert r.exit_code == 0, r.output
    registry._ENCODERS.pop("my_encoder")  # as in a new process
    image = tiny_prepared.parent / "raw" / "cat3.png"
    r = runner.invoke(app, ["predict", "--run", str(run), str(image)])
    assert r.exit_code == 2 and "give --encoder-module FILE (for a run, the one it was trained with)" in " ".join(
        r.output.split()
    )
    for args in (["predict", "--run", str(run), str(image)], ["evaluate", "--run", str(run)]):
        registry._ENCODERS.pop("my_encoder", None)
        r = runner.invoke(app, [*args, "--encoder-module", str(path)])
        assert r.exit_code == 0, r.output
    for command in ("export", "serve", "decouple"):
        assert "--encoder-module" in runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"}).output


def test_plugin_file_registers_and_trains(tmp_path: Path, vectors: torch.Tensor) -> None:
    path = tmp_path / "my_encoder.py"
    path.write_text(PLUGIN.replace("{name}", "my_encoder"), encoding="utf-8")
    assert load_encoder_module(str(path)) == ["my_encoder"]
    assert list_encoders() == sorted(BUILTIN + ["my_encoder"])
    # Loading the same file again (a resumed run in the same process) is not a duplicate.
    assert load_encoder_module(str(path)) == ["my_encoder"]

    torch.manual_seed(0)
    enc = create_encoder("my_encoder", vectors=vectors, out_dim=OUT)
    tokens, mask = _batch()
    target = torch.randn(4, OUT, generator=torch.Generator().manual_seed(3))
    optimizer = torch.optim.SGD(enc.parameters(), lr=0.05)
    losses = []
    for _ in range(10):
        optimizer.zero_grad()
        loss = (enc(tokens, mask) - target).square().mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False))


def test_plugin_dotted_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "sicot_test_dotted_plugin.py").write_text(PLUGIN.replace("{name}", "dotted_max"), encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(__import__("sys").modules, "sicot_test_dotted_plugin", raising=False)
    assert load_encoder_module("sicot_test_dotted_plugin") == ["dotted_max"]
    enc = create_encoder("dotted_max", vectors=torch.randn(5, 3), out_dim=2)
    assert enc(torch.tensor([[1, 2]]), torch.tensor([[True, True]])).shape == (1, 2)


def test_plugin_missing_file() -> None:
    with pytest.raises(SicotError, match=r"^cannot load encoder module 'no/such/enc\.py': no such file$"):
        load_encoder_module("no/such/enc.py")


def test_plugin_missing_dotted_module() -> None:
    with pytest.raises(SicotError, match=r"'no_such_sicot_module'.*ModuleNotFoundError"):
        load_encoder_module("no_such_sicot_module")


def test_plugin_bare_name_of_a_file_hints_at_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "sicot_hint_plugin.py").write_text("x = 1\n")
    monkeypatch.chdir(tmp_path)  # the file is here, but the current directory is not on sys.path
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", ".")])
    with pytest.raises(SicotError, match=r"did you mean the file sicot_hint_plugin\.py\?\)$"):
        load_encoder_module("sicot_hint_plugin")


def test_plugin_syntax_error_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.py"
    path.write_text("from encoders import register_encoder\n\ndef broken(:\n    pass\n")
    with pytest.raises(SicotError) as info:
        load_encoder_module(str(path))
    message = str(info.value)
    assert message.startswith(f"cannot load encoder module {str(path)!r}: SyntaxError: ")
    assert "\n" not in message


def test_plugin_import_error_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "needs_missing.py"
    path.write_text("import sicot_definitely_missing_dependency\n")
    with pytest.raises(SicotError, match="ModuleNotFoundError: No module named 'sicot_definitely"):
        load_encoder_module(str(path))


def test_plugin_duplicate_name_is_rolled_back(tmp_path: Path) -> None:
    path = tmp_path / "clash.py"
    path.write_text(
        PLUGIN.replace("{name}", "first_ok") + "\n\n@register_encoder\ndef mean(vectors, out_dim):\n    return None\n"
    )
    with pytest.raises(SicotError, match="ValueError: encoder 'mean' is already registered"):
        load_encoder_module(str(path))
    # The half-imported module's first registration is forgotten, the built-in mean is intact.
    assert list_encoders() == BUILTIN
    assert registry._ENCODERS["mean"].__module__ == "encoders.mean"


def test_registry_left_clean_by_the_tests_above() -> None:
    assert list_encoders() == BUILTIN


def test_bad_encoder_options_are_refused_before_any_run_naming_the_recipe(tiny_prepared: Path, tmp_path: Path) -> None:
    """ablate trained its baseline, then stopped at the first text encoder on an option it had not
    checked, without naming the recipe that set it: refused before anything is written now."""
    from typer.testing import CliRunner

    from sicot_cli.cli import app

    recipe = tmp_path / "r.toml"
    recipe.write_text('[model]\nbackbone = "mobilenet_v3_small"\n[model.encoder_options]\nrnak = 4\n')
    out = tmp_path / "abl"
    args = [
        "ablate",
        "--recipe",
        str(recipe),
        "--data",
        str(tiny_prepared),
        "--out",
        str(out),
        "--encoders",
        "bilinear",
    ]
    r = CliRunner().invoke(app, [*args, "train.epochs=1"])
    flat = " ".join(r.output.split())
    assert (
        r.exit_code == 2
        and f"{recipe}: model.encoder_options: encoder 'bilinear' has no option 'rnak' (options: rank)" in flat
    )
    assert not out.exists()
    run_dir = tmp_path / "run"
    r = CliRunner().invoke(
        app, ["train", "--data", str(tiny_prepared), "--run-dir", str(run_dir), "--encoder", "bilinear",
              "model.backbone=mobilenet_v3_small", "model.encoder_options.rank=0"],
    )  # fmt: skip
    flat = " ".join(r.output.split())
    assert r.exit_code == 2 and flat.startswith("error: model.encoder_options: encoder option 'rank'"), flat
    assert not run_dir.exists()


HEADS_PLUGIN = """
from torch import nn

from encoders import TextEncoder, register_encoder


class Heads(TextEncoder):
    def __init__(self, vectors, out_dim, freeze_embeddings, heads):
        super().__init__(vectors, out_dim, freeze_embeddings)
        self.att = nn.MultiheadAttention(self.embed_dim, heads, batch_first=True)  # heads must divide the width
        self.proj = nn.Linear(self.embed_dim, out_dim)

    def forward(self, tokens, mask):
        words = self.embedding(tokens)
        return self.proj(self.att(words, words, words, key_padding_mask=~mask)[0].mean(dim=1))


@register_encoder
def heads_encoder(vectors, out_dim, freeze_embeddings=False, heads=1):
    return Heads(vectors, out_dim, freeze_embeddings, heads)
"""


def test_the_option_preflight_builds_no_encoder_of_ones_own(tmp_path: Path, tiny_prepared: Path) -> None:
    """Every encoder was built on 4-wide vectors before the run: an encoder of one's own whose valid
    options depend on the real width (attention heads dividing it) failed with a traceback."""
    from conftest import TRAIN_FAST
    from typer.testing import CliRunner

    from sicot_cli.cli import app
    from sicot_cli.data.dataset import open_prepared

    path = tmp_path / "heads.py"
    path.write_text(HEADS_PLUGIN, encoding="utf-8")
    width = open_prepared(tiny_prepared).vectors.shape[1]
    base = ["train", "--data", str(tiny_prepared), "--encoder-module", str(path), "--encoder", "heads_encoder"]
    r = CliRunner().invoke(app, [*base, "--run-dir", str(tmp_path / "run"), *TRAIN_FAST, "train.epochs=1",
                                 f"model.encoder_options.heads={width}"])  # fmt: skip
    assert r.exit_code == 0, r.output
    registry._ENCODERS.pop("heads_encoder", None)
    r = CliRunner().invoke(app, [*base, "--run-dir", str(tmp_path / "r2"), *TRAIN_FAST, "model.encoder_options.head=2"])
    assert r.exit_code == 2 and "encoder 'heads_encoder' has no option 'head' (options: heads)" in r.output
    assert not (tmp_path / "r2").exists()
    registry._ENCODERS.pop("heads_encoder", None)
