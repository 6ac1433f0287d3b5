"""What one file or sample can cost is judged before it is paid: tar headers, compression ratios,
caption bytes, non-regular files, JSON depth; and tables, HDF5 and parquet files that cannot be used
fail in one line naming the file."""

from __future__ import annotations

import gzip
import json
import os
import threading
import time

import numpy as np
import pytest
from data_helpers import image_bytes, write_tar
from test_reliability_fuzz import member, sparse_member

from m3ae.cli import main
from m3ae.data import DataConfig, build_pretrain_loader
from m3ae.data import sources
from m3ae.data.inspect import inspect_source
from m3ae.data.factory import open_source
from m3ae.data.sources import BadField, decode_caption, load_json


def good(key: str, index: int) -> list[tuple[str, bytes]]:
    return [(f"{key}.png", image_bytes(index)), (f"{key}.txt", b"a caption")]


def config(source: str, **overrides) -> DataConfig:
    return DataConfig(**{**dict(source=source, image_size=16, min_image_size=8, text_length=8, shuffle_buffer=0),
                         **overrides})


def tar_bytes(members: list[tuple[str, bytes]], end: bool = True) -> bytes:
    """Members written one by one (header, data, padding), then the end-of-archive blocks."""
    return b"".join(member(name, data) for name, data in members) + (b"\0" * 1024 if end else b"")


def test_a_sparse_member_is_skipped_from_its_header_not_expanded(tmp_path):
    # the report's 2 GB caption in a 20 KB shard aborted the worker; 1 GB here, never read
    shard = tmp_path / "sparse.tar"
    shard.write_bytes(tar_bytes(good("a", 0) + [("b.png", image_bytes(1))], end=False)
                      + sparse_member("b.txt", b"x" * 512, 1 << 30) + tar_bytes(good("c", 2)))
    assert shard.stat().st_size < 30_000
    start = time.perf_counter()
    report = inspect_source(str(shard))
    assert report["samples"] == 2 and report["skipped"] == {"sparse_member": 1}
    keys = [k for batch in build_pretrain_loader(config(str(shard)), batch_size=1, epochs=1) for k in batch["key"]]
    assert keys == ["a", "c"] and time.perf_counter() - start < 5


def test_oversized_metadata_and_unused_members_are_not_read(tmp_path, monkeypatch):
    shard = write_tar(tmp_path / "big.tar", good("a", 0) + [("b.png", image_bytes(1)), ("b.txt", b"x"),
                                                          ("b.json", b" " * (sources.MAX_METADATA_BYTES + 1)),
                                                          ("b.mp4", b"\0" * 100_000)] + good("c", 2))
    report = inspect_source(str(shard))
    assert report["samples"] == 2 and report["skipped"] == {"member_too_large": 1}


def test_a_compression_bomb_stops_the_shard_where_it_exceeds_the_ratio(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(sources, "_EXPANSION_ALLOWANCE", 1 << 20)
    bomb = tar_bytes(good("a", 0) + [("b.png", image_bytes(1)), ("b.txt", b"\0" * (64 << 20))] + good("c", 2))
    shard = tmp_path / "bomb.tar.gz"
    shard.write_bytes(gzip.compress(bomb, compresslevel=9))
    assert shard.stat().st_size < 200_000  # 64 MiB of caption in a few hundred KB: over 300x
    report = inspect_source(str(shard))
    assert report["samples"] == 1 and report["skipped"] == {"truncated_shard": 1}
    assert "expands more than 100 times" in caplog.text
    # an ordinary compressed shard reads whole, as before
    (tmp_path / "fine.tar.gz").write_bytes(gzip.compress(tar_bytes(good("a", 0) + good("b", 1))))
    assert inspect_source(str(tmp_path / "fine.tar.gz"))["samples"] == 2


def test_captions_are_cut_before_tokenising(tmp_path):
    long = "word " * 2_000_000  # 10 MB
    assert len(decode_caption(long.encode()).encode()) <= sources.MAX_CAPTION_BYTES
    assert decode_caption(long.encode()) == decode_caption(long)
    # a cut inside a UTF-8 sequence backs off to the character before it
    text = ("é" * sources.MAX_CAPTION_BYTES).encode()
    assert decode_caption(text) == "é" * (sources.MAX_CAPTION_BYTES // 2)
    shard = write_tar(tmp_path / "long.tar", [("a.png", image_bytes(0)), ("a.txt", ("é" * 10_000_000).encode())])
    start = time.perf_counter()
    report = inspect_source(str(shard))
    assert report["samples"] == 1 and report["skipped"] == {} and time.perf_counter() - start < 5


def hang_guard(seconds: float):
    """Fails the test instead of hanging it: a FIFO open or read that blocks is interrupted."""
    timer = threading.Timer(seconds, lambda: os.kill(os.getpid(), 2))
    timer.start()
    return timer


@pytest.mark.parametrize("kind", ["fifo", "device", "device_symlink"])
def test_non_regular_files_are_refused_not_read(tmp_path, kind):
    target = tmp_path / "cls" / "x.png"
    target.parent.mkdir()
    (tmp_path / "cls" / "ok.png").write_bytes(image_bytes(0))
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "device":
        target = tmp_path / "dev_zero.png"
        os.symlink("/dev/zero", target)  # the manifest names it directly below
    else:
        os.symlink("/dev/zero", target)
    (tmp_path / "m.jsonl").write_text(json.dumps({"image": str(target), "caption": "x"}) + "\n"
                                      + json.dumps({"image": "cls/ok.png", "caption": "y"}) + "\n")
    timer = hang_guard(20)
    try:
        report = inspect_source(str(tmp_path / "m.jsonl"))
        assert report["samples"] == 1 and report["skipped"] == {"not_a_regular_file": 1}
        if kind != "device":  # a class folder holding it
            report = inspect_source(str(tmp_path), fmt="folder")
            assert report["samples"] == 1 and report["skipped"] == {"not_a_regular_file": 1}
    finally:
        timer.cancel()
    with pytest.raises(BadField, match="not_a_regular_file"):
        sources.read_regular("/dev/zero")


def test_read_regular_bounds_the_size(tmp_path):
    (tmp_path / "f").write_bytes(b"12345")
    assert sources.read_regular(tmp_path / "f", 5) == b"12345"
    with pytest.raises(BadField, match="file_too_large"):
        sources.read_regular(tmp_path / "f", 4)


# an unterminated string of escaped quotes: the old regular expression rescanned it from every quote
@pytest.mark.parametrize("text", ['["' + '\\"' * 40_000, '"' * 80_000, '["' + "\\" * 80_000, '{"a": "' + "[" * 80_000])
def test_the_json_depth_check_takes_linear_time(text):
    start = time.perf_counter()
    with pytest.raises(BadField):
        load_json(text)
    assert time.perf_counter() - start < 0.5


def test_the_json_depth_check_sees_through_strings_and_escapes():
    assert load_json('{"k": "[[[[\\"[[[", "v": [[1]]}') == {"k": '[[[["[[[', "v": [[1]]}
    assert load_json('["\\\\", [[["x"]]]]') == ["\\", [[["x"]]]]
    deep = "[" * (sources.MAX_JSON_DEPTH + 1) + "]" * (sources.MAX_JSON_DEPTH + 1)
    with pytest.raises(BadField, match="nested deeper"):
        load_json('["\\\\", ' + deep + "]")


def test_the_full_depth_scan_runs_only_when_the_brackets_could_nest_too_deep(monkeypatch):
    def scan(raw):
        scanned.append(raw)
        return depth(raw)

    depth, scanned = sources._json_depth, []
    monkeypatch.setattr(sources, "_json_depth", scan)
    assert load_json('{"caption": "a [red] {square}", "label": [3]}')["label"] == [3]
    assert scanned == []  # 3 opening brackets: no nesting deeper than the limit is possible
    many = "[" + ", ".join(["[1]"] * (sources.MAX_JSON_DEPTH + 5)) + "]"  # many brackets, depth 2
    assert len(load_json(many)) == sources.MAX_JSON_DEPTH + 5 and len(scanned) == 1


def test_tables_with_a_bom_float_labels_and_latin1(tmp_path, capsys):
    (tmp_path / "a.png").write_bytes(image_bytes(0))
    (tmp_path / "b.png").write_bytes(image_bytes(1))
    # a spreadsheet's UTF-8 export starts with a byte-order mark; pandas writes labels as 3.0 when
    # a column holds a missing value
    (tmp_path / "bom.csv").write_bytes("\ufeffimage,caption,label\na.png,one,3.0\nb.png,two,\n".encode())
    labels = [r.label for r in open_source(str(tmp_path / "bom.csv")).read_unit(0)]
    assert labels == [3, -1]
    report = inspect_source(str(tmp_path / "bom.csv"))
    assert report["samples"] == 2 and report["skipped"] == {}
    (tmp_path / "latin1.csv").write_bytes("image,caption\na.png,café crème\n".encode("latin-1"))
    assert main(["data", "inspect", "--data.source", str(tmp_path / "latin1.csv")]) == 2
    err = capsys.readouterr().err
    assert "latin1.csv': not UTF-8 text (byte 0xe9" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("case, why", [
    ("missing", "HDF5 dataset(s) ['caption'] missing"),
    ("scalar", "HDF5 dataset 'caption' has shape ()"),
    ("int_captions", "HDF5 dataset 'caption' has shape (2,) and type int64"),
    ("2d_captions", "HDF5 dataset 'caption' has shape (2, 3)"),
    ("not_hdf5", "not a readable HDF5 file"),
])
def test_unusable_hdf5_files_are_one_line_naming_file_and_dataset(tmp_path, capsys, case, why):
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "d.h5"
    if case == "not_hdf5":
        path.write_bytes(b"not an hdf5 file at all" * 10)
    else:
        with h5py.File(path, "w") as handle:
            images = handle.create_dataset("jpg", (2,), dtype=h5py.vlen_dtype(np.uint8))
            for i in range(2):
                images[i] = np.frombuffer(image_bytes(i), np.uint8)
            captions = {"missing": None, "scalar": np.array(b"x"), "int_captions": np.array([1, 2]),
                        "2d_captions": np.array([[b"a"] * 3] * 2)}[case]
            if captions is not None:
                handle.create_dataset("caption", data=captions)
    assert main(["data", "inspect", "--data.source", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"'{path}'" in err and why in err and len(err.strip().splitlines()) == 1, err


def test_a_file_that_is_not_parquet_is_one_line_naming_it(tmp_path, capsys):
    pytest.importorskip("pyarrow")
    (tmp_path / "x.parquet").write_bytes(b"PAR1 nothing else")
    assert main(["data", "inspect", "--data.source", str(tmp_path / "x.parquet")]) == 2
    err = capsys.readouterr().err
    assert f"'{tmp_path / 'x.parquet'}': not a readable parquet file" in err and len(err.strip().splitlines()) == 1


def test_a_source_with_no_usable_sample_is_one_line(tmp_path, capsys):
    write_tar(tmp_path / "bad.tar", [("a.png", b"not an image"), ("a.txt", b"x")])
    assert main(["data", "inspect", "--data.source", str(tmp_path / "bad.tar")]) == 2
    err = capsys.readouterr().err
    assert "yielded no usable sample" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(sources.NoUsableSample):
        list(build_pretrain_loader(config(str(tmp_path / "bad.tar")), batch_size=1, epochs=1))
