"""bench/compile_check.py loaded as a module for the tests that use its model table, recording and compile jobs."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def compile_check():
    """bench/compile_check.py as a module (registered: its dataclasses look their module up)."""
    if "compile_check" not in sys.modules:
        spec = importlib.util.spec_from_file_location("compile_check", ROOT / "bench" / "compile_check.py")
        sys.modules["compile_check"] = mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    return sys.modules["compile_check"]
