"""How ``diffsplit worker`` writes its log: text lines, or JSON lines (``--log-json``), on stderr.

Request lines and unload events come from the ``diffsplit.remote.ops``
logger at INFO (see ``request_log``), shown by default; other messages keep
the level the command line sets (warnings, or debug with ``-v``). With JSON
lines every log record becomes one JSON object per line: ``ts`` (Unix
seconds), ``level``, ``logger``, and either the record's ``ops`` fields
(``event``: ``request``, ``unload``, ``free``) or ``message`` (plus
``exception`` with a traceback).
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, TextIO

from diffsplit.remote.request_log import OPS_LOGGER

#: Marks the handler this module installs, so configuring twice replaces it.
_HANDLER_NAME = "diffsplit-ops"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(message)s"


class JsonLineFormatter(logging.Formatter):
    """One JSON object per record (no newlines inside: tracebacks are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, Any] = {"ts": round(record.created, 6), "level": record.levelname,
                                "logger": record.name}
        ops = getattr(record, "ops", None)
        if isinstance(ops, dict):
            body.update(ops)  # the fields say it all: no message
        else:
            body["message"] = record.getMessage()
        if record.exc_info:
            body["exception"] = self.formatException(record.exc_info)
        return json.dumps(body, default=str, ensure_ascii=False)


def configure_worker_logging(*, json_lines: bool, stream: TextIO | None = None) -> None:
    """Show the ops logger's INFO lines on ``stream`` (stderr); with ``json_lines`` every record as JSON.

    Call after ``logging.basicConfig``; calling again replaces what the last call installed.
    """
    ops = logging.getLogger(OPS_LOGGER)
    for handler in list(ops.handlers):
        if handler.get_name() == _HANDLER_NAME:
            ops.removeHandler(handler)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(JsonLineFormatter() if json_lines else logging.Formatter(TEXT_FORMAT))
    ops.addHandler(handler)
    ops.setLevel(logging.INFO)
    ops.propagate = False  # shown once, by the handler above
    if json_lines:
        for other in logging.getLogger().handlers:
            other.setFormatter(JsonLineFormatter())
