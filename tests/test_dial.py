"""The compute dial (--smoe-max-passes K at evaluation/generation) and elastic-pass training."""

import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: E401,E702

import pytest
import torch

import fairseq_smoe  # noqa: F401
from fairseq import options, tasks
from fairseq_smoe.modules import SMoEBlock, SMoEConfig

D, FFN = 8, 16


def block(strata=(2, 2, 2, 2), seed=0, **kw):
    torch.manual_seed(seed)
    return SMoEBlock(SMoEConfig(D, FFN, strata, second_expert_policy="all", **kw)).double()


def x(T=9, B=4, seed=1):
    return torch.randn(T, B, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("residual", ("official", "paper"))
def test_k_equal_l_is_the_model_exactly(residual):
    b = block(residual=residual).eval()
    ref, st = b(x())
    b.set_max_passes(4)
    out, st4 = b(x())
    assert torch.equal(out, ref) and torch.equal(st4.passes_TB, st.passes_TB)
    assert st.passes_TB.max() > 2  # the routing does use more than 2 passes here


@pytest.mark.parametrize("k", (1, 2, 3))
def test_k_caps_every_token_and_keeps_shorter_paths(k):
    b = block().eval()
    _, free = b(x())
    b.set_max_passes(k)
    out, capped = b(x())
    assert torch.equal(capped.passes_TB, free.passes_TB.clamp(max=k))
    # official mode: every token still leaves through the exit LayerNorm
    torch.testing.assert_close(out.mean(-1), torch.zeros(9, 4, dtype=torch.float64), atol=1e-6, rtol=0)
    # a token whose path is at most k passes is computed exactly as without the cap
    short = free.passes_TB <= k
    ref, _ = block().eval()(x())
    # (to the fp32 router's rounding: the later passes now see fewer rows)
    torch.testing.assert_close(out[short], ref[short], atol=1e-6, rtol=0)


def test_k_one_is_one_pass_and_the_cap_is_off_in_training():
    b = block()
    b.set_max_passes(1)
    _, st = b.eval()(x())
    assert (st.passes_TB == 1).all()
    _, st_train = b.train()(x())
    assert st_train.passes_TB.max() > 1  # training forwards are not capped


def test_k_outside_1_to_l_is_refused():
    for k in (0, 5):
        with pytest.raises(ValueError, match="--smoe-max-passes must be in 1..4"):
            block().set_max_passes(k)


def test_elastic_training_gives_tokens_random_budgets():
    """Each token leaves after its own random budget K in 1..L: fewer passes on average than
    the unbudgeted routing, and tokens capped at 1 pass appear although the router would keep
    them; evaluation is unaffected."""
    plain, elastic = block(), block(elastic_passes=True)
    torch.manual_seed(3)
    _, st_plain = plain.train()(x(T=40))
    torch.manual_seed(3)
    _, st_el = elastic.train()(x(T=40))
    assert st_el.passes_TB.float().mean() < st_plain.passes_TB.float().mean() - 0.2
    assert (st_el.passes_TB <= st_plain.passes_TB).all()
    assert set(st_el.passes_TB.unique().tolist()) == {1, 2, 3, 4}
    out_e, _ = elastic.eval()(x())
    out_p, _ = plain.eval()(x())
    assert torch.equal(out_e, out_p)


def build_task(data, *extra):
    argv = [str(data), "--task", "smoe_translation", "--lang-pairs", "en-de,de-en", "--langs", "en,de",
            "--encoder-langtok", "tgt", "--decoder-langtok", "--arch", "smoe_transformer_tiny",
            "--smoe-strata", "2,2", "--cpu", *extra]
    args = options.parse_args_and_arch(options.get_training_parser(), input_args=argv)
    task = tasks.setup_task(args)
    return task, task.build_model(args)


def test_task_flag_sets_the_dial_on_every_block(dict_dir):
    _, model = build_task(dict_dir, "--smoe-max-passes", "1")
    blocks = model.smoe_blocks("encoder") + model.smoe_blocks("decoder")
    assert blocks and all(b.max_passes == 1 for b in blocks)
    with pytest.raises(ValueError, match=r"--smoe-max-passes 3: .* 2 strata; give a pass budget K in 1\.\.2"):
        build_task(dict_dir, "--smoe-max-passes", "3")


def test_dial_cli_tabulates_every_k_with_the_measured_flops(dict_dir, tmp_path, monkeypatch):
    """python -m fairseq_smoe.dial: one evaluation per K = 1..L with --smoe-max-passes K (the
    evaluator itself is tested in test_translator.py), means over directions, and FLOPs per
    token from the cost tool with the measured passes."""
    from fairseq_smoe import dial as dial_module, evaluate as evaluate_module
    from fairseq_smoe.cost import count, shape_from_args
    from tiny import build_tiny, save_checkpoint

    task, model, _ = build_tiny(dict_dir, "--smoe-strata", "2,2")
    ckpt = tmp_path / "m.pt"
    save_checkpoint(model, task.args, ckpt)
    args, vocab = task.args, len(task.source_dictionary)
    calls = []

    def fake_evaluate(checkpoint, data_dir, out_dir, beam, lenpen, max_tokens, cpu, max_passes):
        calls.append(max_passes)
        k = max_passes
        return [{"chrf": 10.0 * k, "bleu": k, "spm_bleu": k, "rc_enc": 1.0 + 0.2 * (k - 1),
                 "rc_dec": 1.0 + 0.4 * (k - 1)},
                {"chrf": 20.0 * k, "bleu": 3 * k, "spm_bleu": k, "rc_enc": 1.0, "rc_dec": 1.0}], ""

    monkeypatch.setattr(evaluate_module, "evaluate", fake_evaluate)
    rows = dial_module.dial(ckpt, tmp_path, tmp_path / "dial")
    assert calls == [1, 2] and [r["k"] for r in rows] == [1, 2]
    assert rows[1]["chrf"] == 30.0 and rows[1]["passes_enc"] == pytest.approx(1.1)
    shape = shape_from_args(args, vocab)
    assert rows[1]["flops_per_token"] == pytest.approx(count(shape, [1.1], [1.2])[1])
    assert rows[0]["flops_per_token"] < rows[1]["flops_per_token"]
    text = (tmp_path / "dial" / "dial.csv").read_text()
    assert text.splitlines()[0].startswith("k,chrf,bleu") and len(text.splitlines()) == 3
    assert (tmp_path / "dial" / "dial.png").read_bytes()[:4] == b"\x89PNG"
