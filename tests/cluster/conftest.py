"""One small Ray cluster per test module (2 CPUs; rank actors take none), always shut down."""

import pytest
import ray

from cluster.embedded import start_embedded_ray


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    start_embedded_ray(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()
