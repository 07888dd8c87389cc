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
