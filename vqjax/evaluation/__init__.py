"""Evaluation of trained models: image metrics, sample-quality statistics, anomaly detection.

metrics.py     MSE, PSNR, SSIM, codebook usage / perplexity, bits per dimension
frechet.py     Frechet distance, precision / recall, Inception-style score, CAS on features
anomaly.py     reconstruction-error maps, scores, thresholds, ROC AUC, heat-map grids
combined.py    anomaly scores combined: the mean of their z-scores over normal images
evaluators.py  SSIM, anomaly and sample-quality evaluators, registered into the trainer's
               registry (training/evaluators.py); `evaluate_run`
plots.py       matplotlib figures (trade-off lines, code-usage histograms) as PNG
"""

from vqjax.evaluation.evaluators import (
  EVALUATORS,
  AnomalyEvaluator,
  CodebookEvaluator,
  ReconstructionEvaluator,
  SampleQualityEvaluator,
  SsimEvaluator,
)

__all__ = [
  "EVALUATORS",
  "AnomalyEvaluator",
  "CodebookEvaluator",
  "ReconstructionEvaluator",
  "SampleQualityEvaluator",
  "SsimEvaluator",
]
