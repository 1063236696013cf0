"""Measured anatomy of a Llama: RoPE, RMSNorm, GQA and attention, as an HTML report with figures.

``llamalab explain [rope|rmsnorm|gqa|attention|all] --model PATH --out DIR`` runs the sections in
:mod:`llamalab.explain.report`; each section module (rope.py, rmsnorm.py, gqa.py, attention.py)
measures the given model and, where a question needs a controlled comparison, small models trained
here on Shakespeare bytes (corpus.py, trainer.py). :func:`convert_to_gqa` (gqa.py) is also the
engine of ``llamalab convert --to-gqa N``.
"""

from llamalab.explain.gqa import convert_to_gqa

__all__ = ["convert_to_gqa"]
