"""Offline demo material: a LAION-like dataset and a loopback image server that serves it."""
