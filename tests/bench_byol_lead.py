"""Speed, host syncs and memory of byol_lead.py's two training steps (ResNet-18 at 96x96 unless said).

    python tests/bench_byol_lead.py [--batch-size 32] [--steps 10] [--amp auto|bf16|none] [--workers 1]
                                    [--lead-pairs views] [--lead-chunk 144] [--memory] [--skip-end-to-end]

Prints `name: value unit` lines, each with the thread count (torch's default, i.e. OMP_NUM_THREADS if set):
  views_old_per_worker  images/s of one worker making BYOL's two views per sample with torchvision (the path
                        before the views moved to the device; old_byol_view below is a copy of it), rendering
                        excluded (both paths render the same images);
  views_new_per_worker  images/s of the new path on the same images: the worker's share (uint8 conversion) plus
                        the device's share (view_params and byol_views, two views, a batch at a time) on the CPU;
  host_syncs_per_step   syncing calls (tests/conftest.py's HostSyncs) in one step of each stage, --log-every 100;
  stage1_model_step     images/s of the BYOL step alone on fixed views (both views through the online network
                        and predictor, the target, the loss, backward, SGD, EMA), fp32 and bf16, median of --steps
                        after a warm-up, alternated with the step before the rework (a Python EMA loop, .item());
  stage2_model_step     the same for the stage-2 step (frozen ResNet, decoder, head, Eq. 3, backward, Adam);
  stage1/2_end_to_end   images/s of a real run of the script (rendering, views, the step), from its log;
  stage2_peak_rss       peak resident memory of a fresh process taking stage-2 steps, with --lead-chunk and
                        with 0 (the plain lead_loss), and before its first step.
--memory instead prints, for the README's paper-scale command (ResNet-50, batch 256, bf16), the peak resident
memory of each stage measured in fresh processes at batch sizes 8, 16 and 32 and extrapolated with the straight
line through the first and last (peak = fixed + per_image x batch); `peak_memory_gb: X GB` lines.
Children run with MALLOC_MMAP_THRESHOLD_=1048576 unless set: glibc's dynamic threshold otherwise keeps freed
blocks of a few MB (the loss's chunks) resident and hides what chunking saves.
"""
import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import byol_lead as bl  # noqa: E402
import data  # noqa: E402
from conftest import HostSyncs  # noqa: E402


def old_byol_view(image, size, g, blur, solarize):
    """The per-sample view of byol_lead.py before the views moved to the device (kept for the comparison)."""
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
    if uniform(0, 1) < blur:
        sigma, kernel = uniform(0.1, 2.0), 2 * (size // 20) + 1
        image = TF.gaussian_blur(image, [kernel, kernel], [sigma, sigma])
    if uniform(0, 1) < solarize:
        image = TF.solarize(image, 0.5)
    return image


def views_speed(batch_size, rounds=5):
    """(old, new) images/s of one process making both views of a batch of rendered images, best of `rounds`."""
    dataset = data.make_dataset("synth-faces", "train", size=96, normalize=False, length=batch_size)
    rendered = [dataset[i]["image"] for i in range(batch_size)]  # float [0, 1]: what the dataset returns
    mean, std = torch.tensor(dataset.mean).view(3, 1, 1), torch.tensor(dataset.std).view(3, 1, 1)
    normalize = data.Normalize(dataset.mean, dataset.std)

    def old():
        for i, image in enumerate(rendered):
            g, image = data.generator(0, i), (image * 255).round().to(torch.uint8)
            [(old_byol_view(image, 96, g, blur, solarize) - mean) / std for blur, solarize in ((1.0, 0.0), (0.1, 0.2))]

    def new():
        images = torch.stack([(image * 255).round().to(torch.uint8) for image in rendered])  # the worker's share
        g = data.generator(0, 0)
        [normalize(bl.byol_views(images, bl.view_params(batch_size, 96, g, blur, solarize)))
         for blur, solarize in ((1.0, 0.0), (0.1, 0.2))]
    times = {old: [], new: []}
    for _ in range(rounds):  # interleaved, so that both meet the same load of a shared machine
        for run in (old, new):
            start = time.perf_counter()
            run()
            times[run].append(time.perf_counter() - start)
    return [batch_size / min(times[run]) for run in (old, new)]


def host_syncs(tiny):
    """Syncing calls in one step of stage 1 and of stage 2 (views pairs), taken inside byol_lead.main."""
    counts = {}
    real_train = bl.train

    def one_step(args, stage, run, loader, step_fn, state, epochs, device):
        batch = data.to_device(next(iter(loader)), device)
        step_fn(batch, data.generator(0, 0))
        with HostSyncs() as counter:
            step_fn(batch, data.generator(0, 1))
        counts[stage] = len(counter.calls)
        return False
    with tempfile.TemporaryDirectory() as root:
        bl.main(["--runs-dir", root, *tiny, "--stage", "1", "--epochs", "0"])  # a stage-1 network for stage 2
        bl.train = one_step
        try:
            for stage in ("1", "2"):
                bl.main(["--runs-dir", root, *tiny, "--stage", stage, "--resume", "--log-every", "100"])
        finally:
            bl.train = real_train
    return counts


def median_speed(step, batch_size, steps):
    times = []
    for _ in range(steps + 2):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return batch_size / sorted(times[2:])[len(times[2:]) // 2]


def interleaved_speeds(steps, batch_size, rounds):
    """Median images/s of each step function in `steps` (a dict), alternated after one warm-up call each, so that
    all meet the same load of a shared machine."""
    times = {name: [] for name in steps}
    for step in steps.values():
        step()
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: batch_size / sorted(t)[len(t) // 2] for name, t in times.items()}


def stage1_step(batch_size, amp, arch="resnet18", hidden=4096, size=96, old=False):
    torch.manual_seed(0)
    device = torch.device("cpu")
    dtype = data.amp_dtype(device, amp)
    online = bl.Online(arch, hidden, 256).to(memory_format=torch.channels_last).train()
    predictor, target = bl.mlp(256, hidden, 256), bl.Online(arch, hidden, 256).requires_grad_(False)
    target = target.to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD([*online.parameters(), *predictor.parameters()], lr=0.03, momentum=0.9)
    scaler = data.grad_scaler(device, dtype)
    views = torch.randn(2, batch_size, 3, size, size)

    def step():  # the same computation as byol_step in byol_lead.main, on fixed views
        with data.autocast(device, dtype):
            p1, p2 = [predictor(online(v)).float() for v in views]
            with torch.no_grad():
                z1, z2 = [target(v).float() for v in views]
        loss = bl.byol_loss(p1, p2, z1, z2)
        bl.update(loss, optimizer, scaler)
        if old:  # the step before the rework: a Python loop over the parameters, the loss read every step
            with torch.no_grad():
                for p_t, p_o in zip(target.parameters(), online.parameters()):
                    p_t.mul_(0.996).add_(p_o.detach(), alpha=1 - 0.996)
            loss.item()
        else:
            bl.ema_update(target, online, 0.996)
    return step


def stage2_step(batch_size, amp, lead_pairs, lead_chunk, arch="resnet18", size=96):
    torch.manual_seed(0)
    device = torch.device("cpu")
    dtype = data.amp_dtype(device, amp)
    compact = bl.Compact(bl.build_resnet(arch).requires_grad_(False), 64).to(memory_format=torch.channels_last)
    compact.body.eval()
    head = bl.lead_head(64)
    optimizer = torch.optim.Adam([*compact.decoder.parameters(), *head.parameters()], lr=1e-3, fused=True)
    scaler = data.grad_scaler(device, dtype)
    b = batch_size
    images = torch.randn(b if lead_pairs == "batch" else 2 * b, 3, size, size)
    rolled, views = (torch.arange(b), torch.arange(b).roll(-1)), (torch.arange(b), torch.arange(b, 2 * b))
    pairs = {"batch": [rolled], "views": [views], "both": [rolled, views]}[lead_pairs]

    def step():  # the same computation as lead_step in byol_lead.main, on fixed images
        with torch.no_grad(), data.autocast(device, dtype):
            maps = compact.body(images.contiguous(memory_format=torch.channels_last))
        with data.autocast(device, dtype):
            s = head(compact.decoder(maps)).float()
        t = torch.cat([F.interpolate(maps[n].float(), size=s.shape[-2:], mode="bilinear") for n in bl.HYPER], 1)
        loss = sum(bl.lead_loss_chunked(t[i], t[j], s[i], s[j], 0.05, lead_chunk) if lead_chunk
                   else bl.lead_loss(t[i], t[j], s[i], s[j], 0.05) for i, j in pairs) / len(pairs)
        bl.update(loss, optimizer, scaler)
    return step


def end_to_end_speed(args):
    with tempfile.TemporaryDirectory() as root:
        common = ["--runs-dir", root, "--epochs", "1", "--lead-epochs", "1", "--batch-size", str(args.batch_size),
                  "--train-images", str(args.batch_size * args.steps), "--amp", args.amp, "--workers",
                  str(args.workers), "--lead-pairs", args.lead_pairs, "--lead-chunk", str(args.lead_chunk)]
        bl.main(["--stage", "1", *common])
        bl.main(["--stage", "2", *common])
        speeds = []
        for stage in ("stage1", "stage2"):
            with open(os.path.join(root, "byol_lead", "default", f"log_{stage}.jsonl")) as f:
                speeds.append(json.loads(f.readline())["images_per_s"])
        return speeds


def peak_rss(stage, batch_size, amp, steps, chunk=144, arch="resnet18", pairs="views"):
    """Peak and pre-step RSS (MB) of a child process taking `steps` steps of `stage` (1 or 2)."""
    flags = ["--memory-child", str(stage), "--batch-size", str(batch_size), "--steps", str(steps), "--amp", amp,
             "--lead-pairs", pairs, "--lead-chunk", str(chunk), "--arch", arch]
    env = {"MALLOC_MMAP_THRESHOLD_": "1048576", **os.environ}  # glibc returns freed chunks: RSS shows the need
    out = subprocess.run([sys.executable, __file__, *flags], capture_output=True, text=True, check=True,
                         env=env).stdout
    before, peak = map(float, out.split())
    return before, peak


def max_rss_mb():
    """This process's peak resident memory: VmHWM of /proc/self/status (Linux; a new program starts it afresh,
    whereas ru_maxrss survives exec and would report the parent's peak), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024  # kB
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--amp", default="auto", choices=["auto", "bf16", "none"])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--lead-pairs", default="views", choices=["batch", "views", "both"])
    parser.add_argument("--lead-chunk", type=int, default=144)
    parser.add_argument("--arch", default="resnet18", choices=["resnet18", "resnet50"])
    parser.add_argument("--memory", action="store_true", help="the paper-scale peak-memory lines only")
    parser.add_argument("--skip-end-to-end", action="store_true", help="no real runs of the script")
    parser.add_argument("--memory-child", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    threads = torch.get_num_threads()
    if args.memory_child:
        step = (stage1_step(args.batch_size, args.amp, args.arch) if args.memory_child == 1 else
                stage2_step(args.batch_size, args.amp, args.lead_pairs, args.lead_chunk, args.arch))
        before = max_rss_mb()
        for _ in range(args.steps):
            step()
        print(before, max_rss_mb())
        sys.exit()
    if args.memory:  # the README's paper-scale command: ResNet-50, batch 256, 96 px, bf16 on the CPU
        for stage in (1, 2):
            sizes = (8, 16, 32)
            measured = [peak_rss(stage, b, "bf16", 1, args.lead_chunk, "resnet50") for b in sizes]  # MB
            peaks = [peak / 1024 for _, peak in measured]
            per_image = (peaks[-1] - peaks[0]) / (sizes[-1] - sizes[0])
            fixed = peaks[0] - per_image * sizes[0]
            print(f"stage{stage}_peak_gb_measured: " + ", ".join(f"{p:.2f} GB at batch {b} ({before / 1024:.2f} before "
                  f"the step)" for b, p, (before, _) in zip(sizes, peaks, measured)), flush=True)
            print(f"peak_memory_gb: {fixed + 256 * per_image:.1f} GB (stage {stage}, resnet50, batch 256, bf16; "
                  f"{fixed:.2f} GB + {per_image * 1024:.0f} MB x batch)", flush=True)
        sys.exit()
    old, new = views_speed(args.batch_size)
    print(f"views_old_per_worker: {old:.1f} images/s (two views each, per sample with torchvision, {threads} threads)")
    print(f"views_new_per_worker: {new:.1f} images/s (uint8 in the worker, two views in batches of {args.batch_size} "
          f"on the CPU as the device, {threads} threads; {new / old:.1f}x)", flush=True)
    tiny = ["--image-size", "64", "--train-images", "8", "--batch-size", "4", "--workers", "0", "--byol-hidden", "64",
            "--byol-dim", "16", "--lead-dim", "8"]
    for stage, count in host_syncs(tiny).items():
        print(f"host_syncs_per_step: {count} calls ({stage}, --log-every 100)", flush=True)
    for chunk in (args.lead_chunk, 0):
        before, peak = peak_rss(2, args.batch_size, args.amp, args.steps, chunk, pairs=args.lead_pairs)
        print(f"stage2_peak_rss: {peak:.0f} MB (--lead-chunk {chunk}, batch {args.batch_size}, pairs "
              f"{args.lead_pairs}; {before:.0f} MB before the first step)", flush=True)
    for amp in ("none", "bf16"):
        speeds = interleaved_speeds({"old": stage1_step(args.batch_size, amp, old=True),
                                     "new": stage1_step(args.batch_size, amp)}, args.batch_size, args.steps)
        print(f"stage1_model_step: {speeds['new']:.1f} images/s (amp {amp}, batch {args.batch_size}, {threads} "
              f"threads; the old step's EMA loop and per-step .item(), alternated with it: {speeds['old']:.1f})",
              flush=True)
    speed = median_speed(stage2_step(args.batch_size, args.amp, args.lead_pairs, args.lead_chunk), args.batch_size,
                         args.steps)
    print(f"stage2_model_step: {speed:.1f} images/s (amp {args.amp}, batch {args.batch_size}, pairs "
          f"{args.lead_pairs}, {threads} threads)", flush=True)
    if not args.skip_end_to_end:
        stage1, stage2 = end_to_end_speed(args)
        print(f"stage1_end_to_end: {stage1:.1f} images/s (amp {args.amp}, {args.workers} workers, {threads} threads)")
        print(f"stage2_end_to_end: {stage2:.1f} images/s (amp {args.amp}, {args.workers} workers, {threads} threads)")
