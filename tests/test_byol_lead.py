"""byol_lead.py: losses against naive loops, BYOL's target network, the views against torchvision sample by sample,
no host syncs in a step, exports on another device, and the script end to end (marked slow).

Tiny settings throughout (ResNet-18 at 64 px, batches of 4) so that the fast tests run in seconds.
"""
import copy
import json
import math
import os

import pytest
import torch
from torch import nn

import torchvision
import torchvision.transforms.v2.functional as TF

import byol_lead as bl
import data

TINY = ["--image-size", "64", "--train-images", "8", "--batch-size", "4", "--workers", "0", "--byol-hidden", "64",
        "--byol-dim", "16", "--nmf-images", "4", "--nmf-iters", "10", "--nmf-k", "4", "--lead-dim", "8",
        "--lead-chunk", "100"]


def run(tmp_path, *flags):
    bl.main(["--runs-dir", str(tmp_path), *TINY, *flags])
    return os.path.join(str(tmp_path), "byol_lead", "default")


def test_byol_loss_is_the_summed_symmetric_normalised_distance():
    torch.manual_seed(0)
    p1, p2, z1, z2 = torch.randn(4, 3, 6).unbind(0)
    expected = 0.0
    for p, z in ((p1, z2), (p2, z1)):  # two directions, summed
        expected += sum(float(((p[i] / p[i].norm() - z[i] / z[i].norm()) ** 2).sum()) for i in range(3)) / 3
    assert bl.byol_loss(p1, p2, z1, z2).item() == pytest.approx(expected, rel=1e-5)
    assert bl.byol_loss(p1, p1, p1, p1).item() == pytest.approx(0.0, abs=1e-6)


def test_ema_moves_parameters_not_buffers_and_tau_rises_to_one_by_a_cosine():
    torch.manual_seed(0)
    online, target = [nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)) for _ in range(2)]
    target[1].running_mean.fill_(7.0)
    before = [p.clone() for p in target.parameters()]
    bl.ema_update(target, online, tau=0.9)
    for new, old, theta in zip(target.parameters(), before, online.parameters()):
        assert torch.allclose(new, 0.9 * old + 0.1 * theta)
    assert torch.equal(target[1].running_mean, torch.full((4,), 7.0))
    taus = [bl.byol_tau(k, 100, 0.996) for k in range(101)]
    assert taus[0] == pytest.approx(0.996) and taus[50] == pytest.approx(0.998) and taus[100] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(taus, taus[1:]))


def test_only_the_online_network_and_predictor_get_gradients():
    torch.manual_seed(0)
    online = bl.Online("resnet18", 32, 8)
    predictor, target = bl.mlp(8, 32, 8), copy.deepcopy(online).requires_grad_(False)
    v1, v2 = torch.randn(2, 4, 3, 32, 32)
    z1 = target(v1)
    z2 = target(v2).detach().requires_grad_(True)  # even a target output that allows gradients gets none
    bl.byol_loss(predictor(online(v1)), predictor(online(v2)), z1, z2).backward()
    assert all(p.grad is None for p in target.parameters()) and z2.grad is None
    assert all(p.grad is not None for p in [*online.parameters(), *predictor.parameters()])


def naive_lead_loss(t_i, t_j, s_i, s_j, tau):
    """Eq. 3 location by location: -sum_u sum_v p_u(v) log q_u(v), averaged over the pairs."""
    b, _, h, w = t_i.shape
    cells = [(y, x) for y in range(h) for x in range(w)]
    cos = lambda a, c: float(nn.functional.cosine_similarity(a, c, dim=0))  # noqa: E731
    total = 0.0
    for k in range(b):
        for yu, xu in cells:
            p = [math.exp(cos(t_i[k, :, yu, xu], t_j[k, :, y, x]) / tau) for y, x in cells]
            q = [math.exp(cos(s_i[k, :, yu, xu], s_j[k, :, y, x]) / tau) for y, x in cells]
            total += -sum(pv / sum(p) * math.log(qv / sum(q)) for pv, qv in zip(p, q))
    return total / b


def test_lead_loss_matches_a_naive_loop_over_locations():
    torch.manual_seed(0)
    (t_i, t_j), (s_i, s_j) = torch.randn(2, 2, 5, 2, 3), torch.randn(2, 2, 4, 2, 3)  # teacher 5-d, student 4-d
    expected = naive_lead_loss(t_i, t_j, s_i, s_j, tau=0.3)
    assert bl.lead_loss(t_i, t_j, s_i, s_j, tau=0.3).item() == pytest.approx(expected, rel=1e-5)


def test_lead_loss_has_zero_gradient_when_q_equals_p():
    torch.manual_seed(0)
    t_i, t_j = torch.randn(2, 2, 6, 4, 4)
    s_i, s_j = t_i.clone().requires_grad_(True), t_j.clone().requires_grad_(True)  # q = p
    bl.lead_loss(t_i, t_j, s_i, s_j, tau=0.05).backward()
    assert s_i.grad.abs().max() < 1e-4 and s_j.grad.abs().max() < 1e-4
    s_i = torch.randn(2, 6, 4, 4, requires_grad=True)  # q != p: a gradient
    bl.lead_loss(t_i, t_j, s_i, s_j.detach(), tau=0.05).backward()
    assert s_i.grad.abs().max() > 1e-2


def test_chunked_lead_loss_equals_the_plain_one_with_its_gradients():
    torch.manual_seed(0)
    t_i, t_j = torch.randn(2, 3, 10, 5, 7)
    s = torch.randn(2, 3, 4, 5, 7, requires_grad=True)
    plain = bl.lead_loss(t_i, t_j, s[0], s[1], tau=0.05)
    expected = torch.autograd.grad(plain, s)[0]
    for chunk in (8, 35, 100):  # 5 chunks, the last one short; one chunk of everything; more rows than there are
        loss = bl.lead_loss_chunked(t_i, t_j, s[0], s[1], tau=0.05, chunk=chunk)
        assert loss.item() == pytest.approx(plain.item(), rel=1e-5)
        assert torch.allclose(torch.autograd.grad(loss, s)[0], expected, rtol=1e-4, atol=1e-6)


def test_the_teacher_distributions_are_computed_once_without_gradient(monkeypatch):
    """Issue 21 item 9: inside activation checkpointing the teacher's B x hw x hw similarities would be
    recomputed in the backward pass although they need no gradient."""
    calls = []
    plain = bl.similarity_distributions
    monkeypatch.setattr(bl, "similarity_distributions", lambda *a, **k: calls.append(torch.is_grad_enabled())
                        or plain(*a, **k))
    t_i, t_j = torch.randn(2, 2, 6, 4, 4)
    s_i = torch.randn(2, 3, 4, 4, requires_grad=True)
    bl.lead_loss_chunked(t_i, t_j, s_i, torch.randn(2, 3, 4, 4), chunk=5).backward()
    assert calls == [False]


@pytest.mark.parametrize("size", [64, 96])
def test_decoder_merges_four_levels_into_a_map_at_a_quarter_of_the_input(size):
    resnet = bl.build_resnet("resnet18").eval()
    compact = bl.Compact(resnet, 64).eval()
    with torch.no_grad():
        out = compact(torch.randn(2, 3, size, size))
        maps = compact.body(torch.randn(1, 3, size, size))
    assert out.shape == (2, 64, size // 4, size // 4)  # stride 4: 24x24 at 96 px
    assert [m.shape[-1] for m in maps.values()] == [size // 4, size // 8, size // 16, size // 32]
    assert list(compact.decoder.fpn.inner_blocks[0].parameters())[0].shape[1] == 64  # layer1's 64 channels


def reference_view(image, p, i, size):
    """Sample i of view_params `p` made with torchvision's per-sample functions, as byol_lead.py did before."""
    x1, y1, x2, y2 = [int(v) for v in p["box"][i]]
    x = TF.resized_crop(image, y1, x1, y2 - y1, x2 - x1, [size, size], antialias=True).float() / 255
    x = TF.horizontal_flip(x) if p["flip"][i] else x
    adjust = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for j in p["order"][i].tolist() if p["jitter"][i] else []:
        x = adjust[j](x, p["factors"][i, j].item())
    x = TF.rgb_to_grayscale(x, num_output_channels=3) if p["gray"][i] else x
    kernel = 2 * (size // 20) + 1
    x = TF.gaussian_blur(x, [kernel] * 2, [p["sigma"][i].item()] * 2) if p["blur"][i] else x
    return TF.solarize(x, 0.5) if p["solarize"][i] else x


def test_batched_views_match_torchvision_sample_by_sample():
    dataset = data.make_dataset("synth-faces", "train", size=64, normalize=False, length=16)
    images = torch.stack([data.Uint8Images(dataset)[(3, i)]["image"] for i in range(16)])  # uint8, any epoch
    assert images.dtype == torch.uint8 and torch.equal(images[0], data.Uint8Images(dataset)[(0, 0)]["image"])
    for blur, solarize in ((1.0, 0.0), (0.5, 0.5)):
        p = bl.view_params(16, 64, data.generator(0, 7), blur, solarize)
        views = bl.byol_views(images, p)
        reference = torch.stack([reference_view(images[i], p, i, 64) for i in range(16)])
        difference = (views - reference).abs()
        assert difference.mean() < 2e-3 and difference.max() < 0.03  # torchvision rounds the crop to uint8
        assert torch.equal(bl.byol_views(images, bl.view_params(16, 64, data.generator(0, 7), blur, solarize)),
                           views)  # a function of the generator's keys only
    assert p["flip"].any() and p["jitter"].any() and p["gray"].any() and p["blur"].any() and p["solarize"].any()


def test_view_parameters_follow_byols_distributions():
    n, size = 20000, 96
    p = bl.view_params(n, size, data.generator(1, 2), blur=0.1, solarize=0.2)
    x1, y1, x2, y2 = p["box"].unbind(1)
    area, ratio = (x2 - x1) * (y2 - y1) / size ** 2, (x2 - x1) / (y2 - y1)
    assert x1.min() >= 0 and y1.min() >= 0 and x2.max() <= size and y2.max() <= size
    torch.manual_seed(0)  # torchvision's RandomResizedCrop, which the per-sample views used, as the reference
    crop = torchvision.transforms.RandomResizedCrop(size, antialias=True)
    boxes = torch.tensor([crop.get_params(torch.zeros(3, size, size), crop.scale, crop.ratio)[2:] for _ in range(n)])
    reference = boxes.prod(1) / size ** 2
    assert area.min() > 0.075 and area.max() == 1.0 and abs(area.mean() - reference.mean()) < 0.01
    assert abs((area == 1).float().mean() - (reference == 1).float().mean()) < 0.01  # all tries failed: whole
    assert ratio.min() > 0.7 and ratio.max() < 1.4
    for key, rate in (("flip", 0.5), ("jitter", 0.8), ("gray", 0.2), ("blur", 0.1), ("solarize", 0.2)):
        assert abs(p[key].float().mean().item() - rate) < 0.015, key
    assert torch.equal(p["order"].sort(1).values, torch.arange(4).expand(n, 4))  # permutations
    assert (p["order"][:, 0] == 3).float().mean().item() == pytest.approx(0.25, abs=0.015)  # any order
    low, high = torch.tensor([0.6, 0.6, 0.8, -0.1]), torch.tensor([1.4, 1.4, 1.2, 0.1])
    assert (p["factors"] >= low).all() and (p["factors"] <= high).all()
    assert p["sigma"].min() >= 0.1 and p["sigma"].max() <= 2.0


def test_lead_zoom_shrinks_the_warped_copy_and_leaves_the_default_pairs_alone():
    ones = torch.ones(8, 3, 64, 64)  # the warped copy's non-zero area is its content's area
    plain, zoomed = (bl.lead_pairs(ones, data.generator(3, 5), zoom) for zoom in (1.0, 2.0))
    paper = data.warp_images(ones, data.random_tps(8, "pair", generator=data.generator(3, 5)))
    assert torch.equal(plain, paper)  # no zoom by default: the paper's pairs
    area, shrunk = plain.mean((1, 2, 3)), zoomed.mean((1, 2, 3))
    assert (area / 4 - 0.02 < shrunk).all() and (shrunk <= area).all()  # the same warp, shrunk by [1, 2]
    factors = (area / shrunk).sqrt()
    assert factors.max() - factors.min() > 0.2  # drawn per sample, not fixed
    noise = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    g = data.generator(3, 0)
    warp = data.random_tps(2, "pair", generator=g)
    warp = warp.then(data.zoom_out(2, 1 + torch.rand(2, generator=g)))  # drawn after the TPS, factor in [1, 2]
    once = data.warp_images(noise, warp)  # TPS and zoom composed: resampled once
    assert torch.allclose(bl.lead_pairs(noise, data.generator(3, 0), 2.0), once, atol=1e-5)


def one_step(monkeypatch, tmp_path, host_syncs, *flags):
    """Run main up to its first training step, take that step under the host-sync counter, stop."""
    calls = []

    def first_step(args, stage, run, loader, step_fn, state, epochs, device):
        batch = data.to_device(next(iter(loader)), device)
        step_fn(batch, data.generator(0, 0))  # compiles nothing, warms the allocator
        with host_syncs as counter:
            loss = step_fn(batch, data.generator(0, 1))
        calls.extend(counter.calls)
        assert loss.dim() == 0
        return False
    monkeypatch.setattr(bl, "train", first_step)
    bl.main(["--runs-dir", str(tmp_path), *TINY, "--log-every", "100", *flags])
    return calls


def test_a_training_step_makes_no_host_sync(monkeypatch, tmp_path, host_syncs):
    bl.main(["--runs-dir", str(tmp_path), *TINY, "--stage", "1", "--epochs", "0", "--name", "s2"])  # a network
    assert one_step(monkeypatch, tmp_path, host_syncs, "--stage", "1") == []
    for pairs in ("batch", "views"):
        assert one_step(monkeypatch, tmp_path, host_syncs, "--stage", "2", "--name", "s2", "--resume",
                        "--lead-pairs", pairs, "--lead-zoom", "1.5" if pairs == "views" else "1") == []


@pytest.mark.parametrize("kind", ["hypercol", "compact", "nmf"])
def test_an_export_runs_on_another_device_than_its_own(kind):
    """Each kind of .pt2 the script writes, built and exported on 'meta', runs on the CPU (data.on_device)."""
    resnet = bl.build_resnet("resnet18")
    module = {"hypercol": lambda: bl.Hypercolumn(resnet, bl.HYPER, 32),
              "compact": lambda: nn.Sequential(bl.Compact(resnet, 8), nn.Upsample(size=(32, 32), mode="bilinear")),
              "nmf": lambda: nn.Sequential(bl.Hypercolumn(resnet, bl.HYPER, 32),
                                           data.NMFCoefficients(torch.rand(4, 960), 3))}[kind]()
    net = nn.Sequential(data.Normalize(data.FACE_MEAN, data.FACE_STD), module).eval().to("meta")
    program = torch.export.export(net, (torch.rand(2, 3, 64, 64, device="meta"),))
    out = data.on_device(program.module(), "cpu").to_empty(device="cpu")(torch.rand(2, 3, 64, 64))
    assert out.shape[0] == 2 and out.shape[2:] == (32, 32) and out.device.type == "cpu"


@pytest.mark.slow
def test_stages_resume_export_and_evaluate(tmp_path):
    path = run(tmp_path, "--stop-after-steps", "1")  # interrupted in the middle of stage 1
    assert not os.path.exists(os.path.join(path, "hypercol.pt2"))
    with pytest.raises(SystemExit):  # a second run does not overwrite the checkpoint silently
        run(tmp_path)
    run(tmp_path, "--resume", "--stop-after-steps", "1")  # finishes stage 1 (2 steps); stage 2 stops after 1
    assert os.path.exists(os.path.join(path, "hypercol.pt2")) and not os.path.exists(os.path.join(path, "compact.pt2"))
    run(tmp_path, "--resume")
    for variant in ("hypercol", "compact", "nmf"):
        assert os.path.exists(os.path.join(path, f"{variant}.pt2"))
    for picture in ("pca_stage1.png", "pca_compact.png"):
        assert os.path.getsize(os.path.join(path, picture)) > 1000
    for stage in ("stage1", "stage2"):
        with open(os.path.join(path, f"log_{stage}.jsonl")) as f:
            assert json.loads(f.readline())["step"] == 2
    extractor = data.load_extractor(os.path.join(path, "hypercol.pt2"))
    assert [g[0] for g in extractor.meta["channel_groups"]] == ["layer4", "layer3", "layer2", "layer1"]
    assert extractor(torch.rand(3, 3, 64, 64)).shape == (3, 960, 32, 32)
    assert data.load_extractor(os.path.join(path, "compact.pt2"))(torch.rand(1, 3, 64, 64)).shape == (1, 8, 32, 32)
    assert data.load_extractor(os.path.join(path, "nmf.pt2"))(torch.rand(1, 3, 64, 64)).shape == (1, 4, 32, 32)

    import evaluate_exports  # imports regress.py and match.py: only the end-to-end test needs them
    evaluate_exports.regression_error(path, tmp_path, "compact")
    evaluate_exports.matching(path, tmp_path, ["compact", "nmf"])


@pytest.mark.slow
def test_resume_is_bit_exact(tmp_path):
    """Both stages, 2 epochs of 2 steps each, straight versus stopped after step 3 (mid-epoch) and resumed."""
    flags = ["--epochs", "2", "--lead-epochs", "2", "--deterministic", "--workers", "1", "--lead-pairs", "both"]
    for stage in ("1", "2"):
        straight = run(tmp_path / "a", *flags, "--stage", stage)
        run(tmp_path / "b", *flags, "--stage", stage, "--stop-after-steps", "3")  # in the middle of epoch 2
        resumed = run(tmp_path / "b", *flags, "--stage", stage, "--resume")
    for stage, names in (("stage1", ("online", "predictor", "target")), ("stage2", ("decoder", "head"))):
        a, b = [data.load_checkpoint(os.path.join(p, f"checkpoint_{stage}.pt")) for p in (straight, resumed)]
        assert a["step"] == b["step"] == 4 and "rng" not in a and "rng" not in b  # no random states
        for name in names:
            for key, value in a["state"][name].items():
                assert torch.equal(value, b["state"][name][key]), f"{stage} {name}.{key} differs after resume"


@pytest.mark.slow
def test_byol_and_lead_learn_on_the_synthetic_faces(tmp_path):
    """Stage 1: 12 BYOL steps lower the BYOL loss of 32 held-out view pairs far below that of the initial
    networks, without collapse (the target's normalised projections of different images stay as spread out).
    Stage 2: 16 steps lower the Eq. 3 loss of held-out image / warp pairs, decoder and head in eval mode, by
    more than 2%. (Instance retrieval across views stays at chance after a few hundred BYOL steps on these
    look-alike faces, so it cannot serve as the stage-1 check.)"""
    flags = ["--train-images", "192", "--batch-size", "16", "--lead-images", "128", "--lead-epochs", "2"]
    path = run(tmp_path, *flags, "--stage", "1")
    run(tmp_path, *flags, "--stage", "2")  # 16 steps on the pairs of views
    dataset = data.make_dataset("synth-faces", "val", size=64, normalize=False, length=32)
    images = torch.stack([data.Uint8Images(dataset)[(0, i)]["image"] for i in range(32)])
    normalize = data.Normalize(dataset.mean, dataset.std)
    pairs = {view: normalize(bl.byol_views(images, bl.view_params(32, 64, data.generator(5, view), blur, solarize)))
             for view, blur, solarize in ((1, 1.0, 0.0), (2, 0.1, 0.2))}

    def held_out(online, predictor, target):  # train mode: batch statistics, as in training
        with torch.no_grad():
            z1, z2 = target.train()(pairs[1]), target(pairs[2])
            loss = bl.byol_loss(*[predictor.train()(online.train()(pairs[v])) for v in (1, 2)], z1, z2)
        return loss.item(), nn.functional.normalize(z1, dim=1).std(0).sum().item()  # loss, spread

    torch.manual_seed(0)  # main's initialisation: seed, online network, predictor; the target a copy
    untrained = [bl.Online("resnet18", 64, 16), bl.mlp(16, 64, 16)]
    untrained.append(copy.deepcopy(untrained[0]))
    trained = [copy.deepcopy(m) for m in untrained]
    state = data.load_checkpoint(os.path.join(path, "checkpoint_stage1.pt"))["state"]
    for module, name in zip(trained, ("online", "predictor", "target")):
        module.load_state_dict(state[name])
    (loss_before, spread_before), (loss_after, spread_after) = held_out(*untrained), held_out(*trained)
    print(f"held-out BYOL loss {loss_before:.2f} -> {loss_after:.2f}, spread {spread_before:.2f} -> {spread_after:.2f}")
    assert loss_after < loss_before - 0.5 and spread_after > 0.5 * spread_before

    torch.manual_seed(0)  # an untrained decoder and head on the trained encoder
    compact, head = bl.Compact(trained[0].encoder.eval(), 8).eval(), bl.lead_head(8).eval()
    state = data.load_checkpoint(os.path.join(path, "checkpoint_stage2.pt"))["state"]
    images = torch.stack([dataset[i]["image"] for i in range(16)])
    warped = bl.lead_pairs(images, data.generator(5), zoom=1.0)

    def held_out_loss():
        with torch.no_grad():
            maps = compact.body(normalize(torch.cat([images, warped])))  # 32 x ...
            s = head(compact.decoder(maps))
            t = torch.cat([nn.functional.interpolate(maps[n], size=s.shape[-2:], mode="bilinear")
                           for n in bl.HYPER], 1)
            return bl.lead_loss(t[:16], t[16:], s[:16], s[16:]).item()

    before = held_out_loss()
    compact.decoder.load_state_dict(state["decoder"])
    head.load_state_dict(state["head"])
    after = held_out_loss()
    print(f"held-out Eq. 3 loss: {before:.1f} untrained, {after:.1f} trained")
    assert after < before - 0.02 * abs(before)
