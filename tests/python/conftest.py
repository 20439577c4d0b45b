import pytest


def pytest_collection_modifyitems(config, items):
    # Tests without a size marker are unit tests.
    for item in items:
        if not any(item.get_closest_marker(m) for m in ("gpu", "model", "e2e", "engine")):
            item.add_marker(pytest.mark.unit)
