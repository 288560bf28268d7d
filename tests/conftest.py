"""Shared test fixtures."""
import pytest
import torch
from torch.overrides import TorchFunctionMode


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


class HostSyncs(TorchFunctionMode):
    """Counts the tensor calls that make the host wait for a GPU: reading a value (.item(), bool(), .tolist()),
    data-dependent shapes (nonzero, masked indexing's nonzero) and copies to the host. On a CPU nothing waits,
    but the same calls are made, so counting them here tells what a training step would do on a GPU."""

    SYNCING = {"item", "tolist", "__bool__", "__int__", "__float__", "nonzero", "cpu", "numpy", "any", "all",
               "unique", "masked_select", "argwhere", "__index__"}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        any_all = name in ("any", "all") and not (args[1:] or kwargs)  # a reduction to one value tested in Python
        indices = args[1] if name == "__getitem__" and len(args) > 1 else ()
        boolean_index = any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                            for i in (indices if isinstance(indices, tuple) else (indices,)))
        if name in self.SYNCING - {"any", "all"} or any_all or boolean_index:
            self.calls.append("boolean index" if boolean_index else name)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def host_syncs():
    """`with host_syncs as counter: step()` then `counter.calls` lists the syncing calls made inside."""
    return HostSyncs()
