"""The run helpers every script shares (data.py section 7): precision choice, determinism, the epoch-keyed loader."""
import pytest
import torch

import data


@pytest.mark.parametrize("device, capability, expected", [
    ("cuda", (7, 5), torch.float16),   # T4: no native bf16 -> fp16 with loss scaling
    ("cuda", (7, 0), torch.float16),   # V100
    ("cuda", (8, 0), torch.bfloat16),  # A100
    ("cuda", (9, 0), torch.bfloat16),  # H100
    ("cpu", None, torch.bfloat16),
    ("mps", None, None)])
def test_amp_auto_picks_bf16_only_where_it_is_native(device, capability, expected):
    assert data.amp_dtype(torch.device(device), "auto", capability) == expected
    assert data.amp_dtype(torch.device(device), "none", capability) is None


def test_loss_scaling_is_on_for_fp16_only():
    assert data.grad_scaler(torch.device("cpu"), torch.float16).is_enabled()
    assert not data.grad_scaler(torch.device("cpu"), torch.bfloat16).is_enabled()


def test_deterministic_warns_instead_of_crashing():
    """Ops without a deterministic GPU kernel (upsampling's and grid_sample's backward) must warn, not raise."""
    try:
        data.seed_everything(0, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        data.seed_everything(0, deterministic=False)


class EpochViews(torch.utils.data.Dataset):
    """A sample that depends on its epoch, as augmented views do; the epoch comes in with the key."""

    def __len__(self):
        return 8

    def __getitem__(self, key):
        epoch, index = key
        return {"x": torch.rand(3, generator=data.generator(0, epoch, index)), "index": torch.tensor(index)}


def epochs_of(workers):
    loader = data.make_loader(EpochViews(), 4, seed=1, workers=workers, device=torch.device("cpu"))
    out = []
    for epoch in range(3):
        loader.batch_sampler.epoch, loader.batch_sampler.start = epoch, 0
        out.append(torch.cat([batch["x"] for batch in loader]))
    return out


def test_persistent_workers_follow_the_epoch():
    """With persistent workers (made once, never told about the parent's state) every epoch still draws new
    views, the same ones as in the main process."""
    main, workers = epochs_of(0), epochs_of(1)
    for a, b in zip(main, workers):
        assert torch.equal(a, b)
    assert not torch.equal(main[0], main[1]) and not torch.equal(main[1], main[2])


def test_a_resumed_epoch_skips_the_batches_it_did():
    sampler = data.EpochBatches(10, 3, seed=0)
    sampler.epoch = 2
    full = list(sampler)
    sampler.start = 1
    assert list(sampler) == full[1:] and len(sampler) == 2 and len(full) == 3
