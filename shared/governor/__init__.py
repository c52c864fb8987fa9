"""The rate governor: per-account and tenant send budgets in Table storage, and their arithmetic."""
