"""The demo: real classifiers on bundled real examples, explained and drawn (``python3 -m transformer_lrp demo``).

Images: the first held-out Fashion-MNIST canvases (items pasted on real textures,
``evaluation.data.fashion_canvases``) with DINOv2 ViT-S/14 and a trained head; text: the first held-out
Rotten-Tomatoes sentences that people rated clearly, with all-MiniLM-L6-v2 and a trained sentiment head
(``assets.py``). Writes one PNG per image (the image, the map, the overlay, the classes), one HTML
page with every sentence's tokens highlighted, and the raw relevance of both as ``.pt``.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from transformer_lrp import viz
from transformer_lrp.api import explain
from transformer_lrp.conservation import CONSERVATION_BOUND
from transformer_lrp.demo import assets
from transformer_lrp.methods import LAYERED


def special_free(tokenizer, ids: torch.Tensor, scores: torch.Tensor) -> tuple[list[str], torch.Tensor]:
    """The tokens of one sentence without its special tokens ([CLS], [SEP], padding), and their scores. The
    unknown token ([UNK]) stays: it stands for a word of the text the tokenizer does not know."""
    special = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}
    keep = [i for i, t in enumerate(ids.tolist()) if t not in special]
    return tokenizer.convert_ids_to_tokens([int(ids[i]) for i in keep]), scores[keep]


def readable(tokenizer, exp, input_ids: torch.Tensor) -> list[tuple[list[str], torch.Tensor, int, float]]:
    """Per sentence of a text explanation: its tokens and scores without special tokens, the explained class and
    its probability."""
    probs = exp.logits.softmax(-1).cpu()
    rows = []
    for i in range(len(exp)):
        t = int(exp.target[i])
        rows.append((*special_free(tokenizer, input_ids[i].cpu(), exp.relevance[i].cpu()), t, float(probs[i, t])))
    return rows


def say_conservation(exp, what: str, say=print) -> None:
    """For a method that carries relevance to the input (full LRP): how far the total that reached it is from the
    relevance put in at the explained logit (docs/method.md §10)."""
    kept = exp.conservation
    if kept is None:
        return
    ratio = kept.ratio.tolist()
    span = f"{ratio[0]:.3g}" if min(ratio) == max(ratio) else f"{min(ratio):.3g} to {max(ratio):.3g}"
    say(f"  {kept.location} receive {span} times the relevance put in at the explained logit (1 when conserved): "
        f"{int(kept.off().sum())} of {len(ratio)} {what}s negative or beyond {CONSERVATION_BOUND:g}x either way "
        "(docs/method.md §10)")


def run(out: Path, n_images: int = 4, n_texts: int = 6, method: str = "transformer_attribution",
        backend: str | None = None, device: str = "cpu", say=print) -> dict:
    """Explain the bundled examples into ``out``; returns what was written and measured."""
    from transformer_lrp.evaluation.data import fashion_canvases, movie_sentences
    from transformer_lrp.evaluation.real_models import normalize

    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = assets.metadata()
    written: list[Path] = []

    # Images: the first held-out canvases; the original's ViT setting (start_layer=1) for the layered methods
    model = assets.vision_classifier().to(device)
    bench = fashion_canvases(n_images, seed=assets.CANVAS_TEST_SEED, split="test")
    kw = dict(start_layer=1) if method in LAYERED else {}
    exp = explain(model, normalize(bench.images).to(device), method=method, backend=backend, **kw)
    probs = exp.logits.softmax(-1).cpu()
    names = bench.class_names
    say(f"images: DINOv2 ViT-S/14 + trained head, held-out accuracy {100 * meta['vision']['accuracy']:.1f} % "
        f"({meta['vision']['n_test']} canvases); {method}")
    for i in range(n_images):
        pred, true = int(exp.target[i]), int(bench.labels[i])
        title = f"{names[pred]} (p={float(probs[i, pred]):.2f})   true: {names[true]}   [{method}]"
        written.append(viz.save_panel(out / f"image_{i}.png", bench.images[i], exp.maps()[i].cpu(), title))
        say(f"  image_{i}.png  predicted {names[pred]:<9} p={float(probs[i, pred]):.2f}  true {names[true]}")
    say_conservation(exp, "image", say)
    torch.save({"relevance": exp.relevance.cpu(), "maps": exp.maps().cpu(), "target": exp.target.cpu(),
                "labels": bench.labels, "class_names": names, "method": method}, out / "image_relevance.pt")
    written.append(out / "image_relevance.pt")

    # Text: the first held-out Rotten-Tomatoes sentences that people rated clearly (mean rating beyond ±2.5)
    model, tok = assets.text_classifier()
    model = model.to(device)
    sentences = movie_sentences("test")
    clear = [i for i, r in enumerate(sentences.ratings.tolist()) if abs(r) >= assets.CLEAR_RATING][:n_texts]
    texts, labels = [sentences.texts[i] for i in clear], sentences.labels[clear]
    batch = {k: v.to(device) for k, v in tok(texts, padding=True, return_tensors="pt").items()}
    exp_t = explain(model, batch, method=method, backend=backend)
    label_names = meta["text"]["labels"]
    say(f"text: all-MiniLM-L6-v2 + trained sentiment head, held-out accuracy {100 * meta['text']['accuracy']:.1f} % "
        f"({meta['text']['n_test']} sentences); {method}")
    rows = readable(tok, exp_t, batch["input_ids"])
    titles = []
    for (_, _, pred, p), text, label in zip(rows, texts, labels.tolist()):
        titles.append(f"{label_names[pred]} (p={p:.2f})   true: {label_names[label]}")
        say(f"  [{len(titles) - 1}] {label_names[pred]:<8} p={p:.2f}  true {label_names[label]:<8}  {text[:70]}")
    say_conservation(exp_t, "sentence", say)
    token_rows, score_rows = [r[0] for r in rows], [r[1] for r in rows]
    page = viz.html_page(viz.text_html(token_rows, score_rows, titles=titles, unknown_token=tok.unk_token),
                         title=f"{method}: all-MiniLM-L6-v2 sentiment ({100 * meta['text']['accuracy']:.1f} % "
                               "held-out accuracy)")
    (out / "text.html").write_text(page, encoding="utf-8")
    torch.save({"relevance": exp_t.relevance.cpu(), "input_ids": batch["input_ids"].cpu(), "texts": texts,
                "target": exp_t.target.cpu(), "labels": labels, "method": method}, out / "text_relevance.pt")
    written += [out / "text.html", out / "text_relevance.pt"]
    seconds = time.perf_counter() - t0
    return {"files": written, "seconds": seconds, "image_explanation": exp, "text_explanation": exp_t,
            "texts": texts}
