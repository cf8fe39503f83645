"""experiments/mutation_check.py's fault list follows the code: each fault's text is in its file
exactly once and each test it names exists (checked here in a second; the faults themselves
run in CI's mutation check)."""

import re

import pytest

from conftest import REPO

import mutation_check


@pytest.mark.parametrize("fault", mutation_check.FAULTS, ids=lambda f: f.name)
def test_each_fault_applies_to_its_file_once_and_names_existing_tests(fault):
    assert (REPO / fault.file).read_text().count(fault.old) == 1, f"{fault.file} no longer holds {fault.old!r}"
    for test in fault.tests:
        path, _, name = test.partition("::")
        assert re.search(rf"^def {re.escape(name)}\(", (REPO / path).read_text(), flags=re.M), test
