"""Damaged, oddly encoded or misplaced inputs give one line naming the file, never a traceback; a killed
process's temporary output is cleaned up by the next run."""

from __future__ import annotations

import errno
import gzip
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tinyk.cli import main
from tinyk.demo import transformers_check
from tinyk.engine import Engine
from tinyk.errors import TinykError, write_error
from tinyk.evaluate import read_choice_csv, read_task
from tinyk.inputs import (
    GBK_HINT,
    HEAD_BYTES,
    LONE_CR_HINT,
    Skips,
    check_heads,
    check_inputs,
    has_surrogate,
    iter_records,
    iter_texts,
    mostly_skipped,
    read_prompts,
    short_repr,
)
from tinyk.loader import SFTLoader
from tinyk.outputs import (
    DirLock,
    _host,
    _stem,
    atomic_dir,
    atomic_file,
    check_output_file,
    is_output_file,
    marker_file,
    plain_name,
    remove_stale_temps,
    write_json_atomic,
    write_text_atomic,
)
from tinyk.tokenizer import load_tokenizer, train_tokenizer

zstandard = pytest.importorskip("zstandard")

_rng = random.Random(0)
DOCS = [{"text": f"第{i}号文档：" + "".join(chr(_rng.randrange(0x4E00, 0x5000)) for _ in range(60))}
        for i in range(2000)]
JSONL = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in DOCS).encode("utf-8")
GARBAGE = random.Random(1).randbytes(3000)


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    return e.value.code, capsys.readouterr().err


def one_error_line(err: str) -> str:
    """The one `tinyk: error:` line (progress bars may precede it), with no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("tinyk: error: ")]
    assert len(lines) == 1 and err.rstrip("\n").endswith(lines[0]), err
    return lines[0]


def texts(path: Path) -> list[str]:
    return list(iter_texts([path], Skips()))


# ---------------------------------------------------------------- 1. damaged compressed inputs

def truncated_gz(path: Path) -> Path:
    path.write_bytes(gzip.compress(JSONL)[:20000])
    return path


@pytest.fixture
def damaged(tmp_path) -> dict[str, Path]:
    gz = gzip.compress(JSONL)
    zst = zstandard.ZstdCompressor().compress(JSONL)
    bad_block = bytearray(gz)
    bad_block[10:] = b"\xff" * (len(gz) - 10)  # a valid gzip header, then an invalid deflate block
    array = gzip.compress(b'[\n  {"text": "\xe4\xbd\xa0\xe5\xa5\xbd"},\n  {"text": "x"}\n]\n')  # an indented array
    files = {"truncated.jsonl.gz": gz[:20000], "random.jsonl.gz": GARBAGE, "bad-block.jsonl.gz": bytes(bad_block),
             "crc.jsonl.gz": gz[:-8] + b"\0" * 8, "truncated.jsonl.zst": zst[: len(zst) // 2],
             "random.jsonl.zst": GARBAGE, "random.txt.zst": GARBAGE, "array-cut.json.gz": array[:-12],
             "array-crc.json.gz": array[:-4] + b"\0" * 4}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return {name: tmp_path / name for name in files}


def test_a_line_too_long_to_read_is_no_part_of_the_max_bytes_budget(tmp_path):
    """`tokenizer train --max-bytes 20M` stopped at 6.2 MB of a corpus with a 32 MB line: the line,
    skipped, had used the budget up."""
    src = tmp_path / "c.jsonl"
    short = [json.dumps({"text": f"doc {i}"}) + "\n" for i in range(4)]
    src.write_text(short[0] + json.dumps({"text": "x" * 5000}) + "\n" + "".join(short[1:]), encoding="utf-8")
    skips = Skips()
    texts = [r["text"] for _, r in iter_records([src], skips, max_bytes=len("".join(short)), max_line_bytes=1000)]
    assert texts == [f"doc {i}" for i in range(4)] and skips.stopped_at is None
    assert skips.to_json()["by_reason"] == {"line_too_long": 1}
    skips = Skips()
    assert len(list(iter_records([src], skips, max_bytes=len("".join(short)) - 1, max_line_bytes=1000))) == 3
    assert skips.stopped_at == len("".join(short[:3]))


def test_every_damaged_compressed_file_is_one_error_naming_it(damaged):
    for name, path in damaged.items():
        with pytest.raises(TinykError) as e:
            texts(path)
        msg = str(e.value)
        codec = "gzip" if name.endswith(".gz") else "zstd"
        assert msg.startswith(f"{path}: damaged or truncated {codec} data"), msg
        assert "\n" not in msg
        if name.startswith("truncated"):
            assert " after line " in msg


def test_truncated_zstd_is_not_read_as_a_shorter_corpus(tmp_path):
    """zstandard's stream_reader ends quietly at a cut; tinyk must say the file is cut."""
    zst = zstandard.ZstdCompressor().compress(JSONL)
    (tmp_path / "cut.jsonl.zst").write_bytes(zst[:-3])
    with pytest.raises(TinykError, match=r"cut.jsonl.zst: damaged or truncated zstd data after line \d+"):
        texts(tmp_path / "cut.jsonl.zst")


def test_good_compressed_files_still_read_whole(tmp_path):
    c = zstandard.ZstdCompressor()
    half = len(JSONL) // 2
    cut = JSONL.index(b"\n", half) + 1
    (tmp_path / "frames.jsonl.zst").write_bytes(c.compress(JSONL[:cut]) + c.compress(JSONL[cut:]))
    (tmp_path / "members.jsonl.gz").write_bytes(gzip.compress(JSONL[:cut]) + gzip.compress(JSONL[cut:]))
    (tmp_path / "empty.jsonl.zst").write_bytes(b"")
    want = [d["text"] for d in DOCS]
    assert texts(tmp_path / "frames.jsonl.zst") == want
    assert texts(tmp_path / "members.jsonl.gz") == want
    assert texts(tmp_path / "empty.jsonl.zst") == []


@pytest.mark.parametrize("command", ["tokenizer train", "tokenizer eval", "data pretrain", "data sft"])
def test_cli_damaged_gzip_is_one_line_and_leaves_nothing(tmp_path, tok_dir, command, capsys):
    src = truncated_gz(tmp_path / "corpus.jsonl.gz")
    before = src.read_bytes()
    out = tmp_path / "out"
    args = {"tokenizer train": ["tokenizer", "train", src, "--out", out, "--vocab-size", "300"],
            "tokenizer eval": ["tokenizer", "eval", tok_dir, "--input", src],
            "data pretrain": ["data", "pretrain", "--input", src, "--tokenizer", tok_dir, "--out", out],
            "data sft": ["data", "sft", "--input", src, "--tokenizer", tok_dir, "--out", out]}[command]
    code, err = run_cli(args, capsys)
    line = one_error_line(err)
    assert code == 2
    assert line.startswith(f"tinyk: error: {src}: damaged or truncated gzip data after line "), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl.gz"]
    assert src.read_bytes() == before


def test_a_gzip_file_failing_its_crc_is_not_kept_to_continue(tmp_path, tok_dir):
    """gzip's CRC error is an OSError, as a failing disk's is: the work done was kept with "run the same
    command again to continue", and the rerun failed at the same place every time."""
    from tinyk.data import prepare_pretrain
    from tinyk.outputs import partial_sibling

    data = gzip.compress(JSONL)
    src = tmp_path / "corpus.jsonl.gz"
    src.write_bytes(data[:-8] + bytes([data[-8] ^ 0xFF]) + data[-7:])  # the CRC-32 of the member, wrong
    out = tmp_path / "out"
    with pytest.raises(TinykError, match=r"corpus\.jsonl\.gz: damaged or truncated gzip data after line \d+ \(CRC"):
        prepare_pretrain([src], tok_dir, out, workers=1, batch_chars=500, checkpoint_s=0, show_progress=False)
    assert not out.exists() and not partial_sibling(out).exists()


def test_cli_random_zstd_is_one_line(tmp_path, capsys):
    src = tmp_path / "corpus.jsonl.zst"
    src.write_bytes(GARBAGE)
    code, err = run_cli(["tokenizer", "train", src, "--out", tmp_path / "t", "--vocab-size", "300"], capsys)
    assert code == 2 and f"{src}: damaged or truncated zstd data" in one_error_line(err)


def test_damaged_task_file_is_one_error(tmp_path):
    task = tmp_path / "task.jsonl.gz"
    recs = [{"messages": [{"role": "user", "content": d["text"]}], "answer": "2"} for d in DOCS]
    data = gzip.compress("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs).encode())
    task.write_bytes(data[: len(data) // 2])
    with pytest.raises(TinykError, match="task.jsonl.gz: damaged or truncated gzip data"):
        read_task(task, Skips())


def test_damaged_parquet_is_one_error_naming_it(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"text": [f"文档{i} " * 20 for i in range(5000)]}), good, row_group_size=1000)
    data = bytearray(good.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 200] = b"\xff" * 200
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(bytes(data))
    assert len(texts(good)) == 5000
    with pytest.raises(TinykError, match=r"bad.parquet: damaged parquet data after row \d+ \(") as e:
        texts(bad)
    assert "\n" not in str(e.value)


def test_a_parquet_row_that_is_not_utf8_is_skipped_and_counted(tmp_path):
    """Parquet stores strings unchecked: one bad row called the whole file damaged."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [b"good \xe4\xbd\xa0", b"bad \xff", "ok2 😀".encode()]
    path = tmp_path / "mixed.parquet"
    pq.write_table(pa.table({"text": pa.array(rows, pa.binary()).view(pa.string())}), path)
    skips = Skips()
    assert list(iter_texts([path], skips)) == ["good 你", "ok2 😀"]
    assert (skips.total, skips.first["invalid_utf8"]) == (1, ["mixed.parquet:row 2"])
    assert "fix the program that wrote it" in skips.summary()
    other = tmp_path / "meta.parquet"  # a column beside the text is not read at all
    pq.write_table(pa.table({"text": ["a", "b", "c"], "meta": pa.array(rows, pa.binary()).view(pa.string())}), other)
    assert list(iter_texts([other], skips := Skips())) == ["a", "b", "c"] and skips.total == 0


# ---------------------------------------------------------------- 2. byte order marks

@pytest.mark.parametrize("name", ["bom.jsonl", "bom.txt", "bom.jsonl.gz"])
def test_a_leading_utf8_bom_is_dropped(tmp_path, name):
    body = (JSONL if ".jsonl" in name else "第一行\n第二行\n".encode())
    data = b"\xef\xbb\xbf" + body
    path = tmp_path / name
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    skips = Skips(strict=True)
    recs = [rec for _, rec in iter_records([path], skips)]
    assert skips.total == 0
    assert recs[0] == (DOCS[0] if ".jsonl" in name else {"text": "第一行"})


def test_a_bom_glued_inside_a_file_is_dropped_too(tmp_path):
    """`cat a.jsonl b.jsonl` of two files Notepad saved puts b's BOM at the start of a line."""
    bom = b"\xef\xbb\xbf"
    lines = JSONL.splitlines(keepends=True)
    path = tmp_path / "glued.jsonl"
    path.write_bytes(bom + b"".join(lines[:2]) + bom + b"".join(lines[2:]))
    skips = Skips(strict=True)
    assert [rec for _, rec in iter_records([path], skips)] == DOCS and skips.total == 0
    (tmp_path / "glued.txt").write_bytes(bom + "一\n".encode() + bom + "二\n".encode())
    assert texts(tmp_path / "glued.txt") == ["一", "二"]


def test_bom_jsonl_trains_with_no_skips(tmp_path, tok_dir, capsys):
    src = tmp_path / "bom.jsonl"
    src.write_bytes(b"\xef\xbb\xbf" + JSONL)
    code, _ = run_cli(["data", "pretrain", "--input", src, "--tokenizer", tok_dir, "--out", tmp_path / "d",
                       "--strict"], capsys)
    assert code == 0
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    assert meta["skipped"]["total"] == 0 and meta["splits"]["train"]["documents"] + \
        meta["splits"]["val"]["documents"] == len(DOCS)


@pytest.mark.parametrize(("encoding", "bom", "says"), [
    ("utf-16-le", b"\xff\xfe", "UTF-16 text"), ("utf-16-be", b"\xfe\xff", "UTF-16 text"),
    ("utf-32-le", b"\xff\xfe\0\0", "UTF-32 text"), ("utf-32-be", b"\0\0\xfe\xff", "UTF-32 text"),
    # No byte order mark: English text has a NUL in every other byte, Chinese only in some.
    ("utf-16-le", b"", "NUL bytes in its first 4 KB: UTF-16 or UTF-32 text without a byte order mark"),
    ("utf-16-be", b"", "NUL bytes in its first 4 KB: UTF-16 or UTF-32 text without a byte order mark")])
@pytest.mark.parametrize("text", ["english one\nenglish two\n", "上海\n浦东\n" * 3])  # 上 is 0A 4E in UTF-16LE
def test_utf16_input_is_one_error(tmp_path, encoding, bom, says, text):
    src = tmp_path / "u16.txt"
    src.write_bytes(bom + text.encode(encoding))
    with pytest.raises(TinykError, match=f"u16.txt: {says}"):
        texts(src)


@pytest.mark.parametrize("late", ["utf16", "array"])
@pytest.mark.parametrize("stage", ["tokenizer", "pretrain", "sft"])
def test_an_input_wrong_as_a_whole_is_refused_before_any_input_is_read_in_full(tmp_path, tok_dir, monkeypatch,
                                                                                stage, late):
    """Met at its turn, a UTF-16 (or GBK, or JSON array) file last in --input threw away the hours spent
    tokenizing the files before it."""
    import tinyk.data
    import tinyk.tokenizer

    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"text": "你好世界"}, ensure_ascii=False) + "\n" if stage != "sft" else
                    json.dumps({"conversations": [{"from": "human", "value": "你好"},
                                                  {"from": "assistant", "value": "你好！"}]}) + "\n",
                    encoding="utf-8")
    bad = tmp_path / "late.jsonl"
    bad.write_bytes(b"\xff\xfe" + good.read_text(encoding="utf-8").encode("utf-16-le"))
    says = "late.jsonl: UTF-16 text; tinyk reads UTF-8"
    if late == "array":  # json.dump of a list: one line, longer than the megabyte looked at
        record = json.loads(good.read_text(encoding="utf-8"))
        bad.write_text(json.dumps([record] * (2 * HEAD_BYTES // len(json.dumps(record)))), encoding="utf-8")
        says = "late.jsonl: one JSON array, not JSON Lines"
    monkeypatch.setattr(tinyk.data, "_tokenize", lambda *a, **kw: pytest.fail("tokenizing began"))
    monkeypatch.setattr(tinyk.tokenizer, "build_tokenizer", lambda *a, **kw: pytest.fail("training began"))
    with pytest.raises(TinykError, match=says):
        if stage == "tokenizer":
            tinyk.tokenizer.train_tokenizer([good, bad], tmp_path / "tok", vocab_size=300, show_progress=False)
        else:
            prepare = tinyk.data.prepare_pretrain if stage == "pretrain" else tinyk.data.prepare_sft
            prepare([good, bad], tok_dir, tmp_path / "d", show_progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.jsonl", "late.jsonl"]


def test_the_head_check_judges_no_encoding_on_a_few_long_lines(tmp_path, tok_dir):
    """A megabyte holds one and a half of these documents: judged on the first alone, a bad one, the file
    was "mostly not UTF-8", which the whole of it (one bad line in three) is not."""
    from tinyk.data import prepare_pretrain

    src = tmp_path / "long.jsonl"
    doc = json.dumps({"text": "今天天气很好。" * 34_000}, ensure_ascii=False).encode() + b"\n"  # 714 KB
    src.write_bytes(doc.replace("好".encode(), b"\xff", 1) + doc * 2)
    meta = prepare_pretrain([src], tok_dir, tmp_path / "d", show_progress=False)
    assert meta["skipped"]["by_reason"] == {"invalid_utf8": 1}


def test_the_head_check_finds_a_gbk_file_of_long_lines_as_the_run_would(tmp_path):
    """250 lines of 4 KB fill the first megabyte: the head check judged no encoding on fewer than 1,000
    lines, so a GBK corpus was found only at its turn, after the files before it."""
    src = tmp_path / "gbk.txt"
    src.write_bytes(("今天天气很好，" * 290 + "\n").encode("gbk") * 1200)  # 4 KB lines, 4.9 MB
    with pytest.raises(TinykError, match=r"gbk.txt: not UTF-8 text \(2\d\d of 2\d\d lines read"):
        check_heads([src])
    with pytest.raises(TinykError, match=r"gbk.txt: not UTF-8 text \(2\d\d of 2\d\d lines read"):
        list(iter_texts([src], Skips()))  # the run, on the same lines
    # Fewer than 20 lines in the first megabyte say nothing there: both go on to the first 1,000 (and the
    # run judged the 20th line, past the megabyte, on lines the head check never read).
    mixed = tmp_path / "mixed.txt"
    mixed.write_bytes(("长" * 200_000 + "\n").encode("gbk") * 3 + "短\n".encode("gbk") * 17 + "好\n".encode() * 980)
    check_heads([mixed])
    skips = Skips()
    assert len(list(iter_texts([mixed], skips))) == 980 and skips.counts == {"invalid_utf8": 20}


def test_a_stray_nul_byte_early_in_utf8_text_skips_its_record_not_the_file(tmp_path):
    """UTF-8 text with one NUL near its start was refused whole as UTF-16; binary data still is."""
    src = tmp_path / "p.txt"
    src.write_bytes("你好世界\nab\x00c\n早上好\n".encode())
    skips = Skips()
    assert list(iter_texts([src], skips)) == ["你好世界", "早上好"]
    src.write_bytes(b"\x00\n" + "早上好\n".encode() * 500)  # judged on the NULs of its first 4 KB, not of 2 bytes
    assert list(iter_texts([src], Skips())) == ["早上好"] * 500
    assert skips.summary() == "skipped 1 record; nul byte: 1 (first at p.txt:2; a NUL byte is binary data, not text)"
    skips.add("empty", "p.txt:7")
    assert skips.report() == ("skipped 2 records:\n  empty: 1 (first at p.txt:7)\n"
                              "  nul byte: 1 (first at p.txt:2; a NUL byte is binary data, not text)")
    src = tmp_path / "p.jsonl"
    src.write_bytes(b'{"text": "a\x00b"}\n' + json.dumps({"text": "你好"}).encode() + b"\n")
    skips = Skips()
    assert list(iter_texts([src], skips)) == ["你好"] and skips.counts == {"malformed_json": 1}
    src = tmp_path / "b.txt"
    src.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x01\x00")
    with pytest.raises(TinykError, match="b.txt: NUL bytes in its first 4 KB: .* or not text at all"):
        list(iter_texts([src], Skips()))


def test_a_nul_byte_past_the_first_4_kb_of_a_txt_file_is_skipped_not_read(tmp_path, nano_model_dir, capsys):
    """Past the encoding check a NUL byte reached a prompt (or a corpus) as text; JSON refuses it already."""
    src = tmp_path / "p.txt"
    src.write_bytes("你好世界\n".encode() * 400 + b"abc\x00def\n")
    skips = Skips()
    assert list(iter_texts([src], skips)) == ["你好世界"] * 400
    assert skips.summary() == "skipped 1 record; nul byte: 1 (first at p.txt:401; a NUL byte is binary data, not text)"
    src.write_bytes(b" " * 4096 + "\n你好\nab\x00c\n".encode())  # a blank line first: no prompt
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(nano_model_dir), "--prompt-file", str(src), "--prompt", "早上", "--json",
              "--max-new-tokens", "1", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert e.value.code == 0 and [json.loads(line)["prompt"] for line in out.splitlines()] == ["早上", "你好"]
    assert err == f"tinyk: {src}: skipped 1 record; nul byte: 1 (first at p.txt:3; a NUL byte is binary data, " \
                  "not text)\n"


def test_surrogates_written_as_utf8_bytes_get_their_own_reason_not_the_gbk_hint(tmp_path):
    """ED A0 80 (CESU-8, Java's modified UTF-8): no iconv -f gbk fixes it."""
    src = tmp_path / "s.txt"
    src.write_bytes(b"hello\nbad \xed\xa0\x80 x\n\xc4\xe3\xba\xc3\n")  # the last line is GBK
    skips = Skips()
    assert texts(src) == ["hello"] and list(iter_texts([src], skips)) == ["hello"]
    assert skips.summary() == ("skipped 2 records; encoded surrogate: 1 (first at s.txt:2; a \\ud800-\\udfff "
                               "surrogate written as UTF-8 bytes (CESU-8, Java's modified UTF-8) is no UTF-8 text; fix "
                               "the program that wrote it); invalid utf8: 1 (first at s.txt:3; "
                               f"{GBK_HINT})")


def test_a_lone_cr_ends_a_plain_text_line(tmp_path):
    """A file with classic Mac OS line ends was one document holding every line and its CRs."""
    src = tmp_path / "mac.txt"
    src.write_bytes("第一行\r第二行\r\r第三行\r\n第四行\n".encode())
    assert texts(src) == ["第一行", "第二行", "第三行", "第四行"]


def test_json_lines_ended_by_a_lone_cr_are_one_malformed_line_that_says_why(tmp_path):
    """JSON Lines end in \\n (a CR inside a record is JSON whitespace), so an old Mac OS file is one line,
    which was skipped as malformed JSON without a word on its line ends."""
    src = tmp_path / "mac.jsonl"
    src.write_bytes(b'{"text": "a"}\r{"text": "b"}\r{"text": "c"}\r\n{"text":\r"d"}\n{"text": "e"\n')
    skips = Skips()
    assert list(iter_texts([src], skips)) == ["d"]
    assert skips.counts == {"malformed_json": 2}
    assert skips.hints == {"malformed_json": LONE_CR_HINT}
    src.write_bytes(b'{"text": "e"\n')
    skips = Skips()
    assert list(iter_texts([src], skips)) == [] and skips.hints == {}


def test_a_bad_byte_in_a_lone_cr_line_skips_only_its_own(tmp_path):
    """A NUL or a byte that is not UTF-8 was checked on the whole LF-ended line: it dropped the documents
    beside it, and a classic Mac OS file, all one such line, was lost whole ("no usable documents")."""
    src = tmp_path / "mac.txt"
    src.write_bytes("第一行\r第\x00二行\r第三行\r\n第四行\r".encode() + b"\xb5\xda\r" + "第六行\r\n".encode())
    skips = Skips()
    assert list(iter_texts([src], skips)) == ["第一行", "第三行", "第四行", "第六行"]
    assert skips.counts == {"nul_byte": 1, "invalid_utf8": 1}
    assert "nul byte: 1 (first at mac.txt:2;" in skips.summary()  # lines counted as an editor shows them
    assert "invalid utf8: 1 (first at mac.txt:5;" in skips.summary()
    src.write_bytes(b"x\r\r\nbad\xff\n" + b"z" * 100 + b"\n")  # a lone CR before a CRLF: a blank line between
    skips = Skips()
    assert list(iter_texts([src], skips, max_line_bytes=50)) == ["x"]
    assert "first at mac.txt:3;" in skips.summary() and "first at mac.txt:4;" in skips.summary()


@pytest.mark.parametrize("text,lone", [
    (b"a" * 65535 + b"\r\n", False),  # a CRLF across the 64 KB looked at is no lone CR
    (b"a" * 65534 + b"\rb\n", True),  # one just inside it is
    (b"x\ry\n" + b"a" * 2000 + b"\n", False),  # a lone CR in the line before the long one is not in it
    (b"x\n" + b"a" * 2000 + b"\rb\n", True),  # one in the long line, which starts further on, is
])
def test_a_line_too_long_is_said_to_be_lone_cr_lines_only_where_it_holds_one(tmp_path, text, lone):
    """The hint to convert old Mac OS line ends looks at the 64 KB from where the long line starts."""
    src = tmp_path / "a.txt"
    src.write_bytes(text)
    skips = Skips()
    list(iter_texts([src], skips, max_line_bytes=1000))
    assert skips.counts["line_too_long"] == 1
    assert ("lone CR" in skips.hints["line_too_long"]) == lone, skips.hints


@pytest.mark.parametrize("end", [b"\n", b"\r\n"])
def test_max_line_bytes_counts_a_line_without_its_end(tmp_path, end):
    """A Windows file's lines are kept as the same file's with Unix line ends are (and a last line
    without its end as one with it)."""
    src = tmp_path / "a.jsonl"
    short, long = b'{"text":"abcdefghi"}', b'{"text":"abcdefghij"}'  # 20 and 21 bytes
    src.write_bytes(short + end + long + end + short)
    skips = Skips()
    assert list(iter_texts([src], skips, max_line_bytes=20)) == ["abcdefghi", "abcdefghi"]
    assert skips.counts == {"line_too_long": 1}


def test_a_txt_file_of_json_records_is_refused_with_the_name_it_needs(tmp_path):
    """Read as text, a tokenizer learnt `{"text": "` as its most common tokens."""
    src = tmp_path / "C.TXT.gz"
    with gzip.open(src, "wt", encoding="utf-8") as f:
        f.write('\n{"text": "第一行"}\n{"text": "第二行"}\n')
    with pytest.raises(TinykError, match=r"C.TXT.gz: a .txt file whose lines are JSON records, which would be read as "
                                         r"text, braces and keys included; name it C.jsonl.gz to read their 'text' "
                                         r"field$"):
        texts(src)
    # The first line of text decides, after one that is not UTF-8 too (it read 30 records as text).
    src.write_bytes(gzip.compress(b"\x80 bad\n" + '{"text": "第一行"}\n'.encode() * 30))
    with pytest.raises(TinykError, match=r"C.TXT.gz: a .txt file whose lines are JSON records"):
        texts(src)
    src.write_bytes(gzip.compress('{不是 JSON} 而是文本\n{"text": "x"}\n'.encode()))  # only the first line decides
    assert texts(src) == ["{不是 JSON} 而是文本", '{"text": "x"}']
    src.write_bytes(gzip.compress(b'{"a": 1, "b": " "}\n{}\n'))  # JSON, but no text the .jsonl reader would read
    assert texts(src) == ['{"a": 1, "b": " "}', "{}"]
    # Records with their text under another key were trained on as text too: the --field to read them is named.
    record = {"id": "a1", "content": "今天天气很好，我们一起去公园散步吧。然后去吃饭。", "lang": "zh"}
    src.write_bytes(gzip.compress(json.dumps(record, ensure_ascii=False).encode() + b"\n"))
    with pytest.raises(TinykError, match=r"name it C.jsonl.gz to read their 'content' field with --field=content$"):
        texts(src)
    # SFT records are conversations, whatever their longest string: not "--field output" (the answers alone).
    for rec in ({"instruction": "把这句话翻译成英文", "input": "", "output": "Please translate this sentence."},
                {"id": "identity_0", "conversations": [{"from": "human", "value": "你好"}]}):
        src.write_bytes(gzip.compress(json.dumps(rec, ensure_ascii=False).encode() + b"\n"))
        with pytest.raises(TinykError, match=r"name it C.jsonl.gz to read them as conversations with tinyk data sft$"):
            texts(src)
    # A log line's short values are no document: such a file is read as the text it is.
    src.write_bytes(gzip.compress(b'{"ts": "2026-12-07T05:00:00", "level": "info", "msg": "started"}\n'))
    assert texts(src) == ['{"ts": "2026-12-07T05:00:00", "level": "info", "msg": "started"}']
    # The seed's conversations, one list of messages a line: trained on as text, brackets and keys included.
    src.write_bytes(gzip.compress('[{"role": "user", "content": "你好"}, {"role": "assistant", "content": "嗯"}]\n'
                                  .encode()))
    with pytest.raises(TinykError, match=r"name it C.jsonl.gz to read them as conversations with tinyk data sft$"):
        texts(src)
    src.write_bytes(gzip.compress(b'[1, 2]\n'))
    assert texts(src) == ["[1, 2]"]
    sft = tmp_path / "sft.txt"  # conversations are read as conversations, not by a 'text' field
    sft.write_text(json.dumps({"instruction": "你好", "output": "你好！"}, ensure_ascii=False) + "\n", encoding="utf-8")
    with pytest.raises(TinykError, match=r"name it sft.jsonl to read them as conversations$"):
        list(iter_records([sft], Skips(), message_lists=True))


def test_a_file_in_another_encoding_is_refused_not_skipped_line_by_line(tmp_path, tok_dir, capsys):
    """A GBK corpus made a tokenizer and a dataset of one document with exit 0: every Chinese line was
    skipped as invalid UTF-8 and only the summary said so. A few bad lines in a UTF-8 file still are skipped."""
    lines = [f"第{i}行：今天天气很好，我们去公园散步。" for i in range(1200)]
    gbk = tmp_path / "语料 gbk.txt"
    gbk.write_bytes(("\n".join(lines[:500]) + "\nASCII line\n").encode("gbk"))
    before = gbk.read_bytes()
    for argv in (["tokenizer", "train", str(gbk), "--out", str(tmp_path / "tok"), "--vocab-size", "300"],
                 ["data", "pretrain", "--input", str(gbk), "--tokenizer", str(tok_dir), "--out", str(tmp_path / "d")]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and capsys.readouterr().err == (
            f"tinyk: error: {gbk}: not UTF-8 text (500 of 501 lines read could not be decoded: GBK or another "
            f"encoding?); convert it first, e.g. iconv -f gbk -t utf-8 '{gbk}' > '{tmp_path / 'utf8-语料 gbk.txt'}'\n")
    # A sample (--max-bytes) is judged on what it read.
    with pytest.raises(TinykError, match=r"not UTF-8 text \(5 of 5 lines read could not be decoded"):
        list(iter_texts([gbk], Skips(), max_bytes=200))
    assert gbk.read_bytes() == before and not (tmp_path / "tok").exists() and not (tmp_path / "d").exists()
    # The first 1,000 lines decide: GBK lines after them (a file glued from two sources) are skipped and counted.
    mixed = tmp_path / "mixed.txt"
    mixed.write_bytes("".join(f"{t}\n" for t in lines[:1000]).encode() + "".join(f"{t}\n" for t in lines[1000:])
                      .encode("gbk"))
    skips = Skips()
    assert len(list(iter_texts([mixed], skips))) == 1000 and skips.to_json()["by_reason"] == {"invalid_utf8": 200}
    small = tmp_path / "small.txt"  # a short file is judged whole: 1 bad line of 3 is a bad line
    small.write_bytes("好\n".encode() + "坏\n".encode("gbk") + "好\n".encode())
    assert texts(small) == ["好", "好"]
    spaced = tmp_path / "spaced.txt"  # blank lines are no lines of text: they neither decide nor dilute
    spaced.write_bytes("坏\n".encode("gbk") + b"\n" * 1500 + "好\n".encode() * 3)
    assert texts(spaced) == ["好"] * 3
    with gzip.open(tmp_path / "g.txt.gz", "wb") as f:
        f.write("坏\n".encode("gbk"))
    with pytest.raises(TinykError, match=r"g.txt.gz: not UTF-8 text \(1 of 1 line read could not be decoded: .*e.g. "
                                         r"gzip -dc .*g.txt.gz \| iconv -f gbk -t utf-8 \| gzip > .*utf8-g.txt.gz$"):
        texts(tmp_path / "g.txt.gz")


def test_compressed_data_under_a_plain_name_says_to_rename_it(tmp_path):
    """Not the "not UTF-8, convert it with iconv" advice its bytes would otherwise get."""
    (tmp_path / "docs.jsonl").write_bytes(gzip.compress(JSONL))
    (tmp_path / "z.jsonl").write_bytes(zstandard.ZstdCompressor().compress(JSONL))
    with pytest.raises(TinykError, match=r"docs.jsonl: gzip-compressed data in a file not named .gz; rename it to "
                                         r"docs.jsonl.gz"):
        texts(tmp_path / "docs.jsonl")
    with pytest.raises(TinykError, match=r"z.jsonl: zstd-compressed data in a file not named .zst"):
        texts(tmp_path / "z.jsonl")
    os.replace(tmp_path / "docs.jsonl", tmp_path / "docs.jsonl.gz")
    assert len(texts(tmp_path / "docs.jsonl.gz")) == len(DOCS)
    # Named for the other codec, or compressed by none: renamed, it reads; it is not "damaged or truncated".
    os.replace(tmp_path / "z.jsonl", tmp_path / "z.jsonl.gz")
    with pytest.raises(TinykError, match=r"^.*z.jsonl.gz: zstd-compressed data in a file named .gz; rename it to "
                                         r"z.jsonl.zst$"):
        texts(tmp_path / "z.jsonl.gz")
    (tmp_path / "plain.jsonl.zst").write_bytes(JSONL)
    with pytest.raises(TinykError, match=r"plain.jsonl.zst: uncompressed text in a file named .zst; rename it to "
                                         r"plain.jsonl$"):
        texts(tmp_path / "plain.jsonl.zst")
    # Compressed twice: the NUL bytes of the inner gzip header were taken for UTF-16 text.
    (tmp_path / "twice.jsonl.gz").write_bytes(gzip.compress(gzip.compress(JSONL)))
    with pytest.raises(TinykError, match=r"twice.jsonl.gz: compressed twice \(what its gzip holds is gzip-compressed "
                                         r"again\); decompress it once \(gzip -dc twice.jsonl.gz > FILE\)"):
        texts(tmp_path / "twice.jsonl.gz")
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(gzip.compress(JSONL)[:12])
    with pytest.raises(TinykError, match="cut.jsonl.gz: damaged or truncated gzip data"):
        texts(cut)


# ---------------------------------------------------------------- 3. prepared data: offsets.npy

@pytest.fixture
def sft_copy(tmp_path, sft_data) -> Path:
    return Path(shutil.copytree(sft_data, tmp_path / "data"))


@pytest.mark.parametrize("damage", ["random", "pickled", "truncated", "floats", "missing"])
def test_damaged_offsets_is_one_line_naming_it(sft_copy, damage):
    f = sft_copy / "train" / "offsets.npy"
    good = np.load(f)
    if damage == "random":
        f.write_bytes(GARBAGE)
    elif damage == "pickled":
        np.save(f, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    elif damage == "truncated":
        f.write_bytes(f.read_bytes()[:200])
    elif damage == "floats":
        np.save(f, good.astype(np.float64))
    else:
        f.unlink()
    want = {"missing": "is missing", "floats": "does not match meta.json"}.get(damage, "is damaged or not a NumPy")
    with pytest.raises(TinykError) as e:
        SFTLoader(sft_copy, "train", 64, 2)
    assert str(e.value).startswith(f"{f} {want}") and "re-run tinyk data" in str(e.value)


def test_cli_eval_on_damaged_offsets(sft_copy, nano_model_dir, capsys):
    (sft_copy / "val" / "offsets.npy").write_bytes(GARBAGE)
    code, err = run_cli(["eval", "--model", nano_model_dir, "--data", sft_copy, "--device", "cpu"], capsys)
    assert code == 2 and "offsets.npy is damaged or not a NumPy array file" in one_error_line(err)


# ---------------------------------------------------------------- 4. evaluation inputs

CSV = "id,question,A,B,C,D,answer\n1,中国的首都是哪里？,北京,上海,广州,深圳,A\n"


def test_gbk_and_binary_choice_csv_are_one_line(tmp_path, nano_model_dir, capsys):
    gbk = tmp_path / "gbk.csv"
    gbk.write_bytes(CSV.encode("gbk"))
    binary = tmp_path / "binary.csv"
    binary.write_bytes(GARBAGE)
    with pytest.raises(TinykError, match=r"gbk.csv:2: not UTF-8 text; multiple-choice CSVs must be UTF-8"):
        read_choice_csv(gbk, Skips())
    with pytest.raises(TinykError, match=r"binary.csv:\d+: not UTF-8 text"):
        read_choice_csv(binary, Skips())
    code, err = run_cli(["eval", "--model", nano_model_dir, "--choice", gbk, "--device", "cpu"], capsys)
    assert code == 2 and "must be UTF-8" in one_error_line(err)
    assert gbk.read_bytes() == CSV.encode("gbk")


def test_choice_csv_with_bom_and_malformed_csv(tmp_path):
    ok = tmp_path / "ok.csv"
    ok.write_bytes(b"\xef\xbb\xbf" + CSV.encode())
    assert [q.answer for q in read_choice_csv(ok, Skips())] == ["A"]
    huge = tmp_path / "huge.csv"
    huge.write_text('id,question,A,B,answer\n1,"' + "x" * 200_000 + '",a,b,A\n', encoding="utf-8")
    with pytest.raises(TinykError, match=r"huge.csv:2: malformed CSV"):
        read_choice_csv(huge, Skips())
    # An unclosed quote would swallow every row after it into one field: an error naming the line.
    unclosed = tmp_path / "q_val.csv"
    unclosed.write_text('id,question,A,B,answer\n0,q0,a,b,A\n1,"no closing quote,a,b,A\n2,q2,a,b,B\n3,q3,a,b,A\n',
                        encoding="utf-8")
    with pytest.raises(TinykError, match=r"q_val.csv:3: malformed CSV in the row that starts here "
                                         r"\(unexpected end of data\)"):
        read_choice_csv(unclosed, Skips())


def test_gbk_task_file_is_one_line(tmp_path):
    task = tmp_path / "task.jsonl"
    rec = {"messages": [{"role": "user", "content": "你好"}], "answer": "好"}
    task.write_bytes((json.dumps(rec, ensure_ascii=False) + "\n").encode("gbk"))
    with pytest.raises(TinykError, match="task.jsonl: not UTF-8 text .*iconv -f gbk -t utf-8 .*task.jsonl > "):
        read_task(task, Skips())


# ---------------------------------------------------------------- 5. temporaries of killed processes

def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_an_output_a_killed_replace_had_moved_aside_is_found_by_the_commands_that_read_it(tmp_path, tok_dir,
                                                                                         nano_model_dir, pt_data):
    """Killed between the two renames of a --force replace: the old output is in `.NAME.old-HOST-PID`
    and NAME is missing. A command reading NAME puts it back instead of saying "not found"."""
    from tinyk.cli import main
    from tinyk.loader import open_dataset

    dead = dead_pid()
    copies = {}
    for name, src in (("tok", tok_dir), ("model", nano_model_dir), ("data", pt_data)):
        copies[name] = tmp_path / name
        shutil.copytree(src, tmp_path / f".{name}.old-{_host()}-{dead}")
    assert load_tokenizer(copies["tok"]).vocab_size > 0 and (copies["tok"] / "tokenizer.json").is_file()
    assert open_dataset(copies["data"])["kind"] == "pretrain"
    with pytest.raises(SystemExit) as e:
        main(["model", "info", str(copies["model"])])
    assert e.value.code == 0 and sorted(p.name for p in tmp_path.iterdir()) == ["data", "model", "tok"]


def test_a_replace_is_not_stopped_by_an_aside_this_process_left(tmp_path):
    """A carry-over that failed keeps the replaced output's leftovers in its aside, "for a later run":
    the same process replacing the output again (training saves final/ many times) raised a bare
    OSError (directory not empty) there and lost the new output."""
    from tinyk.outputs import _owner

    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "f").write_text("1")
    left = tmp_path / f".out.old-{_owner()}"  # as named before asides got a name of their own
    left.mkdir()
    (left / "notes.txt").write_text("kept")
    with atomic_dir(tmp_path / "out", force=True) as tmp:
        (tmp / "f").write_text("2")
    assert (tmp_path / "out" / "f").read_text() == "2" and (left / "notes.txt").read_text() == "kept"


def test_a_failed_rename_of_the_new_output_leaves_the_old_one_in_place(tmp_path, monkeypatch):
    """--force: the old output is moved aside, then the new one renamed in. If that rename fails (a full
    disk's metadata, EXDEV, a permission), the old output must be back under its name, not only in a
    hidden `.out.old-HOST-PID-XXXX` that nothing of this process puts back."""
    import tinyk.outputs

    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "model.bin").write_text("old")
    real = os.replace

    def failing(src, dst):
        if ".out.tmp-" in Path(src).name and Path(dst) == out:
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(tinyk.outputs.os, "replace", failing)
    with pytest.raises(OSError), atomic_dir(out, force=True) as tmp:
        (tmp / "model.bin").write_text("new")
    assert (out / "model.bin").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_delete_stopped_midway_leaves_a_leftover_not_part_of_the_folder(tmp_path, monkeypatch):
    """`delete_via`: a Ctrl-C (or kill) during the delete must not leave a half-deleted checkpoint under
    its own name, where it looks whole to a resume."""
    import shutil

    import tinyk.outputs
    from tinyk.outputs import delete_via

    ckpt = tmp_path / "step-100"
    ckpt.mkdir()
    for name in ("model.safetensors", "optimizer.pt", "state.json"):
        (ckpt / name).write_text(name)
    real = shutil.rmtree

    def interrupted(path, ignore_errors=False):
        next(iter(sorted(Path(path).iterdir()))).unlink()  # one file gone, then the kill
        raise KeyboardInterrupt

    monkeypatch.setattr(tinyk.outputs.shutil, "rmtree", interrupted)
    with pytest.raises(KeyboardInterrupt):
        delete_via(ckpt, tmp_path / ".step-100.old-1")
    monkeypatch.setattr(tinyk.outputs.shutil, "rmtree", real)
    assert not ckpt.exists() and (tmp_path / ".step-100.old-1").is_dir()


@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="needs Linux's /proc/locks")
def test_lock_holders_are_those_of_that_directory_only(tmp_path):
    """"in use by another tinyk run (process ...)" must name the process holding *this* directory's lock,
    not every process on the machine holding a lock on anything."""
    from tinyk.outputs import DirLock

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    lock = DirLock(b)
    assert lock.acquire()
    try:
        assert DirLock(a).holders() == []
        assert [h.split()[0] for h in DirLock(b).holders()] == [str(os.getpid())]
    finally:
        lock.release()
    assert DirLock(b).holders() == []
    # A long command line is cut between two arguments: a flag cut short would read as another flag.
    holds = ("import sys; from tinyk.outputs import DirLock; lock = DirLock(sys.argv[1]); lock.acquire(); "
             "print(flush=True); sys.stdin.read()")
    args = [sys.executable, "-c", holds, str(b), "--tokenizer", "x" * 40, "--tokenizer", "y" * 40]
    holder = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        holder.stdout.readline()  # the lock is held
        [held] = DirLock(b).holders()
    finally:
        holder.communicate("")
    shown = held.split(" (", 1)[1].removesuffix(")")
    assert shown.endswith(" ...") and " ".join(args).startswith(shown.removesuffix(" ...") + " "), shown


def test_an_existing_output_file_of_the_right_kind_still_needs_force(tmp_path):
    """check_output_file with `replaces`: a file that is such an output is replaced only with --force."""
    res = tmp_path / "res.json"
    res.write_text("{}")
    kind = ("the results of tinyk eval", lambda p: True)
    with pytest.raises(TinykError, match=r"exists \(use --force to replace it\)$"):
        check_output_file(res, [], force=False, replaces=kind)
    check_output_file(res, [], force=True, replaces=kind)


def test_atomic_dir_names_its_temporary_with_host_and_pid(tmp_path):
    with atomic_dir(tmp_path / "out") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(f".out.tmp-{_host()}-{os.getpid()}-")
        assert ".tmp-" in tmp.name  # rundir.clean_partial relies on this
        (tmp / "f").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failed_file_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    f = tmp_path / "results.json"
    write_json_atomic(f, {"a": 1})
    with pytest.raises(TypeError):
        write_json_atomic(f, {"a": {1, 2}})  # fails half-way through writing
    assert json.loads(f.read_text()) == {"a": 1} and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
    with pytest.raises(OSError), atomic_file(f) as tmp:  # a failure after some bytes are written (a full disk)
        tmp.write_text('{"a": ')
        raise OSError(28, "No space left on device")
    assert json.loads(f.read_text()) == {"a": 1} and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_a_file_is_on_the_disk_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    """Without an fsync before the rename, a power cut could leave config.yaml or a .gguf there in
    name but empty (ext4 without auto_da_alloc, XFS)."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a))), real_replace(a, b)))
    write_text_atomic(tmp_path / "config.yaml", "a: 1\n")
    assert [e[0] for e in events] == ["fsync", "replace"] and events[0][1] == events[1][1]
    assert (tmp_path / "config.yaml").read_text() == "a: 1\n"


def test_a_refused_write_names_the_folder_not_the_free_space(tmp_path):
    """Root-owned or read-only run folders: "Permission denied: '.config.yaml.tmp-16918'; 81,446 MB free on
    that disk" pointed at the disk and at a temporary file."""
    run = tmp_path / "run"
    run.mkdir()
    e = PermissionError(13, "Permission denied", str(run / ".config.yaml.tmp-16918"))
    assert str(write_error(run / "config.yaml", e)) == f"cannot write in {run}: permission denied"
    full = str(write_error(run / "config.yaml", OSError(28, "No space left on device")))
    assert full.startswith(f"cannot write {run / 'config.yaml'}: [Errno 28] No space left on device; ") \
        and "MB free" in full
    # Neither the disk nor permission (a folder of /proc): the reason alone, not the temporary's name.
    missing = FileNotFoundError(2, "No such file or directory", str(run / ".config.yaml.tmp-16918"))
    assert str(write_error(run / "config.yaml", missing)) \
        == f"cannot write {run / 'config.yaml'}: No such file or directory"


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_an_output_file_where_nothing_can_be_written_is_refused_before_the_work():
    """Root passes the access check in /proc and /sys, where every write fails: `tinyk eval --out /proc/r.json`
    evaluated everything, then failed to save it."""
    with pytest.raises(TinykError, match=r"^(cannot write /proc/r.json: No such file or directory|--out /proc/r.json: "
                                         r"directory /proc is not writable)$"):  # as root | as a user
        check_output_file("/proc/r.json", [], force=False)


def test_an_output_on_a_read_only_file_system_is_named_not_its_temporary(tmp_path, monkeypatch):
    """It said "[Errno 30] Read-only file system: '.tok.tmp-vm-29639-u3xfooht'"."""
    def read_only(prefix: str, dir: str) -> str:
        raise OSError(30, "Read-only file system", os.path.join(dir, prefix + "u3xfooht"))

    monkeypatch.setattr("tinyk.outputs.tempfile.mkdtemp", read_only)
    with pytest.raises(TinykError,
                       match=rf"^cannot write in {re.escape(str(tmp_path))}: the file system is read-only$"):
        with atomic_dir(tmp_path / "tok"):
            pass


def test_only_temporaries_of_dead_processes_on_this_machine_are_removed(tmp_path):
    dead, alive, host = dead_pid(), os.getppid(), _host()
    keep = [f".out.tmp-{host}-{alive}-abc123", f".out.tmp-{host}-{os.getpid()}-mine", ".out.tmp-legacy12",
            f".other.tmp-{host}-{dead}-x", f".out.tmp-{host}-{dead}", f"out.tmp-{host}-{dead}-x",
            f".out.old-{host}-{alive}", f".out.tmp-{host}-{dead}-a.b",
            f".out.tmp-{dead}-abc123", f".out.old-{dead}",  # older versions' names: no host, owner unknown
            f".out.tmp-{host}x-{dead}-abc123", f".out.old-other-{host}-{dead}"]  # another machine's
    gone = [f".out.tmp-{host}-{dead}-abc123", f".out.old-{host}-{dead}"]
    for name in keep + gone:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"x" * 100)
    (tmp_path / f".out.tmp-{host}-{dead}-afile").write_text("a file, not ours")
    keep.append(f".out.tmp-{host}-{dead}-afile")
    with atomic_dir(tmp_path / "out", force=True) as tmp:  # the dead .old- one is put back, then replaced
        (tmp / "f").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*keep, "out"])
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["f"]  # weights go with the output they were
    assert remove_stale_temps(tmp_path / "out") == []


def test_windows_asks_its_kernel_whether_a_leftovers_process_still_runs(monkeypatch):
    """On Windows every leftover counted as its (running) owner's, so a kill's never went: `OpenProcess`
    and the exit code say, with a fake kernel32 here (87: no such process; 5: someone else's)."""
    import ctypes

    from tinyk.outputs import _windows_pid_running

    processes = {10: 259, 11: 0}  # running (STILL_ACTIVE), ended but a handle still open
    last_error, closed = [], []

    class Kernel32:
        def OpenProcess(self, access, inherit, pid):
            if pid in processes:
                return pid
            last_error.append(5 if pid == 12 else 87)
            return 0

        def GetExitCodeProcess(self, handle, code):
            code._obj.value = processes[handle]
            return 1

        def CloseHandle(self, handle):
            closed.append(handle)

    monkeypatch.setattr(ctypes, "WinDLL", lambda name, use_last_error: Kernel32(), raising=False)
    monkeypatch.setattr(ctypes, "get_last_error", lambda: last_error[-1], raising=False)
    assert [_windows_pid_running(pid) for pid in (10, 11, 12, 13)] == [True, False, True, False]
    assert closed == [10, 11]


def test_a_file_a_killed_write_left_half_written_goes_with_the_next_write(tmp_path):
    """`tinyk eval --out res.json` killed while writing left `.res.json.tmp-PID`, which nothing ever removed."""
    dead, host = dead_pid(), _host()
    stale = tmp_path / f".res.json.tmp-{host}-{dead}"
    stale.write_text('{"half')
    keep = [f".res.json.tmp-{host}-{os.getppid()}", f".res.json.tmp-{dead}", f".res.json.tmp-other-{dead}",
            f".other.json.tmp-{host}-{dead}"]  # alive, an older name, another machine's, another file's
    for name in keep:
        (tmp_path / name).write_text("x")
    (tmp_path / f".res.json.tmp-{host}-{dead}-dir").mkdir()  # an atomic_dir's: remove_stale_temps' business
    keep.append(f".res.json.tmp-{host}-{dead}-dir")
    write_json_atomic(tmp_path / "res.json", {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*keep, "res.json"])
    assert json.loads((tmp_path / "res.json").read_text()) == {"a": 1}


def test_an_output_moved_aside_by_a_killed_replace_is_put_back(tmp_path):
    """Killed between moving the old output aside and the new one in, a --force run leaves only the
    old one under its `.old-` name: the next run puts it back rather than deleting it with the leftovers."""
    old = tmp_path / f".out.old-{_host()}-{dead_pid()}"
    old.mkdir()
    (old / "model.bin").write_bytes(b"weights")
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "out", force=True):
        raise RuntimeError("the new output fails to build")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (tmp_path / "out" / "model.bin").read_bytes() == b"weights"
    (tmp_path / "out").rename(old)  # and a run without --force, once it is back, does not replace it
    with pytest.raises(TinykError, match="output directory exists"), atomic_dir(tmp_path / "out"):
        pass
    assert (tmp_path / "out" / "model.bin").read_bytes() == b"weights" and not old.exists()


def test_force_replaces_only_what_the_output_holds_and_keeps_the_users_own_entries(tmp_path, monkeypatch, capsys):
    """`tinyk demo --out d` again, after `tinyk eval ... --out d/my_eval.json`: the demo's files are
    replaced, the user's are not deleted with them; also when the replace was killed half-way."""
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "model").write_text("old")
    (out / "my_eval.json").write_text("{}")
    (out / "my_run").mkdir()
    (out / "chat_template.jinja").write_text("old")  # transformers' save_pretrained: it describes the old one
    (out / "pytorch_model.bin").write_text("old")
    for mine in ("vocab_notes.md", "tokenizer_stats.json", "training_args.bin", "lora.pt", "emb.npy", "vocab_study"):
        (out / mine).write_text("mine")  # only names tinyk or transformers give a model's files go with it
    (out / "chat").mkdir()  # a model inside the output, as the demo's chat/: notes beside it stay too
    (out / "chat" / "config.json").write_text("old")
    (out / "chat" / "notes.txt").write_text("mine")
    # In any folder both have (the demo's runs/ beside its runs): a run of the user's there was deleted.
    (out / "runs" / "myrun").mkdir(parents=True)
    (out / "runs" / "myrun" / "f").write_text("mine")
    # A dataset or a run is not merged: a shard or a best/ the new one lacks is the old one's, not the user's.
    (out / "data" / "pretrain" / "train").mkdir(parents=True)
    (out / "data" / "pretrain" / "meta.json").write_text("old")
    (out / "data" / "pretrain" / "train" / "shard_0009.bin").write_text("old")
    (out / "runs" / "pretrain" / "best").mkdir(parents=True)
    (out / "runs" / "pretrain" / "config.yaml").write_text("old")
    with atomic_dir(out, force=True) as tmp:
        (tmp / "model").write_text("new")
        (tmp / "chat").mkdir()
        (tmp / "chat" / "config.json").write_text("new")
        (tmp / "runs" / "pretrain").mkdir(parents=True)
        (tmp / "runs" / "pretrain" / "config.yaml").write_text("new")
        (tmp / "data" / "pretrain" / "train").mkdir(parents=True)
        (tmp / "data" / "pretrain" / "meta.json").write_text("new")
    assert {p.name: p.is_dir() or p.read_text() for p in out.iterdir()} == {
        "model": "new", "my_eval.json": "{}", "my_run": True, "vocab_notes.md": "mine", "tokenizer_stats.json": "mine",
        "training_args.bin": "mine", "lora.pt": "mine", "emb.npy": "mine", "vocab_study": "mine", "chat": True,
        "runs": True, "data": True}
    assert {p.name: p.read_text() for p in (out / "chat").iterdir()} == {"config.json": "new", "notes.txt": "mine"}
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["myrun", "pretrain"]
    assert (out / "runs" / "myrun" / "f").read_text() == "mine"
    assert [p.name for p in (out / "runs" / "pretrain").iterdir()] == ["config.yaml"]
    assert not any((out / "data" / "pretrain" / "train").iterdir())
    old = tmp_path / f".out.old-{_host()}-{dead_pid()}"  # killed after the swap, before the carry-over
    old.mkdir()
    (old / "model").write_text("older")
    (old / "notes.txt").write_text("mine")
    assert remove_stale_temps(out) == [old]
    assert (out / "notes.txt").read_text() == "mine" and (out / "model").read_text() == "new"
    # Moving them fails (a read-only folder of the user's): the new output stands, theirs stay aside.
    monkeypatch.setattr("tinyk.outputs._carry_over", lambda old, new: (_ for _ in ()).throw(PermissionError(13, "no")))
    with atomic_dir(out, force=True) as tmp:
        (tmp / "model").write_text("newer")
    assert (out / "model").read_text() == "newer" and "keeps files of the replaced" in capsys.readouterr().err
    kept = [p for p in tmp_path.iterdir() if ".out.old-" in p.name]
    assert len(kept) == 1 and (kept[0] / "my_eval.json").read_text() == "{}"


def test_an_output_that_appears_while_a_command_runs_is_not_replaced(tmp_path):
    """Another run (or the user) made `out` meanwhile: refused as it would have been at the start, and
    this run's output is kept beside it, not thrown away."""
    out = tmp_path / "tok"
    with pytest.raises(TinykError, match=r"output directory exists: .*tok \(use --force.*appeared or changed while "
                                         r"this ran; the new output is kept as .*tok\.new\)"):
        with atomic_dir(out) as tmp:
            (tmp / "tokenizer.json").write_text("ours")
            out.mkdir()
            (out / "config.json").write_text("theirs")
    assert (out / "config.json").read_text() == "theirs" and not (out / "tokenizer.json").exists()
    assert (tmp_path / "tok.new" / "tokenizer.json").read_text() == "ours"
    shutil.rmtree(out)
    with pytest.raises(TinykError, match=r"is not a tinyk tokenizer.*kept as .*tok\.new-2\)"):  # --force too
        with atomic_dir(out, force=True, replaces=("a tinyk tokenizer", lambda p: (p / "tokenizer.json").exists())):
            out.mkdir()
            (out / "config.json").write_text("theirs, again")
    # A dataset, written in .NAME.partial to be continued: it is complete now, so it is kept as well.
    data = tmp_path / "data"
    with pytest.raises(TinykError, match=r"kept as .*data\.new\)"):
        with atomic_dir(data, partial=True) as tmp:
            (tmp / "meta.json").write_text("ours")
            data.mkdir()
    assert (tmp_path / "data.new" / "meta.json").read_text() == "ours" and not (tmp_path / ".data.partial").exists()
    # A name near the 255-byte limit gets a legal one beside it.
    long = tmp_path / ("长" * 84)
    with pytest.raises(TinykError, match=r"kept as .*\.new\)"):
        with atomic_dir(long) as tmp:
            (tmp / "w").write_text("ours")
            long.mkdir()
    assert [(p / "w").read_text() for p in tmp_path.iterdir() if p.name.startswith("长") and p.name.endswith(".new")] \
        == ["ours"]
    assert (out / "config.json").read_text() == "theirs, again"
    # Two `tinyk demo --out X` (or tokenizer --force) at once: each replaces what was there when it began,
    # never the other's newer output (both said "saved" and the first one's was lost).
    out = tmp_path / "tok2"
    with atomic_dir(out) as tmp:
        (tmp / "tokenizer.json").write_text("before")
    with pytest.raises(TinykError, match=r"^output directory .*tok2 is not replaced \(.*tok2 appeared or changed "
                                         r"while this ran; the new output is kept as .*tok2\.new\)$"):
        with atomic_dir(out, force=True) as tmp:
            (tmp / "tokenizer.json").write_text("ours")
            with atomic_dir(out, force=True) as other:
                (other / "tokenizer.json").write_text("theirs")
    assert (out / "tokenizer.json").read_text() == "theirs"
    assert (tmp_path / "tok2.new" / "tokenizer.json").read_text() == "ours"


def test_an_output_named_through_itself_is_replaced_in_place(tmp_path, monkeypatch):
    """--out m/../m --force: moving m aside must not cut the way to where the new one goes."""
    monkeypatch.chdir(tmp_path)
    with atomic_dir("m") as tmp:
        (tmp / "w").write_text("old")
    with atomic_dir("m/../m", force=True) as tmp:
        (tmp / "w").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"] and (tmp_path / "m" / "w").read_text() == "new"


def test_an_output_name_near_the_filesystem_limit_gets_legal_temporaries(tmp_path, corpus_file):
    """A name of 250 bytes is legal; `.{name}.tmp-{host}-{pid}-XXXX` beside it would not be."""
    name = "语料" * 20 + "x" * 130  # 250 bytes
    assert len(name.encode()) == 250
    out = tmp_path / name
    train_tokenizer([corpus_file], out, vocab_size=300, show_progress=False)
    train_tokenizer([corpus_file], out, vocab_size=300, show_progress=False, force=True)  # beside an .old one
    assert (out / "tokenizer.json").is_file()
    write_json_atomic(tmp_path / (name[:-5] + ".json"), {"a": 1})
    dead = dead_pid()
    left = tmp_path / f".{_stem(name)}.tmp-{_host()}-{dead}-abcdefgh"
    assert len(os.fsencode(left.name)) <= 255 and _stem(name) != name
    left.mkdir()
    with atomic_dir(out, force=True) as tmp:
        (tmp / "f").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, name[:-5] + ".json"])
    chinese = "长" * 80  # 240 bytes: its temporary's name is cut, never inside a character (tokenizers refused it)
    assert all(_stem(chinese[:n]).encode("utf-8") for n in range(60, 81))
    train_tokenizer([corpus_file], tmp_path / chinese, vocab_size=300, show_progress=False)


def test_a_later_run_removes_what_a_killed_one_left(tmp_path):
    out = tmp_path / "out"
    script = ("import sys, time\nfrom tinyk.outputs import atomic_dir\n"
              "with atomic_dir(sys.argv[1]) as t:\n    (t / 'big.bin').write_bytes(b'x' * 100000)\n"
              "    print(t, flush=True)\n    time.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", script, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        left = Path(p.stdout.readline().strip())
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        p.stdout.close()
    assert left.is_dir() and left.name.startswith(f".out.tmp-{_host()}-{p.pid}-") and not out.exists()
    with atomic_dir(out) as tmp:
        (tmp / "f").write_text("done")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["out"]


# ---------------------------------------------------------------- 6. a file where a directory belongs

def test_marker_file_says_a_file_is_not_a_directory(tmp_path, capsys):
    f = tmp_path / "tokenizer.json"
    f.write_text("{}")
    with pytest.raises(TinykError, match=f"tokenizer directory {f} is a file, not a directory"):
        marker_file(f, "tokenizer.json", "tokenizer")
    with pytest.raises(TinykError, match="tokenizer directory not found"):
        marker_file(tmp_path / "nope", "tokenizer.json", "tokenizer")
    src = tmp_path / "c.jsonl"
    src.write_bytes(JSONL)
    code, err = run_cli(["data", "pretrain", "--input", src, "--tokenizer", f, "--out", tmp_path / "d"], capsys)
    assert code == 2 and "is a file, not a directory" in one_error_line(err)


# ---------------------------------------------------------------- 7. names, places and signals

def test_the_format_comes_from_the_suffix_not_a_txt_inside_the_name(tmp_path):
    src = tmp_path / "corpus.txt.jsonl"
    src.write_bytes(JSONL[:2000].rsplit(b"\n", 1)[0] + b"\n")
    assert next(iter_texts([src], Skips())) == DOCS[0]["text"]


def test_skips_name_the_path_where_file_names_repeat(tmp_path):
    a, b = tmp_path / "a" / "part-0.jsonl", tmp_path / "b" / "part-0.jsonl"
    for p in (a, b):
        p.parent.mkdir()
        p.write_text('{"text": "好"}\n{bad\n', encoding="utf-8")
    one = tmp_path / "c.jsonl"
    one.write_text("{bad\n", encoding="utf-8")
    skips = Skips()
    list(iter_texts([a, b, one], skips))
    assert skips.first["malformed_json"] == [f"{a}:2", f"{b}:2", "c.jsonl:1"]


def test_an_undecodable_file_name_is_written_as_replacement_characters(tmp_path, tok_dir, capsys):
    src = Path(os.fsdecode(bytes(tmp_path) + b"/\xd6\xd0\xce\xc4.jsonl"))  # GBK "中文", as a Windows zip leaves it
    src.write_bytes(JSONL[:5000].rsplit(b"\n", 1)[0] + b"\n{bad\n")
    code, err = run_cli(["data", "pretrain", "--input", src, "--tokenizer", tok_dir, "--out", tmp_path / "d"], capsys)
    meta = json.loads((tmp_path / "d" / "meta.json").read_text(encoding="utf-8"))
    assert code == 0 and meta["inputs"][0]["path"].endswith("/\ufffd\ufffd\ufffd\ufffd.jsonl")
    assert meta["skipped"]["first"]["malformed_json"][0].startswith("\ufffd")


@pytest.mark.parametrize("name,module,package", [("c.parquet", "pyarrow.parquet", "pyarrow"),
                                                  ("c.jsonl.zst", "zstandard", "zstandard")])
def test_a_missing_reader_is_said_before_any_input_is_read(tmp_path, monkeypatch, name, module, package):
    """Not after hours spent on the inputs listed before the file that needs it."""
    first, second = tmp_path / "a.jsonl", tmp_path / name
    first.write_text('{"text": "好"}\n', encoding="utf-8")
    second.write_bytes(b"")
    monkeypatch.setitem(sys.modules, module, None)  # what a missing package looks like to import
    with pytest.raises(TinykError, match=f"needs the '{package}' package \\(pip install {package}\\)"):
        check_inputs([first, second])


def test_a_folder_named_in_gbk_holds_a_whole_run(tmp_path, corpus_file, capsysbinary):
    """tokenizers and safetensors (Rust) take str paths as UTF-8; a folder named in the locale's GBK, or
    unpacked from a Windows zip, holds other bytes and every stage must still find its files."""
    root = Path(os.fsdecode(bytes(tmp_path) + b"/\xd6\xd0\xce\xc4"))  # GBK "中文"
    root.mkdir()
    tok, data, model = root / "tok", root / "data", root / "model"
    steps = [["tokenizer", "train", corpus_file, "--out", tok, "--vocab-size", 600],
             ["data", "pretrain", "--input", corpus_file, "--tokenizer", tok, "--out", data],
             ["model", "init", "--preset", "nano", "--tokenizer", tok, "--out", model],
             ["model", "info", model],
             ["pretrain", "--init", model, "--data", data, "--out", root / "run", "--seq-len", 32, "--batch-size", 8,
              "--max-steps", 2, "--save-every", 1, "--no-progress"],
             ["pretrain", "--out", root / "run", "--resume", "--max-steps", 3, "--no-progress"],
             ["generate", "--model", root / "run" / "final", "--prompt", "第", "--max-new-tokens", 3],
             ["eval", "--model", root / "run" / "final", "--data", data, "--out", root / "results.json"]]
    for args in steps:
        with pytest.raises(SystemExit) as e:
            main([str(a) for a in args])
        out, err = capsysbinary.readouterr()
        assert e.value.code == 0, (args[:2], err)
        if args[0] == "tokenizer":  # the path is printed as its own bytes, as `ls` shows it
            assert b"saved to " + bytes(tok) + b"\n" in out
    # On stderr too, whose errors= is backslashreplace: it printed \udcd6\udcd0 for the bytes.
    r = subprocess.run([sys.executable, "-m", "tinyk", "model", "info", bytes(root / "nope")], capture_output=True,
                       timeout=120)
    assert r.returncode == 2 and bytes(root / "nope") in r.stderr and b"\\udc" not in r.stderr
    assert json.loads((model / "config.json").read_text(encoding="utf-8"))["vocab_size"] \
        == load_tokenizer(tok).vocab_size
    shown_root = os.fsencode(root).decode("utf-8", "replace")  # how JSON outputs name it
    assert json.loads((root / "run" / "summary.json").read_text(encoding="utf-8"))["final_model"] \
        == f"{shown_root}/run/final"
    assert json.loads((root / "results.json").read_text(encoding="utf-8"))["model"] == f"{shown_root}/run/final"
    # --json on stdout names it so too: as its own bytes the output was no UTF-8, which no JSON reader takes.
    for args, key in ((["tokenizer", "eval", tok, "--json"], "path"), (["model", "info", model, "--json"], "path"),
                      (["eval", "--model", root / "run" / "final", "--data", data, "--json"], "model")):
        with pytest.raises(SystemExit) as e:
            main([str(a) for a in args])
        assert e.value.code == 0 and json.loads(capsysbinary.readouterr().out.decode("utf-8"))[key].startswith(
            shown_root), args[:2]
    check = transformers_check(root / "run" / "final", Engine.from_dir(root / "run" / "final"), max_new_tokens=4)
    assert check["ok"], check


@pytest.mark.parametrize("out", [".", "..", "./"])
def test_the_current_directory_is_not_an_output(tmp_path, tok_dir, out, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = tmp_path / "c.jsonl"
    src.write_bytes(JSONL[:5000].rsplit(b"\n", 1)[0] + b"\n")
    code, err = run_cli(["data", "pretrain", "--input", src, "--tokenizer", tok_dir, "--out", out, "--force"], capsys)
    assert code == 2 and "must be named" in one_error_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl"]


def test_an_unexpanded_tilde_is_not_made_a_folder(tmp_path, tok_dir, nano_model_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for args in (["model", "init", "--preset", "nano", "--tokenizer", tok_dir, "--out=~/m"],
                 ["eval", "--model", nano_model_dir, "--out=~/r.json"]):
        code, err = run_cli(args, capsys)
        assert code == 2 and "~ was not expanded to a home directory (a shell does so only at the start of a word" \
            in one_error_line(err)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "~").mkdir()  # a folder really named so is the user's choice
    code, err = run_cli(["model", "init", "--preset", "nano", "--tokenizer", tok_dir, "--out=~/m"], capsys)
    assert code == 0 and (tmp_path / "~" / "m" / "config.json").is_file()


def test_force_replaces_a_link_not_what_it_points_to(tmp_path, capsys):
    """And says so: the output may now lie on another disk than the one the link led to."""
    target = tmp_path / "real"
    target.mkdir()
    (target / "meta.json").write_text("{}")
    link = tmp_path / "out"
    link.symlink_to(target)
    with atomic_dir(link, force=True, replaces=("a test output", lambda d: (d / "meta.json").is_file())) as tmp:
        (tmp / "meta.json").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "real"]
    assert not link.is_symlink() and (link / "meta.json").read_text() == "new"
    assert (target / "meta.json").read_text() == "{}"
    assert capsys.readouterr().err == (f"tinyk: note: {link} was a link to {target}; it is now a folder of its own "
                                       f"here, and the folder it pointed to is left as it was\n")
    dangling = tmp_path / "gone"
    dangling.symlink_to(tmp_path / "nowhere")
    with atomic_dir(dangling, force=True) as tmp:
        (tmp / "f").write_text("x")
    assert dangling.is_dir() and not dangling.is_symlink()


def test_an_output_that_is_a_dangling_link_says_where_it_points(tmp_path, tok_dir, pt_data, corpus_file, capsys):
    """`runs -> /mnt/disk/runs` with the disk not mounted: an atomic output was refused as one that
    "exists", and a training run's --out ended in "cannot write runs/base: File exists"."""
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "disk" / "runs")
    where = f"{link} is a symbolic link to {tmp_path / 'disk' / 'runs'}, which does not exist (a disk not mounted?); "
    with pytest.raises(TinykError) as e, atomic_dir(link, force=False):
        pass
    assert str(e.value) == f"output {where}remove the link, or use --force to replace it with a folder"
    with pytest.raises(TinykError) as e:
        check_output_file(link, [], force=True)
    assert str(e.value) == f"--out {where}remove the link or choose another path"
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--preset", "nano", "--data", str(pt_data), "--tokenizer", str(tok_dir),
              "--out", str(link), "--max-steps", "1"])
    assert e.value.code == 2
    assert capsys.readouterr().err == f"tinyk: error: --out {where}create its target or remove the link\n"
    # The link a folder above --out (it said "runs is a file, not a directory").
    for args in (["pretrain", "--preset", "nano", "--data", str(pt_data), "--tokenizer", str(tok_dir)],
                 ["tokenizer", "train", str(corpus_file)]):
        with pytest.raises(SystemExit) as e:
            main([*args, "--out", str(link / "base")])
        assert e.value.code == 2
        assert capsys.readouterr().err == (f"tinyk: error: --out {link / 'base'}: {where}create its target or remove "
                                           f"the link\n")
    assert link.is_symlink() and not link.exists()


def test_a_mount_point_is_refused_as_an_output_before_the_work(tmp_path, monkeypatch):
    """`docker -v host:/out ... --out /out --force` failed with EBUSY once the work was done, leaving a
    full copy hidden beside the mount, on the other disk."""
    out = tmp_path / "vol"
    out.mkdir()
    real = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == out or real(p))
    said = f"output {out} is a mount point (a volume, a Docker -v folder), which cannot be replaced"
    for force in (False, True):
        with pytest.raises(TinykError, match=re.escape(said)), atomic_dir(out, force=force):
            pytest.fail("the work began")
    monkeypatch.setattr(os.path, "ismount", real)  # a bind mount that ismount() does not see: EBUSY at the end
    real_replace = os.replace

    def busy(src, dst):
        if Path(src) == out:
            raise OSError(errno.EBUSY, "Device or resource busy")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", busy)
    with pytest.raises(TinykError, match=re.escape(said) + r".*\(this output is kept as " + re.escape(str(out)) +
                       r"\.new\)$"), atomic_dir(out, force=True) as tmp:
        (tmp / "f").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vol", "vol.new"] and (tmp_path / "vol.new" / "f").is_file()


def test_an_output_named_as_an_input_in_another_case_is_that_input_where_case_is_ignored(tmp_path, monkeypatch):
    """macOS and Windows ignore case: --init runs/Base --out runs/base --force would replace the input."""
    from tinyk.outputs import check_output

    (tmp_path / "Base" / "sub").mkdir(parents=True)
    for out in (tmp_path / "base", tmp_path / "BASE" / "sub"):
        check_output(out, [tmp_path / "Base" / "sub"])  # on this file system, other folders

    def case_blind(a, b):
        return str(a).lower() == str(b).lower() and os.path.exists(a) and os.path.exists(b)

    monkeypatch.setattr(os.path, "samefile", case_blind)
    (tmp_path / "base").mkdir()  # what exists there: the same folder
    with pytest.raises(TinykError, match="would replace the input"):
        check_output(tmp_path / "base", [tmp_path / "Base" / "sub"])
    with pytest.raises(TinykError, match="lies inside the input"):
        check_output(tmp_path / "base" / "new", [tmp_path / "Base"])


def test_an_output_file_with_a_long_legal_name_passes_the_write_probe(tmp_path):
    name = "数" * 80 + ".json"  # 245 bytes: the probe's name was 265, past the 255 a file system allows
    check_output_file(tmp_path / name, [], force=False)
    assert list(tmp_path.iterdir()) == []


def test_force_never_deletes_a_folder_this_command_did_not_make(tmp_path, tok_dir, sft_data, capsys):
    src = tmp_path / "c.jsonl"
    src.write_bytes(JSONL[:5000].rsplit(b"\n", 1)[0] + b"\n")
    thesis = tmp_path / "thesis"
    (thesis / "sub").mkdir(parents=True)
    (thesis / "sub" / "thesis.tex").write_text("years of work")
    code, err = run_cli(["data", "pretrain", "--input", src, "--tokenizer", tok_dir, "--out", thesis, "--force"],
                        capsys)
    assert code == 2 and "not pretrain data made by tinyk data pretrain, so it is not replaced (it holds sub)" in \
        one_error_line(err)
    assert (thesis / "sub" / "thesis.tex").read_text() == "years of work"
    code, err = run_cli(["data", "pretrain", "--input", src, "--tokenizer", tok_dir, "--out", tok_dir, "--force"],
                        capsys)
    assert code == 2 and "would replace the input" in err
    # Data of the other kind is not what `data pretrain --force` makes: an SFT set is never replaced by it.
    sft = tmp_path / "sft"
    shutil.copytree(sft_data, sft)
    before = sorted((p.relative_to(sft), p.read_bytes()) for p in sft.rglob("*") if p.is_file())
    code, err = run_cli(["data", "pretrain", "--input", src, "--tokenizer", tok_dir, "--out", sft, "--force"], capsys)
    assert code == 2 and one_error_line(err) == (
        f"tinyk: error: {sft} holds sft data, which tinyk data pretrain --force does not replace; choose another "
        f"--out, or delete it first")
    assert sorted((p.relative_to(sft), p.read_bytes()) for p in sft.rglob("*") if p.is_file()) == before


@pytest.mark.parametrize("sig,code,said", [(signal.SIGTERM, 143, "terminated"),
                                           (signal.SIGHUP, 129, "stopped by SIGHUP")])
def test_sigterm_stops_data_preparation_like_ctrl_c(tmp_path, tok_dir, capsys, monkeypatch, request, sig, code,
                                                    said):
    """`kill` or `timeout`, or the terminal going away, gets the same clean-up as Ctrl-C: one line, exit
    128 + the signal's number, no partial output."""
    from tinyk import data

    if sig == signal.SIGHUP:  # a test session under nohup ignores it, and so would the command
        original = signal.signal(sig, signal.SIG_DFL)
        request.addfinalizer(lambda: signal.signal(sig, original))
    encode = data._encode

    def encode_then_signal(job, payload):
        os.kill(os.getpid(), sig)
        return encode(job, payload)

    monkeypatch.setattr(data, "_encode", encode_then_signal)
    src = tmp_path / "c.jsonl"
    src.write_bytes(JSONL)
    before = signal.getsignal(sig)
    args = ["data", "pretrain", "--input", src, "--tokenizer", tok_dir, "--out", tmp_path / "d", "--workers", "1"]
    assert run_cli(args, capsys) == (code, f"tinyk: {said}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl"]
    assert signal.getsignal(sig) is before
    if sig == signal.SIGHUP:  # under nohup the command goes on
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        try:
            code, _ = run_cli(args, capsys)
        finally:
            signal.signal(signal.SIGHUP, before)
        assert code == 0 and (tmp_path / "d").is_dir()


@pytest.mark.parametrize("stage,records", [
    ("pretrain", [{"text": "第一条"}, {"text": "第二条"}]),
    ("pretrain", [{"content": "第一条"}, {"content": "第二条"}]),  # a message's key, but pretraining has no lists
    ("sft", [{"conversations": [{"from": "human", "value": "你好"}, {"from": "assistant", "value": "你好！"}]}] * 2),
    ("sft", [[{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]] * 2),  # the seed's
], ids=["text", "content", "sft", "seed conversations"])
@pytest.mark.parametrize("layout", ["indented", "one line", "one long line"])
def test_a_json_array_of_records_is_named_with_the_way_out(tmp_path, tok_dir, capsys, stage, records, layout):
    """json.dump of a list, pretty-printed or on one line (even one too long to read as a line), is not
    JSON Lines: refused with the conversion, not taken as one bad record while the rest of a run goes on."""
    src = tmp_path / "alpaca.json"
    src.write_text(json.dumps(records, ensure_ascii=False, indent=2 if layout == "indented" else None))
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps(records[0], ensure_ascii=False) + "\n")
    limit = ["--max-line-bytes", "200"] if layout == "one long line" else []
    limit += ["--field", "content"] if "content" in records[0] else []
    code, err = run_cli(["data", stage, "--input", good, "--input", src, "--tokenizer", tok_dir, "--out",
                         tmp_path / "d", *limit], capsys)
    assert code == 2 and "one JSON array, not JSON Lines" in one_error_line(err), err
    assert f"jq -c '.[]' {src} > {tmp_path / 'alpaca.lines.jsonl'}" in err and not (tmp_path / "d").exists()


def test_the_first_thousand_lines_decide_the_encoding(tmp_path):
    """A GBK file with UTF-8 lines after its first thousand is refused as GBK, not read as 1,500 documents
    with 1,000 skipped."""
    src = tmp_path / "mixed.txt"
    src.write_bytes("你好\n".encode("gbk") * 1000 + "你好\n".encode() * 1500)
    with pytest.raises(TinykError, match=r"mixed.txt: not UTF-8 text \(1,000 of 1,000 lines read could not be decoded"):
        texts(src)


def test_a_record_is_named_by_a_text_of_twenty_characters_or_more(tmp_path):
    src = tmp_path / "r.txt"
    src.write_text(json.dumps({"body": "x" * 20}) + "\n", encoding="utf-8")
    with pytest.raises(TinykError, match=r"name it r.jsonl to read their 'body' field with --field=body$"):
        texts(src)
    src.write_text(json.dumps({"body": "x" * 19}) + "\n", encoding="utf-8")  # too short to say it is the text
    assert texts(src) == [json.dumps({"body": "x" * 19})]


def test_one_pretty_printed_conversation_is_named_an_array_for_sft(tmp_path, tok_dir, capsys):
    """json.dump(turns, indent=2): one conversation, not JSON Lines; each of its lines was skipped as
    malformed instead."""
    turns = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]
    src = tmp_path / "chat.json"
    src.write_text(json.dumps(turns, ensure_ascii=False, indent=2), encoding="utf-8")
    code, err = run_cli(["data", "sft", "--input", src, "--tokenizer", tok_dir, "--out", tmp_path / "d"], capsys)
    assert code == 2 and "chat.json: one JSON array, not JSON Lines" in one_error_line(err), err


def test_small_input_helpers_at_their_edges(tmp_path):
    """One empty file among others is read as none; a key that is a lone surrogate is no text; a 40-character
    key is quoted whole; as many records skipped as kept is no warning."""
    empty, full = tmp_path / "e.jsonl", tmp_path / "f.jsonl"
    empty.touch()
    full.write_text('{"text": "好"}\n', encoding="utf-8")
    assert check_inputs([empty, full]) == [empty, full]
    assert has_surrogate({"\ud800": "x"}) and not has_surrogate({"键": "x"})
    assert short_repr("a" * 40) == repr("a" * 40) and short_repr("a" * 41) == repr("a" * 40) + "..."
    assert mostly_skipped(2, 2, "documents") is None and mostly_skipped(3, 2, "documents") is not None


def test_a_lone_cr_on_stdin_ends_a_prompt_as_in_files(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("a\rb\n\ufeffc\r\n"))
    assert read_prompts([], "-") == (["a", "b", "c"], None)


@pytest.mark.parametrize("start", [b"\n", b"\xef\xbb\xbf\r\n"])
def test_a_json_array_after_a_blank_line_is_named_too(tmp_path, start):
    """Only the first physical line was looked at: the array's elements became malformed records."""
    src = tmp_path / "arr.json"
    src.write_bytes(start + json.dumps([{"text": "好"}, {"text": "天"}], indent=1).replace("\n", "\r\n").encode())
    with pytest.raises(TinykError, match=r"arr.json: one JSON array, not JSON Lines"):
        texts(src)


def test_a_run_on_a_sliver_of_its_input_says_so(tmp_path, tok_dir, capsys):
    """Most records skipped (a wrong --field) made a tokenizer or dataset of almost nothing, with exit 0
    and the figures only in the summary."""
    src = tmp_path / "c.jsonl"
    recs = [{"text": "今天天气很好"}, {"text": "我们去公园"}] + [{"content": f"第{i}条"} for i in range(3)]
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    warning = ("tinyk: warning: more of the input was skipped (3 records) than kept (2 documents); "
               "the summary says why\n")
    code, err = run_cli(["data", "pretrain", "--input", src, "--tokenizer", tok_dir, "--out", tmp_path / "d"], capsys)
    assert code == 0 and err == warning
    code, err = run_cli(["tokenizer", "train", src, "--out", tmp_path / "t", "--vocab-size", "300"], capsys)
    assert code == 0 and err == warning
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs[:3]), encoding="utf-8")
    code, err = run_cli(["data", "pretrain", "--input", src, "--tokenizer", tok_dir, "--out", tmp_path / "d2"], capsys)
    assert code == 0 and err == ""


def test_a_pretty_printed_json_object_is_named_with_the_way_out(tmp_path, tok_dir, capsys):
    """It was 'malformed json' on every line, which says nothing of what is wrong."""
    src = tmp_path / "obj.json"
    src.write_text(json.dumps({"data": [{"text": "好"}, {"text": "天"}]}, indent=2))
    code, err = run_cli(["data", "pretrain", "--input", src, "--tokenizer", tok_dir, "--out", tmp_path / "d"], capsys)
    assert code == 2 and one_error_line(err).endswith("obj.json: one JSON object written over many lines, not JSON "
                                                      "Lines (one record per line); write its records one per line "
                                                      "first, e.g. for a list of them under KEY: jq -c '.KEY[]' FILE "
                                                      "> records.jsonl")


def test_the_jq_hint_never_writes_over_its_input_or_a_likely_sibling():
    """`> Corpus.jsonl` empties Corpus.JSONL on macOS and Windows before jq reads it."""
    from tinyk.inputs import _jq_hint

    for name, out in (("Corpus.JSONL", "Corpus.lines.jsonl"), ("data.v2.json", "data.v2.lines.jsonl"),
                      ("a.json", "a.lines.jsonl"), ("x.lines.jsonl", "x.lines.lines.jsonl"),
                      (".json", "records.lines.jsonl")):
        assert _jq_hint(Path(name)).endswith(f" > {out}"), name


def test_a_line_that_is_a_list_of_messages_is_one_conversation(tmp_path, tok_dir, capsys):
    """The seed's SFT format: each line a list of {role, content} messages; not an array of records."""
    conv = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]
    src = tmp_path / "seed.jsonl"
    src.write_text("\n".join(json.dumps(conv, ensure_ascii=False) for _ in range(3)) + "\n")
    code, err = run_cli(["data", "sft", "--input", src, "--tokenizer", tok_dir, "--out", tmp_path / "d"], capsys)
    assert code == 0, err
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    assert sum(split["documents"] for split in meta["splits"].values()) == 3 and meta["skipped"]["total"] == 0
    # Whatever the order of a message's keys (a chat app's export names its speaker first).
    named = tmp_path / "named.jsonl"
    named.write_text("\n".join(json.dumps([{"name": "u1", **conv[0]}, conv[1]], ensure_ascii=False)
                               for _ in range(3)) + "\n")
    code, err = run_cli(["data", "sft", "--input", named, "--tokenizer", tok_dir, "--out", tmp_path / "n"], capsys)
    assert code == 0, err
    # A bad first conversation (cut short, empty, a message without its text) is a record to skip, not a
    # sign that the file is one JSON array.
    good = "\n".join(json.dumps(conv, ensure_ascii=False) for _ in range(3)) + "\n"
    cut = json.dumps(conv, ensure_ascii=False)[:-5]
    for first, records in ((cut, 3), ("[]", 4), ('[{"role": "assistant", "tool_calls": []}]', 4)):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(first + "\n" + good)
        assert len(list(iter_records([bad], Skips(), message_lists=True))) == records, first
    # Read as text, they are conversations, not "one JSON array" to split into records with jq.
    # An array of records whose first key is a message's is still an array.
    arr = tmp_path / "arr.json"
    arr.write_text(json.dumps([{"from": "zh", "text": "你好"}, {"from": "en", "text": "hi"}]), encoding="utf-8")
    with pytest.raises(TinykError, match="arr.json: one JSON array, not JSON Lines"):
        texts(arr)
    for args in (["tokenizer", "train", src, "--out", tmp_path / "t"],
                 ["data", "pretrain", "--input", src, "--tokenizer", tok_dir, "--out", tmp_path / "p"]):
        code, err = run_cli(args, capsys)
        assert code == 2 and "one JSON array" not in err and "no field 'text', the first such record has a JSON " \
            "array; these are SFT conversations, not text: `tinyk data sft` reads them" in one_error_line(err), err


def test_a_json_lines_line_that_is_one_string_is_a_documents_text(tmp_path):
    """`json.dumps(text)` a line: it was skipped as "no field 'text', the first such record has a JSON str;
    --field names the one with the text", which no --field could fix."""
    src = tmp_path / "s.jsonl"
    twice = json.dumps(json.dumps({"text": "四"}))  # a record encoded twice is no text: its braces and keys
    src.write_text("\n".join([json.dumps("第一篇。"), json.dumps("second\nline"), "5", '""', '{"text": "三"}', twice,
                              json.dumps("[not json")]) + "\n", encoding="utf-8")
    skips = Skips()
    assert list(iter_texts([src], skips, field="content")) == ["第一篇。", "second\nline", "[not json"]
    assert skips.counts == {"missing_field": 2, "empty": 1, "encoded_twice": 1}
    assert skips.hints["encoded_twice"].endswith("decode it first, e.g. jq -c fromjson FILE > records.jsonl")
    assert "no field 'content', the first such record has a JSON number;" in skips.summary()


@pytest.mark.parametrize("rec, program", [
    ({"conversations": [{"from": "human", "value": "你好"}, {"from": "assistant", "value": "好"}]},
     """'{"text": ([.conversations[].value] | join("\\n"))}'"""),
    ({"conversations": "", "messages": [{"role": "user", "content": "你好"}]},
     """'{"text": ([.messages[].content] | join("\\n"))}'"""),
    ([{"role": "user", "content": "你好"}], """'{"text": ([.[].content] | join("\\n"))}'""")])
def test_conversations_read_as_text_are_told_how_to_make_text_of_them(tmp_path, rec, program):
    """BelleGroup's chats given to tokenizer training: "`tinyk data sft` reads them", and no way to put
    their words into the vocabulary as well."""
    src = tmp_path / "belle.jsonl"
    src.write_text(json.dumps(rec, ensure_ascii=False) + "\n", encoding="utf-8")
    skips = Skips()
    assert list(iter_texts([src], skips)) == []
    assert skips.hints["missing_field"].endswith(f"`tinyk data sft` reads them; as text, e.g. jq -c {program} FILE > "
                                                 f"text.jsonl")


def test_a_record_with_a_list_and_text_of_its_own_is_not_called_a_list_of_records(tmp_path):
    """A news record with its tags: "--field names the one with the text", not a jq line that trains on the tags."""
    src = tmp_path / "news.jsonl"
    news = {"title": "标题", "content": "正文", "tags": ["财经", "国内"]}
    src.write_text(json.dumps(news, ensure_ascii=False) + "\n", encoding="utf-8")
    skips = Skips()
    assert list(iter_texts([src], skips)) == [] and skips.hints["missing_field"].endswith(
        "--field names the one with the text")


@pytest.mark.parametrize("records,program", [
    ([{"text": "你好"}, {"text": "再见"}], "'.\"data\"[]'"),
    (["你好", "再见"], "'.\"data\"[] | {\"text\": .}'"),
])
def test_one_object_on_one_line_holding_the_records_is_given_its_jq_line(tmp_path, capsys, records, program):
    """What `json.dump({"data": records})` writes is one line: read as JSON Lines it is one record of one
    list, and "--field names the one with the text" led to `--field data`, then to "not string"."""
    src = tmp_path / "one.json"
    src.write_text(json.dumps({"data": records, "version": 2}, ensure_ascii=False), encoding="utf-8")
    code, err = run_cli(["tokenizer", "train", src, "--out", tmp_path / "t"], capsys)
    assert code == 2 and one_error_line(err).endswith(
        f"no field 'text', the first such record has fields 'data', 'version'; it holds its records as a list "
        f"under 'data': jq -c {program} FILE > records.jsonl)")
    lines = subprocess.run(["jq", "-c", program.strip("'"), src], capture_output=True, text=True) \
        if shutil.which("jq") else None
    assert lines is None or [json.loads(x) for x in lines.stdout.splitlines()] == [
        {"text": r} if isinstance(r, str) else r for r in records]


def test_a_damaged_utf8_line_is_not_told_to_convert_its_file_from_gbk(tmp_path):
    """28 bad lines among 220,000 of UTF-8 were told "convert such files first, e.g. iconv -f gbk", which
    would garble the rest; nor is a line of GBK among UTF-8 ones (iconv fails on the UTF-8 lines)."""
    good = "今天天气很好，我们去公园散步吧。".encode()
    damaged = good[:10] + b"\xff" + good[11:]
    other = "bytes that are neither UTF-8 nor GBK: a damaged line, or a file to convert from its encoding"
    for first, hint in ((damaged, "a few bytes that are not UTF-8 in a line of UTF-8 text: a damaged line, not a "
                                  "file to convert"),
                        ("今天天气很好".encode("gbk"), GBK_HINT),
                        (b"a stray \xff in English", other), ("café".encode("latin-1"), other),
                        ("你好".encode() + b"\xff", other)):
        src = tmp_path / "d.txt"
        src.write_bytes(first + b"\n" + (good + b"\n") * 50)
        skips = Skips()
        assert len(list(iter_texts([src], skips))) == 50
        assert f"invalid utf8: 1 (first at d.txt:1; {hint})" in skips.summary()


def test_reports_point_at_the_cause(tmp_path, capsys):
    src = tmp_path / "c.jsonl"
    src.write_bytes(b'{"text": "\xd6\xd0\xce\xc4"}\n' + JSONL[:3000].rsplit(b"\n", 1)[0] + b"\n")
    skips = Skips()
    list(iter_texts([src], skips))
    assert f"invalid utf8: 1 (first at c.jsonl:1; {GBK_HINT})" in skips.summary()
    cut = tmp_path / "cut.txt"
    cut.write_bytes("第一行\n第二行".encode()[:-1])  # `head -c` ended the file inside a character
    skips = Skips()
    assert [r["text"] for _, r in iter_records([cut], skips)] == ["第一行"]
    assert skips.summary() == ("skipped 1 record; cut character: 1 (first at cut.txt:2; the file ends inside a "
                               "character: it was cut short (e.g. by head -c))")
    with pytest.raises(TinykError, match="no document fits in the first 10 bytes of the input"):
        train_tokenizer([src], tmp_path / "t", max_bytes=10, show_progress=False)


def test_data_info_on_damaged_offsets_is_one_line(sft_copy, capsys):
    (sft_copy / "train" / "offsets.npy").write_bytes(GARBAGE)
    code, err = run_cli(["data", "info", sft_copy], capsys)
    assert code == 2 and "offsets.npy is damaged or not a NumPy array file" in one_error_line(err)


@pytest.mark.parametrize("damage", ["not_from_zero", "short_of_the_end", "an_empty_conversation", "unsigned_swapped"])
def test_offsets_that_do_not_cut_the_tokens_into_conversations_are_refused(sft_copy, damage):
    f = sft_copy / "train" / "offsets.npy"
    offsets = np.load(f)
    if damage == "not_from_zero":
        offsets[0] = 1
    elif damage == "short_of_the_end":
        offsets[-1] -= 1
    elif damage == "an_empty_conversation":
        offsets[2] = offsets[1]
    else:  # two boundaries out of order, stored unsigned: their differences wrap round to huge, not negative
        offsets = offsets.astype(np.uint64)
        offsets[1], offsets[2] = offsets[2], offsets[1]
    np.save(f, offsets)
    with pytest.raises(TinykError) as e:
        SFTLoader(sft_copy, "train", 64, 2)
    assert str(e.value) == f"{f} does not match meta.json (re-run tinyk data)"


def test_init_finds_a_model_a_killed_replace_had_moved_aside(tmp_path, nano_model_dir):
    from tinyk.rundir import resolve_init

    shutil.copytree(nano_model_dir, tmp_path / f".model.old-{_host()}-{dead_pid()}")
    assert resolve_init(tmp_path / "model") == tmp_path / "model" and (tmp_path / "model" / "config.json").is_file()


def test_an_output_removed_while_a_command_ran_is_simply_written(tmp_path):
    """--force replaces what was there when the command began; when that is gone by the end (the user
    deleted it), the new output goes in place, not aside as out.new with an error."""
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "f").write_text("old")
    with atomic_dir(out, force=True) as tmp:
        (tmp / "f").write_text("new")
        (out / "f").unlink()
        out.rmdir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "f").read_text() == "new"


def test_a_failure_moving_the_old_output_aside_is_not_called_a_mount_point(tmp_path, monkeypatch):
    """Only EBUSY means a mount point. Another error moving the old output aside (a folder made immutable
    with chattr +i) is said in one line; the old output stays, and the work, done, is kept beside it (a
    trained tokenizer was deleted, and the error was a raw errno naming a hidden temporary)."""
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "f").write_text("old")
    real = os.replace

    def refused(src, dst):
        if Path(src) == out:
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", refused)
    with pytest.raises(TinykError, match=rf"^cannot replace {re.escape(str(out))}: Permission denied \(this output is "
                                         rf"kept as {re.escape(str(out))}\.new\)$"), atomic_dir(out, force=True) as tmp:
        (tmp / "f").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.new"] and (out / "f").read_text() == "old"
    assert (tmp_path / "out.new" / "f").read_text() == "new"


def test_a_finished_output_that_cannot_be_set_aside_as_new_is_kept_where_it_was_made(tmp_path, monkeypatch):
    """Another run made the output meanwhile and renaming ours to out.new fails: the message says it is
    kept in its temporary, so that temporary must not then be deleted."""
    out = tmp_path / "out"
    real = os.replace

    def no_new(src, dst):
        if Path(dst).name.endswith(".new"):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", no_new)
    with pytest.raises(TinykError, match=r"the new output is kept as (.*)\)$") as e, atomic_dir(out) as tmp:
        (tmp / "w").write_text("ours")
        out.mkdir()
    kept = Path(str(e.value).rsplit("kept as ", 1)[1][:-1])
    assert kept.parent == tmp_path and (kept / "w").read_text() == "ours"


def test_force_replaces_an_empty_directory_of_any_kind(tmp_path):
    """With `replaces`, an empty folder (made ahead by the user, or `mkdir -p`) is no one's work: it is
    replaced; a folder holding anything that is not such an output is not."""
    kind = ("a test output", lambda p: (p / "meta.json").is_file())
    out = tmp_path / "out"
    out.mkdir()
    with atomic_dir(out, force=True, replaces=kind) as tmp:
        (tmp / "meta.json").write_text("{}")
    assert [p.name for p in out.iterdir()] == ["meta.json"]


def test_force_with_replaces_never_replaces_a_file(tmp_path):
    """An output directory named like a user's file: --force does not delete the file to put a folder there."""
    f = tmp_path / "out"
    f.write_text("my notes")
    for force in (False, True):
        with pytest.raises(TinykError, match="is a file, not a directory"), \
                atomic_dir(f, force=force, replaces=("a test output", lambda p: True)):
            pytest.fail("the work began")
    assert f.read_text() == "my notes"


def test_an_output_kept_aside_does_not_replace_a_link_named_like_it(tmp_path):
    """out.new already taken, if only by a link whose target is gone, is not replaced: out.new-2 is used."""
    out = tmp_path / "out"
    (tmp_path / "out.new").symlink_to(tmp_path / "nowhere")
    with pytest.raises(TinykError, match=r"kept as .*out\.new-2\)$"), atomic_dir(out) as tmp:
        (tmp / "w").write_text("ours")
        out.mkdir()
    assert (tmp_path / "out.new").is_symlink() and (tmp_path / "out.new-2" / "w").read_text() == "ours"


def test_only_exact_output_file_names_go_with_the_replaced_output(tmp_path):
    """A user's backup beside a model (config.json.bak, model.safetensors.orig) is not a model file:
    --force carries it into the new output rather than deleting it with the old one."""
    assert not is_output_file("config.json.bak") and not is_output_file("model.safetensors.orig")
    assert is_output_file("model-00001-of-00002.safetensors") and is_output_file("meta.json")
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "config.json").write_text("old")
    (out / "config.json.bak").write_text("mine")
    with atomic_dir(out, force=True) as tmp:
        (tmp / "config.json").write_text("new")
    assert {p.name: p.read_text() for p in out.iterdir()} == {"config.json": "new", "config.json.bak": "mine"}


def test_force_on_a_link_leaves_the_users_files_in_the_folder_it_pointed_to(tmp_path):
    """--force replaces the link, and the folder it led to "is left as it was": its user's own entries are
    not moved out of it into the new output."""
    target = tmp_path / "real"
    target.mkdir()
    (target / "meta.json").write_text("{}")
    (target / "notes.txt").write_text("mine")
    link = tmp_path / "out"
    link.symlink_to(target)
    with atomic_dir(link, force=True) as tmp:
        (tmp / "meta.json").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["meta.json", "notes.txt"]
    assert [p.name for p in link.iterdir()] == ["meta.json"]


def test_force_on_a_dangling_link_says_nothing_about_a_folder_it_pointed_to(tmp_path, capsys):
    """The note "the folder it pointed to is left as it was" is for a link to a folder; a link to
    nothing is simply replaced."""
    dangling = tmp_path / "out"
    dangling.symlink_to(tmp_path / "nowhere")
    with atomic_dir(dangling, force=True) as tmp:
        (tmp / "f").write_text("x")
    assert dangling.is_dir() and not dangling.is_symlink() and capsys.readouterr().err == ""


def test_an_aside_whose_files_cannot_be_carried_over_is_kept_for_a_later_run(tmp_path, monkeypatch):
    """A killed replace left the old output aside after the new one went in; moving the user's entries
    into the new output fails (a read-only folder of theirs): the aside, and their files, stay."""
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "model").write_text("new")
    aside = tmp_path / f".out.old-{_host()}-{dead_pid()}"
    aside.mkdir()
    (aside / "notes.txt").write_text("mine")

    def refused(old, new):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr("tinyk.outputs._carry_over", refused)
    assert remove_stale_temps(out) == []
    assert (aside / "notes.txt").read_text() == "mine" and (out / "model").read_text() == "new"


def test_an_aside_put_back_is_not_reported_as_removed(tmp_path):
    """`remove_stale_temps` returns what it removed: an old output it put back in place is not that."""
    aside = tmp_path / f".out.old-{_host()}-{dead_pid()}"
    aside.mkdir()
    (aside / "model.bin").write_bytes(b"weights")
    assert remove_stale_temps(tmp_path / "out") == []
    assert (tmp_path / "out" / "model.bin").read_bytes() == b"weights"


def test_a_link_named_like_a_dead_temporary_is_not_followed_nor_reported(tmp_path):
    """A leftover's name on a link (to a user's folder) is not a leftover: neither it nor its target goes."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    link = tmp_path / f".out.tmp-{_host()}-{dead_pid()}-abcdefgh"
    link.symlink_to(mine)
    assert remove_stale_temps(tmp_path / "out") == []
    assert link.is_symlink() and (mine / "thesis.tex").read_text() == "years of work"


def test_an_output_gets_the_permissions_a_plain_write_would_give(tmp_path):
    """mkdtemp makes a private folder and safetensors writes 0600; a finished output is shared as the
    umask says, and its files are not made executable."""
    mask = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "sub").mkdir()
            (tmp / "sub" / "w.bin").write_bytes(b"x")
            os.chmod(tmp / "sub" / "w.bin", 0o600)
    finally:
        os.umask(mask)
    out = tmp_path / "out"
    assert [oct(p.stat().st_mode & 0o777) for p in (out, out / "sub", out / "sub" / "w.bin")] == \
        ["0o755", "0o755", "0o644"]


def test_a_durable_output_has_its_files_on_the_disk_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    """`durable` (training's checkpoints): every file is fsynced before the rename, the folder after."""
    out = tmp_path / "out"
    synced, real = [], os.fsync

    def recording(fd):
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), out.exists()))
        return real(fd)

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs Linux's /proc")
    monkeypatch.setattr(os, "fsync", recording)
    with atomic_dir(out, durable=True) as tmp:
        (tmp / "a").write_text("1")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b").write_text("2")
    files = {Path(p).name for p, there in synced if not there}
    assert {"a", "b"} <= files and (str(tmp_path), True) in synced


def test_plain_name_refuses_a_windows_separator(tmp_path):
    """A shard name read from an edited meta.json: '..\\x' leads out of the folder on Windows."""
    assert plain_name("train_000.bin")
    assert not any(plain_name(n) for n in ("", ".", "..", "a/b", "..\\x", "a\\b", None, 3))


def test_a_lock_where_the_file_system_has_none_always_succeeds(tmp_path, monkeypatch):
    """flock failing otherwise than "held by another" (ENOLCK on some network file systems): the lock is
    taken as given, so the command runs, and it is not counted as held."""
    import fcntl

    def unsupported(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", unsupported)
    lock = DirLock(tmp_path)
    assert lock.acquire() and not lock.held


def test_a_released_lock_can_be_taken_again_and_releasing_twice_closes_nothing_else(tmp_path):
    lock = DirLock(tmp_path)
    assert lock.acquire()
    lock.release()
    r, w = os.pipe()  # likely to get the descriptor number the lock had
    try:
        lock.release()
        os.fstat(r)  # still open
        assert DirLock(tmp_path).acquire()
    finally:
        os.close(r)
        os.close(w)


def test_a_full_disk_or_quota_says_the_free_space_in_mb(tmp_path, monkeypatch):
    """ENOSPC and EDQUOT (a user's quota) are the disk's: the line ends with the free space, in MB of 10**6 bytes."""
    import types

    monkeypatch.setattr(shutil, "disk_usage", lambda p: types.SimpleNamespace(free=5_000_000_000))
    out = tmp_path / "model.safetensors"
    for code in (errno.ENOSPC, errno.EDQUOT):
        said = str(write_error(out, OSError(code, os.strerror(code))))
        assert said == f"cannot write {out}: [Errno {code}] {os.strerror(code)}; 5,000 MB free on that disk", said


def test_our_own_error_inside_a_write_is_said_as_it_is(tmp_path):
    """writing() leaves a TinykError alone, even one quoting a library's '(os error 2)': no 'cannot write' around it."""
    from tinyk.errors import writing

    said = "cannot read tokenizer t/tokenizer.json: No such file or directory (os error 2)"
    with pytest.raises(TinykError) as e:
        with writing(tmp_path / "model.safetensors"):
            raise TinykError(said)
    assert str(e.value) == said


def test_a_json_array_or_spaced_record_encoded_twice_is_skipped_not_trained_as_text(tmp_path):
    """A message list, or a record with a space before its brace, written as one JSON string was read as
    text, brackets and keys included; a plain JSON string line is text."""
    src = tmp_path / "s.jsonl"
    src.write_text(json.dumps(json.dumps([{"role": "user", "content": "你好"}])) + "\n"
                   + json.dumps(" " + json.dumps({"text": "x"})) + "\n" + json.dumps("正文") + "\n", encoding="utf-8")
    skips = Skips()
    assert list(iter_texts([src], skips)) == ["正文"]
    assert skips.counts == {"encoded_twice": 2}


@pytest.mark.parametrize("value,named", [("null", "null"), ("true", "a JSON boolean")])
def test_a_text_field_that_is_no_string_is_named_as_json_names_it(tmp_path, value, named):
    src = tmp_path / "s.jsonl"
    src.write_text(f'{{"text": {value}}}\n{{"text": "ok"}}\n')
    skips = Skips()
    assert list(iter_texts([src], skips)) == ["ok"]
    assert skips.hints["not_string"] == f"its 'text' is {named}, not text"


def test_conversations_whose_turns_are_not_objects_get_no_jq_line(tmp_path):
    """`{"conversations": [1, 2]}` was a TypeError traceback from the hint that offers a jq line."""
    src = tmp_path / "c.jsonl"
    src.write_text(json.dumps({"conversations": [1, 2]}) + "\n")
    skips = Skips()
    assert list(iter_texts([src], skips)) == []
    assert skips.hints["missing_field"].endswith("`tinyk data sft` reads them")
