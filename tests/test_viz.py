"""Visualization helpers: overlays and panels for images, highlighted tokens for text, single samples and batches."""

import html

import numpy as np
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
        assert im.size[1] == 40 + viz.TITLE_BAND + viz.GAP and im.size[0] > 3 * 30 + 4 * viz.GAP + viz.BAR_WIDTH


def test_panel_shows_the_image_a_colour_bar_and_labels_readable_on_white():
    """On a white image: the image tile is the image (below its label), each tile's label sits on a dark box, and
    the colour bar runs from the colormap's top (the map's largest value) to its bottom, with a tick at 0 for a
    signed map."""
    h, w = 64, 48
    relevance = torch.linspace(-1, 3, 16).reshape(4, 4)  # signed: 0 is a quarter of the way up from the bottom
    canvas = np.asarray(viz.panel(torch.ones(3, h, w), relevance, title="white"), dtype=np.int64)
    top, gap = viz.TITLE_BAND, viz.GAP
    image_tile = canvas[top : top + h, gap : gap + w]
    assert (image_tile[20:] == 255).all()  # below the label, the white image itself
    label = image_tile[2:14, w - 20 : w - 4]
    assert label.mean() < 80  # dark box under the white label text
    bar_x = 3 * (w + gap) + gap
    bar = canvas[top : top + h, bar_x + 2 : bar_x + viz.BAR_WIDTH - 2].mean(axis=1)  # [h, 3]
    expected = viz.colormap(torch.linspace(1, 0, h)).numpy() * 255
    zero_row = round(3 / 4 * (h - 1))
    keep = [r for r in range(h) if abs(r - zero_row) > 1]  # the 0 tick crosses the bar
    assert np.abs(bar[keep] - expected[keep]).max() <= 1
    assert (canvas[top + zero_row, bar_x - 2 : bar_x + viz.BAR_WIDTH + 1] == 0).all()  # the tick at 0


def test_maps_take_an_int_size():
    x = torch.rand(2, 5, 4)
    torch.testing.assert_close(viz.heatmap(x, 12), viz.heatmap(x, (12, 12)))
    import transformer_lrp as tl

    exp = tl.Explanation(relevance=torch.rand(2, 16), target=torch.zeros(2, dtype=torch.long),
                         logits=torch.zeros(2, 3), method="gae", modality="vision", grid_size=(4, 4),
                         image_size=(32, 32))
    assert exp.image_maps(100).shape == (2, 100, 100)
    torch.testing.assert_close(exp.image_maps(100), exp.image_maps((100, 100)))
    torch.testing.assert_close(exp.image_maps(np.int64(20)), exp.image_maps((20, 20)))
    assert exp.image_maps((10, 30)).shape == (2, 10, 30) and exp.image_maps().shape == (2, 32, 32)
    for bad in (0, -3, (1, 2, 3), "20", True, 2.5):
        with pytest.raises(ValueError, match="size must be"):
            exp.image_maps(bad)


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


def test_unknown_tokens_are_marked():
    frag = viz.text_html(["a", "[UNK]", "film"], torch.tensor([0.2, 0.5, 0.1]), unknown_token="[UNK]")
    assert frag.count('class="tok unk"') == 1 and '>[UNK]</span>' in frag
    assert "not in the tokenizer" in frag and ".unk{" in viz.html_page(frag)
    assert 'class="tok unk"' not in viz.text_html(["a", "[UNK]"], torch.tensor([0.2, 0.5]))
