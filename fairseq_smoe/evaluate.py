"""Translate and score every direction of a prepared data directory.

    python -m fairseq_smoe.evaluate CHECKPOINT DATA_DIR OUT_DIR [--beam 5 --lenpen 1.0]

DATA_DIR is what ``data_prep.spm_binarize`` writes: ``data-bin/``, ``lang_pairs.txt`` and
``raw/test.SRC-TGT.{SRC,TGT}``. Each direction is decoded with stock ``fairseq-generate``
(deterministic, no token dropped by capacity) and every test line is checked to come back.

Metrics per direction (columns of ``scores.csv``):

* ``bleu``: sacreBLEU, 13a tokenizer, on detokenized text against ``raw/test.*``.
* ``spbleu``: sacreBLEU with the ``flores200`` SentencePiece tokenizer (the paper's OPUS-100
  metric).  sacreBLEU downloads that model on first use; offline, pass ``--flores200-spm PATH``
  (the file behind https://tinyurl.com/flores200sacrebleuspm) or the column stays empty and
  ``scores.md`` says why.
* ``chrf``, ``chrf++``: sacreBLEU chrF and chrF++ (word order 2).
* ``spm_bleu``: the paper's M4/M15 "BLEU": fairseq's default BLEU scorer over the model's own
  SentencePiece ids (references and hypotheses both keep the ``__tgt__`` tag), i.e. exactly the
  ``BLEU4 =`` figure of the authors' ``fairseq-generate --bpe sentencepiece`` command.
* ``copy_chrf``: chrF of copying the source, the floor a model must beat.
* ``rc_enc``, ``rc_dec``: mean strata passes per token per SMoE block (teacher forcing on the
  same test set).

Writes ``hyp.SRC-TGT.TGT``, ``scores.csv`` and ``scores.md`` (per-direction table, then the
e->x / x->e means by resource group of the benchmark the directions belong to, see
``fairseq_smoe.benchmarks``) to OUT_DIR and prints the tables.
"""

import argparse
import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import sacrebleu
import torch

from . import benchmarks, report

PLUGIN_DIR = str(Path(__file__).resolve().parent)


class EvaluationError(RuntimeError):
    pass


def read_lines(path):
    """Lines split on '\n' only, as data_prep counts them (a CR before the LF is dropped)."""
    with open(path, encoding="utf-8", newline="\n") as f:
        return [line.rstrip("\n").removesuffix("\r") for line in f]


def task_args(checkpoint):
    """The training task's flags, so decoding uses the same languages and language tokens."""
    from .checkpoint_io import CheckpointError, read_checkpoint

    try:
        state = read_checkpoint(checkpoint)  # names the file and what is wrong with it
    except CheckpointError as err:
        raise EvaluationError(str(err)) from err
    task = state["cfg"]["task"]
    get = (lambda k: getattr(task, k, None)) if not isinstance(task, dict) else task.get
    if get("_name") not in ("smoe_translation", "translation_multi_simple_epoch"):
        raise EvaluationError(
            f"{checkpoint} was trained with task {get('_name')!r}; this evaluator needs a "
            f"multilingual smoe_translation checkpoint"
        )
    pairs = get("lang_pairs")
    langs = get("langs")
    flags = [
        "--task", "smoe_translation",
        "--lang-pairs", ",".join(pairs) if isinstance(pairs, list) else pairs,
        "--langs", ",".join(langs) if isinstance(langs, list) else langs,
    ]
    if get("encoder_langtok"):
        flags += ["--encoder-langtok", get("encoder_langtok")]
    if get("decoder_langtok"):
        flags += ["--decoder-langtok"]
    return flags


BLEU4 = re.compile(r"Generate test with beam=\d+: BLEU4 = ([\d.]+)")


def generate(checkpoint, data_bin, spm_model, src, tgt, flags, beam, lenpen, max_tokens, cpu):
    """Decode the test set of src->tgt with fairseq-generate.

    Returns the detokenized hypotheses in input order, their ids, and the ``BLEU4`` that
    fairseq's default scorer prints: computed on SentencePiece ids, as in the paper."""
    cmd = [
        sys.executable, "-m", "fairseq_cli.generate", data_bin, "--user-dir", PLUGIN_DIR,
        *flags, "--source-lang", src, "--target-lang", tgt, "--path", checkpoint,
        "--gen-subset", "test", "--beam", str(beam), "--lenpen", str(lenpen),
        "--max-tokens", str(max_tokens), "--bpe", "sentencepiece", "--sentencepiece-model", spm_model,
        "--num-workers", "0", "--seed", "1",
    ] + (["--cpu"] if cpu else [])
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        raise EvaluationError(f"fairseq-generate {src}-{tgt} failed:\n{run.stderr[-3000:]}")
    hyps = {}
    for line in run.stdout.splitlines():
        m = re.match(r"^D-(\d+)\t[^\t]*\t?(.*)$", line)
        if m:
            hyps[int(m.group(1))] = m.group(2)
    bleu4 = BLEU4.search(run.stdout)
    if bleu4 is None:
        raise EvaluationError(f"fairseq-generate {src}-{tgt} printed no 'BLEU4 =' line:\n{run.stdout[-2000:]}")
    return [hyps[i] for i in sorted(hyps)], hyps, float(bleu4.group(1))


@torch.no_grad()
def strata_passes(checkpoint, data_bin, max_tokens, cpu):
    """Mean passes per token per SMoE block, per direction, on the test set (teacher forcing)."""
    from fairseq import checkpoint_utils, utils

    import fairseq_smoe  # noqa: F401

    models, _cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        [checkpoint], arg_overrides={"data": data_bin}
    )
    from .modules.stats import recording

    model = models[0].eval()
    if not cpu:
        model.cuda()
    if not hasattr(model, "smoe_blocks"):
        return {}
    task.load_dataset("test")
    itr = task.get_batch_iterator(
        dataset=task.dataset("test"), max_tokens=max_tokens,
        max_positions=utils.resolve_max_positions(task.max_positions(), model.max_positions()),
    ).next_epoch_itr(shuffle=False)
    names = task.direction_names
    totals = {}
    for sample in itr:
        sample = sample if cpu else utils.move_to_cuda(sample)
        with recording() as record:
            model(**sample["net_input"])
        for side in ("encoder", "decoder"):
            blocks = record.blocks(side)
            if not blocks:
                continue
            passes = sum(b.passes_TB.sum(0) for b in blocks).double()
            tokens = sum(b.routed_TB.sum(0) for b in blocks).double()
            for d in sample["direction"].unique().tolist():
                sel = sample["direction"].to(passes.device) == d
                acc = totals.setdefault((names[d], side), [0.0, 0.0])
                acc[0] += passes[sel].sum().item()
                acc[1] += tokens[sel].sum().item()
    return {k: p / t for k, (p, t) in totals.items() if t > 0}


def flores200_ready(spm_path=None):
    """Make sure sacreBLEU's ``flores200`` tokenizer can load; return None or why it cannot.

    ``spm_path`` (the flores200 SentencePiece model) is installed where sacreBLEU looks for it;
    without it sacreBLEU's own download is tried once."""
    from sacrebleu.tokenizers import tokenizer_spm

    target = os.path.join(tokenizer_spm.SACREBLEU_DIR, "models", "flores200sacrebleuspm")
    if spm_path:
        if not os.path.isfile(spm_path):
            raise EvaluationError(f"--flores200-spm {spm_path} does not exist")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(spm_path, "rb") as f:
            model = f.read()
        if not os.path.exists(target) or open(target, "rb").read() != model:
            with open(target + ".tmp", "wb") as f:
                f.write(model)
            os.replace(target + ".tmp", target)
    try:
        tokenizer_spm.Flores200Tokenizer()
        return None
    except (Exception, SystemExit) as err:  # sacreBLEU calls sys.exit on some download errors
        if os.path.exists(target) and os.path.getsize(target) == 0:
            os.remove(target)  # a failed download leaves an empty file that would stick
        return (
            f"spBLEU not computed: sacreBLEU's flores200 SentencePiece model could not be loaded "
            f"or downloaded ({type(err).__name__}: {err}). Download "
            f"{tokenizer_spm.SPM_MODELS['flores200']['url']} elsewhere and pass --flores200-spm PATH."
        )


def score(hyps, refs, srcs, with_spbleu):
    return {
        "bleu": sacrebleu.corpus_bleu(hyps, [refs]).score,
        "spbleu": sacrebleu.corpus_bleu(hyps, [refs], tokenize="flores200").score if with_spbleu else "",
        "chrf": sacrebleu.corpus_chrf(hyps, [refs]).score,
        "chrf++": sacrebleu.corpus_chrf(hyps, [refs], word_order=2).score,
        "copy_chrf": sacrebleu.corpus_chrf(srcs, [refs]).score,
    }


COLUMNS = ["direction", "lines", "bleu", "spbleu", "chrf", "chrf++", "spm_bleu", "copy_chrf", "rc_enc", "rc_dec"]
METRICS = ["bleu", "spbleu", "chrf", "chrf++", "spm_bleu"]


def write_tables(rows, out_dir, notes=()):
    with open(os.path.join(out_dir, "scores.csv"), "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else str(v)
    body = [[fmt(r[c]) for c in COLUMNS] for r in rows]
    mean = {c: sum(r[c] for r in rows) / len(rows) for c in COLUMNS[2:] if all(isinstance(r[c], float) for r in rows)}
    body.append(["**mean**"] + [fmt(mean.get(c, "")) for c in COLUMNS[1:]])
    table = report.markdown(COLUMNS, body)
    bench = benchmarks.detect([r["direction"] for r in rows])
    if bench is not None:
        scores = {r["direction"]: {m: (r[m] if isinstance(r[m], float) else None) for m in METRICS} for r in rows}
        table += f"\nMeans by side and resource group ({bench.name} benchmark; e→x: English source)\n\n"
        table += report.grouped_table(scores, bench, METRICS)
        missing = report.missing_directions(scores, bench)
        if missing and bench.name != "bible":
            notes = list(notes) + [f"{len(missing)} {bench.name} directions not in this data: means are over the others"]
    table += "".join(f"\n* {n}" for n in notes) + ("\n" if notes else "")
    with open(os.path.join(out_dir, "scores.md"), "w", encoding="utf-8") as f:
        f.write(table)
    return table


def evaluate(checkpoint, data_dir, out_dir, beam=5, lenpen=1.0, max_tokens=4096, cpu=None, flores200_spm=None):
    checkpoint, data_dir, out_dir = str(checkpoint), str(data_dir), str(out_dir)
    cpu = (not torch.cuda.is_available()) if cpu is None else cpu
    data_bin = os.path.join(data_dir, "data-bin")
    pairs_file = os.path.join(data_dir, "lang_pairs.txt")
    spm_model = os.path.join(data_dir, "spm.model")
    for needed in (data_bin, pairs_file, spm_model):
        if not os.path.exists(needed):
            raise EvaluationError(f"{needed} is missing; prepare DATA_DIR with scripts/prepare_data.sh")
    directions = [d for d in read_lines(pairs_file)[0].split(",") if d]
    flags = task_args(checkpoint)
    os.makedirs(out_dir, exist_ok=True)
    spbleu_problem = flores200_ready(flores200_spm)
    if spbleu_problem:
        print(f"evaluate: {spbleu_problem}", file=sys.stderr, flush=True)
    passes = strata_passes(checkpoint, data_bin, max_tokens, cpu)
    rows = []
    for direction in directions:
        src, tgt = direction.split("-")
        raw = os.path.join(data_dir, "raw", f"test.{direction}")
        srcs, refs = read_lines(f"{raw}.{src}"), read_lines(f"{raw}.{tgt}")
        hyps, by_id, spm_bleu = generate(checkpoint, data_bin, spm_model, src, tgt, flags, beam, lenpen, max_tokens, cpu)
        if len(hyps) != len(refs) or sorted(by_id) != list(range(len(refs))):
            raise EvaluationError(
                f"{direction}: fairseq-generate returned {len(hyps)} translations for "
                f"{len(refs)} test lines ({raw}.{tgt}); no line may be lost"
            )
        with open(os.path.join(out_dir, f"hyp.{direction}.{tgt}"), "w", encoding="utf-8") as f:
            f.write("\n".join(hyps) + "\n")
        row = {"direction": direction, "lines": len(refs), **score(hyps, refs, srcs, spbleu_problem is None)}
        row["spm_bleu"] = spm_bleu
        row["rc_enc"] = passes.get((direction, "encoder"), "")
        row["rc_dec"] = passes.get((direction, "decoder"), "")
        rows.append(row)
        print(f"{direction}: chrF {row['chrf']:.1f} BLEU {row['bleu']:.1f} spm-BLEU {spm_bleu:.1f} "
              f"(copy chrF {row['copy_chrf']:.1f}; {len(hyps)} lines)", flush=True)
    return rows, write_tables(rows, out_dir, [spbleu_problem] if spbleu_problem else [])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("data_dir")
    p.add_argument("out_dir")
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--lenpen", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--cpu", action="store_true", default=None, help="decode on CPU (default: when no GPU)")
    p.add_argument("--flores200-spm", help="sacreBLEU's flores200 SentencePiece model, for spBLEU offline")
    a = p.parse_args(argv)
    try:
        _, table = evaluate(a.checkpoint, a.data_dir, a.out_dir, a.beam, a.lenpen, a.max_tokens, a.cpu, a.flores200_spm)
    except EvaluationError as err:
        sys.exit(f"error: {err}")
    print(table)


if __name__ == "__main__":
    main()
