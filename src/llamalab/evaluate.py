"""Evaluation API in one import: ``from llamalab.evaluate import perplexity, kl_divergence, ...``.

The implementation lives in the :mod:`llamalab.eval` package (one module per measure); this module
re-exports it under the name the design sketch gives it.
"""

from llamalab.eval import (
    GenQualityResult,
    KLResult,
    MCResult,
    PerplexityResult,
    builtin_tasks,
    distinct_n,
    generation_quality,
    kl_divergence,
    kl_divergence_of_ids,
    loglikelihoods,
    multiple_choice,
    perplexity,
    perplexity_of_ids,
    repeated_ngram_rate,
    same_tokenizer,
)

__all__ = ["GenQualityResult", "KLResult", "MCResult", "PerplexityResult", "builtin_tasks", "distinct_n",
           "generation_quality", "kl_divergence", "kl_divergence_of_ids", "loglikelihoods", "multiple_choice",
           "perplexity", "perplexity_of_ids", "repeated_ngram_rate", "same_tokenizer"]
