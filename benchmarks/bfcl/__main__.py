"""python -m benchmarks.bfcl --out bfcl.jsonl [--limit N ...]: a job file from the BFCL multi-turn traces."""

import argparse

from benchmarks.bfcl.jobfile import add_bfcl_arguments, run_bfcl

ap = argparse.ArgumentParser(description=__doc__)
add_bfcl_arguments(ap)
raise SystemExit(run_bfcl(ap.parse_args()))
