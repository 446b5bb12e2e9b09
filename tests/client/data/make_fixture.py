#!/usr/bin/env python3
"""Writes numpy_fixture.safetensors with the official safetensors package.

The C++ test (tests/client/safetensors_test.cc, Interop*) checks the exact
values below, so keep the two in sync. Regenerate with
  python3 -m venv /tmp/st && /tmp/st/bin/pip install safetensors numpy
  /tmp/st/bin/python tests/client/data/make_fixture.py
"""
import os

import numpy as np
from safetensors.numpy import save_file

HERE = os.path.dirname(os.path.abspath(__file__))

tensors = {
    "weight": np.array([[1.5, -2.0, 3.25], [0.0, 100.0, -0.125]], dtype=np.float32),
    "bias": np.array([0.5, -1.0], dtype=np.float16),
    "ids": np.array([-3, 0, 1 << 40], dtype=np.int64),
    "bytes": np.array([0, 7, 255], dtype=np.uint8),
    "mask": np.array([True, False, True, True], dtype=np.bool_),
    "step": np.array(42, dtype=np.int32),  # a scalar: shape []
    "empty": np.zeros((0, 3), dtype=np.float64),
    "small": np.array([-128, 127], dtype=np.int8),
    "wide": np.array([65535, 1], dtype=np.uint16),
}
metadata = {"format": "np", "author": "medakv"}

save_file(tensors, os.path.join(HERE, "numpy_fixture.safetensors"), metadata=metadata)
