"""Preprocessing speed and parity: the exact (timm) path against the fast path the service uses.

    .venv/bin/python -m bench.preprocess_bench [--images ../shared/data/hymenoptera/train] \
        [--large 6] [--rounds 5] [--min-seconds 1.0] [--threads N] [--home DIR] [--json OUT.json]

Both paths turn image bytes into the uint8 centre crop the network sees
(``models.preprocess.decode_and_crop`` with ``fast=False`` / ``fast=True``: decode, EXIF, mode
conversion, resize, crop; normalisation is the same lookup on both and is left out). Image sets:

  hymenoptera      every image under --images (about 500 x 375 JPEGs; 3 are larger)
  12MP upscaled    --large real photos upscaled (bicubic) to 4000 x 3000, JPEG quality 90
  12MP mosaic      --large 4000 x 3000 mosaics of 8 x 8 real photos at 500 x 375, JPEG quality 90
                   (full-resolution detail everywhere: the hard case for reduced-scale decoding)
  12MP PNG         2 of the mosaics as PNG (the fast path's reducing_gap, no JPEG draft)

Each set is timed single-threaded and with one thread per core (--threads, default: all cores;
Pillow releases the GIL while decoding and resampling, as in the service's thread pool). A round
runs whole passes over the set for at least --min-seconds; exact and fast alternate round by
round, and the best round of each is reported (least disturbed by other load on the machine).
The single-thread rounds also give CPU milliseconds per image (the process's CPU time): what one
image costs a worker, which other load on the machine disturbs much less than wall time.

Parity: per image, the mean absolute difference between the two uint8 crops (levels of 0..255);
reported as the mean over images, the worst image and the largest single difference. For scale,
the same figure for the exact path on the hymenoptera photos re-saved as JPEG quality 95. With
--home, the active model in that state directory classifies both paths' crops: top-1 agreement
and the largest difference of the top-1 probability.

Timings are printed, never judged: only ratios from one run mean something on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bench.common import DEFAULT_IMAGES, begin
from models.preprocess import decode_and_crop, decode_image
from models.spec import PreprocessConfig
from tests.support.images import encode

LARGE_SIZE = (4000, 3000)


@dataclass
class ImageSet:
    name: str
    blobs: list[bytes]


def large_sets(photos: Sequence[bytes], count: int) -> list[ImageSet]:
    """12-megapixel images made from the real photos (nothing big is stored in the repo)."""
    decoded = [decode_image(b) for b in photos]
    upscaled = [
        encode(decoded[i * 7 % len(decoded)].resize(LARGE_SIZE, Image.Resampling.BICUBIC), "JPEG", quality=90)
        for i in range(count)
    ]
    tile_w, tile_h = LARGE_SIZE[0] // 8, LARGE_SIZE[1] // 8
    mosaics = []
    for i in range(count):
        mosaic = Image.new("RGB", LARGE_SIZE)
        for t in range(64):
            tile = decoded[(i * 64 + t) % len(decoded)].resize((tile_w, tile_h), Image.Resampling.BICUBIC)
            mosaic.paste(tile, ((t % 8) * tile_w, (t // 8) * tile_h))
        mosaics.append(mosaic)
    return [
        ImageSet("12MP upscaled", upscaled),
        ImageSet("12MP mosaic", [encode(m, "JPEG", quality=90) for m in mosaics]),
        ImageSet("12MP PNG", [encode(m, "PNG", compress_level=1) for m in mosaics[:2]]),
    ]


def one_round(
    work: Callable[[bytes], object], blobs: Sequence[bytes], pool: ThreadPoolExecutor | None, min_seconds: float
) -> tuple[float, float]:
    """(images per second of wall time, CPU milliseconds per image: all threads of this process)."""
    done = 0
    start, cpu_start = time.perf_counter(), time.process_time()
    while True:
        if pool is None:
            for blob in blobs:
                work(blob)
        else:
            list(pool.map(work, blobs))
        done += len(blobs)
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return done / elapsed, (time.process_time() - cpu_start) * 1000 / done


def timings(
    image_set: ImageSet, config: PreprocessConfig, threads: int, rounds: int, min_seconds: float
) -> dict[str, float]:
    """``"<path>, <n> thread(s)"`` -> best images/s, and ``"<path>, cpu ms"`` -> least CPU
    time per image (single thread: what one image costs a worker, whatever else runs)."""
    out: dict[str, float] = {}
    paths = {
        "exact": lambda b: decode_and_crop(b, config, fast=False),
        "fast": lambda b: decode_and_crop(b, config, fast=True),
    }
    for label, pool in [("1 thread", None), (f"{threads} threads", ThreadPoolExecutor(threads))]:
        try:
            best = {name: 0.0 for name in paths}
            cpu = {name: float("inf") for name in paths}
            for _ in range(rounds):
                for name, work in paths.items():  # alternate: the same disturbance hits both
                    rate, cpu_ms = one_round(work, image_set.blobs, pool, min_seconds)
                    best[name] = max(best[name], rate)
                    cpu[name] = min(cpu[name], cpu_ms)
            for name, rate in best.items():
                out[f"{name}, {label}"] = rate
                if pool is None:
                    out[f"{name}, cpu ms"] = cpu[name]
        finally:
            if pool is not None:
                pool.shutdown()
    return out


def crops(blobs: Sequence[bytes], config: PreprocessConfig, fast: bool) -> np.ndarray:
    return np.stack([decode_and_crop(b, config, fast=fast) for b in blobs])


def parity(exact: np.ndarray, fast: np.ndarray) -> dict[str, float]:
    diff = np.abs(exact.astype(np.int16) - fast.astype(np.int16))
    per_image = diff.reshape(len(diff), -1).mean(axis=1)
    return {
        "mean_abs_diff": float(per_image.mean()),
        "worst_image_mean_abs_diff": float(per_image.max()),
        "max_abs_diff": float(diff.max()),
    }


def resave_noise(blobs: Sequence[bytes], config: PreprocessConfig) -> float:
    """Mean |difference| of the exact crops after re-saving each photo as JPEG quality 95."""
    resaved = [encode(decode_image(b), "JPEG", quality=95) for b in blobs]
    return parity(crops(blobs, config, False), crops(resaved, config, False))["mean_abs_diff"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--large", type=int, default=6, help="12-megapixel images per generated JPEG set")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-seconds", type=float, default=1.0, help="least duration of one timed round")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--home", type=Path, help="state directory whose active model checks top-1 agreement")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args(argv)
    if args.large < 2 or args.rounds < 1 or args.threads < 1 or args.min_seconds <= 0:
        parser.error("--large must be >= 2, --rounds and --threads >= 1, --min-seconds > 0")

    progress, images = begin(args.images)
    config = PreprocessConfig()  # the bootstrap model's: 224 crop of a 256 resize, bicubic
    session = None
    if args.home is not None:
        from models.onnx_io import cpu_session
        from store.state import open_state

        registry = open_state(home=args.home).registry
        active = registry.active_version()
        if active is None:
            parser.error(f"no active model version in {args.home}")
        version = registry.get(active)
        config = version.spec.preprocess
        session = cpu_session(version.onnx_path)
        progress(f"model {active} from {args.home}: {config}")

    photos = [image.data for image in images]
    sets = [ImageSet("hymenoptera", photos), *large_sets(photos, args.large)]
    progress(f"generated {args.large} + {args.large} 12 MP JPEGs and 2 12 MP PNGs")
    results: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "config": config.model_dump(),
        "sets": {},
    }
    for image_set in sets:
        exact, fast = crops(image_set.blobs, config, False), crops(image_set.blobs, config, True)
        entry: dict[str, Any] = {"images": len(image_set.blobs), "parity": parity(exact, fast)}
        if session is not None:
            from models.onnx_io import run_in_batches, softmax
            from models.preprocess import normalise_crops

            p_exact = softmax(run_in_batches(session, normalise_crops(exact, config))[0])
            p_fast = softmax(run_in_batches(session, normalise_crops(fast, config))[0])
            top_exact, top_fast = p_exact.argmax(axis=1), p_fast.argmax(axis=1)
            rows = np.arange(len(top_exact))
            entry["top1_agree"] = int((top_exact == top_fast).sum())
            entry["top1_prob_max_diff"] = float(np.abs(p_exact[rows, top_exact] - p_fast[rows, top_exact]).max())
        entry["images_per_s"] = timings(image_set, config, args.threads, args.rounds, args.min_seconds)
        results["sets"][image_set.name] = entry
        progress(f"{image_set.name}: done")
    results["jpeg_q95_resave_mean_abs_diff"] = resave_noise(photos, config)

    print(f"\n{results['machine']}; best of {args.rounds} rounds of >= {args.min_seconds} s")
    print(f"{'set':<14} {'threads':>8} {'exact img/s':>12} {'fast img/s':>11} {'speed-up':>9}")
    for name, entry in results["sets"].items():
        rates = entry["images_per_s"]
        for label in ("1 thread", f"{args.threads} threads"):
            exact_rate, fast_rate = rates[f"exact, {label}"], rates[f"fast, {label}"]
            print(f"{name:<14} {label.split()[0]:>8} {exact_rate:>12.1f} {fast_rate:>11.1f} "
                  f"{fast_rate / exact_rate:>8.2f}x")
    print(f"\n{'set':<14} {'exact CPU ms/img':>17} {'fast CPU ms/img':>16} {'CPU saved':>10}   (1 thread, least)")
    for name, entry in results["sets"].items():
        exact_ms, fast_ms = entry["images_per_s"]["exact, cpu ms"], entry["images_per_s"]["fast, cpu ms"]
        print(f"{name:<14} {exact_ms:>17.2f} {fast_ms:>16.2f} {1 - fast_ms / exact_ms:>9.0%}")
    print(f"\n{'set':<14} {'images':>6} {'mean |d|':>9} {'worst img':>10} {'max |d|':>8} {'top-1 agree':>12} "
          f"{'max dP(top-1)':>14}")
    for name, entry in results["sets"].items():
        p = entry["parity"]
        agree = f"{entry['top1_agree']}/{entry['images']}" if "top1_agree" in entry else "-"
        dprob = f"{entry['top1_prob_max_diff']:.4f}" if "top1_prob_max_diff" in entry else "-"
        print(f"{name:<14} {entry['images']:>6} {p['mean_abs_diff']:>9.3f} {p['worst_image_mean_abs_diff']:>10.3f} "
              f"{p['max_abs_diff']:>8.0f} {agree:>12} {dprob:>14}")
    print(f"\nfor scale: re-saving the hymenoptera photos as JPEG quality 95 moves the exact crops by "
          f"{results['jpeg_q95_resave_mean_abs_diff']:.3f} levels on average")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
