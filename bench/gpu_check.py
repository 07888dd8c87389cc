"""The device check for one lent GPU slot: three commands, in order of value, each well inside one 10-minute call.

    bash bench/gpu_check.sh verdicts   # 1. correctness: every backend × dtype × method vs the CPU float64 reference
    bash bench/gpu_check.sh ratios     # 2. the headline ratios: explanation / input gradient, time and peak memory
    bash bench/gpu_check.sh extras     # 3. autotuned against default tiles, attention kernels vs ceilings, profile
    python3 bench/gpu_check.py verdicts --dry-run   # on a CPU: each stage's compile count and time estimate vs limit

A slot is about 15 minutes of device time in all (machine start included), at most 10 minutes per command, on a bare
machine (torch, Triton, timm and transformers preinstalled; no package registry). So:

* **Budgets.** Each command's stage limits add up to at most 420 s (30 % under the 600 s cap), and ``--dry-run``
  shows every stage's estimate at ≤ 70 % of its limit. The estimate counts the Triton compilations the stage
  triggers (its launches recorded on meta tensors, specialized as the JIT would for sm_90a, minus those an earlier
  stage of the same command compiled), times the compile cost per configuration measured on the machine running the
  dry run, divided by the stage's parallelism; plus the stage's other work (imports and start-up, the CPU float64
  references, timed runs), measured where it can run on a CPU and modelled where it cannot.
* **Nothing is lost to a timeout.** Each stage runs in its own process under its own limit; every stage prints as it
  goes (unbuffered) and appends each CSV row as soon as it is measured, so a killed stage leaves its partial results
  and the next stage still runs.
* **Bare-machine safe.** The tree runs uninstalled (``PYTHONPATH=.``: ``transformer_lrp.triton_kernels`` resolves to
  ``triton_kernels/``); the CUDA C++ extension builds in the background during command 1 (in place, so later commands
  on the same warm machine find it) and only the ``cuda`` rows wait for it or are skipped with the reason. Autotuning
  is off (``TLRP_AUTOTUNE=0``) except in the stage that measures it. Triton's cache lives in an ignored folder of the
  tree, which a warm machine keeps between commands.
* **Verdicts are tolerances from first principles** (``tolerance`` below), not tuned thresholds.

Results go to ``$OUT`` (the device tool's folder) or ``bench/results/gpu_check/``: ``gpu_check.log``,
``verdicts.csv``, ``explain_ratio.csv``, ``attention_kernels.csv``, ``autotune.csv``, ``profile.txt``, with the
device, driver, torch and Triton versions in ``environment.txt`` and on every CSV row.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import heapq
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

CALL_CAP_S = 600  # the device tool's limit per command
COMMAND_BUDGET_S = 420  # 30 % under the cap
STAGE_SHARE = 0.70  # a stage's estimate must stay under this share of its limit
DTYPES = ("bf16", "fp16", "fp32", "tf32")
TRITON_CACHE = ROOT / "bench" / "results" / "scratch" / "triton_cache"
# A rehearsal on a CPU (tests/test_gpu_check.py): GPU_CHECK_DEVICE=cpu runs the same commands with the kernels under
# the interpreter, and GPU_CHECK_TINY=1 swaps the workloads for tiny models of the same families.
DEVICE = os.environ.get("GPU_CHECK_DEVICE", "cuda")
TINY = os.environ.get("GPU_CHECK_TINY", "0") == "1"
REHEARSAL_SLACK = 3  # a CPU rehearsal's stage limits: the device's × this (see run_command)
if TINY:
    DTYPES = ("fp32", "bf16")


def out_dir() -> Path:
    path = Path(os.environ.get("OUT") or ROOT / "bench" / "results" / "gpu_check")
    path.mkdir(parents=True, exist_ok=True)
    return path


def say(*parts) -> None:
    print(*parts, flush=True)


# ------------------------------------------------------------------------------------------ tolerance (item 5)

# Unit roundoff of each precision's products and stored values (TF32 keeps 10 explicit mantissa bits, as fp16).
UNIT_ROUNDOFF = {"bf16": 2.0**-8, "fp16": 2.0**-11, "fp32": 2.0**-24, "tf32": 2.0**-11, "fp64": 2.0**-53}
# How much worse than the reference path's first-order error a correct kernel may be (see ``tolerance``).
KERNEL_FACTOR = 4.0
REALIZATIONS = 4  # the reference path's runs (one on the weights as given, three jittered) that sample its error


def relative_error(got, want) -> float:
    """Max-abs error relative to the reference map's largest entry (per call; the maps are per-sample rows)."""
    scale = float(want.abs().max())
    return float((got.double().cpu() - want).abs().max()) / max(scale, 1e-300)


def max_log_sum_exp(model, inputs) -> float:
    """The largest ``|lse|`` of any attention row of the model on these inputs (every block, every tower), by the
    sweep's own float64 forward: the kernels form ``A = exp(s − lse)``, whose relative error grows with it."""
    import torch

    from transformer_lrp import sweep
    from transformer_lrp.adapters import build_encoder, clip

    if clip.matches(model):
        spec = clip.build(model)
        towers = [(spec.encoder("vision"), inputs["pixel_values"]),
                  (spec.encoder("text"), {k: v for k, v in inputs.items() if k != "pixel_values"})]
    else:
        towers = [(build_encoder(model), inputs)]
    largest = 0.0
    with torch.no_grad():
        for enc, tower_inputs in towers:
            emb = enc.embed(tower_inputs)
            _, caches, _ = sweep.forward(enc, emb, 0, False, "torch")
            for c in caches.values():
                real = c.lse.abs() < 1e29  # rows that see no key hold a sentinel, not a log-sum-exp
                largest = max(largest, float(c.lse.abs().where(real, 0).max()))
    return largest


def tolerance(reference_errors: list[float], output_roundoff: float = 0.0, lse_roundoff: float = 0.0) -> float:
    r"""The largest error a correct kernel may show against the float64 reference, from first principles.

    * An explanation is a composition of products, sums and the rules' elementwise ops. Under standard rounding each
      op contributes a relative error of at most ``u`` (the precision's unit roundoff), and the explanation's
      first-order error is the sum of those contributions weighted by how sensitive the result is to each op:
      ``err = Σ_ops κ_op · δ_op`` with ``|δ_op| ≤ u``.
    * The reference path (``backend="torch"``) and the kernels compute the same ops on the same (rounded) weights and
      inputs, with the same ``u`` for their products (tensor cores with float32 accumulation for half precision and
      TF32, FMA for IEEE float32 and float64). They differ in the order of their sums (tiles, the online softmax) and
      in three ops: the kernels' float32 division is ``div.full.f32`` (≤ 2 ulp against 0.5 for a correctly rounded
      division), their ``exp`` is ``ex2.approx`` of a product with ``log2(e)`` (≤ 2 ulp plus one rounding), and FMA
      contraction removes roundings. So each ``|δ_op|`` of the kernels is at most 4 times the reference path's bound,
      and their error is at most ``KERNEL_FACTOR = 4`` times an error the reference path can show.
    * Which error the reference path shows depends on how the roundings fall (a different order of sums is a different
      fall): one run is one sample. The reference path is therefore run ``REALIZATIONS`` times, on the weights and
      inputs as given and with each weight and input moved by ±2 ulp of the precision (``jittered``), which
      re-rolls every rounding downstream; their largest error against the float64 reference is the error level of a
      correct computation in that precision (it includes what rounding the weights themselves costs).

    * Both paths return the relevance in the model's dtype: below one rounding of that dtype (``output_roundoff``,
      relative to the largest entry) no error can be resolved, so that is the level's floor.
    * One op differs in its sensitivity, not only its rounding: the kernels form ``A = exp(s − lse)`` from the
      forward's log-sum-exp, where the reference divides ``exp(s − max)`` by its sum. Rounding ``s`` and ``lse``
      moves the exponent by up to ``u·(|s| + |lse|) ≤ 2u·max|lse|`` (for the entries that matter, ``s ≤ lse``), a
      relative error of ``A`` the reference path does not have (``lse_roundoff = 2u·max|lse|``, from
      ``max_log_sum_exp``; e.g. 4.4 ulp on a tiny ViT's raw attention where the reference's realizations all show
      0.9 ulp). It is a floor of the level too.

    Hence ``tolerance = 4 · max(errors of the reference path's realizations, output_roundoff, lse_roundoff)``.
    Measured on the CPU (the interpreter, float32, padded BERT; tests/test_gpu_check.py): the kernels' error lies
    inside the realizations' spread, and a wrong kernel (a dropped padding mask) lands 45× (full LRP, whose float32
    error is ~1e-3 there) to 10⁵× (GAE) above the tolerance.
    """
    return KERNEL_FACTOR * max(*reference_errors, output_roundoff, lse_roundoff)


# The result dtype's roundoff per precision label (TF32 returns float32).
OUTPUT_ROUNDOFF = {**UNIT_ROUNDOFF, "tf32": UNIT_ROUNDOFF["fp32"]}
VACUOUS = 1.0  # a tolerance this large (relative) cannot tell a wrong kernel: the row says so


def jittered(model, inputs, u: float, seed: int):
    """A float64 copy of the model and inputs with every weight and input value scaled by ``1 ± 2u`` (random signs):
    cast back to the precision of ``u``, each value moves by one or two ulp."""
    import copy

    import torch

    g = torch.Generator().manual_seed(seed)

    def jitter(t):
        signs = 2 * torch.randint(0, 2, t.shape, generator=g, dtype=torch.float64) - 1
        return (t.double() * (1 + 2 * u * signs)).to(t.dtype)

    m = copy.deepcopy(model).double()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(jitter(p))
    if isinstance(inputs, dict):
        return m, {k: (jitter(v) if v.is_floating_point() else v) for k, v in inputs.items()}
    return m, jitter(inputs)


# ------------------------------------------------------------------------------------------------ the models

@dataclass(frozen=True)
class Workload:
    """A model of real width (three blocks: the pooled top block, a middle one and the lowest, whose reverse passes
    differ; more blocks repeat the middle one) and its inputs, built the same way on the CPU reference side and the GPU
    side (same seed)."""

    name: str
    build: Callable  # () -> nn.Module (random weights under the caller's seed)
    inputs: Callable  # (model) -> inputs of explain (CPU, float64 model)
    record: Callable  # (dtype_label, arch, runs) -> recorded launches (compile count)


def _timm_vit():
    import timm

    return timm.create_model("vit_base_patch16_224", pretrained=False, depth=3, num_classes=1000)


def _bert():
    import transformers

    cfg = transformers.BertConfig(num_hidden_layers=3, num_labels=2)
    return transformers.BertForSequenceClassification(cfg)


def _clip():
    import transformers

    cfg = transformers.CLIPConfig(text_config=dict(num_hidden_layers=3), vision_config=dict(num_hidden_layers=3))
    return transformers.CLIPModel(cfg)


def _images(model, batch=2):
    import torch

    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 3, 224, 224, generator=g, dtype=torch.float64)


def _text(model, lengths=(128, 97, 40)):
    """Right-padded token ids of the given real lengths (BERT's [CLS] … [SEP])."""
    import torch

    g = torch.Generator().manual_seed(2)
    n = max(lengths)
    ids = torch.randint(1000, 20000, (len(lengths), n), generator=g)
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    for i, m in enumerate(lengths):
        ids[i, 0], ids[i, m - 1], ids[i, m:] = 101, 102, 0
        mask[i, :m] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _clip_pairs(model, lengths=(16, 9)):
    import torch

    g = torch.Generator().manual_seed(3)
    n = max(lengths)
    vocab = model.config.text_config.vocab_size
    ids = torch.randint(1, vocab - 2, (len(lengths), n), generator=g)
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    for i, m in enumerate(lengths):
        ids[i, m - 1] = vocab - 1  # end of text: the highest id, which CLIP pools
        ids[i, m:] = 0
        mask[i, :m] = 1
    return {"pixel_values": _images(model, len(lengths)), "input_ids": ids, "attention_mask": mask}


def _record(build, batch, tokens=None, tower=None, padded=(True,)):
    def record(dtype_label, arch, runs, backend="triton"):
        import compile_check as cc

        case = cc.ModelCase("workload", build, batch, tokens=tokens, tower=tower)
        return cc.record_case(case, dtype_label, arch, runs=runs, padded=padded, backend=backend)

    return record


def _record_clip(batch, tokens):
    vision = _record(_clip, batch, tower="vision")
    text = _record(_clip, batch, tokens=tokens, tower="text")

    def record(dtype_label, arch, runs, backend="triton"):
        return vision(dtype_label, arch, runs, backend) + text(dtype_label, arch, runs, backend)

    return record


def _smollm2_shape():
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                                   num_key_value_heads=3, num_hidden_layers=3, vocab_size=49152,
                                   tie_word_embeddings=True, max_position_embeddings=2048)
    return transformers.LlamaForCausalLM(cfg)


def _gemma3_shape():
    import transformers

    cfg = transformers.Gemma3TextConfig(hidden_size=640, intermediate_size=2048, num_attention_heads=4,
                                        num_key_value_heads=1, head_dim=256, num_hidden_layers=3, sliding_window=64,
                                        vocab_size=32000, layer_types=["sliding_attention", "full_attention",
                                                                       "sliding_attention"])
    return transformers.Gemma3ForCausalLM(cfg)


def _prompts(model, lengths=(160, 97, 40)):
    """Left-padded prompts of random real-vocabulary tokens."""
    import torch

    g = torch.Generator().manual_seed(4)
    n = max(lengths)
    vocab = model.config.vocab_size
    ids = torch.zeros(len(lengths), n, dtype=torch.long)
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    for i, m in enumerate(lengths):
        ids[i, n - m:] = torch.randint(min(100, vocab // 3), vocab, (m,), generator=g)
        mask[i, n - m:] = 1
    return {"input_ids": ids, "attention_mask": mask}


WORKLOADS = [
    Workload("vit_b16_depth3", _timm_vit, _images, _record(_timm_vit, 2)),
    Workload("bert_base_depth3_padded", _bert, _text, _record(_bert, 3, tokens=128)),
    Workload("clip_b32_depth3_pairs", _clip, _clip_pairs, _record_clip(2, 16)),
    # decoders: GQA (9:3, head dim 64), causal with left padding; Gemma's head dim 256, MQA and a sliding window
    Workload("smollm2_shape_depth3_left_padded", _smollm2_shape, _prompts, _record(_smollm2_shape, 3, tokens=160)),
    Workload("gemma3_shape_d256_window_depth3", _gemma3_shape, _prompts, _record(_gemma3_shape, 3, tokens=160)),
]


def _tiny_vit():
    import timm

    return timm.create_model("vit_base_patch16_224", pretrained=False, depth=3, num_classes=5, img_size=32,
                             patch_size=8, embed_dim=32, num_heads=2)


def _tiny_bert():
    import transformers

    return transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=30000, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=48,
        num_labels=2))


def _tiny_clip():
    import transformers

    small = dict(hidden_size=32, intermediate_size=48, num_attention_heads=2, num_hidden_layers=2)
    return transformers.CLIPModel(transformers.CLIPConfig(
        text_config=dict(small, vocab_size=100, eos_token_id=99, bos_token_id=98),
        vision_config=dict(small, image_size=32, patch_size=8), projection_dim=16))


def _tiny_llama():
    import transformers

    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64))


# the CPU rehearsal's (GPU_CHECK_TINY=1): tiny models of the same families
TINY_WORKLOADS = [
    Workload("tiny_vit", _tiny_vit, lambda m: _images(m)[..., :32, :32], _record(_tiny_vit, 2)),
    Workload("tiny_bert_padded", _tiny_bert, lambda m: _text(m, (12, 7)), _record(_tiny_bert, 2, tokens=12)),
    Workload("tiny_clip_pairs", _tiny_clip, lambda m: {**_clip_pairs(m, (6, 4)),
                                                       "pixel_values": _images(m)[..., :32, :32]},
             _record_clip(2, 6)),
    Workload("tiny_llama_left_padded", _tiny_llama, lambda m: _prompts(m, (9, 5)),
             _record(_tiny_llama, 2, tokens=9)),
]
if TINY:
    WORKLOADS = TINY_WORKLOADS
METHODS = ("transformer_attribution", "gae", "rollout", "raw_attention", "attention_gradcam", "partial_lrp",
           "full_lrp", "attnlrp", "cp_lrp")
VERDICT_RUNS = [(m, 0, False) for m in METHODS]
VERDICT_BACKENDS = ("torch", "triton", "cuda")


def _explain_relevance(model, inputs, method, backend=None):
    """The explanation's relevance tensors (CLIP: image and text rows) as a dict."""
    import transformer_lrp as tl

    e = tl.explain(model, inputs, method=method, backend=backend)
    if isinstance(e, tl.ClipExplanation):
        return {"image": e.image.relevance, "text": e.text.relevance}, None
    return {"relevance": e.relevance}, e.target


def _cast_inputs(inputs, dtype, device):
    import torch

    if isinstance(inputs, dict):
        return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device, dtype)
    return inputs


# ----------------------------------------------------------------------------------------------- stage bodies


def environment() -> dict:
    import torch

    env = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), python=platform.python_version(),
               torch=torch.__version__, cuda=str(torch.version.cuda))
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError as exc:
        env["triton"] = f"missing ({exc})"
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
        major, minor = torch.cuda.get_device_capability()
        env["capability"] = f"{major}.{minor}"
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,memory.total", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            env["driver"] = smi.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            env["driver"] = "unknown"
    else:
        env["device"] = "cpu"
    env["cpus"] = str(os.cpu_count())
    return env


class RowWriter:
    """Appends CSV rows as they are measured (flushed at once: a killed stage keeps what it wrote)."""

    def __init__(self, name: str, env: dict):
        self.path = out_dir() / name
        self.env = {k: env.get(k, "") for k in ("device", "driver", "torch", "triton")}

    def write(self, row: dict) -> None:
        row = {**row, **self.env}
        new = not self.path.exists() or self.path.stat().st_size == 0
        with self.path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            if new:
                w.writeheader()
            w.writerow(row)
            f.flush()


def stage_setup() -> None:
    """Versions, and the CUDA C++ build started in the background (command 1 only)."""
    env = environment()
    (out_dir() / "environment.txt").write_text("\n".join(f"{k}: {v}" for k, v in env.items()) + "\n")
    for k, v in env.items():
        say(f"  {k}: {v}")
    import shutil

    if DEVICE != "cuda":
        say("  cuda build: not on a rehearsal")
        return
    nvcc = shutil.which("nvcc") or (Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc")
    log = out_dir() / "cuda_build.log"
    if not Path(nvcc).exists():
        log.write_text("no nvcc on this machine: the CUDA C++ backend is not built\n")
        say("  cuda build: no nvcc here (the cuda rows will be skipped)")
        return
    build_env = {**os.environ, "TLRP_FORCE_CUDA_BUILD": "1", "MAX_JOBS": "4", "NVCC_THREADS": "2",
                 "TLRP_CUDA_ARCHS": env.get("capability", "9.0"),
                 "CUDA_HOME": str(Path(nvcc).resolve().parents[1])}
    # in place, detached: the verdict stages run meanwhile, and a later command on this machine finds the module
    with log.open("w") as f:
        subprocess.Popen(["timeout", "330", "nice", sys.executable, "setup.py", "build_ext", "--inplace"], cwd=ROOT,
                         env=build_env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    say(f"  cuda build: started in the background (log {log.name})")


def reference_worker(workload: str, threads: int) -> None:
    """One workload's CPU float64 explanations, every method."""
    import torch

    torch.set_num_threads(threads)
    w = next(x for x in WORKLOADS if x.name == workload)
    torch.manual_seed(0)
    model = w.build().eval().double()
    inputs = _cast_inputs(w.inputs(model), torch.float64, "cpu")
    store = {}
    for method in METHODS:
        t0 = time.time()
        ref, target = _explain_relevance(model, inputs, method, "torch")
        store[(w.name, method)] = dict(ref=ref, target=target)
        say(f"  {w.name:<26} {method:<24} reference in {time.time() - t0:5.1f} s")
    torch.save(store, out_dir() / f"references_{w.name}.pt")


def stage_references() -> None:
    """The CPU float64 explanations of every workload and method (one process per workload, the cores shared)."""
    threads = max(1, (os.cpu_count() or 2) // len(WORKLOADS))
    _run_workers([["--reference", w.name, str(threads)] for w in WORKLOADS], parallel=len(WORKLOADS))


def load_references() -> dict:
    import torch

    store = {}
    for w in WORKLOADS:
        path = out_dir() / f"references_{w.name}.pt"
        if path.exists():
            store.update(torch.load(path, weights_only=False))
    return store


def verdict_worker(workload: str, dtype_label: str, backends: tuple[str, ...]) -> None:
    """One workload in one precision on the GPU, every method and backend against the references."""
    import copy

    import torch

    torch.set_num_threads(1)
    env = environment()
    refs = load_references()
    w = next(x for x in WORKLOADS if x.name == workload)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "tf32": torch.float32}[
        dtype_label]
    torch.backends.cuda.matmul.allow_tf32 = dtype_label == "tf32"
    torch.manual_seed(0)
    model64 = w.build().eval().double()
    inputs64 = w.inputs(model64)
    model, inputs = copy.deepcopy(model64).to(DEVICE, dtype), _cast_inputs(inputs64, dtype, DEVICE)
    # the reference path's realizations: as given, and jittered by ±2 ulp of this precision
    realizations = [(model, inputs)] + [
        (m.to(DEVICE, dtype), _cast_inputs(i, dtype, DEVICE))
        for m, i in (jittered(model64.cpu(), inputs64, UNIT_ROUNDOFF[dtype_label], seed)
                     for seed in range(1, REALIZATIONS))]
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)
    lse_roundoff = 2 * UNIT_ROUNDOFF[dtype_label] * max_log_sum_exp(model64, inputs64)
    writer = RowWriter("verdicts.csv", env)
    for method in METHODS:
        entry = refs.get((w.name, method))
        if entry is None:
            say(f"  SKIP  {w.name} {dtype_label} {method}: no reference (the references stage did not finish)")
            continue

        def error(m, i, backend, method=method, ref=entry["ref"]):
            got = _explain_relevance(m, i, method, backend)[0]
            sync()
            return max(relative_error(got[k], ref[k]) for k in ref)

        t0 = time.time()
        try:
            level = [error(m, i, "torch") for m, i in realizations]
        except Exception as exc:  # noqa: BLE001 — a verdict, not a crash of the check
            level, detail = None, f"{type(exc).__name__}: {exc}"[:300]
            say(f"  ERROR {w.name} {dtype_label} {method} torch: {detail}")
        base = dict(workload=w.name, dtype=dtype_label, method=method)
        if level is not None:
            writer.write({**base, "backend": "torch", "error": f"{level[0]:.3e}", "bound": "", "verdict": "REF",
                          "detail": "realizations " + " ".join(f"{e:.2e}" for e in level),
                          "seconds": f"{time.time() - t0:.2f}"})
        for backend in backends:
            t0 = time.time()
            row = dict(base, backend=backend)
            try:
                err = error(model, inputs, backend)
            except Exception as exc:  # noqa: BLE001
                row.update(error="", bound="", verdict="ERROR", detail=f"{type(exc).__name__}: {exc}"[:300],
                           seconds=f"{time.time() - t0:.2f}")
                writer.write(row)
                say(f"  ERROR {w.name} {dtype_label} {method} {backend}: {row['detail']}")
                continue
            bound = (tolerance(level, OUTPUT_ROUNDOFF[dtype_label], lse_roundoff) if level is not None
                     else float("nan"))
            verdict = "PASS" if err <= bound else "FAIL"
            if verdict == "PASS" and bound >= VACUOUS:  # the reference path itself is O(1) wrong in this precision
                verdict = "VACUOUS"
            row.update(error=f"{err:.3e}", bound=f"{bound:.3e}", verdict=verdict, detail="",
                       seconds=f"{time.time() - t0:.2f}")
            writer.write(row)
            relation = ">" if verdict == "FAIL" else "≤"
            say(f"  {verdict:<7} {w.name:<26} {dtype_label:<5} {method:<24} {backend:<6} err {err:.2e} {relation} "
                f"{bound:.2e}")


def _run_workers(jobs: list[list[str]], parallel: int) -> None:
    """Run worker commands ``parallel`` at a time, relaying their output line by line as it comes."""
    pending = list(jobs)
    running: list[subprocess.Popen] = []
    lock = threading.Lock()

    def relay(proc):
        for line in proc.stdout:
            with lock:
                sys.stdout.write(line)
                sys.stdout.flush()

    threads = []
    while pending or running:
        while pending and len(running) < parallel:
            proc = subprocess.Popen([sys.executable, "-u", __file__, *pending.pop(0)], cwd=ROOT, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            running.append(proc)
            t = threading.Thread(target=relay, args=(proc,), daemon=True)
            t.start()
            threads.append(t)
        time.sleep(0.2)
        running = [p for p in running if p.poll() is None]
    for t in threads:
        t.join(timeout=5)


# The verdict workers start heaviest first (most Triton compilations, as the dry run counts them: CLIP's two towers,
# then Gemma's split 256-wide passes, ...; TF32 adds its own key-tile passes), so the light ones fill the cores that
# free up and the stage ends with its busiest worker, not behind it. The dry run models this order, not a sorted one.
VERDICT_HEAVIEST_FIRST = ("clip", "gemma", "vit", "bert")
VERDICT_DTYPE_ORDER = ("tf32", "bf16", "fp16", "fp32")


def verdict_workers() -> list[tuple[Workload, str]]:
    """The verdict stages' workers (workload × precision) in the order they start."""
    def rank(pair):
        w, d = pair
        tag = next((i for i, t in enumerate(VERDICT_HEAVIEST_FIRST) if t in w.name), len(VERDICT_HEAVIEST_FIRST))
        return tag, VERDICT_DTYPE_ORDER.index(d)

    return sorted(((w, d) for w in WORKLOADS for d in DTYPES), key=rank)


def stage_triton_verdicts() -> None:
    jobs = [["--worker", w.name, d, "triton"] for w, d in verdict_workers()]
    _run_workers(jobs, parallel=verdict_parallel(os.cpu_count() or 2))


def _cuda_extension_ready(wait_s: float) -> str | None:
    """``None`` once ``transformer_lrp._C`` imports, else why not (after waiting up to ``wait_s`` for the build)."""
    deadline = time.time() + wait_s
    if DEVICE != "cuda":
        return "no GPU (a rehearsal on the CPU)"
    check = [sys.executable, "-c", "import torch, transformer_lrp._backend as b; "
             "r = b.not_supported_reasons('cuda', (torch.zeros(1, device='cuda'),)); print('; '.join(r))"]
    while True:
        run = subprocess.run(check, cwd=ROOT, capture_output=True, text=True)
        reasons = (run.stdout + run.stderr).strip()
        if not reasons:
            return None
        if time.time() > deadline:
            return reasons.splitlines()[-1][:300]
        time.sleep(5)


# The CUDA C++ build on the device (one arch, 4 files in parallel, the attention file the longest): modelled at twice
# the 60 s its nvcc takes for one arch on 2 cores here (bench/compile_check.py --cuda: 76–96 s for two archs).
CUDA_BUILD_MODEL_S = 120
CUDA_BUILD_WAIT_S = 90


def stage_cuda_verdicts() -> None:
    why = _cuda_extension_ready(wait_s=CUDA_BUILD_WAIT_S)
    if why is not None:
        say(f"  cuda: skipped ({why}); see cuda_build.log")
        RowWriter("verdicts.csv", environment()).write(dict(workload="*", dtype="*", method="*", backend="cuda",
                                                            error="", bound="", verdict="SKIP", detail=why,
                                                            seconds=""))
        return
    jobs = [["--worker", w.name, d, "cuda"] for w, d in verdict_workers()]
    _run_workers(jobs, parallel=verdict_parallel(os.cpu_count() or 2))


def stage_warm(which: str) -> None:
    """Compile, on every core at once, the Triton configurations the command's timed stages will launch (into
    Triton's cache, where the JIT finds them), so those stages time kernels, not compilers."""
    import compile_check as cc

    if DEVICE != "cuda":
        say("  nothing to compile on a rehearsal (the interpreter runs the kernels)")
        return
    jobs = list({k: j for part in which.split(",") for k, j in _stage_jobs(part).items()}.values())
    t0 = time.time()
    results = cc.run_jobs(jobs, max(1, os.cpu_count() or 1), progress=False)
    bad = [r for r in results if r["status"] != "ok"]
    say(f"  compiled {len(jobs)} configurations in {time.time() - t0:.0f} s on {os.cpu_count()} processes; "
        f"{len(bad)} failed" + (f": {bad[0].get('error', '')}" if bad else ""))


def _bench_size(batch: str = "64") -> list[str]:
    """bench_explain.py's sizes: the goals' (ViT-B/16 at batch 64, BERT-base at 512 tokens and batch 32), or for a
    rehearsal on a CPU the quick models at batch 2."""
    if TINY:
        return ["--device", DEVICE, "--quick", "--vit-batch", "2", "--bert-batch", "2", "--seq", "16"]
    return ["--device", DEVICE, "--vit-batch", batch, "--bert-batch", "32", "--seq", "512"]


def stage_ratios(dtype_flag: list[str]) -> None:
    args = [*_bench_size(), *dtype_flag, "--repeats", "1" if TINY else "3", "--backend", _ratio_backends(),
            "--csv", str(out_dir() / "explain_ratio.csv")]
    subprocess.run([sys.executable, "-u", "bench/bench_explain.py", *args], cwd=ROOT, check=False)
    subprocess.run([sys.executable, "-u", "bench/gpu_model.py", "--compare", str(out_dir() / "explain_ratio.csv")],
                   cwd=ROOT, check=False)


def _ratio_backends() -> str:
    if DEVICE != "cuda":  # a rehearsal: the interpreter is too slow for the benchmark models
        return "torch"
    return "torch,triton" + ("" if _cuda_extension_ready(0) else ",cuda")


def stage_autotune() -> None:
    """Transformer attribution on ViT-B/16 (batch 64, bf16) with the default tiles, then autotuned (every candidate
    timed once per size class), side by side."""
    base = ["bench/bench_explain.py", *_bench_size(), "--dtype", "bfloat16", "--repeats", "3", "--backend",
            "triton" if DEVICE == "cuda" else "torch", "--only", "vit_" if TINY else "vit_base_patch16_224 transformer",
            "--csv", str(out_dir() / "autotune.csv")]
    for tune in ("0", "1"):
        say(f"  TLRP_AUTOTUNE={tune}")
        subprocess.run([sys.executable, "-u", *base, "--label", f"autotune={tune}"], cwd=ROOT, check=False,
                       env={**os.environ, "TLRP_AUTOTUNE": tune})


def stage_attention() -> None:
    subprocess.run([sys.executable, "-u", "bench/bench_attention.py", "--repeats", "10", "--csv",
                    str(out_dir() / "attention_kernels.csv"), "--device", DEVICE, *(["--quick"] if TINY else [])],
                   cwd=ROOT, check=False)


def stage_profile() -> None:
    with (out_dir() / "profile.txt").open("w") as f:
        subprocess.run([sys.executable, "-u", "bench/bench_explain.py", *_bench_size(), "--dtype", "bfloat16",
                        "--only", "vit_" if TINY else "vit_base_patch16_224 transformer", "--repeats", "2",
                        "--backend", _ratio_backends(), "--profile", "--no-save"], cwd=ROOT, check=False, stdout=f,
                       stderr=subprocess.STDOUT)
    say(f"  per-op profile written to {out_dir() / 'profile.txt'}")


# ------------------------------------------------------------------------------------------------- the plan


@dataclass
class Stage:
    name: str
    limit_s: int
    run: Callable[[], None]
    compiles: Callable[[], dict] = dict  # the compile jobs it triggers (key → job), for the dry run
    parallel: Callable[[], int] = lambda: 1  # how many processes compile at once on the device
    # the jobs each of its worker processes compiles itself, in the order they start (`parallel` at a time, the next
    # as one ends); None: one process, or a pool sharing the jobs
    per_worker: Callable[[], list[dict]] | None = None
    worker_s: Callable[[], float] = lambda: 0.0  # a worker's own work besides compiling (seconds)
    other_s: Callable[[], float] = lambda: 0.0  # the stage's other work, measured or modelled (seconds)
    note: str = ""
    warms_for: tuple[str, ...] = ()  # later stages whose compilations it performs (a warm cache)


DEVICE_CPUS = 16  # the lent machine's cores (device tool); the dry run plans with them


def _ratio_runs(bert_layers: int = 12):
    return [("transformer_attribution", 0, False), ("gae", 0, False),
            ("transformer_attribution", bert_layers - 1, True)]


def _jobs_of(launches) -> dict:
    import compile_check as cc

    jobs = {}
    for ln in launches:
        job = cc.specialize(ln, ln.candidates[0], 90)
        jobs[cc.job_key(job)] = job
    return jobs


def _verdict_jobs(backend: str) -> list[dict]:
    """Per verdict worker (workload × precision), the jobs it compiles."""
    out = []
    for w, d in verdict_workers():
        recorded = w.record(d, 90, VERDICT_RUNS)
        if backend == "cuda":  # the CUDA C++ backend leaves only the α1β0 passes to Triton
            recorded = [ln for ln in recorded if ln.name.startswith("_alpha1beta0")]
        out.append(_jobs_of(recorded))
    return out


def _stage_jobs(which: str) -> dict:
    """Compile jobs (keyed as the compile check keys them) of a stage's Triton launches, sm_90a."""
    import compile_check as cc

    launches = []
    if which in ("triton", "cuda"):
        return {k: j for jobs in _verdict_jobs(which) for k, j in jobs.items()}
    elif which.startswith("ratios_") or which in ("autotune", "profile"):
        dtypes = {"ratios_bf16": ["bf16"], "ratios_tf32": ["tf32"]}.get(which, ["bf16"])
        cases = [cc.ModelCase("vit_b16", cc._timm("vit_base_patch16_224"), 64)]
        if which.startswith("ratios_"):
            cases.append(cc.ModelCase("bert_512", cc._hf("BertConfig", "BertForSequenceClassification",
                                                         num_hidden_layers=cc.DEPTH), 32, tokens=512))
        for case in cases:
            for d in dtypes:
                launches += cc.record_case(case, d, 90, runs=_ratio_runs(cc.DEPTH), padded=(False,))
        if which == "autotune":  # every candidate of every launch is compiled and timed
            jobs = {}
            for ln in launches:
                for cand in ln.candidates:
                    job = cc.specialize(ln, cand, 90)
                    jobs[cc.job_key(job)] = job
            return jobs
    elif which == "attention":
        launches += _attention_launches()
    return _jobs_of(launches)


def _attention_launches() -> list:
    """bench_attention.py's launches (forward and the transformer-attribution backward, bf16 and fp32, its shapes)."""
    import torch

    from transformer_lrp._target import record_launches
    from transformer_lrp.ops.attention import attention_forward, attention_relevance

    launches = []
    for dtype, tf32 in ((torch.bfloat16, False), (torch.float32, False)):
        with record_launches(arch=90, tf32=tf32) as rec:
            for b, h, n, d in ((64, 12, 197, 64), (32, 12, 512, 64)):
                q = torch.empty(b, h, n, d, dtype=dtype, device="meta")
                o, lse = attention_forward(q, q, q, 0.125, backend="triton")
                attention_relevance(q, q, q, o, lse, 0.125, grad_out=q, rel_out=q, map_mode="transformer_attribution",
                                    rollout=torch.empty(b, n, device="meta"), backend="triton")
        launches += rec.launches
    return launches


def _measured(key: str) -> Callable[[], float]:
    return lambda: MEASURED.get(key, 0.0)


MEASURED: dict[str, float] = {}  # filled by the dry run: start-up and CPU reference times measured here


def verdict_parallel(cpus: int) -> int:
    """Verdict workers at once: one core left to the stage's own process and the relays."""
    return max(1, min(len(WORKLOADS) * len(DTYPES), cpus - 1))


def list_schedule(durations: list[float], slots: int) -> float:
    """When the last of ``durations`` ends, started in order on ``slots`` slots, each as soon as one is free."""
    free = [0.0] * max(1, slots)
    for d in durations:
        start = heapq.heappop(free)
        heapq.heappush(free, start + d)
    return max(free)


def plan() -> dict[str, list[Stage]]:
    workers = verdict_parallel(DEVICE_CPUS)
    # A verdict worker (one workload, one precision) starts Python, torch and CUDA, builds its model and three jittered
    # copies, and runs every method on the reference path 4 times and on its kernel backend once: start-up measured
    # here, CUDA context and cuBLAS initialisation modelled at 15 s, each small-model run at 0.5 s.
    worker_s = lambda: MEASURED.get("startup", 10.0) + 15.0 + len(METHODS) * (REALIZATIONS + 1) * 0.5  # noqa: E731
    return {
        "verdicts": [
            Stage("setup", 15, stage_setup, other_s=lambda: MEASURED.get("startup", 10.0),
                  note="versions; the CUDA C++ build starts in the background"),
            Stage("references", 35, stage_references, other_s=_measured("references"),
                  note="CPU float64 references and input-rounding errors, a process per workload (see "
                       "measure_references)"),
            Stage("triton", 225, stage_triton_verdicts, compiles=lambda: _stage_jobs("triton"),
                  parallel=lambda: workers, per_worker=lambda: _verdict_jobs("triton"), worker_s=worker_s,
                  note=f"{len(WORKLOADS) * len(DTYPES)} workers (workload × precision), {workers} at a time, "
                       "heaviest first"),
            Stage("cuda", 145, stage_cuda_verdicts, compiles=lambda: _stage_jobs("cuda"), parallel=lambda: workers,
                  per_worker=lambda: _verdict_jobs("cuda"), worker_s=worker_s,
                  other_s=lambda: max(0.0, CUDA_BUILD_MODEL_S - MEASURED.get("elapsed", 0.0)),
                  note=f"waits for the background build (modelled {CUDA_BUILD_MODEL_S} s from setup) at most "
                       f"{CUDA_BUILD_WAIT_S} s"),
        ],
        "ratios": [
            Stage("warm", 60, lambda: stage_warm("ratios_bf16,ratios_tf32"),
                  compiles=lambda: {**_stage_jobs("ratios_bf16"), **_stage_jobs("ratios_tf32")},
                  parallel=lambda: DEVICE_CPUS, other_s=lambda: MEASURED.get("startup", 10.0) + 20.0,
                  note="all timed stages' configurations compiled on every core", warms_for=("bf16", "tf32")),
            Stage("bf16", 160, lambda: stage_ratios(["--dtype", "bfloat16"]),
                  compiles=lambda: _stage_jobs("ratios_bf16"), other_s=lambda: _ratio_time(),
                  note="ViT-B/16 b64, BERT-base 512 tok b32: torch, triton, cuda; peak memory"),
            Stage("tf32", 160, lambda: stage_ratios(["--dtype", "float32", "--tf32"]),
                  compiles=lambda: _stage_jobs("ratios_tf32"), other_s=lambda: _ratio_time()),
        ],
        "extras": [
            Stage("autotune", 180, stage_autotune, compiles=lambda: _stage_jobs("autotune"),
                  other_s=lambda: 2 * MEASURED.get("startup", 10.0) + 30.0,
                  note="default tiles, then every candidate timed (≈ 30 ms each) on ViT-B/16 bf16"),
            Stage("attention", 120, stage_attention, compiles=lambda: _stage_jobs("attention"),
                  other_s=lambda: MEASURED.get("startup", 10.0) + 20.0,
                  note="bench_attention.py: kernels vs the device's matmul and copy ceilings"),
            Stage("profile", 100, stage_profile, compiles=lambda: _stage_jobs("profile"),
                  other_s=lambda: MEASURED.get("startup", 10.0) + 20.0, note="torch.profiler per-op table"),
        ],
    }


def _ratio_time() -> float:
    """Start-up, model builds, and 3 interleaved repeats (+1 warm-up, +1 memory run) of 5 cases × 3 backends plus
    the input gradient, at a modelled 0.5 s per run (the torch path materializes A at batch 64; the performance
    model predicts 0.02–0.2 s for the kernels)."""
    return MEASURED.get("startup", 10.0) + 20.0 + 5 * (3 + 1) * 5 * 0.5


# --------------------------------------------------------------------------------------------------- dry run


def measure_compile_cost(jobs: list[dict], sample: int = 6) -> float:
    """Seconds of one configuration's compilation on this machine: a sample of the jobs compiled fresh (an empty
    Triton cache), one process, mean."""
    import compile_check as cc

    picked = [jobs[i * len(jobs) // sample] for i in range(min(sample, len(jobs)))]
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TRITON_CACHE_DIR": cache, "TLRP_COMPILE_CHECK_CACHE": cache}
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            t0 = time.time()
            results = cc.run_jobs(picked, 1, progress=False)
            seconds = (time.time() - t0) / max(1, len(picked))
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    # a job that failed fast (an import error, a compiler crash) would make compilation look free
    failed = [r for r in results if r["status"] != "ok"]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(picked)} sampled compilations failed, so their cost is unknown: "
                           f"{failed[0].get('error', failed[0]['status'])}")
    return seconds


def measure_startup() -> float:
    t0 = time.time()
    subprocess.run([sys.executable, "-c", "import torch, timm, transformers, transformer_lrp"], cwd=ROOT, check=True,
                   env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    return time.time() - t0


def measure_references() -> float:
    """The references stage's time on the device, from one workload's 7 float64 explanations timed on this CPU:
    ×the workloads (CLIP's two towers counted as one: it is the heaviest, ~1.5× ViT's), and
    ×(cores here / the device's 16) ×2 (float64 GEMMs scale with cores, not perfectly: a 2× safety margin)."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    w = WORKLOADS[0]
    torch.manual_seed(0)
    model = w.build().eval().double()
    inputs = _cast_inputs(w.inputs(model), torch.float64, "cpu")
    t0 = time.time()
    for method in METHODS:
        _explain_relevance(model, inputs, method, "torch")
    one = time.time() - t0
    return one * (len(WORKLOADS) + 0.5) * (os.cpu_count() or 1) / DEVICE_CPUS * 2


def dry_run(command: str) -> int:
    os.environ.pop("TRITON_INTERPRET", None)
    import warnings

    warnings.filterwarnings("ignore", message=".* runs on the torch reference")
    stages = plan()[command]
    t0 = time.time()
    MEASURED["startup"] = measure_startup()
    if command == "verdicts":
        MEASURED["references"] = measure_references()
    jobs_per_stage = [stage.compiles() for stage in stages]
    everything = [j for jobs in jobs_per_stage for j in jobs.values()]
    cost = measure_compile_cost(everything) if everything else 0.0
    say(f"dry run of '{command}' on {environment()['device']} ({os.cpu_count()} cores): one compilation "
        f"{cost:.2f} s (measured, sm_90a); Python start-up and imports {MEASURED['startup']:.1f} s; the device has "
        f"{DEVICE_CPUS} cores")
    say(f"{'stage':<11} {'compiles':>8} {'new':>5} {'procs':>5} {'compile s':>9} {'other s':>8} {'estimate':>8} "
        f"{'limit':>6} {'share':>6}  note")
    done: set[str] = set()
    warmed: set[str] = set()
    total_limit, total_est, worst = 0, 0.0, 0.0
    for stage, jobs in zip(stages, jobs_per_stage):
        fresh = [k for k in jobs if k not in done]
        # a stage after the warm stage compiles nothing if Triton's cache serves it; the estimate assumes it does
        # not (the worst case), and says so
        parallel = stage.parallel()
        other_s = stage.other_s()
        if stage.per_worker is not None:  # the workers' schedule, with and without their compilations
            counts = [len([k for k in jobs if k not in done]) for jobs in stage.per_worker()]
            idle = list_schedule([stage.worker_s()] * len(counts), parallel)
            compile_s = list_schedule([stage.worker_s() + n * cost for n in counts], parallel) - idle
            other_s += idle
        else:
            compile_s = len(fresh) * cost / parallel
        est = compile_s + other_s
        MEASURED["elapsed"] = MEASURED.get("elapsed", 0.0) + est
        share = est / stage.limit_s
        worst = max(worst, share)
        total_limit += stage.limit_s
        total_est += est
        say(f"{stage.name:<11} {len(jobs):>8} {len(fresh):>5} {parallel:>5} {compile_s:>9.0f} {other_s:>8.0f} "
            f"{est:>8.0f} {stage.limit_s:>6} {share:>6.0%}  {stage.note}")
        if not stage.warms_for:
            done.update(jobs)
        warmed.update(stage.warms_for)
    ok = worst <= STAGE_SHARE and total_limit <= COMMAND_BUDGET_S
    say(f"command '{command}': stage limits {total_limit} s (budget {COMMAND_BUDGET_S} s = the {CALL_CAP_S} s cap "
        f"less 30 %), estimate {total_est:.0f} s; the worst stage at {worst:.0%} of its limit (at most "
        f"{STAGE_SHARE:.0%}): {'OK' if ok else 'OVER BUDGET'} (dry run took {time.time() - t0:.0f} s)")
    say("(the estimate counts a timed stage's compilations even where a warm stage has put them in Triton's cache)")
    return 0 if ok else 1


# ------------------------------------------------------------------------------------------------------ main


def run_command(command: str) -> int:
    """Each stage in its own process under its own limit; a stage that fails or times out does not stop the rest."""
    log = out_dir() / "gpu_check.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TRITON_CACHE_DIR": str(TRITON_CACHE),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    if DEVICE == "cuda":
        env.pop("TRITON_INTERPRET", None)
    else:  # a rehearsal: the kernels under the interpreter
        env["TRITON_INTERPRET"] = "1"
    if command != "extras":
        env["TLRP_AUTOTUNE"] = "0"
    TRITON_CACHE.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with log.open("a") as f:
        for stage in plan()[command]:
            # a CPU rehearsal runs the kernels under the interpreter on 2 cores, not the lent 16: it checks that every
            # stage runs end to end, so its limits are the device's × REHEARSAL_SLACK (the dry run checks the budget)
            limit = stage.limit_s if DEVICE == "cuda" else stage.limit_s * REHEARSAL_SLACK
            head = f"=== {command}/{stage.name} (limit {limit} s, {time.time() - start:.0f} s in) {stage.note}"
            print(head, flush=True)
            f.write(head + "\n")
            f.flush()
            proc = subprocess.Popen(["timeout", "-k", "5", str(limit), sys.executable, "-u", __file__,
                                     "--stage", command, stage.name], cwd=ROOT, env=env, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            for line in proc.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                f.write(line)
                f.flush()
            rc = proc.wait()
            tail = f"--- {stage.name}: " + ("done" if rc == 0 else "TIMED OUT" if rc in (124, 137) else f"exit {rc}")
            print(tail, flush=True)
            f.write(tail + "\n")
        done = f"=== {command} done in {time.time() - start:.0f} s; results in {out_dir()}"
        print(done, flush=True)
        f.write(done + "\n")  # the log says the command ran to its end
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", nargs="?", choices=["verdicts", "ratios", "extras"])
    ap.add_argument("--dry-run", action="store_true", help="on a CPU: each stage's compile count and time estimate")
    ap.add_argument("--stage", nargs=2, metavar=("COMMAND", "STAGE"), help=argparse.SUPPRESS)
    ap.add_argument("--worker", nargs=3, metavar=("WORKLOAD", "DTYPE", "BACKEND"), help=argparse.SUPPRESS)
    ap.add_argument("--reference", nargs=2, metavar=("WORKLOAD", "THREADS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.reference:
        reference_worker(args.reference[0], int(args.reference[1]))
        return 0
    if args.worker:
        verdict_worker(args.worker[0], args.worker[1], (args.worker[2],))
        return 0
    if args.stage:
        stage = next(s for s in plan()[args.stage[0]] if s.name == args.stage[1])
        stage.run()
        return 0
    if args.command is None:
        ap.error("give a command: verdicts, ratios or extras")
    if args.dry_run:
        return dry_run(args.command)
    return run_command(args.command)


if __name__ == "__main__":
    sys.exit(main())
