"""Rendering speed of the built-in synthetic data, one thread: images per second per CPU core.

    python tests/bench_data.py [--images 400] [--repeats 3]

Prints `name: value unit` lines, e.g. `synth_faces_aligned_96: 800 images/s/core`: dataset[i] for
i = 0, 1, ... (the whole sample: parameters, drawing, colouring, mask, tensors), after a warm-up that fills
the per-process texture cache. The rate is measured in CPU time of this process (median of the repeats),
so that other processes sharing the machine slow it down as little as possible; `load_average_1min` is
printed too, since a busy machine still slows every core. The target is >= 500 images/s/core at 96x96,
plenty for training, which consumes 15-120 images/s on a CPU.
"""
import argparse
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before numpy and torch are imported
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
import time  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from data import SyntheticBirds, SyntheticFaces  # noqa: E402

DATASETS = {
    "synth_faces_aligned": lambda size: SyntheticFaces(size=size),
    "synth_faces_dense": lambda size: SyntheticFaces(annotation="dense", size=size),
    "synth_faces_wild": lambda size: SyntheticFaces(variant="wild", size=size),
    "synth_faces_clutter": lambda size: SyntheticFaces(variant="clutter", size=size),
    "synth_birds": lambda size: SyntheticBirds(size=size),
}


def images_per_second(dataset, images, repeats):
    for i in range(20):  # warm-up: texture cache, first calls
        dataset[i]
    rates = []
    for _ in range(repeats):
        start = time.process_time()
        for i in range(images):
            dataset[i]
        rates.append(images / (time.process_time() - start))
    return sorted(rates)[len(rates) // 2]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400, help="images per timed repeat")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats; the median is printed")
    parser.add_argument("--sizes", type=int, nargs="+", default=[96, 192], help="image sizes to time")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"load_average_1min: {os.getloadavg()[0]:.2f} processes on {os.cpu_count()} cores")
    for size in args.sizes:
        for name, build in DATASETS.items():
            rate = images_per_second(build(size), args.images, args.repeats)
            print(f"{name}_{size}: {rate:.0f} images/s/core", flush=True)


if __name__ == "__main__":
    main()
