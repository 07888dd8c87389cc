"""CLIP (transformers CLIPModel and open_clip CLIP): the similarity of image-text pairs explained on both towers.

Oracles: the stock model's own logits, attention maps and their gradients (HF, eager attention), written into the
methods' formulas; conservation; batch and padding invariance; the model untouched; open_clip against HF on the
same weights; the original CLIP notebook's GAE (hila-chefer/Transformer-MM-Explainability @58eaea8, its own CLIP
copy: tests/fixtures/clip_original_outputs.pt holds its inputs and outputs and the weights' shapes and seed; it ran
the notebook's ``interpret`` cell verbatim except ``.cuda()``, with the copy's LayerNorm float32 cast off so that
the model ran in float64)."""

import copy
from pathlib import Path

import _models as M
import numpy as np
import pytest
import torch

import transformer_lrp as tl
from transformer_lrp import sweep
from transformer_lrp.adapters import clip
from transformer_lrp.errors import InputError, UnsupportedModelError

TOL = dict(rtol=1e-9, atol=1e-11)
EOS, SOT, VOCAB = 49, 48, 50
FIXTURE = Path(__file__).parent / "fixtures" / "clip_original_outputs.pt"


def hf_clip(seed=0, dtype=torch.float64):
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, max_position_embeddings=16, eos_token_id=EOS, bos_token_id=SOT,
                         pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=24)
    torch.manual_seed(seed)
    model = M.randomize(CLIPModel(cfg), seed=seed, std=0.3)
    with torch.no_grad():
        model.logit_scale.fill_(float(np.log(1 / 0.07)))
    return model.to(dtype).eval()


def texts(lengths=(5, 7, 3), width=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, 0], ids[i, n - 1] = SOT, EOS
        ids[i, 1 : n - 1] = torch.randint(1, SOT, (n - 2,), generator=g)
    mask = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long()
    return ids, mask


def batch(n=3, seed=0):
    ids, mask = texts(seed=seed)
    return {"pixel_values": M.images(n, seed=seed), "input_ids": ids[:n], "attention_mask": mask[:n]}


def oracle(model, inputs):
    """Per tower the stock model's attention maps and their gradients of Σ_i logits_per_image[i, i]."""
    model = copy.deepcopy(model)
    for cfg in (model.config, model.config.vision_config, model.config.text_config):
        cfg._attn_implementation = "eager"
    softmax = torch.nn.functional.softmax

    def float64_softmax(x, dim=None, dtype=None, **kw):  # HF's eager CLIP attention rounds its softmax to float32
        return softmax(x, dim=dim, dtype=None if x.dtype == torch.float64 else dtype, **kw)

    torch.nn.functional.softmax = float64_softmax
    try:
        out = model(**inputs, output_attentions=True)
    finally:
        torch.nn.functional.softmax = softmax
    maps = {"vision": list(out.vision_model_output.attentions), "text": list(out.text_model_output.attentions)}
    for a in maps["vision"] + maps["text"]:
        a.retain_grad()
    out.logits_per_image.diagonal().sum().backward()
    return ({k: [a.detach() for a in v] for k, v in maps.items()}, {k: [a.grad for a in v] for k, v in maps.items()},
            out.logits_per_image.detach())


def product_rows(mats, start, rows):
    """Row ``rows[b]`` of ``M^(L-1) ⋯ M^(start)`` per sample."""
    joint = mats[start]
    for m in mats[start + 1 :]:
        joint = m.bmm(joint)
    return joint[torch.arange(joint.shape[0]), rows]


def eye_plus(maps):
    n = maps[0].shape[-1]
    return [torch.eye(n, dtype=m.dtype) + m for m in maps]


@pytest.fixture(scope="module")
def case():
    model, inputs = hf_clip(), batch()
    attn, grads, logits = oracle(model, inputs)
    eos = inputs["attention_mask"].sum(1) - 1
    return model, inputs, attn, grads, logits, eos


def test_logits_equal_the_models_own(case):
    model, inputs, _, _, logits, _ = case
    out = tl.explain(model, inputs, method="gae")
    torch.testing.assert_close(out.logits_per_image, logits, **TOL)
    torch.testing.assert_close(out.image.logits, logits, **TOL)  # the image tower's logits: logits_per_image
    torch.testing.assert_close(out.text.logits, logits.T, **TOL)
    assert out.image.target.tolist() == [0, 1, 2] and out.text.target.tolist() == [0, 1, 2]


@pytest.mark.parametrize("start", [0, 2])
def test_gae_on_both_towers_equals_the_formula(case, start):
    model, inputs, attn, grads, _, eos = case
    out = tl.explain(model, inputs, method="gae", start_layer=start)
    maps = {k: [(g * a).clamp(min=0).mean(1) for a, g in zip(attn[k], grads[k])] for k in attn}
    image = product_rows(eye_plus(maps["vision"]), start, torch.zeros(3, dtype=torch.long))[:, 1:]
    text = product_rows(eye_plus(maps["text"]), start, eos)
    torch.testing.assert_close(out.image.relevance, image, **TOL)
    torch.testing.assert_close(out.text.relevance, text.masked_fill(inputs["attention_mask"] == 0, 0), **TOL)
    # causal: no relevance after the end of text; padding exactly 0
    assert (out.text.relevance[inputs["attention_mask"] == 0] == 0).all()


def test_rollout_and_raw_attention(case):
    model, inputs, attn, _, _, eos = case
    cls = torch.zeros(3, dtype=torch.long)
    for which, rows in (("vision", cls), ("text", eos)):
        mats = [m / m.sum(-1, keepdim=True) for m in eye_plus([a.mean(1) for a in attn[which]])]
        roll = product_rows(mats, 1, rows)
        raw = attn[which][-1].mean(1)[torch.arange(3), rows]
        got_roll = tl.explain(model, inputs, method="rollout", start_layer=1)
        got_raw = tl.explain(model, inputs, method="raw_attention")
        if which == "vision":
            torch.testing.assert_close(got_roll.image.relevance, roll[:, 1:], **TOL)
            torch.testing.assert_close(got_raw.image.relevance, raw[:, 1:], **TOL)
        else:
            pad = inputs["attention_mask"] == 0
            torch.testing.assert_close(got_roll.text.relevance, roll.masked_fill(pad, 0), **TOL)
            torch.testing.assert_close(got_raw.text.relevance, raw.masked_fill(pad, 0), **TOL)


def test_attention_gradcam_on_both_towers(case):
    model, inputs, attn, grads, _, eos = case
    out = tl.explain(model, inputs, method="attention_gradcam")
    a, g = attn["vision"][-1], grads["vision"][-1]
    w = g[:, :, 0, 1:].mean(-1, keepdim=True)
    cam = (w * a[:, :, 0, 1:]).mean(1).clamp(min=0)
    lo, hi = cam.amin(1, keepdim=True), cam.amax(1, keepdim=True)
    torch.testing.assert_close(out.image.relevance, (cam - lo) / (hi - lo), **TOL)
    # text: weights = mean gradient over the real pairs, the map's min-max over them, read at the EOS row
    a, g = attn["text"][-1], grads["text"][-1]
    real = inputs["attention_mask"].bool()
    pairs = (real[:, :, None] & real[:, None, :])[:, None]
    w = (g * pairs).sum((2, 3)) / pairs.sum((2, 3))
    e = (w[:, :, None, None] * a).mean(1).clamp(min=0)
    lo = torch.where(pairs[:, 0], e, torch.inf).amin((1, 2))[:, None]
    hi = torch.where(pairs[:, 0], e, -torch.inf).amax((1, 2))[:, None]
    expect = ((e[torch.arange(3), eos] - lo) / (hi - lo)).masked_fill(~real, 0)
    torch.testing.assert_close(out.text.relevance, expect, **TOL)


@pytest.mark.parametrize("which", ["vision", "text"])
def test_transformer_attribution_conserves_relevance(case, which):
    """The stated rule (the normalization an identity, the other tower fixed): total relevance 1 after the head
    and after every block, per pair."""
    model, inputs, *_ = case
    spec = clip.build(model)
    from transformer_lrp.api import _clip_embeddings, _clip_inputs

    images, text = _clip_inputs(inputs)
    other = _clip_embeddings(spec, "text" if which == "vision" else "vision", text if which == "vision" else images)
    enc = spec.encoder(which, other)
    emb = enc.embed(images if which == "vision" else text)
    rules = sweep.Rules(method=True)
    x, caches, rows = sweep.forward(enc, emb, 0, True, "torch")
    logits, head, t, _ = sweep.head_gradient(enc, x, rows, torch.arange(3), lambda lg, t: t, emb.pool_index)
    rel = sweep.head_relevance(enc, head, logits, t, rules)
    totals = {"head": rel}
    sweep.reverse(enc, caches, None, rel, emb.key_mask, rules, None, None, False, -1, observe=totals.__setitem__)
    assert len(totals) == 1 + enc.depth
    for where, r in totals.items():
        per_pair = r.sum(dim=(1, 2))
        torch.testing.assert_close(per_pair, torch.ones_like(per_pair), rtol=0, atol=1e-6, msg=where)


@pytest.mark.parametrize("method", ["transformer_attribution", "gae", "attention_gradcam", "rollout", "full_lrp"])
def test_a_pair_in_a_batch_equals_the_pair_alone(case, method):
    """Pairs (image i, text target[i]) in a padded batch against each pair explained alone (its text unpadded)."""
    model, inputs, *_ = case
    target = torch.tensor([2, 0, 1])
    out = tl.explain(model, inputs, target=target, method=method)
    for i, j in enumerate(target.tolist()):
        n = int(inputs["attention_mask"][j].sum())
        alone = tl.explain(model, {"pixel_values": inputs["pixel_values"][i : i + 1],
                                   "input_ids": inputs["input_ids"][j : j + 1, :n]}, method=method)
        torch.testing.assert_close(out.image.relevance[i], alone.image.relevance[0], **TOL)
        torch.testing.assert_close(out.text.relevance[i, :n], alone.text.relevance[0], **TOL)
        assert (out.text.relevance[i, n:] == 0).all()


def test_pairs_given_either_way(case):
    model, inputs, *_ = case
    per_image = tl.explain(model, inputs, target=[1, 1, 0], method="gae")
    pairs = tl.explain(model, inputs, target=(torch.tensor([0, 1, 2]), torch.tensor([1, 1, 0])), method="gae")
    torch.testing.assert_close(per_image.image.relevance, pairs.image.relevance)
    # the reverse: an image per text
    rev = tl.explain(model, inputs, target=(torch.tensor([2, 2, 0]), torch.arange(3)), method="gae")
    assert rev.text_index.tolist() == [0, 1, 2] and rev.image_index.tolist() == [2, 2, 0]
    assert rev.image_maps().shape == (3, 32, 32)


def test_model_untouched_and_errors(case):
    model, inputs, *_ = case
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.requires_grad for p in model.parameters()]
    with torch.no_grad():
        tl.explain(model, inputs, method="transformer_attribution")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [p.requires_grad for p in model.parameters()] == grads and all(p.grad is None for p in model.parameters())
    two = {"pixel_values": inputs["pixel_values"][:2], "input_ids": inputs["input_ids"],
           "attention_mask": inputs["attention_mask"]}
    with pytest.raises(InputError, match="matched pairs"):
        tl.explain(model, two)
    with pytest.raises(InputError, match="text index out of range"):
        tl.explain(model, inputs, target=[0, 1, 5])
    bad = dict(inputs, attention_mask=inputs["attention_mask"].clone())
    bad["attention_mask"][0, 2] = 0
    with pytest.raises(InputError, match="before the end-of-text token"):
        tl.explain(model, bad)
    with pytest.raises(InputError, match="images and texts"):
        tl.explain(model, inputs["pixel_values"])
    with pytest.raises(UnsupportedModelError, match="image-text model"):
        tl.build_encoder(model)


def test_siglip_is_refused():
    from transformers import SiglipConfig, SiglipModel

    cfg = SiglipConfig(text_config=dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4),
                       vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=4, image_size=32, patch_size=8))
    with pytest.raises(UnsupportedModelError, match="attention pooling"):
        tl.explain(SiglipModel(cfg).eval(), {"pixel_values": torch.randn(1, 3, 32, 32),
                                             "input_ids": torch.tensor([[1, 2, 3]])})


# ------------------------------------------------------------------------------------------------------ open_clip


def open_clip_from_hf(model):
    """An open_clip CLIP with the HF model's weights (same math: quick-GELU, pre-norm, causal text tower)."""
    open_clip = pytest.importorskip("open_clip")
    vc, tc = model.config.vision_config, model.config.text_config
    oc = open_clip.CLIP(
        model.config.projection_dim,
        vision_cfg=open_clip.CLIPVisionCfg(layers=vc.num_hidden_layers, width=vc.hidden_size,
                                           head_width=vc.hidden_size // vc.num_attention_heads,
                                           mlp_ratio=vc.intermediate_size / vc.hidden_size, patch_size=vc.patch_size,
                                           image_size=vc.image_size),
        text_cfg=open_clip.CLIPTextCfg(context_length=tc.max_position_embeddings, vocab_size=tc.vocab_size,
                                       width=tc.hidden_size, heads=tc.num_attention_heads, layers=tc.num_hidden_layers,
                                       mlp_ratio=tc.intermediate_size / tc.hidden_size),
        quick_gelu=True).double().eval()
    hf = model.state_dict()
    state = {"logit_scale": hf["logit_scale"], "visual.proj": hf["visual_projection.weight"].T,
             "text_projection": hf["text_projection.weight"].T,
             "visual.conv1.weight": hf["vision_model.embeddings.patch_embedding.weight"],
             "visual.class_embedding": hf["vision_model.embeddings.class_embedding"],
             "visual.positional_embedding": hf["vision_model.embeddings.position_embedding.weight"],
             "token_embedding.weight": hf["text_model.embeddings.token_embedding.weight"],
             "positional_embedding": hf["text_model.embeddings.position_embedding.weight"]}
    for oc_name, hf_name in (("visual.ln_pre", "vision_model.pre_layrnorm"), ("visual.ln_post",
                             "vision_model.post_layernorm"), ("ln_final", "text_model.final_layer_norm")):
        for p in ("weight", "bias"):
            state[f"{oc_name}.{p}"] = hf[f"{hf_name}.{p}"]
    for oc_tower, hf_tower, cfg in (("visual.transformer", "vision_model.encoder", vc),
                                    ("transformer", "text_model.encoder", tc)):
        for i in range(cfg.num_hidden_layers):
            o, h = f"{oc_tower}.resblocks.{i}", f"{hf_tower}.layers.{i}"
            for p in ("weight", "bias"):
                state[f"{o}.attn.in_proj_{p}"] = torch.cat([hf[f"{h}.self_attn.{n}_proj.{p}"] for n in "qkv"])
                for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                             ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                    state[f"{o}.{a}.{p}"] = hf[f"{h}.{b}.{p}"]
    missing = oc.load_state_dict(state, strict=False)
    assert not missing.unexpected_keys and all(k.endswith("attn_mask") for k in missing.missing_keys), missing
    return oc


@pytest.mark.parametrize("method", ["transformer_attribution", "gae", "rollout", "attention_gradcam", "full_lrp"])
def test_open_clip_equals_hf_on_the_same_weights(case, method):
    model, inputs, *_ = case
    oc = open_clip_from_hf(model)
    ids = inputs["input_ids"].clone()
    width = 16  # open_clip pads to its context length with 0; the EOS id is the largest, as its argmax pooling needs
    ids = torch.nn.functional.pad(ids, (0, width - ids.shape[1]))
    with torch.no_grad():
        img, txt = oc.encode_image(inputs["pixel_values"], normalize=True), oc.encode_text(ids, normalize=True)
    ref = tl.explain(model, inputs, method=method)
    out = tl.explain(oc, (inputs["pixel_values"], ids), method=method)
    torch.testing.assert_close(out.logits_per_image, oc.logit_scale.exp() * img @ txt.T, **TOL)
    torch.testing.assert_close(out.logits_per_image, ref.logits_per_image, **TOL)
    # the LRP methods: open_clip's fused qkv goes through one α1β0 Linear, HF's three projections through the
    # 3-way clone (README: the original's two conventions), which agree to rounding here but are not the same rule
    tol = dict(rtol=1e-6, atol=1e-9) if method in ("transformer_attribution", "full_lrp") else TOL
    torch.testing.assert_close(out.image.relevance, ref.image.relevance, **tol)
    torch.testing.assert_close(out.text.relevance[:, :8], ref.text.relevance, **tol)
    assert (out.text.relevance[:, 8:] == 0).all()


def _original_state(shapes, seed):
    """The fixture's weights, rebuilt from their shapes and seed exactly as the parity run drew them."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if name == "logit_scale":
            state[name] = torch.tensor(float(np.log(1 / 0.07)), dtype=torch.float64)
        elif len(shape) >= 2:
            state[name] = torch.randn(*shape, generator=g, dtype=torch.float64) * (1.2 / shape[-1] ** 0.5)
        elif "ln" in name and name.endswith("weight"):
            state[name] = 0.7 + 0.6 * torch.rand(*shape, generator=g, dtype=torch.float64)
        else:
            state[name] = 0.1 * torch.randn(*shape, generator=g, dtype=torch.float64)
    return state


@pytest.mark.parametrize("start", [-1, 0], ids=["last_block", "all_blocks"])
def test_gae_parity_with_the_original_clip_notebook(start):
    """GAE on open_clip with the original's weights equals its notebook's ``interpret`` (image relevance over
    patches; the text relevance row at the EOT token), batched over the pairs (its image, repeated, with each
    text)."""
    open_clip = pytest.importorskip("open_clip")
    fx = torch.load(FIXTURE)
    c = fx["config"]
    oc = open_clip.CLIP(c["embed_dim"], vision_cfg=open_clip.CLIPVisionCfg(
        layers=c["vision_layers"], width=c["vision_width"], patch_size=c["vision_patch_size"],
        image_size=c["image_resolution"]), text_cfg=open_clip.CLIPTextCfg(
        context_length=c["context_length"], vocab_size=c["vocab_size"], width=c["transformer_width"],
        heads=c["transformer_heads"], layers=c["transformer_layers"]), quick_gelu=True).double().eval()
    missing = oc.load_state_dict(_original_state(fx["shapes"], fx["seed"]), strict=False)
    assert not missing.unexpected_keys and all(k.endswith("attn_mask") for k in missing.missing_keys)
    images = fx["image"].repeat(3, 1, 1, 1)
    out = tl.explain(oc, (images, fx["texts"]), method="gae", start_layer=start)
    torch.testing.assert_close(out.logits_per_image, fx["logits_per_image"], rtol=1e-10, atol=1e-12)
    for got, want in ((out.image.relevance, fx[f"image_relevance_start{start}"]),
                      (out.text.relevance, fx[f"text_relevance_start{start}"])):
        err = (got - want).abs().max() / want.abs().max()
        assert err <= 1e-10, float(err)


@pytest.mark.parametrize("method", ["transformer_attribution", "gae", "attention_gradcam"])
def test_triton_kernels_with_the_causal_mask(case, method):
    """The text tower's causal mask in the Triton kernels (TRITON_INTERPRET=1 on CPU) equals the reference."""
    pytest.importorskip("triton")
    from _device import on_device

    model, inputs, *_ = case
    ref = tl.explain(model, inputs, method=method, backend="torch")
    out = tl.explain(on_device(model), on_device(inputs), method=method, backend="triton")
    for a, b in ((out.image.relevance, ref.image.relevance), (out.text.relevance, ref.text.relevance)):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-9, atol=1e-11)


# ------------------------------------------------------------------------------------------- the command line


def _clip_dir(tmp_path):
    """A small random CLIP saved as a transformers checkpoint with a character-level CLIP tokenizer."""
    import json

    from transformers import CLIPTokenizer

    letters = "abcdefghijklmnopqrst"
    vocab = [*letters, *(f"{c}</w>" for c in letters), *(f"{c}</w>" for c in "uvwxyz"), "!", "?",
             "<|startoftext|>", "<|endoftext|>"]
    assert vocab.index("<|startoftext|>") == SOT and vocab.index("<|endoftext|>") == EOS
    (tmp_path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    d = tmp_path / "clip"
    hf_clip(dtype=torch.float32).save_pretrained(d)
    CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), unk_token="<|endoftext|>",
                  pad_token="<|endoftext|>").save_pretrained(d)
    return d


def test_cli_explains_an_image_with_each_caption(tmp_path):
    from PIL import Image
    from transformers import AutoTokenizer, CLIPModel

    from transformer_lrp import cli

    d = _clip_dir(tmp_path)
    g = torch.Generator().manual_seed(0)
    png = tmp_path / "photo.png"
    Image.fromarray((torch.rand(40, 48, 3, generator=g) * 255).byte().numpy()).save(png)
    out = tmp_path / "out"
    assert cli.main(["explain", "--image", str(png), "--text", "a cat", "--text", "a big dog", "--model", str(d),
                     "--method", "gae", "--out", str(out)]) == 0
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["photo_0_caption_0.png", "photo_0_caption_1.png"]
    picture = torch.tensor(__import__("numpy").array(Image.open(out / pngs[0])))
    assert picture.shape[-1] in (3, 4) and picture.shape[0] >= 32 and picture.float().std() > 0
    html = (out / "text.html").read_text()
    import html as html_lib

    tokens = ["<|startoftext|>", "a", "c", "a", "t", "<|endoftext|>", "b", "i", "g", "d", "o"]
    assert all(html_lib.escape(t) in html for t in tokens) and "&lt;/w&gt;" not in html
    raw = torch.load(out / "relevance.pt")
    # the raw relevance is explain()'s on the same inputs
    model = CLIPModel.from_pretrained(d, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(d, local_files_only=True)
    text = tok(["a cat", "a big dog"], padding=True, return_tensors="pt")
    from transformer_lrp.cli import clip_pairs, images

    mean, std = (torch.tensor(v)[:, None, None] for v in (clip_pairs.CLIP_MEAN, clip_pairs.CLIP_STD))
    pixels = images.resize_crop(32, lambda x: (x - mean) / std)(Image.open(png).convert("RGB"))[1]
    exp = tl.explain(model, {"pixel_values": pixels[None], "input_ids": text["input_ids"],
                             "attention_mask": text["attention_mask"]}, target=(torch.tensor([0, 0]),
                                                                                torch.tensor([0, 1])), method="gae")
    torch.testing.assert_close(raw["image_relevance"], exp.image.relevance)
    torch.testing.assert_close(raw["text_relevance"], exp.text.relevance)
    # a CLIP model needs both modalities
    assert cli.main(["explain", "--image", str(png), "--model", str(d), "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()
