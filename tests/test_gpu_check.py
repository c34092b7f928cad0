"""The GPU check's CPU part (scripts/gpu_check.sh --cpu-only, what CI runs of it) and the
functions that judge its checks, on made-up fairseq logs (no timing assertions)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

import benchmark_layer  # noqa: E402
import gpu_check  # noqa: E402


def inner(update, loss, gnorm=0.5):
    stats = {"loss": f"{loss:.3f}", "nll_loss": "1.0", "moe_gate_loss": "1.1", "rc_enc": "1.5", "rc_dec": "1.2",
             "dropped": "0.1", "gnorm": f"{gnorm:.3f}", "num_updates": str(update)}
    return f"2026-12-08 01:00:00 | INFO | train_inner | {json.dumps(stats)}"


OVERFLOW = ("2026-12-08 01:00:00 | INFO | fairseq.trainer | NOTE: gradient overflow detected, ignoring gradient, "
            "setting loss scale to: 64.0")


def log(losses, overflow_before=()):
    """fairseq's output for ``losses`` (update 1, 2, ...), an overflow line before each update
    in ``overflow_before``."""
    lines = []
    for u, loss in enumerate(losses, 1):
        lines += [OVERFLOW] * list(overflow_before).count(u)
        lines.append(inner(u, loss))
    return "\n".join(lines)


FP32 = [13.0 - 0.13 * u for u in range(30)]
REF = {u: round(l, 3) for u, l in enumerate(FP32, 1)}
LOW = [l + 0.01 for l in FP32]  # a reduced precision's: not identical to fp32's


def test_judge_training():
    judge = gpu_check.judge_training
    assert judge(log(FP32), 30, None)[0] is None
    reason, details = judge(log(LOW, overflow_before=(1, 2, 5)), 30, REF)
    assert reason is None and details["overflows"] == 3 and details["overflow_after_updates"] == [0, 1, 4]
    assert "first_rel" not in details  # a step was skipped before update 1: another batch
    reason, _ = judge(log(FP32, overflow_before=(7,)), 30, REF)
    assert "1 step(s) skipped for overflow after update 5" in reason
    reason, _ = judge(log(FP32[:29] + [float("nan")]), 30, REF)
    assert "not finite at update(s) [30]" in reason
    reason, _ = judge(log(FP32[:25]), 30, REF)
    assert "instead of 1..30" in reason
    # close to fp32: 2% off at the end passes (tolerance 3%), 5% does not; 3% off at update 1 fails
    assert judge(log([l * (1.02 if u > 20 else 1) for u, l in enumerate(FP32, 1)]), 30, REF)[0] is None
    reason, details = judge(log([l * (1.05 if u > 20 else 1) for u, l in enumerate(FP32, 1)]), 30, REF)
    assert "apart (tolerance 3%)" in reason and details["last10_rel"] == pytest.approx(0.05, abs=1e-3)
    reason, _ = judge(log([FP32[0] * 1.03] + FP32[1:]), 30, REF)
    assert reason.startswith("loss at update 1")
    assert "no fp32 reference" in judge(log(FP32), 30, {})[0]
    assert "the precision flag changed nothing" in judge(log(FP32), 30, REF)[0]


def test_compare_ep():
    one = "\n".join(inner(u, 10 - u) for u in range(1, 5))
    assert gpu_check.compare_ep(one, one, "cpu", 4)[0] is None
    two = "\n".join(inner(u, 10 - u, gnorm=0.5 if u != 3 else 0.51) for u in range(1, 5))
    reason, _ = gpu_check.compare_ep(one, two, "cpu", 4)
    assert reason.startswith("update 3: gnorm 0.51 on 2 ranks, 0.5 in one process")
    assert "expected 1..4" in gpu_check.compare_ep(one, "\n".join(one.splitlines()[:3]), "cpu", 4)[0]


def test_junit_counts(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite><testcase name="a"/><testcase name="b"><skipped message="needs CUDA"/>'
                   '</testcase><testcase name="c"><failure message="x"/></testcase></testsuite></testsuites>')
    assert gpu_check.junit_counts(xml) == (1, 1, 1, ["needs CUDA"])


def test_a_failed_check_makes_the_exit_status_1(tmp_path):
    ns = type("Args", (), {"out": str(tmp_path), "cpu_only": True, "budget": 480.0, "limit_scale": 1.0})()
    s = gpu_check.Session(ns)
    s.record("train:fp16", "skipped", "no CUDA")
    assert s.write()["exit_status"] == 0
    s.record("train:fp32", "failed", "exit status 1")
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["exit_status"] == 1 and report["summary"] == {"passed": 0, "failed": 1, "skipped": 1}


def test_unknown_check_is_refused():
    with pytest.raises(SystemExit) as err:
        gpu_check.main(["--only", "train:fp8"])
    assert err.value.code == 2


def test_benchmark_layer_dtypes():
    case = benchmark_layer.Case("m4-4-4", 64, torch.device("cpu"), phase="eval", dtype="bf16")
    assert {p.dtype for p in case.block.parameters()} == {torch.bfloat16} and case.x.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for ffn, _, _ in case.floor for p in ffn.parameters())
    r = benchmark_layer.time_case(case, "fwd", 1, 1, torch.device("cpu"), lambda s: None)
    assert r["dtype"] == "bf16" and r["device"] == "cpu" and r["ours_ms"] > 0
    assert "| dtype |" in benchmark_layer.table([r]) and "| bf16 |" in benchmark_layer.table([r])
    assert "| dtype |" not in benchmark_layer.table([dict(r, dtype="fp32")])  # the CPU tables as before


def test_cpu_part(tmp_path):
    """What CI runs: no CUDA, so fp32 training on CPU, expert parallelism over gloo and the CUDA
    tests collected and skipped; everything else skipped with its reason; exit status 0. (Short
    runs to stay near a minute of CPU: 10 updates, 2 expert-parallel updates, test_cuda.py only;
    left out: train:bf16, whose CPU run (--smoe-bf16) tests/test_precision.py covers, and the
    benchmark's CPU smoke run, tests/test_benchmark_layer.py runs that script.)"""
    cpu_part = [c for c in gpu_check.CHECKS if c not in ("train:bf16", "benchmark")]
    out = tmp_path / "gc"
    run = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--cpu-only", "--out", str(out), "--updates", "10",
         "--ep-updates", "2", "--only", ",".join(cpu_part), "--cuda-tests", "tests/test_cuda.py"],
        capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["complete"] and report["exit_status"] == 0 and report["machine"]["device"] == "cpu"
    checks = {c["name"]: c for c in report["checks"]}
    assert sorted(checks) == sorted(cpu_part)
    for p in (p for p in gpu_check.PRECISIONS if p != "bf16"):
        c = checks[f"train:{p}"]
        if p == "fp32":
            assert c["status"] == "passed" and c["emulated"] and c["device"] == "cpu", c
            assert len(c["details"]["losses"]) == 10 and c["details"]["overflows"] == 0
        else:
            assert c["status"] == "skipped" and c["reason"].startswith("no CUDA: "), c
    cuda = checks["cuda-tests"]
    assert cuda["status"] == "skipped" and cuda["reason"].startswith("no CUDA: all ")
    assert cuda["details"]["failed"] == cuda["details"]["passed"] == 0 and cuda["details"]["skipped"] >= 11
    assert any("needs CUDA" in r for r in cuda["details"]["skip_reasons"])
    ep = checks["expert-parallel"]
    assert ep["status"] == "passed" and ep["emulated"] and "gloo" in ep["reason"], ep
    assert report["summary"] == {"passed": 2, "failed": 0, "skipped": 5}
    # one line per check, then the summary, on stdout
    lines = run.stdout.splitlines()
    for name, c in checks.items():
        tag = {"passed": "[PASS]", "skipped": "[SKIP]"}[c["status"]]
        assert sum(l.startswith(tag) and l.split()[1] == name for l in lines) == 1, name
    assert any(l.startswith("# gpu-check summary: 2 passed, 0 failed, 5 skipped") for l in lines)
