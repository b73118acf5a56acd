"""Durable rollout state: Ray's GCS key-value store by default, or a JSON file.

The controller saves here before it publishes a new routing table, so a restarted controller
resumes exactly where routing was.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Protocol

_NAMESPACE = "serve_canary"
Document = dict[str, Any]  # {"config": …, "state": …}


class StateStore(Protocol):
    def load(self) -> Document | None: ...

    def save(self, document: Document) -> None: ...


class GcsStore:
    """One key in the cluster's GCS; survives actor restarts, lives as long as the cluster."""

    def __init__(self, key: str) -> None:
        self._key = key.encode()

    def load(self) -> Document | None:
        from ray.experimental.internal_kv import _internal_kv_get

        raw = _internal_kv_get(self._key, namespace=_NAMESPACE)
        return None if raw is None else _document(raw)

    def save(self, document: Document) -> None:
        from ray.experimental.internal_kv import _internal_kv_put

        _internal_kv_put(self._key, json.dumps(document).encode(), overwrite=True, namespace=_NAMESPACE)


class FileStore:
    """A JSON file, replaced atomically (write to a temp file, fsync, rename)."""

    def __init__(self, path: Path) -> None:
        self._path = path

    def load(self) -> Document | None:
        try:
            return _document(self._path.read_bytes())
        except FileNotFoundError:
            return None

    def save(self, document: Document) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self._path.parent, prefix=f".{self._path.name}.")
        with os.fdopen(fd, "w") as out:
            json.dump(document, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self._path)


def _document(raw: bytes) -> Document:
    document = json.loads(raw)
    if not isinstance(document, dict):
        raise ValueError(f"a state document is a JSON object, not {type(document).__name__}")
    return document


def open_store(uri: str, app_name: str) -> StateStore:
    """`gcs` or `file:///abs/dir/or/file.json` (a directory gets `<app>.json` inside)."""
    if uri == "gcs":
        return GcsStore(f"rollout/{app_name}")
    path = Path(uri.removeprefix("file://"))
    return FileStore(path if path.suffix == ".json" else path / f"{app_name}.json")
