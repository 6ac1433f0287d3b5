"""Fixture builders shared by the data tests: real-format datasets written into tmp_path."""

from __future__ import annotations

import argparse
import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def image_bytes(index: int, size: tuple[int, int] = (40, 32), fmt: str = "PNG", mode: str = "RGB") -> bytes:
    """A distinct, losslessly comparable image per index (PNG unless asked otherwise)."""
    rng = np.random.default_rng(index)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(out, format=fmt)
    return out.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def pair_members(key: str, index: int, caption: str, label: int) -> list[tuple[str, bytes]]:
    return [(f"{key}.png", image_bytes(index)), (f"{key}.txt", caption.encode()),
            (f"{key}.json", json.dumps({"key": key}).encode()), (f"{key}.cls", str(label).encode())]


def samples(count: int) -> list[tuple[str, int, str, int]]:
    """(key, image index, caption, label) rows used by every format fixture."""
    return [(f"{i:06d}", i, f"a photo of thing number {i}", i % 3) for i in range(count)]


def write_shards(root: Path, count: int, per_shard: int, prefix: str = "shard") -> str:
    root.mkdir(parents=True, exist_ok=True)
    rows = samples(count)
    shards = 0
    for shard, start in enumerate(range(0, count, per_shard)):
        members = [m for key, i, cap, lab in rows[start : start + per_shard] for m in pair_members(key, i, cap, lab)]
        write_tar(root / f"{prefix}-{shard:04d}.tar", members)
        shards += 1
    return str(root / f"{prefix}-{{0000..{shards - 1:04d}}}.tar")


def write_hdf5(path: Path, count: int) -> Path:
    import h5py

    rows = samples(count)
    with h5py.File(path, "w") as handle:
        blobs = handle.create_dataset("jpg", (count,), dtype=h5py.vlen_dtype(np.uint8))
        for row, (_, index, _, _) in enumerate(rows):
            blobs[row] = np.frombuffer(image_bytes(index), dtype=np.uint8)
        handle.create_dataset("caption", data=[cap.encode() for _, _, cap, _ in rows])
        handle["train_jpg"] = handle["jpg"]  # a hard link: the labelled split shares the blobs
        handle.create_dataset("train_labels", data=[lab for *_, lab in rows])
    return path


def write_manifest(root: Path, count: int, kind: str = "jsonl") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "img").mkdir(exist_ok=True)
    rows = samples(count)
    for key, index, _, _ in rows:
        (root / "img" / f"{key}.png").write_bytes(image_bytes(index))
    if kind == "jsonl":
        path = root / "manifest.jsonl"
        path.write_text("".join(json.dumps({"image": f"img/{k}.png", "caption": c, "label": y, "key": k}) + "\n"
                                for k, _, c, y in rows))
    else:
        path = root / "manifest.csv"
        path.write_text("key,image,caption,label\n" + "".join(f"{k},img/{k}.png,{c},{y}\n" for k, _, c, y in rows))
    return path


def write_folder(root: Path, count: int) -> Path:
    for key, index, caption, label in samples(count):
        folder = root / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{key}.png").write_bytes(image_bytes(index))
        (folder / f"{key}.txt").write_text(caption)
    return root


def cli(argv: list[str]) -> None:
    """Run `m3ae data ...` through the data module's own registration (no other command modules)."""
    from m3ae.data import cli as data_cli

    parser = argparse.ArgumentParser()
    data_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    assert args.func(args) == 0
