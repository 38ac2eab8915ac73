"""Topic names. Every run-keyed topic shares one partition count."""
from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PREFIX = "legato"
DEFAULT_PARTITIONS = 8
CHANGELOG_OFFSETS_KEY = b"\x00offsets"
"""The changelog key (not a run id: run ids are text without NUL) under which each coordinator partition stores, in
every batch's transaction, where its input topics resume: ``{"<topic>:<partition>": next offset}``."""


@dataclass(frozen=True)
class Topics:
    """The topic names for one prefix (default ``legato``)."""

    prefix: str = DEFAULT_PREFIX

    @property
    def triggers(self) -> str:
        return f"{self.prefix}.triggers"

    @property
    def completions(self) -> str:
        return f"{self.prefix}.completions"

    @property
    def runs(self) -> str:
        return f"{self.prefix}.runs"

    @property
    def dlq(self) -> str:
        return f"{self.prefix}.dlq"

    @property
    def cancellations(self) -> str:
        """Requests the coordinator stopped waiting for; every worker process reads all of it."""
        return f"{self.prefix}.cancellations"

    @property
    def cache(self) -> str:
        """Compacted: activity results by request fingerprint, for ``cache: {ttl}`` steps."""
        return f"{self.prefix}.cache"

    @property
    def coordinator(self) -> str:
        """Internal: triggers re-keyed by run_id and timer events."""
        return f"{self.prefix}.coordinator"

    @property
    def changelog(self) -> str:
        """Internal, compacted: the coordinator's run table (one JSON state per run), written in its transactions."""
        return f"{self.prefix}-coordinator-runs-changelog"

    @property
    def coordinator_group(self) -> str:
        """The coordinators' consumer group; ``<group>-<partition>`` are their transactional ids."""
        return f"{self.prefix}-coordinator"

    @property
    def signals(self) -> str:
        """Run-keyed: signals sent to runs (``SignalSent``), read by the coordinators."""
        return f"{self.prefix}.signals"

    @property
    def progress(self) -> str:
        """Run-keyed: partial results of running steps (``ProgressReported``), produced by workers."""
        return f"{self.prefix}.progress"

    @property
    def definitions(self) -> str:
        """Compacted: deployed workflow definitions (``DefinitionDeployed``), keyed ``<name>@<version>``."""
        return f"{self.prefix}.definitions"

    @property
    def schedules(self) -> str:
        """Compacted: schedules (``schedule.defined`` keyed ``<name>``) and what their coordinator fired last
        (``schedule.fired`` keyed ``<name>`` NUL ``fired``)."""
        return f"{self.prefix}.schedules"

    @property
    def payloads(self) -> str:
        """Compacted: values stored by reference (claim checks), in chunks keyed ``<payload id>/<n>``
        (``legato.topics.payloads``)."""
        return f"{self.prefix}.payloads"

    @property
    def deployer(self) -> str:
        """The transactional id every ``legato deploy`` uses: deployers fence each other, so a name@version is
        checked and published by one at a time."""
        return f"{self.prefix}-deployer"

    @property
    def limits(self) -> str:
        """Acquisitions and releases of cluster-wide limits (``topics.limits``), keyed ``<limit>/<key>``."""
        return f"{self.prefix}.limits"

    @property
    def limits_changelog(self) -> str:
        """Internal, compacted: the limiter's budget per ``<limit>/<key>`` and, under ``CHANGELOG_OFFSETS_KEY``, where
        each partition of ``limits`` resumes; partition ``p`` belongs to ``limits`` partition ``p``."""
        return f"{self.prefix}-limiter-changelog"

    @property
    def limiter_group(self) -> str:
        """The limiters' consumer group over ``limits``; ``<group>-<partition>`` are their transactional ids."""
        return f"{self.prefix}-limiter"

    def requests(self, activity: str) -> str:
        return f"{self.prefix}.requests.{activity}"

    def run_keyed(self, activities: list[str] | tuple[str, ...] = ()) -> list[str]:
        """Every topic keyed by run_id; they must share one partition count."""
        return [self.completions, self.runs, self.coordinator, self.cancellations, self.signals, self.progress,
                *(self.requests(a) for a in activities)]
