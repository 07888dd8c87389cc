"""Benchmarks built offline from real material (docs/assets.md), deterministic given a seed.

* ``fashion_canvases``: a Fashion-MNIST item (Debian ``dataset-fashion-mnist``), upsampled and tinted, pasted on a
  crop of a real CC0 texture bundled with scikit-image (brick, grass, gravel), with a distractor patch cut from a
  real photo (astronaut, coffee, chelsea) that never overlaps the object. The mask is the pasted item's pixels, so
  it is exact; the label is the item's class.
* ``movie_sentences``: the 10,605 real Rotten-Tomatoes sentences with mean human ratings from the vaderSentiment
  3.3.2 sdist (label = sign of the rating, |rating| ≥ 0.5).
* ``planted_rationales``: real neutral carrier sentences (NYT editorial snippets of the same sdist) with sentiment
  words from the VADER lexicon inserted at random positions; the label depends only on the planted words, so the
  rationale (the planted words) is exact.
"""

from __future__ import annotations

import gzip
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

FASHION_DIR = Path(os.environ.get("TLRP_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
FASHION_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")
VADER_DIR = Path(os.environ.get("TLRP_VADER_DIR", Path.home() / ".cache" / "transformer_lrp" / "vader"))


def _read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


def load_fashion_mnist(split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """Images `[n, 28, 28]` uint8 and labels `[n]` from the Debian package's IDX files."""
    prefix = "t10k" if split == "test" else "train"
    images = FASHION_DIR / f"{prefix}-images-idx3-ubyte.gz"
    if not images.exists():
        raise FileNotFoundError(f"{images} not found: apt-get install dataset-fashion-mnist "
                                "(or point TLRP_FASHION_MNIST at the IDX files)")
    x = _read_idx(images, 16).reshape(-1, 28, 28)
    y = _read_idx(FASHION_DIR / f"{prefix}-labels-idx1-ubyte.gz", 8).astype(np.int64)
    return x, y


@dataclass
class ImageBenchmark:
    images: torch.Tensor  # [n, 3, H, W] in [0, 1] (un-normalized, as the perturbation protocol needs)
    masks: torch.Tensor  # [n, H, W] bool, the object's exact pixels
    labels: torch.Tensor  # [n]
    class_names: tuple[str, ...]


def fashion_canvases(
    n: int,
    seed: int = 0,
    size: int = 224,
    classes: tuple[int, ...] = tuple(range(10)),
    object_size: tuple[int, int] = (112, 160),
    split: str = "test",
) -> ImageBenchmark:
    """``n`` canvases; classes are balanced (sample ``i`` has class ``classes[i % len(classes)]``).

    The object covers about 15–25 % of the canvas (small objects made every map look alike in a trial, docs/assets.md).
    """
    import skimage.data as sk

    rng = np.random.default_rng(seed)
    items, item_labels = load_fashion_mnist(split)
    textures = [sk.brick(), sk.grass(), sk.gravel()]
    photos = [sk.astronaut(), sk.coffee(), sk.chelsea()]
    by_class = {c: np.flatnonzero(item_labels == c) for c in classes}
    images = np.zeros((n, 3, size, size), dtype=np.float32)
    masks = np.zeros((n, size, size), dtype=bool)
    labels = np.zeros(n, dtype=np.int64)
    for i in range(n):
        cls = classes[i % len(classes)]
        labels[i] = classes.index(cls)
        # background: a random crop of a grey texture, tinted
        tex = textures[rng.integers(len(textures))]
        y0, x0 = rng.integers(0, tex.shape[0] - size + 1), rng.integers(0, tex.shape[1] - size + 1)
        bg = tex[y0 : y0 + size, x0 : x0 + size].astype(np.float32) / 255.0
        tint = rng.uniform(0.5, 1.0, size=3).astype(np.float32)
        canvas = bg[None] * tint[:, None, None] * rng.uniform(0.6, 1.0)
        # object: upsampled item, mask = intensity > 0.1
        item = torch.from_numpy(items[rng.choice(by_class[cls])].astype(np.float32) / 255.0)[None, None]
        side = int(rng.integers(object_size[0], object_size[1] + 1))
        item = F.interpolate(item, size=(side, side), mode="bilinear", align_corners=False)[0, 0].numpy()
        obj_mask = item > 0.1
        oy, ox = rng.integers(0, size - side + 1), rng.integers(0, size - side + 1)
        color = rng.uniform(0.3, 1.0, size=3).astype(np.float32)
        region = canvas[:, oy : oy + side, ox : ox + side]
        region[:, obj_mask] = (item[obj_mask][None] * color[:, None]).astype(np.float32)
        masks[i, oy : oy + side, ox : ox + side] = obj_mask
        # distractor: a patch of a real photo where it does not touch the object's box
        photo = photos[rng.integers(len(photos))]
        d = int(rng.integers(max(4, size // 6), max(5, size // 3) + 1))  # 37–74 px at 224
        for _ in range(20):
            dy, dx = rng.integers(0, size - d + 1), rng.integers(0, size - d + 1)
            if dy + d <= oy or dy >= oy + side or dx + d <= ox or dx >= ox + side:
                py, px = rng.integers(0, photo.shape[0] - d + 1), rng.integers(0, photo.shape[1] - d + 1)
                canvas[:, dy : dy + d, dx : dx + d] = photo[py : py + d, px : px + d].transpose(2, 0, 1) / 255.0
                break
        images[i] = canvas
    return ImageBenchmark(torch.from_numpy(images), torch.from_numpy(masks), torch.from_numpy(labels),
                          tuple(FASHION_CLASSES[c] for c in classes))


# --------------------------------------------------------------------------------------------------------- text


def _vader_file(name: str, root: Path | None) -> Path:
    root = Path(root) if root is not None else VADER_DIR
    hits = sorted(root.rglob(name)) if root.exists() else []
    if not hits:
        raise FileNotFoundError(
            f"{name} not found under {root}: run scripts/fetch_text_assets.sh (it unpacks the vaderSentiment 3.3.2 "
            "sdist from PyPI) or point TLRP_VADER_DIR at its contents")
    return hits[0]


def _read_snippets(path: Path) -> list[tuple[float, str]]:
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.strip().split("\t")
        if len(parts) >= 3:
            rows.append((float(parts[1]), parts[2].strip()))
    return rows


def load_lexicon(root: Path | None = None) -> dict[str, float]:
    """VADER lexicon: token → mean human valence in [-4, 4]."""
    lex = {}
    for line in _vader_file("vader_lexicon.txt", root).read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) >= 2:
            lex[parts[0]] = float(parts[1])
    return lex


@dataclass
class TextBenchmark:
    texts: list[str]
    labels: torch.Tensor  # [n]: 1 positive, 0 negative
    rationales: list[list[int]] | None = None  # per text, indices of rationale words (whitespace split)
    ratings: torch.Tensor | None = None  # [n] the mean human rating (movie sentences: -4 … 4)


def movie_sentences(split: str = "test", root: Path | None = None, seed: int = 0, test_size: int = 1000,
                    min_abs_rating: float = 0.5) -> TextBenchmark:
    """Rotten-Tomatoes sentences, label = sign of the mean human rating; a fixed shuffled train/test split."""
    rows = [(r, t) for r, t in _read_snippets(_vader_file("movieReviewSnippets_GroundTruth.txt", root))
            if abs(r) >= min_abs_rating]
    order = np.random.default_rng(seed).permutation(len(rows))
    idx = order[:test_size] if split == "test" else order[test_size:]
    texts = [rows[i][1] for i in idx]
    labels = torch.tensor([int(rows[i][0] > 0) for i in idx])
    return TextBenchmark(texts, labels, ratings=torch.tensor([rows[i][0] for i in idx]))


_WORD = re.compile(r"^[a-z]+$")


def planted_rationales(n: int, seed: int = 0, root: Path | None = None, words_per_text: tuple[int, int] = (1, 3),
                       min_valence: float = 2.0, heldout_words: bool = False,
                       vocab: set[str] | None = None) -> TextBenchmark:
    """Neutral real sentences with planted sentiment words; rationale = the planted words' positions.

    Carriers: NYT editorial snippets with |rating| ≤ 0.3 and no lexicon word of |valence| ≥ 1. Planted words:
    lexicon entries of |valence| ≥ ``min_valence``, alphabetic; the even-ranked half of each polarity is used
    unless ``heldout_words``, which uses the other half (to test generalisation). ``vocab`` (e.g. a tokenizer's
    vocabulary) keeps only words it contains, which drops the lexicon's internet slang.
    """
    lex = load_lexicon(root)
    carriers = []
    for rating, text in _read_snippets(_vader_file("nytEditorialSnippets_GroundTruth.txt", root)):
        words = text.split()
        if abs(rating) <= 0.3 and 6 <= len(words) <= 40 and not any(
            abs(lex.get(w.lower().strip(".,;:!?\"'()"), 0.0)) >= 1.0 for w in words
        ):
            carriers.append(words)
    pools = {}
    for sign in (1, -1):
        words = sorted(w for w, v in lex.items() if _WORD.match(w) and v * sign >= min_valence
                       and (vocab is None or w in vocab))
        pools[sign] = words[1::2] if heldout_words else words[0::2]
    rng = np.random.default_rng(seed)
    texts, labels, rationales = [], [], []
    for i in range(n):
        sign = 1 if i % 2 == 0 else -1
        words = list(carriers[rng.integers(len(carriers))])
        k = int(rng.integers(words_per_text[0], words_per_text[1] + 1))
        planted = rng.choice(pools[sign], size=k, replace=False)
        for w in planted:
            words.insert(int(rng.integers(0, len(words) + 1)), str(w))
        planted_set = set(planted.tolist())
        texts.append(" ".join(words))
        labels.append(int(sign > 0))
        rationales.append([j for j, w in enumerate(words) if w in planted_set])
    return TextBenchmark(texts, torch.tensor(labels), rationales)


@dataclass
class PrefixBenchmark:
    """Prefixes of real sentences for next-token tests: each prefix ends at a word boundary, its sentence goes on."""

    prefixes: list[str]
    next_words: list[str]  # the word the sentence continues with
    source: str  # which sentence set, in words


SENTENCE_SETS = {"movies": "movieReviewSnippets_GroundTruth.txt", "nyt": "nytEditorialSnippets_GroundTruth.txt"}
SENTENCE_SET_NAMES = {"movies": "Rotten-Tomatoes movie-review sentences (vaderSentiment 3.3.2 sdist)",
                      "nyt": "NYT editorial sentences (vaderSentiment 3.3.2 sdist)"}


def sentence_prefixes(tokenizer, n: int, source: str = "movies", min_tokens: int = 12, max_tokens: int = 30,
                      seed: int = 0, root: Path | None = None) -> PrefixBenchmark:
    """``n`` prefixes of real sentences, ``min_tokens``–``max_tokens`` tokens long under ``tokenizer`` (no special
    tokens counted), cut after a whole word that is not the sentence's last.

    Sentences are taken in a seeded shuffled order, whitespace collapsed; each one gives at most one prefix, its number
    of words drawn uniformly among the cuts whose token count is in range (a sentence with no such cut is skipped).
    """
    if source not in SENTENCE_SETS:
        raise ValueError(f"source must be one of {sorted(SENTENCE_SETS)}, got {source!r}")
    rows = _read_snippets(_vader_file(SENTENCE_SETS[source], root))
    rng = np.random.default_rng(seed)
    prefixes, next_words = [], []
    for i in rng.permutation(len(rows)):
        if len(prefixes) == n:
            break
        words = rows[i][1].split()
        cuts = []
        for k in range(1, len(words)):
            length = len(tokenizer(" ".join(words[:k]), add_special_tokens=False)["input_ids"])
            if length > max_tokens:
                break  # longer prefixes only have more tokens
            if length >= min_tokens:
                cuts.append(k)
        if cuts:
            k = cuts[int(rng.integers(len(cuts)))]
            prefixes.append(" ".join(words[:k]))
            next_words.append(words[k])
    if len(prefixes) < n:
        raise ValueError(f"only {len(prefixes)} sentences of {source!r} have a prefix of {min_tokens}–{max_tokens} "
                         f"tokens; asked for {n}")
    return PrefixBenchmark(prefixes, next_words, SENTENCE_SET_NAMES[source])
