"""Shared test fixtures."""

import pytest


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "cuda: needs a CUDA GPU (skipped, with its reason, without one); `pytest -m cuda` runs them")


WORDS = "in the beginning god created heavens and earth im anfang schuf gott himmel erde".split()


@pytest.fixture(scope="module")
def dict_dir(tmp_path_factory):
    """A data dir with a joined dictionary for en and de but no binarized splits."""
    d = tmp_path_factory.mktemp("dict")
    for lang in ("en", "de"):
        (d / f"dict.{lang}.txt").write_text("".join(f"{w} 1\n" for w in WORDS))
    return d
