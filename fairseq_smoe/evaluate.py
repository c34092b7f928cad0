"""Translate and score every direction of a prepared data directory.

    python -m fairseq_smoe.evaluate CHECKPOINT DATA_DIR OUT_DIR [--beam 5 --lenpen 1.0]

DATA_DIR is what ``data_prep.spm_binarize`` writes: ``data-bin/``, ``lang_pairs.txt`` and
``raw/test.SRC-TGT.{SRC,TGT}``. The checkpoint is loaded once and every direction is decoded
in this process by ``fairseq_smoe.translator`` (fairseq-generate's own loop: the same
hypotheses as ``fairseq-generate --beam B --lenpen P --max-tokens N --seed 1``), with the
training task's language setup read from the checkpoint (``--langs``/``--lang-dict``,
``--lang-tok-style``, ``--encoder-langtok``, ``--decoder-langtok``,
``--lang-tok-replacing-bos-eos``, dictionaries, ...); deterministic, no token dropped by
capacity, and every test line is checked to come back.

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
  same test set, batch by batch with the decoding).

Writes ``hyp.SRC-TGT.TGT``, ``scores.csv`` and ``scores.md`` (per-direction table, then the
e->x / x->e means by resource group of the benchmark the directions belong to, see
``fairseq_smoe.benchmarks``) to OUT_DIR and prints the tables.
"""

import argparse
import csv
import os
import sys
import time
from typing import Dict, NamedTuple

import numpy as np
import sacrebleu
import torch

from . import benchmarks, errors, report
from .translator import (
    PATH_FLAGS, SEED, SMoETranslator, TranslatorError, routing_record, seeded, training_task_config,
)


class EvaluationError(TranslatorError):
    pass


def read_lines(path):
    """Lines split on '\n' only, as data_prep counts them (a CR before the LF is dropped); text
    that is not UTF-8 is refused naming the file and the line."""
    from .data_checks import DataError, read_lines as read_utf8_lines

    try:
        return read_utf8_lines(path)
    except DataError as err:
        raise EvaluationError(str(err)) from None


def task_args(checkpoint):
    """The checkpoint's state, read once, checked to be of a multilingual task; decoding builds
    every direction's task from the training task saved in it (same languages and tokens)."""
    from .checkpoint_io import CheckpointError, read_checkpoint

    try:
        state = read_checkpoint(checkpoint)  # names the file and what is wrong with it
    except CheckpointError as err:
        raise EvaluationError(str(err)) from err
    training_task_config(state, checkpoint)
    return state


def check_decoding_args(beam, max_tokens, max_passes=None):
    """The decoding options' domains, checked before anything is loaded or written."""
    if beam is not None and beam < 1:
        raise EvaluationError(f"--beam {beam}: the beam size must be at least 1 (1: greedy decoding)")
    if max_tokens is not None and max_tokens < 1:
        raise EvaluationError(f"--max-tokens {max_tokens}: a batch must hold at least one token; give a "
                              f"positive number (default 4096)")
    if max_passes is not None and max_passes < 1:
        raise EvaluationError(f"--smoe-max-passes {max_passes}: give a pass budget K in 1..L (L: the "
                              f"model's strata), or leave it out for the model as trained")


def check_max_passes(state, checkpoint, max_passes):
    """``--smoe-max-passes K`` must be within the strata of the checkpoint's model."""
    if max_passes is None:
        return
    from .cost import stock_model
    from .modules.config import parse_strata

    args = state["cfg"]["model"] if state.get("cfg") is not None else state.get("args")
    stock = stock_model(args)
    if stock is None and getattr(args, "moe_freq", 0) <= 0:
        stock = "a dense smoe_transformer model (--moe-freq 0)"
    if stock is not None:
        raise EvaluationError(f"--smoe-max-passes {max_passes}: {checkpoint} is {stock}; it has no strata "
                              f"passes to cap (leave the flag out)")
    strata = parse_strata(getattr(args, "smoe_strata", ""), args.moe_expert_count)
    if max_passes > len(strata):
        raise EvaluationError(f"--smoe-max-passes {max_passes}: {checkpoint} has {len(strata)} strata "
                              f"(--smoe-strata {','.join(map(str, strata))}); give K in 1..{len(strata)}")


def check_max_tokens(sizes, max_tokens, direction, where, need=None):
    """Every sentence of one direction (``sizes``: a dataset's, or its ``[n, 2]`` source and
    target sizes) must fit one batch of ``--max-tokens`` (fairseq counts a sentence pair as its
    longer side, language tag and end-of-sentence included); else name the first one too long
    (its line in ``where``) and the smallest value that works (``need``, default the longest of
    these), instead of fairseq's bare assertion."""
    sizes = np.asarray(getattr(sizes, "sizes", sizes))
    tokens = sizes.max(axis=1) if sizes.ndim == 2 else sizes
    if len(tokens) == 0 or int(tokens.max()) <= max_tokens:
        return
    first = int(np.flatnonzero(tokens > max_tokens)[0])
    raise EvaluationError(
        f"--max-tokens {max_tokens} is below the length of sentence {direction} line {first + 1} "
        f"({where}: {int(tokens[first])} tokens, language tag and end of sentence included; "
        f"{int((tokens > max_tokens).sum())} sentences of {direction} are longer): a batch must hold a "
        f"whole sentence. Use --max-tokens {need or int(tokens.max())} or more"
    )


def strata_passes(model, net_input, totals):
    """One teacher-forced forward of ``model`` on a batch; adds the strata passes and routed
    tokens of every SMoE block to ``totals[side] = [passes, tokens]``."""
    record = routing_record(model, net_input)
    for side in ("encoder", "decoder"):
        blocks = record.blocks(side)
        if blocks:
            acc = totals.setdefault(side, [0.0, 0.0])
            acc[0] += sum(float(b.passes_TB.sum()) for b in blocks)
            acc[1] += sum(float(b.routed_TB.sum()) for b in blocks)


class Decoded(NamedTuple):
    hyps: Dict[int, str]  # detokenized hypothesis by test sentence id
    bleu4: str  # fairseq's default scorer, as fairseq-generate prints it after "Generate test with beam=B: "
    spm_bleu: float  # its BLEU4 figure (2 decimals, as printed)
    passes: Dict[str, float]  # mean strata passes per token per SMoE block, by side


@torch.no_grad()
def decode_direction(translator, src, tgt, beam, lenpen) -> Decoded:
    """Every test sentence of src->tgt, as fairseq-generate decodes it, with the ``BLEU4`` of
    fairseq's default scorer (on SentencePiece ids, language tag included: the paper's
    metric) and the strata passes (teacher forcing on the same batches)."""
    from fairseq import scoring

    task = translator.task(src, tgt)
    if "test" not in task.datasets:  # fairseq's multilingual task cannot load a split twice
        task.load_dataset("test")
    scorer = scoring.build_scorer("bleu", task.target_dictionary)
    totals = {}
    hyps = {}
    with seeded(SEED, translator.device):
        batches = translator.batches(task, task.dataset("test"))
        on_batch = lambda sample: strata_passes(translator.model, sample["net_input"], totals)
        for sample_id, _, _, text in translator.decode(task, batches, beam, lenpen, scorer=scorer, on_batch=on_batch):
            hyps[sample_id] = text
    if not hyps:
        raise EvaluationError(f"{src}-{tgt}: the test set is empty")
    bleu4 = scorer.result_string()
    passes = {side: p / t for side, (p, t) in totals.items() if t > 0}
    return Decoded(hyps, bleu4, float(f"{scorer.score():.2f}"), passes)


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


def evaluate(checkpoint, data_dir, out_dir, beam=5, lenpen=1.0, max_tokens=4096, cpu=None, flores200_spm=None,
             task_paths=None, max_passes=None):
    checkpoint, data_dir, out_dir = str(checkpoint), str(data_dir), str(out_dir)
    check_decoding_args(beam, max_tokens, max_passes)
    cpu = (not torch.cuda.is_available()) if cpu is None else cpu
    data_bin = os.path.join(data_dir, "data-bin")
    pairs_file = os.path.join(data_dir, "lang_pairs.txt")
    spm_model = os.path.join(data_dir, "spm.model")
    for needed in (data_bin, pairs_file, spm_model):
        if not os.path.exists(needed):
            raise EvaluationError(f"{needed} is missing; prepare DATA_DIR with scripts/prepare_data.sh")
    directions = [d for d in read_lines(pairs_file)[0].split(",") if d]
    started = time.perf_counter()
    state = task_args(checkpoint)
    check_max_passes(state, checkpoint, max_passes)
    translator = SMoETranslator(checkpoint, data_dir, device="cpu" if cpu else "cuda", max_tokens=max_tokens,
                                task_paths=task_paths, max_passes=max_passes, state=state)
    tests = {}
    for direction in directions:  # every direction's test set fits a batch, before anything is decoded
        src, tgt = direction.split("-")
        task = translator.task(src, tgt)
        if "test" not in task.datasets:  # fairseq's multilingual task cannot load a split twice
            task.load_dataset("test")
        tests[direction] = np.asarray(task.dataset("test").sizes)
    need = max((int(s.max()) for s in tests.values() if s.size), default=0)
    for direction, sizes in tests.items():
        check_max_tokens(sizes, max_tokens, direction,
                         os.path.join(data_dir, "raw", f"test.{direction}.{direction.split('-')[0]}"), need)
    os.makedirs(out_dir, exist_ok=True)
    spbleu_problem = flores200_ready(flores200_spm)
    if spbleu_problem:
        print(f"evaluate: {spbleu_problem}", file=sys.stderr, flush=True)
    rows = []
    for direction in directions:
        src, tgt = direction.split("-")
        raw = os.path.join(data_dir, "raw", f"test.{direction}")
        srcs, refs = read_lines(f"{raw}.{src}"), read_lines(f"{raw}.{tgt}")
        by_id, _, spm_bleu, passes = decode_direction(translator, src, tgt, beam, lenpen)
        if sorted(by_id) != list(range(len(refs))):
            raise EvaluationError(
                f"{direction}: decoding returned {len(by_id)} translations for "
                f"{len(refs)} test lines ({raw}.{tgt}); no line may be lost"
            )
        hyps = [by_id[i] for i in range(len(refs))]
        with open(os.path.join(out_dir, f"hyp.{direction}.{tgt}"), "w", encoding="utf-8") as f:
            f.write("\n".join(hyps) + "\n")
        row = {"direction": direction, "lines": len(refs), **score(hyps, refs, srcs, spbleu_problem is None)}
        row["spm_bleu"] = spm_bleu
        row["rc_enc"] = passes.get("encoder", "")
        row["rc_dec"] = passes.get("decoder", "")
        rows.append(row)
        print(f"{direction}: chrF {row['chrf']:.1f} BLEU {row['bleu']:.1f} spm-BLEU {spm_bleu:.1f} "
              f"(copy chrF {row['copy_chrf']:.1f}; {len(hyps)} lines)", flush=True)
    print(f"evaluate: {len(directions)} directions decoded in {time.perf_counter() - started:.1f}s "
          f"(one model load)", flush=True)
    return rows, write_tables(rows, out_dir, [spbleu_problem] if spbleu_problem else [])


def add_decoding_args(p):
    """CHECKPOINT DATA_DIR OUT_DIR and the decoding options, shared with ``fairseq_smoe.dial``."""
    p.add_argument("checkpoint")
    p.add_argument("data_dir")
    p.add_argument("out_dir")
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--lenpen", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--cpu", action="store_true", default=None, help="decode on CPU (default: when no GPU)")


@errors.cli
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_decoding_args(p)
    p.add_argument("--flores200-spm", help="sacreBLEU's flores200 SentencePiece model, for spBLEU offline")
    p.add_argument("--smoe-max-passes", type=int, metavar="K",
                   help="compute dial: every token leaves each SMoE block after at most K strata passes "
                   "(default: no cap, the model as trained)")
    for flag in PATH_FLAGS:
        p.add_argument(f"--{flag.replace('_', '-')}", dest=flag, metavar="PATH",
                       help=f"where the file the model was trained with as --{flag.replace('_', '-')} is now, "
                       f"if it has moved (decoding always uses the training task's setting)")
    a = p.parse_args(argv)
    moved = {flag: getattr(a, flag) for flag in PATH_FLAGS if getattr(a, flag) is not None}
    _, table = evaluate(a.checkpoint, a.data_dir, a.out_dir, a.beam, a.lenpen, a.max_tokens, a.cpu,
                        a.flores200_spm, task_paths=moved, max_passes=a.smoe_max_passes)
    print(table)


if __name__ == "__main__":
    main()
