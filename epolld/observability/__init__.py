"""What operators watch: the Prometheus endpoint, its HTTP, the journal sink, log setup."""
