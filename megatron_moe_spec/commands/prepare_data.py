"""``prepare-data``: build the offline multi-domain corpus, its tokenizer and the megatron-core datasets.

Writes ``OUTPUT/``::

    manifest.json                      written last: sources, settings, sizes, SHA-256 of every file
    corpus/{train,valid,test}.jsonl    {"id", "domain", "text"} per document
    tokenizer/tokenizer.json           byte-level BPE (HF tokenizers)
    indexed/domains.json               {"domains": ["prose", "code", "technical"]}
    indexed/corpus_{split}_text_document.{bin,idx}      megatron-core indexed datasets (+EOD per doc);
                                       valid and test hold the same number of tokens of every domain
    indexed/corpus_{split}_text_document_domains.npy    domain id per document (int16)

Idempotent: when ``OUTPUT/manifest.json`` records the same settings and source versions and every file
still has its recorded checksum, nothing is rebuilt. Otherwise everything is built in a temporary sibling
folder and moved into place at the end, so an interrupted build never leaves a folder that looks complete.

Exit codes: 0 done (built or reused), 2 bad output path or missing input package, 1 anything else.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Optional

HELP = "build the offline multi-domain corpus, tokenizer and megatron-core datasets (.bin/.idx)"

MANIFEST = "manifest.json"
TINY = {"vocab_size": 512, "max_docs_per_domain": 12, "max_bytes_per_domain": 40_000, "split": "60,20,20"}
FULL = {"vocab_size": 8192, "max_docs_per_domain": None, "max_bytes_per_domain": None, "split": "96,2,2"}


class UsageError(Exception):
    """A problem the user can fix (exit code 2)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", "-o", default="data", metavar="DIR",
                        help="output folder (default: ./data); replaced atomically when rebuilt")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help=f"BPE vocabulary size incl. 256 bytes and 2 special tokens "
                             f"(default {FULL['vocab_size']}, --tiny {TINY['vocab_size']})")
    parser.add_argument("--max-docs-per-domain", type=int, default=None, metavar="N",
                        help="keep at most N documents per domain (seeded choice; default: all)")
    parser.add_argument("--max-bytes-per-domain", type=int, default=None, metavar="B",
                        help="keep at most B UTF-8 bytes of text per domain (default: all)")
    parser.add_argument("--split", default=None,
                        help="train,valid,test weights: valid and test each get this share of every "
                             "domain's bytes, then the same token count per domain "
                             f"(default {FULL['split']}, --tiny {TINY['split']})")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the document choice under the caps (the split itself depends "
                             "only on the chosen documents)")
    parser.add_argument("--tiny", action="store_true",
                        help=f"a small corpus for tests and demos (seconds): "
                             f"{TINY['max_docs_per_domain']} docs / {TINY['max_bytes_per_domain']} bytes "
                             f"per domain, vocab {TINY['vocab_size']}; explicit options override")
    parser.add_argument("--force", action="store_true", help="rebuild even when the manifest matches")


def _settings(args) -> dict:
    base = TINY if args.tiny else FULL
    pick = lambda name: getattr(args, name) if getattr(args, name) is not None else base[name]  # noqa: E731
    try:
        split = [float(x) for x in str(pick("split")).split(",")]
    except ValueError:
        raise UsageError(f"--split must be three comma-separated numbers, got {args.split!r}")
    if len(split) != 3 or any(x < 0 for x in split) or split[0] <= 0:
        raise UsageError(f"--split must be three non-negative weights with train > 0, got {args.split!r}")
    settings = {
        "tiny": bool(args.tiny),
        "vocab_size": int(pick("vocab_size")),
        "max_docs_per_domain": pick("max_docs_per_domain"),
        "max_bytes_per_domain": pick("max_bytes_per_domain"),
        "split": split,
        "seed": int(args.seed),
    }
    if settings["vocab_size"] < 258:
        raise UsageError("--vocab-size must be at least 258 (256 bytes + 2 special tokens)")
    for name in ("max_docs_per_domain", "max_bytes_per_domain"):
        if settings[name] is not None and settings[name] < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be positive")
    return settings


def _build_key(settings: dict) -> dict:
    from megatron_moe_spec.data.corpus import CORPUS_FORMAT_VERSION, package_version as version, source_versions

    return {
        "corpus_format_version": CORPUS_FORMAT_VERSION,
        "settings": settings,
        "sources": source_versions(),
        "tokenizers": version("tokenizers"),
        "megatron-core": version("megatron-core"),
    }


def _check_output(out: str) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--output {out} exists and is not a folder")
    parent = os.path.dirname(out)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as err:
        raise UsageError(f"can not create the parent folder of --output {out}: {err}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"the parent folder of --output {out} is not writable")
    if os.path.isdir(out) and os.listdir(out) and not os.path.isfile(os.path.join(out, MANIFEST)):
        raise UsageError(
            f"--output {out} is a non-empty folder without {MANIFEST}: refusing to replace it "
            f"(choose another folder or empty it)"
        )


def read_manifest(out: str) -> Optional[dict]:
    path = os.path.join(out, MANIFEST)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def verify_files(out: str, manifest: dict) -> Optional[str]:
    """None when every file of the manifest exists with its checksum; else the first problem."""
    from megatron_moe_spec.data.corpus import sha256_file

    files = manifest.get("files") or {}
    if not files:
        return "the manifest lists no files"
    for rel, info in sorted(files.items()):
        path = os.path.join(out, rel)
        if not os.path.isfile(path):
            return f"{rel} is missing"
        if os.path.getsize(path) != info["bytes"] or sha256_file(path) != info["sha256"]:
            return f"{rel} does not match its checksum"
    return None


def held_out_tokens_per_domain(corpus_dir: str, tokenizer) -> int:
    """The token count (EODs included) that every domain gets in valid and in test: the smallest
    per-domain count of the held-out splits that have documents (the others are cut to it)."""
    from megatron_moe_spec.data.corpus import SPLITS, read_jsonl

    counts = []
    for split in SPLITS[1:]:
        per: dict = {}
        for doc in read_jsonl(os.path.join(corpus_dir, f"{split}.jsonl")):
            per[doc.domain] = per.get(doc.domain, 0) + len(tokenizer.tokenize(doc.text)) + 1
        counts += list(per.values())
    return min(counts) if counts else 0


def build(out_dir: str, settings: dict, log=print) -> dict:
    """Build everything into ``out_dir`` (an empty folder) and return the manifest (also written)."""
    from megatron_moe_spec.data.corpus import DOMAINS, SPLITS, build_corpus, read_jsonl, sha256_file
    from megatron_moe_spec.data.indexed import corpus_prefix, split_prefix, write_domain_names, write_indexed_dataset
    from megatron_moe_spec.data.tokenizer import tokenizer_summary, train_tokenizer

    t0 = time.time()
    timings = {}
    corpus_dir = os.path.join(out_dir, "corpus")
    log(f"[prepare-data] corpus: collecting documents ({', '.join(DOMAINS)})")
    corpus = build_corpus(
        corpus_dir, settings["max_docs_per_domain"], settings["max_bytes_per_domain"], settings["seed"],
        settings["split"], DOMAINS,
    )
    timings["corpus_s"] = round(time.time() - t0, 2)

    t1 = time.time()
    train_jsonl = os.path.join(corpus_dir, "train.jsonl")
    n_train = sum(v["documents"] for v in corpus["stats"]["train"].values())
    log(f"[prepare-data] tokenizer: training byte-level BPE (vocab {settings['vocab_size']}) "
        f"on {n_train} train documents")
    tok = train_tokenizer((d.text for d in read_jsonl(train_jsonl)), os.path.join(out_dir, "tokenizer"),
                          settings["vocab_size"], length=n_train)
    timings["tokenizer_s"] = round(time.time() - t1, 2)

    t2 = time.time()
    prefix = corpus_prefix(out_dir)
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    write_domain_names(os.path.dirname(prefix), DOMAINS)
    balanced = held_out_tokens_per_domain(corpus_dir, tok)
    log(f"[prepare-data] held-out splits: {balanced} tokens per domain each")
    indexed = {}
    for split in SPLITS:
        log(f"[prepare-data] indexed: tokenizing the {split} split")
        stats = write_indexed_dataset(
            read_jsonl(os.path.join(corpus_dir, f"{split}.jsonl")), tok, split_prefix(prefix, split), DOMAINS,
            max_tokens_per_domain=None if split == "train" else balanced,
        )
        indexed[split] = {
            "prefix": os.path.relpath(split_prefix(prefix, split), out_dir),
            "documents": sum(s["documents"] for s in stats.values()),
            "tokens": sum(s["tokens"] for s in stats.values()),
            "per_domain": stats,
        }
    timings["indexed_s"] = round(time.time() - t2, 2)

    files = {}
    for root, _, names in os.walk(out_dir):
        for name in sorted(names):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, out_dir).replace(os.sep, "/")
            files[rel] = {"sha256": sha256_file(path), "bytes": os.path.getsize(path)}
    timings["total_s"] = round(time.time() - t0, 2)
    manifest = {
        "key": _build_key(settings),
        "created_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "timings": timings,
        "domains": list(DOMAINS),
        "corpus_prefix": os.path.relpath(prefix, out_dir),
        "corpus": {"stats": corpus["stats"], "cut_documents": corpus["cut_documents"]},
        "held_out_tokens_per_domain": balanced,
        "tokenizer": tokenizer_summary(tok),
        "indexed": indexed,
        "files": dict(sorted(files.items())),
    }
    tmp = os.path.join(out_dir, MANIFEST + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    os.replace(tmp, os.path.join(out_dir, MANIFEST))
    return manifest


def prepare(out: str, settings: dict, force: bool = False, log=print) -> dict:
    """Reuse ``out`` when its manifest matches ``settings`` and verifies; else build atomically.

    Returns the manifest, with ``"reused": True/False`` added (not stored)."""
    from megatron_moe_spec.data.corpus import check_sources

    out = os.path.abspath(out)
    _check_output(out)
    check_sources()
    key = _build_key(settings)
    manifest = read_manifest(out)
    if manifest is not None and not force:
        if manifest.get("key") != key:
            log(f"[prepare-data] {out}: settings or sources changed, rebuilding")
        else:
            problem = verify_files(out, manifest)
            if problem is None:
                log(f"[prepare-data] {out} is up to date (manifest matches, checksums verified): reused")
                return dict(manifest, reused=True)
            log(f"[prepare-data] {out}: {problem}, rebuilding")

    parent, base = os.path.split(out)
    tmp = tempfile.mkdtemp(prefix=f".{base}.partial-", dir=parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the result is an ordinary folder
        manifest = build(tmp, settings, log)
        if os.path.isdir(out):
            old = tempfile.mkdtemp(prefix=f".{base}.old-", dir=parent)
            os.rename(out, os.path.join(old, base))
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    t = manifest["timings"]["total_s"]
    tokens = {s: v["tokens"] for s, v in manifest["indexed"].items()}
    log(f"[prepare-data] wrote {out} in {t:.1f} s; tokens per split: {tokens}")
    return dict(manifest, reused=False)


def run(args) -> int:
    from megatron_moe_spec.data.corpus import MissingDependencyError

    try:
        settings = _settings(args)
        prepare(args.output, settings, force=getattr(args, "force", False))
    except (UsageError, MissingDependencyError) as err:
        print(f"[prepare-data] error: {err}", file=sys.stderr)
        return 2
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_moe_spec.commands.prepare_data", description=HELP)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
