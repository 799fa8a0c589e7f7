"""wsi-mil: whole-slide images to slide-level MIL diagnoses and localization heatmaps."""

__version__ = "0.3.0"
