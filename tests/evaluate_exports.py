"""The evaluation scripts on a method's exported extractors, at the tiny settings of the smoke tests (64 px,
16 images, 4 matching pairs): shared by the three method test files, whose smoke runs end with it."""
import math
import os

import match
import regress


def regression_error(run_dir, tmp_path, name, *flags):
    """regress.py on <run_dir>/<name>.pt2 (one epoch unless flags say otherwise); the mean error, checked finite."""
    results = regress.main(["--features", os.path.join(run_dir, f"{name}.pt2"), "--image-size", "64", "--epochs", "1",
                            "--max-images", "16", "--runs-dir", str(tmp_path), "--plot-images", "0", *flags])
    error = results["table"][0]["mean"]
    assert math.isfinite(error)
    return error


def matching(run_dir, tmp_path, names, *flags):
    """match.py on <run_dir>/<name>.pt2 for each name; its results, with every mean error checked finite."""
    results = match.main(["--features", *[os.path.join(run_dir, f"{n}.pt2") for n in names], "--image-size", "64",
                          "--pairs", "4", "--runs-dir", str(tmp_path), *flags])
    assert set(results["matching"]) == set(names)
    for name in names:
        assert all(math.isfinite(results["matching"][name][kind]["mean_error"]) for kind in results["matching"][name])
    return results
