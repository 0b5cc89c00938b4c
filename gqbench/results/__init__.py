"""What runs leave: the tidy results table and its per-case files (tables), and paired speed-ups
with 95% intervals taken from it, over processes where the cases ran in several (ratios)."""
