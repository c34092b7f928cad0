"""What each benchmark is: its languages, the paper's resource groups and the paper's numbers.

One :class:`Benchmark` per benchmark (``m4``, ``m15``, ``opus100``, ``bible``).  The data
preparers, the evaluator's grouped tables and ``scripts/reproduce_table.sh`` all read it, so a
language is put in a group in exactly one place.

    >>> from fairseq_smoe import benchmarks
    >>> b = benchmarks.get("m4")
    >>> b.group_of("nso"), b.directions()[:2]
    ('low', ['nso-eng', 'msa-eng'])
"""

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Benchmark:
    name: str
    english: str  # the pivot language's code ("eng", or "en" for OPUS-100)
    langs: tuple  # the non-English languages, in the paper's order
    groups: dict  # group name -> languages, in the paper's column order
    metric: str  # the paper's metric: a column of scores.csv ("spm_bleu", "spbleu", "chrf")
    paper_table: str = ""  # where the reference numbers come from
    paper: dict = field(default_factory=dict)  # system -> {column: number}; given as lists in table_columns() order

    def __post_init__(self):
        cols = self.table_columns()
        rows = {}
        for system, values in self.paper.items():
            if len(values) != len(cols):
                raise ValueError(f"{self.name} paper row {system!r}: {len(values)} numbers for {len(cols)} columns")
            rows[system] = dict(zip(cols, values))
        object.__setattr__(self, "paper", rows)  # frozen dataclass

    def group_of(self, lang):
        for group, members in self.groups.items():
            if lang in members:
                return group
        raise KeyError(f"{lang!r} is not a language of the {self.name} benchmark "
                       f"(its languages: {', '.join(self.langs)})")

    def directions(self):
        """xxx->English first, then English->xxx (the order of the paper's Table 1)."""
        return [f"{l}-{self.english}" for l in self.langs] + [f"{self.english}-{l}" for l in self.langs]

    def table_columns(self):
        """Column names of the paper's table: per direction (M4) or e->x / x->e by group."""
        if self.name == "m4":
            return self.directions() + ["avg"]
        cols = []
        for side in ("e2x", "x2e"):
            cols += [f"{side}_all"] + [f"{side}_{g}" for g in self.groups]
        return cols + ["avg"]


def _registry():
    from . import bible, nllb, opus100

    return {b.name: b for b in (nllb.M4, nllb.M15, opus100.OPUS100, bible.BIBLE)}


def names():
    return sorted(_registry())


def get(name):
    reg = _registry()
    if name not in reg:
        raise KeyError(f"unknown benchmark {name!r}; known: {', '.join(sorted(reg))}")
    return reg[name]


def detect(directions):
    """The benchmark whose languages cover every direction (smallest first), or None."""
    langs = {l for d in directions for l in d.split("-")}
    for b in sorted(_registry().values(), key=lambda b: len(b.langs)):
        if langs <= set(b.langs) | {b.english}:
            return b
    return None
