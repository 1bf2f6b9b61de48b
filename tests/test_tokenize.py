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
