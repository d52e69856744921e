"""`detsweep predict`: the best ensemble of a real finished sweep on image files and folders."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from pycocotools.coco import COCO
from torchvision.ops import box_iou

from detection.data.coco import load_dataset
from detection.metrics import detection_metrics
from search.cli import main as cli_main
from search.ensemble_models import predictions_from_coco
from search.predict import (
    PredictError,
    collect_images,
    images_file,
    predict_images,
    read_image_file,
    write_predictions,
)


def _test_files(experiment: Path) -> tuple[list[Path], list[int]]:
    """(test-split image files, their dataset ids) of the sweep."""
    config = yaml.safe_load((experiment / "sweep.yaml").read_text())
    index = load_dataset(config["data"]["path"], filter_empty=False)  # the ids the sweep split (split.json)
    test = json.loads((experiment / "split.json").read_text())["test"]
    return [index.by_id(i).path for i in test], test


def _read(out: Path) -> tuple[list[dict], dict]:
    """(the COCO results list `out`, the images file beside it: a COCO dataset dict)."""
    results, images = json.loads(out.read_text()), json.loads(images_file(out).read_text())
    assert isinstance(results, list) and all(set(r) == {"image_id", "category_id", "bbox", "score"} for r in results)
    assert images["annotations"] == [] and images["info"]["results"] == str(out.resolve())
    return results, images


def _coco_with_results(out: Path) -> tuple[COCO, COCO]:
    """pycocotools reads both files as they are: (`COCO(images file)`, `.loadRes(results file)`)."""
    gt = COCO(str(images_file(out)))
    return gt, gt.loadRes(str(out))


@pytest.mark.slow
def test_predict_files_and_folders_skipping_unreadable(finished_sweep: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    files, _ = _test_files(finished_sweep)
    folder = tmp_path / "photos"
    (folder / "nested").mkdir(parents=True)
    shutil.copy(files[0], folder / "nested" / "a.png")
    shutil.copy(files[1], folder / "b.PNG")  # suffixes match in any case
    (folder / "notes.txt").write_text("not an image, and not picked up from a folder")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n this is no image")
    missing = tmp_path / "missing.jpg"
    out, drawn = tmp_path / "preds.json", tmp_path / "drawn"
    # The fixture's models are 2 epochs old, and the threshold their selection split chose can lie above every
    # test box; a copy of the manifest cuts at the median score of the saved test predictions, so that boxes
    # are both written and left out.
    best = json.loads((finished_sweep / "best_ensemble.json").read_text())
    saved = json.loads((finished_sweep / "ensemble" / "test.json").read_text())["predictions"]
    scores = sorted(p["score"] for p in saved)
    assert scores, "the chosen ensemble predicted no test box at all"
    best["score_threshold"] = scores[len(scores) // 2]
    manifest = tmp_path / "best_ensemble.json"  # model paths are absolute: they still point at the sweep's
    manifest.write_text(json.dumps(best))

    code = cli_main(["predict", "--ensemble", str(manifest), str(files[0]),
                     str(broken), str(folder), str(missing), "--out", str(out), "--draw", str(drawn),
                     "--device", "cpu"])
    assert code == 0
    captured = capsys.readouterr()
    assert f"skipping {broken}" in captured.err and f"skipping {missing}" in captured.err
    assert "3 images" in captured.out and "2 unreadable image(s) skipped" in captured.out

    results, data = _read(out)
    assert images_file(out) == tmp_path / "preds.images.json"
    assert [image["file_name"] for image in data["images"]] == [
        str(files[0].resolve()), str((folder / "b.PNG").resolve()), str((folder / "nested" / "a.png").resolve())]
    assert [image["id"] for image in data["images"]] == [1, 2, 3]
    assert all((image["width"], image["height"]) == Image.open(image["file_name"]).size for image in data["images"])
    assert [s["file"] for s in data["skipped"]] == [str(broken), str(missing)]
    # The dataset's original COCO category ids (DeepForest: 1 Tree, 2 Dead, 3 Alive; 0 is the dataset name).
    assert data["categories"] == [{"id": 1, "name": "Tree"}, {"id": 2, "name": "Dead"}, {"id": 3, "name": "Alive"}]

    assert data["info"]["score_threshold"] == best["score_threshold"]  # boxes below the ensemble's cut are left out
    assert data["info"]["ensemble_name"] == best["name"] and data["info"]["num_models"] == len(best["models"])
    assert data["info"]["detectors"] == sorted({f"{m['arch']}/{m['backbone']}" for m in best["models"]})
    assert len(results) > 0 and all(r["score"] >= best["score_threshold"] for r in results)
    gt, loaded = _coco_with_results(out)
    assert len(loaded.getAnnIds()) == len(results)
    assert set(loaded.getImgIds()) <= {1, 2, 3}
    assert set(loaded.getCatIds()) <= {1, 2, 3}
    for ann in loaded.loadAnns(loaded.getAnnIds()):
        x, y, w, h = ann["bbox"]
        image = gt.imgs[ann["image_id"]]
        assert w > 0 and h > 0 and x >= -1e-3 and y >= -1e-3
        assert x + w <= image["width"] + 1e-3 and y + h <= image["height"] + 1e-3
        assert ann["area"] == pytest.approx(w * h, rel=1e-6) and 0.0 <= ann["score"] <= 1.0
    # The same file twice gives the same boxes (images 1 and 3 are one file).
    by_image = {i: sorted((a["category_id"], *np.round(a["bbox"], 3), round(a["score"], 5))
                          for a in results if a["image_id"] == i) for i in (1, 3)}
    assert by_image[1] == by_image[3]

    assert sorted(p.name for p in drawn.iterdir()) == sorted([files[0].with_suffix(".png").name, "a.png", "b.png"])
    assert all(Image.open(p).size == Image.open(files[0]).size for p in drawn.iterdir())


@pytest.mark.slow
def test_predict_matches_the_ensemble_jobs_test_predictions(finished_sweep: Path, tmp_path: Path) -> None:
    """Same models, same fusion, same pixels: predict reproduces the ensemble job's fused test-split boxes of
    the chosen ensemble (ensemble/test.json) and its test figures (best_ensemble.json `test_metrics`)."""
    best = json.loads((finished_sweep / "best_ensemble.json").read_text())
    files, test = _test_files(finished_sweep)
    assert files and best["test_metrics"] is not None
    # On as many torch threads as the job's Ray task had (`ensemble.cpus`): another thread count gives other
    # float noise, which reorders boxes of equal score, and WBF's clusters (hence a box more or less) depend
    # on that order.
    job_threads = max(1, int(yaml.safe_load((finished_sweep / "sweep.yaml").read_text())["ensemble"]["cpus"]))
    threads = torch.get_num_threads()
    torch.set_num_threads(job_threads)
    try:
        summary = predict_images(finished_sweep / "best_ensemble.json", files, out=tmp_path / "p.json", device="cpu",
                                 score_threshold=0.0)  # every fused box, as the ensemble job ranks them
    finally:
        torch.set_num_threads(threads)
    assert summary.num_images == len(files) and summary.skipped == [] and summary.score_threshold == 0.0
    results, data = _read(summary.out)
    ours = predictions_from_coco(results, [image["id"] for image in data["images"]], best["category_ids"])
    job = json.loads((finished_sweep / "ensemble" / "test.json").read_text())
    assert job["split"] == "test" and job["image_ids"] == test and job["name"] == best["name"]
    assert job["metrics"] == best["test_metrics"]
    theirs = predictions_from_coco(job["predictions"], test, best["category_ids"])
    assert sum(len(p["boxes"]) for p in theirs) > 0
    twins = total = 0
    for mine, reference in zip(ours, theirs):
        assert len(mine["boxes"]) == len(reference["boxes"])
        torch.testing.assert_close(mine["scores"].sort().values, reference["scores"].sort().values, atol=1e-4, rtol=0)
        # Boxes of equal score may come in either order, and WBF's clusters depend on that order when
        # float noise of another thread count reorders ties: nearly every box has its twin (same label,
        # IoU > 0.99), and the metrics agree.
        iou = box_iou(mine["boxes"], reference["boxes"])  # [N, N]
        iou[mine["labels"][:, None] != reference["labels"][None, :]] = 0.0
        twins += int((iou.max(dim=1).values > 0.99).sum()) if len(iou) else 0
        total += len(iou)
    assert twins >= 0.98 * total
    index = load_dataset(yaml.safe_load((finished_sweep / "sweep.yaml").read_text())["data"]["path"],
                         filter_empty=False)
    targets = [{"boxes": torch.as_tensor(r.boxes), "labels": torch.as_tensor(r.labels),
                "iscrowd": torch.as_tensor(r.iscrowd)} for r in index.records(test)]
    metrics = detection_metrics(ours, targets, score_threshold=best["score_threshold"], class_names=best["class_names"])
    for key in ("map", "map_50", "f1", "score"):
        assert metrics[key] == pytest.approx(best["test_metrics"][key], abs=2e-3), key


@pytest.mark.slow
def test_predict_with_only_unreadable_images_writes_an_empty_result(finished_sweep: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "x.jpg"
    broken.write_text("plain text")
    out = tmp_path / "preds.json"
    code = cli_main(["predict", "--ensemble", str(finished_sweep / "best_ensemble.json"), str(broken),
                     "--out", str(out)])
    assert code == 1  # nothing predicted
    assert f"skipping {broken}" in capsys.readouterr().err
    results, data = _read(out)
    assert results == [] and data["images"] == [] and len(data["skipped"]) == 1


def test_empty_folder_is_an_error_before_any_model_loads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(PredictError, match=re.escape(str(tmp_path / "empty"))):
        collect_images([tmp_path / "empty"])
    # The ensemble file does not even exist: the inputs are checked first.
    code = cli_main(["predict", "--ensemble", str(tmp_path / "nope.json"), str(tmp_path / "empty"),
                     "--out", str(tmp_path / "p.json")])
    assert code == 2
    assert "No image files" in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()


def test_missing_ensemble_manifest_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(image)
    code = cli_main(["predict", "--ensemble", str(tmp_path / "nope.json"), str(image), "--out", str(tmp_path / "p")])
    assert code == 2
    assert str(tmp_path / "nope.json") in capsys.readouterr().err


def test_read_image_file_converts_to_rgb_and_names_bad_files(tmp_path: Path) -> None:
    gray = tmp_path / "gray.png"
    Image.fromarray(np.full((5, 7), 200, dtype=np.uint8)).save(gray)
    array = read_image_file(gray)
    assert array.shape == (5, 7, 3) and array.dtype == np.uint8 and (array == 200).all()
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"")
    with pytest.raises(PredictError, match=re.escape(str(bad))):
        read_image_file(bad)


def test_results_file_is_what_pycocotools_loadres_reads(tmp_path: Path) -> None:
    # The writer predict_images uses: a results list in preds.json, the images beside it in preds.images.json.
    import torch as _torch

    from search.ensemble_models import predictions_to_coco

    preds = [{"boxes": _torch.tensor([[10.0, 20.0, 50.0, 60.0], [0.0, 0.0, 5.5, 4.0]]), "scores": _torch.tensor([0.9, 0.4]),
              "labels": _torch.tensor([1, 2])},
             {"boxes": _torch.zeros(0, 4), "scores": _torch.zeros(0), "labels": _torch.zeros(0, dtype=_torch.int64)}]
    results = predictions_to_coco(preds, [1, 2], category_ids=[7, 3])  # labels 1, 2 -> COCO ids 7, 3
    out = tmp_path / "preds.json"
    written = write_predictions(
        out, results=results, info={"score_threshold": 0.3},
        images=[{"id": 1, "file_name": "/x/a.png", "width": 80, "height": 70},
                {"id": 2, "file_name": "/x/b.png", "width": 30, "height": 30}],
        categories=[{"id": 7, "name": "Tree"}, {"id": 3, "name": "Dead"}], skipped=[("/x/c.png", "no such file")])
    assert written == tmp_path / "preds.images.json" == images_file(out)
    assert json.loads(out.read_text()) == [
        {"image_id": 1, "category_id": 7, "bbox": [10.0, 20.0, 40.0, 40.0], "score": pytest.approx(0.9)},
        {"image_id": 1, "category_id": 3, "bbox": [0.0, 0.0, 5.5, 4.0], "score": pytest.approx(0.4)}]
    gt, loaded = _coco_with_results(out)
    assert sorted(gt.getImgIds()) == [1, 2] and sorted(gt.getCatIds()) == [3, 7]
    anns = loaded.loadAnns(loaded.getAnnIds(imgIds=[1]))
    # loadRes adds id, area (w * h = 40 * 40 and 5.5 * 4) and iscrowd 0 itself
    assert [(a["category_id"], a["area"], a["iscrowd"]) for a in anns] == [(7, 1600.0, 0), (3, 22.0, 0)]
    assert json.loads(written.read_text())["skipped"] == [{"file": "/x/c.png", "error": "no such file"}]
    assert images_file(tmp_path / "out" / "run.json") == tmp_path / "out" / "run.images.json"
