"""Where records come from: files, a ``datasets`` folder written by ``save_to_disk``, a Hugging
Face hub dataset, and a column mapping that renames any source's columns into the record format
(:mod:`loramoe.data`). Each source gives ``(where, raw row)`` pairs; a row a reader cannot parse
comes as the DataError saying why, so whether to skip it is decided in one place.

Files: ``.jsonl``/``.json`` (JSON Lines, or one JSON array), ``.csv`` (a header row; every cell
is text, "NA" too) and ``.parquet``, parsed with the json and csv modules and pyarrow rather than
``datasets.load_dataset``, whose JSON reader turns answers that look like dates into timestamps,
whose CSV reader (pandas) reads "NA" as missing and drops a first row's extra field, which names
no line for a problem, and which copies each Parquet file into its cache and fails on one without
rows. Records are held in memory anyway; ``tokenize_records`` returns a ``datasets.Dataset``.
``Record.source``, which starts every error, is ``path:line`` (1-based) for JSON Lines and CSV,
``path[i]`` (0-based) for JSON arrays and Parquet rows, ``<list>[i]`` for lists.

A hub source is ``hub:NAME[:SPLIT]`` or ``hub:NAME:CONFIG:SPLIT`` (``hub:trivia_qa:rc.nocontext:train``;
the split defaults to ``train``). Before anything is downloaded the hub is probed with a short
timeout, so an offline machine gets one clear line instead of a wait; with ``HF_HUB_OFFLINE=1`` the
probe is skipped and only the local cache is read.

A column mapping is ``{record field: spec}``: the spec is a column name, a dotted path into nested
columns (``answer.value``; a list on the way takes its first element), or ``@text`` for a constant
(``type=@knowledge``). Mapped fields replace the row: a row becomes exactly the mapped fields, so
a dataset's unrelated columns (``messages`` among them) cannot clash with the record's shape.
"""

from __future__ import annotations

import csv
import json
import os
import re
import socket
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.parquet as pq

from loramoe.errors import DataError, LoramoeError

HUB_PREFIX = "hub:"
RECORD_FIELDS = ("instruction", "input", "output", "messages", "type", "task_type")
_PROBE_SECONDS = 3.0


class SourceError(LoramoeError, ValueError):
    """A data source that cannot be read (the message names it)."""


def parse_columns(specs: Sequence[str] | Mapping[str, str] | None) -> dict[str, str]:
    """``["instruction=question", "output=answer.value,type=@knowledge"]`` (or a mapping) as a
    ``{field: spec}`` mapping, checked."""
    if specs is None:
        return {}
    pairs = list(specs.items()) if isinstance(specs, Mapping) else []
    for spec in ([] if isinstance(specs, Mapping) else specs):
        for part in filter(None, (p.strip() for p in spec.split(","))):
            field, sep, column = part.partition("=")
            if not sep or not field.strip() or not column.strip():
                raise SourceError(f"--columns {part!r}: expected field=column (e.g. instruction=question, "
                                  "output=answer.value, type=@knowledge)")
            pairs.append((field.strip(), column.strip()))
    mapping = dict(pairs)
    unknown = sorted(set(mapping) - set(RECORD_FIELDS))
    if unknown:
        raise SourceError(f"--columns: {', '.join(unknown)} is not a record field; map to {', '.join(RECORD_FIELDS)}")
    return mapping


def _lookup(row: Mapping[str, Any], spec: str, where: str) -> Any:
    if spec.startswith("@"):
        return spec[1:]
    value: Any = row
    walked = []
    for key in spec.split("."):
        if isinstance(value, list):  # answer.aliases.0 would be odd; a list's first element is the usual intent
            value = value[0] if value else None
        if not isinstance(value, Mapping) or key not in value:
            have = ", ".join(map(str, value)) if isinstance(value, Mapping) else type(value).__name__
            path = ".".join([*walked, key])
            raise DataError(f"{where}: column '{path}' (from --columns) is missing; the row has: {have}")
        value = value[key]
        walked.append(key)
    if isinstance(value, list):
        value = value[0] if value else None
    return value


def map_columns(entries: Iterable[tuple[str, object]], mapping: Mapping[str, str]) -> Iterator[tuple[str, object]]:
    """Each ``(where, row)`` with its row replaced by the mapped fields."""
    for where, row in entries:
        if mapping and isinstance(row, Mapping):
            try:
                row = {field: _lookup(row, spec, where) for field, spec in mapping.items()}
            except DataError as error:  # a bad row, to skip or stop on as the reader decides
                row = error
        yield where, row


def is_dataset_folder(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in ("state.json", "dataset_dict.json"))


def dataset_folder_entries(path: Path, split: str | None = None) -> tuple[str, Iterator[tuple[str, object]]]:
    """The rows of a ``save_to_disk`` folder (a Dataset, or one split of a DatasetDict: ``folder``
    takes ``train``, ``folder:validation`` names another)."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except (OSError, ValueError) as error:
        raise SourceError(f"{path}: not a readable datasets folder: {error}") from None
    name = str(path) if split is None else f"{path}:{split}"
    if isinstance(loaded, datasets.DatasetDict):
        split = split or "train"
        if split not in loaded:
            raise SourceError(f"{path}: no split '{split}'; it has {', '.join(loaded)} (name one as {path}:SPLIT)")
        loaded = loaded[split]
    elif split is not None:
        raise SourceError(f"{name}: the folder holds one dataset, not splits; drop ':{split}'")
    return name, ((f"{name}[{i}]", row) for i, row in enumerate(loaded))


def split_folder_spec(source: str) -> tuple[Path, str | None] | None:
    """``folder`` or ``folder:split`` when it names a datasets folder, else None."""
    path = Path(source)
    if is_dataset_folder(path):
        return path, None
    head, sep, split = source.rpartition(":")
    if sep and head and is_dataset_folder(Path(head)):
        return Path(head), split
    return None


def parse_hub(source: str) -> tuple[str, str | None, str]:
    """``hub:NAME[:SPLIT]`` or ``hub:NAME:CONFIG:SPLIT`` as ``(name, config, split)``."""
    parts = source[len(HUB_PREFIX):].split(":")
    if not parts[0] or len(parts) > 3 or not all(parts):
        raise SourceError(f"{source}: expected hub:NAME, hub:NAME:SPLIT or hub:NAME:CONFIG:SPLIT")
    if len(parts) == 1:
        return parts[0], None, "train"
    if len(parts) == 2:
        return parts[0], None, parts[1]
    return parts[0], parts[1], parts[2]


def hub_reachable(endpoint: str | None = None, timeout: float = _PROBE_SECONDS) -> str | None:
    """None if the hub answers a TCP connection within ``timeout`` seconds, else why not. The
    name is resolved in a thread so that a resolver with no network cannot stall the caller either."""
    from concurrent.futures import ThreadPoolExecutor
    from concurrent.futures import TimeoutError as FutureTimeout

    url = urlparse(endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)

    def connect() -> None:
        socket.create_connection((host, port), timeout=timeout).close()

    pool = ThreadPoolExecutor(max_workers=1)
    try:
        pool.submit(connect).result(timeout=timeout)
    except FutureTimeout:
        return f"no answer from {host}:{port} within {timeout:g} s"
    except OSError as error:
        return f"{host}:{port}: {error.strerror or error}"
    finally:
        pool.shutdown(wait=False)
    return None


def hub_entries(source: str) -> tuple[str, Iterator[tuple[str, object]]]:
    """The rows of a hub dataset's split, downloaded (or read from the cache) by ``datasets``."""
    name, config, split = parse_hub(source)
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") or \
        os.environ.get("HF_DATASETS_OFFLINE", "").lower() in ("1", "true", "yes")
    if not offline:
        why = hub_reachable()
        if why is not None:
            raise SourceError(f"{source}: the Hugging Face hub is not reachable ({why}); download the dataset "
                              "where it is and pass its save_to_disk folder, or set HF_HUB_OFFLINE=1 to read "
                              "a cached copy")
    import datasets

    try:
        loaded = datasets.load_dataset(name, config, split=split)
    except (OSError, ValueError, RuntimeError) as error:  # ConnectionError, DatasetNotFoundError, ...
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SourceError(f"{source}: cannot load it: {first}") from None
    return source, ((f"{source}[{i}]", row) for i, row in enumerate(loaded))


def open_source(source: str | os.PathLike | list[dict]) -> tuple[str, Iterable[tuple[str, object]]]:
    """The name of a source and its ``(where, raw record)`` pairs. A record a reader cannot parse
    comes as the DataError saying why, so whether to skip it is decided in one place."""
    if isinstance(source, list):
        return "<list>", ((f"<list>[{i}]", raw) for i, raw in enumerate(source))
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"a source is a path or a list of records, not {type(source).__name__}")
    if str(source).startswith(HUB_PREFIX):
        return hub_entries(str(source))
    if (folder := split_folder_spec(str(source))) is not None:
        return dataset_folder_entries(*folder)
    path = Path(source)
    if path.is_dir():
        raise DataError(f"{path}: a folder, but not one datasets' save_to_disk wrote (no state.json or "
                        "dataset_dict.json)")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unknown file type '{path.suffix}'; use .jsonl, .json, .csv or .parquet")
    return str(path), reader(path)


def _invalid_json(where: str, error: ValueError) -> DataError:
    detail = f"{error.msg} (column {error.colno})" if isinstance(error, json.JSONDecodeError) else error
    return DataError(f"{where}: invalid JSON: {detail}")


def _too_deep(where: str) -> DataError:
    return DataError(f"{where}: invalid JSON: nested too deeply to read (more than about {sys.getrecursionlimit()} "
                     "levels); a record holds strings and a list of messages")


_JSON_TOKEN = re.compile(rb'"(?:[^"\\]+|\\.)*"|[][{},\n]', re.DOTALL)


def _deepest(text: bytes) -> tuple[int, int]:
    """The line (1-based) and the item of the top-level array (0-based) where ``text`` is nested
    deepest: where the json module gave up, which its RecursionError does not say."""
    depth = deepest = item = 0
    lineno, at = 1, (1, 0)
    for mark in _JSON_TOKEN.findall(text):
        if mark == b"\n":
            lineno += 1
        elif mark in (b"[", b"{"):
            depth += 1
            if depth > deepest:
                deepest, at = depth, (lineno, item)
        elif mark in (b"]", b"}"):
            depth -= 1
        elif mark == b"," and depth == 1:
            item += 1
    return at


def _json_entries(path: Path) -> Iterator[tuple[str, object]]:
    with open(path, "rb") as f:
        if f.read(1 << 16).lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
            f.seek(0)
            text = f.read()
            try:
                items = json.loads(text)
            except ValueError as error:  # one broken array: nothing in it can be trusted, so never skipped
                where = f"{path}:{error.lineno}" if isinstance(error, json.JSONDecodeError) else str(path)
                raise _invalid_json(where, error) from None
            except RecursionError:
                lineno, item = _deepest(text)
                raise _too_deep(f"{path}:{lineno} (item {item} of the array)") from None
            yield from ((f"{path}[{i}]", item) for i, item in enumerate(items))
            return
        f.seek(0)
        for lineno, line in enumerate(f, 1):
            if line.strip():
                source = f"{path}:{lineno}"
                try:
                    yield source, json.loads(line)  # from bytes: a UTF-8 BOM on the first line is fine
                except ValueError as error:
                    yield source, _invalid_json(source, error)
                except RecursionError:  # a bad line like any other: skipped with --skip-bad-records
                    yield source, _too_deep(source)


def _csv_entries(path: Path) -> Iterator[tuple[str, object]]:
    end = 0  # the line the previous row ended on: quoted cells may span lines
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            rows = csv.reader(f, strict=True)  # strict: a stray quote is an error, not a swallowed line
            header = next(rows, None)
            if header is None:
                return
            end = rows.line_num
            for row in rows:
                source, end = f"{path}:{end + 1}", rows.line_num
                if len(row) <= 1 and not "".join(row).strip():  # a blank line, not a record
                    continue
                if len(row) != len(header):
                    problem = f"expected {len(header)} fields (as the header), found {len(row)}"
                    yield source, DataError(f"{source}: {problem}")
                else:
                    yield source, {key: value for key, value in zip(header, row) if value != ""}
    except csv.Error as error:  # the file cannot be split into rows after this point
        raise DataError(f"{path}:{end + 1}: invalid CSV: {error}") from None
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text: {error.reason}") from None


def _parquet_entries(path: Path) -> Iterator[tuple[str, object]]:
    try:
        rows = pq.read_table(path).to_pylist()
    except (OSError, pa.ArrowException) as error:
        raise DataError(f"{path}: cannot read Parquet: {error}") from None
    return ((f"{path}[{i}]", row) for i, row in enumerate(rows))


_READERS = {".jsonl": _json_entries, ".json": _json_entries, ".csv": _csv_entries,
            ".parquet": _parquet_entries}
