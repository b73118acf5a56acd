"""Durable rollout state: Ray's GCS key-value store by default, or a JSON file.

The controller saves here before it publishes a new routing table, so a restarted controller
resumes exactly where routing was.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Protocol

_NAMESPACE = "serve_canary"


class StateStore(Protocol):
    def load(self) -> dict | None: ...

    def save(self, document: dict) -> None: ...


class GcsStore:
    """One key in the cluster's GCS; survives actor restarts, lives as long as the cluster."""

    def __init__(self, key: str) -> None:
        self._key = key.encode()

    def load(self) -> dict | None:
        from ray.experimental.internal_kv import _internal_kv_get

        raw = _internal_kv_get(self._key, namespace=_NAMESPACE)
        return None if raw is None else json.loads(raw)

    def save(self, document: dict) -> None:
        from ray.experimental.internal_kv import _internal_kv_put

        _internal_kv_put(self._key, json.dumps(document).encode(), overwrite=True, namespace=_NAMESPACE)


class FileStore:
    """A JSON file, replaced atomically (write to a temp file, fsync, rename)."""

    def __init__(self, path: Path) -> None:
        self._path = path

    def load(self) -> dict | None:
        try:
            return json.loads(self._path.read_text())
        except FileNotFoundError:
            return None

    def save(self, document: dict) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self._path.parent, prefix=f".{self._path.name}.")
        with os.fdopen(fd, "w") as out:
            json.dump(document, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self._path)


def open_store(uri: str, app_name: str) -> StateStore:
    """`gcs` or `file:///abs/dir/or/file.json` (a directory gets `<app>.json` inside)."""
    if uri == "gcs":
        return GcsStore(f"rollout/{app_name}")
    path = Path(uri.removeprefix("file://"))
    return FileStore(path if path.suffix == ".json" else path / f"{app_name}.json")
