"""One trainer for pretraining and SFT, from one CPU process to torchrun on many GPUs.

The seed had two copy-pasted scripts that ran fp16 autocast while claiming bf16, stepped the
LR per micro-batch and checkpointed weights only. Here both stages share one loop: the loss is
the sum of per-token losses over the *global* batch divided by the global count of loss tokens
(so N processes compute exactly what one would, and SFT masks are exact), the LR schedule is
indexed by optimizer step, and a checkpoint holds everything needed to continue bit-for-bit.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import functools
import hashlib
import inspect
import math
import os
import pickle
import random
import signal
import stat
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .checkpoint import (
    check_compatible,
    holding,
    is_model_dir,
    load_config,
    load_model,
    write_model_files,
)
from .config import CUDA_GRAPH_MODES, LR_SCHEDULES, TrainConfig, dump_config, model_config, read_config_file, validate
from .errors import (
    STOP_SIGNALS,
    PeerLost,
    StoppedBeforeTraining,
    TinykError,
    first_line,
    memory_available,
    not_found,
    out_of_memory,
    say_on_stderr,
    shown,
    signal_handlers,
    signal_status,
    signals_held,
    stop_signal,
    writing,
)
from .inputs import read_json, sha256_file, short_repr
from .loader import IGNORE, ResumeMismatch, UnusableSplit
from .model import (
    PRESETS,
    TRAIN_STATE_BYTES,
    WEIGHT_BYTES,
    Attention,
    ModelConfig,
    RMSNorm,
    Transformer,
    cpu_emulates,
    cuda_autocast_dtype,
    dtype_name,
    emulated_note,
    resolve_device,
    resolve_dtype,
    short_dtype_name,
    training_flops,
)
from .monitor import Monitor, Trackers, finite, measure_matmul_flops, peak_flops
from .outputs import (
    atomic_dir,
    delete_via,
    without_dotdot,
    write_json_atomic,
)
from .plan import flops_formula, model_size, precision_refusal
from .rundir import RunDir, checkpoints, resolve_init
from .units import GiB, flops_text, is_int, is_number, minutes_text, plural

# Whether this process has joined a job of several (its exit can then abort: see cli._fail).
joined_a_job = False
SIGINT_ECHO_S = 0.5  # a second SIGINT sooner than this is the first one again, not a second Ctrl-C
COMPUTE_FIELDS = ("rope_theta", "rope_scaling", "norm_eps")  # not shapes, but the weights were trained with them
REFUSAL_WAIT = timedelta(minutes=1)  # how long a process that refuses to start waits to tell the job's others


# ----------------------------------------------------------------------------- schedule & optimizer

def lr_at(step: int, total: int, peak: float, warmup: int, min_ratio: float = 0.1, schedule: str = "cosine",
          decay_fraction: float = 0.2) -> float:
    """Linear warmup over `warmup` optimizer steps, then down to min_ratio * peak at the last step: by a
    cosine, or ("wsd", warmup-stable-decay) flat at the peak until the last `decay_fraction` of the run's
    steps and linearly down over those. WSD's LR before its decay does not depend on the run's length, so
    a run made longer from a checkpoint before it, or fitted to a time budget, goes on at the same rate."""
    if step < warmup:
        return peak * (step + 1) / warmup
    floor = peak * min_ratio
    if schedule == "wsd":
        decay = wsd_decay_steps(total, warmup, decay_fraction)
        return floor + (peak - floor) * max(0, total - 1 - step) / decay if step >= total - decay else peak
    span = total - warmup - 1
    progress = min(1.0, (step - warmup) / span) if span > 0 else 1.0
    return floor + 0.5 * (1 + math.cos(math.pi * progress)) * (peak - floor)


def wsd_decay_steps(total: int, warmup: int, decay_fraction: float) -> int:
    """The steps of a WSD schedule below its peak, the last at the floor: decay_fraction of the run's,
    at least one, and none of the warmup's."""
    return max(1, min(total - warmup, round(decay_fraction * total)))


@dataclass(frozen=True)
class Schedule:
    """An LR schedule's settings, named as the config's keys (a resumed run's header names those that changed)."""

    lr: float
    warmup_steps: int
    min_lr_ratio: float
    lr_schedule: str
    decay_fraction: float

    def lr_at(self, step: int, total: int) -> float:
        return lr_at(step, total, self.lr, self.warmup_steps, self.min_lr_ratio, self.lr_schedule,
                     self.decay_fraction)


def default_warmup(total_steps: int) -> int:
    return round(0.02 * total_steps)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices (embeddings and projections) only, never on norm gains."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             eps=cfg.eps, fused=device.type == "cuda")


def micro_layout(batch_size: int, world: int, micro_batch: int | None) -> tuple[int, int]:
    """(micro-batch per process, accumulation steps) that make up the global batch exactly."""
    if batch_size % world:
        raise TinykError(f"batch_size {batch_size} is not divisible by the {world} processes")
    per_rank = batch_size // world
    micro = min(micro_batch or per_rank, per_rank)
    while per_rank % micro:
        micro -= 1
    return micro, per_rank // micro


def micro_note(batch_size: int, world: int, requested: int | None, used: int, per: str = "process") -> str | None:
    """Why the micro-batch used is not the one asked for (None when it is), worded once for train and plan."""
    if not requested or requested == used:
        return None
    per_rank = batch_size // world
    why = "exceeds" if requested > per_rank else "does not divide"
    return f"micro_batch {requested} {why} the {per_rank} sequences per {per}; using {used}"


def first_budget(budgets: dict[str, int]) -> tuple[int, str]:
    """The steps of the budget that ends the run first, and its flag (for messages)."""
    flag = min(budgets, key=budgets.__getitem__)
    return max(1, budgets[flag]), flag


def step_budgets(cfg: TrainConfig, samples_per_epoch: int, steps_done: int = 0,
                 samples_done: int = 0) -> dict[str, int]:
    """The steps each budget allows, by the flag that sets it (--epochs stands for the default epoch too).

    A token or epoch budget counts samples: what is left of it after `samples_done` (a resumed
    run's) is trained at this run's batch size, so resuming with another --batch-size keeps it.
    """
    budgets = {"--max-steps": cfg.max_steps} if cfg.max_steps else {}
    for flag, samples in budget_samples(cfg, samples_per_epoch).items():  # below steps_done if samples_done passed it
        budgets[flag] = steps_done + math.ceil((samples - samples_done) / cfg.batch_size)
    return budgets


def budget_samples(cfg: TrainConfig, samples_per_epoch: int) -> dict[str, float]:
    """The samples the token and epoch budgets allow, by flag (--epochs stands for the default epoch too)."""
    samples = {}
    if cfg.max_tokens:
        samples["--max-tokens"] = cfg.max_tokens / cfg.seq_len
    if cfg.epochs or not (cfg.max_steps or cfg.max_tokens):
        samples["--epochs"] = (cfg.epochs or 1) * samples_per_epoch
    return samples


# ----------------------------------------------------------------------------- processes and devices

@dataclass
class Dist:
    """This process's place in the job; `host` is a gloo group for small CPU-side reductions."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    host: Any = None
    owns_group: bool = False  # tinyk started the process group, so it ends it

    def close(self) -> None:
        """Ends the process group if tinyk started it (one a caller started stays theirs), so the next
        run in the same process can start its own."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum_host(self, values: list[int]) -> list[int]:
        """Sums small integers across ranks without touching the GPU stream (no device sync)."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.int64)
        dist.all_reduce(t, group=self.host)
        return t.tolist()

    def gather_host(self, value: Any) -> list[Any]:
        """Every rank's `value` (a picklable object), in rank order, on every rank."""
        if self.world == 1:
            return [value]
        values: list[Any] = [None] * self.world
        dist.all_gather_object(values, value, group=self.host)
        return values

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier(group=self.host)


def _across_machines(world: int) -> bool:
    """Whether a job of `world` processes has some on other machines, which torchrun here cannot stop."""
    return world > _processes_on_this_host()


def _processes_on_this_host() -> int:
    """torchrun's LOCAL_WORLD_SIZE: the processes that share this machine's memory (1 unset or unreadable)."""
    local = os.environ.get("LOCAL_WORLD_SIZE", "1")
    return int(local) if local.isdigit() and int(local) > 0 else 1


def _launch_env() -> tuple[int, int, int]:
    """(world size, rank, local rank) from what torchrun sets; a partial set (a job script that exports
    WORLD_SIZE alone) is one line instead of the rendezvous's traceback."""
    values = {}
    for name, default in (("WORLD_SIZE", "1"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        raw = os.environ.get(name, default)
        if not (raw.isascii() and raw.isdigit()):
            raise TinykError(f"{name}={raw!r} is not a whole number (torchrun sets it; unset it to run one process)")
        values[name] = int(raw)
    world, rank, local_rank = values.values()
    if world > 1:
        missing = [n for n in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(n)]
        if missing:
            raise TinykError(f"WORLD_SIZE={world} is set but {', '.join(missing)} "
                             f"{'is' if len(missing) == 1 else 'are'} not: launch with torchrun, which sets them "
                             f"all, or unset WORLD_SIZE")
    if world < 1:
        raise TinykError(f"WORLD_SIZE={world}: a job has at least one process (torchrun sets it; unset it to run one)")
    if world > 1 and rank >= world:  # a stray RANK with no WORLD_SIZE is a single process
        raise TinykError(f"RANK={rank} does not fit WORLD_SIZE={world} (torchrun sets both)")
    return world, rank, local_rank


def setup_dist(device: str, refusal: TinykError | None = None) -> Dist:
    """Joins the torchrun job if there is one (NCCL on CUDA, gloo on CPU). Every process then says
    whether it refused to start (`refusal`): a node whose disk lacks the run, or whose command differs,
    refuses alone, and the others, on other machines, would wait for it until the group's timeout."""
    global joined_a_job
    world, rank, local_rank = _launch_env()
    if refusal is not None and world == 1:
        raise refusal
    try:
        dev = resolve_device(device)
    except TinykError as e:
        if world == 1:
            raise
        refusal = refusal or e  # once the others are told, on the device they are most likely on
        dev = resolve_device("auto")
    if dev.type == "cuda":  # a launcher that shows each process only its own GPU leaves one device
        dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    if world == 1:
        return Dist(device=dev)
    joined_a_job = True
    owns = not dist.is_initialized()
    if owns and not os.environ.get("TORCHELASTIC_RUN_ID"):  # launched by hand: the wait below says nothing
        print(f"tinyk: process {rank} of {world} waiting for the others at {os.environ['MASTER_ADDR']}:"
              f"{os.environ['MASTER_PORT']} (not launched by torchrun; no signal but kill -9 stops this wait)",
              file=sys.stderr, flush=True)
    if owns:
        backend = "nccl" if dev.type == "cuda" else "gloo"
        # One that only comes to say it refuses waits for the others a while, not the group's half hour:
        # they started with it, unless they run no tinyk training at all.
        dist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None,
                                **({"timeout": REFUSAL_WAIT} if refusal is not None else {}))
    host = dist.new_group(backend="gloo", **({"timeout": REFUSAL_WAIT} if refusal is not None else {})) \
        if dev.type == "cuda" else None
    d = Dist(rank, world, local_rank, dev, host, owns)
    refused = [(r, why) for r, why in enumerate(d.gather_host(None if refusal is None else str(refusal))) if why]
    if refused:
        d.close()
        if refusal is not None:
            raise refusal
        r, why = refused[0]
        raise TinykError(f"process {r} of this job refused to start: {why}")
    return d


def tell_job(device: str, refusal: TinykError) -> None:
    """Tells the job's processes on other machines (`setup_dist`) that this one refuses to start: they
    would otherwise wait for it until the group's timeout; on this machine torchrun stops them. (A job
    whose others run on another device than `device`, from a config file, meets on another backend,
    and they wait as before.)"""
    # Its own refusal, an environment that makes no job, or no rendezvous: this process's line is the one.
    with contextlib.suppress(Exception):
        if _across_machines(_launch_env()[0]):
            setup_dist(device, refusal)


def refuse_in_job(device: str, refusal: TinykError) -> NoReturn:
    """Raises `refusal` once the job's other machines are told (`tell_job`)."""
    tell_job(device, refusal)
    raise refusal


def _exit_status(e: BaseException) -> tuple[int, str | None]:
    """The exit status a run stopped by `e` ends with (as cli reports it: 2 for what it says in one
    line, 1 for a traceback), and what went wrong."""
    if isinstance(e, KeyboardInterrupt):
        return signal_status(stop_signal(e)), None
    return 2 if isinstance(e, TinykError | OSError) or out_of_memory(e) else 1, first_line(e)


def loss_sum(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Summed (not mean) cross-entropy over targets != -100, in fp32: the caller divides by the global count."""
    return F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE, reduction="sum")


@torch.no_grad()
def eval_sums(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], token_bytes: torch.Tensor,
              autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> torch.Tensor:
    """(summed loss, loss tokens, bytes of text those tokens spell) over batches already on the device,
    accumulated there: masked sums, so nothing waits for the device until the caller reads the result."""
    acc = torch.zeros(3, dtype=torch.float64, device=token_bytes.device)
    for x, y in batches:
        with autocast():
            loss = loss_sum(model, x, y)
        scored = y != IGNORE
        acc += torch.stack([loss.double(), scored.sum().double(),
                            torch.where(scored, token_bytes[y.clamp(min=0)], 0.0).sum()])
    return acc


class LossSum(nn.Module):
    """`loss_sum` as a module: the unit that DDP and torch.compile wrap, so the loss fuses with the model."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss_sum(self.model, x, y)


def parallel_step_module(model: Transformer, parallel: str, device: torch.device) -> nn.Module:
    """The module a training step runs: the summed loss of `model`, for one process ("none"), or a job's
    ("ddp": wrapped in DistributedDataParallel; "fsdp": each block and then the rest sharded in place).
    The trainer's, and the one `plan.measure_step_memory` measures."""
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.model.layers:
            fully_shard(block)
        fully_shard(model)
    step_module: nn.Module = LossSum(model)
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # The only buffers are the RoPE tables, the same on every rank: nothing to broadcast per step.
        # torch 2.13 renamed the flag (the old name warns); older torch only knows the old one.
        no_sync = ("forward_sync_buffers" if "forward_sync_buffers" in
                   inspect.signature(DistributedDataParallel).parameters else "broadcast_buffers")
        step_module = DistributedDataParallel(step_module, device_ids=[device.index] if device.type == "cuda"
                                              else None, **{no_sync: False})
    return step_module


def optimizer_step(step_module: nn.Module, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   batches: Sequence[Any], scale: float, *, grad_clip: float | None,
                   to_device: Callable[[Any], tuple[torch.Tensor, torch.Tensor]] = lambda b: b,
                   autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                   sync: Callable[[bool], contextlib.AbstractContextManager] = lambda last: contextlib.nullcontext()
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step: per micro-batch, the summed loss (autocast around the forward only) times
    `scale`, backward; then clipping and AdamW through the loss scaler. The trainer's step, and the one
    `plan.measure_step_memory` replays. Micro-batches reach the device one at a time (`to_device`); `sync(last)`
    holds gradient reduction back until the last. Returns (loss sum, grad norm) as tensors."""
    parts = []
    for i, batch in enumerate(batches):
        x, y = to_device(batch)
        with sync(i == len(batches) - 1):
            with autocast():
                part = step_module(x, y)
            scaler.scale(part * scale).backward()
        parts.append(part.detach())
    scaler.unscale_(opt)
    params = [p for g in opt.param_groups for p in g["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip or float("inf"))
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    return torch.stack(parts).sum(), norm


# ----------------------------------------------------------------------------- checkpoint state

def _rng_state(device: torch.device) -> dict[str, Any]:
    np_state = np.random.get_state()
    return {"python": random.getstate(), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def _trained_context(model_dir: Path, context: int) -> int:
    """The positions a model directory's run trained on: the seq_len of the config.yaml beside it (a run's
    final/, a checkpoint's model/) where that is shorter than the model's context, else the context."""
    try:
        seq_len = read_config_file(model_dir.parent / "config.yaml").get("seq_len")
    except (TinykError, OSError):
        return context
    return seq_len if is_int(seq_len) and 0 < seq_len < context else context


def _seed_streams(seed: int) -> None:
    """Every global generator a checkpoint's rng.pt keeps, seeded: tinyk draws from torch's alone, but the
    others' state, left as the process had it, made two identical runs write different checkpoints."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    name, key, *rest = state["numpy"]
    np.random.set_state((name, np.array(key, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def _load_pt(path: Path) -> Any:
    """A checkpoint's .pt file, tensors and plain data only (never code)."""
    if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block the read for ever
        raise ValueError(f"{path.name} is not a regular file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    # torch's own text advises weights_only=False: wrong for a damaged file. EOFError: an empty one.
    except (pickle.UnpicklingError, EOFError) as e:
        raise ValueError(f"{path.name} is not a complete PyTorch file") from e


# best/'s own record of the step and val loss it is from (in model.safetensors' header): a session killed
# after writing it and resumed from an earlier checkpoint has no other.
BEST_STEP, BEST_VAL = "tinyk.step", "tinyk.val_loss"


def _file_sums(folder: Path) -> dict[str, dict[str, Any]]:
    """Each file's size and SHA-256, for state.json: a flipped bit in the weights or the optimizer state
    keeps the file's structure, and a resume from it went on without a word (2.6 GB of seed-215m's
    checkpoint hash in about 2 s on one core)."""
    return {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "state.json"}


def _check_sums(folder: Path, files: Any) -> None:
    """Refuses (ValueError: a damaged checkpoint) files that differ from `_file_sums`' record."""
    if files is None:  # a checkpoint of a tinyk before 2026-12-07
        return
    if not isinstance(files, dict):
        raise ValueError(f"state.json has files {short_repr(str(files))}")
    for name, want in files.items():
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ValueError(f"state.json lists {name!r}, which is not in the checkpoint")
        p = folder / name
        if not p.is_file():
            raise ValueError(f"{name} is missing")
        if p.stat().st_size != want["bytes"] or sha256_file(p) != want["sha256"]:
            raise ValueError(f"{name} differs from the checksum state.json records: it changed on the disk or in "
                             f"a copy")


def best_kept_so_far(best: Path) -> tuple[float, int | None]:
    """(val loss, step) of the model a run's best/ holds; (inf, None) where there is none to compare with."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(best / "model.safetensors"), "pt") as f:
            meta = f.metadata() or {}
        return float(meta[BEST_VAL]), int(meta[BEST_STEP])
    except (OSError, ValueError, KeyError, SafetensorError):  # none, damaged, or not the run's own
        return math.inf, None


def _by_position(model: nn.Module, opt: torch.optim.Optimizer, saved: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state keyed by parameter name (as checkpoints hold it) keyed instead by each parameter's
    position in `opt`'s groups, which Optimizer.load_state_dict expects."""
    name_of = {p: n for n, p in model.named_parameters()}
    groups = [[name_of[p] for p in g["params"]] for g in opt.param_groups]
    if [set(g) for g in groups] != [set(g["params"]) for g in saved["param_groups"]]:
        raise ValueError("optimizer.pt's parameter groups are not this model's")
    position = {n: i for i, n in enumerate(n for g in groups for n in g)}
    return {"state": {position[n]: s for n, s in saved["state"].items()},
            "param_groups": [{**g, "params": [position[n] for n in names]}
                             for g, names in zip(saved["param_groups"], groups, strict=True)]}


def _export(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> Transformer:
    """A plain CPU model around a full state dict (gathered from DDP or FSDP), for writing model files."""
    with torch.device("meta"):
        model = Transformer(cfg)
    return holding(model, state)


def _apply_runtime_fields(model: Transformer, cfg: ModelConfig) -> None:
    """Settings that may differ from a loaded model's without touching its weights (context, dropout,
    and for a fine-tune from --init, rope_theta, rope_scaling and norm_eps)."""
    model.config = cfg
    model.init_rope()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = cfg.dropout
        elif isinstance(m, Attention):
            m.dropout = cfg.dropout
        elif isinstance(m, RMSNorm):
            m.eps = cfg.norm_eps


# ----------------------------------------------------------------------------- the trainer

def training_data_id(meta: dict[str, Any]) -> dict[str, Any] | None:
    """What a resumed run must train on to see the samples it would have seen: one checksum of a data
    directory's training files (from those meta.json records; None for data made before tinyk recorded
    them) and how its tokens are cut into shards. A copy, or the same data made again, has the same;
    the same tokens cut into other shards have another checksum, which is why the layout is kept."""
    recorded = meta.get("sha256")
    if not isinstance(recorded, dict):
        return None
    train = sorted((k, v) for k, v in recorded.items() if k.startswith("train/"))
    shards = [[s["file"], s["tokens"]] for s in meta["splits"]["train"].get("shards", [])]
    return {"sha256": hashlib.sha256(repr(train).encode()).hexdigest(), "shards": shards}


def release_freed_memory() -> bool:
    """Hands back to the system the heap glibc keeps after evaluations, samples and checkpoints: without
    it a long nano SFT run's RSS crept up about 2 MiB a minute (an evaluation every 200 steps), and was
    flat with it. Whether anything could be trimmed (False off glibc: macOS, musl, Windows)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL(None).malloc_trim(0))
    except (OSError, AttributeError):  # musl's libc has no malloc_trim
        return False


def _finite_amount(value: Any) -> bool:
    """A count or amount state.json can hold: a finite number >= 0 (not a bool, not NaN)."""
    return is_number(value) and 0 <= value < math.inf


@dataclass
class _Progress:
    step: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    elapsed: float = 0.0
    # FLOPs the devices of the sessions before this one could have done (seconds x processes x peak):
    # the whole run's MFU, when a resume changed the number of processes or the GPU. None: not recorded.
    peak_flops_spent: float | None = None
    flops: int = 0  # the model FLOPs of the positions processed (an SFT batch's attention at its padded length)


@dataclass
class _Pace:
    """This session's timing (an earlier session of a resumed run had its own pace), for the ETA and
    --max-minutes: its steps timed from the end of its first (compilation and warm-up excluded), what
    its evaluations (with their samples and best/) and checkpoints took, each and in all, and each log
    window's rates for the summary's steady figures."""

    first_step: int = 0  # the step the timing starts after
    t_first: float | None = None  # when that step ended; None until it has
    eval_times: list[float] = field(default_factory=list)
    save_times: list[float] = field(default_factory=list)
    paused_s: float = 0.0  # evaluations and checkpoints, which a step's time leaves out
    window_rates: list[tuple[float, float]] = field(default_factory=list)  # tokens/s and FLOP/s

    def start(self, step: int) -> None:
        """At the end of this session's first step, `step`."""
        self.t_first, self.first_step = time.perf_counter(), step

    def timed_steps(self, step: int) -> int:
        return step - self.first_step if self.t_first is not None else 0

    def step_seconds(self, step: int) -> float:
        """A step's time alone at this pace (needs a timed step)."""
        return (time.perf_counter() - self.t_first - self.paused_s) / self.timed_steps(step)


class SaveFailed(TinykError):
    """A checkpoint or final/ that could not be written; `cause` is the failure without what the run
    directory keeps, for a caller (the demo) that removes the run directory."""

    def __init__(self, message: str, cause: str):
        super().__init__(message)
        self.cause = cause


class Trainer:
    """One training run; `run()` returns the summary. Construction performs every set-up check."""

    def __init__(self, cfg: TrainConfig, *, resume: bool = False, force: bool = False, resumable: bool = True):
        # A copy: the run fills in the model's shape and more, and a caller may reuse its config for the next.
        cfg = copy.deepcopy(cfg)
        for key in ("out", "data", "tokenizer", "init"):
            if isinstance(value := getattr(cfg, key), os.PathLike):
                setattr(cfg, key, os.fspath(value))
        self.cfg, self.resume = cfg, resume
        # Before the process group: every process of a job refuses at once, so the first to say why is
        # not stopped by torchrun before it could; one node's refusal is told to the others.
        try:
            if resume and force:
                raise TinykError("--resume continues the run in --out and --force starts it over: give one of them")
            validate(cfg)  # built by hand rather than by resolve_config, it was never checked
            self.micro, self.accum = micro_layout(cfg.batch_size, _launch_env()[0], cfg.micro_batch)
        except TinykError as e:
            refuse_in_job(cfg.device if isinstance(cfg.device, str) else "auto", e)
        self.dist = setup_dist(cfg.device)
        self.device = self.dist.device
        self.out = without_dotdot(Path(cfg.out))
        self.run_dir = RunDir(self.out, self.dist)
        self.monitor: Monitor | None = None
        self.stop_signal: str | None = None
        self.resumable = resumable  # False: a caller that starts over (the demo); a stop promises no --resume
        self.pace = _Pace()
        try:
            refusal: TinykError | None = None
            try:
                self._setup_inputs()
                self._setup_data()
            except TinykError as e:  # told to the others, on other machines, before it ends the job
                if not _across_machines(self.dist.world):  # on one, torchrun stops them as this one ends
                    raise
                refusal = e
            self._check_same_job(force, refusal)
            self.fresh = self._open_run_dir(force)
        except BaseException as e:
            self.dist.close()
            if (lost := self._peer_lost(e, before_training=True)) is not None:
                raise lost from e
            raise
        try:
            self._setup_model()
            self.finished_already = self._finished_summary()
            self.monitor = self._make_monitor() if self.dist.main else None
            # Only now, and only when there is training to do: a refused resume, or one of a finished
            # run, leaves the run's config as it was.
            if self.dist.main and not self.finished_already:
                self.run_dir.check_writable()
            if self.dist.main and not self.fresh and not self.finished_already:
                self.run_dir.write_config(dump_config(cfg))
            self.peak, self.peak_source = peak_flops(self.device, cfg.peak_tflops, self.dtype)  # a timed matmul on CPU
            self.peak_retimed = False  # see _mfu
        except BaseException as e:
            self._fail_start(e)
            if (lost := self._peer_lost(e, before_training=True)) is not None:
                raise lost from e
            raise

    def _peer_lost(self, e: BaseException, *, before_training: bool) -> PeerLost | None:
        return peer_lost(e, self.out, before_training=before_training) if self.dist.world > 1 else None

    def _fail_start(self, e: BaseException) -> None:
        """Undoes a start that failed after the run directory was set up (a missing tracker package,
        unloadable weights, Ctrl-C, or a first step that failed: compiling, out of memory), and releases
        it: the directory is left as it was found, nothing behind or the run --force was to replace.
        The trackers close first, as they write into it."""
        monitor, self.monitor = self.monitor, None
        try:
            with contextlib.suppress(Exception):  # the error that stopped the start is the one to report
                if monitor:
                    monitor.close(*_exit_status(e))
            if self.fresh and self.dist.main:  # while the lock is held: no other start moves files here
                with contextlib.suppress(OSError):  # what cannot be put back now, the next start puts back
                    self.run_dir.undo_start()
        finally:
            with contextlib.suppress(Exception):
                self.close()

    # --- set-up checks, all before the first step --------------------------------------------

    def _setup_inputs(self) -> None:
        from .loader import open_dataset
        from .tokenizer import DEFAULT_SYSTEM_PROMPT, check_init_tokenizer, load_tokenizer, same_tokenizer

        cfg = self.cfg
        if self.resume and cfg.data and not Path(cfg.data).exists():  # moved since: --data says where it is now
            raise TinykError(f"{not_found(Path(cfg.data), 'tinyk data directory')} (the data this run trained on; "
                             f"if it has moved, give its new place with --data)")
        self.meta = open_dataset(cfg.data)
        if self.meta["kind"] != cfg.kind:
            raise TinykError(f"{cfg.data} holds {self.meta['kind']} data; tinyk {cfg.kind} needs {cfg.kind} data")
        if cfg.kind == "sft" and not cfg.init:
            raise TinykError("tinyk sft needs --init (a pretrained model directory or a pretraining run directory)")
        ckpts = checkpoints(self.out) if self.resume else []
        self.resumed_from = ckpts[-1] if ckpts else None
        if self.resume and not ckpts and is_model_dir(self.out / "final"):  # starting over would replace it
            raise TinykError(f"--resume: {self.out} holds a final model but no checkpoint to continue from; to "
                             f"train on from its weights, start a new run with --init {self.out / 'final'}")
        # A resumed run's model, tokenizer included, is its checkpoint's: the --init model and the
        # tokenizer directory it started from may have moved or been retrained since.
        self.init_dir = resolve_init(cfg.init) if cfg.init and not self.resumed_from else None
        self.preset_beside_init = cfg.model.get("preset") if self.init_dir is not None else None  # for the header
        # For the header's notes: a fine-tune's --init model, and the positions it trained on (its context
        # unless its run says fewer); set with the model's config.
        self.init_model: ModelConfig | None = None
        self.init_trained = 0
        self.weights_dir = self.resumed_from / "model" if self.resumed_from else self.init_dir
        self.tok_dir = self.resumed_from / "model" if self.resumed_from else \
            Path(cfg.tokenizer) if cfg.tokenizer else self.init_dir
        if self.tok_dir is None:
            raise TinykError("no tokenizer: pass --tokenizer (or --init a model directory, which carries one)")
        if self.resumed_from and self.dist.main:  # one reading of the files, not one a rank (they share them)
            self._check_checkpoint_sums()
        try:
            self.tok = tok = load_tokenizer(self.tok_dir)
        except TinykError as e:
            raise self._weights_error(e) from None
        # What the model directories record: SFT data's system prompt (the default for data made before
        # tinyk recorded it), else what the tokenizer or --init model carries.
        self.system_prompt = (self.meta.get("system_prompt", DEFAULT_SYSTEM_PROMPT) or None) \
            if cfg.kind == "sft" else tok.system_prompt
        self.token_bytes = torch.tensor(tok.token_bytes, dtype=torch.float64, device=self.device)  # bits per byte
        if self.init_dir is not None and cfg.tokenizer:
            check_init_tokenizer(self.tok_dir, self.init_dir)
        if not same_tokenizer(self.meta["tokenizer_hash"], self.tok_dir) or self.meta["vocab_size"] != tok.vocab_size:
            sizes = (f"vocab {self.meta['vocab_size']} vs {tok.vocab_size}" if self.meta["vocab_size"] != tok.vocab_size
                     else f"both of vocab {tok.vocab_size}, with other merges or normalisation")
            raise TinykError(f"{cfg.data} was tokenized with another tokenizer than {self.tok_dir} ({sizes}); re-run "
                             f"tinyk data with this tokenizer")
        self.mcfg = self._model_config(tok.vocab_size)
        check_compatible(self.mcfg, tok)
        if cfg.seq_len is None:
            cfg.seq_len = self.mcfg.max_seq_len
        if cfg.seq_len > self.mcfg.max_seq_len:
            raise TinykError(f"seq_len {cfg.seq_len} exceeds the model's context of {self.mcfg.max_seq_len} tokens "
                             f"(lower --seq-len or raise model.max_seq_len)")
        if cfg.sample_prompts and cfg.parallel == "fsdp" and self.dist.world > 1:
            raise TinykError("sample_prompts are decoded by one process, which under --parallel fsdp holds a shard "
                             "of the model: train with ddp, or drop them (--set 'sample_prompts=[]'; a resumed run "
                             "has them from its config.yaml) and sample a checkpoint's model/ with tinyk generate")
        for q, ids in zip(cfg.sample_prompts, self._sample_ids() if cfg.sample_prompts else [], strict=True):
            if len(ids) >= self.mcfg.max_seq_len:
                raise TinykError(f"sample prompt {short_repr(q, 24)} takes {len(ids):,} tokens, "
                                 f"which leaves no room in the model's {self.mcfg.max_seq_len}-token context")
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        cuda = self.device.type == "cuda"
        refusal = precision_refusal(short_dtype_name(self.dtype), cfg.parallel == "fsdp" and self.dist.world > 1,
                                    torch.cuda.get_device_name(self.device) if cuda else "this CPU",
                                    not cuda or cuda_autocast_dtype(self.device) == torch.bfloat16)
        if refusal:
            raise TinykError(refusal)
        self._check_room()

    def _check_room(self) -> None:
        """Refuses a model whose fp32 weights, gradients and AdamW state alone need more memory than is
        free: building one took minutes, and then the system killed the run without a word."""
        d = self.dist
        n = model_size(self.mcfg)["parameters"]
        shards = d.world if self.cfg.parallel == "fsdp" and d.world > 1 else 1
        need = TRAIN_STATE_BYTES * n / shards
        if self.device.type == "cuda":
            need = max(need, WEIGHT_BYTES * n)  # the whole fp32 model reaches the GPU before FSDP shards it
            free, where = torch.cuda.mem_get_info(self.device)[0], f"{torch.cuda.get_device_name(self.device)} has free"
        else:
            need *= _processes_on_this_host()
            free, where = memory_available(), "this machine has available"
        if free is not None and need > free:
            raise TinykError(f"the model's {n:,} parameters need {need / GiB:,.1f} GiB for fp32 weights, "
                             f"gradients and AdamW state alone, more than the {free / GiB:,.1f} GiB {where}: "
                             f"choose a smaller model (`tinyk plan` sizes one)"
                             + (", or shard it with --parallel fsdp" if self._fsdp_would_shard() else ""))

    def _model_config(self, vocab_size: int) -> ModelConfig:
        if self.weights_dir is None:
            return model_config(self.cfg.model, vocab_size)
        try:
            base = load_config(self.weights_dir)
        except TinykError as e:
            raise self._weights_error(e) from None
        section = self.cfg.model
        # A resumed run goes on training the same function; these change what its weights compute (the
        # loss jumps), as a fine-tune from them may mean to (extending the context with rope_theta).
        changed = [k for k in COMPUTE_FIELDS if self.resumed_from and k in section and section[k] != getattr(base, k)]
        if changed:
            k = changed[0]
            raise TinykError(f"model.{k}={section[k]} differs from the run's {getattr(base, k)}: a resumed run "
                             f"trains the same model on; to train with another {k}, start a new run with "
                             f"--init {self.weights_dir}")
        if not self.resumed_from:
            self.init_model, self.init_trained = base, _trained_context(self.weights_dir, base.max_seq_len)
        return model_config(section, base=base, base_from=self.weights_dir)

    def _open_run_dir(self, force: bool) -> bool:
        """Takes --out for this run (rundir.RunDir.open); True when it holds nothing of an earlier run."""
        # The saved config names the full model, so a resumed run rebuilds exactly this one, and the
        # preset only where it named the model (beside --init it gave the training settings alone).
        preset = None if self.cfg.init else self.cfg.model.get("preset")
        self.cfg.model = {**({"preset": preset} if preset else {}), **self.mcfg.to_dict()}
        inputs = [self.cfg.data, self.init_dir, None if self.resumed_from else self.tok_dir]
        return self.run_dir.open(force=force, resume=self.resume, resumed_from=self.resumed_from, inputs=inputs,
                                 config=dump_config(self.cfg))

    def _check_same_job(self, force: bool, refusal: TinykError | None = None) -> None:
        """Refuses a job whose processes were started with different settings (one node's job script
        differing by a flag): they would train a mix of both, or hang or abort in a collective that
        does not match. Paths may differ between machines; the data and the model they name may not,
        nor the checkpoint each resumes from (a node that sees another directory, or an older listing
        of it, would train on from another step). A process that refused to start (`refusal`: its
        data not found) tells the others why: its own line is on another machine."""
        if self.dist.world == 1:
            return
        job = {"refused": str(refusal)} if refusal is not None else self._job_settings(force)
        jobs = self.dist.gather_host(job)
        self.dist.barrier()  # every rank has every setting before any refuses and ends the group
        if refusal is not None:
            raise refusal
        if refused := next(((r, j["refused"]) for r, j in enumerate(jobs) if "refused" in j), None):
            raise TinykError(f"process {refused[0]} of this job refused to start: {refused[1]}")
        for rank, other in enumerate(jobs):
            key = next((k for k in job if other.get(k) != jobs[0].get(k)), None)
            if key == "data":
                raise TinykError(f"the processes of this job were started on different data: rank {rank}'s data "
                                 f"directory differs from rank 0's (another tokenizer, split, size or contents); "
                                 f"give every node the same data")
            if key == "checkpoint":
                raise TinykError(f"the processes of this job would resume from different checkpoints: rank 0 from "
                                 f"{jobs[0][key] or 'none'}, rank {rank} from {other[key] or 'none'}; every node "
                                 f"must see the same run directory ({self.out}) on a shared filesystem (one that "
                                 f"caches listings may need a minute to show the newest: start the job again then)")
            if key is not None:
                raise TinykError(f"the processes of this job were started with different settings: {key} is "
                                 f"{jobs[0][key]!r} in rank 0 but {other[key]!r} in rank {rank}; run the same "
                                 f"command (config, flags and data) on every node")

    def _job_settings(self, force: bool) -> dict[str, Any]:
        """What every process of a job must agree on, where they start first: a node that resumes from
        another checkpoint (or none: it does not see the run) differs in the settings saved with it too."""
        local = {"data", "tokenizer", "init", "out", "model", "device", "progress", "tracker", "project", "run_name",
                 "peak_tflops"}
        # The data's tokenizer, how it was split, its sizes and its files' checksums (data made before
        # tinyk recorded them is compared by the rest).
        data = {k: self.meta.get(k) for k in ("tokenizer_hash", "splits", "seed", "val_fraction", "sha256")}
        return {"start": "--resume" if self.resume else "--force" if force else "a new run",
                "checkpoint": self.resumed_from.name if self.resumed_from else None,
                "data": hashlib.sha256(repr(data).encode()).hexdigest(),
                **{k: v for k, v in self.cfg.to_dict().items() if k not in local},
                **{f"model.{k}": v for k, v in self.mcfg.to_dict().items()}, "device": self.device.type}

    def _setup_data(self) -> None:
        from .loader import PretrainLoader, SFTLoader, open_split

        cfg, d = self.cfg, self.dist
        if cfg.compile and cfg.compile_mode in CUDA_GRAPH_MODES and self.accum > 1:
            raise TinykError(f"compile_mode {cfg.compile_mode} replays CUDA graphs, whose outputs the next micro-batch "
                             f"overwrites: the {self.accum} micro-batches of a step would not add up their gradients "
                             f"(pytorch#96693); use max-autotune-no-cudagraphs, or a micro_batch of the whole "
                             f"{cfg.batch_size // d.world} sequences per process")
        if cfg.kind == "pretrain":
            self.loader = PretrainLoader(cfg.data, "train", cfg.seq_len, self.micro, rank=d.rank, world_size=d.world,
                                         seed=cfg.seed)
        else:
            self.loader = SFTLoader(cfg.data, "train", cfg.seq_len, self.micro, rank=d.rank, world_size=d.world,
                                    seed=cfg.seed, batch_size=cfg.batch_size)
        # With max_minutes this is the cap, and total_steps is re-fitted to the clock as the run goes.
        self.step_cap, self.ended_by = first_budget(step_budgets(cfg, self.loader.num_windows))
        self.total_steps = self.step_cap
        # A resumed run's re-fitted schedule, for the header: (old length, old LR, new LR, what changed).
        self.refit: tuple[int, float, float, list[str]] | None = None
        self.warmup = cfg.warmup_steps if cfg.warmup_steps is not None else default_warmup(self.total_steps)
        self.val_problem, self.val_dropped, self.val_split = None, 0, None
        try:  # opening the split validates it; a run without usable validation data still trains (damaged stops)
            # Kept open, as the training split is: data replaced while the run trains (tinyk data --force)
            # changes neither what it validates on nor, made with another tokenizer, crashes it.
            self.val_split = open_split(cfg.data, "val", cfg.seq_len)
            self.val_dropped = getattr(self.val_split, "dropped", 0)
        except UnusableSplit as e:
            self.val_problem = str(e)
        self.has_val = self.val_problem is None
        if cfg.keep_best and not self.has_val:
            raise TinykError(f"keep_best keeps the model of the lowest val loss, and there is no validation: "
                             f"{self.val_problem}")

    def _setup_model(self) -> None:
        cfg, d = self.cfg, self.dist
        self.progress = _Progress()
        # The loss sum and loss tokens since the last log line, which logs their ratio: the mean per token,
        # as validation's (SFT steps score different numbers of tokens). Kept in checkpoints so a resumed
        # run logs the same curve.
        self.window_loss, self.window_loss_tokens = torch.zeros((), device=self.device), 0
        # Steps whose update fp16's GradScaler skipped (inf/NaN gradients), counted on the device.
        self.window_skipped = torch.zeros((), dtype=torch.int64, device=self.device)
        torch.manual_seed(cfg.seed)
        if self.weights_dir is not None:
            try:
                model, _ = load_model(self.weights_dir, copy=True)
            except TinykError as e:
                raise self._weights_error(e) from None
            _apply_runtime_fields(model, self.mcfg)
        else:
            model = Transformer(self.mcfg)
        self.n_params = model.num_params()
        # counted before any wrapper shards the parameters
        self.flops_at: Callable[[int], int] = functools.partial(training_flops, model.config, model.matmul_params())
        self.flops_per_token = self.flops_at(cfg.seq_len)
        model = model.to(self.device).train()
        model.activation_checkpointing = cfg.activation_checkpointing
        self.fsdp = cfg.parallel == "fsdp" and d.world > 1
        self.model = model
        step_module = parallel_step_module(model, cfg.parallel if d.world > 1 else "none", self.device)
        self.ddp = step_module if d.world > 1 and not self.fsdp else None
        self.step_module = torch.compile(step_module, mode=cfg.compile_mode) if cfg.compile else step_module
        self.opt = make_optimizer(model, cfg, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        _seed_streams(cfg.seed + 1 + d.rank)
        if self.resumed_from:
            self._load_checkpoint(self.resumed_from)

    def _make_monitor(self) -> Monitor:
        cfg = self.cfg
        mon = Monitor(self.out, self.total_steps, self.progress.step, cfg.progress)
        try:
            logged = mon.truncate(self.progress.step)
            # Last: nothing after them can fail and leave a tracker's run open. A finished run resumed
            # again logs nothing, so it starts none.
            if cfg.tracker and not self.finished_already:
                mon.trackers = Trackers(cfg.tracker, self.out, cfg.to_dict(), cfg.project,
                                        cfg.run_name or shown(self.out.resolve().name), start_step=self.progress.step,
                                        logged_upto=logged)
        except BaseException:
            mon.bar.close()
            raise
        return mon

    # --- checkpoints ----------------------------------------------------------------------

    def _full_model_state(self) -> dict[str, torch.Tensor]:
        """The model's state keyed by parameter name, gathered to rank 0 (a collective)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _full_states(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Model and optimizer state keyed by parameter name, gathered to rank 0 (a collective)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return self._full_model_state(), get_optimizer_state_dict(self.model, self.opt, options=opts)

    def write_model(self, out: Path, model_state: dict[str, torch.Tensor],
                    metadata: dict[str, str] | None = None) -> None:
        out.mkdir(exist_ok=True)
        write_model_files(_export(self.mcfg, model_state), self.tok_dir, out, self.system_prompt, metadata)

    def save_checkpoint(self, loader_state: dict[str, Any]) -> Path:
        d, step, t0 = self.dist, self.progress.step, time.perf_counter()
        if self.monitor:
            self.monitor.pausing("saving a checkpoint")
        model_state, optim_state = self._full_states()
        window = self.window_loss.clone()
        if d.world > 1:
            dist.all_reduce(window)
        ranks = d.gather_host(_rng_state(self.device))
        path = self.out / "checkpoints" / f"step_{step:07d}"
        if d.main:
            with self._writing_dir(path, "--resume continues from it") as tmp:  # on the disk before older ones go
                self.write_model(tmp / "model", model_state)
                torch.save(optim_state, tmp / "optimizer.pt")
                torch.save({"ranks": ranks, "scaler": self.scaler.state_dict()}, tmp / "rng.pt")
                (tmp / "config.yaml").write_text(dump_config(self.cfg), encoding="utf-8")
                files = _file_sums(tmp)
                elapsed = self._elapsed()
                write_json_atomic(tmp / "state.json", {
                    "kind": self.cfg.kind, "step": step, "tokens": self.progress.tokens,
                    "loss_tokens": self.progress.loss_tokens, "flops": self.progress.flops, "elapsed_s": elapsed,
                    "peak_flops_spent": self._peak_flops_spent(elapsed),
                    "loader": loader_state, "log_window": {"loss_sum": window.item(),
                                                           "loss_tokens": self.window_loss_tokens,
                                                           "skipped": int(self.window_skipped.item())},
                    "world_size": d.world, "batch_size": self.cfg.batch_size,
                    "seq_len": self.cfg.seq_len, "total_steps": self.total_steps, "warmup": self.warmup,
                    "lr": self.cfg.lr, "min_lr_ratio": self.cfg.min_lr_ratio, "lr_schedule": self.cfg.lr_schedule,
                    "decay_fraction": self.cfg.decay_fraction, "max_minutes": self.cfg.max_minutes,
                    "training_data": training_data_id(self.meta), "files": files})
            self.tok_dir = path / "model"  # the tokenizer to copy from now on: never rotated away, never moved
            for old in checkpoints(self.out)[:-self.cfg.keep_checkpoints]:
                delete_via(old, old.with_name(f".{old.name}.old-{os.getpid()}"))
        d.barrier()
        self.pace.save_times.append(time.perf_counter() - t0)
        return path

    def _damaged(self, problem: Exception) -> TinykError:
        """A checkpoint damaged after it was written (disk, copying): say which, and the way out. One
        that vanished or changed while read, in a directory another run holds, was that run's rotation."""
        if self.run_dir.held_elsewhere():
            return self.run_dir.in_use()
        way = ("delete it to resume from the one before" if len(checkpoints(self.out)) > 1 else
               f"it is the run's only one (deleted, --resume would start the run anew): train on from its model/, "
               f"if that is whole, in a new run (--init {self.resumed_from / 'model'})")
        why = f"{first_line(problem)} missing" if isinstance(problem, KeyError) else first_line(problem)
        return TinykError(f"checkpoint {self.resumed_from} is damaged ({why}); {way}, or start over with --force")

    def _weights_error(self, e: TinykError) -> TinykError:
        """A model (weights, tokenizer) that does not load: a resumed checkpoint's is damaged, --init's
        is the user's to fix."""
        return self._damaged(e) if self.resumed_from else e

    def _check_checkpoint_sums(self) -> None:
        """The resumed checkpoint's files against the sizes and checksums its state.json records, before
        any of them is read (its tokenizer is, first)."""
        try:
            state = read_json(self.resumed_from / "state.json")
            if not isinstance(state, dict):
                raise ValueError("state.json holds no JSON object")
            _check_sums(self.resumed_from, state.get("files"))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise self._damaged(e) from e

    def _load_checkpoint(self, path: Path) -> None:
        try:
            state = self._load_checkpoint_files(path)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, pickle.UnpicklingError) as e:
            raise self._damaged(e) from e
        # Outside the try: a mistake of tinyk's in the schedule must not call a good checkpoint damaged.
        self._resume_schedule(state)

    def _load_checkpoint_files(self, path: Path) -> dict[str, Any]:
        """Restores the model's progress, the optimizer, the RNGs and the data's place; returns state.json."""
        state = read_json(path / "state.json")
        required = ("step", "tokens", "loss_tokens", "elapsed_s")
        counts = ("step", "tokens", "loss_tokens", "total_steps", "warmup")
        for key in (*required, "total_steps", "warmup", "lr", "min_lr_ratio", "decay_fraction", "max_minutes"):
            value = state[key] if key in required else state.get(key, 0)  # older checkpoints lack the schedule's
            if key == "max_minutes" and value is None:  # a run without a time budget
                continue
            if not _finite_amount(value) or (key in counts and not isinstance(value, int)):
                raise ValueError(f"state.json has {key} {value!r}")
        if state.get("lr_schedule", "cosine") not in LR_SCHEDULES:
            raise ValueError(f"state.json has lr_schedule {state['lr_schedule']!r}")
        if state["kind"] != self.cfg.kind:
            raise TinykError(f"{path} is a {state['kind']} checkpoint, not {self.cfg.kind}")
        was, now = state.get("training_data"), training_data_id(self.meta)
        # Other contents in the same shards: the loader's position would point into another sample order.
        # (Shards cut otherwise may hold the same stream, which their checksums cannot tell.)
        if was and now and was["shards"] == now["shards"] and was["sha256"] != now["sha256"]:
            raise TinykError(f"{self.cfg.data} holds other training data than this run trained on (its files' "
                             f"checksums differ: another corpus, system prompt or split): resume with the data it "
                             f"began with, or train on from its weights in a new run (--init {path / 'model'})")
        try:  # before the large files load: a resume that would disturb the sample order is refused at once
            # Checkpoints from before the loader recorded seq_len have it beside the loader's state.
            self.loader.load_state_dict({"seq_len": state.get("seq_len", self.cfg.seq_len), **state["loader"]})
        except ResumeMismatch as e:
            raise TinykError(f"{e}, or train on from its weights in a new run (--init {path / 'model'})") from None
        self._restore_optimizer(path)
        self._restore_rng(path, state["step"])
        spent = state.get("peak_flops_spent")
        if not _finite_amount(spent):
            spent = None  # an older checkpoint, or a session whose device had no known peak
        flops = state.get("flops")
        if not isinstance(flops, int) or flops < 0:  # an older checkpoint: its tokens at the full sequence's cost
            flops = state["tokens"] * self.flops_per_token
        self.progress = _Progress(state["step"], state["tokens"], state["loss_tokens"], state["elapsed_s"], spent,
                                  flops)
        window = state["log_window"]
        if "loss_sum" in window:  # a checkpoint of an earlier tinyk summed step means: its window starts anew
            if self.dist.main:
                self.window_loss.fill_(window["loss_sum"])
            self.window_loss_tokens = window["loss_tokens"]
        self.window_skipped.fill_(int(window.get("skipped", 0)))
        return state

    def _restore_optimizer(self, path: Path) -> None:
        """AdamW's state from the checkpoint; its hyper-parameters and kernels from this run's config and device."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        fresh = [{k: v for k, v in g.items() if k != "params"} for g in self.opt.param_groups]
        optim_state = _load_pt(path / "optimizer.pt")
        # Loading places AdamW's step counts by the saved kernel choice: a CPU run's unfused groups would
        # leave them on the CPU, where CUDA's fused kernel refuses them at the first step.
        kernels = {k: fresh[0][k] for k in ("fused", "foreach", "capturable") if k in fresh[0]}
        for g in optim_state.get("param_groups", []):
            g.update(kernels)
        if self.fsdp:
            set_optimizer_state_dict(self.model, self.opt, optim_state, options=StateDictOptions(full_state_dict=True))
        else:  # torch's call would first fill the optimizer with zeros, holding the state twice at once
            self.opt.load_state_dict(_by_position(self.model, self.opt, optim_state))
        for g, f in zip(self.opt.param_groups, fresh, strict=True):
            g.update(f)

    def _restore_rng(self, path: Path, step: int) -> None:
        """Each rank's random streams (dropout) and fp16's loss scale, as the checkpoint left them."""
        extra = _load_pt(path / "rng.pt")
        ranks = extra["ranks"]
        if len(ranks) == self.dist.world:
            _set_rng_state(ranks[self.dist.rank], self.device)
        else:  # another world size: fresh per-rank streams, so the ranks' dropout masks still differ
            _seed_streams((self.cfg.seed + 1 + self.dist.rank) * 1_000_003 + step)
        if extra["scaler"]:  # empty from a bf16 or fp32 session: an fp16 one (a V100 after an A100) starts afresh
            self.scaler.load_state_dict(extra["scaler"])

    def _resume_schedule(self, state: dict[str, Any]) -> None:
        """The resumed run's length, warmup and LR schedule. What is left of a token or epoch budget is
        counted at this session's batch size (pretraining may change it; SFT refuses that), from the
        samples done ever; a timed run goes on with the schedule fitted so far until this session's own
        estimate, or given another budget, one fitted at the earlier sessions' pace where that is shorter;
        a run made longer or shorter re-fits the schedule from where it is (`refit`, which the header
        reports)."""
        cfg, step, planned = self.cfg, state["step"], state.get("total_steps")
        saved_warmup = state.get("warmup", self.warmup)
        done = state["loader"]["epoch"] * self.loader.num_windows + state["loader"]["cursor"]
        self.step_cap, self.ended_by = first_budget(step_budgets(cfg, self.loader.num_windows, step, done))
        self.total_steps = self.step_cap
        if cfg.max_minutes and state.get("max_minutes") and "warmup" in state and planned and \
                (state["max_minutes"] == cfg.max_minutes or step < planned):
            # Timed before and now: go on with the schedule fitted so far (this session's first estimate
            # is a few steps away), and a finished run stays finished unless its time budget changed.
            self.total_steps = min(self.step_cap, max(step, planned))
            if self.total_steps < self.step_cap:
                self.ended_by = "--max-minutes"
        # The run's own warmup stays: the default one (2% of the length first planned) and one a time
        # budget's fit cut short, so a run made longer or resumed otherwise does not warm up again.
        if cfg.warmup_steps is None:
            self.warmup = saved_warmup
        elif state.get("max_minutes"):
            self.warmup = min(saved_warmup, cfg.warmup_steps)
        if cfg.max_minutes and planned and step < planned and state["elapsed_s"] >= cfg.max_minutes * 60:
            spent = state["elapsed_s"]
            raise TinykError(f"--max-minutes {cfg.max_minutes:g} is spent: the run has trained "
                             f"{f'{spent / 60:.1f} minutes' if spent >= 60 else f'{spent:.1f} s'} and stopped at step "
                             f"{step:,} of the {planned:,} it planned: raise --max-minutes to go on, or use the "
                             f"checkpoint's model/ as it is")
        was, finished = state.get("max_minutes"), bool(planned) and step >= planned
        if cfg.max_minutes and (not was or cfg.max_minutes < was or finished) and 0 < step < self.total_steps \
                and state["elapsed_s"] > 0:
            # Until this session has timed steps of its own, the earlier sessions' pace (their first step,
            # evaluations and checkpoints included) says how many steps a budget lowered or new fits, so one
            # nearly spent still ends at its floor LR rather than past its time, and how many a finished
            # run's other budget adds (none where it is spent: the run stays finished; it ran on at the step
            # cap's length, at its peak LR). An unfinished run's raised budget waits for this session's
            # estimate: that pace, slow by its start-up, would cut the schedule fitted so far and its warmup.
            fit = step + int((cfg.max_minutes * 60 - state["elapsed_s"]) / state["elapsed_s"] * step)
            if fit < self.total_steps:
                self._fit_schedule(max(step if finished else step + 1, fit))
                self.ended_by = "--max-minutes"
        if planned and self.total_steps < step < planned:
            # Ending here would make a "complete" run, and its final/ model, of one stopped mid-schedule.
            raise TinykError(f"{self._budget_text()} ends this run at step {self.total_steps:,}, but it stopped at "
                             f"step {step:,} of the {planned:,} it planned: raise {self.ended_by} to go on, or use "
                             f"the checkpoint's model/ as it is")
        if step > self.total_steps:  # a finished run, given a smaller budget, is as long as it was
            self.total_steps = step
        if planned and step < self.total_steps:
            self.refit = self._refit(state, step, planned)

    def _refit(self, state: dict[str, Any], step: int, planned: int) -> tuple[int, float, float, list[str]] | None:
        """For the header: (old length, old LR, new LR, the settings given that changed it) where the
        resumed schedule moves this step's LR by more than a tenth (after a finished run made longer it
        climbs back up), or is another schedule."""
        new = self._schedule()
        # A checkpoint from before lr_schedule was a setting ran the cosine.
        old = Schedule(lr=state.get("lr", self.cfg.lr), warmup_steps=state.get("warmup", self.warmup),
                       min_lr_ratio=state.get("min_lr_ratio", self.cfg.min_lr_ratio),
                       lr_schedule=state.get("lr_schedule", "cosine"),
                       decay_fraction=state.get("decay_fraction", self.cfg.decay_fraction))
        was, now = old.lr_at(step, planned), new.lr_at(step, self.total_steps)
        if abs(now - was) <= 0.1 * was and old.lr_schedule == new.lr_schedule:  # another shape is always said
            return None
        # The settings given that change the schedule (a cosine has no decay_fraction).
        wsd = "wsd" in (old.lr_schedule, new.lr_schedule)
        given = [f"{k} is {v}" for k, v in asdict(new).items()
                 if v != getattr(old, k) and (k != "warmup_steps" or self.cfg.warmup_steps)
                 and (k != "decay_fraction" or wsd)]
        return planned, was, now, given

    def _budget_text(self) -> str:
        """The budget that ends the run, as its flag and value, for messages."""
        cfg = self.cfg
        value = {"--max-steps": cfg.max_steps, "--max-tokens": cfg.max_tokens, "--max-minutes": cfg.max_minutes,
                 "--epochs": cfg.epochs}[self.ended_by]
        return f"{self.ended_by} {value:,g}" if value else "one epoch (the default)"

    # --- the loop --------------------------------------------------------------------------

    def _elapsed(self) -> float:
        return self.progress.elapsed + time.perf_counter() - self._t0

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def _autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def _sync(self, last: bool) -> contextlib.AbstractContextManager:
        """Gradients are reduced across processes only on the last micro-step of an accumulation."""
        if self.fsdp:
            self.model.set_requires_gradient_sync(last)
        if self.ddp is not None and not last:
            return self.ddp.no_sync()
        return contextlib.nullcontext()

    def _oom(self, memory: str) -> TinykError:
        knobs = [f"lower --micro-batch (try {max(1, self.micro // 2)})"]
        if not self.cfg.activation_checkpointing:
            knobs.append("add --activation-checkpointing")
        if self._fsdp_would_shard():
            knobs.append("shard the model with --parallel fsdp")
        knobs.append("use a shorter --seq-len")
        return TinykError(f"out of {memory} at micro-batch {self.micro} x seq_len {self.cfg.seq_len} "
                          f"({dtype_name(self.dtype)}): {', '.join(knobs[:-1])}, or {knobs[-1]}")

    def _fsdp_would_shard(self) -> bool:
        """Whether `--parallel fsdp` would cut this run's memory: it shards only across several
        processes, and on the CPU those of one host share its memory anyway."""
        hosts_share = self.device.type == "cpu" and _processes_on_this_host() >= self.dist.world
        return self.cfg.parallel != "fsdp" and self.dist.world > 1 and not hosts_share

    def next_batches(self) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
        """This process's micro-batches for one optimizer step, and how many of their targets carry loss."""
        batches = [self.loader.next_batch() for _ in range(self.accum)]
        return batches, sum(int((y != IGNORE).sum()) for _, y in batches)

    def train_step(self, batches: list[tuple[torch.Tensor, torch.Tensor]], n_loss: int) -> tuple[torch.Tensor,
                                                                                                 torch.Tensor]:
        """One optimizer step over this process's micro-batches; returns (loss sum, grad norm) as tensors.

        `n_loss` is the global number of loss tokens, so sum/n_loss is the exact global mean and the
        world-size factor undoes the averaging of gradients across processes.
        """
        for g in self.opt.param_groups:
            g["lr"] = self._schedule().lr_at(self.progress.step, self.total_steps)
        scale = self.dist.world / max(n_loss, 1)
        total, norm = optimizer_step(self.step_module, self.opt, self.scaler, batches, scale,
                                     grad_clip=self.cfg.grad_clip, autocast=self._autocast, sync=self._sync,
                                     to_device=lambda b: (self._to_device(b[0]), self._to_device(b[1])))
        if self.scaler.is_enabled():  # the scaler skips exactly the steps whose unscaled gradients are not finite
            self.window_skipped += ~torch.isfinite(norm)
        return total, norm

    def _schedule(self) -> Schedule:
        cfg = self.cfg
        return Schedule(cfg.lr, self.warmup, cfg.min_lr_ratio, cfg.lr_schedule, cfg.decay_fraction)

    def _seconds_for(self, k: int) -> float | None:
        """What k more steps take at this session's pace: theirs, the evaluations and checkpoints before the
        last of them (this step's own still to come), and the run's end (the final evaluation, the last
        checkpoint and final/, a third of one), each as long as this session's took in the median (one slowed
        by other work does not shorten the schedule, and cut the LR, for the steps after it); None before
        a step is timed."""
        cfg, step, pace = self.cfg, self.progress.step, self.pace
        if not pace.timed_steps(step):
            return None
        step_s = pace.step_seconds(step)
        if pace.eval_times:
            eval_s = statistics.median(pace.eval_times)
        elif self.has_val:  # none yet: a forward pass over its batches, at a third of a training step each
            batches = math.ceil(self.val_split.size / cfg.batch_size)
            eval_s = (min(batches, cfg.eval_batches) if cfg.eval_batches else batches) * step_s / 3
        else:
            eval_s = 0.0
        save_s = statistics.median(pace.save_times) if pace.save_times else 0.0

        def due(every: int) -> int:  # the multiples of `every` among steps step .. step + k - 1
            return (step + k - 1) // every - (step - 1) // every if every and k else 0

        return k * step_s + (due(cfg.eval_every) + 1) * eval_s + (due(cfg.save_every) + 4 / 3) * save_s

    def _fit_estimate(self) -> int:
        """--max-minutes: the run's length that fits the time left at this session's pace, or 0 before it
        is timed: two steps, or in a resumed session, which goes on with the schedule fitted so far, ten
        (its first steps run on cold caches). Ranks average their estimates."""
        if self.pace.timed_steps(self.progress.step) < (10 if self.resumed_from else 2):
            return 0
        left = self.cfg.max_minutes * 60 - self._elapsed()
        lo, hi = 0, max(0, self.step_cap - self.progress.step)
        while lo < hi:  # the most steps that fit: the time they take grows with their number
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self._seconds_for(mid) <= left else (lo, mid - 1)
        return self.progress.step + lo

    def _fit_schedule(self, fitted: int) -> None:
        """Re-fits the LR schedule to the agreed length, so it still ends at its floor on time. A warmup
        of its own (a preset's 1000 steps) keeps at most half of the run, so the LR reaches its peak and
        decays."""
        self.total_steps = min(self.step_cap, max(self.progress.step, fitted))
        if self.cfg.warmup_steps is None:
            self.warmup = min(self.warmup, default_warmup(self.total_steps))
        else:  # only ever shortened: a longer estimate later must not start the warmup again
            self.warmup = min(self.warmup, self.total_steps // 2)
        if self.monitor:
            self.monitor.set_total(self.total_steps)

    def _lockstep(self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]]
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor] | None]:
        """Under FSDP every forward is a collective, so ranks that ran out keep stepping with None."""
        it = iter(batches)
        while True:
            b = next(it, None)
            if not self.fsdp:
                if b is None:
                    return
            elif self.dist.sum_host([b is not None])[0] == 0:
                return
            yield b

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        """Validation loss (nats per loss token) and bits per byte of the text those tokens spell."""
        from .loader import split_batches

        cfg = self.cfg
        self.model.eval()
        # eval_batches counts global batches of batch_size sequences, turned here into split_batches' groups of
        # micro x world sequences, so the subset is the same for any world size.
        group = self.micro * self.dist.world
        groups = math.ceil(cfg.eval_batches * cfg.batch_size / group) if cfg.eval_batches else None
        batches = split_batches(self.val_split, self.micro, groups, rank=self.dist.rank, world_size=self.dist.world)

        def on_device() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            dummy = torch.zeros(1, 1, dtype=torch.long)
            for b in self._lockstep(batches):
                x, y = b if b is not None else (dummy, torch.full_like(dummy, IGNORE))
                yield self._to_device(x), self._to_device(y)

        acc = eval_sums(self.model, on_device(), self.token_bytes, self._autocast)
        self.model.train()
        if self.dist.world > 1:
            dist.all_reduce(acc)
        total, count, nbytes = acc.tolist()
        return total / max(count, 1), total / math.log(2) / nbytes if nbytes else math.nan

    def _stop_handlers(self) -> dict[int, Any]:
        """Ctrl-C, SIGTERM and SIGHUP (the terminal went away, an SSH session dropped, which would kill the
        run unsaved) stop the run at the end of its step, with a checkpoint."""
        first: float | None = None  # when this process got its first signal (not when another rank did)

        def handler(signum: int, _frame: Any) -> None:
            nonlocal first
            # A second Ctrl-C aborts without saving, unless it follows the first within the echo window:
            # then it is the same one delivered twice (`pkill -INT` reaching torchrun and its workers).
            if signum == signal.SIGINT and first is not None:
                if time.monotonic() - first > SIGINT_ECHO_S:
                    raise KeyboardInterrupt
                return
            said = first is not None
            first = first if first is not None else time.monotonic()
            self.stop_signal = signal.Signals(signum).name
            # A stop can be minutes away (an evaluation, a save): said once on each machine of a job.
            if not said and self.dist.local_rank == 0:
                # Under torchrun a second Ctrl-C reaches the ranks as SIGTERM, which aborts nothing.
                alone = signum == signal.SIGINT and not os.environ.get("TORCHELASTIC_RUN_ID")
                saving = " and saving" if self.resumable else ""
                again = "; Ctrl-C again aborts without saving" if alone and self.resumable else ""
                say_on_stderr(f"tinyk: {self.stop_signal}: stopping at the end of this step{saving}{again}")

        # A signal ignored when the run began stays so (SIGHUP under nohup; SIGINT for a job a script
        # started with &, as the shell does it): the run goes on.
        stops = [s for s in STOP_SIGNALS if signal.getsignal(s) is not signal.SIG_IGN]
        return dict.fromkeys(stops, handler)

    def _header(self) -> None:
        """What the run is and how it is set, then notes on its model, data and schedule, then where it
        resumed: printed once, before the first step."""
        lines = [*self._settings_lines(), *self._model_notes(), *self._data_notes()]
        if self.warmup >= self.total_steps:
            peak = "reaches its peak only at the last step" if self.warmup == self.total_steps else \
                "never reaches its peak"
            lines.append(f"note: warmup {self.warmup} is not shorter than the run's "
                         f"{plural(self.total_steps, 'steps')}, so the LR {peak} and never decays (set warmup_steps)")
        lines += self._resume_lines()
        if self.val_problem:
            lines.append(f"no validation: {self.val_problem}")
        if not self.monitor.can_plot:
            lines.append("note: no loss.png without matplotlib (pip install matplotlib); metrics.jsonl has the losses")
        for line in lines:
            self.monitor.print(line)

    def _settings_lines(self) -> list[str]:
        """The model, processes, dtype, batch, budget, schedule and FLOPs of the run, and notes on them."""
        cfg, d, m = self.cfg, self.dist, self.mcfg
        dev = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else self.device.type
        tokens_per_step = cfg.batch_size * cfg.seq_len
        # A resumed run may have trained its first steps at another batch size.
        # A time budget's run is as long as the clock allows, up to its cap (a resumed one: as fitted so far).
        steps = self.step_cap if cfg.max_minutes else self.total_steps
        fitted = f" ({self.total_steps:,} as fitted so far)" if cfg.max_minutes and self.total_steps < steps else ""
        decay = ""
        if cfg.lr_schedule == "wsd":
            decay_steps = wsd_decay_steps(self.total_steps, self.warmup, cfg.decay_fraction)
            decay = f" over the last {plural(decay_steps, 'steps')} (wsd)"
        run_tokens = self.progress.tokens + max(0, steps - self.progress.step) * tokens_per_step
        params = f"{self.n_params / 1e6:.1f}M" if self.n_params >= 100_000 else f"{self.n_params:,}"
        lines = [
            f"tinyk {cfg.kind}: {params} parameters, {d.world} process(es) on {dev}, "
            f"{dtype_name(self.dtype)}, {'FSDP' if self.fsdp else 'DDP' if d.world > 1 else 'single process'}"
            f"{', compiled' if cfg.compile else ''}"
            f"{', activation checkpointing' if cfg.activation_checkpointing else ''}",
            f"batch {cfg.batch_size} x {cfg.seq_len} = {tokens_per_step:,} tokens/step = {self.accum} micro-batch(es) "
            f"of {self.micro} per process; {'up to ' if cfg.max_minutes else ''}{plural(steps, 'steps')} "
            f"({'at most ' if cfg.kind == 'sft' else ''}{run_tokens:,} tokens){fitted}"
            f"{f', fitted to {minutes_text(cfg.max_minutes)} minutes' if cfg.max_minutes else ''}, "
            f"warmup {self.warmup}, lr {cfg.lr:g} -> {cfg.lr * cfg.min_lr_ratio:g}"
            f"{decay}",
            f"FLOPs/token {flops_formula(m, cfg.seq_len)}"
            f"{', T at most: an SFT batch counts its padded length' if cfg.kind == 'sft' else ''}; peak for MFU: "
            + (f"{flops_text(self.peak)} per device, {self.peak_source}" if self.peak else self.peak_source),
        ]
        unused = [
            "--parallel fsdp shards the model only under torchrun with several processes: this run is one process "
            "with the whole model" if cfg.parallel == "fsdp" and d.world == 1 else None,
            f"decay_fraction {cfg.decay_fraction:g} is the wsd schedule's (--lr-schedule wsd); cosine decays from the "
            f"warmup on" if cfg.lr_schedule != "wsd" and cfg.decay_fraction != TrainConfig.decay_fraction else None]
        for note in (micro_note(cfg.batch_size, d.world, cfg.micro_batch, self.micro),
                     emulated_note(self.device, self.dtype), *unused):
            if note:
                lines.append(f"note: {note}")
        return lines

    def _model_notes(self) -> list[str]:
        """Where the model is not what the flags suggest: --init's shapes beside a preset, a longer context."""
        cfg, m, lines = self.cfg, self.mcfg, []
        preset = self.preset_beside_init
        if preset in PRESETS and any(
                PRESETS[preset].get(k, getattr(m, k)) != getattr(m, k) for k in ("dim", "n_layers", "n_heads")):
            lines.append(f"note: the model is --init's (dim {m.dim}, {m.n_layers} layers, {m.n_heads} heads), not the "
                         f"{preset} preset's: the preset gives the training settings")
        init = self.init_model
        if init is not None and (m.max_seq_len > init.max_seq_len or m.rope_scaling != init.rope_scaling):
            # A fine-tune that extends the context, or rescales its positions.
            reach = self.init_trained / init.rope_scaling  # the positions --init's RoPE angles reach, unscaled
            new_from = int(reach * m.rope_scaling)  # positions past it meet angles --init's model never learnt
            trained = f", trained at seq_len {self.init_trained}" if self.init_trained < init.max_seq_len else ""
            context = f"note: the model's context is {m.max_seq_len}, --init's was {init.max_seq_len}{trained}"
            if m.max_seq_len > new_from:
                learnt = (f"learnt in this run up to seq_len {cfg.seq_len}" if cfg.seq_len > new_from else
                          f"not trained in this run either (seq_len {cfg.seq_len})")
                lines.append(f"{context}: positions past {new_from} are new to it, {learnt}; model.rope_scaling="
                             f"{m.max_seq_len / reach:g} would put them among the RoPE angles it learnt (linear RoPE "
                             f"scaling)")
            else:
                spacing = "closer together" if m.rope_scaling > init.rope_scaling else "further apart"
                same = (f"; the context stays {m.max_seq_len} (model.max_seq_len raises it)"
                        if m.max_seq_len <= init.max_seq_len else "")
                lines.append(f"{context}: model.rope_scaling {m.rope_scaling:g} (--init's {init.rope_scaling:g}) puts "
                             f"every position among the RoPE angles it learnt, {spacing}{same}")
        elif self.init_dir is None and not self.resumed_from and m.rope_scaling != 1:
            lines.append(f"note: model.rope_scaling {m.rope_scaling:g} on a model trained from scratch only slows its "
                         f"RoPE angles (as a larger rope_theta does); it extends a context in a fine-tune from --init")
        return lines

    def _data_notes(self) -> list[str]:
        """What of the data the run leaves out, cuts or goes through more than once a step."""
        cfg, m, lines = self.cfg, self.mcfg, []
        dropped, cut = (self.loader.dropped, self.loader.cut) if cfg.kind == "sft" else (0, 0)
        total = dropped + self.loader.num_windows
        if dropped:
            way = (f"a longer --seq-len, up to the model's context of {m.max_seq_len}, keeps some"
                   if cfg.seq_len < m.max_seq_len else "the model's context holds none of their answers")
            lines.append(f"note: {dropped:,} of {total:,} training conversations ({dropped / total:.1%}) have no "
                         f"assistant token within seq_len {cfg.seq_len} and are left out (the data's max_len is "
                         f"{self.meta.get('max_len')}; {way})")
        if self.val_dropped:
            lines.append(f"note: the val loss leaves out {plural(self.val_dropped, 'conversations')} with no "
                         f"assistant token within seq_len {cfg.seq_len}")
        if cut:
            lines.append(f"note: {cut:,} of {total:,} training conversations ({cut / total:.1%}) have answer tokens "
                         f"past seq_len {cfg.seq_len} + 1 tokens, which are cut off (the data was cut at max_len "
                         f"{self.meta.get('max_len')}, at a turn where possible)")
        windows = self.loader.num_windows
        if cfg.batch_size > windows:  # an epoch budget then rounds up to a step, which holds the data several times
            unit = "training conversations" if cfg.kind == "sft" else f"training sequences at seq_len {cfg.seq_len}"
            lines.append(f"note: a batch of {cfg.batch_size:,} is more than the data's {windows:,} {unit}: each step "
                         f"goes through the data {cfg.batch_size / windows:.1f} times, so the run trains "
                         f"{self.total_steps * cfg.batch_size / windows:.1f} epochs in "
                         f"{plural(self.total_steps, 'steps')}")
        # (An --epochs budget under a step with a batch larger than the data: said just above.)
        said = self.ended_by == "--epochs" and cfg.batch_size > windows
        samples = 0 if said else budget_samples(cfg, windows).get(self.ended_by, 0)
        if not self.resumed_from and 0 < samples < cfg.batch_size:  # rounded up to a step
            lines.append(f"note: {self._budget_text()} is less than one step of {cfg.batch_size:,} sequences "
                         f"({cfg.batch_size * cfg.seq_len:,} tokens at seq_len {cfg.seq_len}): the run trains one step")
        return lines

    def _resume_lines(self) -> list[str]:
        """Where a resumed run goes on from, and what changed in its schedule."""
        lines = []
        if self.resumed_from:
            lines.append(f"resumed from {self.resumed_from} (step {self.progress.step})")
            if self.progress.step >= self.total_steps:
                past = "past " if self.step_cap < self.progress.step else ""
                # final/ missing, from an earlier finish, or without its summary.json: written again now.
                again = "" if self.finished_already else "; its final/ is saved now"
                lines.append(f"the run is already complete at step {self.progress.step}, {past}the end of "
                             f"{self._budget_text()}: raise {self.ended_by} to train further{again}")
            elif self.refit:
                planned, was, now, changed = self.refit
                longer = [f"the run is now {self.total_steps:,} steps long, not {planned:,}"]
                why = (longer if planned != self.total_steps else []) + changed
                lines.append(f"note: {', and '.join(why)}, so the LR schedule is re-fitted: step "
                             f"{self.progress.step + 1} trains at LR {now:.3g}, where the old schedule was at "
                             f"{was:.3g}")
        elif self.resume:
            lines.append(f"--resume: no checkpoint in {self.out}, so this is a new run")
        return lines

    def run(self) -> dict[str, Any]:
        try:
            summary = self._run()
            # The run is saved and its summary written: a stop now has nothing left to stop, here (the run
            # --force replaced is deleted) nor in the trackers' close below, which a second Ctrl-C still ends.
            with signals_held(deliver=False, second_ctrl_c_aborts=True):
                self.run_dir.drop_replaced()
        except BaseException as e:
            first_step = self.progress.step == 0 and not self.resumed_from
            lost = self._peer_lost(e, before_training=first_step)
            # torchrun sends SIGTERM to the survivors of a lost process: this one is ending already, and
            # the line saying why (and how to resume) is the one to print, not "terminated".
            with signals_held(deliver=False) if lost is not None else contextlib.nullcontext():
                if first_step:  # its first step failed
                    self._fail_start(e)
                else:
                    with contextlib.suppress(Exception):  # the error that stopped the run is the one to report
                        self.close(*_exit_status(e))
            if lost is not None:
                raise lost from e
            raise
        stopped = summary.get("stop_signal") if summary.get("status") == "interrupted" else None
        with signals_held(deliver=False, second_ctrl_c_aborts=True):
            self.close(signal_status(stopped) if stopped else 0)
        return summary

    def close(self, exit_code: int = 0, error: str | None = None) -> None:
        """Closes the trackers (telling them how the run ended: the command's `exit_code`) and frees the
        run directory for the next run; `run()` ends with it."""
        try:
            if self.monitor:
                monitor, self.monitor = self.monitor, None
                monitor.close(exit_code, error)
        finally:
            self.run_dir.lock.release()
            self.dist.close()

    def _run(self) -> dict[str, Any]:
        if self.dist.main:
            self._header()
        if self.finished_already:  # this call stopped nothing, whatever stopped the run's last step
            return {**self.finished_already, "stop_signal": self.stop_signal}
        if self.dist.main:  # an earlier session's says "completed" of a run this one extends, until it ends
            (self.out / "summary.json").unlink(missing_ok=True)
        self._t0 = time.perf_counter()
        try:
            with signal_handlers(self._stop_handlers()):
                return self._loop()
        except RuntimeError as e:
            from torch._dynamo.exc import TorchDynamoException

            if memory := out_of_memory(e):
                raise self._oom(memory) from e
            if self.cfg.compile and isinstance(e, TorchDynamoException):
                raise TinykError(f"torch.compile failed ({first_line(e)[:300]}); leave --compile out, or install what "
                                 f"it needs (a C++ compiler such as g++; Triton on a GPU)") from e
            raise

    def _finished_summary(self) -> dict[str, Any] | None:
        """The summary of a run that finished at the step it resumes from: nothing to train, and its
        summary and final model stay as they are. A final/ from an earlier, shorter finish (the run was
        extended, stopped and resumed with the old budget), or one without its summary, is written again."""
        if not self.resumed_from or self.progress.step < self.total_steps or not (self.out / "final").is_dir():
            return None
        try:
            summary = read_json(self.out / "summary.json")
        except (OSError, ValueError):
            return None
        finished = isinstance(summary, dict) and summary.get("status") == "completed" \
            and summary.get("steps") == self.progress.step
        return summary if finished else None

    def _earlier_results(self) -> tuple[float | None, tuple[float, float | None] | None, float]:
        """(last train loss, last (val loss, bpb), best val loss) logged before this session, so a resumed
        run's summary speaks for the whole run."""
        records = self.monitor.records if self.monitor else []
        train = [r["loss"] for r in records if r.get("type") == "train" and r.get("loss") is not None]
        evals = [(r["val_loss"], r.get("val_bpb")) for r in records
                 if r.get("type") == "eval" and r.get("val_loss") is not None]
        return (train[-1] if train else None, evals[-1] if evals else None,
                min((v for v, _ in evals), default=math.inf))

    def _loop(self) -> dict[str, Any]:
        cfg, d, p = self.cfg, self.dist, self.progress
        if self.device.type == "cuda":  # this run's peak, not that of one before it in the process (the demo's)
            torch.cuda.reset_peak_memory_stats(self.device)
        self._window_t0, self._window_tokens0, self._window_flops0 = time.perf_counter(), p.tokens, p.flops
        last_train, last_val, best_val = self._earlier_results()
        # Rank 0 alone reads the history, and every rank must agree on whether an evaluation writes best/:
        # each takes rank 0's lowest val loss and its reading of best/.
        # best/'s model ((inf, None) for none), which keep_best replaces with one of a lower val loss than any
        # so far; without keep_best it stays, and the summary names it all the same.
        best_val, (self.kept_val, self.kept_step) = d.gather_host((best_val, best_kept_so_far(self.out / "best")))[0]
        self._note_kept(best_val)
        last_saved = p.step if self.resumed_from else -1
        estimate = 0
        while True:
            loader_state = self.loader.state_dict()
            if p.step >= self.total_steps:
                break
            batches, n_loss = self.next_batches()
            n_pos = sum(x.numel() for x, _ in batches)
            n_flops = sum(x.numel() * self.flops_at(x.shape[1]) for x, _ in batches)
            if self.monitor and self.monitor.output_lost:  # `| head` read its lines: stop as SIGPIPE would, saved
                self.stop_signal = self.stop_signal or "SIGPIPE"
            # One host all-reduce per step: loss-token, token and FLOP counts, a stop signal on any rank, and
            # the --max-minutes estimates from the previous step (every rank must stop at the same step).
            n_loss, n_pos, n_flops, interrupts, terms, estimates = d.sum_host(
                [n_loss, n_pos, n_flops, self.stop_signal == "SIGINT", self.stop_signal not in (None, "SIGINT"),
                 estimate])
            if interrupts or terms:
                self.stop_signal = self.stop_signal or ("SIGTERM" if terms else "SIGINT")  # it reached another rank
                if p.step == 0 and not self.resumed_from:  # `run` undoes the start, as for a failed first step
                    raise StoppedBeforeTraining(self.stop_signal)
                break
            total, norm = self.train_step(batches, n_loss)
            self.window_loss += total
            self.window_loss_tokens += n_loss
            p.step += 1
            p.tokens += n_pos
            p.loss_tokens += n_loss
            p.flops += n_flops
            self.run_dir.drop_replaced()
            if self.pace.t_first is None:
                self.pace.start(p.step)
            if cfg.max_minutes:
                if estimates:
                    self._fit_schedule(estimates // d.world)
                estimate = self._fit_estimate()
            if self.monitor:
                self.monitor.advance(1)
            if p.step % cfg.log_every == 0 or p.step == self.total_steps:
                last_train = self._log_window(norm)
            last = p.step == self.total_steps
            t_pause = time.perf_counter()
            evaluating = last or (cfg.eval_every and p.step % cfg.eval_every == 0 and not self._stopping())
            if self.has_val and evaluating:
                last_val = self._validate()
                if cfg.keep_best and last_val[0] < min(self.kept_val, best_val):
                    self._save_model("best", "--resume continues from it",
                                     {BEST_STEP: str(p.step), BEST_VAL: repr(last_val[0])})
                    self.kept_val, self.kept_step = last_val[0], p.step
                best_val = min(best_val, last_val[0])
            if evaluating and cfg.sample_prompts:
                self._sample()
            if evaluating:
                self.pace.eval_times.append(time.perf_counter() - t_pause)
            if not last and cfg.save_every and p.step % cfg.save_every == 0:
                self.save_checkpoint(self.loader.state_dict())
                last_saved = p.step
            if evaluating or last_saved == p.step:
                release_freed_memory()
            paused = time.perf_counter() - t_pause
            self._window_t0 += paused  # a log window's tokens/s is training speed alone
            self.pace.paused_s += paused
        interrupted = p.step < self.total_steps
        if last_saved != p.step:
            self.save_checkpoint(loader_state)
        final = None if interrupted else self._save_model("final", "--resume writes final/ from it")
        return self._summary(interrupted, final, last_train, last_val, best_val)

    def _note_kept(self, best_val: float) -> None:
        """Says where a session with keep_best off leaves best/ as it was, or where best/ is behind the run's
        lowest val loss so far, `best_val`."""
        val, step = self.kept_val, self.kept_step
        note = None
        if not self.cfg.keep_best and step is not None:
            note = f"keep_best is off, so best/ (step {step}'s model, val loss {val:.4f}) stays as it is"
        elif self.cfg.keep_best and best_val < val:
            held = f"best/ holds step {step}'s, val loss {val:.4f}" if step is not None else "best/ holds none"
            note = (f"keep_best: the model of the run's lowest val loss so far, {best_val:.4f}, was not kept "
                    f"(keep_best was off, or best/ was removed; {held}); best/ takes a model only from an "
                    f"evaluation that beats it")
        if note and self.monitor:
            self.monitor.print(f"note: {note}")

    def _stopping(self) -> bool:
        """Whether a stop signal reached any rank during this step: its periodic evaluation, which can
        take minutes, is left out so the checkpoint comes soon (the final evaluation never is)."""
        return self.dist.sum_host([self.stop_signal is not None])[0] > 0

    def _log_window(self, grad_norm: torch.Tensor) -> float:
        """Logs the train loss per token and tokens/s of the steps since the last log (the only host sync of
        the loss) and starts a new window; returns the loss."""
        p = self.progress
        if self.dist.world > 1:
            dist.all_reduce(self.window_loss)
        loss = self.window_loss.item() / max(self.window_loss_tokens, 1)
        seconds = time.perf_counter() - self._window_t0
        tokens, flops = p.tokens - self._window_tokens0, p.flops - self._window_flops0
        rate, flop_rate = tokens / seconds, flops / seconds
        self.pace.window_rates.append((rate, flop_rate))
        self._check_finite(loss, "loss")
        skipped = int(self.window_skipped.item()) if self.scaler.is_enabled() else None
        if self.monitor:
            self.monitor.log_train(self._train_record(loss, rate, flop_rate, round(flops / tokens), grad_norm.item(),
                                                      skipped), self._seconds_for(self.total_steps - p.step))
        self.window_loss.zero_()
        self.window_skipped.zero_()
        # From after the logging (which may re-time a CPU's peak): a window's tokens/s is training speed alone.
        self.window_loss_tokens, self._window_t0 = 0, time.perf_counter()
        self._window_tokens0, self._window_flops0 = p.tokens, p.flops
        return loss

    def _check_finite(self, loss: float, name: str) -> None:
        if not math.isfinite(loss):
            raise TinykError(f"training diverged at step {self.progress.step} ({name} {loss}); lower --lr "
                             f"or resume from an earlier checkpoint")

    def _sample(self) -> None:
        """Logs the model's greedy continuations of the sample prompts (SFT: its replies), under the default
        repetition penalty as `tinyk generate --temperature 0` decodes them: what it says as it learns.
        Rank 0 decodes alone (the others wait at the next step's first collective); greedy decoding draws
        no random numbers, so a resumed run still follows the same path."""
        from .engine import Engine, SamplingParams

        if not self.dist.main:
            return
        prompts = self.cfg.sample_prompts
        engine = Engine(self.model, self.tok, max_batch=len(prompts))  # the model's own weights, no copy
        try:
            done = engine.generate(self._sample_ids(), SamplingParams(temperature=0.0,
                                                                      max_new_tokens=self.cfg.sample_tokens))
        finally:
            self.model.train()
        self.monitor.log_samples(self.progress.step, [(q, c.text) for q, c in zip(prompts, done, strict=True)])

    def _sample_ids(self) -> list[list[int]]:
        """The sample prompts' token ids: each opens a document (pretraining) or is a user's message (SFT, under
        the system prompt the run's model records)."""
        from .engine import document_ids
        from .tokenizer import with_system

        if self.cfg.kind == "sft":
            return [self.tok.encode_chat(with_system([{"role": "user", "content": q}], self.system_prompt),
                                         add_generation_prompt=True) for q in self.cfg.sample_prompts]
        return [document_ids(self.tok, q) for q in self.cfg.sample_prompts]  # as `tinyk generate` reads them

    def _validate(self) -> tuple[float, float]:
        """(val loss, val bits per byte), logged."""
        p = self.progress
        if self.monitor:
            self.monitor.pausing("evaluating")
        val = self.evaluate()
        self._check_finite(val[0], "val loss")
        if self.monitor:
            self.monitor.log_eval({"step": p.step, "tokens": p.tokens, "val_loss": finite(val[0]),
                                   "val_bpb": finite(val[1]), "elapsed_s": round(self._elapsed(), 3)})
        return val

    @contextlib.contextmanager
    def _writing_dir(self, path: Path, then: str) -> Iterator[Path]:
        """Writes the directory `path` whole or not at all (a temporary sibling, fsynced and renamed); a
        failed save (a full disk, most often) says which checkpoint is still whole, and `then` what it is for."""
        try:
            with writing(path), atomic_dir(path, force=True, durable=True) as tmp:
                yield tmp
        except TinykError as e:
            kept = checkpoints(self.out)
            raise SaveFailed(f"{e} (the last checkpoint, checkpoints/{kept[-1].name}, is kept: {then})" if kept else
                             f"{e} (no checkpoint was kept)", str(e)) from e

    def _save_model(self, name: str, then: str, metadata: dict[str, str] | None = None) -> str:
        """Writes the model as the run's `name`/ (final, best): rank 0 writes, under FSDP every rank takes
        part in gathering it."""
        model_state = self._full_model_state()
        if self.dist.main:
            with self._writing_dir(self.out / name, then) as tmp:
                self.write_model(tmp, model_state, metadata)
        self.dist.barrier()
        return str(self.out / name)

    def _mfu(self, flops_per_s: float) -> float | None:
        if not self.peak:
            return None
        achieved = flops_per_s / self.dist.world
        first = None
        if achieved > self.peak and self.device.type == "cpu" and not self.cfg.peak_tflops:
            # The CPU's matmul rate was timed while other work held the cores: time it again, once (an
            # fp16 matmul on a CPU can time slower than the training runs: timed at every log window, it
            # cost seconds each), and never report more than 100% of it.
            if not self.peak_retimed:
                first, self.peak, self.peak_retimed = self.peak, measure_matmul_flops(dtype=self.dtype), True
                if cpu_emulates(self.dtype):  # a model's smaller products outrun the timed one however quiet
                    why = why_first = (f"{short_dtype_name(self.dtype)} emulated on this CPU runs small matmuls "
                                       f"faster than the timed one")
                else:
                    why, why_first = "that timing was slowed by other work", "the first timing was slowed by other work"
                self.peak_source += f" (timed again: {why_first})"
            self.peak = max(self.peak, achieved)
            if self.monitor and first is not None:  # the header's figure is not the one MFU is now against
                self.monitor.print(f"note: peak for MFU timed again: {flops_text(self.peak)} per device, not "
                                   f"{flops_text(first)} ({why})")
        return round(achieved / self.peak, 5)

    def _peak_flops_spent(self, elapsed: float) -> float | None:
        """What the run's devices could have done in `elapsed` seconds of it, at each session's world
        size and peak."""
        if not self.peak:
            return None
        p = self.progress
        before = p.peak_flops_spent if p.peak_flops_spent is not None else p.elapsed * self.dist.world * self.peak
        return before + (elapsed - p.elapsed) * self.dist.world * self.peak

    def _run_mfu(self, elapsed: float) -> float | None:
        """The whole run's MFU: its tokens' FLOPs over what its devices could have done."""
        spent = self._peak_flops_spent(elapsed)
        return round(self.progress.flops / spent, 5) if spent and self.progress.flops else None

    def _peak_mem_mib(self) -> float | None:
        return round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1) if self.device.type == "cuda" else None

    def _train_record(self, loss: float, rate: float, flop_rate: float, flops_per_token: int, grad_norm: float,
                      skipped: int | None) -> dict[str, Any]:
        p = self.progress
        return {"step": p.step, "tokens": p.tokens, "loss_tokens": p.loss_tokens, "loss": loss,
                "lr": self.opt.param_groups[0]["lr"],
                "grad_norm": finite(grad_norm), "skipped_steps": skipped,
                "tokens_per_s": round(rate, 1), "mfu": self._mfu(flop_rate),
                "flops_per_token": flops_per_token, "peak_mem_mib": self._peak_mem_mib(),
                "elapsed_s": round(self._elapsed(), 3), "epoch": round(self.loader.epochs_done, 4)}

    def _skipped_steps(self) -> int | None:
        """Steps of the whole run whose update fp16's GradScaler skipped (None unless fp16)."""
        if not self.scaler.is_enabled():
            return None
        records = self.monitor.records if self.monitor else []
        logged = sum(r.get("skipped_steps") or 0 for r in records if r.get("type") == "train")
        return logged + int(self.window_skipped.item())

    def _summary(self, interrupted: bool, final: str | None, last_train: float | None,
                 last_val: tuple[float, float | None] | None, best_val: float) -> dict[str, Any]:
        p, cfg = self.progress, self.cfg
        elapsed = self._elapsed()
        rate = p.tokens / elapsed if p.tokens and elapsed > 0 else None  # the whole run's, as tokens and elapsed_s
        # The first log window holds start-up (and compilation); the median of the rest is the steady rate.
        windows = self.pace.window_rates
        if not windows and self.monitor:  # this session trained nothing (killed while final/ was written)
            windows = [(r["tokens_per_s"], r["tokens_per_s"] * r["flops_per_token"]) for r in self.monitor.records
                       if r.get("type") == "train" and r.get("tokens_per_s")]
        windows = windows[1:] or windows
        steady = statistics.median(t for t, _ in windows) if windows else None
        # first: it may time the CPU's peak again
        mfu_steady = self._mfu(statistics.median(f for _, f in windows)) if windows else None
        skipped = self._skipped_steps()
        summary = {
            "kind": cfg.kind, "status": "interrupted" if interrupted else "completed",
            "stop_signal": self.stop_signal, "steps": p.step,
            "total_steps": self.total_steps, "skipped_steps": skipped,
            "tokens": p.tokens, "loss_tokens": p.loss_tokens, "elapsed_s": round(elapsed, 3),
            "tokens_per_s": round(rate, 1) if rate else None, "mfu": self._run_mfu(elapsed),
            "tokens_per_s_steady": round(steady, 1) if steady else None, "mfu_steady": mfu_steady,
            "peak_flops_per_device": self.peak, "peak_flops_source": self.peak_source,
            "flops_per_token": round(p.flops / p.tokens) if p.tokens else self.flops_per_token,
            "parameters": self.n_params, "final_train_loss": last_train,
            "final_val_loss": last_val[0] if last_val else None,
            "final_val_bpb": last_val[1] if last_val else None,
            "best_val_loss": best_val if math.isfinite(best_val) else None,
            "peak_mem_mib": self._peak_mem_mib(),
            "world_size": self.dist.world, "device": str(self.device), "dtype": dtype_name(self.dtype),
            "parallel": "fsdp" if self.fsdp else "ddp" if self.dist.world > 1 else "none",
            "final_model": final, "resumed_from": str(self.resumed_from) if self.resumed_from else None,
            "best_model": str(self.out / "best") if self.kept_step is not None else None,
            "best_model_step": self.kept_step,
            "best_model_val_loss": self.kept_val if self.kept_step is not None else None,
        }
        stopped = f"stopped by {self.stop_signal} at step {p.step}"
        if self.dist.main:
            with writing(self.out / "summary.json"):
                write_json_atomic(self.out / "summary.json", summary)
            self.monitor.summarize(summary)
            best = ""
            if self.kept_step is not None and self.kept_val <= best_val:
                best = f"; the lowest val loss, step {self.kept_step}'s, in {self.out / 'best'}"
            elif self.kept_step is not None:
                best = (f"; {self.out / 'best'} holds step {self.kept_step}'s (val loss {self.kept_val:.4f}), not the "
                        f"model of the run's lowest val loss, which was not kept")
            msg = (f"finished: {plural(p.step, 'steps')}, {p.tokens:,} tokens in {elapsed:.0f}s; model in {final}{best}"
                   if final else stopped + ("; checkpoint saved, continue with --resume" if self.resumable else ""))
            if skipped:
                msg += f" ({skipped} of the steps were skipped by fp16's loss scaler)"
            self.monitor.print(msg)
        elif interrupted and self.dist.local_rank == 0:  # another machine of the job: its terminal is told too
            say_on_stderr(f"tinyk: {stopped}" + (f"; process 0 saved a checkpoint in {self.out}, continue with "
                                                  f"--resume" if self.resumable else ""))
        return summary


_PEER_GONE = ("closed by peer", "reset by peer", "Broken pipe", "Connection refused", "communicator was aborted")


def peer_lost(e: BaseException, out: Path, *, before_training: bool = False) -> PeerLost | None:
    """A collective that failed because another process of the job died (killed, out of memory, or
    refused to start: an unwritable --out, a tracker that did not start): one line with the way back,
    in place of the backend's traceback."""
    if not isinstance(e, RuntimeError) or not any(s in str(e) for s in _PEER_GONE):
        return None
    if before_training:  # that process's own error is the news, and nothing was saved to resume
        return PeerLost("another process of this job stopped before training began; its own error says why")
    ckpts: list[Path] = []
    with contextlib.suppress(OSError):  # a lost network disk: the failed collective is still the news
        ckpts = checkpoints(out)
    newest = f"the newest checkpoint is {ckpts[-1]}; " if ckpts else ""
    return PeerLost(f"another process of this job stopped ({first_line(e)}); {newest}start the job again with "
                    f"--resume")


def train(cfg: TrainConfig, *, resume: bool = False, force: bool = False, resumable: bool = True) -> dict[str, Any]:
    """Runs (or continues) a training run and returns its summary (also written to OUT/summary.json).

    `cfg` comes from `config.resolve_config` (a preset, a config file, flags and --set items, as the
    CLI builds it; with `resume=True` there too, the run's saved config) and is not modified. A run
    that a signal stopped (Ctrl-C, SIGTERM) saves a checkpoint and returns, with "status":
    "interrupted" and "stop_signal" in the summary: a loop of runs checks that before going on (a
    signal that came in the last step is there too, beside "completed"), and
    `train(resolve_config(kind, flags={"out": OUT}, resume=True), resume=True)` continues it. Stopped
    before its first step, it has nothing to save and raises `errors.StoppedBeforeTraining` (in its
    set-up, before it takes the signals over, Ctrl-C is the caller's own KeyboardInterrupt). One run
    at a time in a process. `resumable=False`: a caller that never continues a stopped run (the demo),
    so a stop's lines do not offer --resume.
    """
    if not _TRAINING.acquire(blocking=False):
        raise TinykError("another train() is running in this process: runs share torch's global random "
                         "generator, so neither would start from its seed; run them one after another, or in "
                         "separate processes")
    try:
        with _callers_random_state_kept():
            return Trainer(cfg, resume=resume, force=force, resumable=resumable).run()
    finally:
        _TRAINING.release()


_TRAINING = threading.Lock()  # one run at a time in a process (a notebook's threads, a sweep's)


@contextlib.contextmanager
def _callers_random_state_kept() -> Iterator[None]:
    """Training seeds the global generators (its dropout streams are part of its checkpoints); a notebook's
    own random numbers after `train()` go on as if it had not run. CUDA's are kept where the caller had
    already started CUDA (before that, they have no state of the caller's to keep)."""
    cpu = torch.device("cpu")
    state = _rng_state(cpu)
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        _set_rng_state(state, cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
