"""Speed of byol_lead.py's two training steps and the peak memory of stage 2, ResNet-18 at 96x96.

    python tests/bench_byol_lead.py [--batch-size 32] [--steps 10] [--amp auto|bf16|none] [--workers 1]
                                    [--lead-pairs views] [--lead-chunk 144]

Prints `name: value unit` lines, each with the thread count (torch's default, i.e. OMP_NUM_THREADS if set):
  stage1_model_step    images/s of the BYOL step alone on fixed views (both views through the online network
                       and predictor, the target, the loss, backward, SGD, EMA), median after 2 warm-up steps;
  stage1_end_to_end    images/s of a real run of the script (rendering, BYOL's views, the step), from its log;
  stage2_model_step    images/s of the stage-2 step alone (frozen ResNet, decoder, head, Eq. 3 over the pairs,
                       backward, Adam), median after 2 warm-up steps;
  stage2_end_to_end    the same from a real stage-2 run (rendering and TPS warps included);
  stage2_peak_rss      peak resident memory (VmHWM of /proc/self/status, else resource.getrusage ru_maxrss) of a
                       fresh process that builds the stage-2 model and takes --steps steps, with --lead-chunk and
                       with 0 (no chunking), and its peak before the first step: the steps' own share is the
                       difference. (tracemalloc does not see torch's allocations; these do.) The child runs
                       with MALLOC_MMAP_THRESHOLD_=1048576 unless set: glibc's dynamic threshold otherwise keeps
                       freed blocks of a few MB (the loss's chunks) resident and hides what chunking saves.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import byol_lead as bl  # noqa: E402


def median_speed(step, batch_size, steps):
    times = []
    for _ in range(steps + 2):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return batch_size / sorted(times[2:])[len(times[2:]) // 2]


def stage1_step(args):
    torch.manual_seed(0)
    device = torch.device("cpu")
    online = bl.Online("resnet18", 4096, 256).to(memory_format=torch.channels_last).train()
    predictor, target = bl.mlp(256, 4096, 256), bl.Online("resnet18", 4096, 256).requires_grad_(False)
    target = target.to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD([*online.parameters(), *predictor.parameters()], lr=0.03, momentum=0.9)
    v1, v2 = torch.randn(2, args.batch_size, 3, 96, 96)

    def step():  # the same computation as byol_step in byol_lead.main
        with bl.autocast(device, args.amp):
            p1, p2 = predictor(online(v1)).float(), predictor(online(v2)).float()
            with torch.no_grad():
                z1, z2 = target(v1).float(), target(v2).float()
        loss = bl.byol_loss(p1, p2, z1, z2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bl.ema_update(target, online, 0.996)
    return step


def stage2_step(args):
    torch.manual_seed(0)
    device = torch.device("cpu")
    compact = bl.Compact(bl.build_resnet("resnet18").requires_grad_(False), 64).to(memory_format=torch.channels_last)
    compact.body.eval()
    head = bl.LeadHead(64)
    optimizer = torch.optim.Adam([*compact.decoder.parameters(), *head.parameters()], lr=1e-3)
    b = args.batch_size
    images = torch.randn(b if args.lead_pairs == "batch" else 2 * b, 3, 96, 96)
    rolled, views = (torch.arange(b), torch.arange(b).roll(-1)), (torch.arange(b), torch.arange(b, 2 * b))
    pairs = {"batch": [rolled], "views": [views], "both": [rolled, views]}[args.lead_pairs]

    def step():  # the same computation as lead_step in byol_lead.main
        with torch.no_grad(), bl.autocast(device, args.amp):
            maps = compact.body(images.contiguous(memory_format=torch.channels_last))
        with bl.autocast(device, args.amp):
            s = head(compact.decoder(maps)).float()
        t = torch.cat([F.interpolate(maps[n].float(), size=s.shape[-2:], mode="bilinear") for n in bl.HYPER], 1)
        loss = sum(bl.lead_loss(t[i], t[j], s[i], s[j], 0.05, args.lead_chunk) for i, j in pairs) / len(pairs)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
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


def peak_rss(args, chunk):
    """Peak and pre-step RSS (MB) of a child process running stage-2 steps with --lead-chunk `chunk`."""
    flags = ["--memory-child", "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--amp", args.amp,
             "--lead-pairs", args.lead_pairs, "--lead-chunk", str(chunk)]
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
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    threads = torch.get_num_threads()
    if args.memory_child:
        step = stage2_step(args)
        before = max_rss_mb()
        for _ in range(args.steps):
            step()
        print(before, max_rss_mb())
        sys.exit()
    for chunk in (args.lead_chunk, 0):
        before, peak = peak_rss(args, chunk)
        print(f"stage2_peak_rss: {peak:.0f} MB (--lead-chunk {chunk}, batch {args.batch_size}, pairs "
              f"{args.lead_pairs}; {before:.0f} MB before the first step)", flush=True)
    print(f"stage1_model_step: {median_speed(stage1_step(args), args.batch_size, args.steps):.1f} images/s "
          f"(amp {args.amp}, batch {args.batch_size}, {threads} threads)", flush=True)
    print(f"stage2_model_step: {median_speed(stage2_step(args), args.batch_size, args.steps):.1f} images/s "
          f"(amp {args.amp}, batch {args.batch_size}, pairs {args.lead_pairs}, {threads} threads)", flush=True)
    stage1, stage2 = end_to_end_speed(args)
    print(f"stage1_end_to_end: {stage1:.1f} images/s (amp {args.amp}, {args.workers} workers, {threads} threads)")
    print(f"stage2_end_to_end: {stage2:.1f} images/s (amp {args.amp}, {args.workers} workers, {threads} threads)")
