"""Fréchet Inception Distance (Heusel et al., 2017, "GANs trained by a two
time-scale update rule converge to a local Nash equilibrium", eq. 6):

    FID = ||mu_1 - mu_2||² + Tr(Sigma_1 + Sigma_2 - 2 (Sigma_1 Sigma_2)^½),

mu and Sigma the mean and covariance of the 2048-d pool3 activations of the
Inception-v3 network of the original TF FID code, over each set of images.

The network is the one of the weights file ``pt_inception-2015-12-05-6726825d.pth``
(the pytorch-fid port of the TF FID graph), which the user supplies: ddpm_fast
never downloads anything. Its layout is torchvision's Inception3 (no auxiliary
head, 1008 classes) with the FID variants of the blocks: the average-pooling
branches of the A, C and E blocks exclude padding from their means, and the
pooling branch of the last E block (Mixed_7c) takes a max.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._checks import as_device, is_int
from ._interrupts import default_device
from ._memory import MemoryLimitError, check_fits_in_memory, check_unpacked_fits, npz_member_header, open_npz
from ._progress import progress_bar
from ._warn import warn

__all__ = ["ENV_VAR", "WEIGHTS_FILE", "InceptionV3FID", "expected_state_dict_shapes", "check_state_dict",
           "resolve_weights_path", "load_inception", "preprocess", "activation_statistics", "frechet_distance", "fid",
           "is_statistics_file", "load_statistics", "save_statistics"]

ENV_VAR = "DDPM_FAST_INCEPTION_WEIGHTS"
WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_FILE}"
INPUT_SIZE = 299
FEATURES = 2048
NUM_CLASSES = 1008  # the TF graph's classifier; present in the file, unused for FID

# ------------------------------------------------------------------- network


class _Conv(nn.Module):
    """BasicConv2d: conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)  # the TF graph's SAME pooling


class _BlockA(nn.Module):  # Mixed_5b/5c/5d, 35x35
    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = _Conv(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = _Conv(cin, 48, 1), _Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = _Conv(64, 96, 3, padding=1), _Conv(96, 96, 3, padding=1)
        self.branch_pool = _Conv(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool(x)),
        ], 1)


class _BlockB(nn.Module):  # Mixed_6a, 35x35 -> 17x17
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = _Conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = _Conv(64, 96, 3, padding=1), _Conv(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        deep = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), deep, F.max_pool2d(x, 3, stride=2)], 1)


class _BlockC(nn.Module):  # Mixed_6b..6e, 17x17, factorised 7x7 convolutions
    def __init__(self, cin: int, c7: int) -> None:
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = _Conv(cin, 192, 1)
        self.branch7x7_1, self.branch7x7_2, self.branch7x7_3 = _Conv(cin, c7, 1), _Conv(c7, c7, **row), _Conv(c7, 192, **col)
        self.branch7x7dbl_1 = _Conv(cin, c7, 1)
        self.branch7x7dbl_2, self.branch7x7dbl_3 = _Conv(c7, c7, **col), _Conv(c7, c7, **row)
        self.branch7x7dbl_4, self.branch7x7dbl_5 = _Conv(c7, c7, **col), _Conv(c7, 192, **row)
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        d = self.branch7x7dbl_5(self.branch7x7dbl_4(d))
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg_pool(x))], 1)


class _BlockD(nn.Module):  # Mixed_7a, 17x17 -> 8x8
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = _Conv(cin, 192, 1), _Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _Conv(cin, 192, 1)
        self.branch7x7x3_2 = _Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _Conv(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class _BlockE(nn.Module):  # Mixed_7b (average pooling branch) and Mixed_7c (max pooling branch), 8x8
    def __init__(self, cin: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = _Conv(cin, 320, 1)
        self.branch3x3_1 = _Conv(cin, 384, 1)
        self.branch3x3_2a, self.branch3x3_2b = _Conv(384, 384, (1, 3), padding=(0, 1)), _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1, self.branch3x3dbl_2 = _Conv(cin, 448, 1), _Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a, self.branch3x3dbl_3b = _Conv(384, 384, (1, 3), padding=(0, 1)), _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(a), self.branch3x3_2b(a),
            self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d),
            self.branch_pool(pooled),
        ], 1)


class InceptionV3FID(nn.Module):
    """The FID Inception-v3; ``forward`` maps N x 3 x 299 x 299 images in [-1, 1]
    (see ``preprocess``) to their N x 2048 pool3 features."""

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = _Conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = _Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = _Conv(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = _BlockA(192, 32), _BlockA(256, 64), _BlockA(288, 64)
        self.Mixed_6a = _BlockB(288)
        self.Mixed_6b, self.Mixed_6c = _BlockC(768, 128), _BlockC(768, 160)
        self.Mixed_6d, self.Mixed_6e = _BlockC(768, 160), _BlockC(768, 192)
        self.Mixed_7a = _BlockD(768)
        self.Mixed_7b, self.Mixed_7c = _BlockE(1280, max_pool=False), _BlockE(2048, max_pool=True)
        self.fc = nn.Linear(FEATURES, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))
        x = F.max_pool2d(x, 3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return x.mean((2, 3))  # pool3: global average pool, 2048 features


def expected_state_dict_shapes() -> dict[str, tuple[int, ...]]:
    """Every key of the weights file and its shape: the one place the expected
    layout is stated (derived from ``InceptionV3FID``, built on the meta device)."""
    with default_device("meta"):
        model = InceptionV3FID()
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


# ------------------------------------------------------------------- loading


def _listing(keys: list[str], limit: int = 5) -> str:
    more = f", and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_state_dict(state: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """The float32 state dict of ``state`` after checking every expected key and
    shape; ValueError listing missing, unexpected and mismatched keys."""
    expected = expected_state_dict_shapes()
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{source} is not a state_dict of tensors (expected the FID Inception weights {WEIGHTS_FILE})")
    optional = {k for k in expected if k.endswith(".num_batches_tracked")}  # not read by eval-mode BatchNorm
    missing = [k for k in expected if k not in state and k not in optional]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k}: {tuple(state[k].shape)} in the file, expected {expected[k]}"
             for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    # weights and statistics must be floats (load_state_dict raised a bare RuntimeError on an int one)
    not_float = [f"{k}: {state[k].dtype}" for k in expected
                 if k in state and k not in optional and not state[k].is_floating_point()]
    if missing or unexpected or wrong or not_float:
        problems = [f"{len(v)} {what} ({_listing(v)})" for what, v in
                    (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong),
                     ("non-float weights", not_float)) if v]
        raise ValueError(f"{source} does not hold the FID Inception-v3 weights ({WEIGHTS_FILE}): " + "; ".join(problems))
    out = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    for key in optional - set(state):
        out[key] = torch.tensor(0, dtype=torch.long)
    return out


def resolve_weights_path(weights_path: str | os.PathLike | None = None) -> Path:
    """``weights_path``, else the ``DDPM_FAST_INCEPTION_WEIGHTS`` variable; clear errors otherwise."""
    where = (f"FID needs the Inception weights file {WEIGHTS_FILE} (the pytorch-fid release, {WEIGHTS_URL}); "
             f"ddpm_fast never downloads it: fetch it yourself, then pass its path "
             f"(--inception-weights / weights_path) or set {ENV_VAR}")
    if weights_path is None:
        weights_path = os.environ.get(ENV_VAR) or None
        if weights_path is None:
            raise ValueError(f"no Inception weights given and {ENV_VAR} is not set. {where}")
    path = Path(weights_path).expanduser()
    if path.is_dir():
        raise IsADirectoryError(f"Inception weights {path} is a folder; give the weights file itself. {where}")
    if path.exists() and not path.is_file():  # a pipe or a device: reading it could wait for ever
        raise ValueError(f"Inception weights {path} is not a regular file; give the weights file itself. {where}")
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights file {path} does not exist. {where}")
    return path


def load_inception(weights_path: str | os.PathLike | None = None, device: torch.device | str | None = "cpu") -> InceptionV3FID:
    """The FID Inception-v3 with the weights of ``weights_path`` (or of the file
    named by ``DDPM_FAST_INCEPTION_WEIGHTS``), in eval mode on ``device``."""
    device = None if device is None else as_device(device, "load_inception: device")
    path = resolve_weights_path(weights_path)
    check_unpacked_fits(path, f"loading {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and weights_only errors alike
        if "Weights only load failed" in str(error):  # torch's text goes on to advise weights_only=False: unsafe
            reason = ("it is not a torch.save file of tensors alone (damaged, another format, or other objects "
                      "pickled in it, which are not loaded: unpickling them could run code)")
        else:
            reason = (f"it is not a torch.save file, or it is damaged ({type(error).__name__}: "
                      f"{(str(error).strip().splitlines() or [''])[0]})")
        raise ValueError(f"cannot read {path} as a PyTorch state_dict: {reason}") from error
    state = check_state_dict(state, str(path))
    with default_device("meta"):
        model = InceptionV3FID()
    model.load_state_dict(state, assign=True)
    return model.eval().requires_grad_(False).to(device)


# ---------------------------------------------------------------- statistics


def _check_images(images: np.ndarray | torch.Tensor, name: str = "images") -> torch.Tensor:
    # ascontiguousarray: torch cannot view a numpy array of negative strides (a flipped view)
    images = torch.as_tensor(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4 or images.shape[3] not in (1, 3):
        raise ValueError(f"{name} must be uint8 N x H x W x C with C 1 or 3, got "
                         f"{getattr(images, 'dtype', type(images).__name__)} {tuple(getattr(images, 'shape', ()))}")
    if images.shape[0] < 2 or min(images.shape[1:3]) < 1:
        raise ValueError(f"{name}: a covariance needs at least 2 non-empty images, got shape {tuple(images.shape)}")
    return images


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8 N x H x W x C (C 1 or 3) -> float32 N x 3 x 299 x 299 in [-1, 1]:
    grey repeated to RGB, the [0, 1] image resized bilinearly with
    align_corners=False and no antialiasing, then scaled by 2x - 1.

    Those are pytorch-fid's choices (its resize is ``F.interpolate`` with its
    defaults), kept so that FIDs compare with that reference; antialiasing
    would change only downscaling (inputs above 299 px) anyway."""
    x = images.permute(0, 3, 1, 2).float() / 255
    x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    if tuple(x.shape[2:]) != (INPUT_SIZE, INPUT_SIZE):  # at 299 already, the resize is the identity
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False, antialias=False)
    return x * 2 - 1


@torch.no_grad()
def activation_statistics(images_uint8_nhwc: np.ndarray | torch.Tensor, model: nn.Module, batch_size: int = 50,
                          device: torch.device | str | None = None, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) — float64, unbiased (N - 1) — of the
    features ``model(preprocess(batch))`` of N >= 2 uint8 images; accumulated in
    float64 around the first batch's mean, so memory stays O(D²) for any N.

    ``device=None`` runs the model where its weights are (the CPU for a plain
    function) and leaves it there; a given device moves the model to it first.
    """
    images = _check_images(images_uint8_nhwc)
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    batch_size = int(batch_size)
    if device is None:
        device = _weights_device(model)
    else:
        device = as_device(device, "activation_statistics: device")
        if isinstance(model, nn.Module):
            model.to(device)
    starts = range(0, images.shape[0], batch_size)
    if progress:
        starts = progress_bar(starts, desc="inception", unit="batch")
    shift = total = outer = None
    for start in starts:
        features = model(preprocess(images[start : start + batch_size].to(device)))
        if features.dim() != 2:
            raise ValueError(f"the model must return N x D features, got shape {tuple(features.shape)}")
        f = features.double().cpu().numpy()
        if not np.isfinite(f).all():
            raise ValueError(f"non-finite Inception features for images {start}..{start + len(f) - 1}: corrupt weights?")
        if shift is None:
            shift, total, outer = f.mean(0), np.zeros(f.shape[1]), np.zeros((f.shape[1], f.shape[1]))
        centred = f - shift
        total += centred.sum(0)
        outer += centred.T @ centred
    n = images.shape[0]
    mean = total / n
    return shift + mean, (outer - n * np.outer(mean, mean)) / (n - 1)


def _weights_device(model: object) -> torch.device:
    """The device of a module's first parameter or buffer; the CPU otherwise."""
    if isinstance(model, nn.Module):
        for tensor in (*model.parameters(), *model.buffers()):
            return tensor.device
    return torch.device("cpu")


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, *,
                     eps: float = 1e-6, method: str = "sqrtm") -> float:
    """||mu1 - mu2||² + Tr(sigma1) + Tr(sigma2) - 2 Tr((sigma1 sigma2)^½), the
    Fréchet distance of two Gaussians (Heusel et al. 2017, eq. 6; Dowson & Landau 1982).

    ``method="sqrtm"`` is the reference recipe: ``scipy.linalg.sqrtm`` of the
    product; if that is not finite (a singular product) both covariances get
    ``eps`` added to their diagonals; a small imaginary part (|diag| <= 1e-3,
    rounding) is dropped, a larger one raises (scipy before 1.13 leaves such
    parts on some singular products that later scipy solves). ``method="eigh"`` computes the
    same trace, Σ √λ_i(√sigma1 sigma2 √sigma1), with symmetric eigensolvers:
    several times faster at D = 2048 and free of complex rounding.
    """
    mu1, sigma1 = _checked_statistics(mu1, sigma1, "frechet_distance", names=("mu1", "sigma1"))
    mu2, sigma2 = _checked_statistics(mu2, sigma2, "frechet_distance", names=("mu2", "sigma2"))
    if mu1.shape != mu2.shape:
        raise ValueError(f"frechet_distance: the two statistics must be of one D, got D = {mu1.shape[0]} "
                         f"(mu1, sigma1) and D = {mu2.shape[0]} (mu2, sigma2)")
    check_method(method)
    trace_sqrt = _trace_sqrt_sqrtm(sigma1, sigma2, eps) if method == "sqrtm" else _trace_sqrt_eigh(sigma1, sigma2)
    diff = mu1 - mu2
    distance = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)
    return max(distance, 0.0)  # a distance: below 0 (-1e-14 for equal statistics) only by rounding


# ------------------------------------------------------------ statistics files
# A set's (mu, sigma) saved once and reused: the features of 50,000 training
# images take the Inception network minutes on a GPU, hours on a CPU. Keys as
# pytorch-fid's --save-stats files (and guided-diffusion's reference batches,
# which hold them beside the images).


def is_statistics_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an .npz holding ``mu`` and ``sigma``."""
    path = Path(path)
    if path.suffix != ".npz" or not path.is_file():
        return False
    try:
        with open_npz(path) as archive:
            return {"mu", "sigma"} <= set(archive.keys())
    except Exception:  # not a zip, a damaged one (zipfile.BadZipFile), ...: load_dataset says what is wrong
        return False


def load_statistics(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """The float64 ``mu`` (D,) and ``sigma`` (D, D) of a statistics file."""
    try:
        with open_npz(path) as archive:
            # a float64 copy of each beside it: (D, D) of a wrong file can be far beyond the 32 MB of D = 2048
            headers = [npz_member_header(archive, key) for key in ("mu", "sigma")]
            check_fits_in_memory(sum(math.prod(shape) * (dtype.itemsize + 8) for shape, dtype in filter(None, headers)),
                                 f"reading FID statistics {path}")
            mu, sigma = (np.asarray(archive[key], dtype=np.float64) for key in ("mu", "sigma"))
    except MemoryLimitError:
        raise
    except Exception as error:  # a damaged member (zipfile.BadZipFile: its CRC), an object array, ...
        raise ValueError(f"cannot read FID statistics from {path}: {type(error).__name__}: {error}") from None
    return _checked_statistics(mu, sigma, str(path))


def save_statistics(mu: np.ndarray, sigma: np.ndarray, path: str | os.PathLike) -> None:
    """Write ``mu`` and ``sigma`` to the .npz ``path`` (atomically), for
    ``load_statistics`` or ``ddpm-fast fid --data`` to take in place of the images."""
    from .checkpoint import atomic_write

    mu, sigma = _checked_statistics(mu, sigma, "save_statistics")

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # (np.savez would add .npz to a name without it)
            np.savez(f, mu=mu, sigma=sigma)

    atomic_write(path, write)


def _checked_statistics(mu: np.ndarray, sigma: np.ndarray, source: str,
                        names: tuple[str, str] = ("mu", "sigma")) -> tuple[np.ndarray, np.ndarray]:
    """``mu`` and ``sigma`` as float64 (D,) and (D, D), or a ValueError naming
    ``source`` and which of ``names`` is wrong: the one check of every set of
    statistics, read from a file, saved or compared."""
    mu, sigma = np.atleast_1d(np.asarray(mu, dtype=np.float64)), np.atleast_2d(np.asarray(sigma, dtype=np.float64))
    d = mu.shape[0] if mu.ndim == 1 else -1
    if d < 1 or sigma.shape != (d, d):
        raise ValueError(f"{source}: FID statistics are a mean {names[0]} (D,) and a covariance {names[1]} (D, D) "
                         f"of one D, got {names[0]} {mu.shape} and {names[1]} {sigma.shape}")
    for name, value in zip(names, (mu, sigma)):
        if not np.isfinite(value).all():
            raise ValueError(f"{source}: {name} has non-finite entries")
    return mu, sigma


def check_method(method: str) -> None:
    """Refuse an unknown method, or sqrtm without scipy (fid and the fid command
    call this before their Inception passes, which take minutes to hours)."""
    if method not in ("sqrtm", "eigh"):
        raise ValueError(f"method must be 'sqrtm' or 'eigh', got {method!r}")
    if method == "sqrtm":
        try:
            import scipy.linalg  # noqa: F401
        except ImportError as error:
            raise ImportError("FID with method='sqrtm' needs scipy (pip install scipy), or use method='eigh'") from error


def _trace_sqrt_sqrtm(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
    from scipy import linalg

    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warn(f"sigma1 @ sigma2 is singular: adding {eps:g} to the covariances' diagonals")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        imaginary = np.abs(np.diagonal(covmean).imag).max()
        if imaginary > 1e-3:
            raise ValueError(f"sqrtm(sigma1 @ sigma2) has an imaginary part of {imaginary:.3g} on its diagonal: "
                             "the covariances are too ill-conditioned (too few images?); try method='eigh'")
        covmean = covmean.real
    return float(np.trace(covmean))


def _trace_sqrt_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    product = root1 @ ((sigma2 + sigma2.T) / 2) @ root1
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((product + product.T) / 2), 0, None)).sum())


def fid(images_a: np.ndarray | torch.Tensor, images_b: np.ndarray | torch.Tensor,
        weights_path: str | os.PathLike | None = None, *, batch_size: int = 50, device: torch.device | str | None = "cpu",
        progress: bool = False, method: str = "sqrtm") -> float:
    """FID between two sets of uint8 N x H x W x C images (Heusel et al. 2017)."""
    a, b = _check_images(images_a, "images_a"), _check_images(images_b, "images_b")
    check_method(method)
    model = load_inception(weights_path, device)
    mu1, sigma1 = activation_statistics(a, model, batch_size, device, progress)
    mu2, sigma2 = activation_statistics(b, model, batch_size, device, progress)
    return frechet_distance(mu1, sigma1, mu2, sigma2, method=method)
