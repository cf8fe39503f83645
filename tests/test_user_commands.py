"""The commands a user types work as written, and no run is silently wrong.

Each test runs `train.py` as a process, as a user or a scheduler does: the README's multirun
from a copy of the repo without `hydra.sweep.dir`, SIGTERM and resume, a rerun into a
finished run, bad input that must fail with one clear message.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, run_train

TINY = ["model.hidden_size=16", "model.intermediate_size=32", "dataset.max_len=20", "logger=none",
        "evaluation.popularity_baseline=false"]
# The README's quick multirun, exactly as printed there (the test fails if the README changes it).
README_MULTIRUN = "python3 train.py -m compression=svd,odllm ratio=0.5,0.7 trainer.max_epochs=1"


def copy_of_repo(tmp_path: Path) -> Path:
    """What a user's clone holds that train.py reads (the package itself is installed)."""
    root = tmp_path / "repo"
    shutil.copytree(REPO / "conf", root / "conf")
    shutil.copytree(REPO / "data", root / "data")
    shutil.copy(REPO / "train.py", root / "train.py")
    return root


def test_the_readme_multirun_runs_as_typed_from_the_repo_root(tmp_path):
    assert f"    {README_MULTIRUN}   #" in (REPO / "README.md").read_text()
    root = copy_of_repo(tmp_path)
    args = README_MULTIRUN.split()[2:]  # after "python3 train.py"
    out = run_train(args, cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    sweeps = list((root / "outputs" / "train" / "multiruns").iterdir())
    assert len(sweeps) == 1
    records = [json.loads(line) for line in (sweeps[0] / "summary.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["completed"] * 4
    jobs = {tuple(r["overrides"][:2]): json.loads((Path(r["output_dir"]) / "metrics.json").read_text())
            for r in records}
    assert set(jobs) == {(f"compression={m}", f"ratio={r}") for m in ("svd", "odllm") for r in (0.5, 0.7)}
    assert sorted(m["base/cache_hit"] for m in jobs.values()) == [0, 1, 1, 1]  # one base model
    assert {m["compression/ratio"] for m in jobs.values()} == {0.5, 0.7}


def test_sigterm_exits_143_and_resume_continues_with_the_runs_own_config(tmp_path):
    run = tmp_path / "run"
    marker = tmp_path / "sigterm-sent"
    started = run_train([*TINY, "trainer.max_epochs=3", "+callbacks.sigterm._target_=conftest.SigtermAtEpoch",
                         "+callbacks.sigterm.epoch=2", f"+callbacks.sigterm.marker={marker}",
                         f"hydra.run.dir={run}"])
    assert marker.is_file()
    assert started.returncode == 143, started.stderr[-3000:]  # not 0: a scheduler must see the interruption
    assert (run / "error.txt").read_text().startswith("interrupted by SIGTERM")
    assert (run / "checkpoints" / "last.ckpt").is_file() and not (run / "metrics.json").exists()

    # The README's resume line, nothing else: the run's 3 epochs and tiny model come from the run.
    resumed = run_train([f"hydra.run.dir={run}", "resume=auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stdout + resumed.stderr
    # once: Lightning's own console handler would print every Lightning line a second time
    assert log.count(f"Restored all states from the checkpoint at {run / 'checkpoints' / 'last.ckpt'}") == 1, log
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train/epochs"] == 3 and metrics["params/total"] < 200_000  # 16-wide; the default 64-wide has 754k
    assert "max_epochs: 3" in (run / ".hydra" / "config.yaml").read_text()
    assert not (run / "error.txt").exists()


def test_ctrl_c_is_one_line_saying_where_the_checkpoint_is_and_exits_130(tmp_path):
    run = tmp_path / "run"
    marker = tmp_path / "sigint-sent"
    out = run_train([*TINY, "trainer.max_epochs=3", "+callbacks.sigint._target_=conftest.SigtermAtEpoch",
                     "+callbacks.sigint.epoch=1", f"+callbacks.sigint.marker={marker}",
                     "+callbacks.sigint.signal_name=SIGINT", f"hydra.run.dir={run}"])
    assert marker.is_file()
    text = out.stdout + out.stderr
    assert out.returncode == 130, text[-3000:]
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_file() and not (run / "metrics.json").exists()
    assert (f"interrupted by Ctrl-C: its last checkpoint is {last}; continue with: python3 train.py "
            f"hydra.run.dir={run} resume=auto") in text
    assert "Traceback" not in text and "SystemExit" not in text, text[-3000:]
    assert (run / "error.txt").read_text().startswith("interrupted by Ctrl-C")


def test_a_run_folder_that_is_a_file_or_unwritable_fails_in_one_line(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    for key, args in [("hydra.run.dir", []), ("hydra.sweep.dir", ["-m", "ratio=0.3,0.5"])]:
        out = run_train([*args, f"{key}={blocker / 'run'}"])
        text = out.stdout + out.stderr
        assert out.returncode == 1
        assert text.strip() == (f"error: cannot write the run outputs to {key}={blocker / 'run'}: {blocker} is a "
                                f"file, not a folder; choose another folder with {key}=PATH"), text[-3000:]
    # read-only disk or folder (as root nothing is read-only here: the refusal is simulated)
    from recsys_compress.utils.output_dir_check import check_writable_folder

    def refused(self, *a, **k):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refused)
    with pytest.raises(SystemExit) as refusal:
        check_writable_folder(tmp_path / "ro", "hydra.run.dir")
    assert str(refusal.value) == (f"error: cannot write the run outputs to hydra.run.dir={tmp_path / 'ro'}: permission "
                                  f"denied ({tmp_path / 'ro'}); choose another folder with hydra.run.dir=PATH")
    monkeypatch.undo()  # an existing folder without write access (a read-only mount)
    (tmp_path / "mounted").mkdir()
    monkeypatch.setattr("os.access", lambda path, mode: False)
    with pytest.raises(SystemExit) as refusal:
        check_writable_folder(tmp_path / "mounted", "hydra.run.dir")
    assert str(refusal.value).endswith(f"hydra.run.dir={tmp_path / 'mounted'}: it is not writable; choose another "
                                       "folder with hydra.run.dir=PATH")


def test_a_wrong_value_is_refused_before_torch_lightning_or_transformers_load(tmp_path):
    """The runner validates the config before it imports a task: a typo fails in seconds (the
    heavy imports took ~10 of the 12.5 s a refusal took)."""
    import sys

    script = ("import sys\n"
              "from recsys_compress.tasks.runner import run_task\n"
              "from recsys_compress.schema import ConfigError\n"
              "from recsys_compress.tasks.compose import compose_config\n"
              f"cfg = compose_config(['compression=odllm', 'ratio=0'], {str(tmp_path / 'run')!r})\n"
              "try:\n    run_task(cfg)\nexcept ConfigError as e:\n    print('refused:', e)\n"
              "print(sorted(m for m in ('torch', 'lightning', 'transformers') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.stdout.splitlines() == ["refused: ratio=0.0 is out of range; allowed: (0, 1] (the fraction of "
                                       "targeted parameters kept)", "[]"], out.stdout + out.stderr[-2000:]


def test_resume_auto_on_a_folder_without_a_run_says_it_starts_a_new_one(tmp_path, caplog):
    from recsys_compress.tasks.compose import compose_config
    from recsys_compress.utils.run_dir import prepare_run_dir

    folder = tmp_path / "typo"
    with caplog.at_level("WARNING"):
        prepare_run_dir(compose_config(["resume=auto"], folder))
    assert (f"resume=auto: {folder} holds no run to continue (no run_config.yaml); starting a new run there"
            in caplog.text)


def test_a_rerun_into_a_finished_run_is_refused_and_resume_refuses_an_override_that_changes_it(tmp_path):
    run = tmp_path / "run"
    first = run_train([*TINY, "trainer.max_epochs=1", f"hydra.run.dir={run}"])
    assert first.returncode == 0, first.stderr[-3000:]
    before = (run / "metrics.json").read_bytes()
    again = run_train([*TINY, "trainer.max_epochs=2", f"hydra.run.dir={run}"])
    assert again.returncode == 1
    message = again.stdout + again.stderr
    assert f"the run directory {run} already holds a run: metrics.json (a finished run)" in message
    assert "Choose another hydra.run.dir" in message and "or add resume=auto to continue that run" in message
    assert (run / "metrics.json").read_bytes() == before
    assert not any("-v1" in p.name for p in (run / "checkpoints").iterdir())  # no second run's files mixed in

    resumed = run_train([f"hydra.run.dir={run}", "resume=auto", "trainer.max_epochs=4", "logger=none"])
    assert resumed.returncode == 1
    assert ("these overrides would change it: trainer.max_epochs=4 (the run has trainer.max_epochs=1)"
            in resumed.stdout + resumed.stderr)
    assert (run / "metrics.json").read_bytes() == before


def test_a_config_error_prints_its_message_once_without_a_traceback(tmp_path):
    # (Each error's message is tested in test_config.py; this is what the command line shows.)
    message = "ConfigError: ratio=7.0 is out of range; allowed: (0, 1]"
    out = run_train(["ratio=7", f"hydra.run.dir={tmp_path / 'run'}"])
    text = out.stdout + out.stderr
    assert out.returncode == 1
    assert text.count(message) == 1, text[-3000:]
    assert "Traceback" not in text
    assert not (tmp_path / "run").exists()  # the message was the answer: no empty run folder left behind
    # a refused command in a folder that holds a run keeps everything there
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "notes.txt").write_text("mine")
    assert run_train(["ratio=7", f"hydra.run.dir={tmp_path / 'kept'}"]).returncode == 1
    assert (tmp_path / "kept" / "notes.txt").read_text() == "mine"
    assert (tmp_path / "kept" / "error.txt").read_text().startswith(message)


def test_make_uses_python3_and_lists_its_targets():
    dry = subprocess.run(["make", "-n", "test"], cwd=REPO, capture_output=True, text=True)
    assert dry.stdout.strip() == "python3 -m pytest"
    listed = subprocess.run(["make", "help"], cwd=REPO, capture_output=True, text=True)
    assert listed.returncode == 0
    targets = re.findall(r"^([a-z][a-z0-9-]*):.*##", (REPO / "Makefile").read_text(), flags=re.M)
    assert len(targets) > 10
    for target in targets:
        assert re.search(rf"^  {re.escape(target)} +\S", listed.stdout, flags=re.M), target
