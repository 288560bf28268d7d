"""The research tools behind docs/moco_hypercol.md and docs/byol_lead.md (docs/diagnose_scale.py and
docs/diagnose_variance.py): they rescale or split exported features exactly as their docstrings say."""
import os
import sys

import pytest
import torch

import data
from test_extractor import META, small_net  # tests/ is on sys.path while pytest runs these files

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs"))
import diagnose_scale  # noqa: E402
import diagnose_variance  # noqa: E402


SCALE_META = dict(META, input_size=[96, 96])  # diagnose_scale.py renders the faces at the exported size


def test_diagnose_scale_rescales_each_group_to_the_reference_norms(tmp_path):
    """docs/diagnose_scale.py: one scalar per channel group, chosen so that each group's mean norm per
    location equals the reference's on the same images; everything else unchanged."""
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
    """docs/diagnose_variance.py: the three parts are orthogonal, so their variances add up to the total; a map
    that is the same in every image is all position, one constant per image all image, and the local part of a
    signal in r independent directions has an effective rank of about r."""
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
