"""LEAD for object landmarks: Karmali, Atreya, Nair, Sharma, Radhakrishnan, "LEAD: Self-Supervised Landmark
Estimation by Aligning Distributions of Feature Similarity", WACV 2022, arXiv 2204.02958 (no public code).

Three stages; `--stage all` (the default) runs them in order, writing to runs/byol_lead/<name>/:
  1    global representation learning: BYOL of a torchvision ResNet (Sec. 3.2); exports the stage-1
       hypercolumn (hypercol.pt2, the "LEAD 3840" row of Tab. 1 and the teacher of stage 2) and a PCA picture
       of it (pca_stage1.png). `--epochs 0` exports the random-initialised network: the baseline;
  2    dense and compact representation learning (Sec. 3.3): the frozen stage-1 ResNet, an FPN decoder to a
       64-d map at 1/4 resolution and a projection head, trained so that the similarity distributions of the
       compact features match those of the hypercolumn (Eq. 3); exports compact.pt2 (no head) and
       pca_compact.png;
  nmf  the baseline of Tab. 1: NMF of the stage-1 hypercolumn to --nmf-k = 64 channels (nmf.pt2).
Evaluate any exported .pt2 with regress.py (landmark regression) and match.py (matching).

Paper -> code:  Eq. 1, BYOL's loss, symmetrised and summed    -> byol_loss
                BYOL's target network and its tau schedule   -> ema_update, byol_tau
                Sec. 3.2 / Fig. 3 hypercolumn                 -> Hypercolumn
                Sec. 3.3 FPN decoder and projection head      -> FPNDecoder, Compact, LeadHead
                Eq. 2-3 similarity distributions, their CE    -> lead_loss
                Tab. 1 NMF baseline                           -> nmf, NMFCoefficients
                BYOL's asymmetric views; stage-2 pairs        -> byol_view, ByolViews; LeadPairs

Paper values next to our CPU defaults (the defaults train all three stages on the built-in synthetic faces):
  stage 1: --batch-size 256 (32) | --epochs 200 (1 epoch of the 10,000 synthetic faces: 312 steps) | SGD --lr
  3e-2, momentum 0.9, cosine after --byol-warmup 2 warm-up epochs (0.2) | --byol-tau 0.996 -> 1 (same) |
  projector and predictor MLPs 4096 -> 256 (same: --byol-hidden, --byol-dim) | weight decay not given (1e-4,
  MoCo's, as in moco_hypercol.py).
  stage 2: --lead-epochs 10-20 (1 epoch of the first --lead-images 2,560 images: 80 steps) | cosine after warm-up
  (--lead-warmup 0.1 epoch) | --lead-tau 0.05 (same) | --lead-dim 64 (same) | optimiser not given: Adam,
  --lead-lr 1e-3 (Adam is invariant to the scale of the loss, which Eq. 3's sum over locations makes large).

Open choices (the paper does not say) and deviations, each deliberate:
- BYOL's loss is summed over its two directions, not averaged (an average halves the gradient, the slip of a
  well-known re-implementation). Each direction is the batch mean of ||p/|p| - z/|z|||^2 = 2 - 2 cos(p, z).
- Views: BYOL's two pipelines on the 96 px images (the LEAD supplement): random resized crop (scale 0.08-1,
  back to --image-size), horizontal flip (0.5), colour jitter (0.4, 0.4, 0.2, 0.1) with p 0.8 in random order,
  grayscale 0.2, Gaussian blur (sigma 0.1-2, kernel 1/10 of the side) with p 1.0 / 0.1, solarisation with
  p 0.0 / 0.2. The second pipeline, the only one that solarises, is BYOL's t', the view of the target branch;
  as in BYOL the symmetrised loss also feeds each view to the other branch. A view is a pure function of
  (seed, epoch, image index): resume is exact.
- The target network keeps its own batch-norm statistics (only parameters follow the EMA) and runs in train
  mode, as BYOL's; the EMA moves after each optimiser step with tau of the step just taken.
- The learning rate follows a warm-up and cosine every step, not every epoch (our runs last a few epochs).
- The ResNet keeps its stem stride (as moco_hypercol.py): at 96 px layer1..layer4 are 24, 12, 6 and 3 cells.
  The hypercolumn is layer4..layer1, each resized bilinearly to 48x48 in the exports (ContrastLandmark's
  grid, the one the shared evaluation was written for) and to the student's 24x24 grid as the teacher.
- Decoder: torchvision's FeaturePyramidNetwork on layer1..layer4 (1/4..1/32) with --lead-dim channels; its four
  outputs are resized to 1/4 and summed, then one 3x3 conv (FPNDecoder). The sum lets every level reach the
  output directly, as the semantic branch of Panoptic FPN, without that branch's per-level conv towers (cheap
  on a CPU). The head (LeadHead) is 1x1 conv, BN, ReLU, 1x1 conv, 64 -> 256 -> 64: two linear layers applied
  at every location.
- Eq. 3: p_u = softmax_v(cos(h_i(u), h_j(v)) / tau) over all locations v of x_j for the frozen hypercolumns h,
  q_u the same for the head's outputs, loss = -sum_u sum_v p_u(v) log q_u(v) (summed over the locations u),
  averaged over the pairs of the batch. The rows u are processed --lead-chunk at a time, each chunk under
  activation checkpointing (same value and gradients, tested), so that memory holds one chunk's B x chunk x hw
  similarities instead of B x hw x hw. On 8 pairs at 48x48 (64-d) the loss and its backward added 96 MB to the
  peak resident memory with chunks of 256 rows, 512 MB unchunked (glibc's MALLOC_MMAP_THRESHOLD_=1048576, as
  tests/bench_byol_lead.py sets it); at the default 24x24 grid the ResNet's activations dominate either way.
- Pairs ("two images" in the paper), --lead-pairs: batch = image k with image k+1 of the batch; views = an
  image with its own random TPS warp (data.random_tps, the "pair" preset), the teacher seeing each warped image
  itself, so no correspondence is needed; both = the two sets of pairs, averaged. Default views: on the
  synthetic faces, stage 2 of the default run (same stage-1 network, 80 steps) gave different-identity matching
  errors (match.py, 70x70 px) of 11.64 (views), 13.36 (both) and 17.59 (batch); same identity 8.31 / 8.93 /
  11.35 (not ablated further; a plausible reason: a warp of the same face gives the teacher two maps that
  agree location by location, while two different faces need a teacher that already matches across people).
- --lead-zoom Z (not in the paper; default 1, off) also zooms each warped copy out about its centre by a factor
  drawn in [1, Z]: an ablation that asks whether LEAD's distillation can pass scale equivariance on to the compact
  features (docs/byol_lead.md, the scale ablation of Sec. 4.4, has what it measured). The paper's pairs have no
  such zoom. The zoom is composed with the TPS, so the copy is resampled once.
- compact.pt2 resizes the 24x24 decoder output bilinearly to the exports' 48x48 grid, so that hypercol, nmf
  and compact are compared on the same grid (matching quantises predictions to it); resizing adds nothing.
- NMF: as moco_hypercol.py (multiplicative updates on the 24x24 hypercolumns of --nmf-images images; the
  exported extractor solves each location's coefficients with the basis fixed).

Smallest run: `python byol_lead.py --epochs 1 --train-images 512 --lead-epochs 1 --name tiny`: a bar per epoch
and a summary line per epoch and stage, then runs/byol_lead/tiny/{hypercol,compact,nmf}.pt2, in 1-2 minutes
on 2 idle CPU cores (estimated from the default run's per-stage speeds; NMF's share does not shrink).
The default run took 9 min on an idle 2-core CPU: stage 1 410 s (24 images/s, two views each), stage 2 90 s
(28 images/s), NMF 32 s, exports and pictures the rest.
What it gives (compact features match better than NMF; stage 1 beats the random network on the wild faces after
8 epochs, not on the aligned faces; compact features carry a regressor across zooms better than the hypercolumn
for five of six stage-1 networks) and why: README, section byol_lead.py, and docs/byol_lead.md.
"""
import argparse
import copy
import json
import math
import os
import random
import time

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms.v2.functional as TF
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchvision.models.feature_extraction import create_feature_extractor
from tqdm import tqdm

import data

LAYERS = ("layer1", "layer2", "layer3", "layer4")  # 1/4 .. 1/32 of the input (conv2_x .. conv5_x)
HYPER = LAYERS[::-1]  # the hypercolumn's order, deepest first (960-d for ResNet-18, 3840-d for ResNet-50)


# =========================================================================================================
# Settings
# =========================================================================================================
def get_args(argv=None):
    p = argparse.ArgumentParser(description="LEAD: BYOL, then compact features aligned with the hypercolumn's "
                                "similarity distributions (Karmali et al. 2022)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add, switch = p.add_argument, argparse.BooleanOptionalAction
    add("--stage", default="all", choices=["all", "1", "2", "nmf"],
        help="what to run; 2 and nmf read the stage-1 network of the same --name")
    add("--dataset", default="synth-faces", choices=list(data.DATASETS), help="training data (see data.py)")
    add("--data-root", default=None, help="dataset folder, for real datasets only")
    add("--image-size", type=int, default=96, help="side of the square input images (the protocol uses 96)")
    add("--train-images", type=int, default=0, help="use only the first N training images (0: all)")
    add("--arch", default="resnet18", choices=["resnet18", "resnet50"], help="torchvision backbone")
    add("--imagenet-init", action=switch, default=False, help="start from torchvision's ImageNet weights")
    add("--epochs", type=int, default=1, help="BYOL epochs of stage 1 (paper 200); 0 exports the "
        "random-initialised network, the baseline")
    add("--batch-size", type=int, default=32, help="images per step, both stages (paper 256)")
    add("--lr", type=float, default=0.03, help="SGD learning rate of BYOL after warm-up, cosine-decayed to 0 "
        "(paper 3e-2 at batch 256)")
    add("--workers", type=int, default=1, help="data-loader processes; they render and augment the images")
    add("--amp", default="auto", choices=["auto", "bf16", "none"], help="bfloat16 autocast; auto: on cpu and "
        "cuda (1.6-1.9x faster on a CPU, same results)")
    add("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="auto: cuda, mps, then cpu")
    add("--seed", type=int, default=0, help="seeds the initialisation, the data order and the augmentations")
    add("--deterministic", action=switch, default=False, help="bit-exact reruns and resumes (slower on GPUs)")
    add("--name", default="default", help="run name: everything goes to <runs-dir>/byol_lead/<name>/")
    add("--runs-dir", default="runs", help="root of the run directories")
    add("--resume", action=switch, default=False, help="continue each stage from its checkpoint")
    add("--stop-after-steps", type=int, default=0, help="checkpoint and stop a stage after this many steps "
        "(0: never); simulates an interruption")
    add("--byol-tau", type=float, default=0.996, help="base EMA rate of the target network, raised to 1 by a "
        "cosine over all steps (BYOL's tau_base, paper 0.996); lower it if a short run learns nothing")
    add("--byol-hidden", type=int, default=4096, help="hidden width of the projector and predictor MLPs (4096)")
    add("--byol-dim", type=int, default=256, help="output size of the projector and predictor (paper 256)")
    add("--byol-warmup", type=float, default=0.2, help="warm-up epochs of the learning rate (paper 2 of 200)")
    add("--lead-epochs", type=int, default=1, help="stage-2 epochs (paper 10-20)")
    add("--lead-images", type=int, default=2560, help="stage 2 trains on the first N training images (0: all); "
        "it converges in far fewer images than BYOL")
    add("--lead-lr", type=float, default=1e-3, help="Adam learning rate of the decoder and head after warm-up")
    add("--lead-warmup", type=float, default=0.1, help="stage-2 warm-up epochs")
    add("--lead-tau", type=float, default=0.05, help="temperature tau of both similarity distributions (paper "
        "0.05); lower is sharper")
    add("--lead-dim", type=int, default=64, help="channels of the compact features (paper 64)")
    add("--lead-pairs", default="views", choices=["batch", "views", "both"], help="what x_j of Eq. 3 is: "
        "the next image of the batch, a TPS-warped copy of x_i, or both sets of pairs")
    add("--lead-zoom", type=float, default=1.0, help="not in the paper, for the scale test of Sec. 4.4: also "
        "zoom each warped copy out by a factor drawn in [1, LEAD_ZOOM] (1: no zoom, the paper's pairs)")
    add("--lead-chunk", type=int, default=144, help="rows of the similarity matrices computed at a time "
        "(checkpointed); lower it if stage 2 runs out of memory, 0: all at once")
    add("--nmf-k", type=int, default=64, help="NMF components (64: the compact features' size, as Tab. 1)")
    add("--nmf-images", type=int, default=64, help="training images whose 24x24 hypercolumns NMF factorises")
    add("--nmf-iters", type=int, default=200, help="multiplicative updates of the fit (the exported extractor "
        "uses a quarter of them per image)")
    args = p.parse_args(argv)
    if args.lead_chunk < 0 or args.byol_warmup < 0 or args.lead_warmup < 0:
        p.error("--lead-chunk, --byol-warmup and --lead-warmup cannot be negative")
    if args.lead_zoom < 1 or (args.lead_zoom > 1 and args.lead_pairs == "batch"):
        p.error("--lead-zoom must be >= 1 and needs warped pairs (--lead-pairs views or both)")
    return args


# =========================================================================================================
# Model: the ResNet with BYOL's MLPs and target network, the hypercolumn, the FPN decoder and head, NMF
# =========================================================================================================
def build_resnet(arch, imagenet=False):
    """A torchvision ResNet without its classifier: images -> pooled features (512-d ResNet-18, 2048-d -50)."""
    try:
        net = torchvision.models.get_model(arch, weights="IMAGENET1K_V1" if imagenet else None)
    except Exception as error:  # offline and not cached
        raise SystemExit(f"error: the ImageNet weights of {arch} could not be downloaded ({type(error).__name__}) "
                         f"nor found in {torch.hub.get_dir()}/checkpoints; run once online or drop --imagenet-init")
    net.fc = nn.Identity()
    return net


def mlp(in_dim, hidden, out_dim):
    """BYOL's projector and predictor: Linear, BatchNorm, ReLU, Linear."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out_dim))


class Online(nn.Module):
    """Encoder f and projector g of BYOL; the target network is a copy of this module (no predictor)."""

    def __init__(self, arch, hidden, dim, imagenet=False):
        super().__init__()
        self.encoder = build_resnet(arch, imagenet)
        width = 512 if arch == "resnet18" else 2048
        self.projector = mlp(width, hidden, dim)

    def forward(self, x):  # x: N x 3 x S x S -> N x dim
        return self.projector(self.encoder(x.contiguous(memory_format=torch.channels_last)))


@torch.no_grad()
def ema_update(target, online, tau):
    """xi <- tau xi + (1 - tau) theta; buffers (batch-norm statistics) stay the target's own."""
    for p_t, p_o in zip(target.parameters(), online.parameters()):
        p_t.mul_(tau).add_(p_o.detach(), alpha=1 - tau)


def byol_tau(step, total, base):
    """BYOL's schedule: tau_k = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2, from tau_base at k = 0 to 1 at K."""
    return 1 - (1 - base) * (math.cos(math.pi * step / max(total, 1)) + 1) / 2


class Hypercolumn(nn.Module):
    """Sec. 3.1: the outputs of `layers`, each resized bilinearly to size x size and concatenated in the given
    order (deepest first: 960-d for ResNet-18, 3840-d for ResNet-50). Input: normalised (B, 3, H, W)."""

    def __init__(self, resnet, layers, size):
        super().__init__()
        self.body = create_feature_extractor(resnet, return_nodes=list(layers))  # shares resnet's weights
        self.layers, self.size = list(layers), size
        self.widths = [getattr(resnet, name)[-1].conv1.in_channels for name in layers]  # = a layer's output
        ends = np.cumsum([0] + self.widths).tolist()
        self.groups = [[name, a, b] for name, a, b in zip(self.layers, ends, ends[1:])]  # for the exports

    def forward(self, x):
        maps = self.body(x.contiguous(memory_format=torch.channels_last))  # resizing is much faster so
        return torch.cat([F.interpolate(maps[name], size=(self.size, self.size), mode="bilinear")
                          for name in self.layers], 1)  # B x C x size x size


class FPNDecoder(nn.Module):
    """Sec. 3.3: layer1..layer4 (1/4..1/32) -> a dim-channel map at 1/4: torchvision's FPN, its four outputs
    resized to 1/4 and summed, then a 3x3 conv."""

    def __init__(self, widths, dim):
        super().__init__()
        self.fpn = torchvision.ops.FeaturePyramidNetwork(list(widths), dim)
        self.out = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, maps):  # maps: {layer1: B x C1 x H/4 x W/4, ..., layer4: B x C4 x H/32 x W/32}
        pyramid = list(self.fpn(maps).values())  # dim channels at 1/4, 1/8, 1/16, 1/32
        size = pyramid[0].shape[-2:]
        return self.out(sum(F.interpolate(level, size=size, mode="bilinear") for level in pyramid))  # B x dim x H/4


class Compact(nn.Module):
    """The frozen ResNet's layer1..layer4 through the decoder: normalised (B, 3, H, W) -> (B, dim, H/4, W/4)."""

    def __init__(self, resnet, dim):
        super().__init__()
        self.body = create_feature_extractor(resnet, return_nodes=list(LAYERS))  # shares resnet's weights
        self.decoder = FPNDecoder([getattr(resnet, name)[-1].conv1.in_channels for name in LAYERS], dim)

    def forward(self, x):
        return self.decoder(self.body(x.contiguous(memory_format=torch.channels_last)))


class LeadHead(nn.Module):
    """The projection head of Sec. 3.3, used only by the loss: two linear layers (1x1 convs) with BN and ReLU."""

    def __init__(self, dim, hidden=256):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(dim, hidden, 1), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
                                 nn.Conv2d(hidden, dim, 1))

    def forward(self, f):  # f: B x dim x h x w
        return self.net(f)


def nmf(V, k, iters, basis=None, generator=None):
    """V ~ W H with W, H >= 0 (V: n x C, W: n x k, H: k x C) by Lee and Seung's multiplicative updates. Given a
    `basis` H, only the coefficients W are solved for (the exported extractor does this for every image)."""
    scale = (V.mean() / k).sqrt()  # sklearn's initialisation scale
    W, H = torch.ones_like(V[:, :1]).repeat(1, k) * scale, basis  # ones_like keeps the batch size dynamic
    if basis is None:  # random H breaks the symmetry between components
        H = torch.rand(k, V.shape[1], generator=generator).to(V) * scale
    VHt, HHt = V @ H.T, H @ H.T  # n x k, k x k: all that W's update needs from V and H
    for _ in range(iters):
        if basis is None:
            H = H * (W.T @ V) / (W.T @ W @ H + 1e-8)
            VHt, HHt = V @ H.T, H @ H.T
        W = W * VHt / (W @ HHt + 1e-8)
    return W, H


class NMFCoefficients(nn.Module):
    """Hypercolumn (B, C, h, w) -> its NMF coefficients (B, k, h, w) for a fixed basis (k x C)."""

    def __init__(self, basis, iters):
        super().__init__()
        self.register_buffer("basis", basis)
        self.iters = iters

    def forward(self, v):
        b, c, h, w = v.shape
        W, _ = nmf(v.permute(0, 2, 3, 1).reshape(-1, c).float(), len(self.basis), self.iters, self.basis)
        return W.reshape(b, h, w, -1).permute(0, 3, 1, 2)


# =========================================================================================================
# Losses
# =========================================================================================================
def byol_loss(p1, p2, z1, z2):
    """Eq. 1, symmetrised: ||p1/|p1| - z2/|z2|||^2 + ||p2/|p2| - z1/|z1|||^2 = (2 - 2 cos) + (2 - 2 cos), each
    averaged over the batch and the two SUMMED. p: online predictions, z: target projections (no gradient),
    N x dim; p1 and z1 come from view 1."""
    def distance(p, z):
        return (2 - 2 * F.cosine_similarity(p, z.detach(), dim=1)).mean()
    return distance(p1, z2) + distance(p2, z1)


def lead_loss(t_i, t_j, s_i, s_j, tau=0.05, chunk=0):
    """Eq. 2-3 for the pairs (x_i, x_j) of a batch: p_u = softmax_v(cos(t_i(u), t_j(v)) / tau) from the teacher
    (hypercolumn) maps t, q_u the same from the student maps s, loss = -sum_u sum_v p_u(v) log q_u(v), summed over
    the locations u of x_i and averaged over the pairs. t: B x C x h x w, s: B x d x h x w. `chunk` > 0 computes
    that many rows u at a time, each chunk recomputed in the backward pass (bounded memory, same result)."""
    t_i, t_j, s_i, s_j = [F.normalize(f.flatten(2).float(), dim=1).transpose(1, 2) for f in (t_i, t_j, s_i, s_j)]

    def rows(t_u, s_u):  # t_u: B x c x C, s_u: B x c x d, for c rows u
        p = (t_u @ t_j.transpose(1, 2) / tau).softmax(-1)  # B x c x hw(v): the teacher's distributions
        log_q = (s_u @ s_j.transpose(1, 2) / tau).log_softmax(-1)  # B x c x hw(v)
        return -(p * log_q).sum((1, 2))  # B

    hw = t_i.shape[1]
    if chunk <= 0 or chunk >= hw:
        return rows(t_i, s_i).mean()
    total = sum(checkpoint(rows, t_i[:, a:a + chunk], s_i[:, a:a + chunk], use_reentrant=False)
                for a in range(0, hw, chunk))
    return total.mean()


def warmup_cosine(optimizer, steps, warmup):
    """Linear warm-up over `warmup` steps, then a cosine to 0 at `steps`, stepped every iteration."""
    def factor(k):
        if k < warmup:
            return (k + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (k - warmup) / max(steps - warmup, 1)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# =========================================================================================================
# Method-specific augmentations: BYOL's two view pipelines, LEAD's pairs
# =========================================================================================================
def byol_view(image, size, g, blur, solarize):
    """A random view of a uint8 (3, H, W) image drawn with the generator g, BYOL's pipeline: random resized crop
    (scale 0.08-1), flip, colour jitter (p 0.8), grayscale (p 0.2), Gaussian blur (p `blur`), solarisation
    (p `solarize`). Returns float (3, size, size) in [0, 1]."""
    uniform = lambda lo, hi: lo + (hi - lo) * torch.rand((), generator=g).item()  # noqa: E731
    _, height, width = image.shape
    box = (0, 0, height, width)  # torchvision's RandomResizedCrop: 10 tries, then the whole image
    for _ in range(10):
        area, ratio = height * width * uniform(0.08, 1), math.exp(uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = round((area * ratio) ** 0.5), round((area / ratio) ** 0.5)
        if w <= width and h <= height:
            box = (int(uniform(0, height - h + 1)), int(uniform(0, width - w + 1)), h, w)
            break
    image = TF.resized_crop(image, *box, [size, size], antialias=True).float() / 255
    if uniform(0, 1) < 0.5:
        image = TF.horizontal_flip(image)
    if uniform(0, 1) < 0.8:  # ColorJitter(0.4, 0.4, 0.2, 0.1), random order
        jitter = [(TF.adjust_brightness, 0.6, 1.4), (TF.adjust_contrast, 0.6, 1.4),
                  (TF.adjust_saturation, 0.8, 1.2), (TF.adjust_hue, -0.1, 0.1)]
        for i in torch.randperm(4, generator=g).tolist():
            adjust, low, high = jitter[i]
            image = adjust(image, uniform(low, high))
    if uniform(0, 1) < 0.2:
        image = TF.rgb_to_grayscale(image, num_output_channels=3)
    if uniform(0, 1) < blur:  # BYOL: kernel 23 at 224 px, a tenth of the side
        sigma, kernel = uniform(0.1, 2.0), 2 * (size // 20) + 1
        image = TF.gaussian_blur(image, [kernel, kernel], [sigma, sigma])
    if uniform(0, 1) < solarize:
        image = TF.solarize(image, 0.5)
    return image


def sample_generator(seed, epoch, index):
    """The generator of sample `index` in `epoch`: every random draw of a sample is a function of (seed, epoch,
    index) only, so a resumed run draws the same ones as an uninterrupted run."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 10_000_019 + index)


class ByolViews(torch.utils.data.Dataset):
    """BYOL's two normalised views of each image: view1 from t (blur 1.0, no solarisation), view2 from t'
    (blur 0.1, solarisation 0.2). The views of image i in epoch e depend on (seed, e, i) only."""

    def __init__(self, dataset, size, mean, std, seed):
        self.dataset, self.size, self.seed, self.epoch = dataset, size, seed, 0
        self.mean, self.std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        g = sample_generator(self.seed, self.epoch, i)
        image = (self.dataset[i]["image"] * 255).round().to(torch.uint8)  # RGB in [0, 1] -> uint8
        view1, view2 = [(byol_view(image, self.size, g, blur, solarize) - self.mean) / self.std
                        for blur, solarize in ((1.0, 0.0), (0.1, 0.2))]
        return {"view1": view1, "view2": view2}  # 3 x size x size each


class LeadPairs(torch.utils.data.Dataset):
    """Stage-2 inputs: the RGB image in [0, 1] and, with `warp`, a random TPS warp of it (x_j of the views
    pairs), a function of (seed, epoch, index) only. zoom > 1 (--lead-zoom, not in the paper) also shrinks the
    warped copy about its centre by a factor drawn uniformly in [1, zoom]."""

    def __init__(self, dataset, seed, warp, zoom=1.0):
        self.dataset, self.seed, self.warp, self.zoom, self.epoch = dataset, seed, warp, zoom, 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        image = self.dataset[i]["image"]  # 3 x S x S
        if not self.warp:
            return {"image": image}
        g = sample_generator(self.seed, self.epoch, i)
        warp = data.random_tps(1, "pair", generator=g)
        if self.zoom > 1:  # drawn after the TPS: without --lead-zoom the pairs are the same as before it
            warp = warp.then(data.zoom_out(1, 1 + (self.zoom - 1) * torch.rand(1, generator=g)))
        return {"image": image, "warped": data.warp_images(image[None], warp)[0]}  # one resampling; zeros outside


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


def load_backbone(args, run, device):
    """The stage-1 online encoder from this run's checkpoint_stage1.pt, frozen and in eval mode."""
    path = os.path.join(run, "checkpoint_stage1.pt")
    if not os.path.exists(path):
        raise SystemExit(f"error: no stage-1 network at {path}; run --stage 1 with this --name first")
    checkpoint = load_checkpoint(path)
    saved = checkpoint["args"]
    online = Online(saved["arch"], saved["byol_hidden"], saved["byol_dim"])
    online.load_state_dict(checkpoint["state"]["online"])
    return online.encoder.to(device, memory_format=torch.channels_last).eval().requires_grad_(False)


def pca_pictures(path, images, features, title):
    """The first 3 principal components of dense features (n, C, h, w) as RGB under their images."""
    flat = features.float().permute(0, 2, 3, 1).reshape(-1, features.shape[1])  # (n h w) x C
    rgb = (flat - flat.mean(0)) @ torch.pca_lowrank(flat, q=3)[2]  # (n h w) x 3
    rgb = (rgb - rgb.min(0).values) / (rgb.max(0).values - rgb.min(0).values + 1e-8)
    n, _, h, w = features.shape
    save_pictures(path, images, rgb.view(n, h, w, 3).permute(0, 3, 1, 2).cpu(), title)


# =========================================================================================================
# Main: seed, device, data, then the stages (model and optimiser, resume, loop, save, export)
# =========================================================================================================
def main(argv=None):
    args = get_args(argv)
    device = choose_device(args.device)
    try:  # RGB in [0, 1]: the views are made before normalising
        info = data.make_dataset(args.dataset, "train", root=args.data_root, size=args.image_size, normalize=False)
    except data.DatasetError as error:
        raise SystemExit(f"error: {error}")
    train_set = torch.utils.data.Subset(info, range(min(args.train_images or len(info), len(info))))
    normalize = data.Normalize(info.mean, info.std).to(device)
    figure_images = torch.stack([train_set[i]["image"] for i in range(min(8, len(train_set)))])  # 8 x 3 x H x W
    grid = args.image_size // 2  # the exports' grid: 48x48 at 96 px, as moco_hypercol.py
    per_epoch = len(train_set) // args.batch_size
    stages = ["stage1", "stage2", "nmf"] if args.stage == "all" else [{"1": "stage1", "2": "stage2", "nmf": "nmf"}
                                                                      [args.stage]]

    if "stage1" in stages:  # ---- BYOL, Eq. 1 ------------------------------------------------------------------
        run = start_stage(args, "stage1")
        seed_everything(args.seed, args.deterministic)
        online = Online(args.arch, args.byol_hidden, args.byol_dim, args.imagenet_init)
        online = online.to(device, memory_format=torch.channels_last).train()  # channels_last: faster on CPU
        predictor = mlp(args.byol_dim, args.byol_hidden, args.byol_dim).to(device).train()
        target = copy.deepcopy(online).requires_grad_(False)  # xi starts equal to theta, then follows by EMA only
        optimizer = torch.optim.SGD([*online.parameters(), *predictor.parameters()], lr=args.lr, momentum=0.9,
                                    weight_decay=1e-4)
        steps = args.epochs * per_epoch
        scheduler = warmup_cosine(optimizer, steps, round(args.byol_warmup * per_epoch))

        def byol_step(batch):
            v1, v2 = batch["view1"].to(device), batch["view2"].to(device)  # N x 3 x S x S each
            with autocast(device, args.amp):
                p1, p2 = predictor(online(v1)).float(), predictor(online(v2)).float()  # N x dim, per view: BN
                with torch.no_grad():  # statistics of one view at a time, as BYOL's separate calls
                    z1, z2 = target(v1).float(), target(v2).float()
            loss = byol_loss(p1, p2, z1, z2)  # Eq. 1, both directions summed
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            ema_update(target, online, byol_tau(scheduler.last_epoch, steps, args.byol_tau))  # tau of step k
            scheduler.step()
            return loss.item()

        views = ByolViews(train_set, args.image_size, info.mean, info.std, args.seed)
        state = {"online": online, "predictor": predictor, "target": target, "optimizer": optimizer,
                 "scheduler": scheduler}
        if not fit(args, "stage1", run, views, byol_step, state, args.epochs, args.batch_size):
            return
        hyper = Hypercolumn(online.encoder.eval(), HYPER, grid)
        export(hyper, run, "hypercol", info, args, hyper.groups)
        with torch.no_grad():  # as supplement Fig. 1 of ContrastLandmark: what the hypercolumn separates
            h = hyper(normalize(figure_images.to(device)))
        pca_pictures(os.path.join(run, "pca_stage1.png"), figure_images, h, f"stage-1 hypercolumn PCA, "
                     f"{args.arch}, {args.epochs} epochs")

    if "stage2" in stages:  # ---- compact features, Eq. 2-3 ---------------------------------------------------
        run = start_stage(args, "stage2")
        seed_everything(args.seed, args.deterministic)
        backbone = load_backbone(args, run, device)
        compact = Compact(backbone, args.lead_dim).to(device, memory_format=torch.channels_last)
        compact.body.eval()  # the frozen encoder keeps its stage-1 batch-norm statistics
        head = LeadHead(args.lead_dim).to(device).train()
        optimizer = torch.optim.Adam([*compact.decoder.parameters(), *head.parameters()], lr=args.lead_lr)
        lead_set = torch.utils.data.Subset(train_set, range(min(args.lead_images or len(train_set), len(train_set))))
        per_epoch = len(lead_set) // args.batch_size
        scheduler = warmup_cosine(optimizer, args.lead_epochs * per_epoch, round(args.lead_warmup * per_epoch))

        k = torch.arange(args.batch_size)  # every batch is full (drop_last): the pairs are fixed index lists
        other, warped = (k, k.roll(-1)), (k, k + args.batch_size)  # (k, k + 1) and (k, warped k)
        pairs = {"batch": [other], "views": [warped], "both": [other, warped]}[args.lead_pairs]

        def lead_step(batch):
            x = batch["image"].to(device)  # B x 3 x S x S in [0, 1]
            images = torch.cat([x, batch["warped"].to(device)]) if "warped" in batch else x  # x_i, then warps
            with torch.no_grad(), autocast(device, args.amp):
                maps = compact.body(normalize(images).contiguous(memory_format=torch.channels_last))  # frozen
            with autocast(device, args.amp):
                s = head(compact.decoder(maps)).float()  # 2B (or B) x dim x S/4 x S/4
            t = torch.cat([F.interpolate(maps[name].float(), size=s.shape[-2:], mode="bilinear") for name in HYPER],
                          1)  # the teacher hypercolumn on the student's grid: 2B x C x S/4 x S/4
            loss = sum(lead_loss(t[i], t[j], s[i], s[j], args.lead_tau, args.lead_chunk) for i, j in pairs)
            loss = loss / len(pairs)  # Eq. 3, averaged over pairs
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            return loss.item()

        pairs_set = LeadPairs(lead_set, args.seed, warp=args.lead_pairs != "batch", zoom=args.lead_zoom)
        state = {"decoder": compact.decoder, "head": head, "optimizer": optimizer, "scheduler": scheduler}
        if not fit(args, "stage2", run, pairs_set, lead_step, state, args.lead_epochs, args.batch_size):
            return
        compact.eval()
        extractor = nn.Sequential(compact, nn.Upsample(size=(grid, grid), mode="bilinear"))  # the exports' grid
        export(extractor, run, "compact", info, args, [["compact", 0, args.lead_dim]])
        with torch.no_grad():
            f = extractor(normalize(figure_images.to(device)))
        pca_pictures(os.path.join(run, "pca_compact.png"), figure_images, f, f"compact features PCA, "
                     f"{args.lead_dim}-d, {args.lead_epochs} stage-2 epochs")

    if "nmf" in stages:  # ---- NMF baseline, Tab. 1 (deterministic and quick: no resume) ---------------------------
        run = start_stage(args, "nmf")
        seed_everything(args.seed, args.deterministic)
        backbone = load_backbone(args, run, device)
        hyper = Hypercolumn(backbone, HYPER, args.image_size // 4)
        images = torch.stack([train_set[i]["image"] for i in range(min(args.nmf_images, len(train_set)))])
        with torch.no_grad(), autocast(device, args.amp):
            v = torch.cat([hyper(normalize(x.to(device))).float() for x in images.split(args.batch_size)])
        V = v.permute(0, 2, 3, 1).reshape(-1, v.shape[1])  # (n 24 24) x C, >= 0 after ReLU and resizing
        torch.set_flush_denormal(True)  # the updates shrink unused basis entries into denormals: 2x slower on CPU
        start = time.time()
        W, basis = nmf(V, args.nmf_k, args.nmf_iters, generator=torch.Generator().manual_seed(args.seed))
        log(run, "nmf", {"stage": "nmf", "images": len(images), "k": args.nmf_k, "seconds": round(time.time() -
            start, 1), "relative_error": round(((V - W @ basis).norm() / V.norm()).item(), 4)})
        save_checkpoint(os.path.join(run, "checkpoint_nmf.pt"), state={"basis": basis.cpu()}, args=vars(args))
        extractor = nn.Sequential(Hypercolumn(backbone, HYPER, grid), NMFCoefficients(basis, args.nmf_iters // 4))
        export(extractor, run, "nmf", info, args, [["nmf", 0, args.nmf_k]])


if __name__ == "__main__":
    main()
