"""Sizing a training run before it starts: memory per GPU, the largest micro-batch, time and cost.

The memory model is an inventory of what `tinyk.model` keeps alive during a training step:
the tensors autograd saves for backward (listed with `torch.autograd.graph.saved_tensors_hooks`,
in fp32 and in bf16 autocast) and the few transient buffers that set the peak. It is checked
against PyTorch's own allocation record by `measure_step_memory`, which replays the trainer's
step under the CPU memory profiler (tests/test_plan.py, bench/plan_vs_measured.py).
"""

from __future__ import annotations

import functools
import gc
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .errors import TinykError, first_line
from .model import (
    ADAMW_BYTES,
    DTYPES,
    GRAD_BYTES,
    PRESETS,
    WEIGHT_BYTES,
    ModelConfig,
    Transformer,
    preset_config,
    sdpa_fuses_gqa,
    training_flops,
)
from .monitor import gpu_peak_flops
from .units import GiB, MiB, bytes_text, plural

# Share of a GPU's memory a plan may fill: the rest is for the CUDA context, cuBLAS workspaces
# and the caching allocator's fragmentation, which PyTorch does not count as allocated.
USABLE_FRACTION = 0.90
# The seed's corpus is about 10B tokens; its author pretrained seed-215m on it in 26 h on 4 A100s.
DEFAULT_TOKENS = 10_000_000_000
TUTORIAL_RUN = {"preset": "seed-215m", "gpu": "a100", "gpus": 4, "hours": 26.0, "tokens": 10e9}
ASSUMED = "assumed"
FP32_SHARE = 0.5  # of the fp32 peak an fp32 run is assumed to reach
# Of a compiled run's MFU, what an eager one is assumed to reach where none was measured: eager mb64 reached
# 46% of compiled mb64's on the H100 (21.3% against 45.9%) and 50% on the H200 (23.7% against 47.2%).
EAGER_SHARE = 0.5
MEASURED_MODEL = "seed-215m"  # the model bench/gpu.sh measures; its MFU is the one in GPUS
# The MFU in GPUS is micro-batch 64's (32,768 tokens per micro-step at seq 512). Smaller micro-steps keep the
# GPU less busy; as shares of mb64's, bench/gpu.sh measured compiled mb16 88-89% (two H100s), compiled mb32
# 96-97% and eager mb32 94-95% (two H100s, an H200), and eager mb16 75% on one H100 and the H200 but 89% on a
# second H100 (eager launches every kernel from Python, so its small micro-batches may go at the host's pace);
# the lower figure is kept. Keyed by compiled.
MICRO_STEP_SHARE = {False: ((8192, 0.75), (16384, 0.945), (32768, 1.0)),
                    True: ((8192, 0.876), (16384, 0.966), (32768, 1.0))}
MIN_MICRO_STEP_SHARE = 0.1


@dataclass(frozen=True)
class GPUSpec:
    """A GPU class: memory as PyTorch reports it and the MFU tinyk reaches on it, compiled and eager
    (the trainer's default: `compile` is off unless set).

    The dense bf16 peak (fp16 before Ampere) comes from the trainer's table (`monitor.GPU_PEAK_TFLOPS`),
    so plan and the training log divide by the same number.
    """

    key: str
    name: str
    memory_gib: float
    mfu: float  # compiled
    mfu_source: str  # ASSUMED, or "measured: ..." naming the bench/gpu.sh run it comes from
    fp32_tflops: float  # dense fp32 without tensor cores (tinyk leaves TF32 off): what an fp32 run gets
    bf16: bool = True  # False before Ampere (T4, V100): autocast runs in fp16 there, and the peak is fp16's
    eager_mfu: float | None = None  # None: EAGER_SHARE of `mfu`, assumed
    eager_mfu_source: str = ASSUMED

    @property
    def peak_flops(self) -> float:
        peak = gpu_peak_flops(self.name)
        assert peak is not None, self.name
        return peak

    @property
    def fp32_mfu(self) -> float:
        """An fp32 run's MFU, against the bf16 peak (the trainer's convention) its matmuls never touch."""
        return FP32_SHARE * self.fp32_tflops * 1e12 / self.peak_flops

    def mfu_for(self, compiled: bool) -> tuple[float, str]:
        """The MFU of a compiled or an eager run, and its source (ASSUMED, or "measured: ...")."""
        if compiled:
            return self.mfu, self.mfu_source
        if self.eager_mfu is None:
            return EAGER_SHARE * self.mfu, ASSUMED
        return self.eager_mfu, self.eager_mfu_source


# MFU stays "assumed" (peers: nanochat 41-47% and llm.c ~40% on H100, TinyLlama 56% on A100; 40% for
# A100/H100-class cards and the L40S, 35% for consumer and workstation cards, L4, V100 and T4) until a
# bench/gpu.sh run on that class replaces it with the figure it printed. A800, H800 and H20 are the
# export versions sold in China.
GPUS: dict[str, GPUSpec] = {g.key: g for g in [
    GPUSpec("a100", "NVIDIA A100 80GB", 79.2, 0.40, ASSUMED, 19.5),
    GPUSpec("a100-40gb", "NVIDIA A100 40GB", 39.4, 0.40, ASSUMED, 19.5),
    GPUSpec("a800", "NVIDIA A800 80GB", 79.2, 0.40, ASSUMED, 19.5),
    # At the shipped config's micro-batch 64: compiled, the median of four runs, 45.8-46.0% (128: 45.5-47.0%).
    GPUSpec("h100", "NVIDIA H100 80GB SXM", 79.1, 0.459,
            "measured: bench/gpu.sh on NVIDIA H100 80GB HBM3, compiled mb64, median of 4 runs, 2026-12-05", 67.0,
            eager_mfu=0.213,
            eager_mfu_source="measured: bench/gpu.sh on NVIDIA H100 80GB HBM3, eager mb64, 2026-12-05"),
    GPUSpec("h100-pcie", "NVIDIA H100 PCIe 80GB", 79.1, 0.40, ASSUMED, 51.0),
    GPUSpec("h800", "NVIDIA H800 80GB SXM", 79.1, 0.40, ASSUMED, 67.0),
    # At the shipped config's micro-batch 64: compiled, the median of three runs, 46.9-47.9% (128 measured 48.6%).
    GPUSpec("h200", "NVIDIA H200 141GB", 139.8, 0.472,
            "measured: bench/gpu.sh on NVIDIA H200, compiled mb64, median of 3 runs, 2026-12-04", 67.0,
            eager_mfu=0.237, eager_mfu_source="measured: bench/gpu.sh on NVIDIA H200, eager mb64, 2026-12-04"),
    GPUSpec("h20", "NVIDIA H20 96GB", 95.0, 0.40, ASSUMED, 44.0),
    GPUSpec("l40s", "NVIDIA L40S 48GB", 44.5, 0.40, ASSUMED, 91.6),
    GPUSpec("l4", "NVIDIA L4 24GB", 22.1, 0.35, ASSUMED, 30.3),
    GPUSpec("a6000", "NVIDIA RTX A6000 48GB", 47.5, 0.35, ASSUMED, 38.7),
    GPUSpec("rtx5090", "NVIDIA GeForce RTX 5090 32GB", 31.4, 0.35, ASSUMED, 104.8),
    GPUSpec("rtx4090", "NVIDIA GeForce RTX 4090 24GB", 23.6, 0.35, ASSUMED, 82.6),
    GPUSpec("rtx4080", "NVIDIA GeForce RTX 4080 16GB", 15.6, 0.35, ASSUMED, 48.7),
    GPUSpec("rtx3090", "NVIDIA GeForce RTX 3090 24GB", 23.6, 0.35, ASSUMED, 35.6),
    GPUSpec("rtx3080", "NVIDIA GeForce RTX 3080 10GB", 9.8, 0.35, ASSUMED, 29.8),
    GPUSpec("v100", "NVIDIA V100 SXM2 32GB", 31.7, 0.35, ASSUMED, 15.7, bf16=False),
    GPUSpec("t4", "NVIDIA Tesla T4 16GB", 14.6, 0.35, ASSUMED, 8.1, bf16=False),
]}


def _norm_gpu_name(s: str) -> str:
    s = "".join(c for c in s.lower() if c.isalnum())
    for prefix in ("nvidia", "geforce", "rtx"):
        s = s.removeprefix(prefix)
    return s


def find_gpu(name: str) -> GPUSpec:
    """`--gpu` as typed by a person: "h100", "A100-40GB", "4090", "RTX 3090" ..."""
    want = _norm_gpu_name(name)
    for key, gpu in GPUS.items():
        if _norm_gpu_name(key) == want:
            return gpu
    key = gpu_class(name)  # a device name as nvidia-smi or torch print it: "NVIDIA H100 80GB HBM3"
    if key is not None and _memory_named(name) in (None, _memory_named(GPUS[key].name)):
        return GPUS[key]
    near = key or gpu_class(name, variants=True)
    variant = (f"; it differs from the table's {GPUS[near].name} in memory or clocks: --gpu {near} plans it as "
               f"that card" if near else "")
    raise TinykError(f"unknown GPU {name!r}{variant} (choose from {', '.join(GPUS)})")


def _memory_named(name: str) -> int | None:
    """The memory a GPU's name states, in GB ("H100 80GB", "rtx 3080 20g", "V100 16"), if any: a number of
    up to three digits on its own, not part of a model number (4090) or a memory type (HBM3)."""
    m = re.search(r"(?<![0-9A-Z.])(\d{1,3}) ?(?:GIB|GB|G)?(?![0-9A-Z])", name.upper())
    return int(m.group(1)) if m else None


def gpu_class(device_name: str, variants: bool = False) -> str | None:
    """The GPUS key for a CUDA device name such as 'NVIDIA H100 80GB HBM3' (None if not in the table);
    with `variants`, also the card a variant of other memory or clocks is named after."""
    n = device_name.upper()

    def gb(size: int) -> str:  # a memory size as people type it: 40GB, 40 GB, 40G, or a bare 40
        return rf"(?<![0-9.]){size} ?(?:GIB|GB|G)?(?![0-9A-Z])"

    # Other memory or clocks than the table's card: GH200, NVL, MIG slices, laptop chips, 4090 D, SUPER and
    # Ti models, the 12 GB RTX 3080, the 40 GB A800, the PCIe H800 and V100s.
    if not variants and re.search(rf"GH200|NVL|\bMIG\b|LAPTOP|MOBILE|\d{{4}} ?D\b|\d{{4}} ?S\b|SUPER|\bTI\b|\d{{4}}TI|"
                                  rf"3080.*{gb(12)}|A800.*{gb(40)}|H800.*PCIE|V100.*({gb(16)}|PCIE)", n):
        return None
    rules = [("H200", "h200"), ("H100.*PCIE|PCIE.*H100", "h100-pcie"), ("H100", "h100"), ("H800", "h800"),
             ("H20", "h20"), (f"A100.*{gb(40)}", "a100-40gb"), ("A100", "a100"), ("A800", "a800"), ("L40S", "l40s"),
             ("L4", "l4"), ("A6000", "a6000"), ("5090", "rtx5090"), ("4090", "rtx4090"), ("4080", "rtx4080"),
             ("3090", "rtx3090"), ("3080", "rtx3080"), ("V100", "v100"), ("T4", "t4")]
    # A variant's name may run on from the chip's: 4090D, 4080S; a number may follow the brand: RTX4090D.
    after = "(?![0-9])" if variants else "(?![A-Z0-9])"
    return next((key for chip, key in rules
                 if re.search(rf"(?<![{'0-9' if chip[0].isdigit() else 'A-Z0-9'}])(?:{chip}){after}", n)), None)


# ---------------------------------------------------------------------------------------------
# Model arithmetic


def model_size(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts the memory model needs (cached: plans evaluate many micro-batch sizes)."""
    return dict(_model_size(tuple(cfg.to_dict().items())))


@functools.lru_cache(maxsize=32)
def _model_size(items: tuple[tuple[str, Any], ...]) -> tuple[tuple[str, int], ...]:
    # Built with one block (the blocks are all alike: 100,000 of them took minutes even on meta) and a
    # context of 1, which changes no parameter (its RoPE tables are built even on meta).
    full = ModelConfig(**dict(items))
    cfg = replace(full, n_layers=1, max_seq_len=1)
    try:
        with torch.device("meta"):
            model = Transformer(cfg)
    except RuntimeError as e:  # a weight of more than 2**63 bytes
        if isinstance(e.__cause__, KeyboardInterrupt):  # Ctrl-C or SIGTERM in torch's first imports, wrapped
            raise e.__cause__ from None
        raise TinykError(f"the model is too large to plan (dim {cfg.dim}, hidden {cfg.hidden_dim}, vocab "
                         f"{cfg.vocab_size}): {first_line(e)}") from None
    block = model.model.layers[0]
    per_layer = sum(p.numel() for p in block.parameters())
    non_block = model.num_params() - per_layer
    linear = [m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)]
    block_linear = sum(m.weight.numel() for m in block.modules() if isinstance(m, torch.nn.Linear))
    layers = full.n_layers
    return (
        ("parameters", non_block + layers * per_layer),
        ("linear", sum(linear) + (layers - 1) * block_linear),
        ("per_layer", per_layer),
        ("non_block", non_block),
        ("largest", max(p.numel() for p in model.parameters())),
        # q/k/v and gate/up: concatenated in every forward, so their matmul weight is a new tensor (added
        # up here: torch.cat on the meta device imports torch._dynamo, seconds of start-up).
        ("fused", layers * sum(m.weight.numel() for m in (block.self_attn.q_proj, block.self_attn.k_proj,
                                                          block.self_attn.v_proj, block.mlp.gate_proj,
                                                          block.mlp.up_proj))),
        ("flops_per_token_n", model.matmul_params() + (layers - 1) * per_layer),
    )


def flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token by `training_flops`, as the trainer counts them: plan and the training log
    report the same MFU."""
    return training_flops(cfg, model_size(cfg)["flops_per_token_n"], seq_len)


def flops_formula(cfg: ModelConfig, seq_len: int) -> str:
    n = model_size(cfg)["flops_per_token_n"]
    total = flops_per_token(cfg, seq_len)
    amount = f"{total / 1e9:,.3f} GFLOP" if total >= 1e9 else f"{total / 1e6:.3f} MFLOP"
    return (f"6N + 12*L*d*T = 6 x {n:,} + 12 x {cfg.n_layers} x {cfg.dim} x {seq_len} "
            f"= {amount} per token (forward + backward)")


# ---------------------------------------------------------------------------------------------
# Activations: bytes per token, from what autograd saves


def layer_saved_bytes(cfg: ModelConfig, amp: bool, repeat_kv: bool = False) -> dict[str, int]:
    """Bytes per token one transformer block keeps for backward (eager PyTorch).

    fp32: each RMSNorm keeps its input, the normalised tensor and its output (the input of
    the fused q/k/v and gate/up matmuls); attention keeps RoPE'd q and k, the SDPA output and
    its logsumexp, and v, a view that keeps the whole q/k/v product alive; the SwiGLU MLP keeps
    the gate/up product, silu(gate) and silu(gate) * up. Where SDPA has no grouped-K/V kernel
    (`repeat_kv`, see `model.sdpa_fuses_gqa`) it keeps K and V repeated to every head instead,
    and nothing keeps the product or the RoPE'd k alive.
    Autocast (bf16, or fp16 alike): the residual stream is bf16 too (`model.Transformer.forward`);
    each RMSNorm keeps an fp32 copy of its input and the bf16 normalised tensor, each of the two
    fused matmuls a bf16 cast of its input, and the attention and MLP tensors are bf16.
    """
    d, kv, h, heads = cfg.dim, cfg.n_kv_heads * cfg.head_dim, cfg.hidden_dim, cfg.n_heads
    assert h is not None
    rsqrt, lse = 2 * 4, 4 * heads
    qkvo = 4 * d if repeat_kv and cfg.n_kv_heads != heads else 3 * d + 3 * kv
    if not amp:
        return {"norms": 4 * 6 * d + rsqrt, "attention": 4 * qkvo + lse, "mlp": 4 * 4 * h}
    return {"norms": 4 * 4 * d + rsqrt,
            "attention": 2 * qkvo + lse,
            "mlp": 2 * 4 * h}


def layer_rope_bytes(cfg: ModelConfig, amp: bool) -> int:
    """Bytes per sequence position (not per token: the batch shares them) one block saves for RoPE.

    The tables are fp32 buffers, saved as views in fp32; autocast saves bf16 casts of cos and
    sin for q and for k.
    """
    return 4 * 2 * cfg.head_dim if amp else 0


def head_saved_bytes(cfg: ModelConfig, amp: bool) -> int:
    """Bytes per token saved outside the blocks: final norm, lm_head input, fp32 log-probs."""
    d, v = cfg.dim, cfg.vocab_size
    final_norm = 4 * 2 * d + 4 + (0 if amp else 4 * d)  # as a block's norm; fp32 also keeps its input
    return final_norm + 4 * v


def activation_bytes(amp: bool) -> int:
    """Bytes per element of an activation, the residual stream's too: bf16 (or fp16) under autocast."""
    return 2 if amp else 4


def checkpointed_bytes_per_token(cfg: ModelConfig, amp: bool) -> int:
    """Bytes per token a checkpointed block keeps: its input, a residual stream's row."""
    return activation_bytes(amp) * cfg.dim


# Input ids and targets (int64) on the device during a micro-step.
BATCH_BYTES_PER_TOKEN = 16


@dataclass(frozen=True)
class Setup:
    """What a training step's memory depends on. Defaults are a CUDA run's (src/tinyk/config.py); on
    CPU the trainer runs fp32 (`amp=False`) with unfused AdamW."""

    cfg: ModelConfig
    seq_len: int
    micro_batch: int
    amp: bool = True  # bf16/fp16 autocast over fp32 master weights; False: plain fp32
    checkpointing: bool = False
    parallel: str = "ddp"
    world_size: int = 1
    grad_accum: int = 1
    fused_adamw: bool = True  # CUDA; CPU's for-loop AdamW needs a temporary per parameter
    repeat_kv: bool = False  # attention repeats grouped K/V heads: CUDA in fp32, or before Ampere

    @property
    def fsdp(self) -> bool:
        """The trainer shards only under torchrun with several processes."""
        return self.parallel == "fsdp" and self.world_size > 1


@dataclass
class Memory:
    """Bytes per GPU. `peak` is the step's largest live set, not the sum of the parts."""

    weights: float
    gradients: float
    optimizer: float
    # weights as the matmuls saw them: autocast's bf16 casts, or fp32 q/k/v, gate/up concatenations
    weight_copies: float
    buffers: float  # DDP gradient buckets, or FSDP's unsharded blocks in flight
    activations: float  # everything batch-proportional at the peak phase
    gradients_at_peak: float
    peak: float
    phase: str
    phases: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {k: (round(v) if isinstance(v, float) else
                    {p: round(b) for p, b in v.items()} if isinstance(v, dict) else v)
                for k, v in asdict(self).items()}


def estimate_memory(s: Setup) -> Memory:
    """Peak bytes allocated on one GPU by a steady-state optimizer step (eager mode).

    A step passes through phases with different live sets; the peak is the largest: the start
    of backward (all saved activations plus the loss gradients), its end (all gradients), the
    optimizer step, and with checkpointing the end of the forward and the recomputation of
    the last and of the first block.
    """
    cfg, tokens = s.cfg, s.micro_batch * s.seq_len
    size = model_size(cfg)
    n, d, v = size["parameters"], cfg.dim, cfg.vocab_size
    shard = s.world_size if s.fsdp else 1
    weights, grads, opt = WEIGHT_BYTES * n / shard, GRAD_BYTES * n / shard, ADAMW_BYTES * n / shard
    act = activation_bytes(s.amp)

    layer = sum(layer_saved_bytes(cfg, s.amp, s.repeat_kv).values()) * tokens + layer_rope_bytes(cfg, s.amp) * s.seq_len
    head = head_saved_bytes(cfg, s.amp) * tokens
    batch = BATCH_BYTES_PER_TOKEN * tokens
    # Backward starts with the fp32 gradients of the log-probs and of the logits alive at once.
    loss_grads = 8 * v * tokens
    # Each matmul saves its weight as it ran: under autocast a bf16 copy of every linear weight (the
    # fused q/k/v and gate/up casts, and autocast's cache of the others), in fp32 the concatenated
    # ones. With checkpointing they are dropped, except autocast's cache until the forward leaves it.
    fused, block_fused = size["fused"], size["fused"] // cfg.n_layers
    copies = 2 * size["linear"] if s.amp else 4 * fused
    cached = 2 * (size["linear"] - fused) if s.amp else 0
    block_copies = 2 * size["per_layer"] if s.amp else 4 * block_fused
    head_copy = 2 * v * d if s.amp else 0
    # Backward through a block: the residual stream's gradient, and in the MLP the gradients of
    # the product, of silu(gate) and of up at once.
    block_bwd = act * d * tokens + 3 * act * cfg.hidden_dim * tokens
    # A tied embedding's gradient is the sum of the lookup's and the lm_head's: one more copy.
    # Under FSDP the root's (embedding's) gradient is still unsharded when that sum is formed.
    tied_sum = 4 * v * d if cfg.tie_embeddings else 0
    root_grads = 4 * size["non_block"] if s.fsdp else 0

    if s.fsdp:
        # fully_shard per block, fp32 parameters: the current and the prefetched block are
        # unsharded, one block's full gradient waits for its reduce-scatter, and the root
        # (embeddings, final norm) stays unsharded from forward to backward.
        buffers = 4.0 * (3 * size["per_layer"] + size["non_block"])
    elif s.world_size > 1:
        buffers = 4.0 * n  # DDP's flat gradient buckets, beside the .grad tensors (no gradient_as_bucket_view)
    else:
        buffers = 0.0
    # Gradient accumulation keeps gradients alive through the next forward; FSDP skips the
    # reduce-scatter on those micro-steps and so accumulates them unsharded.
    if s.grad_accum > 1:
        grads_live = 4.0 * n if s.fsdp else grads
    else:
        grads_live = 0.0

    phases: dict[str, tuple[float, float, float]] = {}  # phase -> (activations, gradients, weight copies)
    if not s.checkpointing:
        phases["backward start"] = (cfg.n_layers * layer + head + batch + loss_grads, grads_live, copies)
    else:
        inputs = checkpointed_bytes_per_token(cfg, s.amp) * tokens  # per block: its input, kept for the recomputation
        saved = cfg.n_layers * inputs + head + batch
        phases["forward end"] = (saved + (act + 4) * v * tokens, grads_live, cached)
        phases["backward start"] = (saved + loss_grads, grads_live, head_copy)
        phases["recompute last block"] = (batch + cfg.n_layers * inputs + layer + block_bwd,
                                          max(grads_live, 4 * size["non_block"] / shard), block_copies)
        phases["recompute first block"] = (batch + inputs + layer + block_bwd,
                                           max(grads_live, grads - 4 * size["per_layer"] / shard), block_copies)
    phases["backward end"] = (batch + tied_sum + root_grads, max(grads_live, grads), 0.0)
    phases["optimizer step"] = (batch, grads, 0.0 if s.fused_adamw else 2.0 * 4 * size["largest"])

    static = weights + opt + buffers
    totals = {name: static + sum(parts) for name, parts in phases.items()}
    phase = max(totals, key=totals.__getitem__)
    a, g, c = phases[phase]
    return Memory(weights=weights, gradients=grads, optimizer=opt, weight_copies=float(copies), buffers=buffers,
                  activations=a, gradients_at_peak=g, peak=totals[phase], phase=phase, phases=totals)


def usable_bytes(gpu: GPUSpec) -> float:
    return gpu.memory_gib * GiB * USABLE_FRACTION


def largest_micro_batch(s: Setup, gpu: GPUSpec, per_rank: int,
                        layout: Callable[[int], tuple[int, int]]) -> int:
    """The largest micro-batch the trainer can use (it divides `per_rank`) whose peak fits; 0 if none.

    `layout(micro)` gives (micro, accumulation) as the trainer would, since accumulation changes
    whether gradients are alive during the forward.
    """
    budget = usable_bytes(gpu)
    for m in sorted((m for m in range(1, per_rank + 1) if per_rank % m == 0), reverse=True):
        micro, accum = layout(m)
        if estimate_memory(replace(s, micro_batch=micro, grad_accum=accum)).peak <= budget:
            return micro
    return 0


# ---------------------------------------------------------------------------------------------
# The plan


@dataclass(frozen=True)
class RunSpec:
    """The run being planned: model, batch layout and runtime, as the trainer resolves them."""

    name: str
    cfg: ModelConfig
    seq_len: int
    batch_size: int  # global, in sequences
    micro_batch: int | None
    dtype: str
    parallel: str
    checkpointing: bool
    max_tokens: int | None = None  # the config's budget (max_tokens, max_steps), planned without --tokens
    compiled: bool = False  # torch.compile: about twice an eager run's MFU
    keep_checkpoints: int = 3  # the run directory's disk: this many checkpoints and final/
    keep_best: bool = False  # and best/
    unplanned: dict[str, float] = field(default_factory=dict)  # budgets set that need the data or the pace: epochs


def _disk(parameters: int, keep_checkpoints: int, keep_best: bool) -> dict[str, int]:
    """A run directory's files: each checkpoint holds the fp32 weights and AdamW's two fp32 moments (the
    tokenizer's few hundred KB aside), final/ (and best/) the weights alone. `run_bytes` is what the run
    leaves; `peak_bytes` the most it holds, while a checkpoint is saved beside the ones kept (the oldest
    goes only once the new one is complete) and before final/ exists."""
    checkpoint, final = 12 * parameters, 4 * parameters
    best = final if keep_best else 0
    return {"checkpoint_bytes": checkpoint, "final_bytes": final, "keep_checkpoints": keep_checkpoints,
            "keep_best": keep_best, "run_bytes": keep_checkpoints * checkpoint + final + best,
            "peak_bytes": (keep_checkpoints + 1) * checkpoint + best}


def run_spec(*, preset: str | None, config: str | None, sets: Iterable[str] = (),
             overrides: dict[str, Any] | None = None, tokenizer: str | Path | None = None,
             kind: str = "pretrain") -> RunSpec:
    """Resolves preset/config/--set/flags with the trainer's own rules, so plan sizes the run it would do
    (`kind` "sft": with the config's sft: settings): the model an `init` directory holds, else the preset's
    or the config's; with `tokenizer` (else the config's, else the init model's), the vocabulary is that
    tokenizer's, as training takes it."""
    from .checkpoint import load_config
    from .config import model_config, parse_sets, resolve_config
    from .rundir import resolve_init

    sets = list(sets)
    shaped = "model" in parse_sets(sets)  # a model described by --set, as the trainer reads it
    if not preset and not config and not (overrides or {}).get("init") and not shaped:
        raise TinykError("pass --preset, --config or --init (or the model's shape with --set model.KEY=VALUE)")
    # resolve_config insists on data and output paths; planning reads neither.
    flags = {"data": "-", "out": "-", **{k: v for k, v in (overrides or {}).items() if v is not None}}
    tc = resolve_config(kind, preset=preset, config=config, flags=flags, sets=sets)
    init = resolve_init(tc.init) if tc.init else None
    init_cfg = load_config(init) if init else None
    tokenizer = tokenizer or tc.tokenizer or init  # as training reads them
    if tokenizer is None:
        cfg, vocab = model_config(tc.model, base=init_cfg, base_from=init), None
    else:
        from .checkpoint import check_compatible
        from .tokenizer import check_init_tokenizer, load_tokenizer

        tok = load_tokenizer(tokenizer)
        if init:  # a --tokenizer beside it refused as training refuses it
            check_init_tokenizer(tokenizer, init)
        cfg = model_config(tc.model, tok.vocab_size, base=init_cfg, base_from=init)
        vocab = tok.vocab_size
        check_compatible(cfg, tok)  # a vocab_size below the tokenizer's, refused as training refuses it
    base = tc.model.get("preset")
    seq_len = tc.seq_len or cfg.max_seq_len  # as training takes it
    if seq_len > cfg.max_seq_len:
        raise TinykError(f"seq_len {seq_len} exceeds the model's context of {cfg.max_seq_len} tokens")
    budgets = [b for b in (tc.max_tokens, tc.max_steps and tc.max_steps * tc.batch_size * seq_len) if b]
    # The model's name says what it is: a preset only while config and --set leave its shape alone.
    named = base if base in PRESETS else None
    same = False
    if named:  # the preset's shape, with the tokenizer's vocabulary where one was given
        reference = preset_config(named)
        same = _shape(cfg) == _shape(replace(reference, vocab_size=vocab) if vocab else reference)
    source = config or preset or init or "--set"
    name = named if same else f"{init} (--init)" if init and not tc.model else f"custom ({source})"
    return RunSpec(name=name, cfg=cfg, seq_len=seq_len, batch_size=tc.batch_size,
                   micro_batch=tc.micro_batch, dtype=tc.dtype, parallel=tc.parallel,
                   checkpointing=tc.activation_checkpointing, max_tokens=min(budgets) if budgets else None,
                   compiled=tc.compile, keep_checkpoints=tc.keep_checkpoints, keep_best=tc.keep_best,
                   unplanned={k: v for k in ("epochs", "max_minutes") if (v := getattr(tc, k))})


def make_plan(run: RunSpec, gpu: GPUSpec, *, gpus: int = 1, nodes: int = 1, tokens: float | None = None,
              price: float | None = None, mfu: float | None = None) -> dict[str, Any]:
    """Everything `tinyk plan` prints, as JSON-able data. `tokens` defaults to the run's own budget
    (max_tokens, or max_steps in tokens), else DEFAULT_TOKENS, the seed's corpus."""
    from .train import micro_layout

    unplanned = run.unplanned if tokens is None else {}  # --tokens: the user knows what the run will take
    if tokens is None:
        tokens = run.max_tokens or DEFAULT_TOKENS

    dtype = run.dtype if run.dtype != "auto" else "bf16" if gpu.bf16 else "fp16"
    _check_plan_args(run, gpu, dtype, gpus=gpus, nodes=nodes, tokens=tokens, price=price, mfu=mfu)
    price = None if price is None else price + 0.0  # -0.0 (--price=-0) printed a cost of -0.00
    world = gpus * nodes
    per_rank = run.batch_size // world
    cfg = run.cfg
    size = model_size(cfg)
    fpt = flops_per_token(cfg, run.seq_len)

    def layout(m: int | None) -> tuple[int, int]:
        return micro_layout(run.batch_size, world, m)

    base = Setup(cfg, run.seq_len, 1, amp=run.dtype != "fp32", checkpointing=run.checkpointing,
                 parallel=run.parallel, world_size=world,
                 repeat_kv=not sdpa_fuses_gqa("cuda", DTYPES[dtype], has_flash=gpu.bf16))
    fits = {ck: largest_micro_batch(replace(base, checkpointing=ck), gpu, per_rank, layout) for ck in (False, True)}
    # FSDP as the fit warning would suggest it: in bf16, or fp32 without it, where fp16 is refused with it.
    fsdp_dtype = dtype if dtype != "fp16" else "bf16" if gpu.bf16 else "fp32"
    fsdp = replace(base, parallel="fsdp", amp=fsdp_dtype != "fp32",
                   repeat_kv=not sdpa_fuses_gqa("cuda", DTYPES[fsdp_dtype], has_flash=gpu.bf16))
    fsdp_fits = largest_micro_batch(fsdp, gpu, per_rank, layout) if world > 1 and run.parallel != "fsdp" else 0
    micro, accum = layout(run.micro_batch or fits[run.checkpointing] or 1)
    setup = replace(base, micro_batch=micro, grad_accum=accum)
    mem = estimate_memory(setup)
    other = estimate_memory(replace(setup, checkpointing=not run.checkpointing))

    used_mfu, mfu_source = _planned_mfu(run, gpu, mfu)
    # The table's MFU is a figure for the measured micro-batch; --mfu and fp32's assumption are taken as they are.
    scaled = mfu is None and dtype != "fp32"
    share = micro_step_share(micro * run.seq_len, run.compiled) if scaled else 1.0
    used_mfu *= share
    # Recomputing the forward adds a third to the compute while MFU counts model FLOPs only: the table's
    # figures were measured without it. An --mfu is taken as training logs it (`tinyk pretrain`, `tinyk sft`),
    # lowered by it already.
    recompute = 0.75 if run.checkpointing else 1.0
    efficiency = 1.0 if mfu is not None else recompute

    def pace(m: float, efficiency: float = efficiency) -> tuple[float, float, float]:
        """tokens/s per GPU, wall seconds and GPU-hours at MFU `m`."""
        per_gpu = m * gpu.peak_flops * efficiency / fpt
        wall_s = tokens / (per_gpu * world)
        return per_gpu, wall_s, wall_s / 3600 * world

    per_gpu, wall_s, gpu_hours = pace(used_mfu)
    with_compile = None
    if not run.compiled and mfu is None and dtype != "fp32":  # fp32's assumed MFU has no compiled figure
        compiled_mfu, compiled_source = gpu.mfu_for(compiled=True)
        compiled_share = micro_step_share(micro * run.seq_len, True)
        compiled_mfu *= compiled_share
        _, c_wall_s, c_gpu_hours = pace(compiled_mfu, recompute)
        with_compile = {"mfu": compiled_mfu, "mfu_source": compiled_source, "micro_step_share": compiled_share,
                        "wall_h": c_wall_s / 3600,
                        "gpu_hours": c_gpu_hours, "cost": None if price is None else c_gpu_hours * price}
    plan: dict[str, Any] = {
        "model": {"name": run.name, "parameters": size["parameters"], "config": cfg.to_dict()},
        "flops_per_token": fpt,
        "flops_formula": flops_formula(cfg, run.seq_len),
        "gpu": {"key": gpu.key, "name": gpu.name, "count": world, "gpus_per_node": gpus, "nodes": nodes,
                "peak_tflops": gpu.peak_flops / 1e12, "tensor_dtype": "bf16" if gpu.bf16 else "fp16",
                "memory_gib": gpu.memory_gib, "usable_gib": usable_bytes(gpu) / GiB},
        "run": {"seq_len": run.seq_len, "batch_size": run.batch_size, "micro_batch": micro,
                "micro_batch_requested": run.micro_batch,
                "grad_accum": accum, "dtype": dtype, "parallel": run.parallel if world > 1 else "none",
                "parallel_requested": run.parallel, "compile": run.compiled,
                "activation_checkpointing": run.checkpointing, "tokens": int(tokens),
                # training stops at the first of its budgets; these need the data's size or the run's pace
                "unplanned": unplanned},
        "memory": mem.to_json(),
        "memory_other_checkpointing": other.to_json(),
        "fits": mem.peak <= usable_bytes(gpu),
        "largest_micro_batch": {"no_checkpointing": fits[False], "checkpointing": fits[True],
                                "fsdp": fsdp_fits, "fsdp_dtype": fsdp_dtype},
        "throughput": {"mfu": used_mfu, "mfu_source": mfu_source,
                       # which of the table's figures: none for --mfu's, or fp32's assumption
                       "mfu_mode": None if mfu is not None or dtype == "fp32" else
                       "compiled" if run.compiled else "eager",
                       # of the table's figure, for this micro-step's tokens (MICRO_STEP_SHARE)
                       "micro_step_share": share, "micro_step_tokens": micro * run.seq_len,
                       # the share of the steps' compute that is the model's: below 1 with recomputation
                       "efficiency": efficiency,
                       "tokens_per_s_per_gpu": per_gpu, "tokens_per_s": per_gpu * world,
                       # with --mfu the user has said what they expect
                       "small_model": size["parameters"] < SMALL_MODEL and mfu is None},
        "time": {"wall_s": wall_s, "wall_h": wall_s / 3600, "gpu_hours": gpu_hours},
        "cost": None if price is None else {"price_per_gpu_hour": price, "total": gpu_hours * price},
        "with_compile": with_compile,  # an eager run's plan: what --compile would give
        "comms": _comms(setup, size, per_rank * run.seq_len / per_gpu, nodes) if world > 1 else None,
        "disk": _disk(size["parameters"], run.keep_checkpoints, run.keep_best),
    }
    amp = setup.amp
    plan["activation_model"] = {
        "layer_bytes_per_token": layer_saved_bytes(cfg, amp, setup.repeat_kv),
        "checkpointed_layer_bytes_per_token": checkpointed_bytes_per_token(cfg, amp),
        "head_bytes_per_token": head_saved_bytes(cfg, amp),
        "loss_gradient_bytes_per_token": 8 * cfg.vocab_size,
    }
    if run.cfg == ModelConfig(**PRESETS[TUTORIAL_RUN["preset"]]):
        a100 = GPUS[TUTORIAL_RUN["gpu"]]
        a100_mfu, a100_source = a100.mfu_for(run.compiled)
        a100_efficiency = recompute
        if run.dtype != "fp32":  # the same micro-batch fits an A100 80GB (--mfu is the planned GPU's, not its)
            a100_mfu *= micro_step_share(micro * run.seq_len, run.compiled)
        if gpu.key == a100.key:
            a100_mfu, a100_source, a100_efficiency = used_mfu, mfu_source, efficiency
        elif run.dtype == "fp32":  # the same precision on the tutorial's cards
            a100_mfu, a100_source = a100.fp32_mfu, ASSUMED
        tutorial_hours = TUTORIAL_RUN["gpus"] * TUTORIAL_RUN["hours"]
        plan["tutorial"] = {
            "gpu_hours": tutorial_hours, "gpus": TUTORIAL_RUN["gpus"], "hours": TUTORIAL_RUN["hours"],
            "tokens": TUTORIAL_RUN["tokens"],
            # At the tutorial's pace, for this plan's tokens: what the comparison is made against.
            "gpu_hours_for_tokens": tutorial_hours * tokens / TUTORIAL_RUN["tokens"],
            "a100_mfu": a100_mfu, "a100_mfu_source": a100_source,
            "a100_hours": tokens * fpt / (a100_mfu * a100_efficiency * a100.peak_flops) / 3600,
        }
    return plan


LINK_BYTES_PER_S = 25e9  # a 200 Gb/s InfiniBand link, or PCIe 4.0 x16; NVLink inside a node is many times faster


def _comms(s: Setup, size: dict[str, int], compute_s: float, nodes: int) -> dict[str, Any]:
    """What each GPU sends (and receives) per optimizer step, which the time above leaves out: a ring
    all-reduce of the fp32 gradients (DDP, once per step: `no_sync` holds it back during accumulation),
    or (FSDP) each micro-step's all-gathers of the fp32 weights (every one in the forward, the blocks'
    again in the backward: the root is not resharded after the forward) and one reduce-scatter of the
    gradients per step."""
    share = (s.world_size - 1) / s.world_size
    n, root = size["parameters"], size["non_block"]
    elements = s.grad_accum * (2 * n - root) + n if s.fsdp else 2 * n
    moved = GRAD_BYTES * share * elements
    return {"bytes_per_step": moved, "compute_s_per_step": compute_s, "link_bytes_per_s": LINK_BYTES_PER_S,
            "seconds_at_link": moved / LINK_BYTES_PER_S, "gpus": s.world_size, "nodes": nodes}


def _check_plan_args(run: RunSpec, gpu: GPUSpec, dtype: str, *, gpus: int, nodes: int, tokens: float,
                     price: float | None, mfu: float | None) -> None:
    """Refuses what `tinyk plan` cannot plan, with the trainer's own refusals among them (`dtype` is
    the run's, with auto resolved for `gpu`)."""
    if gpus < 1 or nodes < 1:
        raise TinykError("--gpus and --nodes must be at least 1")
    world = gpus * nodes
    if tokens <= 0:
        raise TinykError("--tokens must be positive")
    if mfu is not None and not 0.001 <= mfu <= 1:  # below 0.1%, times and costs run to hundreds of digits
        raise TinykError("--mfu is a fraction between 0.001 and 1 (e.g. 0.45)")
    if price is not None and price < 0:
        raise TinykError("--price must not be negative")
    if run.batch_size % world:
        raise TinykError(f"batch size {run.batch_size} is not divisible by {world} GPUs (set --batch-size)")
    refusal = precision_refusal(dtype, run.parallel == "fsdp" and world > 1, gpu.name, gpu.bf16, "plan with")
    if refusal:
        raise TinykError(refusal)


def precision_refusal(dtype: str, fsdp: bool, gpu_name: str, has_bf16: bool, verb: str = "use") -> str | None:
    """Why training cannot run in `dtype` (bf16, fp16, fp32) on this GPU, or None: worded once for the
    trainer ("use ...") and for plan ("plan with ...")."""
    if dtype == "bf16" and not has_bf16:
        return (f"{gpu_name} has no bf16 tensor cores (PyTorch would emulate bf16, many times slower): {verb} "
                f"--dtype fp16, which auto picks there")
    if dtype == "fp16" and fsdp:
        return "fp16 with --parallel fsdp is not supported: " + (
            f"{verb} --dtype bf16, or DDP" if has_bf16 else f"{verb} DDP, or --dtype fp32 ({gpu_name} has no bf16)")
    return None


SMALL_MODEL = 20_000_000  # parameters: below this (tiny, nano) a GPU's MFU is a small fraction of the table's


def micro_step_share(tokens: int, compiled: bool) -> float:
    """The share of the table's MFU (micro-batch 64 at seq 512) a micro-step of `tokens` reaches:
    interpolated in log2(tokens) between bench/gpu.sh's rows, 1 from mb64's up, and below mb16's at the
    eager slope between mb16 and mb32 (unmeasured there), never under MIN_MICRO_STEP_SHARE. Compiled keeps
    there the lead over eager measured at mb16: its own flatter slope made --compile ten times faster
    than eager for a tiny model."""
    points = MICRO_STEP_SHARE[compiled]
    if compiled and tokens < points[0][0]:
        return min(points[0][1], micro_step_share(tokens, False) * points[0][1] / MICRO_STEP_SHARE[False][0][1])
    if tokens >= points[-1][0]:
        return 1.0
    below = [p for p in zip(points, points[1:], strict=False) if tokens >= p[0][0]]
    (t0, s0), (t1, s1) = below[-1] if below else (points[0], points[1])
    share = s0 + (s1 - s0) * (math.log2(tokens) - math.log2(t0)) / (math.log2(t1) - math.log2(t0))
    return max(MIN_MICRO_STEP_SHARE, share)


def _planned_mfu(run: RunSpec, gpu: GPUSpec, mfu: float | None) -> tuple[float, str]:
    """The MFU a plan assumes on `gpu`, and where it comes from."""
    if mfu is not None:
        return mfu, "given with --mfu"
    if run.dtype == "fp32":
        return gpu.fp32_mfu, (f"ASSUMED for fp32: {FP32_SHARE:.0%} of this GPU's {gpu.fp32_tflops:g} TFLOP/s fp32 "
                              "peak (bench/gpu.sh's fp32 row reached 61-62% of it on an H100 and an H200); use "
                              "--dtype auto for real runs")
    used, source = gpu.mfu_for(run.compiled)
    if source != ASSUMED and _shape(run.cfg) != _shape(preset_config(MEASURED_MODEL)):
        source += f"; for {MEASURED_MODEL}, not this model: other sizes reach other MFUs (smaller ones less)"
    return used, source


_LABEL = 36


def _shape(cfg: ModelConfig) -> tuple[int | bool, ...]:
    return cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.hidden_dim, cfg.vocab_size, cfg.tie_embeddings


def _ratio(tutorial_hours: float, plan_hours: float) -> str:
    """'3.3x fewer' or, when the plan takes longer than the tutorial, '1.5x more'."""
    if plan_hours <= tutorial_hours:
        return f"{tutorial_hours / plan_hours:.1f}x fewer"
    return f"{plan_hours / tutorial_hours:.1f}x more"


def _amount(x: float) -> str:
    """Hours as 9.2 or 1,234.5, and small ones with two significant digits (0.021) instead of 0.0."""
    return f"{x:,.1f}" if x >= 0.95 else f"{x:.2g}"


def _duration(hours: float) -> str:
    """Seconds, minutes or hours, with days or years beside long runs' hours (wall time is what a user waits)."""
    if hours * 60 < 1:
        return f"{hours * 3600:.2g} s"
    if hours < 1:
        return f"{hours * 60:.2g} min"
    if hours < 48:
        return f"{_amount(hours)} h"
    days = hours / 24
    return f"{_amount(hours)} h ({days:,.1f} days)" if days < 730 else f"{_amount(hours)} h ({days / 365:,.0f} years)"


def _token_count(n: float) -> str:
    """500M, 10B, 1.5T; beyond a thousand T, 2e+15."""
    if n >= 1e15:
        return f"{n:.3g}"
    return next((f"{n / unit:.4g}{suffix}" for unit, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K"))
                 if n >= unit), f"{n:g}")


def _tokens(n: float) -> str:
    """'10B tokens', '1 token'."""
    return f"{_token_count(n)} {'token' if n == 1 else 'tokens'}"


def _size(b: float, unit: str = "GiB") -> str:
    return f"{b / (GiB if unit == 'GiB' else MiB):.2f} {unit}"


def _row(label: str, b: float, extra: str = "", unit: str = "GiB") -> str:
    return f"  {label:<{_LABEL}}{_size(b, unit):>11}{extra}"


def _pct(x: float) -> str:
    return f"{x:.0%}" if x >= 0.1 else f"{x:.1%}"


def _mfu_text(t: dict[str, Any]) -> str:
    """The MFU, whether it is a compiled or an eager run's, and where it comes from."""
    mfu, source, share = t["mfu"], t["mfu_source"], t["micro_step_share"]
    mode = t["mfu_mode"]
    if mode is None:
        return f"{_pct(mfu)} ({source})"
    smallest = MICRO_STEP_SHARE[mode == "compiled"][0][0]
    how = "as bench/gpu.sh measured the drop" if t["micro_step_tokens"] >= smallest else \
        f"extrapolated below the smallest bench/gpu.sh measured, {smallest:,}"
    small = (f"; x{share:.2f} for {t['micro_step_tokens']:,} tokens per micro-step, below micro-batch 64's 32,768, "
             f"{how}" if share < 1 else "")
    if source != ASSUMED:
        return f"{_pct(mfu)} {mode} ({source}{small})"
    derived = (f"{EAGER_SHARE:.0%} of the compiled {_pct(mfu / share / EAGER_SHARE)}, the eager share measured on "
               f"H100 and H200; " if mode == "eager" else "")
    return (f"{_pct(mfu)} {mode} (ASSUMED: {derived}not yet measured by bench/gpu.sh on this GPU class{small}; "
            f"override with --mfu)")


def _memory_lines(p: dict[str, Any]) -> list[str]:
    """The plan's memory table: each part of the peak, and what it is made of."""
    g, r, mem, am, c = p["gpu"], p["run"], p["memory"], p["activation_model"], p["model"]["config"]
    ck = r["activation_checkpointing"]
    # A small model's parts in GiB would read 0.00-0.09 (its whole fp32 weights, not a GPU's shard of them).
    unit = "GiB" if WEIGHT_BYTES * p["model"]["parameters"] >= GiB / 10 else "MiB"

    def row(label: str, b: float, extra: str = "") -> str:
        return _row(label, b, extra, unit)

    grads = ""
    if not mem["gradients_at_peak"]:
        grads = "   none alive at the peak"
    elif mem["gradients_at_peak"] < mem["gradients"]:
        grads = f"   {_size(mem['gradients_at_peak'], unit)} of them alive at the peak"
    elif mem["gradients_at_peak"] > mem["gradients"]:  # FSDP accumulates unsharded between micro-steps
        grads = f"   {_size(mem['gradients_at_peak'], unit)} at the peak: accumulated unsharded between micro-steps"
    lines = [
        f"memory per GPU, eager mode, micro-batch {r['micro_batch']} (torch.compile needs less):",
        row("weights (fp32)", mem["weights"]),
        row("gradients (fp32)", mem["gradients"], grads),
        row("optimizer state (AdamW m, v fp32)", mem["optimizer"]),
    ]
    if mem["weight_copies"]:
        what = ("fp32 fused q/k/v and gate/up weights" if r["dtype"] == "fp32"
                else f"{r['dtype']} weight copies (autocast)")
        lines.append(row(what, mem["weight_copies"], "   freed after the forward" if ck else ""))
    if mem["buffers"]:
        lines.append(row("FSDP unsharded blocks in flight" if r["parallel"] == "fsdp" else "DDP gradient buckets",
                         mem["buffers"]))
    layer_kib = sum(am["layer_bytes_per_token"].values()) / 1024
    if ck:
        detail = f"{c['n_layers']} block inputs x {am['checkpointed_layer_bytes_per_token'] / 1024:.1f} KiB/token"
        if mem["phase"].startswith("recompute"):
            detail += f", one block recomputed at {layer_kib:.1f} KiB/token"
    else:
        detail = f"{plural(c['n_layers'], 'layers')} x {layer_kib:.1f} KiB/token saved for backward"
    fits = p["largest_micro_batch"]
    return [
        *lines,
        row(f"activations at {mem['phase']}", mem["activations"], f"   {detail}, "
            f"head {am['head_bytes_per_token'] / 1024:.1f} KiB/token"
            + (f", loss gradients {am['loss_gradient_bytes_per_token'] / 1024:.1f} KiB/token"
               if mem["phase"] == "backward start" else "")),
        row("peak", mem["peak"], f"   of {g['usable_gib']:.1f} GiB usable ({USABLE_FRACTION:.0%}): "
            f"{'fits' if p['fits'] else 'DOES NOT FIT'}"),
        row(f"peak with checkpointing {'off' if ck else 'on'}", p["memory_other_checkpointing"]["peak"]),
        f"largest micro-batch that fits: {fits['no_checkpointing'] or 'none'} without activation checkpointing, "
        f"{fits['checkpointing']} with it (among divisors of the {r['batch_size'] // g['count']} sequences per GPU)"
        if fits["checkpointing"] else "no micro-batch fits, not even 1 with activation checkpointing",
    ]


def _fit_warning(p: dict[str, Any]) -> str:
    """What to change when the planned peak does not fit."""
    r, fits = p["run"], p["largest_micro_batch"]
    ck = r["activation_checkpointing"]
    fixes = []
    largest = fits["checkpointing" if ck else "no_checkpointing"]
    if largest:
        fixes.append(f"--micro-batch {largest}")
    if not ck and fits["checkpointing"]:  # only if checkpointing makes it fit, with the micro-batch it needs
        smaller = f" --micro-batch {fits['checkpointing']}" if fits["checkpointing"] < r["micro_batch"] else ""
        fixes.append(f"--activation-checkpointing{smaller}")
    # FSDP in fp16 is refused (precision_refusal): in bf16 where the card has it, else fp32.
    fsdp = "--parallel fsdp" + (f" --dtype {fits['fsdp_dtype']}" if fits["fsdp_dtype"] != r["dtype"] else "")
    if fits["fsdp"] > largest:  # only where it fits more (0: nothing fits), with the micro-batch it needs
        fixes.append(fsdp + (f" --micro-batch {fits['fsdp']}" if fits["fsdp"] < r["micro_batch"] else ""))
    return ("warning      the peak exceeds the usable memory" +
            (f"; try {' or '.join(fixes)}" if fixes else f"; use more GPUs with {fsdp}"))


def format_plan(p: dict[str, Any]) -> str:
    """The human-readable plan."""
    from .train import micro_note

    m, g, r = p["model"], p["gpu"], p["run"]
    c = m["config"]
    ck = r["activation_checkpointing"]
    note = micro_note(r["batch_size"], g["count"], r["micro_batch_requested"], r["micro_batch"], per="GPU")
    per_gpu = r["batch_size"] // g["count"]
    if note:
        note += ", as the trainer would"
    elif r["micro_batch_requested"] is None and r["micro_batch"] < per_gpu:
        # The trainer has no memory model: left unset, its micro-batch is the whole batch per process.
        note = (f"micro_batch is not set, so the trainer would run all {per_gpu} sequences per GPU at once, which "
                f"does not fit; this plan is for --micro-batch {r['micro_batch']}" +
                (": pass that to the trainer" if p["fits"] else ", which does not fit either"))
    notes = [note] if note else []
    if r["parallel_requested"] == "fsdp" and g["count"] == 1:
        notes.append("with one GPU FSDP is not used: the trainer runs one process with the whole model")
    if unplanned := r["unplanned"]:
        needs = {"epochs": "the data's size", "max_minutes": "the run's real pace"}
        said = " and ".join(f"{k}={v:g}" for k, v in unplanned.items())
        notes.append(f"{said} {'is' if len(unplanned) == 1 else 'are'} not planned (depending on "
                     f"{' and '.join(needs[k] for k in unplanned)}): this plan is for {_tokens(r['tokens'])}, "
                     f"which --tokens sets; the run stops at whichever of its budgets ends first")
    precision = "fp32" if r["dtype"] == "fp32" else f"{r['dtype']} autocast"
    parallel = {"none": "one process", "ddp": "DDP", "fsdp": "FSDP"}[r["parallel"]]
    lines = [
        f"model        {m['name']}: {m['parameters']:,} parameters (dim {c['dim']}, {plural(c['n_layers'], 'layers')}, "
        f"{c['n_heads']} heads / {c['n_kv_heads']} KV, hidden {c['hidden_dim']}, vocab {c['vocab_size']})",
        f"FLOPs/token  {p['flops_formula']}",
        f"hardware     {g['count']} x {g['name']} ({g['nodes']} node{'s' * (g['nodes'] > 1)} x {g['gpus_per_node']} "
        f"GPU{'s' * (g['gpus_per_node'] > 1)}): {g['peak_tflops']:g} TFLOP/s dense {g['tensor_dtype']}, "
        f"{g['memory_gib']:g} GiB each",
        f"run          seq {r['seq_len']}; global batch {r['batch_size']} sequences = micro-batch {r['micro_batch']} "
        f"x {r['grad_accum']} accumulation x {g['count']} GPU{'s' * (g['count'] > 1)}; {precision} with fp32 "
        f"master weights; {parallel}; activation checkpointing {'on' if ck else 'off'}",
        *(f"note         {n}" for n in notes),
        "",
        *_memory_lines(p),
        "",
    ]
    t, tm, wc = p["throughput"], p["time"], p["with_compile"]
    lines += [
        f"throughput   MFU {_mfu_text(t)}"
        + (f"; x{t['efficiency']:g} for recomputation" if t["efficiency"] < 1 else ""),
        *([f"             a model of {m['parameters'] / 1e6:.2g}M parameters is far below that MFU: its kernels are "
           f"too short to keep a GPU busy, so expect many times less (--mfu sets it)"] if t["small_model"] else []),
        f"             {t['tokens_per_s_per_gpu']:,.0f} tokens/s per GPU, {t['tokens_per_s']:,.0f} in total",
        f"time         {_tokens(r['tokens'])} in {_duration(tm['wall_h'])} = {_amount(tm['gpu_hours'])} "
        f"GPU-hours",
    ]
    if wc:
        share = f", x{wc['micro_step_share']:.2f} for this micro-step" if wc["micro_step_share"] < 1 else ""
        lines.append(f"             with --compile: MFU {_pct(wc['mfu'])} "
                     f"({'assumed' if wc['mfu_source'] == ASSUMED else 'measured'}{share}), "
                     f"{_duration(wc['wall_h'])} = "
                     f"{_amount(wc['gpu_hours'])} GPU-hours"
                     + ("" if wc["cost"] is None else f", cost {wc['cost']:,.2f}"))
    if cm := p["comms"]:
        how = "all-gathers and a reduce-scatter" if r["parallel"] == "fsdp" else "the gradients all-reduced"
        lines.append(f"comms        not in the time above: each GPU moves {cm['bytes_per_step'] / GiB:,.2f} GiB per "
                     f"optimizer step ({how}) against {cm['compute_s_per_step'] * 1000:,.0f} ms of compute; at "
                     f"{cm['link_bytes_per_s'] / 1e9:g} GB/s "
                     + ("(a 200 Gb/s InfiniBand link between nodes)" if cm["nodes"] > 1 else
                        "(PCIe 4.0's, the worst case in a node: NVLink, where the GPUs have it, is many times faster)")
                     + f" that is {cm['seconds_at_link'] * 1000:,.0f} ms, which overlaps the backward only in part")
    if p["cost"]:
        lines.append(f"cost         {p['cost']['total']:,.2f} ({tm['gpu_hours']:,.2f} GPU-hours at "
                     f"{p['cost']['price_per_gpu_hour']:g} per GPU-hour)")
    dk = p["disk"]
    lines.append(f"disk         {bytes_text(dk['checkpoint_bytes'])} a checkpoint (fp32 weights and AdamW's two "
                 f"moments, 12 bytes a parameter); the run directory up to {bytes_text(dk['peak_bytes'])} while "
                 f"a checkpoint is saved beside those kept, {bytes_text(dk['run_bytes'])} at the end "
                 f"({plural(dk['keep_checkpoints'], 'checkpoints')} kept, and final/"
                 f"{' and best/' if dk['keep_best'] else ''})")
    if "tutorial" in p:
        tut = p["tutorial"]
        base = tut["gpu_hours_for_tokens"]
        line = f"tutorial     {tut['gpus']} x A100 for {tut['hours']:g} h = {tut['gpu_hours']:g} A100-hours"
        if base != tut["gpu_hours"]:
            line += (f" for its {_tokens(tut['tokens'])}, {_amount(base)} A100-hours at that pace for "
                     f"{_tokens(p['run']['tokens'])}")
        mode = f", {t['mfu_mode']}" if t["mfu_mode"] else ""
        line += (f"; this plan{mode}: {_amount(tm['gpu_hours'])} {g['key'].upper()}-hours "
                 f"({_ratio(base, tm['gpu_hours'])})")
        if wc:
            line += f", with --compile {_amount(wc['gpu_hours'])} ({_ratio(base, wc['gpu_hours'])})"
        if g["key"] != "a100":
            a100_mode = "" if r["dtype"] == "fp32" else " compiled" if r["compile"] else " eager"
            line += (f"; on A100 at MFU {_pct(tut['a100_mfu'])}{a100_mode}"
                     f"{' (assumed)' if tut['a100_mfu_source'] == ASSUMED else ''}"
                     f": {_amount(tut['a100_hours'])} A100-hours ({_ratio(base, tut['a100_hours'])})")
        lines.append(line)
    if not p["fits"]:
        lines.append(_fit_warning(p))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Measurement (CPU): the check that keeps the memory model honest


def _allocations(fn: Callable[[], None]) -> list[tuple[int, int, int, bool]]:
    """(time, size, address, whether a collective's backend made it) of each allocation (a free:
    negative size) while `fn` runs (CPU allocator), in order, a free before an allocation at the same
    instant (it may free the address the allocation gets)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events: list[tuple[int, int, int, bool]] = []
    stack = [(node, False) for node in prof.profiler.kineto_results.experimental_event_tree()]
    while stack:
        node, in_backend = stack.pop()
        if node.tag == _EventType.Allocation:
            f = node.extra_fields
            events.append((node.start_time_ns, f.alloc_size, f.ptr, in_backend))
        in_backend = in_backend or node.name.startswith("c10d::")
        stack.extend((child, in_backend) for child in node.children)
    if not events:
        raise RuntimeError("the profiler recorded no allocations")
    return sorted(events, key=lambda e: (e[0], e[1] > 0))


class _Allocated:
    """Bytes the step's own code allocates, replayed from the profiler's events across calls.

    What a collective's backend allocates inside the collective is left out: gloo works on CPU copies
    (its reduce-scatter holds a whole block's gradient, some of it on its own threads, for as long as
    its timing makes it), while NCCL writes into the tensors it is given and keeps its buffers outside
    PyTorch's allocator. With them, an FSDP step's peak varied by a fifth from run to run."""

    def __init__(self) -> None:
        self._backend: set[int] = set()  # addresses the backend holds

    def replay(self, fn: Callable[[], None]) -> tuple[int, int]:
        """(peak, end): the most bytes allocated above the start while `fn` runs, and what it left."""
        now = peak = 0
        for _, size, ptr, in_backend in _allocations(fn):
            if size > 0 and in_backend:
                self._backend.add(ptr)
            elif size < 0 and ptr in self._backend:
                self._backend.discard(ptr)
            else:
                if size > 0:  # an address handed out again was freed, seen or not (between two calls)
                    self._backend.discard(ptr)
                now += size
                peak = max(peak, now)
        return peak, now


def _storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    seen = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(seen.values())


def measure_step_memory(s: Setup, *, seed: int = 0) -> dict[str, int]:
    """Runs one steady-state optimizer step of `s` on CPU; returns in bytes what is kept between steps
    (`static`: weights, optimizer state, a job's wrapping), the step's own peak above it (`step_peak`) and their
    sum (`peak`), which is what `estimate_memory` plans.

    The step is the trainer's (`optimizer_step` around `LossSum`, AdamW from `make_optimizer`);
    each micro-batch is made as it is used, as the trainer moves one at a time to the device. The
    optimizer state exists before the measured step, as in every step after the first. A step of a job
    of several processes (DDP or FSDP over gloo, under torchrun) is measured in each of them, wrapped as
    the trainer wraps it, after two steps (DDP rebuilds its gradient buckets in the second); what it
    keeps between steps is then what building and those steps left allocated.
    """
    from .config import TrainConfig
    from .train import make_optimizer, optimizer_step, parallel_step_module

    job = s.world_size > 1
    if job and not (torch.distributed.is_initialized() and torch.distributed.get_world_size() == s.world_size):
        raise ValueError(f"a step of {s.world_size} processes is measured in each of them, under torchrun")
    if job and s.grad_accum != 1:
        raise ValueError("a job's step is measured without gradient accumulation")
    # An earlier model that a collection of its reference cycles (FSDP's hooks make them) frees while
    # profiling would count against this one.
    gc.collect()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    scale = 1.0 / (s.grad_accum * s.micro_batch * s.seq_len)
    autocast = functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16, enabled=s.amp)
    built: dict[str, Any] = {}

    def batch(_: int) -> tuple[torch.Tensor, torch.Tensor]:  # input ids and targets, as the trainer moves them
        x, y = torch.randint(0, s.cfg.vocab_size, (2, s.micro_batch, s.seq_len), generator=gen)
        return x, y

    def step() -> None:
        optimizer_step(built["step_module"], built["opt"], scaler, range(s.grad_accum), scale,
                       grad_clip=TrainConfig().grad_clip, autocast=autocast, to_device=batch)

    def build() -> None:
        model = Transformer(replace(s.cfg, max_seq_len=max(s.cfg.max_seq_len, s.seq_len))).train()
        model.activation_checkpointing = s.checkpointing
        built["step_module"] = parallel_step_module(model, s.parallel if job else "none", torch.device("cpu"))
        built["opt"] = opt = make_optimizer(model, TrainConfig(), torch.device("cpu"))
        built["params"] = list(model.parameters())
        if job:
            step()
            step()
            return
        for p in built["params"]:  # the optimizer's state, without a step's time
            p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)

    allocated = _Allocated()
    if job:
        static = allocated.replay(build)[1]
    else:
        build()
        static = _storage_bytes(built["params"]) + \
            _storage_bytes(t for st in built["opt"].state.values() for t in st.values())
    gc.collect()
    # A job's step now and then holds one more gradient-sized buffer, as its threads' timing goes
    # (+7% seen on a busy CPU): the smaller of two steps is what every step needs.
    peak = min(allocated.replay(step)[0] for _ in range(2 if job else 1))
    return {"static": static, "step_peak": peak, "peak": static + peak}
