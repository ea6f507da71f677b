"""perk's benchmark suites (pytest-benchmark) and their runner, a package of the repository (not
installed): run from the repository root, ``pytest benchmarks --benchmark-only`` or
``python -m benchmarks.run``; its modules import each other as ``benchmarks.<module>``."""
