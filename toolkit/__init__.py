"""cellfuse: clean -> train -> ensemble -> distill -> export for small-image classification."""

import os

__version__ = "0.1.0"

# TensorFlow turns its oneDNN CPU kernels on by itself only where the CPU has AVX-512 VNNI/BF16 or AMX.
# Without them (AVX2-only CPUs, many AMD EPYCs) a Lite0 training step ran 1.8x slower here
# (docs/machines.md). Read once, when TensorFlow is imported; a TF_ENABLE_ONEDNN_OPTS the user set wins.
ONEDNN_SET_BY_USER = "TF_ENABLE_ONEDNN_OPTS" in os.environ
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
