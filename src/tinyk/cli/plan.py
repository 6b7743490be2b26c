"""`tinyk plan`: GPU memory, the largest micro-batch, time and cost of a training run, before it starts."""

from __future__ import annotations

import argparse

from tinyk.cli.common import (
    DTYPE_CHOICES,
    PARALLEL_CHOICES,
    PRESET_NAMES,
    batch_count,
    float_range,
    json_text,
    model_dir,
    path_arg,
    positive_int,
    token_count,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="estimate memory per GPU, largest micro-batch, time and cost of a run",
                       description="Sizes a training run from a preset, config or --init model: parameters, "
                                   "FLOPs per token, memory per GPU, the largest micro-batch that fits, tokens/s, "
                                   "wall time, cost.")
    what = p.add_argument_group("what to train (as for tinyk pretrain)")
    what.add_argument("--preset", help=f"a shipped config: {PRESET_NAMES}")
    what.add_argument("--sft", action="store_true",
                      help="plan the fine-tune: the config's sft: settings, as tinyk sft takes them")
    what.add_argument("--config", type=path_arg, help="YAML or TOML training config")
    what.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any config key")
    what.add_argument("--init", metavar="MODEL_DIR", type=path_arg,
                      help="plan a run that starts from this model (or a run's final model), as in tinyk sft --init")
    what.add_argument("--tokenizer", type=model_dir,
                      help="tokenizer directory (or a model's or a run's): the model's vocabulary is its size, as in "
                           "tinyk pretrain (default: the config's, else --init's, else the preset's vocabulary)")
    what.add_argument("--seq-len", type=positive_int, help="tokens per sample (default: the config's, else the "
                                                          "model's context)")
    what.add_argument("--batch-size", type=batch_count, help="global batch in sequences per optimizer step")
    what.add_argument("--micro-batch", type=batch_count,
                      help="sequences per forward pass per GPU (default: the config's, else the largest that fits)")
    what.add_argument("--dtype", choices=DTYPE_CHOICES,
                      help="auto = bf16 autocast (fp16 on cards without bf16)")
    what.add_argument("--parallel", choices=PARALLEL_CHOICES, help="with several GPUs: ddp (the default) or fsdp")
    what.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction,
                      help="recompute each block in backward: far less activation memory, a third more compute "
                           "(default: the config's, off)")
    what.add_argument("--compile", action=argparse.BooleanOptionalAction,
                      help="plan a torch.compile run, about twice an eager run's MFU (default: the config's, off)")
    where = p.add_argument_group("where")
    where.add_argument("--gpu", default="a100",
                       help="a GPU class: a100, a100-40gb, a800, h100, h100-pcie, h800, h200, h20, l40s, l4, a6000, "
                            "rtx5090, rtx4090, rtx4080, rtx3090, rtx3080, v100, t4, or a device name as nvidia-smi "
                            "prints it (default a100)")
    where.add_argument("--gpus", type=positive_int, default=1, help="GPUs per node")
    where.add_argument("--nodes", type=positive_int, default=1, help="machines, each with --gpus (default 1)")
    where.add_argument("--tokens", type=token_count,
                       help="training tokens: 10B, 500M, 2e9 (default: the config's max_tokens or max_steps "
                            "budget, else 10B, the seed's corpus)")
    where.add_argument("--price", type=float_range(0, 1e6), help="price per GPU-hour, for the cost line")
    where.add_argument("--mfu", type=float_range(0.001, 1, unit=" (a fraction, e.g. 0.45)"),
                       help="model FLOPs utilisation to assume, e.g. 0.45, as training logs it (with activation "
                            "checkpointing its recomputation already lowers it); default: the GPU table's, for an "
                            "eager or a compiled run, x0.75 with checkpointing")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from tinyk.plan import find_gpu, format_plan, make_plan, run_spec

    run = run_spec(preset=args.preset, config=args.config, sets=args.set,
                   overrides={"seq_len": args.seq_len, "batch_size": args.batch_size, "micro_batch": args.micro_batch,
                              "dtype": args.dtype, "parallel": args.parallel,
                              "activation_checkpointing": args.activation_checkpointing, "compile": args.compile,
                              "init": args.init},
                   tokenizer=args.tokenizer, kind="sft" if args.sft else "pretrain")
    plan = make_plan(run, find_gpu(args.gpu), gpus=args.gpus, nodes=args.nodes, tokens=args.tokens,
                     price=args.price, mfu=args.mfu)
    print(json_text(plan, indent=2) if args.json else format_plan(plan))
    return 0
