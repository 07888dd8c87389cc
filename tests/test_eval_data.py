"""Benchmark builders: deterministic, exact masks and labels (needs the assets .ci/run installs:
Debian's dataset-fashion-mnist, scikit-image, and scripts/fetch_text_assets.sh)."""

import torch

from transformer_lrp.evaluation import data


def test_canvases_are_deterministic_with_exact_masks():
    a = data.fashion_canvases(20, seed=3, size=64, object_size=(28, 40))
    b = data.fashion_canvases(20, seed=3, size=64, object_size=(28, 40))
    c = data.fashion_canvases(20, seed=4, size=64, object_size=(28, 40))
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)
    assert a.images.shape == (20, 3, 64, 64) and a.images.min() >= 0 and a.images.max() <= 1
    assert torch.equal(a.labels, torch.arange(20) % 10)  # balanced, in class order
    coverage = a.masks.float().mean(dim=(1, 2))
    assert (coverage > 0.02).all() and (coverage < 0.45).all()
    # the object is pasted last-but-distractor and the distractor never touches its box: the mask's pixels carry
    # the object's single tint (one colour up to the item's intensity), so their chroma is constant per image
    for img, mask in zip(a.images, a.masks):
        px = img[:, mask]  # [3, n]
        ratio = px / px.sum(0, keepdim=True).clamp(min=1e-6)
        assert ratio.std(dim=1).max() < 1e-5


def test_canvas_class_subsets_are_relabelled():
    b = data.fashion_canvases(8, seed=0, size=48, object_size=(20, 30), classes=(1, 7))
    assert b.class_names == ("trouser", "sneaker") and b.labels.tolist() == [0, 1] * 4


def test_movie_sentences_split():
    test = data.movie_sentences("test")
    train = data.movie_sentences("train")
    assert len(test.texts) == 1000 and len(train.texts) > 9000
    assert not set(test.texts) & set(train.texts)
    assert 0.4 < test.labels.float().mean() < 0.6
    assert test.texts[:5] == data.movie_sentences("test").texts[:5]


def test_planted_rationales_are_exact():
    lex = data.load_lexicon()
    bench = data.planted_rationales(60, seed=5)
    assert bench.labels.tolist() == [1, 0] * 30
    for text, label, rationale in zip(bench.texts, bench.labels.tolist(), bench.rationales):
        words = text.split()
        sign = 1 if label == 1 else -1
        assert 1 <= len(rationale) <= 3
        assert all(lex[words[i]] * sign >= 2.0 for i in rationale)
        rest = [w.lower().strip(".,;:!?\"'()") for i, w in enumerate(words) if i not in rationale]
        assert all(abs(lex.get(w, 0.0)) < 1.0 for w in rest)  # the carrier holds no sentiment word
    held = data.planted_rationales(60, seed=5, heldout_words=True)
    planted = {w for t, r in zip(bench.texts, bench.rationales) for i, w in enumerate(t.split()) if i in r}
    held_planted = {w for t, r in zip(held.texts, held.rationales) for i, w in enumerate(t.split()) if i in r}
    assert not planted & held_planted


class _PieceTokenizer:
    """Cuts each whitespace word into pieces of at most 4 characters, one token each, so that token and word counts
    differ as under a real sub-word tokenizer."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [0 for w in text.split() for _ in range(0, len(w), 4)]}


def test_sentence_prefixes_are_word_prefixes_of_real_sentences_within_the_token_range():
    tok = _PieceTokenizer()
    bench = data.sentence_prefixes(tok, 30, "movies", min_tokens=12, max_tokens=30, seed=5)
    sentences = {" ".join(t.split()) for _, t in data._read_snippets(data._vader_file(
        "movieReviewSnippets_GroundTruth.txt", None))}
    assert len(bench.prefixes) == len(set(bench.prefixes)) == 30 and "Rotten-Tomatoes" in bench.source
    for prefix, word in zip(bench.prefixes, bench.next_words):
        assert 12 <= len(tok(prefix)["input_ids"]) <= 30
        assert any(s.startswith(prefix + " " + word) for s in sentences), prefix  # a cut at a word, not the last
    assert data.sentence_prefixes(tok, 30, "movies", seed=5).prefixes == bench.prefixes  # deterministic
    assert data.sentence_prefixes(tok, 30, "movies", seed=6).prefixes != bench.prefixes
    nyt = data.sentence_prefixes(tok, 5, "nyt", min_tokens=3, max_tokens=6)
    assert all(3 <= len(tok(p)["input_ids"]) <= 6 for p in nyt.prefixes)
