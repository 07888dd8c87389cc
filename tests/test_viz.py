"""Visualization helpers: overlays and panels for images, highlighted tokens for text, single samples and batches;
a decoder LLM's answers token by token (the page with a row per answer token, the answer × input matrix)."""

import html
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser

import _decoders as D
import numpy as np
import pytest
import torch

import transformer_lrp as tl
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


def test_image_maps_choose_pixels_or_patches():
    """``pixels=None`` takes the pixel relevance where it exists, ``False`` the patch map (bilinear, as for the map
    methods), ``True`` insists on pixels and names the method that has none."""
    import torch.nn.functional as F

    patches, pixels = torch.randn(2, 16), torch.randn(2, 32, 32)
    exp = tl.Explanation(relevance=patches, target=torch.zeros(2, dtype=torch.long), logits=torch.zeros(2, 3),
                         method="attnlrp", modality="vision", grid_size=(4, 4), image_size=(32, 32),
                         pixel_relevance=pixels)
    upsampled = F.interpolate(patches.reshape(2, 1, 4, 4), size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(exp.image_maps(normalize=False), pixels, rtol=0, atol=0)
    torch.testing.assert_close(exp.image_maps(normalize=False, pixels=True), pixels, rtol=0, atol=0)
    torch.testing.assert_close(exp.image_maps(normalize=False, pixels=False), upsampled, rtol=0, atol=0)
    scaled = exp.image_maps(pixels=False)
    assert scaled.amin(dim=(1, 2)).eq(0).all() and scaled.amax(dim=(1, 2)).eq(1).all()
    no_pixels = tl.Explanation(relevance=patches, target=exp.target, logits=exp.logits, method="gae",
                               modality="vision", grid_size=(4, 4), image_size=(32, 32))
    torch.testing.assert_close(no_pixels.image_maps(normalize=False), upsampled, rtol=0, atol=0)
    with pytest.raises(ValueError, match="gae has no pixel relevance"):
        no_pixels.image_maps(pixels=True)


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


# ------------------------------------------------------------------------- decoder LLMs: answers token by token

RGBA = re.compile(r"rgba\((\d+), (\d+), (\d+), ([\d.]+)\)")
ORANGE, BLUE = (234, 88, 12), (37, 99, 235)


class Words:
    """A tokenizer's ``decode`` for the pictures: an id becomes a word; a few are text that HTML and a ``<script>``
    element must escape."""

    AWKWARD = {1: "</script><b>", 2: "a&b", 3: "\n", 4: '"q"'}

    def decode(self, ids):
        (i,) = ids
        return self.AWKWARD.get(int(i), f"w{int(i)}")


@pytest.fixture(scope="module")
def generation():
    """A tiny Llama's explanation of two left-padded prompts with given answers of 3 and 2 tokens (full LRP: signed
    relevance); the first prompt starts with the awkward tokens."""
    model = D.causal_lm("llama", torch.float32)
    batch = D.batch((7, 4), seed=3)  # a seed whose relevance has negative entries
    batch["input_ids"][0, :4] = torch.tensor([1, 2, 3, 4])
    return tl.explain_generation(model, batch, answer=[[5, 6, 7], [8, 9]], method="full_lrp")


class _Page(HTMLParser):
    """The parts of a generation page the tests read: per sample its token spans and its JSON data; the checkbox;
    the script."""

    def __init__(self, page: str):
        super().__init__()
        self.samples, self.checkboxes, self.code, self._span, self._script = [], {}, "", None, None
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if tag == "div" and "generation" in classes:
            self.samples.append({"spans": [], "data": ""})
        elif tag == "span" and "tok" in classes:
            self._span = {"classes": classes, "style": a["style"], "title": a["title"], "text": ""}
            self.samples[-1]["spans"].append(self._span)
        elif tag == "script":
            self._script = "data" if a.get("type") == "application/json" else "code"
        elif tag == "input":
            self.checkboxes[a["class"]] = a

    def handle_endtag(self, tag):
        if tag == "span":
            self._span = None
        elif tag == "script":
            self._script = None

    def handle_data(self, data):
        if self._span is not None:
            self._span["text"] += data
        elif self._script == "data":
            self.samples[-1]["data"] += data
        elif self._script == "code":
            self.code += data


def _tints(backgrounds: list[str]) -> list[tuple[tuple[int, int, int], float] | None]:
    """``(rgb, alpha)`` per CSS background (``None`` for transparent)."""
    out = []
    for b in backgrounds:
        m = RGBA.search(b)
        out.append(None if m is None else (tuple(int(v) for v in m.groups()[:3]), float(m.group(4))))
    return out


def _expected_tints(row: torch.Tensor, left_out: set[int]):
    """The colours of a row by their definition: orange for r ≥ 0, blue for r < 0, opacity |r| / max |r|; the
    columns ``left_out`` uncoloured and not in the maximum."""
    values = row.double().tolist()
    scale = max(abs(v) for c, v in enumerate(values) if c not in left_out)
    return [None if c in left_out else (BLUE if v < 0 else ORANGE, min(1.0, abs(v) / scale))
            for c, v in enumerate(values)]


def _assert_tints(found, expected):
    assert len(found) == len(expected)
    for f, e in zip(found, expected):
        if e is None:
            assert f is None
        else:
            assert f[0] == e[0] and abs(f[1] - e[1]) <= 5e-4, (f, e)


def test_generation_html_holds_every_row_exactly(generation):
    gen = generation
    assert bool((gen.relevance < 0).any())  # full LRP: both signs, so both colours are checked below
    words = Words()
    page = _Page(viz.html_page(viz.generation_html(gen, words, titles=["first", "second"])))
    assert len(page.samples) == 2 and set(page.checkboxes) == {"hide-first", "hide-self"}
    assert "checked" not in page.checkboxes["hide-first"] and "checked" in page.checkboxes["hide-self"]
    for i, sample in enumerate(page.samples):
        data = json.loads(sample["data"])
        real_ids = gen.input_ids[i][gen.attention_mask[i]].tolist()
        n_prompt = int(gen.prompt_mask[i].sum())
        assert data["prompt"] == n_prompt and data["tokens"] == [words.decode([t]) for t in real_ids]
        rows = torch.tensor(data["rows"], dtype=gen.relevance.dtype)
        assert rows.shape == (int(gen.answer_mask[i].sum()), len(real_ids))  # one row per answer token
        assert torch.equal(rows, gen.matrix(i))  # the explanation's numbers, not roundings
        answered = gen.answer_mask[i]
        assert torch.equal(torch.tensor(data["logit"], dtype=gen.relevance.dtype), gen.explained_logit[i][answered])
        assert torch.equal(torch.tensor(data["share"], dtype=gen.relevance.dtype),
                           gen.first_token_share[i][answered])
        spans = sample["spans"]
        assert [s["text"].replace("↵", "") for s in spans] == data["tokens"]  # every token, escaped and readable
        assert [("ans" in s["classes"]) for s in spans] == [c >= n_prompt for c in range(len(spans))]
        assert [("explained" in s["classes"]) for s in spans] == [c == n_prompt for c in range(len(spans))]
        # the token the first answer token is predicted from: outlined, and left out of the scale by default
        assert [("self" in s["classes"]) for s in spans] == [c == n_prompt - 1 for c in range(len(spans))]
        assert [("left-out" in s["classes"]) for s in spans] == [c == n_prompt - 1 for c in range(len(spans))]
        # the first tint: the first answer token's row
        _assert_tints(_tints([s["style"] for s in spans]), _expected_tints(gen.matrix(i)[0], {n_prompt - 1}))
    assert page.samples[0]["spans"][0]["text"] == "</script><b>"  # a token cannot end the data's element


@pytest.mark.parametrize("exclude_first,exclude_self", [(True, True), (True, False), (False, False)])
def test_generation_html_leaves_out_what_is_asked(generation, exclude_first, exclude_self):
    """The first token (an attention sink) and the token the answer token is predicted from: uncoloured and out of
    the scale when asked, the checkboxes saying so."""
    page = _Page(viz.generation_html(generation, Words(), exclude_first=exclude_first, exclude_self=exclude_self))
    assert ("checked" in page.checkboxes["hide-first"]) == exclude_first
    assert ("checked" in page.checkboxes["hide-self"]) == exclude_self
    for i, sample in enumerate(page.samples):
        n_prompt = int(generation.prompt_mask[i].sum())
        left_out = ({0} if exclude_first else set()) | ({n_prompt - 1} if exclude_self else set())
        assert [("left-out" in s["classes"]) for s in sample["spans"]] == [
            c in left_out for c in range(len(sample["spans"]))]
        _assert_tints(_tints([s["style"] for s in sample["spans"]]), _expected_tints(generation.matrix(i)[0], left_out))


# A page's script in node, on a stand-in for the few DOM calls it makes: the events are fired in order and, after
# each, every span's background and classes and the status line are recorded.
_DOM = r"""
const desc = JSON.parse(require('fs').readFileSync(0, 'utf8'));
function node(extra) {
  const listeners = {}, classes = new Set(extra.classes || []);
  return Object.assign({
    style: {}, dataset: {}, title: '', textContent: '',
    classList: {toggle(name, on) { if (on) classes.add(name); else classes.delete(name); },
                contains(name) { return classes.has(name); }, list() { return [...classes]; }},
    addEventListener(type, f) { (listeners[type] = listeners[type] || []).push(f); },
    fire(type) { (listeners[type] || []).forEach(f => f()); },
  }, extra);
}
const checkboxes = {'input.hide-first': node({checked: desc.first}), 'input.hide-self': node({checked: desc.self})};
const samples = desc.samples.map(s => {
  const spans = Array.from({length: s.spans}, () => node({}));
  const status = node({}), data = node({textContent: s.data});
  return node({spans, status,
    querySelector(sel) { return sel === '.status' ? status : data; },
    querySelectorAll(sel) { return spans; }});
});
const box = node({querySelector(sel) { return checkboxes[sel]; }, querySelectorAll() { return samples; }});
globalThis.document = {querySelectorAll() { return [box]; }};
new Function(desc.code)();
new Function(desc.code)();  // a second fragment's copy of the script leaves this one alone
const record = () => samples.map(g => ({
  backgrounds: g.spans.map(s => s.style.background),
  classes: g.spans.map(s => s.classList.list()),
  status: g.status.textContent}));
const states = [record()];
for (const [what, sample, index] of desc.events) {
  if (what in checkboxes) { checkboxes[what].checked = !checkboxes[what].checked; checkboxes[what].fire('change'); }
  else samples[sample].spans[index].fire(what);
  states.push(record());
}
process.stdout.write(JSON.stringify(states));
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node to run the page's script")
def test_generation_page_retints_with_the_row_of_the_token_under_the_pointer(generation, tmp_path):
    gen = generation
    page = _Page(viz.generation_html(gen, Words()))
    n_prompt = int(gen.prompt_mask[0].sum())
    events = [["mouseenter", 0, n_prompt + 2], ["mouseleave", 0, n_prompt + 2], ["click", 0, n_prompt + 1],
              ["mouseenter", 0, n_prompt + 2], ["mouseleave", 0, n_prompt + 2], ["input.hide-first"],
              ["mouseenter", 0, 0],  # a prompt token: nothing happens
              ["input.hide-self"], ["focus", 0, n_prompt]]
    desc = {"first": False, "self": True, "code": page.code, "events": events,
            "samples": [{"spans": len(s["spans"]), "data": s["data"]} for s in page.samples]}
    script = tmp_path / "dom.js"
    script.write_text(_DOM)
    run = subprocess.run(["node", str(script)], input=json.dumps(desc), capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    states = json.loads(run.stdout)
    rows = gen.matrix(0)
    shown_row = [0, 2, 0, 1, 2, 1, 1, 1, 1, 0]  # after load, then after each event
    hide_first = [False] * 6 + [True] * 4
    hide_self = [True] * 8 + [False] * 2
    for state, j, first_out, self_out in zip(states, shown_row, hide_first, hide_self, strict=True):
        shown = state[0]
        here, columns = n_prompt + j, range(rows.shape[1])
        left_out = ({0} if first_out else set()) | ({here - 1} if self_out else set())
        _assert_tints(_tints(shown["backgrounds"]), _expected_tints(rows[j], left_out))
        assert ["explained" in c for c in shown["classes"]] == [c == here for c in columns]
        assert ["later" in c for c in shown["classes"]] == [c > here for c in columns]
        assert ["self" in c for c in shown["classes"]] == [c == here - 1 for c in columns]
        assert ["left-out" in c for c in shown["classes"]] == [c in left_out for c in columns]
        assert shown["status"].startswith(f"answer token {j + 1} of 3: ")
        assert f"{100 * float(gen.first_token_share[0, j]):.1f} %" in shown["status"]
        # the other sample keeps its first row
        other_out = ({0} if first_out else set()) | ({int(gen.prompt_mask[1].sum()) - 1} if self_out else set())
        _assert_tints(_tints(state[1]["backgrounds"]), _expected_tints(gen.matrix(1)[0], other_out))


def _one_sample(values: torch.Tensor, n_prompt: int) -> tl.GenerationExplanation:
    """A hand-made explanation of one prompt of ``n_prompt`` tokens and an answer of ``len(values)`` tokens."""
    n_answer, n_real = values.shape
    real = torch.ones(1, n_real, dtype=torch.bool)
    return tl.GenerationExplanation(
        relevance=values[None], input_ids=torch.arange(10, 10 + n_real)[None], attention_mask=real,
        prompt_mask=torch.arange(n_real)[None] < n_prompt, answer_ids=torch.arange(10 + n_prompt, 10 + n_real)[None],
        answer_mask=torch.ones(1, n_answer, dtype=torch.bool), explained_logit=torch.zeros(1, n_answer),
        position=torch.arange(n_prompt - 1, n_real - 1)[None], first_token_share=torch.zeros(1, n_answer),
        method="hand-made")


class SameWidth:
    def decode(self, ids):
        return "tok"  # every label as wide: only the number of cells sets the picture's size


def _matrix(values, n_prompt, **kw) -> np.ndarray:
    """The picture of one hand-made sample, with a short title (a long one would set the picture's width)."""
    picture = viz.generation_matrix(_one_sample(values, n_prompt), SameWidth(), titles=["m"], **kw)
    return np.asarray(picture, dtype=np.int64)


def _changed_box(a: np.ndarray, b: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero((a != b).any(-1))
    return int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1


def test_generation_matrix_has_a_cell_per_answer_and_input_token():
    """Each further prompt token widens the picture by one cell; each further answer token (a row, and a column)
    widens and heightens it by one cell: the picture's aspect is the matrix's."""
    def picture(n_prompt, n_answer):
        values = torch.full((n_answer, n_prompt + n_answer), 0.5)
        values[0, 0] = 1.0  # the same scale everywhere, so the colour bar's labels keep their width
        return _matrix(values, n_prompt)

    base = picture(6, 6)
    for more_prompt, more_answer in ((3, 0), (0, 2), (4, 3)):
        other = picture(6 + more_prompt, 6 + more_answer)
        assert other.shape[1] - base.shape[1] == (more_prompt + more_answer) * viz.CELL
        assert other.shape[0] - base.shape[0] == more_answer * viz.CELL


def test_generation_matrix_cells_and_colours():
    """A cell's value shows in exactly one CELL × CELL square, one cell further right (down) per column (row), in
    white blended with orange (positive) or blue (negative) by |r| over the largest |r|."""
    n_prompt, values = 4, torch.full((5, 9), 0.1)
    values[4, 6] = -2.0  # the largest |r|: the scale is 2

    def with_cell(r, c, v):
        changed = values.clone()
        changed[r, c] = v
        return _matrix(changed, n_prompt)

    plain = _matrix(values, n_prompt)
    y0, x0, y1, x1 = _changed_box(plain, with_cell(2, 2, 1.0))
    assert (y1 - y0, x1 - x0) == (viz.CELL, viz.CELL)
    assert _changed_box(plain, with_cell(2, 3, 1.0)) == (y0, x0 + viz.CELL, y1, x1 + viz.CELL)
    assert _changed_box(plain, with_cell(3, 2, 1.0)) == (y0 + viz.CELL, x0, y1 + viz.CELL, x1)
    # the answer's columns come after a split of SPLIT pixels
    assert _changed_box(plain, with_cell(2, 4, 1.0)) == (y0, x0 + 2 * viz.CELL + viz.SPLIT, y1,
                                                          x1 + 2 * viz.CELL + viz.SPLIT)
    for value, hue in ((1.0, ORANGE), (-1.5, BLUE), (2.0, ORANGE)):
        a = abs(value) / 2.0
        cell = with_cell(2, 2, value)[y0:y1, x0:x1].reshape(-1, 3)
        expected = np.round(255 * (1 - a) + np.array(hue) * a)
        assert (np.abs(cell - expected) <= 1).all(), (value, cell[0], expected)
    # a cell at or after its row's own token (not read when that token was predicted) shows no value
    assert np.array_equal(plain, with_cell(0, n_prompt, 1.0))


def test_generation_matrix_can_leave_the_first_token_out():
    """With exclude_first the first token's column is grey whatever its value, and the scale is the largest |r|
    of the others (a cell at that value is full orange)."""
    values = torch.full((4, 8), 0.2)
    values[:, 0] = 50.0  # an attention sink
    values[3, 5] = values[0, 1] = 1.0  # two cells at the largest |r| but the sink's: one is changed below
    kept = _matrix(values, 4, exclude_first=True)
    lower = values.clone()
    lower[3, 5] = 0.2
    y0, x0, y1, x1 = _changed_box(kept, _matrix(lower, 4, exclude_first=True))
    assert (np.abs(kept[y0:y1, x0:x1] - np.array(ORANGE)) <= 1).all()
    bigger_sink = values.clone()
    bigger_sink[:, 0] = 500.0
    assert np.array_equal(kept, _matrix(bigger_sink, 4, exclude_first=True))  # the sink's value does not show
    assert not np.array_equal(_matrix(values, 4), _matrix(bigger_sink, 4))  # it does without exclude_first


def test_generation_matrix_leaves_out_the_token_each_answer_token_is_predicted_from():
    """By default the cell of the token an answer token is predicted from (row r, column n_prompt − 1 + r) shows
    nothing and does not set the scale; with exclude_self=False it does."""
    values = torch.full((3, 7), 0.3)
    values[0, 1] = 1.0
    bigger = values.clone()
    bigger[1, 4] = 40.0  # row 1 is predicted from column 4 − 1 + 1
    assert np.array_equal(_matrix(values, 4), _matrix(bigger, 4))
    assert not np.array_equal(_matrix(values, 4, exclude_self=False), _matrix(bigger, 4, exclude_self=False))


def test_save_generation_matrix_stacks_the_samples(generation, tmp_path):
    from PIL import Image

    path = viz.save_generation_matrix(tmp_path / "m.png", generation, Words())
    assert path.stat().st_size > 0
    one = [viz.generation_matrix(generation, Words(), sample=i) for i in range(2)]
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        assert im.size == (max(p.width for p in one), sum(p.height for p in one))
        top = np.asarray(im)[: one[0].height, : one[0].width]
        assert np.array_equal(top, np.asarray(one[0]))
