"""Queue-triggered test app: records calls, sleeps or fails on request (body prefix)."""

import asyncio
import threading
import time

import azure.functions as func

app = func.FunctionApp()

CALLS: list[dict] = []
SYNC_CALLS: list[dict] = []
STATE = {"current": 0, "max": 0}
_lock = threading.Lock()


def reset() -> None:
    CALLS.clear()
    SYNC_CALLS.clear()
    STATE.update(current=0, max=0)


@app.queue_trigger(arg_name="msg", queue_name="%TEST_QUEUE%", connection="AzureWebJobsStorage")
async def handle(msg: func.QueueMessage) -> None:
    body = msg.get_body()
    CALLS.append({
        "body": body, "id": msg.id, "dequeue_count": msg.dequeue_count, "msg": msg,
        "at": time.monotonic(), "loop": asyncio.get_running_loop(),
    })
    STATE["current"] += 1
    STATE["max"] = max(STATE["max"], STATE["current"])
    try:
        if body.startswith(b"sleep:"):
            await asyncio.sleep(float(body.split(b":")[1]))
        if body.startswith(b"fail"):
            raise RuntimeError(f"failing on purpose: {body!r}")
    finally:
        STATE["current"] -= 1


@app.function_name("sync_handle")
@app.queue_trigger(arg_name="body", queue_name="%TEST_SYNC_QUEUE%", connection="AzureWebJobsStorage")
@app.queue_output(arg_name="out", queue_name="%TEST_OUT_QUEUE%", connection="AzureWebJobsStorage")
def sync_handle(body: str, out: func.Out[str], context: func.Context) -> None:
    with _lock:
        STATE["current"] += 1
        STATE["max"] = max(STATE["max"], STATE["current"])
    try:
        SYNC_CALLS.append({"body": body, "thread": threading.current_thread().name, "function": context.function_name})
        time.sleep(0.3)
        out.set(body.upper())
    finally:
        with _lock:
            STATE["current"] -= 1
