"""The datasets the training driver consumes: megatron-core ``GPTDataset``s with a per-token ``domain``.

Build them the way Megatron-LM does, through ``BlendedMegatronDatasetBuilder`` and a ``GPTDatasetConfig``:

    tok = load_tokenizer("data/tokenizer")
    train, valid, test = build_datasets("data/data/corpus", tok, seq_length=256,
                                        num_samples=(train_iters * global_batch, None, None))
    sample = train[0]   # tokens, labels, loss_mask, position_ids, [attention_mask], domain: all [seq_length]

    train, valid, test = build_mock_datasets(MockTokenizer(1024), seq_length=256, num_samples=(1000, 64, 64))

``prefix`` is either a prepared corpus prefix (``<prefix>_{train,valid,test}_text_document`` exist; each
split is its own distribution, ``blend_per_split``) or any single megatron-core ``.bin``/``.idx`` prefix
(split by sequence with ``split="98,1,1"``, megatron's own convention). Domains are optional: without a
``<dataset_prefix>_domains.npy`` sidecar every ``domain`` entry is -1.

``domain[i]`` is the domain of the document that ``tokens[i]`` was read from (samples span document
boundaries); padding positions (only in a final partial validation sample) are -1. It is computed from
the dataset's own document, sample and shuffle indices, so it is aligned with ``tokens`` by construction.

Distributed use: ``build`` is collective when ``torch.distributed`` is initialized. Call it on every
rank; megatron-core builds the index caches (``path_to_cache``) on rank 0 first, then a barrier, then the
other ranks load them, so ``path_to_cache`` must be on a file system that all ranks see. Without
``torch.distributed`` (single process, CPU) it simply builds.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.utils import Split

from .corpus import SPLITS
from .indexed import load_domain_names, load_domains, split_prefix


NO_DOMAIN = -1


@dataclass
class DomainGPTDatasetConfig(GPTDatasetConfig):
    """``GPTDatasetConfig`` plus the shape of the synthetic mock data (used only when mock)."""

    mock_num_domains: int = 3
    """Number of synthetic domains of the mock data."""

    mock_num_documents: int = 4096
    """Number of mock documents (split 1:1:1 into train/valid/test, as megatron's mock)."""

    mock_max_document_length: int = 1024
    """Mock documents have 2..this many tokens, EOD included."""


class DomainGPTDataset(GPTDataset):
    """``GPTDataset`` whose samples also carry ``domain`` [seq_length] (int64) next to ``tokens``."""

    def __init__(self, indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config):
        super().__init__(indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config)
        self.sequence_domains = self._load_sequence_domains()
        self.domain_names: Optional[List[str]] = self._load_domain_names()

    def _load_sequence_domains(self) -> Optional[numpy.ndarray]:
        return load_domains(self.dataset.path_prefix, int(self.dataset.sequence_lengths.shape[0]))

    def _load_domain_names(self) -> Optional[List[str]]:
        return load_domain_names(self.dataset.path_prefix)

    @property
    def has_domains(self) -> bool:
        return self.sequence_domains is not None

    def __getitem__(self, idx: Optional[int]) -> Dict[str, torch.Tensor]:
        sample = super().__getitem__(idx)
        sample["domain"] = torch.from_numpy(self.token_domains(0 if idx is None else idx))
        return sample

    def sample_parts(self, idx: int) -> List[Tuple[int, int, int]]:
        """(sequence id, offset, length) of each piece of sample ``idx``, exactly as
        ``GPTDataset._query_document_sample_shuffle_indices`` reads them (before padding)."""
        if self.shuffle_index is None:  # lazily mmapped indices (defer_npy_index_mmap)
            self._query_document_sample_shuffle_indices(idx)
        extra = int(self.config.add_extra_token_to_sequence)
        i = self.shuffle_index[idx]
        beg, beg_off = (int(x) for x in self.sample_index[i])
        end, end_off = (int(x) for x in self.sample_index[i + 1])
        if beg == end:
            return [(int(self.document_index[beg]), beg_off, end_off - beg_off + extra)]
        parts = []
        for j in range(beg, end + 1):
            seq = int(self.document_index[j])
            offset = beg_off if j == beg else 0
            length = (
                int(self.dataset.sequence_lengths[seq]) - offset if j < end else end_off + extra
            )
            parts.append((seq, offset, length))
        return parts

    def token_domains(self, idx: int) -> numpy.ndarray:
        """The domain of every input token of sample ``idx``: int64 [seq_length], -1 for padding."""
        total = self.config.sequence_length + int(self.config.add_extra_token_to_sequence)
        out = numpy.full(total, NO_DOMAIN, dtype=numpy.int64)
        if self.sequence_domains is not None:
            pos = 0
            for seq, _, length in self.sample_parts(idx):
                out[pos : pos + length] = self.sequence_domains[seq]
                pos += length
        return out[: self.config.sequence_length]


# ------------------------------------------------------------------------------------------ mock data
class MockDomainLowLevelDataset:
    """Synthetic documents with a domain each, learnable and domain-dependent.

    Document ``i`` has domain ``d`` (balanced, seeded), a length in [2, max_len] and tokens from the d-th
    band of the vocabulary (special ids excluded): an arithmetic progression with a domain-specific
    stride inside the band, 10% of positions replaced by random band tokens, then EOD. So the next token
    is mostly predictable and the domain is visible in the token ids (a router can specialize on it).
    """

    seed = 0

    def __init__(self, tokenizer, num_domains: int, num_documents: int, max_length: int) -> None:
        specials = {int(tokenizer.eod)}
        pad = getattr(tokenizer, "pad", None)
        if pad is not None and 0 <= int(pad) < tokenizer.vocab_size:
            specials.add(int(pad))
        self.usable = numpy.array(
            [i for i in range(tokenizer.vocab_size) if i not in specials], dtype=numpy.int64
        )
        if num_domains < 1 or len(self.usable) < 2 * num_domains:
            raise ValueError(f"vocab_size {tokenizer.vocab_size} too small for {num_domains} mock domains")
        self.eod = int(tokenizer.eod)
        self.num_domains = int(num_domains)
        self.band = len(self.usable) // self.num_domains
        rng = numpy.random.default_rng(self.seed)
        self.sequence_lengths = rng.integers(
            low=2, high=max(3, max_length + 1), size=num_documents, dtype=numpy.int32
        )
        self.domains = rng.permutation(numpy.arange(num_documents) % self.num_domains).astype(numpy.int64)

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def __getitem__(self, idx: int) -> numpy.ndarray:
        idx = int(idx)
        n = int(self.sequence_lengths[idx]) - 1
        d = int(self.domains[idx])
        rng = numpy.random.default_rng([self.seed, idx])
        start = int(rng.integers(self.band))
        pos = (start + (2 * d + 1) * numpy.arange(n)) % self.band
        noise = rng.random(n) < 0.1
        pos[noise] = rng.integers(self.band, size=int(noise.sum()))
        return numpy.concatenate([self.usable[d * self.band + pos], [self.eod]]).astype(numpy.int64)

    def get(self, idx: int, offset: int = 0, length: Optional[int] = None) -> numpy.ndarray:
        if length is None:
            length = int(self.sequence_lengths[idx]) - offset
        return self[idx][offset : offset + length]


class DomainMockGPTDataset(DomainGPTDataset):
    """Mock counterpart of ``DomainGPTDataset`` (megatron's ``MockGPTDataset`` with domains)."""

    def __init__(self, dataset, dataset_path, indices, num_samples, index_split, config):
        assert config.mock, "DomainMockGPTDataset needs a config without blend (mock)"
        super().__init__(dataset, dataset_path, indices, num_samples, index_split, config)

    @staticmethod
    def numel_low_level_dataset(low_level_dataset: MockDomainLowLevelDataset) -> int:
        return len(low_level_dataset)

    @staticmethod
    def build_low_level_dataset(dataset_path, config: DomainGPTDatasetConfig) -> MockDomainLowLevelDataset:
        return MockDomainLowLevelDataset(
            config.tokenizer,
            getattr(config, "mock_num_domains", 3),
            getattr(config, "mock_num_documents", 4096),
            getattr(config, "mock_max_document_length", 1024),
        )

    def _load_sequence_domains(self) -> numpy.ndarray:
        return self.dataset.domains

    def _load_domain_names(self) -> List[str]:
        return [f"mock_{d}" for d in range(self.dataset.num_domains)]


# ---------------------------------------------------------------------------------------- builders
def _always() -> bool:
    return True


def check_helpers() -> None:
    """megatron-core's C++ dataset helpers (``helpers_cpp``, which builds the sample index) must import.

    The megatron-core wheels on PyPI ship them prebuilt (``helpers_cpp.cpython-*.so``, listed in the
    wheel's RECORD), and an sdist install compiles them at install time, so nothing is compiled at run
    time. The wheel has no Makefile, so megatron's ``compile_helpers()`` can not help; say so clearly.
    """
    try:
        from megatron.core.datasets import helpers_cpp  # noqa: F401
    except ImportError as err:
        raise ImportError(
            f"megatron-core's C++ dataset helpers do not import ({err}). Install a megatron-core wheel "
            f"built for this Python/platform (pip install --force-reinstall 'megatron-core>=0.16,<0.20'); "
            f"building from source needs a C++ compiler, the Python headers and pybind11."
        ) from err


def make_config(
    tokenizer,
    seq_length: int,
    seed: int = 1234,
    path_to_cache: Optional[str] = None,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
    eod_mask_loss: bool = False,
    create_attention_mask: bool = True,
    **kwargs,
) -> DomainGPTDatasetConfig:
    """A ``DomainGPTDatasetConfig`` with the GPT defaults; ``kwargs`` go to the config (blend, split, ...)."""
    return DomainGPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        tokenizer=tokenizer,
        path_to_cache=path_to_cache,
        reset_position_ids=reset_position_ids,
        reset_attention_mask=reset_attention_mask,
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=create_attention_mask,
        **kwargs,
    )


def corpus_split_prefixes(prefix: str) -> List[Optional[str]]:
    """The per-split dataset prefixes of a prepared corpus that exist on disk (None where missing)."""
    out = []
    for split in SPLITS:
        p = split_prefix(prefix, split)
        out.append(p if IndexedDataset.exists(p) else None)
    return out


def build_datasets(
    prefix: str,
    tokenizer,
    seq_length: int,
    num_samples: Sequence[Optional[int]] = (None, None, None),
    seed: int = 1234,
    path_to_cache: Optional[str] = None,
    split: str = "98,1,1",
    is_built_on_rank: Callable[[], bool] = _always,
    **config_kwargs,
) -> Tuple[Optional[DomainGPTDataset], Optional[DomainGPTDataset], Optional[DomainGPTDataset]]:
    """Train/valid/test ``DomainGPTDataset``s from a corpus prefix or a single megatron-core prefix.

    Args:
        prefix: ``OUT/data/corpus`` of a prepared corpus (``*_{train,valid,test}_text_document`` files), or
            the prefix of one ``.bin``/``.idx`` pair (then split by sequence with ``split``).
        tokenizer: ``SpecTokenizer`` (or any megatron-core tokenizer with vocab_size, eod, pad,
            unique_identifiers) of the data.
        num_samples: samples per split; None = one epoch. A larger number repeats epochs (reshuffled).
        path_to_cache: where megatron-core caches its indices; default ``<folder of prefix>/cache``.
        is_built_on_rank: megatron-core's hook; by default every rank builds (reads) its own datasets.
        config_kwargs: more ``GPTDatasetConfig`` fields (reset_position_ids, eod_mask_loss, ...).

    Returns:
        (train, valid, test); a split without data (missing file, or zero share in ``split``) is None.
    """
    check_helpers()
    if path_to_cache is None:
        path_to_cache = os.path.join(os.path.dirname(os.path.abspath(prefix)), "cache")
    per_split = corpus_split_prefixes(prefix)
    if any(per_split):
        blend_kwargs = {"blend_per_split": [([p], None) if p else None for p in per_split]}
    elif IndexedDataset.exists(prefix):
        blend_kwargs = {"blend": ([prefix], None), "split": split}
    else:
        raise FileNotFoundError(
            f"no megatron-core dataset at {prefix!r}: expected {prefix}_train_text_document.bin/.idx "
            f"(scripts/prepare_data.sh) or {prefix}.bin/.idx"
        )
    config = make_config(tokenizer, seq_length, seed, path_to_cache, **blend_kwargs, **config_kwargs)
    sizes = [None if n is None else int(n) for n in num_samples]
    datasets = BlendedMegatronDatasetBuilder(DomainGPTDataset, sizes, is_built_on_rank, config).build()
    return tuple(_none_if_empty(d) for d in datasets)  # type: ignore[return-value]


def build_mock_datasets(
    tokenizer,
    seq_length: int,
    num_samples: Sequence[Optional[int]] = (None, None, None),
    seed: int = 1234,
    num_domains: int = 3,
    num_documents: int = 4096,
    max_document_length: int = 1024,
    is_built_on_rank: Callable[[], bool] = _always,
    **config_kwargs,
) -> Tuple[DomainMockGPTDataset, DomainMockGPTDataset, DomainMockGPTDataset]:
    """Train/valid/test mock datasets with synthetic domains (no files; nothing is cached)."""
    check_helpers()
    config = make_config(
        tokenizer, seq_length, seed, None, mock_num_domains=num_domains,
        mock_num_documents=num_documents, mock_max_document_length=max_document_length, **config_kwargs,
    )
    sizes = [None if n is None else int(n) for n in num_samples]
    return tuple(  # type: ignore[return-value]
        BlendedMegatronDatasetBuilder(DomainMockGPTDataset, sizes, is_built_on_rank, config).build()
    )


def _none_if_empty(dataset):
    if dataset is None:
        return None
    return dataset if len(dataset) > 0 else None


__all__ = [
    "DomainGPTDatasetConfig", "DomainGPTDataset", "DomainMockGPTDataset", "MockDomainLowLevelDataset",
    "make_config", "build_datasets", "build_mock_datasets", "check_helpers", "corpus_split_prefixes", "NO_DOMAIN", "Split",
]
