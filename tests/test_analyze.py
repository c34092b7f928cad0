"""python -m fairseq_smoe.analyze: its CSV numbers against a direct computation on a tiny model
over real (fixture) data, the figures, index.md and its errors."""

import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: E401,E702

import csv

import pytest
import torch

import fairseq_smoe  # noqa: F401
from tiny import save_checkpoint
from data_prep.spm_binarize import prepare
from fairseq import options, tasks
from fairseq_smoe.analyze import AnalysisError, analyze, frequency_ranks
from fairseq_smoe.modules.stats import recording

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("analyze")
    data = tmp / "data"
    prepare(ROOT / "tests" / "fixtures" / "bible", ["en-de", "en-fr"], data, vocab_size=600)
    argv = [str(data / "data-bin"), "--task", "smoe_translation",
            "--lang-pairs", (data / "lang_pairs.txt").read_text().strip(),
            "--langs", (data / "langs.txt").read_text().strip(), "--encoder-langtok", "tgt",
            "--decoder-langtok", "--arch", "smoe_transformer_tiny", "--smoe-strata", "2,2",
            "--encoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64", "--share-all-embeddings", "--cpu"]
    args = options.parse_args_and_arch(options.get_training_parser(), input_args=argv)
    task = tasks.setup_task(args)
    torch.manual_seed(0)
    model = task.build_model(args).eval()
    ckpt = tmp / "model.pt"
    save_checkpoint(model, args, ckpt)
    out = tmp / "out"
    result = analyze(ckpt, data, out, subset="valid", max_sentences=20, cpu=True)
    return {"task": task, "model": model, "data": data, "out": out, "ckpt": ckpt, "result": result}


def read(path):
    with open(path, encoding="utf-8") as f:
        return list(csv.DictReader(f))


def direct(setup):
    """Each of the first 20 valid sentences of every direction alone through the model with a
    record: passes per side and direction, and per (side, stratum, target) expert choices."""
    task, model = setup["task"], setup["model"]
    task.load_dataset("valid")
    ds = task.dataset("valid")
    starts = [0] + list(ds.cumulative_sizes[:-1])
    rc, top1, assign = {}, {}, {}
    with torch.no_grad():
        for d, (s, e) in enumerate(zip(starts, ds.cumulative_sizes)):
            name = task.direction_names[d]
            for i in range(s, min(e, s + 20)):
                sample = ds.collater([ds[i]])
                with recording(detail=True) as rec:
                    model(**sample["net_input"])
                for entry in rec.entries:
                    st = entry.stats.blocks[0]
                    acc = rc.setdefault((name, entry.side), [0, 0])
                    acc[0] += int(st.passes_TB.sum())
                    acc[1] += int(st.routed_TB.sum())
                    for tr in st.trace:
                        key = (entry.side, tr.stratum, name)
                        t1 = top1.setdefault(key, torch.zeros(4))
                        t1.index_add_(0, tr.experts_Kn[0], torch.ones(tr.experts_Kn.size(1)))
                        a = assign.setdefault(key, torch.zeros(4))
                        a.index_add_(0, tr.experts_Kn[tr.kept_Kn], torch.ones(int(tr.kept_Kn.sum())))
    return rc, top1, assign


def test_rc_and_expert_shares_equal_a_direct_computation(setup):
    rc, top1, assign = direct(setup)
    rows = read(setup["out"] / "rc_direction.csv")
    assert {(r["direction"], r["side"]) for r in rows} == set(rc)
    for r in rows:
        p, t = rc[(r["direction"], r["side"])]
        assert float(r["rc"]) == pytest.approx(p / t, rel=1e-5)
        assert int(r["block_tokens"]) == t and float(r["balanced_prior"]) == 1.5
    for r in read(setup["out"] / "expert_load.csv"):
        key = (r["side"], int(r["stratum"]), r["direction"])
        e = int(r["expert"])
        assert float(r["top1_share"]) == pytest.approx(float(top1[key][e] / top1[key].sum()), abs=1e-5)
        assert float(r["assignment_share"]) == pytest.approx(float(assign[key][e] / assign[key].sum()), abs=1e-5)
    strata = read(setup["out"] / "strata.csv")
    assert all(int(r["dropped"]) == 0 for r in strata)  # evaluation: no capacity limit
    for r in strata:  # every routed row makes 2 assignments at each stratum it reaches
        assert int(r["assigned"]) == 2 * int(r["rows"]) and 0 < float(r["router_entropy"]) < 1.39


def test_token_lists_and_frequency_ranks(setup):
    task = setup["task"]
    ranks = frequency_ranks(task.target_dictionary)
    rows = read(setup["out"] / "token_rc.csv")
    assert rows and {r["group"] for r in rows} == {"top", "bottom"}
    for r in rows:
        assert int(r["freq_rank"]) == int(ranks[int(r["token_id"])])
        assert task.target_dictionary[int(r["token_id"])] == r["token"]
        assert int(r["count"]) >= 3 and 1.0 <= float(r["mean_rc"]) <= 2.0
    for key in {(r["side"], r["direction"]) for r in rows}:
        group = [r for r in rows if (r["side"], r["direction"]) == key]
        top = [float(r["mean_rc"]) for r in group if r["group"] == "top"]
        bottom = [float(r["mean_rc"]) for r in group if r["group"] == "bottom"]
        assert len(top) == len(bottom) <= 25 and min(top) >= max(bottom)
    # the most frequent real token has rank 1
    counts = task.target_dictionary.count
    best = max(range(task.target_dictionary.nspecial, len(counts)), key=lambda i: counts[i])
    assert ranks[best] == 1


def test_figures_and_index(setup):
    out = setup["out"]
    index = (out / "index.md").read_text()
    for png in ("rc_per_direction.png", "rc_per_block.png", "token_rc_frequency.png",
                "expert_load_enc2.png", "expert_load_dec2.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"[{png}]" in index
    assert "Are low-RC tokens frequent?" in index and "Sentences analysed: 80" in index


def test_bad_inputs_are_named(setup, tmp_path):
    with pytest.raises(AnalysisError, match="no data-bin"):
        analyze(setup["ckpt"], tmp_path / "missing", tmp_path / "o")
    with pytest.raises(FileNotFoundError, match="no dictionary for de, en, fr"):
        analyze(setup["ckpt"], tmp_path, tmp_path / "o")  # a directory without the data
    with pytest.raises(AnalysisError, match="--subset must be"):
        analyze(setup["ckpt"], setup["data"], tmp_path / "o", subset="dev")
