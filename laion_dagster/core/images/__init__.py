"""Checking that a body is an image, and resizing it."""
