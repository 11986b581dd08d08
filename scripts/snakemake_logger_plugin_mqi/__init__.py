"""Snakemake logger plugin `mqi` (`--logger mqi`, set by the workflow profile): hands every log
record to the run recorder, which keeps each case's state files and sends alerts. It writes to no
stream, so Snakemake's own console output is unchanged."""

from __future__ import annotations

import threading
from logging import LogRecord

from snakemake_interface_logger_plugins.base import LogHandlerBase

from mqi_communicator.ops.recorder import RunRecorder


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
        self.recorder = RunRecorder(dryrun=bool(self.common_settings.dryrun))

    def emit(self, record: LogRecord) -> None:
        self.recorder.handle(record)

    def close(self) -> None:
        self.recorder.close()
        release_scheduler_timers()
        super().close()

    @property
    def writes_to_stream(self) -> bool:
        return False

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
