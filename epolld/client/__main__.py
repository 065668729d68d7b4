"""`python -m epolld.client`."""

from epolld.client.cli import main

raise SystemExit(main())
