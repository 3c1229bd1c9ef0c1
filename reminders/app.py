"""The running engine's context: config, rules and connections, each made once and on demand."""

from __future__ import annotations

from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from . import business_db, clock, outbox, state_db
from .config import Config, load_config
from .rules import RuleSet, load_rules

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from .render import Renderer


class App:
    """What every command needs, loaded lazily: a command that needs no rules never reads them."""

    def __init__(self, config_path: str | Path | None = None, config: Config | None = None) -> None:
        self._config_path = config_path
        if config is not None:
            self.__dict__["config"] = config

    @cached_property
    def config(self) -> Config:
        return load_config(self._config_path)

    @cached_property
    def ruleset(self) -> RuleSet:
        return load_rules(self.config)

    @cached_property
    def state(self) -> Engine:
        engine = state_db.engine_for(self.config.state_url)
        # The outbox events of changes made through it: who wants which (read on first change).
        outbox.attach(engine, self._outbox_plan)
        return engine

    def _outbox_plan(self) -> outbox.Plan:
        """Who wants which event; the rules are read only when write-back or webhooks are set."""
        config = self.config
        return outbox.Plan.build(config, self.ruleset if config.outbox_used else None)

    @cached_property
    def business(self) -> Engine:
        return business_db.engine_for(self.config.source_url, self.config.source.query_timeout)

    @cached_property
    def renderer(self) -> Renderer:
        from .render import Renderer

        return Renderer(self.config.templates_path)

    def now(self) -> datetime:
        return clock.now()
