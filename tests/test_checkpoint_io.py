"""Checkpoints that cannot be used fail with one message naming the file, at every entry point
(fairseq-train resume and --restore-file, fairseq-generate, fairseq-interactive, the evaluator,
cost --checkpoint), and a save killed half-way never leaves an unreadable checkpoint_last.pt.

One tiny training run on the committed Bible fixture (en-de, de-en) is killed in the middle of
copying its second save to checkpoint_last.pt, then resumed; the bad files are made once from
its checkpoint (the resume runs fairseq-train's main in-process). In-process calls go through
the functions the CLIs call; real fairseq-train and fairseq-generate commands (started with the
training) check that the user sees one line and no traceback."""

import fractions
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import fairseq_smoe  # noqa: E402,F401
from fairseq import checkpoint_utils, options, tasks  # noqa: E402
from fairseq.dataclass.utils import convert_namespace_to_omegaconf  # noqa: E402
from fairseq_smoe import checkpoint_io, cost, evaluate  # noqa: E402
from fairseq_smoe.checkpoint_io import CheckpointError  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "bible"
PLUGIN = str(ROOT / "fairseq_smoe")
TASK = ["--user-dir", PLUGIN, "--task", "smoe_translation", "--lang-pairs", "en-de,de-en",
        "--langs", "de,en", "--encoder-langtok", "tgt", "--decoder-langtok"]

# In the killed run, copying the update-4 save into checkpoint_last.pt writes half the bytes,
# signals the test and hangs until SIGKILL (both for fairseq's shutil.copyfile and for a
# copyfileobj-based copy).
STALL = r"""
import os, re, shutil, sys, time
def stalling(copy):
    def stall(fsrc, fdst, *args, **kwargs):
        src, dst = (os.path.basename(str(getattr(f, "name", ""))) for f in (fsrc, fdst))
        if re.fullmatch(r"checkpoint_\d+_4\.pt", src) and dst.startswith("checkpoint_last"):
            data = fsrc.read()
            fdst.write(data[: len(data) // 2])
            fdst.flush()
            open(os.environ["STALL_MARK"], "w").close()
            time.sleep(600)
        return copy(fsrc, fdst, *args, **kwargs)
    return stall
shutil.copyfileobj = stalling(shutil.copyfileobj)
if hasattr(shutil, "_fastcopy_sendfile"):  # what shutil.copyfile uses on Linux
    shutil._fastcopy_sendfile = stalling(shutil._fastcopy_sendfile)
sys.argv[0] = "fairseq-train"
from fairseq_cli.train import cli_main
cli_main()
"""


def train_args(data_bin, save_dir, max_update, *extra):
    return [str(data_bin), *TASK, "--arch", "smoe_transformer_tiny", "--smoe-strata", "2,2",
            "--moe-expert-count", "4", "--criterion", "smoe_label_smoothed_cross_entropy",
            "--share-all-embeddings", "--optimizer", "adam", "--lr", "3e-3", "--max-tokens", "1024",
            "--max-update", str(max_update), "--cpu", "--num-workers", "0", "--seed", "1",
            "--save-dir", str(save_dir), "--save-interval-updates", "2", "--save-interval", "1000",
            "--validate-interval-updates", "2", "--no-epoch-checkpoints", *extra]


def num_updates(path):
    return checkpoint_utils.load_checkpoint_to_cpu(str(path))["optimizer_history"][-1]["num_updates"]


def binarize(dest):
    from fairseq_cli import preprocess

    parser = options.get_preprocessing_parser()
    preprocess.main(parser.parse_args([
        "--source-lang", "en", "--target-lang", "de", "--trainpref", str(FIXTURE / "train.en-de"),
        "--validpref", str(FIXTURE / "valid.en-de"), "--testpref", str(FIXTURE / "test.en-de"),
        "--destdir", str(dest), "--joined-dictionary", "--workers", "1"]))


def train_in_process(argv):
    """fairseq-train's main in this process; returns the trainer's and checkpoint_utils' log lines."""
    import logging

    from fairseq import distributed_utils
    from fairseq_cli import train

    class Lines(logging.Handler):
        def __init__(self):
            super().__init__(logging.INFO)
            self.lines = []

        def emit(self, record):
            self.lines.append(record.getMessage())

    lines = Lines()
    loggers = {logging.getLogger(n): logging.getLogger(n).level for n in ("fairseq.trainer", "fairseq.checkpoint_utils")}
    for logger in loggers:
        logger.addHandler(lines)
        logger.setLevel(logging.INFO)
    try:
        args = options.parse_args_and_arch(options.get_training_parser(), argv)
        distributed_utils.call_main(convert_namespace_to_omegaconf(args), train.main)
    finally:
        for logger, level in loggers.items():
            logger.removeHandler(lines)
            logger.setLevel(level)
    return "\n".join(lines.lines)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt")
    data_bin, save = tmp / "data-bin", tmp / "save"
    binarize(data_bin)
    clis = start_clis(tmp / "cli", data_bin)  # they run while the model trains
    mark = tmp / "stalled"
    killed = subprocess.Popen([sys.executable, "-c", STALL, *train_args(data_bin, save, 4)],
                              env={**os.environ, "STALL_MARK": str(mark)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not mark.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    stalled = mark.exists()
    killed.send_signal(signal.SIGKILL)
    log = killed.communicate()[0]
    assert stalled, f"the save never reached the copy to checkpoint_last.pt:\n{log[-3000:]}"
    after_kill = {p.name: p.stat().st_size for p in save.iterdir()}
    last_after_kill = None
    try:
        last_after_kill = num_updates(save / "checkpoint_last.pt")
    except Exception as err:  # noqa: BLE001  (reported by the test below)
        last_after_kill = err
    resumed = train_in_process(train_args(data_bin, save, 6))
    return {"tmp": tmp, "data_bin": data_bin, "save": save, "after_kill": after_kill,
            "last_after_kill": last_after_kill, "resumed": resumed, "clis": clis}


def start_clis(d, data_bin):
    """fairseq-train resuming from random bytes, fairseq-generate given a Git LFS pointer: the real
    commands, started side by side; {path named in the error: process}."""
    (d / "save").mkdir(parents=True)
    (d / "save" / "checkpoint_last.pt").write_bytes(bytes(range(256)) * 20)
    (d / "lfs.pt").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 22286845\n")
    py = [sys.executable, "-m"]
    commands = {
        d / "save" / "checkpoint_last.pt": py + ["fairseq_cli.train", *train_args(data_bin, d / "save", 20)],
        d / "lfs.pt": py + ["fairseq_cli.generate", *decode_args(data_bin, d / "lfs.pt")],
    }
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return {path: subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True, env=env)
            for path, cmd in commands.items()}


def test_killed_save_leaves_the_previous_checkpoint_last_readable(run):
    # the kill hit the copy of the update-4 save: checkpoint_last.pt is still the update-2 one
    assert run["last_after_kill"] == 2, run["last_after_kill"]
    assert "checkpoint_1_4.pt" in run["after_kill"]


def test_resume_after_an_interrupted_save(run):
    out = run["resumed"]  # fairseq-train's main, in this process
    assert re.search(r"Loaded checkpoint \S*checkpoint_last\.pt \(epoch 1 @ 2 updates\)", out), out
    save = run["save"]
    assert num_updates(save / "checkpoint_last.pt") == 6
    for ckpt in save.glob("*.pt"):  # every file of the run is whole
        assert num_updates(ckpt) in (2, 4, 6), ckpt
    assert not list(save.glob("*.tmp"))  # the stale temp file of the kill was replaced


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    dst = tmp_path / "checkpoint_last.pt"
    dst.write_bytes(b"old")

    def fail(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(checkpoint_io.DiskFullError, match="no space left on device"):
        checkpoint_io.atomic_write(dst, fail)
    assert dst.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_last.pt"]
    checkpoint_io.atomic_write(dst, lambda f: f.write(b"new"))
    assert dst.read_bytes() == b"new"


# ----------------------------------------------------------------------------- bad checkpoints

KINDS = {  # file -> what the message must say
    "random.pt": "is not a PyTorch checkpoint",
    "truncated.pt": "is truncated",
    "empty.pt": "is empty",
    "lfs.pt": "Git LFS pointer",
    "tensor.pt": "holds a torch.Tensor",
    "state_dict.pt": "bare model state dict",
    "model_only.pt": "neither 'cfg' nor 'args'",
    "unsafe.pt": "safe loading (weights_only) refuses (fractions.Fraction)",
    "html.pt": "is a text file (it starts with '<!DOCTYPE html>",
    "legacy_truncated.pt": "is truncated",
    "missing.pt": "does not exist",
}


@pytest.fixture(scope="module")
def bad(run):
    d = run["tmp"] / "bad"
    d.mkdir()
    good = run["save"] / "checkpoint_1_4.pt"  # whole even without atomic copies (written, then renamed)
    raw = good.read_bytes()
    (d / "random.pt").write_bytes(bytes(range(256)) * 20)
    (d / "truncated.pt").write_bytes(raw[: len(raw) // 2])
    (d / "empty.pt").write_bytes(b"")
    (d / "lfs.pt").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 22286845\n")
    state = torch.load(good, map_location="cpu", weights_only=True)
    torch.save(torch.zeros(3), d / "tensor.pt")
    torch.save(state["model"], d / "state_dict.pt")
    torch.save({"model": state["model"]}, d / "model_only.pt")
    torch.save({**state, "extra": fractions.Fraction(1, 3)}, d / "unsafe.pt")  # not torch's safe types
    (d / "html.pt").write_text("<!DOCTYPE html>\n<html><body>404 Not Found</body></html>\n")
    torch.save(state, d / "legacy.pt", _use_new_zipfile_serialization=False)  # torch < 1.6 format
    (d / "legacy_truncated.pt").write_bytes((d / "legacy.pt").read_bytes()[:3_000_000])
    unknown = dict(state)
    unknown["cfg"] = dict(state["cfg"])
    model_args = unknown["cfg"]["model"] = type(state["cfg"]["model"])(**vars(state["cfg"]["model"]))
    model_args.arch = model_args._name = "xmoe_transformer"
    torch.save(unknown, d / "unknown_arch.pt")
    stock = dict(state)  # what a stock `fairseq-train --task translation --arch transformer` saves
    stock["cfg"] = {**state["cfg"], "task": {"_name": "translation", "data": str(run["data_bin"]),
                                             "source_lang": "en", "target_lang": "de"},
                    "model": {"_name": "transformer"}}
    torch.save(stock, d / "stock_translation.pt")
    return d


def assert_names(message, path, words):
    assert f"checkpoint {path}" in message and words in message, message
    assert "\n" not in message, message


def test_train_resume_names_every_bad_checkpoint(run, bad, tmp_path):
    """The code path of fairseq-train's resume: checkpoint_utils.load_checkpoint(cfg.checkpoint, trainer)."""
    from fairseq.trainer import Trainer

    args = options.parse_args_and_arch(options.get_training_parser(), train_args(run["data_bin"], tmp_path, 20))
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    trainer = Trainer(cfg, task, model, task.build_criterion(cfg.criterion))
    for name, words in KINDS.items():
        if name == "missing.pt":
            continue
        save = tmp_path / name.removesuffix(".pt")
        save.mkdir()
        shutil.copy(bad / name, save / "checkpoint_last.pt")
        cfg.checkpoint.save_dir = str(save)
        with pytest.raises(CheckpointError) as err:  # checkpoint_last.pt in --save-dir
            checkpoint_utils.load_checkpoint(cfg.checkpoint, trainer)
        assert_names(str(err.value), save / "checkpoint_last.pt", words)
        assert "--restore-file" in str(err.value)  # the fix names what to do to resume
        cfg.checkpoint.restore_file = str(bad / name)
        with pytest.raises(CheckpointError) as err:  # --restore-file
            checkpoint_utils.load_checkpoint(cfg.checkpoint, trainer)
        assert_names(str(err.value), bad / name, words)
        cfg.checkpoint.restore_file = "checkpoint_last.pt"
    # a --restore-file that does not exist is refused, not silently replaced by a fresh start
    cfg.checkpoint.restore_file = str(bad / "missing.pt")
    with pytest.raises(CheckpointError, match="--restore-file.*does not exist.*silently train from scratch"):
        checkpoint_utils.load_checkpoint(cfg.checkpoint, trainer)


def test_train_resume_into_another_model_names_file_and_both_models(run, tmp_path):
    from fairseq.trainer import Trainer

    shutil.copy(run["save"] / "checkpoint_1_4.pt", tmp_path / "checkpoint_last.pt")  # trained with strata 2,2
    args = options.parse_args_and_arch(options.get_training_parser(), train_args(
        run["data_bin"], tmp_path, 20, "--smoe-strata", "3,1"))
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    trainer = Trainer(cfg, task, task.build_model(cfg.model), task.build_criterion(cfg.criterion))
    with pytest.raises(CheckpointError) as err:
        checkpoint_utils.load_checkpoint(cfg.checkpoint, trainer)
    msg = str(err.value)
    assert f"checkpoint {tmp_path / 'checkpoint_last.pt'} does not fit the model" in msg
    assert "strata 2,2" in msg and "strata 3,1" in msg


def decode_args(data_bin, path, *extra):
    return [str(data_bin), *TASK, "--source-lang", "en", "--target-lang", "de", "--path", str(path),
            "--cpu", "--beam", "1", "--max-tokens", "1024", *extra]


def test_generate_and_interactive_name_every_bad_checkpoint(run, bad):
    """Both CLIs load with checkpoint_utils.load_model_ensemble(paths, overrides, task=task, ...):
    their real main() once each, then that call (as they make it) for every kind."""
    from fairseq_cli import generate, interactive

    for parser, main, name in ((options.get_generation_parser(), generate.main, "truncated.pt"),
                               (options.get_interactive_generation_parser(), interactive.main, "tensor.pt")):
        with pytest.raises(CheckpointError) as err:
            main(options.parse_args_and_arch(parser, decode_args(run["data_bin"], bad / name)))
        assert_names(str(err.value), bad / name, KINDS[name])
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(
        options.get_generation_parser(), decode_args(run["data_bin"], bad / "random.pt")))
    task = tasks.setup_task(cfg.task)

    def load(path, overrides=None):
        return checkpoint_utils.load_model_ensemble([str(path)], arg_overrides=overrides or {}, task=task,
                                                    suffix="", strict=True, num_shards=1)

    for name, words in {**KINDS, "unknown_arch.pt": "architecture 'xmoe_transformer'"}.items():
        with pytest.raises(CheckpointError) as err:
            load(bad / name)
        assert_names(str(err.value), bad / name, words)
    # another model: the checkpoint's strata overridden at decoding (--model-overrides)
    with pytest.raises(CheckpointError) as err:
        load(run["save"] / "checkpoint_1_4.pt", {"smoe_strata": "3,1"})
    msg = str(err.value)
    assert f"checkpoint {run['save'] / 'checkpoint_1_4.pt'} does not fit" in msg and "strata 3,1" in msg
    for good in (run["save"] / "checkpoint_1_4.pt", bad / "legacy.pt"):  # good ones still load
        (model,), _ = load(good)
        assert model.smoe_blocks("encoder")


@pytest.fixture(scope="module")
def eval_dir(run):
    """What evaluate checks for before it reads the checkpoint (never used further here)."""
    d = run["tmp"] / "eval-data"
    d.mkdir()
    (d / "data-bin").symlink_to(run["data_bin"])
    (d / "lang_pairs.txt").write_text("en-de,de-en\n")
    (d / "spm.model").write_bytes(b"")
    return d


def test_evaluate_names_every_bad_checkpoint(run, bad, eval_dir):
    for name, words in KINDS.items():
        with pytest.raises(SystemExit) as err:
            evaluate.main([str(bad / name), str(eval_dir), str(run["tmp"] / "eval-out")])
        assert str(err.value).startswith("error: ")
        assert_names(str(err.value), bad / name, words)
    # an architecture nobody registered, and a stock bilingual translation checkpoint
    with pytest.raises(CheckpointError) as err:
        evaluate.evaluate(bad / "unknown_arch.pt", eval_dir, run["tmp"] / "eval-out", cpu=True)
    assert_names(str(err.value), bad / "unknown_arch.pt", "architecture 'xmoe_transformer'")
    assert "--user-dir" in str(err.value)
    with pytest.raises(SystemExit, match=r"stock_translation.pt was trained with task 'translation'"):
        evaluate.main([str(bad / "stock_translation.pt"), str(eval_dir), str(run["tmp"] / "eval-out")])


def test_cost_names_every_bad_checkpoint(run, bad):
    for name, words in {**KINDS, "unknown_arch.pt": "architecture 'xmoe_transformer'"}.items():
        with pytest.raises(SystemExit) as err:
            cost.main(["--checkpoint", str(bad / name), "--data", str(run["data_bin"]), "--cpu"])
        assert str(err.value).startswith("error: ")
        assert_names(str(err.value), bad / name, words)


def test_every_cli_prints_one_line(run):
    """fairseq-train resume and fairseq-generate for real: exit 1, the last line of stderr is the
    message, no traceback (fairseq-interactive and the evaluator's checkpoint errors print through
    the same sys.excepthook; the evaluator and cost exit with theirs: above)."""
    for path, proc in run["clis"].items():
        stderr = proc.communicate(timeout=300)[1]
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert proc.returncode == 1, (path, stderr[-3000:])
        assert "Traceback" not in stderr, stderr[-3000:]
        assert lines[-1].startswith(f"error: checkpoint {path} "), lines[-1]
