"""M4 and M15: the NLLB-derived benchmarks of the paper (spec §4.1-4.2, Tables 1-2).

Resource groups are those of the authors' ``get_m15_mean.py`` (NLLB thresholds: high >= 1M
pairs, very-low <= 100K, low otherwise).  The paper's "BLEU" for both is fairseq's default
BLEU over the model's own SentencePiece pieces (``spm_bleu`` in our scores.csv, spec §5.3).
"""

from . import Benchmark

M15_GROUPS = {
    "high": ("ind", "msa", "isl", "slv", "tgl"),
    "low": ("nso", "run", "nob", "cat", "glg"),
    "very-low": ("ssw", "fao", "fur", "ltz", "lim"),
}
# --langs order of the authors' scripts
M15_LANGS = ("nso", "run", "ssw", "ind", "msa", "isl", "nob", "fao", "slv", "tgl", "cat", "glg", "fur", "ltz", "lim")
M4_LANGS = ("nso", "msa", "tgl", "cat")


# Table 1 (arXiv v2), keyed by our configs/m4/*.conf names; columns as M4.table_columns()
M4_PAPER = {
    "dense": [28.87, 37.01, 41.76, 40.35, 26.68, 44.30, 38.20, 45.50, 37.83],
    "moe": [29.45, 41.26, 44.23, 42.91, 27.59, 47.12, 40.10, 47.66, 40.04],
    "switch": [29.69, 40.35, 44.50, 43.19, 27.73, 46.44, 39.88, 47.26, 39.88],
    "moe-eom": [30.52, 40.50, 44.52, 43.48, 27.71, 46.85, 40.09, 47.14, 40.10],
    "moe-cmr": [30.54, 41.29, 44.65, 43.71, 27.76, 46.87, 40.36, 47.65, 40.35],
    "stack-2x4": [28.65, 39.24, 42.02, 41.36, 27.58, 46.27, 40.06, 47.50, 39.09],
    "smoe-4-4": [30.14, 41.05, 45.13, 43.97, 27.86, 47.48, 39.85, 47.71, 40.40],
    "stack-4x2": [25.53, 35.53, 38.34, 37.43, 24.99, 41.35, 36.85, 42.15, 35.27],
    "smoe-2-2-2-2": [30.96, 41.88, 44.86, 43.37, 27.83, 47.96, 40.95, 48.39, 40.78],
}

# Table 2 (arXiv v2), keyed by our configs/m15/*.conf names; columns as M15.table_columns()
M15_PAPER = {
    "dense": [29.27, 38.68, 32.44, 16.69, 29.94, 37.55, 32.37, 19.89, 29.61],
    "moe": [32.01, 40.41, 34.77, 20.84, 32.00, 39.38, 34.73, 21.89, 32.00],
    "switch": [31.67, 40.44, 34.72, 19.87, 32.09, 39.85, 34.75, 21.68, 31.89],
    "moe-eom": [32.02, 40.63, 35.19, 20.25, 32.81, 40.42, 35.33, 22.69, 32.41],
    "moe-cmr": [31.83, 40.22, 34.81, 20.46, 33.02, 40.41, 35.42, 23.21, 32.42],
    "smoe-4-12": [33.00, 41.14, 35.77, 22.10, 32.86, 40.63, 35.14, 22.80, 32.93],
    "smoe-12-4": [32.52, 41.11, 35.56, 20.89, 32.94, 40.03, 35.21, 23.60, 32.73],
    "smoe-8-8": [32.28, 41.24, 35.33, 20.27, 32.72, 40.30, 34.80, 23.08, 32.50],
    "smoe-4-4-8": [32.83, 41.61, 35.82, 21.07, 32.24, 39.40, 34.53, 22.80, 32.54],
    "smoe-8-4-4": [32.24, 40.99, 35.12, 20.61, 33.06, 40.36, 35.12, 23.71, 32.65],
    "smoe-4-4-4-4": [32.87, 41.50, 35.68, 21.42, 32.63, 40.03, 34.50, 23.35, 32.75],
    "moe-32": [32.98, 41.05, 35.69, 22.19, 32.90, 40.79, 35.49, 22.42, 32.94],
}

M4 = Benchmark(
    name="m4", english="eng", langs=M4_LANGS,
    groups={g: tuple(l for l in M4_LANGS if l in m) for g, m in M15_GROUPS.items() if set(m) & set(M4_LANGS)},
    metric="spm_bleu", paper_table="Table 1 (M4, 8 experts, BLEU over SentencePiece pieces)", paper=M4_PAPER,
)
M15 = Benchmark(
    name="m15", english="eng", langs=M15_LANGS, groups=M15_GROUPS,
    metric="spm_bleu", paper_table="Table 2 (M15, 16 experts, BLEU over SentencePiece pieces)", paper=M15_PAPER,
)
