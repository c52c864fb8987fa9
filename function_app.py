"""Azure Functions entry points: triggers only. The work lives in the `shared` package.

Every trigger runs inside `wiring.invocation(context)`: its spans and logs are children of the
host's invocation span (`context.trace_context`), so host and app telemetry share one trace."""

import azure.functions as func

from shared import wiring

app = func.FunctionApp()

# The JSON routes: live numbers (never from a cache) and never sniffed as another type.
JSON_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}


@app.queue_trigger(arg_name="msg", queue_name="%MAIL_QUEUE%", connection="AzureWebJobsStorage")
async def send_mail(msg: func.QueueMessage, context: func.Context) -> None:
    """One mail request from the mail queue: validate, get a send slot, submit to HVE, record."""
    with wiring.invocation(context):
        await wiring.handle_queue_message(msg.get_body(), msg.id or "", msg.dequeue_count or 1)


@app.queue_trigger(arg_name="msg", queue_name="%MAIL_QUEUE_PRIORITY%", connection="AzureWebJobsStorage")
async def send_mail_priority(msg: func.QueueMessage, context: func.Context) -> None:
    """The priority lane: the same send stage on its own queue, polled by its own trigger, so a
    request here never waits behind the mail queue's backlog. Deferred copies come back here."""
    with wiring.invocation(context):
        await wiring.handle_queue_message(msg.get_body(), msg.id or "", msg.dequeue_count or 1, lane="priority")


@app.timer_trigger(arg_name="timer", schedule="%WELCOME_SCHEDULE%")
async def welcome_new_users(timer: func.TimerRequest, context: func.Context) -> None:
    """Welcome users created since the last scan, once each (only when WELCOME_ENABLED=true)."""
    with wiring.invocation(context):
        await wiring.welcome_timer(past_due=timer.past_due)


@app.timer_trigger(arg_name="timer", schedule="%RETENTION_SCHEDULE%")
async def purge_expired(timer: func.TimerRequest, context: func.Context) -> None:
    """Delete ledger, recipient-index, welcome, delivery and aggregate rows and the relay's blobs
    older than LEDGER_RETENTION_DAYS (bounded per run); record requests left `sending` for
    LOST_IN_FLIGHT_HOURS as dead (lost-in-flight), and those left `deferred` past the age limit and
    the poison queue's time to live as dead (lost-in-queue)."""
    with wiring.invocation(context):
        await wiring.retention_timer()


@app.timer_trigger(arg_name="timer", schedule="%DELIVERY_TRACE_SCHEDULE%")
async def confirm_delivery(timer: func.TimerRequest, context: func.Context) -> None:
    """Reconcile the ledger with Graph message trace, per recipient (only when DELIVERY_TRACE_ENABLED=true)."""
    with wiring.invocation(context):
        await wiring.delivery_timer(past_due=timer.past_due)


@app.timer_trigger(arg_name="timer", schedule="0 */5 * * * *")
async def sample_health(timer: func.TimerRequest) -> None:
    """Queue depths, the oldest message's age and account health as gauges for the alert rules
    (infra/modules/alerts.bicep; in Azure disabled unless enableAlerts, see docs/alerts.md)."""
    await wiring.health_timer()


@app.route(route="status", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
async def status(req: func.HttpRequest, context: func.Context) -> func.HttpResponse:
    """Live per-account view from the rate governor (used today, remaining, next slot, health)."""
    with wiring.invocation(context):
        return func.HttpResponse(await wiring.status_json(), headers=JSON_HEADERS, mimetype="application/json")


@app.route(route="send", methods=["POST"], auth_level=func.AuthLevel.FUNCTION)
async def send(req: func.HttpRequest, context: func.Context) -> func.HttpResponse:
    """One mail request (contract v1) onto the mail queue, or the priority queue for `"priority": "high"`:
    202 with its id and status path, 400 with
    the refusal reasons, 409 for another request's id, 413 over HTTP_SEND_MAX_BYTES
    (schemas: shared/schema/send-response.v1.json, error.v1.json)."""
    with wiring.invocation(context):
        status_code, body, headers = await wiring.send_response(req.get_body(), req.headers.get("content-length"))
        return func.HttpResponse(
            body, status_code=status_code, headers={**JSON_HEADERS, **headers}, mimetype="application/json"
        )


@app.route(route="requests/{id}", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
async def request_status(req: func.HttpRequest, context: func.Context) -> func.HttpResponse:
    """One request: state, attempts, account, last SMTP code, times, chunks, delivery counts; never an
    address (schema: shared/schema/request-status.v1.json; 404 for an unknown id)."""
    with wiring.invocation(context):
        status_code, body = await wiring.request_status_response(req.route_params.get("id", ""))
        return func.HttpResponse(body, status_code=status_code, headers=JSON_HEADERS, mimetype="application/json")


@app.route(route="suppressions/check", methods=["POST"], auth_level=func.AuthLevel.FUNCTION)
async def suppression_check(req: func.HttpRequest, context: func.Context) -> func.HttpResponse:
    """Whether an address (JSON body {"address": ...}, never a query string) is on the suppression
    list: {suppressed, reason, until}, never the address (schema: shared/schema/suppression-answer.v1.json)."""
    with wiring.invocation(context):
        status_code, body = await wiring.suppression_response("check", req.get_body())
        return func.HttpResponse(body, status_code=status_code, headers=JSON_HEADERS, mimetype="application/json")


@app.route(route="suppressions/remove", methods=["POST"], auth_level=func.AuthLevel.FUNCTION)
async def suppression_remove(req: func.HttpRequest, context: func.Context) -> func.HttpResponse:
    """Take an address (JSON body {"address": ...}) off the suppression list: {removed, suppressed: false, ...}."""
    with wiring.invocation(context):
        status_code, body = await wiring.suppression_response("remove", req.get_body())
        return func.HttpResponse(body, status_code=status_code, headers=JSON_HEADERS, mimetype="application/json")


@app.route(route="report", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
async def report(req: func.HttpRequest, context: func.Context) -> func.HttpResponse:
    """Counts per hour or day, account and category, with the live account, queue and budget state
    (schema: shared/schema/report.v1.json)."""
    with wiring.invocation(context):
        status_code, body = await wiring.report_response(dict(req.params))
        return func.HttpResponse(body, status_code=status_code, headers=JSON_HEADERS, mimetype="application/json")


@app.route(route="dashboard", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
def dashboard(req: func.HttpRequest, context: func.Context) -> func.HttpResponse:
    """The operations dashboard: one self-contained page that refreshes itself from /api/report."""
    with wiring.invocation(context):
        built = wiring.dashboard_page()
        return func.HttpResponse(built.body, headers=built.headers, mimetype="text/html", charset="utf-8")
