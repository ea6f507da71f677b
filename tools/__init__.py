"""perk's developer tools (not part of the installed package): ``python -m tools.aot``, the GPU
session script, and the target model shapes (:mod:`tools.shapes`) the tools, benchmarks and tests
share. Run from the repository root."""
