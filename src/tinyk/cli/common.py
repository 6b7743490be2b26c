"""Argument helpers shared by the stage modules.

Numeric flags are checked as they are parsed (the `type=` helpers below), so a bad value is
refused before anything is loaded, with a message that names the allowed range. inf and nan
are never accepted.
"""

from __future__ import annotations

import argparse
import codecs
import json
import math
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from tinyk.errors import MPS_REFUSED
from tinyk.inputs import STDIN_NAMES, has_surrogate, is_plain_text
from tinyk.units import MAX_BATCH, MAX_SIZE, parse_size

if TYPE_CHECKING:
    from tinyk.engine import SamplingParams

# pretrain, sft and plan's --dtype and --parallel, and --lr-schedule: what the trainer's config takes
# (config.TRAIN_DTYPES with PyTorch's names, DTYPE_ALIASES; config.PARALLEL; config.LR_SCHEDULES), here so
# that parsing arguments needs no torch.
DTYPE_CHOICES = ("auto", "bf16", "fp16", "fp32", "bfloat16", "float16", "float32")
PARALLEL_CHOICES = ("ddp", "fsdp")
LR_SCHEDULE_CHOICES = ("cosine", "wsd")
GGUF_OUTTYPES = ("f16", "bf16", "f32", "q8_0")  # gguf.OUTTYPES, which imports torch
PRESET_NAMES = ", ".join(("seed-215m", "seed-82m", "tiny", "nano"))  # model.PRESETS' names, for --help

SEED_MAX = 2**32 - 1  # numpy's seeds are 32-bit
REPETITION_PENALTY_RANGE = (0.01, 10)  # engine.REPETITION_PENALTY_RANGE, here so that parsing arguments needs no torch


def speaks_for_machine() -> bool:
    """Whether this process prints a command's lines: under torchrun only local rank 0 does, once per
    machine rather than once per process."""
    return os.environ.get("LOCAL_RANK", "0") == "0"


def _refuse(rule: str, s: str) -> NoReturn:
    raise argparse.ArgumentTypeError(f"must be {rule}, got {s!r}")


def int_range(lo: int | None = None, hi: int | None = None) -> Callable[[str], int]:
    """A `type=` for an integer in lo..hi (either end may be open)."""
    if lo is not None and hi is not None:
        rule = f"an integer in {lo}..{hi}"
    elif lo is not None:
        rule = f"an integer >= {lo}"
    else:
        rule = f"an integer <= {hi}"

    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            _refuse(rule, s)
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            _refuse(rule, s)
        return v

    parse.__name__ = "integer"
    return parse


def float_range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
                hi_open: bool = False, unit: str = "") -> Callable[[str], float]:
    """A `type=` for a finite number between lo and hi; `lo_open`/`hi_open` exclude that end."""
    if lo is not None and hi is not None:
        rule = f"a finite number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    elif lo is not None:
        rule = f"a finite number {'>' if lo_open else '>='} {lo:g}"
    elif hi is not None:
        rule = f"a finite number {'<' if hi_open else '<='} {hi:g}"
    else:
        rule = "a finite number"
    rule += unit

    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            _refuse(rule, s)
        if not math.isfinite(v):
            _refuse(rule, s)
        if lo is not None and (v <= lo if lo_open else v < lo):
            _refuse(rule, s)
        if hi is not None and (v >= hi if hi_open else v > hi):
            _refuse(rule, s)
        return v

    parse.__name__ = "number"
    return parse


positive_int = int_range(1)
non_negative_int = int_range(0)
seed = int_range(0, SEED_MAX)
sampling_seed = int_range(-2**63, 2**63 - 1)  # the API's (OpenAI's int64): any request's seed can be replayed
batch_count = int_range(1, MAX_BATCH)
positive_float = float_range(0, lo_open=True)


def utf8_text(s: str) -> str:
    """A `type=` for text a model reads: bytes that are not UTF-8 (a GBK terminal, a script's raw bytes)
    reach Python as lone surrogates, which no tokenizer can encode. So do UTF-8 bytes under an ASCII
    locale (LC_ALL=C without Python's UTF-8 mode): those are read as the UTF-8 they are."""
    if has_surrogate(s):
        try:
            return os.fsencode(s).decode("utf-8")
        except UnicodeError:
            raise argparse.ArgumentTypeError("is not valid UTF-8 text (the terminal or script passed other "
                                             "bytes)") from None
    return s


def non_empty(s: str) -> str:
    """A `type=` for text that must say something (not empty, not only spaces)."""
    if not s.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return utf8_text(s)


def train_device(s: str) -> str:
    """pretrain/sft --device: Apple's mps named with the reason it is refused, not as a bad choice."""
    if s == "mps":
        raise argparse.ArgumentTypeError(MPS_REFUSED)
    if s not in ("auto", "cpu", "cuda"):
        # cuda:N: each process takes its own GPU, under torchrun the local rank's
        how = f" (to train on GPU {s[5:]}, run with CUDA_VISIBLE_DEVICES={s[5:]} and --device cuda)" \
            if s.startswith("cuda:") else ""
        raise argparse.ArgumentTypeError(f"must be auto, cpu or cuda, got {s!r}{how}")
    return s


def add_field_arg(p: argparse.ArgumentParser) -> None:
    """--field of the commands that read documents; None when not given, for `text_field`."""
    p.add_argument("--field", default=None, type=non_empty,
                   help="JSON/Parquet field holding the text (default text; .txt files are one document a line)")


def text_field(field: str | None, inputs: list[str], *, default: str = "text", source: str = "--input",
               unit: str = "document", stdin: bool = False) -> str:
    """--field, with a word when no input has fields (every one plain text, or none given: tokenizer
    eval's own samples, generate's --prompt), rather than ignored unseen. `stdin`: "-" reads lines of
    text (generate's --prompt-file)."""
    if field is not None and not inputs:
        print(f"tinyk: --field {field} is not used without {source}", file=sys.stderr)
    elif field is not None and all(is_plain_text(Path(i)) or (stdin and str(i) in STDIN_NAMES) for i in inputs):
        plain = "stdin holds" if all(str(i) in STDIN_NAMES for i in inputs) else ".txt files hold"
        print(f"tinyk: --field {field} is not used: {plain} one {unit} a line, with no fields", file=sys.stderr)
    return default if field is None else field


def stop_text(s: str) -> str:
    """A `type=` for --stop: an empty stop string would be found before the first token, ending every answer."""
    if not s:
        raise argparse.ArgumentTypeError("must not be empty")
    return utf8_text(s)


def json_text(obj: object, indent: int | None = None) -> str:
    """JSON for stdout: its text as it is where stdout is UTF-8, escaped (\\uXXXX) where it has another
    encoding (PYTHONIOENCODING=ascii, a GBK console), which printed '?' for the Chinese; C1 controls and
    DEL always escaped, as JSON allows: a terminal would obey U+009B as the escape sequences' CSI. A lone
    surrogate (a GBK folder name's bytes, as Python holds them) is U+FFFD, as in the files tinyk writes:
    as its own bytes it made the output no UTF-8, and no JSON reader's."""
    utf8 = codecs.lookup(getattr(sys.stdout, "encoding", None) or "utf-8").name == "utf-8"
    text = json.dumps(_without_surrogates(obj), ensure_ascii=not utf8, indent=indent)
    return re.sub("[\x7f-\x9f]", lambda m: f"\\u{ord(m[0]):04x}", text)


def _without_surrogates(obj: object) -> object:
    if isinstance(obj, str):
        return _SURROGATE.sub("\ufffd", obj)
    if isinstance(obj, dict):
        return {_without_surrogates(k): _without_surrogates(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_without_surrogates(v) for v in obj]
    return obj


_SURROGATE = re.compile("[\ud800-\udfff]")


def path_arg(s: str) -> str:
    """A `type=` for a path: an empty one (`--config "$CFG"` with CFG unset) is no path, not the current
    folder (`--model ""` was called a folder of .pth files to import) nor a file not given (the config
    was left out)."""
    if not s:
        raise argparse.ArgumentTypeError("is empty; give a path")
    return s


def size_range(lo: int = 1, hi: int = MAX_SIZE, *, tokens: bool = False) -> Callable[[str], int]:
    """A `type=` for a byte or token count in lo..hi, written as '500M', '2G', '1e9' or a plain number
    (`units.parse_size`: with `tokens`, 10B is ten billion, not ten bytes)."""

    def parse(s: str) -> int:
        try:
            return parse_size(s, lo, hi, tokens=tokens)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = "size"
    return parse


positive_size = size_range(1)
token_count = size_range(1, tokens=True)


def model_dir(text: str) -> str:
    """--model (and --tokenizer): a model directory, or a training run's directory meaning its final/ model,
    as --init takes it."""
    final = os.path.join(path_arg(text), "final")
    # os.path's checks, not Path's: a name too long or a folder this user may not read is the command's
    # to report, in one line, not a traceback here
    if not os.path.exists(os.path.join(text, "config.json")) and all(
            os.path.isfile(os.path.join(final, f)) for f in ("config.json", "model.safetensors")):
        return final
    return text


def add_sampling_args(p: argparse.ArgumentParser, seed_help: str = "seed for reproducible sampling") -> None:
    """Sampling flags shared by generate, chat and serve; defaults avoid loops on small models.

    Their ranges are `SamplingParams`' own (--top-k's capped, far past any vocabulary), checked here so that
    a bad value is named by its flag."""
    p.add_argument("--temperature", type=float_range(0), default=0.7,
                   help="0 = greedy; higher = more random (default 0.7)")
    p.add_argument("--top-k", type=int_range(0, 1_000_000), default=50,
                   help="sample among the k most likely tokens; 0 = off (default 50)")
    p.add_argument("--top-p", type=float_range(0, 1), default=0.9, help="nucleus sampling mass; 1 = off (default 0.9)")
    p.add_argument("--min-p", type=float_range(0, 1), default=0.0,
                   help="drop tokens below min_p x the top probability; 0 = off (default 0)")
    p.add_argument("--repetition-penalty", type=float_range(*REPETITION_PENALTY_RANGE), default=1.1,
                   help="penalise tokens already in the text, {:g} to {:g}; 1 = off (default 1.1)".format(
                       *REPETITION_PENALTY_RANGE))
    p.add_argument("--max-new-tokens", type=positive_int, default=256, help="token budget per answer (default 256)")
    p.add_argument("--seed", type=sampling_seed, default=None, help=seed_help)
    p.add_argument("--stop", action="append", type=stop_text, default=[], metavar="TEXT",
                   help="stop when this text appears (repeatable); it is not part of the output")


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Model and device flags shared by generate, chat and serve."""
    p.add_argument("--model", required=True, type=model_dir,
                   help="model directory, or a training run's (meaning its final/)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="auto (bf16 on CUDA, fp16 on GPUs without bf16 such as V100 and T4, fp32 on CPU; with "
                        "--quantize int8 see there), bf16, fp16, fp32 (or bfloat16, float16, float32)")
    p.add_argument("--quantize", choices=["none", "int8"], default="none",
                   help="int8 (CPU only): weight-only int8 copies of the weights; auto computes in bf16, or fp32 on a "
                        "CPU without bf16 instructions; batch-1 decoding 1.5-1.75x as fast as transformers' fp32 "
                        "generate in bench/decode.py, slightly different numbers")
    p.add_argument("--threads", type=int_range(1, 4096), default=None,
                   help="CPU threads (default: torch's, one per core; on a machine busy with other work, fewer "
                        "can be many times faster)")


def set_threads(args: argparse.Namespace) -> None:
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    from tinyk.engine import SamplingParams

    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                          repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens,
                          seed=args.seed, stop=list(args.stop))
