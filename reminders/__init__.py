"""reminders: a proactive customer-reminder engine."""

__version__ = "0.1.0"
