"""User mistakes get one clear line and exit 2, never a traceback, and never a half-written output."""

from __future__ import annotations

import errno
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tinyk.checkpoint import load_config, load_model
from tinyk.cli import main
from tinyk.errors import Stopped, StoppedBeforeTraining, TinykError, typo_hint
from tinyk.inputs import check_inputs, has_surrogate, read_prompts, stdin_not_decodable
from tinyk.tokenizer import build_tokenizer, load_tokenizer


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    return e.value.code, err


def test_missing_input_file(tmp_path, capsys):
    code, err = run_cli(["tokenizer", "train", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "t")], capsys)
    assert code == 2 and err.strip() == f"tinyk: error: input file not found: {tmp_path / 'nope.jsonl'}"


def test_a_missing_path_names_a_sibling_of_a_close_name(tmp_path, capsys, nano_model_dir, sft_data):
    """A typo (corpus.json for corpus.jsonl, runs/bse for runs/base) is one line that names the likely one."""
    (tmp_path / "corpus.jsonl").write_text('{"text": "你好"}\n', encoding="utf-8")
    code, err = run_cli(["tokenizer", "train", str(tmp_path / "corpus.json"), "--out", str(tmp_path / "t")], capsys)
    assert code == 2 and err == (f"tinyk: error: input file not found: {tmp_path / 'corpus.json'} "
                                 f"(did you mean {tmp_path / 'corpus.jsonl'}?)\n")
    shutil.copytree(nano_model_dir, tmp_path / "base")
    code, err = run_cli(["sft", "--init", str(tmp_path / "bse"), "--data", str(sft_data), "--out", str(tmp_path / "r")],
                        capsys)
    assert err == f"tinyk: error: --init {tmp_path / 'bse'} not found (did you mean {tmp_path / 'base'}?)\n"
    (tmp_path / ".corpus.jsonl.partial").mkdir()  # a hidden name is offered only for a hidden one
    assert typo_hint(tmp_path / "corpus.jsonl.partia") == ""
    assert typo_hint(tmp_path / ".corpus.jsonl.partia") == f" (did you mean {tmp_path / '.corpus.jsonl.partial'}?)"
    assert typo_hint(tmp_path / "zzz") == typo_hint(tmp_path / "no" / "corpus.json") == typo_hint(Path("/")) == ""
    # A quoted pattern ('data/*.jsonl'), or one a Windows shell passed on as it was: said to be one.
    (tmp_path / "more.jsonl").write_text('{"text": "好"}\n', encoding="utf-8")
    code, err = run_cli(["tokenizer", "train", str(tmp_path / "*.jsonl"), "--out", str(tmp_path / "t")], capsys)
    assert code == 2 and err == (f"tinyk: error: input file not found: {tmp_path / '*.jsonl'} (a wildcard, which tinyk "
                                 f"does not expand: it matches 2 names there; give the names, or leave it unquoted in "
                                 f"a shell that expands it)\n")
    assert typo_hint(tmp_path / "*.txt") == ""


def test_a_disk_out_of_inodes_is_named_so_not_by_its_free_space(tmp_path, monkeypatch):
    """A disk out of inodes says "No space left" too, with megabytes free beside it: the free space misled."""
    from tinyk.errors import writing

    real = os.statvfs(tmp_path)
    full = OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(TinykError, match=r"; [\d,]+ MB free on that disk$"), writing(tmp_path / "s.json"):
        raise full
    monkeypatch.setattr(os, "statvfs", lambda p: os.statvfs_result((*real[:5], 100, 0, 0, *real[8:])))
    with pytest.raises(TinykError, match=r"; that disk has no free inodes \(too many files\), though [\d,]+ MB are "
                                         r"free$"), writing(tmp_path / "s.json"):
        raise full
    # btrfs and tmpfs count no inodes at all (f_files 0): there a full disk is not one out of inodes
    monkeypatch.setattr(os, "statvfs", lambda p: os.statvfs_result((*real[:5], 0, 0, 0, *real[8:])))
    with pytest.raises(TinykError, match=r"; [\d,]+ MB free on that disk$"), writing(tmp_path / "s.json"):
        raise full


def test_input_that_is_not_a_file(tmp_path, capsys, tok_dir, corpus_file):
    d = tmp_path / "语料 dir"
    d.mkdir()
    code, err = run_cli(["tokenizer", "train", str(d), "--out", str(tmp_path / "t")], capsys)
    assert code == 2 and err == f"tinyk: error: input is a directory, not a file: {d} (give the files in it)\n"
    code, err = run_cli(["generate", "--model", str(tok_dir), "--prompt-file", str(d)], capsys)  # one file
    assert code == 2 and err == f"tinyk: error: input is a directory, not a file: {d} (give one of the files in it)\n"
    code, err = run_cli(["data", "pretrain", str(corpus_file), "--tokenizer", str(tok_dir), "--out", str(d)], capsys)
    assert code == 2 and err == (f"tinyk data pretrain: error: the following arguments are required: --input; input "
                                 f"files are given after it: --input {corpus_file} (see tinyk data pretrain --help)\n")
    # --input takes every path after it: the tokenizer given last was taken as text to measure
    code, err = run_cli(["tokenizer", "eval", "--input", str(corpus_file), str(tok_dir)], capsys)
    assert code == 2 and err == ("tinyk tokenizer eval: error: the following arguments are required: path; --input "
                                 "takes every path after it, so give the path before --input (see tinyk tokenizer "
                                 "eval --help)\n")
    code, err = run_cli(["tokenizer", "eval", str(tok_dir), "--input", str(corpus_file), str(tok_dir)], capsys)
    assert code == 2 and err == (f"tinyk: error: input {tok_dir} is a tokenizer or model directory, not text: a flag "
                                 f"of several files (--input) takes every path after it, so give the directory "
                                 f"before the flag\n")
    code, err = run_cli(["data", "pretrain", "--input", "-", "--tokenizer", str(d), "--out", str(tmp_path / "t")],
                        capsys)  # stdin: not "input file not found: -"
    assert code == 2 and err == "tinyk: error: inputs are read from files, not from stdin (-): " \
                                "save what it gives to a file first\n"


def test_an_output_that_is_a_file_is_named_so_without_force_first(tmp_path, capsys, corpus_file):
    """`--out pos.txt` said "output directory exists (use --force to replace it)", and --force then refused it."""
    (tmp_path / "pos.txt").write_text("keep me", encoding="utf-8")
    for force in ([], ["--force"]):
        code, err = run_cli(["tokenizer", "train", str(corpus_file), "--out", str(tmp_path / "pos.txt"), *force],
                            capsys)
        assert code == 2 and err == (f"tinyk: error: output {tmp_path / 'pos.txt'} is a file, not a directory; remove "
                                     f"it yourself or choose another path\n")
    assert (tmp_path / "pos.txt").read_text(encoding="utf-8") == "keep me"


def test_an_archive_given_as_input_says_how_to_unpack_it(tmp_path, capsys):
    """The tutorial's corpus comes as a .jsonl.tar.bz2: the refusal says what turns it into files tinyk reads."""
    for name, tool in (("mobvoi_seq_monkey.jsonl.tar.bz2", "tar -xf"), ("belle 0.5M.zip", "unzip"),
                       ("corpus.jsonl.bz2", "bunzip2 -k")):
        (tmp_path / name).write_bytes(b"BZh9")
        code, err = run_cli(["tokenizer", "train", str(tmp_path / name), "--out", str(tmp_path / "t")], capsys)
        assert code == 2 and err.startswith(f"tinyk: error: unsupported input type: {tmp_path / name} (unpack it "
                                            f"first, e.g. `{tool} {shlex.quote(str(tmp_path / name))}`, and give "
                                            f"the files it holds; tinyk reads .jsonl, .json, .txt, .parquet,"), err
    (tmp_path / "corpus.csv").write_text("a,b\n")
    code, err = run_cli(["tokenizer", "train", str(tmp_path / "corpus.csv"), "--out", str(tmp_path / "t")], capsys)
    assert code == 2 and err.startswith(f"tinyk: error: unsupported input type: {tmp_path / 'corpus.csv'} (use .jsonl")


def test_bzip2_xz_or_zip_data_under_a_name_tinyk_reads_says_how_to_unpack_it(tmp_path, capsys):
    """A corpus.jsonl that is bzip2 or xz data (renamed, or saved by a tool that compressed it) was called
    "NUL bytes in its first 4 KB: UTF-16 or UTF-32 text without a byte order mark", and a zip "malformed"."""
    import bz2
    import lzma
    import zipfile

    text = b'{"text": "\xe4\xbd\xa0\xe5\xa5\xbd"}\n' * 50
    (tmp_path / "bz.jsonl").write_bytes(bz2.compress(text))
    (tmp_path / "xz.jsonl").write_bytes(lzma.compress(text))
    with zipfile.ZipFile(tmp_path / "zip.jsonl", "w") as z:
        z.writestr("a.jsonl", text)
    (tmp_path / "BZh.txt").write_text("BZh is how this line of text begins\n" * 50)  # text, read as text
    for name, said in (("bz", "bzip2-compressed data, which tinyk does not read (it reads gzip and zstd); unpack it "
                              "first, e.g. `bunzip2 -c bz.jsonl > FILE`, and give what it holds"),
                       ("xz", "xz-compressed data, which tinyk does not read (it reads gzip and zstd); unpack it "
                              "first, e.g. `unxz -c xz.jsonl > FILE`"),
                       ("zip", "a zip archive, which tinyk does not read (it reads gzip and zstd); unpack it first, "
                               "e.g. `unzip zip.jsonl`")):
        code, err = run_cli(["tokenizer", "train", str(tmp_path / f"{name}.jsonl"), "--out", str(tmp_path / "t")],
                            capsys)
        assert code == 2 and err.startswith(f"tinyk: error: {tmp_path / name}.jsonl: {said}"), err
    code, err = run_cli(["tokenizer", "train", str(tmp_path / "BZh.txt"), "--out", str(tmp_path / "t"),
                         "--vocab-size", "300"], capsys)
    assert code == 0, err


def test_input_suffixes_are_read_in_any_case(tmp_path):
    """CORPUS.TXT and DATA.JSONL.GZ (files from Windows) were refused as an "unsupported input type"."""
    import gzip

    from tinyk.inputs import Skips, check_inputs, iter_texts

    (tmp_path / "A.TXT").write_text("第一行\n第二行\n", encoding="utf-8")
    with gzip.open(tmp_path / "B.JsonL.GZ", "wt", encoding="utf-8") as f:
        f.write('{"text": "第三行"}\n')
    paths = check_inputs([tmp_path / "A.TXT", tmp_path / "B.JsonL.GZ"])
    assert list(iter_texts(paths, Skips())) == ["第一行", "第二行", "第三行"]


def test_a_pipe_given_as_a_file_says_what_to_do(tmp_path, capsys, nano_model_dir):
    """`<(command)` and named pipes: inputs are sized and read more than once, and prompts have stdin."""
    fifo = tmp_path / "p.jsonl"
    os.mkfifo(fifo)
    code, err = run_cli(["tokenizer", "train", str(fifo), "--out", str(tmp_path / "t")], capsys)
    assert code == 2 and err.strip() == f"tinyk: error: input is a pipe, not a file: {fifo} (save what it gives to a " \
                                        f"file first)"
    code, err = run_cli(["generate", "--model", str(nano_model_dir), "--prompt-file", str(fifo)], capsys)
    assert code == 2 and err.strip() == f"tinyk: error: --prompt-file {fifo} is a pipe: pipe the prompts to stdin " \
                                        f"with --prompt-file - instead"
    for flag, what in (("--task", "task file"), ("--choice", "multiple-choice path")):  # not "not found"
        code, err = run_cli(["eval", "--model", str(nano_model_dir), flag, str(fifo)], capsys)
        assert code == 2 and err == f"tinyk: error: {what} is a pipe, not a file: {fifo} (save what it gives to a " \
                                    f"file first)\n"


def test_an_output_under_a_file_is_one_line(tmp_path, corpus_file, pt_data, tok_dir, capsys):
    """Every command's output, a tokenizer, a training run or eval results, says what is wrong."""
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    for args, out in ((["tokenizer", "train", str(corpus_file)], notes / "tok"),
                      (["pretrain", "--preset", "nano", "--data", str(pt_data), "--tokenizer", str(tok_dir)],
                       notes / "run"),
                      (["eval", "--model", str(tmp_path / "m"), "--data", str(pt_data)], notes / "r.json")):
        code, err = run_cli([*args, "--out", str(out)], capsys)
        assert code == 2 and err == f"tinyk: error: --out {out}: {notes} is a file, not a directory\n"
    assert notes.read_text() == "mine"


def test_an_input_given_twice_is_refused(tmp_path, corpus_file, capsys):
    """Its documents would be counted twice and land in both the train and the validation split."""
    link = tmp_path / "same.jsonl"
    link.symlink_to(corpus_file)
    for again in (corpus_file, link):
        code, err = run_cli(["tokenizer", "train", str(corpus_file), str(again), "--out", str(tmp_path / "t")], capsys)
        also = f" (also as {corpus_file})" if again == link else ""
        assert code == 2 and err == f"tinyk: error: input {again} is given twice{also}; give each file once\n"
    assert not (tmp_path / "t").exists()


def test_a_symlink_loop_is_called_a_loop_not_missing(tmp_path, nano_model_dir, capsys):
    """ELOOP: `exists()` says False for a loop as for a missing file."""
    loop, back = tmp_path / "c.jsonl", tmp_path / "d"
    loop.symlink_to(back)
    back.symlink_to(loop)
    for args, what, path in ((["tokenizer", "train", loop, "--out", tmp_path / "t"], "input file", loop),
                             (["eval", "--model", nano_model_dir, "--task", loop], "task file", loop),
                             (["eval", "--model", nano_model_dir, "--choice", loop], "multiple-choice path", loop),
                             (["data", "info", back], "tinyk data directory", back),
                             (["generate", "--model", back, "--prompt", "x"], "model directory", back)):
        code, err = run_cli([str(a) for a in args], capsys)
        assert code == 2 and err == f"tinyk: error: {what} is a symlink loop (its links lead back to themselves): " \
                                    f"{path}\n"


def test_an_empty_file_is_called_empty(tmp_path, tok_dir, nano_model_dir, capsys):
    """0 bytes: not "no usable documents (skipped 0 records)"; one empty file among others is read as none."""
    empty, other = tmp_path / "e.jsonl", tmp_path / "f.jsonl"
    empty.touch()
    other.touch()
    for args in (["tokenizer", "train", empty, "--out", tmp_path / "t"],
                 ["data", "pretrain", "--input", empty, "--tokenizer", tok_dir, "--out", tmp_path / "d"],
                 ["data", "sft", "--input", empty, "--tokenizer", tok_dir, "--out", tmp_path / "d"],
                 ["generate", "--model", nano_model_dir, "--prompt-file", empty]):
        code, err = run_cli([str(a) for a in args], capsys)
        assert code == 2 and err == f"tinyk: error: input file is empty: {empty}\n"
    code, err = run_cli(["tokenizer", "train", str(empty), str(other), "--out", str(tmp_path / "t")], capsys)
    assert code == 2 and err == f"tinyk: error: all 2 input files are empty, e.g. {empty}\n"
    code, err = run_cli(["eval", "--model", str(nano_model_dir), "--task", str(empty)], capsys)
    assert code == 2 and err == f"tinyk: error: task file is empty: {empty}\n"
    csv = tmp_path / "c.csv"
    csv.touch()
    code, err = run_cli(["eval", "--model", str(nano_model_dir), "--choice", str(csv)], capsys)
    assert code == 2 and err == f"tinyk: error: multiple-choice CSV is empty: {csv}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.csv", "e.jsonl", "f.jsonl"]


def test_an_empty_reply_is_called_empty_not_missing(tmp_path, tok_dir, capsys):
    src = tmp_path / "s.jsonl"
    src.write_text(json.dumps({"conversations": [{"from": "human", "value": "你好"}, {"from": "gpt", "value": ""}]},
                              ensure_ascii=False) + "\n", encoding="utf-8")
    code, err = run_cli(["data", "sft", "--input", str(src), "--tokenizer", str(tok_dir), "--out", str(tmp_path / "d")],
                        capsys)
    assert code == 2 and err == ("tinyk: error: no usable conversations in the input: skipped 1 record; empty "
                                 "assistant turn: 1 (first at s.jsonl:1)\n")


def test_a_system_prompt_too_long_for_max_len_is_blamed_not_the_input(tmp_path, tok_dir, capsys):
    """Said before any conversation is tokenized, not as each one skipped as "prompt too long"."""
    src = tmp_path / "s.jsonl"
    src.write_text(json.dumps([{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}],
                              ensure_ascii=False) + "\n", encoding="utf-8")
    long = "很长的系统提示" * 20
    opening = len(load_tokenizer(tok_dir).encode_chat([{"role": "system", "content": long},
                                                        {"role": "user", "content": ""}], add_generation_prompt=True))
    args = ["data", "sft", "--input", str(src), "--tokenizer", str(tok_dir), "--out", str(tmp_path / "d"),
            "--max-len", "64"]
    code, err = run_cli([*args, "--system-prompt", long], capsys)
    assert code == 2 and err == (f"tinyk: error: --system-prompt is too long for --max-len 64: with it a conversation "
                                 f"takes at least {opening} tokens before its answer\n")
    code, err = run_cli([*args, "--system-prompt", ""], capsys)  # without one it fits
    assert code == 0 and (tmp_path / "d" / "meta.json").is_file()


def test_inputs_on_a_filesystem_without_inode_numbers_are_told_apart(tmp_path, corpus_file, monkeypatch):
    """FAT and some FUSE mounts report inode 0 for every file: two files there are still two."""
    other, link = tmp_path / "other.jsonl", tmp_path / "link.jsonl"
    shutil.copy(corpus_file, other)
    link.symlink_to(other)
    real_stat = Path.stat

    def no_inodes(self, **kw):
        st = real_stat(self, **kw)
        return os.stat_result((st.st_mode, 0, *st[2:]))

    monkeypatch.setattr(Path, "stat", no_inodes)
    assert check_inputs([corpus_file, other]) == [corpus_file, other]
    with pytest.raises(TinykError, match="given twice"):
        check_inputs([corpus_file, other, link])


def run_cli_unprivileged(args: list[str]) -> tuple[int, str]:
    """The CLI in a process that file permissions apply to: root's (CI's) reading of any file is
    dropped with setpriv."""
    drop = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("root reads any file, and setpriv (util-linux) is not here to drop that")
        caps = "-dac_override,-dac_read_search"
        drop = ["setpriv", "--bounding-set", caps, "--inh-caps", caps]
        if subprocess.run([*drop, "true"], capture_output=True).returncode:
            pytest.skip("root reads any file, and setpriv cannot drop that here (no CAP_SETPCAP)")
    r = subprocess.run([*drop, sys.executable, "-m", "tinyk", *args], capture_output=True, text=True, timeout=300)
    return r.returncode, r.stderr


def test_unreadable_input(tmp_path, corpus_file):
    f = tmp_path / "locked.jsonl"
    shutil.copy(corpus_file, f)
    f.chmod(0)
    code, err = run_cli_unprivileged(["tokenizer", "train", str(f), "--out", str(tmp_path / "t")])
    assert code == 2 and err == f"tinyk: error: input file is not readable: {f}\n"


@pytest.mark.parametrize("command", [["model", "info"], ["generate", "--prompt", "你好", "--model"]])
def test_unreadable_weights_are_called_unreadable(tmp_path, nano_model_dir, command):
    """Not "damaged or truncated (No such file or directory)", which is what safetensors makes of it."""
    model = Path(shutil.copytree(nano_model_dir, tmp_path / "model"))
    (model / "model.safetensors").chmod(0)
    code, err = run_cli_unprivileged([*command, str(model)])
    assert code == 2 and err == f"tinyk: error: cannot access {model / 'model.safetensors'}: permission denied\n"


def test_existing_output_needs_force(tmp_path, corpus_file, nano_model_dir, capsys):
    out = tmp_path / "t"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    # --force replaces an earlier output of the command, never a folder of someone's files: said at once
    # (it said "use --force to replace it", and --force then refused it).
    for force in ([], ["--force"]):
        code, err = run_cli(["tokenizer", "train", str(corpus_file), "--out", str(out), "--vocab-size", "300",
                             *force], capsys)
        assert code == 2 and err == (f"tinyk: error: {out} exists and is not a tinyk tokenizer, so it is not "
                                     f"replaced (it holds keep.txt); remove it yourself or choose another path\n")
        assert (out / "keep.txt").read_text() == "mine"
    model = Path(shutil.copytree(nano_model_dir, tmp_path / "model"))  # a model holds a tokenizer too
    code, err = run_cli(["tokenizer", "train", str(corpus_file), "--out", str(model), "--force"], capsys)
    assert code == 2 and "not a tinyk tokenizer" in err and (model / "model.safetensors").exists()
    shutil.rmtree(model)
    (out / "keep.txt").unlink()
    for _ in range(2):  # into the now empty folder, then over that tokenizer
        code, _ = run_cli(["tokenizer", "train", str(corpus_file), "--out", str(out), "--vocab-size", "300",
                           "--force"], capsys)
        assert code == 0 and (out / "tokenizer.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["t"]
    code, err = run_cli(["tokenizer", "train", str(corpus_file), "--out", str(out), "--vocab-size", "300"], capsys)
    assert code == 2 and err == f"tinyk: error: output directory exists: {out} (use --force to replace it)\n"


def test_force_never_replaces_an_input(tmp_path, corpus_file, tok_dir, capsys):
    """--force replaces an earlier output, never what the command reads (nor a folder holding it)."""
    folder = tmp_path / "folder"
    folder.mkdir()
    corpus = Path(shutil.copy(corpus_file, folder / "c.jsonl"))
    before = corpus.read_bytes()
    for out in (folder, corpus):
        code, err = run_cli(["tokenizer", "train", str(corpus), "--out", str(out), "--force"], capsys)
        assert code == 2 and f"--out {out} would replace the input {corpus}" in err
    tok = Path(shutil.copytree(tok_dir, tmp_path / "tok"))
    code, err = run_cli(["data", "pretrain", "--input", str(corpus), "--tokenizer", str(tok), "--out", str(tok),
                         "--force"], capsys)
    assert code == 2 and "would replace the input" in err
    code, err = run_cli(["data", "pretrain", "--input", str(corpus), "--tokenizer", str(tok), "--out",
                         str(tok / "data")], capsys)
    assert code == 2 and "lies inside the input" in err
    assert corpus.read_bytes() == before and (tok / "tokenizer.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "tok"] and os.listdir(folder) == ["c.jsonl"]


def test_failed_run_leaves_nothing_behind(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{broken\n{also broken\n")
    code, err = run_cli(["tokenizer", "train", str(bad), "--out", str(tmp_path / "t")], capsys)
    assert code == 2 and "no usable documents" in err and "malformed json: 2" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


def test_unknown_preset(tmp_path, tok_dir, capsys):
    code, err = run_cli(["model", "init", "--preset", "huge", "--tokenizer", str(tok_dir), "--out",
                         str(tmp_path / "m")], capsys)
    assert code == 2 and err == "tinyk: error: unknown preset 'huge' (choose from seed-215m, seed-82m, tiny, nano)\n"
    code, err = run_cli(["pretrain", "--preset", "huge", "--data", "d", "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and err == "tinyk: error: unknown preset 'huge' (choose from seed-215m, seed-82m, tiny, nano)\n"


def test_not_a_model_dir(tmp_path, capsys):
    code, err = run_cli(["model", "info", str(tmp_path)], capsys)
    assert code == 2 and "not a model directory" in err


def test_model_info_reads_a_run_directory_as_its_final_model(tmp_path, nano_model_dir, capsys):
    shutil.copytree(nano_model_dir, tmp_path / "run" / "final")
    with pytest.raises(SystemExit) as e:
        main(["model", "info", str(tmp_path / "run"), "--json"])
    assert e.value.code == 0 and json.loads(capsys.readouterr().out)["path"] == str(tmp_path / "run" / "final")


def test_a_directory_next_to_the_right_one_is_pointed_to(tmp_path, tok_dir, nano_model_dir, pt_data, capsys):
    """A run directory for a tokenizer from Python (the CLI reads it as its final/ model, which holds one),
    a data split's folder for the data, and an unfinished run's final/ (no model yet, but a checkpoint's)."""
    from tinyk.data import prepare_pretrain

    run = tmp_path / "run"
    shutil.copytree(nano_model_dir, run / "final")
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "你好"}\n', encoding="utf-8")
    with pytest.raises(TinykError) as e:
        prepare_pretrain([corpus], run, tmp_path / "d", show_progress=False)
    assert str(e.value) == f"not a tokenizer directory (no tokenizer.json): {run}; {run / 'final'} is one"
    split = pt_data / "train"
    assert run_cli(["pretrain", "--preset", "nano", "--data", str(split), "--tokenizer", str(tok_dir), "--out",
                    str(tmp_path / "r")], capsys)[1] == (
        f"tinyk: error: not a tinyk data directory (no meta.json): {split}; {pt_data} is one\n")
    unfinished = tmp_path / "unfinished"
    (unfinished / "checkpoints").mkdir(parents=True)
    chat = ["chat", "--model", str(unfinished / "final"), "--message", "你好"]
    assert run_cli(chat, capsys)[1] == (f"tinyk: error: model directory not found: {unfinished / 'final'} (its run has "
                                        f"not finished, nor saved a checkpoint yet)\n")
    newest = unfinished / "checkpoints" / "step_0000010" / "model"
    shutil.copytree(nano_model_dir, newest)
    assert run_cli(chat, capsys)[1] == (f"tinyk: error: model directory not found: {unfinished / 'final'} (its run has "
                                        f"not finished; a run's checkpoints: the newest one's model is in {newest})\n")
    (unfinished / "config.yaml").write_text("kind: pretrain\n")  # --model RUN, its final/ not there yet
    assert run_cli(["chat", "--model", str(unfinished), "--message", "你好"], capsys)[1] == (
        f"tinyk: error: not a model directory (needs config.json and model.safetensors): {unfinished}; a training "
        f"run that has not finished (no final/ yet); a run's checkpoints: the newest one's model is in {newest}\n")
    assert run_cli(["pretrain", "--init", str(unfinished / "final"), "--data", str(pt_data),
                    "--out", str(tmp_path / "r")],
                   capsys)[1] == (f"tinyk: error: --init {unfinished / 'final'} not found (its run has not finished; "
                                  f"a run's checkpoints: the newest one's model is in {newest})\n")


def test_an_init_model_without_its_tokenizer_is_named(tmp_path, tok_dir, nano_model_dir, pt_data, capsys):
    """--init a model directory that lost tokenizer.json, with --tokenizer given: the message every other
    command gives, not the errno of a file hashed before the directory was checked."""
    init = tmp_path / "init"
    shutil.copytree(nano_model_dir, init)
    (init / "tokenizer.json").unlink()
    code, err = run_cli(["pretrain", "--init", str(init), "--tokenizer", str(tok_dir), "--data", str(pt_data),
                         "--out", str(tmp_path / "r"), "--max-steps", "1"], capsys)
    assert (code, err) == (2, f"tinyk: error: model directory {init} has no tokenizer.json: it was saved without "
                              f"its tokenizer; put the tokenizer's files beside it (transformers: "
                              f"tokenizer.save_pretrained(DIR), with the tokenizer of the model it was trained "
                              f"from)\n")
    code, err = run_cli(["chat", "--model", str(init), "--message", "你好"], capsys)  # the same line everywhere
    assert code == 2 and err.startswith(f"tinyk: error: model directory {init} has no tokenizer.json")


@pytest.mark.parametrize("weights,says", [
    ("model.safetensors.index.json", "sharded over several files: save them as one, e.g. transformers' "
                                     "save_pretrained(DIR, max_shard_size='100GB')"),
    ("pytorch_model.bin.index.json", "sharded over several files"),
    ("pytorch_model.bin", "a pickle (pytorch_model.bin), which tinyk does not load: save them as safetensors"),
    ("adapter_config.json", "an adapter (adapter_config.json), not a whole model: merge it into its base model first"),
])
def test_a_transformers_directory_tinyk_cannot_read_says_how_to_save_it(tmp_path, tok_dir, sft_data, capsys, weights,
                                                                       says):
    """In every command that reads a model directory: model info, --init, model import."""
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    if weights == "pytorch_model.bin":
        torch.save({"model.embed_tokens.weight": torch.zeros(8, 4)}, hf / weights)
    else:
        (hf / weights).write_text("{}")
    code, err = run_cli(["model", "info", str(hf)], capsys)
    assert code == 2 and err.count("\n") == 1 and f"not a model directory (needs config.json and model.safetensors): " \
        f"{hf}; its weights are {says}" in err
    typo = tmp_path / "typo"
    assert run_cli(["model", "info", str(typo)], capsys)[1] == f"tinyk: error: model directory not found: {typo}\n"
    assert run_cli(["sft", "--init", str(typo), "--data", str(sft_data), "--out", str(tmp_path / "r")],
                   capsys)[1] == f"tinyk: error: --init {typo} not found\n"
    code, err = run_cli(["sft", "--init", str(hf), "--data", str(sft_data), "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and err.count("\n") == 1 and f"nor a run directory with final/; its weights are {says}" in err
    code, err = run_cli(["model", "import", str(hf), "--tokenizer", str(tok_dir), "--out", str(tmp_path / "m")],
                        capsys)
    if weights == "pytorch_model.bin":
        assert code == 2 and f"{hf} is not a checkpoint of the tutorial's model but a Hugging Face Llama " \
            f"checkpoint; its weights are {says}" in err
    else:  # it said only what the directory lacked
        assert (code, err) == (2, f"tinyk: error: {hf} holds neither model.safetensors nor pytorch_model.bin; "
                                  f"its weights are {says}" + err.split(says, 1)[1])


def test_tokenizer_larger_than_model_vocab(tmp_path, tok_dir, corpus_file):
    from tinyk.checkpoint import init_model_dir
    from tinyk.tokenizer import train_tokenizer

    train_tokenizer([corpus_file], tmp_path / "small", vocab_size=300, show_progress=False)
    init_model_dir("nano", tmp_path / "small", tmp_path / "m")
    shutil.copy(tok_dir / "tokenizer.json", tmp_path / "m" / "tokenizer.json")
    with pytest.raises(TinykError, match="tokens but the model's vocab_size is 300"):
        load_model(tmp_path / "m")


def test_tokenizer_with_wrong_special_ids(tmp_path, nano_model_dir):
    m = tmp_path / "m"
    shutil.copytree(nano_model_dir, m)
    tok = build_tokenizer()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>", "<unk>", "<s>", "</s>"])
    tok.save(str(m / "tokenizer.json"))
    with pytest.raises(TinykError, match="special token <unk> must have id 0, has 2; tinyk reads the tokenizers"):
        load_model(m)
    foreign = build_tokenizer()  # GPT-2's kind: none of the seed's special tokens
    foreign.add_special_tokens(["<|endoftext|>"])
    foreign.save(str(m / "tokenizer.json"))
    with pytest.raises(TinykError, match=r"<unk> must have id 0, has none; .* <\|im_end\|> as ids 0 to 4"):
        load_model(m)


def test_a_tokenizer_with_ids_past_its_token_count_is_refused(tmp_path, nano_model_dir):
    """An edited tokenizer.json whose ids leave a gap keeps its token count, so the count alone would
    let an id past the embedding through (an index error mid-generation, a dropped server connection)."""
    m = tmp_path / "m"
    shutil.copytree(nano_model_dir, m)
    tok = json.loads((m / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = tok["model"]["vocab"]
    vocab["a"] = len(vocab) + len(tok["added_tokens"])
    (m / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(TinykError, match=r"tokenizer .* has gaps in its ids: \d+ tokens, the largest "
                                         r"id \d+"):
        load_model(m)


def test_a_fifo_a_device_or_a_huge_file_in_place_of_a_json_file_is_refused_not_read(tmp_path, nano_model_dir):
    """A downloaded model directory's JSON files are read whole: a FIFO waited for ever, /dev/zero filled
    the memory."""
    from tinyk.inputs import read_json

    m = tmp_path / "m"
    shutil.copytree(nano_model_dir, m)
    (m / "tokenizer_config.json").unlink()
    os.mkfifo(m / "tokenizer_config.json")
    with pytest.raises(TinykError, match=r"cannot read .*tokenizer_config.json \(not a regular file\)"):
        load_model(m)
    (tmp_path / "zero.json").symlink_to("/dev/zero")
    with pytest.raises(ValueError, match="not a regular file"):
        read_json(tmp_path / "zero.json")
    with open(tmp_path / "big.json", "wb") as f:
        f.truncate(65 << 20)
    with pytest.raises(ValueError, match="65 MiB, more than any JSON file tinyk reads"):
        read_json(tmp_path / "big.json")


def test_a_config_file_with_yaml_aliases_is_refused_before_they_expand(tmp_path, capsys):
    """A few hundred bytes of nested aliases expand past any memory when a value is checked or printed."""
    levels = ["  - &a0 [x, x, x, x, x, x, x, x, x]"] + [
        f"  - &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("tracker:\n" + "\n".join(levels) + "\n", encoding="utf-8")
    code, err = run_cli(["pretrain", "--config", str(bomb), "--preset", "nano", "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and err == f"tinyk: error: cannot parse {bomb}: found an alias (*name): a config file spells " \
                                f"each value out at line 3, column 10\n"


def test_a_model_path_the_system_cannot_check_is_one_line(tmp_path, capsys):
    code, err = run_cli(["generate", "--model", str(tmp_path / ("a" * 300)), "--prompt", "x"], capsys)
    assert code == 2 and err.count("\n") == 1 and "file name too long" in err


def test_corrupt_config(tmp_path, nano_model_dir, capsys):
    m = tmp_path / "m"
    shutil.copytree(nano_model_dir, m)
    (m / "config.json").write_text("{")
    code, err = run_cli(["model", "info", str(m)], capsys)
    assert code == 2 and "invalid config.json" in err
    config = json.loads((nano_model_dir / "config.json").read_text())
    for change, message in [({"n_heads": 0}, "num_attention_heads is 4 but its tinyk block has n_heads 0; "),
                            ({"dim": "big"}, "hidden_size is 64 but its tinyk block has dim 'big'; "),
                            ({"dropout": 2}, "need 0 < norm_eps < 1, finite rope_theta >= 1 and 0 <= dropout < 1"),
                            # a hand edit's typo was dropped, the model built without it
                            ({"n_headz": 8}, "config.json's tinyk block has an unknown key 'n_headz' (its keys: ")]:
        (m / "config.json").write_text(json.dumps({**config, "tinyk": {**config["tinyk"], **change}}))
        code, err = run_cli(["model", "info", str(m)], capsys)
        assert code == 2 and message in err and err.count("\n") == 1
    plain = {k: v for k, v in config.items() if k != "tinyk"}
    for content, message in [([1], "it is not a JSON object"), ({"tinyk": "x"}, "its 'tinyk' entry is not an object"),
                             ({**plain, "num_attention_heads": 0, "head_dim": 8},
                              "num_attention_heads must be a positive integer, got 0"),  # the file's key
                             ({**plain, "rope_scaling": "yes"}, "its RoPE parameters are not an object"),
                             ({**plain, "tie_word_embeddings": "false"},
                              "tie_word_embeddings must be true or false, got 'false'"),
                             ({**plain, "rope_theta": 1e-300}, "need 0 < rms_norm_eps < 1, finite rope_theta >= 1 "
                                                               "and 0 <= dropout < 1, got 1e-05, 1e-300, 0.0"),
                             ({**plain, "rms_norm_eps": 1e300}, "need 0 < rms_norm_eps < 1, finite rope_theta >= 1 "
                                                                "and 0 <= dropout < 1, got 1e+300, 10000.0, 0.0"),
                             ({k: v for k, v in plain.items() if k != "hidden_size"}, "it has no 'hidden_size'"),
                             ('{"hidden_size": ' + "9" * 5000 + "}", "it holds a number of thousands of digits")]:
        (m / "config.json").write_text(content if isinstance(content, str) else json.dumps(content))
        code, err = run_cli(["model", "info", str(m)], capsys)
        assert code == 2 and err == f"tinyk: error: invalid config.json in {m}: {message}\n"


@pytest.mark.parametrize("name", ["config.json", "tokenizer_config.json", "meta.json"])
def test_json_nested_too_deeply_is_one_line(tmp_path, nano_model_dir, pt_data, capsys, name):
    """A damaged or hostile file nested deeper than Python's JSON reader recurses (it was a RecursionError
    traceback): the file is named and the command refused, like any other bad JSON."""
    model = Path(shutil.copytree(nano_model_dir, tmp_path / "m"))
    data = Path(shutil.copytree(pt_data, tmp_path / "data"))
    target = (data if name == "meta.json" else model) / name
    target.write_text("[" * 100_000 + "]" * 100_000)
    args = (["pretrain", "--data", str(data), "--init", str(model), "--out", str(tmp_path / "run")]
            if name == "meta.json" else ["generate", "--model", str(model), "--prompt", "你好"])
    code, err = run_cli(args, capsys)
    assert code == 2 and err.count("\n") == 1 and str(target.parent) in err and name in err, err
    assert "nested too deeply" in err


def test_damaged_weights(tmp_path, nano_model_dir):
    m = Path(shutil.copytree(nano_model_dir, tmp_path / "m"))
    config = json.loads((m / "config.json").read_text())
    wider = {"hidden_size": 128, "head_dim": 128 // config["num_attention_heads"]}
    (m / "config.json").write_text(json.dumps({**config, **wider, "tinyk": {**config["tinyk"], "dim": 128}}))
    with pytest.raises(TinykError, match=r"does not match its config.json: model.embed_tokens.weight is \(\d+, 64\)"):
        load_model(m)
    weights = m / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(TinykError, match="model.safetensors is damaged or truncated"):
        load_model(m)
    for legacy in (False, True):  # a pickle under the safetensors name is never unpickled, and called what it is
        torch.save({"w": torch.zeros(2)}, weights, _use_new_zipfile_serialization=not legacy)
        with pytest.raises(TinykError, match="model.safetensors is a PyTorch pickle .*, not safetensors, and tinyk "
                                             "never loads pickles.* rename it to model.pth and `tinyk model import"):
            load_model(m)
    # A safetensors file starts with its header's length, which may spell a pickle's first bytes (0x80 0x02):
    # cut short, it is damaged, not a pickle.
    state = load_file(nano_model_dir / "model.safetensors")
    pad = 0
    while True:
        save_file(state, weights, metadata={"pad": "x" * pad})
        length = int.from_bytes(weights.read_bytes()[:8], "little")
        if length >= 0x10280:
            break
        pad += 0x10280 - length
    assert weights.read_bytes()[:2] == b"\x80\x02"
    weights.write_bytes(weights.read_bytes()[:40_000])
    with pytest.raises(TinykError, match="model.safetensors is damaged or truncated"):
        load_model(m)


def test_real_process_prints_one_line_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    p = subprocess.run([sys.executable, "-m", "tinyk", "model", "info", str(tmp_path / "missing")],
                       capture_output=True, text=True, env=env)
    assert p.returncode == 2
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert p.stderr.endswith("\n") and p.stderr[:-1].isprintable()


LATE_SIGNAL = """
import atexit, os, signal, sys
import tinyk.__main__, tinyk.cli

def finished_command():
    # What the interpreter's exit runs after the command (torch's teardown takes a second): a signal lands there.
    atexit.register(lambda: os.kill(os.getpid(), getattr(signal, sys.argv[1])))
    print("done")
    sys.exit(int(sys.argv[2]))

tinyk.cli.main = finished_command
tinyk.__main__.run()
"""


def _signals_as_in_a_terminal() -> None:
    """A test session run in the background (`make test &`, nohup) ignores SIGINT and SIGHUP, and so
    would the process it starts."""
    for s in (signal.SIGINT, signal.SIGHUP):
        signal.signal(s, signal.SIG_DFL)


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM", "SIGHUP"])
def test_a_signal_after_the_command_finished_leaves_its_exit_status(tmp_path, sig):
    """A Ctrl-C or SIGTERM in the second the process takes to exit after a completed training run exited
    130 or 143 (or printed a KeyboardInterrupt traceback): the run is complete, and its status says so."""
    script = tmp_path / "late.py"
    script.write_text(LATE_SIGNAL)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    for code in (0, 2):
        p = subprocess.run([sys.executable, str(script), sig, str(code)], capture_output=True, text=True, env=env,
                           timeout=120, preexec_fn=_signals_as_in_a_terminal)
        assert (p.returncode, p.stdout, p.stderr) == (code, "done\n", ""), (sig, code)


def test_a_finished_command_skips_the_interpreters_last_collection(tmp_path):
    """That collection walked torch's objects for 0.3 s at the end of every command that imported it;
    what the command wrote is complete before it (an atexit handler still runs, after the freeze)."""
    script = tmp_path / "frozen.py"
    script.write_text("import atexit, gc, sys\nimport tinyk.__main__, tinyk.cli\n"
                      "atexit.register(lambda: print(gc.get_freeze_count() > 0))\n"
                      "tinyk.cli.main = lambda: sys.exit(0)\ntinyk.__main__.run()\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert (p.returncode, p.stdout, p.stderr) == (0, "True\n", "")


def test_help_lists_commands():
    p = subprocess.run([sys.executable, "-m", "tinyk", "--help"], capture_output=True, text=True)
    assert p.returncode == 0 and re.findall(r"^    (\w+)", p.stdout, re.M) == [
        "tokenizer", "model", "data", "pretrain", "sft", "generate", "chat", "serve", "eval", "demo", "plan"]


def test_main_works_from_a_thread(tmp_path, capsys):
    """Signal handlers belong to the main thread: a program running tinyk commands in a worker thread
    gets the same one-line error, not a ValueError about signals."""
    import threading

    codes = []

    def call():
        with pytest.raises(SystemExit) as e:
            main(["data", "info", str(tmp_path / "nope")])
        codes.append(e.value.code)

    t = threading.Thread(target=call)
    t.start()
    t.join()
    assert codes == [2] and "tinyk data directory not found" in capsys.readouterr().err


def test_a_damaged_tokenizer_config_is_refused_not_read_as_the_stock_prompt(tmp_path, nano_model_dir, capsys):
    """tokenizer_config.json records the model's system prompt: a cut one silently gave every chat,
    eval and SFT dataset the default prompt instead."""
    model = Path(shutil.copytree(nano_model_dir, tmp_path / "m"))
    config = model / "tokenizer_config.json"
    config.write_text(config.read_text(encoding="utf-8")[:200], encoding="utf-8")
    chats = tmp_path / "chats.jsonl"
    chats.write_text('[{"role": "user", "content": "嗨"}, {"role": "assistant", "content": "嗨！"}]\n',
                     encoding="utf-8")
    for args in (["chat", "--model", str(model), "--message", "你好"],
                 ["data", "sft", "--input", str(chats), "--tokenizer", str(model), "--out", str(tmp_path / "d")]):
        code, err = run_cli(args, capsys)
        assert code == 2 and f"cannot read {config} (" in err and "restore it, or delete it for the default" in err
    for wrong in ("[]", "null", '{"system_prompt": 5}'):
        config.write_text(wrong, encoding="utf-8")
        code, err = run_cli(["chat", "--model", str(model), "--message", "你好"], capsys)
        assert code == 2 and "(not an object with a string system_prompt)" in err, wrong
    tok = tmp_path / "tok"  # a tokenizer whose record is damaged is still one that --force replaces
    tok.mkdir()
    for name in ("tokenizer.json", "special_tokens_map.json"):
        shutil.copy(model / name, tok / name)
    (tok / "tokenizer_config.json").write_text("{cut", encoding="utf-8")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("今天天气很好，我们去公园散步。\n" * 50, encoding="utf-8")
    code, err = run_cli(["tokenizer", "train", str(corpus), "--out", str(tok), "--force", "--vocab-size", "300"],
                        capsys)
    assert code == 0, err
    config.unlink()  # an older directory without one: the default prompt
    code, err = run_cli(["chat", "--model", str(model), "--message", "你好", "--max-new-tokens", "2"], capsys)
    assert code == 0


def test_model_and_prompt_file_mistakes_name_the_way_out(tmp_path, nano_model_dir, capsys):
    run = tmp_path / "run"
    shutil.copytree(nano_model_dir, run / "final")
    with pytest.raises(SystemExit) as e:  # as --init takes it, a run directory means its final/ model
        main(["generate", "--model", str(run), "--prompt", "你好", "--max-new-tokens", "2"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("你好")
    for n in (2, 4):  # a checkpoint, and the folder of them
        shutil.copytree(nano_model_dir, run / "checkpoints" / f"step_{n:07d}" / "model")
    code, err = run_cli(["chat", "--model", str(run / "checkpoints" / "step_0000002"), "--message", "你好"], capsys)
    assert code == 2 and f"a checkpoint's model is in {run / 'checkpoints' / 'step_0000002' / 'model'}" in err
    code, err = run_cli(["generate", "--model", str(run / "checkpoints"), "--prompt", "你好"], capsys)
    assert code == 2 and f"the newest one's model is in {run / 'checkpoints' / 'step_0000004' / 'model'}" in err
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('["你好", "再见"]\n', encoding="utf-8")
    code, err = run_cli(["generate", "--model", str(nano_model_dir), "--prompt-file", str(prompts)], capsys)
    assert code == 2 and "p.jsonl: one JSON array, not JSON Lines" in err
    assert f"""jq -c '.[] | {{"prompt": .}}' {prompts} > {tmp_path / 'p.lines.jsonl'}""" in err  # not the input
    prompts.write_text('"你好"\n"再见"\n', encoding="utf-8")  # what jq -c '.[]' writes: a prompt a line
    assert read_prompts([], str(prompts)) == (["你好", "再见"], None)
    prompts.write_text('5\n{"text": "再见"}\n', encoding="utf-8")
    code, err = run_cli(["generate", "--model", str(nano_model_dir), "--prompt-file", str(prompts)], capsys)
    assert code == 2 and "no prompts in" in err and "records need a string field 'prompt'" in err
    gbk = tmp_path / "gbk.txt"
    gbk.write_bytes("北京大学\n".encode("gbk"))
    code, err = run_cli(["generate", "--model", str(nano_model_dir), "--prompt-file", str(gbk)], capsys)
    assert code == 2 and err.startswith(f"tinyk: error: {gbk}: not UTF-8 text (1 of 1 line read could not be decoded: "
                                        f"GBK or another encoding?); convert it first, e.g. iconv -f gbk -t utf-8")
    latin1 = tmp_path / "latin1.txt"  # `iconv -f gbk` fails on it: the example does not name GBK
    latin1.write_bytes("café crème\n".encode("latin-1"))
    code, err = run_cli(["generate", "--model", str(nano_model_dir), "--prompt-file", str(latin1)], capsys)
    assert code == 2 and err == (f"tinyk: error: {latin1}: not UTF-8 text (1 of 1 line read could not be decoded, nor "
                                 f"as GBK: Latin-1, Big5, Shift-JIS?); find its encoding (file -i, uchardet) and "
                                 f"convert it, e.g. iconv -f ENCODING -t utf-8 {latin1} > "
                                 f"{latin1.with_name('utf8-latin1.txt')}\n")
    # A file's prompt too long for the context is skipped and counted, as a file's bad records are (one of
    # 400 ended the whole file); a prompt typed out with --prompt is refused, as it is what the user means.
    long = tmp_path / "long.txt"
    long.write_text("中国" * 200 + "\n短\n", encoding="utf-8")
    said = "prompt 1 of 2 ('中国中国中国中国中国中国中国中国中国中国中国中国'...): the prompt has"
    gen = ["generate", "--model", str(nano_model_dir), "--max-new-tokens", "2"]
    with pytest.raises(SystemExit) as e:
        main([*gen, "--prompt-file", str(long)])
    out, err = capsys.readouterr()
    assert e.value.code == 0 and err.startswith(f"tinyk: skipped 1 prompt longer than the model's context (the first: "
                                                f"{said}") \
        and out.startswith("--- sample 2 (")  # its number in the file
    long.write_text("中国" * 200 + "\n" + "北京" * 200 + "\n", encoding="utf-8")
    code, err = run_cli([*gen, "--prompt-file", str(long)], capsys)
    assert code == 2 and err.startswith("tinyk: error: no prompt fits the model's 128-token context (the first: "
                                        "prompt 1 of 2 ('中国中国")
    code, err = run_cli([*gen, "--prompt", "中国" * 200, "--prompt", "短"], capsys)
    assert code == 2 and err.startswith("tinyk: error: prompt 1 of 2 ('"
                                        "中国中国中国中国中国中国中国中国中国中国中国中国'...): the prompt has")


def test_a_full_disk_while_writing_a_tokenizer_or_model_is_one_line(tmp_path, corpus_file, tok_dir, monkeypatch,
                                                                     capsys):
    """What the Rust writers raise on a full disk (safetensors' SafetensorError, tokenizers' plain
    Exception) is one line naming the output, and no temporary sibling is left."""
    from safetensors import SafetensorError

    import tinyk.checkpoint
    import tinyk.tokenizer

    def full(*a, **kw):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    def full_tok(*a, **kw):
        raise Exception("No space left on device (os error 28)")  # what tokenizers raises

    monkeypatch.setattr(tinyk.checkpoint, "save_file", full)
    monkeypatch.setattr(tinyk.tokenizer, "save_tokenizer_files", full_tok)
    for args, out in ((["model", "init", "--preset", "nano", "--tokenizer", str(tok_dir)], tmp_path / "m"),
                      (["tokenizer", "train", str(corpus_file), "--vocab-size", "300"], tmp_path / "t")):
        code, err = run_cli([*args, "--out", str(out)], capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].endswith("MB free on that disk"), err
        assert lines[0].startswith(f"tinyk: error: cannot write {out}: ") and "(os error 28)" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_serve_settings_that_cannot_work_are_one_line(nano_model_dir, monkeypatch, capsys):
    code, err = run_cli(["serve", "--model", str(nano_model_dir), "--api-key", ""], capsys)
    assert code == 2 and err.strip() == "tinyk: error: --api-key is empty (leave it out to serve without a key)"
    monkeypatch.setenv("TINYK_API_KEY", "")
    code, err = run_cli(["serve", "--model", str(nano_model_dir)], capsys)
    assert code == 2 and err.strip() == "tinyk: error: TINYK_API_KEY is set but empty (unset it to serve without a key)"
    for flag, value, says in (("--allow-origin", "localhost:5173", "not an origin (scheme://host[:port]"),
                              ("--allow-origin", "http://x.example/app", "not an origin"),
                              ("--allow-host", "https://chat.example.com", "not a host name")):
        code, err = run_cli(["serve", "--model", str(nano_model_dir), flag, value], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and says in err, err


@pytest.mark.skipif(torch.version.cuda is not None, reason="a CUDA build of torch maps GBs of libraries at import")
def test_a_hand_edited_huge_context_is_one_line_naming_the_key(tmp_path, nano_model_dir):
    """max_position_embeddings set to 10^8 in config.json: its RoPE tables alone do not fit (here under
    a 4 GB address-space limit), and the message says which setting asked for them."""
    import resource

    model = tmp_path / "m"
    shutil.copytree(nano_model_dir, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["max_position_embeddings"] = cfg["tinyk"]["max_seq_len"] = 10**8
    (model / "config.json").write_text(json.dumps(cfg))
    r = subprocess.run([sys.executable, "-m", "tinyk", "generate", "--model", str(model), "--prompt", "你好"],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30)))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert re.fullmatch(r"tinyk: error: a context of 100,000,000 positions \(max_seq_len, max_position_embeddings in "
                        r"config.json\) needs about 25.6 GB for its RoPE tables alone, more than this machine (has|can "
                        r"spare \([\d.,]+ GB available\))\n", r.stderr), r.stderr[-2000:]


def test_output_to_a_full_disk_is_one_line_that_says_so():
    """`tinyk plan > /dev/full` said only "[Errno 28] No space left on device", not what could not be written."""
    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, "-m", "tinyk", "plan", "--preset", "nano"], stdout=full,
                           stderr=subprocess.PIPE, text=True)
    assert r.returncode == 2 and r.stderr == ("tinyk: error: what it prints could not be written to its standard "
                                              "output: No space left on device (the files it writes are complete or "
                                              "not there)\n")


def test_text_through_a_pipe_is_utf8_as_tinyk_reads_it_whatever_the_locale(monkeypatch):
    """`tinyk generate --json > out.jsonl` wrote the locale's GBK on Windows and under zh_CN.GBK, which tinyk
    then refused to read; a UTF-8 file on stdin was read as GBK there, silently garbled."""
    import io

    from tinyk.cli import utf8_streams

    class Terminal(io.BytesIO):
        def isatty(self) -> bool:
            return True

    def stream(encoding: str, tty: bool = False) -> io.TextIOWrapper:
        return io.TextIOWrapper(Terminal() if tty else io.BytesIO(), encoding=encoding)

    monkeypatch.delenv("PYTHONIOENCODING", raising=False)
    piped, ascii_, latin, shown = stream("gbk"), stream("ascii"), stream("latin-1"), stream("gbk", tty=True)
    utf8_streams([piped, ascii_], windows=True)
    utf8_streams([latin, shown], windows=False)
    assert [s.encoding for s in (piped, ascii_, latin, shown)] == ["utf-8", "utf-8", "utf-8", "gbk"]
    # Windows: `echo 你好 | tinyk ...` in cmd.exe sends GBK, a file Notepad saved is UTF-8 (read as GBK, UTF-8
    # Chinese was often valid, and garbled: 你好 as 浣犲ソ); an ASCII start decides nothing yet.
    for sent in ("你好\n世界\n".encode("gbk"), "你好\n世界\n".encode(), "\ufeffhi\n你好\n世界\n".encode(),
                 b"hi\n" + "你好\n世界\n".encode("gbk")):
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(sent), encoding="cp936"))
        utf8_streams([sys.stdin], windows=True)
        assert sys.stdin.read().removeprefix("\ufeff").removeprefix("hi\n") == "你好\n世界\n", sent
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("你好".encode() + b"\xff\n"), encoding="gbk"))
    utf8_streams([sys.stdin], windows=True)
    with pytest.raises(UnicodeDecodeError):
        sys.stdin.read()
    assert stdin_not_decodable() == "stdin is neither UTF-8 nor gbk, this console's encoding"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("你好\n".encode() + "世界\n".encode("gbk")),
                                                       encoding="gbk"))
    utf8_streams([sys.stdin], windows=False)  # elsewhere a file on stdin is UTF-8; GBK bytes stay recognisable
    assert (sys.stdin.encoding, sys.stdin.readline(), has_surrogate(sys.stdin.readline())) == ("utf-8", "你好\n", True)
    monkeypatch.setenv("PYTHONIOENCODING", "gbk")  # asked for: kept
    kept = stream("gbk")
    utf8_streams([kept], windows=True)
    assert kept.encoding == "gbk"
    monkeypatch.setenv("PYTHONIOENCODING", ":strict")  # an error handler alone names no encoding
    utf8_streams([kept], windows=False)
    assert kept.encoding == "utf-8"
    piped.write("鳳凰😀")
    piped.flush()
    assert piped.buffer.getvalue().decode("utf-8") == "鳳凰😀"


def test_a_stopped_command_whose_stderr_is_gone_still_exits_with_the_signals_status(monkeypatch):
    """Ctrl-C on `tinyk pretrain ... 2>&1 | tee log` stops tee too: the "interrupted" line met the closed
    pipe, and the status was SIGPIPE's 141 instead of SIGINT's 130."""
    import io

    from tinyk.cli import _stopped

    class ClosedPipe(io.StringIO):
        def write(self, s):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stderr", ClosedPipe())
    with pytest.raises(SystemExit) as e:
        _stopped(KeyboardInterrupt())
    assert e.value.code == 130

    def stopped_while_compiling(args):
        raise StoppedBeforeTraining("SIGINT")

    monkeypatch.setattr("tinyk.cli.plan._run", stopped_while_compiling)  # as a Ctrl-C before a run's first step
    with pytest.raises(SystemExit) as e:
        main(["plan", "--preset", "nano"])
    assert e.value.code == 130


def test_ctrl_break_stops_a_command_with_its_clean_up_on_windows(monkeypatch, capsys):
    """Windows' Ctrl-Break killed a command with no clean-up (and a training run with no checkpoint)."""
    from tinyk.cli import _stop_handlers

    monkeypatch.setattr(signal, "SIGBREAK", 21, raising=False)
    handler = _stop_handlers()[21]
    with pytest.raises(Stopped) as stopped:
        handler(21, None)

    def stopped_by_break(args):
        raise stopped.value

    monkeypatch.setattr("tinyk.cli.plan._run", stopped_by_break)
    with pytest.raises(SystemExit) as e:
        main(["plan", "--preset", "nano"])
    assert e.value.code == 128 + 21 and capsys.readouterr().err == "tinyk: stopped by SIGBREAK\n"


@pytest.mark.parametrize("system", ["posix", "nt"])
def test_a_reader_that_left_stops_a_command_quietly(monkeypatch, capsys, system):
    """`tinyk plan | head`: status 141 and no error. Windows reports a pipe closed by its reader as
    EINVAL, which was "tinyk: error: [Errno 22] Invalid argument"."""
    def reader_left(args):
        raise BrokenPipeError(errno.EPIPE, "Broken pipe") if system == "posix" else OSError(errno.EINVAL, "Invalid "
                                                                                             "argument")

    monkeypatch.setattr("tinyk.cli.plan._run", reader_left)
    monkeypatch.setattr("tinyk.cli.os.dup2", lambda fd, fd2: None)  # the test's own stdout stays
    monkeypatch.setattr(sys.stdout, "fileno", lambda: 1)
    monkeypatch.setattr("tinyk.cli.WINDOWS", system == "nt")
    with pytest.raises(SystemExit) as e:
        main(["plan", "--preset", "nano"])
    assert e.value.code == 141 and capsys.readouterr().err == ""


def test_closed_standard_streams_and_a_deleted_working_directory(tmp_path, nano_model_dir):
    """A daemon started with `2>&-` and a script with `>&-` get no traceback, and notes meant for
    stderr stay out of the reply on stdout; a deleted working directory is named, where torch's import
    would end in "Intel oneMKL FATAL ERROR"."""
    tinyk, model = f"{shlex.quote(sys.executable)} -m tinyk", shlex.quote(str(nano_model_dir))

    def shell(command: str) -> subprocess.CompletedProcess:
        return subprocess.run(command, shell=True, capture_output=True, text=True, timeout=300)

    r = shell(f"{tinyk} generate --model {model} --prompt 你好 --max-new-tokens 2 --temperature 0 >&-")
    assert (r.returncode, r.stderr) == (0, "")
    r = shell(f"{tinyk} chat --model {model} --message 你好 --max-new-tokens 2 --temperature 0 2>&-")
    assert r.returncode == 0 and "reply cut" not in r.stdout
    with_stderr = shell(f"{tinyk} chat --model {model} --message 你好 --max-new-tokens 2 --temperature 0")
    assert "reply cut" in with_stderr.stderr and with_stderr.stdout == r.stdout
    r = shell(f"{tinyk} chat --model {model} <&-")
    assert r.returncode == 2 and r.stderr.startswith("tinyk: error: no message on stdin")
    gone = tmp_path / "gone"
    gone.mkdir()
    r = shell(f"cd {shlex.quote(str(gone))} && rmdir {shlex.quote(str(gone))} && {tinyk} plan --preset nano")
    assert (r.returncode, r.stderr) == (2, "tinyk: error: the current directory no longer exists (it was deleted); "
                                           "cd to one that does\n")


def test_a_signal_during_torchs_first_import_stops_the_command():
    """torch's first import takes seconds and catches what lands in it: a Ctrl-C or SIGTERM there was
    lost (training ran to the end), or left numpy half-imported for a traceback later. Here a finder
    stands in for it: the signal arrives while the import runs, and the import swallows an interrupt."""
    code = """
import importlib.abc, os, signal, sys, time

class LikeTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torch":
            sys.meta_path.remove(self)
            if sys.argv[1] == "hung":  # a second Ctrl-C ends an import that never returns
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(600)
            try:
                os.kill(os.getpid(), getattr(signal, sys.argv[1]))
                time.sleep(0.2)
            except KeyboardInterrupt:
                pass
        return None

sys.meta_path.insert(0, LikeTorch())
from tinyk.cli import main
main(sys.argv[2:])
"""
    command = ["plan", "--preset", "nano"]
    for name, status, said in (("SIGINT", 130, "tinyk: interrupted\n"), ("SIGTERM", 143, "tinyk: terminated\n"),
                               ("hung", 130, "tinyk: interrupted\n")):
        r = subprocess.run([sys.executable, "-c", code, name, *command], capture_output=True, text=True, timeout=120)
        assert (r.returncode, r.stderr, r.stdout) == (status, said, ""), name


def test_a_tokenizer_one_token_larger_than_the_model_is_refused(tmp_path, nano_model_dir):
    """A tokenizer of exactly one token more than the embedding has rows gives an
    id (its last) that indexes past the embedding: a CUDA assert mid-generation."""
    m = tmp_path / "m"
    shutil.copytree(nano_model_dir, m)
    config = json.loads((m / "config.json").read_text())
    n = config["vocab_size"] - 1
    block = {**config["tinyk"], "vocab_size": n}
    (m / "config.json").write_text(json.dumps({**config, "vocab_size": n, "tinyk": block}))
    with pytest.raises(TinykError, match=f"tokens but the model's vocab_size is {n}$"):
        load_model(m)


def test_a_directory_the_tutorials_save_pretrained_wrote_is_pointed_to_import(tmp_path, nano_model_dir):
    """The tutorial's Tiny-K directory has
    config.json and model.safetensors, so it looks like a model directory; it is one to import."""
    m = tmp_path / "k-model"
    m.mkdir()
    shutil.copy(nano_model_dir / "model.safetensors", m)
    for config in ({"model_type": "Tiny-K", "dim": 64, "n_layers": 2, "n_heads": 4},
                   {"dim": 64, "n_layers": 2, "n_heads": 4}):  # older saves: no model_type
        (m / "config.json").write_text(json.dumps(config))
        with pytest.raises(TinykError, match=rf"^not a tinyk model directory: {m}; it holds a model the tutorial's "
                                             rf"code saved \(its Tiny-K config\): `tinyk model import {m} "):
            load_config(m)
    (m / "config.json").write_text(json.dumps({"dim": 64}))  # no Tiny-K config: what a config.json lacks
    with pytest.raises(TinykError, match=rf"^invalid config.json in {m}: it has no 'hidden_size'$"):
        load_config(m)


def test_only_a_missing_final_is_called_an_unfinished_run(tmp_path, nano_model_dir):
    """A typo beside a finished run's final/ (run/fnal)
    was said to be a run that has not finished; a folder of two .pth files names one and counts the other."""
    run = tmp_path / "run"
    shutil.copytree(nano_model_dir, run / "checkpoints" / "step_0000010" / "model")
    with pytest.raises(TinykError, match=r"\(its run has not finished; a run's checkpoints"):
        load_config(run / "final")
    shutil.copytree(nano_model_dir, run / "final")
    with pytest.raises(TinykError, match=f"^model directory not found: {re.escape(str(run / 'fnal'))} "
                                         f"\\(did you mean {re.escape(str(run / 'final'))}\\?\\)$"):
        load_config(run / "fnal")
    pths = tmp_path / "pths"
    pths.mkdir()
    for name in ("a.pth", "b.pth"):
        (pths / name).write_bytes(b"\x80\x02")
    with pytest.raises(TinykError, match=r"; it holds a.pth \(and 1 more .pth\): if the tutorial's scripts saved it"):
        load_config(pths)


def test_the_newest_checkpoint_named_is_the_one_of_the_highest_step(tmp_path, nano_model_dir):
    """Past 9,999,999 steps a checkpoint's name is one digit longer: by text it sorted first, and the hint
    named an older checkpoint as the newest."""
    run = tmp_path / "run"
    for step in (9_999_999, 10_000_000):
        shutil.copytree(nano_model_dir, run / "checkpoints" / f"step_{step:07d}" / "model")
    with pytest.raises(TinykError, match=r"the newest one's model is in .*step_10000000/model$"):
        load_model(run / "checkpoints")


def test_stdout_over_its_disk_quota_is_said_as_a_full_disk_is(capsys, monkeypatch):
    """EDQUOT writing stdout (no file name) gets ENOSPC's line: what could not be written, exit 2. A write
    that names no file while stdout has room is not blamed on stdout (a full disk under the run, once)."""
    import errno
    import os

    import tinyk.cli
    import tinyk.plan

    def full(*a, **kw):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    monkeypatch.setattr(tinyk.plan, "format_plan", full)
    monkeypatch.setattr(tinyk.cli, "_stdout_is_full", lambda: True)
    assert run_cli(["plan", "--preset", "nano"], capsys) == (2, (
        f"tinyk: error: what it prints could not be written to its standard output: {os.strerror(errno.EDQUOT)} "
        "(the files it writes are complete or not there)\n"))
    monkeypatch.undo()
    monkeypatch.setattr(tinyk.plan, "format_plan", full)
    assert run_cli(["plan", "--preset", "nano"], capsys) == (2, (
        f"tinyk: error: a write failed: {os.strerror(errno.EDQUOT)} (the files it writes are complete or not "
        "there)\n"))


def test_stdout_is_full_where_its_file_has_no_room(tmp_path, monkeypatch):
    import tinyk.cli

    with open(tmp_path / "out.txt", "w") as f:
        monkeypatch.setattr(sys, "stdout", f)
        assert not tinyk.cli._stdout_is_full()
        real = os.fstatvfs(f.fileno())
        for full in ((*real[:4], 0, *real[5:]), (*real[:5], 100, 0, 0, *real[8:])):  # no blocks, or no inodes, left
            monkeypatch.setattr(os, "fstatvfs", lambda fd, full=full: os.statvfs_result(full))
            assert tinyk.cli._stdout_is_full()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes")
def test_a_pipe_where_a_directory_holds_a_file_is_named_as_one(tmp_path, tok_dir, nano_model_dir):
    """A FIFO in place of tokenizer.json or config.json was refused as missing ("no tokenizer.json")."""
    from tinyk.tokenizer import load_tokenizer

    tok, model = shutil.copytree(tok_dir, tmp_path / "tok"), shutil.copytree(nano_model_dir, tmp_path / "m")
    for path, load in ((tok / "tokenizer.json", load_tokenizer), (model / "config.json", load_model)):
        path.unlink()
        os.mkfifo(path)
        with pytest.raises(TinykError, match=f"^{re.escape(str(path))} is a pipe: a "):
            load(path.parent)


def test_signal_statuses_are_posixs_where_the_system_lacks_the_signal(monkeypatch):
    """Where a signal is missing (Windows: no SIGHUP, no SIGPIPE), its stop still exits 128 + POSIX's number."""
    from tinyk.errors import signal_status

    for name in ("SIGHUP", "SIGPIPE"):
        monkeypatch.delattr(signal, name, raising=False)
    assert (signal_status("SIGHUP"), signal_status("SIGPIPE"), signal_status("SIGINT")) == (129, 141, 130)


def test_signals_held_without_delivery_are_dropped():
    """signals_held(deliver=False) swallows a SIGTERM that comes meanwhile (torchrun's, to a process already
    ending with its peer's error); signals_held() delivers it afterwards, once."""
    import time

    from tinyk.errors import signals_held

    got: list[int] = []
    before = signal.signal(signal.SIGTERM, lambda signum, _frame: got.append(signum))
    try:
        with signals_held(deliver=False):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0)
        time.sleep(0)
        assert got == []
        with signals_held():
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0)
            assert got == []
        time.sleep(0)
        assert got == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, before)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX's")
def test_a_config_file_that_is_a_pipe_is_named_so(tmp_path, capsys):
    """--config <(...) or a FIFO: 'config file is a pipe or a device, not a file', not 'not found'."""
    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo)
    code, err = run_cli(["pretrain", "--config", str(fifo)], capsys)
    assert code == 2 and err == f"tinyk: error: config file is a pipe or a device, not a file: {fifo}\n"


def test_an_error_quoted_inside_ours_is_one_line():
    """first_line keeps an error's first line (torch's and trackers' frames follow it); one_line joins the
    whole message into one; an empty message is the error's type."""
    from tinyk.errors import first_line, one_line

    e = RuntimeError("\n  torch.compile failed: no C compiler\n  File 'x.py', line 1\n    frame\n")
    assert first_line(e) == "torch.compile failed: no C compiler" and first_line(ValueError(" ")) == "ValueError"
    assert one_line(ValueError("bad data\n  at byte 12\tof 40")) == "bad data at byte 12 of 40"
    assert one_line(OSError()) == "OSError"


def test_available_memory_is_the_lower_of_the_machines_and_the_containers(tmp_path, monkeypatch):
    """MemAvailable counts kB of 1024 bytes; a container's lower limit wins, and a group over its limit has 0 left."""
    from tinyk import errors

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16000000 kB\nMemFree:         1000 kB\nMemAvailable:    8000000 kB\n")
    real_path = errors.Path
    monkeypatch.setattr(errors, "Path", lambda p, *a: meminfo if p == "/proc/meminfo" else real_path(p, *a))
    for cgroup_left, available in ((None, 8_192_000_000), (10**12, 8_192_000_000), (5 * 10**8, 5 * 10**8),
                                   (-4096, 0)):
        monkeypatch.setattr(errors, "cgroup_memory_left", lambda left=cgroup_left: left)
        assert errors.memory_available() == available, cgroup_left


@pytest.mark.parametrize("pattern", ["part-?.jsonl", "part-[12].jsonl"])
def test_every_shell_wildcard_left_unexpanded_is_named_as_one(tmp_path, pattern):
    for name in ("part-1.jsonl", "part-2.jsonl"):
        (tmp_path / name).write_text("")
    assert typo_hint(tmp_path / pattern).startswith(" (a wildcard, which tinyk does not expand: it matches 2 names")


def test_stdout_on_a_file_system_that_counts_no_inodes_is_not_called_full(tmp_path, monkeypatch):
    """btrfs and tmpfs report no inode counts: a write that failed elsewhere was blamed on stdout."""
    import tinyk.cli

    with open(tmp_path / "out.txt", "w") as f:
        monkeypatch.setattr(sys, "stdout", f)
        real = os.fstatvfs(f.fileno())
        monkeypatch.setattr(os, "fstatvfs", lambda fd: os.statvfs_result((*real[:5], 0, 0, 0, *real[8:])))
        assert not tinyk.cli._stdout_is_full()
