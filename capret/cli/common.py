"""Re-export of :mod:`capret.console` for the CLI modules."""

from capret.console import NotAvailableError, add_debug_flag, fail, print_json, run_guarded

__all__ = ["NotAvailableError", "add_debug_flag", "fail", "print_json", "run_guarded"]
