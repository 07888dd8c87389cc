"""Evaluation metrics on hand-built cases with known answers."""

import pytest
import torch

from transformer_lrp.evaluation import metrics as m


def test_auc_of_a_constant_curve_is_90_times_the_accuracy():
    assert m.perturbation_auc([0.7] * 10) == pytest.approx(63.0)
    # the recipe of the authors: trapezoid over x = 0, 0.1, ..., 0.9 with the unperturbed accuracy first
    assert m.perturbation_auc([1.0] + [0.0] * 9) == pytest.approx(5.0)
    with pytest.raises(ValueError):
        m.perturbation_auc([1.0] * 9)


def _toy_images():
    """4 images of 10x10 pixels; the 'object' is the first 10 pixels (10 %). The classifier says 1 while at least
    half of the object is intact, else 0; every label is 1."""
    images = torch.rand(4, 3, 10, 10) * 0.5 + 0.5
    mask = torch.zeros(10, 10, dtype=torch.bool)
    mask.view(-1)[:10] = True

    def classify(x):
        intact = (x[:, 0].reshape(4, -1)[:, :10] > 0).sum(-1)
        return torch.stack([torch.zeros(4), (intact >= 5).float() * 2 - 1], dim=-1)

    return images, mask.expand(4, 10, 10).float(), torch.ones(4, dtype=torch.long), classify


def test_image_perturbation_perfect_random_and_inverted_maps():
    images, perfect, labels, classify = _toy_images()
    pos = m.image_perturbation_hits(classify, images, perfect, labels, positive=True).mean(0)
    neg = m.image_perturbation_hits(classify, images, perfect, labels, positive=False).mean(0)
    assert m.perturbation_auc(pos) == pytest.approx(5.0)  # object gone at the first step
    assert m.perturbation_auc(neg) == pytest.approx(90.0)  # background goes first: the object survives 90 %
    inverted = m.image_perturbation_hits(classify, images, -perfect, labels, positive=True).mean(0)
    assert m.perturbation_auc(inverted) == pytest.approx(90.0)
    g = torch.Generator().manual_seed(0)
    rand = m.image_perturbation_hits(classify, images, torch.rand(4, 10, 10, generator=g), labels, True).mean(0)
    assert 5.0 < m.perturbation_auc(rand) < 90.0
    # removed pixels are black in every channel and the input is left untouched
    assert (images > 0).all()


def test_text_perturbation_respects_candidates_and_counts():
    ids = torch.tensor([[101, 5, 6, 7, 8, 102, 0], [101, 9, 9, 102, 0, 0, 0]])
    attn = (ids != 0).long()
    cand = (ids != 0) & (ids != 101) & (ids != 102)
    removed = []

    def classify(x, a):
        removed.append((x == 1).sum(-1))
        return torch.stack([torch.zeros(2), torch.ones(2)], -1)  # always class 1

    scores = torch.tensor([[9.0, 1, 4, 3, 2, 9, 9], [9.0, 5, 1, 9, 9, 9, 9]])
    hits = m.text_perturbation_hits(classify, ids, attn, scores, torch.tensor([1, 1]), True, 1, cand, steps=(0.5, 1.0))
    assert hits.shape == (2, 3) and bool(hits.all())
    assert removed[1].tolist() == [2, 1] and removed[2].tolist() == [4, 2]  # int(n·p) of the candidates only


def test_average_precision_hand_case_and_sklearn():
    assert m.average_precision(torch.tensor([0.9, 0.8, 0.7]), torch.tensor([1, 0, 1])) == pytest.approx(5 / 6)
    assert m.average_precision(torch.tensor([0.5, 0.5]), torch.tensor([0, 0])) == 0.0
    sk = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(1)
    scores = (torch.rand(500, generator=g) * 10).round() / 10  # many ties
    targets = torch.rand(500, generator=g) > 0.7
    assert m.average_precision(scores, targets) == pytest.approx(sk.average_precision_score(targets, scores))


def test_segmentation_perfect_inverted_and_constant_maps():
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[:, 2:6, 2:6] = True  # 25 % foreground
    perfect = m.segmentation_scores(m.segmentation_sums(masks.float(), masks))
    assert perfect == pytest.approx({"pixel_acc": 100.0, "miou": 100.0, "map": 100.0, "fg_iou": 100.0,
                                     "fg_ap": 100.0})
    inverted = m.segmentation_scores(m.segmentation_sums(1 - masks.float(), masks))
    assert inverted["pixel_acc"] == 0.0 and inverted["miou"] == 0.0
    constant = m.segmentation_scores(m.segmentation_sums(torch.full((2, 8, 8), 0.5), masks))
    assert constant["pixel_acc"] == pytest.approx(75.0)  # nothing above the mean: all background
    assert constant["map"] == pytest.approx(50.0) and constant["fg_ap"] == pytest.approx(25.0)
    nan = m.segmentation_scores(m.segmentation_sums(torch.full((2, 8, 8), float("nan")), masks))
    assert nan["pixel_acc"] == pytest.approx(75.0)


def test_segmentation_sums_add_up_over_shards():
    g = torch.Generator().manual_seed(2)
    maps, masks = torch.rand(4, 8, 8, generator=g), torch.rand(4, 8, 8, generator=g) > 0.6
    whole = m.segmentation_sums(maps, masks)
    parts = [m.segmentation_sums(maps[:1], masks[:1]), m.segmentation_sums(maps[1:], masks[1:])]
    summed = {k: parts[0][k] + parts[1][k] for k in whole}
    assert m.segmentation_scores(summed) == pytest.approx(m.segmentation_scores(whole))


def test_token_f1_micro_and_macro():
    pred = [{0, 1}, {2}, set()]
    gold = [{1}, {2, 3}, {4}]
    s = m.token_f1_scores(m.token_f1_sums(pred, gold))
    # micro: tp = 2, |P| = 3, |G| = 4 -> P = 2/3, R = 1/2, F1 = 4/7
    assert s["micro_f1"] == pytest.approx(100 * 4 / 7)
    # macro: F1s 2/3, 2/3, 0 -> mean 4/9
    assert s["macro_f1"] == pytest.approx(100 * 4 / 9)


def test_word_scores_take_the_max_over_pieces():
    scores = torch.tensor([5.0, 0.1, 0.7, 0.3, 0.9, 5.0])
    words = m.word_scores(scores, [None, 0, 1, 1, 2, None])
    assert words.tolist() == pytest.approx([0.1, 0.7, 0.9])
    assert m.top_k_words(words, 2) == {1, 2}
