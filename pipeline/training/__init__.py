"""The training stage: data, losses, distributed set-up and the loop (see `pipeline.training.loop.train`).

A training job is loaded like every job: `pipeline.config.load_config(TrainConfig, path, overrides)`.
"""
