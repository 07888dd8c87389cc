"""The paper's evaluation metrics (docs/method.md §6), batched, on any device.

Perturbation (§6.1): remove the most (positive test) or least (negative test) relevant pixels/tokens in steps of
10 %, classify, and score top-1 accuracy against the ground-truth label; AUC = 100 · trapz over
x = (0, 0.1, …, 0.9) with the unperturbed accuracy at x = 0 (the authors' recipe: a 0.9-wide axis, max 90).
Segmentation (§6.2): binarize each map at its own mean; pixel accuracy and mIoU accumulated over the data set;
mAP = mean over images of the average precision of the pooled ``[1 − map, map]`` scores against the one-hot mask.
Token-F1 (§6.3): top-k words against the rationale words, micro (global counts) and macro (mean per instance),
as ERASER's ``instance_micro`` / ``instance_macro``.

Functions return per-sample or summable quantities so that shards can be added up (``evaluation.runner``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

STEPS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def perturbation_auc(accuracy: Sequence[float], steps: Sequence[float] = STEPS) -> float:
    """``100 · trapz(y, x)`` with ``x = (0, *steps)`` and ``y`` = accuracies, the unperturbed one first."""
    y = torch.as_tensor(list(accuracy), dtype=torch.float64)
    x = torch.tensor([0.0, *steps], dtype=torch.float64)
    if y.numel() != x.numel():
        raise ValueError(f"expected {x.numel()} accuracies (unperturbed first), got {y.numel()}")
    return float(100 * torch.trapezoid(y, x))


def image_perturbation_hits(
    classify: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    maps: torch.Tensor,
    labels: torch.Tensor,
    positive: bool,
    steps: Sequence[float] = STEPS,
) -> torch.Tensor:
    r"""Per-sample correctness `[B, 1 + len(steps)]` (column 0: unperturbed).

    Args:
        classify: un-normalized images `[B, C, H, W]` in [0, 1] → logits (normalization inside, as the original).
        images: `[B, C, H, W]` in [0, 1].
        maps: `[B, H, W]` relevance at pixel resolution (any scale: only the ranking matters).
        labels: `[B]` ground-truth classes (accuracy is always against them).
        positive: remove the most relevant pixels first (else the least relevant: the negative test).
    """
    b, c, h, w = images.shape
    order = maps.reshape(b, -1) if positive else -maps.reshape(b, -1)
    hits = [classify(images).argmax(-1) == labels]
    for p in steps:
        _, idx = torch.topk(order, int(h * w * p), dim=-1)
        perturbed = images.reshape(b, c, -1).scatter(-1, idx[:, None].expand(b, c, -1), 0.0).reshape(b, c, h, w)
        hits.append(classify(perturbed).argmax(-1) == labels)
    return torch.stack(hits, dim=1).to(torch.float64)


def text_perturbation_hits(
    classify: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    positive: bool,
    replacement_id: int,
    candidates: torch.Tensor,
    steps: Sequence[float] = STEPS,
) -> torch.Tensor:
    r"""Per-sample correctness `[B, 1 + len(steps)]` when a fraction of each text's tokens is replaced.

    Args:
        classify: ``(input_ids, attention_mask) → logits``.
        scores: `[B, T]` token relevance.
        replacement_id: the token written over removed ones (``[UNK]`` or ``[MASK]``).
        candidates: `[B, T]` bool, tokens that may be removed (real, non-special); ``k = int(n_b · p)`` of the
            ``n_b`` candidates of sample ``b`` are removed at step ``p``.
    """
    key = torch.where(candidates, scores if positive else -scores, torch.finfo(scores.dtype).min)
    rank = key.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)  # 0 = removed first
    count = candidates.sum(dim=-1, keepdim=True)
    hits = [classify(input_ids, attention_mask).argmax(-1) == labels]
    for p in steps:
        remove = candidates & (rank < (count * p).floor().long())
        hits.append(classify(input_ids.masked_fill(remove, replacement_id), attention_mask).argmax(-1) == labels)
    return torch.stack(hits, dim=1).to(torch.float64)


def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Average precision as ``sklearn.metrics.average_precision_score``: ``Σ (R_n − R_{n−1}) P_n`` over the
    distinct score thresholds, highest first; 0 when there is no positive (the original maps NaN to 0)."""
    scores, targets = scores.reshape(-1), targets.reshape(-1).to(torch.float64)
    total = targets.sum()
    if total == 0:
        return 0.0
    order = scores.argsort(descending=True, stable=True)
    s, tp = scores[order], targets[order].cumsum(0)
    last = torch.ones_like(s, dtype=torch.bool)
    last[:-1] = s[1:] != s[:-1]  # a threshold at the last entry of each run of tied scores
    n = torch.arange(1, s.numel() + 1, device=s.device, dtype=torch.float64)[last]
    tp = tp[last]
    recall = tp / total
    previous = torch.cat([recall.new_zeros(1), recall[:-1]])
    return float(((recall - previous) * (tp / n)).sum())


def segmentation_sums(maps: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
    r"""Summable segmentation statistics of a batch.

    Args:
        maps: `[B, H, W]` relevance at pixel resolution, min–max normalized to [0, 1] (NaN counts as 0).
        masks: `[B, H, W]` bool ground truth (foreground = object).

    Returns:
        ``correct``, ``labeled`` (pixel accuracy), ``inter``/``union`` `[2]` (background, foreground IoU),
        ``ap_sum`` (pooled two-channel AP, summed over images), ``fg_ap_sum`` (foreground-only AP), ``count``.
    """
    maps = torch.nan_to_num(maps.to(torch.float64), nan=0.0)
    masks = masks.bool()
    fg = maps > maps.mean(dim=(1, 2), keepdim=True)
    out = {
        "correct": (fg == masks).sum().to(torch.float64),
        "labeled": torch.tensor(float(masks.numel()), dtype=torch.float64),
        "inter": torch.stack([(~fg & ~masks).sum(), (fg & masks).sum()]).to(torch.float64),
        "union": torch.stack([(~fg | ~masks).sum(), (fg | masks).sum()]).to(torch.float64),
    }
    ap = fg_ap = 0.0
    for m, t in zip(maps, masks):
        m, t = m.reshape(-1), t.reshape(-1)
        ap += average_precision(torch.cat([1 - m, m]), torch.cat([~t, t]))
        fg_ap += average_precision(m, t)
    out["ap_sum"] = torch.tensor(ap, dtype=torch.float64)
    out["fg_ap_sum"] = torch.tensor(fg_ap, dtype=torch.float64)
    out["count"] = torch.tensor(float(maps.shape[0]), dtype=torch.float64)
    return out


def segmentation_scores(sums: dict[str, torch.Tensor]) -> dict[str, float]:
    """Percentages from (summed) ``segmentation_sums``: pixel accuracy, mIoU, mAP, foreground IoU and AP."""
    iou = sums["inter"] / (sums["union"] + torch.finfo(torch.float64).eps)
    return {
        "pixel_acc": float(100 * sums["correct"] / sums["labeled"]),
        "miou": float(100 * iou.mean()),
        "map": float(100 * sums["ap_sum"] / sums["count"]),
        "fg_iou": float(100 * iou[1]),
        "fg_ap": float(100 * sums["fg_ap_sum"] / sums["count"]),
    }


def word_scores(token_scores: torch.Tensor, word_ids: Sequence[int | None]) -> torch.Tensor:
    """Word score = max over its word pieces (the original gives each character its piece's score and takes the
    max over a word's characters); pieces with ``None`` word id (special tokens, padding) are ignored."""
    n_words = max((w for w in word_ids if w is not None), default=-1) + 1
    out = torch.full((n_words,), float("-inf"), dtype=torch.float64)
    for score, w in zip(token_scores.tolist(), word_ids):
        if w is not None:
            out[w] = max(out[w].item(), score)
    return out


def top_k_words(scores: torch.Tensor, k: int) -> set[int]:
    return set(scores.topk(min(k, scores.numel())).indices.tolist()) if scores.numel() else set()


def token_f1_sums(predicted: Sequence[set[int]], gold: Sequence[set[int]]) -> dict[str, torch.Tensor]:
    """Summable counts for ERASER's token-level F1: true positives, predicted and gold sizes, per-instance F1."""
    tp = p = g = f1 = 0.0
    for pred, true in zip(predicted, gold):
        hit = len(pred & true)
        tp, p, g = tp + hit, p + len(pred), g + len(true)
        prec = hit / len(pred) if pred else 0.0
        rec = hit / len(true) if true else 0.0
        f1 += 2 * prec * rec / (prec + rec) if prec + rec > 0 else 0.0
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in
            dict(tp=tp, predicted=p, gold=g, f1_sum=f1, count=float(len(gold))).items()}


def token_f1_scores(sums: dict[str, torch.Tensor]) -> dict[str, float]:
    """``micro_f1`` (global counts), ``macro_f1`` (mean per instance), and the micro precision/recall."""
    prec = float(sums["tp"] / sums["predicted"]) if sums["predicted"] > 0 else 0.0
    rec = float(sums["tp"] / sums["gold"]) if sums["gold"] > 0 else 0.0
    micro = 2 * prec * rec / (prec + rec) if prec + rec > 0 else 0.0
    return {"micro_f1": 100 * micro, "macro_f1": float(100 * sums["f1_sum"] / sums["count"]),
            "micro_precision": 100 * prec, "micro_recall": 100 * rec}
