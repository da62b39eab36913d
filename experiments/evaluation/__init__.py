"""Evaluation of trained checkpoints beyond top-1 error: `python -m experiments.evaluation --ckpt DIR`.

One module per measurement, each with the shape `base.Measurement` defines (steps, accumulate, report,
columns, markdown): `clean` (runs first; its predictions are shared), `fgsm`, `occlusion`, `inbetween`,
`ood`, `calibration`, `localization` (CAM boxes; `synthetic_loc` generates a dataset with boxes).
`runner.evaluate_model` runs them on one model; `checkpoints` and `testsets` load what is evaluated;
`report` writes the per-checkpoint reports and the comparison; `command` is the command line.
"""
