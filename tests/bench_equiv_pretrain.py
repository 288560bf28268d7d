"""Speed, host synchronisations and memory of equiv_pretrain.py's training steps at 96x96.

    python tests/bench_equiv_pretrain.py [--batch-size 16] [--steps 10] [--amp bf16 none] [--workers 1]
    python tests/bench_equiv_pretrain.py --memory [--memory-batches 2 4 8]

Prints `name: value unit` lines (images/s counts the B images of a batch, not their B warped copies):
  views_worker_old / _new    images/s of one data-loader process: the float image the loader used to ship, and
                             the uint8 image it ships now (rendering included); fastest of --steps batches;
  views_device_old / _new    images/s of the views drawn in the step for a batch (stage 1: warp g, points lambda
                             and their images, appearance r; stage 2: warp): the old draws from the global
                             generator (a copy of the old functions is below) and the new from data.generator;
                             fastest of --steps batches, old and new alternated;
  host_syncs_<stage>         syncing calls in one whole step (tests/conftest.py's counter), apart from Adam's
                             reads of its step counters, which are CPU tensors even for GPU weights;
  <stage>_model_step         the step function alone on fixed images, median over --steps after 2 warm-up steps,
                             for each --amp;
  <stage>_end_to_end         a real run of the script (rendering included), from its log: the first epoch of
                             --steps steps (warm-up included).
--memory runs one step of each stage in a fresh process per batch size and reads its peak resident memory
(ru_maxrss); the growth with the batch size is linear once Eq. 7 is blocked (from 4,096 points per batch), so
  peak_memory_gb  = the measured peak at the largest batch + slope x (B - that batch),
with the slope fitted over --memory-batches, for B = 16 (the README's CelebA command) and 256. The plain Eq. 7
at batch 256 would add its (2 B P)^2 float32 logits, several copies of them: printed as plain_loss_gb, from a
measurement of the plain loss alone.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import data  # noqa: E402
import equiv_pretrain as ep  # noqa: E402
from conftest import HostSyncs  # noqa: E402


def old_views(x, opts, stage):
    """The views as the step drew them before (7f76ad3): float images from the loader, every draw from the global
    torch generator on the device (the checkpoint then had to hold its state)."""
    zoom = (1 / opts.equiv_zoom, opts.equiv_zoom) if stage == "stage1" else (1.0, 1.0)
    warp = data.random_affine(len(x), opts.equiv_rotation, zoom, opts.equiv_translation if stage == "stage1" else 0.0,
                              device=x.device).then(data.random_elastic(len(x), alpha=opts.equiv_elastic, sigma=0.2,
                                                                        device=x.device))
    warped = data.warp_images(x, warp)
    if stage != "stage1":
        return warped
    brightness, contrast = (1 + opts.equiv_jitter * (2 * torch.rand(2, len(x), 1, 1, 1) - 1)).unbind(0)
    images = warped * brightness
    mean = images.mean((1, 2, 3), keepdim=True)
    images = (images - mean) * contrast + mean
    images = (images + opts.equiv_noise * torch.rand(len(x), 1, 1, 1) * torch.randn_like(images)).clamp(0, 1)
    lam = 2 * torch.rand(len(x), opts.equiv_points, 2) - 1
    return images, warp.forward(lam)


def new_views(x, opts, stage, g):
    """The views of ep.stage1_step / ep.detector_step, from uint8 images."""
    x = x.float() / 255
    warp = ep.random_warp(len(x), opts, g, x.device, zoom_and_shift=stage == "stage1")
    warped = data.warp_images(x, warp)
    if stage != "stage1":
        return warped
    lam = (2 * torch.rand(len(x), opts.equiv_points, 2, generator=g) - 1).to(x.device)
    return ep.appearance(warped, opts.equiv_jitter, opts.equiv_noise, g), warp.forward(lam)


def views_speed(args):
    """Old and new paths alternated in each of --steps repetitions, each timing a whole batch; the fastest
    repetition of each (on a shared machine a timing is stretched whenever the process waits for a core)."""
    faces = data.make_dataset("synth-faces", "train", size=96, normalize=False, length=args.batch_size)
    images, opts = data.Uint8Images(faces), ep.get_args([])
    worker = {"old": lambda i: faces[i]["image"], "new": lambda i: images[(0, i)]["image"]}
    batch = {name: torch.stack([get(i) for i in range(len(faces))]) for name, get in worker.items()}
    times = {}
    for step in range(args.steps):
        for name in ("old", "new"):
            start = time.perf_counter()
            [worker[name](i) for i in range(len(faces))]
            times.setdefault(f"views_worker_{name}", []).append(time.perf_counter() - start)
            for stage in ("stage1", "stage2"):
                start = time.perf_counter()
                if name == "old":
                    old_views(batch[name], opts, stage)
                else:
                    new_views(batch[name], opts, stage, data.generator(0, step))
                times.setdefault(f"views_device_{name}_{stage}", []).append(time.perf_counter() - start)
    return {key: args.batch_size / min(t) for key, t in times.items()}


def grid_error_px(batch_size):
    """Pixels between where the stage-2 warp's sampling grid reads each output pixel, computed under bf16 autocast
    (as the step did before it warped outside autocast), and the float32 map of Eq. 2 (warp.backward)."""
    warp = ep.random_warp(batch_size, ep.get_args([]), data.generator(0, 0), "cpu", zoom_and_shift=False)
    exact = warp.backward(data.identity_grid(96, 96).reshape(1, -1, 2).expand(batch_size, -1, -1))
    out = []
    for dtype in (torch.bfloat16, None):  # None: autocast off, float32
        with data.autocast(torch.device("cpu"), dtype):
            grid = warp.grid(96, 96).float().reshape(batch_size, -1, 2)
        error = (grid - exact).norm(dim=-1) * 95 / 2  # normalised -> pixels at 96 px
        out += [error.mean().item(), error.max().item()]
    return out


def setup(stage, batch_size, amp, image_size=96):
    """The models, optimiser state and fixed images of one stage, as main builds them."""
    torch.manual_seed(0)
    opts = ep.get_args(["--image-size", str(image_size)])
    device, dtype = torch.device("cpu"), data.amp_dtype(torch.device("cpu"), amp)
    features = ep.Hourglass().to(memory_format=torch.channels_last).train(stage != "stage2").requires_grad_(
        stage != "stage2")
    detector = ep.Detector(64, opts.equiv_k, 32, opts.equiv_logit_scale).to(memory_format=torch.channels_last)
    trained = {"model": features} if stage == "stage1" else {"detector": detector} | (
        {"features": features} if stage == "end2end" else {})
    optimizer = torch.optim.Adam([p for m in trained.values() for p in m.parameters()], lr=3e-4, weight_decay=5e-4)
    state = trained | {"optimizer": optimizer, "scaler": data.grad_scaler(device, dtype),
                       "scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)}
    normalize = data.Normalize(data.FACE_MEAN, data.FACE_STD)
    x = torch.rand(batch_size, 3, image_size, image_size)

    def step(g):
        if stage == "stage1":
            return ep.stage1_step(state, x, g, opts, normalize, dtype)
        return ep.detector_step(state, features, x, g, opts, normalize, dtype)
    return step, optimizer


def model_step_speed(args, stage, amp):
    step, _ = setup(stage, args.batch_size, amp)
    times = []
    for i in range(args.steps + 2):
        start = time.perf_counter()
        step(data.generator(0, i))["loss"].item()
        times.append(time.perf_counter() - start)
    return args.batch_size / sorted(times[2:])[len(times[2:]) // 2]


def host_syncs(stage):
    step, optimizer = setup(stage, 2, "bf16", image_size=32)
    counter, adam_step = HostSyncs(), optimizer.step

    def step_apart(*a, **k):  # Adam's .item() reads of its CPU step counters are not device syncs
        before = len(counter.calls)
        adam_step(*a, **k)
        del counter.calls[before:]

    optimizer.step = step_apart
    with counter, warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Seems like", UserWarning)  # the scheduler notices the wrapper
        step(data.generator(0, 0))
    return counter.calls


def end_to_end_speed(args, stage, amp):
    with tempfile.TemporaryDirectory() as root:
        flags = ["--runs-dir", root, "--batch-size", str(args.batch_size), "--train-images",
                 str(args.batch_size * args.steps), "--amp", amp, "--workers", str(args.workers), "--epochs", "1",
                 "--equiv-det-epochs", "1"]
        # stage 2 needs stage 1 first; the baseline trains --epochs + --equiv-det-epochs = 1 epoch
        flags += {"stage1": ["--stage", "1"], "stage2": [],
                  "end2end": ["--end-to-end", "--equiv-det-epochs", "0"]}[stage]
        ep.main(flags)
        with open(os.path.join(root, "equiv_pretrain", "default", f"log_{stage}.jsonl")) as f:
            return [json.loads(line) for line in f if '"epoch"' in line][0]["images_per_s"]


def peak_memory_of_one_step(stage, batch_size, amp):
    """Run in a child process: GB of peak resident memory after one step, and before it."""
    step, _ = setup(stage, batch_size, amp)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KB -> GB
    step(data.generator(0, 0))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, before


def memory(args):
    for stage in ("stage1", "end2end"):
        peaks = []
        for b in args.memory_batches:
            code = (f"import sys; sys.argv = ['']; import bench_equiv_pretrain as b; "
                    f"print(*b.peak_memory_of_one_step('{stage}', {b}, '{args.amp[0]}'))")
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                 cwd=os.path.dirname(os.path.abspath(__file__)),
                                 env=os.environ | {"OMP_NUM_THREADS": "1"})
            peak, before = map(float, out.stdout.split()[-2:])
            peaks.append(peak)
            print(f"measured_peak_memory_gb: {peak:.2f} GB ({stage}, batch {b}, before the step {before:.2f})",
                  flush=True)
        bs = args.memory_batches
        slope = (peaks[-1] - peaks[0]) / (bs[-1] - bs[0])
        for b in (16, 256):
            print(f"peak_memory_gb: {peaks[-1] + slope * (b - bs[-1]):.1f} GB ({stage}, batch {b}, amp "
                  f"{args.amp[0]}, {slope * 1024:.0f} MB per image)")
    f, keep = torch.randn(2048, 64, requires_grad=True), torch.ones(2048, dtype=torch.bool)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        ep.equivariant_contrastive_loss(f, f.detach(), 0.1, keep)
    copies = sum(saved) / (4096 ** 2 * 4)  # bytes kept for the backward pass, in (2N)^2 float32 tensors
    n = 2 * 256 * 64
    print(f"plain_loss_gb: {copies * n ** 2 * 4 / 2 ** 30:.1f} GB (batch 256, 64 points: {copies:.2f} copies of the "
          f"(2N)^2 logits kept for the backward pass, before its gradients; the blocked loss keeps none)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--amp", nargs="+", default=["bf16", "none"], choices=["auto", "bf16", "none"])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--memory", action="store_true", help="only the peak memory lines")
    parser.add_argument("--memory-batches", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--no-end-to-end", action="store_true", help="skip the real runs of the script")
    args = parser.parse_args()
    threads = torch.get_num_threads()
    if args.memory:
        memory(args)
        sys.exit()
    for name, value in views_speed(args).items():
        print(f"{name}: {value:.1f} images/s (batch {args.batch_size}, {threads} threads)", flush=True)
    errors = grid_error_px(args.batch_size)
    print(f"warp_grid_error_bf16: {errors[0]:.3f} px mean, {errors[1]:.3f} px max (stage-2 warps at 96 px)")
    print(f"warp_grid_error_fp32: {errors[2]:.1e} px mean, {errors[3]:.1e} px max (as the step warps now)", flush=True)
    for stage in ("stage1", "stage2", "end2end"):
        calls = host_syncs(stage)
        print(f"host_syncs_{stage}: {len(calls)} calls per step {sorted(set(calls)) or ''}", flush=True)
    for amp in args.amp:
        for stage in ("stage1", "stage2", "end2end"):
            print(f"{stage}_model_step: {model_step_speed(args, stage, amp):.1f} images/s (amp {amp}, batch "
                  f"{args.batch_size}, {threads} threads)", flush=True)
    for amp in [] if args.no_end_to_end else args.amp[:1]:
        for stage in ("stage1", "stage2", "end2end"):
            print(f"{stage}_end_to_end: {end_to_end_speed(args, stage, amp):.1f} images/s (amp {amp}, "
                  f"{args.workers} workers, {threads} threads)", flush=True)
