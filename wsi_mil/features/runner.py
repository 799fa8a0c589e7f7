"""The encoder runner: uint8 patch batches -> features, at the best precision the device offers.

channels-last + autocast (bf16 on CPUs with bf16 units, bf16/fp16 on CUDA) under
`torch.inference_mode`, Conv+BN folded, on the CPU conv+relu/add fused into oneDNN post-ops
(onednn.py), optionally `torch.compile`d with freezing; or, on
request (`precision="int8"`), int8 on CPUs with VNNI (features/quantize.py). On CUDA,
`submit` stages batches in pinned memory and overlaps the next batch's copy with this one's
compute.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from ..config import ExtractConfig
from ..device import cpu_has_vnni, precision_name, resolve_device, resolve_precision
from ..errors import WsiMilError
from .encoders import Encoder, create_encoder
from .onednn import fuse_conv_pointwise
from .quantize import calibration_images, quantize_int8

log = logging.getLogger("wsi_mil")

# torch.compile with freezing costs ~23 s on a 2-core CPU (empty inductor cache) and runs
# resnet50_trunc at 47 patches/s against the fused eager encoder's 40 (docs/changelog.md, 2026-11-22,
# fourth cohort run): it pays off above ~6,000 patches, a few slides at 20x.
COMPILE_MIN_PATCHES = 6000


def fold_batchnorm(encoder: Encoder) -> Encoder:
    """A copy with every eval-mode Conv -> BatchNorm pair folded into the conv (one op instead
    of two: ~12% faster eager resnet50_trunc on CPU). Models torch.fx cannot trace stay as is."""
    with warnings.catch_warnings():  # the module imports deprecated torch.jit helpers
        warnings.simplefilter("ignore", DeprecationWarning)
        from torch.fx.experimental.optimization import fuse
    try:
        net = fuse(encoder.net.eval())
    except Exception as exc:  # dynamic control flow: not traceable, nothing to fold
        log.debug("batchnorm folding skipped for %s: %s", encoder.info.name, exc)
        return encoder
    return Encoder(net, encoder.info)


class EncoderRunner:
    """Runs an encoder on uint8 NHWC batches with the best precision the device offers."""

    def __init__(
        self,
        encoder: Encoder,
        device: str = "auto",
        precision: str = "auto",
        compile: str = "off",
        int8_calibration: str | Path | None = None,
    ):
        self.device = resolve_device(device)
        self.int8 = precision == "int8"
        if self.int8 and (self.device.type != "cpu" or not cpu_has_vnni()):
            raise WsiMilError(
                f"--precision int8 needs a CPU with VNNI (AVX-512 VNNI, AVX-VNNI or AMX); this run is on "
                f"{self.device}{'' if self.device.type != 'cpu' else ' without it'}: use --precision auto"
            )
        self.int8_calibration = int8_calibration  # where the calibration patches are kept
        self._int8_net = None
        self.amp_dtype = None if self.int8 else resolve_precision(precision, self.device)
        encoder = fold_batchnorm(encoder.eval())
        self.encoder = encoder.to(self.device).eval().to(memory_format=torch.channels_last)
        self.info = encoder.info
        self.eager = self._fused_for_cpu()
        self.mean = torch.tensor(self.info.mean, device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(self.info.std, device=self.device).view(1, 3, 1, 1) * 255
        self.compile_mode = compile
        self._compiled = None
        self._slot = 1
        self._host_in: list = [None, None]
        self._host_out: list = [None, None]
        self._staging: list = [None, None]
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def _fused_for_cpu(self) -> Encoder:
        """The eager encoder, with conv+relu/add fused into oneDNN post-ops on the CPU (onednn.py)."""
        if self.device.type != "cpu" or self.int8:
            return self.encoder
        size = self.info.crop_size or self.info.input_size
        net, fused = fuse_conv_pointwise(self.encoder.net, self.amp_dtype or torch.float32, size)
        if fused:
            log.debug("%s: %d convolutions fused with their relu/add", self.info.name, fused)
        return Encoder(net, self.info) if fused else self.encoder

    @property
    def precision_name(self) -> str:
        return "int8" if self.int8 else precision_name(self.amp_dtype)

    @property
    def compiled(self) -> bool:
        """Whether batches run through the compiled graph (which wants one fixed batch shape)."""
        return self._compiled is not None

    def maybe_compile(self, n_patches: int) -> None:
        if self.int8:  # the quantised graph is already oneDNN's int8 kernels
            return
        want = self.compile_mode == "on" or (self.compile_mode == "auto" and n_patches >= COMPILE_MIN_PATCHES)
        if want and self._compiled is None:
            try:
                # freezing folds weights into oneDNN-prepacked constants: ~1.5x on CPU
                self._compiled = torch.compile(self.encoder, options={"freezing": True})
            except Exception as exc:  # no compiler toolchain: run eager
                log.warning("torch.compile unavailable (%s); running eager", exc)
                self._compiled = self.encoder

    def __call__(self, images: np.ndarray | torch.Tensor, pad_to: int | None = None) -> np.ndarray:
        return self.submit(images, pad_to).result()

    @torch.inference_mode()
    def submit(self, images: np.ndarray | torch.Tensor, pad_to: int | None = None) -> PendingFeatures:
        """Start encoding a uint8 NHWC batch; `.result()` gives the features.

        On the CPU the work is done before this returns. On CUDA the batch is staged in a pinned
        host buffer (one of two, used in turn), copied on a side stream, and the encoder's
        kernels are only queued: the caller prepares batch n+1 (and its copy) while batch n
        computes, and takes batch n's features afterwards."""
        if self.device.type != "cuda":
            x = torch.as_tensor(images).to(self.device)
            if self.int8 and self._int8_net is None:
                self._quantize(x.numpy())
            return PendingFeatures(self._forward(x, len(x), pad_to).cpu().numpy())
        n = len(images)
        slot = self._slot = 1 - self._slot
        if self._staging[slot] is not None:  # the batch that last used this slot: take its
            self._staging[slot].result()  # features out of the buffers before they are reused
        host_in = _pinned(self._host_in, slot, images.shape, torch.uint8)
        host_in.numpy()[...] = images.numpy() if isinstance(images, torch.Tensor) else images
        compute = torch.cuda.current_stream(self.device)
        self._copy_stream.wait_stream(compute)
        with torch.cuda.stream(self._copy_stream):
            x = host_in.to(self.device, non_blocking=True)
        compute.wait_stream(self._copy_stream)
        x.record_stream(compute)
        feats = self._forward(x, n, pad_to)
        host_out = _pinned(self._host_out, slot, tuple(feats.shape), torch.float32)
        host_out.copy_(feats, non_blocking=True)
        done = torch.cuda.Event()
        done.record(compute)
        self._staging[slot] = PendingFeatures(host=host_out, event=done)
        return self._staging[slot]

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2).float().sub_(self.mean).div_(self.std)
        return x.contiguous(memory_format=torch.channels_last)

    def _quantize(self, first_batch: np.ndarray) -> None:
        """int8: observe the run's calibration patches (quantize.py) and swap in the int8 graph."""
        images = calibration_images(self.int8_calibration, first_batch)
        calibration = self._normalise(torch.from_numpy(images))
        self._int8_net = quantize_int8(self.encoder.net, calibration, self.info.name)

    def _forward(self, x: torch.Tensor, n: int, pad_to: int | None) -> torch.Tensor:
        """uint8 NHWC on the device -> float32 features [n, dim] on the device."""
        if self._int8_net is not None:
            return self._int8_net(self._normalise(x)).float()
        if pad_to and n < pad_to:  # a fixed batch shape avoids recompiling for a short batch
            x = torch.cat([x, x[-1:].expand(pad_to - n, *x.shape[1:])])
        x = self._normalise(x)
        model = self.eager if self._compiled is None else self._compiled
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            feats = model(x)
        return feats[:n].float()


class PendingFeatures:
    """Features of a submitted batch: ready now (CPU) or once the device's event fires (CUDA)."""

    def __init__(self, value: np.ndarray | None = None, host: torch.Tensor | None = None, event=None):
        self.value, self.host, self.event = value, host, event

    def result(self) -> np.ndarray:
        if self.value is None:
            self.event.synchronize()
            self.value = self.host.numpy().copy()  # the pinned buffer is reused two batches on
        return self.value


def _pinned(buffers: list, slot: int, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """A pinned host tensor of `shape` in `buffers[slot]`, reallocated only when it must grow."""
    n = int(np.prod(shape))
    if buffers[slot] is None or buffers[slot].numel() < n:
        buffers[slot] = torch.empty(n, dtype=dtype, pin_memory=True)
    return buffers[slot][:n].view(shape)


_RUNNERS: dict = {}


def runner_for(cfg: ExtractConfig) -> EncoderRunner:
    """The encoder runner for these settings, built once per process (weights load once)."""
    key = (
        cfg.encoder,
        cfg.weights,
        cfg.random_weights,
        cfg.device,
        cfg.precision,
        cfg.compile,
        cfg.int8_calibration,
    )
    if key not in _RUNNERS:
        encoder = create_encoder(cfg.encoder, cfg.weights, cfg.random_weights)
        _RUNNERS[key] = EncoderRunner(encoder, cfg.device, cfg.precision, cfg.compile, cfg.int8_calibration)
    return _RUNNERS[key]
