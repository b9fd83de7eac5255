"""The tiny BTX plan on local CPU ranks, timed.

    python benchmarks/btx_plan.py [plan overrides ...]

Runs `moectl btx run configs/btx/tiny.yaml` in a temporary runs directory and prints, from the
plan's report:
  plan_wall_s          the whole plan (data, seed, branches, mix, finetune, evaluation)
  branches_wall_s      first branch started -> last branch finished
  branches_sum_s       the branches' own times added up
  branch_parallelism   branches_sum_s / branches_wall_s (1.0 = branches ran one after another)
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(overrides: list[str]) -> int:
    with tempfile.TemporaryDirectory(prefix="btx-bench-") as runs:
        cmd = [
            sys.executable,
            "-m",
            "launch.cli",
            "btx",
            "run",
            "configs/btx/tiny.yaml",
            *overrides,
            "--runs",
            runs,
        ]
        done = subprocess.run(cmd, cwd=REPO, text=True, capture_output=True)
        if done.returncode != 0:
            print(done.stdout[-4000:], done.stderr[-4000:], sep="\n")
            return done.returncode
        report = json.loads(next(Path(runs).glob("btx-*/btx_report.json")).read_text())
    t = report["timing"]
    print(f"plan_wall_s={t['plan_wall_s']}")
    print(f"branches_wall_s={t['branches_wall_s']}")
    print(f"branches_sum_s={t['branches_sum_s']}")
    print(f"branch_parallelism={t['branch_parallelism']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
