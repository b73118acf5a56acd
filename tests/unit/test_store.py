"""The file state store: atomic replacement, where the file goes, what it refuses to load."""

from __future__ import annotations

import json

import pytest

from serve_canary.store import FileStore, open_store


def test_a_saved_document_loads_back_and_no_temporary_file_is_left(tmp_path):
    store = open_store(f"file://{tmp_path}/state.json", "llm")
    assert store.load() is None
    store.save({"config": {"a": 1}, "state": {"b": [1, 2]}})
    store.save({"config": {"a": 2}, "state": {}})
    assert store.load() == {"config": {"a": 2}, "state": {}}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_a_directory_uri_holds_one_file_per_app(tmp_path):
    open_store(f"file://{tmp_path}/states", "llm").save({"state": 1})
    open_store(f"file://{tmp_path}/states", "other").save({"state": 2})
    assert sorted(p.name for p in (tmp_path / "states").iterdir()) == ["llm.json", "other.json"]


def test_a_document_that_is_not_an_object_is_refused(tmp_path):
    path = tmp_path / "state.json"
    path.write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="JSON object"):
        FileStore(path).load()
