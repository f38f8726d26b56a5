"""cellfuse: clean -> train -> ensemble -> distill -> export for small-image classification."""

import os

__version__ = "0.1.0"

# TensorFlow turns its oneDNN CPU kernels on by itself only where the CPU has AVX-512 VNNI/BF16 or AMX.
# Without them (AVX2-only CPUs, many AMD EPYCs) a Lite0 training step ran 1.8x slower here
# (docs/machines.md). Read once, when TensorFlow is imported; a TF_ENABLE_ONEDNN_OPTS the user set wins.
# CELLFUSE_ONEDNN marks the value as cellfuse's for the processes it starts (train --parallel, sweep workers).
ONEDNN_SET_BY_USER = "TF_ENABLE_ONEDNN_OPTS" in os.environ and "CELLFUSE_ONEDNN" not in os.environ
if not ONEDNN_SET_BY_USER:
    os.environ.update(TF_ENABLE_ONEDNN_OPTS="1", CELLFUSE_ONEDNN="1")
