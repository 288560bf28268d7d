"""Shared test fixtures."""
import pytest
import torch


@pytest.fixture
def fast_cpu():
    """One intra-op thread (on a shared 2-core machine, two OpenMP threads spinning against other processes made
    these small tensor ops up to 7x slower, measured) and denormal floats flushed to zero, as regress.py does
    (DVE's sharp softmax underflows); both restored afterwards for the other tests."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)
    torch.set_num_threads(before)
