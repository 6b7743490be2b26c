"""Command-line flags are range-checked as they are parsed: a bad number is one error line naming
the allowed range (never a traceback, never a run that silently does nothing), and `eval --out`
is checked before the evaluation starts and never replaces an input or an existing file unasked."""

from __future__ import annotations

import io
import json
import os
import re
from dataclasses import replace

import pytest

from tinyk.cli import build_parser, main
from tinyk.cli.common import float_range, int_range, positive_size, seed, size_range
from tinyk.errors import TinykError

TASK = {"messages": [{"role": "user", "content": "你好"}], "answer": "北京"}


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    return e.value.code, capsys.readouterr().err


def error_line(args: list[str], capsys) -> str:
    """The one line a refused command prints (argparse's usage block is left to --help)."""
    code, err = run_cli(args, capsys)
    assert code == 2 and err.count("\n") == 1 and ": error: " in err, err
    return err.strip()


SIZE = "must be a size from 1 to 1e18"
SEED = "must be an integer in 0..4294967295"
POSITIVE = "must be an integer >= 1"
BATCH = "must be an integer in 1..65536"
POSITIVE_FLOAT = "must be a finite number > 0"

TOK = ["tokenizer", "train", "c.jsonl", "--out", "t"]
DATA = ["data", "pretrain", "--input", "c.jsonl", "--tokenizer", "tok", "--out", "d"]
UTF8 = "is not valid UTF-8 text"
SFT = ["data", "sft", "--input", "c.jsonl", "--tokenizer", "tok", "--out", "d"]
GEN = ["generate", "--model", "m", "--prompt", "x"]
SERVE = ["serve", "--model", "m"]
EVAL = ["eval", "--model", "m", "--data", "d"]
PLAN = ["plan", "--preset", "nano"]


@pytest.mark.parametrize("args, flag, message", [
    # sizes: finite, positive, at most 1e18 (inf, 1e400 and nan used to end in an OverflowError traceback;
    # a negative --max-bytes read nothing)
    ([*TOK, "--max-bytes", "inf"], "--max-bytes", f"{SIZE}, got 'inf'"),
    ([*TOK, "--max-bytes", "1e400"], "--max-bytes", SIZE),
    # past the exponents decimal computes with: a decimal.Overflow traceback
    ([*TOK, "--max-bytes", "1e999999999"], "--max-bytes", f"{SIZE}, got '1e999999999'"),
    ([*PLAN, "--tokens=-1e999999999B"], "--tokens", SIZE),
    ([*TOK, "--max-bytes", "nan"], "--max-bytes", SIZE),
    ([*TOK, "--max-bytes", "-5"], "--max-bytes", f"{SIZE}, got '-5'"),
    ([*TOK, "--max-bytes", "0"], "--max-bytes", SIZE),
    ([*TOK, "--max-bytes", "lots"], "--max-bytes", "not a size: 'lots' (e.g. 500M, 2G)"),
    (["tokenizer", "eval", "t", "--max-bytes", "0.1"], "--max-bytes", SIZE),
    # a glob that matched nothing measured the built-in samples instead, without a word
    (["tokenizer", "eval", "t", "--input"], "--input", "expected at least one argument"),
    ([*DATA, "--shard-tokens", "inf"], "--shard-tokens", "must be a size from 1k to 1e18"),
    # one file per token (or 100 meant as 100M): a shard holds at least 1k tokens
    ([*DATA, "--shard-tokens", "1"], "--shard-tokens", "must be a size from 1k to 1e18, got '1'"),
    # an empty --out (`--out "$DIR"`, DIR unset) is no path, not the current folder
    ([*TOK[:-2], "--out", ""], "--out", "is empty; give a path"),
    ([*DATA[:-2], "--out", ""], "--out", "is empty; give a path"),
    ([*EVAL, "--out", ""], "--out", "is empty; give a path"),
    (["pretrain", "--preset", "nano", "--out", ""], "--out", "is empty; give a path"),
    (["model", "init", "--preset", "nano", "--tokenizer", "t", "--out", ""], "--out", "is empty; give a path"),
    (["demo", "--out", ""], "--out", "is empty; give a path"),
    ([*DATA, "--max-line-bytes", "1e30"], "--max-line-bytes", SIZE),
    (["pretrain", "--max-tokens=-1G"], "--max-tokens", SIZE),
    ([*SERVE, "--max-body", "inf"], "--max-body", "must be a size from 1 to 1G"),
    ([*SERVE, "--model-name", " "], "--model-name", "must not be empty"),  # was the directory's name, silently
    ([*SERVE, "--max-body", "2G"], "--max-body", "must be a size from 1 to 1G, got '2G'"),
    ([*PLAN, "--tokens", "inf"], "--tokens", SIZE),
    ([*PLAN, "--tokens", "0"], "--tokens", SIZE),
    ([*PLAN, "--tokens", "2000000000000B"], "--tokens", SIZE),
    # integers
    ([*TOK, "--vocab-size", "4294967296"], "--vocab-size", "must be an integer in 261..1000000"),
    ([*TOK, "--vocab-size", "100"], "--vocab-size", "must be an integer in 261..1000000"),
    ([*TOK, "--min-frequency", "-1"], "--min-frequency", "must be an integer in 0..1000000000"),
    (["model", "init", "--preset", "nano", "--tokenizer", "t", "--out", "m", "--seed", "-1"], "--seed", SEED),
    (["model", "init", "--preset", "nano", "--tokenizer", "t", "--out", "m", "--seed", "99999999999999999999"],
     "--seed", SEED),
    ([*DATA, "--seed", "4294967296"], "--seed", SEED),
    ([*DATA, "--workers", "0"], "--workers", "must be an integer in 1..1024"),
    ([*SFT, "--max-len", "4"], "--max-len", "must be an integer in 8..1048576"),
    (["pretrain", "--max-steps", "0"], "--max-steps", POSITIVE),
    # Apple's GPU, with why (it was argparse's "invalid choice", which reads as a typo)
    (["pretrain", "--device", "mps"], "--device", "mps is not supported: tinyk's training has not been checked on "
                                                  "Apple GPUs (--device cpu trains on the Mac's CPU)"),
    (["sft", "--device", "gpu"], "--device", "must be auto, cpu or cuda, got 'gpu'"),
    (["pretrain", "--device", "cuda:1"], "--device", "must be auto, cpu or cuda, got 'cuda:1' (to train on GPU 1, run "
                                                     "with CUDA_VISIBLE_DEVICES=1 and --device cuda)"),
    (["pretrain", "--batch-size", "100000000000000000000"], "--batch-size", BATCH),
    (["sft", "--micro-batch", "0"], "--micro-batch", BATCH),
    (["pretrain", "--seq-len", "-8"], "--seq-len", POSITIVE),
    (["pretrain", "--seed", "1.5"], "--seed", f"{SEED}, got '1.5'"),
    (["pretrain", "--eval-every", "-1"], "--eval-every", "must be an integer >= 0"),
    (["pretrain", "--save-every", "-1"], "--save-every", "must be an integer >= 0"),
    (["pretrain", "--log-every", "0"], "--log-every", POSITIVE),
    ([*GEN, "--batch-size", "0"], "--batch-size", BATCH),
    ([*GEN, "--top-k", "100000000000000000000"], "--top-k", "must be an integer in 0..1000000"),
    ([*GEN, "--max-new-tokens", "0"], "--max-new-tokens", POSITIVE),
    ([*GEN, "--seed", str(2**63)], "--seed", "must be an integer in -9223372036854775808..9223372036854775807"),
    ([*SERVE, "--port", "70000"], "--port", "must be an integer in 0..65535"),
    ([*SERVE, "--max-batch", "0"], "--max-batch", BATCH),
    ([*SERVE, "--max-waiting", "0"], "--max-waiting", POSITIVE),
    ([*EVAL, "--limit", "-1"], "--limit", POSITIVE),
    ([*EVAL, "--limit", "0"], "--limit", POSITIVE),
    ([*EVAL, "--max-batches", "0"], "--max-batches", POSITIVE),
    ([*EVAL, "--max-batches", "-1"], "--max-batches", POSITIVE),
    ([*EVAL, "--seq-len", "0"], "--seq-len", POSITIVE),
    ([*EVAL, "--max-new-tokens", "0"], "--max-new-tokens", POSITIVE),
    ([*EVAL, "--batch-size", "0"], "--batch-size", BATCH),
    ([*PLAN, "--gpus", "0"], "--gpus", POSITIVE),
    ([*PLAN, "--nodes", "-2"], "--nodes", POSITIVE),
    ([*PLAN, "--micro-batch", "0"], "--micro-batch", BATCH),
    # floats: finite and in range
    (["pretrain", "--epochs", "inf"], "--epochs", f"{POSITIVE_FLOAT}, got 'inf'"),
    (["sft", "--epochs", "nan"], "--epochs", POSITIVE_FLOAT),
    (["pretrain", "--max-minutes", "0"], "--max-minutes", POSITIVE_FLOAT),
    (["pretrain", "--lr=-3e-4"], "--lr", POSITIVE_FLOAT),
    ([*DATA, "--val-fraction", "1"], "--val-fraction", "must be a finite number in [0, 1)"),
    ([*DATA, "--val-fraction", "nan"], "--val-fraction", "must be a finite number in [0, 1)"),
    ([*SERVE, "--timeout", "0"], "--timeout", "must be a finite number in (0, 86400] seconds, got '0'"),
    ([*SERVE, "--timeout", "-1"], "--timeout", "must be a finite number in (0, 86400] seconds"),
    ([*SERVE, "--timeout", "nan"], "--timeout", "must be a finite number in (0, 86400] seconds"),
    (["demo", "--minutes", "nan"], "--minutes/--max-minutes", "must be a finite number in (0, 1440], got 'nan'"),
    (["demo", "--minutes", "0"], "--minutes/--max-minutes", "must be a finite number in (0, 1440]"),
    ([*PLAN, "--price", "nan"], "--price", "must be a finite number in [0, 1e+06]"),
    ([*PLAN, "--price", "-1"], "--price", "must be a finite number in [0, 1e+06]"),
    ([*PLAN, "--price", "1e308"], "--price", "must be a finite number in [0, 1e+06]"),  # it printed "cost inf"
    # text
    (["chat", "--model", "m", "--message", ""], "--message", "must not be empty"),
    (["chat", "--model", "m", "--message", "  "], "--message", "must not be empty"),
    # text a model reads, with bytes that were not UTF-8 (Python's surrogateescape of argv)
    (["chat", "--model", "m", "--message", "hi\udcff"], "--message", UTF8),
    (["chat", "--model", "m", "--system", "\udcb2\udce2"], "--system-prompt/--system", UTF8),
    ([*GEN, "--prompt", "\udcc4\udce3"], "--prompt", UTF8),
    ([*GEN, "--stop", "\udcff"], "--stop", UTF8),
    ([*SFT, "--system-prompt", "bad\udcff"], "--system-prompt/--system", UTF8),
    ([*SERVE, "--system-prompt", "\udcff"], "--system-prompt/--system", UTF8),
    ([*EVAL, "--system-prompt", "\udcff"], "--system-prompt/--system", UTF8),
])
def test_bad_values_are_refused_while_parsing(args, flag, message, capsys):
    line = error_line(args, capsys)
    assert line.startswith("tinyk ") and f"error: argument {flag}: {message}" in line, line


def test_good_values_and_defaults_still_parse():
    parse = build_parser().parse_args
    a = parse([*TOK, "--max-bytes", "2G", "--vocab-size", "261", "--min-frequency", "0"])
    assert (a.max_bytes, a.vocab_size, a.min_frequency) == (2 * 10**9, 261, 0)
    assert parse(TOK).vocab_size == 6144 and parse(TOK).max_bytes is None
    a = parse([*DATA, "--val-fraction", "0", "--seed", "4294967295", "--max-line-bytes", "1k"])
    assert (a.val_fraction, a.seed, a.max_line_bytes, a.shard_tokens) == (0.0, 2**32 - 1, 1000, 10**8)
    a = parse(["pretrain", "--eval-every", "0", "--save-every", "0", "--epochs", "0.5", "--max-tokens", "2G"])
    assert (a.eval_every, a.save_every, a.epochs, a.max_tokens, a.seed) == (0, 0, 0.5, 2 * 10**9, None)
    a = parse([*SERVE, "--port", "0"])
    assert (a.port, a.max_body, a.timeout, a.max_batch, a.top_k, a.max_new_tokens) == (0, 10**6, 60.0, 16, 50, 256)
    a = parse([*PLAN, "--tokens", "0.5B"])
    assert a.tokens == 5 * 10**8 and parse(PLAN).tokens is None  # the config's budget, else 10B
    # A token count's B is billion wherever one is asked for, as plan prints it (it was read as "bytes": 10).
    assert parse(["sft", "--max-tokens", "10B"]).max_tokens == 10**10
    assert parse([*DATA, "--shard-tokens", "1b"]).shard_tokens == 10**9
    assert positive_size("10B") == 10  # bytes stay bytes
    # Sampling seeds take the API's range (int64), so any request's seed can be replayed with generate or chat.
    assert [parse([*GEN, "--seed", s]).seed for s in ("-1", "5000000000")] == [-1, 5 * 10**9]
    assert parse(["chat", "--model", "m", "--seed=-9223372036854775808"]).seed == -2**63
    # chat's system prompt flag has serve's, eval's and data sft's name too, and theirs chat's short one.
    assert parse(["chat", "--model", "m", "--system-prompt", "x"]).system == "x" == \
        parse(["chat", "--model", "m", "--system", "x"]).system
    assert {parse([*args, "--system", "x"]).system_prompt for args in (SERVE, EVAL, SFT)} == {"x"}
    assert parse(["demo", "--minutes", "1.5"]).minutes == 1.5 and parse(["demo"]).minutes is None
    assert parse(["demo", "--max-minutes", "5"]).minutes == 5  # training's name for a wall-time budget
    assert parse(["eval", "--model", "m"]).force is False


def test_flag_defaults_are_the_librarys():
    """The sampling, server and eval flags repeat the library's defaults (so --help can show them without
    importing torch); a default changed on one side only would make the CLI and a library call differ."""
    import inspect
    from dataclasses import asdict, fields

    from tinyk.engine import SamplingParams
    from tinyk.evaluate import evaluate_models
    from tinyk.serve import ServerConfig

    parse = build_parser().parse_args
    for command in (["generate", "--model", "m", "--prompt", "a"], ["chat", "--model", "m"],
                    ["serve", "--model", "m"]):
        args = vars(parse(command))
        for name, default in asdict(SamplingParams()).items():
            if name in args:
                assert args[name] == default, (command[0], name)
        assert {"temperature", "top_k", "top_p", "min_p", "repetition_penalty", "max_new_tokens"} <= set(args)
    serve, server = parse(["serve", "--model", "m"]), {f.name: f.default for f in fields(ServerConfig)}
    assert (serve.max_body, serve.timeout, serve.max_waiting, serve.max_connections) == (
        server["max_body_bytes"], server["timeout"], server["max_waiting"], server["max_connections"])
    evaluate, library = parse(["eval", "--model", "m"]), inspect.signature(evaluate_models).parameters
    for name in ("batch_size", "max_new_tokens", "split", "choice_format", "quantize", "device"):
        assert getattr(evaluate, name) == library[name].default, name
    # tokenizer eval's --max-bytes is left to the library unless given: its help names the library's default
    from tinyk.tokenizer import eval_tokenizer
    from tinyk.units import size_text

    cap = inspect.signature(eval_tokenizer).parameters["max_bytes"].default
    from tinyk.cli import _commands

    command = next(p for p in _commands(build_parser()) if p.prog == "tinyk tokenizer eval")
    action = next(a for a in command._actions if a.dest == "max_bytes")
    assert action.default is None and f"(default {size_text(cap)})" in action.help


def test_training_dtypes_and_strategies_are_the_configs():
    """--dtype takes PyTorch's names (summary.json's) as the config does; the lists live apart so
    that parsing needs no torch."""
    from tinyk.cli.common import DTYPE_CHOICES, GGUF_OUTTYPES, LR_SCHEDULE_CHOICES, PARALLEL_CHOICES, PRESET_NAMES
    from tinyk.config import DTYPE_ALIASES, LR_SCHEDULES, PARALLEL, TRAIN_DTYPES
    from tinyk.gguf import OUTTYPES
    from tinyk.model import DTYPES, PRESETS

    assert set(DTYPE_CHOICES) == {*TRAIN_DTYPES, *DTYPE_ALIASES} == {"auto", *DTYPES} and PARALLEL_CHOICES == PARALLEL
    assert LR_SCHEDULE_CHOICES == LR_SCHEDULES and GGUF_OUTTYPES == OUTTYPES
    assert PRESET_NAMES == ", ".join(PRESETS)
    parse = build_parser().parse_args
    assert parse(["pretrain", "--dtype", "bfloat16"]).dtype == "bfloat16" == parse([*PLAN, "--dtype", "bfloat16"]).dtype
    assert parse([*GEN, "--dtype", "fp32"]).dtype == "fp32" == parse([*SERVE, "--dtype", "fp32"]).dtype


@pytest.mark.parametrize("args", [GEN, SERVE, ["chat", "--model", "m"]])
def test_an_unknown_generation_dtype_is_refused_before_the_model_loads(args, capsys):
    """As training and plan do: a typo waited for the weights to load, and a damaged model was named instead."""
    assert error_line([*args, "--dtype", "bogus"], capsys).startswith(
        f"tinyk {args[0]}: error: argument --dtype: invalid choice: 'bogus' (choose from 'auto', 'bf16', ")


def test_sampling_and_serving_defaults_are_the_librarys():
    """The CLI's defaults are written out for its help (parsing needs no torch); they must be the
    ones a library caller gets, or `tinyk generate` and `Engine.generate` would sample differently."""
    from tinyk.engine import SamplingParams
    from tinyk.serve import ServerConfig

    a = build_parser().parse_args(SERVE)
    fields = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "max_new_tokens", "seed")
    assert {f: getattr(a, f) for f in fields} == {f: getattr(SamplingParams(), f) for f in fields}
    assert a.max_body == ServerConfig.max_body_bytes and a.timeout == ServerConfig.timeout
    assert a.max_waiting == ServerConfig.max_waiting


def test_helpers():
    assert int_range(0, 3)("3") == 3 and seed("0") == 0 and positive_size("1.5k") == 1500
    assert size_range(0)("0") == 0 and size_range(0)("500MB") == 5 * 10**8
    assert float_range(0, 1, lo_open=True)("1") == 1.0
    for bad in ("inf", "-inf", "nan", "1e400"):
        with pytest.raises(Exception, match="must be"):
            float_range()(bad)
    with pytest.raises(Exception, match=r"must be a finite number in \(0, 1\], got '0'"):
        float_range(0, 1, lo_open=True)("0")


def test_sizes_and_counts_read_and_print_as_people_write_them():
    from tinyk.units import bytes_text, display_width, parse_size, plural, size_text

    assert parse_size("2.01M") == 2_010_000 and parse_size("123456789012345.678k") == 123456789012345678  # exact
    assert parse_size("1.7") == 2 and parse_size("1.2") == 1  # rounded, not cut
    # --max-line-bytes' help says "default 16 MiB": that is how it is written back (it was "not a size")
    assert parse_size("16MiB") == 16 * 2**20 and parse_size("1.5kib") == 1536
    assert parse_size("1GiB", tokens=True) == 2**30
    assert plural(0, "documents") == "0 documents" and plural(1, "documents") == "1 document"
    assert size_text(1500) == "1500" and size_text(2000) == "2k" and size_text(2_500_000) == "2500000"
    assert bytes_text(999) == "999 bytes" and bytes_text(1000) == "1.0 kB"
    assert bytes_text(12_345_678) == "12.3 MB" and bytes_text(123_456_789) == "123 MB"
    # where a unit's rounded figure would reach the next one's, the next one is shown
    assert [bytes_text(n) for n in (999_949, 999_950, 99_949_999, 99_950_000, 999_499_999, 999_500_000)] == \
        ["999.9 kB", "1.0 MB", "99.9 MB", "100 MB", "999 MB", "1.0 GB"]
    assert display_width("ＡＢ中") == 6 and display_width("ab") == 2  # fullwidth Latin takes two columns


def test_sampling_floats_are_checked_before_the_model_loads(tmp_path, capsys):
    """The float sampling flags are range-checked as they are parsed: one line naming the flag."""
    for flag, value in (("--temperature", "nan"), ("--top-p", "inf"), ("--min-p", "-0.1"),
                        ("--repetition-penalty", "0")):
        code, err = run_cli(["generate", "--model", tmp_path / "missing", "--prompt", "x", flag, value], capsys)
        assert code == 2 and err.startswith(f"tinyk generate: error: argument {flag}: must be a finite number") \
            and err.count("\n") == 1, err


def test_chat_refuses_an_empty_message_on_stdin(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(" \n\n"))
    code, err = run_cli(["chat", "--model", tmp_path / "missing"], capsys)
    assert code == 2 and err == "tinyk: error: no message on stdin (pipe in a message, or use --message TEXT)\n"


def test_demo_refuses_a_nan_budget(tmp_path):
    from tinyk.demo import DemoConfig, run_demo

    for minutes in (float("nan"), float("inf"), -1.0):
        with pytest.raises(TinykError, match="--minutes must be positive"):
            run_demo(tmp_path / "demo", replace(DemoConfig.smoke(), minutes=minutes), show_progress=False)
    assert not (tmp_path / "demo").exists()


def test_demo_smoke_refuses_a_budget_it_would_not_use(tmp_path, capsys):
    """--smoke runs a fixed number of steps: its report showed the --minutes given as the budget."""
    assert error_line(["demo", "--smoke", "--minutes", "2", "--out", tmp_path / "d"], capsys) == \
        "tinyk: error: --minutes has no effect with --smoke, which runs a fixed number of steps; leave one out"
    assert not (tmp_path / "d").exists()


# ----------------------------------------------------------------------------- eval --out


@pytest.fixture
def task_file(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps(TASK, ensure_ascii=False) + "\n", encoding="utf-8")
    return f


def eval_args(model, task, *more) -> list:
    return ["eval", "--model", model, "--task", task, "--max-new-tokens", "2", "--device", "cpu", *more]


def test_eval_out_never_replaces_an_input(tmp_path, nano_model_dir, task_file, capsys):
    before = task_file.read_bytes()
    for force in ([], ["--force"]):
        code, err = run_cli(eval_args(nano_model_dir, task_file, "--out", task_file, *force), capsys)
        assert code == 2 and err == (f"tinyk: error: --out {task_file} would replace the input {task_file}; "
                                     "choose another output path\n")
    code, err = run_cli(eval_args(nano_model_dir, task_file, "--out", nano_model_dir / "r.json"), capsys)
    assert code == 2 and "lies inside the input" in err and err.count("\n") == 1
    assert task_file.read_bytes() == before and not (nano_model_dir / "r.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.jsonl"]


def test_eval_out_is_checked_before_evaluating(tmp_path, task_file, capsys):
    """A bad --out is refused at once (the model, which does not exist here, is never loaded)."""
    model = tmp_path / "no-model"
    folder = tmp_path / "results"
    folder.mkdir()
    code, err = run_cli(eval_args(model, task_file, "--out", folder, "--force"), capsys)
    assert code == 2 and err == f"tinyk: error: --out {folder} is a directory; give a file name for the JSON results\n"
    assert list(folder.iterdir()) == []
    mine = tmp_path / "mine.json"
    mine.write_text("keep")
    for force in ([], ["--force"]):  # not "use --force" first, then refused with it
        code, err = run_cli(eval_args(model, task_file, "--out", mine, *force), capsys)
        assert code == 2 and err == (f"tinyk: error: --out {mine} exists and is not the results of tinyk eval, so "
                                     f"it is not replaced; remove it yourself or choose another path\n")
    # A link (/dev/stdout, as root) was replaced by the results file renamed over it.
    empty = tmp_path / "real.json"
    empty.write_text("")
    link = tmp_path / "link.json"
    link.symlink_to(empty)
    code, err = run_cli(eval_args(model, task_file, "--out", link, "--force"), capsys)
    assert code == 2 and err == (f"tinyk: error: --out {link} is a symbolic link (to {empty}), which a new file "
                                 f"would replace; give the path it points to, or another\n")
    code, _ = run_cli(eval_args(model, task_file, "--out", "/dev/stdout", "--force"), capsys)  # to a file or a pipe
    assert code == 2 and link.is_symlink() and os.path.islink("/dev/stdout")
    code, err = run_cli(eval_args(model, task_file, "--out", "-"), capsys)  # not stdout, as --prompt-file - is stdin
    assert code == 2 and err == "tinyk: error: --out - would name a file '-': give a file name for the JSON results\n"
    assert mine.read_text() == "keep"
    code, err = run_cli(eval_args(model, task_file, "--out", tmp_path / "nope" / "r.json"), capsys)
    assert code == 2 and "does not exist" in err and err.count("\n") == 1
    code, err = run_cli(eval_args(model, task_file, "--out", f"{tmp_path / 'r.json'}/"), capsys)
    assert code == 2 and err == (f"tinyk: error: --out {tmp_path / 'r.json'}/ ends in '/', which names a directory; "
                                 f"give a file name for the JSON results\n")
    fifo, null_link = tmp_path / "fifo", tmp_path / "null"
    os.mkfifo(fifo)
    null_link.symlink_to(os.devnull)
    for special in (fifo, null_link):  # never replaced by a results file, even with --force
        code, err = run_cli(eval_args(model, task_file, "--out", special, "--force"), capsys)
        assert code == 2 and err == (f"tinyk: error: --out {special} is not a regular file, so it is not replaced; "
                                     f"choose another path\n")
    assert fifo.is_fifo() and null_link.is_symlink()
    fifo.unlink()
    null_link.unlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.json", "mine.json", "real.json", "results", "t.jsonl"]


def test_eval_out_force_replaces_an_earlier_result(tmp_path, nano_model_dir, task_file, capsys):
    out = tmp_path / "r.json"
    out.touch()  # an empty file (mktemp's) holds nothing to lose
    code, _ = run_cli(eval_args(nano_model_dir, task_file, "--out", out, "--force"), capsys)
    first = json.loads(out.read_text())
    first["tasks"] = []
    out.write_text(json.dumps(first))
    code, _ = run_cli(eval_args(nano_model_dir, task_file, "--out", out, "--force"), capsys)
    assert code == 0 and json.loads(out.read_text())["tasks"][0]["examples"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "t.jsonl"]
    (tmp_path / "tasks").mkdir()
    code, err = run_cli(eval_args(nano_model_dir, tmp_path / "tasks"), capsys)
    assert code == 2 and err == f"tinyk: error: task file {tmp_path / 'tasks'} is a directory; give a JSONL file " \
                                "of chats\n"


def test_a_stop_once_the_results_are_written_says_they_are_complete(tmp_path, nano_model_dir, task_file, capsys,
                                                                    monkeypatch):
    """Ctrl-C (or SIGTERM) landing just after the file is in place: the command still stops as one
    stopped (130, 143: `tinyk eval ... && next` does not go on), and says the results are whole."""
    import tinyk.evaluate
    from tinyk.errors import Stopped, Terminated

    real, out = tinyk.evaluate.write_text_atomic, tmp_path / "r.json"

    def stopped(stop: KeyboardInterrupt | type[KeyboardInterrupt], after: bool):
        def write(path, text):
            if after:
                real(path, text)
            raise stop
        return write

    for stop, code, said in ((KeyboardInterrupt, 130, "interrupted"), (Terminated, 143, "terminated"),
                             (Stopped("SIGHUP"), 129, "stopped by SIGHUP")):
        monkeypatch.setattr(tinyk.evaluate, "write_text_atomic", stopped(stop, after=True))
        assert run_cli(eval_args(nano_model_dir, task_file, "--out", out, "--force"), capsys) == (
            code, f"tinyk: {said} after the evaluation finished: {out} holds its complete results\n")
        assert json.loads(out.read_text())["tasks"][0]["examples"] == 1
    out.unlink()
    monkeypatch.setattr(tinyk.evaluate, "write_text_atomic", stopped(KeyboardInterrupt, after=False))
    assert run_cli(eval_args(nano_model_dir, task_file, "--out", out), capsys) == (130, "tinyk: interrupted\n")
    assert not out.exists()


def test_a_task_file_or_data_directory_given_twice_is_refused(tmp_path, nano_model_dir, task_file, pt_data, capsys):
    """Its results would be computed twice and shown as two rows."""
    link = tmp_path / "same.jsonl"
    link.symlink_to(task_file)
    code, err = run_cli(eval_args(nano_model_dir, task_file, "--task", link), capsys)
    assert code == 2 and err == (f"tinyk: error: task file {link} is given twice (also as {task_file}); give each "
                                 f"file once\n")
    code, err = run_cli(["eval", "--model", nano_model_dir, "--data", pt_data, pt_data], capsys)
    assert code == 2 and err == f"tinyk: error: data directory {pt_data} is given twice; give each directory once\n"


def test_a_bare_tinyk_shows_what_it_can_do_and_version_says_which(capsys):
    import tinyk

    with pytest.raises(SystemExit) as e:
        main([])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith("usage: tinyk") and re.findall(r"^    (\w+)", out, re.M) == [
        "tokenizer", "model", "data", "pretrain", "sft", "generate", "chat", "serve", "eval", "demo", "plan"]
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"tinyk {tinyk.__version__}\n"


def test_a_value_that_looks_like_a_flag_says_how_to_give_it(capsys):
    assert error_line(["plan", "--tokens", "-5B"], capsys) == (
        "tinyk plan: error: argument --tokens: expected one argument (a value that starts with '-' is written "
        "--tokens=VALUE) (see tinyk plan --help)")
    assert "must be a size from 1" in error_line(["plan", "--tokens=-5B"], capsys)
    assert error_line(["eval", "--model", "m", "--task", "-x.jsonl"], capsys).endswith(
        "--task: expected at least one argument (a value that starts with '-' is written --task=VALUE) "
        "(see tinyk eval --help)")
    # Not where the value was left out: last, or followed by a flag (the hint sent users the wrong way).
    assert error_line(["tokenizer", "train", "a", "--out"], capsys) == (
        "tinyk tokenizer train: error: argument --out: expected one argument (see tinyk tokenizer train --help)")
    assert error_line(["plan", "--config", "--preset", "tiny"], capsys) == (
        "tinyk plan: error: argument --config: expected one argument (see tinyk plan --help)")
    assert error_line(["plan", "--tokens", "--pre", "tiny"], capsys) == (  # a flag misspelt, not a value
        "tinyk plan: error: argument --tokens: expected one argument (see tinyk plan --help)")
    assert error_line(["plan", "--preset", "nano", "--tokens", "-5B", "--tokens", "1"], capsys).endswith(
        "(a value that starts with '-' is written --tokens=VALUE) (see tinyk plan --help)")


@pytest.mark.parametrize("args, said", [
    (["pretrain", "--config", "", "--preset", "nano"], "tinyk pretrain: error: argument --config"),
    (["plan", "--config", "", "--preset", "tiny"], "tinyk plan: error: argument --config"),
    (["generate", "--model", "", "--prompt", "hi"], "tinyk generate: error: argument --model"),
    (["data", "pretrain", "--tokenizer", "", "--input", "a", "--out", "b"],
     "tinyk data pretrain: error: argument --tokenizer"),
    (["data", "pretrain", "--input", "", "--tokenizer", "t", "--out", "b"],
     "tinyk data pretrain: error: argument --input"),
    (["model", "info", ""], "tinyk model info: error: argument path"),
    (["tokenizer", "train", "", "--out", "t"], "tinyk tokenizer train: error: argument FILE"),
    (["eval", "--model", "m", "--task", ""], "tinyk eval: error: argument --task"),
    (["sft", "--init", ""], "tinyk sft: error: argument --init")])
def test_an_empty_path_is_refused_not_taken_for_the_current_folder(args, said, capsys):
    """`--config "$CFG"` with CFG unset: the config was left out without a word (the run trained on the
    preset's settings), and `--model ""` was called a folder of .pth files to import."""
    assert error_line(args, capsys).startswith(f"{said}: is empty; give a path")


def test_an_error_naming_a_path_with_a_newline_or_an_escape_stays_one_line(tmp_path, capsys):
    """A file name's newline split the error in two, and its ESC drove the terminal (cleared the screen)."""
    line = error_line(["model", "info", tmp_path / "a\nb\x1b[2J"], capsys)
    assert "a\\x0ab\\x1b[2J" in line


@pytest.mark.parametrize("args, command", [
    (["pretrain", "--config", "c.yaml", "--bogus"], "tinyk pretrain"),
    ([*DATA, "--max-lenn", "5"], "tinyk data pretrain"),
    ([*PLAN, "extra"], "tinyk plan"),
])
def test_an_unknown_flag_names_the_command_it_was_given_to(args, command, capsys):
    unknown = " ".join(args[-2:] if args[-2].startswith("--max") else args[-1:])
    assert error_line(args, capsys) == (f"{command}: error: unrecognized arguments: {unknown} "
                                        f"(see {command} --help)")


def test_a_config_key_typed_as_a_flag_is_shown_its_set(capsys):
    """Most training settings have no flag of their own: the error says how to give one."""
    assert error_line(["pretrain", "--keep-checkpoints", "5"], capsys) == (
        "tinyk pretrain: error: unrecognized arguments: --keep-checkpoints 5; a config key without a flag of its own "
        "is set with --set keep_checkpoints=5 (see tinyk pretrain --help)")
    assert error_line(["sft", "--n-layers=4"], capsys) == (
        "tinyk sft: error: unrecognized arguments: --n-layers=4; a config key without a flag of its own is set with "
        "--set model.n_layers=4 (see tinyk sft --help)")


@pytest.mark.parametrize("args, hint", [
    (["pretrain", "--res", "run"], "--res run; did you mean --resume?"),
    (["plan", "--pres", "nano"], "--pres nano; did you mean --preset?"),
    ([*GEN, "--temprature", "1"], "--temprature 1; did you mean --temperature?"),
    ([*GEN, "--top", "1"], "--top 1; did you mean --top-k or --top-p?"),
    ([*PLAN, "--tok=1B"], "--tok=1B; did you mean --tokenizer or --tokens?"),
])
def test_a_shortened_or_mistyped_flag_is_refused_and_named(args, hint, capsys):
    """argparse would take `--res` for `--resume`: a script's meaning would change the day another
    flag starting with `--res` is added. Flags are spelled out; the error says which one was meant."""
    command = " ".join(["tinyk", *args[:1]])
    assert error_line(args, capsys) == f"{command}: error: unrecognized arguments: {hint} (see {command} --help)"


def test_a_required_flag_given_shortened_is_named(capsys):
    """`--mod x` once meant `--model x`; now the missing --model says why it is missing."""
    assert error_line(["generate", "--mod", "m", "--prompt", "x"], capsys) == (
        "tinyk generate: error: the following arguments are required: --model; --mod is not --model: flags are "
        "written in full (see tinyk generate --help)")
    assert error_line(["generate", "--prompt", "x"], capsys) == (
        "tinyk generate: error: the following arguments are required: --model (see tinyk generate --help)")


def test_a_stop_during_torchs_first_imports_is_a_stop_not_an_error(capsys, monkeypatch):
    """SIGTERM landing while torch imports lazily (Python 3.11 wraps it in "Error calling __set_name__")
    was reported as "the model is too large to plan" with status 2; a scheduler's stop is 143."""
    import tinyk.plan
    from tinyk.errors import Terminated

    def wrapped(stop: KeyboardInterrupt):
        def build(*a, **kw):
            raise RuntimeError("Error calling __set_name__ on 'Field' instance 'start_callbacks'") from stop
        return build

    monkeypatch.setattr(tinyk.plan, "Transformer", wrapped(Terminated()))
    tinyk.plan._model_size.cache_clear()
    try:
        assert run_cli(["plan", "--preset", "tiny"], capsys) == (143, "tinyk: terminated\n")
    finally:
        tinyk.plan._model_size.cache_clear()
    monkeypatch.undo()
    monkeypatch.setattr(tinyk.plan, "make_plan", wrapped(KeyboardInterrupt()))  # anywhere else in a command
    assert run_cli(["plan", "--preset", "tiny"], capsys) == (130, "tinyk: interrupted\n")
    # Under torchrun a stop is said once per machine: the agent stops the other processes when one
    # refuses, and their "terminated" would follow the refusal as if it were a second problem.
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert run_cli(["plan", "--preset", "tiny"], capsys) == (130, "")
    # Local rank 0's "terminated" may be the only line on screen when another process refused first.
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    monkeypatch.setattr(tinyk.plan, "make_plan", wrapped(Terminated()))
    assert run_cli(["plan", "--preset", "tiny"], capsys) == (143, "tinyk: terminated (by torchrun, if another "
                                                                  "process of the job failed: its report below names "
                                                                  "the error)\n")


def test_training_device_takes_auto_cpu_and_cuda():
    """pretrain/sft --device accepts exactly auto, cpu and cuda (mps and anything else are refused)."""
    parse = build_parser().parse_args
    assert [parse([kind, "--device", d]).device for kind in ("pretrain", "sft") for d in ("auto", "cpu", "cuda")] == \
        ["auto", "cpu", "cuda"] * 2
    assert parse(["pretrain"]).device is None  # not given: the config's device stays in charge


def test_threads_must_be_at_least_one(capsys):
    """--threads 0 is no thread count: refused while parsing, naming the range, for every engine command."""
    for args in (GEN, SERVE, ["chat", "--model", "m"]):
        assert "error: argument --threads: must be an integer in 1..4096, got '0'" in \
            error_line([*args, "--threads", "0"], capsys)
    assert build_parser().parse_args([*GEN, "--threads", "4096"]).threads == 4096
    assert build_parser().parse_args(GEN).threads is None  # torch's own default


def test_field_with_prompts_on_stdin_says_stdin_has_no_fields(capsys):
    """`--prompt-file - --field x`: stdin is lines of text, so --field is said to be unused (not ignored unseen)."""
    from tinyk.cli.common import text_field

    assert text_field("q", ["-"], default="prompt", source="--prompt-file", unit="prompt", stdin=True) == "q"
    assert capsys.readouterr().err == "tinyk: --field q is not used: stdin holds one prompt a line, with no fields\n"
    # Without stdin=True a "-" is a file name like any other: no note about stdin.
    assert text_field(None, ["-"], stdin=True) == "text" and capsys.readouterr().err == ""


def test_a_run_directory_means_its_final_model_only_when_it_is_not_a_model_itself(tmp_path):
    """--model/--tokenizer RUN means RUN/final when that holds a whole model (config.json and
    model.safetensors) and RUN itself is no model directory; otherwise the path is taken as given."""
    from tinyk.cli.common import model_dir

    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "final" / "config.json").write_text("{}")
    assert model_dir(str(run)) == str(run)  # final/ without its weights (a run stopped mid-save): not a model
    (run / "final" / "model.safetensors").write_bytes(b"")
    assert model_dir(str(run)) == str(run / "final")
    (run / "config.json").write_text("{}")  # RUN is a model directory of its own: it is the one meant
    assert model_dir(str(run)) == str(run)


def test_engine_commands_decode_full_precision_weights_unless_asked():
    """--quantize is none by default (int8 gives slightly different numbers: only when asked for), and
    --device/--dtype are auto."""
    parse = build_parser().parse_args
    for args in (GEN, SERVE, ["chat", "--model", "m"], EVAL):
        a = parse(args)
        assert (a.quantize, a.device) == ("none", "auto"), args
    assert parse(GEN).dtype == parse(SERVE).dtype == "auto"
    assert parse([*SERVE, "--quantize", "int8"]).quantize == "int8"


@pytest.mark.parametrize("args, said", [
    # up to three flags are offered...
    (["pretrain", "--max", "5"], "--max 5; did you mean --max-minutes or --max-steps or --max-tokens?"),
    # ...more is no guess (four --no-X flags)
    (["pretrain", "--no"], "--no"),
    # one letter after -- is no guess either
    (["pretrain", "--r", "x"], "--r x"),
    # a flag whose name is only somewhat like a config key is not sent to --set (max_steps has its own flag)
    (["pretrain", "--steps", "5"], "--steps 5"),
    # the value shown in the --set hint is never the next unknown flag
    (["pretrain", "--keep-checkpoints", "--bogus"],
     "--keep-checkpoints --bogus; a config key without a flag of its own is set with --set keep_checkpoints=VALUE"),
    # plan takes --set as training does, and says so as training does
    (["plan", "--n-layers", "4"], "--n-layers 4; a config key without a flag of its own is set with --set "
                                  "model.n_layers=4"),
    # another command's flag is not taken for one of this command's that starts like it (--modelfile, the
    # Ollama file to write; --max-tokens, the training budget): the command says how it takes the thing
    (["model", "gguf", "--model", "m", "--out", "m.gguf"], "--model; --model is a flag of tinyk generate, chat, "
     "serve and eval, not of tinyk model gguf: tinyk model gguf takes its PATH without a flag"),
    (["pretrain", "--max-new-tokens", "4"], "--max-new-tokens 4; --max-new-tokens is a flag of tinyk generate, chat, "
     "serve and eval, not of tinyk pretrain (did you mean --max-tokens?)"),
    # the API's max_tokens habit: this command's flag like it is still offered
    (["chat", "--model", "m", "--max-tokens", "5"], "--max-tokens 5; --max-tokens is a flag of tinyk pretrain and "
     "sft, not of tinyk chat (did you mean --max-new-tokens?)"),
    (["chat", "--model", "m", "--prompt", "x"], "--prompt x; --prompt is a flag of tinyk generate, not of tinyk chat"),
    # a flag of this command mistyped is still offered, and plan's --set still said for training's flags
    (["pretrain", "--max-step", "4"], "--max-step 4; did you mean --max-steps?"),
    (["plan", "--max-steps", "9"], "--max-steps 9; a config key without a flag of its own is set with --set "
                                   "max_steps=9"),
    (["data", "info", "--data", "d"], "--data; --data is a flag of tinyk pretrain, sft and eval, not of tinyk "
     "data info: tinyk data info takes its PATH without a flag"),
    # which its argument is not: the tokenizer (or a model's) is, the data to measure on is --input
    (["tokenizer", "eval", "t", "--data", "d"], "--data d; --data is a flag of tinyk pretrain, sft and eval, "
     "not of tinyk tokenizer eval"),
])
def test_what_an_unknown_flag_is_said_to_mean(args, said, capsys):
    command = f"tinyk {' '.join(args[:2] if args[0] in ('model', 'tokenizer', 'data') else args[:1])}"
    assert error_line(args, capsys) == f"{command}: error: unrecognized arguments: {said} (see {command} --help)"


def _defaults(fn) -> dict:
    import inspect

    return {k: p.default for k, p in inspect.signature(fn).parameters.items()
            if p.default is not inspect.Parameter.empty}


def test_data_eval_model_and_serve_defaults_are_the_librarys():
    """As for sampling: the defaults written out for --help are the ones a library caller gets, so
    `tinyk data`, `tinyk eval`, `tinyk model init|gguf` and `tinyk serve` do what the functions they call do."""
    from tinyk.checkpoint import init_model_dir
    from tinyk.data import prepare_pretrain, prepare_sft
    from tinyk.evaluate import evaluate_models
    from tinyk.gguf import export_gguf
    from tinyk.serve import ServerConfig

    parse = build_parser().parse_args
    for args, fn in ((DATA, prepare_pretrain), (SFT, prepare_sft)):
        a, lib = parse(args), _defaults(fn)
        assert {k: getattr(a, k) for k in ("val_fraction", "seed", "workers", "max_line_bytes", "strict", "force")} \
            == {k: lib[k] for k in ("val_fraction", "seed", "workers", "max_line_bytes", "strict", "force")}
    assert parse(SFT).max_len == _defaults(prepare_sft)["max_len"] == 512
    assert parse(SFT).system_prompt is None  # the tokenizer's own prompt (prompt_from_flag), '' for none
    a, lib = parse(["eval", "--model", "m"]), _defaults(evaluate_models)
    assert {k: getattr(a, k) for k in ("split", "seq_len", "batch_size", "max_batches", "max_new_tokens", "limit",
                                       "choice_format", "device", "quantize")} == \
        {k: lib[k] for k in ("split", "seq_len", "batch_size", "max_batches", "max_new_tokens", "limit",
                             "choice_format", "device", "quantize")}
    a = parse(["model", "init", "--preset", "nano", "--tokenizer", "t", "--out", "m"])
    assert (a.seed, a.force) == (_defaults(init_model_dir)["seed"], False)
    assert parse(["model", "gguf", "m", "--out", "m.gguf"]).outtype == _defaults(export_gguf)["outtype"]
    a = parse(SERVE)
    assert (a.max_connections, a.host, a.port, a.quiet, a.fit_context, a.allow_origin, a.allow_host) == \
        (ServerConfig.max_connections, "127.0.0.1", 8000, False, False, [], [])


def test_plan_defaults():
    """A plan without --gpu/--gpus/--nodes is one A100 on one node; the budget is the config's unless --tokens."""
    a = build_parser().parse_args(PLAN)
    assert (a.gpu, a.gpus, a.nodes, a.tokens, a.price, a.mfu, a.sft) == ("a100", 1, 1, None, None, None, False)


def test_tera_and_tebi_units_read_as_written():
    """2T is 2 * 10**12 and 1TiB is 2**40 (G/GiB are pinned already; T/TiB were not)."""
    from tinyk.units import parse_size

    assert parse_size("2T") == 2 * 10**12 and parse_size("1.5t") == 15 * 10**11
    assert parse_size("1TiB") == 2**40 and parse_size("2tib", tokens=True) == 2**41


def test_a_token_counts_b_after_a_unit_is_bytes_b_not_billion():
    """With tokens=True, 10MB is 10M and 2kb is 2k: the B means billion only right after a number (10B)."""
    from tinyk.units import parse_size

    assert parse_size("10MB", tokens=True) == 10**7 and parse_size("2kb", tokens=True) == 2000
    assert parse_size("3GB", tokens=True) == 3 * 10**9 and parse_size("10B", tokens=True) == 10**10


def test_a_size_with_spaces_around_it_reads_as_without():
    """' 2G ' (a quoted shell variable, a YAML value with a trailing space) is 2G, not 'not a size'."""
    from tinyk.units import parse_size

    assert parse_size(" 2G ") == 2 * 10**9 and parse_size("16MiB\n") == 16 * 2**20
    assert parse_size(" 10B ", tokens=True) == 10**10


def test_the_largest_size_is_1e18_exactly():
    """1e18 is allowed and anything above it refused (the message's '1e18' hid a limit of 2**60)."""
    import re

    from tinyk.units import parse_size

    assert parse_size("1e18") == 10**18 == parse_size("1000000000000000000.4")
    for s in ("1000000000000000001", "1.1e18", "1.15e18"):
        with pytest.raises(ValueError, match=rf"^must be a size from 0 to 1e18, got '{re.escape(s)}'$"):
            parse_size(s)


def test_a_huge_exponent_is_refused_at_once():
    """--max-bytes 1e999999 is refused in well under a second (rounding it first took ~30 s of CPU)."""
    import time

    from tinyk.units import parse_size

    start = time.monotonic()
    with pytest.raises(ValueError, match="^must be a size from 1 to 1e18, got '1e999999'$"):
        parse_size("1e999999", lo=1)
    assert time.monotonic() - start < 3


def test_a_size_is_rounded_before_its_range_is_checked():
    """0.6 with a minimum of 1 is 1, as 1.7 is 2 ('rounded, not cut'); 0.4 is still refused."""
    from tinyk.units import parse_size

    assert parse_size("0.6", lo=1) == 1 and parse_size("1e18", hi=10**18) == parse_size("1000000000000000000.49")
    with pytest.raises(ValueError, match="must be a size from 1 to 1e18"):
        parse_size("0.4", lo=1)


def test_a_decimal_unit_before_a_binary_one_is_no_size():
    """'1kMiB' (a typo) is refused, not read as 1k x 1024; so is a B typed twice ('10bb' was 10)."""
    from tinyk.units import parse_size

    for s in ("1kMiB", "2GKiB", "10bb", "1kbb"):
        with pytest.raises(ValueError, match=r"^not a size: '.*' \(e\.g\. 500M, 2G\)$"):
            parse_size(s)


def test_large_counts_and_amounts_print_with_thousands_separators():
    """plural writes '1,234 documents' (its docstring) and bytes_text '1,234.0 GB', as every other figure."""
    from tinyk.units import bytes_text, plural

    assert plural(1234, "documents") == "1,234 documents" and plural(10**6, "tokens") == "1,000,000 tokens"
    assert bytes_text(1_234_000_000_000) == "1,234.0 GB"
