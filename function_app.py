"""Azure Functions entry points: triggers only. The work lives in the `shared` package."""

import azure.functions as func

from shared import sender

app = func.FunctionApp()


@app.queue_trigger(arg_name="msg", queue_name="%MAIL_QUEUE%", connection="AzureWebJobsStorage")
async def send_mail(msg: func.QueueMessage) -> None:
    """One mail request from the queue: validate, get a send slot, submit to HVE, record."""
    await sender.handle_queue_message(msg.get_body(), msg.id, msg.dequeue_count)
