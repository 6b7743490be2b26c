"""`tinyk eval`: loss and bits per byte on prepared data, exact match on chat tasks, multiple choice."""

from __future__ import annotations

import argparse
import sys

from tinyk.cli.common import batch_count, json_text, model_dir, path_arg, positive_int, utf8_text


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model: data loss/bits per byte, chat tasks, multiple choice",
                       description="Modes combine: --data DIR (loss, perplexity, bits per byte), --task FILE "
                                   "(JSONL of {messages, answer}, or SFT records: greedy exact match and stop "
                                   "rate), --choice PATH (C-Eval/CMMLU CSVs: option log-likelihood vs chance).")
    p.add_argument("--model", required=True, nargs="+", action="extend", type=model_dir, metavar="MODEL",
                   help="model directory, or a training run's (meaning its final/); several are scored on the same "
                        "files side by side (--json/--out: {\"models\": [...]}; --samples lines name their model)")
    p.add_argument("--data", nargs="+", action="extend", default=[], metavar="DIR", type=path_arg,
                   help="prepared data directories")
    p.add_argument("--split", default="val", help="split of --data to evaluate (default val)")
    p.add_argument("--seq-len", type=positive_int, default=None,
                   help="window length for --data (default: SFT data's max_len, else the model's context; never "
                        "more than the context; with several models the shortest of theirs)")
    p.add_argument("--max-batches", type=positive_int, default=None, help="evaluate only this many batches of --data")
    p.add_argument("--task", nargs="+", action="extend", default=[], metavar="FILE", type=path_arg,
                   help='JSONL of {"messages": ..., "answer": ...}, or SFT records in any format `tinyk data sft` '
                        "reads (BelleGroup, messages, Alpaca, prompt/completion; JSONL or Parquet), the last reply "
                        "being the answer")
    p.add_argument("--max-new-tokens", type=positive_int, default=64,
                   help="answer length limit for --task (default 64)")
    p.add_argument("--system-prompt", "--system", type=utf8_text, default=None,
                   help="added to --task chats without one (default: the model's own, its SFT data's; '' for none)")
    p.add_argument("--choice", nargs="+", action="extend", default=[], metavar="PATH", type=path_arg,
                   help="C-Eval/CMMLU CSV files or folders (e.g. ceval/val, cmmlu/test)")
    p.add_argument("--choice-format", choices=["cloze", "letter"], default="cloze",
                   help="cloze: score each option's text (better for small models); letter: list the options "
                        "and score A/B/C/D")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="first N examples of each --task file, and first N questions of each --choice CSV")
    p.add_argument("--batch-size", type=batch_count, default=16, help="sequences per forward pass (default 16)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--quantize", choices=["none", "int8"], default="none",
                   help="decode --task answers with int8 weights, to see what `--quantize int8` costs")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--out", type=path_arg, default=None, metavar="FILE", help="also write the JSON results here")
    p.add_argument("--samples", type=path_arg, default=None, metavar="FILE",
                   help="also write every --task answer and every --choice question's option scores here, "
                        "one JSON line each")
    p.add_argument("--force", action="store_true", help="replace an existing --out or --samples file")
    p.set_defaults(func=_eval)


# A flag, and the modes it acts in: given for none of them, it is said to be unused rather than ignored unseen.
_FOR_MODES = {"split": ("data",), "seq_len": ("data",), "max_batches": ("data",), "max_new_tokens": ("task",),
              "system_prompt": ("task",), "choice_format": ("choice",), "limit": ("task", "choice"),
              "force": ("out", "samples"), "quantize": ("task",)}


def _unused_flags(args: argparse.Namespace) -> list[str]:
    said = []
    for dest, modes in _FOR_MODES.items():
        if getattr(args, dest) != args.command_parser.get_default(dest) and not any(getattr(args, m) for m in modes):
            flag = "--" + dest.replace("_", "-")
            why = " (--data and --choice always score in fp32)" if dest == "quantize" else ""
            said.append(f"tinyk: eval: {flag} is not used without {' or '.join('--' + m for m in modes)}{why}")
    return said


def _eval(args: argparse.Namespace) -> int:
    from tinyk.evaluate import check_outputs, compared_rows, evaluate_models, save_outputs, skip_notes, table_rows
    from tinyk.tokenizer import prompt_from_flag
    from tinyk.units import format_table

    for note in _unused_flags(args):
        print(note, file=sys.stderr)
    inputs = [*args.model, *args.data, *args.task, *args.choice]
    check_outputs(args.out, args.samples, inputs, args.force, per_example=bool(args.task or args.choice))
    records = [] if args.samples is not None else None
    results = evaluate_models(args.model, data=args.data, tasks=args.task, choice=args.choice, split=args.split,
                              seq_len=args.seq_len, batch_size=args.batch_size, max_batches=args.max_batches,
                              max_new_tokens=args.max_new_tokens, limit=args.limit,
                              choice_format=args.choice_format, system_prompt=prompt_from_flag(args.system_prompt),
                              device=args.device, quantize=args.quantize if args.task else "none", records=records)
    shown = results[0] if len(results) == 1 else {"models": results}  # the JSON of one model is its results
    if args.json:
        print(json_text(shown, indent=2))
    elif len(results) == 1:
        print(format_table(table_rows(results[0])))
    else:
        print(format_table(compared_rows(results), header=("metric", *args.model, "baseline")))
    for r in results:
        if "same_as" in r:
            print(f"tinyk: eval: {r['model']} holds the same model as {r['same_as']}, so its results are that one's",
                  file=sys.stderr)
    notes = [skip_notes(r) for r in results]
    # What every model skipped alike is said once; otherwise each model's line names it.
    named = [("", notes[0])] if notes.count(notes[0]) == len(notes) else \
        [(f"{m}: ", n) for m, n in zip(args.model, notes, strict=True)]
    for prefix, model_notes in named:
        for note in model_notes:
            print(f"tinyk: eval: {prefix}{note}", file=sys.stderr)
    # After printing: results a failed write would lose are on the screen.
    save_outputs(args.out, shown, args.samples, records, inputs, args.force)
    return 0
