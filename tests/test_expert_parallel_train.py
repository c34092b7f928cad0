"""Expert parallelism through fairseq-train on 2 CPU ranks (gloo), issue 11.

Real commands: ``scripts/train.sh`` with ``CPU_RANKS=2`` (2 fairseq-train processes) and stock
``fairseq-train`` / ``fairseq-generate`` mains, on the committed Bible fixture (en-de, de-en),
``smoe_transformer_tiny`` with 4 experts in strata 2,2, dropout 0 and the argmax second expert
(the 2-rank run's ranks share one seed, so sampled noise would differ from one process by
design). The 2-rank expert-parallel run is held to a 1-process run with ``--update-freq 2``
(the same batches): losses, balance loss, passes, drops and gradient norm at every update, the
gradient of every parameter (Adam's first moment after update 1 is 0.1 x the gradient), the
weights and the optimizer state after 4 updates, from the consolidated checkpoints. Then: resume
at 1 and at 2 ranks from its update-2 checkpoint (the latter writing a shard set), decoding in
one process, one stratum with each expert replicated on 4 ranks (E < W), a world size that fits
neither way, damaged shard sets, and a rank that is killed or stalls.
"""

import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import fairseq_smoe  # noqa: E402,F401
from fairseq import checkpoint_utils, options  # noqa: E402
from fairseq_smoe import checkpoints  # noqa: E402
from fairseq_smoe.checkpoint_io import CheckpointError  # noqa: E402
from fairseq_smoe.recipes import training_flags  # noqa: E402

from test_checkpoint_io import binarize  # noqa: E402

PLUGIN = str(ROOT / "fairseq_smoe")
TRAIN_SH = ROOT / "scripts" / "train.sh"
CONF = """\
--task smoe_translation --encoder-langtok tgt --decoder-langtok
--arch smoe_transformer_tiny --moe-expert-count 4 --smoe-strata 2,2 --moe-expert-parallel
--criterion smoe_label_smoothed_cross_entropy --label-smoothing 0.1 --share-all-embeddings
--dropout 0 --moe-second-expert-policy all
--optimizer adam --lr 1e-3 --max-tokens 512 --num-workers 0 --seed 1
--log-format json --log-interval 1 --disable-validation --save-interval-updates 1 --no-epoch-checkpoints
"""
LOGGED = ("loss", "nll_loss", "moe_gate_loss", "rc_enc", "rc_dec", "dropped", "gnorm")


def env():
    e = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    e["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{e.get('PATH', '')}"
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_sh(data, save, *extra, ranks=1):
    """scripts/train.sh CONF DATA SAVE extra..., on CPU_RANKS=ranks processes."""
    e = env()
    if ranks > 1:
        e["CPU_RANKS"] = str(ranks)
    run = subprocess.run(["bash", str(TRAIN_SH), str(data["conf"]), str(data["dir"]), str(save), *map(str, extra)],
                         capture_output=True, text=True, env=e, timeout=900)
    return run.returncode, run.stdout + run.stderr


def train_args(data, save, *extra):
    """What train.sh runs for one process (without its start-up cost)."""
    return [str(data["dir"] / "data-bin"), "--user-dir", PLUGIN, *training_flags(str(data["conf"])),
            "--lang-pairs", "en-de,de-en", "--langs", "de,en", "--save-dir", str(save), "--cpu", *map(str, extra)]


def train_one(data, save, *extra):
    run = subprocess.run([sys.executable, "-m", "fairseq_cli.train", *train_args(data, save, *extra)],
                         capture_output=True, text=True, env=env(), timeout=900)
    return run.returncode, run.stdout + run.stderr


def ok(result):
    rc, out = result
    assert rc == 0, out[-4000:]
    return out


def json_logs(output, tag="train_inner"):
    return [json.loads(m) for m in re.findall(rf"\| {tag} \| (\{{.*\}})", output)]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("ep_data")
    binarize(d / "data-bin")
    (d / "lang_pairs.txt").write_text("en-de,de-en\n")
    (d / "langs.txt").write_text("de,en\n")
    conf = d / "ep-test.conf"
    conf.write_text(CONF)
    return {"dir": d, "conf": conf}


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """1 process (--update-freq 2) and 2 expert-parallel ranks, 4 updates each; then the 2-rank
    run's update-2 checkpoint resumed at 1 process and, by train.sh on a save dir holding it as
    checkpoint_last.pt, at 2 ranks writing shard sets."""
    tmp = tmp_path_factory.mktemp("ep_runs")
    one = ok(train_one(data, tmp / "one", "--update-freq", 2, "--max-update", 4))
    two = ok(train_sh(data, tmp / "two", "--max-update", 4, ranks=2))
    for name in ("r1", "r2"):
        (tmp / name).mkdir()
        shutil.copy(tmp / "two" / "checkpoint_1_2.pt", tmp / name / "checkpoint_last.pt")
    r1 = ok(train_one(data, tmp / "r1", "--update-freq", 2, "--max-update", 4))
    r2 = ok(train_sh(data, tmp / "r2", "--max-update", 4, "--moe-sharded-checkpoint", ranks=2))
    return {"tmp": tmp, "one": one, "two": two, "r1": r1, "r2": r2}


# ----------------------------------------------------------------------------- comparisons


def assert_same_layout(a, b):
    """Same keys, shapes and dtypes (model and optimizer state): a checkpoint is a checkpoint."""
    assert list(a["model"]) == list(b["model"])
    for k in a["model"]:
        assert (a["model"][k].shape, a["model"][k].dtype) == (b["model"][k].shape, b["model"][k].dtype), k
    oa, ob = a["last_optimizer_state"], b["last_optimizer_state"]
    assert oa["param_groups"] == ob["param_groups"]
    assert sorted(oa["state"]) == sorted(ob["state"])
    for i in oa["state"]:
        assert sorted(oa["state"][i]) == sorted(ob["state"][i])
        for key, v in oa["state"][i].items():
            if torch.is_tensor(v):
                assert v.shape == ob["state"][i][key].shape, (i, key)


def assert_states_close(a, b, exact=False):
    """Weights within float tolerance; each optimizer-state tensor within 1e-5 of that state's
    largest value over the whole model (the key-projection biases' gradients are mathematically
    zero, so both runs hold rounding noise of 1e-11 there)."""
    assert_same_layout(a, b)
    names = a["extra_state"]["smoe_parallel"]["param_names"]
    for k, v in a["model"].items():
        if exact:
            assert torch.equal(v, b["model"][k]), k
        else:
            torch.testing.assert_close(v, b["model"][k], rtol=1e-4, atol=1e-5, msg=k)
    oa, ob = a["last_optimizer_state"]["state"], b["last_optimizer_state"]["state"]
    for key in ("exp_avg", "exp_avg_sq"):
        scale = max(oa[i][key].abs().max().item() for i in oa)
        for i in oa:
            if exact:
                assert torch.equal(oa[i][key], ob[i][key]), (names[i], key)
            else:
                torch.testing.assert_close(ob[i][key], oa[i][key], rtol=1e-3, atol=1e-5 * scale,
                                           msg=f"{key} of {names[i]}")
            assert oa[i]["step"] == ob[i]["step"]


def assert_logs_equal(out_a, out_b, updates):
    la, lb = json_logs(out_a), json_logs(out_b)
    assert [int(r["num_updates"]) for r in la] == [int(r["num_updates"]) for r in lb] == list(updates)
    for ra, rb in zip(la, lb):
        for key in LOGGED:  # printed with 3-4 decimals
            assert float(ra[key]) == pytest.approx(float(rb[key]), abs=2e-3, rel=1e-4), (ra["num_updates"], key)


# ----------------------------------------------------------------------------- equivalence


def test_two_ranks_train_exactly_like_one_process(runs):
    tmp = runs["tmp"]
    assert "launcher: cpu-ranks" in runs["two"] and "with --moe-expert-parallel" in runs["two"]
    # the 2-rank run is expert parallel: each rank holds 2 of the 4 experts of each block
    assert "local_experts=(0, 2)" in runs["two"] and "local_experts" not in runs["one"]
    assert_logs_equal(runs["one"], runs["two"], range(1, 5))
    for name in ("checkpoint_1_1.pt", "checkpoint_1_4.pt", "checkpoint_last.pt"):
        a, b = load(tmp / "one" / name), load(tmp / "two" / name)
        # the consolidated file has every expert: [4, d, ffn], exactly as the 1-process file
        assert b["model"]["encoder.layers.1.moe.experts.w1"].shape == (4, 512, 128)
        assert_states_close(a, b)  # update 1: exp_avg = 0.1 x the gradient of every parameter
    meta = load(tmp / "two" / "checkpoint_last.pt")["extra_state"]["smoe_parallel"]
    assert (meta["world_size"], meta["expert_parallel"], meta["num_experts"]) == (2, True, 4)
    meta = load(tmp / "one" / "checkpoint_last.pt")["extra_state"]["smoe_parallel"]
    assert (meta["world_size"], meta["expert_parallel"]) == (1, False)  # the flag with one process


def test_resume_at_one_and_at_two_ranks_continues_the_run(runs):
    tmp = runs["tmp"]
    for out in (runs["r1"], runs["r2"]):
        assert "Loaded checkpoint" in out and "(epoch 1 @ 2 updates)" in out
        resumed = json_logs(out)
        assert [int(r["num_updates"]) for r in resumed] == [3, 4]
    assert "resuming from" in runs["r2"]  # train.sh on a save dir with checkpoint_last.pt
    assert "resuming a run saved at world size 2 on 1: epoch 1 continues after its first 4 batches" in runs["r1"]
    two = json_logs(runs["two"])[2:]
    for out in (runs["r1"], runs["r2"]):
        for ra, rb in zip(two, json_logs(out)):
            for key in LOGGED:
                assert float(ra[key]) == pytest.approx(float(rb[key]), abs=2e-3, rel=1e-4), key
    final = load(tmp / "two" / "checkpoint_last.pt")
    assert_states_close(final, load(tmp / "r1" / "checkpoint_last.pt"))
    # the 2-rank resume wrote shard sets; consolidated, the last one is bit-identical to the run
    # that never stopped
    index = checkpoints.read_index(tmp / "r2" / "checkpoint_last.pt")
    assert index["shards"] == 2 and index["num_updates"] == 4 and index["world_size"] == 2
    assert checkpoints.main(["consolidate", str(tmp / "r2" / "checkpoint_last.pt"), str(tmp / "r2.pt")]) == 0
    assert_states_close(final, load(tmp / "r2.pt"), exact=True)
    # the shards of update 3 stay (checkpoint_1_3.pt lists them); nothing unreferenced is left
    files = sorted(p.name for p in (tmp / "r2").iterdir() if p.name.startswith("ep-shard"))
    assert len(files) == 4 and {f.split(".")[1] for f in files} == {"u3", "u4"}


def hypotheses(data, path):
    from fairseq_cli import generate

    args = options.parse_args_and_arch(options.get_generation_parser(), [
        str(data["dir"] / "data-bin"), "--user-dir", PLUGIN, "--task", "smoe_translation",
        "--lang-pairs", "en-de,de-en", "--langs", "de,en", "--encoder-langtok", "tgt", "--decoder-langtok",
        "--source-lang", "en", "--target-lang", "de", "--path", str(path), "--gen-subset", "test",
        "--beam", "2", "--max-len-a", "0", "--max-len-b", "12", "--batch-size", "16", "--cpu"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        generate.main(args)
    return sorted(line for line in out.getvalue().splitlines() if line.startswith("H-"))


def test_expert_parallel_checkpoints_decode_in_one_process(runs, data, tmp_path):
    tmp = runs["tmp"]
    consolidated = hypotheses(data, tmp / "two" / "checkpoint_last.pt")
    assert len(consolidated) == 45  # every test line
    # a 1-process model with the same weights: the 1-process run's checkpoint, its weights replaced
    same = load(tmp / "one" / "checkpoint_last.pt")
    same["model"] = load(tmp / "two" / "checkpoint_last.pt")["model"]
    torch.save(same, tmp_path / "same.pt")
    assert hypotheses(data, tmp_path / "same.pt") == consolidated
    # a shard set decodes directly (its index is the checkpoint name)
    assert hypotheses(data, tmp / "r2" / "checkpoint_last.pt") == consolidated


def test_one_stratum_with_experts_replicated_on_four_ranks(data, tmp_path):
    """E = 2 experts in one stratum (vanilla top-2 MoE) on 4 ranks: 2 exchange groups of 2 ranks,
    each expert held by 2 replicas whose gradients are summed; against 1 process, --update-freq 4."""
    flags = ("--moe-expert-count", 2, "--smoe-strata", 2)
    one = ok(train_one(data, tmp_path / "one", *flags, "--update-freq", 4, "--max-update", 2))
    four = ok(train_sh(data, tmp_path / "four", *flags, "--max-update", 2, ranks=4))
    assert "on 4 worker(s) with --moe-expert-parallel" in four and "local_experts=(0, 1)" in four
    assert_logs_equal(one, four, range(1, 3))
    assert all(float(r["rc_enc"]) == 1.0 for r in json_logs(four))
    a, b = load(tmp_path / "one" / "checkpoint_last.pt"), load(tmp_path / "four" / "checkpoint_last.pt")
    assert b["model"]["decoder.layers.1.moe.experts.w1"].shape == (2, 512, 128)
    assert_states_close(a, b)


# ----------------------------------------------------------------------------- bad inputs


def test_world_size_that_fits_neither_way_is_refused(data, tmp_path):
    rc, out = train_sh(data, tmp_path / "s", "--moe-expert-count", 3, "--smoe-strata", 3, "--max-update", 1, ranks=2)
    assert rc != 0
    assert "splits the 3 experts of each SMoE block over the 2 ranks" in out
    assert "Valid world sizes for 3 experts: 1, 3," in out
    assert not (tmp_path / "s" / "checkpoint_last.pt").exists()


@pytest.fixture
def shard_set(runs, tmp_path):
    """A copy of the 2-rank resume's save dir (two shard sets: updates 3 and 4)."""
    d = tmp_path / "set"
    shutil.copytree(runs["tmp"] / "r2", d, ignore=shutil.ignore_patterns("*.txt"))
    index = checkpoints.read_index(d / "checkpoint_last.pt")
    return d, index, [d / e["file"] for e in index["files"]]


def load_error(path):
    with pytest.raises(CheckpointError) as err:
        checkpoint_utils.load_checkpoint_to_cpu(str(path))
    return str(err.value)


def test_a_complete_shard_set_loads_with_every_expert(shard_set):
    d, index, files = shard_set
    state = checkpoint_utils.load_checkpoint_to_cpu(str(d / "checkpoint_last.pt"))
    assert state["model"]["decoder.layers.1.moe.experts.w2"].shape == (4, 128, 512)
    assert state["last_optimizer_state"]["state"][0]["exp_avg"].shape == state["model"]["encoder.embed_tokens.weight"].shape


def test_incomplete_or_extra_shards_are_refused_naming_the_files(shard_set, capsys):
    d, index, files = shard_set
    extra = d / files[1].name.replace("1-of-2", "2-of-2")
    shutil.copy(files[1], extra)
    msg = load_error(d / "checkpoint_last.pt")
    assert str(d / "checkpoint_last.pt") in msg and extra.name in msg and "not in the index" in msg
    extra.unlink()
    files[1].unlink()
    msg = load_error(d / "checkpoint_last.pt")
    assert "1 of them is missing" in msg and files[1].name in msg and "experts 2..3" in msg
    # the command line tool says the same in one line, and exits 1
    assert checkpoints.main(["consolidate", str(d / "checkpoint_last.pt"), str(d / "out.pt")]) == 1
    assert capsys.readouterr().err.startswith(f"error: checkpoint {d / 'checkpoint_last.pt'} is the index")
    assert not (d / "out.pt").exists()


def test_shards_of_another_run_or_save_are_refused(shard_set, runs, tmp_path):
    d, index, files = shard_set
    # another run: the 1-process run resharded for 2 ranks, its shard 1 under this set's name
    other = tmp_path / "other" / "idx.pt"
    assert checkpoints.main(["reshard", str(runs["tmp"] / "one" / "checkpoint_last.pt"), str(other),
                             "--world-size", "2"]) == 0
    theirs = checkpoints.read_index(other)["files"][1]["file"]
    saved = files[1].read_bytes()
    shutil.copy(other.parent / theirs, files[1])
    msg = load_error(d / "checkpoint_last.pt")
    assert "mixes files of two saves" in msg and files[1].name in msg and "another run" in msg
    # another save of the same run: update 3's shard 1 in place of update 4's
    u3 = checkpoints.read_index(d / "checkpoint_1_3.pt")["files"][1]["file"]
    shutil.copy(d / u3, files[1])
    msg = load_error(d / "checkpoint_last.pt")
    assert "another save of the same run" in msg and "update 3" in msg
    # a truncated shard
    files[1].write_bytes(saved[: len(saved) // 2])
    msg = load_error(d / "checkpoint_last.pt")
    assert files[1].name in msg and "truncated or replaced" in msg


def test_shards_no_index_lists_are_swept(shard_set):
    d, index, files = shard_set
    old = checkpoints.read_index(d / "checkpoint_1_3.pt")["files"]
    assert checkpoints.sweep_shards(d) == []  # every shard is listed by an index
    (d / "checkpoint_1_3.pt").unlink()  # as fairseq's --keep-interval-updates does
    assert sorted(checkpoints.sweep_shards(d)) == sorted(e["file"] for e in old)
    assert all(f.exists() for f in files)
    checkpoint_utils.load_checkpoint_to_cpu(str(d / "checkpoint_last.pt"))


def test_reshard_round_trip_and_world_sizes_it_cannot_serve(runs, tmp_path, capsys):
    src = runs["tmp"] / "two" / "checkpoint_last.pt"
    assert checkpoints.main(["reshard", str(src), str(tmp_path / "w4.pt"), "--world-size", "4"]) == 0
    assert "4 experts per block in 4 shards of 1" in capsys.readouterr().out
    assert checkpoints.main(["consolidate", str(tmp_path / "w4.pt"), str(tmp_path / "back.pt")]) == 0
    assert_states_close(load(src), load(tmp_path / "back.pt"), exact=True)
    # an 8-rank layout replicates each of the 4 experts twice: still 4 shards
    assert checkpoints.main(["reshard", str(tmp_path / "w4.pt"), str(tmp_path / "w8.pt"), "--world-size", "8"]) == 0
    assert checkpoints.read_index(tmp_path / "w8.pt")["shards"] == 4
    capsys.readouterr()
    assert checkpoints.main(["reshard", str(src), str(tmp_path / "w3.pt"), "--world-size", "3"]) == 1
    err = capsys.readouterr().err
    assert "cannot be split for --world-size 3" in err and "4 experts and 3 ranks do neither" in err


def rank_plan(state, rank, world=2):
    """The checkpoints.Plan that expert-parallel rank ``rank`` of ``world`` would have (without
    starting processes): its parameters' shapes, experts [lo, hi) of 4."""
    meta = state["extra_state"]["smoe_parallel"]
    lo, hi = rank * 4 // world, (rank + 1) * 4 // world
    expert = {n: (lo, hi, 4) for n in meta["expert_keys"]}
    params = [torch.empty((hi - lo,) + tuple(state["model"][n].shape[1:])) if n in expert
              else torch.empty(state["model"][n].shape) for n in meta["param_names"]]
    return checkpoints.Plan(meta["param_names"], params, expert, ep=object(), world_size=world, num_experts=4)


def test_an_expert_parallel_rank_loads_its_slice_and_never_wrong_optimizer_state(runs, tmp_path):
    from fairseq_smoe import checkpoint_io

    path = runs["tmp"] / "two" / "checkpoint_last.pt"
    full = load(path)
    plan = rank_plan(full, 1)
    names = plan.names

    def as_rank(p, reset=False):
        token = checkpoint_io._ep_target.set((plan, reset))
        try:
            return checkpoint_utils.load_checkpoint_to_cpu(str(p))
        finally:
            checkpoint_io._ep_target.reset(token)

    for src in (path, runs["tmp"] / "r2" / "checkpoint_last.pt"):  # consolidated file, shard set
        mine = as_rank(src)
        w1 = "encoder.layers.1.moe.experts.w1"
        assert torch.equal(mine["model"][w1], full["model"][w1][2:4])
        i = names.index(w1)
        assert torch.equal(mine["last_optimizer_state"]["state"][i]["exp_avg"],
                           full["last_optimizer_state"]["state"][i]["exp_avg"][2:4])
    # optimizer state that is not this model's: torch would cast it in without looking
    bad = load(path)
    j = names.index("decoder.layers.0.fc1.weight")
    bad["last_optimizer_state"]["state"][j]["exp_avg"] = torch.zeros(3, 3)
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as err:
        as_rank(tmp_path / "bad.pt")
    assert str(tmp_path / "bad.pt") in str(err.value) and "decoder.layers.0.fc1.weight" in str(err.value)
    assert "does not belong to this model" in str(err.value)
    assert "last_optimizer_state" not in as_rank(tmp_path / "bad.pt", reset=True)  # --reset-optimizer
    # a checkpoint holding only rank 0's experts (what fairseq alone would save) is refused
    half = load(path)
    half["model"][w1] = half["model"][w1][:2]
    torch.save(half, tmp_path / "half.pt")
    with pytest.raises(CheckpointError) as err:
        as_rank(tmp_path / "half.pt")
    assert f"holds 2 experts in {w1}, this model's blocks have 4" in str(err.value)


# ----------------------------------------------------------------------------- faults


def start_ranks(data, save, *extra):
    """2 fairseq-train ranks started by hand (no launcher that would stop the survivor)."""
    port = free_port()
    save.mkdir(parents=True)
    procs = []
    for r in range(2):
        log = open(save / f"rank{r}.log", "w")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "fairseq_cli.train", *train_args(data, save, "--max-update", 10000, *extra),
             "--distributed-world-size", "2", "--distributed-rank", str(r),
             "--distributed-init-method", f"tcp://127.0.0.1:{port}", "--distributed-no-spawn",
             "--distributed-backend", "gloo", "--ddp-backend", "legacy_ddp"],
            stdout=log, stderr=subprocess.STDOUT, env=env()))
    deadline = time.monotonic() + 600
    while '"num_updates": "3"' not in (save / "rank0.log").read_text():
        assert all(p.poll() is None for p in procs), (save / "rank0.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the 2 ranks did not reach update 3"
        time.sleep(0.2)
    return procs


def stop_survivor(procs, bound_s):
    """The surviving rank 0 must exit by itself, non-zero, well within bound_s."""
    try:
        rc = procs[0].wait(timeout=bound_s)
    except subprocess.TimeoutExpired:
        procs[0].kill()
        pytest.fail(f"rank 0 still running {bound_s}s after its peer failed")
    finally:
        procs[1].kill()
        procs[1].wait()
    return rc


def test_a_killed_rank_stops_the_other_with_a_clear_message(data, tmp_path):
    save = tmp_path / "killed"
    procs = start_ranks(data, save, "--moe-ep-timeout", 60)
    procs[1].send_signal(signal.SIGKILL)
    rc = stop_survivor(procs, 60)
    last = (save / "rank0.log").read_text().strip().splitlines()[-1]
    assert rc != 0
    assert re.search(r"error: (expert parallelism: .* failed on rank 0|a collective of the distributed job failed "
                     r"on rank 0).*A peer rank died or stopped responding", last), last
    assert "Restart the job with the same command and --save-dir" in last


def test_a_stalled_rank_stops_the_other_after_the_timeout(data, tmp_path):
    save = tmp_path / "stalled"
    procs = start_ranks(data, save, "--moe-ep-timeout", 10)
    procs[1].send_signal(signal.SIGSTOP)  # alive, holding its sockets open, never answering
    rc = stop_survivor(procs, 10 + 120)
    last = (save / "rank0.log").read_text().strip().splitlines()[-1]
    # gloo's own words: the collective waited for the configured timeout, not torch's 30 minutes
    assert rc != 0 and "Timed out waiting 10000ms" in last, last
    assert "A peer rank died or stopped responding" in last and "Restart the job" in last
