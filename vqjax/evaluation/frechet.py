"""Sample-quality statistics over feature sets: Frechet distance, precision / recall, IS, CAS.

Every function takes arrays of features or class probabilities from any extractor (the
project's classifier, an Inception network, ...), so the numbers depend on that extractor and
are comparable only between runs that used the same one. Statistics are computed on the host
in float64 NumPy: a covariance of a few thousand samples loses digits in float32, and the
Frechet distance is a small difference of large traces.

  * Frechet distance (Heusel et al. 2017 with Inception features = FID): the 2-Wasserstein
    distance between Gaussians fitted to the two sets.
  * Improved precision and recall (Kynkaanniemi et al. 2019): each set's manifold is the union
    of balls around its samples with radius the distance to the k-th nearest neighbour;
    precision is the share of generated samples inside the real manifold, recall the share of
    real samples inside the generated one.
  * Inception-style score (Salimans et al. 2016) in any classifier's probability space:
    exp(E_x KL(p(y|x) || p(y))), mean and standard deviation over splits.
  * Classification accuracy score (Ravuri and Vinyals 2019): a classifier trained on
    generated samples and their labels, tested on real ones. Here a multinomial logistic
    regression on features, so it needs no training loop.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

# Pairwise distances are computed this many query rows at a time, so memory stays at a few
# [256, N] float64 blocks whatever the set sizes.
_ROWS_PER_CHUNK = 256
HIGHEST = jax.lax.Precision.HIGHEST


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean and covariance of a feature set.

  Args:
    features: [N, D], N >= 2.

  Returns:
    (mu float64 [D], sigma float64 [D, D]), the unbiased (N - 1) covariance.
  """
  f = np.asarray(features, np.float64)
  if f.ndim != 2 or f.shape[0] < 2:
    raise ValueError(f"feature statistics need [N >= 2, D] features, got shape {f.shape}")
  return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
  """Symmetric square root of a symmetric positive semi-definite matrix (eigenvalues < 0
  from round-off are clipped to 0)."""
  w, v = np.linalg.eigh((sigma + sigma.T) / 2.0)
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
  """tr((sigma1 sigma2)^(1/2)) for symmetric PSD matrices.

  sigma1 sigma2 is not symmetric, but it has the eigenvalues of the symmetric PSD matrix
  s sigma2 s with s = sigma1^(1/2); the trace of the square root is the sum of their square
  roots. Two symmetric eigendecompositions replace a general matrix square root (no complex
  round-off parts, no scipy).
  """
  s = _psd_sqrt(np.asarray(sigma1, np.float64))
  m = s @ np.asarray(sigma2, np.float64) @ s
  w = np.linalg.eigvalsh((m + m.T) / 2.0)
  return float(np.sum(np.sqrt(np.clip(w, 0.0, None))))


def frechet_distance(
  mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
  """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

  d^2 = ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)).

  Args:
    mu1: mean [D].
    sigma1: covariance [D, D].
    mu2: mean [D].
    sigma2: covariance [D, D].

  Returns:
    The squared distance d^2 (what "FID" reports), a float >= 0 up to round-off.
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = (
    np.atleast_2d(sigma1).astype(np.float64),
    np.atleast_2d(sigma2).astype(np.float64),
  )
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
    raise ValueError(
      f"frechet distance of mismatched statistics: mu {mu1.shape} / {mu2.shape}, "
      f"sigma {sigma1.shape} / {sigma2.shape}"
    )
  diff = mu1 - mu2
  return float(
    diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2)
  )


def frechet_distance_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
  """Frechet distance between Gaussians fitted to two feature sets [N1, D] and [N2, D]."""
  return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


def _pairwise_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Euclidean distances [len(a), len(b)] in float64 (clipped at 0 against round-off)."""
  d2 = np.sum(a * a, 1)[:, None] - 2.0 * a @ b.T + np.sum(b * b, 1)[None, :]
  return np.sqrt(np.clip(d2, 0.0, None))


def knn_radii(features: np.ndarray, k: int = 3) -> np.ndarray:
  """Distance from each sample to its k-th nearest neighbour in the same set.

  Args:
    features: [N, D], N > k.
    k: neighbour rank (the sample itself, at distance 0, is not counted).

  Returns:
    float64 [N].
  """
  f = np.asarray(features, np.float64)
  if f.shape[0] <= k:
    raise ValueError(f"k-NN radii with k={k} need more than {k} samples, got {f.shape[0]}")
  radii = np.empty(f.shape[0])
  for start in range(0, f.shape[0], _ROWS_PER_CHUNK):
    d = _pairwise_distances(f[start : start + _ROWS_PER_CHUNK], f)
    # Index k of the sorted row: index 0 is the sample itself (distance 0).
    radii[start : start + len(d)] = np.partition(d, k, axis=1)[:, k]
  return radii


def manifold_coverage(reference: np.ndarray, radii: np.ndarray, queries: np.ndarray) -> np.ndarray:
  """Whether each query lies in the union of balls B(reference_i, radii_i).

  Args:
    reference: [N, D] ball centres.
    radii: [N] ball radii.
    queries: [M, D].

  Returns:
    bool [M].
  """
  ref = np.asarray(reference, np.float64)
  q = np.asarray(queries, np.float64)
  inside = np.empty(q.shape[0], bool)
  for start in range(0, q.shape[0], _ROWS_PER_CHUNK):
    d = _pairwise_distances(q[start : start + _ROWS_PER_CHUNK], ref)
    inside[start : start + len(d)] = np.any(d <= radii[None, :], axis=1)
  return inside


def precision_recall(
  real_features: np.ndarray, generated_features: np.ndarray, k: int = 3
) -> dict[str, float]:
  """Improved precision and recall (Kynkaanniemi et al. 2019).

  Args:
    real_features: [N, D].
    generated_features: [M, D].
    k: the neighbour whose distance is each ball's radius (3 in the paper).

  Returns:
    {"precision": share of generated samples inside the real manifold, "recall": share of
    real samples inside the generated manifold}.
  """
  real = np.asarray(real_features, np.float64)
  gen = np.asarray(generated_features, np.float64)
  precision = manifold_coverage(real, knn_radii(real, k), gen)
  recall = manifold_coverage(gen, knn_radii(gen, k), real)
  return {"precision": float(np.mean(precision)), "recall": float(np.mean(recall))}


def inception_score(probs: np.ndarray, splits: int = 10) -> tuple[float, float]:
  """exp(E_x KL(p(y|x) || p(y))) in the probability space of any classifier.

  Args:
    probs: [N, K] class probabilities of the samples (rows sum to 1).
    splits: the samples are cut into this many equal consecutive parts (the last N % splits
      are dropped); each part gets its own p(y) and score.

  Returns:
    (mean, standard deviation) over the splits; between 1 (every sample gets the same
    prediction) and K (confident predictions spread evenly over the classes).
  """
  p = np.asarray(probs, np.float64)
  n = p.shape[0] // splits
  if n < 1:
    raise ValueError(f"inception score with {splits} splits needs >= {splits} samples")
  scores = []
  for i in range(splits):
    part = p[i * n : (i + 1) * n]
    marginal = part.mean(axis=0, keepdims=True)
    # 0 log 0 = 0: classes a sample gives no mass contribute nothing.
    safe = np.where(part > 0, part, 1.0)
    kl = np.sum(
      np.where(part > 0, part * (np.log(safe) - np.log(np.maximum(marginal, 1e-300))), 0.0), 1
    )
    scores.append(np.exp(np.mean(kl)))
  return float(np.mean(scores)), float(np.std(scores))


@functools.partial(jax.jit, static_argnames=("num_classes", "steps"))
def _fit_softmax(x, labels, num_classes: int, l2, step_size, steps: int):
  """Accelerated gradient descent on the L2-regularised softmax cross-entropy."""
  y = jax.nn.one_hot(labels, num_classes, dtype=x.dtype)
  n = x.shape[0]

  def grad(w):
    p = jax.nn.softmax(jnp.matmul(x, w, precision=HIGHEST), axis=-1)
    return jnp.matmul(x.T, p - y, precision=HIGHEST) / n + l2 * w

  def body(t, carry):
    w, v = carry
    w_next = v - step_size * grad(v)
    # Nesterov's momentum schedule k / (k + 3) gives the O(1/k^2) rate on a smooth convex loss.
    v_next = w_next + (t / (t + 3.0)) * (w_next - w)
    return w_next, v_next

  w0 = jnp.zeros((x.shape[1], num_classes), x.dtype)
  w, _ = jax.lax.fori_loop(0, steps, body, (w0, w0))
  return w


class LogisticRegression:
  """Multinomial logistic regression on standardised features (with a bias term).

  Args:
    num_classes: number of classes K (labels in [0, K)).
    l2: L2 penalty on the weights (also the bias; small, it only keeps separable data from
      driving the weights to infinity).
    steps: gradient steps.
  """

  def __init__(self, num_classes: int, l2: float = 1e-3, steps: int = 500):
    self.num_classes = num_classes
    self.l2 = l2
    self.steps = steps
    self.mean = self.scale = self.weights = None

  def _design(self, features: np.ndarray) -> np.ndarray:
    x = (np.asarray(features, np.float64) - self.mean) / self.scale
    return np.concatenate([x, np.ones((x.shape[0], 1))], axis=1).astype(np.float32)

  def fit(self, features: np.ndarray, labels: np.ndarray) -> "LogisticRegression":
    """Fits the weights to features [N, D] and int labels [N]; returns self."""
    f = np.asarray(features, np.float64)
    self.mean = f.mean(axis=0)
    self.scale = np.where(f.std(axis=0) > 1e-12, f.std(axis=0), 1.0)
    x = self._design(f)
    # Boehning's bound: the softmax loss Hessian is at most (1/2) X^T X / N (plus l2), so
    # 1 / L is a step size that always decreases the loss, whatever the features' scale.
    # The largest eigenvalue of X^T X / N comes from the small [D + 1, D + 1] Gram matrix,
    # formed on the device (a spectral norm of X itself would be an SVD of [N, D + 1]).
    xj = jnp.asarray(x)
    gram = np.asarray(jnp.matmul(xj.T, xj, precision=HIGHEST), np.float64)
    lipschitz = 0.5 * np.linalg.eigvalsh(gram / x.shape[0])[-1] + self.l2
    self.weights = _fit_softmax(
      xj,
      jnp.asarray(labels, jnp.int32),
      self.num_classes,
      jnp.float32(self.l2),
      jnp.float32(1.0 / lipschitz),
      self.steps,
    )
    return self

  def predict_proba(self, features: np.ndarray) -> np.ndarray:
    """Class probabilities [N, K] of features [N, D]."""
    if self.weights is None:
      raise ValueError("predict before fit")
    logits = jnp.matmul(jnp.asarray(self._design(features)), self.weights, precision=HIGHEST)
    return np.asarray(jax.nn.softmax(logits, -1))

  def predict(self, features: np.ndarray) -> np.ndarray:
    """Most probable class [N] of features [N, D]."""
    return np.argmax(self.predict_proba(features), axis=1)


def classification_accuracy_score(
  train_features: np.ndarray,
  train_labels: np.ndarray,
  test_features: np.ndarray,
  test_labels: np.ndarray,
  num_classes: int | None = None,
  l2: float = 1e-3,
  steps: int = 500,
) -> float:
  """Accuracy on real data of a classifier trained on generated data (CAS).

  Args:
    train_features: features of the generated samples [N, D].
    train_labels: the labels they were generated for [N].
    test_features: features of real samples [M, D].
    test_labels: their labels [M].
    num_classes: K; default one more than the largest label seen.
    l2: L2 penalty of the logistic regression.
    steps: its gradient steps.

  Returns:
    Accuracy in [0, 1] of `LogisticRegression` fitted on (train_features, train_labels)
    and evaluated on (test_features, test_labels).
  """
  train_labels = np.asarray(train_labels).astype(np.int64)
  test_labels = np.asarray(test_labels).astype(np.int64)
  if num_classes is None:
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
  clf = LogisticRegression(num_classes, l2=l2, steps=steps).fit(train_features, train_labels)
  return float(np.mean(clf.predict(test_features) == test_labels))
