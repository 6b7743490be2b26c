"""Trainer: schedule, config layering, exact resume after SIGKILL, DDP/FSDP == one process, set-up errors."""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import json
import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file

import tinyk.train as train_module
from tinyk.checkpoint import load_model
from tinyk.cli import main
from tinyk.config import TrainConfig, dump_config, model_config, parse_sets, resolve_config
from tinyk.data import prepare_pretrain
from tinyk.errors import TinykError
from tinyk.evaluate import eval_data
from tinyk.inputs import sha256_file
from tinyk.loader import PretrainLoader, SFTLoader
from tinyk.model import Transformer, cpu_emulates, preset_config
from tinyk.monitor import plot_losses
from tinyk.rundir import RunDir, checkpoints, clean_partial
from tinyk.tokenizer import load_tokenizer
from tinyk.train import (
    Dist,
    LossSum,
    Trainer,
    _check_sums,
    best_kept_so_far,
    default_warmup,
    first_budget,
    lr_at,
    micro_layout,
    optimizer_step,
    param_groups,
    setup_dist,
    step_budgets,
    train,
)
from tinyk.units import flops_text, minutes_text

# One thread everywhere: the machine is shared, and bit-identical comparisons need identical kernels.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
BIN = Path(sys.executable).parent


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def nano_cfg(data: Path, tok: Path | None, out: Path, kind: str = "pretrain", **kw) -> TrainConfig:
    base = dict(kind=kind, data=str(data), tokenizer=str(tok) if tok else None, out=str(out),
                model={"preset": "nano"}, seq_len=32, batch_size=8, lr=3e-3, warmup_steps=2, max_steps=6,
                eval_every=0, eval_batches=2, save_every=0, log_every=1, progress=False)
    return TrainConfig(**{**base, **kw})


def after_each_logged_step(monkeypatch, then) -> None:
    """Calls `then(record)` once each training step's record is logged: a moment inside the run."""
    from tinyk.monitor import Monitor

    log_train = Monitor.log_train

    def log_and_then(self, rec, *args):
        log_train(self, rec, *args)
        then(rec)

    monkeypatch.setattr(Monitor, "log_train", log_and_then)


def signal_at_step(monkeypatch, step: int, *sigs: int) -> None:
    """Sends `sigs` to this process once step `step` is logged, as a user or a scheduler would mid-run."""
    def signal_there(rec):
        if rec["step"] == step:
            for sig in sigs:
                os.kill(os.getpid(), sig)

    after_each_logged_step(monkeypatch, signal_there)


def train_losses(out: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if r["type"] == "train"}


def two_process_job(args: list[str], tmp_path: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """`torchrun` with two processes of tinyk; one that hangs (ranks that disagree on a collective) is
    killed with its workers, which a timeout alone left running (torchrun starts each in a session of
    its own). TMPDIR: torchrun's own files."""
    with subprocess.Popen([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "tinyk", *args],
                          env={**ENV, "TMPDIR": str(tmp_path)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as job:
        try:
            out, err = job.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for process in [*psutil.Process(job.pid).children(recursive=True), psutil.Process(job.pid)]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.kill()
            raise
    return subprocess.CompletedProcess(job.args, job.returncode, out, err)


def cli_args(data: Path, tok: Path, out: Path, *extra: str) -> list[str]:
    return ["pretrain", "--preset", "nano", "--data", str(data), "--tokenizer", str(tok), "--out", str(out),
            "--seq-len", "32", "--batch-size", "8", "--no-progress", *extra]


# ----------------------------------------------------------------------------- pure pieces

def test_lr_schedule_warmup_then_cosine_to_ten_percent():
    lrs = [lr_at(s, 100, 1.0, 10) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10], strict=False))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lrs[10] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)
    assert lr_at(55, 101, 1.0, 10) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(0, 1, 2.0, 0) == pytest.approx(0.2)


def test_wsd_schedule_holds_the_peak_then_decays_linearly_over_its_last_steps():
    lrs = [lr_at(s, 100, 1.0, 10, 0.1, "wsd", 0.2) for s in range(100)]
    assert lrs[:10] == [lr_at(s, 100, 1.0, 10) for s in range(10)]  # the same warmup as the cosine's
    assert lrs[9:80] == [1.0] * 71
    decay = lrs[80:]  # 20 steps, each below the one before, the last at the floor
    assert all(a > b for a, b in zip([1.0, *decay], decay, strict=False)) and decay[-1] == pytest.approx(0.1)
    assert decay == pytest.approx([0.1 + 0.9 * (19 - i) / 20 for i in range(20)])
    # Before its decay the rate does not depend on the run's length: a longer run is the same run so far.
    assert [lr_at(s, 1000, 1.0, 10, 0.1, "wsd", 0.2) for s in range(80)] == lrs[:80]
    assert lr_at(0, 1, 2.0, 0, 0.1, "wsd") == pytest.approx(0.2)  # a one-step run: its only step at the floor
    assert [lr_at(s, 5, 1.0, 1, 0.0, "wsd", 1.0) for s in range(5)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])


def test_weight_decay_only_on_matrices():
    model = Transformer(preset_config("nano"))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("grad_clip", [1e-3, None])
def test_gradient_clipping_bounds_the_update_and_reports_the_norm_before_it(grad_clip):
    """The logged grad_norm is the gradients' own (how far from the clip a run is); the step taken has
    norm grad_clip at most (SGD with lr 1 moves the weights by exactly the gradient)."""
    torch.manual_seed(0)
    model = Transformer(preset_config("nano", vocab_size=64))
    x, y = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    reference = copy.deepcopy(model)
    (LossSum(reference)(x, y) / y.numel()).backward()
    unclipped = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in reference.parameters()))
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    _, norm = optimizer_step(LossSum(model), opt, torch.amp.GradScaler("cpu", enabled=False), [(x, y)],
                             1 / y.numel(), grad_clip=grad_clip)
    moved = math.sqrt(sum(float((p.detach() - b).pow(2).sum()) for p, b in zip(model.parameters(), before,
                                                                                 strict=True)))
    assert float(norm) == pytest.approx(unclipped, rel=1e-4) and unclipped > 0.1  # far above the clip
    assert moved == pytest.approx(unclipped if grad_clip is None else grad_clip, rel=1e-3)


def test_micro_batch_and_accumulation_fill_the_global_batch():
    assert micro_layout(64, 1, None) == (64, 1)
    assert micro_layout(64, 2, 16) == (16, 2)
    assert micro_layout(48, 2, 20) == (12, 2)
    assert micro_layout(8, 4, 64) == (2, 1)
    with pytest.raises(TinykError, match="not divisible by the 3 processes"):
        micro_layout(8, 3, None)


def test_a_batch_no_process_count_divides_is_refused_before_the_process_group(tmp_path, monkeypatch):
    """Checked after joining the job, one process could refuse first and torchrun stop local rank 0
    before it said why: its "terminated" was then the one line on screen."""
    import tinyk.train

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29999")
    monkeypatch.setattr(tinyk.train, "setup_dist", lambda device: pytest.fail("the process group was joined"))
    with pytest.raises(TinykError, match="^batch_size 7 is not divisible by the 2 processes$"):
        Trainer(nano_cfg(tmp_path / "data", None, tmp_path / "run", batch_size=7))


def total_steps(cfg: TrainConfig, samples_per_epoch: int, steps_done: int = 0, samples_done: int = 0) -> int:
    return first_budget(step_budgets(cfg, samples_per_epoch, steps_done, samples_done))[0]


def test_budget_is_whichever_comes_first():
    cfg = TrainConfig(batch_size=4, seq_len=10)
    assert total_steps(cfg, 100) == 25
    assert total_steps(TrainConfig(batch_size=4, seq_len=10, max_steps=7), 100) == 7
    assert total_steps(TrainConfig(batch_size=4, seq_len=10, max_tokens=200, epochs=2), 100) == 5
    assert total_steps(TrainConfig(batch_size=4, seq_len=10, max_steps=1000, epochs=0.5), 100) == 13
    # Resumed after 3 steps of 8 samples: the rest of the budget is trained at the new batch of 4.
    assert total_steps(TrainConfig(batch_size=4, seq_len=10, max_tokens=400), 100, 3, 24) == 3 + 4
    assert total_steps(TrainConfig(batch_size=4, seq_len=10, epochs=1), 100, 3, 24) == 3 + 19
    assert total_steps(TrainConfig(batch_size=4, seq_len=10, max_tokens=200), 100, 3, 24) == 2  # spent a step ago


def test_a_pretraining_resume_with_another_batch_size_keeps_its_token_budget(tmp_path, pt_data, tok_dir, capsys,
                                                                            monkeypatch):
    out = tmp_path / "run"
    first = train(nano_cfg(pt_data, tok_dir, out, max_steps=None, max_tokens=32 * 8 * 6, save_every=2))
    assert first["steps"] == 6
    for p in (out / "checkpoints").iterdir():
        if p.name != "step_0000002":
            shutil.rmtree(p)
    shutil.rmtree(out / "final")
    halved = nano_cfg(pt_data, tok_dir, out, max_steps=None, max_tokens=32 * 8 * 6, batch_size=4, progress=True)
    with monkeypatch.context() as m:
        stop_at(m, 5)
        train(halved, resume=True)
    assert "10 steps (1,536 tokens)" in capsys.readouterr().out
    # Resumed again at the new batch size: the two steps at the old one still count double.
    resumed = train(halved, resume=True)
    assert resumed["steps"] == 2 + 8 and resumed["tokens"] == first["tokens"]
    assert "10 steps (1,536 tokens)" in capsys.readouterr().out


def test_config_layers_preset_file_flags_set(tmp_path):
    user = tmp_path / "c.yaml"
    user.write_text("lr: 0.01\nbatch_size: 32\nmodel: {dim: 96}\nsft: {lr: 0.002}\nrun_name: 2024\n"
                    "project: 2024-06-01\n")
    cfg = resolve_config("pretrain", preset="tiny", config=user, flags={"batch_size": 16, "out": "o", "data": "d"},
                         sets=["model.n_layers=3", "tracker=wandb,swanlab", "warmup_steps=5", "micro_batch=null"])
    assert cfg.model == {"preset": "tiny", "dim": 96, "n_layers": 3}
    assert (cfg.lr, cfg.batch_size, cfg.seq_len, cfg.warmup_steps) == (0.01, 16, 256, 5)
    assert cfg.tracker == ["wandb", "swanlab"] and cfg.micro_batch is None and cfg.run_name == "2024"
    assert cfg.project == "2024-06-01"
    sft = resolve_config("sft", preset="tiny", config=user, flags={"out": "o", "data": "d"})
    assert sft.lr == 0.002 and sft.kind == "sft"
    toml = tmp_path / "c.toml"
    toml.write_text('lr = 5e-4\nseq_len = 64\n[model]\npreset = "nano"\n', encoding="utf-8-sig")  # Notepad's BOM
    t = resolve_config("pretrain", config=toml, flags={"out": "o", "data": "d"})
    assert (t.lr, t.seq_len, t.model) == (5e-4, 64, {"preset": "nano"})
    # A token budget is written as --max-tokens takes it; the dtype summary.json names (PyTorch's) is taken back.
    assert resolve_config("pretrain", preset="nano", flags={"out": "o", "data": "d"}, sets=["max_tokens=10B"]) \
        .max_tokens == 10**10
    with pytest.raises(TinykError, match=r"^--set: config key max_tokens: must be a size from 1 to 1e18"):
        resolve_config("pretrain", preset="nano", flags={"out": "o", "data": "d"}, sets=["max_tokens=-1B"])
    assert resolve_config("pretrain", preset="nano", flags={"out": "o", "data": "d"}, sets=["dtype=float32"]).dtype \
        == "fp32"
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("kind: pretrain\ndata: d\nlr: 0.005\nmax_steps: 4\n"
                                     "model: {preset: nano, dim: 32}\n")
    resumed = resolve_config("pretrain", preset="tiny", flags={"out": str(run), "max_steps": 9}, resume=True)
    assert (resumed.lr, resumed.max_steps, resumed.seq_len, resumed.model["dim"]) == (0.005, 9, 256, 32)
    user.write_text("lr: 0.01\nmodel: {dim: 96\n")  # a YAML mistake is named with where it is
    with pytest.raises(TinykError, match=f"^cannot parse {user}: expected ',' or '}}', but got '<stream end>' at "
                                         f"line 3, column 1$"):
        resolve_config("pretrain", config=user, flags={"out": "o", "data": "d"})


def test_a_config_file_means_what_it_says(tmp_path):
    """A key given twice dropped its first value without a word; text keys lost their spelling to YAML 1.1
    (`run_name: 0123` was octal 83, `project: 1.10` was 1.1), which --set already kept."""
    f = tmp_path / "c.yaml"
    f.write_text("run_name: 0123\nproject: 1.10\nlr: 1.0e-3\ninit: null\nsft: {run_name: 2024-01-01}\n")
    cfg = resolve_config("pretrain", config=f, flags={"out": "o", "data": "d"})
    assert (cfg.run_name, cfg.project, cfg.lr, cfg.init) == ("0123", "1.10", 1e-3, None)
    assert resolve_config("sft", config=f, flags={"out": "o", "data": "d"}).run_name == "2024-01-01"
    fifo = tmp_path / "fifo.yaml"  # or <(cat c.yaml): it was "not found"
    os.mkfifo(fifo)
    with pytest.raises(TinykError, match=rf"^config file is a pipe or a device, not a file: {re.escape(str(fifo))}$"):
        resolve_config("pretrain", config=fifo, flags={"out": "o", "data": "d"})
    # Numbers as YAML 1.2 reads them, not YAML 1.1's octal (016 was 14) or base 60 (1:00 was 60).
    f.write_text("batch_size: 016\nseed: 007\nlr: 1.5e-4\nmax_steps: 1_000\n")
    cfg = resolve_config("pretrain", config=f, flags={"out": "o", "data": "d"})
    assert (cfg.batch_size, cfg.seed, cfg.lr, cfg.max_steps) == (16, 7, 1.5e-4, 1000)
    f.write_text("batch_size: 1:00\n")
    with pytest.raises(TinykError, match=rf"^{re.escape(str(f))}: config key batch_size: '1:00' is not a valid int$"):
        resolve_config("pretrain", config=f, flags={"out": "o", "data": "d"})
    for empty in ("", "# only a comment\n"):  # was a run of the defaults without a word
        f.write_text(empty)
        with pytest.raises(TinykError, match=rf"^{re.escape(str(f))} is empty \(it holds no config keys\)$"):
            resolve_config("pretrain", config=f, flags={"out": "o", "data": "d"})
    # A run's config.yaml says which stage it was; given to the other, that is said to be not read.
    f.write_text("kind: sft\nlr: 1.0e-4\n")
    notes: list[str] = []
    assert resolve_config("pretrain", config=f, flags={"out": "o", "data": "d"}, notes=notes).kind == "pretrain"
    assert notes == [f"note: --config {f} says kind sft, which is not read: the command decides what is trained "
                     f"(tinyk pretrain)"]
    f.write_text("lr: 1.0e-3\nbatch_size: 8\nlr: 1.0e-4\n")
    with pytest.raises(TinykError, match=rf"^cannot parse {re.escape(str(f))}: 'lr' is given twice at line 3, "
                                         rf"column 1$"):
        resolve_config("pretrain", config=f, flags={"out": "o", "data": "d"})


@pytest.mark.parametrize("sets,message", [
    (["nope=1"], "unknown config key 'nope'"),
    (["model.width=3"], "unknown config key model.width"),
    (["vocab_size=6144"], "unknown config key 'vocab_size'; the model's is model.vocab_size$"),
    (["lr=fast"], "^--set: config key lr: 'fast' is not a valid float$"),  # where the value came from
    (["warmup_step=3"], r"unknown config key 'warmup_step'; did you mean warmup_steps\?$"),
    (["model.dims=3"], r"unknown config key model.dims; did you mean model.dim\? \(model keys"),
    (["n_layer=3"], r"unknown config key 'n_layer'; did you mean model.n_layers\?$"),
    # were tracebacks: a nested key under a value, a list as a preset's name, step counts past a float's range
    (["model=tiny", "model.dim=64"], "^--set model.dim: an earlier --set made model 'tiny', not a mapping of keys$"),
    (["model.preset=[a]"], r"unknown model preset \['a'\]"),
    (["max_steps=null", "epochs=1e308"], "epochs and max_minutes must be at most 1e9$"),
    (["max_minutes=1e307"], "epochs and max_minutes must be at most 1e9$"),
    (['out=""'], "out, data, tokenizer and init must not be empty paths"),  # trained into the current folder
    (["tracker=[tensorboard, mlflow]"], r"^unknown tracker 'mlflow' \(choose from tensorboard, wandb, swanlab\)$"),
    (["kind=sft"], "^--set kind: the command says what is trained"),  # was ignored without a word
    (["batch_size=2.5"], "config key batch_size"),
    (["dtype=int8"], "dtype must be auto, bf16, fp16, fp32, got .int8.$"),
    (["device=mps"], "device mps is not supported: tinyk's training has not been checked on Apple GPUs"),
    (["device=gpu"], "device must be auto, cpu or cuda, got .gpu.$"),
    (["compile_mode=fast"], "compile_mode must be one of default, reduce-overhead"),
    (["lr_schedule=linear"], "lr_schedule must be cosine or wsd, got .linear.$"),
    (["decay_fraction=0"], r"decay_fraction must be in \(0, 1\]$"),
    (["max_minutes=0"], "max_minutes must be positive"),
    (["grad_clip=-1"], "grad_clip must be >= 0"),  # would train uphill
    (["batch_size=100000"], "batch_size must be in 1..65536$"),  # the flag's own limit
    (["micro_batch=0"], "micro_batch must be in 1..65536$"),
    (["eval_batches=-1"], "eval_batches must be at least 1"),  # would report a val loss of 0
    (["warmup_steps=.nan"], "config key warmup_steps: nan is not a valid int or null"),
    (["lr=.inf"], "must be finite"),
    (["lr=1e300"], "must fit a float32"),  # a traceback from inside AdamW
    (["sft.max_step=50"], "unknown config key 'max_step' in its sft block"),  # seen by pretrain, before SFT
    (["sft.lr=abc"], "^--set: config key sft.lr: 'abc' is not a valid float$"),  # named as it was set
    (["sft.max_tokens=lots"], "^--set: config key sft.max_tokens: "),
    (["seed=-1"], "seed must be between 0 and 2"),
    (["beta1=2"], "beta1 and beta2 must be in"),
    (["model.preset=huge"], "unknown model preset 'huge'"),
    (["a.b.c=1"], "only model.<key>, pretrain.<key> and sft.<key> are nested"),
    (["novalue"], "--set expects key=value"),
    # a float overflowed on integers of 309 digits (a traceback), and other keys on a step count that big
    ([f"lr=1{'0' * 400}"], "^--set: config key lr: a number of 401 digits is too large \\(the limit is 1e18\\)$"),
    ([f"warmup_steps={10**19}"], f"^--set: config key warmup_steps: {10**19} is too large"),
    ([f"max_tokens={10**19}"], "^--set: config key max_tokens: must be a size from 1 to 1e18"),  # as 1e19 is
    (["max_tokens=1e999999999"], "^--set: config key max_tokens: must be a size from 1 to 1e18"),  # not Overflow
    # a whole number written as a float passed the limit, and the run saved it where no resume could read it
    (["max_steps=1e30"], r"^--set: config key max_steps: 1e\+30 is too large \(the limit is 1e18\)$"),
    (["model.n_layers=1e300"], r"^--set: config key model.n_layers: 1e\+300 is too large"),
    # YAML 1.1's base 60: 1:00 was 60
    (["batch_size=1:00"], "^--set: config key batch_size: '1:00' is not a valid int$"),
])
def test_bad_config_values_are_one_line_errors(sets, message):
    with pytest.raises(TinykError, match=message):
        resolve_config("pretrain", preset="nano", flags={"out": "o", "data": "d"}, sets=sets)


def test_set_values_parse_as_yaml():
    assert parse_sets(["model.dim=64", "lr=0.001", "compile=true", "run_name=a=b"]) == {
        "model": {"dim": 64}, "lr": 1e-3, "compile": True, "run_name": "a=b"}
    cfg = resolve_config("pretrain", preset="nano", flags={"out": "o", "data": "d"}, sets=["lr=3e-4", "max_steps=1e3"])
    assert (cfg.lr, cfg.max_steps) == (3e-4, 1000)
    # sizes are exact: as floats, 2.01M was 2,009,999 tokens
    cfg = resolve_config("pretrain", preset="nano", flags={"out": "o", "data": "d"}, sets=["max_tokens=2.01M"])
    assert cfg.max_tokens == 2_010_000
    # From Python: one --set given alone, and a Path where the CLI gives a string.
    cfg = resolve_config("pretrain", preset="nano", flags={"out": Path("o"), "data": Path("d")}, sets="lr=3e-4")
    assert (cfg.lr, cfg.out, cfg.data) == (3e-4, "o", "d")
    # Names that look like numbers stay names, as typed on the command line or read from YAML.
    cfg = resolve_config("pretrain", preset="nano", flags={"out": "o", "data": "d"},
                         sets=["run_name=1.10", "project=2024", "sft.run_name=7"])
    assert (cfg.run_name, cfg.project) == ("1.10", "2024")
    cfg = resolve_config("pretrain", preset="nano", flags={"out": "o", "data": "d"},
                         sets=["run_name=2024-06-01", "project=yes"])
    assert (cfg.run_name, cfg.project) == ("2024-06-01", "yes")
    assert resolve_config("sft", preset="nano", flags={"out": "o", "data": "d"},
                          sets=["sft.run_name=7"]).run_name == "7"
    # A list key takes a YAML list, as in a config file (`tracker: [tensorboard]`), or comma-separated names.
    for value, trackers in (("[tensorboard]", ["tensorboard"]), ("[tensorboard, wandb]", ["tensorboard", "wandb"]),
                            ("[]", []), ("tensorboard,wandb", ["tensorboard", "wandb"])):
        cfg = resolve_config("pretrain", preset="nano", flags={"out": "o", "data": "d"}, sets=[f"tracker={value}"])
        assert cfg.tracker == trackers, value
        cfg = resolve_config("sft", preset="nano", flags={"out": "o", "data": "d"}, sets=[f"sft.tracker={value}"])
        assert cfg.tracker == trackers, value  # in a stage's section too


def test_text_is_kept_as_written_and_a_toml_config_can_say_null(tmp_path):
    """`--set run_name=#exp1` gave None (a YAML comment) and `sample_prompts=北京 #注释` lost its second half;
    TOML, which has no null, could not lift a preset's max_steps; a NEL (U+0085) in a saved text came back
    from config.yaml as a line break on --resume."""
    from tinyk.config import dump_config

    flags = {"out": "o", "data": "d"}
    cfg = resolve_config("pretrain", preset="nano", flags=flags, sets=["run_name=#exp1", "project=a #b",
                                                                       "sample_prompts=北京 #注释"])
    assert (cfg.run_name, cfg.project, cfg.sample_prompts) == ("#exp1", "a #b", ["北京 #注释"])
    assert resolve_config("pretrain", flags=flags, sets=["sample_prompts=[北京, 上海]"]).sample_prompts == [
        "北京", "上海"]
    assert resolve_config("pretrain", flags=flags, sets=["run_name=null"]).run_name is None
    (tmp_path / "c.toml").write_text('max_steps = "null"\neval_batches = "null"\nrun_name = "null"\n'
                                     '[model]\npreset = "null"\ndim = 64\nn_layers = 1\nn_heads = 4\n')
    cfg = resolve_config("pretrain", preset="nano", config=tmp_path / "c.toml", flags=flags)
    assert (cfg.max_steps, cfg.eval_batches, cfg.run_name) == (None, None, "null")  # a name may be "null"
    assert cfg.model["preset"] is None and cfg.model["dim"] == 64  # the preset's shape lifted
    cfg = TrainConfig(out="o", data="d", sample_prompts=["下一行\x85不是"], run_name="a\x85b")
    saved = tmp_path / "r" / "config.yaml"
    saved.parent.mkdir()
    saved.write_text(dump_config(cfg))
    again = resolve_config("pretrain", flags={"out": str(tmp_path / "r"), "data": "d"}, resume=True)
    assert (again.sample_prompts, again.run_name) == (cfg.sample_prompts, cfg.run_name)


# ----------------------------------------------------------------------------- training runs

@pytest.mark.parametrize("dtype,emulated", [("fp32", False), ("bf16", True)])
def test_mfu_never_passes_100_percent_when_the_cpu_was_timed_under_load(tmp_path, pt_data, tok_dir, monkeypatch,
                                                                         capsys, dtype, emulated):
    """The CPU's peak is a timed matmul; timed while other work held the cores it is too low, and MFU
    came out at 145%. A step that outruns it has the peak timed again, once (an fp16 matmul on a CPU
    times slower than training runs, and timing it at every log window took seconds each), and never beaten.
    Emulated bf16 outruns it on a quiet machine too: a small model's products are faster than the timed one."""
    timed = []
    monkeypatch.setattr("tinyk.monitor.measure_matmul_flops", lambda **kw: 1e3)  # the busy first timing
    monkeypatch.setattr("tinyk.train.measure_matmul_flops", lambda **kw: timed.append(1) or 2e3)  # busy again
    monkeypatch.setattr("tinyk.train.cpu_emulates", lambda d: emulated)
    summary = train(nano_cfg(pt_data, tok_dir, tmp_path / "run", max_steps=6, log_every=2, dtype=dtype))
    why, why_first = (("bf16 emulated on this CPU runs small matmuls faster than the timed one",) * 2 if emulated
                      else ("that timing was slowed by other work", "the first timing was slowed by other work"))
    assert len(timed) == 1
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    mfu = [r["mfu"] for r in recs if r["type"] == "train"]
    assert mfu[0] == 1.0 and all(0 < m <= 1 for m in mfu) and 0 < summary["mfu_steady"] <= 1
    assert summary["peak_flops_source"].endswith(f"(timed again: {why_first})")
    # The header gave the first timing's figure: the log says which one MFU is now against.
    out = capsys.readouterr().out
    assert "peak for MFU: 1e-06 GFLOP/s per device" in out
    assert re.search(rf"^note: peak for MFU timed again: [\d.]+ GFLOP/s per device, not 1e-06 GFLOP/s \({why}\)$",
                     out, re.M), out


def test_pretrain_run_outputs_and_loss_decreases(tmp_path, pt_data, tok_dir):
    out = tmp_path / "run"
    summary = train(nano_cfg(pt_data, tok_dir, out, max_steps=24, eval_every=12, save_every=8, keep_checkpoints=2,
                             log_every=4))
    assert summary["status"] == "completed" and summary["steps"] == 24 and summary["tokens"] == 24 * 8 * 32
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tr = [r for r in recs if r["type"] == "train"]
    ev = [r for r in recs if r["type"] == "eval"]
    assert [r["step"] for r in tr] == [4, 8, 12, 16, 20, 24] and [r["step"] for r in ev] == [12, 24]
    for key in ("step", "tokens", "loss", "lr", "tokens_per_s", "mfu", "flops_per_token", "peak_mem_mib",
                "elapsed_s", "grad_norm"):
        assert key in tr[0]
    assert tr[0]["peak_mem_mib"] is None and tr[0]["mfu"] > 0 and tr[-1]["tokens"] == 24 * 256
    assert tr[-1]["loss"] < tr[0]["loss"] - 0.5 and ev[-1]["val_loss"] < ev[0]["val_loss"]
    assert ev[-1]["val_bpb"] == pytest.approx(summary["final_val_bpb"]) and ev[-1]["val_bpb"] > 0
    assert [p.name for p in checkpoints(out)] == ["step_0000016", "step_0000024"]
    ck = checkpoints(out)[-1]
    assert {p.name for p in ck.iterdir()} == {"model", "optimizer.pt", "rng.pt", "config.yaml", "state.json"}
    model, tok = load_model(out / "final")
    assert model.config.vocab_size == tok.vocab_size and model.config.dim == 64
    assert torch.equal(load_file(ck / "model" / "model.safetensors")["model.norm.weight"], model.model.norm.weight)
    saved = (out / "config.yaml").read_text()
    assert "dim: 64" in saved and "n_layers: 2" in saved
    assert (out / "loss.png").stat().st_size > 1000
    assert json.loads((out / "summary.json").read_text())["final_model"] == str(out / "final")


def test_sft_loss_counts_only_assistant_tokens(tmp_path, sft_data, nano_model_dir):
    cfg = nano_cfg(sft_data, None, tmp_path / "sft", kind="sft", init=str(nano_model_dir), model={},
                   seq_len=64, micro_batch=2, max_steps=2)
    summary = train(cfg)
    loader = SFTLoader(sft_data, "train", 64, 2, seed=0, batch_size=8)
    model, _ = load_model(nano_model_dir)
    total, count, positions, both_steps = 0.0, 0, 0, 0
    with torch.no_grad():
        for i in range(8):  # two steps of 4 micro-batches; the first is scored with the model it started from
            x, y = loader.next_batch()
            both_steps += int((y != -100).sum())
            if i < 4:
                logits = model(x)
                total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100,
                                                           reduction="sum").item()
                count += int((y != -100).sum())
                positions += x.numel()
    assert train_losses(tmp_path / "sft")[1] == pytest.approx(total / count, rel=1e-5)
    assert 0 < count < positions and summary["loss_tokens"] == both_steps


def test_the_context_notes_count_what_the_init_run_trained_on_and_what_rope_scaling_does(tmp_path, pt_data,
                                                                                          tok_dir, capsys):
    """A model with a context of 128 pretrained at seq_len 32 learnt the angles of 32 positions, which the
    run's config.yaml beside its final/ says; a factor alone keeps the context; from scratch it extends
    nothing."""
    train(nano_cfg(pt_data, tok_dir, tmp_path / "base", max_steps=1))  # seq_len 32 of the preset's 128
    capsys.readouterr()
    train(nano_cfg(pt_data, None, tmp_path / "long", init=str(tmp_path / "base"), max_steps=1,
                   model={"max_seq_len": 256, "rope_scaling": 2}))
    assert ("note: the model's context is 256, --init's was 128, trained at seq_len 32: positions past 64 are new "
            "to it, not trained in this run either (seq_len 32); model.rope_scaling=8 would put them among the RoPE "
            "angles it learnt (linear RoPE scaling)\n") in capsys.readouterr().out
    train(nano_cfg(pt_data, None, tmp_path / "same", init=str(tmp_path / "base"), max_steps=1,
                   model={"rope_scaling": 4}))
    assert ("note: the model's context is 128, --init's was 128, trained at seq_len 32: model.rope_scaling 4 "
            "(--init's 1) puts every position among the RoPE angles it learnt, closer together; the context stays "
            "128 (model.max_seq_len raises it)\n") in capsys.readouterr().out
    train(nano_cfg(pt_data, tok_dir, tmp_path / "scratch", max_steps=1, model={"preset": "nano", "rope_scaling": 2}))
    assert ("note: model.rope_scaling 2 on a model trained from scratch only slows its RoPE angles (as a larger "
            "rope_theta does); it extends a context in a fine-tune from --init\n") in capsys.readouterr().out


def test_a_fine_tune_that_extends_the_context_says_so(tmp_path, sft_data, nano_model_dir, capsys):
    """model.max_seq_len beside --init is taken (a fine-tune may extend the context), and said: the
    README's "shapes come from the loaded model" holds for weights, and positions past 128 are new."""
    capsys.readouterr()
    train(nano_cfg(sft_data, None, tmp_path / "long", kind="sft", init=str(nano_model_dir),
                   model={"max_seq_len": 256}, seq_len=64, max_steps=1))
    assert ("note: the model's context is 256, --init's was 128: positions past 128 are new to it, not trained in "
            "this run either (seq_len 64); model.rope_scaling=2 would put them among the RoPE angles it learnt "
            "(linear RoPE scaling)\n") in capsys.readouterr().out
    assert load_model(tmp_path / "long" / "final")[0].config.max_seq_len == 256
    train(nano_cfg(sft_data, None, tmp_path / "scaled", kind="sft", init=str(nano_model_dir),
                   model={"max_seq_len": 256, "rope_scaling": 2}, seq_len=64, max_steps=1))
    assert ("note: the model's context is 256, --init's was 128: model.rope_scaling 2 (--init's 1) puts every "
            "position among the RoPE angles it learnt, closer together\n") in capsys.readouterr().out
    # Scaled, but not enough: the new angles begin at 256, not at --init's context.
    train(nano_cfg(sft_data, None, tmp_path / "half", kind="sft", init=str(nano_model_dir),
                   model={"max_seq_len": 512, "rope_scaling": 2}, seq_len=64, max_steps=1))
    assert ("note: the model's context is 512, --init's was 128: positions past 256 are new to it, not trained in "
            "this run either (seq_len 64); model.rope_scaling=4 would put them") in capsys.readouterr().out
    train(nano_cfg(sft_data, None, tmp_path / "same", kind="sft", init=str(nano_model_dir), model={}, seq_len=64,
                   max_steps=1))
    assert "--init's was" not in capsys.readouterr().out


def test_sft_mfu_counts_attention_over_each_batchs_padded_length(tmp_path, sft_data, nano_model_dir, monkeypatch):
    """SFT batches are padded to their longest conversation, not seq_len: their FLOPs (and MFU) count
    attention over the positions each batch has, across a resume too."""
    cfg = nano_cfg(sft_data, None, tmp_path / "sft", kind="sft", init=str(nano_model_dir), model={},
                   seq_len=128, micro_batch=2, max_steps=4, peak_tflops=0.01)
    with monkeypatch.context() as m:
        stop_at(m, 2)
        train(cfg)
    summary = train(cfg, resume=True)
    model, _ = load_model(nano_model_dir)
    c, n = model.config, model.matmul_params()
    loader = SFTLoader(sft_data, "train", 128, 2, seed=0, batch_size=8)
    flops, tokens = [], []
    for _ in range(4):
        shapes = [loader.next_batch()[0].shape for _ in range(4)]
        flops.append(sum(b * t * (6 * n + 12 * c.n_layers * c.dim * t) for b, t in shapes))
        tokens.append(sum(b * t for b, t in shapes))
    recs = [r for r in map(json.loads, (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines())
            if r["type"] == "train"]
    assert [r["flops_per_token"] for r in recs] == [round(f / t) for f, t in zip(flops, tokens, strict=True)]
    assert min(tokens) < 8 * 128  # padded short of seq_len, so the counts differ from the seq_len formula's
    for r in recs:
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * r["flops_per_token"] / 1e10, rel=1e-3, abs=1e-5)
    assert summary["flops_per_token"] == round(sum(flops) / sum(tokens)) < model.flops_per_token(128)
    assert summary["mfu"] == pytest.approx(sum(flops) / (summary["elapsed_s"] * 1e10), rel=1e-2)


def test_a_log_windows_loss_is_per_token_over_its_steps(tmp_path, sft_data, nano_model_dir):
    """SFT steps score different numbers of answer tokens: a window of several steps logs their loss
    per token, as validation does, not the plain mean of the steps' (up to 10% off on real data)."""
    def run(name: str, log_every: int) -> list[dict]:
        train(nano_cfg(sft_data, None, tmp_path / name, kind="sft", init=str(nano_model_dir), model={},
                       seq_len=64, micro_batch=2, max_steps=6, log_every=log_every))
        return [r for r in map(json.loads, (tmp_path / name / "metrics.jsonl").read_text().splitlines())
                if r["type"] == "train"]

    steps, windows = run("each", 1), run("three", 3)
    n = [b["loss_tokens"] - a["loss_tokens"] for a, b in zip([{"loss_tokens": 0}, *steps[:-1]], steps, strict=True)]
    assert len(set(n)) > 1, n  # else the two means agree whatever is logged
    for w, first in zip(windows, (0, 3), strict=True):
        part = range(first, first + 3)
        assert w["loss"] == pytest.approx(sum(steps[i]["loss"] * n[i] for i in part) / sum(n[i] for i in part),
                                          rel=1e-5)
        assert w["loss"] != pytest.approx(sum(steps[i]["loss"] for i in part) / 3, rel=1e-5)
        assert w["loss_tokens"] == steps[first + 2]["loss_tokens"]


def test_a_checkpoint_of_an_earlier_tinyk_resumes_with_its_log_window_started_anew(tmp_path, sft_data,
                                                                                    nano_model_dir):
    """Checkpoints before the per-token window held the steps' summed means: a resume must not mix
    them with token sums (nor fail on the missing keys); that window logs its steps after the resume."""
    cfg = nano_cfg(sft_data, None, tmp_path / "sft", kind="sft", init=str(nano_model_dir), model={}, seq_len=64,
                   micro_batch=2, max_steps=4, save_every=2, log_every=4)
    train(cfg)
    train(replace(cfg, out=str(tmp_path / "each"), log_every=1, save_every=0))
    steps = [r for r in map(json.loads, (tmp_path / "each" / "metrics.jsonl").read_text().splitlines())
             if r["type"] == "train"]
    n = {r["step"]: r["loss_tokens"] - p["loss_tokens"] for p, r in zip(steps, steps[1:], strict=False)}
    steps_3_and_4 = (steps[2]["loss"] * n[3] + steps[3]["loss"] * n[4]) / (n[3] + n[4])
    state = tmp_path / "sft" / "checkpoints" / "step_0000002" / "state.json"
    old = json.loads(state.read_text())
    old["log_window"] = {"loss": 123.0, "steps": 2, "skipped": 0}
    del old["flops"]
    state.write_text(json.dumps(old))
    shutil.rmtree(tmp_path / "sft" / "final")
    for p in checkpoints(tmp_path / "sft")[1:]:
        shutil.rmtree(p)
    (tmp_path / "sft" / "metrics.jsonl").write_text("")
    assert train(replace(cfg, max_steps=4), resume=True)["steps"] == 4
    assert train_losses(tmp_path / "sft")[4] == pytest.approx(steps_3_and_4, rel=1e-5)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's /proc/self/maps")
def test_a_resumed_run_holds_no_file_of_the_checkpoint_it_resumed_from(tmp_path, pt_data, tok_dir, monkeypatch):
    """The weights were the checkpoint file's mapped pages: once rotation deleted that checkpoint, its
    disk space stayed in use until the run ended (and Windows refuses to delete a mapped file)."""
    import tinyk.train

    cfg = nano_cfg(pt_data, tok_dir, tmp_path / "run", max_steps=2, save_every=1, keep_checkpoints=1)
    train(cfg)
    seen = []
    real = tinyk.train.Trainer._log_window

    def log_window(self, grad_norm):
        with open("/proc/self/maps") as maps:
            seen.append([line.split()[-1] for line in maps if str(tmp_path / "run") in line])
        return real(self, grad_norm)

    monkeypatch.setattr(tinyk.train.Trainer, "_log_window", log_window)
    shutil.rmtree(tmp_path / "run" / "final")
    assert train(replace(cfg, max_steps=4), resume=True)["steps"] == 4
    assert seen == [[], []]


def test_train_leaves_the_callers_random_streams_as_they_were(tmp_path, pt_data, tok_dir):
    """A notebook that trains and then samples must not get draws seeded by the run's --seed."""
    import random

    def draws() -> tuple:
        return random.random(), float(np.random.rand()), float(torch.rand(()))

    def seed() -> None:
        random.seed(7)
        np.random.seed(7)
        torch.manual_seed(7)

    seed()
    expected = draws()
    cfg = nano_cfg(pt_data, tok_dir, tmp_path / "run", max_steps=2, save_every=1,
                   model={"preset": "nano", "dropout": 0.1})
    seed()
    train(cfg)
    assert draws() == expected
    shutil.rmtree(tmp_path / "run" / "final")
    seed()
    assert train(replace(cfg, max_steps=3), resume=True)["steps"] == 3  # a resume restores the run's streams
    assert draws() == expected


def test_two_identical_runs_write_identical_checkpoints(tmp_path, pt_data, tok_dir):
    """Hashing two runs' checkpoint folders is how a user checks that they match: rng.pt held Python's
    and NumPy's generators as the process had them (never seeded), so the files and state.json's
    checksums differed between runs whose weights were equal."""
    import hashlib
    import random

    def files(run: Path) -> dict[str, object]:  # state.json also holds the run's times
        return {str(p.relative_to(run)): json.loads(p.read_text())["files"] if p.name == "state.json"
                else hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted((run / "checkpoints").rglob("*")) if p.is_file()}

    runs = []
    for caller_seed in (1, 2):
        random.seed(caller_seed)
        np.random.seed(caller_seed)
        run = tmp_path / "same"  # config.yaml records the run's path
        train(nano_cfg(pt_data, tok_dir, run, max_steps=2, save_every=1))
        runs.append(files(run))
        shutil.rmtree(run)
    assert runs[0] == runs[1]
    assert any(name.endswith("rng.pt") for name in runs[0])


def test_a_second_train_in_the_same_process_is_refused_while_one_runs(tmp_path, pt_data, tok_dir, monkeypatch):
    """Two runs in threads of one process drew their initial weights from each other's seeded stream
    (and put each other's random state back): the second is refused, the first trains as alone."""
    import tinyk.train

    refusals = []
    real = tinyk.train.Trainer._log_window

    def log_window(self, grad_norm):
        if not refusals:
            with pytest.raises(TinykError, match="another train\\(\\) is running in this process") as e:
                train(nano_cfg(pt_data, tok_dir, tmp_path / "second", max_steps=2))
            refusals.append(e.value)
        return real(self, grad_norm)

    monkeypatch.setattr(tinyk.train.Trainer, "_log_window", log_window)
    thread = threading.Thread(target=train, args=(nano_cfg(pt_data, tok_dir, tmp_path / "first", max_steps=2),))
    thread.start()
    thread.join()
    assert len(refusals) == 1 and not (tmp_path / "second").exists()
    assert train(nano_cfg(pt_data, tok_dir, tmp_path / "third", max_steps=1))["status"] == "completed"


def test_sft_init_accepts_a_run_directory(tmp_path, pt_data, sft_data, tok_dir):
    run = tmp_path / "pre"
    train(nano_cfg(pt_data, tok_dir, run, max_steps=1))
    summary = train(nano_cfg(sft_data, None, tmp_path / "sft", kind="sft", init=str(run), model={}, max_steps=1,
                             seq_len=64))
    assert summary["status"] == "completed"
    assert (tmp_path / "sft" / "final" / "tokenizer.json").read_bytes() == (tok_dir / "tokenizer.json").read_bytes()


def test_a_run_resumes_from_anywhere_without_the_model_it_started_from(tmp_path, pt_data, sft_data, tok_dir,
                                                                        monkeypatch):
    """config.yaml saves input paths absolute, so a job script may resume from another directory; and a
    resumed run takes its model and tokenizer from its checkpoint, so the --init run (or tokenizer) it
    started from may have moved or been retrained since."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tok_dir, "tok")
    train(nano_cfg(pt_data, Path("tok"), Path("pre"), max_steps=2))
    train(nano_cfg(sft_data, None, Path("sft"), kind="sft", init="pre", model={}, max_steps=2, save_every=1,
                   keep_checkpoints=1, seq_len=64))
    saved = yaml.safe_load((tmp_path / "sft" / "config.yaml").read_text())
    assert saved["init"] == str(tmp_path / "pre") and saved["data"] == str(sft_data)
    (tmp_path / "pre").rename(tmp_path / "pre.old")
    shutil.rmtree(tmp_path / "tok")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    resumed = resolve_config("sft", flags={"out": str(tmp_path / "sft"), "max_steps": 4}, resume=True)
    assert train(resumed, resume=True)["steps"] == 4  # checkpoints rotated (keep 1) while it copied the tokenizer
    assert (tmp_path / "sft" / "final" / "tokenizer.json").read_bytes() == (tok_dir / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("echo_s,saved", [(0.5, True), (0.0, False)])
def test_a_sigint_delivered_twice_still_saves_but_a_second_ctrl_c_aborts(tmp_path, pt_data, tok_dir, monkeypatch,
                                                                         capsys, echo_s, saved):
    """`pkill -INT` reaches torchrun's workers directly and again through torchrun: one stop, saved. A
    second Ctrl-C after the echo window (here 0 s) is a person asking to abort without saving."""
    signal_at_step(monkeypatch, 3, signal.SIGINT, signal.SIGINT)
    monkeypatch.setattr("tinyk.train.SIGINT_ECHO_S", echo_s)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(cli_args(pt_data, tok_dir, out, "--max-steps", "50", "--log-every", "1", "--save-every", "0"))
    assert e.value.code == 130
    assert [p.name for p in checkpoints(out)] == (["step_0000003"] if saved else [])
    assert ("stopped by SIGINT at step 3" in capsys.readouterr().out) == saved


def test_sigkill_then_resume_is_bit_identical(tmp_path, pt_data, tok_dir):
    """The CLI is killed with SIGKILL once it has written a checkpoint (wherever it is then, possibly
    mid-save), resumed, and must end with exactly the weights and losses of a run never interrupted."""
    flags = {"data": str(pt_data), "tokenizer": str(tok_dir), "seq_len": 32, "batch_size": 8, "max_steps": 40,
             "save_every": 4, "eval_every": 20, "progress": False}
    killed = tmp_path / "killed"
    proc = subprocess.Popen([str(BIN / "python"), "-m", "tinyk", *cli_args(pt_data, tok_dir, killed, "--max-steps",
                             "40", "--save-every", "4", "--eval-every", "20")],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not checkpoints(killed) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, proc.stderr.read().decode()
    assert not (killed / "final").exists()
    resumed = train(resolve_config("pretrain", preset="nano", flags={**flags, "out": str(killed)}, resume=True),
                    resume=True)
    assert resumed["resumed_from"] is not None and resumed["steps"] == 40
    train(resolve_config("pretrain", preset="nano", flags={**flags, "out": str(tmp_path / "straight")}))
    a = load_file(killed / "final" / "model.safetensors")
    b = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert train_losses(killed) == train_losses(tmp_path / "straight")


def test_a_run_its_caller_will_not_continue_offers_no_resume_when_stopped(tmp_path, pt_data, tok_dir, monkeypatch,
                                                                         capsys):
    """The demo starts over instead: Ctrl-C in its training said "checkpoint saved, continue with --resume"
    of a folder it then deleted, and `tinyk demo --resume` is no command."""
    signal_at_step(monkeypatch, 2, signal.SIGINT)
    summary = train(nano_cfg(pt_data, tok_dir, tmp_path / "run", max_steps=20, log_every=1), resumable=False)
    said = capsys.readouterr()
    assert (summary["status"], summary["stop_signal"]) == ("interrupted", "SIGINT")
    assert said.err == "tinyk: SIGINT: stopping at the end of this step\n"
    assert "stopped by SIGINT at step 2\n" in said.out and "resume" not in said.out + said.err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])  # SIGHUP: an SSH session dropped
def test_signal_saves_a_checkpoint_and_exits(tmp_path, pt_data, tok_dir, monkeypatch, capsys, request, sig):
    signal_at_step(monkeypatch, 3, sig)
    if sig == signal.SIGHUP:  # a test session under nohup ignores it, and so would the run
        original = signal.signal(sig, signal.SIG_DFL)
        request.addfinalizer(lambda: signal.signal(sig, original))
    out, before = tmp_path / "run", signal.getsignal(sig)
    with pytest.raises(SystemExit) as e:
        main(cli_args(pt_data, tok_dir, out, "--max-steps", "50", "--log-every", "1", "--save-every", "0"))
    assert e.value.code == 128 + sig
    said = capsys.readouterr()
    assert f"stopped by {sig.name} at step 3" in said.out
    # Said at once: the step's evaluation and the save can take minutes, inviting a second Ctrl-C.
    again = "; Ctrl-C again aborts without saving" if sig == signal.SIGINT else ""
    assert said.err == f"tinyk: {sig.name}: stopping at the end of this step and saving{again}\n"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["steps"] == 3 and summary["stop_signal"] == sig.name
    assert [p.name for p in checkpoints(out)] == ["step_0000003"] and not (out / "final").exists()
    assert signal.getsignal(sig) == before
    # One in the last step: the run ends completed, and its summary says the signal came (a loop of runs stops).
    capsys.readouterr()
    last = train(nano_cfg(pt_data, tok_dir, tmp_path / "last", max_steps=3, log_every=1))
    assert (last["status"], last["stop_signal"]) == ("completed", sig.name) and (tmp_path / "last" / "final").is_dir()
    monkeypatch.undo()  # resuming the finished run: this call stopped nothing
    assert train(nano_cfg(pt_data, tok_dir, tmp_path / "last", max_steps=3, log_every=1), resume=True)[
        "stop_signal"] is None


def test_a_stop_leaves_out_the_steps_periodic_evaluation(tmp_path, pt_data, tok_dir, monkeypatch):
    """An evaluation can take minutes: a run asked to stop saves its checkpoint without it (and the
    user, waiting, is less tempted by the second Ctrl-C that aborts unsaved)."""
    signal_at_step(monkeypatch, 4, signal.SIGTERM)
    out = tmp_path / "run"
    summary = train(nano_cfg(pt_data, tok_dir, out, max_steps=8, eval_every=2))
    evals = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if r["type"] == "eval"]
    assert summary["status"] == "interrupted" and summary["steps"] == 4 and evals == [2]
    assert [p.name for p in checkpoints(out)] == ["step_0000004"]


def test_the_last_step_is_evaluated_where_eval_every_does_not_divide_the_run(tmp_path, pt_data, tok_dir):
    out = tmp_path / "run"
    summary = train(nano_cfg(pt_data, tok_dir, out, max_steps=5, eval_every=2))
    assert [r["step"] for r in records(out, "eval")] == [2, 4, 5]
    assert records(out, "eval")[-1]["val_loss"] == summary["final_val_loss"]


def test_eval_batches_null_validates_on_the_whole_split(tmp_path, pt_data, tok_dir):
    assert PretrainLoader(pt_data, "val", 32, 1).num_windows > 8  # more than one group of 8 windows
    summary = train(nano_cfg(pt_data, tok_dir, tmp_path / "run", max_steps=1, eval_batches=None))
    final = tmp_path / "run" / "final"
    again = eval_data(load_model(final)[0], final, pt_data, seq_len=32, batch_size=8)
    assert summary["final_val_loss"] == pytest.approx(again["loss"], rel=1e-5)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_a_signal_before_the_first_step_leaves_the_directory_as_it_was(tmp_path, pt_data, tok_dir, monkeypatch,
                                                                       capsys, sig):
    """Under torchrun a rank can wait seconds for a slower one before step 1: a Ctrl-C then saved a
    step-0 checkpoint as the run, and --force deleted the finished run it was to replace."""
    out = tmp_path / "run"
    assert train(nano_cfg(pt_data, tok_dir, out, max_steps=2))["status"] == "completed"
    before = {p.relative_to(out): p.read_bytes() if p.is_file() else None for p in sorted(out.rglob("*"))}
    next_batches = Trainer.next_batches

    def signalled(self):
        os.kill(os.getpid(), sig)
        return next_batches(self)

    monkeypatch.setattr(Trainer, "next_batches", signalled)
    for target, force in ((out, ["--force"]), (tmp_path / "new", [])):
        with pytest.raises(SystemExit) as e:
            main(cli_args(pt_data, tok_dir, target, "--max-steps", "5", *force))
        assert e.value.code == 128 + sig
        assert f"tinyk: stopped by {sig.name} before the first step: nothing was trained" in capsys.readouterr().err
    assert {p.relative_to(out): p.read_bytes() if p.is_file() else None for p in sorted(out.rglob("*"))} == before
    assert not (tmp_path / "new").exists()


def test_a_start_refused_after_the_run_directory_was_made_leaves_nothing(tmp_path, pt_data, tok_dir, monkeypatch):
    """E.g. the check that every node sees the run directory: rank 0 had made an empty one."""
    def not_shared(self):
        raise TinykError("not shared")

    monkeypatch.setattr(RunDir, "check_shared", not_shared)
    with pytest.raises(TinykError, match="not shared"):
        Trainer(nano_cfg(pt_data, tok_dir, tmp_path / "runs" / "x", max_steps=2))
    assert not (tmp_path / "runs" / "x").exists()


def test_a_run_directory_keeps_the_users_own_files(tmp_path, pt_data, tok_dir, monkeypatch):
    """`tinyk pretrain --out r > r/train.log` (the shell opens the log first), an eval's results or notes
    in the run directory: no start, resume, --force or failed start moves or deletes them."""
    out = tmp_path / "r"
    out.mkdir()
    mine = {"train.log": "step 1 ...\n", "notes": None}
    (out / "train.log").write_text(mine["train.log"])
    (out / "notes").mkdir()
    assert train(nano_cfg(pt_data, tok_dir, out, max_steps=2, save_every=1))["steps"] == 2
    assert train(nano_cfg(pt_data, tok_dir, out, max_steps=3, save_every=1), resume=True)["steps"] == 3
    step = checkpoints(out)[0]  # not a run to write into: resumed through its run
    with pytest.raises(TinykError, match=rf"--out {re.escape(str(step))} is one of a run's checkpoints \(to resume "
                                         rf"from it, delete the newer ones and resume --out {re.escape(str(out))}\)"):
        train(nano_cfg(pt_data, tok_dir, step, max_steps=4), resume=True)
    (out / "eval.json").write_text("{}")
    monkeypatch.setattr(Transformer, "forward", lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):  # a --force start that fails puts the old run back
        train(nano_cfg(pt_data, tok_dir, out, max_steps=1), force=True)
    monkeypatch.undo()
    assert [r["step"] for r in records(out, "train")] == [1, 2, 3]
    # Inside final/ and checkpoints/, which --force replaces whole: refused, not deleted.
    (out / "final" / "README.md").write_text("card")
    (out / "checkpoints" / "notes.txt").write_text("mine")
    (checkpoints(out)[-1] / "my_eval.json").write_text("{}")
    (checkpoints(out)[-1] / "model" / "notes.md").write_text("mine")
    with pytest.raises(TinykError, match=r"--force would delete checkpoints/notes.txt, checkpoints/step_0000003/"
                                         r"model/notes.md, checkpoints/step_0000003/my_eval.json, \.\.\. in .* move "
                                         r"them out of the run first"):
        train(nano_cfg(pt_data, tok_dir, out, max_steps=1), force=True)
    assert (out / "final" / "README.md").read_text() == "card"
    assert [r["step"] for r in records(out, "train")] == [1, 2, 3]
    for mine_too in (out / "final" / "README.md", out / "checkpoints" / "notes.txt",
                     checkpoints(out)[-1] / "my_eval.json", checkpoints(out)[-1] / "model" / "notes.md"):
        mine_too.unlink()
    assert train(nano_cfg(pt_data, tok_dir, out, max_steps=1), force=True)["steps"] == 1
    assert [r["step"] for r in records(out, "train")] == [1]
    assert (out / "train.log").read_text() == mine["train.log"] and (out / "notes").is_dir()
    assert (out / "eval.json").read_text() == "{}"
    (out / ".env.old-backup").write_text("mine")  # a dotfile of the user's is no killed write's leftover
    (out / "tokenizer.json").write_text("{}")  # nor do files of other tinyk outputs make it one
    assert train(nano_cfg(pt_data, tok_dir, out, max_steps=2), resume=True)["steps"] == 2
    assert (out / ".env.old-backup").read_text() == "mine" and (out / "tokenizer.json").is_file()


def test_keep_best_keeps_the_model_of_the_lowest_val_loss_across_a_resume(tmp_path, pt_data, tok_dir, capsys):
    """An SFT run over several epochs overfits: final/ is the last step's model, best/ the one whose val loss
    was lowest (which the summary names), as it was when the run stopped and resumed in between."""
    out = tmp_path / "run"
    kw = dict(lr=0.3, eval_every=1, save_every=1, keep_checkpoints=10, keep_best=True)  # a loss that climbs
    train(nano_cfg(pt_data, tok_dir, out, max_steps=2, **kw))
    summary = train(nano_cfg(pt_data, tok_dir, out, max_steps=4, **kw), resume=True)
    evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["type"] == "eval"]
    best = min(evals, key=lambda r: r["val_loss"])["step"]
    assert best < 4, "the run must end past its lowest val loss for best/ to differ from final/"
    assert summary["best_model"] == str(out / "best") and summary["best_model_step"] == best
    assert summary["best_val_loss"] == min(r["val_loss"] for r in evals)
    kept = load_file(out / "best" / "model.safetensors")
    at_best = load_file(out / "checkpoints" / f"step_{best:07d}" / "model" / "model.safetensors")
    assert all(torch.equal(kept[k], at_best[k]) for k in at_best)
    final = load_file(out / "final" / "model.safetensors")
    assert not all(torch.equal(kept[k], final[k]) for k in final)
    assert f"the lowest val loss, step {best}'s, in {out / 'best'}" in capsys.readouterr().out
    assert train(nano_cfg(pt_data, tok_dir, tmp_path / "plain", max_steps=1))["best_model"] is None
    # A session without keep_best leaves best/ as it is, and says so, and its summary still names it; the
    # next with keep_best goes on from the one best/ holds, which records its own step (metrics.jsonl may
    # have lost it: a session killed after writing it).
    kw = {**kw, "lr": 1e-9}  # the loss stays where it climbed to, above best/'s
    off = train(nano_cfg(pt_data, tok_dir, out, max_steps=5, **{**kw, "keep_best": False}), resume=True)
    said = capsys.readouterr().out
    assert (off["best_model"], off["best_model_step"]) == (str(out / "best"), best)
    assert f"the lowest val loss, step {best}'s, in {out / 'best'}" in said
    assert f"note: keep_best is off, so best/ (step {best}'s model, val loss " in said  # left behind, and says so
    (out / "metrics.jsonl").write_text("")
    on = train(nano_cfg(pt_data, tok_dir, out, max_steps=6, **kw), resume=True)
    assert on["best_model_step"] == best and load_file(out / "best" / "model.safetensors").keys() == kept.keys()


def test_keep_best_turned_on_later_keeps_only_a_model_better_than_the_runs_lowest(tmp_path, pt_data, tok_dir, capsys):
    """Evaluations made while keep_best was off kept no model: turned on at a resume, it keeps one only
    where an evaluation beats them, so best/ never holds a model worse than the run's lowest val loss."""
    out = tmp_path / "run"
    kw = dict(eval_every=1, save_every=2)
    train(nano_cfg(pt_data, tok_dir, out, max_steps=2, **kw))
    lowest = min(r["val_loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                 if r["type"] == "eval")
    capsys.readouterr()
    summary = train(nano_cfg(pt_data, tok_dir, out, max_steps=4, lr=1.0, keep_best=True, **kw), resume=True)
    evals = [r["val_loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if r["type"] == "eval" and r["step"] > 2]
    assert min(evals) > lowest, "the loss must climb after the resume"
    assert not (out / "best").exists()
    assert (summary["best_model"], summary["best_model_val_loss"], summary["best_val_loss"]) == (None, None, lowest)
    said = capsys.readouterr().out
    assert f"note: keep_best: the model of the run's lowest val loss so far, {lowest:.4f}, was not kept " \
           f"(keep_best was off, or best/ was removed; best/ holds none)" in said
    assert "lowest val loss, step" not in said


def test_keep_best_without_validation_data_is_refused(tmp_path, corpus_file, tok_dir):
    prepare_pretrain([corpus_file], tok_dir, tmp_path / "data", val_fraction=0, workers=1, show_progress=False)
    with pytest.raises(TinykError, match="^keep_best keeps the model of the lowest val loss, and there is no "
                                         "validation: "):
        train(nano_cfg(tmp_path / "data", tok_dir, tmp_path / "run", keep_best=True))
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_a_resume_without_checkpoints_never_replaces_a_final_model(tmp_path, pt_data, tok_dir):
    """Deleting checkpoints/ to free disk (or copying a run without it) and resuming to train longer
    started over and replaced final/ with a model trained from scratch."""
    out = tmp_path / "r"
    train(nano_cfg(pt_data, tok_dir, out, max_steps=2, save_every=1))
    final = (out / "final" / "model.safetensors").read_bytes()
    shutil.rmtree(out / "checkpoints")
    with pytest.raises(TinykError, match=rf"--resume: {re.escape(str(out))} holds a final model but no checkpoint "
                                         rf"to continue from; to train on from its weights, start a new run with "
                                         rf"--init {re.escape(str(out / 'final'))}"):
        train(nano_cfg(pt_data, tok_dir, out, max_steps=4), resume=True)
    assert (out / "final" / "model.safetensors").read_bytes() == final


def test_a_resume_that_finds_a_newer_checkpoint_once_it_holds_the_lock_starts_again(tmp_path, pt_data, tok_dir,
                                                                                   monkeypatch):
    """A run that was finishing (`kill -9` of torchrun leaves its workers running) saved another
    checkpoint between this start's listing and its lock: resuming from the older would redo steps."""
    from tinyk.outputs import DirLock

    out = tmp_path / "run"
    train(nano_cfg(pt_data, tok_dir, out, max_steps=4, save_every=2))
    latest = checkpoints(out)[-1]
    shutil.rmtree(latest)  # the other run's last save is yet to come
    acquire = DirLock.acquire

    def finishing_run_saves_first(self):
        shutil.copytree(checkpoints(out)[-1], latest)
        return acquire(self)

    monkeypatch.setattr(DirLock, "acquire", finishing_run_saves_first)
    with pytest.raises(TinykError, match="gained a checkpoint while this run started"):
        Trainer(nano_cfg(pt_data, tok_dir, out, max_steps=6), resume=True)
    monkeypatch.undo()
    assert train(nano_cfg(pt_data, tok_dir, out, max_steps=6), resume=True)["steps"] == 6


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGINT])
def test_a_signal_ignored_when_the_run_began_stays_ignored(tmp_path, pt_data, tok_dir, monkeypatch, sig):
    """nohup leaves its command SIGHUP ignored, a shell script's `cmd &` SIGINT: the run goes on."""
    signal_at_step(monkeypatch, 2, sig)
    before = signal.signal(sig, signal.SIG_IGN)
    try:
        summary = train(nano_cfg(pt_data, tok_dir, tmp_path / "run", max_steps=4))
        assert summary["status"] == "completed" and summary["steps"] == 4
        assert signal.getsignal(sig) == signal.SIG_IGN
    finally:
        signal.signal(sig, before)


def test_a_run_whose_output_is_closed_stops_with_a_checkpoint(tmp_path, pt_data, tok_dir):
    """`tinyk pretrain ... | head`: the first write after the reader left ended the run with no
    checkpoint, and the shell would otherwise wait for a run no one watches. (A reader that leaves
    before the first step stops the run as a signal then does: nothing saved, nothing left.)"""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "tinyk", *cli_args(pt_data, tok_dir, out, "--max-steps", "100000",
                                                                       "--log-every", "1", "--save-every", "0")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    try:
        while not proc.stdout.readline().startswith(b"step "):  # `head` leaves once training has begun
            pass
        proc.stdout.close()
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=120) == 141
    finally:
        proc.kill()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_signal"] == "SIGPIPE" \
        and [p.name for p in checkpoints(out)] == [f"step_{summary['steps']:07d}"]
    assert err.endswith(f"tinyk: its output could not be written (the reader left, or a full disk), so pretrain "
                        f"stopped at step {summary['steps']} with a "
                        f"checkpoint; continue with --resume\n") and "Traceback" not in err


_PORTS = iter(range(1000))


def _free_port() -> int:
    """A job's rendezvous port, bound by its rank 0 seconds later: below the system's ephemeral ports,
    which every socket bound to port 0 meanwhile draws from (the other xdist worker's test servers,
    gloo's listeners), and in a range of this xdist worker's own."""
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
    for n in _PORTS:
        port = 20000 + 1000 * worker + n
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:  # another program's
                continue
            return port
    raise RuntimeError("no free port left in this worker's range")


def test_the_whole_run_mfu_counts_each_session_at_its_own_peak(tmp_path, pt_data, tok_dir, monkeypatch):
    """A resume on other hardware (here: another peak) keeps what the first session's devices could do."""
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        stop_at(m, 3)
        train(nano_cfg(pt_data, tok_dir, out, peak_tflops=0.01))
    before = json.loads((checkpoints(out)[-1] / "state.json").read_text())["elapsed_s"]
    summary = train(nano_cfg(pt_data, tok_dir, out, peak_tflops=0.04), resume=True)
    spent = (before * 0.01 + (summary["elapsed_s"] - before) * 0.04) * 1e12
    assert summary["mfu"] == pytest.approx(summary["tokens"] * summary["flops_per_token"] / spent, rel=1e-2)


AS_TORCHRUN = {"TORCHELASTIC_RUN_ID": "test"}  # what torchrun sets beside the rendezvous: not a launch by hand


def test_two_process_ddp_and_fsdp_match_one_process(tmp_path, pt_data, tok_dir):
    """Same global batch: torchrun DDP from scratch follows the one-process loss curve; two processes
    under FSDP (+ activation checkpointing) resume the one-process checkpoint; one process resumes FSDP's."""
    common = dict(max_steps=8, save_every=2, keep_checkpoints=10, micro_batch=2, eval_every=4)
    ref = tmp_path / "ref"
    train(nano_cfg(pt_data, tok_dir, ref, **common))
    flags = ["--max-steps", "8", "--save-every", "2", "--micro-batch", "2", "--eval-every", "4", "--log-every", "1",
             "--set", "keep_checkpoints=10", "--set", "eval_batches=2", "--set", "lr=3e-3", "--set", "warmup_steps=2"]
    ddp = tmp_path / "ddp"
    r = two_process_job(cli_args(pt_data, tok_dir, ddp, *flags), tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = torch.load(checkpoints(ddp)[0] / "rng.pt", weights_only=True)["ranks"]  # each its own dropout stream
    assert len(ranks) == 2 and not torch.equal(ranks[0]["torch"], ranks[1]["torch"])
    fsdp = tmp_path / "fsdp"
    shutil.copytree(ref, fsdp)
    shutil.rmtree(fsdp / "final")
    for p in checkpoints(fsdp)[2:]:
        shutil.rmtree(p)
    # What torchrun does for each worker, done by hand: the env:// rendezvous.
    rdzv = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2"}
    workers = [subprocess.Popen([str(BIN / "python"), "-m", "tinyk",
                                 *cli_args(pt_data, tok_dir, fsdp, *flags, "--parallel", "fsdp",
                                           "--activation-checkpointing", "--resume")],
                                env={**ENV, **rdzv, "RANK": str(r), "LOCAL_RANK": str(r)},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outputs = [w.communicate(timeout=300) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
    assert "resumed from" in outputs[0][0] and "FSDP" in outputs[0][0]
    # launched by hand, where a wait for a missing peer would be silent and deaf to SIGTERM: each says so
    assert f"tinyk: process 1 of 2 waiting for the others at 127.0.0.1:{rdzv['MASTER_PORT']}" in outputs[1][1]
    back = tmp_path / "back"
    shutil.copytree(fsdp, back)
    shutil.rmtree(back / "final")
    shutil.rmtree(checkpoints(back)[-1])
    train(nano_cfg(pt_data, tok_dir, back, **common), resume=True)
    want = train_losses(ref)
    assert sorted(want) == list(range(1, 9))
    for run in (ddp, fsdp, back):
        got = train_losses(run)
        assert sorted(got) == sorted(want)
        for step, loss in want.items():
            assert got[step] == pytest.approx(loss, rel=1e-5), (run.name, step)
    evals = [json.loads(x) for x in (ddp / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    ref_evals = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert [e["val_loss"] for e in evals] == pytest.approx([e["val_loss"] for e in ref_evals], rel=1e-5)
    summaries = [json.loads((run / "summary.json").read_text()) for run in (ref, ddp)]
    assert summaries[0]["flops_per_token"] == summaries[1]["flops_per_token"]  # FLOPs summed over both ranks


def other_tokens(data: Path, to: Path) -> Path:
    """A copy of pretraining `data` with two tokens of its training split swapped: the same sizes, as
    the same corpus shuffled or tokenized another way gives, and other contents."""
    other = shutil.copytree(data, to)
    meta = json.loads((other / "meta.json").read_text())
    name = next(n for n in meta["sha256"] if n.startswith("train/"))
    tokens = np.fromfile(other / name, dtype=np.uint16)
    i = int(np.flatnonzero(tokens != tokens[0])[0])
    tokens[[0, i]] = tokens[[i, 0]]
    tokens.tofile(other / name)
    meta["sha256"][name] = sha256_file(other / name)
    (other / "meta.json").write_text(json.dumps(meta))
    return other


@pytest.mark.parametrize("rank1,says", [
    (["--max-steps", "5"], "max_steps is 4 in rank 0 but 5 in rank 1"),  # it hung in rank 0's last barrier
    (["--set", "model.dim=96"], "model.dim is 64 in rank 0 but 96 in rank 1"),  # DDP's traceback
    (["--data", "OTHER"], "started on different data: rank 1's data directory differs from rank 0's"),  # trained both
    (["--data", "RETOKENIZED"], "started on different data"),  # the same sizes, other tokens: trained both
    (["--force"], "start is 'a new run' in rank 0 but '--force' in rank 1"),  # rank 1 went on from step 0
])
def test_nodes_started_with_different_commands_are_refused_before_training(tmp_path, pt_data, tok_dir, corpus_file,
                                                                            rank1, says):
    """One node's job script differing by a flag trained a mix of both, hung or aborted in a collective:
    every process now says which setting differs, before anything is written."""
    if "OTHER" in rank1:
        other = prepare_pretrain([corpus_file], tok_dir, tmp_path / "other", val_fraction=0.3, seed=1,
                                 show_progress=False)
        assert other["splits"] != json.loads((pt_data / "meta.json").read_text())["splits"]
        rank1 = ["--data", str(tmp_path / "other")]
    if "RETOKENIZED" in rank1:
        rank1 = ["--data", str(other_tokens(pt_data, tmp_path / "other"))]
    out = tmp_path / "run"
    rdzv = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2", **AS_TORCHRUN}
    flags = ["--max-steps", "4", "--save-every", "0"]
    workers = [subprocess.Popen([str(BIN / "python"), "-m", "tinyk", *cli_args(pt_data, tok_dir, out, *flags),
                                 *(rank1 if r else [])],
                                env={**ENV, **rdzv, "RANK": str(r), "LOCAL_RANK": str(r)},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outputs = [w.communicate(timeout=120) for w in workers]
    assert [w.returncode for w in workers] == [2, 2], outputs
    errors = [line for line in outputs[0][1].splitlines() if line.startswith("tinyk: error:")]
    assert len(errors) == 1 and says in errors[0], outputs[0][1]
    assert not out.exists()


def test_processes_that_would_resume_from_different_checkpoints_are_refused(tmp_path, pt_data, tok_dir):
    """A node seeing another copy of the run directory (no shared filesystem), or a cached listing
    without the newest checkpoint, resumed from an older step: the job trained a mix, then hung."""
    run = tmp_path / "run"
    train(nano_cfg(pt_data, tok_dir, run, max_steps=2, save_every=1))
    shutil.rmtree(run / "final")
    stale = shutil.copytree(run, tmp_path / "stale")
    shutil.rmtree(checkpoints(stale)[-1])
    rdzv = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2", **AS_TORCHRUN}
    workers = [subprocess.Popen([str(BIN / "python"), "-m", "tinyk", *cli_args(pt_data, tok_dir, where, "--resume",
                                                                                "--max-steps", "4")],
                                env={**ENV, **rdzv, "RANK": str(r), "LOCAL_RANK": str(r)},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for r, where in enumerate((run, stale))]
    outputs = [w.communicate(timeout=120) for w in workers]
    assert [w.returncode for w in workers] == [2, 2], outputs
    errors = [line for line in outputs[0][1].splitlines() if line.startswith("tinyk: error:")]
    assert errors == [f"tinyk: error: the processes of this job would resume from different checkpoints: rank 0 "
                      f"from step_0000002, rank 1 from step_0000001; every node must see the same run directory "
                      f"({run}) on a shared filesystem (one that caches listings may need a minute to show the "
                      f"newest: start the job again then)"], outputs[0][1]
    assert [p.name for p in checkpoints(run)] == ["step_0000001", "step_0000002"] and not (run / "final").exists()


def test_a_process_that_refuses_before_the_job_meets_stops_the_others(tmp_path, pt_data, tok_dir):
    """`--out RUN --resume` on a node that does not see the shared run directory (or a node whose command
    has a typo) refused before the process group existed: it said why and exited, and the other nodes
    waited for it in silence until the group's 30-minute timeout. A node whose data is not where its
    command says refuses after the job meets: the others said only that a process had stopped."""
    run = tmp_path / "run"
    train(nano_cfg(pt_data, tok_dir, run, max_steps=2, save_every=1))
    shutil.rmtree(run / "final")
    unseen = tmp_path / "other-node" / "run"
    for command in (["--out", str(unseen), "--resume"], ["--out", str(run), "--resume", "--preset", "nanoo"],
                    ["--out", str(run), "--resume", "--force"],
                    ["--out", str(run), "--resume", "--data", str(tmp_path / "not-copied-here")],
                    ["--out", str(run), "--resume", "--max-step", "4"]):
        rdzv = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2", **AS_TORCHRUN}
        workers = [subprocess.Popen([str(BIN / "python"), "-m", "tinyk", "pretrain", "--no-progress", "--max-steps",
                                     "4", *(["--out", str(run), "--resume"] if r == 0 else command)],
                                    env={**ENV, **rdzv, "RANK": str(r), "LOCAL_RANK": str(r)},
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                   for r in range(2)]
        outputs = [w.communicate(timeout=120) for w in workers]
        assert [w.returncode for w in workers] == [2, 2], outputs
        said = outputs[1][1].splitlines()[-1].removeprefix("tinyk: error: ")
        if "--max-step" in command:  # argparse's line names the command, as it does on one machine
            assert said == ("tinyk pretrain: error: unrecognized arguments: --max-step 4; did you mean --max-steps? "
                            "(see tinyk pretrain --help)")
            said = "tinyk pretrain: unrecognized arguments: --max-step 4; did you mean --max-steps?"
        assert outputs[0][1].splitlines()[-1] == f"tinyk: error: process 1 of this job refused to start: {said}"
    assert [p.name for p in checkpoints(run)] == ["step_0000001", "step_0000002"]


def test_a_process_that_refuses_waits_for_the_others_only_a_while(tmp_path):
    """A process comes to the job only to say it refuses: where the others never come (they crashed, or run
    no tinyk training), it gives up after REFUSAL_WAIT, not the group's half hour."""
    script = ("import time, datetime, tinyk.train as t\n"
              "t.REFUSAL_WAIT = datetime.timedelta(seconds=2)\n"
              "start = time.monotonic(); t.tell_job('cpu', t.TinykError('a typo'))\n"
              "print(time.monotonic() - start)")
    env = {**ENV, "WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port()), **AS_TORCHRUN}
    done = subprocess.run([str(BIN / "python"), "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and float(done.stdout.split()[-1]) < 20, done


def test_a_device_that_is_not_there_is_refused_by_one_process(monkeypatch):
    """One process asking for CUDA where there is none is refused, not trained on the CPU (a job's process
    tells the others first, on the device they are most likely on)."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(TinykError, match="^--device cuda was asked for but CUDA is not available$"):
        setup_dist("cuda")


def test_a_run_resumes_from_inside_its_directory(tmp_path, pt_data, tok_dir, monkeypatch):
    """`cd run && tinyk pretrain --out . --resume` (it was a StopIteration traceback)."""
    train(nano_cfg(pt_data, tok_dir, tmp_path / "run", max_steps=2, save_every=1))
    monkeypatch.chdir(tmp_path / "run")
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--out", ".", "--resume", "--max-steps", "3", "--no-progress"])
    assert e.value.code == 0 and json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 3


def test_a_resume_keeps_what_the_weights_compute_and_a_fine_tune_may_change_it(tmp_path, pt_data, tok_dir, capsys):
    """rope_theta or norm_eps changed on --resume made the run go on training another function, with no
    word; a new run from the checkpoint (--init) is how to mean it, as is a context extended with linear
    RoPE scaling."""
    run = tmp_path / "run"
    train(nano_cfg(pt_data, tok_dir, run, max_steps=2, save_every=1))
    for key, value in (("rope_theta", "500"), ("rope_scaling", "2"), ("norm_eps", "0.1")):
        with pytest.raises(SystemExit) as e:
            main(["pretrain", "--out", str(run), "--resume", "--max-steps", "3", "--set", f"model.{key}={value}",
                  "--no-progress"])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith(f"tinyk: error: model.{key}={float(value)} differs from the "
                                                    "run's ") \
            and err.endswith(f"--init {run}/checkpoints/step_0000002/model"), err
    assert not (run / "checkpoints" / "step_0000003").exists()
    # The fine-tune trains, and saves, a model that computes with both (norm_eps was saved, not used).
    fields = {"rope_theta": 500.0, "norm_eps": 0.5, "rope_scaling": 2.0, "max_seq_len": 256}
    out = train(nano_cfg(pt_data, None, tmp_path / "long", init=str(run / "final"), model=fields, max_steps=1))
    final = tmp_path / "long" / "final"
    saved = json.loads((final / "config.json").read_text())
    again = eval_data(load_model(final)[0], final, pt_data, seq_len=32, batch_size=8, max_batches=2)
    assert out["steps"] == 1 and (saved["rope_theta"], saved["rms_norm_eps"]) == (500, 0.5) \
        and saved["rope_scaling"] == {"rope_type": "linear", "factor": 2.0} \
        and again["loss"] == pytest.approx(out["final_val_loss"], rel=1e-5), (again, out)


def test_a_dead_process_leaves_the_others_one_line_and_the_way_back(tmp_path, pt_data, tok_dir):
    """A worker killed mid-run (out of memory, a node lost): the survivor's failed collective is one
    line naming the newest checkpoint, not the backend's traceback, even when torchrun's SIGTERM to
    the survivors arrives while it cleans up (here at once: it used to end the line as "terminated")."""
    out = tmp_path / "run"
    rdzv = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2", **AS_TORCHRUN}
    survivor = ("import signal, sys, tinyk.train as t; close = t.Trainer.close\n"
                "def closing(self):\n    signal.raise_signal(signal.SIGTERM)\n    close(self)\n"
                "t.Trainer.close = closing\nfrom tinyk.cli import main; main(sys.argv[1:])")
    workers = [subprocess.Popen([str(BIN / "python"), *(("-c", survivor) if r == 0 else ("-m", "tinyk")),
                                 *cli_args(pt_data, tok_dir, out, "--max-steps", "100000", "--save-every", "2")],
                                env={**ENV, **rdzv, "RANK": str(r), "LOCAL_RANK": str(r)},
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        deadline = time.monotonic() + 120
        while not checkpoints(out) and workers[0].poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        workers[1].kill()
        err = workers[0].communicate(timeout=120)[1]
    finally:
        for w in workers:
            w.kill()
            w.wait()
            w.stderr.close()
    assert workers[0].returncode == 2 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("tinyk: error: another process of this job stopped (") and \
        re.search(r"the newest checkpoint is .*step_\d+; start the job again with --resume$", last), last


def test_a_stop_on_one_machine_is_said_on_every_machine(tmp_path, pt_data, tok_dir):
    """SIGTERM to one node of two (its scheduler preempting it): both stop at one step with a checkpoint,
    and each machine's terminal says so; the node that was not rank 0 printed only torchrun's report."""
    out = tmp_path / "run"
    rdzv = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2", **AS_TORCHRUN}
    workers = [subprocess.Popen([str(BIN / "python"), "-m", "tinyk",
                                 *cli_args(pt_data, tok_dir, out, "--max-steps", "100000", "--save-every", "2")],
                                env={**ENV, **rdzv, "RANK": str(r), "LOCAL_RANK": "0"},  # one process a machine
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        deadline = time.monotonic() + 120
        while not checkpoints(out) and workers[1].poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        workers[1].send_signal(signal.SIGTERM)
        said = [w.communicate(timeout=120) for w in workers]
    finally:
        for w in workers:
            w.kill()
            w.wait()
    assert [w.returncode for w in workers] == [128 + signal.SIGTERM] * 2, said
    step = int(checkpoints(out)[-1].name.removeprefix("step_"))
    assert said[1] == ("", "tinyk: SIGTERM: stopping at the end of this step and saving\n"
                           f"tinyk: stopped by SIGTERM at step {step}; process 0 saved a checkpoint in {out}, "
                           f"continue with --resume\n")
    assert said[0][0].endswith(f"stopped by SIGTERM at step {step}; checkpoint saved, continue with --resume\n")


def test_under_torchrun_a_refusal_is_printed_once_and_the_others_say_why_they_stopped(tmp_path, pt_data, tok_dir):
    """Rank 0 refuses to start (here its tracker) while rank 1 waits for it: rank 1's failed collective is one
    line, not gloo's traceback, and not advice to --resume a run that never trained. Each rank leaves its line
    in the error file torchrun's failure summary shows; only local rank 0 prints, so the line appears once."""
    rdzv = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2", **AS_TORCHRUN}
    refuse = ("import sys, tinyk.train as t\n"
              "def refuse(self):\n    raise t.TinykError('--tracker wandb could not start: not logged in')\n"
              "t.Trainer._make_monitor = refuse\nfrom tinyk.cli import main; main(sys.argv[1:])")
    files = [tmp_path / f"error{r}.json" for r in range(2)]
    workers = [subprocess.Popen([str(BIN / "python"), *(("-c", refuse) if r == 0 else ("-m", "tinyk")),
                                 *cli_args(pt_data, tok_dir, tmp_path / "run", "--max-steps", "2")],
                                env={**ENV, **rdzv, "RANK": str(r), "LOCAL_RANK": str(r),
                                     "TORCHELASTIC_ERROR_FILE": str(files[r])},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outputs = [w.communicate(timeout=120) for w in workers]
    assert [w.returncode for w in workers] == [2, 2], outputs
    refusal = "tinyk: error: --tracker wandb could not start: not logged in"
    assert outputs[0][1].splitlines() == [refusal] and outputs[1][1] == "", outputs
    recorded = [json.loads(f.read_text(encoding="utf-8"))["message"] for f in files]  # torch's @record layout
    assert [r["message"] for r in recorded] == [refusal, "tinyk: error: another process of this job stopped before "
                                                         "training began; its own error says why"]
    # torchrun names the earliest failure the root cause: the refusal, not the process that saw it.
    assert int(recorded[0]["extraInfo"]["timestamp"]) < int(recorded[1]["extraInfo"]["timestamp"])
    assert not (tmp_path / "run").exists()  # the refused start left nothing behind


def test_sample_prompts_under_fsdp_are_refused_with_how_to_drop_them(tmp_path, pt_data, tok_dir):
    """Rank 0 alone decodes the samples, and under FSDP it holds a shard of the model. A run saved with
    --sample and resumed under fsdp has them from its config.yaml: the refusal says how to drop them."""
    rdzv = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2", **AS_TORCHRUN}
    workers = [subprocess.Popen([str(BIN / "python"), "-m", "tinyk",
                                 *cli_args(pt_data, tok_dir, tmp_path / "run", "--max-steps", "2", "--parallel",
                                           "fsdp", "--sample", "你好")],
                                env={**ENV, **rdzv, "RANK": str(r), "LOCAL_RANK": str(r)},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outputs = [w.communicate(timeout=120) for w in workers]
    assert [w.returncode for w in workers] == [2, 2], outputs
    assert outputs[0][1].splitlines() == [
        "tinyk: error: sample_prompts are decoded by one process, which under --parallel fsdp holds a shard of the "
        "model: train with ddp, or drop them (--set 'sample_prompts=[]'; a resumed run has them from its config.yaml) "
        "and sample a checkpoint's model/ with tinyk generate"], outputs


def test_ranks_that_do_not_share_the_run_directory_are_refused(tmp_path, pt_data, tok_dir):
    """Two machines, each with its own disk at the same path (here: two paths): rank 1 would never see
    the checkpoints rank 0 writes, so a resume would start the ranks at different steps."""
    rdzv = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2", **AS_TORCHRUN}
    # The ranks wait for a slow network filesystem before giving up; here 2 s, not the real 60.
    worker = "import sys, tinyk.rundir; tinyk.rundir.SHARED_WAIT_S = 2; from tinyk.cli import main; main(sys.argv[1:])"
    workers = [subprocess.Popen([str(BIN / "python"), "-c", worker,
                                 *cli_args(pt_data, tok_dir, tmp_path / f"disk{r}" / "run", "--max-steps", "2")],
                                env={**ENV, **rdzv, "RANK": str(r), "LOCAL_RANK": str(r)},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outputs = [w.communicate(timeout=120) for w in workers]
    assert [w.returncode for w in workers] == [2, 2], outputs
    for r, (_, err) in enumerate(outputs):
        assert err.splitlines() == [f"tinyk: error: run directory {tmp_path / f'disk{r}' / 'run'} is not shared: "
                                    "1 of 2 processes do not see what rank 0 writes there; with several machines, "
                                    "every node's --out must be the same directory on a shared filesystem"], err
    assert not (tmp_path / "disk0" / "run").exists()  # rank 0 made it, and takes it away again


def test_two_processes_stop_together_on_a_time_budget(tmp_path, pt_data, tok_dir):
    """--max-minutes under torchrun: the ranks average their fitted lengths, so both take the final
    evaluation (a collective) at the same step and finish; a disagreement would hang until the timeout."""
    out = tmp_path / "timed"
    r = two_process_job(cli_args(pt_data, tok_dir, out, "--max-steps", "100000", "--max-minutes", "0.05",
                                 "--eval-every", "7", "--log-every", "5", "--set", "eval_batches=1"), tmp_path, 120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Warning" not in r.stderr, r.stderr[-3000:]  # e.g. torch 2.13's deprecated DDP flag
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["world_size"] == 2
    assert 5 <= summary["steps"] == summary["total_steps"] < 100000
    assert summary["elapsed_s"] < 0.05 * 60 + 10 and (out / "final").is_dir()
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert evals[-1]["step"] == summary["steps"]


def test_two_processes_agree_on_what_best_must_beat(tmp_path, pt_data, tok_dir):
    """keep_best turned on at a resume: rank 0 alone reads the run's history, and every rank must agree on
    whether an evaluation writes best/ (a collective); the others took no history, saved, and hung."""
    out = tmp_path / "run"
    train(nano_cfg(pt_data, tok_dir, out, max_steps=2, eval_every=1, save_every=2))
    r = two_process_job(cli_args(pt_data, tok_dir, out, "--resume", "--keep-best", "--max-steps", "4",
                                 "--eval-every", "1", "--set", "lr=1.0"), tmp_path, 120)
    assert r.returncode == 0, r.stderr[-3000:]
    evals = [json.loads(x)["val_loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert min(evals[2:]) > min(evals[:2]) and not (out / "best").exists()  # the loss climbed: nothing beat it


def test_trackers_are_lazy_and_optional(tmp_path, pt_data, tok_dir, monkeypatch, capsys):
    calls = []

    class FakeRun:
        def __init__(self):
            self.summary = {}  # W&B's run summary

        def log(self, values, step):
            calls.append((step, values))

        def finish(self, exit_code=None):
            calls.append("finish")

    runs = []
    fake = type(sys)("wandb")
    fake.init = lambda **kw: calls.append(kw["project"]) or runs.append(FakeRun()) or runs[-1]
    monkeypatch.setitem(sys.modules, "wandb", fake)
    summary = train(nano_cfg(pt_data, tok_dir, tmp_path / "w", max_steps=2, tracker=["wandb"], project="p"))
    assert calls[0] == "p" and calls[-1] == "finish"
    # The results go to W&B's runs table as summary.json has them (not the last step's values alone).
    assert runs[0].summary == {k: v for k, v in summary.items() if isinstance(v, int | float | str)}
    assert runs[0].summary["status"] == "completed" and "tokens_per_s_steady" in runs[0].summary
    assert [s for s, v in calls[1:-1] if "train/loss" in v] == [1, 2]
    assert {"train/lr", "train/tokens_per_s"} <= set(calls[1][1])

    def not_logged_in(**kw):
        raise RuntimeError("No API key configured. Use `wandb login` to log in.\n(more lines)")

    fake.init = not_logged_in
    with pytest.raises(TinykError, match=r"^--tracker wandb could not start: No API key configured\. Use `wandb "
                                         r"login` to log in; WANDB_MODE=offline logs locally$"):
        train(nano_cfg(pt_data, tok_dir, tmp_path / "w4", tracker=["wandb"]))
    assert not (tmp_path / "w4").exists()
    fake.init = lambda **kw: calls.append(kw["project"]) or FakeRun()
    monkeypatch.setitem(sys.modules, "swanlab", None)
    calls.clear()
    with pytest.raises(TinykError, match=r"--tracker swanlab needs the 'swanlab' package"):
        train(nano_cfg(pt_data, tok_dir, tmp_path / "w5", tracker=["wandb", "swanlab"]))
    assert calls[-1] == "finish"  # the W&B run that did start is closed, not left running

    for broken in (ModuleNotFoundError("No module named 'pydantic_core._pydantic_core'", name="pydantic_core"),
                   ImportError("cannot import name 'Run' from 'wandb.sdk'", name="wandb.sdk")):  # half-upgraded
        def broken_install(error=broken, **kw):
            raise error

        fake.init = broken_install
        with pytest.raises(TinykError, match=rf"^--tracker wandb could not start: the 'wandb' package does not "
                                             rf"import \({re.escape(str(broken))}\); reinstall it"):
            train(nano_cfg(pt_data, tok_dir, tmp_path / "w2", tracker=["wandb"]))
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(TinykError, match=r"--tracker wandb needs the 'wandb' package \(pip install wandb\)$"):
        train(nano_cfg(pt_data, tok_dir, tmp_path / "w2", tracker=["wandb"]))
    # A resumed run's saved config names it: the way on without it is said (the user never typed --tracker).
    with pytest.raises(TinykError, match=r"--tracker wandb needs the 'wandb' package \(pip install wandb\); to resume "
                                         r"without it, give --tracker the others \(--tracker '' for none\)$"):
        train(nano_cfg(pt_data, tok_dir, tmp_path / "w", max_steps=4, tracker=["wandb"]), resume=True)
    (tmp_path / "w3").mkdir()
    with pytest.raises(TinykError, match="unknown tracker 'mlflow'"):
        train(nano_cfg(pt_data, tok_dir, tmp_path / "w3", tracker=["mlflow"]))
    # A failed start leaves nothing behind (an empty --out stays empty): the corrected command needs no --force.
    assert not (tmp_path / "w2").exists() and list((tmp_path / "w3").iterdir()) == []
    capsys.readouterr()
    assert train(nano_cfg(pt_data, tok_dir, tmp_path / "w2", max_steps=1))["status"] == "completed"
    assert "finished: 1 step, " in capsys.readouterr().out


def test_a_tracker_failing_mid_run_is_dropped_and_a_killed_sessions_steps_are_not_sent_twice(
        tmp_path, pt_data, tok_dir, monkeypatch, capsys):
    """W&B's background process dying mid-run stopped the run unsaved ("Connection lost", not naming
    W&B), and was then marked finished though it held part of the run; and a resume after a kill sent W&B and SwanLab the steps they already had, which W&B refuses
    and SwanLab doubles."""  # noqa: E501
    sent, names, fail_at = [], [], [2]

    class FakeRun:
        def __init__(self):
            self.summary = {}  # W&B's run summary

        def log(self, values, step):
            if step in fail_at:
                raise ConnectionResetError("Connection lost")
            if "train/loss" in values:  # the training curve's points
                sent.append(step)

        def finish(self, exit_code=None):
            sent.append("finish" if exit_code == 0 else f"failed {exit_code}")

    fake = type(sys)("wandb")
    fake.init = lambda **kw: names.append(kw["name"]) or FakeRun()
    fake.teardown = lambda: sent.append("teardown")
    monkeypatch.setitem(sys.modules, "wandb", fake)
    out = tmp_path / "run"
    summary = train(nano_cfg(pt_data, tok_dir, out, max_steps=4, save_every=2, tracker=["wandb"]))
    # W&B shows the run failed, not finished: it holds only step 1; let go of, its exit hook printed a
    # 30-line traceback of the lost connection as the command ended.
    assert summary["status"] == "completed" and sent == [1, "failed 1", "teardown"]
    assert ("tinyk: warning: --tracker wandb failed at step 2 (Connection lost); it gets nothing more from this run, "
            "and metrics.jsonl keeps every value") in capsys.readouterr().err
    assert [r["step"] for r in records(out, "train")] == [1, 2, 3, 4]
    # Killed after logging step 4 but before saving it: the resumed session sends only what is new.
    shutil.rmtree(out / "checkpoints" / "step_0000004")
    shutil.rmtree(out / "final")
    (out / "summary.json").unlink()
    sent.clear()
    fail_at.clear()
    monkeypatch.chdir(out)
    train(nano_cfg(pt_data, tok_dir, Path("."), max_steps=6, tracker=["wandb"]), resume=True)
    assert sent == [5, 6, "finish"] and [r["step"] for r in records(out, "train")] == [1, 2, 3, 4, 5, 6]
    assert names == ["run", "run"]  # `--out .` is named after the folder, not ""
    # Killed again after step 6, its checkpoint not saved: online, W&B holds steps 3-6 and gets none of them
    # again; offline, a killed session's last steps may never have left its buffer, and are sent again.
    for offline in (False, True):
        shutil.rmtree(out / "checkpoints" / "step_0000006")
        shutil.rmtree(out / "final")
        (out / "summary.json").unlink()
        sent.clear()
        monkeypatch.setenv("WANDB_MODE", "offline" if offline else "online")
        train(nano_cfg(pt_data, tok_dir, Path("."), max_steps=6, tracker=["wandb"]), resume=True)
        assert sent == ([3, 4, 5, 6, "finish"] if offline else ["finish"]), offline


def test_a_tracker_failing_to_finish_leaves_the_others_finished(tmp_path, monkeypatch, capsys):
    """TensorBoard's close on a full disk (here W&B's finish) must not leave the next tracker's run open."""
    from tinyk.monitor import Trackers

    finished = []

    class FakeRun:
        def __init__(self):
            self.summary = {}  # W&B's run summary

        def finish(self, exit_code=None):
            raise OSError(28, "No space left on device")

    wandb, swanlab = type(sys)("wandb"), type(sys)("swanlab")
    wandb.init = lambda **kw: FakeRun()
    swanlab.init = lambda **kw: None
    swanlab.finish = lambda **kw: finished.append("swanlab")
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setitem(sys.modules, "swanlab", swanlab)
    Trackers(["wandb", "swanlab"], tmp_path, {}, "tinyk", "run").close()
    assert finished == ["swanlab"]
    assert "tinyk: warning: --tracker wandb did not finish ([Errno 28] No space left on device)" \
        in capsys.readouterr().err

    class ClosedPipe(io.StringIO):
        def write(self, s):
            raise BrokenPipeError(32, "Broken pipe")

    # Ctrl-C on `2>&1 | tee log` stops tee too: W&B's footer and tinyk's warning both met the closed pipe,
    # and SwanLab's run was left for its exit hook to mark finished.
    FakeRun.finish = lambda self, exit_code=None: print("wandb: footer", file=sys.stderr)
    finished.clear()
    trackers = Trackers(["wandb", "swanlab"], tmp_path, {}, "tinyk", "run")
    monkeypatch.setattr(sys, "stderr", ClosedPipe())
    trackers.close(130)
    assert finished == ["swanlab"]


def test_a_run_killed_twice_between_checkpoints_sends_no_tracker_a_step_twice(tmp_path, pt_data, tok_dir,
                                                                             monkeypatch):
    """The second kill's resume truncated metrics.jsonl to the checkpoint, forgetting that the first
    session had sent W&B and SwanLab steps up to 7: the third session sent 6 and 7 again."""
    sent = []

    class FakeRun:
        def __init__(self):
            self.summary = {}  # W&B's run summary

        def log(self, values, step):
            if "train/loss" in values:
                sent.append(step)

        def finish(self, exit_code=None):
            pass

    fake = type(sys)("wandb")
    fake.init = lambda **kw: FakeRun()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    out = tmp_path / "run"
    cfg = nano_cfg(pt_data, tok_dir, out, max_steps=10, save_every=2, tracker=["wandb"])
    for stop, lost in ((7, ("step_0000007", "step_0000006")), (5, ("step_0000005",))):  # killed after a line
        with monkeypatch.context() as m:
            stop_at(m, stop)
            train(cfg, resume=stop == 5)
        for name in lost:
            shutil.rmtree(out / "checkpoints" / name)
    assert sent == list(range(1, 8)) and (out / ".tracker_step").read_text() == "7\n"
    sent.clear()
    assert train(cfg, resume=True)["status"] == "completed"
    assert sent == [8, 9, 10] and [r["step"] for r in records(out, "train")] == list(range(1, 11))
    from tinyk.monitor import Monitor

    Monitor(out, 10, 0, False).truncate(0)  # started over (no checkpoint left): a new run for the trackers
    assert not (out / ".tracker_step").exists()


def test_trackers_are_told_how_the_run_ended(tmp_path, pt_data, tok_dir, monkeypatch):
    """A diverged or stopped run did not show as finished in W&B and SwanLab: each gets the command's
    exit status (SwanLab its state, and what went wrong)."""
    from tinyk.monitor import Monitor

    ends: list[tuple] = []

    class FakeRun:
        def __init__(self):
            self.summary = {}  # W&B's run summary

        def log(self, values, step):
            pass

        def finish(self, exit_code=None):
            ends.append(("wandb", exit_code))

    wandb, swanlab = type(sys)("wandb"), type(sys)("swanlab")
    wandb.init = lambda **kw: FakeRun()
    swanlab.init, swanlab.log = (lambda **kw: None), (lambda values, step: None)
    swanlab.finish = lambda state="success", error=None: ends.append(("swanlab", state, error))
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setitem(sys.modules, "swanlab", swanlab)
    both = ["--set", "tracker=[wandb, swanlab]", "--max-steps", "20", "--save-every", "0"]
    with pytest.raises(SystemExit) as e:
        main(cli_args(pt_data, tok_dir, tmp_path / "diverged", *both, "--lr", "1e9", "--set", "warmup_steps=0",
                      "--set", "log_every=1"))
    assert e.value.code == 2 and ends[0] == ("wandb", 2) and ends[1][:2] == ("swanlab", "crashed")
    assert ends[1][2].startswith("training diverged at step ")
    ends.clear()
    log_train = Monitor.log_train
    signal_at_step(monkeypatch, 2, signal.SIGTERM)
    with pytest.raises(SystemExit) as e:
        main(cli_args(pt_data, tok_dir, tmp_path / "stopped", *both, "--log-every", "1"))
    assert e.value.code == 143 and ends == [("wandb", 143), ("swanlab", "aborted", "tinyk exited with status 143")]
    ends.clear()
    monkeypatch.setattr(Monitor, "log_train", log_train)
    train(nano_cfg(pt_data, tok_dir, tmp_path / "done", max_steps=2, tracker=["wandb", "swanlab"]))
    assert ends == [("wandb", 0), ("swanlab", "success", None)]


def test_a_tracker_refusing_a_setting_names_it(tmp_path, monkeypatch):
    """SwanLab checks its settings with pydantic, whose first line ("1 validation error for Settings")
    says nothing; and offline mode is not advised to a run already in it."""
    import pydantic

    from tinyk.monitor import Trackers

    class Settings(pydantic.BaseModel):
        name: str = pydantic.Field(pattern=r"^[0-9a-zA-Z_\-+.]+$")

    swanlab = type(sys)("swanlab")
    swanlab.init = lambda **kw: Settings(name=kw["project"])
    monkeypatch.setitem(sys.modules, "swanlab", swanlab)
    monkeypatch.setenv("SWANLAB_MODE", "offline")
    with pytest.raises(TinykError) as e:
        Trackers(["swanlab"], tmp_path, {}, "bad/name", "run")
    assert str(e.value) == ("--tracker swanlab could not start: name: String should match pattern "
                            "'^[0-9a-zA-Z_\\-+.]+$'")


def test_a_run_folder_named_in_gbk_gives_the_trackers_a_text_name(tmp_path, pt_data, tok_dir, monkeypatch):
    """The default run name is the folder's: bytes that are not UTF-8 (a GBK name) become U+FFFD, which
    a tracker can send, not lone surrogates, which W&B and SwanLab refuse."""
    names = []

    class FakeRun:
        def __init__(self):
            self.summary = {}  # W&B's run summary

        def log(self, values, step):
            pass

        def finish(self, exit_code=None):
            pass

    wandb = type(sys)("wandb")
    wandb.init = lambda **kw: names.append(kw["name"]) or FakeRun()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    gbk = os.fsdecode(b"\xbb\xf9\xd7\xf9")  # 基座 in GBK
    train(nano_cfg(pt_data, tok_dir, tmp_path / gbk, max_steps=1, tracker=["wandb"]))
    assert names == ["\ufffd" * 4]


def test_ctrl_c_while_the_run_starts_leaves_the_directory_as_it_was(tmp_path, pt_data, tok_dir, monkeypatch):
    """Set-up ends with timing the CPU's matmul peak, long enough for a Ctrl-C after spotting a typo."""
    import tinyk.train

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    real_peak = tinyk.train.peak_flops
    monkeypatch.setattr(tinyk.train, "peak_flops", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(nano_cfg(pt_data, tok_dir, tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    # --force over a finished run: the old run is deleted only once the new one has started.
    monkeypatch.setattr(tinyk.train, "peak_flops", real_peak)
    old = tmp_path / "old"
    train(nano_cfg(pt_data, tok_dir, old, max_steps=2, save_every=1))
    before = {p.relative_to(old): p.read_bytes() for p in old.rglob("*") if p.is_file()}
    monkeypatch.setattr(tinyk.train, "peak_flops", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(nano_cfg(pt_data, tok_dir, old, max_steps=3, lr=1e-4), force=True)
    assert {p.relative_to(old): p.read_bytes() for p in old.rglob("*") if p.is_file()} == before
    monkeypatch.setattr(tinyk.train, "peak_flops", real_peak)
    assert train(nano_cfg(pt_data, tok_dir, old, max_steps=3), force=True)["steps"] == 3
    assert sorted(p.name for p in old.iterdir() if p.name.startswith(".")) == []
    assert [p.name for p in (old / "checkpoints").iterdir()] == ["step_0000003"]


# ----------------------------------------------------------------------------- set-up errors

def _edited_meta(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    meta = json.loads((dst / "meta.json").read_text())
    meta.update(changes)
    (dst / "meta.json").write_text(json.dumps(meta))
    return dst


def test_setup_errors_are_one_line(tmp_path, pt_data, sft_data, tok_dir, nano_model_dir, corpus_file):
    def err(**kw) -> str:
        with pytest.raises(TinykError) as e:
            train(nano_cfg(**{"data": pt_data, "tok": tok_dir, "out": tmp_path / "o", **kw}))
        assert "\n" not in str(e.value)
        return str(e.value)

    other = _edited_meta(pt_data, tmp_path / "other", tokenizer_hash="0" * 16, vocab_size=600)
    n = load_tokenizer(tok_dir).vocab_size
    assert f"was tokenized with another tokenizer than {tok_dir} (vocab 600 vs {n})" in err(data=other)
    same_size = _edited_meta(pt_data, tmp_path / "same", tokenizer_hash="0" * 16)
    assert f"(both of vocab {n}, with other merges or normalisation)" in err(data=same_size)
    assert "tokens but the model's vocab_size is 256" in err(model={"preset": "nano", "vocab_size": 256})
    assert "seq_len 256 exceeds the model's context of 128 tokens" in err(seq_len=256)
    assert "invalid model config: n_heads must be a positive integer, got 0" \
        in err(model={"preset": "nano", "n_heads": 0})
    assert "invalid model config: need 0 < norm_eps < 1" in err(data=sft_data, kind="sft",
                                                                init=str(nano_model_dir), model={"dropout": 2})
    assert "got 1e-05, inf, 0.0" in err(model={"preset": "nano", "rope_theta": math.inf})
    assert err(model={"n_layers": 2, "n_heads": 4}) == (  # it said "no model" of a config with a model section
        "the model section (n_heads, n_layers) names neither a preset nor a dim: add model.preset (seed-215m, "
        "seed-82m, tiny, nano) to change a preset, or model.dim to describe a model of your own")
    assert "holds sft data; tinyk pretrain needs pretrain data" in err(data=sft_data)
    (tmp_path / "notmodel").mkdir()
    assert "is not a model directory" in err(data=sft_data, kind="sft", init=str(tmp_path / "notmodel"), model={})
    assert "tinyk sft needs --init" in err(data=sft_data, kind="sft")
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"text": "短"}) + "\n")
    tiny_data = tmp_path / "tinydata"
    prepare_pretrain([short], tok_dir, tiny_data, val_fraction=0.0, workers=1, show_progress=False)
    assert "fewer than seq_len + 1" in err(data=tiny_data)
    for name in ("metrics.jsonl", "config.yaml"):  # a config.yaml of the user's alone does not make a run
        (tmp_path / "o").mkdir()
        (tmp_path / "o" / name).write_text("lr: 0.001\n")
        (tmp_path / "o" / "notes.md").write_text("")
        for kw in ({}, {"force": True}, {"resume": True}):
            with pytest.raises(TinykError, match=rf"holds {name} but is not a tinyk run \(a run has a config.yaml and "
                                                 rf"checkpoints/\): its files would be overwritten; choose another"):
                train(nano_cfg(pt_data, tok_dir, tmp_path / "o"), **kw)
        assert (tmp_path / "o" / name).read_text() == "lr: 0.001\n"
        shutil.rmtree(tmp_path / "o")
    for other, what in ((nano_model_dir, "a model directory"), (pt_data, "a tinyk data directory"),
                        (tok_dir, "a tokenizer directory")):
        copy = shutil.copytree(other, tmp_path / "o")
        assert f"--out {copy} is {what}, not a run directory; choose another --out" in err(out=copy)
        shutil.rmtree(copy)
    # An output that would replace (or write into) an input is refused, --force or not.
    assert "would replace the input" in err(out=pt_data.parent)
    assert "lies inside the input" in err(out=tok_dir / "run")
    run = tmp_path / "base"
    train(nano_cfg(pt_data, tok_dir, run, max_steps=1))
    with pytest.raises(TinykError, match="would replace the input"):
        train(nano_cfg(sft_data, None, run, kind="sft", init=str(run), model={}, seq_len=128), force=True)
    assert (run / "final" / "model.safetensors").is_file()
    assert "conflicts with" in err(init=str(nano_model_dir), model={"dim": 32})


def test_a_model_larger_than_memory_is_refused_before_it_is_built(tmp_path, pt_data, tok_dir, monkeypatch):
    """Weights, gradients and AdamW state take 16 bytes a parameter: a model needing more than the
    memory free was built for minutes, then killed by the system without a word."""
    from tinyk import train as train_module

    n = Transformer(replace(preset_config("nano"), vocab_size=load_tokenizer(tok_dir).vocab_size)).num_params()
    built = []
    init = Transformer.__init__
    monkeypatch.setattr(Transformer, "__init__", lambda self, *a, **kw: built.append(torch.empty(0).device.type)
                        or init(self, *a, **kw))
    monkeypatch.setattr(train_module, "memory_available", lambda: 15 * n)
    with pytest.raises(TinykError, match=rf"the model's {n:,} parameters need {16 * n / 2**30:.1f} GiB for fp32 "
                                         r"weights, gradients and AdamW state alone, more than the 0.0 GiB this "
                                         r"machine has available: choose a smaller model \(`tinyk plan` sizes one\)$"):
        train(nano_cfg(pt_data, tok_dir, tmp_path / "o"))
    assert "cpu" not in built and not (tmp_path / "o").exists()  # sized on the meta device only
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two processes on this host: each holds a copy
    monkeypatch.setattr(train_module, "memory_available", lambda: 17 * n)
    with pytest.raises(TinykError, match=f"the model's {n:,} parameters need"):
        train(nano_cfg(pt_data, tok_dir, tmp_path / "o"))
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert train(nano_cfg(pt_data, tok_dir, tmp_path / "o", max_steps=1))["steps"] == 1 and "cpu" in built


def test_out_of_memory_names_the_knob(tmp_path, pt_data, tok_dir, monkeypatch, capsys):
    def boom(self, *a, **kw):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Transformer, "forward", boom)
    # Only the knobs that would change something: FSDP shards nothing in one process.
    with pytest.raises(TinykError) as e:
        train(nano_cfg(pt_data, tok_dir, tmp_path / "o", parallel="fsdp"))
    assert str(e.value).endswith("out of GPU memory at micro-batch 8 x seq_len 32 (float32): lower --micro-batch "
                                 "(try 4), add --activation-checkpointing, or use a shorter --seq-len")
    with pytest.raises(TinykError) as e:
        train(nano_cfg(pt_data, tok_dir, tmp_path / "o", activation_checkpointing=True))
    assert str(e.value).endswith("(float32): lower --micro-batch (try 4), or use a shorter --seq-len")
    monkeypatch.setattr(Transformer, "forward", lambda self, *a, **kw: torch.empty(2**62, dtype=torch.uint8))
    with pytest.raises(TinykError, match=r"^out of CPU memory \(asked for 4,611,686,018.4 GB\) at micro-batch 8 "):
        train(nano_cfg(pt_data, tok_dir, tmp_path / "o"))
    # A model too large to build is one line too, not a traceback.
    monkeypatch.setattr(Transformer, "__init__", lambda self, *a, **kw: torch.empty(2**62, dtype=torch.uint8))
    with pytest.raises(SystemExit) as e:
        main(cli_args(pt_data, tok_dir, tmp_path / "o"))
    assert e.value.code == 2 and capsys.readouterr().err == (
        "tinyk: error: out of CPU memory (asked for 4,611,686,018.4 GB): a smaller model, batch or sequence length "
        "fits\n")
    assert not (tmp_path / "o").exists()
    numpy = "Unable to allocate 3.00 GiB for an array"
    for error, said in ((MemoryError(numpy), f" ({numpy})"), (MemoryError(), "")):
        def no_room(self, *a, error=error, **kw):
            raise error

        monkeypatch.setattr(Transformer, "__init__", no_room)  # numpy's or Python's own: a traceback
        with pytest.raises(SystemExit) as e:
            main(cli_args(pt_data, tok_dir, tmp_path / "o"))
        assert e.value.code == 2 and capsys.readouterr().err == f"tinyk: error: out of memory{said}\n"


def test_token_ids_past_the_vocabulary_are_one_line_not_an_index_error(tmp_path, pt_data, sft_data, tok_dir,
                                                                        nano_model_dir):
    """A shard damaged after it was written (a flipped byte): on CUDA the embedding's device-side assert
    kills the process; here it was an IndexError traceback."""
    for data, kind in ((pt_data, "pretrain"), (sft_data, "sft")):
        bad = Path(shutil.copytree(data, tmp_path / f"bad_{kind}"))
        meta = json.loads((bad / "meta.json").read_text())
        shard = next((bad / "train").glob("*.bin")) if kind == "pretrain" else bad / "train" / "tokens.bin"
        ids = np.fromfile(shard, dtype=meta["dtype"])
        ids[::7] = 60000
        ids.tofile(shard)
        extra = {"init": str(nano_model_dir), "model": {}, "seq_len": 64} if kind == "sft" else {}
        with pytest.raises(TinykError, match=rf"^{re.escape(str(bad / 'train'))} holds token id 60000, past the "
                                             rf"tokenizer's vocabulary of {meta['vocab_size']}: the data is damaged; "
                                             rf"re-run tinyk data$"):
            train(nano_cfg(bad, None if kind == "sft" else tok_dir, tmp_path / f"run_{kind}", kind=kind, **extra))


def test_a_checkpoints_checksum_list_is_checked_before_it_is_trusted(tmp_path):
    """state.json's `files` is read from the disk like the rest: a list there was a traceback, a path
    out of the checkpoint was read and called a mismatch, a file gone was an errno with its full path."""
    (tmp_path / "a.bin").write_bytes(b"x")
    entry = {"bytes": 1, "sha256": "0"}
    for files, why in (([1], "^state.json has files "), ("x", "^state.json has files "),
                       ({"../a.bin": entry}, "which is not in the checkpoint"),
                       ({"/etc/hostname": entry}, "which is not in the checkpoint"),
                       ({"gone.pt": entry}, "^gone.pt is missing$")):
        with pytest.raises(ValueError, match=why):
            _check_sums(tmp_path, files)


def test_every_file_of_a_checkpoint_is_checksummed(tmp_path, pt_data, tok_dir):
    out = tmp_path / "run"
    train(nano_cfg(pt_data, tok_dir, out, max_steps=1, save_every=1))
    ckpt = checkpoints(out)[-1]
    files = json.loads((ckpt / "state.json").read_text())["files"]
    on_disk = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file()} - {"state.json"}
    assert set(files) == on_disk and {"rng.pt", "optimizer.pt", "config.yaml", "model/model.safetensors"} <= on_disk
    shutil.rmtree(out / "final")
    (ckpt / "rng.pt").unlink()
    with pytest.raises(TinykError, match=rf"checkpoint {re.escape(str(ckpt))} is damaged \(rng.pt is missing\)"):
        train(nano_cfg(pt_data, tok_dir, out, max_steps=2), resume=True)


def test_a_finished_run_on_a_read_only_disk_still_resumes_to_its_summary(tmp_path, pt_data, tok_dir, monkeypatch):
    """An archived run on a read-only mount has nothing to write: its resume is its summary, not a refusal
    from the check that the checkpoints folder is writable."""
    import errno
    import tempfile

    out = tmp_path / "run"
    train(nano_cfg(pt_data, tok_dir, out, max_steps=2, save_every=1))

    def read_only(*args, dir=None, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(Path(dir) / ".x.tmp-1"))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    assert train(nano_cfg(pt_data, tok_dir, out, max_steps=2), resume=True)["steps"] == 2


def test_a_damaged_checkpoint_is_named_with_the_way_out(tmp_path, pt_data, tok_dir, capsys):
    out = tmp_path / "run"
    train(nano_cfg(pt_data, tok_dir, out, max_steps=4, save_every=2, keep_checkpoints=5))
    newest = checkpoints(out)[-1]
    # First as a checkpoint of a tinyk before file checksums: the loaders' own checks name the damage.
    with_sums = (newest / "state.json").read_text()
    (newest / "state.json").write_text(json.dumps({k: v for k, v in json.loads(with_sums).items() if k != "files"}))
    damage = [lambda: (newest / "state.json").write_text("{"), lambda: (newest / "state.json").write_text("[]"),
              lambda: (newest / "optimizer.pt").write_bytes(b"x"),
              lambda: (newest / "optimizer.pt").write_bytes(b""), lambda: (newest / "rng.pt").write_bytes(b""),
              lambda: (newest / "rng.pt").unlink(),
              lambda: (newest / "model" / "model.safetensors").write_bytes(b"\0" * 100),
              lambda: (newest / "state.json").write_text((newest / "state.json").read_text().replace(
                  '"step": 4', '"step": "4"')),
              lambda: (newest / "state.json").write_text(re.sub(r'"tokens": \d+', '"tokens": true',
                                                                (newest / "state.json").read_text())),
              # the schedule's fields, which are read after the files are restored
              *(lambda old=old, new=new: (newest / "state.json").write_text(
                  (newest / "state.json").read_text().replace(old, new))
                for old, new in (('"total_steps": 4', '"total_steps": "4"'), ('"warmup": 2', '"warmup": 2.5'),
                                 ('"lr": 0.003', '"lr": null'), ('"lr_schedule": "cosine"', '"lr_schedule": 1'))),
              lambda: shutil.rmtree(newest / "model")]
    for i, spoil in enumerate(damage):
        shutil.rmtree(out / "final", ignore_errors=True)
        copy = Path(shutil.copytree(newest, tmp_path / f"keep{i}"))
        spoil()
        with pytest.raises(TinykError, match=f"checkpoint {newest} is damaged .*; delete it to resume from the one "
                                             f"before, or start over with --force") as e:
            train(nano_cfg(pt_data, tok_dir, out, max_steps=6), resume=True)
        assert "\n" not in str(e.value) and "weights_only" not in str(e.value)  # torch's advice is unsafe here
        assert "checksum" not in str(e.value)
        shutil.rmtree(newest)
        shutil.copytree(copy, newest)
    (newest / "state.json").write_text(with_sums)
    # Numbers changed inside a file whose structure holds (a flipped bit on the disk or in a copy): resumed
    # from without a word, until the files' sizes and checksums were recorded.
    for name in ("optimizer.pt", "model/model.safetensors"):
        spoiled = newest / name
        size = spoiled.stat().st_size
        with open(spoiled, "r+b") as f:
            f.seek(size // 2)
            original = f.read(8)
            f.seek(size // 2)
            f.write(bytes(b ^ 0xFF for b in original))
        with pytest.raises(TinykError, match=f"checkpoint {newest} is damaged \\({name} differs from the checksum "
                                             f"state.json records: it changed on the disk or in a copy\\); delete it"):
            train(nano_cfg(pt_data, tok_dir, out, max_steps=6), resume=True)
        with open(spoiled, "r+b") as f:
            f.seek(size // 2)
            f.write(original)
    # The data's place: "invalid data loader state {...}" and "damaged ('loader')" said neither which nor how.
    saved = json.loads((newest / "state.json").read_text())
    for state, why in (({k: v for k, v in saved.items() if k != "loader"}, "'loader' missing"),
                       ({**saved, "loader": {**saved["loader"], "cursor": 10**6}}, "its data loader is at epoch ")):
        (newest / "state.json").write_text(json.dumps(state))
        with pytest.raises(TinykError, match=f"checkpoint {newest} is damaged \\({why}.*; delete it to resume"):
            train(nano_cfg(pt_data, tok_dir, out, max_steps=6), resume=True)
    (newest / "state.json").write_text(json.dumps(saved))
    # The only checkpoint: deleting it, as that advised, made --resume start the run anew.
    only = tmp_path / "only"
    shutil.copytree(out, only)
    shutil.rmtree(checkpoints(only)[0])
    (checkpoints(only)[-1] / "optimizer.pt").write_bytes(b"")
    with pytest.raises(TinykError) as e:
        train(nano_cfg(pt_data, tok_dir, only, max_steps=6), resume=True)
    assert str(e.value).endswith(
        f"; it is the run's only one (deleted, --resume would start the run anew): train on from its model/, if that "
        f"is whole, in a new run (--init {checkpoints(only)[-1] / 'model'}), or start over with --force")
    (out / "config.yaml").write_text("")
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--out", str(out), "--resume"])
    assert e.value.code == 2 and capsys.readouterr().err.strip() == (
        f"tinyk: error: {out / 'config.yaml'} is empty (it holds no config keys); each checkpoint keeps a copy: cp "
        f"{newest / 'config.yaml'} "
        f"{out / 'config.yaml'}")
    (out / "config.yaml").unlink()  # deleted: the same way back, with or without the data named again
    for args in ([], cli_args(pt_data, tok_dir, out)[1:]):
        with pytest.raises(SystemExit) as e:
            main(["pretrain", "--out", str(out), "--resume", *args])
        assert e.value.code == 2 and capsys.readouterr().err.strip() == (
            f"tinyk: error: run directory {out} has no config.yaml; each checkpoint keeps a copy: cp "
            f"{newest / 'config.yaml'} {out / 'config.yaml'}")


def test_a_run_killed_before_it_logged_anything_does_not_block_the_same_command(tmp_path, pt_data, tok_dir, capsys,
                                                                                  monkeypatch):
    """kill -9 during set-up left config.yaml and an empty checkpoints/, and the same command was then
    refused as an existing run; one that logged steps is still the user's to resume or replace."""
    out = tmp_path / "run"
    args = cli_args(pt_data, tok_dir, out, "--max-steps", "2", "--set", "eval_every=0")
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 0
    for p in out.iterdir():  # what a kill right after the start leaves
        if p.name not in ("config.yaml", "checkpoints"):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    shutil.rmtree(out / "checkpoints")
    (out / "checkpoints").mkdir()
    with monkeypatch.context() as m:  # without locks (some network filesystems) it may be a run still setting up
        m.setattr("tinyk.outputs.DirLock.acquire", lambda self: True)
        with pytest.raises(SystemExit) as e:
            main(args)
        assert e.value.code == 2 and "exists (use --resume to continue it or --force to start over)" in \
            capsys.readouterr().err and sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.yaml"]
    if importlib.util.find_spec("wandb") is None:  # a start that fails leaves it as it was, for --resume too
        with pytest.raises(SystemExit) as e:
            main([*args, "--resume", "--tracker", "wandb"])
        assert e.value.code == 2 and sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.yaml"]
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 0 and (out / "final" / "model.safetensors").is_file(), capsys.readouterr().err
    shutil.rmtree(out / "checkpoints")
    shutil.rmtree(out / "final")
    (out / "checkpoints").mkdir()  # metrics.jsonl stays: steps were logged
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2 and "exists (use --resume to continue it or --force to start over)" in \
        capsys.readouterr().err


def test_tokenizer_flags_take_a_run_directory_as_model_flags_do(tmp_path, pt_data, tok_dir, corpus_file, capsys):
    """`tinyk data sft --tokenizer runs/base` was refused ("runs/base/final is one") where --init and --model
    take a run directory to mean its final/ model, which holds the tokenizer."""
    run = tmp_path / "base"
    with pytest.raises(SystemExit) as e:
        main(cli_args(pt_data, tok_dir, run, "--max-steps", "1", "--set", "eval_every=0"))
    assert e.value.code == 0
    with pytest.raises(SystemExit) as e:
        main(["data", "pretrain", "--input", str(corpus_file), "--tokenizer", str(run), "--out", str(tmp_path / "d")])
    assert e.value.code == 0, capsys.readouterr().err
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    assert meta["tokenizer_hash"] == json.loads((pt_data / "meta.json").read_text())["tokenizer_hash"]


def test_cli_prints_one_line(tmp_path, pt_data, tok_dir, capsys):
    with pytest.raises(SystemExit) as e:
        main(cli_args(pt_data, tok_dir, tmp_path / "o", "--seq-len", "4096"))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.count("\n") == 0 and err.startswith("tinyk: error: seq_len 4096 exceeds")
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--out", str(tmp_path / "typo"), "--resume"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err == (f"tinyk: error: nothing to resume in {tmp_path / 'typo'} (no config.yaml "
                                         f"there); check --out, or start a new run without --resume")
    with pytest.raises(SystemExit) as e:
        main(cli_args(pt_data, tok_dir, tmp_path / "o", "--resume", "--force"))
    assert e.value.code == 2 and capsys.readouterr().err == ("tinyk: error: --resume continues the run in --out and "
                                                            "--force starts it over: give one of them\n")
    assert not (tmp_path / "o").exists()
    capsys.readouterr()
    # Settings the trainer had to bend, or that make no sense, are said in the header.
    with pytest.raises(SystemExit) as e:
        main(cli_args(pt_data, tok_dir, tmp_path / "o2", "--max-steps", "2", "--micro-batch", "3", "--resume",
                      "--set", "eval_every=0", "--set", "warmup_steps=5"))
    out = capsys.readouterr().out
    assert e.value.code == 0 and (tmp_path / "o2" / "final" / "model.safetensors").is_file()
    assert "--resume: no checkpoint in" in out \
        and "micro_batch 3 does not divide the 8 sequences per process; using 2" in out
    assert "warmup 5 is not shorter than the run's 2 steps" in out
    with pytest.raises(SystemExit) as e:  # the epoch budget rounds up to a step, which holds the data 4 times
        main(cli_args(pt_data, tok_dir, tmp_path / "o3", "--batch-size", "1024", "--epochs", "1",
                      "--set", "eval_every=0", "--set", "warmup_steps=0"))
    out = capsys.readouterr().out
    note = re.search(r"note: a batch of 1,024 is more than the data's (\d+) training sequences at seq_len 32: each "
                     r"step goes through the data ([\d.]+) times, so the run trains ([\d.]+) epochs in 1 step$",
                     out, re.M)
    assert e.value.code == 0 and note, out
    assert float(note[2]) == float(note[3]) == round(1024 / int(note[1]), 1) > 1
    # A budget smaller than one step is trained as one step, which says so (--max-tokens 100 trained 256).
    for budget in (["--max-tokens", "100"], ["--epochs", "0.0001"]):
        with pytest.raises(SystemExit) as e:
            main(cli_args(pt_data, tok_dir, tmp_path / "o5", *budget, "--force", "--set", "eval_every=0"))
        out = capsys.readouterr().out
        assert e.value.code == 0 and (f"note: {' '.join(budget)} is less than one step of 8 sequences (256 tokens "
                                      f"at seq_len 32): the run trains one step\n") in out, out
        assert json.loads((tmp_path / "o5" / "summary.json").read_text())["steps"] == 1
    with pytest.raises(SystemExit) as e:
        main(cli_args(pt_data, tok_dir, tmp_path / "o5", "--max-tokens", "256", "--force", "--set", "eval_every=0"))
    assert e.value.code == 0 and "less than one step" not in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(cli_args(pt_data, tok_dir, tmp_path / "o2", "--max-steps", "2", "--resume"))
    assert e.value.code == 0 and "the run is already complete at step 2, the end of --max-steps 2: raise " \
                                 "--max-steps to train further" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:  # a smaller budget than it ran: its header keeps the run's own length
        main(cli_args(pt_data, tok_dir, tmp_path / "o2", "--max-steps", "1", "--resume"))
    out = capsys.readouterr().out
    assert e.value.code == 0 and "the run is already complete at step 2, past the end of --max-steps 1: raise " \
                                 "--max-steps to train further" in out and "; 2 steps (512 tokens)" in out, out
    with pytest.raises(SystemExit) as e:  # the budget that ended it is the one to raise, not --max-steps
        main(cli_args(pt_data, tok_dir, tmp_path / "o3", "--max-steps", "1000", "--resume"))
    assert e.value.code == 0 and "the run is already complete at step 1, the end of --epochs 1: raise --epochs to " \
                                 "train further" in capsys.readouterr().out
    shutil.rmtree(tmp_path / "o3" / "final")  # its final save failed (a full disk): --resume makes it, and says so
    with pytest.raises(SystemExit) as e:
        main(cli_args(pt_data, tok_dir, tmp_path / "o3", "--max-steps", "1000", "--resume"))
    assert e.value.code == 0 and "raise --epochs to train further; its final/ is saved now" in \
        capsys.readouterr().out and (tmp_path / "o3" / "final" / "model.safetensors").is_file()
    # A finished run made longer: its cosine is re-fitted, so the LR climbs back up, and the header says so.
    main_ok = ("--set", "eval_every=0", "--set", "warmup_steps=0")
    with pytest.raises(SystemExit) as e:
        main(cli_args(pt_data, tok_dir, tmp_path / "o4", "--max-steps", "2", *main_ok))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(cli_args(pt_data, tok_dir, tmp_path / "o4", "--max-steps", "6", "--log-every", "1", "--resume"))
    note = re.search(r"^note: the run is now 6 steps long, not 2, so the LR schedule is re-fitted: step 3 trains at "
                     r"LR (\S+), where the old schedule was at (\S+)$", capsys.readouterr().out, re.M)
    assert e.value.code == 0 and note and float(note[1]) > 2 * float(note[2])
    logged = [json.loads(line) for line in (tmp_path / "o4" / "metrics.jsonl").read_text().splitlines()]
    assert [f"{r['lr']:.3g}" for r in logged if r.get("step") == 3 and "lr" in r] == [note[1]]
    # A new --lr changes the schedule too: said, with the old schedule's rate at its own peak (it was
    # computed at the new peak).
    with pytest.raises(SystemExit) as e:
        main(cli_args(pt_data, tok_dir, tmp_path / "o4", "--max-steps", "8", "--lr", "0.05", "--resume"))
    note = re.search(r"^note: the run is now 8 steps long, not 6, and lr is 0.05, so the LR schedule is re-fitted: "
                     r"step 7 trains at LR (\S+), where the old schedule was at (\S+)$", capsys.readouterr().out, re.M)
    logged = [json.loads(line) for line in (tmp_path / "o4" / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: f"{r['lr']:.3g}" for r in logged if "lr" in r}
    assert e.value.code == 0 and note and (note[1], note[2]) == (lrs[7], lrs[6]), (note, lrs)


def test_switches_a_saved_config_turned_on_can_be_turned_off_on_resume(tmp_path, pt_data, tok_dir):
    """--no-progress, --compile and --activation-checkpointing are saved with the run; each has its opposite."""
    from tinyk.cli import build_parser

    out = tmp_path / "r"
    train(nano_cfg(pt_data, tok_dir, out, max_steps=1, progress=False, activation_checkpointing=True))
    args = build_parser().parse_args(["pretrain", "--out", str(out), "--resume", "--progress", "--no-compile",
                                      "--no-activation-checkpointing"])
    flags = {"out": args.out, "progress": args.progress, "compile": args.compile,
             "activation_checkpointing": args.activation_checkpointing}
    cfg = resolve_config("pretrain", flags=flags, resume=True)
    assert (cfg.progress, cfg.compile, cfg.activation_checkpointing) == (True, False, False)
    args = build_parser().parse_args(["pretrain", "--out", str(out), "--resume"])
    assert (args.progress, args.compile, args.activation_checkpointing) == (None, None, None)  # the saved ones


def test_sample_and_keep_best_flags_are_saved_and_turned_off_on_resume(tmp_path, pt_data, tok_dir, capsys):
    from tinyk.cli import main

    out = tmp_path / "r"
    with pytest.raises(SystemExit) as e:
        main(cli_args(pt_data, tok_dir, out, "--max-steps", "1", "--sample", "我们", "--sample", "The", "--keep-best"))
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert e.value.code == 0 and (saved["sample_prompts"], saved["keep_best"]) == (["我们", "The"], True)
    assert (out / "best").is_dir() and "step 1 sample: 我们 → " in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(cli_args(pt_data, tok_dir, out, "--max-steps", "2", "--resume", "--no-keep-best"))
    assert e.value.code == 0 and yaml.safe_load((out / "config.yaml").read_text())["keep_best"] is False
    # Prompts are text as written: not a comma list (as --tracker is), not stripped, none empty.
    flags = {"out": str(tmp_path / "x"), "data": str(pt_data), "sample_prompts": [" The quick "]}
    assert resolve_config("pretrain", flags=flags).sample_prompts == [" The quick "]
    assert resolve_config("pretrain", flags=flags, sets=["sample_prompts=Hello, world"]).sample_prompts == [
        "Hello, world"]
    for bad, said in ((["--sample", " "], "sample_prompts must not hold an empty prompt"),
                      (["--set", "sample_prompts=[null]"], "config key sample_prompts: [None] is not a valid list")):
        with pytest.raises(SystemExit) as e:
            main(cli_args(pt_data, tok_dir, tmp_path / "bad", "--max-steps", "1", *bad))
        assert e.value.code == 2 and said in capsys.readouterr().err


def test_an_init_model_trains_at_its_own_context_unless_told_otherwise(tmp_path, pt_data, nano_model_dir, capsys):
    """Without --preset nothing set seq_len: it was 512, which a 128-token model refused."""
    base = ["pretrain", "--init", str(nano_model_dir), "--data", str(pt_data), "--max-steps", "1", "--batch-size", "2",
            "--no-progress", "--set", "eval_every=0"]
    with pytest.raises(SystemExit) as e:
        main([*base, "--out", str(tmp_path / "a")])
    assert e.value.code == 0 and yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())["seq_len"] == 128
    with pytest.raises(SystemExit) as e:
        main([*base, "--out", str(tmp_path / "b"), "--seq-len", "32"])
    assert e.value.code == 0 and yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())["seq_len"] == 32


def test_a_resume_continues_the_run_whose_config_it_read(tmp_path, monkeypatch):
    """A run copied to Ry keeps `out: Rx` in its config.yaml: resumed as Ry (here --config's out), it trained
    Rx. And the note on what the saved config outranks took the same data path, written two ways, for an edit."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "Ry").mkdir()
    (tmp_path / "Ry" / "config.yaml").write_text(yaml.safe_dump({
        "kind": "pretrain", "out": str(tmp_path / "Rx"), "data": str(tmp_path / "data"), "model": {"preset": "nano"},
        "lr": 0.001, "tokenizer": str(tmp_path / "tokA")}))
    (tmp_path / "c.yaml").write_text("out: Ry\ndata: data\nlr: 0.01\ntokenizer: tokB\n")
    notes: list[str] = []
    cfg = resolve_config("pretrain", config="c.yaml", resume=True, notes=notes)
    assert cfg.out == "Ry" and cfg.lr == 0.001 and cfg.tokenizer == str(tmp_path / "tokA")
    assert notes == ["note: on --resume the run's saved Ry/config.yaml outranks --config c.yaml, so lr stays 0.001 "
                     "(not 0.01); pass a flag or --set to change it",
                     "note: on --resume the model and tokenizer are the checkpoint's, so --config c.yaml's tokenizer "
                     "is not read (to start from other weights, begin a new run with --init)"]


def test_a_preset_named_on_resume_is_said_not_to_be_read_and_relabels_nothing(tmp_path):
    """The model is the checkpoint's: --preset tiny on a nano run changed nothing without a word, and
    --set model.preset=tiny wrote `preset: tiny` above nano's shape into config.yaml."""
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({
        "kind": "pretrain", "out": str(run), "data": str(tmp_path), "model": {"preset": "nano", "dim": 64}}))
    said = ("note: on --resume the model and its settings are the run's, so preset tiny is not read (to train "
            "another model, begin a new run)")
    for how in (dict(preset="tiny"), dict(sets=["model.preset=tiny"]), dict(preset="nano")):
        notes: list[str] = []
        cfg = resolve_config("pretrain", flags={"out": str(run)}, resume=True, notes=notes, **how)
        assert cfg.model == {"preset": "nano", "dim": 64}
        assert notes == ([] if how.get("preset") == "nano" else [said]), how


def test_a_config_file_edited_before_resume_is_said_to_be_outranked(tmp_path, pt_data, tok_dir, capsys):
    """The saved run config outranks --config (so a resume keeps the flags the run began with); an edit
    to the file is then not silently dropped."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("max_steps: 2\nlr: 1.0e-3\neval_every: 0\n")
    with pytest.raises(SystemExit) as e:
        main(cli_args(pt_data, tok_dir, tmp_path / "r", "--config", str(cfg)))
    assert e.value.code == 0
    capsys.readouterr()
    cfg.write_text("max_steps: 3\nlr: 1.0e-5\neval_every: 0\n")
    with pytest.raises(SystemExit) as e:
        main(cli_args(pt_data, tok_dir, tmp_path / "r", "--config", str(cfg), "--resume", "--max-steps", "3"))
    err = capsys.readouterr().err
    assert e.value.code == 0 and err == (f"note: on --resume the run's saved {tmp_path / 'r' / 'config.yaml'} outranks "
                                         f"--config {cfg}, so lr stays 0.001 (not 1e-05); pass a flag or --set to "
                                         f"change it\n")


def test_a_run_extended_stopped_and_resumed_with_its_old_budget_writes_its_final_model(tmp_path, pt_data, tok_dir,
                                                                                        monkeypatch):
    """final/ from the first finish (step 3) is not the model of a run stopped at step 5 after being extended:
    resumed with a budget of 5, the run is finished only once final/ holds step 5."""
    out = tmp_path / "run"
    train(nano_cfg(pt_data, tok_dir, out, max_steps=3))
    with monkeypatch.context() as m:
        stop_at(m, 5)
        assert train(nano_cfg(pt_data, tok_dir, out, max_steps=8), resume=True)["status"] == "interrupted"
    # A budget below the steps done cannot be kept: ending at step 5 mid-schedule as "complete" is refused,
    # a token budget's too (it was taken as spent, ending the run at step 5 as complete).
    for budget, said in ((dict(max_steps=4), "--max-steps 4 ends this run at step 4"),
                         (dict(max_steps=None, max_tokens=3 * 8 * 32), "--max-tokens 768 ends this run at step 3")):
        with pytest.raises(TinykError) as e:
            train(nano_cfg(pt_data, tok_dir, out, **budget), resume=True)
        assert str(e.value) == (f"{said}, but it stopped at step 5 of the 8 it planned: raise "
                                f"{said.split()[0]} to go on, or use the checkpoint's model/ as it is")
    summary = train(nano_cfg(pt_data, tok_dir, out, max_steps=5), resume=True)
    assert (summary["status"], summary["steps"], summary["final_model"]) == ("completed", 5, str(out / "final"))
    final, saved = (load_file(d / "model.safetensors") for d in (out / "final", checkpoints(out)[-1] / "model"))
    assert checkpoints(out)[-1].name == "step_0000005" and all(torch.equal(final[k], saved[k]) for k in saved)
    # Finished now: resumed again it changes nothing, and starts no tracker only to log nothing.
    again = train(nano_cfg(pt_data, tok_dir, out, max_steps=5, tracker=["tensorboard"]), resume=True)
    assert again == summary and not (out / "tensorboard").exists()


def test_a_finished_run_being_extended_is_not_summarised_as_completed(tmp_path, pt_data, tok_dir, monkeypatch):
    """summary.json said "completed" at step 3 while the extension trained, and after kill -9 ended it
    (checkpoints at step 6): a script that reads it would not resume. It is written when a session ends."""
    out = tmp_path / "run"
    train(nano_cfg(pt_data, tok_dir, out, max_steps=3))
    seen: list[bool] = []
    after_each_logged_step(monkeypatch, lambda rec: seen.append((out / "summary.json").exists()))
    summary = train(nano_cfg(pt_data, tok_dir, out, max_steps=6), resume=True)
    assert seen == [False] * 3 and (summary["status"], summary["steps"]) == ("completed", 6)
    assert json.loads((out / "summary.json").read_text()) == summary


def test_a_resume_on_other_data_of_the_same_size_is_refused(tmp_path, pt_data, tok_dir, corpus_file, monkeypatch):
    """The loader's place in the epoch points into the sample order of the data it read: on other data
    (the corpus shuffled, another system prompt) with as many samples, it went on silently, repeating
    some samples and skipping others. A copy of the same data at another path resumes."""
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        stop_at(m, 3)
        assert train(nano_cfg(pt_data, tok_dir, out))["status"] == "interrupted"
    other = other_tokens(pt_data, tmp_path / "other")
    with pytest.raises(TinykError) as e:
        train(nano_cfg(other, tok_dir, out), resume=True)
    assert str(e.value) == (f"{other} holds other training data than this run trained on (its files' checksums "
                            f"differ: another corpus, system prompt or split): resume with the data it began with, "
                            f"or train on from its weights in a new run (--init {checkpoints(out)[-1] / 'model'})")
    copy = shutil.copytree(pt_data, tmp_path / "copy")
    with monkeypatch.context() as m:
        stop_at(m, 4)
        assert train(nano_cfg(copy, tok_dir, out), resume=True)["status"] == "interrupted"
    # The same tokens cut into other shards (as a lower ulimit -n asks) have other checksums: not refused.
    resharded = prepare_pretrain([corpus_file], tok_dir, tmp_path / "resharded", val_fraction=0.05, workers=1,
                                 shard_tokens=1000, show_progress=False)
    assert len(resharded["splits"]["train"]["shards"]) > 1
    assert train(nano_cfg(tmp_path / "resharded", tok_dir, out), resume=True)["status"] == "completed"


def test_a_finished_run_resumed_with_a_smaller_budget_keeps_its_schedule(tmp_path, pt_data, tok_dir):
    """Nothing trains, and the header shows the run as it was: its length and its warmup, not the
    smaller budget's."""
    out = tmp_path / "run"
    cfg = dict(max_steps=40, warmup_steps=None)
    train(nano_cfg(pt_data, tok_dir, out, **cfg))
    seen = []
    for steps in (40, 3):
        t = Trainer(nano_cfg(pt_data, tok_dir, out, **{**cfg, "max_steps": steps}), resume=True)
        seen.append((t.total_steps, t.warmup))
        t.close()
    assert seen == [(40, default_warmup(40))] * 2 and default_warmup(3) != default_warmup(40)


def test_trainer_is_usable_as_a_library(tmp_path, pt_data, tok_dir):
    trainer = Trainer(nano_cfg(pt_data, tok_dir, tmp_path / "lib", max_steps=1))
    assert (trainer.micro, trainer.accum, trainer.total_steps) == (8, 1, 1)
    assert trainer.flops_per_token == trainer.model.flops_per_token(32)
    assert trainer.run()["steps"] == 1


def test_a_config_from_a_library_caller_is_checked_and_left_as_it_was(tmp_path, pt_data, tok_dir, monkeypatch):
    """In a notebook: Paths where the CLI has strings, a config reused for the next run (the run used to
    fill in its model shape, so a run with another tokenizer was refused), a typo in `kind` (one line,
    not "tinyk pretrian needs pretrian data"), a sys.stdout without isatty (a host's writer), and the
    notebook's matplotlib backend (loss.png switched the process to Agg, and inline plots stopped)."""
    import matplotlib

    class Writer:
        def __init__(self):
            self.text = ""

        def write(self, s: str) -> int:
            self.text += s
            return len(s)

        def flush(self) -> None:
            pass

    monkeypatch.setattr(sys, "stdout", Writer())
    cfg = nano_cfg(pt_data, tok_dir, tmp_path / "a", max_steps=1, progress=True)
    cfg.data, cfg.tokenizer, cfg.out = Path(cfg.data), Path(cfg.tokenizer), tmp_path / "a"
    before, backend = copy.deepcopy(cfg), matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        assert train(cfg)["steps"] == 1 and cfg == before and "step 1" in sys.stdout.text
        assert matplotlib.get_backend() == "svg" and (tmp_path / "a" / "loss.png").stat().st_size > 1000
    finally:
        matplotlib.use(backend)
    cfg.out = tmp_path / "b"
    assert train(cfg)["steps"] == 1
    with pytest.raises(TinykError, match="^kind must be pretrain or sft, got 'pretrian'$"):
        train(replace(cfg, kind="pretrian", out=str(tmp_path / "c")))


def test_max_minutes_fits_the_schedule_to_the_clock(tmp_path, pt_data, tok_dir, capsys):
    """A wall-time budget ends the run on time with its LR decayed, and the step budgets still cap it."""
    out = tmp_path / "timed"
    summary = train(nano_cfg(pt_data, tok_dir, out, max_steps=3000, max_minutes=0.04, warmup_steps=2))
    lrs = [r["lr"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["type"] == "train"]
    assert summary["status"] == "completed" and 5 <= summary["steps"] == summary["total_steps"] < 3000
    assert summary["elapsed_s"] < 0.04 * 60 + 10 and (out / "final").is_dir()
    assert max(lrs) == pytest.approx(3e-3) and lrs[-1] < 0.2 * 3e-3  # the cosine reached (near) its floor
    capsys.readouterr()
    capped = train(nano_cfg(pt_data, tok_dir, tmp_path / "capped", max_steps=3, max_minutes=6.22829))
    assert capped["steps"] == 3
    header = capsys.readouterr().out
    assert ", fitted to 6.23 minutes, " in header, header  # the demo's share of its budget, as a person writes it
    assert [minutes_text(m) for m in (0.04, 6.22829, 20, 99.96, 1440, 1e9)] == [
        "0.04", "6.23", "20", "100", "1,440", "1,000,000,000"]


def test_a_flop_rate_reads_in_the_unit_that_suits_it():
    """A CPU's emulated bf16 read "peak for MFU: 0.00 TFLOP/s", a B200 "2.25e+03 TFLOP/s"."""
    rates = (1.3e9, 99.94e9, 155.8e9, 999.4e9, 999.6e9, 1.4e12, 99.99e12, 99.999e12, 989e12, 2250e12)
    assert [flops_text(f) for f in rates] == [
        "1.3 GFLOP/s", "99.9 GFLOP/s", "156 GFLOP/s", "999 GFLOP/s", "1.00 TFLOP/s", "1.40 TFLOP/s", "99.99 TFLOP/s",
        "100 TFLOP/s", "989 TFLOP/s", "2,250 TFLOP/s"]


def trainer_clock(monkeypatch) -> list[float]:
    """The trainer's own clock, made a number the test moves (the CPU's matmul timing and the rest keep the
    real one)."""
    import tinyk.train

    clock = [0.0]
    monkeypatch.setattr(tinyk.train, "time", types.SimpleNamespace(perf_counter=lambda: clock[0],
                                                                     monotonic=time.monotonic))
    return clock


def timed_trainer(monkeypatch, *, step_s: float, eval_s: float, save_s: float) -> None:
    """On the trainer's clock, each step takes `step_s`, each evaluation `eval_s` and each checkpoint's
    gathering `save_s`."""
    clock = trainer_clock(monkeypatch)

    def taking(seconds: float, method):
        def timed(self, *args, **kwargs):
            clock[0] += seconds
            return method(self, *args, **kwargs)
        return timed

    monkeypatch.setattr(Trainer, "train_step", taking(step_s, Trainer.train_step))
    monkeypatch.setattr(Trainer, "evaluate", taking(eval_s, Trainer.evaluate))
    monkeypatch.setattr(Trainer, "_full_states", taking(save_s, Trainer._full_states))


def test_a_time_budget_leaves_room_for_the_final_evaluation_and_saves(tmp_path, pt_data, tok_dir, monkeypatch,
                                                                       capsys):
    """--max-minutes fitted the steps to the whole budget, then the final evaluation ran past it: 79 s of a
    60 s budget, 165 s of 120. On a clock where a step takes 1 s, an evaluation 20 s and a checkpoint 6 s,
    a 2-minute run ends on time, its evaluations and saves included."""
    timed_trainer(monkeypatch, step_s=1.0, eval_s=20.0, save_s=6.0)
    summary = train(nano_cfg(pt_data, tok_dir, tmp_path / "timed", max_steps=3000, max_minutes=2, eval_every=10,
                             save_every=10))
    # Ending sooner than a step before the budget is right only where one more evaluation period would not fit.
    assert summary["status"] == "completed" and 120 - (10 + 20 + 6) <= summary["elapsed_s"] <= 120 + 1, summary
    # The ETA of a log line counts them too (it left out the evaluations still to come: 7:51 for 12:28).
    capsys.readouterr()
    summary = train(nano_cfg(pt_data, tok_dir, tmp_path / "eta", max_steps=30, eval_every=10, save_every=10,
                             log_every=5, progress=True))
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("step 15/30:"))
    elapsed, eta = (int(m) * 60 + int(s) for m, s in re.findall(r"(?:elapsed|ETA) (\d\d):(\d\d)", line))
    assert abs(elapsed + eta - summary["elapsed_s"]) <= 3, (line, summary["elapsed_s"])


def test_one_slow_evaluation_does_not_shorten_a_timed_run(tmp_path, pt_data, tok_dir, monkeypatch):
    """The fit took every evaluation to come as long as the last one: one slowed by other work (0.46 s where
    they took 0.01) halved the planned length, and the LR with it, until the next. On a clock where steps and
    evaluations take 1 s and the fifth evaluation 60 s, the plan loses those 59 s, not half the run."""
    clock, evals, fitted = trainer_clock(monkeypatch), [], []
    step, evaluate, fit = Trainer.train_step, Trainer.evaluate, Trainer._fit_schedule

    def timed_step(self, *args):
        clock[0] += 1.0
        return step(self, *args)

    def timed_eval(self):
        evals.append(1)
        clock[0] += 60.0 if len(evals) == 5 else 1.0
        return evaluate(self)

    monkeypatch.setattr(Trainer, "train_step", timed_step)
    monkeypatch.setattr(Trainer, "evaluate", timed_eval)
    monkeypatch.setattr(Trainer, "_fit_schedule",
                        lambda self, n: fitted.append((self.progress.step, n)) or fit(self, n))
    summary = train(nano_cfg(pt_data, tok_dir, tmp_path / "run", max_steps=3000, max_minutes=10, eval_every=10))
    before = [n for s, n in fitted if 42 <= s <= 50]
    after = [n for s, n in fitted if s > 51]
    assert min(after) >= min(before) - 60, (min(before), min(after))
    assert 600 - 12 <= summary["elapsed_s"] <= 600 + 1


def test_a_time_budget_shortens_a_warmup_longer_than_half_the_fitted_run(tmp_path, pt_data, tok_dir, monkeypatch):
    """`--preset tiny --max-minutes 0.5` (warmup 50) fitted to 7 steps ended mid-warmup, the LR never at
    its peak and never decayed."""
    monkeypatch.setattr(Trainer, "_fit_estimate", lambda self: 8 if self.progress.step >= 2 else 0)
    out = tmp_path / "timed"
    assert train(nano_cfg(pt_data, tok_dir, out, max_steps=3000, max_minutes=10, warmup_steps=50))["steps"] == 8
    lrs = [r["lr"] for r in records(out, "train")]
    assert max(lrs) == pytest.approx(3e-3) and lrs[-1] == pytest.approx(0.1 * 3e-3)
    # An estimate that grows later (a slow start) stretches the decay but never starts the warmup again.
    monkeypatch.setattr(Trainer, "_fit_estimate", lambda self: (10 if self.progress.step < 6 else 40)
                        if self.progress.step >= 2 else 0)
    out = tmp_path / "stretched"
    assert train(nano_cfg(pt_data, tok_dir, out, max_steps=3000, max_minutes=10, warmup_steps=50))["steps"] == 40
    lrs = [r["lr"] for r in records(out, "train")][7:]  # from step 8, on the 40-step schedule
    assert lrs == sorted(lrs, reverse=True) and lrs[0] > 0.9 * 3e-3 and lrs[-1] == pytest.approx(0.1 * 3e-3)


def test_a_resumed_timed_run_goes_on_at_the_rate_it_stopped_at(tmp_path, pt_data, tok_dir, monkeypatch):
    """A warmup the fit cut short stays short on resume (the config's warmup_steps 50 began warming up
    again: step 9 at 45% of the rate of step 8), and a run resumed with another --max-minutes goes on
    with its fitted schedule until it has timed steps of its own (it went on the step cap's 3,000-step
    schedule, back in warmup)."""
    def stretched(self: Trainer) -> int:
        return (10 if self.progress.step < 6 else 40) if self.progress.step >= 2 else 0

    for name, warmup, minutes in (("warmup", 50, 10), ("budget", None, 20), ("untimed", 50, None)):
        out = tmp_path / name
        cfg = nano_cfg(pt_data, tok_dir, out, max_steps=3000, max_minutes=10, warmup_steps=warmup)
        with monkeypatch.context() as m:
            m.setattr(Trainer, "_fit_estimate", stretched)
            stop_at(m, 8)
            train(cfg)
        state = json.loads((checkpoints(out)[-1] / "state.json").read_text())
        # Untimed, the run is as long as it was fitted to be (it began warming up again at warmup_steps 50).
        resumed = Trainer(replace(cfg, max_minutes=minutes, max_steps=40 if minutes is None else 3000), resume=True)
        try:
            assert (resumed.total_steps, resumed.warmup, resumed.refit) == (state["total_steps"], state["warmup"],
                                                                             None), name
        finally:
            resumed.close()
    # A budget nearly spent: the earlier sessions' pace fits its schedule at once (it ran on at the 40 steps
    # fitted before, past its time, and ended far above its floor LR).
    minutes = state["elapsed_s"] * (1 + 2.5 / 8) / 60  # 2.5 more steps at the pace so far
    resumed = Trainer(replace(cfg, max_minutes=minutes), resume=True)
    try:
        assert (resumed.total_steps, resumed.ended_by) == (10, "--max-minutes") and resumed.warmup <= 5
        assert resumed.refit is not None and resumed.refit[0] == 40  # the header says the schedule was re-fitted
    finally:
        resumed.close()
    # A finished run whose lowered budget is spent stays finished (it trained a step more, rewriting final/).
    done = nano_cfg(pt_data, tok_dir, tmp_path / "done", max_steps=3000, max_minutes=10)
    with monkeypatch.context() as m:
        m.setattr(Trainer, "_fit_estimate", lambda self: 8 if self.progress.step >= 2 else 0)
        assert train(done)["steps"] == 8
    trained = json.loads((checkpoints(tmp_path / "done")[-1] / "state.json").read_text())["elapsed_s"]
    resumed = Trainer(replace(done, max_minutes=trained / 120), resume=True)  # half that: spent on any machine
    try:
        assert resumed.total_steps == 8 and resumed.finished_already
    finally:
        resumed.close()
    # A finished run given a raised budget is fitted at the earlier pace too: it ran on at the step cap's
    # length, at its peak LR, until this session's first estimate, also where the budget was still spent.
    state_file = checkpoints(tmp_path / "done")[-1] / "state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "max_minutes": state["elapsed_s"] / 120}))  # its budget: half that
    for minutes, steps in ((state["elapsed_s"] * (1 + 2.5 / 8) / 60, 10), (state["elapsed_s"] * 0.9 / 60, 8)):
        resumed = Trainer(replace(done, max_minutes=minutes), resume=True)
        try:
            assert (resumed.total_steps, resumed.finished_already is not None) == (steps, steps == 8)
        finally:
            resumed.close()
    # A time budget already spent is refused: ten steps more before this session's first estimate went
    # past it, and a WSD run ended at its peak rate, never decayed. (Half the time trained: a fixed 0.001
    # minutes, 0.06 s, was not spent on a machine fast enough.)
    spent = json.loads((checkpoints(cfg.out)[-1] / "state.json").read_text())["elapsed_s"] / 120
    with pytest.raises(TinykError, match=rf"^--max-minutes {spent:g} is spent: the run has trained [\d.]+ s and "
                                         r"stopped at step 8 of the 40 it planned: raise --max-minutes to go on"):
        Trainer(replace(cfg, max_minutes=spent), resume=True)


def test_a_run_made_longer_keeps_the_warmup_it_began_with(tmp_path, pt_data, tok_dir, monkeypatch, capsys):
    """The default warmup is 2% of the length first planned; a run made 100 times longer after it went
    back into a warmup 100 times as long, its LR cut to a tenth."""
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        stop_at(m, 10)
        train(nano_cfg(pt_data, tok_dir, out, max_steps=250, warmup_steps=None))
    capsys.readouterr()
    with monkeypatch.context() as m:
        stop_at(m, 11)
        train(nano_cfg(pt_data, tok_dir, out, max_steps=25000, warmup_steps=None), resume=True)
    assert "warmup 5," in capsys.readouterr().out
    lrs = [r["lr"] for r in records(out, "train")]
    assert lrs[4:] == pytest.approx([3e-3] * 7, rel=1e-3)


def test_freed_heap_goes_back_to_the_system_after_each_evaluation_and_checkpoint(tmp_path, pt_data, tok_dir,
                                                                                   monkeypatch):
    """glibc keeps freed heap that live allocations fragment: a long run's RSS crept up with each
    evaluation and checkpoint until the trainer handed it back."""
    script = """
import numpy as np
from tinyk.train import release_freed_memory
def rss_mib():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) // 1024
kept, freed = [], []
for _ in range(20000):  # 200 MB in 10 kB buffers, each followed by a small one that stays
    freed.append(np.ones(10_000, np.uint8))
    kept.append(np.ones(16, np.uint8))
del freed
before = rss_mib()
print(release_freed_memory(), before - rss_mib())
"""
    if not sys.platform.startswith("linux"):
        pytest.skip("malloc_trim is glibc's")
    trimmed, released_mib = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                           check=True).stdout.split()
    assert trimmed == "True" and int(released_mib) > 100
    calls = []
    monkeypatch.setattr("tinyk.train.release_freed_memory", lambda: calls.append("release") or True)
    after_each_logged_step(monkeypatch, lambda rec: calls.append(rec["step"]))
    train(nano_cfg(pt_data, tok_dir, tmp_path / "run", max_steps=6, eval_every=2, save_every=3))
    # steps 2, 4 and 6 evaluate, step 3 saves: each is followed by a release
    assert calls == [1, 2, "release", 3, "release", 4, "release", 5, 6, "release"]


def test_compiled_training_matches_eager(tmp_path, pt_data, tok_dir):
    """--compile changes kernels, not the arithmetic: the same losses within float reordering."""
    eager = train(nano_cfg(pt_data, tok_dir, tmp_path / "eager", max_steps=3))
    compiled = train(nano_cfg(pt_data, tok_dir, tmp_path / "compiled", max_steps=3, compile=True))
    a, b = train_losses(tmp_path / "eager"), train_losses(tmp_path / "compiled")
    assert a.keys() == b.keys() == {1, 2, 3}
    assert all(b[k] == pytest.approx(a[k], rel=1e-4) for k in a)
    assert compiled["final_val_loss"] == pytest.approx(eager["final_val_loss"], rel=1e-4)


def test_a_compile_that_fails_is_one_line_and_leaves_no_run(tmp_path, pt_data, tok_dir):
    """No C++ compiler: inductor's 150-line traceback was the report, and the run directory it left
    behind refused the corrected command ("exists, use --resume or --force"); with --force, the run it
    replaced was gone."""
    import torch._dynamo
    import torch._inductor.config as inductor

    # inductor's own patch: monkeypatch.setattr deleted fx_graph_cache on undo, and every later compile failed
    cache = inductor.fx_graph_cache
    with inductor.patch({"cpp.cxx": ("/nonexistent/g++",), "fx_graph_cache": False}):  # no graph compiled earlier
        torch._dynamo.reset()
        out = tmp_path / "run"
        with pytest.raises(TinykError, match="^torch.compile failed .*; leave --compile out, or install what it needs"):
            train(nano_cfg(pt_data, tok_dir, out, max_steps=3, compile=True, seq_len=24))
        assert not out.exists()
        torch._dynamo.reset()
        assert train(nano_cfg(pt_data, tok_dir, out, max_steps=1, seq_len=24))["steps"] == 1
        before = sorted(p.relative_to(out) for p in out.rglob("*"))
        with pytest.raises(TinykError, match="^torch.compile failed"):  # --force replaces a run once a step is done
            train(nano_cfg(pt_data, tok_dir, out, max_steps=3, compile=True, seq_len=24), force=True)
        assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    torch._dynamo.reset()
    assert inductor.fx_graph_cache == cache


def test_data_replaced_while_a_run_trains_changes_nothing_it_validates_on(tmp_path, pt_data, tok_dir, corpus_file,
                                                                        monkeypatch):
    """`tinyk data pretrain --force` into the directory a run trains from: each evaluation re-read it, so
    the val loss changed sets mid-run without a word (and data of another tokenizer crashed the run)."""
    data = shutil.copytree(pt_data, tmp_path / "data")
    swapped: dict[str, bool] = {}
    train(nano_cfg(data, tok_dir, tmp_path / "ref", max_steps=4, eval_every=2))
    want = [r["val_loss"] for r in map(json.loads, (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines())
            if r["type"] == "eval"]
    evaluate = Trainer.evaluate

    def replaced_first(self):
        if not swapped:
            shutil.rmtree(data)
            prepare_pretrain([corpus_file], tok_dir, data, val_fraction=0.3, seed=1, show_progress=False)
            swapped["replaced"] = True
        return evaluate(self)

    monkeypatch.setattr(Trainer, "evaluate", replaced_first)
    train(nano_cfg(data, tok_dir, tmp_path / "run", max_steps=4, eval_every=2))
    got = [r["val_loss"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
           if r["type"] == "eval"]
    assert swapped and len(want) == 2 and got == want


def test_no_validation_split_still_trains(tmp_path, corpus_file, tok_dir, capsys):
    data = tmp_path / "noval"
    prepare_pretrain([corpus_file], tok_dir, data, val_fraction=0.0, workers=1, show_progress=False)
    summary = train(nano_cfg(data, tok_dir, tmp_path / "run", max_steps=2, eval_every=1))
    assert summary["status"] == "completed" and summary["final_val_loss"] is None
    assert "no validation: the val split" in capsys.readouterr().out


def test_a_damaged_validation_split_stops_the_run_before_it_starts(tmp_path, pt_data, tok_dir):
    """An empty split is a run without validation; a cut or missing val shard is damaged data, which a
    long run must not discover only in its missing validation curve."""
    data = tmp_path / "data"
    shutil.copytree(pt_data, data)
    shard = sorted((data / "val").glob("*.bin"))[0]
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(TinykError, match=f"^{re.escape(str(shard))} is missing or not .* bytes as meta.json says "
                                         r"\(re-run tinyk data\)$"):
        train(nano_cfg(data, tok_dir, tmp_path / "run", max_steps=2))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("dtype,name", [("bf16", "bfloat16"), ("fp16", "float16")])
def test_mixed_precision_on_cpu_trains_and_resumes(tmp_path, pt_data, tok_dir, dtype, name, capsys):
    """bf16 autocast runs without a GradScaler, fp16 with one whose state survives a resume; fp16 logs
    (and clips) the gradients' own norm, unscaled, not the loss scaler's 65,536 times it."""
    out = tmp_path / "run"
    first = train(nano_cfg(pt_data, tok_dir, out, max_steps=2, dtype=dtype))
    assert first["dtype"] == name and math.isfinite(first["final_train_loss"])
    if dtype == "fp16":
        train(nano_cfg(pt_data, tok_dir, tmp_path / "fp32", max_steps=1))
        norms = [records(o, "train")[0]["grad_norm"] for o in (out, tmp_path / "fp32")]
        assert None not in norms and norms[0] == pytest.approx(norms[1], rel=0.05), norms
    scaler = torch.load(checkpoints(out)[-1] / "rng.pt", weights_only=True)["scaler"]
    assert ("scale" in scaler) == (dtype == "fp16")
    second = train(nano_cfg(pt_data, tok_dir, out, max_steps=3, dtype=dtype), resume=True)
    assert second["steps"] == 3 and second["resumed_from"].endswith("step_0000002")
    assert (second["skipped_steps"] is None) == (dtype == "bf16")
    # A CPU without the dtype's instructions (38x fp32's time for a tiny run) is said to be one at the start.
    header = capsys.readouterr().out
    instructions = {"bf16": "avx512_bf16 or amx_bf16", "fp16": "avx512_fp16 or amx_fp16"}[dtype]
    note = (f"note: this CPU has no {dtype} instructions ({instructions}): its {dtype} matmuls are emulated, "
            f"several to tens of times slower than fp32's (--dtype fp32)")
    assert (note in header.splitlines()) is cpu_emulates(getattr(torch, name))


def test_settings_this_run_does_not_use_are_said_in_its_header(tmp_path, pt_data, tok_dir, capsys):
    """--parallel fsdp on one process and a decay_fraction beside the cosine schedule were taken without a word."""
    train(nano_cfg(pt_data, tok_dir, tmp_path / "a", max_steps=1, parallel="fsdp", decay_fraction=0.5))
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: ")]
    assert notes[:2] == ["note: --parallel fsdp shards the model only under torchrun with several processes: this "
                         "run is one process with the whole model",
                         "note: decay_fraction 0.5 is the wsd schedule's (--lr-schedule wsd); cosine decays from the "
                         "warmup on"]
    train(nano_cfg(pt_data, tok_dir, tmp_path / "b", max_steps=1, lr_schedule="wsd", decay_fraction=0.5))
    assert "note: " not in capsys.readouterr().out.replace("note: warmup", "")


@pytest.mark.parametrize("kind", ["pretrain", "sft"])
def test_the_runs_val_loss_is_what_tinyk_eval_gives_its_model(tmp_path, pt_data, sft_data, tok_dir, nano_model_dir,
                                                              kind):
    """With dropout on, validation runs the model in eval mode: the run's val loss and bits per byte are
    what `tinyk eval` then reports for the model it saved (a validation with dropout on was not)."""
    data, out = (pt_data if kind == "pretrain" else sft_data), tmp_path / "run"
    summary = train(nano_cfg(data, tok_dir if kind == "pretrain" else None, out, kind, seq_len=64, max_steps=2,
                             eval_every=2, init=None if kind == "pretrain" else str(nano_model_dir),
                             model={"preset": "nano", "dropout": 0.1} if kind == "pretrain" else {"dropout": 0.1}))
    final = out / "final"
    again = eval_data(load_model(final)[0], final, data, seq_len=64, batch_size=8, max_batches=2)
    assert (summary["final_val_loss"], summary["final_val_bpb"]) == \
        (pytest.approx(again["loss"], rel=1e-5), pytest.approx(again["bits_per_byte"], rel=1e-5))


def test_the_runs_optimizer_and_precision_settings_reach_the_step(tmp_path, pt_data, tok_dir, monkeypatch):
    """Only the helpers were tested: weight decay, betas, eps and grad_clip as set reach AdamW and the
    step, and --dtype bf16 runs the forward under bf16 autocast (the loss alone cannot tell)."""
    import tinyk.train as train_module

    seen = []
    real_step, real_forward = train_module.optimizer_step, Transformer.forward

    def spy_step(module, opt, *args, grad_clip, **kw):
        seen.append(("step", grad_clip, [(g["weight_decay"], g["betas"], g["eps"]) for g in opt.param_groups]))
        return real_step(module, opt, *args, grad_clip=grad_clip, **kw)

    def spy_forward(self, *args, **kw):
        if self.training:
            seen.append(("forward", torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return real_forward(self, *args, **kw)

    monkeypatch.setattr(train_module, "optimizer_step", spy_step)
    monkeypatch.setattr(Transformer, "forward", spy_forward)
    train(nano_cfg(pt_data, tok_dir, tmp_path / "run", max_steps=1, dtype="bf16", weight_decay=0.05, beta1=0.85,
                   beta2=0.97, eps=1e-7, grad_clip=0.5))
    assert seen[0] == ("step", 0.5, [(0.05, (0.85, 0.97), 1e-7), (0.0, (0.85, 0.97), 1e-7)])
    assert seen[1:] and set(seen[1:]) == {("forward", True, torch.bfloat16)}


def test_fp16_skipped_steps_are_counted_across_a_resume(tmp_path, pt_data, tok_dir, monkeypatch, capsys):
    """A loss scale far too high overflows every fp16 gradient: GradScaler skips those updates, and the
    log lines, metrics and summary say how many, including steps a checkpoint took mid log window."""
    from tinyk.monitor import Monitor

    real = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", lambda *a, **k: real(*a, **{**k, "init_scale": 2.0 ** 40}))
    cfg = nano_cfg(pt_data, tok_dir, tmp_path / "run", max_steps=4, log_every=3, dtype="fp16", progress=True)
    with monkeypatch.context() as m:  # SIGTERM after step 2: the checkpoint holds two unlogged skipped steps
        advance, done = Monitor.advance, []

        def advance_and_stop(self, steps):
            advance(self, steps)
            done.append(steps)
            if len(done) == 2:
                os.kill(os.getpid(), signal.SIGTERM)

        m.setattr(Monitor, "advance", advance_and_stop)
        stopped = train(cfg)
    assert stopped["status"] == "interrupted" and stopped["skipped_steps"] == 2
    summary = train(cfg, resume=True)
    assert summary["steps"] == 4 and summary["skipped_steps"] == 4
    assert [(r["step"], r["skipped_steps"]) for r in records(tmp_path / "run", "train")] == [(3, 3), (4, 1)]
    out = capsys.readouterr().out
    assert "skipped 3 (fp16 overflow)" in out and "(4 of the steps were skipped by fp16's loss scaler)" in out


def test_a_run_resumes_in_fp16_on_a_card_without_bf16(tmp_path, pt_data, tok_dir):
    """A run begun in bf16 (or fp32) has no loss-scaler state; resumed on a V100 or T4, where auto means
    fp16, its checkpoint was called damaged (every one of them, so deleting it did not help)."""
    out = tmp_path / "run"
    train(nano_cfg(pt_data, tok_dir, out, max_steps=2, save_every=1, dtype="bf16"))
    assert train(nano_cfg(pt_data, tok_dir, out, max_steps=3, dtype="fp16"), resume=True)["steps"] == 3


def test_a_resumed_optimizer_takes_this_sessions_kernels(tmp_path, pt_data, tok_dir, monkeypatch):
    """AdamW's state is placed by the kernel flags the state dict carries: a CPU run's unfused ones
    left the step counts on the CPU, which CUDA's fused kernel refuses at the first step of a resume
    on a GPU. The saved state is loaded as this session's optimizer runs (here fused, on the CPU)."""
    import tinyk.train

    out = tmp_path / "run"
    train(nano_cfg(pt_data, tok_dir, out, max_steps=2, save_every=1))
    loaded, load = [], torch.optim.Optimizer.load_state_dict
    monkeypatch.setattr(torch.optim.Optimizer, "load_state_dict",
                        lambda self, state_dict: loaded.append([g.get("fused") for g in state_dict["param_groups"]])
                        or load(self, state_dict))
    monkeypatch.setattr(tinyk.train, "make_optimizer", lambda model, cfg, device: torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True))
    assert train(nano_cfg(pt_data, tok_dir, out, max_steps=3), resume=True)["steps"] == 3
    assert loaded == [[True, True]]


def test_a_resume_needs_no_more_memory_than_the_run_it_continues(tmp_path, pt_data, tok_dir):
    """A laptop that trained a model must be able to resume it: AdamW's state is read into the optimizer
    as it is, not beside a zero-filled copy made first (torch's set_optimizer_state_dict takes a step on
    zero gradients to make one), which held the state and the gradients twice at the peak."""
    out = tmp_path / "run"
    wide = ["--set", "model.dim=512", "--set", "model.n_layers=8"]  # 25M parameters: 200 MB of AdamW state

    def peak_mib(*extra: str) -> float:
        script = ("import resource, sys\nfrom tinyk.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit "
                  "as e:\n    assert not e.code\nprint(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
        proc = subprocess.run([sys.executable, "-c", script, *cli_args(pt_data, tok_dir, out, *wide, *extra)],
                              env=ENV, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        return float(proc.stdout.splitlines()[-1])

    fresh = peak_mib("--max-steps", "1")
    resumed = peak_mib("--max-steps", "2", "--resume")
    assert resumed < fresh + 100, (fresh, resumed)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_run_moves_between_cpu_and_cuda_on_resume(tmp_path, pt_data, tok_dir, monkeypatch):
    """A laptop's checkpoint resumed on a GPU and back (fp32 on both, no TF32): the losses follow a run
    that never moved, so weights, AdamW's state and the data position all crossed."""
    ref, out = tmp_path / "ref", tmp_path / "run"
    cfg = dict(max_steps=6, save_every=1, dtype="fp32")
    train(nano_cfg(pt_data, tok_dir, ref, device="cpu", **cfg))
    for device, stop in (("cpu", 2), ("cuda", 4)):
        with monkeypatch.context() as m:
            stop_at(m, stop)
            assert train(nano_cfg(pt_data, tok_dir, out, device=device, **cfg), resume=stop > 2)["steps"] == stop
    assert train(nano_cfg(pt_data, tok_dir, out, device="cpu", **cfg), resume=True)["steps"] == 6
    want, got = train_losses(ref), train_losses(out)
    assert got.keys() == want.keys() == set(range(1, 7))
    assert all(got[s] == want[s] for s in (1, 2)), (got, want)  # the CPU's own steps repeat exactly
    assert max(abs(got[s] - want[s]) / want[s] for s in range(3, 7)) < 1e-4, (got, want)


# ----------------------------------------------------------------------------- resumed runs, continued

def stop_at(monkeypatch, step: int) -> None:
    """Sends this process SIGTERM once `step` is logged: the trainer saves a checkpoint and stops there."""
    signal_at_step(monkeypatch, step, signal.SIGTERM)


def records(out: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


def test_resume_with_dropout_is_bit_identical(tmp_path, pt_data, tok_dir, monkeypatch):
    """Dropout draws from the RNG a checkpoint restores; nothing at start-up (the CPU's peak-FLOP/s
    measurement once did) may draw from it before training goes on."""
    cfg = dict(model={"preset": "nano", "dropout": 0.1}, max_steps=8)
    train(nano_cfg(pt_data, tok_dir, tmp_path / "straight", **cfg))
    with monkeypatch.context() as m:
        stop_at(m, 4)
        assert train(nano_cfg(pt_data, tok_dir, tmp_path / "resumed", **cfg))["steps"] == 4
    train(nano_cfg(pt_data, tok_dir, tmp_path / "resumed", **cfg), resume=True)
    assert train_losses(tmp_path / "resumed") == train_losses(tmp_path / "straight")
    a = load_file(tmp_path / "resumed" / "final" / "model.safetensors")
    b = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sample_prompts_show_what_the_model_says_and_change_nothing_it_learns(tmp_path, pt_data, sft_data, tok_dir,
                                                                             capsys):
    """At each evaluation the run logs its greedy continuation of each sample prompt (SFT: its reply), as
    `tinyk generate` (`chat`) would give it from the model of that step; with dropout on, a run that
    samples trains the same weights as one that does not (the model goes back to training mode, and
    greedy decoding draws no random numbers)."""
    from tinyk.engine import Engine, SamplingParams

    kw = dict(model={"preset": "nano", "dropout": 0.1}, max_steps=6, eval_every=3)
    prompts = ["我们今天", "The quick"]
    train(nano_cfg(pt_data, tok_dir, tmp_path / "plain", **kw))
    train(nano_cfg(pt_data, tok_dir, tmp_path / "sampled", sample_prompts=prompts, sample_tokens=12, **kw))
    a = load_file(tmp_path / "sampled" / "final" / "model.safetensors")
    b = load_file(tmp_path / "plain" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    records = [r for r in map(json.loads, (tmp_path / "sampled" / "metrics.jsonl").read_text().splitlines())
               if r["type"] == "sample"]
    assert [r["step"] for r in records] == [3, 6] and [s["prompt"] for s in records[-1]["samples"]] == prompts
    greedy = SamplingParams(temperature=0.0, max_new_tokens=12)
    want = [c.text for c in Engine.from_dir(tmp_path / "sampled" / "final").generate(prompts, greedy)]
    assert [s["text"] for s in records[-1]["samples"]] == want
    out = capsys.readouterr().out
    assert f"step 6 sample: 我们今天 → {want[0]}".replace("\n", "⏎") in out

    sft = train(nano_cfg(sft_data, None, tmp_path / "chat", kind="sft", init=str(tmp_path / "plain" / "final"),
                         seq_len=None, max_steps=2, sample_prompts=["北京是哪里？"], sample_tokens=12))
    [rec] = [r for r in map(json.loads, (tmp_path / "chat" / "metrics.jsonl").read_text().splitlines())
             if r["type"] == "sample"]
    reply = Engine.from_dir(sft["final_model"]).chat([[{"role": "user", "content": "北京是哪里？"}]], greedy)[0]
    assert rec["samples"] == [{"prompt": "北京是哪里？", "text": reply.text}]
    with pytest.raises(TinykError, match="^sample prompt '很很很很很很很很很很很很很很很很很很很很很很很很'... takes "):
        train(nano_cfg(pt_data, tok_dir, tmp_path / "long", sample_prompts=["很" * 500]))


def test_a_wsd_run_made_longer_before_its_decay_is_the_longer_run(tmp_path, pt_data, tok_dir, monkeypatch, capsys):
    """The point of warmup-stable-decay: a run stopped on its flat stretch and given more steps goes on at
    the same rate, and ends bit-identical to a run planned that long from the start."""
    wsd = dict(lr_schedule="wsd", decay_fraction=0.25, warmup_steps=2)
    straight = train(nano_cfg(pt_data, tok_dir, tmp_path / "straight", max_steps=12, **wsd))
    out = tmp_path / "extended"
    with monkeypatch.context() as m:
        stop_at(m, 4)
        train(nano_cfg(pt_data, tok_dir, out, max_steps=8, **wsd))
    capsys.readouterr()
    extended = train(nano_cfg(pt_data, tok_dir, out, max_steps=12, **wsd), resume=True)
    header = capsys.readouterr().out
    assert "lr 0.003 -> 0.0003 over the last 3 steps (wsd)" in header and "re-fitted" not in header
    lrs = [r["lr"] for r in records(out, "train")]
    assert lrs == [r["lr"] for r in records(tmp_path / "straight", "train")]
    assert lrs[2:9] == [3e-3] * 7 and lrs[9] < 3e-3 and lrs[-1] == pytest.approx(3e-4)
    assert (out / "final" / "model.safetensors").read_bytes() == \
        (tmp_path / "straight" / "final" / "model.safetensors").read_bytes()
    assert extended["final_val_loss"] == straight["final_val_loss"] is not None
    # The cosine has no flat stretch: the same extension re-fits it, and the header says by how much.
    cos = tmp_path / "cosine"
    with monkeypatch.context() as m:
        stop_at(m, 4)
        train(nano_cfg(pt_data, tok_dir, cos, max_steps=8, warmup_steps=2))
    capsys.readouterr()
    train(nano_cfg(pt_data, tok_dir, cos, max_steps=12, warmup_steps=2), resume=True)
    assert "note: the run is now 12 steps long, not 8, so the LR schedule is re-fitted" in capsys.readouterr().out
    # Another schedule is said even where this step's rate hardly moves (the cosine is still near its peak).
    other = tmp_path / "switched"
    with monkeypatch.context() as m:
        stop_at(m, 3)
        train(nano_cfg(pt_data, tok_dir, other, max_steps=40, warmup_steps=2))
    capsys.readouterr()
    train(nano_cfg(pt_data, tok_dir, other, max_steps=40, **wsd), resume=True)
    out = capsys.readouterr().out
    assert re.search(r"^note: lr_schedule is wsd, and decay_fraction is 0.25, so the LR schedule is re-fitted: step 4 "
                     r"trains at LR 0.003, where the old schedule was at 0.003$", out, re.M), out


def test_a_timed_run_resumes_on_its_fitted_schedule_and_stays_finished(tmp_path, pt_data, tok_dir, monkeypatch,
                                                                       capsys):
    out = tmp_path / "timed"
    cfg = nano_cfg(pt_data, tok_dir, out, max_steps=100000, max_minutes=0.03, warmup_steps=None, progress=True)
    with monkeypatch.context() as m:
        stop_at(m, 12)
        train(cfg)
    state = json.loads((checkpoints(out)[-1] / "state.json").read_text())
    assert state["step"] == 12 and state["total_steps"] < 100000
    capsys.readouterr()
    train(cfg, resume=True)
    # The header names the cap as "up to" and the schedule fitted so far (it called the fitted length a cap).
    assert "up to 100,000 steps (" in capsys.readouterr().out
    # The first steps after the resume, before this session's own estimate (after ten timed steps: the first
    # run on cold caches, and an early estimate cut the LR to a third), follow the saved schedule (they used
    # to run on the uncapped 100,000-step schedule at a fraction of the LR).
    following = records(out, "train")[12:12 + 10]
    assert [r["step"] for r in following] == list(range(13, 23))
    assert [r["lr"] for r in following] == pytest.approx(
        [lr_at(s, state["total_steps"], cfg.lr, state["warmup"], cfg.min_lr_ratio) for s in range(12, 22)])
    summary = json.loads((out / "summary.json").read_text())
    weights = (out / "final" / "model.safetensors").read_bytes()
    metrics = (out / "metrics.jsonl").read_text()
    saved = (out / "config.yaml").read_text()
    again = train(replace(cfg, lr=1e-2), resume=True)  # a finished run: nothing trains, nothing is rewritten
    assert again == summary and json.loads((out / "summary.json").read_text()) == summary
    assert (out / "config.yaml").read_text() == saved
    assert (out / "final" / "model.safetensors").read_bytes() == weights \
        and (out / "metrics.jsonl").read_text() == metrics


def test_the_summary_of_a_resumed_run_speaks_for_the_whole_run(tmp_path, pt_data, tok_dir, monkeypatch):
    out = tmp_path / "run"
    cfg = nano_cfg(pt_data, tok_dir, out, max_steps=8, eval_every=2)
    with monkeypatch.context() as m:
        stop_at(m, 5)
        train(cfg)
    # Make the first session's step-4 evaluation the run's best, whatever this tiny run does.
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for r in lines:
        if r["type"] == "eval" and r["step"] == 4:
            r["val_loss"] = 0.125
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    summary = train(cfg, resume=True)
    evals = records(out, "eval")
    assert [r["step"] for r in evals] == [2, 4, 6, 8]
    windows = PretrainLoader(pt_data, "train", 32, 8).num_windows  # the epoch logged is the fraction done
    assert [r["epoch"] for r in records(out, "train")] == [round(s * 8 / windows, 4) for s in range(1, 9)]
    assert summary["best_val_loss"] == 0.125
    # Both sessions' tokens, and pretraining scores every one of them (8 steps of 8 x 32).
    assert summary["loss_tokens"] == summary["tokens"] == 8 * 8 * 32
    assert summary["final_val_loss"] == evals[-1]["val_loss"]
    assert summary["tokens_per_s"] == pytest.approx(summary["tokens"] / summary["elapsed_s"], rel=1e-2)
    # Killed while final/ was written: the resumed session trains nothing, and the run's speed is its logged one.
    shutil.rmtree(out / "final")
    (out / "summary.json").unlink()
    again = train(cfg, resume=True)
    logged = sorted(r["tokens_per_s"] for r in records(out, "train")[1:])
    assert again["tokens_per_s"] == pytest.approx(again["tokens"] / again["elapsed_s"], rel=1e-2)
    assert again["tokens_per_s_steady"] == pytest.approx(statistics.median(logged))
    assert again["status"] == "completed" and again["stop_signal"] is None and (out / "final").is_dir()
    assert again["loss_tokens"] == again["tokens"] == 8 * 8 * 32


def test_a_refused_resume_leaves_the_run_as_it_was(tmp_path, pt_data, sft_data, tok_dir, nano_model_dir, capsys):
    out = tmp_path / "run"
    train(nano_cfg(pt_data, tok_dir, out, max_steps=2, save_every=1))
    saved = (out / "config.yaml").read_text()
    with pytest.raises(SystemExit) as e:
        main(["sft", "--resume", "--out", str(out), "--device", "cpu"])
    assert e.value.code == 2 and capsys.readouterr().err == (
        f"tinyk: error: {out} is a pretrain run: resume it with tinyk pretrain --resume, or fine-tune its model "
        f"in a new run (tinyk sft --init {out})\n")
    with pytest.raises(TinykError, match="is a pretrain checkpoint, not sft"):
        train(nano_cfg(sft_data, None, out, kind="sft", init=str(nano_model_dir), model={}, seq_len=64), resume=True)
    assert (out / "config.yaml").read_text() == saved
    assert train(nano_cfg(pt_data, tok_dir, out, max_steps=3), resume=True)["steps"] == 3
    (out / "config.yaml").write_text("lr: [1,\n")  # damaged: the checkpoint's copy is the way back
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--resume", "--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"tinyk: error: cannot parse {out / 'config.yaml'}: ") and err.endswith(
        f"; each checkpoint keeps a copy: cp {checkpoints(out)[-1] / 'config.yaml'} {out / 'config.yaml'}\n")
    (out / "config.yaml").write_text(saved)
    # On --resume the checkpoint's model and tokenizer count: an --init is said not to be read, and not saved.
    with pytest.raises(SystemExit) as e:
        main(cli_args(pt_data, tok_dir, out, "--max-steps", "4", "--resume", "--init", str(nano_model_dir)))
    assert e.value.code == 0 and capsys.readouterr().err == (
        "note: on --resume the model and tokenizer are the checkpoint's, so --init is not read (to start from other "
        "weights, begin a new run with --init)\n")
    assert yaml.safe_load((out / "config.yaml").read_text())["init"] is None
    from tinyk.rundir import resolve_init

    shutil.move(out / "final", tmp_path / "final")  # unfinished: its newest checkpoint is the one to name
    with pytest.raises(TinykError) as e:
        resolve_init(out)
    assert str(e.value) == (f"--init {out} is a run directory without final/ (unfinished); pass one of its "
                            f"checkpoints' model directories instead, e.g. the newest, "
                            f"{checkpoints(out)[-1] / 'model'}")
    shutil.move(tmp_path / "final", out / "final")
    inside = out / "checkpoints" / "x"  # its --force or rotation would reach the run around it
    with pytest.raises(SystemExit) as e:
        main(cli_args(pt_data, tok_dir, inside, "--max-steps", "1"))
    assert e.value.code == 2 and capsys.readouterr().err == (
        f"tinyk: error: --out {inside} is inside the run directory {out.resolve()}; give a path outside it\n")
    assert not inside.exists()
    sft_out = tmp_path / "sft"
    train(nano_cfg(sft_data, None, sft_out, kind="sft", init=str(nano_model_dir), model={}, seq_len=64, max_steps=1))
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--resume", "--out", str(sft_out), "--device", "cpu"])
    assert e.value.code == 2 and capsys.readouterr().err == (
        f"tinyk: error: {sft_out} is an sft run: resume it with tinyk sft --resume\n")
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--config", str(tmp_path), "--out", str(out), "--resume"])
    assert e.value.code == 2 and capsys.readouterr().err == (
        f"tinyk: error: config file {tmp_path} is a directory; give a .yaml, .yml or .toml file\n")


def test_what_a_killed_write_leaves_never_locks_a_run(tmp_path, pt_data, tok_dir):
    """A replaced `final` not yet deleted, a plot's temporary file, a metrics line cut short: the next
    --resume cleans them up and goes on."""
    out = tmp_path / "run"
    train(nano_cfg(pt_data, tok_dir, out, max_steps=2, save_every=1))
    shutil.copytree(out / "final", out / ".final.old-otherhost-12345")
    (out / ".loss.png.tmp-12345.png").write_bytes(b"half a png")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"type": "train", "st')
    assert train(nano_cfg(pt_data, tok_dir, out, max_steps=3), resume=True)["steps"] == 3
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    assert [r["step"] for r in records(out, "train")] == [1, 2, 3]
    metrics = out / "metrics.jsonl"
    metrics.write_text(metrics.read_text().removesuffix("\n"))  # whole, but cut before its newline
    assert train(nano_cfg(pt_data, tok_dir, out, max_steps=4), resume=True)["steps"] == 4
    assert [r["step"] for r in records(out, "train")] == [1, 2, 3, 4]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join([lines[0], "{damaged", *lines[1:]]) + "\n")
    with pytest.raises(TinykError, match=r"metrics.jsonl line 2 is damaged .*; repair or delete that line"):
        train(nano_cfg(pt_data, tok_dir, out, max_steps=5, tracker=["tensorboard"]), resume=True)
    assert not (out / "tensorboard").exists()  # no tracker was started only to be left open


@pytest.mark.parametrize("entry", ["final", "best"])
def test_a_model_a_killed_run_was_replacing_keeps_the_users_files(tmp_path, pt_data, tok_dir, entry):
    """Killed between moving the old final/ (or best/) aside and the new one in, or before the user's
    files in the old one were carried over: the next start deleted the old one with those files."""
    out = tmp_path / "run"
    train(nano_cfg(pt_data, tok_dir, out, max_steps=2, save_every=1, eval_every=1, keep_best=True))
    (out / entry / "README.md").write_text("my notes")
    # Killed after the new one went in: the old one's README goes to it.
    shutil.copytree(out / entry, out / f".{entry}.old-otherhost-12345-0123abcd")
    (out / entry / "README.md").unlink()
    assert train(nano_cfg(pt_data, tok_dir, out, max_steps=3, keep_best=True), resume=True)["steps"] == 3
    assert (out / entry / "README.md").read_text() == "my notes"
    # Killed between the two renames: no final/ (best/), the old one aside, the new one a temporary.
    (out / entry).rename(out / f".{entry}.old-otherhost-12345-0123abcd")
    shutil.copytree(out / f".{entry}.old-otherhost-12345-0123abcd", out / f".{entry}.tmp-otherhost-12345-xyz")
    assert train(nano_cfg(pt_data, tok_dir, out, max_steps=4, keep_best=True), resume=True)["steps"] == 4
    assert (out / entry / "README.md").read_text() == "my notes"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    # A final/ (best/) that was a link is put back as the link it was, where nothing took its place.
    (out / entry).rename(tmp_path / "elsewhere")
    (out / f".{entry}.old-otherhost-12345-0123abcd").symlink_to(tmp_path / "elsewhere")
    clean_partial(out)
    assert (out / entry).is_symlink() and (out / entry / "README.md").read_text() == "my notes"
    (out / entry).unlink()
    (tmp_path / "elsewhere").rename(out / entry)
    # Such a name that is no folder, where the model is, is no model to put back: removed (a link, not what
    # it points to).
    (out / f".{entry}.old-otherhost-12345-0123abcd").write_text("x")
    (out / f".{entry}.old-otherhost-12346-0123abcd").symlink_to(tmp_path)
    assert train(nano_cfg(pt_data, tok_dir, out, max_steps=5, keep_best=True), resume=True)["steps"] == 5
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [] and tmp_path.is_dir()


@pytest.mark.parametrize("system", ["你是小K，一个\"会写诗\"的助手", ""], ids=["custom", "none"])
def test_the_chat_model_prompts_with_the_system_prompt_its_sft_data_carried(tmp_path, tok_dir, nano_model_dir,
                                                                            monkeypatch, system):
    """`tinyk data sft --system-prompt` decides what every chat without a system message starts with:
    the model directory records it, and its template (for transformers), chat and serve use it."""
    from transformers import AutoTokenizer

    from tinyk.data import prepare_sft
    from tinyk.engine import Engine
    from tinyk.serve import ChatServer, ServerConfig

    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"conversations": [{"from": "human", "value": f"你好{i}"},
                                                           {"from": "gpt", "value": "你好！"}]},
                                        ensure_ascii=False) + "\n" for i in range(40)), encoding="utf-8")
    data = tmp_path / "data"
    prepare_sft([chats], tok_dir, data, system_prompt=system, workers=1, show_progress=False)
    train(nano_cfg(data, None, tmp_path / "run", kind="sft", init=str(nano_model_dir), model={}, seq_len=64,
                   max_steps=1, save_every=1))
    final = tmp_path / "run" / "final"
    assert load_tokenizer(final).system_prompt == (system or None)
    assert load_tokenizer(nano_model_dir).system_prompt == "你是一个AI助手"  # a base model keeps the default
    user = [{"role": "user", "content": "在吗"}]
    hf_text = AutoTokenizer.from_pretrained(str(final)).apply_chat_template(user, tokenize=False,
                                                                            add_generation_prompt=True)
    assert hf_text == (f"<|im_start|>system\n{system}<|im_end|>\n" if system else "") + \
        "<|im_start|>user\n在吗<|im_end|>\n<|im_start|>assistant\n"
    assert load_tokenizer(final).apply_chat_template(user, add_generation_prompt=True) == hf_text
    engine = Engine.from_dir(final)
    server = ChatServer(engine, ServerConfig(model_name="m", log=False), port=0)
    assert engine.tok.decode(server.api.chat_ids({"messages": user})[0]) == hf_text
    server.server_close()
    server.api.close()
    import tinyk.cli.generate

    told = []
    monkeypatch.setattr(tinyk.cli.generate, "chat_session", lambda *a, **kw: told.append(kw["system"]))
    for flags, want in (([], system or None), (["--system", "你是诗人"], "你是诗人"), (["--system", ""], None)):
        with pytest.raises(SystemExit):
            main(["chat", "--model", str(final), "--message", "在吗", "--device", "cpu", *flags])
        assert told.pop() == want


def test_sft_says_how_many_conversations_a_short_seq_len_leaves_out_or_cuts(tmp_path, sft_data, nano_model_dir, capsys):
    def dropped_at(n: int) -> int:
        try:
            return SFTLoader(sft_data, "train", n, 2).dropped
        except TinykError:  # all of them
            return 0

    seq_len = next(n for n in range(8, 128, 4) if dropped_at(n))
    dropped = dropped_at(seq_len)
    total = json.loads((sft_data / "meta.json").read_text())["splits"]["train"]["documents"]
    train(nano_cfg(sft_data, None, tmp_path / "sft", kind="sft", init=str(nano_model_dir), model={}, seq_len=seq_len,
                   max_steps=1))
    out = capsys.readouterr().out
    assert (f"note: {dropped:,} of {total:,} training conversations ({dropped / total:.1%}) have no assistant token "
            f"within seq_len {seq_len} and are left out (the data's max_len is 512; a longer --seq-len, up to the "
            f"model's context of 128, keeps some)") in out  # at the context, a longer one is refused
    val_dropped = SFTLoader(sft_data, "val", seq_len, 1).dropped  # without a word, they changed the val loss
    assert (f"note: the val loss leaves out {val_dropped:,} conversation" in out) == (val_dropped > 0)
    offsets = np.load(sft_data / "train" / "offsets.npy")
    mask = np.fromfile(sft_data / "train" / "mask.bin", np.uint8)

    def answers_cut(seq_len: int) -> int:
        """Conversations that keep a loss token within the window and lose one past it."""
        return sum(bool(mask[a + 1:min(b, a + seq_len + 1)].any() and mask[a + seq_len + 1:b].any())
                   for a, b in zip(offsets[:-1], offsets[1:], strict=True))

    cut = SFTLoader(sft_data, "train", seq_len, 2).cut
    assert 0 < cut == answers_cut(seq_len)
    assert f"note: {cut:,} of {total:,} training conversations ({cut / total:.1%}) have answer tokens past seq_len " \
        f"{seq_len} + 1 tokens, which are cut off" in out
    # The newline after a last <|im_end|> is no answer: a window that leaves out only that cuts nothing.
    longest = int(np.diff(offsets).max())
    assert SFTLoader(sft_data, "train", longest - 2, 2).cut == answers_cut(longest - 2) < \
        int((np.diff(offsets) > longest - 1).sum())
    train(nano_cfg(sft_data, None, tmp_path / "long", kind="sft", init=str(nano_model_dir), model={}, seq_len=128,
                   max_steps=1))
    assert "are cut off" not in capsys.readouterr().out


def test_a_preset_beside_init_is_said_to_give_only_the_training_settings(tmp_path, sft_data, nano_model_dir, capsys):
    for preset, said in (("tiny", True), ("nano", False)):
        train(nano_cfg(sft_data, None, tmp_path / preset, kind="sft", init=str(nano_model_dir),
                       model={"preset": preset}, seq_len=128, max_steps=1))
        assert ("note: the model is --init's (dim 64, 2 layers, 4 heads), not the tiny preset's: the preset gives "
                "the training settings" in capsys.readouterr().out) == said
        saved = yaml.safe_load((tmp_path / preset / "config.yaml").read_text())["model"]
        assert "preset" not in saved and saved["dim"] == 64  # the run's config names the model it trained


@pytest.mark.parametrize("change", [dict(batch_size=4), dict(seq_len=128), dict(seed=7)], ids=lambda c: next(iter(c)))
def test_an_sft_run_resumes_only_with_its_sample_order(tmp_path, sft_data, nano_model_dir, change):
    """SFT's conversation order depends on the seed, on seq_len (length buckets) and on the global batch
    (steps are shuffled whole), so changing one on resume would repeat some conversations and skip
    others: refused, saying why and how to go on from the weights."""
    out = tmp_path / "sft"
    cfg = dict(kind="sft", init=str(nano_model_dir), model={}, seq_len=64, save_every=1)
    train(nano_cfg(sft_data, None, out, max_steps=2, **cfg))
    (name, value), = change.items()
    saved = nano_cfg(sft_data, None, out, **cfg).__dict__[name]
    if name == "seq_len":  # as a checkpoint of an earlier tinyk wrote it: seq_len beside the loader's state
        state_file = out / "checkpoints" / "step_0000002" / "state.json"
        state = json.loads(state_file.read_text())
        del state["loader"]["seq_len"]
        state_file.write_text(json.dumps(state))
    with pytest.raises(TinykError, match=f"saved with {name} {saved}; resume it with the same {name} .* in a new "
                                         f"run \\(--init {out / 'checkpoints' / 'step_0000002' / 'model'}\\)$"):
        train(nano_cfg(sft_data, None, out, max_steps=3, **{**cfg, **change}), resume=True)
    assert train(nano_cfg(sft_data, None, out, max_steps=3, **cfg), resume=True)["steps"] == 3


def test_force_loses_no_run_to_a_failure_or_a_kill_while_files_move(tmp_path, pt_data, tok_dir, monkeypatch):
    """--force sets the old run aside until the new one has started. A rename that fails midway (a
    read-only folder, a filesystem that cannot rename directories), or a kill at any moment, even
    while the old run is being put back, leaves it whole: the next start puts it back."""
    from tinyk.rundir import put_back, set_aside

    out = tmp_path / "run"
    train(nano_cfg(pt_data, tok_dir, out, max_steps=2, save_every=1))

    def files() -> dict:
        return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    before = files()
    real_rename, calls = Path.rename, []

    def rename_fails_at(n: int):
        def rename(self, target):
            calls.append(self)
            if len(calls) == n:
                raise PermissionError(13, "Permission denied", str(self))
            return real_rename(self, target)
        return rename

    monkeypatch.setattr(Path, "rename", rename_fails_at(3))
    with pytest.raises(TinykError, match=rf"^cannot write in {re.escape(str(out))}: permission denied$"):
        train(nano_cfg(pt_data, tok_dir, out, max_steps=3), force=True)
    monkeypatch.setattr(Path, "rename", real_rename)
    assert files() == before and not any(p.name.startswith(".") for p in out.iterdir())
    # A start killed after the set-aside, with the new run's first files written (as kill -9 leaves it):
    aside = set_aside(out)
    (out / "config.yaml").write_text("kind: pretrain\n")
    (out / "checkpoints").mkdir()
    with pytest.raises(TinykError, match=f"^put back the run in {out} that a killed --force start had set aside; "
                                         f"run the command again$"):
        train(nano_cfg(pt_data, tok_dir, out, max_steps=3), resume=True)
    assert files() == before
    # One killed right after the set-aside, before the new run wrote anything: --resume with only --out
    # finds the run's config where it was set aside, and the start puts the run back.
    set_aside(out)
    resumed = resolve_config("pretrain", flags={"out": str(out)}, resume=True)
    assert resumed.data == str(pt_data) and resumed.max_steps == 2
    with pytest.raises(TinykError, match="put back the run"):
        train(resumed, resume=True)
    assert files() == before
    # ... and one killed while putting the old run back (here: the rename back fails midway).
    aside = set_aside(out)
    (out / "config.yaml").write_text("kind: pretrain\n")
    calls.clear()
    monkeypatch.setattr(Path, "rename", rename_fails_at(3))
    with pytest.raises(PermissionError):
        put_back(out, aside)
    monkeypatch.setattr(Path, "rename", real_rename)
    assert any(p.name.startswith(".forced.back-") for p in out.iterdir())
    with pytest.raises(TinykError, match="put back the run"):
        train(nano_cfg(pt_data, tok_dir, out, max_steps=3), force=True)
    assert files() == before
    assert train(nano_cfg(pt_data, tok_dir, out, max_steps=3), resume=True)["steps"] == 3
    # A set-aside run left behind by a new run that got as far as a checkpoint is the one dropped, and
    # --resume goes on with the new run's settings.
    (out / ".forced.old-1-2").mkdir()
    (out / ".forced.old-1-2" / "config.yaml").write_text("kind: pretrain\nmax_steps: 99\n")
    assert resolve_config("pretrain", flags={"out": str(out)}, resume=True).max_steps == 3
    assert train(nano_cfg(pt_data, tok_dir, out, max_steps=4), resume=True)["steps"] == 4
    assert not any(p.name.startswith(".") for p in out.iterdir())


def test_ctrl_c_while_a_run_is_put_back_waits_until_it_is_back():
    """Held even with other threads running (a data loader's, a tracker's), where a signal mask would not be."""
    from tinyk.errors import signals_held

    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    moved = []
    try:
        with pytest.raises(KeyboardInterrupt):
            with signals_held():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0)
                moved.append("all")
    finally:
        stop.set()
        other.join()
    assert moved == ["all"] and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_stop_while_the_ranks_meet_leaves_no_empty_run_directory(tmp_path, pt_data, tok_dir, monkeypatch):
    """Under torchrun rank 0 makes --out, then waits for the other ranks (seconds, on a slow start): a Ctrl-C
    there left an empty directory, which the next start took for someone's folder or a finished run."""
    def interrupted(self, values):
        raise KeyboardInterrupt

    monkeypatch.setattr(Dist, "sum_host", interrupted)
    out = tmp_path / "new" / "run"
    with pytest.raises(KeyboardInterrupt):
        Trainer(nano_cfg(pt_data, tok_dir, out, max_steps=2))
    assert not out.exists() and (tmp_path / "new").is_dir()
    kept = tmp_path / "mine"
    kept.mkdir()  # an empty directory of the user's, given as --out, stays
    with pytest.raises(KeyboardInterrupt):
        Trainer(nano_cfg(pt_data, tok_dir, kept, max_steps=2))
    assert kept.is_dir()


def test_one_run_at_a_time_in_a_run_directory(tmp_path, pt_data, tok_dir):
    """A second writer (a job script's --resume, workers that outlived a killed torchrun) is refused
    before it touches anything; the directory is free again once the first run ends, even by a kill."""
    out = tmp_path / "run"
    first = Trainer(nano_cfg(pt_data, tok_dir, out, max_steps=2, save_every=1))
    before = sorted(p.name for p in out.rglob("*"))
    for resume, force in ((True, False), (False, True)):
        with pytest.raises(TinykError, match=f"run directory {out} is in use by another tinyk run"):
            train(nano_cfg(pt_data, tok_dir, out, max_steps=3), resume=resume, force=force)
    assert sorted(p.name for p in out.rglob("*")) == before
    assert first.run()["steps"] == 2
    assert train(nano_cfg(pt_data, tok_dir, out, max_steps=3), resume=True)["steps"] == 3
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                               "fd = os.open(sys.argv[1], os.O_RDONLY)\nfcntl.flock(fd, fcntl.LOCK_EX)\n"
                               "print('locked', flush=True)\ntime.sleep(60)\n", str(out)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(TinykError, match=rf"in use by another tinyk run \(process {holder.pid} \(\S*python\S* -c "
                                             rf"import fcntl, os, sys, time fd = .*\): still training"):
            train(nano_cfg(pt_data, tok_dir, out, max_steps=4), resume=True)
        # Nor "exists (use --resume or --force)" to a plain start: either flag would meet the same lock.
        with pytest.raises(TinykError, match="in use by another tinyk run"):
            train(nano_cfg(pt_data, tok_dir, out, max_steps=4))
        # The holder's rotation deleting the newest checkpoint while it is read: in use, not damaged.
        newest = checkpoints(out)[-1] / "model"
        (newest / "tokenizer.json").rename(tmp_path / "tokenizer.json")
        try:
            with pytest.raises(TinykError, match="in use by another tinyk run"):
                train(nano_cfg(pt_data, tok_dir, out, max_steps=4), resume=True)
        finally:
            (tmp_path / "tokenizer.json").rename(newest / "tokenizer.json")
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert train(nano_cfg(pt_data, tok_dir, out, max_steps=4), resume=True)["steps"] == 4


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_last_checkpoint(tmp_path, pt_data, tok_dir,
                                                                                  monkeypatch, capsys):
    out = tmp_path / "run"
    train(nano_cfg(pt_data, tok_dir, out, max_steps=2, save_every=1))
    real_save = torch.save

    def full_disk(obj, f, *a, **kw):
        if str(f).endswith("optimizer.pt"):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 862912 vs 862804\n"
                               "frame #0: c10::ThrowEnforceNotMet(...)")
        return real_save(obj, f, *a, **kw)

    def no_room(*a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    monkeypatch.setattr("tinyk.monitor.Monitor.close", no_room)  # closing fails on the full disk too
    with pytest.raises(SystemExit) as e:
        main(cli_args(pt_data, tok_dir, out, "--max-steps", "3", "--save-every", "1", "--resume"))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "Traceback" not in err[0]
    assert re.fullmatch(rf"tinyk: error: cannot write {re.escape(str(out / 'checkpoints' / 'step_0000003'))}: the "
                        r"write stopped part-way, as it does on a full disk \(torch: unexpected pos 862912 vs 862804\);"
                        r" [\d,]+ MB free on that disk \(the last checkpoint, checkpoints/step_0000002, is kept: "
                        r"--resume continues from it\)", err[0]), err[0]
    assert checkpoints(out)[-1].name == "step_0000002"
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    monkeypatch.undo()
    real_open = open

    def metrics_no_room(path, *a, **kw):
        if str(path).endswith("metrics.jsonl"):
            raise OSError(28, "No space left on device")
        return real_open(path, *a, **kw)

    monkeypatch.setattr("tinyk.monitor.open", metrics_no_room, raising=False)
    with pytest.raises(SystemExit) as e:
        main(cli_args(pt_data, tok_dir, out, "--max-steps", "3", "--log-every", "1", "--resume"))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and re.fullmatch(
        rf"tinyk: error: cannot write {re.escape(str(out / 'metrics.jsonl'))}: \[Errno 28\] No space left on device; "
        r"[\d,]+ MB free on that disk", err[0]), err
    monkeypatch.undo()
    monkeypatch.setattr("tinyk.monitor.plot_losses", no_room)  # the plot alone does not fail a run
    summary = train(nano_cfg(pt_data, tok_dir, out, max_steps=3), resume=True)
    assert summary["status"] == "completed" and "warning: loss.png not written" in capsys.readouterr().out


def test_checkpoints_are_on_the_disk_before_older_ones_are_deleted(tmp_path, pt_data, tok_dir, monkeypatch):
    """A rename orders nothing: after a power cut the newest checkpoint could be there with empty files
    and the one before it rotated away. Every file of a checkpoint is flushed before any deletion."""
    import tinyk.outputs

    events: list[tuple[str, str]] = []
    fsync, rmtree = tinyk.outputs.os.fsync, shutil.rmtree
    monkeypatch.setattr(tinyk.outputs.os, "fsync",
                        lambda fd: events.append(("sync", os.readlink(f"/proc/self/fd/{fd}"))) or fsync(fd))
    monkeypatch.setattr(shutil, "rmtree", lambda path, *a, **kw: events.append(("delete", str(path)))
                        or rmtree(path, *a, **kw))
    out = tmp_path / "run"
    train(nano_cfg(pt_data, tok_dir, out, max_steps=2, save_every=1, keep_checkpoints=1))

    def synced(events: list[tuple[str, str]], temporary: str) -> set[str]:
        """The files synced inside the temporary folder an output was written in, relative to it."""
        found = set()
        for what, path in events:
            parts = Path(path).parts
            tmp = next((k for k, part in enumerate(parts) if part.startswith(temporary)), None)
            if what == "sync" and tmp is not None:
                found.add(str(Path(*parts[tmp + 1:])) if tmp + 1 < len(parts) else ".")
        return found

    deleted = next(i for i, (what, path) in enumerate(events) if what == "delete" and "step_0000001" in path)
    newest = out / "checkpoints" / "step_0000002"
    files = {str(p.relative_to(newest)) for p in newest.rglob("*") if p.is_file()}
    assert files <= synced(events[:deleted], ".step_0000002.tmp-") and "model/model.safetensors" in files
    assert ("sync", str(out / "checkpoints")) in events[:deleted]  # the rename itself
    assert {p.name for p in (out / "final").iterdir()} <= synced(events, ".final.tmp-")
    assert ("sync", str(out)) in events


def test_a_resume_on_a_read_only_disk_is_one_line(tmp_path, pt_data, tok_dir, monkeypatch):
    """Cutting the log of a run killed mid-line, where nothing can be written: the folder and why, not
    an errno naming a hidden temporary file."""
    import errno

    out = tmp_path / "run"
    train(nano_cfg(pt_data, tok_dir, out, max_steps=2, save_every=1))
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"type": "train", "st')

    def read_only(path: Path, *a, **kw):
        raise OSError(errno.EROFS, "Read-only file system", str(path.parent / f".{path.name}.tmp-1"))

    monkeypatch.setattr("tinyk.monitor.atomic_file", read_only)
    with pytest.raises(TinykError, match=rf"^cannot write in {re.escape(str(out))}: the file system is read-only$"):
        train(nano_cfg(pt_data, tok_dir, out, max_steps=3), resume=True)


def test_a_checkpoints_folder_that_cannot_be_written_is_said_before_the_first_step(tmp_path, pt_data, tok_dir,
                                                                                   monkeypatch):
    """chmod a-w on checkpoints/: the resumed run trained up to its first save (1,000 steps by default)
    and then lost them; a finished run there still resumes to nothing, as on a read-only disk."""
    import errno
    import tempfile

    out = tmp_path / "run"
    train(nano_cfg(pt_data, tok_dir, out, max_steps=2, save_every=1))
    before = (out / "metrics.jsonl").read_bytes()
    real_mkstemp = tempfile.mkstemp

    def denied(*a, dir: str | None = None, **kw):
        if Path(dir) == out / "checkpoints":
            raise PermissionError(errno.EACCES, "Permission denied", str(Path(dir) / ".x.tmp-1"))
        return real_mkstemp(*a, dir=dir, **kw)

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    config = (out / "config.yaml").read_bytes()
    with pytest.raises(TinykError, match=rf"^cannot write in {re.escape(str(out / 'checkpoints'))}: permission "
                                         rf"denied$"):
        train(nano_cfg(pt_data, tok_dir, out, max_steps=4, save_every=2), resume=True)
    assert (out / "metrics.jsonl").read_bytes() == before and (out / "summary.json").is_file()
    assert (out / "config.yaml").read_bytes() == config  # a refused resume leaves the run's config as it was
    monkeypatch.setattr(tempfile, "mkstemp", real_mkstemp)
    leftovers = [out / ".write-check.tmp-abc", out / "checkpoints" / ".write-check.tmp-def"]  # a kill mid-check
    for p in leftovers:
        p.touch()
    assert train(nano_cfg(pt_data, tok_dir, out, max_steps=2), resume=True)["steps"] == 2  # finished: no write
    assert not any(p.exists() for p in leftovers)


def test_a_summary_a_full_disk_stops_is_named_with_the_space_left(tmp_path, pt_data, tok_dir, monkeypatch):
    """summary.json on a disk filled as the run ended: "what it prints could not be written to its standard
    output", where an unnamed write error was taken for stdout's."""
    import errno

    from tinyk import outputs

    real = outputs.atomic_file

    def full(path: Path, *a, **kw):
        if Path(path).name == "summary.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, *a, **kw)

    monkeypatch.setattr(outputs, "atomic_file", full)
    summary = re.escape(str(tmp_path / "run" / "summary.json"))
    with pytest.raises(TinykError, match=rf"^cannot write {summary}: \[Errno 28\] No space left on device; [\d,]+ MB "
                                         rf"free on that disk$"):
        train(nano_cfg(pt_data, tok_dir, tmp_path / "run", max_steps=1))


def test_a_resume_whose_data_has_moved_says_how_to_give_its_new_place(tmp_path, pt_data, tok_dir):
    out, moved = tmp_path / "run", tmp_path / "moved"
    train(nano_cfg(pt_data, tok_dir, out, max_steps=1, save_every=1))
    shutil.copytree(pt_data, moved)
    cfg = nano_cfg(tmp_path / "gone", tok_dir, out, max_steps=2)
    gone = re.escape(str(tmp_path / "gone"))
    with pytest.raises(TinykError, match=rf"^tinyk data directory not found: {gone} \(the data this run trained on; "
                                         rf"if it has moved, give its new place with --data\)$"):
        train(cfg, resume=True)
    assert train(replace(cfg, data=str(moved)), resume=True)["steps"] == 2


def test_force_on_a_run_whose_checkpoints_are_a_link_says_where_they_go(tmp_path, pt_data, tok_dir, capsys):
    """A checkpoints/ moved to a bigger disk behind a link: --force quietly put the new run's on the small one."""
    out, elsewhere = tmp_path / "run", tmp_path / "big-disk" / "ckpts"
    train(nano_cfg(pt_data, tok_dir, out, max_steps=1))
    elsewhere.parent.mkdir()
    (out / "checkpoints").rename(elsewhere)
    (out / "checkpoints").symlink_to(elsewhere)
    before = sorted(p.name for p in elsewhere.iterdir())
    capsys.readouterr()
    train(nano_cfg(pt_data, tok_dir, out, max_steps=1), force=True)
    assert f"tinyk: note: {out / 'checkpoints'} was a link to {elsewhere}; this run keeps its checkpoints in a " \
           f"folder of its own in the run, and the folder the link pointed to is left as it was" in \
           capsys.readouterr().err
    assert not (out / "checkpoints").is_symlink() and sorted(p.name for p in elsewhere.iterdir()) == before


def test_force_on_a_read_only_disk_is_one_line_and_keeps_the_run(tmp_path, pt_data, tok_dir, monkeypatch):
    """--force sets the old run aside before the new one starts; where that cannot be written the folder
    and why are named, not an errno naming the hidden folder it was moving into."""
    import errno

    out = tmp_path / "run"
    train(nano_cfg(pt_data, tok_dir, out, max_steps=1))
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    real_mkdir = Path.mkdir

    def mkdir(self: Path, *a, **kw):
        if self.name.startswith(".forced."):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *a, **kw)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    with pytest.raises(TinykError, match=rf"^cannot write in {re.escape(str(out))}: the file system is read-only$"):
        train(nano_cfg(pt_data, tok_dir, out, max_steps=2), force=True)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_a_run_without_matplotlib_says_there_is_no_plot(tmp_path, pt_data, tok_dir, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # how a missing package looks to find_spec
    train(nano_cfg(pt_data, tok_dir, tmp_path / "run", max_steps=2))
    assert "note: no loss.png without matplotlib (pip install matplotlib)" in capsys.readouterr().out
    assert not (tmp_path / "run" / "loss.png").exists()


def test_tensorboard_shows_one_curve_across_a_crash_and_resume(tmp_path, pt_data, tok_dir, monkeypatch):
    """A session logged steps 1-5 but its last checkpoint was step 4 (as after a kill): the resumed run
    logs 5-8 again, and TensorBoard must show each step once, with the resumed values."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    cfg = nano_cfg(pt_data, tok_dir, out, max_steps=8, save_every=2, eval_every=4, tracker=["tensorboard"])
    with monkeypatch.context() as m:
        stop_at(m, 5)
        train(cfg)
    shutil.rmtree(out / "checkpoints" / "step_0000005")
    train(cfg, resume=True)
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [s for s, _ in logged] == list(range(1, 9))
    assert {s: pytest.approx(v) for s, v in logged} == train_losses(out)
    # One point per step on every curve (an eval step's tokens are the train record's), no constants.
    assert [e.step for e in events.Scalars("train/tokens")] == list(range(1, 9))
    assert [e.step for e in events.Scalars("val/loss")] == [4, 8] and "val/bpb" in events.Tags()["scalars"]
    assert not {"train/flops_per_token", "train/step", "val/step"} & set(events.Tags()["scalars"])
    assert "config/text_summary" in events.Tags()["tensors"]  # the run's settings, in the text tab
    config = events.Tensors("config/text_summary")[-1].tensor_proto.string_val[0].decode()
    saved = json.loads(config.removeprefix("```\n").removesuffix("\n```"))
    assert saved["max_steps"] == 8 and saved["tracker"] == ["tensorboard"] and saved["model"]["n_layers"] == 2
    results = events.Tensors("summary/text_summary")[-1]  # and its results, as summary.json holds them
    assert results.step == 8 and json.loads(results.tensor_proto.string_val[0].decode().strip("`\n")) == \
        json.loads((out / "summary.json").read_text())


def test_a_validation_between_log_lines_has_its_tokens_in_the_trackers(tmp_path, pt_data, tok_dir):
    """--log-every 3 --eval-every 4: step 4's validation had no train line, and its tokens were dropped as
    a repeat of one, so W&B plotting by train/tokens lost the point."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train(nano_cfg(pt_data, tok_dir, out, max_steps=6, log_every=3, eval_every=4, tracker=["tensorboard"]))
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tokens = {e.step: e.value for e in events.Scalars("train/tokens")}
    assert [e.step for e in events.Scalars("val/loss")] == [4, 6] and sorted(tokens) == [3, 4, 6]
    assert tokens[4] == next(r["tokens"] for r in records(out, "eval") if r["step"] == 4)


def test_a_resume_before_the_first_checkpoint_is_a_new_curve_for_every_tracker(tmp_path, pt_data, tok_dir,
                                                                               monkeypatch):
    """Killed before its first checkpoint, the run starts again from step 0: TensorBoard must not keep the
    killed session's points beside the new ones, W&B and SwanLab get a new run id, and a tracker named
    twice still logs each point once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    cfg = nano_cfg(pt_data, tok_dir, out, max_steps=6, eval_every=0, tracker=["tensorboard", "tensorboard"])
    with monkeypatch.context() as m:
        stop_at(m, 4)
        train(cfg)
    for step in (out / "checkpoints").iterdir():
        shutil.rmtree(step)
    (out / ".tracker_id").write_text("killed-run")
    train(cfg, resume=True)
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 7))
    assert not (out / ".tracker_id").exists()


@pytest.mark.parametrize("log_every,eval_every", [(1, 0), (10, 1)])
def test_a_diverged_run_is_one_line_whichever_loss_sees_it_first(tmp_path, pt_data, tok_dir, capsys, log_every,
                                                                  eval_every):
    with pytest.raises(SystemExit) as e:
        main(cli_args(pt_data, tok_dir, tmp_path / "run", "--max-steps", "20", "--lr", "1e9", "--set", "warmup_steps=0",
                      "--set", f"log_every={log_every}", "--eval-every", str(eval_every)))
    code, err = e.value.code, capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "Traceback" not in err[0], err
    assert err[0].startswith("tinyk: error: training diverged at step ") and "lower --lr" in err[0]
    assert ("val loss" in err[0]) == bool(eval_every)


@pytest.mark.parametrize("env,says", [
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 is set but RANK, MASTER_ADDR, MASTER_PORT are not: launch with torchrun"),
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1"}, "but MASTER_PORT is not"),
    ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc' is not a whole number"),
    ({"LOCAL_RANK": "x"}, "LOCAL_RANK='x' is not a whole number"),
    ({"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}, "RANK=2 does not fit"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0: a job has at least one process"),  # it blamed RANK=0
])
def test_a_partial_torchrun_environment_is_one_line(tmp_path, pt_data, tok_dir, capsys, monkeypatch, env, says):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as e:
        main(cli_args(pt_data, tok_dir, tmp_path / "run", "--max-steps", "1"))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and says in err[0], err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_cuda_graph_compile_modes_are_refused_with_gradient_accumulation(tmp_path, pt_data, tok_dir, mode):
    with pytest.raises(TinykError, match=rf"compile_mode {mode} replays CUDA graphs.* the 4 micro-batches .*"
                                         r"use max-autotune-no-cudagraphs"):
        train(nano_cfg(pt_data, tok_dir, tmp_path / "run", compile=True, compile_mode=mode, micro_batch=2))
    assert not (tmp_path / "run").exists()


def test_a_run_ends_only_the_process_group_it_started(tmp_path, tok_dir, monkeypatch):
    """A script that set up torch.distributed itself keeps its group; one tinyk started ends, even when
    the run's set-up fails."""
    import tinyk.train

    ended = []
    monkeypatch.setattr(tinyk.train.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(tinyk.train.dist, "destroy_process_group", lambda: ended.append(1))
    # The job's one other process refuses alike: the refusal is shared before the run ends.
    monkeypatch.setattr(Dist, "gather_host", lambda self, value: [value] * self.world)
    monkeypatch.setattr(Dist, "barrier", lambda self: None)
    for owns in (False, True):
        monkeypatch.setattr(tinyk.train, "setup_dist", lambda device, owns=owns: Dist(world=2, owns_group=owns))
        with pytest.raises(TinykError, match="tinyk data directory not found"):
            train(nano_cfg(tmp_path / "no-data", tok_dir, tmp_path / "run"))
        assert ended == ([1] if owns else [])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pty window sizes as Linux sets them")
def test_a_terminal_with_no_rows_gets_plain_lines_not_a_hidden_bar():
    """tqdm hides its bar on a terminal that reports 0 rows (some containers' and CI's): such a
    terminal gets the per-interval lines a pipe gets, so progress still shows."""
    import fcntl
    import pty
    import struct
    import termios

    from tinyk.outputs import fd_shows_a_bar, shows_a_bar

    leader, follower = pty.openpty()
    try:
        with open(follower, "w", closefd=False) as terminal:
            for rows, shown in ((0, False), (24, True)):
                fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", rows, 80, 0, 0))
                # fd_shows_a_bar: the tokenizer's, whose library draws its bar on a file descriptor
                assert shows_a_bar(terminal) is shown and fd_shows_a_bar(follower) is shown
    finally:
        os.close(leader)
        os.close(follower)
    assert not shows_a_bar(io.StringIO())


def test_plain_progress_lines_say_the_time_taken_and_left(tmp_path, pt_data, tok_dir, capsys):
    """Under `| tee log` or nohup each log interval is a line; it had raw seconds and no ETA, which the
    bar shows."""
    train(nano_cfg(pt_data, tok_dir, tmp_path / "run", max_steps=6, log_every=2, progress=True))
    lines = [ln for ln in capsys.readouterr().out.splitlines() if re.match(r"step \d/", ln)]  # not eval lines
    assert [ln.split(":")[0] for ln in lines] == ["step 2/6", "step 4/6", "step 6/6"]
    times = r"elapsed \d\d:\d\d"
    assert all(re.fullmatch(rf"step \d/6: loss [\d.]+ lr [\d.e+-]+ [\d.]+k? tok/s mfu [\d.]+%, {times}, ETA \d\d:\d\d",
                            ln) for ln in lines[:2]), lines
    assert re.fullmatch(rf"step 6/6: .*, {times}", lines[2]), lines  # nothing left


def test_the_loss_plot_says_nothing_without_a_writable_home(tmp_path):
    """A container run as another user has no writable home: matplotlib's two lines on where its font
    cache went are nothing the run needs to show."""
    code = ("import sys; from pathlib import Path; from tinyk.monitor import plot_losses; "
            "sys.exit(0 if plot_losses([{'tokens': 1, 'loss': 2.0}, {'tokens': 2, 'loss': 1.5, 'val_loss': 1.7}], "
            "Path(sys.argv[1])) else 1)")
    env = {k: v for k, v in os.environ.items() if k not in ("MPLCONFIGDIR", "XDG_CONFIG_HOME", "XDG_CACHE_HOME")}
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "loss.png")], capture_output=True, text=True,
                       env={**env, "HOME": "/proc/self"}, timeout=120)  # nothing can be made there, not even as root
    assert (r.returncode, r.stderr) == (0, "") and (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_a_token_budget_is_max_tokens_over_the_tokens_a_step_trains():
    """--max-tokens T at batch B x seq_len S is ceil(T / (B*S)) steps; the existing cases are so small that
    dividing by seq_len + 1 (a window's x-and-y length) rounds to the same counts."""
    for b, s, t in ((2, 16, 3200), (8, 32, 256 * 40), (1, 100, 100 * 50 + 1), (4, 128, 10 ** 6)):
        assert total_steps(TrainConfig(batch_size=b, seq_len=s, max_tokens=t), 10 ** 9) == math.ceil(t / (b * s))


def test_an_epoch_budget_resumed_in_its_second_epoch_keeps_its_length(tmp_path, pt_data, tok_dir, monkeypatch):
    """The samples done on resume count whole epochs too: 128 windows of 128 tokens, 64 a step, 2 epochs = 4
    steps, resumed at step 3 (epoch 1, cursor 64). The other resumes stop inside the first epoch (only
    test_cli_prints_one_line's header of a finished one-step run looks past it)."""
    out = tmp_path / "run"
    cfg = nano_cfg(pt_data, tok_dir, out, seq_len=128, batch_size=64, max_steps=None, epochs=2)
    with monkeypatch.context() as m:
        stop_at(m, 3)
        assert train(cfg)["steps"] == 3
    t = Trainer(cfg, resume=True)
    try:
        assert t.loader.num_windows == 128 and t.total_steps == 4
    finally:
        t.close()


def test_fp16_loss_scale_is_restored_on_resume(tmp_path, pt_data, tok_dir, monkeypatch):
    """rng.pt holds GradScaler's state; a resume must continue at the saved scale, not start over at the
    initial one (the existing test only looks for a "scale" key, and overflows whatever the scale)."""
    real = torch.amp.GradScaler
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(torch.amp, "GradScaler", lambda *a, **k: real(*a, **{**k, "init_scale": 2.0 ** 40}))
        train(nano_cfg(pt_data, tok_dir, out, max_steps=2, dtype="fp16"))
    saved = torch.load(checkpoints(out)[-1] / "rng.pt", weights_only=True)["scaler"]["scale"]
    assert saved < 2.0 ** 40  # the overflowing steps lowered it
    t = Trainer(nano_cfg(pt_data, tok_dir, out, max_steps=3, dtype="fp16"), resume=True)
    try:
        assert t.scaler.get_scale() == saved
    finally:
        t.close()


def test_a_resume_trains_with_the_optimizer_settings_given_now(tmp_path, pt_data, tok_dir):
    """AdamW's moments come from optimizer.pt, its hyper-parameters from this session's config."""
    out = tmp_path / "run"
    train(nano_cfg(pt_data, tok_dir, out, max_steps=1, weight_decay=0.1))
    t = Trainer(nano_cfg(pt_data, tok_dir, out, max_steps=2, weight_decay=0.02, beta1=0.8, beta2=0.9, eps=1e-6),
                resume=True)
    try:
        assert [(g["weight_decay"], g["betas"], g["eps"]) for g in t.opt.param_groups] == \
            [(0.02, (0.8, 0.9), 1e-6), (0.0, (0.8, 0.9), 1e-6)]
    finally:
        t.close()


def test_best_records_the_val_loss_and_step_it_was_kept_for(tmp_path, pt_data, tok_dir):
    """best/'s header is what a resumed run compares against and what its summary reports."""
    out = tmp_path / "run"
    summary = train(nano_cfg(pt_data, tok_dir, out, max_steps=3, eval_every=1, keep_best=True, lr=0.3))
    evals = records(out, "eval")
    best = min(evals, key=lambda r: r["val_loss"])
    assert best_kept_so_far(out / "best") == (best["val_loss"], best["step"])
    assert (summary["best_model_step"], summary["best_model_val_loss"]) == (best["step"], best["val_loss"])
    (out / "final").rename(tmp_path / "final.old")  # resume to write final/ again: best/ is read back from its header
    again = train(nano_cfg(pt_data, tok_dir, out, max_steps=3, eval_every=1, keep_best=True, lr=0.3), resume=True)
    assert (again["best_model_step"], again["best_model_val_loss"]) == (best["step"], best["val_loss"])


def test_tokens_per_s_leaves_out_evaluations_and_checkpoints(tmp_path, pt_data, tok_dir, monkeypatch):
    """On a clock where a step takes 1 s, an evaluation 20 s and a checkpoint 6 s, every log window trains
    8 x 32 tokens a second."""
    timed_trainer(monkeypatch, step_s=1.0, eval_s=20.0, save_s=6.0)
    out = tmp_path / "run"
    train(nano_cfg(pt_data, tok_dir, out, max_steps=4, eval_every=1, save_every=1, log_every=1, peak_tflops=1))
    assert [r["tokens_per_s"] for r in records(out, "train")] == [256.0] * 4


def test_an_sft_eval_record_is_at_its_steps_tokens(tmp_path, sft_data, nano_model_dir):
    """loss.png puts validation points at the tokens trained (as the train curve), not the loss tokens."""
    out = tmp_path / "sft"
    train(nano_cfg(sft_data, None, out, kind="sft", init=str(nano_model_dir), model={}, seq_len=64, max_steps=2,
                   eval_every=2))
    train_rec, eval_rec = records(out, "train")[-1], records(out, "eval")[-1]
    assert eval_rec["step"] == train_rec["step"] == 2
    assert eval_rec["tokens"] == train_rec["tokens"] > train_rec["loss_tokens"]


def test_logged_mfu_is_per_device(tmp_path, pt_data, tok_dir):
    """A job's FLOP/s is summed over its processes; MFU divides it by the processes' peaks (each window's, as
    the whole run's does). Only a two-process run shows it, and none of those checks the MFU."""
    t = Trainer(nano_cfg(pt_data, tok_dir, tmp_path / "run", max_steps=1, peak_tflops=1.0))
    try:
        t.dist.world = 2
        assert t._mfu(1e12) == 0.5
    finally:
        t.dist.world = 1
        t.close()


def test_the_loss_plot_draws_both_curves(tmp_path):
    train_recs = [{"type": "train", "step": s, "tokens": 256 * s, "loss": 6 - s / 4} for s in range(1, 9)]
    eval_recs = [{"type": "eval", "step": s, "tokens": 256 * s, "val_loss": 6.5 - s / 4} for s in (4, 8)]
    pngs = {}
    for name, recs in (("both", train_recs + eval_recs), ("train", train_recs), ("val", eval_recs)):
        assert plot_losses(recs, tmp_path / f"{name}.png")
        pngs[name] = (tmp_path / f"{name}.png").read_bytes()
    assert len(set(pngs.values())) == 3


def test_checkpoints_are_complete_ones_in_step_order(tmp_path):
    """A step folder without state.json (a copy under way) is not a checkpoint; and order is by step, past
    9,999,999 too (names then grow an 8th digit)."""
    root = tmp_path / "checkpoints"
    for step, complete in ((3, True), (9_999_999, True), (10_000_000, True), (10_000_001, False)):
        (root / f"step_{step:07d}").mkdir(parents=True)
        if complete:
            (root / f"step_{step:07d}" / "state.json").write_text("{}")
    assert [p.name for p in checkpoints(tmp_path)] == ["step_0000003", "step_9999999", "step_10000000"]


def test_a_killed_checkpoint_write_is_cleaned_up(tmp_path):
    """A checkpoint's temporary folder left by a kill (gigabytes of a partial copy) goes at the next start;
    kept, --force would also refuse, calling it the user's file."""
    leftover = tmp_path / "checkpoints" / ".step_0000004.tmp-otherhost-4242-abcd1234"
    (leftover / "model").mkdir(parents=True)
    (tmp_path / "config.yaml").write_text("kind: pretrain\n")
    clean_partial(tmp_path)
    assert not leftover.exists()


def test_micro_batches_add_up_to_the_whole_batch(tmp_path, pt_data, tok_dir):
    """Accumulating 4 micro-batches of 2 trains what one batch of 8 does. (Only the two-process torchrun test,
    the file's slowest, caught a gradient zeroed per micro-batch or scaled by their number.)"""
    whole = train(nano_cfg(pt_data, tok_dir, tmp_path / "whole", max_steps=3))
    micro = train(nano_cfg(pt_data, tok_dir, tmp_path / "micro", max_steps=3, micro_batch=2))
    losses = [[r["loss"] for r in records(tmp_path / name, "train")] for name in ("whole", "micro")]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5) and len(losses[0]) == 3
    assert micro["final_val_loss"] == pytest.approx(whole["final_val_loss"], rel=1e-5)


def test_force_refuses_to_delete_the_users_files_in_best(tmp_path, pt_data, tok_dir):
    out = tmp_path / "run"
    train(nano_cfg(pt_data, tok_dir, out, max_steps=2, eval_every=1, keep_best=True))
    (out / "best" / "README.md").write_text("card")
    with pytest.raises(TinykError, match=r"--force would delete best/README.md in .* move them out of the run "
                                         r"first"):
        train(nano_cfg(pt_data, tok_dir, out, max_steps=1), force=True)
    assert (out / "best" / "README.md").read_text() == "card"


@pytest.mark.parametrize("linked", ["final", "checkpoints"])
def test_force_replaces_a_folder_that_is_a_link_and_leaves_its_target(tmp_path, pt_data, tok_dir, linked):
    """A final/ or checkpoints/ moved to a bigger disk and linked back: --force replaces the link and
    leaves what it points to, so the user's files there are no reason to refuse."""
    out, elsewhere = tmp_path / "run", tmp_path / "big-disk" / linked
    train(nano_cfg(pt_data, tok_dir, out, max_steps=1, save_every=1))
    elsewhere.parent.mkdir()
    (out / linked).rename(elsewhere)
    (out / linked).symlink_to(elsewhere)
    card = elsewhere / "README.md" if linked == "final" else next(elsewhere.glob("step_*")) / "notes.txt"
    card.write_text("card")
    assert train(nano_cfg(pt_data, tok_dir, out, max_steps=1), force=True)["steps"] == 1
    assert not (out / linked).is_symlink() and card.read_text() == "card"


def test_a_resume_that_cannot_write_its_config_leaves_the_old_one(tmp_path, pt_data, tok_dir, monkeypatch):
    import errno

    out = tmp_path / "run"
    train(nano_cfg(pt_data, tok_dir, out, max_steps=2, save_every=1))
    saved = (out / "config.yaml").read_text()
    write_text = Path.write_text

    def full_disk(self, data, *a, **kw):
        if "config.yaml" in self.name:
            write_text(self, data[:10], *a, **kw)
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return write_text(self, data, *a, **kw)

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises((TinykError, OSError)):
        train(nano_cfg(pt_data, tok_dir, out, max_steps=3), resume=True)
    monkeypatch.undo()
    assert (out / "config.yaml").read_text() == saved
    assert train(nano_cfg(pt_data, tok_dir, out, max_steps=3), resume=True)["steps"] == 3


def test_a_project_folder_with_its_own_config_yaml_is_no_run_around_the_out(tmp_path, pt_data, tok_dir):
    (tmp_path / "config.yaml").write_text("lr: 0.001\n")  # a run has a config.yaml *and* checkpoints/
    assert train(nano_cfg(pt_data, tok_dir, tmp_path / "runs" / "a", max_steps=1))["steps"] == 1


def test_a_kill_while_the_replaced_run_is_deleted_leaves_no_part_of_it_to_put_back(tmp_path, monkeypatch):
    from tinyk.rundir import ASIDE, drop_aside, set_aside

    out = tmp_path / "run"
    (out / "checkpoints" / "step_0000001").mkdir(parents=True)
    (out / "config.yaml").write_text("kind: pretrain\n")
    (out / "metrics.jsonl").write_text("{}\n")
    aside = set_aside(out)
    real = shutil.rmtree

    def interrupted(path, ignore_errors=False):
        first = sorted(Path(path).iterdir())[0]  # one entry gone, then the kill
        real(first) if first.is_dir() else first.unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", interrupted)
    with pytest.raises(KeyboardInterrupt):
        drop_aside(aside)
    monkeypatch.setattr(shutil, "rmtree", real)
    assert not any(ASIDE.match(p.name) for p in out.iterdir())
    clean_partial(out)
    assert list(out.iterdir()) == []


def test_the_cpu_peak_is_2n3_flops_over_the_fastest_product(monkeypatch):
    from tinyk import monitor

    now, durations = [0.0], iter([5.0, 2.0, 0.5, 3.0, 4.0, 4.0])  # a warm-up product, then the timed ones

    def mm(a, b):
        now[0] += next(durations)
        return a

    monkeypatch.setattr(monitor, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    monkeypatch.setattr(monitor.torch, "mm", mm)
    assert monitor.measure_matmul_flops(seconds=0.15, n=64) == 2 * 64 ** 3 / 0.5


@pytest.mark.parametrize("dtype,ms_per_256,size", [
    (torch.bfloat16, 0.5, 1024), (torch.bfloat16, 25.0, 256), (torch.float16, 25.0, 256), (torch.float32, 25.0, 1024)])
def test_the_cpu_peak_takes_a_smaller_product_where_a_half_dtype_is_slow(monkeypatch, dtype, ms_per_256, size):
    """bf16 on a CPU without its instructions took 2.3 s per 1024 product, 9 s at every run's start: a half
    dtype whose 1024 product would take over the timing's 0.15 s is timed at 256. fp32 always takes the
    full size: a busy moment slowing a small product must not shrink its peak to a small product's."""
    from tinyk import monitor

    now, sizes = [0.0], []

    def mm(a, b):
        sizes.append(a.shape[0])
        now[0] += ms_per_256 / 1e3 * (a.shape[0] / 256) ** 3
        return a

    monkeypatch.setattr(monitor, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    monkeypatch.setattr(monitor.torch, "mm", mm)
    flops = monitor.measure_matmul_flops(seconds=0.15, n=1024, dtype=dtype)
    # a warm-up and three timed products at 256 first, for a half dtype only
    assert sizes[:4] == [1024 if dtype == torch.float32 else 256] * 4 and set(sizes[4:]) <= {size} == {sizes[-1]}
    assert flops == pytest.approx(2 * 256 ** 3 / (ms_per_256 / 1e3))


def test_a_plain_progress_line_shows_each_number_in_its_unit(tmp_path, capsys):
    from tinyk.monitor import Monitor

    mon = Monitor(tmp_path, 10, 0, True)  # stdout is no terminal here: a line each log interval
    for step, rate, mfu in ((2, 950.0, None), (4, 1500.0, 0.1234), (6, 2.5e6, 0.5)):
        mon.log_train({"step": step, "tokens": 512 * step, "loss": 2.345678, "lr": 3e-4, "tokens_per_s": rate,
                       "mfu": mfu, "elapsed_s": 65.0}, left_s=90.0)
    mon.log_eval({"step": 6, "tokens": 3072, "val_loss": 2.5, "val_bpb": 1.25, "elapsed_s": 66.0})
    mon.close()
    assert capsys.readouterr().out.splitlines() == [
        "step 2/10: loss 2.3457 lr 3.00e-04 950 tok/s, elapsed 01:05, ETA 01:30",
        "step 4/10: loss 2.3457 lr 3.00e-04 1.5k tok/s mfu 12.3%, elapsed 01:05, ETA 01:30",
        "step 6/10: loss 2.3457 lr 3.00e-04 2.50M tok/s mfu 50.0%, elapsed 01:05, ETA 01:30",
        "step 6: val loss 2.5000, 1.2500 bits/byte"]


def test_output_sent_to_a_file_gets_lines_while_the_terminal_shows_the_bar(tmp_path, monkeypatch, capsys):
    from tinyk.monitor import Monitor

    monkeypatch.setattr("tinyk.monitor.shows_a_bar", lambda stream: True)  # stderr is a terminal
    mon = Monitor(tmp_path, 10, 4, True)  # resumed at step 4; stdout (captured) is a file
    assert not mon.bar.disable and mon.bar.n == 4 and mon.lines
    mon.log_train({"step": 5, "tokens": 5, "loss": 1.0, "lr": 1e-3, "tokens_per_s": 10.0, "elapsed_s": 1.0})
    mon.close()
    assert "step 5/10: loss 1.0000" in capsys.readouterr().out


def _fake_wandb(monkeypatch, sent: list, ids: list | None = None):
    """A wandb module whose runs record the steps they get in `sent`, and their ids in `ids`."""
    class Run:
        def log(self, values, step):
            sent.append(step)

        def finish(self, exit_code=None):
            pass

    wandb = type(sys)("wandb")
    wandb.init = lambda **kw: (ids.append(kw["id"]) if ids is not None else None) or Run()
    monkeypatch.setitem(sys.modules, "wandb", wandb)


def test_tracker_runs_get_each_step_once_and_a_new_run_gets_every_step(tmp_path, monkeypatch):
    from tinyk.monitor import Trackers

    sent, started = [], []
    _fake_wandb(monkeypatch, sent, started)
    fresh = Trackers(["wandb", "wandb"], tmp_path, {}, "tinyk", "run", start_step=0, logged_upto=4)
    for step in (1, 2, 3):
        fresh.log({"train/loss": 1.0}, step)
    fresh.close()
    resumed = Trackers(["wandb"], tmp_path, {}, "tinyk", "run", start_step=2, logged_upto=3)
    for step in (3, 4):
        resumed.log({"train/loss": 1.0}, step)
    resumed.close()
    assert sent == [1, 2, 3, 4] and len(started) == 2 and started[0] == started[1]
    # W&B added on a resume of a run that never had it is a new W&B run: it gets the steps replayed too.
    (tmp_path / ".tracker_id").unlink()
    sent.clear()
    added = Trackers(["wandb"], tmp_path, {}, "tinyk", "run", start_step=2, logged_upto=3)
    for step in (3, 4):
        added.log({"train/loss": 1.0}, step)
    added.close()
    assert sent == [3, 4]


def test_ctrl_c_while_a_tracker_starts_finishes_those_already_started(tmp_path, monkeypatch):
    from tinyk.monitor import Trackers

    finished = []

    class FakeRun:
        def __init__(self):
            self.summary = {}  # W&B's run summary

        def finish(self, exit_code=None):
            finished.append(exit_code)

    def ctrl_c(**kw):
        raise KeyboardInterrupt

    wandb, swanlab = type(sys)("wandb"), type(sys)("swanlab")
    wandb.init, swanlab.init = (lambda **kw: FakeRun()), ctrl_c
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setitem(sys.modules, "swanlab", swanlab)
    with pytest.raises(KeyboardInterrupt):
        Trackers(["wandb", "swanlab"], tmp_path, {}, "tinyk", "run")
    assert finished == [1]


def test_an_empty_tracker_id_file_gets_a_new_id(tmp_path, monkeypatch):
    from tinyk.monitor import Trackers

    ids = []
    wandb = type(sys)("wandb")
    wandb.init = lambda **kw: ids.append(kw["id"]) or types.SimpleNamespace(finish=lambda exit_code=None: None)
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    (tmp_path / ".tracker_id").write_text("\n")
    for _ in range(2):  # resumed twice: the same id both times
        Trackers(["wandb"], tmp_path, {}, "tinyk", "run", start_step=4).close()
    assert len(ids[0]) == 12 and ids[0] == ids[1] and (tmp_path / ".tracker_id").read_text() == f"{ids[0]}\nwandb\n"


def test_a_tracker_added_on_a_resume_gets_the_steps_the_others_already_hold(tmp_path, monkeypatch):
    from tinyk.monitor import Trackers

    sent = []

    def tracker(name):
        module = type(sys)(name)
        module.init = lambda **kw: module
        module.log = lambda values, step: sent.append((name, step))
        module.finish = lambda **kw: None
        monkeypatch.setitem(sys.modules, name, module)

    tracker("wandb")
    tracker("swanlab")
    Trackers(["wandb"], tmp_path, {}, "tinyk", "run").close()
    both = Trackers(["wandb", "swanlab"], tmp_path, {}, "tinyk", "run", start_step=2, logged_upto=3)
    for step in (3, 4):
        both.log({"train/loss": 1.0}, step)
    both.close()
    assert sent == [("swanlab", 3), ("wandb", 4), ("swanlab", 4)]
    sent.clear()
    again = Trackers(["swanlab", "wandb"], tmp_path, {}, "tinyk", "run", start_step=2, logged_upto=3)
    again.log({"train/loss": 1.0}, 3)
    again.close()
    assert sent == []
    # A SwanLab that takes no run id (before 0.6) started first: the file still begins with the id W&B reads.
    (tmp_path / ".tracker_id").unlink()
    ids = []
    sys.modules["wandb"].init = lambda **kw: ids.append(kw["id"]) or sys.modules["wandb"]
    Trackers(["swanlab", "wandb"], tmp_path, {}, "tinyk", "run").close()
    assert (tmp_path / ".tracker_id").read_text() == f"{ids[0]}\nswanlab\nwandb\n" and len(ids[0]) == 12
    # A run id an earlier tinyk saved (the id alone) does not say which trackers hold the run: all do.
    (tmp_path / ".tracker_id").write_text("0123456789ab")
    Trackers(["swanlab"], tmp_path, {}, "tinyk", "run", start_step=2, logged_upto=3).log({"train/loss": 1.0}, 3)
    assert sent == []


def test_the_loss_plot_puts_both_curves_on_the_tokens_axis(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    drawn, plot = [], Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda self, x, y, *a, **kw: drawn.append((kw["label"], x, y))
                        or plot(self, x, y, *a, **kw))
    recs = [{"type": "train", "step": s, "tokens": 256 * s, "loss": 6 - s / 4} for s in (1, 2)]
    assert plot_losses([*recs, {"type": "eval", "step": 2, "tokens": 512, "val_loss": 5.9}], tmp_path / "loss.png")
    assert drawn == [("train", (256, 512), (5.75, 5.5)), ("validation", (512,), (5.9,))]


def test_a_failed_plot_keeps_the_last_loss_png(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    recs = [{"type": "train", "step": s, "tokens": 256 * s, "loss": 6 - s / 4} for s in (1, 2)]
    plot_losses(recs, tmp_path / "loss.png")
    before = (tmp_path / "loss.png").read_bytes()

    def half_then_full_disk(self, fname, *a, **kw):
        Path(fname).write_bytes(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", half_then_full_disk)
    with pytest.raises(OSError):
        plot_losses(recs, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes() == before and os.listdir(tmp_path) == ["loss.png"]


def test_cutting_the_log_back_keeps_it_whole_when_the_write_fails(tmp_path):
    import resource

    from tinyk.monitor import Monitor

    lines = "".join(json.dumps({"type": "train", "step": s, "loss": 1.0, "tokens": 256 * s}) + "\n"
                    for s in range(1, 11))
    (tmp_path / "metrics.jsonl").write_text(lines)
    mon = Monitor(tmp_path, 10, 8, False)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    xfsz = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG), not the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (100, hard))
    try:
        with pytest.raises(TinykError):
            mon.truncate(8)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, xfsz)
    assert (tmp_path / "metrics.jsonl").read_text() == lines and os.listdir(tmp_path) == ["metrics.jsonl"]


def test_rates_change_unit_where_they_would_round_up_to_the_next():
    from tinyk.monitor import _fmt_rate

    assert [_fmt_rate(x) for x in (999.4, 999.6, 999_940, 999_960, 2.5e6)] == ["999", "1.0k", "999.9k", "1.00M",
                                                                                "2.50M"]


def test_metrics_hold_no_infinity():
    from tinyk.monitor import finite

    assert [finite(x) for x in (float("inf"), float("-inf"), float("nan"), 2.5)] == [None, None, None, 2.5]


def test_a_metrics_line_that_is_no_record_is_named(tmp_path):
    from tinyk.monitor import Monitor

    good = json.dumps({"type": "train", "step": 1, "loss": 1.0, "tokens": 256}) + "\n"
    note = '{"note": "lr raised here"}\n'
    (tmp_path / "metrics.jsonl").write_text(good + note + good.replace('"step": 1', '"step": 2'))
    with pytest.raises(TinykError, match=r"metrics.jsonl line 2 is damaged \(not a metrics record\); repair or "
                                         r"delete that line to resume$"):
        Monitor(tmp_path, 10, 1, False)
    # Its number is the editor's, blank lines counted (the line named was a good one, after a blank line).
    (tmp_path / "metrics.jsonl").write_text(good + "\n" + note + good.replace('"step": 1', '"step": 2'))
    with pytest.raises(TinykError, match=r"metrics.jsonl line 3 is damaged \(not a metrics record\)"):
        Monitor(tmp_path, 10, 1, False)


def test_a_sample_is_one_line_of_the_log(tmp_path, capsys):
    from tinyk.monitor import Monitor

    mon = Monitor(tmp_path, 10, 0, False)
    mon.log_samples(6, [("你好", "第一行\n第二行")])
    assert capsys.readouterr().out == "step 6 sample: 你好 → 第一行⏎第二行\n"
    [rec] = map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
    assert rec["samples"] == [{"prompt": "你好", "text": "第一行\n第二行"}]


CONFIG_FLAGS = {"out": "o", "data": "d"}


# Each of the config's value checks, just past its bound: one line naming the key and its range.
@pytest.mark.parametrize("sets,message", [
    (["seq_len=0"], "seq_len must be positive"),
    (["min_lr_ratio=1.01"], "min_lr_ratio must be between 0 and 1"),
    (["min_lr_ratio=-0.1"], "min_lr_ratio must be between 0 and 1"),
    (["warmup_steps=-1"], "warmup_steps must be >= 0"),
    (["weight_decay=-0.1"], "weight_decay must be >= 0"),
    (["beta2=1"], "beta1 and beta2 must be in [0, 1)"),
    (["eps=0"], "eps must be positive"),
    (["peak_tflops=0"], "peak_tflops must be positive"),
    ([f"seed={2**32}"], "seed must be between 0 and 2**32 - 1"),
    (["log_every=0"], "log_every must be at least 1"),
    (["keep_checkpoints=0"], "keep_checkpoints must be at least 1"),
    (["sample_tokens=0"], "sample_tokens must be in 1..4096"),
    (["sample_tokens=4097"], "sample_tokens must be in 1..4096"),
    (["save_every=-1"], "eval_every and save_every must be >= 0 (0 = only at the end)"),
    (["eval_every=-1"], "eval_every and save_every must be >= 0 (0 = only at the end)"),
    (['tokenizer=""'], "out, data, tokenizer and init must not be empty paths (an empty one is the current folder)"),
    (['init=""'], "out, data, tokenizer and init must not be empty paths (an empty one is the current folder)"),
    (["micro_batch=65537"], "micro_batch must be in 1..65536"),
    (["epochs=1000000001"], "epochs and max_minutes must be at most 1e9"),
])
def test_each_config_bound_is_refused_just_past_it(sets, message):
    with pytest.raises(TinykError, match=f"^{re.escape(message)}$"):
        resolve_config("pretrain", preset="nano", flags=CONFIG_FLAGS, sets=sets)


# And at each bound, which is inside the range (1e18 steps included; grad_clip 0 turns clipping off).
def test_each_config_bound_is_accepted_at_its_edge():
    edge = ["min_lr_ratio=1", "decay_fraction=1", "warmup_steps=0", "weight_decay=0", "grad_clip=0", "beta1=0",
            f"seed={2**32 - 1}", "sample_tokens=4096", "eval_every=0", "save_every=0", "batch_size=65536",
            "micro_batch=65536", "log_every=1", "keep_checkpoints=1", "max_steps=1000000000000000000"]
    cfg = resolve_config("pretrain", preset="nano", flags=CONFIG_FLAGS, sets=edge)
    assert (cfg.min_lr_ratio, cfg.grad_clip, cfg.seed, cfg.max_steps) == (1.0, 0.0, 2**32 - 1, 10**18)
    for budget in ("epochs=1e9", "max_minutes=1e9"):
        resolve_config("pretrain", preset="nano", flags=CONFIG_FLAGS, sets=["max_steps=null", budget])


# true is no number and 1 is no bool, though YAML and Python would take one for the other.
@pytest.mark.parametrize("sets,message", [
    (["compile=1"], "config key compile: 1 is not a valid bool"),
    (["batch_size=true"], "config key batch_size: True is not a valid int"),
    (["lr=true"], "config key lr: True is not a valid float"),
    (["model.dim=true"], "config key model.dim: True is not a valid int"),
])
def test_a_boolean_and_a_number_are_not_taken_for_each_other(sets, message):
    with pytest.raises(TinykError, match=f"^--set: {re.escape(message)}$"):
        resolve_config("pretrain", preset="nano", flags=CONFIG_FLAGS, sets=sets)


# A --set value that is no YAML is text (for a text key) or one line saying it is not a number.
def test_a_set_value_yaml_cannot_parse_is_text():
    cfg = resolve_config("pretrain", preset="nano", flags=CONFIG_FLAGS, sets=["run_name=a: b: c"])
    assert cfg.run_name == "a: b: c"
    with pytest.raises(TinykError, match=r"^--set: config key lr: 'a: b: c' is not a valid float$"):
        resolve_config("pretrain", preset="nano", flags=CONFIG_FLAGS, sets=["lr=a: b: c"])


# `--tracker tensorboard,` names no empty tracker.
def test_a_comma_list_drops_empty_names():
    assert resolve_config("pretrain", preset="nano", flags=CONFIG_FLAGS,
                          sets=["tracker=tensorboard, ,"]).tracker == ["tensorboard"]


# A library caller (plan, demo) passes every flag not given as None, which overrides nothing.
def test_a_flag_given_as_none_is_not_given():
    flags = {**CONFIG_FLAGS, "lr": None, "max_steps": None, "seq_len": None}
    cfg = resolve_config("pretrain", preset="tiny", flags=flags)
    assert (cfg.lr, cfg.max_steps, cfg.seq_len) == (1e-3, 2000, 256)  # tiny.yaml's


def test_a_yml_config_is_read(tmp_path):
    (tmp_path / "c.yml").write_text("lr: 2.0e-3\n")
    assert resolve_config("pretrain", preset="nano", config=tmp_path / "c.yml", flags=CONFIG_FLAGS).lr == 2e-3


# A TOML date written for a text key is the text as written, not Python's str() of it.
def test_a_toml_datetime_for_a_text_key_is_kept_as_written(tmp_path):
    (tmp_path / "c.toml").write_text("run_name = 2024-06-01T12:30:00\nproject = 2024-06-01\n")
    cfg = resolve_config("pretrain", preset="nano", config=tmp_path / "c.toml", flags=CONFIG_FLAGS)
    assert (cfg.run_name, cfg.project) == ("2024-06-01T12:30:00", "2024-06-01")


# --resume where no run began yet starts one: a job script passes --resume on every start, the first too.
def test_resume_where_no_run_began_yet_starts_one_when_data_is_given(tmp_path):
    cfg = resolve_config("pretrain", preset="nano", flags={"out": str(tmp_path / "new"), "data": "d"}, resume=True)
    assert cfg.out == str(tmp_path / "new") and cfg.data == "d"


# A relative --tokenizer naming the saved absolute one is the same tokenizer: no note that it is not read.
def test_a_resume_naming_the_runs_tokenizer_relatively_gets_no_note(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tok").mkdir()
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(f"kind: pretrain\ndata: d\ntokenizer: {tmp_path / 'tok'}\n"
                                     "model: {preset: nano}\n")
    notes: list[str] = []
    cfg = resolve_config("pretrain", flags={"out": str(run), "tokenizer": "tok"}, resume=True, notes=notes)
    assert notes == [] and Path(cfg.tokenizer).resolve() == (tmp_path / "tok").resolve()


# Every input path is saved absolute: a resume from another folder finds the same tokenizer and init.
def test_config_yaml_saves_every_input_path_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    saved = yaml.safe_load(dump_config(TrainConfig(out="o", data="d", tokenizer="t", init="i")))
    assert [saved[k] for k in ("data", "tokenizer", "init", "out")] == [
        os.path.abspath("d"), os.path.abspath("t"), os.path.abspath("i"), "o"]


# A model section's vocab_size outranks the tokenizer's.
def test_a_model_sections_vocab_size_outranks_the_tokenizers():
    assert model_config({"preset": "nano"}, vocab_size=512).vocab_size == 512
    assert model_config({"preset": "nano", "vocab_size": 1000}, vocab_size=512).vocab_size == 1000


# ---------------------------------------------------------------- metrics, trackers and --force, pinned


def _train_rec(step: int) -> dict:
    return {"step": step, "tokens": 256 * step, "loss": 1.0, "lr": 1e-3, "tokens_per_s": 10.0, "elapsed_s": 1.0}


def _lines(step: int) -> str:
    return json.dumps({"type": "train", **_train_rec(step)}) + "\n"


@pytest.mark.parametrize("tail", ['{"type": "train", "st', json.dumps({"type": "train", **_train_rec(5)})])
def test_a_metrics_line_cut_short_is_mended_on_resume_even_when_no_step_is_dropped(tmp_path, tail):
    # A killed write's last line (cut mid-record, or whole but without its newline) must not be joined by
    # the resumed run's next line: metrics.jsonl would hold a damaged line and the next resume be refused.
    from tinyk.monitor import Monitor

    (tmp_path / "metrics.jsonl").write_text("".join(_lines(s) for s in range(1, 5)) + tail)
    resumed_at = 5 if tail.endswith("}") else 4  # every record up to the checkpoint kept
    mon = Monitor(tmp_path, 10, resumed_at, False)
    mon.truncate(resumed_at)
    mon.log_train(_train_rec(resumed_at + 1))
    mon.close()
    steps = [r["step"] for r in Monitor(tmp_path, 10, resumed_at + 1, False).records]
    assert steps == list(range(1, resumed_at + 2))
    assert all(json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines())


def test_a_run_id_file_naming_no_tracker_means_no_tracker_holds_the_run(tmp_path, monkeypatch):
    # Killed after the run id was saved but before any tracker was recorded as holding it: a resume must
    # still send W&B the steps it replays (none reached it), unlike an earlier tinyk's id-only file.
    from tinyk.monitor import Trackers

    sent: list = []
    _fake_wandb(monkeypatch, sent)
    (tmp_path / ".tracker_id").write_text("0123456789ab\n")
    trackers = Trackers(["wandb"], tmp_path, {}, "tinyk", "run", start_step=2, logged_upto=3)
    trackers.log({"train/loss": 1.0}, 3)
    trackers.close()
    assert sent == [3]


def test_trackers_finish_even_when_the_last_loss_plot_fails(tmp_path, monkeypatch):
    # A plot that fails with something other than a full disk (a matplotlib error) must not leave the
    # W&B run open ("running" in its service) nor the progress bar drawn.
    from tinyk.monitor import Monitor, Trackers

    finished = []
    wandb = type(sys)("wandb")
    wandb.init = lambda **kw: types.SimpleNamespace(log=lambda values, step: None,
                                                   finish=lambda exit_code=None: finished.append(exit_code))
    monkeypatch.setitem(sys.modules, "wandb", wandb)

    def broken(records, png):
        raise RuntimeError("matplotlib broke")

    monkeypatch.setattr("tinyk.monitor.plot_losses", broken)
    mon = Monitor(tmp_path, 10, 0, False)
    mon.can_plot = True
    mon.trackers = Trackers(["wandb"], tmp_path, {}, "tinyk", "run")
    mon.log_train(_train_rec(1))
    with pytest.raises(RuntimeError):
        mon.close(1, "failed")
    assert finished == [1]


def test_a_forced_run_never_shows_the_replaced_runs_loss_plot(tmp_path, pt_data, tok_dir, monkeypatch):
    # loss.png is the run's own: --force takes the old run's away with the rest, so the folder never shows
    # the replaced run's curve as the new run's while the new one trains.

    from tinyk.train import train

    out = tmp_path / "run"
    train(nano_cfg(pt_data, tok_dir, out, max_steps=2))
    assert (out / "loss.png").is_file()
    seen = []
    with monkeypatch.context() as m:
        after_each_logged_step(m, lambda rec: seen.append((out / "loss.png").exists()))
        train(nano_cfg(pt_data, tok_dir, out, max_steps=2, lr=1e-3), force=True)
    assert seen == [False, False] and (out / "loss.png").is_file()


def test_a_forced_run_writes_its_own_config_yaml(tmp_path, pt_data, tok_dir):
    # --force replaces the run: config.yaml, what --resume starts from, is the new run's settings.
    import yaml

    from tinyk.train import train

    out = tmp_path / "run"
    train(nano_cfg(pt_data, tok_dir, out, max_steps=1))
    train(nano_cfg(pt_data, tok_dir, out, max_steps=2, lr=1e-3), force=True)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["max_steps"] == 2 and saved["lr"] == 1e-3


def test_force_refuses_to_delete_the_users_files_in_checkpoints(tmp_path, pt_data, tok_dir):
    # A note or eval result a user put in checkpoints/ is not the run's: --force refuses instead of deleting it.

    from tinyk.train import train

    out = tmp_path / "run"
    train(nano_cfg(pt_data, tok_dir, out, max_steps=1, save_every=1))
    (out / "checkpoints" / "notes.txt").write_text("keep me")
    with pytest.raises(TinykError, match=r"^--force would delete checkpoints/notes\.txt in "):
        train(nano_cfg(pt_data, tok_dir, out, max_steps=1), force=True)
    assert (out / "checkpoints" / "notes.txt").read_text() == "keep me"


def test_a_run_left_with_only_its_config_and_checkpoints_is_not_started_over(tmp_path, pt_data, tok_dir):
    # A run whose logs were deleted still has checkpoints to lose: the same command without --resume or
    # --force is refused, not taken for a run killed before it saved anything.

    from tinyk.train import train

    out = tmp_path / "run"
    train(nano_cfg(pt_data, tok_dir, out, max_steps=2, save_every=1))
    for p in out.iterdir():
        if p.name not in ("config.yaml", "checkpoints"):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    with pytest.raises(TinykError, match=r"exists \(use --resume to continue it or --force to start over\)"):
        train(nano_cfg(pt_data, tok_dir, out, max_steps=2, save_every=1))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == kept


def test_force_leaves_no_hidden_copy_of_the_replaced_run(tmp_path, pt_data, tok_dir):
    # Once the new run has trained, the replaced run is deleted: its weights do not linger, hidden, on disk.

    from tinyk.train import train

    out = tmp_path / "run"
    train(nano_cfg(pt_data, tok_dir, out, max_steps=1, save_every=1))
    train(nano_cfg(pt_data, tok_dir, out, max_steps=1), force=True)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_a_failed_force_start_leaves_the_directory_exactly_as_it_was(tmp_path, pt_data, tok_dir, monkeypatch):
    # A --force start that fails (here its tracker refuses) puts the whole old run back (its tracker
    # bookkeeping too) and leaves no hidden folder of the new run's files behind.

    from tinyk.train import train

    out = tmp_path / "run"
    train(nano_cfg(pt_data, tok_dir, out, max_steps=1, save_every=1))
    (out / ".tracker_step").write_text("7\n")  # what the run's W&B got before a kill: kept with the run
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))

    def refuse(**kw):
        raise RuntimeError("not logged in")

    wandb = type(sys)("wandb")
    wandb.init = refuse
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    with pytest.raises(TinykError, match="--tracker wandb could not start"):
        train(nano_cfg(pt_data, tok_dir, out, max_steps=1, tracker=["wandb"]), force=True)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before


def test_an_out_that_links_into_another_run_is_refused(tmp_path, pt_data, tok_dir):
    # --out reached through a symlink into another run's directory would be rotated and --forced with it.

    from tinyk.train import train

    host = tmp_path / "host"
    (host / "checkpoints" / "sub").mkdir(parents=True)
    (host / "config.yaml").write_text("kind: pretrain\n")
    (tmp_path / "link").symlink_to(host / "checkpoints" / "sub")
    with pytest.raises(TinykError, match=r"is inside the run directory .*host; give a path outside it"):
        train(nano_cfg(pt_data, tok_dir, tmp_path / "link", max_steps=1))


def test_a_restart_from_step_0_without_trackers_still_makes_the_next_wandb_run_a_new_one(tmp_path, monkeypatch):
    # Documented (Trackers): a run from step 0 is a new run for W&B too. A restart without --tracker must
    # not leave the killed session's run id for a later --tracker wandb resume to continue.
    from tinyk.monitor import Monitor, Trackers

    sent: list = []
    ids: list = []
    _fake_wandb(monkeypatch, sent, ids)
    mon = Monitor(tmp_path, 10, 0, False)  # session 1, with W&B: killed at step 3, before any checkpoint
    mon.truncate(0)
    mon.trackers = Trackers(["wandb"], tmp_path, {}, "tinyk", "run")
    for step in (1, 2, 3):
        mon.log_train(_train_rec(step))
    mon.close()
    mon = Monitor(tmp_path, 10, 0, False)  # session 2, no tracker, from step 0: saves step 5, killed at 7
    mon.truncate(0)
    for step in range(1, 8):
        mon.log_train(_train_rec(step))
    mon.close()
    sent.clear()
    mon = Monitor(tmp_path, 10, 5, False)  # session 3 resumes from step 5 with W&B again
    mon.trackers = Trackers(["wandb"], tmp_path, {}, "tinyk", "run", start_step=5, logged_upto=mon.truncate(5))
    for step in range(6, 11):
        mon.log_train(_train_rec(step))
    mon.close()
    assert ids[1] != ids[0] and sent == [6, 7, 8, 9, 10]


def test_an_eval_record_gives_the_trackers_only_its_validation_curves():
    # An eval record's tokens and time repeat the train record's: the trackers get val/loss and val/bpb only.
    from tinyk.monitor import tracker_values

    rec = {"type": "eval", "step": 4, "tokens": 1024, "val_loss": 2.5, "val_bpb": 1.25, "elapsed_s": 3.0}
    assert tracker_values(rec) == {"val/loss": 2.5, "val/bpb": 1.25}


# ---------------------------------------------------------------- the trainer's numbers, recomputed


def _readme_lr(s: int, total: int, peak: float, warmup: int, ratio: float, schedule: str, frac: float) -> float:
    """The README's schedule, written out independently: step s (0-based) of `total`."""
    if s < warmup:
        return peak * (s + 1) / warmup
    floor = peak * ratio
    if schedule == "wsd":
        d = max(1, min(total - warmup, round(frac * total)))
        return peak if s < total - d else floor + (peak - floor) * (total - 1 - s) / d
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup - 1)))


def _spy_group_lrs(monkeypatch) -> list[list[float]]:
    seen: list[list[float]] = []
    real = train_module.optimizer_step

    def spy(module, opt, *args, **kw):
        seen.append([g["lr"] for g in opt.param_groups])
        return real(module, opt, *args, **kw)

    monkeypatch.setattr(train_module, "optimizer_step", spy)
    return seen


# The LR a run trains at (every param group: matrices and norm gains alike) follows the README's formula,
# with the run's own min_lr_ratio and decay_fraction, not the defaults.
@pytest.mark.parametrize("schedule,ratio,frac", [("cosine", 0.25, 0.2), ("wsd", 0.3, 0.5)])
def test_every_param_group_trains_at_the_documented_lr_with_the_runs_own_settings(tmp_path, pt_data, tok_dir,
                                                                                  monkeypatch, schedule, ratio, frac):
    seen = _spy_group_lrs(monkeypatch)
    out = tmp_path / "run"
    train(nano_cfg(pt_data, tok_dir, out, max_steps=8, warmup_steps=2, lr=2e-3, min_lr_ratio=ratio,
                   lr_schedule=schedule, decay_fraction=frac))
    want = [_readme_lr(s, 8, 2e-3, 2, ratio, schedule, frac) for s in range(8)]
    assert len(seen) == 8 and all(len(set(g)) == 1 for g in seen), seen  # both groups at one LR
    assert [g[0] for g in seen] == pytest.approx(want, rel=1e-12)
    assert [r["lr"] for r in records(out, "train")] == pytest.approx(want, rel=1e-12)
    assert seen[-1][0] == pytest.approx(2e-3 * ratio)  # the last step at the run's own floor


# Clipping bounds the step of the whole model (norm gains included: both AdamW param groups), reports
# the gradients' own norm over all of them, and grad_clip 0 turns clipping off (as the README says).
@pytest.mark.parametrize("grad_clip", [1e-3, 0.0])
def test_clipping_covers_both_param_groups_and_zero_turns_it_off(grad_clip):
    torch.manual_seed(0)
    model = Transformer(preset_config("nano", vocab_size=64))
    x, y = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    reference = copy.deepcopy(model)
    (LossSum(reference)(x, y) / y.numel()).backward()
    unclipped = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in reference.parameters()))
    gains = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in reference.parameters() if p.ndim == 1))
    assert gains > 1e-3 * unclipped  # the norm gains' share is visible at the tolerance below
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(param_groups(model, 0.0), lr=1.0)  # the trainer's two groups; SGD moves by the gradient
    _, norm = optimizer_step(LossSum(model), opt, torch.amp.GradScaler("cpu", enabled=False), [(x, y)],
                             1 / y.numel(), grad_clip=grad_clip)
    moved = math.sqrt(sum(float((p.detach() - b).pow(2).sum()) for p, b in zip(model.parameters(), before,
                                                                                 strict=True)))
    assert float(norm) == pytest.approx(unclipped, rel=1e-5)
    assert moved == pytest.approx(grad_clip or unclipped, rel=1e-3)


# Dropout keeps training on after a periodic evaluation (which runs the model in eval mode).
def test_training_steps_after_an_evaluation_still_use_dropout(tmp_path, pt_data, tok_dir, monkeypatch):
    modes = []
    real = LossSum.forward

    def spy(self, x, y):
        modes.append(self.model.training)
        return real(self, x, y)

    monkeypatch.setattr(LossSum, "forward", spy)
    train(nano_cfg(pt_data, tok_dir, tmp_path / "run", model={"preset": "nano", "dropout": 0.1}, max_steps=3,
                   eval_every=1))
    assert modes == [True] * 3


# A resume from a checkpoint taken mid log window logs the same losses as the run never stopped (the
# window's loss sum carries over, not only its token count).
def test_a_resume_mid_log_window_logs_the_same_losses(tmp_path, pt_data, tok_dir):
    out = tmp_path / "run"
    train(nano_cfg(pt_data, tok_dir, out, max_steps=4, save_every=2, log_every=3))
    straight = train_losses(out)
    assert sorted(straight) == [3, 4]
    shutil.rmtree(out / "checkpoints" / "step_0000004")
    shutil.rmtree(out / "final")
    assert train(nano_cfg(pt_data, tok_dir, out, max_steps=4, save_every=2, log_every=3), resume=True)["steps"] == 4
    assert train_losses(out) == straight


# An SFT run's val loss is nats per answer token and its bits per byte count only those tokens' bytes:
# recomputed by plain torch over the same validation batches, from the --init weights.
def test_sft_val_loss_and_bpb_are_per_answer_token_recomputed_by_plain_torch(tmp_path, sft_data, nano_model_dir):
    import torch.nn.functional as F

    from tinyk.loader import open_split, split_batches

    t = Trainer(nano_cfg(sft_data, None, tmp_path / "sft", kind="sft", init=str(nano_model_dir), model={},
                         seq_len=64, max_steps=1, eval_batches=2))
    try:
        loss, bpb = t.evaluate()
    finally:
        t.close()
    model, tok = load_model(nano_model_dir)
    model.eval()
    total, count, nbytes, positions = 0.0, 0, 0, 0
    with torch.no_grad():
        for x, y in split_batches(open_split(sft_data, "val", 64), 8, 2):
            keep = y != -100
            total += F.cross_entropy(model(x).float()[keep], y[keep], reduction="sum").item()
            count += int(keep.sum())
            nbytes += sum(tok.token_bytes[i] for i in y[keep].tolist())
            positions += y.numel()
    assert 0 < count < positions  # prompts and padding are masked: the two denominators differ
    assert loss == pytest.approx(total / count, rel=1e-5)
    assert bpb == pytest.approx(total / math.log(2) / nbytes, rel=1e-5)


# Bits per byte counts the bytes of scored targets only, whatever token id 0 spells (a tokenizer whose
# id 0 is text, not a zero-byte special token, must not add bytes for masked positions).
def test_eval_sums_counts_bytes_of_scored_targets_only():
    import torch.nn.functional as F

    from tinyk.train import eval_sums

    torch.manual_seed(0)
    model = Transformer(preset_config("nano", vocab_size=64)).eval()
    x, y = torch.randint(0, 64, (2, 12)), torch.randint(1, 64, (2, 12))
    y[0, :5] = -100
    y[1, 8:] = -100
    token_bytes = torch.arange(64, dtype=torch.float64) % 4 + 1  # id 0 spells a byte too
    total, count, nbytes = eval_sums(model, [(x, y)], token_bytes).tolist()
    keep = y != -100
    with torch.no_grad():
        want = F.cross_entropy(model(x).float()[keep], y[keep], reduction="sum").item()
    assert total == pytest.approx(want, rel=1e-6) and count == int(keep.sum())
    assert nbytes == float(token_bytes[y[keep]].sum())
