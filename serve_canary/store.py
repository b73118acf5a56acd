"""Durable rollout state: Ray's GCS key-value store by default, or a JSON file.

The controller saves here before it publishes a new routing table, so a restarted controller
resumes exactly where routing was. A document that cannot be read raises `StateUnreadable`
naming where it is and what is wrong; the controller reports it and never overwrites it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Protocol

_NAMESPACE = "serve_canary"
Document = dict[str, Any]  # {"config": …, "state": …}


class StateUnreadable(Exception):
    """The stored state exists but cannot be read or parsed."""


class StateStore(Protocol):
    location: str  # where the document lives, for messages

    def load(self) -> Document | None:
        """The saved document, None if there is none; `StateUnreadable` if it is damaged."""
        ...

    def save(self, document: Document) -> None: ...


class GcsStore:
    """One key in the cluster's GCS; survives actor restarts, lives as long as the cluster."""

    def __init__(self, key: str) -> None:
        self._key = key.encode()
        self.location = f"gcs://{_NAMESPACE}/{key}"

    def load(self) -> Document | None:
        from ray.experimental.internal_kv import _internal_kv_get

        raw = _internal_kv_get(self._key, namespace=_NAMESPACE)
        return None if raw is None else _document(raw, self.location)

    def save(self, document: Document) -> None:
        from ray.experimental.internal_kv import _internal_kv_put

        _internal_kv_put(self._key, json.dumps(document).encode(), overwrite=True, namespace=_NAMESPACE)


class FileStore:
    """A JSON file, replaced atomically (write a temp file, fsync, rename, fsync the directory);
    the previous good document is kept beside it as `<name>.previous`."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self.previous = path.with_name(path.name + ".previous")
        self.location = str(path)

    def load(self) -> Document | None:
        try:
            raw = self._path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateUnreadable(f"{self.location}: {exc.strerror or exc}") from None
        return _document(raw, self.location)

    def save(self, document: Document) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        try:
            current = self._path.read_bytes()
            _document(current, self.location)
        except (FileNotFoundError, StateUnreadable):
            pass
        else:
            self._replace(self.previous, current)
        self._replace(self._path, json.dumps(document).encode())

    def _replace(self, path: Path, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def _document(raw: bytes, location: str) -> Document:
    try:
        document = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise StateUnreadable(f"{location}: not JSON ({exc})") from None
    if not isinstance(document, dict) or not isinstance(document.get("state"), dict):
        raise StateUnreadable(f"{location}: not a serve-canary state document (a JSON object with a state)")
    return document


def open_store(uri: str, app_name: str) -> StateStore:
    """`gcs` or `file:///abs/dir/or/file.json` (a directory gets `<app>.json` inside)."""
    if uri == "gcs":
        return GcsStore(f"rollout/{app_name}")
    path = Path(uri.removeprefix("file://"))
    return FileStore(path if path.suffix == ".json" else path / f"{app_name}.json")
