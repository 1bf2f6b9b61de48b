from hypothesis import given, settings
from hypothesis import strategies as st

from sicot_cli.data.tokenize import tokenize, tokenize_many


def test_chinese_is_split_by_jieba():
    assert tokenize("新款包邮红色保温杯") == ["新款", "包邮", "红色", "保温杯"]


def test_english_lowercased_punctuation_dropped():
    assert tokenize("Free Shipping!! Red MUG, 12oz — New-Arrival") == [
        "free",
        "shipping",
        "red",
        "mug",
        "12oz",
        "new",
        "arrival",
    ]


def test_mixed_scripts_and_fullwidth():
    assert tokenize("耐克Nike运动鞋 ＡＢＣ１２３") == ["耐克", "nike", "运动鞋", "abc123"]


def test_symbols_emoji_controls_give_no_token():
    assert tokenize("😀 ★★★ ¥99 \x00\u200f | _ #") == ["99"]
    assert tokenize("") == []


def test_combining_marks_stay_in_their_word():
    # Devanagari vowel signs and virama (Mn/Mc), Arabic harakat, Thai vowels: one word each, not pieces
    assert tokenize("हिन्दी भाषा मैं") == ["हिन्दी", "भाषा", "मैं"]
    assert tokenize("العَرَبِيَّة") == ["العَرَبِيَّة"]
    assert tokenize("ภาษาไทย") == ["ภาษาไทย"]
    assert tokenize("q\u0303 x") == ["q\u0303", "x"]  # a mark with no precomposed form
    assert tokenize("\u0301abc") == ["abc"]  # a mark with no letter before it is no token


def test_format_characters_are_dropped_joining_the_word():
    assert tokenize("Kinder\u00adgarten") == ["kindergarten"]  # soft hyphen
    assert tokenize("a\u200db a\u200cb a\u2060b \ufeffab") == ["ab"] * 4  # ZWJ, ZWNJ, word joiner, BOM
    assert tokenize("e\u200d\u0301") == ["\u00e9"]  # NFKC composes across the dropped joiner
    assert tokenize("red\u200bcup") == ["red", "cup"]  # the zero-width space is a space
    assert tokenize("红色\u200d连衣裙") == ["红色", "连衣裙"]


def test_dotted_capital_i_lowercases_to_i_without_a_stray_dot():
    assert tokenize("İstanbul ISTANBUL İ") == ["istanbul", "istanbul", "i"]
    assert tokenize("I\u0307stanbul") == ["istanbul"]  # the decomposed spelling too


def test_emoji_presentation_and_keycaps_are_not_words():
    # variation selectors (Mn) and enclosing keycaps (Me) still separate, as before
    assert tokenize("1\ufe0f\u20e3 2\ufe0f\u20e3 \u00a9\ufe0f cup\ufe0fs") == ["1", "2", "cup", "s"]


def test_tokenize_many_keeps_order_in_parallel(monkeypatch):
    import sicot_cli.data.tokenize as tk

    monkeypatch.setattr(tk, "PARALLEL_THRESHOLD", 10)
    titles = [f"红色 cup {i}" for i in range(50)]
    assert tokenize_many(titles, workers=2) == [["红色", "cup", str(i)] for i in range(50)]


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_any_text_gives_clean_tokens(text):
    for tok in tokenize(text):
        assert tok and tok == tok.strip()
        assert "\x00" not in tok and "_" not in tok
        assert tok == tok.lower() or not tok.isascii()
