"""The exported feature-extractor contract (data.save_extractor / data.load_extractor)."""
import json

import pytest
import torch
from torch import nn

import data


def small_net():
    """A conv net with batch norm (eval mode must be baked in) and two resolutions, like a hypercolumn."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 6, 3, stride=2, padding=1))
    # non-trivial running statistics, so that a train-mode export would give different numbers
    net[1].running_mean.uniform_(-1, 1)
    net[1].running_var.uniform_(0.5, 2)
    return net


META = dict(input_size=[32, 40], kind="features", method="test", variant="tiny",
            channel_groups=[["a", 0, 2], ["b", 2, 6]])


def test_round_trip_same_outputs_at_other_batch_sizes(tmp_path):
    net = small_net()
    path = str(tmp_path / "tiny.pt2")
    meta = data.save_extractor(net, path, META, data.FACE_MEAN, data.FACE_STD)
    assert meta["channels"] == 6 and meta["output_size"] == [16, 20]

    extractor = data.load_extractor(path)
    reference = nn.Sequential(data.Normalize(data.FACE_MEAN, data.FACE_STD), net).eval()
    for batch in (1, 3, 7):  # exported with a batch of 2: the batch dimension must be dynamic
        images = torch.rand(batch, 3, 32, 40)
        with torch.no_grad():
            assert torch.allclose(extractor(images), reference(images), atol=1e-6)
    assert extractor.meta["channel_groups"] == [["a", 0, 2], ["b", 2, 6]]
    assert extractor.meta["mean"] == list(data.FACE_MEAN)


def test_normalisation_is_inside_the_extractor(tmp_path):
    """The extractor takes [0, 1] images: feeding the mean colour must give what 0 gives the bare net."""
    net = small_net().eval()
    path = str(tmp_path / "tiny.pt2")
    data.save_extractor(net, path, META, data.FACE_MEAN, data.FACE_STD)
    extractor = data.load_extractor(path)
    mean_image = torch.tensor(data.FACE_MEAN).view(1, 3, 1, 1).expand(2, 3, 32, 40)
    with torch.no_grad():
        assert torch.allclose(extractor(mean_image), net(torch.zeros(2, 3, 32, 40)), atol=1e-6)


def test_wrong_input_size_is_a_clear_error(tmp_path):
    path = str(tmp_path / "tiny.pt2")
    data.save_extractor(small_net(), path, META, data.FACE_MEAN, data.FACE_STD)
    with pytest.raises(ValueError, match="exported for 32x40"):
        data.load_extractor(path)(torch.rand(1, 3, 96, 96))


def test_fingerprint_sees_a_changed_parameter(tmp_path):
    path = str(tmp_path / "tiny.pt2")
    data.save_extractor(small_net(), path, META, data.FACE_MEAN, data.FACE_STD)
    extractor = data.load_extractor(path)
    before = extractor.state_fingerprint()
    assert extractor.state_fingerprint() == before
    with torch.no_grad():
        next(iter(extractor.module.parameters())).add_(1e-3)
    assert extractor.state_fingerprint() != before


def test_bad_files_are_clear_errors(tmp_path):
    with pytest.raises(data.DatasetError, match="no exported extractor"):
        data.load_extractor(str(tmp_path / "missing.pt2"))
    junk = tmp_path / "junk.pt2"
    junk.write_bytes(b"not a zip file")
    with pytest.raises(data.DatasetError, match="not a torch.export extractor file"):
        data.load_extractor(str(junk))


def test_exports_without_our_meta_are_clear_errors(tmp_path):
    program = torch.export.export(small_net().eval(), (torch.rand(2, 3, 32, 40),))
    bare, partial = str(tmp_path / "bare.pt2"), str(tmp_path / "partial.pt2")
    torch.export.save(program, bare)  # a torch.export file, but not made by data.save_extractor
    with pytest.raises(data.DatasetError, match="carries no meta.json; export it with data.save_extractor"):
        data.load_extractor(bare)
    torch.export.save(program, partial, extra_files={"meta.json": json.dumps({"kind": "features"})})
    with pytest.raises(data.DatasetError, match=r"its meta.json lacks \['input_size', 'channels'"):
        data.load_extractor(partial)


def test_meta_is_checked_when_saving(tmp_path):
    with pytest.raises(ValueError, match="lacks"):
        data.save_extractor(small_net(), str(tmp_path / "x.pt2"), {"kind": "features"}, (0, 0, 0), (1, 1, 1))
    bad_groups = dict(META, channel_groups=[["a", 0, 5]])
    with pytest.raises(ValueError, match="do not cover"):
        data.save_extractor(small_net(), str(tmp_path / "x.pt2"), bad_groups, (0, 0, 0), (1, 1, 1))


def test_meta_round_trips_as_json(tmp_path):
    path = str(tmp_path / "tiny.pt2")
    meta = data.save_extractor(small_net(), path, dict(META, kind="heatmaps"), (0, 0, 0), (1, 1, 1))
    loaded = data.load_extractor(path).meta
    assert loaded == json.loads(json.dumps(meta))
    assert loaded["kind"] == "heatmaps"


class CastingNet(nn.Module):
    """Has what made CPU exports fail on a GPU: a .float() cast (torch.export records its device) and arange."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x).float().softmax(1)
        return y * torch.arange(4, device=x.device, dtype=y.dtype).view(1, 4, 1, 1)


def test_an_export_runs_on_another_device_than_its_own():
    """Exported on 'meta', run on the CPU: what an extractor exported on the CPU meets on a GPU. Moving the weights
    alone fails ("Tensor device mismatch"); data.on_device also moves the devices the graph records."""
    net = nn.Sequential(data.Normalize(data.FACE_MEAN, data.FACE_STD), CastingNet()).to("meta")
    program = torch.export.export(net, (torch.rand(2, 3, 8, 8, device="meta"),))
    with pytest.raises(RuntimeError, match="device"):
        program.module().to_empty(device="cpu")(torch.rand(2, 3, 8, 8))
    module = data.on_device(program.module(), "cpu").to_empty(device="cpu")
    assert module(torch.rand(2, 3, 8, 8)).shape == (2, 4, 8, 8)
