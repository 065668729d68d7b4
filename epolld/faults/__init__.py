"""Fault injection on a listener (`faults:` on a listen entry): shaper, stream, datagram."""
