"""The fault campaign (`make chaos`): the daemon under load while something else goes wrong."""
