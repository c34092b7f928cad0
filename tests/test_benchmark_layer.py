"""Correctness of scripts/benchmark_layer.py (no timing assertions).

The one-hot GShard baseline must compute exactly what the SMoE block computes on the same
routing, so the benchmark compares two implementations of one function; and the script must
run and emit the documented keys.
"""

import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: E401,E702

import json
import subprocess

import pytest
import torch

from fairseq_smoe.modules import SMoEBlock, SMoEConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import benchmark_layer  # noqa: E402

D, FFN = 8, 16
KEYS = {"config", "mode", "phase", "skew", "ours_ms", "floor_ms", "onehot_ms", "ours_over_floor",
        "onehot_over_ours", "ours_peak_mb", "onehot_peak_mb", "rows", "imbalance", "per_row_over_balanced",
        "experts_ms", "ours_over_experts", "passes_ms", "ours_over_passes", "passes_over_experts",
        "expert_runs"}


def _run(block, fn, x, gy, pad):
    block.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    out, st = fn(x, pad)
    torch.autograd.backward([out, st.aux_loss], [gy, torch.ones_like(st.aux_loss)])
    grads = {n: p.grad.clone() for n, p in block.named_parameters() if p.grad is not None}
    stats = (st.aux_loss.item(), st.dropped, st.assigned, st.passes_TB.clone(), st.routed_TB.clone())
    return out.detach(), x.grad, grads, stats


@pytest.mark.parametrize("training", (True, False))
@pytest.mark.parametrize("residual", ("official", "paper"))
@pytest.mark.parametrize("strata,kw", [
    ((4,), {}),
    ((2, 2), {}),
    ((2, 2, 2, 2), {}),
    ((1, 3), {}),
    ((4,), {"top1": True}),
    ((2, 2), {"eval_capacity_token_fraction": 0.3}),
])
def test_onehot_baseline_equals_block(strata, kw, residual, training):
    torch.manual_seed(0)
    cfg = SMoEConfig(D, FFN, strata, residual=residual, second_expert_policy="all", **kw)
    block = SMoEBlock(cfg).double().train(training)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(11, 5, D, generator=g, dtype=torch.float64)
    gy = torch.randn(11, 5, D, generator=g, dtype=torch.float64)
    pad = torch.zeros(5, 11, dtype=torch.bool)
    pad[1, 8:] = pad[3, 4:] = True

    ours = _run(block, block, x, gy, pad)
    onehot = _run(block, lambda x, p: benchmark_layer.onehot_smoe_forward(block, x, p), x, gy, pad)
    if training:
        assert ours[3][1] > 0, "capacity should drop some assignments in this setting"
    torch.testing.assert_close(onehot[0], ours[0], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(onehot[1], ours[1], atol=1e-12, rtol=1e-12)
    assert onehot[2].keys() == ours[2].keys()
    for name in ours[2]:
        # routers (the gates) run in fp32: their gradients agree to fp32 precision
        tol = 1e-5 if name.startswith("routers") else 1e-12
        torch.testing.assert_close(onehot[2][name], ours[2][name], atol=tol, rtol=tol, msg=name)
    assert any(name.startswith("routers") and ours[2][name].abs().sum() > 0 for name in ours[2])
    assert onehot[3][0] == pytest.approx(ours[3][0], rel=1e-6)
    assert onehot[3][1:3] == ours[3][1:3]
    assert torch.equal(onehot[3][3], ours[3][3]) and torch.equal(onehot[3][4], ours[3][4])


def test_peak_tracker_counts_new_storages_only():
    x = torch.randn(256, 256)  # 256 KiB
    cpu = torch.device("cpu")
    assert benchmark_layer.peak_mb(lambda: x + 1, cpu) == pytest.approx(0.25)
    assert benchmark_layer.peak_mb(lambda: (x.view(-1), x.t(), x.add_(0)), cpu) == 0.0
    assert benchmark_layer.peak_mb(lambda: [x + 1 for _ in range(3)], cpu) == pytest.approx(0.75)


def test_quick_json_emits_the_keys():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "benchmark_layer.py"), "--quick", "--json",
         "--configs", "m4-4-4,m4-2-2-2-2", "--tokens", "128"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    assert [(r["config"], r["mode"]) for r in results] == [
        (c, m) for c in ("m4-4-4", "m4-2-2-2-2") for m in ("fwd", "fwd_bwd")
    ]
    assert all(r["per_row_over_balanced"] == 1.0 and r["skew"] == "balanced" for r in results)
    for r in results:
        assert KEYS <= r.keys()
        assert r["ours_ms"] > 0 and r["floor_ms"] > 0 and r["onehot_ms"] > 0
        assert r["ours_over_floor"] == pytest.approx(r["ours_ms"] / r["floor_ms"], rel=1e-2)
        assert r["onehot_over_ours"] == pytest.approx(r["onehot_ms"] / r["ours_ms"], rel=1e-2)
        assert r["ours_peak_mb"] > 0 and r["onehot_peak_mb"] > 0
        assert r["experts_ms"] > 0
        assert r["ours_over_experts"] == pytest.approx(r["ours_ms"] / r["experts_ms"], rel=1e-2)
        assert r["ours_over_passes"] == pytest.approx(r["ours_ms"] / r["passes_ms"], rel=1e-2)


def test_config_names():
    assert list(benchmark_layer.CONFIGS) == ["m4-4-4", "m4-2-2-2-2", "m15-4-12", "m15-4-4-4-4",
                                             "m4-4-4-w1024-3072"]
    for name, (d, ffn, strata, *widths) in benchmark_layer.CONFIGS.items():
        size, *rest = name.split("-w")[0].split("-")
        assert tuple(int(s) for s in rest) == strata
        assert (d, ffn, sum(strata)) == {"m4": (512, 2048, 8), "m15": (1024, 4096, 16)}[size]
        if widths:  # as many expert parameters as the uniform config
            assert sum(n * f for n, f in zip(strata, widths[0])) == sum(strata) * ffn


def test_mixed_width_floor_runs_each_width_over_its_rows():
    case = benchmark_layer.Case("m4-4-4-w1024-3072", 128, torch.device("cpu"), phase="eval")
    widths = sorted(ffn[0].out_features for ffn, _, _ in case.floor)
    assert widths == [1024, 3072] and sum(x.size(0) for _, x, _ in case.floor) == case.rows
    assert not case.has_onehot
    r = benchmark_layer.time_case(case, "fwd", 1, 1, torch.device("cpu"), lambda s: None)
    assert r["onehot_ms"] is None and r["ours_ms"] > 0 and r["floor_ms"] > 0


def test_experts_variant_runs_each_expert_over_its_own_rows():
    """The 'experts' variant: one FFN per expert, of the expert's width, over exactly the rows
    the block computed in that expert (skewed: some experts have none)."""
    case = benchmark_layer.Case("m4-4-4-w1024-3072", 128, torch.device("cpu"), skew="two", phase="train")
    _, st = case.block(case.x, trace=True)
    assert [rows for _, rows in case.experts] == st.expert_rows
    assert [ffn[0].out_features for ffn, _ in case.experts] == [1024] * 4 + [3072] * 4
    assert case.x_experts.size(0) == case.rows and 0 in st.expert_rows
    for p in case._params("experts"):
        p.grad = None
    case.call("experts", "fwd_bwd")
    busy = [ffn for ffn, rows in case.experts if rows > 0]
    idle = [ffn for ffn, rows in case.experts if rows == 0]
    assert all(f[0].weight.grad is not None and f[0].weight.grad.abs().sum() > 0 for f in busy)
    assert all(f[0].weight.grad is None or f[0].weight.grad.abs().sum() == 0 for f in idle)


@pytest.mark.parametrize("skew", ["balanced", "two"])
def test_passes_variant_runs_each_pass_experts_over_that_pass_rows(skew):
    """The 'passes' variant: per strata pass, each expert that computed rows there, over exactly
    those rows (balanced: second-stratum experts run at both passes); its rows sum to the
    experts' rows, and an expert idle at every pass still runs once ('two': its zero gradient)."""
    case = benchmark_layer.Case("m4-4-4", 256, torch.device("cpu"), skew=skew, phase="train")
    _, st = case.block(case.x, trace=True)
    assert len(st.trace) == 2
    per_pass = [torch.bincount(tr.experts_Kn[tr.kept_Kn], minlength=8).tolist() for tr in st.trace]
    busy = [(e, r) for counts in per_pass for e, r in enumerate(counts) if r > 0]
    idle = [(e, 0) for e in range(8) if per_pass[0][e] + per_pass[1][e] == 0]
    assert case.pass_chunks == busy + idle
    assert sum(r for _, r in case.pass_chunks) == case.rows == case.x_experts.size(0)
    reached_twice = [e for e in range(4, 8) if per_pass[0][e] > 0 and per_pass[1][e] > 0]
    assert (len(reached_twice) == 4, len(idle) == 4) == ((True, False) if skew == "balanced" else (False, True))
    for e in range(8):
        assert sum(r for g, r in case.pass_chunks if g == e) == st.expert_rows[e]
    case.call("passes", "fwd_bwd")
    for e, (ffn, rows) in enumerate(case.experts):
        g = ffn[0].weight.grad
        assert g is not None and bool(g.abs().sum() > 0) == (rows > 0)


@pytest.mark.parametrize("skew,lo,hi", [("balanced", 1.0, 1.6), ("zipf", 2.0, 4.5), ("two", 4.0, 4.0)])
def test_skews_load_the_experts_as_documented(skew, lo, hi):
    """m4 sizes (8 experts): 'two' puts every first-pass assignment on 2 experts (the busiest
    gets V/2 = 4x the mean), 'zipf' a few times the mean, 'balanced' near 1."""
    case = benchmark_layer.Case("m4-4-4", 256, torch.device("cpu"), skew=skew, phase="eval")
    assert lo <= case.imbalance <= hi
    assert case.drop_frac == 0.0  # eval: no capacity


def test_skewed_onehot_baseline_still_equals_the_block():
    torch.manual_seed(0)
    block = SMoEBlock(SMoEConfig(D, FFN, (2, 2), second_expert_policy="all")).double().train()
    benchmark_layer.skew_router(block, "zipf")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(11, 5, D, generator=g, dtype=torch.float64)
    gy = torch.randn(11, 5, D, generator=g, dtype=torch.float64)
    ours = _run(block, block, x, gy, None)
    onehot = _run(block, lambda x, p: benchmark_layer.onehot_smoe_forward(block, x, p), x, gy, None)
    torch.testing.assert_close(onehot[0], ours[0], atol=1e-12, rtol=1e-12)
    assert onehot[3][1:3] == ours[3][1:3] and ours[3][1] > 0  # the same drops, and some


def test_cpu_gemm_benchmark_times_the_same_product_in_both_layouts(capsys):
    import benchmark_cpu_gemm

    rows = benchmark_cpu_gemm.layout_rows(8, 16, reps=1, rows=(3, 5))
    assert [(name, r) for name, r, _, _ in rows] == [("8 -> 16", 3), ("8 -> 16", 5), ("16 -> 8", 3), ("16 -> 8", 5)]
    assert all(a > 0 and b > 0 for _, _, a, b in rows)
    mem = benchmark_cpu_gemm.memory_rows(8, 16, 2, reps=1)
    assert [(shape, mb) for shape, mb, _, _ in mem] == [((2, 16, 8), 2 * 16 * 8 * 4 / 2**20), ((16, 8), 16 * 8 * 4 / 2**20)]
    onednn = benchmark_cpu_gemm.has_onednn_linear()  # torch's CPU wheel has it
    if onednn:  # (the product itself is checked inside)
        packed = benchmark_cpu_gemm.prepacked_rows(8, 16, reps=1, rows=(3,))
        assert [(name, r) for name, r, _, _ in packed] == [("8 -> 16", 3), ("16 -> 8", 3)]
    benchmark_cpu_gemm.main(["--d", "8", "--ffn", "16", "--experts", "2", "--reps", "1", "--rows", "3,5"])
    out = capsys.readouterr().out
    n = 7 if onednn else 5  # 5 layout rows per direction, then 2 repacking rows
    assert out.count("| 8 -> 16 |") == n and out.count("| 16 -> 8 |") == n and "| [2, 16, 8] |" in out
    assert not onednn or "| 8 -> 16 | 5 |" in out.split("prepacked (oneDNN) ms")[1]
