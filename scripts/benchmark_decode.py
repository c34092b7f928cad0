#!/usr/bin/env python
"""Where decoding time goes: SMoE against dense, with fairseq-generate's own decoding loop.

    python scripts/benchmark_decode.py DATA_DIR NAME=CHECKPOINT [NAME=CHECKPOINT ...]
        [--beam 5] [--directions eng-deu,deu-eng] [--rounds 2] [--threads 1] [--fixed-length N] [--json]

Every model decodes the test set of every direction (the evaluator's decoding: beam search,
fairseq-generate's batching, fixed seed), the models alternating direction by direction and round
by round so machine noise hits them alike. Reported per model: sentences per second (median over
rounds of the summed time) and its ratio to the first model, and the share of decoding time spent
in each part, measured with forward hooks (wall clock, CPU: no device sync needed):
``encoder`` (the whole encoder), ``self_attn`` / ``cross_attn`` (the decoder layers' attention),
``ffn`` (the decoder layers' FFN: an SMoE slot or a dense FFN, LayerNorm included),
``output`` (the output projection), ``other`` (everything else: beam search, the rest of the
decoder layers, incremental-state reordering). Also the mean number of tokens per decoder step
(beam x sentences still decoding): the small per-step batches of incremental decoding, where an
SMoE block's fixed per-pass costs weigh most.
"""

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from fairseq_smoe import errors  # noqa: E402

PARTS = ("encoder", "self_attn", "cross_attn", "ffn", "output")


class Timer:
    """Accumulates wall time per part from forward pre/post hooks (nested parts are not
    double-counted: ``other`` is the total minus the parts)."""

    def __init__(self):
        self.total = defaultdict(float)
        self.steps = self.step_tokens = 0
        self._start = {}

    def hook(self, module, part):
        def pre(_m, args):
            self._start[id(module)] = time.perf_counter()
            if part == "output":
                x = args[0]
                self.steps += 1
                self.step_tokens += x.shape[0] * x.shape[1] if x.dim() == 3 else x.shape[0]

        def post(_m, _args, _out):
            self.total[part] += time.perf_counter() - self._start.pop(id(module))

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    def wrap(self, module, part):
        """Time ``module.forward`` itself: for modules fairseq calls as ``module.forward(...)``
        rather than ``module(...)`` (the encoder, through ``forward_torchscript``), which
        forward hooks never see."""
        forward = module.forward

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return forward(*args, **kwargs)
            finally:
                self.total[part] += time.perf_counter() - t0

        module.forward = timed


def instrument(model, timer):
    timer.wrap(model.encoder, "encoder")
    for layer in model.decoder.layers:
        timer.hook(layer.self_attn, "self_attn")
        if layer.encoder_attn is not None:
            timer.hook(layer.encoder_attn, "cross_attn")
        if hasattr(layer, "moe"):
            timer.hook(layer.moe, "ffn")
        else:  # dense: its FFN is fc1, fc2 and their LayerNorm
            for m in (layer.final_layer_norm, layer.fc1, layer.fc2):
                timer.hook(m, "ffn")
    timer.hook(model.decoder.output_projection, "output")


@errors.cli
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data_dir")
    p.add_argument("models", nargs="+", metavar="NAME=CHECKPOINT")
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--directions", default=None, help="comma-separated (default: every direction)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--fixed-length", type=int, default=None, metavar="N",
                   help="make every hypothesis exactly N tokens (min = max length), so that models "
                   "whose translations differ in length decode the same number of steps")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)

    import torch

    torch.set_num_threads(a.threads)
    import fairseq_smoe.translator as translator_module
    from fairseq_smoe.evaluate import read_lines, task_args
    from fairseq_smoe.translator import SEED, SMoETranslator, seeded

    if a.fixed_length:
        plain = translator_module._generation_config

        def fixed(beam, lenpen):
            gen = plain(beam, lenpen)
            gen.min_len, gen.max_len_a, gen.max_len_b = a.fixed_length, 0, a.fixed_length
            return gen

        translator_module._generation_config = fixed

    def decode(tr, src, tgt):
        """Every test sentence of src->tgt as the evaluator decodes it (no teacher-forced pass)."""
        task = tr.task(src, tgt)
        if "test" not in task.datasets:
            task.load_dataset("test")
        with seeded(SEED, tr.device), torch.no_grad():
            return sum(1 for _ in tr.decode(task, tr.batches(task, task.dataset("test")), a.beam, 1.0))

    models = [m.split("=", 1) for m in a.models]
    directions = (a.directions.split(",") if a.directions else
                  [d for d in read_lines(os.path.join(a.data_dir, "lang_pairs.txt"))[0].split(",") if d])
    translators, timers = {}, {}
    for name, ckpt in models:
        translators[name] = SMoETranslator(ckpt, a.data_dir, device="cpu", state=task_args(ckpt))
        timers[name] = Timer()
        instrument(translators[name].model, timers[name])
    seconds = {name: [] for name, _ in models}
    sentences = {name: 0 for name, _ in models}
    for r in range(a.rounds):
        per_round = defaultdict(float)
        for i, direction in enumerate(directions):
            src, tgt = direction.split("-")
            order = models if (i + r) % 2 == 0 else models[::-1]
            for name, _ in order:
                t0 = time.perf_counter()
                n = decode(translators[name], src, tgt)
                per_round[name] += time.perf_counter() - t0
                if r == 0:
                    sentences[name] += n
        for name in per_round:
            seconds[name].append(per_round[name])
    first = models[0][0]
    rows = []
    for name, _ in models:
        t = timers[name]
        total = sum(seconds[name])
        parts = {k: t.total[k] / total for k in PARTS}
        parts["other"] = 1.0 - sum(parts.values())
        sps = sentences[name] / statistics.median(seconds[name])
        rows.append({"model": name, "sentences": sentences[name], "sent_per_s": round(sps, 2),
                     "tokens_per_step": round(t.step_tokens / max(t.steps, 1), 1),
                     **{f"share_{k}": round(v, 3) for k, v in parts.items()}})
    base = rows[0]["sent_per_s"]
    for r in rows:
        r[f"sent_per_s_over_{first}"] = round(r["sent_per_s"] / base, 3)
    if a.json:
        print(json.dumps(rows, indent=1))
        return
    head = ["model", "sent/s", f"vs {first}", "tokens/step"] + [f"{k} %" for k in (*PARTS, "other")]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        cells = [r["model"], f"{r['sent_per_s']:.1f}", f"{r[f'sent_per_s_over_{first}']:.2f}", f"{r['tokens_per_step']:.0f}"]
        cells += [f"{100 * r[f'share_{k}']:.0f}" for k in (*PARTS, "other")]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
