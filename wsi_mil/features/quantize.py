"""Optional int8 inference on CPUs with VNNI (`--precision int8`), for CNN encoders.

Post-training static quantisation with torch.ao's FX graph mode and its "x86" backend:
per-channel int8 weights, per-tensor uint8 activations observed on real patches. Measured on
the shared real slide (bench/bench_int8.py): resnet50_trunc features within cosine 0.9996 of
fp32 (the issue's bar is 0.999) at 2.3x the bf16 default's patches/s on an AMD EPYC with
AVX-512 VNNI, 1.27x on an Intel Xeon with AMX (its bf16 is fast already). Vision transformers
are not supported (their graphs do not trace for static quantisation); they keep bf16.

The observers see the first batch a run encodes. Those patches are saved beside the features
(`int8_calibration.npy`, created atomically; the first process to write it wins), and every
later run, resumed run or cluster worker on that folder calibrates on the same patches. The
quantised model is therefore the same for the whole cohort, and a resumed run writes the same
bytes.
"""

from __future__ import annotations

import copy
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import WsiMilError

SUPPORTED = "--precision int8 supports BatchNorm CNN encoders (resnet50_trunc, resnet18, timm ResNets)"


def calibration_images(path: Path | None, first_batch: np.ndarray) -> np.ndarray:
    """The patches int8 calibrates on: those saved at `path` by an earlier run, else
    `first_batch`, saved there (atomically; if another process saved first, theirs)."""
    if path is None:
        return first_batch
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npy.partial")
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, np.ascontiguousarray(first_batch))
            os.link(tmp, path)  # fails if another process linked its own first
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    return np.load(path)


def quantize_int8(net: nn.Module, calibration: torch.Tensor, encoder: str) -> nn.Module:
    """`net` quantised to int8 after observing `calibration` (normalised NCHW float)."""
    if any(isinstance(m, nn.LayerNorm) for m in net.modules()):  # transformers, ConvNeXt
        raise WsiMilError(f"encoder {encoder}: {SUPPORTED}; use --precision bf16 for this one")
    with warnings.catch_warnings():  # torch.ao.quantization is deprecated in favour of torchao
        warnings.simplefilter("ignore")
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

        torch.backends.quantized.engine = "x86"
        try:
            qconfig = get_default_qconfig_mapping("x86")
            prepared = prepare_fx(copy.deepcopy(net).eval(), qconfig, (calibration[:1],))
            with torch.no_grad():
                for i in range(0, len(calibration), 16):
                    prepared(calibration[i : i + 16])
            return convert_fx(prepared)
        except Exception as exc:
            raise WsiMilError(
                f"encoder {encoder}: int8 quantisation failed ({type(exc).__name__}); {SUPPORTED}; use bf16"
            ) from exc
