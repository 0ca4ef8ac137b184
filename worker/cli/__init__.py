"""`gpu-worker`: run this machine as a worker of the platform, and look after it.

- `configure` (`worker.cli.configure`) asks (or takes as flags) how to reach the platform, the region,
  the name, the GPUs and an enrollment token, and writes the local config file. With a token it enrolls
  at once: it registers, keeps the worker's id and credentials (HMAC secret, tokens; mode 0600) in the
  state dir, and drops the spent token from the file. A platform out of reach leaves the token for
  `start` to use.
- `start` (`worker.cli.start`) reads the local config (flags > `GPU_WORKER_*` > config.yaml > defaults),
  runs the engines asked for (`--engines`; by default echo plus whichever model engines this install
  can import), shows a live screen on a terminal (log lines otherwise) and stops cleanly on
  SIGINT/SIGTERM: a first signal lets running jobs finish (up to `drain_timeout_s`), a second one stops
  at once.
- `status`, `get`, `set` and `models` (`worker.cli.queries`) ask the platform about this worker (its id
  is in the state dir, written when it first registered) and change its runtime config, which the
  platform pushes back to the running worker through its KV watch.

The application and the exit statuses are in `worker.cli.app`; the tables and the live screen in
`worker.cli.console`.
"""

# Importing the command modules registers their commands on `app`.
from worker.cli import configure, queries, start  # noqa: F401
from worker.cli.app import app, main
from worker.cli.queries import registered_worker_id

__all__ = ["app", "main", "registered_worker_id"]
