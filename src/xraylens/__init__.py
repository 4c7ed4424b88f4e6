"""xraylens: train, evaluate and explain radiograph classifiers, and measure whether the
explanations point at the right anatomy."""

__version__ = "0.1.0"
