"""Fakes of the far side of a network (provider APIs), started on 127.0.0.1 for tests."""
