"""Decoding in one process (fairseq_smoe.translator, used by the evaluator and the Python API)
against stock fairseq-generate, on two tiny SMoE models trained on the committed Bible fixture
with non-default language setups:

* ``lang_dict``: ``--lang-dict`` in an order that is not the sorted ``--langs`` order (issue 9:
  the evaluator raised TypeError; a sorted list would give the wrong language-token ids);
* ``mbart``: ``--lang-tok-style mbart --lang-tok-replacing-bos-eos`` (``[de]`` tokens, one more
  dictionary entry, language tokens replacing eos/bos): decoding with the default style fails
  to load or, with the style but without the replacing, silently feeds other tokens.
"""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_prep.spm_binarize import prepare  # noqa: E402
from fairseq_smoe import SMoETranslator  # noqa: E402
from fairseq_smoe.evaluate import decode_direction, evaluate  # noqa: E402
from fairseq_smoe.translator import TranslatorError  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "bible"
PLUGIN = str(ROOT / "fairseq_smoe")
BEAM = 3


def language_flags(data, kind):
    if kind == "lang_dict":
        return ["--lang-dict", data / "lang_order.txt", "--encoder-langtok", "tgt", "--decoder-langtok"]
    return ["--langs", "de,en", "--lang-tok-style", "mbart", "--lang-tok-replacing-bos-eos",
            "--encoder-langtok", "tgt", "--decoder-langtok"]


def task_flags(data, kind):
    return ["--task", "smoe_translation", "--lang-pairs", "en-de,de-en", *language_flags(data, kind)]


def run(tool, *args):
    out = subprocess.run([sys.executable, "-m", f"fairseq_cli.{tool}", *map(str, args)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-4000:]
    return out.stdout


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("translator")
    data = tmp / "data"
    prepare(FIXTURE, ["en-de"], data, vocab_size=1000)
    assert (data / "langs.txt").read_text().strip() == "de,en"
    (data / "lang_order.txt").write_text("en\nde\n")  # not the sorted order
    ckpt = {}
    for kind in ("lang_dict", "mbart"):
        save = tmp / f"ckpt_{kind}"
        run("train", data / "data-bin", "--user-dir", PLUGIN, *task_flags(data, kind),
            "--arch", "smoe_transformer_tiny", "--smoe-strata", "2,2", "--moe-expert-count", "4",
            "--criterion", "smoe_label_smoothed_cross_entropy", "--label-smoothing", "0.1",
            "--share-all-embeddings", "--dropout", "0", "--optimizer", "adam", "--lr", "5e-3",
            "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "20", "--max-tokens", "2048",
            "--max-update", "120", "--cpu", "--num-workers", "0", "--seed", "1",
            "--disable-validation", "--no-epoch-checkpoints", "--save-dir", save)
        ckpt[kind] = save / "checkpoint_last.pt"
    return {"tmp": tmp, "data": data, "ckpt": ckpt, "translators": {}}


def translator(setup, kind):
    if kind not in setup["translators"]:
        setup["translators"][kind] = SMoETranslator(setup["ckpt"][kind], setup["data"], device="cpu")
    return setup["translators"][kind]


def decoded(setup, kind, src, tgt):
    key = ("decoded", kind, src, tgt)
    if key not in setup:
        setup[key] = decode_direction(translator(setup, kind), src, tgt, BEAM, 1.0)
    return setup[key]


def fairseq_generate(setup, kind, src, tgt):
    """Stock fairseq-generate with the training task's flags: {id: D- line text}, BLEU4 line."""
    data = setup["data"]
    out = run("generate", data / "data-bin", "--user-dir", PLUGIN, *task_flags(data, kind),
              "--source-lang", src, "--target-lang", tgt, "--path", setup["ckpt"][kind],
              "--gen-subset", "test", "--beam", BEAM, "--max-tokens", 4096, "--seed", 1,
              "--bpe", "sentencepiece", "--sentencepiece-model", data / "spm.model",
              "--num-workers", 0, "--cpu")
    lines = re.findall(r"^D-(\d+)\t([^\t]*)\t(.*)$", out, re.M)
    hyps = {int(i): text for i, _, text in lines}
    (bleu4,) = re.findall(r"^Generate test with beam=\d+: (BLEU4 = .*)$", out, re.M)
    return hyps, bleu4, [float(score) for _, score, _ in lines]


def raw(setup, src, tgt, lang):
    return (setup["data"] / "raw" / f"test.{src}-{tgt}.{lang}").read_text(encoding="utf-8").splitlines()


@pytest.mark.parametrize("kind,src,tgt", [("lang_dict", "en", "de"), ("mbart", "de", "en")])
def test_decoding_equals_fairseq_generate(setup, kind, src, tgt):
    """Same hypotheses and the same BLEU4 (the paper's spm_bleu: SentencePiece ids, language
    tag included) as fairseq-generate run with the training task's flags."""
    expected, bleu4, scores = fairseq_generate(setup, kind, src, tgt)
    got = decoded(setup, kind, src, tgt)
    assert len(expected) == 45 and got.hyps == expected
    assert got.bleu4 == bleu4
    assert got.spm_bleu == float(re.match(r"BLEU4 = ([\d.]+),", bleu4).group(1))
    # the model does look at its input: hypothesis scores differ between sentences (a model this
    # small may still print one hypothesis for many of them after 120 updates)
    assert len(set(scores)) > 10


@torch.no_grad()
def test_passes_equal_a_separate_teacher_forced_run(setup):
    """rc_enc / rc_dec, measured batch by batch during decoding, equal a separate run as the
    evaluator did it before: a freshly loaded model over the whole test set of the training
    task (all directions in one dataset), teacher-forced."""
    from fairseq import checkpoint_utils

    from fairseq_smoe.modules.stats import recording

    kind, src, tgt = "lang_dict", "en", "de"
    (model,), _, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(setup["ckpt"][kind])], arg_overrides={"data": str(setup["data"] / "data-bin")})
    model.eval()
    task.load_dataset("test")
    direction = task.direction_names.index(f"{src}-{tgt}")
    totals = {"encoder": [0.0, 0.0], "decoder": [0.0, 0.0]}
    for sample in task.get_batch_iterator(dataset=task.dataset("test"), max_tokens=4096).next_epoch_itr(shuffle=False):
        with recording() as rec:
            model(**sample["net_input"])
        mine = sample["direction"] == direction
        for side, acc in totals.items():
            for b in rec.blocks(side):
                acc[0] += float(b.passes_TB[:, mine].sum())
                acc[1] += float(b.routed_TB[:, mine].sum())
    got = decoded(setup, kind, src, tgt).passes
    assert set(got) == {"encoder", "decoder"}
    for side, (p, t) in totals.items():
        assert t > 0 and got[side] == pytest.approx(p / t, rel=1e-12)


def test_evaluate_lang_dict_and_mbart_models(setup):
    """issue 9: both checkpoints evaluate end to end (TypeError / size mismatch before), and the
    API's translate() gives exactly the evaluator's hypotheses for the raw test text."""
    for kind in ("lang_dict", "mbart"):
        out = setup["tmp"] / f"eval_{kind}"
        rows, _ = evaluate(setup["ckpt"][kind], setup["data"], out, beam=BEAM, cpu=True)
        assert [r["direction"] for r in rows] == ["en-de", "de-en"]
        for r in rows:
            assert r["lines"] == 45 and 1.0 <= r["rc_enc"] <= 2.0 and 1.0 <= r["rc_dec"] <= 2.0
        src, tgt = ("en", "de") if kind == "lang_dict" else ("de", "en")
        hyps = (out / f"hyp.{src}-{tgt}.{tgt}").read_text(encoding="utf-8").splitlines()
        assert translator(setup, kind).translate(raw(setup, src, tgt, src), src, tgt, beam=BEAM) == hyps


def reference_task(setup, kind, src, tgt):
    """The task exactly as fairseq parses the training command line (not from the checkpoint)."""
    from fairseq import options, tasks

    data = setup["data"]
    argv = [str(data / "data-bin"), *map(str, task_flags(data, kind)), "--arch", "smoe_transformer_tiny",
            "--source-lang", src, "--target-lang", tgt, "--cpu"]
    args = options.parse_args_and_arch(options.get_training_parser(), input_args=argv)
    # fairseq-train fills these in from the architecture when it builds the model
    args.max_source_positions = args.max_target_positions = 1024
    return tasks.setup_task(args)


@pytest.mark.parametrize("kind", ["lang_dict", "mbart"])
def test_decoding_reads_the_training_language_tokens(setup, kind):
    """The decoding task feeds the model exactly the tokens of the training command line's task:
    same dictionary (with its language tokens), same source, decoder input and target of every
    test sentence, same forced first token."""
    dec = translator(setup, kind).task("en", "de")
    ref = reference_task(setup, kind, "en", "de")
    assert dec.source_dictionary.symbols == ref.source_dictionary.symbols
    tag = "__de__" if kind == "lang_dict" else "[de]"
    assert dec.data_manager.get_decoder_langtok("de", "tgt") == ref.source_dictionary.index(tag)
    if kind == "lang_dict":  # --lang-dict order en, de: not the sorted de, en
        assert ref.source_dictionary.index("__en__") < ref.source_dictionary.index("__de__")
    for task in (dec, ref):
        if "test" not in task.datasets:
            task.load_dataset("test")
    batches = [t.dataset("test").collater([t.dataset("test")[i] for i in range(45)]) for t in (dec, ref)]
    for key in ("src_tokens", "prev_output_tokens"):
        assert torch.equal(batches[0]["net_input"][key], batches[1]["net_input"][key])
    assert torch.equal(batches[0]["target"], batches[1]["target"])
    src = batches[0]["net_input"]["src_tokens"][0]
    assert ref.source_dictionary.index(tag) in src.tolist()


def test_hub_from_pretrained_translates(setup):
    """fairseq's hub way works (build_generator took no prefix_allowed_tokens_fn) and honours
    prefix_allowed_tokens_fn and seq_gen_cls."""
    from fairseq.sequence_generator import SequenceGenerator

    from fairseq_smoe.models.smoe_transformer import SMoETransformerModel

    data, ckpt = setup["data"], setup["ckpt"]["lang_dict"]
    hub = SMoETransformerModel.from_pretrained(
        str(ckpt.parent), checkpoint_file=ckpt.name, data_name_or_path=str(data / "data-bin"),
        source_lang="en", target_lang="de", bpe="sentencepiece", sentencepiece_model=str(data / "spm.model"),
    )
    sources = raw(setup, "en", "de", "en")[:6]
    # the hub strips the language token as fairseq-generate does (stock fairseq's hub leaves
    # it in, wherever the model emits it)
    outs = hub.translate(sources, beam=BEAM)
    assert outs == translator(setup, "lang_dict").translate(sources, "en", "de", beam=BEAM)
    assert not any("__de__" in o for o in outs)

    d = hub.tgt_dict
    allowed = [d.index("__de__"), d.eos()] + [d.index(p) for p in ("▁Gott", "▁und", ".")]
    hypos = hub.generate([hub.encode(s) for s in sources], beam=BEAM, prefix_allowed_tokens_fn=lambda b, t: allowed)
    assert all(set(h[0]["tokens"].tolist()) <= set(allowed) for h in hypos)

    class Marked(SequenceGenerator):
        pass

    task = hub.task
    gen = task.build_generator(hub.models, hub.cfg.generation, seq_gen_cls=Marked)
    assert isinstance(gen, Marked) and d.index("__de__") in gen.symbols_to_strip_from_output


@pytest.mark.parametrize("kind", ["lang_dict", "mbart"])
def test_route_is_the_routing_of_the_generation(setup, kind):
    """route(): per block, per token, passes and experts; the decoder side is what the model
    did while generating the translation (recorded during greedy decoding)."""
    from fairseq_smoe.modules.stats import recording

    tr = translator(setup, kind)
    sentence = raw(setup, "en", "de", "en")[3]
    r = tr.route(sentence, "en", "de", beam=1)
    assert r.translation == tr.translate([sentence], "en", "de", beam=1)[0]
    assert [(b.side, b.layer) for b in r.blocks] == [("encoder", 1), ("decoder", 1)]
    enc, dec = r.side("encoder")[0], r.side("decoder")[0]
    tag = "__de__" if kind == "lang_dict" else "[de]"
    if kind == "lang_dict":
        assert enc.tokens[0] == tag and enc.tokens[-1] == "</s>" and dec.tokens[:2] == ["</s>", tag]
    else:  # the tags replace eos / bos
        assert enc.tokens[-1] == tag and dec.tokens[0] == tag
    assert dec.predicts[-1] == "</s>" and dec.tokens[1:] == dec.predicts[:-1]
    for b in r.blocks:
        assert len(b.tokens) == len(b.passes) == len(b.experts)
        for passes, experts in zip(b.passes, b.experts):
            assert passes == len(experts) and 1 <= passes <= 2
            assert all(len(e) == 2 for e in experts)  # top-2, nothing dropped at inference
            assert set(experts[0]) <= {0, 1, 2, 3}
            if passes == 2:  # top-1 in stratum 0 (experts 0, 1): next stratum (2, 3)
                assert experts[0][0] in (0, 1) and set(experts[1]) <= {2, 3}
            else:
                assert experts[0][0] in (2, 3)

    # greedy generation with a record open: one decoder entry per step (one sentence, beam 1)
    task = tr.task("en", "de")
    dataset = tr._inference_dataset(task, [sentence])
    with torch.no_grad(), recording(detail=True) as rec:
        list(tr.decode(task, tr.batches(task, dataset), beam=1))
    steps = rec.blocks("decoder")
    gen_passes = [int(b.passes_TB[-1, 0]) for b in steps]
    gen_first = [int(b.trace[0].experts_Kn[0, -1]) for b in steps]
    n = len(dec.passes)
    assert gen_passes[:n] == dec.passes and gen_first[:n] == [e[0][0] for e in dec.experts]
    assert [int(p) for p in rec.blocks("encoder")[0].passes_TB[:, 0]] == enc.passes

    # the compute dial: one pass per token in every block
    capped = SMoETranslator(setup["ckpt"][kind], setup["data"], device="cpu", max_passes=1).route(sentence, "en", "de", beam=1)
    assert all(set(b.passes) == {1} for b in capped.blocks) and any(2 in b.passes for b in r.blocks)


def test_moved_lang_dict_and_wrong_dictionary(setup, tmp_path):
    data, ckpt = setup["data"], setup["ckpt"]["lang_dict"]
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    moved = tmp_path / "langs" / "order.txt"
    moved.parent.mkdir()
    shutil.copy(data / "lang_order.txt", moved)
    state["cfg"]["task"].lang_dict = str(tmp_path / "gone.txt")
    torch.save(state, tmp_path / "moved.pt")
    with pytest.raises(TranslatorError) as err:
        evaluate(tmp_path / "moved.pt", data, tmp_path / "eval", beam=1, cpu=True)
    msg = str(err.value)
    assert "--lang-dict" in msg and "gone.txt" in msg and "task_paths" in msg and "evaluate --lang-dict PATH" in msg
    tr = SMoETranslator(tmp_path / "moved.pt", data, device="cpu", task_paths={"lang_dict": moved})
    sources = raw(setup, "en", "de", "en")[:4]
    assert tr.translate(sources, "en", "de", beam=BEAM) == translator(setup, "lang_dict").translate(sources, "en", "de", beam=BEAM)
    with pytest.raises(TranslatorError, match="not trained with --fixed-dictionary"):
        SMoETranslator(ckpt, data, device="cpu", task_paths={"fixed_dictionary": moved})

    # a data directory whose dictionary is not the model's: named, not a shape mismatch
    other = tmp_path / "other"
    other.mkdir()
    for lang in ("en", "de"):
        text = (data / "data-bin" / f"dict.{lang}.txt").read_text(encoding="utf-8")
        (other / f"dict.{lang}.txt").write_text(text + "extra_symbol 1\n", encoding="utf-8")
    with pytest.raises(TranslatorError) as err:
        SMoETranslator(ckpt, other, spm_model=data / "spm.model", device="cpu")
    m = re.search(r"vocabulary of \S+ has (\d+) entries but the dictionary of \S+ gives (\d+)", str(err.value))
    assert m and int(m.group(2)) == int(m.group(1)) + 1, str(err.value)


def test_bad_input_is_refused_clearly(setup):
    tr = translator(setup, "lang_dict")
    assert tr.translate("In the beginning", "en", "de", beam=1) == tr.translate(["In the beginning"], "en", "de", beam=1)[0]
    assert tr.translate([], "en", "de") == []
    cases = [
        (lambda: tr.translate(["fine", 3], "en", "de"), "sentence 1 is a int"),
        (lambda: tr.translate(["two\nlines"], "en", "de"), "sentence 0 contains a line break"),
        (lambda: tr.translate(["x"], "en", "xx"), "'xx'.*no language token"),
        (lambda: tr.translate(["x"], "en", "de", beam=0), "beam must be a positive integer"),
        (lambda: tr.translate(["word " * 2000], "en", "de"), "sentence 0 is .* pieces long"),
        (lambda: tr.route(["x"], "en", "de"), "route takes one sentence"),
        (lambda: SMoETranslator(setup["ckpt"]["lang_dict"], setup["data"], device="mps"), "not supported"),
        (lambda: SMoETranslator(setup["ckpt"]["lang_dict"], setup["data"], device="tpu"), "not a torch device"),
    ]
    if not torch.cuda.is_available():
        cases.append((lambda: SMoETranslator(setup["ckpt"]["lang_dict"], setup["data"], device="cuda"), "no GPU"))
    for call, message in cases:
        with pytest.raises(TranslatorError, match=message):
            call()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_decoding(setup):
    sources = raw(setup, "en", "de", "en")
    tr = SMoETranslator(setup["ckpt"]["lang_dict"], setup["data"], device="cuda")
    assert next(tr.model.parameters()).is_cuda
    out = tr.translate(sources, "en", "de", beam=BEAM)
    assert len(out) == len(sources) and all(isinstance(o, str) for o in out)
    r = tr.route(sources[0], "en", "de", beam=BEAM)
    assert r.blocks and isinstance(r.translation, str)
