"""Precision flags of fairseq-train with the plugin (issue 25 finding 2; docs/gpu.md's table).

fairseq 0.12's ``--bf16`` is its TPU flag (``options.py`` turns it into ``--tpu``, the trainer asks
torch_xla for a device), ``--fp16`` needs CUDA (``FP16Optimizer`` puts its fp32 copy on
``torch.cuda.current_device()``) and ``--amp`` is ``torch.cuda.amp.autocast`` (nothing on CPU):
each is refused with the fix where it cannot do what it says. The plugin's bf16 path is
``--smoe-bf16``: the training forward under ``torch.autocast(bfloat16)``, fp32 weights and
optimizer, device-agnostic, so it runs here on CPU through fairseq-train.
"""

import inspect
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

from fairseq_smoe.errors import UserError  # noqa: E402
from fairseq_smoe.models import smoe_transformer  # noqa: E402
from test_checkpoint_io import binarize  # noqa: E402
from test_expert_parallel_train import env, json_logs  # noqa: E402
from tiny import toy_sample  # noqa: E402

PLUGIN = str(ROOT / "fairseq_smoe")
MODEL = ["--task", "smoe_translation", "--lang-pairs", "en-de,de-en", "--langs", "de,en", "--encoder-langtok", "tgt",
         "--decoder-langtok", "--arch", "smoe_transformer_tiny", "--encoder-embed-dim", "32",
         "--encoder-ffn-embed-dim", "64", "--moe-expert-count", "4", "--smoe-strata", "2,2",
         "--criterion", "smoe_label_smoothed_cross_entropy", "--share-all-embeddings", "--dropout", "0",
         "--moe-second-expert-policy", "all"]
TRAIN = ["--optimizer", "adam", "--lr", "1e-3", "--max-tokens", "512", "--num-workers", "0", "--seed", "1",
         "--required-batch-size-multiple", "1", "--log-format", "json", "--log-interval", "1",
         "--disable-validation", "--no-epoch-checkpoints"]


@pytest.fixture(scope="module")
def data_bin(tmp_path_factory):
    d = tmp_path_factory.mktemp("precision") / "data-bin"
    binarize(d)
    return d


def train(data_bin, save, *extra):
    run = subprocess.run([sys.executable, "-m", "fairseq_cli.train", str(data_bin), "--user-dir", PLUGIN, *MODEL,
                          *TRAIN, "--save-dir", str(save), *map(str, extra)],
                         capture_output=True, text=True, env=env(), timeout=600)
    return run.returncode, run.stdout + run.stderr


def build(data_bin, *extra, parser=None):
    args = options.parse_args_and_arch(parser or options.get_training_parser(),
                                       input_args=[str(data_bin), *MODEL, *TRAIN, *extra])
    task = tasks.setup_task(args)
    return task, task.build_model(args), args


# ----------------------------------------------------------------------------- fairseq's behaviour


def test_fairseq_bf16_is_still_its_tpu_flag_and_amp_still_cuda_autocast(data_bin):
    """What the refusals rest on; if fairseq changes it, revisit check_precision."""
    for flag in ("--bf16", "--memory-efficient-bf16"):
        args = options.parse_args_and_arch(options.get_training_parser(),
                                           input_args=[str(data_bin), *MODEL, *TRAIN, flag])
        assert args.bf16 and args.tpu, flag
    from fairseq.optim.fp16_optimizer import FP16Optimizer
    from fairseq.tasks.fairseq_task import FairseqTask

    assert "torch.cuda.amp.autocast(enabled=(isinstance(optimizer, AMPOptimizer)))" in \
        inspect.getsource(FairseqTask.train_step)
    assert "torch.cuda.current_device()" in inspect.getsource(FP16Optimizer.build_fp32_params)


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("flags, named, fix", [
    (["--fp16"], "--fp16", "drop --fp16"),
    (["--memory-efficient-fp16"], "--memory-efficient-fp16", "drop --memory-efficient-fp16"),
    (["--bf16"], "--bf16", "--smoe-bf16 instead"),
    (["--memory-efficient-bf16"], "--memory-efficient-bf16", "--smoe-bf16 instead"),
    (["--amp"], "--amp", "Drop --amp"),
    (["--smoe-bf16", "--amp"], "--amp", "drop --amp"),
    (["--smoe-bf16", "--fp16"], "--fp16", "drop --fp16"),
])
def test_precision_flags_that_cannot_work_here_are_refused_with_the_fix(data_bin, flags, named, fix):
    with pytest.raises(UserError) as err:
        build(data_bin, "--cpu", *flags)
    assert named in str(err.value) and fix in str(err.value)


def test_fp16_and_amp_refusals_are_one_error_line_from_fairseq_train(data_bin, tmp_path):
    """Before: fp16 ended in 'Torch not compiled with CUDA enabled' (a traceback); --amp --cpu
    trained, in fp32; --memory-efficient-bf16 asked for an XLA device."""
    for flag in ("--fp16", "--amp", "--memory-efficient-bf16"):
        rc, out = train(data_bin, tmp_path / flag.strip("-"), "--cpu", "--max-update", 1, flag)
        assert rc == 1, out[-2000:]
        errors = [l for l in out.splitlines() if l.startswith("error:")]
        assert len(errors) == 1 and flag in errors[0], out[-2000:]
        assert "Traceback" not in out and "num_updates" not in out


def test_generation_keeps_fp16_on_cpu(data_bin):
    """The checks are for training: a generation command's --fp16 casts the model and runs on CPU,
    and the model args of a checkpoint trained with --fp16 are not the current command's."""
    _, model, args = build(data_bin, "--cpu")
    gen = options.parse_args_and_arch(options.get_generation_parser(),
                                      input_args=[str(data_bin), *MODEL[:9], "--path", "x.pt", "--fp16", "--cpu"])
    train_args = type(args)(**{**vars(args), "fp16": True})
    smoe_transformer.check_precision(train_args, tasks.setup_task(gen))  # no error
    with pytest.raises(UserError, match="--fp16 needs a CUDA GPU"):
        smoe_transformer.check_precision(train_args, None)


def test_gpu_side_of_the_checks_with_a_mocked_cuda(data_bin, monkeypatch):
    """With CUDA (mocked: nothing runs on it), --fp16 and --amp pass the check; --smoe-bf16 passes
    on compute capability 8.0+ and is refused with the fix on older GPUs (V100: 7.0)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100-SXM2-32GB")
    cap = [(7, 0)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: cap[0])
    args = options.parse_args_and_arch(options.get_training_parser(), input_args=[str(data_bin), *MODEL, *TRAIN])
    for flags in ({"fp16": True}, {"amp": True}, {"memory_efficient_fp16": True, "fp16": True}):
        smoe_transformer.check_precision(type(args)(**{**vars(args), **flags}))
    bf16 = type(args)(**{**vars(args), "smoe_bf16": True})
    with pytest.raises(UserError, match=r"--smoe-bf16 needs a GPU that computes bf16.*V100.*7\.0.*--fp16 or --amp"):
        smoe_transformer.check_precision(bf16)
    cap[0] = (9, 0)
    smoe_transformer.check_precision(bf16)
    with pytest.raises(UserError, match="--cpu was given"):  # --cpu with a GPU present
        smoe_transformer.check_precision(type(args)(**{**vars(args), "amp": True, "cpu": True}))


# ----------------------------------------------------------------------------- the bf16 path


def test_smoe_bf16_autocasts_training_forwards_only(data_bin):
    torch.manual_seed(0)
    task, model, _ = build(data_bin, "--cpu", "--smoe-bf16")
    torch.manual_seed(0)
    _, ref, _ = build(data_bin, "--cpu")
    ref.load_state_dict(model.state_dict())
    s = toy_sample(task)
    net = s["net_input"]
    model.train(), ref.train()
    out, _ = model(**net)
    want, _ = ref(**net)
    assert out.dtype == torch.bfloat16 and want.dtype == torch.float32
    torch.testing.assert_close(out.float(), want, atol=0.1, rtol=0.05)
    out.float().sum().backward()
    assert all(p.dtype == torch.float32 and (p.grad is None or p.grad.dtype == torch.float32)
               for p in model.parameters())
    assert model.encoder.layers[1].moe.experts.w1.grad is not None
    model.eval(), ref.eval()
    with torch.no_grad():  # validation and generation: fp32, the model as it is
        assert torch.equal(model(**net)[0], ref(**net)[0])


def test_smoe_bf16_trains_through_fairseq_train_on_cpu(data_bin, tmp_path):
    """8 updates with --smoe-bf16 and with fp32, same seed and batches: finite losses, close to
    fp32's but not its (the forwards did run in bf16), fp32 weights in the checkpoint."""
    rc, out = train(data_bin, tmp_path / "bf16", "--cpu", "--max-update", 8, "--smoe-bf16")
    assert rc == 0, out[-3000:]
    rc, ref = train(data_bin, tmp_path / "fp32", "--cpu", "--max-update", 8)
    assert rc == 0, ref[-3000:]
    logs, refs = json_logs(out), json_logs(ref)
    assert len(logs) == len(refs) >= 6
    losses = [float(l["loss"]) for l in logs]
    assert all(torch.isfinite(torch.tensor(losses)))
    for a, b in zip(logs, refs):
        assert abs(float(a["loss"]) - float(b["loss"])) < 0.05 * float(b["loss"])
    a = torch.load(tmp_path / "bf16" / "checkpoint_last.pt", map_location="cpu", weights_only=True)["model"]
    b = torch.load(tmp_path / "fp32" / "checkpoint_last.pt", map_location="cpu", weights_only=True)["model"]
    assert all(t.dtype == b[k].dtype for k, t in a.items())
    w = "encoder.layers.1.moe.experts.w1"
    assert a[w].dtype == torch.float32 and not torch.equal(a[w], b[w])
    assert (a[w] - b[w]).abs().max() <= 2 * 8 * 1e-3  # Adam moves each weight by at most ~lr per update


def test_train_sh_drops_every_gpu_precision_flag_of_a_recipe_on_cpu(data_bin, tmp_path):
    """A recipe with --memory-efficient-bf16 (before: kept, and fairseq asked for an XLA device)
    and --amp (before: kept, fp32 in silence) trains on CPU in fp32, saying what it dropped."""
    d = tmp_path / "data"
    d.mkdir()
    (d / "data-bin").symlink_to(data_bin)
    (d / "lang_pairs.txt").write_text("en-de,de-en\n")
    (d / "langs.txt").write_text("de,en\n")
    conf = tmp_path / "gpu-recipe.conf"
    conf.write_text(" ".join(a for a in MODEL if a not in ("--lang-pairs", "en-de,de-en", "--langs", "de,en"))
                    + "\n" + " ".join(TRAIN) + "\n--memory-efficient-bf16 --amp\n")
    run = subprocess.run(["bash", str(ROOT / "scripts" / "train.sh"), str(conf), str(d), str(tmp_path / "save"),
                          "--max-update", "1"], capture_output=True, text=True, env=env(), timeout=600)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-3000:]
    for flag in ("--memory-efficient-bf16", "--amp"):
        assert f"dropping the recipe's {flag}" in out
