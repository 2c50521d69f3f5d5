"""dispatcher: bulk SMS and multi-channel campaigns, sent exactly once and proven afterwards."""

__version__ = "0.1.0"
