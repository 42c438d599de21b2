"""``training/compare.py`` (``python -m training compare``): at unit level, the recommendation
rule (ties to the faster, the latency limit, no forced winner), the Pareto front and the learning
curve on synthetic embeddings; end to end (slow), the command on a small real subset with every
offline backbone, fine-tuning and the learning curve: its table, JSON, report folder and plots."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.support.cli import last_json
from tests.support.images import make_subset
from tests.support.reports import assert_png
from training.backbones import OFFLINE_BACKBONES
from training.cli import main
from training.compare import BackboneResult, Speed, Spread, learning_curve, pareto_front, recommend


def result(name: str, accuracies: list[float], latency_ms: float, throughput: float) -> BackboneResult:
    spread = Spread.of(accuracies)
    return BackboneResult(backbone=name, arch=name, input_size=224, parameters=1, model_bytes=1,
                          head_accuracy=spread, head_macro_f1=spread, fp32=Speed(latency_ms, throughput),
                          provider="CPUExecutionProvider")


def test_spread_is_mean_and_sample_standard_deviation() -> None:
    spread = Spread.of([0.9, 0.92, 0.94])
    assert spread.mean == pytest.approx(0.92) and spread.std == pytest.approx(0.02)
    assert Spread.of([0.5]).std == 0.0 and str(spread) == "0.920 ± 0.020"


def test_a_clear_winner_is_recommended() -> None:
    small = result("small", [0.80, 0.81, 0.79], latency_ms=5, throughput=300)
    large = result("large", [0.95, 0.96, 0.94], latency_ms=20, throughput=80)
    chosen = recommend([small, large], max_latency_ms=None)
    assert chosen.backbone == "large" and chosen.tied_with == ()
    assert "most accurate" in chosen.reason and "latency" not in chosen.rule


def test_within_the_spread_of_the_splits_the_faster_one_is_recommended_and_the_tie_said() -> None:
    small = result("small", [0.92, 0.95, 0.89], latency_ms=5, throughput=300)
    large = result("large", [0.94, 0.96, 0.92], latency_ms=20, throughput=80)
    chosen = recommend([large, small], max_latency_ms=None)
    assert chosen.backbone == "small" and chosen.tied_with == ("small",)
    assert "cannot separate it from large" in chosen.reason


def test_the_latency_limit_excludes_slow_backbones_and_none_may_qualify() -> None:
    small = result("small", [0.80, 0.81, 0.79], latency_ms=5, throughput=300)
    large = result("large", [0.95, 0.96, 0.94], latency_ms=20, throughput=80)
    chosen = recommend([small, large], max_latency_ms=10)
    assert chosen.backbone == "small" and "within the limit" in chosen.rule
    nobody = recommend([small, large], max_latency_ms=1)
    assert nobody.backbone is None and "the fastest is small at 5.0 ms" in nobody.reason
    assert recommend([small, large], max_latency_ms=10).reason.startswith("small: the only backbone within 10 ms")
    assert recommend([large], max_latency_ms=None).reason.startswith("large: the only backbone compared (0.950")


def test_the_served_variant_is_int8_only_where_it_passed_its_gate() -> None:
    gpu = result("gpu", [0.9], latency_ms=4, throughput=200)
    assert gpu.served_variant == "fp32" and gpu.served is gpu.fp32
    cpu = result("cpu", [0.9], latency_ms=4, throughput=200)
    cpu.int8, cpu.int8_check = Speed(2, 400), {"passed": True}
    assert cpu.served_variant == "int8" and cpu.served.throughput == 400
    cpu.int8_check = {"passed": False}
    assert cpu.served_variant == "fp32" and cpu.served.throughput == 200


def test_the_pareto_front_keeps_what_nothing_beats_on_both_axes() -> None:
    fast = result("fast", [0.80], latency_ms=5, throughput=300)
    middle = result("middle", [0.90], latency_ms=10, throughput=150)
    dominated = result("dominated", [0.85], latency_ms=12, throughput=120)
    best = result("best", [0.95], latency_ms=20, throughput=80)
    assert pareto_front([fast, middle, dominated, best]) == ["fast", "middle", "best"]


def test_learning_curve_scores_every_size_on_the_same_held_out_images() -> None:
    rng = np.random.default_rng(0)
    targets = np.repeat([0, 1], 40)
    # two overlapping clusters: more training images help, and the head never sees held-out ones
    embeddings = (rng.normal(size=(80, 16)) + 0.8 * targets[:, None]).astype(np.float32)
    val_idx = np.concatenate([np.arange(0, 10), np.arange(40, 50)])
    train_idx = np.setdiff1d(np.arange(80), val_idx)
    rows = learning_curve(embeddings, targets, train_idx, val_idx, ["a", "b"], sizes=(1, 2, 5, 10, 50), draws=4)
    assert [row["per_class"] for row in rows] == [1, 2, 5, 10, 30]  # 50 > 30 per class: only "all"
    assert [row["all"] for row in rows] == [False] * 4 + [True]
    assert all(len(row["accuracies"]) == 4 and 0 <= row["accuracy_mean"] <= 1 for row in rows)
    assert rows[0]["accuracy_std"] > 0  # one image per class: the draw matters
    assert rows[-1]["accuracy_mean"] > rows[0]["accuracy_mean"]


@pytest.mark.slow
def test_compare_every_backbone_on_a_small_subset(hymenoptera: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    data = make_subset(hymenoptera, tmp_path / "data", per_class=12)
    report = tmp_path / "report"
    args = ["compare", "--data", str(data), "--splits", "2", "--learning-curve", "--curve-draws", "2",
            "--timing-seconds", "0.2", "--timing-rounds", "2", "--report-dir", str(report)]
    assert main([*args, "--json"]) == 0
    out = last_json(capsys.readouterr().out)
    assert [r["backbone"] for r in out["results"]] == list(OFFLINE_BACKBONES)
    assert out["images"] == 24 and out["classes"] == ["ants", "bees"] and out["splits"] == 2
    assert out["timing_rounds"] == 2
    assert [row["input_size"] for row in out["results"]] == [224, 240, 260]
    for row in out["results"]:
        for key in ("head_accuracy", "head_macro_f1"):
            assert len(row[key]["values"]) == 2 and 0 <= row[key]["mean"] <= 1
        assert row["finetune_accuracy"] is None  # not asked for
        assert row["fp32"]["latency_ms"] > 0 and row["fp32"]["throughput"] > 0
        assert row["int8"]["throughput"] > 0 and row["int8_bytes"] < row["model_bytes"]  # a CPU host
        assert row["int8_check"]["check_images"] == 4 and row["served_variant"] in ("fp32", "int8")
        assert 3e6 < row["parameters"] < 7e6 and row["seconds"] > 0
        assert [point["per_class"] for point in row["learning_curve"]] == [1, 2, 5, 10]
    assert set(out["pareto_front"]) <= set(OFFLINE_BACKBONES) and out["pareto_front"]
    assert out["recommendation"]["backbone"] in OFFLINE_BACKBONES and out["recommendation"]["rule"]
    summary = Path(out["report"]).read_text()
    assert "**Recommendation**" in summary and "## Learning curve" in summary
    assert json.loads((report / "compare.json").read_text())["recommendation"] == out["recommendation"]
    assert_png(report / "accuracy_vs_throughput.png")
    assert_png(report / "learning_curve.png")

    # fine-tuning too (one backbone here: fit's tests fine-tune the others), for people: a table on
    # stdout, progress bars on stderr
    assert main(["compare", "--data", str(data), "--backbones", "efficientnet_lite0", "--splits", "2", "--finetune",
                 "--epochs", "1", "--timing-seconds", "0.2", "--report-dir", str(tmp_path / "plain")]) == 0
    printed = capsys.readouterr()
    (row,) = re.findall(r"^\| efficientnet_lite0 \| 224 \|.*$", printed.out, re.MULTILINE)
    assert row.count("±") == 4  # accuracy and macro F1, of the head and of fine-tuning
    assert "finetune accuracy" in printed.out and "recommendation: efficientnet_lite0" in printed.out
    bars = ("backbones", "embeddings", "head splits", "finetune epoch 1/1", "timing rounds")
    assert all(bar in printed.err for bar in bars)
    finetuned = json.loads((tmp_path / "plain" / "compare.json").read_text())["results"][0]
    assert len(finetuned["finetune_accuracy"]["values"]) == 2 and 0 <= finetuned["finetune_macro_f1"]["mean"] <= 1


@pytest.mark.parametrize("args,message", [
    (["--backbones", "resnet50"], "--backbones: unknown resnet50"),
    (["--splits", "0"], "--splits must be at least 1"),
    (["--val-fraction", "1.5"], "--val-fraction must be between 0 and 1"),
    (["--max-latency-ms", "0"], "--max-latency-ms must be a positive number of milliseconds"),
    (["--timing-seconds", "-1"], "--timing-seconds must be a positive number of seconds"),
])
def test_bad_compare_arguments_exit_2_and_say_what_to_fix(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["compare", "--data", str(tmp_path), *args, "--report-dir", str(tmp_path / "r")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_unusable_data_exits_2_and_says_why(hymenoptera: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing"
    assert main(["compare", "--data", str(missing), "--report-dir", str(tmp_path / "r")]) == 2
    assert f"{missing}: no such directory or CSV manifest" in capsys.readouterr().err
    one_class = make_subset(hymenoptera, tmp_path / "one", per_class=3)
    shutil.rmtree(one_class / "bees")
    assert main(["compare", "--data", str(one_class), "--backbones", "efficientnet_lite0",
                 "--report-dir", str(tmp_path / "r")]) == 2
    assert "only one class (ants); a classifier needs at least two" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
