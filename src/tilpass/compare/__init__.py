"""`tilpass compare`: every method trained for the same budget on the user's model and data,
measured side by side (parameters, memory, speed, file size, quality).

`plan.py` the methods and their defaults, `runner.py` one child process per method
(`child.py`, which trains with `tilpass.run.run` and measures with `measure.py`),
`report.py` / `recommend.py` / `charts.py` / `output.py` the table, advice and charts,
`cli.py` the command.
"""
