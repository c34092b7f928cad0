"""OPUS-100 v1.0 -> joint SentencePiece -> fairseq data-bin: the paper's 94-pair setting.

    python -m data_prep.opus100 OUT_DIR [--pairs de-en,en-fr] [--archive PATH] [--cache DIR]
        [--vocab-size 64000] [--workers N]

``--pairs`` takes OPUS-100's own pair names (English and one language, the two codes in
alphabetical order: ``af-en``, ``de-en``, ``en-fr``); the default is all 94 pairs that have dev
and test sets (:data:`fairseq_smoe.benchmarks.opus100.LANGS`), each in both directions.

Steps:

1. ``download``  without ``--archive``, fetch :data:`URL` (about 2 GB) to
   ``CACHE/opus-100-corpus-v1.0.tar.gz``.  Bytes go to ``.part`` first; an interrupted download
   resumes with an HTTP Range request (from scratch if the server ignores it).
2. ``extract``   stream through the archive once and copy the selected pairs'
   ``supervised/{pair}/opus.{pair}-{train,dev,test}.{lang}`` byte for byte to
   ``OUT/text/{train,valid,test}.{pair}.{lang}`` (dev -> valid), the layout
   ``data_prep.spm_binarize`` reads.  The whole gzip stream is read, so its CRC is checked.
   A truncated or corrupt archive is an error naming it; a missing pair or file, a line-count
   mismatch between the two sides and an empty train file are errors naming the member.  Nothing is
   filtered: every line, blank ones included, goes on to the next step (0 lines removed).
   Each pair gets a stamp (``OUT/.stamps/extract.{pair}.json``), so a re-run skips it and
   needs no archive.
3. ``data_prep.spm_binarize.prepare`` with a 64k joint SentencePiece model by default (the
   paper): ``OUT/spm.model``, ``OUT/data-bin/``, ``OUT/langs.txt``, ``OUT/lang_pairs.txt``,
   ``OUT/raw/test.SRC-TGT.{SRC,TGT}``.  It keeps and reports blank lines, skips finished steps
   and checks that every line reached ``data-bin``.
"""

import argparse
import gzip
import hashlib
import http.client
import json
import os
import re
import shutil
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

from fairseq_smoe.benchmarks.opus100 import LANGS, NO_DEV_TEST, pair_name

from fairseq_smoe import errors

from .spm_binarize import DEFAULT_MAX_SPM_SENTENCES, DataPrepError, Stamps, prepare

URL = "https://object.pouta.csc.fi/OPUS-100/v1.0/opus-100-corpus-v1.0.tar.gz"
ARCHIVE_NAME = "opus-100-corpus-v1.0.tar.gz"
DEFAULT_VOCAB_SIZE = 64000
# With zh, ja, ko and other large scripts among 94 languages, coverage 1.0 would spend thousands of
# the 64k pieces on rare single characters; 0.9995 is the usual multilingual setting (those rare
# characters become <unk>, which spm_binarize counts and reports).
DEFAULT_CHARACTER_COVERAGE = 0.9995
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fairseq-smoe" / "opus100"
SPLITS = {"train": "train", "dev": "valid", "test": "test"}  # OPUS-100 name -> spm_binarize name
EXTRACT_VERSION = 1  # bump when extraction changes what it writes
# opus-100-corpus/v1.0/supervised/de-en/opus.de-en-train.de (any prefix before supervised/)
_MEMBER = re.compile(r"(?:^|/)supervised/([A-Za-z_]+)-([A-Za-z_]+)/opus\.\1-\2-(train|dev|test)\.([A-Za-z_]+)$")
_CHUNK = 1 << 20


def _log(msg):
    print(f"opus100: {msg}", file=sys.stderr, flush=True)


def parse_pairs(spec=None) -> list:
    """'de-en,en-fr' -> ['de-en', 'en-fr']; None or '' -> the 94 evaluated pairs."""
    valid = [pair_name(l) for l in LANGS]
    if not spec:
        return valid
    no_dev_test = {pair_name(l): l for l in NO_DEV_TEST}
    names = [p.strip() for p in spec.split(",") if p.strip()]
    for name in names:
        if name in valid:
            continue
        if name in no_dev_test:
            raise DataPrepError(
                f"{name} has no dev or test set in OPUS-100 v1.0 (train only, like "
                f"{', '.join(p for p in no_dev_test if p != name)}), so the paper's 94-pair "
                f"setting leaves it out; choose among the 94 pairs with dev and test sets")
        flipped = "-".join(reversed(name.split("-")))
        hint = f" (OPUS-100 names it {flipped})" if flipped in valid else ""
        raise DataPrepError(
            f"unknown OPUS-100 pair {name!r}{hint}. A pair is English and one language, the two "
            f"codes in alphabetical order. The 94 pairs: {', '.join(valid)}. (an-en, dz-en, "
            f"en-hy, en-mn and en-yo exist but have no dev/test sets, so they are not among them.)")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataPrepError(f"--pairs lists {', '.join(repeated)} more than once")
    return names


# --------------------------------------------------------------------------------------
# download
# --------------------------------------------------------------------------------------


def _content_range_total(header):
    """'bytes 100-199/2000' or 'bytes */2000' -> 2000 (None when absent or '*')."""
    m = re.search(r"/(\d+)\s*$", header or "")
    return int(m.group(1)) if m else None


def _no_network(url, dest, err):
    return DataPrepError(
        f"cannot download {url} ({err}). Download it on a machine with network access (e.g. "
        f"`curl -C - -O {url}`, about 2 GB) and pass the file with --archive PATH, or put it at {dest}")


def download(url, dest: Path) -> Path:
    """Fetch ``url`` to ``dest``, resuming ``dest.part`` with a Range request when it exists."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    for _ in range(2):  # a second pass only after discarding an unusable .part
        have = part.stat().st_size if part.exists() else 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        try:
            resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60)
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:  # nothing left to send: complete, or larger than the file
                if _content_range_total(e.headers.get("Content-Range")) == have:
                    os.replace(part, dest)
                    return dest
                _log(f"{part} does not match the file on the server; downloading from the start")
                part.unlink()
                continue
            raise _no_network(url, dest, f"HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            raise _no_network(url, dest, getattr(e, "reason", e)) from None
        with resp:
            if have and resp.status == 206:
                content_range = resp.headers.get("Content-Range") or ""
                if not content_range.startswith(f"bytes {have}-"):
                    _log(f"the server sent {content_range!r} for bytes={have}-; downloading from the start")
                    part.unlink()
                    continue
                mode, total = "ab", _content_range_total(content_range)
                _log(f"resuming {url} at {have / 1e6:.0f} MB")
            else:
                if have:
                    _log("the server ignored the Range request; downloading from the start")
                mode, have = "wb", 0
                length = resp.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
            _log(f"downloading {url} ({'?' if total is None else f'{total / 1e6:.0f}'} MB) to {part}")
            try:
                with open(part, mode) as f:
                    reported = have
                    while True:
                        block = resp.read(_CHUNK)
                        if not block:
                            break
                        f.write(block)
                        have += len(block)
                        if have - reported >= 100_000_000:
                            reported = have
                            _log(f"  {have / 1e6:.0f} MB")
            except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
                raise DataPrepError(
                    f"download of {url} interrupted after {have / 1e6:.0f} MB ({e}); run again to "
                    f"resume from {part}") from None
        if total is not None and have != total:
            raise DataPrepError(
                f"download of {url} stopped at {have} of {total} bytes; run again to resume from {part}")
        os.replace(part, dest)
        return dest
    raise DataPrepError(f"could not download {url}: the server's byte ranges do not fit {part}; "
                        f"delete it and run again")


# --------------------------------------------------------------------------------------
# extract
# --------------------------------------------------------------------------------------


def _archive_id(path: Path) -> dict:
    st = path.stat()
    return {"name": path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _stamp_key(pair) -> str:
    return hashlib.sha256(json.dumps([EXTRACT_VERSION, pair]).encode()).hexdigest()


def _extracted(stamps: Stamps, pair, archive) -> bool:
    """True when ``pair``'s text is in place from ``archive`` (from any archive if None)."""
    info = stamps.load(f"extract.{pair}", _stamp_key(pair))
    return info is not None and (archive is None or info["archive"] == _archive_id(archive))


def _copy_counting(src, dest: Path) -> int:
    """Copy a member byte for byte; return its number of lines (``wc -l`` + an unterminated last one)."""
    lines, last = 0, b"\n"
    with open(dest, "wb") as out:
        while True:
            block = src.read(_CHUNK)
            if not block:
                break
            out.write(block)
            lines += block.count(b"\n")
            last = block[-1:]
    return lines + (last != b"\n")


def _corrupt(archive, err):
    return DataPrepError(
        f"{archive} is not a complete, readable .tar.gz ({type(err).__name__}: {err}). It is "
        f"probably truncated or damaged: delete it and run again without --archive to download "
        f"{URL} afresh, or pass a complete copy with --archive")


def extract(archive: Path, pairs, out_dir: Path) -> dict:
    """Copy the pairs' train/dev/test files from ``archive`` to ``out_dir/text`` in one pass.

    Returns {pair: {split: lines}}.  Writes into ``text/.extract.tmp`` and moves the files into
    place only when the whole archive read cleanly and every check passed.
    """
    text_dir = out_dir / "text"
    tmp = text_dir / ".extract.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    wanted, prefix, found = set(pairs), {}, {}
    _log(f"extracting {len(pairs)} pair(s) from {archive} (one pass through the whole archive)")
    t0 = time.perf_counter()
    try:
        with gzip.open(archive, "rb") as gz:
            with tarfile.open(fileobj=gz, mode="r|", bufsize=_CHUNK) as tar:
                for member in tar:
                    m = _MEMBER.search(member.name)
                    if not m:
                        continue
                    a, b, split, lang = m.groups()
                    pair = f"{a}-{b}"
                    prefix.setdefault(pair, member.name[:m.start()] + ("/" if m.start() else ""))
                    if pair not in wanted or not member.isfile() or lang not in (a, b):
                        continue
                    dest = tmp / f"{SPLITS[split]}.{pair}.{lang}"
                    found[(pair, split, lang)] = (member.name, _copy_counting(tar.extractfile(member), dest))
            while gz.read(_CHUNK):  # to the end of the gzip stream, where its CRC and length are checked
                pass
    except (EOFError, zlib.error, gzip.BadGzipFile, tarfile.TarError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _corrupt(archive, err) from None
    try:
        counts = _check(archive, pairs, prefix, found)
    except DataPrepError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    stamps = Stamps(out_dir)
    for pair in pairs:
        outputs = []
        for split in SPLITS.values():
            for lang in pair.split("-"):
                name = f"{split}.{pair}.{lang}"
                os.replace(tmp / name, text_dir / name)
                outputs.append(text_dir / name)
        stamps.save(f"extract.{pair}", _stamp_key(pair), outputs,
                    {"archive": _archive_id(archive), "lines": counts[pair]})
    shutil.rmtree(tmp, ignore_errors=True)
    _log(f"extracted in {time.perf_counter() - t0:.1f}s")
    return counts


def _check(archive, pairs, prefix, found) -> dict:
    """Every selected pair has both sides of train, dev and test with equal line counts."""
    counts = {}
    for pair in pairs:
        if pair not in prefix:
            raise DataPrepError(
                f"{archive} has no supervised/{pair}/ files: it is not the complete OPUS-100 v1.0 "
                f"archive ({ARCHIVE_NAME}); download {URL} again")
        a, b = pair.split("-")
        counts[pair] = {}
        for split in SPLITS:
            expected = [f"{prefix[pair]}supervised/{pair}/opus.{pair}-{split}.{l}" for l in (a, b)]
            missing = [e for e, l in zip(expected, (a, b)) if (pair, split, l) not in found]
            if missing:
                raise DataPrepError(
                    f"{archive} lacks {', '.join(missing)}: every one of the 94 pairs has train, dev "
                    f"and test files for both languages in OPUS-100 v1.0; download {URL} again")
            (name_a, n_a), (name_b, n_b) = found[(pair, split, a)], found[(pair, split, b)]
            if n_a != n_b:
                raise DataPrepError(
                    f"line-count mismatch in {archive}: {name_a} has {n_a} lines but {name_b} has "
                    f"{n_b}; the two sides must be line-aligned. The archive is damaged or not "
                    f"OPUS-100 v1.0: download {URL} again")
            if split == "train" and n_a == 0:
                raise DataPrepError(f"{name_a} in {archive} is empty; download {URL} again")
            counts[pair][SPLITS[split]] = n_a
    return counts


# --------------------------------------------------------------------------------------
# the whole pipeline
# --------------------------------------------------------------------------------------


def prepare_opus100(out_dir, pairs=None, archive=None, cache=DEFAULT_CACHE,
                    vocab_size=DEFAULT_VOCAB_SIZE, workers=1, url=URL,
                    character_coverage=DEFAULT_CHARACTER_COVERAGE,
                    max_spm_sentences=DEFAULT_MAX_SPM_SENTENCES) -> dict:
    """Download (unless ``archive``), extract the pairs and binarize; return spm_binarize's summary
    plus ``extracted`` ({pair: {split: lines}} for the pairs extracted in this run)."""
    out_dir = Path(out_dir).resolve()
    pair_list = parse_pairs(pairs)
    if archive is not None:
        archive = Path(archive)
        if not archive.is_file():
            raise DataPrepError(f"--archive {archive} does not exist (expected {ARCHIVE_NAME} from {URL})")
    path = archive if archive is not None else Path(cache) / ARCHIVE_NAME
    stamps = Stamps(out_dir)
    todo = [p for p in pair_list if not _extracted(stamps, p, path if path.is_file() else None)]
    counts = {}
    if todo:
        if not path.is_file():
            path = download(url, path)
        counts = extract(path, todo, out_dir)
        for pair, by_split in counts.items():
            _log(f"{pair}: " + ", ".join(f"{s} {n} lines" for s, n in by_split.items())
                 + " per side; 0 removed (copied as is; blank lines are kept)")
    skipped = len(pair_list) - len(todo)
    if skipped:
        _log(f"extract: {skipped} pair(s) already extracted (stamped), skipped")
    summary = prepare(out_dir / "text", pair_list, out_dir, vocab_size=vocab_size, workers=workers,
                      character_coverage=character_coverage, max_spm_sentences=max_spm_sentences)
    summary["extracted"] = counts
    _log("lines removed by any step: 0 (spm_binarize checked that every line reached data-bin)")
    return summary


@errors.cli(prog="opus100")
def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m data_prep.opus100", description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--pairs", help="OPUS-100 pair names, e.g. de-en,en-fr (default: all 94 with dev/test)")
    p.add_argument("--archive", help=f"an already-downloaded {ARCHIVE_NAME}")
    p.add_argument("--cache", default=str(DEFAULT_CACHE), help="where the download is kept")
    p.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE,
                   help=f"joint SentencePiece vocabulary (default {DEFAULT_VOCAB_SIZE}, the paper's)")
    p.add_argument("--workers", type=int, default=1, help="fairseq-preprocess / encoding workers")
    p.add_argument("--character-coverage", type=float, default=DEFAULT_CHARACTER_COVERAGE,
                   help=f"SentencePiece character coverage (default {DEFAULT_CHARACTER_COVERAGE})")
    p.add_argument("--max-spm-sentences", type=int, default=DEFAULT_MAX_SPM_SENTENCES,
                   help="sentences sampled to train SentencePiece (default %(default)s)")
    a = p.parse_args(argv)
    prepare_opus100(a.out_dir, a.pairs, a.archive, a.cache, a.vocab_size, a.workers,
                    character_coverage=a.character_coverage, max_spm_sentences=a.max_spm_sentences)


if __name__ == "__main__":
    main()
