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
                Sec. 2 detector T, spatial soft-argmax       -> Detector, soft_argmax
                Eq. 7 equivariant contrastive loss           -> equivariant_contrastive_loss, sample_features
                Eq. 2 equivariance loss                      -> equivariance_loss
                Eq. 3 diversity loss on patches              -> diversity_loss
                concentration (variance) penalty             -> variance_loss
                g (warps) and r (appearance) of Eq. 7        -> random_warp, appearance

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
  frame are dropped; features are read by bilinear interpolation at the exact sub-pixel points (grid_sample,
  align_corners=True, the convention of data.py). The denominators hold every other sampled feature of the
  batch, from both images (2N - 2 negatives and the positive); a feature's similarity with itself is excluded.
  The loss is averaged over the 2N anchors (both directions of Eq. 7).
- g in stage 1: rotation within +-30 deg, zoom log-uniform in [1/1.25, 1.25] ("crop and zoom"), translation
  within +-10% of the width, then an elastic warp (rms 0.05 normalised, smoothness 0.2); all from data.py,
  which maps points exactly. r: brightness and contrast factors in [0.7, 1.3] and Gaussian noise with a std up
  to 0.04, per image, on the warped image only.
- Stage 2: g = rotation within +-30 deg then the same elastic warp (the warps of match.py's Acc(d)); T = two
  3x3 convs (width 32) with ReLU and a 1x1 conv to K maps; heatmaps = spatial softmax over all pixels;
  landmarks = soft-argmax (expected position).
- Eq. 2 is measured in the frame of x: || y_k(x) - g^-1(y_k(g x)) ||^2 in normalised units, averaged over k
  and images. It is zero exactly when y_k(g x) = g(y_k(x)); mapping the detections of g x back with the warp's
  analytic backward map (data.Warp.backward) keeps the gradient exact, where g(y_k(x)) would differentiate
  through Newton's iterations.
- Eq. 3 (the paper's exact formula could not be consulted offline; this is the form of Thewlis et al. 2017
  that it cites, as we read it): max-pool every heatmap over non-overlapping patches (8x8 at 128 px: 6x6 at
  96 px), then sum over patches of (sum_k pooled_k - max_k pooled_k): zero when no two heatmaps have mass in a
  common patch, (K - 1) x peak when all coincide. Summed over patches, averaged over images.
- Concentration: sum_k trace Cov(h_k) in normalised units, averaged over images.
- Weights and sharpness (the paper gives neither): equivariance 1, diversity 3 (--equiv-div-weight), concentration
  1 (--equiv-var-weight), and T's output multiplied by 10 before the softmax (--equiv-logit-scale). Measured on
  the default run's stage 2 (frozen F of stage 1): with scale 1 the heatmaps were still blurred after 256 steps
  (a softmax over 9,216 pixels needs logit gaps ~9, which Adam at 3e-4 grows slowly); with scale 1, concentration
  1 and diversity 1 all ten landmarks collapsed onto one eye, and with diversity 10 they stayed blurred. Scale 10,
  diversity 3, concentration 1 gave ten sharp, distinct landmarks (eyes, nose, mouth, cheeks) within one epoch.
- --end-to-end trains F and T together for --epochs + --equiv-det-epochs epochs: as many steps as the two
  stages took together.

Deviations, each deliberate:
- The warps and appearance changes are drawn in the training step from the global torch generator, whose
  state the checkpoint holds: resume is exact (the data loader only renders images).
- 96 px instead of the paper's 128 px; lengths scaled accordingly.

Smallest run: `python equiv_pretrain.py --train-images 256 --equiv-det-epochs 1 --name tiny`: 16 steps of each
stage, a bar per epoch and a summary line per epoch and stage, then runs/equiv_pretrain/tiny/{features,heatmaps}.pt2
and landmarks.png, in 1-2 minutes on 2 CPU cores. Measured with one thread on a shared 2-core CPU (load ~5):
the default run (2,048 faces) took 9.5 minutes (stage 1: 128 steps, 324 s, 6.3 images/s; stage 2: 256 steps,
223 s, 18 images/s); `--end-to-end` took 15 minutes (384 steps, 6-8 images/s). What it gives (default run, then
the commands above): Acc(15 px) 0.99 for the two-step features against 0.65 end to end; see the README.
"""
import argparse
import copy
import json
import os
import random
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import data


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
    add("--epochs", type=int, default=1, help="epochs of stage 1 (paper 20); 0 exports untrained networks (F and T: "
        "stage 2 then trains no epoch either)")
    add("--batch-size", type=int, default=16, help="images per step, every stage")
    add("--lr", type=float, default=3e-4, help="Adam learning rate, x0.9 per epoch, every stage (paper 3e-4)")
    add("--workers", type=int, default=1, help="data-loader processes; they render the images")
    add("--amp", default="auto", choices=["auto", "bf16", "none"], help="bfloat16 autocast; auto: on cpu and "
        "cuda (1.6-1.9x faster on a CPU, same results)")
    add("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="auto: cuda, mps, then cpu")
    add("--seed", type=int, default=0, help="seeds the initialisation, the data order and the augmentations")
    add("--deterministic", action=switch, default=False, help="bit-exact reruns and resumes (slower on GPUs)")
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
    return args


# =========================================================================================================
# Model: the hourglass F, the detector T, the spatial soft-argmax
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


def soft_argmax(heatmaps):
    """Heatmaps (B, K, H, W) summing to 1 -> expected (x, y) in normalised [-1, 1] coordinates (B, K, 2), pixel
    centres on linspace(-1, 1) (align_corners=True, as regress.py's ridge head)."""
    grid = data.identity_grid(*heatmaps.shape[-2:], heatmaps.device, heatmaps.dtype).reshape(-1, 2)  # HW x 2
    return heatmaps.flatten(2) @ grid


# =========================================================================================================
# Losses
# =========================================================================================================
def sample_features(f, points):
    """f (B, D, H, W), points (B, P, 2) normalised -> (B, P, D): bilinear at the exact sub-pixel points."""
    grid = points.unsqueeze(2).to(f.dtype)  # B x P x 1 x 2
    return F.grid_sample(f, grid, mode="bilinear", align_corners=True)[..., 0].transpose(1, 2)


def equivariant_contrastive_loss(f, f_prime, tau):
    """Eq. 7, symmetric: for every pair i, -log exp(s(f_i, f'_i) / tau) / sum_{v != f_i} exp(s(f_i, v) / tau),
    and the same with f'_i as the anchor, averaged over the 2N anchors; s is the cosine similarity and v runs
    over all 2N sampled features of the batch except the anchor itself. f, f_prime: N x D, row i a pair."""
    z = F.normalize(torch.cat([f, f_prime]).float(), dim=1)  # 2N x D
    n = len(f)
    logits = z @ z.T / tau  # 2N x 2N
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))  # no self
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)  # f_i <-> f'_i
    return F.cross_entropy(logits, positives)


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
# Method-specific augmentations: the warps g and the appearance change r
# =========================================================================================================
def random_warp(n, args, device, zoom_and_shift):
    """g as a data.Warp: a rotation about the centre, with a zoom ("crop and zoom") and a shift for Eq. 7
    (stage 1) or without them for Eq. 2 (stage 2: the warps of match.py's Acc(d)), then an elastic warp."""
    zoom = (1 / args.equiv_zoom, args.equiv_zoom) if zoom_and_shift else (1.0, 1.0)
    shift = args.equiv_translation if zoom_and_shift else 0.0
    return data.random_affine(n, args.equiv_rotation, zoom, shift, device=device).then(
        data.random_elastic(n, alpha=args.equiv_elastic, sigma=0.2, device=device))


def appearance(images, jitter, noise):
    """r of Eq. 7 on (B, 3, H, W) images in [0, 1]: brightness and contrast factors within 1 +- jitter, then
    Gaussian noise of a std uniform in [0, noise], each drawn per image."""
    b = len(images)
    brightness, contrast = (1 + jitter * (2 * torch.rand(2, b, 1, 1, 1, device=images.device) - 1)).unbind(0)
    images = images * brightness
    mean = images.mean((1, 2, 3), keepdim=True)
    images = (images - mean) * contrast + mean  # contrast about the image's mean grey
    sigma = noise * torch.rand(b, 1, 1, 1, device=images.device)
    return (images + sigma * torch.randn_like(images)).clamp(0, 1)


# =========================================================================================================
# Run boilerplate (identical in every method file): device, seeds, run directory, checkpoints, the loop
# =========================================================================================================
SCRIPT = os.path.splitext(os.path.basename(__file__))[0]


def choose_device(name):
    """'auto' picks cuda, then mps, then cpu; a device that is not there stops with one sentence."""
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    name = next(d for d in ("cuda", "mps", "cpu") if available[d]) if name == "auto" else name
    if not available[name]:
        raise SystemExit(f"error: --device {name} is not available on this machine; use --device cpu")
    return torch.device(name)


def seed_everything(seed, deterministic):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # needed by deterministic cuBLAS
    torch.use_deterministic_algorithms(deterministic)  # bit-exact reruns; some GPU kernels get slower
    torch.backends.cudnn.benchmark = not deterministic


def autocast(device, amp):
    """bfloat16 autocast (needs no loss scaling); 'auto' turns it on on cpu and cuda."""
    enabled = amp == "bf16" or (amp == "auto" and device.type in ("cpu", "cuda"))
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def start_stage(args, stage):
    """Create <runs-dir>/<script>/<name>/, write args_<stage>.json there and return the directory."""
    run = os.path.join(args.runs_dir, SCRIPT, args.name)
    if os.path.exists(os.path.join(run, f"checkpoint_{stage}.pt")) and not args.resume:
        raise SystemExit(f"error: {run} already holds a {stage} checkpoint; pass --resume to continue it or "
                         f"--name to start another run")
    os.makedirs(run, exist_ok=True)
    with open(os.path.join(run, f"args_{stage}.json"), "w") as f:
        json.dump(vars(args), f, indent=2)
    return run


def log(run, stage, record):
    """Append a record to log_<stage>.jsonl and print it as the summary line."""
    with open(os.path.join(run, f"log_{stage}.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")
    print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))


def save_checkpoint(path, **content):
    torch.save(content, path + ".tmp")
    os.replace(path + ".tmp", path)  # atomic: a crash never leaves a half-written checkpoint


def load_checkpoint(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=False)  # our own file; RNG states are numpy
    except Exception as error:
        raise SystemExit(f"error: {path} is not a readable checkpoint of {SCRIPT}.py ({type(error).__name__}); "
                         f"delete it or choose another --name")


def fit(args, stage, run, dataset, train_step, state, epochs, batch_size):
    """The loop of every stage: a seeded order per epoch, a tqdm bar, the log, an atomic checkpoint per epoch
    and exact resume. `train_step(batch) -> float loss` does one optimisation step; `state` names everything
    with a state_dict (models, optimiser, scheduler, queue). Returns False if --stop-after-steps stopped it."""
    path, epoch, step = os.path.join(run, f"checkpoint_{stage}.pt"), 0, 0
    if args.resume and os.path.exists(path):
        checkpoint = load_checkpoint(path)
        for key, obj in state.items():
            obj.load_state_dict(checkpoint["state"][key])
        epoch, step = checkpoint["epoch"], checkpoint["step"]
        random.setstate(checkpoint["rng"]["python"])
        np.random.set_state(checkpoint["rng"]["numpy"])
        torch.set_rng_state(checkpoint["rng"]["torch"])
        if checkpoint["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])
        print(f"{stage}: resumed {path} at epoch {epoch}, step {step}")
    per_epoch = len(dataset) // batch_size
    if per_epoch == 0 and epochs > 0:
        raise SystemExit(f"error: {len(dataset)} training images do not fill a batch of {batch_size}")

    def save():
        rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        save_checkpoint(path, state={key: obj.state_dict() for key, obj in state.items()}, epoch=epoch,
                        step=step, rng=rng, args=vars(args))

    while epoch < epochs:
        done = step - epoch * per_epoch  # steps of this epoch already taken before a resume
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed * 100_003 + epoch))
        dataset.epoch = epoch  # random samples (augmented views) are a function of (seed, epoch, index)
        loader = torch.utils.data.DataLoader(dataset, batch_size, sampler=order[done * batch_size:].tolist(),
                                             drop_last=True, num_workers=args.workers,
                                             generator=torch.Generator())  # leaves the global RNG alone
        bar = tqdm(loader, desc=f"{stage} epoch {epoch + 1}/{epochs}", initial=done, total=per_epoch)
        total, start = 0.0, time.time()
        for batch in bar:
            loss = train_step(batch)
            step, total = step + 1, total + loss
            bar.set_postfix(loss=f"{loss:.4f}")
            if step == args.stop_after_steps:
                save()
                print(f"{stage}: stopped after step {step} (--stop-after-steps); continue with --resume")
                return False
        epoch, seconds = epoch + 1, time.time() - start
        log(run, stage, {"stage": stage, "epoch": epoch, "step": step, "loss": total / (per_epoch - done),
                         "lr": state["optimizer"].param_groups[0]["lr"], "seconds": round(seconds, 1),
                         "images_per_s": round((per_epoch - done) * batch_size / seconds, 1)})
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
    """Images (n, 3, H, W) in [0, 1] with the soft-argmax of their heatmaps (n, K, H, W) drawn as coloured 3x3
    dots, and the heatmaps themselves, each scaled to its peak and coloured like its dot (Fig. 3-5 style)."""
    import matplotlib.colors
    n, k, height, width = heatmaps.shape
    hsv = torch.stack([(torch.arange(k) * 0.618034) % 1, torch.full((k,), 0.9), torch.ones(k)], 1)  # golden-ratio
    rgb = torch.tensor(matplotlib.colors.hsv_to_rgb(hsv.numpy()), dtype=torch.float32)  # hues: K x 3 colours
    dotted = images.clone()
    points = data.to_pixels(soft_argmax(heatmaps), (height, width)).round().long()  # n x K x 2
    for i in range(n):
        for j, (x, y) in enumerate(points[i].tolist()):
            dotted[i, :, max(y - 1, 0):y + 2, max(x - 1, 0):x + 2] = rgb[j].view(3, 1, 1)
    peaks = heatmaps / heatmaps.amax((2, 3), keepdim=True)  # n x K x H x W in [0, 1]
    return dotted, torch.einsum("nkhw,kc->nchw", peaks, rgb).clamp(0, 1)


def load_features(args, run, device):
    """F from this run's checkpoint_stage1.pt, frozen and in eval mode (batch norm uses its running statistics)."""
    path = os.path.join(run, "checkpoint_stage1.pt")
    if not os.path.exists(path):
        raise SystemExit(f"error: no pretrained features at {path}; run --stage 1 with this --name first")
    checkpoint = load_checkpoint(path)
    model = Hourglass(checkpoint["args"]["equiv_widths"], checkpoint["args"]["equiv_dim"])
    model.load_state_dict(checkpoint["state"]["model"])
    return model.to(device, memory_format=torch.channels_last).eval().requires_grad_(False)


# =========================================================================================================
# Main: seed, device, data, then the stages (model and optimiser, resume, loop, save, export)
# =========================================================================================================
def main(argv=None):
    args = get_args(argv)
    device = choose_device(args.device)
    try:  # RGB in [0, 1]: warps and appearance changes act before normalising
        info = data.make_dataset(args.dataset, "train", root=args.data_root, size=args.image_size, normalize=False)
    except data.DatasetError as error:
        raise SystemExit(f"error: {error}")
    train_set = torch.utils.data.Subset(info, range(min(args.train_images or len(info), len(info))))
    try:  # the landmark pictures show test images when the dataset has a test split
        shown = data.make_dataset(args.dataset, "test", root=args.data_root, size=args.image_size, normalize=False)
    except data.DatasetError:
        shown = train_set
    figure_images = torch.stack([shown[i]["image"] for i in range(min(8, len(shown)))])  # 8 x 3 x H x W
    normalize = data.Normalize(info.mean, info.std).to(device)
    per_epoch = len(train_set) // args.batch_size
    channels_last = lambda x: x.contiguous(memory_format=torch.channels_last)  # noqa: E731 (faster convs on CPU)
    stages = ["end2end"] if args.end_to_end else ["stage1", "stage2"] if args.stage == "all" else [f"stage{args.stage}"]

    def adam(params):  # every stage: Adam with L2 5e-4, lr x0.9 per epoch (stepped per step, as a function of it)
        optimizer = torch.optim.Adam(params, lr=args.lr, weight_decay=5e-4)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.9 ** (step // max(per_epoch, 1)))

    def update(loss, optimizer, scheduler):
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        return loss.item()

    if "stage1" in stages:  # ---- F by the equivariant contrastive loss, Eq. 7 ------------------------------------
        run = start_stage(args, "stage1")
        seed_everything(args.seed, args.deterministic)
        model = Hourglass(args.equiv_widths, args.equiv_dim).to(device, memory_format=torch.channels_last).train()
        optimizer, scheduler = adam(model.parameters())

        def stage1_step(batch):
            x = batch["image"].to(device)  # B x 3 x S x S in [0, 1]
            warp = random_warp(len(x), args, device, zoom_and_shift=True)
            x_prime = appearance(data.warp_images(x, warp), args.equiv_jitter, args.equiv_noise)  # r(g(x))
            lam = 2 * torch.rand(len(x), args.equiv_points, 2, device=device) - 1  # B x P x 2, normalised
            lam_prime = warp.forward(lam)  # g(lambda), exact (NaN if lost: never for these warps)
            keep = (lam_prime.abs() <= 1).all(-1)  # B x P: g(lambda) still on the image
            with autocast(device, args.amp):
                f, f_prime = model(channels_last(normalize(torch.cat([x, x_prime])))).float().chunk(2)  # B x D x S x S
            pairs = sample_features(f, lam)[keep], sample_features(f_prime, lam_prime.nan_to_num())[keep]  # N x D
            return update(equivariant_contrastive_loss(*pairs, args.equiv_tau), optimizer, scheduler)

        state = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
        if not fit(args, "stage1", run, train_set, stage1_step, state, args.epochs, args.batch_size):
            return
        export(model.eval(), run, "features", info, args, [["features", 0, args.equiv_dim]])

    if {"stage2", "end2end"} & set(stages):  # ---- the detector T, Eq. 2-3 + concentration -----------------------
        end2end = args.end_to_end
        stage, prefix = ("end2end", "end2end_") if end2end else ("stage2", "")
        run = start_stage(args, stage)
        seed_everything(args.seed, args.deterministic)
        if end2end:  # the baseline: F from scratch, trained by the detector's loss alone
            features = Hourglass(args.equiv_widths, args.equiv_dim).to(device, memory_format=torch.channels_last)
        else:
            features = load_features(args, run, device)
        detector = Detector(args.equiv_dim, args.equiv_k, args.equiv_det_width, args.equiv_logit_scale)
        detector = detector.to(device, memory_format=torch.channels_last)
        optimizer, scheduler = adam(list(detector.parameters()) + (list(features.parameters()) if end2end else []))
        patch = max(1, round(8 * args.image_size / 128))  # Eq. 3's 8x8 patches at 128 px: 6x6 at 96 px
        terms = {"steps": 0}  # running sums of the three terms, for the log

        def detector_step(batch):
            x = batch["image"].to(device)  # B x 3 x S x S in [0, 1]
            warp = random_warp(len(x), args, device, zoom_and_shift=False)
            with autocast(device, args.amp), torch.set_grad_enabled(end2end):
                f = features(channels_last(normalize(torch.cat([x, data.warp_images(x, warp)]))))  # 2B x D x S x S
            with autocast(device, args.amp):
                heatmaps = SpatialSoftmax()(detector(f))  # 2B x K x S x S, float32
            h, h_prime = heatmaps.chunk(2)
            parts = {"equivariance": equivariance_loss(soft_argmax(h), soft_argmax(h_prime), warp),
                     "diversity": diversity_loss(heatmaps, patch), "concentration": variance_loss(heatmaps)}
            terms["steps"] += 1
            for key, value in parts.items():
                terms[key] = terms.get(key, 0.0) + value.item()
            loss = parts["equivariance"] + args.equiv_div_weight * parts["diversity"] + \
                args.equiv_var_weight * parts["concentration"]
            return update(loss, optimizer, scheduler)

        state = {"detector": detector, "optimizer": optimizer, "scheduler": scheduler} | (
            {"features": features} if end2end else {})
        epochs = (args.epochs + args.equiv_det_epochs if end2end else args.equiv_det_epochs) if args.epochs else 0
        features.train(end2end)
        done = fit(args, stage, run, train_set, detector_step, state, epochs, args.batch_size)
        steps = terms.pop("steps")
        if steps:  # the mean of each term over the steps of this invocation
            log(run, stage, {"stage": stage, "steps": steps, **{key: value / steps for key, value in terms.items()}})
        if not done:
            return
        features.eval()
        if end2end:
            export(features, run, "end2end_features", info, args, [["features", 0, args.equiv_dim]])
        extractor = nn.Sequential(features, detector, SpatialSoftmax())
        export(extractor, run, f"{prefix}heatmaps", info, args, [["landmarks", 0, args.equiv_k]], "heatmaps")
        with torch.no_grad(), autocast(device, args.amp):
            heatmaps = extractor(channels_last(normalize(figure_images.to(device)))).float().cpu()  # 8 x K x S x S
        save_pictures(os.path.join(run, f"{prefix}landmarks.png"), *landmark_pictures(figure_images, heatmaps),
                      f"{args.equiv_k} discovered landmarks, {'end to end' if end2end else 'two-step'}, "
                      f"{epochs} epochs")


if __name__ == "__main__":
    main()
