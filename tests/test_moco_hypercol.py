"""moco_hypercol.py: losses against naive loops, the MoCo machinery, shapes, and the script end to end.

Tiny settings throughout (ResNet-18 at 64 px, batches of 4) so that the file runs in about a minute on 2 cores.
"""
import json
import math
import os

import pytest
import torch
import torchvision
from torch import nn

import data
import evaluate_exports
import moco_hypercol as mh

TINY = ["--image-size", "64", "--train-images", "8", "--batch-size", "4", "--moco-queue", "8", "--workers", "0",
        "--layers", "layer4,layer1", "--nmf-images", "4", "--nmf-iters", "10", "--nmf-k", "4", "--proj-dim", "8"]


def run(tmp_path, *flags):
    mh.main(["--runs-dir", str(tmp_path), *TINY, *flags])
    return os.path.join(str(tmp_path), "moco_hypercol", "default")


def test_info_nce_matches_a_naive_loop():
    torch.manual_seed(0)
    q, k, queue = [nn.functional.normalize(torch.randn(n, 5), dim=1) for n in (3, 3, 7)]
    tau, expected = 0.2, 0.0
    for i in range(3):
        positive = math.exp(float(q[i] @ k[i]) / tau)
        negatives = sum(math.exp(float(q[i] @ queue[j]) / tau) for j in range(7))
        expected += -math.log(positive / (positive + negatives)) / 3
    assert mh.info_nce(q, k, queue, tau).item() == pytest.approx(expected, rel=1e-5)


def test_queue_is_a_ring_buffer_that_overwrites_the_oldest_keys():
    queue = mh.KeyQueue(size=5, dim=2)
    assert queue.keys.shape == (5, 2) and torch.allclose(queue.keys.norm(dim=1), torch.ones(5))
    first, second = torch.arange(6.0).view(3, 2), 10 + torch.arange(6.0).view(3, 2)
    queue.push(first)
    assert queue.ptr.item() == 3 and torch.equal(queue.keys[:3], first)
    queue.push(second)  # slots 3, 4, then wraps around to slot 0
    assert queue.ptr.item() == 1 and queue.keys.shape == (5, 2)
    assert torch.equal(queue.keys[3:], second[:2]) and torch.equal(queue.keys[0], second[2])
    assert torch.equal(queue.keys[1:3], first[1:])  # the two most recent of the first batch survive


def test_momentum_update_moves_parameters_but_not_buffers():
    torch.manual_seed(0)
    query, key = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    key[1].running_mean.fill_(7.0)
    before = [p.clone() for p in key.parameters()]
    mh.momentum_update(key, query, m=0.9)
    for new, old, q in zip(key.parameters(), before, query.parameters()):
        assert torch.allclose(new, 0.9 * old + 0.1 * q)
    assert torch.equal(key[1].running_mean, torch.full((4,), 7.0))


def test_encode_in_splits_is_batch_norm_per_sub_batch_with_the_order_restored():
    torch.manual_seed(0)
    net, x, order = nn.BatchNorm1d(3), torch.randn(8, 3), torch.randperm(8)
    out = mh.encode_in_splits(net, x, 2, order)
    shuffled = x[order]
    expected = torch.cat([net(shuffled[:4]), net(shuffled[4:])])[torch.argsort(order)]
    assert torch.allclose(out, expected)
    assert not torch.allclose(out, net(x), atol=1e-3)  # statistics differ from the whole batch's


def test_spatial_contrastive_loss_matches_a_naive_double_loop():
    torch.manual_seed(0)
    f, stride, tau = torch.randn(2, 3, 3, 4), 4.0, 1 / 7
    cells = [(x, y) for y in range(3) for x in range(4)]
    total = 0.0
    for b in range(2):
        for yu, xu in [(y, x) for y in range(3) for x in range(4)]:
            u = nn.functional.normalize(f[b, :, yu, xu], dim=0)
            sims = [float(u @ nn.functional.normalize(f[b, :, y, x], dim=0)) / tau for x, y in cells]
            weights = [math.exp(s) for s in sims]
            for (x, y), wgt in zip(cells, weights):
                total += wgt / sum(weights) * (stride * math.hypot(x - xu, y - yu)) ** 0.5
    expected = total / (2 * 12)
    assert mh.spatial_contrastive_loss(f, stride, tau).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("arch, width", [("resnet18", 960), ("resnet50", 3840)])
def test_hypercolumn_shapes_and_channel_groups(arch, width):
    resnet = mh.build_resnet(arch, 128).eval()
    hyper = mh.Hypercolumn(resnet, ["layer4", "layer3", "layer2", "layer1"], size=32)
    with torch.no_grad():
        out = hyper(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, width, 32, 32)
    assert hyper.groups[0][0] == "layer4" and hyper.groups[-1][2] == width  # deepest first, covers everything
    with torch.no_grad():
        layer1 = torchvision.models.feature_extraction.create_feature_extractor(resnet, ["layer1"])(
            torch.randn(1, 3, 64, 64))["layer1"]
    assert layer1.shape[-1] == 16  # the stem keeps its stride 4, as in the official code


def test_nmf_fit_and_the_exported_coefficients_reconstruct_non_negative_data():
    g = torch.Generator().manual_seed(0)
    truth_w, truth_h = torch.rand(200, 3, generator=g), torch.rand(3, 10, generator=g)
    V = truth_w @ truth_h
    W, H = mh.nmf(V, 3, 300, generator=g)
    assert (W >= 0).all() and (H >= 0).all()
    assert (V - W @ H).norm() / V.norm() < 0.05
    coefficients = mh.NMFCoefficients(H, 200)(V.T.reshape(1, 10, 20, 10))  # 200 locations as a 20 x 10 map
    assert coefficients.shape == (1, 3, 20, 10)
    recon = coefficients.reshape(3, 200).T @ H
    assert (V - recon).norm() / V.norm() < 0.05


def test_views_depend_only_on_seed_epoch_and_index():
    dataset = data.make_dataset("synth-faces", "train", size=64, normalize=False, length=4)
    views = mh.TwoViews(dataset, 64, dataset.mean, dataset.std, seed=0)
    a = views[1]
    assert a["query"].shape == (3, 64, 64) and not torch.equal(a["query"], a["key"])
    assert torch.equal(views[1]["query"], a["query"])
    views.epoch = 1
    assert not torch.equal(views[1]["query"], a["query"])


def test_view_ablation_flags_keep_the_whole_image_and_its_colours():
    """--moco-crop-min 1 --moco-jitter 0: a view is the whole image up to JPEG noise and a colour offset (PCA
    lighting); the official views crop (area 0.2-1), which changes a horizontal ramp's slope."""
    ramp = torch.linspace(0, 255, 64).round().to(torch.uint8).view(1, 1, 64).expand(3, 64, 64).contiguous()
    centred = lambda x: x - x.mean(dim=(1, 2), keepdim=True)  # noqa: E731 (removes the lighting offset)
    errors = {}
    for name, flags in (("ablated", {"crop_min": 1.0, "jitter": 0.0}), ("official", {})):
        errors[name] = [(centred(mh.moco_view(ramp, 64, torch.Generator().manual_seed(s), **flags))
                         - centred(ramp.float() / 255)).abs().mean().item() for s in range(6)]
    assert max(errors["ablated"]) < 0.01  # measured at most 0.005
    assert max(errors["official"]) > 0.05  # measured 0.01-0.13


def test_measure_bn_stats_sets_the_plain_averages_and_keeps_the_weights():
    torch.manual_seed(0)
    net, images = mh.build_resnet("resnet18", 8).eval(), torch.randn(12, 3, 32, 32)
    weights = {k: v.clone() for k, v in net.state_dict().items() if "running" not in k and "batches" not in k}
    assert torch.equal(net.bn1.running_mean, torch.zeros(64))  # at initialisation: the identity in eval mode
    mh.measure_bn_stats(net, images, batch_size=4)
    conv1 = net.conv1(images)  # what bn1 normalises: 12 x 64 x 16 x 16
    assert torch.allclose(net.bn1.running_mean, conv1.mean((0, 2, 3)), atol=1e-5)  # 3 equal batches: the mean
    batch_vars = torch.stack([c.var((0, 2, 3)) for c in conv1.split(4)])  # unbiased, as batch norm keeps it
    assert torch.allclose(net.bn1.running_var, batch_vars.mean(0), rtol=1e-4)
    assert not net.training and net.bn1.momentum == 0.1
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in weights.items())


def test_stages_resume_export_and_evaluate(tmp_path):
    path = run(tmp_path, "--epochs", "1", "--stop-after-steps", "1")  # interrupted in the middle of pretraining
    assert not os.path.exists(os.path.join(path, "hypercol.pt2"))
    with pytest.raises(SystemExit):  # a second run does not overwrite the checkpoint silently
        run(tmp_path, "--epochs", "1")
    run(tmp_path, "--epochs", "1", "--resume")
    for variant in ("hypercol", "layer4", "layer1", "proj", "nmf"):
        assert os.path.exists(os.path.join(path, f"{variant}.pt2"))
    for picture in ("pca.png", "nmf_parts.png"):
        assert os.path.getsize(os.path.join(path, picture)) > 1000
    with open(os.path.join(path, "log_pretrain.jsonl")) as f:
        assert json.loads(f.readline())["step"] == 2
    extractor = data.load_extractor(os.path.join(path, "hypercol.pt2"))
    assert extractor.meta["channel_groups"] == [["layer4", 0, 512], ["layer1", 512, 576]]
    assert extractor(torch.rand(3, 3, 64, 64)).shape == (3, 576, 32, 32)
    assert data.load_extractor(os.path.join(path, "proj.pt2"))(torch.rand(1, 3, 64, 64)).shape == (1, 8, 32, 32)

    evaluate_exports.regression_error(path, tmp_path, "proj")
    evaluate_exports.matching(path, tmp_path, ["hypercol", "nmf"])

    # --bn-stats-images: every stage measures the same clean-image statistics (here on the random network)
    measured = run(tmp_path / "bn", "--epochs", "0", "--bn-stats-images", "8")
    identity = run(tmp_path / "identity", "--epochs", "0", "--stage", "pretrain")  # the same random weights
    x = torch.rand(2, 3, 64, 64)
    plain, clean = [data.load_extractor(os.path.join(p, "hypercol.pt2"))(x) for p in (identity, measured)]
    assert not torch.allclose(plain, clean, rtol=0.1)
    backbone = mh.load_backbone(measured, torch.device("cpu"))  # what the project and nmf stages use
    hyper = mh.Hypercolumn(backbone, ["layer4", "layer1"], 32)
    exported = data.load_extractor(os.path.join(measured, "hypercol.pt2"))
    assert torch.allclose(hyper(data.Normalize(data.FACE_MEAN, data.FACE_STD)(x)), exported(x), atol=1e-4)


def test_resume_is_bit_exact(tmp_path):
    """2 epochs of 2 steps straight, versus stopped after step 3 (mid-epoch) and resumed: identical weights."""
    flags = ["--stage", "pretrain", "--epochs", "2", "--deterministic", "--layers", "layer1", "--workers", "1"]
    straight = run(tmp_path / "a", *flags)
    run(tmp_path / "b", *flags, "--stop-after-steps", "3")
    resumed = run(tmp_path / "b", *flags, "--resume")
    a, b = [torch.load(os.path.join(p, "checkpoint_pretrain.pt"), weights_only=False) for p in (straight, resumed)]
    assert a["step"] == b["step"] == 4
    for name in ("model", "key_model", "queue"):
        for key, value in a["state"][name].items():
            assert torch.equal(value, b["state"][name][key]), f"{name}.{key} differs after resume"


def test_moco_learns_on_the_synthetic_faces(tmp_path):
    """A few dozen MoCo steps make two views of an image more alike than views of different images: the
    in-batch InfoNCE of 32 held-out view pairs falls compared with the same network at initialisation."""
    path = run(tmp_path, "--stage", "pretrain", "--epochs", "2", "--train-images", "256", "--batch-size", "16",
               "--moco-queue", "64", "--layers", "layer1")  # 32 steps; one layer: a single quick export
    dataset = data.make_dataset("synth-faces", "train", size=64, normalize=False, length=32)
    pairs = torch.utils.data.default_collate([mh.TwoViews(dataset, 64, dataset.mean, dataset.std, seed=5)[i]
                                              for i in range(32)])

    def in_batch_loss(model):
        with torch.no_grad():  # train mode: batch statistics, the same for both networks
            q, k = [nn.functional.normalize(model.train()(pairs[v]), dim=1) for v in ("query", "key")]
        return nn.functional.cross_entropy(q @ k.T / 0.07, torch.arange(32)).item()

    torch.manual_seed(0)  # main seeds with --seed 0 right before building the network
    untrained = mh.build_resnet("resnet18", 128)
    trained = mh.build_resnet("resnet18", 128)
    trained.load_state_dict(torch.load(os.path.join(path, "checkpoint_pretrain.pt"), weights_only=False)
                            ["state"]["model"])
    assert in_batch_loss(trained) < in_batch_loss(untrained) - 0.1
