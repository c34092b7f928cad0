"""The named recipes of the paper's tables (configs/{m4,m15,opus100}/*.conf): each one parses
with fairseq's own parser into the system it names, with the paper's training setup, and
builds a model (tiny dims, same experts/strata/flags) that runs forward and backward."""

import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: E401,E702

import pytest
import torch

import fairseq_smoe  # noqa: F401
from fairseq import options, tasks
from fairseq_smoe.cost import count, shape_from_args
from fairseq_smoe.modules.cmr import CMRBlock
from fairseq_smoe.modules.stacked import StackedMoE
from fairseq_smoe.recipes import CONFIG_DIR, load_config, training_flags

SYSTEMS = {
    "m4": ["dense", "moe", "switch", "moe-eom", "moe-cmr", "stack-2x4", "smoe-4-4", "stack-4x2",
           "smoe-2-2-2-2"],
    "m15": ["dense", "moe", "switch", "moe-eom", "moe-cmr", "smoe-4-12", "smoe-12-4", "smoe-8-8",
            "smoe-4-4-8", "smoe-8-4-4", "smoe-4-4-4-4", "moe-32"],
    "opus100": ["dense", "moe", "switch", "moe-eom", "moe-cmr", "smoe-4-12", "smoe-4-4-4-4"],
}
CONFIGS = [f"{bench}/{name}" for bench, names in SYSTEMS.items() for name in names]
EXPERTS = {"m4": 8, "m15": 16, "opus100": 16}

# Small enough to build 28 models quickly; experts, strata and all other flags stay as configured.
TINY = ["--encoder-embed-dim", "16", "--encoder-ffn-embed-dim", "32", "--decoder-embed-dim", "16",
        "--decoder-ffn-embed-dim", "32", "--encoder-attention-heads", "2",
        "--decoder-attention-heads", "2", "--encoder-layers", "2", "--decoder-layers", "2"]


def expected(name):
    """What the config name says: (experts, strata, top1, stack, cmr, eom, dense)."""
    bench, system = name.split("/")
    E = EXPERTS[bench]
    want = dict(experts=E, strata=(E,), top1=False, stack=1, cmr=False, eom=0.0, dense=False)
    if system == "dense":
        want["dense"] = True
    elif system == "moe-32":
        want.update(experts=32, strata=(32,))
    elif system.startswith("smoe-"):
        want["strata"] = tuple(int(n) for n in system[5:].split("-"))
        want["experts"] = sum(want["strata"])
    elif system.startswith("stack-"):
        n, per = (int(v) for v in system[6:].split("x"))
        want.update(stack=n, experts=n * per, strata=(n * per,))
    want["top1"] = system == "switch"
    want["cmr"] = system == "moe-cmr"
    want["eom"] = 0.1 if system == "moe-eom" else 0.0
    return want


def parse(flags, data="DATA"):
    return options.parse_args_and_arch(options.get_training_parser(), input_args=[str(data), *flags])


def test_every_system_of_the_tables_has_a_config():
    found = {str(p.relative_to(CONFIG_DIR).with_suffix("")) for b in SYSTEMS
             for p in (CONFIG_DIR / b).glob("*.conf") if not p.name.startswith("_")}
    assert found == set(CONFIGS)


@pytest.mark.parametrize("bench", list(SYSTEMS))
def test_base_has_the_papers_training_setup(bench):
    args = parse(load_config(f"{bench}/moe")[0])
    assert args.arch == ("smoe_transformer" if bench == "m4" else "smoe_transformer_big")
    assert (args.task, args.encoder_langtok, args.decoder_langtok) == ("smoe_translation", "tgt", True)
    assert (args.sampling_method, args.sampling_temperature) == ("temperature", 5 if bench == "opus100" else 1)
    assert args.optimizer == "adam" and eval(args.adam_betas) == (0.9, 0.98) and args.adam_eps == 1e-6
    assert args.lr == [5e-4 if bench == "opus100" else 8e-4] and args.lr_scheduler == "inverse_sqrt"
    assert (args.warmup_updates, args.warmup_init_lr, args.max_update) == (8000, 1e-7, 100000)
    assert (args.dropout, args.attention_dropout, args.activation_dropout, args.weight_decay) == (0.3, 0.1, 0.0, 0.0)
    assert (args.criterion, args.label_smoothing, args.moe_gate_loss_wt) == ("smoe_label_smoothed_cross_entropy", 0.1, 0.01)
    assert args.share_all_embeddings and (args.max_source_positions, args.max_target_positions) == (512, 512)
    assert (args.max_tokens, args.seed, args.best_checkpoint_metric, args.keep_interval_updates) == (4096, 42, "loss", 1)
    assert (args.validate_interval_updates, args.save_interval_updates) == (500, 500)
    assert args.skip_invalid_size_inputs_valid_test and args.fp16
    assert args.encoder_normalize_before and args.decoder_normalize_before
    # global batch: 32 GPUs x 4096 tokens (M4/M15), 65K tokens (OPUS-100)
    for world, freq in ((1, 16 if bench == "opus100" else 32), (8, 2 if bench == "opus100" else 4)):
        flags = training_flags(f"{bench}/moe", world)
        assert flags[-2:] == ["--update-freq", str(freq)]



@pytest.mark.parametrize("name", CONFIGS)
def test_config_builds_the_system_it_names_and_trains(name, dict_dir):
    flags, _ = load_config(name)
    big = parse(flags)
    want = expected(name)
    # the full-size flags describe the named system
    assert big.moe_freq == (0 if want["dense"] else 2)
    if not want["dense"]:
        assert big.moe_expert_count == want["experts"]
        assert (big.moe_top1_expert, big.moe_stack, big.moe_cmr, big.moe_eom) == (
            want["top1"], want["stack"], want["cmr"], want["eom"])
        if want["top1"]:
            assert big.moe_capacity_factor == 1.0
        if want["cmr"]:
            assert (big.cmr_gate_drop, big.cmr_gate_loss_wt, big.cmr_gate_loss_p) == (0.1, 0.01, 0.8)

    # a tiny model with the same MoE flags: structure, exact parameter count, forward/backward
    # on CPU without the GPU-only precision flags, as scripts/train.sh runs a recipe on a machine
    # without a GPU (--fp16 with --cpu is refused in training: tests/test_precision.py)
    cpu_flags = [f for f in flags if f not in ("--fp16", "--memory-efficient-fp16", "--amp")]
    args = parse(cpu_flags + ["--lang-pairs", "en-de,de-en", "--langs", "en,de", "--cpu"] + TINY, dict_dir)
    task = tasks.setup_task(args)
    torch.manual_seed(0)
    model, crit = task.build_model(args), task.build_criterion(args)
    V = len(task.source_dictionary)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == count(shape_from_args(args, V))[0]  # the cost tool's analytic count
    slots = [layer.moe for side in (model.encoder, model.decoder) for layer in side.layers if hasattr(layer, "moe")]
    if want["dense"]:
        assert not slots
    else:
        assert len(slots) == 2  # layer 2 of each side (--moe-freq 2)
        for slot in slots:
            assert isinstance(slot, CMRBlock) == want["cmr"]
            inner = slot.moe if want["cmr"] else slot
            assert isinstance(inner, StackedMoE) == (want["stack"] > 1)
            blocks = list(inner.blocks) if want["stack"] > 1 else [inner]
            per_layer = want["experts"] // want["stack"]
            for b in blocks:
                assert b.cfg.strata == (want["strata"] if want["stack"] == 1 else (per_layer,))
                assert b.cfg.top1 == want["top1"] and b.cfg.eom == want["eom"]
    B, S, T = 2, 6, 5
    g = torch.Generator().manual_seed(0)
    src = torch.randint(4, V, (B, S), generator=g)
    tgt = torch.randint(4, V, (B, T), generator=g)
    prev = torch.cat([torch.full((B, 1), task.target_dictionary.eos()), tgt[:, :-1]], 1)
    sample = {"net_input": {"src_tokens": src, "src_lengths": torch.full((B,), S), "prev_output_tokens": prev},
              "target": tgt, "ntokens": B * T}
    model.train()
    loss, _, log = crit(model, sample)
    loss.backward()
    assert torch.isfinite(loss)
    assert model.encoder.embed_tokens.weight.grad.abs().sum() > 0
    assert ("moe_gate_loss" in log) != want["dense"] and ("cmr_gate_loss" in log) == want["cmr"]
