"""End to end on the committed real Bible fixture, with stock fairseq commands:
SentencePiece -> fairseq-preprocess -> fairseq-train (SMoE 2,2) -> loss decreases -> resume
-> fairseq-generate for every direction returns every line -> sacreBLEU BLEU and chrF."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_prep.spm_binarize import prepare  # noqa: E402
from fairseq_smoe.evaluate import evaluate  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "bible"
PLUGIN = str(ROOT / "fairseq_smoe")


def fairseq(tool, *args):
    run = subprocess.run([sys.executable, "-m", f"fairseq_cli.{tool}", *map(str, args)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:]
    return run.stdout + run.stderr


def train_args(data, save_dir, max_update):
    return [
        data / "data-bin", "--user-dir", PLUGIN, "--task", "smoe_translation",
        "--lang-pairs", (data / "lang_pairs.txt").read_text().strip(),
        "--langs", (data / "langs.txt").read_text().strip(),
        "--encoder-langtok", "tgt", "--decoder-langtok",
        "--arch", "smoe_transformer_tiny", "--smoe-strata", "2,2", "--moe-expert-count", "4",
        "--criterion", "smoe_label_smoothed_cross_entropy", "--label-smoothing", "0.1",
        "--share-all-embeddings", "--optimizer", "adam", "--lr", "3e-3",
        "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "30", "--max-tokens", "2048",
        "--max-update", max_update, "--cpu", "--num-workers", "0", "--seed", "1",
        "--save-dir", save_dir, "--log-format", "json", "--log-interval", "10",
        "--validate-interval-updates", "40", "--save-interval-updates", "40",
        "--no-epoch-checkpoints",
    ]


def json_logs(output, tag):
    return [json.loads(m) for m in re.findall(rf"\| {tag} \| (\{{.*\}})", output)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Prepare 2 pairs (4 directions) and train 80 updates, then resume to 100."""
    tmp = tmp_path_factory.mktemp("e2e")
    data = tmp / "data"
    prepare(FIXTURE, ["en-de", "en-ru"], data, vocab_size=1000)
    save = tmp / "ckpt"
    first = fairseq("train", *train_args(data, save, 80))
    resumed = fairseq("train", *train_args(data, save, 100))
    return {"data": data, "save": save, "first": first, "resumed": resumed, "tmp": tmp}


def test_training_loss_decreases_and_logs_routing(run):
    inner = json_logs(run["first"], "train_inner")
    assert len(inner) >= 6
    losses = [float(r["loss"]) for r in inner]
    assert losses[-1] < losses[0] - 1.0, losses
    for r in inner:
        assert 1.0 <= float(r["rc_enc"]) <= 2.0 and 1.0 <= float(r["rc_dec"]) <= 2.0
        assert 0.0 <= float(r["dropped"]) < 1.0 and float(r["moe_gate_loss"]) > 0


def test_validation_reports_every_direction(run):
    valid = json_logs(run["first"], "valid")[-1]
    for d in ("en-de", "de-en", "en-ru", "ru-en"):
        assert math.isfinite(float(valid[f"valid_loss_{d}"]))
        assert 1.0 <= float(valid[f"valid_rc_enc_{d}"]) <= 2.0
        assert 1.0 <= float(valid[f"valid_rc_dec_{d}"]) <= 2.0
    assert float(valid["valid_dropped"]) == 0.0  # no token dropped at evaluation


def test_resume_continues_from_checkpoint(run):
    assert "Loaded checkpoint" in run["resumed"] and "@ 80 updates" in run["resumed"]
    updates = [int(r["num_updates"]) for r in json_logs(run["resumed"], "train_inner")]
    assert updates and min(updates) > 80 and max(updates) == 100


def test_generate_every_direction_and_score(run):
    rows, table = evaluate(run["save"] / "checkpoint_last.pt", run["data"], run["tmp"] / "eval", beam=2)
    assert [r["direction"] for r in rows] == ["en-de", "de-en", "en-ru", "ru-en"]
    for r in rows:
        test_lines = (run["data"] / "raw" / f"test.{r['direction']}.{r['direction'][-2:]}").read_text().splitlines()
        hyps = (run["tmp"] / "eval" / f"hyp.{r['direction']}.{r['direction'][-2:]}").read_text().splitlines()
        assert r["lines"] == len(test_lines) == len(hyps) == 45
        assert 0.0 <= r["bleu"] <= 100.0 and 0.0 <= r["chrf"] <= 100.0
        assert 0.0 <= r["spm_bleu"] <= 100.0  # fairseq's own BLEU4 line, parsed
        assert r["copy_chrf"] < 20.0
        assert 1.0 <= r["rc_enc"] <= 2.0 and 1.0 <= r["rc_dec"] <= 2.0
    assert "| en-ru |" in table
    # en/de/ru are OPUS-100 languages: the grouped table follows, over the directions present
    assert "Means by side and resource group (opus100 benchmark" in table
    md = (run["tmp"] / "eval" / "scores.md").read_text()
    assert md == table and "| chrf |" in md


def generate_count(run, task, extra=()):
    data = run["data"]
    out = fairseq(
        "generate", data / "data-bin", "--user-dir", PLUGIN, "--task", task,
        "--lang-pairs", (data / "lang_pairs.txt").read_text().strip(),
        "--langs", (data / "langs.txt").read_text().strip(),
        "--encoder-langtok", "tgt", "--decoder-langtok", "--source-lang", "en", "--target-lang", "de",
        "--path", run["save"] / "checkpoint_last.pt", "--gen-subset", "test", "--beam", "1",
        "--batch-size", "10", "--required-batch-size-multiple", "8", "--cpu", *extra,
    )
    return int(re.search(r"Translated ([\d,]+) sentences", out).group(1).replace(",", ""))


def test_generation_keeps_the_last_batch(run):
    # Stock fairseq drops the last batch when its size is not a multiple of 8 (45 = 5*8 + 5).
    assert generate_count(run, "translation_multi_simple_epoch") < 45
    assert generate_count(run, "smoe_translation") == 45


def test_generation_is_deterministic(run):
    data = run["data"]
    outs = [
        fairseq("generate", data / "data-bin", "--user-dir", PLUGIN, "--task", "smoe_translation",
                "--lang-pairs", (data / "lang_pairs.txt").read_text().strip(),
                "--langs", (data / "langs.txt").read_text().strip(),
                "--encoder-langtok", "tgt", "--decoder-langtok", "--source-lang", "ru",
                "--target-lang", "en", "--path", run["save"] / "checkpoint_last.pt",
                "--gen-subset", "test", "--beam", "2", "--cpu", "--seed", str(seed))
        for seed in (1, 2)
    ]
    hyps = [sorted(l for l in o.splitlines() if l.startswith("H-")) for o in outs]
    assert hyps[0] == hyps[1] and len(hyps[0]) == 45


def test_checkpoint_round_trip_and_wrong_architecture(run, tmp_path):
    from fairseq import checkpoint_utils

    import fairseq_smoe  # noqa: F401

    path = run["save"] / "checkpoint_last.pt"
    overrides = {"data": str(run["data"] / "data-bin")}
    (model,), cfg, task = checkpoint_utils.load_model_ensemble_and_task([str(path)], arg_overrides=overrides)
    model.eval()
    src = torch.tensor([[task.source_dictionary.index("__de__")] + list(range(10, 30)) + [2]])
    prev = torch.tensor([[2] + list(range(40, 55))])
    with torch.no_grad():
        before = model(src, torch.tensor([src.size(1)]), prev)[0]
    # save with fairseq's own writer and load again (weights_only stays on in torch.load)
    state = torch.load(path, map_location="cpu", weights_only=True)
    state["model"] = model.state_dict()
    copy = tmp_path / "copy.pt"
    torch.save(state, copy)
    (model2,), _, _ = checkpoint_utils.load_model_ensemble_and_task([str(copy)], arg_overrides=overrides)
    with torch.no_grad():
        after = model2.eval()(src, torch.tensor([src.size(1)]), prev)[0]
    assert torch.equal(before, after)

    # a checkpoint of another architecture (strata 3,1; and a dense transformer) is refused clearly
    for wrong in ({"smoe_strata": "3,1"}, {"moe_freq": 0}):
        with pytest.raises(Exception) as err:
            checkpoint_utils.load_model_ensemble_and_task([str(path)], arg_overrides={**overrides, **wrong})
        msg = str(err.value) + str(err.value.__cause__ or "")
        assert "strata 2,2" in msg and ("strata 3,1" in msg or "no SMoE blocks" in msg), msg


def to_old_layout(state):
    """``state`` as fairseq-smoe wrote checkpoints before the expert weights took nn.Linear's
    [out, in] layout: expert weights and their Adam moments [E, in, out], no weight_layout key."""
    expert_weight = re.compile(r"experts\.w[12]$")
    state["model"] = {k: (v.transpose(1, 2).contiguous() if expert_weight.search(k) else v)
                      for k, v in state["model"].items() if not k.endswith("experts.weight_layout")}
    names = state["extra_state"]["smoe_parallel"]["param_names"]
    moved = 0
    for i, st in state["last_optimizer_state"]["state"].items():
        if expert_weight.search(names[i]):
            for key, v in st.items():
                if torch.is_tensor(v) and v.dim() == 3:
                    st[key], moved = v.transpose(1, 2).contiguous(), moved + 1
    assert moved == 2 * 2 * 2  # exp_avg, exp_avg_sq of w1, w2 of the encoder's and decoder's block
    return state


def test_a_checkpoint_of_the_earlier_expert_layout_resumes_exactly(run, tmp_path):
    """A checkpoint written before the expert weights took nn.Linear's layout resumes, Adam
    state included, exactly like the same checkpoint in today's layout (the same losses and
    gradient norms update by update)."""
    path = run["save"] / "checkpoint_last.pt"
    logs = {}
    for name in ("now", "old"):
        state = torch.load(path, map_location="cpu", weights_only=True)
        assert sum(k.endswith("experts.weight_layout") for k in state["model"]) == 2
        (tmp_path / name).mkdir()
        torch.save(to_old_layout(state) if name == "old" else state, tmp_path / name / "checkpoint_last.pt")
        out = fairseq("train", *train_args(run["data"], tmp_path / name, 104), "--log-interval", "1")
        assert "@ 100 updates" in out
        logs[name] = [(r["loss"], r["gnorm"], r["moe_gate_loss"]) for r in json_logs(out, "train_inner")]
    assert len(logs["now"]) == 4 and logs["old"] == logs["now"]
