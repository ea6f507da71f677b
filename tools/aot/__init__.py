"""GPU readiness without a GPU: compile every Triton kernel the engine launches, ahead of time.

``python -m tools.aot`` (from the repository root) compiles, for sm_90 and sm_80, every Triton
kernel of ``perk_kernels`` x autotune config x activation dtype (bf16, fp16, fp32; ``--activations
tf32`` adds fp32 with TF32 matmuls, which the engine never turns on) x constexpr variant that the
engine can launch at the shapes of Qwen2.5-0.5B and SmolLM2-135M (:mod:`tools.shapes`; LoRA ranks
16, 64, 256), prints a table (registers, spill bytes, shared memory, tensor-core instructions) and
exits with status 1 when:

* a kernel fails to compile;
* a config the autotuner can pick spills registers (a stack frame) for bf16/fp16 activations, or
  any config of a kernel without ``tl.dot`` does (fp32 activations are reported, not failed:
  their dot products have no tensor cores, so the tiles only run correct and slow);
* a bf16/fp16 ``tl.dot`` kernel has no tensor-core instructions in its SASS (HGMMA on sm_90,
  HMMA on sm_80);
* a launch has no config within the target's shared memory (the autotuner skips those that
  exceed it; a fixed-config kernel has nowhere to go);
* a ``*_kernel`` of ``perk_kernels`` is never compiled (the sweep must grow with the package).

Where nvcc exists it also compiles csrc/ (compile only, sm_90) and fails on errors in our code.

One module per job, in the order they run:

* :mod:`tools.aot.targets` — what the sweep covers (targets, ranks, dtypes, call scenarios) and
  where it caches its results;
* :mod:`tools.aot.record` — the launches, recorded from the public ops on CPU tensors of the real
  shapes (nothing executes), so that the sweep follows the launchers instead of copying them;
* :mod:`tools.aot.compile` — each launch expanded into the configs the kernel's own
  ``early_config_prune`` keeps, its heuristics applied, specialised by Triton's own binder
  (16-byte alignment, divisibility by 16, integers equal to 1), and compiled with
  ``triton.compile`` for a ``GPUTarget`` in a process pool; identical specialisations compile once;
* :mod:`tools.aot.sass` — registers, spills and tensor-core instructions read from the cubin
  (cuobjdump), cached beside Triton's cache in ``<triton cache>/perk_aot``;
* :mod:`tools.aot.verdicts` — pass or fail per row, the table and the per-rank summary;
* :mod:`tools.aot.csrc` — the nvcc compile of csrc/, in the background;
* :mod:`tools.aot.__main__` — the command line.

The Triton cache makes a second run fast. Kernels are compiled with ``TRITON_INTERPRET`` unset
(the interpreter's kernels cannot be compiled): run under it, the command re-executes itself
without it.
"""
