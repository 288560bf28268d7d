"""LEAD for object landmarks: Karmali, Atreya, Nair, Sharma, Radhakrishnan, "LEAD: Self-Supervised Landmark
Estimation by Aligning Distributions of Feature Similarity", WACV 2022, arXiv 2204.02958 (no public code).

Three stages (`--stage all` runs them in order), writing to runs/byol_lead/<name>/:
  1         BYOL of a torchvision ResNet (Sec. 3.2); exports its hypercolumn (hypercol.pt2, Tab. 1's "LEAD
            3840", stage 2's teacher) and pca_stage1.png; `--epochs 0` exports the random network (the baseline);
  2         an FPN decoder (64-d, 1/4 resolution) and a projection head on the frozen ResNet, trained so that the
            compact features' similarity distributions match the hypercolumn's (Sec. 3.3, Eq. 3); exports
            compact.pt2 (no head) and pca_compact.png;
  nmf       Tab. 1's baseline: NMF of the stage-1 hypercolumn to --nmf-k = 64 channels (nmf.pt2).
Evaluate any exported .pt2 with regress.py (landmark regression) and match.py (matching).

Paper -> code:  Eq. 1, BYOL's loss / its target network     -> byol_loss / ema_update, byol_tau
                Sec. 3.2 hypercolumn; Sec. 3.3 decoder, head -> Hypercolumn; FPNDecoder, Compact, lead_head
                Eq. 2 similarity distributions; Eq. 3       -> similarity_distributions; lead_loss
                Tab. 1 NMF baseline                          -> data.nmf_basis, data.NMFCoefficients
                BYOL's views; the stage-2 pairs              -> view_params, byol_views; lead_pairs

Paper values and our CPU defaults in brackets: --batch-size 256 [32] | --epochs 200 [1: 312 steps] | SGD --lr
0.03, momentum 0.9, cosine after --byol-warmup 2 epochs [0.2] | --byol-tau 0.996 -> 1, MLPs 4096 -> 256 [same] |
weight decay not given [1e-4, MoCo's] | stage 2: --lead-epochs 10-20 [1 epoch of --lead-images 2,560: 80 steps],
--lead-tau 0.05, --lead-dim 64 [same], optimiser not given [Adam, --lead-lr 1e-3: Adam does not mind the scale
that Eq. 3's sum over locations gives the loss].

Open choices (the paper does not say) and deviations, each deliberate:
- BYOL's loss is summed over its two directions, not averaged (an average halves the gradient). The target keeps
  its own batch-norm statistics (only parameters follow the EMA, after each optimiser step) and runs in train mode.
- Views: BYOL's two pipelines (crop scale 0.08-1, flip, colour jitter 0.4/0.4/0.2/0.1 with p 0.8 in a random
  order per sample, grayscale 0.2, blur sigma 0.1-2 with p 1.0 / 0.1, solarisation p 0.0 / 0.2), drawn on the
  device a batch at a time; workers only render (uint8). The learning rate is scheduled every step.
- The ResNet keeps its stem stride (layer1..4 are 24, 12, 6, 3 cells at 96 px). The hypercolumn (layer4..1) is
  resized to 48x48 in the exports (compact.pt2 too) and to the student's 24x24 as the teacher. Decoder:
  torchvision's FPN, its outputs resized to 1/4 and summed (Panoptic FPN's semantic branch without its conv
  towers), then a 3x3 conv; head: 1x1 conv, BN, ReLU, 1x1 conv.
- Eq. 3 is summed over the locations u and averaged over the pairs; lead_loss_chunked (same value and gradients,
  less memory) unless --lead-chunk 0.
- --lead-pairs ("two images" in the paper): batch = image k with image k+1; views (the default, which matched
  best) = an image with its own random TPS warp (data.random_tps "pair"), the teacher seeing the warped image, so
  no correspondence is needed; both = the two sets, averaged. --lead-zoom (ours, off): the scale ablation.
On a GPU, --help says what --amp auto and --deterministic do; --workers defaults to the cores.

Smallest run: `python byol_lead.py --train-images 512 --name tiny`: a bar and a summary line per epoch and stage,
then runs/byol_lead/tiny/{hypercol,compact,nmf}.pt2, in 1-2 minutes on 2 CPU cores (docs/byol_lead.md has the
timings and what the runs give).
"""
import argparse
import copy
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchvision.models.feature_extraction import create_feature_extractor
from tqdm import tqdm

import data

SCRIPT = "byol_lead"
LAYERS = ("layer1", "layer2", "layer3", "layer4")  # 1/4 .. 1/32 of the input (conv2_x .. conv5_x)
HYPER = LAYERS[::-1]  # the hypercolumn's order, deepest first (960-d for ResNet-18, 3840-d for ResNet-50)


# ===== Settings =====
def get_args(argv=None):
    p = argparse.ArgumentParser(description="LEAD: BYOL, then compact features with the hypercolumn's similarities "
                                "(Karmali et al. 2022)", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add, switch = p.add_argument, argparse.BooleanOptionalAction
    add("--stage", default="all", choices=["all", "1", "2", "nmf"], help="what to run; 2 and nmf read stage 1's --name")
    add("--dataset", default="synth-faces", choices=list(data.DATASETS), help="training data (see data.py)")
    add("--data-root", default=None, help="dataset folder, for real datasets only")
    add("--image-size", type=int, default=96, help="side of the square input images (the protocol uses 96)")
    add("--train-images", type=int, default=0, help="use only the first N training images (0: all)")
    add("--arch", default="resnet18", choices=["resnet18", "resnet50"], help="torchvision backbone")
    add("--imagenet-init", action=switch, default=False, help="start from torchvision's ImageNet weights")
    add("--epochs", type=int, default=1, help="BYOL epochs (paper 200); 0: the random network (the baseline)")
    add("--batch-size", type=int, default=32, help="images per step, both stages (paper 256)")
    add("--lr", type=float, default=0.03, help="SGD learning rate after warm-up, cosine-decayed to 0 (paper 0.03)")
    add("--workers", type=int, default=None, help="data-loader processes; default: all cores on a GPU, 1 on a CPU")
    add("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"], help=data.AMP_HELP)
    add("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="auto: cuda, mps, then cpu")
    add("--seed", type=int, default=0, help="seeds the initialisation, the data order and the augmentations")
    add("--deterministic", action=switch, default=False, help=data.DETERMINISTIC_HELP)
    add("--name", default="default", help="run name: everything goes to <runs-dir>/byol_lead/<name>/")
    add("--runs-dir", default="runs", help="root of the run directories")
    add("--resume", action=switch, default=False, help="continue each stage from its checkpoint")
    add("--stop-after-steps", type=int, default=0, help="checkpoint and stop a stage after N steps (0: never)")
    add("--log-every", type=int, default=10, help="show the loss every N steps (reading it waits for a GPU)")
    add("--byol-tau", type=float, default=0.996, help="tau_base, the target's EMA rate, raised to 1 by a cosine "
        "(paper 0.996); lower it if a short run learns nothing")
    add("--byol-hidden", type=int, default=4096, help="hidden width of the projector and predictor MLPs (4096)")
    add("--byol-dim", type=int, default=256, help="output size of the projector and predictor (paper 256)")
    add("--byol-warmup", type=float, default=0.2, help="warm-up epochs of the learning rate (paper 2 of 200)")
    add("--lead-epochs", type=int, default=1, help="stage-2 epochs (paper 10-20)")
    add("--lead-images", type=int, default=2560, help="stage 2's first N training images (0: all); it needs few")
    add("--lead-lr", type=float, default=1e-3, help="Adam learning rate of the decoder and head after warm-up")
    add("--lead-warmup", type=float, default=0.1, help="stage-2 warm-up epochs")
    add("--lead-tau", type=float, default=0.05, help="temperature tau of Eq. 2, lower is sharper (paper 0.05)")
    add("--lead-dim", type=int, default=64, help="channels of the compact features (paper 64)")
    add("--lead-pairs", default="views", choices=["batch", "views", "both"], help="what x_j of Eq. 3 is: the "
        "next image of the batch, a TPS-warped copy of x_i, or both sets of pairs")
    add("--lead-zoom", type=float, default=1.0, help="ours (Sec. 4.4's scale test): zoom each warped copy out by "
        "a factor in [1, LEAD_ZOOM] (1: the paper's pairs)")
    add("--lead-chunk", type=int, default=144, help="student rows of Eq. 3 at a time (checkpointed); lower it if "
        "stage 2 runs out of memory, 0: all at once")
    add("--nmf-k", type=int, default=64, help="NMF components (64: the compact features' size, Tab. 1)")
    add("--nmf-images", type=int, default=64, help="training images whose 24x24 hypercolumns NMF factorises")
    add("--nmf-iters", type=int, default=200, help="multiplicative updates (the exports use a quarter per image)")
    args = p.parse_args(argv)
    if min(args.lead_chunk, args.byol_warmup, args.lead_warmup) < 0 or args.log_every < 1:
        p.error("--lead-chunk, --byol-warmup and --lead-warmup cannot be negative, --log-every must be >= 1")
    if args.lead_zoom < 1 or (args.lead_zoom > 1 and args.lead_pairs == "batch"):
        p.error("--lead-zoom must be >= 1 and needs warped pairs (--lead-pairs views or both)")
    return args


# ===== Model =====
def build_resnet(arch, imagenet=False):
    """A torchvision ResNet without its classifier: images -> pooled features (512-d ResNet-18, 2048-d -50)."""
    net = data.torchvision_model(arch, imagenet)
    net.fc = nn.Identity()
    return net


def mlp(in_dim, hidden, out_dim):  # BYOL's projector and predictor
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(True), nn.Linear(hidden, out_dim))


class Online(nn.Module):
    """Encoder f and projector g of BYOL; the target network is a copy of this module (no predictor)."""
    def __init__(self, arch, hidden, dim, imagenet=False):
        super().__init__()
        self.encoder = build_resnet(arch, imagenet)
        self.projector = mlp(512 if arch == "resnet18" else 2048, hidden, dim)

    def forward(self, x):  # x: N x 3 x S x S -> N x dim
        return self.projector(self.encoder(x.contiguous(memory_format=torch.channels_last)))


@torch.no_grad()
def ema_update(target, online, tau):
    """xi <- tau xi + (1 - tau) theta in one fused call; buffers (batch-norm statistics) stay the target's own."""
    torch._foreach_lerp_(list(target.parameters()), list(online.parameters()), 1 - tau)


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
        maps = self.body(x.contiguous(memory_format=torch.channels_last))  # the faster layout on CPU and GPU
        return torch.cat([F.interpolate(maps[name], size=(self.size, self.size), mode="bilinear")
                          for name in self.layers], 1)  # B x C x size x size


class FPNDecoder(nn.Module):
    """Sec. 3.3: layer1..layer4 (1/4..1/32) -> a dim-channel map at 1/4 (FPN levels resized and summed, 3x3 conv)."""
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


def lead_head(dim, hidden=256):  # Sec. 3.3's projection head, for the loss only: an MLP at every location
    return nn.Sequential(nn.Conv2d(dim, hidden, 1), nn.BatchNorm2d(hidden), nn.ReLU(True), nn.Conv2d(hidden, dim, 1))


# ===== Losses =====
def byol_loss(p1, p2, z1, z2):
    """Eq. 1, symmetrised: ||p1/|p1| - z2/|z2|||^2 + ||p2/|p2| - z1/|z1|||^2 = (2 - 2 cos) + (2 - 2 cos), each
    averaged over the batch and the two SUMMED. p: online predictions, z: target projections, N x dim each."""
    return sum((2 - 2 * F.cosine_similarity(p, z.detach(), dim=1)).mean() for p, z in ((p1, z2), (p2, z1)))


def similarity_distributions(f_i, f_j, tau, log=False):
    """Eq. 2: for every location u of f_i, the distribution over the locations v of f_j of
    softmax_v(cos(f_i(u), f_j(v)) / tau) (its log with `log`). f: B x C x h x w -> B x hw(u) x hw(v)."""
    f_i, f_j = [F.normalize(f.flatten(2).float(), dim=1) for f in (f_i, f_j)]  # B x C x hw, unit columns
    logits = f_i.transpose(1, 2) @ f_j / tau  # B x hw(u) x hw(v)
    return logits.log_softmax(-1) if log else logits.softmax(-1)


def lead_loss(t_i, t_j, s_i, s_j, tau=0.05):
    """Eq. 3 for the pairs (x_i, x_j) of a batch: p_u from the teacher (hypercolumn) maps t, q_u from the
    student (compact) maps s, loss = -sum_u sum_v p_u(v) log q_u(v), summed over the locations u of x_i and
    averaged over the pairs. t: B x C x h x w, s: B x d x h x w."""
    p = similarity_distributions(t_i, t_j, tau)  # B x hw x hw: the target distributions
    log_q = similarity_distributions(s_i, s_j, tau, log=True)  # B x hw x hw
    return -(p * log_q).sum((1, 2)).mean()


def lead_loss_chunked(t_i, t_j, s_i, s_j, tau=0.05, chunk=144):
    """lead_loss in less memory (the same value and gradients, tested): the teacher's p, which needs no gradient,
    is computed once without it; the student's rows u go `chunk` at a time through activation checkpointing, so
    that the backward pass holds one chunk's B x chunk x hw log q instead of all B x hw x hw of them."""
    with torch.no_grad():
        p = similarity_distributions(t_i, t_j, tau)  # B x hw x hw
    s_i, s_j = [F.normalize(f.flatten(2).float(), dim=1) for f in (s_i, s_j)]  # B x d x hw

    def rows(p_u, s_u):  # p_u: B x c x hw, s_u: B x d x c for c rows u -> B
        log_q = (s_u.transpose(1, 2) @ s_j / tau).log_softmax(-1)  # B x c x hw
        return -(p_u * log_q).sum((1, 2))

    return sum(checkpoint(rows, p[:, a:a + chunk], s_i[..., a:a + chunk], use_reentrant=False)
               for a in range(0, p.shape[1], chunk)).mean()  # over the hw rows u


# ===== Views =====
def view_params(n, size, g, blur, solarize):
    """Parameters of n views, drawn per sample on the CPU from g: torchvision's RandomResizedCrop box (x1, y1, x2,
    y2; area in [0.08, 1], ratio 3/4-4/3, 10 tries, then the whole image), flip 0.5, ColorJitter(0.4, 0.4, 0.2, 0.1)
    with p 0.8 in a random order, grayscale 0.2, blur (sigma 0.1-2) with p `blur`, solarisation with p `solarize`."""
    u = lambda *shape, lo=0.0, hi=1.0: lo + (hi - lo) * torch.rand(*shape, generator=g)  # noqa: E731
    area, ratio = size * size * u(n, 10, lo=0.08), u(n, 10, lo=math.log(3 / 4), hi=math.log(4 / 3)).exp()
    w, h = (area * ratio).sqrt().round(), (area / ratio).sqrt().round()  # n x 10 tries
    fits = (w <= size) & (h <= size)
    first = fits.float().argmax(1, keepdim=True)  # the first try that fits, else the whole image
    w, h = [torch.where(fits.any(1), side.gather(1, first)[:, 0], size) for side in (w, h)]
    top, left = (u(n) * (size - h + 1)).floor(), (u(n) * (size - w + 1)).floor()
    return {"box": torch.stack([left, top, left + w, top + h], 1),  # n x 4 (x1, y1, x2, y2) in pixels
            "flip": u(n) < 0.5, "jitter": u(n) < 0.8, "order": u(n, 4).argsort(1),  # n x 4 permutations
            "factors": u(n, 4, lo=torch.tensor([0.6, 0.6, 0.8, -0.1]), hi=torch.tensor([1.4, 1.4, 1.2, 0.1])),
            "gray": u(n) < 0.2, "blur": u(n) < blur, "sigma": u(n, lo=0.1, hi=2.0), "solarize": u(n) < solarize}


def resize_rows(start, length, size, flip):
    """N x size x size matrices R: R @ line resizes pixels [start, start + length) of a line to `size`, flipped
    where `flip`, bilinear on pixel centres with the ends clamped (torchvision's resized_crop)."""
    t = (torch.arange(size, device=start.device) + 0.5) / size  # output pixel centres in (0, 1)
    first, last = start[:, None], (start + length - 1)[:, None]
    source = (first + torch.where(flip[:, None], 1 - t, t) * length[:, None] - 0.5).clamp(first, last)  # N x size
    return (1 - (torch.arange(size, device=start.device) - source[..., None]).abs()).clamp(min=0)  # hat weights


def blur_rows(sigma, blur, size):
    """N x size x size matrices K: K @ line blurs the line with a Gaussian of a tenth of the side (BYOL: 23 at
    224 px), reflected at the ends as torchvision's gaussian_blur, where `blur`; the identity elsewhere."""
    taps = torch.arange(-(size // 20), size // 20 + 1, device=sigma.device)
    kernel = torch.exp(-0.5 * (taps / sigma[:, None]) ** 2)  # N x k
    kernel = torch.where(blur[:, None], kernel / kernel.sum(1, keepdim=True), (taps == 0).float())
    j = torch.arange(size, device=sigma.device)[:, None] + taps  # size x k: the pixels each output reads
    j = torch.where(j < 0, -j, torch.where(j >= size, 2 * size - 2 - j, j))  # reflected
    rows = torch.zeros(len(sigma), size, size, device=sigma.device)
    return rows.scatter_add_(2, j.expand(len(sigma), -1, -1), kernel[:, None].expand(-1, size, -1))


def byol_views(images, params):
    """The views of uint8 images (N x 3 x S x S) with the `params` of view_params, on their device: float, in [0, 1].
    Crop, resize and flip, and the blur, are per-sample matrices on the rows and columns (rows @ x @ columns^T)."""
    n, _, size, _ = images.shape
    one = lambda key: params[key].view(n, 1, 1, 1)  # noqa: E731
    gray = lambda x: 0.2989 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:]  # noqa: E731  N x 1 x S x S
    x1, y1, x2, y2 = params["box"].unbind(1)
    rows = resize_rows(y1, y2 - y1, size, torch.zeros_like(params["flip"]))[:, None]  # N x 1 x S x S
    x = rows @ (images.float() / 255) @ resize_rows(x1, x2 - x1, size, params["flip"])[:, None].transpose(2, 3)
    # ColorJitter in each view's order: the positions before the hue, the hue, those after it; each blends x with
    # black (brightness), its mean grey (contrast) or its grey (saturation), factor 1 where nothing is due.
    order, hue_at = params["order"], (params["order"] == 3).float().argmax(1)  # N x 4, N
    for positions, before in ((range(3), True), (range(1, 4), False)):
        for k in positions:
            due = params["jitter"] & (order[:, k] != 3) & (k < hue_at if before else k > hue_at)
            f = torch.where(due, params["factors"].gather(1, order[:, k:k + 1] % 3)[:, 0], 1.0).view(n, 1, 1, 1)
            y, op = gray(x), order[:, k].view(n, 1, 1, 1)
            target = torch.where(op == 0, 0.0, torch.where(op == 1, y.mean((2, 3), keepdim=True), y))
            x = torch.lerp(target, x, f).clamp_(0, 1)
        if before:
            x = torch.where(one("jitter"), data.adjust_hue(x, params["factors"][:, 3].view(n, 1, 1, 1)), x)
    x = torch.where(one("gray"), gray(x), x)
    blur = blur_rows(params["sigma"], params["blur"], size)[:, None]  # N x 1 x S x S
    x = blur @ x @ blur.transpose(2, 3)
    return torch.where(one("solarize") & (x >= 0.5), 1 - x, x)


def lead_pairs(x, g, zoom):
    """x_j of the views pairs: each image (B x 3 x S x S, on the device) warped by its own random TPS ("pair"
    preset) drawn from g; zoom > 1 also shrinks it about its centre by a factor drawn in [1, zoom] after it."""
    warp = data.random_tps(len(x), "pair", generator=g, device=x.device)
    if zoom > 1:
        factor = (1 + (zoom - 1) * torch.rand(len(x), generator=g)).to(x.device, non_blocking=True)
        warp = warp.then(data.zoom_out(len(x), factor, device=x.device))
    return data.warp_images(x, warp)  # resampled once; zeros outside


# ===== Training loop =====
def train(args, stage, run, loader, step_fn, state, epochs, device):
    """`step_fn(batch, generator) -> loss` for `epochs` epochs, a bar, log line and checkpoint each. Resume loads
    `state` and the step only: every random draw is a function of (seed, epoch, index) or (seed, step)."""
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
        total, start, done = torch.zeros((), device=device), time.time(), step % per_epoch
        bar = tqdm(loader, desc=f"{stage} epoch {epoch + 1}/{epochs}", initial=done, total=per_epoch)
        for batch in bar:
            loss = step_fn(data.to_device(batch, device), data.generator(args.seed, step))  # a tensor: no sync
            total, step = total + loss.detach(), step + 1
            if step % args.log_every == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")  # the only host sync of a step
            if step == args.stop_after_steps:
                save()
                print(f"{stage}: stopped after step {step} (--stop-after-steps); continue with --resume")
                return False
        n, seconds = per_epoch - done, time.time() - start
        data.log(run, stage, {"stage": stage, "epoch": epoch + 1, "step": step, "loss": total.item() / n,
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


def warmup_cosine(optimizer, steps, warmup):
    """Linear warm-up over `warmup` steps, then a cosine to 0 at `steps`, stepped every iteration."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: (k + 1) / warmup if k < warmup else
                                             0.5 * (1 + math.cos(math.pi * (k - warmup) / max(steps - warmup, 1))))


# ===== Exports and pictures =====
def export(module, run, variant, info, args, groups):
    """Write <run>/<variant>.pt2: a frozen extractor of dense features from [0, 1] images (data.save_extractor)."""
    module = copy.deepcopy(module).float().cpu().eval().to(memory_format=torch.contiguous_format)
    meta = {"input_size": [args.image_size] * 2, "kind": "features", "method": SCRIPT, "variant": variant,
            "channel_groups": groups, "arch": args.arch, "dataset": args.dataset, "epochs": args.epochs}
    meta = data.save_extractor(module, os.path.join(run, f"{variant}.pt2"), meta, info.mean, info.std)
    print(f"exported {os.path.join(run, variant)}.pt2: {meta['channels']} x {meta['output_size']} features")


def load_backbone(run, device):
    """The stage-1 online encoder from this run's checkpoint_stage1.pt, frozen and in eval mode."""
    path = os.path.join(run, "checkpoint_stage1.pt")
    if not os.path.exists(path):
        raise SystemExit(f"error: no stage-1 network at {path}; run --stage 1 with this --name first")
    checkpoint = data.load_checkpoint(path)
    online = Online(*[checkpoint["args"][k] for k in ("arch", "byol_hidden", "byol_dim")])
    online.load_state_dict(checkpoint["state"]["online"])
    return online.encoder.to(device, memory_format=torch.channels_last).eval().requires_grad_(False)


# ===== Main =====
def main(argv=None):
    args = get_args(argv)
    device = data.choose_device(args.device)
    dtype = data.amp_dtype(device, args.amp)  # None: fp32
    workers = data.default_workers(device) if args.workers is None else args.workers
    info, train_set = data.training_images(args.dataset, args.data_root, args.image_size, args.train_images)
    normalize = data.Normalize(info.mean, info.std).to(device)
    figure_images = data.first_images(train_set, 8)  # 8 x 3 x H x W
    grid = args.image_size // 2  # the exports' grid: 48x48 at 96 px
    stages = {"all": ["stage1", "stage2", "nmf"], "1": ["stage1"], "2": ["stage2"], "nmf": ["nmf"]}[args.stage]

    if "stage1" in stages:  # ---- BYOL, Eq. 1 ------------------------------------------------------------------
        run = data.start_run(args.runs_dir, SCRIPT, args.name, "stage1", args, args.resume)
        data.seed_everything(args.seed, args.deterministic)
        online = Online(args.arch, args.byol_hidden, args.byol_dim, args.imagenet_init)
        online = online.to(device, memory_format=torch.channels_last)  # channels_last: faster convs on CPU
        predictor = mlp(args.byol_dim, args.byol_hidden, args.byol_dim).to(device)
        target = copy.deepcopy(online).requires_grad_(False)  # xi starts equal to theta, then follows by EMA only
        optimizer = torch.optim.SGD([*online.parameters(), *predictor.parameters()], lr=args.lr, momentum=0.9,
                                    weight_decay=1e-4)
        loader = data.make_loader(data.Uint8Images(train_set), args.batch_size, args.seed, workers, device)
        steps = args.epochs * len(loader)
        scheduler, scaler = warmup_cosine(optimizer, steps, round(args.byol_warmup * len(loader))), \
            data.grad_scaler(device, dtype)

        def byol_step(batch, g):
            x, views = batch["image"], []  # N x 3 x S x S uint8
            for blur, solarize in ((1.0, 0.0), (0.1, 0.2)):  # BYOL's t and t'
                params = view_params(len(x), args.image_size, g, blur, solarize)
                views.append(normalize(byol_views(x, data.to_device(params, device))))
            with data.autocast(device, dtype):
                p1, p2 = [predictor(online(v)).float() for v in views]  # N x dim, BN statistics of one view
                with torch.no_grad():
                    z1, z2 = [target(v).float() for v in views]
            loss = byol_loss(p1, p2, z1, z2)  # Eq. 1, both directions summed
            update(loss, optimizer, scaler)
            ema_update(target, online, byol_tau(scheduler.last_epoch, steps, args.byol_tau))  # tau of step k
            scheduler.step()
            return loss

        state = dict(online=online, predictor=predictor, target=target, optimizer=optimizer, scheduler=scheduler,
                     scaler=scaler)
        if not train(args, "stage1", run, loader, byol_step, state, args.epochs, device):
            return
        hyper = Hypercolumn(online.encoder.eval(), HYPER, grid)
        export(hyper, run, "hypercol", info, args, hyper.groups)
        with torch.no_grad():  # the first 3 principal components of the hypercolumn as RGB
            pca = data.pca_rgb(hyper(normalize(figure_images.to(device))))  # 8 x 3 x 48 x 48
        data.save_pictures(os.path.join(run, "pca_stage1.png"), figure_images, pca)

    if "stage2" in stages:  # ---- compact features, Eq. 2-3 ---------------------------------------------------
        run = data.start_run(args.runs_dir, SCRIPT, args.name, "stage2", args, args.resume)
        data.seed_everything(args.seed, args.deterministic)
        compact = Compact(load_backbone(run, device), args.lead_dim).to(device, memory_format=torch.channels_last)
        compact.body.eval()  # the frozen encoder keeps its stage-1 batch-norm statistics
        head = lead_head(args.lead_dim).to(device).train()
        optimizer = torch.optim.Adam([*compact.decoder.parameters(), *head.parameters()], lr=args.lead_lr,
                                     fused=True)  # fused: no read of the step count on the host
        lead_set = torch.utils.data.Subset(train_set, range(min(args.lead_images or len(train_set), len(train_set))))
        loader = data.make_loader(data.Uint8Images(lead_set), args.batch_size, args.seed, workers, device)
        scheduler = warmup_cosine(optimizer, args.lead_epochs * len(loader), round(args.lead_warmup * len(loader)))
        scaler = data.grad_scaler(device, dtype)
        k = torch.arange(args.batch_size, device=device)  # every batch is full (drop_last): fixed index lists
        other, warped = (k, k.roll(-1)), (k, k + args.batch_size)  # (k, k + 1) and (k, warped k)
        pairs = {"batch": [other], "views": [warped], "both": [other, warped]}[args.lead_pairs]

        def lead_step(batch, g):
            x = batch["image"].float() / 255  # B x 3 x S x S in [0, 1]
            images = x if args.lead_pairs == "batch" else torch.cat([x, lead_pairs(x, g, args.lead_zoom)])
            with torch.no_grad(), data.autocast(device, dtype):
                maps = compact.body(normalize(images).contiguous(memory_format=torch.channels_last))  # frozen
            with data.autocast(device, dtype):
                s = head(compact.decoder(maps)).float()  # 2B (or B) x dim x S/4 x S/4
            t = torch.cat([F.interpolate(maps[name].float(), size=s.shape[-2:], mode="bilinear") for name in HYPER],
                          1)  # the teacher hypercolumn on the student's grid: 2B x C x S/4 x S/4, no gradient
            loss = sum(lead_loss_chunked(t[i], t[j], s[i], s[j], args.lead_tau, args.lead_chunk) if args.lead_chunk
                       else lead_loss(t[i], t[j], s[i], s[j], args.lead_tau) for i, j in pairs) / len(pairs)
            update(loss, optimizer, scaler)  # Eq. 3, averaged over the sets of pairs
            scheduler.step()
            return loss

        state = dict(decoder=compact.decoder, head=head, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
        if not train(args, "stage2", run, loader, lead_step, state, args.lead_epochs, device):
            return
        extractor = nn.Sequential(compact.eval(), nn.Upsample(size=(grid, grid), mode="bilinear"))  # exports' grid
        export(extractor, run, "compact", info, args, [["compact", 0, args.lead_dim]])
        with torch.no_grad():
            pca = data.pca_rgb(extractor(normalize(figure_images.to(device))))
        data.save_pictures(os.path.join(run, "pca_compact.png"), figure_images, pca)

    if "nmf" in stages:  # ---- NMF baseline, Tab. 1 (deterministic and quick: no resume) ---------------------------
        run = data.start_run(args.runs_dir, SCRIPT, args.name, "nmf", args, args.resume)
        data.seed_everything(args.seed, args.deterministic)
        backbone = load_backbone(run, device)
        hyper = Hypercolumn(backbone, HYPER, args.image_size // 4)
        images = data.first_images(train_set, args.nmf_images)
        with torch.no_grad(), data.autocast(device, dtype):  # n x C x 24 x 24, >= 0 after ReLU and resizing
            v = torch.cat([hyper(normalize(x.to(device))).float() for x in images.split(args.batch_size)])
        basis, record = data.nmf_basis(v, args.nmf_k, args.nmf_iters, args.seed)
        data.log(run, "nmf", {"stage": "nmf", **record})
        data.save_checkpoint(os.path.join(run, "checkpoint_nmf.pt"), state={"basis": basis.cpu()}, args=vars(args))
        extractor = nn.Sequential(Hypercolumn(backbone, HYPER, grid), data.NMFCoefficients(basis, args.nmf_iters // 4))
        export(extractor, run, "nmf", info, args, [["nmf", 0, args.nmf_k]])


if __name__ == "__main__":
    main()
