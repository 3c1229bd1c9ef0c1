"""Kept for setups that run ``rq worker -c workers.rq_settings`` from a checkout: the settings
ship in the package now, as ``reminders.rq_settings`` (no checkout needed)."""

from reminders.rq_settings import QUEUES, REDIS_URL

__all__ = ["QUEUES", "REDIS_URL"]
