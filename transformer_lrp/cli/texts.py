"""``explain --text`` / ``--text-file``: texts explained by a sequence classifier (the demo's, or a local transformers
folder with its tokenizer). Writes ``text.html`` (each text's tokens tinted by relevance) and the raw relevance.

Texts are read and checked before a model is loaded: an empty text is refused, a file that does not decode names
its line. The model folder must hold the tokenizer the model was trained with: a missing or empty one, or one far
smaller than the model's vocabulary, is refused with what to do. Texts longer than the model takes are cut with a
note naming them; words the tokenizer does not know stay visible as its unknown token.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from transformer_lrp.cli.common import (
    MY_INPUTS,
    NOT_MINE,
    CliError,
    Text,
    batches,
    check_encoding,
    conservation_note,
    conservation_suffix,
    encode,
    explain_options,
    hf_kind,
    load_pretrained,
    load_tokenizer,
    note_unknown,
    read_hf_config,
    read_inline_texts,
    read_text_file,
    save_raw,
    supported_encoder,
    token_limit,
    unknown_tokens,
    wrong_kind,
)

NAME = "texts"
INPUTS = "--text / --text-file"


def add_arguments(groups: dict) -> None:
    g = groups["inputs"]
    g.add_argument("--text", action="append", metavar="TEXT", help="a text (repeat for more)")
    g.add_argument("--text-file", action="append", metavar="FILE",
                   help="a file with one text per line (blank lines skipped; repeat for more)")
    g.add_argument("--encoding", default="utf-8", help="of the --text-file and --prompt-file files (default utf-8)")
    groups["explanation"].add_argument("--cls-relevance", default="keep", choices=["keep", "zero", "min"],
                                       help="text: the CLS entry (default keep)")


def claims(args) -> int:
    return MY_INPUTS if args.text or args.text_file else NOT_MINE


def read(args) -> list[Text]:
    """Every text of the command line, named by where it came from; an empty one is an error."""
    check_encoding(args.encoding)
    texts = read_inline_texts(args.text, "--text", "text", "explain in it")
    for path in args.text_file or []:
        texts += read_text_file(path, args.encoding)
    return texts


def load_model(spec: str):
    """``demo`` or a local transformers sequence-classification folder → ``(model, tokenizer, label names,
    longest input in tokens)``."""
    if spec == "demo":
        from transformer_lrp.demo import assets

        model, tokenizer = assets.text_classifier()
        return model, tokenizer, assets.metadata()["text"]["labels"], supported_encoder(model).max_tokens
    if spec.startswith("timm:"):
        raise CliError(f"--model {spec} is a timm vision model: give --image files")
    config = read_hf_config(spec)
    if config is None:
        raise CliError(f"--model {spec}: not 'demo' or a transformers checkpoint directory (no config.json there)")
    kind = hf_kind(config)
    if kind != "text":
        raise wrong_kind(spec, kind, "texts")
    tokenizer = load_tokenizer(Path(spec), config.get("vocab_size"), spec)
    from transformers import AutoModelForSequenceClassification

    model = load_pretrained(AutoModelForSequenceClassification, spec)
    encoder = supported_encoder(model)
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    return model, tokenizer, names, encoder.max_tokens


def explain(args, texts: list[Text], folder: Path) -> list[Path]:
    import transformer_lrp as tl
    from transformer_lrp import viz
    from transformer_lrp.demo import readable

    model, tokenizer, names, max_tokens = load_model(args.model)
    model = model.to(args.device)
    limit = token_limit(tokenizer, texts, max_tokens, args.model)
    token_rows, score_rows, titles, relevance, explanations, unknown = [], [], [], [], [], []
    for s in batches(len(texts), args.batch_size, "texts"):
        chunk = texts[s : s + args.batch_size]
        batch = encode(tokenizer, chunk, limit, args.device)
        unknown += unknown_tokens(tokenizer, batch["input_ids"], chunk)
        exp = tl.explain(model, batch, **explain_options(args), cls_relevance=args.cls_relevance)
        explanations.append(exp)
        for j, (tokens, scores, t, p) in enumerate(readable(tokenizer, exp, batch["input_ids"])):
            token_rows.append(tokens)
            score_rows.append(scores)
            titles.append(f"{chunk[j].label}: {names[t]} (p={p:.2f})")
            print(f"{chunk[j].label}: {names[t]} (p={p:.3f})  {chunk[j].text[:70]}{conservation_suffix(exp, j)}")
        relevance += list(exp.relevance.cpu())
    sys.stdout.flush()
    note_unknown(tokenizer, unknown)
    conservation_note(explanations, "texts")
    width = max(len(r) for r in relevance)  # batches pad to their own longest text: pad to the longest of all
    raw = torch.stack([torch.nn.functional.pad(r, (0, width - len(r))) for r in relevance])
    page = viz.html_page(viz.text_html(token_rows, score_rows, titles=titles, unknown_token=tokenizer.unk_token),
                         title=f"{args.method}: {args.model}")
    (folder / "text.html").write_text(page, encoding="utf-8")
    return [folder / "text.html", save_raw(folder, "relevance", raw, args.raw)]
