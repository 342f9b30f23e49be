"""Tests of vqjax/training/feed.py: the loop's input yields the host batches in order on the
devices, reads nothing past its limit, reads ahead on its helper thread when asked, and its
position is the one after the last batch handed out, never after one read ahead."""

import threading

import numpy as np
import pytest

from vqjax import configs
from vqjax.training import feed, sharding


class _Counting:
  """Host batches [i] * 8 for i = 0, 1, ...; the state is the index of the next one."""

  def __init__(self):
    self.next, self.readers = 0, []

  def __next__(self):
    self.readers.append(threading.current_thread().name)
    batch = {"x": np.full((8, 2), self.next, np.float32)}
    self.next += 1
    return batch

  def get_state(self):
    return {"next": self.next}


@pytest.mark.parametrize("read_ahead", [False, True])
def test_batches_in_order_with_the_position_after_each(read_ahead):
  host = _Counting()
  mesh = sharding.make_mesh(configs.base_config().mesh)
  batches = feed.DeviceFeed(host, mesh, limit=3, read_ahead=read_ahead)
  assert batches.get_state() == {"next": 0}
  seen = []
  for batch in batches:
    assert batch["x"].shape == (8, 2) and len(batch["x"].sharding.device_set) == 8
    seen.append(float(np.asarray(batch["x"])[0, 0]))
    # The position after the batch just handed out, whatever has been read ahead.
    assert batches.get_state() == {"next": len(seen)}
    start, end = batches.last_read
    assert 0 < start <= end
  batches.close()
  assert seen == [0.0, 1.0, 2.0]
  assert host.next == 3  # nothing read past the limit
  helper = ["vqjax-read"] * 2 if read_ahead else ["MainThread"] * 2
  assert [name.split("_")[0] for name in host.readers] == ["MainThread", *helper]
