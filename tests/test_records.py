"""The records of code and prepared datasets (vqjax/data/codes.py `encode_example`): read back by
a parser written here from the documented layout, records of the older .npz format still read,
a dataset of that format still read whole, and damaged records refused."""

import io
import json
import os
import struct

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from vqjax import errors
from vqjax.data import codes, prepared


def _parse(record: bytes) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """The layout as the module's comment describes it, read with struct and slices: the arrays
  and the dtypes the header names."""
  assert record[:4] == b"\x93VQJ"
  (size,) = struct.unpack("<I", record[4:8])
  pos, out, dtypes = 8 + size, {}, {}
  for name, dtype, shape in json.loads(record[8 : 8 + size].decode()):
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    out[name] = np.frombuffer(record[pos : pos + n], dtype).reshape(shape)
    dtypes[name] = dtype
    pos += n
  assert pos == len(record)
  return out, dtypes


def _hand_record(arrays: dict[str, np.ndarray]) -> bytes:
  """A record built here, with a header spaced differently from the module's."""
  header = json.dumps([[k, v.dtype.str, list(v.shape)] for k, v in arrays.items()], indent=1)
  head = header.encode()
  body = b"".join(v.tobytes() for v in arrays.values())
  return b"\x93VQJ" + struct.pack("<I", len(head)) + head + body


def test_written_records_follow_the_documented_layout():
  example = {
    "codes0": np.arange(12, dtype=np.uint16).reshape(3, 4).T,  # not C-contiguous
    "codes1": np.full((2, 2), 65535, np.uint16),
    "label": np.int32(-7),
    "big": np.arange(3, dtype=">i4"),  # stored little-endian
  }
  parsed, dtypes = _parse(codes.encode_example(example))
  assert list(parsed) == list(example)
  assert dtypes == {"codes0": "<u2", "codes1": "<u2", "label": "<i4", "big": "<i4"}
  for k, v in example.items():
    assert parsed[k].shape == np.shape(v)
    np.testing.assert_array_equal(parsed[k], v)


def test_hand_built_records_decode():
  arrays = {"codes0": np.array([[1, 2], [3, 4]], "<u2"), "label": np.array(5, "<i8")}
  back = codes.decode_example(_hand_record(arrays))
  assert back["codes0"].dtype == np.int32 and back["label"].shape == ()
  np.testing.assert_array_equal(back["codes0"], [[1, 2], [3, 4]])
  assert int(back["label"]) == 5
  image = {"image": np.arange(48, dtype=np.uint8).reshape(4, 4, 3), "label": np.array(2, "<i8")}
  loaded = codes.load_record(_hand_record(image))
  assert loaded["image"].dtype == np.uint8 and loaded["image"].flags.writeable
  np.testing.assert_array_equal(loaded["image"], image["image"])


def _npz(arrays) -> bytes:
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  return buffer.getvalue()


def test_records_of_the_older_npz_format_are_read():
  old = {"codes0": np.array([[9, 8]], np.uint16), "label": np.int32(4)}
  back = codes.decode_example(_npz(old))
  np.testing.assert_array_equal(back["codes0"], [[9, 8]])
  assert back["codes0"].dtype == np.int32 and int(back["label"]) == 4
  assert codes.load_record(_npz(old))["codes0"].dtype == np.uint16


@pytest.mark.parametrize(
  "damage, match",
  [
    (lambda r: r[:-1], "header accounts for"),  # cut short
    (lambda r: r[:10], "cut inside its"),  # cut inside the header
    (lambda r: r + b"\0", "header accounts for"),  # trailing bytes
    (lambda r: b"GIF8" + r[4:], "not a vqjax record"),
  ],
)
def test_damaged_records_are_refused(damage, match):
  record = codes.encode_example({"codes0": np.zeros((2, 2), np.uint16)})
  with pytest.raises(ValueError, match=match):
    codes.decode_example(damage(record))


def test_object_arrays_are_refused():
  with pytest.raises(ValueError, match="Python objects"):
    codes.encode_example({"names": np.array(["a", None], object)})


def test_a_code_dataset_of_the_older_format_is_read_whole(tmp_path):
  rng = np.random.default_rng(0)
  maps = rng.integers(0, 64, (5, 2, 2)).astype(np.uint16)
  writer = ArrayRecordWriter(str(tmp_path / codes.shard_name("train", 0, 1)), "group_size:1")
  for m in maps:
    writer.write(_npz({"codes0": m}))
  writer.close()
  meta = {
    "format": "vqjax-codes/1",
    "levels": [{"name": "top", "shape": [2, 2]}],
    "num_codes": 64,
    "image_shape": [8, 8, 1],
    "stage1": {"workdir": "hand-made", "step": 0, "fingerprint": "x"},
    "splits": {"train": {"num_examples": 5, "num_shards": 1}},
    "has_labels": False,
  }
  (tmp_path / "metadata.json").write_text(json.dumps(meta))
  source = codes.CodesSource(str(tmp_path), "train")
  got = np.stack([source[i]["codes0"] for i in range(len(source))])
  np.testing.assert_array_equal(got, maps.astype(np.int32))


@pytest.mark.parametrize("reader", ["codes", "prepared"])
def test_a_dataset_of_an_unknown_format_is_one_line(tmp_path, reader):
  os.makedirs(tmp_path, exist_ok=True)
  (tmp_path / "metadata.json").write_text(json.dumps({"format": "vqjax-codes/9"}))
  read = codes.read_metadata if reader == "codes" else prepared.read_metadata
  with pytest.raises(errors.UserError) as e:
    read(str(tmp_path))
  message = str(e.value)
  assert "\n" not in message and "'vqjax-codes/9'" in message
  assert f"'vqjax-{reader}/1' or 'vqjax-{reader}/2'" in message
