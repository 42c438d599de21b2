"""First contact with a GPU host: does the service's GPU path run, agree with the CPU, and pay?

    .venv/bin/python -m bench.gpu_check [--home DIR] [--images DIR] [--count 128] \
        [--providers cuda|tensorrt] [--seconds 5] [--json OUT.json]

One process, no HTTP. It loads the active version through the service's own ``ModelRuntime``
(same settings class, same provider selection and options, same graph variants), feeds it the
crops ``/predict`` would make of ``--count`` photos, and prints:

1. what onnxruntime offers here and what the runtime chose (fails if it is not the GPU provider
   asked for: a check that silently ran on the CPU would prove nothing);
2. agreement with the CPU path (fp32, host normalisation, ``session.run``) for each GPU setup:
   top-1 agreement and the largest probability difference;
3. images per second of each setup at batch sizes 1, 8 and 32, in turn, ``--seconds`` each.

GPU setups: ``fp32`` and ``fp16`` as served (uint8 crops normalised inside the graph, IO
binding), and ``fp32 float-input`` (the host normalises, ``session.run``), which shows what the
uint8 input and IO binding save. Exit status 1 if the GPU provider was not used or a setup's
top-1 agreement is under 0.99.

On a CPU-only host, ``--providers cpu`` runs the same checks with the GPU input path forced onto
the CPU provider (a smoke test of this script and of the path, not a GPU measurement).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import DEFAULT_IMAGES, begin, state_home

BATCH_SIZES = (1, 8, 32)
MIN_AGREEMENT = 0.99


@contextlib.contextmanager
def device_input(forced: bool | None) -> Iterator[None]:
    """With ``forced`` True/False, the runtime's choice of uint8 input + IO binding is overridden
    (float-input setup on a GPU; the CPU smoke test); None keeps the runtime's own choice."""
    import service.runtime as runtime_module

    original = runtime_module.feeds_pixels
    if forced is not None:
        runtime_module.feeds_pixels = lambda providers: forced
    try:
        yield
    finally:
        runtime_module.feeds_pixels = original


def load_runtime(home: Path, providers: str, variant: str, forced: bool | None) -> Any:
    from models.hardware import cpu_count
    from service.runtime import ModelRuntime
    from service.settings import Settings
    from store.state import open_state

    settings = Settings(home=home, providers=providers, model_variant=variant, inference_workers=1,
                        intra_op_threads=cpu_count(), max_batch_size=max(BATCH_SIZES))
    runtime = ModelRuntime(settings, open_state(settings).registry)
    with device_input(forced):
        if not runtime.refresh():
            raise RuntimeError(f"no model version could be loaded from {home}")
    return runtime


def throughput(runtime: Any, crops: np.ndarray, batch_size: int, seconds: float) -> float:
    batches = [crops[i:i + batch_size] for i in range(0, len(crops) - batch_size + 1, batch_size)] or [crops]
    runtime.infer(batches[0])  # this batch size's first run (cuDNN algorithm search) is not timed
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for batch in batches:
            runtime.infer(batch)
            done += len(batch)
    return done / (time.perf_counter() - started)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, help="state directory with an active model (default: a temporary "
                        "one, bootstrapped with the pretrained classifier)")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help=f"image folder (default {DEFAULT_IMAGES})")
    parser.add_argument("--count", type=int, default=128, help="photos to use (default 128)")
    parser.add_argument("--providers", choices=("cuda", "tensorrt", "cpu"), default="cuda",
                        help="the GPU provider to check (default cuda); cpu: a smoke test on a CPU-only host")
    parser.add_argument("--seconds", type=float, default=5, help="timed seconds per setup and batch size (default 5)")
    parser.add_argument("--json", type=Path, help="write every figure to this JSON file")
    args = parser.parse_args(argv)
    if args.count < 1 or args.seconds <= 0:
        parser.error("--count >= 1 and --seconds > 0 are required")
    if args.home is not None and not args.home.is_dir():
        parser.error(f"--home {args.home} is not a directory")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    progress, images = begin(args.images)
    import onnxruntime as ort

    from models.hardware import cuda_device_count
    from models.preprocess import decode_and_crop
    from service.providers import CPU, CUDA, TENSORRT

    wanted = {"cuda": CUDA, "tensorrt": TENSORRT, "cpu": CPU}[args.providers]
    report: dict[str, Any] = {
        "onnxruntime": ort.__version__, "available_providers": ort.get_available_providers(),
        "gpus": cuda_device_count(), "providers_asked": args.providers, "setups": {},
    }
    progress(f"onnxruntime {ort.__version__}; providers here: {', '.join(report['available_providers'])}; "
             f"GPUs the driver reports: {report['gpus']}")
    failures: list[str] = []
    with state_home(args.home, progress) as home:
        reference = load_runtime(home, "cpu", "fp32", False)
        spec = reference.loaded.spec
        crops = np.stack([decode_and_crop(image.data, spec.preprocess, fast=True) for image in images[:args.count]])
        progress(f"{len(crops)} crops; reference: fp32 on the CPU provider, host normalisation, session.run")
        _, want = reference.infer(crops)
        # on the CPU smoke test the "GPU" setups run the device input path on the CPU provider
        served_input = True if args.providers == "cpu" else None
        setups = {"fp32": ("fp32", served_input), "fp16": ("fp16", served_input), "fp32 float-input": ("fp32", False)}
        runtimes = {"cpu reference": reference}
        for name, (variant, forced) in setups.items():
            try:
                runtime = load_runtime(home, args.providers, variant, forced)
            except Exception as exc:  # noqa: BLE001 - any load failure is reported; the other setups are checked
                failures.append(f"{name}: could not load: {type(exc).__name__}: {exc}")
                progress(failures[-1])
                continue
            loaded = runtime.loaded
            _, got = runtime.infer(crops)
            agreement = float((got.argmax(1) == want.argmax(1)).mean())
            figures = {"providers": list(loaded.providers), "variant": loaded.variant,
                       "uint8_input_io_binding": loaded.pixels_input, "top1_agreement": agreement,
                       "max_probability_difference": float(np.abs(got - want).max())}
            report["setups"][name] = figures
            progress(f"{name}: on {', '.join(loaded.providers)}; uint8 input + IO binding: {loaded.pixels_input}; "
                     f"top-1 agreement with the CPU {agreement:.4f}, largest probability difference "
                     f"{figures['max_probability_difference']:.2e}")
            if loaded.providers[0] != wanted:
                failures.append(f"{name}: ran on {loaded.providers[0]}, not {wanted}")
            if agreement < MIN_AGREEMENT:
                failures.append(f"{name}: top-1 agreement {agreement:.4f} < {MIN_AGREEMENT}")
            runtimes[name] = runtime

        rates: dict[str, dict[int, float]] = {}
        for name, runtime in runtimes.items():
            rates[name] = {}
            for batch_size in BATCH_SIZES:
                rates[name][batch_size] = throughput(runtime, crops, batch_size, args.seconds)
                progress(f"{name}, batch {batch_size}: {rates[name][batch_size]:.1f} img/s")
            report["setups"].setdefault(name, {})["images_per_second"] = rates[name]

    print(f"\nGPU check ({args.providers}), {len(crops)} crops of {args.images}")
    print(f"{'setup':<20}" + "".join(f"{f'b={b} img/s':>14}" for b in BATCH_SIZES) + f"{'top-1 agree':>14}")
    for name, by_batch in rates.items():
        agreement = report["setups"].get(name, {}).get("top1_agreement")
        print(f"{name:<20}" + "".join(f"{by_batch[b]:>14.1f}" for b in BATCH_SIZES)
              + f"{'-' if agreement is None else f'{agreement:.4f}':>14}")
    if "fp32" in rates and "fp32 float-input" in rates:
        print("uint8 input + IO binding vs float input + run(): "
              + ", ".join(f"b={b} {rates['fp32'][b] / rates['fp32 float-input'][b]:.2f}x" for b in BATCH_SIZES))
    for failure in failures:
        print(f"FAILED: {failure}")
    report["failures"] = failures
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
        progress(f"wrote {args.json}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
