"""Under CI=true a missing reference fails instead of skipping (tests/conftest.py's hooks)."""

from __future__ import annotations

from pathlib import Path

import pytest

CONFTEST = (Path(__file__).parent / "conftest.py").read_text(encoding="utf-8")
SAMPLE = '''
import pytest

def test_missing_reference():
    pytest.skip("llama_cpp is not installed")

@pytest.mark.gpu
@pytest.mark.skipif(True, reason="needs a CUDA GPU")
def test_cuda_only():
    pass

def test_present():
    assert True
'''


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(CONFTEST)
    pytester.makeini("[pytest]\nmarkers =\n    gpu: needs CUDA\n")
    module_skip = "import pytest\npytest.importorskip('no_such_reference_lib')\n"
    pytester.makepyfile(test_sample=SAMPLE, test_module_skip=module_skip)
    return pytester


@pytest.mark.parametrize("ci", ["true", "1"])
def test_a_skip_is_a_failure_in_ci(suite, monkeypatch, ci):
    monkeypatch.setenv("CI", ci)
    result = suite.runpytest_subprocess("-p", "no:cacheprovider", "test_sample.py")
    result.assert_outcomes(passed=1, failed=1, skipped=1)  # the gpu test alone may skip
    result.stdout.fnmatch_lines(["*skipped under CI=true*llama_cpp is not installed*"])
    whole = suite.runpytest_subprocess("-p", "no:cacheprovider")  # a module-level skip stops the run
    assert whole.ret != 0
    whole.stdout.fnmatch_lines(["*skipped under CI=true*no_such_reference_lib*"])


def test_locally_a_skip_stays_a_skip(suite, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    result = suite.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, skipped=3)
