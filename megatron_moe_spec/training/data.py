"""Training and validation data: megatron-core ``GPTDataset``s, partitioned per data-parallel rank.

Datasets come from ``megatron_moe_spec.data`` (megatron-core's ``BlendedMegatronDatasetBuilder``):
``data.type: mock`` is megatron's ``MockGPTDataset`` with synthetic, learnable documents of three
domains; ``indexed`` reads megatron-core ``.bin/.idx`` prefixes (a prepared corpus prefix gives its own
train/valid/test files, a plain prefix is split by ``data.split``; several prefixes are blended with
``data.weights``). Every sample carries ``domain`` [S]: the dataset's per-token domain, -1 where unknown.

Partitioning (Megatron-LM's ``MegatronPretrainingSampler``): step ``s`` consumes the global samples
``[c, c + global_batch)`` with ``c`` the samples consumed before it; micro-batch ``m`` of data-parallel
rank ``r`` is samples ``c + (m * dp + r) * mbs ... + mbs``. The position in the data is therefore one
number, ``consumed_samples``, saved in checkpoints: a resumed run reads exactly the samples the
uninterrupted run would have read.

Within a tensor-parallel group, TP rank 0 reads and collates the micro-batch and broadcasts it
(megatron's ``tensor_parallel.broadcast_data``), as Megatron-LM does. Every pipeline stage reads: the
first needs the tokens, the last the labels, and every stage's MoE layers the domains (metrics).
Validation uses a fixed set: the first ``eval.iters * global_batch`` validation samples, every time, so
validation losses are comparable along the run; the final evaluation also reads as many samples of the
test split (``Data.test``, None when the data has none).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional

import torch

from megatron_moe_spec.run_config import ConfigError

INT_KEYS = ("tokens", "labels", "position_ids", "domain")
FLOAT_KEYS = ("loss_mask",)
MOCK_NUM_DOMAINS = 3


@dataclass
class Data:
    train: object
    valid: Optional[object]
    num_domains: int
    """Distinct domain ids the metrics count (0 = no domain metrics)."""
    domain_names: Optional[List[str]]
    domain_from_dataset_index: bool
    """Domains are the index of the sample's prefix in data.paths (datasets without per-token domains)."""
    test: Optional[object] = None
    """The test split (evaluated once, at the end of training); None when the data has none."""


def build_data(cfg, sizes) -> Data:
    """Build the train and validation datasets (collective: call on every rank)."""
    from megatron_moe_spec.data import datasets as D

    t, d = cfg.training, cfg.data
    gbs = sizes.global_batch_size
    train_samples = t.train_iters * gbs
    valid_samples = cfg.eval.iters * gbs if cfg.eval.interval > 0 else 0
    num_samples = (train_samples, valid_samples, valid_samples)  # test: as much as one evaluation
    common = dict(seq_length=cfg.model.seq_length, num_samples=num_samples, seed=t.seed,
                  create_attention_mask=False)
    if d.type == "mock":
        from megatron_moe_spec.data.tokenizer import MockTokenizer

        train, valid, test = D.build_mock_datasets(MockTokenizer(cfg.model.vocab_size),
                                                   num_domains=MOCK_NUM_DOMAINS, **common)
    else:
        tokenizer = _tokenizer(cfg)
        if len(d.paths) == 1 and d.weights is None:
            train, valid, test = D.build_datasets(d.paths[0], tokenizer, split=d.split, **common)
        else:
            train, valid, test = _build_blend(cfg, tokenizer, **common)
    if train is None:
        raise ConfigError("data.paths: the training split is empty; check data.split and the dataset",
                          key="data.paths")
    if cfg.eval.interval > 0 and valid is None:
        raise ConfigError("eval.interval: the data has no validation split (data.split gives it weight 0 "
                          "or the corpus has no valid file); set eval.interval: 0 or give the split a "
                          "validation share", key="eval.interval")
    num_domains, names, by_index = 0, None, False
    if d.domain_labels:
        leaves = _leaf_datasets(train)
        if all(getattr(ds, "has_domains", False) for ds in leaves):
            names = max((ds.domain_names or [] for ds in leaves), key=len) or None
            num_domains = len(names) if names else int(max(ds.sequence_domains.max() for ds in leaves)) + 1
        elif len(d.paths) >= 2:
            num_domains, names, by_index = len(d.paths), list(d.paths), True
    return Data(train, valid, num_domains, names, by_index, test if valid_samples else None)


def _tokenizer(cfg):
    from megatron_moe_spec.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(cfg.data.tokenizer_path)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's vocabulary "
            f"({tokenizer.vocab_size}, {cfg.data.tokenizer_path}); set model.vocab_size: "
            f"{tokenizer.vocab_size}", key="model.vocab_size")
    return tokenizer


def _build_blend(cfg, tokenizer, seq_length, num_samples, seed, create_attention_mask):
    """Several prefixes (or weights): megatron's blend, per split for prepared corpus prefixes."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder

    from megatron_moe_spec.data import datasets as D
    from megatron_moe_spec.data.indexed import split_prefix

    d = cfg.data
    per_split = [D.corpus_split_prefixes(p) for p in d.paths]
    if all(any(s) for s in per_split):
        blends = []
        for i, split in enumerate(("train", "valid", "test")):
            prefixes = [split_prefix(p, split) for p, s in zip(d.paths, per_split) if s[i]]
            blends.append((prefixes, d.weights) if len(prefixes) == len(d.paths) else None)
        kwargs = {"blend_per_split": blends}
    elif not any(any(s) for s in per_split):
        kwargs = {"blend": (list(d.paths), d.weights), "split": d.split}
    else:
        raise ConfigError("data.paths: mixes prepared corpus prefixes (DIR/indexed/corpus) and plain "
                          ".bin/.idx prefixes; use one kind", key="data.paths")
    path_to_cache = _cache_dir(cfg)
    config = D.make_config(tokenizer, seq_length, seed, path_to_cache,
                           create_attention_mask=create_attention_mask, **kwargs)
    D.check_helpers()
    built = BlendedMegatronDatasetBuilder(D.DomainGPTDataset, list(num_samples), lambda: True, config).build()
    return tuple(x if x is not None and len(x) > 0 else None for x in built)


def _cache_dir(cfg):
    import os

    return os.path.join(os.path.dirname(os.path.abspath(cfg.data.paths[0])), "cache")


def _leaf_datasets(dataset) -> list:
    inner = getattr(dataset, "datasets", None)  # megatron's BlendedDataset
    return list(inner) if inner is not None else [dataset]


# ----------------------------------------------------------------------------- batches
class BatchReader:
    """This rank's micro-batches of a step, by global sample index (see the module docstring)."""

    def __init__(self, dataset, sizes, domain_from_dataset_index: bool = False, domains_on: bool = True):
        from megatron.core import parallel_state

        self.dataset = dataset
        self.mbs = sizes.micro_batch_size
        self.dp = parallel_state.get_data_parallel_world_size()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.num_microbatches = sizes.num_microbatches
        self.global_batch = sizes.global_batch_size
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self.by_index = domain_from_dataset_index
        self.domains_on = domains_on

    def step_batches(self, consumed_samples: int) -> List[Dict[str, torch.Tensor]]:
        """The micro-batches of the step that starts after ``consumed_samples`` global samples."""
        return [self._micro_batch(consumed_samples + (m * self.dp + self.dp_rank) * self.mbs)
                for m in range(self.num_microbatches)]

    def _micro_batch(self, first: int) -> Dict[str, torch.Tensor]:
        from megatron.core import tensor_parallel

        data = None
        if self.tp_rank == 0:
            samples = [self.dataset[(first + j) % len(self.dataset)] for j in range(self.mbs)]
            data = {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in INT_KEYS + FLOAT_KEYS
                    if k != "domain"}
            if self.domains_on:
                domain = torch.stack([torch.as_tensor(s["domain"]) for s in samples]).long()
                if self.by_index:
                    ids = torch.tensor([int(s["dataset_id"]) for s in samples]).long()
                    domain = torch.where(domain < 0, ids[:, None].expand_as(domain), domain)
            else:
                domain = torch.full_like(data["tokens"], -1)
            data["domain"] = domain
            data = {k: v.long() if k in INT_KEYS else v.float() for k, v in data.items()}
        out = tensor_parallel.broadcast_data(list(INT_KEYS), data, torch.int64)
        out.update(tensor_parallel.broadcast_data(list(FLOAT_KEYS), data, torch.float32))
        return out


def valid_step_batches(reader: BatchReader, eval_step: int) -> List[Dict[str, torch.Tensor]]:
    """Validation micro-batches of evaluation step ``eval_step`` (the same set at every evaluation)."""
    return reader.step_batches(eval_step * reader.global_batch)
