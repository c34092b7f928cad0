"""Issue 24, the command-line side: a user mistake gives one ``error:`` line and a non-zero exit
at every entry point (our tools, data_prep, scripts, fairseq's own mains with the plugin), bugs
keep their traceback; scripts stop when a step fails; stock fairseq checkpoints, checkpoint-tool
arguments and decoding options out of their domain are named before anything is written."""

import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: E401,E702

import importlib
import inspect
import json
import os
import re
import subprocess
import traceback

import pytest
import torch

import fairseq_smoe  # noqa: F401
from data_prep.spm_binarize import DataPrepError, prepare, read_idx_sizes
from fairseq import options, tasks
from fairseq_smoe import checkpoints, cost, dial, errors, evaluate, analyze
from fairseq_smoe.errors import ConfigError, UserError

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from tiny import save_checkpoint  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
VENV_BIN = pathlib.Path(sys.executable).parent
TINY = ["--encoder-layers", "1", "--decoder-layers", "1", "--encoder-embed-dim", "16", "--decoder-embed-dim", "16",
        "--encoder-ffn-embed-dim", "32", "--decoder-ffn-embed-dim", "32", "--encoder-attention-heads", "2",
        "--decoder-attention-heads", "2"]


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A prepared en-de data directory (the committed Bible fixture) and three untrained
    checkpoints on it: a tiny SMoE (strata 2,2), and stock fairseq transformers of a
    multilingual and of a bilingual task (no SMoE options at all)."""
    tmp = tmp_path_factory.mktemp("user_errors")
    data = tmp / "data"
    prepare(ROOT / "tests" / "fixtures" / "bible", ["en-de"], data, vocab_size=300, verbose=False)
    ml = ["--lang-pairs", "en-de,de-en", "--langs", (data / "langs.txt").read_text().strip(),
          "--encoder-langtok", "tgt", "--decoder-langtok"]
    made = {}
    for name, argv in {
        "smoe": ["--task", "smoe_translation", *ml, "--arch", "smoe_transformer_tiny", "--smoe-strata", "2,2",
                 "--encoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64"],
        "stock_ml": ["--task", "translation_multi_simple_epoch", *ml, "--arch", "transformer", *TINY],
        "stock_bi": ["--task", "translation", "-s", "en", "-t", "de", "--arch", "transformer", *TINY],
    }.items():
        args = options.parse_args_and_arch(options.get_training_parser(),
                                           input_args=[str(data / "data-bin"), *argv, "--share-all-embeddings", "--cpu"])
        task = tasks.setup_task(args)
        torch.manual_seed(0)
        model = task.build_model(args)
        save_checkpoint(model, args, tmp / f"{name}.pt")
        made[name] = (model, args)
    return {"tmp": tmp, "data": data, "models": made, **{name: tmp / f"{name}.pt" for name in made}}


def one_error_line(stderr):
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr[-3000:]
    return lines[-1]


# ----------------------------------------------------------------------------- category 3: one mechanism


CLI_CODE = errors.cli(lambda: None).__code__
MAINS = ["fairseq_smoe.evaluate", "fairseq_smoe.analyze", "fairseq_smoe.dial", "fairseq_smoe.cost",
         "fairseq_smoe.checkpoints", "fairseq_smoe.report", "fairseq_smoe.recipes",
         *[f"data_prep.{p.stem}" for p in sorted((ROOT / "data_prep").glob("*.py")) if "def main" in p.read_text()],
         *[p.stem for p in sorted((ROOT / "scripts").glob("*.py")) if "def main" in p.read_text()]]


def test_every_main_is_wrapped_and_no_site_formats_its_own_error_line():
    sys.path.insert(0, str(ROOT / "scripts"))
    assert len(MAINS) >= 18  # 7 tools, 6 data_prep mains, the scripts' mains
    for name in MAINS:
        main = importlib.import_module(name).main
        assert main.__code__ is CLI_CODE, f"{name}.main is not wrapped with @errors.cli"
        source = inspect.getsource(inspect.getmodule(main))
        assert not re.search(r"(sys\.exit|SystemExit)\(f?[\"'][\w ]*error:", source), name


def test_cli_one_line_and_status_one_bugs_keep_their_traceback(capsys):
    @errors.cli
    def main(kind):
        raise kind("--smoe-max-passes 0: give a pass budget K in 1..2\n(second line)")

    with pytest.raises(SystemExit, match=r"^error: --smoe-max-passes 0: .* \(second line\)$") as exit_info:
        main(ConfigError)
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == "error: --smoe-max-passes 0: give a pass budget K in 1..2 (second line)\n"
    with pytest.raises(KeyError):  # a bug: not caught, its traceback stays
        main(KeyError)
    assert errors.cli(returns=True)(lambda: (_ for _ in ()).throw(UserError("x")))() == 1
    assert capsys.readouterr().err == "error: x\n"
    # the checks that raised ValueError still are ValueErrors (existing callers and tests)
    assert issubclass(ConfigError, ValueError) and issubclass(DataPrepError, UserError)
    assert issubclass(errors.MissingFileError, FileNotFoundError) and issubclass(errors.MissingFileError, UserError)


def test_flag_checks_raise_user_errors_naming_the_flag_as_typed():
    from fairseq_smoe.models.smoe_transformer import parse_widths
    from fairseq_smoe.modules.config import SMoEConfig, parse_strata
    from fairseq_smoe.modules.expert_parallel import ep_layout

    cases = [
        (lambda: parse_strata("2,x", 4), "--smoe-strata '2,x'"),
        (lambda: parse_strata("2,1", 4), "--moe-expert-count is 4"),
        (lambda: SMoEConfig(8, 16, (2, 2), strata_ffn=(16, 32, 48)), "--smoe-strata-ffn gives 3 widths"),
        (lambda: parse_widths("16,abc"), "--smoe-strata-ffn '16,abc'"),
        (lambda: ep_layout(4, 3, 0), "--moe-expert-parallel splits the 4 experts"),
    ]
    for make, words in cases:
        with pytest.raises(ConfigError) as err:
            make()
        assert words in str(err.value)


def test_set_max_passes_of_the_model_is_a_user_error(setup):
    model, _ = setup["models"]["smoe"]
    for k in (0, 3):
        with pytest.raises(ConfigError, match=rf"--smoe-max-passes {k}: the SMoE blocks of this model have 2 strata"):
            model.set_max_passes(k)
    model.set_max_passes(None)


def test_excepthook_reads_a_user_error_out_of_a_spawned_workers_traceback(capsys):
    """fairseq's own spawn (GPUs) hands the parent the worker's formatted traceback inside a
    ProcessRaisedException; the plugin's hook prints its UserError as the one line."""
    from torch.multiprocessing import ProcessRaisedException

    try:
        ep_layout = importlib.import_module("fairseq_smoe.modules.expert_parallel").ep_layout
        ep_layout(4, 3, 0)
    except ConfigError:
        trace = traceback.format_exc()
    worker = ProcessRaisedException(f"\n\n-- Process 1 terminated with the following error:\n{trace}", 1, 4242)
    sys.excepthook(ProcessRaisedException, worker, None)
    err = capsys.readouterr().err
    assert err.startswith("error: --moe-expert-parallel splits the 4 experts") and "Traceback" not in err
    assert err.count("\n") == 1
    bug = ProcessRaisedException("\n\n-- Process 0 terminated with the following error:\nTraceback (most recent "
                                 "call last):\n  File \"x.py\", line 1, in f\nKeyError: 'x'\n", 0, 4243)
    assert errors.user_error_in_trace(str(bug)) is None  # a bug keeps the default hook's traceback


def test_fairseq_train_and_generate_print_one_line(setup):
    """The real fairseq mains with --user-dir: our checks' messages as one line, status 1."""
    data = setup["data"]
    task = [str(data / "data-bin"), "--user-dir", str(ROOT / "fairseq_smoe"), "--task", "smoe_translation",
            "--lang-pairs", "en-de,de-en", "--langs", "de,en", "--encoder-langtok", "tgt", "--decoder-langtok",
            "--cpu", "--num-workers", "0"]
    train = [str(VENV_BIN / "fairseq-train"), *task, "--arch", "smoe_transformer_tiny", "--smoe-strata", "2,2",
             "--smoe-strata-ffn", "16,32,48", "--criterion", "smoe_label_smoothed_cross_entropy",
             "--optimizer", "adam", "--lr", "1e-3", "--max-update", "1", "--max-tokens", "512",
             "--save-dir", str(setup["tmp"] / "train-save")]
    generate = [str(VENV_BIN / "fairseq-generate"), *task, "--source-lang", "en", "--target-lang", "de",
                "--path", str(setup["smoe"]), "--gen-subset", "test", "--beam", "1", "--max-tokens", "1024",
                "--smoe-max-passes", "3"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env())
             for cmd in (train, generate)]
    expected = ["error: --smoe-strata-ffn gives 3 widths for 2 strata (2,2)",
                "error: --smoe-max-passes 3: the SMoE blocks of this model have 2 strata"]
    for proc, words in zip(procs, expected):
        stderr = proc.communicate(timeout=600)[1]
        assert proc.returncode == 1, stderr[-3000:]
        assert one_error_line(stderr).startswith(words), stderr[-3000:]


def test_data_prep_and_script_mains(tmp_path, capsys):
    from data_prep import bible_benchmark

    with pytest.raises(SystemExit, match=r"^bible_benchmark: error: --archive .*nowhere.whl does not exist") as e:
        bible_benchmark.main([str(tmp_path / "out"), "--archive", str(tmp_path / "nowhere.whl")])
    assert e.value.code == 1 and capsys.readouterr().err.startswith("bible_benchmark: error: --archive")
    sys.path.insert(0, str(ROOT / "scripts"))
    import study_report

    with pytest.raises(SystemExit, match=r"^error: .*missing is not a directory") as e:  # was: a traceback
        study_report.main([str(tmp_path / "missing")])
    assert e.value.code == 1


# ----------------------------------------------------------------------------- category 1: scripts stop


def test_train_sh_stops_when_the_recipe_cannot_be_read(setup, tmp_path):
    """A recipe the tool cannot parse: train.sh exits with the tool's status and line, and no
    fairseq-train is started (a stand-in first on PATH records any start)."""
    conf = tmp_path / "broken.conf"
    conf.write_text(f"@include {ROOT / 'configs' / 'demo' / '_base.conf'}\n--arch \"smoe_transformer_tiny\n")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "fairseq-train").write_text(f"#!/bin/sh\ntouch {tmp_path / 'started'}\n")
    (fake / "fairseq-train").chmod(0o755)
    save = tmp_path / "save"
    out = subprocess.run(["bash", str(ROOT / "scripts" / "train.sh"), str(conf), str(setup["data"]), str(save)],
                         capture_output=True, text=True, timeout=300,
                         env={**env(), "PATH": f"{fake}{os.pathsep}{env()['PATH']}"})
    assert out.returncode == 1, out.stderr[-3000:]
    assert one_error_line(out.stderr) == (f"error: {conf}:2: No closing quotation in '--arch \"smoe_transformer_tiny'; "
                                          f"quote flag values as on a shell command line")
    assert not (tmp_path / "started").exists() and not save.exists()


def test_recipe_tool_names_what_it_cannot_read(tmp_path, capsys):
    from fairseq_smoe import recipes

    bad = tmp_path / "latin1.conf"
    bad.write_bytes(b"--arch transformer # caf\xe9\n")
    for argv, words in (([str(bad)], f"error: {bad} is not UTF-8 text"),
                        (["demo/smoe-tiny", "--world-size", "0"], "error: --world-size 0: the number of training workers")):
        with pytest.raises(SystemExit) as e:
            recipes.main(argv)
        assert e.value.code == 1 and capsys.readouterr().err.startswith(words)


# ----------------------------------------------------------------------------- category 2: stock checkpoints


@pytest.mark.parametrize("name", ("stock_ml", "stock_bi"))
def test_cost_counts_a_stock_transformer_checkpoint(setup, name, capsys):
    cost.main(["--checkpoint", str(setup[name]), "--data", str(setup["data"]), "--json", "--cpu"])
    (row,) = json.loads(capsys.readouterr().out)
    model, _ = setup["models"][name]
    assert row["params"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ("stock_ml", "stock_bi"))
def test_dial_and_analyze_name_a_stock_checkpoint(setup, name, tmp_path):
    what = f"{setup[name]} is a stock fairseq 'transformer' model without SMoE blocks"
    with pytest.raises(SystemExit, match=re.escape(f"error: {what}: it has no strata passes to dial")):
        dial.main([str(setup[name]), str(setup["data"]), str(tmp_path / "dial"), "--cpu"])
    with pytest.raises(SystemExit, match=re.escape(f"error: {what}: there is no routing to analyse")):
        analyze.main([str(setup[name]), str(setup["data"]), str(tmp_path / "analysis"), "--cpu"])
    assert not (tmp_path / "dial").exists() and not (tmp_path / "analysis").exists()


def test_evaluate_names_a_stock_bilingual_checkpoint(setup, tmp_path):
    with pytest.raises(SystemExit, match=r"stock_bi.pt was trained with task 'translation'"):
        evaluate.main([str(setup["stock_bi"]), str(setup["data"]), str(tmp_path / "eval"), "--cpu"])


def test_evaluate_scores_every_line_of_a_stock_multilingual_checkpoint(setup, tmp_path):
    """A stock translation_multi_simple_epoch checkpoint decodes with the plugin's task (its
    subclass): every test line of both directions is translated, none dropped, no traceback."""
    out = tmp_path / "eval"
    evaluate.main([str(setup["stock_ml"]), str(setup["data"]), str(out), "--cpu", "--beam", "1"])
    for pair in ("en-de", "de-en"):
        src, tgt = pair.split("-")
        refs = (setup["data"] / "raw" / f"test.{pair}.{tgt}").read_text(encoding="utf-8").split("\n")
        hyps = out / f"hyp.{pair}.{tgt}"
        assert len(hyps.read_text(encoding="utf-8").rstrip("\n").split("\n")) == len(refs) - (refs[-1] == ""), hyps


# ----------------------------------------------------------------------------- category 2: checkpoint tool


def with_parallel_record(setup, path):
    """The tiny SMoE checkpoint with the smoe_parallel record fairseq-train's save adds."""
    from fairseq_smoe.modules.experts import StackedExperts

    model, _ = setup["models"]["smoe"]
    state = torch.load(setup["smoe"], weights_only=False)
    experts = [f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, StackedExperts) for p in ("w1", "b1", "w2", "b2")]
    state["extra_state"][checkpoints.META] = {
        "version": 1, "run_id": "0123abcd", "world_size": 1, "expert_parallel": False, "num_experts": 4,
        "param_names": [n for n, _ in model.named_parameters()], "expert_keys": experts}
    torch.save(state, path)
    return path


def test_checkpoint_tool_refuses_arguments_out_of_domain_before_writing(setup, tmp_path, capsys):
    src = with_parallel_record(setup, tmp_path / "src.pt")
    for w in ("0", "-2"):
        out = tmp_path / f"w{w}" / "index.pt"
        assert checkpoints.main(["reshard", str(src), str(out), "--world-size", w]) == 1
        assert capsys.readouterr().err.startswith(f"error: --world-size {w}: the number of training processes")
        assert not out.parent.exists()
    (tmp_path / "adir").mkdir()
    for argv, words in ((["reshard", str(src), str(src), "--world-size", "2"], f"error: output {src} is the source"),
                        (["consolidate", str(src), str(tmp_path / "adir")], f"error: output {tmp_path / 'adir'} is a directory"),
                        (["reshard", str(src), str(src / "x.pt"), "--world-size", "2"], f"error: output {src / 'x.pt'}: {src} is a file")):
        assert checkpoints.main(argv) == 1
        assert capsys.readouterr().err.startswith(words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "src.pt"]
    # the same source at a world size in the domain is split
    assert checkpoints.main(["reshard", str(src), str(tmp_path / "w2" / "index.pt"), "--world-size", "2"]) == 0
    assert checkpoints.read_index(tmp_path / "w2" / "index.pt")["shards"] == 2


# ----------------------------------------------------------------------------- category 2: decoding options


def longest_pairs(data):
    """Per direction, fairseq's length of each test pair: its longer side, from the binarized
    sizes (which count the end of sentence) plus the language tag that both sides carry with
    --encoder-langtok tgt --decoder-langtok."""
    src, tgt = (read_idx_sizes(data / "data-bin" / f"test.en-de.{lang}.idx") for lang in ("en", "de"))
    lengths = [max(s, t) + 1 for s, t in zip(src, tgt)]
    return {"en-de": lengths, "de-en": lengths}


def test_evaluate_names_the_sentence_and_the_smallest_max_tokens(setup, tmp_path, capsys):
    sizes = longest_pairs(setup["data"])
    need = max(max(v) for v in sizes.values())
    limit = sorted(sizes["en-de"])[len(sizes["en-de"]) // 2]  # half the sentences are longer
    line = next(i for i, n in enumerate(sizes["en-de"]) if n > limit) + 1
    out = tmp_path / "eval"
    with pytest.raises(SystemExit) as e:
        evaluate.main([str(setup["smoe"]), str(setup["data"]), str(out), "--cpu", "--max-tokens", str(limit)])
    assert e.value.code == 1
    msg = one_error_line(capsys.readouterr().err)
    assert msg.startswith(f"error: --max-tokens {limit} is below the length of sentence en-de line {line} "
                          f"({setup['data'] / 'raw' / 'test.en-de.en'}: {sizes['en-de'][line - 1]} tokens")
    assert msg.endswith(f"Use --max-tokens {need} or more") and not out.exists()
    # that value works: every line of both directions decoded
    rows, _ = evaluate.evaluate(setup["smoe"], setup["data"], out, beam=1, max_tokens=need, cpu=True)
    assert [r["lines"] for r in rows] == [len(sizes["en-de"])] * 2


def test_evaluate_refuses_decoding_options_out_of_domain_before_loading(setup, tmp_path, capsys):
    out = tmp_path / "eval"
    for flags, words in ((["--beam", "0"], "--beam 0: the beam size must be at least 1"),
                         (["--max-tokens", "0"], "--max-tokens 0: a batch must hold at least one token"),
                         (["--smoe-max-passes", "3"], f"--smoe-max-passes 3: {setup['smoe']} has 2 strata"),
                         (["--smoe-max-passes", "0"], "--smoe-max-passes 0: give a pass budget K")):
        with pytest.raises(SystemExit) as e:
            evaluate.main([str(setup["smoe"]), str(setup["data"]), str(out), "--cpu", *flags])
        assert e.value.code == 1 and one_error_line(capsys.readouterr().err).startswith(f"error: {words}")
        assert not out.exists()
    with pytest.raises(SystemExit, match=r"error: --beam 0: the beam size"):
        dial.main([str(setup["smoe"]), str(setup["data"]), str(tmp_path / "dial"), "--cpu", "--beam", "0"])
    assert not (tmp_path / "dial").exists()


def test_analyze_and_cost_name_a_max_tokens_that_cannot_work(setup, tmp_path, capsys):
    sizes = longest_pairs(setup["data"])
    need = max(max(v) for v in sizes.values())
    line = next(i for i, n in enumerate(sizes["en-de"]) if n > 60) + 1
    with pytest.raises(SystemExit) as e:
        analyze.main([str(setup["smoe"]), str(setup["data"]), str(tmp_path / "a"), "--subset", "test",
                      "--max-tokens", "60", "--cpu"])
    msg = one_error_line(capsys.readouterr().err)
    assert e.value.code == 1 and not (tmp_path / "a").exists()
    assert msg.startswith(f"error: --max-tokens 60 is below the length of sentence en-de line {line} "
                          f"(the test data of {setup['data'] / 'data-bin'}: {sizes['en-de'][line - 1]} tokens")
    assert msg.endswith(f"Use --max-tokens {need} or more")
    with pytest.raises(SystemExit, match=r"^error: --max-tokens 0: a batch must hold at least one token"):
        cost.main(["--checkpoint", str(setup["smoe"]), "--data", str(setup["data"]), "--max-tokens", "0", "--cpu"])
    with pytest.raises(SystemExit, match=r"^error: --vocab-size 0: the shared vocabulary"):  # was: counted
        cost.main(["m4/dense", "--vocab-size", "0"])


def test_analyze_and_cost_name_missing_data_files(setup, tmp_path, capsys):
    """A data directory without the test split (analyze --subset test) or without dictionaries
    (cost --checkpoint): the task's message as the one line, not a FileNotFoundError traceback."""
    partial = tmp_path / "partial" / "data-bin"
    partial.mkdir(parents=True)
    for f in (setup["data"] / "data-bin").iterdir():
        if not f.name.startswith("test."):
            (partial / f.name).symlink_to(f)
    with pytest.raises(SystemExit) as e:
        analyze.main([str(setup["smoe"]), str(partial.parent), str(tmp_path / "a"), "--subset", "test", "--cpu"])
    msg = one_error_line(capsys.readouterr().err)
    assert e.value.code == 1 and msg.startswith("error: no test data for 2 requested direction(s) in ")
    assert f"en-de: expected {partial}/test.en-de.en.{{bin,idx}}" in msg and "  " not in msg
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=r"^error: no dictionary for de, en in .*empty"):
        cost.main(["--checkpoint", str(setup["smoe"]), "--data", str(tmp_path / "empty"), "--cpu"])
