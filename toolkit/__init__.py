"""cellfuse: clean -> train -> ensemble -> distill -> export for small-image classification."""

__version__ = "0.1.0"
