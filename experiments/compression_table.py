"""Kept so that the commands recorded in BENCHMARKS.md run as written: the tool itself is
`recsys-compression-table` (`recsys_compress/tasks/compression_table.py`)."""

from recsys_compress.tasks.compression_table import main

if __name__ == "__main__":
    raise SystemExit(main())
