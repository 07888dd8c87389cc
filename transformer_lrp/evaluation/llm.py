"""Next-token faithfulness of explanations on decoder LLMs (docs/method.md §6.4), batched, on any device.

Each prompt is a prefix of a real sentence; the model's predicted next token is the target. The prompt's removable
tokens (real and not special) are ranked by an explanation and removed in ``steps`` equal steps of their count, the
most relevant first (MoRF) and, separately, the least relevant first (LeRF). After each step the model runs again on
what is left and the target token's logit and probability are read at the last token. Removing is **deleting**
(the token is taken out of the sequence and the positions close up) by default, or replacing by a given token.

Scores (per prompt, then averaged): the curve of the target logit divided by the unperturbed one, its area by the
trapezoid rule over x = 0, 1/steps, …, 1 (so a curve that stays at 1 has area 1); ``area`` = LeRF − MoRF, larger is
better (0 in expectation for a random ranking). The probability curves' areas are computed on the raw probabilities.

Compared with every method of the package: **input × gradient** (the target logit's gradient with respect to the
input embeddings times the embeddings, summed over the width; plain autograd on the stock model) and **random**
rankings (seeded, averaged over seeds).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

import transformer_lrp as tl

BASELINES = ("input_x_gradient", "random")
STEPS = 10
# The end-of-text token of GPT-2-style vocabularies, which separates documents in their pretraining data.
END_OF_TEXT = "<|endoftext|>"


# -------------------------------------------------------------------------------------------------------- prompts


def document_start_token(tokenizer) -> int | None:
    """The token put before every prompt: ``None`` when the tokenizer starts sequences with its own BOS (Llama 3,
    Gemma, Phi-3), else the vocabulary's end-of-text token (GPT-2, SmolLM2, Qwen: their document separator), else
    the BOS. It is special, so never removed: every perturbation step, 100 % included, keeps a context."""
    bos = tokenizer.bos_token_id
    if bos is not None and tokenizer("a")["input_ids"][:1] == [bos]:
        return None
    vocab = tokenizer.get_vocab()
    if END_OF_TEXT in vocab:
        return vocab[END_OF_TEXT]
    if bos is not None:
        return bos
    raise ValueError("the tokenizer adds no BOS and has neither an end-of-text nor a BOS token to start prompts with")


def encode_prompts(tokenizer, texts: Sequence[str], start_token: int | None, device=None) -> dict[str, torch.Tensor]:
    """Left-padded ``input_ids`` and ``attention_mask`` of ``texts`` (the tokenizer's own special tokens included),
    each after ``start_token`` when it is given."""
    rows = [([start_token] if start_token is not None else []) + tokenizer(t)["input_ids"] for t in texts]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def removable_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, special_ids: Sequence[int]
                     ) -> torch.Tensor:
    """`[B, T]` bool: the real tokens that are not special (BOS, end-of-text, chat markers) may be removed."""
    special = torch.tensor(sorted(set(special_ids)), dtype=torch.long, device=input_ids.device)
    return attention_mask.bool() & ~torch.isin(input_ids, special)


# ---------------------------------------------------------------------------------------------------- perturbation


def removal_rank(scores: torch.Tensor, removable: torch.Tensor, most_relevant_first: bool,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """`[B, T]`: when each token goes (0 first), by relevance, descending for MoRF and ascending for LeRF; tokens
    that are not removable rank after all others. Equal scores are ordered at random (``generator``), not by
    position, so that a map with many ties (ReLU'd or min–max scaled) is not credited with a positional order."""
    if not bool(torch.isfinite(scores[removable]).all()):
        raise ValueError("relevance must be finite on the removable tokens")
    key = scores.to(torch.float64) if most_relevant_first else -scores.to(torch.float64)
    key = key.masked_fill(~removable, float("-inf"))
    shuffle = torch.rand(scores.shape, generator=generator).to(scores.device).argsort(dim=-1)
    order = shuffle.gather(-1, key.gather(-1, shuffle).argsort(dim=-1, descending=True, stable=True))
    rank = torch.empty_like(order)
    return rank.scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order))


def removed_at(rank: torch.Tensor, removable: torch.Tensor, step: int, steps: int) -> torch.Tensor:
    """`[B, T]` bool: the tokens gone after ``step`` of ``steps``: the first ``⌊n·step/steps⌋`` of each prompt's
    ``n`` removable tokens (exact integer arithmetic, so step ``steps`` removes them all)."""
    count = removable.sum(dim=-1, keepdim=True) * step // steps
    return removable & (rank < count)


def delete_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, removed: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The sequences without the removed tokens, left-padded again (the kept tokens in their order, positions closed
    up), with the columns that became padding everywhere dropped."""
    keep = attention_mask.bool() & ~removed
    if not bool(keep.any(dim=-1).all()):
        raise ValueError("a prompt has no token left; keep a special token (document_start_token) in front")
    order = keep.long().argsort(dim=-1, stable=True)  # padding and removed tokens first, the kept ones after
    width = int(keep.sum(dim=-1).max())
    return input_ids.gather(-1, order)[:, -width:], keep.gather(-1, order)[:, -width:].long()


def replace_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, removed: torch.Tensor, token_id: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The removed tokens overwritten by ``token_id`` (lengths and positions unchanged)."""
    return input_ids.masked_fill(removed, token_id), attention_mask


@dataclass
class Curves:
    """The target's logit and probability after each step (last axis, `steps + 1`; column 0: unperturbed), `[B, ·]`
    or, for several rankings, `[R, B, ·]`."""

    morf_logit: torch.Tensor
    lerf_logit: torch.Tensor
    morf_prob: torch.Tensor
    lerf_prob: torch.Tensor


Score = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def perturbation_curves(
    score: Score,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    relevance: torch.Tensor,
    removable: torch.Tensor,
    steps: int = STEPS,
    removal: str = "delete",
    replacement_id: int | None = None,
    generator: torch.Generator | None = None,
    ends: tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
    max_rows: int = 1024,
) -> Curves:
    r"""MoRF and LeRF curves of one batch, for one ranking or several at once.

    Args:
        score: ``(input_ids, attention_mask) → (target logit [N], target probability [N])`` on left-padded
            sequences of the batch's prompts, stacked: row ``j`` is a perturbed copy of prompt ``j mod B``. One call
            per step holds every ranking's MoRF and LeRF copies (cut into calls of at most ``max_rows`` rows),
            so that the model runs on large batches.
        relevance: `[B, T]` or `[R, B, T]` (``R`` explanations of the batch); only its order on the ``removable``
            tokens matters.
        removal: ``"delete"`` or ``"replace"`` (by ``replacement_id``).
        generator: orders ties (:func:`removal_rank`).
        ends: the scores at step 0 and at step ``steps`` (the same for every ranking) when already computed.
    """
    if removal not in ("delete", "replace"):
        raise ValueError(f"removal must be 'delete' or 'replace', got {removal!r}")
    if removal == "replace" and replacement_id is None:
        raise ValueError("removal='replace' needs a replacement_id")
    single = relevance.dim() == 2
    rankings = relevance[None] if single else relevance
    b, r = input_ids.shape[0], rankings.shape[0]

    def scored(removed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = []
        for chunk in removed.split(max(b, max_rows // b * b)):  # whole copies of the batch per call
            copies = chunk.shape[0] // b
            ids, mask = input_ids.repeat(copies, 1), attention_mask.repeat(copies, 1)
            if removal == "delete":
                out.append(score(*delete_tokens(ids, mask, chunk)))
            else:
                out.append(score(*replace_tokens(ids, mask, chunk, replacement_id)))
        return torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])

    if ends is None:
        ends = (score(input_ids, attention_mask), scored(removable))
    # rank[o, k]: order o (0 MoRF, 1 LeRF) of ranking k
    ranks = [[removal_rank(rel, removable, first, generator) for rel in rankings] for first in (True, False)]
    logits, probs = [], []
    for step in range(1, steps):
        removed = torch.cat([removed_at(rk, removable, step, steps) for order in ranks for rk in order])
        logit, prob = scored(removed)
        logits.append(logit.view(2, r, b))
        probs.append(prob.view(2, r, b))
    (logit0, prob0), (logit_end, prob_end) = ends

    def curve(middle: list[torch.Tensor], first: torch.Tensor, last: torch.Tensor, order: int) -> torch.Tensor:
        out = torch.stack([first.expand(r, b), *(m[order] for m in middle), last.expand(r, b)], dim=-1)
        return out[0] if single else out

    return Curves(curve(logits, logit0, logit_end, 0), curve(logits, logit0, logit_end, 1),
                  curve(probs, prob0, prob_end, 0), curve(probs, prob0, prob_end, 1))


def curve_area(curve: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
    """`[B]`: the trapezoid area of each row of ``curve`` `[B, S + 1]` over x = 0, 1/S, …, 1, after dividing it by
    ``reference`` `[B]` (the unperturbed logit; it must be positive) when given."""
    curve = curve.to(torch.float64)
    if reference is not None:
        reference = reference.to(torch.float64)
        if not bool((reference > 0).all()):
            raise ValueError("the unperturbed target logit must be positive to normalize by it")
        curve = curve / reference[:, None]
    x = torch.linspace(0, 1, curve.shape[1], dtype=torch.float64, device=curve.device)
    return torch.trapezoid(curve, x, dim=1)


# ---------------------------------------------------------------------------------------------- the stock model


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids as generation numbers them: the real tokens count from 0 whatever the padding."""
    real = attention_mask.long()
    return (real.cumsum(dim=1) - 1).clamp(min=0) * real


@torch.no_grad()
def next_token_logits(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """`[B, V]` float64: the stock model's next-token logits after left-padded prompts (only the last position's
    row goes through the LM head)."""
    if not bool(attention_mask[:, -1].bool().all()):
        raise ValueError("next_token_logits takes left-padded prompts")
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions(attention_mask),
                logits_to_keep=1)
    return out.logits[:, -1].to(torch.float64)


def target_score(model: torch.nn.Module, target: torch.Tensor) -> Score:
    """The :data:`Score` of ``target`` `[B]` (or `[B]` repeated along a stacked batch) under ``model``."""

    def score(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = next_token_logits(model, input_ids, attention_mask)
        t = target.repeat(logits.shape[0] // target.shape[0])[:, None]
        return logits.gather(-1, t)[:, 0], logits.softmax(dim=-1).gather(-1, t)[:, 0]

    return score


def input_x_gradient(model: torch.nn.Module, inputs: dict, target: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Input × gradient of the next-token logit at each prompt's last real token: ``(relevance [B, T], target [B])``.

    ``relevance[b, i] = Σ_d e_{b,i,d} · ∂y_t/∂e_{b,i,d}`` with ``e`` what the model's input embedding layer outputs
    (its scaling included) and ``y_t`` the logit of ``target`` (default: the predicted token); plain autograd through
    the stock model with its own attention implementation, left or right padding (positions counted over the real
    tokens), padding 0. The model's parameters and their ``.grad`` are not touched.
    """
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask.long()
    left_padded = bool(mask[:, -1].bool().all())
    with torch.inference_mode(False), torch.enable_grad():
        embeddings = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        out = model(inputs_embeds=embeddings, attention_mask=mask, position_ids=positions(mask),
                    logits_to_keep=1 if left_padded else 0)
        last = torch.full_like(ids[:, 0], out.logits.shape[1] - 1) if left_padded else \
            (torch.arange(ids.shape[1], device=ids.device) * mask).argmax(dim=1)
        logits = out.logits[torch.arange(ids.shape[0], device=ids.device), last]
        target = logits.argmax(dim=-1) if target is None else target.to(ids.device)
        (grad,) = torch.autograd.grad(logits.gather(-1, target[:, None]).sum(), embeddings)
    relevance = (grad * embeddings.detach()).sum(dim=-1)
    return relevance.masked_fill(~mask.bool(), 0).detach(), target


# --------------------------------------------------------------------------------------------------- the run


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="LLM faithfulness", disable=not enabled)


def evaluate_llm_faithfulness(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    methods: Sequence[str] = tl.METHODS,
    *,
    next_words: Sequence[str] | None = None,
    baselines: Sequence[str] = BASELINES,
    random_seeds: Sequence[int] = (0, 1, 2),
    batch_size: int = 8,
    steps: int = STEPS,
    removal: str = "delete",
    replacement_id: int | None = None,
    start_token: int | None | str = "auto",
    tie_seed: int = 0,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    r"""MoRF/LeRF areas of every method and baseline over ``prompts`` (docs/method.md §6.4).

    Args:
        model: a stock ``*ForCausalLM`` the package explains, on any device; methods run with their defaults.
        prompts: plain texts (no chat template), explained for the model's predicted next token.
        next_words: each prompt's true next word, for the model's next-token accuracy (reported only).
        random_seeds: the seeds of the random rankings, averaged.
        start_token: the token put before each prompt; ``"auto"``: :func:`document_start_token`.
        tie_seed: orders equal relevance values.

    Returns:
        ``{"model": {...}, name: {...}}`` with, per method, ``morf_auc``, ``lerf_auc``, ``area`` (LeRF − MoRF) and
        its standard error over prompts ``area_sem``, the same on probabilities (``*_prob_*``), the explanation time
        per prompt, and the mean normalized curves (``morf_step{k}``, ``lerf_step{k}``).
    """
    device = next(model.parameters()).device
    start = document_start_token(tokenizer) if start_token == "auto" else start_token
    special = set(tokenizer.all_special_ids) | ({start} if start is not None else set())
    names = [*methods, *baselines]
    per_name: dict[str, dict[str, list[torch.Tensor]]] = {n: {} for n in names}
    seconds = dict.fromkeys(names, 0.0)
    unperturbed: dict[str, list[torch.Tensor]] = {"logit": [], "prob": [], "hit": [], "tokens": []}
    ties = torch.Generator().manual_seed(tie_seed)
    random_generators = [torch.Generator().manual_seed(s) for s in random_seeds]
    # prompts of similar lengths batched together: less padding
    lengths = [len(tokenizer(t)["input_ids"]) for t in prompts]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    batches = [order[i : i + batch_size] for i in range(0, len(prompts), batch_size)]
    explainers = len(methods) + ("input_x_gradient" in baselines)
    bar = _progress(len(prompts) * (explainers + 1), progress)
    for idx in batches:
        batch = encode_prompts(tokenizer, [prompts[i] for i in idx], start, device)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        removable = removable_tokens(ids, mask, sorted(special))
        target = next_token_logits(model, ids, mask).argmax(dim=-1)
        score = target_score(model, target)
        emptied = delete_tokens(ids, mask, removable) if removal == "delete" else \
            replace_tokens(ids, mask, removable, replacement_id)
        ends = (score(ids, mask), score(*emptied))  # step 0 and the last step: the same for every ranking
        unperturbed["logit"].append(ends[0][0].cpu())
        unperturbed["prob"].append(ends[0][1].cpu())
        unperturbed["tokens"].append(removable.sum(dim=-1).cpu())
        if next_words is not None:
            truth = [tokenizer(" " + next_words[i], add_special_tokens=False)["input_ids"][0] for i in idx]
            unperturbed["hit"].append((target.cpu() == torch.tensor(truth)).double())

        rankings: list[tuple[str, torch.Tensor]] = []
        for method in methods:
            t0 = time.perf_counter()
            rankings.append((method, tl.explain(model, batch, target, method=method).relevance))
            seconds[method] += time.perf_counter() - t0
            bar.update(len(idx))
        if "input_x_gradient" in baselines:
            t0 = time.perf_counter()
            rankings.append(("input_x_gradient", input_x_gradient(model, batch, target)[0]))
            seconds["input_x_gradient"] += time.perf_counter() - t0
            bar.update(len(idx))
        if "random" in baselines:
            rankings += [("random", torch.rand(ids.shape, generator=g).to(device)) for g in random_generators]
        # every ranking's perturbed prompts of a step in one forward
        curves = perturbation_curves(score, ids, mask, torch.stack([r for _, r in rankings]), removable, steps,
                                     removal, replacement_id, ties, ends)
        for name in names:
            rows = torch.tensor([k for k, (n, _) in enumerate(rankings) if n == name])
            for field in ("morf_logit", "lerf_logit", "morf_prob", "lerf_prob"):
                mean = getattr(curves, field)[rows].mean(dim=0)  # random: the mean over its seeds
                per_name[name].setdefault(field, []).append(mean.cpu())
        bar.update(len(idx))
    bar.close()
    return _summary(per_name, seconds, unperturbed, len(prompts), steps)


def _summary(per_name, seconds, unperturbed, n: int, steps: int) -> dict[str, dict[str, float]]:
    logit0 = torch.cat(unperturbed["logit"])
    model_row = {"prompts": n, "removable_tokens": float(torch.cat(unperturbed["tokens"]).double().mean()),
                 "target_logit": float(logit0.mean()), "min_target_logit": float(logit0.min()),
                 "target_prob": float(torch.cat(unperturbed["prob"]).mean())}
    if unperturbed["hit"]:
        model_row["next_token_accuracy"] = float(100 * torch.cat(unperturbed["hit"]).mean())
    out = {"model": model_row}
    for name, curves in per_name.items():
        c = {k: torch.cat(v) for k, v in curves.items()}
        morf, lerf = curve_area(c["morf_logit"], logit0), curve_area(c["lerf_logit"], logit0)
        morf_p, lerf_p = curve_area(c["morf_prob"]), curve_area(c["lerf_prob"])
        area = lerf - morf
        row = {"lerf_auc": float(lerf.mean()), "morf_auc": float(morf.mean()), "area": float(area.mean()),
               "area_sem": float(area.std() / n**0.5) if n > 1 else 0.0,
               "lerf_prob_auc": float(lerf_p.mean()), "morf_prob_auc": float(morf_p.mean()),
               "prob_area": float((lerf_p - morf_p).mean()), "explain_ms": 1000 * seconds[name] / n}
        for side in ("morf", "lerf"):
            mean_curve = (c[f"{side}_logit"].double() / logit0[:, None]).mean(dim=0)
            row.update({f"{side}_step{k}": float(v) for k, v in zip(range(steps + 1), mean_curve)})
        out[name] = row
    return out
