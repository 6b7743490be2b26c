"""Model: preset sizes, HF Llama parity, KV-cache decoding, model directories."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from tinyk.checkpoint import init_model_dir, load_config, load_model, model_info, save_model
from tinyk.cli import main
from tinyk.engine import SamplingParams
from tinyk.errors import TinykError
from tinyk.model import KVCache, ModelConfig, RMSNorm, Transformer, cpu_emulates, preset_config
from tinyk.tokenizer import SPECIAL_IDS, load_tokenizer
from tinyk.train import loss_sum


@pytest.mark.parametrize("preset,expected", [("seed-215m", 215_127_040), ("seed-82m", 82_594_560)])
def test_seed_parameter_counts(preset, expected):
    with torch.device("meta"):
        assert Transformer(preset_config(preset)).num_params() == expected


@pytest.mark.parametrize("command", [["generate", "--prompt", "你好", "--max-new-tokens", "2", "--model"],
                                     ["model", "info"], ["plan", "--init"]])
def test_loading_a_model_leaves_torchs_compiler_unimported(command, nano_model_dir):
    """A model built on the meta device imported torch._dynamo and sympy (torch has no native meta
    normal_ nor cat): about 2 s of every generate, chat, eval, serve, model info and plan."""
    code = ("import sys\nfrom tinyk.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    assert not e.code, e.code\nprint(sorted(m for m in ('torch._dynamo', 'sympy') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code, *command, str(nano_model_dir)], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0 and r.stdout.splitlines()[-1] == "[]", r.stderr


def test_hidden_dim_rule():
    assert ModelConfig(dim=1024, multiple_of=64).hidden_dim == 2752
    assert ModelConfig(dim=768, multiple_of=64).hidden_dim == 2048
    assert ModelConfig(dim=768, hidden_dim=1000).hidden_dim == 1000


@pytest.mark.parametrize("shape,message", [
    (dict(dim=90, n_heads=6, n_kv_heads=3), "head dimension dim / n_heads = 15 must be even"),  # RoPE pairs
    (dict(dim=64, n_heads=6, n_kv_heads=3), "^dim 64 is not a multiple of n_heads 6$"),  # which pair fails
    (dict(dim=64, n_heads=8, n_kv_heads=3), "^n_heads 8 is not a multiple of n_kv_heads 3$"),
])
def test_impossible_shapes_are_refused(shape, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{**preset_config("nano").to_dict(), **shape})


@pytest.mark.parametrize("shape", [
    dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512),           # GQA
    dict(dim=48, n_layers=3, n_heads=4, n_kv_heads=1, vocab_size=517),           # MQA, odd vocab
    dict(dim=64, n_layers=1, n_heads=4, n_kv_heads=4, vocab_size=601, tie_embeddings=False, rope_theta=500000.0),
    dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, rope_scaling=4.0),  # a context extended 4x
])
def test_hf_llama_loads_and_matches_logits(tmp_path, tok_dir, shape):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(max_seq_len=64, **shape)).eval()
    out = save_model(model, tok_dir, tmp_path / "m")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama" and LlamaConfig.from_pretrained(out).num_key_value_heads == shape["n_kv_heads"]
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    x = torch.randint(0, shape["vocab_size"], (3, 40))
    with torch.no_grad():
        ours = model(x)
        theirs = hf(x).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    reloaded, _ = load_model(out)
    with torch.no_grad():
        assert torch.equal(reloaded(x), ours)
    # generate() stops where tinyk does without being told: at <|im_end|>, the tokenizer's eos, and at any
    # other special token, as the engine does.
    tok = AutoTokenizer.from_pretrained(out)
    gen = hf.generation_config
    assert (gen.bos_token_id, gen.eos_token_id[0], gen.pad_token_id) == (tok.bos_token_id, tok.eos_token_id,
                                                                         tok.pad_token_id)
    assert set(gen.eos_token_id) == SPECIAL_IDS
    # Greedy by default, with tinyk's repetition penalty: generate() is `tinyk generate --temperature 0`.
    assert not gen.do_sample and gen.repetition_penalty == SamplingParams().repetition_penalty
    assert (hf.config.bos_token_id, hf.config.eos_token_id) == (tok.bos_token_id, tok.eos_token_id)
    # No padding_idx: its embedding row would get no gradient, and the pad token is <|im_end|>, every turn's end.
    assert hf.model.embed_tokens.padding_idx is None
    # A Llama's inputs only: transformers 4 added token_type_ids, which generate(**inputs) refused.
    assert set(tok("北京", return_tensors="pt")) == {"input_ids", "attention_mask"}


def test_hf_generate_stops_at_the_special_tokens_tinyk_stops_at(tmp_path, tok_dir):
    """A model whose final norm is zeroed gives all-zero logits, so greedy decoding picks id 0, <unk>:
    tinyk's engine ends there, and `generate()` in transformers must end there too, untold."""
    from tinyk.engine import Engine

    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=512, max_seq_len=64))
    with torch.no_grad():
        model.model.norm.weight.zero_()
    out = save_model(model, tok_dir, tmp_path / "m")
    [done] = Engine.from_dir(out).generate(["北京"], SamplingParams(temperature=0, max_new_tokens=8))
    assert (done.token_ids, done.finish_reason) == ([0], "stop")
    tok = AutoTokenizer.from_pretrained(out)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    x = torch.tensor([[tok.bos_token_id, *tok("北京").input_ids]])
    assert hf.generate(x, max_new_tokens=8, do_sample=False)[0, x.shape[1]:].tolist() == [0]


def test_hf_generate_never_picks_the_rows_of_a_padded_embedding(tmp_path, tok_dir):
    """An imported model may have more embedding rows than the tokenizer has ids (padded to a multiple
    of 64): the engine never picks those rows, and generation_config.json tells transformers the same."""
    from tinyk.engine import Engine

    ids = load_tokenizer(tok_dir).vocab_size
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=ids + 40, max_seq_len=64))
    with torch.no_grad():
        model.lm_head.weight[ids:] *= 50  # the padding rows would win every step
    out = save_model(model, tok_dir, tmp_path / "m")
    tok, hf = AutoTokenizer.from_pretrained(out), AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert hf.generation_config.suppress_tokens == list(range(ids, ids + 40))
    [done] = Engine.from_dir(out).generate(["北京"], SamplingParams(temperature=0, max_new_tokens=8))
    x = torch.tensor([[tok.bos_token_id, *tok("北京").input_ids]])
    theirs = hf.generate(x, max_new_tokens=8, do_sample=False)[0, x.shape[1]:].tolist()
    assert theirs == done.token_ids and max(theirs) < ids


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_flops_per_token_is_what_a_training_step_computes(tie):
    """The FLOPs behind MFU, against torch's FLOP counter on one forward and backward (SDPA's math kernel,
    whose matmuls it counts; like the formula, it scores every query against every key). The only
    difference is the RMSNorm weights, which 6N counts as the usual non-embedding N does."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = Transformer(preset_config("nano", tie_embeddings=tie, vocab_size=1000))
    x = torch.randint(0, 1000, (2, 48))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        loss_sum(model, x, x).backward()
    norms = sum(m.weight.numel() for m in model.modules() if isinstance(m, RMSNorm))
    assert counter.get_total_flops() == x.numel() * (model.flops_per_token(48) - 6 * norms)


def test_init_scales_what_writes_into_the_residual_stream():
    """GPT-2's init: std 0.02, and 0.02 / sqrt(2 * layers) for the attention and MLP output projections."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=256, n_layers=8, n_heads=4, n_kv_heads=2, vocab_size=512))
    stds = {n.split(".")[-2]: p.std().item() for n, p in model.model.layers[3].named_parameters() if p.dim() == 2}
    for name in ("o_proj", "down_proj"):
        assert stds[name] == pytest.approx(0.02 / 4, rel=0.05), name
    for name in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
        assert stds[name] == pytest.approx(0.02, rel=0.05), name


def test_loss_ignores_masked_targets():
    torch.manual_seed(0)
    model = Transformer(preset_config("nano")).eval()
    x = torch.randint(0, 512, (2, 16))
    y = torch.randint(0, 512, (2, 16))
    y_masked = y.clone()
    y_masked[:, :8] = -100
    ref = torch.nn.functional.cross_entropy(model(x)[:, 8:].reshape(-1, 512), y[:, 8:].reshape(-1), reduction="sum")
    assert torch.allclose(loss_sum(model, x, y_masked), ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_carries_the_residual_stream_in_its_dtype_near_fp32(dtype):
    """Under autocast the blocks add into a residual stream of the autocast dtype (half the bytes of the
    memory-bound norms and adds), as a model cast to that dtype does; without it, fp32. The loss and the
    gradients stay near fp32's."""
    torch.manual_seed(0)
    model = Transformer(preset_config("nano")).train()
    x, y = torch.randint(0, 512, (4, 32)), torch.randint(0, 512, (4, 32))
    seen: list[torch.dtype] = []
    for block in model.model.layers:
        block.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))

    def run(autocast: bool) -> tuple[float, torch.Tensor]:
        model.zero_grad()
        with torch.autocast("cpu", dtype=dtype, enabled=autocast):
            loss = loss_sum(model, x, y) / y.numel()
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])

    ref_loss, ref_grad = run(False)
    assert seen == [torch.float32, torch.float32]
    seen.clear()
    loss, grad = run(True)
    assert seen == [dtype, dtype]
    assert loss == pytest.approx(ref_loss, rel=1e-2)
    assert torch.nn.functional.cosine_similarity(grad, ref_grad, dim=0) > 0.99


def test_repeated_kv_heads_match_fused_gqa(monkeypatch):
    """The path CUDA fp32 takes (K/V heads repeated, no enable_gqa) gives the same logits and gradients."""
    from tinyk import model as model_mod

    assert model_mod.sdpa_fuses_gqa("cpu", torch.float32) and model_mod.sdpa_fuses_gqa("cuda", torch.bfloat16)
    assert not model_mod.sdpa_fuses_gqa("cuda", torch.float32)
    assert not model_mod.sdpa_fuses_gqa("cuda", torch.float16, has_flash=False)  # V100, T4: no flash kernel
    torch.manual_seed(0)
    model = Transformer(preset_config("nano")).train()
    x, y = torch.randint(0, 512, (2, 16)), torch.randint(0, 512, (2, 16))

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        logits = model(x)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()).backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters()]

    fused = run()
    monkeypatch.setattr(model_mod, "sdpa_fuses_gqa", lambda *_: False)
    repeated = run()
    assert torch.allclose(fused[0], repeated[0], atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(fused[1], repeated[1], strict=True))


def test_kv_cache_decoding_equals_full_recomputation():
    torch.manual_seed(0)
    model = Transformer(preset_config("nano")).eval()
    seq = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        full = model(seq)
        cache = KVCache(model.config, 2, 32, "cpu", torch.float32)
        step_logits = [model(seq[:, :10], cache=cache)]
        for t in range(10, 24):
            step_logits.append(model(seq[:, t:t + 1], cache=cache))
    assert cache.length == 24
    assert (torch.cat(step_logits, 1) - full).abs().max().item() < 1e-5


def test_left_padded_batch_matches_unpadded():
    torch.manual_seed(0)
    model = Transformer(preset_config("nano")).eval()
    a, b = torch.randint(5, 512, (1, 12)), torch.randint(5, 512, (1, 5))
    pad = 12 - 5
    batch = torch.cat([a, torch.cat([torch.full((1, pad), 4), b], 1)])
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, :pad] = False
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        cache = KVCache(model.config, 2, 20, "cpu", torch.float32)
        logits = model(batch, cache=cache, valid=valid, positions=positions)
        nxt = torch.tensor([[7], [9]])
        step = model(nxt, cache=cache, positions=positions[:, -1:] + 1)
        ref_b = model(torch.cat([b, torch.tensor([[9]])], 1))
        ref_a = model(torch.cat([a, torch.tensor([[7]])], 1))
    assert (logits[1, pad:] - ref_b[0, :5]).abs().max() < 1e-5
    assert (step[1, 0] - ref_b[0, 5]).abs().max() < 1e-5
    assert (step[0, 0] - ref_a[0, 12]).abs().max() < 1e-5


def test_force_replaces_only_a_tinyk_model_directory(tmp_path, tok_dir):
    """A config.json that only mentions tinyk (a JSON string, a list, a block that is not one) is someone
    else's folder: --force does not delete it."""
    init_model_dir("nano", tok_dir, tmp_path / "m")
    init_model_dir("nano", tok_dir, tmp_path / "m", force=True)  # its own kind: replaced
    other = tmp_path / "other"
    other.mkdir()
    for config in ('"tinyk"', '["tinyk"]', '{"tinyk": "v1"}'):
        (other / "config.json").write_text(config)
        with pytest.raises(TinykError, match=r"exists and is not a tinyk model directory, so it is not replaced"):
            init_model_dir("nano", tok_dir, other, force=True)
        assert (other / "config.json").read_text() == config


def test_model_init_uses_tokenizer_vocab_and_info(tmp_path, tok_dir):
    from tinyk.tokenizer import load_tokenizer

    m = init_model_dir("nano", tok_dir, tmp_path / "m")
    assert m.config.vocab_size == load_tokenizer(tok_dir).vocab_size
    info = model_info(tmp_path / "m")
    assert info["parameters"] == m.num_params() and info["config"]["dim"] == 64
    assert {p.name for p in (tmp_path / "m").iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json",
                                                           "tokenizer_config.json", "generation_config.json"}
    # info checks the weights file from its header: truncated, or of another shape, is one line
    weights = tmp_path / "m" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) // 2])
    with pytest.raises(TinykError, match=r"model.safetensors is damaged or truncated \(.*not fully covered"):
        model_info(tmp_path / "m")
    init_model_dir("nano", tok_dir, tmp_path / "wide", dim=128)
    shutil.copyfile(tmp_path / "wide" / "model.safetensors", weights)
    with pytest.raises(TinykError, match="does not match its config.json: model.embed_tokens.weight is"):
        model_info(tmp_path / "m")


def test_model_directory_permissions_follow_the_umask(tmp_path, tok_dir):
    """Readable by others as with any file a user writes (not mkdtemp's 0700 or safetensors' 0600)."""
    before = os.umask(0o022)
    try:
        init_model_dir("nano", tok_dir, tmp_path / "m")
    finally:
        os.umask(before)
    assert stat.S_IMODE((tmp_path / "m").stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "m").iterdir()} == {0o644}


def _hf_model_dir(tmp_path, tok_dir, name, **config):
    """A model directory written by transformers itself (no tinyk block), with tinyk's tokenizer."""
    import shutil

    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512, max_position_embeddings=64, **config)
    hf = LlamaForCausalLM(cfg).eval()
    out = tmp_path / name
    hf.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tok_dir / f, out / f)
    return hf, out


def test_a_plain_hf_llama_loads_with_its_rope_theta_and_what_tinyk_cannot_do_is_refused(tmp_path, tok_dir):

    hf, out = _hf_model_dir(tmp_path, tok_dir, "theta", rope_parameters={"rope_type": "default", "rope_theta": 5e5})
    assert "tinyk" not in json.loads((out / "config.json").read_text())
    ours, _ = load_model(out)
    assert ours.config.rope_theta == 5e5
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "rope_theta": 1e4}))  # transformers 4's key, edited
    with pytest.raises(TinykError, match=r"disagrees with itself: rope_theta is 10000.0 but its RoPE parameters have "
                                         r"500000.0 \(transformers 4 reads one, 5 the other\)"):
        load_model(out)
    (out / "config.json").write_text(json.dumps({**config, "rope_theta": 5e5}))  # both, agreeing
    assert load_model(out)[0].config.rope_theta == 5e5
    # A v4-style scaling added to a v5 file: transformers 5 reads rope_scaling instead of rope_parameters, with
    # the rope_theta beside it (10000 where there is none), so a theta in rope_parameters alone is a disagreement.
    (out / "config.json").write_text(json.dumps({**config, "rope_scaling": {"rope_type": "linear", "factor": 4.0}}))
    with pytest.raises(TinykError, match=r"disagrees with itself: rope_parameters has rope_theta 500000.0, but "
                                         r"transformers reads rope_scaling instead, with rope_theta 10000.0"):
        load_model(out)
    (out / "config.json").write_text(json.dumps({**config, "rope_scaling": {"rope_type": "linear", "factor": 4.0,
                                                                            "rope_theta": 5e5}}))
    scaled, _ = load_model(out)
    assert (scaled.config.rope_scaling, scaled.config.rope_theta) == (4.0, 5e5)
    x = torch.randint(0, 512, (2, 60))
    with torch.no_grad():
        assert (scaled(x) - AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(x).logits).abs().max() < 1e-4
    for factor in (0.5, "2", None):
        (out / "config.json").write_text(json.dumps({**config, "rope_scaling": {"rope_type": "linear",
                                                                                "factor": factor, "rope_theta": 5e5}}))
        with pytest.raises(TinykError, match=f"linear RoPE scaling has factor {factor!r}; it is a number of at least"):
            load_model(out)
    (out / "config.json").write_text(json.dumps({**config, "hidden_act": "swish"}))  # transformers' other name for silu
    assert load_model(out)[0].config.rope_theta == 5e5
    x = torch.randint(0, 512, (2, 30))
    with torch.no_grad():
        assert (ours(x) - hf(x).logits).abs().max().item() < 1e-4
    # A config that leaves out tie_word_embeddings and rms_norm_eps means LlamaConfig's defaults
    # (untied, 1e-6), as transformers reads it; older checkpoints' rotary inv_freq buffers are derived.
    hf2, untied = _hf_model_dir(tmp_path, tok_dir, "untied", rms_norm_eps=1e-6)
    cfg = json.loads((untied / "config.json").read_text())
    cfg.pop("tie_word_embeddings", None)
    cfg.pop("rms_norm_eps", None)
    (untied / "config.json").write_text(json.dumps(cfg))
    from safetensors.torch import load_file, save_file

    weights = load_file(untied / "model.safetensors")
    weights["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(weights, untied / "model.safetensors", metadata={"format": "pt"})
    ours2, _ = load_model(untied)
    assert not ours2.config.tie_embeddings and ours2.config.norm_eps == 1e-6
    with torch.no_grad():
        assert (ours2(x) - hf2(x).logits).abs().max().item() < 1e-4
    for name, config, what in [
        ("dynamic", dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}), "RoPE scaling"),
        ("bias", dict(attention_bias=True), "bias terms"),
        ("gelu", dict(hidden_act="gelu"), "activation 'gelu'"),
    ]:
        _, bad = _hf_model_dir(tmp_path, tok_dir, name, **config)
        with pytest.raises(TinykError, match=f"config.json asks for {what}"):
            load_model(bad)


def test_transformers_settings_beside_the_tinyk_block_are_read_not_ignored(tmp_path, tok_dir):
    """save_pretrained keeps tinyk's block and writes what the user changed in transformers: a RoPE
    scaling or a changed context is a disagreement, neither silently ignored."""
    init_model_dir("nano", tok_dir, tmp_path / "m", seed=0)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    if hasattr(hf.config, "rope_parameters"):  # transformers 5; 4 calls it rope_scaling
        hf.config.rope_parameters = {**hf.config.rope_parameters, "rope_type": "linear", "factor": 4.0}
    else:
        hf.config.rope_scaling = {"rope_type": "linear", "factor": 4.0}
    hf.save_pretrained(tmp_path / "scaled")
    shutil.copy(tmp_path / "m" / "tokenizer.json", tmp_path / "scaled")
    scaled = json.loads((tmp_path / "scaled" / "config.json").read_text())
    assert "tinyk" in scaled
    with pytest.raises(TinykError, match=r"disagrees with itself: the linear RoPE scaling's factor is 4.0 but its "
                                         r"tinyk block has rope_scaling 1.0; .*: delete the block"):
        load_model(tmp_path / "scaled")
    del scaled["tinyk"]
    (tmp_path / "scaled" / "config.json").write_text(json.dumps(scaled))
    assert load_model(tmp_path / "scaled")[0].config.rope_scaling == 4.0
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 1024}))
    with pytest.raises(TinykError, match=r"disagrees with itself: max_position_embeddings is 1024 but its tinyk "
                                         r"block has max_seq_len 128; .*\(resize_token_embeddings\): delete the block"):
        load_model(tmp_path / "m")
    # A key the block lacks is not a disagreement (it read as ModelConfig's default: "dim 768").
    block = {k: v for k, v in config["tinyk"].items() if k not in ("dim", "max_seq_len")}
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 1024,
                                                            "tinyk": block}))
    loaded, _ = load_model(tmp_path / "m")
    assert (loaded.config.dim, loaded.config.max_seq_len) == (config["hidden_size"], 1024)


def test_transformers_batched_generate_answers_each_prompt_as_alone(nano_model_dir):
    """tokenizer_config.json pads on the left, so a batch of unequal prompts continues each from its own
    last token (right padding continued the shorter one from a pad: an empty reply)."""
    tok = AutoTokenizer.from_pretrained(nano_model_dir)
    hf = AutoModelForCausalLM.from_pretrained(nano_model_dir, dtype=torch.float32).eval()
    prompts = ["我们今天", "The quick brown fox jumps over the lazy dog."]
    with torch.no_grad():
        alone = [hf.generate(**tok(p, return_tensors="pt"), max_new_tokens=8)[0] for p in prompts]
        batch = tok(prompts, return_tensors="pt", padding=True)
        together = hf.generate(**batch, max_new_tokens=8)
    width = batch.input_ids.shape[1]
    for p, one, row in zip(prompts, alone, together, strict=True):
        new = one[len(tok(p).input_ids):].tolist()
        assert row[width:width + len(new)].tolist() == new


def test_a_tied_model_saved_with_only_its_head_loads(tmp_path, tok_dir):
    """safetensors' save_model keeps one tensor of a tied pair, the head: transformers loads that, and so does tinyk."""
    from safetensors.torch import load_file, save_file

    src = init_model_dir("nano", tok_dir, tmp_path / "m", seed=0)
    weights = load_file(tmp_path / "m" / "model.safetensors")
    weights["lm_head.weight"] = weights.pop("model.embed_tokens.weight")
    save_file(weights, tmp_path / "m" / "model.safetensors", metadata={"format": "pt"})
    loaded, _ = load_model(tmp_path / "m")
    x = torch.randint(0, loaded.config.vocab_size, (1, 8))
    with torch.no_grad():
        assert torch.equal(loaded(x), src.eval()(x))


def test_a_tinyk_model_saved_back_by_transformers_loads(tmp_path, tok_dir):
    """transformers 5 saves a tokenizer without special_tokens_map.json; tokenizer.json is all tinyk needs,
    and a model made from it is complete again."""
    src = init_model_dir("nano", tok_dir, tmp_path / "m", seed=0)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    back = tmp_path / "back"
    hf.save_pretrained(back)
    AutoTokenizer.from_pretrained(tmp_path / "m").save_pretrained(back)
    (back / "special_tokens_map.json").unlink(missing_ok=True)
    model, _ = load_model(back)
    x = torch.randint(0, src.config.vocab_size, (2, 20))
    with torch.no_grad():
        assert (model(x) - src.eval()(x)).abs().max().item() < 1e-5
    again = save_model(model, back, tmp_path / "again")
    assert (again / "special_tokens_map.json").is_file() and load_model(again)[1].eos_id == 4
    # transformers rewrote tokenizer.json (a post-processor, its own layout): still the same tokenizer, so
    # data prepared with the original is accepted; data from before content hashes carries the bytes' hash.
    from tinyk.inputs import hash_files
    from tinyk.tokenizer import same_tokenizer, tokenizer_hash

    assert (back / "tokenizer.json").read_bytes() != (tmp_path / "m" / "tokenizer.json").read_bytes()
    assert tokenizer_hash(back) == tokenizer_hash(tmp_path / "m") == tokenizer_hash(tok_dir)
    assert same_tokenizer(hash_files([tok_dir / "tokenizer.json"]), tok_dir)
    assert not same_tokenizer(hash_files([tok_dir / "tokenizer.json"]), back)


# ----------------------------------------------------------------------------- the tutorial's checkpoints

def seed_forward(sd: dict, x: torch.Tensor, n_heads: int, eps: float = 1e-5, theta: float = 10000.0) -> torch.Tensor:
    """Logits as the tutorial's k_model.py computes them: RMSNorm eps (its default 1e-5), and RoPE (theta 10000,
    or a variant's) rotating adjacent channel pairs of each head, which transformers and tinyk order differently."""
    emb = sd["tok_embeddings.weight"]
    (batch, seq), dim = x.shape, emb.shape[1]
    hd = dim // n_heads
    angles = torch.outer(torch.arange(seq).float(), 1.0 / theta ** (torch.arange(0, hd, 2).float() / hd))
    cos, sin = angles.cos()[None, :, None], angles.sin()[None, :, None]

    def rms(v, w):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps) * w

    def rope(v):
        a, b = v[..., 0::2], v[..., 1::2]
        return torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2)

    h = emb[x]
    for i in range(len({k.split(".")[1] for k in sd if k.startswith("layers.")})):
        def w(name, i=i):
            return sd[f"layers.{i}.{name}.weight"]
        a = rms(h, w("attention_norm"))
        q = rope((a @ w("attention.wq").T).view(batch, seq, n_heads, hd))
        k = rope((a @ w("attention.wk").T).view(batch, seq, -1, hd))
        v = (a @ w("attention.wv").T).view(batch, seq, -1, hd)
        k, v = (t.repeat_interleave(n_heads // t.shape[2], 2) for t in (k, v))  # its repeat_kv
        o = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                             is_causal=True)
        h = h + o.transpose(1, 2).reshape(batch, seq, dim) @ w("attention.wo").T
        f = rms(h, w("ffn_norm"))
        h = h + (torch.nn.functional.silu(f @ w("feed_forward.w1").T) * (f @ w("feed_forward.w3").T)) \
            @ w("feed_forward.w2").T
    return rms(h, sd["norm.weight"]) @ sd["output.weight"].T


def seed_state_dict(vocab: int, dim: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                    hidden: int = 192, tied: bool = True) -> dict[str, torch.Tensor]:
    """Random weights under the tutorial's names (tied embeddings, as its model has them)."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape, mean=0.0):
        return mean + 0.1 * torch.randn(*shape, generator=g)

    kv = kv_heads * dim // heads
    sd = {"tok_embeddings.weight": rand(vocab, dim), "norm.weight": rand(dim, mean=1.0)}
    sd["output.weight"] = sd["tok_embeddings.weight"] if tied else rand(vocab, dim)
    for i in range(layers):
        sd |= {f"layers.{i}.attention.wq.weight": rand(dim, dim), f"layers.{i}.attention.wk.weight": rand(kv, dim),
               f"layers.{i}.attention.wv.weight": rand(kv, dim), f"layers.{i}.attention.wo.weight": rand(dim, dim),
               f"layers.{i}.feed_forward.w1.weight": rand(hidden, dim),
               f"layers.{i}.feed_forward.w2.weight": rand(dim, hidden),
               f"layers.{i}.feed_forward.w3.weight": rand(hidden, dim),
               f"layers.{i}.attention_norm.weight": rand(dim, mean=1.0),
               f"layers.{i}.ffn_norm.weight": rand(dim, mean=1.0)}
    return sd


@pytest.mark.parametrize("tied,prefix,wrap", [(True, "_orig_mod.", False), (False, "module._orig_mod.", True)])
def test_a_checkpoint_of_the_tutorial_imports_and_computes_the_same(tmp_path, tok_dir, capsys, tied, prefix, wrap):
    """As its scripts save it (from a compiled model), or wrapped by DDP and saved with the optimizer."""
    from tinyk.cli import main
    from tinyk.tokenizer import load_tokenizer

    sd = seed_state_dict(load_tokenizer(tok_dir).vocab_size, tied=tied)
    ckpt = tmp_path / "pretrain_64_2_512.pth"
    saved = {f"{prefix}{k}": v for k, v in sd.items()}
    torch.save({"model": saved, "optimizer": {"state": {}}} if wrap else saved, ckpt)
    with pytest.raises(SystemExit) as e:
        main(["model", "import", str(ckpt), "--tokenizer", str(tok_dir), "--out", str(tmp_path / "m"),
              "--n-heads", "4", "--max-seq-len", "64"])
    assert e.value.code == 0
    vocab = sd["tok_embeddings.weight"].shape[0]
    n = sum(v.numel() for k, v in sd.items() if k != "output.weight" or not tied)
    assert (f"{n:,} parameters (dim 64, 2 layers, 4 heads / 2 KV, hidden 192, vocab {vocab}"
            f"{', tied embeddings' if tied else ''})" in capsys.readouterr().out)
    model, _ = load_model(tmp_path / "m")
    assert model.config.tie_embeddings == tied and model.config.max_seq_len == 64
    x = torch.randint(0, sd["tok_embeddings.weight"].shape[0], (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = seed_forward(sd, x, n_heads=4)
        assert (model(x) - want).abs().max().item() < 1e-4
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
        assert (hf(x).logits - want).abs().max().item() < 1e-4


def test_a_model_directory_the_tutorials_save_pretrained_wrote_imports_with_its_heads(tmp_path, tok_dir):
    """Its config.json (model_type Tiny-K) has the head count, context and RMSNorm eps a .pth leaves out."""
    from safetensors.torch import save_file

    from tinyk.checkpoint import import_seed_checkpoint
    from tinyk.tokenizer import load_tokenizer

    sd = seed_state_dict(load_tokenizer(tok_dir).vocab_size, heads=8, kv_heads=4)
    saved = tmp_path / "k-model"
    saved.mkdir()
    save_file({k: v.clone() for k, v in sd.items()}, saved / "model.safetensors")
    config = {"model_type": "Tiny-K", "dim": 64, "n_heads": 8, "max_seq_len": 96, "norm_eps": 0.01}
    for eps in (0, "1e-5", True):
        (saved / "config.json").write_text(json.dumps({**config, "norm_eps": eps}))
        with pytest.raises(TinykError, match=f"has norm_eps {eps!r}; RMSNorm's eps is a small positive number"):
            import_seed_checkpoint(saved, tok_dir, tmp_path / "m")
    (saved / "config.json").write_text(json.dumps(config))
    model, notes = import_seed_checkpoint(saved, tok_dir, tmp_path / "m")
    assert (model.config.n_heads, model.config.n_kv_heads, model.config.max_seq_len) == (8, 4, 96) and notes == []
    model, notes = import_seed_checkpoint(saved, tok_dir, tmp_path / "m64", max_seq_len=64)  # the flag wins
    assert model.config.max_seq_len == 64 and notes == []
    with pytest.raises(TinykError, match="--n-heads 16 contradicts the 8 heads .* was saved with"):
        import_seed_checkpoint(saved, tok_dir, tmp_path / "m16", n_heads=16)
    with pytest.raises(TinykError, match=f"not a tinyk model directory: {saved}; it holds a model the tutorial's "
                                         f"code saved .*`tinyk model import {saved} --tokenizer"):
        model_info(saved)  # as every command that reads a model directory says
    x = torch.randint(0, 100, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (load_model(tmp_path / "m")[0](x) - seed_forward(sd, x, n_heads=8, eps=0.01)).abs().max().item() < 1e-4


HINT = " (--n-heads / --max-seq-len if yours differ; wrong heads load but compute something else)"


def test_a_tutorial_pth_is_pointed_to_import_which_says_what_it_assumed(tmp_path, tok_dir, capsys):
    """A .pth records no head count or context: the import says it assumed the tutorial's, unless the
    RoPE tables some variants of its model keep tell them; other commands point at the import."""
    from tinyk.checkpoint import import_seed_checkpoint
    from tinyk.cli import main
    from tinyk.tokenizer import load_tokenizer

    sd = seed_state_dict(load_tokenizer(tok_dir).vocab_size)
    runs = tmp_path / "base_monkey"  # where the tutorial's script saves
    runs.mkdir()
    ckpt = _save(sd, runs / "pretrain_64_2_512.pth")
    for where in (ckpt, runs):
        with pytest.raises(TinykError, match=f"`tinyk model import {ckpt} --tokenizer TOKENIZER_DIR --out DIR`"):
            model_info(where)
    init_model_dir("nano", tok_dir, tmp_path / "mine")  # a tinyk model's weights file: its folder is the model
    with pytest.raises(TinykError, match=f"; give the model directory it is in, {tmp_path / 'mine'}$"):
        model_info(tmp_path / "mine" / "model.safetensors")
    with pytest.raises(TinykError, match="holds neither model.safetensors nor pytorch_model.bin; give the file to "
                                         "import \\(pretrain_64_2_512.pth\\)"):
        import_seed_checkpoint(runs, tok_dir, tmp_path / "m")
    with pytest.raises(SystemExit) as e:
        main(["model", "import", str(ckpt), "--tokenizer", str(tok_dir), "--out", str(tmp_path / "m")])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "note: 16 heads and a context of 512 tokens (the tutorial's) assumed" in out
    assert "token embeddings" not in out
    n = load_tokenizer(tok_dir).vocab_size
    wider = _save(seed_state_dict(n + 64), tmp_path / "wider.pth")  # another tokenizer's, or a padded vocabulary
    with pytest.raises(SystemExit) as e:
        main(["model", "import", str(wider), "--tokenizer", str(tok_dir), "--out", str(tmp_path / "w"), "--n-heads",
              "4", "--max-seq-len", "64"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "assumed" not in out
    assert f"note: the model has {n + 64} token embeddings and the tokenizer {n} tokens" in out
    _, notes = import_seed_checkpoint(wider, tok_dir, tmp_path / "w2", n_heads=4, max_seq_len=64)  # told in Python too
    assert len(notes) == 1 and notes[0].startswith(f"the model has {n + 64} token embeddings")
    _, notes = import_seed_checkpoint(wider, tok_dir, tmp_path / "w3", n_heads=4)  # what was assumed, then the vocab
    assert notes == ["a context of 512 tokens (the tutorial's) assumed: the checkpoint does not record it" + HINT,
                     f"the model has {n + 64} token embeddings and the tokenizer {n} tokens, so ids from {n} on are "
                     f"never used: is --tokenizer the one the model was trained with?"]
    narrower = _save(seed_state_dict(n - 8), tmp_path / "narrower.pth")  # ids the model has no row for
    with pytest.raises(TinykError, match=f"tokens but the model's vocab_size is {n - 8}$"):
        import_seed_checkpoint(narrower, tok_dir, tmp_path / "n", n_heads=4, max_seq_len=64)
    assert not (tmp_path / "n").exists()
    half = 64 // 4 // 2  # the tables' width: half a head's for 4 heads of dim 64
    angles = torch.outer(torch.arange(80.0), 10000.0 ** (-torch.arange(half) / half))  # the tutorial's tables
    tables = {**sd, "freqs_cos": torch.cos(angles), "freqs_sin": torch.sin(angles)}
    model, notes = import_seed_checkpoint(_save(tables, tmp_path / "t.pth"), tok_dir, tmp_path / "t")
    assert (model.config.n_heads, model.config.max_seq_len, notes) == (
        4, 80, ["4 heads and a context of 80 tokens (from its RoPE tables) assumed: the checkpoint does not record them"
                + HINT])
    masked = {**sd, **{f"layers.{i}.attention.mask": torch.full((1, 1, 96, 96), -torch.inf).triu(1)
                       for i in range(2)}}  # what a model without flash attention keeps: its context
    model, notes = import_seed_checkpoint(_save(masked, tmp_path / "mask.pth"), tok_dir, tmp_path / "mk", n_heads=4)
    assert (model.config.max_seq_len, notes) == (
        96, ["a context of 96 tokens (from its attention mask) assumed: the checkpoint does not record it" + HINT])
    model, notes = import_seed_checkpoint(tmp_path / "mask.pth", tok_dir, tmp_path / "mk2")
    assert notes[0] == "16 heads (the tutorial's) and a context of 96 tokens (from its attention mask) assumed: " \
                      "the checkpoint does not record them" + HINT
    model, notes = import_seed_checkpoint(tmp_path / "t.pth", tok_dir, tmp_path / "t2", n_heads=4, max_seq_len=64)
    assert (model.config.n_heads, model.config.max_seq_len, notes) == (4, 64, [])  # the flags win
    with pytest.raises(TinykError) as e:  # but not over the head count the tables fix
        import_seed_checkpoint(tmp_path / "t.pth", tok_dir, tmp_path / "t3", n_heads=8)
    assert str(e.value) == (f"--n-heads 8 contradicts the 4 heads of {tmp_path / 't.pth'}'s RoPE tables (half a "
                            f"head, 8 wide, for dim 64); leave --n-heads out") and not (tmp_path / "t3").exists()
    # Tables laid out otherwise (whole heads wide, cos repeated) tell nothing: --n-heads decides.
    wide = {**sd, "freqs_cos": torch.cat([torch.cos(angles)] * 2, 1),
            "freqs_sin": torch.cat([torch.sin(angles)] * 2, 1)}
    model, _ = import_seed_checkpoint(_save(wide, tmp_path / "w.pth"), tok_dir, tmp_path / "t4", n_heads=4)
    assert model.config.n_heads == 4
    x = torch.randint(0, 100, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (model(x) - seed_forward(sd, x, n_heads=4)).abs().max().item() < 1e-4


@pytest.mark.parametrize("change,message", [
    (lambda sd: {**sd, "layers.0.attention.bias": torch.zeros(3)}, "holds layers.0.attention.bias, which the "
                                                                    "tutorial's model does not have"),
    (lambda sd: {k: v for k, v in sd.items() if "ffn_norm" not in k},
     "lacks weights: \\[.layers.0.ffn_norm.weight"),  # named as the user's file names them
    (lambda sd: {k: v for k, v in sd.items() if k != "layers.1.feed_forward.w3.weight"},
     "lacks weights: \\['layers.1.feed_forward.w3.weight'\\]"),
    (lambda sd: {"tok_embeddings": 1}, "is not a state dict"),
    (lambda sd: {"model.embed_tokens.weight": sd["tok_embeddings.weight"]},
     "not a checkpoint of the tutorial's model but a Hugging Face Llama checkpoint; tinyk reads such a model from "
     "the directory transformers' save_pretrained writes"),
    (lambda sd: {"embed.weight": sd["tok_embeddings.weight"]}, "not a checkpoint of the tutorial's model \\(it has no"),
    (lambda sd: {**sd, "args": argparse.Namespace(dim=64)}, "holds Python objects besides tensors, which tinyk does "
                                                             "not unpickle"),
    (lambda sd: {k: v[:0] if "w1" in k or "w3" in k else v[:, :0] if "w2" in k else v for k, v in sd.items()},
     "has feed-forward layers of width 0"),
    # A tensor that is no matrix where the model's shape is read from (it was an IndexError).
    (lambda sd: {**sd, "layers.0.attention.wk.weight": torch.tensor(1.0)},
     "layers.0.attention.wk.weight is \\(\\), where the tutorial's model has a matrix"),
    (lambda sd: {**sd, "layers.0.feed_forward.w1.weight": torch.tensor(1.0)},
     "layers.0.feed_forward.w1.weight is \\(\\), where the tutorial's model has a matrix"),
    # A layer not numbered as nn.ModuleList numbers them is named (it was counted as a layer, then
    # reported as a missing "layers.2").
    (lambda sd: {**sd, "layers.x.attention.wq.weight": sd["layers.0.attention.wq.weight"]},
     "holds layers.x.attention.wq.weight, which the tutorial's model does not have"),
])
def test_what_is_not_the_tutorials_checkpoint_is_one_line(tmp_path, tok_dir, change, message):
    from tinyk.checkpoint import import_seed_checkpoint
    from tinyk.tokenizer import load_tokenizer

    ckpt = tmp_path / "x.pth"
    torch.save(change(seed_state_dict(load_tokenizer(tok_dir).vocab_size)), ckpt)
    with pytest.raises(TinykError, match=message):
        import_seed_checkpoint(ckpt, tok_dir, tmp_path / "m", n_heads=4)
    assert not (tmp_path / "m").exists()


def test_import_never_replaces_its_input_and_reads_the_config_or_refuses_it(tmp_path, tok_dir):
    """--out over the directory that holds the checkpoint (with --force) would delete the checkpoint; a
    config.json that cannot be read would have the head count guessed, which loads and computes
    something else; a plain state dict saved with a newer pickle protocol is named as such."""
    from tinyk.checkpoint import import_seed_checkpoint
    from tinyk.tokenizer import load_tokenizer

    sd = seed_state_dict(load_tokenizer(tok_dir).vocab_size)
    holder = tmp_path / "holder"
    import_seed_checkpoint(_save(sd, tmp_path / "x.pth"), tok_dir, holder, n_heads=4)
    ckpt = _save(sd, holder / "pretrain.pth")
    with pytest.raises(TinykError, match=f"--out {holder} would replace the input {ckpt}"):
        import_seed_checkpoint(ckpt, tok_dir, holder, n_heads=4, force=True)
    assert ckpt.is_file()
    saved = tmp_path / "k-model"
    saved.mkdir()
    save_file({k: v.clone() for k, v in sd.items()}, saved / "model.safetensors")
    with pytest.raises(TinykError, match=f"--out {saved / 'converted'} lies inside the input {saved}"):
        import_seed_checkpoint(saved, tok_dir, saved / "converted", n_heads=4)
    for config in ("{bad", '{"n_heads": "4"}', "[]"):
        (saved / "config.json").write_text(config)
        with pytest.raises(TinykError, match=f"{saved / 'config.json'}"):
            import_seed_checkpoint(saved, tok_dir, tmp_path / "m")
    torch.save(sd, tmp_path / "p4.pth", pickle_protocol=4)
    with pytest.raises(TinykError, match="saved with a newer pickle protocol"):
        import_seed_checkpoint(tmp_path / "p4.pth", tok_dir, tmp_path / "m", n_heads=4)
    (tmp_path / "garbage.pth").write_bytes(b"\x80\x02garbage")  # a protocol the loader reads: damaged, not newer
    with pytest.raises(TinykError, match=r"garbage.pth: it is damaged \(an opcode no pickle has\)$"):
        import_seed_checkpoint(tmp_path / "garbage.pth", tok_dir, tmp_path / "m", n_heads=4)
    cut = tmp_path / "cut.pth"  # a copy that did not finish: torch said "[Errno 22] Invalid argument"
    cut.write_bytes(ckpt.read_bytes()[:ckpt.stat().st_size // 2])
    with pytest.raises(TinykError) as e:
        import_seed_checkpoint(cut, tok_dir, tmp_path / "m", n_heads=4)
    assert str(e.value) == (f"cannot read {cut}: it is cut short or damaged (torch.save's zip archive has no end); "
                            f"copy or save it again")
    odd = {**sd, "output.weight": torch.zeros(sd["tok_embeddings.weight"].shape[0] + 100, 64)}  # not "--n-heads?"
    with pytest.raises(TinykError) as e:
        import_seed_checkpoint(_save(odd, tmp_path / "odd.pth"), tok_dir, tmp_path / "m", n_heads=4)
    vocab = sd["tok_embeddings.weight"].shape[0]
    assert str(e.value) == (f"{tmp_path / 'odd.pth'}: its output.weight is ({vocab + 100}, 64) but "
                            f"tok_embeddings.weight ({vocab}, 64); the tutorial's model has one row per token in both "
                            f"(a damaged or edited checkpoint)")
    assert not (tmp_path / "m").exists()


def test_a_tied_config_with_a_head_of_its_own_is_refused_not_silently_retied(tmp_path, tok_dir):
    """transformers uses such a file's lm_head (untying it, with a warning); tinyk replaced it with the
    embedding, and so computed another model: now it says which setting to change."""
    init_model_dir("nano", tok_dir, tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    state = load_file(f)
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, f)
    assert load_model(tmp_path / "m")[0].config.tie_embeddings  # the same head: nothing lost
    assert model_info(tmp_path / "m")["config"]["tie_embeddings"]
    state["lm_head.weight"][0, 0] += 1
    save_file(state, f)
    for read in (load_model, model_info):  # `tinyk model info` refuses what every other command refuses
        with pytest.raises(TinykError) as e:
            read(tmp_path / "m")
        assert str(e.value) == (f"{f} holds an lm_head.weight unlike its embedding, but config.json ties them "
                                f"(tie_word_embeddings: true): set that to false to use this head, or remove the "
                                f"tensor to use the embedding")


def test_import_reads_what_safetensors_save_model_keeps_and_refuses_integer_or_fp8_weights(tmp_path, tok_dir):
    """The tutorial ties its embedding to its output layer; safetensors' save_model keeps one tensor of two
    that share memory (output.weight), which import refused as "no tok_embeddings.weight". Integer weights
    were made float and imported as a garbage model."""
    from tinyk.checkpoint import import_seed_checkpoint
    from tinyk.tokenizer import load_tokenizer

    sd = seed_state_dict(load_tokenizer(tok_dir).vocab_size)
    one = tmp_path / "save_model.safetensors"
    save_file({k: v.clone() for k, v in sd.items() if k != "tok_embeddings.weight"}, one)
    model, _ = import_seed_checkpoint(one, tok_dir, tmp_path / "m", n_heads=4)
    assert model.config.tie_embeddings
    x = torch.randint(0, 100, (1, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (load_model(tmp_path / "m")[0](x) - seed_forward(sd, x, n_heads=4)).abs().max().item() < 1e-4
    for dtype in (torch.int8, torch.float8_e4m3fn):
        bad = tmp_path / f"{str(dtype)[6:]}.pth"
        torch.save({k: (v * 100).to(dtype) for k, v in sd.items()}, bad)
        with pytest.raises(TinykError, match=rf"^{re.escape(str(bad))} holds {str(dtype)[6:]} weights \("):
            import_seed_checkpoint(bad, tok_dir, tmp_path / "bad", n_heads=4)
    k_model = tmp_path / "k-model"  # a config.json whose head count does not fit: the fix is there, not a flag
    k_model.mkdir()
    save_file({k: v.clone() for k, v in sd.items()}, k_model / "model.safetensors")
    (k_model / "config.json").write_text(json.dumps({"model_type": "Tiny-K", "dim": 64, "n_heads": 3}))
    with pytest.raises(TinykError, match=f"dim 64 does not split into 3 heads .*; correct n_heads in "
                                         f"{re.escape(str(k_model / 'config.json'))}$"):
        import_seed_checkpoint(k_model, tok_dir, tmp_path / "m3")


def test_weights_that_are_not_finite_are_refused_everywhere(tmp_path, tok_dir):
    init_model_dir("nano", tok_dir, tmp_path / "m")
    state = load_file(tmp_path / "m" / "model.safetensors")
    state["model.norm.weight"][0] = float("nan")
    save_file(state, tmp_path / "m" / "model.safetensors")
    with pytest.raises(TinykError, match="holds inf or nan weights \\(model.norm.weight\\)"):
        load_model(tmp_path / "m")
    state["model.norm.weight"] = torch.ones_like(state["model.norm.weight"])
    for bad in (float("inf"), float("-inf"), float("nan")):  # one element of a matrix, in any stored dtype
        for dtype in (torch.bfloat16, torch.float16):
            emb = state["model.embed_tokens.weight"].clone()
            emb[3, 5] = bad
            save_file({**state, "model.embed_tokens.weight": emb.to(dtype)}, tmp_path / "m" / "model.safetensors")
            with pytest.raises(TinykError, match="holds inf or nan weights \\(model.embed_tokens.weight\\)"):
                load_model(tmp_path / "m")
    state["model.norm.weight"] = state["model.norm.weight"].to(torch.int8)  # an integer export, or a damaged header
    save_file(state, tmp_path / "m" / "model.safetensors")
    for load in (load_model, model_info):  # info reads the dtype from the header
        with pytest.raises(TinykError, match=r"holds int8 weights \(model.norm.weight\); tinyk loads float32, "
                                             r"float16, bfloat16 or float64 weights"):
            load(tmp_path / "m")
    for dtype in (torch.bool, torch.complex64):
        state["model.norm.weight"] = state["model.norm.weight"].to(dtype)
        save_file(state, tmp_path / "m" / "model.safetensors")
        with pytest.raises(TinykError, match=rf"holds {str(dtype)[6:]} weights \(model.norm.weight\)"):
            model_info(tmp_path / "m")
        state["model.norm.weight"] = state["model.norm.weight"].real.float() if dtype.is_complex else \
            state["model.norm.weight"].float()
    for fp8 in (torch.float8_e4m3fn, getattr(torch, "float8_e8m0fnu", torch.float8_e5m2)):  # floats torch cannot check
        state["model.norm.weight"] = state["model.norm.weight"].float().to(fp8)
        save_file(state, tmp_path / "m" / "model.safetensors")
        for load in (load_model, model_info):  # it loaded in info, and was a traceback from isfinite in generate
            with pytest.raises(TinykError, match=rf"holds {str(fp8)[6:]} weights \(model.norm.weight\)"):
                load(tmp_path / "m")
    # A header dtype this tinyk has no name for (AMD's fp8) is refused by the header's own name.
    state["model.norm.weight"] = state["model.norm.weight"].float().to(torch.float8_e4m3fnuz)
    save_file(state, tmp_path / "m" / "model.safetensors")
    with pytest.raises(TinykError, match=rf"^{re.escape(str(tmp_path / 'm'))}/model.safetensors holds F8_E4M3FNUZ "
                                         r"weights \(model.norm.weight\); tinyk loads float32"):  # not "damaged"
        model_info(tmp_path / "m")
    state["model.norm.weight"] = state["model.norm.weight"].float().to(torch.bfloat16)
    save_file(state, tmp_path / "m" / "model.safetensors")
    assert model_info(tmp_path / "m")["parameters"] > 0
    (tmp_path / "m" / "tokenizer.json").unlink()  # and `model info` refuses what every other command does
    with pytest.raises(TinykError, match="tokenizer"):
        model_info(tmp_path / "m")


def test_tinyk_imports_on_a_torch_without_the_newest_float_formats():
    """pyproject allows torch 2.6, which has neither float8_e8m0fnu (2.7) nor float4_e2m1fn_x2 (2.8)."""
    code = ("import torch\nfor name in ('float8_e8m0fnu', 'float4_e2m1fn_x2'):\n    vars(torch).pop(name, None)\n"
            "from tinyk.checkpoint import HEADER_DTYPES\nassert 'F4' not in HEADER_DTYPES and 'F32' in HEADER_DTYPES")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_a_config_far_larger_than_its_weights_is_refused_before_building_it(tmp_path, tok_dir):
    """A downloaded config.json saying 100,000 layers, or a dim of 20 million, beside a small file: found
    from the file's names and shapes before a model of that size is built (which took minutes and GBs,
    also when the file held the last layer's first tensor alone)."""
    m = tmp_path / "m"
    init_model_dir("nano", tok_dir, m)
    config = json.loads((m / "config.json").read_text())
    deep = {**config, "num_hidden_layers": 100_000, "tinyk": {**config["tinyk"], "n_layers": 100_000}}
    (m / "config.json").write_text(json.dumps(deep))
    for load in (load_model, model_info):
        with pytest.raises(TinykError, match=r"lacks weights: \['model.layers.2.input_layernorm.weight', "):
            load(m)
    weights = load_file(m / "model.safetensors")
    save_file({**weights, "model.layers.99999.input_layernorm.weight": torch.ones(64)}, m / "model.safetensors")
    with pytest.raises(TinykError, match=r"lacks weights: \['model.layers.2.input_layernorm.weight', "):
        load_model(m)
    (m / "config.json").write_text(json.dumps(config))
    save_file({**weights, f"model.layers.{'1' * 5000}.input_layernorm.weight": torch.ones(64)}, m / "model.safetensors")
    with pytest.raises(TinykError, match=r"holds weights tinyk's model has no place for: \['model.layers.1111"):
        load_model(m)  # not int()'s error for a number of thousands of digits
    wide = {**config, "hidden_size": 20_000_000, "head_dim": 5_000_000, "tinyk": {**config["tinyk"], "dim": 20_000_000}}
    (m / "config.json").write_text(json.dumps(wide))
    for load in (load_model, model_info):
        with pytest.raises(TinykError, match=r"does not match its config.json: model.embed_tokens.weight is "
                                             r"\(\d+, 64\), the config needs \(\d+, 20000000\)"):
            load(m)


def _save(sd: dict, path: Path) -> Path:
    torch.save(sd, path)
    return path


def test_a_file_torch_did_not_write_is_named_as_such(tmp_path, tok_dir):
    from tinyk.checkpoint import import_seed_checkpoint

    ckpt = tmp_path / "notes.pth"
    ckpt.write_text("not weights\n")
    with pytest.raises(TinykError, match=f"^{ckpt} is not a PyTorch checkpoint \\(a file torch.save wrote"):
        import_seed_checkpoint(ckpt, tok_dir, tmp_path / "m", n_heads=4)
    assert not (tmp_path / "m").exists()


def test_a_head_count_that_does_not_divide_the_width_is_one_line(tmp_path, tok_dir):
    from tinyk.checkpoint import import_seed_checkpoint
    from tinyk.tokenizer import load_tokenizer

    ckpt = tmp_path / "x.pth"
    torch.save(seed_state_dict(load_tokenizer(tok_dir).vocab_size), ckpt)
    # The user's own --n-heads is named as theirs, with counts that would do (it said "set --n-heads").
    with pytest.raises(TinykError, match=r"^dim 64 does not split into --n-heads 3 heads of an even size \(head "
                                         r"counts that do: 1, 2, 4, 8, 16, 32\)$"):
        import_seed_checkpoint(ckpt, tok_dir, tmp_path / "m", n_heads=3)


def test_a_cuda_device_that_is_not_there_is_named_as_typed(monkeypatch):
    """`--device cuda:1` was reported as "--device cuda"; a GPU number past the machine's was a CUDA traceback."""
    from tinyk.errors import TinykError
    from tinyk.model import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(TinykError, match=r"^--device cuda:1 was asked for but CUDA is not available$"):
        resolve_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(TinykError, match=r"^--device cuda:1: this machine has 1 CUDA device, numbered from 0$"):
        resolve_device("cuda:1")
    assert resolve_device("cuda:0") == torch.device("cuda:0")


def test_eval_mode_turns_attention_dropout_off():
    """mutant dropout_in_eval: SDPA's dropout_p kept in eval (generation, eval loss) with dropout > 0."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**preset_config("nano").to_dict(), "dropout": 0.5})).eval()
    x = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_a_models_dropout_is_transformers_attention_dropout(tmp_path, tok_dir):
    """transformers' Llama drops on the attention weights as tinyk does (tinyk on its residuals too):
    config.json said 0.0 whatever the model trained with, so fine-tuning it in transformers dropped none."""
    out = save_model(Transformer(ModelConfig(**{**preset_config("nano").to_dict(), "dropout": 0.1})), tok_dir,
                     tmp_path / "m")
    assert LlamaConfig.from_pretrained(out).attention_dropout == 0.1 and load_config(out).dropout == 0.1


def test_rmsnorm_rounds_as_transformers_does_in_bf16():
    """mutant rmsnorm_cast_after_weight: `(weight * x_fp32).to(bf16)` instead of HF's `weight * x.to(bf16)`."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    ours, theirs = RMSNorm(64, 1e-5), LlamaRMSNorm(64, eps=1e-5)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(64))
        theirs.weight.copy_(ours.weight)
    ours, theirs = ours.to(torch.bfloat16), theirs.to(torch.bfloat16)
    x = torch.randn(4, 32, 64).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))


def test_kv_cache_mask_leaves_no_query_without_a_key():
    """mutant cache_nan_guard_removed: equivalent on torch 2.13 (SDPA gives 0 for a fully masked row),
    so only the mask's own contract shows it."""
    cache = KVCache(preset_config("nano"), 2, 8, "cpu", torch.float32)
    valid = torch.tensor([[True] * 4, [False, False, True, True]])
    m = cache.mask(valid)
    assert m.any(-1).all()


def test_bf16_weights_load_as_an_fp32_model(tmp_path, tok_dir):
    """mutant load_keeps_file_dtype: a bf16 model.safetensors (save_pretrained of a bf16 model) loaded as a
    bf16 model, which computes in bf16 (or fails on a mix of dtypes)."""
    from safetensors.torch import load_file, save_file

    init_model_dir("nano", tok_dir, tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(f).items()}, f, metadata={"format": "pt"})
    model, _ = load_model(tmp_path / "m")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    with torch.no_grad():
        assert model(torch.randint(0, model.config.vocab_size, (1, 8))).dtype == torch.float32


def test_a_layer_of_another_shape_is_refused_by_load_and_info(tmp_path, tok_dir):
    """mutant shape_check_ndim_only: a layer tensor of the wrong shape (the embedding is checked apart)
    was a torch traceback from load_model and a wrong parameter count from model_info."""
    init_model_dir("nano", tok_dir, tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "intermediate_size": 256, "tinyk": {**config["tinyk"], "hidden_dim": 256}}))
    for read in (load_model, model_info):
        with pytest.raises(TinykError, match=r"does not match its config.json: model.layers.0.mlp.gate_proj.weight is "
                                             r"\(192, 64\), the config needs \(256, 64\)"):
            read(tmp_path / "m")


def test_transformers_loads_a_tinyk_model_in_fp32_unless_asked(nano_model_dir):
    """mutant hfcfg_torch_dtype: config.json's torch_dtype decides from_pretrained's default dtype."""
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(nano_model_dir).dtype == torch.float32


def test_a_config_without_kv_heads_or_context_reads_llamaconfigs_defaults(tmp_path, tok_dir):
    """mutants fromhf_default_kv / fromhf_default_ctx: num_key_value_heads missing means one per query head
    (older multi-head Llama configs), max_position_embeddings missing means 2048, as transformers reads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=4, vocab_size=512, max_position_embeddings=64)).eval()
    out = tmp_path / "hf"
    hf.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tok_dir / f, out / f)
    config = json.loads((out / "config.json").read_text())
    del config["num_key_value_heads"], config["max_position_embeddings"]
    (out / "config.json").write_text(json.dumps(config))
    ours, _ = load_model(out)
    assert (ours.config.n_kv_heads, ours.config.max_seq_len) == (4, 2048)
    x = torch.randint(0, 512, (1, 20))
    with torch.no_grad():
        assert (ours(x) - hf(x).logits).abs().max().item() < 1e-4


def test_model_info_sizes_the_kv_cache_by_kv_heads(nano_model_dir):
    """mutant info_kv_uses_n_heads: `tinyk model info`'s KV-cache size counted query heads."""
    model, _ = load_model(nano_model_dir)
    cfg = model.config
    cache = KVCache(cfg, 1, cfg.max_seq_len, "cpu", torch.bfloat16)
    want = (cache.k.numel() + cache.v.numel()) * 2 / 2**20
    assert model_info(nano_model_dir)["memory"]["kv_cache_per_seq_bf16_mib"] == pytest.approx(want)


def test_a_sequence_as_long_as_the_context_runs():
    """mutant ctx_off_by_one: `>=` refused exactly max_seq_len positions (training's full-length rows)."""
    model = Transformer(preset_config("nano")).eval()
    n = model.config.max_seq_len
    with torch.no_grad():
        assert model(torch.zeros(1, n, dtype=torch.long)).shape[1] == n
        with pytest.raises(ValueError, match=f"{n + 1} positions exceed"):
            model(torch.zeros(1, n + 1, dtype=torch.long))


def test_the_tokenizer_config_records_the_models_context(nano_model_dir):
    """mutant tokcfg_max_len: tokenizer_config.json's model_max_length, transformers' truncation length."""
    from transformers import AutoTokenizer

    context = load_model(nano_model_dir)[0].config.max_seq_len
    assert AutoTokenizer.from_pretrained(nano_model_dir).model_max_length == context


def test_float64_weights_load(tmp_path, tok_dir):
    """mutant dtypes_refuse_f64: an fp64 export (torch.double()) is a float tinyk computes with."""
    from safetensors.torch import load_file, save_file

    src = init_model_dir("nano", tok_dir, tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    save_file({k: v.double() for k, v in load_file(f).items()}, f, metadata={"format": "pt"})
    x = torch.randint(0, src.config.vocab_size, (1, 8))
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "m")[0](x), src.eval()(x))


def test_same_model_compares_the_config_too(tmp_path, nano_model_dir):
    """mutant same_model_ignores_config: the same tensors under another config.json (rope_theta) are
    another model; `tinyk eval` would score it as a twin."""
    from tinyk.checkpoint import same_model

    other = tmp_path / "other"
    shutil.copytree(nano_model_dir, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "rope_theta": 5e5,
                                                   "tinyk": {**config["tinyk"], "rope_theta": 5e5}}))
    assert same_model(nano_model_dir, nano_model_dir) and not same_model(nano_model_dir, other)


def test_a_model_written_with_metadata_keeps_the_format_key(tmp_path, tok_dir):
    """mutant save_no_format_meta (`metadata=metadata`): training's best/ and checkpoints pass their own
    header metadata (tinyk.step); without "format": "pt" beside it transformers 4 (tinyk[demo] allows 4.56)
    refuses the file. transformers 5 no longer checks, so the header is read directly."""
    from safetensors import safe_open

    from tinyk.checkpoint import write_model_files
    from tinyk.tokenizer import load_tokenizer

    model = Transformer(preset_config("nano", vocab_size=load_tokenizer(tok_dir).vocab_size))
    (tmp_path / "m").mkdir()
    write_model_files(model, tok_dir, tmp_path / "m", None, metadata={"tinyk.step": "40"})
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt", "tinyk.step": "40"}


@pytest.mark.parametrize("change,what", [
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "RoPE scaling 'dynamic'"),  # transformers 4's spelling
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "RoPE scaling 'llama3'"),
    ({"model_type": "mistral"}, "model_type 'mistral'"),
    ({"mlp_bias": True}, "bias terms"),
    ({"head_dim": 32}, "head_dim 32 other than hidden_size / num_attention_heads"),
])
def test_what_a_config_json_asks_for_that_tinyk_cannot_compute_is_refused(tmp_path, nano_model_dir, change, what):
    """A
    transformers-4 config (rope_scaling's key is `type`), another architecture, MLP biases or another head
    size loaded as a plain Llama, silently computing another function than transformers does."""
    m = tmp_path / "m"
    shutil.copytree(nano_model_dir, m)
    config = json.loads((m / "config.json").read_text())
    (m / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(TinykError, match=f"config.json asks for {what}"):
        load_config(m)


def test_a_config_with_null_kv_heads_and_no_rope_theta_reads_llamaconfigs_defaults(tmp_path, nano_model_dir):
    """LlamaConfig reads `num_key_value_heads: null` as one KV
    head per query head, and a config without rope_theta (nor RoPE parameters) as theta 10000."""
    m = tmp_path / "m"
    shutil.copytree(nano_model_dir, m)
    config = json.loads((m / "config.json").read_text())
    plain = {k: v for k, v in config.items() if k not in ("tinyk", "rope_theta", "rope_parameters", "rope_scaling")}
    (m / "config.json").write_text(json.dumps({**plain, "num_key_value_heads": None}))
    cfg = load_config(m)
    assert (cfg.n_kv_heads, cfg.rope_theta) == (config["num_attention_heads"], 10000.0)


def test_a_saved_model_holds_float32_weights_and_one_tensor_for_a_tied_pair(tmp_path, tok_dir):
    """Config.json says torch_dtype float32, so a model saved
    from bf16 (or half) weights must be float32 in the file; a tied head is the embedding and is not written
    twice (transformers' save_pretrained keeps one of the pair too; the file would be larger by a vocab x dim)."""
    model = init_model_dir("nano", tok_dir, tmp_path / "m")
    save_model(model.to(torch.bfloat16), tok_dir, tmp_path / "bf16")
    state = load_file(tmp_path / "bf16" / "model.safetensors")
    assert "lm_head.weight" not in state and "model.embed_tokens.weight" in state
    assert {v.dtype for v in state.values()} == {torch.float32}
    assert set(state) == set(load_file(tmp_path / "m" / "model.safetensors"))


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads the process's memory map (Linux)")
def test_load_model_with_copy_holds_no_mapping_of_the_file(tmp_path, tok_dir):
    """A resumed run loads its checkpoint with copy=True so that deleting the
    checkpoint frees its disk space; weights still mapped from the file keep it allocated while the run lives."""
    init_model_dir("nano", tok_dir, tmp_path / "m")
    weights = str(tmp_path / "m" / "model.safetensors")
    model, _ = load_model(tmp_path / "m", copy=True)
    assert weights not in Path("/proc/self/maps").read_text()
    del model


@pytest.mark.parametrize("index", ["10", "01", "9" * 5000])
def test_weights_of_a_layer_the_config_does_not_have_are_refused(tmp_path, tok_dir, index):
    """A file with a layer more
    than config.json says (a num_hidden_layers edited down) loaded without it, computing another model. Ten
    layers, so that "01" is no longer than the largest index and only the regex refuses it."""
    init_model_dir("nano", tok_dir, tmp_path / "m", n_layers=10)
    f = tmp_path / "m" / "model.safetensors"
    state = load_file(f)
    name = f"model.layers.{index}.mlp.gate_proj.weight"
    state[name] = state["model.layers.0.mlp.gate_proj.weight"].clone()
    save_file(state, f, metadata={"format": "pt"})
    for read in (load_model, model_info):
        with pytest.raises(TinykError, match="holds weights tinyk's model has no place for: ") as e:
            read(tmp_path / "m")
        assert name in str(e.value)


def test_transformers_reads_no_padding_row_and_im_end_as_the_first_eos(nano_model_dir):
    """Transformers makes config.json's pad id the embedding's
    padding_idx, whose row then gets no gradient (fine-tuning there froze <|im_end|>, the end of every turn);
    tools that take one eos id (the first of generation_config's list) must get <|im_end|>."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    from tinyk.tokenizer import IM_END_ID

    hf = AutoModelForCausalLM.from_pretrained(nano_model_dir, dtype=torch.float32)
    assert hf.model.embed_tokens.padding_idx is None
    gen = GenerationConfig.from_pretrained(nano_model_dir)
    assert gen.eos_token_id[0] == IM_END_ID and gen.pad_token_id == IM_END_ID


def test_save_model_never_replaces_the_directory_its_tokenizer_comes_from(tmp_path, tok_dir):
    """A model directory used as its own tokenizer directory with --force
    (`save_model(model, m, m, force=True)`) was replaced by the model made from it."""
    model = init_model_dir("nano", tok_dir, tmp_path / "m")
    before = (tmp_path / "m" / "model.safetensors").read_bytes()
    with pytest.raises(TinykError, match="would replace the input"):
        save_model(model, tmp_path / "m", tmp_path / "m", force=True)
    with pytest.raises(TinykError, match="lies inside the input"):
        save_model(model, tmp_path / "m", tmp_path / "m" / "sub", force=True)
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before


def test_a_tutorial_pth_cut_short_says_so(tmp_path, tok_dir):
    """A .pth copied in part (a download or scp stopped) names the fix, not torch's
    "failed finding central directory"."""
    from tinyk.checkpoint import import_seed_checkpoint
    from tinyk.tokenizer import load_tokenizer

    whole = tmp_path / "whole.pth"
    torch.save(seed_state_dict(load_tokenizer(tok_dir).vocab_size), whole)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(TinykError, match=rf"^cannot read {cut}: it is cut short or damaged \(torch.save's zip "
                                         r"archive has no end\); copy or save it again$"):
        import_seed_checkpoint(cut, tok_dir, tmp_path / "m", n_heads=4)
    assert not (tmp_path / "m").exists()


def test_init_is_reproducible_by_seed_and_info_sizes_weights_by_dtype(tmp_path, tok_dir):
    """`tinyk model init --seed` makes the same model again (and
    another seed another model); info's bf16 size is 2 bytes a weight, half the fp32 one."""
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        init_model_dir("nano", tok_dir, tmp_path / name, seed=seed)
    weights = {n: (tmp_path / n / "model.safetensors").read_bytes() for n in "abc"}
    assert weights["a"] == weights["b"] != weights["c"]
    info = model_info(tmp_path / "a")
    assert info["memory"]["bf16_mib"] == info["parameters"] * 2 / 2**20 == info["memory"]["fp32_mib"] / 2


def test_same_model_is_not_fooled_by_bytes_after_the_tensors(tmp_path, nano_model_dir):
    """A copy with bytes appended to its weights file (a damaged copy, or a
    concatenation) was scored as a twin of the original instead of being loaded and judged itself."""
    from tinyk.checkpoint import same_model

    other = tmp_path / "other"
    shutil.copytree(nano_model_dir, other)
    with open(other / "model.safetensors", "ab") as f:
        f.write(b"\0" * 8)
    assert not same_model(nano_model_dir, other) and not same_model(other, nano_model_dir)


def test_import_refuses_a_tiny_k_config_of_no_context_and_reads_a_wrapped_state_dict(tmp_path, tok_dir):
    """Mutants seed_config_unchecked / seed_unwrap_model_only."""
    from tinyk.checkpoint import import_seed_checkpoint
    from tinyk.tokenizer import load_tokenizer

    sd = seed_state_dict(load_tokenizer(tok_dir).vocab_size)
    saved = tmp_path / "k-model"
    saved.mkdir()
    save_file({k: v.clone() for k, v in sd.items()}, saved / "model.safetensors")
    for bad in ({"max_seq_len": 0}, {"n_heads": "4"}):
        (saved / "config.json").write_text(json.dumps({"model_type": "Tiny-K", "dim": 64, "n_heads": 4, **bad}))
        with pytest.raises(TinykError, match="is not the tutorial's model config \\(n_heads and max_seq_len must be "
                                             "positive integers\\)"):
            import_seed_checkpoint(saved, tok_dir, tmp_path / "m")
    wrapped = tmp_path / "lightning.ckpt.pth"
    torch.save({"state_dict": sd, "epoch": 3}, wrapped)
    model, _ = import_seed_checkpoint(wrapped, tok_dir, tmp_path / "m", n_heads=4, max_seq_len=64)
    assert model.config.n_layers == 2


# ---------------------------------------------------------------- cache, dropout and the bounds of a config


def _left_padded_pair(model):
    torch.manual_seed(1)
    a, b = torch.randint(5, 512, (1, 12)), torch.randint(5, 512, (1, 5))
    pad = 12 - 5
    batch = torch.cat([a, torch.cat([torch.full((1, pad), 4), b], 1)])
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, :pad] = False
    return a, b, batch, valid, (valid.long().cumsum(1) - 1).clamp(min=0)


def test_a_padded_sequence_left_alone_in_the_cache_still_ignores_its_padding():
    # After a finished sequence leaves the batch, a left-padded one left in the cache still ignores its padding.
    torch.manual_seed(0)
    model = Transformer(preset_config("nano")).eval()
    _, b, batch, valid, positions = _left_padded_pair(model)
    with torch.no_grad():
        cache = KVCache(model.config, 2, 20, "cpu", torch.float32)
        model(batch, cache=cache, valid=valid, positions=positions)
        cache.reorder(torch.tensor([1]))
        assert torch.equal(cache.key_valid[0, :12], valid[1])
        step = model(torch.tensor([[9]]), cache=cache, positions=positions[1:, -1:] + 1)
        ref = model(torch.cat([b, torch.tensor([[9]])], 1))
    assert (step[0, 0] - ref[0, 5]).abs().max() < 1e-5


def test_activation_checkpointing_leaves_cached_decoding_alone_outside_training():
    # A model with activation checkpointing on (as training leaves it) still decodes through a KV cache in eval.
    torch.manual_seed(0)
    model = Transformer(preset_config("nano")).eval()
    seq = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        full = model(seq)
        model.activation_checkpointing = True
        cache = KVCache(model.config, 1, 16, "cpu", torch.float32)
        steps = [model(seq[:, :8], cache=cache)] + [model(seq[:, t:t + 1], cache=cache) for t in range(8, 12)]
    assert (torch.cat(steps, 1) - full).abs().max().item() < 1e-5


@pytest.mark.parametrize("change", [{"norm_eps": 1}, {"dropout": 1}, {"rope_theta": 0.5}])
def test_the_boundaries_of_eps_dropout_and_theta_are_refused(change):
    # norm_eps 1, dropout 1 and rope_theta under 1 are refused when a config is read, not trained on.
    with pytest.raises(ValueError, match="need 0 < norm_eps < 1, finite rope_theta >= 1 and 0 <= dropout < 1"):
        ModelConfig(**{**preset_config("nano").to_dict(), **change})
    ok = {"norm_eps": 0.5, "dropout": 0.5, "rope_theta": 1}[next(iter(change))]
    ModelConfig(**{**preset_config("nano").to_dict(), next(iter(change)): ok})


def test_training_drops_attention_weights_and_the_attention_branch_of_the_residual():
    # A config's dropout is applied in training: to the attention weights and to the attention branch of the residual.
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**preset_config("nano").to_dict(), "dropout": 0.5, "n_layers": 1}))
    attn, block = model.model.layers[0].self_attn, model.model.layers[0]
    x = torch.randn(2, 16, 64)
    cos, sin = model.rope_cos[None, :16], model.rope_sin[None, :16]
    model.train()
    with torch.no_grad():
        torch.manual_seed(1)
        a1 = attn(x, cos, sin)
        torch.manual_seed(2)
        a2 = attn(x, cos, sin)
        assert not torch.allclose(a1, a2)  # attention weights dropped at random in training
        model.eval()
        assert torch.equal(attn(x, cos, sin), attn(x, cos, sin))
        model.train()
        seen = {}
        attn.register_forward_hook(lambda _m, _i, out: seen.__setitem__("a", out))
        block.mlp.down_proj.weight.zero_()  # the block's output is then x + dropout(attention branch)
        added = block(x, cos, sin) - x
        kept = added != 0
        assert 0.3 < kept.float().mean().item() < 0.7
        assert torch.allclose(added[kept], 2 * seen["a"][kept], atol=1e-6)


def test_rope_tables_larger_than_half_the_free_memory_are_refused_before_being_built(monkeypatch):
    # A context whose RoPE tables need over half the free memory is refused in one line before they are built.
    from tinyk import model as model_mod
    from tinyk.model import rope_tables

    cfg = ModelConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=64, max_seq_len=1 << 19)
    need = cfg.max_seq_len * cfg.head_dim * 16
    monkeypatch.setattr(model_mod, "memory_available", lambda: int(need * 1.5))
    with pytest.raises(TinykError, match=r"a context of 524,288 positions .* more than this machine can spare"):
        rope_tables(cfg)
    monkeypatch.setattr(model_mod, "memory_available", lambda: need * 3)
    assert rope_tables(cfg)[0].shape == (1 << 19, 16)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _run(argv, capsys):
    capsys.readouterr()  # what building the inputs printed (transformers' progress bars)
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out + out.err


# ---------------------------------------------------------------- importing what transformers and variants saved

def _hf_dir(tmp_path, tok_dir, name, model):
    out = tmp_path / name
    model.save_pretrained(out)
    for f in TOKENIZER_FILES:
        shutil.copy(tok_dir / f, out / f)
    return out


@pytest.mark.parametrize("kind,what", [
    ("qwen2", "model_type 'qwen2'"),
    ("mistral", "model_type 'mistral'"),
    ("llama-dynamic-rope", "RoPE scaling 'dynamic'"),
    ("llama-attention-bias", "bias terms"),
])
def test_model_import_of_a_transformers_checkpoint_tinyk_cannot_hold_names_why_in_one_line(tmp_path, tok_dir, capsys,
                                                                                            kind, what):
    # `tinyk model import DIR` on a checkpoint tinyk cannot compute says what it cannot hold (as `tinyk generate
    # --model DIR` does), not "a Hugging Face Llama checkpoint; use the directory as it is".
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    vocab = load_tokenizer(tok_dir).vocab_size
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=vocab)
    torch.manual_seed(0)
    model = {"qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**shape)),
             "mistral": lambda: MistralForCausalLM(MistralConfig(**shape)),
             "llama-dynamic-rope": lambda: LlamaForCausalLM(LlamaConfig(
                 **shape, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})),
             "llama-attention-bias": lambda: LlamaForCausalLM(LlamaConfig(**shape, attention_bias=True))}[kind]()
    src = _hf_dir(tmp_path, tok_dir, kind, model)
    code, said = _run(["model", "import", str(src), "--tokenizer", str(tok_dir), "--out", str(tmp_path / "m")], capsys)
    assert code != 0
    assert what in said, said
    assert "use the directory as it is" not in said, said
    assert len(said.strip().splitlines()) == 1


def test_a_tutorial_checkpoint_whose_rope_tables_have_another_theta_is_not_imported_silently_wrong(tmp_path, tok_dir,
                                                                                                  capsys):
    # A variant of the tutorial's model that saved its RoPE tables (built with theta 1e6) imports computing what
    # it computed (theta 1e6), or is refused in one line naming the RoPE base; never imported with theta 10000.
    sd = seed_state_dict(load_tokenizer(tok_dir).vocab_size, dim=64, layers=2, heads=4, kv_heads=2, hidden=192)
    hd, ctx, theta = 16, 64, 1e6
    angles = torch.outer(torch.arange(ctx).float(), 1.0 / theta ** (torch.arange(0, hd, 2).float() / hd))
    ckpt = tmp_path / "pretrain_64_2_512.pth"
    torch.save({**sd, "freqs_cos": angles.cos(), "freqs_sin": angles.sin()}, ckpt)
    code, said = _run(["model", "import", str(ckpt), "--tokenizer", str(tok_dir), "--out", str(tmp_path / "m"),
                       "--n-heads", "4", "--max-seq-len", str(ctx)], capsys)
    assert code == 0, said
    model, _ = load_model(tmp_path / "m")
    assert model.config.rope_theta == theta
    x = torch.randint(0, sd["tok_embeddings.weight"].shape[0], (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(x) - seed_forward(sd, x, n_heads=4, theta=theta)).abs().max().item() < 1e-4


def _tiny_k_dir(tmp_path, tok_dir, **config):
    sd = seed_state_dict(load_tokenizer(tok_dir).vocab_size, dim=64, layers=2, heads=4, kv_heads=2, hidden=192)
    d = tmp_path / "tiny_k"
    d.mkdir(parents=True)
    save_file({k: v for k, v in sd.items() if k != "output.weight"}, str(d / "model.safetensors"),
              metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps({
        "model_type": "Tiny-K", "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
        "vocab_size": sd["tok_embeddings.weight"].shape[0], "hidden_dim": None, "multiple_of": 64, "norm_eps": 1e-5,
        "max_seq_len": 64, "dropout": 0.0, "flash_attn": True, **config}))
    return sd, d


def test_a_tiny_k_config_with_its_own_rope_theta_is_honoured_or_refused(tmp_path, tok_dir, capsys):
    # A Tiny-K directory whose config.json records rope_theta 1e6 imports with that theta, or is refused in
    # one line; today the key is ignored and the model is imported with theta 10000, computing something else.
    sd, d = _tiny_k_dir(tmp_path, tok_dir, rope_theta=1e6)
    code, said = _run(["model", "import", str(d), "--tokenizer", str(tok_dir), "--out", str(tmp_path / "m")], capsys)
    assert code == 0, said
    assert load_model(tmp_path / "m")[0].config.rope_theta == 1e6
    _, d = _tiny_k_dir(tmp_path / "again", tok_dir, rope_theta=True)
    code, said = _run(["model", "import", str(d), "--tokenizer", str(tok_dir), "--out", str(tmp_path / "m2")], capsys)
    assert code == 2 and "has rope_theta True; RoPE's base is a number of at least 1" in said, said


def test_a_tiny_k_config_that_disagrees_with_its_weights_is_refused(tmp_path, tok_dir, capsys):
    # config.json says 7 layers but the weights hold 2 (a checkpoint missing layers): refused in one line naming
    # n_layers, not imported silently as a 2-layer model.
    _, d = _tiny_k_dir(tmp_path, tok_dir, n_layers=7)
    code, said = _run(["model", "import", str(d), "--tokenizer", str(tok_dir), "--out", str(tmp_path / "m")], capsys)
    assert code == 2 and f"{d / 'config.json'} says n_layers 7, but the weights beside it have 2" in said, said


def test_a_tied_llamamodel_checkpoint_loads_as_transformers_loads_it_or_is_named_for_what_it_is(tmp_path, tok_dir):
    # transformers' LlamaForCausalLM loads a tied LlamaModel.save_pretrained directory exactly (names without
    # "model.", the head tied); tinyk should load it too, or say it is a headless LlamaModel checkpoint, not that
    # model.embed_tokens.weight is missing when embed_tokens.weight is there.
    from transformers import LlamaModel

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=load_tokenizer(tok_dir).vocab_size, tie_word_embeddings=True)
    d = _hf_dir(tmp_path, tok_dir, "base", LlamaModel(cfg))
    with pytest.raises(TinykError, match="holds a transformers LlamaModel \\(names without 'model.', no lm_head\\), "
                                         "not a LlamaForCausalLM"):
        load_model(d)


def test_a_system_prompt_that_spells_a_special_token_prompts_transformers_as_tinyk_or_is_refused(tmp_path, tok_dir,
                                                                                                 nano_model_dir):
    # A model fine-tuned with `tinyk data sft --system-prompt "... <s> ... </s>"`: transformers'
    # apply_chat_template (whose exported template puts that prompt first) must give the ids tinyk trained and
    # chats with, or `tinyk data sft` must refuse such a prompt up front. Today transformers reads <s>/</s> in it as
    # special tokens 1 and 2 on every conversation, while tinyk trained on them as text.
    from transformers import AutoTokenizer

    from tinyk.data import prepare_sft
    from tinyk.engine import Engine
    from tinyk.tokenizer import MODEL_PROMPT, write_hf_tokenizer_files

    system = "Wrap answers in <s> and </s>."
    (tmp_path / "sft.jsonl").write_text(json.dumps({"conversations": [{"from": "human", "value": "问题"},
                                                                      {"from": "gpt", "value": "北京。"}]},
                                                   ensure_ascii=False) + "\n")
    m = tmp_path / "m"
    shutil.copytree(nano_model_dir, m)
    write_hf_tokenizer_files(m, 128, system_prompt=system)  # what `tinyk sft` would write into final/ for that data
    msgs = [{"role": "user", "content": "你好"}]
    ours = Engine.from_dir(m).chat_ids(msgs, default_system=MODEL_PROMPT)
    theirs = AutoTokenizer.from_pretrained(m).apply_chat_template(msgs, add_generation_prompt=True, return_dict=False)
    assert theirs != ours  # why such a prompt is refused up front: the model is never trained on it
    with pytest.raises(TinykError, match="^--system-prompt holds '<s>', the text of a special token, which "
                                         "transformers would read as that token; write it otherwise$"):
        prepare_sft([tmp_path / "sft.jsonl"], tok_dir, tmp_path / "d", system_prompt=system, val_fraction=0.0,
                    workers=1, show_progress=False)


@pytest.mark.parametrize("machine,flags,emulated", [
    ("x86_64", "fpu avx2 avx512f", True), ("x86_64", "fpu avx512f avx512_bf16", False),
    ("x86_64", "fpu amx_bf16 amx_tile", False), ("aarch64", "fp asimd", False), ("x86_64", None, False)])
def test_a_cpu_without_a_half_dtypes_instructions_is_known_to_emulate_it(tmp_path, monkeypatch, machine, flags,
                                                                          emulated):
    """The demo's probe, int8's compute dtype and the slow-dtype notes go by it; not knowing is not emulating."""
    from tinyk import model

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: a CPU\n" + (f"flags\t\t: {flags}\n" if flags else ""))
    real_path = model.Path
    monkeypatch.setattr(model, "Path", lambda p, *a: cpuinfo if p == "/proc/cpuinfo" else real_path(p, *a))
    monkeypatch.setattr(model.platform, "machine", lambda: machine)
    assert cpu_emulates(torch.bfloat16) is emulated
    assert not cpu_emulates(torch.float32)  # none of these lists avx512_fp16 or amx_fp16:
    assert cpu_emulates(torch.float16) is (machine == "x86_64" and flags is not None)
    assert (model.emulated_note(torch.device("cpu"), torch.bfloat16) is not None) is emulated
    assert model.emulated_note(torch.device("meta"), torch.bfloat16) is None


def test_a_null_rope_theta_beside_rope_parameters_reads_as_transformers_reads_it():
    """transformers 5 takes rope_parameters' theta where the top-level key is null, as an absent one."""
    from tinyk.checkpoint import config_from_hf

    d = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4,
         "vocab_size": 512, "rope_theta": None, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}
    assert config_from_hf(d).rope_theta == LlamaConfig.from_dict(d).rope_parameters["rope_theta"] == 5e5
