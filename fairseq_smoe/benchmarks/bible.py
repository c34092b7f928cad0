"""The offline Bible benchmark (``scripts/prepare_data.sh bible``): the shape of M4 on
public-domain Bible versions.  It has no paper numbers; groups are by script."""

from . import Benchmark

BIBLE = Benchmark(
    name="bible", english="eng", langs=("deu", "fra", "spa", "rus", "ita", "ara", "fas", "vie", "tgl"),
    groups={"latin": ("deu", "fra", "spa", "ita", "vie", "tgl"), "non-latin": ("rus", "ara", "fas")},
    metric="chrf",
)
