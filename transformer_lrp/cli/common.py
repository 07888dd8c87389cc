"""What every command and every kind of input of the command line shares.

* Errors: a problem with the command line, its files or its model is one line on stderr and exit status 2
  (:class:`CliError`, and the library's ``InputError``/``UnsupportedModelError``); Ctrl-C is one line and 130.
  Argument errors too (:class:`OneLineParser`).
* Checks made before any model work: the device and the backend (:func:`check_device`, :func:`check_backend`) and
  the output location (:class:`Staging`, whose creation is the proof that the location is writable).
* Staging: outputs are written into a hidden folder beside the output folder and moved into place only when
  everything succeeded, so a failure or an interruption leaves nothing half-written.
* Reading text files (:func:`read_text_file`: UTF-8 by default, a clear error naming the line otherwise), checking
  tokenizers (:func:`check_tokenizer`) and tokenizing with a note naming what was cut (:func:`token_limit`).
* Batches with a progress bar, raw outputs, the conservation line of methods that carry relevance to the input.

An input kind (``images.py``, ``texts.py``, ``clip_pairs.py``, ``prompts.py``) is a module with
``add_arguments(groups)``, ``claims(args)`` (:data:`NOT_MINE`, :data:`MY_INPUTS` or :data:`MY_MODEL`), ``read(args)``
(every input read and checked, no model loaded) and ``explain(args, inputs, folder)`` (the files written into
``folder``); a kind that answers ``MY_MODEL`` names in ``TAKES`` the kinds whose inputs it takes. ``main.py`` lists
the kinds.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

PROG = "transformer-lrp"
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE

# What an input kind answers to ``claims(args)``: not its command line; its inputs are given (--image, --text);
# the model is of its kind, which then takes the command line over (a CLIP checkpoint takes --image and --text).
NOT_MINE, MY_INPUTS, MY_MODEL = 0, 1, 2


class CliError(Exception):
    """A problem with the command's inputs, files or model, reported in one line (exit status 2)."""


def one_line(text: object) -> str:
    """``text`` with its line breaks and runs of spaces collapsed: errors are one line."""
    return " ".join(str(text).split())


def note(message: str) -> None:
    """Something the user should know that is not an error (a truncated text, a composited transparency)."""
    print(f"note: {one_line(message)}", file=sys.stderr)


class OneLineParser(argparse.ArgumentParser):
    """argparse with its errors in one line (argparse prints the usage first) and exit status 2."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    """An argparse type: an integer ≥ 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """An argparse type: an integer ≥ 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


# ------------------------------------------------------------------------------------------- errors and exit


def run_reporting_errors(command: str, body: Callable[[], int]) -> int:
    """Run a command; what goes wrong because of the inputs is one line on stderr and exit status 2, Ctrl-C one line
    and 130. Anything else is a bug of this package and keeps its traceback, to be reported."""
    from transformer_lrp.errors import InputError, UnsupportedModelError

    def fail(message: object, status: int = EXIT_BAD_INPUT) -> int:
        print(f"{PROG} {command}: error: {one_line(message)}", file=sys.stderr)
        return status

    try:
        return body()
    except KeyboardInterrupt:
        return fail("interrupted; nothing was written", EXIT_INTERRUPTED)
    except (CliError, InputError, UnsupportedModelError, NotImplementedError) as exc:
        return fail(exc)
    except (torch.OutOfMemoryError, MemoryError):
        return fail("out of memory: lower --batch-size, or use a machine with more memory")
    except BrokenPipeError:  # stdout piped into a reader that stopped (| head): quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except OSError as exc:  # a file that vanished, a full disk, a permission: what and where
        where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
        return fail(f"{exc.strerror or exc}{where}")


# ------------------------------------------------------------------------------------------ device, backend


def check_device(text: str) -> torch.device:
    """``--device`` as a torch device that exists on this machine."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise CliError(f"--device {text}: not a device name; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CliError(f"--device {text}: torch sees no CUDA GPU on this machine "
                           "(torch.cuda.is_available() is False); use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise CliError(f"--device {text}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
        return device
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise CliError(f"--device {text}: torch sees no Apple GPU (MPS) on this machine; use --device cpu")
        return device
    raise CliError(f"--device {text}: {device.type} devices are not supported; use cpu, cuda or mps")


def check_backend(backend: str | None, device: torch.device) -> None:
    """The backend (``--backend``, else ``TLRP_BACKEND``) can run on ``device``; else the reasons, in one line."""
    from transformer_lrp._backend import ENV_VAR, select_backend

    try:
        select_backend(backend, (torch.empty(0, device=device),))
    except NotImplementedError as exc:
        option = f"--backend {backend}" if backend is not None else f"{ENV_VAR}={os.environ.get(ENV_VAR)}"
        raise CliError(f"{option} on {device}: {exc}") from None


# ------------------------------------------------------------------------------------------ output location


def check_output_folder(out: str, option: str = "--out") -> Path:
    """``out`` can be a folder: not empty, not an existing file, not under a file."""
    if not out.strip():
        raise CliError(f"{option}: an empty path; name the output folder")
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise CliError(f"{option} {out}: exists and is not a folder")
    for parent in path.parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise CliError(f"{option} {out}: {parent} is a file, not a folder")
            break
    return path


def nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists."""
    return next(p for p in (path, *path.parents) if p.exists())


class Staging:
    """A hidden folder the command writes into, beside (or inside) the output folder: :meth:`commit` moves its files
    into the output folder once everything succeeded, and leaving the ``with`` block removes it, so a failure or
    Ctrl-C leaves nothing behind. Creating it is the check that the output location is writable, made before any
    model work. It sits in the output folder's closest existing ancestor, on the same file system, so the move is a
    rename."""

    def __init__(self, out: str, option: str = "--out"):
        self.out = check_output_folder(out, option)
        anchor = nearest_existing(self.out.absolute())
        try:
            self.path = Path(tempfile.mkdtemp(prefix=f".{PROG}-", dir=anchor))
        except OSError as exc:
            raise CliError(f"{option} {out}: cannot write in {anchor} ({exc.strerror or exc})") from None

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, *exc_info) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def commit(self, files: list[Path]) -> list[Path]:
        """Move ``files`` (written into :attr:`path`) into the output folder; returns where they are now."""
        self.out.mkdir(parents=True, exist_ok=True)
        moved = []
        for f in files:
            dest = self.out / f.name
            shutil.move(str(f), dest)
            moved.append(dest)
        return moved

    def shown(self) -> str:
        return f"{self.out}{os.sep}"


def check_output_prefix(out: str, option: str = "--out") -> Path:
    """A path that gets suffixes (``evaluate``'s ``<out>.md``, ``.csv``): its folder can be created and written."""
    if not out.strip():
        raise CliError(f"{option}: an empty path")
    path = Path(out)
    folder = check_output_folder(str(path.parent), option) if str(path.parent) not in ("", ".") else Path(".")
    anchor = nearest_existing(folder.absolute())
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise CliError(f"{option} {out}: cannot write in {anchor} (permission denied)")
    return path


# ---------------------------------------------------------------------------------------------------- texts


@dataclass(frozen=True)
class Text:
    """One text to explain and where it came from (``text 2``, ``reviews.txt:14``), to name it in the outputs."""

    label: str
    text: str


def check_encoding(encoding: str) -> str:
    try:
        return codecs.lookup(encoding).name
    except LookupError:
        raise CliError(f"--encoding {encoding}: not an encoding Python knows (e.g. utf-8, latin-1, cp1252)") from None


def read_inline_texts(values: list[str] | None, option: str, name: str, purpose: str) -> list[Text]:
    """The texts given on the command line with ``option`` (``--text``, ``--prompt``), labelled ``name N``; an empty
    or whitespace-only one is an error saying there is nothing to ``purpose``."""
    texts = []
    for number, text in enumerate(values or [], start=1):
        if not text.strip():
            what = "empty" if not text else "only whitespace"
            raise CliError(f"{option} number {number} is {what}: there is nothing to {purpose}")
        texts.append(Text(f"{name} {number}", text))
    return texts


def read_text_file(path: str, encoding: str = "utf-8", option: str = "--text-file") -> list[Text]:
    """The non-blank lines of a text file, one text each, labelled ``name:line``; blank lines are skipped with a
    note naming them. Decoded as ``encoding`` (UTF-8 by default, a byte-order mark dropped); a file that does not
    decode is an error naming the byte and the line, and the option that fixes it."""
    p = Path(path)
    if p.is_dir():
        raise CliError(f"{option} {path}: is a directory, not a text file")
    if not p.is_file():
        raise CliError(f"{option} {path}: no such file")
    data = p.read_bytes()
    codec = check_encoding(encoding)
    try:
        content = data.decode("utf-8-sig" if codec == "utf-8" else codec)
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise CliError(f"{option} {path}: not {encoding} text (byte 0x{data[exc.start]:02x} on line {line}); give its "
                       "encoding with --encoding, e.g. --encoding latin-1") from None
    texts, blank = [], []
    for number, line in enumerate(content.splitlines(), start=1):
        if line.strip():
            texts.append(Text(f"{p.name}:{number}", line.strip()))
        else:
            blank.append(number)
    if not texts:
        raise CliError(f"{option} {path}: no text in it (one text per line; {len(blank)} blank lines)")
    if blank:
        shown = ", ".join(map(str, blank[:8])) + (" …" if len(blank) > 8 else "")
        note(f"{path}: skipped {len(blank)} blank line(s) ({shown}); each text is named by its line")
    return texts


# ---------------------------------------------------------------------------------------------- tokenizers

# Below this many regular (non-special) tokens a tokenizer has no vocabulary: transformers 5 builds such an empty
# tokenizer from a model folder without tokenizer files, and every word becomes the unknown token.
MIN_REGULAR_TOKENS = 10
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt",
                   "spiece.model", "sentencepiece.bpe.model", "tokenizer.model")


def check_tokenizer(tokenizer, model_vocab: int | None, source: str, needs_padding: bool = True) -> None:
    """Refuse a tokenizer that would silently explain something else than the text: one without a vocabulary
    (every word ``[UNK]``), one that does not belong to the model (far fewer tokens than the model has embedding
    rows), or one that cannot pad a batch."""
    advice = ("save the tokenizer beside the model: tokenizer.save_pretrained(DIR), with the tokenizer the model "
              "was trained with")
    special = len(set(tokenizer.all_special_tokens))
    size = len(tokenizer)
    if size - special < MIN_REGULAR_TOKENS:
        raise CliError(f"--model {source}: its tokenizer has no vocabulary ({size} tokens, {special} of them special) "
                       f"and would turn every word into {tokenizer.unk_token or 'the unknown token'}; {advice}")
    if model_vocab is not None and 2 * size < model_vocab:
        raise CliError(f"--model {source}: its tokenizer has {size} tokens but the model has {model_vocab} embedding "
                       f"rows: not the model's tokenizer; {advice}")
    if needs_padding and tokenizer.pad_token is None:
        raise CliError(f"--model {source}: its tokenizer has no padding token, which a batch of texts needs (a "
                       "decoder's tokenizer, e.g. GPT-2's?); explain --text takes encoder classifiers (BERT, RoBERTa, "
                       "DistilBERT) whose tokenizers pad")


def load_tokenizer(folder: Path, model_vocab: int | None, source: str, needs_padding: bool = True):
    """The tokenizer saved in a model folder, checked (:func:`check_tokenizer`)."""
    from transformers import AutoTokenizer

    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise CliError(f"--model {source}: no tokenizer files there (tokenizer.json, vocab.txt, ...); save the "
                       "tokenizer beside the model: tokenizer.save_pretrained(DIR)")
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CliError(f"--model {source}: its tokenizer does not load ({exc})") from None
    check_tokenizer(tokenizer, model_vocab, source, needs_padding)
    return tokenizer


def token_limit(tokenizer, texts: list[Text], max_tokens: int | None, model: str) -> int:
    """The length texts are cut at (the model's, else the tokenizer's), with a note naming the texts that are longer:
    the model cannot read more, and nothing is cut silently."""
    limit = max_tokens if max_tokens is not None else tokenizer.model_max_length
    lengths = [len(ids) for ids in tokenizer([t.text for t in texts])["input_ids"]]
    long = [(t.label, n) for t, n in zip(texts, lengths) if n > limit]
    if long:
        shown = ", ".join(f"{label} ({n} tokens)" for label, n in long[:5]) + (" …" if len(long) > 5 else "")
        note(f"{len(long)} of {len(texts)} texts are longer than the limit of {model}, {limit} tokens, and were cut "
             f"to it: {shown}")
    return limit


def encode(tokenizer, texts: list[Text], limit: int, device: torch.device) -> dict:
    """A right-padded batch of ``texts`` cut at ``limit`` tokens, with the keys the explained models take."""
    batch = tokenizer([t.text for t in texts], padding=True, truncation=True, max_length=limit, return_tensors="pt")
    return {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def unknown_tokens(tokenizer, input_ids: torch.Tensor, texts: list[Text]) -> list[tuple[str, int]]:
    """``(label, how many)`` for each text with tokens unknown to the tokenizer."""
    if tokenizer.unk_token_id is None:
        return []
    counts = (input_ids == tokenizer.unk_token_id).sum(1).tolist()
    return [(t.label, n) for t, n in zip(texts, counts) if n]


def note_unknown(tokenizer, hits: list[tuple[str, int]]) -> None:
    """One note when words were unknown to the tokenizer: text.html shows them as its unknown token."""
    if hits:
        shown = ", ".join(label for label, _ in hits[:5]) + (" …" if len(hits) > 5 else "")
        note(f"{sum(n for _, n in hits)} token(s) in {len(hits)} text(s) are unknown to the tokenizer ({shown}); "
             f"text.html shows them as {tokenizer.unk_token} with a dashed outline")


# ------------------------------------------------------------------------------------------- models on disk


def read_hf_config(spec: str) -> dict | None:
    """``config.json`` of a local transformers checkpoint folder (``None`` when ``spec`` is not one)."""
    import json

    config = Path(spec) / "config.json"
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CliError(f"--model {spec}: config.json is not valid JSON ({exc})") from None


def hf_kind(config: dict) -> str:
    """What a transformers checkpoint is, from its config: ``"clip"``, ``"image"`` (an image classifier),
    ``"text"`` (a sequence classifier), ``"decoder"`` (a causal language model) or ``"other"``."""
    from transformers.models.auto import modeling_auto as auto

    model_type = config.get("model_type", "")
    archs = config.get("architectures") or []
    if model_type == "clip":
        return "clip"
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) or config.get("is_decoder"):
        return "decoder"
    if any(a.endswith("ForImageClassification") for a in archs):
        return "image"
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return "text"
    image = model_type in auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES
    text = model_type in auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES
    return "image" if image and not text else "text" if text and not image else "other"


def wrong_kind(spec: str, kind: str, wanted: str) -> CliError:
    """The error for a model folder of another kind than the inputs given."""
    what = {"image": "an image classifier: give --image files",
            "text": "a text classifier: give --text or --text-file",
            "clip": "a CLIP model: give --image files and --text captions together",
            "decoder": "a decoder language model (GPT-2, Llama, ...): give --prompt or --prompt-file",
            "other": "neither an image nor a text classifier transformer-lrp supports"}[kind]
    return CliError(f"--model {spec} is {what} (the inputs given are {wanted})")


def supported_encoder(model):
    """The model's encoder description; a family the adapters do not describe raises ``UnsupportedModelError``
    naming the module and what is supported (one line, exit 2) before any input is processed."""
    from transformer_lrp.adapters import build_encoder

    return build_encoder(model)


def load_failure(spec: str, exc: Exception) -> CliError:
    return CliError(f"--model {spec}: does not load ({one_line(exc)[:400]})")


@contextlib.contextmanager
def quiet_transformers():
    """transformers' progress bars and log lines off while loading: what matters is checked and reported here."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()


def load_pretrained(auto_class, spec: str):
    """``auto_class.from_pretrained(spec)`` from local files, quietly, refusing a checkpoint that lacks weights the
    model needs: transformers would fill them with random values (a random classifier head explains nothing)."""
    try:
        with quiet_transformers():
            model, info = auto_class.from_pretrained(spec, local_files_only=True, output_loading_info=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise load_failure(spec, exc) from None
    missing = [k for k in info.get("missing_keys", ()) if not k.endswith("position_ids")]
    if missing:
        shown = ", ".join(sorted(missing)[:4]) + (" …" if len(missing) > 4 else "")
        raise CliError(f"--model {spec}: the checkpoint lacks {len(missing)} weight(s) the model needs ({shown}); "
                       "transformers would make them random. Save the trained model with model.save_pretrained(DIR)")
    return model.eval()


# ---------------------------------------------------------------------------------------- batches and files


def explain_options(args) -> dict:
    """``explain``'s keyword arguments from the command line's method options."""
    options = dict(method=args.method, backend=args.backend, target=args.target)
    if args.start_layer is not None:
        options["start_layer"] = args.start_layer
    return options



def batches(n: int, size: int, what: str):
    """Batch starts, with a progress bar on a terminal for three batches or more."""
    from tqdm.auto import tqdm

    starts = range(0, n, size)
    return tqdm(starts, desc=what, unit="batch", disable=len(starts) < 3 or not sys.stderr.isatty())


def save_raw(folder: Path, name: str, tensor: torch.Tensor, raw: str) -> Path:
    """The raw relevance as ``name.pt`` (torch) or ``name.npy`` (numpy)."""
    if raw == "npy":
        import numpy as np

        path = folder / f"{name}.npy"
        np.save(path, tensor.detach().cpu().numpy())
        return path
    path = folder / f"{name}.pt"
    torch.save(tensor.detach().cpu(), path)
    return path


def safe_stem(name: str) -> str:
    """A file name stem from an input's name: path separators and control characters replaced."""
    return re.sub(r"[^\w.\-]+", "_", name).strip("._") or "input"


# ------------------------------------------------------------------------------------------- conservation


def conservation_suffix(exp, j: int) -> str:
    """For a method that carries relevance to the input: the total that reached it against what was put in at the
    explained logit, for sample ``j`` (appended to its line)."""
    kept = exp.conservation
    if kept is None:
        return ""
    return f"  [{kept.location} receive {float(kept.ratio[j]):.3g}x the relevance put in at the logit]"


def conservation_note(explanations: list, what: str) -> None:
    """One line when the relevance of some samples is not conserved (docs/method.md §10)."""
    from transformer_lrp.conservation import CONSERVATION_BOUND

    kept = [e.conservation for e in explanations if e.conservation is not None]
    if not kept:
        return
    ratios = torch.cat([k.ratio for k in kept])
    off = int(torch.cat([k.off() for k in kept]).sum())
    if off:
        lo, hi = float(ratios.min()), float(ratios.max())
        span = f"{lo:.3g}x" if lo == hi else f"{lo:.3g}x to {hi:.3g}x"
        when = (f"beyond {CONSERVATION_BOUND:g}x in magnitude" if kept[0].absorbing else
                f"negative or beyond {CONSERVATION_BOUND:g}x either way")
        print(f"warning: relevance is not conserved for {off} of {len(ratios)} {what}: {kept[0].location} receive "
              f"{span} the relevance put in at the explained logit (1x when conserved; warned when {when}); such "
              f"maps show how the rules amplify relevance, see {kept[0].reference}", file=sys.stderr)
