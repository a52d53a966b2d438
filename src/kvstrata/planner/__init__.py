"""kvstrata planner: hardware catalog, model specs, workloads, the performance and cost model.

Pure Python (no torch import, except lazily inside `calibration.calibrate`). Stable interfaces used by
the engine: `kvstrata.planner.calibration` (MachineProfile, load_profile, save_profile, calibrate) and
`kvstrata.planner.cost` (ModelSpec and the reload / recompute / prefill / decode cost functions).
"""
