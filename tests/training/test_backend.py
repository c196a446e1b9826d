"""The trainer's TensorFlow backend imports no TensorFlow where no model runs."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit


def test_building_the_backend_config_imports_no_tensorflow():
    """The job's driver builds it and Ray Train's controller unpickles it: neither runs a
    TensorFlow op, so neither should pay TensorFlow's import (5 s, 700 MB). That two
    workers all-reduce through the TF_CONFIG it sets is every 2-worker e2e training test."""
    check = ("import pickle, sys\n"
             "from detector.training.backend import MultiWorkerConfig\n"
             "config = pickle.loads(pickle.dumps(MultiWorkerConfig()))\n"
             "assert config.backend_cls.__name__ == '_MultiWorkerBackend'\n"
             "print(sorted(m for m in sys.modules if m.split('.')[0] in "
             "('tensorflow', 'keras')))\n")
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]", out.stdout
