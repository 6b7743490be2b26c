"""bench/_common.py, which every benchmark script stands on: one-line refusals and exits, SIGTERM
stopping as Ctrl-C does, interleaved trials taking turns, the decode rate, and the data
benchmarks' `tinyk data pretrain` runs, which must never leave a run writing or replace a tokenizer."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tinyk.errors import TinykError

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def common():
    spec = importlib.util.spec_from_file_location("_common", BENCH / "_common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rotated_gives_each_item_the_first_turn(common):
    assert [common.rotated("abc", t) for t in range(4)] == [list("abc"), list("bca"), list("cab"), list("abc")]


def test_decode_rate_refuses_timing_noise(common):
    assert common.decode_rate(10, 1.0, 3.0, "--new-tokens") == 5.0
    for full in (1.0, 0.9):
        with pytest.raises(TinykError, match=r"^generating 10 more tokens timed [+-]0\.\d{4} s, which is timing "
                                             r"noise, not a rate: raise --new-tokens$"):
            common.decode_rate(10, 1.0, full, "--new-tokens")


SCRIPT = '''
import os, signal, sys, time
sys.path.insert(0, {bench!r})
from _common import Parser, run_main
from tinyk.errors import TinykError

def main():
    p = Parser()
    p.add_argument("--mode", type=int, required=True)
    mode = p.parse_args().mode
    if mode == 1:
        raise TinykError("no such thing")
    if mode == 2:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)
        finally:
            print("cleaned up", flush=True)
    return mode

run_main(main)
'''


@pytest.mark.parametrize("arg,code,out,err", [
    ("x", 2, "", "s.py: error: argument --mode: invalid int value: 'x' (see s.py --help)\n"),
    ("1", 1, "", "s.py: no such thing\n"),
    ("2", 130, "cleaned up\n", "s.py: interrupted\n"),  # SIGTERM stops it as Ctrl-C does: its finally runs
    ("3", 3, "", "")])
def test_a_bench_scripts_exit_and_its_one_line(tmp_path, arg, code, out, err):
    script = tmp_path / "s.py"
    script.write_text(SCRIPT.format(bench=str(BENCH)))
    r = subprocess.run([sys.executable, str(script), "--mode", arg], capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stdout, r.stderr) == (code, out, err)


def test_data_pretrain_runs_stops_and_reaps_tinyk(common, tmp_path, corpus_file, tok_dir):
    out = tmp_path / "d"
    seconds, code, _, _ = common.data_pretrain(corpus_file, tok_dir, out, 1)
    assert code == 0 and seconds > 0 and (out / "meta.json").exists()
    with pytest.raises(TinykError, match=r"^tinyk data pretrain failed \(exit 2\): tinyk: error: .*--force"):
        common.data_pretrain(corpus_file, tok_dir, out, 1)
    assert common.data_pretrain(corpus_file, tok_dir, out, 1, force=True)[1] == 0
    assert common.data_pretrain(corpus_file, tok_dir, tmp_path / "s", 1, stop_after=0.01)[1] in (143, -15)
    pids = []

    def interrupted(pid: int) -> None:
        pids.append(pid)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        common.data_pretrain(corpus_file, tok_dir, tmp_path / "i", 1, watch=interrupted)
    with pytest.raises(ProcessLookupError):  # stopped and reaped, not left writing where the caller cleans up
        os.kill(pids[0], 0)


def test_bench_tokenizer_keeps_the_one_there(common, tmp_path, corpus_file, tok_dir):
    tok = tmp_path / "tok"
    shutil.copytree(tok_dir, tok)
    before = (tok / "tokenizer.json").read_bytes()
    common.bench_tokenizer(corpus_file, tok)
    assert (tok / "tokenizer.json").read_bytes() == before
