"""One small Ray cluster per test module (2 CPUs; rank actors take none), always shut down."""

import pytest
import ray


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
