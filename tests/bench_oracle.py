"""Can the evaluation tell good features from bad? Oracle versus random features at the protocol's scale.

Run: ``python tests/bench_oracle.py`` (about 10 minutes on a busy 2-core CPU, one thread). On the built-in
aligned synthetic faces at 96x96 with 48x48 feature maps:
* oracle features: one Gaussian bump (sigma 3 px) per landmark at its true position (plus, for matching, a
  constant channel so that L2 normalisation leaves the empty background alone);
* random features: white noise of the same shape.
Regression: DVE's regressor trained with regress.py's default protocol (standardised features, warm-up and
cosine, bf16, 10 epochs) on 500 training, 200 validation and 500 test images; the mean training shape beside it.
Matching: the benchmark's 500 pairs (seed 0) of the test split, dve and contrastlandmark variants.
Prints ``name: value unit`` lines (px70: pixels of the 70x70 frame); the oracle's floor is the feature stride (DVE's head snaps its intermediate
points to feature cells): ~0.77 px, i.e. ~2.8% IOD and ~0.56 in the 70x70 frame.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import data  # noqa: E402
import match  # noqa: E402
import regress  # noqa: E402
from test_regress import fit_default, gaussian_bumps, synthetic_store  # noqa: E402


def with_background(points):
    bumps = gaussian_bumps(points, 96, 48, sigma=3.0)  # (N, 5, 48, 48)
    return torch.cat([bumps, torch.full_like(bumps[:, :1], 0.1)], dim=1)


def main():
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)  # as regress.py does: DVE's sharp softmax underflows to slow denormal floats
    spec = dict(task="landmarks", size=(96, 96), metric="iod", eye_indices=(0, 1), pck_int_truncation=False)
    features = {"oracle": lambda kp: gaussian_bumps(kp, 96, 48, sigma=3.0),
                "random": lambda kp: torch.randn(len(kp), 5, 48, 48)}
    for name, make in features.items():
        train, val, test = (synthetic_store(s, n, 96, make) for s, n in (("train", 500), ("val", 200), ("test", 500)))
        result = fit_default(train, val, test, spec, 10, 32)
        print(f"regress_{name}_iod: {result['iod']:.2f} %")
        print(f"regress_{name}_error: {result['error_px']:.2f} px")
    reference = regress.mean_shape_reference(regress.split_keypoints(train), regress.split_keypoints(test), spec)
    print(f"regress_mean_shape_iod: {reference['iod']:.2f} %")

    faces = data.make_dataset("synth-faces", "test", normalize=False)
    triples, generator, errors = match.make_triples(faces, 500), torch.Generator().manual_seed(0), {}
    for i in range(0, len(triples), 50):
        source, targets = match.warped_pairs(faces, triples[i:i + 50], generator)
        n = len(source["image"])
        for line, target in targets.items():
            valid = source["valid"] & target["valid"]
            runs = {"oracle_dve": (with_background(source["points"]), with_background(target["points"]), False, None),
                    "oracle_contrastlandmark": (with_background(source["points"]), with_background(target["points"]),
                                                True, [["all", 0, 6]]),
                    "random_dve": (torch.randn(n, 6, 48, 48), torch.randn(n, 6, 48, 48), False, None)}
            for name, (f_source, f_target, upsample, groups) in runs.items():
                pred = match.predict_matches(f_source, source["points"], f_target, (96, 96), upsample, groups)
                errors.setdefault(f"match_{name}_{line}", []).append(
                    match.matching_errors(pred, target["points"], valid, (96, 96)))
    for key, chunks in errors.items():
        print(f"{key}: {torch.cat(chunks).mean():.3f} px70")


if __name__ == "__main__":
    main()
