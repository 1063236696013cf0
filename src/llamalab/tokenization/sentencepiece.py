"""SentencePiece ``tokenizer.model`` files (Llama-2 style) as `tokenizers` backends, without the sentencepiece
library: the protobuf is read directly (pieces, scores, types, normaliser flags), then converted to an
equivalent BPE model — SentencePiece BPE merges the adjacent pair whose merged piece has the highest score,
and a BPE model whose merge ranks are the pieces sorted by score does the same. Spaces become ``▁`` (plus a
dummy prefix), unknown characters fall back to ``<0xNN>`` byte pieces. Also used for GGUF's ``llama``
vocabularies (tokens + scores + types).
"""


from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from typing import Any

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers

from llamalab.errors import TokenizerError
from llamalab.tokenization.vocab import (
    SPIECE_SPACE,
    TOKEN_BYTE,
    TOKEN_CONTROL,
    TOKEN_NORMAL,
    TOKEN_UNKNOWN,
    TOKEN_USER_DEFINED,
    add_typed_tokens,
)


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


def spm_specs(data: bytes) -> tuple[dict[int, Any], dict[int, Any]]:
    """(trainer_spec, normalizer_spec) scalar fields of a sentencepiece ModelProto."""
    trainer: dict[int, Any] = {}
    normalizer: dict[int, Any] = {}
    for field, wire, value in _proto_fields(data):
        if field in (2, 3) and wire == 2:
            target = trainer if field == 2 else normalizer
            for f2, w2, v2 in _proto_fields(value):
                target[f2] = v2.decode("utf-8", "replace") if w2 == 2 else v2
    return trainer, normalizer


def spm_pieces(data: bytes) -> tuple[list[str], list[float], list[int]]:
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
    return add_typed_tokens(tok, pieces, types, special_types=(TOKEN_CONTROL, TOKEN_UNKNOWN))


