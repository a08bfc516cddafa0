"""Scoring models against truth; calibration of confidence."""
