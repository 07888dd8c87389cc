"""Visualization helpers: overlays and panels for images, highlighted tokens for text, single samples and batches."""

import html

import pytest
import torch

from transformer_lrp import viz


def test_colormap_and_heatmap_ranges():
    values = torch.linspace(0, 1, 11)
    rgb = viz.colormap(values)
    assert rgb.shape == (11, 3) and rgb.min() >= 0 and rgb.max() <= 1
    assert rgb[0].sum() < 0.1 and rgb[-1].sum() > 2.5  # dark for 0, bright for 1
    assert (rgb.sum(-1).diff() > 0).all()  # brightness grows with the value
    maps = torch.rand(2, 4, 5)
    heat = viz.heatmap(maps, (16, 20))
    assert heat.shape == (2, 3, 16, 20) and heat.min() >= 0 and heat.max() <= 1
    torch.testing.assert_close(viz.heatmap(maps[1], (16, 20)), heat[1])
    flat = viz.heatmap(torch.full((3, 3), 7.0))  # a constant map: the colormap's 0, no 0/0
    assert torch.isfinite(flat).all()


def test_overlay_blends_and_keeps_shapes():
    images = torch.rand(3, 3, 32, 24)
    maps = torch.rand(3, 4, 3)
    out = viz.overlay(images, maps, alpha=0.5)
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1
    torch.testing.assert_close(out, 0.5 * images + 0.5 * viz.heatmap(maps, (32, 24)))
    torch.testing.assert_close(viz.overlay(images[0], maps[0], 0.5), out[0])
    torch.testing.assert_close(viz.overlay(images, maps, alpha=0.0), images)
    with pytest.raises(ValueError, match="3 images but 2 maps"):
        viz.overlay(images, maps[:2])
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        viz.overlay(torch.rand(1, 32, 24), maps[0])


def test_panel_png(tmp_path):
    from PIL import Image

    path = viz.save_panel(tmp_path / "p.png", torch.rand(3, 40, 30), torch.rand(5, 4), title="coat (p=0.9)")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        assert im.size == (3 * 30 + 4 * 6, 40 + 22 + 6)


def test_text_html_single_and_batch():
    tokens = [["a", "<witty>", "film"], ["bland", "&"]]
    scores = torch.tensor([[0.1, 0.9, -0.3], [0.5, 0.0, 0.0]])
    frag = viz.text_html(tokens, scores, titles=["positive", "negative"])
    for t in ("a", "<witty>", "film", "bland", "&"):
        assert f">{html.escape(t)}</span>" in frag
    assert "rgba(37, 99, 235" in frag  # the negative score in blue (signed)
    assert "positive" in frag and "negative" in frag
    single = viz.text_html(["x", "y"], torch.tensor([1.0, 0.5]))
    assert single.count('class="tok"') == 2 and "rgba(234, 88, 12, 1.000)" in single
    page = viz.html_page(frag, title="t")
    assert page.startswith("<!DOCTYPE html>") and frag in page
    with pytest.raises(ValueError, match="sentence 0: 3 tokens but 2 scores"):
        viz.text_html(["a", "b", "c"], torch.tensor([1.0, 2.0]))
