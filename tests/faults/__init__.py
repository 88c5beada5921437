"""Fault-injection suite: killed, resumed, disagreeing and numerically broken runs lose nothing."""
