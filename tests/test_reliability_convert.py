"""Small hostile pickles must not exhaust `convert-official`: bounded time, memory and recursion."""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_convert_official import _nest as nest

from m3ae.interop.official import ConversionError, load_official
from m3ae.interop.safe_pickle import safe_load

SRC = str(Path(__file__).resolve().parents[1] / "src")


def param_tree(encoder) -> dict:
    return {"cls_token": np.zeros((1, 1, 8), np.float32), "image_embedding": {"kernel": np.zeros((12, 8), np.float32)},
            "encoder": encoder}


class HugeArray:
    """An array header declaring 250 M float32 (1 GB) with no data behind it."""

    def __reduce__(self):
        return np.ndarray.__reduce__(np.zeros(0, np.float32))[0], (np.ndarray, (1, 1, 250_000_000), b"f")


class HugeBytes:
    def __reduce__(self):
        return bytearray, (10**12,)


def deep_pickle(depth: int) -> bytes:
    """A parameter tree whose "encoder" is {"k": {"k": ... {}}} `depth` levels deep, written as
    opcodes (pickle.dumps would recurse); loading it is iterative and fine, walking it is not."""
    key = b"X" + struct.pack("<I", 1) + b"k"  # BINUNICODE "k"
    chain = (b"}" + key) * depth + b"}" + b"s" * depth  # EMPTY_DICT, key, ..., SETITEM x depth
    head = pickle.dumps(param_tree(None), protocol=2)
    assert head.endswith(b"Nu.")  # "encoder": None, the last item of the SETITEMS batch
    return head[:-3] + chain + b"u."


def hostile_files(root: Path) -> dict[str, Path]:
    shared: dict = {"leaf": np.zeros(1, np.float32)}
    for _ in range(24):
        shared = {"a": shared, "b": shared}  # 2^24 paths (the report's had 2^40) in a few hundred bytes
    cyclic = param_tree({})
    cyclic["encoder"]["self"] = cyclic
    payloads = {
        "dag": pickle.dumps(param_tree(shared), protocol=2),
        "huge_array": pickle.dumps(param_tree({"Block_0": {"kernel": HugeArray()}}), protocol=2),
        "huge_bytes": pickle.dumps(param_tree({"Block_0": {"kernel": HugeBytes()}}), protocol=2),
        "cyclic": pickle.dumps(cyclic, protocol=2),
        "deep": deep_pickle(100_000),
    }
    files = {}
    for name, data in payloads.items():
        files[name] = root / f"{name}.pkl"
        files[name].write_bytes(data)
    return files


def test_the_deep_pickle_is_what_it_claims(tmp_path):
    tree = safe_load(hostile_files(tmp_path)["deep"].read_bytes())
    node, depth = tree["encoder"], 0
    while node:
        node, depth = node["k"], depth + 1
    assert depth == 100_000 and sorted(tree) == ["cls_token", "encoder", "image_embedding"]


def test_hostile_pickles_fail_fast_small_and_named(tmp_path):
    files = hostile_files(tmp_path)
    script = (
        "import json, resource, sys, time\n"
        "from m3ae.interop.official import ConversionError, load_official\n"
        "def status(field):\n"
        "    return next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith(field))\n"
        "# 500 MB of address space beyond what the imports took: a larger allocation is a MemoryError\n"
        "resource.setrlimit(resource.RLIMIT_AS, (status('VmSize:') + 500 * 2**20, resource.RLIM_INFINITY))\n"
        "rss = status('VmRSS:')\n"
        "out = {}\n"
        "for path in sys.argv[1:]:\n"
        "    start = time.perf_counter()\n"
        "    try:\n"
        "        load_official(path)\n"
        "        out[path] = ['no error', '', 0]\n"
        "    except Exception as error:\n"
        "        out[path] = [type(error).__name__, str(error), time.perf_counter() - start]\n"
        "out['peak_growth_mb'] = (status('VmHWM:') - rss) / 2**20\n"
        "print(json.dumps(out))\n"
    )
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script, *map(str, files.values())], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    # ru_maxrss would carry the forking pytest process's peak across exec; the address-space limit
    # set with `resource` bounds the conversions themselves, VmHWM (peak RSS of this process) confirms
    growth = results.pop("peak_growth_mb")
    print(f"peak RSS growth during the conversions: {growth:.1f} MB")
    assert growth < 500
    for name, path in files.items():
        kind, message, seconds = results[str(path)]
        assert kind == "ConversionError" and message.startswith(f"{path}:"), (name, kind, message)
        assert seconds < 5, (name, seconds)
    assert "shared or cyclic" in results[str(files["dag"])][1]
    assert "larger than the" in results[str(files["huge_array"])][1]
    assert "bytearray(1000000000000)" in results[str(files["huge_bytes"])][1]
    assert "deeper than 32" in results[str(files["deep"])][1]


def test_a_real_tree_still_converts(tmp_path):
    path = tmp_path / "ok.pkl"
    path.write_bytes(pickle.dumps(param_tree({"Block_0": {"kernel": np.ones((2, 3), np.float32)}}), protocol=2))
    flat, variant = load_official(path)
    assert sorted(flat) == ["cls_token", "encoder/Block_0/kernel", "image_embedding/kernel"] and variant == {}
    np.testing.assert_array_equal(flat["encoder/Block_0/kernel"], np.ones((2, 3), np.float32))
    with pytest.raises(ConversionError, match="not a readable pickle"):
        (tmp_path / "cut.pkl").write_bytes(path.read_bytes()[:40])
        load_official(tmp_path / "cut.pkl")


FIXTURE = Path(__file__).parent / "fixtures" / "official_m3ae" / "m3ae_tiny_official_ckpt.pkl"


class StrideZeroView:
    """numpy.ndarray called directly: a (32, 2^24) float32 kernel (2 GB) viewing four bytes (zero strides)."""

    def __reduce__(self):
        return np.ndarray, ((32, 1 << 24), np.dtype(np.float32), b"\0" * 4, 0, (0, 0))


def item5_files(root: Path) -> dict[str, tuple[Path, str]]:
    """The crafted files of issue 19 item 5: (path, how it is loaded)."""
    from m3ae import M3AE, M3AEConfig

    flat, variant = load_official(FIXTURE)
    files: dict[str, tuple[Path, str]] = {}

    def write(name: str, data: bytes, how: str = "convert") -> None:
        files[name] = (root / f"{name}.pkl", how)
        files[name][0].write_bytes(data)

    write("memo_long_binput", b"\x80\x02Nr\x00\x00\x00\x08.")  # 9 bytes, memo index 2^27
    write("memo_put", b"Np134217728\n.")
    view = {**flat, "encoder/Block_0/TransformerMLP_0/fc1/kernel": StrideZeroView()}
    write("stride_zero_view", pickle.dumps({"variant": variant, "params": nest(view)}, protocol=2))
    wide = {**flat, "cls_token": np.zeros((1, 1, 100_000), np.float32)}  # emb_dim 100 000 from a 400 KB array
    write("huge_inferred_shapes", pickle.dumps({"variant": variant, "params": nest(wide)}, protocol=2))
    for name, changes in {"deep_wide_config": dict(depth=400, emb_dim=2048, num_heads=16),
                          "giant_width_config": dict(emb_dim=10**9, num_heads=2)}.items():
        directory = M3AE(M3AEConfig(emb_dim=32, depth=1, num_heads=2, dec_emb_dim=32, dec_depth=1, dec_num_heads=2,
                                    image_size=32, patch_size=8, text_length=8, vocab_size=100)
                         ).save_pretrained(root / name)
        config = json.loads((directory / "config.json").read_text())
        (directory / "config.json").write_text(json.dumps({**config, **changes}))
        files[name] = (directory, "from_pretrained")
    return files


def test_item5_crafted_files_fail_in_one_line_within_5_s_and_100_mb(tmp_path):
    files = item5_files(tmp_path)
    script = (
        "import json, resource, sys, time\n"
        "from m3ae import M3AE\n"
        "from m3ae.interop.official import convert_official\n"
        "def status(field):\n"
        "    return next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith(field))\n"
        "resource.setrlimit(resource.RLIMIT_AS, (status('VmSize:') + 1000 * 2**20, resource.RLIM_INFINITY))\n"
        "base = status('VmRSS:')\n"
        "out = {}\n"
        "for how, path in zip(sys.argv[1::2], sys.argv[2::2]):\n"
        "    start = time.perf_counter()\n"
        "    try:\n"
        "        (convert_official if how == 'convert' else M3AE.from_pretrained)(path)\n"
        "        out[path] = ['no error', '', 0]\n"
        "    except Exception as error:\n"
        "        out[path] = [type(error).__name__, str(error), time.perf_counter() - start]\n"
        "    out[path].append((status('VmHWM:') - base) / 2**20)\n"
        "print(json.dumps(out))\n"
    )
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    args = [str(part) for path, how in files.values() for part in (how, path)]
    done = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout)
    for name, (path, how) in files.items():
        kind, message, seconds, peak_mb = results[str(path)]
        print(f"{name}: {kind} in {seconds:.2f} s, peak RSS {peak_mb:.1f} MB over baseline: {message[:160]}")
        assert kind in ("ConversionError", "WeightsMismatchError"), (name, kind, message)
        assert message.startswith(str(path)) and "\n" not in message, (name, message)
        assert seconds < 5 and peak_mb < 100, (name, seconds, peak_mb)
    assert "no M3AE/MAE parameter tree" in results[str(files["memo_long_binput"][0])][1]  # read, then refused
    assert "called directly" in results[str(files["stride_zero_view"][0])][1]
    assert "does not match its config" in results[str(files["huge_inferred_shapes"][0])][1]
