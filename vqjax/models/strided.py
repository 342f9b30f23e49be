"""The autoencoders' stride-2 convolutions (kernel 4, padding 1) in exact alternative forms.

`down(x, w)` is Conv2d(kernel 4, stride 2, padding 1): y[m] = sum_k xpad[2m + k] w[k] per axis.
`up(x, w)` is ConvTranspose2d(kernel 4, stride 2, padding 1) in PyTorch's orientation: input
pixel i adds x[i] w[k] to output pixel 2i - 1 + k. Kernels are (4, 4, in, out). The two are
adjoint: the input gradient of `down` is `up` of the output gradient with the kernel's channel
axes swapped, and the other way round.

Forms (each computes the same function; tests check them against NumPy):
  down: "lax" (XLA's strided convolution and its derivatives), "adjoint" (the same forward;
        input gradient through `up`'s phase form instead of XLA's zero-dilated convolution);
  up:   "subpixel" (one 3x3 convolution to 4x the channels, then depth-to-space), "lax" (XLA's
        transposed convolution), "adjoint" (forward in the phase form: one 2x2 convolution of
        the padded input, 4/9 of the sub-pixel multiplies; input gradient through `down`).
The adjoint forms' gradients are `jax.custom_vjp` rules (reverse mode only: `jax.jvp` through
them raises; pick "lax" / "subpixel" for forward-mode derivatives); kernel gradients stay
XLA's own.
On the CPU (XLA:CPU, jaxlib 0.10, 2 cores) they make the Fashion-MNIST step at the PyTorch
reference's sizes 1.2x faster; XLA's own derivatives of these forms run through convolutions
XLA:CPU handles slowly (benchmarks/RESULTS.md). The form is chosen once, when the model is
built (models/impl.py): "adjoint" on the CPU and on GPUs (both adjoint forms: +2.9% on the
ImageNet-256 step on an H200, the same loss to float32 rounding), elsewhere the forms XLA
differentiates itself ("lax" down, "subpixel" up; unmeasured on TPUs).
"""

import jax
import jax.numpy as jnp

_DIMS = ("NHWC", "HWIO", "NHWC")
DOWN_IMPLS = ("lax", "adjoint")
UP_IMPLS = ("subpixel", "lax", "adjoint")

# Output phase r (even/odd) of the transposed conv as a 3-tap window over the input padded by
# one: tap t multiplies kernel row _PHASE_TAPS[r][t] (-1 = none). Derived from o = 2i - 1 + k:
# even o = 2m uses x[m-1] w[3] + x[m] w[1], odd o = 2m+1 uses x[m] w[2] + x[m+1] w[0].
_PHASE_TAPS = ((3, 1, -1), (-1, 2, 0))


def _conv(x: jax.Array, w: jax.Array, stride: int = 1, pad: int = 0) -> jax.Array:
  return jax.lax.conv_general_dilated(
    x, w, (stride, stride), ((pad, pad), (pad, pad)), dimension_numbers=_DIMS
  )


def _pad1(x: jax.Array) -> jax.Array:
  return jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))


def _swap(w: jax.Array) -> jax.Array:
  return jnp.swapaxes(w, 2, 3)


def depth_to_space2(y: jax.Array, out_channels: int) -> jax.Array:
  """[B, H, W, 4*C] with channels ordered (ry, rx, c) -> [B, 2H, 2W, C]."""
  b, h, w, _ = y.shape
  y = y.reshape(b, h, w, 2, 2, out_channels).transpose(0, 1, 3, 2, 4, 5)
  return y.reshape(b, 2 * h, 2 * w, out_channels)


# ---- down: Conv2d(4, stride 2, padding 1) -------------------------------------------------------


def down_lax(x: jax.Array, w: jax.Array) -> jax.Array:
  return _conv(x, w, stride=2, pad=1)


def _kernel_grad(big: jax.Array, w_shape: tuple, small: jax.Array) -> jax.Array:
  """The kernel gradient of `down_lax(big, .)` for the output gradient `small` (XLA's own:
  measured as fast as any other form on the CPU)."""
  k = jnp.zeros(w_shape, small.dtype)
  (g,) = jax.vjp(lambda k: down_lax(big, k), k)[1](small)
  return g


@jax.custom_vjp
def down_adjoint(x: jax.Array, w: jax.Array) -> jax.Array:
  return down_lax(x, w)


def _down_fwd(x, w):
  return down_lax(x, w), (x, w)


def _down_bwd(res, g):
  x, w = res
  dx = up_phase(g, _swap(w))  # 2x the output's size: the input's (`down` checks it is even)
  return dx.astype(x.dtype), _kernel_grad(x, w.shape, g).astype(w.dtype)


down_adjoint.defvjp(_down_fwd, _down_bwd)


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple if multiple > 1 else n


def _pad_axis(a: jax.Array, axis: int, size: int) -> jax.Array:
  if a.shape[axis] == size:
    return a
  widths = [(0, 0)] * a.ndim
  widths[axis] = (0, size - a.shape[axis])
  return jnp.pad(a, widths)


def down(x: jax.Array, w: jax.Array, impl: str = "lax", multiple: int = 0) -> jax.Array:
  """Conv2d(kernel 4, stride 2, padding 1) of NHWC `x` with a (4, 4, in, out) kernel, in the
  form `impl` names (`DOWN_IMPLS`).

  `multiple` > 1 zero-pads the input channels (of x and w) to a multiple of it first: the same
  sums, in the channel counts tensor cores take (e.g. an RGB image's 3 -> 8).
  """
  c = _round_up(x.shape[-1], multiple)
  x, w = _pad_axis(x, 3, c), _pad_axis(w, 2, c)
  _check(impl, DOWN_IMPLS)
  if impl == "adjoint" and (x.shape[1] % 2 or x.shape[2] % 2):
    impl = "lax"  # the adjoint of an odd-sized input's conv crops differently: XLA's rules
  return {"lax": down_lax, "adjoint": down_adjoint}[impl](x, w)


# ---- up: ConvTranspose2d(4, stride 2, padding 1) -------------------------------------------------


def _subpixel_kernel(w: jax.Array) -> jax.Array:
  """(4, 4, I, O) -> (3, 3, I, 4*O): the equivalent conv whose output channels are the four
  (row phase, column phase) outputs, phase-major."""
  zero = jnp.zeros_like(w[0, 0])
  phases = []
  for ry in range(2):
    for rx in range(2):
      rows = []
      for ty in range(3):
        row = []
        for tx in range(3):
          ky, kx = _PHASE_TAPS[ry][ty], _PHASE_TAPS[rx][tx]
          row.append(zero if ky < 0 or kx < 0 else w[ky, kx])
        rows.append(jnp.stack(row))
      phases.append(jnp.stack(rows))  # (3, 3, I, O)
  return jnp.concatenate(phases, axis=-1)


def _phase_kernel(w: jax.Array) -> jax.Array:
  """(4, 4, I, O) -> (2, 2, I, 4*O): phase r of an axis is a 2-tap window starting r pixels
  into the input padded by one, with the non-zero taps of _PHASE_TAPS ((3, 1) for r = 0, (2, 0)
  for r = 1); phases ordered (ry, rx), phase-major."""
  taps = [[k for k in row if k >= 0] for row in _PHASE_TAPS]
  phases = []
  for ry in range(2):
    for rx in range(2):
      phases.append(jnp.stack([jnp.stack([w[ky, kx] for kx in taps[rx]]) for ky in taps[ry]]))
  return jnp.concatenate(phases, axis=-1)


def up_subpixel(x: jax.Array, w: jax.Array) -> jax.Array:
  y = _conv(x, _subpixel_kernel(w), pad=1)
  with jax.named_scope("depth_to_space"):  # the interleave, apart from the conv in a profile
    return depth_to_space2(y, w.shape[-1])


def up_phase(x: jax.Array, w: jax.Array) -> jax.Array:
  """The transposed convolution by output phase: 4/9 of the sub-pixel form's multiplies.

  One 2x2 convolution of the padded input to 4x the channels, every phase's sum at once;
  phase (ry, rx) of output pixel (m, n) is the one at window (m + ry, n + rx).
  """
  h, wd, o = x.shape[1], x.shape[2], w.shape[-1]
  # Padded outside the convolution: XLA:CPU differentiates a padded 2x2 convolution by its
  # kernel ~70x slower (this form's own derivative is taken when "subpixel" is not used).
  z = _conv(_pad1(x), _phase_kernel(w))
  with jax.named_scope("depth_to_space"):
    parts = [
      z[:, ry : ry + h, rx : rx + wd, (2 * ry + rx) * o : (2 * ry + rx + 1) * o]
      for ry in range(2)
      for rx in range(2)
    ]
    return depth_to_space2(jnp.concatenate(parts, axis=-1), o)


def up_lax(x: jax.Array, w: jax.Array) -> jax.Array:
  # A transposed conv is the gradient of a conv: flip the kernel, dilate the input by 2 and
  # pad by k - 1 - p = 2 on each side.
  return jax.lax.conv_general_dilated(
    x, w[::-1, ::-1], (1, 1), ((2, 2), (2, 2)), lhs_dilation=(2, 2), dimension_numbers=_DIMS
  )


@jax.custom_vjp
def up_adjoint(x: jax.Array, w: jax.Array) -> jax.Array:
  return up_phase(x, w)


def _up_fwd(x, w):
  return up_phase(x, w), (x, w)


def _up_bwd(res, g):
  x, w = res
  dx = down_lax(g, _swap(w))
  return dx.astype(x.dtype), _swap(_kernel_grad(g, _swap(w).shape, x)).astype(w.dtype)


up_adjoint.defvjp(_up_fwd, _up_bwd)


def up(x: jax.Array, w: jax.Array, impl: str = "subpixel", multiple: int = 0) -> jax.Array:
  """ConvTranspose2d(kernel 4, stride 2, padding 1) of NHWC `x` (PyTorch orientation), in the
  form `impl` names (`UP_IMPLS`).

  `multiple` > 1 zero-pads the output channels of the convolution the form runs (4 x out for
  the sub-pixel and phase forms) to a multiple of it and crops them after: e.g. a decoder's
  RGB output, 12 -> 16 sub-pixel channels.
  """
  _check(impl, UP_IMPLS)
  fns = {"subpixel": up_subpixel, "lax": up_lax, "adjoint": up_adjoint}
  o = padded = w.shape[-1]
  phases = 1 if impl == "lax" else 4  # output channels of the convolution each form runs
  while multiple > 1 and phases * padded % multiple:
    padded += 1
  y = fns[impl](x, _pad_axis(w, 3, padded))
  return y if padded == o else y[..., :o]


def _check(impl: str, choices: tuple[str, ...]) -> None:
  if impl not in choices:
    raise ValueError(f"unknown stride-2 conv impl {impl!r}; expected one of {', '.join(choices)}")
