"""Re-export of :mod:`capret.console` for the CLI modules."""

from capret.console import NotAvailableError, fail, print_json, run_guarded

__all__ = ["NotAvailableError", "fail", "print_json", "run_guarded"]
