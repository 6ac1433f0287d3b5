import dataclasses
import io
import json
import tarfile
from itertools import islice

import pytest
import torch
from data_helpers import image_bytes, pair_members, write_shards, write_tar
from PIL import Image

from m3ae.data import DataConfig, build_eval_loader, build_pretrain_loader
from m3ae.data.sources import NoUsableSample


def config(source: str, **overrides) -> DataConfig:
    base = dict(source=source, image_size=16, min_image_size=8, text_length=8, shuffle_buffer=4, seed=3)
    return DataConfig(**{**base, **overrides})


def all_keys(loader) -> list[str]:
    return [key for batch in loader for key in batch["key"]]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    # 7 shards of 6 samples; 42 is not a multiple of the batch sizes used below.
    return write_shards(tmp_path_factory.mktemp("shards"), 42, per_shard=6)


def test_batch_contract(shards):
    batch = next(iter(build_pretrain_loader(config(shards), batch_size=5)))
    assert batch["image"].shape == (5, 3, 16, 16) and batch["image"].dtype == torch.float32
    assert batch["text"].shape == (5, 8) and batch["text"].dtype == torch.long
    assert batch["text_padding_mask"].dtype == torch.bool and batch["label"].dtype == torch.long
    assert len(batch["key"]) == 5 and "unpaired_text" not in batch
    assert set(batch["label"].tolist()) <= {0, 1, 2}
    # cc12m normalisation maps [0, 1] pixels onto roughly [-1.8, 1.4].
    assert -1.9 < batch["image"].min() < batch["image"].max() < 1.5


def test_seeded_shuffle(shards):
    first = all_keys(build_pretrain_loader(config(shards), 4, epochs=1))
    again = all_keys(build_pretrain_loader(config(shards), 4, epochs=1))
    other = all_keys(build_pretrain_loader(config(shards, seed=4), 4, epochs=1))
    assert first == again and sorted(first) == sorted(other) and first != other
    assert first != sorted(first)


def test_two_ranks_two_workers_cover_an_epoch_exactly_once(shards):
    seen = []
    for rank in range(2):
        loader = build_pretrain_loader(config(shards, num_workers=2), batch_size=4, rank=rank,
                                       world_size=2, epochs=1)
        seen += all_keys(loader)
    assert sorted(seen) == [f"{i:06d}" for i in range(42)]


def take(loader, count: int) -> list[dict]:
    return list(islice(iter(loader), count))


@pytest.mark.parametrize("workers", [0, 2])
def test_stop_and_resume_matches_an_uninterrupted_run(shards, tmp_path, workers):
    text_file = tmp_path / "corpus.txt"
    text_file.write_text("".join(f"unpaired sentence {i}\n" for i in range(23)))
    cfg = config(shards, num_workers=workers, paired_fraction=0.5, caption_drop="random",
                 text_only_sources=[str(text_file)], unpaired_text_length=6, unpaired_text_batch_size=2)
    # 30 batches of 5 = 150 samples: more than three epochs of 42, resumed mid-shard and mid-epoch.
    reference = take(build_pretrain_loader(cfg, batch_size=5), 30)
    resumed = []
    loader = build_pretrain_loader(cfg, batch_size=5)
    for stop in (7, 18, 30):
        resumed += take(loader, stop - len(resumed))
        state = json.loads(json.dumps(loader.state_dict()))
        assert state["position"] == stop
        loader = build_pretrain_loader(cfg, batch_size=5)
        loader.load_state_dict(state)
    assert [b["key"] for b in resumed] == [b["key"] for b in reference]
    assert {k for b in reference for k in b["key"]} == {f"{i:06d}" for i in range(42)}
    for got, want in zip(resumed, reference, strict=True):
        for name in ("image", "text", "text_padding_mask", "unpaired_text", "unpaired_text_padding_mask"):
            assert torch.equal(got[name], want[name]), name


def test_finite_epochs_resume_exactly_even_after_a_worker_finishes(tmp_path):
    # 9 shards over 2 workers: one worker runs out first and the other finishes alone.
    cfg = config(write_shards(tmp_path, 45, per_shard=5), num_workers=2)
    reference = [b["key"] for b in build_pretrain_loader(cfg, 4, epochs=2)]
    for stop in (5, 12, len(reference) - 2):
        first = build_pretrain_loader(cfg, 4, epochs=2)
        keys = [b["key"] for b in take(first, stop)]
        resumed = build_pretrain_loader(cfg, 4, epochs=2)
        resumed.load_state_dict(first.state_dict())
        assert keys + [b["key"] for b in resumed] == reference, stop


def test_resume_decodes_only_what_it_yields(shards, monkeypatch):
    import m3ae.data.loader as loader_module

    cfg = config(shards)
    first = build_pretrain_loader(cfg, batch_size=5)
    take(first, 13)  # 65 samples: into the second epoch, mid-shard
    decoded = []
    real_decode = loader_module.decode_image
    monkeypatch.setattr(loader_module, "decode_image", lambda data, *a: decoded.append(1) or real_decode(data, *a))
    resumed = build_pretrain_loader(cfg, batch_size=5)
    resumed.load_state_dict(first.state_dict())
    take(resumed, 1)
    assert len(decoded) == 5


def test_resume_rejects_a_different_worker_count(shards):
    loader = build_pretrain_loader(config(shards), batch_size=4)
    take(loader, 2)
    other = build_pretrain_loader(config(shards, num_workers=2), batch_size=4)
    with pytest.raises(ValueError, match="num_workers"):
        other.load_state_dict(loader.state_dict())


def jpeg(size=(32, 32)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(out, format="JPEG")
    return out.getvalue()


def png(size) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (1, 2, 3)).save(out, format="PNG")
    return out.getvalue()


def test_broken_samples_are_skipped_and_counted(tmp_path):
    members = [
        ("good0.png", image_bytes(0)), ("good0.txt", b"a caption"),
        ("good1.jpg", jpeg()), ("good1.txt", b"a caption"),
        ("good2.webp", image_bytes(2, fmt="WEBP")), ("good2.txt", b"a caption"),
        ("corrupt.jpg", b"\xff\xd8\xff\xe0 definitely not a jpeg"), ("corrupt.txt", b"x"),
        ("truncated.jpg", jpeg((64, 64))[:300]), ("truncated.txt", b"x"),
        ("empty.png", b""), ("empty.txt", b"x"),
        ("bomb.png", png((2000, 1000))), ("bomb.txt", b"x"),
        ("tiny.png", png((4, 4))), ("tiny.txt", b"x"),
        ("latin1.png", image_bytes(5)), ("latin1.txt", "caf\u00e9".encode("latin-1")),
        ("nocaption.png", image_bytes(6)),
        ("noimage.txt", b"a caption without its image"),
        ("emptycap.png", image_bytes(7)), ("emptycap.txt", b"   "),
    ]
    write_tar(tmp_path / "broken-0000.tar", members)
    # A second shard cut in the middle of a member: the samples before the cut survive.
    whole = write_tar(tmp_path / "whole.tar", pair_members("late0", 8, "ok", 1) + pair_members("late1", 9, "ok", 1))
    with tarfile.open(whole) as tar:
        cut_at = tar.getmember("late1.png").offset_data + 50
    (tmp_path / "broken-0001.tar").write_bytes(whole.read_bytes()[:cut_at])
    whole.unlink()

    loader = build_pretrain_loader(config(str(tmp_path / "broken-*.tar"), max_image_pixels=1_000_000),
                                   batch_size=4, epochs=1)
    batches = list(loader)
    keys = [k for b in batches for k in b["key"]]
    assert sorted(keys) == ["emptycap", "good0", "good1", "good2", "late0"]
    stats = loader.stats()
    assert stats["samples"] == 5 and stats["empty_caption"] == 1
    assert stats["skipped"] == {"caption_not_utf8": 1, "empty_image": 1, "image_too_small": 1,
                                "missing_caption": 1, "missing_image": 1, "too_many_pixels": 1,
                                "truncated_shard": 1, "undecodable_image": 2}
    padding = torch.cat([b["text_padding_mask"] for b in batches])
    assert padding[keys.index("emptycap")].all() and not padding[keys.index("good0")].all()


def test_unreadable_shards_are_counted_and_an_all_bad_source_is_an_error(shards, tmp_path):
    first = shards.replace("{0000..0006}", "0000")
    cfg = config(f"pipe:cat {first}::pipe:false::pipe:cat {tmp_path}/missing.tar", format="wds")
    loader = build_pretrain_loader(cfg, batch_size=4, epochs=1)
    assert len(all_keys(loader)) == 6
    assert loader.stats()["skipped"] == {"unreadable_shard": 2}
    with pytest.raises(NoUsableSample, match="pipe:false"):
        next(iter(build_pretrain_loader(config("pipe:false", format="wds"), batch_size=4)))


def test_hdf5_with_workers_covers_an_epoch_once(tmp_path):
    from data_helpers import write_hdf5

    path = write_hdf5(tmp_path / "d.h5", 30)
    keys = all_keys(build_pretrain_loader(config(str(path), num_workers=2, index_unit_size=4), 4, epochs=1))
    assert sorted(keys) == [f"{i:09d}" for i in range(30)]


def test_the_batch_stream_survives_pickling_for_spawned_workers(tmp_path):
    import pickle

    from data_helpers import write_hdf5

    from m3ae.data.loader import BatchStream

    path = write_hdf5(tmp_path / "d.h5", 8)
    stream = BatchStream(config(str(path)), batch_size=4, rank=0, world_size=1, epochs=1)
    direct = [b["key"] for b in stream]  # leaves an open HDF5 handle behind
    assert [b["key"] for b in pickle.loads(pickle.dumps(stream))] == direct


def test_manifest_missing_files_and_bad_rows(tmp_path):
    (tmp_path / "a.png").write_bytes(image_bytes(0))
    rows = [json.dumps({"image": "a.png", "caption": "present"}), "{not json",
            json.dumps({"image": "gone.png", "caption": "missing"})]
    (tmp_path / "m.jsonl").write_text("\n".join(rows) + "\n")
    loader = build_pretrain_loader(config(str(tmp_path / "m.jsonl")), batch_size=2, epochs=1)
    assert all_keys(loader) == ["000000000"]
    assert loader.stats()["skipped"] == {"bad_manifest_row": 1, "missing_file": 1}


def test_a_source_without_any_usable_sample_is_an_error_naming_it(tmp_path):
    write_tar(tmp_path / "bad.tar", [("k.png", b"junk"), ("k.txt", b"x")])
    with pytest.raises(NoUsableSample, match="bad.tar"):
        next(iter(build_pretrain_loader(config(str(tmp_path / "bad.tar")), batch_size=2)))


def test_more_slots_than_shards_is_an_error(shards):
    with pytest.raises(ValueError, match="fewer than world_size"):
        build_pretrain_loader(config(shards, num_workers=2), batch_size=2, world_size=4)


@pytest.mark.parametrize("mode", ["deterministic", "random"])
def test_paired_fraction(tmp_path, mode):
    source = write_shards(tmp_path, 400, per_shard=100)
    cfg = config(source, paired_fraction=0.3, caption_drop=mode)
    loader = build_pretrain_loader(cfg, batch_size=50, epochs=2)
    kept_by_epoch: list[set] = [set(), set()]
    for index, batch in enumerate(loader):
        captioned = ~batch["text_padding_mask"].all(dim=1)
        kept_by_epoch[index // 8].update(k for k, c in zip(batch["key"], captioned.tolist(), strict=True) if c)
    for kept in kept_by_epoch:
        assert 0.3 * 400 - 40 < len(kept) < 0.3 * 400 + 40  # binomial sd is about 9
    assert loader.stats()["dropped_caption"] == 800 - sum(map(len, kept_by_epoch))
    # Deterministic drop removes the same captions every epoch; random drop redraws them.
    assert (kept_by_epoch[0] == kept_by_epoch[1]) == (mode == "deterministic")


def test_image_only_and_text_only_sources_are_mixed_by_weight(shards, tmp_path):
    extra = write_shards(tmp_path / "extra", 30, per_shard=10, prefix="imgonly")
    (tmp_path / "text.txt").write_text("".join(f"an unpaired sentence number {i}\n" for i in range(50)))
    cfg = config(shards, image_only_sources=[{"source": extra, "weight": 3.0}],
                 text_only_sources=[str(tmp_path / "text.txt")], unpaired_text_length=12,
                 unpaired_text_batch_size=3)
    loader = build_pretrain_loader(cfg, batch_size=20)
    batches = take(loader, 10)
    # Both fixtures use the same keys; image-only samples are the ones without any caption.
    image_only = sum(int(b["text_padding_mask"].all(dim=1).sum()) for b in batches)
    assert 0.75 * 200 - 30 < image_only < 0.75 * 200 + 30
    assert loader.stats()["image_only"] == image_only
    for batch in batches:
        assert batch["unpaired_text"].shape == (3, 12)
        assert (~batch["unpaired_text_padding_mask"]).sum(dim=1).min() >= 5
    assert loader.stats()["unpaired_text"] == 30


def test_eval_loader_is_deterministic_and_labelled(tmp_path):
    root = tmp_path / "folders"
    for split, count in (("train", 6), ("val", 4)):
        for i in range(count):
            folder = root / split / f"class{i % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (30, 20), (i * 40, 0, 0)).save(folder / f"{i}.png")
    cfg = config(str(root), normalization="none")
    batches = list(build_eval_loader(cfg, batch_size=3, split="val"))
    assert [b["key"] for b in batches] == [["class0/0", "class0/2", "class1/1"], ["class1/3"]]
    assert torch.cat([b["label"] for b in batches]).tolist() == [0, 0, 1, 1]
    image = batches[0]["image"]
    assert image.shape == (3, 3, 16, 16)
    assert torch.allclose(image[1, 0], torch.full((16, 16), 80 / 255), atol=1 / 255)
    again = list(build_eval_loader(cfg, batch_size=3, split="val"))
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(batches, again, strict=True))
    assert sum(len(b["key"]) for b in build_eval_loader(cfg, batch_size=4, split="train")) == 6


def all_batches(loader) -> list[dict]:
    return [{k: v for k, v in batch.items() if not k.startswith("_")} for batch in loader]


def same_batches(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) if torch.is_tensor(x[k]) else x[k] == y[k] for k in x)
        for x, y in zip(a, b))


@pytest.mark.parametrize("split", ["", "train"])
def test_memory_cache_gives_the_same_batches_and_reads_each_shard_and_image_about_once(shards, monkeypatch, split):
    import m3ae.data.loader as loader_module
    from m3ae.data.sources import WebDatasetSource

    def build(cfg):
        if split:  # a labelled loader with augmentation, as a fine-tuning epoch builds it
            return build_eval_loader(cfg, 5, split=split, train_transform=True, epochs=3)
        return build_pretrain_loader(cfg, batch_size=5, epochs=3)

    cfg = config(shards, eval_val_fraction=0.25) if split else config(shards)
    plain = all_batches(build(cfg))
    reads, decodes = [], []
    read_unit, decode = WebDatasetSource.read_unit, loader_module.decode_image
    monkeypatch.setattr(WebDatasetSource, "read_unit", lambda self, unit: reads.append(unit) or read_unit(self, unit))
    monkeypatch.setattr(loader_module, "decode_image", lambda data, *a: decodes.append(1) or decode(data, *a))
    monkeypatch.setattr(loader_module, "_CACHE", loader_module.SampleCache())
    cached = all_batches(build(dataclasses.replace(cfg, memory_cache_mb=1)))
    assert same_batches(plain, cached)
    samples = sum(len(b["key"]) for b in cached) // 3
    assert sorted(reads) == list(range(7))  # 3 epochs, each shard parsed once
    assert len(decodes) == samples
    assert loader_module._CACHE.hits >= samples
    again = all_batches(build(dataclasses.replace(cfg, memory_cache_mb=1)))  # a later loader of the process
    assert same_batches(plain, again) and len(reads) == 7


def test_memory_cache_stays_within_its_budget_and_keeps_only_whole_shards(shards):
    from m3ae.data.factory import open_source
    from m3ae.data.loader import SampleCache

    source, sizing = open_source(shards), SampleCache()
    sizing.budget = 1 << 30
    first = list(sizing.records(source, 0))
    cache = SampleCache()
    cache.budget = 2 * sizing.used + sizing.used // 2  # room for two of the seven shards (6 samples each)
    for unit in range(7):
        assert [r.key for r in cache.records(source, unit)] == [f"{unit * 6 + i:06d}" for i in range(6)]
    assert len(cache._units) == 2 and cache.used <= cache.budget
    kept = next(iter(cache._units.values()))
    image = Image.new("RGB", (256, 256))
    cache.keep_image(first[0], (1,), image)  # not a kept record: never stored
    cache.keep_image(kept[0], (1,), image)  # no budget left for its pixels
    assert cache.image(first[0], (1,)) is None and cache.image(kept[0], (1,)) is None
    cache.budget += 256 * 256 * 3 + 1024
    cache.keep_image(kept[0], (1,), image)
    assert cache.image(kept[0], (1,)) is image and cache.image(kept[0], (2,)) is None
    with pytest.raises(ValueError, match="memory_cache_mb"):
        config(shards, memory_cache_mb=-1)


def test_memory_cache_forgets_the_images_of_a_shard_it_does_not_keep(shards):
    from m3ae.data.factory import open_source
    from m3ae.data.loader import SampleCache

    source, cache = open_source(shards), SampleCache()
    cache.budget = 1 << 30
    reading = cache.records(source, 3)
    record = next(reading)  # the shard is being read: its images count while it may still be kept
    cache.keep_image(record, (1,), Image.new("RGB", (64, 64)))
    assert cache.image(record, (1,)) is not None and cache.used > 0
    reading.close()  # abandoned mid-shard (a run that stops): a cut shard would replay short
    assert cache.used == 0 and cache.image(record, (1,)) is None and not cache._units
    assert len(list(cache.records(source, 3))) == 6 and cache.used > 0


def test_memory_cache_does_not_hold_a_shard_that_cannot_fit_while_reading_it(shards):
    from m3ae.data.factory import open_source
    from m3ae.data.loader import SampleCache

    source, cache = open_source(shards), SampleCache()
    cache.budget = 1  # smaller than any record: a large shard past the budget must stream, not pile up
    reading = cache.records(source, 0)
    record = next(reading)
    assert not cache._images and cache.image(record, (1,)) is None
    assert len([record, *reading]) == 6 and cache.used == 0 and not cache._units
