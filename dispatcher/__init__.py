"""dispatcher: bulk SMS and multi-channel publicity campaigns, sent exactly once and proven afterwards."""

__version__ = "0.1.0"
