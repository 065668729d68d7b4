"""TLS echo: certificates, contexts per listener, the TLS connection handler."""
