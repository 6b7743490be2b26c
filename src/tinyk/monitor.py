"""What a person watches during training: progress bar, metrics.jsonl, loss curve, trackers, MFU.

Only rank 0 creates a `Monitor`; everything here is host-side bookkeeping and never touches
the GPU, so logging costs no synchronisation beyond what the trainer already does.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import inspect
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from .errors import TinykError, first_line, is_terminal, say_on_stderr, writing
from .model import cuda_autocast_dtype, dtype_name
from .outputs import atomic_file, shows_a_bar, write_text_atomic
from .units import plural

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, matched against torch.cuda.get_device_name() as
# whole model numbers (an RTX A1000 is no A100). The order matters: the first name found wins.
GPU_PEAK_TFLOPS: dict[str, float] = {
    "GB200": 2500.0, "B200": 2250.0, "GH200": 989.0, "H200 NVL": 835.0, "H200": 989.0,
    "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0,
    "H800": 989.0, "H20": 148.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0, "L40": 181.0, "L4": 121.0,
    "A10G": 70.0, "A10": 125.0, "RTX 6000 Ada": 364.0, "A6000": 155.0, "RTX 5090": 209.0, "RTX 4090": 165.0,
    "RTX 4080": 97.0, "RTX 3090": 71.0, "RTX 3080": 59.5, "V100": 125.0, "T4": 65.0,
}

TRACKERS = ("tensorboard", "wandb", "swanlab")
TRACKER_ID = ".tracker_id"  # the W&B and SwanLab run id, kept across resumes, then the trackers that hold it
TRACKER_STEP = ".tracker_step"  # the last step earlier sessions may have sent W&B and SwanLab


def gpu_peak_flops(name: str) -> float | None:
    """The dense bf16 peak FLOP/s of a GPU by its device name, or None if unknown (a laptop chip shares
    its desktop card's name, not its peak)."""
    if re.search(r"laptop|mobile|max-q", name, re.IGNORECASE):
        return None
    for key, tflops in GPU_PEAK_TFLOPS.items():
        if re.search(rf"(?<![a-z0-9]){re.escape(key)}(?![0-9])", name, re.IGNORECASE):
            return tflops * 1e12
    return None


# A half dtype's matmul on a CPU without its instructions runs as fast at this size as at 1024.
SMALL_PRODUCT = 256


def measure_matmul_flops(seconds: float = 0.15, n: int = 1024, dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of a square matmul on this CPU with the current thread count (a practical peak).

    The fastest single product counts, not the average: on a shared machine other work only ever
    slows a product down, and an average taken in a busy moment put MFU above 100%. A half dtype that
    would take longer than `seconds` per n x n product (bf16 or fp16 on a CPU without their
    instructions: 2.3 s at 1024, 9 s at the start of each run) is timed on SMALL_PRODUCT-square ones."""
    g = torch.Generator().manual_seed(0)  # not the global generator: a resumed run's dropout stream is restored
    size = n
    if dtype in (torch.bfloat16, torch.float16) and n > SMALL_PRODUCT and \
            _fastest_product(SMALL_PRODUCT, dtype, g, 0.0) * (n / SMALL_PRODUCT) ** 3 > seconds:
        size = SMALL_PRODUCT
    return 2 * size ** 3 / _fastest_product(size, dtype, g, seconds)


def _fastest_product(size: int, dtype: torch.dtype, g: torch.Generator, seconds: float) -> float:
    """Seconds the fastest size x size product takes, of those timed for `seconds` (at least three) after an
    untimed one."""
    a, b = torch.randn(size, size, dtype=dtype, generator=g), torch.randn(size, size, dtype=dtype, generator=g)
    torch.mm(a, b)
    best, iters, start = math.inf, 0, time.perf_counter()
    while time.perf_counter() - start < seconds or iters < 3:
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
        iters += 1
    return best


def peak_flops(device: torch.device, override_tflops: float | None,
               dtype: torch.dtype = torch.float32) -> tuple[float | None, str]:
    """Peak FLOP/s per device for MFU, and a phrase saying where the number came from.

    GPUs use the dense bf16 tensor-core peak (fp16 before Ampere, which has no bf16) whatever the
    training dtype (the usual MFU convention); a CPU has no table to go by, so its matmul rate is
    measured in the training dtype.
    """
    if override_tflops:
        return override_tflops * 1e12, "from the config (peak_tflops)"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak_flops(name)
        if peak is None:
            return None, f"unknown for {name} (set peak_tflops to get MFU)"
        return peak, f"{name} dense {'bf16' if cuda_autocast_dtype(device) == torch.bfloat16 else 'fp16'}"
    if device.type == "cpu":
        return (measure_matmul_flops(dtype=dtype),
                f"measured {dtype_name(dtype)} matmul on this CPU, {plural(torch.get_num_threads(), 'threads')}")
    return None, f"unknown for {device.type} (set peak_tflops to get MFU)"


def check_trackers(names: Iterable[str]) -> None:
    """Refuses a tracker tinyk does not know: from a config before anything loads, and before any starts."""
    unknown = next((n for n in names if n not in TRACKERS), None)
    if unknown is not None:
        raise TinykError(f"unknown tracker {unknown!r} (choose from {', '.join(TRACKERS)})")


def _reason(e: Exception) -> str:
    """A tracker's refusal in its own words: its first line, or for a settings check (pydantic's
    ValidationError, as SwanLab raises for a project name it does not take) each field and its rule,
    which the first line ("1 validation error for Settings") leaves out."""
    errors = getattr(e, "errors", None)
    if callable(errors):
        with contextlib.suppress(Exception):
            return "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in errors())
    return first_line(e)


def _offline(name: str) -> bool:
    """Whether W&B or SwanLab logs to local files only (its *_MODE variable)."""
    return os.environ.get(f"{name.upper()}_MODE", "").lower() in ("offline", "local", "dryrun", "disabled")


class Trackers:
    """TensorBoard, Weights & Biases and SwanLab behind one `log`; each imported only when asked for."""

    def __init__(self, names: list[str], out: Path, config: dict[str, Any], project: str, run_name: str,
                 start_step: int = 0, logged_upto: int = 0):
        """`start_step`: the step a resumed run continues from; TensorBoard drops what a killed run
        logged after it, so the curve has no doubled points. W&B and SwanLab cannot drop points: they
        get no step up to `logged_upto`, the last one a killed session may have sent them (W&B refuses
        a lower step than it has, SwanLab keeps the first of two), so their curves keep that session's
        values there; offline they get them again. A run from step 0 (new, or resumed before its first
        checkpoint) is a new run for W&B and SwanLab too, as is one whose earlier sessions did not start
        that tracker."""
        self.sinks: list[tuple[str, Any]] = []
        names = list(dict.fromkeys(names))  # one writer each: a name given twice would log every point twice
        check_trackers(names)
        if not start_step:
            (out / TRACKER_ID).unlink(missing_ok=True)
        holding = _trackers_holding(out)
        # Offline, a killed session's last points may never have left its buffer, and each session writes
        # a folder of its own: they are sent again.
        self.logged_upto = {name: logged_upto if (holding is None or name in holding) and not _offline(name) else 0
                            for name in names}
        try:
            for name in names:
                self.sinks.append((name, self._start(name, out, config, project, run_name, start_step)))
                if name != "tensorboard":
                    _record_tracker(out, name)
        except BaseException as e:  # a W&B run started before SwanLab failed (or Ctrl-C) would otherwise stay open
            with contextlib.suppress(Exception):
                self.close(1, "another tracker could not start")
            if isinstance(e, TinykError) and start_step:  # it came with the run's saved config, maybe
                raise TinykError(f"{e}; to resume without it, give --tracker the others (--tracker '' for none)") \
                    from e
            raise

    @staticmethod
    def _start(name: str, out: Path, config: dict[str, Any], project: str, run_name: str, start_step: int) -> Any:
        package = name  # each tracker's name is its package's
        try:
            if name == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter

                writer = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1)
                # The run's settings, as W&B and SwanLab keep them (TensorBoard's text tab)
                writer.add_text("config", _as_text(config), start_step)
                return writer
            if name == "wandb":
                import wandb

                return wandb.init(project=project, name=run_name, config=config, dir=str(out),
                                  id=_run_id(out), resume="allow")
            import swanlab

            (out / "swanlab").mkdir(exist_ok=True)
            resume = {}
            if {"id", "resume"} <= set(inspect.signature(swanlab.init).parameters):  # swanlab >= 0.6
                # Its ids were exactly 21 characters in some versions: a digest of the run's own id.
                resume = {"id": hashlib.sha256(_run_id(out).encode()).hexdigest()[:21], "resume": "allow"}
            swanlab.init(project=project, experiment_name=run_name, config=config, logdir=str(out / "swanlab"),
                         **resume)
            return swanlab  # its module-level log()/finish() act on the run just started
        except ImportError as e:
            if isinstance(e, ModuleNotFoundError) and e.name == package:
                raise TinykError(f"--tracker {name} needs the '{package}' package (pip install {package})") from e
            # The package is there but something it imports is not: a broken or half-upgraded install.
            raise TinykError(f"--tracker {name} could not start: the '{package}' package does not import "
                             f"({first_line(e)}); reinstall it (pip install -U {package})") from e
        except Exception as e:  # not logged in, no network, no terminal to ask on: the tracker's own words
            why = _reason(e).rstrip(".")
            tip = "" if name == "tensorboard" or _offline(name) else f"; {name.upper()}_MODE=offline logs locally"
            raise TinykError(f"--tracker {name} could not start: {why}{tip}") from e

    def log(self, values: dict[str, float], step: int) -> None:
        """Sends one step's values."""
        def send(name: str, sink: Any) -> None:
            if name == "tensorboard":
                for k, v in values.items():
                    sink.add_scalar(k, v, step)
            elif step > self.logged_upto[name]:
                sink.log(values, step=step)

        self._each(send, step)

    def summarize(self, summary: dict[str, Any], step: int) -> None:
        """The run's results, as summary.json holds them: W&B's run summary (its runs table), TensorBoard's
        text tab. SwanLab keeps the curves alone."""
        def send(name: str, sink: Any) -> None:
            if name == "wandb":
                sink.summary.update({k: v for k, v in summary.items() if isinstance(v, int | float | str)})
            elif name == "tensorboard":
                sink.add_text("summary", _as_text(summary), step)

        self._each(send, step)

    def _each(self, send: Callable[[str, Any], None], step: int) -> None:
        """`send` to each tracker. One that fails (its service or its own background process gone) is
        dropped with a warning: metrics.jsonl and summary.json have every value, and the run goes on."""
        for name, sink in list(self.sinks):
            try:
                send(name, sink)
            except Exception as e:
                self.sinks.remove((name, sink))
                say_on_stderr(f"tinyk: warning: --tracker {name} failed at step {step} ({first_line(e)}); it gets "
                              f"nothing more from this run, and metrics.jsonl keeps every value")
                with contextlib.suppress(Exception):  # failed, not finished: it holds only part of the run
                    self._finish(name, sink, 1, f"tinyk stopped sending at step {step}: {first_line(e)}")
                _let_go(name)

    def close(self, exit_code: int = 0, error: str | None = None) -> None:
        """Finishes every tracker, also after one fails (TensorBoard on a full disk): the rest would be
        left "running" in their services. The run's outputs are written already, so a failure is a warning.
        `exit_code` is the command's (128 + a signal's number for a stopped run): W&B and SwanLab show
        a run that failed or was stopped as such, not as finished."""
        for name, sink in self.sinks:
            try:
                self._finish(name, sink, exit_code, error)
            except Exception as e:  # said where a closed stderr loses it: the trackers after it still finish
                say_on_stderr(f"tinyk: warning: --tracker {name} did not finish ({first_line(e)}); metrics.jsonl "
                              f"keeps every value")
                _let_go(name)

    @staticmethod
    def _finish(name: str, sink: Any, exit_code: int = 0, error: str | None = None) -> None:
        if name == "tensorboard":
            sink.close()
        elif name == "wandb":
            sink.finish(exit_code=exit_code)
        elif exit_code == 0:
            sink.finish()
        elif "state" in inspect.signature(sink.finish).parameters:  # swanlab >= 0.7; earlier ones only finish
            sink.finish(state="aborted" if exit_code > 128 else "crashed",
                        error=error or f"tinyk exited with status {exit_code}")
        else:
            sink.finish()


def _as_text(data: dict[str, Any]) -> str:
    """JSON as TensorBoard's text tab shows it: a Markdown code block, its Chinese as written."""
    return "```\n" + json.dumps(data, indent=2, ensure_ascii=False) + "\n```"


def _let_go(name: str) -> None:
    """After W&B failed: its own exit hook would meet the lost connection again and print a traceback
    at the end of a run that has said what happened in one line."""
    if name == "wandb" and (wandb := sys.modules.get("wandb")) is not None:
        with contextlib.suppress(Exception):
            wandb.teardown()


def tracker_values(rec: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl record's numbers as the trackers get them, grouped as nanochat groups its own:
    `train/loss`, `train/tokens_per_s`, `val/loss`, `val/bpb`. One point per curve and
    step: an eval record's tokens and time repeat the train record's (Monitor sends its tokens where there
    is none), and FLOPs per token is in the MFU (a constant of a pretraining run; SFT's window mean stays
    in metrics.jsonl)."""
    if rec["type"] == "sample":  # text: metrics.jsonl and the log hold it
        return {}
    numbers = {k: v for k, v in rec.items() if isinstance(v, int | float) and k not in ("step", "flops_per_token")}
    if rec["type"] == "eval":
        return {f"val/{k.removeprefix('val_')}": v for k, v in numbers.items() if k.startswith("val_")}
    return {f"train/{k}": v for k, v in numbers.items()}


def _tracker_lines(out: Path) -> list[str]:
    f = out / TRACKER_ID
    return f.read_text().split() if f.is_file() else []


def _run_id(out: Path) -> str:
    """A stable tracker run id per run directory, so a resumed run continues the same curve."""
    lines = _tracker_lines(out)
    if not lines:  # none, or empty: made by an older tinyk killed mid-write
        lines = [os.urandom(6).hex()]
        with writing(out / TRACKER_ID):
            write_text_atomic(out / TRACKER_ID, f"{lines[0]}\n")
    return lines[0]


def _trackers_holding(out: Path) -> set[str] | None:
    """The trackers whose runs got this run's steps, listed after the id; None where the file is an
    earlier tinyk's id alone (no newline after it), which did not say: all of them, as it treated them."""
    f = out / TRACKER_ID
    text = f.read_text() if f.is_file() else ""
    lines = text.split()
    if not lines:
        return set()
    return set(lines[1:]) if len(lines) > 1 or text.endswith("\n") else None


def _record_tracker(out: Path, name: str) -> None:
    run_id = _run_id(out)  # first, also for a SwanLab before 0.6, which takes no id
    names = _tracker_lines(out)[1:]
    if name not in names:
        with writing(out / TRACKER_ID):
            write_text_atomic(out / TRACKER_ID, "".join(f"{line}\n" for line in [run_id, *names, name]))


def plot_losses(records: list[dict[str, Any]], png: Path) -> bool:
    """Train and validation loss against tokens; False (and no file) when matplotlib is missing."""
    log = logging.getLogger("matplotlib")
    level = log.level
    # Without a writable home (a container run as another user) its import warns on two lines that
    # its cache goes to a temporary folder: nothing the run needs to say.
    log.setLevel(logging.ERROR)
    try:  # a Figure of its own, not pyplot's: switching the process's backend would stop a notebook's plots
        from matplotlib.figure import Figure
    except ImportError:
        return False
    finally:
        log.setLevel(level)
    train = [(r["tokens"], r["loss"]) for r in records if "loss" in r]
    val = [(r["tokens"], r["val_loss"]) for r in records if "val_loss" in r]
    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.subplots()
    for points, label, style in ((train, "train", "-"), (val, "validation", "o-")):
        if points:
            ax.plot(*zip(*points, strict=True), style, label=label, markersize=3)
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_file(png, suffix=".png") as tmp:
        fig.savefig(tmp)
    return True


def _saved_step(path: Path) -> int:
    try:
        return int(path.read_text())
    except (OSError, ValueError):  # none saved, or damaged: the steps metrics.jsonl holds are all it knows
        return 0


def _fmt_rate(x: float) -> str:
    """Tokens per second as 950, 1.5k, 2.50M: a unit starts where the one below would round up to it."""
    return f"{x / 1e6:.2f}M" if x >= 999_950 else f"{x / 1e3:.1f}k" if x >= 999.5 else f"{x:.0f}"


class Monitor:
    """Rank 0's outputs: progress bar, metrics.jsonl, loss.png and the optional trackers."""

    def __init__(self, out: Path, total_steps: int, start_step: int, show_progress: bool):
        """Trackers are attached afterwards (`trackers`), once the run's history has been read."""
        from tqdm import tqdm

        self.out = out
        self.trackers: Trackers | None = None
        self.metrics_path = out / "metrics.jsonl"
        self.cut_tail = False  # whether metrics.jsonl ends in a line cut short, which truncate() removes
        self.records = self._read_records()
        # The bar is for a terminal (stderr); where output goes to a pipe or a log file, where a bar is
        # carriage-return noise, each log interval is one line on stdout instead (or as well).
        self.lines = show_progress and not (is_terminal(sys.stdout) and shows_a_bar(sys.stderr))
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                        disable=not (show_progress and shows_a_bar(sys.stderr)), mininterval=1.0, smoothing=0.1)
        self.plotted = True
        self.can_plot = importlib.util.find_spec("matplotlib") is not None  # the run's header says when not
        self.output_lost = False
        self.status = ""  # the bar's text of the last log interval

    def _read_records(self) -> list[dict[str, Any]]:
        """The earlier sessions' lines. A last line cut short (a kill or a full disk mid-write) is dropped;
        damage anywhere else is an error, since the run's history would silently lose lines."""
        if not self.metrics_path.exists():
            return []
        text = self.metrics_path.read_text(encoding="utf-8", errors="replace")
        self.cut_tail = bool(text) and not text.endswith("\n")  # the next line would join this one
        # Numbered as an editor numbers them, blank lines counted: the line to repair is named by it.
        lines = [(n, line) for n, line in enumerate(text.split("\n"), 1) if line.strip()]
        records = []
        for i, (n, line) in enumerate(lines):
            try:
                rec = json.loads(line)
                if not (isinstance(rec, dict) and isinstance(rec.get("step"), int)):
                    raise ValueError("not a metrics record")
            except ValueError as e:
                if i == len(lines) - 1:
                    self.cut_tail = True
                    break
                raise TinykError(f"{self.metrics_path} line {n} is damaged ({e}); repair or delete that line "
                                 f"to resume") from None
            records.append(rec)
        return records

    def truncate(self, step: int) -> int:
        """Drops records past `step` (written by a run that died after its last checkpoint); returns the
        last step the earlier sessions logged, which their trackers may have had. That step outlives the
        records it drops (`.tracker_step`): killed twice between two checkpoints, a run had forgotten the
        first session's later steps and sent W&B and SwanLab those steps again."""
        sent_file = self.out / TRACKER_STEP
        if step == 0:  # a new run, for the trackers too, whether or not this session starts one
            sent_file.unlink(missing_ok=True)
            (self.out / TRACKER_ID).unlink(missing_ok=True)
        logged = max([r["step"] for r in self.records] + [_saved_step(sent_file)])
        kept = [r for r in self.records if r["step"] <= step]
        if len(kept) == len(self.records) and not self.cut_tail:  # a finished run resumes on a read-only disk
            return logged
        if step and logged > step and (self.out / TRACKER_ID).exists():  # a W&B or SwanLab run may hold them
            with writing(sent_file):
                write_text_atomic(sent_file, f"{logged}\n")
        self.records, self.cut_tail = kept, False
        with writing(self.metrics_path), atomic_file(self.metrics_path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        return logged

    def _append(self, rec: dict[str, Any]) -> None:
        self.records.append(rec)
        self.plotted = False
        with writing(self.metrics_path), open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
        values = tracker_values(rec)
        # The records of a step: train, then sample and eval, so a step's train record is among the last three.
        if rec["type"] == "eval" and "tokens" in rec and not any(
                r.get("type") == "train" and r.get("step") == rec["step"] for r in self.records[-3:]):
            values["train/tokens"] = rec["tokens"]  # no train line at this step: the x-axis W&B may plot it by
        if self.trackers and values:
            self.trackers.log(values, rec["step"])

    def set_total(self, total_steps: int) -> None:
        if self.bar.total != total_steps:
            self.bar.total = total_steps
            self.bar.refresh()

    def advance(self, steps: int) -> None:
        self.bar.update(steps)

    def log_train(self, rec: dict[str, Any], left_s: float | None = None) -> None:
        """A log interval's record; `left_s`, the time the run has left (None before the trainer has timed
        a step), for the plain line's ETA."""
        self._append({"type": "train", **rec})
        mfu = f" mfu {rec['mfu']:.1%}" if rec.get("mfu") is not None else ""
        skipped = rec.get("skipped_steps")
        # fp16's GradScaler skips a step whose gradients overflowed and lowers the loss scale.
        skips = f" skipped {skipped} (fp16 overflow)" if skipped else ""
        status = f"loss {rec['loss']:.4f} lr {rec['lr']:.2e} {_fmt_rate(rec['tokens_per_s'])} tok/s{mfu}{skips}"
        if self.lines:
            times = f"elapsed {self.bar.format_interval(rec['elapsed_s'])}"
            if left_s is not None and rec["step"] < self.bar.total:
                times += f", ETA {self.bar.format_interval(left_s)}"
            self.print(f"step {rec['step']}/{self.bar.total}: {status}, {times}")
        self.status = status
        self.bar.set_postfix_str(status, refresh=False)

    def pausing(self, what: str) -> None:
        """Says on the bar what the run does between steps (an evaluation can take minutes, the last one
        with the bar at 100%)."""
        self.bar.set_postfix_str(f"{self.status} | {what}" if self.status else what, refresh=True)

    def log_eval(self, rec: dict[str, Any]) -> None:
        self._append({"type": "eval", **rec})
        bpb = f", {rec['val_bpb']:.4f} bits/byte" if rec.get("val_bpb") is not None else ""
        self.print(f"step {rec['step']}: val loss {rec['val_loss']:.4f}{bpb}")
        self.plot()

    def log_samples(self, step: int, samples: list[tuple[str, str]]) -> None:
        """What the model says to each sample prompt at this step, a line each (a newline in it shown as ⏎)."""
        self._append({"type": "sample", "step": step, "samples": [{"prompt": q, "text": a} for q, a in samples]})
        for q, a in samples:
            self.print(f"step {step} sample: {q} → {a}".replace("\n", "⏎"))

    def plot(self) -> None:
        if not self.plotted and self.can_plot:
            try:
                plot_losses(self.records, self.out / "loss.png")
            except OSError as e:  # a full disk: the picture of metrics.jsonl is not worth the run, nor its error
                self.print(f"warning: loss.png not written ({first_line(e)})")
            self.plotted = True

    def summarize(self, summary: dict[str, Any]) -> None:
        """The run's results, to the trackers that keep them (`Trackers.summarize`)."""
        if self.trackers:
            self.trackers.summarize(summary, summary["steps"])

    def print(self, msg: str) -> None:
        try:
            self.bar.write(msg)
        except OSError:  # the reader left (`| head`) or the terminal hung up: the run stops, saved
            self.output_lost = True
            null = os.open(os.devnull, os.O_WRONLY)
            try:
                with contextlib.suppress(OSError, ValueError):  # what is left to print goes nowhere
                    out, err = sys.stdout.fileno(), sys.stderr.fileno()
                    # `2>&1 | tee log`: stderr is the same closed pipe, where the trackers' own last words go.
                    # (Windows gives every pipe and console the same file id: there stderr is left alone.)
                    same = os.name != "nt" and os.path.sameopenfile(out, err)
                    dead = [out, err] if same else [out]
                    for fd in dead:
                        os.dup2(null, fd)
            finally:
                os.close(null)

    def close(self, exit_code: int = 0, error: str | None = None) -> None:
        try:
            self.plot()
        finally:
            self.bar.close()
            if self.trackers:
                self.trackers.close(exit_code, error)


def finite(x: float) -> float | None:
    """JSON has no NaN/inf: report them as null."""
    return x if math.isfinite(x) else None
