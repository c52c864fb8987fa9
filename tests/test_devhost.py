"""tools.devhost against a real Azurite (session fixture), with the tiny apps in tests/devhost_apps."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime

import azure.functions as func
import pytest
from azure.storage.queue import QueueClient

from tests.devhost_apps import http_app, queue_app, timer_app
from tools.azurite import REPO_ROOT
from tools.devhost import DevHost, DevHostError, QueueOptions, parse_timespan

pytestmark = pytest.mark.timeout(60)


def queues_json(**overrides) -> dict:
    queues = {
        "batchSize": 16,
        "newBatchThreshold": 8,
        "maxPollingInterval": "00:00:00.200",
        "visibilityTimeout": "00:00:00",
        "maxDequeueCount": 5,
        "messageEncoding": "none",
    }
    queues.update(overrides)
    return {"version": "2.0", "extensions": {"queues": queues}}


@pytest.fixture
def app_settings(storage):
    queue_app.reset()
    timer_app.reset()
    return storage.env(
        TEST_QUEUE=storage.queue_name,
        TEST_SYNC_QUEUE=f"{storage.queue_name}-sync",
        TEST_OUT_QUEUE=f"{storage.queue_name}-out",
        STARTUP_SCHEDULE="0 0 0 1 1 *",
    )


def queue(settings: dict, name: str) -> QueueClient:
    client = QueueClient.from_connection_string(settings["AzureWebJobsStorage"], name)
    try:
        client.create_queue()
    except Exception:
        pass
    return client


def contents(client: QueueClient) -> list[str]:
    return [m.content for m in client.peek_messages(max_messages=32)]


def test_queue_message_is_processed_and_deleted(app_settings):
    q = queue(app_settings, app_settings["TEST_QUEUE"])
    sent = q.send_message("hello")

    host = DevHost(queue_app, app_settings, host_json=queues_json(), functions=["handle"])
    assert host.functions["handle"].queue_name == app_settings["TEST_QUEUE"]  # %TEST_QUEUE% resolved
    invocations = host.run_until_idle(timeout=20)

    assert [c["body"] for c in queue_app.CALLS] == [b"hello"]
    msg = queue_app.CALLS[0]["msg"]
    assert isinstance(msg, func.QueueMessage)
    assert msg.id == sent.id and msg.dequeue_count == 1 and msg.pop_receipt
    assert msg.insertion_time is not None and msg.expiration_time > msg.insertion_time
    assert [(i.function, i.outcome, i.message_id, i.dequeue_count) for i in invocations] == [
        ("handle", "Succeeded", sent.id, 1)
    ]
    assert q.get_queue_properties().approximate_message_count == 0
    # The poison queue is created up front, empty.
    assert contents(queue(app_settings, f"{app_settings['TEST_QUEUE']}-poison")) == []


def test_failure_retries_after_visibility_timeout_then_poison(app_settings):
    q = queue(app_settings, app_settings["TEST_QUEUE"])
    q.send_message("fail: keep me intact <&>")
    q.send_message("fine")

    host = DevHost(
        queue_app,
        app_settings,
        host_json=queues_json(visibilityTimeout="00:00:01", maxDequeueCount=3),
        functions=["handle"],
    )
    host.run_until_idle(timeout=30)

    failing = [c for c in queue_app.CALLS if c["body"].startswith(b"fail")]
    assert [c["dequeue_count"] for c in failing] == [1, 2, 3]
    gaps = [b["at"] - a["at"] for a, b in zip(failing, failing[1:])]
    assert all(gap >= 0.9 for gap in gaps), gaps  # invisible for visibilityTimeout after a failure
    assert [c["body"] for c in queue_app.CALLS if not c["body"].startswith(b"fail")] == [b"fine"]

    assert q.get_queue_properties().approximate_message_count == 0
    assert contents(queue(app_settings, f"{app_settings['TEST_QUEUE']}-poison")) == ["fail: keep me intact <&>"]
    outcomes = [i.outcome for i in host.invocations if i.function == "handle"]
    assert outcomes.count("Failed") == 3 and outcomes.count("Succeeded") == 1


def test_message_over_max_dequeue_count_goes_to_poison_without_invocation(app_settings):
    q = queue(app_settings, app_settings["TEST_QUEUE"])
    q.send_message("abandoned")
    for _ in range(2):  # two earlier receives that never completed
        m = q.receive_message(visibility_timeout=1)
        q.update_message(m.id, m.pop_receipt, visibility_timeout=0)

    DevHost(queue_app, app_settings, host_json=queues_json(maxDequeueCount=2), functions=["handle"]).run_until_idle(20)

    assert queue_app.CALLS == []
    assert contents(queue(app_settings, f"{app_settings['TEST_QUEUE']}-poison")) == ["abandoned"]


def test_base64_encoding_is_decoded_and_bad_base64_fails(app_settings):
    q = queue(app_settings, app_settings["TEST_QUEUE"])
    raw = b"\x00\xffbinary\n"
    q.send_message(base64.b64encode(raw).decode())
    q.send_message("not base64 !!")

    host = DevHost(queue_app, app_settings, host_json=queues_json(messageEncoding="base64", maxDequeueCount=1), functions=["handle"])
    host.run_until_idle(timeout=20)

    assert [c["body"] for c in queue_app.CALLS] == [raw]
    failed = [i for i in host.invocations if not i.succeeded]
    assert len(failed) == 1 and "base64" in str(failed[0].error)
    # Poison copy keeps the original (undecoded) content.
    assert contents(queue(app_settings, f"{app_settings['TEST_QUEUE']}-poison")) == ["not base64 !!"]


def test_none_encoding_hands_over_raw_text(app_settings):
    q = queue(app_settings, app_settings["TEST_QUEUE"])
    payload = base64.b64encode(b"looks like base64").decode()
    q.send_message(payload)
    DevHost(queue_app, app_settings, host_json=queues_json(messageEncoding="none"), functions=["handle"]).run_until_idle(20)
    assert [c["body"] for c in queue_app.CALLS] == [payload.encode()]


def current() -> int:
    return queue_app.STATE["current"]


def test_concurrency_is_batch_size_plus_new_batch_threshold(app_settings):
    q = queue(app_settings, app_settings["TEST_QUEUE"])
    for _ in range(16):
        q.send_message("hold")

    host = DevHost(queue_app, app_settings, host_json=queues_json(batchSize=4, newBatchThreshold=2), functions=["handle"])
    with host:
        # First batch of 4, all held: 4 in flight is above the threshold, so nothing more is fetched.
        host.wait_for(lambda: current() == 4, timeout=20)
        # Two finish: 2 <= threshold in flight, so the host fetches another 4: 6 at once.
        queue_app.release(2)
        host.wait_for(lambda: current() == 6, timeout=20)
        queue_app.release(16)
        host.wait_until_idle(timeout=30)

    assert len(queue_app.CALLS) == 16
    assert queue_app.STATE["max"] == 6  # batchSize + newBatchThreshold, never more


def test_concurrency_without_threshold_is_batch_size(app_settings):
    q = queue(app_settings, app_settings["TEST_QUEUE"])
    for _ in range(9):
        q.send_message("hold")

    host = DevHost(queue_app, app_settings, host_json=queues_json(batchSize=3, newBatchThreshold=0), functions=["handle"])
    with host:
        host.wait_for(lambda: current() == 3, timeout=20)
        queue_app.release(2)  # one still in flight: with threshold 0 the host waits for it
        host.wait_for(lambda: len(queue_app.CALLS) == 3 and current() == 1, timeout=20)
        queue_app.release(1)
        host.wait_for(lambda: len(queue_app.CALLS) == 6 and current() == 3, timeout=20)
        queue_app.release(9)
        host.wait_until_idle(timeout=30)
    assert len(queue_app.CALLS) == 9
    assert queue_app.STATE["max"] == 3


def test_sync_function_runs_in_threads_with_context_and_queue_output(app_settings):
    q = queue(app_settings, app_settings["TEST_SYNC_QUEUE"])
    for i in range(4):
        q.send_message(f"m{i}")

    host = DevHost(queue_app, app_settings, host_json=queues_json(batchSize=4, newBatchThreshold=0), functions=["sync_handle"])
    with host:
        host.wait_for(lambda: current() == 4, timeout=20)  # all four held at once: they run in the pool
        queue_app.release(4)
        host.wait_until_idle(timeout=30)

    assert sorted(c["body"] for c in queue_app.SYNC_CALLS) == ["m0", "m1", "m2", "m3"]  # `body: str`
    assert all(c["thread"].startswith("devhost-worker") for c in queue_app.SYNC_CALLS)
    assert {c["function"] for c in queue_app.SYNC_CALLS} == {"sync_handle"}
    assert queue_app.STATE["max"] == 4
    assert sorted(contents(queue(app_settings, app_settings["TEST_OUT_QUEUE"]))) == ["M0", "M1", "M2", "M3"]


def test_graceful_stop_finishes_in_flight_invocation(app_settings):
    q = queue(app_settings, app_settings["TEST_QUEUE"])
    q.send_message("sleep:1.0")
    host = DevHost(queue_app, app_settings, host_json=queues_json(), functions=["handle"]).start()
    host.wait_for(lambda: queue_app.STATE["current"] == 1, timeout=10)
    host.stop()
    assert [i.outcome for i in host.invocations] == ["Succeeded"]
    assert q.get_queue_properties().approximate_message_count == 0


def test_hosts_share_one_event_loop_like_the_worker(app_settings):
    q = queue(app_settings, app_settings["TEST_QUEUE"])
    for body in ("first", "second"):
        q.send_message(body)
        DevHost(queue_app, app_settings, host_json=queues_json(), functions=["handle"]).run_until_idle(20)
    first, second = queue_app.CALLS
    assert first["loop"] is second["loop"] and not first["loop"].is_closed()


def test_start_failure_raises_and_restores_environment(app_settings):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        host = DevHost(http_app, app_settings, http_port=taken.getsockname()[1])
        with pytest.raises(OSError):
            host.start()
    assert "TEST_QUEUE" not in os.environ


def test_timer_fires_on_schedule_and_on_startup(app_settings):
    host = DevHost(timer_app, app_settings)
    assert host.functions["startup"].schedule == "0 0 0 1 1 *"  # %STARTUP_SCHEDULE% resolved
    with host:
        host.wait_for(lambda: len(timer_app.TICKS) >= 4, timeout=20)
    ticks = timer_app.TICKS
    assert len(timer_app.STARTUPS) == 1 and timer_app.STARTUPS[0]["past_due"] is False
    # "*/1 * * * * *": due on every whole second. Each tick's status names the previous due time
    # ("Last"), so the due times are known without timing anything: whole seconds, increasing,
    # and no tick ran before its due time. (A busy machine may run a tick late or skip a second.)
    dues = [datetime.fromisoformat(t["status"]["Last"]) for t in ticks[1:]]
    assert all(d.microsecond == 0 for d in dues), dues
    assert all(b > a for a, b in zip(dues, dues[1:])), dues
    for tick, due in zip(ticks, dues):
        assert tick["at"] >= due
        if (tick["at"] - due).total_seconds() <= 1.0:  # on time is not past due
            assert tick["past_due"] is False
    assert all(datetime.fromisoformat(t["status"]["Next"]) > t["at"] for t in ticks)


def test_unresolved_setting_and_bad_schedule_are_clear_errors(app_settings):
    settings = dict(app_settings)
    del settings["STARTUP_SCHEDULE"]
    with pytest.raises(DevHostError, match="STARTUP_SCHEDULE"):
        DevHost(timer_app, settings, export_settings=False)
    with pytest.raises(DevHostError, match="six-field NCRONTAB"):
        DevHost(timer_app, {**app_settings, "STARTUP_SCHEDULE": "*/5 * * * *"})
    with pytest.raises(DevHostError, match="no such function"):
        DevHost(queue_app, app_settings, functions=["nope"])


def test_disabled_function_is_skipped(app_settings):
    host = DevHost(timer_app, {**app_settings, "AzureWebJobs.tick.Disabled": "true"})
    assert set(host.functions) == {"startup"}


def test_http_trigger_and_admin_invoke(app_settings):
    with DevHost(http_app, app_settings, http_port=0) as host:
        base = f"http://127.0.0.1:{host.http_port}"
        req = urllib.request.Request(f"{base}/api/hello/bob?q=1", data=b"payload", headers={"x-test": "yes"}, method="POST")
        with urllib.request.urlopen(req, timeout=5) as resp:  # no function key: accepted locally
            assert resp.status == 201
            assert resp.headers["X-From"] == "hello"
            assert resp.headers["Content-Type"].startswith("application/json")
            assert json.loads(resp.read()) == {"name": "bob", "q": "1", "method": "POST", "body": "payload", "header": "yes"}
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{base}/api/boom", timeout=5)
        assert err.value.code == 500
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(urllib.request.Request(f"{base}/api/hello/bob", method="DELETE"), timeout=5)
        assert err.value.code == 405
    assert [(i.function, i.outcome) for i in host.invocations] == [("hello", "Succeeded"), ("boom", "Failed")]

    with DevHost(timer_app, app_settings, http_port=0, functions=["startup"]) as host:
        host.wait_for(lambda: len(timer_app.STARTUPS) == 1, timeout=10)
        req = urllib.request.Request(f"http://127.0.0.1:{host.http_port}/admin/functions/startup", data=b"{}", method="POST")
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert resp.status == 202
        host.wait_for(lambda: len(timer_app.STARTUPS) == 2, timeout=10)


def test_settings_are_exported_while_running_and_restored(app_settings):
    assert "TEST_QUEUE" not in os.environ
    with DevHost(queue_app, app_settings, host_json=queues_json(), functions=["handle"]):
        assert os.environ["TEST_QUEUE"] == app_settings["TEST_QUEUE"]
    assert "TEST_QUEUE" not in os.environ


def test_host_json_parsing():
    assert parse_timespan("00:00:02") == 2
    assert parse_timespan("1.00:00:00.5") == 86400.5
    with pytest.raises(DevHostError):
        parse_timespan(2000)
    opts = QueueOptions.from_host_json(json.loads((REPO_ROOT / "host.json").read_text()))
    assert opts == QueueOptions(16, 8, 2.0, 30.0, 5, "none")
    assert QueueOptions.from_host_json({}).message_encoding == "base64"  # the host's default


def test_cli_once_reads_local_settings_and_exits_when_idle(app_settings, tmp_path):
    q = queue(app_settings, app_settings["TEST_QUEUE"])
    sent = [q.send_message(body) for body in ("one", "two")]
    (tmp_path / "host.json").write_text(json.dumps(queues_json()))
    (tmp_path / "local.settings.json").write_text(json.dumps({
        "IsEncrypted": False,
        "Values": {
            "AzureWebJobsStorage": app_settings["AzureWebJobsStorage"],
            "TEST_QUEUE": "must-not-be-used",  # the environment wins
        },
    }))
    env = {**os.environ, "TEST_QUEUE": app_settings["TEST_QUEUE"], "PYTHONPATH": str(REPO_ROOT)}
    env.pop("AzureWebJobsStorage", None)
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "tools.devhost", "--app", "tests.devhost_apps.queue_app", "--functions", "handle",
         "--settings", str(tmp_path / "local.settings.json"), "--host-json", str(tmp_path / "host.json"),
         "--once", "--no-http"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=40,
    )
    assert proc.returncode == 0, proc.stderr
    for message in sent:
        assert "handle: Succeeded" in proc.stderr and f"message_id={message.id} dequeue_count=1" in proc.stderr
    assert q.get_queue_properties().approximate_message_count == 0
    assert time.monotonic() - started < 30

    bad = subprocess.run(
        [sys.executable, "-m", "tools.devhost", "--app", "tests.devhost_apps.queue_app", "--settings", str(tmp_path / "missing.json"), "--once"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=40,
    )
    assert bad.returncode == 1 and "settings file not found" in bad.stderr


def test_cli_for_seconds_stops(app_settings):
    env = {**os.environ, **app_settings, "PYTHONPATH": str(REPO_ROOT)}
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "tools.devhost", "--app", "tests.devhost_apps.timer_app", "--for", "1.5", "--http-port", "0"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=40,
    )
    assert proc.returncode == 0, proc.stderr
    assert "startup: Succeeded" in proc.stderr and "tick: Succeeded" in proc.stderr
    assert 1.5 <= time.monotonic() - started < 20


def test_route_templates_map_to_aiohttp_paths():
    from tools.devhost import _aiohttp_paths

    assert _aiohttp_paths("/api/items/{id:int}") == ["/api/items/{id}"]
    assert _aiohttp_paths("/api/items/{id?}") == ["/api/items/{id}", "/api/items"]
    assert _aiohttp_paths("/api/files/{*path}") == ["/api/files/{path:.*}"]
