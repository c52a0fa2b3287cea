# Fixtures that start real servers live in tests/fixtures/, one module per component, loaded here (pytest only
# accepts pytest_plugins in the top-level conftest).
import importlib.util
import os

pytest_plugins = [
    name
    for name in (
        "tests.fixtures.s3",
        "tests.fixtures.mlflow_server",
        "tests.fixtures.ray_cluster",
        "tests.fixtures.postgres",
    )
    if importlib.util.find_spec(name) is not None
]

# The container stack test builds images and runs a compose stack (minutes): only `make test-stack` collects it.
collect_ignore = [] if os.environ.get("AEFORGE_STACK_TEST") else ["tests/stack"]
