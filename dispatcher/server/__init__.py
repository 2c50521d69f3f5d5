"""The daemon's HTTP endpoint: Twilio receipts and replies, health and metrics (see app.py)."""
