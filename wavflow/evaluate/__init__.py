"""Evaluation of generated audio as the field reports it (FD, KL, IS, IB-score, DeSync, CLAP).

    python -m wavflow.evaluate --generated DIR --reference CSV [--infer-csv CSV] [--out DIR] [key=value ...]

`metrics` holds the formulas, `models` the networks (published packages, local weights only),
`pairing` the id matching, `run` the extraction and grouping, `cli` the job.
"""
