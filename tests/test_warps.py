"""Warps move images and points together: a bright dot drawn at a point must show up where the point mapping
sends the point, inverse maps must invert, the TPS must be DVE's formula (docs/protocol.md), and no warp may make
a GPU wait for the host."""
import math

import pytest
import torch

from data import (TPS_PRESETS, AffineWarp, ElasticWarp, TPSWarp, identity_grid, in_frame, random_affine,
                  random_elastic, random_tps, to_normalised, tps_training_pair, warp_images, warp_points, zoom_out)

SIZE = 96
torch.set_num_threads(1)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def autograd_jacobian(warp, uv):
    """(N, P, 2, 2) Jacobian of warp.backward by autograd, for any warp (a composition too). Each output depends on
    its own point only, so the gradients of the two summed output coordinates give both rows for every point."""
    with torch.enable_grad():
        u = uv.detach().requires_grad_(True)
        b = warp.backward(u)
        rows = [torch.autograd.grad(b[..., i].sum(), u, retain_graph=i == 0)[0] for i in range(2)]
    return torch.stack(rows, dim=-2)


def dots(points, size=SIZE, sigma=1.0):
    """(N, K, H, W) images, channel k = a Gaussian blob at points[:, k] (pixels)."""
    ys, xs = torch.meshgrid(torch.arange(size, dtype=points.dtype), torch.arange(size, dtype=points.dtype),
                            indexing="ij")
    dx = xs - points[..., 0, None, None]
    dy = ys - points[..., 1, None, None]
    return torch.exp(-(dx ** 2 + dy ** 2) / (2 * sigma ** 2))


def centroids(images):
    """(N, K, 2) intensity-weighted centre (x, y) in pixels of every channel."""
    size = images.shape[-1]
    coords = torch.arange(size, dtype=images.dtype)
    mass = images.sum((-1, -2))
    return torch.stack(((images.sum(-2) * coords).sum(-1), (images.sum(-1) * coords).sum(-1)), -1) / mass[..., None]


def check_dots(images, points_in, points_out, warp, tol_px):
    """``images``: the dots drawn at points_in, after the warp; each must sit within tol_px of points_out.
    Returns how many were checked. Skipped: dots cut by the frame, and dots on a fold of the map (det J < 0.3,
    or NaN), where a blob is squashed or mirrored and its centroid is no longer the mapped centre (see
    "Folds" in docs/protocol.md)."""
    ok = in_frame(points_in, SIZE, margin=8) & in_frame(points_out, SIZE, margin=8)
    det = torch.linalg.det(autograd_jacobian(warp, to_normalised(points_out, SIZE)))
    ok &= det > 0.3
    err = (centroids(images) - points_out).norm(dim=-1)
    assert (err[ok] < tol_px).all(), f"dot off by {err[ok].max():.3f} px"
    return int(ok.sum())


WARPS = {
    "tps-pair": lambda g: random_tps(8, "pair", g),
    "tps-match": lambda g: random_tps(8, "match", g),
    "tps-single": lambda g: random_tps(8, "single", g),
    "affine": lambda g: random_affine(8, rotation_deg=30, scale=(0.8, 1.25), translation=0.15, generator=g),
    "elastic": lambda g: random_elastic(8, generator=g),
    "zoom-out": lambda g: zoom_out(8, 1.7),
    "composed": lambda g: random_tps(8, "match", g).then(random_affine(8, generator=g)).then(
        random_elastic(8, generator=g)),
}


@pytest.mark.parametrize("name", sorted(WARPS))
def test_dot_lands_where_the_point_goes(name):
    g = gen(1)
    warp = WARPS[name](g)
    points = torch.rand(8, 6, 2, generator=g) * 50 + 23  # 6 dots per image, a batch of 8
    moved = warp_points(points, warp, SIZE)
    checked = check_dots(warp_images(dots(points), warp), points, moved, warp, tol_px=0.3)
    assert checked >= 40  # most of the 48 dots are away from the border and from folds


def test_training_pair_points_are_the_composition_and_follow_the_dots():
    g = gen(2)
    points = torch.rand(8, 6, 2, generator=g) * 50 + 23
    pair = tps_training_pair(dots(points), points, generator=g)
    assert isinstance(pair.warp1, TPSWarp) and isinstance(pair.warp12, TPSWarp)
    composed = pair.warp1.then(pair.warp12)
    torch.testing.assert_close(pair.points2, warp_points(points, composed, SIZE), equal_nan=True, atol=1e-4, rtol=0)
    torch.testing.assert_close(pair.points1, warp_points(points, pair.warp1, SIZE), equal_nan=True)
    torch.testing.assert_close(pair.image1, warp_images(dots(points), pair.warp1))
    torch.testing.assert_close(pair.image2, warp_images(pair.image1, pair.warp12))
    assert check_dots(pair.image2, points, pair.points2, composed, tol_px=0.5) >= 30  # resampled twice
    # warp12.grid is the dense correspondence image 2 pixel -> image 1 location (DVE's "grid").
    assert pair.warp12.grid(SIZE, SIZE).shape == (8, SIZE, SIZE, 2)


def test_match_preset_pairs_draw_both_warps_from_the_halved_sds():
    g1, g2 = gen(3), gen(3)
    pair = tps_training_pair(torch.zeros(4, 3, SIZE, SIZE), generator=g1, preset="match")
    torch.testing.assert_close(pair.warp1.weights, random_tps(4, "match", g2).weights)
    torch.testing.assert_close(pair.warp12.weights, random_tps(4, "match", g2).weights)
    assert pair.points1 is None and pair.points2 is None
    for key in ("sd_all", "sd_subset", "trans_sd", "scale_sd", "rot_sd"):
        assert TPS_PRESETS["match"][key] == pytest.approx(TPS_PRESETS["pair"][key] / 2)


def test_tps_is_the_protocol_formula():
    g = gen(4)
    warp = random_tps(3, "pair", g, dtype=torch.float64)
    # Naive evaluation, one pixel and one control point at a time, of [U(pixel, c) | 1 | x | y] @ W.
    ctrl = [(x, y) for y in torch.linspace(-1, 1, 10).tolist() for x in torch.linspace(-1, 1, 10).tolist()]
    grid = warp.grid(7, 5)
    for row, col in [(0, 0), (3, 2), (6, 4), (2, 1)]:
        x, y = -1 + 2 * col / 4, -1 + 2 * row / 6
        feats = [((x - cx) ** 2 + (y - cy) ** 2) * math.log((x - cx) ** 2 + (y - cy) ** 2 + 1e-5) for cx, cy in ctrl]
        feats = torch.tensor(feats + [1.0, x, y], dtype=torch.float64)
        torch.testing.assert_close(grid[:, row, col], feats @ warp.weights)
    pixels = identity_grid(7, 5, dtype=torch.float64).reshape(1, -1, 2).expand(3, -1, -1)
    torch.testing.assert_close(warp.backward(pixels), grid.reshape(3, -1, 2))  # general points = dense fast path


def test_tps_random_parameters_follow_the_presets():
    g = gen(5)
    W = random_tps(4000, "pair", g, dtype=torch.float64).weights
    assert W[:, 100].std().item() == pytest.approx(0.1, rel=0.05)  # translation sd
    scale = W[:, 101:].pow(2).sum(1)[:, 0].sqrt()  # |(s cos, s sin)| = s
    assert scale.std().item() == pytest.approx(0.1, rel=0.05)
    angle = torch.atan2(W[:, 102, 0], W[:, 101, 0]) * 180 / math.pi
    assert angle.std().item() == pytest.approx(5.0, rel=0.05)
    assert W[:, 102, 1].sub(W[:, 101, 0]).abs().max() < 1e-12  # rows (s cos, -s sin), (s sin, s cos)
    # Half the non-rigid weights from N(0, 0.01), half from N(0, 0.001): E|w| is their mean.
    expected = 0.5 * (0.01 + 0.001) * math.sqrt(2 / math.pi)
    assert W[:, :100].abs().mean().item() == pytest.approx(expected, rel=0.02)
    single = random_tps(1000, "single", g).weights[:, :100]
    assert (single == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)  # DVE's zero "subset"


def test_identity_parameters_give_the_identity():
    g = gen(6)
    images = torch.rand(3, 2, SIZE, SIZE, generator=g)
    points = torch.rand(3, 5, 2, generator=g) * (SIZE - 1)
    tps = torch.zeros(3, 103, 2)
    tps[:, 101, 0] = tps[:, 102, 1] = 1.0
    lattice = torch.linspace(-1, 1, 5)
    elastic = ElasticWarp(torch.zeros(3, 2, 5, 5), 0.3, lattice, lattice)
    for warp in (TPSWarp(tps), zoom_out(3, 1.0), elastic, zoom_out(3, 1.0).then(TPSWarp(tps))):
        torch.testing.assert_close(warp_images(images, warp), images, atol=1e-4, rtol=0)
        torch.testing.assert_close(warp_points(points, warp, SIZE), points, atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(WARPS))
def test_forward_and_backward_are_inverse(name, dtype):
    g = gen(7)
    warp = WARPS[name](g)
    warp = _cast(warp, dtype)
    tol = 2 * 1e-4 / (SIZE - 1) if dtype == torch.float32 else 1e-10  # 1e-4 px, resp. ~5e-9 px
    x = torch.rand(8, 50, 2, generator=g, dtype=dtype) * 2.4 - 1.2  # also outside the frame
    u = warp.forward(x)
    found = ~u.isnan().any(-1)  # NaN: no output location shows x (only a folded TPS does that)
    assert found.float().mean() >= (0.6 if "tps" in name or name == "composed" else 1.0)
    torch.testing.assert_close(warp.backward(u)[found], x[found], atol=tol, rtol=0)
    # forward(backward(u)) recovers u where the map is one-to-one (it is everywhere for affine and elastic).
    u = torch.rand(8, 50, 2, generator=g, dtype=dtype) * 2 - 1
    lattice = identity_grid(33, 33, dtype=dtype).reshape(1, -1, 2).expand(8, -1, -1)
    unfolded = torch.linalg.det(autograd_jacobian(warp, lattice)).amin(1) > 0
    torch.testing.assert_close(warp.forward(warp.backward(u))[unfolded], u[unfolded], atol=tol, rtol=0)
    assert warp.forward(u).dtype == dtype


def _cast(warp, dtype):
    """The same warp with parameters in ``dtype`` (rebuilt from its tensors)."""
    if isinstance(warp, TPSWarp):
        return TPSWarp(warp.weights.to(dtype))
    if isinstance(warp, AffineWarp):
        return AffineWarp(warp.theta.to(dtype))
    if isinstance(warp, ElasticWarp):
        return ElasticWarp(warp.weights.to(dtype), warp.sigma, warp.centres_x.to(dtype), warp.centres_y.to(dtype))
    first, *rest = [_cast(w, dtype) for w in warp.warps]
    for w in rest:
        first = first.then(w)
    return first


def test_analytic_jacobians_match_autograd():
    g = gen(8)
    uv = torch.rand(4, 9, 2, generator=g, dtype=torch.float64) * 2.4 - 1.2
    f64 = dict(generator=g, dtype=torch.float64)
    for warp in (random_tps(4, "pair", **f64), random_elastic(4, **f64), random_affine(4, **f64)):
        torch.testing.assert_close(warp.jacobian(uv), autograd_jacobian(warp, uv))  # analytic == autograd


def test_elastic_warp_is_smooth_invertible_and_has_the_requested_strength():
    g = gen(9)
    warp = random_elastic(16, alpha=0.05, sigma=0.2, max_grad=0.5, generator=g, dtype=torch.float64)
    uv = identity_grid(41, 41, dtype=torch.float64).reshape(1, -1, 2).expand(16, -1, -1) * 1.3
    grad = warp.jacobian(uv) - torch.eye(2, dtype=torch.float64)
    assert grad.pow(2).sum((-1, -2)).sqrt().max() <= 0.5 * 1.03  # |grad d| <= max_grad (checked on a lattice)
    rms = (warp.backward(uv) - uv).pow(2).mean().sqrt().item()
    assert 0.02 < rms <= 0.05  # alpha = 0.05 before the gradient cap shrinks the strongest samples


def test_same_generator_seed_gives_the_same_warps():
    images = torch.rand(4, 3, SIZE, SIZE, generator=gen(10))
    points = torch.rand(4, 5, 2, generator=gen(11)) * 60 + 18
    a = tps_training_pair(images, points, generator=gen(12))
    b = tps_training_pair(images, points, generator=gen(12))
    c = tps_training_pair(images, points, generator=gen(13))
    torch.testing.assert_close(a.image2, b.image2)
    torch.testing.assert_close(a.points2, b.points2, equal_nan=True)
    assert not torch.equal(a.warp12.weights, c.warp12.weights)
    for make in (lambda s: random_affine(4, generator=gen(s)).theta,
                 lambda s: random_elastic(4, generator=gen(s)).weights):
        assert torch.equal(make(1), make(1)) and not torch.equal(make(1), make(2))


def test_float64_inputs_stay_float64():
    images = torch.rand(2, 3, SIZE, SIZE, dtype=torch.float64)
    points = torch.rand(2, 4, 2, dtype=torch.float64) * 60 + 18
    pair = tps_training_pair(images, points, generator=gen(14))
    assert pair.image1.dtype == pair.image2.dtype == pair.points2.dtype == pair.warp1.weights.dtype == torch.float64
    warp = random_elastic(2, generator=gen(15), dtype=torch.float64)
    assert warp.grid(SIZE, SIZE).dtype == warp_points(points, warp, SIZE).dtype == torch.float64


def test_points_leaving_the_frame_are_kept_exactly_and_flagged():
    centre = (SIZE - 1) / 2
    points = torch.tensor([[[centre, centre], [10.0, 20.0], [2.0, 90.0], [95.0, 0.0]]])
    zoomed_in = warp_points(points, zoom_out(1, 0.5), SIZE)  # factor 0.5: twice as large
    torch.testing.assert_close(zoomed_in, centre + 2 * (points - centre))  # exact, e.g. (-75.5, -55.5), unclamped
    assert in_frame(zoomed_in, SIZE).tolist() == [[True, False, False, False]]
    shrunk = warp_points(points, zoom_out(1, 2.0), SIZE)  # factor 2: half as large, everything stays in
    torch.testing.assert_close(shrunk, centre + (points - centre) / 2)
    assert in_frame(shrunk, SIZE).all()
    assert not in_frame(torch.full((1, 1, 2), float("nan")), SIZE).any()  # a point shown nowhere is outside


def test_points_shown_nowhere_in_the_output_come_back_as_nan():
    g = gen(16)
    warp = random_tps(8, "pair", g, dtype=torch.float64)  # strong draws: some fold inside the frame
    x = torch.rand(8, 100, 2, generator=g, dtype=torch.float64) * 2 - 1  # input points inside the frame
    u = warp.forward(x)
    lost = u.isnan().any(-1)
    assert 0 < lost.sum() < 0.2 * lost.numel()
    assert (warp.backward(u.nan_to_num()) - x)[~lost].abs().max() < 1e-10
    # Lost points are not an artefact of the coarse starting lattice: Newton restarted from the best node of a
    # 16 times denser lattice (1.5 px spacing, 1.5 times the frame) finds no solution either, and most of them
    # are more than a pixel away from everything the output shows.
    nodes = (identity_grid(97, 97, dtype=torch.float64) * 1.5).reshape(-1, 2)
    dist = torch.cdist(x, warp.backward(nodes.expand(8, -1, -1)))  # (8, 100, 97 * 97)
    restarted = warp._newton(x, nodes[dist.argmin(-1)])
    assert restarted[lost].isnan().all()
    assert (dist.amin(-1)[lost] * (SIZE - 1) / 2 > 1.0).float().mean() > 0.8


@pytest.mark.parametrize("name", sorted(WARPS))
def test_warps_never_read_a_value_on_the_host(name, host_syncs):
    """Drawing a warp, warping images and moving points make none of the calls that stop a GPU's queue until the
    host has a value (no .any() per Newton step, no nonzero, no boolean indexing): on a GPU they only queue work."""
    g = gen(17)
    images, points = torch.rand(8, 3, 32, 32, generator=g), torch.rand(8, 5, 2, generator=g) * 31
    with host_syncs as counter:
        warp = WARPS[name](g)
        warp_images(images, warp), warp_points(points, warp, 32)
        if name == "tps-pair":
            tps_training_pair(images, points, generator=g)
    assert counter.calls == []


def test_warps_run_where_no_value_can_be_read():
    """On the "meta" device tensors have shapes but no values, so any host read would raise: every warp and the
    training pair still run there, with the shapes they have on a real device."""
    g, meta = gen(18), torch.device("meta")
    images, points = torch.rand(4, 3, 32, 32, device=meta), torch.rand(4, 5, 2, device=meta)
    pair = tps_training_pair(images, points, generator=g)
    assert pair.image2.device == pair.points2.device == meta and pair.points2.shape == (4, 5, 2)
    for warp in (random_tps(4, "single", g, device=meta), random_affine(4, generator=g, device=meta),
                 zoom_out(4, 2.0, device=meta).then(random_elastic(4, generator=g, device=meta))):
        assert warp_images(images, warp).shape == (4, 3, 32, 32)
        assert warp_points(points, warp, 32).shape == (4, 5, 2)
