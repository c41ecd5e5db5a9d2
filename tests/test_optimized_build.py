"""The suite compiles with XLA's backend at -O0 (conftest.py), a third faster to compile; users'
programs are compiled optimized. Fused equals solo there too: test_engine.py's check, for both
op paths, in a process of its own (the flag is read once per process)."""

import os
import subprocess
import sys
from pathlib import Path


def test_fused_equals_solo_at_xla_default_optimization_level():
    flags = [f for f in os.environ["XLA_FLAGS"].split()
             if not f.startswith("--xla_backend_optimization_level")]
    tests = [f"tests/test_engine.py::test_fused_equals_solo_greedy[flover-{ops}]"
             for ops in ("cpu_kernels", "xla")]
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
                            cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                            env=dict(os.environ, XLA_FLAGS=" ".join(flags)), timeout=600)
    assert result.returncode == 0 and "2 passed" in result.stdout, result.stdout[-3000:]
