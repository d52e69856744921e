"""The DeepForest writer: real photos cut into tiles, written as a loadable Roboflow-style COCO folder."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from detection.data.coco import DatasetError, load_dataset
from detection.data.deepforest import (
    INSTALL_HINT,
    DeepForestNotInstalledError,
    cut_tiles,
    deepforest_data_dir,
    read_voc,
    tile_origins,
    write_deepforest_coco,
)


def test_writes_a_loadable_roboflow_folder(deepforest_root, deepforest_index):
    for split in ("train", "valid", "test"):
        coco = json.loads((deepforest_root / split / "_annotations.coco.json").read_text())
        assert coco["categories"][0] == {"id": 0, "name": "deepforest-trees", "supercategory": "none"}
        assert [c["name"] for c in coco["categories"][1:]] == ["Tree", "Dead", "Alive"]
    assert deepforest_index.class_names == ("Tree", "Dead", "Alive") and deepforest_index.category_ids == (1, 2, 3)
    summary = deepforest_index.summary()
    # 951 boxes on 4 photos -> 45 tiles of 400 px (4 + 9 + 32 after edge strips < 100 px and empty tiles
    # are left out) holding 810 whole boxes; all 28 Dead and 9 Alive are on the single SOAP_061 tile
    assert summary["images"] == 45 and summary["boxes"] == 810
    assert summary["boxes_per_class"] == {"Tree": 773, "Dead": 28, "Alive": 9}
    assert summary["images_per_split"] == {"train": 31, "valid": 7, "test": 7}  # 15% of 45 = 6.75 -> 7 each
    alive = [r for r in deepforest_index.images if 3 in r.labels]
    assert len(alive) == 1 and alive[0].split == "train"
    for record in deepforest_index.images:
        assert (record.width, record.height) == (400, 400)
        assert len(record.boxes) > 0 and np.all(record.boxes >= 0) and np.all(record.boxes <= 400)
    assert "train: 31 images" in (deepforest_root / "README.dataset.txt").read_text()


def test_tiles_hold_the_real_pixels(deepforest_index):
    record = next(r for r in deepforest_index.images if r.path.name.startswith("OSBS_029"))
    tile = np.asarray(Image.open(record.path))
    photo = np.asarray(Image.open(deepforest_data_dir() / "OSBS_029.png").convert("RGB"))
    np.testing.assert_array_equal(tile, photo)  # a 400 px photo is its own tile
    _, boxes, labels = read_voc(deepforest_data_dir() / "OSBS_029.xml")
    assert len(boxes) == 61 and set(labels) == {"Tree"}
    assert len(record.boxes) == 61  # every box lies inside


def _tiles_by_name(root):
    """file name -> (split, [(category_id, bbox), ...]) over all three splits."""
    tiles = {}
    for split in ("train", "valid", "test"):
        coco = json.loads((root / split / "_annotations.coco.json").read_text())
        boxes = {image["id"]: [] for image in coco["images"]}
        for a in coco["annotations"]:
            boxes[a["image_id"]].append((a["category_id"], a["bbox"]))
        tiles.update({image["file_name"]: (split, boxes[image["id"]]) for image in coco["images"]})
    return tiles


def test_seed_moves_tiles_between_splits_and_nothing_else(tmp_path, deepforest_root):
    seed0, seed1 = _tiles_by_name(deepforest_root), _tiles_by_name(write_deepforest_coco(tmp_path, seed=1))
    assert {name: boxes for name, (_, boxes) in seed0.items()} == {name: boxes for name, (_, boxes) in seed1.items()}
    assert [split for split, _ in seed0.values()] != [seed1[name][0] for name in seed0]
    assert seed1["SOAP_061_x0_y0.png"][0] == "train"  # the Alive tile stays in train under any seed
    assert sorted(Counter(split for split, _ in seed1.values()).values()) == [7, 7, 31]


def test_tile_origins_by_hand():
    assert tile_origins(1249, 400) == [0, 400, 800]  # the last strip, 1249 - 1200 = 49 px < 100, is left out
    assert tile_origins(1035, 400) == [0, 400, 800]  # 1035 - 800 = 235 px >= 100: a padded tile
    assert tile_origins(400, 400) == [0]
    assert tile_origins(300, 400) == [0]  # smaller than a tile: one padded tile


def test_cut_tiles_keeps_boxes_mostly_inside_and_pads():
    image = np.full((300, 500, 3), 200, np.uint8)  # H 300, W 500; tiles of 200: x 0, 200, 400; y 0, 200
    boxes = np.array([
        [10, 10, 50, 50],  # inside tile (0, 0)
        [190, 10, 230, 50],  # 10/40 and 30/40 of its width on either side: in no tile
        [195, 100, 235, 140],  # 35/40 = 87.5% in tile (200, 0): below 90%, in no tile
        [198, 150, 238, 190],  # 38/40 = 95% in tile (200, 0): kept, clipped to x 200
        [420, 210, 480, 290],  # in the padded corner tile (400, 200)
    ], dtype=np.float64)
    tiles = cut_tiles(image, boxes, ["Tree", "Tree", "Dead", "Alive", "Tree"], stem="p", tile_size=200)
    assert [t.file_name for t in tiles] == ["p_x0_y0.png", "p_x200_y0.png", "p_x400_y200.png"]  # empty tiles skipped
    np.testing.assert_array_equal(tiles[0].boxes, [[10, 10, 50, 50]])
    np.testing.assert_array_equal(tiles[1].boxes, [[0, 150, 38, 190]])  # [200, 150, 238, 190] - (200, 0)
    assert tiles[1].labels == ["Alive"]
    np.testing.assert_array_equal(tiles[2].boxes, [[20, 10, 80, 90]])  # [420, 210, 480, 290] - (400, 200)
    corner = tiles[2].image
    assert corner.shape == (200, 200, 3)
    assert corner[:100, :100].min() == 200 and corner[100:].max() == 0 and corner[:, 100:].max() == 0


def test_missing_package_names_the_pip_command():
    with pytest.raises(DeepForestNotInstalledError, match=r"pip install --no-deps deepforest==2\.1\.0"):
        deepforest_data_dir("deepforest_is_not_installed_here")
    assert INSTALL_HINT == "pip install --no-deps deepforest==2.1.0"


def test_bad_voc_and_arguments(tmp_path):
    Image.new("RGB", (20, 20)).save(tmp_path / "a.png")
    (tmp_path / "a.xml").write_text(
        "<annotation><object><name>Shrub</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax>"
        "<ymax>5</ymax></bndbox></object></annotation>"
    )
    with pytest.raises(DatasetError, match=r"a\.xml: object 0 has class 'Shrub'; expected one of \['Tree', 'Dead', 'Alive'\]"):
        read_voc(tmp_path / "a.xml")
    (tmp_path / "b.xml").write_text("<annotation>")
    with pytest.raises(DatasetError, match=r"b\.xml: expected the image b\.png beside it"):
        read_voc(tmp_path / "b.xml")
    with pytest.raises(ValueError, match=r"`tile_size >= 32` must hold .* got \(tile_size=16\)"):
        write_deepforest_coco(tmp_path / "x", tile_size=16)


def test_loads_with_empty_tiles_kept_off(deepforest_root):
    # The writer skips tiles without boxes, so filter_empty changes nothing on this dataset.
    assert len(load_dataset(deepforest_root, filter_empty=False)) == 45
