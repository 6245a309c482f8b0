"""Processes on this machine: children that do not outlive their command, one command per folder."""
