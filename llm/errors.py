"""Errors a user can act on: one line, naming the file, key or record."""

from __future__ import annotations


class LLMRayError(Exception):
    """Base of every error this package raises on purpose; the CLI prints it as one line."""

    exit_code = 1


class ConfigError(LLMRayError):
    """A config problem: `metadata.llm.<key>: <problem> in <file>`. The CLI exits 2."""

    exit_code = 2


class StageInputError(LLMRayError):
    """A stage's input is missing or incomplete (no manifest): run the stage that makes it first."""

    exit_code = 3


class DataError(LLMRayError):
    """Bad data-stage input that stops the stage before any work: a source that matches nothing, an
    unknown file type, a tokenizer directory that does not load. Per-record problems are counted instead."""

    exit_code = 4


class StaleOutputError(LLMRayError):
    """A committed stage folder was made for another config and `on_change: refuse` keeps it."""

    exit_code = 5


class ClusterError(LLMRayError):
    """Ray could not be reached, or the cluster did not reach the planned size in time."""

    exit_code = 6


class TrainingError(LLMRayError):
    """Training stopped: a worker failed (the full trace is in the stage's log file) or the loss diverged."""

    exit_code = 7

    def __init__(self, message: str, log: str | None = None) -> None:
        super().__init__(message + (f" (full trace: {log})" if log else ""))
        self.log = log


class StorageError(LLMRayError):
    """A stage folder's commit record cannot be trusted or written: an unreadable or damaged manifest, a
    storage error that outlasted its retries, a failed commit. Nothing is deleted or moved: the line names
    the file, and a rerun after the fix carries on."""

    exit_code = 8


class StageBusyError(LLMRayError):
    """Another run holds the stage folder's lease (host, pid, since when), or this run lost it to another."""

    exit_code = 9
