"""One processor per step kind, and the registry that maps a kind to its processor.

Every processor has the same four entry points (``base.Processor``: start, child finished, timer, cancel) and the
two of a redrive (``redrive_frames``: what it would resume, or why not; ``redrive``: resume it); a kind that reacts to
an event of its own adds one more (an activity's completion, a sub-workflow's child run, a wait's signal). Adding a
step kind is one module here and one row in ``_PROCESSORS``.
"""
from __future__ import annotations

from legato.workflows.steps.activity import ActivityProcessor
from legato.workflows.steps.base import Processor
from legato.workflows.steps.choice import ChoiceProcessor
from legato.workflows.steps.fanout import FanOutProcessor
from legato.workflows.steps.loop import LoopProcessor
from legato.workflows.steps.sleep import SleepProcessor
from legato.workflows.steps.subworkflow import SubWorkflowProcessor
from legato.workflows.steps.terminal import EndProcessor, FailProcessor
from legato.workflows.steps.wait import WaitProcessor

_PROCESSORS: dict[str, Processor] = {
    "activity": ActivityProcessor(),
    "choice": ChoiceProcessor(),
    "end": EndProcessor(),
    "fail": FailProcessor(),
    "loop": LoopProcessor(),
    "map": FanOutProcessor(),
    "parallel": FanOutProcessor(),
    "sleep": SleepProcessor(),
    "wait": WaitProcessor(),
    "workflow": SubWorkflowProcessor(),
}


def processor(kind: str) -> Processor:
    """The processor of a step kind."""
    return _PROCESSORS[kind]
