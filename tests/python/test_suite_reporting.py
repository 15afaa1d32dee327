"""How this suite reports what it could not run (conftest.py): a missing dependency skips with its
reason listed, fails instead when CI=true, and a file whose tests all skipped exits with ctest's
SKIP_RETURN_CODE. Each case runs pytest on a small test file of its own, in a subprocess."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, Tuple

import pytest

from conftest import ALL_SKIPPED_EXIT

HERE = Path(__file__).resolve().parent

MISSING = '''
from conftest import need_module
need_module("mapl_no_such_module")

def test_never_runs():
    pass
'''

PARTLY_SKIPPED = '''
import pytest
from conftest import need_module

def test_runs():
    pass

def test_needs_what_is_missing():
    need_module("mapl_no_such_module")
'''


def run_pytest(directory: Path, source: str, ci: str) -> Tuple[int, str]:
    """pytest -rs on `source` as a test file next to a copy of this suite's conftest.py."""
    shutil.copy(HERE / "conftest.py", directory / "conftest.py")
    (directory / "test_case.py").write_text(source)
    env: Dict[str, str] = dict(os.environ)
    env.pop("CI", None)
    if ci:
        env["CI"] = ci
    r = subprocess.run([sys.executable, "-m", "pytest", "-rs", "-q", "-p", "no:cacheprovider",
                        str(directory / "test_case.py")], capture_output=True, text=True,
                       env=env, cwd=directory, timeout=120)
    return r.returncode, r.stdout + r.stderr


def test_a_file_whose_tests_all_skip_is_reported_as_skipped(short_tmp: Path):
    code, out = run_pytest(short_tmp, MISSING, ci="")
    assert code == ALL_SKIPPED_EXIT, out
    # -rs names the skip and its reason.
    assert "SKIPPED" in out and "cannot import mapl_no_such_module" in out, out


def test_ci_fails_on_a_missing_dependency(short_tmp: Path):
    code, out = run_pytest(short_tmp, MISSING, ci="true")
    assert code not in (0, ALL_SKIPPED_EXIT), out
    assert "CI=true" in out and "mapl_no_such_module" in out, out


def test_a_partly_skipped_file_passes_and_lists_the_skip(short_tmp: Path):
    code, out = run_pytest(short_tmp, PARTLY_SKIPPED, ci="")
    assert code == 0, out
    assert "1 passed, 1 skipped" in out and "mapl_no_such_module" in out, out
    code, out = run_pytest(short_tmp, PARTLY_SKIPPED, ci="true")
    assert code == 1 and "1 failed, 1 passed" in out, out


@pytest.mark.parametrize("value", ["false", "1", ""])
def test_only_ci_true_turns_skips_into_failures(short_tmp: Path, value: str):
    code, out = run_pytest(short_tmp, MISSING, ci=value)
    assert code == ALL_SKIPPED_EXIT, out


def test_a_file_without_tests_is_not_reported_as_skipped(short_tmp: Path):
    code, out = run_pytest(short_tmp, "import conftest\n", ci="")
    assert code == pytest.ExitCode.NO_TESTS_COLLECTED, out
