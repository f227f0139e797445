"""jaxad: anomaly detection for medical images with deep generative models in JAX/Flax."""

__version__ = "0.1.0"
