"""Readers for every supported layout, all reduced to `Source`: a fixed list of units (shards),
each readable on its own into undecoded `RawRecord`s in a fixed order.

Owning the unit list is what makes the pipeline resumable: the loader permutes units per epoch,
splits them across ranks and workers, and can skip whole units without reading them.
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from m3ae.data.transforms import SkipSample

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
FOLDER_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass
class RawRecord:
    """One undecoded sample. `error` names the skip reason when the container itself is broken."""

    key: str
    image: bytes | None = None
    caption: bytes | str | None = None
    label: int = -1
    error: str = ""


def decode_caption(raw: bytes | str | None) -> str:
    """Caption text, stripped; non-UTF-8 bytes are a skip, a missing caption is empty."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise SkipSample("caption_not_utf8") from error
    return (raw or "").strip()


class Source:
    """A dataset cut into independently readable units."""

    name: str

    def units(self) -> Sequence[int]:
        raise NotImplementedError

    def read_unit(self, unit: int) -> Iterator[RawRecord]:
        raise NotImplementedError


def _is_remote(url: str) -> bool:
    return url.startswith("pipe:") or "://" in url and not url.startswith("file://")


def expand_shards(pattern: str) -> list[str]:
    """Shard list from "a.tar::b-{000..009}.tar", globs, directories of tars, URLs and `pipe:`."""
    from webdataset.shardlists import expand_urls

    shards: list[str] = []
    for url in expand_urls(pattern):
        if _is_remote(url):
            shards.append(url)
            continue
        path = url.removeprefix("file://")
        if any(ch in path for ch in "*?["):
            matches = sorted(glob.glob(path))
            if not matches:
                raise FileNotFoundError(f"data source {pattern!r}: glob {path!r} matches no file")
            shards.extend(matches)
        elif os.path.isdir(path):
            matches = sorted(glob.glob(os.path.join(path, "*.tar")))
            if not matches:
                raise FileNotFoundError(f"data source {pattern!r}: directory {path!r} holds no .tar shard")
            shards.extend(matches)
        elif os.path.isfile(path):
            shards.append(path)
        else:
            raise FileNotFoundError(f"data source {pattern!r}: shard {path!r} does not exist")
    if not shards:
        raise FileNotFoundError(f"data source {pattern!r}: expands to no shard")
    return shards


def _split_member_name(name: str) -> tuple[str, str]:
    # WebDataset convention: the key is everything up to the first dot of the file name; like its
    # decoders we type a member by the last part of the extension ("x.seg.png" is a PNG).
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{directory}/{stem}" if directory else stem
    return key, ext.rpartition(".")[2].lower() if dot else ""


def _parse_label(text: bytes | str | None) -> int:
    if text is None:
        return -1
    try:
        return int(text.decode() if isinstance(text, bytes) else text)
    except (UnicodeDecodeError, ValueError):
        return -1


class WebDatasetSource(Source):
    """img2dataset-style tar shards: `{key}.jpg|png|webp` + `{key}.txt` (+ `.json`, `.cls`).

    Shards are opened with `webdataset.gopen` (local files, URLs, `pipe:`) and walked with
    `tarfile` in stream mode so that members can be grouped and validated by us: a broken member
    or a truncated shard becomes a counted skip, never a crash.
    """

    def __init__(self, pattern: str) -> None:
        self.name = pattern
        self.shards = expand_shards(pattern)

    def units(self) -> Sequence[int]:
        return range(len(self.shards))

    def read_unit(self, unit: int) -> Iterator[RawRecord]:
        import webdataset as wds

        url = self.shards[unit]
        try:
            stream = wds.gopen(url)
        except Exception as error:  # gopen raises OSError, ValueError or subprocess errors
            yield RawRecord(key=url, error="unreadable_shard")
            _warn_once(f"cannot open shard {url}: {error}")
            return
        group_key, members = None, {}
        try:
            with stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    key, ext = _split_member_name(info.name)
                    if key != group_key:
                        if group_key is not None:
                            yield self._record(group_key, members)
                        group_key, members = key, {}
                    members[ext] = tar.extractfile(info).read()
        except (tarfile.TarError, OSError, EOFError) as error:
            if group_key is None:  # nothing readable at all: a bad path, URL or command
                _warn_once(f"cannot read shard {url}: {error}")
                yield RawRecord(key=url, error="unreadable_shard")
                return
            # Members of the interrupted group may be incomplete: report the shard, drop the group.
            _warn_once(f"shard {url} is truncated or corrupt at key {group_key!r}: {error}")
            yield RawRecord(key=f"{url}:{group_key}", error="truncated_shard")
            return
        if group_key is not None:
            yield self._record(group_key, members)

    @staticmethod
    def _record(key: str, members: dict[str, bytes]) -> RawRecord:
        image = next((members[ext] for ext in IMAGE_EXTENSIONS if ext in members), None)
        label = _parse_label(members.get("cls"))
        if label < 0 and "json" in members:
            try:
                meta = json.loads(members["json"])
                label = int(meta.get("label", -1)) if isinstance(meta, dict) else -1
            except (ValueError, TypeError):
                label = -1
        error = "" if image is not None else "missing_image"
        return RawRecord(key=key, image=image, caption=members.get("txt"), label=label, error=error)


class IndexedSource(Source):
    """Random-access data cut into fixed-size units so it can share the shard machinery."""

    def __init__(self, name: str, length: int, unit_size: int) -> None:
        if length == 0:
            raise ValueError(f"data source {name!r} holds no sample")
        self.name = name
        self.length = length
        self.unit_size = max(1, unit_size)

    def units(self) -> Sequence[int]:
        return range((self.length + self.unit_size - 1) // self.unit_size)

    def ensure_units(self, count: int) -> None:
        """Cut finer when there are fewer units than readers (random access makes that free)."""
        if len(self.units()) < count:
            self.unit_size = max(1, self.length // count)

    def read_unit(self, unit: int) -> Iterator[RawRecord]:
        start = unit * self.unit_size
        for index in range(start, min(start + self.unit_size, self.length)):
            yield self.read(index)

    def read(self, index: int) -> RawRecord:
        raise NotImplementedError


def _as_bytes(value) -> bytes:
    import numpy as np

    if isinstance(value, bytes):
        return value
    if isinstance(value, np.ndarray):
        return value.tobytes()
    if isinstance(value, np.void):
        return bytes(value)
    if isinstance(value, str):
        return value.encode()
    return bytes(value)


class HDF5Source(IndexedSource):
    """The official layout: `jpg` + `caption`, `{split}_jpg` + `{split}_labels`, or `text`."""

    def __init__(self, path: str, image_field: str | None, caption_field: str | None,
                 label_field: str | None = None, unit_size: int = 64) -> None:
        import h5py

        if not os.path.isfile(path):
            raise FileNotFoundError(f"data source {path!r}: HDF5 file does not exist")
        with h5py.File(path, "r") as handle:
            fields = [f for f in (image_field, caption_field, label_field) if f]
            missing = [f for f in fields if f not in handle]
            if missing:
                raise KeyError(f"data source {path!r}: HDF5 dataset(s) {missing} missing (has {sorted(handle)})")
            lengths = {f: len(handle[f]) for f in fields}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"data source {path!r}: HDF5 datasets differ in length {lengths}")
        super().__init__(path, next(iter(lengths.values())), unit_size)
        self.path, self.fields = path, (image_field, caption_field, label_field)
        self._handle = None
        self._pid = -1

    def _file(self):
        import h5py

        # h5py handles do not survive fork: every worker process opens its own.
        if self._handle is None or self._pid != os.getpid():
            self._handle, self._pid = h5py.File(self.path, "r"), os.getpid()
        return self._handle

    def __getstate__(self):
        return {**self.__dict__, "_handle": None, "_pid": -1}

    def read(self, index: int) -> RawRecord:
        handle = self._file()
        image_field, caption_field, label_field = self.fields
        image = _as_bytes(handle[image_field][index]) if image_field else None
        caption = _as_bytes(handle[caption_field][index]) if caption_field else None
        label = int(handle[label_field][index]) if label_field else -1
        return RawRecord(key=f"{index:09d}", image=image, caption=caption, label=label)


class ManifestSource(IndexedSource):
    """JSONL (`{"image": ..., "caption": ..., "label": ...}` per line) or CSV with those columns.
    Image paths are relative to the manifest's directory."""

    def __init__(self, path: str, unit_size: int = 64) -> None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data source {path!r}: manifest does not exist")
        self.root = Path(path).parent
        self.rows = self._load(path)
        super().__init__(path, len(self.rows), unit_size)

    @staticmethod
    def _load(path: str) -> list[dict | None]:
        # A malformed row stays in place (as None) so that indices and counts remain stable.
        rows: list[dict | None] = []
        with open(path, newline="", encoding="utf-8", errors="replace") as handle:
            if path.endswith(".csv"):
                reader = csv.DictReader(handle)
                if reader.fieldnames is None or "image" not in reader.fieldnames:
                    raise ValueError(f"data source {path!r}: CSV manifest needs an 'image' column")
                rows.extend(dict(row) for row in reader)
                return rows
            for line in handle:
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError:
                    row = None
                rows.append(row if isinstance(row, dict) and "image" in row else None)
        return rows

    def read(self, index: int) -> RawRecord:
        row = self.rows[index]
        if row is None:
            return RawRecord(key=f"row{index:09d}", error="bad_manifest_row")
        key = str(row.get("key") or f"{index:09d}")
        image_path = self.root / str(row["image"])
        try:
            image = image_path.read_bytes()
        except OSError:
            _warn_once(f"manifest {self.name}: missing image file {image_path}")
            return RawRecord(key=key, error="missing_file")
        label = _parse_label(str(row["label"])) if row.get("label") not in (None, "") else -1
        return RawRecord(key=key, image=image, caption=str(row.get("caption") or ""), label=label)


class FolderSource(IndexedSource):
    """`root/<class>/<image>` with labels by sorted class name; `<image stem>.txt` as caption if any."""

    def __init__(self, root: str, unit_size: int = 64) -> None:
        base = Path(root)
        if not base.is_dir():
            raise FileNotFoundError(f"data source {root!r}: folder does not exist")
        self.classes = sorted(p.name for p in base.iterdir() if p.is_dir())
        self.files = [
            (path, label)
            for label, name in enumerate(self.classes)
            for path in sorted((base / name).rglob("*"))
            if path.suffix.lower() in FOLDER_IMAGE_EXTENSIONS
        ]
        self.base = base
        super().__init__(root, len(self.files), unit_size)

    def read(self, index: int) -> RawRecord:
        path, label = self.files[index]
        key = str(path.relative_to(self.base).with_suffix(""))
        try:
            image = path.read_bytes()
        except OSError:
            return RawRecord(key=key, error="missing_file")
        caption_path = path.with_suffix(".txt")
        caption = caption_path.read_bytes() if caption_path.is_file() else b""
        return RawRecord(key=key, image=image, caption=caption, label=label)


class TextFileSource(IndexedSource):
    """Text-only corpus: one document per line of a .txt file, or `text`/`caption` of JSONL rows."""

    def __init__(self, path: str, unit_size: int = 64) -> None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"text source {path!r}: file does not exist")
        with open(path, "rb") as handle:
            lines = [line.rstrip(b"\r\n") for line in handle if line.strip()]
        if path.endswith(".jsonl"):
            lines = [_jsonl_text(line) for line in lines]
        self.lines = lines
        super().__init__(path, len(lines), unit_size)

    def read(self, index: int) -> RawRecord:
        return RawRecord(key=f"{index:09d}", caption=self.lines[index])


def _jsonl_text(line: bytes) -> bytes:
    try:
        row = json.loads(line)
    except ValueError:
        return b""
    return str(row.get("text") or row.get("caption") or "").encode() if isinstance(row, dict) else b""


def detect_format(spec: str) -> str:
    if _is_remote(spec) or ".tar" in spec or "::" in spec or "{" in spec:
        return "wds"
    lower = spec.lower()
    if lower.endswith((".h5", ".hdf5")):
        return "hdf5"
    if lower.endswith((".jsonl", ".csv", ".json")):
        return "manifest"
    if os.path.isdir(spec):
        return "wds" if glob.glob(os.path.join(spec, "*.tar")) else "folder"
    if any(ch in spec for ch in "*?["):
        return "wds"
    raise FileNotFoundError(f"data source {spec!r}: does not exist or its format cannot be detected")


def open_source(spec: str, fmt: str = "auto", *, role: str = "pair", split: str = "",
                unit_size: int = 64, embedded_root: str = "data/embedded") -> Source:
    """A `Source` for a user spec. `role` is "pair" (image + caption), "labelled" (image + label,
    of `split`) or "text" (text-only corpus)."""
    if spec == "embedded":
        from m3ae.data.synth import FORMAT_VERSION, ensure_embedded_dataset, format_version

        # A dataset already there is used whatever its size (e.g. a small one from `m3ae data synth`);
        # one of an older format is regenerated.
        root = Path(embedded_root)
        if format_version(root) != FORMAT_VERSION:
            root = ensure_embedded_dataset(root)
        return WebDatasetSource(str(root / f"{split or 'train'}-*.tar"))
    if role == "labelled" and os.path.isdir(os.path.join(spec, split)):
        spec = os.path.join(spec, split)  # root/{train,val}/<class>/... or root/{train,val}/*.tar
    if role == "text":
        if fmt == "hdf5" or spec.lower().endswith((".h5", ".hdf5")):
            return HDF5Source(spec, None, "text", unit_size=unit_size)
        return TextFileSource(spec, unit_size)
    fmt = detect_format(spec) if fmt == "auto" else fmt
    if fmt == "wds":
        return WebDatasetSource(spec)
    if fmt == "hdf5":
        if role == "labelled":
            return HDF5Source(spec, f"{split}_jpg", None, f"{split}_labels", unit_size)
        return HDF5Source(spec, "jpg", "caption", unit_size=unit_size)
    if fmt == "manifest":
        return ManifestSource(spec, unit_size)
    if fmt == "folder":
        return FolderSource(spec, unit_size)
    raise ValueError(f"data source {spec!r}: unknown format {fmt!r}")


def label_names(spec: str, fmt: str = "auto", split: str = "val", embedded_root: str = "data/embedded") -> list[str] | None:
    """The class names behind a labelled source's integer labels where the source records them (the
    embedded dataset's manifest, an image folder's class subfolders); None otherwise."""
    if spec == "embedded":
        manifest = Path(embedded_root) / "manifest.json"
        return json.loads(manifest.read_text()).get("classes") if manifest.is_file() else None
    source = open_source(spec, fmt, role="labelled", split=split, embedded_root=embedded_root)
    return list(source.classes) if isinstance(source, FolderSource) else None


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logging.getLogger("m3ae.data").warning(message)
