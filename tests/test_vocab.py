from sicot_cli.data.vocab import PAD, build_vocab


def test_frequency_filter_known_answer():
    # counts: a=6 b=5 c=4 d=3 e=2 f=1 ... 20 distinct words; 5% of 20 = 1 word at each end.
    words = [chr(ord("a") + i) for i in range(20)]
    titles = [[w] * (20 - i) for i, w in enumerate(words)]  # a:20, b:19, ..., t:1
    titles.append(["a", "t"])  # a:21, t:2 -> still the extremes
    v = build_vocab(titles, 0.05, 0.05, 1)
    assert v.words[0] == PAD
    assert "a" not in v.index and "t" not in v.index
    assert v.words[1:] == words[1:19]
    assert v.counts[1] == 19
    top, bottom, mincount = v.rules
    assert (top.words, top.tokens, top.titles_emptied) == (1, 21, 1)  # the all-"a" title empties
    # cumulative: the all-"a" title, the "t" title and ["a", "t"] are empty after both rules
    assert (bottom.words, bottom.tokens, bottom.titles_emptied) == (1, 2, 3)
    assert (mincount.words, mincount.tokens) == (0, 0)


def test_ties_are_broken_by_word_and_min_count():
    v = build_vocab([["b", "a", "c"], ["c"]], 0.0, 0.0, 2)
    assert v.words == [PAD, "c"]
    v = build_vocab([["b", "a", "c"], ["c"]], 0.0, 0.0, 1)
    assert v.words == [PAD, "c", "a", "b"]


def test_fractions_floor_on_small_vocabularies():
    v = build_vocab([["x", "y", "z"]], 0.05, 0.05, 1)
    assert len(v) == 4  # floor(0.15) = 0 words dropped at either end


def test_encode_drops_filtered_words_and_truncates():
    v = build_vocab([["a", "b", "b"]], 0.0, 0.0, 1)
    assert v.encode(["b", "zzz", "a", "b"], 2) == [v.index["b"], v.index["a"]]


def test_rule_names_keep_fractional_percentages():
    v = build_vocab([["a", "b", "c"]], 0.005, 0.05, 1)
    assert [r.rule for r in v.rules][:2] == ["0.5% most frequent", "5% least frequent"]
