"""``bench site``: the newsroom under load, as a deployment, in three configurations.

The parts: :mod:`~benchmarks.site.loadgen` (the open-loop generator, its closed loop and the
capacity search), :mod:`~benchmarks.site.deploy` (gunicorn, a Celery worker and two Redis per
configuration), :mod:`~benchmarks.site.seed` (the data, by ``COPY``),
:mod:`~benchmarks.site.mix` (the requests a news site sees), :mod:`~benchmarks.site.pages`
(each page alone: queries, server against generator percentiles),
:mod:`~benchmarks.site.faults` (the faults and the canary), :mod:`~benchmarks.site.plots`
(the SVG plots) and :mod:`~benchmarks.site.run` (the run, its figures and their output), whose
``run(out, quick, articles, json_path)`` is the command's entry point.
"""
