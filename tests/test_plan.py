"""`tinyk plan`: FLOPs, the memory model against what PyTorch allocates, the CLI, and bench/gpu.sh's CPU smoke run."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

import tinyk.model
from tinyk.cli import main
from tinyk.config import model_config, parse_sets
from tinyk.errors import TinykError
from tinyk.model import PRESETS, Transformer, preset_config
from tinyk.plan import (
    ASSUMED,
    DEFAULT_TOKENS,
    GPUS,
    LINK_BYTES_PER_S,
    Setup,
    _amount,
    _duration,
    _ratio,
    _token_count,
    estimate_memory,
    find_gpu,
    flops_per_token,
    gpu_class,
    head_saved_bytes,
    layer_rope_bytes,
    layer_saved_bytes,
    make_plan,
    measure_step_memory,
    micro_step_share,
    model_size,
    run_spec,
    usable_bytes,
)
from tinyk.train import loss_sum
from tinyk.units import GiB, MiB

ROOT = Path(__file__).resolve().parent.parent


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(args)
    captured = capsys.readouterr()
    return e.value.code, captured.out, captured.err


@pytest.mark.parametrize("preset", list(PRESETS))
def test_flops_per_token_is_the_models(preset):
    cfg = preset_config(preset)
    with torch.device("meta"):
        expected = Transformer(cfg).flops_per_token(cfg.max_seq_len)
    assert flops_per_token(cfg, cfg.max_seq_len) == expected


def _saved_bytes(cfg, batch: int, seq: int, amp: bool) -> int:
    """Bytes of non-parameter tensors autograd saves in one forward (distinct storages)."""
    torch.manual_seed(0)
    model = Transformer(cfg).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    x = torch.randint(0, cfg.vocab_size, (batch, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        loss_sum(model, x, x)
    return sum(seen.values())


@pytest.mark.parametrize("repeat_kv", [False, True], ids=["gqa", "repeated-kv"])
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16"])
def test_saved_tensor_inventory_per_layer_and_token(amp, repeat_kv, monkeypatch):
    """Differencing two depths and two lengths isolates one block's bytes per token (weight casts cancel).
    CPU's SDPA takes grouped K/V; repeating them, as CUDA does in fp32 and before Ampere, saves other tensors."""
    if repeat_kv:
        monkeypatch.setattr(tinyk.model, "sdpa_fuses_gqa", lambda *a, **k: False)
    shape = dict(dim=96, n_heads=6, n_kv_heads=2, hidden_dim=160, vocab_size=300, max_seq_len=64)
    cfg1, cfg2 = preset_config("nano", n_layers=1, **shape), preset_config("nano", n_layers=2, **shape)
    b = 3
    per_layer = (_saved_bytes(cfg2, b, 16, amp) - _saved_bytes(cfg2, b, 8, amp)
                 - _saved_bytes(cfg1, b, 16, amp) + _saved_bytes(cfg1, b, 8, amp)) / (8 * b)
    # RoPE's saved casts scale with the length but not the batch.
    assert per_layer == sum(layer_saved_bytes(cfg1, amp, repeat_kv).values()) + layer_rope_bytes(cfg1, amp) / b
    head = (_saved_bytes(cfg1, b, 16, amp) - _saved_bytes(cfg1, b, 8, amp)) / (8 * b) - per_layer
    ids = 8  # the int64 input, saved by the embedding and the loss; the plan counts it with the batch
    assert head - ids == pytest.approx(head_saved_bytes(cfg1, amp), abs=1e-9)


@pytest.mark.parametrize("amp,checkpointing,accum", [
    (False, False, 1), (True, False, 1), (True, True, 1), (False, True, 2),
], ids=["fp32", "bf16", "bf16-ckpt", "fp32-ckpt-accum2"])
def test_estimate_matches_measured_step(amp, checkpointing, accum):
    """The plan's peak against the CPU profiler's record of the trainer's step, within 15%."""
    s = Setup(preset_config("tiny"), 64, 2, amp=amp, checkpointing=checkpointing, grad_accum=accum,
              fused_adamw=False)
    measured = measure_step_memory(s)["peak"]
    estimated = estimate_memory(s).peak
    assert abs(estimated / measured - 1) <= 0.15, (estimated, measured)


@pytest.mark.parametrize("amp,checkpointing,vocab,phase", [
    (False, False, 6144, "backward start"), (True, False, 6144, "backward start"),
    (True, True, 512, "recompute first block"), (False, True, 512, "recompute last block"),
], ids=["fp32", "bf16", "bf16-ckpt", "fp32-ckpt"])
def test_the_activation_phases_match_a_measured_step(amp, checkpointing, vocab, phase):
    """At micro-batch 2 the peak is the optimizer step (weights, AdamW, gradients), so no activation term
    reaches it; at micro-batch 8 the activation phases set the peak, and the model is within 3% of the
    profiler."""
    s = Setup(preset_config("tiny", vocab_size=vocab), 64, 8, amp=amp, checkpointing=checkpointing,
              grad_accum=2 if checkpointing and not amp else 1, fused_adamw=False)
    estimate = estimate_memory(s)
    assert estimate.phase == phase
    measured = measure_step_memory(s)["peak"]
    assert abs(estimate.peak / measured - 1) <= 0.03, (estimate.peak, measured)


def test_memory_model_structure():
    cfg = preset_config("seed-215m")
    one = estimate_memory(Setup(cfg, 512, 16))
    n = 215_127_040
    assert (one.weights, one.gradients, one.optimizer) == (4 * n, 4 * n, 8 * n)
    assert one.weight_copies > 0 and one.buffers == 0 and one.phase == "backward start"
    # A single micro-step frees gradients before the activations exist; accumulation keeps them.
    assert one.gradients_at_peak == 0
    assert estimate_memory(Setup(cfg, 512, 16, grad_accum=4)).gradients_at_peak == 4 * n
    fsdp = estimate_memory(Setup(cfg, 512, 16, parallel="fsdp", world_size=4))
    assert (fsdp.weights, fsdp.optimizer) == (n, 2 * n) and 0 < fsdp.buffers < n
    ddp = estimate_memory(Setup(cfg, 512, 16, parallel="ddp", world_size=4))
    assert ddp.buffers == 4 * n  # default DDP: flat gradient buckets beside .grad
    ckpt = estimate_memory(Setup(cfg, 512, 16, checkpointing=True))
    assert ckpt.peak < one.peak / 2
    fp32 = estimate_memory(Setup(cfg, 512, 16, amp=False))
    # fp32 keeps no casts, but the q/k/v and gate/up weights are concatenated for their matmuls.
    kv = cfg.n_kv_heads * cfg.head_dim
    fused = cfg.n_layers * (cfg.dim + 2 * kv + 2 * cfg.hidden_dim) * cfg.dim
    assert fp32.weight_copies == 4 * fused and fp32.peak > one.peak


def test_largest_micro_batch_is_the_largest_that_fits():
    run = run_spec(preset="seed-215m", config=None)
    gpu = find_gpu("4090")
    plan = make_plan(run, gpu, gpus=8)
    largest = plan["largest_micro_batch"]["no_checkpointing"]
    per_gpu = run.batch_size // 8
    assert 0 < largest < per_gpu
    base = Setup(run.cfg, run.seq_len, largest, world_size=8)
    fits = estimate_memory(replace(base, grad_accum=per_gpu // largest)).peak
    assert fits <= usable_bytes(gpu)
    bigger = min(m for m in range(largest + 1, per_gpu + 1) if per_gpu % m == 0)
    assert estimate_memory(replace(base, micro_batch=bigger, grad_accum=per_gpu // bigger)).peak > usable_bytes(gpu)
    assert plan["largest_micro_batch"]["checkpointing"] > largest


def test_plan_seed_215m_on_4_a100(capsys):
    code, out, _ = run_cli(["plan", "--preset", "seed-215m", "--gpu", "a100", "--gpus", "4", "--tokens", "10B",
                            "--price", "2", "--json"], capsys)
    assert code == 0
    p = json.loads(out)
    assert p["model"]["parameters"] == 215_127_040 and p["gpu"]["count"] == 4 and p["fits"]
    fpt = p["flops_per_token"]
    rate = p["throughput"]["mfu"] * 312e12 * 4 / fpt
    assert p["throughput"]["tokens_per_s"] == pytest.approx(rate)
    assert p["time"]["gpu_hours"] == pytest.approx(1e10 / rate / 3600 * 4)
    assert p["cost"]["total"] == pytest.approx(2 * p["time"]["gpu_hours"])
    assert p["run"]["micro_batch"] * p["run"]["grad_accum"] * 4 == p["run"]["batch_size"]
    assert p["tutorial"]["gpu_hours"] == p["tutorial"]["gpu_hours_for_tokens"] == 104
    # Fewer tokens than the tutorial's 10B compare with its pace, not with its whole run.
    code, out, _ = run_cli(["plan", "--preset", "seed-215m", "--gpu", "a100", "--gpus", "4", "--tokens", "1B"], capsys)
    hours = p["time"]["gpu_hours"] / 10
    assert f"104 A100-hours for its 10B tokens, 10.4 A100-hours at that pace for 1B tokens; this plan, eager: " \
           f"{hours:.1f} A100-hours " \
           f"({10.4 / hours:.1f}x fewer)" in out

    code, out, _ = run_cli(["plan", "--preset", "seed-215m", "--gpu", "a100", "--gpus", "4", "--price", "2"], capsys)
    assert code == 0
    assert "6N + 12*L*d*T = 6 x 215,127,040 + 12 x 18 x 1024 x 512" in out
    assert "ASSUMED" in out  # no bench/gpu.sh figure for A100 yet
    assert "is far below that MFU" not in out
    code, small, _ = run_cli(["plan", "--preset", "nano"], capsys)  # 140M tokens/s from 40% of an A100 is no plan
    assert code == 0 and ("             a model of 0.13M parameters is far below that MFU: its kernels are too short "
                          "to keep a GPU busy, so expect many times less (--mfu sets it)\n") in small
    for label in ("weights (fp32)", "gradients (fp32)", "optimizer state", "activations at", "peak",
                  "largest micro-batch that fits", "tokens/s per GPU", "GPU-hours", "cost", "A100-hours"):
        assert label in out


def test_plan_text_says_more_when_slower_and_names_fp32_copies(capsys):
    code, out, _ = run_cli(["plan", "--preset", "seed-215m", "--gpu", "rtx3090", "--micro-batch", "16"], capsys)
    hours = float(re.search(r"this plan, eager: ([0-9.]+) RTX3090-hours \(([0-9.]+)x more\)", out).group(1))
    assert code == 0 and hours > 104
    code, out, _ = run_cli(["plan", "--preset", "seed-215m", "--gpu", "h100", "--dtype", "fp32"], capsys)
    assert "fp32 fused q/k/v and gate/up weights" in out and "autocast" not in out
    # fp32 never touches the bf16 tensor cores: half the fp32 peak, which is what bench/gpu.sh saw.
    assert "MFU 3.4% (ASSUMED for fp32: 50% of this GPU's 67 TFLOP/s fp32 peak" in out
    fp32 = json.loads(run_cli(["plan", "--preset", "seed-215m", "--gpu", "h100", "--dtype", "fp32", "--json"],
                              capsys)[1])
    bf16 = json.loads(run_cli(["plan", "--preset", "seed-215m", "--gpu", "h100", "--json"], capsys)[1])
    assert 6 < fp32["time"]["gpu_hours"] / bf16["time"]["gpu_hours"] < 7  # eager, as bench/gpu.sh's fp32 row ran
    assert fp32["with_compile"] is None and fp32["throughput"]["mfu_mode"] is None  # no compiled fp32 figure
    # --mfu is the planned GPU's: the tutorial's A100s keep their fp32 figure (they were given a bf16 one).
    own = json.loads(run_cli(["plan", "--preset", "seed-215m", "--gpu", "h100", "--dtype", "fp32", "--mfu", "0.05",
                              "--json"], capsys)[1])
    assert own["tutorial"]["a100_mfu"] == fp32["tutorial"]["a100_mfu"] < 0.05


def test_plan_from_config_file_and_flags(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"preset": "nano", "dim": 96}, "seq_len": 64, "batch_size": 8}))
    code, out, _ = run_cli(["plan", "--config", str(cfg), "--gpu", "h100", "--micro-batch", "4",
                            "--activation-checkpointing", "--mfu", "0.5", "--json"], capsys)
    assert code == 0
    p = json.loads(out)
    assert p["model"]["config"]["dim"] == 96 and p["run"]["seq_len"] == 64
    assert (p["run"]["micro_batch"], p["run"]["grad_accum"]) == (4, 2)
    assert p["run"]["activation_checkpointing"] and p["throughput"]["mfu_source"] == "given with --mfu"
    assert "tutorial" not in p
    # A model described by --set alone, as tinyk pretrain trains it (plan asked for a preset or config).
    sets = ["--set", "model.dim=64", "--set", "model.n_heads=4", "--set", "model.n_kv_heads=2", "--set",
            "model.n_layers=1"]
    code, out, _ = run_cli(["plan", *sets, "--json"], capsys)
    built = Transformer(model_config(parse_sets(sets[1::2])["model"]))
    assert code == 0 and json.loads(out)["model"]["parameters"] == built.num_params()
    code, out, _ = run_cli(["plan", *sets], capsys)
    assert code == 0 and out.startswith(f"model        custom (--set): {built.num_params():,} parameters (dim 64, "
                                        f"1 layer, 4 heads / 2 KV")

    # The H100's measured MFU is seed-215m's; another model's plan says so, and small times stay visible.
    code, out, _ = run_cli(["plan", "--preset", "tiny", "--gpu", "h100", "--tokens", "1G"], capsys)
    assert code == 0 and "for seed-215m, not this model" in out and "in 0.0 h" not in out
    code, out, _ = run_cli(["plan", "--preset", "seed-215m", "--gpu", "h100"], capsys)
    assert code == 0 and "measured: bench/gpu.sh" in out and "not this model" not in out


@pytest.mark.parametrize("args,message", [
    (["--preset", "seed-215m", "--gpu", "p100"], "unknown GPU 'p100'"),
    (["--preset", "seed-215m", "--gpu", "t4", "--dtype", "bf16"],
     "T4 16GB has no bf16 tensor cores (PyTorch would emulate bf16, many times slower): plan with --dtype fp16"),
    (["--preset", "seed-82m", "--gpu", "v100", "--gpus", "2", "--parallel", "fsdp"],
     "fp16 with --parallel fsdp is not supported: plan with DDP, or --dtype fp32 (NVIDIA V100 SXM2 32GB has no bf16)"),
    (["--gpu", "h100"], "pass --preset, --config or --init (or the model's shape with --set model.KEY=VALUE)"),
    (["--preset", "seed-215m", "--gpus", "3"], "not divisible by 3 GPUs"),
    (["--preset", "seed-215m", "--seq-len", "4096"], "exceeds the model's context"),
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--preset", "seed-215m", "--set", "model.dim=1000000000"], "the model is too large to plan (dim 1000000000"),
])
def test_plan_errors_are_one_line(args, message, capsys):
    code, out, err = run_cli(["plan", *args], capsys)
    assert code == 2 and out == ""
    assert err.startswith("tinyk: error: ") and message in err and err.count("\n") == 1


def test_the_trainer_refuses_the_precisions_plan_refuses_in_its_own_words():
    from tinyk.plan import precision_refusal

    assert precision_refusal("fp16", True, "NVIDIA A100", True) == \
        "fp16 with --parallel fsdp is not supported: use --dtype bf16, or DDP"
    assert precision_refusal("bf16", False, "Tesla T4", False).startswith("Tesla T4 has no bf16 tensor cores")
    assert precision_refusal("bf16", True, "NVIDIA A100", True) is None
    assert precision_refusal("fp16", False, "Tesla T4", False) is None


def test_the_trainers_peak_flops_read_whole_model_numbers():
    """The MFU a run logs divides by its card's peak: an RTX A1000 took the A100's (312 TFLOP/s) and a
    T400 the T4's, so their MFU read ten times too low; a laptop chip shares its desktop card's name."""
    from tinyk.monitor import gpu_peak_flops

    assert gpu_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12 and gpu_peak_flops("Tesla T4") == 65e12
    assert gpu_peak_flops("NVIDIA L4") == 121e12 and gpu_peak_flops("NVIDIA L40S") == 362e12
    assert gpu_peak_flops("NVIDIA H100 PCIe") == 756e12 and gpu_peak_flops("NVIDIA H20") == 148e12
    assert gpu_peak_flops("NVIDIA GH200 480GB") == 989e12  # its H200 is no standalone word
    for name in ("NVIDIA RTX A1000 6GB Laptop GPU", "NVIDIA RTX A1000", "NVIDIA T400 4GB",
                 "NVIDIA GeForce RTX 4090 Laptop GPU"):
        assert gpu_peak_flops(name) is None, name


def test_gpu_table():
    for key, gpu in GPUS.items():
        assert gpu.peak_flops > 0 and 0 < gpu.mfu <= 1 and gpu.memory_gib > 0
        assert gpu.mfu_source == ASSUMED or gpu.mfu_source.startswith("measured:"), key
        assert find_gpu(key) is gpu
    assert GPUS["h100"].peak_flops == 989e12 and GPUS["a100"].peak_flops == 312e12
    assert find_gpu("RTX 4090") is GPUS["rtx4090"] and find_gpu("A100-40GB") is GPUS["a100-40gb"]
    names = {"NVIDIA H100 80GB HBM3": "h100", "NVIDIA H100 PCIe": "h100-pcie", "NVIDIA H200": "h200",
             "NVIDIA A100-SXM4-40GB": "a100-40gb", "NVIDIA A100-SXM4-80GB": "a100", "NVIDIA A100 80GB PCIe": "a100",
             "NVIDIA A800-SXM4-80GB": "a800", "NVIDIA H800": "h800", "NVIDIA H20": "h20", "NVIDIA L40S": "l40s",
             "NVIDIA L4": "l4", "NVIDIA RTX A6000": "a6000", "NVIDIA GeForce RTX 5090": "rtx5090",
             "NVIDIA GeForce RTX 4090": "rtx4090", "NVIDIA GeForce RTX 4080": "rtx4080",
             "NVIDIA GeForce RTX 3090": "rtx3090", "NVIDIA GeForce RTX 3080": "rtx3080",
             "Tesla V100-SXM2-32GB": "v100", "Tesla T4": "t4",
             # other memory, clocks or chips than the table's card of that name
             "NVIDIA L40": None, "NVIDIA GH200 480GB": None, "NVIDIA H100 NVL": None, "NVIDIA GeForce RTX 4090 D": None,
             "NVIDIA GeForce RTX 4080 SUPER": None, "NVIDIA GeForce RTX 3080 Ti": None,
             "NVIDIA GeForce RTX 3080 12GB": None, "Tesla V100-PCIE-16GB": None, "NVIDIA A10": None,
             "NVIDIA GeForce RTX 4090 Laptop GPU": None, "NVIDIA RTX 6000 Ada Generation": None,
             "NVIDIA A800-SXM4-40GB": None, "NVIDIA H800 PCIe": None, "Tesla V100-PCIE-32GB": None,
             "NVIDIA A100-SXM4-80GB MIG 1g.10gb": None}
    for name, key in names.items():
        assert gpu_class(name) == key, name
    # Memory as people type it (40G, a bare 40) planned the 80 GB card's micro-batch, which then ran out of memory.
    for typed in ("a100 40g", "A100-40G", "a100-40", "A100 40 GB", "a100 40GiB", "a100-40gib"):
        assert find_gpu(typed) is GPUS["a100-40gb"], typed
    for typed, key in (("a100 80gb", "a100"), ("rtx4090 24g", "rtx4090"), ("t4 16", "t4"), ("h200 141gb", "h200")):
        assert find_gpu(typed) is GPUS[key], typed  # the table card's own memory
    for typed, near in (("V100 16G", "v100"), ("v100 16", "v100"), ("RTX 3080 12G", "rtx3080"), ("A800 40G", "a800"),
                        ("4090D", "rtx4090"), ("4080S", "rtx4080"), ("rtx4090d", "rtx4090"), ("rtx4080s", "rtx4080"),
                        ("rtx3080ti", "rtx3080"), ("rtx3080 12gb", "rtx3080"),
                        # memory the table's card has not (a 48 GB modded 4090 was planned as the 24 GB one)
                        ("rtx4090 48gb", "rtx4090"), ("h100 40g", "h100"), ("v100 64gb", "v100"),
                        ("rtx 3080 20g", "rtx3080"), ("a100 41g", "a100")):
        with pytest.raises(TinykError, match=f"differs from the table's .*: --gpu {near} plans it as that card"):
            find_gpu(typed)
    with pytest.raises(TinykError, match="^unknown GPU 'NVIDIA H100 NVL'; it differs from the table's .*: --gpu h100 "
                                         "plans it as that card"):
        find_gpu("NVIDIA H100 NVL")
    for key, gpu in GPUS.items():  # each card's own table name finds it, and the plan's help names it
        assert gpu_class(gpu.name) == key and key in plan_help()


def plan_help() -> str:
    import argparse

    from tinyk.cli import plan

    sub = argparse.ArgumentParser().add_subparsers()
    plan.register(sub)
    return " ".join(sub.choices["plan"].format_help().split())


def test_cards_without_bf16_plan_fp16_autocast(capsys):
    code, out, _ = run_cli(["plan", "--preset", "seed-82m", "--gpu", "Tesla T4", "--json"], capsys)
    plan = json.loads(out)
    assert code == 0 and plan["run"]["dtype"] == "fp16" and plan["gpu"]["tensor_dtype"] == "fp16"
    assert plan["gpu"]["peak_tflops"] == 65
    code, out, _ = run_cli(["plan", "--preset", "seed-82m", "--gpu", "h100"], capsys)
    assert "bf16 autocast with fp32 master weights" in out and "TFLOP/s dense bf16" in out


@pytest.mark.parametrize("gpu,dtype,repeats", [("h100", "bf16", False), ("h100", "fp32", True),
                                               ("t4", "fp16", True)])
def test_plan_counts_the_attention_the_gpu_runs(capsys, gpu, dtype, repeats):
    """Grouped K/V heads are repeated where CUDA's SDPA has no fused kernel for them (model.sdpa_fuses_gqa)."""
    code, out, _ = run_cli(["plan", "--preset", "seed-215m", "--gpu", gpu, "--dtype", dtype, "--json"], capsys)
    cfg = preset_config("seed-215m")
    layer = json.loads(out)["activation_model"]["layer_bytes_per_token"]
    assert code == 0 and layer == layer_saved_bytes(cfg, dtype != "fp32", repeat_kv=repeats)
    assert layer != layer_saved_bytes(cfg, dtype != "fp32", repeat_kv=not repeats)


@pytest.mark.parametrize("half", ["bf16", "fp16"])
def test_gpu_bench_cpu_smoke(tmp_path, half):
    """bench/gpu.sh end to end on CPU: data generation, trainer runs, table; fp16 is what a V100 or T4 runs."""
    only = ["--half", "fp16", "--only", "eager mb2", "agree fp32 mb2"] if half == "fp16" else []
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--cpu-smoke", "--out", str(tmp_path), *only],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert [r["status"] for r in report["rows"]] == ["ok"] * len(report["rows"]) == ["ok"] * (2 if only else 3)
    assert all(r["tokens_per_s"] > 0 and r["mfu"] > 0 and r["plan_mib"] > 0 for r in report["rows"])
    assert [r["dtype"] for r in report["rows"]][0] == half
    assert report["half_vs_fp32"]["ok"] and report["half_vs_fp32"]["steps"] == 2
    tail = proc.stdout.strip().splitlines()
    assert f"{half} vs fp32 over 2 steps" in proc.stdout
    assert only or any(line.startswith("| eager mb2 ckpt |") for line in tail[-8:])
    assert tail[-1].startswith("| ")  # the table is the last thing printed


def _gpu_bench(monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "bench" / "gpu_bench.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_bench", bench)  # its dataclasses look their module up there
    spec.loader.exec_module(bench)
    return bench


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_the_memory_of_a_jobs_step_is_what_the_plan_says(tmp_path, parallel):
    """The DDP bucket and FSDP shard terms had never been checked against a real step: two processes
    over gloo, each wrapped as the trainer wraps it, measured by the allocator (the bench exits 1 beyond 15%).
    In fp32 only: those terms add to the activations' whatever the dtype (bf16's are measured in one process
    above), and a bf16 row took 25 s of this test's 60 on a CPU without native bf16 matmuls."""
    out = tmp_path / "rows.json"
    r = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", "2",
                        str(ROOT / "bench" / "plan_vs_measured.py"), "--preset", "tiny", "--micro-batch", "4",
                        "--seq-len", "256", "--all", "--no-bf16", "--parallel", parallel, "--json", str(out)],
                       env={**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)},  # torchrun's files
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 and all(row["parallel"] == parallel and row["processes"] == 2 for row in rows)
    # Within the 15% plan promises. DDP is usually exact, but a step now and then holds one more
    # gradient-sized buffer (seen in CI once: +8.7%; the smaller of two steps is measured), so its bound
    # is the promise, not the usual; FSDP's rows are 4-8% over the measurement (three unsharded blocks the
    # plan counts in every phase).
    bound = 0.15 if parallel == "ddp" else 0.10
    assert all(abs(row["error"]) < bound for row in rows), \
        [(row["dtype"], row["checkpointing"], row["measured_mib"], row["estimated_mib"]) for row in rows]


def test_what_a_collectives_backend_allocates_is_not_counted_as_the_steps():
    """gloo works on copies inside a collective and holds them on its threads as its timing goes; NCCL
    allocates nothing there from PyTorch's allocator. The measurement leaves them out, also when a
    later call frees them."""
    from tinyk.plan import _Allocated

    mib = 1 << 18  # float32 elements in a MiB
    held: list[torch.Tensor] = []

    def build() -> None:
        with torch.profiler.record_function("c10d::_reduce_scatter_base_"):
            held.append(torch.ones(4 * mib))
        held.append(torch.ones(mib))

    def step() -> None:
        held.pop(0)  # the backend's copy goes
        held.append(torch.ones(2 * mib))

    allocated = _Allocated()
    assert allocated.replay(build) == (MiB, MiB)
    assert allocated.replay(step) == (2 * MiB, 2 * MiB)


def test_gpu_bench_gives_the_plan_both_its_compiled_and_its_eager_mfu(monkeypatch):
    """plan follows the run's compile setting, so the bench's lines for its GPU table name both figures."""
    bench = _gpu_bench(monkeypatch)
    row = {"status": "ok", "checkpointing": False, "dtype": "bf16", "agree": False}
    rows = [{**row, "name": "eager mb16", "compile": False, "mfu": 0.18},
            {**row, "name": "eager mb64", "compile": False, "mfu": 0.237},
            {**row, "name": "compiled mb64", "compile": True, "mfu": 0.472},
            {**row, "name": "compiled mb64 ckpt", "compile": True, "mfu": 0.5, "checkpointing": True},
            {**row, "name": "agree fp32", "compile": False, "mfu": 0.9, "dtype": "fp32"}]
    lines = bench.mfu_lines(rows, "h200", "NVIDIA H200")
    assert [line.split(",")[0] for line in lines] == ['measured mfu for plan.GPUS["h200"]: 0.472',
                                                      'measured eager_mfu for plan.GPUS["h200"]: 0.237']
    assert "compiled mb64" in lines[0] and "eager mb64" in lines[1] and bench.mfu_lines(rows, None, "cpu") == []


def test_gpu_bench_shows_no_rate_for_a_row_cut_short_in_its_first_window(monkeypatch):
    """The first log window holds start-up and compilation: alone (a row that timed out), it is no
    steady rate, and printing it beside "timeout" would read as the configuration's speed."""
    bench = _gpu_bench(monkeypatch)
    first = {"step": 3, "loss": 8.0, "tokens": 3000, "elapsed_s": 60.0, "tokens_per_s": 50.0, "mfu": 0.01}
    cut = bench._throughput([first])
    assert "tokens_per_s" not in cut and "mfu" not in cut and cut["losses"] == [8.0]
    steady = bench._throughput([first, {**first, "step": 6, "tokens": 6000, "elapsed_s": 61.0, "tokens_per_s": 3000.0,
                                        "mfu": 0.4}])
    assert steady["tokens_per_s"] == 3000.0 and steady["mfu"] == pytest.approx(0.4)


def test_gpu_bench_agreement_stops_at_the_first_skipped_fp16_step(monkeypatch):
    """After a step fp16's loss scaler skipped, its losses trail fp32's by an update: not a precision error."""
    bench = _gpu_bench(monkeypatch)
    fp16 = {"agree": True, "dtype": "fp16", "losses": [8.0, 8.0, 7.5], "skipped_steps": 1, "first_skip": 2}
    fp32 = {"agree": True, "dtype": "fp32", "losses": [8.0, 7.9, 7.0]}
    agree = bench.agreement([fp16, fp32])
    assert agree["steps"] == 2 and agree["ok"] and agree["skipped_steps"] == 1
    assert not bench.agreement([{**fp16, "first_skip": None}, fp32])["ok"]


def test_gpu_profile_cpu_smoke(tmp_path):
    """bench/gpu_profile.py on CPU: the trainer's step under the profiler, time by category."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_profile.py"), "--cpu-smoke",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_profile.json").read_text())
    timing = report["timing"]
    # A CPU's peak is a timed matmul, which a bf16 step can outrun on a CPU without bf16 units: then no MFU.
    assert timing["tokens_per_s"] > 0 and (0 < timing["mfu"] <= 1 if not timing["peak_outrun"] else
                                           timing["mfu"] is None)
    names = [k["name"] for k in report["kernels"]]
    assert "aten::mm" in names and any("attention" in n for n in names)
    text = (tmp_path / "gpu_profile.md").read_text()
    assert "| matmul |" in text and "| attention |" in text


def test_plan_names_the_model_it_sizes_and_takes_device_names(tmp_path, capsys):
    cfg = tmp_path / "my.yaml"
    cfg.write_text("model: {preset: seed-82m}\n")
    code, out, _ = run_cli(["plan", "--preset", "seed-215m", "--config", str(cfg)], capsys)
    assert code == 0 and "model        seed-82m: 82,594,560 parameters" in out
    code, out, _ = run_cli(["plan", "--preset", "seed-215m", "--set", "model.dim=512"], capsys)
    assert code == 0 and "model        custom (seed-215m): 56,248,832 parameters" in out
    code, out, _ = run_cli(["plan", "--preset", "seed-215m", "--gpu", "NVIDIA H100 80GB HBM3"], capsys)
    assert code == 0 and "1 x NVIDIA H100 80GB SXM" in out


def test_plan_takes_the_vocabulary_of_the_tokenizer_as_training_does(tmp_path, tok_dir, capsys):
    """A tokenizer smaller than the preset's vocabulary makes a smaller model: the plan sized the preset's."""
    from tinyk.checkpoint import init_model_dir, load_model

    init_model_dir("nano", tok_dir, tmp_path / "m")
    built = load_model(tmp_path / "m")[0]
    assert built.config.vocab_size != PRESETS["nano"]["vocab_size"]
    code, out, _ = run_cli(["plan", "--preset", "nano", "--tokenizer", str(tok_dir), "--json"], capsys)
    plan = json.loads(out)
    assert code == 0 and plan["model"]["parameters"] == built.num_params()
    assert plan["model"]["name"] == "nano" and plan["flops_per_token"] == built.flops_per_token(plan["run"]["seq_len"])
    code, out, _ = run_cli(["plan", "--preset", "nano", "--set", f"tokenizer={tok_dir}", "--json"], capsys)
    assert code == 0 and json.loads(out)["model"] == plan["model"]  # a config's tokenizer, as training reads it
    code, out, _ = run_cli(["plan", "--preset", "nano", "--tokenizer", str(tmp_path / "nothing")], capsys)
    assert code == 2 and out == ""
    code, out, _ = run_cli(["plan", "--preset", "nano", "--set", "model.vocab_size=8000", "--json"], capsys)
    assert code == 0 and json.loads(out)["model"]["name"] == "custom (nano)"  # a vocabulary of its own
    code, out, err = run_cli(["plan", "--preset", "nano", "--tokenizer", str(tok_dir), "--set",
                              "model.vocab_size=256"], capsys)  # planned a model that training refuses
    assert (code, out) == (2, "") and err.endswith("tokens but the model's vocab_size is 256\n")


def test_plan_sizes_the_model_an_init_directory_holds(tmp_path, nano_model_dir, capsys):
    """A fine-tune's config names its model by `init:`; plan sized nothing ('no model ... --init', a flag
    it lacked). The shape is the directory's, its tokenizer the vocabulary's, as training takes both."""
    from tinyk.checkpoint import load_model

    built = load_model(nano_model_dir)[0]
    code, out, _ = run_cli(["plan", "--init", str(nano_model_dir), "--json"], capsys)
    plan = json.loads(out)
    assert code == 0 and plan["model"]["parameters"] == built.num_params()
    assert plan["model"]["name"] == f"{nano_model_dir} (--init)"
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(f"init: {nano_model_dir}\nseq_len: 64\nbatch_size: 8\n")
    code, out, _ = run_cli(["plan", "--config", str(cfg), "--json"], capsys)
    assert code == 0 and json.loads(out)["model"] == plan["model"] and json.loads(out)["run"]["seq_len"] == 64
    code, out, err = run_cli(["plan", "--config", str(cfg), "--set", "model.dim=128"], capsys)
    assert (code, out) == (2, "") and err == (f"tinyk: error: model.dim=128 conflicts with {nano_model_dir} (dim 64); "
                                              f"shapes come from the loaded model\n")
    code, out, err = run_cli(["plan", "--init", str(tmp_path / "nothing")], capsys)
    assert (code, out) == (2, "") and err.startswith(f"tinyk: error: --init {tmp_path / 'nothing'} not found")
    # Another tokenizer beside it is refused, as training refuses it (plan sized the model's own vocabulary).
    other = Path(shutil.copytree(nano_model_dir, tmp_path / "other"))
    spec = json.loads((other / "tokenizer.json").read_text(encoding="utf-8"))
    (other / "tokenizer.json").write_text(json.dumps({**spec, "normalizer": {"type": "NFKC"}}), encoding="utf-8")
    code, out, err = run_cli(["plan", "--init", str(nano_model_dir), "--tokenizer", str(other)], capsys)
    assert (code, out) == (2, "") and err == (f"tinyk: error: tokenizer {other} is not the one the model in "
                                              f"{nano_model_dir} was trained with; leave out --tokenizer (the model "
                                              f"carries its own)\n")
    code, _, _ = run_cli(["plan", "--init", str(nano_model_dir), "--tokenizer", str(nano_model_dir)], capsys)
    assert code == 0


def test_plan_takes_the_configs_budget_and_prints_small_runs_readably(capsys):
    code, out, _ = run_cli(["plan", "--preset", "seed-215m", "--gpu", "h100", "--set", "max_tokens=2e9"], capsys)
    assert code == 0 and "time         2B tokens in 3.7 h" in out
    code, out, _ = run_cli(["plan", "--preset", "tiny", "--gpu", "h100"], capsys)  # max_steps 2000 x 16 x 256
    assert code == 0 and "time         8.192M tokens in" in out
    code, out, _ = run_cli(["plan", "--preset", "seed-215m", "--gpu", "h100", "--tokens", "10K"], capsys)
    assert code == 0 and "time         10K tokens in 0.067 s" in out
    code, out, _ = run_cli(["plan", "--preset", "seed-215m", "--gpu", "h100", "--tokens", "1"], capsys)
    assert code == 0 and "time         1 token in " in out
    # From Python too: the config's budget, else the seed's corpus, unless tokens are given.
    h100 = find_gpu("h100")
    budget = run_spec(preset="seed-215m", config=None, sets=["max_tokens=2e9"])
    assert make_plan(budget, h100)["run"]["tokens"] == 2 * 10**9
    assert make_plan(budget, h100, tokens=5e8)["run"]["tokens"] == 5 * 10**8
    assert make_plan(run_spec(preset="seed-215m", config=None), h100)["run"]["tokens"] == DEFAULT_TOKENS


def test_a_long_context_is_planned_without_building_its_rope_tables(capsys):
    """Plan sizes a model on paper: a 100M-token context's RoPE tables (25.6 GB) were built anyway."""
    code, out, _ = run_cli(["plan", "--preset", "seed-215m", "--set", "model.max_seq_len=100000000"], capsys)
    assert code == 0 and "215,127,040 parameters" in out


def test_plan_prints_long_runs_in_days_and_years(capsys):
    code, out, _ = run_cli(["plan", "--preset", "seed-215m", "--gpu", "h100", "--tokens", "500B"], capsys)
    assert code == 0 and re.search(r"time         500B tokens in [\d,.]+ h \(\d+\.\d days\)", out)
    code, out, _ = run_cli(["plan", "--preset", "seed-215m", "--gpu", "h100", "--tokens", "1e18"], capsys)
    assert code == 0 and re.search(r"time         1e\+18 tokens in [\d,.]+ h \([\d,]+ years\)", out)


def test_plan_suggests_only_fixes_that_fit(capsys, tmp_path):
    big = ["--set", "model.dim=4096", "--set", "model.n_layers=32", "--set", "model.n_heads=32"]
    code, out, _ = run_cli(["plan", "--preset", "seed-215m", "--gpu", "rtx4090", *big], capsys)
    warning = next(line for line in out.splitlines() if line.startswith("warning"))
    assert code == 0 and "--activation-checkpointing" not in warning
    assert "no micro-batch fits, not even 1 with activation checkpointing" in out
    config = tmp_path / "big.yaml"  # without micro_batch: no "pass --micro-batch 1" for one that does not fit
    config.write_text("model: {preset: seed-215m, dim: 4096, n_layers: 32, n_heads: 32}\nseq_len: 512\n"
                      "batch_size: 512\n")
    code, out, _ = run_cli(["plan", "--config", str(config), "--gpu", "rtx4090"], capsys)
    assert code == 0 and "this plan is for --micro-batch 1, which does not fit either" in out \
        and "pass that" not in out
    code, out, _ = run_cli(["plan", "--preset", "seed-215m", "--gpu", "rtx3090", "--micro-batch", "512"], capsys)
    assert "try --micro-batch" in out and "--activation-checkpointing" in out.splitlines()[-1]
    # A window too long for any micro-batch without checkpointing: checkpointing, with the micro-batch it
    # needs, in one suggestion (taking "--activation-checkpointing" alone still did not fit).
    long = ["--set", "model.max_seq_len=131072", "--seq-len", "131072", "--batch-size", "8"]
    code, out, _ = run_cli(["plan", "--preset", "seed-215m", "--gpu", "rtx4090", *long], capsys)
    fits = re.search(r"largest micro-batch that fits: none without activation checkpointing, (\d+) with it", out)
    assert code == 0 and fits, out
    assert out.splitlines()[-1].endswith(f"; try --activation-checkpointing --micro-batch {fits[1]}"), out
    code, out, _ = run_cli(["plan", "--preset", "seed-215m", "--gpu", "rtx4090", *long, "--activation-checkpointing",
                            "--micro-batch", fits[1]], capsys)
    assert code == 0 and "warning" not in out


@pytest.mark.parametrize("asked,planned,why", [(3, 2, "does not divide"), (1024, 512, "exceeds")])
def test_plan_says_when_it_changes_the_micro_batch(capsys, asked, planned, why):
    code, out, _ = run_cli(["plan", "--preset", "seed-215m", "--gpu", "h100", "--micro-batch", str(asked)], capsys)
    assert code == 0 and f"note         micro_batch {asked} {why} the 512 sequences per GPU; using {planned}, " \
                         "as the trainer would" in out


def test_plan_says_which_micro_batch_to_pass_when_the_config_sets_none(tmp_path, capsys):
    """Without micro_batch the trainer runs the whole batch per process; a plan that had to pick a smaller
    one to fit says to pass it, instead of calling a run that would run out of memory one that fits."""
    config = tmp_path / "my.yaml"
    config.write_text("model: {preset: seed-215m}\nseq_len: 512\nbatch_size: 512\n")
    code, out, _ = run_cli(["plan", "--config", str(config), "--gpu", "a100"], capsys)
    assert code == 0 and ("note         micro_batch is not set, so the trainer would run all 512 sequences per GPU "
                          "at once, which does not fit; this plan is for --micro-batch 128: pass that to the "
                          "trainer") in out
    code, out, _ = run_cli(["plan", "--config", str(config), "--gpu", "a100", "--micro-batch", "128"], capsys)
    assert code == 0 and "note " not in out


def test_plan_uses_the_eager_mfu_unless_the_run_compiles(capsys):
    """The trainer runs eager unless `compile` is set, at about half a compiled run's MFU (bench/gpu.sh's
    eager and compiled mb64 rows): a plan for the shipped config is an eager one, and says what --compile gives."""
    code, eager, _ = run_cli(["plan", "--preset", "seed-215m", "--gpu", "h200", "--price", "3"], capsys)
    assert code == 0
    assert "throughput   MFU 24% eager (measured: bench/gpu.sh on NVIDIA H200, eager mb64, 2026-12-04)\n" in eager
    assert "time         10B tokens in 16.6 h = 16.6 GPU-hours\n" \
           "             with --compile: MFU 47% (measured), 8.4 h = 8.4 GPU-hours, cost 25.06\n" in eager
    assert "this plan, eager: 16.6 H200-hours (6.3x fewer), with --compile 8.4 (12.4x fewer); on A100 at MFU 20% " \
           "eager (assumed): 62.5 A100-hours (1.7x fewer)" in eager
    for args in (["--set", "compile=true"], ["--compile"]):
        code, compiled, _ = run_cli(["plan", "--preset", "seed-215m", "--gpu", "h200", "--price", "3", *args], capsys)
        assert code == 0 and "with --compile" not in compiled
        assert "throughput   MFU 47% compiled (measured: bench/gpu.sh on NVIDIA H200, compiled mb64, median of 3 " \
               "runs, 2026-12-04)\n" in compiled
        assert "this plan, compiled: 8.4 H200-hours (12.4x fewer); on A100 at MFU 40% compiled (assumed): 31.3 " \
               "A100-hours (3.3x fewer)" in compiled
    p = json.loads(run_cli(["plan", "--preset", "seed-215m", "--gpu", "h200", "--json"], capsys)[1])
    assert (p["run"]["compile"], p["throughput"]["mfu"], p["throughput"]["mfu_mode"]) == (False, 0.237, "eager")
    assert p["with_compile"]["mfu"] == 0.472 and p["with_compile"]["gpu_hours"] == pytest.approx(
        p["time"]["gpu_hours"] * 0.237 / 0.472)
    p = json.loads(run_cli(["plan", "--preset", "seed-215m", "--gpu", "h200", "--compile", "--json"], capsys)[1])
    assert (p["run"]["compile"], p["throughput"]["mfu"], p["throughput"]["mfu_mode"]) == (True, 0.472, "compiled")
    assert p["with_compile"] is None
    # Where no eager run was measured, the plan says what it assumes instead.
    code, out, _ = run_cli(["plan", "--preset", "seed-215m", "--gpu", "a100", "--gpus", "4"], capsys)
    assert ("MFU 20% eager (ASSUMED: 50% of the compiled 40%, the eager share measured on H100 and H200; not yet "
            "measured by bench/gpu.sh on this GPU class; override with --mfu)") in out
    assert "with --compile: MFU 40% (assumed), 7.8 h = 31.3 GPU-hours" in out


def test_the_h100_mfu_names_the_run_that_measured_it(capsys):
    for flag, source in (("--compile", "compiled mb64, median of 4 runs"), ("--no-compile", "eager mb64")):
        code, out, _ = run_cli(["plan", "--preset", "seed-215m", "--gpu", "h100", flag], capsys)
        assert code == 0 and f"(measured: bench/gpu.sh on NVIDIA H100 80GB HBM3, {source}, 2026-12-05)" in out


@pytest.mark.parametrize("dtype,kib", [("bf16", "2.0"), ("fp32", "4.0")])
def test_checkpointed_block_inputs_are_in_the_residual_streams_dtype(capsys, dtype, kib):
    args = ["plan", "--preset", "seed-215m", "--gpu", "h100", "--activation-checkpointing", "--dtype", dtype]
    code, out, _ = run_cli(args, capsys)
    assert code == 0 and f"18 block inputs x {kib} KiB/token" in out
    plan = json.loads(run_cli([*args, "--json"], capsys)[1])
    assert plan["activation_model"]["checkpointed_layer_bytes_per_token"] == float(kib) * 1024


def test_fsdp_on_one_gpu_says_the_trainer_does_not_use_it(capsys):
    note = "note         with one GPU FSDP is not used: the trainer runs one process with the whole model\n"
    code, out, _ = run_cli(["plan", "--preset", "seed-215m", "--parallel", "fsdp", "--gpus", "1"], capsys)
    assert code == 0 and "; one process; " in out and note in out
    code, out, _ = run_cli(["plan", "--preset", "seed-215m", "--parallel", "fsdp", "--gpus", "2"], capsys)
    assert code == 0 and "; FSDP; " in out and "FSDP is not used" not in out


@pytest.mark.parametrize("value", ["45", "1e-300", "nan"])
def test_mfu_is_range_checked_as_it_is_parsed(capsys, value):
    code, out, err = run_cli(["plan", "--preset", "seed-215m", "--mfu", value], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith(f"tinyk plan: error: argument --mfu: must be a finite number in [0.001, 1] (a fraction, "
                          f"e.g. 0.45), got '{value}'")
    with pytest.raises(TinykError, match=r"^--mfu is a fraction between 0.001 and 1 \(e.g. 0.45\)$"):
        make_plan(run_spec(preset="seed-215m", config=None), find_gpu("h100"), mfu=float(value))  # from Python


def test_data_throughput_table_names_small_corpora_in_mb(tmp_path, monkeypatch, capsys):
    """`--sizes 5M` was labelled 0.01 GB."""
    spec = importlib.util.spec_from_file_location("data_throughput", ROOT / "bench" / "data_throughput.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    row = {"size_bytes": 5_000_123, "ceiling_mb_s": 10.0, "ceiling_fast_mb_s": 12.0, "tinyk_mb_s": 9.0,
           "ratio_wall": 0.9, "ceiling_cpu_s_per_mb": 0.1, "tinyk_cpu_s_per_mb": 0.11, "ratio_cpu": 0.9,
           "ceiling_tok_s": 1000, "tinyk_tok_s": 900, "peak_rss_mib": 100, "loadavg": [0.5]}
    monkeypatch.setattr(bench, "sentence_pool", lambda: (["句子。"], "test"))
    monkeypatch.setattr(bench, "bench_one", lambda size, *a: {**row, "size_bytes": size + 123})
    monkeypatch.setattr(sys, "argv", ["data_throughput.py", "--sizes", "5M,2G", "--workdir", str(tmp_path / "w")])
    bench.main()
    table = capsys.readouterr().out
    assert "\n| 5.0 MB | 10.0 MB/s |" in table and "\n| 2.00 GB | 10.0 MB/s |" in table


def test_the_readmes_plan_output_is_what_plan_prints(capsys):
    """The README's sample is the user's first look at a plan: it must be today's output, not an old one."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    command = "tinyk plan --preset seed-215m --gpu h100 --tokens 10B --price 3.5"
    shown = readme.split(f"$ {command}\n", 1)[1].split("```", 1)[0]
    code, out, _ = run_cli(command.split()[1:], capsys)
    assert code == 0 and out == shown


def test_a_smaller_micro_batch_plans_the_lower_mfu_bench_gpu_sh_measured(capsys):
    """The table's MFU is micro-batch 64's: at 16 an H100 reached 16.6% eager where mb64 reached 22.2%
    (2026-11-28), and 40.8% compiled where mb64 reached 46.0% (2026-12-05); the plan gave every micro-batch
    mb64's tokens/s (a third too fast for a 24 GB card or many GPUs)."""
    rates = {}
    for micro in ("16", "32", "64", "128"):
        code, out, _ = run_cli(["plan", "--preset", "seed-215m", "--gpu", "h100", "--micro-batch", micro, "--json"],
                               capsys)
        rates[micro] = json.loads(out)["throughput"]
    assert rates["16"]["mfu"] == pytest.approx(0.213 * 0.75) and rates["16"]["micro_step_share"] == 0.75
    assert rates["32"]["tokens_per_s"] == pytest.approx(142_819, rel=0.01)  # the H100's eager mb32 row
    assert rates["16"]["mfu"] < rates["32"]["mfu"] < rates["64"]["mfu"] == rates["128"]["mfu"] == 0.213
    code, out, _ = run_cli(["plan", "--preset", "seed-215m", "--gpu", "h100", "--micro-batch", "16"], capsys)
    assert "; x0.75 for 8,192 tokens per micro-step, below micro-batch 64's 32,768" in out
    assert "with --compile: MFU 40% (measured, x0.88 for this micro-step)" in out  # compiled mb16 reached 40.8%
    compiled = json.loads(run_cli(["plan", "--preset", "seed-215m", "--gpu", "h100", "--micro-batch", "16",
                                   "--compile", "--json"], capsys)[1])["throughput"]
    assert compiled["tokens_per_s"] == pytest.approx(287_071, rel=0.02)  # the H100's compiled mb16 row
    code, out, _ = run_cli(["plan", "--preset", "seed-215m", "--gpu", "h100", "--micro-batch", "16", "--mfu", "0.3",
                            "--json"], capsys)
    assert json.loads(out)["throughput"]["mfu"] == 0.3  # what the user says is taken as it is
    # --mfu is the planned GPU's: the tutorial line's A100 keeps its own figure for that micro-batch
    args = ["plan", "--preset", "seed-215m", "--gpu", "h100", "--micro-batch", "16", "--json"]
    a100 = [json.loads(run_cli([*args, *mfu], capsys)[1])["tutorial"]["a100_mfu"] for mfu in ([], ["--mfu", "0.166"])]
    assert a100[0] == a100[1] == pytest.approx(0.2 * 0.75)


def test_fsdp_gradients_accumulated_unsharded_are_shown_where_the_peak_counts_them(capsys):
    code, out, _ = run_cli(["plan", "--preset", "seed-215m", "--gpu", "rtx4090", "--gpus", "8", "--parallel", "fsdp",
                            "--micro-batch", "16"], capsys)
    assert code == 0 and "0.10 GiB   0.80 GiB at the peak: accumulated unsharded between micro-steps" in out
    code, out, _ = run_cli(["plan", "--preset", "seed-215m", "--gpu", "h100", "--gpus", "16", "--parallel", "fsdp"],
                           capsys)  # a shard of a normal model is still in GiB, not 14697.06 MiB
    assert code == 0 and "MiB" not in out.split("memory per GPU")[1].split("largest")[0]


def test_a_configs_activation_checkpointing_can_be_turned_off(tmp_path, capsys):
    config = tmp_path / "ck.yaml"
    config.write_text("model: {preset: tiny}\nactivation_checkpointing: true\n")
    code, out, _ = run_cli(["plan", "--config", str(config), "--no-activation-checkpointing"], capsys)
    assert code == 0 and "activation checkpointing off" in out
    assert "weights (fp32)                        17.26 MiB" in out  # not 0.02 GiB


def test_a_jobs_plan_says_what_its_gpus_send_each_step(capsys):
    """The time assumes perfect scaling; a job's plan says what that leaves out: a 32-GPU run all-reduced
    1.6 GiB of fp32 gradients per GPU in each 70 ms step, unmentioned."""
    args = ["plan", "--preset", "seed-215m", "--gpu", "h100", "--gpus", "8", "--nodes", "4"]
    p = json.loads(run_cli([*args, "--json"], capsys)[1])
    n = p["model"]["parameters"]
    assert p["comms"]["bytes_per_step"] == pytest.approx(2 * 31 / 32 * 4 * n)  # a ring all-reduce of fp32 gradients
    per_step = p["run"]["batch_size"] // 32 * p["run"]["seq_len"] / p["throughput"]["tokens_per_s_per_gpu"]
    assert p["comms"]["compute_s_per_step"] == pytest.approx(per_step)
    assert "comms        not in the time above: each GPU moves 1.55 GiB per optimizer step" in run_cli(args, capsys)[1]
    assert "(a 200 Gb/s InfiniBand link between nodes)" in run_cli(args, capsys)[1]
    fsdp = json.loads(run_cli([*args, "--parallel", "fsdp", "--micro-batch", "8", "--json"], capsys)[1])
    accum, root = fsdp["run"]["grad_accum"], model_size(preset_config("seed-215m"))["non_block"]
    # each micro-step gathers every weight for the forward and the blocks' again for the backward (FSDP keeps
    # the root unsharded from forward to backward); the gradients are reduce-scattered once
    assert accum == 2 and fsdp["comms"]["bytes_per_step"] == pytest.approx((accum * (2 * n - root) + n) * 31 / 32 * 4)
    one_node = run_cli(["plan", "--preset", "seed-215m", "--gpu", "h100", "--gpus", "8"], capsys)[1]
    assert "(PCIe 4.0's, the worst case in a node: NVLink, where the GPUs have it, is many times faster)" in one_node
    assert json.loads(run_cli(["plan", "--preset", "seed-215m", "--gpu", "h100", "--json"], capsys)[1])["comms"] is None


def test_plan_sft_sizes_the_fine_tune_with_the_configs_sft_settings(capsys):
    """Planning took the pretraining settings only: seed-82m's SFT batch is 256, not 512, and nano fine-tunes
    at its whole context (its sft: section's seq_len null), not at pretraining's 64."""
    pretrain, sft = (run_spec(preset=p, config=None, kind=k) for p, k in (("seed-82m", "pretrain"),
                                                                           ("seed-82m", "sft")))
    assert (pretrain.batch_size, sft.batch_size) == (512, 256)
    nano = run_spec(preset="nano", config=None, kind="sft")
    assert nano.seq_len == nano.cfg.max_seq_len == 128 and run_spec(preset="nano", config=None).seq_len == 64
    code, text, _ = run_cli(["plan", "--preset", "seed-82m", "--sft"], capsys)
    assert code == 0 and "global batch 256 sequences" in text


def test_the_disk_a_run_takes_is_planned_as_its_checkpoints_hold_it(tmp_path, pt_data, tok_dir, capsys):
    """Nothing said how much disk a run needs: a seed-82m run kept 3.3 GB. Its checkpoints' weights and
    optimizer state, and final/'s and best/'s weights, measured against the plan's 12 and 4 bytes a parameter."""
    from tinyk.rundir import checkpoints

    out = tmp_path / "run"
    args = ["--preset", "nano", "--tokenizer", str(tok_dir), "--set", "keep_checkpoints=2", "--set", "keep_best=true"]
    code, text, _ = run_cli(["plan", *args, "--json"], capsys)
    disk = json.loads(text)["disk"]
    code = run_cli(["pretrain", *args, "--data", str(pt_data), "--out", str(out), "--max-steps", "3",
                    "--save-every", "1", "--batch-size", "4", "--no-progress"], capsys)[0]
    assert code == 0 and len(checkpoints(out)) == 2 == disk["keep_checkpoints"]
    held = [(c / "model" / "model.safetensors").stat().st_size + (c / "optimizer.pt").stat().st_size
            for c in checkpoints(out)]
    final = (out / "final" / "model.safetensors").stat().st_size
    best = (out / "best" / "model.safetensors").stat().st_size
    assert all(held_one == pytest.approx(disk["checkpoint_bytes"], rel=0.05) for held_one in held), (held, disk)
    assert final == pytest.approx(disk["final_bytes"], rel=0.05) and best == pytest.approx(final, abs=200)  # its header
    assert sum(held) + final + best == pytest.approx(disk["run_bytes"], rel=0.05)
    # While a checkpoint is saved the oldest is still there: one more checkpoint, and no final/ yet.
    assert sum(held) + held[-1] + best == pytest.approx(disk["peak_bytes"], rel=0.05)
    assert "kept, and final/ and best/)" in run_cli(["plan", *args], capsys)[1]


def plan_json(*args: str, capsys) -> dict:
    with pytest.raises(SystemExit) as e:
        main(["plan", *args, "--json"])
    assert e.value.code == 0
    return json.loads(capsys.readouterr().out)


def test_flops_of_an_untied_model_count_its_lm_head_not_its_embedding_lookup():
    """Every preset ties its embeddings, so N = all parameters vs N = matmul parameters was never told apart."""
    cfg = preset_config("nano", tie_embeddings=False)
    with torch.device("meta"):
        model = Transformer(cfg)
    n = model.num_params() - cfg.vocab_size * cfg.dim  # the input embedding is a lookup
    expected = 6 * n + 12 * cfg.n_layers * cfg.dim * 64
    assert flops_per_token(cfg, 64) == model.flops_per_token(64) == expected


def test_checkpointing_costs_a_third_more_compute_in_time_and_in_the_tutorial_line(capsys):
    """x0.75 with checkpointing was printed but neither the tokens/s nor the A100 comparison was checked."""
    base = ["--preset", "seed-215m", "--gpu", "h100", "--micro-batch", "64"]
    off = plan_json(*base, capsys=capsys)
    on = plan_json(*base, "--activation-checkpointing", capsys=capsys)
    assert on["throughput"]["mfu"] == off["throughput"]["mfu"]
    assert on["throughput"]["tokens_per_s"] == pytest.approx(0.75 * off["throughput"]["tokens_per_s"])
    assert on["time"]["gpu_hours"] == pytest.approx(off["time"]["gpu_hours"] / 0.75)
    assert on["tutorial"]["a100_hours"] == pytest.approx(off["tutorial"]["a100_hours"] / 0.75)
    # An --mfu is what training logs, where the recomputation already lowers it: not discounted again.
    for gpu in ("h100", "a100"):
        given = [*base[:3], gpu, *base[4:], "--mfu", "0.4"]
        off = plan_json(*given, capsys=capsys)
        on = plan_json(*given, "--activation-checkpointing", capsys=capsys)
        assert on["throughput"]["tokens_per_s"] == pytest.approx(off["throughput"]["tokens_per_s"])
        assert on["throughput"]["tokens_per_s"] == pytest.approx(0.4 * GPUS[gpu].peak_flops / on["flops_per_token"])
        # The A100 comparison takes --mfu only for an A100 plan; else the table's figure, discounted.
        ratio = 1 if gpu == "a100" else 1 / 0.75
        assert on["tutorial"]["a100_hours"] == pytest.approx(off["tutorial"]["a100_hours"] * ratio)
        assert "x0.75 for recomputation" not in run_cli(["plan", *given, "--activation-checkpointing"], capsys)[1]


def test_the_micro_step_share_counts_tokens_not_sequences(capsys):
    """Every plan test ran at seq 512, where micro-batch x 512 and micro-batch x seq_len agree."""
    p = plan_json("--preset", "seed-215m", "--gpu", "h100", "--seq-len", "256", "--micro-batch", "64", capsys=capsys)
    t = p["throughput"]
    assert t["micro_step_tokens"] == 64 * 256
    assert t["micro_step_share"] == pytest.approx(0.945)  # bench/gpu.sh's eager mb32 row: 16,384 tokens
    assert t["mfu"] == pytest.approx(0.213 * 0.945)


def test_a_peak_above_the_usable_share_does_not_fit(capsys):
    """seed-82m at micro-batch 32 on an RTX 3080 peaks at 93% of its memory: over the 90% a plan may fill."""
    p = plan_json("--preset", "seed-82m", "--gpu", "rtx3080", "--micro-batch", "32", capsys=capsys)
    peak, memory = p["memory"]["peak"], p["gpu"]["memory_gib"] * GiB
    assert 0.9 * memory < peak < memory
    assert not p["fits"] and 0 < p["largest_micro_batch"]["no_checkpointing"] < 32


# The plan's arithmetic term by term, fast (no profiler, no training). Each test's comment names the wrong
# computation it rules out, which the tests above left possible.


def _plan(capsys, *args: str) -> dict:
    code, out, _ = run_cli(["plan", *args, "--json"], capsys)
    assert code == 0
    return json.loads(out)


def _independent_sizes(cfg) -> tuple[int, int]:
    """(per block, outside the blocks) parameters of a LLaMA block, counted by hand: two RMSNorm weights,
    q and o (d x d), k and v (d x kv), gate, up and down (d x hidden); outside, the tied embedding and the
    final norm."""
    d, kv, h = cfg.dim, cfg.n_kv_heads * cfg.head_dim, cfg.hidden_dim
    per_layer = 2 * d + 2 * d * d + 2 * d * kv + 3 * d * h
    non_block = cfg.vocab_size * d + d
    assert cfg.tie_embeddings
    return per_layer, non_block


# ---------------------------------------------------------------------------------------------------------
# micro_step_share: only bench/gpu.sh's measured points (8,192, 16,384, 32,768 tokens) were ever tested.


def test_micro_step_share_interpolates_in_log2_between_and_extrapolates_below_the_measured_rows(capsys):
    # interpolation linear in tokens instead of log2(tokens)
    #   (`share = s0 + (s1 - s0) * (tokens - t0) / (t1 - t0)`: 0.8475 instead of 0.8641 at 12,288)
    # `below[0]` instead of `below[-1]` (between mb32 and mb64 it extrapolated the
    #   mb16-mb32 segment upwards: a share of 1.059, above mb64's own)
    # below mb16's tokens kept mb16's share instead of following the mb16-mb32 slope
    # MIN_MICRO_STEP_SHARE 0.1 -> 0.3
    eager = {8192: 0.75, 16384: 0.945, 32768: 1.0}
    compiled = {8192: 0.876, 16384: 0.966, 32768: 1.0}
    half = math.log2(1.5)  # 12,288 and 24,576 lie this far (in log2) above 8,192 and 16,384
    assert micro_step_share(12288, False) == pytest.approx(0.75 + (0.945 - 0.75) * half)
    assert micro_step_share(24576, False) == pytest.approx(0.945 + (1.0 - 0.945) * half)
    assert micro_step_share(24576, True) == pytest.approx(0.966 + (1.0 - 0.966) * half)
    assert all(micro_step_share(t, False) == pytest.approx(s) for t, s in eager.items())
    assert all(micro_step_share(t, True) == pytest.approx(s) for t, s in compiled.items())
    # one doubling below mb16: the mb16-mb32 slope continued down; compiled keeps its lead measured at mb16
    # (its own slope, continued, made nano's --compile plan 10x eager's)
    assert micro_step_share(4096, False) == pytest.approx(0.75 - (0.945 - 0.75))
    assert micro_step_share(4096, True) == pytest.approx((0.75 - (0.945 - 0.75)) * 0.876 / 0.75)
    # far below, the floor: 0.75 - 7 x 0.195 would be negative
    assert micro_step_share(64, False) == 0.1 and micro_step_share(64, True) == pytest.approx(0.1 * 0.876 / 0.75)
    assert micro_step_share(2 ** 40, False) == 1.0
    # and through the plan, at a sequence length where micro-batch x seq_len falls between the rows
    base = ["--preset", "seed-215m", "--gpu", "h100", "--seq-len", "384"]
    t32 = _plan(capsys, *base, "--micro-batch", "32")["throughput"]
    t64 = _plan(capsys, *base, "--micro-batch", "64")["throughput"]
    assert t32["micro_step_tokens"] == 12288 and t32["mfu"] == pytest.approx(0.213 * (0.75 + 0.195 * half))
    assert t64["micro_step_tokens"] == 24576 and t64["micro_step_share"] < 1
    assert _plan(capsys, "--preset", "seed-215m", "--gpu", "h100", "--seq-len", "64", "--micro-batch", "1"
                 )["throughput"]["micro_step_share"] == 0.1


def test_an_fp32_plan_takes_its_assumed_mfu_at_every_micro_batch(capsys):
    # `scaled = mfu is None` (the micro-step share applied to fp32's assumption too)
    p = _plan(capsys, "--preset", "seed-215m", "--gpu", "h100", "--dtype", "fp32", "--micro-batch", "16")
    assert p["throughput"]["micro_step_share"] == 1.0
    assert p["throughput"]["mfu"] == pytest.approx(0.5 * 67e12 / 989e12) == pytest.approx(GPUS["h100"].fp32_mfu)


# ---------------------------------------------------------------------------------------------------------
# time, cost and communication of a job over several nodes


def test_gpu_hours_count_the_gpus_of_every_node(capsys):
    # `wall_s / 3600 * gpus` (GPUs per node) instead of `* world`
    p = _plan(capsys, "--preset", "seed-215m", "--gpu", "h100", "--gpus", "4", "--nodes", "2", "--price", "2")
    assert p["gpu"]["count"] == 8
    assert p["time"]["gpu_hours"] == pytest.approx(p["time"]["wall_h"] * 8)
    assert p["time"]["wall_s"] == pytest.approx(10e9 / p["throughput"]["tokens_per_s"])
    assert p["cost"]["total"] == pytest.approx(2 * 8 * p["time"]["wall_h"])


def test_comms_time_at_the_link_and_compute_per_step_with_accumulation(capsys):
    # seconds_at_link not bytes / 25 GB/s (only bytes_per_step was checked)
    # compute_s_per_step from one micro-step's tokens instead of the optimizer step's
    #   (the existing test ran at accumulation 1, where the two agree)
    p = _plan(capsys, "--preset", "seed-215m", "--gpu", "h100", "--gpus", "2", "--micro-batch", "64")
    cm, run = p["comms"], p["run"]
    assert (run["micro_batch"], run["grad_accum"]) == (64, 4)
    assert LINK_BYTES_PER_S == 25e9
    assert cm["seconds_at_link"] == pytest.approx(cm["bytes_per_step"] / 25e9)
    n = p["model"]["parameters"]
    assert cm["bytes_per_step"] == pytest.approx(2 * 1 / 2 * 4 * n)  # once per step, not per micro-step
    per_gpu_tokens = 512 // 2 * 512  # the 256 sequences each GPU runs in an optimizer step
    assert cm["compute_s_per_step"] == pytest.approx(per_gpu_tokens / p["throughput"]["tokens_per_s_per_gpu"])


# ---------------------------------------------------------------------------------------------------------
# Refusals (from Python: the CLI's parsers catch most of these first)


def test_make_plan_refuses_what_it_cannot_plan_and_takes_a_free_gpu():
    # ref_gpus (nodes < 1 let through), ref_tokens (`tokens < 0`), ref_price (negative price let through),
    #   ref_price_le (`price <= 0`: a price of 0, which --price accepts, refused)
    run, gpu = run_spec(preset="seed-215m", config=None), find_gpu("h100")
    with pytest.raises(TinykError, match=r"^--gpus and --nodes must be at least 1$"):
        make_plan(run, gpu, nodes=0)
    with pytest.raises(TinykError, match=r"^--tokens must be positive$"):
        make_plan(run, gpu, tokens=0)
    with pytest.raises(TinykError, match=r"^--price must not be negative$"):
        make_plan(run, gpu, price=-1.0)
    free = make_plan(run, gpu, price=0.0)
    assert free["cost"] == {"price_per_gpu_hour": 0.0, "total": 0.0} and free["with_compile"]["cost"] == 0.0


def test_the_batch_must_divide_over_every_node(capsys):
    # `run.batch_size % gpus` (per node) instead of `% world`: 512 divides over 8 GPUs but not
    #   over 8 x 3, and the refusal came from the trainer's micro_layout in other words
    code, out, err = run_cli(["plan", "--preset", "seed-215m", "--gpus", "8", "--nodes", "3"], capsys)
    assert code == 2 and out == ""
    assert "batch size 512 is not divisible by 24 GPUs (set --batch-size)" in err


def test_fp16_with_fsdp_on_one_gpu_is_planned_as_the_trainer_runs_it(capsys):
    # fp16 + FSDP refused even on one GPU, where the trainer does not shard and runs it
    code, out, _ = run_cli(["plan", "--preset", "seed-82m", "--gpu", "v100", "--parallel", "fsdp", "--gpus", "1"],
                           capsys)
    assert code == 0 and "fp16 autocast" in out and "with one GPU FSDP is not used" in out


def test_a_config_budget_of_steps_and_tokens_plans_the_one_that_ends_the_run_first(capsys):
    # max(budgets) instead of min
    p = _plan(capsys, "--preset", "seed-215m", "--gpu", "h100", "--set", "max_tokens=2e9", "--set", "max_steps=10")
    assert p["run"]["tokens"] == 10 * 512 * 512


def test_budgets_plan_cannot_count_are_said_to_be_left_out(capsys):
    """epochs counts the data and max_minutes the clock, neither of which plan reads: both were taken
    without a word while the plan sized another budget; with --tokens the user has said the size."""
    code, out, _ = run_cli(["plan", "--preset", "tiny", "--gpu", "h100", "--set", "epochs=1", "--set",
                            "max_minutes=5"], capsys)
    assert code == 0 and ("note         epochs=1 and max_minutes=5 are not planned (depending on the data's size and "
                          "the run's real pace): this plan is for 8.192M tokens, which --tokens sets; the run stops "
                          "at whichever of its budgets ends first\n") in out
    assert "max_minutes=5 is not planned (depending on the run's real pace): this plan is for 10B tokens" in \
        run_cli(["plan", "--preset", "nano", "--set", "max_steps=null", "--set", "max_minutes=5"], capsys)[1]
    code, out, _ = run_cli(["plan", "--preset", "tiny", "--set", "epochs=1", "--tokens", "1B"], capsys)
    assert code == 0 and "not planned" not in out
    assert _plan(capsys, "--preset", "nano", "--set", "epochs=2")["run"]["unplanned"] == {"epochs": 2}


# ---------------------------------------------------------------------------------------------------------
# The memory model: terms no fast test reached


def test_one_gpu_fsdp_is_planned_as_the_one_process_it_runs(capsys):
    # `Setup.fsdp` true for parallel == "fsdp" alone (one GPU: FSDP buffers and root
    #   gradients added to a process that does not shard)
    fsdp = _plan(capsys, "--preset", "seed-215m", "--gpu", "a100", "--parallel", "fsdp", "--gpus", "1")
    ddp = _plan(capsys, "--preset", "seed-215m", "--gpu", "a100", "--parallel", "ddp", "--gpus", "1")
    assert fsdp["memory"] == ddp["memory"] and fsdp["memory"]["buffers"] == 0
    assert fsdp["largest_micro_batch"] == ddp["largest_micro_batch"]


def test_ddp_on_two_gpus_keeps_its_gradient_buckets():
    # DDP's buckets counted only from 3 processes (tests used 4)
    cfg = preset_config("seed-215m")
    n = model_size(cfg)["parameters"]
    assert estimate_memory(Setup(cfg, 512, 16, world_size=2)).buffers == 4 * n
    assert estimate_memory(Setup(cfg, 512, 16, world_size=1)).buffers == 0


def test_two_micro_steps_keep_the_gradients_through_the_second_forward():
    # `grad_accum > 2` (tests used accumulation 4; the profiler test fp32-ckpt-accum2 also
    #   catches it, in seconds instead of milliseconds)
    cfg = preset_config("seed-215m")
    n = model_size(cfg)["parameters"]
    assert estimate_memory(Setup(cfg, 512, 16, grad_accum=2)).gradients_at_peak == 4 * n


def test_fsdp_buffers_are_three_blocks_and_the_root_unsharded():
    # the test
    #   only bounded them (0 < buffers < n); the torchrun test that measures them is not a fast one
    cfg = preset_config("seed-215m")
    per_layer, non_block = _independent_sizes(cfg)
    size = model_size(cfg)
    assert (size["per_layer"], size["non_block"]) == (per_layer, non_block)
    assert non_block + cfg.n_layers * per_layer == size["parameters"] == 215_127_040
    fsdp = estimate_memory(Setup(cfg, 512, 16, parallel="fsdp", world_size=4))
    assert fsdp.buffers == 4 * (3 * per_layer + non_block)


def test_fsdp_backward_end_holds_the_roots_gradient_and_accumulated_ones_unsharded():
    # root_grads (the root's unsharded gradient at backward end dropped) and bwd_end_grads
    #   (`backward end` counting sharded gradients where FSDP accumulates them unsharded)
    cfg = preset_config("seed-215m")
    per_layer, non_block = _independent_sizes(cfg)
    n, v, d, w, tokens = 215_127_040, cfg.vocab_size, cfg.dim, 4, 16 * 512
    static = 4 * n / w + 8 * n / w + 4 * (3 * per_layer + non_block)  # weights, AdamW, unsharded blocks
    batch = 16 * tokens
    tied_sum = 4 * v * d  # the lookup's and the lm_head's gradient, summed
    one = estimate_memory(Setup(cfg, 512, 16, parallel="fsdp", world_size=w))
    assert one.phases["backward end"] == pytest.approx(static + batch + tied_sum + 4 * non_block + 4 * n / w, abs=1)
    accum = estimate_memory(Setup(cfg, 512, 16, parallel="fsdp", world_size=w, grad_accum=2))
    assert accum.phases["backward end"] == pytest.approx(static + batch + tied_sum + 4 * non_block + 4 * n, abs=1)


def test_without_a_micro_batch_a_checkpointed_plan_takes_the_largest_that_fits_with_checkpointing(tmp_path,
                                                                                                  capsys):
    # `fits[False]` (the largest without checkpointing) taken for a checkpointed run
    config = tmp_path / "my.yaml"
    config.write_text("model: {preset: seed-215m}\nseq_len: 512\nbatch_size: 512\n")
    p = _plan(capsys, "--config", str(config), "--gpu", "a100", "--activation-checkpointing")
    fits = p["largest_micro_batch"]
    assert fits["checkpointing"] > fits["no_checkpointing"]
    assert p["run"]["micro_batch"] == fits["checkpointing"] and p["fits"]


def test_the_fix_keeps_a_micro_batch_checkpointing_already_fits(capsys):
    # `!=` instead of `<`: "--activation-checkpointing --micro-batch 4" suggested to a run
    #   at micro-batch 1, which checkpointing alone makes fit
    long = ["--set", "model.max_seq_len=32768", "--seq-len", "32768", "--batch-size", "8", "--micro-batch", "1"]
    code, out, _ = run_cli(["plan", "--preset", "seed-215m", "--gpu", "rtx4090", *long], capsys)
    assert code == 0 and "none without activation checkpointing, 4 with it" in out
    assert out.splitlines()[-1].endswith("; try --activation-checkpointing")


# ---------------------------------------------------------------------------------------------------------
# The small-model warning and the text


def test_a_model_under_20m_parameters_is_warned_of_unless_its_mfu_is_given(capsys):
    # small_model (SMALL_MODEL 20M -> 2M: tiny's 4.5M not warned of; the test used nano's 0.13M)
    # small_model_mfu (the warning printed although --mfu says what the user expects)
    assert _plan(capsys, "--preset", "tiny", "--gpu", "h100")["throughput"]["small_model"]
    assert not _plan(capsys, "--preset", "tiny", "--gpu", "h100", "--mfu", "0.05")["throughput"]["small_model"]
    assert not _plan(capsys, "--preset", "seed-82m", "--gpu", "h100")["throughput"]["small_model"]


def test_a_small_models_flops_are_in_mflop(capsys):
    # the GFLOP/MFLOP switch at 1e6 instead of 1e9 (tiny's 27 MFLOP read "0.027 GFLOP")
    code, out, _ = run_cli(["plan", "--preset", "tiny"], capsys)
    line = next(line for line in out.splitlines() if line.startswith("FLOPs/token"))
    assert code == 0 and re.search(r"= \d+\.\d{3} MFLOP per token", line), line


def test_durations_amounts_token_counts_and_ratios_read_as_documented():
    # dur_48 (days shown from 24 h), dur_730 (years from 365 days), amount_095 (one decimal from 0.5),
    #   tok_T (trillions printed as thousands of billions), ratio_le (an equal time called "more")
    assert _duration(24.0) == "24.0 h" and _duration(47.9) == "47.9 h"
    assert _duration(48.0) == "48.0 h (2.0 days)"
    assert _duration(400 * 24) == "9,600.0 h (400.0 days)"
    assert _duration(800 * 24) == "19,200.0 h (2 years)"
    assert _duration(0.5) == "30 min" and _duration(1 / 3600) == "1 s"
    assert _amount(0.54) == "0.54" and _amount(0.96) == "1.0"
    assert _amount(0.021) == "0.021" and _amount(1234.5) == "1,234.5"
    assert _token_count(1.5e12) == "1.5T" and _token_count(2e9) == "2B" and _token_count(2e15) == "2e+15"
    assert _ratio(104, 104) == "1.0x fewer" and _ratio(104, 208) == "2.0x more"



def test_the_optimizer_step_holds_the_state_the_gradients_and_the_last_micro_batchs_ids():
    # BATCH_BYTES_PER_TOKEN 16 -> 8 (input ids and targets are two int64 tensors: 16 bytes a
    #   token); survived the CPU profiler tests too, whose 15% and 3% bounds hide a few KiB
    cfg = preset_config("seed-215m")
    n, tokens = 215_127_040, 4 * 512
    m = estimate_memory(Setup(cfg, 512, 4))  # fused AdamW (CUDA): no per-parameter temporary
    assert m.phases["optimizer step"] == 4 * n + 8 * n + 4 * n + 2 * 8 * tokens



def test_each_phase_of_a_checkpointed_step_counts_what_is_alive_then():
    # (all survived the fast tests and the CPU profiler tests, whose bounds of 3-15% are loose for a term
    #   that is not the peak):
    #   block_copies     the recomputed block's bf16 weight casts dropped
    #   block_bwd3       one hidden-sized gradient in the MLP's backward instead of three
    #   fwd_end_v        the bf16 logits left out at the end of the forward
    #   rec_last_grads   the root's gradients (embedding, final norm) dropped when the last block is recomputed
    #   rec_first_grads  every block's gradient but the first's dropped when the first block is recomputed
    #   rec_first_inputs the first block's input dropped from its own recomputation
    cfg = preset_config("seed-215m")
    per_layer, non_block = _independent_sizes(cfg)
    n, d, h, v, L = 215_127_040, cfg.dim, cfg.hidden_dim, cfg.vocab_size, cfg.n_layers
    T = 16 * 512
    s = Setup(cfg, 512, 16, checkpointing=True)
    m = estimate_memory(s)
    static = 4 * n + 8 * n  # fp32 weights and AdamW's two moments
    batch = 16 * T  # int64 ids and targets
    inputs = 2 * d * T  # a checkpointed block's bf16 input
    layer = sum(layer_saved_bytes(cfg, True).values()) * T + layer_rope_bytes(cfg, True) * 512
    head = head_saved_bytes(cfg, True) * T
    block_bwd = 2 * d * T + 3 * 2 * h * T  # residual gradient; MLP: the product's, silu(gate)'s and up's
    block_casts = 2 * per_layer
    size = model_size(cfg)
    fused = L * (d * (d + 2 * cfg.n_kv_heads * cfg.head_dim) + 2 * d * h)  # q/k/v and gate/up weights
    assert size["fused"] == fused
    linear = L * (per_layer - 2 * d) + v * d  # every matmul weight, the tied lm_head's included
    assert m.phases["forward end"] == static + L * inputs + head + batch + (2 + 4) * v * T + 2 * (linear - fused)
    assert m.phases["backward start"] == static + L * inputs + head + batch + 8 * v * T + 2 * v * d
    assert m.phases["recompute last block"] == static + batch + L * inputs + layer + block_bwd + 4 * non_block \
        + block_casts
    assert m.phases["recompute first block"] == static + batch + inputs + layer + block_bwd \
        + 4 * (n - per_layer) + block_casts


def test_backward_end_adds_the_tied_embeddings_summed_gradient():
    # the sum of the lookup's and the lm_head's gradient (one more v x d fp32 tensor) dropped
    cfg = preset_config("seed-215m")
    n, T = 215_127_040, 16 * 512
    m = estimate_memory(Setup(cfg, 512, 16))
    assert m.phases["backward end"] == 12 * n + 16 * T + 4 * cfg.vocab_size * cfg.dim + 4 * n


def test_cpus_unfused_adamw_needs_two_temporaries_of_the_largest_parameter():
    # plans always assume CUDA's fused AdamW, so only the profiler
    #   tests (too loose) reached these
    cfg = preset_config("seed-215m")
    n, T = 215_127_040, 2 * 512
    assert model_size(cfg)["largest"] == cfg.vocab_size * cfg.dim  # the embedding outgrows every block matrix
    m = estimate_memory(Setup(cfg, 512, 2, fused_adamw=False))
    assert m.phases["optimizer step"] == 12 * n + 4 * n + 16 * T + 2 * 4 * cfg.vocab_size * cfg.dim


def test_the_run_directory_holds_best_beside_final(capsys):
    # best/ not counted (the disk test that catches it trains a model: seconds, not ms)
    n = 215_127_040
    keep = _plan(capsys, "--preset", "seed-215m", "--set", "keep_best=true", "--set", "keep_checkpoints=2")["disk"]
    assert (keep["checkpoint_bytes"], keep["final_bytes"]) == (12 * n, 4 * n)
    assert keep["run_bytes"] == 2 * 12 * n + 2 * 4 * n
    assert _plan(capsys, "--preset", "seed-215m")["disk"]["run_bytes"] == 3 * 12 * n + 4 * n



BIG = ["--set", "model.dim=2048", "--set", "model.n_layers=24", "--set", "model.n_heads=16"]


@pytest.mark.parametrize("args, fsdp", [
    (["--gpu", "v100", "--gpus", "8", *BIG], "--parallel fsdp --dtype fp32 --micro-batch 8"),  # auto: fp16
    (["--gpu", "a100-40gb", "--gpus", "8", "--dtype", "fp16", *BIG], "--parallel fsdp --dtype bf16 --micro-batch 16"),
    (["--gpu", "rtx4090", "--gpus", "8", *BIG], "--parallel fsdp --micro-batch 8"),
    (["--gpu", "a100", "--gpus", "2", "--micro-batch", "512"], None),  # no larger micro-batch with FSDP: not said
])
def test_a_fit_warning_suggests_fsdp_where_it_fits_more_in_a_precision_it_runs_in(capsys, args, fsdp):
    """fp16 with FSDP is refused (plan and trainer): the warning names the --dtype FSDP takes there, and
    suggests FSDP only where it fits a larger micro-batch, with that micro-batch, which then fits."""
    code, out, _ = run_cli(["plan", "--preset", "seed-215m", *args], capsys)
    warning = out.splitlines()[-1]
    assert code == 0 and warning.startswith("warning")
    if fsdp is None:
        assert "fsdp" not in warning
        return
    assert warning.endswith((f" or {fsdp}", f"; try {fsdp}"))
    code, out, err = run_cli(["plan", "--preset", "seed-215m", *args, *fsdp.split()], capsys)
    assert code == 0 and err == "" and "warning" not in out and "fits" in out
