"""CPU kernels for block-quantized linears (GGUF Q8_0 / Q4_0 / Q4_1), for GGUF's k-quant linears (Q4_K /
Q6_K super-blocks of 256, :mod:`.kquants`), for float linears at few activation rows, and the model's fused
CPU ops (:mod:`.norm`: RMSNorm, add + RMSNorm, SwiGLU; :mod:`.attention`: RoPE + cache write + decode
attention; taken by the modules when :func:`fused`), registered as torch ops.

``torch.ops.llamalab.q8_0_linear(x, qs, d)``, ``q4_0_linear(x, qs, d)`` and ``q4_1_linear(x, qs, d, m)``
take an activation (..., K) of any float dtype and a weight in the layouts of :mod:`.reference`, and
return y = x · Wᵀ (..., N) in x's dtype: the integer kernel below ``GEMM_ROWS`` rows, else a GEMM on
the weight dequantized by ``torch.ops.llamalab.dequantize`` (bfloat16 where the CPU has bf16 dot
products). ``torch.ops.llamalab.dense_linear(x, w, bias=None)`` takes a float32 / bfloat16 /
float16 weight (N, K) and multiplies it in float32 by up to ``DENSE_ROWS`` activation rows (decode),
handing larger batches to ``F.linear``; :mod:`.dense` swaps a model's ``nn.Linear`` layers onto it.
``torch.ops.llamalab.q4_k_linear(x, kq)`` / ``q6_k_linear(x, kq)`` take the file's super-blocks as stored
(uint8 (N, K/256 · 144 or 210)) and return x · Wᵀ the same way (activation int8 per 32, integer dot products,
scales per sub-block; :mod:`.kquants` has the math). Each op has a fake (meta) implementation, so
``torch.compile`` keeps them in its graph as single calls.

The model's eager forward calls the ops through :data:`OPS`: the same ops called unboxed from Python
(``direct.cpp``, a pybind11 module in the same library, built where the Python headers are installed), or
``torch.ops.llamalab.<op>.default`` where it is not; compiled code calls torch.ops.

The C++ sources (``blocks.cpp``, ``dense.cpp``, and the op modules' ``norm.cpp``, ``attention.cpp``,
``kquants.cpp``, and ``direct.cpp``; one library) are compiled on first use with the system's C++ compiler and
cached under ``~/.cache/llamalab/kernels`` (``LLAMALAB_KERNEL_CACHE`` overrides), keyed by a hash of the sources,
the torch version, the compiler command and the CPU's flags; later processes just load the cached library. The
instruction set is chosen at run time — AVX-512 VNNI, AVX-VNNI, AVX2 or portable scalar code — best first;
``LLAMALAB_KERNEL_ISA=avx2`` (etc.) or :func:`set_isa` forces one. Where there is no compiler, the build fails, or
``LLAMALAB_KERNELS=0``, the same ops are defined in Python as dequantize + ``F.linear`` (``dense_linear`` as
``F.linear``; one debug log line says why), so nothing breaks.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.compiler import is_dynamo_compiling

from llamalab.kernels.reference import KINDS, dequantize

log = logging.getLogger(__name__)

ISAS = ("scalar", "avx2", "avxvnni", "avx512vnni")  # index = the C++ Isa value
SOURCE = Path(__file__).with_name("blocks.cpp")
# the fused ops of the model's own forward (RMSNorm / SwiGLU; RoPE + cache write + decode attention)
FUSED = ("norm", "attention")
# op modules: each a C++ source beside a Python module of the same name holding its schemas, pure-PyTorch
# fallback (``define_fallback(lib)``) and fakes (``register_fakes()``): the fused ops and the k-quant linears
OP_MODULES = (*FUSED, "kquants")
SOURCES = (SOURCE, Path(__file__).with_name("dense.cpp"),
           *(Path(__file__).with_name(f"{n}.cpp") for n in OP_MODULES))
# the Python module ``_llamalab_direct`` (direct.cpp: the ops called unboxed from Python, :data:`OPS`), built
# into the same library where the Python headers are found
DIRECT_SOURCE = Path(__file__).with_name("direct.cpp")
DIRECT_MODULE = "_llamalab_direct"
# words of a compiler's or linker's message that put a failed build on direct.cpp (then the kernels are built alone)
_DIRECT_BUILD_WORDS = ("direct.cpp", "torch_python", "Python.h", "pybind11")
# the ops the eager forward calls, by name: :data:`OPS` holds a callable for each
EAGER_OPS = ("q8_0_linear", "q4_0_linear", "q4_1_linear", "block_linears", "block_swiglu", "q4_k_linear",
             "q6_k_linear", "dense_linear", "dense_linears", "dense_swiglu", "rms_norm", "add_rms_norm", "silu_mul",
             "decode_attention", "decode_attention_rows")
_SCHEMAS = {"q8_0": "q8_0_linear(Tensor x, Tensor qs, Tensor d) -> Tensor",
            "q4_0": "q4_0_linear(Tensor x, Tensor qs, Tensor d) -> Tensor",
            "q4_1": "q4_1_linear(Tensor x, Tensor qs, Tensor d, Tensor m) -> Tensor"}
# [x · W_iᵀ] for block weights of one kind (KINDS index) that read the same x (q|k|v, gate|up): each output is
# the one <kind>_linear gives, bit for bit; below GEMM_ROWS rows the activation is quantized once for all
_LINEARS_SCHEMA = "block_linears(Tensor x, Tensor[] qs, Tensor[] d, Tensor[] m, int kind) -> Tensor[]"
# silu_mul(*block_linears(x, [gate, up], ...)) in one call: the input of SwiGLU's down_proj
_SWIGLU_SCHEMA = "block_swiglu(Tensor x, Tensor[] qs, Tensor[] d, Tensor[] m, int kind) -> Tensor"
_DEQUANTIZE_SCHEMA = "dequantize(Tensor qs, Tensor d, Tensor? m, int kind, bool bf16) -> Tensor"
_DENSE_SCHEMA = "dense_linear(Tensor x, Tensor w, Tensor? bias=None) -> Tensor"
# [dense_linear(x, w) for w in ws] in one call (q|k|v), and silu_mul of the two of gate|up (SwiGLU's down input)
_DENSE_LINEARS_SCHEMA = "dense_linears(Tensor x, Tensor[] ws) -> Tensor[]"
_DENSE_SWIGLU_SCHEMA = "dense_swiglu(Tensor x, Tensor[] ws) -> Tensor"
# From this many activation rows on, the weight is dequantized (C++, vectorised) and multiplied by a GEMM
# instead of the integer kernel, whose cost grows linearly in the rows (docs/kernels.md has the figures).
# Never below 17: a decode batch of up to 16 rows (the server's default --max-batch) stays on the integer
# kernel, the arithmetic of a single row (int8 activations), so a batched greedy answer is the one-at-a-time
# answer up to float rounding (~1e-5) — the GEMM path (float activations, bf16 where the CPU has it) differs
# by ~0.5 in a logit and would flip near-ties. 17 with a bf16 GEMM (AMX / AVX512-BF16), 24 with fp32. Set by load().
GEMM_ROWS = 24
# Up to this many activation rows dense_linear runs its own kernel (the weight streamed once, fp32 FMAs), above
# it torch's GEMM, per weight dtype (docs/kernels.md has the measured crossovers; torch's fp16 product is slow).
DENSE_ROWS = {torch.float32: 4, torch.bfloat16: 4, torch.float16: 16}

_lock = threading.Lock()
_state: dict[str, object] = {}  # "native": bool, "library": Path | None, "reason": str, "direct": bool
# The ops as the eager forward calls them, one attribute per name in EAGER_OPS, set by load(): the unboxed
# functions of direct.cpp where they were built, else ``torch.ops.llamalab.<op>.default`` (the same op
# through torch's boxed Python path, or its pure-PyTorch fallback). torch.compile'd code uses torch.ops.
OPS = SimpleNamespace()
_python_lib = None  # torch.library.Library holding the fallback definitions (kept alive)


def cache_dir() -> Path:
    return Path(os.environ.get("LLAMALAB_KERNEL_CACHE") or Path.home() / ".cache" / "llamalab" / "kernels")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                wanted = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni")
                have = set(line.split(":", 1)[1].split())
                return ",".join(f for f in wanted if f in have)
    except OSError:
        pass
    return platform.machine()


def _python_include() -> str | None:
    """The Python headers' directory where direct.cpp is to be built: the headers are installed (the kernels do
    not need them) and a build with direct.cpp has not failed in this process (then the kernels are built alone)."""
    if _state.get("direct_failed"):
        return None
    include = sysconfig.get_paths().get("include")
    return include if include and Path(include, "Python.h").is_file() else None


def _sources() -> tuple[Path, ...]:
    return (*SOURCES, DIRECT_SOURCE) if _python_include() else SOURCES


def _compiler() -> str:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or "c++"


def _flags() -> list[str]:
    return ["-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-w",
            f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]


def _compile_command(out: Path) -> list[str]:
    from torch.utils import cpp_extension  # (~0.15 s to import: only when building, not to find the library)

    lib_dirs = cpp_extension.library_paths()
    include = _python_include()
    cmd = [_compiler(), *_flags()]
    cmd += [f"-I{p}" for p in cpp_extension.include_paths()] + ([f"-I{include}"] if include else [])
    cmd += [str(s) for s in _sources()] + ["-o", str(out)]
    cmd += [f"-L{p}" for p in lib_dirs] + [f"-Wl,-rpath,{p}" for p in lib_dirs] + ["-lc10", "-ltorch_cpu"]
    return cmd + (["-ltorch_python"] if include else [])


def library_path() -> Path:
    """Where the compiled library for this source / torch / compiler / CPU lives (it may not exist yet). The key
    holds what the compile command is made from — the sources, torch's version and install dir (its include and
    library dirs), the compiler, the flags, the Python headers — so finding a built library imports nothing."""
    parts = [*(s.read_bytes() for s in _sources()), torch.__version__.encode(), str(Path(torch.__file__).parent),
             _compiler(), " ".join(_flags()), str(_python_include()), _cpu_flags(), sys.platform]
    key = hashlib.sha256(b"\0".join(p if isinstance(p, bytes) else p.encode() for p in parts)).hexdigest()[:16]
    return cache_dir() / f"llamalab_blocks_{key}.so"


def build(path: Path | None = None) -> Path:
    """Compile :data:`SOURCES` into `path` (default :func:`library_path`); atomic, so racing builds are safe."""
    path = path or library_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        res = subprocess.run(_compile_command(Path(tmp)), capture_output=True, text=True, timeout=600)
        if res.returncode != 0:
            raise RuntimeError(f"compiler exited with {res.returncode}: {res.stderr.strip()[-2000:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _define_python_fallback(reason: str) -> None:
    """Define the ops in Python as dequantize + F.linear (the library could not be built or loaded)."""
    global _python_lib
    lib = torch.library.Library("llamalab", "DEF")
    for kind, schema in _SCHEMAS.items():
        lib.define(schema)

        def impl(x, qs, d, m=None, _kind=kind):
            return torch.nn.functional.linear(x, dequantize(_kind, qs, d, m, dtype=x.dtype))

        lib.impl(f"{kind}_linear", impl, "CompositeExplicitAutograd")
    lib.define(_LINEARS_SCHEMA)

    def linears_impl(x, qs, d, m, kind):
        ms = m if KINDS[kind] == "q4_1" else [None] * len(qs)
        return [torch.nn.functional.linear(x, dequantize(KINDS[kind], *w, dtype=x.dtype)) for w in zip(qs, d, ms)]

    lib.impl("block_linears", linears_impl, "CompositeExplicitAutograd")
    lib.define(_SWIGLU_SCHEMA)

    def swiglu_impl(x, qs, d, m, kind):
        return torch.ops.llamalab.silu_mul(*torch.ops.llamalab.block_linears(x, qs, d, m, kind))

    lib.impl("block_swiglu", swiglu_impl, "CompositeExplicitAutograd")
    lib.define(_DEQUANTIZE_SCHEMA)

    def dequantize_impl(qs, d, m, kind, bf16):
        return dequantize(KINDS[kind], qs, d, m, dtype=torch.bfloat16 if bf16 else torch.float32)

    lib.impl("dequantize", dequantize_impl, "CompositeExplicitAutograd")
    lib.define(_DENSE_SCHEMA)

    def dense_impl(x, w, bias=None):
        b = None if bias is None else bias.to(w.dtype)
        return torch.nn.functional.linear(x.to(w.dtype), w, b).to(x.dtype)

    lib.impl("dense_linear", dense_impl, "CompositeExplicitAutograd")
    lib.define(_DENSE_LINEARS_SCHEMA)
    lib.impl("dense_linears", lambda x, ws: [dense_impl(x, w) for w in ws], "CompositeExplicitAutograd")
    lib.define(_DENSE_SWIGLU_SCHEMA)

    def dense_swiglu_impl(x, ws):
        return torch.ops.llamalab.silu_mul(*torch.ops.llamalab.dense_linears(x, ws))

    lib.impl("dense_swiglu", dense_swiglu_impl, "CompositeExplicitAutograd")
    for name in OP_MODULES:
        importlib.import_module(f"llamalab.kernels.{name}").define_fallback(lib)
    _python_lib = lib
    log.debug("llamalab kernels: using the pure-PyTorch fallback (%s)", reason)


def _register_fakes() -> None:
    for kind in KINDS:
        def fake(x, qs, d, m=None):
            return x.new_empty((*x.shape[:-1], qs.shape[0]))

        torch.library.register_fake(f"llamalab::{kind}_linear", fake)

    def linears_fake(x, qs, d, m, kind):
        return [x.new_empty((*x.shape[:-1], w.shape[0])) for w in qs]

    torch.library.register_fake("llamalab::block_linears", linears_fake)

    def swiglu_fake(x, qs, d, m, kind):
        return x.new_empty((*x.shape[:-1], qs[0].shape[0]))

    torch.library.register_fake("llamalab::block_swiglu", swiglu_fake)

    def dequantize_fake(qs, d, m, kind, bf16):
        return d.new_empty((qs.shape[0], d.shape[1] * 32), dtype=torch.bfloat16 if bf16 else torch.float32)

    torch.library.register_fake("llamalab::dequantize", dequantize_fake)

    def dense_fake(x, w, bias=None):
        return x.new_empty((*x.shape[:-1], w.shape[0]))

    torch.library.register_fake("llamalab::dense_linear", dense_fake)
    torch.library.register_fake("llamalab::dense_linears",
                                lambda x, ws: [x.new_empty((*x.shape[:-1], w.shape[0])) for w in ws])
    torch.library.register_fake("llamalab::dense_swiglu", lambda x, ws: x.new_empty((*x.shape[:-1], ws[0].shape[0])))
    for name in OP_MODULES:
        importlib.import_module(f"llamalab.kernels.{name}").register_fakes()


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def load() -> bool:
    """Make the ``llamalab::*_linear`` ops available (once per process); True if the C++ kernels are in use."""
    global GEMM_ROWS
    if "native" in _state:
        return bool(_state["native"])
    with _lock:
        if "native" in _state:
            return bool(_state["native"])
        reason = ""
        native = False
        if os.environ.get("LLAMALAB_KERNELS", "1").lower() in ("0", "off", "false", "no"):
            reason = "disabled by LLAMALAB_KERNELS"
        else:
            try:
                path = library_path()
                if not path.exists():
                    try:
                        build(path)
                    except Exception as e:  # noqa: BLE001 - direct.cpp (pybind11) must never cost the kernels
                        if not (_python_include() and any(w in str(e) for w in _DIRECT_BUILD_WORDS)):
                            raise
                        log.debug("llamalab kernels: the build with direct.cpp failed (%s); building the kernels "
                                  "alone", _first_line(e))
                        _state["direct_failed"] = True
                        path = library_path()
                        if not path.exists():
                            build(path)
                torch.ops.load_library(str(path))
                native = True
                _state["library"] = path
            except Exception as e:  # noqa: BLE001 - any build/load failure means: use the fallback
                reason = f"C++ build/load failed: {_first_line(e)}"
        if not native:
            _define_python_fallback(reason)
        _register_fakes()
        _bind_ops(_state.get("library") if native else None)
        _state.update(native=native, reason=reason)
        if native:
            GEMM_ROWS = 17 if gemm_bf16() else 24
            torch.ops.llamalab.configure(GEMM_ROWS, gemm_bf16())
            torch.ops.llamalab.dense_configure(DENSE_ROWS[torch.float32], DENSE_ROWS[torch.bfloat16],
                                               DENSE_ROWS[torch.float16])
            forced = os.environ.get("LLAMALAB_KERNEL_ISA")
            if forced:
                set_isa(forced)
        return native


def _bind_ops(library: Path | None) -> None:
    """Fill :data:`OPS`: from the library's ``_llamalab_direct`` module where it has one, else torch.ops."""
    direct = None
    if library is not None and _python_include():
        try:
            from importlib.machinery import ExtensionFileLoader
            from importlib.util import module_from_spec, spec_from_loader

            loader = ExtensionFileLoader(DIRECT_MODULE, str(library))
            direct = module_from_spec(spec_from_loader(DIRECT_MODULE, loader))
            loader.exec_module(direct)
        except Exception as e:  # noqa: BLE001 - the boxed torch.ops calls are the same ops, only slower
            log.debug("llamalab kernels: direct calls unavailable (%s); calling torch.ops", e)
            direct = None
    ops = torch.ops.llamalab
    for name in EAGER_OPS:
        setattr(OPS, name, getattr(direct, name) if direct is not None else getattr(ops, name).default)
    _state["direct"] = direct is not None


def ready() -> bool:
    """True if this process has already loaded the C++ kernels (never builds or loads them): the model's
    forward takes its fused CPU ops only then, so building a model never starts a compiler."""
    return bool(_state.get("native"))


_fused = os.environ.get("LLAMALAB_FUSED", "1").strip().lower() not in ("0", "off", "false", "no")


def fused() -> bool:
    """Whether the model's forward may use the fused CPU ops (norm / SwiGLU, decode attention): the C++
    kernels are loaded in this process and neither ``LLAMALAB_FUSED=0`` nor :func:`set_fused` turned them
    off. The unfused path is the same math in plain PyTorch ops (for debugging, and the reference)."""
    return _fused and bool(_state.get("native"))


def fused_for(*tensors: torch.Tensor) -> bool:
    """Whether a module may run a fused op on ``tensors`` now: :func:`fused`, grad mode off
    (``torch.no_grad`` / ``torch.inference_mode``, as generation, evaluation and serving run), not traced by
    ``torch.compile`` (a compiled graph keeps the plain ops), and every tensor on the CPU. With grad mode on
    the plain ops run whether or not anything requires grad, so a forward under autograd is the same
    arithmetic before and after parameters are frozen or adapters added."""
    # (called several times per layer per decode step: the cheapest checks first, no generator; and
    # is_dynamo_compiling, not is_compiling: a plain `return False` that Dynamo folds to True when it traces,
    # where is_compiling is two Python functions, ~1 µs a call, and an eager layer makes ~11 such checks)
    if not _fused or torch.is_grad_enabled() or not _state.get("native") or is_dynamo_compiling():
        return False
    for t in tensors:
        if not t.is_cpu:
            return False
    return True


def set_fused(on: bool) -> bool:
    """Turn the fused ops on or off for this process (A/B measurements, debugging); returns the old value."""
    global _fused
    old, _fused = _fused, bool(on)
    return old


def native() -> bool:
    """True if the C++ kernels are built and loaded (loads them if needed)."""
    return load()


def best_isa() -> str:
    """The best instruction set this CPU supports ('scalar' when the C++ kernels are unavailable)."""
    return ISAS[torch.ops.llamalab.cpu_isa()] if load() else "scalar"


def active_isa() -> str:
    return ISAS[torch.ops.llamalab.active_isa()] if load() else "python"


def available_isas() -> list[str]:
    """Every ISA path the kernel can run on this CPU (each can be forced with :func:`set_isa`)."""
    if not load():
        return []
    return [name for i, name in enumerate(ISAS) if torch.ops.llamalab.isa_supported(i)]


def set_isa(name: str | None) -> str:
    """Force an instruction-set path ('scalar', 'avx2', 'avxvnni', 'avx512vnni'; None: the best)."""
    if not load():
        raise RuntimeError("llamalab kernels: the C++ kernels are not available")
    if name is None:
        return ISAS[torch.ops.llamalab.set_isa(-1)]
    if name not in ISAS:
        raise ValueError(f"unknown ISA {name!r}; one of {', '.join(ISAS)}")
    if name not in available_isas():
        raise ValueError(f"ISA {name!r} is not available on this CPU (available: {', '.join(available_isas())})")
    return ISAS[torch.ops.llamalab.set_isa(ISAS.index(name))]


def set_min_chunk(nbytes: int) -> int:
    """Set the least work a thread takes of one product (weight bytes x activation rows; default 256 KB):
    smaller products run on the calling thread. Returns the old value. For measurements (the grain is
    the same on every path; the results do not depend on it: each output element is one thread's)."""
    if not load():
        raise RuntimeError("llamalab kernels: the C++ kernels are not available")
    return int(torch.ops.llamalab.set_min_chunk(int(nbytes)))


PREFETCH_MODES = ("off", "near", "far")


def set_block_prefetch(mode: str | None) -> str:
    """Force the block kernels' software prefetch of the streamed weight at batch 1: ``"off"``, ``"near"``
    (1 KB / 4 KB ahead: Intel's default) or ``"far"`` (AMD Zen 5's: 8 KB / 32 KB for Q8_0, one non-temporal
    prefetch 8 KB ahead for Q4), or ``None`` for the CPU's
    choice (off on AMD Zen 4 and other CPUs). Returns the mode before. For measurements: the results are
    bit-identical in every mode."""
    if mode is not None and mode not in PREFETCH_MODES:
        raise ValueError(f"prefetch mode must be one of {', '.join(PREFETCH_MODES)} or None, got {mode!r}")
    if not load():
        raise RuntimeError("llamalab kernels: the C++ kernels are not available")
    old = torch.ops.llamalab.set_block_prefetch(-1 if mode is None else PREFETCH_MODES.index(mode))
    return PREFETCH_MODES[int(old)]


def gemm_bf16() -> bool:
    """Whether batched products run in bfloat16: only where the CPU has bf16 dot products (AVX512-BF16, AMX)."""
    if "bf16" not in _state:
        flags = set()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
        except OSError:
            pass
        _state["bf16"] = bool(flags & {"avx512_bf16", "amx_bf16"})
    return bool(_state["bf16"])


def block_linear(kind: str, x: torch.Tensor, qs: torch.Tensor, d: torch.Tensor,
                 m: torch.Tensor | None = None) -> torch.Tensor:
    """y (..., N) = x (..., K) · Wᵀ through the ``llamalab::<kind>_linear`` op, in x's dtype."""
    load()
    op = getattr(torch.ops.llamalab, f"{kind}_linear")
    return op(x, qs, d) if m is None else op(x, qs, d, m)


def dense_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y (..., N) = x (..., K) · wᵀ (+ bias) through the ``llamalab::dense_linear`` op, in x's dtype."""
    load()
    return torch.ops.llamalab.dense_linear(x, w, bias)
