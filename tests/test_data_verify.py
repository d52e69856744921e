"""detection/data/verify.py: the image check before a sweep, its cache, and the load summary.

Real files throughout: tiny JPEG/PNG/BMP images written with PIL, and copies of the real DeepForest export.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detection.config import ConfigError, DataConfig
from detection.data.coco import load_dataset
from detection.data.verify import (
    CACHE_FILE,
    PARALLEL_MIN,
    bad_images_error,
    check_dataset,
    check_fold_count,
    default_cache_path,
    format_summary,
    inspect_file,
    summarize,
    verify_images,
)


def write_image(path: Path, *, size=(32, 24), fmt: str | None = None, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, format=fmt)
    return path


def truncate(path: Path, keep: float = 1 / 3) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.fixture
def forest(tmp_path, deepforest_root) -> Path:
    """A private copy of the real DeepForest export (Roboflow folder: train/ valid/ test/)."""
    return Path(shutil.copytree(deepforest_root, tmp_path / "deepforest"))


def edit_json(root: Path, split: str, change) -> None:
    path = root / split / "_annotations.coco.json"
    coco = json.loads(path.read_text())
    change(coco)
    path.write_text(json.dumps(coco))


# ------------------------------------------------------------------------------------------- one file


@pytest.mark.parametrize("fmt, suffix", [("JPEG", "jpg"), ("PNG", "png")])
def test_good_file_header_facts_without_decode(tmp_path, fmt, suffix):
    facts = inspect_file(write_image(tmp_path / f"a.{suffix}", fmt=fmt))
    assert (facts.width, facts.height, facts.format, facts.problem) == (32, 24, fmt, None)
    assert not facts.decoded  # the end marker was there: no decode needed
    assert inspect_file(tmp_path / f"a.{suffix}", decode=True).decoded


@pytest.mark.parametrize("fmt, suffix, marker", [("JPEG", "jpg", "EOI"), ("PNG", "png", "IEND")])
def test_truncated_file_found_by_its_missing_end_marker(tmp_path, fmt, suffix, marker):
    path = write_image(tmp_path / f"a.{suffix}", size=(64, 64), fmt=fmt)
    truncate(path)
    facts = inspect_file(path)
    assert facts.problem.startswith(f"is truncated: no {fmt} end marker ({marker})"), facts.problem
    assert (facts.width, facts.height) == (64, 64)  # the header is intact


def test_jpeg_with_data_after_its_end_marker_is_good(tmp_path):
    # A phone's "motion photo" appends a video after the JPEG's EOI: no marker at the end, but it decodes.
    path = write_image(tmp_path / "motion.jpg", fmt="JPEG")
    path.write_bytes(path.read_bytes() + bytes(range(1, 200)))
    facts = inspect_file(path)
    assert facts.problem is None and facts.decoded


def test_empty_and_non_image_and_missing_files(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    assert inspect_file(tmp_path / "empty.jpg").problem == "is empty (0 bytes)"
    assert inspect_file(tmp_path / "text.jpg").problem == "is not an image PIL can identify (12 bytes)"
    assert inspect_file(tmp_path / "gone.jpg").problem == "does not exist"


def test_decode_mode_finds_what_a_format_without_end_marker_hides(tmp_path):
    path = write_image(tmp_path / "a.bmp", size=(64, 64), fmt="BMP")
    truncate(path, keep=0.5)
    assert inspect_file(path).problem is None  # BMP has no end marker: the header check cannot tell
    problem = inspect_file(path, decode=True).problem
    assert problem is not None and "decoding it fails" in problem


# ------------------------------------------------------------------------------------ a real dataset


def test_real_export_is_clean_and_lists_every_bad_file(forest):
    index = load_dataset(forest, filter_empty=False)
    clean = verify_images(index.images, mode="header", cache_path=None)
    assert clean.bad == () and clean.images == clean.inspected == len(index)

    truncated, empty, resized = index.images[0], index.images[5], index.images[-1]
    truncate(truncated.path)
    empty.path.write_bytes(b"")
    split, original_id = resized.source.split("/")[0], int(resized.source.rsplit("#", 1)[1])
    edit_json(forest, split, lambda coco: [im.update(width=im["width"] + 1) for im in coco["images"]
                                           if im["id"] == original_id])
    index = load_dataset(forest, filter_empty=False)
    report = verify_images(index.images, mode="header", cache_path=None)
    assert [b.image_id for b in report.bad] == [truncated.image_id, empty.image_id, resized.image_id]
    reasons = [b.reason for b in report.bad]
    assert reasons[0].startswith("is truncated: no PNG end marker (IEND)")  # the export writes PNG tiles
    assert reasons[1] == "is empty (0 bytes)"
    assert reasons[2] == (f"is {resized.width}x{resized.height} (WxH), but the annotation file says "
                          f"{resized.width + 1}x{resized.height}")
    assert report.excluded == {b.image_id: b.reason for b in report.bad}

    message = str(bad_images_error(report, dataset=forest))
    assert f"3 of {len(index)} image files are bad" in message and "data.on_bad_image: skip" in message
    for bad in report.bad:  # every file named, with where the JSON names it
        assert f"{bad.source}: image id {bad.image_id}: {bad.file} {bad.reason}" in message


def test_cache_answers_a_second_check_and_follows_changes(forest):
    index = load_dataset(forest, filter_empty=False)
    cache = default_cache_path(index.root)
    assert cache == forest / CACHE_FILE  # beside the dataset when it is writable

    first = verify_images(index.images, mode="header", cache_path=cache)
    assert (first.inspected, first.cached) == (len(index), 0) and cache.is_file()
    second = verify_images(index.images, mode="header", cache_path=cache)
    assert (second.inspected, second.cached, second.bad) == (0, len(index), ())

    # A file rewritten (size and mtime change) is read again; the others still come from the cache.
    changed = index.images[3].path
    truncate(changed)
    third = verify_images(index.images, mode="header", cache_path=cache)
    assert (third.inspected, third.cached) == (1, len(index) - 1)
    assert [b.image_id for b in third.bad] == [3]

    # The cache holds facts about files, not verdicts: a corrected annotation file is judged afresh.
    record = index.images[7]
    split, original_id = record.source.split("/")[0], int(record.source.rsplit("#", 1)[1])
    edit_json(forest, split, lambda coco: [im.update(height=im["height"] * 2) for im in coco["images"]
                                           if im["id"] == original_id])
    fourth = verify_images(load_dataset(forest, filter_empty=False).images, mode="header", cache_path=cache)
    assert fourth.inspected == 0 and [b.image_id for b in fourth.bad] == [3, 7]

    # A full decode is not answered by header-only entries, but by its own afterwards.
    decoded = verify_images(index.images, mode="decode", cache_path=cache)
    assert decoded.inspected == len(index) - 1  # the truncated file's problem is already known
    assert verify_images(index.images, mode="decode", cache_path=cache).inspected == 0


def test_read_only_dataset_caches_in_the_fallback_folder():
    # A dataset folder the sweep's user cannot write. Root may write anywhere, so when the tests run as root
    # the check runs in a forked process that dropped to the unprivileged user `nobody`, as a user's sweep
    # would run (fork: the code is already loaded, nothing is read from root's home).
    import multiprocessing
    import tempfile

    top = Path(tempfile.mkdtemp(prefix="detsweep-ro-", dir="/tmp"))  # a folder every user may enter
    os.chmod(top, 0o755)
    data, writable_data, experiment = top / "data", top / "writable", top / "experiment"
    data.mkdir()
    writable_data.mkdir()
    os.chmod(data, 0o555)
    os.chmod(writable_data, 0o777)
    answers = multiprocessing.get_context("fork").Queue()

    def check() -> None:
        if os.geteuid() == 0:
            os.setgid(65534)
            os.setuid(65534)
        answers.put((str(default_cache_path(data, experiment)), str(default_cache_path(writable_data, experiment))))

    try:
        child = multiprocessing.get_context("fork").Process(target=check)
        child.start()
        read_only_cache, writable_cache = answers.get(timeout=60)
        child.join(timeout=60)
    finally:
        os.chmod(data, 0o755)
        shutil.rmtree(top)
    assert child.exitcode == 0
    assert read_only_cache == str(experiment / CACHE_FILE)  # the experiment folder takes the cache
    assert writable_cache == str(writable_data / CACHE_FILE)  # the same user beside a writable dataset


def test_parallel_check_equals_serial(tmp_path, coco_writer):
    path = coco_writer(tmp_path / "many", [(16, 12, [(1, 1, 5, 5, 1)])] * (PARALLEL_MIN + 10))
    index = load_dataset(path)
    truncate(index.images[-1].path)
    serial = verify_images(index.images, mode="header", cache_path=None, workers=1)
    parallel = verify_images(index.images, mode="header", cache_path=None, workers=2)
    assert parallel.bad == serial.bad and [b.image_id for b in serial.bad] == [len(index) - 1]


# --------------------------------------------------------------------------------- summary and policy


def test_summary_counts_dropped_boxes_by_reason(tmp_path, coco_writer):
    path = coco_writer(tmp_path, [
        (50, 40, [(-5, 10, 20, 100, 1),  # reaches outside: clipped to [0, 10, 15, 40], kept
                  (5, 5, -10, 10, 1),  # negative width: dropped
                  (5, 5, 10, -3, 2),  # negative height: dropped
                  (5, 5, 0, 10, 2),  # zero width: dropped
                  (60, 5, 10, 10, 1),  # starts right of the image: nothing left after clipping, dropped
                  (1, 1, 4, 4, 2)]),  # inside: kept
        (20, 20, []),  # no boxes
    ])
    index = load_dataset(path, filter_empty=False)
    stats = index.box_stats
    assert (stats.kept, stats.clipped) == (2, 1)
    assert stats.dropped == {"negative width or height": 2, "outside the image": 1, "zero width or height": 1}
    report = verify_images(index.images, mode="header", cache_path=None)
    summary = summarize(index, report, path=path)
    assert summary["images"] == 2 and summary["images_without_boxes"] == 1 and summary["bad_images"] == []
    line = format_summary(summary)
    assert line.startswith(f"{path}: 2 images (1 without boxes), 2 boxes kept (1 clipped to the image), 4 dropped "
                           "(2 negative width or height, 1 outside the image, 1 zero width or height), "
                           "0 bad image files (header check: 2 read, 0 cached"), line


def test_check_dataset_error_or_skip(forest, caplog):
    index = load_dataset(forest, filter_empty=False)
    truncate(index.images[2].path)
    with pytest.raises(Exception) as raised:
        check_dataset(index, mode="header", on_bad_image="error", cache_path=None, path=forest)
    assert type(raised.value).__name__ == "DatasetError" and str(index.images[2].path) in str(raised.value)
    with caplog.at_level("INFO", logger="detection.data.verify"):
        report, summary = check_dataset(index, mode="header", on_bad_image="skip", cache_path=None, path=forest)
    assert report.excluded.keys() == {2} and summary["bad_images"][0]["image_id"] == 2
    assert "1 bad image files" in caplog.text and "Leaving 1 bad image files out" in caplog.text


def test_fold_count_against_available_images(forest):
    index = load_dataset(forest, filter_empty=False)
    in_train = sum(1 for r in index.images if r.split == "train")  # valid/ is selection, test/ is test
    assert check_fold_count(index, num_folds=2, selection_fraction=0.15, test_fraction=0.15) == in_train
    with pytest.raises(ConfigError) as raised:
        check_fold_count(index, num_folds=in_train + 1, selection_fraction=0.15, test_fraction=0.15,
                         exclude={0: "is empty (0 bytes)"}, where="sweep.yaml")
    message = str(raised.value)
    assert message.startswith(f"sweep.yaml: `data.num_folds` = {in_train + 1} needs at least {in_train + 1} images")
    assert f"only {in_train - 1} of the {len(index) - 1} images and 1 bad files left out" in message
    assert "selection" in message and "(the valid/ folder)" in message and "(the test/ folder)" in message


def test_fold_count_names_the_held_out_shares(tmp_path, coco_writer):
    path = coco_writer(tmp_path, [(16, 16, [(1, 1, 4, 4, 1)])] * 10)
    index = load_dataset(path)
    # 10 images: selection round(0.2 * 10) = 2, test round(0.3 * 10) = 3, 5 left for the folds.
    assert check_fold_count(index, num_folds=5, selection_fraction=0.2, test_fraction=0.3) == 5
    with pytest.raises(ConfigError, match=r"only 5 of the 10 images remain after the held-out parts: selection 2 "
                                          r"\(`data.selection_fraction` = 0.2\), test 3 \(`data.test_fraction` = 0.3\)"):
        check_fold_count(index, num_folds=6, selection_fraction=0.2, test_fraction=0.3)


@pytest.mark.parametrize("key, value", [("verify", "full"), ("on_bad_image", "ignore")])
def test_config_keys_are_validated(key, value):
    with pytest.raises(ConfigError, match=rf"`data.{key}` must be one of"):
        DataConfig(**{key: value}).validate("x.yaml")
    DataConfig(verify="decode", on_bad_image="skip").validate("x.yaml")
