"""The work folder: where each stage's output for a slide lives.

tissue/<slide>.geojson, tissue/<slide>.png     segmentation (QuPath annotations + contours)
patches/<slide>.h5, patches/<slide>.png        tiling (coords + preview)
features/<encoder>/<slide>.h5                  extraction
manifest_<stage>.csv                           one row per slide: latest outcome
.locks/<stage>-<slide>.lock                    held while a process works on that slide
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


def encoder_dirname(encoder: str) -> str:
    return encoder.replace("/", "_").replace(":", "_")


@dataclass(frozen=True)
class Layout:
    out: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))

    def tissue(self, name: str) -> Path:
        return self.out / "tissue" / f"{name}.geojson"

    def tissue_png(self, name: str) -> Path:
        return self.out / "tissue" / f"{name}.png"

    def patches(self, name: str) -> Path:
        return self.out / "patches" / f"{name}.h5"

    def patches_png(self, name: str) -> Path:
        return self.out / "patches" / f"{name}.png"

    def features_dir(self, encoder: str) -> Path:
        return self.out / "features" / encoder_dirname(encoder)

    def features(self, encoder: str, name: str) -> Path:
        return self.features_dir(encoder) / f"{name}.h5"

    def manifest(self, stage: str) -> Path:
        return self.out / f"manifest_{stage}.csv"

    def lock(self, stage: str, name: str) -> Path:
        return self.out / ".locks" / f"{stage}-{name}.lock"

    @classmethod
    def of_features_dir(cls, features_dir: str | Path) -> Layout:
        """The work folder that holds `features/<encoder>/` (as `wsi-mil extract --out` writes it)."""
        return cls(Path(features_dir).resolve().parent.parent)
