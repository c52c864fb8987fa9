"""The 2024 preview's per-minute machinery: how late booked messages come back from the queue, and the backlog estimate."""
