"""A model directory as one GGUF file, the format llama.cpp, Ollama and LM Studio run, and an Ollama
Modelfile beside it.

llama.cpp's own converter (convert_hf_to_gguf.py) refuses a tokenizer it has not seen before: it
recognises pre-tokenizers by the ids they give a test text, and a freshly trained vocabulary gives new
ids. tinyk knows its tokenizer splits text as GPT-2's does, so it writes the file itself, with the
`gguf` package that llama.cpp publishes for the format's names and layout.

Ollama never runs the file's Jinja chat template: it swaps in the built-in template whose Jinja text is
nearest, or none at all (the bare prompt, no roles) when nothing is near, as for tinyk's. The Modelfile
gives it tinyk's template in Ollama's own (Go) syntax, with tinyk's context length, stops and sampling.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import load_model, rope_pairs
from .engine import SamplingParams
from .errors import TinykError, writing
from .inputs import has_surrogate
from .model import ModelConfig
from .outputs import atomic_file, check_output_file, same_path, write_text_atomic
from .rundir import model_name
from .tokenizer import IM_END_ID, IM_START_ID, SPECIAL_TOKENS, chat_template

OUTTYPES = ("f16", "bf16", "f32", "q8_0")
# How GPT-2 (and tinyk's byte-level pre-tokenizer) splits text before BPE.
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
MAGIC = b"GGUF"

# transformers' names (tinyk's) for a layer's tensors, and GGUF's.
_LAYER_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                "mlp.down_proj": "ffn_down"}
_TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}


def is_gguf(path: Path) -> bool:
    """Whether a file is a GGUF file (what --force may replace)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def gguf_name(hf_name: str) -> str:
    """A weight's GGUF name from its transformers name."""
    if hf_name in _TOP_NAMES:
        return _TOP_NAMES[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)  # model.layers.<i>.<module>.weight
    return f"blk.{layer}.{_LAYER_NAMES[rest.removesuffix('.weight')]}.weight"


def _gguf_module() -> Any:
    try:
        import gguf
    except ImportError as e:
        raise TinykError("writing GGUF needs the 'gguf' package (pip install gguf, or pip install 'tinyk[gguf]')") \
            from e
    if not hasattr(gguf.GGUFWriter, "add_sampling_sequence"):  # the sampling defaults' keys came in 0.18
        from importlib.metadata import PackageNotFoundError, version

        try:
            has = f"gguf {version('gguf')}"
        except PackageNotFoundError:
            has = "an older gguf"
        raise TinykError(f"writing GGUF needs gguf 0.18 or newer, and this Python has {has} (pip install -U gguf)")
    return gguf


def _tokenizer_fields(gguf: Any, data: dict[str, Any]) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) as llama.cpp's byte-level BPE ("gpt2") reads them: the tokens and
    merges in tokenizer.json's byte alphabet, and the special tokens marked control (never produced from
    text; of them, llama.cpp ends generation at <|im_end|> and </s>, which it knows by name). `data` is
    tokenizer.json's."""
    model, pre = data.get("model") or {}, data.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) \
            or pre.get("add_prefix_space"):
        raise TinykError("GGUF export takes byte-level BPE tokenizers that split text as GPT-2 does (what tinyk "
                         "trains); this one is not, and llama.cpp would tokenize text differently")
    by_id = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in data.get("added_tokens", [])}
    by_id.update({i: a["content"] for i, a in added.items()})
    if sorted(by_id) != list(range(len(by_id))):
        raise TinykError("the tokenizer's ids have gaps, which a GGUF vocabulary cannot hold")
    control = {i for i, a in added.items() if a.get("special")} | set(range(len(SPECIAL_TOKENS)))
    tokens = [by_id[i] for i in range(len(by_id))]
    kind = gguf.TokenType
    types = [kind.CONTROL if i in control else kind.USER_DEFINED if i in added else kind.NORMAL
             for i in range(len(by_id))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges


def _tensor_data(gguf: Any, name: str, w: torch.Tensor, cfg: ModelConfig, outtype: str) -> tuple[np.ndarray, Any]:
    """A weight as GGUF stores it, and its type. llama.cpp rotates q and k by adjacent pairs of channels
    where transformers rotates channel i with i + head_dim/2, so their rows are reordered to match; norms
    stay f32, and a matrix whose rows q8_0's blocks of 32 do not divide stays f16, as llama.cpp keeps them."""
    q = gguf.GGMLQuantizationType
    if name.endswith(("attn_q.weight", "attn_k.weight")):
        w = rope_pairs(w, cfg.head_dim)
    data = w.detach().to(torch.float32).numpy()
    if data.ndim == 1 or outtype == "f32":
        return data, q.F32
    if outtype == "f16" or (outtype == "q8_0" and data.shape[-1] % 32):
        return data.astype(np.float16), q.F16
    qtype = q.BF16 if outtype == "bf16" else q.Q8_0
    return gguf.quants.quantize(data, qtype), qtype


def export_gguf(model_dir: str | Path, out: str | Path, outtype: str = "f16", force: bool = False,
                modelfile: str | Path | None = None) -> dict[str, Any]:
    """Writes `model_dir` as the GGUF file `out` (complete or absent), with its tokenizer, chat template
    and tinyk's sampling defaults, and where asked an Ollama `modelfile` for it; returns what it wrote."""
    if outtype not in OUTTYPES:
        raise TinykError(f"unknown GGUF type {outtype!r} (choose from {', '.join(OUTTYPES)})")
    gguf = _gguf_module()
    model_dir, out = Path(model_dir), Path(out)
    check_output_file(out, [model_dir], force=force, replaces=("a GGUF file", is_gguf), holds="the GGUF model")
    if modelfile is not None:
        modelfile = Path(modelfile)
        if same_path(modelfile.absolute(), out.absolute()):
            raise TinykError(f"--modelfile {modelfile} is also --out; give each its own file")
        check_output_file(modelfile, [model_dir], force=force, replaces=("an Ollama Modelfile", is_modelfile),
                          flag="--modelfile", holds="the Ollama Modelfile")
        where = ollama_path(out, modelfile)
    model, tok = load_model(model_dir)
    cfg = model.config
    tokenizer_json = json.loads(tok.tok.to_str())
    tokens, types, merges = _tokenizer_fields(gguf, tokenizer_json)
    # An imported model's embedding may have rows past the tokenizer's ids: no text becomes them, and
    # tinyk never samples them, so the file leaves them out and llama.cpp cannot sample them either.
    state = {k: v[:len(tokens)] if k in ("model.embed_tokens.weight", "lm_head.weight") else v
             for k, v in model.state_dict().items() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    counts: dict[str, int] = {}
    with writing(out), atomic_file(out, suffix=".gguf") as tmp:
        with contextlib.closing(gguf.GGUFWriter(str(tmp), "llama")) as w:
            _add_metadata(gguf, w, cfg, model_name(model_dir), outtype)
            w.add_tokenizer_model("gpt2")
            w.add_tokenizer_pre("gpt-2")
            # Ollama's own engine (OLLAMA_NEW_ENGINE=1) splits text by this key's regex, Llama 3's without
            # it; llama.cpp, which Ollama runs by default for this architecture, goes by "gpt-2" above.
            w.add_string("tokenizer.ggml.pretokenizer", GPT2_SPLIT)
            w.add_vocab_size(len(tokens))
            w.add_token_list(tokens)
            w.add_token_types(types)
            w.add_token_merges(merges)
            w.add_chat_template(chat_template(tok.system_prompt))
            for hf_name, tensor in state.items():
                target = gguf_name(hf_name)
                data, qtype = _tensor_data(gguf, target, tensor, cfg, outtype)
                w.add_tensor(target, data, raw_dtype=qtype)
                counts[qtype.name] = counts.get(qtype.name, 0) + 1
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
    if modelfile is not None:
        with writing(modelfile):
            write_text_atomic(modelfile, ollama_modelfile(where, cfg, tok.system_prompt))
    normalizer = tokenizer_json.get("normalizer")
    return {"path": str(out), "bytes": out.stat().st_size, "outtype": outtype, "tensors": counts,
            "parameters": sum(t.numel() for t in state.values()), "vocab": len(tokens),
            "normalizer": normalizer.get("type") if isinstance(normalizer, dict) else None,
            "rope_scaling": cfg.rope_scaling}


def _add_metadata(gguf: Any, w: Any, cfg: ModelConfig, name: str, outtype: str) -> None:
    """The model's shape, its special tokens and tinyk's sampling: its defaults, its order (temperature
    before top-p, as in transformers; llama.cpp's own puts it last) and its repetition penalty over the
    whole context (llama.cpp's own looks back 64 tokens), which recent llama.cpp samples with unless
    told otherwise."""
    w.add_name(name)
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype])
    if outtype == "q8_0":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.hidden_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    if cfg.rope_scaling != 1:  # as llama.cpp's own converter writes a linear rope_scaling
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(cfg.rope_scaling))
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_bos_token_id(IM_START_ID)
    w.add_eos_token_id(IM_END_ID)
    w.add_pad_token_id(IM_END_ID)
    w.add_unk_token_id(SPECIAL_TOKENS.index("<unk>"))
    w.add_add_bos_token(False)  # the chat template writes <|im_start|> itself
    w.add_add_eos_token(False)
    sampling = SamplingParams()
    w.add_sampling_sequence("penalties;top_k;temperature;top_p;min_p")
    w.add_sampling_penalty_last_n(cfg.max_seq_len)
    w.add_sampling_temp(sampling.temperature)
    w.add_sampling_top_k(sampling.top_k)
    w.add_sampling_top_p(sampling.top_p)
    w.add_sampling_min_p(sampling.min_p)
    w.add_sampling_penalty_repeat(sampling.repetition_penalty)


MODELFILE_HEADER = "# An Ollama Modelfile written by `tinyk model gguf`"


def is_modelfile(path: Path) -> bool:
    """Whether a file is a Modelfile this command wrote, or empty (what --force may replace)."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(MODELFILE_HEADER.encode()))
    except OSError:
        return False
    return head in (b"", MODELFILE_HEADER.encode())


def _go_string(text: str) -> str:
    """`text` as a Go string literal. What is not printable is escaped: Ollama's Modelfile reader drops
    such characters (U+3000, the ideographic space, among them) outside its own escapes."""
    def char(c: str) -> str:
        if c in '"\\':
            return "\\" + c
        if c.isprintable():
            return c
        return f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}"
    return '"' + "".join(char(c) for c in text) + '"'


def ollama_template(system_prompt: str | None) -> str:
    """tinyk's chat template (`tokenizer.chat_template`) in Ollama's Go template syntax: the default
    system turn unless the chat opens with its own, each system (or developer), user and assistant
    turn, and the assistant's opening."""
    turn = "<|im_start|>{role}\n{{{{ .Content }}}}<|im_end|>\n"
    default = ""
    if system_prompt:
        default = ('{{- if .Messages }}{{ $first := (index .Messages 0).Role }}'
                   '{{ if not (or (eq $first "system") (eq $first "developer")) }}'
                   f'<|im_start|>system\n{{{{ {_go_string(system_prompt)} }}}}<|im_end|>\n{{{{ end }}}}{{{{ end }}}}\n')
    return (default + "{{- range .Messages }}\n"
            '{{- if or (eq .Role "system") (eq .Role "developer") }}' + turn.format(role="system")
            + '{{ else if eq .Role "user" }}' + turn.format(role="user")
            + '{{ else if eq .Role "assistant" }}' + turn.format(role="assistant")
            + "{{ end }}\n{{- end }}<|im_start|>assistant\n")


def ollama_path(gguf_file: Path, modelfile: Path) -> str:
    """The GGUF file as the Modelfile's FROM line names it: relative to the Modelfile's folder where it can
    be (so the two move together). Refused where Ollama's Modelfile reader would read another path: it
    drops characters that are not printable (U+3000, the ideographic space, among them) and line breaks,
    trims spaces at the ends and reads UTF-8 only."""
    try:
        where = os.path.relpath(gguf_file.absolute(), modelfile.absolute().parent)
    except ValueError:  # Windows: another drive
        where = str(gguf_file.absolute())
    if not (os.path.isabs(where) or where.startswith("..")):
        where = os.path.join(".", where)
    if where != where.strip() or where.startswith('"') or has_surrogate(where) or \
            not all(c.isprintable() or c == " " for c in where):
        raise TinykError(f"--modelfile: Ollama would not find the GGUF file as {json.dumps(where, ensure_ascii=False)} "
                         f"(its Modelfile reader drops characters that are not printable, such as line breaks and "
                         f"the ideographic space, trims spaces at the ends and reads only UTF-8); give --out a "
                         f"plainer name")
    return where


def ollama_modelfile(where: str, cfg: ModelConfig, system_prompt: str | None) -> str:
    """An Ollama Modelfile for the GGUF file at `where` (`ollama_path`): tinyk's template, its context
    length (Ollama's default is longer, and positions past the model's context are ones it never
    learned), its stops and sampling defaults."""
    sampling = SamplingParams()
    params = [("num_ctx", cfg.max_seq_len), ("stop", '"<|im_end|>"'), ("stop", '"<|im_start|>"'),
              ("stop", '"</s>"'), ("temperature", sampling.temperature), ("top_k", sampling.top_k),
              ("top_p", sampling.top_p), ("min_p", sampling.min_p),
              ("repeat_penalty", sampling.repetition_penalty), ("repeat_last_n", cfg.max_seq_len)]
    lines = [MODELFILE_HEADER, "# (ollama create NAME -f THIS_FILE)", f"FROM {where}",
             f'TEMPLATE """{ollama_template(system_prompt)}"""',
             *(f"PARAMETER {k} {v:g}" if isinstance(v, float) else f"PARAMETER {k} {v}" for k, v in params)]
    return "\n".join(lines) + "\n"
