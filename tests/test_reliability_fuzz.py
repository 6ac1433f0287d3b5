"""Seeded random damage to valid JPEG/PNG/tar/json members: `inspect` reads every shard to the end,
every record is either a sample or a counted skip, and no exception escapes."""

from __future__ import annotations

import json
import tarfile
import time

import numpy as np
from data_helpers import image_bytes

from m3ae.data.inspect import inspect_source
from m3ae.data.sources import NoUsableSample

CASES = 300


def member(name: str, data: bytes) -> bytes:
    """One tar member (header, data, padding), so that archives can be damaged member by member."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info.tobuf(tarfile.USTAR_FORMAT) + data + b"\0" * (-len(data) % tarfile.BLOCKSIZE)


def damage(data: bytes, rng: np.random.Generator) -> bytes:
    kind = rng.integers(4)
    buf = bytearray(data)
    if kind == 0 and buf:  # flip a few bytes
        for at in rng.integers(0, len(buf), size=int(rng.integers(1, 9))):
            buf[at] ^= int(rng.integers(1, 256))
    elif kind == 1:  # cut short
        del buf[int(rng.integers(0, len(buf) + 1)):]
    elif kind == 2:  # grow
        buf += rng.bytes(int(rng.integers(1, 64)))
    else:  # overwrite a run with a length-like value (sizes, counts, chunk lengths)
        at = int(rng.integers(0, max(1, len(buf) - 4)))
        buf[at : at + 4] = rng.choice([b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff", b"\x00\x00\x00\x00", b"9999"])
    return bytes(buf)


def fuzzed_shard(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    good = b"".join(member(f"g{i}.png", image_bytes(i, (32, 32))) + member(f"g{i}.txt", b"a good caption")
                    for i in range(2))
    fmt = "JPEG" if seed % 2 else "PNG"
    target = {f"t.{'jpg' if fmt == 'JPEG' else 'png'}": image_bytes(seed, (32, 32), fmt=fmt),
              "t.txt": b"a caption", "t.json": json.dumps({"label": 3, "key": "t"}).encode(), "t.cls": b"3"}
    victim = list(target)[seed % len(target)]
    if seed % 3 == 0:  # damage one member's content, keeping the tar valid
        target[victim] = damage(target[victim], rng)
        tail = b"".join(member(name, data) for name, data in target.items())
    elif seed % 3 == 1:  # damage one member's tar header (name, size, checksum, type)
        parts = [member(name, data) for name, data in target.items()]
        index = list(target).index(victim)
        parts[index] = damage(parts[index][: tarfile.BLOCKSIZE], rng)[: tarfile.BLOCKSIZE] + parts[index][tarfile.BLOCKSIZE:]
        tail = b"".join(parts)
    else:  # damage the archive anywhere after the good samples
        tail = damage(b"".join(member(name, data) for name, data in target.items()), rng)
    return good + tail + b"\0" * 1024


def test_inspect_survives_random_damage(tmp_path):
    start = time.perf_counter()
    outcomes = set()
    for seed in range(CASES):
        path = tmp_path / f"fuzz-{seed:03d}.tar"
        path.write_bytes(fuzzed_shard(seed))
        report = inspect_source(str(path))  # any exception fails the test, naming the seed below
        assert report["samples"] >= 1 and report["records"] >= 2, seed  # g0 precedes the damage and always survives
        assert report["records"] == report["samples"] + sum(report["skipped"].values()), (seed, report)
        outcomes.update(report["skipped"])
        path.unlink()
    # the mutations reach the decoders and the tar reader, not just one code path
    assert {"truncated_shard", "undecodable_image"} <= outcomes, outcomes
    assert time.perf_counter() - start < 60


# ------------------------------------------------------------------ the classes of issue 19
def sparse_member(name: str, stored: bytes, real_size: int) -> bytes:
    """A GNU sparse member: `stored` (whole blocks) at the end of `real_size` bytes of holes."""
    info = tarfile.TarInfo(name)
    info.type, info.size = tarfile.GNUTYPE_SPARSE, len(stored)
    header = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    header[386:410] = (tarfile.itn(real_size - len(stored), 12, tarfile.GNU_FORMAT)
                       + tarfile.itn(len(stored), 12, tarfile.GNU_FORMAT))
    header[483:495] = tarfile.itn(real_size, 12, tarfile.GNU_FORMAT)
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % tarfile.calc_chksums(bytes(header))[0]
    return bytes(header) + stored


def test_sparse_and_compressed_shards_are_read_in_bounded_time(tmp_path):
    import gzip

    start = time.perf_counter()
    for seed in range(60):
        rng = np.random.default_rng(seed)
        good = b"".join(member(f"g{i}.png", image_bytes(i, (32, 32))) + member(f"g{i}.txt", b"caption")
                        for i in range(2))
        ext = ["txt", "json", "cls", "png", "jpg"][seed % 5]
        sparse = sparse_member(f"t.{ext}", b"x" * 512 * int(rng.integers(1, 4)), int(rng.integers(1 << 20, 1 << 40)))
        partner = member("t.txt", b"caption") if ext in ("png", "jpg") else member("t.png", image_bytes(seed, (32, 32)))
        hostile = partner + sparse
        data = good + hostile + member("z.png", image_bytes(99, (32, 32))) + member("z.txt", b"after") + b"\0" * 1024
        path = tmp_path / (f"f{seed}.tar.gz" if seed % 2 else f"f{seed}.tar")
        path.write_bytes(damage(gzip.compress(data), rng) if seed % 4 == 1 else gzip.compress(data) if seed % 2 else data)
        try:
            report = inspect_source(str(path))
        except NoUsableSample:  # compressed data damaged before the first sample: one line, like any such source
            assert seed % 4 == 1
            continue
        assert report["records"] == report["samples"] + sum(report["skipped"].values())
        if seed % 4 != 1:  # intact: the sparse member costs its sample, nothing else
            assert report["samples"] == 3 and report["skipped"] == {"sparse_member": 1}, (seed, report)
    assert time.perf_counter() - start < 60


def test_class_folders_of_non_regular_files_never_hang(tmp_path):
    import os
    import threading

    rng = np.random.default_rng(0)
    kinds = []
    for index in range(24):
        path = tmp_path / f"c{index % 3}" / f"{index}.png"
        path.parent.mkdir(exist_ok=True)
        kind = ["regular", "fifo", "zero", "null", "dangling"][int(rng.integers(5))]
        kinds.append(kind)
        if kind == "regular":
            path.write_bytes(image_bytes(index, (32, 32)))
        elif kind == "fifo":
            os.mkfifo(path)
        else:
            path.symlink_to({"zero": "/dev/zero", "null": "/dev/null", "dangling": tmp_path / "gone"}[kind])
    timer = threading.Timer(30, lambda: os.kill(os.getpid(), 2))  # a hang fails instead of stalling the suite
    timer.start()
    try:
        report = inspect_source(str(tmp_path), fmt="folder")
    finally:
        timer.cancel()
    assert report["samples"] == kinds.count("regular")
    assert report["skipped"] == {k: v for k, v in {
        "not_a_regular_file": sum(k in ("fifo", "zero", "null") for k in kinds),
        "missing_file": kinds.count("dangling")}.items() if v}


def test_yaml_alias_bombs_anywhere_are_refused_fast(tmp_path):
    from m3ae.config import ConfigError, load
    from m3ae.train.pretrain import PretrainConfig

    rng = np.random.default_rng(0)
    fields = ["model.depth", "optim.lr", "data.source", "data.image_only_sources", "train.steps", "log.every"]
    start = time.perf_counter()
    for seed in range(40):
        levels, width = int(rng.integers(2, 10)), int(rng.integers(2, 12))
        items = ['&a0 ["' + "x" * int(rng.integers(1, 40)) + '"]']
        items += [f"&a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, levels)]
        section, name = fields[seed % len(fields)].split(".")
        path = tmp_path / f"bomb{seed}.yaml"
        path.write_text(f"{section}:\n  {name}: [{', '.join(items)}]\n")
        try:
            load(PretrainConfig, path)
        except ConfigError as error:
            assert "alias" in str(error) and len(str(error)) < 1000
        else:
            raise AssertionError(f"seed {seed}: an alias bomb loaded")
    assert time.perf_counter() - start < 10


def test_pickles_with_random_memo_indices_fail_small_and_fast():
    import pickle
    import struct

    from m3ae.interop.safe_pickle import safe_load

    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for seed in range(200):
        index = int(rng.integers(0, 1 << 31)) if seed % 3 else int(rng.integers(0, 8))
        op = seed % 3
        put = (b"r" + struct.pack("<I", index) if op == 0 else b"q" + bytes([index % 256]) if op == 1
               else b"p%d\n" % index)
        body = b"\x80\x02" + b"N" + put + b"0" * int(rng.integers(0, 2)) + b"N" * int(rng.integers(0, 2)) + b"."
        try:
            safe_load(body)
        except (pickle.UnpicklingError, IndexError, ValueError, EOFError):
            pass  # refused (or malformed): either way in microseconds, without allocating the memo
    assert time.perf_counter() - start < 5
