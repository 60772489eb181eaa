"""Fixtures shared by several test files."""

import pytest

from smartkv import kernels


@pytest.fixture(scope="module")
def kernel():
    if kernels.disabled():
        pytest.skip("SMARTKV_NO_KERNEL=1 is set: the PyTorch path is in use on purpose")
    assert kernels.kernel_available()  # a failed build raises KernelBuildError: the test errors
    return kernels
