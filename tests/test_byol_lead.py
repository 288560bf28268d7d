"""byol_lead.py: losses against naive loops, BYOL's target network, the decoder's shape, and the script end to end.

Tiny settings throughout (ResNet-18 at 64 px, batches of 4) so that the file runs in about a minute on one core.
"""
import copy
import json
import math
import os

import pytest
import torch
from torch import nn

import byol_lead as bl
import data
import evaluate_exports

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


def test_chunked_lead_loss_equals_the_unchunked_one_with_its_gradients():
    torch.manual_seed(0)
    t_i, t_j = torch.randn(2, 3, 10, 5, 7)
    s = torch.randn(2, 3, 4, 5, 7, requires_grad=True)
    values, grads = [], []
    for chunk in (0, 8, 35):  # unchunked; 5 chunks, the last one short; one chunk of everything
        s.grad = None
        loss = bl.lead_loss(t_i, t_j, s[0], s[1], tau=0.05, chunk=chunk)
        loss.backward()
        values.append(loss.item())
        grads.append(s.grad.clone())
    assert values[1] == pytest.approx(values[0], rel=1e-5) and values[2] == pytest.approx(values[0], rel=1e-5)
    assert torch.allclose(grads[1], grads[0], rtol=1e-4, atol=1e-6)


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


def test_views_and_pairs_depend_only_on_seed_epoch_and_index():
    dataset = data.make_dataset("synth-faces", "train", size=64, normalize=False, length=4)
    views = bl.ByolViews(dataset, 64, dataset.mean, dataset.std, seed=0)
    a = views[1]
    assert a["view1"].shape == (3, 64, 64) and not torch.equal(a["view1"], a["view2"])
    assert torch.equal(views[1]["view2"], a["view2"])
    views.epoch = 1
    assert not torch.equal(views[1]["view1"], a["view1"])
    pairs = bl.LeadPairs(dataset, seed=0, warp=True)
    b = pairs[2]
    assert torch.equal(b["image"], dataset[2]["image"]) and not torch.equal(b["warped"], b["image"])
    assert torch.equal(pairs[2]["warped"], b["warped"])


def test_lead_zoom_shrinks_the_warped_copy_and_leaves_the_default_pairs_alone():
    ones = [{"image": torch.ones(3, 64, 64)}] * 8  # the warped copy's non-zero area is its content's area
    plain, zoomed = (bl.LeadPairs(ones, seed=3, warp=True, zoom=zoom) for zoom in (1.0, 2.0))
    g = bl.sample_generator(3, 0, 5)
    paper_pair = data.warp_images(ones[5]["image"][None], data.random_tps(1, "pair", generator=g))[0]
    assert torch.equal(bl.LeadPairs(ones, seed=3, warp=True)[5]["warped"], paper_pair)  # no zoom by default
    for i in range(8):
        area, shrunk = plain[i]["warped"].mean().item(), zoomed[i]["warped"].mean().item()
        assert area / 4 - 0.02 < shrunk <= area  # the same warp, then shrunk by a factor in [1, 2]
    factors = [(plain[i]["warped"].mean() / zoomed[i]["warped"].mean()).sqrt().item() for i in range(8)]
    assert max(factors) - min(factors) > 0.2  # drawn, not fixed
    noise = [{"image": torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))}]
    g = bl.sample_generator(3, 0, 0)
    warp = data.random_tps(1, "pair", generator=g)
    warp = warp.then(data.zoom_out(1, 1 + torch.rand(1, generator=g)))  # drawn after the TPS, factor in [1, 2]
    once = data.warp_images(noise[0]["image"][None], warp)[0]  # TPS and zoom composed: resampled once
    assert torch.allclose(bl.LeadPairs(noise, seed=3, warp=True, zoom=2.0)[0]["warped"], once, atol=1e-5)


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

    evaluate_exports.regression_error(path, tmp_path, "compact")
    evaluate_exports.matching(path, tmp_path, ["compact", "nmf"])


def test_resume_is_bit_exact(tmp_path):
    """Both stages, 2 epochs of 2 steps each, straight versus stopped after step 3 (mid-epoch) and resumed."""
    flags = ["--epochs", "2", "--lead-epochs", "2", "--deterministic", "--workers", "1", "--lead-pairs", "both"]
    for stage in ("1", "2"):
        straight = run(tmp_path / "a", *flags, "--stage", stage)
        run(tmp_path / "b", *flags, "--stage", stage, "--stop-after-steps", "3")  # in the middle of epoch 2
        resumed = run(tmp_path / "b", *flags, "--stage", stage, "--resume")
    for stage, names in (("stage1", ("online", "predictor", "target")), ("stage2", ("decoder", "head"))):
        a, b = [torch.load(os.path.join(p, f"checkpoint_{stage}.pt"), weights_only=False) for p in (straight, resumed)]
        assert a["step"] == b["step"] == 4
        for name in names:
            for key, value in a["state"][name].items():
                assert torch.equal(value, b["state"][name][key]), f"{stage} {name}.{key} differs after resume"


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
    pairs = torch.utils.data.default_collate([bl.ByolViews(dataset, 64, dataset.mean, dataset.std, seed=5)[i]
                                              for i in range(32)])

    def held_out(online, predictor, target):  # train mode: batch statistics, as in training
        with torch.no_grad():
            z1, z2 = target.train()(pairs["view1"]), target(pairs["view2"])
            loss = bl.byol_loss(*[predictor.train()(online.train()(pairs[v])) for v in ("view1", "view2")], z1, z2)
        return loss.item(), nn.functional.normalize(z1, dim=1).std(0).sum().item()  # loss, spread

    torch.manual_seed(0)  # main's initialisation: seed, online network, predictor; the target a copy
    untrained = [bl.Online("resnet18", 64, 16), bl.mlp(16, 64, 16)]
    untrained.append(copy.deepcopy(untrained[0]))
    trained = [copy.deepcopy(m) for m in untrained]
    state = torch.load(os.path.join(path, "checkpoint_stage1.pt"), weights_only=False)["state"]
    for module, name in zip(trained, ("online", "predictor", "target")):
        module.load_state_dict(state[name])
    (loss_before, spread_before), (loss_after, spread_after) = held_out(*untrained), held_out(*trained)
    print(f"held-out BYOL loss {loss_before:.2f} -> {loss_after:.2f}, spread {spread_before:.2f} -> {spread_after:.2f}")
    assert loss_after < loss_before - 0.5 and spread_after > 0.5 * spread_before

    torch.manual_seed(0)  # an untrained decoder and head on the trained encoder
    compact, head = bl.Compact(trained[0].encoder.eval(), 8).eval(), bl.LeadHead(8).eval()
    state = torch.load(os.path.join(path, "checkpoint_stage2.pt"), weights_only=False)["state"]
    normalize = data.Normalize(dataset.mean, dataset.std)
    images = torch.stack([dataset[i]["image"] for i in range(16)])
    warped = torch.stack([bl.LeadPairs(dataset, seed=5, warp=True)[i]["warped"] for i in range(16)])

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
