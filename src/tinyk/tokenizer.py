"""Byte-level BPE tokenizer with the seed's special tokens and ChatML template.

The saved directory is a plain Hugging Face tokenizer (`AutoTokenizer.from_pretrained`
loads it). Inside tinyk we use the fast `tokenizers` object directly: it is lighter and
gives the same ids.
"""

from __future__ import annotations

import bisect
import codecs
import hashlib
import json
import sys
import threading
import time
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from . import __version__
from .errors import TinykError, first_line, memory_available, writing
from .inputs import (
    DEFAULT_MAX_LINE_BYTES,
    NO_RECORDS,
    Skips,
    check_heads,
    check_inputs,
    hash_files,
    is_compressed,
    iter_documents,
    iter_texts,
    line_limit_text,
    mostly_skipped,
    read_json,
    short_repr,
)
from .outputs import PROGRESS_LINE_S, atomic_dir, fd_shows_a_bar, marker_file, write_json_atomic
from .units import bytes_text, plural

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
IM_START_ID, IM_END_ID = SPECIAL_TOKENS.index("<|im_start|>"), SPECIAL_TOKENS.index("<|im_end|>")  # bos, eos
SPECIAL_IDS = frozenset(range(len(SPECIAL_TOKENS)))
DEFAULT_SYSTEM_PROMPT = "你是一个AI助手"


class ModelPrompt:
    """The type of MODEL_PROMPT, the default of `default_system` arguments: the system prompt the model
    was trained with. Not None, which asks for no system turn."""


MODEL_PROMPT = ModelPrompt()


def prompt_from_flag(flag: str | None) -> str | None | ModelPrompt:
    """What a --system / --system-prompt flag asks for: absent, the model's own prompt (MODEL_PROMPT);
    '' (or only spaces, as chat's /system takes it) none."""
    return MODEL_PROMPT if flag is None else (flag.strip() or None)


def chat_template(system_prompt: str | None) -> str:
    """The seed's template (system/user/assistant turns; other roles, tools and non-text parts are refused,
    as tinyk's server refuses them, rather than silently dropped), plus what tinyk's chat, serve
    and SFT data do around it, so `transformers` prompts a model as it was trained: the model's training
    system prompt goes first when a conversation has none (`apply_chat_template(..., default_system=None)`
    leaves it out, as `Engine.chat_ids` does), and OpenAI's `developer` role is the system role."""
    # A JSON string is a valid Jinja string literal (Jinja reads its backslash escapes).
    literal = json.dumps(system_prompt or "", ensure_ascii=False)
    return f"{{% set system = default_system if default_system is defined else {literal} %}}" + _TEMPLATE_BODY


_TEMPLATE_BODY = (
    # What tinyk's server refuses, the template refuses too, not drops: tools and tool calls, other roles,
    # image parts.
    "{% if tools %}{{ raise_exception('tools are not supported: the model was trained on plain chat turns') }}"
    "{% endif %}"
    "{% if system and messages and messages[0]['role'] not in ['system', 'developer'] %}"
    "<|im_start|>system\n{{ system }}<|im_end|>\n"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'developer', 'user', 'assistant'] %}"
    "{{ raise_exception('only system (or developer), user and assistant messages are supported') }}"
    "{% endif %}"
    "{% if message['tool_calls'] is defined and message['tool_calls'] %}"
    "{{ raise_exception('tool calls are not supported: the model was trained on plain chat turns') }}"
    "{% endif %}"
    "{% if message['content'] is not string %}{% for part in message['content'] or [] %}"
    "{% if part['type'] != 'text' %}{{ raise_exception('only text parts are supported in a message') }}{% endif %}"
    "{% endfor %}{% endif %}"
    # OpenAI's list of text parts, joined by newlines as `message_text` joins them for tinyk's own prompts.
    "{% set content = message['content'] if message['content'] is string "
    "else (message['content'] or []) | selectattr('type', 'equalto', 'text') | map(attribute='text') "
    "| join('\\n') %}"
    "{% if message['role'] in ['system', 'developer'] %}"
    "<|im_start|>system\n{{ content }}<|im_end|>\n"
    "{% elif message['role'] == 'user' %}"
    "<|im_start|>user\n{{ content }}<|im_end|>\n"
    "{% elif message['role'] == 'assistant' %}"
    "<|im_start|>assistant\n{{ content }}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)
CHAT_ROLES = ("system", "user", "assistant")
SYSTEM_ROLES = ("system", "developer")  # OpenAI's newer name for the system role
# The least a chat message adds around its text: <|im_start|>, its role and <|im_end|>.
MESSAGE_TOKENS = 3
NOT_UTF8 = "the text is not valid UTF-8 (convert it first, e.g. iconv -f gbk -t utf-8)"
TRAIN_PIECE_CHARS = 4000  # the longest text the BPE trainer is given at once (see training_pieces)
# The contractions the GPT-2 pattern of the ByteLevel pre-tokenizer takes first, after an apostrophe.
_CONTRACTIONS = ("s", "t", "re", "ve", "m", "ll", "d")
MAX_VOCAB = 1_000_000  # far above any small LLM's; the trainer would try to allocate for whatever it is given


def message_text(content: Any, part_types: tuple[str, ...] = ("text",)) -> str | None:
    """A chat message's text: a string, or OpenAI's list of `{"type": "text", "text": ...}` parts joined
    by newlines as vLLM joins them, so a conversation trains and serves as the same prompt; None for
    anything else (an image part, a number). `part_types`: the text parts' types (the Responses API's
    are input_text and output_text)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") in part_types
                                         and isinstance(p.get("text"), str) for p in content):
        return "\n".join(p["text"] for p in content)
    return None


def with_system(messages: list[dict[str, str]], system: str | None) -> list[dict[str, str]]:
    """`messages` with `system` first unless they start with a system message of their own: how SFT
    data is prepared, so training, evaluation and serving all prompt alike."""
    if system and messages and messages[0]["role"] not in SYSTEM_ROLES:
        return [{"role": "system", "content": system}, *messages]
    return messages


def chat_header(role: str) -> str:
    return f"<|im_start|>{role}\n"


CHAT_FOOTER = "<|im_end|>\n"


def learns_from(message: dict[str, Any]) -> bool:
    """Whether SFT trains on `message`: a reply with text, not of weight 0 (OpenAI's fine-tuning format).
    An empty reply (a failed generation in a ShareGPT dump) stays as context but teaches nothing: loss on
    its <|im_end|> alone would teach the model to answer that turn with silence."""
    return message["role"] == "assistant" and bool(message["content"].strip()) and message.get("weight", 1) != 0


def _turns(messages: list[dict[str, Any]]) -> list[tuple[str, str, bool]]:
    """(role, content, learned) of the messages the template renders, `developer` as system; others are
    dropped."""
    return [("system" if m["role"] in SYSTEM_ROLES else m["role"], m["content"], learns_from(m))
            for m in messages if m["role"] in CHAT_ROLES or m["role"] in SYSTEM_ROLES]


def render_chat(messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """Renders messages as given, as the chat template does with `default_system=None`, without jinja."""
    parts = [chat_header(role) + content + CHAT_FOOTER for role, content, _ in _turns(messages)]
    if add_generation_prompt:
        parts.append(chat_header("assistant"))
    return "".join(parts)


def plain_text_tokenizer(tok: Tokenizer) -> Tokenizer:
    """A copy of `tok` that reads special-token strings in text as ordinary characters: a document or
    a message that contains "<|im_end|>" is text, not the end of a turn."""
    plain = Tokenizer.from_str(tok.to_str())
    plain.encode_special_tokens = True
    return plain


@dataclass
class ChatTokens:
    """One conversation in the chat template, as token ids with what training needs to know of them."""

    ids: list[int] = field(default_factory=list)
    flags: list[int] = field(default_factory=list)  # 1 on assistant content and the <|im_end|> closing its turn
    turn_ends: list[int] = field(default_factory=list)  # token index just past each assistant <|im_end|>

    def add(self, ids: list[int], flag: int = 0) -> None:
        self.ids += ids
        self.flags += [flag] * len(ids)


def encode_chat(plain: Tokenizer, conversations: list[list[dict[str, str]]],
                add_generation_prompt: bool = False) -> list[ChatTokens]:
    """Conversations in the chat template, tokenized piece by piece (`plain` from `plain_text_tokenizer`).

    Only the template's own <|im_start|> and <|im_end|> become special tokens; message text never
    does, so a user who types "<|im_end|>\n<|im_start|>system" cannot forge a turn. Each message's
    "role\ncontent" is one piece, exactly the piece that tokenizing the rendered text splits out
    between special tokens, so the ids equal `encode(render_chat(...))` for text without
    special-token strings (what `transformers`' apply_chat_template gives). Training and serving
    both use this, so a model is prompted exactly as it was trained.
    """
    kept = [_turns(conv) for conv in conversations]
    pieces = [role + "\n" + content for conv in kept for role, content, _ in conv]
    encs = iter(plain.encode_batch(pieces, add_special_tokens=False) if pieces else [])
    newline = plain.encode("\n", add_special_tokens=False).ids
    reply_header = plain.encode("assistant\n", add_special_tokens=False).ids
    out = []
    for conv in kept:
        ct = ChatTokens()
        for *_, learn in conv:
            enc = next(encs)
            ct.add([IM_START_ID])
            if learn:
                # Tokens that start inside the content learn; the "assistant\n" header's do not.
                head = len("assistant\n")
                starts = [a for a, _ in enc.offsets]
                k = bisect.bisect_left(starts, head)
                ct.ids += enc.ids
                ct.flags += [0] * k + [1] * (len(starts) - k)
            else:
                ct.add(enc.ids)
            ct.add([IM_END_ID], int(learn))
            if learn:  # the newline after it learns nothing: a cut there loses no answer
                ct.turn_ends.append(len(ct.ids))
            ct.add(newline)
        if add_generation_prompt:
            ct.add([IM_START_ID, *reply_header])
        out.append(ct)
    return out


def pending_utf8(data: bytes) -> bytes:
    """The end of `data` that may still become a character: a lead byte and the continuation bytes it
    allows so far. Python's decoder also waits on ED A0..BF, which only a UTF-16 surrogate starts and
    which `transformers` (Rust) shows as U+FFFD at once: those are no character's start."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    decoder.decode(data)
    pending = decoder.getstate()[0]
    return b"" if pending[:1] == b"\xed" and pending[1:2] >= b"\xa0" else pending


def continues_character(pending: bytes, piece: bytes) -> bool:
    """Whether `piece` goes on with the first bytes of a character, `pending`, as UTF-8 allows."""
    data = pending + piece[:1]
    if not pending_utf8(pending):  # bytes no character starts with (ED A0..BF), which Python's decoder waits on
        return False
    try:
        data.decode("utf-8")  # the character's last byte
    except UnicodeDecodeError:
        return pending_utf8(data) == data  # or one more of its first bytes
    return True


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's alphabet: printable Latin-1 bytes stand for themselves, the others for
    the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(others)}


BYTE_OF_CHAR = _byte_level_alphabet()


def token_spellings(tok: Tokenizer) -> list[str | None]:
    """Each token's bytes in byte-level BPE's alphabet, one character a byte (None for special
    tokens): one token's text starts with another's where its spelling starts with the other's.
    A token added in `transformers` (`tok.add_tokens`) is kept as plain text, spelled here as BPE's."""
    added = tok.get_added_tokens_decoder()
    char_of = {b: c for c, b in BYTE_OF_CHAR.items()}

    def spelling(i: int) -> str | None:
        if i < len(SPECIAL_TOKENS) or (i in added and added[i].special):
            return None
        if i in added:
            return "".join(char_of[b] for b in added[i].content.encode())
        return tok.id_to_token(i)
    return [spelling(i) for i in range(tok.get_vocab_size(with_added_tokens=True))]


def token_bytes(spellings: list[str | None]) -> list[int]:
    """UTF-8 bytes of text each token id stands for (from `token_spellings`), 0 for special tokens:
    the bytes behind bits per byte, counted alike for training data, the trainer's evaluation and
    `tinyk eval`."""
    return [len(s) if s else 0 for s in spellings]


@dataclass
class TinyTokenizer:
    """The `tokenizers` object plus the bits of the HF config tinyk needs."""

    tok: Tokenizer
    path: Path

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return IM_START_ID

    @property
    def eos_id(self) -> int:
        return IM_END_ID

    @property
    def pad_id(self) -> int:
        return IM_END_ID

    @cached_property
    def plain(self) -> Tokenizer:
        return plain_text_tokenizer(self.tok)

    @cached_property
    def token_bytes(self) -> list[int]:
        return token_bytes(self.token_spellings)

    @cached_property
    def token_spellings(self) -> list[str | None]:
        return token_spellings(self.tok)

    def piece(self, token_id: int) -> bytes:
        """The bytes a token id stands for (a special token's spelling): part of a character, for the
        tokens that split one."""
        token = self.tok.id_to_token(token_id) or ""
        if token_id in self.special_ids or not all(c in BYTE_OF_CHAR for c in token):
            return self.decode([token_id]).encode()
        return bytes(BYTE_OF_CHAR[c] for c in token)

    @cached_property
    def special_ids(self) -> frozenset[int]:
        """The ids decoding with skip_special_tokens leaves out: tinyk's five and any other special token."""
        return SPECIAL_IDS | {i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}

    @cached_property
    def byte_level(self) -> bool:
        """Whether decoding joins token bytes and reads them as UTF-8 (tinyk's and the tutorial's do):
        then ids that end on a whole character decode apart from the ids after them."""
        return isinstance(self.tok.decoder, decoders.ByteLevel)

    def ends_mid_character(self, ids: list[int]) -> bool:
        """Whether the text of `ids` (special tokens skipped) ends in the first bytes of a character,
        which decoding shows as one U+FFFD until the rest arrive; bytes that can begin no character
        are U+FFFD for good."""
        return bool(self.pending_bytes(ids))

    def pending_bytes(self, ids: list[int]) -> bytes:
        """The first bytes of a character the text of `ids` ends in (special tokens skipped), if any. A
        character has at most 4 bytes, so the last 3 decide."""
        tail = b""
        for i in reversed(ids):
            if len(tail) >= 3:
                break
            if i not in self.special_ids:
                tail = self.piece(i) + tail
        return pending_utf8(tail[-3:])

    @cached_property
    def max_token_bytes(self) -> int:
        """The most UTF-8 bytes of input text one token stands for (a special token's spelling included;
        four times that under NFKC, which can make a 4-byte character a 1-byte one): text of n bytes
        has at least n / max_token_bytes tokens."""
        specials = [*SPECIAL_TOKENS, *(t.content for t in self.tok.get_added_tokens_decoder().values() if t.special)]
        most = max(*self.token_bytes, *(len(t.encode()) for t in specials))
        return most * 4 if self.tok.normalizer is not None else most

    def encode(self, text: str, special: bool = True) -> list[int]:
        """Token ids of `text`; special-token strings in it ("<|im_start|>") become special tokens
        unless `special` is False (as in `transformers`, where a raw prompt may spell out a template)."""
        try:
            return (self.tok if special else self.plain).encode(text, add_special_tokens=False).ids
        except TypeError as e:  # a lone surrogate: bytes that were not UTF-8 (a GBK file, a raw byte in argv)
            raise TinykError(NOT_UTF8) from e

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> list[int]:
        """The conversation in the chat template; message text is never read as special tokens."""
        try:
            return encode_chat(self.plain, [messages], add_generation_prompt)[0].ids
        except TypeError as e:
            raise TinykError(NOT_UTF8) from e

    def normalized(self, text: str) -> str:
        """`text` as this tokenizer reads it (NFKC turns full-width `（１２）` into `(12)`): what its tokens spell."""
        return self.tok.normalizer.normalize_str(text) if self.tok.normalizer is not None else text

    def opening_tokens(self, system: str | None) -> int:
        """Tokens a one-message conversation under system prompt `system` takes besides that message's text:
        the system turn, the message's markers and the reply's header."""
        return len(self.encode_chat(with_system([{"role": "user", "content": ""}], system), add_generation_prompt=True))

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    @cached_property
    def system_prompt(self) -> str | None:
        """The system prompt the model was trained with (SFT data's, recorded in tokenizer_config.json),
        which a chat without one gets first; None for none. Older directories (no file, or no key in it):
        the default. A damaged file is an error: it would silently give the stock prompt."""
        config = self.path / "tokenizer_config.json"
        try:
            recorded = read_json(config)
            if not isinstance(recorded, dict) or not isinstance(recorded.get("system_prompt", ""), str):
                raise ValueError("not an object with a string system_prompt")
        except FileNotFoundError:
            return DEFAULT_SYSTEM_PROMPT
        except (OSError, ValueError) as e:
            raise TinykError(f"cannot read {config} ({first_line(e)}); it records the system prompt the model "
                             f"was trained with: restore it, or delete it for the default one") from e
        return (recorded["system_prompt"] or None) if "system_prompt" in recorded else DEFAULT_SYSTEM_PROMPT

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = False,
                            default_system: str | None | ModelPrompt = MODEL_PROMPT) -> str:
        """The text `transformers`' apply_chat_template renders from this directory's template: as there,
        `default_system` replaces the model's system prompt when given (None: no system turn)."""
        return render_chat(with_system(messages, self.resolve_system(default_system)), add_generation_prompt)

    def resolve_system(self, default_system: str | None | ModelPrompt) -> str | None:
        """What a `default_system` argument stands for: MODEL_PROMPT is this model's own prompt."""
        return self.system_prompt if isinstance(default_system, ModelPrompt) else default_system

    def system_from_flag(self, flag: str | None) -> str | None:
        """The system prompt a --system / --system-prompt flag asks for (`prompt_from_flag`)."""
        return self.resolve_system(prompt_from_flag(flag))


def tokenizer_file(path: str | Path) -> Path:
    """The directory's tokenizer.json, or one line on why there is none."""
    path = Path(path)
    if (path / "config.json").is_file() and not (path / "tokenizer.json").exists():
        raise TinykError(f"model directory {path} has no tokenizer.json: it was saved without its tokenizer; put "
                         f"the tokenizer's files beside it (transformers: tokenizer.save_pretrained(DIR), with the "
                         f"tokenizer of the model it was trained from)")
    return marker_file(path, "tokenizer.json", "tokenizer")


def tokenizer_hash(path: str | Path) -> str:
    """Identity of a tokenizer directory: a hash of what decides its ids and text (vocabulary, merges,
    normaliser, pre-tokeniser, decoder, added tokens), not of the file's bytes, which `transformers`
    rewrites when it saves a tokenizer back (a post-processor tinyk never runs, other key order).
    A directory without tokenizer.json is refused as loading it would be."""
    f = tokenizer_file(path)
    try:
        d = read_json(f)
        model = dict(d["model"])
        model["merges"] = [m.split(" ", 1) if isinstance(m, str) else list(m) for m in model.get("merges", [])]
        added = sorted((t["id"], t["content"], bool(t.get("special"))) for t in d.get("added_tokens", []))
        identity = {"model": model, "added": added, **{k: d.get(k) for k in ("normalizer", "pre_tokenizer", "decoder")}}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return hash_files([f])  # not a tokenizer tinyk can read: loading it reports why
    return hashlib.sha256(json.dumps(identity, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def same_tokenizer(recorded: str, path: str | Path) -> bool:
    """Whether a hash recorded in data's meta.json names the tokenizer at `path`; data prepared before
    the hash was of the tokenizer's content carries the hash of the file's bytes."""
    return recorded == tokenizer_hash(path) or recorded == hash_files([Path(path) / "tokenizer.json"])


def check_init_tokenizer(tokenizer: str | Path, init: str | Path) -> None:
    """Refuses a --tokenizer beside --init that is not the one the model was trained with: its ids would
    mean other text to the model's embedding."""
    if tokenizer_hash(tokenizer) != tokenizer_hash(init):
        raise TinykError(f"tokenizer {tokenizer} is not the one the model in {init} was trained with; leave out "
                         f"--tokenizer (the model carries its own)")


def load_tokenizer(path: str | Path) -> TinyTokenizer:
    """Loads a tokenizer directory and checks it carries the special ids tinyk relies on, and a readable
    record of the model's system prompt."""
    tok = _read_tokenizer(Path(path))
    tok.system_prompt  # noqa: B018 - read now: a damaged record is refused before any work starts
    return tok


def _read_tokenizer(path: Path) -> TinyTokenizer:
    """tokenizer.json with the special ids tinyk relies on."""
    f = tokenizer_file(path)
    try:
        tok = Tokenizer.from_str(f.read_text(encoding="utf-8"))  # Python opens it: see outputs.rust_path
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise TinykError(f"cannot read tokenizer {f}: {first_line(e)}") from e
    for i, name in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(name) != i:
            has = "has none" if tok.token_to_id(name) is None else f"has {tok.token_to_id(name)}"
            raise TinykError(f"tokenizer {path}: special token {name} must have id {i}, {has}; tinyk reads the "
                             f"tokenizers it trains and the tutorial's, which have {', '.join(SPECIAL_TOKENS)} as "
                             f"ids 0 to {len(SPECIAL_TOKENS) - 1}")
    largest, count = max(tok.get_vocab(with_added_tokens=True).values()), tok.get_vocab_size(with_added_tokens=True)
    if largest >= count:  # an id past the embedding that a token count sized (or an edited, hostile file)
        raise TinykError(f"tokenizer {path} has gaps in its ids: {count:,} tokens, the largest id {largest:,}; "
                         f"ids run from 0 to the token count less one in a tokenizer tinyk trains")
    if isinstance(tok.pre_tokenizer, pre_tokenizers.ByteLevel) and not isinstance(tok.decoder, decoders.ByteLevel):
        raise TinykError(f"tokenizer {f} splits text into bytes but has no byte-level decoder to join them back "
                         f"(its \"decoder\" entry is {'missing' if tok.decoder is None else 'another'}): every "
                         f"decoded text would be garbled; restore the file")
    return TinyTokenizer(tok, path)


def _is_tokenizer_output(path: Path) -> bool:
    """A directory `tinyk tokenizer train` made: a tinyk tokenizer and nothing more (a model directory
    holds one too)."""
    if (path / "config.json").exists():
        return False
    try:  # one whose tokenizer_config.json was damaged is still one to replace
        _read_tokenizer(path)
    except TinykError:
        return False
    return True


def tokenizer_config(model_max_length: int = 1_000_000, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
                     ) -> dict[str, Any]:
    return {
        "add_bos_token": False,
        "add_eos_token": False,
        **special_tokens_map(),
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "padding_side": "left",  # batched generate() continues each prompt from its own last token
        "tokenizer_class": "PreTrainedTokenizerFast",
        # A Llama's inputs: without this, transformers 4 adds token_type_ids, which generate() refuses.
        "model_input_names": ["input_ids", "attention_mask"],
        "chat_template": chat_template(system_prompt),
        "system_prompt": system_prompt or "",  # tinyk's own record of it ("" for none)
    }


def special_tokens_map() -> dict[str, Any]:
    return {
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "unk_token": "<unk>",
        "pad_token": "<|im_end|>",
        "additional_special_tokens": ["<s>", "</s>"],
    }


TRAINING_RECORD = "training.json"  # beside a trained tokenizer: its inputs, settings and what was read


def save_tokenizer_files(tok: Tokenizer, out: Path) -> None:
    (out / "tokenizer.json").write_text(tok.to_str(pretty=True), encoding="utf-8")  # see outputs.rust_path
    write_hf_tokenizer_files(out, 1_000_000)  # no model, so no context length yet


def write_hf_tokenizer_files(out: Path, model_max_length: int, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
                             ) -> None:
    """tokenizer_config.json and special_tokens_map.json, what `transformers` reads beside tokenizer.json."""
    for name, obj in (("tokenizer_config.json", tokenizer_config(model_max_length, system_prompt)),
                      ("special_tokens_map.json", special_tokens_map())):
        (out / name).write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def build_tokenizer(normalization: str = "none") -> Tokenizer:
    """An untrained byte-level BPE whose decode(encode(s)) == s for every string."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    if normalization == "nfkc":
        tok.normalizer = normalizers.NFKC()
    elif normalization != "none":
        raise TinykError(f"unknown normalization {normalization!r} (use none or nfkc)")
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


# Bytes of memory BPE training holds per byte of text read: about 80 measured on Chinese news (the
# trainer keeps every distinct pre-token, and a run of Chinese characters is one), plus a margin.
BPE_MEMORY_PER_BYTE = 100


def memory_read_limit(memory: int) -> int:
    """How much text BPE training reads without --max-bytes, given the memory available: rounded down to
    2^k or 1.5 x 2^k bytes, so that the same command on the same machine reads the same text, and makes
    the same tokenizer, though the memory available moves a little between runs (245 MB, then 241)."""
    cap = max(memory // BPE_MEMORY_PER_BYTE, 1 << 20)
    step = 1 << (cap.bit_length() - 1)
    return step + step // 2 if step + step // 2 <= cap else step


# Why memory bounds the text read, in the notes before and after training.
BPE_MEMORY_TEXT = f"BPE training holds about {BPE_MEMORY_PER_BYTE} bytes per byte of text"


def memory_cap_text(memory: int) -> str:
    """Why a read without --max-bytes stops where it does, as the notes before and after training say it."""
    return f"what {bytes_text(memory)} of available memory allows ({BPE_MEMORY_TEXT}); --max-bytes sets how much"


# Text rarely compresses more than tenfold: a compressed file's size times this bounds the text it holds.
MAX_COMPRESSION = 10


def memory_note(inputs: list[str | Path], max_bytes: int | None) -> str | None:
    """What to tell the user before training when the text read may not fit in memory (`max_bytes`
    given), or when the available memory caps how much is read (None); None when neither applies."""
    memory = memory_available()
    if not memory:
        return None
    if max_bytes:
        text = _text_read(inputs, max_bytes)
        if text * BPE_MEMORY_PER_BYTE > memory:
            return (f"warning: reading {bytes_text(text)} of text (--max-bytes) may need up to "
                    f"{bytes_text(text * BPE_MEMORY_PER_BYTE)} of memory ({BPE_MEMORY_TEXT}) and "
                    f"{bytes_text(memory)} is available")
    elif max_bytes is None and _text_read(inputs, limit := memory_read_limit(memory)) >= limit:
        return f"reading at most {bytes_text(limit)} of text, {memory_cap_text(memory)}"
    return None


def _text_read(inputs: list[str | Path], max_bytes: int) -> int:
    """How much text a read of `max_bytes` takes: all of it when the inputs are smaller (a compressed
    file counted at the most text it can plausibly hold)."""
    paths = [Path(p) for p in inputs]
    if any(not p.is_file() for p in paths):
        return max_bytes
    return min(max_bytes, sum(p.stat().st_size * (MAX_COMPRESSION if is_compressed(p) else 1) for p in paths))


def _train_interruptibly(tok: Tokenizer, texts: Iterator[str], trainer: Any,
                         tick: Callable[[], None] = lambda: None) -> None:
    """`train_from_iterator` in a thread: the library holds Ctrl-C back until training ends (minutes
    to hours), while the main thread waiting here takes it at once and stops the reader; `tick` runs at
    each of its wake-ups."""
    stop = threading.Event()
    failed: list[BaseException] = []

    def feed() -> Iterator[str]:
        for t in texts:
            if stop.is_set():
                raise KeyboardInterrupt
            yield t

    def run() -> None:
        try:
            tok.train_from_iterator(feed(), trainer=trainer)
        except BaseException as e:  # handed to the caller's thread
            failed.append(e)

    thread = threading.Thread(target=run, name="tinyk-bpe", daemon=True)
    try:
        thread.start()  # a Ctrl-C inside start() may come after the thread began to read
        while thread.is_alive():  # short waits: a Ctrl-C the kernel hands another thread is acted on at a wake-up
            thread.join(0.2)
            tick()
    except KeyboardInterrupt:
        stop.set()  # the merges after reading cannot be stopped: they end with the process, or the next call waits
        _INTERRUPTED.append(thread)
        raise
    if failed:
        raise failed[0]


_INTERRUPTED: list[threading.Thread] = []  # trainings Ctrl-C stopped whose merges may still run


def _wait_for_an_interrupted_training() -> None:
    """In a notebook, a training Ctrl-C stopped goes on merging in the background (the library cannot
    stop that): the next one waits for it, before it sizes its read by the memory those merges hold,
    rather than doubling the time and the memory."""
    while _INTERRUPTED:
        t = _INTERRUPTED.pop()
        if t.is_alive():
            print("tinyk: waiting for the tokenizer training Ctrl-C stopped to finish its merges "
                  "(the library cannot stop them)", file=sys.stderr, flush=True)
            while t.is_alive():
                t.join(0.2)


def train_tokenizer(inputs: list[str | Path], out: str | Path, *, vocab_size: int = 6144,
                    normalization: str = "none", max_bytes: int | None = None, field: str = "text",
                    min_frequency: int = 2, force: bool = False, strict: bool = False,
                    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES, show_progress: bool | None = None
                    ) -> dict[str, Any]:
    """Trains a tokenizer on a streamed (optionally truncated) corpus and saves an HF directory.

    Without `max_bytes` it reads as much as the available memory allows (BPE_MEMORY_PER_BYTE); the
    result's `capped_at` and `cap_from_memory` say where reading stopped and why, its `warnings` and
    `notes` what a user should read (see _training_notes). `show_progress`:
    the `tokenizers` bar, which writes to file descriptor 1 past any sys.stdout, by default only
    when that is a terminal (in a pipe, a log or a notebook cell it leaves blank lines).
    """
    paths = check_inputs(inputs)
    if not 256 + len(SPECIAL_TOKENS) <= vocab_size <= MAX_VOCAB:
        raise TinykError(f"--vocab-size must be between {256 + len(SPECIAL_TOKENS)} (256 bytes + special tokens) "
                         f"and {MAX_VOCAB:,}")
    if min_frequency < 0:
        raise TinykError("--min-frequency must be >= 0")
    if max_line_bytes < 1:
        raise TinykError(f"--max-line-bytes must be positive, got {max_line_bytes}")
    check_heads(paths, field=field, max_line_bytes=max_line_bytes)
    _wait_for_an_interrupted_training()
    memory = memory_available()
    auto_cap = max_bytes is None and memory is not None
    if auto_cap:
        max_bytes = memory_read_limit(memory)
    skips = Skips(strict=strict)
    tok = build_tokenizer(normalization)
    bar = fd_shows_a_bar(1) if show_progress is None else show_progress
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=bar,
    )
    stats = {"documents": 0, "characters": 0}
    # In a log or a batch job (no bar): a line a minute, so that a run of many minutes is seen to be alive.
    lines = show_progress is None and not bar
    read = {"done": False}

    # Not `tok`'s own: the trainer holds `tok` while it reads, and a call into it from here would wait forever.
    normalizer = build_tokenizer(normalization).normalizer

    def texts():
        for t in iter_texts(paths, skips, field=field, max_bytes=max_bytes, max_line_bytes=max_line_bytes):
            stats["documents"] += 1
            stats["characters"] += len(t)
            yield from training_pieces(t, normalizer)
        read["done"] = True

    t0 = time.time()
    last_line = time.monotonic()

    def tick() -> None:
        nonlocal last_line
        if lines and time.monotonic() - last_line >= PROGRESS_LINE_S:
            last_line = time.monotonic()
            print(_training_line(stats["documents"], skips.consumed, max_bytes, read["done"], time.time() - t0),
                  file=sys.stderr, flush=True)

    with atomic_dir(out, force=force, inputs=paths, replaces=("a tinyk tokenizer", _is_tokenizer_output)) as tmp:
        # A log stayed empty for a minute. (No cap: capped at the threshold, the read reaches it or not.)
        if lines and _text_read(paths, max_bytes or START_LINE_BYTES) >= START_LINE_BYTES:
            cap = f", at most {bytes_text(max_bytes)} of it" if max_bytes is not None else ""
            on_disk = bytes_text(sum(p.stat().st_size for p in paths))
            print(f"training tokenizer: reading {plural(len(paths), 'files')} ({on_disk} on disk{cap}); a line a "
                  f"minute follows", file=sys.stderr, flush=True)
        _train_interruptibly(tok, texts(), trainer, tick)
        if stats["documents"] == 0:
            raise _no_documents("in the input", skips, max_bytes)
        for i, name in enumerate(SPECIAL_TOKENS):
            assert tok.token_to_id(name) == i, name
        result = {**stats, "vocab_size": tok.get_vocab_size(), "skipped": skips.to_json(),
                  "seconds": round(time.time() - t0, 2),
                  "capped_at": skips.stopped_at, "stopped_before": skips.stopped_before, "not_read": skips.not_read,
                  "cap_from_memory": auto_cap, "memory_available": memory,
                  "read_bytes": skips.consumed, "line_too_long_bytes": skips.long_line_bytes}
        result |= _training_notes(result, vocab_size, min_frequency, max_line_bytes)
        # What it was trained on and how, as a data directory's meta.json records it: the memory cap
        # makes the same command read more or less of a corpus on another machine.
        record = {"tinyk": __version__, "inputs": [str(p) for p in paths], "field": field,
                  "normalization": normalization, "vocab_size_asked": vocab_size, "min_frequency": min_frequency,
                  "max_bytes": max_bytes, "max_line_bytes": max_line_bytes,
                  **{k: result[k] for k in ("vocab_size", "documents", "characters", "capped_at", "stopped_before",
                                            "not_read", "cap_from_memory", "skipped")}}
        with writing(Path(out)):
            save_tokenizer_files(tok, tmp)
            write_json_atomic(tmp / TRAINING_RECORD, record)  # a file name that is not UTF-8 as `shown` prints it
    return result


def _training_notes(r: dict[str, Any], vocab_size: int, min_frequency: int, max_line_bytes: int
                    ) -> dict[str, list[str]]:
    """What a user should know of a training: `warnings` (most of the input skipped; lines that say
    "warning:") and `notes` (a smaller vocabulary than asked, where reading stopped; sentences that
    `tinyk tokenizer train` prints after "note: ", as import_seed_checkpoint's)."""
    warnings, notes = [], []
    long_lines = r["skipped"]["by_reason"].get("line_too_long", 0)
    if warning := mostly_skipped(r["skipped"]["total"], r["documents"], "documents"):
        warnings.append(warning)
    elif r["line_too_long_bytes"] > r["read_bytes"]:  # few records, but most of the text
        warnings.append(f"warning: most of the input was skipped: {plural(long_lines, 'lines')} too long to read "
                        f"({bytes_text(r['line_too_long_bytes'])}, over --max-line-bytes "
                        f"{line_limit_text(max_line_bytes)}) against {bytes_text(r['read_bytes'])} read; a larger "
                        f"--max-line-bytes{' (and --max-bytes)' if r['capped_at'] is not None else ''} reads them")
    if r["vocab_size"] < vocab_size:
        notes.append(f"{r['vocab_size']:,} tokens, not --vocab-size {vocab_size}: the text has no more pairs "
                     f"seen at least --min-frequency {min_frequency} times to merge (more text gives a larger "
                     f"vocabulary)")
    if r["capped_at"] is not None:
        long = f" (not counting {long_lines:,} line(s) too long to read, skipped)" if long_lines else ""
        why = f", {memory_cap_text(r['memory_available'])}" if r["cap_from_memory"] else " (--max-bytes)"
        note = f"read the first {bytes_text(r['capped_at'])} of the input{long}{why}; it stopped before " \
               f"{r['stopped_before']}"
        unread = r["not_read"]
        if unread:  # several sources given in turn: the last ones leave no trace in the vocabulary
            more = f" and {len(unread) - 3:,} more" if len(unread) > 3 else ""
            note += (f" and never opened {', '.join(unread[:3])}{more} (inputs are read in the order given: to "
                     f"train on some of each, give a sample of each or shuffle them together)")
        notes.append(note)
    return {"warnings": warnings, "notes": notes}


def training_pieces(text: str, normalizer: normalizers.Normalizer | None = None) -> Iterator[str]:
    """A document as the BPE trainer is given it: in pieces of at most TRAIN_PIECE_CHARS, since the
    trainer slows with the square of a pre-token's length (a 20,000-character run of Chinese without
    punctuation took 2.3 s, in pieces 0.3 s). A piece ends where a pre-token ends, so the trainer counts
    the words it would count in the whole text (`--normalization nfkc` makes the seed's tokenizer.json
    byte for byte); only a run with no such edge in half a piece's length is cut inside a word. The text
    is normalised before it is cut, as NFKC may join characters across a cut."""
    if len(text) <= TRAIN_PIECE_CHARS:
        yield text
        return
    if normalizer is not None:
        text = normalizer.normalize_str(text)  # NFKC of NFKC text is the same text: the trainer's changes nothing
    yield from pre_token_pieces(text, TRAIN_PIECE_CHARS)


def pre_token_pieces(text: str, size: int, longest: int = 0) -> Iterator[str]:
    """`text` in pieces of at most `size` characters, each ending where a pre-token ends (the last such
    place in the piece's second half), so BPE sees in each the words it sees in the whole. Without one
    there, a piece runs on to the first such place within `longest` characters, or else (given a `longest`)
    ends at the last in its first half; a run of letters with none (no space, punctuation or line break)
    is cut at `size`, inside a word."""
    def edges(scan: range) -> Iterator[int]:
        # A run of letters has none: found by str.isalpha in C, where `pre_token_edge` took Python seconds
        # for each MB of unpunctuated Chinese. (A character only one side knows removes a cut, never adds one.)
        if scan and not text[min(scan[0], scan[-1]) - 1:max(scan[0], scan[-1]) + 2].isalpha():
            yield from (i for i in scan if pre_token_edge(text, i))

    start = 0
    while len(text) - start > size:
        stop = start + size
        # An edge is most often a few characters back.
        edge = next(edges(range(stop - 1, start + max(1, size // 2) - 1, -1)), None) \
            or next(edges(range(stop, min(start + longest, len(text) - 1))), None)
        if edge is None:
            if len(text) - start <= longest:
                break
            edge = next(edges(range(start + max(1, size // 2) - 1, start, -1)), None) if longest else None
        edge = edge or stop
        yield text[start:edge]
        start = edge
    yield text[start:]


def splits_as_gpt2(tok: Tokenizer) -> bool:
    """Whether `tok` splits text into pre-tokens by the GPT-2 pattern alone (tinyk's tokenizers and the
    tutorial's), so `pre_token_edge` knows where its words end; a non-special added token, matched
    across them, would not keep to them."""
    pre = tok.pre_tokenizer
    return (isinstance(pre, pre_tokenizers.ByteLevel) and pre.use_regex and not pre.add_prefix_space
            and all(t.special for t in tok.get_added_tokens_decoder().values()))


def _kind(c: str) -> str:
    """A character's class in the GPT-2 pattern: " " (a space, which joins the word after it), "W" (other
    whitespace), "L" (a letter), "N" (a number), "P" (anything else), or "?" for one newer than Python's
    Unicode tables (CJK Extension H), which may be a letter to the pre-tokenizer's."""
    if c == " ":
        return " "
    if c.isspace() and c not in "\x1c\x1d\x1e\x1f":  # whitespace to Python, not to Unicode
        return "W"
    category = unicodedata.category(c)
    return "?" if category == "Cn" else category[0] if category[0] in "LN" else "P"


def _contraction(text: str, j: int) -> int:
    """The length of the 's, 't, 're, 've, 'm, 'll or 'd that is a pre-token at `j`, else 0: an apostrophe
    after a symbol or a space is part of theirs."""
    if text[j] != "'" or (j > 0 and _kind(text[j - 1]) not in "LNW"):
        return 0
    return next((1 + len(c) for c in _CONTRACTIONS if text.startswith(c, j + 1)), 0)


def pre_token_edge(text: str, i: int) -> bool:
    """Whether text[:i] and text[i:] (0 < i < len(text) - 1) pre-tokenize as the whole text does: where the
    GPT-2 pattern of the ByteLevel pre-tokenizer ends a pre-token (runs of letters, of numbers, of symbols,
    each with one space before it, of whitespace whose last character goes with the word after it, and the
    contractions), but not after a run of whitespace, which a text that ends there keeps whole. On random
    text of these classes it finds every such cut and no other."""
    a, b = _kind(text[i - 1]), _kind(text[i])
    if "?" in (a, b):
        return False
    if b in " W":
        return a not in " W" or _kind(text[i + 1]) not in " W"
    if a == "W":
        return i == 1 or _kind(text[i - 2]) not in " W"
    if a != " " and any(j >= 0 and _contraction(text, j) == i - j for j in (i - 2, i - 3)):
        return True
    if a in (" ", b):
        return False
    return text[i - 1] != "'" or not ((i >= 2 and _kind(text[i - 2]) == "?") or _contraction(text, i - 1))


START_LINE_BYTES = 8 * 2**20  # of input to read, at least, for a line before the first minute's (10 s of work or more)


def _training_line(documents: int, nbytes: int, max_bytes: int | None, read_all: bool, seconds: float) -> str:
    """A progress line of BPE training where no bar is shown: reading has a known end, the merges do
    not (the library reports none, and their pace is far from even: on 200 MB of text the first sixth
    of them took most of the time). `nbytes`: of the input, as `max_bytes` counts them (uncompressed,
    JSON's escapes and keys included)."""
    minutes, secs = divmod(int(seconds), 60)
    read = f"read {plural(documents, 'documents')} ({bytes_text(nbytes)} of input"
    if read_all:
        return f"training tokenizer: {read}); counting and merging pairs, {minutes}:{secs:02d} elapsed"
    of = f" of at most {bytes_text(max_bytes)}" if max_bytes else ""
    return f"training tokenizer: {read}{of}), {minutes}:{secs:02d} elapsed"


def _no_documents(where: str, skips: Skips, max_bytes: int | None) -> TinykError:
    """Why nothing was read: --max-bytes ended inside the first document, or every record read was
    skipped (the reasons say how to fix them: a wrong --field, SFT data, bad lines)."""
    if skips.stopped_at is not None and not skips.total:
        return TinykError(f"no document fits in the first {max_bytes:,} bytes of the input (raise --max-bytes)")
    within = f" (read up to --max-bytes {max_bytes:,})" if skips.stopped_at is not None else ""
    return TinykError(f"no usable documents {where}{within}: {skips.summary() if skips.total else NO_RECORDS}")


CHAT_SAMPLE = [
    {"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
    {"role": "user", "content": "How are you?"},
    {"role": "assistant", "content": "I'm fine, thank you. and you?"},
    {"role": "user", "content": "今天天气怎么样？适合出门吗？"},
]


def eval_tokenizer(path: str | Path, inputs: list[str | Path] | None = None, *,
                   max_bytes: int = 10_000_000, field: str = "text") -> dict[str, Any]:
    """Vocab, special ids, exact round trip and compression on a sample (the first `max_bytes` of
    `inputs`); where a round trip changes the text, the first place and how."""
    tk = load_tokenizer(path)
    chat = render_chat(CHAT_SAMPLE, add_generation_prompt=True)
    samples = [(f"built-in sample {i + 1}", s) for i, s in
               enumerate([chat, "<|im_start|>user\nHello<|im_end|>", "全角标点：，！？；（）…… ＡＢＣ １２３"])]
    chars = nbytes = ntok = docs = 0
    failures, first_failure = 0, None
    skips = Skips()
    if inputs:
        texts = iter_documents(check_inputs(inputs), skips, field=field, max_bytes=max_bytes)
    else:
        texts = iter(samples)
    for where, t in texts:
        # A corpus is measured as `tinyk data` tokenizes it: "<|im_start|>" typed in a document is text.
        ids = tk.encode(t, special=not inputs)
        back = tk.decode(ids)
        if back != t:
            failures += 1
            first_failure = first_failure or _changed(where, t, back)
        docs += 1
        chars += len(t)
        nbytes += len(t.encode("utf-8"))
        ntok += len(ids)
    if inputs and docs == 0:
        raise _no_documents("in the sample to measure", skips, max_bytes)
    fixed = [_changed(where, s, back) for where, s in samples if (back := tk.decode(tk.encode(s))) != s]
    return {
        "path": str(path),
        "vocab_size": tk.vocab_size,
        "special_ids": {name: tk.tok.token_to_id(name) for name in SPECIAL_TOKENS},
        "bos": "<|im_start|>", "eos": "<|im_end|>", "pad": "<|im_end|>",
        "roundtrip_ok": not fixed and failures == 0,
        "normalizes": tk.tok.normalizer is not None,
        # NFKC's loss (full-width text comes back half-width) is by design; another normalizer's is not tinyk's.
        "nfkc": isinstance(tk.tok.normalizer, normalizers.NFKC),
        "roundtrip_failures": failures,
        # beside an input's documents, the built-in samples are checked too
        "builtin_samples": len(samples) if inputs else 0, "builtin_failures": len(fixed) if inputs else 0,
        "first_failure": first_failure or next(iter(fixed), None),
        "documents": docs,
        "capped_at": skips.stopped_at,
        "skipped": skips.to_json(),
        "chars_per_token": round(chars / max(ntok, 1), 3),
        "bytes_per_token": round(nbytes / max(ntok, 1), 3),
        "chat_sample": chat,
    }


def _changed(where: str, text: str, back: str) -> str:
    """Where a round trip first changed `text`, and how: "doc.jsonl:3, character 12: 'Ｈello' came back
    as 'Hello'"."""
    at = next((i for i, (a, b) in enumerate(zip(text, back, strict=False)) if a != b), min(len(text), len(back)))
    return (f"{where}, character {at + 1:,}: {short_repr(text[at:at + 20], 20)} came back as "
            f"{short_repr(back[at:at + 20], 20)}")


def round_trips(r: dict[str, Any]) -> bool:
    """An `eval_tokenizer` result's round trip is as meant: exact, or not by design (NFKC)."""
    return r["roundtrip_ok"] or r["nfkc"]


def compared_rows(results: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    """`eval_tokenizer` results side by side, for `units.format_table`: on the same text, fewer tokens means
    a longer context in words and a cheaper step per character, paid for with a larger embedding."""
    rows = [("vocab size", *(f"{r['vocab_size']:,}" for r in results)),
            ("round trip", *("exact" if r["roundtrip_ok"] else "NFKC" if round_trips(r) else "FAILED"
                             for r in results)),
            ("chars/token", *(f"{r['chars_per_token']:.3f}" for r in results)),
            ("bytes/token", *(f"{r['bytes_per_token']:.3f}" for r in results)),
            ("tokens vs first", *(f"{results[0]['bytes_per_token'] / r['bytes_per_token']:.1%}" for r in results))]
    return [(*row, "") for row in rows]  # no baseline column
