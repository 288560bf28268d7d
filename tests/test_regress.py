"""regress.py: metrics on hand-computed cases, the DVE regressor against a naive loop, ridge against lstsq,
oracle versus random features, the frozen-extractor check, caching, and end-to-end runs of main()."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import data
import regress

pytestmark = pytest.mark.usefixtures("fast_cpu")


def gaussian_bumps(keypoints, image_size, grid, sigma):
    """Oracle features: one channel per landmark, a Gaussian (sigma in image pixels) at its true position,
    sampled at the centres of a grid x grid feature map that spans the image (align_corners=True)."""
    centres = data.to_pixels(data.identity_grid(grid, grid), image_size)  # (grid, grid, 2) pixels
    d2 = (centres[None, None] - keypoints[:, :, None, None]).pow(2).sum(-1)  # (N, K, grid, grid)
    return torch.exp(-d2 / (2 * sigma ** 2))


def synthetic_store(split, n, size, features_fn):
    """A cached source (as regress.cache_features builds) of n synthetic faces with features from keypoints."""
    dataset = data.make_dataset("synth-faces", split, size=size, normalize=False, length=n)
    samples = [dataset[i] for i in range(n)]
    keypoints = torch.stack([s["keypoints"] for s in samples])
    store = dict(features=features_fn(keypoints).half(), keypoints=keypoints,
                 visible=torch.stack([s["visible"] for s in samples]))
    return dict(dataset=dataset, indices=list(range(n)), store=store, extractor=None, workers=0)


def export_tiny(path, kind="features", size=96):
    """A random conv net at stride 4 (24x24 maps at 96 px); for kind 'heatmaps' its 6 maps are softmaxed."""
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, stride=2, padding=1)]
    if kind == "heatmaps":
        layers += [nn.Flatten(2), nn.Softmax(-1), nn.Unflatten(2, (size // 4, size // 4))]
    meta = dict(input_size=[size, size], kind=kind, method="test", variant="tiny",
                channel_groups=[["low", 0, 2], ["high", 2, 6]])
    data.save_extractor(nn.Sequential(*layers), str(path), meta, data.FACE_MEAN, data.FACE_STD)
    return str(path)


# ------------------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------------------
def test_iod_and_pixel_error_by_hand():
    """Eyes 10 px apart; one landmark off by a 3-4-5 triangle (5 px = 50% IOD), the other two exact:
    IOD = 50 / 3 %, pixel error 5 / 3, per-landmark IOD (0, 50, 0)."""
    gt = torch.tensor([[[0.0, 0.0], [10.0, 0.0], [5.0, 8.0]]])
    pred = gt.clone()
    pred[0, 1] += torch.tensor([3.0, 4.0])
    m = regress.landmark_metrics(pred, gt, torch.ones(1, 3, dtype=torch.bool), (96, 96), eye_indices=(0, 1))
    assert m["iod"] == pytest.approx(50 / 3, rel=1e-6)
    assert m["iod_per_landmark"] == pytest.approx([0, 50, 0])
    assert m["error_px"] == pytest.approx(5 / 3, rel=1e-6)


def test_pck_threshold_visibility_and_integer_truncation():
    """Image 80x100 (H x W): threshold 5% of the longer side = 5 px. Distances 4.9 and 5.0 are correct, 5.5 is
    not (in floating point) but becomes 5 <= 5 when truncated to an integer as ContrastLandmark did; an
    invisible landmark 50 px off is ignored by every metric."""
    gt = torch.zeros(1, 4, 2)
    pred = torch.tensor([[[4.9, 0.0], [0.0, 5.0], [5.5, 0.0], [50.0, 0.0]]])
    visible = torch.tensor([[True, True, True, False]])
    m = regress.landmark_metrics(pred, gt, visible, (80, 100))
    assert m["pck"] == pytest.approx(200 / 3)
    assert m["error_px"] == pytest.approx((4.9 + 5.0 + 5.5) / 3)
    assert m["pck_per_landmark"][:3] == [100, 100, 0] and math.isnan(m["pck_per_landmark"][3])
    assert regress.landmark_metrics(pred, gt, visible, (80, 100), pck_int_truncation=True)["pck"] == pytest.approx(100)


def test_mask_iou_by_hand():
    """Truth: 4 pixels; prediction: 2 of them plus 2 others -> IoU 2 / 6. Two empty masks count as 1."""
    truth = torch.zeros(2, 1, 4, 4)
    truth[0, 0, 0, :4] = 1
    logits = -torch.ones(2, 1, 4, 4)
    logits[0, 0, 0, :2] = 1
    logits[0, 0, 3, :2] = 1
    assert regress.mask_iou(logits, truth).tolist() == pytest.approx([2 / 6, 1.0])


# ------------------------------------------------------------------------------------------------------------
# Heads
# ------------------------------------------------------------------------------------------------------------
def test_soft_argmax_of_a_peak_is_its_grid_location():
    logits = torch.full((1, 1, 5, 7), -1e4)
    logits[0, 0, 1, 6] = 0  # row 1 of 5, column 6 of 7
    assert regress.soft_argmax(logits)[0, 0].tolist() == pytest.approx([1.0, -0.5])


def test_regressor_equals_a_naive_loop_over_landmarks_and_points():
    """DVE's regressor (regress.py docstring), written out one landmark and one intermediate point at a time."""
    torch.manual_seed(0)
    C, nA, nI, h, w = 4, 3, 5, 6, 7
    head = regress.DVERegressor(C, nA, nI, softargmax_mul=100.0)
    nn.init.normal_(head.combine.weight)
    features = torch.randn(2, C, h, w) * 0.05  # small, so the softmax is not a hard arg-max
    xs, ys = torch.linspace(-1, 1, w), torch.linspace(-1, 1, h)
    expected = torch.zeros(2, nA, 2)
    for a in range(nA):
        points = []
        for j in range(nI):
            filt = head.points.weight[a * nI + j, :, 0, 0]  # (C,)
            response = (filt[None, :, None, None] * features).sum(1)  # (2, h, w)
            p = torch.softmax(100 * response.flatten(1), 1).view(2, h, w)
            points += [(p * xs).sum((1, 2)), (p * ys[:, None]).sum((1, 2))]  # x_j, y_j
        z = torch.stack(points, 1)  # (2, 100): x1, y1, x2, y2, ...
        expected[:, a] = z @ head.combine.weight[2 * a:2 * a + 2, :, 0, 0].T
    assert torch.allclose(head(features), expected, atol=1e-5)
    assert head.points.bias is None and head.combine.bias is None


def test_regression_loss_is_dve_smooth_l1_and_ignores_invisible():
    torch.manual_seed(0)
    pred, target = torch.randn(4, 5, 2), torch.randn(4, 5, 2)
    visible = torch.ones(4, 5, dtype=torch.bool)
    assert regress.regression_loss(pred, target, visible) == pytest.approx(
        F.smooth_l1_loss(10 * pred, 10 * target).item(), rel=1e-6)
    visible[0, 2] = False
    moved = target.clone()
    moved[0, 2] += 100
    assert regress.regression_loss(pred, moved, visible) == pytest.approx(
        regress.regression_loss(pred, target, visible).item())


def test_ridge_equals_lstsq():
    """Ridge = least squares on X stacked over sqrt(alpha) I and Y over zeros; per-landmark fits with every
    landmark visible equal the joint fit."""
    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(40, 6)), rng.normal(size=(40, 4))
    alpha = 0.1
    reference = np.linalg.lstsq(np.vstack([X, np.sqrt(alpha) * np.eye(6)]), np.vstack([Y, np.zeros((6, 4))]),
                                rcond=None)[0]
    W = regress.ridge_fit(torch.tensor(X), torch.tensor(Y), alpha)
    assert np.allclose(W.numpy(), reference, atol=1e-10)
    points, targets = torch.tensor(X).view(40, 3, 2), torch.tensor(Y).view(40, 2, 2)
    W2 = regress.fit_ridge_head(points, targets, torch.ones(40, 2, dtype=torch.bool), alpha)
    assert np.allclose(W2.numpy(), reference, atol=1e-10)


def test_schedules_per_step():
    """dve: lr x0.1 at epochs 100 and 250 of 300 -> 10 and 25 of 30 (here 2 steps per epoch), amsgrad; default: a
    linear warm-up over the first epoch to the full rate, then a cosine decay to zero by the last step."""
    param = nn.Parameter(torch.zeros(1))
    lrs = {}
    for protocol in ("dve", "default"):
        optimizer, scheduler = regress.make_optimizer([param], protocol, 1e-3, 5e-4, 30, 2)
        lrs[protocol] = []
        for _ in range(60):
            lrs[protocol].append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        if protocol == "dve":
            assert optimizer.defaults["amsgrad"]
    dve, default = lrs["dve"], lrs["default"]
    assert dve[19] == pytest.approx(1e-3) and dve[20] == pytest.approx(1e-4) and dve[50] == pytest.approx(1e-5)
    assert default[0] == pytest.approx(5e-4, rel=1e-3) and default[1] == pytest.approx(1e-3, rel=1e-2)
    assert all(a > b for a, b in zip(default[1:], default[2:])) and default[-1] < 1e-5


def test_standardized_conv_is_the_conv_of_standardized_features():
    """Folding (f - mean) / std into the weight and bias gives the same maps as standardising the features."""
    torch.manual_seed(0)
    conv = regress.StandardizedConv(6, 4, bias=True)
    features = torch.randn(2, 6, 5, 5) * torch.linspace(0.1, 10, 6).view(1, 6, 1, 1) + 3
    mean, std = regress.channel_stats(dict(store=dict(features=features, keypoints=torch.zeros(2, 0, 2),
                                                      visible=torch.zeros(2, 0).bool()), indices=[0, 1]), 2, "cpu")
    assert torch.allclose(mean, features.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(std, features.transpose(0, 1).flatten(1).std(1, unbiased=False), atol=1e-5)
    reference = F.conv2d((features - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1), conv.weight, conv.bias)
    regress.set_stats(conv, mean, std)
    assert torch.allclose(conv(features), reference, atol=1e-4)


# ------------------------------------------------------------------------------------------------------------
# Does the protocol tell good features from bad?
# ------------------------------------------------------------------------------------------------------------
def test_oracle_features_regress_well_and_random_features_do_not():
    """Synthetic faces at 32 px with 16x16 feature maps: stride 2, as DVE's 48x48 maps of 96 px images, at a
    ninth of the cost. Oracle: one Gaussian bump per landmark at its true position. Random: white noise.

    Threshold for the oracle: 1 px mean error. With DVE's multiplier of 100 the spatial softmax is nearly an
    arg-max, so every intermediate point snaps to a feature cell: the floor is the mean distance to the nearest
    cell centre, ~0.77 px at stride 2 (~8% IOD at 32 px, ~2.8% at 96 px). The oracle reaches ~0.7 px in 10
    short epochs (lr 2e-2 so that 40 steps suffice). Random features send the intermediate points anywhere:
    > 4 px (about 8 px measured, IOD > 80%)."""
    torch.manual_seed(0)
    spec = dict(task="landmarks", size=(32, 32), metric="iod", eye_indices=(0, 1), pck_int_truncation=False)
    results = {}
    for name, features in {"oracle": lambda kp: gaussian_bumps(kp, 32, 16, sigma=1.5),
                           "random": lambda kp: torch.randn(len(kp), 5, 16, 16)}.items():
        train, val, test = (synthetic_store(s, n, 32, features) for s, n in (("train", 64), ("val", 32), ("test", 48)))
        torch.manual_seed(0)
        head = regress.DVERegressor(5, 5)
        results[name] = regress.fit(head, spec, train, val, test, "contrastlandmark", 2e-2, 5e-4, 10, 16, "val",
                                    False, "cpu", seed=0)["test"]
    print({k: (v["iod"], v["error_px"]) for k, v in results.items()})
    assert results["oracle"]["error_px"] < 1.0
    assert results["random"]["error_px"] > 4.0
    assert results["random"]["iod"] > 5 * results["oracle"]["iod"]


def fit_default(train, val, test, spec, epochs=10, batch_size=16, *flags):
    """regress.py's default protocol (standardised features, warm-up and cosine, bf16) on cached sources."""
    args = regress.parse_args(["--features", "-", "--epochs", str(epochs), "--batch-size", str(batch_size), *flags])
    torch.manual_seed(0)
    head = regress.make_head(args, train["store"]["features"].shape[1], 5, spec["size"], train, "cpu")
    return regress.fit(head, spec, train, val, test, args.protocol, args.lr, args.weight_decay, epochs, batch_size,
                       args.select_on, False, "cpu", seed=0, amp=torch.bfloat16)["test"]


@pytest.mark.slow  # four full head trainings: 11 s
def test_default_beats_the_mean_shape_and_channel_scale_does_not_decide():
    """A known-good hypercolumn-like map at 64 px (32x32 cells, stride 2 as DVE's): one Gaussian bump per landmark
    plus 3 channels of smooth noise. The default protocol beats the mean training shape by far (the oracle's floor is
    the cell, ~0.8 px), and multiplying every channel by its own constant in 0.1-10 (as a hypercolumn's layers
    differ) changes the result by less than 2 %: the features are standardised with statistics that scale alike.
    Without the standardisation the same rescaling moves the result by more."""
    spec = dict(task="landmarks", size=(64, 64), metric="iod", eye_indices=(0, 1), pck_int_truncation=False)
    scales = 10 ** (torch.rand(8, generator=torch.Generator().manual_seed(1)) * 2 - 1)  # (8,) in 0.1..10
    results = {}
    for scaled in (False, True):
        def features(kp):
            noise = torch.randn(len(kp), 3, 32, 32, generator=torch.Generator().manual_seed(len(kp)))
            noise = F.avg_pool2d(noise, 5, 1, 2)  # spatially smooth, as real features are
            f = torch.cat([gaussian_bumps(kp, 64, 32, sigma=2.0), noise], 1)  # (N, 8, 32, 32)
            return f * scales.view(1, -1, 1, 1) if scaled else f
        train, val, test = (synthetic_store(s, n, 64, features) for s, n in (("train", 96), ("val", 32), ("test", 48)))
        results[scaled] = fit_default(train, val, test, spec, 20)
        results["raw", scaled] = fit_default(train, val, test, spec, 20, 16, "--no-standardize")
    reference = regress.mean_shape_reference(regress.split_keypoints(train), regress.split_keypoints(test), spec)
    print({k: round(v["iod"], 3) for k, v in results.items()}, "mean shape", round(reference["iod"], 3))
    assert results[False]["iod"] < 0.6 * reference["iod"]
    assert abs(results[True]["iod"] - results[False]["iod"]) < 0.02 * results[False]["iod"]
    assert abs(results["raw", True]["iod"] - results["raw", False]["iod"]) > 0.02 * results["raw", False]["iod"]


def test_epoch_selection_on_val_last_and_test():
    """The reported numbers come from the selected epoch: best validation IoU (sound), the last epoch (DVE), or the
    best TEST IoU (ContrastLandmark), which is the only mode that evaluates the test split every epoch."""
    torch.manual_seed(0)
    spec = dict(task="mask", size=(8, 8), metric="iou", eye_indices=None, pck_int_truncation=False)

    def tiny(n):
        features = torch.randn(n, 3, 4, 4)
        masks = F.interpolate(features[:, :1], size=(8, 8), mode="bilinear", align_corners=True) > 0.3
        return dict(indices=list(range(n)), store=dict(features=features.half(), mask=masks,
                                                       keypoints=torch.zeros(n, 0, 2), visible=torch.zeros(n, 0).bool()))
    train, val, test = tiny(16), tiny(8), tiny(8)
    for select_on in ("val", "last", "test"):
        records, head = [], regress.MaskHead(3, (8, 8))
        result = regress.fit(head, spec, train, val, test, "dve", 0.3, 0.0, 6, 4, select_on, False, "cpu", 0,
                             records.append)
        assert ("test" in records[0]) == (select_on == "test")
        if select_on == "last":
            assert result["selected_epoch"] == 6
        else:
            scores = [r[select_on]["iou"] for r in records]
            assert result["selected_epoch"] == 1 + scores.index(max(scores))
            assert result[select_on]["iou"] == pytest.approx(max(scores))


# ------------------------------------------------------------------------------------------------------------
# Frozen extractor and feature cache
# ------------------------------------------------------------------------------------------------------------
def test_frozen_assertion_fires_when_the_extractor_changes(tmp_path):
    extractor = data.load_extractor(export_tiny(tmp_path / "tiny.pt2"))
    before = extractor.state_fingerprint()
    regress.assert_frozen(before, extractor.state_fingerprint())  # unchanged: silent
    with torch.no_grad():
        next(iter(extractor.module.parameters())).mul_(1.0001)
    with pytest.raises(RuntimeError, match="frozen extractor changed"):
        regress.assert_frozen(before, extractor.state_fingerprint())


def test_cached_features_equal_streamed_features(tmp_path):
    extractor = data.load_extractor(export_tiny(tmp_path / "tiny.pt2"))
    dataset = data.make_dataset("synth-faces", "val", normalize=False, length=10)
    source = dict(dataset=dataset, indices=list(range(10)), store=None, extractor=extractor, workers=0)
    store = regress.cache_features(source, 4, True, "cpu")
    streamed = list(regress.batches(source, torch.arange(10), 4, "cpu"))
    assert store["features"].dtype == torch.float16 and store["features"].shape == (10, 6, 24, 24)
    assert torch.allclose(store["features"].float(), torch.cat([b["features"] for b in streamed]), rtol=1e-3, atol=1e-3)
    assert torch.equal(store["keypoints"], torch.cat([b["keypoints"] for b in streamed]))
    assert torch.equal(store["mask"], torch.cat([b["mask"] for b in streamed]) > 0.5)


# ------------------------------------------------------------------------------------------------------------
# End to end
# ------------------------------------------------------------------------------------------------------------
def run(tmp_path, *flags):
    return regress.main(["--runs-dir", str(tmp_path / "runs"), "--device", "cpu", "--batch-size", "8", "--workers", "0",
                         *flags])


def test_end_to_end_full_training_set(tmp_path):
    path = export_tiny(tmp_path / "tiny.pt2")
    results = run(tmp_path, "--features", path, "--max-images", "16", "--epochs", "2", "--plot-images", "2")
    run_dir = tmp_path / "runs" / "regress" / "tiny-synth-faces"
    assert json.loads((run_dir / "results.json").read_text())["metric"] == "iod"
    assert len((run_dir / "log_regress.jsonl").read_text().splitlines()) == 2  # one line per epoch
    assert (run_dir / "predictions.png").stat().st_size > 0 and (run_dir / "args_regress.json").exists()
    assert results["cached"] == {"train": True, "val": True, "test": False}  # test is read once: streamed
    assert results["runs"][0]["selected_epoch"] in (1, 2) and results["frozen_extractor_unchanged"]
    assert len(results["runs"][0]["test"]["iod_per_landmark"]) == 5


def test_end_to_end_few_shot_with_augmentation_and_plot(tmp_path):
    path = export_tiny(tmp_path / "tiny.pt2")
    results = run(tmp_path, "--features", path, "--max-images", "12", "--epochs", "1", "--annotations", "2", "4",
                  "--seeds", "2", "--plot-images", "0", "--name", "fs")
    assert [(r["annotations"], r["runs"]) for r in results["table"]] == [(2, 2), (4, 2)]
    assert results["augment"] and not results["cached"]["train"] and results["cached"]["val"]
    assert (tmp_path / "runs" / "regress" / "fs" / "few_shot.png").exists()


def test_end_to_end_mask_and_ridge(tmp_path):
    results = run(tmp_path, "--features", export_tiny(tmp_path / "tiny.pt2"), "--task", "mask", "--max-images", "8",
                  "--epochs", "1", "--plot-images", "2", "--name", "mask")
    assert 0 <= results["runs"][0]["test"]["iou"] <= 100 and results["metric"] == "iou"
    results = run(tmp_path, "--features", export_tiny(tmp_path / "maps.pt2", "heatmaps"), "--head", "ridge",
                  "--max-images", "16", "--plot-images", "2", "--name", "ridge")
    assert results["runs"][0]["test"]["iod"] > 0 and results["runs"][0]["selected_epoch"] is None


@pytest.mark.parametrize("flags, message", [
    (["--head", "ridge"], "kind 'heatmaps'"),
    (["--image-size", "64"], "takes 96x96 images"),
    (["--dataset", "mafl"], "--data-root"),
    (["--annotations", "50", "--max-images", "10"], "exceeds the 10 training images"),
])
def test_bad_flag_combinations_stop_with_one_sentence(tmp_path, flags, message):
    with pytest.raises(SystemExit, match=message):
        run(tmp_path, "--features", export_tiny(tmp_path / "tiny.pt2"), *flags)


def test_zoom_flags_shrink_images_and_keypoints_towards_the_centre(tmp_path):
    """--zoom-train / --zoom-test: each image's keypoints move towards the centre by its own factor, drawn in
    the split's range and the same on every call; the default run name records the zoom."""
    dataset = data.make_dataset("synth-faces", "test", size=64, normalize=False, length=4)
    zoomed = regress.Zoomed(dataset, 1.5, 2.0, "test")
    centre = torch.tensor([31.5, 31.5])
    factors = [zoomed.factor(i) for i in range(4)]
    assert all(1.5 <= f <= 2.0 for f in factors) and len(set(factors)) == 4
    for i in range(4):
        original, sample = dataset[i], zoomed[i]
        assert torch.allclose(sample["keypoints"] - centre, (original["keypoints"] - centre) / factors[i], atol=1e-3)
        assert torch.equal(sample["image"], zoomed[i]["image"])  # reproducible
        assert sample["image"][:, 0, 0].abs().sum() == 0  # the border that came in is black
    assert zoomed.num_landmarks == 5 and zoomed.eye_indices == dataset.eye_indices
    results = run(tmp_path, "--features", export_tiny(tmp_path / "tiny.pt2", size=64), "--image-size", "64",
                  "--max-images", "8", "--epochs", "1", "--plot-images", "0", "--zoom-train", "1", "1.5",
                  "--zoom-test", "1.5", "2")
    assert results["settings"]["name"] == "tiny-synth-faces-zoomtrain1-1.5-zoomtest1.5-2"
    with pytest.raises(SystemExit, match="0 < LO <= HI"):
        run(tmp_path, "--features", export_tiny(tmp_path / "tiny.pt2"), "--zoom-test", "2", "1")


def test_mean_shape_reference_predicts_the_visible_training_mean_for_every_test_image():
    train = regress.split_keypoints({"store": {  # the invisible 99s are ignored
        "keypoints": torch.tensor([[[10.0, 10.0], [30.0, 12.0]], [[12.0, 14.0], [99.0, 99.0]]]),
        "visible": torch.tensor([[True, True], [True, False]])}})
    test_kp, test_vis = torch.tensor([[[11.0, 12.0], [30.0, 12.0]]]), torch.tensor([[True, True]])
    spec = dict(size=(96, 96), eye_indices=(0, 1), pck_int_truncation=False)
    out = regress.mean_shape_reference(train, (test_kp, test_vis), spec)
    assert out["error_px"] == pytest.approx(0.0)  # mean of (10, 10), (12, 14) is (11, 12); (30, 12) alone
    out = regress.mean_shape_reference(train, (test_kp + torch.tensor([3.0, 4.0]), test_vis), spec)
    assert out["error_px"] == pytest.approx(5.0) and out["iod"] == pytest.approx(100 * 5.0 / 19.0)


# ------------------------------------------------------------------------------------------------------------
# Bring your own data, and where the cache lives
# ------------------------------------------------------------------------------------------------------------
def make_csv(root, header):
    """train/val/test CSVs of 6 / 4 / 4 random 40x30 images with three landmarks each."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 4), ("test", 4)):
        rows = [header]
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(root / f"{split}{i}.png")
            rows.append(f"{split}{i}.png,10,12,30,12,20,{20 + i}")
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return str(root)


@pytest.mark.parametrize("header, flags, metric, eyes", [
    ("image,left_eye_x,left_eye_y,right_eye_x,right_eye_y,nose_x,nose_y", [], "iod", [0, 1]),  # header names
    ("image,a_x,a_y,b_x,b_y,c_x,c_y", [], "pck", None),  # no eyes: PCK
    ("image,a_x,a_y,b_x,b_y,c_x,c_y", ["--eyes", "c", "1"], "iod", [2, 1]),  # named by the flag
])
def test_a_csv_dataset_gets_iod_when_its_eyes_are_named_and_pck_otherwise(tmp_path, header, flags, metric, eyes):
    path = export_tiny(tmp_path / "tiny.pt2")
    results = run(tmp_path, "--features", path, "--dataset", "csv", "--data-root", make_csv(tmp_path, header),
                  "--epochs", "1", "--plot-images", "0", *flags)
    assert results["metric"] == metric and results["dataset"]["eye_indices"] == (eyes and tuple(eyes))
    with pytest.raises(SystemExit, match="--eyes left nose: expected two of the landmarks"):
        run(tmp_path, "--features", path, "--dataset", "csv", "--data-root", str(tmp_path), "--eyes", "left", "nose")


def test_a_small_mafl_folder_names_the_validation_flag_and_runs_with_it(tmp_path):
    """MAFL holds 1,000 training images out for validation; a folder of 6 needs --val-size, and says so."""
    from test_real import make_celeba
    root = str(make_celeba(tmp_path / "celeba"))
    path = export_tiny(tmp_path / "tiny.pt2")
    with pytest.raises(SystemExit, match="too few to hold out val_size=1000.*with --val-size N"):
        run(tmp_path, "--features", path, "--dataset", "mafl", "--data-root", root)
    results = run(tmp_path, "--features", path, "--dataset", "mafl", "--data-root", root, "--val-size", "2",
                  "--epochs", "1", "--plot-images", "0")
    assert results["dataset"]["train"] == 4 and results["dataset"]["val"] == 2 and results["metric"] == "iod"


def test_cache_budget_is_half_the_free_device_memory_and_batches_come_to_the_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8e9, 16e9))
    assert regress.cache_budget(torch.device("cuda")) == pytest.approx(4.0)
    assert regress.cache_budget(torch.device("cpu")) > 0
    store = dict(features=torch.randn(4, 3, 2, 2).half(), keypoints=torch.zeros(4, 1, 2),
                 visible=torch.ones(4, 1).bool())
    batch = next(regress.batches(dict(store=store, indices=list(range(4))), torch.arange(4), 4, "meta",
                                 dtype=torch.bfloat16))
    assert batch["features"].device.type == "meta" and batch["features"].dtype == torch.bfloat16


def test_protocol_dve_is_dves_recipe_one_flag_away(tmp_path):
    """--protocol dve: DVE's N(0, 1) init on raw float32 features, amsgrad, the last epoch; the default differs."""
    path = export_tiny(tmp_path / "tiny.pt2")
    results = run(tmp_path, "--features", path, "--max-images", "8", "--epochs", "2", "--plot-images", "0",
                  "--protocol", "dve")
    settings = results["settings"]
    assert (settings["lr"], settings["standardize"], settings["amp"], settings["select_on"]) == (1e-3, False, "none",
                                                                                                "last")
    assert settings["name"].endswith("-dve") and results["runs"][0]["selected_epoch"] == 2
    args = regress.parse_args(["--features", path])
    assert (args.epochs, args.lr, args.standardize, args.amp, args.select_on) == (10, 1e-2, True, "auto", "val")
    assert regress.parse_args(["--features", path, "--protocol", "dve"]).epochs == 300
