"""Distributed scanner for AI-generated images.

Importing this package does nothing: no TensorFlow, no Ray, no files. Import the
submodule you need (`detector.io.preprocess`, `detector.model.predictor`, ...).
"""

__version__ = "0.1.0"
