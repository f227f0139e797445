"""jaxad: anomaly detection for medical images with deep generative models in JAX/Flax."""

import os

# TensorFlow (the data pipeline's) prints start-up lines on every import: INFO logs and
# "oneDNN custom operations are on" (which TF_CPP_MIN_LOG_LEVEL no longer silences).
# jaxad uses TF only for tf.data, where oneDNN changes nothing (its resizes are the same
# bit for bit either way), so both default to quiet; a value set by the user wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

__version__ = "0.1.0"
