"""Data preparation (pretrain + SFT) and the loaders that read it."""

from __future__ import annotations

import difflib
import functools
import gc
import gzip
import itertools
import json
import os
import pickle
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc
import types
import unicodedata
import warnings
from collections import Counter
from operator import add
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import tinyk.loader as loader_module
from conftest import CHINESE, ENGLISH
from tinyk.cli import main
from tinyk.data import (
    normalize_conversation,
    prepare_pretrain,
    prepare_sft,
    read_conversation,
    summary,
    token_dtype,
)
from tinyk.errors import STOP_SIGNALS, TinykError
from tinyk.inputs import Skips, iter_texts, sft_format
from tinyk.loader import PAD_MULTIPLE, PretrainLoader, ResumeMismatch, SFTLoader, eval_batches, open_dataset
from tinyk.tokenizer import (
    DEFAULT_SYSTEM_PROMPT,
    eval_tokenizer,
    load_tokenizer,
    render_chat,
    tokenizer_hash,
    train_tokenizer,
    with_system,
)
from tinyk.workers import map_ordered, start_pool

BOS, EOS = 3, 4
QUIET = {"show_progress": False, "workers": 1}


def texts(n: int) -> list[str]:
    return [f"{CHINESE[i % 40:]}{ENGLISH[: 10 + i % 30]} 第{i}号。" for i in range(n)]


def write_jsonl(path: Path, records: list, field: str = "text") -> Path:
    lines = [json.dumps(r if field is None else {field: r}, ensure_ascii=False) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def split_tokens(data_dir: Path, split: str) -> np.ndarray:
    meta = json.loads((data_dir / "meta.json").read_text())
    parts = [np.fromfile(data_dir / split / s["file"], dtype=meta["dtype"]) for s in meta["splits"][split]["shards"]]
    return np.concatenate(parts) if parts else np.empty(0, np.uint16)


def documents(data_dir: Path, split: str) -> list[list[int]]:
    """Splits a split's token stream back into documents and checks each is BOS ... EOS."""
    toks = split_tokens(data_dir, split)
    starts = np.flatnonzero(toks == BOS).tolist()
    docs = [toks[a:b].tolist() for a, b in zip(starts, [*starts[1:], len(toks)], strict=True)]
    assert all(d[0] == BOS and d[-1] == EOS and EOS not in d[1:-1] for d in docs)
    return docs


def all_files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- pretraining data


def test_pretrain_writes_bos_text_eos_documents_and_meta(tmp_path, tok_dir):
    docs_in = texts(120)
    src = write_jsonl(tmp_path / "c.jsonl", docs_in)
    meta = prepare_pretrain([src], tok_dir, tmp_path / "out", val_fraction=0.1, **QUIET)
    tok = load_tokenizer(tok_dir)
    out = tmp_path / "out"
    assert meta == json.loads((out / "meta.json").read_text())
    assert (meta["kind"], meta["format_version"], meta["dtype"]) == ("pretrain", 1, "uint16")
    assert meta["tokenizer_hash"] == tokenizer_hash(tok.path) and meta["vocab_size"] == tok.vocab_size
    assert meta["inputs"] == [{"path": str(src), "bytes": src.stat().st_size}]
    assert meta["command"].startswith("tinyk data pretrain --input") and meta["skipped"]["total"] == 0
    decoded = {}
    for split in ("train", "val"):
        docs = documents(out, split)
        s = meta["splits"][split]
        assert s["documents"] == len(docs) > 0
        assert s["tokens"] == sum(map(len, docs)) == sum(sh["tokens"] for sh in s["shards"])
        assert s["bytes"] == sum(len(tok.decode(d[1:-1]).encode()) for d in docs)
        decoded[split] = [tok.decode(d[1:-1]) for d in docs]
        assert decoded[split] == [t for t in docs_in if t in set(decoded[split])]  # input order kept
        for d in docs:
            assert d[1:-1] == tok.encode(tok.decode(d[1:-1]))
    assert sorted(decoded["train"] + decoded["val"]) == sorted(docs_in)
    assert 3 <= len(decoded["val"]) <= 30


def test_shards_roll_over_at_shard_tokens(tmp_path, tok_dir, corpus_file):
    one = prepare_pretrain([corpus_file], tok_dir, tmp_path / "one", **QUIET)
    # In batches of text that each leave a shard part-filled for the next to go on with.
    many = prepare_pretrain([corpus_file], tok_dir, tmp_path / "many", shard_tokens=1000, batch_chars=2000, **QUIET)
    shards = many["splits"]["train"]["shards"]
    assert len(shards) > 3 and all(s["tokens"] == 1000 for s in shards[:-1]) and 0 < shards[-1]["tokens"] <= 1000
    assert [s["file"] for s in shards[:2]] == ["shard_00000.bin", "shard_00001.bin"]
    for split in ("train", "val"):
        assert np.array_equal(split_tokens(tmp_path / "one", split), split_tokens(tmp_path / "many", split))
        assert {k: v for k, v in one["splits"][split].items() if k != "shards"} == \
            {k: v for k, v in many["splits"][split].items() if k != "shards"}


def test_every_input_format_gives_the_same_tokens(tmp_path, tok_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    docs_in = texts(60)
    plain = write_jsonl(tmp_path / "c.jsonl", docs_in).read_bytes()
    (tmp_path / "c.txt").write_text("\n\n".join(docs_in) + "\n", encoding="utf-8")  # blank lines are no documents
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(plain))
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(plain))
    (tmp_path / "c.json.gz").write_bytes(gzip.compress(plain))
    (tmp_path / "c.json.zst").write_bytes(zstandard.ZstdCompressor().compress(plain))
    pq.write_table(pa.table({"text": docs_in, "id": list(range(60))}), tmp_path / "c.parquet")
    write_jsonl(tmp_path / "content.jsonl", docs_in, field="content")
    runs = {name: [tmp_path / name] for name in ("c.jsonl", "c.txt", "c.jsonl.gz", "c.jsonl.zst", "c.json.gz",
                                               "c.json.zst", "c.parquet")}
    streams = {}
    for i, (name, inputs) in enumerate([*runs.items(), ("content", [tmp_path / "content.jsonl"])]):
        field = "content" if name == "content" else "text"
        meta = prepare_pretrain(inputs, tok_dir, tmp_path / f"o{i}", field=field, **QUIET)
        assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 60, name
        assert meta["skipped"]["total"] == 0, name
        streams[name] = (split_tokens(tmp_path / f"o{i}", "train"), split_tokens(tmp_path / f"o{i}", "val"))
    ref = streams["c.jsonl"]
    for name, (train, val) in streams.items():
        assert np.array_equal(train, ref[0]) and np.array_equal(val, ref[1]), name


def test_bad_records_are_skipped_counted_and_located(tmp_path, tok_dir):
    good = texts(3)
    bad = tmp_path / "bad.jsonl"
    with open(bad, "wb") as f:
        f.write(json.dumps({"text": good[0]}, ensure_ascii=False).encode() + b"\n")
        f.write(b'{"text": "unterminated\n')                     # 2 malformed
        f.write(b'{"title": "no text field"}\n')                  # 3 missing field
        f.write(b'{"text": 42}\n')                                # 4 not a string
        f.write(b'{"text": "   "}\n')                             # 5 empty
        f.write(b'{"text": "\xff\xfe bad bytes"}\n')              # 6 invalid UTF-8
        f.write(b'{"text": "' + b"a" * (50 * 2**20) + b'"}\n')    # 7 a 50 MB line
        f.write(b"[1, 2]\n")                                      # 8 not an object
        f.write(json.dumps({"text": good[1]}, ensure_ascii=False).encode() + b"\n")
        f.write(b'{"text": "also malformed"\n')                  # 10
        f.write(b'{"text": "lone \\ud800 surrogate"}\n')         # 11 escaped, valid JSON, not UTF-8 text
        f.write(b'{"text": ' + b"[" * 5000 + b"]" * 5000 + b"}\n")  # 12 nested too deep to parse
        f.write(b'{"text": "emoji \\ud83d\\ude00 pair"}\n')        # 13 fine: a pair is one character
        f.write(b'{"text": "x", "m": ' + b"[" * 900 + b'"\\ud800"' + b"]" * 900 + b"}\n")  # 14 deep surrogate
    tracemalloc.start()
    try:
        meta = prepare_pretrain([bad], tok_dir, tmp_path / "out", **QUIET)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 40 * 2**20, f"a 50 MB line must not be held whole (peak {peak / 2**20:.0f} MiB)"
    sk = meta["skipped"]
    assert sk["by_reason"] == {"malformed_json": 3, "missing_field": 2, "not_string": 1, "empty": 1,
                               "invalid_utf8": 1, "lone_surrogate": 2, "line_too_long": 1}
    assert sk["first"]["malformed_json"] == ["bad.jsonl:2", "bad.jsonl:10", "bad.jsonl:12"]
    assert sk["first"]["missing_field"] == ["bad.jsonl:3", "bad.jsonl:8"]
    assert sk["hints"] == {"missing_field": "no field 'text', the first such record has fields 'title'; --field "
                                            "names the one with the text",
                           "lone_surrogate": "a \\ud800-\\udfff escape without its pair is no text; fix the "
                                             "program that wrote it",
                           "line_too_long": "a line over 16 MiB is skipped; tinyk data and tokenizer train "
                                            "read longer ones with --max-line-bytes",
                           "invalid_utf8": "bytes that are neither UTF-8 nor GBK: a damaged line, or a file to "
                                           "convert from its encoding",
                           "not_string": "its 'text' is a JSON number, not text"}
    assert sk["hints"]["missing_field"] in Skips.from_json(sk).summary()  # as an error message says it
    lines = summary(meta).splitlines()  # `tinyk data`'s report: a line for each reason, sorted by name
    assert lines[0].endswith("skipped 11 records:") and [line.split(":")[0] for line in lines[1:]] == \
        ["  empty", "  invalid utf8", "  line too long", "  lone surrogate", "  malformed json", "  missing field",
         "  not string"]
    assert sk["first"]["line_too_long"] == ["bad.jsonl:7"]
    assert sk["first"]["invalid_utf8"] == ["bad.jsonl:6"]
    assert sk["first"]["lone_surrogate"] == ["bad.jsonl:11", "bad.jsonl:14"]
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 3
    assert bad.stat().st_size > 50 * 2**20  # input untouched


def test_strict_stops_at_the_first_bad_record_and_leaves_nothing(tmp_path, tok_dir):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"text": "好的"}\n{"text": 7}\n', encoding="utf-8")
    conv = tmp_path / "bad_sft.jsonl"
    conv.write_text(json.dumps(conversations(1)[0], ensure_ascii=False) + '\n{"conversations": 7}\n')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        with pytest.raises(TinykError, match=r"bad.jsonl:2: not string \(its 'text' is a JSON number, "
                                                 r"not text\) \(--strict\)"):
            prepare_pretrain([src], tok_dir, tmp_path / "out", strict=True, **QUIET)
        with pytest.raises(TinykError, match=r"bad_sft.jsonl:2: "):
            prepare_sft([conv], tok_dir, tmp_path / "out", strict=True, **QUIET)
        gc.collect()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "bad_sft.jsonl"]
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]  # the writers closed their files


def test_output_is_deterministic_and_independent_of_worker_count(tmp_path, tok_dir, corpus_file):
    conv = write_jsonl(tmp_path / "c.jsonl", conversations(40), field=None)
    for kind, prep, src in (("pre", prepare_pretrain, corpus_file), ("sft", prepare_sft, conv)):
        prep([src], tok_dir, tmp_path / f"{kind}1", val_fraction=0.2, **QUIET)
        prep([src], tok_dir, tmp_path / f"{kind}2", val_fraction=0.2, **QUIET)
        # Tiny batches force many payloads through the worker pool.
        prep([src], tok_dir, tmp_path / f"{kind}3", val_fraction=0.2, workers=2, batch_chars=500,
             show_progress=False)
        one, two, three = (all_files(tmp_path / f"{kind}{i}") for i in (1, 2, 3))
        for files in (one, two, three):
            meta = json.loads(files.pop("meta.json"))
            assert meta["splits"]["val"]["documents"] > 0
        assert one == two == three, kind
    other = prepare_pretrain([corpus_file], tok_dir, tmp_path / "seed1", val_fraction=0.2, seed=1, **QUIET)
    assert not np.array_equal(split_tokens(tmp_path / "seed1", "val"), split_tokens(tmp_path / "pre1", "val"))
    assert other["splits"]["train"]["documents"] + other["splits"]["val"]["documents"] == 400


@pytest.mark.skipif(os.name != "posix", reason="a dead parent's children are adopted on POSIX")
def test_a_worker_ends_with_its_killed_parent():
    """kill -9 of `tinyk data` must not leave its tokenizer workers running for no one (and printing
    BrokenPipeError tracebacks when they hand their batch over)."""
    parent = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, os, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import sys, time; from tinyk.workers import die_with; '\n"
        "                          'die_with(int(sys.argv[1])); print(1, flush=True); time.sleep(60)', "
        "str(os.getpid())],\n"
        "                         stdout=subprocess.PIPE)\n"
        "print(child.stdout.readline().decode().strip(), child.pid, flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    ready, child = parent.stdout.readline().split()
    child = int(child)
    assert ready == "1", "the worker did not start"
    parent.kill()
    parent.wait()
    parent.stdout.close()

    def running() -> bool:
        try:
            return Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    deadline = time.monotonic() + 10
    while running() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not running(), "the worker outlived its killed parent"


def test_without_a_terminal_progress_is_a_line_now_and_then(tmp_path, corpus_file, tok_dir, monkeypatch, capsys):
    """Under nohup or in a batch job a bar is carriage-return noise, and no output is hours of silence."""
    monkeypatch.setattr("tinyk.data.PROGRESS_LINE_S", 0.0)  # a line after every batch
    meta = prepare_pretrain([corpus_file], tok_dir, tmp_path / "d", workers=1, batch_chars=4000)
    lines = capsys.readouterr().err.splitlines()
    pattern = r"tokenizing pretrain: ([\d,]+) documents, ([\d,]+) tokens, [\d.]+ MB of text in \d+s \([\d,]+ tokens/s\)"
    assert len(lines) > 1 and all(re.fullmatch(pattern, line) for line in lines), lines
    docs, tokens = (int(n.replace(",", "")) for n in re.fullmatch(pattern, lines[-1]).groups())
    splits = meta["splits"]
    assert docs == splits["train"]["documents"] + splits["val"]["documents"]
    assert 0.9 < tokens / (splits["train"]["tokens"] + splits["val"]["tokens"]) <= 1  # the last one is held back
    prepare_pretrain([corpus_file], tok_dir, tmp_path / "quiet", workers=1, batch_chars=4000, show_progress=False)
    assert capsys.readouterr().err == ""
    # A terminal with no room for a bar (tqdm hides it) gets the lines too: it showed nothing at all.
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    prepare_pretrain([corpus_file], tok_dir, tmp_path / "rowless", workers=1, batch_chars=4000)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) > 1 and all(re.fullmatch(pattern, line) for line in lines), lines


def test_stopping_the_worker_pool_gets_past_a_pipe_lock_a_killed_worker_held(monkeypatch):
    """A worker killed (by the OOM killer, or a group SIGTERM before workers ignored it) while it
    read a task holds the pipe's lock for good: stopping waited for it forever, printing nothing."""
    import multiprocessing
    import threading

    from tinyk.workers import _Pool

    monkeypatch.setattr(_Pool, "lock_wait_s", 0.1)
    inqueue = multiprocessing.get_context("spawn").SimpleQueue()
    inqueue._rlock.acquire()  # the dead worker's
    late_writer = threading.Timer(0.2, inqueue._writer.send_bytes, (b"x" * (4 << 20),))
    late_writer.daemon = True
    late_writer.start()
    stopping = threading.Thread(target=_Pool._help_stuff_finish, args=(inqueue, late_writer, 1), daemon=True)
    stopping.start()
    stopping.join(60)
    assert not stopping.is_alive(), "stopping the pool waits for a lock no one will release"
    assert not late_writer.is_alive()


def test_map_ordered_pairs_each_result_with_its_own_tag():
    """`tinyk data` checkpoints the record count that comes as a batch's tag: a tag paired with another
    batch's result saves a count of records not yet written, and a continued run skips them."""
    payloads = [(f"tag{i}", i) for i in range(12)]  # more than 2 * workers in flight
    assert list(map_ordered(add, 100, payloads, workers=2)) == [(f"tag{i}", 100 + i) for i in range(12)]
    assert list(map_ordered(add, 100, payloads[:1], workers=2)) == [("tag0", 100)]
    assert list(map_ordered(add, 100, [], workers=2)) == []


def test_starting_a_pool_gives_back_the_scripts_file_and_spec(monkeypatch):
    """Hidden from spawning only while the workers start: a script reading `__file__` after calling
    tinyk must still find it."""
    script = sys.modules["__main__"]
    monkeypatch.setattr(script, "__file__", getattr(script, "__file__", __file__), raising=False)  # xdist's has none
    before = {k: script.__dict__[k] for k in ("__spec__", "__file__") if k in script.__dict__}
    assert "__file__" in before
    with start_pool(2, add, 1) as pool:
        assert pool.apply(abs, (-3,)) == 3
    assert {k: script.__dict__[k] for k in ("__spec__", "__file__") if k in script.__dict__} == before


def test_map_ordered_reads_at_most_two_payloads_per_worker_ahead():
    """The memory bound map_ordered promises: a batch is megabytes, an input is many gigabytes."""
    produced = []

    def payloads():
        for i in range(40):
            produced.append(i)
            yield i, i

    for tag, _ in map_ordered(add, 0, payloads(), workers=2):
        assert len(produced) - tag <= 2 * 2 + 1, (tag, len(produced))


def test_data_workers_leave_stop_signals_to_the_parent(tok_dir):
    """Ctrl-C, SIGTERM and SIGHUP reach the whole process group (a closed terminal, systemd, Slurm);
    workers ignore them, and the parent stops them."""
    from tinyk.data import _encode, _Job

    job = _Job("pretrain", (tok_dir / "tokenizer.json").read_text(encoding="utf-8"), "uint16")
    with start_pool(2, _encode, job) as pool:
        workers = list(pool._pool)
        for w in workers:
            status = Path(f"/proc/{w.pid}/status").read_text()
            ignored = int(next(line for line in status.splitlines() if line.startswith("SigIgn:")).split()[1], 16)
            assert all(ignored >> (s - 1) & 1 for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)), hex(ignored)
    assert all(w.exitcode is not None for w in workers)
    assert all(signal.getsignal(s) is not signal.SIG_IGN for s in (signal.SIGINT, signal.SIGTERM))


def test_stopping_the_worker_pool_reads_its_pipe_until_the_task_thread_has_ended():
    """A full disk mid-run hung `tinyk data` about once in twenty tries on a busy machine: terminating,
    the standard pool stops reading the workers' pipe as soon as it is empty, and its task thread could
    then write a batch of megabytes into it, waiting for a reader forever (and terminate() joins it)."""
    import multiprocessing
    import multiprocessing.pool
    import threading

    from tinyk.workers import _Pool

    assert "_help_stuff_finish" in vars(multiprocessing.pool.Pool), "the hook this fix overrides is gone"
    inqueue = multiprocessing.get_context("spawn").SimpleQueue()
    late_writer = threading.Timer(0.2, inqueue._writer.send_bytes, (b"x" * (4 << 20),))
    late_writer.daemon = True
    late_writer.start()
    try:
        _Pool._help_stuff_finish(inqueue, late_writer, 1)
        late_writer.join(10)
        assert not late_writer.is_alive(), "the task thread is left blocked writing into the pipe"
    finally:
        inqueue._reader.close()  # a writer still blocked gets a broken pipe


def test_skip_report_and_strict_error_do_not_depend_on_the_worker_count(tmp_path, tok_dir):
    """Reading runs ahead of tokenizing in worker processes; skips are still reported in input order."""
    too_long = {"conversations": [{"from": "human", "value": "长" * 400}, {"from": "gpt", "value": "好"}]}
    src = tmp_path / "s.jsonl"
    write_jsonl(src, [too_long, *conversations(2)], field=None)
    with open(src, "a", encoding="utf-8") as f:
        f.write("{bad\n")
    reports, errors = [], []
    for workers, batch_chars in ((1, 300), (2, 300), (1, 10**6), (2, 10**6)):
        kw = dict(max_len=64, workers=workers, batch_chars=batch_chars, show_progress=False)
        meta = prepare_sft([src], tok_dir, tmp_path / f"w{workers}-{batch_chars}", **kw)
        reports.append(json.dumps(meta["skipped"]))
        with pytest.raises(TinykError) as e:
            prepare_sft([src], tok_dir, tmp_path / f"strict{workers}-{batch_chars}", strict=True, **kw)
        errors.append(str(e.value))
    assert len(set(reports)) == 1 and '"prompt_too_long": 1' in reports[0] and '"malformed_json": 1' in reports[0]
    assert set(errors) == {"s.jsonl:1: prompt too long (no reply begins within --max-len 64 tokens; a larger --max-len "
                           "keeps them) (--strict)"}


def test_data_is_prepared_with_workers_where_signals_cannot_be_masked(tmp_path, tok_dir, corpus_file, monkeypatch):
    """Native Windows has no pthread_sigmask (nor SIGPIPE): the pool start crashed there, on every
    corpus of two batches or more with the default worker count, the full demo's among them; and a
    run stopped by its output going away ended in a KeyError instead of status 141."""
    from tinyk.errors import signal_status

    want = prepare_pretrain([corpus_file], tok_dir, tmp_path / "posix", workers=2, batch_chars=4000,
                            show_progress=False)
    monkeypatch.delattr(signal, "pthread_sigmask")
    monkeypatch.delattr(signal, "SIGPIPE")
    got = prepare_pretrain([corpus_file], tok_dir, tmp_path / "windows", workers=2, batch_chars=4000,
                           show_progress=False)
    assert got["splits"] == want["splits"]
    assert [p.read_bytes() for p in sorted((tmp_path / "windows").rglob("*.bin"))] == \
        [p.read_bytes() for p in sorted((tmp_path / "posix").rglob("*.bin"))]
    assert signal_status("SIGPIPE") == 141 and signal_status("SIGTERM") == 143


def test_data_can_be_prepared_from_a_thread(tmp_path, tok_dir, corpus_file):
    """Signal handlers belong to the main thread; a library caller's worker thread still gets a pool."""
    import threading

    result = {}

    def work():
        try:
            result["meta"] = prepare_pretrain([corpus_file], tok_dir, tmp_path / "d", workers=2, batch_chars=2000,
                                              show_progress=False)
        except BaseException as e:  # handed to the test's thread
            result["error"] = e

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert "error" not in result and result["meta"]["splits"]["train"]["documents"] > 0


def test_book_length_documents_are_tokenized_in_pieces_with_the_same_tokens(tmp_path, tok_dir, monkeypatch):
    """Pieces are cut only where the pre-tokenizer splits anyway, so their tokens equal the whole's."""
    import random

    from tinyk import data

    rng = random.Random(0)
    atoms = ["中国", "的", "首都", "是北京", "。", "！", "？", ".", "!", "\n", "\n\n", " ", "  \n", "\t", "hello",
             "it's", "_x", "3.14", "，", "”", "e\u0301", "\u3000", "①", "😀", "\r\n", "x\n", "。_"]
    book = "".join(rng.choice(atoms) for _ in range(3000))
    # NFKC turns "⑴" into "(1)" and "㈠" into "(一)", which would join a "。" before them: cut after normalising.
    legal = "".join(rng.choice(["第一条。", "⑴甲方应当", "。㈠总则", "，", "\n", "ำ", "ﾞ"]) for _ in range(800))
    nfkc = tmp_path / "nfkc"
    train_tokenizer([write_jsonl(tmp_path / "t.jsonl", [book, legal] * 3)], nfkc, vocab_size=400, normalization="nfkc",
                    show_progress=False)
    for tok, text in [(tok_dir, book), (nfkc, book), (nfkc, legal)]:
        plain = load_tokenizer(tok).plain
        whole = plain.encode(text, add_special_tokens=False).ids
        normal = plain.normalizer.normalize_str(text) if plain.normalizer else text
        for size, longest in ((1, len(text)), (5, len(text)), (40, None), (300, None)):
            pieces = data.text_pieces(normal, size, longest)
            assert "".join(pieces) == normal and len(pieces) > 1
            assert [i for p in pieces for i in plain.encode(p, add_special_tokens=False).ids] == whole, (tok, size)
            if longest is None:
                assert max(map(len, pieces)) <= size, (tok, size)
    plain = load_tokenizer(tok_dir).plain
    whole = plain.encode(book, add_special_tokens=False).ids
    src = write_jsonl(tmp_path / "b.jsonl", [book, "短文。"])
    for tok in (tok_dir, nfkc):
        prepare_pretrain([src], tok, tmp_path / f"whole-{tok.name}", val_fraction=0, **QUIET)
    monkeypatch.setattr(data, "PIECE_CHARS", 100)
    for tok in (tok_dir, nfkc):
        prepare_pretrain([src], tok, tmp_path / f"pieces-{tok.name}", val_fraction=0, **QUIET)
        assert np.array_equal(split_tokens(tmp_path / f"pieces-{tok.name}", "train"),
                              split_tokens(tmp_path / f"whole-{tok.name}", "train"))
    assert documents(tmp_path / f"pieces-{tok_dir.name}", "train")[0] == [BOS, *whole, EOS]


def test_a_document_is_cut_beside_any_punctuation_and_a_run_without_any_inside_a_word(tok_dir):
    """Memory stays bounded for documents the sentence ends alone could not cut: clauses joined by "，"
    (1.6 GB for 4M characters when tokenized whole) are cut beside it, tokens unchanged; a run of
    letters with nowhere to cut (unpunctuated classical Chinese) is cut inside after twice a piece,
    where only a token or two at each cut can differ from the whole's."""
    from tinyk import data

    plain = load_tokenizer(tok_dir).plain
    clauses = "，".join(["中国的首都是北京"] * 60)
    pieces = data.text_pieces(clauses, 50)
    assert "".join(pieces) == clauses and max(map(len, pieces)) <= 50
    encoded = [i for p in pieces for i in plain.encode(p, add_special_tokens=False).ids]
    assert encoded == plain.encode(clauses, add_special_tokens=False).ids
    run = "天地玄黄宇宙洪荒日月盈昃辰宿列张" * 40
    pieces = data.text_pieces(run, 50)
    assert "".join(pieces) == run and [len(p) for p in pieces] == [50] * 11 + [90]  # the last 90 within 100
    whole = plain.encode(run, add_special_tokens=False).ids
    encoded = [i for p in pieces for i in plain.encode(p, add_special_tokens=False).ids]
    changed = sum(max(i2 - i1, j2 - j1) for op, i1, i2, j1, j2 in
                  difflib.SequenceMatcher(None, whole, encoded, autojunk=False).get_opcodes() if op != "equal")
    assert changed <= 3 * (len(pieces) - 1), changed  # the tokens each side of a cut, no more
    assert data.text_pieces(run[:100], 50) == [run[:100]]  # within twice a piece: held whole, tokens exact
    # An edge in a piece's first half is taken before a cut inside the run after it.
    text = "中国的首都是北京，" * 2 + "。" * 6 + run[:80]
    pieces = data.text_pieces(text, 50)
    assert [len(p) for p in pieces] == [24, 80]


def test_rerun_needs_force_and_replaces_instead_of_appending(tmp_path, tok_dir):
    src = write_jsonl(tmp_path / "c.jsonl", texts(50))
    out = tmp_path / "out"
    prepare_pretrain([src], tok_dir, tmp_path / "first", **QUIET)
    prepare_pretrain([src], tok_dir, out, **QUIET)
    with pytest.raises(TinykError, match="exists.*--force"):
        prepare_pretrain([src], tok_dir, out, **QUIET)
    prepare_pretrain([src], tok_dir, out, force=True, **QUIET)
    _same_data(out, tmp_path / "first")  # the same, not twice as much (meta.json's seconds aside)
    write_jsonl(src, texts(10))
    again = prepare_pretrain([src], tok_dir, out, force=True, **QUIET)
    assert again["splits"]["train"]["documents"] + again["splits"]["val"]["documents"] == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl", "first", "out"]


def test_interrupted_run_leaves_the_previous_output_untouched(tmp_path, tok_dir, monkeypatch):
    import tinyk.data

    src = write_jsonl(tmp_path / "c.jsonl", texts(80))
    out = tmp_path / "out"
    prepare_pretrain([src], tok_dir, out, **QUIET)
    before = all_files(out)
    real, calls = tinyk.data._encode_pretrain, []

    def interrupted(job, payload):
        calls.append(len(payload))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(job, payload)

    monkeypatch.setattr(tinyk.data, "_encode_pretrain", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_pretrain([src], tok_dir, out, force=True, batch_chars=200, **QUIET)
    assert len(calls) == 3 and all_files(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl", "out"]


def _stoppable_inputs(tmp_path: Path, kind: str) -> tuple[Path, Any]:
    """An input with bad records among good ones (and, for SFT, conversations cut or skipped by
    --max-len), and the prepare function to run on it."""
    if kind == "pretrain":
        lines = [json.dumps({"text": t}, ensure_ascii=False) for t in texts(150)]
        prep = functools.partial(prepare_pretrain, shard_tokens=1000)
    else:
        convs = conversations(60)
        # prompt too long
        convs[20] = [{"role": "user", "content": CHINESE * 3}, {"role": "assistant", "content": "好"}]
        lines = [json.dumps(c, ensure_ascii=False) for c in convs]
        prep = functools.partial(prepare_sft, max_len=96)
    for i in (3, 40, 77):
        lines.insert(i, "{not json")
    src = tmp_path / f"{kind}.jsonl"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return src, prep


def _stop_during_batch(monkeypatch, n: int) -> None:
    """Checkpoints after every second batch, and a stop once the n-th batch is written (so the files
    hold more than the last checkpoint records)."""
    from tinyk.data import _Checkpoints, _Splitter

    ticks, written, real = iter(range(10**6)), [], _Splitter.add
    monkeypatch.setattr(_Checkpoints, "due", lambda self: next(ticks) % 2 == 1)

    def add(self, b):
        real(self, b)
        written.append(len(b))
        if len(written) == n:
            raise KeyboardInterrupt

    monkeypatch.setattr(_Splitter, "add", add)


def _same_data(a: Path, b: Path) -> None:
    files_a, files_b = all_files(a), all_files(b)
    meta_a, meta_b = (json.loads(f.pop("meta.json")) for f in (files_a, files_b))
    assert files_a == files_b
    for meta in (meta_a, meta_b):
        del meta["command"], meta["seconds"]  # the command names its --out
    assert meta_a == meta_b


@pytest.mark.parametrize("kind, workers", [("pretrain", 1), ("pretrain", 2), ("sft", 1), ("sft", 2)])
def test_a_stopped_run_continues_to_the_output_of_a_run_never_stopped(tmp_path, tok_dir, monkeypatch, capsys,
                                                                       kind, workers):
    src, prep = _stoppable_inputs(tmp_path, kind)
    opts = {"val_fraction": 0.2, "workers": workers, "batch_chars": 300}
    prep([src], tok_dir, tmp_path / "whole", show_progress=False, **opts)
    out, partial = tmp_path / "out", tmp_path / ".out.partial"
    with monkeypatch.context() as m:
        _stop_during_batch(m, 7)
        with pytest.raises(KeyboardInterrupt):
            prep([src], tok_dir, out, **opts)
    kept = re.search(r"the ([\d,]+) \w+ done are kept in (.*); run the same command again", capsys.readouterr().err)
    assert kept and Path(kept[2]) == partial and (partial / "progress.json").is_file() and not out.exists()
    again = prep([src], tok_dir, out, **opts)
    continued = re.search(r"continuing the stopped run in .*: ([\d,]+) \w+, [\d,]+ tokens done",
                          capsys.readouterr().err)
    assert continued and continued[1] == kept[1] and int(kept[1].replace(",", "")) > 0
    _same_data(out, tmp_path / "whole")
    assert again["skipped"]["total"] >= 3 and not partial.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"{kind}.jsonl", "out", "whole"])


def test_a_stopped_runs_folder_edited_since_is_cut_back_or_started_over(tmp_path, tok_dir, monkeypatch, capsys):
    """Files the checkpoint does not know (an editor's, a stray shard) stay out of the output; a file
    shorter than recorded was padded with zero bytes (token 0, under a checksum that matched); a
    checkpoint that read more records than the input holds is refused."""
    src, prep = _stoppable_inputs(tmp_path, "pretrain")
    opts = {"val_fraction": 0.2, "workers": 1, "batch_chars": 300}
    prep([src], tok_dir, tmp_path / "whole", show_progress=False, **opts)
    out, partial = tmp_path / "out", tmp_path / ".out.partial"

    def stop() -> dict:
        with monkeypatch.context() as m:
            _stop_during_batch(m, 7)
            with pytest.raises(KeyboardInterrupt):
                prep([src], tok_dir, out, **opts)
        capsys.readouterr()
        return json.loads((partial / "progress.json").read_text())

    stop()
    (partial / "train" / "stray.bin").write_bytes(b"x" * 8)
    (partial / "progress.json.tmp").write_text("{}")
    prep([src], tok_dir, out, **opts)
    assert "continuing the stopped run" in capsys.readouterr().err
    _same_data(out, tmp_path / "whole")
    shutil.rmtree(out)
    name, size = next((n, s) for n, s in stop()["files"].items() if s > 2)
    os.truncate(partial / name, size - 2)
    prep([src], tok_dir, out, **opts)
    assert re.search(r"starting over: the stopped run in .* has files missing or cut short", capsys.readouterr().err)
    _same_data(out, tmp_path / "whole")
    shutil.rmtree(out)
    state = stop()
    (partial / "progress.json").write_text(json.dumps({**state, "records": 10**6}))
    with pytest.raises(TinykError, match=r"^the input holds fewer records \([\d,]+\) than the stopped run had done "
                                         r"\(1,000,000\); was it changed\?"):
        prep([src], tok_dir, out, **opts)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names open files through /proc")
def test_every_byte_a_checkpoint_records_was_synced_to_disk_before_it(tmp_path, tok_dir, monkeypatch):
    """After a power cut, a checkpoint must not name shard bytes that never reached the disk: full shards
    are synced as they close, the open files as each checkpoint is saved."""
    from tinyk.data import _Checkpoints

    src, _ = _stoppable_inputs(tmp_path, "pretrain")
    synced: dict[str, int] = {}
    real_fsync, real_save = os.fsync, _Checkpoints.save

    def fsync(fd: int) -> None:
        real_fsync(fd)
        synced[os.path.realpath(f"/proc/self/fd/{fd}")] = os.fstat(fd).st_size

    saves = []

    def save(self, state, writers) -> None:
        real_save(self, state, writers)
        files = {name: size for name, size in self.saved["files"].items() if size}
        assert all(synced.get(os.path.realpath(self.folder / n), -1) >= size for n, size in files.items()), files
        saves.append(len(files))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(_Checkpoints, "save", save)
    monkeypatch.setattr(_Checkpoints, "due", lambda self: True)
    prepare_pretrain([src], tok_dir, tmp_path / "out", val_fraction=0.2, workers=1, batch_chars=300,
                     shard_tokens=1000, show_progress=False)
    assert len(saves) > 3 and max(saves) > 3  # shards full and closed, and open ones, in both splits


def test_checkpoints_leave_the_split_of_a_tiny_corpus_as_it_is(tmp_path, tok_dir):
    """The document held back so train is never empty went to val at a checkpoint taken before train
    had one: two documents at --val-fraction 0.99 were refused as "no usable documents"."""
    src = write_jsonl(tmp_path / "two.jsonl", texts(2))
    opts = {"val_fraction": 0.99, "workers": 1, "batch_chars": 1, "show_progress": False}
    whole = prepare_pretrain([src], tok_dir, tmp_path / "whole", **opts)
    saved = prepare_pretrain([src], tok_dir, tmp_path / "saved", checkpoint_s=0, **opts)
    assert whole["splits"]["train"]["documents"] == 1
    _same_data(tmp_path / "saved", tmp_path / "whole")
    assert saved["splits"] == whole["splits"]


def test_a_checkpoint_is_due_again_a_full_interval_after_the_last(tmp_path):
    """Not after every batch once the first is due (each one syncs every open file)."""
    from tinyk.data import _Checkpoints

    tmp_path.joinpath("p").mkdir()
    cp = _Checkpoints(tmp_path / "p", {}, 60, False)
    assert not cp.due()
    cp.last -= 100
    assert cp.due()
    cp.save({}, {})
    assert not cp.due() and json.loads((tmp_path / "p" / "progress.json").read_text())["files"] == {}


@pytest.mark.parametrize("kind", ["pretrain", "sft"])
def test_a_run_stopped_after_its_last_batch_continues_without_counting_anything_twice(tmp_path, tok_dir, monkeypatch,
                                                                                       capsys, kind):
    import errno

    import tinyk.data
    from tinyk.data import _Checkpoints, _Splitter

    src, prep = _stoppable_inputs(tmp_path, kind)
    with src.open("a", encoding="utf-8") as f:
        f.write('{"text": bad\n{"nofield": 1}\n')  # bad lines after the last record
    opts = {"val_fraction": 0.2, "workers": 1, "batch_chars": 300}
    whole = prep([src], tok_dir, tmp_path / "whole", show_progress=False, **opts)
    real_write = tinyk.data.write_json_atomic

    def full_disk(path, obj):
        if Path(path).name == "meta.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, obj)

    def full_disk_numpy(path, obj):  # numpy's tofile says a full disk without an errno
        if Path(path).name == "meta.json":
            raise OSError("4096 requested and 1024 written")
        real_write(path, obj)

    def stopped(self):
        raise KeyboardInterrupt

    class Dead:  # a pool worker the OOM killer ended
        exitcode, pid = -signal.SIGKILL, 1

    def worker_killed(fn, arg, payloads, workers):  # at the third batch
        import tinyk.workers

        never = types.SimpleNamespace(ready=lambda: False, wait=lambda timeout: None)
        for i, (tag, payload) in enumerate(payloads):
            if i == 2:
                tinyk.workers._result(types.SimpleNamespace(_pool=[]), never, {Dead()})
            yield tag, fn(arg, payload)

    for where, patch, error in (("close", (_Splitter, "close", stopped), KeyboardInterrupt),
                                ("meta.json", (tinyk.data, "write_json_atomic", full_disk), TinykError),
                                ("numpy", (tinyk.data, "write_json_atomic", full_disk_numpy), TinykError),
                                ("worker", (tinyk.data, "map_ordered", worker_killed), TinykError)):
        out = tmp_path / where
        with monkeypatch.context() as m:
            m.setattr(_Checkpoints, "due", lambda self: True)
            m.setattr(*patch)
            with pytest.raises(error):
                prep([src], tok_dir, out, **opts)
        assert "done are kept in" in capsys.readouterr().err
        again = prep([src], tok_dir, out, **opts)
        assert "continuing the stopped run" in capsys.readouterr().err, where
        assert again["skipped"] == whole["skipped"]
        _same_data(out, tmp_path / "whole")
        assert not (tmp_path / f".{where}.partial").exists()


def test_the_partial_folder_stays_locked_until_it_is_the_output(tmp_path, tok_dir, monkeypatch):
    """A second run let in between the first one's last write and its rename would empty the folder."""
    import tinyk.outputs
    from tinyk.outputs import DirLock

    src = write_jsonl(tmp_path / "c.jsonl", texts(20))
    real, tried = tinyk.outputs._share_like_umask, []

    def renaming(root):
        tried.append(DirLock(root).acquire())
        real(root)

    monkeypatch.setattr(tinyk.outputs, "_share_like_umask", renaming)
    prepare_pretrain([src], tok_dir, tmp_path / "out", **QUIET)
    assert tried == [False]


def test_starting_over_names_what_differs_from_the_stopped_run():
    from tinyk.data import _difference

    now = {"inputs": [{"path": "/d/a.jsonl", "bytes": 1000, "mtime_ns": 5}], "tokenizer_hash": "t1",
           "options": {"seed": 0, "field": "text"}, "strict": False, "tinyk": "0.1"}
    for then, said in (({"inputs": [{"path": "/d/b.jsonl", "bytes": 1000, "mtime_ns": 5}]}, "other input files"),
                       ({"inputs": [{"path": "/d/a.jsonl", "bytes": 2000, "mtime_ns": 5}]},
                        "another a.jsonl (2,000 bytes then, 1,000 bytes now)"),
                       ({"inputs": [{"path": "/d/a.jsonl"}]}, "another a.jsonl (1,000 bytes now)"),  # hand-edited
                       ({"tokenizer_hash": "t2"}, "another tokenizer"),
                       ({"options": {"seed": 0, "field": "content", "max_line_bytes": 9}},
                        "other options (--field, --max-line-bytes)"),
                       ({"strict": True}, "--strict"), ({"tinyk": "0.0"}, "another version of tinyk")):
        assert _difference({**now, **then}, now) == said


def test_a_stopped_run_is_not_continued_by_another_command(tmp_path, tok_dir, monkeypatch, capsys):
    src, prep = _stoppable_inputs(tmp_path, "pretrain")
    opts = {"val_fraction": 0.2, "batch_chars": 300, "workers": 1}
    out = tmp_path / "out"
    progress = tmp_path / ".out.partial" / "progress.json"
    unreadable = "has a progress file that cannot be read"
    touched = (f"was started with {src.name} as it was before it was modified (its time changed, e.g. by an edit, "
               f"touch or a copy)")  # it says what differs
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"precious")
    for change, kwargs, why in (("input", {}, touched),
                                ("seed", {"seed": 1}, "was started with other options (--seed)"),
                                ("garbled", {}, unreadable),
                                ("keyless", {}, unreadable), ("nested", {}, unreadable),
                                ("negative", {}, unreadable), ("text", {}, unreadable),
                                ("outside", {}, unreadable), ("shard outside", {}, unreadable),
                                ("fraction", {"val_fraction": 0.3}, "was started with other options (--val-fraction)")):
        with monkeypatch.context() as m:
            _stop_during_batch(m, 5)
            with pytest.raises(KeyboardInterrupt):
                prep([src], tok_dir, out, force=True, **opts)
        if change == "input":
            os.utime(src, ns=(time.time_ns(), src.stat().st_mtime_ns + 10**9))
        elif change == "garbled":
            progress.write_text(progress.read_text()[:100])
        elif change in ("keyless", "nested", "negative", "text", "outside", "shard outside"):
            state = json.loads(progress.read_text())  # edited by hand, tampered with, or left by another version
            if change == "outside":  # nothing outside the folder is cut back or written to
                state["files"]["train/../../victim.bin"] = 1
            elif change == "shard outside":
                state["writers"]["train"]["shards"][-1]["file"] = "../../victim.bin"
            elif change == "keyless":
                del state["writers"]
            elif change == "nested":
                del state["writers"]["val"]["shards"]
            elif change == "negative":
                state["records"] = -5
            else:
                state["writers"]["train"]["tokens"] = "many"
            progress.write_text(json.dumps(state))
        capsys.readouterr()
        made = prep([src], tok_dir, out, force=True, **{**opts, **kwargs})
        assert f"starting over: the stopped run in {progress.parent} {why}" in capsys.readouterr().err, change
        assert made["seed"] == kwargs.get("seed", 0) and made["val_fraction"] == kwargs.get("val_fraction", 0.2)
    prep([src], tok_dir, tmp_path / "fresh", show_progress=False, **{**opts, "val_fraction": 0.3})
    _same_data(out, tmp_path / "fresh")
    assert not progress.parent.exists() and victim.read_bytes() == b"precious"


def test_an_sft_progress_file_without_a_writers_count_starts_over(tmp_path, tok_dir, monkeypatch, capsys):
    """It was taken up, the run went to its end, and closing the writer that could not open raised an
    AttributeError there: the whole run's work was lost."""
    src, prep = _stoppable_inputs(tmp_path, "sft")
    opts = {"val_fraction": 0.2, "batch_chars": 300, "workers": 1}
    progress = tmp_path / ".out.partial" / "progress.json"
    with monkeypatch.context() as m:
        _stop_during_batch(m, 5)
        with pytest.raises(KeyboardInterrupt):
            prep([src], tok_dir, tmp_path / "out", **opts)
    state = json.loads(progress.read_text())
    del state["writers"]["val"]["loss_tokens"]
    progress.write_text(json.dumps(state))
    capsys.readouterr()
    prep([src], tok_dir, tmp_path / "out", **opts)
    assert "has a progress file that cannot be read" in capsys.readouterr().err
    prep([src], tok_dir, tmp_path / "fresh", show_progress=False, **opts)
    _same_data(tmp_path / "out", tmp_path / "fresh")


def test_the_same_command_continues_a_run_killed_with_sigkill(tmp_path, tok_dir, capsys):
    src, _ = _stoppable_inputs(tmp_path, "pretrain")
    args = ["data", "pretrain", "--input", str(src), "--tokenizer", str(tok_dir), "--out", str(tmp_path / "out"),
            "--workers", "1", "--shard-tokens", "1k", "--val-fraction", "0.2"]
    killed = subprocess.run([sys.executable, "-c", (
        "import os, signal, sys\n"
        "import tinyk.data as d\n"
        "batched, add, written = d._batched, d._Splitter.add, []\n"
        "d._batched = lambda items, size, limit: batched(items, size, 300)\n"
        "d._Checkpoints.due = lambda self: True\n"
        "def dying(self, b):\n"
        "    add(self, b)\n"
        "    written.append(b)\n"
        "    if len(written) == 9:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "d._Splitter.add = dying\n"
        "from tinyk.cli import main\n"
        "main(sys.argv[1:])\n"), *args], capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr
    assert (tmp_path / ".out.partial" / "progress.json").is_file() and not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 0
    assert re.search(r"continuing the stopped run in .*\.out\.partial: [1-9][\d,]* documents", capsys.readouterr().err)
    prepare_pretrain([src], tok_dir, tmp_path / "whole", val_fraction=0.2, shard_tokens=1000, **QUIET)
    _same_data(tmp_path / "out", tmp_path / "whole")
    assert not (tmp_path / ".out.partial").exists()


def test_a_run_stopped_by_its_input_or_before_a_checkpoint_keeps_nothing(tmp_path, tok_dir, monkeypatch):
    from tinyk.data import _Checkpoints

    lines = [json.dumps({"text": t}, ensure_ascii=False) for t in texts(60)]
    src = tmp_path / "c.jsonl"
    src.write_text("\n".join([*lines[:50], "{not json", *lines[50:]]) + "\n", encoding="utf-8")
    monkeypatch.setattr(_Checkpoints, "due", lambda self: True)
    with pytest.raises(TinykError, match="c.jsonl:51: malformed json"):  # rerun, it would stop there again
        prepare_pretrain([src], tok_dir, tmp_path / "out", strict=True, val_fraction=0.2, batch_chars=300, **QUIET)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl"]
    _stop_during_batch(monkeypatch, 3)
    monkeypatch.setattr(_Checkpoints, "due", lambda self: False)
    with pytest.raises(KeyboardInterrupt):
        prepare_pretrain([src], tok_dir, tmp_path / "out", batch_chars=300, **QUIET)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl"]


def test_two_runs_never_write_into_one_output_at_once(tmp_path, tok_dir):
    from tinyk.outputs import DirLock

    src = write_jsonl(tmp_path / "c.jsonl", texts(20))
    partial = tmp_path / ".out.partial"
    partial.mkdir()
    lock = DirLock(partial)
    assert lock.acquire()
    with pytest.raises(TinykError, match=r"another tinyk data run is writing .*out \(in .*\.out\.partial\)"):
        prepare_pretrain([src], tok_dir, tmp_path / "out", **QUIET)
    assert partial.is_dir() and not (tmp_path / "out").exists()
    lock.release()
    prepare_pretrain([src], tok_dir, tmp_path / "out", **QUIET)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl", "out"]


def test_tiny_corpora_still_get_both_splits(tmp_path, tok_dir):
    def counts(name: str, n: int, **kw) -> tuple[int, int]:
        src = write_jsonl(tmp_path / f"{name}.jsonl", texts(n))
        s = prepare_pretrain([src], tok_dir, tmp_path / name, **kw, **QUIET)["splits"]
        return s["train"]["documents"], s["val"]["documents"]

    assert counts("one", 1) == (1, 0)
    assert counts("one-mostly-val", 1, val_fraction=0.99) == (1, 0)
    assert counts("two", 2) == (1, 1)
    assert counts("two-mostly-val", 2, val_fraction=0.99) == (1, 1)
    assert counts("thirty", 30) == (29, 1)
    assert counts("no-val", 30, val_fraction=0.0) == (30, 0)
    with pytest.raises(TinykError, match="val split .* is empty"):
        PretrainLoader(tmp_path / "one", "val", 8, 2)


def test_a_documents_split_depends_on_its_content_alone(tmp_path, tok_dir):
    """Fixing a bad line and preparing again moves no other document into train (a run continued on
    the new data would be validated on text it trained on), and copies of a document are on one side."""
    docs = texts(300)

    def val_and_train(name: str, lines: list[str], seed: int = 0) -> tuple[set, set]:
        src = tmp_path / f"{name}.jsonl"
        src.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        prepare_pretrain([src], tok_dir, tmp_path / name, val_fraction=0.1, seed=seed, **QUIET)
        return tuple({tuple(d) for d in documents(tmp_path / name, split)} for split in ("val", "train"))

    good = [json.dumps({"text": t}, ensure_ascii=False) for t in docs]
    val, train = val_and_train("good", good)
    assert 10 < len(val) < 60 and len(val) + len(train) == 300
    broken_val, _ = val_and_train("broken", ['{"text": "cut'] + good[1:])
    assert broken_val <= val and len(val - broken_val) <= 1
    twice_val, twice_train = val_and_train("twice", [x for line in good for x in (line, line)])
    assert (twice_val, twice_train) == (val, train)  # each copy where the first one is
    assert val_and_train("seed", good, seed=1)[0] != val


@pytest.mark.parametrize("kwargs, message", [
    ({"val_fraction": 1.0}, "val-fraction"),
    ({"workers": 0}, "workers"),
    ({"shard_tokens": 0}, "shard-tokens"),
    ({"shard_tokens": 999}, r"--shard-tokens must be at least 1k \(fewer makes a file every few documents\), got 999"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, tok_dir, corpus_file, kwargs, message):
    with pytest.raises(TinykError, match=message):
        prepare_pretrain([corpus_file], tok_dir, tmp_path / "o", **{"show_progress": False, **kwargs})


def test_unusable_inputs_are_refused(tmp_path, tok_dir):
    empty = tmp_path / "e.jsonl"
    empty.write_text('{"text": ""}\n', encoding="utf-8")
    with pytest.raises(TinykError, match="no usable documents.*empty: 1"):
        prepare_pretrain([empty], tok_dir, tmp_path / "o", **QUIET)
    with pytest.raises(TinykError, match="not found"):
        prepare_pretrain([tmp_path / "missing.jsonl"], tok_dir, tmp_path / "o", **QUIET)
    with pytest.raises(TinykError, match="tokenizer directory not found"):
        prepare_pretrain([empty], tmp_path / "no-tok", tmp_path / "o", **QUIET)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.jsonl"]


def test_token_dtype_follows_vocab_size():
    assert token_dtype(6144) == np.uint16 and token_dtype(65535) == np.uint16 and token_dtype(65536) == np.uint32


# ---------------------------------------------------------------- SFT data


def conversations(n: int) -> list:
    """Seed-format conversations (a list of messages per line) of varying length and turns."""
    out = []
    for i in range(n):
        msgs = [{"role": "user", "content": f"问题{i}：{CHINESE[: 5 + i % 30]}"},
                {"role": "assistant", "content": f"回答{i}。{ENGLISH[: 5 + (7 * i) % 60]}"}]
        if i % 3 == 0:
            msgs += [{"role": "user", "content": "还有呢？"}, {"role": "assistant", "content": CHINESE[i % 20:]}]
        out.append(msgs)
    return out


def mask_spans(mask: np.ndarray) -> list[tuple[int, int]]:
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


def sft_split(data_dir: Path, split: str = "train") -> list[tuple[np.ndarray, np.ndarray]]:
    meta = json.loads((data_dir / "meta.json").read_text())
    toks = np.fromfile(data_dir / split / "tokens.bin", dtype=meta["dtype"])
    mask = np.fromfile(data_dir / split / "mask.bin", dtype=np.uint8)
    off = np.load(data_dir / split / "offsets.npy")
    return [(toks[a:b], mask[a:b]) for a, b in zip(off[:-1], off[1:], strict=True)]


def check_mask(tok, ids: np.ndarray, mask: np.ndarray, messages: list[dict], cut: bool = False) -> None:
    """The mask covers exactly each assistant content and the <|im_end|> closing it; a conversation
    `cut` after a turn ends with that <|im_end|> (the newline after it learns nothing)."""
    assert tok.decode(ids.tolist()) == render_chat(messages).removesuffix("\n" if cut else "")
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    spans = mask_spans(mask)
    assert len(spans) == len(answers)
    for (a, b), answer in zip(spans, answers, strict=True):
        assert tok.decode(ids[a:b].tolist()) == answer + "<|im_end|>"
        assert ids[b - 1] == EOS and tok.decode(ids[:a].tolist()).endswith("<|im_start|>assistant\n")


def test_a_reply_of_weight_zero_is_context_not_trained_on(tmp_path, tok_dir):
    """OpenAI's fine-tuning format: an assistant message with "weight": 0 stays in the conversation but
    out of the loss (it was trained on like any other). A `datasets` export writes a turn without a weight
    as null and a float column's as 0.0 or 1.0; other values are refused."""
    user, reply = ({"role": "user", "content": q} for q in ("问题一", "问题二")), "好的"
    kept = [next(user), {"role": "assistant", "content": "坏答案", "weight": 0}, next(user),
            {"role": "assistant", "content": reply, "weight": 1}]
    exported = [{"from": "human", "value": "问题", "weight": None}, {"from": "gpt", "value": "甲", "weight": 1.0},
                {"from": "human", "value": "问题", "weight": None}, {"from": "gpt", "value": "乙", "weight": None}]
    only_zero = [kept[0], kept[1]]
    bad = [kept[0], {"role": "assistant", "content": "x", "weight": "zero"}]
    records = [{"messages": kept}, {"conversations": exported}, {"messages": only_zero}, {"messages": bad}]
    src = write_jsonl(tmp_path / "s.jsonl", records, field=None)
    meta = prepare_sft([src], tok_dir, tmp_path / "out", val_fraction=0, system_prompt=None, **QUIET)
    assert meta["skipped"]["by_reason"] == {"weight_zero": 1, "bad_message": 1}
    assert "it is 0 (not trained on) or 1" in meta["skipped"]["hints"]["bad_message"]
    tok = load_tokenizer(tok_dir)
    learned = {tok.decode(ids.tolist()): [tok.decode(ids[a:b].tolist()) for a, b in mask_spans(mask)]
               for ids, mask in sft_split(tmp_path / "out")}
    plain = [{"role": m["role"], "content": m["content"]} for m in kept]
    assert learned[render_chat(plain)] == [reply + "<|im_end|>"]
    assert sorted(learned.values()) == sorted([["甲<|im_end|>", "乙<|im_end|>"], [reply + "<|im_end|>"]])
    # A held-out SFT record is still a task whatever its reply's weight: the reply is the answer.
    assert normalize_conversation({"messages": only_zero})[-1]["content"] == "坏答案"


def test_a_conversation_cut_only_in_replies_of_weight_zero_loses_no_answer(tmp_path, tok_dir):
    """Counted as cut to --max-len are the conversations that lose trained tokens, not context."""
    chat = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "好的"},
            {"role": "user", "content": "长" * 20_000}, {"role": "assistant", "content": "嗯", "weight": 0}]
    src = write_jsonl(tmp_path / "s.jsonl", [{"messages": chat}], field=None)
    meta = prepare_sft([src], tok_dir, tmp_path / "out", val_fraction=0, system_prompt=None, max_len=64, **QUIET)
    assert sum(meta["truncated"].values()) == 0 and meta["splits"]["train"]["documents"] == 1


def test_sft_top_level_system_field():
    turns = [{"from": "human", "value": "猫"}, {"from": "gpt", "value": "Cat"}]
    own = {"from": "system", "value": "你是翻译。"}
    assert normalize_conversation({"system": "你是翻译。", "conversations": turns})[0]["content"] == "你是翻译。"
    assert [m["role"] for m in normalize_conversation({"system": "你是翻译。", "conversations": [own, *turns]})] == [
        "system", "user", "assistant"]
    assert normalize_conversation({"system": "你是诗人。", "conversations": [own, *turns]}) == "two_system_prompts"
    # not text: refused, as a turn's content is, not replaced by the default prompt
    assert normalize_conversation({"system": 5, "conversations": turns}) == "bad_message"
    assert normalize_conversation({"system": None, "conversations": turns}) == [
        {"role": "user", "content": "猫"}, {"role": "assistant", "content": "Cat"}]
    developer = {"messages": [{"role": "developer", "content": "简短"}, {"role": "user", "content": "猫"},
                              {"role": "assistant", "content": "Cat"}]}
    assert normalize_conversation(developer)[0] == {"role": "system", "content": "简短"}


def test_turns_of_a_merged_sharegpt_and_openai_export_read_whichever_keys_are_set():
    """A Parquet or `datasets` export of both kinds gives every turn all four keys, two of them null."""
    row = {"messages": [{"from": None, "value": None, "role": "user", "content": "猫"},
                        {"from": None, "value": None, "role": "assistant", "content": "Cat"}], "conversations": None}
    assert normalize_conversation(row) == [{"role": "user", "content": "猫"}, {"role": "assistant", "content": "Cat"}]
    row = {"conversations": [{"from": "human", "value": "猫", "role": None, "content": None},
                             {"from": "gpt", "value": "Cat", "role": None, "content": None}]}
    assert normalize_conversation(row) == [{"role": "user", "content": "猫"}, {"role": "assistant", "content": "Cat"}]


def test_an_empty_sharegpt_reply_is_context_and_a_weight_is_zero_or_one():
    """A failed generation in a ShareGPT dump ("value": "") is a turn of its own, not a missing one that
    skipped the whole conversation; a weight of 2 is no weight OpenAI's format has."""
    turns = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": ""}, {"from": "human", "value": "q"},
             {"from": "gpt", "value": "a"}]
    assert [m["content"] for m in read_conversation({"conversations": turns})] == ["hi", "", "q", "a"]
    reply = {"role": "assistant", "content": "a"}
    assert read_conversation({"messages": [{"role": "user", "content": "q"}, {**reply, "weight": 2}]}) == \
        ("bad_message", "a turn's weight is 2; it is 0 (not trained on) or 1")
    # An instruction without its output is no Alpaca record: named as an unknown format, not a KeyError.
    assert sft_format({"instruction": "q"}) is None
    assert read_conversation({"instruction": "q"})[0] == "unknown_format"


def test_a_conversation_clipped_past_its_markers_keeps_nothing_of_the_message_they_fill():
    """Where the markers alone pass the limit, the message is cut to nothing, not to a negative slice
    that kept all but its last characters."""
    from tinyk.data import _clipped

    chat = [{"role": "user", "content": "a" * 10}, {"role": "assistant", "content": "b" * 1000}]
    clipped, clip = _clipped(chat, 14, 3)
    assert clipped == [chat[0], {"role": "assistant", "content": ""}] and clip is not None


@pytest.mark.parametrize("turn,reason", [
    ({"role": "user", "from": "gpt", "content": "user text"}, "a turn's 'role' ('user') and 'from' ('gpt') disagree"),
    ({"role": "user", "content": "shown question", "value": "other text"},
     "a turn's 'content' and 'value' hold different texts"),
])
def test_a_turn_whose_sharegpt_and_openai_keys_disagree_is_skipped(turn, reason):
    """Both set and different, "from" and "value" were taken silently: a user's text trained as a reply."""
    assert read_conversation({"messages": [turn, {"role": "assistant", "content": "a"}]}) == ("bad_message", reason)
    same = {"role": "user", "from": "human", "content": "猫", "value": "猫"}  # both kept by a conversion, alike
    assert normalize_conversation({"messages": [same, {"role": "assistant", "content": "a"}]})[0] == \
        {"role": "user", "content": "猫"}


@pytest.mark.parametrize("record", [
    {"messages": [{"role": "user", "content": "weather in Paris?"},
                  {"role": "assistant", "content": "Let me check.",
                   "tool_calls": [{"id": "1", "type": "function",
                                   "function": {"name": "get_weather", "arguments": "{}"}}]}]},
    {"messages": [{"role": "user", "content": "q"},
                  {"role": "assistant", "content": "ok", "function_call": {"name": "f", "arguments": "{}"}}]},
    {"tools": [{"type": "function", "function": {"name": "get_weather"}}],
     "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
])
def test_a_conversation_with_tool_calls_is_skipped_not_trained_without_them(record):
    """The call was dropped without a word, and the model trained to say "Let me check." and stop; serve
    and the exported chat template refuse tools alike. A datasets export's null or empty ones are none."""
    assert read_conversation(record)[0] == "tool_call"
    nulls = {"tools": None, "messages": [
        {"role": "user", "content": "q", "tool_calls": None},
        {"role": "assistant", "content": "a", "tool_calls": [], "function_call": None}]}
    assert normalize_conversation(nulls) == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


def test_a_skip_reports_what_the_first_record_listed_held_in_a_bounded_quote(tmp_path, tok_dir):
    """"bad message: 2 (first at s.jsonl:1, s.jsonl:2; HINT)": HINT was the first hint given, here the
    second record's ("a JSON number") beside an Alpaca record that gave none. A 100 kB role or key (data
    used as keys) was quoted whole, a 100 kB line on screen and in meta.json."""
    records = [{"instruction": "i", "output": "o", "history": [["only a question"]]},
               {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]},
               {"messages": [{"role": "x" * 100_000, "content": "q"}, {"role": "assistant", "content": "a"}]},
               {"y" * 100_000: 1},
               *conversations(8)]
    src = write_jsonl(tmp_path / "s.jsonl", records, field=None)
    meta = prepare_sft([src], tok_dir, tmp_path / "out", **QUIET)
    assert meta["skipped"]["first"]["bad_message"] == ["s.jsonl:1", "s.jsonl:2"]
    assert meta["skipped"]["hints"]["bad_message"] == \
        "the record's 'history' is not a list of [question, answer] pairs of text"
    assert meta["skipped"]["hints"]["unknown_role"].startswith(f"role '{'x' * 40}'...; tinyk reads the roles")
    assert meta["skipped"]["hints"]["unknown_format"].startswith(f"the first such record has fields '{'y' * 40}'...;")
    assert (tmp_path / "out" / "meta.json").stat().st_size < 10_000


@pytest.mark.parametrize("record,hint", [
    ({"instruction": 5, "output": "o"}, "the record's 'instruction' is a JSON number, not text"),
    ({"instruction": "i", "input": ["x"], "output": "o"}, "the record's 'input' is a JSON array, not text"),
    ({"prompt": "p", "completion": [{"role": "assistant", "content": "c"}]},
     "the record's 'prompt' is a JSON string and its 'completion' a JSON array: both are text, or both lists of turns"),
])
def test_an_unusable_alpaca_or_prompt_completion_record_says_why(record, hint):
    assert read_conversation(record) == ("bad_message", hint)


def test_a_small_corpus_is_not_said_to_repeat_itself(pt_data):
    """The one document val always gets, and the hash's spread, are no sign of repeated documents: 25
    distinct documents put 1 (4%) in val at --val-fraction 0.01."""
    meta = {**json.loads((pt_data / "meta.json").read_text()), "val_fraction": 0.01}
    tr, va = meta["splits"]["train"], meta["splits"]["val"]
    for total, val in ((25, 1), (50, 2), (200, 5)):
        tr["documents"], va["documents"] = total - val, val
        tr["tokens"], va["tokens"] = 100 * (total - val), 100 * val  # documents of 100 tokens each
        tr["longest"] = va["longest"] = 100
        assert "val holds" not in summary(meta), (total, val)
    tr["documents"], va["documents"] = 150, 50
    assert "val holds 25% of them" in summary(meta)


def test_a_val_split_with_far_more_of_the_tokens_than_asked_is_explained(pt_data):
    """Copies of long documents put 28% of the tokens in val at --val-fraction 0.05 while its share of
    the documents stayed within chance, and nothing was said; one long document alone, which chance
    puts on either side, is not a sign of repeats, nor is data from before tinyk recorded the longest."""
    meta = {**json.loads((pt_data / "meta.json").read_text()), "val_fraction": 0.05}
    tr, va = meta["splits"]["train"], meta["splits"]["val"]
    tr["documents"], va["documents"] = 880, 120  # 12%: within chance of 5% for the documents
    tr["tokens"], va["tokens"], tr["longest"], va["longest"] = 72_400, 27_600, 500, 500
    assert ("(val holds 28% of the tokens (12% of the documents), not --val-fraction 0.05: copies of a document "
            "all go to one side, and this data repeats some)") in summary(meta)
    for longest in (5_000, 30_000):  # documents of 5% or 30% of the tokens: chance can put those in val
        va["longest"] = longest
        assert "val holds" not in summary(meta), longest
    del tr["longest"], va["longest"]
    assert "val holds" not in summary(meta)
    tr["tokens"], va["tokens"], tr["longest"], va["longest"] = 94_000, 6_000, 500, 500
    assert "val holds" not in summary(meta)  # 6% of the tokens: as asked, give or take chance


def test_a_tokenizer_retrained_at_the_same_path_is_read_again(tmp_path, corpus_file):
    """A notebook that retrains its tokenizer in place and prepares data again got the new tokenizer's
    hash and vocabulary in meta.json over tokens of the old one."""
    tok = tmp_path / "tok"
    train_tokenizer([corpus_file], tok, vocab_size=300, show_progress=False)
    first = prepare_pretrain([corpus_file], tok, tmp_path / "d1", workers=1, show_progress=False)
    train_tokenizer([corpus_file], tok, vocab_size=512, force=True, show_progress=False)
    again = prepare_pretrain([corpus_file], tok, tmp_path / "d2", workers=1, show_progress=False)
    fresh = subprocess.run([sys.executable, "-c", "import json, sys\nfrom tinyk.data import prepare_pretrain\n"
                            "m = prepare_pretrain([sys.argv[1]], sys.argv[2], sys.argv[3], workers=1, "
                            "show_progress=False)\n"
                            "print(m['splits']['train']['tokens'])", str(corpus_file), str(tok), str(tmp_path / "d3")],
                           capture_output=True, text=True, check=True)
    assert again["splits"]["train"]["tokens"] == int(fresh.stdout) != first["splits"]["train"]["tokens"]


def test_a_val_split_far_beyond_val_fraction_is_explained(pt_data):
    """Copies of a document stay on one side: a corpus that repeats one text can put a fifth of itself
    in val at --val-fraction 0.01, which the closing line now says instead of leaving it to be found."""
    meta = json.loads((pt_data / "meta.json").read_text())
    assert "val holds" not in summary(meta)
    tr, va = meta["splits"]["train"], meta["splits"]["val"]
    va["documents"] = tr["documents"] // 4
    assert f"(val holds {va['documents'] / (tr['documents'] + va['documents']):.0%} of them, not --val-fraction " \
           f"{meta['val_fraction']:g}: copies of a document all go to one " \
           f"side, and this data repeats some)" in summary(meta)


def test_sft_message_content_as_a_list_of_text_parts_reads_as_the_server_reads_it():
    """OpenAI's `content` may be a list of text parts (as `tinyk serve` takes it): joined by newlines, so
    a conversation trains as the same prompt it is served with; an image part is no text to learn from."""
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "猫"}, {"type": "text", "text": "狗"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "Cat, dog"}]}]}
    assert normalize_conversation(parts) == [{"role": "user", "content": "猫\n狗"},
                                             {"role": "assistant", "content": "Cat, dog"}]
    image = {"type": "image_url", "image_url": {"url": "x.png"}}
    assert normalize_conversation({"messages": [{"role": "user", "content": [image]},
                                                *parts["messages"][1:]]}) == "bad_message"


def test_sft_alpaca_records():
    """BelleGroup's train_*_CN sets (and Alpaca's) are instruction / input / output, with history."""
    assert normalize_conversation({"instruction": "翻译成英文", "input": "猫", "output": "Cat"}) == [
        {"role": "user", "content": "翻译成英文\n猫"}, {"role": "assistant", "content": "Cat"}]
    assert normalize_conversation({"instruction": "你好", "input": "", "output": "你好！", "system": "你是小K"}) == [
        {"role": "system", "content": "你是小K"}, {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！"}]
    multi = normalize_conversation({"instruction": "再来一个", "output": "狗", "history": [["说个动物", "猫"]]})
    assert [m["content"] for m in multi] == ["说个动物", "猫", "再来一个", "狗"]
    assert normalize_conversation({"instruction": "你好", "output": 3}) == "bad_message"
    assert normalize_conversation({"instruction": " ", "input": "只有输入", "output": "好"})[0] == \
        {"role": "user", "content": "只有输入"}  # a blank instruction is left out, not a leading empty line
    assert normalize_conversation({"instruction": "你好", "output": "", "input": ""}) == "empty_assistant_turn"
    # A blank answer of its own with a history: the history alone would repeat another record.
    assert normalize_conversation({"instruction": "再来", "output": " ", "history": [["说个动物", "猫"]]}) == \
        "empty_assistant_turn"
    for extra in (0, False, ["猫"]):  # an input that is not text is refused, not read as none
        assert normalize_conversation({"instruction": "翻译", "input": extra, "output": "Cat"}) == "bad_message"


def test_sft_prompt_completion_records(tmp_path, tok_dir):
    """TRL's prompt-completion datasets: text (a question and its answer) or lists of turns, which follow
    each other; `tinyk data sft` reads them as it reads every other format."""
    assert normalize_conversation({"prompt": "天空是什么颜色？", "completion": "蓝色。"}) == [
        {"role": "user", "content": "天空是什么颜色？"}, {"role": "assistant", "content": "蓝色。"}]
    turns = normalize_conversation({"prompt": [{"role": "system", "content": "你是小K"},
                                               {"role": "user", "content": "你好"}],
                                    "completion": [{"role": "assistant", "content": "你好！"}]})
    assert [m["role"] for m in turns] == ["system", "user", "assistant"] and turns[2]["content"] == "你好！"
    assert normalize_conversation({"prompt": "你好", "completion": [{"role": "assistant", "content": "好"}]}) == \
        "bad_message"
    assert normalize_conversation({"prompt": "你好", "completion": " "}) == "empty_assistant_turn"
    src = tmp_path / "trl.jsonl"
    src.write_text(json.dumps({"prompt": "1+1=?", "completion": "2"}) + "\n")
    prepare_sft([src], tok_dir, tmp_path / "d", val_fraction=0, workers=1, show_progress=False)
    (ids, mask), = sft_split(tmp_path / "d")
    check_mask(load_tokenizer(tok_dir), ids, mask, [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
                                                    {"role": "user", "content": "1+1=?"},
                                                    {"role": "assistant", "content": "2"}])


def test_sft_formats_system_prompt_and_mask(tmp_path, tok_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [
        {"conversations": [{"from": "human", "value": "你好"},
                           {"from": "assistant", "value": "你好！有什么可以帮你？"}],
         "id": "belle-1"},
        {"conversations": [{"from": "system", "value": "你是翻译。"}, {"from": "human", "value": "Translate: 猫"},
                           {"from": "gpt", "value": "Cat"}, {"from": "human", "value": "狗"},
                           {"from": "gpt", "value": "Dog"}]},
        {"messages": [{"role": "user", "content": "1+1=?"}, {"role": "assistant", "content": "2"}]},
        [{"role": "system", "content": "你是一个AI助手"}, {"role": "user", "content": "天气"},
         {"role": "assistant", "content": "今天是晴天。"}],
    ]
    expected = [with_system(normalize_conversation(r), DEFAULT_SYSTEM_PROMPT) for r in records]
    assert [m["content"] for m in expected[0]] == [DEFAULT_SYSTEM_PROMPT, "你好", "你好！有什么可以帮你？"]
    assert expected[1][0] == {"role": "system", "content": "你是翻译。"} and len(expected[1]) == 5
    assert [m["role"] for m in expected[2]] == ["system", "user", "assistant"]
    assert expected[3] == records[3]
    src = write_jsonl(tmp_path / "train_3.5M_CN.json", records, field=None)
    meta = prepare_sft([src], tok_dir, tmp_path / "out", val_fraction=0.0, **QUIET)
    tok = load_tokenizer(tok_dir)
    convs = sft_split(tmp_path / "out")
    assert len(convs) == 4 and meta["kind"] == "sft" and meta["max_len"] == 512
    for (ids, mask), messages in zip(convs, expected, strict=True):
        check_mask(tok, ids, mask, messages)
    train = meta["splits"]["train"]
    assert train["loss_tokens"] == sum(int(m.sum()) for _, m in convs)
    assert train["bytes"] == sum(len(m["content"].encode()) for c in expected for m in c if m["role"] == "assistant")
    assert meta["truncated"] == {} and meta["splits"]["val"]["documents"] == 0
    pq.write_table(pa.Table.from_pylist(records[:1]), tmp_path / "belle.parquet")
    prepare_sft([tmp_path / "belle.parquet"], tok_dir, tmp_path / "pq", **QUIET)
    (ids, mask), = sft_split(tmp_path / "pq")
    assert np.array_equal(ids, convs[0][0]) and np.array_equal(mask, convs[0][1])


def test_an_empty_reply_in_a_conversation_carries_no_loss(tmp_path, tok_dir):
    """ShareGPT dumps hold failed generations as empty turns: loss on their <|im_end|> alone would teach
    the model to answer with silence. They stay as context; the other replies are learned as before."""
    msgs = [{"role": "user", "content": "一"}, {"role": "assistant", "content": " \n"},
            {"role": "user", "content": "二"}, {"role": "assistant", "content": "好的"}]
    prepare_sft([write_jsonl(tmp_path / "s.jsonl", [msgs], field=None)], tok_dir, tmp_path / "o", system_prompt="",
                **QUIET)
    (ids, mask), = sft_split(tmp_path / "o")
    tok = load_tokenizer(tok_dir)
    assert tok.decode(ids.tolist()) == ("<|im_start|>user\n一<|im_end|>\n<|im_start|>assistant\n \n<|im_end|>\n"
                                        "<|im_start|>user\n二<|im_end|>\n<|im_start|>assistant\n好的<|im_end|>\n")
    [(a, b)] = mask_spans(mask)
    assert tok.decode(ids[a:b].tolist()) == "好的<|im_end|>"


def test_sft_custom_or_no_system_prompt(tmp_path, tok_dir):
    src = write_jsonl(tmp_path / "s.jsonl",
                      [[{"role": "user", "content": "嗨"}, {"role": "assistant", "content": "嗨！"}]],
                      field=None)
    tok = load_tokenizer(tok_dir)
    for prompt in ("你是小助手", ""):
        prepare_sft([src], tok_dir, tmp_path / f"o{prompt}", system_prompt=prompt, **QUIET)
        (ids, _), = sft_split(tmp_path / f"o{prompt}")
        head = f"<|im_start|>system\n{prompt}<|im_end|>\n" if prompt else ""
        assert tok.decode(ids.tolist()) == head + ("<|im_start|>user\n嗨<|im_end|>\n"
                                                   "<|im_start|>assistant\n嗨！<|im_end|>\n")
    # By default, the prompt the tokenizer directory records: a model fine-tuned with its own keeps it.
    model_like = tmp_path / "model_like"
    shutil.copytree(tok_dir, model_like)
    config = json.loads((model_like / "tokenizer_config.json").read_text(encoding="utf-8"))
    (model_like / "tokenizer_config.json").write_text(json.dumps({**config, "system_prompt": "你是诗人"}))
    for tokenizer, prompt in ((tok_dir, DEFAULT_SYSTEM_PROMPT), (model_like, "你是诗人")):
        meta = prepare_sft([src], tokenizer, tmp_path / f"default-{prompt}", **QUIET)
        (ids, _), = sft_split(tmp_path / f"default-{prompt}")
        assert meta["system_prompt"] == prompt
        assert tok.decode(ids.tolist()).startswith(f"<|im_start|>system\n{prompt}<|im_end|>\n<|im_start|>user")


def test_sft_split_is_the_same_under_another_system_prompt(tmp_path, tok_dir):
    """The prompt added to conversations without one is not their content: changing it keeps every
    conversation's side (a run continued on the new data is not validated on what it trained on)."""
    src = write_jsonl(tmp_path / "s.jsonl", conversations(200), field=None)
    tok = load_tokenizer(tok_dir)

    def val_questions(prompt: str, source: Path = src) -> list[str]:
        out = tmp_path / f"o{prompt}{source.stem}"
        prepare_sft([source], tok_dir, out, system_prompt=prompt, val_fraction=0.1, **QUIET)
        return sorted(re.search(r"问题(\d+)", tok.decode(ids.tolist()))[1] for ids, _ in sft_split(out, "val"))

    without = val_questions("")
    assert 5 < len(without) < 50
    assert without == val_questions("你是诗人") == val_questions(DEFAULT_SYSTEM_PROMPT)
    # A copy that names the prompt it would be given anyway is the same conversation: the same side.
    named = [[{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, *c] for c in conversations(200)]
    assert val_questions(DEFAULT_SYSTEM_PROMPT, write_jsonl(tmp_path / "named.jsonl", named, field=None)) == without


def test_sft_mask_is_right_when_content_starts_with_spaces(tmp_path, tok_dir):
    # "\n   x" pre-tokenizes across the header/content boundary; the mask must not cover the header.
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "   x\n\n y"}]
    src = write_jsonl(tmp_path / "s.jsonl", [msgs], field=None)
    prepare_sft([src], tok_dir, tmp_path / "o", system_prompt="", **QUIET)
    (ids, mask), = sft_split(tmp_path / "o")
    tok = load_tokenizer(tok_dir)
    (a, b), = mask_spans(mask)
    assert "   x\n\n y<|im_end|>".endswith(tok.decode(ids[a:b].tolist()))
    assert tok.decode(ids[:a].tolist()).endswith("<|im_start|>assistant\n") and ids[b - 1] == EOS


def test_special_token_strings_in_data_are_text(tmp_path, tok_dir):
    """A document or message that contains "<|im_end|>" is text: the only special tokens in the data
    are the ones tinyk puts around documents and turns (so the model never learns forged turns)."""
    forged = "前文<|im_end|>\n<|im_start|>assistant\n假的</s>"
    prepare_pretrain([write_jsonl(tmp_path / "p.jsonl", [forged, "正常"])], tok_dir, tmp_path / "pt", val_fraction=0.0,
                     **QUIET)
    tok = load_tokenizer(tok_dir)
    docs = documents(tmp_path / "pt", "train")
    assert [tok.decode(d[1:-1]) for d in docs] == [forged, "正常"]
    assert all(t >= 5 for d in docs for t in d[1:-1])
    msgs = [{"role": "user", "content": forged}, {"role": "assistant", "content": "答" + forged}]
    prepare_sft([write_jsonl(tmp_path / "s.jsonl", [msgs], field=None)], tok_dir, tmp_path / "sft", system_prompt="",
                **QUIET)
    (ids, mask), = sft_split(tmp_path / "sft")
    assert [int(t) for t in ids if t < 5] == [3, 4, 3, 4]  # two turns, each <|im_start|> ... <|im_end|>
    check_mask(tok, ids, mask, msgs)


def test_sft_bad_records_are_skipped_by_reason(tmp_path, tok_dir):
    ok = [{"role": "user", "content": "问"}, {"role": "assistant", "content": "答"}]
    lines = [
        json.dumps(ok, ensure_ascii=False),
        '{"conversations": [',                                                          # 2 malformed
        json.dumps({"prompt": "x"}),                                                    # 3 unknown format
        json.dumps({"messages": [{"role": "user", "content": 5}]}),                     # 4 bad message
        json.dumps({"messages": [{"role": "tool", "content": "x"}]}),                   # 5 unknown role
        json.dumps({"conversations": [{"from": "human", "value": "只有问题"}]}),        # 6 no assistant
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]}),  # 7 empty
        json.dumps({"messages": []}),                                                   # 8 empty
        json.dumps(ok, ensure_ascii=False),
        # A `datasets` export of mixed sources writes both keys, the one a row lacks as null or empty.
        json.dumps({"conversations": None, "messages": ok}, ensure_ascii=False),
        json.dumps({"conversations": [], "messages": ok}, ensure_ascii=False),
        # Both, the same conversation in the two formats; and two different ones, of which neither is taken.
        json.dumps({"conversations": [{"from": "human", "value": "问"}, {"from": "gpt", "value": "答"}],
                    "messages": ok}, ensure_ascii=False),
        json.dumps({"conversations": [{"from": "human", "value": "问"}, {"from": "gpt", "value": "否"}],
                    "messages": ok}, ensure_ascii=False),
    ]
    src = tmp_path / "s.jsonl"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    meta = prepare_sft([src], tok_dir, tmp_path / "o", **QUIET)
    assert meta["skipped"]["by_reason"] == {"malformed_json": 1, "unknown_format": 1, "bad_message": 1,
                                            "unknown_role": 1, "no_assistant_turn": 1, "empty_assistant_turn": 1,
                                            "empty": 1, "two_conversations": 1}
    assert meta["skipped"]["first"]["two_conversations"] == ["s.jsonl:13"]
    assert meta["skipped"]["first"]["no_assistant_turn"] == ["s.jsonl:6"]
    assert meta["skipped"]["first"]["empty_assistant_turn"] == ["s.jsonl:7"]
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 5
    # What exactly was wrong, which the reason alone leaves open on a file of millions of records.
    hints = meta["skipped"]["hints"]
    assert hints["bad_message"] == "a turn's content is a JSON number, not text"
    assert hints["unknown_role"].startswith("role 'tool'; tinyk reads the roles system, developer, human, user")
    assert [read_conversation(r)[1] for r in (
        [{"role": "assistant", "content": None, "tool_calls": []}], [{"role": "user", "content": [{"type": "image"}]}],
        [{"content": "x"}], ["x"], [{"from": "human", "text": "x"}])] == [
        "a turn's content is null (a tool call?)", "a turn's content has a part that is not text (an image?)",
        "a turn without a 'role' (or 'from') string: it has fields 'content'",
        "a turn is a JSON string, not an object with a role and its text",
        "a turn without 'content' (or 'value'): it has fields 'from', 'text'"]
    # Both keys, one of them unusable: the record is skipped for what is wrong with that one.
    assert read_conversation({"conversations": [{"from": "human", "value": "问"}, {"from": "gpt", "value": "答"}],
                              "messages": [{"role": "user", "content": 5}]}) == (
        "bad_message", "in 'messages': a turn's content is a JSON number, not text")
    assert read_conversation({"conversations": [{"from": "human", "value": "问"}], "messages": ok}) == (
        "no_assistant_turn", "in 'conversations': no assistant turn")
    with pytest.raises(TinykError, match="not .txt"):
        prepare_sft([write_jsonl(tmp_path / "t.txt", ["x"])], tok_dir, tmp_path / "o2", **QUIET)
    with pytest.raises(TinykError, match="s.jsonl:2: malformed json"):
        prepare_sft([src], tok_dir, tmp_path / "o3", strict=True, **QUIET)
    assert meta["skipped"]["hints"]["unknown_format"] == (
        "the first such record has fields 'prompt'; an SFT record has 'conversations' or 'messages' (a list of "
        "turns), or 'instruction' and 'output', or 'prompt' and 'completion', or is a list of turns")


def test_data_given_to_the_wrong_command_says_which_one_reads_it(tmp_path, tok_dir):
    text = write_jsonl(tmp_path / "t.jsonl", texts(3))
    chats = write_jsonl(tmp_path / "c.jsonl", [{"conversations": [{"from": "human", "value": "问"},
                                                                  {"from": "gpt", "value": "答"}]}], field=None)
    with pytest.raises(TinykError, match="records of 'text' are pretraining data, which `tinyk data pretrain` reads"):
        prepare_sft([text], tok_dir, tmp_path / "s", **QUIET)
    with pytest.raises(TinykError, match="fields 'conversations'; these are SFT conversations, not text: "
                                         "`tinyk data sft` reads them"):
        prepare_pretrain([chats], tok_dir, tmp_path / "p", **QUIET)


def test_sft_bytes_are_the_bytes_of_the_tokens_that_learn(tmp_path, tok_dir):
    # meta.json's bytes are the denominator of the bits per byte the trainer and `tinyk eval` report
    # on the same split: a cut inside a character (rare ones are several byte tokens) counts the bytes
    # its learning tokens spell, as they do.
    tok = load_tokenizer(tok_dir)
    chat = [{"role": "user", "content": "写"}, {"role": "assistant", "content": "龘𠀋鱻" * 4 + CHINESE}]
    whole = len(tok.encode(render_chat(chat)))
    src = write_jsonl(tmp_path / "s.jsonl", [chat], field=None)
    mid_character = 0
    for max_len in range(whole - 40, whole):
        out = tmp_path / f"o{max_len}"
        meta = prepare_sft([src], tok_dir, out, max_len=max_len, system_prompt="", val_fraction=0.0, **QUIET)
        (ids, mask), = sft_split(out)
        learned = ids[mask == 1].tolist()
        assert meta["splits"]["train"]["bytes"] == sum(tok.token_bytes[i] for i in learned)
        mid_character += tok.ends_mid_character(learned)
    assert mid_character  # the case that was counted short


def test_sft_truncates_at_a_turn_boundary_when_possible(tmp_path, tok_dir):
    tok = load_tokenizer(tok_dir)
    first = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "好的。"}]
    long_answer = [{"role": "user", "content": "写"}, {"role": "assistant", "content": CHINESE * 3}]
    long_prompt = [{"role": "user", "content": CHINESE * 3}, {"role": "assistant", "content": "嗯"}]
    two_turns = first + [{"role": "user", "content": "再说"}, {"role": "assistant", "content": CHINESE * 3}]
    max_len = len(tok.encode(render_chat(first))) + 10
    src = write_jsonl(tmp_path / "s.jsonl", [two_turns, long_answer, long_prompt], field=None)
    meta = prepare_sft([src], tok_dir, tmp_path / "o", max_len=max_len, system_prompt="", val_fraction=0.0, **QUIET)
    assert meta["truncated"] == {"at_turn": 1, "mid_turn": 1}  # the dropped one is only "skipped"
    assert meta["skipped"]["by_reason"] == {"prompt_too_long": 1}
    assert meta["skipped"]["hints"] == {"prompt_too_long": f"no reply begins within --max-len {max_len} tokens; a "
                                                           f"larger --max-len keeps them"}
    (ids0, mask0), (ids1, mask1) = sft_split(tmp_path / "o")
    check_mask(tok, ids0, mask0, first, cut=True)
    assert len(ids1) == max_len and mask1[-1] == 1 and ids1[-1] != EOS
    assert tok.decode(ids1.tolist()).startswith(render_chat(long_answer)[:20])
    assert meta["splits"]["train"]["bytes"] == \
        len("好的。".encode()) + len(tok.decode(ids1[mask_spans(mask1)[0][0]:].tolist()).encode())
    # An empty first reply (a failed generation in a ShareGPT dump) is no turn to end at: the long
    # answer after it is cut mid-turn, not the conversation dropped as "prompt too long".
    empty_first = [first[0], {"role": "assistant", "content": ""}, *long_answer]
    max_len = len(tok.encode(render_chat(empty_first[:3], add_generation_prompt=True))) + 5
    src = write_jsonl(tmp_path / "e.jsonl", [empty_first], field=None)
    meta = prepare_sft([src], tok_dir, tmp_path / "e", max_len=max_len, system_prompt="", val_fraction=0.0, **QUIET)
    assert meta["truncated"] == {"mid_turn": 1} and meta["skipped"]["total"] == 0
    (ids, mask), = sft_split(tmp_path / "e")
    assert len(ids) == max_len and mask[-5:].all() and not mask[:-5].any()  # the empty reply learns nothing
    # One token over --max-len is the newline after the last <|im_end|>: no answer is lost (the whole
    # last reply was, when the cut came before the turn that the newline closes), so none is counted cut.
    max_len = len(tok.encode(render_chat(two_turns))) - 1
    src = write_jsonl(tmp_path / "n.jsonl", [two_turns], field=None)
    meta = prepare_sft([src], tok_dir, tmp_path / "n", max_len=max_len, system_prompt="", val_fraction=0.0, **QUIET)
    assert meta["truncated"] == {}
    (ids, mask), = sft_split(tmp_path / "n")
    check_mask(tok, ids, mask, two_turns, cut=True)


def test_a_huge_message_is_tokenized_only_as_far_as_max_len_reaches(tmp_path, tok_dir, monkeypatch):
    """Only what `--max-len` keeps is tokenized (a 7.6 MB reply took 1.5 GB to encode, and a 15 MB
    conversation of short turns a gigabyte), and cutting the text changes no kept token or mask bit, even
    inside one 60,000-character pre-token, nor which split a conversation goes to or whether it counts as
    cut (a reply after a long question is lost all the same)."""
    from tinyk import data

    convs = [[{"role": "user", "content": "写"}, {"role": "assistant", "content": CHINESE * 400},
              {"role": "user", "content": "再写"}, {"role": "assistant", "content": "好"}],
             [{"role": "user", "content": "啊" * 60_000}, {"role": "assistant", "content": "嗯"}],
             [{"role": "user", "content": "说"}, {"role": "assistant", "content": "啊" * 60_000}],
             [{"role": "user", "content": "写"}, {"role": "assistant", "content": "好"},
              {"role": "user", "content": "啊" * 5_000}, {"role": "assistant", "content": "嗯"}],
             # Conversations alike up to past the cut: their sides are their whole contents' own.
             *([{"role": "user", "content": "说"}, {"role": "assistant", "content": "哦" * 5_000 + str(i)}]
               for i in range(16)),
             [m for i in range(6_000) for m in ({"role": "user", "content": ""},
                                                 {"role": "assistant", "content": f"答{i}"})]]
    src = write_jsonl(tmp_path / "s.jsonl", convs, field=None)
    seen = []
    clipped = data._clipped
    monkeypatch.setattr(data, "_clipped", lambda msgs, *bounds: seen.append(clipped(msgs, *bounds)) or seen[-1])
    meta = prepare_sft([src], tok_dir, tmp_path / "cut", max_len=64, val_fraction=0.5, **QUIET)
    assert max(sum(len(m["content"]) for m in conv) for conv, _ in seen) < 5_000 \
        and len(seen[0][0]) == 2  # the system prompt comes later
    assert max(len(conv) for conv, _ in seen) < 400  # of the 12,000 short (or empty) messages
    assert meta["truncated"] == {"at_turn": 2, "mid_turn": 18} and 0 < meta["splits"]["val"]["documents"] < 17
    monkeypatch.setattr(data, "_clipped", lambda msgs, *bounds: (msgs, None))
    whole = prepare_sft([src], tok_dir, tmp_path / "whole", max_len=64, val_fraction=0.5, **QUIET)
    assert {k: v for k, v in meta.items() if k not in ("command", "seconds")} == \
        {k: v for k, v in whole.items() if k not in ("command", "seconds")}
    for split in ("train", "val"):
        for (ids, mask), (ids2, mask2) in zip(sft_split(tmp_path / "cut", split), sft_split(tmp_path / "whole", split),
                                              strict=True):
            assert np.array_equal(ids, ids2) and np.array_equal(mask, mask2)


# ---------------------------------------------------------------- loaders


@pytest.fixture(scope="module")
def pretrain_dir(tmp_path_factory, tok_dir, corpus_file) -> Path:
    out = tmp_path_factory.mktemp("data") / "pretrain"
    prepare_pretrain([corpus_file], tok_dir, out, val_fraction=0.1, shard_tokens=3000, **QUIET)
    return out


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory, tok_dir) -> Path:
    root = tmp_path_factory.mktemp("sft")
    src = write_jsonl(root / "c.jsonl", conversations(90), field=None)
    prepare_sft([src], tok_dir, root / "sft", val_fraction=0.2, **QUIET)
    return root / "sft"


def rows(batches) -> list[tuple[int, ...]]:
    return [tuple(r) for x, _ in batches for r in x.tolist()]


def test_pretrain_loader_epoch_visits_every_window_once(pretrain_dir):
    seq = 16
    raw = split_tokens(pretrain_dir, "train").astype(np.int64)
    loader = PretrainLoader(pretrain_dir, "train", seq, 1)
    assert loader.num_windows == (len(raw) - 1) // seq \
        and len(open_dataset(pretrain_dir)["splits"]["train"]["shards"]) > 2
    seen = []
    for _ in range(loader.num_windows):
        x, y = loader.next_batch()
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (1, seq)
        assert torch.equal(x[0, 1:], y[0, :-1])
        seen.append(tuple(x[0].tolist()) + (int(y[0, -1]),))
        assert loader.epoch == (0 if len(seen) < loader.num_windows else 1)
    expected = [tuple(raw[w * seq:w * seq + seq + 1].tolist()) for w in range(loader.num_windows)]
    assert Counter(seen) == Counter(expected)  # the corpus repeats itself, so compare multisets
    assert seen[:10] != [tuple(raw[w * seq:w * seq + seq + 1].tolist()) for w in range(10)]  # shuffled


def test_pretrain_loader_ranks_split_each_group_and_resume_exactly(pretrain_dir):
    ref = PretrainLoader(pretrain_dir, "train", 8, 4, seed=3)
    steps = ref.num_windows // 4 + 5  # crosses an epoch boundary
    expected = [ref.next_batch() for _ in range(steps)]
    ranks = [PretrainLoader(pretrain_dir, "train", 8, 2, rank=r, world_size=2, seed=3) for r in (0, 1)]
    for want in expected[:6]:  # rank r gets the r-th half of each global group: disjoint, nothing lost
        got = [rk.next_batch() for rk in ranks]
        assert torch.equal(torch.cat([g[0] for g in got]), want[0]) \
            and torch.equal(torch.cat([g[1] for g in got]), want[1])
    # Resume after 6 groups with a different split of the same global batch (1 rank x 4).
    state = json.loads(json.dumps(ranks[0].state_dict()))
    assert state == ranks[1].state_dict() == {"epoch": 0, "cursor": 24, "num_windows": ref.num_windows, "order": 1,
                                              "seed": 3, "seq_len": 8}
    resumed = PretrainLoader(pretrain_dir, "train", 8, 4, seed=3)
    resumed.load_state_dict(state)
    for want in expected[6:]:
        assert rows([resumed.next_batch()]) == rows([want])
    assert resumed.epoch == ref.epoch == 1
    assert rows(expected[:3]) != rows([PretrainLoader(pretrain_dir, "train", 8, 4, seed=4).next_batch()
                                       for _ in range(3)])
    # Another seed or window length would repeat some windows of the epoch and skip others.
    with pytest.raises(TinykError, match="saved with seq_len 8; resume it with the same seq_len"):
        PretrainLoader(pretrain_dir, "train", 16, 4, seed=3).load_state_dict(state)
    with pytest.raises(TinykError, match="saved with seed 3; resume it with the same seed"):
        PretrainLoader(pretrain_dir, "train", 8, 4, seed=0).load_state_dict(state)
    with pytest.raises(TinykError, match=r"the data or seq_len changed\); resume it with the data and seq_len"):
        PretrainLoader(pretrain_dir, "train", 16, 4).load_state_dict({"epoch": 0, "cursor": 24,
                                                                      "num_windows": ref.num_windows})


def test_a_window_may_span_every_shard(pretrain_dir):
    """A window longer than all the shards before the last starts in the first and ends in the last,
    reading the split's tokens in order."""
    raw = split_tokens(pretrain_dir, "train").astype(np.int64)
    last = open_dataset(pretrain_dir)["splits"]["train"]["shards"][-1]["tokens"]
    for seq in (len(raw) - last, len(raw) - 1):  # just into the last shard; the whole split
        (x, y), = eval_batches(pretrain_dir, "train", seq, 1)
        assert x[0].tolist() == raw[:seq].tolist() and y[0].tolist() == raw[1:seq + 1].tolist()


def test_a_split_a_whole_number_of_windows_long_keeps_a_target_for_its_last_window(pretrain_dir):
    """A window reads seq_len + 1 tokens (the last one only as a target): k * seq_len tokens make k - 1
    windows, all of them readable, and a split of exactly seq_len tokens is refused, not read past its end."""
    raw = split_tokens(pretrain_dir, "train").astype(np.int64)
    seq = next(s for s in range(16, len(raw)) if len(raw) % s == 0)
    batches = list(eval_batches(pretrain_dir, "train", seq, 64))
    x, y = torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])
    assert len(x) == PretrainLoader(pretrain_dir, "train", seq, 1).num_windows == len(raw) // seq - 1
    assert x[-1].tolist() == raw[-2 * seq:-seq].tolist() and y[-1].tolist() == raw[-2 * seq + 1:-seq + 1].tolist()
    val = len(split_tokens(pretrain_dir, "val"))
    with pytest.raises(TinykError, match=rf"has {val} tokens, fewer than seq_len \+ 1 = {val + 1}"):
        PretrainLoader(pretrain_dir, "val", val, 1)


def test_sft_loader_masks_prompts_and_padding(sft_dir):
    meta = open_dataset(sft_dir)
    seq = 96
    loader = SFTLoader(sft_dir, "train", seq, 4, seed=1)
    assert loader.num_windows == meta["splits"]["train"]["documents"] and loader.dropped == 0
    convs = sft_split(sft_dir)
    seen = []
    for _ in range(loader.num_windows // 4):
        x, y = loader.next_batch()
        assert x.shape == y.shape and x.shape[0] == 4 and x.shape[1] <= seq
        longest = 0
        for xr, yr in zip(x.tolist(), y.tolist(), strict=True):
            # Which conversation is this row? Its unpadded prefix identifies it.
            (i, n), = [(i, min(len(t), seq + 1) - 1) for i, (t, _) in enumerate(convs)
                       if t[:min(len(t), seq + 1) - 1].tolist() == xr[:min(len(t), seq + 1) - 1]
                       and set(xr[min(len(t), seq + 1) - 1:]) <= {EOS}]
            ids, mask = convs[i]
            seen.append(i)
            longest = max(longest, n)
            assert xr[n:] == [EOS] * (len(xr) - n) and yr[n:] == [-100] * (len(yr) - n)
            assert yr[:n] == [int(t) if mask[k + 1] else -100 for k, t in enumerate(ids[1:n + 1])]
        # Padded to the longest row, rounded up to PAD_MULTIPLE (fewer distinct shapes), capped at seq.
        assert x.shape[1] == min(seq, -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE)
    assert len(set(seen)) == len(seen) == loader.num_windows // 4 * 4
    width = lambda ld: sum(ld.next_batch()[0].numel() for _ in range(15))  # noqa: E731
    assert width(SFTLoader(sft_dir, "train", seq, 4, seed=1)) \
        < width(SFTLoader(sft_dir, "train", seq, 4, seed=1, bucket=1))
    # Alone in its batch, a conversation of n tokens is n - 1 inputs: those fill whole blocks with no padding.
    lengths = loader.data.lengths.tolist()
    assert any(n - 1 < seq and (n - 1) % PAD_MULTIPLE == 0 for n in lengths)
    assert [x.shape[1] for x, _ in eval_batches(sft_dir, "train", seq, 1)] == \
        [min(seq, -(-(n - 1) // PAD_MULTIPLE) * PAD_MULTIPLE) for n in lengths]


def test_sft_batches_come_in_random_order_not_short_to_long(sft_dir):
    """Length-sorted buckets pad little, but stepping through them in order would feed every bucket
    short to long (correlated gradients, a sawtooth loss): the steps themselves are shuffled."""
    loader = SFTLoader(sft_dir, "train", 96, 2, seed=3, bucket=10**6, batch_size=4)
    n = loader.num_windows
    lengths = loader.data.lengths
    for epoch in range(3):
        order = loader._epoch_order(epoch)
        assert sorted(order.tolist()) == list(range(n))  # each conversation once per epoch
        head = -epoch * n % 4
        steps = order[head:head + (n - head) // 4 * 4].reshape(-1, 4)
        widths = lengths[steps].max(axis=1)
        assert (np.diff(widths) < 0).any(), "steps should not run short to long"
        # Each step is a run of the length-sorted order, so it pads as little as before: put back in
        # order, the steps' lengths are sorted again.
        back = steps[np.lexsort((lengths[steps[:, -1]], lengths[steps[:, 0]]))]
        assert (np.diff(lengths[back.ravel()]) >= 0).all()


def test_sft_steps_stay_length_sorted_runs_across_epochs_when_the_batch_does_not_divide_the_split(sft_dir):
    """An epoch's first samples finish the step the last epoch began, so every later step of the run is
    still one run of the length-sorted order (it pads little), whatever the batch size."""
    batch = 3
    loader = SFTLoader(sft_dir, "train", 96, 1, seed=3, bucket=10**6, batch_size=batch)
    n, lengths = loader.num_windows, loader.data.lengths
    assert n % batch, "the batch size must not divide the split"
    stream = np.concatenate([loader._epoch_order(epoch) for epoch in range(3)])
    steps = stream[:len(stream) // batch * batch].reshape(-1, batch)
    straddling = {epoch * n // batch for epoch in (1, 2)}  # the step an epoch ends in and the next finishes
    for i, step in enumerate(steps):
        if i not in straddling:
            assert (np.diff(lengths[step]) >= 0).all(), (i, lengths[step])


def test_a_position_in_an_order_this_tinyk_no_longer_makes_is_refused(sft_dir, pretrain_dir):
    """An SFT checkpoint from before steps were shuffled whole (2026-12-02) resumed at its cursor in the
    new order: 72 of its first 80 conversations came round again that epoch and 72 were never seen."""
    sft = SFTLoader(sft_dir, "train", 64, 2, seed=2, batch_size=4)
    for _ in range(3):
        sft.next_batch()
    state = sft.state_dict()
    assert state["order"] == 2
    before_order = {k: v for k, v in state.items() if k != "order"}
    SFTLoader(sft_dir, "train", 64, 2, seed=2, batch_size=4).load_state_dict(before_order)  # batch_size came with 2
    first_order = {k: v for k, v in before_order.items() if k != "batch_size"}
    with pytest.raises(ResumeMismatch, match="^this run was saved by an older tinyk, which put the samples in "
                                             "another order: resuming where it stopped would repeat some"):
        SFTLoader(sft_dir, "train", 64, 2, seed=2, batch_size=4).load_state_dict(first_order)
    with pytest.raises(ResumeMismatch, match="older tinyk"):
        SFTLoader(sft_dir, "train", 64, 2, seed=2, batch_size=4).load_state_dict({**state, "order": 3})
    pretrain = PretrainLoader(pretrain_dir, "train", 8, 4)  # its order has not changed: no record needed
    pretrain.load_state_dict({"epoch": 0, "cursor": 4, "num_windows": pretrain.num_windows})
    assert pretrain.state_dict()["cursor"] == 4


def test_sft_loader_resumes_and_drops_conversations_without_loss(sft_dir):
    ref = SFTLoader(sft_dir, "train", 64, 6, seed=2)
    expected = [ref.next_batch() for _ in range(30)]
    other = SFTLoader(sft_dir, "train", 64, 3, rank=1, world_size=2, seed=2)
    [other.next_batch() for _ in range(10)]
    resumed = SFTLoader(sft_dir, "train", 64, 6, seed=2)
    resumed.load_state_dict(other.state_dict())
    for want in expected[10:]:
        got = resumed.next_batch()
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    short = SFTLoader(sft_dir, "train", 56, 2)
    assert short.dropped > 0 and short.num_windows + short.dropped == ref.num_windows
    for _ in range(short.num_windows):
        x, y = short.next_batch()
        assert x.shape[1] <= 56 and bool((y != -100).any(dim=1).all())
    with pytest.raises(TinykError, match="no conversation .* assistant token"):
        SFTLoader(sft_dir, "train", 20, 2)


def test_eval_batches_are_sequential_and_sharded(pretrain_dir, sft_dir):
    seq = 32
    raw = split_tokens(pretrain_dir, "val").astype(np.int64)
    n = (len(raw) - 1) // seq
    whole = rows(eval_batches(pretrain_dir, "val", seq, 3))
    assert whole == [tuple(raw[w * seq:w * seq + seq].tolist()) for w in range(n)]
    shards = [list(eval_batches(pretrain_dir, "val", seq, 2, rank=r, world_size=2)) for r in (0, 1)]
    interleaved = [r for a, b in zip(shards[0], shards[1] + [(torch.empty(0, seq), None)], strict=False)
                   for r in rows([a]) + rows([b])]
    assert sorted(interleaved) == sorted(whole) and len(interleaved) == n
    assert len(list(eval_batches(pretrain_dir, "val", seq, 2, max_batches=2, rank=1, world_size=2))) == 2
    sft = list(eval_batches(sft_dir, "val", 64, 4))
    assert sum(len(x) for x, _ in sft) == open_dataset(sft_dir)["splits"]["val"]["documents"]
    assert all(bool((y != -100).any(dim=1).all()) for _, y in sft)
    assert rows(sft) == rows(eval_batches(sft_dir, "val", 64, 4))


def test_loaders_refuse_missing_or_damaged_data(tmp_path, pretrain_dir, sft_dir):
    with pytest.raises(TinykError, match="not found"):
        open_dataset(tmp_path / "nope")
    with pytest.raises(TinykError, match="no meta.json"):
        open_dataset(tmp_path)
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(TinykError, match="invalid"):
        open_dataset(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({"kind": "pretrain", "format_version": 2}))
    with pytest.raises(TinykError, match="format_version"):
        open_dataset(tmp_path)
    with pytest.raises(TinykError, match="holds sft data, not pretrain"):
        PretrainLoader(sft_dir, "train", 16, 2)
    with pytest.raises(TinykError, match="unknown split"):
        SFTLoader(sft_dir, "test", 16, 2)
    with pytest.raises(TinykError, match=rf"^the val split of {re.escape(str(pretrain_dir))} has \d+ tokens, fewer "
                                          rf"than seq_len \+ 1 = 1000001 \(--seq-len \d+ or less fits\)$"):
        PretrainLoader(pretrain_dir, "val", 10**6, 2)
    with pytest.raises(TinykError, match="rank 2 is outside"):
        PretrainLoader(pretrain_dir, "train", 16, 2, rank=2, world_size=2)
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in pretrain_dir.rglob("*"):
        if f.is_file():
            (broken / f.relative_to(pretrain_dir)).parent.mkdir(exist_ok=True)
            (broken / f.relative_to(pretrain_dir)).write_bytes(f.read_bytes())
    shard = broken / "train" / "shard_00000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(TinykError, match="shard_00000.bin is missing or not"):
        PretrainLoader(broken, "train", 16, 2)


def test_data_commands_never_load_torch(tmp_path, pt_data, corpus_file, tok_dir):
    """Describing, verifying or (re)making a dataset needs no tensors: importing torch was 1.5 s of every
    `data info`, and of a `--force` over existing data."""
    code = ("import sys\nfrom tinyk.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    assert not e.code, e.code\nprint('torch' in sys.modules)")
    out = shutil.copytree(pt_data, tmp_path / "data")
    for command in (["info", str(pt_data), "--verify"],
                    ["pretrain", "--input", str(corpus_file), "--tokenizer", str(tok_dir), "--out", str(out),
                     "--force", "--workers", "1"]):
        r = subprocess.run([sys.executable, "-c", code, "data", *command], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0 and r.stdout.splitlines()[-1] == "False", (command, r.stderr)


@pytest.mark.parametrize("name", ["../../outside.bin", "/tmp/shard_00000.bin", "sub/shard_00000.bin", ".."])
def test_a_meta_json_naming_a_shard_outside_its_folder_is_refused(tmp_path, pt_data, capsys, name):
    """A damaged or tampered meta.json: no file outside the data directory is read, or vouched for by data info."""
    data = Path(shutil.copytree(pt_data, tmp_path / "data"))
    meta = json.loads((data / "meta.json").read_text())
    meta["splits"]["train"]["shards"][0]["file"] = name
    (data / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(SystemExit) as e:
        main(["data", "info", str(data)])
    assert e.value.code == 2 and capsys.readouterr().err == (
        f"tinyk: error: invalid {data / 'meta.json'}: split 'train' names a shard {name!r} outside its folder\n")


def test_more_shards_than_the_open_file_limit_are_opened_or_refused_in_one_line(pretrain_dir, monkeypatch):
    """Each memory-mapped shard keeps a file open: the soft limit is raised as far as the hard one allows
    (on macOS an unlimited hard limit still ends at the kernel's, where setrlimit raised a traceback)."""
    import resource

    from tinyk.loader import _room_to_open

    script = (
        "import os, resource, sys\n"
        "from tinyk.errors import TinykError\n"
        "from tinyk.loader import PretrainLoader\n"
        "now = len(os.listdir('/proc/self/fd'))\n"
        "hard = now + 1 if sys.argv[2] == 'low' else resource.getrlimit(resource.RLIMIT_NOFILE)[1]\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (now + 1, hard))\n"
        "try:\n"
        "    PretrainLoader(sys.argv[1], 'train', 16, 2)\n"
        "except TinykError as e:\n"
        "    sys.exit(str(e))\n"
        "print('opened')\n")
    for hard, want in (("as it is", "opened\n"), ("low", "")):
        r = subprocess.run([sys.executable, "-c", script, str(pretrain_dir), hard], capture_output=True, text=True,
                           timeout=60)
        assert r.stdout == want, r.stderr[-1000:]
    n = len(json.loads((pretrain_dir / "meta.json").read_text())["splits"]["train"]["shards"])
    said = (rf"{re.escape(str(pretrain_dir / 'train'))} has {n:,} shard files, more than this process may keep open "
            r"\({}\); raise that limit, or remake the data with a larger --shard-tokens")
    assert r.returncode == 1 and re.fullmatch(said.format(r"ulimit -n allows \d+") + "\n", r.stderr)

    def kernel_limit(what, limits):
        raise ValueError("current limit exceeds maximum limit")

    monkeypatch.setattr(resource, "getrlimit", lambda what: (64, resource.RLIM_INFINITY))
    monkeypatch.setattr(resource, "setrlimit", kernel_limit)
    with pytest.raises(TinykError, match="^" + said.format("the system's limit per process") + "$"):
        _room_to_open(n, pretrain_dir / "train")


def test_data_info_verify_finds_a_changed_byte_that_sizes_miss(tmp_path, pt_data, sft_data, capsys):
    """meta.json records each file's SHA-256; --verify reads the files again and compares."""
    from tinyk.data import data_files

    for kind, src in (("pretrain", pt_data), ("sft", sft_data)):
        data = Path(shutil.copytree(src, tmp_path / kind))
        meta = json.loads((data / "meta.json").read_text())
        names = data_files(meta)
        assert sorted(meta["sha256"]) == sorted(names) and len(names) >= 2
        with pytest.raises(SystemExit) as e:
            main(["data", "info", str(data), "--verify"])
        assert e.value.code == 0 and capsys.readouterr().out.endswith(
            f"  checksums: all {len(names)} files match the SHA-256 meta.json recorded\n")
        victim = data / names[0]  # the train split's first tokens
        raw = bytearray(victim.read_bytes())
        raw[0] ^= 1  # one token id off by one, the size the same: only the checksum tells
        victim.write_bytes(bytes(raw))
        with pytest.raises(SystemExit) as e:
            main(["data", "info", str(data)])
        assert e.value.code == 0
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main(["data", "info", str(data), "--verify"])
        assert e.value.code == 2 and capsys.readouterr().err == (
            f"tinyk: error: 1 of {len(names)} files in {data} differ from the checksums meta.json recorded "
            f"({names[0]}): damaged or changed since; make the data again\n")
    for recorded, says in ((None, "records no checksums to verify against (the data was made by a tinyk from before "
                                  "2026-12-04); training still checks its sizes and token ids, and data made again "
                                  "records them"),
                           ({}, "invalid {meta}: its checksums do not list the files it describes")):
        meta["sha256"] = recorded
        (data / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if v is not None}))
        with pytest.raises(SystemExit) as e:
            main(["data", "info", str(data), "--verify"])
        where = data / "meta.json"
        assert e.value.code == 2 and capsys.readouterr().err == (
            f"tinyk: error: {says.format(meta=where)}\n" if recorded == {} else f"tinyk: error: {where} {says}\n")


# ---------------------------------------------------------------- CLI


def test_cli_prepares_data_and_reports_a_summary(tmp_path, tok_dir, corpus_file, capsys):
    with pytest.raises(SystemExit) as e:
        main(["data", "pretrain", "--input", str(corpus_file), "--tokenizer", str(tok_dir), "--out",
              str(tmp_path / "p"), "--workers", "1", "--shard-tokens", "5k"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "pretrain data: 400 documents" in out and "skipped 0 records" in out and "MB/s" in out
    assert open_dataset(tmp_path / "p")["splits"]["train"]["shards"][0]["tokens"] == 5000
    first = write_jsonl(tmp_path / "first.jsonl", conversations(3), field=None)
    src = write_jsonl(tmp_path / "s.jsonl", [*conversations(2), {"oops": 1}], field=None)
    with pytest.raises(SystemExit) as e:  # a repeated --input adds files, like one --input with several
        main(["data", "sft", "--input", str(first), "--input", str(src), "--tokenizer", str(tok_dir), "--out",
              str(tmp_path / "s"), "--workers", "1", "--system-prompt", "", "--max-len", "40"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "sft data: 5 conversations" in out and "unknown format: 1 (first at s.jsonl:3; the first such record " \
        "has fields 'oops'" in out
    assert "--max-len 40" in out
    with pytest.raises(SystemExit) as e:
        main(["data", "info", str(tmp_path / "s")])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "sft data: 5 conversations" in out
    assert f"  input {first} (0.0 MB)\n  input {src} (0.0 MB)\n  made by tinyk data sft --input" in out
    # A damaged directory is one line: a meta.json edited wrong, a shard cut short.
    meta_file = tmp_path / "s" / "meta.json"
    good = meta_file.read_text()
    for damage in ({"max_len": None}, {"skipped": 5}, {"vocab_size": "6144"}, {"seconds": "12"},
                   {"inputs": [{"path": "a.jsonl"}]}, {"command": ["tinyk"]},
                   {"splits": {**json.loads(good)["splits"], "val": {"documents": "x"}}},
                   # what the summary reads (each was a traceback)
                   {"val_fraction": []}, {"val_fraction": 1}, {"truncated": "x"}, {"truncated": {"at_turn": None}},
                   {"skipped": {"by_reason": [None]}}, {"skipped": {"by_reason": 1.5}},
                   {"skipped": {"by_reason": {"unknown_format": 1}, "first": {}}}):
        meta_file.write_text(json.dumps({**json.loads(good), **damage}))
        with pytest.raises(SystemExit) as e:
            main(["data", "info", str(tmp_path / "s")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith(f"tinyk: error: invalid {meta_file}: ") and err.count("\n") == 1
    meta_file.write_text(good)
    mask = tmp_path / "s" / "train" / "mask.bin"
    mask.write_bytes(mask.read_bytes()[:-1])
    with pytest.raises(SystemExit) as e:
        main(["data", "info", str(tmp_path / "s")])
    assert e.value.code == 2 and f"{mask} is missing or not" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["data", "sft", "--input", str(src), "--tokenizer", str(tok_dir), "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "--force" in err


def test_a_script_without_the_main_guard_runs_once(tmp_path, corpus_file, tok_dir):
    """Spawned workers used to run the calling script first: without `if __name__ == "__main__":`
    each re-ran its side effects and started workers of its own, which failed and were restarted forever."""
    script = tmp_path / "prepare.py"
    script.write_text(
        "import sys\n"
        "from pathlib import Path\n"
        "from tinyk.data import prepare_pretrain\n"
        "with open(Path(__file__).with_name('ran.txt'), 'a') as f:\n"
        "    f.write('ran\\n')\n"
        "prepare_pretrain([sys.argv[1]], sys.argv[2], sys.argv[3], workers=2, batch_chars=2000, show_progress=False)\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    r = subprocess.run([sys.executable, str(script), str(corpus_file), str(tok_dir), str(tmp_path / "d")], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "ran.txt").read_text() == "ran\n"
    assert (tmp_path / "d" / "meta.json").is_file()


def test_a_conversation_whose_only_answer_token_in_the_window_is_its_last_is_kept(tmp_path, tok_dir):
    """The last of the seq_len + 1 tokens is a target: a conversation learning only there is trained, not dropped."""
    msgs = [{"role": "user", "content": "问题"}, {"role": "assistant", "content": "回答很长的一句话。"}]
    prepare_sft([write_jsonl(tmp_path / "s.jsonl", [msgs], field=None)], tok_dir, tmp_path / "o", system_prompt="",
                val_fraction=0.0, **QUIET)
    (ids, mask), = sft_split(tmp_path / "o")
    first = int(np.flatnonzero(mask)[0])
    loader = SFTLoader(tmp_path / "o", "train", first, 1)  # the window is ids[:first + 1]
    assert (loader.num_windows, loader.dropped) == (1, 0)
    _, y = loader.next_batch()
    assert np.flatnonzero(y[0].numpy() != -100).tolist() == [first - 1] and int(y[0, first - 1]) == ids[first]
    # A window that loses only the closing <|im_end|> (the token just past it) is a cut answer.
    last = int(np.flatnonzero(mask)[-1])
    assert SFTLoader(tmp_path / "o", "train", last - 1, 1).cut == 1
    assert SFTLoader(tmp_path / "o", "train", last, 1).cut == 0


def test_checkpoints_change_no_output_even_of_a_tiny_corpus(tmp_path, tok_dir):
    """Saving a checkpoint (due after every batch here) must not route the held-back last document: a
    tiny corpus still gets both splits, as a run that never checkpointed gives it."""
    for n in (2, 5):
        src = write_jsonl(tmp_path / f"c{n}.jsonl", texts(n))
        never = prepare_pretrain([src], tok_dir, tmp_path / f"never{n}", batch_chars=1, **QUIET)
        prepare_pretrain([src], tok_dir, tmp_path / f"always{n}", batch_chars=1, checkpoint_s=0, **QUIET)
        assert never["splits"]["val"]["documents"] == 1
        _same_data(tmp_path / f"always{n}", tmp_path / f"never{n}")


def test_a_bad_byte_ending_a_line_mid_file_is_invalid_utf8_not_a_cut_file(tmp_path):
    src = tmp_path / "t.txt"
    src.write_bytes("好\n".encode() + b"ab\xe4\n" + "好\n".encode())
    skips = Skips()
    assert list(iter_texts([src], skips)) == ["好", "好"] and skips.counts == {"invalid_utf8": 1}
    src.write_bytes("好\n".encode() + b"ab\xe4")  # the file itself ends inside a character
    skips = Skips()
    assert list(iter_texts([src], skips)) == ["好"] and skips.counts == {"cut_character": 1}


def test_the_tokenizer_hash_covers_its_normalizer(tmp_path, tok_dir):
    """Data made with one tokenizer must not pass for another's that reads text differently."""
    other = shutil.copytree(tok_dir, tmp_path / "nfkc")
    d = json.loads((other / "tokenizer.json").read_text(encoding="utf-8"))
    (other / "tokenizer.json").write_text(json.dumps({**d, "normalizer": {"type": "NFKC"}}), encoding="utf-8")
    assert tokenizer_hash(other) != tokenizer_hash(tok_dir)


def test_a_stopped_run_is_not_continued_under_strict(tmp_path, tok_dir, monkeypatch, capsys):
    """--strict promises no record was skipped: a run that skipped some before it stopped starts over."""
    src, prep = _stoppable_inputs(tmp_path, "pretrain")  # its first bad line is line 4
    opts = {"val_fraction": 0.2, "batch_chars": 300, "workers": 1}
    with monkeypatch.context() as m:
        _stop_during_batch(m, 5)
        with pytest.raises(KeyboardInterrupt):
            prep([src], tok_dir, tmp_path / "out", **opts)
    with pytest.raises(TinykError, match=r"^pretrain.jsonl:4: malformed json \(--strict\)$"):
        prep([src], tok_dir, tmp_path / "out", strict=True, **opts)
    assert "starting over" in capsys.readouterr().err


def test_each_epoch_visits_the_windows_in_a_new_order(pretrain_dir):
    loader = PretrainLoader(pretrain_dir, "train", 16, 1)
    epochs = [[tuple(loader.next_batch()[0][0].tolist()) for _ in range(loader.num_windows)] for _ in range(2)]
    assert Counter(epochs[0]) == Counter(epochs[1]) and epochs[0] != epochs[1]


def test_a_position_past_the_epoch_is_refused_not_looped_on(pretrain_dir):
    loader = PretrainLoader(pretrain_dir, "train", 16, 2)
    state = {**loader.state_dict(), "cursor": loader.num_windows}
    with pytest.raises(ValueError, match=f"its data loader is at epoch 0, window {loader.num_windows:,} of "
                                         f"{loader.num_windows:,}"):
        loader.load_state_dict(state)


@pytest.mark.parametrize("data", ["pt_data", "sft_data"])
def test_a_token_id_at_the_vocabulary_size_is_one_line_not_an_embedding_crash(tmp_path, request, data):
    copy = Path(shutil.copytree(request.getfixturevalue(data), tmp_path / "d"))
    meta = open_dataset(copy)
    f = copy / "train" / ("tokens.bin" if meta["kind"] == "sft" else meta["splits"]["train"]["shards"][0]["file"])
    ids = np.fromfile(f, meta["dtype"])
    ids[0] = meta["vocab_size"]  # the first id past the embedding
    ids.tofile(f)
    with pytest.raises(TinykError, match=rf"holds token id {meta['vocab_size']}, past the tokenizer's vocabulary"):
        list(eval_batches(copy, "train", 128, 64))


def test_eval_counts_the_documents_that_do_not_round_trip(tmp_path, corpus_file):
    nfkc = tmp_path / "nfkc"
    train_tokenizer([corpus_file], nfkc, vocab_size=300, normalization="nfkc", show_progress=False)
    docs = ["ＡＢＣ全角", "半角 abc", "（１２）", "普通文本。"]
    src = write_jsonl(tmp_path / "d.jsonl", docs)
    r = eval_tokenizer(nfkc, [src])
    assert r["documents"] == 4 and r["roundtrip_failures"] == sum(unicodedata.normalize("NFKC", d) != d for d in docs)
    assert r["builtin_samples"] == 3 and r["builtin_failures"] == 2  # the two with full-width ？, checked beside them


def test_the_recorded_command_makes_the_same_data(tmp_path, tok_dir, corpus_file):
    meta = prepare_pretrain([corpus_file], tok_dir, tmp_path / "a", val_fraction=0.3, seed=5, shard_tokens=2000,
                            **QUIET)
    argv = shlex.split(meta["command"])[1:]
    argv[argv.index("--out") + 1] = str(tmp_path / "b")
    with pytest.raises(SystemExit) as e:
        main([*argv, "--workers", "1"])
    assert e.value.code == 0
    _same_data(tmp_path / "a", tmp_path / "b")


def test_a_skip_report_locates_the_first_five_of_each_reason(tmp_path, tok_dir):
    src = tmp_path / "c.jsonl"
    src.write_text("{bad\n" * 7 + json.dumps({"text": "好的"}, ensure_ascii=False) + "\n", encoding="utf-8")
    sk = prepare_pretrain([src], tok_dir, tmp_path / "o", **QUIET)["skipped"]
    assert sk["by_reason"] == {"malformed_json": 7}
    assert sk["first"]["malformed_json"] == [f"c.jsonl:{i}" for i in range(1, 6)]


@pytest.mark.parametrize("speaker, role", [("human", "user"), ("user", "user"), ("gpt", "assistant"),
                                           ("bot", "assistant"), ("chatgpt", "assistant"), ("assistant", "assistant"),
                                           ("Assistant", "assistant")])
def test_every_speaker_name_reads_as_its_role(speaker, role):
    other = "assistant" if role == "user" else "user"
    conv = normalize_conversation({"conversations": [{"from": speaker, "value": "甲"}, {"from": other, "value": "乙"}]})
    assert [m["role"] for m in conv] == [role, other]


def test_max_len_is_refused_below_8_and_when_the_system_prompt_fills_it(tmp_path, tok_dir):
    chat = [{"role": "user", "content": "嗨"}, {"role": "assistant", "content": "嗨！"}]
    src = write_jsonl(tmp_path / "s.jsonl", [chat], field=None)
    with pytest.raises(TinykError, match=r"^--max-len must be at least 8 tokens, got 4$"):
        prepare_sft([src], tok_dir, tmp_path / "a", max_len=4, system_prompt="", **QUIET)
    opening = load_tokenizer(tok_dir).opening_tokens("你是诗人")
    with pytest.raises(TinykError, match=rf"--system-prompt is too long for --max-len {opening}: "):
        prepare_sft([src], tok_dir, tmp_path / "b", max_len=opening, system_prompt="你是诗人", **QUIET)


def test_data_stored_as_uint32_reads_as_the_same_tokens(tmp_path, pretrain_dir):
    copy = Path(shutil.copytree(pretrain_dir, tmp_path / "d"))
    meta = json.loads((copy / "meta.json").read_text())
    for split in ("train", "val"):
        for s in meta["splits"][split]["shards"]:
            f = copy / split / s["file"]
            np.fromfile(f, meta["dtype"]).astype(np.uint32).tofile(f)
    (copy / "meta.json").write_text(json.dumps({**meta, "dtype": "uint32"}))
    assert rows(eval_batches(copy, "val", 32, 4)) == rows(eval_batches(pretrain_dir, "val", 32, 4))


@pytest.mark.parametrize("damage", ["tokens", "documents", "tokenizer_hash", "vocab_size", "hints", "seconds"])
def test_a_meta_json_value_of_the_wrong_kind_is_one_line(tmp_path, sft_data, capsys, damage):
    data = Path(shutil.copytree(sft_data, tmp_path / "d"))
    meta = json.loads((data / "meta.json").read_text())
    if damage in ("tokens", "documents"):  # every key is there, one of them not a count
        meta["splits"]["train"][damage] = {"tokens": "12", "documents": 1.5}[damage]
    else:
        meta.update({"tokenizer_hash": {"tokenizer_hash": None}, "vocab_size": {"vocab_size": True},
                     "hints": {"skipped": {**meta["skipped"], "hints": {"bad_json": 1}}},
                     "seconds": {"seconds": -3.0}}[damage])
    (data / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(SystemExit) as e:
        main(["data", "info", str(data)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"tinyk: error: invalid {data / 'meta.json'}: ") \
        and err.count("\n") == 1, err


def test_an_empty_shard_in_meta_json_is_one_line(tmp_path, pt_data, capsys):
    data = Path(shutil.copytree(pt_data, tmp_path / "d"))
    meta = json.loads((data / "meta.json").read_text())
    meta["splits"]["train"]["shards"].append({"file": "shard_00099.bin", "tokens": 0})
    (data / "meta.json").write_text(json.dumps(meta))
    (data / "train" / "shard_00099.bin").touch()  # numpy cannot map an empty file: it was a traceback
    with pytest.raises(SystemExit) as e:
        main(["data", "info", str(data)])
    assert e.value.code == 2 and capsys.readouterr().err == (
        f"tinyk: error: invalid {data / 'meta.json'}: split 'train' lists an empty shard\n")


def test_a_shard_longer_than_meta_json_says_is_refused(tmp_path, pretrain_dir):
    copy = Path(shutil.copytree(pretrain_dir, tmp_path / "d"))
    shard = copy / "train" / "shard_00000.bin"
    shard.write_bytes(shard.read_bytes() + b"\0\0")
    with pytest.raises(TinykError, match=r"shard_00000.bin is missing or not \d+ bytes as meta.json says "
                                         r"\(re-run tinyk data\)$"):
        PretrainLoader(copy, "train", 16, 2)


def test_data_info_verify_names_each_changed_file(tmp_path, pt_data, capsys):
    from tinyk.data import data_files

    data = Path(shutil.copytree(pt_data, tmp_path / "d"))
    names = data_files(json.loads((data / "meta.json").read_text()))
    assert len(names) >= 2
    for name in names[:2]:
        raw = bytearray((data / name).read_bytes())
        raw[0] ^= 1
        (data / name).write_bytes(bytes(raw))
    with pytest.raises(SystemExit) as e:
        main(["data", "info", str(data), "--verify"])
    assert e.value.code == 2 and capsys.readouterr().err == (
        f"tinyk: error: 2 of {len(names)} files in {data} differ from the checksums meta.json recorded "
        f"({names[0]}, {names[1]}): damaged or changed since; make the data again\n")


def test_a_target_id_past_the_vocabulary_is_one_line_too(tmp_path, sft_dir):
    copy = Path(shutil.copytree(sft_dir, tmp_path / "d"))
    meta = open_dataset(copy)
    first_end = int(np.load(copy / "train" / "offsets.npy")[1])
    mask = np.fromfile(copy / "train" / "mask.bin", np.uint8)
    last = next(k for k in range(first_end - 1, 0, -1) if mask[k])  # the first conversation's last loss token
    ids = np.fromfile(copy / "train" / "tokens.bin", meta["dtype"])
    ids[last] = meta["vocab_size"]
    ids.tofile(copy / "train" / "tokens.bin")
    # A window of last + 1 tokens: the damaged one ends it, so it is a target and never an input.
    with pytest.raises(TinykError, match=rf"holds token id {meta['vocab_size']}, past the tokenizer's vocabulary"):
        list(eval_batches(copy, "train", last, 64))


def test_a_zero_seq_len_or_micro_batch_or_a_rank_outside_the_world_is_one_line(pretrain_dir, sft_dir):
    with pytest.raises(TinykError, match="^seq_len must be positive, got 0$"):
        PretrainLoader(pretrain_dir, "train", 0, 2)
    with pytest.raises(TinykError, match="^micro_batch must be positive, got 0$"):
        SFTLoader(sft_dir, "train", 64, 0)
    with pytest.raises(TinykError, match="^micro_batch must be positive, got 0$"):
        eval_batches(sft_dir, "val", 64, 0)
    with pytest.raises(TinykError, match="^rank 2 is outside world size 2$"):
        eval_batches(pretrain_dir, "val", 16, 2, rank=2, world_size=2)


def test_a_negative_epoch_is_refused(pretrain_dir):
    loader = PretrainLoader(pretrain_dir, "train", 16, 2)
    with pytest.raises(ValueError, match="its data loader is at epoch -1, window 0 of "):
        loader.load_state_dict({**loader.state_dict(), "epoch": -1})


def test_a_split_too_short_names_the_longest_seq_len_that_fits(pretrain_dir):
    val = len(split_tokens(pretrain_dir, "val"))
    with pytest.raises(TinykError, match=rf"\(--seq-len {val - 1} or less fits\)$"):
        PretrainLoader(pretrain_dir, "val", val, 1)
    assert PretrainLoader(pretrain_dir, "val", val - 1, 1).num_windows == 1  # and it does fit


# a document exactly PIECE_CHARS long is tokenized (it is neither "short" nor
# "long" if one of the two bounds is off by one, and the whole run dies on a None).
def test_a_document_exactly_piece_chars_long_is_tokenized_whole(tmp_path, tok_dir, monkeypatch):
    from tinyk import data

    monkeypatch.setattr(data, "PIECE_CHARS", 100)
    doc = (CHINESE * 3)[:100]
    docs_in = [doc[:99], doc, doc + "好"]
    src = write_jsonl(tmp_path / "c.jsonl", docs_in)
    prepare_pretrain([src], tok_dir, tmp_path / "o", val_fraction=0, **QUIET)
    plain = load_tokenizer(tok_dir).plain
    assert documents(tmp_path / "o", "train") == [[BOS, *plain.encode(d, add_special_tokens=False).ids, EOS]
                                                  for d in docs_in]


# a history entry that is not a [question, answer] pair is a bad message (skipped and
# counted), not a ValueError that ends the whole `tinyk data sft` run with a traceback.
def test_an_alpaca_history_entry_that_is_not_a_pair_is_a_bad_message():
    for history in ([["说个动物", "猫", "狗"]], [["只有问题"]], [[]]):
        assert normalize_conversation({"instruction": "再来", "output": "狗", "history": history}) == "bad_message"


# a blank top-level "system" (a `datasets` export writes "" for rows without one)
# is no system prompt: no empty system turn, so --system-prompt is still added to the conversation.
def test_a_blank_top_level_system_field_is_no_system_prompt():
    turns = [{"from": "human", "value": "猫"}, {"from": "gpt", "value": "Cat"}]
    for system in ("", " \n"):
        for rec in ({"system": system, "conversations": turns},
                    {"system": system, "instruction": "猫", "output": "Cat"}):
            assert normalize_conversation(rec) == [{"role": "user", "content": "猫"},
                                                   {"role": "assistant", "content": "Cat"}], (system, rec)


# a finished SFT directory holds only
# meta.json and each split's tokens.bin, mask.bin and offsets.npy (lengths.tmp, a checkpoint's scratch, goes).
def test_a_finished_sft_directory_holds_only_its_data_files(sft_data):
    files = sorted(p.relative_to(sft_data).as_posix() for p in sft_data.rglob("*") if p.is_file())
    assert files == ["meta.json", *(f"{split}/{name}" for split in ("train", "val")
                                    for name in ("mask.bin", "offsets.npy", "tokens.bin"))]


# a conversation exactly --max-len tokens long is not "longer than --max-len": it is
# kept whole, its last newline included, and not counted as cut.
def test_a_conversation_exactly_max_len_long_is_kept_whole(tmp_path, tok_dir):
    tok = load_tokenizer(tok_dir)
    chat = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "好的。"}]
    n = len(tok.encode(render_chat(chat)))
    src = write_jsonl(tmp_path / "s.jsonl", [chat], field=None)
    meta = prepare_sft([src], tok_dir, tmp_path / "o", max_len=n, system_prompt="", val_fraction=0.0, **QUIET)
    (ids, mask), = sft_split(tmp_path / "o")
    assert len(ids) == n and meta["truncated"] == {} and meta["skipped"]["total"] == 0
    check_mask(tok, ids, mask, chat)


# a conversation cut mid-turn just after the first token of
# its first answer still learns that token; it is kept (counted as cut), not dropped as "prompt too long".
def test_a_conversation_cut_just_after_its_first_answer_token_is_kept(tmp_path, tok_dir):
    chat = [{"role": "user", "content": "问题"}, {"role": "assistant", "content": "回答很长的一句话。"}]
    src = write_jsonl(tmp_path / "s.jsonl", [chat], field=None)
    prepare_sft([src], tok_dir, tmp_path / "whole", system_prompt="", val_fraction=0.0, **QUIET)
    (ids, mask), = sft_split(tmp_path / "whole")
    first = int(np.flatnonzero(mask)[0])
    assert first + 1 >= 8  # --max-len's floor
    meta = prepare_sft([src], tok_dir, tmp_path / "cut", max_len=first + 1, system_prompt="", val_fraction=0.0,
                       **QUIET)
    assert meta["truncated"] == {"mid_turn": 1} and meta["skipped"]["total"] == 0
    (cut_ids, cut_mask), = sft_split(tmp_path / "cut")
    assert cut_ids.tolist() == ids[:first + 1].tolist() and cut_mask.tolist() == [0] * first + [1]


# With --val-fraction 0 there is never a val document, yet the work is still saved and a stopped run
# continues; with a small one, no checkpoint is saved while the held-back last document is unwritten (before
# the first val document), since one that counted it as done would lose it. Either way the continued run
# makes the output of a run never stopped.
@pytest.mark.parametrize("val_fraction", [0.0, 0.001])
def test_a_run_stopped_without_a_val_document_yet_loses_no_document(tmp_path, tok_dir, monkeypatch, capsys,
                                                                     val_fraction):
    src, prep = _stoppable_inputs(tmp_path, "pretrain")
    opts = {"val_fraction": val_fraction, "workers": 1, "batch_chars": 300}
    prep([src], tok_dir, tmp_path / "whole", show_progress=False, **opts)
    with monkeypatch.context() as m:
        _stop_during_batch(m, 7)
        with pytest.raises(KeyboardInterrupt):
            prep([src], tok_dir, tmp_path / "out", **opts)
    assert val_fraction or "done are kept in" in capsys.readouterr().err
    prep([src], tok_dir, tmp_path / "out", **opts)
    assert val_fraction or "continuing the stopped run" in capsys.readouterr().err
    _same_data(tmp_path / "out", tmp_path / "whole")


# a continued run's checkpoints count the records the runs
# before it did too, so a run stopped twice still continues to the output of a run never stopped.
@pytest.mark.parametrize("kind", ["pretrain", "sft"])
def test_a_run_stopped_twice_continues_to_the_output_of_a_run_never_stopped(tmp_path, tok_dir, monkeypatch,
                                                                           capsys, kind):
    src, prep = _stoppable_inputs(tmp_path, kind)
    opts = {"val_fraction": 0.2, "workers": 1, "batch_chars": 300}
    prep([src], tok_dir, tmp_path / "whole", show_progress=False, **opts)
    for _ in range(2):
        with monkeypatch.context() as m:
            _stop_during_batch(m, 5)
            with pytest.raises(KeyboardInterrupt):
                prep([src], tok_dir, tmp_path / "out", **opts)
    prep([src], tok_dir, tmp_path / "out", **opts)
    assert "continuing the stopped run" in capsys.readouterr().err
    _same_data(tmp_path / "out", tmp_path / "whole")


# the recorded command and the checkpoint fingerprint): meta.json's command
# makes the same SFT data, --max-len and --system-prompt included (without them in the fingerprint, a stopped
# run would also be continued by a command with another prompt or length, mixing the two in one output).
def test_the_recorded_sft_command_makes_the_same_data(tmp_path, tok_dir):
    src = write_jsonl(tmp_path / "s.jsonl", conversations(30), field=None)
    meta = prepare_sft([src], tok_dir, tmp_path / "a", max_len=64, system_prompt="你是诗人", val_fraction=0.2, seed=3,
                       **QUIET)
    argv = shlex.split(meta["command"])[1:]
    argv[argv.index("--out") + 1] = str(tmp_path / "b")
    with pytest.raises(SystemExit) as e:
        main([*argv, "--workers", "1"])
    assert e.value.code == 0
    assert meta["truncated"] and meta["splits"]["val"]["documents"]  # --max-len and the split both tell
    _same_data(tmp_path / "a", tmp_path / "b")


# clipping a long message before tokenizing keeps enough characters for
# --max-len tokens even where a token spells many characters (here 9: a real tokenizer's English words are
# 4-5), so the conversation still fills --max-len instead of ending early.
def test_a_long_reply_of_long_tokens_still_fills_max_len(tmp_path, tok_dir):
    chat = [{"role": "user", "content": "写"}, {"role": "assistant", "content": "我们今天去公园散步" * 60}]
    src = write_jsonl(tmp_path / "s.jsonl", [chat], field=None)
    meta = prepare_sft([src], tok_dir, tmp_path / "o", max_len=64, system_prompt="", val_fraction=0.0, **QUIET)
    (ids, mask), = sft_split(tmp_path / "o")
    assert len(ids) == 64 and mask[-1] == 1 and meta["truncated"] == {"mid_turn": 1}


# the closing line counts the loss tokens of both splits and says how many conversations
# were cut and how many of those at a turn boundary.
def test_the_sft_summary_counts_both_splits_and_both_kinds_of_cut(sft_data):
    meta = {**json.loads((sft_data / "meta.json").read_text()), "truncated": {"at_turn": 2, "mid_turn": 5}}
    tr, va = meta["splits"]["train"], meta["splits"]["val"]
    assert va["loss_tokens"] > 0
    assert (f", {tr['loss_tokens'] + va['loss_tokens']:,} with loss; 7 cut to --max-len {meta['max_len']} "
            f"(2 at a turn boundary)") in summary(meta)


# a partial folder without a progress file (a run SIGKILLed before its first save)
# is emptied before the next run writes into it; SFT files are opened for appending, so leftovers would end up
# in the output.
def test_a_partial_folder_without_a_checkpoint_is_emptied_first(tmp_path, tok_dir):
    src = write_jsonl(tmp_path / "s.jsonl", conversations(20), field=None)
    prepare_sft([src], tok_dir, tmp_path / "fresh", val_fraction=0.2, **QUIET)
    for split in ("train", "val"):
        folder = tmp_path / ".out.partial" / split
        folder.mkdir(parents=True)
        for name in ("tokens.bin", "mask.bin", "lengths.tmp"):
            (folder / name).write_bytes(b"\x07\x00" * 8)
    prepare_sft([src], tok_dir, tmp_path / "out", val_fraction=0.2, **QUIET)
    _same_data(tmp_path / "out", tmp_path / "fresh")
    assert not (tmp_path / ".out.partial").exists()


def test_a_partial_path_that_is_a_link_or_a_file_is_refused_and_left_as_it_is(tmp_path, tok_dir):
    """A link where a stopped run leaves its folder (one moved to a bigger disk and linked back): the
    folder it points to was emptied, filled with the data, and the output became a link to it. A file
    there was reported as "cannot write OUT: File exists", of an OUT that did not exist."""
    src = write_jsonl(tmp_path / "s.jsonl", conversations(8), field=None)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    partial = tmp_path / ".out.partial"
    partial.symlink_to(mine, target_is_directory=True)
    with pytest.raises(TinykError, match=r"\.out\.partial is a link, where a stopped run of this command leaves its "
                                         r"folder; remove the link \(what it points to is left as it is\)"):
        prepare_sft([src], tok_dir, tmp_path / "out", **QUIET)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"] and partial.is_symlink()
    partial.unlink()
    partial.write_text("not a folder")
    with pytest.raises(TinykError, match=r"\.out\.partial is not a folder, where a stopped run of this command "
                                         r"leaves one; remove it or give another --out"):
        prepare_sft([src], tok_dir, tmp_path / "out", **QUIET)
    assert partial.read_text() == "not a folder" and not (tmp_path / "out").exists()


# a continued run's meta.json seconds include the time the stopped run had saved (the
# closing line's MB/s and tokens/s are over all the work kept, as the README says).
def test_a_continued_run_counts_the_seconds_the_stopped_run_saved(tmp_path, tok_dir, monkeypatch, capsys):
    src, prep = _stoppable_inputs(tmp_path, "pretrain")
    opts = {"val_fraction": 0.2, "workers": 1, "batch_chars": 300}
    with monkeypatch.context() as m:
        _stop_during_batch(m, 7)
        with pytest.raises(KeyboardInterrupt):
            prep([src], tok_dir, tmp_path / "out", **opts)
    progress = tmp_path / ".out.partial" / "progress.json"
    progress.write_text(json.dumps({**json.loads(progress.read_text()), "seconds": 1000.0}))
    meta = prep([src], tok_dir, tmp_path / "out", **opts)
    assert "continuing the stopped run" in capsys.readouterr().err
    assert 1000 <= meta["seconds"] < 1000 + 600


# --max-len 8 is the documented floor ("at least 8"), so it is accepted; what 8 tokens cannot hold (the
# template alone takes 9 before a reply) is this data's own matter, said as such.
def test_max_len_8_is_accepted(tmp_path, tok_dir):
    src = write_jsonl(tmp_path / "s.jsonl", [[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]],
                      field=None)
    with pytest.raises(TinykError, match=r"^--max-len must be at least 8 tokens, got 7$"):
        prepare_sft([src], tok_dir, tmp_path / "o", max_len=7, system_prompt="", **QUIET)
    with pytest.raises(TinykError, match=r"^no usable conversations.* within --max-len 8 tokens"):
        prepare_sft([src], tok_dir, tmp_path / "o", max_len=8, system_prompt="", **QUIET)


def test_one_worker_or_one_payload_runs_in_this_process():
    """No pool is worth starting for one worker or one payload: `fn` then needs no pickling (a lambda)."""
    def fn(a, p):
        return a + p

    assert list(map_ordered(fn, 1, [("a", 1), ("b", 2), ("c", 3)], workers=1)) == [("a", 2), ("b", 3), ("c", 4)]
    assert list(map_ordered(fn, 1, [("a", 1)], workers=4)) == [("a", 2)]


def test_workers_ignore_the_stop_signals_when_started_from_a_thread():
    """From a thread the parent can neither block signals nor set handlers: the workers ignore Ctrl-C,
    SIGTERM and SIGHUP themselves, once started."""
    ignored = {}
    stops = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def sig_ign(pid):
        status = Path(f"/proc/{pid}/status").read_text()
        return int(next(ln for ln in status.splitlines() if ln.startswith("SigIgn:")).split()[1], 16)

    def work():
        with start_pool(2, add, 1) as pool:
            deadline = time.monotonic() + 30  # each worker ignores them once its initializer has run
            while time.monotonic() < deadline:
                ignored.update((w.pid, sig_ign(w.pid)) for w in pool._pool)
                if all(v >> (s - 1) & 1 for v in ignored.values() for s in stops):
                    break
                time.sleep(0.1)

    if not Path("/proc/self/status").exists():
        pytest.skip("needs Linux's /proc")
    t = threading.Thread(target=work)
    t.start()
    t.join(120)
    assert ignored and all(v >> (s - 1) & 1 for v in ignored.values() for s in stops), \
        {k: hex(v) for k, v in ignored.items()}


def test_workers_use_one_core_each(monkeypatch):
    """tokenizers' own thread pool in each worker would oversubscribe the cores."""
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    with start_pool(2, add, 1) as pool:
        assert pool.apply(os.getenv, ("TOKENIZERS_PARALLELISM",)) == "false"


@pytest.mark.skipif(os.name != "posix", reason="a dead parent's children are adopted on POSIX")
def test_a_worker_that_cannot_hand_its_batch_to_a_dead_parent_ends_quietly():
    """A batch of megabytes is handed over while the parent reads it: killed meanwhile, the worker's
    write failed with a BrokenPipeError traceback after the shell's prompt. Alive, it is an error."""
    code = ("import sys, tinyk.workers as w\n"
            "w._TASK = (None, None, int(sys.argv[1]))\n"
            "def hand_over(): raise BrokenPipeError(32, 'Broken pipe')\n"
            "w._Worker(target=hand_over).run()\n")
    orphan = subprocess.run([sys.executable, "-c", code, "1"], capture_output=True, text=True, timeout=60)
    assert (orphan.returncode, orphan.stderr) == (1, "")
    alive = subprocess.run([sys.executable, "-c", code.replace("int(sys.argv[1])", "w.os.getppid()")],
                           capture_output=True, text=True, timeout=60)
    assert alive.returncode == 1 and alive.stderr.rstrip().endswith("BrokenPipeError: [Errno 32] Broken pipe")


def test_a_worker_whose_parent_is_already_gone_ends_at_once():
    """The parent was killed while the worker started: the worker's parent is no longer the one it was
    started by, and it ends rather than work for no one."""
    r = subprocess.run([sys.executable, "-c", "from tinyk.workers import die_with; die_with(1); print('ran')"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "ran" not in r.stdout


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="needs signal masks")
def test_the_stop_signals_are_not_blocked_while_the_pool_works():
    """They are blocked only while the workers start: Ctrl-C during the work stops it at once."""
    with start_pool(2, add, 1) as pool:
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        assert pool.apply(abs, (-3,)) == 3
    assert not blocked & set(STOP_SIGNALS)
    for _ in map_ordered(add, 1, [(i, i) for i in range(6)], workers=2):
        assert not signal.pthread_sigmask(signal.SIG_BLOCK, []) & set(STOP_SIGNALS)


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="needs signal masks")
def test_a_pool_that_fails_to_start_leaves_the_stop_signals_unblocked():
    """A start that fails (here `arg` cannot be sent to the workers) must not leave Ctrl-C blocked for
    the rest of the process."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    with pytest.raises((AttributeError, pickle.PicklingError)), start_pool(2, add, lambda: None):
        pass
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before
    assert all(signal.getsignal(s) is not signal.SIG_IGN for s in (signal.SIGINT, signal.SIGTERM))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_resource_tracker_is_not_ended_by_sighup():
    """It starts with SIGHUP blocked: a closed terminal killed it, and the run ended with a traceback for
    each of the pool's locks."""
    script = textwrap.dedent("""
        import signal
        from operator import add
        from multiprocessing import resource_tracker
        from tinyk.workers import start_pool
        with start_pool(2, add, 1) as pool:
            pid = resource_tracker._resource_tracker._pid
            status = open(f"/proc/{pid}/status").read()
            blocked = int(next(ln for ln in status.splitlines() if ln.startswith("SigBlk:")).split()[1], 16)
            print(blocked >> (signal.SIGHUP - 1) & 1)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "1", r.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SIGKILL of a worker")
def test_a_worker_killed_mid_task_ends_the_run_rather_than_hanging():
    """The OOM killer ends a worker while it tokenizes a batch: the standard pool starts another and the
    batch's result never comes, so `tinyk data` waited forever, printing nothing."""
    script = textwrap.dedent("""
        from tinyk.workers import map_ordered
        # `eval` is a picklable two-argument function: the worker evaluates the text with the payload as
        # its globals, and kills itself on the fourth batch.
        kill = "__import__('os').kill(__import__('os').getpid(), 9) if n == 3 else n"
        for tag, r in map_ordered(eval, kill, ((i, {"n": i}) for i in range(8)), workers=2):
            print(tag, flush=True)
        print("done")
    """)
    # And where reading the input is slower than tokenizing it: every result is in by the time it is asked
    # for, and the pool has long replaced the dead worker.
    slowly = script.replace("for i in range(8))", "for i in range(8) if not __import__('time').sleep(0.3))")
    for code in (script, slowly):
        try:
            r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("map_ordered waits forever for the batch of a killed worker")
        assert r.returncode != 0 and "done" not in r.stdout
        assert "TinykError: a worker process died while tokenizing (killed by SIGKILL) (the system's out-of-memory " \
               "killer, most likely: fewer --workers use less)" in r.stderr, r.stderr


def _hand_over_and_die_script(tmp_path: Path, stop_wait_s: float) -> str:
    """A map_ordered run whose worker is killed (as by the OOM killer) while it writes its batch into the
    results' pipe, holding that pipe's lock for good."""
    (tmp_path / "killer.py").write_text(textwrap.dedent("""
        import os, signal, struct, sys

        def hand_over_and_die(arg, n):
            if n != 3:
                return n
            frame = sys._getframe()
            while frame.f_code.co_name != "worker":  # the standard pool's worker loop, which holds the pipe
                frame = frame.f_back
            results = frame.f_locals["outqueue"]
            results._wlock.acquire()
            os.write(results._writer.fileno(), struct.pack("!i", 1 << 20) + b"x" * 1000)  # a message's start
            os.kill(os.getpid(), signal.SIGKILL)
    """))
    return textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        from killer import hand_over_and_die
        from tinyk.workers import _Pool, map_ordered
        _Pool.stop_wait_s = {stop_wait_s}
        # "pool" once the pool has started (it reads the first two payloads before)
        payloads = ((i, i) for i in range(8) if i != 2 or print("pool", flush=True) is None)
        for tag, r in map_ordered(hand_over_and_die, None, payloads, workers=2):
            print(tag, flush=True)
        print("done")
    """)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SIGKILL of a worker")
def test_a_worker_killed_while_it_hands_a_result_over_ends_the_run_rather_than_hanging(tmp_path):
    """Stopping the pool waited for the dead worker's lock forever, and the error was never said."""
    try:
        r = subprocess.run([sys.executable, "-c", _hand_over_and_die_script(tmp_path, 2.0)], capture_output=True,
                           text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("stopping the pool waits forever for the results' lock of a killed worker")
    assert r.returncode != 0 and "done" not in r.stdout
    assert "TinykError: a worker process died while tokenizing (killed by SIGKILL)" in r.stderr, r.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SIGKILL of a worker")
def test_ctrl_c_while_a_stuck_pool_stops_ends_the_run(tmp_path):
    """The stop of a pool whose worker died mid-hand-over says nothing until it gives up, so a user presses
    Ctrl-C: the workers (which ignore it) were then never killed, and the exit waited for them forever."""
    proc = subprocess.Popen([sys.executable, "-c", _hand_over_and_die_script(tmp_path, 300.0)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while proc.stdout.readline().strip() != "pool":
            assert proc.poll() is None, proc.stderr.read()
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            proc.send_signal(signal.SIGINT)  # again and again: the first may come before the stop
            time.sleep(1.0)
        assert proc.poll() is not None, "Ctrl-C does not end a run whose pool cannot stop"
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def test_a_pool_stopped_from_its_own_task_thread_stops_at_once():
    """The pool may be stopped in its task thread (a garbage collection there; here a payload's pickling):
    a stop in a thread of its own waited for the task thread, which waited for that stop."""
    pools, took = [], []

    class StopsThePool:
        def __reduce__(self):
            began = time.monotonic()
            pools[0].terminate()
            took.append(time.monotonic() - began)
            return int, (0,)

    with start_pool(2, add, 1) as pool:
        pools.append(pool)
        assert threading.current_thread() is not pool._task_handler
        pool.apply_async(abs, (StopsThePool(),))
        deadline = time.monotonic() + 60
        while not took and time.monotonic() < deadline:
            time.sleep(0.05)
    assert took and took[0] < 5, took


@pytest.mark.skipif(os.name != "posix", reason="a dead parent's children are adopted on POSIX")
def test_a_worker_started_from_a_thread_outlives_that_thread():
    """The pool starts a dead worker's replacement from its own thread, which ends as the pool stops: a
    worker that died with that thread (Linux's parent-death signal follows the thread) could die holding
    the results' pipe, and stopping the pool then waited forever."""
    parent = subprocess.Popen([sys.executable, "-c", (
        "import os, subprocess, sys, threading, time\n"
        "children = []\n"
        "def start():\n"
        "    child = subprocess.Popen([sys.executable, '-c', 'import sys, time; "
        "from tinyk.workers import die_with; die_with(int(sys.argv[1])); print(1, flush=True); time.sleep(60)', "
        "str(os.getpid())], stdout=subprocess.PIPE)\n"
        "    children.append((child, child.stdout.readline().decode().strip()))\n"  # the thread ends once it runs
        "t = threading.Thread(target=start)\n"
        "t.start(); t.join()\n"
        "child, ready = children[0]\n"
        "time.sleep(1.0)\n"
        "print(ready, child.poll(), flush=True)\n"
        "child.kill()\n")], stdout=subprocess.PIPE, text=True)
    out, _ = parent.communicate(timeout=60)
    assert out.split() == ["1", "None"], "the worker ended with the thread that started it"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SIGKILL of a worker")
def test_a_dead_workers_replacement_does_not_run_the_callers_script(tmp_path):
    """A script without the `if __name__ == "__main__":` guard: a replacement worker that ran it started a
    pool of its own, failed, and the error blamed that (exit status 1), not the killed worker."""
    ran = tmp_path / "ran"
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(f"""
        import time
        from pathlib import Path
        from tinyk.workers import map_ordered
        with Path({str(ran)!r}).open("a") as f:
            f.write("ran\\n")
        kill = "__import__('os').kill(__import__('os').getpid(), 9) if n == 3 else n"
        for tag, r in map_ordered(eval, kill, ((i, {{"n": i}}) for i in range(8) if not time.sleep(0.3)), workers=2):
            print(tag, flush=True)
    """))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert "TinykError: a worker process died while tokenizing (killed by SIGKILL)" in r.stderr, r.stderr
    assert ran.read_text() == "ran\n", "a worker ran the script"


def test_stopping_the_worker_pool_from_its_own_task_thread_returns_at_once(monkeypatch):
    """The pool may be finalized in its task thread (a garbage collection there): reading the pipe
    "until the task thread has ended" would then wait for itself forever."""
    import multiprocessing

    from tinyk.workers import _Pool

    monkeypatch.setattr(_Pool, "lock_wait_s", 0.1)
    inqueue = multiprocessing.get_context("spawn").SimpleQueue()
    done = threading.Event()

    def as_task_thread():
        _Pool._help_stuff_finish(inqueue, threading.current_thread(), 1)
        done.set()

    threading.Thread(target=as_task_thread, daemon=True).start()
    assert done.wait(30), "the task thread waits for itself to end"


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="needs signal masks")
def test_a_ctrl_c_while_the_workers_start_is_not_lost(monkeypatch):
    """The stop signals are blocked while the workers start (their handlers are SIG_IGN then): one that
    comes meanwhile stays pending and lands once the pool is in hand, rather than being ignored."""
    import tinyk.workers

    real = tinyk.workers._spawn_pool

    def spawn_then_ctrl_c(*args):
        pool = real(*args)
        # To this thread: one sent to the process may go to another thread of pytest's, which blocks nothing.
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
        return pool

    monkeypatch.setattr(tinyk.workers, "_spawn_pool", spawn_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt), start_pool(2, add, 1) as pool:
        for _ in range(100):
            pool.apply(abs, (-1,))
    assert not signal.pthread_sigmask(signal.SIG_BLOCK, []) & set(STOP_SIGNALS)


# ---------------------------------------------------------------- loaders: epochs, ranks and buckets


def _windows(x, y) -> list[tuple[int, ...]]:
    """A window as the seq_len + 1 tokens it reads: its inputs and its last target."""
    return [tuple(xr) + (yr[-1],) for xr, yr in zip(x.tolist(), y.tolist(), strict=True)]


# Every training window is seen exactly once per epoch across all ranks, and every batch is full,
# the one that spans an epoch's end included (it finishes one epoch and begins the next).
def test_every_window_once_per_epoch_across_ranks_with_full_batches_over_the_epoch_end(pretrain_dir):
    seq, micro, world = 16, 3, 2
    ranks = [PretrainLoader(pretrain_dir, "train", seq, micro, rank=r, world_size=world, seed=5) for r in range(world)]
    n = ranks[0].num_windows
    assert n % (micro * world), "a group must straddle the epoch's end"
    raw = PretrainLoader(pretrain_dir, "train", seq, 1).data  # every window, in file order
    every = Counter(_windows(*raw.fetch(np.arange(n))))
    stream: list[tuple[int, ...]] = []
    while len(stream) < 2 * n + micro * world:
        for rk in ranks:
            x, y = rk.next_batch()
            assert tuple(x.shape) == tuple(y.shape) == (micro, seq)
            stream += _windows(x, y)
    assert Counter(stream[:n]) == every and Counter(stream[n:2 * n]) == every
    assert ranks[0].state_dict() == ranks[1].state_dict() and ranks[0].epoch == 2


# A validation subset (max_batches) is the same windows, in the same order, whatever the number of
# processes: the val loss does not change with the number of GPUs.
def test_eval_batches_cover_the_same_windows_for_any_world_size(pretrain_dir):
    seq, micro = 32, 2
    for world, max_batches in itertools.product((2, 3), (1, 3, None)):
        alone = [r for x, y in eval_batches(pretrain_dir, "val", seq, micro * world, max_batches)
                 for r in _windows(x, y)]
        per_rank = [list(eval_batches(pretrain_dir, "val", seq, micro, max_batches, rank=r, world_size=world))
                    for r in range(world)]
        merged = [r for k in range(len(per_rank[0])) for batches in per_rank if k < len(batches)
                  for r in _windows(*batches[k])]
        assert merged == alone, (world, max_batches)


# Which conversations are left out (no answer token in the window) or cut (answer tokens past it)
# does not depend on how the loss mask is read in bounded chunks (as a split of over 16M tokens is).
def test_sft_dropped_and_cut_counts_do_not_depend_on_the_mask_chunk(sft_dir, monkeypatch):
    convs = sft_split(sft_dir)
    for seq in (56, 60, 72):
        window = [(m[1:min(len(m), seq + 1)].any(), m[seq + 1:].any()) for _, m in convs]
        dropped = sum(not inside for inside, _ in window)
        cut = sum(inside and past for inside, past in window)
        lengths = [min(len(t), seq + 1) for (t, _), (inside, _) in zip(convs, window, strict=True) if inside]
        for chunk in (1, 50, 300, 1000, 1 << 24):
            monkeypatch.setattr(loader_module, "_LOSS_COUNT_CHUNK", chunk)
            ld = SFTLoader(sft_dir, "train", seq, 2)
            assert (ld.dropped, ld.cut, ld.data.lengths.tolist()) == (dropped, cut, lengths), (seq, chunk)


# A fine-tune on fewer conversations than one global batch still trains: every epoch sees each
# conversation once, and the run resumes onto the same stream.
def test_an_sft_split_smaller_than_the_global_batch_gives_each_conversation_once_per_epoch(sft_dir):
    batch = 40
    ld = SFTLoader(sft_dir, "val", 96, 4, seed=1, batch_size=batch)
    n = ld.num_windows
    assert n < batch
    for epoch in range(6):
        assert sorted(ld._epoch_order(epoch).tolist()) == list(range(n))
    stream = [ld.next_batch()[0].tolist() for _ in range(5 * n // 4 + 1)]
    assert ld.epoch == 5
    again = SFTLoader(sft_dir, "val", 96, 4, seed=1, batch_size=batch)
    [again.next_batch() for _ in range(n // 4 + 1)]
    resumed = SFTLoader(sft_dir, "val", 96, 4, seed=1, batch_size=batch)
    resumed.load_state_dict(again.state_dict())
    assert [resumed.next_batch()[0].tolist() for _ in range(len(stream) - n // 4 - 1)] == stream[n // 4 + 1:]


# Which conversations share an SFT step changes from epoch to epoch (they are shuffled before the
# length buckets are made), and so does the order of the steps' lengths: no fixed curriculum.
def test_sft_steps_are_regrouped_and_reordered_every_epoch(sft_dir):
    ld = SFTLoader(sft_dir, "train", 96, 2, seed=3, bucket=8, batch_size=2)
    assert ld.num_windows % 2 == 0  # every epoch starts a new step

    def pairs(epoch: int) -> set[frozenset[int]]:
        return {frozenset(p) for p in ld._epoch_order(epoch).reshape(-1, 2).tolist()}

    assert pairs(0) != pairs(1)
    whole = SFTLoader(sft_dir, "train", 96, 2, seed=3, bucket=10**6, batch_size=2)
    lengths = whole.data.lengths

    def widths(epoch: int) -> list[int]:
        return lengths[whole._epoch_order(epoch).reshape(-1, 2)].max(axis=1).tolist()

    assert widths(0) != widths(1) and sorted(widths(0)) == sorted(widths(1))


# With a global batch that divides the bucket size, every SFT step lies within one length-sorted
# bucket, so it pads as little as bucketing allows.
def test_an_sft_step_lies_within_one_length_sorted_bucket(sft_dir):
    ld = SFTLoader(sft_dir, "train", 96, 4, seed=2, bucket=8, batch_size=8)
    lengths = ld.data.lengths
    order = ld._epoch_order(0)  # epoch 0 begins with a whole step
    steps = order[:len(order) // 8 * 8].reshape(-1, 8)
    for step in steps:
        assert (np.diff(lengths[step]) >= 0).all(), lengths[step]
    # A bucket is a run of the epoch's shuffle, not a slice of one global sort (the same neighbours every epoch).
    shuffle = PretrainLoader._epoch_order(ld, 0)
    buckets = {frozenset(shuffle[i:i + 8].tolist()) for i in range(0, len(shuffle) - 7, 8)}
    assert len(steps) >= 3 and {frozenset(step.tolist()) for step in steps} == buckets


# Runs with different seeds see different sample orders: seed 1 does not replay seed 0's second epoch.
def test_no_two_seeds_or_epochs_share_a_sample_order(pretrain_dir):
    orders = {(s, e): tuple(PretrainLoader(pretrain_dir, "train", 16, 1, seed=s)._epoch_order(e).tolist())
              for s in range(3) for e in range(3)}
    assert len(set(orders.values())) == len(orders)


# A global batch larger than the whole split (a tiny fine-tune or smoke run) is still full: it runs
# through as many epochs as it needs, each of them seeing every window once.
def test_a_batch_larger_than_the_split_is_full_and_visits_every_window_once_per_epoch(pretrain_dir):
    seq = 32
    ld = PretrainLoader(pretrain_dir, "val", seq, 1)
    n = ld.num_windows
    every = Counter(_windows(*ld.data.fetch(np.arange(n))))
    big = PretrainLoader(pretrain_dir, "val", seq, 2 * n + 5, seed=1)
    x, y = big.next_batch()
    assert tuple(x.shape) == (2 * n + 5, seq)
    stream = _windows(x, y)
    assert Counter(stream[:n]) == every and Counter(stream[n:2 * n]) == every
    assert (big.epoch, big.state_dict()["cursor"]) == (2, 5)


def test_prepared_data_records_each_splits_longest_document(tmp_path, tok_dir, corpus_file):
    """What the closing line's token check reads: without it, prepared data never says val holds too many."""
    meta = prepare_pretrain([corpus_file], tok_dir, tmp_path / "d", val_fraction=0.1, workers=1, show_progress=False)
    tr, va = meta["splits"]["train"], meta["splits"]["val"]
    assert 0 < va["longest"] <= va["tokens"] and 0 < tr["longest"] <= tr["tokens"]
    tok = load_tokenizer(tok_dir)
    docs = [len(tok.encode(json.loads(line)["text"])) for line in corpus_file.read_text().splitlines()]
    assert max(tr["longest"], va["longest"]) == max(docs) + 2  # with the <|im_start|> and <|im_end|> around each


def test_a_long_document_of_a_tokenizer_not_split_as_gpt2_is_encoded_whole(tmp_path, tok_dir, monkeypatch):
    """Long documents are encoded in pieces only where the pieces' tokens are the whole's: with
    add_prefix_space each piece would begin with a space of its own."""
    import tinyk.data

    other = tmp_path / "tok"
    shutil.copytree(tok_dir, other)
    spec = json.loads((other / "tokenizer.json").read_text(encoding="utf-8"))
    spec["pre_tokenizer"]["add_prefix_space"] = True
    (other / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    monkeypatch.setattr(tinyk.data, "PIECE_CHARS", 20)
    text = "今天天气很好，我们去公园散步吧。" * 20
    src = tmp_path / "d.jsonl"
    src.write_text(json.dumps({"text": text}, ensure_ascii=False) + "\n", encoding="utf-8")
    meta = prepare_pretrain([src], other, tmp_path / "d", val_fraction=0.0, workers=1, show_progress=False)
    ids = np.fromfile(next((tmp_path / "d" / "train").glob("*.bin")), meta["dtype"]).tolist()
    assert ids[1:-1] == load_tokenizer(other).plain.encode(text, add_special_tokens=False).ids


def test_a_meta_json_whose_longest_is_no_count_is_refused_in_one_line(tmp_path, pt_data):
    """`tinyk data info` on a damaged meta.json was a TypeError traceback from the val-share check."""
    copy = Path(shutil.copytree(pt_data, tmp_path / "d"))
    meta = json.loads((copy / "meta.json").read_text())
    meta["splits"]["val"]["longest"] = None
    (copy / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(TinykError, match="split 'val' has counts that are not whole numbers"):
        open_dataset(copy)


def test_a_split_continued_from_a_checkpoint_without_longest_leaves_it_out(tmp_path):
    """A stopped run's checkpoint from a tinyk before `longest` knows nothing of the documents before it:
    counting from 0 would understate it and make the val check misfire, so meta.json leaves it out."""
    from tinyk.data import _DocBatch, _ShardWriter

    batch = _DocBatch(np.arange(5, dtype=np.uint16), np.array([2, 3]), np.array([6, 9]), np.array([1, 2], np.uint64))
    for state, longest in (({"documents": 1, "tokens": 9, "bytes": 27, "shards": []}, None),
                           ({"documents": 1, "tokens": 9, "bytes": 27, "shards": [], "longest": 9}, 9), (None, 3)):
        w = _ShardWriter(tmp_path / f"train{longest}", np.dtype(np.uint16), 100)
        w.open(state)
        w.add(batch)
        assert w.close().get("longest") == longest
