"""The driver: the floor above ``compiler/`` (tracing, IR, passes, verification) and ``backends/``.

``compile()`` (:mod:`api`), ``CompiledModel`` and ``load`` (:mod:`compiled`), the stage cache
(:mod:`cache`), ``backend="auto"`` (:mod:`auto`) and the generation loop (:mod:`generate`)
orchestrate the two; neither imports this package, and ``compiler/`` imports no backend.
"""
