"""The compute dial of a trained SMoE model: quality against compute at every pass budget.

    python -m fairseq_smoe.dial CHECKPOINT DATA_DIR OUT_DIR [--beam 5 --lenpen 1.0 --max-tokens 4096 --cpu]

For K = 1 .. L (L: the model's strata), decodes every test direction of DATA_DIR with
``--smoe-max-passes K`` (the evaluator: every line, deterministic; ``OUT_DIR/K<k>/`` holds its
hypotheses and score tables) and reports, averaged over the directions: chrF, BLEU, the measured
strata passes per token per SMoE block (encoder and decoder, teacher forcing on the same test
set) and the forward FLOPs per token that those passes cost (``fairseq_smoe.cost``: Kaplan's
count with the measured passes). K = L is the model as trained. Writes ``dial.csv``,
``dial.md`` and ``dial.png`` (chrF against FLOPs per token).
"""

import argparse
import csv
from pathlib import Path

from . import errors


class DialError(errors.UserError, RuntimeError):
    """A checkpoint the dial cannot run on (no strata passes to cap)."""


def model_shape(checkpoint):
    """(cost Shape, strata count, MoE slots per side) of a checkpoint's model."""
    from .cost import shape_from_args, stock_model
    from .translator import read_checkpoint

    state = read_checkpoint(checkpoint)
    args = state["cfg"]["model"]
    stock = stock_model(args)
    if stock is not None:
        raise DialError(f"{checkpoint} is {stock}: it has no strata passes to dial (the dial needs an "
                        f"smoe_transformer checkpoint; python -m fairseq_smoe.evaluate scores a dense multilingual model)")
    vocab = state["model"]["decoder.embed_tokens.weight"].size(0)
    shape = shape_from_args(args, vocab)
    slots = {side: sum(1 for i in range(layers) if shape.moe_freq and (i + 1) % shape.moe_freq == 0)
             for side, layers in (("encoder", shape.enc_layers), ("decoder", shape.dec_layers))}
    return shape, len(shape.strata), slots


def dial(checkpoint, data_dir, out_dir, beam=5, lenpen=1.0, max_tokens=4096, cpu=None):
    from .cost import count
    from .evaluate import check_decoding_args, evaluate

    check_decoding_args(beam, max_tokens)
    shape, L, slots = model_shape(checkpoint)
    if shape.moe_freq <= 0:
        raise DialError(f"{checkpoint} is a dense smoe_transformer model (--moe-freq 0): it has no strata "
                        f"passes to dial")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for k in range(1, L + 1):
        scores, _ = evaluate(checkpoint, data_dir, out_dir / f"K{k}", beam=beam, lenpen=lenpen,
                             max_tokens=max_tokens, cpu=cpu, max_passes=k)
        mean = lambda key: sum(float(r[key]) for r in scores) / len(scores)  # noqa: E731
        enc, dec = mean("rc_enc"), mean("rc_dec")
        flops = count(shape, [enc] * slots["encoder"], [dec] * slots["decoder"])[1]
        rows.append({"k": k, "chrf": mean("chrf"), "bleu": mean("bleu"), "spm_bleu": mean("spm_bleu"),
                     "passes_enc": enc, "passes_dec": dec, "passes_per_token": (enc + dec) / 2,
                     "flops_per_token": flops, "directions": len(scores)})
        print(f"dial: K={k}: chrF {rows[-1]['chrf']:.2f}, passes enc {enc:.3f} dec {dec:.3f}, "
              f"{flops / 1e6:.2f}M FLOPs/token", flush=True)
    with open(out_dir / "dial.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = [f"# Compute dial of {checkpoint}", "",
             f"Mean over {rows[0]['directions']} directions (test set, beam {beam}); K = {L} is the model as trained.", "",
             "| K | chrF | BLEU | passes enc / dec | FLOPs/token |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['k']} | {r['chrf']:.2f} | {r['bleu']:.2f} | {r['passes_enc']:.3f} / "
                     f"{r['passes_dec']:.3f} | {r['flops_per_token'] / 1e6:.2f}M |")
    (out_dir / "dial.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    plot(rows, out_dir / "dial.png", str(checkpoint))
    return rows


def plot(rows, path, label):
    import logging

    import matplotlib

    matplotlib.use("Agg")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    xs = [r["flops_per_token"] / 1e6 for r in rows]
    ax.plot(xs, [r["chrf"] for r in rows], marker="o")
    for r, x in zip(rows, xs):
        ax.annotate(f"K={r['k']}", (x, r["chrf"]), textcoords="offset points", xytext=(4, -10))
    ax.set_xlabel("forward FLOPs per token (M, measured passes)")
    ax.set_ylabel("chrF (mean over directions)")
    ax.set_title("Compute dial: --smoe-max-passes K")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@errors.cli
def main(argv=None):
    from .evaluate import add_decoding_args

    p = argparse.ArgumentParser(prog="python -m fairseq_smoe.dial", description=__doc__.split("\n\n")[0])
    add_decoding_args(p)
    a = p.parse_args(argv)
    dial(a.checkpoint, a.data_dir, a.out_dir, a.beam, a.lenpen, a.max_tokens, a.cpu)


if __name__ == "__main__":
    main()
