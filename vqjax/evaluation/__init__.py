"""Evaluation of trained models: image metrics, sample-quality statistics, anomaly detection.

metrics.py     MSE, PSNR, SSIM, codebook usage / perplexity, bits per dimension
frechet.py     Frechet distance, precision / recall, Inception-style score, CAS on features
anomaly.py     reconstruction-error maps, scores, thresholds, ROC AUC, heat-map grids
evaluators.py  evaluator classes built from a run config, `run(model, variables, data)`
plots.py       matplotlib figures (trade-off lines, code-usage histograms) as PNG
"""

from vqjax.evaluation.evaluators import (
  EVALUATORS,
  AnomalyEvaluator,
  CodebookEvaluator,
  ReconstructionEvaluator,
  SampleQualityEvaluator,
)

__all__ = [
  "EVALUATORS",
  "AnomalyEvaluator",
  "CodebookEvaluator",
  "ReconstructionEvaluator",
  "SampleQualityEvaluator",
]
