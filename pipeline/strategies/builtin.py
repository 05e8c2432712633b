"""Every built-in strategy (importing a strategy's module registers it). A new strategy is added here."""

from pipeline.strategies import basic, fat, madry, part, sip, trades  # noqa: F401
