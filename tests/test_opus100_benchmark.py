"""The OPUS-100 preparer on a small ``opus-100-corpus-v1.0.tar.gz`` built at test time in the real
layout (``opus-100-corpus/v1.0/supervised/{pair}/opus.{pair}-{split}.{lang}``) from the committed
real Bible fixture, plus the OPUS-100 benchmark metadata.  No network: downloads go to a local
HTTP server."""

import http.server
import io
import os
import re
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_prep import opus100  # noqa: E402
from data_prep.spm_binarize import DataPrepError  # noqa: E402
from fairseq_smoe import benchmarks  # noqa: E402
from fairseq_smoe.benchmarks.opus100 import GROUPS, LANGS, NO_DEV_TEST, TRAIN_SIZES  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "bible"
PREFIX = "opus-100-corpus/v1.0/supervised"
# OPUS-100 pair -> the fixture language paired with English in it
PAIRS = {"de-en": "de", "en-es": "es", "en-fr": "fr", "en-ru": "ru"}
OPUS_SPLIT = {"train": "train", "dev": "valid", "test": "test"}  # OPUS-100 name -> fixture name
NO_URL = "http://127.0.0.1:9/"  # nothing listens there: any download attempt fails at once


def fixture_text(split, lang, side):
    return (FIXTURE / f"{OPUS_SPLIT[split]}.en-{lang}.{side}").read_bytes()


def build_archive(path, pairs=PAIRS, change=None):
    """The fixture in OPUS-100's layout, plus a train-only an-en pair (like the real an, dz, hy,
    mn, yo) and a zero-shot test file; ``change(name, data) -> data`` edits members."""
    members = {}
    for pair, lang in pairs.items():
        for split in OPUS_SPLIT:
            for side in pair.split("-"):
                members[f"{PREFIX}/{pair}/opus.{pair}-{split}.{side}"] = fixture_text(split, lang, side)
    members[f"{PREFIX}/an-en/opus.an-en-train.an"] = fixture_text("train", "es", "es")
    members[f"{PREFIX}/an-en/opus.an-en-train.en"] = fixture_text("train", "es", "en")
    members["opus-100-corpus/v1.0/zero-shot/de-fr/opus.de-fr-test.de"] = fixture_text("test", "de", "de")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for d in sorted({n.rsplit("/", 1)[0] for n in members}):
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for name, data in members.items():
            data = change(name, data) if change else data
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return build_archive(tmp_path_factory.mktemp("opus") / opus100.ARCHIVE_NAME)


@pytest.fixture(scope="module")
def prepared(archive, tmp_path_factory):
    out = tmp_path_factory.mktemp("prep") / "out"
    summary = opus100.prepare_opus100(out, "de-en,en-fr", archive=archive, vocab_size=1000, url=NO_URL)
    return out, summary


def lines(path):
    return path.read_bytes().count(b"\n")


def test_output_contract(prepared):
    out, summary = prepared
    assert (out / "lang_pairs.txt").read_text().strip() == "de-en,en-de,en-fr,fr-en"
    assert (out / "langs.txt").read_text().strip() == "de,en,fr"
    assert (out / "spm.model").is_file() and (out / "data-bin" / "dict.en.txt").is_file()
    for pair, lang in (("de-en", "de"), ("en-fr", "fr")):
        for split, ours in OPUS_SPLIT.items():
            for side in pair.split("-"):
                n = fixture_text(split, lang, side).count(b"\n")
                assert lines(out / "text" / f"{ours}.{pair}.{side}") == n  # nothing dropped
                assert (out / "data-bin" / f"{ours}.{pair}.{side}.idx").is_file()
            assert summary["lines"][ours][pair] == n
            assert summary["extracted"][pair][ours] == n
    # untouched test text as references, both directions
    for direction, lang in (("de-en", "de"), ("en-de", "de"), ("en-fr", "fr"), ("fr-en", "fr")):
        for side in direction.split("-"):
            assert (out / "raw" / f"test.{direction}.{side}").read_bytes() == fixture_text("test", lang, side)
    # the unselected, train-only and zero-shot files were not extracted
    assert sorted(p.name for p in (out / "text").iterdir()) == sorted(
        f"{s}.{p}.{l}" for p in ("de-en", "en-fr") for s in OPUS_SPLIT.values() for l in p.split("-"))


def test_rerun_skips_every_step_without_the_archive(prepared, tmp_path, capsys):
    out, _ = prepared
    before = {p: p.stat().st_mtime_ns for p in (out / "text").iterdir()}
    # no archive, an empty cache and an unreachable URL: only stamps can make this pass
    summary = opus100.prepare_opus100(out, "de-en,en-fr", cache=tmp_path, vocab_size=1000, url=NO_URL)
    assert "2 pair(s) already extracted (stamped), skipped" in capsys.readouterr().err
    assert summary["extracted"] == {}
    assert all(v["skipped"] for k, v in summary["steps"].items() if k != "validate"), summary["steps"]
    assert {p: p.stat().st_mtime_ns for p in (out / "text").iterdir()} == before


def test_prepare_train_evaluate_table(prepared, tmp_path):
    """The whole pipeline: fairseq-train via scripts/train.sh (3 updates, then validation on all
    4 directions), scripts/evaluate.sh on every test line, reproduce_table.sh in Table 3's layout."""
    out, _ = prepared
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    run = subprocess.run(
        ["bash", str(ROOT / "scripts" / "train.sh"), "demo/smoe-tiny", str(out), str(tmp_path / "ckpt"),
         "--max-update", "3", "--log-format", "json", "--log-interval", "1", "--no-epoch-checkpoints"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    assert re.search(r'"num_updates": "3"', log), log[-4000:]
    for d in ("de-en", "en-de", "en-fr", "fr-en"):
        assert f"valid_loss_{d}" in log
    assert (tmp_path / "ckpt" / "checkpoint_last.pt").is_file()

    eval_dir = tmp_path / "smoe-4-12" / "eval"
    run = subprocess.run(["bash", str(ROOT / "scripts" / "evaluate.sh"), str(tmp_path / "ckpt" / "checkpoint_last.pt"),
                          str(out), str(eval_dir), "--beam", "1", "--cpu"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    for d in ("de-en", "en-de", "en-fr", "fr-en"):
        refs = (out / "raw" / f"test.{d}.{d[-2:]}").read_text().splitlines()
        assert len((eval_dir / f"hyp.{d}.{d[-2:]}").read_text().splitlines()) == len(refs) == 45
    table = ["bash", str(ROOT / "scripts" / "reproduce_table.sh"), "opus100", str(eval_dir), "--metric", "chrf"]
    run = subprocess.run(table, capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode != 0 and "184 of the 188 opus100 directions were not scored" in run.stderr
    run = subprocess.run(table + ["--allow-partial"], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "| system | e→x_all | e→x_high | e→x_medium | e→x_low | x→e_all |" in run.stdout
    assert "| smoe-4-12 (paper) | 32.15 |" in run.stdout and "means over 4 scored directions" in run.stdout


def test_pair_names_are_checked():
    assert opus100.parse_pairs(None) == [benchmarks.opus100.pair_name(l) for l in LANGS]
    assert len(opus100.parse_pairs("")) == 94
    with pytest.raises(DataPrepError, match=r"unknown OPUS-100 pair 'xx-en'.*The 94 pairs: af-en, am-en"):
        opus100.parse_pairs("de-en,xx-en")
    with pytest.raises(DataPrepError, match=r"'en-de' \(OPUS-100 names it de-en\)"):
        opus100.parse_pairs("en-de")
    for pair in ("an-en", "dz-en", "en-hy", "en-mn", "en-yo"):
        with pytest.raises(DataPrepError, match=rf"{pair} has no dev or test set in OPUS-100 v1.0"):
            opus100.parse_pairs(pair)
    with pytest.raises(DataPrepError, match="more than once"):
        opus100.parse_pairs("de-en,de-en")


def test_no_dev_test_pair_is_rejected_before_reading(archive, tmp_path):
    with pytest.raises(DataPrepError, match="an-en has no dev or test set"):
        opus100.prepare_opus100(tmp_path / "out", "an-en", archive=archive, url=NO_URL)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["truncated", "crc"])
def test_damaged_archive_is_named(archive, tmp_path, damage):
    data = archive.read_bytes()
    # truncated: a cut download; crc: one flipped bit in the gzip trailer, only seen at the very end
    bad = data[: len(data) // 2] if damage == "truncated" else data[:-8] + bytes([data[-8] ^ 1]) + data[-7:]
    path = tmp_path / opus100.ARCHIVE_NAME
    path.write_bytes(bad)
    with pytest.raises(SystemExit) as exit_info:
        opus100.main([str(tmp_path / "out"), "--pairs", "de-en", "--archive", str(path)])
    msg = str(exit_info.value)  # the line printed on stderr; the exit status is 1
    assert exit_info.value.code == 1
    assert msg.startswith("opus100: error: ") and f"{path} is not a complete, readable .tar.gz" in msg
    assert "download" in msg and "--archive" in msg
    assert not list((tmp_path / "out" / "text").glob("*.de-en.*"))  # nothing half-extracted left


def test_line_count_mismatch_names_the_opus_files(tmp_path):
    drop_line = lambda name, data: data.split(b"\n", 1)[1] if name.endswith("en-fr-train.fr") else data
    path = build_archive(tmp_path / opus100.ARCHIVE_NAME, change=drop_line)
    with pytest.raises(DataPrepError, match=rf"{PREFIX}/en-fr/opus.en-fr-train.en has 306 lines but "
                                            rf"{PREFIX}/en-fr/opus.en-fr-train.fr has 305"):
        opus100.prepare_opus100(tmp_path / "out", "en-fr", archive=path, url=NO_URL)


def test_empty_train_file_and_missing_pair(tmp_path):
    empty = lambda name, data: b"" if name.endswith("de-en-train.de") or name.endswith("de-en-train.en") else data
    path = build_archive(tmp_path / "a" / opus100.ARCHIVE_NAME, change=empty)
    with pytest.raises(DataPrepError, match=rf"{PREFIX}/de-en/opus.de-en-train.de in .* is empty"):
        opus100.prepare_opus100(tmp_path / "out", "de-en", archive=path, url=NO_URL)
    path = build_archive(tmp_path / "b" / opus100.ARCHIVE_NAME, pairs={"de-en": "de"})
    with pytest.raises(DataPrepError, match="has no supervised/en-fr/ files"):
        opus100.prepare_opus100(tmp_path / "out", "de-en,en-fr", archive=path, url=NO_URL)
    with pytest.raises(DataPrepError, match="does not exist"):
        opus100.prepare_opus100(tmp_path / "out", "de-en", archive=tmp_path / "missing.tar.gz", url=NO_URL)


# ---- download -----------------------------------------------------------------------------


@pytest.fixture
def server():
    """A local HTTP server for one payload; ``honour_range=False`` makes it ignore Range."""
    class Handler(http.server.BaseHTTPRequestHandler):
        payload, honour_range, ranges = b"", True, []

        def do_GET(self):
            rng = self.headers.get("Range")
            self.ranges.append(rng)
            m = re.fullmatch(r"bytes=(\d+)-", rng or "") if self.honour_range else None
            start, n = (int(m.group(1)) if m else 0), len(self.payload)
            if m and start >= n:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{n}")
                self.end_headers()
                return
            self.send_response(206 if m else 200)
            if m:
                self.send_header("Content-Range", f"bytes {start}-{n - 1}/{n}")
            self.send_header("Content-Length", str(n - start))
            self.end_headers()
            self.wfile.write(self.payload[start:])

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield Handler, f"http://127.0.0.1:{httpd.server_address[1]}/{opus100.ARCHIVE_NAME}"
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize("honour_range", [True, False])
def test_download_resumes_a_partial_file(archive, server, tmp_path, honour_range):
    handler, url = server
    handler.payload, handler.honour_range = archive.read_bytes(), honour_range
    dest = tmp_path / opus100.ARCHIVE_NAME
    part = tmp_path / (opus100.ARCHIVE_NAME + ".part")
    cut = len(handler.payload) // 3
    # a server that ignores Range sends the whole file, which must replace (not extend) the part
    part.write_bytes(handler.payload[:cut] if honour_range else b"x" * cut)
    assert opus100.download(url, dest) == dest
    assert dest.read_bytes() == handler.payload and not part.exists()
    assert handler.ranges == [f"bytes={cut}-"]
    # a complete .part (the rename was interrupted) is answered 416 and just renamed
    os.replace(dest, part)
    opus100.download(url, dest)
    assert dest.read_bytes() == handler.payload


def test_prepare_downloads_into_the_cache(archive, server, tmp_path):
    handler, url = server
    handler.payload = archive.read_bytes()
    opus100.prepare_opus100(tmp_path / "out", "en-fr", cache=tmp_path / "cache", vocab_size=500, url=url)
    assert (tmp_path / "cache" / opus100.ARCHIVE_NAME).read_bytes() == handler.payload
    assert (tmp_path / "out" / "lang_pairs.txt").read_text().strip() == "en-fr,fr-en"


def test_no_network_says_how_to_get_the_archive(tmp_path):
    with pytest.raises(DataPrepError, match=r"cannot download .*--archive PATH"):
        opus100.download(NO_URL + opus100.ARCHIVE_NAME, tmp_path / opus100.ARCHIVE_NAME)


# ---- benchmark metadata -------------------------------------------------------------------


def test_benchmark_languages_sizes_and_groups():
    bench = benchmarks.get("opus100")
    assert bench.english == "en" and bench.langs == LANGS and len(LANGS) == 94
    assert list(LANGS) == sorted(LANGS) and not set(NO_DEV_TEST) & set(LANGS)
    assert len(bench.directions()) == 188
    # the release README: "Of the 99 language pairs, 44 have 1M sentence pairs of training data,
    # 73 have at least 100k, and 95 have at least 10k"
    sizes = list(TRAIN_SIZES.values())
    assert len(sizes) == 99 and set(TRAIN_SIZES) == set(LANGS) | set(NO_DEV_TEST)
    counts = [sum(n == 1_000_000 for n in sizes), sum(n >= 100_000 for n in sizes), sum(n >= 10_000 for n in sizes)]
    assert counts == [44, 73, 95]
    for lang, n in {"gd": 16316, "gl": 515344, "gu": 318306, "oc": 35791, "or": 14273,
                    "te": 64352, "hi": 534319, "sv": 1000000}.items():
        assert TRAIN_SIZES[lang] == n
    # Zhang et al. (2020): high >= 0.9M (45 languages), low < 0.1M (21), medium the other 28
    assert list(GROUPS) == ["high", "medium", "low"]
    assert {g: len(m) for g, m in GROUPS.items()} == {"high": 45, "medium": 28, "low": 21}
    assert sorted(l for m in GROUPS.values() for l in m) == list(LANGS)  # disjoint and complete
    for lang, group in {"gd": "low", "te": "low", "gl": "medium", "hi": "medium", "tt": "medium",
                        "si": "high", "sv": "high", "de": "high"}.items():
        assert bench.group_of(lang) == group
    with pytest.raises(KeyError):
        bench.group_of("an")
    assert set(bench.paper["smoe-4-12"]) == set(bench.table_columns())
