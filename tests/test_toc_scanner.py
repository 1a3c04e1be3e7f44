"""The streaming TOC scanner: entries decoded many per call (cut at a ``},``) must be exactly
the document's entries, whatever the names hold, and malformed JSON is still reported with
its position."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stargzfs.errors import FormatError
from stargzfs.formats import toc as toc_module
from stargzfs.formats.toc import iter_toc_entries

# Names that put "}," (and "},{") where a cut could be tried: inside strings, and nested
# objects (xattrs) closed before more keys.
TRICKY = [
    'a"},{"name":"b","type":"reg"}',
    "},",
    "}, ",
    '"},{"',
    "x},{y},{z",
    '\\"},{\\"',
    "}],",
    "é},ü",
]


def entries_of(names: list[str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, name in enumerate(names):
        entry: dict[str, Any] = {"name": f"d/{name}-{i}", "type": "reg", "size": 0}
        if i % 3 == 1:
            entry = {"xattrs": {"user.k": "dg==", "x},": "eQ=="}, **entry, "mode": 420}
        out.append(entry)
    return out


def document(entries: list[dict[str, Any]], indent: int | None = None) -> str:
    return json.dumps({"version": 1, "entries": entries}, indent=indent, ensure_ascii=False)


class CountingDecoder(json.JSONDecoder):
    batches = 0

    def decode(self, s: str, *args: Any, **kwargs: Any) -> Any:
        CountingDecoder.batches += 1
        return super().decode(s, *args, **kwargs)


@pytest.fixture
def counting(monkeypatch: pytest.MonkeyPatch) -> type[CountingDecoder]:
    CountingDecoder.batches = 0
    monkeypatch.setattr(toc_module, "_DECODER", CountingDecoder())
    return CountingDecoder


@pytest.mark.parametrize("batch", [1, 40, 200, 1 << 16])
@pytest.mark.parametrize("window", [7, 300, 4 << 20])
@pytest.mark.parametrize("indent", [None, 1])
def test_cuts_inside_strings_and_nested_objects_fall_back_to_the_same_entries(
    monkeypatch: pytest.MonkeyPatch,
    counting: type[CountingDecoder],
    batch: int,
    window: int,
    indent: int | None,
) -> None:
    monkeypatch.setattr(toc_module, "_BATCH", batch)
    monkeypatch.setattr(toc_module, "_WINDOW", window)
    entries = entries_of(TRICKY * 20)
    doc = document(entries, indent)
    raw = doc.encode()
    for data in (doc, raw, [raw[i : i + 5] for i in range(0, len(raw), 5)]):
        assert list(iter_toc_entries(data)) == entries
    if batch > 40 and window > 7:
        assert counting.batches > 0  # the many-per-call path was taken


def test_a_whole_window_of_decoys_is_decoded_one_by_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every cut fails (the last "}," of each batch is inside a name): still all entries."""
    monkeypatch.setattr(toc_module, "_BATCH", 64)
    entries = [{"name": "n" * 40 + "},},},},},", "type": "dir"} for _ in range(50)]
    assert list(iter_toc_entries(document(entries))) == entries


@settings(max_examples=150, deadline=None)
@given(
    names=st.lists(st.text(alphabet='ab},{[]":\\ \n', max_size=12), max_size=30),
    batch=st.integers(1, 300),
    indent=st.sampled_from([None, 0, 2]),
)
def test_any_names_decode_like_json_loads(names: list[str], batch: int, indent: int | None) -> None:
    entries = entries_of(names)
    doc = document(entries, indent)
    old = toc_module._BATCH
    toc_module._BATCH = batch
    try:
        assert list(iter_toc_entries(doc)) == json.loads(doc)["entries"]
    finally:
        toc_module._BATCH = old


def json_error_position(doc: str) -> int:
    with pytest.raises(json.JSONDecodeError) as info:
        json.loads(doc)
    return info.value.pos


@pytest.mark.parametrize(
    "damage",
    [
        ('"name": "d/}, -10", "type"', '"name": "d/}, -10" "type"'),
        ('"d/x},{y},{z-12", "type"', '"d/x},{y},{z-12", "type" 1'),
        ('"d/\\"},{\\"-11"', '"d/\\"},{\\x-11"'),
        ('"mode": 420}, {"name": "d/\\"},{\\"-11"', '"mode": 420},, {"name": "d/\\"},{\\"-11"'),
        ('"size": 0}]}', '"size": 0}'),
    ],
)
def test_malformed_json_inside_a_batch_is_reported_with_its_position(
    damage: tuple[str, str],
) -> None:
    doc = document(entries_of(TRICKY * 3))
    good, bad = damage
    assert good in doc
    broken = doc.replace(good, bad, 1)
    where = json_error_position(broken)
    with pytest.raises(FormatError, match=rf"invalid TOC JSON.* at character {where}\b"):
        list(iter_toc_entries(broken))
    # The same when the document arrives as bytes in small pieces.
    raw = broken.encode()
    with pytest.raises(FormatError, match=rf"at character {where}\b"):
        list(iter_toc_entries(raw[i : i + 100] for i in range(0, len(raw), 100)))


def test_a_non_object_entry_in_a_batch_is_named_by_its_index() -> None:
    doc = (
        '{"version": 1, "entries": [{"name": "a", "type": "dir"}, 5, {"name": "b", "type": "dir"}]}'
    )
    with pytest.raises(FormatError, match=re.escape("TOC entry #1 is not an object")):
        list(iter_toc_entries(doc))
