"""The dispatch engine: materialise firings, claim, pace, send, record."""
