"""equiv_pretrain.py: the losses against naive loops and hand-made heatmaps (the blocked Eq. 7 against the plain
one), the views against per-image references and their ranges, the float32 warp under --amp, host syncs of a
whole step, exports on another device, and (marked slow) the script end to end: both stages and the end-to-end
baseline, bit-exact resume, exports, regress.py and match.py on them, and a check that stage 1 learns.

Tiny settings throughout (64 px or less, a narrow hourglass, batches of 2-8): `-m "not slow"` runs in seconds.
"""
import json
import math
import os

import pytest
import torch
from torch import nn

import data
import equiv_pretrain as ep

pytestmark = pytest.mark.usefixtures("fast_cpu")

TINY = ["--image-size", "64", "--train-images", "8", "--batch-size", "4", "--workers", "0", "--equiv-widths",
        "8,8,16,16", "--equiv-points", "16", "--equiv-k", "4", "--equiv-det-width", "8", "--equiv-det-epochs", "1"]


def run(tmp_path, *flags):
    ep.main(["--runs-dir", str(tmp_path), *TINY, *flags])
    return os.path.join(str(tmp_path), "equiv_pretrain", "default")


def gaussian_heatmaps(points, size, sigma=1.5):
    """(B, K, 2) pixel points -> (B, K, size, size) normalised Gaussian bumps centred on them."""
    ys, xs = torch.meshgrid(torch.arange(float(size)), torch.arange(float(size)), indexing="ij")
    d2 = (xs - points[..., 0, None, None]) ** 2 + (ys - points[..., 1, None, None]) ** 2
    maps = torch.exp(-d2 / (2 * sigma ** 2))
    return maps / maps.sum((2, 3), keepdim=True)


def test_equivariant_contrastive_loss_matches_a_naive_double_loop():
    torch.manual_seed(0)
    f, f_prime, tau = torch.randn(3, 5), torch.randn(3, 5), 0.1
    anchors = [nn.functional.normalize(v, dim=0) for v in list(f) + list(f_prime)]  # 2N features
    cos = lambda a, b: float(anchors[a] @ anchors[b])  # noqa: E731
    expected, with_self = 0.0, 0.0
    for a in range(6):
        positive = (a + 3) % 6  # f_i <-> f'_i
        others = sum(math.exp(cos(a, v) / tau) for v in range(6) if v != a)  # every feature but the anchor
        expected += -math.log(math.exp(cos(a, positive) / tau) / others) / 6
        with_self += -math.log(math.exp(cos(a, positive) / tau) / (others + math.exp(1 / tau))) / 6
    loss = ep.equivariant_contrastive_loss(f, f_prime, tau, torch.ones(3, dtype=torch.bool)).item()
    assert loss == pytest.approx(expected, rel=1e-5)
    assert abs(loss - with_self) > 1e-3  # the self-similarity term would change the value: it is left out


def test_masked_pairs_are_neither_anchors_nor_negatives_and_the_blocked_loss_equals_the_plain_one():
    """A pair whose point left the frame is masked (no boolean indexing, which would make a GPU wait): the loss
    equals the plain loss on the kept pairs alone. The blocked variant (anchors in blocks, each recomputed in the
    backward pass) gives the same value and gradient, including a last block shorter than the others."""
    torch.manual_seed(0)
    f, f_prime = torch.randn(150, 8, requires_grad=True), torch.randn(150, 8)
    keep = torch.rand(150) > 0.2
    plain = ep.equivariant_contrastive_loss(f, f_prime, 0.1, keep)
    subset = ep.equivariant_contrastive_loss(f[keep], f_prime[keep], 0.1, torch.ones(int(keep.sum()), dtype=torch.bool))
    assert plain.item() == pytest.approx(subset.item(), rel=1e-5)
    blocked = ep.equivariant_contrastive_loss_blocked(f, f_prime, 0.1, keep, rows=64)  # 300 anchors: 64 x 4 + 44
    assert blocked.item() == pytest.approx(plain.item(), rel=1e-6)
    grad_plain, = torch.autograd.grad(plain, f)
    grad_blocked, = torch.autograd.grad(blocked, f)
    assert torch.allclose(grad_plain, grad_blocked, atol=1e-7) and grad_plain[~keep].abs().max() == 0


def test_the_blocked_loss_keeps_no_square_tensor_for_the_backward_pass():
    """What the backward pass keeps is what grows with the batch: the plain loss keeps (2N)^2 tensors (16 GB at
    batch 256 with 64 points), the blocked one only N-sized ones (each block's rows x 2N logits are recomputed)."""
    torch.manual_seed(0)
    n, rows = 512, 128
    f, f_prime, keep = torch.randn(n, 16, requires_grad=True), torch.randn(n, 16), torch.ones(n, dtype=torch.bool)

    def largest_saved(loss_fn):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            loss_fn(f, f_prime, 0.1, keep).backward()
        return max(sizes)

    assert largest_saved(ep.equivariant_contrastive_loss) == (2 * n) ** 2
    assert largest_saved(lambda *a: ep.equivariant_contrastive_loss_blocked(*a, rows=rows)) <= 2 * n * 16


def test_sample_features_reads_exact_pixels_and_interpolates_between_them():
    f = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)
    pixels = torch.tensor([[[0.0, 0.0], [4.0, 3.0]], [[2.0, 1.0], [2.5, 1.0]]])  # (x, y)
    out = ep.sample_features(f, data.to_normalised(pixels, (4, 5)))  # 2 x 2 x 3
    assert torch.allclose(out[0, 0], f[0, :, 0, 0]) and torch.allclose(out[0, 1], f[0, :, 3, 4])
    assert torch.allclose(out[1, 0], f[1, :, 1, 2])
    assert torch.allclose(out[1, 1], (f[1, :, 1, 2] + f[1, :, 1, 3]) / 2, atol=1e-5)


def test_equivariance_loss_is_zero_for_an_exactly_equivariant_detector():
    """A detector that returns Gaussian bumps at the true landmarks of the synthetic faces is equivariant by
    construction: its landmarks on g x are the warped true landmarks."""
    size = 64
    faces = data.make_dataset("synth-faces", "test", size=size, normalize=False, length=4)
    kp = torch.stack([faces[i]["keypoints"] for i in range(4)])  # 4 x 5 x 2 pixels
    warp = ep.random_warp(4, ep.get_args([]), data.generator(0, 0), "cpu", zoom_and_shift=False)
    points = ep.expected_location(gaussian_heatmaps(kp, size))  # what the oracle detector finds on x
    points_warped = ep.expected_location(gaussian_heatmaps(data.warp_points(kp, warp, size), size))  # on g x
    assert ep.equivariance_loss(points, points_warped, warp).item() < 1e-8
    assert ep.equivariance_loss(points, points, warp).item() > 1e-3  # a detector blind to the warp is not


def test_diversity_loss_is_high_when_heatmaps_coincide_and_zero_when_disjoint():
    k, size, patch = 4, 16, 4
    same = torch.zeros(1, k, size, size)
    same[:, :, 5, 5] = 1.0  # all four landmarks on one pixel
    disjoint = torch.zeros(1, k, size, size)
    for j in range(k):
        disjoint[0, j, 1 + 4 * j, 2] = 1.0  # one per 4x4 patch row
    assert ep.diversity_loss(same, patch).item() == pytest.approx(k - 1)
    assert ep.diversity_loss(disjoint, patch).item() == 0.0
    near = disjoint.clone()
    near[0, 1] = torch.roll(near[0, 0], 1, dims=1)  # map 1 one pixel below map 0: the same patch
    assert ep.diversity_loss(near, patch).item() == pytest.approx(1.0)


def test_variance_penalty_is_zero_for_a_delta_and_the_trace_of_the_covariance_otherwise():
    delta = torch.zeros(2, 3, 32, 32)
    delta[:, :, 7, 20] = 1.0
    assert ep.variance_loss(delta).item() == pytest.approx(0.0, abs=1e-6)
    bumps = gaussian_heatmaps(torch.full((1, 2, 2), 15.5), 32, sigma=2.0)
    expected = 2 * 2 * (2.0 * 2 / 31) ** 2  # 2 maps x (var x + var y), sigma in normalised units
    assert ep.variance_loss(bumps).item() == pytest.approx(expected, rel=1e-3)
    assert ep.variance_loss(torch.full((1, 1, 32, 32), 1 / 32 ** 2)).item() > 0.6  # uniform: 2 x 1/3 x (33/31)


@pytest.mark.parametrize("size", [96, 128])
def test_hourglass_keeps_the_resolution_and_outputs_d_channels(size):
    torch.manual_seed(0)
    model = ep.Hourglass().eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, size, size)).shape == (1, 64, size, size)
    assert len(model.down) == 4 and len(model.up) == 4
    heatmaps = ep.Detector(64, 10, 8)(torch.randn(1, 64, 16, 16))
    assert heatmaps.shape == (1, 10, 16, 16) and torch.allclose(heatmaps.sum((2, 3)), torch.ones(1, 10))


def test_warps_map_sampled_points_exactly_and_their_parameters_stay_in_range():
    args = ep.get_args([])
    image = torch.zeros(1, 1, 64, 64)
    image[0, 0, 20, 30] = 1.0  # one bright pixel, at (x, y) = (30, 20)
    warp = ep.random_warp(1, args, data.generator(0, 0), "cpu", zoom_and_shift=True)
    warped = data.warp_images(image, warp)
    moved = data.warp_points(torch.tensor([[[30.0, 20.0]]]), warp, 64)[0, 0]  # where g sends it
    peak = warped[0, 0].flatten().argmax()
    assert (torch.tensor([peak % 64, peak // 64]).float() - moved).norm() < 1.0
    affine = ep.random_warp(500, args, data.generator(0, 1), "cpu", zoom_and_shift=True).warps[0]
    forward = data._invert_affine(affine.theta)  # content map x -> s R x + t
    zoom, angle = forward[:, :, :2].det().sqrt(), torch.atan2(forward[:, 1, 0], forward[:, 0, 0]).rad2deg()
    assert 1 / 1.25 - 1e-5 <= zoom.min() < 0.85 and 1.2 < zoom.max() <= 1.25 + 1e-5  # log-uniform range, filled
    assert -30 <= angle.min() < -25 and 25 < angle.max() <= 30 and forward[:, :, 2].abs().max() <= 0.1
    plain = ep.random_warp(500, args, data.generator(0, 1), "cpu", zoom_and_shift=False).warps[0]
    assert torch.allclose(data._invert_affine(plain.theta)[:, :, :2].det(), torch.ones(500), atol=1e-5)


def test_appearance_on_the_batch_equals_a_per_image_reference_with_the_same_draws():
    x = torch.rand(5, 3, 8, 8)
    y = ep.appearance(x, 0.3, 0.04, data.generator(0, 7))
    u = torch.rand(3, 5, generator=data.generator(0, 7))  # the same draws: brightness, contrast, noise level
    assert u[2].max() > 0.5 and u[:2].min() < 0.5  # (the three factors are not degenerate here)
    for i in range(5):
        bright = x[i] * (1 + 0.3 * (2 * u[0, i] - 1))
        contrasted = (bright - bright.mean()) * (1 + 0.3 * (2 * u[1, i] - 1)) + bright.mean()
        noise = y[i] - contrasted  # where not clamped, the noise alone; its std is the drawn level
        inside = (y[i] > 0) & (y[i] < 1)
        assert noise[inside].std().item() == pytest.approx(0.04 * u[2, i].item(), rel=0.25, abs=2e-3)
    assert y.min() >= 0 and y.max() <= 1 and torch.equal(y, ep.appearance(x, 0.3, 0.04, data.generator(0, 7)))
    assert not torch.equal(y, ep.appearance(x, 0.3, 0.04, data.generator(0, 8)))


def test_the_worker_side_returns_uint8_images_and_draws_nothing():
    faces = data.make_dataset("synth-faces", "train", size=32, normalize=False, length=4)
    images = data.Uint8Images(faces)
    sample = images[(3, 2)]
    assert sample["image"].dtype == torch.uint8 and sample["image"].shape == (3, 32, 32)
    assert torch.equal(sample["image"], images[(0, 2)]["image"])  # the epoch changes nothing: views are drawn later
    assert (sample["image"].float() / 255 - faces[2]["image"]).abs().max() <= 0.5 / 255 + 1e-6


def states(args, end2end=False):
    """Tiny F and T with the optimiser state main gives a stage ("features" in it: F is trained)."""
    features, detector = ep.Hourglass((4, 4, 4, 4), 8), ep.Detector(8, 3, 4)
    trained = {"detector": detector} | ({"features": features} if end2end else {})
    optimizer = torch.optim.Adam([p for m in [features, detector] for p in m.parameters()], lr=1e-3)
    return features, trained | {"model": features, "optimizer": optimizer, "scaler": data.grad_scaler(
        torch.device("cpu"), torch.bfloat16), "scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1)}


SMALL = ["--image-size", "32", "--equiv-widths", "4,4,4,4", "--equiv-dim", "8", "--equiv-points", "8"]


def test_stage2_warps_the_images_in_float32_under_amp():
    """Under bf16 autocast the warp's sampling grid would be computed in bf16 (measured 0.05 px mean, 0.45 px max
    off the float32 point map); the images F sees must be warped by the float32 map that Eq. 2 undoes."""
    args = ep.get_args(SMALL)
    features, state = states(args)
    seen = []
    features.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].detach()))
    x, normalize = torch.rand(2, 3, 32, 32), data.Normalize(data.FACE_MEAN, data.FACE_STD)
    ep.detector_step(state, features, x, data.generator(0, 3), args, normalize, torch.bfloat16)
    warp = ep.random_warp(2, args, data.generator(0, 3), "cpu", zoom_and_shift=False)
    expected = normalize(data.warp_images(x, warp))  # float32, no autocast
    assert seen[0].dtype == torch.float32 and (seen[0][2:] - expected).abs().max() < 1e-5
    with data.autocast(torch.device("cpu"), torch.bfloat16):  # what warping inside autocast would have given
        assert (normalize(data.warp_images(x, warp)) - expected).abs().max() > 1e-3


@pytest.mark.filterwarnings("ignore:Seems like:UserWarning")  # the scheduler notices our counting wrapper
@pytest.mark.parametrize("stage", ["stage1", "stage2", "end2end"])
def test_a_training_step_makes_no_host_sync(stage, host_syncs):
    """One whole step (views, forward, losses, backward, Adam) under bf16 autocast."""
    args = ep.get_args(SMALL)
    features, state = states(args, end2end=stage == "end2end")
    x, normalize = torch.rand(2, 3, 32, 32), data.Normalize(data.FACE_MEAN, data.FACE_STD)
    optimizer, adam_reads = state["optimizer"], []
    adam_step = optimizer.step

    def step_apart(*a, **k):  # Adam reads its step counters with .item(): CPU tensors even for GPU weights
        before = len(host_syncs.calls)
        adam_step(*a, **k)
        adam_reads.extend(host_syncs.calls[before:])
        del host_syncs.calls[before:]

    optimizer.step = step_apart
    with host_syncs as counter:
        if stage == "stage1":
            terms = ep.stage1_step(state, x, data.generator(0, 0), args, normalize, torch.bfloat16)
        else:
            terms = ep.detector_step(state, features, x, data.generator(0, 0), args, normalize, torch.bfloat16)
    assert set(terms) == ({"loss"} if stage == "stage1" else {"loss", "equivariance", "diversity", "concentration"})
    assert set(adam_reads) == {"item"} and all(s["step"].device.type == "cpu" for s in optimizer.state.values())
    assert counter.calls == []  # stage 1 includes g(lambda) by Newton's method (data.Warp.forward)


@pytest.mark.parametrize("kind", ["features", "heatmaps"])
def test_an_export_runs_on_another_device_than_its_own(kind):
    """Exported on 'meta' (as an export made on a CPU meets a GPU), loaded and run on the CPU."""
    features = ep.Hourglass((4, 4, 4, 4), 8)
    net = features if kind == "features" else nn.Sequential(features, ep.Detector(8, 3, 4))
    net = nn.Sequential(data.Normalize(data.FACE_MEAN, data.FACE_STD), net).eval().to("meta")
    program = torch.export.export(net, (torch.rand(2, 3, 32, 32, device="meta"),))
    module = data.on_device(program.module(), "cpu").to_empty(device="cpu")
    assert module(torch.rand(2, 3, 32, 32)).shape == (2, 8 if kind == "features" else 3, 32, 32)


@pytest.mark.slow
def test_stages_resume_export_and_evaluate(tmp_path):
    import evaluate_exports  # regress.py and match.py, only for this test
    path = run(tmp_path, "--stop-after-steps", "1")  # interrupted in the middle of stage 1
    assert not os.path.exists(os.path.join(path, "features.pt2"))
    with pytest.raises(SystemExit):  # a second run does not overwrite the checkpoint silently
        run(tmp_path)
    run(tmp_path, "--resume", "--stop-after-steps", "1")  # stage 1 ends, stage 2 is interrupted after step 1
    assert os.path.exists(os.path.join(path, "features.pt2")) and not os.path.exists(os.path.join(path, "heatmaps.pt2"))
    run(tmp_path, "--stage", "2", "--resume")
    run(tmp_path, "--end-to-end", "--stop-after-steps", "3")
    run(tmp_path, "--end-to-end", "--resume")
    for variant in ("features", "heatmaps", "end2end_features", "end2end_heatmaps"):
        assert os.path.exists(os.path.join(path, f"{variant}.pt2"))
    for picture in ("landmarks.png", "end2end_landmarks.png"):
        assert os.path.getsize(os.path.join(path, picture)) > 1000
    with open(os.path.join(path, "log_end2end.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records if "epoch" in r] == [2, 4]  # --epochs 1 + --equiv-det-epochs 1
    heatmaps = data.load_extractor(os.path.join(path, "heatmaps.pt2"))
    assert heatmaps.meta["kind"] == "heatmaps"
    maps = heatmaps(torch.rand(3, 3, 64, 64))
    assert maps.shape == (3, 4, 64, 64) and torch.allclose(maps.sum((2, 3)), torch.ones(3, 4), atol=1e-4)
    assert data.load_extractor(os.path.join(path, "features.pt2"))(torch.rand(1, 3, 64, 64)).shape == (1, 64, 64, 64)

    evaluate_exports.regression_error(path, tmp_path, "features")
    evaluate_exports.regression_error(path, tmp_path, "heatmaps", "--head", "ridge")
    results = evaluate_exports.matching(path, tmp_path, ["features", "end2end_features"], "--equivariance",
                                        "--equivariance-images", "8")
    assert set(results["equivariance"]) == {"features", "end2end_features"}


@pytest.mark.slow
def test_resume_is_bit_exact(tmp_path):
    """2 epochs of 2 steps straight, versus stopped after step 3 (mid-epoch) and resumed: identical weights, so
    the warps, points and appearance changes drawn in the step were the same."""
    flags = ["--stage", "1", "--epochs", "2", "--deterministic"]
    straight = run(tmp_path / "a", *flags)
    run(tmp_path / "b", *flags, "--stop-after-steps", "3")
    resumed = run(tmp_path / "b", *flags, "--resume")
    a, b = [data.load_checkpoint(os.path.join(p, "checkpoint_stage1.pt")) for p in (straight, resumed)]
    assert a["step"] == b["step"] == 4 and set(a) == {"state", "step", "args"}  # no random states
    for key, value in a["state"]["model"].items():
        assert torch.equal(value, b["state"]["model"][key]), f"model.{key} differs after resume"


@pytest.mark.slow
def test_stage1_learns_equivariant_features_on_the_synthetic_faces(tmp_path):
    """Some 30 steps of Eq. 7 make the features of a point and of its warped image more alike than those of
    other points: the loss on held-out warped pairs falls compared with the same network at initialisation."""
    path = run(tmp_path, "--stage", "1", "--train-images", "240", "--batch-size", "8", "--equiv-widths",
               "16,16,16,16")
    faces = data.make_dataset("synth-faces", "val", size=64, normalize=False, length=16)
    x = torch.stack([faces[i]["image"] for i in range(16)])
    args = ep.get_args(["--image-size", "64"])
    g = data.generator(123)
    warp = ep.random_warp(16, args, g, "cpu", zoom_and_shift=True)
    x_prime = ep.appearance(data.warp_images(x, warp), 0.3, 0.04, g)
    lam = 2 * torch.rand(16, 16, 2, generator=g) - 1
    lam_prime = warp.forward(lam)
    keep = (lam_prime.abs() <= 1).all(-1).flatten()
    normalize = data.Normalize(faces.mean, faces.std)

    def held_out_loss(model):
        with torch.no_grad():  # train mode: batch statistics, the same for both networks
            f, f_prime = model.train()(normalize(torch.cat([x, x_prime]))).chunk(2)
        pairs = ep.sample_features(f, lam), ep.sample_features(f_prime, lam_prime.nan_to_num())  # B x P x D each
        return ep.equivariant_contrastive_loss(*(p.flatten(0, 1) for p in pairs), 0.1, keep).item()

    torch.manual_seed(0)  # main seeds with --seed 0 right before building the network
    untrained = ep.Hourglass((16, 16, 16, 16))
    trained = ep.Hourglass((16, 16, 16, 16))
    trained.load_state_dict(data.load_checkpoint(os.path.join(path, "checkpoint_stage1.pt"))["state"]["model"])
    assert held_out_loss(trained) < held_out_loss(untrained) - 0.3
