"""What the rest of llamalab needs from a tokenizer, as a :class:`typing.Protocol`.

:class:`llamalab.tokenization.tokenizer.Tokenizer` is the implementation llamalab builds (from
tokenizer.json, sentencepiece files or GGUF metadata); anything with these members — a wrapper around
another library's tokenizer, a test double — can be passed wherever a tokenizer is taken.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class TokenizerProtocol(Protocol):
    vocab_size: int
    bos_token_id: int | None
    eos_token_id: int | None
    stop_token_ids: list[int]  # every id that ends a generation (EOS, <|im_end|>, <|eot_id|>, ...)

    def encode(self, text: str, add_bos: bool | None = None, add_eos: bool | None = None) -> list[int]: ...

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str: ...

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tokenize: bool = False) -> str | list[int]: ...
