"""Decode speed on CPU: tinyk's engine against llama.cpp running the same model from `tinyk model gguf`.

A random-init `seed-215m` (vocab 6144, the synthetic tokenizer of bench/decode.py) decodes greedily,
batch 1, EOS ignored, from the same prompt (121 tokens): tinyk in fp32 and with `--quantize int8`,
llama.cpp's `llama-completion` on the f16 and q8_0 files, with the same number of threads, the
trials interleaved, each engine going first in turn. Decode tokens/s leaves the prompt out for both:
tinyk's is (N - 1) / (T(N) - T(1)) as in bench/decode.py, llama.cpp's its own "eval time" line.

Usage: .venv/bin/python bench/llama_cpp.py --llama-cpp /path/to/llama.cpp/build/bin [--preset seed-82m]
"""

from __future__ import annotations

import os
import re
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from _common import Parser, decode_rate, rotated, run_main
from decode import synthetic_tokenizer
from tinyk.checkpoint import init_model_dir, is_model_dir
from tinyk.cli.common import int_range, positive_int
from tinyk.demo import machine_text
from tinyk.engine import Engine, SamplingParams
from tinyk.gguf import export_gguf
from tinyk.model import PRESETS

PROMPT = "<|im_start|>" + "北京大学是中国的一所大学。" * 4
EVAL_RATE = re.compile(r"(?<!prompt )eval time =[^\n]*?([\d.]+) tokens per second")


def tinyk_rate(engine: Engine, new_tokens: int) -> float:
    def run(n: int) -> float:
        t0 = time.perf_counter()
        engine.generate([PROMPT], SamplingParams(temperature=0, repetition_penalty=1.0, max_new_tokens=n,
                                                 ignore_eos=True))
        return time.perf_counter() - t0

    first, full = run(1), run(new_tokens)
    return decode_rate(new_tokens - 1, first, full, "--new-tokens")


def llama_rate(binary: Path, gguf: Path, new_tokens: int, threads: int) -> float:
    """llama-completion's own decode rate; it prints through a logging thread that can lose its last
    lines, so a run that did not print it is run again."""
    for _ in range(3):
        r = subprocess.run([str(binary), "-m", str(gguf), "-no-cnv", "-p", PROMPT, "-n", str(new_tokens),
                            "-t", str(threads), "--temp", "0", "--repeat-penalty", "1", "--ignore-eos"],
                           capture_output=True, text=True, errors="replace", stdin=subprocess.DEVNULL)
        if r.returncode < 0:  # SIGILL: built with another CPU's instructions (GGML_NATIVE)
            raise SystemExit(f"{binary.name} was killed by {signal.Signals(-r.returncode).name} on {gguf.name}"
                             + (": built for another CPU? build with -DGGML_NATIVE=OFF" if r.returncode == -4 else ""))
        if r.returncode:
            last = r.stderr.strip().splitlines()[-1:] or ["(nothing on stderr)"]
            raise SystemExit(f"{binary.name} failed on {gguf.name} (exit {r.returncode}): {last[0]}")
        if m := EVAL_RATE.search(r.stderr):
            return float(m.group(1))
    raise SystemExit(f"{binary} printed no eval time three times")


def main() -> None:
    ap = Parser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-cpp", type=Path, default=os.environ.get("TINYK_LLAMA_CPP"),
                    help="llama.cpp's build/bin folder, with llama-completion (default: $TINYK_LLAMA_CPP)")
    ap.add_argument("--preset", default="seed-215m", choices=list(PRESETS))
    ap.add_argument("--new-tokens", type=int_range(2), default=128, help="at least 2: the first is timed apart")
    ap.add_argument("--trials", type=positive_int, default=3)
    ap.add_argument("--threads", type=positive_int, default=torch.get_num_threads())
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "tinyk-bench-llama-cpp",
                    help="where the model (reused across runs) and its GGUF files (written anew) are built")
    args = ap.parse_args()
    print(f"machine: {machine_text()}", flush=True)
    if args.llama_cpp is None:
        ap.error("give --llama-cpp (or set TINYK_LLAMA_CPP): make test-llama-cpp builds one in "
                 ".cache/llama.cpp-*/build/bin, without native CPU flags; build llama.cpp yourself for figures "
                 "worth comparing")
    binary = args.llama_cpp / "llama-completion"
    if not binary.is_file():  # before minutes of exporting
        ap.error(f"{binary} not found: give llama.cpp's build/bin folder")
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    model = args.work / args.preset
    if not is_model_dir(model):  # one that is something else is refused, not replaced
        init_model_dir(args.preset, synthetic_tokenizer(args.work / "tokenizer"), model, seed=0)
    ggufs = {}
    for outtype in ("f16", "q8_0"):  # this tinyk's exporter, not the one a file there was written by
        ggufs[outtype] = args.work / f"{args.preset}-{outtype}.gguf"
        export_gguf(model, ggufs[outtype], outtype=outtype, force=True)
    engines = {"tinyk fp32": Engine.from_dir(model), "tinyk int8": Engine.from_dir(model, quantize="int8")}
    names = [*engines, *(f"llama.cpp {t}" for t in ggufs)]

    def rate(name: str) -> float:
        if name in engines:
            return tinyk_rate(engines[name], args.new_tokens)
        return llama_rate(binary, ggufs[name.split()[-1]], args.new_tokens, args.threads)

    for name in names:  # warm-up: page the weights in, build the caches
        rate(name)
    rates: dict[str, list[float]] = {name: [] for name in names}
    for trial in range(args.trials):
        for name in rotated(names, trial):
            rates[name].append(rate(name))
    print(f"{args.preset}, batch 1, {args.new_tokens} new tokens, {args.threads} threads, "
          f"median of {args.trials} interleaved trials")
    print(f"{'engine':<18}{'decode tokens/s':>16}{'vs tinyk int8':>15}")
    base = statistics.median(rates["tinyk int8"])
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"{name:<18}{median:>16.1f}{median / base:>14.2f}x")


if __name__ == "__main__":
    run_main(main)
