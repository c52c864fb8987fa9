"""Timer-triggered test app: one every second, one only at startup (schedule from a setting)."""

import datetime as dt

import azure.functions as func

app = func.FunctionApp()

TICKS: list[dict] = []
STARTUPS: list[dict] = []


def reset() -> None:
    TICKS.clear()
    STARTUPS.clear()


@app.timer_trigger(arg_name="timer", schedule="*/1 * * * * *")
def tick(timer: func.TimerRequest) -> None:
    TICKS.append({"at": dt.datetime.now(dt.timezone.utc), "past_due": timer.past_due, "status": timer.schedule_status})


@app.timer_trigger(arg_name="timer", schedule="%STARTUP_SCHEDULE%", run_on_startup=True)
async def startup(timer: func.TimerRequest) -> None:
    STARTUPS.append({"at": dt.datetime.now(dt.timezone.utc), "past_due": timer.past_due})
