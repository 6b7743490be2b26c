"""A training run's configuration: `TrainConfig`, the YAML/TOML files and `--set` values that fill
it, and the order in which they win (defaults < shipped preset < --config < the saved run config on
--resume < flags < --set). Values are checked here, before anything is loaded, so a typo costs one
line rather than a run.
"""

from __future__ import annotations

import contextlib
import datetime
import difflib
import importlib.resources
import math
import os
import re
import types
import typing
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from .errors import MPS_REFUSED, TinykError, first_line, not_found
from .inputs import as_list
from .model import PRESETS, ModelConfig
from .monitor import check_trackers
from .rundir import config_copy, saved_config
from .units import MAX_BATCH, MAX_SIZE, is_int, is_number, parse_size, size_text

KINDS = ("pretrain", "sft")
LR_SCHEDULES = ("cosine", "wsd")
TRAIN_DTYPES = ("auto", "bf16", "fp16", "fp32")  # with DTYPE_ALIASES, cli.common.DTYPE_CHOICES
# PyTorch's names, as summary.json and the header print them (and generate's --dtype takes them).
DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
PARALLEL = ("ddp", "fsdp")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # replay CUDA graphs: one micro-batch per step


@dataclass
class TrainConfig:
    """Everything a run needs; saved as OUT/config.yaml. `batch_size` is global, in sequences."""

    kind: str = "pretrain"
    data: str | None = None
    tokenizer: str | None = None
    init: str | None = None
    out: str | None = None
    model: dict[str, Any] = field(default_factory=dict)
    seq_len: int | None = None  # None: the model's context (an --init model's own, 512 for the default shape)
    batch_size: int = 64
    micro_batch: int | None = None
    max_steps: int | None = None
    max_tokens: int | None = None
    epochs: float | None = None
    max_minutes: float | None = None
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    lr_schedule: str = "cosine"  # or "wsd": flat at lr until the last decay_fraction of the steps
    decay_fraction: float = 0.2
    warmup_steps: int | None = None
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    dtype: str = "auto"
    device: str = "auto"
    compile: bool = False
    compile_mode: str = "default"
    parallel: str = "ddp"
    activation_checkpointing: bool = False
    seed: int = 0
    eval_every: int = 500
    eval_batches: int | None = 50
    save_every: int = 1000
    keep_checkpoints: int = 3
    keep_best: bool = False  # also keep the model of the lowest val loss, in OUT/best
    sample_prompts: list[str] = field(default_factory=list)  # continued (SFT: answered) at each evaluation
    sample_tokens: int = 32
    log_every: int = 10
    tracker: list[str] = field(default_factory=list)
    project: str = "tinyk"
    run_name: str | None = None
    peak_tflops: float | None = None
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_FIELD_TYPES = typing.get_type_hints(TrainConfig)
_MODEL_TYPES = typing.get_type_hints(ModelConfig)


INT_TAG, FLOAT_TAG, STR_TAG = (f"tag:yaml.org,2002:{t}" for t in ("int", "float", "str"))
_YAML11_NUMBER = re.compile(r"[-+]?(0[0-9_]+\Z|[0-9][0-9_]*:)")  # octal 016, base 60 1:00 (and 1:30.5)
TEXT_LISTS = {"sample_prompts"}  # lists of text kept as written (tracker is a comma list)


def _text_key(key: Any) -> bool:
    """A key whose value is text (run_name, project, paths), so `1.10` names a run 1.10, not 1.1."""
    hint = _FIELD_TYPES.get(key) if isinstance(key, str) else None
    return str in (typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,))  # not list[str]


class _ConfigLoader(yaml.SafeLoader):
    """YAML read as a config file means it: a key given twice is refused (the earlier value would be
    dropped without a word), and a text key's value is the text as written (`run_name: 0123` is not
    YAML 1.1's octal 83, `project: 1.10` not 1.1). Nor is a number YAML 1.1's base 60 or octal
    (`batch_size: 1:00` is not 60, `016` is 16). Aliases are refused: a few hundred bytes
    of nested ones (a run's config.yaml from someone else) expand to more than memory holds when checked."""

    def resolve(self, kind: type, value: Any, implicit: tuple[bool, bool]) -> str:
        tag = super().resolve(kind, value, implicit)
        if tag in (INT_TAG, FLOAT_TAG) and _YAML11_NUMBER.match(value):
            return STR_TAG  # checked as the key's type wants: "016" is 16, "1:00" no number
        return tag

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "found an alias (*name): a config file spells each value "
                                              "out", self.peek_event().start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, value_node in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, str):
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"{key!r} is given twice",
                                                            key_node.start_mark)
                seen.add(key)
            if (_text_key(key) and isinstance(value_node, yaml.ScalarNode)
                    and value_node.tag != "tag:yaml.org,2002:null"):
                value_node.tag = STR_TAG
        return super().construct_mapping(node, deep=deep)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Checks a config value against its annotation; YAML/TOML/--set values arrive loosely typed."""
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value == "null" and type(None) in args and str not in args:  # TOML has no null: a config says "null"
        value = None
    if value is None:
        if type(None) in args:
            return None
        raise TinykError(f"config key {key} cannot be null")
    if key.rpartition(".")[2] == "max_tokens" and (isinstance(value, str) or is_number(value)):
        try:  # as --max-tokens takes it (10B, 2e9), and within its bounds
            return parse_size(str(value), lo=1, tokens=True)
        except ValueError as e:
            raise TinykError(f"config key {key}: {e}") from None
    if isinstance(value, str) and any(t in (int, float) for t in args):
        with contextlib.suppress(ValueError):  # YAML 1.1 reads 3e-4 (no dot) as a string
            value = float(value)
    # Past it a float overflows; and 1e30 for an integer key is a whole number all the same.
    whole = isinstance(value, float) and int in args and math.isfinite(value) and value == int(value)
    if (is_int(value) or whole) and abs(value) > MAX_SIZE:
        digits = len(str(abs(int(value))))
        shown = value if whole or digits <= 24 else f"a number of {digits:,} digits"
        raise TinykError(f"config key {key}: {shown} is too large (the limit is {size_text(MAX_SIZE)})")
    if isinstance(value, os.PathLike):  # a library caller's Path, for a path key
        value = os.fspath(value)
    for t in args:
        origin = typing.get_origin(t) or t
        if origin is bool and isinstance(value, bool):
            return value
        if origin is int and is_number(value) and (isinstance(value, int) or math.isfinite(value)
                                                   and value == int(value)):
            return int(value)
        if origin is float and is_number(value):
            return float(value)
        if origin is str and isinstance(value, str):
            return value
        if origin is str and (is_number(value) or isinstance(value, datetime.date)):
            # YAML reads `run_name: 2024` as a number, `run_name: 2024-06-01` as a date
            return value.isoformat() if isinstance(value, datetime.date) else str(value)
        text_list = key.rpartition(".")[2] in TEXT_LISTS  # a key of an sft: section, too
        if origin is list and not text_list and isinstance(value, list | str):  # a comma list, as --tracker
            items = value.split(",") if isinstance(value, str) else value
            return [str(v).strip() for v in items if str(v).strip()]
        if origin is list and text_list and isinstance(value, list | str):  # text kept as written
            items = [value] if isinstance(value, str) else value
            if all(isinstance(v, str) for v in items):
                return list(items)
        if origin is dict and isinstance(value, dict):
            return value
    names = " or ".join("null" if t is type(None) else getattr(typing.get_origin(t) or t, "__name__", str(t))
                        for t in args)
    raise TinykError(f"config key {key}: {value!r} is not a valid {names}")


def _did_you_mean(key: Any, known: Iterable[str], prefix: str = "") -> str:
    """'; did you mean warmup_steps?' for a mistyped config key, else ''."""
    close = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.8)
    return f"; did you mean {prefix}{close[0]}?" if close else ""


def _check_model_section(section: Any) -> dict[str, Any]:
    if not isinstance(section, dict):
        raise TinykError(f"config key model must be a mapping, got {section!r}")
    out = {}
    for k, v in section.items():
        if k == "preset":
            v = None if v == "null" else v  # TOML has no null: a config says "null"
            if v is not None and (not isinstance(v, str) or v not in PRESETS):
                raise TinykError(f"unknown model preset {v!r} (choose from {', '.join(PRESETS)})")
            out[k] = v
        elif k in _MODEL_TYPES:
            out[k] = _coerce(f"model.{k}", v, _MODEL_TYPES[k])
        else:
            raise TinykError(f"unknown config key model.{k}{_did_you_mean(k, ['preset', *_MODEL_TYPES], 'model.')} "
                             f"(model keys: preset, {', '.join(_MODEL_TYPES)})")
    return out


def _merge(base: dict[str, Any], layer: dict[str, Any], kind: str, where: str) -> dict[str, Any]:
    """Applies one config layer; a layer's `pretrain:`/`sft:` block applies only to that stage. The other
    stage's block is checked all the same: a typo there shows when pretraining starts, not after it."""
    layer = dict(layer)
    stage_blocks = {k: layer.pop(k) for k in KINDS if k in layer}
    out = dict(base)
    for stage, d in (("", layer), *stage_blocks.items()):
        if d is None:
            continue
        if not isinstance(d, dict):
            raise TinykError(f"{where}: the {stage} block must be a mapping")
        into = out if stage in ("", kind) else dict(out)
        block = f" in its {stage} block" if stage else ""
        for k, v in d.items():
            if k == "kind":  # config.yaml records it; the command (pretrain or sft) decides it
                continue
            try:
                if k == "model":
                    into["model"] = {**into.get("model", {}), **_check_model_section(v)}
                elif k in _FIELD_TYPES:
                    into[k] = _coerce(f"{stage}.{k}" if stage else k, v, _FIELD_TYPES[k])
                elif k in _MODEL_TYPES or k == "preset":  # `--set dim=64` for `--set model.dim=64`
                    raise TinykError(f"unknown config key {k!r}{block}; the model's is model.{k}")
                else:
                    raise TinykError(f"unknown config key {k!r}{block}"
                                     f"{_did_you_mean(k, _FIELD_TYPES) or _did_you_mean(k, _MODEL_TYPES, 'model.')}")
            except TinykError as e:  # which layer: a preset, --config, a run's saved config.yaml, or --set
                raise TinykError(f"{where}: {e}") from None
    return out


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML or TOML config file as a dict (validated when merged)."""
    p = Path(path)
    if p.is_dir():
        raise TinykError(f"config file {p} is a directory; give a .yaml, .yml or .toml file")
    if not p.is_file():
        raise not_found(p, "config file")
    if p.suffix not in (".yaml", ".yml", ".toml"):
        raise TinykError(f"config file must be .yaml, .yml or .toml: {p}")
    try:
        if p.suffix == ".toml":
            try:
                import tomllib
            except ImportError as e:
                raise TinykError("TOML configs need Python 3.11 or newer; use YAML") from e
            d = tomllib.loads(p.read_text(encoding="utf-8-sig"))
        else:
            d = yaml.load(p.read_text(encoding="utf-8"), Loader=_ConfigLoader) or {}
    except yaml.MarkedYAMLError as e:  # its first line ("while parsing a flow node") says neither what nor where
        mark = e.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise TinykError(f"cannot parse {p}: {e.problem or e.context}{where}") from e
    except (yaml.YAMLError, ValueError, UnicodeDecodeError) as e:  # tomllib.TOMLDecodeError is a ValueError
        raise TinykError(f"cannot parse {p}: {first_line(e)}") from e
    if d == {}:
        raise TinykError(f"{p} is empty (it holds no config keys)")
    if not isinstance(d, dict):
        raise TinykError(f"{p} must hold a mapping of config keys")
    return d


def shipped_config(name: str) -> dict[str, Any]:
    """The config shipped for a model preset (src/tinyk/configs/NAME.yaml)."""
    names = sorted(f.name[:-5] for f in importlib.resources.files("tinyk").joinpath("configs").iterdir()
                   if f.name.endswith(".yaml"))
    if name not in names:  # listed as `tinyk model init` and --help list them
        shown = [n for n in PRESETS if n in names] + [n for n in names if n not in PRESETS]
        raise TinykError(f"unknown preset {name!r} (choose from {', '.join(shown)})")
    text = importlib.resources.files("tinyk").joinpath("configs", f"{name}.yaml").read_text(encoding="utf-8")
    return yaml.load(text, Loader=_ConfigLoader)


def parse_sets(items: Iterable[str] | str) -> dict[str, Any]:
    """`--set key=value` pairs as a nested dict; values are parsed as YAML scalars (1e-3, true, [a, b])."""
    out: dict[str, Any] = {}
    for item in as_list(items):
        key, eq, raw = item.partition("=")
        if not eq or not key.strip():
            raise TinykError(f"--set expects key=value, got {item!r}")
        try:
            value = yaml.load(raw, Loader=_ConfigLoader) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        parts = key.strip().split(".")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] not in ("model", *KINDS)):
            raise TinykError(f"--set {key}: only model.<key>, pretrain.<key> and sft.<key> are nested "
                             f"(e.g. --set model.dim=64)")
        if parts[-1] == "kind":
            raise TinykError(f"--set {key}: the command says what is trained (tinyk pretrain or tinyk sft)")
        text = raw.strip()
        if parts[0] != "model" and text not in ("", "null", "~") and text[:1] not in ("'", '"', "["):
            # Text as written: --set run_name=1.10 names the run 1.10 (not 1.1, a date or True), and a # in
            # it is no YAML comment; a sample prompt given alone is a list of one.
            if _text_key(parts[-1]):
                value = text
            elif parts[-1] in TEXT_LISTS:
                value = [text]
        target = out
        for p in parts[:-1]:
            target = target.setdefault(p, {})
            if not isinstance(target, dict):  # `--set model=tiny --set model.dim=64`
                raise TinykError(f"--set {key}: an earlier --set made {p} {target!r}, not a mapping of keys")
        target[parts[-1]] = value
    return out


def resolve_config(kind: str, *, preset: str | None = None, config: str | Path | None = None,
                   flags: dict[str, Any] | None = None, sets: Iterable[str] | str = (), resume: bool = False,
                   notes: list[str] | None = None) -> TrainConfig:
    """Defaults < shipped preset config < --config file < saved run config (--resume) < flags < --set.

    `notes` gets a line for what a user may not expect: --config values the saved run config outranks.
    """
    if kind not in KINDS:
        raise TinykError(f"unknown training kind {kind!r}")
    layers: list[tuple[dict[str, Any], str]] = []
    if preset:
        layers.append((shipped_config(preset), f"preset {preset}"))
    mine = read_config_file(config) if config else None
    if mine and mine.get("kind") not in (None, kind) and notes is not None:  # a run's config.yaml, say
        notes.append(f"note: --config {config} says kind {mine['kind']}, which is not read: the command decides what "
                     f"is trained (tinyk {kind})")
    if config:
        layers.append((mine, str(config)))
    top = [({k: v for k, v in (flags or {}).items() if v is not None}, "command line"),
           (parse_sets(sets), "--set")]

    def fold(stack: list[tuple[dict[str, Any], str]]) -> dict[str, Any]:
        d: dict[str, Any] = {}
        for layer, where in stack:
            d = _merge(d, layer, kind, where)
        return d

    d = fold([*layers, *top])
    # The run directory is known only once the layers are folded; its saved config then slots in below the flags.
    saved = saved_config(Path(d["out"])) if resume and d.get("out") else None
    if saved is not None and saved.is_file():
        try:
            run_config = read_config_file(saved)
        except TinykError as e:  # damaged: a checkpoint's copy puts it back
            raise TinykError(f"{e}{config_copy(Path(d['out']))}") from e
        if run_config.get("kind", kind) != kind:
            run = Path(d["out"])
            other = run_config["kind"]
            raise TinykError(f"{run} is {'an' if other == 'sft' else 'a'} {other} run: resume it with tinyk {other} "
                             f"--resume" + (f", or fine-tune its model in a new run (tinyk sft --init {run})"
                                            if kind == "sft" else ""))
        before, d = d, fold([*layers, (run_config, str(saved)), *top])
        d["out"] = before["out"]  # the run whose config.yaml this is, not the one a moved or copied run recorded
        ignored = [k for k in ("tokenizer", "init") if not _same_path(d.get(k), run_config.get(k))]
        if ignored:  # the checkpoint holds the model and tokenizer; config.yaml must not name others
            d.update({k: run_config.get(k) for k in ignored})
            if notes is not None:
                notes.append(f"note: on --resume the model and tokenizer are the checkpoint's, so "
                             f"{' and '.join('--' + k for k in ignored)} {'is' if len(ignored) == 1 else 'are'} "
                             f"not read (to start from other weights, begin a new run with --init)")
        # The model is the checkpoint's too: a preset named now (--preset, --set model.preset) would only
        # relabel it in config.yaml. Beside --init a preset gives the training settings alone, which a job
        # script may pass on every resume: no note then.
        run_preset = (run_config.get("model") or {}).get("preset")
        named = preset or (parse_sets(sets).get("model") or {}).get("preset")
        if isinstance(d.get("model"), dict):
            d["model"] = {k: v for k, v in {**d["model"], "preset": run_preset}.items() if v is not None}
        if named and named != run_preset and not run_config.get("init") and notes is not None:
            notes.append(f"note: on --resume the model and its settings are the run's, so preset {named} is not "
                         f"read (to train another model, begin a new run)")
        if config and notes is not None:
            given, was = _flat(fold([(mine, str(config))])), _flat(before)
            kept = {k: v for k, v in _flat(d).items() if k in given and not _same_path(given[k], v)
                    and was.get(k) == given[k]
                    and k not in ("out", *ignored)}  # out: the run named; ignored: said above
            fixed = [k for k in ("tokenizer", "init") if k in kept]  # the checkpoint's, whatever says otherwise
            for k in fixed:
                del kept[k]
            if kept:
                notes.append(f"note: on --resume the run's saved {saved} outranks --config {config}, so "
                             + ", ".join(f"{k} stays {v!r} (not {given[k]!r})" for k, v in kept.items())
                             + "; pass a flag or --set to change it")
            if fixed:
                notes.append(f"note: on --resume the model and tokenizer are the checkpoint's, so --config {config}'s "
                             f"{' and '.join(fixed)} {'is' if len(fixed) == 1 else 'are'} not read (to start from "
                             f"other weights, begin a new run with --init)")
    elif saved is not None and d.get("data") is None:
        copy = config_copy(Path(d["out"]))
        if copy:
            raise TinykError(f"run directory {d['out']} has no config.yaml{copy}")
        raise TinykError(f"nothing to resume in {d['out']} (no config.yaml there); check --out, or start a new "
                         f"run without --resume")
    cfg = TrainConfig(**{**d, "kind": kind})
    cfg.dtype = DTYPE_ALIASES.get(cfg.dtype, cfg.dtype)
    validate(cfg)
    return cfg


def _same_path(a: Any, b: Any) -> bool:
    """Whether two config values name the same path (the saved config holds them absolute)."""
    return a == b or (isinstance(a, str) and isinstance(b, str) and Path(a).resolve() == Path(b).resolve())


def _flat(d: dict[str, Any]) -> dict[str, Any]:
    """A folded config with the model's keys as model.KEY, as --set writes them."""
    return {**{k: v for k, v in d.items() if k != "model"}, **{f"model.{k}": v for k, v in d.get("model", {}).items()}}


def validate(cfg: TrainConfig) -> None:
    """Refuses impossible settings with one line before anything is loaded."""
    checks = [
        (cfg.kind in KINDS, f"kind must be {' or '.join(KINDS)}, got {cfg.kind!r}"),
        (cfg.dtype in TRAIN_DTYPES, f"dtype must be {', '.join(TRAIN_DTYPES)}, got {cfg.dtype!r}"),
        (cfg.parallel in PARALLEL, f"parallel must be ddp or fsdp, got {cfg.parallel!r}"),
        (cfg.compile_mode in COMPILE_MODES, f"compile_mode must be one of {', '.join(COMPILE_MODES)}"),
        # Apple's mps is not offered: its tensors have no float64 (the loss accumulators) and it is untested.
        (cfg.device != "mps", f"device {MPS_REFUSED}"),
        (cfg.device in ("auto", "cpu", "cuda"), f"device must be auto, cpu or cuda, got {cfg.device!r}"),
        (cfg.seq_len is None or cfg.seq_len >= 1, "seq_len must be positive"),
        (1 <= cfg.batch_size <= MAX_BATCH, f"batch_size must be in 1..{MAX_BATCH}"),
        (cfg.micro_batch is None or 1 <= cfg.micro_batch <= MAX_BATCH, f"micro_batch must be in 1..{MAX_BATCH}"),
        (all(math.isfinite(v) for v in (cfg.lr, cfg.min_lr_ratio, cfg.decay_fraction, cfg.weight_decay, cfg.beta1,
                                         cfg.beta2, cfg.eps, cfg.grad_clip, cfg.epochs or 1, cfg.max_minutes or 1,
                                         cfg.peak_tflops or 1)),
         "numbers in the config must be finite (no inf or nan)"),
        (cfg.lr > 0, "lr must be positive"),
        # The optimizer holds them as float32 (a larger lr was a traceback from inside AdamW).
        (max(cfg.lr, cfg.weight_decay, cfg.eps, cfg.grad_clip) < torch.finfo(torch.float32).max,
         "lr, weight_decay, eps and grad_clip must fit a float32 (below 3.4e38)"),
        (0 <= cfg.min_lr_ratio <= 1, "min_lr_ratio must be between 0 and 1"),
        (cfg.lr_schedule in LR_SCHEDULES, f"lr_schedule must be cosine or wsd, got {cfg.lr_schedule!r}"),
        (0 < cfg.decay_fraction <= 1, "decay_fraction must be in (0, 1]"),
        (cfg.warmup_steps is None or cfg.warmup_steps >= 0, "warmup_steps must be >= 0"),
        (cfg.weight_decay >= 0, "weight_decay must be >= 0"),
        (0 <= cfg.beta1 < 1 and 0 <= cfg.beta2 < 1, "beta1 and beta2 must be in [0, 1)"),
        (cfg.eps > 0, "eps must be positive"),
        (cfg.grad_clip >= 0, "grad_clip must be >= 0 (0 turns clipping off)"),
        (cfg.eval_batches is None or cfg.eval_batches >= 1,
         "eval_batches must be at least 1 (or null for the whole split)"),
        (cfg.peak_tflops is None or cfg.peak_tflops > 0, "peak_tflops must be positive"),
        (0 <= cfg.seed < 2**32, "seed must be between 0 and 2**32 - 1"),
        (cfg.log_every >= 1, "log_every must be at least 1"),
        (cfg.keep_checkpoints >= 1, "keep_checkpoints must be at least 1"),
        (1 <= cfg.sample_tokens <= 4096, "sample_tokens must be in 1..4096"),
        (all(p.strip() for p in cfg.sample_prompts), "sample_prompts must not hold an empty prompt"),
        (cfg.eval_every >= 0 and cfg.save_every >= 0, "eval_every and save_every must be >= 0 (0 = only at the end)"),
        (all(v is None or v > 0 for v in (cfg.max_steps, cfg.max_tokens, cfg.epochs, cfg.max_minutes)),
         "max_steps, max_tokens, epochs and max_minutes must be positive"),
        # Beyond these the step counts they give overflow (a billion epochs, two thousand years).
        (all(v is None or v <= 1e9 for v in (cfg.epochs, cfg.max_minutes)),
         "epochs and max_minutes must be at most 1e9"),
        (cfg.out is not None, "no run directory: pass --out"),
        (cfg.out != "" and cfg.data != "" and cfg.tokenizer != "" and cfg.init != "",
         "out, data, tokenizer and init must not be empty paths (an empty one is the current folder)"),
        (cfg.data is not None, "no training data: pass --data (a directory made by tinyk data)"),
    ]
    for ok, msg in checks:
        if not ok:
            raise TinykError(msg)
    check_trackers(cfg.tracker)


def dump_config(cfg: TrainConfig) -> str:
    """The YAML of config.yaml. Input paths are saved absolute: a job script that resumes from another
    working directory must find the same data, not another directory of that name or none."""
    d = cfg.to_dict()
    for key in ("data", "tokenizer", "init"):
        if d.get(key):
            d[key] = os.path.abspath(d[key])
    text = yaml.safe_dump(d, sort_keys=False, allow_unicode=True, width=math.inf)  # a long path stays one line
    if yaml.safe_load(text) != d:  # a character YAML writes as it is but reads as a line break (NEL): escaped
        text = yaml.safe_dump(d, sort_keys=False, allow_unicode=False, width=math.inf)
    return text


# Model fields that change parameter shapes, so they cannot differ from an --init model's.
SHAPE_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "multiple_of",
                "tie_embeddings")


def model_config(section: dict[str, Any], vocab_size: int | None = None, base: ModelConfig | None = None,
                 base_from: str | Path | None = None) -> ModelConfig:
    """The model a config's `model:` section names: a preset (or `base`, the config of the model
    directory `base_from`) plus the section's fields, with `vocab_size` from the tokenizer unless the
    section sets one. Shared by the trainer and `tinyk plan`, so a plan sizes exactly the model a run
    would build."""
    section = dict(section)
    preset = section.pop("preset", None)
    if base is not None:
        clash = [k for k in SHAPE_FIELDS if k in section and section[k] != getattr(base, k)]
        if clash:
            raise TinykError(f"model.{clash[0]}={section[clash[0]]} conflicts with {base_from} "
                             f"({clash[0]} {getattr(base, clash[0])}); shapes come from the loaded model")
        fields = {**base.to_dict(), **section}
    elif preset is None and not section:
        raise TinykError("no model: pass --preset, a config with a model section, or --init a model directory")
    elif preset is None and "dim" not in section:  # model.n_layers=2 alone: meant as a change to a preset
        raise TinykError(f"the model section ({', '.join(sorted(section))}) names neither a preset nor a dim: add "
                         f"model.preset ({', '.join(PRESETS)}) to change a preset, or model.dim to describe "
                         f"a model of your own")
    else:
        fields = {**(PRESETS[preset] if preset else {}), **({"vocab_size": vocab_size} if vocab_size else {}),
                  **section}
    try:
        return ModelConfig(**fields)
    except (TypeError, ValueError) as e:
        raise TinykError(f"invalid model config: {e}") from e
