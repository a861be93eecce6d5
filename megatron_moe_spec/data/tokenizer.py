"""A byte-level BPE tokenizer trained offline with HF ``tokenizers``, and the megatron-core wrapper.

``train_tokenizer`` learns the merges on an iterable of texts (the corpus' train split) and saves
``tokenizer.json``. ``SpecTokenizer`` loads it and exposes what megatron-core's ``GPTDataset`` and the
driver use: ``vocab_size``, ``eod`` (= ``eos``), ``pad``, ``tokenize(text)``, ``detokenize(ids)`` and
``unique_identifiers`` (part of megatron-core's dataset cache key; it includes the SHA-256 of the file,
so a retrained tokenizer never reuses old sample indices).

Byte-level: every string round-trips exactly (``detokenize(tokenize(x)) == x``): there is no
normalizer, the pre-tokenizer maps bytes to printable characters and the decoder maps them back. Special
tokens in the input text (a literal ``<|endoftext|>`` in a document) are encoded as ordinary bytes,
never as the special id, so a document can not fake an end-of-document.

``MockTokenizer`` is the same interface without a vocabulary, for mock data.
"""
from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from typing import Iterable, List, Optional, Sequence

from megatron.core.tokenizers import MegatronTokenizerBase

from .corpus import DATA_EXTRA_HINT, MissingDependencyError

EOD_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (EOD_TOKEN, PAD_TOKEN)  # ids 0 and 1
TOKENIZER_FILE = "tokenizer.json"
DEFAULT_VOCAB_SIZE = 8192


def _tokenizers():
    try:
        import tokenizers
    except ImportError as err:
        raise MissingDependencyError(
            f"the HF 'tokenizers' package is not installed ({err}); install it with: {DATA_EXTRA_HINT}"
        ) from err
    return tokenizers


def train_tokenizer(
    texts: Iterable[str],
    path: str,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    min_frequency: int = 2,
    length: Optional[int] = None,
) -> "SpecTokenizer":
    """Train a byte-level BPE on ``texts`` and save it to ``path`` (a ``.json`` file, or a folder that
    receives ``tokenizer.json``).

    ``vocab_size`` counts the 256 byte symbols and the special tokens; it must be at least 258.
    Training is deterministic for the same texts in the same order.
    """
    tk = _tokenizers()
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be >= {256 + len(SPECIAL_TOKENS)}, got {vocab_size}")
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    if os.path.isdir(path) or not path.endswith(".json"):
        path = os.path.join(path, TOKENIZER_FILE)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tok.save(path)
    return SpecTokenizer(path)


class SpecTokenizer(MegatronTokenizerBase):
    """megatron-core tokenizer over a saved HF ``tokenizer.json`` (byte-level BPE from ``train_tokenizer``).

    Args:
        path: ``tokenizer.json`` or the folder that holds it.
    """

    def __init__(self, path: str) -> None:
        tk = _tokenizers()
        if os.path.isdir(path):
            path = os.path.join(path, TOKENIZER_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no tokenizer at {path} (build one with scripts/prepare_data.sh)")
        super().__init__(path, {"library": "huggingface-tokenizers"})
        self._tok = tk.Tokenizer.from_file(path)
        self._tok.encode_special_tokens = True  # literal "<|endoftext|>" in text stays plain bytes
        with open(path, "rb") as f:
            self._sha256 = hashlib.sha256(f.read()).hexdigest()
        self._eod = self._tok.token_to_id(EOD_TOKEN)
        self._pad = self._tok.token_to_id(PAD_TOKEN)
        if self._eod is None:
            raise ValueError(f"{path} has no {EOD_TOKEN} token")

    # ---- what GPTDataset and the driver use
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def eos(self) -> int:
        return self._eod

    @property
    def pad(self) -> int:
        # A dedicated id, distinct from eod, so megatron-core masks padding without touching real EODs.
        return self._pad if self._pad is not None else -1

    @property
    def bos(self) -> Optional[int]:
        return None

    def tokenize(self, text: str) -> List[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def tokenize_batch(self, texts: Sequence[str]) -> List[List[int]]:
        """Like ``tokenize`` on each text, in parallel (Rust threads)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def vocab(self) -> dict:
        return self._tok.get_vocab(with_added_tokens=True)

    @property
    def inv_vocab(self) -> dict:
        return {v: k for k, v in self.vocab.items()}

    @property
    def special_tokens_dict(self) -> dict:
        return {"eos_token": self._eod, "pad_token": self.pad}

    @property
    def unique_identifiers(self) -> OrderedDict:
        return OrderedDict(
            [("class", f"{type(self).__module__}.{type(self).__qualname__}"), ("sha256", self._sha256)]
        )

    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError("no chat template: this tokenizer is for pre-training text only")

    def __repr__(self) -> str:
        return f"SpecTokenizer({self.path!r}, vocab_size={self.vocab_size}, eod={self.eod}, pad={self.pad})"


class MockTokenizer(MegatronTokenizerBase):
    """The tokenizer interface for mock data: ids ``0..vocab_size-1``, ``eod = vocab_size-1``,
    ``pad = vocab_size-2``. ``tokenize`` reads space-separated integers (like megatron's NullTokenizer)."""

    def __init__(self, vocab_size: int) -> None:
        if vocab_size < 8:
            raise ValueError("vocab_size must be >= 8")
        super().__init__("mock", {"library": "mock"})
        self._vocab_size = int(vocab_size)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return self._vocab_size - 1

    @property
    def eos(self) -> int:
        return self.eod

    @property
    def pad(self) -> int:
        return self._vocab_size - 2

    def tokenize(self, text: str) -> List[int]:
        return [int(x) for x in text.split()]

    def detokenize(self, ids: Sequence[int]) -> str:
        return " ".join(str(int(i)) for i in ids)

    @property
    def vocab(self) -> dict:
        return {str(i): i for i in range(self._vocab_size)}

    @property
    def special_tokens_dict(self) -> dict:
        return {"eos_token": self.eod, "pad_token": self.pad}

    @property
    def unique_identifiers(self) -> OrderedDict:
        return OrderedDict([("class", f"{type(self).__module__}.{type(self).__qualname__}"),
                            ("vocab_size", self._vocab_size)])

    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError


def load_tokenizer(path: str) -> SpecTokenizer:
    """``SpecTokenizer`` from ``tokenizer.json``, its folder, or a prepared data folder (``tokenizer/``)."""
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, TOKENIZER_FILE)):
        sub = os.path.join(path, "tokenizer")
        if os.path.isfile(os.path.join(sub, TOKENIZER_FILE)):
            path = sub
    return SpecTokenizer(path)


def tokenizer_summary(tok: SpecTokenizer) -> dict:
    return {"type": "byte-level BPE (HF tokenizers)", "vocab_size": tok.vocab_size, "eod": tok.eod,
            "pad": tok.pad, "special_tokens": list(SPECIAL_TOKENS), "sha256": tok._sha256}

