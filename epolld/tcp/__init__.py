"""TCP handler kinds: the copying connection, its splice twin, the PROXY header reader."""
