"""The run helpers every script shares (data.py section 7): precision choice, determinism, the epoch-keyed loader."""
import os

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


def test_uint8_images_round_the_dataset_images_for_any_epoch():
    dataset = [{"image": torch.rand(3, 8, 8)} for _ in range(3)]
    images = data.Uint8Images(dataset)
    assert len(images) == 3
    item = images[(5, 2)]["image"]
    assert item.dtype == torch.uint8 and torch.equal(item, images[(0, 2)]["image"])
    assert (item.float() / 255 - dataset[2]["image"]).abs().max() <= 0.5 / 255 + 1e-6
    assert torch.equal(data.first_images(dataset, 10), torch.stack([d["image"] for d in dataset]))


def test_nmf_basis_fits_features_made_of_k_parts():
    parts = torch.rand(4, 16)  # features that are sums of 4 non-negative parts
    features = (torch.rand(6, 5, 5, 4) @ parts).permute(0, 3, 1, 2)  # 6 x 16 x 5 x 5
    basis, record = data.nmf_basis(features, 4, 300, seed=0)
    assert basis.shape == (4, 16) and (basis >= 0).all()
    assert record["images"] == 6 and record["k"] == 4 and record["relative_error"] < 0.05


def test_pca_rgb_colours_by_the_main_direction(tmp_path):
    direction = torch.randn(32)
    weight = torch.linspace(-1, 1, 10).view(1, 1, 1, 10)  # one strong direction along the width
    features = direction.view(1, 32, 1, 1) * weight.expand(2, 1, 3, 10) + 0.01 * torch.randn(2, 32, 3, 10)
    rgb = data.pca_rgb(features)
    assert rgb.shape == (2, 3, 3, 10) and rgb.min() >= 0 and rgb.max() <= 1
    first = rgb[:, 0]  # the first component is monotonic in the width (either sign)
    assert (first[..., -1] - first[..., 0]).abs().min() > 0.9
    data.save_pictures(tmp_path / "p.png", torch.rand(2, 3, 12, 40), rgb)
    assert os.path.getsize(tmp_path / "p.png") > 0


def test_missing_imagenet_weights_stop_with_a_sentence(monkeypatch):
    def offline(*_, **__):
        raise OSError("no network")
    monkeypatch.setattr(data.torchvision.models, "get_model", offline)
    with pytest.raises(SystemExit, match="drop --imagenet-init"):
        data.torchvision_model("resnet18", imagenet=True)


def test_training_images_cut_the_split_and_explain_a_missing_dataset(tmp_path):
    info, train_set = data.training_images("synth-faces", None, 32, n=5)
    assert len(train_set) == 5 and len(info) > 5 and train_set[0]["image"].min() >= 0  # RGB in [0, 1]
    with pytest.raises(SystemExit, match="error: "):
        data.training_images("celeba", str(tmp_path / "missing"), 32)
