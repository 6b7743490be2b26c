"""`tinyk pretrain` and `tinyk sft`: one trainer, two data kinds (also `torchrun ... -m tinyk pretrain`)."""

from __future__ import annotations

import argparse
import sys

from tinyk.cli.common import (
    DTYPE_CHOICES,
    LR_SCHEDULE_CHOICES,
    PARALLEL_CHOICES,
    PRESET_NAMES,
    batch_count,
    model_dir,
    non_negative_int,
    path_arg,
    positive_float,
    positive_int,
    seed,
    speaks_for_machine,
    token_count,
    train_device,
    utf8_text,
)

# Flags that map one-to-one onto config keys; None means "not given", so configs stay in charge.
_FLAG_KEYS = ("data", "tokenizer", "init", "out", "max_steps", "max_tokens", "epochs", "max_minutes", "batch_size",
              "micro_batch", "seq_len", "lr", "lr_schedule", "dtype", "device", "parallel", "eval_every",
              "save_every", "log_every", "seed", "tracker", "compile", "activation_checkpointing", "progress",
              "keep_best")


def register(sub: argparse._SubParsersAction) -> None:
    for kind, help_text in (("pretrain", "pretrain a model on a tinyk pretraining data directory"),
                            ("sft", "fine-tune a model on a tinyk SFT data directory (loss on assistant tokens)")):
        p = sub.add_parser(kind, help=help_text,
                           description=f"{help_text}. Settings: --preset/--config, then on --resume the run's saved "
                                       f"config.yaml, then flags, then --set.")
        src = p.add_argument_group("what to train")
        src.add_argument("--config", type=path_arg, help="YAML or TOML config file")
        src.add_argument("--preset", help=f"a shipped config: {PRESET_NAMES}")
        src.add_argument("--data", type=path_arg, help="data directory from `tinyk data`")
        src.add_argument("--tokenizer", type=model_dir,
                         help="tokenizer directory, or a model's or a run's (default: the --init model's)")
        src.add_argument("--init", type=path_arg,
                         help="start from this model directory, or a run directory (its final/)"
                         + (" [required]" if kind == "sft" else ""))
        src.add_argument("--out", type=path_arg, help="run directory (checkpoints/, final/, metrics.jsonl, ...)")
        b = p.add_argument_group("budget and batch")
        b.add_argument("--max-steps", type=positive_int, help="optimizer steps")
        b.add_argument("--max-tokens", type=token_count, help="e.g. 10B, 500M, 2e9; whichever budget comes first ends "
                                                               "the run")
        b.add_argument("--epochs", type=positive_float, help="passes over the training data, e.g. 1 or 0.5")
        b.add_argument("--max-minutes", type=positive_float, help="wall-time budget: the run's length (and so its LR "
                       "schedule) is fitted to the measured speed; the other budgets still cap it")
        b.add_argument("--batch-size", type=batch_count, help="global batch in sequences per optimizer step")
        b.add_argument("--micro-batch", type=batch_count,
                       help="sequences per forward pass per process (accumulation fills the rest)")
        b.add_argument("--seq-len", type=positive_int,
                       help="tokens per sample (default: the config's, else the model's context)")
        b.add_argument("--lr", type=positive_float,
                       help="peak learning rate (warmup, then down to min_lr_ratio of it, 10%% by default)")
        b.add_argument("--lr-schedule", choices=LR_SCHEDULE_CHOICES,
                       help="cosine (the default) decays from the warmup on; wsd (warmup-stable-decay) stays at the "
                            "peak, then goes linearly down over the last decay_fraction of the steps (--set "
                            "decay_fraction=0.2, the default), so a run stopped before its decay can be made longer "
                            "at the same rate")
        r = p.add_argument_group("runtime")
        r.add_argument("--dtype", choices=DTYPE_CHOICES,
                       help="auto (bf16 autocast on CUDA, fp16 on GPUs without bf16 such as V100 and T4, fp32 on "
                            "CPU), bf16, fp16, fp32 (or bfloat16, float16, float32)")
        r.add_argument("--device", type=train_device, help="auto (CUDA if present), cpu or cuda")
        # --no-X turns off what a resumed run's saved config turned on.
        r.add_argument("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the model")
        r.add_argument("--parallel", choices=PARALLEL_CHOICES, help="multi-process strategy under torchrun")
        r.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction,
                       help="recompute activations in backward to save memory")
        r.add_argument("--seed", type=seed, help="seed of the weights' initialisation and the data order (default 0)")
        o = p.add_argument_group("evaluation, checkpoints, logging")
        o.add_argument("--eval-every", type=non_negative_int, help="steps between validations (0: only at the end)")
        o.add_argument("--save-every", type=non_negative_int, help="steps between checkpoints (0: only at the end)")
        o.add_argument("--log-every", type=positive_int, help="steps between progress lines and metrics.jsonl records")
        o.add_argument("--sample", action="append", default=None, metavar="PROMPT", type=utf8_text,
                       help="log the model's greedy continuation of PROMPT (sft: its reply) at each evaluation; "
                            "repeat for more (config key sample_prompts; sample_tokens, default 32, says how long)")
        o.add_argument("--keep-best", action=argparse.BooleanOptionalAction,
                       help="also keep the model of the lowest val loss in OUT/best (config key keep_best)")
        o.add_argument("--tracker", help="comma list of tensorboard, wandb, swanlab")
        o.add_argument("--progress", action=argparse.BooleanOptionalAction,
                       help="--no-progress: no progress bar, and no line per log interval where output is not a "
                            "terminal (metrics.jsonl and trackers still get every interval)")
        o.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
        o.add_argument("--force", action="store_true", help="start over in an existing run directory, deleting "
                                                                 "what the old run wrote (files of your own stay)")
        o.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="any config key, e.g. --set model.dim=64 --set warmup_steps=100")
        p.set_defaults(func=_run, kind=kind)


def _run(args: argparse.Namespace) -> int:
    from tinyk.config import resolve_config
    from tinyk.errors import TinykError, signal_status
    from tinyk.train import refuse_in_job, train

    flags = {k: getattr(args, k) for k in _FLAG_KEYS} | {"sample_prompts": args.sample}
    notes: list[str] = []
    try:
        cfg = resolve_config(args.kind, preset=args.preset, config=args.config, flags=flags, sets=args.set,
                             resume=args.resume, notes=notes)
    except TinykError as e:  # one node's (no shared run directory, another command): the others are told
        refuse_in_job(args.device or "auto", e)
    if speaks_for_machine():
        for note in notes:
            print(note, file=sys.stderr)
    summary = train(cfg, resume=args.resume, force=args.force)
    if summary["status"] == "interrupted":  # 128 + the signal's number, as the shell reports a kill by it
        if summary["stop_signal"] == "SIGPIPE":  # its own line went where the output went
            print(f"tinyk: its output could not be written (the reader left, or a full disk), so {args.kind} "
                  f"stopped at step {summary['steps']} with a checkpoint; continue with --resume", file=sys.stderr)
        return signal_status(summary["stop_signal"])
    return 0
