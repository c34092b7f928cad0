"""data_prep.spm_binarize on the committed Bible fixture: SentencePiece + fairseq binarisation.

One real run (en-de and en-ru, vocabulary 1000) is shared by the module; the error cases
stop in validation and cost nothing.  About 15-25 s on 2 CPU cores, mostly the start-up of
the fairseq-preprocess subprocesses.
"""

import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: E401,E702

import os
import shutil
import time
from pathlib import Path

import pytest

from data_prep.spm_binarize import DataPrepError, main, parse_pairs, prepare, validate

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "bible"
PAIRS = ["en-de", "en-ru"]
LANGS = ["de", "en", "ru"]
DIRECTIONS = ["en-de", "de-en", "en-ru", "ru-en"]
SPLITS = ["train", "valid", "test"]
VOCAB = 1000


def raw_lines(path):
    text = Path(path).read_bytes().decode("utf-8")
    assert text.endswith("\n"), path
    return text[:-1].split("\n")


def all_files(root):
    """{relative path: (mtime_ns, size)} of every file under root."""
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("spm_binarize") / "out"
    # fairseq-preprocess must be found through sys.executable, not PATH
    venv_bin = Path(sys.executable).parent
    path = os.pathsep.join(
        p for p in os.environ.get("PATH", "").split(os.pathsep)
        if p and Path(p) != venv_bin and Path(p).resolve() != venv_bin.resolve()
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATH", path)
        assert shutil.which("fairseq-preprocess") is None or \
            Path(shutil.which("fairseq-preprocess")).parent != venv_bin
        t0 = time.perf_counter()
        summary = prepare(FIXTURE, ",".join(PAIRS), out, vocab_size=VOCAB, workers=1, verbose=False)
        summary["first_run_s"] = time.perf_counter() - t0
    return out, summary


def test_files_exist(prepared):
    out, summary = prepared
    for name in ["spm.model", "spm.vocab", "dict.txt", "langs.txt", "lang_dict.txt", "lang_pairs.txt"]:
        assert (out / name).is_file(), name
    assert (out / "langs.txt").read_text() == "de,en,ru\n"
    assert (out / "lang_dict.txt").read_text() == "de\nen\nru\n"
    assert len((out / "spm.vocab").read_text(encoding="utf-8").splitlines()) == VOCAB
    dict_bytes = (out / "dict.txt").read_bytes()
    for lang in LANGS:
        assert (out / "data-bin" / f"dict.{lang}.txt").read_bytes() == dict_bytes, lang
    for pair in PAIRS:
        for split in SPLITS:
            for lang in pair.split("-"):
                assert (out / "spm" / f"{split}.{pair}.{lang}").is_file()
                for ext in ("bin", "idx"):
                    assert (out / "data-bin" / f"{split}.{pair}.{lang}.{ext}").is_file()
    assert summary["spm_pieces"] == VOCAB
    assert summary["lang_pairs"] == DIRECTIONS
    assert summary["lines"] == {"train": {"en-de": 306, "en-ru": 306}, "valid": {"en-de": 48, "en-ru": 48},
                                "test": {"en-de": 45, "en-ru": 45}}
    assert summary["skipped_splits"] == {}


def test_binarized_datasets_keep_every_line(prepared):
    from fairseq.data import Dictionary, data_utils

    out, _ = prepared
    d = Dictionary.load(str(out / "dict.txt"))
    for pair in PAIRS:
        for split in SPLITS:
            for lang in pair.split("-"):
                raw = raw_lines(FIXTURE / f"{split}.{pair}.{lang}")
                prefix = str(out / "data-bin" / f"{split}.{pair}.{lang}")
                ds = data_utils.load_indexed_dataset(prefix, d, dataset_impl="mmap")
                assert ds is not None, prefix
                assert len(ds) == len(raw), prefix
                # the stored ids spell the SentencePiece pieces (lines without <unk>)
                pieces = (out / "spm" / f"{split}.{pair}.{lang}").read_text(encoding="utf-8").splitlines()
                assert len(pieces) == len(raw)
                for i in range(0, len(raw), 5):
                    if all(d.index(p) != d.unk() for p in pieces[i].split()):
                        assert d.string(ds[i]) == pieces[i], (prefix, i)


def test_lang_pairs_lists_both_directions(prepared):
    out, _ = prepared
    assert (out / "lang_pairs.txt").read_text() == ",".join(DIRECTIONS) + "\n"


def test_raw_test_files_for_every_direction(prepared):
    out, _ = prepared
    for pair in PAIRS:
        a, b = pair.split("-")
        fwd_a = (out / "raw" / f"test.{a}-{b}.{a}").read_bytes()
        fwd_b = (out / "raw" / f"test.{a}-{b}.{b}").read_bytes()
        assert fwd_a == (FIXTURE / f"test.{pair}.{a}").read_bytes()
        assert fwd_b == (FIXTURE / f"test.{pair}.{b}").read_bytes()
        assert (out / "raw" / f"test.{b}-{a}.{b}").read_bytes() == fwd_b  # source of b-a
        assert (out / "raw" / f"test.{b}-{a}.{a}").read_bytes() == fwd_a  # reference of b-a


def test_sentencepiece_round_trip(prepared):
    import sentencepiece as spm

    out, _ = prepared
    sp = spm.SentencePieceProcessor(model_file=str(out / "spm.model"))
    for pair in PAIRS:
        for split in SPLITS:
            for lang in pair.split("-"):
                raw = raw_lines(FIXTURE / f"{split}.{pair}.{lang}")
                enc = (out / "spm" / f"{split}.{pair}.{lang}").read_text(encoding="utf-8").splitlines()
                assert len(enc) == len(raw)
                for i in range(0, len(raw), 3):
                    assert sp.decode(enc[i].split(" ")) == raw[i], (split, pair, lang, i)


def test_rerun_is_a_no_op(prepared):
    out, _ = prepared
    before = all_files(out)
    summary = prepare(FIXTURE, PAIRS, out, vocab_size=VOCAB, workers=1, verbose=False)
    # no wall-clock bound (a loaded machine can take any time): nothing rerun, no file rewritten
    assert all(step["skipped"] for name, step in summary["steps"].items() if name != "validate")
    assert all_files(out) == before


def test_changed_input_redoes_only_what_depends_on_it(prepared, tmp_path):
    out, _ = prepared
    raw, out2 = tmp_path / "raw", tmp_path / "out"
    shutil.copytree(FIXTURE, raw)
    shutil.copytree(out, out2)
    for lang in ("en", "ru"):  # one verse fewer in valid en-ru
        path = raw / f"valid.en-ru.{lang}"
        path.write_text("".join(line + "\n" for line in raw_lines(path)[:-1]), encoding="utf-8")
    summary = prepare(raw, PAIRS, out2, vocab_size=VOCAB, workers=1, verbose=False)
    ran = {name for name, step in summary["steps"].items() if not step["skipped"]}
    assert ran == {"validate", "encode", "binarize.en-ru"}, summary["steps"]
    assert summary["lines"]["valid"]["en-ru"] == 47
    idx = (out2 / "data-bin" / "valid.en-ru.ru.idx").read_bytes()
    assert int.from_bytes(idx[18:26], "little") == 47
    assert (out2 / "spm.model").read_bytes() == (out / "spm.model").read_bytes()

    for lang in ("en", "ru"):  # dropping the test split removes its old outputs
        (raw / f"test.en-ru.{lang}").unlink()
    summary = prepare(raw, PAIRS, out2, vocab_size=VOCAB, workers=1, verbose=False)
    assert summary["skipped_splits"] == {"en-ru": ["test"]}
    assert not list((out2 / "data-bin").glob("test.en-ru.*"))
    assert not list((out2 / "raw").glob("test.*ru*"))
    assert (out2 / "data-bin" / "test.en-de.de.idx").is_file()


# ----------------------------------------------------------------------------------------
# errors: all raised before anything is trained or binarised
# ----------------------------------------------------------------------------------------


@pytest.fixture()
def raw_en_de(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    for split in SPLITS:
        for lang in ("en", "de"):
            shutil.copy(FIXTURE / f"{split}.en-de.{lang}", raw)
    return raw


def expect_error(raw, pairs, out, *needles, **kwargs):
    with pytest.raises(DataPrepError) as err:
        prepare(raw, pairs, out, vocab_size=kwargs.pop("vocab_size", VOCAB), verbose=False, **kwargs)
    msg = str(err.value)
    for needle in needles:
        assert needle in msg, msg
    return msg


def test_error_line_count_mismatch(raw_en_de, tmp_path):
    path = raw_en_de / "train.en-de.de"
    path.write_text("".join(line + "\n" for line in raw_lines(path)[:-1]), encoding="utf-8")
    expect_error(raw_en_de, "en-de", tmp_path / "out", "train.en-de.de", "train.en-de.en", "306", "305")


@pytest.mark.parametrize("name", ["train.en-de.en", "valid.en-de.de"])
def test_error_missing_file(raw_en_de, tmp_path, name):
    (raw_en_de / name).unlink()
    expect_error(raw_en_de, "en-de", tmp_path / "out", name)


def test_error_empty_file(raw_en_de, tmp_path):
    (raw_en_de / "test.en-de.en").write_bytes(b"")
    expect_error(raw_en_de, "en-de", tmp_path / "out", "test.en-de.en", "empty")


@pytest.mark.parametrize("pair", ["ende", "en-de-fr", "en-", "en-en", "en.x-de"])
def test_error_bad_pair(raw_en_de, tmp_path, pair):
    expect_error(raw_en_de, pair, tmp_path / "out", repr(pair))


def test_error_reversed_pair_names_the_file_and_the_fix(raw_en_de, tmp_path):
    expect_error(raw_en_de, "de-en", tmp_path / "out", "train.de-en.de", "--pairs en-de")


def test_error_vocab_too_large_names_the_maximum(raw_en_de, tmp_path):
    msg = expect_error(raw_en_de, "en-de", tmp_path / "out", "--vocab-size", "at most", vocab_size=100_000)
    assert any(word.isdigit() for word in msg.split()), msg


def test_missing_valid_split_is_skipped_not_an_error(raw_en_de):
    for lang in ("en", "de"):
        (raw_en_de / f"valid.en-de.{lang}").unlink()
    files, skipped = validate(raw_en_de, parse_pairs("en-de"))
    assert skipped == {"en-de": ["valid"]}
    assert sorted(split for split, _ in files) == ["test", "train"]


def test_cli_reports_errors(raw_en_de, tmp_path, capsys):
    assert main(["--raw", str(raw_en_de), "--pairs", "ende", "--out", str(tmp_path / "o")]) == 1
    assert "'ende'" in capsys.readouterr().err
