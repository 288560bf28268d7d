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


SCALE_META = dict(META, input_size=[96, 96])  # diagnose_scale.py renders the faces at the exported size


def test_diagnose_scale_rescales_each_group_to_the_reference_norms(tmp_path):
    """tests/diagnose_scale.py: one scalar per channel group, chosen so that each group's mean norm per
    location equals the reference's on the same images; everything else unchanged."""
    import diagnose_scale  # tests/ is on sys.path while pytest runs these files
    reference, features, out = (str(tmp_path / f"{n}.pt2") for n in ("reference", "features", "out"))
    data.save_extractor(small_net(), reference, SCALE_META, (0, 0, 0), (1, 1, 1))
    louder = small_net()
    with torch.no_grad():
        louder[3].weight[:2] *= 3.0  # group "a" three times larger, group "b" unchanged
        louder[3].bias[:2] *= 3.0
    data.save_extractor(louder, features, SCALE_META, (0, 0, 0), (1, 1, 1))
    diagnose_scale.main(["--reference", reference, "--features", features, "--out", out, "--images", "4"])
    images = diagnose_scale.first_images("synth-faces", 96, 4)  # the images the script measured
    with torch.no_grad():
        ref, feat, scaled = (data.load_extractor(p)(images) for p in (reference, features, out))
    torch.testing.assert_close(scaled[:, :2], feat[:, :2] / 3.0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(scaled[:, 2:], feat[:, 2:], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(scaled, ref, rtol=1e-4, atol=1e-5)


def test_diagnose_scale_equal_norm_gives_every_group_the_same_norm(tmp_path):
    """--equal-norm N: every group's mean norm per location becomes N / sqrt(groups), directions unchanged."""
    import diagnose_scale
    features, out = str(tmp_path / "features.pt2"), str(tmp_path / "out.pt2")
    data.save_extractor(small_net(), features, SCALE_META, (0, 0, 0), (1, 1, 1))
    diagnose_scale.main(["--features", features, "--equal-norm", "6", "--out", out, "--images", "4"])
    images = diagnose_scale.first_images("synth-faces", 96, 4)
    with torch.no_grad():
        feat, scaled = (data.load_extractor(p)(images) for p in (features, out))
    for _, a, b in META["channel_groups"]:
        assert scaled[:, a:b].norm(dim=1).mean().item() == pytest.approx(6 / 2 ** 0.5, rel=1e-4)
        factor = scaled[:, a:b].norm() / feat[:, a:b].norm()  # one scalar per group
        torch.testing.assert_close(scaled[:, a:b], feat[:, a:b] * factor, rtol=1e-4, atol=1e-5)
    with pytest.raises(SystemExit):  # exactly one of --reference and --equal-norm
        diagnose_scale.main(["--features", features, "--images", "4"])


def test_diagnose_variance_parts_add_up_and_separate_position_image_and_local():
    """tests/diagnose_variance.py: the three parts are orthogonal, so their variances add up to the total; a map
    that is the same in every image is all position, one constant per image all image, and the local part of a
    signal in r independent directions has an effective rank of about r."""
    import diagnose_variance
    g = torch.Generator().manual_seed(0)
    features = torch.randn(5, 3, 4, 6, generator=g) + torch.randn(1, 3, 4, 6, generator=g) \
        + torch.randn(5, 3, 1, 1, generator=g)
    parts, local = diagnose_variance.variance_parts(features)
    assert parts["position"] + parts["image"] + parts["local"] == pytest.approx(parts["total"], rel=1e-9)
    assert local.shape == (5 * 4 * 6, 3)
    torch.testing.assert_close(local.mean(dim=0), torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-12)
    position_only = torch.randn(1, 3, 4, 6, generator=g).expand(5, 3, 4, 6)
    image_only = torch.randn(5, 3, 1, 1, generator=g).expand(5, 3, 4, 6)
    for tensor, key in ((position_only, "position"), (image_only, "image")):
        parts, _ = diagnose_variance.variance_parts(tensor)
        assert parts[key] == pytest.approx(parts["total"], rel=1e-9)
    rank2 = torch.randn(4000, 2, generator=g).double() @ torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]).double()
    assert diagnose_variance.effective_rank(rank2 - rank2.mean(dim=0)) == pytest.approx(2, rel=0.05)


def test_diagnose_variance_runs_on_an_exported_extractor(tmp_path, capsys):
    import diagnose_variance
    path = str(tmp_path / "features.pt2")
    data.save_extractor(small_net(), path, SCALE_META, (0, 0, 0), (1, 1, 1))
    diagnose_variance.main(["--features", path, "--images", "3"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[1] for line in lines[1:]] == ["a", "b", "all"]  # both groups, then all channels
    for line in lines[1:]:
        position, image, local = (float(x) for x in line.split()[4:7])
        assert position + image + local == pytest.approx(1, abs=2e-3)  # shares printed to 3 decimals


def test_diagnose_variance_out_removes_the_position_part_only(tmp_path):
    """--out: on the images it was measured on, the copy has no position part and the same image and local parts
    (the same features minus one fixed map)."""
    import diagnose_variance
    features, out = str(tmp_path / "features.pt2"), str(tmp_path / "out.pt2")
    data.save_extractor(small_net(), features, SCALE_META, (0, 0, 0), (1, 1, 1))
    diagnose_variance.main(["--features", features, "--images", "3", "--out", out])
    images = diagnose_variance.first_images("synth-faces", 96, 3)  # the images it measured
    with torch.no_grad():
        before, after = (diagnose_variance.variance_parts(data.load_extractor(p)(images))[0] for p in (features, out))
    assert before["position"] > 0.05 * before["total"]
    assert after["position"] == pytest.approx(0, abs=1e-6 * before["total"])
    for key in ("image", "local"):
        assert after[key] == pytest.approx(before[key], rel=1e-4)
    with pytest.raises(SystemExit):  # --out takes one extractor
        diagnose_variance.main(["--features", features, features, "--images", "3", "--out", out])


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
