"""moco_hypercol.py: losses against naive loops, the MoCo machinery, shapes, and the script end to end.

Tiny settings throughout (ResNet-18 at 64 px, batches of 4); the end-to-end runs of the script are marked slow.
"""
import json
import math
import os

import pytest
import torch
import torchvision
import torchvision.transforms as T
import torchvision.transforms.v2.functional as TF
from torch import nn

import data
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
    W, H = data.nmf(V, 3, 300, generator=g)
    assert (W >= 0).all() and (H >= 0).all()
    assert (V - W @ H).norm() / V.norm() < 0.05
    coefficients = data.NMFCoefficients(H, 200)(V.T.reshape(1, 10, 20, 10))  # 200 locations as a 20 x 10 map
    assert coefficients.shape == (1, 3, 20, 10)
    recon = coefficients.reshape(3, 200).T @ H
    assert (V - recon).norm() / V.norm() < 0.05


def test_worker_images_depend_only_on_seed_epoch_and_index():
    dataset = data.make_dataset("synth-faces", "train", size=64, normalize=False, length=4)
    images = mh.Images(dataset, seed=0)
    a = images[(0, 1)]
    assert a["query"].shape == (3, 64, 64) and a["query"].dtype == torch.uint8
    assert not torch.equal(a["query"], a["key"])  # each view its own JPEG noise
    assert torch.equal(images[(0, 1)]["query"], a["query"])
    assert not torch.equal(images[(1, 1)]["query"], a["query"])  # the epoch comes with the key
    clean = data.Uint8Images(dataset)[(0, 1)]["image"]
    assert torch.equal(clean, (dataset[1]["image"] * 255).round().to(torch.uint8))


def reference_view(image, p, i):
    """The per-image path of torchvision's functional ops with the parameters of view i: crop and resize
    (antialiased), the colour adjustments in the view's order, grayscale, lighting."""
    top, left, h, w = p["box"][i].int().tolist()
    x = TF.resized_crop(image.float() / 255, top, left, h, w, list(image.shape[1:]), antialias=True)
    adjust = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for op in p["order"][i].tolist():
        x = adjust[op](x, p["factors"][i, op].item())
    if p["gray"][i]:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    return x + (mh.PCA_EIGVEC @ (p["alpha"][i] * mh.PCA_EIGVAL)).view(3, 1, 1)


@pytest.mark.parametrize("flags", [{}, {"hue": 0.4, "grayscale": 0.5}, {"crop_min": 0.05, "jitter": 0.9}])
def test_batched_views_equal_torchvision_image_by_image(flags):
    images = (torch.rand(6, 3, 1, 1) * torch.rand(6, 3, 40, 48) * 255).round().to(torch.uint8)  # coloured noise
    p = mh.view_params(6, 40, 48, torch.Generator().manual_seed(1), **flags)
    views = mh.moco_views(images, p)
    assert views.shape == (6, 3, 40, 48)
    for i in range(6):
        assert torch.allclose(views[i], reference_view(images[i], p, i), atol=2e-5), f"view {i} differs"


def test_view_parameters_follow_the_official_distributions():
    n, g = 4000, torch.Generator().manual_seed(0)
    p = mh.view_params(n, 96, 96, g, crop_min=0.2, jitter=0.4, hue=0.1, grayscale=0.2)
    top, left, h, w = p["box"].unbind(1)
    area, ratio = h * w / 96 ** 2, w / h
    torch.manual_seed(0)  # torchvision's own RandomResizedCrop draws from the global generator
    box = torch.tensor([T.RandomResizedCrop.get_params(torch.zeros(3, 96, 96), (0.2, 1), (3 / 4, 4 / 3))
                        for _ in range(n)]).float()  # n x (top, left, h, w)
    assert area.mean() == pytest.approx(float((box[:, 2] * box[:, 3] / 96 ** 2).mean()), abs=0.01)  # both ~0.545
    assert ratio.mean() == pytest.approx(float((box[:, 3] / box[:, 2]).mean()), abs=0.01)
    assert top.mean() == pytest.approx(float(box[:, 0].mean()), abs=0.5) and area.min() >= 0.19 and area.max() <= 1
    assert ratio.min() >= 3 / 4 - 0.03 and ratio.max() <= 4 / 3 + 0.03  # rounded to whole pixels
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 96).all() and (left + w <= 96).all()
    factors = p["factors"]
    assert factors[:, :3].min() >= 0.6 and factors[:, :3].max() <= 1.4 and factors[:, 3].abs().max() <= 0.1
    assert torch.equal(p["order"].sort(1).values, torch.arange(4).expand(n, 4))  # a permutation per view
    assert (p["order"][:, 0] == 3).float().mean() == pytest.approx(0.25, abs=0.03)  # each adjustment first as often
    assert p["gray"].float().mean() == pytest.approx(0.2, abs=0.03)
    assert p["alpha"].std() == pytest.approx(0.1, rel=0.05)
    whole = mh.view_params(50, 96, 96, g, crop_min=1.0)["box"]  # only the whole image fits at area 1
    assert torch.equal(whole, torch.tensor([0.0, 0, 96, 96]).expand(50, 4))


def test_view_ablation_flags_keep_the_whole_image_and_its_colours():
    """--moco-crop-min 1 --moco-jitter 0: a view is the whole image up to a colour offset (PCA lighting); the
    official views crop (area 0.2-1), which changes a horizontal ramp's slope."""
    ramp = torch.linspace(0, 255, 64).round().to(torch.uint8).view(1, 1, 64).expand(6, 3, 64, 64)
    centred = lambda x: x - x.mean(dim=(2, 3), keepdim=True)  # noqa: E731 (removes the lighting offset)
    errors = {}
    for name, flags in (("ablated", {"crop_min": 1.0, "jitter": 0.0}), ("official", {})):
        p = mh.view_params(6, 64, 64, torch.Generator().manual_seed(0), **flags)
        errors[name] = (centred(mh.moco_views(ramp, p)) - centred(ramp.float() / 255)).abs().mean((1, 2, 3))
    assert errors["ablated"].max() < 1e-5
    assert errors["official"].max() > 0.05


def tiny_state():
    """A small encoder with batch norm in place of the ResNet, with what main's pretraining state holds."""
    torch.manual_seed(0)
    model, key_model = [nn.Sequential(nn.Conv2d(3, 8, 3, stride=4), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                                      nn.Linear(8 * 8 * 8, 16)) for _ in range(2)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)
    return {"model": model, "key_model": key_model.requires_grad_(False), "queue": mh.KeyQueue(8, 16),
            "optimizer": optimizer, "scaler": data.grad_scaler(torch.device("cpu"), None),
            "scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)}


def test_a_training_step_makes_no_host_sync(host_syncs):
    """The step as main runs it (views drawn from the step's generator, both encoders, Eq. 5, SGD, momentum update,
    queue) calls nothing that would make the host wait for a GPU."""
    args = mh.get_args(["--moco-queue", "8", "--batch-size", "4", "--moco-hue", "0.1", "--moco-grayscale", "0.2"])
    state, images = tiny_state(), torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    normalize, g = data.Normalize(data.FACE_MEAN, data.FACE_STD), data.generator(0, 0)
    for dtype in (None, torch.bfloat16):
        with host_syncs as counter:
            p = mh.view_params(8, 32, 32, g, args.moco_crop_min, args.moco_jitter, args.moco_hue,
                                    args.moco_grayscale)
            loss = mh.moco_step(state, *normalize(mh.moco_views(images, p)).chunk(2), g, args, dtype)
        assert counter.calls == [] and loss.shape == ()


def test_the_key_shuffle_comes_from_the_step_generator():
    args = mh.get_args(["--moco-queue", "8", "--batch-size", "4"])
    views = torch.randn(2, 4, 3, 32, 32)
    losses = []
    for seed in (0, 0, 1):
        torch.manual_seed(123)  # the global generator is the same each time: only the step's generator differs
        losses.append(mh.moco_step(tiny_state(), *views, data.generator(seed, 7), args, None))
    assert torch.equal(losses[0], losses[1]) and not torch.equal(losses[0], losses[2])


@pytest.mark.parametrize("kind", ["hypercol", "proj", "nmf"])
def test_each_export_runs_on_another_device_than_its_own(kind):
    """Built and exported on 'meta', run on the CPU: what an extractor exported on the CPU meets on a GPU."""
    with torch.device("meta"):
        hyper = mh.Hypercolumn(mh.build_resnet("resnet18", 8).eval(), ["layer4", "layer1"], 16)
        head = {"hypercol": nn.Identity(), "proj": mh.Projector(576, 8, softmax=True),
                "nmf": data.NMFCoefficients(torch.rand(4, 576), 3)}[kind]
        net = nn.Sequential(data.Normalize(data.FACE_MEAN, data.FACE_STD), hyper, head).eval()
        program = torch.export.export(net, (torch.rand(2, 3, 32, 32),))
    module = data.on_device(program.module(), "cpu").to_empty(device="cpu")
    assert module(torch.rand(2, 3, 32, 32)).shape == (2, {"hypercol": 576, "proj": 8, "nmf": 4}[kind], 16, 16)


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


@pytest.mark.slow
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

    import evaluate_exports  # the evaluation scripts, imported only by this end-to-end test
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


@pytest.mark.slow
def test_resume_is_bit_exact(tmp_path):
    """2 epochs of 2 steps straight, versus stopped after step 3 (mid-epoch) and resumed: identical weights, from
    checkpoints that hold no random states (every draw is a function of the seed, epoch, index or step)."""
    flags = ["--stage", "pretrain", "--epochs", "2", "--deterministic", "--layers", "layer1", "--workers", "1"]
    straight = run(tmp_path / "a", *flags)
    run(tmp_path / "b", *flags, "--stop-after-steps", "3")
    resumed = run(tmp_path / "b", *flags, "--resume")
    a, b = [data.load_checkpoint(os.path.join(p, "checkpoint_pretrain.pt")) for p in (straight, resumed)]
    assert a["step"] == b["step"] == 4 and not any("rng" in key for key in b)
    for name in ("model", "key_model", "queue"):
        for key, value in a["state"][name].items():
            assert torch.equal(value, b["state"][name][key]), f"{name}.{key} differs after resume"


@pytest.mark.slow
def test_moco_learns_on_the_synthetic_faces(tmp_path):
    """A few dozen MoCo steps make two views of an image more alike than views of different images: the
    in-batch InfoNCE of 32 held-out view pairs falls compared with the same network at initialisation."""
    path = run(tmp_path, "--stage", "pretrain", "--epochs", "2", "--train-images", "256", "--batch-size", "16",
               "--moco-queue", "64", "--layers", "layer1")  # 32 steps; one layer: a single quick export
    dataset = data.make_dataset("synth-faces", "train", size=64, normalize=False, length=32)
    batch = torch.utils.data.default_collate([mh.Images(dataset, seed=5)[(0, i)] for i in range(32)])
    images = torch.cat([batch["query"], batch["key"]])
    views = data.Normalize(dataset.mean, dataset.std)(mh.moco_views(images, mh.view_params(
        64, 64, 64, data.generator(5))))
    pairs = dict(zip(("query", "key"), views.chunk(2)))

    def in_batch_loss(model):
        with torch.no_grad():  # train mode: batch statistics, the same for both networks
            q, k = [nn.functional.normalize(model.train()(pairs[v]), dim=1) for v in ("query", "key")]
        return nn.functional.cross_entropy(q @ k.T / 0.07, torch.arange(32)).item()

    torch.manual_seed(0)  # main seeds with --seed 0 right before building the network
    untrained = mh.build_resnet("resnet18", 128)
    trained = mh.build_resnet("resnet18", 128)
    trained.load_state_dict(data.load_checkpoint(os.path.join(path, "checkpoint_pretrain.pt"))["state"]["model"])
    assert in_batch_loss(trained) < in_batch_loss(untrained) - 0.1
