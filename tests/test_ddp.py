"""Data-parallel training with fairseq's default DDP backend on 2 CPU ranks (gloo), issue 25
finding 3, and the checkpoint save's own wait of finding 7 (``expert_parallel.save_wait``).

fairseq's default ``--ddp-backend pytorch_ddp`` is torch's DDP, which stops at the second update
("Expected to have finished reduction in the prior iteration ...") when a parameter got no
gradient in a step: an SMoE stratum that no token reached. The tests run real ``fairseq-train``
ranks (``--distributed-no-spawn``, one process per rank, as environment.md §8) from a checkpoint
whose routers send every token out after pass 0 in every block (stratum 0's pre-norm maps every
token to one vector that stratum 0's router scores highest on a stratum-1 expert), so stratum 1
never runs. On CPU, fairseq builds torch's DDP with ``device_ids=[0]``, which torch refuses for a
CPU model; ``fairseq_smoe/fairseq_patches.py`` drops it (tested here against fairseq's source).
"""

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import fairseq_smoe  # noqa: E402,F401
from fairseq import options, tasks  # noqa: E402

from test_checkpoint_io import binarize  # noqa: E402
from test_expert_parallel_train import env, free_port, json_logs  # noqa: E402
from tiny import save_checkpoint  # noqa: E402

PLUGIN = str(ROOT / "fairseq_smoe")
LR = 1e-4
MODEL = ["--task", "smoe_translation", "--lang-pairs", "en-de,de-en", "--langs", "de,en", "--encoder-langtok", "tgt",
         "--decoder-langtok", "--arch", "smoe_transformer_tiny", "--encoder-embed-dim", "32",
         "--encoder-ffn-embed-dim", "64", "--moe-expert-count", "4", "--smoe-strata", "2,2",
         "--criterion", "smoe_label_smoothed_cross_entropy", "--share-all-embeddings", "--dropout", "0",
         "--moe-second-expert-policy", "all"]
TRAIN = ["--optimizer", "adam", "--lr", str(LR), "--max-tokens", "512", "--num-workers", "0", "--seed", "1",
         "--required-batch-size-multiple", "1", "--log-format", "json", "--log-interval", "1",
         "--disable-validation", "--no-epoch-checkpoints", "--cpu"]


def ranks(data_bin, save, *extra, world=2, main=("-m", "fairseq_cli.train"), timeout=600):
    """``world`` fairseq-train ranks over gloo (``main``: how python starts fairseq-train);
    [(returncode, output)] per rank."""
    port = free_port()
    argv = [str(data_bin), "--user-dir", PLUGIN, *MODEL, *TRAIN, "--save-dir", str(save), *map(str, extra),
            "--distributed-world-size", str(world), "--distributed-init-method", f"tcp://127.0.0.1:{port}",
            "--distributed-no-spawn", "--distributed-backend", "gloo"]
    procs = [subprocess.Popen([sys.executable, *main, *argv, "--distributed-rank", str(r)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env())
             for r in range(world)]
    out = []
    for p in procs:
        try:
            text, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        out.append((p.returncode, text))
    return out


def one_pass_checkpoint(data_bin, path):
    """The tiny model of MODEL with every SMoE block sending every token out after pass 0."""
    args = options.parse_args_and_arch(options.get_training_parser(),
                                       input_args=[str(data_bin), *MODEL, *TRAIN])
    torch.manual_seed(0)
    model = tasks.setup_task(args).build_model(args)
    blocks = model.smoe_blocks("encoder") + model.smoe_blocks("decoder")
    assert blocks
    with torch.no_grad():
        for block in blocks:
            d = block.cfg.embed_dim
            v = torch.ones(d) / d ** 0.5  # every token's u = LN(x) * 0 + v
            block.ffn_norm.weight.zero_()
            block.ffn_norm.bias.copy_(v)
            block.routers[0].weight.copy_(torch.stack([-10 * v, -10 * v, 10 * v, 9 * v]))  # experts 2, 3: stratum 1
    save_checkpoint(model, args, path)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("ddp_data")
    binarize(d / "data-bin")
    init = one_pass_checkpoint(d / "data-bin", d / "one_pass.pt")
    return {"bin": d / "data-bin", "init_pt": d / "one_pass.pt", "init": init}


# (every rank reads the file: fairseq's broadcast of rank 0's state unpickles with weights_only and
# fails on the omegaconf DictConfig in it, a fairseq-on-torch-2.6+ problem of its own)
RESTORE = ["--reset-optimizer", "--reset-dataloader", "--reset-meters", "--reset-lr-scheduler",
           "--load-checkpoint-on-all-dp-ranks"]


# ----------------------------------------------------------------------------- fairseq's DDP on CPU


def test_fairseq_still_builds_torch_ddp_with_device_ids_so_the_cpu_patch_is_needed():
    """fairseq_patches.py replaces the name ``DistributedDataParallel`` in fairseq's
    distributed_fairseq_model because fairseq passes ``device_ids=[args.device_id]``, which torch
    refuses for a CPU model. If fairseq changes either, this fails and the patch is revisited."""
    from fairseq.models import distributed_fairseq_model as dfm
    from torch.nn.parallel import DistributedDataParallel as TorchDDP

    from fairseq_smoe.fairseq_patches import CPUAwareDistributedDataParallel

    src = inspect.getsource(dfm.DistributedFairseqModel)
    assert "wrapped_model = DistributedDataParallel(" in src
    assert "device_ids=[args.device_id]" in src
    assert dfm.DistributedDataParallel is CPUAwareDistributedDataParallel
    assert issubclass(CPUAwareDistributedDataParallel, TorchDDP)


def test_the_cpu_patch_leaves_device_ids_of_a_gpu_model_alone(monkeypatch):
    from torch.nn.parallel import DistributedDataParallel as TorchDDP

    from fairseq_smoe.fairseq_patches import CPUAwareDistributedDataParallel

    seen = []
    monkeypatch.setattr(TorchDDP, "__init__", lambda self, module, device_ids, output_device, *a, **k:
                        seen.append((device_ids, output_device)))
    CPUAwareDistributedDataParallel(torch.nn.Linear(2, 2), device_ids=[0], output_device=0)
    meta = torch.nn.Linear(2, 2, device="meta")  # stands in for a module on another device
    CPUAwareDistributedDataParallel(meta, device_ids=[3], output_device=3)
    assert seen == [(None, None), ([3], 3)]


# ----------------------------------------------------------------------------- idle strata


def test_default_ddp_backend_trains_when_no_token_reaches_a_stratum(data, tmp_path):
    """2 ranks, fairseq's default --ddp-backend (pytorch_ddp, find_unused_parameters off), every
    token leaving after pass 0: 4 updates train (before the fix: "Expected to have finished
    reduction in the prior iteration" at update 2), every logged token made exactly one pass, the
    idle strata's parameters got exactly zero gradients (Adam without weight decay leaves them
    bit for bit as initialised) while the others moved, and the losses are those of legacy_ddp."""
    out = ranks(data["bin"], tmp_path / "pt", "--restore-file", data["init_pt"], *RESTORE, "--max-update", 4)
    for rc, text in out:
        assert rc == 0, text[-3000:]
    assert "Expected to have finished reduction" not in out[0][1] + out[1][1]
    logs = json_logs(out[0][1])
    assert [int(l["num_updates"]) for l in logs] == [1, 2, 3, 4]
    assert all(float(l["rc_enc"]) == 1.0 and float(l["rc_dec"]) == 1.0 for l in logs)  # passes per token

    state = torch.load(tmp_path / "pt" / "checkpoint_last.pt", map_location="cpu", weights_only=True)["model"]
    init = data["init"]
    idle = [k for k in init if re.search(r"\.moe\.(routers\.1\.weight|strata_norms\.0\.(weight|bias))$", k)]
    assert len(idle) == 6  # encoder and decoder: stratum 1's router and pre-norm
    for k in idle:
        assert torch.equal(state[k], init[k]), k
    moved = [k for k in init if re.search(r"\.moe\.(routers\.0\.weight|experts\.w1)$", k)]
    assert moved and all(not torch.equal(state[k], init[k]) for k in moved)

    legacy = ranks(data["bin"], tmp_path / "legacy", "--restore-file", data["init_pt"], *RESTORE,
                   "--max-update", 4, "--ddp-backend", "legacy_ddp")
    assert legacy[0][0] == 0, legacy[0][1][-3000:]
    for a, b in zip(logs, json_logs(legacy[0][1])):
        assert abs(float(a["loss"]) - float(b["loss"])) <= 2e-3, (a, b)


# ----------------------------------------------------------------------------- the save's wait

SLOW_SAVE = """\
import os, sys, time
from fairseq_cli.train import cli_main  # (first: it sets fairseq's log format)
import fairseq_smoe  # its atomic save first: the stall wraps it
from fairseq import checkpoint_utils

write = checkpoint_utils.torch_persistent_save


def slow(*args, **kwargs):  # rank 0 alone writes: a disk that takes STALL_S per checkpoint
    time.sleep(float(os.environ["STALL_S"]))
    return write(*args, **kwargs)


checkpoint_utils.torch_persistent_save = slow
sys.argv[0] = "fairseq-train"
cli_main()
"""
EP = ["--moe-expert-parallel", "--ddp-backend", "legacy_ddp", "--moe-ep-timeout", 3, "--save-interval-updates", 2,
      "--max-update", 4]


def slow_save_ranks(data, tmp_path, name, stall_s, *extra):
    script = tmp_path / "slow_save.py"
    script.write_text(SLOW_SAVE)
    os.environ["STALL_S"] = str(stall_s)
    try:
        return ranks(data["bin"], tmp_path / name, *EP, *extra, main=(str(script),))
    finally:
        del os.environ["STALL_S"]


def test_a_save_slower_than_the_ep_timeout_but_within_the_save_timeout_keeps_the_job(data, tmp_path):
    """Expert parallelism with --moe-ep-timeout 3 (applied to the whole job) and rank 0 taking 8 s
    to write each checkpoint: rank 1 waits for it in the save's own barrier (--moe-save-timeout 120)
    and the run finishes its 4 updates, saving at 2 and 4. Before: rank 1 went on to update 3 and
    its first collective timed out after 3 s while rank 0 was still writing."""
    out = slow_save_ranks(data, tmp_path, "slow", 8, "--moe-save-timeout", 120)
    for rc, text in out:
        assert rc == 0, text[-3000:]
    assert [int(l["num_updates"]) for l in json_logs(out[0][1])][-1] == 4
    assert all((tmp_path / "slow" / f"checkpoint_1_{u}.pt").exists() for u in (2, 4))


def test_a_save_slower_than_the_save_timeout_stops_with_one_line_naming_the_flag(data, tmp_path):
    out = slow_save_ranks(data, tmp_path, "slower", 10, "--moe-save-timeout", 4)
    rc, text = out[1]
    errors = [l for l in text.splitlines() if "error:" in l]
    assert rc != 0 and errors, text[-3000:]
    assert re.search(r"failed on rank 1: its wait for rank 0 to finish writing the checkpoint "
                     r"\(--moe-save-timeout 4s\) ended after [45]\.\d+s", errors[-1]), errors[-1]
    assert "raise --moe-save-timeout" in errors[-1] and "Restart the job" in errors[-1]


# ----------------------------------------------------------------------------- host-side waits

HOST_WAIT = """\
import sys, time
from fairseq_cli.train import cli_main
from fairseq_smoe.modules import expert_parallel as ep

init, gather, wait = ep.ExpertParallel.__init__, ep.ExpertParallel.gather_counts, ep.ExpertParallel._wait_on_host
calls = []


def host_wait_init(self, *args, **kwargs):  # gloo taking the NCCL path
    init(self, *args, **kwargs)
    self.host_wait = True


def waited(self, *args, **kwargs):
    print("host wait", flush=True) if not calls else None
    calls.append(1)
    return wait(self, *args, **kwargs)


def stalls(self, local_X):  # rank 1 stops answering at its 6th gather
    if len(calls) >= 6 and "1" == sys.argv[sys.argv.index("--distributed-rank") + 1]:
        time.sleep(20)  # >> --moe-ep-timeout 3
    return gather(self, local_X)


ep.ExpertParallel.__init__, ep.ExpertParallel.gather_counts, ep.ExpertParallel._wait_on_host = host_wait_init, stalls, waited
sys.argv[0] = "fairseq-train"
cli_main()
"""


def test_host_side_wait_of_the_counts_gather_reports_a_stalled_peer_within_the_timeout(data, tmp_path):
    """The NCCL path of ``gather_counts`` (launched asynchronously, waited for on the host for
    --moe-ep-timeout) forced on gloo: when rank 1 stops answering, rank 0 stops after the timeout
    with the one expert-parallel line, not after gloo's or torch's own."""
    script = tmp_path / "host_wait.py"
    script.write_text(HOST_WAIT)
    out = ranks(data["bin"], tmp_path / "hw", "--moe-expert-parallel", "--ddp-backend", "legacy_ddp",
                "--moe-ep-timeout", 3, "--max-update", 50, main=(str(script),), timeout=300)
    rc, text = out[0]
    assert "host wait" in text and rc != 0, text[-3000:]
    line = [l for l in text.splitlines() if "error:" in l][-1]
    assert re.search(r"all_gather of the per-expert counts among ranks 0, 1 failed on rank 0 after [34]\.\d+s "
                     r"\(--moe-ep-timeout 3s\)", line) and "A peer rank died or stopped responding" in line, line
