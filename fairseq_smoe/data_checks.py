"""Data integrity: is this data directory sound, and is it the data this checkpoint was trained on?

Small pure functions; the task (``tasks/smoe_translation.py``) and ``SMoETranslator`` call them
where data is opened, so every entry point (fairseq-train and its resume, fairseq-generate and
-interactive with ``--task smoe_translation``, evaluate, analyze, dial, the Python API) gets the
same checks. A problem raises :class:`DataError` (a ``UserError``) naming the file.

**Fingerprint** (saved by ``SMoETranslationTask.state_dict()`` as ``task_state[FINGERPRINT_KEY]``,
which fairseq-train writes into every checkpoint; compared by ``load_state_dict()``, which
fairseq's model loaders call):

* each dictionary the task read (``dict.LANG.txt``, ``--fixed-dictionary``, ...): the sha256 of
  its **ordered symbols** as fairseq's ``Dictionary`` loads them (the four specials first, then
  the file's entries; counts and flags ignored, language tokens added by the task excluded: they
  follow from the training flags). A re-count of the same vocabulary is the same dictionary;
  the same symbols in another order, or one symbol more or less, is not.
* the SentencePiece model the project prepared with the data (``spm.model`` next to
  ``data-bin/``, see ``data_prep/spm_binarize.py``; ``SMoETranslator``'s ``spm_model``): the
  sha256 of the model file **without its trainer spec**, i.e. the pieces with their scores and
  types and the normalisation rules, everything that decides how text becomes pieces and back,
  and nothing about how it was trained (input files, threads).

A checkpoint without a fingerprint (written before it existed) loads as it is; one log line says
that nothing could be compared.

**SentencePiece model against the dictionary**: the share of the model's ordinary pieces (not
control, unknown, unused or byte pieces) that the dictionary does not hold, i.e. that would be
``<unk>`` for the model. Above :data:`SPM_UNKNOWN_THRESHOLD` the pair is refused. Measured on
the committed Bible fixture (``tests/fixtures/bible``, vocabularies of 800-2000): a model with its
own dictionary gives 0.0-0.4%; another preparation's model 4.5-70% (20-70% unless the dictionary
is a superset built from more languages). 10% is 25 times the worst right pair and leaves room
for large vocabularies whose rarest pieces never reach the dictionary; what it lets through is
caught by the fingerprint when the checkpoint has one.

**Damaged files**, checked when they are opened (cheap: sizes and headers, no full read):
a dictionary with a duplicate or malformed entry (the line is named); the dictionaries of
languages that share an embedding but differ; a binarized ``.bin`` whose size is not what its
``.idx`` says (an interrupted copy), a truncated ``.idx``, two sides of a pair with different
sentence counts; a SentencePiece model that does not parse or is truncated (its top-level
protobuf fields are walked: a model cut off loses its trainer and normaliser specs, which
sentencepiece itself does not notice). Text that is not valid Unicode (a lone surrogate in a
``str``, invalid UTF-8 in a file) is refused naming the sentence or the file and line.
"""

import hashlib
import logging
import os
import struct
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np

from .errors import UserError

logger = logging.getLogger(__name__)

FINGERPRINT_KEY = "smoe_data_fingerprint"
FINGERPRINT_VERSION = 1
SPM_UNKNOWN_THRESHOLD = 0.10
# fairseq's Dictionary writes these before the file's entries
SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
MMAP_MAGIC = b"MMIDIDX\x00\x00"
_warned = set()


class DataError(UserError, ValueError):
    """A data file that is damaged or does not belong with the rest: names the file and the fix."""


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def warn_once(key, message):
    """One log line per ``key`` per process."""
    if key not in _warned:
        _warned.add(key)
        logger.warning(message)


# ----------------------------------------------------------------------------- dictionaries


def _dictionary_line_problem(path) -> Optional[str]:
    """What is wrong with a dictionary file, with its line number (fairseq's message has neither)."""
    seen = {s: 0 for s in SPECIALS}
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if lineno == 1 and line.startswith("#fairseq:"):
                continue
            word, sep, rest = line.rstrip().rpartition(" ")
            overwrite = rest == "#fairseq:overwrite"
            if overwrite:
                word, sep, rest = word.rpartition(" ")
            if not sep or not rest.lstrip("-").isdigit():
                return f"line {lineno} ({line[:60]!r}) is not '<symbol> <count>'"
            if word in seen and not overwrite:
                first = f"line {seen[word]}" if seen[word] else "fairseq's built-in specials"
                return (f"line {lineno} repeats the symbol {word!r} (already at {first}): a damaged or "
                        f"hand-edited dictionary; give every symbol once (or mark a deliberate "
                        f"repeat with '#fairseq:overwrite')")
            seen.setdefault(word, lineno)
    return None


def load_dictionary(path):
    """fairseq's ``Dictionary.load(path)``; a duplicate or malformed entry raises DataError with
    the line. The dictionary remembers its file and how many symbols came from it."""
    from fairseq.data import Dictionary

    path = str(path)
    d = Dictionary()
    try:
        d.add_from_file(path)
    except (RuntimeError, ValueError) as err:
        problem = _dictionary_line_problem(path) if os.path.isfile(path) else None
        raise DataError(f"dictionary {path}: {problem or err}; re-create it with the data "
                        f"preparation (data_prep.spm_binarize) or copy it again") from err
    if len(d) <= d.nspecial:
        raise DataError(f"dictionary {path} holds no symbols (empty or truncated file); copy it again "
                        f"or re-create it with the data preparation")
    d.smoe_path, d.smoe_file_len = path, len(d)
    return d


def dictionary_symbols(d) -> List[str]:
    """The symbols of ``d`` that came from its file (language tokens added later left out)."""
    return list(d.symbols[: getattr(d, "smoe_file_len", len(d))])


def dictionary_fingerprint(d) -> dict:
    symbols = dictionary_symbols(d)
    return {"sha256": _sha256("\n".join(symbols)), "symbols": len(symbols), "path": getattr(d, "smoe_path", None)}


def check_shared_dictionaries(dicts: Dict[str, object], groups: Iterable[Sequence[str]]):
    """Languages of one group share an embedding: their dictionaries must list the same symbols
    (data_prep writes identical copies of the joined dictionary)."""
    for group in groups:
        group = [lang for lang in dict.fromkeys(group) if lang in dicts]
        if len(group) < 2:
            continue
        first = group[0]
        ref = dictionary_symbols(dicts[first])
        for lang in group[1:]:
            other = dictionary_symbols(dicts[lang])
            if other != ref:
                a, b = getattr(dicts[first], "smoe_path", f"dict.{first}.txt"), getattr(dicts[lang], "smoe_path", f"dict.{lang}.txt")
                at = next((i for i, (x, y) in enumerate(zip(ref, other)) if x != y), min(len(ref), len(other)))
                raise DataError(
                    f"dictionary {b} is not the same as {a} ({len(other)} against {len(ref)} symbols, first "
                    f"difference at entry {at}), but languages {first} and {lang} share one embedding: one of "
                    f"them was replaced by another preparation's; copy the joined dictionary of this data "
                    f"preparation (its dict.txt) to both")


# ----------------------------------------------------------------------------- SentencePiece


def _varint(data: bytes, pos: int):
    value = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _top_level_fields(data: bytes):
    """[(field number, start, end)] of a serialized protobuf message's top-level fields."""
    fields, pos = [], 0
    while pos < len(data):
        start = pos
        tag, pos = _varint(data, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            _, pos = _varint(data, pos)
        elif wire == 1:
            pos += 8
        elif wire == 2:
            length, pos = _varint(data, pos)
            pos += length
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"wire type {wire}")
        if pos > len(data):
            raise ValueError("field runs past the end")
        fields.append((number, start, pos))
    return fields


def spm_problem(data: bytes) -> Optional[str]:
    """Why the bytes of a SentencePiece model are not a whole model (None if they are): the
    ModelProto's pieces (1), trainer spec (2) and normaliser spec (3) must all be there."""
    if not data:
        return "is empty"
    try:
        numbers = {n for n, _, _ in _top_level_fields(data)}
    except ValueError as err:
        return f"is not a SentencePiece model or is truncated ({err})"
    missing = [name for n, name in ((1, "pieces"), (2, "trainer spec"), (3, "normaliser spec")) if n not in numbers]
    if missing:
        return f"is truncated or damaged: it has no {' and no '.join(missing)}"
    return None


def load_spm(path, flag=None):
    """A ``SentencePieceProcessor`` for ``path``; a damaged or truncated file raises DataError
    (before anything is encoded or decoded)."""
    import sentencepiece

    what = f"{flag} {path}" if flag else f"SentencePiece model {path}"
    if not os.path.isfile(path):
        raise DataError(f"{what} does not exist")
    with open(path, "rb") as f:
        data = f.read()
    problem = spm_problem(data)
    if problem is None:
        try:
            sp = sentencepiece.SentencePieceProcessor(model_proto=data)
        except (RuntimeError, OSError) as err:
            problem = f"cannot be loaded by sentencepiece ({str(err).strip().splitlines()[0]})"
    if problem is not None:
        raise DataError(f"{what} {problem}; copy it again from the data preparation (OUT/spm.model of "
                        f"data_prep.spm_binarize) that made the dictionary")
    sp.smoe_path, sp.smoe_bytes = str(path), data
    return sp


def spm_fingerprint(sp) -> dict:
    data = sp.smoe_bytes if hasattr(sp, "smoe_bytes") else sp.serialized_model_proto()
    kept = b"".join(data[s:e] for n, s, e in _top_level_fields(data) if n != 2)
    return {"sha256": hashlib.sha256(kept).hexdigest(), "pieces": sp.get_piece_size(),
            "path": getattr(sp, "smoe_path", None)}


def spm_unknown_rate(sp, dictionary):
    """(share, unknown, ordinary) of the model's ordinary pieces that ``dictionary`` lacks."""
    ordinary = [i for i in range(sp.get_piece_size())
                if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i) or sp.is_byte(i))]
    indices = dictionary.indices
    unknown = sum(1 for i in ordinary if sp.id_to_piece(i) not in indices)
    return (unknown / len(ordinary) if ordinary else 0.0), unknown, len(ordinary)


def check_spm_fits(sp, dictionary, threshold=SPM_UNKNOWN_THRESHOLD):
    rate, unknown, total = spm_unknown_rate(sp, dictionary)
    if rate > threshold:
        raise DataError(
            f"SentencePiece model {getattr(sp, 'smoe_path', '?')} does not belong to the dictionary "
            f"{getattr(dictionary, 'smoe_path', '?')}: {unknown} of its {total} pieces ({rate:.1%}) are not in "
            f"it and would become <unk> (at most {threshold:.0%} allowed; a model with its own dictionary "
            f"gives under 1%). Use the spm.model of the preparation that wrote this dictionary")
    return rate


def spm_next_to(data_dir) -> Optional[str]:
    """``OUT/spm.model`` for a data directory ``OUT/data-bin`` (the project's layout), else None."""
    data_dir = os.path.abspath(str(data_dir).split(os.pathsep)[0])
    path = os.path.join(os.path.dirname(data_dir), "spm.model")
    return path if os.path.basename(data_dir) == "data-bin" and os.path.isfile(path) else None


# ----------------------------------------------------------------------------- fingerprints


def data_fingerprint(dicts: Dict[str, object], sp=None) -> dict:
    return {"version": FINGERPRINT_VERSION,
            "dictionaries": {str(k): dictionary_fingerprint(d) for k, d in dicts.items()},
            "spm": spm_fingerprint(sp) if sp is not None else None}


def check_fingerprint(saved: Optional[dict], current: dict, checkpoint: Optional[str]):
    """Refuse data that is not what ``checkpoint`` was trained with. ``saved``: the checkpoint's
    fingerprint (None: written before fingerprints; say so once)."""
    ckpt = checkpoint or "the checkpoint"
    if not saved:
        paths = sorted({d["path"] for d in current["dictionaries"].values() if d.get("path")})
        warn_once(("old", checkpoint), f"checkpoint {ckpt} was written before data fingerprints: the data "
                  f"({', '.join(paths) or 'its dictionaries'}) cannot be checked against it (only the vocabulary size is)")
        return
    for key, now in current["dictionaries"].items():
        then = saved.get("dictionaries", {}).get(key)
        if then is None or then["sha256"] == now["sha256"]:
            continue
        raise DataError(
            f"the dictionary {now['path']} is not the one checkpoint {ckpt} was trained with "
            f"({then.get('path')}): {now['symbols']} symbols here, {then['symbols']} in training, and "
            f"their lists differ, so token ids would mean other pieces. Use the data directory "
            f"the model was trained with (its data-bin/ and spm.model)")
    then, now = saved.get("spm"), current.get("spm")
    if then is not None and now is not None and then["sha256"] != now["sha256"]:
        raise DataError(
            f"the SentencePiece model {now['path']} is not the one checkpoint {ckpt} was trained with "
            f"({then.get('path')}; {then['pieces']} pieces then, {now['pieces']} here, different "
            f"segmentation). Use the spm.model of the training data")


# ----------------------------------------------------------------------------- binarized data


def mmap_index(idx_path):
    """(sentences, bytes the .bin must have) of a fairseq mmap ``.idx``; None for other formats."""
    from fairseq.data.indexed_dataset import _code_to_dtype

    size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        head = f.read(26)
        if not head.startswith(MMAP_MAGIC[:8]):
            return None
        if len(head) < 26 or head[:9] != MMAP_MAGIC:
            raise DataError(f"index {idx_path} is truncated ({size} bytes, its header alone is 26)")
        (version,), code, (n,) = struct.unpack("<Q", head[9:17]), head[17], struct.unpack("<Q", head[18:26])
        if version != 1 or code not in _code_to_dtype:
            raise DataError(f"index {idx_path} has an unknown header (version {version}, dtype code {code})")
        if size != 26 + 12 * n:
            raise DataError(f"index {idx_path} is {size} bytes but its header says {n} sentences "
                            f"({26 + 12 * n} bytes): it is truncated or damaged")
        if n == 0:
            return 0, 0
        f.seek(26 + 4 * (n - 1))
        (last_size,) = struct.unpack("<i", f.read(4))
        f.seek(26 + 4 * n + 8 * (n - 1))
        (last_pointer,) = struct.unpack("<q", f.read(8))
    return n, last_pointer + last_size * np.dtype(_code_to_dtype[code]).itemsize


def check_binarized(prefix) -> Optional[int]:
    """``prefix.bin`` must be as long as ``prefix.idx`` says; returns the sentence count (None if
    not fairseq's mmap format, which is then left unchecked)."""
    idx, bin_ = f"{prefix}.idx", f"{prefix}.bin"
    info = mmap_index(idx)
    if info is None:
        return None
    n, expected = info
    have = os.path.getsize(bin_)
    if have != expected:
        raise DataError(
            f"binarized data {bin_} is {have} bytes but its index {idx} describes {n} sentences in {expected} "
            f"bytes: an interrupted copy or a file from another binarization; copy both files again "
            f"(or re-run the data preparation)")
    return n


def check_binarized_pair(src_prefix, tgt_prefix):
    n_src, n_tgt = check_binarized(src_prefix), check_binarized(tgt_prefix)
    if n_src is not None and n_tgt is not None and n_src != n_tgt:
        raise DataError(f"{src_prefix}.idx has {n_src} sentences but {tgt_prefix}.idx has {n_tgt}: the two "
                        f"sides of a pair must be parallel; binarize them again together")


# ----------------------------------------------------------------------------- text


def check_text(sentences: Sequence[str], what="sentence"):
    """Every ``str`` must be encodable as UTF-8 (no lone surrogates)."""
    for i, s in enumerate(sentences):
        try:
            s.encode("utf-8")
        except UnicodeEncodeError as err:
            raise DataError(
                f"{what} {i} is not valid Unicode: U+{ord(s[err.start]):04X} at character {err.start} is a lone "
                f"surrogate (half of a UTF-16 pair, e.g. from decoding with errors='surrogateescape'); pass text "
                f"decoded as UTF-8") from None


def _decode_problem(data: bytes, err: UnicodeDecodeError, where: str) -> DataError:
    line = data.count(b"\n", 0, err.start) + 1
    column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
    return DataError(f"{where} line {line} is not valid UTF-8 (byte 0x{data[err.start]:02x} at byte {column} of "
                     f"the line: {err.reason}); convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)")


def read_lines(path, flag=None) -> List[str]:
    """The lines of a UTF-8 text file, split on '\\n' only (a CR before the LF is dropped);
    invalid UTF-8 raises DataError naming the file (``flag PATH`` if given) and the line."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _decode_problem(data, err, f"{flag} {path}" if flag else str(path)) from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def check_utf8_file(path, flag=None):
    read_lines(path, flag)


# ----------------------------------------------------------------------------- batching


def check_max_tokens(num_tokens, indices, max_tokens, describe, flag="--max-tokens"):
    """Every sentence must fit a batch of ``max_tokens`` (fairseq fails with a bare assertion):
    name the longest and the smallest value that works. ``describe(index)`` names a sentence."""
    if max_tokens is None or len(indices) == 0:
        return
    sizes = np.asarray(num_tokens)
    worst = int(np.argmax(sizes))
    if sizes[worst] > max_tokens:
        over = int((sizes > max_tokens).sum())
        raise DataError(
            f"{flag} {max_tokens} is below the length of {describe(int(indices[worst]))}: {int(sizes[worst])} "
            f"tokens{f' ({over} sentences are longer than {max_tokens})' if over > 1 else ''}. The smallest "
            f"value that works is {flag} {int(sizes[worst])}")
