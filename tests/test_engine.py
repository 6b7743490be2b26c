"""The generation engine: cached batched decoding, sampling, stopping, streaming, and the CLI on top."""

from __future__ import annotations

import copy
import io
import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from tinyk.chat import CHAT_HELP, chat_session
from tinyk.checkpoint import load_model
from tinyk.cli import main
from tinyk.engine import (
    ContextLengthError,
    Detokenizer,
    Engine,
    Request,
    SamplingParams,
    Scheduler,
    _finite_rows,
    _ParamTensors,
    cpu_bf16_packing_works,
    int8_works,
    least_tokens,
    non_finite,
    quantize_int8,
    utf8_size,
)
from tinyk.errors import Stopped, Terminated, TinykError
from tinyk.model import KVCache, ModelConfig, Transformer
from tinyk.tokenizer import DEFAULT_SYSTEM_PROMPT, MODEL_PROMPT, NOT_UTF8, load_tokenizer, render_chat

GREEDY = SamplingParams(temperature=0, repetition_penalty=1.0, max_new_tokens=12, ignore_eos=True)
PROMPTS = ["我们今天", "The quick brown fox jumps over the lazy dog.", "中国的首都是北京。你喜欢吃苹果吗？这本书", "",
           "1+1=2", "天气很好！你喜欢吃苹果吗？这本书非常有意思：作者写得很好。"]


class Terminal(io.StringIO):
    """A typing person's stdin, or a terminal's stdout."""
    def isatty(self) -> bool:
        return True


@pytest.fixture(scope="module")
def engine(nano_model_dir) -> Engine:
    return Engine.from_dir(nano_model_dir)


def recompute_greedy(model, ids: list[int], n: int) -> list[int]:
    """The reference: the whole sequence through the model for every token, no cache, no batching."""
    out: list[int] = []
    device = next(model.parameters()).device
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids + out], device=device))
            out.append(int(logits[0, -1].argmax()))
    return out


@pytest.fixture(scope="module")
def reference(engine) -> list[list[int]]:
    return [recompute_greedy(engine.model, engine.encode(p), GREEDY.max_new_tokens) for p in PROMPTS]


@pytest.mark.parametrize("max_batch", [16, 2])
def test_cached_batched_decoding_equals_full_recomputation(engine, reference, max_batch):
    """Unequal prompts share one left-padded cache; with max_batch 2 later prompts join a running batch."""
    engine.max_batch = max_batch
    try:
        out = engine.generate(PROMPTS, GREEDY)
    finally:
        engine.max_batch = 16
    assert [c.token_ids for c in out] == reference
    for p, c in zip(PROMPTS, out, strict=True):
        assert c.finish_reason == "length" and c.completion_tokens == GREEDY.max_new_tokens
        assert c.prompt_tokens == len(engine.encode(p))
        assert c.text == engine.tok.decode(c.token_ids, skip_special_tokens=True)


def test_a_long_list_of_prompts_makes_each_request_as_a_row_frees_up(engine, monkeypatch, reference):
    """Every request made at once held 1.6 GB for a file of 300,000 prompts (`tinyk generate`): each is
    made when it joins the batch, yet every prompt is checked before any is decoded."""
    from tinyk import engine as engine_module

    made, real = [], engine_module.Request.__init__
    monkeypatch.setattr(engine_module.Request, "__init__", lambda *a, **kw: made.append(1) or real(*a, **kw))
    monkeypatch.setattr(engine, "max_batch", 2)
    out = engine.completions(PROMPTS * 3, GREEDY)
    assert next(out).token_ids == reference[0] and len(made) <= 4, len(made)
    assert [c.token_ids for c in out] == (reference * 3)[1:] and len(made) == len(PROMPTS) * 3
    with pytest.raises(ContextLengthError):  # the last prompt too long: refused before the first is decoded
        next(engine.completions([*PROMPTS, "我们" * engine.context_length], GREEDY))
    assert len(made) == len(PROMPTS) * 3


def test_prompts_of_unequal_length_joining_a_running_batch_get_their_answers_alone(engine):
    """When two rows finish, the next prompts are prefilled together, left-padded to each other, and
    merged into the running cache: their padding stays masked there, so each answer and its logprobs
    are the ones the prompt gets alone."""
    params = [replace(GREEDY, max_new_tokens=n, logprobs=0) for n in (2, 2, 12, 12, 12, 12)]
    alone = [engine.generate([p], sp)[0] for p, sp in zip(PROMPTS, params, strict=True)]
    before, engine.max_batch = engine.max_batch, 3
    try:
        out = engine.generate(PROMPTS, params)
    finally:
        engine.max_batch = before
    for a, c in zip(alone, out, strict=True):
        assert c.token_ids == a.token_ids
        assert [t.logprob for t in c.logprobs] == pytest.approx([t.logprob for t in a.logprobs], abs=1e-5)


def test_the_padding_of_a_batched_prompt_is_not_a_token_it_has_seen(engine, monkeypatch):
    """The repetition penalty falls on the tokens of a row's own prompt and reply; a short prompt
    left-padded (with <|im_end|>) beside a long one has not seen the padding."""
    seen_at_prefill = []
    sample = engine.sample

    def spy(logits, seen, params, rngs):
        if not seen_at_prefill:
            seen_at_prefill.append(seen.clone())
        return sample(logits, seen, params, rngs)

    params = replace(GREEDY, max_new_tokens=4, repetition_penalty=1.3)
    short, long = PROMPTS[0], PROMPTS[5]
    alone = engine.generate([short], params)[0].token_ids
    monkeypatch.setattr(engine, "sample", spy)
    out = engine.generate([short, long], params)
    ids = [engine.encode(p) for p in (short, long)]
    assert len(ids[0]) < len(ids[1]) and engine.tok.pad_id not in ids[0]
    assert [set(row.nonzero().flatten().tolist()) for row in seen_at_prefill[0]] == [set(i) for i in ids]
    assert out[0].token_ids == alone


def test_the_repetition_penalty_is_hfs_on_the_prompt_and_the_reply(engine):
    """Greedy decoding under a penalty is HF's RepetitionPenaltyLogitsProcessor over the whole sequence,
    full recomputation each step: the tokens generated so far count as seen, as the prompt's do."""
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    penalty = RepetitionPenaltyLogitsProcessor(5.0)  # strong enough that a reply that repeats itself shows
    prompts = PROMPTS[:3]
    want = []
    with torch.no_grad():
        for ids in map(engine.encode, prompts):
            for _ in range(12):
                x = torch.tensor([ids])
                ids = [*ids, int(penalty(x, engine.model(x)[:, -1]).argmax())]
            want.append(ids[-12:])
    params = replace(GREEDY, repetition_penalty=5.0, max_new_tokens=12, ignore_eos=True)
    assert [c.token_ids for c in engine.generate(prompts, params)] == want


def test_masked_attention_repeats_grouped_kv_heads_as_cuda_needs(engine, reference, monkeypatch):
    """On CUDA only flash fuses grouped K/V heads, and it takes no mask: the engine's masked attention
    asks for a fused kernel without flash, repeats the heads (else SDPA's math kernel stores every
    attention matrix), and decodes the same tokens."""
    from tinyk import model as model_mod

    asked: list[bool] = []

    def fuses_with_flash_only(device_type: str, dtype: torch.dtype, has_flash: bool = True) -> bool:
        asked.append(has_flash)
        return has_flash

    monkeypatch.setattr(model_mod, "sdpa_fuses_gqa", fuses_with_flash_only)
    assert engine.model.config.n_heads != engine.model.config.n_kv_heads
    out = engine.generate(PROMPTS, GREEDY)
    assert asked and not any(asked)
    assert [c.token_ids for c in out] == reference


def test_per_sequence_stopping_leaves_the_others_untouched(engine, reference):
    """Rows stop at different steps (stop token, stop string, budget) and leave the batch; the rest go on."""
    stop_token = reference[0][3]
    stop_text = engine.tok.decode(reference[2][4:6])
    params = [replace(GREEDY, stop_token_ids=[stop_token]), replace(GREEDY, max_new_tokens=2),
              replace(GREEDY, stop=[stop_text]), GREEDY, replace(GREEDY, max_new_tokens=7), GREEDY]
    out = engine.generate(PROMPTS, params)
    first = reference[0].index(stop_token)
    assert out[0].token_ids == reference[0][:first + 1] and out[0].finish_reason == "stop"
    assert out[0].text == engine.tok.decode(reference[0][:first])
    assert out[1].token_ids == reference[1][:2] and out[1].finish_reason == "length"
    full = engine.tok.decode(reference[2])
    assert out[2].finish_reason == "stop" and out[2].text == full[:full.index(stop_text)]
    assert stop_text not in out[2].text
    assert out[4].token_ids == reference[4][:7]
    assert out[3].token_ids == reference[3] and out[5].token_ids == reference[5]


@pytest.mark.parametrize("special", ["<|im_end|>", "<|im_start|>", "</s>"])
def test_special_tokens_end_a_sequence_unless_ignored_and_are_never_text(engine, special):
    # A random model with tied embeddings repeats its last token, so a prompt ending in a special
    # token makes it say that token: EOS ends a reply, and so does <|im_start|> (a new turn).
    token = engine.tok.tok.token_to_id(special)
    prompt = engine.tok.encode("你好") + [token]
    assert recompute_greedy(engine.model, prompt, 1) == [token], "the fixture model no longer repeats its last token"
    c = engine.generate([prompt, "我们今天"], replace(GREEDY, ignore_eos=False))
    assert (c[0].text, c[0].token_ids, c[0].finish_reason, c[0].completion_tokens) == ("", [token], "stop", 1)
    assert c[1].completion_tokens == GREEDY.max_new_tokens
    c = engine.generate([prompt], replace(GREEDY, max_new_tokens=3))[0]
    assert c.token_ids == [token] * 3 and c.finish_reason == "length" and c.text == ""
    streamed = "".join(engine.stream(prompt, replace(GREEDY, max_new_tokens=3)))
    assert streamed == "" and special not in streamed


def test_token_budget_is_capped_by_the_context_window(engine):
    ctx = engine.context_length
    c, budget = engine.generate([[5] * (ctx - 3), [5] * (ctx - 4)], replace(GREEDY, max_new_tokens=3))
    assert c.completion_tokens == 3 and c.finish_reason == "length" and not c.cut_by_context  # the budget asked
    assert (budget.completion_tokens, budget.finish_reason, budget.cut_by_context) == (3, "length", False)
    c = engine.generate([[5] * (ctx - 3)], replace(GREEDY, max_new_tokens=100))[0]
    assert c.completion_tokens == 3 and c.finish_reason == "length" and c.cut_by_context
    with pytest.raises(ContextLengthError, match="context window"):
        engine.generate([[5] * ctx], GREEDY)


@pytest.mark.parametrize("bad", [
    dict(temperature=-0.1), dict(top_k=-1), dict(top_p=-0.1), dict(top_p=1.5), dict(min_p=2.0),
    dict(repetition_penalty=0.0), dict(repetition_penalty=1e-40), dict(repetition_penalty=11), dict(max_new_tokens=0),
    dict(max_new_tokens=2.5), dict(temperature=float("nan")),
    dict(seed="1"), dict(stop=[""]), dict(stop="abc"), dict(temperature=True), dict(logprobs=21),
    dict(logprobs=-1), dict(prompt_logprobs=True), dict(prompt_logprobs=1.0),
])
def test_bad_sampling_params_are_one_line_errors(bad):
    with pytest.raises(TinykError, match="must be"):
        SamplingParams(**bad)


def test_bad_prompts(engine):
    with pytest.raises(TinykError, match="outside the vocabulary"):
        engine.generate([[1, engine.vocab_size]], GREEDY)
    with pytest.raises(TinykError, match="string or a list of token ids"):
        engine.generate([3.5], GREEDY)
    with pytest.raises(TinykError, match="non-empty list"):
        engine.chat([[]], GREEDY)
    with pytest.raises(TinykError, match="role"):
        engine.chat([[{"role": "robot", "content": "hi"}]], GREEDY)
    # OpenAI's newer name for the system role, as in the template, the server and SFT data.
    msgs = [{"role": "system", "content": "你是助手"}, {"role": "user", "content": "你好"}]
    assert engine.chat_ids([{**msgs[0], "role": "developer"}, msgs[1]]) == engine.chat_ids(msgs)
    with pytest.raises(TinykError,
                       match=r"2 sets of sampling params for 1 prompt \(give one per prompt, or one for all\)$"):
        engine.generate(["a"], [GREEDY, GREEDY])


def test_chat_uses_the_template_with_the_generation_prompt(engine):
    msgs = [{"role": "user", "content": "你好"}]
    assert engine.tok.apply_chat_template(msgs, True, None) == render_chat(msgs, add_generation_prompt=True)
    with_system = engine.tok.apply_chat_template(msgs, True, DEFAULT_SYSTEM_PROMPT)
    assert with_system == f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n" \
                          "<|im_start|>assistant\n"
    assert engine.chat([msgs], GREEDY, default_system=None)[0].token_ids == \
        engine.generate([engine.tok.apply_chat_template(msgs, True, None)], GREEDY)[0].token_ids
    # By default a conversation is prompted as SFT data was tokenized, system message first.
    assert engine.chat([msgs], GREEDY)[0].token_ids == engine.generate([with_system], GREEDY)[0].token_ids
    with pytest.raises(TypeError, match="default_sytem"):  # a misspelt option is an error, not ignored
        engine.chat([msgs], GREEDY, default_sytem=None)


def test_a_text_prompt_starts_a_document_as_in_tinyk_generate(engine, nano_model_dir, capsys):
    """From Python as from the CLI: text gets <|im_start|> first (once, even when it spells it out)."""
    text, params = "北京大学是", replace(GREEDY, max_new_tokens=6, ignore_eos=False)
    c = engine.generate([text], params)[0]
    assert c.prompt_tokens == 1 + len(engine.tok.encode(text))
    assert engine.encode(text) == engine.encode("<|im_start|>" + text) == [engine.tok.bos_id, *engine.tok.encode(text)]
    assert engine.encode(text, bos=False) == engine.tok.encode(text)
    assert engine.encode("") == engine.encode([]) == [engine.tok.bos_id]
    with pytest.raises(TinykError,
                       match=r"^an empty prompt has nothing to continue without <\|im_start\|> \(bos=False\)$"):
        engine.encode("", bos=False)  # it was quietly <|im_start|> all the same
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(nano_model_dir), "--prompt", text, "--temperature", "0",
              "--repetition-penalty", "1", "--max-new-tokens", "6", "--json"])
    assert json.loads(capsys.readouterr().out)["text"] == c.text == "".join(engine.stream(text, params))


def test_generate_says_when_the_context_window_cut_the_text_short(engine, nano_model_dir, capsys):
    """Asked for 50 tokens with 3 left in the window, one streamed sample said nothing of why it
    stopped at 3 (chat did, and several samples' headers did)."""
    text = engine.tok.decode(engine.tok.encode("我们" * 200)[: engine.context_length - 4])
    assert len(engine.encode(text)) == engine.context_length - 3  # <|im_start|> first
    params = replace(GREEDY, max_new_tokens=50, ignore_eos=False)
    c = engine.generate([text], params)[0]
    assert (c.finish_reason, c.completion_tokens) == ("length", 3)  # the fixture model does not stop sooner
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(nano_model_dir), "--prompt", text, "--temperature", "0",
              "--repetition-penalty", "1", "--max-new-tokens", "50"])
    out, err = capsys.readouterr()
    assert out == text + c.text + "\n"
    assert err == f"(cut at 3 tokens: the prompt and the text fill the model's {engine.context_length}-token context)\n"
    with pytest.raises(SystemExit):  # the budget asked for: nothing to explain
        main(["generate", "--model", str(nano_model_dir), "--prompt", text, "--temperature", "0",
              "--repetition-penalty", "1", "--max-new-tokens", "2"])
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("json_out", [False, True])
def test_every_generate_mode_says_which_sample_the_context_cut_short(engine, nano_model_dir, capsys, json_out):
    """With several prompts or --json, a sample the context ended was told from one --max-new-tokens
    ended only by its token count; now stderr names it, and the JSON has cut_by_context."""
    text = engine.tok.decode(engine.tok.encode("我们" * 200)[: engine.context_length - 4])
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(nano_model_dir), "--prompt", "天气", "--prompt", text, "--temperature", "0",
              "--repetition-penalty", "1", "--max-new-tokens", "5", *(["--json"] if json_out else [])])
    out, err = capsys.readouterr()
    assert err == f"(sample 2 cut at 3 tokens: the prompt and the text fill the model's " \
                  f"{engine.context_length}-token context)\n"
    if json_out:
        rows = [json.loads(line) for line in out.splitlines()]
        assert [(r["sample"], r["finish_reason"], r["completion_tokens"], r.get("cut_by_context")) for r in rows] == \
            [(1, "length", 5, None), (2, "length", 3, True)]  # the key only where the context cut it
    else:
        assert "--- sample 2 (3 tokens, length) ---" in out
    with pytest.raises(SystemExit):  # one prompt, --json: the same note
        main(["generate", "--model", str(nano_model_dir), "--prompt", text, "--temperature", "0",
              "--repetition-penalty", "1", "--max-new-tokens", "5", "--json"])
    out, err = capsys.readouterr()
    assert json.loads(out)["cut_by_context"] is True and err.startswith("(sample 1 cut at 3 tokens")
    with pytest.raises(SystemExit):  # a terminal would take U+009B for CSI: escaped, as JSON escapes ESC
        main(["generate", "--model", str(nano_model_dir), "--prompt", "a\x9b31m\x7f", "--max-new-tokens", "1",
              "--json"])
    out = capsys.readouterr().out
    assert "\\u009b31m\\u007f" in out and json.loads(out)["prompt"] == "a\x9b31m\x7f"


@pytest.mark.parametrize("samples", [1, 2])
def test_control_characters_reach_a_terminal_escaped_and_a_pipe_as_they_are(nano_model_dir, capsys, monkeypatch,
                                                                           samples):
    """A model (an untrained one above all) can write any character: ESC [2J clears the screen, others switch
    the terminal's character set. A terminal shows them escaped; a file or pipe gets the text as it is."""
    from tinyk.errors import for_terminal

    prompt = "我们\x1b[2J\x07\t好\n"
    args = ["generate", "--model", str(nano_model_dir), *["--prompt", prompt] * samples, "--max-new-tokens", "2"]
    for tty in (True, False):
        monkeypatch.setattr(sys.stdout, "isatty", lambda tty=tty: tty)
        with pytest.raises(SystemExit):
            main(args)
        out = capsys.readouterr().out
        assert ("我们\\x1b[2J\\x07\t好\n" in out) == tty and (prompt in out) != tty and ("\x1b" in out) != tty

    # C1's CSI (\x9b) starts escape sequences too; line breaks and tabs are the text's own.
    assert for_terminal("\x9b\x7f\r\n\t", Terminal()) == "\\x9b\\x7f\r\n\t"
    assert for_terminal("\x9b\x7f\r\n\t", io.StringIO()) == "\x9b\x7f\r\n\t"


def test_repeated_prompts_with_one_seed_give_different_reproducible_samples(engine, nano_model_dir, capsys):
    """As the tutorial's num_samples: prompt i of a batch samples with seed + i, as it would alone."""
    params = SamplingParams(temperature=1.5, top_k=0, top_p=1.0, max_new_tokens=8, seed=7, ignore_eos=True)
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(nano_model_dir), *["--prompt", "我们"] * 3, "--seed", "7", "--temperature",
              "1.5", "--top-k", "0", "--top-p", "1", "--max-new-tokens", "8", "--json"])
    texts = [json.loads(line)["text"] for line in capsys.readouterr().out.splitlines()]
    alone = [engine.generate(["我们"], replace(params, seed=7 + i))[0].text for i in range(3)]
    assert texts == alone and len(set(texts)) == 3


def test_ids_past_the_tokenizer_are_never_sampled(engine):
    """An imported model may pad its vocabulary past the tokenizer's: those ids decode to nothing."""
    cfg = replace(engine.model.config, vocab_size=engine.tok.vocab_size + 64)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight[engine.tok.vocab_size:] = model.lm_head.weight[5] * 50  # the padding rows win
    padded = Engine(model, engine.tok)
    for params in (GREEDY, SamplingParams(temperature=2.0, top_k=0, top_p=1.0, max_new_tokens=12, seed=1,
                                          ignore_eos=True)):
        out = padded.generate(PROMPTS, params)
        assert all(t < engine.tok.vocab_size for c in out for t in c.token_ids)
        assert all(c.completion_tokens == 12 for c in out)


def test_stream_deltas_join_to_the_generated_text(engine):
    params = SamplingParams(max_new_tokens=40, seed=3, ignore_eos=True)
    deltas = list(engine.stream("我们今天", params))
    assert "".join(deltas) == engine.generate(["我们今天"], params)[0].text
    assert len(deltas) > 1


def test_detokenizer_never_splits_a_character_or_leaks_a_stop_string(tok_dir):
    from tinyk.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_dir)
    text = "好中文😀再见"
    ids = tok.encode(text)
    assert len(ids) > len(text), "the test needs characters split over several tokens"
    d = Detokenizer(tok, [])
    deltas = [d.add(i) for i in ids] + [d.flush()]
    assert "".join(deltas) == text and not any("\ufffd" in x for x in deltas)
    d = Detokenizer(tok, ["文😀"])
    deltas = [d.add(i) for i in ids] + [d.flush()]
    assert d.stopped and d.text == "好中" and "".join(deltas) == "好中"


def test_a_detokenizer_decodes_each_token_with_only_the_ids_since_its_last_whole_character(tok_dir, monkeypatch):
    """Its text is what decoding every id at once gives, invalid bytes, split characters and special
    tokens included, yet each token decodes only the few ids since the text last ended on a whole
    character: decoding them all again per token made a 4,096-token reply cost seconds of the engine
    thread."""
    import random

    from tinyk.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_dir)
    tok.tok.add_special_tokens(["<tool>"])  # a special token of a tokenizer's own, between a character's bytes too
    tool = tok.tok.token_to_id("<tool>")
    decoded: list[int] = []
    decode = tok.decode
    monkeypatch.setattr(tok, "decode", lambda ids, **kw: decoded.append(len(ids)) or decode(ids, **kw))
    rng = random.Random(0)
    for _ in range(40):
        ids = [tool if rng.random() < 0.1 else rng.randrange(tok.vocab_size) for _ in range(rng.randint(100, 300))]
        for cut_short in (False, True):
            d, decoded[:] = Detokenizer(tok, []), []
            text = "".join(d.add(i) for i in ids) + d.flush(cut_short)
            full = decode(ids, skip_special_tokens=True)
            assert text == (full[:-1] if cut_short and tok.ends_mid_character(ids) else full)
            assert sum(decoded) < 3 * len(ids), (sum(decoded), len(ids))


def test_the_tokens_a_detokenizer_has_shown_are_exactly_those_behind_its_text(tok_dir):
    """What a stream sends each chunk's logprobs by: the tokens whose bytes the text sent so far holds,
    not one whose character is unfinished or whose text may begin a stop string."""
    from tinyk.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_dir)
    ids = tok.encode("好中文😀再见好中文")
    for stop in ([], ["再见好"], ["见好中x"]):
        d, sent, lagged = Detokenizer(tok, stop), "", False
        for i in ids:
            sent += d.add(i)
            shown = tok.decode(ids[:d.covered()])
            assert sent.startswith(shown) and (shown == sent or stop), (stop, sent, shown)
            lagged |= d.covered() < len(d.ids)
        assert lagged  # the emoji's first bytes wait for its last, and a stop string's start for the rest
        assert sent + d.flush() == ("好中文😀" if stop == ["再见好"] else "好中文😀再见好中文")
        if stop != ["再见好"]:
            assert d.covered() == len(ids)


def test_a_stop_string_holding_a_replacement_character_waits_for_whole_characters(tok_dir):
    """Before a character's last byte arrives its decoded text ends in U+FFFD: no stop string there."""
    from tinyk.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_dir)
    d = Detokenizer(tok, ["\ufffd"])
    deltas = [d.add(i) for i in tok.encode("好中文😀再见")] + [d.flush()]
    assert not d.stopped and "".join(deltas) == "好中文😀再见"


def test_the_held_back_end_of_a_reply_is_the_longest_start_of_a_stop_string():
    """Only the places a stop string's first character stands are tried; the answer is still the
    longest end of the text that begins a stop string (a whole one is a hit, found before), as trying
    every length gives."""
    import random

    rng = random.Random(0)
    for _ in range(3000):
        stops = ["".join(rng.choices("ab文", k=rng.randint(1, 6))) for _ in range(rng.randint(1, 4))]
        text = "".join(rng.choices("ab文c", k=rng.randint(0, 12)))
        d = Detokenizer(None, stops)
        every_length = next((k for k in range(min(d.max_stop - 1, len(text)), 0, -1)
                             if any(s.startswith(text[-k:]) and k < len(s) for s in stops)), 0)
        assert d._partial_stop(text) == every_length, (stops, text)


def test_a_character_cut_by_max_tokens_is_dropped_not_shown_as_a_replacement(engine):
    ids = engine.tok.encode("好😀")
    cut = len(engine.tok.encode("好")) + 1  # the emoji's first byte only
    assert engine.tok.decode(ids[:cut]) == "好\ufffd"
    for stream, stop in ((True, []), (False, []), (False, ["x"])):
        req = Request(engine, [engine.tok.bos_id], replace(GREEDY, max_new_tokens=cut, stop=stop), stream)
        deltas = [req.accept(i) for i in ids[:cut]]
        c = req.completion()
        shown = "好" if stream or stop else ""  # text is decoded as it goes only when streamed or stop-checked
        assert (c.finish_reason, c.text, "".join(deltas)) == ("length", "好", shown), (stream, stop)
        # So does a reply cancelled mid-character (a client that left, a server error).
        req = Request(engine, [engine.tok.bos_id], replace(GREEDY, stop=stop), stream)
        shown = "".join(req.accept(i) for i in ids[:cut]) + req.end("cancelled")
        assert req.completion().text == "好" and shown == ("好" if stream or stop else "")
        # A U+FFFD the model wrote as a whole character, ending the reply itself, stays.
        req = Request(engine, [engine.tok.bos_id], replace(GREEDY, ignore_eos=False, stop=stop), stream)
        for i in [*engine.tok.encode("好\ufffd"), engine.tok.eos_id]:
            req.accept(i)
        assert (req.completion().finish_reason, req.completion().text) == ("stop", "好\ufffd")


def _byte_token(tok, b: int) -> int:
    """The id of the byte-level token that stands for the single byte `b`."""
    return next(i for i in range(tok.vocab_size) if tok.piece(i) == bytes([b]))


def test_bytes_that_begin_no_character_show_as_they_come_and_are_kept_when_cut(engine):
    """An undertrained model emits stray bytes: a continuation byte alone is U+FFFD for good, so a
    stream shows it at once and a reply cut by max_tokens keeps every one (as decoding all the ids
    does); only the first bytes of a character still to come are held back, or dropped when cut."""
    tok = engine.tok
    stray, lead = _byte_token(tok, 0x8E), _byte_token(tok, 0xE4)
    good = tok.encode("好")
    assert tok.ends_mid_character([*good, lead]) and not tok.ends_mid_character([*good, stray])
    assert tok.ends_mid_character([lead, tok.eos_id]) and not tok.ends_mid_character([lead, *good])
    # ED A0..BF begins only a UTF-16 surrogate: Python's decoder waits on it, transformers shows U+FFFD at once.
    ed, bd = _byte_token(tok, 0xED), _byte_token(tok, 0xBD)
    assert tok.ends_mid_character([ed]) and not tok.ends_mid_character([ed, bd]) \
        and tok.decode([ed, bd]) == "\ufffd" * 2
    for stream in (True, False):
        req = Request(engine, [tok.bos_id], replace(GREEDY, max_new_tokens=len(good) + 2), stream)
        deltas = [req.accept(i) for i in [*good, stray, stray]]
        assert req.completion().text == "好\ufffd\ufffd"
        if stream:
            assert deltas[-2:] == ["\ufffd", "\ufffd"]
        req = Request(engine, [tok.bos_id], replace(GREEDY, max_new_tokens=3), stream)
        shown = "".join(req.accept(i) for i in [stray, stray, lead])
        assert req.completion().text == "\ufffd\ufffd" and shown == ("\ufffd\ufffd" if stream else "")


def test_a_prompt_far_too_long_is_refused_before_it_is_tokenized(engine, monkeypatch):
    ctx, most = engine.context_length, engine.tok.max_token_bytes
    longest = max(range(engine.vocab_size), key=lambda i: engine.tok.token_bytes[i])
    fits = engine.tok.decode([longest]) * (ctx - 2) + "<|im_start|>"  # the most bytes ctx - 1 tokens can hold
    assert most >= len("<|im_start|>") and len(fits.encode()) // most == ctx - 2
    assert len(engine.encode(fits, bos=False)) < ctx
    monkeypatch.setattr(engine.tok, "encode", lambda *a, **k: pytest.fail("tokenized"))
    with pytest.raises(ContextLengthError, match="at least"):
        engine.encode("字" * (ctx * most))
    with pytest.raises(ContextLengthError, match="at least"):
        engine.check_fits(["a" * 10, "b" * (ctx * most)])
    engine.check_fits([fits])


def logits_for(values: list[float]) -> torch.Tensor:
    return torch.tensor([values])


class Rng:
    def __init__(self, u: float):
        self.u = u

    def random(self) -> float:
        return self.u


class Row:
    def __init__(self, **kw):
        self.params = SamplingParams(**kw)


def sample(values: list[float], u: float, seen: list[int] = (), **kw) -> int:
    s = torch.zeros(1, len(values), dtype=torch.bool)
    s[0, list(seen)] = True
    p = _ParamTensors([Row(**kw)], torch.device("cpu"))
    return int(Engine.sample(logits_for(values), s, p, [Rng(u)])[0])


def test_sampling_filters():
    probs = [0.5, 0.3, 0.15, 0.05]
    logits = [float(torch.tensor(x).log()) for x in probs]
    plain = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0)
    # inverse-CDF draws: u walks through the cumulative probabilities 0.5, 0.8, 0.95, 1.0
    assert [sample(logits, u, **plain) for u in (0.1, 0.6, 0.9, 0.99)] == [0, 1, 2, 3]
    assert sample(logits, 0.99, **{**plain, "top_k": 2}) == 1
    assert sample(logits, 0.99, **{**plain, "top_p": 0.8}) == 1  # 0.5 + 0.3 reaches top_p
    assert sample(logits, 0.99, **{**plain, "top_p": 0.81}) == 2
    assert sample(logits, 0.99, **{**plain, "top_p": 0.0}) == 0  # OpenAI's top_p 0: the most likely token
    assert sample(logits, 0.99, **{**plain, "min_p": 0.5}) == 1  # 0.15 < 0.5 * 0.5
    assert [sample(logits, u, **{**plain, "min_p": 1.0}) for u in (0.0, 0.5, 0.99)] == [0, 0, 0]  # never none kept
    assert sample(logits, 0.99, **{**plain, "temperature": 0.0}) == 0
    assert sample([2.0, 1.9, -1.0], 0.0, seen=[0], **{**plain, "temperature": 0.0, "repetition_penalty": 1.1}) == 1
    assert sample([-1.0, -1.05, -3.0], 0.0, seen=[0], **{**plain, "temperature": 0.0,
                                                           "repetition_penalty": 1.1}) == 1
    # low temperature sharpens: the top token takes almost all the mass
    assert sample(logits, 0.99, **{**plain, "temperature": 0.05}) == 0
    # random() can return 1 - 2**-26, which is 1.0 in float32: still only tokens the filters kept
    top = 1 - 2 ** -26
    assert [sample(logits, top, **{**plain, **f}) for f in ({"top_k": 1}, {"top_p": 0.5}, {"min_p": 0.9}, {})] == \
        [0, 0, 0, 3]
    # Draws keep float64's resolution: a tail of mass 1e-10 is drawn by the top 1e-10 of draws, not the top 3e-8.
    peaked = [30.0] + [0.0] * 999
    assert [sample(peaked, u, **plain) > 0 for u in (1 - 2 ** -26, 1 - 2 ** -40)] == [False, True]


def test_seeded_sampling_is_reproducible_whatever_the_batch(engine):
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=16, seed=7, ignore_eos=True)
    alone = engine.generate(["我们今天"], params)[0].token_ids
    batched = engine.generate(["天气很好", "我们今天", "The quick"], [replace(params, seed=1), params, GREEDY])
    assert batched[1].token_ids == alone
    other = engine.generate(["我们今天"], replace(params, seed=8))[0].token_ids
    assert other != alone
    assert engine.generate(["我们今天"], replace(params, top_k=1))[0].token_ids == \
        engine.generate(["我们今天"], replace(GREEDY, max_new_tokens=16))[0].token_ids
    # A k past any vocabulary (past int64, too) is "off", and fails no request batched with it.
    assert [r.token_ids for r in engine.generate(["我们今天"] * 2, [replace(params, top_k=2**70), params])] == \
        [alone, alone]


def test_logprobs_are_the_models_own_whatever_the_batch_and_sampling(engine):
    """Each generated and prompt token's log-probability and top alternatives equal a full recomputation
    of log_softmax over the whole sequence, in a batch mixing rows that ask for them with rows that don't;
    asking changes no sampled token."""
    sampled = SamplingParams(temperature=0.9, max_new_tokens=10, seed=3, ignore_eos=True)
    asking = [replace(sampled, logprobs=5, prompt_logprobs=2), replace(GREEDY, logprobs=0),
              replace(sampled, seed=4, prompt_logprobs=20)]
    prompts = ["我们今天", "The quick brown fox", "天气很好！你喜欢吃苹果吗？", "1+1="]
    params = [asking[0], GREEDY, asking[1], asking[2]]
    done = engine.generate(prompts, params)
    plain = engine.generate(prompts, [replace(p, logprobs=None, prompt_logprobs=None) for p in params])
    assert [c.token_ids for c in done] == [c.token_ids for c in plain]
    assert done[1].logprobs is None and done[1].prompt_logprobs is None
    for prompt, p, c in zip(prompts, params, done, strict=True):
        ids = engine.encode(prompt)
        with torch.no_grad():
            ref = engine.model(torch.tensor([ids + c.token_ids]))[0].float().log_softmax(-1)
        for name, n, got, first in (("logprobs", p.logprobs, c.logprobs, len(ids)),
                                    ("prompt_logprobs", p.prompt_logprobs, c.prompt_logprobs, 1)):
            if n is None:
                assert got is None, name
                continue
            want_ids = (c.token_ids if name == "logprobs" else ids[1:])
            if name == "prompt_logprobs":
                assert got[0] is None
                got = got[1:]
            assert [t.token_id for t in got] == want_ids
            for k, t in enumerate(got):
                row = ref[first + k - 1]
                assert t.logprob == pytest.approx(float(row[t.token_id]), abs=1e-4)
                values = row.topk(n).values
                assert [v for _, v in t.top] == pytest.approx(values.tolist(), abs=1e-4), (name, k)
                assert [float(row[i]) for i, _ in t.top] == pytest.approx([v for _, v in t.top], abs=1e-4)


def test_a_greedy_row_batched_with_a_sampled_row_takes_the_argmax_even_by_a_hair():
    """temperature 0 is the argmax, not a draw at a tiny temperature: two logits 2e-6 apart, batched
    with a sampled row (so the batch is not all greedy), still give the likelier one."""
    plain = dict(top_k=0, top_p=1.0, repetition_penalty=1.0)
    p = _ParamTensors([Row(temperature=0.0, **plain), Row(temperature=1.0, **plain)], torch.device("cpu"))
    logits = torch.tensor([[2.0, 2.0 - 2e-6, 0.0]] * 2)
    assert Engine.sample(logits, torch.zeros(2, 3, dtype=torch.bool), p, [Rng(0.99), Rng(0.99)]).tolist() == [0, 2]


def test_a_short_prompt_beside_a_long_one_decodes_to_the_end_of_the_window(engine):
    """A left-padded row's positions count its own tokens, not the padding: batched beside a prompt of
    nearly the whole window, a short prompt still gets its whole reply, up to the window's end."""
    short = engine.encode("我们今天")
    params = replace(GREEDY, max_new_tokens=engine.context_length)
    alone = engine.generate([short], params)[0]
    both = engine.generate([[5] * (engine.context_length - 3), short], params)
    assert both[1].token_ids == alone.token_ids and both[1].cut_by_context
    assert both[1].completion_tokens == engine.context_length - len(short)


def test_scheduler_serves_callers_and_cancels(engine, reference):
    sched = Scheduler(engine)
    try:
        reqs = [sched.submit(p, GREEDY) for p in PROMPTS]
        texts = ["".join(r.deltas(timeout=60)) for r in reqs]
        assert [r.completion().token_ids for r in reqs] == reference
        assert texts == [engine.tok.decode(ids, skip_special_tokens=True) for ids in reference]
        req = sched.submit("我们", replace(GREEDY, max_new_tokens=100))
        req.cancel()
        list(req.deltas(timeout=60))
        assert req.finish_reason == "cancelled" and len(req.out_ids) < 100
        # Cancelled while it decodes in the running batch, not while it waits: it leaves at the next step.
        req = sched.submit("我们", replace(GREEDY, max_new_tokens=400))
        stream = req.deltas(timeout=60)
        next(stream)
        req.cancel()
        list(stream)
        assert req.finish_reason == "cancelled" and 0 < len(req.out_ids) < engine.context_length - 3
        # Admitted and finished in one round (prefill's token, then one step): all text, ended once.
        short = [sched.submit(p, replace(GREEDY, max_new_tokens=2)) for p in PROMPTS]
        assert ["".join(r.deltas(timeout=60)) for r in short] == [engine.tok.decode(ids[:2], skip_special_tokens=True)
                                                                     for ids in reference]
        assert sched.stats()["finished"] == {"length": 2 * len(PROMPTS), "cancelled": 2}
    finally:
        sched.close()


def test_logits_that_overflow_end_their_request_with_one_clear_error(engine, reference, monkeypatch):
    """fp16 activations can overflow (fp16 is the default on V100 and T4): NaN logits were a traceback
    from sampling, or under greedy decoding an empty reply that said it had stopped. Such a request
    now ends with an error naming the cause; the requests decoding beside it go on."""
    short, long = PROMPTS[0], PROMPTS[5] * 2
    hot_from = len(engine.encode(long)) + 2  # the long prompt overflows after 3 tokens; the short one never does
    assert len(engine.encode(short)) + GREEDY.max_new_tokens < hot_from
    real = engine.forward

    def overflowing(idx, positions, cache, valid=None, every_position=False):
        logits = real(idx, positions, cache, valid, every_position)
        logits[:, -1] = -math.inf  # a token ruled out (a padded vocabulary's): no fault
        logits[positions.amax(-1) >= hot_from, 0] = math.inf
        return logits

    monkeypatch.setattr(engine, "forward", overflowing)
    said = "the model's logits are not finite (NaN or inf) in float32: the model has diverged"
    for params in (GREEDY, replace(GREEDY, temperature=0.8, seed=1)):
        with pytest.raises(TinykError) as e:
            engine.generate([long], params)
        assert str(e.value) == said
    sched = Scheduler(engine)
    try:
        beside, hot = sched.submit(short, GREEDY), sched.submit(long, replace(GREEDY, logprobs=2))
        list(hot.deltas(timeout=60))
        assert (hot.finish_reason, hot.error, len(hot.out_ids), len(hot.logprobs)) == ("error", said, 3, 3)
        list(beside.deltas(timeout=60))
        assert beside.finish_reason == "length" and beside.completion().token_ids == reference[0]
    finally:
        sched.close()
    logits = torch.tensor([[0.0, float("nan")], [float("inf"), 0.0], [-math.inf, 1.0]])
    fixed, bad = _finite_rows(logits)
    assert bad.tolist() == [True, True, False] and torch.equal(fixed[2], logits[2]) and fixed[:2].eq(0).all()
    assert non_finite(torch.float16) == ("the model's logits are not finite (NaN or inf): its activations "
                                         "overflowed float16; use --dtype bf16 or fp32")


def test_a_reply_that_overflows_mid_stream_ends_its_line_before_the_error(engine, nano_model_dir, monkeypatch, capsys):
    """The error line came straight after the partial text on the terminal, in generate and chat alike."""
    from tinyk import engine as engine_module

    real, calls = engine_module._finite_rows, []

    def third_step_overflows(logits):
        calls.append(1)
        fixed, bad = real(logits)
        return fixed, bad | (len(calls) >= 3)

    two = SamplingParams(temperature=0, max_new_tokens=2)  # what comes before the overflow, as the CLI decodes
    shown = {"generate": "我们" + engine.generate(["我们"], two)[0].text,
             "chat": engine.chat([[{"role": "user", "content": "我们"}]], two)[0].text}
    monkeypatch.setattr(engine_module, "_finite_rows", third_step_overflows)
    for command, flag in (("generate", "--prompt"), ("chat", "--message")):
        calls.clear()
        with pytest.raises(SystemExit) as e:
            main([command, "--model", str(nano_model_dir), flag, "我们", "--temperature", "0",
                  "--max-new-tokens", "20"])
        out, err = capsys.readouterr()
        assert e.value.code == 2 and out == shown[command] + "\n", command
        assert err == ("tinyk: error: the model's logits are not finite (NaN or inf) in float32: the model has "
                       "diverged\n")


def test_a_failing_hook_or_prefill_never_strands_a_caller(engine, reference, monkeypatch, capsys):
    """The engine thread outlives a logging hook that raises, and a prefill that fails ends every
    request it admitted with the error instead of leaving callers waiting."""
    def broken_hook(req):
        raise RuntimeError("log disk full")

    sched = Scheduler(engine, on_finish=broken_hook)
    try:
        first = sched.submit(PROMPTS[0], GREEDY)
        assert "".join(first.deltas(timeout=60)) == engine.tok.decode(reference[0])
        assert "on_finish failed: RuntimeError: log disk full" in capsys.readouterr().err
        with monkeypatch.context() as m:
            m.setattr("tinyk.engine._DecodeBatch.add", lambda self, reqs: (_ for _ in ()).throw(MemoryError("prefill")))
            failed = [sched.submit(p, GREEDY) for p in PROMPTS]
            for r in failed:
                list(r.deltas(timeout=60))
            assert {(r.finish_reason, r.error) for r in failed} \
                == {("error", "generation failed: MemoryError: prefill")}
        again = sched.submit(PROMPTS[1], GREEDY)
        assert "".join(again.deltas(timeout=60)) == engine.tok.decode(reference[1])
    finally:
        sched.close()


def test_a_prefill_that_fails_ends_only_the_requests_it_admitted(engine, reference, monkeypatch):
    """One colleague's long prompt out of memory must not cut off the replies already decoding: their
    batch is untouched by the prefill that failed, and they finish as they would have."""
    from tinyk.engine import _DecodeBatch

    sched = Scheduler(engine)
    real_add, real_step, late = _DecodeBatch.add, _DecodeBatch.step, []

    def add(self, reqs):
        if late and late[0] in reqs:
            raise MemoryError("prefill")
        return real_add(self, reqs)

    def step(self):
        if not late:  # the first reply is decoding: a second prompt arrives, whose prefill will fail
            late.append(sched.submit(PROMPTS[1], GREEDY))
        return real_step(self)

    monkeypatch.setattr(_DecodeBatch, "add", add)
    monkeypatch.setattr(_DecodeBatch, "step", step)
    try:
        first = sched.submit(PROMPTS[0], GREEDY)
        assert "".join(first.deltas(timeout=60)) == engine.tok.decode(reference[0])
        assert first.finish_reason == "length" and len(first.out_ids) == GREEDY.max_new_tokens
        assert list(late[0].deltas(timeout=60)) == []
        assert (late[0].finish_reason, late[0].error) == ("error", "generation failed: MemoryError: prefill")
    finally:
        sched.close()


def test_engine_forward_is_the_models_forward(engine):
    """The engine's restated forward pass gives the model's logits bit for bit, padding and cache included."""
    x = torch.tensor([[4, 4, 10, 11, 12], [20, 21, 22, 23, 24]])
    valid = x != 4
    positions = (valid.cumsum(1) - 1).clamp(min=0)
    caches = [KVCache(engine.model.config, 2, 8, "cpu", torch.float32) for _ in range(2)]
    with torch.inference_mode():
        want = engine.model(x, positions=positions, valid=valid, cache=caches[0], last_only=True)
        got = engine.forward(x, positions, caches[1], valid)
        assert torch.equal(got, want[:, -1])
        step, pos = torch.tensor([[30], [31]]), positions[:, -1:] + 1
        want = engine.model(step, positions=pos, cache=caches[0], last_only=True)
        assert torch.equal(engine.forward(step, pos, caches[1]), want[:, -1])
    assert torch.equal(caches[0].k, caches[1].k) and caches[0].length == caches[1].length == 6


def test_bf16_on_cpu(nano_model_dir, engine, reference):
    eng = Engine.from_dir(nano_model_dir, device="cpu", dtype="bf16")
    assert eng.dtype == torch.bfloat16 and eng.model.lm_head.weight.dtype == torch.bfloat16
    assert eng.packed == cpu_bf16_packing_works()
    out = eng.generate(PROMPTS, GREEDY)
    # A random model's greedy choices have wide margins, so bf16 rounding does not change them.
    assert [c.token_ids for c in out] == reference
    if eng.packed:
        plain = Engine(load_model(nano_model_dir)[0], eng.tok, dtype=torch.bfloat16)
        assert not plain.packed and [c.token_ids for c in plain.generate(PROMPTS, GREEDY)] == reference


INT8 = pytest.mark.skipif(not hasattr(torch.ops.aten, "_weight_int8pack_mm"),
                          reason="this torch build has no int8 weight-only kernel")


def test_int8_quantization_is_per_row_absmax():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=g) * torch.logspace(-3, 1, 48)[:, None]  # rows of very different scales
    q, scale = quantize_int8(w, torch.float32)
    assert q.dtype == torch.int8 and scale.shape == (48,) and int(q.abs().max()) == 127
    # half a step, and fp32's rounding of w / scale and q * scale (a few ulps of w) beside it
    error = (q.double() * scale[:, None].double() - w.double()).abs()
    assert torch.all(error <= scale[:, None].double() * 0.5 + w.double().abs() * 1e-6)


@INT8
@pytest.mark.parametrize("emulated", [False, True])
def test_int8_engine_tracks_the_fp32_model(nano_model_dir, engine, reference, monkeypatch, emulated):
    """A prompt (more rows than the kernel takes: 4 beside bf16 weights, 16 beside fp32 ones) runs on the
    dense weights (but for the head, given the last position alone), each decode step of 1-2 rows on the
    int8 ones, whose kernel takes bf16 activations. The dense weights are bf16, or fp32 on a CPU without
    bf16 instructions: there a prompt in emulated bf16 took 3 to 6x fp32's time."""
    import tinyk.engine

    assert int8_works(torch.device("cpu"), torch.bfloat16)
    monkeypatch.setattr(tinyk.engine, "cpu_emulates", lambda dtype: emulated and dtype == torch.bfloat16)
    eng = Engine.from_dir(nano_model_dir, quantize="int8", max_batch=2)
    dtype, prompt = (torch.float32, 17) if emulated else (torch.bfloat16, 6)
    assert eng.quantize == "int8" and eng.dtype == dtype and not eng.packed
    assert {w.dtype for w in eng.model.parameters()} == {dtype}
    kernel, rows = torch.ops.aten._weight_int8pack_mm, []
    monkeypatch.setattr(torch.ops.aten, "_weight_int8pack_mm", lambda x, q, scale: rows.append((len(x), x.dtype)) or
                        kernel(x, q, scale))
    x = torch.arange(10, 10 + prompt + 1)[None]
    layers = eng.model.config.n_layers
    with torch.inference_mode():
        want = engine.model(x)
        cache = KVCache(eng.model.config, 1, prompt + 2, "cpu", dtype)
        got = [eng.forward(x[:, :prompt], torch.arange(prompt)[None], cache)]
        assert rows == [(1, torch.bfloat16)]  # the dense weights but for the head's one row
        got.append(eng.forward(x[:, prompt:], torch.tensor([[prompt]]), cache))
        # then every projection and the head, in int8
        assert rows == [(1, torch.bfloat16)] * (7 * layers + 2)
        if emulated:  # 8 rows (8 sequences decoding, a short prompt) beside fp32 weights: the kernel
            rows.clear()
            eng.forward(x[:, :8], torch.arange(8)[None], KVCache(eng.model.config, 1, 9, "cpu", dtype))
            assert rows == [(8, torch.bfloat16)] * (7 * layers) + [(1, torch.bfloat16)]
    for g, w in zip(got, (want[:, prompt - 1], want[:, prompt]), strict=True):
        assert g.dtype == dtype
        err = (g.float() - w).abs().max() / w.std()
        assert err < 0.05, f"int8 logits are {err:.3f} standard deviations off"
    out = [c.token_ids for c in eng.generate(PROMPTS, GREEDY)]
    same = sum(a == b for o, r in zip(out, reference, strict=True) for a, b in zip(o, r, strict=True))
    assert same >= 0.9 * sum(map(len, reference))
    with pytest.raises(TinykError, match="unknown quantization"):
        Engine.from_dir(nano_model_dir, quantize="int4")


@INT8
def test_int8_keeps_dense_the_weights_whose_width_its_kernel_cannot_take(engine):
    """PyTorch's int8 kernel reads a row 16 inputs at a time: a hidden_dim of 200 (or a dim of 72) gave
    NaN logits, a model "diverged" in serve, or a segfault."""
    torch.manual_seed(0)
    cfg = replace(engine.model.config, dim=64, n_heads=4, n_kv_heads=2, hidden_dim=200, n_layers=2)
    model = Transformer(cfg).eval()
    eng = Engine(copy.deepcopy(model), engine.tok, quantize="int8")
    kept = [w for layer in eng.forward.layers for w in layer[2:]] + [eng.forward.lm_head]
    assert sorted({(w[2].shape[1], w[0] is None) for w in kept}) == [(64, False), (200, True)]
    x = torch.tensor([[10, 11, 12, 13, 14, 15, 16]])
    cache = KVCache(cfg, 1, 8, "cpu", eng.dtype)
    with torch.inference_mode():
        want = model(x)[:, 6]
        eng.forward(x[:, :6], torch.arange(6)[None], cache)
        got = eng.forward(x[:, 6:], torch.tensor([[6]]), cache)  # one row: the int8 path
    assert (got.float() - want).abs().max() / want.std() < 0.05


@INT8
def test_generate_cli_with_int8(nano_model_dir, capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(nano_model_dir), "--prompt", "我们", "--quantize", "int8",
              "--temperature", "0", "--max-new-tokens", "4", "--json"])
    assert e.value.code == 0 and json.loads(capsys.readouterr().out)["completion_tokens"] == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_matches_recomputation(nano_model_dir, dtype):
    eng = Engine.from_dir(nano_model_dir, device="cuda", dtype=dtype)
    assert eng.device.type == "cuda"
    out = eng.generate(PROMPTS, GREEDY)
    assert [c.token_ids for c in out] == [recompute_greedy(eng.model, eng.encode(p), GREEDY.max_new_tokens)
                                          for p in PROMPTS]


def test_generate_cli(nano_model_dir, tmp_path, capsys, monkeypatch):
    f = tmp_path / "prompts.txt"
    f.write_text("我们今天\n\nThe quick\n", encoding="utf-8")
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(nano_model_dir), "--prompt-file", str(f), "--prompt", "天气",
              "--temperature", "0", "--max-new-tokens", "5", "--json"])
    assert e.value.code == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in rows] == ["天气", "我们今天", "The quick"]
    assert all(r["completion_tokens"] == 5 and r["finish_reason"] == "length" for r in rows)
    assert capsys.readouterr().err == ""  # a blank line separates prompts: nothing was skipped
    # --field where no prompt has fields is said, not ignored unseen.
    for given, said in (([], "is not used without --prompt-file"),
                        (["--prompt-file", str(f)], "is not used: .txt files hold one prompt a line, with no fields")):
        with pytest.raises(SystemExit) as e:
            main(["generate", "--model", str(nano_model_dir), "--prompt", "天气", *given, "--field", "text",
                  "--max-new-tokens", "1", "--json"])
        assert e.value.code == 0 and capsys.readouterr().err == f"tinyk: --field text {said}\n"
    monkeypatch.setattr("sys.stdin", io.StringIO("\ufeff我们今天\n\nThe quick\n"))  # a BOM, as Notepad writes
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(nano_model_dir), "--prompt-file", "-", "--prompt", "天气",
              "--temperature", "0", "--max-new-tokens", "5", "--json"])
    assert e.value.code == 0 and [json.loads(line) for line in capsys.readouterr().out.splitlines()] == rows
    monkeypatch.setattr("sys.stdin", io.StringIO("\ufeff我们今天\nab\x00c\nThe quick\n"))  # binary, as in a file
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(nano_model_dir), "--prompt-file", "-", "--prompt", "天气",
              "--temperature", "0", "--max-new-tokens", "5", "--json"])
    out, err = capsys.readouterr()
    assert e.value.code == 0 and [json.loads(line) for line in out.splitlines()] == rows
    assert err == "tinyk: stdin: skipped 1 record; nul byte: 1 (first at stdin:2; a NUL byte is binary data, " \
                  "not text)\n"
    for name in ("-", "/dev/stdin"):  # /dev/stdin was "unsupported input type" (it has no suffix)
        monkeypatch.setattr("sys.stdin", io.StringIO("\ufeff我们今天\r\rThe quick\r\n"))  # lone CRs end lines too
        with pytest.raises(SystemExit) as e:
            main(["generate", "--model", str(nano_model_dir), "--prompt-file", name, "--prompt", "天气",
                  "--temperature", "0", "--max-new-tokens", "5", "--json"])
        assert e.value.code == 0 and [json.loads(line) for line in capsys.readouterr().out.splitlines()] == rows

    for stdin in ("-", "/dev/stdin"):
        monkeypatch.setattr("sys.stdin", Terminal("我们今天\n"))  # typed: it used to wait without a word
        with pytest.raises(SystemExit) as e:
            main(["generate", "--model", str(nano_model_dir), "--prompt-file", stdin, "--max-new-tokens", "1",
                  "--json"])
        assert e.value.code == 0 and capsys.readouterr().err == \
            "tinyk: reading prompts from the terminal, one per line; Ctrl-D ends them\n"
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(nano_model_dir), "--prompt", "x", "--prompt", "", "--no-bos"])
    assert e.value.code == 2 and capsys.readouterr().err == (
        "tinyk: error: an empty prompt has nothing to continue without <|im_start|>; give it text, or leave out "
        "--no-bos\n")
    monkeypatch.setattr("sys.stdin", io.StringIO("我们今天\n\udcc4\udce3\n"))  # GBK bytes through a C locale
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(nano_model_dir), "--prompt-file", "-"])
    assert e.value.code == 2 and capsys.readouterr().err.startswith("tinyk: error: stdin is not valid UTF-8")
    # Only binary lines: the error says why none was a prompt (the report was made, then never shown).
    monkeypatch.setattr("sys.stdin", io.StringIO("ab\x00c\n\n"))
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(nano_model_dir), "--prompt-file", "-"])
    assert e.value.code == 2 and capsys.readouterr().err == (
        "tinyk: error: no prompts on stdin (--prompt-file - reads one per line; stdin: skipped 1 record; nul byte: 1 "
        "(first at stdin:1; a NUL byte is binary data, not text))\n")
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(nano_model_dir), "--prompt", "我们", "--max-new-tokens", "4", "--seed", "1"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("我们")
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"])
    assert e.value.code == 2
    assert capsys.readouterr().err == f"tinyk: error: model directory not found: {tmp_path / 'missing'}\n"


@pytest.mark.parametrize("command", ["generate", "chat"])
@pytest.mark.parametrize(("flag", "value", "rule"), [
    ("--temperature", "-1", "must be a finite number >= 0, got '-1'"),
    ("--top-p", "1.5", "must be a finite number in [0, 1], got '1.5'"),
    ("--min-p", "nan", "must be a finite number in [0, 1], got 'nan'"),
    ("--repetition-penalty", "0", "must be a finite number in [0.01, 10], got '0'"),
    ("--stop", "", "must not be empty"),
])
def test_bad_sampling_flags_are_named_as_typed(nano_model_dir, capsys, command, flag, value, rule):
    """They were named by SamplingParams' fields ("temperature must be a number >= 0, got -1.0")."""
    with pytest.raises(SystemExit) as e:
        main([command, "--model", str(nano_model_dir), "--message" if command == "chat" else "--prompt", "x",
              f"{flag}={value}"])
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith(f"tinyk {command}: error: argument {flag}: {rule}")


def test_the_cli_takes_the_engines_repetition_penalty_range():
    from tinyk.cli.common import REPETITION_PENALTY_RANGE as CLI_RANGE
    from tinyk.engine import REPETITION_PENALTY_RANGE

    assert CLI_RANGE == REPETITION_PENALTY_RANGE


def test_generate_prints_each_sample_as_it_is_done_so_ctrl_c_keeps_them(nano_model_dir, tmp_path):
    """A prompt file of thousands of lines showed nothing until the last was done, and an interrupt
    (Ctrl-C, a scheduler's time limit) threw every finished sample away."""
    import signal

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"北京{i}\n" for i in range(300)), encoding="utf-8")
    proc = subprocess.Popen([sys.executable, "-m", "tinyk", "generate", "--model", str(nano_model_dir), "--prompt-file",
                             str(prompts), "--batch-size", "1", "--max-new-tokens", "64", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        first = proc.stdout.readline()  # the first sample, long before the 300th
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    lines = [json.loads(line) for line in (first + rest).decode().splitlines()]
    assert proc.returncode == 130 and err.decode().endswith("tinyk: interrupted\n")
    assert 1 <= len(lines) < 300 and [r["prompt"] for r in lines] == [f"北京{i}" for i in range(len(lines))]


class TerminalChat:
    """`tinyk chat` in a pseudo-terminal of type `term`, with readline's defaults (not this machine's
    /etc/inputrc or ~/.inputrc); `seen` is what it has printed."""

    def __init__(self, model_dir: Path, tmp_path: Path, term: str):
        import pty

        inputrc = tmp_path / "inputrc"
        inputrc.write_text("")
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen([sys.executable, "-m", "tinyk", "chat", "--model", str(model_dir),
                                      "--temperature", "0", "--max-new-tokens", "3"], stdin=slave, stdout=slave,
                                     stderr=slave, start_new_session=True,
                                     env={**os.environ, "TERM": term, "INPUTRC": str(inputrc)})
        os.close(slave)
        self.seen = b""

    def until(self, text: bytes, timeout: float = 60) -> bool:
        """Reads until `text` is in `seen`; False if it has not come within `timeout` seconds."""
        import select
        import time

        deadline = time.monotonic() + timeout
        while text not in self.seen:
            assert self.proc.poll() is None, self.seen.decode(errors="replace")
            if time.monotonic() > deadline:
                return False
            if select.select([self.master], [], [], 0.1)[0]:
                self.seen += os.read(self.master, 4096)
        return True

    def type(self, text: str | bytes) -> None:
        os.write(self.master, text.encode() if isinstance(text, str) else text)

    def end(self) -> None:
        """Ctrl-D, then what the chat printed on its way out."""
        import select

        self.type(b"\x04")
        assert self.proc.wait(timeout=60) == 0
        while select.select([self.master], [], [], 0.1)[0]:
            try:
                self.seen += os.read(self.master, 4096)
            except OSError:  # the terminal closed with the process
                break

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        os.close(self.master)


def test_chat_in_a_terminal_keeps_ctrl_c_at_the_prompt_and_a_pasted_paragraph_as_one(nano_model_dir, tmp_path):
    """At `you>`, Ctrl-C clears the line (as Python's prompt does) and the session goes on; a paragraph
    pasted into a terminal with bracketed paste (xterm's, readline's default) is one message; Ctrl-D ends it."""
    import signal

    chat = TerminalChat(nano_model_dir, tmp_path, "xterm")
    try:
        assert chat.until(b"you> ")
        chat.seen = b""
        chat.type("半句")
        assert chat.until("半句".encode())  # echoed: the line is being typed
        # What Ctrl-C at the prompt sends. CPython's readline acts on a signal that lands while it handles
        # a keystroke only at the next one, so a busy machine may need the key pressed again.
        for _ in range(10):
            chat.proc.send_signal(signal.SIGINT)
            if chat.until(b"you> ", timeout=3):
                break
        assert b"you> " in chat.seen  # a fresh prompt, the session alive
        chat.type("你好\n")
        assert chat.until(b"assistant> ")
        chat.seen = chat.seen.split(b"assistant> ", 1)[1]  # the short reply and the next prompt may come with it
        assert chat.until(b"you> ")
        assert b"\x1b[?2004h" in chat.seen  # the terminal is asked to mark pastes (CPython turns it off)
        chat.seen = b""
        chat.type("\x1b[200~第一行\n第二行\x1b[201~\n")  # what the terminal sends for a paste
        assert chat.until(b"you> ")
        chat.end()
        assert chat.seen.count(b"assistant> ") == 1, chat.seen.decode(errors="replace")  # one reply: one message
    finally:
        chat.close()


def test_chat_on_a_dumb_terminal_does_not_ask_for_bracketed_paste(nano_model_dir, tmp_path):
    """With TERM=dumb (an editor's shell buffer) readline's bracketed-paste switch would be shown as
    escape codes around every prompt: it is turned on for a real terminal type only."""
    chat = TerminalChat(nano_model_dir, tmp_path, "dumb")
    try:
        assert chat.until(b"you> ")
        chat.type("你好\n")
        assert chat.until(b"assistant> ")
        before, chat.seen = chat.seen, chat.seen.split(b"assistant> ", 1)[1]
        assert chat.until(b"you> ")
        chat.end()
        assert b"\x1b[?2004h" not in before + chat.seen, before + chat.seen
    finally:
        chat.close()


def test_chat_in_a_c_locale_terminal_reads_chinese(nano_model_dir, tmp_path):
    """Under LC_ALL=C readline took each byte of 你 for a Meta key (0xBD is M-=, which listed the
    files here) and the message arrived empty, so nothing was answered."""
    import pty
    import select
    import time

    inputrc = tmp_path / "inputrc"  # readline's defaults, not this machine's /etc/inputrc or ~/.inputrc
    inputrc.write_text("")
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "tinyk", "chat", "--model", str(nano_model_dir), "--temperature",
                             "0", "--max-new-tokens", "2"], stdin=slave, stdout=slave, stderr=slave,
                            start_new_session=True,
                            env={**os.environ, "TERM": "xterm", "INPUTRC": str(inputrc), "LC_ALL": "C"})
    os.close(slave)
    seen = b""

    def until(text: bytes, timeout: float = 60) -> bool:
        nonlocal seen
        deadline = time.monotonic() + timeout
        while text not in seen and time.monotonic() < deadline and proc.poll() is None:
            if select.select([master], [], [], 0.1)[0]:
                seen += os.read(master, 4096)
        return text in seen

    try:
        assert until(b"you> ")
        seen = b""
        os.write(master, "你好\n".encode())
        assert until(b"assistant> ", timeout=30), seen.decode(errors="replace")
        assert "你好".encode() in seen.split(b"assistant> ")[0]  # echoed as typed
    finally:
        proc.kill()
        proc.wait()
        os.close(master)


def test_a_terminal_that_cannot_show_a_character_gets_a_substitute(nano_model_dir, monkeypatch):
    """A GBK (or ASCII) terminal has no emoji nor U+FFFD, which small models emit: no traceback."""

    class Terminal(io.BytesIO):  # a file or pipe would get UTF-8
        def isatty(self) -> bool:
            return True

    out = io.TextIOWrapper(Terminal(), encoding="gbk")
    monkeypatch.setattr("sys.stdout", out)
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(nano_model_dir), "--prompt", "你好😀", "--max-new-tokens", "2"])
    out.flush()
    assert e.value.code == 0 and out.buffer.getvalue().decode("gbk").startswith("你好?")


def test_chat_cli_answers_one_message(engine, nano_model_dir, capsys, monkeypatch):
    prompt = engine.tok.apply_chat_template([{"role": "user", "content": "你好"}], True, DEFAULT_SYSTEM_PROMPT)
    params = replace(GREEDY, repetition_penalty=1.1, max_new_tokens=6, ignore_eos=False)
    expected = engine.generate([prompt], params)[0].text
    with pytest.raises(SystemExit) as e:
        main(["chat", "--model", str(nano_model_dir), "--message", "你好", "--temperature", "0",
              "--max-new-tokens", "6"])
    assert e.value.code == 0 and capsys.readouterr().out == expected + "\n"
    monkeypatch.setattr("sys.stdin", io.StringIO("你好\n"))
    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)  # --threads: fewer, for a busy machine
    with pytest.raises(SystemExit) as e:
        main(["chat", "--model", str(nano_model_dir), "--temperature", "0", "--max-new-tokens", "6", "--threads", "1"])
    assert e.value.code == 0 and capsys.readouterr().out == expected + "\n" and threads == [1]
    # --message repeated: one conversation, each message answered in turn with the ones before it as history.
    chat = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": expected},
            {"role": "user", "content": "再见"}]
    second = engine.generate([engine.tok.apply_chat_template(chat, True, DEFAULT_SYSTEM_PROMPT)], params)[0].text
    with pytest.raises(SystemExit) as e:
        main(["chat", "--model", str(nano_model_dir), "--message", "你好", "--message", "再见", "--temperature", "0",
              "--max-new-tokens", "6"])
    assert e.value.code == 0 and capsys.readouterr().out == f"{expected}\n{second}\n"


def test_json_lines_keep_their_text_on_a_stdout_of_another_encoding(nano_model_dir):
    """With PYTHONIOENCODING=ascii (or a GBK console) the --json prompt came out as "??": escaped, it is
    the same JSON once parsed."""
    r = subprocess.run([sys.executable, "-m", "tinyk", "generate", "--model", str(nano_model_dir), "--prompt", "你好",
                        "--max-new-tokens", "2", "--json"], capture_output=True, timeout=120,
                       env={**os.environ, "PYTHONIOENCODING": "ascii", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0 and json.loads(r.stdout)["prompt"] == "你好" and b"\\u4f60" in r.stdout


def test_stdin_undecodable_in_a_windows_code_page_is_called_that(monkeypatch):
    """Windows' stdin keeps the console's code page: UTF-8 that cp936 refused was called "not valid
    UTF-8", with an iconv line from GBK, the opposite of the fix."""
    from tinyk.inputs import stdin_not_decodable

    monkeypatch.delenv("PYTHONIOENCODING", raising=False)
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(), encoding="cp936"))
    assert stdin_not_decodable() == ("stdin is not valid cp936, this console's encoding (set PYTHONIOENCODING=utf-8 "
                                     "to read UTF-8)")


@pytest.mark.parametrize("encoding, text, said", [
    ("utf-8:strict", "你好".encode("gbk"), "stdin is not valid UTF-8 (convert it first, e.g. iconv -f gbk -t utf-8)"),
    ("ascii", "你好".encode(), "stdin is not valid ascii, the encoding PYTHONIOENCODING=ascii asks for (unset it to "
                               "read UTF-8)")])
def test_chat_and_generate_report_undecodable_stdin_in_one_line(nano_model_dir, encoding, text, said):
    """A GBK message piped into chat (strict UTF-8 stdin, as under en_US.UTF-8) is one line, not a
    UnicodeDecodeError traceback; UTF-8 that PYTHONIOENCODING=ascii refused was called "not valid UTF-8"."""
    for command in (["chat"], ["generate", "--prompt-file", "-"]):
        r = subprocess.run([sys.executable, "-m", "tinyk", *command, "--model", str(nano_model_dir),
                            "--max-new-tokens", "2"], input=text, capture_output=True, timeout=120,
                           env={**os.environ, "PYTHONIOENCODING": encoding, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 2 and r.stdout == b""
        assert r.stderr.decode() == f"tinyk: error: {said}\n"


def test_an_ascii_locale_reads_utf8_text_as_the_utf8_it_is(nano_model_dir, tmp_path):
    """Under LC_ALL=C without Python's UTF-8 mode, argv and stdin reach Python as one surrogate per byte:
    valid UTF-8 was refused as "not valid UTF-8", and the output was question marks (a `--field 内容` was
    looked for as its surrogates). GBK bytes still are refused."""
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0", "OMP_NUM_THREADS": "1"}
    model = ["--model", str(nano_model_dir), "--max-new-tokens", "2"]
    records = tmp_path / "prompts.jsonl"
    records.write_text('{"内容": "你好"}\n', encoding="utf-8")
    for args, stdin in ((["generate", "--prompt", "你好"], b""),
                        (["generate", "--prompt-file", str(records), "--field", "内容"], b""),
                        (["generate", "--prompt-file", "-"], "你好\n".encode()),
                        (["chat"], "你好\n".encode()), (["chat", "--message", "你好"], b"")):
        r = subprocess.run([sys.executable, "-m", "tinyk", *args, *model], input=stdin, capture_output=True,
                           timeout=120, env=env)
        assert r.returncode == 0 and b"UTF-8" not in r.stderr, (args, r.stderr)
        if args[0] == "generate":  # the prompt comes back as it went in
            assert r.stdout.startswith("你好".encode()), r.stdout
    r = subprocess.run([sys.executable, "-m", "tinyk", "generate", "--prompt", "你好".encode("gbk"), *model],
                       capture_output=True, timeout=120, env=env)
    assert r.returncode == 2 and b"is not valid UTF-8 text" in r.stderr


def test_chat_session_commands_and_history(engine, capsys):
    params = replace(GREEDY, max_new_tokens=4)
    out = io.StringIO()
    history = chat_session(engine, params, ["你好", "/system 你是诗人", "写诗", "/bogus", "/systemd", "", "再来",
                                            "/help", "/reset", "/exit", "never read"], out,
                           system=DEFAULT_SYSTEM_PROMPT)
    assert history == []
    err = capsys.readouterr().err
    assert f"\n{CHAT_HELP}\n" in err
    assert "system prompt set" in err and "unknown command /bogus" in err and "conversation reset" in err
    assert "unknown command /systemd" in err and out.getvalue().count("assistant> ") == 3
    history = chat_session(engine, params, ["//usr 是什么"], io.StringIO(), system=None)  # "//" sends "/"
    assert history[0] == {"role": "user", "content": "/usr 是什么"} and len(history) == 2
    out = io.StringIO()
    history = chat_session(engine, params, ["写诗", "再来"], out, system="你是诗人")
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    second = engine.generate([engine.tok.apply_chat_template(history[:3], True, "你是诗人")], params)[0].text
    assert history[3]["content"] == second
    # From Python, as the rest of the library takes it: MODEL_PROMPT is the model's own system prompt.
    history = chat_session(engine, params, ["写诗"], io.StringIO(), system=MODEL_PROMPT)
    own = engine.tok.apply_chat_template(history[:1], True, engine.tok.system_prompt)
    assert engine.tok.system_prompt and history[1]["content"] == engine.generate([own], params)[0].text
    # A one-shot message (--message, piped input) is never a command, and a cut reply names its limit.
    history = chat_session(engine, params, ["/usr/bin 是什么"], io.StringIO(), system=None, interactive=False)
    assert history[0] == {"role": "user", "content": "/usr/bin 是什么"} and len(history) == 2
    assert "raise --max-new-tokens" in capsys.readouterr().err
    # /reset is offered only where earlier turns take room, and never outside a session.
    chat_session(engine, replace(params, max_new_tokens=10**4), ["你好"], io.StringIO(), system=None)
    prompt = len(engine.chat_ids([user("你好")], default_system=None))
    full = f"the context window is full: the prompt took {prompt} of its {engine.context_length} tokens)"
    assert full in capsys.readouterr().err
    from tinyk.chat import _Session

    session = _Session(engine, params, io.StringIO(), None, "assistant> ", interactive=True)
    session.history = [user("你好"), {"role": "assistant", "content": "你好！"}, user("再见")]  # an earlier turn kept
    assert session._window_full(engine.request(engine.chat_ids(session.history), params)).endswith(
        "; /reset starts over")
    chat_session(engine, replace(params, max_new_tokens=10**4), ["你好", "再见"], io.StringIO(), system=None,
                 interactive=False)
    assert "/reset" not in capsys.readouterr().err  # no session to /reset
    # A system prompt that takes much of the window is named as what leaves the reply no room.
    long_system = "你是诗人" * 8
    chat_session(engine, replace(params, max_new_tokens=10**4), ["你好"], io.StringIO(), system=long_system)
    share = engine.system_tokens(long_system)
    named = f", the system prompt and chat markers {share} of those)"
    assert share > engine.context_length // 4 and named in capsys.readouterr().err
    # One that leaves under a quarter of the window is said at the start, and after /system.
    crowding = "诗"
    while engine.system_tokens(crowding + "诗") < engine.context_length * 7 // 8:
        crowding += "诗"
    share = engine.system_tokens(crowding)
    assert engine.context_length * 3 // 4 < share < engine.context_length
    chat_session(engine, params, ["/system 你好", f"/system {crowding}"], io.StringIO(), system=crowding)
    said = (f"(the system prompt and chat markers take {share} of the model's {engine.context_length}-token "
            f"context window: messages and replies share the {engine.context_length - share} left)")
    assert capsys.readouterr().err.count(said) == 2
    # A pasted paragraph is a message even when it starts with "/": its lines are not commands.
    history = chat_session(engine, params, ["/x\n/y 是什么"], io.StringIO(), system=None)
    assert history[0] == {"role": "user", "content": "/x\n/y 是什么"} and len(history) == 2
    # A /system line of bytes that were not UTF-8 (a GBK terminal) is reported; the session goes on.
    history = chat_session(engine, params, ["/system \udcc4\udce3", "你好"], io.StringIO(), system="你是诗人")
    assert f"{NOT_UTF8}; system prompt unchanged" in capsys.readouterr().err
    assert history[1]["content"] == \
        engine.generate([engine.chat_ids(history[:1], default_system="你是诗人")], params)[0].text
    assert engine.chat_ids(history[:1], default_system=MODEL_PROMPT) == \
        engine.chat_ids(history[:1], default_system=engine.tok.system_prompt) != engine.chat_ids(history[:1])


def test_a_system_prompt_that_leaves_no_room_is_blamed_not_the_message(engine, capsys):
    """A --system as long as the context window was reported as every message being too long; now it is
    refused at the start, and a /system that long leaves the prompt as it was. A message too long beside
    a large system prompt says how much of the window the system prompt takes."""
    params = replace(GREEDY, max_new_tokens=4)
    ctx = engine.context_length
    huge = "系统" * ctx
    for interactive in (True, False):
        with pytest.raises(TinykError, match=rf"^the system prompt is too long: with it the conversation takes at "
                                             rf"least [\d,]+ tokens before any message, and the model's context "
                                             rf"window is {ctx}$"):
            chat_session(engine, params, ["hi"], io.StringIO(), system=huge, interactive=interactive)
    history = chat_session(engine, params, [f"/system {huge}", "你好"], io.StringIO(), system="你是诗人")
    assert "; system prompt unchanged)" in capsys.readouterr().err and len(history) == 2
    assert history[1]["content"] == \
        engine.generate([engine.chat_ids(history[:1], default_system="你是诗人")], params)[0].text
    system = next(s for k in range(1, ctx) if len(engine.chat_ids([{"role": "user", "content": ""}],
                                                                  default_system=(s := "系统" * k))) > ctx // 2)
    message = next(m for k in range(1, ctx) if len(engine.chat_ids([{"role": "user", "content": (m := "好" * k)}],
                                                                   default_system=system)) >= ctx)
    with pytest.raises(TinykError, match=r"^message too long: .*; the system prompt and chat markers take [\d,]+$"):
        chat_session(engine, params, [message], io.StringIO(), system=system, interactive=False)


def test_chat_says_when_a_reply_is_empty(tok_dir, capsys):
    """An undertrained model may end its turn at once: the blank line after `assistant>` gets a note, so
    the chat does not look broken."""
    tok = load_tokenizer(tok_dir)
    model = Transformer(ModelConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=tok.vocab_size,
                                    max_seq_len=64))
    with torch.no_grad():
        model.model.norm.weight.zero_()  # all-zero logits: greedy decoding picks id 0, <unk>, which ends a reply
    out = io.StringIO()
    history = chat_session(Engine(model.eval(), tok), replace(GREEDY, ignore_eos=False), ["你好"], out, system=None)
    assert history[1] == {"role": "assistant", "content": ""} and out.getvalue() == "assistant> \n"
    assert "(empty reply: the model ended its turn at once)" in capsys.readouterr().err


def test_a_command_typed_with_chinese_punctuation_on_is_a_command(engine, capsys):
    """With a Chinese input method's punctuation on, the "/" key gives "、" (or "／"): "、reset" was sent
    to the model as a message. Only a command's name after it counts; anything else stays a message."""
    params = replace(GREEDY, max_new_tokens=2)
    lines = ["你好", "、reset", "／help", "、这是消息", "、"]
    history = chat_session(engine, params, lines, io.StringIO(), system=None)
    err = capsys.readouterr().err
    assert "(conversation reset)" in err and CHAT_HELP in err
    assert [m["content"] for m in history if m["role"] == "user"] == ["、这是消息", "、"]


def test_an_empty_reply_cut_by_a_stop_string_is_not_blamed_on_the_model(engine, capsys):
    first = engine.generate([engine.chat_ids([user("你好")], default_system=None)], GREEDY)[0].text
    history = chat_session(engine, replace(GREEDY, stop=[first[0]]), ["你好"], io.StringIO(), system=None)
    assert history[1]["content"] == "" and "(empty reply: it began with a stop string)" in capsys.readouterr().err


def test_ctrl_c_stops_the_reply_not_the_chat(engine, capsys, monkeypatch):
    run = engine.run

    def interrupted(requests):
        for i, event in enumerate(run(requests)):
            if i == 2:
                raise KeyboardInterrupt
            yield event

    monkeypatch.setattr(engine, "run", interrupted)
    out = io.StringIO()
    params = replace(GREEDY, max_new_tokens=8)
    history = chat_session(engine, params, ["你好", "再见"], out, system=None)
    assert [m["role"] for m in history] == ["user", "assistant"] * 2
    assert capsys.readouterr().err.count("(reply stopped)") == 2
    assert out.getvalue() == "".join(f"assistant> {m['content']}\n" for m in history[1::2])
    with pytest.raises(KeyboardInterrupt):  # one-shot: Ctrl-C ends the command as everywhere else
        chat_session(engine, params, ["你好"], io.StringIO(), system=None, interactive=False)

    def before_the_first_token(requests):
        yield from ()
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "run", before_the_first_token)
    history = chat_session(engine, params, ["你好"], io.StringIO(), system=None)
    assert history == [] and "the message is forgotten too" in capsys.readouterr().err  # no empty answer kept

    for stop in (Terminated(), Stopped("SIGHUP")):  # SIGTERM (kill, a scheduler), a hang-up: the chat ends too
        def stopped(requests, stop=stop):
            yield from ()
            raise stop

        monkeypatch.setattr(engine, "run", stopped)
        out = io.StringIO()
        with pytest.raises(type(stop)):
            chat_session(engine, params, ["你好", "再见"], out, system=None)
        assert out.getvalue() == "assistant> \n"  # "tinyk: terminated" then starts a line of its own


def test_ctrl_c_while_a_message_is_tokenized_keeps_the_chat(engine, capsys, monkeypatch):
    """Ctrl-C just after Enter, while a long history is tokenized (before the reply's own handler): the
    message is withdrawn and the session goes on; it used to end the chat."""
    params = replace(GREEDY, max_new_tokens=4)
    chat_ids, calls = engine.chat_ids, []

    def slow(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return chat_ids(*args, **kwargs)

    monkeypatch.setattr(engine, "chat_ids", slow)
    try:
        history = chat_session(engine, params, ["你好", "再见", "谢谢"], io.StringIO(), system=None)
    except KeyboardInterrupt:  # not up to pytest, which would stop the whole session
        pytest.fail("Ctrl-C while a message was tokenized ended the chat")
    assert [m["content"] for m in history[::2]] == ["你好", "谢谢"]
    assert "(stopped; the message is forgotten)" in capsys.readouterr().err
    calls.clear()
    with pytest.raises(KeyboardInterrupt):  # one-shot: Ctrl-C ends the command
        chat_session(engine, params, ["你好", "再见"], io.StringIO(), system=None, interactive=False)


def test_a_reply_stopped_before_its_first_token_leaves_the_conversation_as_it_was(engine, capsys, monkeypatch):
    """The oldest turns forgotten to make room for a message come back when that message is withdrawn."""
    params = replace(GREEDY, max_new_tokens=8)
    messages = ["我们今天去公园散步" * 3] * 6
    before = chat_session(engine, params, messages[:5], io.StringIO(), system=None)
    forgot_before = capsys.readouterr().err.count("forgot the oldest")
    run, calls = engine.run, []

    def stopped_at_the_sixth(requests):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        yield from run(requests)

    monkeypatch.setattr(engine, "run", stopped_at_the_sixth)
    after = chat_session(engine, params, messages, io.StringIO(), system=None)
    err = capsys.readouterr().err
    assert err.count("forgot the oldest") == forgot_before + 1, "the sixth message must forget turns to fit"
    assert "the message is forgotten too" in err and after == before


def test_the_you_prompt_goes_where_the_person_typing_sees_it(monkeypatch, capsys):
    """With replies redirected to a file (`tinyk chat > chat.txt`) the prompt goes to stderr, not the file."""
    from tinyk.cli.generate import _input_lines

    asked: list[str] = []
    monkeypatch.setattr("builtins.input", lambda prompt="": asked.append(prompt) or "你好")
    assert next(_input_lines()) == "你好" and asked == [""]
    assert capsys.readouterr() == ("", "you> ")
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert next(_input_lines()) == "你好" and asked == ["", "you> "]

    def hung_up(prompt=""):  # once: a chat that took it for Ctrl-C would read the next line
        if asked.append(prompt) or len(asked) == 3:
            raise Stopped("SIGHUP")
        return "go on"

    monkeypatch.setattr("builtins.input", hung_up)  # at the prompt only Ctrl-C clears the line and asks again
    capsys.readouterr()
    with pytest.raises(Stopped):
        next(_input_lines())
    assert capsys.readouterr().err == "\n"  # "tinyk: stopped by SIGHUP" gets a line of its own, not the prompt's


def test_chat_session_forgets_old_turns_to_fit(engine, capsys, monkeypatch):
    params = replace(GREEDY, max_new_tokens=8)
    long = "我们今天去公园散步" * 3
    history = chat_session(engine, params, [long] * 6, io.StringIO(), system=None)
    assert "forgot the oldest turn" in capsys.readouterr().err
    shown = engine.tok.apply_chat_template(history[:-1], True, None)
    assert len(engine.encode(shown)) + params.max_new_tokens <= engine.context_length
    # A message too long on its own is refused and the conversation kept, not forgotten first.
    history = chat_session(engine, params, ["你好", "很" * 400, "再见"], io.StringIO(), system=None)
    err = capsys.readouterr().err
    assert "message too long" in err and "forgot" not in err
    assert [m["content"] for m in history[::2]] == ["你好", "再见"]
    with pytest.raises(TinykError, match="message too long"):
        chat_session(engine, params, ["很" * 400], io.StringIO(), system=None, interactive=False)
    # A pasted megabyte is refused before it is tokenized (600,000 characters took 2.5 s, and Ctrl-C
    # meanwhile ended the session).
    monkeypatch.setattr(engine.tok, "encode", lambda *a, **k: pytest.fail("tokenized"))
    history = chat_session(engine, params, ["北京大学" * 150_000], io.StringIO(), system=None)
    assert history == [] and "message too long: the prompt has at least" in capsys.readouterr().err


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def test_chat_keeps_half_the_window_for_a_long_budget_not_the_whole_budget(engine, capsys):
    """The reply's room is its --max-new-tokens but never more than half the window: a budget past the
    window (the default 256 on a 128-token model) must not forget every turn, and the half is kept."""
    ctx = engine.context_length
    # Every token ends the reply at once: an empty reply, so the history is just the user's messages.
    params = replace(GREEDY, max_new_tokens=10 * ctx, stop_token_ids=list(range(engine.vocab_size)))

    def second_prompt(k: int) -> int:
        return len(engine.chat_ids([user("好" * k), {"role": "assistant", "content": ""}, user("好")]))

    short = 1
    middle = next(k for k in range(1, ctx) if ctx // 2 < second_prompt(k) < ctx - ctx // 4)
    for k in (short, middle):
        history = chat_session(engine, params, ["好" * k, "好"], io.StringIO(), system=None)
        forgot = "forgot the oldest turn" in capsys.readouterr().err
        must_forget = second_prompt(k) + ctx // 2 > ctx
        assert forgot == must_forget, k
        assert [m["content"] for m in history[::2]] == (["好"] if must_forget else ["好" * k, "好"])


def test_quit_ends_the_chat_as_exit_does(engine, capsys):
    """CHAT_HELP offers "/exit or /quit": both end the session, and nothing after them is answered."""
    params = replace(GREEDY, max_new_tokens=2)
    for command in ("/exit", "/quit"):
        out = io.StringIO()
        assert chat_session(engine, params, [command, "你好"], out, system=None) == [], command
        assert out.getvalue() == "" and "unknown command" not in capsys.readouterr().err


def spy_chat_prompts(monkeypatch) -> list[list[dict]]:
    """The messages (system prompt included) each chat turn is prompted with, by any Engine (the CLI's
    too): the fixture model's greedy reply is the same whatever the prompt, so replies cannot tell them apart."""
    sent, chat_ids = [], Engine.chat_ids
    monkeypatch.setattr(Engine, "chat_ids", lambda self, messages, *a, **k: sent.append(messages)
                        or chat_ids(self, messages, *a, **k))
    return sent


def test_a_line_of_spaces_is_no_message_and_a_message_is_sent_without_its_edges(engine):
    out = io.StringIO()
    history = chat_session(engine, replace(GREEDY, max_new_tokens=2), ["   ", "\t", "  你好  "], out, system=None)
    assert history[0] == {"role": "user", "content": "你好"} and out.getvalue().count("assistant> ") == 1


def test_a_one_shot_message_is_sent_as_typed_even_with_two_slashes(engine):
    """Only an interactive chat has commands, and so "//" to escape them; `--message //x` is that text."""
    history = chat_session(engine, replace(GREEDY, max_new_tokens=2), ["//usr"], io.StringIO(), system=None,
                           interactive=False)
    assert history[0]["content"] == "//usr"


def test_a_system_prompt_of_several_words_is_kept_whole(engine, monkeypatch):
    sent = spy_chat_prompts(monkeypatch)
    chat_session(engine, replace(GREEDY, max_new_tokens=2), ["/system You are a poet", "hi"], io.StringIO(),
                 system=None)
    assert sent[0][0] == {"role": "system", "content": "You are a poet"}


def test_reset_says_so(engine, capsys):
    chat_session(engine, replace(GREEDY, max_new_tokens=2), ["你好", "/reset"], io.StringIO(), system=None)
    assert capsys.readouterr().err.endswith("(conversation reset)\n")


def test_ctrl_c_after_the_reply_was_shown_forgets_the_turn_whole(engine, monkeypatch, capsys):
    """Stopped while the finished reply is collected: no user turn is left without its answer."""
    request = engine.request

    def interrupted(*args, **kwargs):
        r = request(*args, **kwargs)
        r.completion = lambda: (_ for _ in ()).throw(KeyboardInterrupt)
        return r

    monkeypatch.setattr(engine, "request", interrupted)
    assert chat_session(engine, replace(GREEDY, max_new_tokens=2), ["你好"], io.StringIO(), system=None) == []
    assert "(stopped; the message is forgotten)" in capsys.readouterr().err


def test_a_one_shot_message_that_is_not_utf8_is_refused_from_python_too(engine):
    with pytest.raises(TinykError, match="not valid UTF-8"):
        chat_session(engine, GREEDY, ["\udcc4\udce3"], io.StringIO(), system=None, interactive=False)


def test_a_system_prompt_over_a_quarter_of_the_window_is_named_when_a_message_does_not_fit(engine):
    ctx = engine.context_length
    system = next(s for k in range(1, ctx) if engine.system_tokens(s := "系统" * k) > ctx // 3)
    assert ctx // 4 < engine.system_tokens(system) <= ctx // 2
    message = next(m for k in range(1, ctx) if len(engine.chat_ids([{"role": "user", "content": (m := "好" * k)}],
                                                                   default_system=system)) >= ctx)
    with pytest.raises(TinykError, match="the system prompt and chat markers take"):
        chat_session(engine, GREEDY, [message], io.StringIO(), system=system, interactive=False)


class FlushLog(io.StringIO):
    """A stream that records what it held at each flush: a reply is shown as it is made, not at its end."""

    def __init__(self) -> None:
        super().__init__()
        self.flushed: list[str] = []

    def flush(self) -> None:
        self.flushed.append(self.getvalue())


def test_a_chat_reply_is_flushed_as_it_streams(engine):
    out = FlushLog()
    chat_session(engine, replace(GREEDY, max_new_tokens=4), ["你好"], out, system=None)
    assert len(out.flushed) >= 2 and out.flushed[0].startswith("assistant> ") and out.flushed[0] != out.flushed[-1]


def test_generate_flushes_its_text_as_it_streams(nano_model_dir, monkeypatch):
    out = FlushLog()
    monkeypatch.setattr(sys, "stdout", out)
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(nano_model_dir), "--prompt", "我们", "--max-new-tokens", "4",
              "--temperature", "0"])
    assert len(out.flushed) >= 2 and out.flushed[0].startswith("我们") and out.flushed[0] != out.flushed[-1]


def test_generate_no_bos_prompts_without_im_start(nano_model_dir, engine, capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(nano_model_dir), "--prompt", "我们", "--no-bos", "--json",
              "--max-new-tokens", "1"])
    assert json.loads(capsys.readouterr().out)["prompt_tokens"] == len(engine.encode("我们", bos=False))


def test_ctrl_d_at_the_chat_prompt_ends_its_line(monkeypatch, capsys):
    """Else the shell's prompt would follow "you> " on the same line."""
    from tinyk.cli.generate import _input_lines

    def end_of_input(prompt: str = "") -> str:
        raise EOFError

    monkeypatch.setattr("builtins.input", end_of_input)
    assert list(_input_lines()) == [] and capsys.readouterr().err == "you> \n"


def test_chat_reads_a_line_that_is_not_utf8_from_a_strict_terminal_in_one_line(nano_model_dir, monkeypatch, capsys):
    """A terminal whose stdin decodes strictly (a UTF-8 locale) raised UnicodeDecodeError on a GBK line."""

    class Terminal(io.TextIOWrapper):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stdin", Terminal(io.BytesIO("你好".encode("gbk") + b"\n"), encoding="utf-8",
                                                errors="strict"))
    monkeypatch.setattr("tinyk.cli.generate._input_lines", lambda: iter([sys.stdin.readline()]))
    with pytest.raises(SystemExit) as e:
        main(["chat", "--model", str(nano_model_dir), "--max-new-tokens", "2"])
    assert e.value.code == 0 and "not valid UTF-8" in capsys.readouterr().err


def test_generate_ends_its_text_before_the_cut_note_when_stdout_is_buffered(nano_model_dir):
    """Without PYTHONUNBUFFERED (which this machine's environment sets) stdout is flushed only when told: the note on
    stderr must come after the text's newline, not inside it."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    r = subprocess.run([sys.executable, "-m", "tinyk", "generate", "--model", str(nano_model_dir), "--prompt", "我们",
                        "--max-new-tokens", "500", "--temperature", "0"], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, env=env, text=True, timeout=300)
    assert r.returncode == 0 and "\n(cut at " in r.stdout, r.stdout[-300:]


def test_system_sets_the_prompt_and_resets_and_a_bare_system_clears_it(engine, capsys, monkeypatch):
    """/system TEXT: the next message is prompted under TEXT with the earlier turns forgotten; /system
    alone clears the system prompt."""
    params = replace(GREEDY, max_new_tokens=2)
    sent = spy_chat_prompts(monkeypatch)
    history = chat_session(engine, params, ["你好", "/system 你是诗人", "写诗"], io.StringIO(), system=None)
    assert "(system prompt set; conversation reset)" in capsys.readouterr().err
    assert sent == [[user("你好")], [{"role": "system", "content": "你是诗人"}, user("写诗")]]
    assert [m["content"] for m in history[::2]] == ["写诗"]
    sent.clear()
    history = chat_session(engine, params, ["你好", "/system", "写诗"], io.StringIO(), system="你是诗人")
    assert "(system prompt cleared; conversation reset)" in capsys.readouterr().err
    assert sent == [[{"role": "system", "content": "你是诗人"}, user("你好")], [user("写诗")]]
    assert [m["content"] for m in history[::2]] == ["写诗"]


def test_a_reply_cut_short_says_how_many_tokens_it_got(engine, capsys):
    """"(reply cut at N tokens; ...)": N is the reply's own count, which the context window may have
    made smaller than --max-new-tokens."""
    prompt, ctx = len(engine.chat_ids([user("你好")], default_system=None)), engine.context_length
    for budget, why in ((4, "raise --max-new-tokens for longer"),
                        (10**4, f"the context window is full: the prompt took {prompt} of its {ctx} tokens")):
        params = replace(GREEDY, max_new_tokens=budget)
        chat_session(engine, params, ["你好"], io.StringIO(), system=None)
        got = engine.generate([engine.chat_ids([user("你好")])], params)[0].completion_tokens
        assert got < budget or budget == 4
        assert f"(reply cut at {got} tokens; {why})" in capsys.readouterr().err


def test_chat_escapes_control_characters_for_a_terminal(engine, monkeypatch):
    """As generate does: a reply's ESC [2J must not clear the user's screen; a file gets it as it is."""
    run = engine.run

    def with_escape(requests):
        for r, delta in run(requests):
            yield r, "\x1b[2J" + delta

    monkeypatch.setattr(engine, "run", with_escape)
    params = replace(GREEDY, max_new_tokens=2)
    for out, tty in ((Terminal(), True), (io.StringIO(), False)):
        chat_session(engine, params, ["你好"], out, system=None)
        assert ("\x1b" in out.getvalue()) != tty and ("\\x1b[2J" in out.getvalue()) == tty


def test_a_one_shot_message_too_long_to_tokenize_says_message_too_long(engine):
    """--message with a pasted megabyte is refused before it is tokenized, worded as any too-long message."""
    with pytest.raises(TinykError, match=r"^message too long: the prompt has at least "):
        chat_session(engine, GREEDY, ["北京大学" * 150_000], io.StringIO(), system=None, interactive=False)


def test_chat_one_shot_takes_a_bom_and_a_slash_as_message_text(nano_model_dir, engine, monkeypatch, capsys):
    """Piped input loses Notepad's BOM, and a one-shot message starting with "/" is a message, not a command."""
    system = {"role": "system", "content": engine.tok.system_prompt}
    sent = spy_chat_prompts(monkeypatch)
    monkeypatch.setattr("sys.stdin", io.StringIO("\ufeff你好\n"))
    with pytest.raises(SystemExit) as e:
        main(["chat", "--model", str(nano_model_dir), "--temperature", "0", "--max-new-tokens", "2"])
    assert e.value.code == 0 and sent == [[system, user("你好")]]
    sent.clear()
    for message in ("/help", "/exit"):
        with pytest.raises(SystemExit) as e:
            main(["chat", "--model", str(nano_model_dir), "--message", message, "--temperature", "0",
                  "--max-new-tokens", "2"])
        out, err = capsys.readouterr()
        assert e.value.code == 0 and sent[-1] == [system, user(message)] and out.endswith("\n") and len(out) > 1


def test_generate_passes_stop_min_p_and_repetition_penalty_to_the_engine(engine, nano_model_dir, capsys):
    """--stop, --min-p and --repetition-penalty reach the sampler: the CLI's text is the engine's."""
    def cli(*flags: str) -> dict:
        with pytest.raises(SystemExit) as e:
            main(["generate", "--model", str(nano_model_dir), "--prompt", "我们", "--max-new-tokens", "12", "--json",
                  *flags])
        assert e.value.code == 0
        return json.loads(capsys.readouterr().out)

    params = SamplingParams(temperature=0, repetition_penalty=1.0, max_new_tokens=12)
    text = engine.generate(["我们"], params)[0].text
    stop = text.strip()[1:3]
    assert len(stop) == 2 and stop in text
    row = cli("--temperature", "0", "--repetition-penalty", "1", "--stop", stop)
    assert (row["text"], row["finish_reason"]) == (text[:text.index(stop)], "stop")
    # min-p 1 keeps only the likeliest token: sampling hot and seeded is then greedy decoding.
    row = cli("--temperature", "5", "--top-k", "0", "--top-p", "1", "--min-p", "1", "--repetition-penalty", "1",
              "--seed", "3")
    assert row["text"] == text
    strong = engine.generate(["我们"], replace(params, repetition_penalty=10))[0].text
    assert strong != text
    assert cli("--temperature", "0", "--repetition-penalty", "10")["text"] == strong


def test_generate_from_stdin_skips_blank_lines_of_spaces(nano_model_dir, monkeypatch, capsys):
    """A line of spaces (a pasted list's gaps) is not a prompt, as an empty one is not."""
    monkeypatch.setattr("sys.stdin", io.StringIO("我们\n   \n\t\n天气\n"))
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(nano_model_dir), "--prompt-file", "-", "--max-new-tokens", "1", "--json"])
    assert e.value.code == 0
    assert [json.loads(line)["prompt"] for line in capsys.readouterr().out.splitlines()] == ["我们", "天气"]


def test_a_skipped_prompt_keeps_the_seeds_of_those_after_it(engine, nano_model_dir, tmp_path, capsys):
    """The i-th prompt samples with seed + i whether or not one before it was skipped as too long, so
    "sample 3" of a file is what prompt 3 gives alone with seed + 2."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("中国" * 200 + "\n我们\n我们\n", encoding="utf-8")
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(nano_model_dir), "--prompt-file", str(prompts), "--seed", "7",
              "--temperature", "1.5", "--top-k", "0", "--top-p", "1", "--max-new-tokens", "8", "--json"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    params = SamplingParams(temperature=1.5, top_k=0, top_p=1.0, max_new_tokens=8)
    alone = {i + 1: engine.generate(["我们"], replace(params, seed=7 + i))[0].text for i in (1, 2)}
    assert e.value.code == 0 and {r["sample"]: r["text"] for r in rows} == alone


def test_several_stop_strings_in_one_token_cut_at_the_first(engine):
    """A token holding two stop strings ("我们今天" is one token of the fixture's
    tokenizer) ends the text at the earlier one, or the later stop string's text leaks out."""
    ids = engine.tok.encode("我们今天")
    assert len(ids) == 1, "the fixture tokenizer no longer has 我们今天 as one token"
    d = Detokenizer(engine.tok, ["今天", "我们"])
    assert d.add(ids[0]) + d.flush() == "" and d.stopped and d.text == ""


def test_every_stop_string_stops_not_only_the_first(engine):
    """--stop is repeatable and the server takes a list: the second stop string
    ends the text as the first would."""
    params = replace(GREEDY, max_new_tokens=12)
    text = engine.generate(["我们"], params)[0].text
    stop = text.strip()[1:3]
    assert len(stop) == 2 and stop in text
    c = engine.generate(["我们"], replace(params, stop=["never in the text", stop]))[0]
    assert (c.text, c.finish_reason) == (text[:text.index(stop)], "stop")


def test_top_k_holds_for_its_row_when_batched_with_a_row_without_it(engine):
    """A top_k 1 request batched with a top_k 0 one must still be greedy."""
    hot = SamplingParams(temperature=1.5, top_k=0, top_p=1.0, max_new_tokens=16, seed=7, ignore_eos=True)
    greedy = engine.generate(["我们今天"], replace(GREEDY, max_new_tokens=16))[0].token_ids
    assert engine.generate(["我们今天"], replace(hot, top_k=1))[0].token_ids == greedy
    batched = engine.generate(["我们今天", "天气很好"], [replace(hot, top_k=1), hot])
    assert batched[0].token_ids == greedy


def test_fit_chat_keeps_a_history_that_leaves_exactly_the_room_asked(engine):
    """A prompt of ctx - room tokens leaves the reply its room exactly
    (max_new = ctx - prompt), so no turn is dropped; one token more and the oldest pair goes."""
    ctx = engine.context_length
    chat = [user("你好"), {"role": "assistant", "content": "我们今天去公园散步"}, user("好")]
    total = len(engine.chat_ids(chat))
    room = ctx - total
    assert room > 0
    assert engine.fit_chat(chat, None, room) == chat
    assert engine.fit_chat(chat, None, room + 1) == chat[2:]
    # and the room is really there: a reply of `room` tokens fits the window
    c = engine.generate([engine.chat_ids(chat)], replace(GREEDY, max_new_tokens=room))[0]
    assert c.completion_tokens == room and not c.cut_by_context


def test_fit_chat_drops_a_turn_whose_bytes_alone_bound_the_prompt_at_the_window(engine):
    """A history whose bound is exactly the window (at least
    ctx tokens: it cannot fit) must still lose its oldest turns, not be returned whole (then refused as
    too long by `tinyk serve --fit-context` and `tinyk chat`)."""
    ctx, most = engine.context_length, engine.tok.max_token_bytes
    last, answer = user("好"), {"role": "assistant", "content": ""}
    # check_fits's bound for the three messages: nbytes // most + 3 * 3 == ctx
    nbytes = (ctx - 9) * most - len("好".encode())
    chat = [user("a" * nbytes), answer, last]
    assert least_tokens(engine.tok, sum(utf8_size(m["content"]) for m in chat), 3, 3) == ctx
    fitted = engine.fit_chat(chat, None, 4)
    assert fitted == [last]
    engine.chat_prompt_ids(fitted)  # fits


def test_a_lone_prompt_too_long_is_refused_as_the_prompt_not_as_one_of_many(engine, nano_model_dir, tmp_path, capsys):
    """One prompt (a file's only line, or --prompt-file -'s) too long for the window is
    the error itself, not "no prompt fits ... (the first: prompt 1 of 1 ...)"."""
    with pytest.raises(TinykError, match=r"^the prompt has [\d,]+ tokens but the model's context window is"):
        engine.encode_prompts(["中国" * 200])
    one = tmp_path / "one.txt"
    one.write_text("中国" * 200 + "\n", encoding="utf-8")
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(nano_model_dir), "--prompt-file", str(one), "--max-new-tokens", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("tinyk: error: the prompt has "), err


def test_a_reply_cut_before_its_first_character_is_not_called_an_empty_turn(engine, capsys, monkeypatch):
    """A reply that is empty because --max-new-tokens cut its first character
    (its first byte of three) was cut, not ended by the model: only the cut is reported."""
    lead = _byte_token(engine.tok, 0xE4)  # the first byte of a Chinese character
    monkeypatch.setattr(engine, "sample", lambda logits, seen, p, rngs: torch.full((logits.shape[0],), lead))
    history = chat_session(engine, replace(GREEDY, max_new_tokens=1), ["你好"], io.StringIO(), system=None)
    assert history[1] == {"role": "assistant", "content": ""}
    err = capsys.readouterr().err
    assert "(reply cut at 1 token; raise --max-new-tokens for longer)" in err
    assert "empty reply" not in err


def test_an_interactive_chat_opens_with_its_commands(nano_model_dir, monkeypatch, capsys):
    """`tinyk chat` at a terminal first says which model it talks to and its /commands (how else would
    a user learn /reset or /exit?); a one-shot message gets no such line."""
    monkeypatch.setattr("tinyk.cli.generate._input_lines", lambda: iter(["/exit"]))  # no readline in pytest
    monkeypatch.setattr("sys.stdin", Terminal(""))
    with pytest.raises(SystemExit) as e:
        main(["chat", "--model", str(nano_model_dir)])
    assert e.value.code == 0 and capsys.readouterr().err == f"tinyk chat: {nano_model_dir} ({CHAT_HELP})\n"
    with pytest.raises(SystemExit) as e:
        main(["chat", "--model", str(nano_model_dir), "--message", "你好", "--max-new-tokens", "1"])
    assert e.value.code == 0 and "tinyk chat:" not in capsys.readouterr().err


def filtered_distribution(logits: np.ndarray, seen: np.ndarray, temperature: float, top_k: int, top_p: float,
                          min_p: float, penalty: float) -> np.ndarray:
    """The distribution a sampled token is drawn from, computed independently in float64: HF's repetition
    penalty on seen ids, temperature, top-k (ties with the k-th kept), top-p (the smallest head reaching
    top_p), min-p (relative to the likeliest token), renormalized after each."""
    x = logits.astype(np.float64).copy()
    x[seen] = np.where(x[seen] > 0, x[seen] / penalty, x[seen] * penalty)
    x = x / temperature
    if top_k > 0:
        x[x < np.sort(x)[::-1][min(top_k, len(x)) - 1]] = -np.inf
    p = np.exp(x - x.max())
    p /= p.sum()
    if top_p < 1:
        order = np.argsort(-p)
        before = np.cumsum(p[order]) - p[order]
        p[order[before >= top_p]] = 0
        p /= p.sum()
    p[p < min_p * p.max()] = 0
    return p / p.sum()


def test_each_rows_draw_follows_its_own_filtered_distribution_in_a_mixed_batch():
    """Inverse-CDF sampling draws from exactly the distribution that penalty, temperature, top-k, top-p
    and min-p leave, computed here independently: a draw u lands on the token whose share of the kept mass
    (tokens in order of likelihood) holds u, and never on a token the filters removed. Many rows with
    different settings are sampled in one batch, so each row's settings must stay its own."""
    gen = torch.Generator().manual_seed(0)
    V = 24
    logits_rows, seen_rows, rows, rngs, want = [], [], [], [], []
    cases = 0
    while cases < 60:
        logits = (torch.randn(V, generator=gen) * 2.5).numpy()
        seen = (torch.rand(V, generator=gen) < 0.3).numpy()
        kw = dict(temperature=float(torch.empty(1).uniform_(0.3, 1.8, generator=gen)),
                  top_k=int(torch.randint(0, 12, (1,), generator=gen)),
                  top_p=float(torch.empty(1).uniform_(0.3, 1.0, generator=gen)) if cases % 3 else 1.0,
                  min_p=float(torch.empty(1).uniform_(0.0, 0.3, generator=gen)) if cases % 2 else 0.0,
                  repetition_penalty=float(torch.empty(1).uniform_(1.0, 2.0, generator=gen)))
        q = filtered_distribution(logits, seen, kw["temperature"], kw["top_k"], kw["top_p"], kw["min_p"],
                                  kw["repetition_penalty"])
        order = np.argsort(-q, kind="stable")
        cdf = np.cumsum(q[order])
        kept = int((q > 0).sum())
        # skip cases a float32 rounding could decide: a top-p boundary or min-p threshold within 1e-4
        x = logits.astype(np.float64).copy()
        x[seen] = np.where(x[seen] > 0, x[seen] / kw["repetition_penalty"], x[seen] * kw["repetition_penalty"])
        if np.min(np.abs(np.diff(np.sort(x)))) < 1e-3 or (q[q > 0].min() < 1e-4):
            continue
        full = np.exp(x / kw["temperature"] - (x / kw["temperature"]).max())
        if kw["top_k"]:
            full[x < np.sort(x)[::-1][kw["top_k"] - 1]] = 0
        full /= full.sum()
        s = np.sort(full)[::-1]
        if kw["top_p"] < 1 and np.min(np.abs(np.cumsum(s) - s - kw["top_p"])) < 1e-4:
            continue
        head = full.copy()
        if kw["top_p"] < 1:
            head[np.isin(np.arange(V), np.argsort(-full)[(np.cumsum(s) - s) >= kw["top_p"]])] = 0
        head /= head.sum()
        if kw["min_p"] and np.min(np.abs(head[head > 0] - kw["min_p"] * head.max())) < 1e-4:
            continue
        cases += 1
        for j in range(kept):  # the middle of each kept token's interval of [0, 1)
            u = (cdf[j] - q[order[j]] / 2) / cdf[-1]
            logits_rows.append(logits)
            seen_rows.append(seen)
            rows.append(Row(**kw))
            rngs.append(Rng(float(u)))
            want.append(int(order[j]))
        logits_rows.append(logits)  # the very top of the draws: still the least likely kept token
        seen_rows.append(seen)
        rows.append(Row(**kw))
        rngs.append(Rng(1 - 2 ** -53))
        want.append(int(order[kept - 1]))
    p = _ParamTensors(rows, torch.device("cpu"))
    got = Engine.sample(torch.tensor(np.stack(logits_rows), dtype=torch.float32),
                        torch.tensor(np.stack(seen_rows)), p, rngs)
    assert got.tolist() == want


def test_a_negative_seed_is_its_own_not_its_absolute_values(engine):
    """Python's random.Random(-s) is random.Random(s); the engine keeps every 64-bit seed distinct
    (seed modulo 2**64), so -5 samples differently from 5, while one seed always samples the same."""
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0, max_new_tokens=8,
                            ignore_eos=True)
    five, minus_five, again = (engine.generate(["我们今天"], replace(params, seed=s))[0].token_ids for s in (5, -5, -5))
    assert minus_five == again
    assert minus_five != five


def _first_size(sizes, make, want: int) -> int:
    """The first n in `sizes` whose token count (`make(n)`) is `want`."""
    return next(n for n in sizes if make(n) == want)


def test_a_text_prompt_of_exactly_the_window_is_refused_and_one_less_gets_one_token(engine):
    """A text prompt (with the <|im_start|> it starts with) must leave at least one token of the window for
    the reply: at exactly context_length tokens it is a ContextLengthError, at one less it decodes one token,
    cut by the context."""
    from tinyk.engine import ContextLengthError, document_ids

    ctx, tok = engine.context_length, engine.tok
    n = _first_size(range(1, 4 * ctx), lambda n: len(document_ids(tok, "a" * n)), ctx)
    with pytest.raises(ContextLengthError, match=f"{ctx:,} tokens"):
        engine.encode("a" * n)
    m = _first_size(range(1, 4 * ctx), lambda n: len(document_ids(tok, "a" * n)), ctx - 1)
    c = engine.generate(["a" * m], SamplingParams(temperature=0, max_new_tokens=5, ignore_eos=True))[0]
    assert (c.prompt_tokens, c.completion_tokens, c.finish_reason, c.cut_by_context) == (ctx - 1, 1, "length", True)


def test_a_chat_prompt_of_exactly_the_window_is_refused(engine):
    """A chat whose rendered prompt (generation prompt included) is exactly context_length tokens has no
    room for a reply: ContextLengthError, from the engine and from the tokenizer-only check `tinyk eval` uses;
    one token shorter is accepted."""
    from tinyk.engine import ContextLengthError, chat_prompt_ids

    ctx, tok = engine.context_length, engine.tok

    def msgs(n):
        return [{"role": "user", "content": "1" * n}]

    def size(n):
        return len(tok.encode_chat(msgs(n), add_generation_prompt=True))

    n = _first_size(range(4 * ctx), size, ctx)
    for check in (engine.chat_prompt_ids, lambda m: chat_prompt_ids(tok, ctx, m)):
        with pytest.raises(ContextLengthError, match=f"{ctx:,} tokens"):
            check(msgs(n))
    m = _first_size(range(4 * ctx), size, ctx - 1)
    assert len(engine.chat_prompt_ids(msgs(m))) == len(chat_prompt_ids(tok, ctx, msgs(m))) == ctx - 1


def test_tokens_spelled_before_a_stop_string_cut_at_a_token_boundary(tok_dir):
    """spelled() counts the tokens that begin inside the text a stop string left: when the stop string
    starts exactly where a token starts, that token (and every later one) is past the cut and not
    counted; a stop string starting inside a token keeps that token."""
    from tinyk.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_dir)
    text = "天气很好我们今天去公园散步"
    ids = tok.encode(text)
    # a token boundary past the first token that falls between whole characters
    k = next(k for k in range(1, len(ids))
             if text.startswith(tok.decode(ids[:k])) and "\ufffd" not in tok.decode(ids[:k]))
    before = tok.decode(ids[:k])
    d = Detokenizer(tok, [text[len(before):len(before) + 2]])
    for i in ids:
        d.add(i)
        if d.stopped:
            break
    assert d.stopped and d.text == before
    assert d.spelled() == k
    mid = tok.decode(ids[k:k + 1])
    if len(mid) > 1:  # a stop string from the second character of token k keeps token k
        d = Detokenizer(tok, [text[len(before) + 1:len(before) + 3]])
        for i in ids:
            d.add(i)
            if d.stopped:
                break
        assert d.text == before + mid[0] and d.spelled() == k + 1


def test_the_bytes_of_a_character_a_stop_string_follows_are_all_spelled(engine):
    """The last bytes of 衉, sent a token each before the stop string 一, seemed to begin after it (at the
    U+FFFD that stood for it): logprobs dropped them, and their bytes no longer made the reply's text."""
    tok = engine.tok
    ids = [_byte_token(tok, b) for b in (0xA2, *"衉".encode())] + tok.encode("一")
    d = Detokenizer(tok, ["一"])
    for i in ids:
        d.add(i)
    assert d.stopped and d.text == "\ufffd衉" and d.spelled() == 4
    assert b"".join(tok.piece(i) for i in ids[:d.spelled()]).decode("utf-8", errors="replace") == d.text
    # A reply cut short inside a character drops it from the text, and its bytes' tokens with it.
    d, ids = Detokenizer(tok, []), tok.encode("好") + [_byte_token(tok, b) for b in "衉".encode()[:2]]
    for i in ids:
        d.add(i)
    assert d.spelled() == len(ids)
    assert d.flush(cut_short=True) == "" and d.text == "好" and d.spelled() == len(ids) - 2


def test_flushing_a_cut_reply_twice_drops_only_the_unfinished_character(engine):
    """A reply cut mid-character loses only that character's U+FFFD, however often it is flushed (a
    request ended again after a failed prefill is flushed a second time): never a whole character before it."""
    tok = engine.tok
    ids = tok.encode("好😀")
    cut = len(tok.encode("好")) + 1  # the emoji's first byte only
    d = Detokenizer(tok, [])
    shown = "".join(d.add(i) for i in ids[:cut])
    shown += d.flush(cut_short=True)
    shown += d.flush(cut_short=True)
    assert (shown, d.text) == ("好", "好")


def test_a_stream_without_isatty_gets_the_text_as_it_is():
    """A host program's stdout replacement with no isatty() is no terminal: it gets the model's text unescaped."""
    from tinyk.errors import for_terminal, is_terminal

    class Sink:
        def write(self, s: str) -> int:
            return len(s)

    assert not is_terminal(Sink()) and for_terminal("\x1b[2J好\x07", Sink()) == "\x1b[2J好\x07"
