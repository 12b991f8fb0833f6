"""Evaluation helpers: perplexity per token and per word."""
from megatron_transnormer.evaluation.perplexity import (PerplexityReport, report, token_perplexity,
                                                        word_perplexity)

__all__ = ["PerplexityReport", "report", "token_perplexity", "word_perplexity"]
