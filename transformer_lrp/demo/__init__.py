"""The demo: real classifiers on bundled real examples, explained and drawn (``python3 -m transformer_lrp demo``).

Images: the first held-out Fashion-MNIST canvases (items pasted on real textures,
``evaluation.data.fashion_canvases``) with DINOv2 ViT-S/14 and a trained head; text: the first held-out
Rotten-Tomatoes sentences that people rated clearly, with all-MiniLM-L6-v2 and a trained sentiment head
(``assets.py``). Writes one PNG per image (the image, the map, the overlay, the classes), one HTML
page with every sentence's tokens highlighted, and the raw relevance of both as ``.pt``.

LLM: SmolLM2-135M-Instruct (``assets.smollm2``) answers a few short questions greedily; every answer token is
explained over the prompt and the answer's earlier tokens (``explain_generation``, one batched call). Writes
``llm.html`` (hover an answer token to see its row), ``llm_matrix.png`` (answer × input tokens per prompt) and
``llm_relevance.pt``.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from transformer_lrp import viz
from transformer_lrp.api import explain, explain_generation
from transformer_lrp.conservation import CONSERVATION_BOUND
from transformer_lrp.demo import assets
from transformer_lrp.methods import LAYERED

# The LLM section: two factual questions, a sentiment judgement, a sum, a question of kind and an opposite, with a
# short system prompt (SmolLM2's default one adds some twenty tokens, and each token widens every answer row's
# sweep). Each answer token costs one reverse pass, so answers stop at LLM_MAX_NEW_TOKENS.
LLM_SYSTEM = "Be concise."
LLM_PROMPTS = (
    "What is the capital of France?",
    "What is the largest planet in the solar system?",
    'Is this review positive or negative? "A gorgeous, witty, seductive film."',
    "What is 2 + 3?",
    "Is a whale a fish or a mammal?",
    "What is the opposite of hot?",
)
LLM_MAX_NEW_TOKENS = 10


def chat_batch(tokenizer, prompts, system: str | None = LLM_SYSTEM) -> dict:
    """The prompts as user turns of the tokenizer's chat template (after ``system``, if given), left-padded."""
    head = [{"role": "system", "content": system}] if system else []
    texts = [tokenizer.apply_chat_template([*head, {"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in prompts]
    tokenizer.padding_side = "left"
    return dict(tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False))


def answer_texts(tokenizer, gen) -> list[str]:
    """Each sample's answer as text (its end-of-sequence token, where it has one, shown)."""
    return [tokenizer.decode(gen.answer_ids[i][gen.answer_mask[i]].tolist()) for i in range(len(gen))]


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
        backend: str | None = None, device: str = "cpu", say=print, n_prompts: int = len(LLM_PROMPTS),
        max_new_tokens: int = LLM_MAX_NEW_TOKENS) -> dict:
    """Explain the bundled examples into ``out`` (``n_prompts=0``: no LLM section); returns what was written and
    measured."""
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
    result = {"image_explanation": exp, "text_explanation": exp_t, "texts": texts}
    if n_prompts:
        files, result["llm_explanation"], result["answers"] = llm_section(
            out, LLM_PROMPTS[:n_prompts], max_new_tokens, method, backend, device, say)
        written += files
    return {"files": written, "seconds": time.perf_counter() - t0, **result}


def llm_section(out: Path, prompts, max_new_tokens: int, method: str, backend: str | None, device,
                say=print) -> tuple[list[Path], object, list[str]]:
    """SmolLM2-135M-Instruct answers ``prompts`` greedily; each answer token explained (one batched call). Writes
    ``llm.html``, ``llm_matrix.png``, ``llm_relevance.pt``; returns them, the explanation and the answers."""
    t0 = time.perf_counter()
    model, tok = assets.smollm2(torch.float32)
    model = model.to(device)
    batch = {k: v.to(device) for k, v in chat_batch(tok, prompts).items()}
    loaded = time.perf_counter()
    gen = explain_generation(model, batch, max_new_tokens=max_new_tokens, method=method, backend=backend)
    seconds = time.perf_counter() - loaded
    answers = answer_texts(tok, gen)
    say(f"llm: SmolLM2-135M-Instruct (float32), {len(prompts)} prompts, greedy answers of at most {max_new_tokens} "
        f"tokens; {method} for every answer token")
    titles = []
    for i, (prompt, answer) in enumerate(zip(prompts, answers)):
        share = gen.first_token_share[i][gen.answer_mask[i]]
        titles.append(f"[{i}] {prompt}")
        say(f"  [{i}] {prompt}\n      → {answer!r}  ({int(gen.answer_mask[i].sum())} tokens; first token's share of "
            f"|relevance| {100 * float(share.mean()):.1f} % on average, at most {100 * float(share.max()):.1f} %)")
    say(f"  {seconds:.1f} s to generate and explain the answers ({int(gen.answer_mask.sum())} answer tokens over "
        f"{gen.input_ids.shape[1]} positions), {loaded - t0:.1f} s to load the model")
    page = viz.html_page(viz.generation_html(gen, tok, titles=titles),
                         title=f"{method}: SmolLM2-135M-Instruct, every answer token explained")
    (out / "llm.html").write_text(page, encoding="utf-8")
    viz.save_generation_matrix(out / "llm_matrix.png", gen, tok, titles=titles)
    torch.save({"relevance": gen.relevance.cpu(), "input_ids": gen.input_ids.cpu(),
                "attention_mask": gen.attention_mask.cpu(), "prompt_mask": gen.prompt_mask.cpu(),
                "answer_ids": gen.answer_ids.cpu(), "answer_mask": gen.answer_mask.cpu(),
                "explained_logit": gen.explained_logit.cpu(), "first_token_share": gen.first_token_share.cpu(),
                "prompts": list(prompts), "system": LLM_SYSTEM, "answers": answers, "method": method},
               out / "llm_relevance.pt")
    return [out / "llm.html", out / "llm_matrix.png", out / "llm_relevance.pt"], gen, answers
