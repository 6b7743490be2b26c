"""`tinyk model gguf`: the file loads in transformers (and llama.cpp, where one is built) as the same
model, tokenizer, chat template and sampling defaults."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gguf import GGUFReader
from transformers import AutoModelForCausalLM, AutoTokenizer

from tinyk.checkpoint import init_model_dir, load_model, save_model
from tinyk.cli import main
from tinyk.engine import Engine, SamplingParams
from tinyk.gguf import export_gguf
from tinyk.model import ModelConfig, Transformer
from tinyk.tokenizer import IM_END_ID, IM_START_ID, load_tokenizer, train_tokenizer

TEXTS = ["<|im_start|>user\n中国的首都是哪里？<|im_end|>\n<|im_start|>assistant\n",
         "The year 2024: it's 3.14159!!   ok?\n\n  两个空格\t制表 😀", "混合English和中文123abc</s>"]


def _model_dir(tmp_path: Path, tok_dir: Path, **shape) -> Path:
    torch.manual_seed(0)
    shape = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": load_tokenizer(tok_dir).vocab_size,
             **shape}
    model = Transformer(ModelConfig(max_seq_len=256, **shape))
    with torch.no_grad():  # attention that depends on where tokens are, so that RoPE's channel order shows
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight *= 10
            layer.self_attn.k_proj.weight *= 10
    return save_model(model, tok_dir, tmp_path / "m")


def _field(reader: GGUFReader, key: str):
    return reader.get_field(key).contents()


@pytest.mark.parametrize(("outtype", "tolerance"), [("f32", 1e-5), ("f16", 2e-3), ("bf16", 1e-2), ("q8_0", 3e-2)])
@pytest.mark.parametrize("shape", [
    dict(),                                                                             # GQA, tied
    dict(dim=48, n_heads=3, n_kv_heads=1, tie_embeddings=False, rope_theta=500000.0),  # MQA, untied, 3 heads
])
def test_transformers_loads_the_file_as_the_same_model(tmp_path, tok_dir, outtype, tolerance, shape):
    """transformers reads GGUF back through its own code: the reordered q/k rows, the tokenizer from the
    file's tokens and merges, and an untied head only where there is one."""
    out = _model_dir(tmp_path, tok_dir, **shape)
    result = export_gguf(out, tmp_path / "m.gguf", outtype=outtype)
    if outtype == "q8_0":  # in blocks of 32: a matrix whose rows are 48 long stays f16
        expected = {"Q8_0": 2, "F16": 6 * 2 + 2, "F32": 5} if shape else {"Q8_0": 7 * 2 + 1, "F32": 5}
        assert result["tensors"] == expected
    model, tok = load_model(out)
    hf_tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert [hf_tok(t)["input_ids"] for t in TEXTS] == [tok.encode(t) for t in TEXTS]
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    assert hf.config.tie_word_embeddings == model.config.tie_embeddings
    x = torch.tensor([tok.encode(TEXTS[0] + TEXTS[1])])
    with torch.no_grad():
        ours, theirs = model(x), hf(x).logits
    assert (ours - theirs).abs().max().item() < tolerance * ours.abs().max().item()


def test_the_file_carries_the_tokenizer_template_and_sampling_defaults(tmp_path, tok_dir):
    out = _model_dir(tmp_path, tok_dir)
    export_gguf(out, tmp_path / "m.gguf")
    r = GGUFReader(tmp_path / "m.gguf")
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert _field(r, "tokenizer.chat_template") == config["chat_template"]
    assert (_field(r, "tokenizer.ggml.model"), _field(r, "tokenizer.ggml.pre")) == ("gpt2", "gpt-2")
    assert (_field(r, "tokenizer.ggml.bos_token_id"), _field(r, "tokenizer.ggml.eos_token_id")) == \
        (IM_START_ID, IM_END_ID)
    assert _field(r, "tokenizer.ggml.add_bos_token") is False  # the template starts every turn itself
    assert _field(r, "llama.context_length") == 256 and _field(r, "general.name") == "m"
    # llama.cpp samples as tinyk does unless told otherwise: its defaults, in tinyk's order (temperature
    # before top-p), the repetition penalty over the whole context
    d = SamplingParams()
    assert [_field(r, f"general.sampling.{k}") for k in ("top_k", "min_p", "penalty_repeat", "penalty_last_n")] == \
        [d.top_k, d.min_p, pytest.approx(d.repetition_penalty), 256]
    assert _field(r, "general.sampling.temp") == pytest.approx(d.temperature)
    assert _field(r, "general.sampling.sequence") == "penalties;top_k;temperature;top_p;min_p"
    types = _field(r, "tokenizer.ggml.token_type")
    assert [i for i, t in enumerate(types) if t == 3] == [0, 1, 2, 3, 4]  # the specials are control tokens


def test_a_padded_embedding_loses_the_rows_no_text_reaches(tmp_path, tok_dir):
    """An imported model with more embedding rows than tokenizer ids: tinyk never samples those rows,
    and the file leaves them out, so llama.cpp cannot sample them either."""
    ids = load_tokenizer(tok_dir).vocab_size
    out = _model_dir(tmp_path, tok_dir, vocab_size=ids + 40, tie_embeddings=False)
    result = export_gguf(out, tmp_path / "m.gguf", outtype="f32")
    assert _field(GGUFReader(tmp_path / "m.gguf"), "llama.vocab_size") == ids
    assert result["parameters"] == sum(t.n_elements for t in GGUFReader(tmp_path / "m.gguf").tensors)
    model, tok = load_model(out)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    x = torch.tensor([tok.encode(TEXTS[0])])
    with torch.no_grad():
        assert (model(x)[..., :ids] - hf(x).logits).abs().max().item() < 1e-4


def test_the_command_writes_once_and_replaces_only_gguf_files(tmp_path, nano_model_dir, capsys):
    out = tmp_path / "nano.gguf"
    with pytest.raises(SystemExit) as e:
        main(["model", "gguf", str(nano_model_dir), "--out", str(out), "--outtype", "q8_0"])
    assert e.value.code == 0 and out.read_bytes()[:4] == b"GGUF"
    said = capsys.readouterr().out
    assert said.startswith(f"wrote {out}: ") and "for Ollama, add --modelfile FILE" in said
    assert [p.name for p in tmp_path.iterdir()] == ["nano.gguf"]  # no temporary file left
    for args, message in [([], f"--out {out} exists (use --force to replace it)"),
                          (["--out", str(tmp_path / "notes.txt"), "--force"],
                           f"--out {tmp_path / 'notes.txt'} exists and is not a GGUF file")]:
        (tmp_path / "notes.txt").write_text("mine")
        with pytest.raises(SystemExit) as e:
            main(["model", "gguf", str(nano_model_dir), "--out", str(out), *args])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_the_split_pattern_for_ollama_is_how_the_tokenizer_splits(tok_dir):
    """tokenizer.ggml.pretokenizer, the regex Ollama's own engine splits text by before BPE: the same
    pieces as tinyk's pre-tokenizer (Python's `regex` reads the pattern as Go's regexp2 does)."""
    import regex
    from tokenizers import decoders

    from tinyk.gguf import GPT2_SPLIT

    tok, byte_level = load_tokenizer(tok_dir).tok, decoders.ByteLevel()
    for text in [*TEXTS, "，你好！2024年12月6日，价格是3.14元。  \n\n\t中文English混排 it's"]:
        pieces = [byte_level.decode([p]) for p, _ in tok.pre_tokenizer.pre_tokenize_str(text)]
        assert regex.findall(GPT2_SPLIT, text) == pieces


CHATS = [[{"role": "user", "content": "中国的首都是哪里？"}],
         [{"role": "system", "content": "你是小助手。"}, {"role": "user", "content": "你好"},
          {"role": "assistant", "content": "你好！"}, {"role": "user", "content": "再见"}],
         [{"role": "developer", "content": "只说中文"}, {"role": "user", "content": "hi"}],
         [{"role": "user", "content": "{{ .System }} 与 \"\"\" 和 <|im_end|> 是文字"}],
         [{"role": "user", "content": "一"}, {"role": "assistant", "content": "二"}, {"role": "tool", "content": "x"},
          {"role": "user", "content": "三"}]]


def _modelfile_template(modelfile: Path) -> str:
    """The TEMPLATE value as Ollama's Modelfile reader takes it: between the triple quotes."""
    text = modelfile.read_text(encoding="utf-8")
    start = text.index('TEMPLATE """') + len('TEMPLATE """')
    return text[start:text.index('"""\n', start)]


def test_the_modelfile_gives_ollama_the_model_context_stops_and_sampling(tmp_path, nano_model_dir, capsys):
    """Ollama does not run the GGUF file's Jinja template (nothing near tinyk's among its own, it would
    send the bare prompt): the Modelfile carries the template, the context and tinyk's defaults."""
    (tmp_path / "ollama").mkdir()
    modelfile = tmp_path / "ollama" / "Modelfile"
    with pytest.raises(SystemExit) as e:
        main(["model", "gguf", str(nano_model_dir), "--out", str(tmp_path / "nano.gguf"), "--modelfile",
              str(modelfile)])
    assert e.value.code == 0 and f"wrote {modelfile}: ollama create NAME -f {modelfile}" in capsys.readouterr().out
    lines = modelfile.read_text(encoding="utf-8").splitlines()
    assert f"FROM {os.path.join('..', 'nano.gguf')}" in lines  # found from the Modelfile's own folder
    context = load_model(nano_model_dir)[0].config.max_seq_len
    params = [line.split(" ", 2)[1:] for line in lines if line.startswith("PARAMETER ")]
    assert ["num_ctx", str(context)] in params and ["repeat_last_n", str(context)] in params
    assert [v for k, v in params if k == "stop"] == ['"<|im_end|>"', '"<|im_start|>"', '"</s>"']
    defaults = SamplingParams()
    assert dict(params)["temperature"] == f"{defaults.temperature:g}" and dict(params)["top_k"] == str(defaults.top_k)
    assert sum(line.startswith("TEMPLATE ") for line in lines) == 1
    # Replaced with --force, as the GGUF file is, and only where it is one.
    other, notes = tmp_path / "other.gguf", tmp_path / "notes.txt"
    for args, message in [(["--out", str(other), "--modelfile", str(modelfile)],
                           f"--modelfile {modelfile} exists (use --force to replace it)"),
                          (["--out", str(other), "--modelfile", str(notes), "--force"],
                           f"--modelfile {notes} exists and is not an Ollama Modelfile"),
                          (["--out", str(other), "--modelfile", str(other)], f"--modelfile {other} is also --out"),
                          (["--out", str(tmp_path / "a\u3000b.gguf"), "--modelfile", str(tmp_path / "M2")],
                           'Ollama would not find the GGUF file as "./a\u3000b.gguf"')]:
        notes.write_text("mine")
        with pytest.raises(SystemExit) as e:
            main(["model", "gguf", str(nano_model_dir), *args])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
        assert not other.exists() and not (tmp_path / "a\u3000b.gguf").exists()
    assert (tmp_path / "notes.txt").read_text() == "mine"
    export_gguf(nano_model_dir, tmp_path / "nano.gguf", force=True, modelfile=tmp_path / "Modelfile")
    assert "FROM ./nano.gguf" in (tmp_path / "Modelfile").read_text().splitlines()


@pytest.mark.skipif(shutil.which("go") is None, reason="needs Go, whose text/template Ollama runs "
                                                       "(bash tests/install_test_tools.sh installs Debian's golang-go)")
@pytest.mark.parametrize("system", ["你是一个AI助手", None, '说"""{{ .Prompt }}"""\u3000\\n\n第二行'])
def test_ollama_renders_a_chat_as_tinyk_does(tmp_path, tok_dir, system):
    """The Modelfile's template, run by Go's text/template as Ollama runs it, gives tinyk's prompt: the
    model's own system prompt (none, or one with quotes, template braces, a full-width space and a
    line break) where a chat has no system turn, `developer` as system, other roles left out."""
    from tinyk.tokenizer import write_hf_tokenizer_files

    shutil.copytree(tok_dir, tmp_path / "tok")
    write_hf_tokenizer_files(tmp_path / "tok", model_max_length=64, system_prompt=system)
    shape = ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=load_tokenizer(tok_dir).vocab_size,
                        max_seq_len=64)
    model = save_model(Transformer(shape), tmp_path / "tok", tmp_path / "m")
    export_gguf(model, tmp_path / "m.gguf", modelfile=tmp_path / "Modelfile")
    render = tmp_path / "render"
    env = {**os.environ, "GOCACHE": str(tmp_path / "gocache"), "GOPATH": str(tmp_path / "gopath")}
    subprocess.run(["go", "build", "-o", str(render), str(Path(__file__).with_name("ollama_template.go"))],
                   check=True, env=env, cwd=tmp_path)
    template, tok = _modelfile_template(tmp_path / "Modelfile"), load_tokenizer(model)
    for chat in CHATS:
        ollama = subprocess.run([str(render)], input=json.dumps({"template": template, "messages": chat}),
                                capture_output=True, text=True, check=True).stdout
        assert ollama == tok.apply_chat_template(chat, add_generation_prompt=True)


def test_a_folder_name_that_is_not_utf8_names_the_model_all_the_same(tmp_path, nano_model_dir):
    """A folder named in GBK (bytes that are not UTF-8): GGUF's strings are UTF-8."""
    folder = Path(os.fsdecode(tmp_path / "m") + os.fsdecode(b"\xc4\xa3\xd0\xcd"))  # 模型 in GBK
    shutil.copytree(nano_model_dir, folder)
    export_gguf(folder, tmp_path / "m.gguf")
    # what is not UTF-8 becomes U+FFFD, as in tinyk's JSON outputs
    assert _field(GGUFReader(tmp_path / "m.gguf"), "general.name") == b"m\xc4\xa3\xd0\xcd".decode("utf-8", "replace")


def test_the_model_is_named_after_its_run(nano_model_dir, tmp_path):
    """general.name, which llama.cpp's tools show, is what `tinyk serve` calls the model: "final"
    alone says nothing."""
    run = tmp_path / "runs" / "chat"
    (run / "checkpoints" / "step_0000040").mkdir(parents=True)
    (run / "config.yaml").write_text("kind: sft\n")
    for model in (run / "final", run / "best", run / "checkpoints" / "step_0000040" / "model"):
        model.symlink_to(nano_model_dir)
    names = []
    for model in (run / "final", run / "best", run / "checkpoints" / "step_0000040" / "model", nano_model_dir):
        export_gguf(model, tmp_path / "m.gguf", force=True)
        names.append(_field(GGUFReader(tmp_path / "m.gguf"), "general.name"))
    assert names == ["chat", "chat-best", "chat-step_0000040", nano_model_dir.name]


def test_a_normalising_tokenizer_is_exported_with_a_note(tmp_path, corpus_file, capsys):
    train_tokenizer([corpus_file], tmp_path / "tok", vocab_size=512, normalization="nfkc", show_progress=False)
    init_model_dir("nano", tmp_path / "tok", tmp_path / "m")
    with pytest.raises(SystemExit) as e:
        main(["model", "gguf", str(tmp_path / "m"), "--out", str(tmp_path / "m.gguf")])
    assert e.value.code == 0
    assert "note: the tokenizer normalises text (NFKC) before splitting it and llama.cpp does not" in \
        capsys.readouterr().out


def test_a_model_with_rope_scaling_is_exported_with_a_note_on_who_reads_it(tmp_path, tok_dir, capsys):
    out = _model_dir(tmp_path, tok_dir, rope_scaling=2.0)
    init_model_dir("nano", tok_dir, tmp_path / "plain")
    said = []
    for model, gguf in ((out, "m.gguf"), (tmp_path / "plain", "p.gguf")):
        with pytest.raises(SystemExit) as e:
            main(["model", "gguf", str(model), "--out", str(tmp_path / gguf)])
        assert e.value.code == 0
        said.append(capsys.readouterr().out)
    assert ("note: the model's linear RoPE scaling (factor 2) is in the file's rope.scaling keys, which llama.cpp "
            "reads; transformers' GGUF reader does not") in said[0]
    assert "RoPE scaling" not in said[1]


def test_a_tokenizer_llama_cpp_would_split_otherwise_is_refused(tmp_path, tok_dir, capsys):
    out = _model_dir(tmp_path, tok_dir)
    data = json.loads((out / "tokenizer.json").read_text())
    data["pre_tokenizer"]["add_prefix_space"] = True  # " 北京" and "北京" alike: no llama.cpp pre-tokenizer does that
    (out / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(SystemExit) as e:
        main(["model", "gguf", str(out), "--out", str(tmp_path / "m.gguf")])
    assert e.value.code == 2 and "GGUF export takes byte-level BPE tokenizers" in capsys.readouterr().err
    assert not (tmp_path / "m.gguf").exists()


def test_without_the_gguf_package_the_command_says_how_to_get_it(tmp_path, nano_model_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf raises ImportError
    with pytest.raises(SystemExit) as e:
        main(["model", "gguf", str(nano_model_dir), "--out", str(tmp_path / "m.gguf")])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == "tinyk: error: writing GGUF needs the 'gguf' package (pip install " \
                                               "gguf, or pip install 'tinyk[gguf]')"


def test_a_gguf_package_too_old_is_named_not_a_traceback(tmp_path, nano_model_dir, monkeypatch, capsys):
    """gguf 0.17 has no sampling keys: the export ended in an AttributeError."""
    import gguf

    monkeypatch.delattr(gguf.GGUFWriter, "add_sampling_sequence")
    with pytest.raises(SystemExit) as e:
        main(["model", "gguf", str(nano_model_dir), "--out", str(tmp_path / "m.gguf")])
    assert e.value.code == 2 and not (tmp_path / "m.gguf").exists()
    assert re.fullmatch(r"tinyk: error: writing GGUF needs gguf 0\.18 or newer, and this Python has gguf \S+ "
                        r"\(pip install -U gguf\)\n", capsys.readouterr().err)


LLAMA_CPP = os.environ.get("TINYK_LLAMA_CPP")  # a llama.cpp build's bin/ folder: llama-tokenize, llama-simple


@pytest.mark.skipif(not LLAMA_CPP, reason="set TINYK_LLAMA_CPP to a llama.cpp build's bin/ folder")
@pytest.mark.parametrize("rope_scaling", [1.0, 4.0])
def test_llama_cpp_tokenizes_and_decodes_as_tinyk(tmp_path, tok_dir, rope_scaling):
    """The real client, where one is built (it takes minutes): the same token ids, and greedy decoding
    from <|im_start|>, as `tinyk generate` starts, gives the same bytes, also with linear RoPE scaling.
    The head's rows for the special tokens are zeroed so that neither stops early (llama.cpp ends only
    at the ones that end a turn)."""
    out = _model_dir(tmp_path, tok_dir, tie_embeddings=False, rope_scaling=rope_scaling)
    model, tok = load_model(out)
    with torch.no_grad():
        model.lm_head.weight[:5] = 0
    out = save_model(model, tok_dir, tmp_path / "m", force=True)
    export_gguf(out, tmp_path / "m.gguf", outtype="f32")
    for text in TEXTS:
        ids = subprocess.run([f"{LLAMA_CPP}/llama-tokenize", "-m", str(tmp_path / "m.gguf"), "-p", text, "--ids",
                              "--no-escape", "--log-disable"], capture_output=True, text=True, check=True).stdout
        assert json.loads(ids.splitlines()[-1]) == tok.encode(text)
    greedy = SamplingParams(temperature=0, repetition_penalty=1.0, max_new_tokens=20)
    [ours] = Engine(model, tok).generate(["北京"], greedy)
    assert len(ours.token_ids) == 20
    if rope_scaling != 1:  # a llama.cpp that ignored the scaling would decode otherwise
        model.config.rope_scaling = 1.0
        model.init_rope()
        assert Engine(model, tok).generate(["北京"], greedy)[0].token_ids != ours.token_ids
    # llama-simple decodes greedily and prints every piece, the specials spelled out, as it goes (llama-completion
    # prints through a logging thread that can lose the end of a fast run's output).
    theirs = subprocess.run([f"{LLAMA_CPP}/llama-simple", "-m", str(tmp_path / "m.gguf"), "-n", "20",
                             "<|im_start|>北京"], capture_output=True, check=True).stdout
    assert theirs == "<|im_start|>北京".encode() + b"".join(tok.piece(i) for i in ours.token_ids) + b"\n"


@pytest.mark.parametrize("outtype,file_type", [("f32", 0), ("f16", 1), ("bf16", 32), ("q8_0", 7)])
def test_gguf_special_ids_file_type_and_sampling_keys(tmp_path, nano_model_dir, outtype, file_type):
    """mutants gguf_pad_id, gguf_unk_id, gguf_filetype_q8, gguf_no_quant_version, gguf_top_p,
    modelfile_top_p, modelfile_repeat_penalty: keys the existing tests never read."""
    from tinyk.tokenizer import SPECIAL_TOKENS

    export_gguf(nano_model_dir, tmp_path / "m.gguf", outtype=outtype, modelfile=tmp_path / "Modelfile")
    r = GGUFReader(tmp_path / "m.gguf")

    def field(key):
        f = r.get_field(key)
        return None if f is None else f.contents()

    d = SamplingParams()
    assert field("tokenizer.ggml.padding_token_id") == IM_END_ID
    assert field("tokenizer.ggml.unknown_token_id") == SPECIAL_TOKENS.index("<unk>")
    assert field("general.file_type") == file_type
    assert field("general.quantization_version") == (2 if outtype == "q8_0" else None)
    assert field("general.sampling.top_p") == pytest.approx(d.top_p)
    params = dict(line.split(" ", 2)[1:] for line in (tmp_path / "Modelfile").read_text().splitlines()
                  if line.startswith("PARAMETER ") and " stop " not in line)
    assert {k: float(params[k]) for k in ("top_p", "min_p", "repeat_penalty")} == \
        pytest.approx({"top_p": d.top_p, "min_p": d.min_p, "repeat_penalty": d.repetition_penalty})


def test_q8_0_quantizes_every_matrix_whose_rows_32_divides(tmp_path, tok_dir):
    """mutant gguf_q8_block_64: rows 96 wide (32 * 3) stayed f16 (the tested shapes are 64- and 48-wide)."""
    torch.manual_seed(0)
    cfg = ModelConfig(dim=96, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=160,
                      vocab_size=load_tokenizer(tok_dir).vocab_size, max_seq_len=32)
    out = save_model(Transformer(cfg), tok_dir, tmp_path / "m")
    assert export_gguf(out, tmp_path / "m.gguf", outtype="q8_0")["tensors"] == {"Q8_0": 8, "F32": 3}


@pytest.mark.parametrize("outtype,matrix_type", [("f16", "F16"), ("bf16", "BF16"), ("f32", "F32")])
def test_the_tensors_have_llama_cpps_names_and_the_asked_type(tmp_path, tok_dir, outtype, matrix_type):
    out = _model_dir(tmp_path, tok_dir)  # tied head, 2 layers
    result = export_gguf(out, tmp_path / "m.gguf", outtype=outtype)
    types = {t.name: t.tensor_type.name for t in GGUFReader(tmp_path / "m.gguf").tensors}
    norms = {"output_norm.weight", *(f"blk.{i}.{n}.weight" for i in range(2) for n in ("attn_norm", "ffn_norm"))}
    matrices = {"token_embd.weight", *(f"blk.{i}.{n}.weight" for i in range(2) for n in (
        "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"))}
    assert set(types) == norms | matrices  # no output.weight: the head is tied
    assert {types[n] for n in norms} == {"F32"} and {types[n] for n in matrices} == {matrix_type}
    assert sum(result["tensors"].values()) == len(types) and result["tensors"].get(matrix_type) >= len(matrices)


def test_a_token_added_in_transformers_is_user_defined_in_the_file(tmp_path, tok_dir):
    from tokenizers import Tokenizer

    shutil.copytree(tok_dir, tmp_path / "tok")
    hf = Tokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json"))
    hf.add_tokens(["北京市"])
    hf.save(str(tmp_path / "tok" / "tokenizer.json"))
    out = _model_dir(tmp_path, tmp_path / "tok")
    export_gguf(out, tmp_path / "m.gguf")
    r = GGUFReader(tmp_path / "m.gguf")
    tokens, types = _field(r, "tokenizer.ggml.tokens"), _field(r, "tokenizer.ggml.token_type")
    assert types[tokens.index("北京市")] == 4  # gguf.TokenType.USER_DEFINED
    assert [i for i, t in enumerate(types) if t == 3] == [0, 1, 2, 3, 4]  # still only the specials are control


@pytest.mark.parametrize("pre", [
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
    {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                           {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                                            "use_regex": True}]},
])
def test_a_tokenizer_that_does_not_split_as_gpt2_is_refused(tmp_path, tok_dir, capsys, pre):
    out = _model_dir(tmp_path, tok_dir)
    data = json.loads((out / "tokenizer.json").read_text())
    data["pre_tokenizer"] = pre
    (out / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(SystemExit) as e:
        main(["model", "gguf", str(out), "--out", str(tmp_path / "m.gguf")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "GGUF export takes byte-level BPE tokenizers" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "m.gguf").exists()


def test_a_full_disk_while_writing_keeps_the_file_being_replaced(tmp_path, nano_model_dir, monkeypatch, capsys):
    import gguf

    out = tmp_path / "nano.gguf"
    export_gguf(nano_model_dir, out, outtype="f32")
    before = out.read_bytes()

    def full_disk(self, *a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full_disk)  # header and metadata written
    with pytest.raises(SystemExit) as e:
        main(["model", "gguf", str(nano_model_dir), "--out", str(out), "--force"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert out.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["nano.gguf"]


def test_force_replaces_an_empty_modelfile_but_no_file_that_only_looks_like_gguf(tmp_path, nano_model_dir, capsys):
    (tmp_path / "Modelfile").write_text("")
    export_gguf(nano_model_dir, tmp_path / "m.gguf", modelfile=tmp_path / "Modelfile", force=True)
    assert (tmp_path / "Modelfile").read_text().startswith("# An Ollama Modelfile written by `tinyk model gguf`")
    notes = tmp_path / "GGU.txt"
    notes.write_text("GGU: notes on the model")
    for args, message in [(["--out", str(notes), "--force"], f"--out {notes} exists and is not a GGUF file"),
                          (["--out", str(tmp_path / "m2.gguf "), "--modelfile", str(tmp_path / "M2")],
                           'Ollama would not find the GGUF file as "./m2.gguf "')]:
        with pytest.raises(SystemExit) as e:
            main(["model", "gguf", str(nano_model_dir), *args])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert notes.read_text() == "GGU: notes on the model" and not (tmp_path / "m2.gguf ").exists()


def test_the_reported_vocabulary_is_the_files(tmp_path, tok_dir):
    ids = load_tokenizer(tok_dir).vocab_size
    out = _model_dir(tmp_path, tok_dir, vocab_size=ids + 40, tie_embeddings=False)
    assert export_gguf(out, tmp_path / "m.gguf")["vocab"] == ids == len(_field(GGUFReader(tmp_path / "m.gguf"),
                                                                                 "tokenizer.ggml.tokens"))


def test_a_failed_modelfile_write_keeps_the_one_it_was_replacing(tmp_path, nano_model_dir, monkeypatch):
    import tinyk.gguf
    from tinyk.errors import TinykError

    export_gguf(nano_model_dir, tmp_path / "m.gguf", modelfile=tmp_path / "Modelfile")
    before = (tmp_path / "Modelfile").read_text()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    modelfile = tinyk.gguf.ollama_modelfile

    def then_the_disk_limit(*args):  # the GGUF file is written by now; only the Modelfile meets the limit
        text = modelfile(*args)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100, hard))
        return text

    monkeypatch.setattr(tinyk.gguf, "ollama_modelfile", then_the_disk_limit)
    xfsz = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG), not the process
    try:
        with pytest.raises(TinykError):
            export_gguf(nano_model_dir, tmp_path / "m.gguf", modelfile=tmp_path / "Modelfile", force=True)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, xfsz)
    assert (tmp_path / "Modelfile").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Modelfile", "m.gguf"]


def test_gguf_states_the_rope_dimension_and_the_shape_llama_cpp_reads(tmp_path, tok_dir):
    # The GGUF file states the rope dimension (whole head), shape, eps and theta that llama.cpp reads.
    torch.manual_seed(0)
    cfg = ModelConfig(dim=48, n_layers=2, n_heads=3, n_kv_heads=1, hidden_dim=96, norm_eps=1e-6, rope_theta=500000.0,
                      vocab_size=load_tokenizer(tok_dir).vocab_size, max_seq_len=40)
    out = save_model(Transformer(cfg), tok_dir, tmp_path / "m")
    export_gguf(out, tmp_path / "m.gguf", outtype="f32")
    r = GGUFReader(tmp_path / "m.gguf")

    def field(key):
        f = r.get_field(key)
        return None if f is None else f.contents()

    assert field("general.architecture") == "llama"
    assert [field(f"llama.{k}") for k in ("rope.dimension_count", "embedding_length", "block_count",
                                          "feed_forward_length", "attention.head_count", "attention.head_count_kv",
                                          "context_length")] == [16, 48, 2, 96, 3, 1, 40]
    assert field("llama.rope.freq_base") == pytest.approx(500000.0)
    assert field("llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6)
    assert field("tokenizer.ggml.add_eos_token") is False
    assert field("llama.rope.scaling.type") is None  # none: llama.cpp's default
    # A context extended with linear RoPE scaling: the keys llama.cpp's own converter writes for one.
    scaled = save_model(Transformer(dataclasses.replace(cfg, rope_scaling=4.0)), tok_dir, tmp_path / "scaled")
    export_gguf(scaled, tmp_path / "m.gguf", outtype="f32", force=True)
    r = GGUFReader(tmp_path / "m.gguf")
    assert (field("llama.rope.scaling.type"), field("llama.rope.scaling.factor")) == ("linear", 4.0)
