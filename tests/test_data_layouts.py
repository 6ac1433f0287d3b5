"""Caption folders, tables with their own column names and img2dataset parquet read the same samples
as the equivalent tar shards; layout detection explains itself; image-only data is announced."""

from __future__ import annotations

import json
import logging
import sys

import pytest
import torch
from data_helpers import cli, image_bytes, samples, write_shards, write_tar

from m3ae.data import DataConfig
from m3ae.data.config import TableColumns
from m3ae.data.inspect import inspect_source
from m3ae.data.factory import detect_layout
from m3ae.data.loader import BatchStream, PretrainLoader, caption_coverage
from m3ae.utils import MissingExtraError, require


def _read(cfg: DataConfig) -> tuple[dict, dict]:
    """Every sample of one epoch by key (pixels after Resize + CenterCrop, tokens, label), and the stats."""
    loader = PretrainLoader(BatchStream(cfg, 4, 0, 1, epochs=1, train_transform=False))
    out = {}
    for batch in loader:
        for i, key in enumerate(batch["key"]):
            out[key] = (batch["image"][i], batch["text"][i], int(batch["label"][i]))
    return out, loader.stats()


def _config(source: str, **kw) -> DataConfig:
    return DataConfig(**{"source": source, "image_size": 32, "text_length": 16, "shuffle_buffer": 0, **kw})


def _assert_same(ours: dict, shards: dict) -> None:
    assert sorted(ours) == sorted(shards)
    for key, (image, text, label) in shards.items():
        assert torch.equal(ours[key][0], image) and torch.equal(ours[key][1], text) and ours[key][2] == label, key


def test_a_flat_caption_folder_reads_like_shards_recursively(tmp_path):
    flat, members = tmp_path / "flat", []
    (flat / "00001").mkdir(parents=True)
    for i, (key, index, caption, _) in enumerate(samples(6)):
        name = key if i < 3 else f"00001/{key}"  # img2dataset `files` output nests images in numbered folders
        (flat / f"{name}.png").write_bytes(image_bytes(index))
        (flat / f"{name}.txt").write_text(caption)
        members += [(f"{name}.png", image_bytes(index)), (f"{name}.txt", caption.encode())]
    write_tar(tmp_path / "same.tar", members)
    layout, why = detect_layout(str(flat))
    assert layout == "flat" and "3 image file(s) at its top level" in why
    ours, _ = _read(_config(str(flat)))
    _assert_same(ours, _read(_config(str(tmp_path / "same.tar")))[0])
    assert len(ours) == 6 and {label for *_, label in ours.values()} == {-1}


def test_numbered_subfolders_alone_are_a_caption_folder_and_named_ones_are_classes(tmp_path):
    for folder in ("00000", "00001"):
        (tmp_path / "numbered" / folder).mkdir(parents=True)
        (tmp_path / "named" / f"cat{folder}").mkdir(parents=True)
    assert detect_layout(str(tmp_path / "numbered"))[0] == "flat"
    layout, why = detect_layout(str(tmp_path / "named"))
    assert layout == "folder" and "2 subfolder(s)" in why and "labelled by sorted subfolder name" in why
    with pytest.raises(ValueError, match="no image file .* x.jpg \\+ x.txt"):
        _read(_config(str(tmp_path / "numbered")))


def test_a_table_with_its_own_columns_and_separator_reads_like_shards(tmp_path):
    shards = write_shards(tmp_path / "shards", 7, 4)
    (tmp_path / "img").mkdir()
    lines = ["id;title;filepath;cls"]
    for key, index, caption, label in samples(7):
        (tmp_path / "img" / f"{key}.png").write_bytes(image_bytes(index))
        lines.append(f"{key};{caption};img/{key}.png;{label}")
    (tmp_path / "table.csv").write_text("\n".join(lines) + "\n")
    columns = TableColumns(image="filepath", caption="title", label="cls", key="id", separator=";")
    _assert_same(_read(_config(str(tmp_path / "table.csv"), columns=columns))[0], _read(_config(shards))[0])
    with pytest.raises(ValueError, match=r"no column 'image' \(columns: \['id;title;filepath;cls'\]"):
        _read(_config(str(tmp_path / "table.csv")))  # the default names and separator do not fit this table


def test_open_clip_flag_names_reach_the_table_reader(tmp_path, capsys):
    (tmp_path / "a.png").write_bytes(image_bytes(0))
    (tmp_path / "t.tsv").write_text("filepath\ttitle\na.png\ta red square\n")
    cli(["data", "inspect", "--data.source", str(tmp_path / "t.tsv"), "--csv-img-key", "filepath", "--csv-caption-key", "title"])
    report = json.loads(capsys.readouterr().out)
    assert report["samples"] == 1 and report["empty_captions"] == 0 and report["layout"]["format"] == "manifest"


def test_img2dataset_parquet_reads_like_shards_skips_failed_rows_and_resumes_exactly(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = samples(9)
    table = pa.table({"key": [k for k, *_ in rows] + ["failed"],
                      "jpg": [image_bytes(i) for _, i, _, _ in rows] + [None],
                      "caption": [c for *_, c, _ in rows] + ["lost"],
                      "status": ["success"] * 9 + ["failed_to_download"]})
    (tmp_path / "pq").mkdir()
    pq.write_table(table, tmp_path / "pq" / "00000.parquet", row_group_size=3)
    shards = tmp_path / "shards"
    shards.mkdir()
    write_tar(shards / "s.tar", [m for k, i, c, _ in rows
                                 for m in ((f"{k}.png", image_bytes(i)), (f"{k}.txt", c.encode()))])
    assert detect_layout(str(tmp_path / "pq"))[0] == "parquet"
    ours, stats = _read(_config(str(tmp_path / "pq")))
    _assert_same(ours, _read(_config(str(shards / "s.tar")))[0])
    assert stats["skipped"] == {"missing_image": 1}
    # exact resume: stop after one batch, restore the state into a fresh loader, continue
    cfg = _config(str(tmp_path / "pq"), seed=3, shuffle_buffer=4)
    first = PretrainLoader(BatchStream(cfg, 2, 0, 1, epochs=2))
    batches = iter(first)
    next(batches)
    state = first.state_dict()
    expected = [b["key"] for b in batches]
    second = PretrainLoader(BatchStream(cfg, 2, 0, 1, epochs=2))
    second.load_state_dict(state)
    assert [b["key"] for b in second] == expected and len(expected) > 4


def test_parquet_without_pyarrow_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # what an environment without it raises
    (tmp_path / "x.parquet").write_bytes(b"")
    with pytest.raises(MissingExtraError, match=r"pip install 'm3ae\[parquet\]'"):
        _read(_config(str(tmp_path / "x.parquet")))
    with pytest.raises(MissingExtraError, match=r"log.wandb=true needs the 'no_such_package_m3ae' package"):
        require("no_such_package_m3ae", "wandb", "log.wandb=true")


def test_every_format_a_config_accepts_has_an_opener():
    from m3ae.data import factory
    from m3ae.data.config import FORMATS

    assert FORMATS[0] == "auto" and tuple(factory._OPENERS) == FORMATS[1:]


def test_inspect_says_which_layout_and_why(tmp_path):
    write_shards(tmp_path / "shards", 3, 3)
    report = inspect_source(str(tmp_path / "shards"))
    assert report["layout"] == {"format": "wds", "why": "a directory of 1 .tar shard(s)"}


def _img2dataset_webdataset_output(root, rows) -> None:
    """What `img2dataset --output_format webdataset` leaves: per shard NNNNN.tar (jpg, txt, json per
    key), NNNNN.parquet (the metadata of every row, no pixels) and NNNNN_stats.json."""
    root.mkdir()
    for shard, part in enumerate((rows[:4], rows[4:])):
        name = f"{shard:05d}"
        write_tar(root / f"{name}.tar", [m for k, i, c, _ in part for m in (
            (f"{k}.jpg", image_bytes(i, fmt="JPEG")), (f"{k}.txt", c.encode()),
            (f"{k}.json", json.dumps({"key": k, "caption": c, "status": "success", "url": f"http://x/{k}"}).encode()))])
        (root / f"{name}_stats.json").write_text(json.dumps({"count": len(part), "successes": len(part)}))
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:  # the file's presence is what detection meets; its content needs pyarrow
            (root / f"{name}.parquet").write_bytes(b"PAR1 metadata PAR1")
            continue
        pq.write_table(pa.table({"url": [f"http://x/{k}" for k, *_ in part], "key": [k for k, *_ in part],
                                 "caption": [c for *_, c, _ in part], "status": ["success"] * len(part)}),
                       root / f"{name}.parquet")


def test_img2dataset_files_output_folder_with_its_metadata_is_a_caption_folder(tmp_path):
    rows = samples(5)
    folder = tmp_path / "files"
    _img2dataset_webdataset_output(tmp_path / "meta", rows)  # for its .parquet and _stats.json
    (folder / "00000").mkdir(parents=True)
    for name in ("00000.parquet", "00000_stats.json"):
        (folder / name).write_bytes((tmp_path / "meta" / name).read_bytes())
    for key, index, caption, _ in rows:
        (folder / "00000" / f"{key}.jpg").write_bytes(image_bytes(index, fmt="JPEG"))
        (folder / "00000" / f"{key}.txt").write_text(caption)
    layout, why = detect_layout(str(folder))
    assert layout == "flat" and "numbered subfolders" in why and "2 .parquet/_stats.json file(s)" in why
    ours, _ = _read(_config(str(folder)))
    assert sorted(ours) == [f"00000/{k}" for k, *_ in rows]


def test_img2dataset_webdataset_output_folder_is_read_as_its_shards(tmp_path, capsys):
    rows = samples(7)
    folder = tmp_path / "wds"
    _img2dataset_webdataset_output(folder, rows)
    layout, why = detect_layout(str(folder))
    assert layout == "wds" and "2 .tar shard(s)" in why and "4 .parquet/_stats.json file(s)" in why
    # the loader (pretrain's path) reads exactly the samples of the two tars, in the pattern's order
    ours, stats = _read(_config(str(folder)))
    assert ours.keys() == _read(_config(str(folder / "0000{0..1}.tar")))[0].keys() == {k for k, *_ in rows}
    assert stats["skipped"] == {}
    cli(["data", "inspect", "--data.source", str(folder)])
    report = json.loads(capsys.readouterr().out)
    assert report["samples"] == 7 and report["empty_captions"] == 0 and report["layout"]["format"] == "wds"
    cli(["data", "build", "--data.source", str(folder), "--out-dir", str(tmp_path / "out"), "--shard-size", "5"])
    built = json.loads(capsys.readouterr().out)
    assert built["samples"] == 7 and built["skipped"] == {} and len(built["shards"]) == 2


def test_a_paired_run_on_data_without_captions_warns_that_it_is_image_only(tmp_path, caplog):
    from m3ae.train.pretrain import Pretrainer, PretrainConfig

    for key, index, _, _ in samples(5):
        (tmp_path / f"{key}.png").write_bytes(image_bytes(index))
    assert caption_coverage(_config(str(tmp_path))) == (0, 5)
    cfg = PretrainConfig(data=DataConfig(source=str(tmp_path)), out_dir=str(tmp_path / "run"))
    with caplog.at_level(logging.WARNING, logger="m3ae.train"):
        Pretrainer(cfg)
    assert "0 of 5 samples have a caption: training is image-only" in caplog.text


def test_hostile_parquet_labels_are_counted_skips(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"jpg": [image_bytes(i) for i in range(4)], "caption": ["a", "b", "c", "d"],
                             "label": [1.0, float("nan"), 1e30, 2.5]}), tmp_path / "x.parquet")
    report = inspect_source(str(tmp_path / "x.parquet"))
    assert report["samples"] == 1 and report["skipped"] == {"bad_label": 3}


def test_hostile_jsonl_rows_are_counted_skips(tmp_path):
    (tmp_path / "a.png").write_bytes(image_bytes(0))
    rows = [json.dumps({"img": "a.png", "text": "fine"}), '{"img": "a.png", "x": ' + "[" * 50_000 + "]" * 50_000 + "}"]
    (tmp_path / "m.jsonl").write_text("\n".join(rows) + "\n")
    report = inspect_source(str(tmp_path / "m.jsonl"), columns=TableColumns(image="img", caption="text"))
    assert report["samples"] == 1 and sum(report["skipped"].values()) == 1


def test_open_clip_column_flags_are_on_every_command_that_reads_data(tmp_path, capsys):
    from m3ae.cli import _subparsers, build_parser, main

    readers = {sub.prog: sub for sub in _subparsers(build_parser())
               if "--data.columns.image" in sub._option_string_actions}
    assert {"m3ae pretrain", "m3ae knn", "m3ae embed", "m3ae linear-probe", "m3ae data build"} <= set(readers)
    for prog, parser in readers.items():
        for alias, field in (("--csv-img-key", "image"), ("--csv-caption-key", "caption"), ("--csv-separator", "separator")):
            assert parser._option_string_actions[alias].dest == f"config_overrides:data.columns.{field}", prog
    # knn refused --csv-img-key once; its resolved config now holds the value typed
    assert main(["knn", "--checkpoint", "x", "--csv-img-key", "filepath", "--csv-separator", "\\t", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "image: filepath" in printed and "separator: \"\\t\"" in printed
