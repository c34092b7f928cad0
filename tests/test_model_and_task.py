"""The fairseq side, in-process: model/architecture building, flag errors, the task's
checks for languages and data, and the batch sampler that keeps every sentence."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fairseq_smoe  # noqa: E402,F401
from fairseq import options, tasks  # noqa: E402
from fairseq_smoe.modules.smoe_block import SMoEBlock  # noqa: E402
from fairseq_smoe.tasks.smoe_translation import keep_every_batch  # noqa: E402




def parse(data, *extra, arch="smoe_transformer_tiny"):
    parser = options.get_training_parser()
    argv = [str(data), "--task", "smoe_translation", "--lang-pairs", "en-de,de-en", "--langs", "en,de",
            "--encoder-langtok", "tgt", "--decoder-langtok", "--arch", arch,
            "--criterion", "smoe_label_smoothed_cross_entropy", "--cpu", *extra]
    return options.parse_args_and_arch(parser, input_args=argv)


def build(data, *extra, arch="smoe_transformer_tiny"):
    args = parse(data, *extra, arch=arch)
    task = tasks.setup_task(args)
    return task, task.build_model(args)


def test_tiny_arch_layout_and_forward(dict_dir):
    task, model = build(dict_dir, "--smoe-strata", "2,2", "--moe-expert-count", "4", "--share-all-embeddings")
    enc, dec = model.smoe_blocks("encoder"), model.smoe_blocks("decoder")
    assert len(enc) == len(dec) == 1  # layer 2 of 2 on each side (--moe-freq 2)
    assert model.encoder.layers[1].moe is enc[0] and not hasattr(model.encoder.layers[0], "moe")
    assert enc[0].cfg.strata == (2, 2) and [r.out_features for r in enc[0].routers] == [4, 2]
    assert model.encoder.layers[1].normalize_before and model.decoder.layers[1].normalize_before
    src = torch.randint(4, len(task.source_dictionary), (3, 7))
    prev = torch.randint(4, len(task.target_dictionary), (3, 5))
    logits, extra = model(src, torch.full((3,), 7), prev)
    assert logits.shape == (3, 5, len(task.target_dictionary))
    record = extra["routing"]  # this forward's statistics: one slot per side, layer 2
    assert [(e.side, e.layer) for e in record.entries] == [("encoder", 1), ("decoder", 1)]
    assert record.blocks("encoder")[0].passes_TB.shape == (7, 3)
    assert record.blocks("decoder")[0].passes_TB.shape == (5, 3)
    for stats in record.blocks():
        passes = stats.passes_TB[stats.routed_TB]
        assert passes.min() >= 1 and passes.max() <= 2


@pytest.mark.parametrize("arch,layers,dim,experts", [
    ("smoe_transformer", 6, 512, 8), ("smoe_transformer_big", 6, 1024, 16)])
def test_paper_sizes(dict_dir, arch, layers, dim, experts):
    args = parse(dict_dir, arch=arch)
    assert (args.encoder_layers, args.encoder_embed_dim, args.moe_expert_count, args.moe_freq) == (layers, dim, experts, 2)
    assert args.encoder_normalize_before and args.decoder_normalize_before


def test_moe_freq_places_blocks(dict_dir):
    _, model = build(dict_dir, "--encoder-layers", "6", "--decoder-layers", "6", "--moe-freq", "2")
    assert [i for i, l in enumerate(model.encoder.layers) if hasattr(l, "moe")] == [1, 3, 5]
    assert [i for i, l in enumerate(model.decoder.layers) if hasattr(l, "moe")] == [1, 3, 5]
    _, dense = build(dict_dir, "--moe-freq", "0")
    assert not any(isinstance(m, SMoEBlock) for m in dense.modules())


@pytest.mark.parametrize("flags,words", [
    (["--moe-expert-count", "4", "--smoe-strata", "2,3"], ["sums to 5", "--moe-expert-count is 4"]),
    (["--smoe-strata", "2,two"], ["not a comma-separated list"]),
    (["--moe-expert-count", "4", "--smoe-strata", "0,4"], ["at least one expert"]),
    (["--moe-eom", "1.5"], ["--moe-eom"]),
])
def test_bad_flags_name_the_problem(dict_dir, flags, words):
    with pytest.raises(ValueError) as err:
        build(dict_dir, *flags)
    for w in words:
        assert w in str(err.value)


def test_unknown_language_pair_is_named(dict_dir):
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, input_args=[
        str(dict_dir), "--task", "smoe_translation", "--lang-pairs", "en-xx", "--langs", "en,de",
        "--arch", "smoe_transformer_tiny", "--cpu"])
    with pytest.raises(ValueError, match="'xx' of direction en-xx has no language token"):
        tasks.setup_task(args)


def test_missing_dictionary_and_data_are_named(dict_dir, tmp_path_factory):
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(FileNotFoundError, match=r"dict\.en\.txt"):
        tasks.setup_task(parse(empty))
    task = tasks.setup_task(parse(dict_dir))
    with pytest.raises(FileNotFoundError) as err:
        task.load_dataset("train")
    msg = str(err.value)
    assert "train.en-de.en" in msg and "en-de" in msg and "de-en" in msg


def test_keep_every_batch_restores_the_dropped_tail():
    indices = np.arange(21)
    batches = [np.arange(0, 8), np.arange(8, 16)]  # what fairseq returns after dropping 16..20
    fixed = keep_every_batch(batches, indices)
    assert sorted(np.concatenate(fixed).tolist()) == list(range(21))
    assert keep_every_batch(batches, np.arange(16)) == batches
