import json

import numpy as np
import pytest
from data_helpers import cli, samples, write_folder, write_hdf5, write_manifest, write_shards, write_tar

from m3ae.data.factory import open_source
from m3ae.data.sources import decode_caption
from m3ae.data.transforms import decode_image

COUNT = 12


def read_all(source) -> dict[str, tuple[int, bytes]]:
    """caption -> (label, decoded RGB pixels): the content, independent of per-format keys."""
    out = {}
    for unit in source.units():
        for record in source.read_unit(unit):
            assert not record.error, record
            pixels = np.asarray(decode_image(record.image, 10**8, 1)).tobytes()
            out[decode_caption(record.caption)] = (record.label, pixels)
    return out


@pytest.fixture(scope="module")
def formats(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    return {
        "wds": write_shards(root / "tars", COUNT, per_shard=5),
        "hdf5": str(write_hdf5(root / "data.h5", COUNT)),
        "jsonl": str(write_manifest(root / "jsonl", COUNT, "jsonl")),
        "csv": str(write_manifest(root / "csv", COUNT, "csv")),
        "folder": str(write_folder(root / "folder", COUNT)),
    }


def test_every_format_yields_identical_samples(formats):
    contents = {name: read_all(open_source(spec, unit_size=4)) for name, spec in formats.items()}
    expected_labels = {caption: label for _, _, caption, label in samples(COUNT)}
    reference = contents.pop("wds")
    assert {c: label for c, (label, _) in reference.items()} == expected_labels
    for name, content in contents.items():
        if name == "hdf5":  # the official pretraining layout (jpg + caption) carries no label
            assert {c: (-1, pixels) for c, (_, pixels) in reference.items()} == content
        else:
            assert content == reference, name


def test_labelled_hdf5_split_and_folder_labels(formats):
    labelled = open_source(formats["hdf5"], role="labelled", split="train")
    labels = [r.label for u in labelled.units() for r in labelled.read_unit(u)]
    assert labels == [label for *_, label in samples(COUNT)]
    folder = open_source(formats["folder"])
    assert folder.classes == ["class0", "class1", "class2"]


def test_brace_glob_directory_and_pipe_list_the_same_shards(formats, tmp_path):
    brace = open_source(formats["wds"])
    directory = formats["wds"].rsplit("/", 1)[0]
    glob = open_source(directory + "/shard-*.tar")
    folder = open_source(directory)
    assert brace.shards == glob.shards == folder.shards and len(brace.shards) == 3
    piped = open_source("::".join(f"pipe:cat {s}" for s in brace.shards), fmt="wds")
    assert read_all(piped) == read_all(brace)


def test_missing_sources_name_the_path(tmp_path):
    for spec in [tmp_path / "none-{0..3}.tar", tmp_path / "none-*.tar", tmp_path / "none.h5",
                 tmp_path / "none.jsonl", tmp_path / "none"]:
        with pytest.raises(FileNotFoundError, match=str(tmp_path)):
            open_source(str(spec))
    with pytest.raises(FileNotFoundError, match="none.txt"):
        open_source(str(tmp_path / "none.txt"), role="text")


def test_text_only_sources(tmp_path):
    import h5py

    (tmp_path / "corpus.txt").write_text("first line\n\nsecond line\n")
    lines = open_source(str(tmp_path / "corpus.txt"), role="text")
    assert [decode_caption(r.caption) for r in lines.read_unit(0)] == ["first line", "second line"]
    with h5py.File(tmp_path / "text.h5", "w") as handle:
        handle.create_dataset("text", data=[b"alpha", b"beta"])
    text = open_source(str(tmp_path / "text.h5"), role="text")
    assert [decode_caption(r.caption) for r in text.read_unit(0)] == ["alpha", "beta"]


def test_tar_members_are_grouped_by_key_with_directories(tmp_path):
    from data_helpers import image_bytes

    path = write_tar(tmp_path / "d.tar", [("a/x.1.png", image_bytes(0)), ("a/x.1.txt", b"one"),
                                          ("b/x.1.png", image_bytes(1)), ("b/x.1.txt", b"two")])
    records = list(open_source(str(path)).read_unit(0))
    assert [(r.key, r.caption) for r in records] == [("a/x", b"one"), ("b/x", b"two")]


def test_build_converts_manifest_and_folder_to_equivalent_shards(formats, tmp_path, capsys):
    for name in ("jsonl", "folder"):
        cli(["data", "build", "--data.source", formats[name], "--out-dir", str(tmp_path / name), "--shard-size", "5"])
        report = json.loads(capsys.readouterr().out)
        assert report["samples"] == COUNT and len(report["shards"]) == 3
        assert read_all(open_source(str(tmp_path / name))) == read_all(open_source(formats[name]))


def test_inspect_reports_counts_and_oov(formats, tmp_path, capsys):
    from data_helpers import image_bytes

    shard = write_tar(tmp_path / "s.tar", [("k1.png", image_bytes(0)), ("k1.txt", "a dog \u2603".encode()),
                                            ("k2.png", b"broken"), ("k2.txt", b"x")])
    cli(["data", "inspect", "--data.source", str(shard)])
    stats = json.loads(capsys.readouterr().out)
    assert stats["samples"] == 1 and stats["skipped"] == {"undecodable_image": 1}
    assert stats["caption_tokens"]["max"] == 3 and stats["oov_rate"] == pytest.approx(1 / 3, abs=1e-5)
    assert stats["image_width"]["min"] == 40 and stats["image_height"]["max"] == 32
