"""What every stage stands on: the stage cache, the run context, resumable training, distributed helpers, experiment
tracking, progress bars and guards.
"""
