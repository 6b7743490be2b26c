"""Turning raw corpora into packed, pre-tokenized datasets, streamed with bounded memory.

The seed read whole files into memory, appended to its outputs, padded every sample and
found assistant spans by hard-coded ids. Here inputs are streamed record by record,
tokenized in worker processes (in input order, so the result never depends on the worker
count), and written into a temporary directory that is renamed into place when complete; a
stopped run is continued by the same command from its last checkpoint. The loaders that read
these directories live in `tinyk.loader`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shlex
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from itertools import chain, islice
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .errors import DamagedInput, TinykError, shown, writing
from .inputs import (
    DEFAULT_MAX_LINE_BYTES,
    NO_RECORDS,
    Skips,
    check_heads,
    check_inputs,
    is_compressed,
    is_plain_text,
    iter_records,
    iter_texts,
    json_kind,
    mostly_skipped,
    read_json,
    record_shape,
    sft_format,
    sha256_file,
    short_repr,
)
from .outputs import (
    PROGRESS_LINE_S,
    DirLock,
    atomic_dir,
    plain_name,
    remove_path,
    shows_a_bar,
    write_json_atomic,
)
from .tokenizer import (
    IM_END_ID,
    IM_START_ID,
    MESSAGE_TOKENS,
    MODEL_PROMPT,
    SPECIAL_TOKENS,
    ModelPrompt,
    TinyTokenizer,
    encode_chat,
    learns_from,
    load_tokenizer,
    message_text,
    plain_text_tokenizer,
    pre_token_pieces,
    splits_as_gpt2,
    token_bytes,
    token_spellings,
    tokenizer_hash,
    with_system,
)
from .units import MIN_SHARD_TOKENS, plural, size_text
from .workers import map_ordered

FORMAT_VERSION = 1
SPLITS = ("train", "val")
DEFAULT_SHARD_TOKENS = 100_000_000
DEFAULT_BATCH_CHARS = 1 << 19
CHECKPOINT_S = 60.0  # a stopped run, continued, redoes about this much work at most (once both splits have begun)
PIECE_CHARS = 1 << 17  # longer documents are tokenized piece by piece (see `text_pieces`)
PIECES_PER_CALL = 4  # pieces encoded at once: their encodings, many times their text's size, are in memory
# Speaker names used by BelleGroup, ShareGPT and OpenAI-style data, mapped to chat-template roles.
ROLE_ALIASES = {
    "system": "system", "developer": "system",
    "human": "user", "user": "user",
    "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "chatgpt": "assistant",
}


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass
class _DocBatch:
    """Tokenized documents back to back, with per-document lengths, source sizes and content keys."""

    tokens: np.ndarray
    lengths: np.ndarray
    nbytes: np.ndarray
    keys: np.ndarray  # uint64 hash of each document's content: what decides its split
    mask: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.lengths)

    def take(self, keep: np.ndarray) -> _DocBatch:
        """The documents where `keep` (one bool per document) is set, in order."""
        per_token = np.repeat(keep, self.lengths)
        mask = None if self.mask is None else self.mask[per_token]
        return _DocBatch(self.tokens[per_token], self.lengths[keep], self.nbytes[keep], self.keys[keep], mask)


@dataclass(frozen=True)
class _Job:
    """What a tokenizing worker needs; sent once when the worker starts."""

    kind: str
    tokenizer_json: str  # the file's text, read once: a tokenizer retrained meanwhile changes nothing
    dtype: str
    max_len: int = 0
    system_prompt: str = ""


@lru_cache(maxsize=1)
def _tokenizer(tokenizer_json: str) -> tuple[Any, np.ndarray]:
    """The plain-text tokenizer of a tokenizer.json's text and each token id's UTF-8 bytes, built once
    per process and tokenizer: documents and messages are text, so "<|im_end|>" written in them never
    becomes the special token. Keyed by the text, not the path: a notebook that retrains its tokenizer
    in place and prepares data again gets the new one."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    return plain_text_tokenizer(tok), np.array(token_bytes(token_spellings(tok)), np.int64)


# A tokenized payload: its documents, (reason, where) of those dropped, truncation counts.
_Encoded = tuple[_DocBatch, list[tuple[str, str]], Counter]


def _encode(job: _Job, payload: Any) -> _Encoded:
    if job.kind == "pretrain":
        return _encode_pretrain(job, payload), [], Counter()
    return _encode_sft(job, payload)


def text_pieces(text: str, size: int = PIECE_CHARS, longest: int | None = None) -> list[str]:
    """`text` (already normalised, if the tokenizer normalises) in pieces of at most about `size`
    characters, cut where the GPT-2 pattern ends a pre-token, so each encodes to the whole's tokens and
    a book-length document's encoding, many times the size of its text, is never in memory whole. A run
    with no such place in `longest` characters (2 x size: unpunctuated classical Chinese, say) is cut
    inside a word, where a token or two may differ from the whole's, rather than held whole."""
    return list(pre_token_pieces(text, size, 2 * size if longest is None else longest))


def _encode_pretrain(job: _Job, texts: list[str]) -> _DocBatch:
    """Each document becomes <|im_start|> + its tokens + <|im_end|>."""
    tok, _ = _tokenizer(job.tokenizer_json)
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # the fast one skips offsets
    ids: list[Any] = [None] * len(texts)
    short = [i for i, t in enumerate(texts) if len(t) <= PIECE_CHARS]
    for i, e in zip(short, encode([texts[i] for i in short], add_special_tokens=False), strict=True):
        ids[i] = e.ids
    for i in (i for i, t in enumerate(texts) if len(t) > PIECE_CHARS):
        # Cut after normalising (NFKC turns "⑴" into "(1)", which would join the "。" before it); the
        # normaliser leaves normalised text as it is, so the tokens stay those of the whole. A tokenizer
        # that splits otherwise has its documents encoded whole.
        text = tok.normalizer.normalize_str(texts[i]) if tok.normalizer is not None else texts[i]
        pieces = text_pieces(text, PIECE_CHARS) if splits_as_gpt2(tok) else [text]
        ids[i] = np.concatenate([np.array(e.ids, job.dtype) for k in range(0, len(pieces), PIECES_PER_CALL)
                                 for e in encode(pieces[k:k + PIECES_PER_CALL], add_special_tokens=False)])
    lengths = np.fromiter((len(x) + 2 for x in ids), np.int64, len(ids))
    ends = np.cumsum(lengths)
    tokens = np.empty(int(lengths.sum()), job.dtype)
    inner = np.ones(len(tokens), bool)
    inner[ends - lengths] = inner[ends - 1] = False
    tokens[ends - lengths] = IM_START_ID
    tokens[ends - 1] = IM_END_ID
    tokens[inner] = np.fromiter(chain.from_iterable(ids), job.dtype, len(tokens) - 2 * len(ids))
    raw = [t.encode("utf-8") for t in texts]
    nbytes = np.fromiter((len(b) for b in raw), np.int64, len(raw))
    return _DocBatch(tokens, lengths, nbytes, _content_keys(raw))


def _encode_sft(job: _Job, convs: list[tuple[str, list[dict[str, Any]], _Clip | None]]) -> _Encoded:
    """Tokenizes conversations as the engine prompts a model (`encode_chat`, the job's system prompt
    first where they have none), with their loss masks.

    The mask is 1 on assistant content and the <|im_end|> that closes each assistant turn, built from
    the template's pieces rather than token ids. Too-long conversations end after the last
    assistant turn that fits, or mid-turn when none does.
    """
    prompted = [with_system(msgs, job.system_prompt) for _, msgs, _ in convs]
    plain, nbytes_of = _tokenizer(job.tokenizer_json)
    chats = encode_chat(plain, prompted)
    toks, masks, lengths, nbytes, keys, skipped = [], [], [], [], [], []
    truncated: Counter = Counter()
    for (where, msgs, clip), chat in zip(convs, chats, strict=True):
        mask = np.asarray(chat.flags, np.uint8)
        cut, how = len(chat.ids), None
        if cut > job.max_len:
            fits = [n for n in chat.turn_ends if n <= job.max_len]  # just past learnable replies' <|im_end|>
            cut, how = (fits[-1], "at_turn") if fits else (job.max_len, "mid_turn")
        if not mask[1:cut].any():  # dropped, so counted as skipped only
            skipped.append(("prompt_too_long", where))
            continue
        # Answer tokens lost (not only the newline after the last <|im_end|>), here or by the clipping.
        if how and (mask[cut:].any() or (clip is not None and clip.lost_reply)):
            truncated[how] += 1
        toks.append(np.asarray(chat.ids[:cut], job.dtype))
        masks.append(mask[:cut])
        lengths.append(cut)
        nbytes.append(int(nbytes_of[chat.ids[:cut]][mask[:cut] == 1].sum()))
        keys.append(_content_key(_split_source(msgs)) if clip is None else clip.key)
    batch = _DocBatch(np.concatenate(toks) if toks else np.empty(0, job.dtype), np.array(lengths, np.int64),
                   np.array(nbytes, np.int64), np.array(keys, np.uint64),
                   np.concatenate(masks) if masks else np.empty(0, np.uint8))
    return batch, skipped, truncated


def _split_source(messages: list[dict[str, Any]]) -> bytes:
    """What a conversation's split key hashes: its turns without the system prompt, the record's own or
    the one added (another --system-prompt keeps every conversation's side, and a copy that names the
    prompt it would get anyway is on the same side as one that does not)."""
    turns = messages[1:] if messages and messages[0]["role"] == "system" else messages
    return json.dumps(turns, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


@dataclass(frozen=True)
class _Clip:
    """What clipping a conversation's long message (`_clipped`) left out that the output still depends on:
    the whole conversation's split key (hashed by the reader: a megabyte reply does not travel to the
    workers), and whether a reply the loss would be on went with it."""

    key: int
    lost_reply: bool


class _ReadStopped(Exception):
    """--strict met a bad record while reading: the batch read so far still goes out first."""


@dataclass
class _SkipLog(Skips):
    """Skips met while reading, counted per batch and handed over with it: with several workers,
    reading runs ahead of tokenizing, and the report (and --strict's first error) must not depend
    on how far. Under --strict, reading stops at the first one."""

    stop_at_first: bool = False

    def add(self, reason: str, where: str, hint: str | None = None) -> None:
        super().add(reason, where, hint)
        if self.stop_at_first:
            raise _ReadStopped

    def take(self) -> Skips:
        """What was counted since the last take, and a fresh start."""
        taken = Skips(counts=self.counts, first=self.first, hints=self.hints)
        self.counts, self.first, self.hints = Counter(), {}, {}
        return taken


def _read_until_stopped(items: Iterator[Any]) -> Iterator[Any]:
    try:
        yield from items
    except _ReadStopped:
        return


def _batched(items: Iterable[Any], size: Callable[[Any], int], limit: int) -> Iterator[list[Any]]:
    batch, total = [], 0
    for item in items:
        batch.append(item)
        total += size(item)
        if total >= limit:
            yield batch
            batch, total = [], 0
    if batch:
        yield batch


_M64 = (1 << 64) - 1


def _content_key(data: bytes) -> int:
    """A 64-bit hash of a document's bytes."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def _content_keys(docs: list[bytes]) -> np.ndarray:
    return np.fromiter((_content_key(d) for d in docs), np.uint64, len(docs))


def _unit_draws(seed: int, keys: np.ndarray) -> np.ndarray:
    """A splitmix64 hash of (seed, content key) in [0, 1). A document's split depends on its content
    alone: fixing or adding other records moves no document between train and val, and copies of a
    document are all on the same side."""
    z = keys * np.uint64(0x9E3779B97F4A7C15) + np.uint64((seed * 0xD1B54A32D192ED03 + 1) & _M64)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


class _SplitWriter:
    """Appends documents to one split and keeps the counts meta.json reports.

    Files are only ever appended to, so a checkpoint is the counts and the file sizes they imply
    (`state`, `sizes`): a stopped run's files are cut back to those and appended to again (`open`).
    """

    def __init__(self, folder: Path, dtype: np.dtype):
        self.folder, self.itemsize = folder, dtype.itemsize
        self.documents = self.tokens = self.bytes = 0
        # Tokens of the longest document: how far chance alone can skew the split's token share. None where
        # a stopped run's checkpoint, of a tinyk before 2026-12-08, does not know it.
        self.longest: int | None = 0

    def open(self, state: dict[str, Any] | None) -> None:
        """Starts the split, or continues it from a checkpoint's `state` (its files already cut back)."""
        self.folder.mkdir(exist_ok=True)
        if state:
            self.documents, self.tokens, self.bytes = state["documents"], state["tokens"], state["bytes"]
            self.longest = state.get("longest")

    def add(self, b: _DocBatch) -> None:
        if not len(b):
            return
        self.documents += len(b)
        self.tokens += int(b.lengths.sum())
        self.bytes += int(b.nbytes.sum())
        if self.longest is not None:
            self.longest = max(self.longest, int(b.lengths.max()))
        with writing(self.folder):
            self._write(b)

    def _write(self, b: _DocBatch) -> None:
        raise NotImplementedError

    def _files(self) -> list[Any]:
        """The open files."""
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        known = {} if self.longest is None else {"longest": self.longest}
        return {"documents": self.documents, "tokens": self.tokens, "bytes": self.bytes, **known}

    def sizes(self) -> dict[str, int]:
        """Bytes each file holds at this state, by name in the folder."""
        raise NotImplementedError

    def sync(self) -> None:
        """Everything written so far on disk, so a checkpoint never records more than survives a crash."""
        with writing(self.folder):
            for f in self._files():
                f.flush()
                os.fsync(f.fileno())

    def close(self) -> dict[str, Any]:
        """Finishes the split; returns its part of meta.json."""
        self.release()
        return self.state()

    def scratch(self) -> list[Path]:
        """Files a checkpoint needs that the finished split does not (removed once the run has no
        checkpoint left to continue)."""
        return []

    def release(self) -> None:
        """Closes the open files without finishing the split (a stopped run's directory is discarded or kept)."""
        for f in self._files():
            f.close()


class _ShardWriter(_SplitWriter):
    """Pretraining tokens as fixed-size shards; documents may straddle two shards."""

    def __init__(self, folder: Path, dtype: np.dtype, shard_tokens: int):
        super().__init__(folder, dtype)
        self.shard_tokens = shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.f: Any = None

    def open(self, state: dict[str, Any] | None) -> None:
        super().open(state)
        if state and state["shards"]:
            self.shards = [dict(s) for s in state["shards"]]
            self.f = open(self.folder / self.shards[-1]["file"], "ab")  # closed by release()

    def _write(self, b: _DocBatch) -> None:
        data = b.tokens
        while len(data):
            if self.f is None or self.shards[-1]["tokens"] == self.shard_tokens:
                self._next_shard()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            data[:room].tofile(self.f)
            self.shards[-1]["tokens"] += len(data[:room])
            data = data[room:]

    def _next_shard(self) -> None:
        if self.f is not None:
            self.f.flush()
            os.fsync(self.f.fileno())  # `sync` reaches only the open shard: a full one is on disk before it closes
            self.f.close()
        name = f"shard_{len(self.shards):05d}.bin"
        self.f = open(self.folder / name, "wb")  # closed by release()/_next_shard
        self.shards.append({"file": name, "tokens": 0})

    def _files(self) -> list[Any]:
        return [] if self.f is None else [self.f]

    def state(self) -> dict[str, Any]:
        return {**super().state(), "shards": [dict(s) for s in self.shards]}

    def sizes(self) -> dict[str, int]:
        return {s["file"]: s["tokens"] * self.itemsize for s in self.shards}


class _ConversationWriter(_SplitWriter):
    """SFT tokens, loss mask and per-conversation start offsets (kept as lengths until the end)."""

    LENGTHS = "lengths.tmp"

    def __init__(self, folder: Path, dtype: np.dtype):
        super().__init__(folder, dtype)
        self.loss_tokens = 0
        self.tok_f = self.mask_f = self.len_f = None  # until open(), which a checkpoint's bad state can stop

    def open(self, state: dict[str, Any] | None) -> None:
        super().open(state)
        self.loss_tokens = state["loss_tokens"] if state else 0
        # Appending: a continued run's files are already cut back to the checkpoint.
        self.tok_f, self.mask_f, self.len_f = (open(self.folder / name, "ab")  # closed by release()
                                               for name in ("tokens.bin", "mask.bin", self.LENGTHS))

    def _write(self, b: _DocBatch) -> None:
        assert b.mask is not None
        b.tokens.tofile(self.tok_f)
        b.mask.astype(np.uint8).tofile(self.mask_f)
        b.lengths.astype(np.int64).tofile(self.len_f)
        self.loss_tokens += int(np.count_nonzero(b.mask))

    def _files(self) -> list[Any]:
        return [f for f in (self.tok_f, self.mask_f, self.len_f) if f is not None]

    def state(self) -> dict[str, Any]:
        return {**super().state(), "loss_tokens": self.loss_tokens}

    def sizes(self) -> dict[str, int]:
        return {"tokens.bin": self.tokens * self.itemsize, "mask.bin": self.tokens, self.LENGTHS: self.documents * 8}

    def close(self) -> dict[str, Any]:
        meta = super().close()
        lengths = np.fromfile(self.folder / self.LENGTHS, np.int64)
        np.save(self.folder / "offsets.npy", np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
        return meta

    def scratch(self) -> list[Path]:
        return [self.folder / self.LENGTHS]


class _Splitter:
    """Routes each document to train or val by its seeded hash.

    The latest document is held back until another arrives, so that at the end it can fill
    whichever split would otherwise be empty: tiny corpora still get both splits.
    """

    def __init__(self, train: _SplitWriter, val: _SplitWriter, val_fraction: float, seed: int, seen: int = 0):
        self.train, self.val, self.val_fraction, self.seed = train, val, val_fraction, seed
        self.seen = seen
        self.held: tuple[_DocBatch, bool] | None = None

    def add(self, b: _DocBatch) -> None:
        if not len(b):
            return
        to_val = _unit_draws(self.seed, b.keys) < self.val_fraction
        self.seen += len(b)
        if self.held is not None:
            self._route(*self.held)
        last = np.arange(len(b)) == len(b) - 1
        self.val.add(b.take(to_val & ~last))
        self.train.add(b.take(~to_val & ~last))
        self.held = (b.take(last), bool(to_val[-1]))

    def _route(self, b: _DocBatch, to_val: bool) -> None:
        (self.val if to_val else self.train).add(b)

    def settle(self) -> bool:
        """Writes the held document where its hash sends it, if `close` could not send it elsewhere (both
        splits have documents already); True when nothing is held, so the state can be checkpointed."""
        if self.held is not None and self.train.documents and (self.val.documents or not self.val_fraction):
            self._route(*self.held)
            self.held = None
        return self.held is None

    def close(self) -> dict[str, dict[str, Any]]:
        if self.held is not None:
            b, to_val = self.held
            if not self.train.documents:
                to_val = False
            elif not self.val.documents and self.val_fraction > 0:
                to_val = True
            self._route(b, to_val)
        return {"train": self.train.close(), "val": self.val.close()}


def _check_common(val_fraction: float, workers: int | None, max_line_bytes: int) -> int:
    if not 0 <= val_fraction < 1:
        raise TinykError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if workers is not None and workers < 1:
        raise TinykError(f"--workers must be at least 1, got {workers}")
    if max_line_bytes < 1:
        raise TinykError(f"--max-line-bytes must be positive, got {max_line_bytes}")
    return workers or default_workers()


def _command(kind: str, paths: list[Path], tokenizer_dir: Any, out: Any, options: dict[str, Any]) -> str:
    """The `tinyk data` command line equivalent to a library call, for meta.json."""
    args = ["tinyk", "data", kind, "--input", *map(shown, paths), "--tokenizer", shown(tokenizer_dir),
            "--out", shown(out)]
    for key, value in options.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return shlex.join(args)


def _line_cap(max_line_bytes: int) -> dict[str, int]:
    """--max-line-bytes for the recorded command when it is not the default (it decides what is skipped)."""
    return {} if max_line_bytes == DEFAULT_MAX_LINE_BYTES else {"max_line_bytes": max_line_bytes}


def _is_data_dir(path: Path, kind: str) -> bool:
    """Data of this kind, which `--force` may replace; data of the other kind is refused with its own
    line: `--force` never turns an SFT directory into pretraining data, or back."""
    from .loader import open_dataset

    try:
        other = open_dataset(path)["kind"]
    except TinykError:
        return False
    if other != kind:
        raise TinykError(f"{path} holds {other} data, which tinyk data {kind} --force does not replace; choose "
                         f"another --out, or delete it first")
    return True


def _progress_line(kind: str, unit: str, splitter: _Splitter, seconds: float) -> str:
    """The rate is in tokens/s, as the closing line's: bytes kept (SFT: of answers only) are not the
    input's bytes, which the closing line's MB/s counts."""
    done = [splitter.train, splitter.val]
    mb, tokens = sum(w.bytes for w in done) / 1e6, sum(w.tokens for w in done)
    text = "answer text" if kind == "sft" else "text"
    return (f"tokenizing {kind}: {splitter.seen:,} {unit}, {tokens:,} tokens, {mb:,.1f} MB of {text} in "
            f"{seconds:.0f}s ({tokens / max(seconds, 1e-9):,.0f} tokens/s)")


class _Checkpoints:
    """A run's work so far, saved in its partial directory (`partial_sibling`) every `every_s` seconds,
    so that the same command, run again after a stop (Ctrl-C, a kill, a full disk, a crash), continues
    from there with the same result as a run never stopped.

    A checkpoint is the number of input records done, the writers' state and the file sizes it implies;
    a continued run cuts the files back to those sizes and skips that many records of the input (read
    and parsed again, not tokenized). The command's fingerprint (inputs with their sizes and times,
    tokenizer, every option that changes the output) must match, else the run starts over.
    """

    FILE = "progress.json"

    def __init__(self, folder: Path, fingerprint: dict[str, Any], every_s: float, talk: bool):
        self.folder, self.fingerprint, self.every_s, self.talk = folder, fingerprint, every_s, talk
        self.saved: dict[str, Any] | None = None
        self.last = time.monotonic()

    def load(self) -> dict[str, Any] | None:
        """The saved state when it is this command's and its files are complete; otherwise None, with
        the folder emptied for a fresh start."""
        why, state = None, None
        try:
            state = read_json(self.folder / self.FILE)
        except FileNotFoundError:
            pass
        except (OSError, ValueError):
            why = "has a progress file that cannot be read"
        if state is not None:
            try:
                if state["fingerprint"] != self.fingerprint:
                    why = f"was started with {_difference(state['fingerprint'], self.fingerprint)}"
                elif not self._cut_back(state["files"]):
                    why = "has files missing or cut short"
            except (KeyError, TypeError, AttributeError, ValueError, OSError):
                why = "has a progress file that cannot be read"
        if why:
            self.start_over(why)
        elif state is None:
            self._empty()
        else:
            self.saved = state
        return self.saved

    def start_over(self, why: str) -> None:
        self.say(f"starting over: the stopped run in {shown(self.folder)} {why}")
        self._empty()
        self.saved = None

    def _cut_back(self, sizes: dict[str, int]) -> bool:
        """Files cut to the sizes a checkpoint recorded, and files it does not know removed."""
        for name in sizes:  # an edited file must not cut back anything outside the folder
            split, _, file = name.partition("/")
            if split not in SPLITS or not plain_name(file):
                raise ValueError(f"{name!r} is not a file of a split")
        for path in list(self.folder.rglob("*")):
            name = path.relative_to(self.folder).as_posix()
            if path.is_file() and name != self.FILE and name not in sizes:
                path.unlink()
        for name, size in sizes.items():
            path = self.folder / name
            if not path.is_file() or path.stat().st_size < size:
                return False
            os.truncate(path, size)
        return True

    def _empty(self) -> None:
        for path in self.folder.iterdir():
            remove_path(path)

    def due(self) -> bool:
        return time.monotonic() - self.last >= self.every_s

    def save(self, state: dict[str, Any], writers: dict[str, _SplitWriter]) -> None:
        for w in writers.values():
            w.sync()
        files = {f"{split}/{name}": size for split, w in writers.items() for name, size in w.sizes().items()}
        saved = {"fingerprint": self.fingerprint, **state, "files": files}
        with writing(self.folder / self.FILE):
            write_json_atomic(self.folder / self.FILE, saved)
        self.saved, self.last = saved, time.monotonic()

    def stopped(self, e: BaseException, unit: str) -> None:
        """After a failure: the folder is kept when there is work to continue and the input did not cause
        the failure (--strict's bad record, a damaged file, which a rerun meets again), else removed."""
        # A full disk or a dead worker (`map_ordered`: a ChildProcessError, an OSError) is not the input's doing.
        from_input = isinstance(e, DamagedInput) or (isinstance(e, TinykError) and not isinstance(e.__cause__, OSError))
        if self.saved is None or from_input:
            remove_path(self.folder, ignore_errors=True)
            return
        done = self.saved["splitter"]["seen"]
        self.say(f"tinyk: the {plural(done, unit)} done are kept in {shown(self.folder)}; run the same command "
                  "again to continue from there (or delete that folder)")

    def finished(self, scratch: list[Path]) -> None:
        """The run is complete: its checkpoint and the files only a checkpoint needed go."""
        for path in [self.folder / self.FILE, *scratch]:
            path.unlink(missing_ok=True)

    def say(self, line: str) -> None:
        if self.talk:
            print(line, file=sys.stderr, flush=True)


def data_files(meta: dict[str, Any]) -> list[str]:
    """Every file a data directory's meta.json describes, by path in the directory."""
    names = []
    for split in SPLITS:
        s = meta["splits"][split]
        if meta["kind"] == "pretrain":
            names += [f"{split}/{shard['file']}" for shard in s["shards"]]
        elif s["tokens"]:
            names += [f"{split}/{name}" for name in ("tokens.bin", "mask.bin", "offsets.npy")]
    return names


def _fingerprint(kind: str, paths: list[Path], tok_hash: str, options: dict[str, Any], strict: bool) -> dict[str, Any]:
    """What decides a run's output: a stopped run is continued only by a run that would write the same."""
    inputs = []
    for p in paths:
        st = p.stat()
        inputs.append({"path": shown(p.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns})
    return {"tinyk": __version__, "kind": kind, "format_version": FORMAT_VERSION,
            "val_split": "by whole content, system prompt aside", "txt_lines": "ended by LF, CRLF or a lone CR",
            "tokenizer_hash": tok_hash, "inputs": inputs,
            "options": options, "strict": strict}


def _difference(was: dict[str, Any], now: dict[str, Any]) -> str:
    """What differs between a stopped run's fingerprint and this one's, as "was started with ..." ends."""
    old_inputs, new_inputs = was.get("inputs"), now["inputs"]
    if [f.get("path") for f in old_inputs or []] != [f["path"] for f in new_inputs]:
        return "other input files"
    for before, after in zip(old_inputs, new_inputs, strict=True):
        name = Path(after["path"]).name
        if before.get("bytes") != after["bytes"]:
            then = f"{before['bytes']:,} bytes then, " if isinstance(before.get("bytes"), int) else ""
            return f"another {name} ({then}{after['bytes']:,} bytes now)"
        if before.get("mtime_ns") != after["mtime_ns"]:
            return f"{name} as it was before it was modified (its time changed, e.g. by an edit, touch or a copy)"
    if was.get("tokenizer_hash") != now["tokenizer_hash"]:
        return "another tokenizer"
    options = {**{k: None for k in was.get("options") or {}}, **now["options"]}
    changed = [k for k in options if (was.get("options") or {}).get(k) != now["options"].get(k)]
    if changed:
        flags = ", ".join("--" + k.replace("_", "-") for k in changed)
        return f"other options ({flags})"
    if was.get("strict") != now["strict"]:
        return "--strict" if was.get("strict") else "no --strict"
    return "another version of tinyk"


@dataclass(frozen=True)
class _Run:
    """How a `tinyk data` run works, whatever its kind (`workers`: a count, resolved)."""

    val_fraction: float
    seed: int
    workers: int
    force: bool
    strict: bool
    show_progress: bool
    batch_chars: int
    checkpoint_s: float


@dataclass(frozen=True)
class _Kind:
    """What sets pretraining and SFT data apart in the pipeline they share."""

    name: str  # pretrain or sft
    records: Callable[[Skips], Iterator[Any]]  # the inputs' records; a bad one is counted in the Skips
    size: Callable[[Any], int]  # a record's characters, which batches are made of
    make_writer: Callable[[Path, np.dtype], _SplitWriter]
    options: dict[str, Any]  # what decides the output: in its fingerprint and its recorded command
    job: dict[str, Any]  # what the tokenizing workers need besides the tokenizer
    meta: dict[str, Any]  # what meta.json records besides what both kinds record

    @property
    def unit(self) -> str:
        return unit_of(self.name)


def unit_of(kind: str) -> str:
    """What one record of a kind of data is called: pretraining documents, SFT conversations."""
    return "documents" if kind == "pretrain" else "conversations"


def _prepare(kind: _Kind, paths: list[Path], tok: TinyTokenizer, out: str | Path, run: _Run,
             command: str) -> dict[str, Any]:
    """The shared pipeline: read -> batch -> tokenize in order -> split -> write -> meta.json, with
    checkpoints that let the same command continue a stopped run (`_Checkpoints`)."""
    tokenizer_dir = tok.path
    dtype = token_dtype(tok.vocab_size)
    job = _Job(kind.name, (Path(tokenizer_dir) / "tokenizer.json").read_text(encoding="utf-8"), dtype.name,
               **kind.job)
    tok_hash = tokenizer_hash(tokenizer_dir)
    fingerprint = _fingerprint(kind.name, paths, tok_hash, kind.options, run.strict)
    # The lock is held until the folder is renamed into place: a second run let in before would empty it.
    replaces = (f"{kind.name} data made by tinyk data {kind.name}", lambda p: _is_data_dir(p, kind.name))
    with contextlib.ExitStack() as locked, atomic_dir(out, force=run.force, inputs=[*paths, tokenizer_dir],
                                                      partial=True, replaces=replaces) as tmp:
        lock = DirLock(tmp)
        try:
            free = lock.acquire()
        except FileNotFoundError:  # another run renamed it into place just now
            free = False
        if not free:
            raise TinykError(f"another tinyk data run is writing {shown(out)} (in {shown(tmp)}); wait for it to end")
        locked.callback(lock.release)
        if (Path(out).exists() or Path(out).is_symlink()) and not run.force:  # made by a run that ended meanwhile
            with contextlib.suppress(OSError):
                tmp.rmdir()  # the folder this run has just made, not a stopped run's work
            raise TinykError(f"output directory exists: {shown(out)} (use --force to replace it)")
        checkpoints = _Checkpoints(tmp, fingerprint, run.checkpoint_s, run.show_progress)
        try:
            with contextlib.ExitStack() as opened:
                splits, done = _tokenize(kind, job, run, checkpoints, lambda state: _Done.open(
                    state, tmp, kind.make_writer, dtype, run, opened))
            meta = {
                "kind": kind.name,
                "format_version": FORMAT_VERSION,
                "tokenizer_hash": tok_hash,
                "vocab_size": tok.vocab_size,
                "dtype": dtype.name,
                "splits": splits,
                **kind.meta,
                **({"truncated": dict(done.truncated)} if kind.name == "sft" else {}),
                "val_fraction": run.val_fraction,
                "seed": run.seed,
                "skipped": done.skips.to_json(),
                "inputs": [{"path": shown(p), "bytes": p.stat().st_size} for p in paths],
                "command": command,
                "seconds": done.seconds,
            }
            # Read back once (from the page cache, mostly): `tinyk data info --verify` checks a copy against it.
            meta["sha256"] = {name: sha256_file(tmp / name) for name in data_files(meta)}
            with writing(tmp / "meta.json"):
                write_json_atomic(tmp / "meta.json", meta)
        except BaseException as e:
            checkpoints.stopped(e, kind.unit)
            raise
        checkpoints.finished([path for w in done.writers.values() for path in w.scratch()])
    return meta


@dataclass
class _Done:
    """What a tokenizing run has done so far: what a checkpoint saves (with the writers' own state), and
    what a stopped run's next start continues from."""

    writers: dict[str, _SplitWriter]
    splitter: _Splitter
    skips: Skips
    truncated: Counter
    records: int = 0  # records the reader passed on, those tokenizing skipped included (not the bad lines)
    # Spent on the work kept: a stopped run's time after its last save is not, a continued run's reading
    # past the records done is.
    seconds: float = 0.0

    @classmethod
    def open(cls, state: dict[str, Any] | None, folder: Path, make_writer: Callable[[Path, np.dtype], _SplitWriter],
             dtype: np.dtype, run: _Run, opened: contextlib.ExitStack) -> _Done:
        """The splits' writers, opened at a checkpoint's `state` (None: from nothing); a state that does not
        add up (edited, or from elsewhere) is a KeyError, TypeError, ValueError or AttributeError."""
        if state:  # an edited count would fail later, mid-run, as a traceback
            counts = [state["records"], state["splitter"]["seen"],
                      *(v for w in state["writers"].values() for k, v in w.items() if k != "shards"),
                      *(s["tokens"] for w in state["writers"].values() for s in w.get("shards", []))]
            if not all(type(n) is int and n >= 0 for n in counts):
                raise ValueError("a count that is not a whole number")
            if not all(plain_name(s["file"]) for w in state["writers"].values() for s in w.get("shards", [])):
                raise ValueError("a shard named outside its split's folder")
        writers = {split: make_writer(folder / split, dtype) for split in SPLITS}
        for split, w in writers.items():
            opened.callback(w.release)  # a stopped run closes its files before its folder is removed or kept
            w.open(state["writers"][split] if state else None)
        seen = int(state["splitter"]["seen"]) if state else 0
        splitter = _Splitter(writers["train"], writers["val"], run.val_fraction, run.seed, seen)
        if not state:
            return cls(writers, splitter, Skips(strict=run.strict), Counter())
        return cls(writers, splitter, Skips.from_json(state["skips"], run.strict), Counter(state["truncated"]),
                   int(state["records"]), float(state["seconds"]))

    def state(self, records: int, seconds: float) -> dict[str, Any]:
        """The checkpoint of this point: `records` read, `seconds` spent in all."""
        return {"records": records, "splitter": {"seen": self.splitter.seen},
                "writers": {split: w.state() for split, w in self.writers.items()},
                "skips": self.skips.to_json(), "truncated": dict(self.truncated), "seconds": round(seconds, 3)}


def _tokenize(kind: _Kind, job: _Job, run: _Run, checkpoints: _Checkpoints,
              open_done: Callable[[dict[str, Any] | None], _Done]) -> tuple[dict[str, Any], _Done]:
    """Fills `checkpoints.folder` with the two splits, continuing a saved state if there is one; returns
    the splits' meta and what was done (skips, truncation counts, seconds)."""
    from tqdm import tqdm

    try:
        done = open_done(checkpoints.load())
    except (KeyError, TypeError, ValueError, AttributeError):  # a progress file edited, or from elsewhere
        checkpoints.start_over("has a progress file that cannot be read")
        done = open_done(None)
    splitter, seconds_before, unit, show_progress = done.splitter, done.seconds, kind.unit, run.show_progress
    reader = _SkipLog(stop_at_first=run.strict)
    items = _read_until_stopped(kind.records(reader))
    t0 = time.monotonic()
    if done.records:
        checkpoints.say(f"continuing the stopped run in {shown(checkpoints.folder)}: {splitter.seen:,} {unit}, "
                        f"{splitter.train.tokens + splitter.val.tokens:,} tokens done; reading past them")
        count = sum(1 for _ in islice(items, done.records))
        if count < done.records:
            raise TinykError(f"the input holds fewer records ({count:,}) than the stopped run had done "
                             f"({done.records:,}); was it changed? Run the command again to start over")
        reader.take()  # the skips among them are counted in the saved state
        checkpoints.say(f"read past them in {time.monotonic() - t0:.0f}s")

    def tagged() -> Iterator[tuple[tuple[Skips, int], list[Any]]]:
        count, read = done.records, [Skips()]

        def taking(items: Iterator[Any]) -> Iterator[Any]:
            for item in items:
                read[0].merge(reader.take())  # the lines up to this record, and not those after the last one
                yield item

        for batch in _batched(taking(items), kind.size, run.batch_chars):
            count += len(batch)
            batch_skips, read[0] = read[0], Skips()
            yield (batch_skips, count), batch

    # A bar in a log is carriage-return noise; a notebook (no terminal either) shows it as one.
    bar_shown = show_progress and (shows_a_bar(sys.stderr) or "ipykernel" in sys.modules)
    last_line = time.monotonic()
    too_long = f"no reply begins within --max-len {job.max_len} tokens; a larger --max-len keeps them"
    with tqdm(unit=f" {unit}", disable=not bar_shown, dynamic_ncols=True, desc=f"tokenizing {kind.name}",
              initial=splitter.seen) as bar:
        for (read_skips, count), (batch, skipped, cut) in map_ordered(_encode, job, tagged(), run.workers):
            # A batch's records all precede a --strict stop, so their own skips come first.
            for reason, where in skipped:  # SFT's only reason: prompt_too_long
                done.skips.add(reason, where, too_long)
            done.skips.merge(read_skips)
            done.truncated.update(cut)
            splitter.add(batch)
            bar.update(len(batch))
            bar.set_postfix(tokens=f"{splitter.train.tokens + splitter.val.tokens:,}", refresh=False)
            now = time.monotonic()
            if show_progress and not bar_shown and now - last_line >= PROGRESS_LINE_S:
                last_line = now
                print(_progress_line(kind.name, unit, splitter, seconds_before + now - t0), file=sys.stderr, flush=True)
            if checkpoints.due() and splitter.settle():
                checkpoints.save(done.state(count, seconds_before + now - t0), done.writers)
    # lines after the last usable record (never in a checkpoint: a rerun reads them again)
    done.skips.merge(reader.take())
    splits = splitter.close()
    if not splits["train"]["documents"]:
        raise TinykError(f"no usable {unit} in the input: {done.skips.summary() if done.skips.total else NO_RECORDS}")
    done.seconds = round(seconds_before + time.monotonic() - t0, 3)
    return splits, done


def prepare_pretrain(inputs: list[str | Path], tokenizer_dir: str | Path, out: str | Path, *,
                     field: str = "text", val_fraction: float = 0.01, seed: int = 0, workers: int | None = None,
                     shard_tokens: int = DEFAULT_SHARD_TOKENS, force: bool = False, strict: bool = False,
                     max_line_bytes: int = DEFAULT_MAX_LINE_BYTES, show_progress: bool = True,
                     batch_chars: int = DEFAULT_BATCH_CHARS, checkpoint_s: float = CHECKPOINT_S) -> dict[str, Any]:
    """Tokenizes documents into `train/` and `val/` shards of back-to-back documents; returns meta.

    With `workers` > 1 the tokenizers run in spawned processes, which do not run the caller's script.
    """
    paths = check_inputs(inputs)
    nworkers = _check_common(val_fraction, workers, max_line_bytes)
    if shard_tokens < MIN_SHARD_TOKENS:
        raise TinykError(f"--shard-tokens must be at least {size_text(MIN_SHARD_TOKENS)} (fewer makes a file every few "
                         f"documents), got {shard_tokens}")
    check_heads(paths, field=field, max_line_bytes=max_line_bytes)

    def records(skips: Skips) -> Iterator[str]:
        return iter_texts(paths, skips, field=field, max_line_bytes=max_line_bytes)

    options = {"field": field, "val_fraction": val_fraction, "seed": seed, "shard_tokens": shard_tokens,
               **_line_cap(max_line_bytes)}
    kind = _Kind("pretrain", records, len, lambda d, dtype: _ShardWriter(d, dtype, shard_tokens), options, job={},
                 meta={"field": field})
    return _prepare(kind, paths, load_tokenizer(tokenizer_dir), out,
                    _Run(val_fraction, seed, nworkers, force, strict, show_progress, batch_chars, checkpoint_s),
                    _command("pretrain", paths, tokenizer_dir, out, options))


def skip_warning(meta: dict[str, Any]) -> str | None:
    """`inputs.mostly_skipped`'s warning for a data directory's meta, or None."""
    kept = sum(split["documents"] for split in meta["splits"].values())
    return mostly_skipped(meta["skipped"]["total"], kept, unit_of(meta["kind"]))


def _val_skew(meta: dict[str, Any]) -> str | None:
    """What val holds where it is far beyond --val-fraction, in documents or in tokens; None where
    chance explains it: the hash's spread (3 standard deviations) and the one document val always gets."""
    tr, va, asked = meta["splits"]["train"], meta["splits"]["val"], meta.get("val_fraction")
    total, tokens = tr["documents"] + va["documents"], tr["tokens"] + va["tokens"]
    if asked is None or total < 20:
        return None
    beyond = max(2 * asked, asked + 0.02)
    if va["documents"] > beyond * total + 3 * math.sqrt(asked * total) + 1:
        return f"val holds {va['documents'] / total:.0%} of them, not --val-fraction {asked:g}"
    # Each document's tokens go one way: their spread is at most that of `tokens / longest` documents
    # of the longest one's size. Data made before tinyk recorded the longest is not checked.
    longest = max(tr.get("longest", 0), va.get("longest", 0))
    if longest and va["tokens"] > beyond * tokens + 3 * math.sqrt(asked * longest * tokens) + longest:
        return (f"val holds {va['tokens'] / tokens:.0%} of the tokens ({va['documents'] / total:.0%} of the "
                f"{unit_of(meta['kind'])}), not --val-fraction {asked:g}")
    return None


def summary(meta: dict[str, Any]) -> str:
    """`tinyk data`'s report: what was kept and how fast (over the work kept, when a stopped run was
    continued), then what was skipped, a line for each reason."""
    tr, va = meta["splits"]["train"], meta["splits"]["val"]
    unit = unit_of(meta["kind"])
    text = (f"{meta['kind']} data: {plural(tr['documents'] + va['documents'], unit)} (train {tr['documents']:,}, "
            f"val {va['documents']:,}), {tr['tokens'] + va['tokens']:,} tokens (train {tr['tokens']:,}, "
            f"val {va['tokens']:,}) as {meta['dtype']}")
    if skew := _val_skew(meta):
        text += f" ({skew}: copies of a {unit[:-1]} all go to one side, and this data repeats some)"
    if meta["kind"] == "sft":
        cut = meta.get("truncated", {})
        text += (f", {tr['loss_tokens'] + va['loss_tokens']:,} with loss; {sum(cut.values()):,} cut to "
                 f"--max-len {meta['max_len']} ({cut.get('at_turn', 0):,} at a turn boundary)")
    seconds = meta.get("seconds")  # data made before tinyk recorded it has none
    if seconds:
        inputs = meta.get("inputs", [])
        mb = sum(i["bytes"] for i in inputs) / 1e6
        packed = [is_compressed(i["path"]) for i in inputs]
        files = " of compressed files" if all(packed) else " of files, some compressed" if any(packed) else ""
        tokens = tr["tokens"] + va["tokens"]
        text += (f"; read {mb:,.1f} MB{files} in {seconds:.1f}s "
                 f"({mb / max(seconds, 1e-9):.1f} MB/s, {tokens / max(seconds, 1e-9):,.0f} tokens/s)")
    return f"{text}; tokenizer {meta['tokenizer_hash']}; {Skips.from_json(meta.get('skipped', {})).report()}"


def _either(turn: dict[str, Any], key: str, other: str) -> Any:
    """`turn[key]`, else `turn[other]`: a turn of a Parquet or `datasets` export that merged ShareGPT and
    OpenAI rows has all four keys, two of them null."""
    value = turn.get(key)
    return value if value is not None else turn.get(other)


def _disagreement(turn: dict[str, Any]) -> str | None:
    """What a turn holding both ShareGPT's and OpenAI's keys, set to different things, says twice (a
    user's text read as a reply, had one been taken)."""
    role, sender = turn.get("role"), turn.get("from")
    if isinstance(role, str) and isinstance(sender, str) and \
            ROLE_ALIASES.get(role.lower(), role) != ROLE_ALIASES.get(sender.lower(), sender):
        return f"a turn's 'role' ({short_repr(role)}) and 'from' ({short_repr(sender)}) disagree"
    content, value = turn.get("content"), turn.get("value")
    if content is not None and value is not None and message_text(content) != message_text(value):
        return "a turn's 'content' and 'value' hold different texts"
    return None


def normalize_conversation(rec: Any) -> list[dict[str, Any]] | str:
    """A record in any supported SFT format as chat messages, or the reason it is unusable (see
    `read_conversation`)."""
    conv = read_conversation(rec)
    return conv if isinstance(conv, list) else conv[0]


def read_conversation(rec: Any) -> list[dict[str, Any]] | tuple[str, str | None]:
    """A record in any supported SFT format as chat messages, or (the reason it is unusable, what
    exactly is wrong where the reason alone leaves it open). A system prompt is only the record's own:
    `tinyk data sft` adds its --system-prompt when tokenizing.

    Accepts BelleGroup / ShareGPT (`conversations` of `from`/`value`), OpenAI-style
    (`messages` of `role`/`content`), Alpaca-style (`instruction`, optional `input`, `output`, and
    optional `history` of [question, answer] pairs, as BelleGroup's train_*_CN sets), TRL's prompt-completion
    (`prompt` and `completion`, both text or both lists of turns) and the seed's converted format (a bare
    list of messages). A top-level `system` field is the first turn; one
    that disagrees with a system turn of its own is refused rather than rendered as two.
    """
    form = sft_format(rec)
    if form is None:
        return "unknown_format", _format_hint(rec)
    system = None if form == "turns" else rec.get("system")
    if form == "turns":
        turns = rec
    elif form == "chat":
        # Both keys, one null or empty, is how a `datasets` export of mixed sources writes a row.
        lists = [rec[k] for k in ("conversations", "messages") if isinstance(rec.get(k), list)]
        if len(lists) == 2 and all(lists):  # the same conversation in both formats, or two
            sides = {k: read_conversation({**rec, other: None})
                     for k, other in (("conversations", "messages"), ("messages", "conversations"))}
            if sides["conversations"] != sides["messages"]:
                # Which one the data meant cannot be told; one that is unusable says why itself.
                key, (reason, detail) = next(((k, c) for k, c in sides.items() if isinstance(c, tuple)),
                                             (None, ("two_conversations", None)))
                return reason, key and f"in '{key}': {detail or reason.replace('_', ' ')}"
        turns = next((t for t in lists if t), lists[0])
    else:
        turns = _alpaca_turns(rec) if form == "alpaca" else _prompt_turns(rec)
        if isinstance(turns, tuple):
            return turns
    if isinstance(rec, dict) and rec.get("tools"):  # its replies may call them
        return "tool_call", "the record offers 'tools', which tinyk's chat template has no place for"
    if system is not None and not isinstance(system, str):
        return "bad_message", f"the record's 'system' is a JSON {json_kind(system)}, not text"
    system_field = isinstance(system, str) and bool(system.strip())
    messages = [{"role": "system", "content": system}] if system_field else []
    for t in turns:
        if not isinstance(t, dict):
            return "bad_message", f"a turn is {record_shape(t)}, not an object with a role and its text"
        if t.get("tool_calls") or t.get("function_call"):  # trained without its call, a reply would end there
            return "tool_call", ("a turn calls a tool ('tool_calls' or 'function_call'), which tinyk's chat template "
                                 "has no place for")
        if why := _disagreement(t):
            return "bad_message", why
        role, content = _either(t, "from", "role"), _either(t, "value", "content")
        text = message_text(content)
        if not isinstance(role, str):
            return "bad_message", f"a turn without a 'role' (or 'from') string: it has {record_shape(t)}"
        if not ({"content", "value"} & t.keys()):
            return "bad_message", f"a turn without 'content' (or 'value'): it has {record_shape(t)}"
        if text is None:
            return "bad_message", ("a turn's content is null (a tool call?)" if content is None else
                                   "a turn's content has a part that is not text (an image?)"
                                   if isinstance(content, list) else
                                   f"a turn's content is a JSON {json_kind(content)}, not text")
        if role.lower() not in ROLE_ALIASES:
            return "unknown_role", f"role {short_repr(role)}; tinyk reads the roles {', '.join(ROLE_ALIASES)}"
        # OpenAI's fine-tuning format: weight 0 keeps a reply as context, untrained. A `datasets` export
        # writes a turn without one as null, and its float column as 0.0 or 1.0.
        weight = t.get("weight")
        if weight is not None and weight not in (0, 1):  # False and True are 0 and 1 too
            return "bad_message", f"a turn's weight is {json.dumps(weight)[:40]}; it is 0 (not trained on) or 1"
        untrained = weight is not None and not weight
        messages.append({"role": ROLE_ALIASES[role.lower()], "content": text, **({"weight": 0} if untrained else {})})
    if not messages:
        return "empty", None
    if system_field and len(messages) > 1 and messages[1]["role"] == "system":
        if messages[1]["content"] != messages[0]["content"]:
            return "two_system_prompts", None  # which one the data meant cannot be told
        del messages[1]
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    if not any(r.strip() for r in replies):  # nothing to learn from
        return ("empty_assistant_turn" if replies else "no_assistant_turn"), None
    return messages


def _format_hint(rec: Any) -> str:
    """What an SFT record of no known format holds, and what tinyk reads."""
    if isinstance(rec, dict) and isinstance(rec.get("text"), str):
        return "records of 'text' are pretraining data, which `tinyk data pretrain` reads"
    return (f"the first such record has {record_shape(rec)}; an SFT record has 'conversations' or 'messages' "
            "(a list of turns), or 'instruction' and 'output', or 'prompt' and 'completion', or is a list of turns")


def _alpaca_turns(rec: dict[str, Any]) -> list[dict[str, Any]] | tuple[str, str | None]:
    """An Alpaca-style record's turns: the question is the instruction, then the input on a line of
    its own when there is one (as LLaMA-Factory renders it); or why the record is unusable."""
    instruction, extra, output = rec["instruction"], rec.get("input"), rec["output"]
    history = rec.get("history")
    history = [] if history is None else history
    extra = "" if extra is None else extra
    for name, value in (("instruction", instruction), ("input", extra), ("output", output)):
        if not isinstance(value, str):
            return "bad_message", f"the record's '{name}' is a JSON {json_kind(value)}, not text"
    if not (isinstance(history, list)
            and all(isinstance(h, list) and len(h) == 2 and all(isinstance(x, str) for x in h) for h in history)):
        return "bad_message", "the record's 'history' is not a list of [question, answer] pairs of text"
    if not output.strip():  # the record's own answer is empty: its history alone is another record's
        return "empty_assistant_turn", None
    question = "\n".join(part for part in (instruction, extra) if part.strip()) or instruction  # no empty line
    pairs = [*history, [question, output]]
    return [{"role": role, "content": text} for q, a in pairs for role, text in (("user", q), ("assistant", a))]


def _prompt_turns(rec: dict[str, Any]) -> list[Any] | tuple[str, str | None]:
    """A TRL prompt-completion record's turns: a question and its answer, or the prompt's turns followed by the
    completion's (whose assistant replies all carry loss, as every conversation's do here); or why it is unusable."""
    prompt, completion = rec["prompt"], rec["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        if not completion.strip():
            return "empty_assistant_turn", None
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    if isinstance(prompt, list) and isinstance(completion, list):
        return [*prompt, *completion]
    return "bad_message", (f"the record's 'prompt' is a JSON {json_kind(prompt)} and its 'completion' a JSON "
                           f"{json_kind(completion)}: both are text, or both lists of turns")


def prepare_sft(inputs: list[str | Path], tokenizer_dir: str | Path, out: str | Path, *, max_len: int = 512,
                system_prompt: str | None | ModelPrompt = MODEL_PROMPT, val_fraction: float = 0.01, seed: int = 0,
                workers: int | None = None, force: bool = False, strict: bool = False,
                max_line_bytes: int = DEFAULT_MAX_LINE_BYTES, show_progress: bool = True,
                batch_chars: int = DEFAULT_BATCH_CHARS, checkpoint_s: float = CHECKPOINT_S) -> dict[str, Any]:
    """Tokenizes conversations with their assistant-only loss mask into `train/` and `val/`; returns meta.
    Conversations without a system message get `system_prompt` (None or '' for none); by default the one the
    tokenizer directory records, so data made with a fine-tuned model's directory keeps its prompt."""
    paths = check_inputs(inputs)
    if any(is_plain_text(p) for p in paths):
        raise TinykError("SFT inputs must be JSON/JSONL/Parquet conversations, not .txt")
    nworkers = _check_common(val_fraction, workers, max_line_bytes)
    if max_len < 8:
        raise TinykError(f"--max-len must be at least 8 tokens, got {max_len}")
    check_heads(paths, message_lists=True, max_line_bytes=max_line_bytes)
    tok = load_tokenizer(tokenizer_dir)
    named = "--system-prompt" if isinstance(system_prompt, str) else \
        "the system prompt the tokenizer records (--system-prompt replaces it, '' for none)"
    if isinstance(system_prompt, ModelPrompt):
        system_prompt = tok.system_prompt
    system_prompt = system_prompt or ""  # recorded, and in the command to rerun, as '' for none
    if spelled := next((t for t in SPECIAL_TOKENS if t in system_prompt), None):
        # tinyk trains on it as text; the chat template the model directory exports writes the prompt into
        # the text transformers tokenizes, which reads it as the token: every conversation prompted otherwise.
        raise TinykError(f"{named} holds {spelled!r}, the text of a special token, which transformers would read "
                         f"as that token; write it otherwise")
    if system_prompt:  # said now, not as every conversation without one of its own skipped as too long
        opening = tok.opening_tokens(system_prompt)
        if opening >= max_len:
            raise TinykError(f"{named} is too long for --max-len {max_len}: with it a conversation takes at least "
                             f"{opening:,} tokens before its answer")
    # Messages this many characters long hold more than twice max_len tokens (a message's markers, at
    # least MESSAGE_TOKENS, counted as that many of the longest tokens), so the conversation is cut well
    # past max_len: the rest is never tokenized (a megabyte-long reply, or a 15 MB conversation of short
    # turns, took a gigabyte to encode).
    clip, marker_chars = 2 * max_len * tok.max_token_bytes, MESSAGE_TOKENS * tok.max_token_bytes

    def conversations(skips: Skips) -> Iterator[tuple[str, list[dict[str, Any]], _Clip | None]]:
        for where, rec in iter_records(paths, skips, max_line_bytes=max_line_bytes, message_lists=True):
            conv = read_conversation(rec)
            if isinstance(conv, tuple):
                skips.add(conv[0], where, conv[1])
            elif not any(map(learns_from, conv)):
                skips.add("weight_zero", where, "every reply has weight 0: nothing to train on")
            else:
                yield where, *_clipped(conv, clip, marker_chars)

    def chars(conv: tuple[str, list[dict[str, Any]], _Clip | None]) -> int:
        return sum(len(m["content"]) for m in conv[1])

    options = {"max_len": max_len, "system_prompt": system_prompt, "val_fraction": val_fraction, "seed": seed,
               **_line_cap(max_line_bytes)}
    recorded = {"max_len": max_len, "system_prompt": system_prompt}
    kind = _Kind("sft", conversations, chars, _ConversationWriter, options, job=recorded, meta=recorded)
    return _prepare(kind, paths, tok, out,
                    _Run(val_fraction, seed, nworkers, force, strict, show_progress, batch_chars, checkpoint_s),
                    _command("sft", paths, tokenizer_dir, out, options))


def _clipped(messages: list[dict[str, Any]], chars: int,
             marker_chars: int) -> tuple[list[dict[str, Any]], _Clip | None]:
    """The conversation as far as `chars` characters reach, each message's markers counted as
    `marker_chars`, the message where they run out cut there; and what the output needs of what was
    cut (None: nothing was). Many short turns are cut as one long message is."""
    left = chars
    for i, m in enumerate(messages):
        left -= marker_chars
        if len(m["content"]) > left:
            lost = any(map(learns_from, messages[i + 1:]))
            clip = _Clip(_content_key(_split_source(messages)), lost)
            return [*messages[:i], {**m, "content": m["content"][:max(left, 0)]}], clip
        left -= len(m["content"])
    return messages, None
