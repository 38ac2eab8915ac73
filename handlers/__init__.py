"""The handler API: ``legato.handlers.registry`` (``@activity``, ``Result``, ``ActivityError``),
``progress(chunk)``, which reports a partial result while a handler runs (``legato.handlers.progress``), and
``heartbeat()``, which tells a step with ``heartbeat:`` that its handler is alive (``legato.handlers.heartbeat``)."""
from legato.handlers.heartbeat import heartbeat
from legato.handlers.progress import progress

__all__ = ["heartbeat", "progress"]
