"""Rewrite passes over ATen graphs, one per file, each named like its function."""
