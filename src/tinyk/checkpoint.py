"""The model directory: one Hugging Face Llama layout used everywhere in tinyk.

A model directory holds `config.json` (a valid LlamaConfig plus a `tinyk` block),
`model.safetensors`, `generation_config.json` and the tokenizer files, so
`transformers.AutoModelForCausalLM.from_pretrained(dir)` loads it without remote code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import pickle
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .errors import TinykError, first_line, not_found, typo_hint, writing
from .inputs import read_json
from .model import TRAIN_STATE_BYTES, ModelConfig, Transformer, dtype_name
from .outputs import atomic_dir, put_back_interrupted, refuse_unreadable_kind, rust_path
from .tokenizer import (
    IM_END_ID,
    IM_START_ID,
    SPECIAL_IDS,
    TinyTokenizer,
    load_tokenizer,
    write_hf_tokenizer_files,
)
from .units import is_int, is_number

# The tokenizer's bos/eos/pad (documents and turns open with <|im_start|> and close with <|im_end|>).
GENERATION_IDS = {"bos_token_id": IM_START_ID, "eos_token_id": IM_END_ID, "pad_token_id": IM_END_ID}


def generation_config(model_vocab: int, tokenizer_vocab: int) -> dict[str, Any]:
    """generation_config.json: every special token ends a sequence, eos first, so `generate()` in
    transformers stops where tinyk's engine does (a base model that opens the next document, too), and
    greedy decoding there is tinyk's `--temperature 0` (the repetition penalty included, and the rows
    past the tokenizer's ids that an imported model's padded embedding has suppressed, as the engine
    does). Sampling stays off by default: with it on, transformers refuses `temperature=0` and saving
    a greedy config."""
    from .engine import SamplingParams

    padding = {"suppress_tokens": list(range(tokenizer_vocab, model_vocab))} if model_vocab > tokenizer_vocab else {}
    return {**GENERATION_IDS, "eos_token_id": [IM_END_ID, *sorted(SPECIAL_IDS - {IM_END_ID})],
            "repetition_penalty": SamplingParams().repetition_penalty, **padding}


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """config.json contents: LlamaConfig's fields, then tinyk's own under `tinyk`."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": {"rope_type": "linear", "factor": float(cfg.rope_scaling)} if cfg.rope_scaling != 1 else None,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": cfg.dropout,  # the part of tinyk's dropout transformers' Llama has (not residual)
        "tie_word_embeddings": cfg.tie_embeddings,
        **GENERATION_IDS,
        # transformers makes config.json's pad id the embedding's padding_idx, whose row then learns nothing:
        # with <|im_end|> there, fine-tuning in transformers would freeze the end of every turn. Padding is
        # the tokenizer's and generation_config.json's business.
        "pad_token_id": None,
        "initializer_range": 0.02,
        "torch_dtype": "float32",
        "tinyk": cfg.to_dict(),
    }


# ModelConfig fields and the LlamaConfig keys that say the same.
HF_KEYS = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
           "n_kv_heads": "num_key_value_heads", "vocab_size": "vocab_size", "hidden_dim": "intermediate_size",
           "norm_eps": "rms_norm_eps", "max_seq_len": "max_position_embeddings", "rope_theta": "rope_theta",
           "tie_embeddings": "tie_word_embeddings"}


def config_from_hf(d: Any) -> ModelConfig:
    """The model a config.json describes, read as transformers reads it. What tinyk's model cannot
    reproduce (RoPE scaling other than linear, biases, another activation) is refused, never dropped;
    tinyk's own block must agree with the transformers keys, which a tool (`save_pretrained`) may have
    changed alone."""
    if not isinstance(d, dict):
        raise ValueError("it is not a JSON object")
    own = d.get("tinyk")
    if own is not None and not isinstance(own, dict):
        raise ValueError("its 'tinyk' entry is not an object")
    # transformers 5 writes rope_parameters and 4 rope_scaling. 5 reads rope_scaling instead where a file has
    # it (a v4-style scaling added to a v5 file), with its own rope_theta, else the top-level one, which is
    # all 4 reads; a kind tinyk cannot compute is refused in either.
    scaling, params = d.get("rope_scaling"), d.get("rope_parameters")
    ropes = [r for r in (params, scaling) if r]
    if any(not isinstance(r, dict) for r in ropes):
        raise ValueError("its RoPE parameters are not an object")
    kinds = [r.get("rope_type", r.get("type", "default")) for r in ropes]
    scaled = [kind for kind in kinds if kind not in ("default", "linear")]
    unsupported = [
        (d.get("model_type", "llama") != "llama", f"model_type {d.get('model_type')!r}"),
        (bool(scaled), f"RoPE scaling {scaled[0] if scaled else None!r}"),
        (bool(d.get("attention_bias")) or bool(d.get("mlp_bias")), "bias terms"),
        (d.get("hidden_act", "silu") not in ("silu", "swish"), f"activation {d.get('hidden_act')!r}"),  # one function
    ]
    for bad, what in unsupported:
        if bad:
            raise TinykError(f"config.json asks for {what}, which tinyk's LLaMA-2 model does not implement")
    read, top = ropes[-1] if ropes else {}, d.get("rope_theta")
    theta = next((t for t in (read.get("rope_theta"), top) if t is not None), 10000.0)
    if top is not None and top != theta:
        raise TinykError(f"config.json disagrees with itself: rope_theta is {d['rope_theta']} but its RoPE parameters "
                         f"have {theta} (transformers 4 reads one, 5 the other); make them agree")
    if scaling and params and params.get("rope_theta", theta) != theta:
        raise TinykError(f"config.json disagrees with itself: rope_parameters has rope_theta {params['rope_theta']}, "
                         f"but transformers reads rope_scaling instead, with rope_theta {theta}; make them agree")
    factor = read.get("factor") if kinds and kinds[-1] == "linear" else 1.0
    if not (is_number(factor) and 1 <= factor < math.inf):
        raise TinykError(f"config.json's linear RoPE scaling has factor {factor!r}; it is a number of at least 1")
    try:
        cfg = ModelConfig(
            dim=d["hidden_size"], n_layers=d["num_hidden_layers"], n_heads=d["num_attention_heads"],
            n_kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"], vocab_size=d["vocab_size"],
            # Missing keys mean what LlamaConfig means by them, which is how transformers reads the file.
            hidden_dim=d["intermediate_size"], norm_eps=d.get("rms_norm_eps", 1e-6),
            max_seq_len=d.get("max_position_embeddings", 2048),
            rope_theta=theta, rope_scaling=float(factor),
            tie_embeddings=d.get("tie_word_embeddings", False),
        )
    except ValueError as e:  # in the file's own keys: "hidden_size must be ...", not "dim must be ..."
        raise ValueError(re.sub(rf"\b({'|'.join(HF_KEYS)})\b", lambda m: HF_KEYS[m[1]], str(e))) from None
    if d.get("head_dim") not in (None, cfg.head_dim):
        raise TinykError(f"config.json asks for head_dim {d['head_dim']} other than hidden_size / num_attention_heads, "
                         f"which tinyk's LLaMA-2 model does not implement")
    if own is None:
        return cfg
    unknown = sorted(set(own) - {f.name for f in dataclasses.fields(ModelConfig)})
    if unknown:  # a typo in a hand edit would otherwise be dropped, the model built without it
        raise TinykError(f"config.json's tinyk block has an unknown key {unknown[0]!r} (its keys: "
                         f"{', '.join(f.name for f in dataclasses.fields(ModelConfig))})")
    # First: a value the block gets wrong is said as a disagreement.
    for name, key in {**HF_KEYS, "rope_scaling": "the linear RoPE scaling's factor"}.items():
        if own.get(name) is not None and own[name] != getattr(cfg, name):
            raise TinykError(f"config.json disagrees with itself: {key} is {getattr(cfg, name)} but its tinyk block "
                             f"has {name} {own[name]!r}; transformers keeps that block unchanged when it saves a "
                             f"model it changed (resize_token_embeddings): delete the block to use the transformers "
                             f"keys, or make the two agree")
    return ModelConfig.from_dict({**cfg.to_dict(), **own})  # the block adds tinyk's own fields (dropout)


def check_compatible(cfg: ModelConfig, tok: TinyTokenizer) -> None:
    """Refuse a tokenizer whose ids would overflow the embedding (a CUDA index assert otherwise)."""
    if tok.vocab_size > cfg.vocab_size:
        raise TinykError(f"tokenizer {tok.path} has {tok.vocab_size} tokens but the model's vocab_size is "
                         f"{cfg.vocab_size}")  # its special ids were checked by load_tokenizer


def _is_tinyk_model(path: Path) -> bool:
    """A model directory tinyk wrote (its config.json has a `tinyk` block), not any HF model."""
    try:
        config = read_json(path / "config.json")
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and isinstance(config.get("tinyk"), dict)


def is_model_dir(path: str | Path) -> bool:
    p = Path(path)
    return (p / "config.json").is_file() and (p / "model.safetensors").is_file()


def write_model_files(model: Transformer, tok_dir: str | Path, out: Path, system_prompt: str | None,
                      metadata: dict[str, str] | None = None) -> None:
    """Fills an existing directory `out` (normally a temporary one) with a complete model, which
    records the system prompt it was trained with (its chat template puts it first); `metadata` goes
    into model.safetensors' header."""
    cfg = model.config
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt", **(metadata or {})})
    (out / "config.json").write_text(json.dumps(hf_config(cfg), indent=2) + "\n")
    gen = generation_config(cfg.vocab_size, load_tokenizer(tok_dir).vocab_size)
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    # tokenizer.json is the tokenizer (its hash is its identity); the two small files are tinyk's own,
    # written afresh, so a directory that transformers saved back (without special_tokens_map.json)
    # still makes complete models. The context length belongs to the model, so the config records it.
    shutil.copyfile(Path(tok_dir) / "tokenizer.json", out / "tokenizer.json")
    write_hf_tokenizer_files(out, model_max_length=cfg.max_seq_len, system_prompt=system_prompt)


def save_model(model: Transformer, tok_dir: str | Path, out: str | Path, force: bool = False,
               inputs: tuple[str | Path, ...] = ()) -> Path:
    """Writes a model directory atomically: it is complete or absent, and never replaces the tokenizer
    directory or other `inputs`. Its system prompt is the tokenizer directory's (a model directory's own,
    or the default)."""
    system_prompt = load_tokenizer(tok_dir).system_prompt
    with writing(Path(out)), atomic_dir(out, force=force, inputs=[tok_dir, *inputs],
                                        replaces=("a tinyk model directory", _is_tinyk_model)) as tmp:
        write_model_files(model, tok_dir, tmp, system_prompt)
    return Path(out)


def load_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    put_back_interrupted(path)
    if not path.exists():
        raise TinykError(f"{not_found(path, 'model directory')}{unfinished_hint(path)}")
    for name in ("config.json", "model.safetensors"):
        refuse_unreadable_kind(path / name, "a model directory holds it as a file")
    if not is_model_dir(path):
        raise TinykError(f"not a model directory (needs config.json and model.safetensors): {path}"
                         f"{model_dir_hint(path)}")
    try:
        d = read_json(path / "config.json")
        if _is_seed_config(d):
            raise TinykError(f"not a tinyk model directory: {path}{model_dir_hint(path)}")
        return config_from_hf(d)
    except KeyError as e:
        raise TinykError(f"invalid config.json in {path}: it has no {e.args[0]!r}") from e
    except (TypeError, ValueError) as e:
        raise TinykError(f"invalid config.json in {path}: {e}") from e


CKPT_RE = re.compile(r"^step_(\d{7,})$")  # a run's checkpoint folder, checkpoints/step_0001000


def unfinished_hint(path: Path) -> str:
    """For a missing RUN/final: that the run has not finished, and its newest checkpoint's model if any."""
    if path.name != "final" or not (path.parent / "checkpoints").is_dir():
        return ""
    return f" (its run has not finished{model_dir_hint(path.parent / 'checkpoints') or ', nor saved a checkpoint yet'})"


def model_dir_hint(path: Path) -> str:
    """"; " and what a directory that is almost a model directory holds instead, with the way to one."""
    if is_model_dir(path / "final"):
        return f"; a training run's model is in {path / 'final'}"
    if is_model_dir(path / "model"):  # a checkpoint: checkpoints/step_*/model
        return f"; a checkpoint's model is in {path / 'model'}"
    steps = sorted((int(m[1]), p) for p in path.glob("step_*")  # by number: step_10000000 after step_9999999
                   if (m := CKPT_RE.match(p.name)) and is_model_dir(p / "model")) if path.is_dir() else []
    if steps:
        return f"; a run's checkpoints: the newest one's model is in {steps[-1][1] / 'model'}"
    if (path / "checkpoints").is_dir() and (path / "config.yaml").is_file():
        return ("; a training run that has not finished (no final/ yet)"
                + (model_dir_hint(path / "checkpoints") or ", nor saved a checkpoint"))
    if path.is_file() and is_model_dir(path.parent):
        return f"; give the model directory it is in, {path.parent}"
    if path.is_file() and path.suffix in (".pth", ".pt", ".bin", ".safetensors"):
        return f"; it is a weights file: if the tutorial's scripts saved it, {_import_hint(path)}"
    try:
        seed = _is_seed_config(read_json(path / "config.json"))
    except (OSError, ValueError):
        seed = False
    if seed:
        return f"; it holds a model the tutorial's code saved (its Tiny-K config): {_import_hint(path)}"
    pths = sorted(path.glob("*.pth")) if path.is_dir() and not (path / "config.json").exists() else []
    if pths:
        more = f" (and {len(pths) - 1} more .pth)" if len(pths) > 1 else ""
        return f"; it holds {pths[0].name}{more}: if the tutorial's scripts saved it, {_import_hint(pths[0])}"
    if (path / "config.json").is_file() and any((path / f"{name}.index.json").is_file()
                                                for name in ("model.safetensors", "pytorch_model.bin")):
        return ("; its weights are sharded over several files: save them as one, e.g. transformers' "
                "save_pretrained(DIR, max_shard_size='100GB')")
    if (path / "adapter_config.json").is_file():
        return ("; its weights are an adapter (adapter_config.json), not a whole model: merge it into its base "
                "model first, e.g. peft's model.merge_and_unload().save_pretrained(DIR)")
    if (path / "config.json").is_file() and (path / "pytorch_model.bin").is_file():
        return ("; its weights are a pickle (pytorch_model.bin), which tinyk does not load: save them as "
                "safetensors, e.g. transformers' save_pretrained(DIR, safe_serialization=True)")
    return ""


def _is_seed_config(d: Any) -> bool:
    """Whether a parsed config.json is that of a model the tutorial's code saved (its `Tiny-K` class,
    whose keys are dim, n_layers, ... rather than transformers' hidden_size, num_hidden_layers, ...)."""
    return isinstance(d, dict) and (d.get("model_type") == "Tiny-K" or
                                    ("model_type" not in d and {"dim", "n_layers", "n_heads"} <= d.keys()))


def _import_hint(source: Path) -> str:
    return f"`tinyk model import {source} --tokenizer TOKENIZER_DIR --out DIR` converts it"


def _model_from_state(cfg: ModelConfig, state: dict[str, torch.Tensor], source: str, mismatch: str) -> Transformer:
    """The model `cfg` describes holding exactly `state`: every weight there, none left over (loading
    without one would silently compute another function), each of the shape the config needs. All
    checked before the model is built, so a config.json of 10**6 layers or a dim of 10**8 beside a
    small file is refused at once, not after minutes and gigabytes."""
    emb = state.get("model.embed_tokens.weight")
    if emb is None and "embed_tokens.weight" in state:  # LlamaModel(...).save_pretrained: no "model." and no head
        raise TinykError(f"{source} holds a transformers LlamaModel (names without 'model.', no lm_head), not a "
                         f"LlamaForCausalLM: save the model with its language-model head (AutoModelForCausalLM)")
    if emb is None:
        raise TinykError(f"{source} lacks weights: ['model.embed_tokens.weight']")
    if tuple(emb.shape) != (cfg.vocab_size, cfg.dim):  # first: with it, the file's size bounds the model's
        raise TinykError(f"{source} {mismatch}: model.embed_tokens.weight is {tuple(emb.shape)}, the config needs "
                         f"{(cfg.vocab_size, cfg.dim)}")
    with torch.device("meta"):  # every layer is alike: one stands for all
        one = Transformer(dataclasses.replace(cfg, n_layers=1, max_seq_len=1)).state_dict()  # RoPE is not saved
    outer = {k: v.shape for k, v in one.items() if not k.startswith("model.layers.")}
    layer = {k.removeprefix("model.layers.0."): v.shape for k, v in one.items() if k.startswith("model.layers.")}

    def names() -> Iterator[str]:
        yield from outer
        for i in range(cfg.n_layers):
            yield from (f"model.layers.{i}.{k}" for k in layer)

    def shape_of(name: str) -> torch.Size | None:
        m = re.fullmatch(r"model\.layers\.(0|[1-9]\d*)\.(.+)", name)
        if m is None:
            return outer.get(name)
        # the length first: int() of thousands of digits raises, and no such index is a layer
        return layer.get(m[2]) if len(m[1]) <= len(str(cfg.n_layers)) and int(m[1]) < cfg.n_layers else None

    missing = list(itertools.islice((k for k in names() if k not in state), 3))  # within len(state) + 3 names
    if missing:
        raise TinykError(f"{source} lacks weights: {missing}")
    extra = sorted(k for k in state if shape_of(k) is None and not k.endswith("rotary_emb.inv_freq"))  # derived
    if extra:
        raise TinykError(f"{source} holds weights tinyk's model has no place for: {extra[:3]}")
    wrong = next((k for k in names() if state[k].shape != shape_of(k)), None)
    if wrong:
        raise TinykError(f"{source} {mismatch}: {wrong} is {tuple(state[wrong].shape)}, the config needs "
                         f"{tuple(shape_of(wrong))}")
    _check_dtypes({k: state[k] for k in names()}, source)
    damaged = next((k for k in names() if state[k].device.type != "meta" and not _all_finite(state[k])), None)
    if damaged:  # it would score, chat and train as nan, silently
        raise TinykError(f"{source} holds inf or nan weights ({damaged}): a damaged file or a diverged run")
    with torch.device("meta"):
        model = Transformer(cfg)
    return holding(model, state, strict=False)  # checked above; derived buffers (inv_freq) may be extra


def _all_finite(t: torch.Tensor) -> bool:
    """No nan or inf in `t`: its min and max are nan where any element is, inf where one is. 20x faster than
    `isfinite(t).all()`, which made a bool of every weight (0.5 s of loading seed-215m, 4 s on a busy machine)."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(lo.isfinite() and hi.isfinite())


# fp8 is a float too, but one torch cannot check for nan nor compute with on a CPU.
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
LOADS = "tinyk loads float32, float16, bfloat16 or float64 weights"


def _check_dtypes(state: dict[str, torch.Tensor], source: str) -> None:
    """Weights of a dtype tinyk computes with: an integer export (int8), fp8 or a damaged header is
    refused in one line, not loaded as garbage nor failed on with a traceback later."""
    odd = next((k for k, v in state.items() if v.dtype not in WEIGHT_DTYPES), None)
    if odd:
        raise TinykError(f"{source} holds {dtype_name(state[odd].dtype)} weights ({odd}); {LOADS}")


def holding(model: Transformer, state: dict[str, torch.Tensor], strict: bool = True) -> Transformer:
    """`model` (built on the meta device) with `state`'s tensors as its weights, not copies, and its
    head tied again where the config ties it (assigning replaced the shared tensor)."""
    model.load_state_dict(state, strict=strict, assign=True)
    if model.config.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def _cut_zip(path: Path) -> bool:
    """A zip archive (what torch.save writes) whose end, the central directory, is missing."""
    import zipfile

    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PK\x03\x04" and not zipfile.is_zipfile(path)
    except OSError:
        return False


def load_model(path: str | Path, device: str | torch.device = "cpu",
               copy: bool = os.name == "nt") -> tuple[Transformer, TinyTokenizer]:
    """Loads a model directory (weights via safetensors only) and its tokenizer. The weights are the
    file's pages, mapped; `copy` reads them out, so the file may go while the model lives (a training
    run deletes the checkpoint it resumed from once newer ones are kept, which frees no disk space while
    mapped). Windows copies always: there a mapped file stops its folder being replaced, so a model
    served or chatted with would stop the run training it at its next best/ or final/."""
    path = Path(path)
    cfg, tok = config_and_tokenizer(path)
    with _reading_weights(path), rust_path(path / "model.safetensors") as f:
        state = load_file(f)
        if copy:
            state = {k: v.clone() for k, v in state.items()}
    model = _model_from_dir_state(path, cfg, state)
    return model.to(device=device, dtype=torch.float32).eval(), tok


def config_and_tokenizer(path: Path) -> tuple[ModelConfig, TinyTokenizer]:
    """A model directory's config and tokenizer, checked to belong together."""
    cfg, tok = load_config(path), load_tokenizer(path)
    check_compatible(cfg, tok)
    return cfg, tok


# What a loaded model and its tokenizer come from; nothing else in a model directory changes a result.
_MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def same_model(a: Path, b: Path) -> bool:
    """Whether two model directories hold the same model: the same files for config and tokenizer, and the
    same tensors, bit for bit (a run's best/ is often its final/ again: the lowest val loss came last, and
    best/'s header records that step). Unreadable or damaged files count as different (loading says why)."""
    try:
        if any((a / name).read_bytes() != (b / name).read_bytes() for name in _MODEL_FILES):
            return False
        with open(a / "model.safetensors", "rb") as fa, open(b / "model.safetensors", "rb") as fb:
            index = _tensor_index(fa)
            if index is None or index != _tensor_index(fb):  # the same names, shapes, dtypes and offsets
                return False
            while chunk := fa.read(1 << 22):
                if chunk != fb.read(len(chunk)):
                    return False
            return not fb.read(1)
    except (OSError, ValueError):
        return False


def _tensor_index(f: Any) -> dict[str, Any] | None:
    """A safetensors file's header without its free-form metadata, leaving `f` at the tensors' bytes;
    None for a damaged one (a header longer than the file, or not a JSON object)."""
    size = int.from_bytes(f.read(8), "little")
    if size > os.fstat(f.fileno()).st_size - 8:
        return None
    header = json.loads(f.read(size))
    if not isinstance(header, dict):
        return None
    header.pop("__metadata__", None)
    return header


@contextlib.contextmanager
def _reading_weights(path: Path) -> Iterator[None]:
    # Opened here first, so a file this user may not read is called that (safetensors says "no such file").
    with open(path / "model.safetensors", "rb"):
        pass
    try:
        yield
    except Exception as e:  # safetensors raises its own error types for damaged files
        if _is_pickle(path / "model.safetensors"):
            raise TinykError(f"{path}/model.safetensors is a PyTorch pickle (torch.save's format), not safetensors, "
                             f"and tinyk never loads pickles: save it with safetensors (transformers' "
                             f"save_pretrained(DIR, safe_serialization=True)), or if the tutorial's scripts saved "
                             f"it, rename it to model.pth and {_import_hint(path / 'model.pth')}") from e
        raise TinykError(f"{path}/model.safetensors is damaged or truncated ({e})") from e


def _is_pickle(path: Path) -> bool:
    """What torch.save writes (a zip, or a bare pickle of protocol 2 to 5), told apart from safetensors,
    whose first 8 bytes (its header's length) may begin with the same bytes, by the header's `{` after them."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[8:9] == b"{":
        return False
    return head.startswith(b"PK\x03\x04") or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"))


def _model_from_dir_state(path: Path, cfg: ModelConfig, state: dict[str, torch.Tensor]) -> Transformer:
    if cfg.tie_embeddings and "model.embed_tokens.weight" not in state and "lm_head.weight" in state:
        state["model.embed_tokens.weight"] = state["lm_head.weight"]  # as safetensors' save_model keeps a tied pair
    if cfg.tie_embeddings and "model.embed_tokens.weight" in state:
        emb, head = state["model.embed_tokens.weight"], state.get("lm_head.weight")
        if head is not None and "meta" not in (emb.device.type, head.device.type):
            _check_tied_head(path, emb, head)
        state["lm_head.weight"] = emb
    return _model_from_state(cfg, state, f"{path}/model.safetensors", "does not match its config.json")


def _check_tied_head(path: Path, emb: torch.Tensor, head: torch.Tensor) -> None:
    """transformers would use a tied model's own lm_head.weight (untied, with a warning); tinyk would
    drop it: a head unlike the embedding is refused."""
    if not (head.shape == emb.shape and torch.equal(head.to(emb.dtype), emb)):
        raise TinykError(f"{path}/model.safetensors holds an lm_head.weight unlike its embedding, but config.json "
                         f"ties them (tie_word_embeddings: true): set that to false to use this head, or "
                         f"remove the tensor to use the embedding")


def memory_footprint(cfg: ModelConfig, n_params: int) -> dict[str, float]:
    """Bytes of weights in common dtypes and of a full-context KV cache per sequence (MiB)."""
    kv = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * cfg.max_seq_len
    mib = 2 ** 20
    return {"fp32_mib": n_params * 4 / mib, "bf16_mib": n_params * 2 / mib,
            "train_adamw_fp32_mib": n_params * TRAIN_STATE_BYTES / mib,
            "kv_cache_per_seq_bf16_mib": kv * 2 / mib}


def init_model_dir(preset: str, tok_dir: str | Path, out: str | Path, *, seed: int = 0,
                   force: bool = False, **overrides: Any) -> Transformer:
    """A randomly initialised model: shapes from the preset, vocab size from the tokenizer."""
    from .model import preset_config

    tok = load_tokenizer(tok_dir)
    torch.manual_seed(seed)
    model = Transformer(preset_config(preset, vocab_size=tok.vocab_size, **overrides))
    save_model(model, tok_dir, out, force=force)
    return model


# safetensors' dtype names in a file's header and torch's names for them, where this torch has them (F8_E8M0
# came in 2.7, F4 in 2.8); the others (6-bit floats, AMD's fp8) are refused by the header's name.
HEADER_DTYPES = {key: getattr(torch, name) for key, name in {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu", "F4": "float4_e2m1fn_x2", "C64": "complex64",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "U16": "uint16", "U32": "uint32",
    "U64": "uint64", "BOOL": "bool"}.items() if hasattr(torch, name)}


def model_info(path: str | Path) -> dict[str, Any]:
    """What `tinyk model info` shows, after checking the weights file against config.json from its
    header (names, shapes, dtypes and that the file holds all the bytes they need) and a tied head
    against the embedding, without loading the rest: values (inf, nan) are checked when a command
    loads the weights."""
    path = Path(path)
    cfg, _ = config_and_tokenizer(path)  # a directory other commands would refuse is refused here
    with _reading_weights(path), rust_path(path / "model.safetensors") as name, safe_open(name, "pt") as f:
        slices = {k: f.get_slice(k) for k in f.keys()}
        odd = next(((k, s.get_dtype()) for k, s in slices.items() if s.get_dtype() not in HEADER_DTYPES), None)
        if odd is None:
            state = {k: torch.empty(s.get_shape(), device="meta", dtype=HEADER_DTYPES[s.get_dtype()])
                     for k, s in slices.items()}
            pair = ("model.embed_tokens.weight", "lm_head.weight")
            tied = [f.get_tensor(k) for k in pair] if cfg.tie_embeddings and set(pair) <= slices.keys() else None
    if odd is not None:  # what _check_dtypes says of the others, by the header's name (the file is not damaged)
        raise TinykError(f"{path}/model.safetensors holds {odd[1]} weights ({odd[0]}); {LOADS}")
    if tied:
        _check_tied_head(path, *tied)
    n = _model_from_dir_state(path, cfg, state).num_params()
    return {"path": str(path), "parameters": n, "config": cfg.to_dict(), "memory": memory_footprint(cfg, n)}


# The tutorial's parameter names (its k_model.py) and tinyk's, which are transformers', per layer.
SEED_NAMES = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
              "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
              "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj", "feed_forward.w3": "mlp.up_proj",
              "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
# ... and outside the layers.
SEED_TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight",
                  "norm.weight": "model.norm.weight"}


def _rope_halves(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """q or k rows reordered from the tutorial's RoPE, which rotates adjacent channels (0, 1), (2, 3), ...,
    to transformers', which rotates channel i with i + head_dim/2. q and k move alike, so every attention
    score stays the same; without this the model would load and compute something else."""
    rows, dim = w.shape
    return w.reshape(rows // head_dim, head_dim // 2, 2, dim).transpose(1, 2).reshape(rows, dim)


def rope_pairs(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The inverse of `_rope_halves`: q or k rows in the order that rotates adjacent channels, as
    llama.cpp (and the tutorial) do."""
    rows, dim = w.shape
    return w.reshape(rows // head_dim, 2, head_dim // 2, dim).transpose(1, 2).reshape(rows, dim)


def _read_seed_weights(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(weights, config.json or {}) of a tutorial model: a `.pth`/`.bin` its scripts saved, a
    `.safetensors`, or a directory its `PreTrainedModel.save_pretrained` wrote."""
    config: Any = {}
    if path.is_dir():
        try:
            config = read_json(path / "config.json")
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as e:  # a guessed head count would load and compute something else
            raise TinykError(f"cannot read {path / 'config.json'} ({first_line(e)})") from e
        if not isinstance(config, dict) or any(
                k in config and not (type(config[k]) is int and config[k] >= 1) for k in ("n_heads", "max_seq_len")):
            raise TinykError(f"{path / 'config.json'} is not the tutorial's model config (n_heads and max_seq_len "
                             f"must be positive integers)")
        found = [path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()]
        if not found:
            pths = ", ".join(p.name for p in sorted(path.glob("*.pth"))[:3])
            raise TinykError(f"{path} holds neither model.safetensors nor pytorch_model.bin"
                             + (f"; give the file to import ({pths})" if pths else model_dir_hint(path)))
        path = found[0]
    elif not path.is_file():
        raise TinykError(f"checkpoint not found: {path}{typo_hint(path)}")
    if path.suffix != ".safetensors":
        with open(path, "rb") as f:
            head = f.read(4)
        if not head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save's zip, or a legacy pickle
            raise TinykError(f"{path} is not a PyTorch checkpoint (a file torch.save wrote: .pth, .pt or .bin)")
    try:
        with warnings.catch_warnings():  # torch's advice on weights_only is not for tinyk's users
            warnings.simplefilter("ignore")
            if path.suffix == ".safetensors":
                with rust_path(path) as name:
                    state = load_file(name)
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # (`head`: a .pth's first bytes, read above.) A legacy pickle of a protocol the loader reads is damaged.
        if "Unsupported operand" in str(e) and head[:1] == b"\x80" and head[1:2] <= b"\x03":
            raise TinykError(f"cannot read {path}: it is damaged (an opcode no pickle has)") from e
        if "Unsupported operand" in str(e):  # torch's safe loader reads pickle protocols up to 3
            raise TinykError(f"cannot read {path}: it was saved with a newer pickle protocol than torch's safe "
                             f"loader reads; re-save it with torch.save(state_dict, path)") from e
        raise TinykError(f"cannot read {path}: it holds Python objects besides tensors, which tinyk does not "
                         f"unpickle (code could run); save model.state_dict() alone") from e
    except Exception as e:  # zip, safetensors and torch each raise their own
        if _cut_zip(path):  # torch says "[Errno 22] Invalid argument" or "failed finding central directory"
            raise TinykError(f"cannot read {path}: it is cut short or damaged (torch.save's zip archive has no "
                             f"end); copy or save it again") from e
        raise TinykError(f"cannot read {path} as a checkpoint of tensors ({first_line(e)})") from e
    for key in ("model", "state_dict"):  # {"model": state_dict, "optimizer": ...}, as many scripts save
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TinykError(f"{path} is not a state dict (a mapping of parameter names to tensors)")
    return state, config


def _unprefixed(name: str) -> str:
    """A parameter name without the prefixes torch.compile and (Distributed)DataParallel add, in any order."""
    while name.startswith(("_orig_mod.", "module.")):
        name = name.split(".", 1)[1]
    return name


def _rope_theta(table: torch.Tensor) -> float | None:
    """The RoPE base `table` was made with, where it is laid out as the tutorial's cos table (a row per
    position, half a head wide), so that its width tells the head size; else None. Read from its second
    row, position 1, whose angles are theta ** (-i / half): the tutorial's 10000, or a variant's (1e6)."""
    if table.dim() != 2 or table.shape[0] < 2 or table.shape[1] < 2:
        return None
    half, row = table.shape[1], table[1].double()
    theta = float(torch.acos(row[1].clamp(-1, 1)) ** -half) if 0 < row[1] < 1 else math.nan
    if not 1 <= theta < math.inf:
        return None
    theta = float(f"{theta:.3g}")  # the table's float32 rounding, undone: 1e6, not 1000023
    expected = torch.cos(theta ** (-torch.arange(half, dtype=torch.float64) / half))
    return theta if torch.allclose(row, expected, atol=1e-3) else None


def _unheld_hf(path: Path) -> str | None:
    """Why tinyk's model cannot hold the transformers model whose directory (or weights file) is `path`,
    as loading it would say (another architecture, RoPE scaling other than linear, biases); None where it can, or no
    config.json says."""
    config = (path if path.is_dir() else path.parent) / "config.json"
    try:
        config_from_hf(read_json(config))
    except (ValueError, TinykError) as e:  # a config.json read whole that asks for what tinyk's model lacks
        return first_line(e)
    except (OSError, KeyError, TypeError):  # none, or one too incomplete to tell: loading it says so
        pass
    return None


def _recorded_theta(path: Path, config: dict[str, Any], from_tables: float | None) -> float:
    """The RoPE base a tutorial model was made with: its config.json's `rope_theta` (a variant's), its
    RoPE tables', else the tutorial's fixed 10000."""
    said = config.get("rope_theta")
    if said is None:
        return from_tables or 10000.0
    if not is_number(said) or not 1 <= said < math.inf:
        raise TinykError(f"{path / 'config.json'} has rope_theta {said!r}; RoPE's base is a number of at least 1 "
                         f"(the tutorial's is 10000)")
    if from_tables is not None and not math.isclose(said, from_tables, rel_tol=1e-2):
        raise TinykError(f"{path / 'config.json'} says rope_theta {said:g}, but its RoPE tables were made with "
                         f"{from_tables:g}")
    return float(said)


def _seed_names(text: str) -> str:
    """`text` with tinyk's (transformers') tensor names written as the tutorial's model names them."""
    top, layer = ({v: k for k, v in names.items()} for names in (SEED_TOP_NAMES, SEED_NAMES))

    def seed(m: re.Match) -> str:
        if m[1] is None:
            return top[m[0]]
        return f"layers.{m[1]}.{layer[m[2]]}.weight" if m[2] in layer else m[0]

    return re.sub(rf"model\.layers\.(\d+)\.([a-z_.]+?)\.weight|{'|'.join(map(re.escape, top))}", seed, text)


def import_seed_checkpoint(ckpt: str | Path, tok_dir: str | Path, out: str | Path, *, n_heads: int | None = None,
                           max_seq_len: int | None = None, force: bool = False) -> tuple[Transformer, list[str]]:
    """A model directory from a model the tutorial's scripts saved (`pretrain_1024_18_6144.pth`), and
    notes for the user: what had to be assumed, and embeddings the tokenizer never uses (a padded
    vocabulary, or the wrong tokenizer). Shapes come from the tensors. The head count and context
    are in a saved directory's config.json but not in a `.pth`, where they default to what the RoPE
    tables some variants keep imply, else the tutorial's (16 heads, 512 tokens). RMSNorm's eps is the
    config's `norm_eps`, else the tutorial's default 1e-5; RoPE's base a variant's `rope_theta`, or what its
    RoPE tables were made with, else the tutorial's fixed 10000. A config.json that disagrees with the
    weights (7 layers, weights for 2) is refused."""
    path = Path(ckpt)
    state, config, rope, mask = _seed_state(path)
    emb, output = _seed_embeddings(path, state)
    vocab_size, dim = emb.shape
    n_heads, max_seq_len, table_theta, notes = _seed_heads(path, config, dim, rope, mask, n_heads, max_seq_len)
    head_dim = dim // n_heads
    rope_theta = _recorded_theta(path, config, table_theta)
    norm_eps = config.get("norm_eps", 1e-5)
    if not is_number(norm_eps) or not 0 < norm_eps < 1:
        raise TinykError(f"{path / 'config.json'} has norm_eps {norm_eps!r}; RMSNorm's eps is a small positive "
                         f"number (the tutorial's is 1e-5)")
    ours = _seed_renamed(path, state, head_dim, emb, output)
    shape = _seed_shape(path, state, config, dim, head_dim, vocab_size)
    try:
        cfg = ModelConfig(**shape, n_heads=n_heads, max_seq_len=max_seq_len, norm_eps=float(norm_eps),
                          rope_theta=rope_theta, tie_embeddings=torch.equal(output, emb))
    except ValueError as e:
        raise TinykError(f"{path} does not hold the tutorial's model with {n_heads} heads ({first_line(e)})") from e
    try:
        model = _model_from_state(cfg, ours, str(path), f"does not fit {cfg.n_layers} layers of dim {dim} with "
                                                        f"{n_heads} heads (is --n-heads right?)")
    except TinykError as e:  # name the tensors as the user's file names them
        raise TinykError(_seed_names(str(e))) from None
    tok = load_tokenizer(tok_dir)
    check_compatible(cfg, tok)
    if cfg.vocab_size != tok.vocab_size:
        notes.append(f"the model has {cfg.vocab_size} token embeddings and the tokenizer {tok.vocab_size} tokens, "
                     f"so ids from {tok.vocab_size} on are never used: is --tokenizer the one the model was trained "
                     f"with?")
    save_model(model, tok_dir, out, force=force, inputs=(path,))
    return model, notes


def _seed_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], torch.Tensor | None,
                                     torch.Tensor | None]:
    """A tutorial model's weights in float32 under unprefixed names, its config.json (or {}), and the
    RoPE table and causal mask it may keep: derived, not weights, but they tell its shape."""
    state, config = _read_seed_weights(path)
    rope = next((v for k, v in state.items() if k.endswith("freqs_cos")), None)
    mask = next((v for k, v in state.items() if k.endswith("attention.mask")), None)
    state = {_unprefixed(k): v for k, v in state.items()
             if not k.endswith(("attention.mask", "freqs_cos", "freqs_sin"))}
    _check_dtypes(state, str(path))
    state = {k: v.float() for k, v in state.items()}
    if "tok_embeddings.weight" not in state and state.get("output.weight", torch.empty(0)).dim() == 2:
        # The tutorial ties the two; safetensors' save_model keeps one of tensors that share memory.
        state["tok_embeddings.weight"] = state["output.weight"]
    return state, config, rope, mask


def _seed_embeddings(path: Path, state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The token embeddings and output head, taken out of `state`; a transformers checkpoint is sent
    the way it loads."""
    if state.get("tok_embeddings.weight", torch.empty(0)).dim() != 2:
        if "model.embed_tokens.weight" not in state:
            raise TinykError(f"{path} is not a checkpoint of the tutorial's model (it has no tok_embeddings.weight)")
        hint = model_dir_hint(path).removeprefix("; ") if path.is_dir() else ""
        if not hint and (why := _unheld_hf(path)):
            raise TinykError(f"{path} is not a checkpoint of the tutorial's model but a transformers one that tinyk "
                             f"cannot hold: {why}")
        fix = (hint or "use the directory as it is, with a tinyk tokenizer.json beside it") if path.is_dir() else \
            "tinyk reads such a model from the directory transformers' save_pretrained writes, with a tinyk " \
            "tokenizer.json beside it"
        raise TinykError(f"{path} is not a checkpoint of the tutorial's model but a Hugging Face Llama checkpoint; "
                         f"{fix}")
    emb = state.pop("tok_embeddings.weight")
    output = state.pop("output.weight", emb)
    if output.shape != emb.shape:  # not a head count to correct: said before the model is fitted
        raise TinykError(f"{path}: its output.weight is {tuple(output.shape)} but tok_embeddings.weight "
                         f"{tuple(emb.shape)}; the tutorial's model has one row per token in both (a damaged or "
                         f"edited checkpoint)")
    return emb, output


def _seed_heads(path: Path, config: dict[str, Any], dim: int, rope: torch.Tensor | None, mask: torch.Tensor | None,
                n_heads: int | None, max_seq_len: int | None) -> tuple[int, int, float | None, list[str]]:
    """The head count and context (the user's, else config.json's, else what the RoPE tables or the
    causal mask imply, else the tutorial's), the RoPE base the tables were made with (or None), and
    a note naming what was assumed."""
    if n_heads is not None and config.get("n_heads", n_heads) != n_heads:
        raise TinykError(f"--n-heads {n_heads} contradicts the {config['n_heads']} heads {path} was saved with "
                         f"(a model split into other heads computes something else); leave --n-heads out")
    # The causal mask a model without flash attention keeps (1, 1, T, T) tells the context alone.
    guess = {"n_heads": (16, "the tutorial's"), "max_seq_len": (512, "the tutorial's")}
    if mask is not None and mask.dim() == 4 and mask.shape[-1] == mask.shape[-2] > 0:
        guess["max_seq_len"] = (mask.shape[-1], "from its attention mask")
    rope_theta = _rope_theta(rope) if rope is not None and rope.dim() == 2 and rope.shape[1] and \
        dim % (2 * rope.shape[1]) == 0 else None
    if rope is not None and rope_theta is not None:
        guess = {"n_heads": (dim // (2 * rope.shape[1]), "from its RoPE tables"),
                 "max_seq_len": (rope.shape[0], "from its RoPE tables")}
        if n_heads is not None and n_heads != guess["n_heads"][0]:
            raise TinykError(f"--n-heads {n_heads} contradicts the {guess['n_heads'][0]} heads of {path}'s RoPE "
                             f"tables (half a head, {rope.shape[1]} wide, for dim {dim}); leave --n-heads out")
    missing = [k for k, v in (("n_heads", n_heads), ("max_seq_len", max_seq_len)) if not v and k not in config]
    n_heads = n_heads or config.get("n_heads") or guess["n_heads"][0]
    max_seq_len = max_seq_len or config.get("max_seq_len") or guess["max_seq_len"][0]
    phrases = {"n_heads": f"{n_heads} heads", "max_seq_len": f"a context of {max_seq_len} tokens"}
    if len({guess[k][1] for k in missing}) == 1:  # "16 heads and a context of 512 tokens (the tutorial's)"
        guessed = f"{' and '.join(phrases[k] for k in missing)} ({guess[missing[0]][1]})"
    else:
        guessed = " and ".join(f"{phrases[k]} ({guess[k][1]})" for k in missing)
    notes = [f"{guessed} assumed: the checkpoint does not record {'them' if len(missing) > 1 else 'it'} "
             f"(--n-heads / --max-seq-len if yours differ; wrong heads load but compute something else)"
             ] if missing else []
    if not isinstance(n_heads, int) or n_heads < 1 or dim % n_heads or (dim // n_heads) % 2:
        fits = [str(h) for h in range(1, dim + 1) if dim % h == 0 and (dim // h) % 2 == 0]
        typed = "n_heads" not in missing and "n_heads" not in config  # the user's --n-heads
        fix = "" if typed else f"; correct n_heads in {path / 'config.json'}" if "n_heads" in config else \
            "; set --n-heads"
        raise TinykError(f"dim {dim} does not split into {'--n-heads ' if typed else ''}{n_heads} heads of an even "
                         f"size (head counts that do: {', '.join(fits[:8])}{', ...' if len(fits) > 8 else ''}){fix}")
    return n_heads, max_seq_len, rope_theta, notes


def _seed_renamed(path: Path, state: dict[str, torch.Tensor], head_dim: int, emb: torch.Tensor,
                  output: torch.Tensor) -> dict[str, torch.Tensor]:
    """The tutorial's tensors under tinyk's (transformers') names, q and k rotated to its RoPE layout."""
    ours = {SEED_TOP_NAMES["tok_embeddings.weight"]: emb, SEED_TOP_NAMES["output.weight"]: output}
    for key, w in state.items():
        parts = key.removesuffix(".weight").split(".", 2)
        if key == "norm.weight":
            ours[SEED_TOP_NAMES[key]] = w
        elif (len(parts) == 3 and parts[0] == "layers" and parts[1].isdecimal() and str(int(parts[1])) == parts[1]
              and parts[2] in SEED_NAMES):  # nn.ModuleList's numbering: "layers.x" or "layers.01" is another model's
            if parts[2] in ("attention.wq", "attention.wk") and w.dim() == 2 and w.shape[0] % head_dim == 0:
                w = _rope_halves(w, head_dim)  # other shapes are refused when the model is fitted
            ours[f"model.layers.{parts[1]}.{SEED_NAMES[parts[2]]}.weight"] = w
        else:
            raise TinykError(f"{path} holds {key}, which the tutorial's model does not have")
    return ours


def _seed_shape(path: Path, state: dict[str, torch.Tensor], config: dict[str, Any], dim: int, head_dim: int,
                vocab_size: int) -> dict[str, int]:
    """The model's shape as its weights tell it, checked against what its config.json records."""
    if "layers.0.attention.wk.weight" not in state or "layers.0.feed_forward.w1.weight" not in state:
        raise TinykError(f"{path} lacks weights of the tutorial's model (layers.0's wk or w1)")
    for key in ("layers.0.attention.wk.weight", "layers.0.feed_forward.w1.weight"):  # the shapes read below
        if state[key].dim() != 2:
            raise TinykError(f"{path}: {key} is {tuple(state[key].shape)}, where the tutorial's model has a matrix")
    hidden_dim = state["layers.0.feed_forward.w1.weight"].shape[0]
    if hidden_dim == 0:
        raise TinykError(f"{path} has feed-forward layers of width 0 (a k_model.py whose ModelConfig defaults "
                         f"hidden_dim to 0, which its MLP takes as the width): a model without MLPs, which tinyk "
                         f"cannot hold; retrain with hidden_dim=None")
    shape = {"dim": dim, "n_layers": len({k.split(".")[1] for k in state if k.startswith("layers.")}),
             "n_kv_heads": state["layers.0.attention.wk.weight"].shape[0] // head_dim, "vocab_size": vocab_size,
             "hidden_dim": hidden_dim}
    for key, have in shape.items():  # a config.json of another model, or weights missing layers
        recorded = config.get(key)
        if is_int(recorded) and recorded != have:
            raise TinykError(f"{path / 'config.json'} says {key} {recorded}, but the weights beside it have {have}")
    return shape
