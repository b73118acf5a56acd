"""The file state store: atomic replacement, the previous good copy, what it refuses to load."""

from __future__ import annotations

import json

import pytest

from serve_canary.store import FileStore, StateUnreadable, open_store


def test_a_saved_document_loads_back_and_the_previous_one_is_kept(tmp_path):
    store = open_store(f"file://{tmp_path}/state.json", "llm")
    assert store.load() is None
    store.save({"config": {"a": 1}, "state": {"b": [1, 2]}})
    store.save({"config": {"a": 2}, "state": {}})
    assert store.load() == {"config": {"a": 2}, "state": {}}
    assert json.loads((tmp_path / "state.json.previous").read_text()) == {"config": {"a": 1}, "state": {"b": [1, 2]}}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "state.json.previous"]  # no temp file left


def test_a_directory_uri_holds_one_file_per_app(tmp_path):
    open_store(f"file://{tmp_path}/states", "llm").save({"state": {}})
    open_store(f"file://{tmp_path}/states", "other").save({"state": {}})
    assert sorted(p.name for p in (tmp_path / "states").iterdir()) == ["llm.json", "other.json"]


@pytest.mark.parametrize(
    "content", [b"{not json", b"\xff\xfe", b"[1, 2]", b'{"config": {}}', b"[" * 100_000 + b"]" * 100_000]
)
def test_a_damaged_document_is_unreadable_naming_the_file_and_a_save_keeps_no_damaged_copy(tmp_path, content):
    path = tmp_path / "state.json"
    path.write_bytes(content)
    store = FileStore(path)
    with pytest.raises(StateUnreadable, match=str(path)):
        store.load()
    store.save({"state": {"ok": True}})
    assert not store.previous.exists()  # only a good document becomes the previous copy
