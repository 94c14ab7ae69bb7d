"""Console scripts: the only place that parses command lines.

Each module maps flags to a typed config and calls the library: :mod:`.train` (``capret-train``, any task of
:mod:`capret.tasks`), :mod:`.eval` (``capret-eval``; one module per evaluation mode), :mod:`.extract`
(``capret-extract``) and :mod:`.main` (the ``capret`` umbrella and its subcommands). ``capret-caption`` is
:mod:`captioning.cli`. Every entry point is ``main(argv=None) -> int`` so tests call it directly.
"""
