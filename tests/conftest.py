"""Puts tests/ on sys.path (pytest's rootdir conftest), so test modules share helpers
such as ``topk_checks``."""
