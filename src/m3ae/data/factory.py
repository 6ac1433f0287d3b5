"""The one place a source spec becomes a `Source`: layout detection (with the reason, for `data
inspect` and error hints), the table of openers by format, the embedded dataset, and `build_shards`.

It sits above the readers (`sources`, `layouts`), the embedded generator (`synth`) and the shard
writer (`writer`), none of which imports it: adding a layout is a reader class plus one entry in
`detect_layout` and `_OPENERS` below.
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path
from typing import Callable

import m3ae.data.synth as synth
from m3ae.data.config import TableColumns
from m3ae.data.layouts import CaptionFolderSource, ParquetSource, TableSource, _is_image, _parquet_files
from m3ae.data.sources import (FolderSource, HDF5Source, Source, TextFileSource, WebDatasetSource, _is_remote,
                               decode_caption)
from m3ae.data.transforms import SkipSample
from m3ae.data.writer import ShardWriter, check_key

# img2dataset's webdataset output keeps this beside every NNNNN.tar: metadata, no pixels.
_SHARD_METADATA = ("*.parquet", "*_stats.json")


def detect_layout(spec: str) -> tuple[str, str]:
    """(format, why) for a source spec, as `--data.format auto` reads it."""
    lower = spec.lower()
    if lower.endswith(".parquet"):
        return "parquet", "parquet file(s) (img2dataset's parquet output: image bytes or paths + caption column)"
    if _is_remote(spec) or "::" in spec or "{" in spec or (".tar" in lower and not os.path.isdir(spec)):
        return "wds", "tar shards: a .tar name, a brace pattern, a URL or a `pipe:` command"
    if lower.endswith((".h5", ".hdf5")):
        return "hdf5", "an .h5/.hdf5 file (official layout: jpg + caption, {split}_jpg + {split}_labels)"
    if lower.endswith((".jsonl", ".json", ".csv", ".tsv")):
        return "manifest", "a .jsonl/.json/.csv/.tsv table of image paths and captions"
    if os.path.isdir(spec):
        return _detect_directory(spec)
    if any(ch in spec for ch in "*?["):
        return "wds", "a glob pattern of .tar shards"
    raise FileNotFoundError(f"data source {spec!r}: does not exist or its format cannot be detected")


def _detect_directory(spec: str) -> tuple[str, str]:
    beside = sorted({Path(p).name for pattern in _SHARD_METADATA for p in glob.glob(os.path.join(glob.escape(spec), pattern))})
    metadata = f"; the {len(beside)} .parquet/_stats.json file(s) beside them are img2dataset's metadata, not read"
    tars = glob.glob(os.path.join(glob.escape(spec), "*.tar"))
    if tars:
        return "wds", f"a directory of {len(tars)} .tar shard(s)" + (metadata if beside else "")
    entries = list(Path(spec).iterdir())
    top_images = sum(1 for p in entries if _is_image(p))
    if top_images:
        return "flat", (f"a directory with {top_images} image file(s) at its top level: a caption folder "
                        f"(x.jpg + x.txt, read recursively), unlabelled")
    folders = [p for p in entries if p.is_dir()]
    if folders and all(p.name.isdigit() for p in folders):
        return "flat", ("a directory of numbered subfolders (img2dataset's `files` output): a caption folder "
                        "(x.jpg + x.txt), unlabelled" + (metadata if beside else ""))
    if _parquet_files(spec):
        return "parquet", "a directory of parquet files (img2dataset's parquet output: image bytes or paths + caption)"
    return "folder", (f"a directory of {len(folders)} subfolder(s) and no image at its top level: class "
                      f"folders, labelled by sorted subfolder name (x.txt beside an image is its caption)")


def _hdf5(spec: str, role: str, split: str, unit_size: int, columns: TableColumns | None) -> Source:
    if role == "labelled":
        return HDF5Source(spec, f"{split}_jpg", None, f"{split}_labels", unit_size)
    return HDF5Source(spec, "jpg", "caption", unit_size=unit_size)


# format -> opener(spec, role, split, unit_size, columns); `FORMATS` in data/config.py lists the keys
# (tests/test_data_layouts.py checks that they agree).
_OPENERS: dict[str, Callable[..., Source]] = {
    "wds": lambda spec, *_: WebDatasetSource(spec),
    "hdf5": _hdf5,
    "manifest": lambda spec, role, split, unit_size, columns: TableSource(spec, columns, unit_size),
    "folder": lambda spec, role, split, unit_size, columns: FolderSource(spec, unit_size),
    "flat": lambda spec, role, split, unit_size, columns: CaptionFolderSource(spec, unit_size),
    "parquet": lambda spec, role, split, unit_size, columns: ParquetSource(spec, columns),
}


def open_source(spec: str, fmt: str = "auto", *, role: str = "pair", split: str = "",
                unit_size: int = 64, embedded_root: str = "data/embedded", columns=None) -> Source:
    """A `Source` for a user spec. `role` is "pair" (image + caption), "labelled" (image + label,
    of `split`) or "text" (text-only corpus). `columns` (a `TableColumns`) names table and parquet
    columns."""
    if spec == "embedded":
        # A dataset already there is used whatever its size (e.g. a small one from `m3ae data synth`);
        # one of an older format is regenerated.
        root = Path(embedded_root)
        if synth.format_version(root) != synth.FORMAT_VERSION:
            root = synth.ensure_embedded_dataset(root)
        return WebDatasetSource(str(root / f"{split or 'train'}-*.tar"))
    if role == "labelled" and os.path.isdir(os.path.join(spec, split)):
        spec = os.path.join(spec, split)  # root/{train,val}/<class>/... or root/{train,val}/*.tar
    if role == "text":
        if fmt == "hdf5" or spec.lower().endswith((".h5", ".hdf5")):
            return HDF5Source(spec, None, "text", unit_size=unit_size)
        return TextFileSource(spec, unit_size)
    fmt = detect_layout(spec)[0] if fmt == "auto" else fmt
    if fmt not in _OPENERS:
        raise ValueError(f"data source {spec!r}: unknown format {fmt!r}")
    return _OPENERS[fmt](spec, role, split, unit_size, columns)


def label_names(spec: str, fmt: str = "auto", split: str = "val", embedded_root: str = "data/embedded") -> list[str] | None:
    """The class names behind a labelled source's integer labels where the source records them (the
    embedded dataset's manifest, an image folder's class subfolders); None otherwise. "all" (both
    splits of a root of train/ and val/) is numbered as its train split, or its val/ when alone."""
    if split == "all":
        split = "train" if os.path.isdir(os.path.join(spec, "train")) else "val"
    if spec == "embedded":
        manifest = Path(embedded_root) / "manifest.json"
        return json.loads(manifest.read_text()).get("classes") if manifest.is_file() else None
    source = open_source(spec, fmt, role="labelled", split=split, embedded_root=embedded_root)
    return list(source.classes) if isinstance(source, FolderSource) else None


def build_shards(source_spec: str, out_dir: str | Path, fmt: str = "auto", shard_size: int = 1000,
                 prefix: str = "shard", columns=None) -> dict:
    """Convert any readable source (typically a manifest or an image folder) into tar shards.

    Image bytes are copied unchanged when already JPEG/PNG/WebP; broken records are skipped and
    counted, so the shards hold exactly the usable samples in source order.
    """
    source = open_source(source_spec, fmt, unit_size=shard_size, columns=columns)
    skipped: dict[str, int] = {}
    written = 0
    with ShardWriter(Path(out_dir), prefix, shard_size) as writer:
        records = (record for unit in source.units() for record in source.read_unit(unit))
        for row, record in enumerate(records):
            key = record.key.replace(".", "_")
            try:
                # A key that would not read back as itself is the input's error, not a bad sample:
                # the build stops rather than write shards that `inspect` reads differently.
                check_key(key, writer.last_key)
            except ValueError as error:
                raise ValueError(f"{source_spec}: record {row} (0-based): {error}") from None
            try:
                if record.error:
                    raise SkipSample(record.error)
                caption = decode_caption(record.caption)
                if not record.image:
                    raise SkipSample("empty_image")
                writer.write(key, record.image, caption, record.label)
            except SkipSample as skip:
                skipped[skip.reason] = skipped.get(skip.reason, 0) + 1
                continue
            except OSError:  # Pillow could not re-encode an unusual format
                skipped["undecodable_image"] = skipped.get("undecodable_image", 0) + 1
                continue
            written += 1
    return {"samples": written, "skipped": skipped, "shards": [str(p) for p in writer.written]}
