"""Data that is damaged, or not the model's, is refused with one message naming the files
(issue 24, categories 1 and 2; ``fairseq_smoe.data_checks``).

Two real preparations of the committed Bible fixture (en-de, SentencePiece vocabulary 1000): ``A``
and ``B``, whose SentencePiece model was trained without the first 40 training lines; their
dictionaries have the same size (1000) and differ in about half their entries, the issue's case.
One tiny model is trained on A by fairseq-train's main in this process; the real
fairseq-generate/-interactive commands run as subprocesses (three of them)."""

import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import fairseq_smoe  # noqa: E402,F401
from data_prep.spm_binarize import prepare  # noqa: E402
from fairseq import options, tasks  # noqa: E402
from fairseq_smoe import SMoETranslator, data_checks  # noqa: E402
from fairseq_smoe.data_checks import DataError  # noqa: E402
from fairseq_smoe.evaluate import EvaluationError, read_lines  # noqa: E402
from fairseq_smoe.translator import TranslatorError  # noqa: E402
from test_checkpoint_io import PLUGIN, TASK, train_args, train_in_process  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "bible"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("integrity")
    raw_b = tmp / "raw_b"
    raw_b.mkdir()
    for f in FIXTURE.glob("*.en-de.*"):
        lines = f.read_text(encoding="utf-8").splitlines(keepends=True)
        (raw_b / f.name).write_text("".join(lines[40:] if f.name.startswith("train") else lines), encoding="utf-8")
    prepare(FIXTURE, ["en-de"], tmp / "A", vocab_size=1000, verbose=False)
    prepare(raw_b, ["en-de"], tmp / "B", vocab_size=1000, verbose=False)
    save = tmp / "save"
    train_in_process(train_args(tmp / "A" / "data-bin", save, 2, "--disable-validation"))
    return {"tmp": tmp, "A": tmp / "A", "B": tmp / "B", "ckpt": save / "checkpoint_last.pt", "save": save}


def copy_data(data, name, src="A"):
    dest = data["tmp"] / name
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(data[src], dest)
    return dest


def setup_task(data_bin, *extra):
    argv = [str(data_bin), *TASK[2:], "--arch", "smoe_transformer_tiny", "--share-all-embeddings", "--cpu",
            "--max-source-positions", "1024", "--max-target-positions", "1024", *extra]
    return tasks.setup_task(options.parse_args_and_arch(options.get_training_parser(), input_args=argv))


def cli(tool, *args):
    return subprocess.run([sys.executable, "-m", f"fairseq_cli.{tool}", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def one_error_line(out):
    """The command failed with status 1 and one 'error:' line, no traceback."""
    assert out.returncode == 1, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    (line,) = [l for l in out.stderr.splitlines() if l.startswith("error:")]
    return line


# ----------------------------------------------------------------------------- 1: a dictionary that is not the model's


def test_the_preparations_differ_at_the_same_size(data):
    a, b = (data_checks.load_dictionary(data[k] / "data-bin" / "dict.en.txt") for k in "AB")
    assert len(a) == len(b) == 1000
    assert sum(x != y for x, y in zip(a.symbols, b.symbols)) > 300


def test_a_checkpoint_refuses_another_preparations_data(data, caplog):
    ckpt, a, b = data["ckpt"], data["A"], data["B"]
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    saved = state["task_state"][data_checks.FINGERPRINT_KEY]
    assert set(saved["dictionaries"]) == {"en", "de"} and saved["spm"]["path"] == str(a / "spm.model")

    with pytest.raises(TranslatorError) as err:
        SMoETranslator(ckpt, b, device="cpu")
    msg = str(err.value)
    assert str(ckpt) in msg and str(b / "data-bin" / "dict.") in msg and "trained with" in msg, msg

    # the same dictionary counted again (other counts, same ordered symbols) is the same dictionary
    recount = copy_data(data, "recount")
    for lang in ("en", "de"):
        path = recount / "data-bin" / f"dict.{lang}.txt"
        path.write_text("".join(f"{l.split(' ')[0]} 7\n" for l in path.read_text(encoding="utf-8").splitlines()), encoding="utf-8")
    tr = SMoETranslator(ckpt, recount, device="cpu")
    assert isinstance(tr.translate("In the beginning", "en", "de", beam=1), str)

    # the evaluator and the analysis (fairseq's loader -> task.load_state_dict) refuse as well
    with pytest.raises(TranslatorError, match=re.escape(str(ckpt))):
        from fairseq_smoe.evaluate import evaluate

        evaluate(ckpt, b, data["tmp"] / "eval_b", beam=1, cpu=True)
    from fairseq_smoe.analyze import analyze

    with pytest.raises(DataError) as err:
        analyze(ckpt, b, data["tmp"] / "analyze_b", max_sentences=2, cpu=True)
    assert str(ckpt) in str(err.value) and str(b / "data-bin") in str(err.value)

    # a checkpoint written before the fingerprint loads as it is and says so once
    del state["task_state"][data_checks.FINGERPRINT_KEY]
    old = data["tmp"] / "old.pt"
    torch.save(state, old)
    with caplog.at_level(logging.WARNING, logger="fairseq_smoe.data_checks"):
        SMoETranslator(old, b, device="cpu")
        SMoETranslator(old, b, device="cpu").task("de", "en")
    said = [r.getMessage() for r in caplog.records if "before data fingerprints" in r.getMessage()]
    assert len(said) == 1 and str(old) in said[0], said


def test_fairseq_generate_refuses_another_preparations_data(data):
    b = data["B"]
    out = cli("generate", b / "data-bin", *TASK, "--source-lang", "en", "--target-lang", "de",
              "--path", data["ckpt"], "--gen-subset", "test", "--beam", 1, "--max-tokens", 4096,
              "--num-workers", 0, "--cpu", "--required-batch-size-multiple", 1)
    line = one_error_line(out)
    assert str(data["ckpt"]) in line and str(b / "data-bin" / "dict.") in line, line


def test_resume_refuses_another_preparations_data(data):
    save = data["tmp"] / "resume"
    shutil.copytree(data["save"], save)
    with pytest.raises(DataError) as err:
        train_in_process(train_args(data["B"] / "data-bin", save, 4, "--disable-validation"))
    assert str(save / "checkpoint_last.pt") in str(err.value)


# ----------------------------------------------------------------------------- 2: a SentencePiece model of another dictionary


def test_a_sentencepiece_model_of_another_dictionary_is_refused(data):
    right = data_checks.load_spm(data["A"] / "spm.model")
    other = data_checks.load_spm(data["B"] / "spm.model")
    dictionary = data_checks.load_dictionary(data["A"] / "data-bin" / "dict.en.txt")
    assert data_checks.check_spm_fits(right, dictionary) < 0.01
    with pytest.raises(DataError, match=r"\d+ of its \d+ pieces \((\d\d|[2-9])\.\d%\) are not in it"):
        data_checks.check_spm_fits(other, dictionary)

    mixed = copy_data(data, "mixed")
    shutil.copy(data["B"] / "spm.model", mixed / "spm.model")
    with pytest.raises(DataError, match=re.escape(str(mixed / "spm.model"))):
        setup_task(mixed / "data-bin")
    with pytest.raises(TranslatorError, match="does not belong to the dictionary"):
        SMoETranslator(data["ckpt"], data["A"], spm_model=data["B"] / "spm.model", device="cpu")


# ----------------------------------------------------------------------------- 3: a damaged data directory


def test_a_damaged_data_directory_names_the_file(data):
    dup = copy_data(data, "dup")
    path = dup / "data-bin" / "dict.de.txt"
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    path.write_text("".join(lines + [lines[5]]), encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(str(path)) + rf".*line {len(lines) + 1} repeats .* line 6"):
        setup_task(dup / "data-bin")

    swapped = copy_data(data, "swapped")
    shutil.copy(data["B"] / "data-bin" / "dict.de.txt", swapped / "data-bin" / "dict.de.txt")
    with pytest.raises(DataError, match=re.escape(str(swapped / "data-bin" / "dict.de.txt")) + ".*share one embedding"):
        setup_task(swapped / "data-bin")

    cut = copy_data(data, "cut")
    binary = cut / "data-bin" / "test.en-de.de.bin"
    binary.write_bytes(binary.read_bytes()[:1000])
    task = setup_task(cut / "data-bin")
    with pytest.raises(DataError, match=re.escape(str(binary)) + ".*1000 bytes.*index"):
        task.load_dataset("test")
    index = cut / "data-bin" / "valid.en-de.en.idx"
    index.write_bytes(index.read_bytes()[:-12])
    with pytest.raises(DataError, match=re.escape(str(index)) + ".*truncated"):
        task.load_dataset("valid")
    task.load_dataset("train")  # intact files load


# ----------------------------------------------------------------------------- 4: a damaged SentencePiece model


def test_a_damaged_sentencepiece_model_is_refused_at_load(data):
    model = (data["A"] / "spm.model").read_bytes()
    cut = model[:3000]
    assert sentencepiece.SentencePieceProcessor(model_proto=cut).get_piece_size() < 1000  # sentencepiece takes it
    for name, content in (("truncated", cut), ("random", bytes(range(256)) * 4), ("empty", b"")):
        damaged = copy_data(data, f"spm_{name}")
        (damaged / "spm.model").write_bytes(content)
        with pytest.raises(TranslatorError, match=re.escape(str(damaged / "spm.model"))):
            SMoETranslator(data["ckpt"], damaged, device="cpu")
        with pytest.raises(DataError, match="truncated|not a SentencePiece model|empty"):
            setup_task(damaged / "data-bin")


# ----------------------------------------------------------------------------- 5: text that is not valid Unicode


def test_text_that_is_not_unicode_names_the_line(data, tmp_path):
    tr = SMoETranslator(data["ckpt"], data["A"], device="cpu")
    with pytest.raises(TranslatorError, match=r"sentence 1 is not valid Unicode: U\+D800 at character 4"):
        tr.translate(["fine", "bad \ud800 text"], "en", "de", beam=1)

    refs = tmp_path / "test.en-de.de"
    refs.write_bytes("eins\nzwei\n".encode() + b"dr\xe4i\n")
    with pytest.raises(EvaluationError, match=re.escape(str(refs)) + r" line 3 is not valid UTF-8 \(byte 0xe4"):
        read_lines(refs)
    refs.write_bytes(b"eins\r\nzwei\n\n")
    assert read_lines(refs) == ["eins", "zwei", ""]


def test_fairseq_interactive_names_the_input_line(data, tmp_path):
    source = tmp_path / "input.en"
    source.write_bytes(b"In the beginning\nG\xf6d\n")
    out = cli("interactive", data["A"] / "data-bin", *TASK, "--source-lang", "en", "--target-lang", "de",
              "--path", data["ckpt"], "--input", source, "--beam", 1, "--cpu",
              "--bpe", "sentencepiece", "--sentencepiece-model", data["A"] / "spm.model")
    line = one_error_line(out)
    assert f"--input {source} line 2 is not valid UTF-8" in line, line


# ----------------------------------------------------------------------------- 6: --max-tokens below a sentence


def test_max_tokens_below_a_sentence_names_it_and_the_smallest_value(data):
    task = setup_task(data["A"] / "data-bin", "--source-lang", "en", "--target-lang", "de")
    task.load_dataset("test")
    dataset = task.dataset("test")

    def batches(max_tokens):
        return list(task.get_batch_iterator(dataset, max_tokens=max_tokens, required_batch_size_multiple=1,
                                            disable_iterator_cache=True).next_epoch_itr(shuffle=False))

    with pytest.raises(DataError) as err:
        batches(20)
    m = re.search(r"--max-tokens 20 is below the length of sentence (\d+) of en-de \(line (\d+) of its file\).*"
                  r"The smallest value that works is --max-tokens (\d+)", str(err.value))
    assert m, str(err.value)
    smallest = int(m.group(3))
    assert smallest == int(max(dataset.num_tokens(i) for i in range(len(dataset))))
    assert sum(len(b["id"]) for b in batches(smallest)) == len(dataset) == 45

    out = cli("generate", data["A"] / "data-bin", *TASK, "--source-lang", "en", "--target-lang", "de",
              "--path", data["ckpt"], "--gen-subset", "test", "--beam", 1, "--max-tokens", 20,
              "--num-workers", 0, "--cpu", "--required-batch-size-multiple", 1)
    line = one_error_line(out)
    assert f"--max-tokens {smallest}" in line and "en-de (line" in line, line
