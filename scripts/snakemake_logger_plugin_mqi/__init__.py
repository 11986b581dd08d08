"""Snakemake logger plugin `mqi` (`--logger mqi`, set by the workflow profile): hands every log
record to the run recorder, which keeps each case's state files and sends alerts, and, in a run
that executes jobs, writes the console: a short account per case (mqi_communicator.ops.console)
instead of Snakemake's job listing, which Snakemake still writes whole to .snakemake/log/.
A dry run, --verbose, or `--logger-mqi-console snakemake` keep Snakemake's own console."""

import sys
import threading
from dataclasses import dataclass, field
from logging import LogRecord

from snakemake_interface_logger_plugins.base import LogHandlerBase
from snakemake_interface_logger_plugins.settings import LogHandlerSettingsBase

from mqi_communicator.ops.console import RunConsole, snakemake_log_file
from mqi_communicator.ops.recorder import RunRecorder


@dataclass
class LogHandlerSettings(LogHandlerSettingsBase):
    console: str = field(
        default="account",
        metadata={
            "help": "account: a short account per case on the console, Snakemake's full output in "
            ".snakemake/log/; snakemake: Snakemake's own console output",
            "env_var": True,
            "choices": ["account", "snakemake"],
        },
    )


def release_scheduler_timers() -> None:
    """End the timers Snakemake's job rate limiter left behind. The profiles give the limiter a
    one-hour window, because with its default 1 s window the re-armed timers pile up and a run of
    thousands of jobs spends most of its CPU re-scheduling (snakemake/snakemake#3744); those
    timers are not daemon threads, so without this the finished run would wait for them."""
    for thread in threading.enumerate():
        if isinstance(thread, threading.Timer):
            thread.cancel()


class LogHandler(LogHandlerBase):
    def __post_init__(self) -> None:
        common = self.common_settings
        self.recorder = RunRecorder(dryrun=bool(common.dryrun))
        wanted = getattr(self.settings, "console", "account") or "account"
        self.account = wanted == "account" and not (common.dryrun or common.verbose or common.debug_dag)
        self.console: RunConsole | None = None
        if self.account:
            from snakemake.logging import ColorizingTextHandler, DefaultFilter, DefaultFormatter
            from snakemake.logging import logger as snakemake_logger

            # Snakemake's own console handler, for what comes before the workflow starts.
            own = ColorizingTextHandler(nocolor=common.nocolor, stream=sys.stderr)
            own.addFilter(DefaultFilter(common.quiet, common.debug_dag, common.verbose, False, common.printshellcmds))
            own.setFormatter(DefaultFormatter(common.quiet, common.show_failed_logs))
            self.console = RunConsole(
                stream=sys.stderr,
                passthrough=own.handle,
                layout=lambda: self.recorder.layout,
                full_log=lambda: snakemake_log_file(snakemake_logger.handlers),
            )

    def emit(self, record: LogRecord) -> None:
        self.recorder.handle(record)
        if self.console is not None:
            try:
                self.console.handle(record)
            except Exception as exc:  # the console must never take the run down
                print(f"mqi console: {type(exc).__name__}: {exc}", file=sys.stderr)

    def close(self) -> None:
        self.recorder.close()
        if self.console is not None:
            self.console.close()
        release_scheduler_timers()
        super().close()

    @property
    def writes_to_stream(self) -> bool:
        return self.account

    @property
    def writes_to_file(self) -> bool:
        return False

    @property
    def has_filter(self) -> bool:
        return True  # every record, whatever the console shows

    @property
    def has_formatter(self) -> bool:
        return True

    @property
    def needs_rulegraph(self) -> bool:
        return False


__all__ = ["LogHandler", "LogHandlerSettings"]
