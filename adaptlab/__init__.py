"""adaptlab: continual learning and test-time adaptation on non-stationary streams."""

__version__ = "0.1.0"
