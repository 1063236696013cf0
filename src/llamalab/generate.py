"""Text generation: prefill, decode, stops, streaming, ragged batches, speculative decoding.

Autoregressive decoding factorises p(y | x) = ∏_t p(y_t | x, y_<t). Each prompt is **prefilled**
(its keys/values written into a preallocated :class:`~llamalab.components.attention.KVCache`, in
chunks so long prompts never build a huge attention matrix), then each **decode** step feeds one
token per row and reads the rest from the cache. Rows keep their own cache length, so prompts of
different lengths batch without padding, and a finished row simply drops out of the batch.

Decode at batch 1 is memory-bound: every step reads all weights once, so tokens/s ≤ bandwidth /
weight bytes. :class:`FastDecoder` prepares the weights once for that regime (fused q|k|v and
gate|up matrices, stored transposed and contiguous, cos/sin tables, no per-step mask building) and
runs the one-token step over the same cache the model's own forward fills during prefill.

Text comes out through an incremental detokenizer that only releases text once it is complete
UTF-8 (a multi-byte character split across byte-level tokens is held back until its last byte),
and a stop-string matcher that holds back any tail that could still become a stop string.

Public API::

    llamalab.generate(model, tok, "Once upon a time", max_new_tokens=64, temperature=0.8, seed=0) -> str
    llamalab.generate(model, tok, ["a", "bc"]) -> list[str]         # ragged batch
    for piece in llamalab.stream(model, tok, [{"role": "user", "content": "Hi"}]): print(piece, end="")
    complete(model, tok, prompts, ...) -> list[Completion]           # tokens, finish reasons, logprobs
"""

from __future__ import annotations

import sys
import time
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from llamalab.components.attention import KVCache
from llamalab.errors import LlamalabError
from llamalab.sampling import SamplingParams, TokenCounts, sample

PREFILL_CHUNK = 512

Prompt = str | Sequence[int] | Sequence[dict[str, Any]] | torch.Tensor

_SAMPLING_FIELDS = {f for f in SamplingParams.__dataclass_fields__}


@dataclass
class Completion:
    """One finished sequence."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (stop token or stop string) or "length"
    prompt_tokens: int
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    stats: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------- text pieces
class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas that are always whole characters.

    ``decode(ids[prefix:])`` minus ``decode(ids[prefix:read])``: decoding a short window keeps the
    cost per token constant and lets SentencePiece-style leading spaces come out right. A window
    ending in U+FFFD (an incomplete UTF-8 sequence of byte tokens) releases nothing yet.
    """

    def __init__(self, tok: Any, skip_special_tokens: bool = True) -> None:
        self.tok = tok
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip) if ids else ""

    def add(self, token: int) -> str:
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (at the end of generation)."""
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return after[len(before):] if len(after) > len(before) else ""


class StopStrings:
    """Finds user stop strings in streamed text, also when they arrive split across pieces.

    Text that could be the start of a stop string is held back until it is known not to be one, so
    a stop string never leaks into the output.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was hit)."""
        if not self.stops:
            return piece, False
        buf = self.held + piece
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return buf[:min(hits)], True
        keep = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:n]):
                    keep = n
                    break
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


# --------------------------------------------------------------------------- the fast decode step
class FastDecoder:
    """A one-token decode step prepared for memory-bound batch-1 inference.

    Built once from a :class:`~llamalab.model.Llama`; it shares the model's parameters' values but
    stores each layer's matrices fused — ``W_qkv`` (q+k+v rows) and ``W_gu`` (gate+up rows) — so a
    step is 4 matrix-vector products per layer instead of 7, plus cos/sin tables indexed by position.
    It reads and writes the same :class:`KVCache` the model's forward uses (prefill goes through the
    model), and its logits equal the model's up to float rounding.

    Two kernels for the products:

    * eager (default): weights stored transposed and contiguous, ``x @ Wᵀ`` — stock PyTorch's gemv on
      that layout reads weights faster than ``F.linear`` on the original one;
    * ``compile=True``: at batch 1 each layer is two ``torch.compile``-d functions (norm → q|k|v →
      RoPE; o-proj → residual → norm → gate|up → SwiGLU → down → residual) in which every product is
      written as the reduction ``Σ_j W[i, j] · x[j]`` over the original row-major weight, accumulated
      in float32. Inductor turns each into one vectorised loop that streams the weight once, fused with
      the element-wise work around it. Compiling takes a while (seconds to a minute, once per shape);
      it pays for long generations.

    ``decode_dtype`` (opt-in) stores the prepared weights in another dtype than the model's; float16
    halves the bytes a float32 model's step reads and lets a bfloat16 model use PyTorch's fast
    float16 gemv (bfloat16 → float16 is exact for every weight in [6e-5, 65504], since float16 has
    more mantissa bits; larger values are refused). Activations are cast to it for each product only;
    the residual stream, norms, RoPE and attention stay in the model's dtype.
    """

    def __init__(self, model: torch.nn.Module, max_seq_len: int | None = None, compile: bool = False,
                 decode_dtype: torch.dtype | str | None = None) -> None:
        cfg = model.config
        if getattr(cfg, "norm_type", "rmsnorm") != "rmsnorm":
            raise LlamalabError("FastDecoder supports RMSNorm models only")
        self.config = cfg
        self.dtype = model.dtype
        self.compiled = compile
        self.weight_dtype = resolve_decode_dtype(decode_dtype)
        store = self.weight_dtype not in (None, self.dtype)
        # eager kernel: x @ Wᵀ pre-transposed for the model's own dtype / float32; float16 storage goes
        # through F.linear on the row-major weight, the layout PyTorch's fast fp16 gemv wants
        self.transposed = not compile and (not store or self.weight_dtype == torch.float32)
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.inter = cfg.intermediate_size

        def prep(*ws: torch.Tensor) -> torch.Tensor:
            w = torch.cat([w.detach() for w in ws], 0) if len(ws) > 1 else ws[0].detach()
            if store:
                w = _cast_weight(w, self.weight_dtype)
            return w.t().contiguous() if self.transposed else w.contiguous()

        self.layers = []
        for layer in model.layers:
            a, m = layer.self_attn, layer.mlp
            self.layers.append((
                layer.input_layernorm.weight.detach(), prep(a.q_proj.weight, a.k_proj.weight, a.v_proj.weight),
                prep(a.o_proj.weight), layer.post_attention_layernorm.weight.detach(),
                prep(m.gate_proj.weight, m.up_proj.weight), prep(m.down_proj.weight)))
        self.eps = cfg.rms_norm_eps
        self.embed = model.embed_tokens.weight.detach()
        self.norm = model.norm.weight.detach()
        self.lm_head = prep(model.lm_head.weight)
        n = max_seq_len or cfg.max_position_embeddings
        pos = torch.arange(n, device=self.embed.device)[None]
        cos, sin = model.rotary(pos)
        self.cos, self.sin = cos[0].contiguous(), sin[0].contiguous()  # float32, as the model rotates
        self.max_seq_len = n
        self.scale = 1.0 / self.head_dim ** 0.5
        if compile:
            self._pre = torch.compile(_pre_attention, dynamic=False)
            self._post = torch.compile(_post_attention, dynamic=False)
            self._down_pre = torch.compile(_mlp_out_pre_attention, dynamic=False)
            self._down_head = torch.compile(_mlp_out_head, dynamic=False)

    def _norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return _rmsnorm(x, w, self.eps)

    def _mm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.transposed:
            return x @ w
        if w.dtype != x.dtype:  # weights stored in decode_dtype: cast the (tiny) activation, not the weight
            return F.linear(x.to(w.dtype), w).to(x.dtype)
        return F.linear(x, w)

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, cache: KVCache, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, V) float32 for one new token per row; appends to the cache rows (default all)."""
        B = tokens.shape[0]
        if rows is None:
            rows = torch.arange(B, device=tokens.device)
        lengths = cache.lengths[rows]  # slot of the new token = its position (no padding)
        hi = int(lengths.max()) + 1
        if hi > min(self.max_seq_len, cache.max_seq_len):
            raise LlamalabError(f"context full: {hi} tokens exceed the {cache.max_seq_len}-token cache")
        uniform = B == 1 or bool((lengths == lengths[0]).all())
        mask = None
        if not uniform:
            mask = (torch.arange(hi, device=tokens.device)[None] <= lengths[:, None])[:, None, None]
        cos, sin = self.cos[lengths][:, None], self.sin[lengths][:, None]  # (B, 1, D)
        h = self.embed[tokens.view(B)]
        H, K, D = self.n_heads, self.n_kv, self.head_dim
        sizes = (self.q_size, self.kv_size, D // 2)
        fused = self.compiled and B == 1
        batch_slice = None
        if B == 1 or (B == cache.batch_size and bool((rows == torch.arange(B, device=rows.device)).all())):
            r0 = int(rows[0])
            batch_slice = slice(r0, r0 + B)
        n_layers = len(self.layers)
        if fused:  # two compiled calls per layer: [down → norm → q|k|v → RoPE] and [o → norm → gate|up]
            q, k, v, _ = self._pre(h, self.layers[0][0], self.layers[0][1], cos, sin, self.eps, sizes)
        for i, (w_in, w_qkv, w_o, w_post, w_gu, w_down) in enumerate(self.layers):
            if not fused:
                q, k, v = _split_rope(self._mm(self._norm(h, w_in), w_qkv), cos, sin, sizes)
            q, k, v = q.view(B, H, D), k.view(B, K, D), v.view(B, K, D)
            ck, cv = cache.k[i], cache.v[i]
            if batch_slice is not None and uniform:
                s = int(lengths[0])
                ck[batch_slice, :, s] = k.to(ck.dtype)
                cv[batch_slice, :, s] = v.to(cv.dtype)
                kk, vv = ck[batch_slice, :, :hi], cv[batch_slice, :, :hi]
            else:
                ck[rows, :, lengths] = k.to(ck.dtype)
                cv[rows, :, lengths] = v.to(cv.dtype)
                kk, vv = ck[rows, :, :hi], cv[rows, :, :hi]
            # queries grouped per kv head: (B, K, n_rep, D) against (B, K, S, D); no K/V copies
            qg = q.view(B, K, H // K, D)
            o = F.scaled_dot_product_attention(qg, kk.to(q.dtype), vv.to(q.dtype), attn_mask=mask, scale=self.scale)
            o = o.reshape(B, H * D)
            if fused:
                h, act, _ = self._post(h, o, w_o, w_post, w_gu, self.eps, self.inter)
                if i + 1 < n_layers:
                    nxt = self.layers[i + 1]
                    h, q, k, v, _ = self._down_pre(h, act, w_down, nxt[0], nxt[1], cos, sin, self.eps, sizes)
                else:
                    logits = self._down_head(h, act, w_down, self.norm, self.lm_head, self.eps)[0]
            else:
                h = h + self._mm(o, w_o)
                gu = self._mm(self._norm(h, w_post), w_gu)
                h = h + self._mm(F.silu(gu[:, :self.inter]) * gu[:, self.inter:], w_down)
        cache.lengths[rows] += 1
        cache.valid[rows, lengths] = True
        if fused:
            return logits
        return self._mm(self._norm(h, self.norm), self.lm_head).float()


DECODE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def resolve_decode_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``decode_dtype`` as a torch dtype (None: the model's own); one-line error for anything else."""
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in DECODE_DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DECODE_DTYPES:
        return DECODE_DTYPES[dtype.removeprefix("torch.")]
    raise LlamalabError(f"decode_dtype must be one of {', '.join(DECODE_DTYPES)}, got {dtype!r}")


def _cast_weight(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A weight in the decode storage dtype, refusing values that would overflow it (float16: ±65504)."""
    limit = torch.finfo(dtype).max
    if w.is_floating_point() and w.numel() and float(w.abs().max()) > limit:
        raise LlamalabError(f"a weight exceeds {dtype} range (|w| > {limit:g}); use another decode_dtype")
    return w.to(dtype)


def _rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, half: int) -> torch.Tensor:
    x32 = x.float()
    x1, x2 = x32[..., :half], x32[..., half:]
    return (x32 * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


def _split_rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sizes: tuple[int, int, int]):
    """(B, q+k+v) -> RoPE-rotated q (B, Hq, D), k (B, Hkv, D) and v (B, Hkv, D) (flat views)."""
    q_size, kv_size, half = sizes
    B = qkv.shape[0]
    q = qkv[:, :q_size].view(B, -1, 2 * half)
    k = qkv[:, q_size:q_size + kv_size].view(B, -1, 2 * half)
    v = qkv[:, q_size + kv_size:]
    return _rope(q, cos, sin, half), _rope(k, cos, sin, half), v


def _matvec(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(1, in) · (out, in)ᵀ as an explicit float32 reduction (compiled into one streaming loop)."""
    return (w.float() * x.float()[:, None, :]).sum(-1)


# The compiled functions return each normalised input as well: an output is materialised once,
# whereas an intermediate may be recomputed inside the product's loop for every output row. With
# the down projection fused into the next layer's function this made the compiled float16-weight
# step of SmolLM2 25% faster (interleaved A/B: 40.6 -> 50.9 tok/s; float32 unchanged).
def _pre_attention(h, w_in, w_qkv, cos, sin, eps: float, sizes: tuple[int, int, int]):
    x = _rmsnorm(h, w_in, eps)
    return (*_split_rope(_matvec(w_qkv, x).to(h.dtype), cos, sin, sizes), x)


def _post_attention(h, o, w_o, w_post, w_gu, eps: float, inter: int):
    h = h + _matvec(w_o, o).to(h.dtype)
    x = _rmsnorm(h, w_post, eps)
    gu = _matvec(w_gu, x).to(h.dtype)
    return h, F.silu(gu[:, :inter]) * gu[:, inter:], x  # outputs: SwiGLU and the norm computed once


def _mlp_out_pre_attention(h, act, w_down, w_in, w_qkv, cos, sin, eps: float, sizes: tuple[int, int, int]):
    """The MLP's down projection and residual, then the next layer's norm, q|k|v and RoPE."""
    h = h + _matvec(w_down, act).to(h.dtype)
    return (h, *_pre_attention(h, w_in, w_qkv, cos, sin, eps, sizes))


def _mlp_out_head(h, act, w_down, w_norm, lm_head, eps: float):
    """The last layer's down projection and residual, the final norm and the output head."""
    h = h + _matvec(w_down, act).to(h.dtype)
    x = _rmsnorm(h, w_norm, eps)
    return _matvec(lm_head, x), x


# --------------------------------------------------------------------------- model runner
class Runner:
    """Prefill / decode / verify over one KV cache, with the fast decode step when it applies."""

    def __init__(self, model: torch.nn.Module, batch_size: int, max_seq_len: int, fast: bool = True,
                 compile: bool = False, decoder: FastDecoder | None = None,
                 decode_dtype: torch.dtype | str | None = None) -> None:
        self.model = model
        self.cache = model.new_cache(batch_size, max_seq_len)
        self.decoder = decoder
        if self.decoder is None and (fast or compile) and getattr(model.config, "norm_type", "rmsnorm") == "rmsnorm" \
                and not getattr(model.config, "quantization", None) and _plain_linears(model):
            self.decoder = _cached_decoder(model, compile, decode_dtype)
        self._step = self.decoder.step if self.decoder is not None else None
        # Quantized / adapter-wrapped models decode through the model's forward; their output head (kept
        # in float) is then the biggest read per token, so at batch 1 it runs from a float16 copy.
        self._head16 = _cached_half_head(model) if self._step is None and _float_head_on_cpu(model) else None

    @torch.inference_mode()
    def prefill(self, row: int, ids: Sequence[int], chunk: int = PREFILL_CHUNK, all_logits: bool = False
                ) -> torch.Tensor:
        """Write a prompt into cache row ``row``; logits of its last token (V,) (all (T, V) with all_logits)."""
        dev = self.model.device
        x = torch.tensor([list(ids)], dtype=torch.long, device=dev)
        rows = slice(row, row + 1)
        outs = []
        for s in range(0, x.shape[1], chunk):
            part = x[:, s:s + chunk]
            last = s + chunk >= x.shape[1]
            if last or all_logits:
                outs.append(self.model(part, cache=self.cache, cache_rows=rows, last_only=not all_logits)[0])
            else:
                self.model.hidden_states(part, cache=self.cache, cache_rows=rows)
        return torch.cat(outs) if all_logits else outs[-1][-1]

    @torch.inference_mode()
    def decode(self, rows: list[int], tokens: list[int]) -> torch.Tensor:
        """One token per listed cache row -> logits (len(rows), V)."""
        dev = self.model.device
        t = torch.tensor(tokens, dtype=torch.long, device=dev)
        r = torch.tensor(rows, dtype=torch.long, device=dev)
        if self._step is not None and not self.cache.has_padding:
            return self._step(t, self.cache, r)
        sel = slice(rows[0], rows[0] + 1) if len(rows) == 1 else \
            (slice(0, len(rows)) if rows == list(range(self.cache.batch_size)) else r)
        if self._head16 is not None:
            h = self.model.hidden_states(t[:, None], cache=self.cache, cache_rows=sel)[:, -1]
            return F.linear(self.model.norm(h).to(torch.float16), self._head16).float()
        return self.model(t[:, None], cache=self.cache, cache_rows=sel, last_only=True)[:, 0]

    def truncate(self, row: int, length: int) -> None:
        """Forget everything row ``row`` holds after its first ``length`` tokens (speculative rollback)."""
        self.cache.lengths[row] = length
        self.cache.valid[row, length:] = False

    def length(self, row: int) -> int:
        return int(self.cache.lengths[row])


def _float_head_on_cpu(model: torch.nn.Module) -> bool:
    head = model.lm_head
    return (not _plain_linears(model) and type(head) is torch.nn.Linear and head.weight.device.type == "cpu"
            and head.weight.dtype in (torch.float32, torch.bfloat16)
            and bool(head.weight.detach().abs().max() < 65504))


def _cached_half_head(model: torch.nn.Module) -> torch.Tensor:
    """A float16 copy of the output head for batch-1 decode (PyTorch's fp16 gemv streams ~2x the bytes/s
    of its fp32 one on CPU), rebuilt when the weight changes."""
    w = model.lm_head.weight
    stamp = (id(w), w._version)
    cached = model.__dict__.get("_llamalab_head16")
    if cached is None or cached[0] != stamp:
        cached = (stamp, w.detach().to(torch.float16).contiguous())
        model.__dict__["_llamalab_head16"] = cached
    return cached[1]


def _cached_decoder(model: torch.nn.Module, compile: bool, decode_dtype: torch.dtype | str | None = None
                    ) -> FastDecoder:
    """One prepared decoder per (model, kernel), kept on the model and rebuilt whenever any parameter
    changed since (in-place updates bump a tensor's ``_version``), so training never leaves it stale.
    It holds a second copy of the weights; pass ``fast=False`` where memory is tight."""
    wdt = resolve_decode_dtype(decode_dtype)
    key = ("_llamalab_decoder_compiled" if compile else "_llamalab_decoder") + (f"_{wdt}" if wdt else "")
    stamp = tuple((id(p), p._version, p.dtype, p.device) for p in model.parameters())
    cached = model.__dict__.get(key)
    if cached is None or cached[0] != stamp:
        cached = (stamp, FastDecoder(model, model.config.max_position_embeddings, compile=compile, decode_dtype=wdt))
        model.__dict__[key] = cached
    return cached[1]


def _plain_linears(model: torch.nn.Module) -> bool:
    """True when every projection is a plain nn.Linear (not quantized / LoRA-wrapped)."""
    layer = model.layers[0]
    mods = [layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.gate_proj, model.lm_head]
    return all(type(m) is torch.nn.Linear for m in mods)


# --------------------------------------------------------------------------- prompts
def encode_prompt(tok: Any, prompt: Prompt, add_bos: bool | None = None) -> list[int]:
    """A prompt as token ids: text, a list of chat messages ({role, content}), or ids already."""
    if isinstance(prompt, torch.Tensor):
        return [int(i) for i in prompt.flatten().tolist()]
    if isinstance(prompt, str):
        if tok is None:
            raise LlamalabError("this model has no tokenizer: pass token ids as the prompt")
        return list(tok.encode(prompt, add_bos=add_bos))
    prompt = list(prompt)
    if prompt and all(isinstance(m, dict) for m in prompt):
        if tok is None:
            raise LlamalabError("this model has no tokenizer: chat messages need one")
        if not getattr(tok, "chat_template", None):
            raise LlamalabError("this tokenizer has no chat template: pass plain text instead of messages")
        for m in prompt:
            if "role" not in m or "content" not in m:
                raise LlamalabError(f"chat messages need 'role' and 'content', got {m!r}")
        out = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
        return list(tok.encode(out, add_bos=False)) if isinstance(out, str) else [int(i) for i in out]
    if all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
        return prompt
    raise LlamalabError("a prompt is a string, a list of token ids, or a list of {role, content} messages")


def stop_token_ids(model: torch.nn.Module, tok: Any) -> set[int]:
    """Every id that ends generation: the tokenizer's stop tokens and the config's eos ids."""
    ids = set(model.config.stop_token_ids)
    if tok is not None:
        ids.update(int(i) for i in (getattr(tok, "stop_token_ids", None) or []))
        eos = getattr(tok, "eos_token_id", None)
        if eos is not None:
            ids.update(eos if isinstance(eos, (list, tuple)) else [int(eos)])
    return ids


def _fit_context(ids: list[int], max_new_tokens: int, context: int, truncate: bool) -> list[int]:
    if len(ids) >= context or (truncate and len(ids) + max_new_tokens > context):
        if not truncate:
            raise LlamalabError(f"the prompt has {len(ids)} tokens but the model's context is {context}; "
                                "shorten it or pass truncate=True (--truncate) to keep its end")
        keep = max(1, context - max_new_tokens)
        ids = ids[len(ids) - keep:]
    if not ids:
        raise LlamalabError("the prompt is empty (no tokens)")
    return ids


# --------------------------------------------------------------------------- the engine
class _Row:
    def __init__(self, slot: int, ids: list[int], params: SamplingParams, tok: Any, stops: Sequence[str],
                 max_new: int, skip_special: bool, device: torch.device) -> None:
        self.slot, self.prompt, self.params, self.max_new = slot, ids, params, max_new
        self.gen = params.make_generator(device)
        self.detok = IncrementalDetokenizer(tok, skip_special) if tok is not None else None
        self.stops = StopStrings(stops)
        self.out: list[int] = []
        self.text: list[str] = []
        self.logprobs: list[float] = []
        self.top: list[dict[int, float]] = []
        self.finish: str | None = None

    def push(self, token: int, stop_ids: set[int]) -> str:
        """Record a sampled token; returns the text it releases (and sets ``finish`` when done)."""
        if token in stop_ids:
            self.finish = "stop"
            piece = self._close()
        else:
            self.out.append(token)
            piece = self.detok.add(token) if self.detok is not None else ""
            piece, hit = self.stops.feed(piece) if piece else ("", False)
            if hit:
                self.finish = "stop"
            elif len(self.out) >= self.max_new:
                self.finish = "length"
                piece += self._close()
        self.text.append(piece)
        return piece

    def _close(self) -> str:
        tail = self.detok.flush() if self.detok is not None else ""
        piece, hit = self.stops.feed(tail) if tail else ("", False)
        return piece if hit else piece + self.stops.flush()


def _make_params(params: SamplingParams | None, kwargs: dict[str, Any]) -> SamplingParams:
    unknown = set(kwargs) - _SAMPLING_FIELDS
    if unknown:
        raise TypeError(f"unknown generation option(s): {', '.join(sorted(unknown))}")
    if params is not None:
        if kwargs:
            from dataclasses import replace

            return replace(params, **kwargs)
        return params
    return SamplingParams(**{k: v for k, v in kwargs.items() if v is not None})


def _events(model: torch.nn.Module, tok: Any, prompts: Sequence[Prompt], *, max_new_tokens: int = 64,
            params: SamplingParams | Sequence[SamplingParams] | None = None, stop: Sequence[str] | str | None = None,
            add_bos: bool | None = None, truncate: bool = False, draft_model: torch.nn.Module | None = None,
            num_draft_tokens: int = 4, fast: bool = True, compile: bool = False,
            decode_dtype: torch.dtype | str | None = None, skip_special_tokens: bool = True,
            prefill_chunk: int = PREFILL_CHUNK, results: list[Completion] | None = None,
            **sampling: Any) -> Iterator[tuple[int, str]]:
    """The generation loop; yields (prompt index, text piece) and fills ``results`` at the end."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise LlamalabError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if isinstance(params, SamplingParams) or params is None:
        plist = [_make_params(params, sampling)] * len(prompts)
    else:
        plist = [_make_params(p, sampling) for p in params]
        if len(plist) != len(prompts):
            raise LlamalabError(f"{len(plist)} sampling params for {len(prompts)} prompts")
    resolve_decode_dtype(decode_dtype)  # a bad value is an error even where the fast step is not used
    V = model.config.vocab_size
    for p in plist:
        p.validate(V)
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    context = model.config.max_position_embeddings
    ids_list = [_fit_context(encode_prompt(tok, p, add_bos), max_new_tokens, context, truncate) for p in prompts]
    for ids in ids_list:
        if max(ids) >= V or min(ids) < 0:
            raise LlamalabError(f"prompt token id {max(ids)} is outside the model's vocabulary ({V})")
    stop_ids = stop_token_ids(model, tok)
    B = len(ids_list)
    max_len = min(context, max(len(i) for i in ids_list) + max_new_tokens + num_draft_tokens + 1)
    dev = model.device
    rows = [_Row(i, ids, plist[i], tok, stops, min(max_new_tokens, context - len(ids)), skip_special_tokens, dev)
            for i, ids in enumerate(ids_list)]

    if draft_model is not None:
        from llamalab.speculative import speculative_events

        yield from speculative_events(model, draft_model, rows, stop_ids, max_len, num_draft_tokens, fast=fast,
                                      prefill_chunk=prefill_chunk)
    else:
        t0 = time.perf_counter()
        runner = Runner(model, B, max_len, fast=fast, compile=compile, decode_dtype=decode_dtype)
        counts = TokenCounts(B, V, dev) if any(p.has_penalties for p in plist) else None
        logits = []
        for r in rows:
            logits.append(runner.prefill(r.slot, r.prompt, prefill_chunk))
            if counts is not None:
                counts.reset(r.slot, r.prompt)
        logits_t = torch.stack(logits)
        t1 = time.perf_counter()
        active = rows
        n_steps = 0
        while active:
            slots = torch.tensor([r.slot for r in active], device=dev)
            out = sample(logits_t, [r.params for r in active], [r.gen for r in active], counts, slots)
            if counts is not None:
                counts.add(out.tokens, slots)
            toks = out.tokens.tolist()
            for j, r in enumerate(active):
                _record_logprobs(r, out, j)
                piece = r.push(toks[j], stop_ids)
                if piece:
                    yield r.slot, piece
            still = [(r, toks[j]) for j, r in enumerate(active) if r.finish is None]
            active = [r for r, _ in still]
            if active:
                logits_t = runner.decode([r.slot for r in active], [t for _, t in still])
                n_steps += 1
        t2 = time.perf_counter()
        for r in rows:
            r.stats = {"prefill_s": t1 - t0, "decode_s": t2 - t1, "decode_steps": n_steps,
                       "prompt_tokens": sum(len(x.prompt) for x in rows)}
    if results is not None:
        for r in rows:
            results.append(Completion(text="".join(r.text), token_ids=r.out, finish_reason=r.finish or "length",
                                      prompt_tokens=len(r.prompt),
                                      logprobs=r.logprobs if r.params.logprobs or r.params.top_logprobs else None,
                                      top_logprobs=r.top if r.params.top_logprobs else None,
                                      stats=getattr(r, "stats", {})))


def _record_logprobs(r: _Row, out: Any, j: int) -> None:
    if out.logprobs is not None and (r.params.logprobs or r.params.top_logprobs):
        r.logprobs.append(float(out.logprobs[j]))
        if r.params.top_logprobs:
            k = r.params.top_logprobs
            r.top.append(dict(zip(out.top_ids[j, :k].tolist(), out.top_logprobs[j, :k].tolist())))


# --------------------------------------------------------------------------- public API
def complete(model: torch.nn.Module, tok: Any, prompts: Sequence[Prompt], **kwargs: Any) -> list[Completion]:
    """Generate for a batch of prompts (ragged lengths fine); one :class:`Completion` per prompt.

    Options: ``max_new_tokens``, ``stop`` (strings), ``params`` (a :class:`SamplingParams` or one per
    prompt) or its fields as keywords (``temperature``, ``top_k``, ``top_p``, ``min_p``,
    ``repetition_penalty``, ``frequency_penalty``, ``presence_penalty``, ``logit_bias``, ``seed``,
    ``logprobs``, ``top_logprobs``), ``add_bos``, ``truncate`` (keep the prompt's end when it does not
    fit the context instead of raising), ``draft_model`` + ``num_draft_tokens`` (speculative
    decoding), ``fast`` (the prepared decode step, default on), ``compile`` (torch.compile it),
    ``decode_dtype`` (``"float16"``: store the decode step's weights in float16 — opt-in, faster on CPU),
    ``skip_special_tokens``, ``prefill_chunk``.
    """
    results: list[Completion] = []
    for _ in _events(model, tok, prompts, results=results, **kwargs):
        pass
    return results


def generate(model: torch.nn.Module, tok: Any, prompt: Prompt | Sequence[str], **kwargs: Any) -> str | list[str]:
    """Generated text for a prompt (a list of strings: a batch, returns a list). See :func:`complete`."""
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        return [c.text for c in complete(model, tok, list(prompt), **kwargs)]
    return complete(model, tok, [prompt], **kwargs)[0].text


def stream(model: torch.nn.Module, tok: Any, prompt: Prompt, **kwargs: Any) -> Iterator[str]:
    """Yields the generated text piece by piece, each piece whole UTF-8 characters."""
    for _, piece in _events(model, tok, [prompt], **kwargs):
        yield piece


def stream_batch(model: torch.nn.Module, tok: Any, prompts: Sequence[Prompt], results: list[Completion] | None = None,
                 **kwargs: Any) -> Iterator[tuple[int, str]]:
    """Yields (prompt index, piece) as a batch generates; ``results`` gets the completions at the end."""
    yield from _events(model, tok, prompts, results=results, **kwargs)


class _CallableModule(types.ModuleType):
    """Importing the submodule ``llamalab.generate`` makes Python bind that name on the package to the
    module, shadowing the lazily exported function; calling the module calls :func:`generate`, so
    ``llamalab.generate(model, tok, prompt)`` works whatever was imported first."""

    def __call__(self, *args: Any, **kwargs: Any) -> str | list[str]:
        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
