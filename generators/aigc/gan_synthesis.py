"""Full synthesis with a real trained GAN available offline: gan-face-generate's DCGAN.

The package ships a DCGAN trained on DigiFace1M with its weights inside the wheel
(`gan_face_generate/weights.tar`), so the corpus gets genuine GAN fingerprints with no
download. Its inference script imports torchvision, which this project does not install, so
only the network definition (`gan_face_generate.models`, torch only) and the weight file are
used here; the network is re-declared identically if that module cannot be imported.

The face ships at the 64 px the network makes (`native_px`), never resampled to the
source's size: upscaling would add interpolation traces that no GAN image in the wild has
and that a detector would learn instead of the GAN's own.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from generators.base import Forgery, Source, check_range, require
from generators.diffusion import deterministic

log = logging.getLogger(__name__)

PACKAGE = "gan_face_generate"
DISTRIBUTION = "gan-face-generate"
NZ, NGF, NC, NATIVE = 100, 64, 3, 64  # the shipped checkpoint's latent size, width, channels, px


@dataclass(frozen=True)
class GanParams:
    truncation: float = 1.0  # latent scale: z ~ N(0, truncation^2); < 1 trades variety for quality

    def __post_init__(self) -> None:
        check_range("truncation", self.truncation, 0, 2, lo_open=True)


def _build_generator() -> Any:
    """The DCGAN generator network, from the package if importable, else the same layers."""
    try:
        from gan_face_generate.models import Generator

        return Generator(ngpu=0, nc=NC, nz=NZ, ngf=NGF)
    except ImportError as exc:  # the module layout changed: same architecture, declared here
        log.info("gan_face_generate.models not importable (%s); using the local declaration", exc)
    from torch import nn

    class Generator(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            g = NGF
            layers: list[nn.Module] = [
                nn.ConvTranspose2d(NZ, g * 8, 4, 1, 0, bias=False),
                nn.BatchNorm2d(g * 8),
                nn.ReLU(True),
            ]
            for cin, cout in ((g * 8, g * 4), (g * 4, g * 2), (g * 2, g)):
                layers += [
                    nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False),
                    nn.BatchNorm2d(cout),
                    nn.ReLU(True),
                ]
            layers += [nn.ConvTranspose2d(g, NC, 4, 2, 1, bias=False), nn.Tanh()]
            self.main = nn.Sequential(*layers)

        def forward(self, x: Any) -> Any:
            return self.main(x)

    return Generator()


def weights_path() -> Path:
    """The checkpoint shipped inside the installed gan-face-generate wheel."""
    require(PACKAGE, f"{DISTRIBUTION} --no-deps")
    spec = importlib.util.find_spec(PACKAGE)
    path = Path(next(iter(spec.submodule_search_locations))) / "weights.tar"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; reinstall {DISTRIBUTION} (pip install --no-deps)"
        )
    return path


class GanSynthesis:
    name = "gan_synthesis"
    domain = "aigc"
    operation = "full_synthesis"
    version = "1.1"
    Params = GanParams

    def __init__(self, params: GanParams | None = None):
        self.params = params or GanParams()
        self._net = None
        self._device = "cpu"
        self.model_id = f"{DISTRIBUTION}=={self._package_version()}:DCGAN-DigiFace1M-64px"
        self.model_revision: str | None = None

    @staticmethod
    def _package_version() -> str:
        try:
            return importlib.metadata.version(DISTRIBUTION)
        except importlib.metadata.PackageNotFoundError:
            return "missing"

    def __getstate__(self) -> dict[str, Any]:  # picklable before and after setup
        return {**self.__dict__, "_net": None}

    def setup(self, device: str = "cpu") -> None:
        import torch

        path = weights_path()
        data = path.read_bytes()
        self.model_revision = "sha256:" + hashlib.sha256(data).hexdigest()[:16]
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        net = _build_generator()
        net.load_state_dict(ckpt["netG_state_dict"])
        self._net = net.eval().to(device)
        self._device = device
        log.info("loaded %s (%s) on %s", self.model_id, self.model_revision, device)

    def generate(self, source: Source, rng: np.random.Generator) -> Forgery:
        import torch

        if self._net is None:
            self.setup(self._device)
        # the latent comes from a CPU generator seeded with the sample seed: the same z on
        # every device
        g = torch.Generator("cpu").manual_seed(int(source.seed))
        z = torch.randn(1, NZ, 1, 1, generator=g) * float(self.params.truncation)
        with deterministic(self._device):
            x = self._net(z.to(self._device)).float().cpu()[0]
        face = ((x.permute(1, 2, 0).numpy() + 1.0) * 127.5).round().clip(0, 255).astype(np.uint8)
        return Forgery(
            image=np.ascontiguousarray(face),
            mask=np.ones(face.shape[:2], bool),
            local=False,
            label="synthetic",
            params={**asdict(self.params), "latent_seed": int(source.seed), "native_px": NATIVE},
            model_id=self.model_id,
            model_revision=self.model_revision,
        )
