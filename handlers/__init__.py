"""The handler API: ``legato.handlers.registry`` (``@activity``, ``Result``, ``ActivityError``) and
``progress(chunk)``, which reports a partial result while a handler runs (``legato.handlers.progress``)."""
from legato.handlers.progress import progress

__all__ = ["progress"]
