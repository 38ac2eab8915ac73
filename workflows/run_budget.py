"""A run's cost and budget (``budget``, ``on_budget`` of a workflow), as a decision in progress (``Run``) adds to them."""
from __future__ import annotations

from typing import Any

from legato.topics.models import ErrorInfo
from legato.workflows.state import StepState


class RunBudget:
    """Part of ``Run`` (``legato.workflows.context``): costs summed per step and per run; over budget, nothing new
    starts (``on_budget: finish``) or the run fails (``on_budget: fail``)."""

    def check_budget(self) -> None:
        budget = self.wf.definition.budget if self.wf else None
        if budget is None or self.state.finished or self.state.budget_exhausted:
            return
        cost = self.state.cost
        tokens = cost.get("tokens_in", 0) + cost.get("tokens_out", 0)
        over = (budget.usd is not None and cost.get("usd", 0) > budget.usd) or (budget.tokens is not None and tokens > budget.tokens)
        if not over:
            return
        self.state.budget_exhausted = True
        if self.wf.definition.on_budget == "fail":
            self.finish_run(False, None, ErrorInfo(type="budget_exceeded", message=f"spent usd {cost.get('usd', 0)} and {tokens} tokens; budget {budget.model_dump(exclude_none=True)}", retryable=False))

    def add_cost(self, step: StepState, cost: dict[str, Any], models: dict[str, Any] | None = None) -> None:
        step.cost = sum_cost(step.cost or {}, cost, models)
        self.state.cost = sum_cost(self.state.cost, cost, models)

    def add_copied_cost(self, cost: dict[str, Any]) -> None:
        """The cost of a step copied into a forked run (already summed: ``models`` by model)."""
        self.state.cost = sum_cost(self.state.cost, {k: v for k, v in cost.items() if k != "models"}, cost.get("models"))


def sum_cost(total: dict[str, Any], cost: dict[str, Any], models: dict[str, Any] | None = None) -> dict[str, Any]:
    result = dict(total)
    for field in ("usd", "tokens_in", "tokens_out"):
        if field in cost:
            result[field] = round(result.get(field, 0) + cost[field], 9) if field == "usd" else result.get(field, 0) + cost[field]
    merged = dict(result.get("models", {}))
    if "model" in cost:
        merged[cost["model"]] = round(merged.get(cost["model"], 0) + cost.get("usd", 0), 9)
    for model, usd in (models or {}).items():
        merged[model] = round(merged.get(model, 0) + usd, 9)
    if merged:
        result["models"] = merged
    return result
