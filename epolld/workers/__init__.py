"""workers: > 1: the supervisor, one worker process per slot, and their restart handoff."""
