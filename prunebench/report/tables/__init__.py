"""The report's tables, one file each: the main table in the paper's layout (main_table.py,
rendered by main_table_text.py), the gains over a baseline, perplexity, cells, comparisons, seeds,
dense-relative metrics, tasks near chance and the published papers' own tables. Each builds a
frame from records (frame.py), prints through format.py and takes its differences from
differences.py; build.py writes them.
"""
