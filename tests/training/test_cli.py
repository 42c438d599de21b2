"""``training/cli.py`` (``python -m training``), end to end through the command line: marked slow,
fit on real photos (held-out accuracy, the registered version), evaluate, list, import, bad data,
and a bootstrap that finds a model; at unit level, ``quantize`` on a tiny real ONNX model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from store.local.registry import DirectoryRegistry
from store.state import open_state
from tests.support.cli import last_json
from tests.support.corruptions import corrupt_bytes
from tests.support.images import jpeg_files, make_subset
from tests.support.paths import ROOT
from tests.support.server import subprocess_env
from training.cli import main


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory, hymenoptera: Path):
    """A head fit on 40 photos per class, plus one junk file, through `python -m training`."""
    root = tmp_path_factory.mktemp("fit")
    data = make_subset(hymenoptera, root / "data", per_class=40)
    (data / "bees" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    home = root / "home"
    out = subprocess.run(
        [sys.executable, "-m", "training", "fit", "--data", str(data), "--strategy", "head",
         "--seed", "3", "--json"],
        cwd=ROOT, env=subprocess_env(home), capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "embeddings" in out.stderr  # a progress bar for people
    return home, data, last_json(out.stdout)


@pytest.mark.slow
def test_head_fit_registers_an_accurate_verified_version(fitted) -> None:
    home, _, result = fitted
    assert result["version"] == "v1" and result["active"] is True  # first version: active
    assert result["metrics"]["accuracy"] >= 0.85
    assert result["metrics"]["n"] == 16  # 20% of 40 per class held out
    version = open_state(home=home).registry.get("v1")
    version.verify()
    assert version.spec.labels == ("ants", "bees")
    details = version.info["details"]
    assert details["skipped_files"] == 1 and "broken.jpg" in details["skipped"][0]
    assert details["onnx_parity"]["max_logit_diff"] < 1e-4
    assert details["onnx_parity"]["exporter"] == "dynamo"  # the fast graph: the head written into it
    embeddings, targets = version.training_embeddings()
    assert embeddings.shape == (80, 1280) and sorted(set(targets.tolist())) == [0, 1]
    assert len(set(version.training_hashes())) == 80  # content hashes: GET /admin/labels uses them
    for name in ("report.json", "report.md", "confusion_matrix.png", "training_curves.png"):
        assert (version.report_dir / name).stat().st_size > 100


@pytest.mark.slow
def test_evaluate_any_version_on_another_folder(fitted, hymenoptera: Path, tmp_path: Path, capsys) -> None:
    home, _, _ = fitted
    unseen = make_subset(hymenoptera, tmp_path / "unseen", per_class=15, offset=60)
    assert main(["--home", str(home), "evaluate", "--version", "v1", "--data", str(unseen), "--json"]) == 0
    metrics = last_json(capsys.readouterr().out)
    assert metrics["n"] == 30 and metrics["accuracy"] >= 0.8
    assert set(metrics["per_class"]) == {"ants", "bees"}
    assert sum(map(sum, metrics["confusion_matrix"])) == 30


@pytest.mark.slow
def test_models_lists_versions_and_the_active_one(fitted, capsys) -> None:
    home, _, _ = fitted
    assert main(["--home", str(home), "models", "--json"]) == 0
    listing = last_json(capsys.readouterr().out)
    assert listing["active"] == "v1"
    assert listing["versions"][0]["metrics"]["accuracy"] >= 0.85


@pytest.mark.slow
def test_evaluate_refuses_labels_the_version_does_not_know(fitted, hymenoptera: Path, tmp_path: Path, capsys) -> None:
    home, _, _ = fitted
    data = tmp_path / "wasps"
    (data / "wasps").mkdir(parents=True)
    shutil.copy(jpeg_files(hymenoptera, "bees")[0], data / "wasps")
    assert main(["--home", str(home), "evaluate", "--version", "v1", "--data", str(data)]) == 2
    assert "unknown to version v1: wasps" in capsys.readouterr().err
    assert main(["--home", str(home), "evaluate", "--version", "v7", "--data", str(data)]) == 2
    assert "no model version 'v7'" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("layout", [{}, {"ants": 3}, {"ants": 3, "bees": 1}])
def test_untrainable_data_exits_2_and_registers_nothing(layout, hymenoptera: Path, tmp_path: Path, capsys) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for label, n in layout.items():
        (data / label).mkdir()
        for photo in jpeg_files(hymenoptera, label)[:n]:
            shutil.copy(photo, data / label)
    home = tmp_path / "home"
    assert main(["--home", str(home), "fit", "--data", str(data)]) == 2
    assert "\nerror: " in "\n" + capsys.readouterr().err
    assert open_state(home=home).registry.versions() == []


@pytest.mark.slow
def test_finetune_strategy_completes(hymenoptera: Path, tmp_path: Path, capsys) -> None:
    data = make_subset(hymenoptera, tmp_path / "data", per_class=10)
    home = tmp_path / "home"
    code = main(["--home", str(home), "fit", "--data", str(data), "--strategy", "finetune",
                 "--epochs", "1", "--json"])
    assert code == 0
    result = last_json(capsys.readouterr().out)
    version = open_state(home=home).registry.get(result["version"])
    assert version.info["details"]["strategy"] == "finetune"
    assert version.info["details"]["epochs"] == 1
    assert version.info["details"]["onnx_parity"]["exporter"] == "dynamo"
    report = json.loads((version.report_dir / "report.json").read_text())
    assert [row["epoch"] for row in report["history"]] == [1.0]


@pytest.mark.slow
def test_import_cli_adds_a_folder_to_the_label_store(hymenoptera: Path, tmp_path: Path, capsys) -> None:

    data = make_subset(hymenoptera, tmp_path / "data", per_class=3)
    (data / "bees" / "junk.jpg").write_bytes(b"not an image")
    home = tmp_path / "home"
    assert main(["--home", str(home), "import", "--data", str(data), "--json"]) == 0
    summary = last_json(capsys.readouterr().out)
    assert summary["stored"] == 6 and summary["skipped"] == 1 and "junk.jpg" in summary["skipped_files"][0]["path"]
    assert open_state(home=home).labels.counts() == {"ants": 3, "bees": 3}
    assert main(["--home", str(home), "import", "--data", str(data), "--json"]) == 0
    assert last_json(capsys.readouterr().out)["unchanged"] == 6


@pytest.mark.slow
def test_bootstrap_cli_is_a_no_op_when_a_model_exists(bootstrapped_home: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "training", "bootstrap", "--json"],
        cwd=ROOT, env=subprocess_env(bootstrapped_home), capture_output=True, text=True, check=True,
    )
    result = last_json(out.stdout)
    assert result == {"version": None, "active": "v1", "created": False}
    assert [v.version for v in open_state(home=bootstrapped_home).registry.versions()] == ["v1"]


# -- the command line -------------------------------------------------------------------------


def test_cli_quantize(grey_version: tuple[DirectoryRegistry, Path], capsys: pytest.CaptureFixture[str]) -> None:
    registry, folder = grey_version
    home = str(registry.home)
    assert main(["--home", home, "models", "--json"]) == 0
    assert last_json(capsys.readouterr().out)["versions"][0]["int8"] is False
    assert main(["--home", home, "quantize", "--version", "v9", "--data", str(folder)]) == 2
    assert "no model version 'v9'" in capsys.readouterr().err
    assert main(["--home", home, "quantize", "--version", "v1", "--data", str(folder),
                     "--calibration-images", "0"]) == 2
    assert "--calibration-images must be at least 1" in capsys.readouterr().err
    assert main(["--home", home, "quantize", "--version", "v1", "--data", str(folder),
                     "--calibration-images", "4", "--json"]) == 0
    figures = last_json(capsys.readouterr().out)
    assert figures["version"] == "v1" and figures["calibration_images"] == 4 and figures["check_images"] == 4
    assert main(["--home", home, "quantize", "--version", "v1", "--data", str(folder)]) == 1
    assert "already has an INT8 variant" in capsys.readouterr().err
    assert main(["--home", home, "models", "--json"]) == 0
    [row] = last_json(capsys.readouterr().out)["versions"]
    assert row["version"] == "v1" and row["int8"] is True


# -- adapt (after the tests above: it registers versions in the fitted home) ----------------------

def blurred_folder(hymenoptera: Path, root: Path, *, per_class: int, offset: int, labelled: bool) -> Path:
    """Blurred photos the fit did not see: in class subfolders (labelled) or all in one folder."""
    for label in ("ants", "bees"):
        folder = root / label if labelled else root
        folder.mkdir(parents=True, exist_ok=True)
        for photo in jpeg_files(hymenoptera, label)[offset:offset + per_class]:
            blurred = corrupt_bytes(photo.read_bytes(), "blur", "strong", fmt="JPEG")
            (folder / f"{label}-{photo.name}").write_bytes(blurred)
    return root


@pytest.mark.slow
def test_adapt_registers_a_version_live_only_when_labelled_images_of_the_domain_judge_it(
    fitted, hymenoptera: Path, tmp_path: Path, capsys
) -> None:
    home, _, _ = fitted
    unlabelled = blurred_folder(hymenoptera, tmp_path / "unlabelled", per_class=20, offset=100, labelled=False)
    labelled = blurred_folder(hymenoptera, tmp_path / "labelled", per_class=15, offset=60, labelled=True)
    active = open_state(home=home).registry.active_version()

    assert main(["--home", str(home), "adapt", "--version", "v1", "--data", str(unlabelled), "--json"]) == 0
    unjudged = last_json(capsys.readouterr().out)
    assert unjudged["active"] is False and unjudged["metrics"]["target_images"] == 40
    assert "no labelled target images to compare on" in unjudged["metrics"]["gate"]
    assert open_state(home=home).registry.active_version() == active

    # any accuracy passes (tolerance 1): this checks what the gate was told
    assert main(["--home", str(home), "adapt", "--version", "v1", "--data", str(unlabelled), "--labelled",
                 str(labelled), "--tolerance", "1", "--json"]) == 0
    judged = last_json(capsys.readouterr().out)
    assert judged["active"] is True and judged["metrics"]["candidate"]["judged_on"] == 30
    assert judged["metrics"]["embeddings_cached"] == 40  # the first run computed the target's
    version = open_state(home=home).registry.get(judged["version"])
    assert version.info["parent"] == "v1" and version.info["details"]["strategy"] == "adapt-diagonal"
    assert version.info["details"]["target"]["images"] == 40


@pytest.mark.slow
def test_adapt_refuses_bad_input_with_exit_2_and_the_reason(fitted, hymenoptera: Path, tmp_path: Path,
                                                           capsys) -> None:
    home, _, _ = fitted
    few = blurred_folder(hymenoptera, tmp_path / "few", per_class=3, offset=100, labelled=False)
    (few / "notes.txt").write_text("not an image")  # skipped, with a warning
    cases = [
        (["--version", "v1", "--data", str(few)], "6 unlabelled image(s) of the new domain; adaptation needs at least"),
        (["--version", "v1", "--data", str(tmp_path / "missing")], "is not a folder of images"),
        (["--version", "v9", "--data", str(few)], "no model version 'v9'"),
        (["--version", "v1", "--data", str(few), "--tolerance", "2"], "--tolerance must be between 0 and 1"),
    ]
    versions = len(open_state(home=home).registry.versions())
    for args, reason in cases:
        assert main(["--home", str(home), "adapt", *args]) == 2, args
        assert reason in capsys.readouterr().err, args
    assert len(open_state(home=home).registry.versions()) == versions  # nothing registered
