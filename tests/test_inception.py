"""vqjax.evaluation.inception against pytorch-fid's own `InceptionV3` (the FID network).

pytorch-fid's model is built with the FID structure (`use_fid_inception=True`, output block 3:
the 2048-d pool features, its own 299x299 resize and [-1, 1] scaling) but nothing is
downloaded: its weight download is replaced by an empty dict and the load by a no-op, and
every tensor, batch-norm running statistics included, is then drawn from a seeded generator.
Both networks see the same images: RGB 64x64 as uint8 and grayscale 32x32 as floats, so the
upsampling and the channel repeat are exercised.
"""

import copy
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")
pytorch_fid_inception = pytest.importorskip("pytorch_fid.inception")

import jax  # noqa: E402

from vqjax.errors import UserError  # noqa: E402
from vqjax.evaluation import inception  # noqa: E402

# The bound is relative to the features' scale: max |ours - pytorch-fid| <= RTOL * max |feature|.
# The random network's features reach ~25 and a float32 forward of this 47-layer-deep network
# amplifies round-off: pytorch-fid's own float32 features differ from its float64 ones by 4e-4 to
# 8e-4 here, so an absolute 1e-4 would ask more than the reference itself delivers. The test
# also checks that ours are as close to the float64 reference as pytorch-fid's float32 ones.
RTOL = 1e-4


def _no_download(*args, **kwargs):
  return {}


def _random_state(model: "torch.nn.Module", seed: int) -> None:
  """Every parameter and buffer of `model` drawn anew from a seeded generator.

  Conv weights are He-scaled normals, batch-norm weights U(0.5, 1.5) and biases 0.3 N(0, 1).
  Running statistics come from one eval-mode pass over random images, in which each batch norm
  first measures its input's per-channel mean and variance and keeps them perturbed, mean +
  0.3 std N(0, 1) and var * 2^U(-1, 1), so every layer sees O(1) inputs, as in a trained network,
  and the statistics matter: swapped or dropped ones, or another epsilon, would be far off.
  """
  g = torch.Generator().manual_seed(seed)

  def calibrate(bn, inputs):
    (x,) = inputs
    mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3))
    bn.running_mean.copy_(mean + 0.3 * var.sqrt() * torch.randn(mean.shape, generator=g))
    bn.running_var.copy_(var * 2.0 ** (2.0 * torch.rand(var.shape, generator=g) - 1.0))

  model.eval()
  with torch.no_grad():
    for name, t in model.state_dict().items():
      if t.ndim == 4:  # conv [O, I, kh, kw]
        fan_in = t.shape[1] * t.shape[2] * t.shape[3]
        t.copy_(torch.randn(t.shape, generator=g) * (2.0 / fan_in) ** 0.5)
      elif name.endswith("bn.weight"):
        t.copy_(0.5 + torch.rand(t.shape, generator=g))
      elif name.endswith("bn.bias"):
        t.copy_(0.3 * torch.randn(t.shape, generator=g))
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    hooks = [bn.register_forward_pre_hook(calibrate) for bn in bns]
    model(torch.rand((2, 3, 48, 48), generator=g))
    for hook in hooks:
      hook.remove()


@pytest.fixture(scope="module")
def reference():
  """pytorch-fid's InceptionV3 (FID variant, block 3) with random weights, in eval mode."""
  torchvision = pytest.importorskip("torchvision")
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(pytorch_fid_inception, "load_state_dict_from_url", _no_download)
    mp.setattr(torchvision.models.Inception3, "load_state_dict", lambda self, *a, **k: None)
    model = pytorch_fid_inception.InceptionV3(
      [pytorch_fid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]], use_fid_inception=True
    )
  assert isinstance(model.blocks[3][2], pytorch_fid_inception.FIDInceptionE_2)
  _random_state(model, seed=0)
  return model


def _torch_features(model, images01: np.ndarray, dtype=torch.float32) -> np.ndarray:
  """pytorch-fid's features of [N, H, W, C] images in [0, 1] (gray repeated, as RGB loads)."""
  x = torch.from_numpy(np.ascontiguousarray(images01.transpose(0, 3, 1, 2))).to(dtype)
  if x.shape[1] == 1:
    x = x.repeat(1, 3, 1, 1)
  with torch.no_grad():
    (pool,) = model(x)
  return pool[:, :, 0, 0].double().numpy()


def test_features_match_pytorch_fid(reference):
  variables = inception.convert_state_dict(reference.state_dict())
  reference64 = copy.deepcopy(reference).double()
  rng = np.random.default_rng(1)
  rgb = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
  gray = rng.random((2, 32, 32, 1), dtype=np.float32)
  # Two images per set: one compiled network (batch 2) serves both sizes.
  for images, images01 in ((rgb, rgb.astype(np.float32) / 255.0), (gray, gray)):
    ours = inception.fid_features(images, variables, batch_size=2)
    theirs = _torch_features(reference, images01)
    assert ours.dtype == np.float64 and ours.shape == (len(images), inception.FEATURE_DIM)
    err, scale = np.abs(ours - theirs).max(), np.abs(theirs).max()
    message = f"{images.shape}: max |ours - pytorch-fid| {err:.2e} (relative {err / scale:.1e})"
    if images is rgb:
      exact = _torch_features(reference64, images01, torch.float64)
      err64, their_err64 = np.abs(ours - exact).max(), np.abs(theirs - exact).max()
      message += f"; against float64: ours {err64:.1e}, pytorch-fid float32 {their_err64:.1e}"
      assert err64 <= 2.0 * their_err64 + 1e-6
    print(message)
    assert 0.1 < scale < 100.0  # the random network neither vanishes nor explodes
    assert err <= RTOL * scale
    # Different images, different features (not just the biases' constant).
    assert np.abs(theirs[0] - theirs[1]).max() > 1.0


def test_resize_matrix_rows_are_convex():
  for size_in in (1, 32, 64, 299, 512):
    m = inception._resize_matrix(size_in, inception.INPUT_SIZE)
    assert m.shape == (inception.INPUT_SIZE, size_in) and (m >= 0).all()
    np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-6)
  np.testing.assert_array_equal(inception._resize_matrix(299, 299), np.eye(299))


@pytest.mark.parametrize("height,width", [(512, 384), (64, 64), (32, 300), (299, 299)])
def test_resize_matches_torch_interpolate(height, width):
  # Larger images (e.g. 512x512) are downsampled without anti-aliasing, as pytorch-fid does.
  x = np.random.default_rng(2).random((1, height, width, 3), dtype=np.float32)
  ours = np.asarray(inception.preprocess(x))
  theirs = torch.nn.functional.interpolate(
    torch.from_numpy(x.transpose(0, 3, 1, 2)), size=(299, 299), mode="bilinear", align_corners=False
  )
  np.testing.assert_allclose(ours, 2 * theirs.numpy().transpose(0, 2, 3, 1) - 1, rtol=0, atol=1e-6)


def test_wrong_state_dicts_are_named(reference, tmp_path):
  sd = reference.state_dict()
  with pytest.raises(UserError, match="1 keys missing"):
    inception.convert_state_dict(
      {k: v for k, v in sd.items() if k != "blocks.3.2.branch_pool.bn.bias"}
    )
  with pytest.raises(UserError, match="torchvision's ImageNet"):
    inception.convert_state_dict({**sd, "fc.weight": torch.zeros(1000, 2048)})
  bad = dict(sd, **{"blocks.0.0.conv.weight": torch.zeros(32, 3, 5, 5)})
  with pytest.raises(UserError, match="Conv2d_1a_3x3.conv.weight has shape"):
    inception.convert_state_dict(bad)
  not_torch = tmp_path / "weights.pth"
  not_torch.write_bytes(b"not a checkpoint")
  with pytest.raises(UserError, match="cannot read"):
    inception.load_fid_inception(not_torch)
  with pytest.raises(FileNotFoundError):
    inception.load_fid_inception(tmp_path / "absent.pth")
  # The weights file's layout: the bare network's names ("Mixed_7c...", not "blocks.3.2..."),
  # its 1008-class classifier, no batch counters.
  file_sd = {
    k: v for k, v in inception._layer_names(sd).items() if not k.endswith("num_batches_tracked")
  }
  assert "Mixed_7c.branch_pool.bn.running_var" in file_sd
  file_sd.update({"fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)})
  saved = tmp_path / inception.WEIGHTS_FILE
  torch.save(file_sd, saved)
  loaded = inception.load_fid_inception(saved)
  expected = inception.convert_state_dict(sd)
  assert jax.tree.structure(loaded) == jax.tree.structure(expected)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(a, b)


def test_bad_images_are_refused():
  variables = {}  # the checks come before the network runs
  with pytest.raises(UserError, match=r"\[0, 1\]"):
    inception.fid_features(np.full((1, 8, 8, 3), 255.0, np.float32), variables)
  with pytest.raises(UserError, match="C = 1 or 3"):
    inception.fid_features(np.zeros((1, 8, 8, 4), np.uint8), variables)


def test_missing_torch_is_one_line(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
  with pytest.raises(UserError, match="needs torch"):
    inception.load_fid_inception(tmp_path / inception.WEIGHTS_FILE)
