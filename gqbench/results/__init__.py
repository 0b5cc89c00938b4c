"""What runs leave: the tidy results table and its per-case files (tables), and paired speed-ups
with bootstrap intervals taken from it (ratios)."""
