"""peal-backend serve | worker | simulate"""
from __future__ import annotations

import argparse
import os
import sys

from .config import Settings, SettingsError


def serve(args, settings: Settings) -> None:
    from gunicorn.app.base import BaseApplication

    from .server import create_app

    class _App(BaseApplication):
        def load_config(self):
            self.cfg.set("bind", f"{args.host}:{args.port or settings.port}")
            self.cfg.set("workers", args.workers)
            self.cfg.set("threads", args.threads)
            self.cfg.set("timeout", args.timeout)
            self.cfg.set("worker_class", "gthread")
            # one line per request: method, path (no query string: signed URLs never reach this backend's
            # own query, but keep the log free of them anyway), status, bytes, milliseconds
            self.cfg.set("accesslog", "-")
            self.cfg.set("access_log_format", '%(h)s "%(m)s %(U)s" %(s)s %(B)s %(M)sms')

        def load(self):
            return create_app(settings)

    _App().run()


def worker(args, settings: Settings) -> None:
    from .jobs import run_worker

    if not settings.redis_url:
        sys.exit("peal-backend worker needs REDIS_URL (without it the server trains in-process)")
    run_worker(settings, burst=args.burst)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="peal-backend", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the HTTP backend under gunicorn")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=None, help="default: $PORT, then 9090")
    p.add_argument("--workers", type=int, default=int(os.environ.get("WORKERS", 1)),
                   help="gunicorn processes (default $WORKERS or 1; more than 1 needs REDIS_URL for training)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("THREADS", 8)))
    p.add_argument("--timeout", type=int, default=300, help="seconds before a silent worker is restarted")
    p.set_defaults(func=serve)
    w = sub.add_parser("worker", help="run an RQ worker for training jobs (needs REDIS_URL)")
    w.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    w.set_defaults(func=worker)
    try:
        from .simulate import add_parser as add_simulate
        add_simulate(sub)
    except ImportError:  # the simulator's optional plotting stack missing
        pass
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        sys.exit(f"bad setting: {exc}")
    args.func(args, settings)


if __name__ == "__main__":
    main()
