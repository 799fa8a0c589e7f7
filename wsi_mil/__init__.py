"""wsi-mil: whole-slide images to slide-level MIL diagnoses and localisation heatmaps."""

__version__ = "0.1.0"
