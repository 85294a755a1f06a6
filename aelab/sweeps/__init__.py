"""A sweep read from its run dirs: its jobs and rows, the report and its plots. No torch."""
