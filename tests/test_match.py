"""match.py: the 70x70 scale, descriptor sampling and arg-max on hand-made maps, Acc(d), the pairs, oracle
versus random features on the synthetic faces, the frozen-extractor check and end-to-end runs of main()."""
import json

import pytest
import torch
from torch import nn

import data
import match
from test_regress import gaussian_bumps

pytestmark = pytest.mark.usefixtures("fast_cpu")


def export_tiny(path, size=96):
    """A random conv net at stride 4 (24x24 maps at 96 px) with two channel groups."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, stride=2, padding=1))
    meta = dict(input_size=[size, size], kind="features", method="test", variant="tiny",
                channel_groups=[["low", 0, 2], ["high", 2, 6]])
    data.save_extractor(net, str(path), meta, data.FACE_MEAN, data.FACE_STD)
    return str(path)


# ------------------------------------------------------------------------------------------------------------
# Pure functions
# ------------------------------------------------------------------------------------------------------------
def test_errors_are_rescaled_to_the_70x70_frame():
    """10 px at 96 px -> 10 * 70 / 96 = 7.29; on a 96 (H) x 48 (W) image x scales by 70 / 48, y by 70 / 96;
    invalid landmarks are dropped."""
    pred = torch.tensor([[[10.0, 0.0], [0.0, 10.0], [3.0, 4.0]]])
    truth = torch.zeros(1, 3, 2)
    valid = torch.tensor([[True, True, False]])
    assert match.matching_errors(pred, truth, valid, (96, 96)).tolist() == pytest.approx([700 / 96, 700 / 96])
    assert match.matching_errors(pred, truth, valid, (96, 48)).tolist() == pytest.approx([700 / 48, 700 / 96])


def test_descriptors_are_bilinear_samples_at_the_landmark():
    """A 3x3 map over a 5x5 image: cells sit on pixels 0, 2, 4; pixel (1, 0) lies halfway between two cells."""
    maps = torch.arange(9.0).view(1, 1, 3, 3)
    points = torch.tensor([[[2.0, 2.0], [1.0, 0.0], [4.0, 4.0]]])
    assert match.sample_descriptors(maps, points, (5, 5))[0, :, 0].tolist() == pytest.approx([4.0, 0.5, 8.0])


def test_arg_max_cell_is_mapped_to_input_pixels():
    """48x48 map of a 96 px image: cell (row 5, column 10) is the pixel (10 * 95 / 47, 5 * 95 / 47)."""
    maps = torch.zeros(1, 2, 48, 48)
    maps[0, 0, 5, 10] = 1.0
    maps[0, 1, 40, 3] = 1.0
    pred = match.best_matches(torch.tensor([[[1.0, 0.0], [0.0, 2.0]]]), maps, (96, 96))
    assert pred[0].flatten().tolist() == pytest.approx([10 * 95 / 47, 5 * 95 / 47, 3 * 95 / 47, 40 * 95 / 47])


def test_contrastlandmark_maps_are_upsampled_and_unit_norm_per_group():
    features = torch.randn(2, 6, 12, 12)
    maps = match.descriptor_maps(features, (96, 96), upsample=True, groups=[["a", 0, 2], ["b", 2, 6]])
    assert maps.shape == (2, 6, 96, 96)
    assert torch.allclose(maps[:, :2].norm(dim=1), torch.ones(2, 96, 96), atol=1e-5)
    assert torch.allclose(maps[:, 2:].norm(dim=1), torch.ones(2, 96, 96), atol=1e-5)


def test_accuracy_curve_by_hand():
    curve = match.accuracy_curve(torch.tensor([0.0, 1.5, 3.0]), max_distance=3)
    assert curve == pytest.approx([1 / 3, 1 / 3, 2 / 3, 1])


def test_pairs_follow_identities():
    """Synthetic faces (4 poses per identity): B is another identity, A2 another pose of A's identity.
    MAFL-like data (identities unknown, one pose): consecutive images, no third line."""
    faces = data.make_dataset("synth-faces", "test", normalize=False, length=40)
    triples = match.make_triples(faces, 10)
    assert [t[0] for t in triples] == list(range(0, 20, 2))
    for a, b, a2 in triples:
        assert faces[b]["identity"] != faces[a]["identity"] and faces[a2]["identity"] == faces[a]["identity"]
        assert a2 != a

    class Unknown:
        poses_per_identity, name = 1, "mafl-like"

        def __len__(self):
            return 1000
    assert match.make_triples(Unknown(), 500)[:2] == [(0, 1, None), (2, 3, None)]
    with pytest.raises(data.DatasetError, match="needs 1002 test images"):
        match.make_triples(Unknown(), 501)


# ------------------------------------------------------------------------------------------------------------
# Does the benchmark tell good features from bad?
# ------------------------------------------------------------------------------------------------------------
def test_oracle_features_match_almost_exactly_and_random_features_do_not():
    """Real benchmark pairs (TPS "match" warps, seed 0) of 16 synthetic faces; oracle features = a Gaussian bump
    per landmark at its true position in each image (48x48 maps), plus a constant channel so that L2
    normalisation does not blow up the empty background.

    Thresholds: with the dve variant a prediction is a cell centre, so the error is at most half a cell diagonal
    (1.43 px = 1.04 in the 70x70 frame) and ~0.56 on average; we require mean < 0.75 and max <= 1.05. The
    contrastlandmark variant (upsampled, normalised) must stay within 1.05 on average too. Random features are
    far off: > 10 in the 70x70 frame on average (about 30 measured)."""
    faces = data.make_dataset("synth-faces", "test", normalize=False, length=32)
    source, targets = match.warped_pairs(faces, match.make_triples(faces, 16), torch.Generator().manual_seed(0))
    assert set(targets) == {"same", "different", "same_by_construction"}

    def oracle(points):
        bumps = gaussian_bumps(points, 96, 48, sigma=3.0)
        return torch.cat([bumps, torch.full_like(bumps[:, :1], 0.1)], dim=1)  # (N, 6, 48, 48)
    groups = [["all", 0, 6]]
    for line, target in targets.items():
        valid = source["valid"] & target["valid"]
        runs = {"dve": (oracle(source["points"]), oracle(target["points"]), False, None),
                "contrastlandmark": (oracle(source["points"]), oracle(target["points"]), True, groups),
                "random": (torch.randn(16, 6, 48, 48), torch.randn(16, 6, 48, 48), False, None)}
        errors = {}
        for name, (f_src, f_tgt, upsample, g) in runs.items():
            pred = match.predict_matches(f_src, source["points"], f_tgt, (96, 96), upsample, g)
            errors[name] = match.matching_errors(pred, target["points"], valid, (96, 96))
        print(line, {k: round(v.mean().item(), 3) for k, v in errors.items()})
        assert errors["dve"].mean() < 0.75 and errors["dve"].max() <= 1.05
        assert errors["contrastlandmark"].mean() < 1.05
        assert errors["random"].mean() > 10


def test_oracle_equivariance_accuracy_is_high_and_random_is_low():
    """Acc(d) under rotation (+-30 degrees) and an elastic warp: the oracle (bumps as above, cosine similarity
    of upsampled maps) finds at least 90% of the landmarks within 3 px; random features under 30%."""
    faces = data.make_dataset("synth-faces", "test", normalize=False, length=8)
    kp = torch.stack([faces[i]["keypoints"] for i in range(8)])
    g = torch.Generator().manual_seed(0)
    warp = data.random_affine(8, rotation_deg=30, scale=(1, 1), translation=0, generator=g).then(
        data.random_elastic(8, generator=g))
    moved = data.warp_points(kp, warp, 96)

    def oracle(points):
        bumps = gaussian_bumps(points, 96, 48, sigma=3.0)
        return torch.cat([bumps, torch.full_like(bumps[:, :1], 0.1)], dim=1)
    acc = {}
    for name, (f, f_warped) in {"oracle": (oracle(kp), oracle(moved)),
                                "random": (torch.randn(8, 6, 48, 48), torch.randn(8, 6, 48, 48))}.items():
        pred = match.predict_matches(f, kp, f_warped, (96, 96), upsample=True, cosine=True)
        acc[name] = match.accuracy_curve((pred - moved).norm(dim=-1).flatten())
    assert acc["oracle"][3] >= 0.9 and acc["random"][3] < 0.3


# ------------------------------------------------------------------------------------------------------------
# Frozen check and end to end
# ------------------------------------------------------------------------------------------------------------
def test_frozen_assertion_fires_when_the_extractor_changes(tmp_path):
    extractor = data.load_extractor(export_tiny(tmp_path / "tiny.pt2"))
    before = extractor.state_fingerprint()
    match.assert_frozen(before, extractor.state_fingerprint())
    with torch.no_grad():
        next(iter(extractor.module.parameters()))[0] += 1e-3
    with pytest.raises(RuntimeError, match="frozen extractor changed"):
        match.assert_frozen(before, extractor.state_fingerprint())


def test_end_to_end_both_variants_equivariance_and_groups(tmp_path):
    a = export_tiny(tmp_path / "a.pt2")
    b = export_tiny(tmp_path / "b.pt2")
    common = ["--runs-dir", str(tmp_path / "runs"), "--device", "cpu", "--pairs", "6", "--batch-size", "4"]
    results = match.main(["--features", a, *common, "--equivariance", "--groups", "--equivariance-images", "4"])
    run_dir = tmp_path / "runs" / "match" / "a-synth-faces"
    assert set(results["matching"]["a"]) == {"same", "different", "same_by_construction"}
    assert results["matching"]["a"]["same"]["landmarks"] + results["matching"]["a"]["same"]["skipped"] == 30
    assert set(results["equivariance"]) == {"a", "a:low", "a:high"}
    assert len(results["equivariance"]["a"]["acc"]) == 21
    for name in ("matches.png", "equivariance.png", "results.json", "args_match.json", "log_match.jsonl"):
        assert (run_dir / name).stat().st_size > 0
    results = match.main(["--features", a, b, *common, "--variant", "contrastlandmark", "--name", "two"])
    saved = json.loads((tmp_path / "runs" / "match" / "two" / "results.json").read_text())
    assert set(saved["matching"]) == {"a", "b"} and saved["frozen_extractors_unchanged"]
    # the same weights and the same warps give the same numbers
    same_weights = saved["matching"]["a"]["different"]["mean_error"], saved["matching"]["b"]["different"]["mean_error"]
    assert same_weights[0] == pytest.approx(same_weights[1])


@pytest.mark.parametrize("flags, message", [
    (["--image-size", "64"], "takes 96x96 images"),
    (["--dataset", "mafl"], "--data-root"),
    (["--pairs", "501"], "needs 1002 test images"),
])
def test_bad_flags_stop_with_one_sentence(tmp_path, flags, message):
    with pytest.raises(SystemExit, match=message):
        match.main(["--features", export_tiny(tmp_path / "a.pt2"), "--runs-dir", str(tmp_path), *flags])
