"""The M4/M15 preparer (``data_prep.nllb_m15``) on a small ``m15.zip`` in the authors' layout,
built at test time from the committed real UDHR text (``tests/fixtures/udhr``, 14 of the 15 M15
languages): one SentencePiece model, one joined fairseq dictionary and fairseq's own mmap
writer, as in the real archive.  Also: corrupt and inconsistent archives, the download path
(with a stand-in ``gdown``), re-runs, and a 3-update training run on the prepared M4 data."""

import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_prep import nllb_m15  # noqa: E402
from data_prep.nllb_m15 import prepare_m15  # noqa: E402
from data_prep.spm_binarize import DataPrepError, read_idx_sizes  # noqa: E402
from fairseq_smoe.benchmarks.nllb import M4_LANGS, M15_LANGS  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "udhr"
LANGS = [l for l in M15_LANGS if (FIXTURE / f"all.eng-{l}.{l}").exists()]
N_VALID, N_TEST = 8, 12  # the last segments of each pair (the last articles) are valid + test
R = "m15_32k/"
SHARD = R + "data_bin/shard000/"
M4_DIRECTIONS = "nso-eng,msa-eng,tgl-eng,cat-eng,eng-nso,eng-msa,eng-tgl,eng-cat"


def read(path):
    return Path(path).read_text(encoding="utf-8").splitlines()


def splits(lang):
    """{split: (eng lines, lang lines)} of one fixture pair."""
    eng, other = read(FIXTURE / f"all.eng-{lang}.eng"), read(FIXTURE / f"all.eng-{lang}.{lang}")
    cut = {"train": slice(0, -(N_VALID + N_TEST)), "valid": slice(-(N_VALID + N_TEST), -N_TEST),
           "test": slice(-N_TEST, None)}
    return {s: (eng[c], other[c]) for s, c in cut.items()}


def pair_name(lang):
    return f"{lang}-eng" if lang == "nso" else f"eng-{lang}"  # the real names are unknown: test both


def build_archive(path: Path) -> None:
    """m15_32k/{data_bin/shard000,vocab_bin,retrieved_data} for LANGS, zipped to ``path``."""
    import sentencepiece as spm
    from fairseq.data import Dictionary
    from fairseq.data.indexed_dataset import make_builder

    text = {l: splits(l) for l in LANGS}
    train = [line for l in LANGS for side in text[l]["train"] for line in side]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(train), model_writer=model, vocab_size=1000,
                                   character_coverage=1.0, num_threads=1, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    encode = lambda lines: [" ".join(sp.encode(x, out_type=str)) for x in lines]  # noqa: E731
    dictionary = Dictionary()
    for line in encode(train):
        for piece in line.split():
            dictionary.add_symbol(piece)
    dictionary.finalize(padding_factor=8)
    dict_text = io.StringIO()
    dictionary.save(dict_text)
    members = {R + "vocab_bin/sentencepiece.source.32000.model": model.getvalue(),
               R + "data_bin/shard001/train.eng-nso.eng.idx": b"a later shard, never read"}
    members.update({f"{SHARD}dict.{l}.txt": dict_text.getvalue().encode() for l in [*LANGS, "eng"]})
    tmp = path.parent / "bin"
    tmp.mkdir()
    for lang in LANGS:
        pair = pair_name(lang)
        for split, sides in text[lang].items():
            for side, lines in zip(("eng", lang), sides):
                stem = tmp / f"{split}.{pair}.{side}"
                builder = make_builder(f"{stem}.bin", impl="mmap", vocab_size=len(dictionary))
                for line in encode(lines):
                    assert len(line.split()) < 500  # fits the recipes' 512 positions
                    builder.add_item(dictionary.encode_line(line, add_if_not_exist=False))
                builder.finalize(f"{stem}.idx")
                for ext in ("bin", "idx"):
                    members[f"{SHARD}{split}.{pair}.{side}.{ext}"] = Path(f"{stem}.{ext}").read_bytes()
                if split == "test":  # the real archive names raw test files eng-xxx
                    raw = "".join(x + "\n" for x in lines).encode()
                    members[f"{R}retrieved_data/test.eng-{lang}.{side}"] = raw
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in sorted(members.items()):
            zf.writestr(name, data)


def rewrite(src: Path, dst: Path, edits=None, compress=zipfile.ZIP_DEFLATED) -> Path:
    """A copy of the zip ``src`` with members replaced (bytes) or removed (None)."""
    edits = edits or {}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compress) as zout:
        for name in zin.namelist():
            data = edits.get(name, zin.read(name))
            if data is not None:
                zout.writestr(name, data)
    return dst


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    path = tmp_path_factory.mktemp("zip") / "m15.zip"
    build_archive(path)
    return path


@pytest.fixture(scope="module")
def m4(archive, tmp_path_factory):
    out = tmp_path_factory.mktemp("m4")
    return out, prepare_m15(out, "m4", archive=archive)


def test_fixture_languages():
    assert set(M4_LANGS) <= set(LANGS) and len(LANGS) >= 6, LANGS


def test_m4_output_contract(m4, archive):
    out, summary = m4
    assert (out / "lang_pairs.txt").read_text() == M4_DIRECTIONS + "\n"
    assert (out / "langs.txt").read_text() == "nso,msa,tgl,cat,eng\n"
    assert read(out / "lang_dict.txt") == ["nso", "msa", "tgl", "cat", "eng"]
    with zipfile.ZipFile(archive) as zf:
        assert (out / "spm.model").read_bytes() == zf.read(R + "vocab_bin/sentencepiece.source.32000.model")
        dict_bytes = zf.read(SHARD + "dict.eng.txt")
    data_bin = out / "data-bin"
    assert sorted(p.name for p in data_bin.glob("dict.*")) == sorted(f"dict.{l}.txt" for l in (*M4_LANGS, "eng"))
    assert all(p.read_bytes() == dict_bytes for p in data_bin.glob("dict.*"))
    assert not list(data_bin.glob("*isl*")), "only the selected languages are extracted"
    for lang in M4_LANGS:
        pair, text = pair_name(lang), splits(lang)
        for split in ("train", "valid", "test"):
            for side in ("eng", lang):
                n = len(read_idx_sizes(data_bin / f"{split}.{pair}.{side}.idx"))
                assert n == len(text[split][0]) == summary["counts"][pair][split]
        for src, tgt in ((lang, "eng"), ("eng", lang)):  # raw references, both directions, untouched
            assert read(out / "raw" / f"test.{src}-{tgt}.{lang}") == text["test"][1]
            assert read(out / "raw" / f"test.{src}-{tgt}.eng") == text["test"][0]
    assert not list(out.rglob("*.part"))


def test_m15_takes_every_language_of_the_archive(archive, tmp_path, capsys):
    summary = prepare_m15(tmp_path, "m15", langs=",".join(LANGS), archive=archive)
    assert summary["langs"] == [*LANGS, "eng"]  # the authors' --langs order, eng last
    assert (tmp_path / "lang_pairs.txt").read_text().strip().split(",") == \
        [f"{l}-eng" for l in LANGS] + [f"eng-{l}" for l in LANGS]
    assert len(list((tmp_path / "raw").glob("test.*"))) == 4 * len(LANGS)
    err = capsys.readouterr().err
    assert "NOTICE" in err and "shard001" in err and "NOT used" in err
    with pytest.raises(DataPrepError, match=r"lim: expected .*found: nothing(.|\n)*--langs"):
        prepare_m15(tmp_path / "all", "m15", archive=archive)  # the default is all 15


def test_rerun_skips_finished_work(m4, archive, capsys):
    out, _ = m4
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    summary = prepare_m15(out, "m4", archive=archive)
    assert summary["extracted"] == 0 and summary["skipped"] > 0
    assert "(skipped)" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == mtimes


def test_bad_languages_are_named(archive, tmp_path):
    with pytest.raises(DataPrepError, match="unknown language.*xxx.*valid.*nso,run,ssw"):
        prepare_m15(tmp_path, "m15", langs="nso,xxx", archive=archive)
    with pytest.raises(DataPrepError, match="unknown language.*for m4: isl.*nso,msa,tgl,cat"):
        prepare_m15(tmp_path, "m4", langs="isl", archive=archive)


def test_corrupt_archive(archive, tmp_path):
    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(DataPrepError,
                       match="truncated.zip is not a complete zip.*Delete it and download it again.*--archive"):
        prepare_m15(tmp_path / "a", "m4", archive=truncated)
    # a flipped byte inside a stored member: the CRC-32 check on extraction catches it
    bad = rewrite(archive, tmp_path / "crc.zip", compress=zipfile.ZIP_STORED)
    with zipfile.ZipFile(bad) as zf:
        info = zf.getinfo(f"{SHARD}train.eng-cat.cat.bin")
    data = bytearray(bad.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data[start + info.file_size // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(DataPrepError, match="crc.zip is not a complete.*train.eng-cat.cat.bin.*CRC"):
        prepare_m15(tmp_path / "b", "m4", archive=bad)
    assert not list((tmp_path / "b").rglob("*.part"))
    with pytest.raises(DataPrepError, match="does not exist"):
        prepare_m15(tmp_path / "c", "m4", archive=tmp_path / "missing.zip")


def test_inconsistent_archives(archive, tmp_path):
    raw = f"{R}retrieved_data/test.eng-cat.cat"
    with zipfile.ZipFile(archive) as zf:
        lines = zf.read(raw).decode().splitlines(keepends=True)
        eng = zf.read(f"{R}retrieved_data/test.eng-cat.eng").decode().splitlines(keepends=True)
    cases = {
        "src_tgt": ({raw: "".join(lines[:-1]).encode()}, r"test.cat-eng.cat has 11 lines but .*eng has 12"),
        "raw_vs_bin": ({raw: "".join(lines[:-1]).encode(),
                        f"{R}retrieved_data/test.eng-cat.eng": "".join(eng[:-1]).encode()},
                       r"raw test text of eng-cat has 11 lines .* binarized test set .* holds 12"),
        "empty": ({raw: b"", f"{R}retrieved_data/test.eng-cat.eng": b""}, r"test.cat-eng.cat is empty"),
        "missing": ({f"{SHARD}valid.eng-tgl.tgl.idx": None},
                    r"tgl: expected \{train,valid,test\}.eng-tgl.* found: .*train.eng-tgl.tgl.idx"),
        "dicts": ({f"{SHARD}dict.msa.txt": b"x 1\n"}, r"dictionaries .* differ"),
    }
    for name, (edits, message) in cases.items():
        bad = rewrite(archive, tmp_path / f"{name}.zip", edits)
        with pytest.raises(DataPrepError, match=message):
            prepare_m15(tmp_path / name, "m4", archive=bad)


def test_download_with_gdown_or_a_clear_message(archive, tmp_path, monkeypatch):
    monkeypatch.setattr(nllb_m15.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataPrepError, match=r"gdown package is not installed.*gdown https://drive.google"
                                            r".*1tT2urUunXLNEPZxxV2nK-YmC_N6P_48m.*--archive"):
        prepare_m15(tmp_path / "a", "m4", cache=tmp_path / "cache")
    monkeypatch.undo()
    fake = tmp_path / "fake"  # a stand-in gdown: copies $FAKE_SOURCE to -O, or fails without it
    (fake / "gdown").mkdir(parents=True)
    (fake / "gdown" / "__init__.py").write_text("")
    (fake / "gdown" / "__main__.py").write_text(
        "import os, shutil, sys\n"
        "src = os.environ.get('FAKE_SOURCE')\n"
        "sys.exit(1) if not src else shutil.copy(src, sys.argv[sys.argv.index('-O') + 1])\n")
    monkeypatch.syspath_prepend(str(fake))
    monkeypatch.setenv("PYTHONPATH", str(fake))
    with pytest.raises(DataPrepError, match="gdown could not download .*--archive"):
        nllb_m15.fetch_archive(tmp_path / "cache")
    monkeypatch.setenv("FAKE_SOURCE", str(archive))
    assert nllb_m15.fetch_archive(tmp_path / "cache") == tmp_path / "cache" / "m15.zip"
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["m15.zip"]
    monkeypatch.delenv("FAKE_SOURCE")  # the cached archive is used from now on
    assert prepare_m15(tmp_path / "b", "m4", cache=tmp_path / "cache")["extracted"] > 0


def test_prepare_train_evaluate_table_on_m4(m4, tmp_path):
    """The whole M4 pipeline: scripts/train.sh with the SMoE-2-2-2-2 recipe (tiny model, 3
    updates, validating on the valid and test splits of all 8 directions), scripts/evaluate.sh
    on every test line, scripts/reproduce_table.sh in Table 1's layout next to the paper's row."""
    out, _ = m4
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "CUDA_VISIBLE_DEVICES": ""}  # one CPU worker, whatever the machine has
    run = subprocess.run(
        ["bash", str(ROOT / "scripts" / "train.sh"), "m4/smoe-2-2-2-2", str(out), str(tmp_path / "ckpt"),
         "--arch", "smoe_transformer_tiny", "--update-freq", "1", "--max-tokens", "2048",
         "--max-update", "3", "--no-epoch-checkpoints", "--valid-subset", "valid,test", "--log-interval", "1",
         "--num-workers", "0"],
        capture_output=True, text=True, env=env, timeout=300)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    assert '"num_updates": "3"' in log
    for direction in M4_DIRECTIONS.split(","):
        assert f"valid_loss_{direction}" in log and f"test_loss_{direction}" in log, direction

    eval_dir = tmp_path / "smoe-2-2-2-2" / "eval"
    run = subprocess.run(["bash", str(ROOT / "scripts" / "evaluate.sh"), str(tmp_path / "ckpt" / "checkpoint_last.pt"),
                          str(out), str(eval_dir), "--beam", "1", "--cpu"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    for direction in M4_DIRECTIONS.split(","):
        src, tgt = direction.split("-")
        refs = (out / "raw" / f"test.{direction}.{tgt}").read_text().splitlines()
        assert len((eval_dir / f"hyp.{direction}.{tgt}").read_text().splitlines()) == len(refs) > 0
    assert "Means by side and resource group (m4 benchmark" in (eval_dir / "scores.md").read_text()
    run = subprocess.run(["bash", str(ROOT / "scripts" / "reproduce_table.sh"), "m4", str(eval_dir)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "| system | nso-eng | msa-eng | tgl-eng | cat-eng | eng-nso | eng-msa | eng-tgl | eng-cat | avg |" in run.stdout
    assert "| smoe-2-2-2-2 (ours) |" in run.stdout and "| smoe-2-2-2-2 (paper) | 30.96 |" in run.stdout
