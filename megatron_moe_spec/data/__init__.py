"""The data path: an offline multi-domain corpus, its tokenizer, megatron-core indexed datasets and the
datasets the training driver consumes (with a per-token ``domain`` label).

- ``corpus``: documents with domain labels from installed packages (WEB Bible, stdlib code, docstrings).
- ``tokenizer``: byte-level BPE trained offline with HF ``tokenizers``; a megatron-core tokenizer wrapper.
- ``indexed``: megatron-core ``.bin``/``.idx`` files per split plus the per-document domain sidecar.
- ``datasets``: ``GPTDataset``s built through ``BlendedMegatronDatasetBuilder`` that also return
  ``domain`` per token; mock data with synthetic domains.

Importing this package imports neither megatron-core nor ``tokenizers``; the submodules do.
"""
