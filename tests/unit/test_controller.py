"""Controller: registry, dispatch, expiry, heartbeats, relay and the HTTP app (no real processes)."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
from fastapi.testclient import TestClient
from servers import wait_until

from llava_med.errors import LlavaMedError
from llava_med.serve.controller import Controller, create_app, parse_args
from llava_med.serve.protocol import ErrorCode, StreamChunk, WorkerStatus, encode_chunk, iter_chunks


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def status(*models: str, speed: float = 1, queue_length: int = 0) -> WorkerStatus:
    return WorkerStatus(model_names=list(models), speed=speed, queue_length=queue_length)


def run(coro):
    return asyncio.run(coro)


async def _closing(controller: Controller, coro):
    try:
        return await coro
    finally:
        await controller.close()


#: TestClient's client address: a client on the controller's machine (the default, "testclient", is not an IP).
LOCAL = ("127.0.0.1", 50000)


def mock_transport(handler: Callable[[httpx.Request], httpx.Response]) -> httpx.MockTransport:
    return httpx.MockTransport(handler)


def status_handler(statuses: dict[str, WorkerStatus]) -> Callable[[httpx.Request], httpx.Response]:
    """Workers in ``statuses`` answer /worker_get_status; any other host refuses connections."""

    def handler(request: httpx.Request) -> httpx.Response:
        base = f"{request.url.scheme}://{request.url.host}:{request.url.port}"
        if base in statuses and request.url.path == "/worker_get_status":
            return httpx.Response(200, json=statuses[base].model_dump())
        raise httpx.ConnectError("connection refused", request=request)

    return handler


# ------------------------------------------------------------------------------------------------------- dispatch


def test_shortest_queue_picks_least_loaded_and_counts_locally():
    c = Controller("shortest_queue")
    c.add_worker("http://b:1", True, status("m", queue_length=0))
    c.add_worker("http://a:1", True, status("m", queue_length=3))
    c.add_worker("http://c:1", True, status("m", "x", speed=4, queue_length=8))  # 8/4 = 2
    c.add_worker("http://d:1", True, status("other"))
    picks = [c.get_worker_address("m") for _ in range(5)]
    # b: 0,1,2 ; c: 2 (8/4), then 2.25 ; ties broken by name (b < c)
    assert picks == ["http://b:1", "http://b:1", "http://b:1", "http://c:1", "http://c:1"]
    assert c.workers()["http://b:1"].queue_length == 3


def test_shortest_queue_ties_alternate_deterministically():
    c = Controller("shortest_queue")
    c.add_worker("http://w2:1", True, status("m"))
    c.add_worker("http://w1:1", True, status("m"))
    assert [c.get_worker_address("m") for _ in range(4)] == ["http://w1:1", "http://w2:1"] * 2


def test_lottery_is_deterministic_with_injected_rng_and_weighted_by_speed():
    def picks(seed: int, n: int) -> list[str]:
        c = Controller("lottery", rng=random.Random(seed))
        c.add_worker("http://slow:1", True, status("m", speed=1))
        c.add_worker("http://fast:1", True, status("m", speed=3))
        return [c.get_worker_address("m") for _ in range(n)]

    assert picks(7, 50) == picks(7, 50)
    many = picks(1, 4000)
    share = many.count("http://fast:1") / len(many)
    assert 0.7 < share < 0.8


def test_lottery_with_zero_speed_serves_nothing():
    c = Controller("lottery", rng=random.Random(0))
    c.add_worker("http://a:1", True, status("m", speed=0))
    assert c.get_worker_address("m") == ""


@pytest.mark.parametrize("method", ["shortest_queue", "lottery"])
def test_no_worker_for_model(method):
    c = Controller(method)
    assert c.get_worker_address("m") == ""
    c.add_worker("http://a:1", True, status("other"))
    assert c.get_worker_address("m") == ""
    assert c.list_models() == ["other"]


def test_invalid_constructor_arguments():
    with pytest.raises(ValueError, match="dispatch_method"):
        Controller("round_robin")
    with pytest.raises(ValueError, match="heart_beat_expiration"):
        Controller(heart_beat_expiration=0)


# ------------------------------------------------------------------------------------------------------- registry


def test_list_models_sorted_and_unique():
    c = Controller()
    c.add_worker("http://a:1", True, status("zeta", "alpha"))
    c.add_worker("http://b:1", True, status("alpha"))
    assert c.list_models() == ["alpha", "zeta"]


def test_expiry_with_fake_clock():
    clock = FakeClock()
    c = Controller(heart_beat_expiration=30, clock=clock)
    c.add_worker("http://hb:1", True, status("m"))
    c.add_worker("http://manual:1", False, status("m"))  # registered by hand: never expires
    clock.now += 29
    assert c.remove_expired_workers() == []
    assert c.receive_heart_beat("http://hb:1", 2) is True
    clock.now += 29  # 58 s after registration but 29 s after the heartbeat
    assert c.remove_expired_workers() == []
    assert c.workers()["http://hb:1"].queue_length == 2
    clock.now += 2
    assert c.remove_expired_workers() == ["http://hb:1"]
    assert list(c.workers()) == ["http://manual:1"]


def test_heartbeat_exist_true_and_false():
    c = Controller()
    assert c.receive_heart_beat("http://a:1", 0) is False
    c.add_worker("http://a:1", True, status("m"))
    assert c.receive_heart_beat("http://a:1/", 4) is True  # trailing slash tolerated
    assert c.workers()["http://a:1"].queue_length == 4
    c.remove_worker("http://a:1")
    assert c.receive_heart_beat("http://a:1", 0) is False


def test_register_with_null_status_asks_the_worker():
    transport = mock_transport(status_handler({"http://w:1": status("m", speed=2, queue_length=1)}))
    c = Controller(transport=transport)
    got = run(_closing(c, c.register_worker("http://w:1/", True, None)))
    assert got == status("m", speed=2, queue_length=1)
    info = c.workers()["http://w:1"]
    assert (info.model_names, info.speed, info.queue_length, info.check_heart_beat) == (["m"], 2.0, 1, True)


def test_register_with_null_status_refuses_unreachable_worker():
    c = Controller(transport=mock_transport(status_handler({})))
    with pytest.raises(LlavaMedError) as info:
        run(_closing(c, c.register_worker("http://dead:1", True, None)))
    assert info.value.code == ErrorCode.WORKER_UNREACHABLE
    assert "http://dead:1" in str(info.value)
    assert c.workers() == {}


def test_refresh_all_workers_drops_dead_and_updates_live():
    transport = mock_transport(status_handler({"http://live:1": status("m", queue_length=7)}))
    c = Controller(transport=transport)
    c.add_worker("http://live:1", True, status("m"))
    c.add_worker("http://dead:1", False, status("m"))
    removed = run(_closing(c, c.refresh_all_workers()))
    assert removed == ["http://dead:1"]
    assert list(c.workers()) == ["http://live:1"]
    assert c.workers()["http://live:1"].queue_length == 7


def test_aggregated_status_sums_live_workers():
    transport = mock_transport(status_handler({
        "http://a:1": status("m1", speed=1, queue_length=2),
        "http://b:1": status("m2", "m1", speed=2, queue_length=3),
    }))
    c = Controller(transport=transport)
    for name in ("http://a:1", "http://b:1", "http://dead:1"):
        c.add_worker(name, True, status("m1"))
    agg = run(_closing(c, c.worker_api_get_status()))
    assert agg == WorkerStatus(model_names=["m1", "m2"], speed=3, queue_length=5, instance_id=c.instance_id)


# ------------------------------------------------------------------------------------------------------- relay


class _Body(httpx.AsyncByteStream):
    def __init__(self, parts: list[bytes], fail_after: bool = False) -> None:
        self.parts = parts
        self.fail_after = fail_after
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for part in self.parts:
            await asyncio.sleep(0)
            yield part
        if self.fail_after:
            raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")

    async def aclose(self) -> None:
        self.closed = True


def relay(c: Controller, payload: dict | bytes) -> list[StreamChunk]:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()

    async def collect() -> bytes:
        return b"".join([part async for part in c.generate_stream(body)])

    data = run(_closing(c, collect()))
    return list(iter_chunks([data]))


def test_relay_reframes_the_worker_stream():
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen["body"] = json.loads(request.content)
        stream = encode_chunk(StreamChunk(text="P a")) + encode_chunk(StreamChunk(text="P ab", finish_reason="stop"))
        # Split inside a chunk: the relay must still forward whole chunks.
        return httpx.Response(200, stream=_Body([stream[:5], stream[5:20], stream[20:]]))

    c = Controller(transport=mock_transport(handler))
    c.add_worker("http://w:1", True, status("m"))
    chunks = relay(c, {"model": "m", "prompt": "P", "custom_field": 1})
    assert [ch.text for ch in chunks] == ["P a", "P ab"]
    assert seen["body"]["custom_field"] == 1  # the body is forwarded unchanged


def test_relay_without_worker_names_model_and_available_models():
    c = Controller()
    c.add_worker("http://w:1", True, status("other"))
    [chunk] = relay(c, {"model": "m", "prompt": "P"})
    assert chunk.error_code == ErrorCode.CONTROLLER_NO_WORKER
    assert "'m'" in chunk.text and "['other']" in chunk.text


@pytest.mark.parametrize(
    ("payload", "message"),
    [(b"{oops", "not valid JSON"), ({"prompt": "P"}, "model: is required")],
)
def test_relay_bad_requests(payload, message):
    [chunk] = relay(Controller(), payload)
    assert chunk.error_code == ErrorCode.BAD_REQUEST and message in chunk.text


@pytest.mark.parametrize("failure", [httpx.ConnectError, httpx.ConnectTimeout], ids=["refused", "connect-timeout"])
def test_relay_skips_unreachable_worker_and_removes_it(failure):
    """Nothing was sent to a worker it could not connect to: the next worker of the model serves instead."""

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "dead":
            raise failure("cannot connect", request=request)
        return httpx.Response(200, stream=_Body([encode_chunk(StreamChunk(text="P ok", finish_reason="stop"))]))

    c = Controller(transport=mock_transport(handler))
    c.add_worker("http://dead:1", True, status("m"))
    c.add_worker("http://live:1", True, status("m", queue_length=5))  # dead is preferred by queue length
    chunks = relay(c, {"model": "m", "prompt": "P"})
    assert [ch.text for ch in chunks] == ["P ok"]
    assert list(c.workers()) == ["http://live:1"]


def test_relay_all_workers_unreachable():
    c = Controller(transport=mock_transport(status_handler({})))
    c.add_worker("http://dead:1", True, status("m"))
    [chunk] = relay(c, {"model": "m", "prompt": "P"})
    assert chunk.error_code == ErrorCode.WORKER_UNREACHABLE and "http://dead:1" in chunk.text
    assert c.workers() == {}


def test_relay_worker_dies_mid_stream():
    def handler(request: httpx.Request) -> httpx.Response:
        parts = [encode_chunk(StreamChunk(text="P a")), b'{"text": "P a', ]  # cut inside the second chunk
        return httpx.Response(200, stream=_Body(parts, fail_after=True))

    c = Controller(transport=mock_transport(handler))
    c.add_worker("http://w:1", True, status("m"))
    chunks = relay(c, {"model": "m", "prompt": "P"})
    assert chunks[0].text == "P a"
    assert chunks[-1].error_code == ErrorCode.WORKER_UNREACHABLE
    assert "http://w:1" in chunks[-1].text and "RemoteProtocolError" in chunks[-1].text
    assert c.workers() == {}


def test_relay_worker_timeout():
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    c = Controller(transport=mock_transport(handler), api_timeout=1)
    c.add_worker("http://w:1", True, status("m"))
    [chunk] = relay(c, {"model": "m", "prompt": "P"})
    assert chunk.error_code == ErrorCode.CONTROLLER_WORKER_TIMEOUT and "http://w:1" in chunk.text
    assert list(c.workers()) == ["http://w:1"], "a slow worker is not a dead one: heartbeats decide"


def test_relay_forwards_worker_http_errors_as_chunks():
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(500, text="Internal Server Error")

    c = Controller(transport=mock_transport(handler))
    c.add_worker("http://w:1", True, status("m"))
    [chunk] = relay(c, {"model": "m", "prompt": "P"})
    assert chunk.error_code == ErrorCode.INTERNAL_ERROR and "HTTP 500" in chunk.text


# ------------------------------------------------------------------------------------------------------- app


@pytest.fixture
def app_client():
    transport = mock_transport(status_handler({"http://w:1": status("m", queue_length=1)}))
    controller = Controller(transport=transport)
    with TestClient(create_app(controller), client=LOCAL) as client:
        yield client, controller


def test_app_original_endpoints(app_client):
    client, _ = app_client
    r = client.post("/register_worker", json={"worker_name": "http://w:1", "check_heart_beat": True,
                                               "worker_status": {"model_names": ["m"], "speed": 1, "queue_length": 0}})
    assert r.status_code == 200
    assert r.json()["worker_status"]["queue_length"] == 1  # what the worker says, not what the registrant sent
    assert client.post("/list_models").json() == {"models": ["m"]}
    assert client.post("/get_worker_address", json={"model": "m"}).json() == {"address": "http://w:1"}
    assert client.post("/get_worker_address", json={"model": "nope"}).json() == {"address": ""}
    assert client.post("/receive_heart_beat", json={"worker_name": "http://w:1", "queue_length": 0}).json() == {
        "exist": True}
    assert client.post("/receive_heart_beat", json={"worker_name": "http://x:1", "queue_length": 0}).json() == {
        "exist": False}
    status = client.post("/worker_get_status").json()
    assert status == {"model_names": ["m"], "speed": 1.0, "queue_length": 1, "instance_id": status["instance_id"]}
    assert client.post("/refresh_all_workers").status_code == 200
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["workers"] == 1


def test_app_register_with_null_status(app_client):
    client, controller = app_client
    r = client.post("/register_worker", json={"worker_name": "http://w:1", "check_heart_beat": False,
                                               "worker_status": None})
    assert r.status_code == 200 and r.json()["worker_status"]["queue_length"] == 1
    r = client.post("/register_worker", json={"worker_name": "http://dead:1", "check_heart_beat": True,
                                               "worker_status": None})
    assert r.status_code == 400
    assert r.json()["error_code"] == ErrorCode.WORKER_UNREACHABLE and "http://dead:1" in r.json()["message"]
    assert list(controller.workers()) == ["http://w:1"]


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/register_worker", b"{", "not valid JSON"),
        ("/register_worker", b'{"check_heart_beat": true}', "worker_name: is required"),
        ("/receive_heart_beat", b'{"worker_name": "http://w:1", "queue_length": "x"}', "queue_length: must be"),
        ("/get_worker_address", b"{}", "model: is required"),
    ],
)
def test_app_bad_bodies_get_400_with_message(app_client, path, body, message):
    client, _ = app_client
    r = client.post(path, content=body)
    assert r.status_code == 400 and message in r.json()["message"]


def test_app_relay_no_worker_is_one_error_chunk(app_client):
    client, _ = app_client
    r = client.post("/worker_generate_stream", json={"model": "m", "prompt": "x"})
    assert r.status_code == 200
    [chunk] = list(iter_chunks([r.content]))
    assert chunk.error_code == ErrorCode.CONTROLLER_NO_WORKER and "'m'" in chunk.text


def test_app_auth_token():
    controller = Controller(auth_token="s3cret", transport=mock_transport(status_handler({"http://w:1": status("m")})))
    payload = {"worker_name": "http://w:1", "check_heart_beat": True,
               "worker_status": {"model_names": ["m"], "speed": 1, "queue_length": 0}}
    with TestClient(create_app(controller), client=("10.1.2.3", 40000)) as client:  # another host, with the token
        r = client.post("/register_worker", json=payload)
        assert r.status_code == 401 and r.json()["error_code"] == ErrorCode.INVALID_AUTH_KEY
        assert "Authorization: Bearer" in r.json()["message"]
        assert client.post("/register_worker", json=payload,
                           headers={"Authorization": "Bearer wrong"}).status_code == 401
        hb = {"worker_name": "http://w:1", "queue_length": 0}
        assert client.post("/receive_heart_beat", json=hb).status_code == 401
        ok = {"Authorization": "Bearer s3cret"}
        assert client.post("/register_worker", json=payload, headers=ok).status_code == 200
        assert client.post("/receive_heart_beat", json=hb, headers=ok).json() == {"exist": True}
        assert client.post("/refresh_all_workers").status_code == 401  # it makes the controller call every worker
        assert client.post("/refresh_all_workers", headers=ok).status_code == 200
        assert client.post("/list_models").json() == {"models": ["m"]}  # reads stay open


def test_app_expiry_task_runs_in_lifespan():
    controller = Controller(heart_beat_expiration=0.3)
    with TestClient(create_app(controller)) as client:
        controller.add_worker("http://w:1", True, status("m"))
        wait_until(lambda: client.get("/health").json()["workers"] == 0, timeout=5, message="expiry")
        assert controller.workers() == {}
    assert controller._expiry_task is None


def test_parse_args_defaults_and_env(monkeypatch):
    monkeypatch.delenv("LLAVA_MED_AUTH_TOKEN", raising=False)
    args = parse_args([])
    assert (args.host, args.port, args.dispatch_method, args.auth_token) == ("127.0.0.1", 21001, "shortest_queue",
                                                                           None)
    monkeypatch.setenv("LLAVA_MED_AUTH_TOKEN", "tok")
    assert parse_args(["--dispatch-method", "lottery"]).auth_token == "tok"
    with pytest.raises(SystemExit):
        parse_args(["--dispatch-method", "random"])


# ------------------------------------------------------------------------------------------------------- hardening


def test_registration_never_trusts_the_reported_status():
    """A registrant claiming speed 1e9 for a URL: the controller asks the URL itself and uses its answer."""
    honest = status("m", speed=2)
    transport = mock_transport(status_handler({"http://w:1": honest}))
    c = Controller(transport=transport)
    got = run(c.register_worker("http://w:1", False, {"model_names": ["m"], "speed": 1e9}))
    assert got.speed == 2 and c.workers()["http://w:1"].speed == 2
    with pytest.raises(LlavaMedError, match="did not answer"):  # a URL that never answers is never listed
        run(c.register_worker("http://silent:1", False, {"model_names": ["m"], "speed": 1e9}))
    run(c.close())
    assert list(c.workers()) == ["http://w:1"]


@pytest.mark.parametrize("speed", [1e9, float("inf"), -1.0])
def test_a_worker_reporting_an_absurd_speed_is_refused(speed):
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=json.dumps({"model_names": ["m"], "speed": speed}).replace(
            "Infinity", "1e999").encode())

    c = Controller(transport=mock_transport(handler))
    with pytest.raises(LlavaMedError, match="speed"):
        run(_closing(c, c.register_worker("http://w:1", True)))
    assert c.workers() == {}


def instance_handler(statuses: dict[str, WorkerStatus]) -> Callable[[httpx.Request], httpx.Response]:
    """Like status_handler, keyed by host only (every port and spelling of a host reaches the same worker)."""

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host in statuses:
            return httpx.Response(200, json=statuses[request.url.host].model_dump())
        raise httpx.ConnectError("refused", request=request)

    return handler


def test_aliases_of_one_worker_collapse_to_one_entry():
    worker = WorkerStatus(model_names=["m"], instance_id="worker-1")
    hosts = {"127.0.0.1": worker, "localhost": worker}
    c = Controller(transport=mock_transport(instance_handler(hosts)))
    names = ["http://127.0.0.1:9000", "http://localhost:9000", "http://127.1:9000", "http://[::ffff:127.0.0.1]:9000",
             "http://0x7f.0.0.1:9000/"]
    for name in names:
        run(c.register_worker(name, True))
    run(c.close())
    assert list(c.workers()) == ["http://127.0.0.1:9000"]
    assert c.aliases() == {"http://localhost:9000": "http://127.0.0.1:9000"}  # the numeric forms are canonical
    assert c.receive_heart_beat("http://localhost:9000/", 3) is True  # a heartbeat under an alias counts
    assert [c.get_worker_address("m") for _ in range(3)] == ["http://127.0.0.1:9000"] * 3
    c.remove_worker("http://localhost:9000")
    assert c.workers() == {} and c.aliases() == {}


def test_registering_the_controller_itself_is_refused():
    c = Controller()

    def handler(request: httpx.Request) -> httpx.Response:  # the controller's own status, at another address
        return httpx.Response(200, json=WorkerStatus(model_names=[], instance_id=c.instance_id).model_dump())

    c._transport = mock_transport(handler)
    with pytest.raises(LlavaMedError, match="this controller itself"):
        run(_closing(c, c.register_worker("http://localhost:21001", False)))
    assert c.workers() == {}


def test_workers_without_heartbeats_expire_when_they_stop_answering():
    clock = FakeClock()
    alive = {"http://manual:1": status("m", queue_length=4)}
    c = Controller(heart_beat_expiration=30, clock=clock, transport=mock_transport(status_handler(alive)))
    c.add_worker("http://manual:1", False, status("m"))
    assert run(c.poll_unmonitored()) == []  # heard from just now: not asked yet
    clock.now += 16
    assert run(c.poll_unmonitored()) == [] and c.workers()["http://manual:1"].queue_length == 4
    alive.clear()  # it stops answering
    clock.now += 16
    assert run(_closing(c, c.poll_unmonitored())) == ["http://manual:1"]
    assert c.workers() == {}


@pytest.mark.parametrize(
    ("worker_name", "words"),
    [("http://127.0.0.1:9000/?", "query"), ("http://a:1/x?next=http://evil", "query"), ("http://w:1/#x", "fragment"),
     ("http://user:pw@w:1", "user info"), ("file:///etc/passwd", "http(s) URL"), ("http://w:70000", "valid"),
     ("w:1", "http(s) URL")],
)
def test_worker_urls_with_queries_user_info_or_other_schemes_are_refused(app_client, worker_name, words):
    client, controller = app_client
    r = client.post("/register_worker", json={"worker_name": worker_name, "check_heart_beat": False})
    assert r.status_code == 400 and words in r.json()["message"]
    assert controller.workers() == {}


def test_only_local_clients_change_the_registry_without_a_token():
    controller = Controller(transport=mock_transport(status_handler({"http://w:1": status("m")})))
    register = {"worker_name": "http://w:1", "check_heart_beat": True}
    heartbeat = {"worker_name": "http://w:1", "queue_length": 0}
    with TestClient(create_app(controller), client=("192.0.2.7", 40000)) as remote:
        for path, body in (("/register_worker", register), ("/receive_heart_beat", heartbeat),
                           ("/refresh_all_workers", None)):
            r = remote.post(path, json=body)
            assert r.status_code == 401 and "--auth-token" in r.json()["message"]
        assert remote.post("/list_models").json() == {"models": []}  # reads stay open
    with TestClient(create_app(controller), client=("::1", 40000)) as local:
        assert local.post("/register_worker", json=register).status_code == 200
        assert local.post("/receive_heart_beat", json=heartbeat).json() == {"exist": True}


def test_range_errors_are_400_not_403(app_client):
    client, _ = app_client
    r = client.post("/receive_heart_beat", json={"worker_name": "http://w:1", "queue_length": -1})
    assert r.status_code == 400 and r.json()["error_code"] == ErrorCode.PARAM_OUT_OF_RANGE


def test_relay_stops_loops_and_deep_chains():
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen["hops"] = request.headers.get("X-LLaVA-Med-Relay")
        return httpx.Response(200, stream=_Body([encode_chunk(StreamChunk(text="P ok", finish_reason="stop"))]))

    c = Controller(transport=mock_transport(handler))
    c.add_worker("http://w:1", True, status("m"))
    body = json.dumps({"model": "m", "prompt": "P"}).encode()

    async def relay_via(via):
        return b"".join([part async for part in c.generate_stream(body, via)])

    ok = list(iter_chunks([run(relay_via(["parent-controller"]))]))
    assert ok[-1].text == "P ok" and seen["hops"] == f"parent-controller,{c.instance_id}"
    [loop] = list(iter_chunks([run(relay_via(["parent-controller", c.instance_id]))]))
    assert loop.error_code == ErrorCode.RELAY_LOOP and "loop" in loop.text
    [deep] = list(iter_chunks([run(_closing(c, relay_via([f"c{i}" for i in range(8)])))]))
    assert deep.error_code == ErrorCode.RELAY_LOOP and "8 controllers" in deep.text


def test_list_workers_metrics_and_no_docs(app_client):
    client, controller = app_client
    client.post("/register_worker", json={"worker_name": "http://w:1/", "check_heart_beat": True})
    client.post("/worker_generate_stream", json={"model": "nope", "prompt": "x"})
    [entry] = client.get("/list_workers").json()["workers"]
    assert entry["address"] == "http://w:1" and entry["model_names"] == ["m"] and entry["check_heart_beat"]
    text = client.get("/metrics").text
    assert "llava_med_controller_workers 1.0" in text
    assert 'llava_med_controller_errors_total{code="CONTROLLER_NO_WORKER"} 1.0' in text
    assert 'llava_med_controller_registrations_total{outcome="accepted"} 1.0' in text
    assert 'llava_med_controller_worker_queue_length{worker="http://w:1"} 1.0' in text
    assert "llava_med_controller_dispatched_total{" not in text
    # A client that asks for an address talks to that worker itself: a dispatch, like a relay's; a miss is not one.
    assert client.post("/get_worker_address", json={"model": "m"}).json()["address"] == "http://w:1"
    assert client.post("/get_worker_address", json={"model": "nope"}).json()["address"] == ""
    text = client.get("/metrics").text
    assert 'llava_med_controller_dispatched_total{model="m"} 1.0' in text
    assert 'llava_med_controller_dispatched_total{model="nope"}' not in text
    assert client.get("/docs").status_code == 404 and client.get("/openapi.json").status_code == 404
