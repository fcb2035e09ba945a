"""A pretrained pixel-space restorer as the estimate a posterior-mean flow starts from.

The posterior-mean flow transports the best available estimate of the image to the distribution of sharp images:
the better the estimate, the less the flow has to learn. On degraded photos (noise, blur, JPEG) the best estimates
there are come from restorers trained far longer, on far more photos, for exactly that job — Real-ESRGAN, SwinIR,
HAT, DAT, SPAN and the community's ×2 / ×4 models. `Restorer` wraps one of them, frozen:

    lr (B, 3, h, w) in [-1, 1] ──► network in [0, 1] ──► (B, 3, s·h, s·w) in [-1, 1]   (tiled when large)

and the flow's estimate is that image's latent, `first_stage.encode(restorer(lr))`. Weights files are read by the
built-in RRDBNet (`fmboost.models.realesrgan`: the ESRGAN / Real-ESRGAN layout, any block count and width) or,
for every other architecture, by spandrel (the loader ComfyUI and chaiNNer use; `pip install "fmboost[restorers]"`).

A folder trained on a restorer does not copy its weights: it records the file's name and sha256 (`record`), and
`find` looks for that file again when the folder is loaded, refusing one whose bytes differ, so a folder never
silently runs with another restorer than the one it was trained and calibrated with.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from .assets import shared_dir

#: Low-res tile side above which the restorer runs tile by tile (bounds memory: each 64-channel fp32 map of an
#: ×4 tail costs 4 KiB per input pixel).
DEFAULT_TILE = 512
#: Low-res context each tile borrows from its neighbours.
DEFAULT_TILE_OVERLAP = 16
#: Colon-separated folders `find` also searches for a recorded weights file.
RESTORERS_ENV = "FMBOOST_RESTORERS"
SPANDREL_HINT = ('spandrel reads this architecture: pip install "fmboost[restorers]" (spandrel imports torchvision, '
                 "which must be a build for the installed torch; a CUDA torchvision beside a CPU torch fails to "
                 "import)")


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A weights file's state dict: safetensors, or a torch pickle loaded with weights_only (basicsr's .pth files
    wrap it in "params_ema" / "params")."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("params_ema", "params", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            return state[key]
    return state


def rrdbnet_from_state_dict(state: dict[str, torch.Tensor]) -> nn.Module | None:
    """The built-in RRDBNet (x4) with `state` loaded when its keys are the ESRGAN layout, else None."""
    from .realesrgan import RRDBNet

    if not {"conv_first.weight", "body.0.rdb1.conv1.weight", "conv_up2.weight", "conv_last.weight"} <= set(state):
        return None
    num_block = 1 + max(int(key.split(".")[1]) for key in state if key.startswith("body."))
    network = RRDBNet(num_in_ch=state["conv_first.weight"].shape[1], num_out_ch=state["conv_last.weight"].shape[0],
                      num_feat=state["conv_first.weight"].shape[0], num_block=num_block,
                      num_grow_ch=state["body.0.rdb1.conv1.weight"].shape[0])
    network.load_state_dict(state, strict=True)
    return network


def run_tiled(network: nn.Module, lr: torch.Tensor, scale: int, tile: int | None = None,
              tile_overlap: int = DEFAULT_TILE_OVERLAP) -> torch.Tensor:
    """network ([0, 1] in, ×`scale` out) on lr (B, 3, h, w) in [-1, 1] → (B, 3, s·h, s·w) in [-1, 1], clamped.

    The input is not padded: padding changes the whole prediction of a large-receptive-field restorer, not just its
    border. With `tile` (low-res pixels), tiles of at most tile × tile run with up to `tile_overlap` pixels of real
    neighbouring context on every side that has one, and their ×s interiors are stitched: close to, not equal to,
    the untiled output. Runs under no_grad in the network's device and dtype; returns in lr's."""
    if lr.ndim != 4 or lr.shape[1] != 3:
        raise ValueError(f"lr must be a (B, 3, h, w) tensor, got {tuple(lr.shape)}")
    if tile is not None and tile < 1:
        raise ValueError(f"tile must be a positive number of pixels, got {tile}")
    if tile_overlap < 0:
        raise ValueError(f"tile_overlap must be >= 0, got {tile_overlap}")
    param = next(network.parameters())
    with torch.no_grad():
        x = ((lr.to(device=param.device, dtype=param.dtype) + 1) / 2).clamp(0, 1)
        height, width = x.shape[-2:]
        if tile is None or (tile >= height and tile >= width):
            out = network(x)
        else:
            out = x.new_empty(x.shape[0], 3, height * scale, width * scale)
            for top in range(0, height, tile):
                for left in range(0, width, tile):
                    bottom, right = min(top + tile, height), min(left + tile, width)
                    c_top, c_left = max(top - tile_overlap, 0), max(left - tile_overlap, 0)
                    c_bottom, c_right = min(bottom + tile_overlap, height), min(right + tile_overlap, width)
                    sr = network(x[..., c_top:c_bottom, c_left:c_right])
                    dy, dx = (top - c_top) * scale, (left - c_left) * scale
                    out[..., top * scale:bottom * scale, left * scale:right * scale] = \
                        sr[..., dy:dy + (bottom - top) * scale, dx:dx + (right - left) * scale]
        if out.shape[-2:] != (height * scale, width * scale):
            raise ValueError(f"the restorer returned {tuple(out.shape[-2:])} for a {height}x{width} input, "
                             f"not ×{scale}")
        return (out.float().clamp(0, 1) * 2 - 1).to(device=lr.device, dtype=lr.dtype)


class Restorer(nn.Module):
    """A frozen pretrained ×`scale` image restorer. model: the network ([0, 1] RGB in, ×scale out); path, sha256:
    its weights file and that file's digest (what a folder records, with the name); architecture: what read it
    ("RRDBNet" built in, else spandrel's name); tile: low-res tile side above which it runs tiled (None: never)."""

    def __init__(self, model: nn.Module, scale: int, path: str | Path, sha256: str, architecture: str,
                 tile: int | None = DEFAULT_TILE):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.scale, self.path, self.sha256, self.architecture, self.tile = scale, Path(path), sha256, architecture, tile

    @property
    def name(self) -> str:
        return self.path.name

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        """(B, 3, h, w) in [-1, 1] → the restored (B, 3, s·h, s·w) in [-1, 1]."""
        return run_tiled(self.model, lr, self.scale, self.tile)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def record(self) -> dict:
        """What an upsampler folder stores to find these weights again (`find`)."""
        return {"file": self.name, "sha256": self.sha256, "scale": self.scale, "architecture": self.architecture,
                "path": str(self.path.resolve())}

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> Restorer:
        """Read a weights file (fp32, eval, frozen): the built-in RRDBNet for the ESRGAN layout, else spandrel."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"restorer weights {path} not found")
        state = load_state_dict(path)
        model = rrdbnet_from_state_dict(state)
        if model is not None:
            scale, architecture = 4, "RRDBNet"
        else:
            descriptor = _spandrel_descriptor(path, state)
            model, scale, architecture = descriptor.model, descriptor.scale, descriptor.architecture.name
        return cls(model.float(), scale, path, file_sha256(path), architecture).to(device)

    @classmethod
    def find(cls, record: dict, folder: str | Path | None = None, path: str | Path | None = None,
             device: str | torch.device = "cpu") -> Restorer:
        """The restorer a folder recorded (`record`), from `path` when given, else the first file of the recorded
        name, with the recorded sha256, in: `folder`, the recorded path's folder, the folders of $FMBOOST_RESTORERS,
        the working directory, and the shared assets' weights/. A file of that name with other bytes is refused
        (the folder was trained and calibrated with those exact weights); none at all is a FileNotFoundError saying
        where it looked."""
        name, sha256 = record["file"], record["sha256"]
        if path is not None:
            found = [Path(path)]
            if not found[0].is_file():
                raise FileNotFoundError(f"restorer weights {path} not found (this folder needs {name}, sha256 "
                                        f"{sha256[:16]}…)")
        else:
            found = [p for p in _search(name, folder, record.get("path")) if p.is_file()]
        mismatched = []
        for candidate in found:
            digest = file_sha256(candidate)
            if digest == sha256:
                restorer = cls.load(candidate, device)
                if restorer.scale != record.get("scale", restorer.scale):
                    raise ValueError(f"{candidate} up-scales ×{restorer.scale}, the folder recorded ×{record['scale']}")
                return restorer
            mismatched.append(f"{candidate} (sha256 {digest[:16]}…)")
        if mismatched:
            raise ValueError(f"restorer weights differ from the ones this folder was trained with ({name}, sha256 "
                             f"{sha256[:16]}…): " + ", ".join(mismatched) + "; give the original file (restorer=PATH, "
                             f"or a folder in ${RESTORERS_ENV}), or retrain the folder on the new one")
        raise FileNotFoundError(f"restorer weights {name} (sha256 {sha256[:16]}…) not found in "
                                + ", ".join(str(p.parent) for p in _search(name, folder, record.get("path")))
                                + f"; put it in the folder or in a folder that ${RESTORERS_ENV} names, or pass its "
                                "path (Upsampler.from_pretrained(..., restorer=PATH))")


def _search(name: str, folder: str | Path | None, recorded: str | None) -> Iterable[Path]:
    """Where `find` looks for a weights file called `name`, in order."""
    places = [Path(folder)] if folder is not None else []
    places += [Path(recorded).parent] if recorded else []
    places += [Path(p) for p in os.environ.get(RESTORERS_ENV, "").split(os.pathsep) if p]
    places.append(Path.cwd())
    root = shared_dir()
    if root is not None and (root / "weights").is_dir():
        places.append(root / "weights")
        places += sorted(p for p in (root / "weights").iterdir() if p.is_dir())
    seen = []
    for place in places:
        if place / name not in seen:
            seen.append(place / name)
    return seen


def _spandrel_descriptor(path: Path, state: dict):
    """spandrel's ImageModelDescriptor for `state`, or an error saying how to get spandrel."""
    try:
        import spandrel
    except Exception as err:  # ImportError, or torchvision failing to import beside this torch
        raise ValueError(f"{path.name} is not the built-in RRDBNet layout, and spandrel cannot be imported "
                         f"({type(err).__name__}: {err}); {SPANDREL_HINT}") from None
    descriptor = spandrel.ModelLoader().load_from_state_dict(state)
    if not isinstance(descriptor, spandrel.ImageModelDescriptor) or descriptor.input_channels != 3 \
            or descriptor.output_channels != 3:
        raise ValueError(f"{path.name} is not an RGB image-to-image model ({descriptor.architecture.name})")
    return descriptor

