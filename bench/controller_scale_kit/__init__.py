"""Parts of bench/controller_scale.py: the simulated nodes, /proc accounting, the report."""
