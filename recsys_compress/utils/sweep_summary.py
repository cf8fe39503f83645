"""A Hydra callback that records every job of a multirun in ``<sweep dir>/summary.jsonl``.

Hydra's launchers run every job even when one fails and raise the first failure at the end;
this callback makes the outcome of each job visible in one place (job number, overrides,
status, the task's objective or the error) and prints a summary table when the sweep ends.
"""

from __future__ import annotations

import atexit
import json
import logging
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


def _summary_path(config: DictConfig) -> Path:
    return Path(config.hydra.sweep.dir) / "summary.jsonl"


class SweepSummary(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        path = _summary_path(config)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")  # a re-used sweep dir starts a fresh summary
        # Hydra raises a failed job's error at the end of the sweep without calling
        # on_multirun_end; the summary is then printed as the process exits.
        self._summarised = False
        atexit.register(self._summarise, path)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode is None or str(config.hydra.mode) != "RunMode.MULTIRUN":
            return
        failed = job_return.status == JobStatus.FAILED
        record = {
            "job": config.hydra.job.num,
            "overrides": list(job_return.overrides or []),
            "status": "failed" if failed else "completed",
            "output_dir": str(config.hydra.runtime.output_dir),
        }
        if failed:
            error = job_return._return_value  # reading .return_value would re-raise it
            record["error"] = f"{type(error).__name__}: {error}"
        else:
            record["objective"] = job_return._return_value
        with open(_summary_path(config), "a") as f:
            f.write(json.dumps(record, default=str) + "\n")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._summarise(_summary_path(config))

    def _summarise(self, path: Path) -> None:
        if getattr(self, "_summarised", False) or not path.is_file():
            return
        self._summarised = True
        records = [json.loads(line) for line in path.read_text().splitlines() if line]
        failed = [r for r in records if r["status"] == "failed"]
        log.info("sweep finished: %d jobs, %d failed (%s)", len(records), len(failed), path)
        for r in failed:
            log.error("job %s (%s) failed: %s", r["job"], " ".join(r["overrides"]), r.get("error") or "(no error recorded)")
