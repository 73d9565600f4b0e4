"""Reward plugins."""
