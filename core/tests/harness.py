"""A turn-by-turn driver for the replay engine with a controllable clock.

Every turn runs twice: on the live (cached) engine and on a fresh engine that first replays the
recorded history. Both must produce the same turn, which checks in every engine test that the
cache is only an optimisation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from perdure import history as h
from perdure.context import orchestration_body
from perdure.engine import Engine, TurnResult
from perdure.registry import Registry
from perdure.serialization import dumps


@dataclass
class Harness:
    registry: Registry
    orchestration: str
    instance_id: str = "inst-1"
    execution_id: int = 1
    now_ms: int = 1_000_000
    history: list[h.Event] = field(default_factory=list)
    engine: Engine | None = None
    check_replay: bool = True

    def new_engine(self) -> Engine:
        definition = self.registry.require_orchestration(self.orchestration)
        return Engine(
            instance_id=self.instance_id,
            execution_id=self.execution_id,
            name=self.orchestration,
            body=orchestration_body(definition, self.registry),
        )

    def start(self, input: Any = None, parent: h.ParentRef | None = None) -> TurnResult:
        return self.turn(
            h.StartOrchestration(
                instance_id=self.instance_id, name=self.orchestration, input=dumps(input), parent=parent
            )
        )

    def turn(self, *messages: h.Message, advance_ms: int = 0) -> TurnResult:
        self.now_ms += advance_ms
        if self.engine is None:
            self.engine = self.new_engine()
        live = self.engine.run_turn(self.now_ms, list(messages))
        if self.check_replay:
            fresh = self.new_engine()
            fresh.replay(self.history)
            again = fresh.run_turn(self.now_ms, list(messages))
            assert again.new_events == live.new_events, "replay diverged from the cached engine"
            assert again.worker_items == live.worker_items
            assert again.orchestrator_items == live.orchestrator_items
            assert again.cancelled_activities == live.cancelled_activities
            assert (again.status, again.output) == (live.status, live.output)
        self.history.extend(live.new_events)
        return live

    def replay_fresh(self) -> Engine:
        engine = self.new_engine()
        engine.replay(self.history)
        return engine

    # -- message builders -------------------------------------------------------------------

    def complete(self, item: h.ActivityExecute, value: Any) -> h.ActivityResult:
        return h.ActivityResult(
            instance_id=item.instance_id,
            execution_id=item.execution_id,
            source_id=item.activity_id,
            result=dumps(value),
        )

    def fail(
        self, item: h.ActivityExecute, type_name: str = "ValueError", message: str = "boom"
    ) -> h.ActivityError:
        return h.ActivityError(
            instance_id=item.instance_id,
            execution_id=item.execution_id,
            source_id=item.activity_id,
            error=h.ErrorDetails("application", type_name, message),
        )

    @staticmethod
    def fire(timer: h.Message) -> h.Message:
        assert isinstance(timer, h.TimerElapsed)
        return timer

    def raise_event(self, name: str, data: Any = None) -> h.RaiseEvent:
        return h.RaiseEvent(instance_id=self.instance_id, name=name, data=dumps(data))


def timers(turn: TurnResult) -> list[h.TimerElapsed]:
    return [m for m in turn.orchestrator_items if isinstance(m, h.TimerElapsed)]


def kinds(turn: TurnResult) -> list[str]:
    return [e.TYPE for e in turn.new_events]
