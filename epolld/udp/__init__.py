"""UDP echo: one endpoint handler per UDP listener and its rate limiter."""
