"""Localization: sparse network inversion, per-patch scores, heatmaps and review exports."""
