"""nil: distractor-aware neuron intrinsic learning for medical image classification."""

__version__ = "0.1.0"
