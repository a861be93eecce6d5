"""megatron-core indexed datasets (``.bin``/``.idx``) of the tokenized corpus, with domain labels.

Layout for a corpus prefix ``P`` (e.g. ``OUT/data/corpus``) and each split ``S`` in train/valid/test:

- ``P_S_text_document.bin`` / ``.idx``: written by megatron-core's ``IndexedDatasetBuilder``, exactly as
  Megatron-LM's ``tools/preprocess_data.py`` does: one sequence per corpus document (in the order of
  ``corpus/S.jsonl``), the EOD id appended, dtype ``DType.optimal_dtype(vocab_size)`` (uint16 below
  65500 ids).
- ``P_S_text_document_domains.npy``: int16 [num_sequences], the domain id of each sequence, aligned with
  the ``.idx`` order.
- ``domains.json`` next to the files: ``{"domains": [names...]}`` (id = position).

Why a per-document sidecar and not a parallel indexed dataset of per-token domain ids: a document has
one domain by construction, so per-token storage would double the data for no information; the
per-token label is recovered exactly from GPTDataset's own document/sample/shuffle indices
(``datasets.DomainGPTDataset``). A corpus whose documents mix domains would need the per-token form.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Iterable, List, Optional, Sequence

import numpy

from .corpus import Document

DOMAINS_FILE = "domains.json"
DOMAIN_DTYPE = numpy.int16


def split_prefix(prefix: str, split: str) -> str:
    """The megatron-core dataset prefix of one split: ``<prefix>_<split>_text_document``."""
    return f"{prefix}_{split}_text_document"


def domains_path(dataset_prefix: str) -> str:
    """The domain sidecar of a megatron-core dataset prefix."""
    return f"{dataset_prefix}_domains.npy"


def write_indexed_dataset(
    docs: Iterable[Document],
    tokenizer,
    dataset_prefix: str,
    domain_names: Sequence[str],
    batch_size: int = 512,
    max_tokens_per_domain: Optional[int] = None,
) -> Dict[str, Dict[str, int]]:
    """Tokenize ``docs`` (+EOD each) into ``dataset_prefix.{bin,idx}`` and the domain sidecar.

    ``max_tokens_per_domain``: keep exactly that many tokens of each domain (``corpus.balance_tokens``:
    documents in order, the one crossing the budget cut and ended with EOD, later ones dropped).
    Returns ``{domain: {"documents": n, "tokens": t}}`` (tokens include the EODs).
    """
    from .corpus import balance_tokens

    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder, get_bin_path, get_idx_path

    os.makedirs(os.path.dirname(os.path.abspath(dataset_prefix)), exist_ok=True)
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    builder = IndexedDatasetBuilder(get_bin_path(dataset_prefix), dtype=dtype)
    domains: List[int] = []
    stats: Dict[str, Dict[str, int]] = {}
    encode = getattr(tokenizer, "tokenize_batch", None) or (lambda ts: [tokenizer.tokenize(t) for t in ts])

    left: Dict[str, int] = {}

    def flush(batch: List[Document]) -> None:
        token_docs = [(doc.domain, list(ids) + [tokenizer.eod])
                      for doc, ids in zip(batch, encode([d.text for d in batch]))]
        if max_tokens_per_domain is not None:  # each domain's budget carries over between batches
            kept = []
            for domain, ids in token_docs:
                budget = left.setdefault(domain, int(max_tokens_per_domain))
                for _, cut in balance_tokens([(domain, ids)], budget, tokenizer.eod):
                    kept.append((domain, cut))
                    left[domain] = budget - len(cut)
            token_docs = kept
        for domain, ids in token_docs:
            arr = numpy.asarray(ids, dtype=dtype)
            builder.add_document(arr, [arr.size])
            domains.append(domain_names.index(domain))
            s = stats.setdefault(domain, {"documents": 0, "tokens": 0})
            s["documents"] += 1
            s["tokens"] += int(arr.size)

    batch: List[Document] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) >= batch_size:
            flush(batch)
            batch = []
    if batch:
        flush(batch)
    builder.finalize(get_idx_path(dataset_prefix))
    numpy.save(domains_path(dataset_prefix), numpy.asarray(domains, dtype=DOMAIN_DTYPE))
    return stats


def write_domain_names(directory: str, domain_names: Sequence[str]) -> str:
    path = os.path.join(directory, DOMAINS_FILE)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"domains": list(domain_names)}, f, indent=2)
        f.write("\n")
    return path


def load_domain_names(dataset_prefix: str) -> Optional[List[str]]:
    """Domain names from ``domains.json`` in the folder of ``dataset_prefix``; None when absent."""
    path = os.path.join(os.path.dirname(os.path.abspath(dataset_prefix)), DOMAINS_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return list(json.load(f)["domains"])


def load_domains(dataset_prefix: str, num_sequences: Optional[int] = None) -> Optional[numpy.ndarray]:
    """The per-sequence domain ids (int64) of ``dataset_prefix``; None when it has no sidecar.

    Raises ValueError when the sidecar does not match the number of sequences of the ``.idx``.
    """
    path = domains_path(dataset_prefix)
    if not os.path.isfile(path):
        return None
    domains = numpy.load(path).astype(numpy.int64)
    if domains.ndim != 1 or (num_sequences is not None and domains.shape[0] != num_sequences):
        raise ValueError(
            f"{path} has {domains.shape} domain labels but the dataset has {num_sequences} sequences; "
            f"rebuild the data (scripts/prepare_data.sh) or delete the sidecar"
        )
    return domains


def corpus_prefix(output_dir: str) -> str:
    """The corpus prefix inside a folder written by ``prepare_data``: ``<output_dir>/indexed/corpus``."""
    return os.path.join(output_dir, "indexed", "corpus")
