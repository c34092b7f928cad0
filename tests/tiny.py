"""Helpers shared by the in-process tests of the fairseq side: the tiny model with its task and
criterion, built from flags on a data dir with only dictionaries, and a hand-made batch."""

import torch
from fairseq import options, tasks


def build_tiny(data, *extra):
    """(task, model, criterion) of smoe_transformer_tiny at d 32, FFN 64, en<->de, ``extra`` flags."""
    argv = [str(data), "--task", "smoe_translation", "--lang-pairs", "en-de,de-en", "--langs", "en,de",
            "--encoder-langtok", "tgt", "--decoder-langtok", "--arch", "smoe_transformer_tiny",
            "--encoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64",
            "--criterion", "smoe_label_smoothed_cross_entropy", "--share-all-embeddings", "--cpu", *extra]
    args = options.parse_args_and_arch(options.get_training_parser(), input_args=argv)
    task = tasks.setup_task(args)
    return task, task.build_model(args), task.build_criterion(args)


def toy_sample(task, B=3, S=7, T=5, seed=0):
    """B sentence pairs of random tokens, sentence 0's source left-padded by 2."""
    g = torch.Generator().manual_seed(seed)
    V = len(task.source_dictionary)
    src = torch.randint(4, V, (B, S), generator=g)
    src[0, :2] = task.source_dictionary.pad()  # left padding
    tgt = torch.randint(4, V, (B, T), generator=g)
    prev = torch.cat([torch.full((B, 1), task.target_dictionary.eos()), tgt[:, :-1]], 1)
    return {"net_input": {"src_tokens": src, "src_lengths": torch.tensor([S - 2, S, S]),
                          "prev_output_tokens": prev}, "target": tgt, "ntokens": B * T}


def save_checkpoint(model, args, path):
    """``model`` as a checkpoint file the way fairseq-train writes one (cfg, model, history)."""
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(convert_namespace_to_omegaconf(args), resolve=True, enum_to_str=True)
    history = [{"criterion_name": "x", "optimizer_name": "x", "lr_scheduler_state": {}, "num_updates": 0}]
    torch.save({"cfg": cfg, "model": model.state_dict(), "args": None,
                "optimizer_history": history, "extra_state": {}}, path)
