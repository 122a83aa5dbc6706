"""Analysis of finished runs as pure functions over their records (runs.py): aggregation over seeds (aggregate),
bootstrap intervals and verdicts (intervals, statistics), the grid's sensitivity and variant choice (sensitivity),
merging summaries (merging), general-ability CE (general_ce), per-document results (documents). No Matplotlib and
no HTML: harness/report/ draws and writes what these compute."""
