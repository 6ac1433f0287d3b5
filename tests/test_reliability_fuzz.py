"""Seeded random damage to valid JPEG/PNG/tar/json members: `inspect` reads every shard to the end,
every record is either a sample or a counted skip, and no exception escapes."""

from __future__ import annotations

import json
import tarfile
import time

import numpy as np
from data_helpers import image_bytes

from m3ae.data.inspect import inspect_source

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
