"""SIP-AT: salient information preserving adversarial training, its baselines and their evaluation."""

__version__ = "0.1.0"
