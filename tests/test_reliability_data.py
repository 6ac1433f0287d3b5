"""Hostile datasets: names that look like commands, samples that used to crash a run, repeated keys."""

import json
import logging
import os
import tarfile

import pytest

import m3ae.data.loader
from data_helpers import image_bytes, write_tar

from m3ae.cli import main
from m3ae.data import DataConfig, build_eval_loader, build_pretrain_loader
from m3ae.data.inspect import inspect_source
from m3ae.data.factory import build_shards, open_source
from m3ae.data.sources import MAX_JSON_DEPTH, BadField, checked_label, load_json
from m3ae.data.writer import ShardWriter


def good(key: str, index: int, label: int = 1) -> list[tuple[str, bytes]]:
    return [(f"{key}.png", image_bytes(index)), (f"{key}.txt", b"a caption"), (f"{key}.cls", str(label).encode())]


def config(source: str, **overrides) -> DataConfig:
    base = dict(source=source, image_size=16, min_image_size=8, text_length=8, shuffle_buffer=0, seed=3)
    return DataConfig(**{**base, **overrides})


def test_a_file_name_is_never_run_as_a_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_tar(tmp_path / "ok.tar", good("a", 0))
    # a downloaded dataset can hold such a name; webdataset.gopen would hand it to `sh -c`
    hostile = tmp_path / "pipe:touch PWNED;.tar"
    write_tar(hostile, good("b", 1))
    report = inspect_source("*.tar")
    assert not (tmp_path / "PWNED").exists()
    assert report["samples"] == 2 and report["skipped"] == {}  # read as the tar file it is
    keys = [k for batch in build_pretrain_loader(config("*.tar"), batch_size=1, epochs=1) for k in batch["key"]]
    assert sorted(keys) == ["a", "b"] and not (tmp_path / "PWNED").exists()
    # the same for a directory listing
    report = inspect_source(str(tmp_path))
    assert report["samples"] == 2 and not (tmp_path / "PWNED").exists()


def test_a_typed_pipe_pattern_is_still_a_command(tmp_path):
    shard = write_tar(tmp_path / "ok.tar", good("a", 0))
    assert inspect_source(f"pipe:cat {shard}", fmt="wds")["samples"] == 1


def hostile_shards(root):
    """Each of the four samples that used to end a run, then a good one, in four shards."""
    deep = b"[" * 200_000 + b"]" * 200_000
    bad = {
        "inf": [("inf.json", b'{"label": Infinity}')],
        "deep": [("deep.json", b'{"label": 1, "x": ' + deep + b"}")],
        "nines": [("nines.cls", b"9" * 30)],
        "huge": [("huge.json", json.dumps({"label": 10**30}).encode())],
    }
    for index, (name, members) in enumerate(bad.items()):
        stem = members[0][0].split(".")[0]
        # bad sample first: the loader's counts are those of the last batch handed out
        write_tar(root / f"bad-{index}.tar", [(f"{stem}.png", image_bytes(10 + index)), (f"{stem}.txt", b"x")]
                  + members + good(f"ok{index}", index))
    return str(root / "bad-*.tar")


def test_the_four_crashing_samples_are_counted_skips(tmp_path):
    pattern = hostile_shards(tmp_path)
    report = inspect_source(pattern)
    assert report["records"] == 8 and report["samples"] == 4
    assert report["skipped"] == {"bad_json": 2, "bad_label": 2}
    for workers in (0, 1):
        loader = build_pretrain_loader(config(pattern, num_workers=workers), batch_size=2, epochs=1)
        keys = sorted(k for batch in loader for k in batch["key"])
        assert keys == ["ok0", "ok1", "ok2", "ok3"]
        assert loader.stats()["skipped"] == {"bad_json": 2, "bad_label": 2}
    eval_cfg = config(pattern)
    eval_cfg.eval_train_source = pattern
    labels = [int(v) for batch in build_eval_loader(eval_cfg, batch_size=4) for v in batch["label"]]
    assert labels == [1, 1, 1, 1]


def test_skip_log_names_the_shard_file(tmp_path, caplog):
    pattern = hostile_shards(tmp_path)
    with caplog.at_level(logging.WARNING, logger="m3ae.data"):
        list(build_pretrain_loader(config(pattern), batch_size=2, epochs=1))
    messages = [r.getMessage() for r in caplog.records if "skipped sample" in r.getMessage()]
    assert len(messages) == 4
    assert all(str(tmp_path / "bad-") in m and "bad-*.tar" not in m for m in messages)


def test_manifest_rows_with_hostile_json_and_labels_are_counted(tmp_path):
    (tmp_path / "a.png").write_bytes(image_bytes(0))
    rows = [json.dumps({"image": "a.png", "caption": "fine", "label": 2}),
            '{"image": "a.png", "caption": "deep", "x": ' + "[" * 100_000 + "]" * 100_000 + "}",
            json.dumps({"image": "a.png", "caption": "huge", "label": 10**30}),
            '{"image": "a.png", "caption": "nan", "label": NaN}',
            json.dumps({"image": "a.png", "caption": "fraction", "label": 1.5})]
    (tmp_path / "m.jsonl").write_text("\n".join(rows) + "\n")
    report = inspect_source(str(tmp_path / "m.jsonl"))
    assert report["samples"] == 1
    assert report["skipped"] == {"bad_label": 2, "bad_manifest_row": 2}


def test_repeated_keys_are_counted_not_merged(tmp_path):
    members = good("a", 0) + good("a", 1) + good("b", 2) + good("a", 3)
    write_tar(tmp_path / "dup.tar", members)
    report = inspect_source(str(tmp_path / "dup.tar"))
    # the second consecutive copy of "a" is counted; a later, separate "a" is its own sample
    assert report["records"] == 4 and report["samples"] == 3 and report["skipped"] == {"duplicate_key": 1}


@pytest.mark.parametrize("value, expected", [("3", 3), (b" 7\n", 7), (3.0, 3), (-1, -1), (2**31 - 1, 2**31 - 1)])
def test_checked_label_accepts_plain_integers(value, expected):
    assert checked_label(value) == expected


@pytest.mark.parametrize("value", ["9" * 30, 10**30, float("inf"), float("nan"), 1.5, True, -2, "1_0", "x",
                                   b"\xff", 2**31, None, [1]])
def test_checked_label_rejects(value):
    with pytest.raises(BadField) as info:
        checked_label(value)
    assert info.value.reason == "bad_label"


def test_load_json_depth_and_constants():
    assert load_json("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH) is not None
    assert load_json('{"k": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}')["k"][0] == "["
    for text in ("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1), '{"a": -Infinity}', "{", b"\xff"):
        with pytest.raises(BadField):
            load_json(text)
    assert os.environ.get("PWNED") is None


@pytest.mark.parametrize("key, why", [("a\u0000b", "contains NUL"), ("/etc/cron", "is an absolute path"),
                                      ("same", "repeats the previous")])
def test_build_rejects_keys_that_would_not_read_back(tmp_path, capsys, key, why):
    (tmp_path / "a.png").write_bytes(image_bytes(0))
    rows = [{"image": "a.png", "caption": "first", "key": "same"}, {"image": "a.png", "caption": "x", "key": key}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert main(["data", "build", "--data.source", str(tmp_path / "m.jsonl"), "--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith(f"m3ae data build: error: {tmp_path / 'm.jsonl'}: record 1 (0-based): sample key ") and why in err


def test_built_keys_read_back_identically(tmp_path):
    (tmp_path / "a.png").write_bytes(image_bytes(0))
    # build stores dots as "_" ("v1.2" -> "v1_2"), which also disarms "../up"
    keys = ["plain", "dir/sub/k", "x.y/z", "v1.2", "../up", "plain"]
    rows = [{"image": "a.png", "caption": f"c{i}", "key": k} for i, k in enumerate(keys)]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    summary = build_shards(str(tmp_path / "m.jsonl"), tmp_path / "out", shard_size=4)
    assert summary["samples"] == 6
    source = open_source(str(tmp_path / "out"))
    read = [r.key for u in source.units() for r in source.read_unit(u)]
    assert read == ["plain", "dir/sub/k", "x_y/z", "v1_2", "__/up", "plain"]


@pytest.mark.parametrize("key", ["../outside", "d/../../x", "a/b.c", "a\u0000"])
def test_the_shard_writer_refuses_keys_that_escape_or_change(tmp_path, key):
    with ShardWriter(tmp_path) as writer, pytest.raises(ValueError, match="sample key"):
        writer.write(key, image_bytes(0), "caption")


def test_a_damaged_member_header_is_counted_not_a_quiet_end_of_shard(tmp_path):
    path = write_tar(tmp_path / "d.tar", good("a", 0) + good("b", 1) + good("c", 2))
    data = bytearray(path.read_bytes())
    with tarfile.open(path) as tar:
        header = tar.getmember("b.txt").offset
    data[header + 148 : header + 156] = b"0000000\0"  # a wrong checksum: tarfile stops reading there
    path.write_bytes(bytes(data))
    report = inspect_source(str(path))
    # "a" survives; "b" (cut at its header) and everything after are reported, not silently dropped
    assert report["samples"] == 1 and report["skipped"] == {"truncated_shard": 1}


def test_an_interrupted_build_leaves_only_whole_shards(tmp_path):
    with pytest.raises(KeyboardInterrupt), ShardWriter(tmp_path, shard_size=2) as writer:
        for i in range(3):
            writer.write(f"k{i}", image_bytes(i), f"caption {i}")
        raise KeyboardInterrupt  # mid-way through the second shard
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-0000.tar"]
    assert [p.name for p in writer.written] == ["shard-0000.tar"]
    report = inspect_source(str(tmp_path / "shard-0000.tar"))
    assert report["samples"] == 2 and report["skipped"] == {}


EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n%%EndComments\n"
       b"newpath 0 0 moveto 64 64 lineto stroke\nshowpage\n%%EOF\n")


def test_sample_bytes_cannot_choose_a_decoder_that_runs_a_program(tmp_path, monkeypatch):
    # PostScript stored as x.jpg: Pillow would pick its EPS plugin from the bytes, which runs
    # Ghostscript on the sample; a stand-in `gs` on PATH records whether anything ran it
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    ran = tmp_path / "GHOSTSCRIPT_RAN"
    (bin_dir / "gs").write_text(f"#!/bin/sh\ntouch {ran}\nexit 1\n")
    (bin_dir / "gs").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    shard = write_tar(tmp_path / "ps.tar", [("x.jpg", EPS), ("x.txt", b"a caption"), *good("y", 1)])
    report = inspect_source(str(shard))
    assert report["skipped"] == {"undecodable_image": 1} and report["samples"] == 1
    keys = [k for batch in build_pretrain_loader(config(str(shard)), batch_size=1, epochs=1) for k in batch["key"]]
    assert keys == ["y"] and not ran.exists()
    # the shard builder re-encodes only the formats the pipeline reads
    from m3ae.data.writer import reencode_png

    with pytest.raises(Exception, match="cannot identify image file"):
        reencode_png(EPS)
    assert not ran.exists()


def test_a_bad_sample_is_logged_once_per_run_not_once_per_epoch(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(m3ae.data.loader, "_reported", {})  # what earlier tests in this process logged
    # a probe reads its split with a new loader every epoch: 3 bad images over 90 epochs were 270 lines
    pattern = hostile_shards(tmp_path)
    eval_cfg = config(pattern)
    eval_cfg.eval_train_source = pattern
    with caplog.at_level(logging.WARNING, logger="m3ae.data"):
        for _ in range(3):
            assert len([k for batch in build_eval_loader(eval_cfg, batch_size=4) for k in batch["key"]]) == 4
        loader = build_pretrain_loader(config(pattern), batch_size=2, epochs=3)
        assert len([k for batch in loader for k in batch["key"]]) == 12
    assert loader.stats()["skipped"] == {"bad_json": 6, "bad_label": 6}  # still every skip counted
    messages = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(messages) == 4 and len(set(messages)) == 4, messages


def test_skip_lines_stop_after_twenty_per_reason_and_say_so(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(m3ae.data.loader, "_reported", {})  # what earlier tests in this process logged
    members = [m for i in range(25) for m in ((f"k{i:03d}.png", b"not an image"), (f"k{i:03d}.txt", b"x"))]
    members += good("ok", 0)
    write_tar(tmp_path / "many-bad.tar", members)
    with caplog.at_level(logging.WARNING, logger="m3ae.data"):
        loader = build_pretrain_loader(config(str(tmp_path / "many-bad.tar")), batch_size=1, epochs=1)
        assert [k for batch in loader for k in batch["key"]] == ["ok"]
    assert loader.stats()["skipped"] == {"undecodable_image": 25}
    messages = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(messages) == 21 and "no longer logged one by one" in messages[-1]
