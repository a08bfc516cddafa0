"""Particles and their simulated images."""
