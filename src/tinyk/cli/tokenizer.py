"""`tinyk tokenizer train|eval`."""

from __future__ import annotations

import argparse
import sys

from tinyk.cli.common import add_field_arg, int_range, json_text, model_dir, path_arg, positive_size, text_field
from tinyk.inputs import DEFAULT_MAX_LINE_BYTES, Skips, check_inputs
from tinyk.units import bytes_text, format_table, plural


def vocab_size(s: str) -> int:
    """--vocab-size: room for the 256 bytes and the special tokens, at most the library's MAX_VOCAB."""
    from tinyk.tokenizer import MAX_VOCAB, SPECIAL_TOKENS

    return int_range(256 + len(SPECIAL_TOKENS), MAX_VOCAB)(s)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenizer", help="train or evaluate a byte-level BPE tokenizer")
    tsub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)

    t = tsub.add_parser("train", help="train a tokenizer on .jsonl/.txt/.parquet files (streamed)")
    t.add_argument("inputs", nargs="*", metavar="FILE", type=path_arg, help="corpus files")
    t.add_argument("--input", nargs="+", action="extend", default=[], metavar="FILE", type=path_arg,
                   help="corpus files, as `tinyk data` and `tokenizer eval` take them")
    t.add_argument("--out", type=path_arg, required=True, help="output tokenizer directory")
    t.add_argument("--vocab-size", type=vocab_size, default=6144, help="default 6144, the seed's")
    t.add_argument("--normalization", choices=["none", "nfkc"], default="none",
                   help="none keeps full-width punctuation; nfkc reproduces the seed")
    t.add_argument("--max-bytes", type=positive_size, default=None,
                   help="train on this much input, e.g. 500M (default: what the available memory allows, about "
                        "1/100 of it)")
    add_field_arg(t)
    t.add_argument("--max-line-bytes", type=positive_size, default=DEFAULT_MAX_LINE_BYTES,
                   help="longer lines are skipped (default 16 MiB)")
    t.add_argument("--min-frequency", type=int_range(0, 1_000_000_000), default=2,
                   help="a pair of tokens must occur this often to be merged (default 2)")
    t.add_argument("--strict", action="store_true", help="stop at the first malformed line")
    t.add_argument("--force", action="store_true", help="replace an existing output directory")
    t.set_defaults(func=_train)

    e = tsub.add_parser("eval", help="vocab, special ids, round trip and compression")
    e.add_argument("path", nargs="+", type=model_dir,
                   help="tokenizer directory (or a model's, or a training run's, meaning its final/); several are "
                        "compared side by side on the same sample")
    e.add_argument("--input", nargs="+", action="extend", default=None, type=path_arg,
                   help="sample files to measure compression on")
    e.add_argument("--max-bytes", type=positive_size, default=None,
                   help="read at most this much of the input files (default 10M)")
    add_field_arg(e)
    e.add_argument("--json", action="store_true", help="print JSON")
    e.set_defaults(func=_eval)


def _train(args: argparse.Namespace) -> int:
    from tinyk.tokenizer import memory_note, train_tokenizer

    inputs = args.inputs + args.input
    if not inputs:
        args.command_parser.error("give the corpus files (FILE ... or --input FILE ...)")
    check_inputs(inputs)  # a missing file is the one line, not a word on memory before it
    note = memory_note(inputs, args.max_bytes)
    if note:  # said before the minutes of reading, not only after
        print(f"tinyk: {note}", file=sys.stderr)
    field = text_field(args.field, inputs)
    r = train_tokenizer(inputs, args.out, vocab_size=args.vocab_size, normalization=args.normalization,
                        max_bytes=args.max_bytes, field=field, min_frequency=args.min_frequency,
                        force=args.force, strict=args.strict, max_line_bytes=args.max_line_bytes)
    print(f"trained on {plural(r['documents'], 'documents')} ({r['characters']:,} characters) in {r['seconds']}s; "
          f"vocab {r['vocab_size']}; {Skips.from_json(r['skipped']).report()}")
    for warning in r["warnings"]:
        print(f"tinyk: {warning}", file=sys.stderr)
    for note in r["notes"]:
        print(f"note: {note}")
    print(f"saved to {args.out}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from tinyk.tokenizer import eval_tokenizer, round_trips

    field = text_field(args.field, args.input or [])
    if args.max_bytes is not None and not args.input:  # the built-in samples are read whole
        print(f"tinyk: --max-bytes {args.max_bytes:,} is not used without --input", file=sys.stderr)
    cap = {"max_bytes": args.max_bytes} if args.max_bytes else {}  # else the library's default
    results = [eval_tokenizer(path, args.input, field=field, **cap) for path in args.path]
    code = 0 if all(map(round_trips, results)) else 1  # as diff does, whichever way the results are shown
    if args.json:
        print(json_text(results[0] if len(results) == 1 else results, indent=2))
    elif len(results) > 1:
        _compare(results)
    else:
        _show(results[0])
    return code


def _show(r: dict) -> None:
    print(f"vocab size      {r['vocab_size']}")
    print("special ids     " + ", ".join(f"{k}={v}" for k, v in r["special_ids"].items()))
    print(f"bos/eos/pad     {r['bos']} / {r['eos']} / {r['pad']}")
    lossy = r["nfkc"] and not r["roundtrip_ok"]
    verdict = "exact" if r["roundtrip_ok"] else "not exact, by design (NFKC normalisation)" if lossy else "FAILED"
    samples = f"; built-in samples: {r['builtin_failures']} of {r['builtin_samples']} failed" \
        if r["builtin_failures"] else ""
    print(f"round trip      {verdict} ({plural(r['documents'], 'documents')}, "
          f"{plural(r['roundtrip_failures'], 'failures')}{samples})")
    if r["first_failure"]:
        print(f"                first at {r['first_failure']}")
    _input_lines(r)
    print(f"compression     {r['chars_per_token']} chars/token, {r['bytes_per_token']} bytes/token")


def _compare(results: list[dict]) -> None:
    from tinyk.tokenizer import compared_rows

    print(format_table(compared_rows(results), header=("", *(str(r["path"]) for r in results), "")))
    print(f"on {plural(results[0]['documents'], 'documents')}")
    _input_lines(results[0])


def _input_lines(r: dict) -> None:
    """What of the --input was measured: only its first --max-bytes (a user read "exact" as said of the
    whole file), and what was skipped."""
    if r["capped_at"] is not None:
        print(f"input           the first {bytes_text(r['capped_at'])} (--max-bytes reads more)")
    if r["skipped"]["total"]:
        print(f"input           {Skips.from_json(r['skipped']).report(' ' * 16)}")
