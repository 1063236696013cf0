"""Files that ship inside the package, found through :mod:`importlib.resources` (so they work from a wheel):

* ``configs/*.toml`` — the ``llamalab train`` recipes (``quick``, ``shakespeare``, ``tang``, ``tiny``);
* ``tasks/`` — the built-in evaluation tasks (``*_nextline.jsonl``) and generation prompts;
* ``finetune/`` — the small question-answer set ``llamalab finetune`` uses by default.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def asset_dir(name: str) -> Path:
    """The bundled folder ``name`` (``configs``, ``tasks`` or ``finetune``) as a path."""
    return Path(str(files(__name__) / name))


def bundled_config(name: str) -> Path | None:
    """The bundled recipe ``name`` (e.g. ``"shakespeare"``), or None when there is none by that name."""
    if not name or "/" in name or "\\" in name or name.startswith("."):
        return None
    path = asset_dir("configs") / f"{name}.toml"
    return path if path.is_file() else None


def bundled_config_names() -> list[str]:
    return sorted(p.stem for p in asset_dir("configs").glob("*.toml"))
