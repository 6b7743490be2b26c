"""`tinyk eval`: data loss/bits per byte, generation exact match and stop rate, multiple choice."""

from __future__ import annotations

import csv
import gzip
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tinyk.checkpoint import init_model_dir, load_model
from tinyk.cli import main
from tinyk.data import prepare_pretrain
from tinyk.errors import TinykError
from tinyk.evaluate import (
    ChoiceQuestion,
    TaskExample,
    _option_sequences,
    chat_prompter,
    check_outputs,
    choice_continuations,
    choices_that_fit,
    compared_rows,
    continuation_logprobs,
    eval_choice,
    eval_data,
    eval_task,
    evaluate,
    evaluate_models,
    is_results,
    normalize_answer,
    percent,
    read_choice,
    read_task_prompts,
    save_outputs,
    score_task,
    skip_notes,
    table_rows,
)
from tinyk.inputs import Skips
from tinyk.tokenizer import MODEL_PROMPT, load_tokenizer, train_tokenizer
from tinyk.units import format_table

QUESTIONS = [
    ("中国的首都是哪里？", ["北京", "上海", "广州", "深圳"]),
    ("一年有几个季节？", ["四个", "三个", "五个", "六个"]),
    ("水在零度会怎样？", ["结冰", "沸腾", "燃烧", "蒸发"]),
    ("太阳从哪边升起？", ["东边", "西边", "南边", "北边"]),
    ("1+1等于几？", ["2", "3", "4", "5"]),
    ("下面哪个是水果？", ["苹果", "汽车", "桌子", "电脑"]),
]


@pytest.fixture(scope="module")
def nano(nano_model_dir):
    return load_model(nano_model_dir)


def model_choice(model, tok, fmt: str, question: str, options: dict[str, str]) -> str:
    """The option the model prefers, computed independently of eval_choice's bookkeeping."""
    context, conts = choice_continuations(ChoiceQuestion("s", question, options, "A"), fmt)
    scores = continuation_logprobs(model, tok, [(context, c) for _, c in conts], batch_size=1)
    if fmt == "cloze":
        scores = [s / len(tok.normalized(c).encode()) for s, (_, c) in zip(scores, conts, strict=True)]
    return conts[max(range(len(conts)), key=scores.__getitem__)][0]


def write_ceval(folder: Path, model, tok, fmt: str) -> None:
    """A C-Eval layout: answers where the model agrees for the first 3 questions and disagrees after.

    So accuracy must come out exactly 50%, whatever the random model prefers. The test split has
    no answer column (as in the real C-Eval) and must be skipped.
    """
    (folder / "val").mkdir(parents=True)
    (folder / "test").mkdir()
    with open(folder / "val" / "toy_val.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "question", "A", "B", "C", "D", "answer", "explanation"])
        for i, (q, opts) in enumerate(QUESTIONS):
            options = dict(zip("ABCD", opts, strict=True))
            pick = model_choice(model, tok, fmt, q, options)
            answer = pick if i < 3 else next(k for k in "ABCD" if k != pick)
            w.writerow([i, q, *opts, answer, ""])
    with open(folder / "test" / "toy_test.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "question", "A", "B", "C", "D"])
        w.writerow([0, "?", "a", "b", "c", "d"])


@pytest.fixture(scope="module")
def merging(tmp_path_factory):
    """A model whose tokenizer has "：（" and "：“" as single tokens, as one trained on news text has."""
    root = tmp_path_factory.mktemp("merging")
    lines = [f"问题{i}\n答案：（甲{i}）答案：“好{i}”答案：乙{i}" for i in range(300)]
    (root / "c.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in lines),
                                  encoding="utf-8")
    train_tokenizer([root / "c.jsonl"], root / "tok", vocab_size=320, show_progress=False)
    init_model_dir("nano", root / "tok", root / "model", seed=0)
    return load_model(root / "model")


def test_an_option_is_scored_on_its_text_after_the_contexts_text(merging):
    """Scored from before the context's last token: the option's tokens as context and option tokenize
    together (as pretraining saw such text), divided by the chance of any token starting with that last
    token's characters. An option opening with "（" is then scored on the "：（" token the model knows,
    not on a "：", "（" pair it never saw (C-Eval's quoted options lost 0.1-0.2 nats a byte so)."""
    model, tok = merging
    context, options = "问题\n答案：", ["（苹果）", "香蕉", "“好的”"]
    ctx = [tok.bos_id] + tok.encode(context)
    wholes = [[tok.bos_id] + tok.encode(context + o) for o in options]
    assert [tok.decode([w[len(ctx) - 1]]) for w in wholes] == ["：（", "：", "：“"]
    with torch.no_grad():
        heal = torch.log_softmax(model(torch.tensor([ctx]))[0, -2], -1)
    starting = [i for i in range(tok.vocab_size) if tok.decode([i]).startswith("：")]
    denominator = heal[starting].logsumexp(0).item()
    want = []
    for w in wholes:
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([w]))[0], -1)
        want.append(sum(logp[i - 1, w[i]].item() for i in range(len(ctx) - 1, len(w))) - denominator)
    pairs = [(context, o) for o in options]
    assert continuation_logprobs(model, tok, pairs, batch_size=2) == pytest.approx(want, abs=1e-4)


def test_an_options_score_depends_on_nothing_else_asked(merging, nano):
    """A question's scores are the same alone or beside others with the same prompt, merging or not
    (a stem like 下列说法正确的是 is shared by many questions), and never above 0: also where the join
    re-splits more than the context's last token (CJK letters merging across it)."""
    for model, tok in (merging, nano):
        alone = [("问题\n答案：", "香蕉"), ("问题\n答案：", "苹果")]
        others = [("问题\n答案：", "（甲）"), ("中国的首都是", "北京"), ("今天天气", "很好啊"), ("今天去", "公园散步")]
        got = continuation_logprobs(model, tok, alone + others, batch_size=3)
        assert got[:2] == pytest.approx(continuation_logprobs(model, tok, alone, batch_size=1), abs=1e-5)
        assert max(got) <= 0
    deep = [ctx for ctx, opt in others if tok.encode(ctx + opt)[:len(tok.encode(ctx)) - 1] != tok.encode(ctx)[:-1]]
    assert deep, "the test needs a context whose join with its option re-splits more than its last token"
    # A context whose last token the join splits shorter ("我们今天" + "气": "我们今", "天气"): the context's
    # tokens, then the option's own; an empty context: the option's tokens after BOS, nothing healed.
    model, tok = nano
    context, option = "我们今天", "气"
    ctx, opt = [tok.bos_id] + tok.encode(context), tok.encode(option)
    joined = [tok.bos_id] + tok.encode(context + option)
    last = len(ctx) - 1
    healed = tok.decode([ctx[last]])
    assert joined[:last] != ctx[:last] or not tok.decode([joined[last]]).startswith(healed), \
        "the test needs a join that splits the context's last token into one that does not start with it"
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ctx + opt]))[0], -1)
        alone = torch.log_softmax(model(torch.tensor([[tok.bos_id] + opt]))[0], -1)
    starting = [i for i in range(tok.vocab_size) if tok.token_bytes[i] and tok.decode([i]).startswith(healed)]
    want = sum(logp[i - 1, t].item() for i, t in enumerate(ctx + opt) if i >= last) - \
        logp[last - 1, starting].logsumexp(0).item()
    want_alone = sum(alone[i, t].item() for i, t in enumerate(opt))
    got = continuation_logprobs(model, tok, [(context, option), ("", option)])
    assert got == pytest.approx([want, want_alone], abs=1e-4)


@pytest.mark.parametrize("fmt", ["cloze", "letter"])
def test_choice_accuracy_and_chance_on_a_ceval_folder(tmp_path, nano, fmt):
    model, tok = nano
    write_ceval(tmp_path / "ceval", model, tok, fmt)
    r = eval_choice(model, tok, [tmp_path / "ceval"], fmt=fmt)
    assert r["questions"] == 6
    assert r["accuracy"] == pytest.approx(0.5)
    assert r["baseline"] == pytest.approx(0.25)
    assert r["subjects"] == {"toy": {"questions": 6, "accuracy": 0.5}} and r["macro_accuracy"] == pytest.approx(0.5)
    assert r["skipped"]["by_reason"] == {"no_answer_column": 1}
    # said, not hidden
    assert next(table_rows({"choice": r}))[0] == f"multiple choice, {fmt} (n=6, 1 skipped (no answer column))"
    (tmp_path / "ceval" / "empty_val.csv").touch()  # a failed download among the others: named, not fatal
    r = eval_choice(model, tok, [tmp_path / "ceval"], fmt=fmt)
    assert r["questions"] == 6 and r["skipped"]["by_reason"] == {"no_answer_column": 1, "empty_file": 1}
    assert r["skipped"]["first"]["empty_file"] == ["empty_val.csv"]
    # A second subject the model gets all right: per question 5 of 8, per subject the mean of 50% and 100%.
    with open(tmp_path / "ceval" / "val" / "two_val.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "question", "A", "B", "C", "D", "answer"])
        for i, (q, opts) in enumerate(QUESTIONS[:2]):
            w.writerow([i, q, *opts, model_choice(model, tok, fmt, q, dict(zip("ABCD", opts, strict=True)))])
    r = eval_choice(model, tok, [tmp_path / "ceval"], fmt=fmt)
    assert (r["accuracy"], r["macro_accuracy"]) == (pytest.approx(5 / 8), pytest.approx(0.75))
    assert ("  mean over subjects", "75.0%", "") in list(table_rows({"choice": r}))


def test_cloze_scores_options_per_byte_of_what_the_tokens_spell(tmp_path, corpus_file):
    """With an NFKC tokenizer （甲） and (甲) are the same tokens, so the same log-probability: divided
    by the raw text's bytes (9 and 5), the full-width option won whatever the model said."""
    tok_dir = tmp_path / "tok"
    train_tokenizer([corpus_file], tok_dir, vocab_size=400, normalization="nfkc", show_progress=False)
    model = init_model_dir("nano", tok_dir, tmp_path / "m")
    tok = load_tokenizer(tok_dir)
    folder = tmp_path / "ceval"
    folder.mkdir()
    (folder / "x_val.csv").write_text("id,question,A,B,C,answer\n0,哪个对？,（甲）,(甲),乙,C\n1,几个？,１２,12,三,C\n"
                                      "2,哪个对？,（甲）,(甲),乙,B\n", encoding="utf-8")
    records: list = []
    result = eval_choice(model, tok, [folder], fmt="cloze", records=records)
    assert len(records) == 2
    for r in records:
        assert r["logprobs"]["A"] == pytest.approx(r["logprobs"]["B"]) and r["scores"]["A"] == pytest.approx(
            r["scores"]["B"])
    # An answer that another option spells alike once normalised ties with it, and a tie goes to the first
    # option: right or wrong by its place alone, so skipped (it was scored: 100% as A, 0% as B).
    assert result["skipped"]["by_reason"] == {"repeated_option": 1}


def test_cmmlu_header_bad_rows_and_uneven_options(tmp_path):
    f = tmp_path / "astronomy.csv"
    f.write_text(",Question,A,B,C,D,Answer\n"
                 "0,天上最亮的星？,太阳,月亮,,,A\n"      # two options: chance 1/2
                 "1,坏行,甲,乙,丙,丁,E\n"               # answer not an option
                 "2,哪个是行星？,地球,太阳,月亮,银河,a\n"
                 "3,一列太多,甲,乙,丙,丁,A,多\n"      # an unquoted comma: its fields are shifted
                 "4,尾部多个逗号,甲,乙,丙,丁,B,\n", encoding="utf-8")  # a trailing comma shifts nothing
    skips = Skips()
    qs = read_choice([f], skips)
    assert [(q.subject, q.answer, len(q.options)) for q in qs] == [("astronomy", "A", 2), ("astronomy", "A", 4),
                                                                    ("astronomy", "B", 4)]
    assert skips.counts == {"answer_not_an_option": 1, "extra_fields": 1}
    assert skips.first["extra_fields"] == ["astronomy.csv:5"]
    packed = tmp_path / "geo.csv.gz"  # was "not UTF-8 text ... iconv -f gbk"
    packed.write_bytes(gzip.compress("question,A,B,answer\n问,甲,乙,A\n".encode()))
    with pytest.raises(TinykError, match=r"geo.csv.gz: gzip-compressed; multiple-choice CSVs are read as plain text "
                                         r"\(decompress it first\)$"):
        read_choice([packed], Skips())
    # No question is usable: what is wrong with the rows, not a word on splits without answers; each row's
    # own fault (one reason's note was its first row's, and named the wrong fault for the others).
    f.write_text(",Question,A,B,C,D,Answer\n0,坏行,甲,乙,丙,丁,E\n1,,甲,乙,丙,丁,A\n2,一个选项,甲,,,,A\n",
                 encoding="utf-8")
    with pytest.raises(TinykError) as e:
        read_choice([f], Skips())
    rule = "a row has a question, at least two of the options A, B, C, D and the right one's letter as its answer"
    assert str(e.value) == (f"no questions with answers in {f} (skipped 3 records; answer not an option: 1 (first "
                            f"at astronomy.csv:2; answer 'E' is not the letter of one of its options; {rule}); no "
                            f"question: 1 (first at astronomy.csv:3; no question; {rule}); too few options: 1 (first "
                            f"at astronomy.csv:4; fewer than two options; {rule}))")


@pytest.mark.parametrize("fmt", ["cloze", "letter"])
def test_a_question_whose_options_do_not_fit_the_context_is_skipped_and_counted(tmp_path, nano, fmt):
    """Cut to fit, a 1,000-character option was scored on its first tokens and divided by all its bytes,
    so it beat the right answer; cut at its start, a long question lost its BOS. Neither is scored now."""
    model, tok = nano
    f = tmp_path / "long_val.csv"
    long = "长" * 1000
    f.write_text("id,question,A,B,C,D,answer\n"
                 f"0,选哪个？,短,{long},中,长,C\n"
                 f"1,{long}？,甲,乙,丙,丁,A\n"
                 "2,哪个是水果？,苹果,汽车,桌子,电脑,A\n", encoding="utf-8")
    r = eval_choice(model, tok, [f], fmt=fmt)
    # letter lists every option in the context: row 2 too long there as well, only row 4 fits either way
    assert r["questions"] == 1 and r["skipped"]["by_reason"] == {"too_long_for_context": 2}
    assert r["skipped"]["first"] == {"too_long_for_context": ["long_val.csv:2", "long_val.csv:3"]}
    assert r["skipped"]["hints"]["too_long_for_context"] == (
        "a question with each of its options must fit the model's 128-token context")
    f.write_text(f"id,question,A,B,answer\n0,{long},甲,乙,A\n", encoding="utf-8")
    with pytest.raises(TinykError, match=f"^no question in {re.escape(str(f))} fits the model's context "
                                         r"\(skipped 1 record; too long for context: 1 "):
        eval_choice(model, tok, [f], fmt=fmt)


def test_choice_refuses_bad_inputs(tmp_path, nano):
    model, tok = nano
    with pytest.raises(TinykError, match="not found"):
        eval_choice(model, tok, [tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(TinykError, match="no .csv files"):
        eval_choice(model, tok, [tmp_path / "empty"])
    bad = tmp_path / "bad.csv"
    bad.write_text("x,y\n1,2\n", encoding="utf-8")
    with pytest.raises(TinykError, match="not a multiple-choice CSV"):
        eval_choice(model, tok, [bad])
    with pytest.raises(TinykError, match="unknown multiple-choice format"):
        eval_choice(model, tok, [bad], fmt="mmlu")


def test_every_input_is_checked_before_the_model_loads(tmp_path, nano_model_dir, pretrain_data, corpus_file,
                                                        monkeypatch):
    """A mistake in the last mode must not cost the minutes the first ones take: each is reported
    before the model's weights are loaded."""
    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("tinyk.checkpoint.load_model", never)
    other_tok = tmp_path / "other-tok"
    train_tokenizer([corpus_file], other_tok, vocab_size=300, show_progress=False)
    prepare_pretrain([corpus_file], other_tok, tmp_path / "other-data", val_fraction=0.0, workers=1,
                     show_progress=False)
    with pytest.raises(TinykError, match="the val split of .* is empty"):
        evaluate(nano_model_dir, data=[tmp_path / "other-data"])
    with pytest.raises(TinykError, match=r"was tokenized with another tokenizer than the model .*'s; re-run tinyk "
                                         r"data with --tokenizer "):
        evaluate(nano_model_dir, data=[tmp_path / "other-data"], split="train")
    with pytest.raises(TinykError, match="multiple-choice path not found"):
        evaluate(nano_model_dir, data=[pretrain_data], choice=[tmp_path / "nope"])
    with pytest.raises(TinykError, match="has no split 'test'"):
        evaluate(nano_model_dir, data=[pretrain_data], split="test")
    gbk = tmp_path / "gbk_val.csv"
    gbk.write_bytes("id,question,A,B,answer\n1,天上,太阳,月亮,A\n".encode("gbk"))
    with pytest.raises(TinykError, match="not UTF-8 text"):
        evaluate(nano_model_dir, data=[pretrain_data], choice=[gbk])
    with pytest.raises(TinykError, match="--quantize int8 applies to --task answers"):
        evaluate(nano_model_dir, choice=[gbk], quantize="int8")
    # What a mode finds only by reading: a task file without a usable line or a prompt that fits, a cut shard.
    with pytest.raises(TinykError, match="bad.jsonl: no usable examples"):
        evaluate(nano_model_dir, data=[pretrain_data], tasks=[write_task(tmp_path / "bad.jsonl", ["not json"])])
    (tmp_path / "blank.jsonl").write_text("\n\n")  # said why, not "skipped 0 records"
    with pytest.raises(TinykError, match=r"blank.jsonl: no usable examples \(nothing but blank lines"):
        evaluate(nano_model_dir, tasks=[tmp_path / "blank.jsonl"])
    long = write_task(tmp_path / "long.jsonl",
                      [{"messages": [{"role": "user", "content": "长" * 1000}], "answer": "y"}])
    with pytest.raises(TinykError, match=r"long.jsonl: no example fits the model's context \(skipped"):
        evaluate(nano_model_dir, data=[pretrain_data], tasks=[long])
    short = write_task(tmp_path / "short.jsonl", [{"messages": [{"role": "user", "content": "好"}], "answer": "y"}])
    with pytest.raises(TinykError, match="short.jsonl: no example fits the model's context with the system prompt, "
                                         r"which leaves it no room \(give a shorter --system-prompt"):
        evaluate(nano_model_dir, tasks=[short], system_prompt="长" * 1000)
    cut = Path(shutil.copytree(pretrain_data, tmp_path / "cut"))
    shard = sorted((cut / "val").glob("*.bin"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(TinykError, match="shard"):
        evaluate(nano_model_dir, data=[pretrain_data, cut])


def test_models_compared_keep_each_groups_rows_under_it(monkeypatch):
    """Models of different contexts skip different questions, so their multiple-choice rows head groups
    of different counts: one model's "mean over subjects" showed in the other's group."""
    import tinyk.evaluate

    monkeypatch.setattr(tinyk.evaluate, "table_rows", lambda r: r["rows"])
    wide = [("choice (n=4)", "25.0%", ""), ("  mean over subjects", "16.7%", ""), ("  good (n=3)", "33.3%", ""),
            ("  longq (n=1)", "0.0%", ""), ("data loss", "2.1", "")]
    narrow = [("choice (n=2)", "50.0%", ""), ("  mean over subjects", "50.0%", ""), ("  good (n=1)", "100.0%", ""),
              ("  longq (n=1)", "0.0%", ""), ("data loss", "2.2", "")]
    assert compared_rows([{"rows": wide}, {"rows": narrow}]) == [
        ("choice (n=4)", "25.0%", "-", ""), ("  mean over subjects", "16.7%", "-", ""),
        ("  good (n=3)", "33.3%", "-", ""), ("  longq (n=1)", "0.0%", "-", ""), ("data loss", "2.1", "2.2", ""),
        ("choice (n=2)", "-", "50.0%", ""), ("  mean over subjects", "-", "50.0%", ""),
        ("  good (n=1)", "-", "100.0%", ""), ("  longq (n=1)", "-", "0.0%", "")]


def test_csvs_with_a_header_alone_say_so(tmp_path):
    f = tmp_path / "x_val.csv"
    f.write_text("question,A,B,answer\n", encoding="utf-8")
    with pytest.raises(TinykError, match=r"^no questions with answers in .*x_val.csv \(they have a header and no "
                                         r"rows\)$"):  # it was "(skipped 0 records)"
        read_choice([f], Skips())


def test_a_one_character_column_that_is_no_latin_letter_is_no_option(tmp_path):
    """A note column named 注 (one character, and a letter to Python) was scored as a fifth option,
    which also changed the chance level."""
    f = tmp_path / "x_val.csv"
    f.write_text("question,A,B,answer,注\n首都？,北京,上海,A,常识\n", encoding="utf-8")
    [q] = read_choice([f], Skips())
    assert q.options == {"A": "北京", "B": "上海"}


def test_a_csv_reached_twice_is_read_once_and_limit_is_per_subject(tmp_path):
    (tmp_path / "val").mkdir()
    for subject in ("astro", "geo"):
        rows = "".join(f"{i},问题{i},甲,乙,A\n" for i in range(3))
        (tmp_path / "val" / f"{subject}_val.csv").write_text("id,question,A,B,answer\n" + rows, encoding="utf-8")
    qs = read_choice([tmp_path / "val", tmp_path / "val" / "geo_val.csv"], Skips())
    assert [q.subject for q in qs] == ["astro"] * 3 + ["geo"] * 3
    qs = read_choice([tmp_path / "val"], Skips(), limit=2)
    assert [q.subject for q in qs] == ["astro", "astro", "geo", "geo"]
    # The same subject in another folder (C-Eval's dev split, or another benchmark) is not merged into it;
    # a folder named like a CSV is not one.
    (tmp_path / "cmmlu" / "odd.csv").mkdir(parents=True)
    (tmp_path / "cmmlu" / "geo.csv").write_text(",Question,A,B,Answer\n0,问题,甲,乙,B\n", encoding="utf-8")
    qs = read_choice([tmp_path / "val", tmp_path / "cmmlu"], Skips())
    assert [q.subject for q in qs] == ["astro"] * 3 + ["val/geo"] * 3 + ["cmmlu/geo"]
    for bench in ("ceval", "cmmlu"):  # both benchmarks have a dev folder and shared subject names
        (tmp_path / bench / "dev").mkdir(parents=True)
        (tmp_path / bench / "dev" / "geo_dev.csv").write_text("id,question,A,B,answer\n0,问题,甲,乙,A\n",
                                                              encoding="utf-8")
    qs = read_choice([tmp_path / "ceval" / "dev", tmp_path / "cmmlu" / "dev"], Skips())
    assert [q.subject for q in qs] == ["ceval/dev/geo", "cmmlu/dev/geo"]
    # The two files' rows are told apart by their paths where their names are the same.
    assert [q.where for q in qs] == [f"{tmp_path / bench / 'dev' / 'geo_dev.csv'}:2" for bench in ("ceval", "cmmlu")]
    shutil.copy(tmp_path / "ceval" / "dev" / "geo_dev.csv", tmp_path / "val")  # dev beside val in one folder
    qs = read_choice([tmp_path / "val"], Skips())
    assert [q.subject for q in qs] == ["astro"] * 3 + ["geo_dev"] + ["geo_val"] * 3


def test_normalize_answer():
    assert normalize_answer(" 3+5等于８。 ") == "3+5等于8"
    assert normalize_answer("正面\n") == normalize_answer("正面！")
    assert normalize_answer("负面") != normalize_answer("正面")


@pytest.fixture(scope="module")
def pretrain_data(tmp_path_factory, corpus_file, tok_dir):
    from tinyk.data import prepare_pretrain

    out = tmp_path_factory.mktemp("evaldata") / "pt"
    prepare_pretrain([corpus_file], tok_dir, out, val_fraction=0.2, workers=1, show_progress=False)
    return out


def test_data_loss_perplexity_bits_per_byte(nano, nano_model_dir, pretrain_data):
    """Bits per byte divide by the bytes of text the evaluated targets spell, whatever part of the split
    is evaluated (a whole-split average was off on part of one)."""
    from tinyk.loader import eval_batches

    model, tok = nano
    for max_batches in (None, 2):
        r = eval_data(model, nano_model_dir, pretrain_data, seq_len=32, batch_size=4, max_batches=max_batches)
        total = count = 0
        targets: list[int] = []
        with torch.no_grad():
            for x, y in eval_batches(pretrain_data, "val", 32, 4, max_batches):
                total += F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum").item()
                count += y.numel()
                targets += y.flatten().tolist()  # consecutive windows: one stretch of the token stream
        text_bytes = len(tok.decode(targets, skip_special_tokens=True).encode("utf-8"))
        assert r["tokens"] == count
        assert r["loss"] == pytest.approx(total / count, rel=1e-5)
        assert r["perplexity"] == pytest.approx(math.exp(r["loss"]), rel=1e-6)
        assert abs(r["bytes"] - text_bytes) <= 3  # the last window may end inside a character
        assert r["bits_per_byte"] == pytest.approx(total / math.log(2) / r["bytes"], rel=1e-5)
    # A random model is close to uniform over the vocabulary.
    assert abs(r["loss"] - math.log(model.config.vocab_size)) < 0.5


def test_sft_loss_counts_the_answer_tokens_alone(nano, nano_model_dir, sft_data):
    """The SFT score is the answers' loss, as training's: computed here with cross-entropy's own ignore_index."""
    from tinyk.loader import eval_batches

    model, _ = nano
    r = eval_data(model, nano_model_dir, sft_data, seq_len=64, batch_size=4)
    total = count = 0
    with torch.no_grad():
        for x, y in eval_batches(sft_data, "val", 64, 4):
            total += F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum").item()
            count += int((y != -100).sum())
            assert (y == -100).any()  # the prompts and padding are there, and not counted
    assert r["tokens"] == count and r["loss"] == pytest.approx(total / count, rel=1e-5)


def test_a_diverged_models_loss_is_said_and_its_json_stays_json(nano_model_dir, pretrain_data):
    """A model whose logits overflow wrote NaN into results.json (which jq and JavaScript refuse) under
    a table of "nan"; a loss beyond e^709 had its perplexity capped at e^50 without a word."""
    from tinyk.evaluate import table_rows

    model, _ = load_model(nano_model_dir)
    rows = {}
    for case, scale in (("huge", 1e6), ("nan", math.nan)):
        with torch.no_grad():
            model.lm_head.weight.mul_(scale)
        r = eval_data(model, nano_model_dir, pretrain_data, seq_len=32, batch_size=4, max_batches=2)
        json.loads(json.dumps(r, allow_nan=False))  # strict JSON
        rows[case] = r, {metric.split(" (")[0]: (score, note) for metric, score, note in table_rows({"data": [r]})}
    nan, shown = rows["nan"]
    assert (nan["loss"], nan["perplexity"], nan["bits_per_byte"]) == (None, None, None)
    assert shown == {"pt/val loss": ("not finite", "the model's logits overflow: its weights hold NaN or inf, "
                                                     "or it diverged")}
    huge, shown = rows["huge"]
    assert huge["loss"] > 709 and huge["perplexity"] is None and huge["bits_per_byte"] > 0
    assert shown["pt/val perplexity"] == (f"e^{huge['loss']:.0f}", "")


def test_sft_conversations_a_short_window_leaves_out_are_reported(nano, nano_model_dir, sft_data):
    """Conversations with no answer token within --seq-len are not in the score: the results say how many."""
    from tinyk.loader import SFTLoader

    model, _ = nano
    full = eval_data(model, nano_model_dir, sft_data, seq_len=128)
    short = eval_data(model, nano_model_dir, sft_data, seq_len=64)
    assert full["conversations_left_out"] == SFTLoader(sft_data, "val", 128, 2).dropped  # as training leaves out
    assert short["conversations_left_out"] == SFTLoader(sft_data, "val", 64, 2).dropped > \
        full["conversations_left_out"]
    rows = [r[0] for r in table_rows({"data": [short]})]
    assert f"{sft_data.name}/val conversations left out (no answer token within seq_len 64)" in rows
    # A window beyond the model's 128-token context is cut to it, and the table says so.
    wide = eval_data(model, nano_model_dir, sft_data, seq_len=1000)
    assert (wide["seq_len"], wide["seq_len_asked"], wide["loss"]) == (128, 1000, full["loss"])
    assert next(table_rows({"data": [wide]}))[0] == f"{sft_data.name}/val loss (answer tokens within seq_len 128; " \
                                                   "--seq-len 1000 is beyond the model's context)"
    assert "seq_len_asked" not in full and next(table_rows({"data": [full]}))[0].endswith("within seq_len 128)")
    # One number for the window, the seq_len the JSON records (the loss row said "up to 65 tokens" here).
    assert next(table_rows({"data": [short]}))[0] == f"{sft_data.name}/val loss (answer tokens within seq_len 64)"


def test_a_window_cut_for_another_model_says_so(tmp_path, nano_model_dir, tok_dir, pretrain_data):
    """Models compared share the shortest window: a --seq-len within a model's own context is cut for the
    others, which its row said was "beyond the model's context"."""
    from tinyk.evaluate import evaluate_models

    wide = tmp_path / "wide"
    init_model_dir("nano", tok_dir, wide, max_seq_len=256)
    narrow, broad = evaluate_models([nano_model_dir, wide], data=[pretrain_data], seq_len=200)
    rows = [next(table_rows(r))[0] for r in (narrow, broad)]
    assert rows == [f"{pretrain_data.name}/val loss (windows of 128 tokens; --seq-len 200 is beyond {why})"
                    for why in ("the model's context", "the shortest context of the models compared")]


def test_data_from_another_tokenizer_is_refused(tmp_path, nano, pretrain_data, corpus_file):
    from tinyk.checkpoint import init_model_dir
    from tinyk.tokenizer import train_tokenizer

    other_tok = train_tokenizer([corpus_file], tmp_path / "tok", vocab_size=300, show_progress=False)
    assert other_tok["vocab_size"] == 300
    init_model_dir("nano", tmp_path / "tok", tmp_path / "m")
    model, _ = load_model(tmp_path / "m")
    with pytest.raises(TinykError, match="was tokenized with another tokenizer than the model"):
        eval_data(model, tmp_path / "m", pretrain_data)


class ScriptedEngine:
    """Answers each prompt from a table keyed by its last user message, so scores can be checked exactly."""

    def __init__(self, replies: dict[str, tuple[str, str]], context: int = 200):
        """`replies`: last user message -> (text, how it ended: "eos", "new turn" or "length"). Its
        tokenizer, for a model trained with the system prompt "你是诗人", works on text: one token a character."""
        from types import SimpleNamespace

        from tinyk.tokenizer import IM_END_ID, ModelPrompt, render_chat

        self.replies, self.context_length, self.seen = replies, context, []
        self.tok = SimpleNamespace(eos_id=IM_END_ID, encode_chat=render_chat, max_token_bytes=4,
                                   resolve_system=lambda s: "你是诗人" if isinstance(s, ModelPrompt) else s)

    def generate(self, prompts, params):
        from types import SimpleNamespace

        from tinyk.tokenizer import IM_END_ID, IM_START_ID

        assert params.temperature == 0 and params.repetition_penalty == 1
        self.seen += prompts
        out = []
        for p in prompts:
            text, end = self.replies[p.split("<|im_start|>user\n")[-1].split("<|im_end|>")[0]]
            ids = [7, *{"eos": [IM_END_ID], "new turn": [IM_START_ID], "length": []}[end]]
            # as the engine says it: the context, before max_new_tokens, ended the answer
            cut = end == "length" and len(ids) < params.max_new_tokens and len(p) + len(ids) >= self.context_length
            out.append(SimpleNamespace(text=text, token_ids=ids, finish_reason="length" if end == "length" else "stop",
                                       cut_by_context=cut))
        return out


def write_task(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def test_exact_match_stop_rate_and_majority_baseline(tmp_path):
    task = write_task(tmp_path / "sentiment.jsonl", [
        {"messages": [{"role": "user", "content": "好评1"}], "answer": "正面"},
        {"messages": [{"role": "user", "content": "差评1"}], "answer": "负面"},
        {"messages": [{"role": "user", "content": "差评2"}], "answer": "负面"},
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "算"}], "answer": ["8", "等于8"]},
        "{not json",
        {"messages": [{"role": "assistant", "content": "x"}], "answer": "y"},
        {"messages": [{"role": "tool", "content": "x"}, {"role": "user", "content": "q"}], "answer": "y"},
        {"messages": [{"role": "user", "content": "q"}], "answer": ["北京市北京市北京市", 1]},
        {"messages": [{"role": "user", "content": "长" * 300}], "answer": "y"},
    ])
    engine = ScriptedEngine({"好评1": ("正面。", "eos"), "差评1": ("正面", "new turn"),
                             "差评2": ("负面负面负面", "length"), "算": ("等于８", "eos")})
    r = eval_task(engine, task, batch_size=2)
    assert r["examples"] == 4
    assert r["accuracy"] == pytest.approx(2 / 4)
    assert r["stop_rate"] == pytest.approx(2 / 4)  # only answers closed with <|im_end|>
    assert r["baseline"] == pytest.approx(2 / 4) and r["majority_answer"] == "负面"
    assert r["skipped"]["by_reason"] == {"malformed_json": 1, "bad_messages": 2, "bad_answer": 1,
                                         "prompt_too_long": 1}
    assert r["skipped"]["hints"]["bad_answer"] == (
        "'answer' is [\"北京市北京市北京市\", 1]; 'answer' is the expected reply, a string or a list of the strings "
        "accepted (the first such record has fields 'messages', 'answer')")
    [note] = skip_notes({"tasks": [r]})  # what `tinyk eval` prints on stderr: the table only counts them
    assert note.startswith(f"{task.name}: skipped 5 records; bad answer: 1 (first at {task.name}:")
    # The model's own system prompt is added where missing, kept where given; results stay in file order.
    assert sorted(engine.seen) == sorted([
        "<|im_start|>system\n你是诗人<|im_end|>\n<|im_start|>user\n好评1<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>system\n你是诗人<|im_end|>\n<|im_start|>user\n差评1<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>system\n你是诗人<|im_end|>\n<|im_start|>user\n差评2<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n算<|im_end|>\n<|im_start|>assistant\n"])
    assert [s["prompt"] for s in r["samples"]] == ["好评1", "差评1", "差评2", "算"]
    assert [s["correct"] for s in r["samples"]] == [True, False, False, True]
    r = eval_task(engine, task, system_prompt=None, limit=1)
    assert r["examples"] == 1 and engine.seen[-1] == "<|im_start|>user\n好评1<|im_end|>\n<|im_start|>assistant\n"
    assert r["skipped"]["by_reason"] == {}  # the bad rows lie past the limit


def test_answers_cut_short_by_the_context_are_counted(tmp_path):
    """A prompt that leaves the answer 1 token of the context scores as wrong and not stopped; the
    results say that the context, not the model, ended it."""
    from tinyk.tokenizer import render_chat

    task = write_task(tmp_path / "t.jsonl", [{"messages": [{"role": "user", "content": u}], "answer": "好"}
                                             for u in ("长长长", "短", "中")])
    long_prompt = render_chat([{"role": "system", "content": "你是诗人"}, {"role": "user", "content": "长长长"}],
                              add_generation_prompt=True)
    engine = ScriptedEngine({"长长长": ("不", "length"), "短": ("好", "length"), "中": ("好", "eos")},
                            context=len(long_prompt) + 1)
    r = eval_task(engine, task)
    assert r["cut_by_context"] == 1 and r["stop_rate"] == pytest.approx(1 / 3) and r["accuracy"] == pytest.approx(2 / 3)
    assert ("t answers cut short by the model's context (not stopped)", "1", "") in list(table_rows(
        {"tasks": [r]}))
    assert eval_task(engine, task, max_new_tokens=1)["cut_by_context"] == 0  # max_new_tokens ended it as soon


def test_sft_records_are_task_lines_whose_last_reply_is_the_answer(tmp_path):
    """A held-out slice of fine-tuning data, in any format `tinyk data sft` reads, evaluates as it is."""
    task = write_task(tmp_path / "heldout.jsonl", [
        {"conversations": [{"from": "human", "value": "好评1"}, {"from": "assistant", "value": "正面"}]},
        {"instruction": "差评1", "input": "", "output": "负面"},
        [{"role": "user", "content": "早"}, {"role": "assistant", "content": "早安"},
         {"role": "user", "content": "算"}, {"role": "assistant", "content": "8"}],
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "差评2"},
                      {"role": "assistant", "content": "负面"}], "answer": None},
        {"messages": [{"role": "user", "content": "q"}]},
        {"messages": [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]},
        {"text": "pretraining text"},
    ])
    engine = ScriptedEngine({"好评1": ("正面", "eos"), "差评1": ("正面", "eos"), "算": ("8", "eos"),
                             "差评2": ("负面", "eos")})
    r = eval_task(engine, task)
    assert r["examples"] == 4 and r["accuracy"] == pytest.approx(3 / 4)
    assert [s["answer"] for s in r["samples"]] == ["正面", "负面", "8", "负面"]
    assert r["skipped"]["by_reason"] == {"bad_answer": 2, "bad_messages": 1}
    assert "no 'answer', and the chat does not end with a reply to a user turn" in r["skipped"]["hints"]["bad_answer"]
    assert "fields 'text'" in r["skipped"]["hints"]["bad_messages"]
    # Earlier turns are the prompt's; the record's own system prompt is kept.
    assert ("<|im_start|>system\n你是诗人<|im_end|>\n<|im_start|>user\n早<|im_end|>\n<|im_start|>assistant\n早安"
            "<|im_end|>\n<|im_start|>user\n算<|im_end|>\n<|im_start|>assistant\n") in engine.seen
    assert "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n差评2<|im_end|>\n<|im_start|>assistant\n" in engine.seen


def test_a_task_lines_text_parts_are_its_text_as_in_sft_records(tmp_path):
    """OpenAI's content lists of text parts are read the way tinyk's chat, serve and SFT data read them,
    also beside an `answer` (they were "bad messages" there, and read without one)."""
    parts = [{"type": "text", "text": "好评"}, {"type": "text", "text": "一"}]
    task = write_task(tmp_path / "t.jsonl", [{"messages": [{"role": "user", "content": parts}], "answer": "正面"},
                                             {"messages": [{"role": "user", "content": [{"type": "image"}]}],
                                              "answer": "正面"}])
    engine = ScriptedEngine({"好评\n一": ("正面", "eos")})
    r = eval_task(engine, task)
    assert (r["examples"], r["accuracy"]) == (1, 1.0) and r["skipped"]["by_reason"] == {"bad_messages": 1}
    assert engine.seen[0].endswith("<|im_start|>user\n好评\n一<|im_end|>\n<|im_start|>assistant\n")


def test_a_compressed_task_file_is_named_without_its_suffixes(tmp_path):
    import gzip

    task = tmp_path / "情感.jsonl.gz"
    task.write_bytes(gzip.compress(json.dumps({"messages": [{"role": "user", "content": "a"}], "answer": "好"},
                                              ensure_ascii=False).encode() + b"\n"))
    assert eval_task(ScriptedEngine({"a": ("好", "eos")}), task)["task"] == "情感"  # it was 情感.jsonl


def test_developer_chats_count_and_empty_answers_do_not(tmp_path):
    """`developer` is the system role everywhere else (template, SFT data, server); an answer that is only
    punctuation would be matched by an empty reply."""
    task = write_task(tmp_path / "t.jsonl", [
        {"messages": [{"role": "developer", "content": "S"}, {"role": "user", "content": "a"}], "answer": "好"},
        {"messages": [{"role": "user", "content": "b"}], "answer": "。"},
        {"messages": [{"role": "user", "content": "c"}], "answer": ["好", " "]},
    ])
    engine = ScriptedEngine({"a": ("好", "eos")})
    r = eval_task(engine, task)
    assert (r["examples"], r["accuracy"]) == (1, 1.0)
    assert engine.seen == ["<|im_start|>system\nS<|im_end|>\n<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\n"]
    assert r["skipped"]["by_reason"] == {"empty_answer": 2}


def test_the_majority_baseline_counts_alternative_answers(tmp_path):
    """Always answering "负面" is right on all three rows, one of which also accepts "差": 100%, not 67%."""
    task = write_task(tmp_path / "t.jsonl", [
        {"messages": [{"role": "user", "content": "a"}], "answer": ["差", "负面"]},
        {"messages": [{"role": "user", "content": "b"}], "answer": "负面"},
        {"messages": [{"role": "user", "content": "c"}], "answer": "负面"},
    ])
    r = eval_task(ScriptedEngine({k: ("负面", "eos") for k in "abc"}), task)
    assert r["accuracy"] == 1.0 and r["baseline"] == 1.0 and r["majority_answer"] == "负面"
    # Each example counts once (not once per alternative: past 100%), its answers compared normalised.
    task = write_task(tmp_path / "t2.jsonl", [
        {"messages": [{"role": "user", "content": "a"}], "answer": ["负面", "负面。"]},
        {"messages": [{"role": "user", "content": "b"}], "answer": "负面！"},
        {"messages": [{"role": "user", "content": "c"}], "answer": "负面"},
    ])
    r = eval_task(ScriptedEngine({k: ("正面", "eos") for k in "abc"}), task)
    assert r["baseline"] == 1.0 and r["majority_answer"] == "负面" and r["accuracy"] == 0


def test_task_errors(tmp_path, nano_model_dir):
    with pytest.raises(TinykError, match="not a model directory"):  # the model first: the checks read its tokenizer
        evaluate(tmp_path, tasks=[tmp_path / "nope.jsonl"])
    with pytest.raises(TinykError, match="not found"):
        evaluate(nano_model_dir, tasks=[tmp_path / "nope.jsonl"])
    with pytest.raises(TinykError, match="no usable examples"):
        eval_task(ScriptedEngine({}), write_task(tmp_path / "t.jsonl", ["{}"]))
    with pytest.raises(TinykError, match="nothing to evaluate"):
        evaluate(tmp_path)


def test_generation_with_the_real_engine(tmp_path, nano):
    """Real completions are the greedy answers to each chat under the model's system prompt, and are
    scored: the first example's answer is what the model says, the others' is not."""
    from tinyk.evaluate import greedy_params, make_engine

    engine = make_engine(*nano)
    chats = [[{"role": "user", "content": f"你好{i}"}] for i in range(3)]
    want = [engine.generate([engine.chat_ids([{"role": "system", "content": engine.tok.system_prompt}, *chat])],
                            greedy_params(4))[0] for chat in chats]
    task = write_task(tmp_path / "t.jsonl", [{"messages": chat, "answer": "不是这个"} for chat in chats])
    r = eval_task(engine, task, max_new_tokens=4)
    assert r["examples"] == 3 and r["accuracy"] == 0
    assert [(s["output"], s["finish_reason"]) for s in r["samples"]] == [(c.text, c.finish_reason) for c in want]
    assert r["stop_rate"] == sum(c.finish_reason == "stop" for c in want) / 3
    # A random model's greedy answer may be blank, which a task file cannot hold: scored as read.
    examples = [TaskExample(f"t:{i}", chat, [want[0].text if i == 0 else "不是这个"]) for i, chat in enumerate(chats)]
    prompts = [engine.chat_ids([{"role": "system", "content": engine.tok.system_prompt}, *c]) for c in chats]
    assert score_task(engine, task, examples, prompts, Skips(), max_new_tokens=4)["accuracy"] == pytest.approx(1 / 3)


def test_cli_table_and_json(tmp_path, nano, nano_model_dir, pretrain_data, capsys):
    model, tok = nano
    write_ceval(tmp_path / "ceval", model, tok, "cloze")
    out = tmp_path / "r.json"
    with pytest.raises(SystemExit) as e:
        main(["eval", "--model", str(nano_model_dir), "--data", str(pretrain_data), "--seq-len", "32",
              "--choice", str(tmp_path / "ceval" / "val"), "--out", str(out)])
    assert e.value.code == 0
    table = capsys.readouterr().out
    assert "pt/val bits per byte" in table and "50.0%  25.0% chance" in table
    saved = json.loads(out.read_text())
    assert saved["choice"]["accuracy"] == 0.5 and saved["data"][0]["split"] == "val"
    assert "pt/val loss (windows of 32 tokens)" in table
    with pytest.raises(SystemExit) as e:
        main(["eval", "--model", str(nano_model_dir), "--choice", str(tmp_path / "ceval"), "--json"])
    out, err = capsys.readouterr()
    assert json.loads(out)["choice"]["questions"] == 6
    # What the table counts by reason, stderr says where (rows of another answer style are skipped, not scored).
    assert err == "tinyk: eval: multiple choice: skipped 1 record; no answer column: 1 (first at toy_test.csv)\n"
    # A flag for a mode not asked for is said to be unused (the JSON's settings held it as if applied).
    with pytest.raises(SystemExit) as e:
        main(["eval", "--model", str(nano_model_dir), "--choice", str(tmp_path / "ceval"), "--json", "--seq-len",
              "32", "--max-new-tokens", "8", "--force", "--limit", "2", "--choice-format", "letter", "--quantize",
              "int8"])
    out, err = capsys.readouterr()
    assert e.value.code == 0 and err.splitlines()[:4] == [
        "tinyk: eval: --seq-len is not used without --data", "tinyk: eval: --max-new-tokens is not used without --task",
        "tinyk: eval: --force is not used without --out or --samples",
        "tinyk: eval: --quantize is not used without --task (--data and --choice always score in fp32)"]
    assert "quantize" not in json.loads(out)  # no task answers: none decoded with int8 weights (it was refused)
    with pytest.raises(SystemExit) as e:
        main(["eval", "--model", str(nano_model_dir)])
    assert e.value.code == 2
    assert "nothing to evaluate" in capsys.readouterr().err


def test_a_model_given_again_under_another_name_is_scored_once(tmp_path, nano_model_dir, pretrain_data,
                                                               monkeypatch, capsys):
    """A run's best/ is often its final/ again (the lowest val loss came last); the only difference is
    the step best/'s header records. `--model final best` then scores one model and says so."""
    from safetensors.torch import load_file, save_file

    from tinyk.checkpoint import same_model

    final, best, changed = tmp_path / "final", tmp_path / "best", tmp_path / "changed"
    for d in (final, best, changed):
        shutil.copytree(nano_model_dir, d)
    state = load_file(nano_model_dir / "model.safetensors")
    save_file(state, best / "model.safetensors", metadata={"format": "pt", "tinyk.step": "40"})
    state["model.norm.weight"][0] += 1e-3
    save_file(state, changed / "model.safetensors", metadata={"format": "pt"})
    assert same_model(final, best) and not same_model(final, changed)
    (tmp_path / "prompt").mkdir()
    shutil.copytree(final, tmp_path / "prompt", dirs_exist_ok=True)
    config = json.loads((final / "tokenizer_config.json").read_text())
    (tmp_path / "prompt" / "tokenizer_config.json").write_text(json.dumps({**config, "system_prompt": "另一个"}))
    assert not same_model(final, tmp_path / "prompt")  # another default system prompt answers tasks otherwise

    import tinyk.checkpoint

    loaded = []
    real = tinyk.checkpoint.load_model
    monkeypatch.setattr(tinyk.checkpoint, "load_model", lambda path, **kw: loaded.append(path) or real(path, **kw))
    task = write_task(tmp_path / "t.jsonl", [{"messages": [{"role": "user", "content": "你好"}], "answer": "你好"}])
    with pytest.raises(SystemExit) as e:
        main(["eval", "--model", str(final), str(best), str(changed), "--data", str(pretrain_data), "--seq-len",
              "32", "--task", str(task), "--max-new-tokens", "3", "--samples", str(tmp_path / "s.jsonl"), "--json"])
    out, err = capsys.readouterr()
    assert e.value.code == 0 and loaded == [str(final), str(changed)]
    results = json.loads(out)["models"]
    assert results[1] == {**results[0], "model": str(best), "same_as": str(final)}
    assert results[2]["data"][0]["loss"] != results[0]["data"][0]["loss"] and "same_as" not in results[2]
    samples = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["model"] for r in samples] == [str(final), str(best), str(changed)]
    assert samples[1] == {**samples[0], "model": str(best)}
    assert err == f"tinyk: eval: {best} holds the same model as {final}, so its results are that one's\n"
    # A damaged copy is no twin: loading it says what is wrong, in one line.
    for header in (b"\xff" * 8, (2**40).to_bytes(8, "little"), (2).to_bytes(8, "little") + b"[]"):
        with open(changed / "model.safetensors", "r+b") as f:
            f.write(header)
        assert not same_model(final, changed)
        with pytest.raises(SystemExit) as e:
            main(["eval", "--model", str(final), str(changed), "--data", str(pretrain_data), "--seq-len", "32"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("tinyk: error: ") and len(err.splitlines()) == 1, err


def test_several_models_are_scored_side_by_side_as_each_alone(tmp_path, nano, nano_model_dir, tok_dir,
                                                             pretrain_data, corpus_file, monkeypatch, capsys):
    """`--model A B`: the same inputs for each, one column per model, each model's numbers what its own
    evaluation gives; every model's inputs are checked before the first one's weights load."""
    model, tok = nano
    write_ceval(tmp_path / "ceval", model, tok, "cloze")
    other = tmp_path / "其他模型"
    init_model_dir("nano", tok_dir, other, seed=1)
    task = write_task(tmp_path / "t.jsonl", [{"messages": [{"role": "user", "content": f"你好{i}"}], "answer": "你好"}
                                             for i in range(3)])
    inputs = ["--data", str(pretrain_data), "--seq-len", "32", "--task", str(task), "--max-new-tokens", "3",
              "--choice", str(tmp_path / "ceval" / "val")]
    alone = []
    for m in (nano_model_dir, other):
        with pytest.raises(SystemExit) as e:
            main(["eval", "--model", str(m), *inputs, "--json"])
        assert e.value.code == 0
        alone.append(json.loads(capsys.readouterr().out))
    out, samples = tmp_path / "r.json", tmp_path / "s.jsonl"
    with pytest.raises(SystemExit) as e:
        main(["eval", "--model", str(nano_model_dir), str(other), *inputs, "--out", str(out), "--samples",
              str(samples)])
    assert e.value.code == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["metric", str(nano_model_dir), str(other), "baseline"]
    loss = next(line for line in table if line.startswith("pt/val loss"))
    assert loss.split()[-2:] == [f"{r['data'][0]['loss']:.4f}" for r in alone]
    choice = next(line for line in table if line.startswith("multiple choice"))
    assert choice.split()[-4:-2] == [percent(r["choice"]["accuracy"]) for r in alone] and "25.0% chance" in choice
    assert len(table) - 2 == len(list(table_rows(alone[0])))  # every metric of either model in one row
    saved = json.loads(out.read_text(encoding="utf-8"))["models"]
    for s, a in zip(saved, alone, strict=True):
        assert s["data"] == a["data"] and s["choice"] == a["choice"] and s["tasks"] == a["tasks"]
    lines = [json.loads(line) for line in samples.read_text(encoding="utf-8").splitlines()]
    assert [r["model"] for r in lines] == [str(nano_model_dir)] * 9 + [str(other)] * 9
    # Several models' results are earlier results too: --force replaces them.
    with pytest.raises(SystemExit) as e:
        main(["eval", "--model", str(other), "--data", str(pretrain_data), "--out", str(out), "--force"])
    assert e.value.code == 0 and json.loads(out.read_text())["model"] == str(other)
    capsys.readouterr()
    # A model whose tokenizer is not the data's, named last, is refused before any model loads.
    train_tokenizer([corpus_file], tmp_path / "tok300", vocab_size=300, show_progress=False)
    init_model_dir("nano", tmp_path / "tok300", tmp_path / "m300")

    def never(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("tinyk.checkpoint.load_model", never)
    with pytest.raises(SystemExit) as e:
        main(["eval", "--model", str(nano_model_dir), str(tmp_path / "m300"), "--data", str(pretrain_data)])
    assert e.value.code == 2 and "was tokenized with another tokenizer than the model" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["eval", "--model", str(other), str(other) + "/", "--data", str(pretrain_data)])
    assert e.value.code == 2 and "is given twice" in capsys.readouterr().err
    monkeypatch.undo()
    # Models of other contexts score a split in the same windows, the shortest either would use alone.
    init_model_dir("nano", tok_dir, tmp_path / "ctx48", max_seq_len=48)
    with pytest.raises(SystemExit) as e:
        main(["eval", "--model", str(nano_model_dir), str(tmp_path / "ctx48"), "--data", str(pretrain_data),
              "--json"])
    both = json.loads(capsys.readouterr().out)["models"]
    assert e.value.code == 0 and [r["data"][0]["seq_len"] for r in both] == [48, 48]
    assert both[0]["data"][0]["loss"] == pytest.approx(evaluate(nano_model_dir, data=[pretrain_data],
                                                                seq_len=48)["data"][0]["loss"])
    # A context too short for every question is named with its model.
    init_model_dir("nano", tok_dir, tmp_path / "ctx8", max_seq_len=8)
    with pytest.raises(SystemExit) as e:
        main(["eval", "--model", str(nano_model_dir), str(tmp_path / "ctx8"), "--choice",
              str(tmp_path / "ceval" / "val")])
    assert e.value.code == 2 and f"fits the model {tmp_path / 'ctx8'}'s context" in capsys.readouterr().err


def test_samples_list_every_answer_and_every_questions_option_scores(tmp_path, nano, nano_model_dir, capsys):
    """`--samples`: one JSON line per task example and per question, in file order, agreeing with the
    table's accuracy; a cloze score is the option's log-probability over its UTF-8 bytes."""
    model, tok = nano
    write_ceval(tmp_path / "ceval", model, tok, "cloze")
    task = write_task(tmp_path / "t.jsonl", [{"messages": [{"role": "user", "content": f"你好{i}"}], "answer": "你好"}
                                             for i in range(3)] + ["{not json"])
    out, samples = tmp_path / "r.json", tmp_path / "s.jsonl"
    args = ["eval", "--model", str(nano_model_dir), "--task", str(task), "--max-new-tokens", "3",
            "--choice", str(tmp_path / "ceval"), "--out", str(out), "--samples", str(samples)]
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 0
    capsys.readouterr()
    results = json.loads(out.read_text(encoding="utf-8"))
    lines = [json.loads(line) for line in samples.read_text(encoding="utf-8").splitlines()]
    tasks, questions = lines[:3], lines[3:]
    assert [r["mode"] for r in tasks] == ["task"] * 3 and [r["mode"] for r in questions] == ["choice"] * 6
    assert [r["where"] for r in tasks] == [f"{task.name}:{i}" for i in (1, 2, 3)]
    assert [r["messages"][-1]["content"] for r in tasks] == ["你好0", "你好1", "你好2"]
    assert [r["output"] for r in tasks] == [s["output"] for s in results["tasks"][0]["samples"]]
    assert all(r["correct"] == (normalize_answer(r["output"]) == "你好") for r in tasks)
    assert sum(r["correct"] for r in tasks) / 3 == results["tasks"][0]["accuracy"]
    for r, (q, opts) in zip(questions, QUESTIONS, strict=True):
        assert r["question"] == q and list(r["options"].values()) == opts and r["subject"] == "toy"
        assert r["pick"] == model_choice(model, tok, "cloze", q, r["options"])
        assert r["correct"] == (r["pick"] == r["answer"])
        for letter, text in r["options"].items():
            assert r["scores"][letter] == pytest.approx(r["logprobs"][letter] / len(text.encode("utf-8")))
            assert r["logprobs"][letter] < 0
    assert [r["correct"] for r in questions] == [True] * 3 + [False] * 3  # as write_ceval set the answers
    # An existing samples file is replaced only with --force; anything else not even then.
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2 and capsys.readouterr().err == (
        f"tinyk: error: --out {out} exists (use --force to replace it)\n")
    out.unlink()
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2 and capsys.readouterr().err == (
        f"tinyk: error: --samples {samples} exists (use --force to replace it)\n")
    samples.write_text("my notes\n", encoding="utf-8")
    with pytest.raises(SystemExit) as e:
        main([*args, "--force"])
    assert e.value.code == 2 and capsys.readouterr().err == (
        f"tinyk: error: --samples {samples} exists and is not the samples of tinyk eval, so it is not replaced; "
        f"remove it yourself or choose another path\n")
    assert samples.read_text(encoding="utf-8") == "my notes\n" and not out.exists()
    for extra, said in ((["--samples", str(out)], f"--samples {out} is also --out; give each its own file"),
                        (["--samples", str(task)], f"--samples {task} would replace the input {task}; choose "
                                                   f"another output path")):
        with pytest.raises(SystemExit) as e:
            main([*args, *extra])
        assert e.value.code == 2 and capsys.readouterr().err == f"tinyk: error: {said}\n"
    with pytest.raises(SystemExit) as e:
        main(["eval", "--model", str(nano_model_dir), "--data", str(tmp_path), "--samples", str(samples)])
    assert e.value.code == 2 and capsys.readouterr().err == (
        "tinyk: error: --samples lists --task answers and --choice questions; add --task or --choice\n")


def test_samples_that_cannot_be_written_say_the_results_are_saved(tmp_path, nano_model_dir, capsys, monkeypatch):
    """A full disk at --samples, after --out was written: a run again then needs --force for --out."""
    import tinyk.evaluate

    def full(out, *args):
        raise TinykError(f"cannot write {out}: No space left on device")

    monkeypatch.setattr(tinyk.evaluate, "save_samples", full)
    task = write_task(tmp_path / "t.jsonl", [{"messages": [{"role": "user", "content": "你好"}], "answer": "你好"}])
    out, samples = tmp_path / "r.json", tmp_path / "s.jsonl"
    with pytest.raises(SystemExit) as e:
        main(["eval", "--model", str(nano_model_dir), "--task", str(task), "--max-new-tokens", "2", "--out", str(out),
              "--samples", str(samples)])
    assert e.value.code == 2 and capsys.readouterr().err == (
        f"tinyk: error: cannot write {samples}: No space left on device; the results are saved in --out {out}\n")
    assert json.loads(out.read_text(encoding="utf-8"))["tasks"][0]["examples"] == 1


def test_an_out_file_made_while_the_evaluation_ran_is_not_overwritten(tmp_path, nano_model_dir, pretrain_data,
                                                                       capsys, monkeypatch):
    import tinyk.evaluate

    out = tmp_path / "r.json"
    real = tinyk.evaluate.evaluate_models

    def evaluate_while_the_user_writes(*args, **kw):
        results = real(*args, **kw)
        out.write_text("mine")
        return results

    monkeypatch.setattr(tinyk.evaluate, "evaluate_models", evaluate_while_the_user_writes)
    with pytest.raises(SystemExit) as e:
        main(["eval", "--model", str(nano_model_dir), "--data", str(pretrain_data), "--seq-len", "32",
              "--out", str(out)])
    captured = capsys.readouterr()
    assert e.value.code == 2 and out.read_text() == "mine" and "bits per byte" in captured.out
    assert captured.err.strip() == (f"tinyk: error: --out {out} exists and is not the results of tinyk eval, so it is "
                                    f"not replaced; remove it yourself or choose another path (it changed while the "
                                    f"evaluation ran; the results are above)")


def test_a_message_far_too_long_is_skipped_before_it_is_tokenized(tmp_path, nano_model_dir, monkeypatch):
    """A 3-million-character task line: tokenizing it took 10 s and 1.4 GB to learn that it does not fit."""
    from tinyk.tokenizer import TinyTokenizer, load_tokenizer

    task = write_task(tmp_path / "t.jsonl", [
        {"messages": [{"role": "user", "content": "长" * 3_000_000}], "answer": "a"},
        {"messages": [{"role": "user", "content": "你好"}], "answer": "b"}])
    encoded = []
    encode_chat = TinyTokenizer.encode_chat
    monkeypatch.setattr(TinyTokenizer, "encode_chat", lambda self, m, *a, **kw: encoded.append(m) or
                        encode_chat(self, m, *a, **kw))
    examples, _, skips = read_task_prompts(task, chat_prompter(load_tokenizer(nano_model_dir), 128))
    assert [ex.answers for ex in examples] == [["b"]] and dict(skips.counts) == {"prompt_too_long": 1}
    assert len(encoded) == 1 and encoded[0][-1]["content"] == "你好"


def test_table_aligns_chinese_text():
    from tinyk.units import display_width

    rows = list(table_rows({"tasks": [{"task": "情感", "examples": 3, "accuracy": 1 / 3, "stop_rate": 1.0,
                                       "baseline": 2 / 3, "skipped": {"total": 0, "by_reason": {}}}]}))
    lines = format_table(rows).splitlines()
    assert "33.3%  66.7% majority" in lines[2] and lines[3].endswith("100.0%")
    # Scores are right-aligned in display columns, CJK characters counting two.
    ends = [display_width(line[:line.index(score) + len(score)]) for line, score in
            ((lines[0], "score"), (lines[2], "33.3%"), (lines[3], "100.0%"))]
    assert len(set(ends)) == 1
    # Data metrics alone have no baseline: no empty column is headed "baseline".
    data = format_table([("val loss", "2.5000", ""), ("val perplexity", "12.18", "")]).splitlines()
    assert data[0].split() == ["metric", "score"] and data[0].endswith("score")
    # Exactly: two spaces between columns, the rule as wide as the widest line in display columns.
    assert format_table([("情感 exact match (3 examples)", "33.3%", "66.7% majority"),
                         ("情感 stop rate", "100.0%", "")]).splitlines() == [
        "metric                          score  baseline",
        "-" * 53,
        "情感 exact match (3 examples)   33.3%  66.7% majority",
        "情感 stop rate                 100.0%"]


def test_out_and_samples_one_file_by_two_spellings_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    for samples in (str(tmp_path / "r.json"), "sub/../r.json"):  # neither exists yet
        with pytest.raises(TinykError, match=r"^--samples .* is also --out; give each its own file$"):
            check_outputs("r.json", samples, [], False, per_example=True)
    (tmp_path / "r.json").write_text('{"id": 1, "correct": true}\n')  # an existing samples file: still the one fix
    with pytest.raises(TinykError, match=r"^--samples r.json is also --out; give each its own file$"):
        check_outputs("r.json", "r.json", [], True, per_example=True)


def test_a_samples_file_that_fails_without_out_names_no_results_file(tmp_path, monkeypatch):
    def full(out, *args):
        raise TinykError(f"cannot write {out}: No space left on device")

    monkeypatch.setattr("tinyk.evaluate.save_samples", full)
    samples = tmp_path / "s.jsonl"
    with pytest.raises(TinykError) as e:
        save_outputs(None, {}, samples, [], [], False)
    assert str(e.value) == f"cannot write {samples}: No space left on device"
    with pytest.raises(TinykError) as e:
        save_outputs(tmp_path / "r.json", {}, samples, [], [], False)
    assert str(e.value) == f"cannot write {samples}: No space left on device; the results are saved in --out " \
                           f"{tmp_path / 'r.json'}"


def test_outputs_another_eval_wrote_while_this_one_ran_need_force(tmp_path):
    """check_outputs found nothing before the models loaded; what appeared since is not replaced unasked."""
    out, samples = tmp_path / "r.json", tmp_path / "s.jsonl"
    results, records = {"model": "m", "data": [], "tasks": [], "choice": None}, [{"mode": "task"}]
    check_outputs(out, samples, [], False, per_example=True)
    save_outputs(out, results, samples, records, [], False)  # another `tinyk eval` to the same files ends first
    before = out.read_bytes(), samples.read_bytes()
    with pytest.raises(TinykError, match=r"^--out .* exists \(use --force to replace it\) \(it changed while"):
        save_outputs(out, {**results, "model": "n"}, None, None, [], False)
    with pytest.raises(TinykError, match=r"^--samples .* exists \(use --force to replace it\) \(it changed while"):
        save_outputs(None, results, samples, [{"mode": "choice"}], [], False)
    assert (out.read_bytes(), samples.read_bytes()) == before
    with pytest.raises(ValueError, match="without the records"):  # a library caller's slip, not a user's
        save_outputs(None, results, tmp_path / "s2.jsonl", None, [], False)


@pytest.mark.parametrize("emulated", [False, True])
def test_int8_task_answers_decode_in_batches_the_int8_kernel_takes(tmp_path, nano_model_dir, monkeypatch, emulated):
    """Beyond int8_max_rows sequences a decode step uses the dense weights, so `--quantize int8` with a
    batch of 32 would have measured those: its answers decode 4 at a time beside bf16 weights, 16 at a
    time beside fp32 ones (a CPU without bf16 instructions)."""
    import tinyk.engine
    from tinyk.engine import Engine, int8_works

    if not int8_works(torch.device("cpu"), torch.bfloat16):
        pytest.skip("this torch build has no int8 weight-only kernel")
    monkeypatch.setattr(tinyk.engine, "cpu_emulates", lambda dtype: emulated and dtype == torch.bfloat16)
    task = write_task(tmp_path / "t.jsonl", [{"messages": [{"role": "user", "content": f"问题{i}"}], "answer": "是"}
                                             for i in range(20)])
    sizes, generate = [], Engine.generate

    def recording(self, prompts, params=None):
        sizes.append(len(prompts))
        return generate(self, prompts, params)

    monkeypatch.setattr(Engine, "generate", recording)
    r = evaluate(nano_model_dir, tasks=[task], quantize="int8", batch_size=32, max_new_tokens=3, device="cpu")
    assert r["tasks"][0]["examples"] == 20 and max(sizes) == (16 if emulated else 4) and sum(sizes) == 20
    assert r["quantize"] == "int8" and next(table_rows(r))[0] == "t exact match (n=20, int8 weights)"
    sizes.clear()
    evaluate(nano_model_dir, tasks=[task], batch_size=32, max_new_tokens=3, device="cpu")
    assert sizes == [20]


def test_int8_that_cannot_run_is_refused_before_any_mode_runs(tmp_path, nano_model_dir, monkeypatch):
    """PyTorch's int8 kernel is CPU-only: on a GPU machine (device auto) `--quantize int8` failed only
    once the --data modes before it had run, and without saying to add --device cpu."""
    import tinyk.checkpoint
    import tinyk.engine

    task = write_task(tmp_path / "t.jsonl", [{"messages": [{"role": "user", "content": "问题"}], "answer": "是"}])
    # The check is on the dtype the engine computes in (bf16 for int8 on a CPU with bf16 instructions),
    # not the one --data uses.
    monkeypatch.setattr(tinyk.engine, "cpu_emulates", lambda dtype: False)
    monkeypatch.setattr(tinyk.engine, "int8_works", lambda device, dtype: dtype != torch.bfloat16)
    monkeypatch.setattr(tinyk.checkpoint, "load_model", lambda *a, **kw: pytest.fail("the weights were loaded"))
    with pytest.raises(TinykError, match=r"^int8 weights are not supported by this torch build on cpu with "
                                         r"bfloat16$"):
        evaluate(nano_model_dir, tasks=[task], quantize="int8", device="cpu")
    assert tinyk.engine.int8_refusal(torch.device("meta"), torch.bfloat16).endswith(
        "on meta with bfloat16; int8 decoding runs on the CPU: add --device cpu")


def test_a_split_part_that_spells_no_text_has_no_bits_per_byte():
    from tinyk.evaluate import table_rows

    rows = list(table_rows({"data": [{"data": "d/sft", "split": "val", "seq_len": 64, "loss": 1.0, "perplexity": 2.72,
                                      "bits_per_byte": None}]}))
    assert ("sft/val bits per byte", "n/a", "") in rows


def test_a_window_of_one_token_is_not_windows_of_1_tokens():
    row = {"data": "d/pt", "kind": "pretrain", "split": "val", "seq_len": 1, "loss": 1.0, "perplexity": 2.7,
           "bits_per_byte": 1.0}
    assert next(table_rows({"data": [row]}))[0] == "pt/val loss (windows of 1 token)"


def test_an_out_directory_is_refused_as_a_directory_even_when_it_holds_an_input(tmp_path, nano_model_dir, capsys):
    """--out /tmp, which holds the task file, was refused as "would replace the input"."""
    task = write_task(tmp_path / "t.jsonl", [{"messages": [{"role": "user", "content": "好"}], "answer": "好"}])
    for force in ([], ["--force"]):
        with pytest.raises(SystemExit) as e:
            main(["eval", "--model", str(nano_model_dir), "--task", str(task), "--out", str(tmp_path), *force])
        assert e.value.code == 2
        assert capsys.readouterr().err == (f"tinyk: error: --out {tmp_path} is a directory; give a file name for the "
                                           "JSON results\n")


def test_task_help_names_the_sft_records_and_parquet_it_reads(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert ("SFT records in any format `tinyk data sft` reads (BelleGroup, messages, Alpaca, prompt/completion; JSONL "
            "or Parquet)") in text


def test_results_are_saved_to_a_path_object(tmp_path):
    """The library takes the paths it is typed for: a Path (not only the CLI's str) for --out."""
    from tinyk.evaluate import check_results_out, is_results, save_results

    out = tmp_path / "r.json"
    results = {"model": "m", "data": [], "tasks": [], "choice": None}
    check_results_out(out, [], force=False)
    save_results(out, results, [], force=False)
    assert is_results(out) and json.loads(out.read_text(encoding="utf-8")) == results
    with pytest.raises(TinykError, match="ends in '/'"):
        check_results_out(str(tmp_path / "dir") + "/", [], force=False)


def test_none_means_no_system_prompt_in_evaluate_as_in_eval_task(tmp_path, nano_model_dir, capsys):
    """One convention across the library (`None`: no system turn; MODEL_PROMPT, the default: the
    model's own); the CLI turns --system-prompt '' into None."""
    from tinyk.tokenizer import load_tokenizer

    task = write_task(tmp_path / "t.jsonl", [{"messages": [{"role": "user", "content": "好"}], "answer": "好"}])
    own = load_tokenizer(nano_model_dir).system_prompt
    assert own and evaluate(nano_model_dir, tasks=[task], max_new_tokens=2)["settings"]["system_prompt"] == own
    assert evaluate(nano_model_dir, tasks=[task], max_new_tokens=2, system_prompt=None)["settings"]["system_prompt"] \
        is None
    # ...and the prompts hold it (a setting that only named it passed)
    for system, opening in ((MODEL_PROMPT, [{"role": "system", "content": own}]), (None, [])):
        records: list[dict] = []
        evaluate(nano_model_dir, tasks=[task], max_new_tokens=2, system_prompt=system, records=records)
        assert records[0]["messages"] == [*opening, {"role": "user", "content": "好"}]
    main_args = ["eval", "--model", str(nano_model_dir), "--task", str(task), "--max-new-tokens", "2", "--json"]
    for flag, want in (([], own), (["--system-prompt", ""], None), (["--system-prompt", " 你好 "], "你好")):
        with pytest.raises(SystemExit) as e:
            main([*main_args, *flag])
        assert e.value.code == 0
        assert json.loads(capsys.readouterr().out)["settings"]["system_prompt"] == want


def test_sft_data_is_scored_in_its_own_max_len_by_default(tmp_path, tok_dir, nano_model_dir):
    from tinyk.data import prepare_sft

    convs = [{"conversations": [{"from": "human", "value": f"问题{i}"}, {"from": "gpt", "value": f"回答{i}"}]}
             for i in range(40)]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in convs),
                                        encoding="utf-8")
    prepare_sft([tmp_path / "sft.jsonl"], tok_dir, tmp_path / "data", max_len=48, system_prompt=None, val_fraction=0.25,
                workers=1, show_progress=False)
    model, _ = load_model(nano_model_dir)  # context 128 > max_len 48
    r = eval_data(model, nano_model_dir, tmp_path / "data")
    assert r["seq_len"] == 48
    assert r["loss"] == pytest.approx(eval_data(model, nano_model_dir, tmp_path / "data", seq_len=48)["loss"])


def test_normalize_answer_drops_final_tilde_and_only_final_punctuation():
    assert normalize_answer("好的~") == normalize_answer("好的～") == "好的"
    assert normalize_answer("？为什么") == "?为什么" and normalize_answer("。好") == "。好"


def test_chance_level_counts_each_questions_own_options(tmp_path, nano):
    model, tok = nano
    f = tmp_path / "x_val.csv"
    f.write_text("id,question,A,B,C,D,answer\n0,天上最亮的星？,太阳,月亮,,,A\n1,哪个是水果？,苹果,汽车,桌子,,A\n",
                 encoding="utf-8")
    r = eval_choice(model, tok, [f])
    assert r["questions"] == 2 and r["baseline"] == pytest.approx((1 / 2 + 1 / 3) / 2)


def test_an_answer_whose_text_another_option_repeats_is_skipped_in_cloze_only(tmp_path, nano):
    """Cloze scores two options of one text alike and a tie goes to the first, so such an answer is right
    or wrong by its place alone; letters differ, so the letter format scores the question."""
    model, tok = nano
    f = tmp_path / "x_val.csv"
    f.write_text("question,A,B,C,answer\n首都？,北京,北京,上海,B\n错项相同？,北京,上海,上海,A\n", encoding="utf-8")
    qs = read_choice([f], Skips())
    skips = Skips()
    assert choices_that_fit(tok, [f], qs, "cloze", 128, skips) == qs[1:]
    assert skips.first == {"repeated_option": ["x_val.csv:2"]}
    assert choices_that_fit(tok, [f], qs, "letter", 128, Skips()) == qs
    # Every question skipped so is not called too long for the context.
    with pytest.raises(TinykError, match=r"^no question in .*x_val.csv can be scored \(skipped 1 record; repeated"):
        choices_that_fit(tok, [f], qs[:1], "cloze", 128, Skips())


def test_choice_prompts_are_the_documented_text():
    q = ChoiceQuestion("s", "问题", {"A": "甲", "B": "乙"}, "A")
    assert choice_continuations(q, "cloze") == ("问题\n答案：", [("A", "甲"), ("B", "乙")])
    assert choice_continuations(q, "letter") == ("问题\nA. 甲\nB. 乙\n答案：", [("A", "A"), ("B", "B")])


@pytest.mark.parametrize("fmt", ["cloze", "letter"])
def test_a_question_that_exactly_fills_the_context_is_scored(nano, fmt):
    from tinyk.evaluate import _option_sequences

    _, tok = nano
    q = ChoiceQuestion("s", "哪个是水果？", {"A": "苹果", "B": "汽车"}, "A", "x.csv:2")
    context, conts = choice_continuations(q, fmt)
    n = max(len(s.ids) for s in _option_sequences(tok, [(context, c) for _, c in conts]))
    assert choices_that_fit(tok, ["x.csv"], [q], fmt, n, Skips()) == [q]
    with pytest.raises(TinykError, match="fits the model's context"):
        choices_that_fit(tok, ["x.csv"], [q], fmt, n - 1, Skips())


def test_the_table_shows_the_results_perplexity_and_bits_per_byte():
    d = {"data": "d/pt", "kind": "pretrain", "split": "val", "seq_len": 64, "loss": 2.0,
         "perplexity": math.exp(2.0), "bits_per_byte": 0.5}
    rows = list(table_rows({"data": [d]}))
    assert ("pt/val perplexity", "7.39", "") in rows and ("pt/val bits per byte", "0.5000", "") in rows


def test_force_replaces_only_results_of_several_models(tmp_path):
    f = tmp_path / "r.json"
    one = {"model": "m", "data": [], "tasks": [], "choice": None}
    f.write_text(json.dumps({"models": [one, one]}), encoding="utf-8")
    assert is_results(f)
    f.write_text(json.dumps({"models": ["my notes", {"model": "m"}]}), encoding="utf-8")
    assert not is_results(f)
    from tinyk.evaluate import is_samples

    for blank, replaced in (("", True), ("\n", True), (" \r\n\n", True), ("x\n", False)):  # `echo > r.json`
        f.write_text(blank, encoding="utf-8")
        assert is_results(f) == is_samples(f) == replaced, blank


def test_a_bom_spaced_header_and_test_suffix_csv_is_read(tmp_path):
    f = tmp_path / "geo_test.csv"
    f.write_bytes("\ufeffquestion,A,B, answer \n问题,甲,乙,B\n".encode("utf-8"))
    qs = read_choice([f], Skips())
    assert [(q.subject, q.question, q.options, q.answer) for q in qs] == [("geo", "问题", {"A": "甲", "B": "乙"}, "B")]


# ---------------------------------------------------------------- the figures eval prints, pinned


def _fake_sums(monkeypatch, total: float, count: int, nbytes: int) -> None:
    """eval_data's (summed loss, tokens, bytes), as the trainer's eval_sums would give them."""
    import tinyk.train

    monkeypatch.setattr(tinyk.train, "eval_sums",
                        lambda model, batches, token_bytes: torch.tensor([total, count, nbytes], dtype=torch.float64))


# Perplexity is e^loss for every loss a float can hold (up to e^709), not cut off at some smaller cap.
def test_perplexity_is_given_for_every_loss_a_float_can_hold(nano, nano_model_dir, pretrain_data, monkeypatch):
    model, _ = nano
    for loss in (60.0, 700.0):
        _fake_sums(monkeypatch, loss * 10, 10, 20)
        r = eval_data(model, nano_model_dir, pretrain_data, seq_len=32, batch_size=4, max_batches=1)
        assert r["loss"] == pytest.approx(loss) and r["perplexity"] == pytest.approx(math.exp(loss))
        assert r["bits_per_byte"] == pytest.approx(loss * 10 / math.log(2) / 20)


# Evaluated tokens that spell no text (only <|im_end|>s) give "n/a" bits per byte, not a ZeroDivisionError.
def test_tokens_that_spell_no_bytes_have_no_bits_per_byte(nano, nano_model_dir, pretrain_data, monkeypatch):
    model, _ = nano
    _fake_sums(monkeypatch, 6.0, 3, 0)
    r = eval_data(model, nano_model_dir, pretrain_data, seq_len=32, batch_size=4)
    assert (r["tokens"], r["bytes"], r["loss"], r["bits_per_byte"]) == (3, 0, 2.0, None)


# Scoring no token at all (--max-batches 0) is one clear error, not a ZeroDivisionError traceback.
def test_no_evaluated_token_is_a_clear_error(nano, nano_model_dir, pretrain_data):
    model, _ = nano
    with pytest.raises(TinykError, match="has no tokens to evaluate"):
        eval_data(model, nano_model_dir, pretrain_data, seq_len=32, batch_size=4, max_batches=0)


# Each model compared counts its own multiple-choice skips: a question too long for one model's context is
# not also counted as skipped for the other (the same numbers as evaluating each model alone).
def test_models_compared_each_count_their_own_choice_skips(tmp_path, nano_model_dir, tok_dir):
    from tinyk.tokenizer import load_tokenizer

    tok = load_tokenizer(nano_model_dir)
    short = tmp_path / "ctx48"
    init_model_dir("nano", tok_dir, short, max_seq_len=48)
    question = "今天天气很好，我们去公园散步。" * 5 + "哪个是水果？"
    q = ChoiceQuestion("x", question, {"A": "苹果", "B": "汽车"}, "A")
    context, conts = choice_continuations(q, "cloze")
    longest = max(len(s.ids) for s in _option_sequences(tok, [(context, c) for _, c in conts]))
    assert 48 < longest <= 128, "the test needs a question that fits one context and not the other"
    f = tmp_path / "x_val.csv"
    f.write_text(f"question,A,B,answer\n{question},苹果,汽车,A\n哪个是水果？,苹果,汽车,A\n", encoding="utf-8")
    wide, narrow = evaluate_models([nano_model_dir, short], choice=[f])
    assert (wide["choice"]["questions"], narrow["choice"]["questions"]) == (2, 1)
    assert wide["choice"]["skipped"]["total"] == 0 and wide["choice"]["skipped"]["by_reason"] == {}
    assert narrow["choice"]["skipped"]["by_reason"] == {"too_long_for_context": 1}
    alone = evaluate_models([short], choice=[f])[0]
    assert narrow["choice"]["skipped"] == alone["choice"]["skipped"]


# A task's results keep the first 5 answers for a look (KEPT_SAMPLES), however many examples there are,
# each showing the first of its accepted answers.
def test_a_tasks_results_keep_the_first_five_answers(tmp_path):
    task = write_task(tmp_path / "t.jsonl", [{"messages": [{"role": "user", "content": f"q{i}"}],
                                              "answer": ["好", f"好{i}"]} for i in range(7)])
    r = eval_task(ScriptedEngine({f"q{i}": ("好", "eos") for i in range(7)}), task)
    assert r["examples"] == 7 and [s["prompt"] for s in r["samples"]] == [f"q{i}" for i in range(5)]
    assert [s["answer"] for s in r["samples"]] == ["好"] * 5


# One subject has no "mean over subjects" row (it would repeat the overall accuracy); two or more do.
def test_the_mean_over_subjects_row_is_shown_only_for_several_subjects():
    one = {"format": "cloze", "questions": 2, "accuracy": 0.5, "baseline": 0.25, "macro_accuracy": 0.5,
           "subjects": {"geo": {"questions": 2, "accuracy": 0.5}}, "skipped": {"total": 0, "by_reason": {}}}
    assert [m for m, _, _ in table_rows({"choice": one})] == ["multiple choice, cloze (n=2)", "  geo (n=2)"]


# SFT bits per byte divide the answers' loss by the bytes the answer tokens spell, not by the bytes of
# the prompts and padding beside them (recomputed here with plain cross-entropy over the same batches).
def test_sft_bits_per_byte_count_the_answer_tokens_bytes_alone(nano, nano_model_dir, sft_data):
    import torch.nn.functional as F

    from tinyk.loader import eval_batches

    model, tok = nano
    r = eval_data(model, nano_model_dir, sft_data, seq_len=64, batch_size=4)
    total, nbytes, count = 0.0, 0, 0
    with torch.no_grad():
        for x, y in eval_batches(sft_data, "val", 64, 4):
            total += F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum").item()
            answers = y[y != -100].tolist()
            count += len(answers)
            nbytes += sum(tok.token_bytes[t] for t in answers)
    assert nbytes and (r["tokens"], r["bytes"]) == (count, nbytes)
    assert r["bits_per_byte"] == pytest.approx(total / math.log(2) / r["bytes"], rel=1e-5)


# A --seq-len equal to a model's own context, cut for a shorter model compared, says it was cut by the
# other models' context, not "beyond the model's context".
def test_a_seq_len_equal_to_the_context_cut_for_another_model_says_so(tmp_path, nano_model_dir, tok_dir,
                                                                      pretrain_data):
    short = tmp_path / "ctx48"
    init_model_dir("nano", tok_dir, short, max_seq_len=48)
    wide, narrow = evaluate_models([nano_model_dir, short], data=[pretrain_data], seq_len=128, max_batches=1)
    assert (wide["data"][0]["seq_len_cut_by"], narrow["data"][0]["seq_len_cut_by"]) == ("other_models", "context")
    assert next(table_rows(wide))[0].endswith("--seq-len 128 is beyond the shortest context of the models compared)")


# Per-subject results (JSON and table rows) are listed by subject name, whatever order the files were given in.
def test_subjects_are_listed_by_name_whatever_order_the_files_come_in(tmp_path, nano):
    model, tok = nano
    for name in ("zoo", "art"):
        (tmp_path / f"{name}_val.csv").write_text("question,A,B,answer\n哪个是水果？,苹果,汽车,A\n", encoding="utf-8")
    r = eval_choice(model, tok, [tmp_path / "zoo_val.csv", tmp_path / "art_val.csv"])
    assert list(r["subjects"]) == ["art", "zoo"]
    assert [m for m, _, _ in table_rows({"choice": r})][2:] == ["  art (n=1)", "  zoo (n=1)"]


# A row's empty option cells are no options (whichever letters they are), and its answer letter is read
# whatever its case and the spaces around it.
def test_empty_option_cells_are_no_options_and_the_answer_letter_is_read_loosely(tmp_path):
    from tinyk.evaluate import read_choice
    from tinyk.inputs import Skips

    f = tmp_path / "x_val.csv"
    f.write_text("question,A,B,C,answer\n问题,甲,,丙, c \n", encoding="utf-8")
    [q] = read_choice([f], Skips())
    assert (q.options, q.answer) == ({"A": "甲", "C": "丙"}, "C")


# Models compared: a subject row only one model has stays in its group, under the group's other subjects
# (not after the next metric's row).
def test_a_subject_only_one_model_has_stays_in_its_group(monkeypatch):
    import tinyk.evaluate
    from tinyk.evaluate import compared_rows

    monkeypatch.setattr(tinyk.evaluate, "table_rows", lambda r: r["rows"])
    one = [("choice (n=2)", "50.0%", "50.0% chance"), ("  a (n=1)", "100.0%", ""), ("  b (n=1)", "0.0%", ""),
           ("data loss", "2.1", "")]
    two = [("choice (n=2)", "0.0%", "50.0% chance"), ("  a (n=1)", "0.0%", ""), ("  c (n=1)", "0.0%", ""),
           ("data loss", "2.2", "")]
    assert [r[0] for r in compared_rows([{"rows": one}, {"rows": two}])] == [
        "choice (n=2)", "  a (n=1)", "  b (n=1)", "  c (n=1)", "data loss"]
