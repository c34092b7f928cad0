"""Data-parallel training with fairseq's default DDP backend on 2 CPU ranks (gloo), issue 25
finding 3, and the save barrier of finding 7.

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
import json
import os
import re
import socket
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


def env():
    e = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    e["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{e.get('PATH', '')}"
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def json_logs(output, tag="train_inner"):
    return [json.loads(m) for m in re.findall(rf"\| {tag} \| (\{{.*\}})", output)]


def ranks(data_bin, save, *extra, world=2, main="fairseq_cli.train", timeout=600):
    """``world`` fairseq-train ranks over gloo; [(returncode, output)] per rank."""
    port = free_port()
    argv = [str(data_bin), "--user-dir", PLUGIN, *MODEL, *TRAIN, "--save-dir", str(save), *map(str, extra),
            "--distributed-world-size", str(world), "--distributed-init-method", f"tcp://127.0.0.1:{port}",
            "--distributed-no-spawn", "--distributed-backend", "gloo"]
    procs = [subprocess.Popen([sys.executable, "-m", main, *argv, "--distributed-rank", str(r)],
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
