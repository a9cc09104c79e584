"""Reading results: sweep tables, statistics, plots, run reports and the replication report."""
