"""M15 and M4, the paper's NLLB-derived benchmarks, from the authors' released ``m15.zip``.

    python -m data_prep.nllb_m15 OUT_DIR [--subset m15|m4] [--langs nso,msa,...]
        [--archive m15.zip] [--cache DIR]

The authors distribute their data already binarized (spec §3): ``m15_32k/data_bin/shard000/``
(fairseq train/valid/test for the 15 eng-xxx pairs and the joined dictionary),
``m15_32k/vocab_bin/sentencepiece.source.32000.model`` and ``m15_32k/retrieved_data/
test.eng-xxx.{eng,xxx}`` (raw test text).  We re-use it as is, so the token ids are theirs;
nothing is re-tokenized.  M4 is the {nso,msa,tgl,cat}+eng subset of the same data (the
authors' ``run_m4.sh`` points at the same data-bin and SentencePiece model).

Without ``--archive`` the zip (Google Drive id :data:`GDRIVE_ID`) is downloaded with ``gdown``
into ``--cache`` (to ``m15.zip.part``, renamed when complete); without gdown or a network the
error says how to download it by hand.

Steps (each skipped on a re-run when already done):

1. ``check``    open the zip (a truncated download fails here) and check, from its member list
   only, that every selected language has train/valid/test for both sides, a dictionary, the
   SentencePiece model and the raw test text.  Pair files may be named ``eng-xxx`` or
   ``xxx-eng``; dictionaries ``dict.{lang}.txt`` (identical: same size and CRC-32) or one
   ``dict.txt``.  Only ``shard000`` is read, as in the authors' scripts; other shards get a loud
   notice.
2. ``extract``  only the needed members, straight to their final place (no second copy of the
   multi-GB binaries): ``data-bin/{split}.{pair}.{lang}.{bin,idx}`` and ``dict.{lang}.txt``,
   ``spm.model``, ``raw/test.{src}-{tgt}.{src,tgt}`` for both directions.  zipfile verifies each
   member's CRC-32 as it is read, so a corrupt member stops the run (this is ``testzip`` limited
   to the members we use, at no extra read).  ``.stamps/extract.json`` records the archive's
   fingerprint and each extracted file's size; a re-run with the same archive skips files still
   there with that size.  Fingerprint = size + SHA-256 of the archive's first and last MiB: the
   last MiB holds the zip's central directory, i.e. the CRC-32 and size of every member, so it
   identifies the content without reading GBs, and it ignores mtimes (copying the zip elsewhere
   does not force a re-extraction).
3. ``verify``   every run: for each pair and split, both sides hold the same, non-zero number of
   sentences (read from the ``.idx`` files, which must match their ``.bin``); the raw test files
   are valid UTF-8, not empty, of equal length and as long as the binarized test set.
4. ``finalize`` ``langs.txt`` (the authors' ``--langs`` order, eng last: it fixes the language-
   token ids), ``lang_dict.txt`` (one per line) and ``lang_pairs.txt`` (xxx-eng first, then
   eng-xxx).  Files are only rewritten when their content changes.

Files of languages extracted by an earlier run with other ``--langs`` stay in OUT_DIR; the
language lists name only the current selection.  Errors raise :class:`DataPrepError`.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
import zlib
from pathlib import Path

from fairseq_smoe.benchmarks.nllb import M4_LANGS, M15_GROUPS, M15_LANGS

from fairseq_smoe import errors

from .spm_binarize import DataPrepError, read_idx_sizes, read_lines, write_if_changed

GDRIVE_ID = "1tT2urUunXLNEPZxxV2nK-YmC_N6P_48m"
GDRIVE_URL = f"https://drive.google.com/uc?id={GDRIVE_ID}"
ARCHIVE_NAME = "m15.zip"
ENG = "eng"
SUBSETS = {"m15": M15_LANGS, "m4": M4_LANGS}
SPLITS = ("train", "valid", "test")
ROOT_DIR = "m15_32k/"
SHARD = "data_bin/shard000/"
SPM_MEMBER = "vocab_bin/sentencepiece.source.32000.model"
RAW_DIR = "retrieved_data/"
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fairseq-smoe" / "m15"
FINGERPRINT_BYTES = 1 << 20
STAMP_VERSION = 1
GDOWN_CMD = f"gdown {GDRIVE_URL} -O {ARCHIVE_NAME}"
MANUAL_DOWNLOAD = (f"download it yourself (`pip install gdown && {GDOWN_CMD}`, or in a browser from "
                   f"https://drive.google.com/file/d/{GDRIVE_ID}/view) and pass --archive PATH/{ARCHIVE_NAME}")


def _log(msg: str) -> None:
    print(f"nllb_m15: {msg}", flush=True)


def select_langs(subset: str, langs=None) -> list[str]:
    """The non-English languages to prepare, in the authors' ``--langs`` order."""
    if subset not in SUBSETS:
        raise DataPrepError(f"unknown subset {subset!r}; choose one of {', '.join(SUBSETS)}")
    allowed = SUBSETS[subset]
    if langs is None:
        return list(allowed)
    langs = [l.strip() for l in (langs.split(",") if isinstance(langs, str) else langs) if l.strip()]
    unknown = [l for l in langs if l not in allowed]
    if unknown or not langs:
        groups = "; ".join(f"{g}: {','.join(l for l in m if l in allowed)}" for g, m in M15_GROUPS.items()
                           if set(m) & set(allowed))
        raise DataPrepError(
            f"unknown language(s) for {subset}: {', '.join(unknown) or '(none given)'}; valid "
            f"(ISO 639-3, English is always included): {','.join(allowed)} ({groups})")
    return [l for l in allowed if l in langs]


# --------------------------------------------------------------------------------------
# the archive: download, open, fingerprint
# --------------------------------------------------------------------------------------


def fetch_archive(cache: Path) -> Path:
    """``cache/m15.zip``, downloaded with gdown unless it is already there."""
    dest = Path(cache) / ARCHIVE_NAME
    if dest.is_file():
        _log(f"using the downloaded {dest}")
        return dest
    if importlib.util.find_spec("gdown") is None:
        raise DataPrepError(f"cannot download {ARCHIVE_NAME}: the gdown package is not installed; "
                            f"{MANUAL_DOWNLOAD}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    _log(f"downloading {GDRIVE_URL} to {part} with gdown")
    rc = subprocess.run([sys.executable, "-m", "gdown", GDRIVE_URL, "-O", str(part)]).returncode
    if rc != 0 or not part.is_file():
        raise DataPrepError(f"gdown could not download {GDRIVE_URL} (exit status {rc}: no network, "
                            f"or Google Drive refused, e.g. its download quota); {MANUAL_DOWNLOAD}")
    os.replace(part, dest)
    return dest


def fingerprint(path: Path) -> dict:
    """Size + SHA-256 of the first and last MiB (the tail holds the zip's central directory)."""
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(FINGERPRINT_BYTES))
        f.seek(max(0, size - FINGERPRINT_BYTES))
        h.update(f.read(FINGERPRINT_BYTES))
    return {"size": size, "head_tail_sha256": h.hexdigest()}


def _corrupt(path: Path, why) -> DataPrepError:
    return DataPrepError(
        f"{path} is not a complete zip archive ({why}): the download is truncated or corrupt. "
        f"Delete it and download it again (`{GDOWN_CMD}`), then pass --archive PATH/{ARCHIVE_NAME}")


def open_archive(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, EOFError, OSError) as err:
        raise _corrupt(path, err) from None


# --------------------------------------------------------------------------------------
# step 1: what the archive holds
# --------------------------------------------------------------------------------------


def find_root(names: list[str], archive: Path) -> str:
    """The member prefix ending in ``m15_32k/`` (at the top, or under one folder)."""
    roots = sorted({n[: n.index(ROOT_DIR) + len(ROOT_DIR)] for n in names
                    if ROOT_DIR in n and (n.index(ROOT_DIR) == 0 or n[n.index(ROOT_DIR) - 1] == "/")},
                   key=len)
    if not roots:
        top = sorted({n.split("/")[0] for n in names})
        raise DataPrepError(f"{archive} has no {ROOT_DIR} folder (expected the authors' m15.zip with "
                            f"{ROOT_DIR}{SHARD}, {ROOT_DIR}{SPM_MEMBER}, {ROOT_DIR}{RAW_DIR}); its top "
                            f"level holds: {', '.join(top[:20]) or '(nothing)'}")
    return roots[0]


def plan(zf: zipfile.ZipFile, archive: Path, langs: list[str]) -> tuple[list[tuple[str, str]], dict]:
    """(member, destination relative to OUT_DIR) for everything needed, and each language's pair
    name; raises with what was found and what was expected when something is missing."""
    zf_info = {i.filename: i for i in zf.infolist()}
    names = list(zf_info)
    root = find_root(names, archive)
    present = set(names)
    shard = root + SHARD
    in_shard = sorted(n[len(shard):] for n in names if n.startswith(shard) and len(n) > len(shard))
    if not in_shard:
        dirs = sorted({n[len(root):].rstrip("/") for n in names if n.startswith(root + "data_bin/")})
        raise DataPrepError(f"{archive}: no {shard} folder with the binarized data; under "
                            f"{root}data_bin/ there is: {', '.join(dirs[:20]) or '(nothing)'}")
    other_shards = sorted({m.group(0) for n in names
                           if (m := re.match(re.escape(root + "data_bin/") + r"shard\d+/", n))} - {shard})
    if other_shards:
        bar = "!" * 78
        print(f"{bar}\nNOTICE: {archive} also holds {', '.join(other_shards)}.\nThey are NOT used: "
              f"like the authors' scripts, only {shard} is read.\n{bar}", file=sys.stderr, flush=True)

    jobs, pair_of, problems = [], {}, []
    for lang in langs:
        pair = next((p for p in (f"{ENG}-{lang}", f"{lang}-{ENG}")
                     if all(f"{shard}{s}.{p}.{l}.{e}" in present
                            for s in SPLITS for l in (ENG, lang) for e in ("bin", "idx"))), None)
        if pair is None:
            found = [n for n in in_shard if re.search(rf"[.-]{lang}[.-]", n)]
            problems.append(f"{lang}: expected {{train,valid,test}}.{ENG}-{lang}.{{{ENG},{lang}}}.{{bin,idx}} "
                            f"(or {lang}-{ENG}) in {shard}; found: {', '.join(found) or 'nothing'}")
            continue
        pair_of[lang] = pair
        jobs += [(f"{shard}{s}.{pair}.{l}.{e}", f"data-bin/{s}.{pair}.{l}.{e}")
                 for s in SPLITS for l in (ENG, lang) for e in ("bin", "idx")]
        raw = next((p for p in (f"{ENG}-{lang}", f"{lang}-{ENG}")
                    if all(f"{root}{RAW_DIR}test.{p}.{l}" in present for l in (ENG, lang))), None)
        if raw is None:
            found = [n[len(root):] for n in names
                     if n.startswith(root + RAW_DIR) and re.search(rf"[.-]{lang}\b", n)]
            problems.append(f"{lang}: expected the raw test text {RAW_DIR}test.{ENG}-{lang}.{{{ENG},{lang}}}; "
                            f"found: {', '.join(found) or 'nothing'}")
            continue
        for src, tgt in ((lang, ENG), (ENG, lang)):
            jobs += [(f"{root}{RAW_DIR}test.{raw}.{l}", f"raw/test.{src}-{tgt}.{l}") for l in (src, tgt)]
    if problems:
        langs_found = sorted({l for n in in_shard if (m := re.match(r"train\.(\w+)-(\w+)\.", n))
                              for l in m.groups()} - {ENG})
        raise DataPrepError(f"{archive} lacks files for {len(problems)} language(s):\n  "
                            + "\n  ".join(problems)
                            + f"\nlanguages with train data in {shard}: {','.join(langs_found) or 'none'}"
                            + "\n(use --langs to prepare only some languages)")

    all_langs = [*langs, ENG]
    per_lang = [f"{shard}dict.{l}.txt" for l in all_langs]
    if all(d in present for d in per_lang):
        # identical dictionaries: same size and CRC-32 in the central directory (no read needed)
        kinds = {(zf_info[d].file_size, zf_info[d].CRC) for d in per_lang}
        if len(kinds) > 1:
            raise DataPrepError(f"{archive}: the dictionaries {shard}dict.{{{','.join(all_langs)}}}.txt "
                                f"differ; --share-all-embeddings needs one joined dictionary")
        jobs += [(d, f"data-bin/dict.{l}.txt") for d, l in zip(per_lang, all_langs)]
    elif f"{shard}dict.txt" in present:
        jobs += [(f"{shard}dict.txt", f"data-bin/dict.{l}.txt") for l in all_langs]
    else:
        found = [n for n in in_shard if n.startswith("dict")]
        raise DataPrepError(f"{archive}: no dictionary in {shard}: expected dict.{{lang}}.txt for "
                            f"{','.join(all_langs)} or one dict.txt; found: {', '.join(found) or 'none'}")
    if root + SPM_MEMBER not in present:
        found = [n[len(root):] for n in names if n.startswith(root + "vocab_bin/")]
        raise DataPrepError(f"{archive}: no {root}{SPM_MEMBER}; under vocab_bin/ there is: "
                            f"{', '.join(found) or 'nothing'}")
    jobs.append((root + SPM_MEMBER, "spm.model"))
    return jobs, pair_of


# --------------------------------------------------------------------------------------
# step 2: extract
# --------------------------------------------------------------------------------------


def extract(zf: zipfile.ZipFile, archive: Path, jobs, out_dir: Path) -> tuple[int, int]:
    """Extract each (member, dest) not already done for this archive; (extracted, skipped)."""
    stamp_path = out_dir / ".stamps" / "extract.json"
    fp = {"version": STAMP_VERSION, **fingerprint(archive)}
    stamp = json.loads(stamp_path.read_text()) if stamp_path.is_file() else {}
    if stamp.get("archive") != fp:
        if stamp:
            _log(f"{archive} differs from the archive extracted before: extracting again")
        stamp = {"archive": fp, "files": {}}
    done = skipped = 0
    for member, rel in jobs:
        dest, info = out_dir / rel, zf.getinfo(member)
        if stamp["files"].get(rel) == [member, info.file_size] and dest.is_file() \
                and dest.stat().st_size == info.file_size:
            skipped += 1
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + ".part")
        try:
            with zf.open(info) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)  # the CRC-32 is checked at the member's end
        except (zipfile.BadZipFile, zlib.error, EOFError) as err:
            part.unlink(missing_ok=True)
            raise _corrupt(archive, f"member {member}: {err}") from None
        os.replace(part, dest)
        stamp["files"][rel] = [member, info.file_size]
        write_if_changed(stamp_path, json.dumps(stamp, indent=1, sort_keys=True).encode())
        done += 1
    write_if_changed(stamp_path, json.dumps(stamp, indent=1, sort_keys=True).encode())
    return done, skipped


# --------------------------------------------------------------------------------------
# step 3: verify
# --------------------------------------------------------------------------------------


def count_lines(path: Path) -> int:
    """Lines as spm_binarize and the evaluator read them (split on '\n' only); UTF-8 is checked."""
    try:
        n = sum(1 for _ in read_lines(path))
    except UnicodeDecodeError as err:
        raise DataPrepError(f"{path} is not valid UTF-8 ({err.reason} at byte {err.start})") from None
    if n == 0:
        raise DataPrepError(f"{path} is empty: the archive's raw test text is missing; re-download it")
    return n


def verify(out_dir: Path, pair_of: dict) -> dict:
    """{pair: {split: sentences}} after checking every count (see the module docstring)."""
    counts = {}
    for lang, pair in pair_of.items():
        counts[pair] = {}
        for split in SPLITS:
            n = {l: len(read_idx_sizes(out_dir / "data-bin" / f"{split}.{pair}.{l}.idx")) for l in (ENG, lang)}
            where = out_dir / "data-bin" / f"{split}.{pair}"
            if n[ENG] != n[lang]:
                raise DataPrepError(f"{where}.{{{ENG},{lang}}}.idx hold {n[ENG]} and {n[lang]} sentences: "
                                    f"the two sides of {split} {pair} are not parallel")
            if n[ENG] == 0:
                raise DataPrepError(f"{where}.{ENG}.idx and .{lang}.idx are empty (0 sentences)")
            counts[pair][split] = n[ENG]
        raw = {l: out_dir / "raw" / f"test.{lang}-{ENG}.{l}" for l in (lang, ENG)}
        lines = {l: count_lines(p) for l, p in raw.items()}
        if lines[lang] != lines[ENG]:
            raise DataPrepError(f"raw test text of {pair}: {raw[lang]} has {lines[lang]} lines but "
                                f"{raw[ENG]} has {lines[ENG]}")
        if lines[ENG] != counts[pair]["test"]:
            raise DataPrepError(f"raw test text of {pair} has {lines[ENG]} lines ({raw[ENG]}) but the "
                                f"binarized test set data-bin/test.{pair}.*.idx holds {counts[pair]['test']} "
                                f"sentences: references would not line up with the translations")
    return counts


# --------------------------------------------------------------------------------------
# the whole preparation
# --------------------------------------------------------------------------------------


def prepare_m15(out_dir, subset="m15", langs=None, archive=None, cache=DEFAULT_CACHE) -> dict:
    """Prepare OUT_DIR for ``subset`` (m15 or m4) from the archive; returns a summary."""
    t0 = time.perf_counter()
    langs = select_langs(subset, langs)
    out_dir = Path(out_dir).resolve()
    if archive is None:
        archive = fetch_archive(Path(cache))
    archive = Path(archive)
    if not archive.is_file():
        raise DataPrepError(f"--archive {archive} does not exist (expected the authors' {ARCHIVE_NAME}); "
                            f"{MANUAL_DOWNLOAD}")
    with open_archive(archive) as zf:
        jobs, pair_of = plan(zf, archive, langs)
        extracted, skipped = extract(zf, archive, jobs, out_dir)
    _log(f"extract: {extracted} file(s) extracted, {skipped} already there from {archive.name}"
         + (" (skipped)" if not extracted else ""))
    counts = verify(out_dir, pair_of)

    all_langs = [*langs, ENG]
    lang_pairs = [f"{l}-{ENG}" for l in langs] + [f"{ENG}-{l}" for l in langs]
    written = write_if_changed(out_dir / "langs.txt", (",".join(all_langs) + "\n").encode())
    written += write_if_changed(out_dir / "lang_dict.txt", "".join(l + "\n" for l in all_langs).encode())
    written += write_if_changed(out_dir / "lang_pairs.txt", (",".join(lang_pairs) + "\n").encode())

    _log(f"{subset}: {len(langs)} languages + {ENG}, {len(lang_pairs)} directions in {out_dir / 'data-bin'}")
    _log(f"{'direction':<10}{'train':>12}{'valid':>9}{'test':>9}")
    for direction in lang_pairs:
        c = counts[pair_of[next(l for l in direction.split("-") if l != ENG)]]
        _log(f"{direction:<10}{c['train']:>12,}{c['valid']:>9,}{c['test']:>9,}")
    _log(f"langs: {','.join(all_langs)}; lists {'written' if written else 'unchanged'}; "
         f"{time.perf_counter() - t0:.1f}s")
    return {"out_dir": str(out_dir), "langs": all_langs, "lang_pairs": lang_pairs, "pairs": pair_of,
            "counts": counts, "extracted": extracted, "skipped": skipped}


@errors.cli(prog="nllb_m15", returns=True)
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data_prep.nllb_m15", description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--subset", choices=list(SUBSETS), default="m15",
                    help="m15: 15 languages, 30 directions (default); m4: nso,msa,tgl,cat, 8 directions")
    ap.add_argument("--langs", help="only these non-English languages of the subset (comma-separated, ISO 639-3)")
    ap.add_argument("--archive", help=f"an already-downloaded {ARCHIVE_NAME}")
    ap.add_argument("--cache", default=str(DEFAULT_CACHE),
                    help=f"where the downloaded {ARCHIVE_NAME} is kept (default {DEFAULT_CACHE})")
    a = ap.parse_args(argv)
    prepare_m15(a.out_dir, a.subset, a.langs, a.archive, a.cache)
    return 0


if __name__ == "__main__":
    sys.exit(main())
