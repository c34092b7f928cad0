"""Raw parallel text -> joint SentencePiece -> fairseq binary data for multilingual MT.

Produces what fairseq's ``translation_multi_simple_epoch`` task (and our
``smoe_translation`` task) reads::

    python -m data_prep.spm_binarize --raw RAW_DIR --pairs en-de,en-fr,en-es,en-ru --out OUT_DIR \\
        [--vocab-size 4000] [--directions both|forward] [--workers 1]

Input: ``RAW_DIR/{split}.{a}-{b}.{a}`` and ``RAW_DIR/{split}.{a}-{b}.{b}``, one sentence per
line, UTF-8, for split in train, valid, test.  ``train`` is required for every pair; a pair
without valid (or test) files skips that split, and the summary says so.

Steps (each skipped on a re-run when its inputs and options are unchanged, see *Re-runs*):

1. ``validate``  check every file (exists, UTF-8, not empty, both sides have the same number of
   lines) and hash it.  Problems raise :class:`DataPrepError` naming the file and the fix.
2. ``spm``       train ONE joint SentencePiece unigram model on the train text of all
   languages -> ``OUT/spm.model``, ``OUT/spm.vocab``.  Each distinct train file is used once:
   in multi-way parallel data the English side of en-de and en-fr is often the same file, and
   feeding it once per pair would give English more vocabulary than its share.
3. ``encode``    every split of every pair -> ``OUT/spm/{split}.{a}-{b}.{lang}`` (pieces separated
   by spaces, one line per raw line).
4. ``dict``      ONE joined fairseq dictionary from all encoded train text -> ``OUT/dict.txt``
   (fairseq's own ``Dictionary`` code, with fairseq-preprocess's defaults: no threshold,
   padded to a multiple of 8).
5. ``binarize``  ``fairseq-preprocess`` per pair (run as ``sys.executable -m
   fairseq_cli.preprocess``, so it works in any venv whether or not its ``bin`` is on PATH)
   -> ``OUT/data-bin/{split}.{a}-{b}.{lang}.{bin,idx}``.  Afterwards every ``.idx`` is read back:
   its number of sentences must equal the raw line count and each sentence's length must be
   its number of pieces + 1 (EOS); any difference is an error, so no line is ever lost.
6. ``finalize``  ``OUT/data-bin/dict.{lang}.txt`` for every language (identical copies of the
   joined dictionary), ``OUT/langs.txt`` (``de,en,fr``: sorted, comma-separated, for
   ``--langs``), ``OUT/lang_dict.txt`` (the same, one per line, for ``--lang-dict``, which
   reads one language per line), ``OUT/lang_pairs.txt`` (for ``--lang-pairs``) and
   ``OUT/raw/test.{src}-{tgt}.{src|tgt}`` for every direction: the untouched raw test text,
   as references for scoring (for de-en the en-de lines with the roles swapped).

SentencePiece choices: unigram, ``character_coverage`` 1.0 (every character of the train text
gets a piece) and ``nmt_nfkc`` normalisation (sentencepiece's default).  Whitespace other than
' ' (tab, U+0085, U+2028, ...) becomes ' ' first: fairseq splits tokens on any whitespace and
would silently drop or split a piece holding it.  The summary counts the lines whose decoded
pieces differ from the raw line because of this normalisation (none in the Bible fixture), and
the ``<unk>`` pieces (characters absent from the train text; the fairseq dictionary is built
from the encoded train text, so they are ``<unk>`` there too).

Determinism: the model is trained from a Python iterator (so no path ends up inside
``spm.model``), with a fixed thread count (``--spm-threads``: the learned vocabulary depends on
it, so it is NOT tied to ``--workers``) and a fixed seed for the sampling that starts above
``--max-spm-sentences`` sentences.  If ``--vocab-size`` is larger than the text allows, we FAIL
with the maximum that SentencePiece reports, rather than silently training a smaller vocabulary
with ``hard_vocab_limit=False``: the vocabulary size is an experiment setting and should not
change behind the user's back.

Re-runs: each step writes ``OUT/.stamps/{step}.json`` holding a hash of its inputs (file
contents, not times) and options, plus the sizes of its outputs.  A step is skipped when the
hash matches and its outputs are still there with those sizes; cheap files are only rewritten
when their content changes, so a repeated run leaves every file (and its mtime) untouched.
Files of pairs that are no longer requested are left in OUT.

Output layout::

    OUT/spm.model  OUT/spm.vocab  OUT/dict.txt  OUT/spm/  OUT/data-bin/  OUT/raw/
    OUT/langs.txt  OUT/lang_dict.txt  OUT/lang_pairs.txt  OUT/logs/  OUT/.stamps/

Training then uses e.g. ``fairseq-train OUT/data-bin --task smoe_translation
--langs $(cat OUT/langs.txt) --lang-pairs $(cat OUT/lang_pairs.txt) --encoder-langtok src
--decoder-langtok ...`` and scoring decodes with ``--post-process sentencepiece``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import struct
import subprocess
import sys
import time
from array import array
from dataclasses import dataclass
from pathlib import Path

from fairseq_smoe import errors

SPLITS = ("train", "valid", "test")
DIRECTIONS = ("both", "forward")
DEFAULT_VOCAB_SIZE = 4000
DEFAULT_SPM_THREADS = 4
DEFAULT_MAX_SPM_SENTENCES = 2_000_000
SPM_SEED = 1
PADDING_FACTOR = 8  # fairseq-preprocess default: dictionary size is a multiple of 8
STAMP_VERSION = 1  # bump when a step changes what it writes, to invalidate old stamps
_LANG = r"[A-Za-z0-9_]+"  # no '-', '.', ',' : they separate pairs, file-name parts, lists
_PAIR_RE = re.compile(rf"^({_LANG})-({_LANG})$")
_ENCODE_BATCH = 10_000  # lines per sentencepiece call
# Whitespace other than ' ' (tab, NEL U+0085, U+2028, ...).  SentencePiece keeps some of it
# inside pieces, and fairseq splits tokens on any whitespace, so such a piece would silently
# vanish or split in the binarized data.  It becomes ' ' before SentencePiece sees the text.
_OTHER_WHITESPACE = re.compile(r"[^\S ]")


class DataPrepError(errors.UserError):
    """Invalid input or a failed step; the message names the file and the fix."""


@dataclass(frozen=True)
class RawFile:
    path: Path
    lines: int
    sha256: str
    blank_lines: int  # kept (fairseq stores them as EOS only), but reported
    crlf_lines: int  # '\r' before '\n': stripped before SentencePiece, reported


@dataclass(frozen=True)
class Pair:
    src: str
    tgt: str

    @property
    def name(self) -> str:
        return f"{self.src}-{self.tgt}"

    @property
    def reverse(self) -> str:
        return f"{self.tgt}-{self.src}"


# --------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _hash_obj(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode("utf-8")).hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_if_changed(path: Path, data: bytes) -> bool:
    """Write only when the content differs, so a re-run keeps mtimes; True if written."""
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return False
    _write_atomic(path, data)
    return True


def clean_line(line: str) -> str:
    """Whitespace other than ' ' becomes ' ' (what the data was encoded from; SMoETranslator too)."""
    return _OTHER_WHITESPACE.sub(" ", line)


_clean = clean_line


def read_lines(path: Path):
    """Lines of a raw file without the line end ('\\n' or '\\r\\n'); splits on '\\n' only."""
    with open(path, encoding="utf-8", newline="\n") as f:
        for line in f:
            if line.endswith("\n"):
                line = line[:-1]
            if line.endswith("\r"):
                line = line[:-1]
            yield line


def _fairseq_version() -> str:
    import importlib.metadata as md

    dists = md.packages_distributions().get("fairseq") or []
    return ",".join(f"{d} {md.version(d)}" for d in sorted(set(dists))) or "unknown"


def parse_pairs(pairs) -> list[Pair]:
    """'en-de,en-fr' or ['en-de', 'en-fr'] -> [Pair('en','de'), Pair('en','fr')]."""
    items = pairs.split(",") if isinstance(pairs, str) else list(pairs)
    items = [p.strip() for p in items]
    if not items or items == [""]:
        raise DataPrepError("no language pairs given: pass e.g. --pairs en-de,en-fr")
    result, seen = [], {}
    for item in items:
        m = _PAIR_RE.match(item)
        if not m:
            raise DataPrepError(
                f"pair {item!r} is not of the form a-b (e.g. en-de): give two language codes "
                f"made of letters, digits or '_' joined by one '-', pairs separated by ','"
            )
        pair = Pair(m.group(1), m.group(2))
        if pair.src == pair.tgt:
            raise DataPrepError(f"pair {item!r} has the same language on both sides")
        for key in (pair.name, pair.reverse):
            if key in seen:
                raise DataPrepError(
                    f"pair {item!r} repeats {seen[key]!r}: list each language pair once "
                    f"(--directions both already adds the reverse direction)"
                )
        seen[pair.name] = item
        result.append(pair)
    return result


# --------------------------------------------------------------------------------------
# step 1: validate the raw files
# --------------------------------------------------------------------------------------


def inspect_file(path: Path) -> RawFile:
    """Count lines (like ``wc -l``, plus a last line without '\\n'), check UTF-8, hash."""
    h = hashlib.sha256()
    lines = blank = crlf = 0
    with open(path, "rb") as f:
        for lines, line in enumerate(f, 1):
            h.update(line)
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataPrepError(
                    f"{path}: line {lines} is not valid UTF-8 ({e.reason} at byte {e.start} of the "
                    f"line); convert the file to UTF-8 (e.g. iconv -f LATIN1 -t UTF-8)"
                ) from None
            if text.endswith("\r\n"):
                crlf += 1
            if not text.strip():
                blank += 1
    if lines == 0 or blank == lines:
        raise DataPrepError(
            f"{path} is empty{'' if lines == 0 else f' ({lines} blank lines)'}: put one sentence "
            f"per line in it, or leave the split out (only train is required)"
        )
    return RawFile(path, lines, h.hexdigest(), blank, crlf)


def _available_pairs(raw_dir: Path) -> list[str]:
    found = set()
    for p in raw_dir.glob("train.*-*.*"):
        parts = p.name.split(".")
        if len(parts) == 3 and _PAIR_RE.match(parts[1]):
            found.add(parts[1])
    return sorted(found)


def validate(raw_dir: Path, pairs: list[Pair]):
    """-> (files {(split, pair): (src RawFile, tgt RawFile)}, skipped {pair: [split, ...]})."""
    if not raw_dir.is_dir():
        raise DataPrepError(f"raw directory {raw_dir} does not exist (--raw)")
    files, skipped = {}, {}
    for pair in pairs:
        for split in SPLITS:
            paths = [raw_dir / f"{split}.{pair.name}.{lang}" for lang in (pair.src, pair.tgt)]
            exists = [p.is_file() for p in paths]
            if not any(exists) and split != "train":
                skipped.setdefault(pair.name, []).append(split)
                continue
            if not all(exists):
                missing = paths[exists.index(False)]
                hint = ""
                if split == "train":
                    have = _available_pairs(raw_dir)
                    if pair.reverse in have:
                        hint = f" The directory has {pair.reverse} instead: pass --pairs {pair.reverse}."
                    else:
                        hint = f" Pairs with train files in {raw_dir}: {', '.join(have) or 'none'}."
                raise DataPrepError(
                    f"missing {split} file {missing} for pair {pair.name}: put the line-aligned "
                    f"{split} text of both sides in {raw_dir} as {paths[0].name} and {paths[1].name}"
                    + ("" if split == "train" else f" (or remove {paths[exists.index(True)].name}"
                       f" to skip the {split} split)")
                    + "." + hint
                )
            src, tgt = (inspect_file(p) for p in paths)
            if src.lines != tgt.lines:
                raise DataPrepError(
                    f"line-count mismatch for {split} {pair.name}: {src.path} has {src.lines} lines "
                    f"but {tgt.path} has {tgt.lines}; the two sides must be line-aligned (line i "
                    f"of one translates line i of the other): fix or re-export the files"
                )
            files[(split, pair.name)] = (src, tgt)
    return files, skipped


# --------------------------------------------------------------------------------------
# re-run bookkeeping
# --------------------------------------------------------------------------------------


class Stamps:
    """``OUT/.stamps/{step}.json``: input hash, output sizes and the step's info."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.dir = out_dir / ".stamps"

    def load(self, step: str, key: str):
        """The stored info when ``step`` already ran with this key and its outputs are intact."""
        path = self.dir / f"{step}.json"
        try:
            stamp = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if stamp.get("key") != key:
            return None
        for rel, size in stamp.get("outputs", {}).items():
            out = self.out_dir / rel
            if not out.is_file() or out.stat().st_size != size:
                return None
        return stamp.get("info")

    def save(self, step: str, key: str, outputs: list[Path], info) -> None:
        sizes = {str(p.relative_to(self.out_dir)): p.stat().st_size for p in outputs}
        stamp = {"step": step, "key": key, "outputs": sizes, "info": info}
        _write_atomic(self.dir / f"{step}.json", json.dumps(stamp, indent=1, sort_keys=True).encode())

    def invalidate(self, step: str) -> None:
        (self.dir / f"{step}.json").unlink(missing_ok=True)


class _Runner:
    def __init__(self, out_dir: Path, log):
        self.stamps = Stamps(out_dir)
        self.log = log
        self.steps: dict[str, dict] = {}

    def run(self, step: str, key_obj, make):
        """Run ``make() -> (outputs, info)`` unless a stamp for the same inputs exists."""
        key = _hash_obj([STAMP_VERSION, step, key_obj])
        t0 = time.perf_counter()
        info = self.stamps.load(step, key)
        skipped = info is not None
        if not skipped:
            self.log(f"[{step}] running")
            self.stamps.invalidate(step)  # an interrupted run must not look finished
            outputs, info = make()
            self.stamps.save(step, key, outputs, info)
        self.steps[step] = {"seconds": round(time.perf_counter() - t0, 3), "skipped": skipped}
        return info


# --------------------------------------------------------------------------------------
# steps 2-4: SentencePiece model, encoding, joined dictionary
# --------------------------------------------------------------------------------------


def spm_train_files(files, pairs: list[Pair]) -> list[tuple[str, RawFile]]:
    """(lang, file) of every distinct train file, languages sorted, pairs in the given order."""
    chosen, seen = [], set()
    langs = sorted({l for p in pairs for l in (p.src, p.tgt)})
    for lang in langs:
        for pair in pairs:
            if lang in (pair.src, pair.tgt):
                rf = files[("train", pair.name)][0 if lang == pair.src else 1]
                if rf.sha256 not in seen:
                    seen.add(rf.sha256)
                    chosen.append((lang, rf))
    return chosen


def train_spm(train_files, out_dir: Path, vocab_size: int, character_coverage: float,
              max_sentences: int, threads: int):
    import sentencepiece as spm

    def sentences():
        for _, rf in train_files:
            for line in read_lines(rf.path):
                if line.strip():
                    yield _clean(line)

    model = io.BytesIO()
    spm.set_random_generator_seed(SPM_SEED)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(), model_writer=model, model_type="unigram",
            vocab_size=vocab_size, character_coverage=character_coverage,
            input_sentence_size=max_sentences, shuffle_input_sentence=True,
            num_threads=threads, minloglevel=2,
        )
    except RuntimeError as e:
        msg = str(e)
        too_high = re.search(r"Vocabulary size too high \((\d+)\).*<= (\d+)", msg)
        too_low = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", msg)
        if too_high:
            raise DataPrepError(
                f"--vocab-size {vocab_size} is too large for this training text: SentencePiece can "
                f"make at most {too_high.group(2)} pieces from it. Pass --vocab-size "
                f"{too_high.group(2)} or less, or add training text."
            ) from None
        if too_low:
            raise DataPrepError(
                f"--vocab-size {vocab_size} is too small: with character_coverage "
                f"{character_coverage} every character of the train text needs its own piece, "
                f"so SentencePiece needs at least {too_low.group(2)} pieces (special pieces "
                f"included). Pass --vocab-size {too_low.group(2)} or more, or a lower "
                f"--character-coverage."
            ) from None
        raise DataPrepError(f"SentencePiece training failed: {msg}") from None
    proto = model.getvalue()
    sp = spm.SentencePieceProcessor(model_proto=proto)
    # same format as spm_train's .vocab: piece <TAB> score (%g)
    vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.get_piece_size()))
    model_path, vocab_path = out_dir / "spm.model", out_dir / "spm.vocab"
    _write_atomic(model_path, proto)
    _write_atomic(vocab_path, vocab.encode("utf-8"))
    return [model_path, vocab_path], {"pieces": sp.get_piece_size()}


def encode_file(sp, raw: RawFile, dest: Path, threads: int) -> dict:
    """SentencePiece pieces of every raw line -> dest (one line per line, even blank ones)."""
    written = changed = unknown = 0
    unknown_examples: list[str] = []
    tmp = dest.with_name(dest.name + ".tmp")
    dest.parent.mkdir(parents=True, exist_ok=True)
    unk = sp.unk_id()
    with open(tmp, "w", encoding="utf-8", newline="\n") as out:
        batch = []

        def flush():
            nonlocal written, changed, unknown
            # str pieces keep the surface of characters unknown to the model (ids would
            # turn them into '<unk>'); fairseq maps them to its <unk> anyway
            pieces = sp.encode([_clean(line) for line in batch], out_type=str, num_threads=threads)
            for line, line_pieces, decoded in zip(batch, pieces, sp.decode(pieces)):
                out.write(" ".join(line_pieces) + "\n")
                changed += decoded != line
                for piece, pid in zip(line_pieces, sp.piece_to_id(line_pieces)):
                    if pid == unk:
                        unknown += 1
                        if piece not in unknown_examples and len(unknown_examples) < 8:
                            unknown_examples.append(piece)
            written += len(batch)
            batch.clear()

        for line in read_lines(raw.path):
            batch.append(line)
            if len(batch) == _ENCODE_BATCH:
                flush()
        if batch:
            flush()
    if written != raw.lines:
        raise DataPrepError(f"encoding {raw.path} wrote {written} lines, expected {raw.lines}")
    os.replace(tmp, dest)
    return {"lines": written, "normalized_lines": changed, "spm_unk": unknown,
            "spm_unk_examples": unknown_examples,
            "sha256": _sha256_file(dest)}


def build_dictionary(train_encoded: list[Path], dest: Path):
    """fairseq-preprocess's dictionary code (Dictionary.add_file_to_dictionary + finalize)."""
    from fairseq.data import Dictionary
    from fairseq.tokenizer import tokenize_line

    d = Dictionary()
    for path in train_encoded:
        Dictionary.add_file_to_dictionary(str(path), d, tokenize_line, 1)
    d.finalize(threshold=0, nwords=-1, padding_factor=PADDING_FACTOR)
    tmp = dest.with_name(dest.name + ".tmp")
    d.save(str(tmp))
    os.replace(tmp, dest)
    return [dest], {"types": len(d), "sha256": _sha256_file(dest)}


# --------------------------------------------------------------------------------------
# step 5: fairseq-preprocess + read-back check
# --------------------------------------------------------------------------------------

_IDX_MAGIC = b"MMIDIDX\x00\x00"
_ITEMSIZE = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 8, 8: 2, 9: 4, 10: 8}  # fairseq dtype codes


def read_idx_sizes(idx: Path) -> array:
    """Per-sentence token counts (incl. EOS) from a fairseq mmap ``.idx``; checks the ``.bin``."""
    data = idx.read_bytes()
    if data[:9] != _IDX_MAGIC or struct.unpack("<Q", data[9:17]) != (1,):
        raise DataPrepError(f"{idx} is not a fairseq mmap index (--dataset-impl mmap expected)")
    code = data[17]
    (n,) = struct.unpack("<Q", data[18:26])
    if len(data) != 26 + 12 * n:
        raise DataPrepError(f"{idx} is truncated: header says {n} sentences, size is {len(data)} bytes")
    sizes = array("i")
    sizes.frombytes(data[26:26 + 4 * n])
    if sys.byteorder != "little":
        sizes.byteswap()
    bin_path = idx.with_suffix(".bin")
    expected = sum(sizes) * _ITEMSIZE.get(code, 0)
    if not bin_path.is_file() or bin_path.stat().st_size != expected:
        raise DataPrepError(f"{bin_path} does not match {idx} (expected {expected} bytes)")
    return sizes


def count_pieces(path: Path) -> list[int]:
    """Pieces per line as written (split on ' ' only, unlike fairseq's split on any whitespace)."""
    with open(path, encoding="utf-8", newline="\n") as f:
        return [len(line[:-1].split(" ")) if line[:-1] else 0 for line in f]


def check_binarized(data_bin: Path, spm_dir: Path, split: str, pair: Pair, raw: tuple) -> None:
    """Fail loudly unless fairseq stored every line with every piece."""
    for lang, rf in zip((pair.src, pair.tgt), raw):
        idx = data_bin / f"{split}.{pair.name}.{lang}.idx"
        if not idx.is_file():
            raise DataPrepError(f"fairseq-preprocess did not write {idx}; see {data_bin}/preprocess.log")
        sizes = read_idx_sizes(idx)
        if len(sizes) != rf.lines:
            raise DataPrepError(
                f"{idx} holds {len(sizes)} sentences but {rf.path} has {rf.lines} lines: "
                f"fairseq-preprocess lost or split lines; look for '\\r' or other line "
                f"separators in the file"
            )
        pieces = count_pieces(spm_dir / f"{split}.{pair.name}.{lang}")
        bad = [i for i, (s, p) in enumerate(zip(sizes, pieces), 1) if s != p + 1]
        if bad:
            raise DataPrepError(
                f"{idx}: {len(bad)} sentences have a different token count than their "
                f"SentencePiece pieces (first: line {bad[0]} of {rf.path})"
            )


def run_preprocess(pair: Pair, splits: list[str], spm_dir: Path, dict_path: Path,
                   data_bin: Path, workers: int, log_path: Path) -> None:
    cmd = [sys.executable, "-m", "fairseq_cli.preprocess",
           "--source-lang", pair.src, "--target-lang", pair.tgt,
           "--srcdict", str(dict_path), "--tgtdict", str(dict_path),
           "--destdir", str(data_bin), "--workers", str(workers), "--dataset-impl", "mmap"]
    for split in splits:
        cmd += [f"--{split}pref", str(spm_dir / f"{split}.{pair.name}")]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", encoding="utf-8") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
        raise DataPrepError(
            f"fairseq-preprocess failed for {pair.name} (exit {rc}); full log: {log_path}\n"
            + "\n".join(tail)
        )


# --------------------------------------------------------------------------------------
# the whole pipeline
# --------------------------------------------------------------------------------------


def directions_for(pairs: list[Pair], directions: str) -> list[tuple[Pair, str, str]]:
    """[(pair whose files hold the data, src, tgt)] in --lang-pairs order."""
    result = []
    for pair in pairs:
        result.append((pair, pair.src, pair.tgt))
        if directions == "both":
            result.append((pair, pair.tgt, pair.src))
    return result


def prepare(raw_dir, pairs, out_dir, vocab_size: int = DEFAULT_VOCAB_SIZE,
            directions: str = "both", workers: int = 1, *,
            character_coverage: float = 1.0, max_spm_sentences: int = DEFAULT_MAX_SPM_SENTENCES,
            spm_threads: int = DEFAULT_SPM_THREADS, verbose: bool = True) -> dict:
    """Run all steps (skipping finished ones) and return a summary dict.

    ``pairs``: 'en-de,en-fr' or a list of 'a-b' strings.  Raises :class:`DataPrepError` for
    bad input and for any lost line.  See the module docstring for the files written.
    """
    t_start = time.perf_counter()

    def log(msg):
        if verbose:
            print(f"spm_binarize: {msg}", file=sys.stderr, flush=True)

    raw_dir, out_dir = Path(raw_dir).resolve(), Path(out_dir).resolve()
    pair_list = parse_pairs(pairs)
    if directions not in DIRECTIONS:
        raise DataPrepError(f"directions must be one of {', '.join(DIRECTIONS)}, not {directions!r}")
    if workers < 1 or spm_threads < 1:
        raise DataPrepError("workers and spm_threads must be at least 1")
    if "," in str(out_dir):
        raise DataPrepError(
            f"output directory {out_dir} contains ',', which fairseq-preprocess reads as a list "
            f"separator in --validpref/--testpref: choose an --out path without commas"
        )
    if out_dir == raw_dir:
        raise DataPrepError("--out must differ from --raw")

    t0 = time.perf_counter()
    files, skipped = validate(raw_dir, pair_list)
    validate_s = time.perf_counter() - t0
    out_dir.mkdir(parents=True, exist_ok=True)
    for pair, splits in skipped.items():
        log(f"{pair}: no {' / '.join(splits)} files in {raw_dir}; skipping "
            f"{'that split' if len(splits) == 1 else 'those splits'}")

    runner = _Runner(out_dir, log)
    runner.steps["validate"] = {"seconds": round(validate_s, 3), "skipped": False}
    langs = sorted({l for p in pair_list for l in (p.src, p.tgt)})
    spm_dir, data_bin = out_dir / "spm", out_dir / "data-bin"
    model_path, dict_path = out_dir / "spm.model", out_dir / "dict.txt"

    # 2. SentencePiece model
    train_files = spm_train_files(files, pair_list)
    spm_key = {
        "train": [(lang, rf.sha256) for lang, rf in train_files], "vocab_size": vocab_size,
        "model_type": "unigram", "character_coverage": character_coverage,
        "input_sentence_size": max_spm_sentences, "threads": spm_threads, "seed": SPM_SEED,
        "sentencepiece": __import__("sentencepiece").__version__,
    }
    spm_info = runner.run("spm", spm_key, lambda: train_spm(
        train_files, out_dir, vocab_size, character_coverage, max_spm_sentences, spm_threads))

    # 3. encode every split of every pair
    jobs = [(split, pair, lang, rf) for pair in pair_list for split in SPLITS
            if (split, pair.name) in files
            for lang, rf in zip((pair.src, pair.tgt), files[(split, pair.name)])]

    def encode_all():
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(model_path))
        info, outputs = {}, []
        for split, pair, lang, rf in jobs:
            dest = spm_dir / f"{split}.{pair.name}.{lang}"
            info[dest.name] = encode_file(sp, rf, dest, workers)
            outputs.append(dest)
        return outputs, info

    encode_key = {"model": _sha256_file(model_path),
                  "raw": [(s, p.name, l, rf.sha256) for s, p, l, rf in jobs]}
    enc_info = runner.run("encode", encode_key, encode_all)

    # 4. joined fairseq dictionary from all encoded train text
    train_enc = [spm_dir / f"train.{p.name}.{l}" for p in pair_list for l in (p.src, p.tgt)]
    dict_key = {"encoded": [(f.name, enc_info[f.name]["sha256"]) for f in train_enc],
                "padding_factor": PADDING_FACTOR, "fairseq": _fairseq_version()}
    dict_info = runner.run("dict", dict_key, lambda: build_dictionary(train_enc, dict_path))

    # 5. binarize each pair
    for pair in pair_list:
        splits = [s for s in SPLITS if (s, pair.name) in files]
        names = [f"{s}.{pair.name}.{l}" for s in splits for l in (pair.src, pair.tgt)]

        def binarize(pair=pair, splits=splits, names=names):
            run_preprocess(pair, splits, spm_dir, dict_path, data_bin, workers,
                           out_dir / "logs" / f"preprocess.{pair.name}.log")
            for split in splits:
                check_binarized(data_bin, spm_dir, split, pair, files[(split, pair.name)])
            return [data_bin / f"{n}.{ext}" for n in names for ext in ("bin", "idx")], {}

        key = {"dict": dict_info["sha256"], "encoded": [(n, enc_info[n]["sha256"]) for n in names],
               "dataset_impl": "mmap", "fairseq": _fairseq_version()}
        runner.run(f"binarize.{pair.name}", key, binarize)
        # a split whose raw files are gone must not leave older outputs for fairseq to load
        for split in skipped.get(pair.name, []):
            stale = [data_bin / f"{split}.{pair.name}.{l}.{ext}"
                     for l in (pair.src, pair.tgt) for ext in ("bin", "idx")]
            stale += [spm_dir / f"{split}.{pair.name}.{l}" for l in (pair.src, pair.tgt)]
            if split == "test":
                stale += [out_dir / "raw" / f"test.{s}-{t}.{l}" for s, t in (
                    (pair.src, pair.tgt), (pair.tgt, pair.src)) for l in (s, t)]
            for path in stale:
                if path.is_file():
                    path.unlink()
                    log(f"removed {path} (from an earlier run; {split} {pair.name} has no raw files now)")
        # cheap re-check on every run: the sentence counts fairseq wrote = raw line counts
        for split in splits:
            for lang, rf in zip((pair.src, pair.tgt), files[(split, pair.name)]):
                idx = data_bin / f"{split}.{pair.name}.{lang}.idx"
                n = len(read_idx_sizes(idx))
                if n != rf.lines:
                    raise DataPrepError(f"{idx} holds {n} sentences but {rf.path} has {rf.lines} lines")

    # 6. dictionaries per language, language lists, raw test references
    t0 = time.perf_counter()
    written = 0
    dict_bytes = dict_path.read_bytes()
    for lang in langs:
        written += write_if_changed(data_bin / f"dict.{lang}.txt", dict_bytes)
    dirs = directions_for(pair_list, directions)
    lang_pairs = [f"{s}-{t}" for _, s, t in dirs]
    written += write_if_changed(out_dir / "langs.txt", (",".join(langs) + "\n").encode())
    written += write_if_changed(out_dir / "lang_dict.txt", "".join(l + "\n" for l in langs).encode())
    written += write_if_changed(out_dir / "lang_pairs.txt", (",".join(lang_pairs) + "\n").encode())
    raw_tests = []
    for pair, s, t in dirs:
        if ("test", pair.name) not in files:
            continue
        by_lang = dict(zip((pair.src, pair.tgt), files[("test", pair.name)]))
        for lang in (s, t):
            dest = out_dir / "raw" / f"test.{s}-{t}.{lang}"
            written += write_if_changed(dest, by_lang[lang].path.read_bytes())
            raw_tests.append(str(dest))
    runner.steps["finalize"] = {"seconds": round(time.perf_counter() - t0, 3), "skipped": written == 0}

    # summary
    warnings = []
    for (split, pname), pair_files in files.items():
        for rf in pair_files:
            if rf.blank_lines:
                warnings.append(f"{rf.path.name}: {rf.blank_lines} blank lines (kept)")
            if rf.crlf_lines:
                warnings.append(f"{rf.path.name}: {rf.crlf_lines} lines end in \\r\\n "
                                f"(\\r stripped before SentencePiece; raw/test copies keep it)")
    for split, pair, lang, _ in jobs:
        name = f"{split}.{pair.name}.{lang}"
        info = enc_info[name]
        if info["normalized_lines"]:
            warnings.append(f"{name}: {info['normalized_lines']} lines change under SentencePiece "
                            f"normalisation (NFKC / whitespace), decoding will not restore them")
        if info["spm_unk"]:
            warnings.append(f"{name}: {info['spm_unk']} pieces are <unk> (characters not in the "
                            f"train text): {' '.join(info['spm_unk_examples'])}")
    summary = {
        "out_dir": str(out_dir), "data_bin": str(data_bin), "spm_model": str(model_path),
        "dict": str(dict_path), "langs": langs, "lang_pairs": lang_pairs,
        "lines": {s: {p: files[(s, p)][0].lines for (s2, p) in files if s2 == s}
                  for s in SPLITS if any(s2 == s for s2, _ in files)},
        "skipped_splits": skipped, "spm_pieces": spm_info["pieces"], "dict_types": dict_info["types"],
        "spm_train_files": [str(rf.path) for _, rf in train_files], "raw_test": raw_tests,
        "encoded": enc_info, "steps": runner.steps, "warnings": warnings,
        "seconds": round(time.perf_counter() - t_start, 3),
    }
    if verbose:
        print(format_summary(summary), flush=True)
    return summary


def format_summary(s: dict) -> str:
    pairs = sorted({p for by_pair in s["lines"].values() for p in by_pair})
    splits = list(s["lines"])
    rows = [f"{'lines':<10}" + "".join(f"{sp:>9}" for sp in splits)]
    for p in pairs:
        rows.append(f"{p:<10}" + "".join(f"{s['lines'][sp].get(p, '-'):>9}" for sp in splits))
    steps = ", ".join(f"{name} {v['seconds']:.2f}s{' (skipped)' if v['skipped'] else ''}"
                      for name, v in s["steps"].items())
    out = [f"prepared {s['data_bin']}", *rows,
           f"SentencePiece: {s['spm_pieces']} pieces ({s['spm_model']}); fairseq dictionary: "
           f"{s['dict_types']} types",
           f"langs: {','.join(s['langs'])}   lang pairs: {','.join(s['lang_pairs'])}",
           f"steps: {steps}; total {s['seconds']:.2f}s"]
    for pair, sp in s["skipped_splits"].items():
        out.append(f"note: {pair} has no {'/'.join(sp)} data (skipped)")
    out += [f"warning: {w}" for w in s["warnings"]]
    return "\n".join(out)


@errors.cli(prog="spm_binarize", returns=True)
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m data_prep.spm_binarize",
        description="Raw parallel text -> joint SentencePiece -> fairseq data-bin for "
                    "translation_multi_simple_epoch / smoe_translation.")
    ap.add_argument("--raw", required=True, help="directory with {split}.{a}-{b}.{a|b} files")
    ap.add_argument("--pairs", required=True, help="comma-separated pairs, e.g. en-de,en-fr")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE,
                    help=f"SentencePiece vocabulary size (default {DEFAULT_VOCAB_SIZE}); "
                         f"too large for the data is an error that names the maximum")
    ap.add_argument("--directions", choices=DIRECTIONS, default="both",
                    help="both: every pair in both directions (default); forward: a-b only")
    ap.add_argument("--workers", type=int, default=1, help="fairseq-preprocess / encoding workers")
    ap.add_argument("--character-coverage", type=float, default=1.0)
    ap.add_argument("--max-spm-sentences", type=int, default=DEFAULT_MAX_SPM_SENTENCES,
                    help="sample at most this many train sentences for SentencePiece (fixed seed)")
    ap.add_argument("--spm-threads", type=int, default=DEFAULT_SPM_THREADS,
                    help="SentencePiece training threads; part of the result, keep it fixed")
    ap.add_argument("--quiet", action="store_true", help="no progress messages or summary")
    args = ap.parse_args(argv)
    prepare(args.raw, args.pairs, args.out, vocab_size=args.vocab_size,
            directions=args.directions, workers=args.workers,
            character_coverage=args.character_coverage,
            max_spm_sentences=args.max_spm_sentences, spm_threads=args.spm_threads,
            verbose=not args.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
