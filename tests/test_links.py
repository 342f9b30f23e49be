"""How runs record the runs they depend on (vqjax/links.py): relative within one parent
directory, so a pipeline workdir can move; absolute otherwise. Expected strings are written out
by hand."""

import ml_collections
import pytest

from vqjax import links


@pytest.mark.parametrize(
  "target, base, want",
  [
    ("/w/pipe/stage1", "/w/pipe/codes", "../stage1"),  # stages of one pipeline workdir
    ("/w/pipe/stage1/", "/w/pipe/prior_top/", "../stage1"),
    ("/w/pipe/codes", "/w/pipe/stage1/sub", "/w/pipe/codes"),  # outside base's parent
    ("/w/pipe/stage1", "/w/other/codes", "/w/pipe/stage1"),
    ("/w/pipe/samples/inner", "/w/pipe/samples", "./inner"),
    ("/w/pipe", "/w/pipe/samples", ".."),
    ("/stage1", "/codes", "/stage1"),  # the parent is the root: nothing is gained
    ("gs://b/pipe/stage1", "gs://b/pipe/codes", "../stage1"),
    ("gs://b/pipe/stage1", "gs://c/pipe/codes", "gs://b/pipe/stage1"),  # never across buckets
    ("gs://b/pipe/stage1", "/w/pipe/codes", "gs://b/pipe/stage1"),
    ("/w/pipe/stage1", "gs://b/w/pipe", "/w/pipe/stage1"),
    ("", "/w/pipe/codes", ""),
  ],
)
def test_record(target, base, want):
  assert links.record(target, base) == want


def test_record_makes_a_local_path_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert links.record("stage1", "/w/x/codes") == str(tmp_path / "stage1")


@pytest.mark.parametrize(
  "recorded, base, want",
  [
    ("../stage1", "/w/pipe/codes", "/w/pipe/stage1"),
    ("./inner", "/w/pipe/samples", "/w/pipe/samples/inner"),
    ("..", "/w/pipe/samples", "/w/pipe"),
    ("../stage1", "gs://b/pipe/codes", "gs://b/pipe/stage1"),
    # Records from before relative ones were written read as they always did.
    ("/old/abs/stage1", "/w/pipe/codes", "/old/abs/stage1"),
    ("runs/stage1", "/w/pipe/codes", "runs/stage1"),
    ("gs://b/x", "/w/pipe/codes", "gs://b/x"),
    ("", "/w/pipe/codes", ""),
  ],
)
def test_resolve(recorded, base, want):
  assert links.resolve(recorded, base) == want


@pytest.mark.parametrize("moved_to", ["/elsewhere/copy", "gs://bucket/copy"])
def test_a_moved_pipeline_resolves_inside_its_new_place(moved_to):
  recorded = links.record("/w/pipe/stage1", "/w/pipe/prior_top")
  assert links.resolve(recorded, f"{moved_to}/prior_top") == f"{moved_to}/stage1"


def test_config_links_round_trip_and_leave_the_input_alone():
  config = ml_collections.ConfigDict(
    {
      "data": {"codes_dir": "/w/pipe/codes", "batch_size": 8},
      "prior": {"stage1": "/w/pipe/stage1", "level": 1},
    }
  )
  recorded = links.recorded_config(config, "/w/pipe/prior_bottom")
  assert recorded.data.codes_dir == "../codes" and recorded.prior.stage1 == "../stage1"
  assert recorded.data.batch_size == 8 and recorded.prior.level == 1
  assert config.data.codes_dir == "/w/pipe/codes"  # a copy was changed
  back = links.resolved_config(recorded, "/moved/prior_bottom")
  assert back.data.codes_dir == "/moved/codes" and back.prior.stage1 == "/moved/stage1"


def test_a_config_without_the_link_fields_is_left_as_it_is():
  config = ml_collections.ConfigDict({"data": {"name": "fashion_mnist"}})
  assert links.recorded_config(config, "/w/x").to_dict() == {"data": {"name": "fashion_mnist"}}
