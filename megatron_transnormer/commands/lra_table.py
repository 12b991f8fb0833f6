"""Collect finished Long-Range Arena runs into the paper's table.

    python tools/lra_table.py RUN_DIR [RUN_DIR ...]
    python tools/lra_table.py runs/lra_*

Each run directory holds test_result.json, written at the end of training (configs/lra/,
launch/lra.slurm): the test accuracy of the checkpoint with the best validation accuracy.
Prints, in markdown, the test accuracy per task and the paper's average (over ListOps,
Text, Retrieval, Image, Pathfinder) for T1 and T2 beside the published numbers, then the
runs it was drawn from. A directory without a result, or a malformed one, is an error
naming it (exit code 2).
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lra_table.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories of LRA runs")
    args = parser.parse_args(argv)
    from megatron_transnormer.evaluation.tables import TableError, lra_table, read_lra_run
    from megatron_transnormer.training.cli import report_error
    try:
        runs = [read_lra_run(d) for d in args.run_dirs]
    except TableError as e:
        return report_error("lra_table.py", 2, str(e), e)
    print(lra_table(runs), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
