"""README.md and docs/**/*.md say only what exists: every relative link and #anchor resolves
(GitHub's heading slugs), every command shown in a fenced code block that calls fairseq-train,
fairseq-generate, fairseq-interactive, fairseq-preprocess, scripts/*.sh, python -m fairseq_smoe.*,
python -m data_prep.* or python scripts/*.py names only flags its parser has (fairseq's own
parsers with the plugin's --user-dir imported, our mains' argparse parsers), every recipe such a
command names exists, and every scripts/, configs/, docs/, tests/, fairseq_smoe/, data_prep/ or
modules/ path the text names exists."""

import argparse
import functools
import glob
import importlib
import importlib.util
import re
import shlex
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
PATH = re.compile(r"(?<![\w/.$-])((?:scripts|configs|docs|tests|fairseq_smoe|data_prep)/[\w.{},*/-]*"
                  r"|modules/\w+\.py)")
SEPARATORS = {"&&", "||", ";", "|", "&"}


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


# ---------------------------------------------------------------- markdown


def split_markdown(text: str):
    """(prose lines with their numbers, fenced blocks as (first line number, info string, lines))."""
    prose, blocks, block = [], [], None
    for n, line in enumerate(text.split("\n"), 1):
        if block is None:
            m = FENCE.match(line)
            if m:
                block = (n, line.strip()[3:].strip(), [], m.group(1))
            else:
                prose.append((n, line))
        elif line.strip().startswith(block[3]):
            blocks.append(block[:3])
            block = None
        else:
            block[2].append(line)
    assert block is None, f"a code fence opened at line {block[0]} is never closed"
    return prose, blocks


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: the rendered text, lowercase, punctuation removed (letters,
    digits, '_', '-' and spaces kept), spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set:
    prose, _ = split_markdown(path.read_text(encoding="utf-8"))
    seen, out = {}, set()
    for _, line in prose:
        m = HEADING.match(line)
        if m:
            s = slug(m.group(2))
            n = seen.get(s, 0)
            seen[s] = n + 1
            out.add(s if n == 0 else f"{s}-{n}")
        out.update(re.findall(r"<a\s+(?:name|id)=\"([^\"]+)\"", line))
    return out


@functools.lru_cache(maxsize=None)
def anchors_of(path: str) -> frozenset:
    return frozenset(anchors(Path(path)))


def links(path: Path):
    prose, _ = split_markdown(path.read_text(encoding="utf-8"))
    for n, line in prose:
        for m in LINK.finditer(INLINE_CODE.sub("", line)):
            yield n, m.group(1)


def broken_links(path: Path) -> list:
    bad = []
    for n, target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        where = f"{rel(path)}:{n}: {target}"
        if not dest.exists():
            bad.append(f"{where}: no file {file}")
        elif ROOT not in dest.parents and dest != ROOT:
            bad.append(f"{where}: outside the repository")
        elif anchor:
            if dest.suffix != ".md":
                bad.append(f"{where}: an anchor into a file that is not markdown")
            elif anchor not in anchors_of(str(dest)):
                bad.append(f"{where}: no heading with anchor #{anchor} in {rel(dest)}")
    return bad


# ---------------------------------------------------------------- paths


def expand(word: str) -> list:
    m = re.search(r"\{([^{}]*)\}", word)
    if not m:
        return [word]
    return [x for alt in m.group(1).split(",") for x in expand(word[: m.start()] + alt + word[m.end():])]


def missing_paths(path: Path) -> list:
    bad = []
    for n, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        for m in PATH.finditer(line):
            name = m.group(1).rstrip(".,:;")
            if name.startswith("modules/"):
                name = "fairseq_smoe/" + name
            for p in expand(name):
                if p.startswith("configs/") and not p.endswith((".conf", "/")) and (ROOT / f"{p}.conf").exists():
                    continue  # a recipe by its name
                if not (glob.glob(str(ROOT / p)) if "*" in p else (ROOT / p).exists()):
                    bad.append(f"{rel(path)}:{n}: {m.group(1)} does not exist")
    return bad


# ---------------------------------------------------------------- commands


def commands(path: Path):
    """(line number, tokens) of every shell command line in the fenced blocks (continuations
    joined; python blocks left out)."""
    _, blocks = split_markdown(path.read_text(encoding="utf-8"))
    for start, info, lines in blocks:
        if info.split()[:1] not in ([], ["bash"], ["sh"], ["shell"], ["console"]):
            continue  # python, text (a layout listing), bibtex, ...
        cur, first = "", None
        for i, line in enumerate(lines, start + 1):
            if first is None:
                first = i
            cur += line.rstrip()
            if cur.endswith("\\"):
                cur = cur[:-1] + " "
                continue
            if cur.strip() and not cur.strip().startswith("#"):
                try:
                    yield first, shlex.split(cur, comments=True)
                except ValueError:  # not shell (a layout listing, a table)
                    pass
            cur, first = "", None


def flatten(tokens):
    """Quoted command strings (srun '...', sbatch --wrap "...") split again."""
    out = []
    for t in tokens:
        if " " in t and re.search(r"(^|\s)(scripts/|fairseq-|python)", t):
            out += flatten(shlex.split(t))
        else:
            out.append(t)
    return out


def until_separator(tokens):
    out = []
    for t in tokens:
        if t in SEPARATORS or t.startswith((">", "2>", "<")):
            break
        out.append(t)
    return out


def flags_of(argv):
    return [a.split("=", 1)[0] for a in argv if re.match(r"^--?[A-Za-z]", a)]


class _Captured(Exception):
    pass


@functools.lru_cache(maxsize=None)
def parser_of(module: str):
    """The argparse parser a main builds: its parse_args is intercepted (nothing runs); None for a
    main without argparse."""
    if module.endswith(".py"):
        file = ROOT / module
        source = file.read_text(encoding="utf-8")
        spec = importlib.util.spec_from_file_location(f"_docs_{file.stem}", file)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    else:
        mod = importlib.import_module(module)
        source = Path(mod.__file__).read_text(encoding="utf-8")
    if "ArgumentParser(" not in source:
        return None

    def grab(self, *args, **kwargs):
        raise _Captured(self)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", grab), \
            mock.patch.object(argparse.ArgumentParser, "parse_known_args", grab):
        try:
            mod.main(["--help"])
        except _Captured as got:
            return got.args[0]
    raise AssertionError(f"{module}: main() built no parser")


def unknown_in(parser, argv) -> list:
    if parser is None:
        return flags_of(argv)
    sub = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if sub:
        for i, a in enumerate(argv):
            if a in sub[0].choices:
                return unknown_in(parser, argv[:i]) + unknown_in(sub[0].choices[a], argv[i + 1:])
    return [f for f in flags_of(argv) if f not in parser._option_string_actions]


def positionals(parser, argv) -> list:
    """The arguments of argv that are not flags or flag values."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if re.match(r"^--?[A-Za-z]", a):
            action = parser._option_string_actions.get(a.split("=", 1)[0])
            i += 2 if action is not None and action.nargs != 0 and "=" not in a else 1
        else:
            out.append(a)
            i += 1
    return out


@functools.lru_cache(maxsize=None)
def fairseq_options():
    import fairseq_smoe  # noqa: F401  (registers the plugin, as --user-dir does)
    from fairseq import options

    return options


def unknown_to_fairseq(kind: str, argv) -> list:
    options = fairseq_options()
    make = {"train": options.get_training_parser, "generate": options.get_generation_parser,
            "interactive": options.get_interactive_generation_parser,
            "preprocess": options.get_preprocessing_parser}[kind]
    argv = [str(ROOT / "fairseq_smoe") if i and argv[i - 1] == "--user-dir" else a for i, a in enumerate(argv)]
    try:
        if kind == "preprocess":
            _, extra = make().parse_known_args(argv)
        else:
            _, extra = options.parse_args_and_arch(make(), input_args=argv, parse_known=True)
    except (SystemExit, RuntimeError) as err:  # argparse's exit, or fairseq's on too few arguments
        return [f"does not parse ({type(err).__name__} {err}): {' '.join(argv)}"]
    return [f"no flag {f}" for f in flags_of(extra)]


PREPARE = {"bible": "data_prep.bible_benchmark", "m15": "data_prep.nllb_m15", "m4": "data_prep.nllb_m15",
           "opus100": "data_prep.opus100"}


def problems_of(tokens) -> list:
    """What is wrong with the commands on one shell line."""
    bad = []
    tokens = flatten(tokens)
    for i, tok in enumerate(tokens):
        rest = until_separator(tokens[i + 1:])
        m = re.fullmatch(r"(?:.*/)?fairseq-(train|generate|interactive|preprocess)", tok)
        if m:
            bad += [f"fairseq-{m.group(1)}: {p}" for p in unknown_to_fairseq(m.group(1), rest)]
        elif re.fullmatch(r"(?:\./)?scripts/\w+\.sh", tok):
            bad += script_problems(Path(tok).name, rest)
        elif re.fullmatch(r"(?:.*/)?python3?", tok) and rest[:1] == ["-m"] and len(rest) > 1:
            if rest[1].startswith(("fairseq_smoe.", "data_prep.")):
                parser = parser_of(rest[1])
                bad += [f"python -m {rest[1]}: no flag {f}" for f in unknown_in(parser, rest[2:])]
                if rest[1] in ("fairseq_smoe.recipes", "fairseq_smoe.cost"):  # CONFIG [CONFIG...]
                    bad += [f"python -m {rest[1]}: {b}" for a in positionals(parser, rest[2:])
                            for b in recipe_problems(a)]
        elif re.fullmatch(r"(?:.*/)?python3?", tok) and rest[:1] and re.fullmatch(r"scripts/\w+\.py", rest[0]):
            bad += [f"python {rest[0]}: no flag {f}" for f in unknown_in(parser_of(rest[0]), rest[1:])]
    return bad


def recipe_problems(name: str) -> list:
    return [] if (ROOT / "configs" / f"{name}.conf").exists() else [f"no recipe configs/{name}.conf"]


def script_problems(script: str, argv) -> list:
    where = f"scripts/{script}"
    if script == "train.sh":
        if len(argv) < 3:
            return [f"{where}: CONFIG DATA_DIR SAVE_DIR expected, got {argv}"]
        bad = recipe_problems(argv[0])
        if bad:
            return [f"{where}: {b}" for b in bad]
        from fairseq_smoe import recipes

        full = [f"{argv[1]}/data-bin", "--user-dir", "fairseq_smoe", *recipes.training_flags(argv[0]),
                "--save-dir", argv[2], *argv[3:]]
        return [f"{where} {argv[0]}: {p}" for p in unknown_to_fairseq("train", full)]
    if script == "evaluate.sh":
        return [f"{where}: no flag {f}" for f in unknown_in(parser_of("fairseq_smoe.evaluate"), argv)]
    if script == "reproduce_table.sh":
        return [f"{where}: no flag {f}" for f in unknown_in(parser_of("fairseq_smoe.report"), argv)]
    if script == "prepare_data.sh":
        if not argv or argv[0] not in PREPARE:
            return [f"{where}: the first argument must be one of {sorted(PREPARE)}, got {argv[:1]}"]
        return [f"{where} {argv[0]}: no flag {f}" for f in unknown_in(parser_of(PREPARE[argv[0]]), argv[1:])]
    if (ROOT / where).exists():  # demo.sh, study_small_scale.sh, benchmark_train.sh: environment only
        return [f"{where} takes no flags: {f}" for f in flags_of(argv)]
    return [f"no script {where}"]


def command_problems(path: Path) -> list:
    return [f"{rel(path)}:{n}: {p}" for n, tokens in commands(path) for p in problems_of(tokens)]


# ---------------------------------------------------------------- tests


def test_the_docs_are_found():
    names = {rel(p) for p in DOCS}
    assert {"README.md", "docs/README.md", "docs/study/study.md"} <= names


def test_the_slug_rules_are_githubs():
    assert slug("Compute dial: `--smoe-max-passes K`, `--smoe-elastic-passes`") == \
        "compute-dial---smoe-max-passes-k---smoe-elastic-passes"
    assert slug("Routing analysis: `python -m fairseq_smoe.analyze CHECKPOINT DATA_DIR OUT_DIR`") == \
        "routing-analysis-python--m-fairseq_smoeanalyze-checkpoint-data_dir-out_dir"
    assert slug("Test set at 3000 updates (Mark, beam 5), chrF: mean +- std") == \
        "test-set-at-3000-updates-mark-beam-5-chrf-mean---std"
    assert slug("Checkpoints (and `fairseq-hydra-train`)") == "checkpoints-and-fairseq-hydra-train"


def test_a_broken_link_or_anchor_is_found(tmp_path, monkeypatch):
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    (tmp_path / "b.md").write_text("# Title\n\n## A heading: `x.y`\n\n## A heading: `x.y`\n")
    doc = tmp_path / "a.md"
    doc.write_text("[ok](b.md#a-heading-xy) [dup](b.md#a-heading-xy-1) [self](#here) `[no](nothing.md)`\n"
                   "# Here\n[gone](c.md) [anchor](b.md#a-heading) [web](https://example.com/x)\n"
                   "```\n[in code](nothing.md)\n```\n")
    assert broken_links(doc) == ["a.md:3: c.md: no file c.md",
                                 "a.md:3: b.md#a-heading: no heading with anchor #a-heading in b.md"]


def test_a_wrong_flag_recipe_or_path_is_found():
    assert problems_of(shlex.split("python -m fairseq_smoe.cost m4/dense --vocab-size 8 --no-such-flag")) == \
        ["python -m fairseq_smoe.cost: no flag --no-such-flag"]
    assert problems_of(shlex.split("python -m fairseq_smoe.checkpoints reshard a b --world-size 2 --shards 3")) == \
        ["python -m fairseq_smoe.checkpoints: no flag --shards"]
    assert problems_of(shlex.split("python -m fairseq_smoe.cost m4/dense m4/smoe-9-9 --vocab-size 8")) == \
        ["python -m fairseq_smoe.cost: no recipe configs/m4/smoe-9-9.conf"]
    assert problems_of(shlex.split("scripts/train.sh demo/no-such-recipe D S")) == \
        ["scripts/train.sh: no recipe configs/demo/no-such-recipe.conf"]
    assert problems_of(shlex.split("scripts/train.sh demo/smoe-tiny D S --moe-freq 2 --moe-frequency 2")) == \
        ["scripts/train.sh demo/smoe-tiny: no flag --moe-frequency"]
    assert problems_of(shlex.split(
        "fairseq-generate D --user-dir fairseq_smoe --task smoe_translation --lang-pairs en-de --beam 5 "
        "--smoe-max-passes 1 --beams 5 && echo --not-a-flag")) == ["fairseq-generate: no flag --beams"]
    assert problems_of(shlex.split("nohup scripts/study_small_scale.sh runs/study --fast > log 2>&1 &")) == \
        ["scripts/study_small_scale.sh takes no flags: --fast"]


def test_a_missing_path_is_found(tmp_path):
    doc = ROOT / "docs" / "x.md"
    with mock.patch.object(Path, "read_text", lambda self, **kw: (
            "see configs/demo/smoe-tiny{,-w768-256}.conf, scripts/*.sh and modules/routing.py.\n"
            "`configs/demo/smoe-huge.conf` and modules/gone.py\n")):
        assert missing_paths(doc) == ["docs/x.md:2: configs/demo/smoe-huge.conf does not exist",
                                      "docs/x.md:2: modules/gone.py does not exist"]


@pytest.mark.parametrize("doc", DOCS, ids=rel)
def test_every_link_and_anchor_resolves(doc):
    assert broken_links(doc) == []


@pytest.mark.parametrize("doc", DOCS, ids=rel)
def test_every_path_named_exists(doc):
    assert missing_paths(doc) == []


@pytest.mark.parametrize("doc", DOCS, ids=rel)
def test_every_command_shown_names_real_flags(doc):
    assert command_problems(doc) == []


def test_the_readme_is_one_screen():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.split("\n")) <= 200
    for needed in ("make demo", "make test", "arxiv.org/abs/2305.02176",
                   "github.com/fe1ixxu/Stratified_Mixture_of_Experts", "docs/gpu.md", "make gpu-check"):
        assert needed in readme
