"""Azure Functions entry points: triggers only. The work lives in the `shared` package."""

import azure.functions as func

from shared import wiring

app = func.FunctionApp()

# The JSON routes: live numbers (never from a cache) and never sniffed as another type.
JSON_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}


@app.queue_trigger(arg_name="msg", queue_name="%MAIL_QUEUE%", connection="AzureWebJobsStorage")
async def send_mail(msg: func.QueueMessage) -> None:
    """One mail request from the mail queue: validate, get a send slot, submit to HVE, record."""
    await wiring.handle_queue_message(msg.get_body(), msg.id or "", msg.dequeue_count or 1)


@app.queue_trigger(arg_name="msg", queue_name="%MAIL_QUEUE_PRIORITY%", connection="AzureWebJobsStorage")
async def send_mail_priority(msg: func.QueueMessage) -> None:
    """The priority lane: the same send stage on its own queue, polled by its own trigger, so a
    request here never waits behind the mail queue's backlog. Deferred copies come back here."""
    await wiring.handle_queue_message(msg.get_body(), msg.id or "", msg.dequeue_count or 1, lane="priority")


@app.timer_trigger(arg_name="timer", schedule="%WELCOME_SCHEDULE%")
async def welcome_new_users(timer: func.TimerRequest) -> None:
    """Welcome users created since the last scan, once each (only when WELCOME_ENABLED=true)."""
    await wiring.welcome_timer(past_due=timer.past_due)


@app.timer_trigger(arg_name="timer", schedule="%RETENTION_SCHEDULE%")
async def purge_expired(timer: func.TimerRequest) -> None:
    """Delete ledger, recipient-index, welcome, delivery and aggregate rows and the relay's blobs
    older than LEDGER_RETENTION_DAYS (bounded per run); record requests left `sending` for
    LOST_IN_FLIGHT_HOURS as dead (lost-in-flight), and those left `deferred` past the age limit and
    the poison queue's time to live as dead (lost-in-queue)."""
    await wiring.retention_timer()


@app.timer_trigger(arg_name="timer", schedule="%DELIVERY_TRACE_SCHEDULE%")
async def confirm_delivery(timer: func.TimerRequest) -> None:
    """Reconcile the ledger with Graph message trace, per recipient (only when DELIVERY_TRACE_ENABLED=true)."""
    await wiring.delivery_timer(past_due=timer.past_due)


@app.route(route="status", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
async def status(req: func.HttpRequest) -> func.HttpResponse:
    """Live per-account view from the rate governor (used today, remaining, next slot, health)."""
    return func.HttpResponse(await wiring.status_json(), headers=JSON_HEADERS, mimetype="application/json")


@app.route(route="send", methods=["POST"], auth_level=func.AuthLevel.FUNCTION)
async def send(req: func.HttpRequest) -> func.HttpResponse:
    """One mail request (contract v1) onto the mail queue, or the priority queue for `"priority": "high"`:
    202 with its id and status path, 400 with
    the refusal reasons, 409 for another request's id, 413 over HTTP_SEND_MAX_BYTES
    (schemas: shared/schema/send-response.v1.json, error.v1.json)."""
    status_code, body, headers = await wiring.send_response(req.get_body(), req.headers.get("content-length"))
    return func.HttpResponse(
        body, status_code=status_code, headers={**JSON_HEADERS, **headers}, mimetype="application/json"
    )


@app.route(route="requests/{id}", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
async def request_status(req: func.HttpRequest) -> func.HttpResponse:
    """One request: state, attempts, account, last SMTP code, times, chunks, delivery counts; never an
    address (schema: shared/schema/request-status.v1.json; 404 for an unknown id)."""
    status_code, body = await wiring.request_status_response(req.route_params.get("id", ""))
    return func.HttpResponse(body, status_code=status_code, headers=JSON_HEADERS, mimetype="application/json")


@app.route(route="report", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
async def report(req: func.HttpRequest) -> func.HttpResponse:
    """Counts per hour or day, account and category, with the live account, queue and budget state
    (schema: shared/schema/report.v1.json)."""
    status_code, body = await wiring.report_response(dict(req.params))
    return func.HttpResponse(body, status_code=status_code, headers=JSON_HEADERS, mimetype="application/json")


@app.route(route="dashboard", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
def dashboard(req: func.HttpRequest) -> func.HttpResponse:
    """The operations dashboard: one self-contained page that refreshes itself from /api/report."""
    built = wiring.dashboard_page()
    return func.HttpResponse(built.body, headers=built.headers, mimetype="text/html", charset="utf-8")
