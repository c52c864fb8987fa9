"""Queue-triggered test app: records calls, sleeps, fails or holds on request (body prefix).

A body "hold" keeps its invocation in flight until the test hands it a ticket (`release(n)`):
concurrency tests then decide when invocations end instead of racing sleeps against each other."""

import asyncio
import threading
import time

import azure.functions as func

app = func.FunctionApp()

CALLS: list[dict] = []
SYNC_CALLS: list[dict] = []
STATE = {"current": 0, "max": 0}
_lock = threading.Lock()
_tickets = threading.Semaphore(0)
HOLD_LIMIT_SECONDS = 30.0  # a test that forgets to release fails instead of hanging


def reset() -> None:
    global _tickets
    CALLS.clear()
    SYNC_CALLS.clear()
    STATE.update(current=0, max=0)
    _tickets = threading.Semaphore(0)


def release(count: int) -> None:
    """Let `count` held invocations (now or later) finish."""
    _tickets.release(count)


def _take_ticket() -> bool:
    return _tickets.acquire(timeout=0.01)


async def _hold() -> None:
    deadline = time.monotonic() + HOLD_LIMIT_SECONDS
    while not _take_ticket():
        if time.monotonic() > deadline:
            raise TimeoutError("held invocation was never released")
        await asyncio.sleep(0.01)


def _enter() -> None:
    with _lock:
        STATE["current"] += 1
        STATE["max"] = max(STATE["max"], STATE["current"])


def _leave() -> None:
    with _lock:
        STATE["current"] -= 1


@app.queue_trigger(arg_name="msg", queue_name="%TEST_QUEUE%", connection="AzureWebJobsStorage")
async def handle(msg: func.QueueMessage) -> None:
    body = msg.get_body()
    CALLS.append({
        "body": body, "id": msg.id, "dequeue_count": msg.dequeue_count, "msg": msg,
        "at": time.monotonic(), "loop": asyncio.get_running_loop(),
    })
    _enter()
    try:
        if body.startswith(b"sleep:"):
            await asyncio.sleep(float(body.split(b":")[1]))
        if body == b"hold":
            await _hold()
        if body.startswith(b"fail"):
            raise RuntimeError(f"failing on purpose: {body!r}")
    finally:
        _leave()


@app.function_name("sync_handle")
@app.queue_trigger(arg_name="body", queue_name="%TEST_SYNC_QUEUE%", connection="AzureWebJobsStorage")
@app.queue_output(arg_name="out", queue_name="%TEST_OUT_QUEUE%", connection="AzureWebJobsStorage")
def sync_handle(body: str, out: func.Out[str], context: func.Context) -> None:
    _enter()
    try:
        SYNC_CALLS.append({"body": body, "thread": threading.current_thread().name, "function": context.function_name})
        deadline = time.monotonic() + HOLD_LIMIT_SECONDS
        while not _take_ticket():  # held until the test releases it
            if time.monotonic() > deadline:
                raise TimeoutError("held invocation was never released")
        out.set(body.upper())
    finally:
        _leave()
