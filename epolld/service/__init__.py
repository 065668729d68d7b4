"""The echo service: the policy over the reactor and its handlers."""
