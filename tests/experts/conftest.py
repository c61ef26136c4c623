"""Fixtures of the expert-path tests."""

import os
import subprocess
import sys
import textwrap

import pytest

# The interpreter holds every scalar as a 1-element array, and numpy >= 2.3 refuses int() of
# one: loops whose bound is a run-time value (the GEMM kernels' tile and reduction loops) then
# fail in the interpreter only. The shim makes its __index__ read the element; compiled kernels
# are untouched (the GPU tests run them).
_SHIM = textwrap.dedent("""
    import triton.runtime.interpreter as ti
    _patch = ti._patch_lang_tensor
    def _patched(tensor, scope):
        _patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
    ti._patch_lang_tensor = _patched
""")


@pytest.fixture
def run_interpreted():
    """``run_interpreted(code)``: runs ``code`` in a fresh Python with ``TRITON_INTERPRET=1``
    (Triton kernels executed on the CPU; set before Triton is imported, hence the subprocess)
    and the shim above, and fails the test unless its last line of output is ``ok``."""
    pytest.importorskip("triton")

    def run(code: str) -> None:
        env = dict(os.environ, TRITON_INTERPRET="1")
        out = subprocess.run([sys.executable, "-c", _SHIM + textwrap.dedent(code)], check=False, env=env,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]

    return run
