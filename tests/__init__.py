"""The test suite."""

import pytest

# Shared test helpers get pytest's assertion messages too (they must be registered before import).
pytest.register_assert_rewrite("tests.api_support", "tests.dataset_support")
