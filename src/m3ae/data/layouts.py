"""Layouts people already have, beyond shards, HDF5 and class folders: caption folders (`x.jpg` +
`x.txt`, img2dataset's `files` output), tables with their own column names and separator (open_clip's
CSV conventions) and img2dataset parquet. Each is a `Source`, so skip counting and the exact resume
of the loader apply unchanged; `data/factory.py` detects and opens them.
"""

from __future__ import annotations

import csv
import glob
import os
from pathlib import Path
from typing import Iterator, Sequence

from m3ae.data.config import TableColumns
from m3ae.data.sources import (FOLDER_IMAGE_EXTENSIONS, BadField, FolderSource, IndexedSource, ManifestSource, RawRecord,
                               Source, checked_label, load_json, open_table, read_regular)
from m3ae.utils import require

PARQUET_IMAGE_COLUMNS = ("jpg", "png", "webp", "image")


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in FOLDER_IMAGE_EXTENSIONS and path.is_file()


def _parquet_files(spec: str) -> list[str]:
    if os.path.isdir(spec):
        return sorted(glob.glob(os.path.join(spec, "*.parquet")))
    if any(ch in spec for ch in "*?["):
        return sorted(glob.glob(spec))
    return [spec] if os.path.isfile(spec) else []


class CaptionFolderSource(FolderSource):
    """Every image under `root`, recursively, with `<stem>.txt` as its caption; no labels."""

    def __init__(self, root: str, unit_size: int = 64) -> None:
        base = Path(root)
        if not base.is_dir():
            raise FileNotFoundError(f"data source {root!r}: folder does not exist")
        self.base, self.classes = base, []
        self.files = [(path, -1) for path in sorted(base.rglob("*")) if _is_image(path)]
        if not self.files:
            raise ValueError(f"data source {root!r}: no image file ({', '.join(FOLDER_IMAGE_EXTENSIONS)}) under it; "
                             f"a caption folder holds x.jpg + x.txt pairs, at any depth")
        IndexedSource.__init__(self, root, len(self.files), unit_size)


class TableSource(ManifestSource):
    """CSV, TSV or JSONL rows with user-named columns (`TableColumns`), read as a manifest: image
    paths relative to the table's directory (or absolute), caption, optional label and key."""

    def __init__(self, path: str, columns: TableColumns | None = None, unit_size: int = 64) -> None:
        self.columns = columns or TableColumns()
        super().__init__(path, unit_size)

    def _load(self, path: str) -> list[dict | None]:
        c = self.columns
        image = c.image or "image"
        names = {image: "image", c.caption: "caption", c.label: "label", c.key: "key"}
        with open_table(path) as handle:
            if path.lower().endswith((".jsonl", ".json")):
                rows = [_json_row(line) for line in handle if line.strip()]
            else:
                separator = c.separator or ("\t" if path.lower().endswith(".tsv") else ",")
                reader = csv.DictReader(handle, delimiter=separator)
                header = reader.fieldnames or []
                named = [image] + ([c.caption] if c.caption != TableColumns.caption else [])
                missing = [name for name in named if name not in header]
                if missing:
                    raise ValueError(
                        f"data source {path!r}: no column {missing[0]!r} (columns: {header}, separator "
                        f"{separator!r}); name yours with --csv-img-key / --csv-caption-key / --csv-separator")
                rows = list(reader)
        # A row without an image stays in place (as None) so that indices and counts remain stable.
        return [{names.get(k, k): v for k, v in row.items()} if row is not None and row.get(image) else None
                for row in rows]


def _json_row(line: str) -> dict | None:
    try:
        row = load_json(line)  # bounded nesting, no NaN: a hostile row is a counted skip
    except BadField:
        return None
    return row if isinstance(row, dict) else None


class ParquetSource(Source):
    """img2dataset's parquet output (or any parquet of images and captions): one unit per row group,
    read with pyarrow; the image column holds encoded bytes or a path relative to the file."""

    def __init__(self, spec: str, columns: TableColumns | None = None) -> None:
        pq = require("pyarrow.parquet", "parquet", f"data source {spec!r} (parquet)")
        self.name, self.columns = spec, columns or TableColumns()
        files = _parquet_files(spec)
        if not files:
            raise FileNotFoundError(f"data source {spec!r}: no .parquet file")
        self.groups: list[tuple[str, int]] = []
        for path in files:
            try:
                meta = pq.ParquetFile(path)
            except (OSError, ValueError) as error:  # pyarrow's messages do not name the file
                raise ValueError(f"data source {path!r}: not a readable parquet file ({error})") from None
            present = set(meta.schema_arrow.names)
            image = self.columns.image or next((c for c in PARQUET_IMAGE_COLUMNS if c in present), "")
            if image not in present:
                raise ValueError(f"data source {path!r}: no image column {image or PARQUET_IMAGE_COLUMNS} "
                                 f"(columns: {sorted(present)}); name it with --csv-img-key")
            self.groups += [(path, group) for group in range(meta.num_row_groups)]
        self._image = image

    def units(self) -> Sequence[int]:
        return range(len(self.groups))

    def read_unit(self, unit: int) -> Iterator[RawRecord]:
        import pyarrow.parquet as pq

        path, group = self.groups[unit]
        c = self.columns
        handle = pq.ParquetFile(path)
        wanted = [n for n in (self._image, c.caption, c.label, c.key) if n in handle.schema_arrow.names]
        table = handle.read_row_group(group, columns=wanted).to_pydict()
        rows = len(table[self._image])
        for i in range(rows):
            key = table[c.key][i] if c.key in table else None
            key = str(key) if key is not None else f"{Path(path).stem}/{group}/{i}"
            label = table[c.label][i] if c.label in table else None
            record = RawRecord(key=key, caption=table[c.caption][i] if c.caption in table else None, shard=path)
            try:
                record.label = checked_label(label) if label is not None else -1
            except BadField as bad:
                record.error = bad.reason
            value = table[self._image][i]
            if record.error:
                yield record
                continue
            if value is None:  # img2dataset keeps failed downloads as rows without image
                record.error = "missing_image"
            elif isinstance(value, str):
                try:
                    record.image = read_regular(Path(path).parent / value)
                except BadField as bad:
                    record.error = bad.reason
                except OSError:
                    record.error = "missing_file"
            else:
                record.image = bytes(value)
            yield record
