"""Parts of bench/goodput.py: what it measures, the systems it runs, how it reports."""
