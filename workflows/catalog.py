"""Deployed definitions by name and version: what a run is pinned to.

A Catalog is immutable: a change (a definition deployed while coordinators run) makes a new one, so a decision
always sees one consistent set, and the state machine never sees a half-applied update.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Iterator

from legato.workflows.model import CompiledWorkflow, Limit


def source_sha256(source: str) -> str:
    """The content hash of a definition: sha256 of its YAML text as UTF-8, in hex."""
    return hashlib.sha256(source.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Definition:
    """One deployed definition: compiled, with the hash of the text it was compiled from."""

    workflow: CompiledWorkflow
    sha256: str
    deployed_at: str = ""

    @property
    def name(self) -> str:
        return self.workflow.name

    @property
    def version(self) -> int:
        return self.workflow.version

    @property
    def key(self) -> str:
        return definition_key(self.name, self.version)


def definition_key(name: str, version: int) -> str:
    """The record key on the definitions topic: ``<name>@<version>``."""
    return f"{name}@{version}"


@dataclass(frozen=True)
class Catalog:
    """Definitions by (name, version); ``latest(name)`` is the highest version of a name."""

    _by_key: dict[tuple[str, int], Definition] = field(default_factory=dict)
    _latest: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, definitions: list[Definition]) -> "Catalog":
        catalog = cls()
        for definition in definitions:
            catalog = catalog.with_definition(definition)
        return catalog

    def get(self, name: str, version: int) -> Definition | None:
        return self._by_key.get((name, version))

    def latest(self, name: str) -> Definition | None:
        version = self._latest.get(name)
        return None if version is None else self._by_key[(name, version)]

    def resolve(self, name: str, version: int | None = None) -> Definition | None:
        """``version`` of ``name``, or its highest version when None."""
        return self.latest(name) if version is None else self.get(name, version)

    def limit(self, name: str) -> "Limit | None":
        """The deployed limit ``name``: from the highest version of the first document (by name) that declares it.
        A workflow's own ``limits:`` come before these (``Machine.limit``)."""
        for doc in sorted(self._latest):
            found = self._by_key[(doc, self._latest[doc])].workflow.definition.limits.get(name)
            if found is not None:
                return found
        return None

    def names(self) -> list[str]:
        return sorted(self._latest)

    def with_definition(self, definition: Definition) -> "Catalog":
        by_key = {**self._by_key, (definition.name, definition.version): definition}
        latest = dict(self._latest)
        if definition.version > latest.get(definition.name, 0):
            latest[definition.name] = definition.version
        return Catalog(by_key, latest)

    def without(self, name: str, version: int) -> "Catalog":
        by_key = {k: v for k, v in self._by_key.items() if k != (name, version)}
        latest = {n: v for n, v in self._latest.items() if n != name}
        remaining = [v for (n, v) in by_key if n == name]
        if remaining:
            latest[name] = max(remaining)
        return Catalog(by_key, latest)

    def __iter__(self) -> Iterator[Definition]:
        return iter(sorted(self._by_key.values(), key=lambda d: (d.name, d.version)))

    def __len__(self) -> int:
        return len(self._by_key)
