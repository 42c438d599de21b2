"""The served graph, side by side in one run: the old one (TorchScript exporter, TF-"same" padding
computed from the input's shape at run time) against the new one (dynamo exporter, the padding
folded into each Conv), fp32 and INT8, in process and end to end, against the issue's targets.

    .venv/bin/python -m bench.graph_bench --concurrency 32 --duration 90 --warmup 3 --rounds 3 \
        [--data ../shared/data/hymenoptera/train] [--local-duration 22.5] [--batch-size 8] \
        [--no-old-int8] [--skip-service] [--service-env KEY=VALUE ...] [--log-dir DIR] [--json OUT.json]

Two temporary state directories, removed at the end:

  new  ``python -m training fit --data DATA --strategy head --activate`` (the dynamo graph), then
       ``python -m training quantize`` (INT8 of that graph), as an operator would run them
  old  the same classifier exported the old way: the backbone rebuilt, the fitted version's head
       put on it, ``export_onnx(..., exporters=("torchscript",))``, registered with the new
       version's spec, embeddings and details, and activated; unless --no-old-int8, quantised too
       (for information only: no target names it)

Then, in this order:

  accuracy    top-1 of every graph on every photo under --data (the exact preprocessing): the old
              and new fp32 graphs must answer alike; INT8 against fp32 on fit's held-out split
  in-process  the service's own ModelRuntime (CPU provider, one worker) of each graph at 1 and at 2
              onnxruntime threads, ``infer`` on the same batch of --batch-size uint8 crops (the
              service's normalisation, slicing and softmax included; no decoding, no HTTP),
              graphs in turn --rounds times, --local-duration seconds per graph and thread count
  service     ``bentoml serve service.service:TransferServe`` three times (old fp32, new fp32, new
              INT8 through TRANSFER_SERVE_MODEL_VARIANT, plus any --service-env), all started
              first, then measured in turn --rounds times with --concurrency clients sending
              single-image POST /predict (bench/int8_bench.py's measurement)

The server CPU per image minus the same graph's in-process CPU per image at 1 thread (the service's
inference workers run single-thread sessions) is what decoding, HTTP and the hand-over between the
workers cost: the part of the end-to-end figure that a faster graph cannot shrink.

Only ratios of setups measured in the same run are judged; absolute figures are printed for
information, and "other load" says when even the ratios were disturbed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    DEFAULT_IMAGES,
    ImageFile,
    ProcessCPU,
    Progress,
    Server,
    SystemCPU,
    check_service_arguments,
    describe_images,
    install_sigterm_handler,
    load_images,
    run_main,
    serving,
)
from bench.int8_bench import OTHER_LOAD_WARNING, check_server, held_out_accuracy, measure_in_turn, prepare, run_cli

OLD_FP32, NEW_FP32, NEW_INT8, OLD_INT8 = "old fp32", "new fp32", "new int8", "old int8"
#: measured end to end: the baseline first
SERVED = (OLD_FP32, NEW_FP32, NEW_INT8)
THREADS = (1, 2)
#: The issue's targets, all against the old graph in fp32 measured in the same run.
MIN_LOCAL_FP32 = 1.3  # new fp32 / old fp32, in process, at 1 and at 2 threads
MIN_LOCAL_INT8 = 1.8  # new int8 / old fp32, in process
MIN_SERVICE_FP32 = 1.1  # new fp32 / old fp32, end to end
MIN_SERVICE_INT8 = 1.4  # new int8 / old fp32, end to end
MAX_ACCURACY_LOSS_PP = 0.5  # INT8 against fp32, fit's held-out split


@dataclass(frozen=True)
class Setup:
    """One graph to measure: a variant of a version in a state directory."""

    name: str
    home: Path
    version: str
    variant: str  # TRANSFER_SERVE_MODEL_VARIANT
    exporter: str

    @property
    def graph(self) -> Path:
        from store.state import open_state

        stored = open_state(home=self.home).registry.get(self.version)
        return stored.int8_onnx_path if self.variant == "int8" else stored.onnx_path


# -- the two state directories -----------------------------------------------------------------


def export_old(new_home: Path, version: str, parity_inputs: np.ndarray, stack: contextlib.ExitStack,
               progress: Progress) -> tuple[Path, str, dict[str, Any]]:
    """A second state directory holding ``version``'s classifier exported with the TorchScript
    exporter (the graph the project served before), active; (home, its version, the export's
    parity figures)."""
    import torch

    from models.hardware import cpu_count
    from models.onnx_io import read_head
    from store.state import open_state
    from training.backbones import create_backbone
    from training.export import TORCHSCRIPT, export_onnx

    fitted = open_state(home=new_home).registry.get(version)
    home = Path(tempfile.mkdtemp(prefix="transfer-serve-graph-bench-old-"))
    stack.callback(shutil.rmtree, home, ignore_errors=True)
    progress(f"exporting {version}'s classifier the old way (TorchScript exporter) into {home} ...")
    started = time.perf_counter()
    torch.set_num_threads(cpu_count())
    backbone = create_backbone()
    if backbone.fingerprint() != fitted.spec.backbone_fingerprint:
        raise RuntimeError(f"the rebuilt backbone is not the one {version} was fitted on (fingerprints differ)")
    weight, bias = read_head(fitted.onnx_path)
    backbone.set_head(weight, bias)
    with tempfile.TemporaryDirectory(prefix="graph-bench-export-") as workdir:
        onnx_path = Path(workdir) / "model.onnx"
        parity = export_onnx(backbone.model, onnx_path, parity_inputs, exporters=(TORCHSCRIPT,))
        embeddings, targets = fitted.training_embeddings()
        info = fitted.info
        details = {**info["details"], "onnx_parity": parity.as_dict(),
                   "note": f"{version} of the new state directory, exported again with the TorchScript exporter "
                           "by bench/graph_bench.py; the metrics are that version's"}
        old = open_state(home=home).registry.register(
            onnx_file=onnx_path, spec=fitted.spec, metrics=fitted.metrics, embeddings=embeddings,
            embedding_targets=targets, embedding_hashes=fitted.training_hashes(), parent=None,
            dataset_fingerprint=info["dataset_fingerprint"], details=details, report_dir=fitted.report_dir,
            activate=True,
        )
    figures = {**parity.as_dict(), "seconds": round(time.perf_counter() - started, 1)}
    progress(f"exported and registered {old.version} in {figures['seconds']}s (largest logit difference from "
             f"torch {parity.max_logit_diff:.1e})")
    return home, old.version, figures


def graph_facts(path: Path) -> dict[str, Any]:
    """Size and node count of a graph file, and the nodes that compute padding at run time."""
    import onnx

    nodes = onnx.load(str(path), load_external_data=False).graph.node
    ops = [node.op_type for node in nodes]
    return {"bytes": path.stat().st_size, "nodes": len(ops),
            "shape_arithmetic_nodes": sum(op in ("Shape", "Ceil", "Pad") for op in ops)}


# -- accuracy ------------------------------------------------------------------------------------


def accuracy_on_all(setups: Mapping[str, Setup], inputs: np.ndarray, targets: np.ndarray) -> dict[str, Any]:
    """Top-1 of every graph on ``inputs`` (N, 3, S, S), and how the old and new fp32 graphs (and
    each INT8 graph and its fp32 one) differ, image by image."""
    from models.onnx_io import cpu_session, run_in_batches

    logits = {name: run_in_batches(cpu_session(setup.graph), inputs, batch_size=16)[0]
              for name, setup in setups.items()}
    top1 = {name: values.argmax(1) for name, values in logits.items()}

    def compared(a: str, b: str) -> dict[str, Any]:
        return {"disagreements": int((top1[a] != top1[b]).sum()),
                "max_logit_diff": float(np.abs(logits[a] - logits[b]).max())}

    pairs = {f"{OLD_FP32} vs {NEW_FP32}": compared(OLD_FP32, NEW_FP32),
             f"{NEW_FP32} vs {NEW_INT8}": compared(NEW_FP32, NEW_INT8)}
    if OLD_INT8 in setups:
        pairs[f"{OLD_FP32} vs {OLD_INT8}"] = compared(OLD_FP32, OLD_INT8)
    return {"images": len(inputs),
            "top1": {name: float((values == targets).mean()) for name, values in top1.items()},
            "correct": {name: int((values == targets).sum()) for name, values in top1.items()},
            "pairs": pairs}


def load_photos(data: Path, spec: Any) -> tuple[np.ndarray, np.ndarray]:
    """Every labelled photo under ``data``, preprocessed exactly (as ``training evaluate`` does),
    and its class as an index into ``spec.labels``."""
    from models.preprocess import preprocess_image
    from training.data import load_labelled

    dataset = load_labelled(data, lambda image: preprocess_image(image, spec.preprocess), progress=False,
                            require_trainable=False)
    unknown = sorted(set(dataset.classes) - set(spec.labels))
    if unknown:
        raise RuntimeError(f"{data} has labels the fitted version does not know: {', '.join(unknown)}")
    index = [spec.labels.index(label) for label in dataset.classes]
    return np.stack(dataset.items), np.array([index[t] for t in dataset.targets], dtype=np.int64)


# -- in process ----------------------------------------------------------------------------------


def in_process(setups: Mapping[str, Setup], crops: np.ndarray, args: argparse.Namespace,
               progress: Progress) -> dict[str, dict[str, dict[str, Any]]]:
    """{threads: {setup: figures}}: the service's ModelRuntime of each setup, ``infer`` on the same
    uint8 crops, setups in turn --rounds times at each thread count."""
    from service.runtime import ModelRuntime
    from service.settings import Settings
    from store.state import open_state

    seconds = max(0.5, args.local_duration / args.rounds)
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for threads in THREADS:
        runtimes = {}
        for name, setup in setups.items():
            runtime = ModelRuntime(Settings(home=setup.home, providers="cpu", inference_workers=1,
                                            intra_op_threads=threads, model_variant=setup.variant),
                                   open_state(home=setup.home).registry)
            runtime.refresh()
            loaded = runtime.loaded
            if loaded is None or loaded.variant != setup.variant or loaded.version != setup.version:
                raise RuntimeError(f"could not load {setup.version} ({setup.variant}) from {setup.home}")
            runtimes[name] = runtime
        done = {name: 0 for name in setups}
        spent = {name: 0.0 for name in setups}
        cpu = {name: 0.0 for name in setups}
        machine_busy = {name: 0.0 for name in setups}
        per_round: dict[str, list[float]] = {name: [] for name in setups}
        for round_index in range(args.rounds):
            for name, runtime in runtimes.items():
                for _ in range(2):  # warm-up
                    runtime.infer(crops)
                machine, own = SystemCPU(), ProcessCPU(tree=False, root_label="benchmark")
                machine.start()
                own.start()
                images, started = 0, time.perf_counter()
                while (elapsed := time.perf_counter() - started) < seconds:
                    runtime.infer(crops)
                    images += len(crops)
                own.stop()
                machine.stop()
                done[name] += images
                spent[name] += elapsed
                cpu[name] += sum(own.seconds().values())
                machine_busy[name] += machine.busy_seconds()
                per_round[name].append(images / elapsed)
            progress(f"in-process, {threads} thread(s), round {round_index + 1}/{args.rounds}: "
                     + ", ".join(f"{name} {rates[-1]:.1f}" for name, rates in per_round.items()) + " img/s")
        results[str(threads)] = {
            name: {"throughput": done[name] / spent[name], "images": done[name], "seconds": spent[name],
                   "throughput_per_round": per_round[name], "cpu_ms_per_image": 1000 * cpu[name] / done[name],
                   "other_cores_busy": max(0.0, machine_busy[name] - cpu[name]) / spent[name],
                   "threads": threads, "batch_size": len(crops)}
            for name in setups
        }
        del runtimes  # the sessions of this thread count, before the next ones load
    return results


def crops_of(images: Sequence[ImageFile], spec: Any, batch_size: int) -> np.ndarray:
    """The first ``batch_size`` images as the service's HTTP worker hands them on: uint8 crops."""
    from models.preprocess import decode_and_crop

    chosen = [images[i % len(images)] for i in range(batch_size)]
    return np.stack([decode_and_crop(image.data, spec.preprocess) for image in chosen])


# -- end to end ----------------------------------------------------------------------------------


def service(setups: Mapping[str, Setup], images: Sequence[ImageFile], args: argparse.Namespace,
            stack: contextlib.ExitStack, progress: Progress) -> dict[str, dict[str, Any]]:
    if args.log_dir is None:
        log_root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="graph-bench-logs-")))
    else:
        log_root = args.log_dir
    servers: dict[str, Server] = {}
    for name in SERVED:
        setup = setups[name]
        log_dir = log_root / name.replace(" ", "-")  # each server its own log folder: they share the target
        log_dir.mkdir(parents=True, exist_ok=True)
        env = {**args.service_env, "TRANSFER_SERVE_MODEL_VARIANT": setup.variant}
        progress(f"service: starting {name} (" + " ".join(f"{k}={v}" for k, v in env.items()) + ")")
        servers[name] = stack.enter_context(serving("service.service:TransferServe", setup.home, log_dir, env=env))
        check_server(servers[name], setup.version, setup.variant, images)
        progress(f"service: {name} ready at {servers[name].url}")
    results = measure_in_turn(servers, images, args, progress)
    progress("stopping the servers")
    return results


# -- the verdict ---------------------------------------------------------------------------------


def target(value: float | None, bound: float, *, at_most: bool = False) -> dict[str, Any]:
    met = None if value is None else (value <= bound if at_most else value >= bound)
    return {"value": value, "target": f"{'<=' if at_most else '>='} {bound:g}", "met": met}


def judge(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    local, http, acc = document["in_process"], document["service"], document["accuracy"]

    def local_ratio(threads: int, name: str) -> float:
        figures = local[str(threads)]
        return float(figures[name]["throughput"] / figures[OLD_FP32]["throughput"])

    def http_ratio(name: str) -> float | None:
        return None if http is None else float(http[name]["throughput"] / http[OLD_FP32]["throughput"])

    same = acc["all_photos"]["pairs"][f"{OLD_FP32} vs {NEW_FP32}"]["disagreements"]
    targets = {}
    for threads in THREADS:
        targets[f"in-process new fp32 / old fp32, {threads} thr"] = target(local_ratio(threads, NEW_FP32),
                                                                           MIN_LOCAL_FP32)
    for threads in THREADS:
        targets[f"in-process new int8 / old fp32, {threads} thr"] = target(local_ratio(threads, NEW_INT8),
                                                                           MIN_LOCAL_INT8)
    targets["service new fp32 / old fp32"] = target(http_ratio(NEW_FP32), MIN_SERVICE_FP32)
    targets["service new int8 / old fp32"] = target(http_ratio(NEW_INT8), MIN_SERVICE_INT8)
    targets["int8 top-1 lost, held out (pp)"] = target(acc["held_out"]["loss_pp"], MAX_ACCURACY_LOSS_PP,
                                                       at_most=True)
    targets["old vs new fp32 top-1 differing"] = {"value": float(same), "target": "= 0", "met": same == 0}
    return targets


def outside_the_model(local: Mapping[str, Any], http: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Per served graph: server CPU per image, the graph's own (in process, 1 thread), the rest
    (decoding, HTTP, the hand-over between workers) and its share; and the end-to-end ratio to the
    old graph that CPU per image alone predicts."""
    model = local["1"]
    rest = {}
    for name in SERVED:
        server = http[name]["server_cpu_ms_per_image"]
        own = model[name]["cpu_ms_per_image"]
        rest[name] = {"server_cpu_ms_per_image": server, "model_cpu_ms_per_image": own,
                      "outside_model_cpu_ms_per_image": server - own, "outside_model_share": (server - own) / server,
                      "cpu_ratio_to_old": http[OLD_FP32]["server_cpu_ms_per_image"] / server}
    old = rest[OLD_FP32]
    for name in SERVED:
        # the old service's CPU per image with only the graph replaced by this one
        rest[name]["predicted_ratio_to_old"] = old["server_cpu_ms_per_image"] / (
            old["outside_model_cpu_ms_per_image"] + rest[name]["model_cpu_ms_per_image"])
    return rest


def print_report(document: dict[str, Any]) -> None:
    setups, acc, local, http = document["setups"], document["accuracy"], document["in_process"], document["service"]
    print(f"\nThe served graph: old (TorchScript export) against new (dynamo export), version "
          f"{setups[NEW_FP32]['version']} fitted on {document['config']['data']} ({document['cores']} cores)")
    for name, setup in setups.items():
        facts = setup["graph"]
        print(f"  {name:<9} {setup['exporter']:<12} {facts['nodes']:>5} nodes ({facts['shape_arithmetic_nodes']} "
              f"Shape/Ceil/Pad), {facts['bytes'] / 1e6:.1f} MB")

    every = acc["all_photos"]
    print(f"\naccuracy: top-1 on all {every['images']} photos (exact preprocessing)")
    for name, top1 in every["top1"].items():
        print(f"  {name:<9} {top1:.4f} ({every['correct'][name]}/{every['images']})")
    for pair, diff in every["pairs"].items():
        print(f"  {pair}: {diff['disagreements']} top-1 answers differ, largest logit difference "
              f"{diff['max_logit_diff']:.2e}")
    held = acc["held_out"]
    print(f"INT8 on {held['source']}: fp32 {held['fp32_accuracy']:.4f}, int8 {held['int8_accuracy']:.4f}, "
          f"{held['loss_pp']:.2f} points lost, agreement {held['top1_agreement']:.4f}")
    if "held_out_old_int8" in acc:
        old = acc["held_out_old_int8"]
        print(f"  (information: old-graph INT8 {old['int8_accuracy']:.4f} against its fp32 {old['fp32_accuracy']:.4f})")

    print(f"\nin process: the service's ModelRuntime.infer, batch {document['config']['batch_size']} uint8 crops")
    print(f"  {'setup':<9} {'thr':>3} {'img/s':>8} {'x old':>6} {'CPU ms/img':>11} {'other load':>11}   rounds")
    for threads, figures in local.items():
        base = figures[OLD_FP32]["throughput"]
        for name, r in figures.items():
            rounds = " / ".join(f"{t:.1f}" for t in r["throughput_per_round"])
            note = "  (information)" if name == OLD_INT8 else ""
            print(f"  {name:<9} {threads:>3} {r['throughput']:>8.1f} {r['throughput'] / base:>6.2f} "
                  f"{r['cpu_ms_per_image']:>11.2f} {r['other_cores_busy']:>11.2f}   {rounds}{note}")

    if http is not None:
        print(f"\nend to end: {document['config']['concurrency']} clients, single-image POST /predict")
        print(f"  {'setup':<9} {'img/s':>8} {'x old':>6} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6} "
              f"{'CPU ms/img':>11} {'other load':>11}   rounds")
        base = http[OLD_FP32]["throughput"]
        for name in SERVED:
            r = http[name]
            lat = r["latency_ms"]
            rounds = " / ".join(f"{t:.1f}" for t in r["throughput_per_round"])
            print(f"  {name:<9} {r['throughput']:>8.1f} {r['throughput'] / base:>6.2f} {lat['p50'] or 0:>7.0f} "
                  f"{lat['p99'] or 0:>7.0f} {r['errors']:>6} {r['server_cpu_ms_per_image']:>11.2f} "
                  f"{r['other_cores_busy']:>11.2f}   {rounds}")
        for name in SERVED:
            by_process = http[name]["server_cpu_ms_per_image_by_process"].items()
            print(f"  {name} server CPU ms/img by process: " + ", ".join(f"{p} {ms:.2f}" for p, ms in by_process))
        print("\nserver CPU per image: the graph's own (in process, 1 thread) and the rest (decoding, HTTP, "
              "hand-over between workers)")
        for name, r in document["outside_model"].items():
            print(f"  {name:<9} {r['server_cpu_ms_per_image']:6.2f} ms = model {r['model_cpu_ms_per_image']:5.2f} + "
                  f"rest {r['outside_model_cpu_ms_per_image']:5.2f} ({100 * r['outside_model_share']:.0f}%); "
                  f"CPU old/this {r['cpu_ratio_to_old']:.2f}x, predicted from the model alone "
                  f"{r['predicted_ratio_to_old']:.2f}x")

    print("\ntargets (ratios of this run; absolute figures above are for information)")
    for name, figure in document["targets"].items():
        verdict = "not measured" if figure["met"] is None else ("met" if figure["met"] else "not met")
        value = "-" if figure["value"] is None else f"{figure['value']:.2f}"
        print(f"  {name:<38}{value:>8}   {figure['target']:<8}{verdict}")
    busy = [r["other_cores_busy"] > OTHER_LOAD_WARNING for figures in local.values() for r in figures.values()]
    disturbed = [f"{sum(busy)} of {len(busy)} in-process measurements"] if any(busy) else []
    disturbed += [f"service {name}" for name, r in (http or {}).items() if r["other_cores_busy"] > OTHER_LOAD_WARNING]
    if disturbed:
        print(f"note: other work used more than {OTHER_LOAD_WARNING:g} cores while measuring {', '.join(disturbed)}; "
              "the ratios that use those figures are unreliable: rerun on a quieter machine")


# -- the run -------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_IMAGES,
                        help=f"labelled folder to fit on, calibrate with and score on (default {DEFAULT_IMAGES})")
    parser.add_argument("--images", type=Path, help="images for the HTTP load and the in-process batch "
                        "(default: --data)")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent HTTP clients (default 32)")
    parser.add_argument("--duration", type=float, default=90,
                        help="measured seconds per service, over all rounds (default 90)")
    parser.add_argument("--local-duration", type=float,
                        help="measured seconds per graph and thread count in process, over all rounds "
                        "(default: a quarter of --duration)")
    parser.add_argument("--warmup", type=float, default=3, help="uncounted seconds before each service round "
                        "(default 3)")
    parser.add_argument("--rounds", type=int, default=3, help="take turns this many times (default 3)")
    parser.add_argument("--batch-size", type=int, default=8, help="uint8 crops per in-process call (default 8)")
    parser.add_argument("--no-old-int8", action="store_true", help="do not quantise the old graph (information only)")
    parser.add_argument("--skip-service", action="store_true", help="accuracy and in-process figures only")
    parser.add_argument("--service-env", action="append", default=[], metavar="KEY=VALUE",
                        help="setting for every service (repeatable), e.g. TRANSFER_SERVE_WORKERS=2")
    parser.add_argument("--log-dir", type=Path, help="keep the servers' logs here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="write every figure to this JSON file")
    parser.set_defaults(home=None)  # always fits its own version: no --home
    args = parser.parse_args(argv)
    check_service_arguments(parser, args)
    if "TRANSFER_SERVE_MODEL_VARIANT" in args.service_env:
        parser.error("the benchmark sets TRANSFER_SERVE_MODEL_VARIANT itself")
    args.images = args.images or args.data
    if args.local_duration is None:
        args.local_duration = args.duration / 4
    if (args.concurrency < 1 or args.duration <= 0 or args.local_duration <= 0 or args.warmup < 0
            or args.rounds < 1 or args.batch_size < 1):
        parser.error("--concurrency, --rounds, --batch-size >= 1, --duration, --local-duration > 0 and "
                     "--warmup >= 0 are required")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    install_sigterm_handler()
    progress = Progress()
    from models.hardware import cpu_count
    from store.state import open_state

    with contextlib.ExitStack() as stack:
        new_home, version, quantize_report = prepare(argparse.Namespace(home=None, version=None, data=args.data),
                                                     stack, progress)
        fitted = open_state(home=new_home).registry.get(version)
        exporter = fitted.info["details"]["onnx_parity"]["exporter"]
        if exporter != "dynamo":
            raise RuntimeError(f"fit exported {version} with the {exporter} exporter, not dynamo (its log says why): "
                               "there is no new graph to compare")
        photos, targets = load_photos(args.data, fitted.spec)
        progress(f"read {len(photos)} labelled photos from {args.data}")
        old_home, old_version, old_export = export_old(new_home, version, photos[:: max(1, len(photos) // 16)][:16],
                                                       stack, progress)
        setups = {OLD_FP32: Setup(OLD_FP32, old_home, old_version, "fp32", "torchscript"),
                  NEW_FP32: Setup(NEW_FP32, new_home, version, "fp32", exporter),
                  NEW_INT8: Setup(NEW_INT8, new_home, version, "int8", exporter)}
        old_int8_report = None
        if not args.no_old_int8:
            progress("quantising the old graph (python -m training quantize), for information ...")
            old_int8_report = run_cli(["quantize", "--version", old_version, "--data", str(args.data)], old_home)
            progress(f"quantised in {old_int8_report.get('seconds', '?')}s")
            setups[OLD_INT8] = Setup(OLD_INT8, old_home, old_version, "int8", "torchscript")

        accuracy: dict[str, Any] = {"all_photos": accuracy_on_all(setups, photos, targets),
                                    "held_out": held_out_accuracy(new_home, version, args.data)}
        if OLD_INT8 in setups:
            accuracy["held_out_old_int8"] = held_out_accuracy(old_home, old_version, args.data)
        same = accuracy["all_photos"]["pairs"][f"{OLD_FP32} vs {NEW_FP32}"]["disagreements"]
        progress(f"accuracy: old and new fp32 differ on {same} of {len(photos)} photos; INT8 loses "
                 f"{accuracy['held_out']['loss_pp']:.2f} points on {accuracy['held_out']['images']} held-out images")

        images = load_images(args.images)
        progress(f"loaded {describe_images(images)} from {args.images}")
        local = in_process(setups, crops_of(images, fitted.spec, args.batch_size), args, progress)
        http = None if args.skip_service else service(setups, images, args, stack, progress)
        document: dict[str, Any] = {
            "version": version, "cores": cpu_count(),
            "setups": {name: {"home": str(s.home), "version": s.version, "variant": s.variant, "exporter": s.exporter,
                              "graph": graph_facts(s.graph)} for name, s in setups.items()},
            "old_export": old_export, "quantize": quantize_report, "quantize_old": old_int8_report,
            "accuracy": accuracy, "in_process": local, "service": http,
        }
    document["outside_model"] = None if http is None else outside_the_model(local, http)
    document["targets"] = judge(document)
    document["config"] = {"concurrency": args.concurrency, "duration_s": args.duration,
                          "local_duration_s": args.local_duration, "warmup_s": args.warmup, "rounds": args.rounds,
                          "batch_size": args.batch_size, "threads": list(THREADS), "service_env": args.service_env,
                          "data": str(args.data), "images": str(args.images), "python": platform.python_version(),
                          "host": platform.node()}
    document["wall_s"] = progress.elapsed
    print_report(document)
    if args.json:
        args.json.write_text(json.dumps(document, indent=2))
        progress(f"wrote {args.json}")
    progress("finished")
    return 0


if __name__ == "__main__":
    run_main(main)
