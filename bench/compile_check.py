"""Ahead-of-time compile check of every Triton launch, for sm_80 (A100) and sm_90a (H100), on a machine without a GPU.

The launches are not described by hand: for each model of the table below, in each dtype, every method and setting
that the dispatcher sends to Triton runs through the real sweep (``methods.run(..., backend="triton")``) on ``meta``
tensors inside ``transformer_lrp._target.record_launches``. The launchers then record, instead of running, each
launch with all the tile candidates the autotuner may choose from (``triton_kernels/_launch.py``). Every
(launch, candidate, arch) is specialized as Triton's JIT would specialize it on a GPU (its own binder: argument
types, 16-byte divisibility, constexprs), compiled with ``triton.compile`` for that target, and measured: shared
memory from the compiled metadata, registers and spill bytes from the log of the ``ptxas -v`` that Triton runs to
build the cubin (registers checked against the cubin with ``cuobjdump -res-usage``).

Writes ``bench/results/kernel_resources.csv`` and exits non-zero when a configuration fails to compile (or crashes
the compiler), needs more shared memory than the arch has, or spills registers in a hot kernel (attention forward
and backward, LayerNorm relevance, the α1β0 passes) in bf16, fp16 or fp32 (IEEE or TF32). float64 must compile;
its spills are reported, not failed (Triton's fp64 products are FMA-like and far below cuBLAS's DGEMM anyway).

    python3 bench/compile_check.py                 # the full table, both archs (minutes on 2 cores)
    python3 bench/compile_check.py --quick         # the CI subset: every kernel, flag set and dtype, sm_90a
    python3 bench/compile_check.py --cuda          # the CUDA C++ ops (csrc/*.cu) instead, with nvcc, sm_80 and sm_90
    python3 bench/compile_check.py --kernels K1,K2 # only these kernels, their rows of the table replaced

``--cuda`` compiles each ``csrc/*.cu`` as ``setup.py`` builds it (torch's nvcc flags and headers) with
``-Xptxas -v`` for both archs and reads every instantiated kernel's registers, spills and shared memory from the
log; it fails on a compile error or on any spill. Its rows (variant ``cuda_c++``) and the Triton rows share the CSV:
each mode replaces only its own rows.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import csv
import hashlib
import importlib
import io
import os
import pickle
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CSV_PATH = ROOT / "bench" / "results" / "kernel_resources.csv"
LOG_CACHE = Path(os.environ.get("TLRP_COMPILE_CHECK_CACHE", Path.home() / ".cache" / "transformer_lrp" / "ptxas"))

# Per-block shared memory a kernel may use (opt-in maximum): A100 163 KB, H100 227 KB (CUDA C Programming Guide,
# "Technical Specifications per Compute Capability").
SHARED_LIMIT = {80: 166912, 90: 232448}
HOT = {"_attn_fwd_kernel", "_attn_bwd_prep_kernel", "_attn_bwd_q_kernel", "_attn_bwd_kv_kernel",
       "_ln_rel_pass1_kernel", "_ln_rel_pass2_kernel", "_alpha1beta0_scale_kernel", "_alpha1beta0_combine_kernel"}
NO_SPILL_DTYPES = {"bf16", "fp16", "fp32", "tf32"}
TILE_NAMES = ("BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK", "BLOCK_K", "STEPS")
NOT_FLAGS = set(TILE_NAMES) | {"DT", "MM", "PREC", "FP64", "HEAD_DIM"}  # HEAD_DIM: a shape, shown by the model


# ------------------------------------------------------------------------------------------------ the table


@dataclass(frozen=True)
class ModelCase:
    name: str
    build: Callable  # () -> nn.Module, called under torch.device("meta")
    batch: int
    tokens: int | None = None  # text: the padded sequence length (vision: from the model)
    quick: bool = False  # part of the CI subset
    tower: str | None = None  # CLIP: the tower explained ("vision", or "text" with its causal mask)


# Three blocks: the pooled top block, a middle one and the lowest; more would repeat the middle one's launches.
DEPTH = 3


def _timm(name: str, **kw):
    def build():
        import timm

        return timm.create_model(name, pretrained=False, depth=DEPTH, **{"num_classes": 1000, **kw})  # no headless

    return build


def _vit(embed_dim: int, heads: int):
    def build():
        from timm.models.vision_transformer import VisionTransformer

        return VisionTransformer(img_size=224, patch_size=16, embed_dim=embed_dim, depth=DEPTH, num_heads=heads,
                                 num_classes=10)

    return build


def _hf(config: str, model: str, **kw):
    def build():
        import transformers

        cfg = getattr(transformers, config)(num_labels=2, **kw)
        return getattr(transformers, model)(cfg)

    return build


def _decoder(config: str, model: str = "AutoModelForCausalLM", **kw):
    def build():
        import transformers

        cfg = getattr(transformers, config)(num_hidden_layers=DEPTH, **kw)
        cls = getattr(transformers, model)
        return cls.from_config(cfg) if model.startswith("Auto") else cls(cfg)

    return build


def _clip():
    def build():
        import transformers

        cfg = transformers.CLIPConfig(text_config=dict(num_hidden_layers=DEPTH),
                                      vision_config=dict(num_hidden_layers=DEPTH))  # ViT-B/32: 512-wide text, 77
        return transformers.CLIPModel(cfg)

    return build


MODELS = [
    ModelCase("vit_base_patch16_224", _timm("vit_base_patch16_224"), 64, quick=True),
    ModelCase("vit_base_patch16_384", _timm("vit_base_patch16_384"), 16),
    ModelCase("vit_large_patch14_224", _timm("vit_large_patch14_clip_224"), 16),
    ModelCase("vit_small_patch14_reg4_dinov2", _timm("vit_small_patch14_reg4_dinov2"), 16),
    ModelCase("deit_base_distilled_patch16_224", _timm("deit_base_distilled_patch16_224"), 64),
    ModelCase("vit_huge_patch14_224_head_dim_80", _timm("vit_huge_patch14_224"), 8),
    ModelCase("vit_head_dim_32", _vit(384, 12), 8),
    ModelCase("vit_head_dim_96", _vit(768, 8), 8),
    ModelCase("vit_head_dim_128", _vit(1024, 8), 8),
    ModelCase("hf_vit_base_patch16_224", _hf("ViTConfig", "ViTForImageClassification", num_hidden_layers=DEPTH), 64),
    ModelCase("bert_base_128_padded", _hf("BertConfig", "BertForSequenceClassification", num_hidden_layers=DEPTH),
              32, tokens=128),
    ModelCase("bert_base_512_padded", _hf("BertConfig", "BertForSequenceClassification", num_hidden_layers=DEPTH),
              32, tokens=512, quick=True),
    ModelCase("bert_head_dim_128_512_padded", _hf("BertConfig", "BertForSequenceClassification", hidden_size=1024,
                                                  num_attention_heads=8, intermediate_size=4096,
                                                  num_hidden_layers=DEPTH), 32, tokens=512),
    ModelCase("distilbert_base_256_padded", _hf("DistilBertConfig", "DistilBertForSequenceClassification",
                                                n_layers=DEPTH), 32, tokens=256),
    ModelCase("clip_vit_b32_text_77_causal", _clip(), 32, tokens=77, quick=True, tower="text"),
    ModelCase("clip_vit_b32_vision", _clip(), 64, tower="vision"),
    # decoder LLMs: causal, left padding, shared key/value heads, sliding windows, head dims 64, 128 and 256
    ModelCase("smollm2_135m_512_left_padded", _decoder("LlamaConfig", hidden_size=576, intermediate_size=1536,
                                                       num_attention_heads=9, num_key_value_heads=3,
                                                       vocab_size=49152, tie_word_embeddings=True), 4, tokens=512,
              quick=True),
    ModelCase("llama3_8b_8k", _decoder("LlamaConfig", hidden_size=4096, intermediate_size=14336,
                                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                       max_position_embeddings=8192), 1, tokens=8192),
    ModelCase("gemma3_1b_head_dim_256_window_512", _decoder(
        "Gemma3TextConfig", "Gemma3ForCausalLM", hidden_size=1152, intermediate_size=6912, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, sliding_window=512, vocab_size=262144,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"]), 2, tokens=2048),
    ModelCase("mistral_7b_window_4096", _decoder("MistralConfig", hidden_size=4096, intermediate_size=14336,
                                                 num_attention_heads=32, num_key_value_heads=8, sliding_window=4096,
                                                 max_position_embeddings=8192), 1, tokens=8192),
]

DTYPES = {"bf16": ("bfloat16", False), "fp16": ("float16", False), "fp32": ("float32", False),
          "tf32": ("float32", True), "fp64": ("float64", False)}


def settings(depth: int) -> list[tuple[str, int, bool]]:
    """(method, start_layer, normalize_rows): every method, the layered ones at the start layers that make the top,
    middle and lowest blocks differ and with and without row normalization."""
    return [("transformer_attribution", 0, False), ("transformer_attribution", 0, True),
            ("transformer_attribution", depth - 1, True), ("gae", 0, False), ("gae", 0, True), ("rollout", 0, True),
            ("raw_attention", 0, False), ("attention_gradcam", 0, False), ("partial_lrp", 0, False),
            ("full_lrp", 0, False), ("attnlrp", 0, False), ("cp_lrp", 0, False)]


def record_case(case: ModelCase, dtype_label: str, arch: int, runs: list | None = None,
                padded: tuple[bool, ...] = (True, False), backend: str = "triton") -> list:
    """The launches of every setting on this model and dtype, for ``arch`` (meta tensors, nothing runs).

    ``runs``: the ``(method, start_layer, normalize_rows)`` to record (default: ``settings(depth)``); ``padded``: for
    text, a batch with a padding mask and/or one without (the adapter then passes no mask); ``backend``: the
    explanation's backend (``"cuda"`` launches the Triton α1β0 passes only)."""
    import torch

    from transformer_lrp import methods
    from transformer_lrp._target import record_launches
    from transformer_lrp.adapters import build_encoder
    from transformer_lrp.adapters.spec import Embedded

    dtype_name, tf32 = DTYPES[dtype_label]
    dtype = getattr(torch, dtype_name)
    with torch.device("meta"):
        model = case.build().to(dtype)
    if case.tower is None:
        enc, pool = build_encoder(model), None
    else:  # a CLIP tower whose head scores against a batch of the other tower's embeddings
        from transformer_lrp.adapters import clip

        spec = clip.build(model)
        other = torch.empty(case.batch, spec.text.projection.weight.shape[0], dtype=dtype, device="meta")
        enc = spec.encoder(case.tower, other)
        pool = torch.zeros(case.batch, dtype=torch.long, device="meta") if case.tower == "text" else None
    text = enc.modality == "text"
    n = case.tokens if text else enc.num_prefix_tokens + enc.grid_size[0] * enc.grid_size[1]
    width = enc.blocks[0].norm1.weight.shape[0]
    tokens = torch.empty(case.batch, n, width, dtype=dtype, device="meta")
    # text: a padded batch, and one without padding (the adapter then passes no mask)
    masks = [torch.empty(case.batch, n, dtype=torch.bool, device="meta") if p else None for p in padded] \
        if text else [None]
    positions = None
    if any(blk.rope is not None for blk in enc.blocks):  # decoders: rotary positions, the explained position
        positions = torch.empty(case.batch, n, dtype=torch.long, device="meta")
    if enc.language_model or positions is not None:
        pool = torch.zeros(case.batch, dtype=torch.long, device="meta")

    def target(logits, t):
        return torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)

    with record_launches(arch=arch, tf32=tf32) as rec:
        for key_mask in masks:
            # from_gradient: (tokens, None) for text, (pixels, patches) for vision; only the launches matter here
            emb = Embedded(tokens, key_mask, to_input=lambda r, rule: (r.sum(-1), None), pool_index=pool,
                           positions=positions, from_gradient=lambda g: ((tokens * g).sum(-1),) * 2)
            for method, start, norm in (runs if runs is not None else settings(enc.depth)):
                start = start + enc.depth if start < 0 else start
                methods.run(enc, emb, method, None, start, norm, target, backend=backend)
    return rec.launches


def record_ops(dtype_label: str, arch: int, batch: int = 8, tokens: int = 197, heads: int = 12,
               head_dim: int = 64) -> list:
    """The launches of the public ops (``transformer_lrp.ops``) over every valid combination of their options,
    at one ViT-B-like shape: callers of the ops reach flag sets the sweep never makes (the head-mean map, a
    gradient-only backward, …)."""
    import itertools

    import torch

    from transformer_lrp import ops
    from transformer_lrp._target import record_launches

    dtype_name, tf32 = DTYPES[dtype_label]
    dtype = getattr(torch, dtype_name)

    def t(*shape, dt=dtype):
        return torch.empty(*shape, dtype=dt, device="meta")

    q = t(batch, heads, tokens, head_dim)
    x, w = t(batch, tokens, heads * head_dim), t(heads * head_dim)
    mask = t(batch, tokens, dt=torch.bool)
    with record_launches(arch=arch, tf32=tf32) as rec:
        # an explicit backend="triton" refuses float64 attention on a GPU (NotImplementedError, with the reason)
        attention = "torch" if dtype == torch.float64 else "triton"
        for key_mask in (None, mask):
            out, lse = ops.attention_forward(q, q, q, 0.125, key_mask, backend=attention)
            ops.attention_weighted_map(q, q, lse, 0.125, t(batch, heads), key_mask, backend=attention)
            for mode, grad, rel, roll, norm, want, inputs, add, add_norm in itertools.product(
                    (None, "transformer_attribution", "gae", "rollout", "partial_lrp"), *[(False, True)] * 8):
                try:
                    ops.attention_relevance(
                        q, q, q, out, lse, 0.125, grad_out=q if grad else None, rel_out=q if rel else None,
                        key_mask=key_mask, mask_add=add, map_mode=mode, rollout=t(batch, tokens) if roll else None,
                        normalize_rows=norm, want_map=want, inputs=inputs, mask_add_normalized=add_norm,
                        backend=attention)
                except ValueError:  # an invalid combination, refused before any launch
                    pass
            for scale in ((0.25, 0.25, 0.5), (0.0, 0.0, 1.0)):  # AttnLRP's and CP-LRP's modified gradients
                ops.attention_relevance(q, q, q, out, lse, 0.125, grad_out=q, key_mask=key_mask, grad_scale=scale,
                                        backend=attention)
        ops.normalized_add(x, x, x, backend="triton")
        for v, weight, g_res, rel, r_res in itertools.product(*[(False, True)] * 5):
            ops.layernorm_relevance(x, x if v else None, w if weight else None, None, 1e-6, x, x if rel else None,
                                    x if g_res else None, x if (rel and r_res) else None, backend="triton")
        for v, rms in itertools.product((False, True), (False, True)):  # the scale held constant (AttnLRP)
            ops.layernorm_relevance(x, x if v else None, w, None, 1e-6, x, None, x, None, backend="triton", rms=rms,
                                    detach_scale=True)
        for bias, grad in itertools.product((False, True), (False, True)):
            lin = t(3 * heads * head_dim, heads * head_dim)
            y = t(batch, tokens, 3 * heads * head_dim)
            if grad:
                ops.linear_alpha1beta0_with_grad(x, lin, y, y, output=y, bias=t(lin.shape[0]) if bias else None,
                                                 abs_weight=lin, backend="triton")
            else:
                ops.linear_alpha1beta0(x, lin, y, output=y, bias=t(lin.shape[0]) if bias else None, abs_weight=lin,
                                       backend="triton")
    return rec.launches


# ------------------------------------------------------------------------------------- specialization (host)


def variant_of(launch) -> str:
    """The launch's flags (its constexprs other than tiles, dtypes and constants), e.g. ``MAP=1 NEED_GRAD``."""
    parts = []
    for k, v in sorted(launch.constexprs.items()):
        if k in NOT_FLAGS or v is False or v == 0:
            continue
        parts.append(k if v is True else f"{k}={v}")
    return " ".join(parts) or "-"


_BINDERS: dict = {}


def specialize(launch, cand, arch: int) -> dict:
    """What Triton's JIT would compile for this launch on a GPU of ``arch``: a picklable compile job."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    key = (id(kernel), arch)
    if key not in _BINDERS:
        backend = make_backend(GPUTarget("cuda", arch, 32))
        _BINDERS[key] = backend, create_function_from_signature(kernel.signature, kernel.params, backend)
    backend, binder = _BINDERS[key]
    kwargs = {**launch.constexprs, **cand.meta, **cand.options,
              "debug": False, "instrumentation_mode": knobs.compilation.instrumentation_mode}
    bound, spec, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec, options)
    del triton
    return dict(module=kernel.fn.__module__, name=kernel.fn.__name__, signature=signature, constexprs=constexprs,
                attrs=attrs, options=options.__dict__, arch=arch)


def job_key(job: dict) -> str:
    o = job["options"]
    return repr((job["name"], job["arch"], sorted(job["signature"].items()), sorted(job["constexprs"].items(),
                key=repr), sorted(job["attrs"].items(), key=repr), o["num_warps"], o["num_stages"], o.get("maxnreg")))


# ---------------------------------------------------------------------------------------- compiling (worker)


def _nvidia_tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _ptxas_log(ptx: str, gpu: str, fp_fusion: bool) -> str:
    """``ptxas -v`` on the PTX with the flags Triton's own cubin step uses (backends/nvidia/compiler.py,
    ``make_cubin``): for kernels Triton took from its cache, which then prints no log."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        Path(src).write_text(ptx)
        cmd = [_nvidia_tool("ptxas"), "-lineinfo", *([] if fp_fusion else ["--fmad=false"]), "-v",
               "--regAllocOptLevel=2", f"--gpu-name={gpu}", src, "-o", os.path.join(tmp, "k.o")]
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stderr


def _cubin_registers(cubin: bytes) -> int:
    """Registers per thread of the kernel as built (``cuobjdump -res-usage`` on Triton's cubin)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_nvidia_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    return int(re.search(r"REG:(\d+)", out).group(1))


def compile_job(job: dict) -> dict:
    """Build one configuration as Triton would for that GPU; its resources from Triton's own ptxas log (or, for a
    cached kernel, the same ptxas command), the registers checked against the cubin."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(job["module"]), job["name"])
    start = time.time()
    src = ASTSource(fn, job["signature"], job["constexprs"], job["attrs"])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # TRITON_DUMP_PTXAS_LOG=1: Triton prints its ptxas log
        compiled = triton.compile(src, target=GPUTarget("cuda", job["arch"], 32), options=job["options"])
    log = printed.getvalue()
    gpu = "sm_90a" if job["arch"] == 90 else f"sm_{job['arch']}"
    # a kernel from Triton's cache printed no log: ours, keyed by its PTX, or the same ptxas command again
    saved = LOG_CACHE / f"{hashlib.sha256((gpu + compiled.asm['ptx']).encode()).hexdigest()}.log"
    if "Used" not in log and saved.exists():
        log = saved.read_text()
    if "Used" not in log:
        log = _ptxas_log(compiled.asm["ptx"], gpu, job["options"].get("enable_fp_fusion", True))
    saved.parent.mkdir(parents=True, exist_ok=True)
    saved.write_text(log)
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    built = _cubin_registers(compiled.asm["cubin"])
    if built != regs:
        return dict(status="error", error=f"ptxas log says {regs} registers, the cubin {built}: the check's ptxas "
                    "flags no longer match Triton's")
    return dict(status="ok", shared=compiled.metadata.shared, registers=regs,
                spill_stores=sum(map(int, re.findall(r"(\d+) bytes spill stores", log))),
                spill_loads=sum(map(int, re.findall(r"(\d+) bytes spill loads", log))),
                seconds=round(time.time() - start, 2))


def worker() -> None:
    """Compile the jobs read from stdin (one base64 pickle per line); answer one line per job on stdout."""
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    for line in sys.stdin:
        job = pickle.loads(base64.b64decode(line))
        try:
            res = compile_job(job)
        except Exception as exc:  # a compile error is a result, not a crash of the check
            res = dict(status="error", error=f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}")
        sys.stdout.write(base64.b64encode(pickle.dumps(res)).decode() + "\n")
        sys.stdout.flush()


def run_jobs(jobs: list[dict], workers: int, progress: bool = True) -> list[dict]:
    """Compile ``jobs`` on ``workers`` processes. A worker killed by the compiler (a C++ assertion aborts the
    process) marks its current job failed with the tail of its stderr and is replaced."""
    todo: queue.Queue = queue.Queue()
    for i in range(len(jobs)):
        todo.put(i)
    results: list[dict | None] = [None] * len(jobs)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = [0]
    lock = threading.Lock()

    def spawn(log):
        # stderr to a file: the compiler's diagnostics would fill a pipe nobody reads and block the worker
        return subprocess.Popen([sys.executable, __file__, "--worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=log, text=True, env=env, cwd=ROOT)

    def serve():
        log = tempfile.TemporaryFile("w+")
        proc = spawn(log)
        while True:
            try:
                i = todo.get_nowait()
            except queue.Empty:
                break
            proc.stdin.write(base64.b64encode(pickle.dumps(jobs[i])).decode() + "\n")
            proc.stdin.flush()
            line = proc.stdout.readline()
            if line:
                results[i] = pickle.loads(base64.b64decode(line))
            else:  # the compiler aborted the worker
                proc.wait()
                log.seek(0)
                err = log.read().strip().splitlines()
                results[i] = dict(status="crash", error=(err[-1] if err else "worker died")[:300])
                log = tempfile.TemporaryFile("w+")
                proc = spawn(log)
            with lock:
                done[0] += 1
                if progress and (done[0] % 25 == 0 or done[0] == len(jobs)):
                    print(f"  compiled {done[0]}/{len(jobs)}", flush=True)
        proc.stdin.close()
        proc.wait()
        log.close()

    threads = [threading.Thread(target=serve) for _ in range(max(1, workers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


# ---------------------------------------------------------------------------------------------------- main


@dataclass
class Entry:
    job: dict
    kernel: str
    variant: str
    tiles: str
    warps: int
    stages: int
    default: bool
    dtypes: set = field(default_factory=set)
    cases: set = field(default_factory=set)


def collect(models: list[ModelCase], dtypes: list[str], archs: list[int], default_only: bool,
            with_ops: bool) -> dict[str, Entry]:
    """Every distinct compile job of the table, with where it is used."""
    entries: dict[str, Entry] = {}
    cases = [(case.name, partial(record_case, case), default_only) for case in models]
    if with_ops:  # the ops' own flag sets: at their default tiles (all of them would triple the table)
        cases.append(("ops", record_ops, True))
    for case_name, record, defaults in cases:
        for label in dtypes:
            for arch in archs:
                for launch in record(label, arch):
                    cands = launch.candidates[:1] if defaults else launch.candidates
                    for idx, cand in enumerate(cands):
                        job = specialize(launch, cand, arch)
                        key = job_key(job)
                        meta = {**launch.constexprs, **cand.meta}
                        tiles = "x".join(f"{meta[t]}" for t in TILE_NAMES if t in meta)
                        e = entries.get(key)
                        if e is None:
                            e = entries[key] = Entry(job, launch.name, variant_of(launch), tiles, cand.num_warps,
                                                     cand.num_stages, idx == 0)
                        e.default = e.default or idx == 0
                        e.dtypes.add(label)
                        e.cases.add(case_name)
    return entries


def verdict(e: Entry, res: dict) -> str:
    """``ok`` or why the configuration fails the check."""
    if res["status"] != "ok":
        return f"{res['status']}: {res.get('error', '')}"
    limit = SHARED_LIMIT[e.job["arch"]]
    if res["shared"] > limit:
        return f"shared memory {res['shared']} B > {limit} B"
    if e.kernel in HOT and res["spill_stores"] > 0 and e.dtypes & NO_SPILL_DTYPES:
        return f"spills {res['spill_stores']} B in a hot kernel ({'/'.join(sorted(e.dtypes & NO_SPILL_DTYPES))})"
    return "ok"


# ------------------------------------------------------------------------------------------------ CUDA C++

CUDA_VARIANT = "cuda_c++"
CUDA_SOURCES = ROOT / "csrc"
_DTYPE_OF_TEMPLATE = {"float": "fp32", "double": "fp64", "c10::Half": "fp16", "c10::BFloat16": "bf16"}


def _nvcc() -> str | None:
    from shutil import which

    home = os.environ.get("CUDA_HOME")
    return which("nvcc") or (os.path.join(home, "bin", "nvcc") if home else None)


def _nvcc_command(src: Path, archs: list[int]) -> list[str]:
    """nvcc as setup.py's CUDAExtension runs it (torch's headers, flags and C++ standard), plus ``-Xptxas -v``."""
    import torch
    from torch.utils import cpp_extension

    std = "-std=c++20" if "C++20" in (Path(torch.__file__).parent / "include" / "ATen" / "ATen.h").read_text() \
        else "-std=c++17"
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    gencodes = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    return [_nvcc(), "-c", str(src), "-o", os.devnull, std, "-O3", *includes, *cpp_extension.COMMON_NVCC_FLAGS,
            f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", "-DTORCH_EXTENSION_NAME=_C",
            *gencodes, "-Xptxas", "-v", "--threads", str(len(archs))]


def _demangle(names: list[str]) -> list[str]:
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def parse_ptxas(log: str) -> list[dict]:
    """Per (kernel, arch) in an ``nvcc -Xptxas -v`` log: registers, spill bytes, shared bytes."""
    found, current = [], None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\w+)' for 'sm_(\d+)a?'", line)
        if m:
            current = dict(mangled=m.group(1), arch=int(m.group(2)), spill=0, registers=0, shared=0)
            found.append(current)
        elif current is not None and "spill stores" in line:
            current["spill"] = int(re.search(r"(\d+) bytes spill stores", line).group(1))
        elif current is not None and "Used" in line and "registers" in line:
            current["registers"] = int(re.search(r"Used (\d+) registers", line).group(1))
            smem = re.search(r"(\d+) bytes smem", line)
            current["shared"] = int(smem.group(1)) if smem else 0
    return found


def cuda_rows(archs: list[int]) -> tuple[list[dict], list[str]]:
    """Rows of every kernel of csrc/*.cu for ``archs``, and the failures (compile errors, spills)."""
    rows, failures = [], []
    for src in sorted(CUDA_SOURCES.glob("*.cu")):
        run = subprocess.run(_nvcc_command(src, archs), capture_output=True, text=True)
        if run.returncode != 0:
            failures.append(f"{src.name}: nvcc failed: {run.stderr[-2000:]}")
            continue
        kernels = parse_ptxas(run.stdout + run.stderr)
        if not kernels:
            failures.append(f"{src.name}: no kernel in the ptxas log")
        for k, name in zip(kernels, _demangle([k["mangled"] for k in kernels])):
            base = re.sub(r"^.*::", "", name.split("<")[0])  # the template's name without its namespaces
            args = re.search(r"<(.*?)>", name)
            targs = [a.strip() for a in args.group(1).split(",")] if args else []
            dtype = next((_DTYPE_OF_TEMPLATE[a] for a in targs if a in _DTYPE_OF_TEMPLATE), "-")
            rest = [a for a in targs if a not in _DTYPE_OF_TEMPLATE]
            why = "ok" if k["spill"] == 0 else f"spills {k['spill']} bytes"
            if k["shared"] > SHARED_LIMIT[k["arch"]]:
                why = f"shared memory {k['shared']} > {SHARED_LIMIT[k['arch']]}"
            if why != "ok":
                failures.append(f"{src.name} {base}<{', '.join(targs)}> sm_{k['arch']}: {why}")
            rows.append(dict(kernel=base, variant=CUDA_VARIANT, dtype=dtype, arch=f"sm_{k['arch']}",
                             tiles="entries_per_lane=" + rest[0] if rest else "-", warps="", stages="", default=1,
                             shared_bytes=k["shared"], registers=k["registers"], spill_bytes=k["spill"],
                             hot=int("attention" in base), check=why, models=src.name))
    return rows, failures


def write_rows(path: str, rows: list[dict], cuda: bool) -> None:
    """Writes ``rows`` to the CSV, keeping the other mode's rows (Triton or CUDA C++) already there."""
    kept = []
    if Path(path).exists():
        with open(path, newline="") as f:
            kept = [r for r in csv.DictReader(f) if (r["variant"] == CUDA_VARIANT) != cuda]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(kept + rows if cuda else rows + kept)


def main_cuda(archs: list[int], csv_path: str) -> int:
    if _nvcc() is None:
        print("compile_check --cuda: no nvcc (set CUDA_HOME or put nvcc on PATH)")
        return 2
    t0 = time.time()
    rows, failures = cuda_rows(archs)
    if rows and csv_path:
        write_rows(csv_path, rows, cuda=True)
    print(f"compile_check --cuda: {len(rows)} kernels × archs from {len(list(CUDA_SOURCES.glob('*.cu')))} sources "
          f"in {time.time() - t0:.0f} s; {len(failures)} failing; max registers "
          f"{max((r['registers'] for r in rows), default=0)}" + (f"; table: {csv_path}" if csv_path else ""))
    for why in failures[:40]:
        print(f"  FAIL {why}")
    return 1 if failures or not rows else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the CI subset: ViT-B/16 and BERT-base at 512 tokens, "
                    "every dtype, each launch's default candidate, sm_90a")
    ap.add_argument("--arch", default=None, help="compute capabilities, e.g. 80,90 (default: both; --quick: 90)")
    ap.add_argument("--models", default=None, help="comma-separated names from the table, 'ops' for the public "
                    "ops' own flag sets (default: all)")
    ap.add_argument("--dtypes", default=",".join(DTYPES), help="subset of " + ",".join(DTYPES))
    ap.add_argument("--default-only", action="store_true", help="only each launch's default candidate")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes")
    ap.add_argument("--csv", default=str(CSV_PATH), help="where to write the table ('' for nowhere)")
    ap.add_argument("--cuda", action="store_true", help="check the CUDA C++ ops (csrc/*.cu) with nvcc instead")
    ap.add_argument("--kernels", default="", help="comma-separated kernel names: compile only theirs and replace "
                    "only their rows of the CSV (a recheck after changing some kernels)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker()
        return 0
    if args.cuda:
        return main_cuda([int(a) for a in (args.arch or "80,90").split(",")], args.csv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # decorating the kernels under the interpreter would give interpreter objects, which cannot be compiled
        print("compile_check: unset TRITON_INTERPRET (the kernels must be compiled, not interpreted)")
        return 2
    sys.path.insert(0, str(ROOT))
    # float64 attention is routed to the torch ops (warned once per op); the table shows it by its absence
    warnings.filterwarnings("ignore", message=".* runs on the torch reference")
    models = [m for m in MODELS if m.quick] if args.quick else MODELS
    with_ops = not args.quick
    if args.models:
        wanted = args.models.split(",")
        with_ops = "ops" in wanted
        unknown = set(wanted) - {m.name for m in MODELS} - {"ops"}
        if unknown:
            ap.error(f"unknown models {sorted(unknown)}; the table has {[m.name for m in MODELS] + ['ops']}")
        models = [m for m in MODELS if m.name in wanted]
    archs = [int(a) for a in (args.arch or ("90" if args.quick else "80,90")).split(",")]
    dtypes = args.dtypes.split(",")
    t0 = time.time()
    entries = collect(models, dtypes, archs, args.default_only or args.quick, with_ops)
    if args.kernels:  # a recheck of some kernels: only theirs, and only their rows of the table are replaced
        entries = {k: e for k, e in entries.items() if e.kernel in args.kernels.split(",")}
    print(f"compile_check: {len(entries)} distinct configurations from {len(models)} models{' + ops' * with_ops} × "
          f"{len(dtypes)} dtypes × "
          f"archs {archs} (recorded in {time.time() - t0:.0f} s); compiling on {args.jobs} processes", flush=True)
    keys = list(entries)
    results = run_jobs([entries[k].job for k in keys], args.jobs)
    failures = []
    rows = []
    for k, res in zip(keys, results):
        e = entries[k]
        why = verdict(e, res)
        if why != "ok":
            failures.append((e, why))
        rows.append(dict(kernel=e.kernel, variant=e.variant, dtype="/".join(sorted(e.dtypes)),
                         arch=f"sm_{e.job['arch']}" + ("a" if e.job["arch"] == 90 else ""), tiles=e.tiles,
                         warps=e.warps, stages=e.stages, default=int(e.default), shared_bytes=res.get("shared", ""),
                         registers=res.get("registers", ""), spill_bytes=res.get("spill_stores", ""),
                         hot=int(e.kernel in HOT), check=why, models=";".join(sorted(e.cases))))
    if args.kernels and args.csv and Path(args.csv).exists():
        with open(args.csv, newline="") as f:
            rows += [r for r in csv.DictReader(f)
                     if r["variant"] != CUDA_VARIANT and r["kernel"] not in args.kernels.split(",")]
    rows.sort(key=lambda r: (r["kernel"], r["variant"], r["dtype"], r["arch"], r["tiles"], int(r["warps"]),
                             int(r["stages"])))
    if args.csv:
        write_rows(args.csv, rows, cuda=False)
    spilled = [r for r in rows if str(r["spill_bytes"]) not in ("", "0")]
    print(f"compile_check: {len(rows)} configurations in {time.time() - t0:.0f} s; {len(failures)} failing; "
          f"{len(spilled)} with spills (float64 or not hot: reported only)" + (f"; table: {args.csv}" if args.csv
                                                                                 else ""))
    for e, why in failures[:40]:
        print(f"  FAIL {e.kernel} [{e.variant}] {'/'.join(sorted(e.dtypes))} sm_{e.job['arch']} tiles {e.tiles} "
              f"warps {e.warps} stages {e.stages}: {why}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
