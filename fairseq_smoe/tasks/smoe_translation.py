"""``smoe_translation``: fairseq's ``translation_multi_simple_epoch`` plus what a multilingual
MoE user needs: per-direction validation loss and strata passes, clear errors for missing
data or language tokens, and no silently dropped last batch.

Data integrity (``fairseq_smoe.data_checks``): dictionaries, binarized files and the
SentencePiece model next to ``data-bin/`` are checked when opened; ``state_dict()`` saves a
fingerprint of them in every checkpoint (fairseq-train writes it as ``task_state``) and
``load_state_dict()``, which fairseq's model loaders call (generate, interactive, analyze, the
translator), refuses a checkpoint whose data is not this data. Batches refuse a --max-tokens
below a sentence's length, naming it; an interactive --input file must be UTF-8."""

import os

import numpy as np
import torch
from fairseq.data import ConcatDataset, data_utils
from fairseq.data.multilingual.multilingual_data_manager import MultilingualDatasetManager
from fairseq.tasks import register_task
from fairseq.tasks.translation_multi_simple_epoch import TranslationMultiSimpleEpochTask

from .. import data_checks
from ..errors import ConfigError, MissingFileError
from ..criterions.smoe_label_smoothed_cross_entropy import DIRECTION_KEY


class DirectionTaggedDataset(ConcatDataset):
    """The per-direction evaluation datasets, concatenated; each batch carries the direction
    id of every sentence (``sample["direction"]``) and globally unique sentence ids."""

    def __init__(self, datasets, direction_ids):
        super().__init__(datasets)
        self.direction_ids = np.asarray(direction_ids, dtype=np.int64)

    def __getitem__(self, idx):
        item = super().__getitem__(idx)
        item["id"] = idx  # the sub-dataset's own index would repeat across directions
        return item

    def collater(self, samples, **extra_args):
        batch = super().collater(samples, **extra_args)
        if batch and "id" in batch:
            which = np.searchsorted(self.cumulative_sizes, batch["id"].numpy(), side="right")
            batch[DIRECTION_KEY] = torch.from_numpy(self.direction_ids[which])
        return batch


class _DatasetManager(MultilingualDatasetManager):
    """Keeps the direction of every evaluation dataset (fairseq's concat forgets it)."""

    def load_into_concat_dataset(self, split, datasets, data_param_list):
        merged = super().load_into_concat_dataset(split, datasets, data_param_list)
        if not isinstance(merged, ConcatDataset):
            return merged  # --lang-tok-replacing-bos-eos keeps fairseq's own dataset
        names = self.direction_names
        ids = [names.index(key.split(":", 1)[1]) for key, _ in datasets]
        merged = DirectionTaggedDataset([d for _, d in datasets], ids)
        merged.direction_names = list(names)  # to name a sentence in an error
        return merged


def keep_every_batch(batches, indices):
    """fairseq drops the last batch when its size is not a multiple of
    --required-batch-size-multiple; give those sentences back as a final batch."""
    covered = sum(len(b) for b in batches)
    if covered == len(indices):
        return batches
    seen = np.concatenate(batches) if batches else np.zeros(0, dtype=np.int64)
    missing = np.asarray(indices)[~np.isin(indices, seen)]
    return list(batches) + [missing.astype(np.int64)]


@register_task("smoe_translation")
class SMoETranslationTask(TranslationMultiSimpleEpochTask):
    """Multilingual translation for SMoE models (same data layout and flags as
    ``translation_multi_simple_epoch``)."""

    @staticmethod
    def add_args(parser):
        TranslationMultiSimpleEpochTask.add_args(parser)
        parser.add_argument("--smoe-max-passes", type=int, metavar="K", default=None,
                            help="compute dial: at evaluation and generation (validation included) "
                            "every token leaves each SMoE block after at most K strata passes "
                            "(1..L; default: no cap, the model as trained). Training forwards are "
                            "not capped: train with --smoe-elastic-passes to serve every K")

    @classmethod
    def setup_task(cls, args, **kwargs):
        check_languages(args)
        check_dictionaries(args)
        source = getattr(args, "input", None)  # fairseq-interactive --input FILE
        if isinstance(source, str) and source != "-" and os.path.isfile(source):
            data_checks.check_utf8_file(source, "--input")
        return super().setup_task(args, **kwargs)

    @classmethod
    def load_dictionary(cls, filename):
        """fairseq's ``Dictionary.load``, with the file and line named for a damaged entry."""
        return data_checks.load_dictionary(filename)

    def check_dicts(self, dicts, source_langs, target_langs):
        """fairseq asserts (no file named) that the languages of one side share a dictionary;
        with --share-all-embeddings both sides do."""
        if self.args.source_dict is not None or self.args.target_dict is not None:
            return
        groups = [source_langs, target_langs]
        if getattr(self.args, "share_all_embeddings", False):
            groups = [list(source_langs) + list(target_langs)]
        data_checks.check_shared_dictionaries(dicts, groups)

    # --- data fingerprint (see fairseq_smoe.data_checks) -------------------------------

    def spm_model(self, path=None):
        """The SentencePiece model of this data (``path``, else ``spm.model`` next to
        ``data-bin/``), loaded and checked against the dictionary; None if there is none."""
        path = path or data_checks.spm_next_to(self.args.data)
        if path is None:
            return None
        cache = self.__dict__.setdefault("_smoe_spm", {})
        if path not in cache:
            sp = data_checks.load_spm(path)
            data_checks.check_spm_fits(sp, self.source_dictionary)
            cache[path] = sp
        return cache[path]

    def data_fingerprint(self, spm_model=None):
        dicts = {k: d for k, d in self.dicts.items() if hasattr(d, "smoe_file_len")}
        return data_checks.data_fingerprint(dicts, self.spm_model(spm_model))

    def state_dict(self):
        return {**super().state_dict(), data_checks.FINGERPRINT_KEY: self.data_fingerprint()}

    def check_checkpoint_data(self, task_state, checkpoint, spm_model=None):
        """Refuse this task's data for ``checkpoint`` unless it is the data it was trained with
        (``task_state``: the checkpoint's; a checkpoint without a fingerprint is said once)."""
        saved = (task_state or {}).get(data_checks.FINGERPRINT_KEY)
        data_checks.check_fingerprint(saved, self.data_fingerprint(spm_model), checkpoint)
        self._smoe_data_checked = True

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict or {})
        saved = state_dict.pop(data_checks.FINGERPRINT_KEY, None)
        super().load_state_dict(state_dict)
        if not self.__dict__.pop("_smoe_data_checked", False):
            self.check_checkpoint_data({data_checks.FINGERPRINT_KEY: saved}, _checkpoint_being_read())

    def build_bpe(self, args):
        """``--bpe sentencepiece``: the model is checked before anything is decoded."""
        if getattr(args, "bpe", None) == "sentencepiece" and getattr(args, "sentencepiece_model", None):
            sp = data_checks.load_spm(args.sentencepiece_model, "--sentencepiece-model")
            data_checks.check_spm_fits(sp, self.target_dictionary)
        return super().build_bpe(args)

    def build_model(self, args, from_checkpoint=False):
        model = super().build_model(args, from_checkpoint)
        k = getattr(self.args, "smoe_max_passes", None)
        if k is not None:
            if not hasattr(model, "set_max_passes"):
                raise ConfigError(f"--smoe-max-passes {k} needs an smoe_transformer model, got {type(model).__name__}")
            model.set_max_passes(k)
        return model

    def __init__(self, args, langs, dicts, training):
        super().__init__(args, langs, dicts, training)
        self.data_manager = _DatasetManager(args, self.lang_pairs, langs, dicts, self.sampling_method)
        self.data_manager.direction_names = self.direction_names
        self.spm_model()  # spm.model next to data-bin/: damaged or not this dictionary's, refused now

    @property
    def direction_names(self):
        """Directions in --lang-pairs order; ``sample["direction"]`` indexes this list."""
        return list(self.lang_pairs)

    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        check_split_files(self.args.data, split, self.lang_pairs)
        check_binarized_files(self.args.data, split, self.lang_pairs)
        return super().load_dataset(split, epoch=epoch, combine=combine, **kwargs)

    def build_generator(self, models, args, seq_gen_cls=None, extra_gen_cls_kwargs=None,
                        prefix_allowed_tokens_fn=None):
        """fairseq's ``FairseqTask.build_generator`` signature, honoured in full (the stock
        multilingual task accepts no ``prefix_allowed_tokens_fn``, so the hub interface's
        ``translate`` fails, and drops ``seq_gen_cls``), plus what the multilingual task adds:
        the target language token is stripped from the output unless
        ``--keep-inference-langtok`` (given to the task or in the generation args)."""
        keep = getattr(args, "keep_inference_langtok", False) or getattr(self.args, "keep_inference_langtok", False)
        _, tgt_langtok_spec = self.args.langtoks["main"]
        if not keep and tgt_langtok_spec:
            tgt_lang_tok = self.data_manager.get_decoder_langtok(self.args.target_lang, tgt_langtok_spec)
            extra_gen_cls_kwargs = dict(extra_gen_cls_kwargs or {})
            extra_gen_cls_kwargs["symbols_to_strip_from_output"] = {tgt_lang_tok}
        return super(TranslationMultiSimpleEpochTask, self).build_generator(
            models, args, seq_gen_cls=seq_gen_cls, extra_gen_cls_kwargs=extra_gen_cls_kwargs,
            prefix_allowed_tokens_fn=prefix_allowed_tokens_fn,
        )

    def create_batch_sampler_func(self, max_positions, ignore_invalid_inputs, max_tokens,
                                  max_sentences, required_batch_size_multiple=1, seed=1):
        def construct_batch_sampler(dataset, epoch):
            if epoch is not None:
                dataset.set_epoch(epoch)
            with data_utils.numpy_seed(seed):
                indices = dataset.ordered_indices()
            if max_positions is not None:
                indices = self.filter_indices_by_size(indices, dataset, max_positions, ignore_invalid_inputs)
            check_max_tokens(dataset, indices, max_tokens)
            batches = dataset.batch_by_size(
                indices, max_tokens=max_tokens, max_sentences=max_sentences,
                required_batch_size_multiple=required_batch_size_multiple,
            )
            return keep_every_batch(batches, indices)

        return construct_batch_sampler


def _checkpoint_being_read():
    """The file fairseq's loader is reading (fairseq passes the task no path)."""
    from .. import checkpoint_io

    last = getattr(checkpoint_io, "_last_read", None)
    return last[0] if last else None


def _sentence_name(dataset, index):
    """'en-de line 7 ("▁In ▁the ...")' for a sentence of a direction-tagged split."""
    text = ""
    try:
        item = dataset[index]
        source = item.get("source") if isinstance(item, dict) else None
        dictionary = getattr(dataset, "src_dict", None)
        if source is not None and dictionary is None and hasattr(dataset, "datasets"):
            dictionary = getattr(dataset.datasets[0], "src_dict", None)
        if source is not None and dictionary is not None:
            pieces = dictionary.string(source)
            text = f": {pieces[:60]}{'...' if len(pieces) > 60 else ''}"
    except Exception:  # noqa: BLE001  (naming the sentence must not hide the error itself)
        pass
    if hasattr(dataset, "direction_ids") and hasattr(dataset, "cumulative_sizes"):
        which = int(np.searchsorted(dataset.cumulative_sizes, index, side="right"))
        start = dataset.cumulative_sizes[which - 1] if which else 0
        names = getattr(dataset, "direction_names", None)
        direction = names[dataset.direction_ids[which]] if names else f"direction {dataset.direction_ids[which]}"
        return f"sentence {index - start} of {direction} (line {index - start + 1} of its file){text}"
    return f"sentence {index}{text}"


def check_max_tokens(dataset, indices, max_tokens):
    if max_tokens is None or len(indices) == 0:
        return
    indices = np.asarray(indices)
    if hasattr(dataset, "num_tokens_vec"):
        try:
            sizes = dataset.num_tokens_vec(indices)
        except NotImplementedError:
            sizes = None
    else:
        sizes = None
    if sizes is None:
        sizes = np.fromiter((dataset.num_tokens(int(i)) for i in indices), dtype=np.int64, count=len(indices))
    data_checks.check_max_tokens(sizes, indices, max_tokens, lambda i: _sentence_name(dataset, i))


def check_binarized_files(data, split, pairs):
    """The .bin of every side of every direction must match its .idx (cheap: sizes only)."""
    data = data.split(os.pathsep)[0]
    for pair in pairs:
        src, tgt = pair.split("-")
        for a, b in ((src, tgt), (tgt, src)):
            prefixes = [os.path.join(data, f"{split}.{a}-{b}.{lang}") for lang in (src, tgt)]
            if all(os.path.exists(p + ".idx") and os.path.exists(p + ".bin") for p in prefixes):
                data_checks.check_binarized_pair(*prefixes)
                break


def _languages(args):
    if args.langs is not None:
        langs = args.langs.split(",") if isinstance(args.langs, str) else list(args.langs)
        return langs, "--langs"
    if args.lang_dict is not None:
        if not os.path.exists(args.lang_dict):
            raise MissingFileError(
                f"--lang-dict {args.lang_dict} does not exist; give a file with one language "
                f"code per line, or list the languages with --langs"
            )
        with open(args.lang_dict, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()], f"--lang-dict {args.lang_dict}"
    return None, None


def check_languages(args):
    """Every language of the requested directions must have a language token."""
    pairs = args.lang_pairs.split(",") if isinstance(args.lang_pairs, str) else args.lang_pairs
    if not pairs:
        raise ConfigError("--lang-pairs is required, e.g. --lang-pairs en-de,de-en")
    for pair in pairs:
        if len(pair.split("-")) != 2 or "" in pair.split("-"):
            raise ConfigError(f"--lang-pairs: {pair!r} is not of the form SRC-TGT (e.g. en-de)")
    langs, where = _languages(args)
    if langs is None:
        raise ConfigError(
            "smoe_translation needs the language list for its language tokens: pass "
            "--langs en,de,... or --lang-dict FILE (one language per line)"
        )
    wanted = [p.split("-") for p in pairs]
    if args.source_lang is not None or args.target_lang is not None:
        wanted = [(args.source_lang, args.target_lang)]
    for src, tgt in wanted:
        for lang in (src, tgt):
            if lang not in langs:
                raise ConfigError(
                    f"language {lang!r} of direction {src}-{tgt} has no language token: it is "
                    f"not in {where} ({','.join(langs)}). Add it there, or drop the direction. "
                    f"Note that --langs must list the languages in the order used at training."
                )


def check_dictionaries(args):
    data = args.data.split(os.pathsep)[0]
    if not os.path.isdir(data):
        raise MissingFileError(
            f"data directory {data} does not exist; pass the fairseq-preprocess --destdir"
        )
    if args.source_dict is not None or args.fixed_dictionary is not None:
        return
    pairs = args.lang_pairs.split(",") if isinstance(args.lang_pairs, str) else args.lang_pairs
    langs = {l for p in pairs for l in p.split("-")}
    if args.source_lang is not None:
        langs = {args.source_lang, args.target_lang}
    missing = sorted(l for l in langs if not os.path.exists(os.path.join(data, f"dict.{l}.txt")))
    if missing:
        raise MissingFileError(
            f"no dictionary for {', '.join(missing)} in {data}: expected "
            + ", ".join(os.path.join(data, f"dict.{l}.txt") for l in missing)
            + ". Binarize every direction with fairseq-preprocess (one joined dictionary)."
        )


def check_split_files(data, split, pairs):
    """Name the missing files when a requested direction has no data for ``split``."""
    data = data.split(os.pathsep)[0]
    missing = []
    for pair in pairs:
        src, tgt = pair.split("-")
        found = any(
            all(os.path.exists(os.path.join(data, f"{split}.{a}-{b}.{lang}.{ext}"))
                for lang in (src, tgt) for ext in ("bin", "idx"))
            for a, b in ((src, tgt), (tgt, src))
        )
        if not found:
            missing.append(
                f"{pair}: expected {os.path.join(data, f'{split}.{src}-{tgt}.{src}')}.{{bin,idx}} "
                f"and .{tgt}.{{bin,idx}} (or the {tgt}-{src} files)"
            )
    if missing:
        have = sorted({f.split(".")[1] for f in os.listdir(data) if f.startswith(split + ".") and f.endswith(".idx")})
        raise MissingFileError(
            f"no {split} data for {len(missing)} requested direction(s) in {data}:\n  "
            + "\n  ".join(missing)
            + f"\n{split} data present for: {', '.join(have) or 'none'}. "
            f"Binarize the missing directions with fairseq-preprocess or remove them from --lang-pairs."
        )
