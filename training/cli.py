"""Command-line interface: ``python -m training COMMAND``.

Commands: bootstrap, fit, evaluate, models, import, quantize, reexport, compare, adapt.

Progress bars and logs go to stderr; results go to stdout. With ``--json`` the output ends with
one JSON object (``version`` and ``metrics`` for ``fit``), so scripts can read the last line.
Exit status: 0 success, 2 bad input (data, arguments, unknown version), 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from models.errors import InputError, TransferServeError, VersionNotFoundError
from models.hardware import cpu_count
from models.preprocess import DEFAULT_MAX_PIXELS
from store.settings import StoreSettings
from store.state import State, open_state

from .backbones import DEFAULT_BACKBONE, OFFLINE_BACKBONES

DATA_HELP = "labelled folder (one subfolder per class) or CSV manifest (path,label)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__.splitlines()[0])
    parser.add_argument("--home", help="state directory (default: $TRANSFER_SERVE_HOME or ~/.transfer-serve)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    boot = sub.add_parser("bootstrap", help="register the pretrained ImageNet classifier if the store is empty")
    boot.add_argument("--force", action="store_true", help="register it even if versions exist")
    boot.add_argument("--backbone", default=DEFAULT_BACKBONE, choices=sorted(OFFLINE_BACKBONES),
                      help="the pretrained network (all three work offline; larger is slower and a little more "
                           "accurate: `python -m training compare` measures them on your data)")
    boot.add_argument("--json", action="store_true")

    fit = sub.add_parser("fit", help="train, export, verify and register a version")
    fit.add_argument("--data", required=True, type=Path, help=DATA_HELP)
    fit.add_argument("--strategy", choices=["head", "finetune"], default="head",
                     help="head: frozen backbone, linear head on embeddings (fast); "
                          "finetune: the whole network at a low learning rate")
    fit.add_argument("--backbone", default=DEFAULT_BACKBONE,
                     help=f"timm model name ({', '.join(OFFLINE_BACKBONES)} work offline)")
    fit.add_argument("--checkpoint", type=Path, help="local state dict for the backbone's weights")
    fit.add_argument("--epochs", type=int, help="fine-tuning epochs (finetune; default 6)")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--val-fraction", type=float, default=0.2, help="held-out share of each class")
    fit.add_argument("--activate", action="store_true", help="make the new version active")
    fit.add_argument("--json", action="store_true")

    ev = sub.add_parser("evaluate", help="metrics of a version on a labelled folder")
    ev.add_argument("--version", required=True)
    ev.add_argument("--data", required=True, type=Path)
    ev.add_argument("--report-dir", type=Path, help="also write report.json/.md and plots here")
    ev.add_argument("--json", action="store_true")

    imp = sub.add_parser("import", help="add a labelled folder or CSV manifest to the label store")
    imp.add_argument("--data", required=True, type=Path, help=DATA_HELP)
    imp.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                     help="largest image accepted, width x height")
    imp.add_argument("--json", action="store_true")

    quant = sub.add_parser("quantize", help="add an INT8 variant (static QDQ, per-channel) to a version, "
                           "calibrated on its own training images")
    quant.add_argument("--version", required=True)
    quant.add_argument("--data", required=True, type=Path,
                       help="the labelled folder or CSV manifest the version was trained on")
    quant.add_argument("--calibration-images", type=int, default=None,
                       help="most training images to calibrate on (default 200)")
    quant.add_argument("--json", action="store_true")

    reexport = sub.add_parser("reexport", help="a new version with a version's head on its stock pretrained "
                              "backbone exported again (the faster graph), checked against it on its own images")
    reexport.add_argument("--version", required=True, help="a bootstrap or head-only version (vN)")
    reexport.add_argument("--data", type=Path,
                          help="the labelled folder or CSV manifest the version was fitted on, where its images "
                               "are not in the label store")
    reexport.add_argument("--json", action="store_true")

    cmp = sub.add_parser("compare", help="the offline backbones side by side on a labelled folder: held-out "
                         "accuracy over seeded splits, speed, size; a recommendation and a report folder")
    cmp.add_argument("--data", required=True, type=Path, help=DATA_HELP)
    cmp.add_argument("--backbones", default=",".join(OFFLINE_BACKBONES),
                     help=f"comma-separated (default: all of {', '.join(OFFLINE_BACKBONES)})")
    cmp.add_argument("--splits", type=int, default=5, help="seeded stratified splits per backbone (default 5)")
    cmp.add_argument("--val-fraction", type=float, default=0.2, help="held-out share of each class")
    cmp.add_argument("--finetune", action="store_true", help="fine-tune the whole network on every split too (slow)")
    cmp.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs per split (default 3)")
    cmp.add_argument("--max-latency-ms", type=float,
                     help="recommend only backbones that answer one image within this many milliseconds here")
    cmp.add_argument("--learning-curve", action="store_true",
                     help="also fit the head on 1, 2, 5, 10, 20 and all training images per class")
    cmp.add_argument("--curve-draws", type=int, default=10, help="random subsets per learning-curve point (default 10)")
    cmp.add_argument("--timing-seconds", type=float, default=1.0,
                     help="length of each speed measurement (default 1)")
    cmp.add_argument("--timing-rounds", type=int, default=3,
                     help="rounds of speed measurements, every graph in turn in each; medians reported (default 3)")
    cmp.add_argument("--report-dir", type=Path, default=Path("compare-report"),
                     help="where summary.md, compare.json and the plots go (default ./compare-report)")
    cmp.add_argument("--json", action="store_true")

    adapt = sub.add_parser("adapt", help="a new version whose head is aligned with unlabelled images of a new "
                           "domain (other cameras, light, compression); live if it passes the promotion gate")
    adapt.add_argument("--version", required=True, help="the version to adapt (vN; it needs training embeddings)")
    adapt.add_argument("--data", required=True, type=Path, help="folder of unlabelled images of the new domain "
                       "(searched recursively)")
    adapt.add_argument("--labelled", type=Path, help="labelled images of the new domain (" + DATA_HELP + ") that "
                       "judge the adapted version against the old; without them only --force puts it live")
    adapt.add_argument("--method", choices=["diagonal", "coral"], default="diagonal",
                       help="diagonal (default): each embedding dimension's mean and spread; coral: full covariance")
    adapt.add_argument("--force", action="store_true", help="activate it whatever the gate says")
    adapt.add_argument("--tolerance", type=float, default=0.0,
                       help="accuracy on the labelled images it may lose and still go live (0-1)")
    adapt.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="largest image accepted")
    adapt.add_argument("--json", action="store_true")

    ls = sub.add_parser("models", help="list versions, their metrics, and which is active")
    ls.add_argument("--json", action="store_true")
    return parser


def _emit(obj: Any) -> None:
    print(json.dumps(obj, default=str))


def _describe_metrics(metrics: dict[str, Any]) -> str:
    from .report import format_metrics_table

    return format_metrics_table(metrics) if "accuracy" in metrics else metrics.get("note", "")


def run_compare(args: argparse.Namespace) -> int:
    from .compare import CompareOptions, compare, format_curve_table, format_table, write_compare_report

    backbones = tuple(name.strip() for name in args.backbones.split(",") if name.strip())
    unknown = [name for name in backbones if name not in OFFLINE_BACKBONES]
    if unknown or not backbones:
        raise InputError(f"--backbones: unknown {', '.join(unknown) or '(none given)'}; "
                         f"choose from {', '.join(OFFLINE_BACKBONES)}")
    for flag, value in (("--splits", args.splits), ("--epochs", args.epochs), ("--curve-draws", args.curve_draws),
                        ("--timing-rounds", args.timing_rounds)):
        if value < 1:
            raise InputError(f"{flag} must be at least 1")
    if not 0 < args.val_fraction < 1:
        raise InputError("--val-fraction must be between 0 and 1")
    for flag, number in (("--max-latency-ms", args.max_latency_ms), ("--timing-seconds", args.timing_seconds)):
        if number is not None and not number > 0:
            raise InputError(f"{flag} must be a positive number of {'milliseconds' if 'ms' in flag else 'seconds'}")
    options = CompareOptions(
        backbones=backbones, splits=args.splits, val_fraction=args.val_fraction, finetune=args.finetune,
        epochs=args.epochs, max_latency_ms=args.max_latency_ms, learning_curve=args.learning_curve,
        curve_draws=args.curve_draws, timing_seconds=args.timing_seconds, timing_rounds=args.timing_rounds,
        progress=not args.json,
    )
    comparison = compare(args.data, options)
    summary = write_compare_report(comparison, args.report_dir, command=" ".join(["python -m training", *sys.argv[1:]]))
    if args.json:
        _emit({**comparison.as_dict(), "report": str(summary)})
        return 0
    print(format_table(comparison))
    curve = format_curve_table(comparison)
    if curve:
        print(f"\nlearning curve: held-out accuracy on {comparison.curve_held_out} images by training images per class")
        print(curve)
    print(f"\nrecommendation: {comparison.recommendation.reason}")
    print(f"rule: {comparison.recommendation.rule}")
    print(f"report: {summary}")
    return 0


def run_adapt(args: argparse.Namespace, state: State, home: Path) -> int:
    from pydantic import ValidationError

    from models.adapt import AdaptParams

    from .adapt import adapt_folder

    try:
        params = AdaptParams(method=args.method, force=args.force, tolerance=args.tolerance)
    except ValidationError as exc:
        raise InputError(f"--tolerance must be between 0 and 1 ({exc.errors()[0]['msg']})") from None
    adapted = adapt_folder(state, home, args.version, args.data, args.labelled, params, max_pixels=args.max_pixels,
                           threads=cpu_count())
    if args.json:
        _emit({"version": adapted.version, "active": adapted.active, "metrics": adapted.metrics})
        return 0
    metrics = adapted.metrics
    print(f"registered {adapted.version}: {args.version} adapted ({metrics['method']}) to {metrics['target_images']} "
          f"images in {metrics['seconds']:.1f}s")
    print(f"promotion gate {'passed' if metrics['promoted'] else 'not passed'}: {metrics['gate']}")
    print(f"{adapted.version} is active" if adapted.active else
          f"{adapted.version} is not active; activate it with POST /admin/models/{adapted.version}/activate")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.command == "compare":  # measures backbones on a folder; the state is not involved
        return run_compare(args)
    settings = StoreSettings(home=args.home) if args.home else StoreSettings()
    state = open_state(settings)
    registry = state.registry
    quiet = getattr(args, "json", False)
    if args.command == "adapt":
        return run_adapt(args, state, settings.home)
    if args.command == "bootstrap":
        from .pipeline import bootstrap

        version = bootstrap(registry, force=args.force, backbone_name=args.backbone)
        active = registry.active_version()
        if args.json:
            _emit({"version": version.version if version else None, "active": active, "created": version is not None})
        elif version is None:
            print(f"the store already has versions; active: {active}")
        else:
            print(f"registered {version.version} (pretrained ImageNet classifier) on {version.spec.backbone}; "
                  f"active: {active}")
    elif args.command == "fit":
        from .pipeline import FitOptions, fit

        options = FitOptions(
            strategy=args.strategy, backbone=args.backbone, checkpoint=args.checkpoint,
            epochs=args.epochs, seed=args.seed, val_fraction=args.val_fraction,
            activate=args.activate,
        )
        result = fit(args.data, registry, options)
        if not quiet:
            print(f"registered {result.version.version} in {result.seconds:.1f}s "
                  f"(active: {registry.active_version()})")
            print(_describe_metrics(result.metrics))
            print(f"report: {result.version.report_dir / 'report.md'}")
        else:
            _emit({"version": result.version.version, "active": registry.active_version() == result.version.version,
                   "seconds": round(result.seconds, 1), "metrics": result.metrics})
    elif args.command == "evaluate":
        from .pipeline import evaluate

        metrics = evaluate(registry.get(args.version), args.data, report_dir=args.report_dir, progress=not quiet)
        _emit(metrics) if args.json else print(_describe_metrics(metrics))
    elif args.command == "import":
        from .importer import import_folder

        summary = import_folder(args.data, state.labels, max_pixels=args.max_pixels, progress=not quiet)
        _emit(summary.to_dict()) if args.json else print(summary.describe())
    elif args.command == "quantize":
        from .quantize import MAX_CALIBRATION_IMAGES, quantize_version

        if args.calibration_images is not None and args.calibration_images < 1:
            raise InputError("--calibration-images must be at least 1")
        quantized = quantize_version(registry, args.version, args.data, progress=not quiet,
                                     max_calibration=args.calibration_images or MAX_CALIBRATION_IMAGES)
        if args.json:
            _emit(quantized.as_dict())
        else:
            print(f"added model.int8.onnx to {quantized.version} in {quantized.seconds:.1f}s: calibrated on "
                  f"{quantized.calibration_images} training images; on {quantized.check_source}: top-1 accuracy "
                  f"{quantized.int8_accuracy:.4f} (fp32 {quantized.fp32_accuracy:.4f}), agreement "
                  f"{quantized.top1_agreement:.4f}")
            print("the service serves it on CPU hosts by default (TRANSFER_SERVE_MODEL_VARIANT=auto)")
    elif args.command == "reexport":
        from .reexport import reexport_version

        reexported = reexport_version(registry, state.labels, args.version, args.data, progress=not quiet)
        if args.json:
            _emit(reexported.as_dict())
        elif reexported.version is None or reexported.parity is None or reexported.gate is None:
            print(reexported.note)
        else:
            parity, gate = reexported.parity, reexported.gate
            print(f"registered {reexported.version} from {reexported.source} in {reexported.seconds:.1f}s (the "
                  f"same head, the backbone exported again); against {reexported.source} on {parity['images']} "
                  f"images: max logit difference {parity['max_logit_diff']:.2e}, top-1 agreement "
                  f"{parity['top1_agreement']:.4f}")
            print(f"promotion gate {'passed' if gate['passed'] else 'not passed'}: {gate['reason']}")
            if reexported.int8 is not None:
                print("INT8 variant: " + ("added" if reexported.int8["added"] else
                                          "not added (it missed the INT8 gate; the version serves fp32)"))
            print(f"{reexported.version} is active" if reexported.active else
                  f"{reexported.version} is not active; activate it with "
                  f"POST /admin/models/{reexported.version}/activate")
    elif args.command == "models":
        active = registry.active_version()
        rows = [{**v.summary(), "active": v.version == active, "int8": v.has_int8()} for v in registry.versions()]
        if args.json:
            for row in rows:
                row["num_labels"] = len(row["labels"])
            _emit({"active": active, "versions": rows})
        elif not rows:
            print("no model versions yet; run: python -m training bootstrap")
        else:
            for row in rows:
                acc = row["metrics"].get("accuracy")
                print(f"{'*' if row['active'] else ' '} {row['version']:<6} {row['created_at'][:19]}  "
                      f"{row['strategy'] or '':<9} {len(row['labels']):>5} labels  "
                      f"accuracy {'-' if acc is None else f'{acc:.3f}'}  {row['exporter']:<11}"
                      f"{'  +int8' if row['int8'] else ''}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr,
    )
    try:
        return run(args)
    except (InputError, VersionNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TransferServeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
