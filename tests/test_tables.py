"""docs/tables.py, the one command behind each README results table: its plumbing, end to end, at --quick size."""
import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("tables", os.path.join(ROOT, "docs", "tables.py"))
tables_module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tables_module)


def tables(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "docs", "tables.py"), *args], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout


@pytest.mark.slow
def test_the_moco_table_runs_every_command_then_skips_them_and_prints_the_same_table(tmp_path):
    first = tables("moco", "--quick", "--runs-dir", str(tmp_path))
    table = first[first.index("\n| features"):].strip().splitlines()
    assert len(table) == 2 + 6  # header, separator and the README's six rows
    assert table[2].startswith("| mean training shape (no features) | ")
    for row in table[3:]:  # every row has its regression number (the layers row has four)
        assert row.split(" | ")[1].replace(" / ", "").replace(".", "").isdigit(), row
    assert "| MoCo + projector (8) | " in first  # channels are read from the exports (--proj-dim 8 at --quick)
    second = tables("moco", "--quick", "--runs-dir", str(tmp_path))
    commands = [line for line in second.splitlines() if line.startswith("$ python")]
    assert len(commands) == 12 and all(line.endswith("# done: its output exists") for line in commands)
    assert second[second.index("\n| features"):].strip().splitlines() == table


def test_dry_run_only_prints_the_commands_each_regression_with_the_one_set_of_flags(tmp_path):
    out = tables("byol", "--dry-run", "--runs-dir", str(tmp_path / "runs"))
    regressions = [line for line in out.splitlines() if line.startswith("$ python regress.py")]
    assert len(regressions) == 5
    for line in regressions:  # the features file, then REGRESS, then the row's own flags: no other training flags
        after_features = line.split(" --features ")[1].split(" ", 1)[1]
        assert after_features.startswith(" ".join(tables_module.REGRESS + ["--"]).strip()), line
        assert "--optim" not in line and "--epochs" not in line and "--lr" not in line, line
    assert not os.path.exists(tmp_path / "runs")  # nothing ran
