"""fairseq-hydra-train is refused with one line giving the equivalent fairseq-train command.

fairseq 0.12.3's hydra entry point builds tasks and models only from dataclasses; the plugin's
task (a translation_multi_simple_epoch) and models take argparse flags only (see
fairseq_smoe/hydra_guard.py for why the plugin refuses rather than supports it)."""

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import fairseq_smoe  # noqa: E402,F401
from fairseq import options, tasks  # noqa: E402
from fairseq_smoe.hydra_guard import HydraNotSupported  # noqa: E402

PLUGIN = str(ROOT / "fairseq_smoe")

CONFIG = """\
# @package _group_
common:
  cpu: true
task:
  _name: smoe_translation
  data: {data}
  lang_pairs: en-de,de-en
  langs: [de, en]
  encoder_langtok: tgt
  decoder_langtok: true
model:
  _name: smoe_transformer_tiny
  smoe_strata: "2,2"
  moe_expert_count: 4
  share_all_embeddings: true
criterion:
  _name: smoe_label_smoothed_cross_entropy
  label_smoothing: 0.1
optimizer:
  _name: adam
  adam_betas: [0.9, 0.98]
lr_scheduler:
  _name: inverse_sqrt
  warmup_updates: 400
optimization:
  max_update: 2000
  lr: [0.003]
dataset:
  max_tokens: 2048
  num_workers: 0
checkpoint:
  save_dir: {save}
  no_epoch_checkpoints: true
"""


def hydra_train():
    script = Path(sys.executable).parent / "fairseq-hydra-train"
    return [str(script)] if script.exists() else [sys.executable, "-m", "fairseq_cli.hydra_train"]


def test_hydra_train_is_refused_with_the_equivalent_fairseq_train_command(tmp_path):
    data, save = tmp_path / "no-data-yet", tmp_path / "ckpt"  # refused before any data is read
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "smoe.yaml").write_text(CONFIG.format(data=data, save=save))
    run = subprocess.run(hydra_train() + ["--config-dir", str(tmp_path / "conf"), "--config-name", "smoe",
                                          f"common.user_dir={PLUGIN}"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 1
    assert "Traceback" not in run.stderr and "Could not infer task type" not in run.stderr, run.stderr[-3000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, run.stderr[-3000:]
    msg = errors[0]
    assert msg.startswith("error: fairseq-hydra-train cannot run this plugin's task smoe_translation and "
                          "model smoe_transformer_tiny"), msg
    assert not save.exists() or not any(save.iterdir())  # nothing trained
    # the command it gives is a valid fairseq-train command with the same settings
    argv = shlex.split(msg.split(": fairseq-train ", 1)[1])
    args = options.parse_args_and_arch(options.get_training_parser(), argv)
    assert (args.data, args.user_dir, args.task, args.arch) == (str(data), PLUGIN, "smoe_translation",
                                                                 "smoe_transformer_tiny")
    assert (args.lang_pairs, args.langs, args.encoder_langtok, args.decoder_langtok) == (
        "en-de,de-en", ["de", "en"], "tgt", True)
    assert (args.smoe_strata, args.moe_expert_count, args.share_all_embeddings) == ("2,2", 4, True)
    assert (args.criterion, args.label_smoothing) == ("smoe_label_smoothed_cross_entropy", 0.1)
    assert (args.optimizer, eval(args.adam_betas), args.lr) == ("adam", (0.9, 0.98), [0.003])
    assert (args.lr_scheduler, args.warmup_updates, args.max_update) == ("inverse_sqrt", 400, 2000)
    assert (args.max_tokens, args.num_workers, args.cpu) == (2048, 0, True)
    assert (args.save_dir, args.no_epoch_checkpoints) == (str(save), True)


def test_plugin_model_under_a_stock_hydra_task_is_refused_too(dict_dir):
    root = OmegaConf.create({
        "common": {"user_dir": PLUGIN},
        "task": {"_name": "translation", "data": str(dict_dir), "source_lang": "en", "target_lang": "de"},
        "model": {"_name": "smoe_transformer_tiny"},
    })
    with pytest.raises(HydraNotSupported, match=r"this plugin's model smoe_transformer_tiny.*fairseq-train "
                                                r"\S+ --user-dir \S+ --task translation --arch smoe_transformer_tiny"):
        tasks.setup_task(root.task)
    # stock components under hydra are not the plugin's business
    root.model._name = "transformer"
    assert type(tasks.setup_task(root.task)).__name__ == "TranslationTask"
