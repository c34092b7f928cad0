#!/usr/bin/env python
"""The GPU check (issue 25): one command that proves or disproves the CUDA, fp16/bf16 and NCCL
paths of the plugin in minutes, and on a machine without CUDA runs what emulates on CPU.

    scripts/gpu_check.sh [--out DIR] [--cpu-only] [--only CHECK,...] [--updates N] [--list]
    make gpu-check [GPU_CHECK_ARGS="--out DIR"]

Checks, each in processes of its own with a time limit (on CUDA all of them together within
``--budget``, default 480 s), one line each as it finishes, then a summary; the same goes to
``DIR/gpu_check.json`` (default ``runs/gpu_check``; rewritten after every check) and every
check's output to ``DIR/<check>.log``:

* ``train:<precision>``: ``--updates`` (30) updates of ``fairseq-train`` on the committed Bible
  fixture (en-de and de-en, ``smoe_transformer_tiny``, strata 2,2, dropout 0, the argmax second
  expert) with each precision: fp32, ``--fp16``, ``--memory-efficient-fp16``, ``--amp``, the bf16
  path (``--bf16-flags``, set by gpu_check.sh) and ``--fp16 --checkpoint-activations``, run side by
  side on the one GPU. Each passes with every update logged, every loss finite, no step skipped
  for an overflow after update ``FEW_UPDATES`` (fairseq's "gradient overflow detected" / "AMP:
  overflow detected" lines, counted and placed), and its losses close to fp32's:
  ``FIRST_REL`` at the first update (same batch, same initial weights: only rounding differs;
  checked when no step was skipped before it) and ``LAST_REL`` for the mean of the last ten, but
  not identical to fp32's at every update (a flag that silently trains in fp32 fails).
* ``cuda-tests``: ``pytest -m cuda tests`` (tests/test_cuda.py, tests/test_cuda_kernels.py: the
  grouped kernel against the loop and float64, block forward and backward per dtype, host reads
  under ``torch.cuda.set_sync_debug_mode``, generation bit for bit, ``SMoETranslator`` on cuda).
* ``expert-parallel``: with 2 or more GPUs, 2 ranks over NCCL with ``--moe-expert-parallel``
  against one process with ``--update-freq 2`` (the same batches), every logged statistic of
  every update; with one GPU skipped, and said so.
* ``benchmark``: ``scripts/benchmark_layer.py --device cuda --dtypes fp32,bf16`` (ours / floor /
  experts / passes / one-hot, the first four configurations at 4096 tokens) as a table, also in
  ``DIR/benchmark.md``.

Without CUDA (or with ``--cpu-only``): ``train:fp32`` and ``train:bf16`` (the plugin's bf16
path is torch.autocast, which runs on CPU too) train on CPU, ``expert-parallel`` over gloo
(2 CPU processes), ``benchmark`` as a CPU smoke run (64 tokens, m4-4-4), ``cuda-tests`` runs
pytest to show that every CUDA test is collected and skips; everything that needs CUDA is
reported skipped with the reason. Exit status 1 if any check failed, else 0.
"""

import argparse
import json
import math
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fairseq_smoe import errors  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "bible"
PLUGIN = str(ROOT / "fairseq_smoe")

UPDATES = 30
FEW_UPDATES = 5  # overflow skips are allowed while the loss scale settles, up to this update
FIRST_REL = 0.02  # |loss - fp32's| / fp32's at update 1 (bf16's unit roundoff is 2^-8 = 0.4%)
LAST_REL = 0.03  # the same for the mean loss of the last ten updates (fp32 on CPU, seeds 1 and 2:
# 13.04 / 12.79 at update 1, 9.37 / 9.28 over updates 21-30: a seed moves them 2% and 1%)
EP_UPDATES = 4
EP_LOGGED = ("loss", "nll_loss", "moe_gate_loss", "rc_enc", "rc_dec", "dropped", "gnorm")
# 2 ranks vs 1 process, per logged value (printed with 3-4 decimals): on CPU as
# tests/test_expert_parallel_train.py; on CUDA looser, as index_add's float atomics make each
# run nondeterministic in its last bits
EP_TOL = {"cpu": (2e-3, 1e-4), "cuda": (5e-3, 1e-3)}  # (abs, rel)

PRECISIONS = {  # name: flags (the bf16 entry comes from --bf16-flags)
    "fp32": [],
    "fp16": ["--fp16"],
    "memory-efficient-fp16": ["--memory-efficient-fp16"],
    "amp": ["--amp"],
    "bf16": None,
    "fp16+checkpoint-activations": ["--fp16", "--checkpoint-activations"],
}
# what trains on CPU too: the plugin's bf16 path (--smoe-bf16) is torch.autocast, CPU or CUDA
CPU_PRECISIONS = ("fp32", "bf16")
CHECKS = [f"train:{p}" for p in PRECISIONS] + ["cuda-tests", "expert-parallel", "benchmark"]
LIMITS = {"train": 150, "cuda-tests": 300, "expert-parallel": 240, "benchmark": 240, "prepare": 120}
OVERFLOW = re.compile(r"gradient overflow detected|AMP: overflow detected|AMP: skipping this batch")

TRAIN_FLAGS = [
    "--user-dir", PLUGIN, "--task", "smoe_translation", "--lang-pairs", "en-de,de-en", "--langs", "de,en",
    "--encoder-langtok", "tgt", "--decoder-langtok",
    "--arch", "smoe_transformer_tiny", "--moe-expert-count", "4", "--smoe-strata", "2,2",
    "--criterion", "smoe_label_smoothed_cross_entropy", "--label-smoothing", "0.1", "--share-all-embeddings",
    "--dropout", "0", "--moe-second-expert-policy", "all", "--optimizer", "adam", "--seed", "1",
    "--num-workers", "0", "--log-format", "json", "--log-interval", "1", "--disable-validation", "--no-save",
]


# ----------------------------------------------------------------------------- processes


class Proc:
    """A command started in a session of its own (so that a time limit ends all its processes),
    its output to ``log``."""

    def __init__(self, cmd, log: Path, env=None, stdout: Path = None):
        self.cmd, self.log = [str(c) for c in cmd], log
        log.parent.mkdir(parents=True, exist_ok=True)
        self._out = open(log, "w")
        self._out.write("$ " + " ".join(self.cmd) + "\n")
        self._out.flush()
        self._stdout = open(stdout, "w") if stdout is not None else None
        self.start = time.time()
        self.popen = subprocess.Popen(self.cmd, stdout=self._stdout or self._out, stderr=subprocess.STDOUT if
                                      self._stdout is None else self._out, cwd=ROOT, env=env,
                                      start_new_session=True)

    def wait(self, limit: float):
        """(exit status or None if it ran past ``limit`` seconds from its start, its output)."""
        try:
            rc = self.popen.wait(timeout=max(0.0, self.start + limit - time.time()))
        except subprocess.TimeoutExpired:
            rc = None
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(self.popen.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.popen.wait(timeout=10)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self._out.close()
        if self._stdout is not None:
            self._stdout.close()
        return rc, self.log.read_text(errors="replace")


def tail(text: str, lines: int = 3) -> str:
    """The last non-empty lines of ``text``, joined (a failure's reason)."""
    kept = [l.strip() for l in text.splitlines() if l.strip()]
    return " / ".join(kept[-lines:])[-600:]


def ended(rc, out, limit):
    """A failure reason for a process that did not exit 0, else None."""
    if rc is None:
        return f"ran past its time limit of {limit:.0f} s"
    if rc != 0:
        return f"exit status {rc}: {tail(out)}"
    return None


# ----------------------------------------------------------------------------- logs


def json_logs(output: str, tag: str = "train_inner"):
    return [json.loads(m) for m in re.findall(rf"\| {tag} \| (\{{.*\}})", output)]


def overflow_updates(output: str):
    """For every overflow line of fairseq's (a step skipped, or under --amp retried at a lower
    scale), the number of updates logged before it."""
    done, found = 0, []
    for line in output.splitlines():
        if re.search(r"\| train_inner \| \{", line):
            done += 1
        elif OVERFLOW.search(line):
            found.append(done)
    return found


def judge_training(output: str, updates: int, reference=None):
    """(failure reason or None, details) for a training run's output; ``reference``: fp32's
    losses by update, for the closeness checks."""
    logs = json_logs(output)
    losses = {int(r["num_updates"]): float(r["loss"]) for r in logs}
    skips = overflow_updates(output)
    details = {"losses": [losses.get(u) for u in range(1, updates + 1)], "overflows": len(skips),
               "overflow_after_updates": skips}
    if sorted(losses) != list(range(1, updates + 1)):
        return f"logged updates {sorted(losses)[:3]}...{sorted(losses)[-3:]} instead of 1..{updates}", details
    bad = [u for u, l in losses.items() if not math.isfinite(l)]
    if bad:
        return f"loss not finite at update(s) {bad[:5]}", details
    late = [u for u in skips if u >= FEW_UPDATES]
    if late:
        return (f"{len(late)} step(s) skipped for overflow after update {FEW_UPDATES} "
                f"(after updates {late[:5]}); {len(skips)} in all"), details
    if reference is None:
        return None, details
    if sorted(reference) != sorted(losses):
        return "no fp32 reference to compare with (train:fp32 did not complete)", details
    if losses == reference:  # reduced precision moves the printed losses within a few updates
        return f"losses identical to fp32's at all {updates} updates: the precision flag changed nothing", details
    window = list(range(max(1, updates - 9), updates + 1))
    last, last_ref = (sum(d[u] for u in window) / len(window) for d in (losses, reference))
    details["last10_mean"], details["fp32_last10_mean"] = round(last, 4), round(last_ref, 4)
    details["last10_rel"] = round(abs(last - last_ref) / abs(last_ref), 5)
    if details["last10_rel"] > LAST_REL:
        return (f"mean loss of updates {window[0]}-{window[-1]} {last:.3f}, fp32's {last_ref:.3f}: "
                f"{100 * details['last10_rel']:.1f}% apart (tolerance {100 * LAST_REL:.0f}%)"), details
    if not skips or skips[0] >= 1:  # update 1 saw fp32's batch and weights
        rel = abs(losses[1] - reference[1]) / abs(reference[1])
        details["first_rel"] = round(rel, 5)
        if rel > FIRST_REL:
            return (f"loss at update 1 {losses[1]:.3f}, fp32's {reference[1]:.3f}: {100 * rel:.1f}% apart "
                    f"(tolerance {100 * FIRST_REL:.0f}%)"), details
    return None, details


def compare_ep(one: str, two: str, device: str, updates: int):
    """(failure reason or None, details): the logged statistics of 2 expert-parallel ranks
    against one process with --update-freq 2, update by update."""
    la, lb = json_logs(one), json_logs(two)
    ua, ub = [int(r["num_updates"]) for r in la], [int(r["num_updates"]) for r in lb]
    details = {"updates_one": ua, "updates_two": ub}
    if ua != list(range(1, updates + 1)) or ub != ua:
        return f"updates logged: one process {ua}, 2 ranks {ub}; expected 1..{updates} in both", details
    atol, rtol = EP_TOL[device]
    worst = 0.0
    for ra, rb in zip(la, lb):
        for key in EP_LOGGED:
            a, b = float(ra[key]), float(rb[key])
            if not abs(a - b) <= atol + rtol * abs(a):
                return (f"update {ra['num_updates']}: {key} {b} on 2 ranks, {a} in one process "
                        f"(tolerance {atol} + {rtol} x value)"), details
            worst = max(worst, abs(a - b))
    details["max_abs_diff"] = worst
    return None, details


def junit_counts(path: Path):
    """(passed, failed, skipped, skip reasons) of a pytest --junitxml report."""
    root = ET.parse(path).getroot()
    passed = failed = skipped = 0
    reasons = []
    for case in root.iter("testcase"):
        kinds = {child.tag: child for child in case}
        if "failure" in kinds or "error" in kinds:
            failed += 1
        elif "skipped" in kinds:
            skipped += 1
            reasons.append(kinds["skipped"].get("message", ""))
        else:
            passed += 1
    return passed, failed, skipped, reasons


# ----------------------------------------------------------------------------- the checks


class Session:
    def __init__(self, args):
        import torch

        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.cuda = torch.cuda.is_available() and not args.cpu_only
        self.device = "cuda" if self.cuda else "cpu"
        self.gpus = torch.cuda.device_count() if self.cuda else 0
        self.capability = tuple(torch.cuda.get_device_capability(0)) if self.cuda else None
        self.start = time.time()
        self.results = []
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        self.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{self.env.get('PATH', '')}"
        if not self.cuda:
            self.env["CUDA_VISIBLE_DEVICES"] = ""  # --cpu-only on a GPU machine: as if it had none
        elif "OMP_NUM_THREADS" not in os.environ:
            self.env["OMP_NUM_THREADS"] = "2"  # the training runs share the CPUs
        gpu = [{"name": torch.cuda.get_device_name(i), "capability": list(torch.cuda.get_device_capability(i))}
               for i in range(self.gpus)]
        self.machine = {
            "device": self.device, "cuda_available": torch.cuda.is_available(), "cpu_only": args.cpu_only,
            "gpus": gpu, "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "torch_hip": getattr(torch.version, "hip", None), "python": platform.python_version(),
            "host": platform.node(), "fairseq": _version("fairseq") or _version("ve-fairseq"),
        }
        self.data = None

    # -- bookkeeping

    def limit(self, kind):
        """The time limit of a check of ``kind``: its own, within what is left of --budget (CUDA)."""
        own = LIMITS[kind] * self.args.limit_scale
        if not self.cuda or not self.args.budget:
            return own
        return max(1.0, min(own, self.start + self.args.budget - time.time()))

    def record(self, name, status, reason="", seconds=0.0, emulated=False, **details):
        r = {"name": name, "status": status, "reason": reason, "seconds": round(seconds, 1),
             "device": None if status == "skipped" else self.device, "emulated": emulated,
             "details": details}
        self.results.append(r)
        tag = {"passed": "PASS", "failed": "FAIL", "skipped": "SKIP"}[status]
        print(f"[{tag}] {name:34s} {seconds:6.1f} s  {reason}", flush=True)
        self.write()
        return r

    def write(self, done=False):
        counts = {s: sum(r["status"] == s for r in self.results) for s in ("passed", "failed", "skipped")}
        report = {"machine": self.machine, "checks": self.results, "summary": counts,
                  "wall_s": round(time.time() - self.start, 1), "complete": done,
                  "exit_status": int(counts["failed"] > 0)}
        tmp = self.out / "gpu_check.json.tmp"
        tmp.write_text(json.dumps(report, indent=1) + "\n")
        tmp.replace(self.out / "gpu_check.json")
        return report

    def wanted(self, name):
        only = self.args.only
        return not only or any(name == o or name.startswith(o.rstrip("*")) and o.endswith("*") for o in only)

    def log(self, name):
        return self.out / (re.sub(r"[^A-Za-z0-9_.-]", "_", name) + ".log")

    # -- data

    def prepare(self):
        """The fixture's en-de pair binarized with a joined dictionary (both directions train)."""
        if self.data is not None:
            return self.data
        dest = self.out / "data-bin"
        if not (dest / "train.en-de.en.bin").exists():
            proc = Proc([sys.executable, "-m", "fairseq_cli.preprocess", "--source-lang", "en", "--target-lang", "de",
                         "--trainpref", FIXTURE / "train.en-de", "--validpref", FIXTURE / "valid.en-de",
                         "--testpref", FIXTURE / "test.en-de", "--destdir", dest, "--joined-dictionary",
                         "--workers", "1"], self.out / "prepare.log", self.env)
            rc, out = proc.wait(self.limit("prepare"))
            reason = ended(rc, out, LIMITS["prepare"])
            if reason:
                self.data = RuntimeError(f"binarizing the fixture failed ({reason}); see {self.out / 'prepare.log'}")
                return self.data
        self.data = dest
        return dest

    def device_flags(self):
        return ["--distributed-world-size", "1"] if self.cuda else ["--cpu"]

    # -- training with each precision

    def train_all(self):
        names = [p for p in PRECISIONS if self.wanted(f"train:{p}")]
        if not names:
            return
        runnable = list(names) if self.cuda else [p for p in names if p in CPU_PRECISIONS]
        for p in names:
            if p not in runnable:
                self.record(f"train:{p}", "skipped", "no CUDA: this precision trains on a GPU only (what each "
                            "precision flag does on CPU: docs/gpu.md)")
            elif p == "bf16" and not self.args.bf16_flags:
                runnable.remove(p)
                self.record("train:bf16", "failed", "no bf16 flag given (BF16_FLAGS in scripts/gpu_check.sh)")
            elif p == "bf16" and self.cuda and self.capability < (8, 0):
                runnable.remove(p)
                self.record("train:bf16", "skipped", f"GPU of compute capability {self.capability[0]}."
                            f"{self.capability[1]}: bf16 needs 8.0+ (the plugin refuses it there)")
        if not runnable:
            return
        data = self.prepare()
        if isinstance(data, Exception):
            for p in runnable:
                self.record(f"train:{p}", "failed", str(data))
            return
        updates = self.args.updates
        procs = {}
        batches = [runnable] if self.cuda and self.args.parallel else [[p] for p in runnable]
        outs = {}
        for batch in batches:
            for p in batch:
                flags = self.args.bf16_flags.split() if p == "bf16" else PRECISIONS[p]
                cmd = [sys.executable, "-m", "fairseq_cli.train", data, *TRAIN_FLAGS, "--lr", "3e-3",
                       "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "10", "--max-tokens", "2048",
                       "--max-update", updates, *self.device_flags(), *flags]
                procs[p] = Proc(cmd, self.log(f"train:{p}"), self.env)
            limit = self.limit("train")
            for p in batch:
                outs[p] = procs[p].wait(limit) + (limit, time.time() - procs[p].start)
        reference = {}  # fp32's losses by update: empty if it did not complete
        if "fp32" in outs and outs["fp32"][0] == 0:
            reference = {int(r["num_updates"]): float(r["loss"]) for r in json_logs(outs["fp32"][1])}
        for p in runnable:
            rc, out, limit, seconds = outs[p]
            reason = ended(rc, out, limit)
            details = {}
            if reason is None and (p == "fp32" or "fp32" not in outs):
                reason, details = judge_training(out, updates)
                if p != "fp32":
                    details["note"] = "train:fp32 not run (--only): closeness to it not checked"
            elif reason is None:
                reason, details = judge_training(out, updates, reference)
            flags = self.args.bf16_flags.split() if p == "bf16" else PRECISIONS[p]
            losses = [l for l in details.get("losses", []) if l is not None]
            summary = (f"{len(losses)} updates, loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
                       f"{details.get('overflows', 0)} overflow skip(s)") if losses else ""
            if "last10_rel" in details:
                summary += f", last-10 mean {100 * details['last10_rel']:.2f}% from fp32's"
            self.record(f"train:{p}", "failed" if reason else "passed", reason or summary, seconds,
                        emulated=not self.cuda, flags=flags, log=str(self.log(f"train:{p}")), **details)

    # -- pytest -m cuda

    def cuda_tests(self):
        name = "cuda-tests"
        if not self.wanted(name):
            return
        xml = self.out / "cuda-tests.xml"
        if xml.exists():
            xml.unlink()
        cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider",
               f"--junitxml={xml}", *(self.args.cuda_tests or ["tests"])]
        proc = Proc(cmd, self.log(name), self.env)
        limit = self.limit("cuda-tests")
        rc, out = proc.wait(limit)
        seconds = time.time() - proc.start
        if rc is None:
            return self.record(name, "failed", f"ran past its time limit of {limit:.0f} s", seconds)
        if rc == 5 or not xml.exists():
            return self.record(name, "failed", f"no test marked cuda was collected (pytest status {rc}): "
                               f"{tail(out, 2)}", seconds)
        passed, failed, skipped, reasons = junit_counts(xml)
        details = {"passed": passed, "failed": failed, "skipped": skipped,
                   "skip_reasons": sorted(set(reasons)), "log": str(self.log(name))}
        counts = f"{passed} passed, {failed} failed, {skipped} skipped"
        if failed or rc not in (0, 5):
            failing = re.findall(r"^(?:FAILED|ERROR) (\S+)", out, re.M)
            return self.record(name, "failed", f"{counts}: {', '.join(failing[:6]) or tail(out)}", seconds, **details)
        if not self.cuda:
            why = "; ".join(sorted(set(reasons)))[:300]
            return self.record(name, "skipped", f"no CUDA: all {skipped} tests marked cuda collected and "
                               f"skipped ({why})", seconds, **details)
        if passed == 0:
            return self.record(name, "failed", f"{counts}: none ran on this GPU", seconds, **details)
        return self.record(name, "passed", counts + (f" ({'; '.join(sorted(set(reasons)))[:200]})" if skipped else ""),
                           seconds, **details)

    # -- expert parallelism: 2 ranks against one process

    def expert_parallel(self):
        name = "expert-parallel"
        if not self.wanted(name):
            return
        if self.cuda and self.gpus < 2:
            return self.record(name, "skipped", f"{self.gpus} GPU: expert parallelism over NCCL needs 2 or more "
                               "(over gloo it runs in --cpu-only and tests/test_expert_parallel_train.py)")
        data = self.prepare()
        if isinstance(data, Exception):
            return self.record(name, "failed", str(data))
        updates = self.args.ep_updates
        common = [sys.executable, "-m", "fairseq_cli.train", data, *TRAIN_FLAGS, "--moe-expert-parallel",
                  "--lr", "1e-3", "--max-tokens", "512", "--max-update", updates]
        t0 = time.time()
        limit = self.limit("expert-parallel")
        one = Proc([*common, "--update-freq", "2", *self.device_flags()], self.out / "expert-parallel.one.log",
                   self.env)
        if self.cuda:  # fairseq spawns one process per GPU, NCCL
            two = [Proc([*common, "--distributed-world-size", "2", "--ddp-backend", "legacy_ddp"],
                        self.out / "expert-parallel.two.log", self.env)]
        else:  # two CPU processes over gloo, started here (environment.md §8)
            port = _free_port()
            two = [Proc([*common, "--cpu", "--distributed-backend", "gloo", "--distributed-world-size", "2",
                         "--ddp-backend", "legacy_ddp", "--distributed-rank", r, "--distributed-no-spawn",
                         "--distributed-init-method", f"tcp://127.0.0.1:{port}"],
                        self.out / f"expert-parallel.rank{r}.log", self.env) for r in (0, 1)]
        results = [p.wait(limit) for p in [one, *two]]
        seconds = time.time() - t0
        for (rc, out), label in zip(results, ["one process", *[f"rank {i}" for i in range(len(two))]]):
            reason = ended(rc, out, limit)
            if reason:
                return self.record(name, "failed", f"{label}: {reason}", seconds, emulated=not self.cuda)
        one_out, two_out = results[0][1], results[1][1]
        if "local_experts=(0, 2)" not in two_out:
            return self.record(name, "failed", "the 2-rank run did not split the experts (no local_experts=(0, 2) "
                               "in its model)", seconds, emulated=not self.cuda)
        reason, details = compare_ep(one_out, two_out, self.device, updates)
        backend = "NCCL, 2 GPUs" if self.cuda else "gloo, 2 CPU processes"
        return self.record(name, "failed" if reason else "passed",
                           reason or f"{backend}: {updates} updates equal to one process with --update-freq 2 "
                           f"(largest difference {details['max_abs_diff']:.2g})", seconds,
                           emulated=not self.cuda, **details)

    # -- the layer benchmark

    def benchmark(self):
        name = "benchmark"
        if not self.wanted(name):
            return
        if self.cuda:
            size = ["--device", "cuda", "--dtypes", "fp32,bf16"]
        else:
            size = ["--device", "cpu", "--dtypes", "fp32,bf16", "--quick", "--tokens", "64", "--configs", "m4-4-4"]
        size += self.args.benchmark_args
        json_out = self.out / "benchmark.json"
        cmd = [sys.executable, ROOT / "scripts" / "benchmark_layer.py", "--json", *size]
        proc = Proc(cmd, self.log(name), self.env, stdout=json_out)
        limit = self.limit("benchmark")
        rc, out = proc.wait(limit)
        seconds = time.time() - proc.start
        reason = ended(rc, out, limit)
        if reason:
            return self.record(name, "failed", reason, seconds, emulated=not self.cuda)
        sys.path.insert(0, str(ROOT / "scripts"))
        import benchmark_layer

        rows = json.loads(json_out.read_text())
        table = benchmark_layer.table(rows)
        (self.out / "benchmark.md").write_text(table + "\n")
        print(table, flush=True)
        bad = [r["config"] for r in rows if not r["ours_ms"] > 0 or not r["floor_ms"] > 0]
        if bad or not rows:
            return self.record(name, "failed", f"no timing for {bad or 'any case'}", seconds, rows=rows)
        note = "" if self.cuda else "no CUDA: a CPU smoke run at 64 tokens, not a GPU measurement; "
        return self.record(name, "passed", f"{note}{len(rows)} rows, table in {self.out / 'benchmark.md'}",
                           seconds, emulated=not self.cuda, rows=rows)


def _version(dist):
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@errors.cli
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "runs" / "gpu_check"), help="where gpu_check.json and the logs go")
    p.add_argument("--cpu-only", action="store_true", help="as if there were no CUDA: the CPU part (CI)")
    p.add_argument("--only", default="", help="comma-separated checks to run (a trailing * matches a prefix: "
                   "train:*); the others are left out of the report")
    p.add_argument("--list", action="store_true", help="print the checks and exit")
    p.add_argument("--updates", type=int, default=UPDATES, help=f"updates per precision (default {UPDATES})")
    p.add_argument("--ep-updates", type=int, default=EP_UPDATES, help=f"expert-parallel updates (default {EP_UPDATES})")
    p.add_argument("--bf16-flags", default="", help="the fairseq-train flag(s) of the bf16 path (gpu_check.sh "
                   "sets them); give as --bf16-flags=--flag")
    p.add_argument("--budget", type=float, default=480.0, help="on CUDA, seconds for all the checks (default 480)")
    p.add_argument("--limit-scale", type=float, default=1.0, help="multiply every check's time limit (slow machines)")
    p.add_argument("--no-parallel", dest="parallel", action="store_false",
                   help="on CUDA, run the precisions one after the other (default: side by side)")
    p.add_argument("--cuda-tests", nargs="*", default=None, help="test paths for pytest -m cuda (default tests)")
    p.add_argument("--benchmark-args", nargs=argparse.REMAINDER, default=[],
                   help="extra arguments for benchmark_layer.py (last on the line)")
    args = p.parse_args(argv)
    args.only = [o for o in args.only.split(",") if o]
    if args.list:
        print("\n".join(CHECKS))
        return 0
    unknown = [o for o in args.only if o not in CHECKS and not (o.endswith("*") and
                                                                any(c.startswith(o[:-1]) for c in CHECKS))]
    if unknown:
        p.error(f"--only: unknown check(s) {', '.join(unknown)}; choose from {', '.join(CHECKS)}")
    if args.updates < 10:
        p.error(f"--updates {args.updates}: at least 10 (the closeness check averages the last ten)")
    s = Session(args)
    m = s.machine
    gpus = ", ".join(f"{g['name']} (sm {g['capability'][0]}.{g['capability'][1]})" for g in m["gpus"]) or "none"
    print(f"# gpu-check: torch {m['torch']} (CUDA {m['torch_cuda']}), fairseq {m['fairseq']}, device {s.device}, "
          f"GPUs: {gpus}{' (--cpu-only)' if args.cpu_only else ''}; output in {s.out}", flush=True)
    for check, names in ((s.train_all, [c for c in CHECKS if c.startswith("train:")]), (s.cuda_tests, ["cuda-tests"]),
                         (s.expert_parallel, ["expert-parallel"]), (s.benchmark, ["benchmark"])):
        try:
            check()
        except Exception as err:  # a bug of this driver: say so for the checks it left, go on
            done = {r["name"] for r in s.results}
            for name in names:
                if s.wanted(name) and name not in done:
                    s.record(name, "failed", f"gpu_check.py raised {type(err).__name__}: {err}")
    report = s.write(done=True)
    c = report["summary"]
    print(f"# gpu-check summary: {c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped in "
          f"{report['wall_s']:.0f} s on {s.device}{'' if s.cuda else ' (no CUDA: the CPU part)'}; "
          f"{s.out / 'gpu_check.json'}", flush=True)
    for r in s.results:
        if r["status"] != "passed":
            print(f"#   {r['status']:7s} {r['name']}: {r['reason']}", flush=True)
    return report["exit_status"]


if __name__ == "__main__":
    sys.exit(main())
