"""`tinyk eval`: how good is a model directory, in numbers that compare across runs.

Three modes, combinable in one call:
- data: loss, perplexity and bits per byte on a prepared split (bits per byte compares
  models with different tokenizers);
- generation tasks: greedy answers to held-out chats, exact match against the expected
  answer, and the stop rate (the share of answers that end with <|im_end|>);
- multiple choice (C-Eval / CMMLU CSVs): the option with the highest log-likelihood wins,
  reported beside chance level.
"""

from __future__ import annotations

import copy
import csv
import functools
import json
import math
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .data import normalize_conversation
from .errors import Stopped, TinykError, not_found, shown, writing
from .inputs import (
    NO_RECORDS,
    Skips,
    as_list,
    compression,
    file_stem,
    iter_records,
    read_json,
    record_shape,
    refuse_pipe,
    refuse_repeats,
)
from .model import Transformer
from .outputs import check_output_file, same_path, write_text_atomic
from .tokenizer import (
    CHAT_ROLES,
    MODEL_PROMPT,
    SYSTEM_ROLES,
    ModelPrompt,
    TinyTokenizer,
    message_text,
    same_tokenizer,
    with_system,
)
from .units import plural

if TYPE_CHECKING:  # the loader and the engine are imported where they are used
    from .engine import Completion, Engine, SamplingParams
    from .loader import SplitData

KEPT_SAMPLES = 5  # answers shown in a task's results, for a look at what the model says
CHOICE_FORMATS = ("cloze", "letter")


# ---------------------------------------------------------------- data: loss, perplexity, bits per byte

def _split_meta(data_dir: str | Path, split: str, model_dir: str | Path) -> dict[str, Any]:
    """A prepared data directory's meta, once it is known to have tokens in `split`, tokenized with
    the model's tokenizer."""
    from .loader import open_dataset

    meta = open_dataset(data_dir)
    if split not in meta["splits"]:
        raise TinykError(f"{data_dir} has no split {split!r} (has {', '.join(meta['splits'])})")
    if not meta["splits"][split]["tokens"]:
        raise TinykError(f"the {split} split of {data_dir} is empty")
    if not same_tokenizer(meta["tokenizer_hash"], model_dir):
        raise TinykError(f"{data_dir} was tokenized with another tokenizer than the model {model_dir}'s; re-run "
                         f"tinyk data with --tokenizer {model_dir} (the model carries its own)")
    return meta


MAX_EXP = 709.0  # math.exp overflows beyond it


def data_seq_len(meta: dict[str, Any], asked: int | None, context: int) -> int:
    """The window a split is scored in: as asked, else the SFT data's max_len, else the context; never past it."""
    return min(asked or meta.get("max_len") or context, context)


@torch.no_grad()
def eval_data(model: Transformer, model_dir: str | Path, data_dir: str | Path, *, split: str = "val",
              seq_len: int | None = None, batch_size: int = 8, max_batches: int | None = None,
              opened: SplitData | None = None) -> dict[str, Any]:
    """Mean token loss over a prepared split (all of it unless `max_batches`), as loss, perplexity, and
    bits per byte of the text the evaluated tokens spell. `opened`: the split as `open_split` gave it
    for these settings (an SFT split's mask is read whole to open it)."""
    from .loader import open_split, split_batches
    from .tokenizer import load_tokenizer
    from .train import eval_sums

    meta = _split_meta(data_dir, split, model_dir)
    asked = seq_len
    seq_len = data_seq_len(meta, asked, model.config.max_seq_len)
    device = next(model.parameters()).device
    token_bytes = torch.tensor(load_tokenizer(model_dir).token_bytes, dtype=torch.float64, device=device)
    if opened is None:
        opened = open_split(data_dir, split, seq_len)
    batches = ((x.to(device), y.to(device)) for x, y in split_batches(opened, batch_size, max_batches))
    total, count, nbytes = eval_sums(model, batches, token_bytes).tolist()
    count = int(count)
    if count == 0:
        raise TinykError(f"{data_dir}: split {split!r} has no tokens to evaluate")
    loss = total / count
    finite = math.isfinite(loss)  # NaN or inf: a diverged model's; JSON has neither, so null
    return {"data": str(data_dir), "kind": meta["kind"], "split": split, "seq_len": seq_len,
            # a --seq-len beyond the model's context is cut to it, and the table says so
            **({"seq_len_asked": asked} if asked and asked > seq_len else {}), "tokens": count,
            "bytes": int(nbytes), "loss": loss if finite else None,
            "perplexity": math.exp(loss) if loss <= MAX_EXP else None,  # past e^709 a float overflows
            "bits_per_byte": total / math.log(2) / nbytes if nbytes and finite else None,
            # of the whole split, also where --max-batches scores part of it
            **({"conversations_left_out": opened.dropped} if meta["kind"] == "sft" else {})}


# ---------------------------------------------------------------- generation tasks: exact match, stop rate

@dataclass
class TaskExample:
    where: str
    messages: list[dict[str, str]]
    answers: list[str]


def normalize_answer(text: str) -> str:
    """For exact match: NFKC (full-width digits equal ASCII ones), no surrounding space or final punctuation."""
    return unicodedata.normalize("NFKC", text).strip().rstrip("。.!！?？~ \n").strip()


def _valid_messages(msgs: Any) -> bool:
    return (isinstance(msgs, list) and bool(msgs)
            and all(isinstance(m, dict) and m.get("role") in (*CHAT_ROLES, *SYSTEM_ROLES)
                    and message_text(m.get("content")) is not None  # text, or a list of text parts
                    for m in msgs)
            and msgs[-1]["role"] == "user")


def read_task(path: str | Path, skips: Skips, *, system_prompt: str | None = None,
              limit: int | None = None) -> list[TaskExample]:
    """Reads {"messages": [..., user turn], "answer": str or [str, ...]} lines, or SFT records in any
    format `tinyk data sft` reads, whose last turn (the reply) is the answer (the first `limit` usable ones).

    `system_prompt` is added where a chat has none, as `tinyk data sft` does when training
    (None: chats are rendered exactly as given).
    """
    path = Path(path)
    if path.is_dir():
        raise TinykError(f"task file {path} is a directory; give a JSONL file of chats")
    if not path.exists():
        raise not_found(path, "task file")
    refuse_pipe(path, "task file")
    if not path.is_file():
        raise TinykError(f"task file is not a file: {path}")
    if path.stat().st_size == 0:
        raise TinykError(f"task file is empty: {path}")
    out = []
    for where, rec in iter_records([path], skips, message_lists=True):
        example = _task_example(where, rec, system_prompt)
        if not isinstance(example, TaskExample):
            skips.add(example[0], where, example[1])
            continue
        out.append(example)
        if len(out) == limit:  # skips past here are not this evaluation's
            break
    if not out:
        raise TinykError(f"{path}: no usable examples ({skips.summary() if skips.total else NO_RECORDS})")
    return out


def _task_example(where: str, rec: Any, system_prompt: str | None) -> TaskExample | tuple[str, str]:
    """A task line's prompt and accepted answers, or (skip reason, hint). A line without an `answer` (or
    with `answer: null`, as a Parquet export mixing both kinds writes it) is an SFT record whose last
    turn is the answer, so held-out fine-tuning data needs no converting."""
    if not (isinstance(rec, dict) and rec.get("answer") is not None):
        conv = normalize_conversation(rec)
        if isinstance(conv, list) and conv[-1]["role"] == "assistant" and len(conv) > 1 \
                and conv[-2]["role"] == "user":
            msgs, answers = conv[:-1], [conv[-1]["content"]]
        elif conv in ("no_assistant_turn", "empty_assistant_turn") or isinstance(conv, list):
            return "bad_answer", ("no 'answer', and the chat does not end with a reply to a user turn; "
                                  "'answer' is the expected reply, a string or a list of the strings accepted")
        else:
            return "bad_messages", ("a task line is {\"messages\": [..., user turn], \"answer\": ...}, or an "
                                    f"SFT record ending with the reply to match ({record_shape(rec)})")
    else:
        if not _valid_messages(rec.get("messages")):
            return "bad_messages", ("'messages' must be a list of {role, content} ending with the user turn to "
                                    "answer; an SFT chat's last turn, the reply, goes in 'answer'")
        answer = rec["answer"]
        answers = [answer] if isinstance(answer, str) else answer
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            shown_answer = json.dumps(answer, ensure_ascii=False)[:40]  # Chinese as itself, not cut mid-escape
            return "bad_answer", (f"'answer' is {shown_answer}; 'answer' is the expected reply, a string or a list "
                                  f"of the strings accepted (the first such record has {record_shape(rec)})")
        msgs = [{"role": m["role"], "content": message_text(m["content"])} for m in rec["messages"]]
    if not all(normalize_answer(a) for a in answers):  # an empty reply would match it
        return "empty_answer", "an answer must keep some text once space and final punctuation are dropped"
    return TaskExample(where, with_system(msgs, system_prompt), answers)


def greedy_params(max_new_tokens: int) -> SamplingParams:
    from .engine import SamplingParams

    return SamplingParams(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0,
                          max_new_tokens=max_new_tokens, seed=0)


def read_task_prompts(path: str | Path, prompt_of: Callable[[list[dict[str, str]]], list[int]], *,
                      system_prompt: str | None = None, limit: int | None = None, model: str | Path | None = None
                      ) -> tuple[list[TaskExample], list[list[int]], Skips]:
    """The examples of a task file whose prompt fits the model's context, with their prompts (`prompt_of`
    makes one from a chat, raising ContextLengthError when it does not fit: those are skipped and
    counted); a file with none is a TinykError, naming `model` where several are evaluated."""
    from .engine import ContextLengthError

    skips = Skips()
    examples, prompts = [], []
    for ex in read_task(path, skips, system_prompt=system_prompt, limit=limit):
        try:
            prompts.append(prompt_of(ex.messages))
        except ContextLengthError:
            skips.add("prompt_too_long", ex.where)
            continue
        examples.append(ex)
    if not examples:
        why = ""
        if system_prompt:
            try:
                prompt_of([{"role": "system", "content": system_prompt}, {"role": "user", "content": ""}])
            except ContextLengthError:
                why = (" with the system prompt, which leaves it no room (give a shorter --system-prompt, or '' "
                       "for none)")
        raise TinykError(f"{path}: no example fits {_whose(model)} context{why} ({skips.summary()})")
    return examples, prompts, skips


def _whose(model: str | Path | None) -> str:
    """"the model's", or where several models are evaluated, which one's."""
    return f"the model {model}'s" if model else "the model's"


def chat_prompter(tok: TinyTokenizer, context_length: int) -> Callable[[list[dict[str, str]]], list[int]]:
    """`engine.chat_prompt_ids` for one tokenizer and window: what reading a task file needs of a model."""
    from .engine import chat_prompt_ids

    return functools.partial(chat_prompt_ids, tok, context_length)


def eval_task(engine: Engine, path: str | Path, *, batch_size: int = 32, max_new_tokens: int = 64,
              limit: int | None = None, system_prompt: str | None | ModelPrompt = MODEL_PROMPT,
              name: str | None = None, records: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Greedy answers to every example: exact-match accuracy, stop rate, and the majority-answer baseline.

    Examples whose prompt does not fit the model's context are skipped and counted. A chat without a
    system message gets `system_prompt`: by default the model's own, as `tinyk eval --task` does.
    `records`, when given, gets one dict per example (`tinyk eval --samples`): what it asked, the answer
    and whether it matched.
    """
    read = read_task_prompts(path, chat_prompter(engine.tok, engine.context_length),
                             system_prompt=engine.tok.resolve_system(system_prompt), limit=limit)
    return score_task(engine, path, *read, batch_size=batch_size, max_new_tokens=max_new_tokens, name=name,
                      records=records)


def score_task(engine: Engine, path: str | Path, examples: list[TaskExample], prompts: list[list[int]], skips: Skips,
               *, batch_size: int = 32, max_new_tokens: int = 64,
               name: str | None = None, records: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """`eval_task` on examples already read, with their prompts (by `read_task_prompts`)."""
    task = name or file_stem(path)
    params = greedy_params(max_new_tokens)
    # Similar lengths together waste less compute on padding; results go back in file order.
    order = sorted(range(len(examples)), key=lambda i: len(prompts[i]))
    completions: list[Completion | None] = [None] * len(examples)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        for i, c in zip(idx, engine.generate([prompts[i] for i in idx], params), strict=True):
            completions[i] = c
    correct = stopped = cut = 0
    samples = []
    for ex, c in zip(examples, completions, strict=True):
        ok = normalize_answer(c.text) in {normalize_answer(a) for a in ex.answers}
        correct += ok
        stopped += bool(c.token_ids) and c.token_ids[-1] == engine.tok.eos_id  # closed its turn with <|im_end|>
        # The model's context, not max_new_tokens, ended the answer: one that did not stop, and likely
        # wrong, which a shorter prompt might have let finish. Counted, so a low score says why.
        cut += c.cut_by_context
        if len(samples) < KEPT_SAMPLES:
            samples.append({"prompt": ex.messages[-1]["content"], "answer": ex.answers[0], "output": c.text,
                            "correct": ok, "finish_reason": c.finish_reason})
        if records is not None:
            records.append({"mode": "task", "task": task, "where": ex.where, "messages": ex.messages,
                            "answers": ex.answers, "output": c.text, "correct": ok,
                            "finish_reason": c.finish_reason, "cut_by_context": c.cut_by_context})
    # The one answer that, given every time, would be right most often (alternatives count).
    majority, majority_n = Counter(a for ex in examples for a in {normalize_answer(x) for x in ex.answers}
                                   ).most_common(1)[0]
    n = len(examples)
    return {"task": task, "file": str(path), "examples": n, "accuracy": correct / n,
            "stop_rate": stopped / n, "cut_by_context": cut, "baseline": majority_n / n, "baseline_kind": "majority",
            "majority_answer": majority, "max_new_tokens": max_new_tokens, "skipped": skips.to_json(),
            "samples": samples}


# ---------------------------------------------------------------- multiple choice by log-likelihood

@dataclass
class ChoiceQuestion:
    subject: str
    question: str
    options: dict[str, str]
    answer: str
    where: str = ""  # file:line, for a skip to point at


def _subject(path: Path) -> str:
    stem = path.stem
    for suffix in ("_val", "_dev", "_test"):
        stem = stem.removesuffix(suffix)
    return stem or path.stem  # _val.csv: a subject named by its split, not by nothing


def _first_non_utf8_line(path: Path) -> int | None:
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                return lineno
    return None


def read_choice_csv(path: Path, skips: Skips, limit: int | None = None,
                    named: str | None = None) -> list[ChoiceQuestion]:
    """One C-Eval (id,question,A..D,answer[,explanation]) or CMMLU (,Question,A..D,Answer) file; its
    questions' subject is the file's name without _val/_dev/_test. Its rows are told apart in skips
    and samples as `named:LINE` (the file's name by default).

    A file that is not UTF-8 text (a GBK export, a binary file) or not parseable CSV is one TinykError.
    """
    try:
        return _read_choice_csv(path, skips, limit, named or path.name)
    except UnicodeDecodeError as e:
        with open(path, "rb") as f:
            packed = compression(f.read(4))
        if packed:
            raise TinykError(f"{path}: {packed}-compressed; multiple-choice CSVs are read as plain text (decompress "
                             f"it first)") from e
        lineno = _first_non_utf8_line(path)
        where = f"{path}:{lineno}" if lineno else str(path)
        raise TinykError(f"{where}: not UTF-8 text; multiple-choice CSVs must be UTF-8 "
                         "(convert it, e.g. with iconv -f gbk -t utf-8)") from e
    except csv.Error as e:
        raise TinykError(f"{path}: malformed CSV ({e})") from e


def _read_choice_csv(path: Path, skips: Skips, limit: int | None, named: str) -> list[ChoiceQuestion]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        # strict: an unclosed quote is an error, not a field that silently swallows the rows after it
        reader = csv.DictReader(f, strict=True)
        if reader.fieldnames is None:  # not even a header line
            raise TinykError(f"multiple-choice CSV is empty: {path}")
        header = {h.strip().lower(): h for h in reader.fieldnames if h}
        letters = sorted(h.upper() for h in header if len(h) == 1 and h.isascii() and h.isalpha())  # not 注
        if "question" not in header or len(letters) < 2:
            raise TinykError(f"{path}: not a multiple-choice CSV (needs question, A, B, ... and answer columns)")
        if "answer" not in header:
            skips.add("no_answer_column", named)
            return []
        out = []
        rows = iter(reader)
        while len(out) != limit:
            start = reader.line_num + 1  # an unclosed quote is only noticed where the file ends
            try:
                row = next(rows, None)
            except csv.Error as e:
                raise TinykError(f"{path}:{start}: malformed CSV in the row that starts here ({e})") from e
            if row is None:
                break
            where = f"{named}:{reader.line_num}"
            if any((v or "").strip() for v in row.get(None, [])):  # csv.DictReader's key for fields past the header
                skips.add("extra_fields", where, "more fields than the header has: an unquoted comma in a field?")
                continue
            options = {k: (row.get(header[k.lower()]) or "").strip() for k in letters}
            options = {k: v for k, v in options.items() if v}
            answer = (row.get(header["answer"]) or "").strip().upper()
            question = (row.get(header["question"]) or "").strip()
            # A reason of its own for each fault: a reason's note is its first row's, which would be wrong for the rest.
            reason, problem = (("no_question", "no question") if not question else
                               ("too_few_options", "fewer than two options") if len(options) < 2 else
                               ("answer_not_an_option", f"answer {answer!r} is not the letter of one of its options")
                               if answer not in options else (None, None))
            if reason:
                skips.add(reason, where, f"{problem}; a row has a question, at least two of the options "
                                         f"{', '.join(letters)} and the right one's letter as its answer")
                continue
            out.append(ChoiceQuestion(_subject(path), question, options, answer, where))
    return out


def read_choice(paths: Iterable[str | Path], skips: Skips, limit: int | None = None) -> list[ChoiceQuestion]:
    """Every CSV under the given folders (recursively) or the given CSV files, in a stable order, each
    once; the first `limit` usable questions of each file (a subject), as lm-eval's --limit does. A
    subject name found in several folders (ceval/val and ceval/dev, or two benchmarks) is named with
    as much of each folder's path as tells them apart, and two files of one subject in one folder by
    their file names, so they are not merged."""
    paths = as_list(paths)
    files: dict[Path, Path] = {}  # by resolved path: a file reached twice is scored once
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*.csv") if f.is_file())
        elif p.is_file():
            found = [p]
        else:
            refuse_pipe(p, "multiple-choice path")
            raise not_found(p, "multiple-choice path")
        for f in found:
            files.setdefault(f.resolve(), f)
    if not files:
        raise TinykError(f"no .csv files in {', '.join(map(str, paths))}")
    read = []
    same_name = Counter(f.name for f in files.values())
    for real, f in files.items():
        named = f.name if same_name[f.name] == 1 else str(f)  # x_val.csv in two folders: each by its path
        if f.stat().st_size == 0 and len(files) > 1:  # one empty file among others, a failed download: named
            skips.add("empty_file", named)
            continue
        read.append((real.parent, f, read_choice_csv(f, skips, limit, named)))
    # Two splits of a subject in one folder (geo_val.csv beside geo_dev.csv) keep their file names.
    in_folder = Counter((folder, qs[0].subject) for folder, _, qs in read if qs)
    read = [(folder, [replace(q, subject=f.stem) for q in qs] if qs and in_folder[folder, qs[0].subject] > 1 else qs)
            for folder, f, qs in read]
    folders: dict[str, set[Path]] = {}
    for folder, qs in read:
        if qs:  # a test split without answers merges with nothing
            folders.setdefault(qs[0].subject, set()).add(folder)
    names = {s: _short_names(same) for s, same in folders.items() if len(same) > 1}
    questions: list[ChoiceQuestion] = []
    for folder, qs in read:
        if qs and qs[0].subject in names:
            qs = [replace(q, subject=f"{names[q.subject][folder]}/{q.subject}") for q in qs]
        questions += qs
    if not questions:
        split = "; point at a split that has answers, e.g. ceval/val or cmmlu/test" \
            if skips.counts["no_answer_column"] else ""
        why = skips.summary() if skips.total else "they have a header and no rows"
        raise TinykError(f"no questions with answers in {', '.join(map(str, paths))} ({why}){split}")
    return questions


def _short_names(folders: set[Path]) -> dict[Path, str]:
    """The fewest trailing path parts that tell the folders apart (ceval/dev vs cmmlu/dev)."""
    for k in range(1, max(len(p.parts) for p in folders) + 1):
        names = {p: "/".join(p.parts[-k:]) for p in folders}
        if len(set(names.values())) == len(names):
            return names
    return {p: str(p) for p in folders}


def choice_continuations(q: ChoiceQuestion, fmt: str) -> tuple[str, list[tuple[str, str]]]:
    """(context, [(letter, continuation)]): cloze scores each option's text, letter scores 'A'..'D'."""
    if fmt == "cloze":
        return f"{q.question}\n答案：", list(q.options.items())
    listed = "".join(f"\n{k}. {v}" for k, v in q.options.items())
    return f"{q.question}{listed}\n答案：", [(k, k) for k in q.options]


@dataclass(frozen=True)
class _Scored:
    """An option's path (BOS, then text as plain text, as in pretraining) whose last `n` tokens are
    summed, less, with `heal`, the log-probability at the first of them of any token that starts with
    that token's bytes."""

    ids: tuple[int, ...]
    n: int
    heal: int | None


def _option_sequences(tok: TinyTokenizer, pairs: list[tuple[str, str]]) -> list[_Scored]:
    """How each option's log-probability after its context is computed.

    From before the context's last token: the tokens that context and option make together (as
    pretraining saw such text: "答案：" then "（苹果）" is one "：（" token, not a "：", "（" pair the model
    never saw; scored that way, C-Eval's options in quotes lost 0.1-0.2 nats a byte), less the
    log-probability there of any token that starts with the last token's characters ("：", "：（", "：“"
    ...). Every option of every context is scored so, whether it merged or not, so a score depends on
    nothing else in the batch. Where the join changes more than that token, or splits it into one that
    does not start with it (CJK letters merging, NFKC composing across it), the context's tokens are
    followed by the option's own (under NFKC each normalised alone). Either way it is one tokenization's
    probability, not the text's over all of them. An empty context is BOS alone, with nothing to heal."""
    spelled = tok.token_spellings
    out = []
    for context, option in pairs:
        ctx = (tok.bos_id, *tok.encode(context, special=False))
        last = len(ctx) - 1
        if not last:
            whole = (tok.bos_id, *tok.encode(option, special=False))
            out.append(_Scored(whole, len(whole) - 1, None))
            continue
        whole = (tok.bos_id, *tok.encode(context + option, special=False))
        if whole[:last] != ctx[:last] or not spelled[whole[last]].startswith(spelled[ctx[last]]):
            whole = (*ctx, *tok.encode(option, special=False))
        out.append(_Scored(whole, len(whole) - last, ctx[last]))
    return out


def choices_that_fit(tok: TinyTokenizer, paths: list[str | Path], questions: list[ChoiceQuestion], fmt: str,
                     context_length: int, skips: Skips, model: str | Path | None = None) -> list[ChoiceQuestion]:
    """The questions whose every option fits the context after the question. One that does not is
    skipped and counted: scoring a cut-down option (or a question cut at its start) would compare
    options on different texts, and cloze would divide a part's log-probability by the whole's bytes."""
    fits = []
    for q in questions:
        spelled = [tok.normalized(o) for o in q.options.values()]  # as scored: NFKC makes （甲） (甲)
        if fmt == "cloze" and spelled.count(tok.normalized(q.options[q.answer])) > 1:
            # Scored alike, a tie the first option wins: the answer is right or wrong by its place alone.
            skips.add("repeated_option", q.where or q.subject, "the answer's text is another option's too; "
                      "--choice-format letter scores the letters, which differ")
            continue
        context, conts = choice_continuations(q, fmt)
        if max(len(opt.ids) for opt in _option_sequences(tok, [(context, c) for _, c in conts])) <= context_length:
            fits.append(q)
        else:
            skips.add("too_long_for_context", q.where or q.subject,
                      f"a question with each of its options must fit the model's {context_length}-token context")
    if not fits:
        why = f"fits {_whose(model)} context" if skips.counts["too_long_for_context"] else "can be scored"
        raise TinykError(f"no question in {', '.join(map(str, paths))} {why} ({skips.summary()})")
    return fits


@torch.no_grad()
def continuation_logprobs(model: Transformer, tok: TinyTokenizer, pairs: list[tuple[str, str]],
                          batch_size: int = 16) -> list[float]:
    """The log-probability of each continuation after its context (`_option_sequences`), the same
    whatever else is asked with it; each must fit the model's context."""
    paths = _option_sequences(tok, pairs)
    seqs = list(dict.fromkeys(paths))
    if (longest := max((len(s.ids) for s in seqs), default=0)) > model.config.max_seq_len:
        raise TinykError(f"a question with its option is {longest} tokens, longer than the model's "
                         f"{model.config.max_seq_len}-token context")
    device = next(model.parameters()).device
    starting_with = _tokens_starting_with(tok)
    sums: dict[_Scored, float] = {}
    for at in range(0, len(seqs), batch_size):
        chunk = seqs[at:at + batch_size]
        x = torch.full((len(chunk), max(len(s.ids) for s in chunk)), tok.pad_id, dtype=torch.long)
        for i, s in enumerate(chunk):
            x[i, :len(s.ids)] = torch.tensor(s.ids)
        logp = torch.log_softmax(model(x.to(device)).float(), dim=-1)
        for i, s in enumerate(chunk):
            first = len(s.ids) - s.n
            pos = torch.arange(first - 1, len(s.ids) - 1, device=device)
            total = logp[i, pos, torch.tensor(s.ids[first:], device=device)].sum()
            if s.heal is not None:  # from the same row: numerator and divisor share their rounding
                total -= logp[i, first - 1, starting_with(s.heal)].logsumexp(0)
            sums[s] = total.item()
    return [sums[s] for s in paths]


def _tokens_starting_with(tok: TinyTokenizer) -> Callable[[int], list[int]]:
    """The ids of the (non-special) tokens whose bytes start with a token's bytes, itself included."""
    spelled = tok.token_spellings
    cache: dict[int, list[int]] = {}

    def find(token: int) -> list[int]:
        if token not in cache:
            cache[token] = [i for i, t in enumerate(spelled) if t is not None and t.startswith(spelled[token])]
        return cache[token]
    return find


def eval_choice(model: Transformer, tok: TinyTokenizer, paths: Iterable[str | Path], *, fmt: str = "cloze",
                limit: int | None = None, batch_size: int = 16,
                records: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Accuracy (overall and per subject) of picking the most likely option, beside chance level.

    cloze normalises by the option's UTF-8 length so long options are not penalised. `records`, when
    given, gets one dict per question (`tinyk eval --samples`): each option's log-probability and
    score, the pick and the answer.
    """
    _check_choice_format(fmt)
    paths, skips = as_list(paths), Skips()
    questions = choices_that_fit(tok, paths, read_choice(paths, skips, limit), fmt, model.config.max_seq_len, skips)
    return score_choice(model, tok, paths, questions, skips, fmt=fmt, batch_size=batch_size, records=records)


def _check_choice_format(fmt: str) -> None:
    if fmt not in CHOICE_FORMATS:
        raise TinykError(f"unknown multiple-choice format {fmt!r} (use {' or '.join(CHOICE_FORMATS)})")


def score_choice(model: Transformer, tok: TinyTokenizer, paths: list[str | Path], questions: list[ChoiceQuestion],
                 skips: Skips, *, fmt: str, batch_size: int = 16,
                 records: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """`eval_choice` on questions already read (by `read_choice(paths, skips, ...)`)."""
    pairs, owners = [], []
    for qi, q in enumerate(questions):
        context, conts = choice_continuations(q, fmt)
        for letter, cont in conts:
            pairs.append((context, cont))
            # Per byte of what its tokens spell: NFKC gives （甲） and (甲) the same tokens and log-probability.
            owners.append((qi, letter, max(1, len(tok.normalized(cont).encode("utf-8")))))
    logprobs: list[dict[str, float]] = [{} for _ in questions]
    scores: list[dict[str, float]] = [{} for _ in questions]
    for (qi, letter, nbytes), s in zip(owners, continuation_logprobs(model, tok, pairs, batch_size), strict=True):
        logprobs[qi][letter] = s
        scores[qi][letter] = s / nbytes if fmt == "cloze" else s
    per: dict[str, list[int]] = {}
    chance = 0.0
    for qi, q in enumerate(questions):
        pick = max(scores[qi], key=scores[qi].__getitem__)  # the first of equal scores, in option order
        per.setdefault(q.subject, []).append(int(pick == q.answer))
        chance += 1 / len(q.options)
        if records is not None:
            records.append({"mode": "choice", "subject": q.subject, "where": q.where, "question": q.question,
                            "options": q.options, "answer": q.answer, "pick": pick, "correct": pick == q.answer,
                            "logprobs": logprobs[qi], "scores": scores[qi]})
    n = len(questions)
    subjects = {s: {"questions": len(v), "accuracy": sum(v) / len(v)} for s, v in sorted(per.items())}
    # accuracy is per question (lm-eval's ceval-valid); macro_accuracy is the mean over subjects (C-Eval's "Average")
    return {"task": "choice", "paths": [str(p) for p in paths], "format": fmt, "questions": n,
            "accuracy": sum(sum(v) for v in per.values()) / n,
            "macro_accuracy": sum(v["accuracy"] for v in subjects.values()) / len(subjects),
            "baseline": chance / n, "baseline_kind": "chance", "subjects": subjects,
            "skipped": skips.to_json()}


# ---------------------------------------------------------------- all modes together

def evaluate(model_dir: str | Path, **modes: Any) -> dict[str, Any]:
    """Runs every requested mode on one model directory; `evaluate_models` says how."""
    return evaluate_models([model_dir], **modes)[0]


@dataclass
class _Plan:
    """One model's inputs, checked and read, before any weights load."""

    model_dir: str | Path
    opened: list[SplitData]
    windows: list[int]  # each split's, the same for every model
    system: str | None
    task_inputs: list[Any]
    questions: list[ChoiceQuestion] | None
    choice_skips: Skips | None


def evaluate_models(model_dirs: Iterable[str | Path], *, data: Iterable[str | Path] = (),
                    tasks: Iterable[str | Path] = (), choice: Iterable[str | Path] = (), split: str = "val",
                    seq_len: int | None = None, batch_size: int = 16, max_batches: int | None = None,
                    max_new_tokens: int = 64, limit: int | None = None, choice_format: str = "cloze",
                    system_prompt: str | None | ModelPrompt = MODEL_PROMPT, device: str = "auto",
                    quantize: str = "none", records: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Runs every requested mode on each model directory, one results dict each (models load one at a
    time). Task chats without a system message get `system_prompt`: by default each model's own (its
    SFT data's), None for none (`tokenizer.prompt_from_flag` reads --system-prompt so). `records`, when
    given, gets one dict per task example and per question (see `eval_task`, `eval_choice`), with the
    model's directory in "model" when there are several."""
    from .checkpoint import config_and_tokenizer, load_model
    from .engine import engine_dtype, int8_refusal
    from .loader import open_split
    from .model import resolve_device

    model_dirs, data, tasks, choice = as_list(model_dirs), as_list(data), as_list(tasks), as_list(choice)
    if not (data or tasks or choice):
        raise TinykError("nothing to evaluate: give --data, --task and/or --choice")
    if quantize != "none" and not tasks:
        raise TinykError(f"--quantize {quantize} applies to --task answers (--data and --choice always score "
                         f"in fp32); add --task or leave --quantize out")
    if choice:
        _check_choice_format(choice_format)
        read_skips = Skips()
        all_questions = read_choice(choice, read_skips, limit)  # the same files for every model
    # Every input is checked, for every model, before the weights load and any mode runs: a mistake in
    # the last one must not throw away the minutes the first ones took. The model directory first: the
    # checks read its tokenizer and context length.
    read = [config_and_tokenizer(Path(m)) for m in model_dirs]
    # Several models score each split in the same windows: the shortest any of them would use alone.
    windows = [min(data_seq_len(_split_meta(d, split, m), seq_len, cfg.max_seq_len)
                   for m, (cfg, _) in zip(model_dirs, read, strict=True)) for d in data]
    refuse_repeats([Path(d) for d in data], "data directory")
    opened = [open_split(d, split, window) for d, window in zip(data, windows, strict=True)]  # one for all models
    plans = []
    for model_dir, (cfg, tok) in zip(model_dirs, read, strict=True):
        system = tok.resolve_system(system_prompt)
        prompt_of = chat_prompter(tok, cfg.max_seq_len)
        named = model_dir if len(model_dirs) > 1 else None
        task_inputs = [read_task_prompts(t, prompt_of, system_prompt=system, limit=limit, model=named)
                       for t in tasks]
        questions, choice_skips = None, None
        if choice:  # which questions fit depends on the model's tokenizer and context
            choice_skips = copy.deepcopy(read_skips)
            questions = choices_that_fit(tok, choice, all_questions, choice_format, cfg.max_seq_len, choice_skips,
                                         model=named)
        plans.append(_Plan(model_dir, opened, windows, system, task_inputs, questions, choice_skips))
    refuse_repeats([Path(t) for t in tasks], "task file")  # once read: each one exists
    refuse_repeats([Path(m) for m in model_dirs], "model directory")
    dev = resolve_device(device)
    if quantize == "int8" and (why := int8_refusal(dev, engine_dtype("auto", dev, quantize))):
        raise TinykError(why)  # before the other modes run, not after
    out: list[dict[str, Any]] = []
    owns: list[list[dict[str, Any]]] = []
    for plan, twin in zip(plans, _twins([Path(m) for m in model_dirs]), strict=True):
        if twin is None:
            model, tok = load_model(plan.model_dir, device=dev)
            owns.append([])
            out.append(_run_plan(plan, model, tok, data=data, tasks=tasks, choice=choice, split=split,
                                 seq_len=seq_len, batch_size=batch_size, max_batches=max_batches,
                                 max_new_tokens=max_new_tokens, limit=limit, choice_format=choice_format,
                                 quantize=quantize, records=None if records is None else owns[-1]))
            del model  # one model in memory at a time
        else:  # the same model again (a run's best/ that is its final/): the same results, not computed twice
            owns.append(owns[twin])
            out.append({**copy.deepcopy(out[twin]), "model": str(plan.model_dir),
                        "same_as": str(plans[twin].model_dir)})
        if records is not None:
            records += [{"model": str(plan.model_dir), **r} for r in owns[-1]] if len(plans) > 1 else owns[-1]
    return out


def _twins(model_dirs: list[Path]) -> list[int | None]:
    """For each model directory, the index of an earlier one holding the same model, else None."""
    from .checkpoint import same_model

    twins: list[int | None] = []
    for i, d in enumerate(model_dirs):
        twins.append(next((j for j in range(i) if twins[j] is None and same_model(model_dirs[j], d)), None))
    return twins


def _run_plan(plan: _Plan, model: Transformer, tok: TinyTokenizer, *, data: list[str | Path],
              tasks: list[str | Path], choice: list[str | Path], split: str, seq_len: int | None, batch_size: int,
              max_batches: int | None, max_new_tokens: int, limit: int | None, choice_format: str, quantize: str,
              records: list[dict[str, Any]] | None) -> dict[str, Any]:
    results: dict[str, Any] = {"model": str(plan.model_dir), "data": [], "tasks": [], "choice": None,
                               "settings": {"split": split, "seq_len": seq_len, "max_batches": max_batches,
                                            "limit": limit, "max_new_tokens": max_new_tokens,
                                            "system_prompt": plan.system, "choice_format": choice_format,
                                            "batch_size": batch_size}}
    if tasks:
        results["quantize"] = quantize  # the task answers' weights; the other modes always use fp32
    for d, split_data, window in zip(data, plan.opened, plan.windows, strict=True):
        evaluated = eval_data(model, plan.model_dir, d, split=split, seq_len=window, batch_size=batch_size,
                              max_batches=max_batches, opened=split_data)
        if seq_len and seq_len > window:  # as asked: the table says the window was cut, and by what
            evaluated["seq_len_asked"] = seq_len
            evaluated["seq_len_cut_by"] = "context" if seq_len > model.config.max_seq_len else "other_models"
        results["data"].append(evaluated)
    if tasks:
        engine = make_engine(model, tok, batch_size, quantize)
        results["tasks"] = [score_task(engine, t, *read, batch_size=engine.max_batch, max_new_tokens=max_new_tokens,
                                       records=records) for t, read in zip(tasks, plan.task_inputs, strict=True)]
    if choice:
        results["choice"] = score_choice(model, tok, choice, plan.questions, plan.choice_skips, fmt=choice_format,
                                         batch_size=batch_size, records=records)
    return results


def _blank(path: Path) -> bool:
    """Whether a file holds nothing but a few line ends and spaces."""
    return path.stat().st_size <= 64 and not path.read_bytes().strip()


def is_results(path: Path) -> bool:
    """Whether `tinyk eval --out --force` may replace a file: earlier results, or an empty file."""
    try:
        if _blank(path):  # an empty file (mktemp's, or `echo > out.json`'s): nothing to lose
            return True
        results = read_json(path)  # a file too large for results is a ValueError there
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    if isinstance(results, dict) and isinstance(results.get("models"), list):  # of several models
        return all(isinstance(r, dict) and {"model", "data", "tasks", "choice"} <= r.keys() for r in results["models"])
    return isinstance(results, dict) and {"model", "data", "tasks", "choice"} <= results.keys()


def check_results_out(out: str | Path, inputs: Iterable[str | Path], force: bool) -> None:
    """Refuses an --out that is an input or holds anything but earlier results (unless `force`)."""
    check_output_file(out, inputs, force=force, replaces=("the results of tinyk eval", is_results))


def is_samples(path: Path) -> bool:
    """Whether `tinyk eval --samples --force` may replace a file: earlier samples, or an empty file."""
    try:
        if _blank(path):
            return True
        with open(path, "rb") as f:
            first = f.readline(1 << 20)
        record = json.loads(first)
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(record, dict) and record.get("mode") in ("task", "choice")


def check_samples_out(out: str | Path, inputs: Iterable[str | Path], force: bool) -> None:
    """Refuses a --samples file that is an input or holds anything but earlier samples (unless `force`)."""
    check_output_file(out, inputs, force=force, replaces=("the samples of tinyk eval", is_samples),
                      flag="--samples", holds="the JSON lines")


def save_results(out: str | Path, results: dict[str, Any], inputs: Iterable[str | Path], force: bool) -> None:
    """Writes the results atomically, checking --out again: the file may have been made while the
    evaluation ran. The caller has shown the results already, so a failed write loses nothing."""
    _save(out, json.dumps(results, ensure_ascii=False, indent=2) + "\n", inputs, force, check_results_out,
          "results")


def save_samples(out: str | Path, records: list[dict[str, Any]], inputs: Iterable[str | Path], force: bool) -> None:
    """Writes `evaluate`'s records as JSON lines (one example or question each), as `save_results` does."""
    _save(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), inputs, force,
          check_samples_out, "samples")


def check_outputs(out: str | Path | None, samples: str | Path | None, inputs: Iterable[str | Path], force: bool,
                  *, per_example: bool) -> None:
    """Before any model is loaded: --out and --samples each a file of its own that may be written (not an
    input, nor anything but earlier results unless `force`); --samples only where there are examples to
    list (`per_example`: --task or --choice given)."""
    inputs = list(inputs)
    if out is not None and samples is not None and same_path(Path(out).resolve(), Path(samples).resolve()):
        raise TinykError(f"--samples {samples} is also --out; give each its own file")  # said first: the one fix
    if out is not None:
        check_results_out(out, inputs, force)
    if samples is None:
        return
    if not per_example:
        raise TinykError("--samples lists --task answers and --choice questions; add --task or --choice")
    check_samples_out(samples, inputs, force)


def save_outputs(out: str | Path | None, results: dict[str, Any], samples: str | Path | None,
                 records: list[dict[str, Any]] | None, inputs: Iterable[str | Path], force: bool) -> None:
    """`save_results` and `save_samples`, for those asked for (`records`: what `evaluate` collected, None
    where no samples were asked for); a failed samples file says the results are saved (a run again needs
    --force for them)."""
    inputs = list(inputs)
    if out is not None:
        save_results(out, results, inputs, force)
    if samples is None:
        return
    if records is None:
        raise ValueError("samples asked for without the records evaluate collected for them")
    try:
        save_samples(samples, records, inputs, force)
    except TinykError as e:
        raise TinykError(f"{e}; the results are saved in --out {out}" if out is not None else str(e)) from e


def _save(out: str | Path, text: str, inputs: Iterable[str | Path], force: bool,
          check: Callable[[str | Path, Iterable[str | Path], bool], None], what: str) -> None:
    inputs = list(inputs)
    try:
        check(out, inputs, force)
    except TinykError as e:
        raise TinykError(f"{e} (it changed while the evaluation ran; the results are above)") from None
    try:
        with writing(Path(out)):
            write_text_atomic(out, text)
    except KeyboardInterrupt as e:  # too late to stop anything: whether the file is whole is what matters
        if not _holds(Path(out), shown(text).encode("utf-8")):
            raise
        why = f"after the evaluation finished: {out} holds its complete {what}"
        raise (Stopped(e.signal_name, why) if isinstance(e, Stopped) else type(e)(why)) from None


def _holds(path: Path, data: bytes) -> bool:
    try:
        return path.read_bytes() == data
    except OSError:
        return False


def make_engine(model: Transformer, tok: TinyTokenizer, batch_size: int = 32, quantize: str = "none") -> Engine:
    """The engine for generation tasks; an int8 one works on a copy, so the other modes keep fp32, and
    decodes at most `int8_max_rows` sequences at a time (the dense weights serve more), so that its
    answers measure what int8 costs."""
    from .engine import Engine, engine_dtype, int8_max_rows

    if quantize == "int8":
        batch_size = min(batch_size, int8_max_rows(engine_dtype("auto", next(model.parameters()).device, quantize)))
    return Engine(copy.deepcopy(model) if quantize != "none" else model, tok, max_batch=batch_size, quantize=quantize)


def percent(x: float) -> str:
    return f"{100 * x:.1f}%"


def table_rows(results: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    """(metric, score, baseline) rows of `tinyk eval`'s table."""
    for d in results.get("data", []):
        name = f"{Path(d['data']).name}/{d['split']}"
        limit = "the shortest context of the models compared" if d.get("seq_len_cut_by") == "other_models" else \
            "the model's context"
        cut = f"; --seq-len {d['seq_len_asked']} is beyond {limit}" if d.get("seq_len_asked") else ""
        # seq_len, as the JSON and the left-out row name it (SFT: conversations of up to seq_len + 1 tokens,
        # which are seq_len predictions, as in training)
        unit = f"answer tokens within seq_len {d['seq_len']}" if d.get("kind") == "sft" else \
            f"windows of {plural(d['seq_len'], 'tokens')}"
        if d["loss"] is None:  # NaN or inf
            yield (f"{name} loss ({unit}{cut})", "not finite",
                   "the model's logits overflow: its weights hold NaN or inf, or it diverged")
        else:
            ppl = d["perplexity"]  # None past a float's range
            yield f"{name} loss ({unit}{cut})", f"{d['loss']:.4f}", ""
            yield f"{name} perplexity", f"e^{d['loss']:.0f}" if ppl is None else f"{ppl:.2f}", ""
            bpb = d["bits_per_byte"]  # None when the evaluated tokens spell no text (only <|im_end|>s)
            yield f"{name} bits per byte", "n/a" if bpb is None else f"{bpb:.4f}", ""
        if d.get("conversations_left_out"):
            yield (f"{name} conversations left out (no answer token within seq_len {d['seq_len']})",
                   f"{d['conversations_left_out']:,}", "")
    int8 = ", int8 weights" if results.get("quantize", "none") != "none" else ""
    for t in results.get("tasks", []):
        yield (f"{t['task']} exact match ({counted(t['examples'], t['skipped'])}{int8})", percent(t["accuracy"]),
               f"{percent(t['baseline'])} majority")
        yield f"{t['task']} stop rate", percent(t["stop_rate"]), ""
        if t.get("cut_by_context"):
            yield f"{t['task']} answers cut short by the model's context (not stopped)", \
                f"{t['cut_by_context']:,}", ""
    c = results.get("choice")
    if c:
        yield (f"multiple choice, {c['format']} ({counted(c['questions'], c['skipped'])})", percent(c["accuracy"]),
               f"{percent(c['baseline'])} chance")
        if len(c["subjects"]) > 1:
            yield "  mean over subjects", percent(c["macro_accuracy"]), ""
        for s, v in c["subjects"].items():
            yield f"  {s} (n={v['questions']})", percent(v["accuracy"]), ""


def skip_notes(results: dict[str, Any]) -> list[str]:
    """For stderr: what each task file and the multiple-choice set skipped, where and why (the table
    counts them by reason only; a file of mixed answer styles is otherwise scored on fewer rows
    without a word)."""
    skipped = [(Path(t["file"]).name, t["skipped"]) for t in results.get("tasks", [])]
    if results.get("choice"):
        skipped.append(("multiple choice", results["choice"]["skipped"]))
    return [f"{name}: {Skips.from_json(s).summary()}" for name, s in skipped if s["total"]]


def counted(n: int, skipped: dict[str, Any]) -> str:
    """How many examples a score is over, and what was not, by reason: "n=40, 3 skipped (answer not an option)"
    (a CSV without an answer column is one skip that may hide many questions, so it is named)."""
    return ", ".join([f"n={n}", *(f"{count} skipped ({reason.replace('_', ' ')})"
                                  for reason, count in skipped["by_reason"].items())])


def compared_rows(results: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    """`table_rows` of several models merged into (metric, a score per model, baseline) rows, in the
    order they first appear; a metric one model lacks (a row that counts another number of examples,
    when prompts beyond its context were skipped) shows "-" there. An indented row belongs to the row
    above it (its group): "mean over subjects" of a group that counts other examples is that group's."""
    order: list[tuple[str, str]] = []  # (group, metric); a group's own row has group ""
    scores: dict[tuple[str, str], list[str]] = {}
    baselines: dict[tuple[str, str], str] = {}
    for i, r in enumerate(results):
        group = ""
        for metric, score, baseline in table_rows(r):
            nested = metric.startswith(" ")
            group = group if nested else metric
            key = (group, metric) if nested else ("", metric)
            if key not in scores:
                scores[key], baselines[key] = ["-"] * len(results), baseline
                # After its group's rows so far, not after another group's.
                at = max((j for j, k in enumerate(order) if group in k), default=-1) + 1 if nested else len(order)
                order.insert(at, key)
            scores[key][i] = score
    return [(key[1], *scores[key], baselines[key]) for key in order]
