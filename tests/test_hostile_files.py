"""Hostile model files: every loader (GGUF, config.json, safetensors index, legacy .bin weights, LoRA
adapters, tokenizer files, chat templates) answers a one-line LlamalabError or loads cleanly. Never a
traceback, never code run from the file, bounded memory and time.

The files are made here from a tiny model: truncated anywhere, bit-flipped with fixed seeds, with absurd
counts, deep nesting, wrong types, and pickle payloads that would create a marker file if unpickled.
Each case runs under a data-size limit (1 GiB above what the process already uses) and an alarm, so a
regression fails instead of eating the machine.
"""

from __future__ import annotations

import json
import random
import resource
import signal
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import llamalab
from helpers import CHATML_TURNS, make_tokenizer, tiny_llama
from llamalab import Llama, LlamaConfig
from llamalab.errors import LlamalabError
from llamalab.formats.gguf import load_gguf, read_gguf, save_gguf
from llamalab.tokenization.tokenizer import Tokenizer, load_tokenizer

CASE_SECONDS = 60  # generous: the CI machine is slow and shared; a regression hangs far longer


@pytest.fixture(autouse=True)
def bounded():
    """Each case: at most 1 GiB more private memory than now, and CASE_SECONDS of wall time (an alarm that
    fails the test) and of CPU time (past which the kernel ends the process: a hang inside C code, which no
    alarm interrupts, still ends)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    cpu_soft, cpu_hard = resource.getrlimit(resource.RLIMIT_CPU)
    used_cpu = resource.getrusage(resource.RUSAGE_SELF)
    cpu_cap = int(used_cpu.ru_utime + used_cpu.ru_stime) + 3 * CASE_SECONDS
    if cpu_hard == resource.RLIM_INFINITY or cpu_cap < cpu_hard:
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_cap, cpu_hard))
    status = Path("/proc/self/status")
    if status.exists():
        used = next(int(line.split()[1]) * 1024 for line in status.read_text().splitlines()
                    if line.startswith("VmData:"))
        cap = used + (1 << 30)
        resource.setrlimit(resource.RLIMIT_DATA, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))

    def too_long(*_):
        raise TimeoutError(f"a hostile-file case ran past {CASE_SECONDS} s")

    previous = signal.signal(signal.SIGALRM, too_long)
    signal.alarm(CASE_SECONDS)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_soft, cpu_hard))


def one_line_or_clean(load, *args, **kwargs):
    """Run a loader: a LlamalabError must be one non-empty line; anything else that escapes fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return load(*args, **kwargs)
        except LlamalabError as e:
            assert str(e) and "\n" not in str(e), repr(str(e))
            return e


def refused(load, *args, match: str | None = None, **kwargs) -> str:
    """The loader must refuse with a one-line LlamalabError (naming ``match`` when given)."""
    out = one_line_or_clean(load, *args, **kwargs)
    assert isinstance(out, LlamalabError), f"loaded what should be refused: {out!r}"
    if match is not None:
        assert match in str(out), str(out)
    return str(out)


# ---------------------------------------------------------------------------------------------- the tiny model
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(dir, model, tokenizer): a 2-layer float32 model with a byte-level BPE tokenizer, saved as GGUF + HF."""
    tok = make_tokenizer(bos_token="<|im_start|>", chat_template=CHATML_TURNS)  # turns only: no generation prompt
    model = tiny_llama(tok, hidden_size=32, intermediate_size=64, max_position_embeddings=64)
    d = tmp_path_factory.mktemp("tiny")
    save_gguf(model, tok, d / "good.gguf")
    model.save_pretrained(d / "hf")
    tok.save(d / "hf")
    return d, model, tok


@pytest.fixture(scope="module")
def good_gguf(tiny) -> bytes:
    return (tiny[0] / "good.gguf").read_bytes()


# ---------------------------------------------------------------------------------------------- a GGUF writer
class Raw:
    """A metadata value given as its GGUF type and encoded bytes (for values no honest writer makes)."""

    def __init__(self, gguf_type: int, payload: bytes) -> None:
        self.type, self.payload = gguf_type, payload


def _str(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


_NP_TYPES = {np.dtype(np.uint8): 0, np.dtype(np.int8): 1, np.dtype(np.uint16): 2, np.dtype(np.int16): 3,
             np.dtype(np.uint32): 4, np.dtype(np.int32): 5, np.dtype(np.float32): 6, np.dtype(np.bool_): 7,
             np.dtype(np.uint64): 10, np.dtype(np.int64): 11, np.dtype(np.float64): 12}


def _value(v) -> tuple[int, bytes]:
    if isinstance(v, Raw):
        return v.type, v.payload
    if isinstance(v, bool):
        return 7, struct.pack("<?", v)
    if isinstance(v, int):
        return (4, struct.pack("<I", v)) if 0 <= v < 2**32 else (11, struct.pack("<q", v))
    if isinstance(v, float):
        return 6, struct.pack("<f", v)
    if isinstance(v, str):
        return 8, _str(v)
    if isinstance(v, np.ndarray):
        return 9, struct.pack("<IQ", _NP_TYPES[v.dtype], len(v)) + v.astype(v.dtype.newbyteorder("<")).tobytes()
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return 9, struct.pack("<IQ", 8, len(v)) + b"".join(_str(x) for x in v)
    raise TypeError(v)


def write_gguf(path: Path, meta: dict, tensors: list[tuple[str, tuple[int, ...], int, bytes]],
               align: int = 32) -> Path:
    """GGUF v3: ``meta`` key -> value, ``tensors`` as (name, torch-order shape, ggml type, raw bytes)."""
    out = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(meta)))
    for key, v in meta.items():
        t, payload = _value(v)
        out += _str(key) + struct.pack("<I", t) + payload
    offset, blobs = 0, []
    for name, shape, ttype, data in tensors:
        out += _str(name) + struct.pack("<I", len(shape)) + b"".join(struct.pack("<Q", n) for n in reversed(shape))
        out += struct.pack("<IQ", ttype, offset)
        blobs.append(data + b"\0" * (-len(data) % align))
        offset += len(blobs[-1])
    out += b"\0" * (-len(out) % align)
    path.write_bytes(bytes(out) + b"".join(blobs))
    return path


@pytest.fixture(scope="module")
def parts(tiny):
    """(metadata, tensors) of the good GGUF, for writing altered copies."""
    g = read_gguf(tiny[0] / "good.gguf")
    tensors = [(t.name, t.shape, t.type, bytes(g.raw(t))) for t in g.tensors.values()]
    meta = dict(g.metadata)
    g.close()
    return meta, tensors


def altered(tmp_path: Path, parts, name: str = "bad.gguf", tensors=None, **changes) -> Path:
    """The good GGUF with metadata keys changed (``llama__block_count=...`` for ``llama.block_count``;
    None removes a key)."""
    meta = dict(parts[0])
    for key, v in changes.items():
        key = key.replace("__", ".")
        if v is None:
            meta.pop(key, None)
        else:
            meta[key] = v
    return write_gguf(tmp_path / name, meta, parts[1] if tensors is None else tensors)


def test_rewritten_good_file_loads_identically(tiny, parts, tmp_path):
    """The test writer itself is faithful: the unaltered copy gives the same logits."""
    _, model, _ = tiny
    again, tok = load_gguf(altered(tmp_path, parts))
    ids = torch.tensor([[1, 5, 9, 42]])
    torch.testing.assert_close(again(ids), model(ids), rtol=0, atol=0)
    assert tok is not None and tok.vocab_size == model.config.vocab_size


# ---------------------------------------------------------------------------------------------- GGUF: damage
def _cut_points(data: bytes) -> dict[str, int]:
    # (the merges come right before the tokens, the tokens right before the token types)
    merges_end, tokens_end = data.index(b"tokenizer.ggml.tokens") - 8, data.index(b"tokenizer.ggml.token_type") - 8
    table = data.index(b"token_embd.weight")
    data_start = (data.index(b"output.weight") + len(b"output.weight") + 4 * 4 + 31) // 32 * 32
    return {"empty": 0, "magic": 3, "version": 6, "counts": 20, "first key": 40, "merges": merges_end - 20,
            "vocab": (merges_end + tokens_end) // 2, "last token": tokens_end - 3, "vocab lengths": merges_end + 60,
            "tensor table": table + 10, "alignment padding": data_start - 2, "first tensor": data_start + 10,
            "mid data": len(data) // 2, "last byte": len(data) - 1}


@pytest.mark.parametrize("where", ["empty", "magic", "version", "counts", "first key", "merges", "vocab",
                                   "last token", "vocab lengths", "tensor table", "alignment padding",
                                   "first tensor", "mid data", "last byte"])
def test_truncated_gguf(good_gguf, tmp_path, where):
    cut = _cut_points(good_gguf)[where]
    (tmp_path / "cut.gguf").write_bytes(good_gguf[:cut])
    refused(load_gguf, tmp_path / "cut.gguf")


@pytest.mark.parametrize("seed", range(12))
def test_bit_flips_in_the_header(good_gguf, tmp_path, seed):
    """1-4 random bit flips in the header, metadata or tensor table: refused in one line, or a clean load."""
    data_start = good_gguf.index(b"token_embd.weight") + 40
    rng = random.Random(seed)
    data = bytearray(good_gguf)
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(data_start)
        data[i] ^= 1 << rng.randrange(8)
    (tmp_path / "flipped.gguf").write_bytes(bytes(data))
    one_line_or_clean(load_gguf, tmp_path / "flipped.gguf")


def test_header_fuzz_many_seeds(good_gguf, tmp_path):
    """200 more seeds of header flips, each a one-line error or a clean load (the vocabulary makes most of
    the header, so this also hits strings, arrays and types)."""
    data_start = good_gguf.index(b"token_embd.weight") + 40
    path = tmp_path / "f.gguf"
    for seed in range(100, 300):
        rng = random.Random(seed)
        data = bytearray(good_gguf)
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(data_start)
            data[i] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(data))
        one_line_or_clean(read_gguf, path)
        one_line_or_clean(load_gguf, path)


def _header(n_tensors: int, n_kv: int) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv)


@pytest.mark.parametrize("body", [
    _header(2**40, 0), _header(0, 2**40), _header(2**20, 2**16),  # counts no file holds
    _header(1, 0) + _str("t") + struct.pack("<I", 2**31),  # 2^31 dimensions
    _header(1, 0) + _str("t") + struct.pack("<IQQ", 2, 2**62, 2**62) + struct.pack("<IQ", 0, 0),  # huge dims
    _header(1, 0) + _str("t") + struct.pack("<IQ", 1, 32) + struct.pack("<IQ", 1000, 0),  # unknown type
    _header(0, 1) + struct.pack("<Q", 2**63) + b"k",  # a key longer than the file
    _header(0, 1) + _str("k") + struct.pack("<I", 99),  # unknown value type
], ids=["tensors", "keys", "both", "dims", "shape", "type", "key length", "value type"])
def test_absurd_counts_and_sizes(tmp_path, body):
    (tmp_path / "a.gguf").write_bytes(body + b"\0" * 64)
    refused(load_gguf, tmp_path / "a.gguf")


def test_string_array_with_a_terabyte_length(parts, tmp_path):
    payload = struct.pack("<IQ", 8, 3) + struct.pack("<Q", 2**40) + b"abc"
    refused(load_gguf, altered(tmp_path, parts, tokenizer__ggml__tokens=Raw(9, payload)), match="truncated")


def test_arrays_nested_20000_deep(parts, tmp_path):
    payload = struct.pack("<IQ", 9, 1) * 20_000 + struct.pack("<IQ", 4, 0)
    refused(load_gguf, altered(tmp_path, parts, general__junk=Raw(9, payload)), match="nested")


def test_metadata_arrays_stay_numpy(parts, tmp_path):
    """A 40 MB numeric array is one 40 MB numpy array, not 10^7 Python floats (~15x the memory)."""
    junk = np.arange(10_000_000, dtype=np.float32)
    g = read_gguf(altered(tmp_path, parts, general__junk=junk))
    assert isinstance(g.metadata["general.junk"], np.ndarray) and g.metadata["general.junk"].nbytes == junk.nbytes
    assert isinstance(g.metadata["tokenizer.ggml.token_type"], np.ndarray)
    g.close()


@pytest.mark.parametrize("change,message", [
    ({"general__alignment": 0}, "general.alignment"),
    ({"general__alignment": "32"}, "general.alignment"),
    ({"general__alignment": 24}, "general.alignment"),
    ({"llama__embedding_length": "32"}, "llama.embedding_length"),
    ({"llama__embedding_length": None}, "llama.embedding_length"),
    ({"llama__attention__head_count": 0}, "llama.attention.head_count"),
    ({"llama__attention__head_count_kv": 0}, "head_count_kv"),
    ({"llama__attention__head_count_kv": 3}, "multiple of n_kv_heads"),
    ({"llama__attention__layer_norm_rms_epsilon": "1e-5"}, "layer_norm_rms_epsilon"),
    ({"llama__rope__freq_base": np.ones(3, dtype=np.float32)}, "freq_base"),
    ({"llama__context_length": 10**9}, "max_position_embeddings"),
    ({"llama__block_count": 10**7}, "layers"),
    ({"llama__block_count": 1}, "layers"),
    ({"llama__feed_forward_length": 65}, "shape"),
    ({"llama__vocab_size": 2**31}, "vocab_size"),
    ({"llama__vocab_size": 1000}, "shape"),
    ({"llama__feed_forward_length": 2**62}, "intermediate_size"),
    ({"tokenizer__ggml__eos_token_id": "2"}, "eos_token_id"),
    ({"llama__rope__scaling__type": 7}, "scaling.type"),
    ({"llamalab__rope__scaling__type": "llama3", "llamalab__rope__scaling__factor": "8"}, "rope_scaling"),
])
def test_wrong_metadata_refused_in_one_line(parts, tmp_path, change, message):
    refused(load_gguf, altered(tmp_path, parts, **change), match=message)


@pytest.mark.parametrize("change", [
    {"tokenizer__ggml__tokens": 5}, {"tokenizer__ggml__tokens": np.arange(291, dtype=np.uint32)},
    {"tokenizer__ggml__token_type": ["a"] * 291}, {"tokenizer__ggml__token_type": np.ones(3, dtype=np.int32)},
    {"tokenizer__ggml__merges": 1.5}, {"tokenizer__ggml__merges": ["nospace"]}, {"tokenizer__ggml__merges": ["q z"]},
    {"tokenizer__ggml__model": 3}, {"tokenizer__chat_template": 4}, {"tokenizer__ggml__add_bos_token": 1},
])
def test_broken_tokenizer_metadata_loads_the_model_without_it(parts, tmp_path, change):
    """A vocabulary that cannot be rebuilt is a one-line warning; the model still loads (tokenizer None)."""
    with pytest.warns(UserWarning, match="GGUF tokenizer not loaded") as record:
        model, tok = load_gguf(altered(tmp_path, parts, **change))
    assert tok is None and model.config.n_layers == 2
    assert all("\n" not in str(w.message) for w in record)


def _with_tensor(parts, name: str, shape: tuple[int, ...]):
    """The tensor list with ``name`` replaced by zeros of another shape (f32)."""
    return [(n, shape, 0, np.zeros(shape, np.float32).tobytes()) if n == name else (n, s, t, d)
            for n, s, t, d in parts[1]]


@pytest.mark.parametrize("name,shape", [
    ("blk.0.attn_q.weight", (24, 32)),  # rows no head split fits: refused before any reshape
    ("blk.0.attn_k.weight", (17, 32)),
    ("blk.1.ffn_down.weight", (32,)),
    ("output_norm.weight", (32, 1, 1)),
])
def test_misshaped_tensor_refused_before_reading(parts, tmp_path, name, shape):
    path = altered(tmp_path, parts, tensors=_with_tensor(parts, name, shape))
    refused(load_gguf, path, match=name)
    refused(load_gguf, path, match=name, keep_quantized=True)


def test_layers_claimed_but_absent_are_not_built(tiny, parts, tmp_path, monkeypatch):
    """block_count / num_hidden_layers 10^7 with 2 layers of tensors: refused before any model is built."""
    built = []
    real = Llama.on_meta.__func__

    def on_meta(cls, config):
        built.append(config.n_layers)
        assert config.n_layers < 100, "building a model for the layer count the file claims"
        return real(cls, config)

    monkeypatch.setattr(Llama, "on_meta", classmethod(on_meta))
    refused(load_gguf, altered(tmp_path, parts, llama__block_count=10**7), match="10,000,000 layers")
    refused(llamalab.load, _hf_copy(tiny, tmp_path, num_hidden_layers=10**7), match="10,000,000 layers")
    assert built == []


def test_extra_and_duplicate_tensors(parts, tmp_path):
    extra = parts[1] + [("blk.7.attn_q.weight", (32, 32), 0, bytes(4096))]
    refused(load_gguf, altered(tmp_path, parts, tensors=extra), match="layers")
    twice = parts[1] + [parts[1][0]]
    refused(load_gguf, altered(tmp_path, parts, tensors=twice), match="twice")
    odd = parts[1] + [("blk.x.attn_q.weight", (32, 32), 0, bytes(4096))]
    refused(load_gguf, altered(tmp_path, parts, tensors=odd), match="unexpected tensor")


@pytest.mark.parametrize("kind", ["gguf", "config"])
def test_cli_info_on_hostile_files_is_one_line(tiny, good_gguf, tmp_path, kind):
    if kind == "gguf":
        path, message = tmp_path / "BAD.gguf", "truncated GGUF"
        path.write_bytes(good_gguf[:_cut_points(good_gguf)["merges"]])
    else:
        path, message = _hf_copy(tiny, tmp_path, max_position_embeddings=10**9), "max_position_embeddings"
    r = subprocess.run([sys.executable, "-m", "llamalab", "info", str(path)], capture_output=True, text=True,
                       timeout=CASE_SECONDS)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "llamalab info: error:" in r.stderr, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_hostile_rope_freqs(parts, tmp_path):
    for freqs in (np.full(4, np.nan, np.float32), np.zeros(4, np.float32), np.ones(7, np.float32)):
        tensors = parts[1] + [("rope_freqs.weight", freqs.shape, 0, freqs.tobytes())]
        refused(load_gguf, altered(tmp_path, parts, tensors=tensors), match="rope_freqs")


def test_looping_template_in_a_gguf_loads_and_refuses_to_render(parts, tmp_path):
    loop = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    model, tok = load_gguf(altered(tmp_path, parts, tokenizer__chat_template=loop))
    refused(tok.apply_chat_template, [{"role": "user", "content": "hi"}], match="steps")


# ---------------------------------------------------------------------------------------------- config.json
def _hf_copy(tiny, tmp_path: Path, config_bytes: bytes | None = None, **changes) -> Path:
    src = tiny[0] / "hf"
    d = tmp_path / "hf"
    d.mkdir(exist_ok=True)
    for f in src.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    if config_bytes is None:
        cfg = json.loads((src / "config.json").read_text())
        for key, v in changes.items():
            if isinstance(v, dict) and isinstance(cfg.get(key), dict):
                cfg[key] = {**cfg[key], **v}
            else:
                cfg[key] = v
        config_bytes = json.dumps(cfg).encode()
    (d / "config.json").write_bytes(config_bytes)
    return d


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}


@pytest.mark.parametrize("change,message", [
    ({"rms_norm_eps": "1e-5"}, "rms_norm_eps"),
    ({"rope_theta": "10000"}, "rope_theta"),
    ({"rope_scaling": dict(LLAMA3, factor="8")}, "rope_scaling factor"),
    ({"rope_scaling": dict(LLAMA3, low_freq_factor="1")}, "low_freq_factor"),
    ({"rope_scaling": dict(LLAMA3, original_max_position_embeddings=10**12)}, "original_max_position_embeddings"),
    ({"rope_scaling": [1, 2]}, "rope_scaling"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": "big"}}, "rope_theta"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings"),
    ({"num_key_value_heads": 0}, "num_key_value_heads"),
    ({"hidden_size": 64.5}, "hidden_size"),
    ({"vocab_size": -1}, "vocab_size"),
    ({"num_hidden_layers": True}, "num_hidden_layers"),
    ({"max_position_embeddings": 10**9}, "max_position_embeddings"),
    ({"hidden_size": 2**62, "head_dim": 16}, "hidden_size"),
    ({"intermediate_size": 2**62}, "intermediate_size"),
    ({"vocab_size": 2**63}, "vocab_size"),
    ({"head_dim": 2**40}, "head_dim"),
    ({"llamalab_quantization": {"method": "int8", "format": "1"}}, "format"),
    ({"num_hidden_layers": 10**7}, "10,000,000 layers"),
    ({"num_hidden_layers": 1}, "layers"),
    ({"eos_token_id": "2"}, "eos_token_id"),
    ({"architectures": "LlamaForCausalLM"}, "architectures"),
    ({"attention_bias": "false"}, "attention_bias"),
    ({"torch_dtype": ["float32"]}, "torch_dtype"),
])
def test_bad_config_values_refused(tiny, tmp_path, change, message):
    refused(llamalab.load, _hf_copy(tiny, tmp_path, **change), match=message)


@pytest.mark.parametrize("raw,message", [
    (b'{"hidden_size": "\xff\xfe"}', "UTF-8"),
    (b"[" * 100_000 + b"]" * 100_000, "JSON"),
    (b'{"vocab_size": 1' + b"0" * 5000 + b"}", "JSON"),
    (b'{"rms_norm_eps": NaN}', "rms_norm_eps"),
    (b'{"rope_theta": Infinity}', "rope_theta"),
    (b"[]", "object"),
])
def test_unreadable_config_json(tiny, tmp_path, raw, message):
    if message in ("rms_norm_eps", "rope_theta"):  # a valid config but for one value
        cfg = json.loads((tiny[0] / "hf" / "config.json").read_text())
        cfg.pop(message)
        raw = json.dumps(cfg)[:-1].encode() + b", " + raw[1:]
    refused(llamalab.load, _hf_copy(tiny, tmp_path, config_bytes=raw), match=message)


def test_null_kv_heads_means_mha(tiny):
    cfg = LlamaConfig.from_hf_dict(dict(json.loads((tiny[0] / "hf" / "config.json").read_text()),
                                        num_key_value_heads=None))
    assert cfg.n_kv_heads == cfg.n_heads


# ---------------------------------------------------------------------------------------------- weights files
@pytest.mark.parametrize("weight_map,message", [
    (["model.safetensors"], "weight_map"),
    ({"model.embed_tokens.weight": 3}, "weight_map"),
    ({"model.embed_tokens.weight": "../outside.safetensors"}, "inside"),
    ({"model.embed_tokens.weight": "/etc/passwd"}, "inside"),
    ({"model.embed_tokens.weight": "config.json"}, "inside"),
])
def test_hostile_safetensors_index(tiny, tmp_path, weight_map, message):
    d = _hf_copy(tiny, tmp_path)
    (tmp_path / "outside.safetensors").write_bytes((d / "model.safetensors").read_bytes())
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    refused(llamalab.load, d, match=message)


def test_index_not_json(tiny, tmp_path):
    d = _hf_copy(tiny, tmp_path)
    (d / "model.safetensors.index.json").write_bytes(b"\xff{")
    refused(llamalab.load, d, match="UTF-8")


class _Marker:
    """Unpickling this creates the marker file (open(path, 'w')): proof that code from the file ran."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickled_weights_are_refused_without_running(tiny, tmp_path):
    d = _hf_copy(tiny, tmp_path)
    marker = tmp_path / "PWNED"
    (d / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": _Marker(marker)}, d / "pytorch_model.bin")
    message = refused(llamalab.load, d, match="pickled")
    assert not marker.exists() and "pytorch_model.bin" in message
    torch.save([torch.zeros(2)], d / "pytorch_model.bin")  # loadable, but not named tensors
    refused(llamalab.load, d, match="named tensors")
    (d / "pytorch_model.bin").write_bytes(b"PK\x03\x04" + b"\0" * 100)
    refused(llamalab.load, d, match="cannot read")


def test_pickled_adapter_is_refused_in_one_line(tiny, tmp_path):
    from llamalab.lora import LoraConfig, apply_lora, load_adapter, save_adapter

    _, model, _ = tiny
    base = _hf_copy(tiny, tmp_path)
    adapted = Llama(model.config)
    apply_lora(adapted, LoraConfig(r=2))
    ad = save_adapter(adapted, tmp_path / "adapter", base_model_name_or_path=str(base))
    (ad / "adapter_model.safetensors").unlink()
    marker = tmp_path / "PWNED"
    torch.save({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": _Marker(marker)},
               ad / "adapter_model.bin")
    refused(load_adapter, Llama(model.config), ad, match="pickled")
    refused(llamalab.load, ad, match="pickled")
    assert not marker.exists()


def test_written_files_get_the_umask_mode(tiny, tmp_path):
    import os

    old = os.umask(0o027)
    try:
        out = tiny[1].save_pretrained(tmp_path / "saved") or tmp_path / "saved"
    finally:
        os.umask(old)
    for f in Path(out).iterdir():
        assert f.stat().st_mode & 0o777 == 0o640, (f.name, oct(f.stat().st_mode))


# ---------------------------------------------------------------------------------------------- tokenizer files
@pytest.mark.parametrize("name,raw", [
    ("tokenizer_config.json", b'{"bos_token": "\xff"}'),
    ("tokenizer_config.json", b"[" * 100_000),
    ("chat_template.jinja", b"{{ \xff }}"),
    ("tokenizer.json", b"\x00" * 64),
    ("tokenizer.json", b'{"model": {"type": "BPE", "vocab": []}}'),
])
def test_hostile_tokenizer_files(tiny, tmp_path, name, raw):
    d = _hf_copy(tiny, tmp_path)
    (d / name).write_bytes(raw)
    one_line_or_clean(load_tokenizer, d)


@pytest.mark.parametrize("template,message", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "steps"),
    ("{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}", "more than"),
    ("{% set s = 'ab' %}" + "{% set s = s ~ s %}" * 64, "more than"),
    ("{% set ns = namespace(l=[1]) %}{% for i in range(64) %}{% set ns.l = ns.l + ns.l %}{% endfor %}", "more than"),
    ("{{ 'x' * 10**10 }}", "more than"),
    ("{{ 10 ** 100000000 }}", "bits"),
    ("{{ 'x'|center(10**9) }}", "limit"),
    ("{{ '%0999999999d' % 1 }}", "width"),
    ("{{ '{:>999999999}'.format(1) }}", "width"),
    ("{% macro f(s, n) %}{{ f(s ~ s, n - 1) if n else s|length }}{% endmacro %}{{ f('ab', 64) }}", "more than"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "RecursionError"),
    ("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}", "output exceeds"),
    ("{% set s = 'a' * 100000 %}{{ s|replace('a', s) }}", "replace"),
    ("{{ lipsum(10**6) }}", "lipsum"),
    ("{{ ().__class__.__base__.__subclasses__() }}", "unsafe"),
    ("{% for %}", "does not parse"),
])
def test_chat_templates_are_bounded(tiny, template, message):
    tok = tiny[2]
    hostile = Tokenizer.from_hf(tok.backend, bos_token=tok.bos_token, eos_token=tok.eos_token,
                                chat_template=template)
    refused(hostile.apply_chat_template, [{"role": "user", "content": "hi"}], match=message)
    ok = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert ok == "<|im_start|>user\nhi<|im_end|>\n"


@pytest.mark.parametrize("change,message", [
    ({"r": "8"}, "r must be"), ({"r": 10**9}, "r must be"), ({"r": 0}, "r must be"),
    ({"lora_alpha": "16"}, "lora_alpha"), ({"lora_dropout": [0.1]}, "lora_dropout"),
    ({"use_rslora": "false"}, "use_rslora"), ({"target_modules": 5}, "target_modules"),
    ({"target_modules": [["q_proj"]]}, "target_modules"), ({"base_model_name_or_path": 7}, "base_model"),
])
def test_hostile_adapter_config(tiny, tmp_path, change, message):
    from llamalab.lora import LoraConfig, apply_lora, save_adapter

    _, model, _ = tiny
    adapted = Llama(model.config)
    apply_lora(adapted, LoraConfig(r=2))
    ad = save_adapter(adapted, tmp_path / "adapter", base_model_name_or_path=str(_hf_copy(tiny, tmp_path)))
    cfg = json.loads((ad / "adapter_config.json").read_text())
    (ad / "adapter_config.json").write_text(json.dumps({**cfg, **change}))
    refused(llamalab.load, ad, match=message)


def test_tokenizer_config_flags_must_be_booleans(tiny, tmp_path):
    d = _hf_copy(tiny, tmp_path)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "add_bos_token": "false"}))
    refused(load_tokenizer, d, match="add_bos_token")
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": 12}))
    refused(load_tokenizer, d, match="chat_template")


@pytest.fixture(scope="module")
def spm_bytes(tmp_path_factory) -> bytes:
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("spm")
    (d / "c.txt").write_text("\n".join(f"the quick brown fox jumps over the lazy dog {i}" for i in range(300)))
    spm.SentencePieceTrainer.train(input=str(d / "c.txt"), model_prefix=str(d / "tokenizer"), vocab_size=330,
                                   model_type="bpe", byte_fallback=True, minloglevel=2)
    return (d / "tokenizer.model").read_bytes()


@pytest.mark.parametrize("seed", range(8))
def test_damaged_sentencepiece_model(spm_bytes, tmp_path, seed):
    """Cut at a random point or bit-flipped: a one-line error, or a tokenizer that encodes."""
    rng = random.Random(seed)
    data = bytearray(spm_bytes[:rng.randrange(len(spm_bytes))] if seed % 2 else spm_bytes)
    for _ in range(0 if seed % 2 else rng.randint(1, 6)):
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)
    (tmp_path / "tokenizer.model").write_bytes(bytes(data))
    tok = one_line_or_clean(load_tokenizer, tmp_path)
    if isinstance(tok, Tokenizer):
        tok.encode("hello world")


def test_empty_sentencepiece_model(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"")
    refused(load_tokenizer, tmp_path)


def _safetensors(header: dict | bytes, data: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize("blob", [
    struct.pack("<Q", 2**63) + b"{}",  # a header longer than any file
    _safetensors(b"\xff\xfe{"),  # not UTF-8 JSON
    _safetensors({"model.embed_tokens.weight": {"dtype": "F99", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)),
    _safetensors({"model.embed_tokens.weight": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 8]}},
                 bytes(8)),
    _safetensors({"model.embed_tokens.weight": {"dtype": "F32", "shape": [2], "data_offsets": [0, 2**40]}}, bytes(8)),
], ids=["header length", "header bytes", "dtype", "shape", "offsets"])
def test_hostile_safetensors(tiny, tmp_path, blob):
    d = _hf_copy(tiny, tmp_path)
    (d / "model.safetensors").write_bytes(blob)
    refused(llamalab.load, d, match="safetensors")
