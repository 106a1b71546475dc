"""The mixture kernel's phases reproduce the recorded outputs of the single-function kernel
they were split from (``tests/mixture_cases.py``)."""

import mixture_cases as mc
import pytest
import torch

REFERENCE = torch.load(mc.REFERENCE, weights_only=True)


@pytest.mark.parametrize("case", mc.cases(), ids=lambda c: c["name"])
def test_kernel_phases_reproduce_recorded_outputs(case):
    expected = REFERENCE["outputs"][case["name"]]
    out = mc.outputs(case)
    assert set(out) == set(expected)
    for key, ref in expected.items():
        if REFERENCE["machine"] == mc.machine():  # same build and CPU kind: same bits
            assert torch.equal(out[key], ref), (case["name"], key)
        else:  # another BLAS kernel may sum in another order
            tol = 1e-12 if ref.dtype == torch.float64 else 1e-5
            assert torch.allclose(out[key], ref, rtol=tol, atol=tol), (case["name"], key)
