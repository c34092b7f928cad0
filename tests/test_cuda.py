"""The SMoE block and the model end to end on CUDA (issue 25; ``pytest -m cuda``, run by
scripts/gpu_check.sh). Without CUDA every test here marked ``cuda`` skips, saying why; the
float64-reference harness itself also runs on CPU (``test_reference_harness_on_cpu``) so that it
is known to work before a GPU runs it.

* Block forward and backward in fp32, fp16, bf16 (a model cast to the dtype: ``--fp16``-style) and
  under autocast (``--amp``-style: fp32 weights, experts in the autocast dtype) against a float64
  reference on CPU, 4096 tokens, strata 2,2, evaluation mode (no capacity: tokens are independent).
  Both start from the same values (the low-precision weights and input, upcast), so what is
  measured is the arithmetic alone. A token whose routing differs between the two (a near tie
  flipped by rounding) is left out of the comparison, and of the backward (its output gradient
  is 0 in both), so the two compute the same function; at least ``MIN_AGREE`` of the tokens must
  route alike. Error = ||a - ref|| / ||ref|| over the output, the input gradient and every
  parameter's gradient, within ``TOL[dtype]`` (unit roundoff: fp32 2^-24, fp16 2^-11, bf16 2^-8;
  calibrated on CPU, where the loop path gives a fifth of it or less, see TOL). The bf16
  gradient tolerance, 3%, is below the error of finding 1 (bias gradients summed in bf16: 4.5% and
  7.8%). An idle expert's gradient must be exactly 0 when the reference's is.
* Host reads per forward and backward under ``torch.cuda.set_sync_debug_mode``: the forward
  synchronizes exactly once per pass (``host_sync.read_to_host``), the backward never.
* Generation bit for bit the same on two runs, and ``SMoETranslator`` on ``cuda`` against
  ``cpu``, on a tiny model trained on the GPU from the committed Bible fixture.
"""

import copy
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fairseq_smoe.modules import SMoEBlock, SMoEConfig  # noqa: E402
from fairseq_smoe.modules.host_sync import host_reads  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA (torch.cuda.is_available() is False)")
FIXTURE = ROOT / "tests" / "fixtures" / "bible"
PLUGIN = str(ROOT / "fairseq_smoe")

D, FFN, STRATA = 128, 256, (2, 2)
T, B = 128, 32  # 4096 tokens
MIN_AGREE = 0.95
# relative L2 error against float64: (output, gradients). Measured on CPU (loop path, this
# setting), largest of the output / of any gradient: fp32 2.2e-7 / 1.3e-6; autocast-fp16 2.8e-4 /
# 1.7e-3; autocast-bf16 2.2e-3 / 6.0e-3; fp16 and bf16 models 4.7e-4 / 1.5e-3 and 3.8e-3 / 5.8e-3
# but for the LayerNorms' weight and bias, whose CPU backward sums 4096 rows poorly in those
# dtypes (1e-2 and 7.6e-2, the LayerNorm alone shows it; CUDA's kernel accumulates in fp32).
TOL = {
    "fp32": (1e-5, 1e-4),
    "fp16": (3e-3, 1e-2),
    "bf16": (2e-2, 3e-2),
    "autocast-fp16": (3e-3, 1e-2),
    "autocast-bf16": (2e-2, 3e-2),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _block(seed=0, relu_margin=True):
    """The block compared with float64. ``relu_margin``: the experts' first biases shifted by 3
    standard deviations of their pre-activations (which are about N(0, 1/3) at this init), so that
    rounding seldom flips a ReLU: a flipped unit changes its gradient by O(1), and with the usual
    init such flips alone make 4% of the expert gradients' norm in bf16 (measured on CPU)."""
    torch.manual_seed(seed)
    block = SMoEBlock(SMoEConfig(embed_dim=D, ffn_dim=FFN, strata=STRATA, second_expert_policy="all"))
    if relu_margin:
        with torch.no_grad():
            block.experts.b1.add_(3 * (1 / 3) ** 0.5)
    return block


def _signature(stats, N):
    """Per token, the experts of each of its passes (-1: no such pass): ``[L, K, N]``."""
    sig = torch.full((len(STRATA), 2, N), -1, dtype=torch.long)
    for tr in stats.trace:
        rows = slice(None) if tr.rows_n is None else tr.rows_n.cpu()
        sig[tr.stratum][:, rows] = tr.experts_Kn.cpu()
    return sig


def _forward(block, x, autocast_dtype=None):
    x = x.detach().requires_grad_()
    if autocast_dtype is None:
        out, stats = block(x, trace=True)
    else:
        with torch.autocast(x.device.type, dtype=autocast_dtype):
            out, stats = block(x, trace=True)
    return x, out, stats


def _rel(a, ref):
    a, ref = a.detach().double().cpu(), ref.detach().double().cpu()
    return float((a - ref).norm() / ref.norm())


def compare_with_float64(mode, device):
    """(errors by name, agreeing fraction) of the block in ``mode`` (``fp16``, ``autocast-bf16``,
    ...) on ``device`` against float64 on CPU, forward and backward."""
    autocast_dtype = DTYPES[mode.split("-")[1]] if mode.startswith("autocast-") else None
    dtype = torch.float32 if autocast_dtype is not None else DTYPES[mode]
    base = _block().eval()
    low = copy.deepcopy(base).to(device, dtype)
    ref = copy.deepcopy(low).to("cpu", torch.float64)  # the very values of ``low``, upcast
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, B, D, generator=g).to(dtype)
    gy = torch.randn(T, B, D, generator=g, dtype=torch.float64)

    x_low, out_low, st_low = _forward(low, x.to(device), autocast_dtype)
    x_ref, out_ref, st_ref = _forward(ref, x.double())
    N = T * B
    agree_N = (_signature(st_low, N) == _signature(st_ref, N)).all(0).all(0)
    agree_TB1 = agree_N.view(T, B, 1)
    gy = gy * agree_TB1  # tokens routed differently take no part in the backward
    out_low.backward(gy.to(device, out_low.dtype))
    out_ref.backward(gy)
    keep = agree_TB1.expand(T, B, D)
    errors = {"output": _rel(out_low.cpu()[keep], out_ref[keep]), "input grad": _rel(x_low.grad, x_ref.grad)}
    for (name, p), p_ref in zip(low.named_parameters(), ref.parameters()):
        assert p.grad is not None and p.grad.dtype == p.dtype, name
        if p_ref.grad.abs().max() == 0:  # e.g. an expert no agreeing token reached
            assert torch.equal(p.grad.cpu(), torch.zeros_like(p.grad.cpu())), f"{name}: not exactly 0"
            continue
        errors[name] = _rel(p.grad, p_ref.grad)
    return errors, float(agree_N.double().mean())


def assert_within(errors, agree, mode):
    out_tol, grad_tol = TOL[mode]
    assert agree >= MIN_AGREE, f"{mode}: only {agree:.3f} of the tokens routed as in float64"
    bad = {n: f"{e:.2e}" for n, e in errors.items()
           if e > (out_tol if n == "output" else grad_tol) or e != e}
    assert not bad, f"{mode}: relative error over tolerance (output {out_tol:g}, gradients {grad_tol:g}): {bad}"


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("mode", list(TOL))
def test_block_forward_and_backward_against_float64(mode):
    if "bf16" in mode and not torch.cuda.is_bf16_supported():
        pytest.skip(f"{torch.cuda.get_device_name()} has no bf16")
    errors, agree = compare_with_float64(mode, "cuda")
    assert_within(errors, agree, mode)


@pytest.mark.parametrize("mode,wrong", [("fp32", 1.001), ("autocast-bf16", 1.045)])
def test_reference_harness_on_cpu(mode, wrong, monkeypatch):
    """The same comparison on CPU (the loop path): the harness runs and the tolerances hold, and
    it fails when the expert bias gradients are off by ``wrong`` (in bf16 by finding 1's 4.5%).
    (The fp16 and bf16 models are left out here: CPU's LayerNorm backward, see TOL.)"""
    errors, agree = compare_with_float64(mode, "cpu")
    assert_within(errors, agree, mode)
    from fairseq_smoe.modules import experts

    exact = experts.grouped_weight_grad

    def off(x, g, chunks, gw, gb, fresh, counts_V=None):
        seen = list(fresh)
        exact(x, g, chunks, gw, gb, fresh, counts_V)
        for e, first in enumerate(seen):
            if first and not fresh[e] and gb.dtype != torch.float64:  # the block under test, once
                gb[e].mul_(wrong)

    monkeypatch.setattr(experts, "grouped_weight_grad", off)
    errors, agree = compare_with_float64(mode, "cpu")
    with pytest.raises(AssertionError, match=r"experts\.b[12]"):
        assert_within(errors, agree, mode)


# ----------------------------------------------------------------------------- host reads


class SyncCount:
    """Counts CUDA's synchronizing operations (``set_sync_debug_mode("warn")``) while active."""

    def __enter__(self):
        self._catch = warnings.catch_warnings(record=True)
        self.warnings = self._catch.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode("default")
        self._catch.__exit__(*exc)

    @property
    def count(self):
        return sum("synchroniz" in str(w.message) for w in self.warnings)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("training", (True, False))
@pytest.mark.parametrize("dtype", ("fp32", "bf16"))
def test_host_reads_per_forward_and_backward(training, dtype):
    """Forward: one synchronization per pass, the deliberate read_to_host; backward: none (run
    under set_sync_debug_mode("error"), where any would raise). bf16 takes torch._grouped_mm on
    sm 9.x/10.x, whose offsets must come from device counts."""
    if dtype == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip(f"{torch.cuda.get_device_name()} has no bf16")
    torch.manual_seed(0)
    block = SMoEBlock(SMoEConfig(D, FFN, (2, 2, 2, 2))).to("cuda", DTYPES[dtype]).train(training)
    pad = torch.zeros(B, T, dtype=torch.bool, device="cuda")
    pad[3, T // 2:] = True
    x = torch.randn(T, B, D, device="cuda", dtype=DTYPES[dtype])
    for _ in range(2):  # warm-up (lazy initialisations), then measured
        xg = x.detach().requires_grad_()
        torch.cuda.synchronize()
        before = host_reads()
        with SyncCount() as syncs:
            out, stats = block(xg, pad, trace=True)
        reads = host_reads() - before
        loss = out.float().sum() + stats.aux_loss
        torch.cuda.set_sync_debug_mode("error")
        try:
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
    passes = len(stats.trace)
    assert passes >= 2 and reads == passes
    assert syncs.count == passes, f"{syncs.count} synchronizations in a forward of {passes} passes"
    assert xg.grad is not None and torch.isfinite(xg.grad).all()


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny SMoE model trained 60 updates on the GPU (fp32) from the Bible fixture."""
    from data_prep.spm_binarize import prepare

    tmp = tmp_path_factory.mktemp("cuda_e2e")
    data = tmp / "data"
    prepare(FIXTURE, ["en-de"], data, vocab_size=1000)
    save = tmp / "ckpt"
    run = subprocess.run(
        [sys.executable, "-m", "fairseq_cli.train", data / "data-bin", "--user-dir", PLUGIN,
         "--task", "smoe_translation", "--lang-pairs", "en-de,de-en", "--langs", "de,en",
         "--encoder-langtok", "tgt", "--decoder-langtok", "--arch", "smoe_transformer_tiny",
         "--smoe-strata", "2,2", "--moe-expert-count", "4", "--criterion", "smoe_label_smoothed_cross_entropy",
         "--label-smoothing", "0.1", "--share-all-embeddings", "--dropout", "0", "--optimizer", "adam",
         "--lr", "5e-3", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "20", "--max-tokens", "2048",
         "--max-update", "60", "--num-workers", "0", "--seed", "1", "--disable-validation",
         "--no-epoch-checkpoints", "--distributed-world-size", "1", "--save-dir", save],
        capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    sources = (data / "raw" / "test.en-de.en").read_text(encoding="utf-8").splitlines()
    return {"data": data, "ckpt": save / "checkpoint_last.pt", "sources": sources}


def _encoder_out(tr, sentences):
    """The encoder's output for ``sentences`` (en -> de), on the translator's device."""
    task = tr.task("en", "de")
    sample = next(iter(tr.batches(task, tr._inference_dataset(task, sentences))))
    net = {k: v.to(tr.device) for k, v in sample["net_input"].items() if torch.is_tensor(v)}
    with torch.no_grad():
        enc = tr.model.encoder(net["src_tokens"], src_lengths=net["src_lengths"])
    return enc["encoder_out"][0].float().cpu()


@pytest.mark.cuda
@needs_cuda
def test_translator_on_cuda_agrees_with_cpu(trained):
    from fairseq_smoe import SMoETranslator

    gpu = SMoETranslator(trained["ckpt"], trained["data"], device="cuda")
    cpu = SMoETranslator(trained["ckpt"], trained["data"], device="cpu")
    assert all(p.is_cuda for p in gpu.model.parameters())
    src = trained["sources"]
    out_gpu, out_cpu = gpu.translate(src, "en", "de", beam=3), cpu.translate(src, "en", "de", beam=3)
    assert len(out_gpu) == len(src) == 45 and all(isinstance(o, str) for o in out_gpu)
    # fp32 on both: the same hypotheses but where rounding flips a near tie in the beam
    same = sum(a == b for a, b in zip(out_gpu, out_cpu))
    assert same >= 0.9 * len(src), f"only {same} of {len(src)} translations equal CPU's"
    # the encoder's states (an SMoE block among its layers) within fp32 rounding at 99% of the
    # positions: a token whose routing a near tie flips between the devices differs as a whole
    enc_gpu, enc_cpu = _encoder_out(gpu, src[:16]), _encoder_out(cpu, src[:16])
    assert enc_gpu.shape == enc_cpu.shape
    close = ((enc_gpu - enc_cpu).abs() <= 1e-4 + 1e-4 * enc_cpu.abs()).all(-1)
    assert close.double().mean() >= 0.99, f"{int((~close).sum())} of {close.numel()} positions differ"
    routing = gpu.route(src[0], "en", "de", beam=3)
    assert routing.blocks and isinstance(routing.translation, str)


@pytest.mark.cuda
@needs_cuda
def test_generation_is_bit_for_bit_the_same_on_two_runs(trained):
    from fairseq_smoe import SMoETranslator

    tr = SMoETranslator(trained["ckpt"], trained["data"], device="cuda")
    src = trained["sources"]
    task = tr.task("en", "de")
    runs = []
    for _ in range(2):
        dataset = tr._inference_dataset(task, src)
        runs.append([(i, tokens.tolist()) for i, tokens, _, _ in tr.decode(task, tr.batches(task, dataset), beam=3)])
    assert runs[0] == runs[1] and len(runs[0]) == len(src)
    assert torch.equal(_encoder_out(tr, src[:16]), _encoder_out(tr, src[:16]))
    assert tr.translate(src, "en", "de", beam=3) == tr.translate(src, "en", "de", beam=3)
