"""The frozen benchmark (``tools/benchmark.py``): recipes x method variants x backbone rows x seeds, one
``debias train`` run each, then one report.

``plan.py`` holds the variant table, the goals and the run plan; ``report.py`` reads the finished runs and writes
``benchmark.json``, ``benchmark.md`` and one PNG per recipe; ``jobs.py`` is the function a submitit job runs.
"""
