"""The reporting stage: hourly and daily aggregates, /report, /status and the dashboard."""
