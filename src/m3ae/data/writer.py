"""Writing img2dataset-layout tar shards (`{key}.jpg|png|webp`, `.txt`, `.json`, `.cls`)."""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from PIL import Image

from m3ae.data.sources import _split_member_name
from m3ae.data.transforms import IMAGE_FORMATS

# Formats readers decode directly; any other of IMAGE_FORMATS is re-encoded as PNG.
_KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


def image_extension(data: bytes) -> str | None:
    """Extension under which `data` is stored as is, None when it must be re-encoded."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def reencode_png(data: bytes) -> bytes:
    with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
        out = io.BytesIO()
        image.save(out, format="PNG")
        return out.getvalue()


def check_key(key: str, previous: str | None = None) -> None:
    """Raises ValueError unless `key` becomes member names that read back as this one sample:
    no dot in its last part (keys end at the first dot), no NUL (tar headers end there), nothing
    absolute or climbing out with `..` (extracting the shard would write outside it), not the
    previous key again (readers group consecutive members by key)."""
    parts = PurePosixPath(key).parts
    why = (
        "is empty" if not key.strip("/") else
        "contains NUL" if "\0" in key else
        "is an absolute path" if key.startswith("/") else
        "climbs out of the shard with '..'" if ".." in parts else
        "must not contain a dot in its last part (WebDataset splits keys at dots)" if "." in key.rpartition("/")[2] else
        "repeats the previous sample's key" if key == previous else
        ""
    )
    if not why and any(_split_member_name(f"{key}.{ext}") != (key, ext) for ext in ("png", "txt")):
        why = "would read back as another key"
    if why:
        raise ValueError(f"sample key {key!r} {why}")


@dataclass
class ShardWriter:
    """Writes samples into `{prefix}-{index:04d}.tar`, `shard_size` samples per shard.

    Members get fixed metadata (mtime 0, root owner) so the same input gives byte-identical shards.
    A shard is written under a temporary name and renamed once complete: an interrupted build leaves
    only whole shards under shard names.
    """

    out_dir: Path
    prefix: str = "shard"
    shard_size: int = 1000
    first_shard: int = 0

    def __post_init__(self) -> None:
        if self.shard_size < 1:
            raise ValueError(f"shard_size={self.shard_size}: must be positive")
        self.out_dir = Path(self.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._tar: tarfile.TarFile | None = None
        self._paths: tuple[Path, Path] | None = None  # (temporary, final) of the open shard
        self._in_shard = 0
        self.last_key: str | None = None
        self.shard_index = self.first_shard - 1
        self.written: list[Path] = []

    def write(self, key: str, image: bytes, caption: str, label: int = -1, meta: dict | None = None) -> None:
        check_key(key, self.last_key)
        extension = image_extension(image)
        if extension is None:
            image, extension = reencode_png(image), "png"
        if self._tar is None or self._in_shard >= self.shard_size:
            self._open_next()
        members = {extension: image, "txt": caption.encode("utf-8"),
                   "json": json.dumps({"key": key, "caption": caption, "label": label, **(meta or {})},
                                      sort_keys=True).encode()}
        if label >= 0:
            members["cls"] = str(label).encode()
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self._in_shard += 1
        self.last_key = key

    def _open_next(self) -> None:
        self.close()
        self.shard_index += 1
        path = self.out_dir / f"{self.prefix}-{self.shard_index:04d}.tar"
        self._paths = (path.with_name(f".{path.name}.tmp"), path)
        self._tar = tarfile.open(self._paths[0], "w")
        self._in_shard = 0

    def close(self) -> None:
        """Completes the open shard."""
        if self._tar is not None:
            self._tar.close()
            tmp, path = self._paths
            os.replace(tmp, path)
            self.written.append(path)
            self._tar = self._paths = None

    def abort(self) -> None:
        """Drops the open, incomplete shard."""
        if self._tar is not None:
            self._tar.close()
            self._paths[0].unlink(missing_ok=True)
            self._tar = self._paths = None

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
