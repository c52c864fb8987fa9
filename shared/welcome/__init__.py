"""The welcome stage: finds newly created users and enqueues one welcome mail each."""
