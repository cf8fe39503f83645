"""Kept so that the commands recorded in BENCHMARKS.md run as written: the tool itself is
`recsys-evaluate-codes` (`recsys_compress/tasks/evaluate_codes.py`)."""

from recsys_compress.tasks.evaluate_codes import main

if __name__ == "__main__":
    raise SystemExit(main())
