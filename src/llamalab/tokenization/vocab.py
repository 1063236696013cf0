"""What the tokenizer backends share: GGUF / SentencePiece token types and adding typed tokens to a backend."""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer

SPIECE_SPACE = "\u2581"  # "▁"

# token types, as GGUF's tokenizer.ggml.token_type and SentencePiece's ModelProto store them
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6


def first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e).strip() else type(e).__name__


def add_typed_tokens(tok: HFTokenizer, pieces: Sequence[str], types: Sequence[int],
                      special_types: tuple[int, ...]) -> HFTokenizer:
    """Register the vocabulary's special (control) and user-defined pieces as added tokens."""
    tok.add_special_tokens([AddedToken(pieces[i], special=True, normalized=False)
                            for i, t in enumerate(types) if t in special_types])
    user = [AddedToken(pieces[i], special=False, normalized=False) for i, t in enumerate(types)
            if t == TOKEN_USER_DEFINED]
    if user:
        tok.add_tokens(user)
    return tok
