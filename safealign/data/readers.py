"""Read tabular data from the formats users have: jsonl, json (array), csv, parquet (each
optionally .gz), a saved HF dataset directory, or a hub dataset name.

Every reader returns a list of plain dicts (rows) and raises BadInput naming the file when the
input cannot be read.
"""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

from safealign.errors import BadInput

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def _open_text(path: Path) -> str:
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except OSError as e:
            raise BadInput(f"not a valid gzip file ({e})", where=str(path)) from None
    try:
        return raw.decode("utf-8-sig")  # a UTF-8 byte-order mark (Excel, Notepad) is dropped
    except UnicodeDecodeError as e:
        raise BadInput(f"not UTF-8 text (byte {e.start})", where=str(path), fix="re-save the file as UTF-8") from None


def _kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return suffix
    raise BadInput(f"unknown data format '{path.suffix}'", where=str(path), fix=f"use one of {', '.join(SUFFIXES)} (optionally .gz), or a saved HF dataset directory")


def read_rows(source: str, split: str = "train", *, config: str | None = None, revision: str | None = None) -> list[dict]:
    """Rows of a data source (file, HF dataset directory or hub name; ``config`` and ``revision`` apply
    to a hub name only)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return _read_hf_dir(path, split)
    if path.is_file():
        return _read_file(path)
    looks_like_path = source.startswith((".", "/", "~")) or any(source.lower().endswith(s) or source.lower().endswith(s + ".gz") for s in SUFFIXES)
    if looks_like_path or source.count("/") != 1:
        raise BadInput("data file not found", where=source, fix="check the path, or give a hub dataset name like 'org/name'")
    return _read_hub(source, split, config, revision)


def read_data(cfg, source: str) -> list[dict]:
    """Rows of ``source`` with the hub options of a stage config (data_split, data_config, data_revision)."""
    return read_rows(source, cfg.data_split, config=getattr(cfg, "data_config", None), revision=getattr(cfg, "data_revision", None))


def _read_file(path: Path) -> list[dict]:
    kind = _kind(path)
    if kind == ".parquet":
        import pyarrow.parquet as pq

        try:
            data = path.read_bytes()
            if path.suffix == ".gz":
                data = gzip.decompress(data)
            return pq.read_table(io.BytesIO(data)).to_pylist()
        except Exception as e:  # pyarrow raises several types
            raise BadInput(f"cannot read parquet ({e})", where=str(path)) from None
    text = _open_text(path)
    if kind == ".jsonl":
        rows = []
        for i, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise BadInput(f"line {i} is not valid JSON ({e.msg})", where=str(path)) from None
            if not isinstance(row, dict):
                raise BadInput(f"line {i} is not a JSON object", where=str(path))
            rows.append(row)
        return rows
    if kind == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise BadInput(f"not valid JSON (line {e.lineno}: {e.msg})", where=str(path)) from None
        if isinstance(data, dict):  # {"train": [...]} or column-oriented {"col": [...]}
            if all(isinstance(v, list) for v in data.values()) and len({len(v) for v in data.values()}) == 1:
                keys = list(data)
                return [dict(zip(keys, vals)) for vals in zip(*data.values())]
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise BadInput("a .json data file must hold an array of objects", where=str(path), fix="use a JSON array of rows, or .jsonl")
        return data
    import csv

    try:
        return [dict(r) for r in csv.DictReader(io.StringIO(text))]
    except csv.Error as e:
        raise BadInput(f"cannot parse CSV ({e})", where=str(path)) from None


def _read_hf_dir(path: Path, split: str) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise BadInput(f"not a saved HF dataset directory ({e})", where=str(path), fix="point --data at a file, or at a directory written by Dataset.save_to_disk") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise BadInput(f"split '{split}' not found (available: {', '.join(ds)})", where=str(path), fix="pass --data-split")
        ds = ds[split]
    return ds.to_list()


def _read_hub(name: str, split: str, config: str | None = None, revision: str | None = None) -> list[dict]:
    from safealign.runtime import hub

    hub.require(name, "dataset", kind="dataset", revision=revision)
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split, revision=revision)
    except Exception as e:
        raise hub.load_error(e, name, "the dataset") from None
    return ds.to_list()
