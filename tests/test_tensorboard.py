"""fairseq-train --tensorboard-logdir with the plugin: the routing statistics become curves.

A short real training run on the committed Bible fixture; its event files are read back with
tensorboardX's protobuf definitions (TFRecord framing, CRCs checked)."""

import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_prep.spm_binarize import prepare  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "bible"
ROUTING = ("moe_gate_loss", "rc_enc", "rc_dec", "dropped")


def read_scalars(event_file):
    """{tag: [(step, value)]} of the simple_value scalars in a TensorBoard event file."""
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.record_writer import masked_crc32c

    data, pos, scalars = event_file.read_bytes(), 0, {}
    while pos < len(data):
        header = data[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
        record = data[pos + 12:pos + 12 + length]
        (record_crc,) = struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])
        assert header_crc == masked_crc32c(header) and record_crc == masked_crc32c(record), event_file
        pos += 16 + length
        event = Event()
        event.ParseFromString(record)
        for value in event.summary.value:
            if value.HasField("simple_value"):
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tb")
    data = tmp / "data"
    prepare(FIXTURE, ["en-de"], data, vocab_size=500)
    run = subprocess.run([
        sys.executable, "-m", "fairseq_cli.train", str(data / "data-bin"), "--user-dir", str(ROOT / "fairseq_smoe"),
        "--task", "smoe_translation", "--lang-pairs", "en-de,de-en", "--langs", "de,en",
        "--encoder-langtok", "tgt", "--decoder-langtok",
        "--arch", "smoe_transformer_tiny", "--smoe-strata", "2,2", "--moe-expert-count", "4",
        "--criterion", "smoe_label_smoothed_cross_entropy", "--label-smoothing", "0.1",
        "--share-all-embeddings", "--optimizer", "adam", "--lr", "3e-3", "--lr-scheduler", "inverse_sqrt",
        "--warmup-updates", "10", "--max-tokens", "2048", "--max-update", "20", "--cpu", "--num-workers", "0",
        "--seed", "1", "--no-save", "--log-format", "json", "--log-interval", "5",
        "--validate-interval-updates", "10", "--tensorboard-logdir", str(tmp / "tb"),
    ], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    assert "tensorboard not found" not in run.stdout + run.stderr
    return tmp / "tb"


def scalars_of(logdir, tag):
    (event_file,) = (logdir / tag).glob("events.out.tfevents.*")
    return read_scalars(event_file)


def test_training_curves_have_the_routing_statistics(logdir):
    scalars = scalars_of(logdir, "train_inner")  # every --log-interval updates
    for key in ROUTING + ("loss",):
        steps = [s for s, _ in scalars[key]]
        values = [v for _, v in scalars[key]]
        assert steps == [5, 10, 15, 20], (key, steps)
        assert all(math.isfinite(v) for v in values), (key, values)
    assert all(1.0 <= v <= 2.0 for tag in ("rc_enc", "rc_dec") for _, v in scalars[tag])  # 2 strata
    assert all(0.0 <= v < 1.0 for _, v in scalars["dropped"])
    assert all(v > 0 for _, v in scalars["moe_gate_loss"])


def test_validation_curves_per_direction(logdir):
    scalars = scalars_of(logdir, "valid")
    for key in ROUTING + ("loss_en-de", "rc_enc_de-en", "rc_dec_en-de"):
        assert [s for s, _ in scalars[key]] == [10, 20], key
        assert all(math.isfinite(v) for _, v in scalars[key]), key
    assert [v for _, v in scalars["dropped"]] == [0.0, 0.0]  # no token dropped at evaluation
