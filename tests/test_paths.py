"""vqjax/paths.py on local paths (tests/test_gcs.py runs the programs on a bucket): a URL is
never made local, and a local path behaves as `os.path` treats it."""

import os

import pytest

from vqjax import paths


@pytest.mark.parametrize("url", ["gs://bucket/run", "s3://bucket/a/b", "gs://bucket/run/"])
def test_a_url_stays_a_url(url, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert paths.is_remote(url)
  assert paths.absolute(url) == url.rstrip("/")
  assert not os.path.exists(tmp_path / "gs:") and not os.path.exists(tmp_path / "s3:")


def test_a_local_path_is_expanded_and_made_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert not paths.is_remote("run") and not paths.is_remote(tmp_path)
  assert paths.absolute("run") == os.path.join(str(tmp_path), "run")
  assert paths.absolute("~/run") == os.path.join(str(tmp_path), "home", "run")
  assert paths.absolute("a/../b") == os.path.join(str(tmp_path), "b")


def test_write_text_replaces_a_file_and_leaves_no_temporary_file(tmp_path):
  target = tmp_path / "record.json"
  target.write_text("old")
  paths.write_text(str(target), "new")
  assert target.read_text() == "new" and os.listdir(tmp_path) == ["record.json"]


def test_files_under_lists_every_file_relative_and_sorted(tmp_path):
  for rel in ("b/2.txt", "a/1.txt", "a/c/3.txt", "top.txt"):
    (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / rel).write_text(rel)
  expected = sorted(
    os.path.relpath(os.path.join(w, f), tmp_path) for w, _, fs in os.walk(tmp_path) for f in fs
  )
  assert paths.files_under(str(tmp_path)) == expected
  assert paths.getsize(str(tmp_path / "a" / "c" / "3.txt")) == len("a/c/3.txt")


def test_a_local_file_is_its_own_local_copy(tmp_path, monkeypatch):
  monkeypatch.setenv("VQJAX_CACHE", str(tmp_path / "cache"))
  path = str(tmp_path / "shard.array_record")
  assert paths.local_copy(path) == path
  assert not os.path.exists(tmp_path / "cache")  # nothing copied
