import hashlib

from sicot_cli.data.vocab import PAD, build_vocab, label_information


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


def test_ties_are_broken_by_hash_and_min_count():
    v = build_vocab([["b", "a", "c"], ["c"]], 0.0, 0.0, 2)
    assert v.words == [PAD, "c"]
    v = build_vocab([["b", "a", "c"], ["c"]], 0.0, 0.0, 1)
    # a and b tie at count 1: ordered by sha256 of the word, not by the word
    assert hashlib.sha256(b"b").digest() < hashlib.sha256(b"a").digest()
    assert v.words == [PAD, "c", "b", "a"]


def test_tie_breaking_at_the_cut_does_not_depend_on_the_script():
    # 20 Latin and 20 Chinese words, all seen once: the 5 % cuts (2 words each end) go through the
    # tie. Ordered by the word, every Latin word sorts before every CJK word, so the top cut took
    # only Latin words and the bottom cut only Chinese ones; by hash both scripts can be cut.
    latin = [f"w{i:02d}" for i in range(20)]
    cjk = [chr(0x4E00 + i) for i in range(20)]
    v = build_vocab([[w] for w in latin + cjk], 0.05, 0.05, 1)
    top = {w for w, rule in v.removed.items() if "most" in rule}
    bottom = {w for w, rule in v.removed.items() if "least" in rule}
    ranked = sorted(latin + cjk, key=lambda w: hashlib.sha256(w.encode("utf-8")).digest())  # by hand, not tie_key
    assert top == set(ranked[:2]) and bottom == set(ranked[-2:])
    assert sorted(latin + cjk)[:2] == ["w00", "w01"]  # the old rule's choice, for contrast
    # over many such ties, both scripts are cut: the share of CJK among the removed words is about half
    removed_cjk = 0
    for seed in range(50):
        lat = [f"x{seed}_{i}" for i in range(20)]
        zh = [chr(0x4E00 + 40 * seed + i) for i in range(20)]
        vv = build_vocab([[w] for w in lat + zh], 0.05, 0.0, 1)
        removed_cjk += sum(1 for w in vv.removed if w in zh)
    assert 25 <= removed_cjk <= 75  # of 100 removed words (binomial(100, 0.5): 99.9 % within)


def test_removed_words_most_associated_with_a_label_are_reported():
    # "flag" names the class (every flag title, no other); "the" is in every title: both are among
    # the most frequent and removed, but only "flag" carries label information.
    titles = (
        [["the", "flag", f"f{i}"] for i in range(10)]
        + [["the", "food", f"g{i}"] for i in range(6)]
        + [["the", "cat", f"c{i}"] for i in range(4)]
    )
    labels = ["flags"] * 10 + ["food"] * 6 + ["cats"] * 4
    v = build_vocab(titles, 0.1, 0.0, 1, labels=labels)  # 23 words: the 2 most frequent removed
    assert set(v.removed) == {"the", "flag"}
    (word, mi, label, share), (word2, mi2, _, _) = v.informative_removed
    assert (word, label, share) == ("flag", "flags", 1.0) and word2 == "the" and mi2 == 0.0
    # I(flag; label) = H(label) - H(label | flag): H(0.5, 0.3, 0.2) - 0.5 * H(0.6, 0.4)
    import math

    h = lambda *p: -sum(x * math.log2(x) for x in p)  # noqa: E731
    assert abs(mi - (h(0.5, 0.3, 0.2) - 0.5 * h(0.6, 0.4))) < 1e-12
    assert label_information({"flags": 10}, {"flags": 10, "food": 6, "cats": 4}, 20) == mi


def test_label_information_sums_the_labels_without_the_word_in_closed_form():
    """Labels the word never occurs with are summed in one term (not a loop over every class): the
    same value as the definition, summed over every label, on random counts."""
    import math
    import random

    rng = random.Random(0)
    for _ in range(200):
        labels = {f"l{i}": rng.randint(1, 9) for i in range(rng.randint(1, 12))}
        word = {k: rng.randint(1, n) for k, n in labels.items() if rng.random() < 0.4}
        n = sum(labels.values())
        n_w = sum(word.values())
        want = 0.0
        if 0 < n_w < n:
            for label, n_c in labels.items():
                both = word.get(label, 0)
                for joint, marginal in ((both, n_w), (n_c - both, n - n_w)):
                    if joint:
                        want += joint / n * math.log2(joint * n / (marginal * n_c))
        assert math.isclose(label_information(word, labels, n), want, rel_tol=1e-9, abs_tol=1e-12)
        assert math.isclose(label_information(word, labels, n, n), want, rel_tol=1e-9, abs_tol=1e-12)


def test_label_entropy_rule_keeps_the_words_that_name_classes():
    titles = (
        [["the", "flag", f"f{i}"] for i in range(10)]
        + [["the", "food", f"g{i}"] for i in range(6)]
        + [["the", "cat", f"c{i}"] for i in range(4)]
    )
    labels = ["flags"] * 10 + ["food"] * 6 + ["cats"] * 4
    freq = build_vocab(titles, 0.1, 0.0, 1, labels=labels)
    spread = build_vocab(titles, 0.1, 0.0, 1, labels=labels, drop_rule="label_entropy")
    assert "flag" not in freq.index and "flag" in spread.index
    assert "the" not in spread.index  # in every class's titles: the most spread
    assert [r.rule for r in spread.rules][0] == "10% most spread over labels"


def test_fractions_floor_on_small_vocabularies():
    v = build_vocab([["x", "y", "z"]], 0.05, 0.05, 1)
    assert len(v) == 4  # floor(0.15) = 0 words dropped at either end


def test_encode_drops_filtered_words_and_truncates():
    v = build_vocab([["a", "b", "b"]], 0.0, 0.0, 1)
    assert v.encode(["b", "zzz", "a", "b"], 2) == [v.index["b"], v.index["a"]]


def test_rule_names_keep_fractional_percentages():
    v = build_vocab([["a", "b", "c"]], 0.005, 0.05, 1)
    assert [r.rule for r in v.rules][:2] == ["0.5% most frequent", "5% least frequent"]


def test_a_word2vec_corpus_places_title_words_by_the_company_they_keep(tmp_path):
    """embed.corpus: title words that never share a title come close through the corpus's contexts."""
    import numpy as np

    from sicot_cli.config import EmbedConfig
    from sicot_cli.data.word2vec import read_corpus, word_vectors

    titles = [["cat", "toy"], ["red", "cat"], ["fox", "mug"], ["blue", "fox"], ["red", "mug"], ["blue", "toy"]] * 5
    vocab = build_vocab(titles, 0.0, 0.0, 1)
    corpus = tmp_path / "words.txt"
    corpus.write_text("Cat, kitten & meow!\n\n   \nfox kitten meow\n" * 100, encoding="utf-8")
    assert read_corpus(corpus)[:2] == [["cat", "kitten", "meow"], ["fox", "kitten", "meow"]]  # tokenized as titles
    long = tmp_path / "one-line.txt"  # text8-style: gensim would train on the first 10,000 words only
    long.write_text(" ".join(f"w{i % 7}" for i in range(25_000)), encoding="utf-8")
    assert [len(s) for s in read_corpus(long)] == [10_000, 10_000, 5_000]
    alone, r0 = word_vectors(titles, vocab, EmbedConfig(epochs=30))
    mixed, r1 = word_vectors(titles, vocab, EmbedConfig(epochs=30, corpus="words.txt"), base=tmp_path)
    again, _ = word_vectors(titles, vocab, EmbedConfig(epochs=30, corpus=str(corpus)))
    assert r1.source == "word2vec skip-gram trained on training titles and 200 sentences of words.txt"
    assert r0.source == "word2vec skip-gram trained on training titles" and r1.oov_words == 0
    assert (r0.in_corpus, r1.in_corpus) == (None, 2)  # cat and fox; toy, red, mug, blue are not in it
    assert mixed.shape == alone.shape == (len(vocab), 64)  # corpus-only words never join the vocabulary
    assert np.array_equal(mixed, again)  # deterministic, and the recipe-relative path is the same file

    def nearest(m, word):
        unit = m[1:] / np.linalg.norm(m[1:], axis=1, keepdims=True)
        sims = unit @ unit[vocab.index[word] - 1]
        sims[vocab.index[word] - 1] = -2
        return vocab.words[1 + int(np.argmax(sims))]

    assert nearest(mixed, "cat") == "fox" and nearest(mixed, "fox") == "cat"
    assert nearest(alone, "cat") != "fox" and nearest(alone, "fox") != "cat"
