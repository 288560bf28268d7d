"""One command per results table of the README: it runs the commands behind the table in order (training, the
untrained baseline, regress.py, match.py), skips every run whose output already exists, then prints the table
in markdown with every number read from the runs' results files. A reader can check every number this way.

    python docs/tables.py moco      # MoCo hypercolumns (moco_hypercol.py)
    python docs/tables.py byol      # LEAD (byol_lead.py)
    python docs/tables.py equiv     # pretrained equivariant features (equiv_pretrain.py)
    python docs/tables.py oracle    # can the evaluation tell good features from bad? (tests/bench_oracle.py)

Each takes as long as its commands together (their times are in the README and docs/<script>.md); `--dry-run`
lists them.

Options: --dry-run prints the commands without running anything; --quick runs tiny versions of them (64 px, 8
training images, one regression epoch on 16 images: meaningless numbers, a check of the plumbing in minutes, into
runs/quick/ so that they never pass for real runs); --runs-dir puts everything elsewhere.

What "exists" means: a training run is done when its last export is there, an evaluation when its
results.json is (runs/regress/<name>/ and runs/match/<name>/, with the --name given below). Training commands
get --resume, so that a table interrupted in the middle of a run continues it where it stopped (a fresh run is
unchanged by it). Delete a run's directory to make it again.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: every command runs there

# The regression flags of every regress.py row with DVE's head, in every table: one place, so that all rows are
# evaluated alike (the --head ridge rows of the equiv table take no training flags). Empty: regress.py's default
# protocol, which converges in minutes and does not depend on the channels' scale.
REGRESS = []

# --quick: the smallest settings each script accepts (those of its smoke test), placed after a command's table
# flags for regress.py and match.py (they shorten them) and before them for training (a table's own flags win).
QUICK = {"moco_hypercol.py": ["--image-size", "64", "--train-images", "8", "--batch-size", "4", "--moco-queue", "8",
                              "--workers", "0", "--nmf-images", "4", "--nmf-iters", "10", "--nmf-k", "4",
                              "--proj-dim", "8"],
         "byol_lead.py": ["--image-size", "64", "--train-images", "8", "--batch-size", "4", "--workers", "0",
                          "--byol-hidden", "64", "--byol-dim", "16", "--nmf-images", "4", "--nmf-iters", "10",
                          "--nmf-k", "4", "--lead-dim", "8", "--lead-chunk", "100"],
         "equiv_pretrain.py": ["--image-size", "64", "--train-images", "8", "--batch-size", "4", "--workers", "0",
                               "--equiv-widths", "8,8,16,16", "--equiv-points", "16", "--equiv-det-width", "8",
                               "--equiv-det-epochs", "1"],
         "regress.py": ["--image-size", "64", "--epochs", "1", "--max-images", "16", "--plot-images", "0",
                        "--threads", "1"],
         "match.py": ["--image-size", "64", "--pairs", "4", "--equivariance-images", "4", "--threads", "1"]}


# ---------------------------------------------------------------------------------------------------------
# The commands: each step is (argv after `python`, the file whose existence means it is done)
# ---------------------------------------------------------------------------------------------------------
class Steps:
    """Builds the steps of one table; paths are relative to the runs directory `runs`."""

    def __init__(self, runs):
        self.runs, self.list = runs, []

    def train(self, script, last_export, *flags):
        self.list.append(([script, *flags, "--resume"], f"{script[:-3]}/{last_export}"))

    def regress(self, name, features, *flags):
        table_flags = [] if "--head" in flags else REGRESS
        self.list.append((["regress.py", "--features", f"{self.runs}/{features}", *table_flags, *flags, "--name", name],
                          f"regress/{name}/results.json"))

    def match(self, name, *features, flags=()):
        self.list.append((["match.py", "--features", *[f"{self.runs}/{f}" for f in features], *flags, "--name", name],
                          f"match/{name}/results.json"))

    def copy(self, source, target):  # a stage-2 variant on the same stage 1: copy its checkpoint into a new run
        self.list.append((["copy", source, target], target))


MOCO_VARIANTS = ("hypercol", "layer1", "layer2", "layer3", "layer4", "proj", "nmf")  # moco_hypercol.py's exports


def moco_steps(s):
    s.train("moco_hypercol.py", "default/nmf.pt2")  # the default run: 1 MoCo epoch, projector, NMF
    s.train("moco_hypercol.py", "random/hypercol.pt2", "--epochs", "0", "--stage", "pretrain", "--name", "random")
    for variant in MOCO_VARIANTS:
        s.regress(f"moco-default-{variant}", f"moco_hypercol/default/{variant}.pt2")
    s.regress("moco-random-hypercol", "moco_hypercol/random/hypercol.pt2")
    s.match("moco-default-dve", *[f"moco_hypercol/default/{v}.pt2" for v in ("hypercol", "proj", "nmf")])
    s.match("moco-random-dve", "moco_hypercol/random/hypercol.pt2")


def byol_steps(s):
    s.train("byol_lead.py", "default/nmf.pt2")  # the default run: 1 BYOL epoch, LEAD stage 2, NMF
    s.train("byol_lead.py", "random/nmf.pt2", "--epochs", "0", "--name", "random")  # stage 2 still trains
    for run, variant in (("default", "hypercol"), ("default", "nmf"), ("default", "compact"),
                         ("random", "hypercol"), ("random", "compact")):
        s.regress(f"byol-{run}-{variant}", f"byol_lead/{run}/{variant}.pt2")
    s.match("byol-default-dve", *[f"byol_lead/default/{v}.pt2" for v in ("hypercol", "nmf", "compact")])
    s.match("byol-random-dve", *[f"byol_lead/random/{v}.pt2" for v in ("hypercol", "compact")])


def equiv_steps(s):
    s.train("equiv_pretrain.py", "default/heatmaps.pt2")  # the two-step default: stage 1, then stage 2
    s.train("equiv_pretrain.py", "default/end2end_heatmaps.pt2", "--end-to-end")  # the baseline, same run
    s.train("equiv_pretrain.py", "untrained/heatmaps.pt2", "--epochs", "0", "--name", "untrained")
    s.copy("equiv_pretrain/default/checkpoint_stage1.pt", "equiv_pretrain/k30/checkpoint_stage1.pt")
    s.train("equiv_pretrain.py", "k30/heatmaps.pt2", "--stage", "2", "--equiv-k", "30", "--name", "k30")
    s.train("equiv_pretrain.py", "k30/end2end_heatmaps.pt2", "--end-to-end", "--equiv-k", "30", "--name", "k30")
    equivariance = ("--equivariance", "--acc-at", "15")
    s.match("equiv-default", "equiv_pretrain/default/features.pt2", "equiv_pretrain/default/end2end_features.pt2",
            flags=equivariance)
    s.match("equiv-untrained", "equiv_pretrain/untrained/features.pt2", flags=equivariance)
    for run, variant in (("default", "heatmaps"), ("default", "end2end_heatmaps"), ("untrained", "heatmaps"),
                         ("k30", "heatmaps"), ("k30", "end2end_heatmaps")):
        s.regress(f"equiv-{run}-{variant}", f"equiv_pretrain/{run}/{variant}.pt2", "--head", "ridge")


def oracle_steps(s):
    s.list.append((["tests/bench_oracle.py"], "tables/oracle.txt"))  # its printed lines are kept in that file


# ---------------------------------------------------------------------------------------------------------
# The tables: the README's rows, every number read from a results file
# ---------------------------------------------------------------------------------------------------------
class Results:
    """Reads the runs' results files: regression errors, matching errors and Acc(d)."""

    def __init__(self, runs):
        self.runs = runs

    def load(self, script, name):
        with open(os.path.join(self.runs, script, name, "results.json")) as f:
            return json.load(f)

    def regress(self, name):  # the test error of the row's head (IOD % on faces), formatted
        return f"{self.load('regress', name)['table'][0]['mean']:.2f}"

    def mean_shape(self, name):  # what predicting the mean training shape scores, printed by every regress.py run
        results = self.load("regress", name)
        return f"{results['mean_shape'][results['metric']]:.2f}"

    def channels(self, name):
        return self.load("regress", name)["extractor"]["channels"]

    def match(self, name, features):  # same / different identity, mean error in the 70x70 frame
        lines = self.load("match", name)["matching"][features]
        return f"{lines['same']['mean_error']:.2f} / {lines['different']['mean_error']:.2f}"

    def acc(self, name, features, d):  # Acc(d): share of points within d pixels after the warp
        return f"{self.load('match', name)['equivariance'][features]['acc'][d]:.3f}"


def moco_table(r):
    layers = " / ".join(r.regress(f"moco-default-layer{i}") for i in range(1, 5))
    return ["features (channels)", "regression IOD %", "matching same / different identity (70x70 px)"], [
        ["mean training shape (no features)", r.mean_shape("moco-default-hypercol"), ""],
        [f"random-init hypercolumn ({r.channels('moco-random-hypercol')}), `--epochs 0`",
         r.regress("moco-random-hypercol"), r.match("moco-random-dve", "hypercol")],
        [f"MoCo hypercolumn ({r.channels('moco-default-hypercol')})", r.regress("moco-default-hypercol"),
         r.match("moco-default-dve", "hypercol")],
        ["MoCo layer1 / layer2 / layer3 / layer4 alone", layers, ""],
        [f"MoCo + projector ({r.channels('moco-default-proj')})", r.regress("moco-default-proj"),
         r.match("moco-default-dve", "proj")],
        [f"MoCo + NMF ({r.channels('moco-default-nmf')})", r.regress("moco-default-nmf"),
         r.match("moco-default-dve", "nmf")]]


def byol_table(r):
    return ["features (channels)", "regression IOD %", "matching same / different identity (70x70 px)"], [
        ["mean training shape (no features)", r.mean_shape("byol-default-hypercol"), ""],
        [f"random-init hypercolumn ({r.channels('byol-random-hypercol')}), `--epochs 0`",
         r.regress("byol-random-hypercol"), r.match("byol-random-dve", "hypercol")],
        [f"BYOL hypercolumn ({r.channels('byol-default-hypercol')})", r.regress("byol-default-hypercol"),
         r.match("byol-default-dve", "hypercol")],
        [f"NMF of the BYOL hypercolumn ({r.channels('byol-default-nmf')})", r.regress("byol-default-nmf"),
         r.match("byol-default-dve", "nmf")],
        [f"LEAD compact ({r.channels('byol-default-compact')})", r.regress("byol-default-compact"),
         r.match("byol-default-dve", "compact")],
        ["LEAD compact distilled from the random hypercolumn (`--epochs 0`: stage 2 still trains)",
         r.regress("byol-random-compact"), r.match("byol-random-dve", "compact")]]


def equiv_table(r):
    runs = (("equiv-default", "features"), ("equiv-default", "end2end_features"), ("equiv-untrained", "features"))
    ridge = ("default-heatmaps", "default-end2end_heatmaps", "untrained-heatmaps")
    return ["", "two-step", "end to end", "untrained", "paper"], [
        ["Acc(15 px at 96 px = the paper's 20 px at 128 px), rotation +-30 deg + elastic",
         *[r.acc(name, f, 15) for name, f in runs], "0.87 vs 0.57 (BBC Pose, Fig. 2)"],
        ["Acc(5 px)", *[r.acc(name, f, 5) for name, f in runs], ""],
        ["matching error, same / different identity (70x70 frame, match.py dve)",
         *[r.match(name, f) for name, f in runs], ""],
        ["ridge IOD % from K = 10 discovered landmarks, 500 training faces",
         *[r.regress(f"equiv-{n}") for n in ridge], ""],
        ["ridge IOD % from K = 30 (`--equiv-k 30`; stage 2 on the same stage 1)",
         r.regress("equiv-k30-heatmaps"), r.regress("equiv-k30-end2end_heatmaps"), "", ""]]


def oracle_table(r):
    with open(os.path.join(r.runs, "tables", "oracle.txt")) as f:  # bench_oracle.py's `name: value unit` lines
        v = {k: float(x.split()[0]) for k, x in (line.split(":", 1) for line in f if ":" in line)}

    def pair(name, line):
        return f"{v[f'match_{name}_dve_{line}']:.3f} / {v[f'match_{name}_contrastlandmark_{line}']:.3f}"
    return ["features", "regression IOD % (px)", "matching same identity, 70x70 px (dve / contrastlandmark)",
            "different identity"], [
        ["oracle", f"{v['regress_oracle_iod']:.2f} ({v['regress_oracle_error']:.2f} px)", pair("oracle", "same"),
         pair("oracle", "different")],
        ["random", f"{v['regress_random_iod']:.2f} ({v['regress_random_error']:.2f} px)",
         f"{v['match_random_dve_same']:.2f}", f"{v['match_random_dve_different']:.2f}"]]


TABLES = {"moco": (moco_steps, moco_table), "byol": (byol_steps, byol_table), "equiv": (equiv_steps, equiv_table),
          "oracle": (oracle_steps, oracle_table)}


# ---------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------
def command(argv, runs, quick):
    """A step's full argv after `python`: --quick's settings right after a training script's name (the table's
    own flags win) or at the end of an evaluation's (they shorten it), then --runs-dir unless it is runs/."""
    script, flags, small = argv[0], argv[1:], QUICK.get(argv[0], []) if quick else []
    where = [] if runs == "runs" else ["--runs-dir", runs]  # runs/ is every script's default
    if script == "tests/bench_oracle.py":
        return argv
    if script in ("regress.py", "match.py"):
        return [script, *flags, *small, *where]
    return [script, *small, *flags, *where]


def run_step(argv, done, runs, quick, dry_run):
    """Run one step unless its output exists (or only print it, with --dry-run)."""
    exists = os.path.exists(os.path.join(ROOT, runs, done)) and not dry_run
    if argv[0] == "copy":
        source, target = (os.path.join(runs, path) for path in argv[1:])
        print(f"$ mkdir -p {os.path.dirname(target)} && cp {source} {target}" + "    # done" * exists)
        if not dry_run and not exists:
            os.makedirs(os.path.dirname(os.path.join(ROOT, target)), exist_ok=True)
            shutil.copyfile(os.path.join(ROOT, source), os.path.join(ROOT, target))
        return
    if argv[0] == "tests/bench_oracle.py" and quick:
        sys.exit("error: the oracle table has no --quick version (tests/bench_oracle.py is one fixed run)")
    full = command(argv, runs, quick)
    print(f"$ python {' '.join(full)}" + "    # done: its output exists" * exists, flush=True)
    if dry_run or exists:
        return
    if full[0] != "tests/bench_oracle.py":
        subprocess.run([sys.executable, *full], cwd=ROOT, check=True)
        return
    out = subprocess.run([sys.executable, *full], cwd=ROOT, check=True, capture_output=True, text=True).stdout
    print(out, end="")  # the benchmark's `name: value unit` lines, kept for the table
    os.makedirs(os.path.dirname(os.path.join(ROOT, runs, done)), exist_ok=True)
    with open(os.path.join(ROOT, runs, done), "w") as f:
        f.write(out)


def markdown(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("table", choices=list(TABLES), help="which README table to make")
    parser.add_argument("--quick", action=argparse.BooleanOptionalAction, default=False,
                        help="tiny runs that check the plumbing in minutes (their numbers mean nothing)")
    parser.add_argument("--dry-run", action=argparse.BooleanOptionalAction, default=False,
                        help="print the commands without running them")
    parser.add_argument("--runs-dir", default=None, help="where the runs go, relative to the repository "
                        "(default: runs, or runs/quick with --quick)")
    args = parser.parse_args(argv)
    runs = args.runs_dir or ("runs/quick" if args.quick else "runs")
    make_steps, make_table = TABLES[args.table]
    steps = Steps(runs)
    make_steps(steps)
    for step_argv, done in steps.list:
        run_step(step_argv, done, runs, args.quick, args.dry_run)
    if not args.dry_run:
        table = markdown(*make_table(Results(os.path.join(ROOT, runs))))
        print(f"\n{table}")
        return table


if __name__ == "__main__":
    main()
