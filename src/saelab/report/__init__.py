"""Plots and Markdown reports for runs."""
