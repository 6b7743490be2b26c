"""`tinyk data pretrain|sft|info`."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from tinyk.cli.common import (
    add_field_arg,
    float_range,
    int_range,
    json_text,
    model_dir,
    path_arg,
    positive_size,
    seed,
    size_range,
    text_field,
    utf8_text,
)
from tinyk.inputs import DEFAULT_MAX_LINE_BYTES
from tinyk.units import MIN_SHARD_TOKENS, plural, size_text

MAX_WORKERS = 1024  # tokenizer processes; more only exhausts the machine
MAX_LEN = 2**20  # SFT tokens per conversation, far past any model's context


def _add_common(p: argparse.ArgumentParser, unit: str) -> None:
    p.add_argument("--input", nargs="+", action="extend", required=True, metavar="FILE", type=path_arg,
                   help="input files (read, never modified)")
    p.add_argument("--tokenizer", required=True, metavar="DIR", type=model_dir,
                   help="tokenizer directory (or a model's, or a training run's: its final/)")
    p.add_argument("--out", type=path_arg, required=True, metavar="DIR", help="output data directory")
    p.add_argument("--val-fraction", type=float_range(0, 1, hi_open=True), default=0.01,
                   help=f"share of {unit} held out for validation (seeded; default 0.01)")
    p.add_argument("--seed", type=seed, default=0, help="seed of the train/val split (default 0)")
    p.add_argument("--workers", type=int_range(1, MAX_WORKERS), default=None,
                   help="tokenizer processes (default: all cores)")
    p.add_argument("--max-line-bytes", type=positive_size, default=DEFAULT_MAX_LINE_BYTES,
                   help="longer lines are skipped (default 16 MiB)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad record instead of skipping it")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="tokenize corpora into packed pretraining or SFT datasets")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    t = dsub.add_parser("pretrain", help="documents (.jsonl/.txt/.parquet, .gz/.zst) -> token shards")
    _add_common(t, "documents")
    add_field_arg(t)
    t.add_argument("--shard-tokens", type=size_range(MIN_SHARD_TOKENS, tokens=True), default="100M",
                   help=f"tokens per shard file, at least {size_text(MIN_SHARD_TOKENS)} (default 100M)")
    t.set_defaults(func=_pretrain)

    s = dsub.add_parser("sft", help="conversations (BelleGroup, ShareGPT, OpenAI messages) -> tokens + loss mask")
    _add_common(s, "conversations")
    s.add_argument("--max-len", type=int_range(8, MAX_LEN), default=512,
                   help="tokens a conversation may have, one more than training's --seq-len (it is shifted by one "
                        "for the targets); longer ones are cut, at a turn if possible (default 512)")
    s.add_argument("--system-prompt", "--system", type=utf8_text, default=None,
                   help="added when a conversation has none (default: the one --tokenizer records, "
                        "你是一个AI助手 unless it is a model fine-tuned with another; '' for none)")
    s.set_defaults(func=_sft)

    i = dsub.add_parser("info", help="summarize a prepared data directory")
    i.add_argument("path", type=path_arg, help="data directory")
    i.add_argument("--json", action="store_true", help="print meta.json")
    i.add_argument("--verify", action="store_true",
                   help="also read every file and compare it with the SHA-256 meta.json recorded (a copied or "
                        "long-stored directory)")
    i.set_defaults(func=_info)


def _common_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"val_fraction": args.val_fraction, "seed": args.seed, "workers": args.workers,
            "max_line_bytes": args.max_line_bytes, "strict": args.strict, "force": args.force,
            "show_progress": True}  # a bar in a terminal, else a line a minute


def _pretrain(args: argparse.Namespace) -> int:
    from tinyk.data import prepare_pretrain

    field = text_field(args.field, args.input)
    meta = prepare_pretrain(args.input, args.tokenizer, args.out, field=field, shard_tokens=args.shard_tokens,
                            **_common_kwargs(args))
    return _report(meta, args.out)


def _sft(args: argparse.Namespace) -> int:
    from tinyk.data import prepare_sft
    from tinyk.tokenizer import prompt_from_flag

    meta = prepare_sft(args.input, args.tokenizer, args.out, max_len=args.max_len,
                       system_prompt=prompt_from_flag(args.system_prompt),
                       **_common_kwargs(args))
    return _report(meta, args.out)


def _report(meta: dict, out: str) -> int:
    from tinyk.data import skip_warning, summary

    print(summary(meta))
    if warning := skip_warning(meta):
        print(f"tinyk: {warning}", file=sys.stderr)
    print(f"saved to {out}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from tinyk.data import summary
    from tinyk.loader import check_files, open_dataset, verify_files

    meta = open_dataset(args.path)
    check_files(args.path, meta)
    verified = verify_files(args.path, meta) if args.verify else None
    if args.json:
        print(json_text(meta, indent=2))
        return 0
    print(summary(meta))
    for i in meta.get("inputs", []):
        print(f"  input {i['path']} ({i['bytes'] / 1e6:,.1f} MB)")
    if meta.get("command"):
        print(f"  made by {meta['command']}")
    if verified is not None:
        print(f"  checksums: all {plural(verified, 'files')} match the SHA-256 meta.json recorded")
    return 0
