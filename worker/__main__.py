"""`python -m worker`, what `sketchsearch worker` runs: check the broker, load the runtime, consume."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from encoder.errors import SketchSearchError
from services.config import get_settings
from services.errors import ConfigError
from services.jobs import RedisJobStore, check_broker_url

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sketchsearch worker", description=__doc__)
    parser.add_argument("--loglevel", default="INFO", help="Celery log level (default INFO).")
    parser.add_argument("--hostname", default=None, help="Worker name (default sketchsearch-<pid>@<host>).")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.loglevel.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )

    try:
        settings = get_settings()
        if not settings.broker_url:
            raise ConfigError(
                "SKETCHSEARCH_BROKER_URL is not set: a worker needs a broker "
                "(without one, `sketchsearch ingest` runs jobs in-process)"
            )
        check_broker_url(settings.broker_url)
        RedisJobStore(settings.broker_url).ping()
        from worker.tasks import app, close_runtime, get_runtime

        # fail now, with a clear message, rather than on the first batch: the model loads once, here, and in
        # embedded mode this process takes the store for its whole life
        get_runtime()
    except SketchSearchError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    try:
        app.worker_main(
            [
                "worker",
                "--pool=solo",
                "--concurrency=1",
                "--prefetch-multiplier=1",
                f"--queues={settings.queue}",
                f"--loglevel={args.loglevel}",
                f"--hostname={args.hostname or f'sketchsearch-{os.getpid()}@%h'}",
                "--without-gossip",
                "--without-mingle",
            ]
        )
    finally:
        close_runtime()
    return 0


if __name__ == "__main__":
    sys.exit(main())
