"""Pretrained equivariant features for landmark discovery: Rahaman, Ghosh, Thiery, "Pretrained equivariant
features improve unsupervised landmark discovery", 2021, arXiv 2104.02925 (no public code: every choice the
paper leaves open is listed below).

The claim: a landmark detector trained end to end with the classic equivariance loss does NOT make its
intermediate features equivariant; pretraining the features first, with a pixel-level contrastive loss across
random warps, and only then training the detector on them (frozen) gives better landmarks. Stages, written
to runs/equiv_pretrain/<name>/; `--stage all` (the default) runs 1 then 2:
  1 (label stage1)  the hourglass F by the equivariant contrastive loss (Eq. 7): features.pt2 (F, 64-d);
  2 (label stage2)  the detector T on frozen F (equivariance + diversity + concentration losses):
                    heatmaps.pt2 (F + T, K maps of kind "heatmaps") and landmarks.png;
  --end-to-end      (label end2end) the baseline of Tab. 6 / Fig. 1: F and T trained together from scratch on
                    the stage-2 loss: end2end_features.pt2, end2end_heatmaps.pt2, end2end_landmarks.png.
`--epochs 0` exports untrained networks. Evaluate the features with match.py (Acc(d), Fig. 2 right, both models
on one plot) and the discovered landmarks with regress.py --head ridge (Tab. 3-6):
  python match.py --features runs/equiv_pretrain/default/features.pt2 \
      runs/equiv_pretrain/default/end2end_features.pt2 --equivariance --acc-at 15
  python regress.py --features runs/equiv_pretrain/default/heatmaps.pt2 --head ridge

Paper -> code:  Sec. 4.1 hourglass F                         -> Hourglass
                Sec. 2 detector T, spatial soft-argmax       -> Detector, SpatialSoftmax, expected_location
                Eq. 7 equivariant contrastive loss           -> equivariant_contrastive_loss (and its blocked
                                                                twin for large batches), sample_features
                Eq. 2 equivariance loss                      -> equivariance_loss
                Eq. 3 diversity loss on patches              -> diversity_loss
                concentration (variance) penalty             -> variance_loss
                g (warps) and r (appearance) of Eq. 7        -> random_warp, appearance
                one training step of each stage              -> stage1_losses, detector_losses

Paper values next to our CPU defaults: 20 epochs per stage (--epochs 1 and --equiv-det-epochs 2 of 2,048
synthetic faces) | Adam lr 3e-4 (same), lr x0.9 per epoch (same), L2 5e-4 (same, Adam's weight_decay) | tau 0.1
(same) | D = 64 (same) | K = 10, 20, 30, 50 landmarks (--equiv-k 10) | 128 px on BBC Pose (96 px: the protocol
of the face benchmarks; every length below is scaled by 96/128).

Choices the paper leaves open (ours, with the reason):
- Hourglass widths 32, 64, 128, 128 (--equiv-widths), bottleneck as wide as the last block, bilinear x2
  upsampling, a final 1x1 conv to D = 64 without ReLU (cosine similarity needs signed features). Each 3x3 conv
  is followed by BATCH NORM before its ReLU: without it the 18-conv network trained from scratch learns slowly
  at lr 3e-4 in a few hundred steps. Exports use the running statistics (eval mode).
- Eq. 7: --equiv-points 64 locations lambda per image, uniform over the image; pairs whose g(lambda) leaves the
  frame are masked out; features are read by bilinear interpolation at the exact sub-pixel points (grid_sample,
  align_corners=True, the convention of data.py). The denominators hold every other kept feature of the batch,
  from both images (2N - 2 negatives and the positive); a feature's similarity with itself is excluded. The
  loss is averaged over the 2N anchors (both directions of Eq. 7).
- g in stage 1: rotation within +-30 deg, zoom log-uniform in [1/1.25, 1.25] ("crop and zoom"), translation
  within +-10% of the width, then an elastic warp (rms 0.05 normalised, smoothness 0.2); all from data.py,
  which maps points exactly. r: brightness and contrast factors in [0.7, 1.3] and Gaussian noise with a std up
  to 0.04, per image, on the warped image only.
- Stage 2: g = rotation within +-30 deg then the same elastic warp (the warps of match.py's Acc(d)); T = two
  3x3 convs (width 32) with ReLU and a 1x1 conv to K maps; heatmaps = spatial softmax over all pixels;
  landmarks = their expected location (soft-argmax of the logits).
- Eq. 2 is measured in the frame of x: || y_k(x) - g^-1(y_k(g x)) ||^2 in normalised units, averaged over k
  and images. It is zero exactly when y_k(g x) = g(y_k(x)); mapping the detections of g x back with the warp's
  analytic backward map (data.Warp.backward) keeps the gradient exact, where g(y_k(x)) would differentiate
  through Newton's iterations. The image g x is warped in float32 even under --amp, so that it moves by exactly
  the map that Eq. 2 uses.
- Eq. 3 (the paper's exact formula could not be consulted offline; this is the form of Thewlis et al. 2017
  that it cites, as we read it): max-pool every heatmap over non-overlapping patches (8x8 at 128 px: 6x6 at
  96 px), then sum over patches of (sum_k pooled_k - max_k pooled_k): zero when no two heatmaps have mass in a
  common patch, (K - 1) x peak when all coincide. Summed over patches, averaged over images.
- Concentration: sum_k trace Cov(h_k) in normalised units, averaged over images.
- Weights and sharpness (the paper gives neither): equivariance 1, diversity 3 (--equiv-div-weight),
  concentration 1 (--equiv-var-weight), and T's output multiplied by 10 before the softmax
  (--equiv-logit-scale): the combination that gave ten sharp, distinct landmarks within one epoch on the
  synthetic faces (the runs behind it are in docs/equiv_pretrain.md).
- --end-to-end trains F and T together for --epochs + --equiv-det-epochs epochs: as many steps as the two
  stages took together.

Deviations, each deliberate:
- 96 px instead of the paper's 128 px; lengths scaled accordingly.
- Every random draw after initialisation (warps, points lambda, appearance) comes from data.generator(seed,
  step), drawn on the CPU and moved to the device; the data loader only renders the images (uint8). Resume is
  exact with a checkpoint of weights, optimiser, scheduler and step only.

On a GPU: --amp auto picks bf16 or fp16 with loss scaling by the GPU's generation, --deterministic makes what
can be bit-exact so (see --help for both); --workers defaults to the machine's cores there.

Smallest run: `python equiv_pretrain.py --train-images 256 --equiv-det-epochs 1 --name tiny`: 16 steps of each
stage, a bar per epoch and a summary line per epoch and stage, then runs/equiv_pretrain/tiny/{features,heatmaps}.pt2
and landmarks.png, in a few minutes on 2 CPU cores (timings in docs/equiv_pretrain.md).
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


# =========================================================================================================
# Settings
# =========================================================================================================
def get_args(argv=None):
    p = argparse.ArgumentParser(description="Pretrained equivariant features + landmark detector (Rahaman et "
                                "al. 2021)", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add, switch = p.add_argument, argparse.BooleanOptionalAction
    add("--stage", default="all", choices=["all", "1", "2"],
        help="1: pretrain F (Eq. 7); 2: the detector on frozen F, read from stage 1 of the same --name")
    add("--end-to-end", action=switch, default=False, help="the baseline instead: F and T trained together from "
        "scratch on the stage-2 loss (stage 1 skipped); writes end2end_* files, so it can share a --name")
    add("--dataset", default="synth-faces", choices=list(data.DATASETS), help="training data (see data.py)")
    add("--data-root", default=None, help="dataset folder, for real datasets only")
    add("--image-size", type=int, default=96, help="side of the square input images (the protocol uses 96)")
    add("--train-images", type=int, default=2048, help="use only the first N training images (0: all)")
    add("--arch", default="hourglass", choices=["hourglass"], help="feature extractor F (Sec. 4.1); its widths "
        "are --equiv-widths")
    add("--epochs", type=int, default=1, help="epochs of stage 1 (paper 20); 0 exports untrained networks (F and "
        "T: stage 2 then trains no epoch either)")
    add("--batch-size", type=int, default=16, help="images per step, every stage")
    add("--lr", type=float, default=3e-4, help="Adam learning rate, x0.9 per epoch, every stage (paper 3e-4)")
    add("--workers", type=int, default=None, help="data-loader processes, which only render the images "
        "(default: 1 on a CPU, the machine's cores on a GPU)")
    add("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"], help=data.AMP_HELP)
    add("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="auto: cuda, mps, then cpu")
    add("--seed", type=int, default=0, help="seeds the initialisation, the data order and the augmentations")
    add("--deterministic", action=switch, default=False, help=data.DETERMINISTIC_HELP)
    add("--log-every", type=int, default=10, help="show the loss every N steps (reading it makes a GPU wait)")
    add("--name", default="default", help="run name: everything goes to <runs-dir>/equiv_pretrain/<name>/")
    add("--runs-dir", default="runs", help="root of the run directories")
    add("--resume", action=switch, default=False, help="continue each stage from its checkpoint")
    add("--stop-after-steps", type=int, default=0, help="checkpoint and stop a stage after this many steps "
        "(0: never); simulates an interruption")
    add("--equiv-widths", default="32,64,128,128", help="channels of the hourglass's four blocks; narrower is "
        "faster (the full-resolution block costs the most)")
    add("--equiv-dim", type=int, default=64, help="D, channels of F's features (paper 64)")
    add("--equiv-points", type=int, default=64, help="locations lambda sampled per image for Eq. 7; the "
        "negatives of each are the other 2 x batch x points - 2 features")
    add("--equiv-tau", type=float, default=0.1, help="temperature tau of Eq. 7 (paper 0.1)")
    add("--equiv-rotation", type=float, default=30.0, help="warps of both stages: rotation within +- degrees")
    add("--equiv-zoom", type=float, default=1.25, help="stage 1 warps: zoom log-uniform in [1/zoom, zoom]")
    add("--equiv-translation", type=float, default=0.1, help="stage 1 warps: shift within +- this (normalised)")
    add("--equiv-elastic", type=float, default=0.05, help="warps of both stages: rms elastic displacement "
        "(normalised; 0.05 ~ 2.4 px at 96 px), smoothness 0.2")
    add("--equiv-jitter", type=float, default=0.3, help="r of Eq. 7: brightness and contrast factors within "
        "1 +- jitter")
    add("--equiv-noise", type=float, default=0.04, help="r of Eq. 7: Gaussian pixel noise, std up to this")
    add("--equiv-k", type=int, default=10, help="K, landmarks the detector discovers (paper 10, 20, 30, 50)")
    add("--equiv-det-width", type=int, default=32, help="channels of the detector T's two 3x3 convs")
    add("--equiv-det-epochs", type=int, default=2, help="epochs of stage 2 (paper 20); it is cheap, F being "
        "frozen")
    add("--equiv-logit-scale", type=float, default=10.0, help="fixed factor on T's output before the spatial "
        "softmax; at 1, Adam at lr 3e-4 needs thousands of steps to make the heatmaps sharp")
    add("--equiv-div-weight", type=float, default=3.0, help="weight of the diversity loss (Eq. 3); raise it if "
        "landmarks pile up on one spot")
    add("--equiv-var-weight", type=float, default=1.0, help="weight of the concentration penalty; raise it if "
        "the heatmaps stay blurred")
    args = p.parse_args(argv)
    try:
        args.equiv_widths = [int(w) for w in args.equiv_widths.split(",")]
    except ValueError:
        p.error("--equiv-widths takes four comma-separated integers, e.g. 32,64,128,128")
    if len(args.equiv_widths) != 4 or min(args.equiv_widths) < 1:
        p.error("--equiv-widths takes four comma-separated positive integers, e.g. 32,64,128,128")
    if args.end_to_end and args.stage != "all":
        p.error("--end-to-end trains F and T in one stage; drop --stage")
    if args.log_every < 1:
        p.error("--log-every takes a positive number of steps")
    return args


# =========================================================================================================
# Model: the hourglass F, the detector T, the spatial softmax and the expected location
# =========================================================================================================
def conv_block(c_in, c_out):
    """Two 3x3 convolutions, each followed by batch norm and ReLU."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(True),
                         nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(True))


class Hourglass(nn.Module):
    """F of Sec. 4.1: four conv blocks each followed by a 2x2 max-pool (resolution / 16 at the bottom), a
    bottleneck block, a symmetric decoder (bilinear x2, concatenation with the skip of the same resolution, a
    conv block) and a 1x1 conv to `dim` channels. Normalised (B, 3, H, W) -> (B, dim, H, W)."""

    def __init__(self, widths=(32, 64, 128, 128), dim=64):
        super().__init__()
        ins = [3] + list(widths[:-1])
        self.down = nn.ModuleList(conv_block(a, b) for a, b in zip(ins, widths))
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


class Detector(nn.Module):
    """T of Sec. 2: a small fully convolutional network on F's features -> K heatmap logits (B, K, H, W), its
    output multiplied by a fixed `scale` (a sharp spatial softmax over H x W pixels needs logit gaps ~log(HW))."""

    def __init__(self, dim, k, width, scale=1.0):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(dim, width, 3, padding=1), nn.ReLU(True),
                                 nn.Conv2d(width, width, 3, padding=1), nn.ReLU(True), nn.Conv2d(width, k, 1))
        self.scale = scale

    def forward(self, f):
        return self.net(f) * self.scale


class SpatialSoftmax(nn.Module):
    """Logits (B, K, H, W) -> heatmaps: each map a probability distribution over the H x W pixels."""

    def forward(self, logits):
        return logits.flatten(2).float().softmax(-1).view(logits.shape)


def expected_location(heatmaps):
    """Heatmaps (B, K, H, W) of PROBABILITIES -> their expected (x, y) in normalised [-1, 1] coordinates
    (B, K, 2), pixel centres on linspace(-1, 1) (align_corners=True, as regress.py's ridge head). Applied to
    SpatialSoftmax's output this is the soft-argmax of the logits (regress.py's soft_argmax takes logits)."""
    grid = data.identity_grid(*heatmaps.shape[-2:], heatmaps.device, heatmaps.dtype).reshape(-1, 2)  # HW x 2
    return heatmaps.flatten(2) @ grid


# =========================================================================================================
# Losses
# =========================================================================================================
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
        logits = z[start:start + rows] @ z.T / tau  # rows x 2N
        itself = torch.arange(start, start + len(logits), device=z.device)[:, None] == torch.arange(2 * n,
                                                                                                   device=z.device)
        logits = logits.masked_fill(itself | ~kept, float("-inf"))
        return F.cross_entropy(logits, positives[start:start + rows], reduction="sum")

    total = sum(checkpoint(block, z, start, use_reentrant=False) for start in range(0, 2 * n, rows))
    return total / kept.sum()


def equivariance_loss(points, points_warped, warp):
    """Eq. 2: y_k(g x) should be g(y_k(x)); measured in x's frame, || y_k(x) - g^-1(y_k(g x)) ||^2 summed over
    (x, y), averaged over landmarks and images. points, points_warped: (B, K, 2) normalised; warp: a data.Warp."""
    return (points - warp.backward(points_warped)).pow(2).sum(-1).mean()


def diversity_loss(heatmaps, patch):
    """Eq. 3: max-pool each heatmap over non-overlapping patch x patch cells, then per cell
    sum_k pooled_k - max_k pooled_k (zero unless two maps have mass in the cell), summed over cells, averaged
    over images. heatmaps: (B, K, H, W) probabilities."""
    pooled = F.max_pool2d(heatmaps, patch, patch, ceil_mode=True)  # B x K x H/patch x W/patch
    return (pooled.sum(1) - pooled.amax(1)).sum((1, 2)).mean()


def variance_loss(heatmaps):
    """Concentration penalty: sum over the K maps of trace Cov(h_k) = E ||u||^2 - ||E u||^2, u the normalised
    pixel positions, averaged over images. heatmaps: (B, K, H, W) probabilities."""
    grid = data.identity_grid(*heatmaps.shape[-2:], heatmaps.device, heatmaps.dtype).reshape(-1, 2)  # HW x 2
    mean = heatmaps.flatten(2) @ grid  # B x K x 2
    return (heatmaps.flatten(2) @ grid.pow(2).sum(1) - mean.pow(2).sum(-1)).sum(1).mean()


# =========================================================================================================
# Views: the warps g and the appearance change r, drawn in the step for the whole batch
# =========================================================================================================
class Images(torch.utils.data.Dataset):
    """The worker's share: training image `index` as uint8 (3, H, W) for a key (epoch, index) of
    data.make_loader's sampler. Nothing random happens here: the views are drawn on the device, in the step."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        return {"image": (self.dataset[key[1]]["image"] * 255).round().to(torch.uint8)}


def random_warp(n, args, g, device, zoom_and_shift):
    """g as a data.Warp: a rotation about the centre, with a zoom ("crop and zoom") and a shift for Eq. 7
    (stage 1) or without them for Eq. 2 (stage 2: the warps of match.py's Acc(d)), then an elastic warp. The
    parameters come from the CPU generator `g` and are moved to `device`."""
    zoom = (1 / args.equiv_zoom, args.equiv_zoom) if zoom_and_shift else (1.0, 1.0)
    shift = args.equiv_translation if zoom_and_shift else 0.0
    return data.random_affine(n, args.equiv_rotation, zoom, shift, generator=g, device=device).then(
        data.random_elastic(n, alpha=args.equiv_elastic, sigma=0.2, generator=g, device=device))


def appearance(images, jitter, noise, g):
    """r of Eq. 7 on (B, 3, H, W) images in [0, 1]: brightness and contrast factors within 1 +- jitter, then
    Gaussian noise of a std uniform in [0, noise], each drawn per image from the CPU generator `g`; the noise
    itself is drawn where the images are, by a generator seeded from g (no image-sized copy to the device)."""
    b, device = len(images), images.device
    u = torch.rand(3, b, 1, 1, 1, generator=g).to(device)  # brightness, contrast, noise level: 3 x B x 1 x 1 x 1
    brightness, contrast, sigma = 1 + jitter * (2 * u[0] - 1), 1 + jitter * (2 * u[1] - 1), noise * u[2]
    images = images * brightness
    mean = images.mean((1, 2, 3), keepdim=True)
    images = (images - mean) * contrast + mean  # contrast about the image's mean grey
    on_device = torch.Generator(device).manual_seed(random.Random(g.initial_seed()).getrandbits(63))
    return (images + sigma * torch.randn(images.shape, generator=on_device, device=device)).clamp(0, 1)


# =========================================================================================================
# One training step of each stage: the views, the forward pass and the loss terms (the update is in main)
# =========================================================================================================
BLOCKED_FROM = 4096  # pairs N from which Eq. 7 is computed in blocks: (2N)^2 logits would exceed 256 MB


def channels_last(x):
    return x.contiguous(memory_format=torch.channels_last)  # faster convolutions on a CPU


def stage1_losses(model, x, args, g, normalize, dtype):
    """Eq. 7 on a batch x (B, 3, S, S) in [0, 1]: {"loss": the equivariant contrastive loss}."""
    warp = random_warp(len(x), args, g, x.device, zoom_and_shift=True)
    x_prime = appearance(data.warp_images(x, warp), args.equiv_jitter, args.equiv_noise, g)  # r(g(x))
    lam = (2 * torch.rand(len(x), args.equiv_points, 2, generator=g) - 1).to(x.device)  # B x P x 2, normalised
    lam_prime = warp.forward(lam)  # g(lambda), exact (NaN if lost: never for these warps)
    keep = (lam_prime.abs() <= 1).all(-1).flatten()  # B P: g(lambda) still on the image
    with data.autocast(x.device, dtype):
        f, f_prime = model(channels_last(normalize(torch.cat([x, x_prime])))).float().chunk(2)  # B x D x S x S
    pairs = sample_features(f, lam).flatten(0, 1), sample_features(f_prime, lam_prime.nan_to_num()).flatten(0, 1)
    loss = equivariant_contrastive_loss if len(keep) < BLOCKED_FROM else equivariant_contrastive_loss_blocked
    return {"loss": loss(*pairs, args.equiv_tau, keep)}  # pairs: B P x D each


def detector_losses(features, detector, x, args, g, normalize, dtype, train_features):
    """Eq. 2 + Eq. 3 + concentration on a batch x (B, 3, S, S) in [0, 1]: the three terms and their weighted
    sum "loss". F gets gradients only if `train_features` (--end-to-end)."""
    warp = random_warp(len(x), args, g, x.device, zoom_and_shift=False)
    x_warped = data.warp_images(x, warp)  # float32, outside autocast: the exact map equivariance_loss undoes
    with data.autocast(x.device, dtype), torch.set_grad_enabled(train_features):
        f = features(channels_last(normalize(torch.cat([x, x_warped]))))  # 2B x D x S x S
    with data.autocast(x.device, dtype):
        heatmaps = SpatialSoftmax()(detector(f))  # 2B x K x S x S, float32
    h, h_prime = heatmaps.chunk(2)
    patch = max(1, round(8 * args.image_size / 128))  # Eq. 3's 8x8 patches at 128 px: 6x6 at 96 px
    terms = {"equivariance": equivariance_loss(expected_location(h), expected_location(h_prime), warp),
             "diversity": diversity_loss(heatmaps, patch), "concentration": variance_loss(heatmaps)}
    return {"loss": terms["equivariance"] + args.equiv_div_weight * terms["diversity"] +
            args.equiv_var_weight * terms["concentration"], **terms}


# =========================================================================================================
# Training loop
# =========================================================================================================
def train(args, stage, run, loader, step_fn, state, epochs, device):
    """The loop of every stage: a tqdm bar per epoch, one log line per epoch, an atomic checkpoint per epoch and
    exact resume (the checkpoint holds `state`, models, optimiser, scheduler, scaler, and the step: every random
    draw is a function of the seed and the step). `step_fn(batch, g)` makes one update and returns its loss
    terms as tensors ({"loss": ..., ...}), read only when logged. False if --stop-after-steps stopped it."""
    path, step = os.path.join(run, f"checkpoint_{stage}.pt"), 0
    if args.resume and os.path.exists(path):
        checkpoint = data.load_checkpoint(path)
        for key, obj in state.items():
            obj.load_state_dict(checkpoint["state"][key])
        step = checkpoint["step"]
        print(f"{stage}: resumed {path} at step {step}")
    per_epoch = loader.batch_sampler.n // loader.batch_sampler.batch_size  # steps per epoch

    def save():
        data.save_checkpoint(path, state={k: o.state_dict() for k, o in state.items()}, step=step, args=vars(args))

    for epoch in range(step // per_epoch, epochs):
        loader.batch_sampler.epoch, loader.batch_sampler.start = epoch, step % per_epoch
        sums, done, start = {}, step % per_epoch, time.time()
        bar = tqdm(loader, desc=f"{stage} epoch {epoch + 1}/{epochs}", initial=done, total=per_epoch)
        for batch in bar:
            terms = step_fn(data.to_device(batch, device), data.generator(args.seed, step))  # tensors: no sync
            sums, step = {k: sums.get(k, 0) + v.detach() for k, v in terms.items()}, step + 1
            if step % args.log_every == 0:
                bar.set_postfix(loss=f"{terms['loss'].item():.4f}")  # the only host sync of a step
            if step == args.stop_after_steps:
                save()
                print(f"{stage}: stopped after step {step} (--stop-after-steps); continue with --resume")
                return False
        seconds, n = time.time() - start, per_epoch - done
        data.log(run, stage, {"stage": stage, "epoch": epoch + 1, "step": step,
                              **{k: v.item() / n for k, v in sums.items()},
                              "lr": state["optimizer"].param_groups[0]["lr"], "seconds": round(seconds, 1),
                              "images_per_s": round(n * args.batch_size / seconds, 1)})
        save()
    save()  # also when there was nothing to train (--epochs 0): later stages read this checkpoint
    return True


# =========================================================================================================
# Exports and pictures
# =========================================================================================================
def export(module, run, variant, info, args, groups, kind="features"):
    """Write <run>/<variant>.pt2: a frozen extractor of [0, 1] images, data.save_extractor's contract; `kind` is
    "features" (dense descriptors) or "heatmaps" (one probability map per discovered landmark)."""
    module = copy.deepcopy(module).float().cpu().eval().to(memory_format=torch.contiguous_format)
    meta = {"input_size": [args.image_size] * 2, "kind": kind, "method": SCRIPT, "variant": variant,
            "channel_groups": groups, "arch": args.arch, "dataset": args.dataset, "epochs": args.epochs}
    meta = data.save_extractor(module, os.path.join(run, f"{variant}.pt2"), meta, info.mean, info.std)
    print(f"exported {os.path.join(run, variant)}.pt2: {meta['channels']} x {meta['output_size']} {kind}")


def save_pictures(path, images, maps, title):
    """Images (n, 3, H, W) in [0, 1] above their maps (n, 3, h, w) in [0, 1], as one PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, len(images), figsize=(1.5 * len(images), 3.3), squeeze=False)
    for i, pair in enumerate(zip(images, maps)):
        for row, picture in enumerate(pair):
            axes[row, i].imshow(picture.permute(1, 2, 0).clamp(0, 1).cpu().numpy(), interpolation="nearest")
            axes[row, i].axis("off")
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def landmark_pictures(images, heatmaps):
    """Images (n, 3, H, W) in [0, 1] with the expected locations of their heatmaps (n, K, H, W) drawn as coloured
    3x3 dots, and the heatmaps themselves, each scaled to its peak and coloured like its dot (Fig. 3-5 style)."""
    import matplotlib.colors
    n, k, height, width = heatmaps.shape
    hsv = torch.stack([(torch.arange(k) * 0.618034) % 1, torch.full((k,), 0.9), torch.ones(k)], 1)  # golden-ratio
    rgb = torch.tensor(matplotlib.colors.hsv_to_rgb(hsv.numpy()), dtype=torch.float32)  # hues: K x 3 colours
    dotted = images.clone()
    points = data.to_pixels(expected_location(heatmaps), (height, width)).round().long()  # n x K x 2
    for i in range(n):
        for j, (x, y) in enumerate(points[i].tolist()):
            dotted[i, :, max(y - 1, 0):y + 2, max(x - 1, 0):x + 2] = rgb[j].view(3, 1, 1)
    peaks = heatmaps / heatmaps.amax((2, 3), keepdim=True)  # n x K x H x W in [0, 1]
    return dotted, torch.einsum("nkhw,kc->nchw", peaks, rgb).clamp(0, 1)


def load_features(run, device):
    """F from this run's checkpoint_stage1.pt, frozen and in eval mode (batch norm uses its running statistics)."""
    path = os.path.join(run, "checkpoint_stage1.pt")
    if not os.path.exists(path):
        raise SystemExit(f"error: no pretrained features at {path}; run --stage 1 with this --name first")
    checkpoint = data.load_checkpoint(path)
    model = Hourglass(checkpoint["args"]["equiv_widths"], checkpoint["args"]["equiv_dim"])
    model.load_state_dict(checkpoint["state"]["model"])
    return model.to(device, memory_format=torch.channels_last).eval().requires_grad_(False)


# =========================================================================================================
# Main: seed, device, data, then the stages (model and optimiser, train, exports)
# =========================================================================================================
def main(argv=None):
    args = get_args(argv)
    device, stages = data.choose_device(args.device), ["end2end"] if args.end_to_end else \
        ["stage1", "stage2"] if args.stage == "all" else [f"stage{args.stage}"]
    dtype = data.amp_dtype(device, args.amp)
    try:  # RGB in [0, 1]: warps and appearance changes act before normalising
        info = data.make_dataset(args.dataset, "train", root=args.data_root, size=args.image_size, normalize=False)
    except data.DatasetError as error:
        raise SystemExit(f"error: {error}")
    train_set = Images(torch.utils.data.Subset(info, range(min(args.train_images or len(info), len(info)))))
    if len(train_set) < args.batch_size:
        raise SystemExit(f"error: {len(train_set)} training images do not fill a batch of {args.batch_size}")
    workers = data.default_workers(device) if args.workers is None else args.workers
    loader = data.make_loader(train_set, args.batch_size, args.seed, workers, device)
    try:  # the landmark pictures show test images when the dataset has a test split
        shown = data.make_dataset(args.dataset, "test", root=args.data_root, size=args.image_size, normalize=False)
    except data.DatasetError:
        shown = info
    figure_images = torch.stack([shown[i]["image"] for i in range(min(8, len(shown)))])  # 8 x 3 x H x W
    normalize = data.Normalize(info.mean, info.std).to(device)
    per_epoch = len(train_set) // args.batch_size

    def optimiser(params):  # every stage: Adam with L2 5e-4, lr x0.9 per epoch (a function of the step)
        optimizer = torch.optim.Adam(params, lr=args.lr, weight_decay=5e-4)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.9 ** (step // per_epoch)), \
            data.grad_scaler(device, dtype)

    def update(terms, optimizer, scheduler, scaler):
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(terms["loss"]).backward()  # scaling only for fp16
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        return terms

    def images(batch):  # uint8 -> float in [0, 1], on the device
        return batch["image"].float() / 255

    if "stage1" in stages:  # ---- F by the equivariant contrastive loss, Eq. 7 ------------------------------------
        run = data.start_run(args.runs_dir, SCRIPT, args.name, "stage1", args, args.resume)
        data.seed_everything(args.seed, args.deterministic)
        model = Hourglass(args.equiv_widths, args.equiv_dim).to(device, memory_format=torch.channels_last).train()
        optimizer, scheduler, scaler = optimiser(model.parameters())
        state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}
        step_fn = lambda batch, g: update(stage1_losses(model, images(batch), args, g, normalize, dtype),  # noqa: E731
                                          optimizer, scheduler, scaler)
        if not train(args, "stage1", run, loader, step_fn, state, args.epochs, device):
            return
        export(model.eval(), run, "features", info, args, [["features", 0, args.equiv_dim]])

    if {"stage2", "end2end"} & set(stages):  # ---- the detector T, Eq. 2-3 + concentration -----------------------
        end2end = args.end_to_end
        stage, prefix = ("end2end", "end2end_") if end2end else ("stage2", "")
        run = data.start_run(args.runs_dir, SCRIPT, args.name, stage, args, args.resume)
        data.seed_everything(args.seed, args.deterministic)
        if end2end:  # the baseline: F from scratch, trained by the detector's loss alone
            features = Hourglass(args.equiv_widths, args.equiv_dim).to(device, memory_format=torch.channels_last)
        else:
            features = load_features(run, device)
        detector = Detector(args.equiv_dim, args.equiv_k, args.equiv_det_width, args.equiv_logit_scale)
        detector = detector.to(device, memory_format=torch.channels_last)
        optimizer, scheduler, scaler = optimiser(list(detector.parameters()) +
                                                 (list(features.parameters()) if end2end else []))
        state = {"detector": detector, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler} | (
            {"features": features} if end2end else {})
        step_fn = lambda batch, g: update(detector_losses(features, detector, images(batch), args, g,  # noqa: E731
                                                          normalize, dtype, end2end), optimizer, scheduler, scaler)
        epochs = (args.epochs + args.equiv_det_epochs if end2end else args.equiv_det_epochs) if args.epochs else 0
        features.train(end2end)
        if not train(args, stage, run, loader, step_fn, state, epochs, device):
            return
        features.eval()
        if end2end:
            export(features, run, "end2end_features", info, args, [["features", 0, args.equiv_dim]])
        extractor = nn.Sequential(features, detector, SpatialSoftmax())
        export(extractor, run, f"{prefix}heatmaps", info, args, [["landmarks", 0, args.equiv_k]], "heatmaps")
        with torch.no_grad(), data.autocast(device, dtype):
            heatmaps = extractor(channels_last(normalize(figure_images.to(device)))).float().cpu()  # 8 x K x S x S
        save_pictures(os.path.join(run, f"{prefix}landmarks.png"), *landmark_pictures(figure_images, heatmaps),
                      f"{args.equiv_k} discovered landmarks, {'end to end' if end2end else 'two-step'}, "
                      f"{epochs} epochs")


if __name__ == "__main__":
    main()
