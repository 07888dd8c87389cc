"""What a decoder LLM's explanation explains, beyond a single next token: a contrast between two tokens, or each
token of a given continuation (``explain(model, inputs, target=...)``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Contrast:
    """The next-token logit of ``token`` minus that of ``versus`` (each an int for every sample, or `[B]` token ids):
    why the model prefers one token over the other. Gradient methods differentiate the difference; the relevance
    methods put 1 on ``token``'s logit and −1 on ``versus``'s."""

    token: int | torch.Tensor | list[int]
    versus: int | torch.Tensor | list[int]


@dataclass(frozen=True)
class Continuation:
    """Each token of a continuation of the prompt, one explained row per token, all sharing one forward over prompt +
    continuation: row ``j`` explains the logit of ``tokens[:, j]`` at the position before it, over every earlier
    token (the prompt and the continuation's first ``j`` tokens).

    Attributes:
        tokens: `[B, C]` token ids (or a list of lists; ragged lists are padded).
        mask: `[B, C]`, 1 for a real continuation token (ragged continuations); default: every token.
    """

    tokens: torch.Tensor | list
    mask: torch.Tensor | None = None
