"""A LLaMA-2 style decoder, the whole model in one file.

Parameter names and the RoPE layout are Hugging Face Llama's, so a saved tinyk model
is a `LlamaForCausalLM` checkpoint as-is. The KV cache is part of the model, and
decoding through it here is the readable reference: the generation engine (chat, the
server) runs the same arithmetic restated for speed (`engine._Forward`), and the tests
hold the two to the same logits bit for bit.
"""

from __future__ import annotations

import math
import platform
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import TinykError, memory_available, out_of_memory
from .units import is_int, is_number, plural


def cuda_autocast_dtype(device: torch.device) -> torch.dtype:
    """bf16 on cards that compute in it (compute capability 8+: A100, H100, RTX 30xx/40xx), fp16 on
    older ones (V100, T4), where `torch.cuda.is_bf16_supported()` also counts slow emulation."""
    return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
          "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """'auto' is bf16 on CUDA (fp16 on cards without bf16, e.g. V100 and T4) and fp32 on CPU (where
    bf16 matmuls are not reliably faster). Training autocasts to it; generation computes in it."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return cuda_autocast_dtype(device) if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise TinykError(f"unknown dtype {dtype!r} (use auto, {', '.join(DTYPES)})")
    return DTYPES[dtype]


# The x86 flags whose instructions multiply in a half dtype; without them PyTorch emulates it.
HALF_INSTRUCTIONS = {torch.bfloat16: ("avx512_bf16", "amx_bf16"), torch.float16: ("avx512_fp16", "amx_fp16")}


def cpu_emulates(dtype: torch.dtype) -> bool:
    """Whether this is an x86 Linux machine whose /proc/cpuinfo lists none of `dtype`'s instructions: there
    its matmuls are emulated (a 1024 bf16 product took 2.3 s against fp32's 14 ms on a 2-core EPYC, a
    training step 38x fp32's). False elsewhere, and for fp32: unknown is not emulated."""
    if dtype not in HALF_INSTRUCTIONS or platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    flags = cpuinfo("flags")
    return flags is not None and not set(HALF_INSTRUCTIONS[dtype]) & set(flags.split())


def emulated_note(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why a run in `dtype` will crawl here, said before it does: a half dtype asked for on a CPU that
    emulates it (a tiny training run at 143 tokens/s against fp32's 5,496; its MFU, against a matmul
    in the same dtype, still read 93%)."""
    if device.type != "cpu" or not cpu_emulates(dtype):
        return None
    name = short_dtype_name(dtype)
    return (f"this CPU has no {name} instructions ({' or '.join(HALF_INSTRUCTIONS[dtype])}): its {name} matmuls are "
            f"emulated, several to tens of times slower than fp32's (--dtype fp32)")


def cpuinfo(key: str) -> str | None:
    """The first `key` line's value in Linux's /proc/cpuinfo (None elsewhere, or without one)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith(key)), None)


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """'auto' picks CUDA when present; asking for CUDA without one is a user error, not a crash."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise TinykError(f"unknown device {device!r} (use auto, cpu or cuda[:N])") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TinykError(f"--device {device} was asked for but CUDA is not available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= (count := torch.cuda.device_count()):
        raise TinykError(f"--device {device}: this machine has {plural(count, 'CUDA devices')}, numbered from 0")
    if dev.type not in ("cpu", "cuda"):
        raise TinykError(f"unsupported device {device!r} (use auto, cpu or cuda[:N])")
    return dev


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16: how messages and summary.json name a dtype."""
    return str(dtype).removeprefix("torch.")


def short_dtype_name(dtype: torch.dtype) -> str:
    """'bf16' for torch.bfloat16: how --dtype and the configs name a dtype."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]


@dataclass
class ModelConfig:
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 16
    n_kv_heads: int = 8
    vocab_size: int = 6144
    hidden_dim: int | None = None
    multiple_of: int = 64
    norm_eps: float = 1e-5
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    # Linear RoPE scaling (position interpolation): positions are divided by it, so a context extended
    # by a fine-tune reuses the angles the model learnt rather than meeting new ones.
    rope_scaling: float = 1.0
    dropout: float = 0.0
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        sizes = ["dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "max_seq_len"]
        for name in [*sizes, *(["hidden_dim"] if self.hidden_dim is not None else [])]:
            v = getattr(self, name)
            if not is_int(v) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("norm_eps", "rope_theta", "rope_scaling", "dropout"):
            if not is_number(getattr(self, name)):
                raise ValueError(f"{name} must be a number, got {getattr(self, name)!r}")
        # eps 1 or more swamps the activations it normalises; theta under 1 turns the rotations' frequencies
        # from falling to rising (1e-300 overflows them)
        if not (0 < self.norm_eps < 1 and 1 <= self.rope_theta < math.inf and 0 <= self.dropout < 1):
            raise ValueError(f"need 0 < norm_eps < 1, finite rope_theta >= 1 and 0 <= dropout < 1, got "
                             f"{self.norm_eps}, {self.rope_theta}, {self.dropout}")
        if not 1 <= self.rope_scaling < math.inf:  # under 1 would stretch positions the model has learnt
            raise ValueError(f"rope_scaling must be a finite number of at least 1 (1: none), got {self.rope_scaling}")
        if not isinstance(self.tie_embeddings, bool):  # the text "false" would tie them
            raise ValueError(f"tie_embeddings must be true or false, got {self.tie_embeddings!r}")
        if self.hidden_dim is None:
            hidden = int(8 * self.dim / 3)
            self.hidden_dim = self.multiple_of * math.ceil(hidden / self.multiple_of)
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not a multiple of n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:  # each key/value head serves the same number of query heads
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:  # RoPE rotates pairs of channels (transformers refuses such a config too)
            raise ValueError(f"head dimension dim / n_heads = {self.head_dim} must be even")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


PRESETS: dict[str, dict] = {
    # The seed's models (parameter counts are part of the spec).
    "seed-215m": dict(dim=1024, n_layers=18, n_heads=16, n_kv_heads=8, vocab_size=6144, max_seq_len=512),
    "seed-82m": dict(dim=768, n_layers=12, n_heads=16, n_kv_heads=8, vocab_size=6144, max_seq_len=512),
    # CPU presets: `tiny` is the demo's model, `nano` makes a training step take milliseconds.
    "tiny": dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=6144, max_seq_len=256),
    "nano": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, max_seq_len=128, multiple_of=32),
}


def preset_config(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise TinykError(f"unknown preset {name!r} (choose from {', '.join(PRESETS)})")
    return ModelConfig(**{**PRESETS[name], **overrides})


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 as HF Llama does, then cast back.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


# Bytes per parameter that training keeps whatever the autocast dtype: fp32 weights, fp32 gradients
# and AdamW's two fp32 moments.
WEIGHT_BYTES, GRAD_BYTES, ADAMW_BYTES = 4, 4, 8
TRAIN_STATE_BYTES = WEIGHT_BYTES + GRAD_BYTES + ADAMW_BYTES


def training_flops(cfg: ModelConfig, matmul_params: int, seq_len: int) -> int:
    """Training FLOPs per token: 6N for the matrices plus attention scores (PaLM appendix B)."""
    return 6 * matmul_params + 12 * cfg.n_layers * cfg.dim * seq_len


def rope_tables(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos/sin on the CPU, shape (max_seq_len, head_dim), HF's half-rotation layout, row = position."""
    need = cfg.max_seq_len * cfg.head_dim * 16  # the tables and their intermediates, 4 bytes each
    # Asked only for tables of some size: every model built, a checkpoint's export too, comes here.
    free = memory_available() if need > 1 << 26 else None

    def too_large(machine: str) -> TinykError:
        return TinykError(f"a context of {cfg.max_seq_len:,} positions (max_seq_len, max_position_embeddings in "
                          f"config.json) needs about {need / 1e9:,.1f} GB for its RoPE tables alone, more than this "
                          f"machine {machine}")

    # Half of it: a training run holds the tables twice when it writes a model (its export builds them).
    if free is not None and need > free / 2:
        raise too_large(f"can spare ({free / 1e9:,.1f} GB available)")
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, device="cpu", dtype=torch.float32)
                                         / cfg.head_dim))
    inv_freq /= cfg.rope_scaling  # a linear scaling's, as transformers computes it
    try:
        freqs = torch.arange(cfg.max_seq_len, device="cpu", dtype=torch.float32)[:, None] * inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()
    except RuntimeError as e:
        if not out_of_memory(e):
            raise
        # A config.json edited by hand (max_position_embeddings) more often than a real context.
        raise too_large("has") from None


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos/sin: (B, T, D), or (1, T, D) for positions shared by the batch."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class KVCache:
    """Preallocated keys/values for every layer, shared write position across the batch.

    Prompts of different lengths are left-padded; `key_valid` marks which cached slots
    hold real tokens so padding is never attended to.
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device, dtype):
        shape = (cfg.n_layers, batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.key_valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.length = 0
        self.max_len = max_len

    def mask(self, valid: torch.Tensor) -> torch.Tensor:
        """Records the new tokens' validity; returns the (B, 1, T, L) attention mask for them."""
        B, T = valid.shape
        start, end = self.length, self.length + T
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} > {self.max_len}")
        self.key_valid[:, start:end] = valid
        q_pos = torch.arange(start, end, device=valid.device)[:, None]
        k_pos = torch.arange(end, device=valid.device)[None, :]
        causal = k_pos <= q_pos
        m = causal[None] & self.key_valid[:, None, :end]
        # A padded query row would otherwise attend to nothing and produce NaN.
        m = m | ~m.any(-1, keepdim=True)
        return m[:, None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = k.shape[2]
        self.k[layer, :, :, self.length:self.length + T] = k
        self.v[layer, :, :, self.length:self.length + T] = v
        end = self.length + T
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def reorder(self, index: torch.Tensor) -> None:
        """Keeps only the batch rows in `index` (finished sequences are dropped)."""
        self.k = self.k[:, index]
        self.v = self.v[:, index]
        self.key_valid = self.key_valid[index]


def sdpa_fuses_gqa(device_type: str, dtype: torch.dtype, has_flash: bool = True) -> bool:
    """Whether SDPA has a fused kernel for grouped K/V heads (`enable_gqa`) here.

    CPU's kernel and CUDA's flash and cuDNN kernels (bf16/fp16 on compute capability 8+) do;
    CUDA's memory-efficient kernel (fp32, every dtype on a V100 or T4, and any call with a mask,
    which flash does not take) does not, so `enable_gqa` there falls back to the math kernel,
    which stores every attention matrix (measured on an H100, seed-215m fp32 at micro-batch 16:
    20,316 MiB against the plan's 15,915). Repeating the K/V heads keeps the memory-efficient kernel.
    """
    return device_type != "cuda" or (dtype != torch.float32 and has_flash)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
           dropout: float = 0.0, has_flash: bool = True) -> torch.Tensor:
    """Causal attention (or attention under `mask`) of (B, H, T, D) queries over (B, K, S, D) keys
    and values, K dividing H, on a kernel that never stores the attention matrices."""
    gqa = q.size(1) != k.size(1)
    if gqa and not sdpa_fuses_gqa(q.device.type, q.dtype, has_flash and mask is None):
        rep = q.size(1) // k.size(1)
        k, v, gqa = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1), False
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, enable_gqa=gqa)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.n_kv_heads, self.head_dim = layer, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.dropout = cfg.dropout
        self.has_flash = True  # whether this module's GPU has SDPA's flash kernel: see Transformer._apply

    def qkv_weight(self) -> torch.Tensor:
        """q, k and v as one matmul (the weights stay HF's three tensors): alone, the narrow k and v
        products use a GPU poorly (forward+backward 1.8x faster fused on an H100, bench/gpu_profile.py)."""
        return torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])

    def forward(self, x, cos, sin, cache: KVCache | None = None, mask: torch.Tensor | None = None):
        B, T, _ = x.shape
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = F.linear(x, self.qkv_weight()).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        y = attend(q, k, v, mask, self.dropout if self.training else 0.0, self.has_flash)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def gate_up_weight(self) -> torch.Tensor:
        """gate and up as one matmul, for the same reason as `Attention.qkv_weight`."""
        return torch.cat([self.gate_proj.weight, self.up_proj.weight])

    def forward(self, x):
        gate, up = F.linear(x, self.gate_up_weight()).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, cache=None, mask=None):
        x = x + self.drop(self.self_attn(self.input_layernorm(x), cos, sin, cache, mask))
        return x + self.drop(self.mlp(self.post_attention_layernorm(x)))


class _Embedding(nn.Embedding):
    """nn.Embedding that leaves its weights alone on the meta device: torch has no native meta kernel
    for the normal_ that initialises them, and its Python one imports torch._dynamo and sympy, about
    2 s of every command that loads a model."""

    def reset_parameters(self) -> None:
        if self.weight.device.type != "meta":
            super().reset_parameters()


class Backbone(nn.Module):
    """HF's `model.*` namespace: embeddings, layers, final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = _Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.activation_checkpointing = False
        self.init_rope()
        if self.lm_head.weight.device.type == "meta":  # a shape to count or to load weights into
            return
        self.apply(self._init_weights)
        # GPT-2's depth scaling of the projections that write into the residual stream. The seed
        # (after llama2.c) scales w3, which is up_proj, where the MLP's output is w2 (down_proj).
        for name, p in self.named_parameters():
            if name.endswith(("down_proj.weight", "o_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    def init_rope(self) -> None:
        """RoPE tables as constant buffers, so a compiled step reads them instead of recomputing
        sin/cos per element (that was 14% of a seed-215m step on an H100). Built on the CPU even
        inside `torch.device("meta")`, since loading weights never fills non-persistent buffers;
        call again after changing `config.max_seq_len`, `rope_theta` or `rope_scaling`."""
        cos, sin = rope_tables(self.config)
        device = self.lm_head.weight.device
        if device.type != "meta":
            cos, sin = cos.to(device), sin.to(device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def _apply(self, fn: Any, recurse: bool = True) -> Transformer:
        """Moving the model (`.to`, `.cuda`) also settles, outside any compiled code, whether its GPU
        has SDPA's flash kernel (compute capability 8+), which takes grouped K/V heads as they are."""
        super()._apply(fn, recurse)
        device = self.lm_head.weight.device
        has_flash = device.type != "cuda" or torch.cuda.get_device_capability(device)[0] >= 8
        for m in self.modules():
            if isinstance(m, Attention):
                m.has_flash = has_flash
        return self

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor, *, positions: torch.Tensor | None = None, cache: KVCache | None = None,
                valid: torch.Tensor | None = None, last_only: bool = False) -> torch.Tensor:
        """Returns the logits (the trainer's loss is `train.loss_sum`).

        Decoding: pass a `cache`; `valid` (B, T) marks real tokens (False for left padding) and
        `positions` their RoPE positions. `last_only` computes logits for the last position only.
        """
        B, T = idx.shape
        if positions is None:
            start = cache.length if cache is not None else 0
            if start + T > self.rope_cos.shape[0]:
                raise ValueError(f"{start + T} positions exceed the model's context of {self.rope_cos.shape[0]}")
            cos, sin = self.rope_cos[None, start:start + T], self.rope_sin[None, start:start + T]
        else:
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        mask = None
        if cache is not None:
            if valid is None:
                valid = torch.ones(B, T, dtype=torch.bool, device=idx.device)
            mask = cache.mask(valid)
        x = self.drop(self.model.embed_tokens(idx))
        if torch.is_autocast_enabled(x.device.type):
            # Under autocast the residual stream takes the autocast dtype, as in a model cast to bf16
            # (generation here, HF, Megatron): half the bytes for the memory-bound norms and adds, +4%
            # tokens/s for seed-215m on an H200 (bench/gpu.sh). RMSNorm still normalises in fp32.
            x = x.to(torch.get_autocast_dtype(x.device.type))
        for block in self.model.layers:
            if self.activation_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin, cache, mask)
        if cache is not None:
            cache.length += T
        x = self.model.norm(x)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(x)

    def matmul_params(self) -> int:
        """The N of 6N: every parameter but an untied input embedding, which is a lookup, not a matmul
        (the RMSNorm weights, 0.02% of seed-215m, are counted, as the usual non-embedding N counts them)."""
        cfg = self.config
        return self.num_params() - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim)

    def flops_per_token(self, seq_len: int) -> int:
        return training_flops(self.config, self.matmul_params(), seq_len)
