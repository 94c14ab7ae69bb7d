"""The JSONL caption store: durable appends, resume, torn last lines, explicit overwrites, one writer."""

from __future__ import annotations

import json
import os

import pytest
from lock_holder import held_by_other_process

from capret.errors import CaptionStoreMismatchError
from capret.locks import OutputLockedError
from captioning.store import CaptionStore, StoreError, failures_path, read_captions, read_records


def record(key: str, caption: str = "a caption") -> dict:
    return {
        "key": key,
        "caption": caption,
        "dialogue": [{"q": "Describe it.", "a": caption}],
        "backend": "template",
        "model": {"name": "t"},
        "prompt_version": "capret-chat-v1",
        "created": "2025-01-01T00:00:00+00:00",
    }


def test_append_and_reopen(tmp_path) -> None:
    path = tmp_path / "c.jsonl"
    with CaptionStore(path) as store:
        store.append([record("d/1/1", "one"), record("d/1/2", "two")])
        store.append([])
        assert "d/1/1" in store and len(store) == 2
    with CaptionStore(path) as store:
        assert store.done_keys == {"d/1/1", "d/1/2"}
        assert store.truncated_tail == b""
    assert read_captions(path) == {"d/1/1": "one", "d/1/2": "two"}
    lines = path.read_text().splitlines()
    assert [json.loads(line)["key"] for line in lines] == ["d/1/1", "d/1/2"]


def test_torn_last_line_is_reported_cut_and_not_corrupting_the_next_append(tmp_path) -> None:
    path = tmp_path / "c.jsonl"
    with CaptionStore(path) as store:
        store.append([record("d/1/1")])
    good = path.read_bytes()
    partial = json.dumps(record("d/1/2")).encode()[:37]
    path.write_bytes(good + partial)  # what kill -9 in the middle of a write leaves
    assert read_captions(path) == {"d/1/1": "a caption"}  # readers ignore the torn tail
    with CaptionStore(path) as store:
        assert store.truncated_tail == partial
        assert store.done_keys == {"d/1/1"}
        assert path.read_bytes() == good  # cut before anything is appended
        store.append([record("d/1/2", "second")])
    assert read_captions(path) == {"d/1/1": "a caption", "d/1/2": "second"}
    assert path.read_bytes().startswith(good)


def test_corrupt_line_in_the_middle_is_an_error_naming_the_line(tmp_path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps(record("a")) + "\n{broken\n" + json.dumps(record("b")) + "\n")
    with pytest.raises(StoreError, match=r"c.jsonl:2: not valid JSON"):
        read_captions(path)
    with pytest.raises(StoreError, match=r":2: not valid JSON"):
        CaptionStore(path).open()
    path.write_text(json.dumps({"key": "a"}) + "\n")
    with pytest.raises(StoreError, match=r":1: record lacks field\(s\) \['caption'"):
        read_records(path)


def test_duplicate_keys_need_an_explicit_overwrite(tmp_path) -> None:
    path = tmp_path / "c.jsonl"
    with CaptionStore(path) as store:
        store.append([record("a", "old")])
        with pytest.raises(StoreError, match="already captioned"):
            store.append([record("a", "new")])
        with pytest.raises(ValueError, match="twice"):
            store.append([record("b"), record("b")])
    with CaptionStore(path, overwrite=True) as store:
        store.append([record("a", "new")])
    assert read_captions(path) == {"a": "new"}  # the later, explicitly marked line wins
    assert json.loads(path.read_text().splitlines()[1])["overwrite"] is True
    # an unmarked duplicate (e.g. two files concatenated) is refused, never silently replaced
    path.write_text(json.dumps(record("x", "1")) + "\n" + json.dumps(record("x", "2")) + "\n")
    with pytest.raises(StoreError, match="key 'x' appears on lines 1 and 2"):
        read_captions(path)


def test_only_one_writer_at_a_time(tmp_path) -> None:
    path = tmp_path / "c.jsonl"
    with CaptionStore(path):
        with pytest.raises(
            OutputLockedError, match=f"caption store {path} is being written by PID {os.getpid()}"
        ):
            CaptionStore(path).open()
    with CaptionStore(path):  # released on close
        pass


def test_a_store_held_by_another_process_is_refused_and_not_created(tmp_path) -> None:
    path = tmp_path / "c.jsonl"
    with held_by_other_process(path, what="caption store") as pid:
        with pytest.raises(OutputLockedError, match=f"PID {pid}"):
            CaptionStore(path).open()
    assert not path.exists() and not failures_path(path).exists()  # a refused run leaves nothing behind


def test_a_store_that_fails_to_open_leaves_no_empty_file(tmp_path) -> None:
    path = tmp_path / "c.jsonl"
    with CaptionStore(path, binding={"dataset": "df2"}) as store:
        store.append([record("a", "x")])
    other = tmp_path / "d.jsonl"
    other.write_bytes(path.read_bytes())
    with pytest.raises(CaptionStoreMismatchError):
        CaptionStore(other, binding={"dataset": "fiq"}).open()
    assert other.read_bytes() == path.read_bytes()  # an existing store is never removed


def test_failures_log_survives_a_torn_line(tmp_path) -> None:
    path = tmp_path / "caps.jsonl"
    assert failures_path(path) == tmp_path / "caps.failures.jsonl"
    with CaptionStore(path) as store:
        store.append_failures([{"key": "a", "reason": "timeout"}])
        with open(store.failures_path, "ab") as fh:
            fh.write(b'{"key": "b", "rea')  # killed mid-write
        store.append_failures([{"key": "c", "reason": "HTTP 500"}])
        assert "a" not in store  # failed keys stay not-done, so the next run retries them
    lines = failures_path(path).read_text().splitlines()
    assert json.loads(lines[0])["key"] == "a" and json.loads(lines[-1]) == {"key": "c", "reason": "HTTP 500"}


def test_append_requires_open_store_and_complete_records(tmp_path) -> None:
    store = CaptionStore(tmp_path / "c.jsonl")
    with pytest.raises(RuntimeError, match="not open"):
        store.append([record("a")])
    with store, pytest.raises(ValueError, match="lacks field"):
        store.append([{"key": "a", "caption": "x"}])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_captions(tmp_path / "missing.jsonl")
