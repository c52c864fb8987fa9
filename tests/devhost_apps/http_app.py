"""HTTP-triggered test app."""

import json

import azure.functions as func

app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)


@app.route(route="hello/{name}", methods=["GET", "POST"])
def hello(req: func.HttpRequest) -> func.HttpResponse:
    payload = {
        "name": req.route_params.get("name"),
        "q": req.params.get("q"),
        "method": req.method,
        "body": req.get_body().decode(),
        "header": req.headers.get("x-test"),
    }
    return func.HttpResponse(json.dumps(payload), status_code=201, mimetype="application/json", headers={"X-From": "hello"})


@app.route(route="boom", auth_level=func.AuthLevel.ADMIN)
async def boom(req: func.HttpRequest) -> func.HttpResponse:
    raise RuntimeError("boom")
