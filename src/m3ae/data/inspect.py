"""`m3ae data inspect`: what a source holds and how it would tokenise, as JSON statistics."""

from __future__ import annotations

from collections import Counter

import numpy as np

from m3ae.data.factory import detect_layout, open_source
from m3ae.data.sources import NoUsableSample, decode_caption
from m3ae.data.tokenizer import Tokenizer
from m3ae.data.transforms import SkipSample, decode_image, unexpected_skip


def _summary(values: list[int]) -> dict:
    if not values:
        return {"count": 0}
    array = np.asarray(values)
    return {"count": int(array.size), "min": int(array.min()), "mean": round(float(array.mean()), 2),
            "p50": float(np.percentile(array, 50)), "p95": float(np.percentile(array, 95)),
            "max": int(array.max())}


def inspect_source(spec: str, fmt: str = "auto", limit: int | None = None, tokenizer: str = "bert-base-uncased",
                   text_length: int = 64, max_image_pixels: int = 89_478_485, min_image_size: int = 16,
                   columns=None) -> dict:
    """Read `spec` in order (at most `limit` records), decoding every image and caption."""
    layout = dict(zip(("format", "why"), detect_layout(spec))) if fmt == "auto" else {"format": fmt, "why": "--format"}
    source = open_source(spec, fmt, columns=columns)
    tok = Tokenizer.from_name(tokenizer, text_length)
    skipped: Counter = Counter()
    widths: list[int] = []
    heights: list[int] = []
    captions: list[str] = []
    labels: Counter = Counter()
    records = 0
    for record in (r for unit in source.units() for r in source.read_unit(unit)):
        if limit is not None and records >= limit:
            break
        records += 1
        try:
            if record.error:
                raise SkipSample(record.error)
            caption = decode_caption(record.caption)
            image = decode_image(record.image, max_image_pixels, min_image_size)
        except SkipSample as skip:
            skipped[skip.reason] += 1
            continue
        except Exception as error:  # crafted data that trips a decoder: counted like any bad sample
            skipped[unexpected_skip(error)] += 1
            continue
        widths.append(image.width)
        heights.append(image.height)
        captions.append(caption)
        if record.label >= 0:
            labels[record.label] += 1
    if not captions:
        raise NoUsableSample(
            f"data source {spec!r} yielded no usable sample ({records} records, skipped {dict(skipped)})")
    encoded = tok.encode(captions)
    lengths = [len(ids) for ids in encoded]
    unknown = sum(ids.count(tok.unk_id) for ids in encoded)
    return {
        "source": spec,
        "layout": layout,
        "records": records,
        "samples": len(captions),
        "skipped": dict(sorted(skipped.items())),
        "empty_captions": sum(1 for c in captions if not c),
        "image_width": _summary(widths),
        "image_height": _summary(heights),
        "caption_tokens": _summary(lengths),
        "truncated_at_text_length": sum(1 for n in lengths if n > text_length),
        "oov_rate": round(unknown / max(1, sum(lengths)), 6),
        "labels": {"classes": len(labels), "labelled_samples": sum(labels.values())},
    }
