from epolld import cli

raise SystemExit(cli.main())
