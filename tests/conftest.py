"""Shared fixtures: a small tokenizer, prepared pretraining and SFT data, and a `nano` model directory,
built once per test session."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from tinyk.checkpoint import init_model_dir
from tinyk.data import prepare_pretrain, prepare_sft
from tinyk.tokenizer import train_tokenizer

# Tests press Ctrl-C on themselves; a shell starts a background job (`make test &`, nohup) with it ignored.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

CHINESE = "我们今天去公园散步，天气很好！你喜欢吃苹果吗？这本书非常有意思：作者写得很好。中国的首都是北京。"
ENGLISH = "The quick brown fox jumps over the lazy dog. 1+1=2; (x, y) -> z."


def make_corpus(path: Path, n_docs: int = 400) -> Path:
    """A deterministic mixed Chinese/English JSONL corpus."""
    lines = []
    for i in range(n_docs):
        a = CHINESE[i % len(CHINESE):] + CHINESE[: i % len(CHINESE)]
        lines.append(json.dumps({"text": f"{a} {ENGLISH} 第{i}号文档。"}, ensure_ascii=False))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus") / "corpus.jsonl")


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory, corpus_file) -> Path:
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer([corpus_file], out, vocab_size=512, show_progress=False)
    return out


@pytest.fixture(scope="session")
def nano_model_dir(tmp_path_factory, tok_dir) -> Path:
    out = tmp_path_factory.mktemp("model") / "nano"
    init_model_dir("nano", tok_dir, out, seed=0)
    return out


@pytest.fixture(scope="session")
def pt_data(tmp_path_factory, corpus_file, tok_dir) -> Path:
    out = tmp_path_factory.mktemp("pt") / "data"
    prepare_pretrain([corpus_file], tok_dir, out, val_fraction=0.05, workers=1, show_progress=False)
    return out


@pytest.fixture(scope="session")
def sft_data(tmp_path_factory, tok_dir) -> Path:
    root = tmp_path_factory.mktemp("sft")
    convs = [{"conversations": [{"from": "human", "value": f"问题{i}：北京是哪里？" + "请详细说明。" * (i % 4)},
                                {"from": "gpt", "value": f"北京是中国的首都。第{i}个回答。"}]} for i in range(120)]
    (root / "sft.jsonl").write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in convs))
    prepare_sft([root / "sft.jsonl"], tok_dir, root / "data", val_fraction=0.1, workers=1, show_progress=False)
    return root / "data"
