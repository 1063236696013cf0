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
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import processors

from llamalab.config import describe
from llamalab.errors import TokenizerError
from llamalab.jsonio import parse_json
from llamalab.tokenization.sentencepiece import spm_backend, spm_pieces, spm_specs
from llamalab.tokenization.vocab import (
    first_line,
)

# End-of-turn / end-of-text tokens that stop generation when they are in the vocabulary.
STOP_TOKEN_NAMES = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end_of_text|>", "<|endoftext|>", "<|end|>",
                    "<end_of_turn>", "</s>")


# GGUF token types (llama.cpp's llama_token_type)


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
        # (imported here: jinja2 takes ~0.15 s to import, which a load that never renders a chat need not pay)
        from llamalab.tokenization.chat_template import render_chat_template

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


def as_id_list(v: Any) -> list[int]:
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
    stop_ids = as_id_list(cfg.get("llamalab_stop_token_ids"))
    for extra in ("generation_config.json", "config.json"):
        stop_ids += as_id_list(_read_json(directory / extra).get("eos_token_id"))
    kwargs: dict[str, Any] = dict(chat_template=template, extra_stop_ids=stop_ids,
                                  pad_token=_token_str(cfg.get("pad_token")),
                                  add_eos=bool(cfg.get("add_eos_token", False)))
    bos, eos = _token_str(cfg.get("bos_token")), _token_str(cfg.get("eos_token"))
    if tj.exists():
        try:
            backend = HFTokenizer.from_file(str(tj))
        except Exception as e:  # noqa: BLE001 - the tokenizers library's errors, in one line
            raise TokenizerError(f"cannot read {tj}: {first_line(e)}") from None
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


def _load_sentencepiece(path: Path, bos: str | None, eos: str | None, cfg: dict[str, Any],
                        kwargs: dict[str, Any]) -> Tokenizer:
    import sentencepiece as spm

    data = path.read_bytes()
    try:
        sp = spm.SentencePieceProcessor(model_proto=data)
    except Exception as e:  # noqa: BLE001
        raise TokenizerError(f"cannot read sentencepiece model {path}: {first_line(e)}") from None
    trainer, normalizer = spm_specs(data)
    model_type = {1: "unigram", 2: "bpe"}.get(trainer.get(3, 1), "unsupported")
    if model_type == "unsupported":
        raise TokenizerError(f"{path}: only BPE and unigram sentencepiece models are supported")
    add_dummy_prefix = bool(normalizer.get(3, 1))
    try:
        pieces, scores, types = spm_pieces(data)
    except UnicodeDecodeError:
        raise TokenizerError(f"sentencepiece model {path} has a piece that is not valid UTF-8") from None
    if not pieces or len(pieces) != sp.get_piece_size():
        raise TokenizerError(f"cannot read the pieces of sentencepiece model {path}")
    try:
        backend = spm_backend(pieces, scores, types, add_dummy_prefix=add_dummy_prefix, model_type=model_type)
    except Exception as e:  # noqa: BLE001 - the tokenizers library refuses an inconsistent vocabulary
        raise TokenizerError(f"sentencepiece model {path} is inconsistent: {first_line(e)}") from None
    unk = sp.id_to_piece(sp.unk_id()) if sp.unk_id() >= 0 else None
    bos = bos or (sp.id_to_piece(sp.bos_id()) if sp.bos_id() >= 0 else None)
    eos = eos or (sp.id_to_piece(sp.eos_id()) if sp.eos_id() >= 0 else None)
    add_bos = cfg.get("add_bos_token", True)
    return Tokenizer(backend, bos_token=bos, eos_token=eos, unk_token=unk, add_bos=bool(add_bos),
                     kind="spm" if model_type == "bpe" else "unigram", scores=scores, **kwargs)
