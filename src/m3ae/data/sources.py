"""Readers for every supported layout, all reduced to `Source`: a fixed list of units (shards),
each readable on its own into undecoded `RawRecord`s in a fixed order.

Owning the unit list is what makes the pipeline resumable: the loader permutes units per epoch,
splits them across ranks and workers, and can skip whole units without reading them.
"""

from __future__ import annotations

import bz2
import contextlib
import csv
import glob
import gzip
import io
import json
import logging
import lzma
import math
import os
import re
import stat
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

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
    shard: str = ""  # the file (or URL) the record was read from, for skip logs; "" for indexed sources


# What one sample may cost before it is read. An image file or tar member: beyond any real encoding
# of `max_image_pixels`. A caption: its first 64 KiB hold far more than the longest token sequence
# (the tokenizer took 30 s and 3 GB on a 20 MB one), so a longer one is cut there. JSON and `.cls`
# metadata: small by nature.
MAX_FILE_BYTES = 1 << 28
MAX_CAPTION_BYTES = 1 << 16
MAX_METADATA_BYTES = 1 << 20


class NoUsableSample(ValueError):
    """A whole source yielded nothing usable (a ValueError: commands report it in one line)."""


def decode_caption(raw: bytes | str | None) -> str:
    """Caption text, stripped, at most MAX_CAPTION_BYTES of it; non-UTF-8 bytes are a skip, a
    missing caption is empty."""
    if isinstance(raw, str) and len(raw) > MAX_CAPTION_BYTES:
        raw = raw[:MAX_CAPTION_BYTES]
    if isinstance(raw, bytes):
        if len(raw) > MAX_CAPTION_BYTES:
            end = MAX_CAPTION_BYTES
            while end > MAX_CAPTION_BYTES - 3 and raw[end] & 0xC0 == 0x80:  # not inside a UTF-8 sequence
                end -= 1
            raw = raw[:end]
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise SkipSample("caption_not_utf8") from error
    return (raw or "").strip()


def read_regular(path: str | Path, limit: int = MAX_FILE_BYTES) -> bytes:
    """A file's bytes when it is a regular file of at most `limit` bytes; BadField("not_a_regular_file")
    for a FIFO, device or socket (a manifest row or a symlink can name /dev/zero, read until memory
    runs out, or a FIFO, which hangs), BadField("file_too_large") beyond `limit`; OSError as open raises it."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # O_NONBLOCK: opening a FIFO does not wait for a writer
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise BadField("not_a_regular_file", str(path))
        data = handle.read(limit + 1)  # a file growing after fstat is still bounded
        if max(info.st_size, len(data)) > limit:
            raise BadField("file_too_large", f"{path}: more than {limit} bytes")
        return data


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


# Labels end up in int64 tensors and class-count arrays; -1 means "unlabelled".
MAX_LABEL = 2**31 - 1
# Sample metadata is flat; a deeper document is hostile (the C decoder recurses once per level).
MAX_JSON_DEPTH = 64


class BadField(ValueError):
    """A label or JSON member a sample carries is unusable; `reason` is the skip counter."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def checked_label(value: object) -> int:
    """A label from a `.cls` member, a JSON field or a manifest cell: an integer in [-1, MAX_LABEL]
    (`"3"`, `3` and `3.0` are 3); anything else raises BadField("bad_label")."""
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            raise BadField("bad_label", "not ASCII") from None
    if isinstance(value, str):
        text = value.strip()
        # int() would accept thousands of digits (and "1_0"); a label is short and plain
        # "3.0" too: pandas writes integer labels so when a column holds a missing value
        if not re.fullmatch(r"-?[0-9]{1,10}(\.0{1,8})?", text):
            raise BadField("bad_label", repr(value[:32]))
        value = int(text.partition(".")[0])
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not -1 <= value <= MAX_LABEL:
        raise BadField("bad_label", repr(value)[:32])
    return value


def _json_depth(raw: bytes) -> int:
    """The deepest bracket nesting outside strings, in linear time whatever the bytes (a regular
    expression over strings backtracked quadratically on unterminated or escape-heavy ones). In valid
    JSON a backslash occurs only inside strings, so a quote is escaped exactly when an odd run of
    backslashes precedes it; on invalid JSON the count may be off, and json.loads refuses the text."""
    text = np.frombuffer(raw, dtype=np.uint8)
    if not text.size:
        return 0
    position = np.arange(text.size)
    backslash = text == ord("\\")
    last_other = np.maximum.accumulate(np.where(backslash, -1, position))  # last non-backslash at or before
    run_before = np.concatenate(([0], position[:-1] - last_other[:-1]))  # backslashes right before each byte
    quote = (text == ord('"')) & (run_before % 2 == 0)
    outside = (np.cumsum(quote) - quote) % 2 == 0  # an even number of real quotes before: not in a string
    steps = (outside & ((text == ord("[")) | (text == ord("{")))).astype(np.int64)
    steps -= outside & ((text == ord("]")) | (text == ord("}")))
    return int(np.cumsum(steps).max())


def _reject_constant(name: str) -> None:
    raise BadField("bad_json", f"non-finite number {name}")


def load_json(data: bytes | str) -> object:
    """`json.loads` for untrusted sample data: nesting deeper than MAX_JSON_DEPTH and NaN/Infinity
    raise BadField("bad_json") instead of RecursionError or values that overflow later."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    # Nesting cannot exceed the number of opening brackets: counting them settles a sample's usual
    # few-key metadata without the full scan (90 µs a sample, 16 % of the demo's loading).
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and _json_depth(raw) > MAX_JSON_DEPTH:
        raise BadField("bad_json", f"nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except BadField:
        raise
    except (ValueError, RecursionError) as error:
        raise BadField("bad_json", str(error)[:80]) from None


class WebDatasetSource(Source):
    """img2dataset-style tar shards: `{key}.jpg|png|webp` + `{key}.txt` (+ `.json`, `.cls`).

    Shards are walked with `tarfile` in stream mode so that members can be grouped and validated by
    us: a broken member or a truncated shard becomes a counted skip, never a crash. Only a URL or
    `pipe:` command the user typed in the pattern goes through `webdataset.gopen`; a name found by a
    glob or in a directory is data, opened as a local file whatever it looks like.
    """

    def __init__(self, pattern: str) -> None:
        from webdataset.shardlists import expand_urls

        self.name = pattern
        self.shards = expand_shards(pattern)
        self.typed_remote = {url for url in expand_urls(pattern) if _is_remote(url)}

    def units(self) -> Sequence[int]:
        return range(len(self.shards))

    def _open(self, url: str):
        import webdataset as wds

        return wds.gopen(url) if url in self.typed_remote else open(url, "rb")

    def read_unit(self, unit: int) -> Iterator[RawRecord]:
        url = self.shards[unit]
        try:
            stream = self._open(url)
        except Exception as error:  # gopen raises OSError, ValueError or subprocess errors
            yield RawRecord(key=url, error="unreadable_shard", shard=url)
            _warn_once(f"cannot open shard {url}: {error}")
            return
        group_key, members = None, {}
        try:
            with stream, tarfile.open(fileobj=_decompressed(stream), mode="r|") as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    key, ext = _split_member_name(info.name)
                    if key == group_key and ext in members:
                        # webdataset raises here; a second copy would silently replace the first
                        yield self._record(url, group_key, members)
                        group_key, members = key, {".": b""}
                    elif key != group_key:
                        if group_key is not None:
                            yield self._record(url, group_key, members)
                        group_key, members = key, {}
                    data = _read_member(tar, info, ext)
                    if isinstance(data, str):  # a skip reason: the whole sample is skipped under it
                        members[".error"], data = data, b""
                    members[ext] = data
                if _has_data_after_end(tar):
                    # tarfile ends quietly at a damaged header: what follows would vanish uncounted
                    raise tarfile.ReadError("damaged member header (data follows the end of the archive)")
        except (tarfile.TarError, OSError, EOFError, ValueError, zlib.error, lzma.LZMAError) as error:
            if group_key is None:  # nothing readable at all: a bad path, URL or command
                _warn_once(f"cannot read shard {url}: {error}")
                yield RawRecord(key=url, error="unreadable_shard", shard=url)
                return
            # Members of the interrupted group may be incomplete: report the shard, drop the group.
            _warn_once(f"shard {url} is truncated or corrupt at key {group_key!r}: {error}")
            yield RawRecord(key=f"{url}:{group_key}", error="truncated_shard", shard=url)
            return
        if group_key is not None:
            yield self._record(url, group_key, members)

    @staticmethod
    def _record(url: str, key: str, members: dict[str, bytes]) -> RawRecord:
        if "." in members:  # marked by read_unit (no extension holds a dot): the members repeat the previous sample's key
            return RawRecord(key=key, error="duplicate_key", shard=url)
        if ".error" in members:
            return RawRecord(key=key, error=members[".error"], shard=url)
        image = next((members[ext] for ext in IMAGE_EXTENSIONS if ext in members), None)
        try:
            label = checked_label(members["cls"]) if "cls" in members else -1
            meta = load_json(members["json"]) if "json" in members else None
            if label < 0 and isinstance(meta, dict) and meta.get("label") is not None:
                label = checked_label(meta["label"])
        except BadField as bad:
            return RawRecord(key=key, error=bad.reason, shard=url)
        error = "" if image is not None else "missing_image"
        return RawRecord(key=key, image=image, caption=members.get("txt"), label=label, error=error, shard=url)


_TEXT_MEMBERS = {"txt": MAX_CAPTION_BYTES + 1, "json": MAX_METADATA_BYTES, "cls": MAX_METADATA_BYTES}


def _read_member(tar: tarfile.TarFile, info: tarfile.TarInfo, ext: str) -> bytes | str:
    """A member's bytes, its cost judged from its header first: a sparse member (a 2 GB caption in a
    20 KB shard) or one larger than its kind allows returns a skip reason instead; members no
    reader uses are not read. A caption is read up to one byte past what decode_caption keeps."""
    if ext not in IMAGE_EXTENSIONS and ext not in _TEXT_MEMBERS:
        return b""
    if info.issparse():
        return "sparse_member"
    if ext == "txt":
        return tar.extractfile(info).read(_TEXT_MEMBERS["txt"])
    if info.size > _TEXT_MEMBERS.get(ext, MAX_FILE_BYTES):
        return "member_too_large"
    return tar.extractfile(info).read()


# A compressed shard of images and captions inflates a few times; past this ratio (after the first
# 64 MiB) it is a bomb, reported as a damaged shard instead of being inflated to its end.
MAX_EXPANSION = 100
_EXPANSION_ALLOWANCE = 1 << 26
_COMPRESSED = {b"\x1f\x8b": lambda raw: gzip.GzipFile(fileobj=raw), b"BZh": bz2.BZ2File,
               b"\xfd7zXZ\x00": lzma.LZMAFile}


class _Counted:
    """A byte stream whose first bytes were already read (to see its compression), counting what it delivers."""

    def __init__(self, raw, head: bytes) -> None:
        self.raw, self.head, self.count = raw, head, 0

    def read(self, size: int = -1) -> bytes:
        if self.head:
            data, self.head = (self.head, b"") if size < 0 else (self.head[:size], self.head[size:])
        else:
            data = self.raw.read(size)
        self.count += len(data)
        return data


class _Bounded:
    """The inflated stream of a compressed shard, refusing to expand beyond MAX_EXPANSION."""

    def __init__(self, inflated, compressed: _Counted) -> None:
        self.inflated, self.compressed, self.count = inflated, compressed, 0

    def read(self, size: int = -1) -> bytes:
        data = self.inflated.read(size)
        self.count += len(data)
        if self.count > _EXPANSION_ALLOWANCE + MAX_EXPANSION * self.compressed.count:
            raise ValueError(f"compressed data expands more than {MAX_EXPANSION} times (a compression bomb)")
        return data


def _decompressed(stream):
    """The tar bytes of a plain or gzip/bzip2/xz-compressed shard stream, expansion bounded."""
    head = stream.read(6)
    raw = _Counted(stream, head)
    for magic, opener in _COMPRESSED.items():
        if head.startswith(magic):
            return _Bounded(opener(raw), raw)
    return raw


def _has_data_after_end(tar: tarfile.TarFile) -> bool:
    """Whether anything but zero padding follows where a stream-mode tar stopped reading."""
    while chunk := tar.fileobj.read(1 << 20):
        if chunk.strip(b"\0"):
            return True
    return False


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
            try:
                record = self.read(index)
            except Exception as error:  # whatever one sample holds, it stays that sample's problem
                _warn_once(f"{self.name}: cannot read sample {index}: {type(error).__name__}: {error}")
                record = RawRecord(key=f"{index:09d}", error="unreadable_sample")
            yield record

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


def _check_dataset(path: str, field: str, dataset, role: str) -> None:
    """A dataset read per sample must hold one value of its role per row: encoded bytes per image
    (byte strings, opaque or variable-length uint8, or rows of uint8), text per caption, a number per
    label. An integer or 2-D caption dataset used to become NUL-byte captions, a scalar one a TypeError."""
    import h5py

    dtype, vlen = dataset.dtype, h5py.check_vlen_dtype(dataset.dtype)
    if role == "label":
        ok = dataset.ndim == 1 and dtype.kind in "iuf"
    elif role == "caption":
        ok = dataset.ndim == 1 and (dtype.kind in "SU" or vlen in (str, bytes))
    else:
        ok = ((dataset.ndim == 1 and (dtype.kind in "SV" or vlen in (bytes, np.dtype(np.uint8))))
              or (dataset.ndim == 2 and dtype == np.uint8))
    if not ok:
        raise ValueError(f"data source {path!r}: HDF5 dataset {field!r} has shape {dataset.shape} and type {dtype}; "
                         f"expected one {role} per row ({_HDF5_ROLES[role]})")


_HDF5_ROLES = {"image": "encoded bytes", "caption": "text", "label": "an integer"}


class HDF5Source(IndexedSource):
    """The official layout: `jpg` + `caption`, `{split}_jpg` + `{split}_labels`, or `text`."""

    def __init__(self, path: str, image_field: str | None, caption_field: str | None,
                 label_field: str | None = None, unit_size: int = 64) -> None:
        from m3ae.utils import require

        h5py = require("h5py", "hdf5", f"data source {path!r} (HDF5)")

        if not os.path.isfile(path):
            raise FileNotFoundError(f"data source {path!r}: HDF5 file does not exist")
        try:
            handle = h5py.File(path, "r")
        except OSError as error:  # h5py's message does not name the file
            raise ValueError(f"data source {path!r}: not a readable HDF5 file ({error})") from None
        with handle:
            fields = [f for f in (image_field, caption_field, label_field) if f]
            missing = [f for f in fields if f not in handle]
            if missing:
                raise ValueError(f"data source {path!r}: HDF5 dataset(s) {missing} missing (has {sorted(handle)[:20]})")
            for field, role in ((image_field, "image"), (caption_field, "caption"), (label_field, "label")):
                if field:
                    _check_dataset(path, field, handle[field], role)
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
        try:
            label = checked_label(handle[label_field][index].item()) if label_field else -1
        except BadField as bad:
            return RawRecord(key=f"{index:09d}", error=bad.reason)
        return RawRecord(key=f"{index:09d}", image=image, caption=caption, label=label)


@contextlib.contextmanager
def open_table(path: str) -> Iterator[io.TextIOBase]:
    """A CSV/TSV/JSONL table as text: UTF-8, a leading byte-order mark dropped (spreadsheets write
    one, and it used to become part of the first column's name); other encodings are an error
    naming the file and the byte, not text silently replaced."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            yield handle
    except UnicodeDecodeError as error:
        raise ValueError(f"data source {path!r}: not UTF-8 text (byte 0x{error.object[error.start]:02x}: Latin-1 or "
                         f"another legacy encoding?); save it as UTF-8") from None


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
        with open_table(path) as handle:
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
                    row = load_json(line)
                except BadField:
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
            image = read_regular(image_path)
        except BadField as bad:
            return RawRecord(key=key, error=bad.reason)
        except OSError:
            _warn_once(f"manifest {self.name}: missing image file {image_path}")
            return RawRecord(key=key, error="missing_file")
        try:
            label = checked_label(row["label"]) if row.get("label") not in (None, "") else -1
        except BadField as bad:
            return RawRecord(key=key, error=bad.reason)
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

    def use_classes(self, classes: Sequence[str], origin: str) -> None:
        """Labels by another split's class map (the val split of an evaluation is scored with the
        train split's indices, whatever folders it lacks): a class `origin` lacks is an error, one
        this folder lacks a warning."""
        unseen = sorted(set(self.classes) - set(classes))
        if unseen:
            shown = ", ".join(repr(name[:40]) for name in unseen[:5]) + (" ..." if len(unseen) > 5 else "")
            raise ValueError(f"data source {self.name!r}: class folder(s) {shown} do not occur in the train split "
                             f"{origin!r}; a classifier fitted there cannot predict them")
        missing = sorted(set(classes) - set(self.classes))
        if missing:
            logging.getLogger("m3ae.data").warning(
                "data source %r has no folder for %d of the %d train class(es) (%s); it is scored on the others",
                self.name, len(missing), len(classes), ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
        index = {name: i for i, name in enumerate(classes)}
        self.files = [(path, index[self.classes[label]]) for path, label in self.files]
        self.classes = list(classes)

    def read(self, index: int) -> RawRecord:
        path, label = self.files[index]
        key = str(path.relative_to(self.base).with_suffix(""))
        caption_path = path.with_suffix(".txt")
        try:
            image = read_regular(path)
            caption = read_regular(caption_path, MAX_METADATA_BYTES) if caption_path.is_file() else b""
        except BadField as bad:
            return RawRecord(key=key, error=bad.reason)
        except OSError:
            return RawRecord(key=key, error="missing_file")
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
        row = load_json(line)
    except BadField:
        return b""
    return str(row.get("text") or row.get("caption") or "").encode() if isinstance(row, dict) else b""


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logging.getLogger("m3ae.data").warning(message)
