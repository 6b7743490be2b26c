"""`tinyk tokenizer train|eval`."""

from __future__ import annotations

import argparse
import sys

from tinyk.cli.common import add_field_arg, int_range, json_text, model_dir, path_arg, positive_size, text_field
from tinyk.inputs import DEFAULT_MAX_LINE_BYTES, Skips, check_inputs, mostly_skipped
from tinyk.units import bytes_text, display_width, plural


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
    e.add_argument("--max-bytes", type=positive_size, default=10_000_000,
                   help="read at most this much of the input files (default 10M)")
    add_field_arg(e)
    e.add_argument("--json", action="store_true", help="print JSON")
    e.set_defaults(func=_eval)


def _train(args: argparse.Namespace) -> int:
    from tinyk.tokenizer import memory_cap_text, memory_note, train_tokenizer

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
          f"vocab {r['vocab_size']}; {r['skipped_summary']}")
    long_lines = r["skipped"]["by_reason"].get("line_too_long", 0)
    if warning := mostly_skipped(r["skipped"]["total"], r["documents"], "documents"):
        print(f"tinyk: {warning}", file=sys.stderr)
    elif r["line_too_long_bytes"] > r["read_bytes"]:  # few records, but most of the text
        print(f"tinyk: warning: most of the input was skipped: {plural(long_lines, 'lines')} too long to read "
              f"({bytes_text(r['line_too_long_bytes'])}, over --max-line-bytes {bytes_text(args.max_line_bytes)}) "
              f"against {bytes_text(r['read_bytes'])} read; a larger --max-line-bytes reads them",
              file=sys.stderr)
    if r["vocab_size"] < args.vocab_size:
        print(f"note: {r['vocab_size']:,} tokens, not --vocab-size {args.vocab_size}: the text has no more pairs seen "
              f"at least --min-frequency {args.min_frequency} times to merge (more text gives a larger vocabulary)")
    read = f"read the first {bytes_text(r['capped_at'] or 0)} of the input" + (
        f" (not counting {long_lines:,} line(s) too long to read, skipped)" if long_lines else "")
    if r["capped_at"] is not None and r["cap_from_memory"]:
        print(f"{read}, {memory_cap_text(r['memory_available'])}")
    elif r["capped_at"] is not None:
        print(f"{read} (--max-bytes)")
    print(f"saved to {args.out}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from tinyk.tokenizer import eval_tokenizer

    field = text_field(args.field, args.input or [])
    results = [eval_tokenizer(path, args.input, max_bytes=args.max_bytes, field=field) for path in args.path]
    if args.json:
        print(json_text(results[0] if len(results) == 1 else results, indent=2))
        return 0
    if len(results) > 1:
        return _compare(results)
    r = results[0]
    print(f"vocab size      {r['vocab_size']}")
    print("special ids     " + ", ".join(f"{k}={v}" for k, v in r["special_ids"].items()))
    print(f"bos/eos/pad     {r['bos']} / {r['eos']} / {r['pad']}")
    lossy = r["nfkc"] and not r["roundtrip_ok"]
    verdict = "exact" if r["roundtrip_ok"] else "not exact, by design (NFKC normalisation)" if lossy else "FAILED"
    print(f"round trip      {verdict} ({plural(r['documents'], 'documents')}, "
          f"{plural(r['roundtrip_failures'], 'failures')})")
    if r["skipped"]["total"]:
        print(f"input           {Skips.from_json(r['skipped']).summary()}")
    print(f"compression     {r['chars_per_token']} chars/token, {r['bytes_per_token']} bytes/token")
    return 0 if _round_trips(r) else 1


def _round_trips(r: dict) -> bool:
    """Exact, or not by design (NFKC)."""
    return r["roundtrip_ok"] or r["nfkc"]


def _compare(results: list[dict]) -> int:
    """Tokenizers side by side: on the same text, fewer tokens means a longer context in words and a cheaper
    step per character, paid for with a larger embedding."""
    rows = [("vocab size", [f"{r['vocab_size']:,}" for r in results]),
            ("round trip", ["exact" if r["roundtrip_ok"] else "NFKC" if _round_trips(r) else "FAILED"
                            for r in results]),
            ("chars/token", [f"{r['chars_per_token']:.3f}" for r in results]),
            ("bytes/token", [f"{r['bytes_per_token']:.3f}" for r in results]),
            ("tokens vs first", [f"{results[0]['bytes_per_token'] / r['bytes_per_token']:.1%}" for r in results])]
    names = [str(r["path"]) for r in results]
    widths = [max(display_width(n), *(len(v[i]) for _, v in rows)) for i, n in enumerate(names)]

    def line(label: str, cells: list[str]) -> str:  # right-aligned in display columns (a path may be Chinese)
        return label.ljust(16) + "  ".join(" " * (w - display_width(c)) + c for c, w in zip(cells, widths, strict=True))

    print(line("", names))
    for label, values in rows:
        print(line(label, values))
    print(f"on {plural(results[0]['documents'], 'documents')}")
    if results[0]["skipped"]["total"]:
        print(f"input           {Skips.from_json(results[0]['skipped']).summary()}")
    return 0 if all(map(_round_trips, results)) else 1
