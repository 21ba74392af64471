"""From run directories (or W&B) to the comparison a user reads: tables, plots, report.md/html, W&B report."""
