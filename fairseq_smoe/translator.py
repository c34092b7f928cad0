"""Translate with an SMoE checkpoint from Python; the decoding core the evaluator uses too.

    from fairseq_smoe import SMoETranslator

    tr = SMoETranslator("runs/demo/checkpoints/checkpoint_best.pt", "runs/demo/bible")
    tr.translate(["In the beginning was the Word."], "eng", "deu", beam=5)
    tr.route("In the beginning was the Word.", "eng", "deu")   # passes and experts per token

One checkpoint is read and its model built once; every direction then gets its own fairseq task
(``source_lang``/``target_lang`` set), built from the **training** task's own configuration as
saved in the checkpoint: languages (``--langs`` or ``--lang-dict``, whose order fixes the
language-token ids), ``--lang-tok-style``, ``--encoder-langtok``/``--decoder-langtok``,
``--langtoks``/``--langtoks-specs``, ``--lang-tok-replacing-bos-eos``, dictionaries
(``--fixed-dictionary``, ``--source-dict``/``--target-dict``), padding sides and maximum
positions. Only the data directory (for the dictionaries and, in the evaluator, the test sets)
and the direction are replaced, so a model decodes with exactly the tokens it was trained on.

Decoding is the loop of stock ``fairseq-generate`` (same generator from the task, same
``inference_step``, same batching: ``--max-tokens``, ``--required-batch-size-multiple 8``,
``--seed 1``, same post-processing and ``--bpe sentencepiece`` detokenization), so for the
same checkpoint, beam and length penalty it returns the hypotheses fairseq-generate prints as
``D-`` lines; ``tests/test_translator.py`` checks that against a real ``fairseq-generate``.
"""

import argparse
import copy
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import data_checks
from .errors import UserError

MULTILINGUAL_TASKS = ("smoe_translation", "translation_multi_simple_epoch")
# training-task flags that name files; they are read again when a decoding task is built
PATH_FLAGS = ("lang_dict", "fixed_dictionary", "source_dict", "target_dict")
# what fairseq-generate uses unless told otherwise (the evaluator and the API use the same)
REQUIRED_BATCH_SIZE_MULTIPLE = 8
SEED = 1


class TranslatorError(UserError, RuntimeError):
    """A checkpoint, data directory or input that cannot be decoded; the message says why and
    what to do."""


# ----------------------------------------------------------------------------- checkpoint


def read_checkpoint(path) -> dict:
    """The checkpoint's state as fairseq's own loader returns it (upgraded, cfg as OmegaConf);
    an unreadable file raises one clear error (``fairseq_smoe.checkpoint_io``)."""
    from .checkpoint_io import CheckpointError, read_checkpoint as read_raw

    try:
        return upgrade_state(read_raw(path))
    except CheckpointError as err:
        raise TranslatorError(str(err)) from err


def upgrade_state(state: dict) -> dict:
    """A state read with plain ``torch.load`` brought to what fairseq's
    ``load_checkpoint_to_cpu`` returns (cfg as OmegaConf, old formats upgraded)."""
    from fairseq import checkpoint_utils
    from omegaconf import DictConfig, OmegaConf

    if state.get("cfg") is not None and not isinstance(state["cfg"], DictConfig):
        state["cfg"] = OmegaConf.create(state["cfg"], flags={"allow_objects": True})
    return checkpoint_utils._upgrade_state_dict(state)


def training_task_config(state: dict, checkpoint="checkpoint") -> argparse.Namespace:
    """The training task's configuration saved in ``state``, checked to be a multilingual
    ``smoe_translation`` / ``translation_multi_simple_epoch`` task."""
    cfg = state.get("cfg")
    task = cfg["task"] if cfg is not None else None
    if task is None and state.get("args") is not None:
        task = state["args"]
    if task is None:
        raise TranslatorError(f"{checkpoint} holds no training configuration (no 'cfg' or 'args')")
    if not isinstance(task, argparse.Namespace):
        task = argparse.Namespace(**dict(task))
    name = getattr(task, "_name", None) or getattr(task, "task", None)
    if name not in MULTILINGUAL_TASKS:
        raise TranslatorError(
            f"{checkpoint} was trained with task {name!r}; decoding here needs a multilingual "
            f"smoe_translation (or translation_multi_simple_epoch) checkpoint"
        )
    return task


# ----------------------------------------------------------------------------- routing


def routing_record(model, net_input, detail=False):
    """Run ``model`` teacher-forced on ``net_input`` and return the forward's ``RoutingRecord``
    (``fairseq_smoe.modules.stats``): one entry per MoE slot that ran, in order; with
    ``detail`` each block's ``trace`` holds its passes (rows, experts chosen and kept, router
    probabilities). A dense model gives an empty record."""
    from .modules.stats import recording

    with recording(detail=detail) as record:
        model(**net_input)
    return record


@dataclass
class BlockRouting:
    """How one SMoE block routed the tokens of one side of a sentence.

    ``tokens``: the pieces at the block's positions (encoder: the source as the encoder reads
    it, language tag and ``</s>`` included; decoder: the decoder's input, i.e. ``</s>`` (or the
    tag, with ``--lang-tok-replacing-bos-eos``) then the translation without its last token);
    ``predicts``: decoder only, the piece each position predicts; ``passes``: strata passes per
    token; ``experts``: per token, per pass, the global ids of the experts that computed it
    (first choice first). ``index`` is the block's place in its slot (stacked MoE: 0..N-1)."""

    side: str
    layer: int
    index: int
    tokens: List[str]
    passes: List[int]
    experts: List[List[List[int]]]
    predicts: Optional[List[str]] = None


@dataclass
class Routing:
    source: str
    translation: str
    source_lang: str
    target_lang: str
    blocks: List[BlockRouting]

    def side(self, side: str) -> List[BlockRouting]:
        return [b for b in self.blocks if b.side == side]


def _experts_per_token(stats, length: int) -> List[List[List[int]]]:
    """Per token (batch of one sentence: row t of the T*1 rows is token t), per pass, the
    computed experts, from the block's ``PassTrace`` list."""
    experts: List[List[List[int]]] = [[] for _ in range(length)]
    for trace in stats.trace:
        rows = range(length) if trace.rows_n is None else trace.rows_n.tolist()
        chosen, kept = trace.experts_Kn.t().tolist(), trace.kept_Kn.t().tolist()
        for row, es, ks in zip(rows, chosen, kept):
            if row < length:
                experts[row].append([e for e, k in zip(es, ks) if k])
    return experts


# ----------------------------------------------------------------------------- translator


def _generation_config(beam: int, lenpen: float):
    from fairseq.dataclass.configs import GenerationConfig

    if not isinstance(beam, int) or isinstance(beam, bool) or beam < 1:
        raise TranslatorError(f"beam must be a positive integer, got {beam!r}")
    gen = GenerationConfig()
    gen.beam, gen.lenpen = beam, float(lenpen)
    return gen


def resolve_device(device=None) -> torch.device:
    """``None``: the first GPU when there is one, else the CPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise TranslatorError(f"device {device!r} is not a torch device (use 'cpu', 'cuda' or 'cuda:N')") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TranslatorError(f"device {device} asked for, but torch sees no GPU "
                                  f"(torch.cuda.is_available() is False); use device='cpu'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise TranslatorError(f"device {device} asked for, but torch sees "
                                  f"{torch.cuda.device_count()} GPU(s)")
    elif device.type != "cpu":
        raise TranslatorError(f"device {device} is not supported; use 'cpu' or 'cuda[:N]'")
    return device


@contextmanager
def seeded(seed: int, device: torch.device):
    """Seed numpy and torch as ``fairseq-generate --seed`` does, and give the caller's random
    state back afterwards."""
    from fairseq import utils

    np_state = np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        np.random.seed(seed)
        utils.set_torch_seed(seed)
        try:
            yield
        finally:
            np.random.set_state(np_state)


def _data_paths(data_dir, spm_model) -> Tuple[str, Optional[str]]:
    """(fairseq data directory with dict.LANG.txt, SentencePiece model or None)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise TranslatorError(f"data directory {data_dir} does not exist; pass the directory "
                              f"scripts/prepare_data.sh wrote (with spm.model and data-bin/)")
    data_bin = data_dir / "data-bin" if (data_dir / "data-bin").is_dir() else data_dir
    if spm_model is None and (data_dir / "spm.model").is_file():
        spm_model = data_dir / "spm.model"
    if spm_model is not None and not Path(spm_model).is_file():
        raise TranslatorError(f"SentencePiece model {spm_model} does not exist")
    return str(data_bin), (str(spm_model) if spm_model is not None else None)


class SMoETranslator:
    """An SMoE (or any smoe_transformer / multilingual fairseq) checkpoint, loaded once, ready
    to translate any direction between its languages.

    ``checkpoint``: a ``fairseq-train`` checkpoint of task ``smoe_translation`` (or
    ``translation_multi_simple_epoch``). ``data_dir``: what ``scripts/prepare_data.sh`` wrote
    (``spm.model`` and ``data-bin/``), or a fairseq data directory holding the
    ``dict.LANG.txt`` the model was trained with (then pass ``spm_model``). ``device``: 'cpu',
    'cuda', 'cuda:N' or a ``torch.device``; default the first GPU if there is one.
    ``max_tokens``: batch size in tokens (as ``fairseq-generate --max-tokens``).
    ``task_paths``: new locations of files the training task named, when they have moved since
    training, e.g. ``{"lang_dict": "data/lang_dict.txt"}`` (keys: lang_dict, fixed_dictionary,
    source_dict, target_dict). ``max_passes``: the compute dial (``--smoe-max-passes K``):
    every token leaves each SMoE block after at most K strata passes; default None, the model as
    trained (a value saved with the training task is not inherited: it only capped validation).
    ``state``: an already-read checkpoint state (``torch.load``), to avoid reading the file twice.
    """

    def __init__(self, checkpoint, data_dir, spm_model=None, device=None, max_tokens: int = 4096,
                 task_paths: Optional[Dict[str, str]] = None, max_passes: Optional[int] = None,
                 state: Optional[dict] = None):
        from fairseq import checkpoint_utils

        import fairseq_smoe  # noqa: F401  (registers the task and model)

        self.checkpoint = str(checkpoint)
        self.device = resolve_device(device)
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise TranslatorError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        self.max_tokens = max_tokens
        if max_passes is not None and (not isinstance(max_passes, int) or max_passes < 1):
            raise TranslatorError(f"max_passes must be a positive integer (1..strata), got {max_passes!r}")
        self.max_passes = max_passes
        self.data_bin, self.spm_model = _data_paths(data_dir, spm_model)
        state = read_checkpoint(self.checkpoint) if state is None else upgrade_state(state)
        self.train_cfg = self._decoding_base(training_task_config(state, self.checkpoint), task_paths or {})
        # the state is passed on (read once), so fairseq's reader, where checkpoint_io checks that
        # the architecture is registered, does not run: check here (raises its CheckpointError),
        # before the data is opened (the checkpoint's problems first)
        from .checkpoint_io import _registration_problem

        problem = _registration_problem(self.checkpoint, state, need_task=False)
        if problem is not None:
            raise problem
        pairs = self.train_cfg.lang_pairs
        self.lang_pairs = pairs.split(",") if isinstance(pairs, str) else list(pairs)
        self._tasks = {}
        first = self.task(*self.lang_pairs[0].split("-"))
        self.languages = list(first.langs)
        self._sp = self._bpe = None
        if self.spm_model is not None:  # damaged, or not this dictionary's: refused before decoding
            self._sp = self._checked(lambda: first.spm_model(self.spm_model))
        self._check_vocabulary(first, state)
        # the data must be what the model was trained with (task_state's fingerprint)
        self._task_state = state.get("task_state") or {}
        self._checked(lambda: first.check_checkpoint_data(self._task_state, self.checkpoint, self.spm_model))
        models, _ = checkpoint_utils.load_model_ensemble([self.checkpoint], task=first, state=state)
        del state
        self.model = models[0]
        self.model.eval()
        self.model.to(self.device)
        # what fairseq-generate does before decoding (beam-size independent for transformers)
        self.model.prepare_for_inference_(argparse.Namespace(generation=_generation_config(5, 1.0)))

    # --- setup -------------------------------------------------------------------------

    def _decoding_base(self, task_cfg, task_paths):
        cfg = copy.deepcopy(task_cfg)
        for key in ("_name", "task"):  # a stock multilingual checkpoint decodes with our subclass (no dropped batch)
            if getattr(cfg, key, None) == "translation_multi_simple_epoch":
                setattr(cfg, key, "smoe_translation")
        unknown = sorted(set(task_paths) - set(PATH_FLAGS))
        if unknown:
            raise TranslatorError(f"task_paths: {', '.join(unknown)} not among {', '.join(PATH_FLAGS)}")
        for flag in PATH_FLAGS:
            trained = getattr(cfg, flag, None)
            if flag in task_paths:
                if trained is None:
                    raise TranslatorError(
                        f"--{flag.replace('_', '-')} {task_paths[flag]} given, but the checkpoint was not "
                        f"trained with --{flag.replace('_', '-')}: leave it out"
                    )
                setattr(cfg, flag, str(task_paths[flag]))
            path = getattr(cfg, flag, None)
            if path is not None and not os.path.isfile(path):
                opt = flag.replace("_", "-")
                what = (f"the checkpoint was trained with --{opt} {trained}, which does not exist here"
                        if path == trained else
                        f"--{opt} {path}, given as the new place of the training task's {trained}, does not exist")
                raise TranslatorError(
                    f"{what}; decoding needs that file (for --lang-dict its language order fixes the "
                    f"language-token ids). Restore it, or give its new place: evaluate --{opt} PATH, "
                    f"SMoETranslator(..., task_paths={{'{flag}': PATH}})"
                )
        # fairseq's task setup parses these with eval_bool, which turns the bool True saved in
        # the checkpoint into False (right padding); give it back the string it expects
        for flag in ("left_pad_source", "left_pad_target"):
            if isinstance(getattr(cfg, flag, None), bool):
                setattr(cfg, flag, str(getattr(cfg, flag)))
        cfg.data = self.data_bin
        cfg.smoe_max_passes = self.max_passes  # applied by the task's build_model
        cfg.keep_inference_langtok = False  # hypotheses are text: no language tag in them
        return cfg

    def task(self, source_lang: str, target_lang: str):
        """The fairseq task that decodes ``source_lang`` -> ``target_lang`` (cached)."""
        from fairseq import tasks

        key = (source_lang, target_lang)
        if key not in self._tasks:
            for lang in key:
                if not isinstance(lang, str) or not lang:
                    raise TranslatorError(f"a language must be a non-empty string, got {lang!r}")
            cfg = copy.deepcopy(self.train_cfg)
            cfg.source_lang, cfg.target_lang = key
            task = self._checked(lambda: tasks.setup_task(cfg))
            if self._tasks:  # the first task is checked with the checkpoint in __init__
                self._checked(lambda: task.check_checkpoint_data(self._task_state, self.checkpoint, self.spm_model))
            self._tasks[key] = task
        return self._tasks[key]

    @staticmethod
    def _checked(call):
        """``call()``, its user errors (a task's ValueError/FileNotFoundError, a DataError) as
        TranslatorError."""
        try:
            return call()
        except (ValueError, FileNotFoundError) as err:
            if isinstance(err, TranslatorError):
                raise
            raise TranslatorError(str(err)) from err

    def _check_vocabulary(self, task, state):
        """The dictionary of the data directory, with the language tokens, must be the one the
        model was trained with (else loading fails with a shape mismatch that says nothing)."""
        for side, dictionary in (("encoder", task.source_dictionary), ("decoder", task.target_dictionary)):
            weight = state["model"].get(f"{side}.embed_tokens.weight")
            if weight is not None and weight.shape[0] != len(dictionary):
                raise TranslatorError(
                    f"the {side} vocabulary of {self.checkpoint} has {weight.shape[0]} entries but the "
                    f"dictionary of {self.data_bin} gives {len(dictionary)} (its symbols plus "
                    f"{len(task.langs)} language tokens in the training task's style): decode with the "
                    f"data directory (dict.LANG.txt) the model was trained with"
                )

    # --- SentencePiece ------------------------------------------------------------------

    def _need_spm(self):
        if self.spm_model is None:
            raise TranslatorError(
                f"no SentencePiece model: {self.data_bin} has no spm.model next to it; pass "
                f"spm_model=PATH (the model the training data was encoded with)"
            )
        if self._sp is None:
            self._sp = self._checked(lambda: data_checks.load_spm(self.spm_model))
        if self._bpe is None:
            from fairseq.data import encoders

            # fairseq-generate --bpe sentencepiece: the detokenizer of the D- lines
            self._bpe = encoders.build_bpe(argparse.Namespace(bpe="sentencepiece", sentencepiece_model=self.spm_model))

    def encode(self, sentences: Sequence[str]) -> List[str]:
        """Raw sentences -> space-separated pieces, exactly as ``data_prep`` binarized the data."""
        from data_prep.spm_binarize import clean_line  # the whitespace normalisation of the data

        self._need_spm()
        self._checked(lambda: data_checks.check_text(sentences))
        return [" ".join(p) for p in self._sp.encode([clean_line(s) for s in sentences], out_type=str)]

    def detokenize(self, pieces: str) -> str:
        """Pieces -> text, as ``fairseq-generate --bpe sentencepiece`` writes its D- lines."""
        self._need_spm()
        return self._bpe.decode(pieces)

    # --- decoding -----------------------------------------------------------------------

    def batches(self, task, dataset, seed: int = SEED):
        """The batches fairseq-generate makes of ``dataset`` (same sampler, seed, multiple)."""
        from fairseq import utils

        return task.get_batch_iterator(
            dataset=dataset, max_tokens=self.max_tokens, max_sentences=None,
            max_positions=utils.resolve_max_positions(task.max_positions(), self.model.max_positions()),
            ignore_invalid_inputs=False, required_batch_size_multiple=REQUIRED_BATCH_SIZE_MULTIPLE,
            seed=seed, num_shards=1, shard_id=0, num_workers=0, disable_iterator_cache=True,
        ).next_epoch_itr(shuffle=False)

    def decode(self, task, batches: Iterable[dict], beam: int = 5, lenpen: float = 1.0,
               scorer=None, on_batch=None):
        """fairseq-generate's loop over ``batches``: yields ``(id, hypothesis tokens, pieces,
        text)`` of the best hypothesis of every sentence, in batch order.

        ``scorer``: a fairseq scorer fed as fairseq-generate feeds it (reference and hypothesis
        token ids, the language tag included), when batches have targets. ``on_batch(sample)``
        is called after each batch is decoded (the evaluator measures routing there)."""
        from fairseq import utils

        gen_cfg = _generation_config(beam, lenpen)
        generator = task.build_generator(
            [self.model], gen_cfg, extra_gen_cls_kwargs={"lm_model": None, "lm_weight": gen_cfg.lm_weight}
        )
        strip = getattr(generator, "symbols_to_strip_from_output", {generator.eos})
        tgt_dict = task.target_dictionary
        for sample in batches:
            if "net_input" not in sample:
                continue
            sample = utils.apply_to_sample(lambda t: t.to(self.device), sample)
            hypos = task.inference_step(generator, [self.model], sample, prefix_tokens=None, constraints=None)
            if on_batch is not None:
                on_batch(sample)
            for i, sample_id in enumerate(sample["id"].tolist()):
                best = hypos[i][0]
                tokens, pieces, _ = utils.post_process_prediction(
                    hypo_tokens=best["tokens"].int().cpu(), src_str="", alignment=best["alignment"],
                    align_dict=None, tgt_dict=tgt_dict, remove_bpe=None, extra_symbols_to_ignore=strip,
                )
                if scorer is not None and sample.get("target") is not None:
                    target = utils.strip_pad(sample["target"][i, :], tgt_dict.pad()).int().cpu()
                    scorer.add(target, tokens)
                yield sample_id, tokens, pieces, (self.detokenize(pieces) if self.spm_model else pieces)

    def _inference_dataset(self, task, sentences: Sequence[str]):
        pieces = self.encode(sentences)
        src_dict = task.source_dictionary
        tokens = [src_dict.encode_line(p, add_if_not_exist=False, append_eos=True).long() for p in pieces]
        limit = task.max_positions()[0]
        for i, t in enumerate(tokens):
            # the language tag (or the replaced eos) makes the encoder input at most one longer
            if t.numel() + 1 > min(limit, self.model.max_positions()[0]):
                raise TranslatorError(
                    f"sentence {i} is {t.numel()} pieces long (with </s>); this model reads at most "
                    f"{min(limit, self.model.max_positions()[0]) - 1}: split it"
                )
        return task.build_dataset_for_inference(tokens, [t.numel() for t in tokens])

    @staticmethod
    def _check_sentences(sentences):
        if not isinstance(sentences, (list, tuple)):
            raise TranslatorError(f"sentences must be a str or a list of str, got a {type(sentences).__name__}")
        sentences = list(sentences)
        for i, s in enumerate(sentences):
            if not isinstance(s, str):
                raise TranslatorError(f"sentence {i} is a {type(s).__name__}, not a str")
            if "\n" in s or "\r" in s:
                raise TranslatorError(f"sentence {i} contains a line break; pass one sentence per "
                                      f"list item (split the text on its lines first)")
        SMoETranslator._checked(lambda: data_checks.check_text(sentences))
        return sentences

    @torch.no_grad()
    def translate(self, sentences: Union[str, Sequence[str]], source_lang: str, target_lang: str,
                  beam: int = 5, lenpen: float = 1.0) -> Union[str, List[str]]:
        """Translate raw sentences (a list, or one string) from ``source_lang`` into
        ``target_lang``; returns detokenized text, one string per sentence, in input order."""
        single = isinstance(sentences, str)
        sentences = self._check_sentences([sentences] if single else sentences)
        if not sentences:
            return []
        task = self.task(source_lang, target_lang)
        dataset = self._inference_dataset(task, sentences)
        with seeded(SEED, self.device):
            out = {i: text for i, _, _, text in self.decode(task, self.batches(task, dataset), beam, lenpen)}
        if sorted(out) != list(range(len(sentences))):  # never expected: fairseq lost a sentence
            raise TranslatorError(f"decoding returned {len(out)} of {len(sentences)} sentences")
        result = [out[i] for i in range(len(sentences))]
        return result[0] if single else result

    @torch.no_grad()
    def route(self, sentence: str, source_lang: str, target_lang: str, beam: int = 5,
              lenpen: float = 1.0) -> Routing:
        """How the SMoE blocks route ``sentence``: translates it (``beam``), then runs the model
        once teacher-forced on the source and on that translation, the very input the decoder
        saw while producing it. In evaluation mode with no capacity limit (the default) a token's
        route depends only on its own hidden state, so this is the routing of the generation
        itself. Returns a ``Routing``; its ``blocks`` list every SMoE block, encoder first."""
        if not isinstance(sentence, str):
            raise TranslatorError(f"route takes one sentence (a str), got a {type(sentence).__name__}")
        self._check_sentences([sentence])
        task = self.task(source_lang, target_lang)
        dataset = self._inference_dataset(task, [sentence])
        with seeded(SEED, self.device):
            ((_, hypo, _, text),) = list(self.decode(task, self.batches(task, dataset), beam, lenpen))
        sample = dataset.collater([dataset[0]])
        d, args = task.target_dictionary, task.args
        _, tgt_spec = args.langtoks["main"]
        bos = d.eos()
        if args.lang_tok_replacing_bos_eos and tgt_spec:
            bos = task.data_manager.get_decoder_langtok(target_lang, tgt_spec)
        hypo = hypo.long()
        prev = torch.cat([hypo.new_tensor([bos]), hypo[:-1]]).unsqueeze(0)
        net_input = {**sample["net_input"], "prev_output_tokens": prev}
        net_input = {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in net_input.items()}
        record = routing_record(self.model, net_input, detail=True)
        sides = {
            "encoder": [task.source_dictionary[t] for t in net_input["src_tokens"][0].tolist()],
            "decoder": [d[t] for t in prev[0].tolist()],
        }
        predicts = [d[t] for t in hypo.tolist()]
        blocks = []
        for entry in record.entries:
            for index, stats in enumerate(entry.stats.blocks):
                tokens = sides[entry.side]
                blocks.append(BlockRouting(
                    side=entry.side, layer=entry.layer, index=index, tokens=tokens,
                    passes=stats.passes_TB[:, 0].tolist(),
                    experts=_experts_per_token(stats, len(tokens)),
                    predicts=predicts if entry.side == "decoder" else None,
                ))
        return Routing(source=sentence, translation=text, source_lang=source_lang,
                       target_lang=target_lang, blocks=blocks)
