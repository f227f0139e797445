"""Anomaly scores of a trained VAE: per image (sample) and per pixel (maps)."""

from jaxad.scores.pixel import PIXEL_MAPS, gaussian_smooth, pixel_maps
from jaxad.scores.sample import SAMPLE_SCORES, sample_scores

__all__ = ["PIXEL_MAPS", "SAMPLE_SCORES", "gaussian_smooth", "pixel_maps", "sample_scores"]
