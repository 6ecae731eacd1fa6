"""Pipeline: recipes and ``transmiter export``.

This layer owns the recipe schema and its validation (:mod:`.recipe`), the three phases
on artifacts shared by the CLI and the export (:mod:`.phases`), content-keyed incremental
steps (:mod:`.steps`), the export run (:mod:`.export`) and its report (:mod:`.report`).
It may import every layer below it, the demo world included (recipes can name demo
tasks and demo weights).
"""
