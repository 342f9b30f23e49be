"""`python tests/gcs_emulator.py start --port P --default-bucket B --in-memory`: the
`gcp-storage-emulator` program, with one gap filled so that TensorStore can use it.

GCS answers an object's download with its generation in the `x-goog-generation` header, and
TensorStore's `gcs` driver (which Orbax writes and reads arrays with) needs that number for its
conditional writes ("Malformed StorageGeneration" without it); the emulator (2026.7.19) sends
it in the object's JSON metadata only. Everything else is the emulator as installed.
"""

import sys

from gcp_storage_emulator import server
from gcp_storage_emulator.__main__ import main
from gcp_storage_emulator.handlers import objects

_download_without_generation = objects.download


def _download(request, response, storage, *args, **kwargs):
  _download_without_generation(request, response, storage, *args, **kwargs)
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
  except Exception:  # not found: the download above answered 404 already
    return
  response["x-goog-generation"] = str(obj["generation"])
  response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))


objects.download = _download  # what `objects.get` calls for `?alt=media`
for _, methods in server.HANDLERS:
  for method, handler in methods.items():
    if handler is _download_without_generation:
      methods[method] = _download

if __name__ == "__main__":
  sys.exit(main())
