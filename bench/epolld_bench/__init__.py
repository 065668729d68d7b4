"""epolld's benchmark: epolld against a C epoll echo server, asyncio, uvloop, and the peers an
engineer would pick (Go's net, Rust's tokio); over TLS against Go's crypto/tls, uvloop with
ssl=, socat and ncat.

Modules, each with one job:
  paths.py       where things are (the C programs, the venvs, the outputs)
  processes.py   starting and stopping what the bench runs (pinned, niced), /proc readers
  bootstrap.py   compiling bench/*.c and creating bench/.venv
  servers.py     the servers under test: one small class per kind, one table (SERVERS)
  workloads.py   the workloads: one table (WORKLOADS) of load generator settings
  runner.py      one run (server + load generators) and the interleaved matrix of runs
  targets.py     the issues' targets (TARGETS) and their PASS/MISS evaluation
  report.py      the Markdown report (docs/benchmarks.md)
  pyspy.py       --profile: py-spy stacks of epolld
  __main__.py    the command line (bench/run)
"""
