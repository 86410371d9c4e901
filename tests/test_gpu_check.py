"""tools/gpu_check.py, the prepared GPU check: its ``--cpu`` mode runs every section at tiny sizes here, so the
script that runs on a lent H100 / H200 cannot rot between the sessions that have one."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "gpu_check.py"


def load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_cpu_mode_runs_every_section_and_every_check_passes(tmp_path):
    out = tmp_path / "cpu.jsonl"
    r = subprocess.run([sys.executable, str(SCRIPT), "--cpu", "--out", str(out)], capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(row["mode"] == "cpu" and "versions" in row and row["versions"]["jax"] and "cpu" in row for row in rows)
    by = {}
    for row in rows:
        by.setdefault(row["section"], []).append(row)
    assert not [row for row in rows if "error" in row]
    assert by["ceilings"][0]["matmul_bf16_tflops"] > 0 and by["ceilings"][0]["copy_gbs"] > 0

    attention = by["attention"]
    assert len(attention) == 3 * 2 * 3 and all(row["ok"] for row in attention)  # masks x dtypes x kernels
    ran = {(row["mask"], row["dtype"]): row["ran"] for row in attention if row["kernel"] == "cudnn"}
    # cuDNN runs bf16 causal / banded (through XLA here); float32 and packed documents fall back to blockwise
    assert ran[("causal", "bfloat16")] == ran[("banded", "bfloat16")] == "cudnn"
    assert {ran[(m, "float32")] for m in ("causal", "banded", "segments")} == {"blockwise"}
    assert ran[("segments", "bfloat16")] == "blockwise"
    # bf16 errors are bf16-sized, not zero (the inputs really went through bf16), and under the tolerance
    assert all(0 < row["rel_err_out"] <= row["tolerance"] for row in attention if row["dtype"] == "bfloat16")

    eq = by["equivalence"][0]
    assert eq["ok"] and len(eq["losses_device"]) == 4 and eq["losses_device"][0] > 0

    train = {(row["impl"], row["shape"]): row for row in by["train"]}
    assert set(train) == {(i, s) for i in ("gptjax", "torch") for s in ("gpt2", "llama")} | {
        ("gptjax", "gpt2-fused"), ("gptjax", "llama-fused")}
    for shape in ("gpt2", "llama"):
        jax_row, torch_row = train[("gptjax", shape)], train[("torch", shape)]
        assert jax_row["params"] == torch_row["params"]  # the peer is the same model
        assert jax_row["batch"] == torch_row["batch"] <= jax_row["planner_largest_batch"]
        assert jax_row["tokens_per_s"] > 0 and torch_row["tokens_per_s"] > 0
        assert 0.7 < jax_row["planned_peak_gb"] / jax_row["xla_peak_gb"] < 1.3  # the planner against XLA
        assert jax_row["mfu_measured_matmul"] > 0
        fused = train[("gptjax", f"{shape}-fused")]  # the fused loss: same batch and data, the same loss
        assert fused["batch"] == jax_row["batch"] and fused["loss"] == pytest.approx(jax_row["loss"], abs=0.02)
    decode = by["decode"]
    assert [row["batch"] for row in decode] == [1, 2] and all(row["tokens_per_s"] > 0 for row in decode)


def test_unknown_section_is_one_error_naming_the_choices(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), "--cpu", "--only", "kernels,warp", "--out",
                        str(tmp_path / "x.jsonl")], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown section(s) warp" in r.stderr and "train-gpt2" in r.stderr
    assert not (tmp_path / "x.jsonl").exists()


def test_trace_summary_groups_device_kernels_by_kind():
    g = load()
    events = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
        {"ph": "X", "pid": 1, "name": "nvjet_sm90_tss_128x256", "dur": 600.0},
        {"ph": "X", "pid": 1, "name": "cudnn_generated_fort_native_sdpa_sm90_flash_bprop", "dur": 200.0},
        {"ph": "X", "pid": 1, "name": "input_convert_reduce_fusion_2", "dur": 150.0},
        {"ph": "X", "pid": 1, "name": "loop_multiply_fusion", "dur": 50.0},
        {"ph": "X", "pid": 2, "name": "PjitFunction", "dur": 5000.0},  # host: not a kernel
    ]
    s = g.summarize_trace(events, steps=2, wall=0.0012)
    assert s["by_kind"] == {"matmul": 0.6, "attention (cuDNN)": 0.2, "reduction": 0.15,
                            "elementwise / other fusion": 0.05}
    assert s["kernel_ms_per_step"] == 0.5 and s["wall_ms_per_step"] == 0.6
    assert list(s["top_kernels_ms_per_step"])[0] == "nvjet_sm90_tss_128x256"
    assert "error" in g.summarize_trace(events[1:2] + events[-1:], 1, 1.0)
