from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("RECSYS_DATA_ROOT", REPO.parent / "shared" / "data"))
SMALL = REPO / "data" / "ml-latest-small"
SHARED_MODELS = SHARED_DATA.parent / "models"


def pytest_configure(config):
    # Under pytest-xdist each worker (and the train.py subprocesses it starts, through the
    # environment) gets its share of the cores: torch's default of one thread per core in every
    # worker oversubscribes them.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = str(max(1, (os.cpu_count() or 1) // workers))
        os.environ.setdefault("OMP_NUM_THREADS", threads)
        os.environ.setdefault("MKL_NUM_THREADS", threads)
    # Every RecBole-format and SmolLM2 test reads these; without them the suite would fail in a
    # hundred places with errors that do not say why.
    missing = [p for p in (SHARED_DATA / "ml-100k", SHARED_DATA / "ml-1m", SHARED_MODELS) if not p.is_dir()]
    if missing:
        raise pytest.UsageError(
            f"test data not found: {', '.join(map(str, missing))}. Put the project's shared/ folder beside the "
            "repository (../shared/data, ../shared/models) or set RECSYS_DATA_ROOT to its data folder.")


SMOLLM2_GGUF = SHARED_MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_folder(tmp_path_factory) -> Path:
    """SmolLM2-135M converted from its GGUF to a safetensors folder once per test session (a
    conversion takes ~45 s): xdist workers share one folder, the first converts under a lock."""
    import fcntl

    from recsys_compress.models.gguf_cache import convert_gguf

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the folder above every worker's own
    (root / "smollm2_cache").mkdir(exist_ok=True)
    with open(root / "smollm2_cache.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return convert_gguf(SMOLLM2_GGUF, root / "smollm2_cache")


def head_lines(src: Path, dst: Path, n: int) -> Path:
    """Copy the first ``n`` lines of ``src`` byte for byte (CRLF stays CRLF)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as f, open(dst, "wb") as g:
        for _ in range(n):
            line = f.readline()
            if not line:
                break
            g.write(line)
    return dst


@pytest.fixture
def ml100k_slice(tmp_path: Path) -> Path:
    folder = tmp_path / "ml-100k"
    head_lines(SHARED_DATA / "ml-100k" / "ml-100k.inter", folder / "ml-100k.inter", 3001)
    head_lines(SHARED_DATA / "ml-100k" / "ml-100k.item", folder / "ml-100k.item", 2000)
    head_lines(SHARED_DATA / "ml-100k" / "ml-100k.user", folder / "ml-100k.user", 1000)
    return folder


@pytest.fixture
def ml1m_slice(tmp_path: Path) -> Path:
    folder = tmp_path / "ml-1m"
    head_lines(SHARED_DATA / "ml-1m" / "ml-1m.inter", folder / "ml-1m.inter", 3001)
    head_lines(SHARED_DATA / "ml-1m" / "ml-1m.item", folder / "ml-1m.item", 5000)
    head_lines(SHARED_DATA / "ml-1m" / "ml-1m.user", folder / "ml-1m.user", 7000)
    return folder


class KillAfterEpoch:
    """A Lightning callback (instantiated by Hydra from `+callbacks.kill`) that dies mid-run,
    as a pre-empted job would, once epoch ``epoch`` has been checkpointed. A run resumed from a
    checkpoint (with the run's own config, which names this callback too) is not killed again."""

    def __new__(cls, epoch: int):
        import lightning as L

        class _Kill(L.Callback):
            def on_train_epoch_start(self, trainer, pl_module):
                if trainer.current_epoch == epoch and trainer.ckpt_path is None:
                    raise RuntimeError(f"killed at the start of epoch {epoch}")

        return _Kill()


class SigtermAtEpoch:
    """A Lightning callback that sends SIGTERM (or ``signal_name``, e.g. SIGINT: Ctrl-C) to its
    own process at the start of epoch ``epoch``, as a scheduler pre-empting the job (or a user)
    would; once (``marker`` remembers it), so a resumed run with the same config runs on."""

    def __new__(cls, epoch: int, marker: str, signal_name: str = "SIGTERM"):
        import os
        import signal

        import lightning as L

        class _Signal(L.Callback):
            def on_train_epoch_start(self, trainer, pl_module):
                if trainer.current_epoch == epoch and not os.path.exists(marker):
                    open(marker, "w").close()
                    if signal_name == "SIGINT" and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
                        # A process started in the background by a non-interactive shell (a suite
                        # run with `&`) inherits SIGINT ignored, and Python then installs no
                        # KeyboardInterrupt handler; a user's terminal has one.
                        signal.signal(signal.SIGINT, signal.default_int_handler)
                    os.kill(os.getpid(), getattr(signal, signal_name))

        return _Signal()


def run_train(args, cwd=None, timeout=600, **env):
    """``python train.py ARGS`` as a user runs it; tests/ on the path for conftest's callbacks."""
    import subprocess
    import sys

    tests = str(Path(__file__).resolve().parent)
    environment = {k: v for k, v in os.environ.items() if k != "PROJECT_ROOT"}  # train.py sets it
    path = os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH")) if p)  # keep a caller's path
    environment.update({"WANDB_MODE": "offline", "PYTHONPATH": path, **env})
    script = Path(cwd) / "train.py" if cwd else REPO / "train.py"
    return subprocess.run([sys.executable, str(script), *args], cwd=cwd or REPO, capture_output=True,
                          text=True, env=environment, timeout=timeout)


def left_padded_batches(n: int, seed: int, n_items: int, max_len: int, rows: int = 16) -> list[dict]:
    """Item histories of every length from 1 to ``max_len``, left-padded as the datamodule pads them."""
    import torch

    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        ids = torch.randint(1, n_items + 1, (rows, max_len), generator=g)
        mask = (torch.arange(max_len) >= torch.randint(0, max_len, (rows, 1), generator=g)).long()
        batches.append({"input_ids": ids * mask, "attention_mask": mask})
    return batches


def odllm_on_random_statistics(model, ratio: float = 0.5):
    """``model`` compressed by odllm at ``ratio`` from Gaussian input statistics (the export
    tests need low-rank factors, not good ones)."""
    import torch

    from recsys_compress.compression.apply import compress_low_rank
    from recsys_compress.compression.calibration import InputStats, select_linear_layers

    names = select_linear_layers(model)
    stats = {}
    for n in names:
        x = torch.randn(200, model.get_submodule(n).in_features, dtype=torch.float64)
        stats[n] = InputStats(x.T @ x, x.abs().sum(0), 200)
    compress_low_rank(model, names, "odllm", ratio, stats)
    return model
