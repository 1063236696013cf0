"""Tokenizers: one `Tokenizer` class over an HF `tokenizers` backend, whatever the source.

Sources
* ``tokenizer.json`` (+ ``tokenizer_config.json``, ``chat_template.jinja``, ``generation_config.json``),
* ``tokenizer.model`` (SentencePiece, Llama-2 style), converted to an equivalent `tokenizers` model:
  SentencePiece BPE merges the adjacent pair whose merged piece has the highest score; a BPE model whose
  merge ranks are the pieces sorted by score does the same. Spaces become ``▁`` (plus a dummy prefix),
  unknown characters fall back to ``<0xNN>`` byte pieces,
* GGUF metadata (``tokenizer.ggml.*``): byte-level BPE (``model == "gpt2"``: tokens + merges, with the
  pre-tokenizer named by ``tokenizer.ggml.pre``) or SentencePiece-style vocabularies (``model == "llama"``:
  tokens + scores + token types). :func:`gguf_metadata` is the inverse, for GGUF export.

BOS policy: ``encode(text)`` adds exactly one BOS when the model wants one (``add_bos``), never a second
one when the text (e.g. a rendered chat template) already starts with it. Stop tokens are every EOS id
plus the end-of-turn tokens found in the vocabulary (``<|eot_id|>``, ``<|im_end|>``, ...).
Chat templates are rendered with jinja2 the way transformers does (sandboxed, ``trim_blocks``,
``lstrip_blocks``, ``raise_exception``, ``tojson``, ``strftime_now``), within a step and size budget
(:mod:`llamalab.tokenization.chat_template`).
"""

from __future__ import annotations

import json
import re
import struct
import warnings
from collections.abc import Iterable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from llamalab.config import describe
from llamalab.errors import TokenizerError
from llamalab.jsonio import parse_json
from llamalab.tokenization.chat_template import render_chat_template

# End-of-turn / end-of-text tokens that stop generation when they are in the vocabulary.
STOP_TOKEN_NAMES = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end_of_text|>", "<|endoftext|>", "<|end|>",
                    "<end_of_turn>", "</s>")

SPIECE_SPACE = "\u2581"  # "▁"

# GGUF token types (llama.cpp's llama_token_type)
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6


class Tokenizer:
    """Text <-> token ids, BOS/EOS policy, stop tokens and the chat template of one model."""

    def __init__(self, backend: HFTokenizer, *, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None, unk_token: str | None = None, chat_template: str | None = None,
                 add_bos: bool = False, add_eos: bool = False, extra_stop_tokens: Iterable[str] = (),
                 extra_stop_ids: Iterable[int] = (), kind: str = "bpe", pre: str | None = None,
                 scores: Sequence[float] | None = None) -> None:
        self.backend = backend
        self.scores = list(scores) if scores is not None else None  # sentencepiece scores, when known
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.pad_token = pad_token
        self.unk_token = unk_token
        self.chat_template = chat_template
        self.add_bos = bool(add_bos)
        self.add_eos = bool(add_eos)
        self.kind = kind  # "bpe" (byte-level), "spm" (sentencepiece-style BPE), "unigram", ...
        self.pre = pre  # GGUF pre-tokenizer name, when known
        self.bos_token_id = self._id_of(bos_token, "bos_token")
        self.eos_token_id = self._id_of(eos_token, "eos_token")
        self.pad_token_id = self._id_of(pad_token, "pad_token")
        stops: list[int] = []
        candidates = [self.eos_token_id, *extra_stop_ids]
        candidates += [self.backend.token_to_id(t) for t in (*extra_stop_tokens, *STOP_TOKEN_NAMES)]
        for i in candidates:
            if i is not None and i not in stops and 0 <= i < self.vocab_size:
                stops.append(int(i))
        self.stop_token_ids: list[int] = stops

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_hf(cls, backend: HFTokenizer, bos_token: str | None = None, eos_token: str | None = None,
                chat_template: str | None = None, add_bos: bool = False,
                extra_stop_tokens: Iterable[str] = (), **kwargs: Any) -> Tokenizer:
        return cls(backend, bos_token=bos_token, eos_token=eos_token, chat_template=chat_template,
                   add_bos=add_bos, extra_stop_tokens=extra_stop_tokens, **kwargs)

    def _id_of(self, token: str | None, what: str) -> int | None:
        if token is None:
            return None
        i = self.backend.token_to_id(token)
        if i is None:
            raise TokenizerError(f"{what} {token!r} is not in the vocabulary")
        return i

    # ------------------------------------------------------------------ basic API
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_bos: bool | None = None, add_eos: bool | None = None) -> list[int]:
        """Token ids of `text`. ``add_bos=None`` follows the model's default; never a double BOS."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        want_bos = self.add_bos if add_bos is None else add_bos
        if want_bos and self.bos_token_id is not None and not (ids and ids[0] == self.bos_token_id):
            ids.insert(0, self.bos_token_id)
        want_eos = self.add_eos if add_eos is None else add_eos
        if want_eos and self.eos_token_id is not None:
            ids.append(self.eos_token_id)
        return ids

    def encode_batch(self, texts: Sequence[str], add_bos: bool | None = None) -> list[list[int]]:
        return [self.encode(t, add_bos=add_bos) for t in texts]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(int(i))

    def token_to_id(self, s: str) -> int | None:
        return self.backend.token_to_id(s)

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    @property
    def special_token_ids(self) -> set[int]:
        return {i for i, t in self.backend.get_added_tokens_decoder().items() if t.special}

    def __repr__(self) -> str:
        return (f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, bos={self.bos_token!r}, "
                f"eos={self.eos_token!r}, add_bos={self.add_bos}, stop_token_ids={self.stop_token_ids})")

    # ------------------------------------------------------------------ chat
    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tokenize: bool = False, **extra: Any) -> str | list[int]:
        """Render `messages` ([{"role": ..., "content": ...}]) with the model's jinja chat template."""
        if not self.chat_template:
            raise TokenizerError("this tokenizer has no chat template")
        text = render_chat_template(
            self.chat_template, messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "", pad_token=self.pad_token or "",
            unk_token=self.unk_token or "", **extra)
        return self.encode(text) if tokenize else text

    # ------------------------------------------------------------------ saving
    def save(self, directory: str | Path) -> Path:
        """Write tokenizer.json + tokenizer_config.json (+ chat_template.jinja) loadable by transformers."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        backend = HFTokenizer.from_str(self.backend.to_str())
        if self.add_bos and self.bos_token is not None:
            backend.post_processor = processors.TemplateProcessing(
                single=f"{self.bos_token}:0 $A:0", pair=f"{self.bos_token}:0 $A:0 {self.bos_token}:1 $B:1",
                special_tokens=[(self.bos_token, self.bos_token_id)])
        backend.save(str(directory / "tokenizer.json"))
        cfg: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token, "eos_token": self.eos_token, "add_bos_token": self.add_bos,
            "add_eos_token": self.add_eos, "clean_up_tokenization_spaces": False,
            "llamalab_kind": self.kind,
        }
        if self.pad_token is not None:
            cfg["pad_token"] = self.pad_token
        if self.unk_token is not None:
            cfg["unk_token"] = self.unk_token
        if self.pre is not None:
            cfg["llamalab_gguf_pre"] = self.pre
        extra_stops = [i for i in self.stop_token_ids if i != self.eos_token_id]
        if extra_stops:
            cfg["llamalab_stop_token_ids"] = extra_stops
        if self.chat_template:
            cfg["chat_template"] = self.chat_template
        (directory / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
        return directory


# ---------------------------------------------------------------------------------------------- loading
def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e).strip() else type(e).__name__


def _token_str(v: Any) -> str | None:
    """tokenizer_config.json stores special tokens as strings or as AddedToken dicts."""
    if isinstance(v, dict):
        return v.get("content")
    return v if isinstance(v, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    d = parse_json(path.read_bytes(), str(path), TokenizerError)
    return d if isinstance(d, dict) else {}


def _as_id_list(v: Any) -> list[int]:
    if isinstance(v, int) and not isinstance(v, bool):
        return [v]
    if isinstance(v, list):
        return [i for i in v if isinstance(i, int)]
    return []


def load_tokenizer(directory: str | Path) -> Tokenizer | None:
    """The tokenizer stored in a model directory, or None when it holds none."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    tj, spm_file = directory / "tokenizer.json", directory / "tokenizer.model"
    if not tj.exists() and not spm_file.exists():
        return None
    cfg = _read_json(directory / "tokenizer_config.json")
    template = cfg.get("chat_template")
    if (directory / "chat_template.jinja").exists():
        try:
            template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise TokenizerError(f"{directory / 'chat_template.jinja'} is not valid UTF-8 (byte {e.start})") from None
    elif (directory / "chat_template.json").exists():
        template = _read_json(directory / "chat_template.json").get("chat_template", template)
    if isinstance(template, list):  # named templates: take "default"
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if template is not None and not isinstance(template, str):
        raise TokenizerError(f"{directory}: chat_template must be a string, got {describe(template)}")
    for key in ("add_bos_token", "add_eos_token"):
        if cfg.get(key) is not None and not isinstance(cfg[key], bool):
            raise TokenizerError(f"{directory}/tokenizer_config.json: {key} must be true or false, got "
                                 f"{describe(cfg[key])}")
    for key in ("llamalab_kind", "llamalab_gguf_pre"):
        if cfg.get(key) is not None and not isinstance(cfg[key], str):
            raise TokenizerError(f"{directory}/tokenizer_config.json: {key} must be a string, got {describe(cfg[key])}")
    stop_ids = _as_id_list(cfg.get("llamalab_stop_token_ids"))
    for extra in ("generation_config.json", "config.json"):
        stop_ids += _as_id_list(_read_json(directory / extra).get("eos_token_id"))
    kwargs: dict[str, Any] = dict(chat_template=template, extra_stop_ids=stop_ids,
                                  pad_token=_token_str(cfg.get("pad_token")),
                                  add_eos=bool(cfg.get("add_eos_token", False)))
    bos, eos = _token_str(cfg.get("bos_token")), _token_str(cfg.get("eos_token"))
    if tj.exists():
        try:
            backend = HFTokenizer.from_file(str(tj))
        except Exception as e:  # noqa: BLE001 - the tokenizers library's errors, in one line
            raise TokenizerError(f"cannot read {tj}: {_first_line(e)}") from None
        add_bos = cfg.get("add_bos_token")
        if add_bos is None:  # no explicit setting: does the post-processor add BOS?
            probe = backend.encode("a", add_special_tokens=True).ids
            add_bos = bool(bos is not None and probe and probe[0] == backend.token_to_id(bos))
        kind = cfg.get("llamalab_kind") or _guess_kind(backend)
        tok = Tokenizer(backend, bos_token=bos, eos_token=eos, add_bos=bool(add_bos),
                        unk_token=_token_str(cfg.get("unk_token")), kind=kind, pre=cfg.get("llamalab_gguf_pre"),
                        **kwargs)
        return tok
    return _load_sentencepiece(spm_file, bos, eos, cfg, kwargs)


def _guess_kind(backend: HFTokenizer) -> str:
    spec = json.loads(backend.to_str())
    mtype = (spec.get("model") or {}).get("type")
    if mtype == "Unigram":
        return "unigram"
    if mtype == "BPE" and (spec.get("model") or {}).get("byte_fallback"):
        return "spm"
    return "bpe" if mtype == "BPE" else str(mtype).lower()


# ---------------------------------------------------------------------------------------------- sentencepiece
def _proto_fields(buf: bytes) -> Iterable[tuple[int, int, Any]]:
    """Minimal protobuf wire-format reader: yields (field number, wire type, value)."""
    i, n = 0, len(buf)

    def varint() -> int:
        nonlocal i
        shift = result = 0
        while True:
            if i >= n:
                raise TokenizerError("truncated sentencepiece model")
            b = buf[i]
            i += 1
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7

    while i < n:
        key = varint()
        field, wire = key >> 3, key & 7
        if wire == 0:
            yield field, wire, varint()
        elif wire == 1:
            yield field, wire, buf[i:i + 8]
            i += 8
        elif wire == 2:
            length = varint()
            yield field, wire, buf[i:i + length]
            i += length
        elif wire == 5:
            yield field, wire, buf[i:i + 4]
            i += 4
        else:
            raise TokenizerError(f"not a sentencepiece model (protobuf wire type {wire})")


def _spm_specs(data: bytes) -> tuple[dict[int, Any], dict[int, Any]]:
    """(trainer_spec, normalizer_spec) scalar fields of a sentencepiece ModelProto."""
    trainer: dict[int, Any] = {}
    normalizer: dict[int, Any] = {}
    for field, wire, value in _proto_fields(data):
        if field in (2, 3) and wire == 2:
            target = trainer if field == 2 else normalizer
            for f2, w2, v2 in _proto_fields(value):
                target[f2] = v2.decode("utf-8", "replace") if w2 == 2 else v2
    return trainer, normalizer


def _spm_pieces(data: bytes) -> tuple[list[str], list[float], list[int]]:
    """(pieces, scores, types) of a sentencepiece ModelProto; its piece types equal GGUF's token types."""
    pieces: list[str] = []
    scores: list[float] = []
    types: list[int] = []
    for field, wire, value in _proto_fields(data):
        if field == 1 and wire == 2:
            piece, score, ptype = "", 0.0, TOKEN_NORMAL
            for f2, w2, v2 in _proto_fields(value):
                if f2 == 1 and w2 == 2:
                    piece = v2.decode("utf-8")
                elif f2 == 2 and w2 == 5:
                    (score,) = struct.unpack("<f", v2)
                elif f2 == 3 and w2 == 0:
                    ptype = v2
            pieces.append(piece)
            scores.append(score)
            types.append(ptype)
    return pieces, scores, types


def _load_sentencepiece(path: Path, bos: str | None, eos: str | None, cfg: dict[str, Any],
                        kwargs: dict[str, Any]) -> Tokenizer:
    import sentencepiece as spm

    data = path.read_bytes()
    try:
        sp = spm.SentencePieceProcessor(model_proto=data)
    except Exception as e:  # noqa: BLE001
        raise TokenizerError(f"cannot read sentencepiece model {path}: {_first_line(e)}") from None
    trainer, normalizer = _spm_specs(data)
    model_type = {1: "unigram", 2: "bpe"}.get(trainer.get(3, 1), "unsupported")
    if model_type == "unsupported":
        raise TokenizerError(f"{path}: only BPE and unigram sentencepiece models are supported")
    add_dummy_prefix = bool(normalizer.get(3, 1))
    try:
        pieces, scores, types = _spm_pieces(data)
    except UnicodeDecodeError:
        raise TokenizerError(f"sentencepiece model {path} has a piece that is not valid UTF-8") from None
    if not pieces or len(pieces) != sp.get_piece_size():
        raise TokenizerError(f"cannot read the pieces of sentencepiece model {path}")
    try:
        backend = spm_backend(pieces, scores, types, add_dummy_prefix=add_dummy_prefix, model_type=model_type)
    except Exception as e:  # noqa: BLE001 - the tokenizers library refuses an inconsistent vocabulary
        raise TokenizerError(f"sentencepiece model {path} is inconsistent: {_first_line(e)}") from None
    unk = sp.id_to_piece(sp.unk_id()) if sp.unk_id() >= 0 else None
    bos = bos or (sp.id_to_piece(sp.bos_id()) if sp.bos_id() >= 0 else None)
    eos = eos or (sp.id_to_piece(sp.eos_id()) if sp.eos_id() >= 0 else None)
    add_bos = cfg.get("add_bos_token", True)
    return Tokenizer(backend, bos_token=bos, eos_token=eos, unk_token=unk, add_bos=bool(add_bos),
                     kind="spm" if model_type == "bpe" else "unigram", scores=scores, **kwargs)


def spm_backend(pieces: Sequence[str], scores: Sequence[float], types: Sequence[int], *,
                add_dummy_prefix: bool = True, model_type: str = "bpe") -> HFTokenizer:
    """A `tokenizers` equivalent of a SentencePiece model given its pieces, scores and token types."""
    vocab = {p: i for i, p in enumerate(pieces)}
    unk_id = next((i for i, t in enumerate(types) if t == TOKEN_UNKNOWN), None)
    has_bytes = any(t == TOKEN_BYTE for t in types)
    if model_type == "bpe":
        mergeable = {p: i for i, p in enumerate(pieces) if types[i] in (TOKEN_NORMAL, TOKEN_USER_DEFINED)}
        merges = []
        for piece, pid in mergeable.items():
            for k in range(1, len(piece)):
                left, right = piece[:k], piece[k:]
                if left in mergeable and right in mergeable:
                    merges.append((-scores[pid], pid, mergeable[left], mergeable[right], left, right))
        merges.sort()
        model = models.BPE(vocab=vocab, merges=[(m[4], m[5]) for m in merges],
                           unk_token=pieces[unk_id] if unk_id is not None else None, fuse_unk=True,
                           byte_fallback=has_bytes)
    else:
        model = models.Unigram([(p, float(s)) for p, s in zip(pieces, scores)], unk_id=unk_id,
                               byte_fallback=has_bytes)
    tok = HFTokenizer(model)
    norm = [normalizers.Replace(" ", SPIECE_SPACE)]
    if add_dummy_prefix:  # like llama.cpp: before every text fragment that starts the text or follows a
        norm.insert(0, normalizers.Prepend(SPIECE_SPACE))  # special token
    tok.normalizer = normalizers.Sequence(norm)
    dec = [decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_dummy_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(dec)
    return _add_typed_tokens(tok, pieces, types, special_types=(TOKEN_CONTROL, TOKEN_UNKNOWN))


# ---------------------------------------------------------------------------------------------- byte-level BPE
_GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                   r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _split_then_bytes(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """The `tokenizers` pre-tokenizer that matches llama.cpp's ``tokenizer.ggml.pre`` name."""
    if pre in ("smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva-7b"):
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ])
    if pre in ("llama-bpe", "llama3", "dbrx", "smaug-bpe"):
        return _split_then_bytes(_LLAMA3_PATTERN)
    if pre in ("qwen2", "deepseek-r1-qwen"):
        return _split_then_bytes(_QWEN2_PATTERN)
    if pre in ("gpt-2", "default", "gpt2", "phi-2", "jina-es", "jina-de", "mpt", "olmo"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    raise TokenizerError(f"unsupported GGUF pre-tokenizer {pre!r}; supported: {', '.join(KNOWN_PRE)}")


KNOWN_PRE = ("gpt-2", "default", "smollm", "starcoder", "refact", "llama-bpe", "dbrx", "smaug-bpe", "qwen2")


def detect_pre(backend: HFTokenizer) -> str | None:
    """The llama.cpp pre-tokenizer name whose `tokenizers` equivalent this backend uses (None if none)."""
    spec = json.loads(backend.to_str()).get("pre_tokenizer")
    canon = _canon(spec)
    for name in ("gpt-2", "smollm", "llama-bpe", "qwen2"):
        if _canon(json.loads(_pre_json(name))) == canon:
            return name
    return None


@cache
def _pre_json(name: str) -> str:
    t = HFTokenizer(models.BPE())
    t.pre_tokenizer = _pre_tokenizer(name)
    return json.dumps(json.loads(t.to_str())["pre_tokenizer"])


def _canon(spec: Any) -> Any:
    """Pre-tokenizer JSON without options that do not change the ids (offsets), single-item sequences flat."""
    if isinstance(spec, dict):
        if spec.get("type") == "Sequence" and len(spec.get("pretokenizers", [])) == 1:
            return _canon(spec["pretokenizers"][0])
        return {k: _canon(v) for k, v in spec.items() if k != "trim_offsets"}
    if isinstance(spec, list):
        return [_canon(x) for x in spec]
    return spec


def _add_typed_tokens(tok: HFTokenizer, pieces: Sequence[str], types: Sequence[int],
                      special_types: tuple[int, ...]) -> HFTokenizer:
    """Register the vocabulary's special (control) and user-defined pieces as added tokens."""
    tok.add_special_tokens([AddedToken(pieces[i], special=True, normalized=False)
                            for i, t in enumerate(types) if t in special_types])
    user = [AddedToken(pieces[i], special=False, normalized=False) for i, t in enumerate(types)
            if t == TOKEN_USER_DEFINED]
    if user:
        tok.add_tokens(user)
    return tok


def bpe_backend(tokens: Sequence[str], merges: Sequence[str], types: Sequence[int], pre: str) -> HFTokenizer:
    """A byte-level BPE `tokenizers` model from GGUF's tokens, merges ("a b") and token types."""
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = []
    for m in merges:
        a, sep, b = m.partition(" ")
        if not sep:
            raise TokenizerError(f"bad BPE merge {m!r} in GGUF metadata")
        pairs.append((a, b))
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _pre_tokenizer(pre)
    tok.decoder = decoders.ByteLevel()
    return _add_typed_tokens(tok, tokens, types, special_types=(TOKEN_CONTROL,))


# ---------------------------------------------------------------------------------------------- GGUF metadata
def _gguf_list(meta: dict[str, Any], key: str, kind: type, n: int | None, default: list | None = None) -> list:
    """A GGUF array (a list, or the numpy array the reader keeps numbers in) as a list of ``kind``,
    ``n`` long when given; a one-line TokenizerError when the file holds anything else."""
    v = meta.get(key)
    if v is None:
        if default is None:
            raise TokenizerError(f"GGUF tokenizer has no {key}")
        return default
    if kind is str:
        ok = isinstance(v, list) and all(isinstance(x, str) for x in v)
    else:
        v = np.asarray(v) if isinstance(v, (list, np.ndarray)) else None
        ok = v is not None and v.ndim == 1 and (v.dtype.kind in "iub" if kind is int else v.dtype.kind in "iuf")
        if ok and kind is float:
            ok = bool(np.isfinite(v).all())
        v = v.tolist() if ok else v
    if not ok:
        raise TokenizerError(f"GGUF metadata {key} must be an array of {kind.__name__}s, got {describe(v)}")
    if n is not None and len(v) != n:
        raise TokenizerError(f"GGUF metadata {key} has {len(v)} entries for {n} tokens")
    return v


def _gguf_flag(meta: dict[str, Any], key: str, default: bool) -> bool:
    v = meta.get(key, default)
    if not isinstance(v, (bool, np.bool_)):
        raise TokenizerError(f"GGUF metadata {key} must be true or false, got {describe(v)}")
    return bool(v)


def from_gguf_metadata(meta: dict[str, Any]) -> Tokenizer | None:
    """Rebuild the tokenizer from GGUF ``tokenizer.*`` metadata (None when the file has none)."""
    model = meta.get("tokenizer.ggml.model")
    if model is None or meta.get("tokenizer.ggml.tokens") is None:
        return None
    tokens = _gguf_list(meta, "tokenizer.ggml.tokens", str, None)
    n = len(tokens)
    types = _gguf_list(meta, "tokenizer.ggml.token_type", int, n, default=[TOKEN_NORMAL] * n)
    template = meta.get("tokenizer.chat_template")
    if template is not None and not isinstance(template, str):
        raise TokenizerError(f"GGUF metadata tokenizer.chat_template must be a string, got {describe(template)}")
    try:
        if model == "gpt2":
            merges = _gguf_list(meta, "tokenizer.ggml.merges", str, None)
            pre = meta.get("tokenizer.ggml.pre") or "default"
            if not isinstance(pre, str):
                raise TokenizerError(f"GGUF metadata tokenizer.ggml.pre must be a string, got {describe(pre)}")
            backend = bpe_backend(tokens, merges, types, pre)
            kind, default_add_bos, spm_scores = "bpe", False, None
        elif model == "llama":
            scores = _gguf_list(meta, "tokenizer.ggml.scores", float, n, default=[0.0] * n)
            backend = spm_backend(tokens, scores, types,
                                  add_dummy_prefix=_gguf_flag(meta, "tokenizer.ggml.add_space_prefix", True))
            kind, pre, default_add_bos = "spm", None, True
            spm_scores = scores
        else:
            raise TokenizerError(f"unsupported GGUF tokenizer model {describe(model)} (supported: gpt2, llama)")
    except TokenizerError:
        raise
    except Exception as e:  # noqa: BLE001 - the tokenizers library refuses an inconsistent vocabulary
        raise TokenizerError(f"GGUF tokenizer metadata is inconsistent: {_first_line(e)}"
                             ) from None

    def tok_at(key: str) -> str | None:
        i = meta.get(key)
        return tokens[i] if isinstance(i, int) and 0 <= i < n else None

    extra_ids = [i for i in _as_id_list(meta.get("tokenizer.ggml.eot_token_id"))
                 + _as_id_list(meta.get("tokenizer.ggml.eom_token_id")) if 0 <= i < n]
    return Tokenizer(backend, bos_token=tok_at("tokenizer.ggml.bos_token_id"),
                     eos_token=tok_at("tokenizer.ggml.eos_token_id"),
                     pad_token=tok_at("tokenizer.ggml.padding_token_id"),
                     unk_token=tok_at("tokenizer.ggml.unknown_token_id"),
                     chat_template=template,
                     add_bos=_gguf_flag(meta, "tokenizer.ggml.add_bos_token", default_add_bos),
                     add_eos=_gguf_flag(meta, "tokenizer.ggml.add_eos_token", False),
                     extra_stop_ids=extra_ids, kind=kind, pre=pre, scores=spm_scores)


def gguf_metadata(tok: Tokenizer) -> dict[str, Any]:
    """GGUF ``tokenizer.*`` metadata for `tok` (the inverse of :func:`from_gguf_metadata`)."""
    spec = json.loads(tok.backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise TokenizerError(f"GGUF export supports BPE tokenizers only, not {model.get('type')!r}")
    added = {int(i): t for i, t in tok.backend.get_added_tokens_decoder().items()}
    n = tok.vocab_size
    tokens = [tok.backend.id_to_token(i) for i in range(n)]
    if any(t is None for t in tokens):
        raise TokenizerError("GGUF export needs contiguous token ids (the vocabulary has holes)")
    types = []
    byte_re = re.compile(r"^<0x[0-9A-F]{2}>$")
    for i, t in enumerate(tokens):
        if i in added:
            types.append(TOKEN_CONTROL if added[i].special else TOKEN_USER_DEFINED)
        elif tok.kind == "spm" and byte_re.match(t):
            types.append(TOKEN_BYTE)
        else:
            types.append(TOKEN_NORMAL)
    meta: dict[str, Any] = {}
    if model.get("byte_fallback") or tok.kind == "spm":
        unk = model.get("unk_token")
        if unk is not None and unk in tokens:
            types[tokens.index(unk)] = TOKEN_UNKNOWN
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        if tok.scores is not None and len(tok.scores) == n:  # the original sentencepiece scores
            scores = [float(x) for x in tok.scores]
        else:  # higher = merged earlier; pieces that no merge makes get the lowest scores
            rank: dict[str, int] = {}
            for r, m in enumerate(merges):
                rank.setdefault("".join(m.split(" ")), r)
            scores = [-float(rank.get(t, len(merges) + i)) if types[i] == TOKEN_NORMAL else 0.0
                      for i, t in enumerate(tokens)]
        normalizer = json.dumps(spec.get("normalizer"))
        meta["tokenizer.ggml.model"] = "llama"
        meta["tokenizer.ggml.scores"] = scores
        pre_spec = json.dumps(spec.get("pre_tokenizer"))
        meta["tokenizer.ggml.add_space_prefix"] = "Prepend" in normalizer or any(
            f'"prepend_scheme": "{x}"' in pre_spec for x in ("first", "always"))
    else:
        pre = tok.pre or detect_pre(tok.backend)
        if pre is None:
            warnings.warn("unknown pre-tokenizer; writing tokenizer.ggml.pre = 'default' (GPT-2 regex)",
                          stacklevel=2)
            pre = "default"
        meta["tokenizer.ggml.model"] = "gpt2"
        meta["tokenizer.ggml.pre"] = pre
        meta["tokenizer.ggml.merges"] = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    meta["tokenizer.ggml.tokens"] = tokens
    meta["tokenizer.ggml.token_type"] = types
    for key, tid in (("bos", tok.bos_token_id), ("eos", tok.eos_token_id), ("padding", tok.pad_token_id),
                     ("unknown", tok.token_to_id(tok.unk_token) if tok.unk_token else None)):
        if tid is not None:
            meta[f"tokenizer.ggml.{key}_token_id"] = int(tid)
    eot = [i for i in tok.stop_token_ids if i != tok.eos_token_id]
    if eot:
        meta["tokenizer.ggml.eot_token_id"] = int(eot[0])
    meta["tokenizer.ggml.add_bos_token"] = tok.add_bos
    meta["tokenizer.ggml.add_eos_token"] = tok.add_eos
    if tok.chat_template:
        meta["tokenizer.chat_template"] = tok.chat_template
    return meta
