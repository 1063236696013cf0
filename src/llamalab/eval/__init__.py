"""Objective quality evaluation of language models.

* :func:`perplexity` — perplexity, cross-entropy and bits per byte on text (strided sliding window),
  with a bootstrap confidence interval (:mod:`.perplexity`);
* :func:`kl_divergence` — KL of a model's next-token distributions from a reference's (:mod:`.kl`);
* :func:`generation_quality` — distinct-n, repeated n-grams, length, reference perplexity (:mod:`.genquality`);
* :func:`multiple_choice` — zero-shot log-likelihood multiple choice, bundled next-line tasks (:mod:`.multichoice`);
* :class:`~llamalab.eval.harness.LlamalabLM` — lm-evaluation-harness's ``LM`` interface (:mod:`.harness`).
"""

from llamalab.eval.genquality import GenQualityResult, distinct_n, generation_quality, repeated_ngram_rate
from llamalab.eval.kl import KLResult, kl_divergence, kl_divergence_of_ids, same_tokenizer
from llamalab.eval.multichoice import MCResult, builtin_tasks, loglikelihoods, multiple_choice
from llamalab.eval.perplexity import PerplexityResult, perplexity, perplexity_of_ids

__all__ = ["GenQualityResult", "KLResult", "MCResult", "PerplexityResult", "builtin_tasks", "distinct_n",
           "generation_quality", "kl_divergence", "kl_divergence_of_ids", "loglikelihoods", "multiple_choice",
           "perplexity", "perplexity_of_ids", "repeated_ngram_rate", "same_tokenizer"]
