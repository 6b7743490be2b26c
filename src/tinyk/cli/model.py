"""`tinyk model init|info|import|gguf`."""

from __future__ import annotations

import argparse

from tinyk.cli.common import GGUF_OUTTYPES, PRESET_NAMES, json_text, model_dir, path_arg, positive_int, seed


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("model", help="create, import or inspect a model directory")
    msub = p.add_subparsers(dest="model_command", metavar="ACTION", required=True)

    i = msub.add_parser("init", help="write a randomly initialised model directory")
    i.add_argument("--preset", required=True, help=PRESET_NAMES)
    i.add_argument("--tokenizer", required=True, type=model_dir,
                   help="tokenizer directory, or a model's or a run's (vocab size comes from it)")
    i.add_argument("--out", type=path_arg, required=True, metavar="DIR", help="the model directory to write")
    i.add_argument("--seed", type=seed, default=0, help="seed of the random weights (default 0)")
    i.add_argument("--force", action="store_true", help="replace an existing model directory")
    i.set_defaults(func=_init)

    m = msub.add_parser("import", help="a model directory from a model the tutorial's training scripts saved",
                        description="Converts pretrain_*.pth / sft_*.pth, as the tutorial's scripts save them "
                                    "(its k_model.py), or a directory its save_pretrained wrote, into a tinyk "
                                    "(and transformers) model directory.")
    m.add_argument("checkpoint", type=path_arg,
                   help="the .pth (or .bin, .safetensors) file, or a saved model directory")
    m.add_argument("--tokenizer", required=True, type=model_dir, help="the tokenizer the checkpoint was trained with")
    m.add_argument("--out", type=path_arg, required=True, metavar="DIR", help="the model directory to write")
    m.add_argument("--n-heads", type=positive_int, help="attention heads (default: the directory's config.json, "
                                                        "else the checkpoint's RoPE tables, else the tutorial's 16)")
    m.add_argument("--max-seq-len", type=positive_int,
                   help="context length (default: config.json's, else the checkpoint's RoPE tables or mask, else "
                        "the tutorial's 512)")
    m.add_argument("--force", action="store_true", help="replace an existing model directory")
    m.set_defaults(func=_import)

    f = msub.add_parser("info", help="parameter count, config and memory footprint")
    f.add_argument("path", type=model_dir, help="model directory, or a training run's (meaning its final/)")
    f.add_argument("--json", action="store_true", help="print JSON")
    f.set_defaults(func=_info)

    g = msub.add_parser("gguf", help="write a model directory as one GGUF file for llama.cpp, Ollama, LM Studio",
                        description="Writes the model, its tokenizer, chat template and tinyk's sampling defaults "
                                    "as one GGUF file. llama.cpp's own converter refuses tokenizers it has not seen "
                                    "before, as every newly trained one is.")
    g.add_argument("path", type=model_dir, help="model directory, or a training run's (meaning its final/)")
    g.add_argument("--out", type=path_arg, required=True, metavar="FILE", help="the .gguf file to write")
    g.add_argument("--outtype", choices=GGUF_OUTTYPES, default="f16",
                   help="weight type: f16 (default), bf16, f32, or q8_0 (8-bit, about half f16's size); norms "
                        "stay f32")
    g.add_argument("--modelfile", type=path_arg, metavar="FILE",
                   help="also write an Ollama Modelfile for the GGUF file (ollama create NAME -f FILE): tinyk's "
                        "chat template in Ollama's syntax, context length, stops and sampling defaults")
    g.add_argument("--force", action="store_true", help="replace an existing GGUF file (and Modelfile)")
    g.set_defaults(func=_gguf)


def _init(args: argparse.Namespace) -> int:
    from tinyk.checkpoint import init_model_dir

    model = init_model_dir(args.preset, args.tokenizer, args.out, seed=args.seed, force=args.force)
    print(f"initialised {args.preset} ({model.num_params():,} parameters, vocab {model.config.vocab_size}) "
          f"in {args.out}")
    return 0


def _import(args: argparse.Namespace) -> int:
    from tinyk.checkpoint import import_seed_checkpoint

    model, notes = import_seed_checkpoint(args.checkpoint, args.tokenizer, args.out, n_heads=args.n_heads,
                                          max_seq_len=args.max_seq_len, force=args.force)
    c = model.config
    print(f"imported {args.checkpoint}: {model.num_params():,} parameters (dim {c.dim}, {c.n_layers} layers, "
          f"{c.n_heads} heads / {c.n_kv_heads} KV, hidden {c.hidden_dim}, vocab {c.vocab_size}"
          f"{', tied embeddings' if c.tie_embeddings else ''}) in {args.out}")
    for note in notes:
        print(f"note: {note}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from tinyk.checkpoint import model_info

    info = model_info(args.path)
    if args.json:
        print(json_text(info, indent=2))
        return 0
    width = 2 + max(map(len, [*info["config"], *info["memory"]]))
    print(f"{'parameters':<{width}}{info['parameters']:,}")
    for k, v in info["config"].items():
        print(f"{k:<{width}}{v}")
    for k, v in info["memory"].items():
        print(f"{k:<{width}}{v:,.1f}" if v >= 1 else f"{k:<{width}}{v:.3g}")  # a nano model's KV cache: 0.0312
    return 0


def _gguf(args: argparse.Namespace) -> int:
    from tinyk.gguf import export_gguf
    from tinyk.units import bytes_text

    r = export_gguf(args.path, args.out, outtype=args.outtype, force=args.force, modelfile=args.modelfile)
    types = ", ".join(f"{n} {t}" for t, n in r["tensors"].items())
    print(f"wrote {args.out}: {r['parameters']:,} parameters, vocab {r['vocab']}, {bytes_text(r['bytes'])} "
          f"({types} tensors)")
    if args.modelfile is not None:
        print(f"wrote {args.modelfile}: ollama create NAME -f {args.modelfile}, then ollama run NAME")
    else:
        print("for Ollama, add --modelfile FILE: Ollama does not run the file's own chat template")
    if r["normalizer"]:
        print(f"note: the tokenizer normalises text ({r['normalizer']}) before splitting it and llama.cpp does not, "
              f"so text typed there (full-width punctuation such as ，？ under NFKC) reaches the model as pieces "
              f"it never saw in training; a tokenizer trained with --normalization none has no such gap")
    if r["rope_scaling"] != 1:
        print(f"note: the model's linear RoPE scaling (factor {r['rope_scaling']:g}) is in the file's rope.scaling "
              f"keys, which llama.cpp reads; transformers' GGUF reader does not, and loads the file unscaled (load "
              f"the model directory there)")
    return 0
