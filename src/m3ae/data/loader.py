"""Batches from sources: shard assignment, shuffling, mixing, decoding, and an exact resume.

Every random choice is drawn from a generator seeded by counters (seed, epoch, unit, key, batch
index), never from a running global state. The stream a (rank, worker) slot sees is therefore a
pure function of its position, and the position (per source: epoch, unit, records read from that
unit; per worker: batches produced) is the whole resumable state.

Workers produce whole batches; torch's DataLoader returns them in round-robin worker order. The
loader records, for each batch it hands out, the producing worker's position at the end of that
batch, so a snapshot reflects exactly what the training loop consumed, whatever was prefetched.
On resume the worker that would have produced the next batch is made DataLoader worker 0.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import signal
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from m3ae.data.config import DEFAULT_IMAGE_SIZE, DataConfig
from m3ae.data.factory import open_source
from m3ae.data.sources import IndexedSource, NoUsableSample, RawRecord, Source, decode_caption
from m3ae.data.splits import key_hash, open_eval_split
from m3ae.data.tokenizer import Tokenizer
from m3ae.data.transforms import ImageTransform, SkipSample, decode_image, normalize_batch, unexpected_skip

logger = logging.getLogger("m3ae.data")

STATE_VERSION = 1
_TAG_UNITS, _TAG_SHUFFLE, _TAG_MIX, _TAG_AUGMENT, _TAG_DROP = range(5)
_LOGGED_SKIPS_PER_REASON = 20


def _rng(*counters: int) -> np.random.Generator:
    return np.random.default_rng([int(c) for c in counters])


@dataclass
class StreamPosition:
    epoch: int = 0
    unit: int = 0  # index into this slot's unit list of the epoch
    offset: int = 0  # records already emitted from that unit
    valid: int = 0  # usable samples emitted so far in this epoch


@dataclass(frozen=True)
class Slot:
    rank: int
    world_size: int
    worker: int
    num_workers: int


class SampleCache:
    """What a process has read of small sources, kept for its later epochs and loaders
    (`data.memory_cache_mb`): the records of each shard (unit) read to its end, with their decoded
    images, while the total stays under the largest budget asked for. Shard parsing and image
    decoding are most of the loader's time on small images (a 32 px JPEG sample: 58 % of 0.47 ms);
    augmentation, drawn per epoch, still runs on every sample, so batches are the same with or
    without the cache. Never evicts: a set larger than the budget keeps its first shards."""

    def __init__(self) -> None:
        self.budget = self.used = 0
        self.hits = 0  # images served decoded
        self._units: dict[tuple, list[RawRecord]] = {}
        # id() of each kept record -> its decoded images by decoding parameters. A record of the shard
        # being read is here too: its images count against the budget until the shard is kept or
        # forgotten. Either way the record is alive while its id is here, so ids cannot collide.
        self._images: dict[int, dict[tuple, object]] = {}

    def allow(self, megabytes: int) -> None:
        self.budget = max(self.budget, megabytes << 20)

    @staticmethod
    def _unit_key(source: Source, unit: int) -> tuple:
        # an indexed source's units are ranges of unit_size samples, which ensure_units may change
        return type(source).__name__, source.name, getattr(source, "unit_size", None), unit

    def records(self, source: Source, unit: int) -> Iterator[RawRecord]:
        key = self._unit_key(source, unit)
        if key in self._units:
            yield from self._units[key]
            return
        reading: list[RawRecord] | None = []
        size = 0
        try:
            for record in source.read_unit(unit):
                if reading is not None:
                    size += _RECORD_OVERHEAD + len(record.image or b"") + len(record.caption or b"")
                    if self.used + size > self.budget:  # it will not fit: stream the rest, hold nothing
                        self._forget(reading)
                        reading = None
                    else:
                        reading.append(record)
                        self._images[id(record)] = {}
                yield record
            # only a shard read to its end (a cut one would replay short), and still within the budget
            # with the images kept while it was read
            if reading is not None and self.used + size <= self.budget:
                self.used += size
                self._units[key], reading = reading, None
        finally:
            if reading is not None:  # abandoned mid-shard, or past the budget at its end
                self._forget(reading)

    def _forget(self, records: list[RawRecord]) -> None:
        """Drop a shard being read, with the images of its records kept so far."""
        for record in records:
            for image in self._images.pop(id(record)).values():
                self.used -= _image_bytes(image)

    def image(self, record: RawRecord, decoding: tuple):
        image = self._images.get(id(record), {}).get(decoding)
        self.hits += image is not None
        return image

    def keep_image(self, record: RawRecord, decoding: tuple, image) -> None:
        images = self._images.get(id(record))
        if images is not None and self.used + _image_bytes(image) <= self.budget:
            self.used += _image_bytes(image)
            images[decoding] = image


def _image_bytes(image) -> int:
    return _RECORD_OVERHEAD + image.width * image.height * len(image.getbands())


_RECORD_OVERHEAD = 512  # bytes a kept record or image costs beyond its data (Python objects)
_CACHE = SampleCache()  # per process: DataLoader workers have their own


class UnitStream:
    """The records of one source as one slot sees them, epoch after epoch."""

    def __init__(self, source: Source, source_id: int, seed: int, shuffle_buffer: int, slot: Slot,
                 shuffle: bool, position: StreamPosition | None = None, cached: bool = False) -> None:
        self.source, self.source_id, self.seed = source, source_id, seed
        self.shuffle_buffer, self.slot, self.shuffle = shuffle_buffer, slot, shuffle
        self.units = list(source.units())
        self.position = position or StreamPosition()
        self.cached = cached

    def slot_units(self, epoch: int) -> list[int]:
        order = (_rng(self.seed, _TAG_UNITS, self.source_id, epoch).permutation(len(self.units))
                 if self.shuffle else np.arange(len(self.units)))
        mine = order[self.slot.rank :: self.slot.world_size][self.slot.worker :: self.slot.num_workers]
        return [self.units[i] for i in mine]

    def records(self, max_epochs: int | None) -> Iterator[RawRecord]:
        pos = self.position
        while max_epochs is None or pos.epoch < max_epochs:
            units = self.slot_units(pos.epoch)
            while pos.unit < len(units):
                skip = pos.offset
                for index, record in enumerate(self._unit_records(units[pos.unit], pos.epoch)):
                    if index < skip:
                        continue  # replaying a partly consumed unit: raw records, never decoded
                    pos.offset += 1
                    yield record
                pos.unit, pos.offset = pos.unit + 1, 0
            if pos.valid == 0 and units:
                raise NoUsableSample(
                    f"data source {self.source.name!r} yielded no usable sample in epoch {pos.epoch} "
                    f"(rank {self.slot.rank}, worker {self.slot.worker}, {len(units)} shard(s)); see the "
                    f"skip counts logged under 'm3ae.data'"
                )
            pos.epoch, pos.unit, pos.valid = pos.epoch + 1, 0, 0

    def _unit_records(self, unit: int, epoch: int) -> Iterator[RawRecord]:
        records = _CACHE.records(self.source, unit) if self.cached else self.source.read_unit(unit)
        if not self.shuffle or self.shuffle_buffer <= 1:
            yield from records
            return
        rng = _rng(self.seed, _TAG_SHUFFLE, self.source_id, epoch, unit)
        buffer: list[RawRecord] = []
        for record in records:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(record)
                continue
            index = int(rng.integers(len(buffer)))
            yield buffer[index]
            buffer[index] = record
        for index in rng.permutation(len(buffer)):
            yield buffer[index]


@dataclass
class Sample:
    key: str
    pixels: np.ndarray  # uint8 (S, S, 3)
    caption: str
    label: int


@dataclass
class WorkerStats:
    samples: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    empty_caption: int = 0
    dropped_caption: int = 0
    image_only: int = 0
    unpaired_text: int = 0

    def __post_init__(self) -> None:
        # (reason, key, source) of the skips since the last batch: reported by the main process
        # (`report_skips`), which outlives the workers of one epoch; not part of the state
        self.events: list[tuple[str, str, str]] = []

    def skip(self, reason: str, key: str, source: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        self.events.append((reason, key, source))

    @staticmethod
    def merge(parts: list[dict]) -> dict:
        total: Counter = Counter()
        skipped: Counter = Counter()
        for part in parts:
            skipped.update(part.get("skipped", {}))
            total.update({k: v for k, v in part.items() if k != "skipped"})
        return {**{name: total.get(name, 0) for name in WorkerStats.__dataclass_fields__ if name != "skipped"},
                "skipped": dict(sorted(skipped.items()))}


# (data source of the run, reason) -> the (file, key) already reported, at most _LOGGED_SKIPS_PER_REASON + 1
_reported: dict[tuple[str, str], set[tuple[str, str]]] = {}


def report_skips(events: list[tuple[str, str, str]], run_source: str) -> None:
    """Logs each skipped sample once, whatever the epoch or loader that meets it again (a probe
    builds a loader per epoch), and at most _LOGGED_SKIPS_PER_REASON samples per reason, for the
    loaders of one data source (`run_source`, the config's) in this process; the counts stay
    complete in the loader's statistics."""
    for reason, key, source in events:
        seen = _reported.setdefault((run_source, reason), set())
        if (source, key) in seen or len(seen) > _LOGGED_SKIPS_PER_REASON:
            continue
        seen.add((source, key))
        if len(seen) > _LOGGED_SKIPS_PER_REASON:
            logger.warning("more samples skipped (%s): counted in the loader's statistics, no longer logged one by one",
                           reason)
        else:
            logger.warning("skipped sample %r of %s: %s", key, source, reason)


class BatchStream(IterableDataset):
    """Per-worker batch producer; `PretrainLoader` wraps it in a DataLoader and tracks its state."""

    def __init__(self, cfg: DataConfig, batch_size: int, rank: int, world_size: int,
                 epochs: int | None, labelled_split: str = "", train_transform: bool = True,
                 vocabulary: list[str] | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be positive")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is not in [0, world_size={world_size})")
        self.cfg, self.batch_size, self.rank, self.world_size = cfg, batch_size, rank, world_size
        self.epochs = epochs
        self.vocabulary = vocabulary  # the model's compact vocabulary (M3AEConfig.vocabulary), if any
        self.eval_mode = bool(labelled_split)
        self.num_workers = max(1, cfg.num_workers)
        open_kwargs = dict(unit_size=cfg.index_unit_size, embedded_root=cfg.embedded_root, columns=cfg.columns)
        if self.eval_mode:
            main = open_eval_split(cfg, labelled_split)
            image_sources: list[tuple[Source, float, bool]] = [(main, 1.0, True)]
            self.text_sources: list[tuple[Source, float]] = []
        else:
            main = open_source(cfg.source, cfg.format, role="pair", **open_kwargs)
            image_sources = [(main, 1.0, True)] + [
                (open_source(s.source, s.format, role="pair", **open_kwargs), s.weight, False)
                for s in cfg.image_only_sources
            ]
            self.text_sources = [(open_source(s.source, s.format, role="text", **open_kwargs), s.weight)
                                 for s in cfg.text_only_sources]
        self.image_sources = image_sources
        slots = world_size * self.num_workers
        for source, *_ in image_sources + self.text_sources:
            if isinstance(source, IndexedSource):
                source.ensure_units(slots)
        if epochs is None:
            for source, *_ in image_sources + self.text_sources:
                count = len(source.units())
                if count < slots:
                    raise ValueError(
                        f"data source {source.name!r} has {count} shard(s), fewer than world_size x "
                        f"num_workers = {slots}: some workers would get no data. Use fewer workers or "
                        f"reshard (`m3ae data build --shard-size`)."
                    )
        self.transform = ImageTransform(cfg.image_size or DEFAULT_IMAGE_SIZE, train=train_transform,
                                        scale=tuple(cfg.crop_scale), flip=cfg.horizontal_flip)
        self.mean, self.std = cfg.normalization_stats()
        self.text_batch_size = cfg.unpaired_text_batch_size or batch_size
        # Set by PretrainLoader before every DataLoader start.
        self.start_states: dict[int, dict] = {}
        self.worker_offset = 0

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        loader_worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        if num_workers != self.num_workers:
            raise RuntimeError(f"BatchStream built for {self.num_workers} workers runs in {num_workers}")
        worker = (loader_worker + self.worker_offset) % num_workers
        return self._batches(worker, copy.deepcopy(self.start_states.get(worker, {})))

    def _streams(self, sources: list, worker: int, state: list[dict], first_id: int) -> list[UnitStream]:
        slot = Slot(self.rank, self.world_size, worker, self.num_workers)
        return [
            UnitStream(entry[0], first_id + i, self.cfg.seed, self.cfg.shuffle_buffer, slot,
                       shuffle=not self.eval_mode,
                       position=StreamPosition(**state[i]) if i < len(state) else None,
                       cached=self.cfg.memory_cache_mb > 0)
            for i, entry in enumerate(sources)
        ]

    def _batches(self, worker: int, state: dict) -> Iterator[dict]:
        cfg = self.cfg
        tokenizer = Tokenizer.from_name(cfg.tokenizer, cfg.text_length, self.vocabulary)
        _CACHE.allow(cfg.memory_cache_mb)
        stats = WorkerStats(**state.get("stats", {}))
        image_streams = self._streams(self.image_sources, worker, state.get("image_streams", []), 0)
        text_streams = self._streams(self.text_sources, worker, state.get("text_streams", []),
                                     len(self.image_sources))
        # Only the main source bounds the run; auxiliary sources cycle for as long as it lasts.
        iterators = [image_streams[0].records(self.epochs)] + [s.records(None) for s in image_streams[1:]]
        text_iterators = [s.records(None) for s in text_streams]
        image_weights = _normalised([w for _, w, _ in self.image_sources])
        text_weights = _normalised([w for _, w in self.text_sources])
        batch_index = state.get("batches", 0)
        while True:
            mix = _rng(cfg.seed, _TAG_MIX, self.rank, worker, batch_index)
            choices = mix.choice(len(iterators), size=self.batch_size, p=image_weights)
            samples: list[Sample] = []
            for choice in choices:
                sample = self._next_sample(image_streams[choice], iterators[choice],
                                           self.image_sources[choice][2], stats)
                if sample is None:
                    break
                samples.append(sample)
            if not samples:
                return
            batch = self._collate(samples, tokenizer)
            if text_iterators:
                text_choices = mix.choice(len(text_iterators), size=self.text_batch_size, p=text_weights)
                texts = [self._next_text(text_streams[c], text_iterators[c], stats) for c in text_choices]
                batch["unpaired_text"], batch["unpaired_text_padding_mask"] = tokenizer(
                    texts, max_length=cfg.unpaired_text_length)
                stats.unpaired_text += len(texts)
            batch_index += 1
            stats.samples += len(samples)
            batch["_worker"], batch["_skips"], stats.events = worker, stats.events, []
            batch["_state"] = {
                "batches": batch_index,
                "image_streams": [asdict(s.position) for s in image_streams],
                "text_streams": [asdict(s.position) for s in text_streams],
                "stats": copy.deepcopy(asdict(stats)),
            }
            yield batch
            if len(samples) < self.batch_size:
                return

    def _next_sample(self, stream: UnitStream, records: Iterator[RawRecord], paired: bool,
                     stats: WorkerStats) -> Sample | None:
        for record in records:
            try:
                sample = self._decode(record, stream, paired)
            except SkipSample as skip:
                stats.skip(skip.reason, record.key, record.shard or stream.source.name)
                continue
            except Exception as error:  # a hostile sample must not end the run: count it
                stats.skip(unexpected_skip(error), record.key, record.shard or stream.source.name)
                continue
            stream.position.valid += 1
            if not self.eval_mode:
                if not paired:
                    stats.image_only += 1
                elif not sample.caption:
                    stats.empty_caption += 1
                elif self._drop_caption(sample.key, stream):
                    stats.dropped_caption += 1
                    sample.caption = ""
            return sample
        return None

    def _decode(self, record: RawRecord, stream: UnitStream, paired: bool) -> Sample:
        cfg = self.cfg
        if record.error:
            raise SkipSample(record.error)
        if self.eval_mode or not paired:
            caption = ""
        elif record.caption is None:
            raise SkipSample("missing_caption")
        else:
            caption = decode_caption(record.caption)
        decoding = (cfg.max_image_pixels, cfg.min_image_size, self.transform.draft_side)
        image = _CACHE.image(record, decoding) if cfg.memory_cache_mb else None
        if image is None:
            image = decode_image(record.image, *decoding)
            if cfg.memory_cache_mb:
                _CACHE.keep_image(record, decoding, image)
        rng = (_rng(cfg.seed, _TAG_AUGMENT, stream.source_id, stream.position.epoch, key_hash(record.key))
               if self.transform.train else None)
        return Sample(record.key, self.transform(image, rng), caption, record.label)

    def _drop_caption(self, key: str, stream: UnitStream) -> bool:
        cfg = self.cfg
        if cfg.paired_fraction >= 1.0:
            return False
        if cfg.caption_drop == "deterministic":
            # A fixed subset of pairs, the same every epoch (the official code keys it on the index).
            return (key_hash(key) % 1_000_000) / 1_000_000 >= cfg.paired_fraction
        draw = _rng(cfg.seed, _TAG_DROP, stream.source_id, stream.position.epoch, key_hash(key)).random()
        return draw >= cfg.paired_fraction

    def _next_text(self, stream: UnitStream, records: Iterator[RawRecord], stats: WorkerStats) -> str:
        for record in records:
            try:
                text = decode_caption(record.caption)
            except SkipSample as skip:
                stats.skip(skip.reason, record.key, record.shard or stream.source.name)
                continue
            if not text:
                stats.skip("empty_text", record.key, stream.source.name)
                continue
            stream.position.valid += 1
            return text
        raise RuntimeError(f"text source {stream.source.name!r} ended")  # infinite streams never end

    def _collate(self, samples: list[Sample], tokenizer: Tokenizer) -> dict:
        batch = {
            "image": normalize_batch(np.stack([s.pixels for s in samples]), self.mean, self.std,
                                     shared=get_worker_info() is not None),
            "label": torch.tensor([s.label for s in samples], dtype=torch.long),
            "key": [s.key for s in samples],
        }
        if not self.eval_mode:
            batch["text"], batch["text_padding_mask"] = tokenizer([s.caption for s in samples])
        return batch


def _normalised(weights: list[float]) -> np.ndarray | None:
    if not weights:
        return None
    array = np.asarray(weights, dtype=np.float64)
    return array / array.sum()


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader `worker_init_fn`: schedulers (Slurm, Kubernetes, torchrun) signal every process of
    a job; a worker that died of it would fail the main process's next batch before the main
    process could checkpoint. Workers ignore SIGTERM/SIGINT and leave the decision to it."""
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)


@contextlib.contextmanager
def _stop_signals_blocked():
    # Forked workers inherit the blocked mask, so a signal sent while one starts stays pending until
    # `ignore_stop_signals` discards it; the main process receives its own copy on unblocking.
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no signal masks (and no process groups)
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class PretrainLoader:
    """Iterable over batches (see module doc); `state_dict()` captures what has been consumed."""

    def __init__(self, dataset: BatchStream, pin_memory: bool = False, prefetch_factor: int = 2) -> None:
        self.dataset = dataset
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self._batches = 0
        self._worker_states: dict[int, dict] = {}

    def __iter__(self) -> Iterator[dict]:
        workers = self.dataset.num_workers
        self.dataset.start_states = copy.deepcopy(self._worker_states)
        self.dataset.worker_offset = self._batches % workers
        loader = DataLoader(
            self.dataset, batch_size=None, num_workers=self.dataset.cfg.num_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor if self.dataset.cfg.num_workers else None,
            worker_init_fn=ignore_stop_signals,
        )
        with _stop_signals_blocked():  # workers start here; none may die of a signal before it ignores it
            batches = iter(loader)
        for batch in batches:
            self._worker_states[batch.pop("_worker")] = batch.pop("_state")
            report_skips(batch.pop("_skips"), self.dataset.cfg.source)
            self._batches += 1
            yield batch

    def state_dict(self) -> dict:
        streams = [s["image_streams"][0]["epoch"] for s in self._worker_states.values()]
        return {
            "version": STATE_VERSION,
            "epoch": min(streams) if streams else 0,
            "position": self._batches,
            "rng": {"seed": self.dataset.cfg.seed},
            "rank": self.dataset.rank,
            "world_size": self.dataset.world_size,
            "num_workers": self.dataset.num_workers,
            "batch_size": self.dataset.batch_size,
            "workers": {str(w): copy.deepcopy(s) for w, s in sorted(self._worker_states.items())},
        }

    def load_state_dict(self, state: dict) -> None:
        expected = {"version": STATE_VERSION, "rank": self.dataset.rank, "world_size": self.dataset.world_size,
                    "num_workers": self.dataset.num_workers, "batch_size": self.dataset.batch_size}
        for name, value in expected.items():
            if state.get(name) != value:
                raise ValueError(f"data loader state: {name}={state.get(name)!r} but this loader has {value!r}; "
                                 f"an exact resume needs the same value")
        if state["rng"]["seed"] != self.dataset.cfg.seed:
            raise ValueError(f"data loader state: seed {state['rng']['seed']} differs from DataConfig.seed "
                             f"{self.dataset.cfg.seed}")
        self._batches = int(state["position"])
        self._worker_states = {int(w): copy.deepcopy(s) for w, s in state["workers"].items()}

    def stats(self) -> dict:
        return {**WorkerStats.merge([s["stats"] for s in self._worker_states.values()]), "batches": self._batches}


def build_pretrain_loader(cfg: DataConfig, batch_size: int, rank: int = 0, world_size: int = 1,
                          epochs: int | None = None, pin_memory: bool = False,
                          vocabulary: list[str] | None = None) -> PretrainLoader:
    """Pretraining batches for one rank. `epochs=None` (training) streams forever; a number ends
    after that many passes over the main source, the last batch possibly short. Text ids are the
    compact ones of `vocabulary` (the model's) when given."""
    return PretrainLoader(BatchStream(cfg, batch_size, rank, world_size, epochs, vocabulary=vocabulary), pin_memory)


def _captions(source: Source, limit: int, spread: bool) -> Iterator[str]:
    """The caption ("" when missing or undecodable) of up to `limit` intact records, without
    decoding images; units in order, or `spread` over them in a fixed shuffled order so that a
    sample of a large source is not its first shards alone."""
    units = list(source.units())
    if spread:
        units = [units[i] for i in _rng(0, _TAG_UNITS).permutation(len(units))]
    read = 0
    for unit in units:
        for record in source.read_unit(unit):
            if record.error:
                continue
            try:
                yield decode_caption(record.caption)
            except SkipSample:
                yield ""
            read += 1
            if read >= limit:
                return


def _open(cfg: DataConfig, spec: str, fmt: str, role: str) -> Source:
    return open_source(spec, fmt, role=role, unit_size=cfg.index_unit_size, embedded_root=cfg.embedded_root,
                       columns=cfg.columns)


def caption_coverage(cfg: DataConfig, limit: int = 256) -> tuple[int, int]:
    """(records with a caption, records read) over the first `limit` intact records of the main
    source in unit order, without decoding images: a cheap look before a paired run starts."""
    captions = list(_captions(_open(cfg, cfg.source, cfg.format, "pair"), limit, spread=False))
    return sum(bool(c) for c in captions), len(captions)


def caption_sample(cfg: DataConfig) -> list[str]:
    """Up to `cfg.vocab_sample` captions of the main source, and as many texts of each text-only
    source, spread over their shards: what a compact vocabulary is made from."""
    sources = [_open(cfg, cfg.source, cfg.format, "pair")]
    sources += [_open(cfg, s.source, s.format, "text") for s in cfg.text_only_sources]
    return [c for source in sources for c in _captions(source, cfg.vocab_sample, spread=True) if c]


def build_eval_loader(cfg: DataConfig, batch_size: int, split: str = "train", train_transform: bool = False,
                      rank: int = 0, world_size: int = 1, epochs: int = 1) -> PretrainLoader:
    """Labelled batches (`image`, `label`, `key`) of `split` ("train", "val", or "all": every sample of
    the source) in a fixed order, Resize + CenterCrop unless `train_transform` (then seeded
    RandomResizedCrop + flip, different each epoch)."""
    if split not in ("train", "val", "all"):
        raise ValueError(f"split={split!r}: expected 'train', 'val' or 'all'")
    return PretrainLoader(BatchStream(cfg, batch_size, rank, world_size, epochs, labelled_split=split,
                                      train_transform=train_transform))
