import pytest

from tests.support.redis_server import RedisServer


@pytest.fixture(scope="module")
def redis_url():
    server = RedisServer()
    server.start()  # fails the test (never skips) when no server can start
    yield server.url
    server.close()


@pytest.fixture
def own_redis():
    server = RedisServer()
    server.start()
    yield server
    server.close()
