"""``bench site``: the newsroom under load, as a deployment, in three configurations.

The parts: :mod:`~benchmarks.site.loadgen` (the open-loop generator and its closed-loop
capacity mode), :mod:`~benchmarks.site.deploy` (gunicorn and a Celery worker per
configuration), :mod:`~benchmarks.site.seed` (the data, by ``COPY``),
:mod:`~benchmarks.site.mix` (the requests a news site sees) and :mod:`~benchmarks.site.run`
(the run, its figures and their output), whose ``run(out, quick, articles, json_path)`` is
the command's entry point.
"""
