"""Pretrained equivariant features for landmark discovery: Rahaman, Ghosh, Thiery, "Pretrained equivariant
features improve unsupervised landmark discovery", 2021, arXiv 2104.02925 (no public code: every choice the
paper leaves open is listed below).

The claim: a landmark detector trained end to end with the classic equivariance loss does NOT make its
intermediate features equivariant; pretraining them first (a pixel-level contrastive loss across random warps)
and then training the detector on them, frozen, gives better landmarks. Stages, written to
runs/equiv_pretrain/<name>/ (`--stage all`, the default, runs stage1 then stage2):
  stage1        F by the equivariant contrastive loss (Eq. 7) -> features.pt2 (64-d features);
  stage2        the detector T on frozen F (Eq. 2 + Eq. 3 + concentration) -> heatmaps.pt2 (F + T), landmarks.png;
  --end-to-end  (end2end) the baseline of Tab. 6 / Fig. 1: F and T trained together from scratch on the stage-2
                loss for --epochs + --equiv-det-epochs epochs -> end2end_{features,heatmaps}.pt2, end2end_landmarks.png.
`--epochs 0` exports untrained networks. Evaluate the features with `match.py --equivariance` (Acc(d), Fig. 2)
and the discovered landmarks with `regress.py --head ridge` (Tab. 3-6).

Paper -> code:  F (Sec. 4.1), T (Sec. 2), soft-argmax         -> Hourglass, Detector, expected_location
                Eq. 7 equivariant contrastive loss           -> equivariant_contrastive_loss[_blocked], sample_features
                Eq. 2, Eq. 3, concentration penalty          -> equivariance_loss, diversity_loss, variance_loss
                g (warps) and r (appearance) of Eq. 7        -> random_warp, appearance
                a step of stage 1, of stage 2 / end to end   -> stage1_step, detector_step

Paper values next to our CPU defaults: 20 epochs per stage (--epochs 1, --equiv-det-epochs 2, 2,048 synthetic
faces) | Adam lr 3e-4, x0.9 per epoch, L2 5e-4 as weight_decay (same) | tau 0.1, D = 64 (same) | K = 10, 20, 30,
50 (--equiv-k 10) | 128 px on BBC Pose (96 px, the face benchmarks' protocol; all lengths scaled by 96/128).

Choices the paper leaves open, and deviations (each deliberate; the details in the functions named):
- F: widths 32, 64, 128, 128, bilinear upsampling, a last 1x1 conv without ReLU (cosine similarity needs signs),
  BATCH NORM after each 3x3 conv (without it F learns slowly at lr 3e-4).
- Eq. 7: 64 points lambda per image, uniform; a pair whose g(lambda) leaves the frame is masked out; the
  negatives are all other kept features of the batch, from both images; both directions averaged.
- g of stage 1: rotation +-30 deg, zoom log-uniform in [1/1.25, 1.25], shift +-10% of the width, then an
  elastic warp (rms 0.05, smoothness 0.2); r: brightness and contrast in [0.7, 1.3], noise of std up to 0.04.
  g of stage 2: the same rotation and elastic warp (match.py's Acc(d) warps). T: two 3x3 convs (width 32).
  g, lambda and r come from data.generator(seed, step), applied on the device; the loader only renders images.
- Eq. 2 in x's frame through the warp's analytic backward map (no gradient through Newton's iterations).
- Eq. 3 as Thewlis et al. 2017 (cited by the paper) define it, as we read it (the paper's formula was not at hand).
- Loss weights and sharpness (the paper gives neither): diversity 3, concentration 1, T's logits x 10: the
  combination that gave ten sharp, distinct landmarks in one epoch (the runs: docs/equiv_pretrain.md).

On a GPU, --amp auto and --deterministic do what --help says; --workers defaults to the machine's cores.

Smallest run: `python equiv_pretrain.py --train-images 256 --equiv-det-epochs 1 --name tiny`: 16 steps of each
stage, a bar per epoch and a summary line per epoch and stage, then runs/equiv_pretrain/tiny/{features,heatmaps}.pt2
and landmarks.png, in a few minutes on 2 CPU cores (timings: docs/equiv_pretrain.md).
"""
import argparse
import copy
import os
import random
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

import data

SCRIPT = "equiv_pretrain"


# ===== Settings =====
def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add, switch = p.add_argument, argparse.BooleanOptionalAction
    add("--stage", default="all", choices=["all", "1", "2"], help="1: F (Eq. 7); 2: T on stage 1's F of this --name")
    add("--end-to-end", action=switch, default=False, help="baseline: F and T together from scratch -> end2end_*")
    add("--dataset", default="synth-faces", choices=list(data.DATASETS), help="training data (see data.py)")
    add("--data-root", default=None, help="dataset folder, for real datasets only")
    add("--image-size", type=int, default=96, help="side of the square input images (the protocol uses 96)")
    add("--train-images", type=int, default=2048, help="use only the first N training images (0: all)")
    add("--arch", default="hourglass", choices=["hourglass"], help="F (Sec. 4.1); its widths: --equiv-widths")
    add("--epochs", type=int, default=1, help="epochs of stage 1 (paper 20); 0: untrained F and T are exported")
    add("--batch-size", type=int, default=16, help="images per step, every stage")
    add("--lr", type=float, default=3e-4, help="Adam learning rate, x0.9 per epoch, every stage (paper 3e-4)")
    add("--workers", type=int, default=None, help="processes rendering images (default: 1 on a CPU, all cores on GPU)")
    add("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"], help=data.AMP_HELP)
    add("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="auto: cuda, mps, then cpu")
    add("--seed", type=int, default=0, help="seeds the initialisation, the data order and the augmentations")
    add("--deterministic", action=switch, default=False, help=data.DETERMINISTIC_HELP)
    add("--log-every", type=int, default=10, help="show the loss every N steps (reading it makes a GPU wait)")
    add("--name", default="default", help="run name: everything goes to <runs-dir>/equiv_pretrain/<name>/")
    add("--runs-dir", default="runs", help="root of the run directories")
    add("--resume", action=switch, default=False, help="continue each stage from its checkpoint")
    add("--stop-after-steps", type=int, default=0, help="checkpoint and stop a stage at this step (0: never)")
    add("--equiv-widths", default="32,64,128,128", help="channels of the hourglass's four blocks (narrower: faster)")
    add("--equiv-dim", type=int, default=64, help="D, channels of F's features (paper 64)")
    add("--equiv-points", type=int, default=64, help="locations lambda per image for Eq. 7 (negatives: all others)")
    add("--equiv-tau", type=float, default=0.1, help="temperature tau of Eq. 7 (paper 0.1)")
    add("--equiv-rotation", type=float, default=30.0, help="warps of both stages: rotation within +- degrees")
    add("--equiv-zoom", type=float, default=1.25, help="stage 1 warps: zoom log-uniform in [1/zoom, zoom]")
    add("--equiv-translation", type=float, default=0.1, help="stage 1 warps: shift within +- this (normalised)")
    add("--equiv-elastic", type=float, default=0.05, help="warps of both stages: rms elastic shift (0.05 ~ 2.4 px)")
    add("--equiv-jitter", type=float, default=0.3, help="r of Eq. 7: brightness, contrast factors in 1 +- this")
    add("--equiv-noise", type=float, default=0.04, help="r of Eq. 7: Gaussian pixel noise, std up to this")
    add("--equiv-k", type=int, default=10, help="K, landmarks the detector discovers (paper 10, 20, 30, 50)")
    add("--equiv-det-width", type=int, default=32, help="channels of the detector T's two 3x3 convs")
    add("--equiv-det-epochs", type=int, default=2, help="epochs of stage 2 (paper 20; cheap: F is frozen)")
    add("--equiv-logit-scale", type=float, default=10.0, help="factor on T's logits; at 1 heatmaps stay blurred long")
    add("--equiv-div-weight", type=float, default=3.0, help="weight of Eq. 3; raise it if landmarks pile up")
    add("--equiv-var-weight", type=float, default=1.0, help="weight of concentration; raise it if maps stay blurred")
    args = p.parse_args(argv)
    args.equiv_widths = [int(w) if w.isdigit() else 0 for w in args.equiv_widths.split(",")]
    if len(args.equiv_widths) != 4 or min(args.equiv_widths) < 1:
        p.error("--equiv-widths takes four comma-separated positive integers, e.g. 32,64,128,128")
    if args.end_to_end and args.stage != "all":
        p.error("--end-to-end trains F and T in one stage; drop --stage")
    if args.log_every < 1:
        p.error("--log-every takes a positive number of steps")
    return args


# ===== Model =====
def conv_block(c_in, c_out):
    """Two 3x3 convolutions, each followed by batch norm and ReLU."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(True),
                         nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(True))


class Hourglass(nn.Module):
    """F of Sec. 4.1: four conv blocks each followed by a 2x2 max-pool, a bottleneck block, a symmetric decoder
    (bilinear x2, concatenation with the skip, a conv block), a 1x1 conv: normalised (B, 3, H, W) -> (B, dim, H, W)."""

    def __init__(self, widths=(32, 64, 128, 128), dim=64):
        super().__init__()
        self.down = nn.ModuleList(conv_block(a, b) for a, b in zip([3] + list(widths[:-1]), widths))
        self.bottom = conv_block(widths[-1], widths[-1])
        outs = list(widths[::-1])  # decoder block i outputs the width of the encoder block it mirrors
        self.up = nn.ModuleList(conv_block(below + skip, skip) for below, skip in zip([widths[-1]] + outs[:-1], outs))
        self.out = nn.Conv2d(widths[0], dim, 1)

    def forward(self, x):
        skips = []
        for block in self.down:
            x = block(x)  # B x c_i x H/2^i x W/2^i
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.bottom(x)  # B x c_4 x H/16 x W/16
        for block in self.up:
            skip = skips.pop()
            x = block(torch.cat([F.interpolate(x, size=skip.shape[-2:], mode="bilinear"), skip], 1))
        return self.out(x)  # B x D x H x W


class Detector(nn.Sequential):
    """T of Sec. 2: F's features -> K logit maps, multiplied by a fixed `scale` (a sharp softmax over H x W pixels
    needs logit gaps ~log(HW)) -> K heatmaps (B, K, H, W) in float32, each a distribution over the pixels."""

    def __init__(self, dim, k, width, scale=1.0):
        super().__init__(nn.Conv2d(dim, width, 3, padding=1), nn.ReLU(True), nn.Conv2d(width, width, 3, padding=1),
                         nn.ReLU(True), nn.Conv2d(width, k, 1))
        self.scale = scale

    def forward(self, f):
        logits = super().forward(f) * self.scale  # B x K x H x W
        return logits.flatten(2).float().softmax(-1).view(logits.shape)  # the spatial softmax


def expected_location(heatmaps):
    """Heatmaps (B, K, H, W) of PROBABILITIES -> expected (x, y) (B, K, 2), normalised, pixel centres on
    linspace(-1, 1) (align_corners=True): the soft-argmax of the logits (regress.py's soft_argmax takes logits)."""
    grid = data.identity_grid(*heatmaps.shape[-2:], heatmaps.device, heatmaps.dtype).reshape(-1, 2)  # HW x 2
    return heatmaps.flatten(2) @ grid


# ===== Losses =====
def sample_features(f, points):
    """f (B, D, H, W), points (B, P, 2) normalised -> (B, P, D): bilinear at the exact sub-pixel points."""
    grid = points.unsqueeze(2).to(f.dtype)  # B x P x 1 x 2
    return F.grid_sample(f, grid, mode="bilinear", align_corners=True)[..., 0].transpose(1, 2)


def equivariant_contrastive_loss(f, f_prime, tau, keep):
    """Eq. 7, symmetric: for every pair i, -log exp(s(f_i, f'_i) / tau) / sum_{v != f_i} exp(s(f_i, v) / tau),
    and the same with f'_i as the anchor, averaged over the 2N anchors; s is the cosine similarity and v runs
    over all 2N sampled features of the batch except the anchor itself. f, f_prime: N x D, row i a pair;
    keep: N booleans, False for a pair that is neither anchor nor negative (its point left the frame)."""
    z = F.normalize(torch.cat([f, f_prime]).float(), dim=1)  # 2N x D
    n, kept = len(f), torch.cat([keep, keep])  # kept: 2N
    logits = z @ z.T / tau  # 2N x 2N
    excluded = torch.eye(2 * n, dtype=torch.bool, device=z.device) | ~kept  # no self, no dropped feature
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)  # f_i <-> f'_i
    return F.cross_entropy(logits.masked_fill(excluded, float("-inf")), positives.where(kept, -100))  # -100: ignored


def equivariant_contrastive_loss_blocked(f, f_prime, tau, keep, rows=1024):
    """equivariant_contrastive_loss (Eq. 7) computed `rows` anchors at a time, each block's (rows x 2N) logits
    recomputed in the backward pass (activation checkpointing): the memory of one block instead of the (2N)^2
    logits (32,768^2 floats, 4 GB per copy, at batch 256 with 64 points). Same value and gradient."""
    z = F.normalize(torch.cat([f, f_prime]).float(), dim=1)  # 2N x D
    n, kept = len(f), torch.cat([keep, keep])
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device).where(kept, -100)

    def block(z, start):  # the summed cross-entropy of anchors start .. start + rows
        logits = (z[start:start + rows] @ z.T / tau).masked_fill(~kept, float("-inf"))  # rows x 2N
        logits.diagonal(start).fill_(float("-inf"))  # (i, start + i): no anchor is its own negative
        return F.cross_entropy(logits, positives[start:start + rows], reduction="sum")

    return sum(checkpoint(block, z, start, use_reentrant=False) for start in range(0, 2 * n, rows)) / kept.sum()


def equivariance_loss(points, points_warped, warp):
    """Eq. 2: y_k(g x) should be g(y_k(x)); measured in x's frame, || y_k(x) - g^-1(y_k(g x)) ||^2 summed over
    (x, y), averaged over landmarks and images. points, points_warped: (B, K, 2) normalised; warp: a data.Warp."""
    return (points - warp.backward(points_warped)).pow(2).sum(-1).mean()


def diversity_loss(heatmaps, patch):
    """Eq. 3 on heatmaps (B, K, H, W) of probabilities: max-pool each over non-overlapping patch x patch cells;
    per cell sum_k pooled_k - max_k pooled_k (0 unless two maps have mass in it); summed over cells, mean over B."""
    pooled = F.max_pool2d(heatmaps, patch, patch, ceil_mode=True)  # B x K x H/patch x W/patch
    return (pooled.sum(1) - pooled.amax(1)).sum((1, 2)).mean()


def variance_loss(heatmaps):
    """Concentration penalty: sum over the K maps of trace Cov(h_k) = E ||u||^2 - ||E u||^2, u the normalised
    pixel positions, averaged over images. heatmaps: (B, K, H, W) probabilities."""
    grid = data.identity_grid(*heatmaps.shape[-2:], heatmaps.device, heatmaps.dtype).reshape(-1, 2)  # HW x 2
    mean = heatmaps.flatten(2) @ grid  # B x K x 2
    return (heatmaps.flatten(2) @ grid.pow(2).sum(1) - mean.pow(2).sum(-1)).sum(1).mean()


# ===== Views =====
def random_warp(n, args, g, device, zoom_and_shift):
    """g as a data.Warp drawn from the CPU generator g: a rotation, a zoom ("crop and zoom") and a shift for Eq. 7
    (stage 1; stage 2 and match.py's Acc(d) have neither), then an elastic warp."""
    zoom = (1 / args.equiv_zoom, args.equiv_zoom) if zoom_and_shift else (1.0, 1.0)
    shift = args.equiv_translation if zoom_and_shift else 0.0
    return data.random_affine(n, args.equiv_rotation, zoom, shift, generator=g, device=device).then(
        data.random_elastic(n, alpha=args.equiv_elastic, sigma=0.2, generator=g, device=device))


def appearance(images, jitter, noise, g):
    """r of Eq. 7 on images (B, 3, H, W) in [0, 1]: brightness and contrast factors in 1 +- jitter, then Gaussian
    noise of std U[0, noise], per image from the CPU generator g; the noise by a device generator seeded from g."""
    u = torch.rand(3, len(images), 1, 1, 1, generator=g).to(images.device, non_blocking=True)  # 3 x B x 1 x 1 x 1
    images = images * (1 + jitter * (2 * u[0] - 1))  # brightness
    mean = images.mean((1, 2, 3), keepdim=True)
    images = (images - mean) * (1 + jitter * (2 * u[1] - 1)) + mean  # contrast about the image's mean grey
    on_device = torch.Generator(images.device).manual_seed(random.Random(g.initial_seed()).getrandbits(63))
    return (images + noise * u[2] * torch.randn(images.shape, generator=on_device, device=images.device)).clamp(0, 1)


# ===== Training loop =====
def train(args, stage, run, loader, step_fn, state, epochs, device):
    """`step_fn(batch, generator) -> {"loss": tensor, other terms}` over `epochs` epochs: a bar, a log line (the
    mean of each term) and a checkpoint per epoch. Resume loads `state` (all that has a state_dict) and the step,
    nothing else: every random draw is a function of (seed, step). Returns False if --stop-after-steps stopped it."""
    path, step = os.path.join(run, f"checkpoint_{stage}.pt"), 0
    if args.resume and os.path.exists(path):
        checkpoint = data.load_checkpoint(path)
        for key, obj in state.items():
            obj.load_state_dict(checkpoint["state"][key])
        step = checkpoint["step"]
    per_epoch = loader.batch_sampler.n // loader.batch_sampler.batch_size  # steps per epoch
    if per_epoch == 0 and epochs > 0:
        raise SystemExit(f"error: {loader.batch_sampler.n} training images do not fill a batch; lower --batch-size")

    def save(): data.save_checkpoint(path, state={k: o.state_dict() for k, o in state.items()}, step=step,
                                     args=vars(args))
    for epoch in range(step // max(per_epoch, 1), epochs):
        loader.batch_sampler.epoch, loader.batch_sampler.start = epoch, step % per_epoch
        total, start, done = {}, time.time(), step % per_epoch  # total: each term's running sum, on the device
        bar = tqdm(loader, desc=f"{stage} epoch {epoch + 1}/{epochs}", initial=done, total=per_epoch)
        for batch in bar:
            terms = step_fn(data.to_device(batch, device), data.generator(args.seed, step))  # tensors: no sync
            total, step = {k: total.get(k, 0) + v for k, v in terms.items()}, step + 1
            if step % args.log_every == 0:
                bar.set_postfix(loss=f"{terms['loss'].item():.4f}")  # the only host sync of a step
            if step == args.stop_after_steps:
                save()
                print(f"{stage}: stopped after step {step} (--stop-after-steps); continue with --resume")
                return False
        n, seconds = per_epoch - done, time.time() - start
        means = {k: v.item() / n for k, v in total.items()}  # "loss" and each term
        data.log(run, stage, {"stage": stage, "epoch": epoch + 1, "step": step, **means,
                              "lr": state["optimizer"].param_groups[0]["lr"], "seconds": round(seconds, 1),
                              "images_per_s": round(n * loader.batch_sampler.batch_size / seconds, 1)})
        save()
    save()  # also for --epochs 0: later stages read this checkpoint
    return True


def update(loss, optimizer, scaler):
    """One optimiser step on `loss`; the scaler scales it only for fp16 (data.grad_scaler)."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def stage1_step(state, x, g, args, normalize, dtype):
    """Eq. 7 on images x (B, 3, S, S) in [0, 1]: views, loss, update; returns {"loss"}. Batches of 4,096 points
    or more (the (2N)^2 logits above 256 MB) take the blocked loss."""
    warp = random_warp(len(x), args, g, x.device, zoom_and_shift=True)
    x_prime = appearance(data.warp_images(x, warp), args.equiv_jitter, args.equiv_noise, g)  # r(g(x))
    lam = 2 * torch.rand(len(x), args.equiv_points, 2, generator=g) - 1  # B x P x 2, normalised
    lam = lam.to(x.device, non_blocking=True)
    lam_prime = warp.forward(lam)  # g(lambda), exact (NaN if lost: never for these warps)
    keep = (lam_prime.abs() <= 1).all(-1).flatten()  # B P: g(lambda) still on the image
    with data.autocast(x.device, dtype):
        f, f_prime = state["model"](normalize(torch.cat([x, x_prime]))).float().chunk(2)  # B x D x S x S each
    pairs = sample_features(f, lam).flatten(0, 1), sample_features(f_prime, lam_prime.nan_to_num()).flatten(0, 1)
    loss_fn = equivariant_contrastive_loss if len(keep) < 4096 else equivariant_contrastive_loss_blocked
    loss = loss_fn(*pairs, args.equiv_tau, keep)  # pairs: B P x D each
    update(loss, state["optimizer"], state["scaler"])
    state["scheduler"].step()
    return {"loss": loss.detach()}


def detector_step(state, features, x, g, args, normalize, dtype):
    """Eq. 2 + Eq. 3 + concentration on images x (B, 3, S, S) in [0, 1]: views, losses, update; returns the
    three terms and their weighted sum "loss". F is trained only when it is in `state` (--end-to-end)."""
    warp = random_warp(len(x), args, g, x.device, zoom_and_shift=False)
    x_warped = data.warp_images(x, warp)  # float32, outside autocast: moved by the exact map that Eq. 2 undoes
    with data.autocast(x.device, dtype), torch.set_grad_enabled("features" in state):
        f = features(normalize(torch.cat([x, x_warped])))  # 2B x D x S x S
    with data.autocast(x.device, dtype):
        heatmaps = state["detector"](f)  # 2B x K x S x S, float32
    h, h_prime = heatmaps.chunk(2)
    patch = max(1, round(8 * args.image_size / 128))  # Eq. 3's 8x8 patches at 128 px: 6x6 at 96 px
    terms = {"equivariance": equivariance_loss(expected_location(h), expected_location(h_prime), warp),
             "diversity": diversity_loss(heatmaps, patch), "concentration": variance_loss(heatmaps)}
    loss = terms["equivariance"] + args.equiv_div_weight * terms["diversity"] + \
        args.equiv_var_weight * terms["concentration"]
    update(loss, state["optimizer"], state["scaler"])
    state["scheduler"].step()
    return {"loss": loss.detach()} | {k: v.detach() for k, v in terms.items()}


# ===== Exports and pictures =====
def export(module, run, variant, info, args, groups, kind="features"):
    """<run>/<variant>.pt2: a frozen extractor of [0, 1] images (data.save_extractor); kind: features or heatmaps."""
    module = copy.deepcopy(module).float().cpu().eval().to(memory_format=torch.contiguous_format)
    meta = {"input_size": [args.image_size] * 2, "kind": kind, "method": SCRIPT, "variant": variant,
            "channel_groups": groups, "arch": args.arch, "dataset": args.dataset, "epochs": args.epochs}
    meta = data.save_extractor(module, os.path.join(run, f"{variant}.pt2"), meta, info.mean, info.std)
    print(f"exported {os.path.join(run, variant)}.pt2: {meta['channels']} x {meta['output_size']} {kind}")


def save_landmarks(path, images, heatmaps):
    """One PNG (Fig. 3-5 style): images (n, 3, H, W) in [0, 1] with the expected locations of their heatmaps
    (n, K, H, W) as coloured 3x3 dots, above the heatmaps, each scaled to its peak and coloured like its dot."""
    n, k, height, width = heatmaps.shape
    sector = (6 * ((torch.arange(k)[:, None] * 0.618034) % 1) + torch.tensor([5.0, 3.0, 1.0])) % 6  # K x 3
    rgb = 1 - 0.9 * torch.minimum(sector, 4 - sector).clamp(0, 1)  # HSV (golden-ratio hues, 0.9, 1) -> RGB, K x 3
    dotted, points = images.clone(), data.to_pixels(expected_location(heatmaps), (height, width)).round().long()
    for i in range(n):
        for j, (x, y) in enumerate(points[i].tolist()):  # points: n x K x (x, y) pixels
            dotted[i, :, max(y - 1, 0):y + 2, max(x - 1, 0):x + 2] = rgb[j].view(3, 1, 1)
    maps = torch.einsum("nkhw,kc->nchw", heatmaps / heatmaps.amax((2, 3), keepdim=True), rgb)  # n x 3 x H x W
    data.save_pictures(path, dotted, maps)


def load_features(run, device):
    """F from this run's checkpoint_stage1.pt, frozen and in eval mode (batch norm uses its running statistics)."""
    path = os.path.join(run, "checkpoint_stage1.pt")
    if not os.path.exists(path):
        raise SystemExit(f"error: no pretrained features at {path}; run --stage 1 with this --name first")
    checkpoint = data.load_checkpoint(path)
    model = Hourglass(checkpoint["args"]["equiv_widths"], checkpoint["args"]["equiv_dim"])
    model.load_state_dict(checkpoint["state"]["model"])
    return model.to(device, memory_format=torch.channels_last).eval().requires_grad_(False)  # channels_last: faster


# ===== Main =====
def main(argv=None):
    args = get_args(argv)
    device = data.choose_device(args.device)
    dtype = data.amp_dtype(device, args.amp)
    workers = data.default_workers(device) if args.workers is None else args.workers
    try:  # RGB in [0, 1]: warps and appearance changes act before normalising
        info = data.make_dataset(args.dataset, "train", root=args.data_root, size=args.image_size, normalize=False)
    except data.DatasetError as error:
        raise SystemExit(f"error: {error}")
    train_set = torch.utils.data.Subset(info, range(min(args.train_images or len(info), len(info))))
    normalize = data.Normalize(info.mean, info.std).to(device)
    try:  # the landmark pictures show test images when the dataset has a test split
        shown = data.make_dataset(args.dataset, "test", root=args.data_root, size=args.image_size, normalize=False)
    except data.DatasetError:
        shown = train_set
    figure_images = torch.stack([shown[i]["image"] for i in range(min(8, len(shown)))])  # 8 x 3 x H x W
    images = data.Uint8Images(train_set)  # the workers' share: uint8 images; the views are made in the steps
    loader = data.make_loader(images, args.batch_size, args.seed, workers, device)  # for every stage
    per_epoch = max(len(train_set) // args.batch_size, 1)
    stages = ["end2end"] if args.end_to_end else ["stage1", "stage2"] if args.stage == "all" else [f"stage{args.stage}"]

    def optimiser(params):  # every stage: Adam with L2 5e-4, lr x0.9 per epoch (a function of the step)
        optimizer = torch.optim.Adam(params, lr=args.lr, weight_decay=5e-4)
        return {"optimizer": optimizer, "scaler": data.grad_scaler(device, dtype),
                "scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.9 ** (step // per_epoch))}

    if "stage1" in stages:  # ---- F by the equivariant contrastive loss, Eq. 7 ------------------------------------
        run = data.start_run(args.runs_dir, SCRIPT, args.name, "stage1", args, args.resume)
        data.seed_everything(args.seed, args.deterministic)
        model = Hourglass(args.equiv_widths, args.equiv_dim).to(device, memory_format=torch.channels_last).train()
        state = {"model": model} | optimiser(model.parameters())

        def step_fn(batch, g):  # batch["image"]: B x 3 x S x S uint8
            return stage1_step(state, batch["image"].float() / 255, g, args, normalize, dtype)

        if not train(args, "stage1", run, loader, step_fn, state, args.epochs, device):
            return
        export(model.eval(), run, "features", info, args, [["features", 0, args.equiv_dim]])

    if {"stage2", "end2end"} & set(stages):  # ---- the detector T, Eq. 2-3 + concentration -----------------------
        end2end = args.end_to_end
        stage, prefix = ("end2end", "end2end_") if end2end else ("stage2", "")
        run = data.start_run(args.runs_dir, SCRIPT, args.name, stage, args, args.resume)
        data.seed_everything(args.seed, args.deterministic)
        features = Hourglass(args.equiv_widths, args.equiv_dim).to(device, memory_format=torch.channels_last) \
            if end2end else load_features(run, device)  # the baseline: F from scratch, by the detector's loss alone
        detector = Detector(args.equiv_dim, args.equiv_k, args.equiv_det_width, args.equiv_logit_scale)
        detector = detector.to(device, memory_format=torch.channels_last)
        trained = {"detector": detector} | ({"features": features} if end2end else {})
        state = trained | optimiser([p for module in trained.values() for p in module.parameters()])

        def step_fn(batch, g):  # batch["image"]: B x 3 x S x S uint8
            return detector_step(state, features, batch["image"].float() / 255, g, args, normalize, dtype)

        epochs = (args.epochs + args.equiv_det_epochs if end2end else args.equiv_det_epochs) if args.epochs else 0
        features.train(end2end)
        if not train(args, stage, run, loader, step_fn, state, epochs, device):
            return
        features.eval()
        if end2end:
            export(features, run, "end2end_features", info, args, [["features", 0, args.equiv_dim]])
        extractor = nn.Sequential(features, detector)
        export(extractor, run, f"{prefix}heatmaps", info, args, [["landmarks", 0, args.equiv_k]], "heatmaps")
        with torch.no_grad(), data.autocast(device, dtype):
            heatmaps = extractor(normalize(figure_images.to(device))).float().cpu()  # 8 x K x S x S
        save_landmarks(os.path.join(run, f"{prefix}landmarks.png"), figure_images, heatmaps)


if __name__ == "__main__":
    main()
