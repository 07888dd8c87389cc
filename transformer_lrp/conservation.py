"""Conservation diagnostics: how much relevance a method put in at the explained logit, and how much reached the input.

A relevance method is *conservative* when the relevance reaching the input sums to what was put in at the output.
The method's rules conserve to rounding (total 1 after the head and every block, ``tests/test_conservation.py``);
the baselines' rules, which ``full_lrp`` runs to the input, do not: their Linear rule normalizes the two positive
groups separately and so doubles the total at every Linear, and their plain z-rule add splits signed relevance with no
stabilizer. On real weights the total reaching the input is then off by many orders of magnitude and its sign is
arbitrary (docs/method.md §10 has the measurements). :func:`measure` records the totals of any method that carries
relevance to the input, and :func:`warn_if_off` raises a :class:`ConservationWarning` when they are off by more than
:data:`CONSERVATION_BOUND`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

# The bound on the ratio (relevance reaching the input) / (relevance put in at the logit). Conservative rules keep it
# at 1 up to rounding (1 ± 1e-5 in float32 after every block of the tested models), and the baselines' rules change
# the total by design by small factors (×2 at each Linear), so a factor of a few is not a failure. Past 100× (or
# 1/100×, or a flipped sign), less than 1 % of the map's total is accounted for by the explained logit: the map shows
# what the rules multiplied and rounding amplified, not what the logit is made of.
CONSERVATION_BOUND = 100.0


class ConservationWarning(UserWarning):
    """The relevance reaching the input is off from the relevance put in at the explained logit by more than
    :data:`CONSERVATION_BOUND` (or has the opposite sign)."""


@dataclass(frozen=True)
class Conservation:
    r"""Relevance bookkeeping of one explanation, per sample.

    Attributes:
        explained_logit: `[B]`, the explained logit ``y_t`` of each sample.
        initial_relevance: `[B]`, the relevance put in at ``y_t``: 1 for a one-hot start (the original code's
            convention, and ``full_lrp``'s), ``y_t`` itself for rules that start from the logit.
        token_total: `[B]`, the total relevance at the encoder input (every token, summed over the width), before
            the embedding.
        pixel_total: `[B]` or ``None``; vision: the total on the pixels (the patch tokens after the position
            embedding's share, through the patch embedding's rule). The prefix tokens' relevance (CLS,
            registers) and the position embedding's share do not reach the pixels.
        absorbing: the rules let biases, position embeddings and (AttnLRP) the softmax rule's bias term keep
            part of the relevance (AttnLRP, CP-LRP, docs/method.md §12.4): a total below what was put in, or of the
            other sign, is by design, and only a total beyond the bound in magnitude counts as off.
    """

    explained_logit: torch.Tensor
    initial_relevance: torch.Tensor
    token_total: torch.Tensor
    pixel_total: torch.Tensor | None = None
    absorbing: bool = False

    @property
    def relevance_total(self) -> torch.Tensor:
        """`[B]`, the total of what reached the model's input: the pixels (vision) or the tokens (text)."""
        return self.token_total if self.pixel_total is None else self.pixel_total

    @property
    def ratio(self) -> torch.Tensor:
        """`[B]`, ``relevance_total / initial_relevance``: 1 for a conservative method."""
        return self.relevance_total / self.initial_relevance

    def off(self, bound: float = CONSERVATION_BOUND) -> torch.Tensor:
        """`[B]` bool: the ratio is outside ``[1/bound, bound]`` (a negative ratio is outside too); for
        ``absorbing`` rules, its magnitude is beyond ``bound``."""
        r = self.ratio
        if self.absorbing:
            return ~(r.abs() <= bound)
        return ~((r >= 1 / bound) & (r <= bound))

    @property
    def reference(self) -> str:
        """The docs section that explains an off total."""
        return "docs/method.md §12.4" if self.absorbing else "docs/method.md §10"

    @property
    def location(self) -> str:
        """Where ``relevance_total`` was taken: ``"the pixels"`` or ``"the tokens"``."""
        return "the tokens" if self.pixel_total is None else "the pixels"


def measure(logits: torch.Tensor, target: torch.Tensor, initial_relevance: torch.Tensor,
            token_relevance: torch.Tensor, pixel_relevance: torch.Tensor | None = None,
            absorbing: bool = False) -> Conservation:
    """The per-sample totals of one explanation: ``token_relevance`` `[B, N, ...]` at the encoder input,
    ``pixel_relevance`` `[B, ...]` on the pixels (vision), against ``initial_relevance`` `[B]` put in at the logit
    ``logits[b, target[b]]``. Sums run in float64 (the totals are sums of large terms of both signs)."""

    def total(t: torch.Tensor) -> torch.Tensor:
        return t.detach().double().sum(dim=tuple(range(1, t.dim())))

    return Conservation(
        explained_logit=logits.detach().gather(1, target[:, None])[:, 0].double(),
        initial_relevance=initial_relevance.detach().double(),
        token_total=total(token_relevance),
        pixel_total=None if pixel_relevance is None else total(pixel_relevance),
        absorbing=absorbing,
    )


def warn_if_off(conservation: Conservation, method: str, stacklevel: int = 2,
                bound: float = CONSERVATION_BOUND) -> None:
    """A :class:`ConservationWarning` naming the samples whose ratio is outside ``[1/bound, bound]``."""
    off = conservation.off(bound)
    if not bool(off.any()):
        return
    ratio = conservation.ratio
    samples = off.nonzero()[:, 0].tolist()
    shown = ", ".join(f"{float(ratio[i]):.3g}× (sample {i})" for i in samples[:4])
    more = "" if len(samples) <= 4 else f" and {len(samples) - 4} more samples"
    if conservation.absorbing:
        rule = (f"warned beyond {bound:g}× in magnitude; below 1× is by design, the biases keep a share). A total "
                "that large comes from near-cancelling terms (e.g. an activation's input near 0 in the identity "
                "rule), not from what the logit is made of")
    else:
        rule = (f"warned when negative or beyond {bound:g}× either way). Such a map shows how the rules multiply and "
                "amplify relevance more than what the logit is made of")
    warnings.warn(
        f"{method}: relevance is not conserved: what reaches {conservation.location} totals {shown}{more} the "
        f"relevance put in at the explained logit (a conservative method gives 1×; {rule}: see "
        f"{conservation.reference}; Explanation.conservation has the totals",
        ConservationWarning, stacklevel=stacklevel + 1)
