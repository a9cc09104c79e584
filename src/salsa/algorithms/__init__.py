"""Policy-optimisation algorithms as Lightning modules, free of caching and tracking (their stages in `salsa.stages` do
the wiring). `ALGORITHMS` names each one's stage.
"""
