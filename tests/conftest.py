import os

import torch

# Triton reads this when kernels are decorated, so it must be set before any kernel import. The
# interpreter is the default only without a CUDA device: on a GPU the compiled kernels run (what
# tests/gpu checks). An explicit TRITON_INTERPRET in the environment always wins, and a process
# has one setting: on a GPU machine run the CPU interpreter tests separately, with TRITON_INTERPRET=1.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The embedded default model, converted once into the user cache (about 20 s the first time)."""
    from longctx.train.build import default_model_dir

    return default_model_dir()


def pytest_runtest_logreport(report):
    """With LONGCTX_FAILURES_TO=<file> (bench/gpu_suite.sh sets it), each failing test's report is
    appended to that file the moment it fails: a suite step that `timeout` kills before pytest's
    own summary still leaves what failed and why."""
    path = os.environ.get("LONGCTX_FAILURES_TO")
    if path and report.failed:
        with open(path, "a") as f:
            f.write(f"=== {report.nodeid} ({report.when}) FAILED after {report.duration:.1f}s\n{report.longreprtext}\n\n")
